"""dragrt.runtime."""

if __name__ != "dragrt.runtime":
    raise ImportError(
        f"this folder is the package 'dragrt.runtime', not a top-level '{__name__}'; "
        "install dragrt (pip install -e .) and import dragrt.runtime"
    )
