"""Triton masked_blend: re-noise the source and blend it under the mask in one pass over memory.

Spec: :func:`dragrt.kernels.reference.masked_blend`. One read of fg, src, noise and mask (the mask and a
batch-1 source are broadcast through zero strides, never materialised), one write of the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _masked_blend_kernel(fg_ptr, src_ptr, mask_ptr, alpha_ptr, noise_ptr, out_ptr,
                         numel, CHW, HW, src_sn, mask_sn, mask_sc, alpha_scalar,
                         HAS_NOISE: tl.constexpr, ALPHA_PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    n = offs // CHW
    chw = offs - n * CHW
    c = chw // HW
    hw = chw - c * HW
    fg = tl.load(fg_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    src = tl.load(src_ptr + n * src_sn + chw, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + n * mask_sn + c * mask_sc + hw, mask=ok, other=0.0).to(tl.float32)
    if HAS_NOISE:
        if ALPHA_PER_SAMPLE:
            a = tl.load(alpha_ptr + n, mask=ok, other=1.0)
        else:
            a = alpha_scalar
        noise = tl.load(noise_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        bg = tl.sqrt(a) * src + tl.sqrt(1.0 - a) * noise
    else:
        bg = src
    out = fg * m + bg * (1.0 - m)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def masked_blend(fg: Tensor, src: Tensor, mask: Tensor, alpha_t: float | Tensor | None = None,
                 noise: Tensor | None = None) -> Tensor:
    """Launcher; same contract as the reference. Non-contiguous inputs are made contiguous first."""
    n, c, h, w = fg.shape
    fg_c, src_c, mask_c = fg.contiguous(), src.contiguous(), mask.contiguous()
    out = torch.empty_like(fg_c)
    numel = fg_c.numel()
    if numel == 0:
        return out
    has_noise = noise is not None
    per_sample = isinstance(alpha_t, Tensor)
    alpha = alpha_t.to(torch.float32).expand(n).contiguous() if per_sample else fg_c  # fg_c: unused pointer
    alpha_scalar = 1.0 if per_sample or alpha_t is None else float(alpha_t)
    noise_c = noise.contiguous() if has_noise else fg_c
    src_sn = 0 if src_c.shape[0] == 1 else c * h * w
    mask_sn = 0 if mask_c.shape[0] == 1 else mask_c.shape[1] * h * w
    mask_sc = 0 if mask_c.shape[1] == 1 else h * w
    block = 1024
    _masked_blend_kernel[(triton.cdiv(numel, block),)](
        fg_c, src_c, mask_c, alpha, noise_c, out, numel, c * h * w, h * w, src_sn, mask_sn, mask_sc, alpha_scalar,
        HAS_NOISE=has_noise, ALPHA_PER_SAMPLE=per_sample, BLOCK=block, num_warps=4)
    return out
