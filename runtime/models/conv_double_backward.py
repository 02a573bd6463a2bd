"""Convolutions whose gradients are convolutions again, for the regularisers that differentiate twice.

StyleGAN2's R1 penalty and path-length regulariser take a gradient with ``create_graph=True`` and then
backpropagate through it. PyTorch's own double backward of a convolution computes the weight's gradient of
that gradient as a convolution with the roles of batch and channels swapped: the "kernel" is a whole
feature map (``[O, N, 128, 128]`` at 128 px), and for a grouped or depthwise convolution (the FIR blurs of
``upfirdn2d``) one such call per group, even where the weight is a constant filter. cuDNN runs those shapes
with slow fallback kernels: on an H100 they took over half of a 128 px training step (CONTRIBUTING).

Here every derivative is one of three linear maps, each differentiable by the other two:

- the convolution ``y = conv(x, w)`` (plain or transposed);
- its input gradient, the adjoint convolution ``conv_transpose(dy, w)`` (or ``conv(dy, w)`` for a transposed
  one), with the output padding that restores ``x``'s size;
- its weight gradient, ATen's ``convolution_backward`` with only the weight's output asked for (cuDNN's wgrad),
  whose own derivatives are the convolution (w.r.t. ``dy``) and the adjoint convolution (w.r.t. ``x``) with the
  incoming weight gradient as the kernel.

So gradients of any order run the same three kinds of kernels as a first-order step, and a constant filter
(``requires_grad`` off) never gets a weight gradient at all. The same arithmetic as ``F.conv2d`` /
``F.conv_transpose2d`` (the reference): values agree to rounding; ``tests/runtime/models/test_conv_double_backward.py``
holds both orders to the reference and to finite differences.

Off by default: :func:`conv2d` and :func:`conv_transpose2d` are ``F.conv2d`` / ``F.conv_transpose2d`` unless
called inside :func:`enabled` (the StyleGAN2 trainer's regulariser steps). Dilation is always 1 and there is
no bias (the callers add theirs with ``bias_act``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# A plain module global, not thread-local state: torch.compile reads it as a guarded constant, where a
# threading.local would break the graph of every compiled generator that calls these functions.
_ENABLED = False


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Inside, :func:`conv2d` and :func:`conv_transpose2d` take the twice-differentiable path (process-wide)."""
    global _ENABLED
    if not isinstance(on, bool):
        raise ValueError(f"on must be True or False, got {on!r}")
    before, _ENABLED = _ENABLED, on
    try:
        yield
    finally:
        _ENABLED = before


def is_enabled() -> bool:
    return _ENABLED


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    p = tuple(int(a) for a in v)
    if len(p) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return p  # type: ignore[return-value]


def _conv(x: Tensor, w: Tensor, transposed: bool, stride: int | Sequence[int], padding: int | Sequence[int],
          output_padding: int | Sequence[int], groups: int) -> Tensor:
    """The plain op: what both paths compute forward, and all that runs outside :func:`enabled`."""
    if transposed:
        return F.conv_transpose2d(x, w, None, stride, padding, output_padding, groups)
    return F.conv2d(x, w, None, stride, padding, 1, groups)


def _adjoint(dy: Tensor, kernel: Tensor, x_shape: Sequence[int], conf: tuple) -> Tensor:
    """The adjoint of the convolution ``conf`` with ``kernel``, applied to ``dy``: the gradient w.r.t. its input
    (shape ``x_shape``). A plain convolution's adjoint is transposed, with the output padding that gives back
    ``x``'s size; a transposed one's is plain, its size fixed by its input."""
    transposed, stride, padding, _, groups = conf
    op = (0, 0) if transposed else tuple(
        int(x_shape[2 + i]) - ((int(dy.shape[2 + i]) - 1) * stride[i] - 2 * padding[i] + int(kernel.shape[2 + i]))
        for i in range(2))
    return _Conv.apply(dy, kernel, not transposed, stride, padding, op, groups)


class _Conv(torch.autograd.Function):
    """``y = conv(x, w)`` (plain or transposed) with the derivatives of the module docstring."""

    @staticmethod
    def forward(ctx, x, w, transposed, stride, padding, output_padding, groups):
        ctx.save_for_backward(x, w)
        ctx.conf = (transposed, stride, padding, output_padding, groups)
        return _conv(x, w, transposed, stride, padding, output_padding, groups)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = _adjoint(dy, w, x.shape, ctx.conf) if ctx.needs_input_grad[0] else None
        dw = _WeightGrad.apply(dy, x, w, ctx.conf) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None, None, None


class _WeightGrad(torch.autograd.Function):
    """``dw = d<dy, conv(x, w)>/dw`` (cuDNN's wgrad), linear in ``dy`` and in ``x``."""

    @staticmethod
    def forward(ctx, dy, x, w, conf):
        transposed, stride, padding, output_padding, groups = conf
        ctx.save_for_backward(dy, x)
        ctx.conf = conf
        return torch.ops.aten.convolution_backward(dy, x, w, None, list(stride), list(padding), [1, 1], transposed,
                                                   list(output_padding), groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx, ddw):
        dy, x = ctx.saved_tensors
        transposed, stride, padding, output_padding, groups = ctx.conf
        # <ddw, dw> = <dy, conv(x, ddw)>: w.r.t. dy the convolution with kernel ddw, w.r.t. x its adjoint
        ddy = _Conv.apply(x, ddw, transposed, stride, padding, output_padding, groups) if ctx.needs_input_grad[0] \
            else None
        dx = _adjoint(dy, ddw, x.shape, ctx.conf) if ctx.needs_input_grad[1] else None
        return ddy, dx, None, None


def _twice(x: Tensor, w: Tensor) -> bool:
    return _ENABLED and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)


def _apply(x: Tensor, w: Tensor, transposed: bool, stride, padding, output_padding, groups: int) -> Tensor:
    s, p, op = _pair(stride, "stride"), _pair(padding, "padding"), _pair(output_padding, "output_padding")
    return _Conv.apply(x, w, transposed, s, p, op, int(groups))


def conv2d(x: Tensor, w: Tensor, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
           groups: int = 1) -> Tensor:
    """``F.conv2d(x, w, None, stride, padding, 1, groups)``; twice differentiable inside :func:`enabled`."""
    if _twice(x, w):
        return _apply(x, w, False, stride, padding, 0, groups)
    return _conv(x, w, False, stride, padding, 0, groups)


def conv_transpose2d(x: Tensor, w: Tensor, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                     output_padding: int | Sequence[int] = 0, groups: int = 1) -> Tensor:
    """``F.conv_transpose2d(x, w, None, stride, padding, output_padding, groups)``; twice differentiable inside
    :func:`enabled`."""
    if _twice(x, w):
        return _apply(x, w, True, stride, padding, output_padding, groups)
    return _conv(x, w, True, stride, padding, output_padding, groups)
