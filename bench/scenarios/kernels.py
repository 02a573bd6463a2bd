"""Kernel scenarios: dragrt's ops against the reference methods' own code paths, at the engines' shapes.

Reference paths are written the way the published code does the work (dense upsample, per-handle
``torch.where`` / ``grid_sample`` / crops, ``.item()`` to read a tracked point; add_noise then lerp),
and no more. Ours run through the public ops with the default dispatch (Triton on CUDA), timed eagerly
and replayed from a CUDA graph (how the engines run their step), each reported apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dragrt.bench import harness
from dragrt.bench.scenarios import register
from dragrt.kernels import bilinear_sample, masked_blend, patch_track

# --- shapes the engines use (specs: ref_draggan.md §2-4, ref_dragdiffusion.md §2-3) ------------------------
DRAGGAN_512 = {"feat": (1, 256, 128, 128), "image": (512, 512), "r1": 3, "r2": 12}
DRAGDIFF_512 = {"feat": (1, 640, 64, 64), "grid": (256, 256), "r_m": 1, "r_p": 3}


def _handles(n: int, size: tuple[int, int], margin: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = size
    pts = torch.randint(margin, min(h, w) - margin, (n, 2), generator=gen).float()
    tgt = (pts + torch.randint(-40, 41, (n, 2), generator=gen).float()).clamp(margin, min(h, w) - margin)
    return pts.cuda(), tgt.cuda()


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    keep = dx**2 + dy**2 < radius**2
    return torch.stack([dx[keep], dy[keep]], -1).cuda()


# --- motion supervision: DragGAN ---------------------------------------------------------------------------

def draggan_motion_reference(feat: torch.Tensor, handles_yx: list[list[int]], targets_yx: list[list[int]],
                             r1: int) -> torch.Tensor:
    """DragGAN renderer.py's motion loss and its backward into ``feat`` (its step, minus the generator)."""
    h, w = DRAGGAN_512["image"]
    feat_resize = F.interpolate(feat, [h, w], mode="bilinear")
    xx, yy = torch.meshgrid(torch.linspace(0, h, h, device=feat.device), torch.linspace(0, w, w, device=feat.device),
                            indexing="ij")
    loss = 0.0
    for point, target in zip(handles_yx, targets_yx):
        direction = torch.tensor([target[1] - point[1], target[0] - point[0]], dtype=torch.float32)
        if torch.linalg.norm(direction) > 1:
            distance = ((xx - point[0]) ** 2 + (yy - point[1]) ** 2) ** 0.5
            relis, reljs = torch.where(distance < round(r1 / 512 * h))
            direction = direction / (torch.linalg.norm(direction) + 1e-7)
            gridh = (relis + direction[1]) / (h - 1) * 2 - 1
            gridw = (reljs + direction[0]) / (w - 1) * 2 - 1
            grid = torch.stack([gridw, gridh], dim=-1).unsqueeze(0).unsqueeze(0)
            target_f = F.grid_sample(feat_resize.float(), grid, align_corners=True).squeeze(2)
            loss = loss + F.l1_loss(feat_resize[:, :, relis, reljs].detach(), target_f)
    (grad,) = torch.autograd.grad(loss, feat)
    return grad


def draggan_motion_ours(feat: torch.Tensor, handles_xy: torch.Tensor, targets_xy: torch.Tensor,
                        disk: torch.Tensor) -> torch.Tensor:
    """The same loss through bilinear_sample: all handles' disc points in one gather, sparse backward."""
    size = DRAGGAN_512["image"]
    diff = targets_xy - handles_xy
    dist = diff.norm(dim=1, keepdim=True)
    d = diff / (dist + 1e-7)
    q = handles_xy[:, None, :] + disk[None]  # [P, D, 2]
    f_q = bilinear_sample(feat, q.reshape(-1, 2), size).detach()
    f_qd = bilinear_sample(feat, (q + d[:, None, :]).reshape(-1, 2), size)
    per_handle = (f_q - f_qd).abs().reshape(len(handles_xy), -1).mean(1)
    loss = (per_handle * (dist[:, 0] > 1)).sum()
    (grad,) = torch.autograd.grad(loss, feat)
    return grad


