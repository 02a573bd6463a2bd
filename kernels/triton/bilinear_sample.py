"""Triton bilinear_sample: gather the <= 4x4 native pixels each point reads, forward and backward.

Spec: :func:`dragrt.kernels.reference.bilinear_sample`. One program per (point, batch, channel block); the
native map is read at the taps only (never upsampled) and the backward adds into the taps only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _corner(g, valid, w_corner, scale, native_size):
    # One grid pixel g of a virtual bilinear resize (PyTorch's align_corners=False rule) as two native taps.
    src = tl.maximum(scale * (g + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src), native_size - 1.0)
    lam = src - i0
    i1 = tl.minimum(i0 + 1.0, native_size - 1.0)
    w = tl.where(valid, w_corner, 0.0)
    lam = tl.where(valid, lam, 0.0)
    i0 = tl.where(valid, i0, 0.0).to(tl.int32)
    i1 = tl.where(valid, i1, 0.0).to(tl.int32)
    return i0, i1, w * (1.0 - lam), w * lam


@triton.jit
def _axis_taps(coord, grid_size, native_size):
    # The four native taps of a 1-D sample at `coord` (grid pixels, zero padding outside the grid).
    scale = native_size.to(tl.float32) / grid_size.to(tl.float32)
    g0 = tl.floor(coord)
    frac = coord - g0
    g1 = g0 + 1.0
    va = (g0 >= 0.0) & (g0 <= grid_size - 1.0)
    vb = (g1 >= 0.0) & (g1 <= grid_size - 1.0)
    a0, a1, wa0, wa1 = _corner(g0, va, 1.0 - frac, scale, native_size.to(tl.float32))
    b0, b1, wb0, wb1 = _corner(g1, vb, frac, scale, native_size.to(tl.float32))
    return a0, a1, b0, b1, wa0, wa1, wb0, wb1


@triton.jit
def _gather_row(base, c_offs, c_mask, zf, stride_h, stride_w, iy, wy, x0, x1, x2, x3, v0, v1, v2, v3):
    # Sum over the 4 x-taps of one y-tap row; loads are skipped where the weight is zero. `zf` (zeros
    # [BLOCK_C]) makes each weight test a vector: the interpreter cannot AND a vector with a scalar.
    row = base + iy * stride_h
    acc = tl.load(row + x0 * stride_w + c_offs, mask=c_mask & (zf + wy * v0 != 0.0), other=0.0).to(tl.float32) * v0
    acc += tl.load(row + x1 * stride_w + c_offs, mask=c_mask & (zf + wy * v1 != 0.0), other=0.0).to(tl.float32) * v1
    acc += tl.load(row + x2 * stride_w + c_offs, mask=c_mask & (zf + wy * v2 != 0.0), other=0.0).to(tl.float32) * v2
    acc += tl.load(row + x3 * stride_w + c_offs, mask=c_mask & (zf + wy * v3 != 0.0), other=0.0).to(tl.float32) * v3
    return acc * wy


@triton.jit
def _scatter_row(base, c_offs, c_mask, zf, stride_h, stride_w, g, iy, wy, x0, x1, x2, x3, v0, v1, v2, v3):
    row = base + iy * stride_h
    tl.atomic_add(row + x0 * stride_w + c_offs, g * (wy * v0), mask=c_mask & (zf + wy * v0 != 0.0))
    tl.atomic_add(row + x1 * stride_w + c_offs, g * (wy * v1), mask=c_mask & (zf + wy * v1 != 0.0))
    tl.atomic_add(row + x2 * stride_w + c_offs, g * (wy * v2), mask=c_mask & (zf + wy * v2 != 0.0))
    tl.atomic_add(row + x3 * stride_w + c_offs, g * (wy * v3), mask=c_mask & (zf + wy * v3 != 0.0))


@triton.jit
def _bilinear_fwd_kernel(feat_ptr, pts_ptr, out_ptr, C, H, W, GH, GW,
                         s_n, s_c, s_h, s_w, o_n, o_p,
                         BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    n = tl.program_id(1)
    c_offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    px = tl.load(pts_ptr + 2 * p)
    py = tl.load(pts_ptr + 2 * p + 1)
    x0, x1, x2, x3, u0, u1, u2, u3 = _axis_taps(px, GW, W)
    y0, y1, y2, y3, v0, v1, v2, v3 = _axis_taps(py, GH, H)
    base = feat_ptr + n.to(tl.int64) * s_n
    cs = c_offs.to(tl.int64) * s_c
    zf = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc = _gather_row(base, cs, c_mask, zf, s_h, s_w, y0, v0, x0, x1, x2, x3, u0, u1, u2, u3)
    acc += _gather_row(base, cs, c_mask, zf, s_h, s_w, y1, v1, x0, x1, x2, x3, u0, u1, u2, u3)
    acc += _gather_row(base, cs, c_mask, zf, s_h, s_w, y2, v2, x0, x1, x2, x3, u0, u1, u2, u3)
    acc += _gather_row(base, cs, c_mask, zf, s_h, s_w, y3, v3, x0, x1, x2, x3, u0, u1, u2, u3)
    tl.store(out_ptr + n.to(tl.int64) * o_n + p * o_p + c_offs, acc.to(out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _bilinear_bwd_kernel(grad_out_ptr, pts_ptr, grad_ptr, C, H, W, GH, GW,
                         g_n, g_p, s_n, s_c, s_h, s_w,
                         BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    n = tl.program_id(1)
    c_offs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    px = tl.load(pts_ptr + 2 * p)
    py = tl.load(pts_ptr + 2 * p + 1)
    x0, x1, x2, x3, u0, u1, u2, u3 = _axis_taps(px, GW, W)
    y0, y1, y2, y3, v0, v1, v2, v3 = _axis_taps(py, GH, H)
    g = tl.load(grad_out_ptr + n.to(tl.int64) * g_n + p * g_p + c_offs, mask=c_mask, other=0.0).to(tl.float32)
    base = grad_ptr + n.to(tl.int64) * s_n
    cs = c_offs.to(tl.int64) * s_c
    zf = tl.zeros([BLOCK_C], dtype=tl.float32)
    _scatter_row(base, cs, c_mask, zf, s_h, s_w, g, y0, v0, x0, x1, x2, x3, u0, u1, u2, u3)
    _scatter_row(base, cs, c_mask, zf, s_h, s_w, g, y1, v1, x0, x1, x2, x3, u0, u1, u2, u3)
    _scatter_row(base, cs, c_mask, zf, s_h, s_w, g, y2, v2, x0, x1, x2, x3, u0, u1, u2, u3)
    _scatter_row(base, cs, c_mask, zf, s_h, s_w, g, y3, v3, x0, x1, x2, x3, u0, u1, u2, u3)


def _block_c(c: int) -> int:
    return min(256, triton.next_power_of_2(max(c, 16)))


def bilinear_sample(feat: Tensor, points: Tensor, size: tuple[int, int]) -> Tensor:
    """Launcher; same contract as the reference. ``feat`` may be NCHW or channels-last (any strides)."""
    n, c, h, w = feat.shape
    gh, gw = size
    pts = points.to(torch.float32).contiguous()
    n_p = pts.shape[0]
    out = torch.empty(n, n_p, c, device=feat.device, dtype=feat.dtype)
    if n_p == 0 or n == 0 or c == 0:
        return out
    block_c = _block_c(c)
    grid = (n_p, n, triton.cdiv(c, block_c))
    _bilinear_fwd_kernel[grid](feat, pts, out, c, h, w, gh, gw, *feat.stride(), out.stride(0), out.stride(1),
                               BLOCK_C=block_c, num_warps=4 if block_c >= 256 else 2)
    return out


def bilinear_sample_backward(grad_out: Tensor, points: Tensor, feat_shape: tuple[int, int, int, int],
                             size: tuple[int, int]) -> Tensor:
    """Gradient into a float32 buffer through atomic adds at the taps only, cast to ``grad_out``'s dtype.

    The buffer must be dense and zeroed (autograd hands it to the layer that produced ``feat``); it is
    channels-last so that a point's channel vector is one contiguous run.
    """
    n, c, h, w = feat_shape
    gh, gw = size
    pts = points.to(torch.float32).contiguous()
    grad = torch.zeros(n, h, w, c, device=grad_out.device, dtype=torch.float32).permute(0, 3, 1, 2)
    n_p = pts.shape[0]
    if n_p and n and c:
        go = grad_out.contiguous()
        block_c = _block_c(c)
        grid = (n_p, n, triton.cdiv(c, block_c))
        _bilinear_bwd_kernel[grid](go, pts, grad, c, h, w, gh, gw, go.stride(0), go.stride(1), *grad.stride(),
                                   BLOCK_C=block_c, num_warps=4 if block_c >= 256 else 2)
    return grad if grad_out.dtype == torch.float32 else grad.to(grad_out.dtype)
