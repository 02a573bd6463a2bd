"""dragrt.kernels: the fast ops of dragrt and nothing else.

Every op has a pure-PyTorch reference in :mod:`dragrt.kernels.reference` (the spec, the CPU fallback,
the test oracle and the benchmark baseline) and, where it pays, a Triton implementation under
``dragrt.kernels.triton``. :mod:`dragrt.kernels.dispatch` picks which one runs.
"""

if __name__ != "dragrt.kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (python -c, a REPL, a script run
    # from the repository root). There is a real PyPI package of that name (transformers >= 5.25 requires it and
    # imports it): when it is installed, hand the import over to it, so that this folder never shadows it;
    # when it is not, stay an inert module (no version: "not a usable kernels") whose attributes say what this
    # folder is, instead of raising, which would break `import transformers` there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _ROOT]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file ran
        _spec.loader.exec_module(_module)
    else:
        _MESSAGE = (f"this folder is the package 'dragrt.kernels', not a top-level '{__name__}'; "
                    "install dragrt (pip install -e .) and import dragrt.kernels")

        def __getattr__(name: str):
            raise AttributeError(_MESSAGE)

else:
    from dragrt.kernels.dispatch import KernelUnavailableError, use_kernels
    from dragrt.kernels.ops import bilinear_sample, masked_blend, patch_track

    __all__ = ["bilinear_sample", "patch_track", "masked_blend", "use_kernels", "KernelUnavailableError"]