# --- motion supervision: DragDiffusion ---------------------------------------------------------------------

def _interpolate_feature_patch(feat, y1, y2, x1, x2):
    x1f, x2f, y1f, y2f = (torch.floor(v).long() for v in (x1, x2, y1, y2))
    x1c, x2c, y1c, y2c = x1f + 1, x2f + 1, y1f + 1, y2f + 1
    wa = (x1c.float() - x1) * (y1c.float() - y1)
    wb = (x1c.float() - x1) * (y1 - y1f.float())
    wc = (x1 - x1f.float()) * (y1c.float() - y1)
    wd = (x1 - x1f.float()) * (y1 - y1f.float())
    ia = feat[:, :, y1f:y2f, x1f:x2f]
    ib = feat[:, :, y1c:y2c, x1f:x2f]
    ic = feat[:, :, y1f:y2f, x1c:x2c]
    id_ = feat[:, :, y1c:y2c, x1c:x2c]
    return ia * wa + ib * wb + ic * wc + id_ * wd


def dragdiffusion_motion_reference(feat: torch.Tensor, handles_rc: torch.Tensor, targets_rc: torch.Tensor,
                                   r_m: int) -> torch.Tensor:
    """DragDiffusion drag_utils.py's motion loss (upsample to half resolution, hand-written patch
    interpolation with its tensor-valued slice bounds) and its backward into ``feat``."""
    f1 = F.interpolate(feat, DRAGDIFF_512["grid"], mode="bilinear")
    _, _, max_r, max_c = f1.shape
    loss = 0.0
    for pi, ti in zip(handles_rc, targets_rc):
        if (ti - pi).norm() < 2.0:
            continue
        di = (ti - pi) / (ti - pi).norm()
        r1, r2 = max(0, int(pi[0]) - r_m), min(max_r, int(pi[0]) + r_m + 1)
        c1, c2 = max(0, int(pi[1]) - r_m), min(max_c, int(pi[1]) + r_m + 1)
        f0_patch = f1[:, :, r1:r2, c1:c2].detach()
        f1_patch = _interpolate_feature_patch(f1, r1 + di[0], r2 + di[0], c1 + di[1], c2 + di[1])
        loss = loss + ((2 * r_m + 1) ** 2) * F.l1_loss(f0_patch, f1_patch)
    (grad,) = torch.autograd.grad(loss, feat)
    return grad


def dragdiffusion_motion_ours(feat: torch.Tensor, handles_xy: torch.Tensor, targets_xy: torch.Tensor,
                              patch: torch.Tensor) -> torch.Tensor:
    size = DRAGDIFF_512["grid"]
    diff = targets_xy - handles_xy
    dist = diff.norm(dim=1, keepdim=True)
    d = diff / (dist + 1e-7)
    q = torch.floor(handles_xy)[:, None, :] + patch[None]
    f_q = bilinear_sample(feat, q.reshape(-1, 2), size).detach()
    f_qd = bilinear_sample(feat, (q + d[:, None, :]).reshape(-1, 2), size)
    per_handle = (f_q - f_qd).abs().reshape(len(handles_xy), -1).mean(1) * patch.shape[0]
    loss = (per_handle * (dist[:, 0] >= 2)).sum()
    (grad,) = torch.autograd.grad(loss, feat)
    return grad


# --- tracking ------------------------------------------------------------------------------------------------

