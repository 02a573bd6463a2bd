"""Triton patch_track: windowed nearest-neighbour search per handle, on the device, deterministic.

Spec: :func:`dragrt.kernels.reference.patch_track`. Pass 1 scores blocks of window positions (grid
(P, blocks)) and keeps each block's first minimum; pass 2 (grid (P,)) picks the first minimum over blocks
and writes the new centre. No atomics, no host sync; the upsampled map is never built: a window position is
an integer grid pixel, i.e. at most 2x2 native taps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dragrt.kernels.triton.bilinear_sample import _corner


@triton.jit
def _track_scores_kernel(feat_ptr, ref_ptr, ctr_ptr, part_d_ptr, part_k_ptr,
                         C, H, W, GH, GW, RADIUS, NB,
                         s_c, s_h, s_w,
                         L2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0)
    blk = tl.program_id(1)
    side = 2 * RADIUS + 1
    k = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < side * side
    bx = tl.floor(tl.load(ctr_ptr + 2 * p).to(tl.float32) + 0.5)
    by = tl.floor(tl.load(ctr_ptr + 2 * p + 1).to(tl.float32) + 0.5)
    gx = bx + (k % side - RADIUS).to(tl.float32)
    gy = by + (k // side - RADIUS).to(tl.float32)
    inside = k_ok & (gx >= 0.0) & (gx <= GW - 1.0) & (gy >= 0.0) & (gy <= GH - 1.0)
    sx = W.to(tl.float32) / GW.to(tl.float32)
    sy = H.to(tl.float32) / GH.to(tl.float32)
    x0, x1, wx0, wx1 = _corner(gx, inside, 1.0, sx, W.to(tl.float32))
    y0, y1, wy0, wy1 = _corner(gy, inside, 1.0, sy, H.to(tl.float32))
    o00 = (y0 * s_h + x0 * s_w)[:, None]
    o01 = (y0 * s_h + x1 * s_w)[:, None]
    o10 = (y1 * s_h + x0 * s_w)[:, None]
    o11 = (y1 * s_h + x1 * s_w)[:, None]
    w00 = (wy0 * wx0)[:, None]
    w01 = (wy0 * wx1)[:, None]
    w10 = (wy1 * wx0)[:, None]
    w11 = (wy1 * wx1)[:, None]
    m_k = inside[:, None]
    dist = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        m = m_k & c_ok[None, :]
        co = (c.to(tl.int64) * s_c)[None, :]
        v = tl.load(feat_ptr + co + o00, mask=m & (w00 != 0.0), other=0.0).to(tl.float32) * w00
        v += tl.load(feat_ptr + co + o01, mask=m & (w01 != 0.0), other=0.0).to(tl.float32) * w01
        v += tl.load(feat_ptr + co + o10, mask=m & (w10 != 0.0), other=0.0).to(tl.float32) * w10
        v += tl.load(feat_ptr + co + o11, mask=m & (w11 != 0.0), other=0.0).to(tl.float32) * w11
        ref = tl.load(ref_ptr + p * C + c, mask=c_ok, other=0.0)
        diff = tl.where(m, v - ref[None, :], 0.0)
        if L2:
            dist += tl.sum(diff * diff, axis=1)
        else:
            dist += tl.sum(tl.abs(diff), axis=1)
    if L2:
        dist = tl.sqrt(dist)
    dist = tl.where(inside, dist, float("inf"))
    best_d = tl.min(dist, axis=0)
    # First minimum of the block: the smallest window index among the positions that reach it.
    best_k = tl.min(tl.where(dist == best_d, k, 2147483647), axis=0)
    tl.store(part_d_ptr + p * NB + blk, best_d)
    tl.store(part_k_ptr + p * NB + blk, best_k)


@triton.jit
def _track_pick_kernel(part_d_ptr, part_k_ptr, ctr_ptr, out_ptr, RADIUS, NB, BLOCK_NB: tl.constexpr):
    p = tl.program_id(0)
    b = tl.arange(0, BLOCK_NB)
    ok = b < NB
    d = tl.load(part_d_ptr + p * NB + b, mask=ok, other=float("inf"))
    kk = tl.load(part_k_ptr + p * NB + b, mask=ok, other=2147483647)
    best_d = tl.min(d, axis=0)
    best_k = tl.min(tl.where(d == best_d, kk, 2147483647), axis=0)
    side = 2 * RADIUS + 1
    bx = tl.floor(tl.load(ctr_ptr + 2 * p).to(tl.float32) + 0.5)
    by = tl.floor(tl.load(ctr_ptr + 2 * p + 1).to(tl.float32) + 0.5)
    nx = bx + (best_k % side - RADIUS).to(tl.float32)
    ny = by + (best_k // side - RADIUS).to(tl.float32)
    tl.store(out_ptr + 2 * p, nx.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + 2 * p + 1, ny.to(out_ptr.dtype.element_ty))


def patch_track(feat: Tensor, ref_vectors: Tensor, centers: Tensor, radius: int, metric: str,
                size: tuple[int, int]) -> Tensor:
    """Launcher; same contract as the reference (``feat`` [1, C, H, W] with any strides)."""
    _, c, h, w = feat.shape
    gh, gw = size
    n_p = centers.shape[0]
    ctr = centers.contiguous()
    out = torch.empty_like(ctr)
    if n_p == 0:
        return out
    ref = ref_vectors.to(torch.float32).contiguous()
    k_total = (2 * radius + 1) ** 2
    block_k = min(64, triton.next_power_of_2(k_total))
    block_c = min(64 if block_k >= 64 else 128, triton.next_power_of_2(max(c, 16)))
    nb = triton.cdiv(k_total, block_k)
    part_d = torch.empty(n_p, nb, device=feat.device, dtype=torch.float32)
    part_k = torch.empty(n_p, nb, device=feat.device, dtype=torch.int32)
    _track_scores_kernel[(n_p, nb)](feat, ref, ctr, part_d, part_k, c, h, w, gh, gw, radius, nb,
                                    feat.stride(1), feat.stride(2), feat.stride(3),
                                    L2=(metric == "l2"), BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4)
    _track_pick_kernel[(n_p,)](part_d, part_k, ctr, out, radius, nb,
                               BLOCK_NB=triton.next_power_of_2(nb), num_warps=1)
    return out
