"""dragrt.kernels: the fast ops of dragrt and nothing else.

Every op has a pure-PyTorch reference in :mod:`dragrt.kernels.reference` (the spec, the CPU fallback,
the test oracle and the benchmark baseline) and, where it pays, a Triton implementation under
``dragrt.kernels.triton``. :mod:`dragrt.kernels.dispatch` picks which one runs.
"""

if __name__ != "dragrt.kernels":
    # Imported as a top-level `kernels` because a checkout's root is on sys.path (python -c, a REPL or a script run
    # from the repository root). There is a real PyPI package of that name, which transformers probes for by
    # importing it when it finds no metadata: stay an inert module (no version: "not a usable kernels") instead of
    # raising, which would break `import transformers` there. Any attribute says what this folder is.
    _MESSAGE = (f"this folder is the package 'dragrt.kernels', not a top-level '{__name__}'; "
                "install dragrt (pip install -e .) and import dragrt.kernels")

    def __getattr__(name: str):
        raise AttributeError(_MESSAGE)

else:
    from dragrt.kernels.dispatch import KernelUnavailableError, use_kernels
    from dragrt.kernels.ops import bilinear_sample, masked_blend, patch_track

    __all__ = ["bilinear_sample", "patch_track", "masked_blend", "use_kernels", "KernelUnavailableError"]
