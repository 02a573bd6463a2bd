"""dragrt.kernels: the fast ops of dragrt and nothing else.

Every op has a pure-PyTorch reference in :mod:`dragrt.kernels.reference` (the spec, the CPU fallback,
the test oracle and the benchmark baseline) and, where it pays, a Triton implementation under
``dragrt.kernels.triton``. :mod:`dragrt.kernels.dispatch` picks which one runs.
"""

if __name__ != "dragrt.kernels":
    # Imported as a top-level `kernels` because a checkout's root landed on sys.path: refuse, so that
    # the real PyPI package `kernels` (which diffusers probes for) is never shadowed by this folder.
    raise ImportError(
        f"this folder is the package 'dragrt.kernels', not a top-level '{__name__}'; "
        "install dragrt (pip install -e .) and import dragrt.kernels"
    )

from dragrt.kernels.dispatch import KernelUnavailableError, use_kernels  # noqa: E402
from dragrt.kernels.ops import bilinear_sample, masked_blend, patch_track  # noqa: E402

__all__ = ["bilinear_sample", "patch_track", "masked_blend", "use_kernels", "KernelUnavailableError"]
