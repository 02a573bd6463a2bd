"""The editing engines, one file each, one entry point each (``DragGANEngine``, ...)."""
