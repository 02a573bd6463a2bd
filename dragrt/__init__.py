"""dragrt: a fast runtime for interactive generative image editing.

Subpackages (each a top-level folder of the repository, installed under this one name):
``dragrt.kernels`` (fast ops and their PyTorch references), ``dragrt.runtime`` (models, engines,
sessions, configuration), ``dragrt.export`` (ONNX / TensorRT / AOTInductor) and ``dragrt.bench``
(benchmark harness).
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _extend_path_for_clean_clone() -> None:
    # From an install (editable or regular) the subpackages sit where the import system finds them.
    # From a plain checkout (`python -m dragrt` at the repository root, no pip install) they are the
    # sibling folders kernels/, runtime/, export/, bench/: make them reachable as dragrt.<name> by
    # adding the repository root to *this package's* search path only. The root is never put on
    # sys.path, so no top-level `kernels` package is shadowed.
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    marker = _os.path.join(root, "pyproject.toml")
    if not _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")) or not _os.path.isfile(marker):
        return
    try:
        with open(marker, encoding="utf-8") as f:
            if 'name = "dragrt"' not in f.read():
                return
    except OSError:
        return
    if root not in __path__:  # noqa: F821 (module attribute set by the import system)
        __path__.append(root)  # noqa: F821


def _drop_checkout_root_from_sys_path() -> None:
    # `python -m ...` or `python -c` at the repository root puts the root on sys.path, where the folder
    # `kernels/` would then answer `import kernels`: transformers probes for the PyPI package `kernels`
    # and breaks on our folder (seen with transformers 5.23). dragrt's own subpackages are reached through
    # dragrt.__path__, so the root is not needed on sys.path once dragrt is imported: take it off.
    import sys

    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        return  # an installed copy: nothing of ours sits next to it
    cwd = _os.getcwd()
    sys.path[:] = [p for p in sys.path if _os.path.abspath(p or cwd) != root]
    if "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", "").startswith(root):
        del sys.modules["kernels"]


_extend_path_for_clean_clone()
_drop_checkout_root_from_sys_path()
