"""``device-copy``: the bandwidth yardstick other scenarios are compared against in the same run."""

from __future__ import annotations

from typing import Any

import torch

from dragrt.bench.harness import cuda_available, gbs, make_record, time_cuda
from dragrt.bench.scenarios import register

COPY_BYTES = 256 * 2**20


@register(
    "device-copy",
    needs_cuda=True,
    description="device-to-device copy of a 256 MiB float32 tensor: copy_ into a buffer vs torch.clone",
)
def device_copy(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    """Device-to-device copy of 256 MiB float32; ``extra`` holds GB/s counting bytes read + written."""
    if not cuda_available():
        raise RuntimeError("device-copy needs a CUDA GPU, and none is available")
    numel = COPY_BYTES // 4
    src = torch.ones(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ours = time_cuda(lambda: dst.copy_(src), budget_ms=budget_ms)
    reference = time_cuda(lambda: torch.clone(src), budget_ms=budget_ms)
    moved = 2 * numel * 4
    extra = {
        "bytes_moved": moved,
        "ours_gbs": round(gbs(moved, ours.p50_ms), 1),
        "reference_gbs": round(gbs(moved, reference.p50_ms), 1),
    }
    config = {
        "nbytes": COPY_BYTES,
        "dtype": "float32",
        "numel": numel,
        "budget_ms": budget_ms,
        "quick": quick,
    }
    return [make_record("device-copy", config, ours, reference, extra=extra)]
