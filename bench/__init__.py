"""dragrt.bench."""

if __name__ != "dragrt.bench":
    raise ImportError(
        f"this folder is the package 'dragrt.bench', not a top-level '{__name__}'; "
        "install dragrt (pip install -e .) and import dragrt.bench"
    )
