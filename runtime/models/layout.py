"""Memory layout of a network's weights: the fast paths run channels-last, the reference paths NCHW.

A convolution answers in channels-last when its weight's strides are channels-last, and for a 1x1 kernel those
strides also pass ``is_contiguous()``: the checks here compare strides with NCHW's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _is_nchw(t: torch.Tensor) -> bool:
    return t.stride() == torch.empty(t.shape, device="meta").stride()


def non_nchw_weights(module: nn.Module) -> list[nn.Parameter]:
    """The 4-D and 5-D parameters of ``module`` whose strides are not NCHW's (dense, row-major)."""
    return [q for q in module.parameters() if q.dim() in (4, 5) and not _is_nchw(q)]


def to_nchw_(module: nn.Module) -> nn.Module:
    """Give every convolution weight of ``module`` NCHW strides, in place (new storages); returns ``module``."""
    for q in non_nchw_weights(module):
        q.data = q.data.clone(memory_format=torch.contiguous_format)
    return module


@contextlib.contextmanager
def nchw_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` with NCHW copies of its non-NCHW weights, then give it back its own tensors -- the same
    storages, so CUDA graphs captured on them stay valid (a conversion in place would replace them). Costs one
    copy of those weights while it lasts."""
    swapped = [(q, q.data) for q in non_nchw_weights(module)]
    try:
        for q, data in swapped:
            q.data = data.clone(memory_format=torch.contiguous_format)
        yield module
    finally:
        for q, data in swapped:
            q.data = data