def draggan_track_reference(feat: torch.Tensor, refs: torch.Tensor, handles_yx: list[list[int]],
                            r2: int) -> list[list[int]]:
    """DragGAN renderer.py's point tracking on the upsampled map, with its .item() per handle."""
    h, w = DRAGGAN_512["image"]
    with torch.no_grad():
        feat_resize = F.interpolate(feat, [h, w], mode="bilinear")
        r = round(r2 / 512 * h)
        out = []
        for j, point in enumerate(handles_yx):
            up, down = max(point[0] - r, 0), min(point[0] + r + 1, h)
            left, right = max(point[1] - r, 0), min(point[1] + r + 1, w)
            feat_patch = feat_resize[:, :, up:down, left:right]
            dist = torch.linalg.norm(feat_patch - refs[j].reshape(1, -1, 1, 1), dim=1)
            _, idx = torch.min(dist.view(1, -1), -1)
            width = right - left
            out.append([idx.item() // width + up, idx.item() % width + left])
    return out


# --- blending ----------------------------------------------------------------------------------------------

def _ALPHAS_CUMPROD() -> torch.Tensor:  # noqa: N802 (a constant, computed once)
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
        alphas = _ALPHAS_CUMPROD()

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
        disk = _disk(DRAGGAN_512["r1"])
        for n in counts:
            hs, ts = _handles(n, DRAGGAN_512["image"], 20, gen)
            hs_yx = hs.flip(1).long().tolist()
            ts_yx = ts.flip(1).long().tolist()
            records.append(_bench_pair(
                f"kernels.motion_draggan512.h{n}.{str(dtype)[6:]}",
                {"feat": list(DRAGGAN_512["feat"]), "image": list(DRAGGAN_512["image"]), "handles": n,
                 "r1": DRAGGAN_512["r1"], "dtype": str(dtype)[6:], "work": "motion loss fwd+bwd to feat"},
                lambda: draggan_motion_ours(feat, hs, ts, disk),
                lambda: draggan_motion_reference(feat, hs_yx, ts_yx, DRAGGAN_512["r1"]),
                budget_ms, check=_rel_err))

    # 2. DragDiffusion 512 motion supervision (up_blocks[2] map, half-resolution grid, 3x3 patches).
    feat = torch.randn(DRAGDIFF_512["feat"], device="cuda", requires_grad=True)
    patch = torch.stack(torch.meshgrid(torch.arange(-1.0, 2.0), torch.arange(-1.0, 2.0), indexing="xy"), -1)
    patch = patch.reshape(-1, 2).cuda()
    for n in (1, 5):
        hs, ts = _handles(n, DRAGDIFF_512["grid"], 8, gen)
        records.append(_bench_pair(
            f"kernels.motion_dragdiffusion512.h{n}.float32",
            {"feat": list(DRAGDIFF_512["feat"]), "grid": list(DRAGDIFF_512["grid"]), "handles": n,
             "r_m": DRAGDIFF_512["r_m"], "dtype": "float32", "work": "motion loss fwd+bwd to feat"},
            lambda: dragdiffusion_motion_ours(feat, hs, ts, patch),
            lambda: dragdiffusion_motion_reference(feat, hs.flip(1), ts.flip(1), DRAGDIFF_512["r_m"]),
            budget_ms, check=_rel_err))

    # 3. DragGAN 512 point tracking (25x25 window on the 512 grid, L2), 10 handles.
    feat = torch.randn(DRAGGAN_512["feat"], device="cuda")
    for n in counts:
        hs, _ = _handles(n, DRAGGAN_512["image"], 20, gen)
        refs = bilinear_sample(feat, hs + 3.0, DRAGGAN_512["image"])[0].float().contiguous()
        hs_yx = hs.flip(1).long().tolist()

        def check(o, r):
            same = o.long().flip(1).tolist() == r
            return {"same_points_as_reference": same}

        records.append(_bench_pair(
            f"kernels.track_draggan512.h{n}",
            {"feat": list(DRAGGAN_512["feat"]), "image": list(DRAGGAN_512["image"]), "handles": n,
             "r2": DRAGGAN_512["r2"], "metric": "l2"},
            lambda: patch_track(feat, refs, hs, DRAGGAN_512["r2"], "l2", DRAGGAN_512["image"]),
            lambda: draggan_track_reference(feat, refs, hs_yx, DRAGGAN_512["r2"]),
            budget_ms, check=check))

    # 4. Blended latent diffusion's re-noise + blend, against add_noise + lerp, and the copy bandwidth.
    for shape in ((4, 4, 64, 64), (4, 4, 128, 128)):
        for dtype in (torch.float16, torch.float32):
            fg, src, noise = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
            mask = (torch.rand((1, 1, *shape[2:]), device="cuda") > 0.5).to(dtype)
            timestep = torch.tensor([740], device="cuda")  # BLD's first blended step at 50 DDIM steps
            alpha = float(_ALPHAS_CUMPROD()[740])

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

