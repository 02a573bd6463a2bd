"""The public ops: ``torch.library`` custom ops with fake (meta) implementations and autograd.

Being custom ops, they are single nodes to ``torch.compile`` (``fullgraph=True`` works) and to export;
which implementation runs is decided at call time by :mod:`dragrt.kernels.dispatch`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dragrt.kernels import dispatch, reference
from dragrt.kernels import triton as _triton_impls  # noqa: F401  (registers the Triton implementations)


def _select(op: str, t: Tensor) -> dispatch.Implementation:
    return dispatch.select(op, t.device, t.dtype)


# --- bilinear_sample ---------------------------------------------------------------------------------------

@torch.library.custom_op("dragrt::bilinear_sample", mutates_args=())
def _bilinear_sample_op(feat: Tensor, points: Tensor, grid_h: int, grid_w: int) -> Tensor:
    return _select("bilinear_sample", feat).fn(feat, points, (grid_h, grid_w))


@_bilinear_sample_op.register_fake
def _(feat: Tensor, points: Tensor, grid_h: int, grid_w: int) -> Tensor:
    return feat.new_empty(feat.shape[0], points.shape[0], feat.shape[1])


@torch.library.custom_op("dragrt::bilinear_sample_backward", mutates_args=())
def _bilinear_sample_backward_op(grad_out: Tensor, points: Tensor, n: int, c: int, h: int, w: int,
                                 grid_h: int, grid_w: int) -> Tensor:
    impl = _select("bilinear_sample_backward", grad_out)
    return impl.fn(grad_out, points, (n, c, h, w), (grid_h, grid_w))


@_bilinear_sample_backward_op.register_fake
def _(grad_out: Tensor, points: Tensor, n: int, c: int, h: int, w: int, grid_h: int, grid_w: int) -> Tensor:
    return grad_out.new_empty(n, c, h, w)


def _bilinear_setup(ctx, inputs, output) -> None:
    feat, points, grid_h, grid_w = inputs
    ctx.save_for_backward(points)
    ctx.meta = (tuple(feat.shape), grid_h, grid_w, feat.dtype)


def _bilinear_backward(ctx, grad_out: Tensor):
    (points,) = ctx.saved_tensors
    (n, c, h, w), grid_h, grid_w, dtype = ctx.meta
    grad = torch.ops.dragrt.bilinear_sample_backward(grad_out.contiguous(), points, n, c, h, w, grid_h, grid_w)
    return grad.to(dtype), None, None, None


_bilinear_sample_op.register_autograd(_bilinear_backward, setup_context=_bilinear_setup)


def bilinear_sample(feat: Tensor, points: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Sample ``feat [N, C, H, W]`` at ``points [P, 2]`` (``[x, y]`` pixels of the grid ``size``) -> ``[N, P, C]``.

    See :func:`dragrt.kernels.reference.bilinear_sample` for the exact definition (the spec). Points
    outside the grid read zeros; the result is differentiable in ``feat`` and its backward touches only
    the native pixels the points read.
    """
    gh, gw = reference._check_sample_args(feat, points, size)
    pts = points.to(torch.float64 if feat.dtype == torch.float64 else torch.float32).contiguous()
    return torch.ops.dragrt.bilinear_sample(feat, pts, gh, gw)


# --- patch_track -------------------------------------------------------------------------------------------

@torch.library.custom_op("dragrt::patch_track", mutates_args=())
def _patch_track_op(feat: Tensor, ref_vectors: Tensor, centers: Tensor, radius: int, metric: str,
                    grid_h: int, grid_w: int) -> Tensor:
    impl = _select("patch_track", feat)
    return impl.fn(feat, ref_vectors, centers, radius, metric, (grid_h, grid_w))


@_patch_track_op.register_fake
def _(feat, ref_vectors, centers, radius, metric, grid_h, grid_w) -> Tensor:
    return torch.empty_like(centers)


