"""dragrt.export."""

if __name__ != "dragrt.export":
    raise ImportError(
        f"this folder is the package 'dragrt.export', not a top-level '{__name__}'; "
        "install dragrt (pip install -e .) and import dragrt.export"
    )
