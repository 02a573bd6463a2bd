"""Kernel scenarios: dragrt's ops against the reference methods' own code paths, at the engines' shapes.

Reference paths are the literal forms in :mod:`dragrt.runtime.drag` (the engines' reference mode: dense
upsample, per-handle ``torch.where`` / ``grid_sample`` / crops, ``.item()`` to read a tracked point) and
diffusers' ``add_noise`` then the lerp for blending; they do the published work and no more. Ours are the
static forms through the public ops with the default dispatch (Triton on CUDA), timed eagerly and replayed
from a CUDA graph (how the engines run their step), each reported apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dragrt.bench import harness
from dragrt.bench.scenarios import register
from dragrt.kernels import bilinear_sample, masked_blend
from dragrt.runtime import drag

# --- shapes the engines use (specs: ref_draggan.md §2-4, ref_dragdiffusion.md §2-3) ------------------------
DRAGGAN_512 = {"feat": (1, 256, 128, 128), "image": (512, 512), "r1": 3, "r2": 12}
DRAGDIFF_512 = {"feat": (1, 640, 64, 64), "grid": (256, 256), "r_m": 1, "r_p": 3}


def _handles(n: int, size: tuple[int, int], margin: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = size
    pts = torch.randint(margin, min(h, w) - margin, (n, 2), generator=gen).float()
    tgt = (pts + torch.randint(-40, 41, (n, 2), generator=gen).float()).clamp(margin, min(h, w) - margin)
    return pts.cuda(), tgt.cuda()


def _rc(xy: torch.Tensor) -> list[list[int]]:
    return xy.flip(1).long().tolist()


def draggan_motion_reference(feat, points_rc, targets_rc, r1):
    """Published: upsample to the image, per-point disc + grid_sample, backward into the feature map."""
    feat_resize = F.interpolate(feat, DRAGGAN_512["image"], mode="bilinear")
    loss, _ = drag.draggan_motion_literal(feat_resize, points_rc, targets_rc, r1)
    return torch.autograd.grad(loss, feat)[0]


def draggan_motion_ours(feat, handles, targets, active, r1):
    loss = drag.draggan_motion_loss(feat, handles, targets, active, DRAGGAN_512["image"], r1)
    return torch.autograd.grad(loss, feat)[0]


def dragdiffusion_motion_reference(feat, handles_rc, targets_rc, r_m):
    """Published: upsample to half the image, per-handle patch interpolation, backward into the map."""
    f1 = F.interpolate(feat, DRAGDIFF_512["grid"], mode="bilinear")
    loss = drag.dragdiffusion_motion_loss_literal(f1, handles_rc, targets_rc, r_m)
    return torch.autograd.grad(loss, feat)[0]


def dragdiffusion_motion_ours(feat, handles, targets, active, r_m):
    loss = drag.dragdiffusion_motion_loss(feat, handles, targets, active, DRAGDIFF_512["grid"], r_m)
    return torch.autograd.grad(loss, feat)[0]


def draggan_track_reference(feat, refs, points_rc, r2):
    """Published: upsample (no grad), per-point crop + L2 + argmin read back with .item()."""
    with torch.no_grad():
        feat_resize = F.interpolate(feat, DRAGGAN_512["image"], mode="bilinear")
    return drag.draggan_track_literal(feat_resize, list(refs), [list(p) for p in points_rc], r2)


# --- blending ----------------------------------------------------------------------------------------------

def _alphas_cumprod() -> torch.Tensor:
    # SD's scaled_linear schedule (beta 0.00085 .. 0.012, 1000 steps), as in DDIMScheduler.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, 0)


def _add_noise_fn():
    """diffusers' DDIMScheduler.add_noise when diffusers is installed (the reference's own code), else
    the same arithmetic written out (alphas moved to the device and indexed by t every call, as it does)."""
    try:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return sched.add_noise
    except ImportError:
        alphas = _alphas_cumprod()

        def add_noise(original, noise, timesteps):
            a = alphas.to(device=original.device, dtype=original.dtype)[timesteps]
            return a.sqrt().flatten()[:, None, None, None] * original + (1 - a).sqrt().flatten()[
                :, None, None, None] * noise

        return add_noise


# --- scenarios -------------------------------------------------------------------------------------------------

def _bench_pair(name: str, config: dict, ours_fn, ref_fn, budget_ms: float, check=None,
                extra: dict | None = None) -> dict[str, Any]:
    compile_s = harness.measure_compile(ours_fn)
    out_ours, out_ref = ours_fn(), ref_fn()
    if check is not None:
        extra = {**(extra or {}), **check(out_ours, out_ref)}
    ours_eager = harness.time_cuda(ours_fn, budget_ms=budget_ms)
    ours_graph = harness.time_cuda(ours_fn, budget_ms=budget_ms, graph=True)
    reference = harness.time_cuda(ref_fn, budget_ms=budget_ms)
    best = ours_graph if ours_graph.p50_ms < ours_eager.p50_ms else ours_eager
    stages = {"ours": {"eager": ours_eager, "cuda_graph": ours_graph}}
    extra = {**(extra or {}), "ours_mode": "cuda_graph" if best is ours_graph else "eager",
             "speedup_eager": round(reference.p50_ms / ours_eager.p50_ms, 3)}
    return harness.make_record(name, config, best, reference, stages=stages, compile_s=compile_s, extra=extra)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.double(), b.double()
    return {"max_rel_err_vs_reference": float((a - b).norm() / b.norm().clamp_min(1e-30))}


@register("kernels", needs_cuda=True, description="bilinear_sample / patch_track / masked_blend vs the reference paths")
def kernels(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    records: list[dict[str, Any]] = []
    counts = (1, 10) if quick else (1, 5, 10)

    # 1. DragGAN 512 motion supervision, forward + backward into the b128 feature map.
    for dtype in (torch.float32,) if quick else (torch.float32, torch.float16):
        feat = torch.randn(DRAGGAN_512["feat"], device="cuda", dtype=dtype, requires_grad=True)
        for n in counts:
            hs, ts = _handles(n, DRAGGAN_512["image"], 20, gen)
            active = torch.ones(n, dtype=torch.bool, device="cuda")
            records.append(_bench_pair(
                f"kernels.motion_draggan512.h{n}.{str(dtype)[6:]}",
                {"feat": list(DRAGGAN_512["feat"]), "image": list(DRAGGAN_512["image"]), "handles": n,
                 "r1": DRAGGAN_512["r1"], "dtype": str(dtype)[6:], "work": "motion loss fwd+bwd to feat"},
                lambda: draggan_motion_ours(feat, hs, ts, active, DRAGGAN_512["r1"]),
                lambda: draggan_motion_reference(feat, _rc(hs), _rc(ts), DRAGGAN_512["r1"]),
                budget_ms, check=_rel_err))

    # 2. DragDiffusion 512 motion supervision (up_blocks[2] map, half-resolution grid, 3x3 patches).
    feat = torch.randn(DRAGDIFF_512["feat"], device="cuda", requires_grad=True)
    for n in (1, 5):
        hs, ts = _handles(n, DRAGDIFF_512["grid"], 8, gen)
        active = torch.ones(n, dtype=torch.bool, device="cuda")
        records.append(_bench_pair(
            f"kernels.motion_dragdiffusion512.h{n}.float32",
            {"feat": list(DRAGDIFF_512["feat"]), "grid": list(DRAGDIFF_512["grid"]), "handles": n,
             "r_m": DRAGDIFF_512["r_m"], "dtype": "float32", "work": "motion loss fwd+bwd to feat"},
            lambda: dragdiffusion_motion_ours(feat, hs, ts, active, DRAGDIFF_512["r_m"]),
            lambda: dragdiffusion_motion_reference(feat, list(hs.flip(1)), list(ts.flip(1)), DRAGDIFF_512["r_m"]),
            budget_ms, check=_rel_err))

    # 3. DragGAN 512 point tracking (25x25 window on the 512 grid, L2), 10 handles.
    feat = torch.randn(DRAGGAN_512["feat"], device="cuda")
    for n in counts:
        hs, _ = _handles(n, DRAGGAN_512["image"], 20, gen)
        refs = bilinear_sample(feat, hs + 3.0, DRAGGAN_512["image"])[0].float().contiguous()
        hs_rc = _rc(hs)

        def check(o, r):
            same = o.long().flip(1).tolist() == r
            return {"same_points_as_reference": same}

        records.append(_bench_pair(
            f"kernels.track_draggan512.h{n}",
            {"feat": list(DRAGGAN_512["feat"]), "image": list(DRAGGAN_512["image"]), "handles": n,
             "r2": DRAGGAN_512["r2"], "metric": "l2"},
            lambda: drag.draggan_track(feat, refs, hs, DRAGGAN_512["image"], DRAGGAN_512["r2"]),
            lambda: draggan_track_reference(feat, refs, hs_rc, DRAGGAN_512["r2"]),
            budget_ms, check=check))

    # 4. Blended latent diffusion's re-noise + blend, against add_noise + lerp, and the copy bandwidth.
    for shape in ((4, 4, 64, 64), (4, 4, 128, 128)):
        for dtype in (torch.float16, torch.float32):
            fg, src, noise = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
            mask = (torch.rand((1, 1, *shape[2:]), device="cuda") > 0.5).to(dtype)
            timestep = torch.tensor([740], device="cuda")  # BLD's first blended step at 50 DDIM steps
            alpha = float(_alphas_cumprod()[740])

            add_noise = _add_noise_fn()

            def ref_blend():
                # Blended Latent Diffusion (SD2 script): scheduler.add_noise, then the masked lerp.
                noised = add_noise(src, noise, timestep)
                return fg * mask + noised * (1 - mask)

            moved = (4 * fg.numel() + mask.numel()) * fg.element_size()  # fg, src, noise, out + mask
            rec = _bench_pair(
                f"kernels.blend.{'x'.join(map(str, shape))}.{str(dtype)[6:]}",
                {"shape": list(shape), "mask": [1, 1, *shape[2:]], "dtype": str(dtype)[6:], "bytes": moved},
                lambda: masked_blend(fg, src, mask, alpha, noise), ref_blend, budget_ms, check=_rel_err)
            ours_ms = rec["ours"]["p50_ms"]
            copy_src = torch.randint(0, 255, (moved // 2,), dtype=torch.uint8, device="cuda")
            copy_dst = torch.empty_like(copy_src)
            same_size = harness.time_cuda(lambda: copy_dst.copy_(copy_src), budget_ms=budget_ms, graph=True)
            rec["extra"].update({
                "achieved_gbs": round(harness.gbs(moved, ours_ms), 1),
                "copy_same_bytes_gbs": round(harness.gbs(moved, same_size.p50_ms), 1),
                "fraction_of_copy_same_bytes": round(same_size.p50_ms / ours_ms, 3),
                "copy_peak_gbs": round(harness.copy_bandwidth_gbs(256 * 2**20, budget_ms), 1),
            })
            records.append(rec)
    return records