def patch_track(feat: Tensor, ref_vectors: Tensor, centers: Tensor, radius: int, metric: str = "l2",
                size: tuple[int, int] | None = None) -> Tensor:
    """Per handle, the grid pixel within ``radius`` of ``centers`` whose feature is nearest ``ref_vectors``.

    ``feat [1, C, H, W]``, ``ref_vectors [P, C]``, ``centers [P, 2]`` as ``[x, y]`` grid pixels; returns
    ``[P, 2]`` integer positions on the device without a host sync. Not differentiable (tracking is a
    search). Definition: :func:`dragrt.kernels.reference.patch_track`.
    """
    gh, gw = reference._check_track_args(feat, ref_vectors, centers, radius, metric, size)
    return torch.ops.dragrt.patch_track(feat.detach(), ref_vectors.detach().float().contiguous(),
                                        centers.detach().contiguous(), radius, metric, gh, gw)


# --- masked_blend ------------------------------------------------------------------------------------------

@torch.library.custom_op("dragrt::masked_blend", mutates_args=())
def _masked_blend_op(fg: Tensor, src: Tensor, mask: Tensor, alpha: Tensor | None, alpha_scalar: float,
                     noise: Tensor | None) -> Tensor:
    alpha_t = alpha if alpha is not None else alpha_scalar
    return _select("masked_blend", fg).fn(fg, src, mask, alpha_t, noise)


@_masked_blend_op.register_fake
def _(fg, src, mask, alpha, alpha_scalar, noise) -> Tensor:
    return torch.empty_like(fg)


def _blend_setup(ctx, inputs, output) -> None:
    fg, src, mask, alpha, alpha_scalar, noise = inputs
    ctx.save_for_backward(fg, src, mask, alpha, noise)
    ctx.alpha_scalar = alpha_scalar


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _blend_backward(ctx, grad: Tensor):
    fg, src, mask, alpha, noise = ctx.saved_tensors
    acc = torch.float64 if fg.dtype == torch.float64 else torch.float32
    g, m = grad.to(acc), mask.to(acc)
    g_bg = g * (1 - m)
    if noise is None:
        src_scale, noise_scale, bg = 1.0, 0.0, src.to(acc)
    else:
        if alpha is not None:
            a = alpha.to(acc)[:, None, None, None]
            src_scale, noise_scale = torch.sqrt(a), torch.sqrt(1 - a)
        else:  # a Python alpha stays a Python number: no tensor, no host-to-device copy
            src_scale, noise_scale = math.sqrt(ctx.alpha_scalar), math.sqrt(1 - ctx.alpha_scalar)
        bg = src_scale * src.to(acc) + noise_scale * noise.to(acc)
    d_fg = (g * m).to(fg.dtype) if ctx.needs_input_grad[0] else None
    d_src = _sum_to(g_bg * src_scale, src.shape).to(src.dtype) if ctx.needs_input_grad[1] else None
    d_mask = _sum_to(g * (fg.to(acc) - bg), mask.shape).to(mask.dtype) if ctx.needs_input_grad[2] else None
    d_noise = None
    if noise is not None and ctx.needs_input_grad[5]:
        d_noise = (g_bg * noise_scale).to(noise.dtype)
    return d_fg, d_src, d_mask, None, None, d_noise


_masked_blend_op.register_autograd(_blend_backward, setup_context=_blend_setup)


def masked_blend(fg: Tensor, src: Tensor, mask: Tensor, alpha_t: float | Tensor | None = None,
                 noise: Tensor | None = None) -> Tensor:
    """``fg * m + (sqrt(alpha_t) * src + sqrt(1 - alpha_t) * noise) * (1 - m)``, or ``fg * m + src * (1 - m)``
    without ``noise``. ``mask`` 1 = keep ``fg``; broadcasts over batch and channels. A Python number
    ``alpha_t`` travels as a kernel argument (no host-to-device copy, so the call can be graph-captured);
    a tensor gives one alpha per sample. Definition: :func:`dragrt.kernels.reference.masked_blend`.
    """
    reference._check_blend_args(fg, src, mask, noise)
    if noise is None:
        return torch.ops.dragrt.masked_blend(fg, src, mask, None, 1.0, None)
    if alpha_t is None:
        raise ValueError("alpha_t is required when noise is given (alphas_cumprod[t], in [0, 1])")
    if isinstance(alpha_t, (int, float)):
        return torch.ops.dragrt.masked_blend(fg, src, mask, None, reference.check_alpha(alpha_t), noise)
    alpha = reference.alpha_vector(alpha_t, fg.shape[0], fg.device)
    return torch.ops.dragrt.masked_blend(fg, src, mask, alpha.contiguous(), 1.0, noise)
