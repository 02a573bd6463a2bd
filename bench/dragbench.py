"""DragBench folders (DragDiffusion's benchmark), read safely, and its point-accuracy metric.

Layout (the released ``DragBench.zip``): ``ROOT/<category>/<sample>/original_image.png`` and
``meta_data.pkl``, a pickle of ``{"prompt": str, "points": [[x, y], ...], "mask": uint8 [H, W]}`` where the
points alternate handle, target and the mask is > 0 where the image may change. The pickle is read with the
converter's allow-list unpickler (containers and numpy arrays only): a DragBench file can never run code.

MD (mean distance) as the DragDiffusion evaluation computes it: for each handle, the source feature vector
at the handle pixel is compared by cosine similarity with every pixel of the dragged image's feature map
(both upsampled to the source size); the argmax is where the content went, and MD is the mean Euclidean
distance of those positions to the targets, in pixels. The reference uses DIFT features of SD2.1 (not
available here); :func:`mean_distance` takes any feature maps, so the same protocol runs with whatever
extractor is at hand, and says which in the result.

Running the benchmark (:func:`run_dragbench`, ``dragrt eval dragbench``): every sample is dragged by
:class:`~dragrt.runtime.engines.dragdiffusion.DragDiffusionEngine` on the user's own SD1.x pipeline, the result is
written as ``OUT/<category>/<sample>/dragged_image.png`` (the reference runner's layout) and scored with MD on
:func:`dift_features` of the same pipeline, plus PSNR and SSIM at 224 x 224 as the image-fidelity stand-in (the
reference's IF is 1 - LPIPS(alex) at 224 x 224; LPIPS weights are not available here, so IF is not reported).
"""

from __future__ import annotations

import math
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dragrt.runtime.models.stylegan2_convert import UnsafeCheckpointError, restricted_load

IMAGE_FILE = "original_image.png"
META_FILE = "meta_data.pkl"


@dataclass
class DragBenchSample:
    """One DragBench sample. Points are ``[x, y]`` pixels of ``image``; ``mask`` is ``[H, W]`` uint8 with
    1 = may change (the file's > 0)."""

    category: str
    name: str
    folder: Path
    image: Image.Image
    prompt: str
    handle_points: list[list[float]]
    target_points: list[list[float]]
    mask: np.ndarray


def read_sample(folder: str | Path, category: str = "") -> DragBenchSample:
    """Read one sample folder; ``ValueError`` names the file and what is wrong with it."""
    folder = Path(folder)
    image_path, meta_path = folder / IMAGE_FILE, folder / META_FILE
    for p in (image_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"DragBench sample {folder}: missing {p.name}")
    try:
        with open(meta_path, "rb") as f:
            meta = restricted_load(f, str(meta_path))
    except UnsafeCheckpointError as exc:
        raise ValueError(f"{meta_path}: refused: {exc}") from None
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{meta_path}: not a readable pickle ({exc})") from None
    if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
        raise ValueError(f"{meta_path}: expected a dict with prompt, points and mask")
    image = Image.open(image_path).convert("RGB")
    points = np.asarray(meta["points"], dtype=np.float64).reshape(-1, 2)
    if len(points) == 0 or len(points) % 2:
        raise ValueError(f"{meta_path}: points must alternate handle, target (an even count > 0), got {len(points)}")
    if not np.isfinite(points).all():
        raise ValueError(f"{meta_path}: points contain NaN or infinite values")
    mask = np.asarray(meta["mask"])
    if mask.shape != (image.height, image.width):
        raise ValueError(f"{meta_path}: mask is {list(mask.shape)} but the image is {image.height}x{image.width}")
    return DragBenchSample(category=category, name=folder.name, folder=folder, image=image,
                           prompt=str(meta["prompt"]), handle_points=points[0::2].tolist(),
                           target_points=points[1::2].tolist(), mask=(mask > 0).astype(np.uint8))


def read_dragbench(root: str | Path) -> list[DragBenchSample]:
    """Every sample under ``root`` (category folders of sample folders, or sample folders directly),
    sorted by category and name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DragBench root {root} is not a folder")
    samples = []
    for meta in sorted(root.rglob(META_FILE)):
        folder = meta.parent
        category = folder.parent.name if folder.parent != root else ""
        samples.append(read_sample(folder, category))
    if not samples:
        raise ValueError(f"{root}: no DragBench samples (folders with {IMAGE_FILE} and {META_FILE})")
    return samples


def write_sample(folder: str | Path, image: Image.Image, prompt: str, handle_points, target_points,
                 mask: np.ndarray) -> Path:
    """Write a sample in DragBench's layout (for tests and for users building their own sets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(folder / IMAGE_FILE)
    flat = [list(map(int, p)) for pair in zip(handle_points, target_points) for p in pair]
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({"prompt": prompt, "points": flat, "mask": np.asarray(mask, dtype=np.uint8)}, f, protocol=4)
    return folder


def mean_distance(source_features: torch.Tensor, dragged_features: torch.Tensor, handle_points, target_points,
                  image_size: tuple[int, int]) -> list[float]:
    """DragBench's point-accuracy distances: per handle, where the source feature at the handle went.

    Args:
        source_features, dragged_features: ``[1, C, h, w]`` feature maps of the source and the dragged image
            (any extractor; the reference uses DIFT), upsampled here bilinearly to ``image_size``.
        handle_points, target_points: ``[[x, y], ...]`` source-image pixels.
        image_size: ``(H, W)`` of the source image.

    Returns:
        The Euclidean distance in pixels from each handle's best match in the dragged image to its target.
    """
    src = F.interpolate(source_features.float(), image_size, mode="bilinear")
    dst = F.normalize(F.interpolate(dragged_features.float(), image_size, mode="bilinear")[0], dim=0)  # [C, H, W]
    w = image_size[1]
    out = []
    for (hx, hy), (tx, ty) in zip(handle_points, target_points):
        vec = F.normalize(src[0, :, int(round(hy)), int(round(hx))], dim=0)
        sim = torch.einsum("c,chw->hw", vec, dst)
        idx = int(torch.argmax(sim))
        out.append(math.dist((idx % w, idx // w), (tx, ty)))
    return out


# --------------------------------------------------------------------------------------------------------
# DIFT features and the benchmark run

DRAGGED_FILE = "dragged_image.png"
FIDELITY_SIZE = 224  # the reference resizes both images to 224 x 224 (bilinear) before LPIPS
LPIPS_NOTE = ("IF (1 - LPIPS(alex) at 224x224) is not reported: LPIPS weights are not available here; "
              "PSNR and SSIM between source and dragged image at 224x224 (bilinear) stand in for it")


def _to_vae_input(image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL / uint8 ``[H, W, 3]`` / float ``[1, 3, H, W]`` in [0, 1] -> float ``[1, 3, H8, W8]`` in [-1, 1] and the
    original ``(H, W)``; sides that are not multiples of 8 are resized (bilinear) to the nearest multiple of 8."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float()
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[:2] != (1, 3):
            raise ValueError(f"image tensor must be [1, 3, H, W] in [0, 1], got {tuple(image.shape)}")
        x = t.cpu().clamp(0, 1) * 2 - 1
    else:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image must be a PIL image, a uint8 [H, W, 3] array or a float [1, 3, H, W] tensor in "
                             f"[0, 1], got {arr.dtype} array of shape {arr.shape}")
        # As DIFT's preprocessing: (pixels / 255 - 0.5) * 2.
        x = (torch.from_numpy(arr.copy()).float().permute(2, 0, 1)[None] / 255.0 - 0.5) * 2
    H, W = x.shape[-2:]
    h8, w8 = max(8, round(H / 8) * 8), max(8, round(W / 8) * 8)
    if (h8, w8) != (H, W):
        x = F.interpolate(x, (h8, w8), mode="bilinear", align_corners=False)
    return x, (int(H), int(W))


def dift_features(components: Any, image: Any, prompt: str, *, t: int = 261, up_ft_index: int = 1, ensemble: int = 8,
                  seed: int = 42, upsample: bool = True) -> torch.Tensor:
    """DIFT features (Tang et al. 2023) of ``image`` as DragBench's MD evaluation computes them.

    The image (``(pixels / 255 - 0.5) * 2``) is VAE-encoded and its posterior sampled, scaled by
    ``vae.config.scaling_factor``, noised to timestep ``t`` with the scheduler's ``add_noise``, and run through
    the UNet with the prompt's text embeddings once per ensemble member; the output of ``unet.up_blocks[up_ft_index]``
    (the forward stops there: :class:`~dragrt.runtime.models.sd.UNetFeatureTap` with ``stop_after``) is averaged
    over the ensemble and bilinearly upsampled to the image size.

    The reference extractor is SD2.1 (``stabilityai/stable-diffusion-2-1``); here it is the caller's own pipeline
    (``components``, e.g. the SD1.5 being evaluated), so MD values are comparable between runs on the same
    pipeline, not with published numbers. Also unlike the reference, which seeds the global RNG once per
    evaluation root, every call draws its posterior samples and noise from a generator seeded with ``seed``: the
    features of an image are deterministic and the global RNG is untouched.

    Args:
        components: :class:`~dragrt.runtime.models.sd.SDComponents`.
        image: PIL image, uint8 ``[H, W, 3]`` array or float ``[1, 3, H, W]`` tensor in [0, 1]. Sides that are not
            multiples of 8 are resized to the nearest multiple of 8 for the VAE; features still come back at H x W.
        prompt: the sample's prompt.
        t: the noise timestep (261).
        up_ft_index: which up block's output (1).
        ensemble: number of noise draws averaged (8).
        seed: seed of the draws (42).
        upsample: ``False`` returns the block's resolution (what :func:`mean_distance` upsamples anyway).

    Returns:
        float32 ``[1, C, H, W]`` (``[1, C, h, w]`` without ``upsample``) on the UNet's device.
    """
    from dragrt.runtime.inversion import encode_prompt
    from dragrt.runtime.models.sd import UNetFeatureTap

    for name, v, lo in (("t", t, 0), ("up_ft_index", up_ft_index, 0), ("ensemble", ensemble, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}={v!r} is not allowed; use an integer >= {lo}")
    n_train = int(components.scheduler.config.num_train_timesteps)
    if t >= n_train:
        raise ValueError(f"t={t} is not allowed; the scheduler has {n_train} timesteps (0..{n_train - 1})")
    unet, vae = components.unet, components.vae
    up = next(unet.parameters())
    vp = next(vae.parameters())
    x, (H, W) = _to_vae_input(image)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    emb = encode_prompt(components, prompt).to(device=up.device, dtype=up.dtype)
    timestep = torch.tensor([t], dtype=torch.long)
    total = None
    with torch.no_grad():
        dist = vae.encode(x.to(device=vp.device, dtype=vp.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        tap = UNetFeatureTap(unet, [up_ft_index], stop_after=True)
        for _ in range(ensemble):
            latent = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.config.scaling_factor
            noise = torch.randn(latent.shape, generator=gen)
            noisy = components.scheduler.add_noise(latent, noise, timestep)
            tap.run(noisy.to(device=up.device, dtype=up.dtype), timestep.to(up.device), encoder_hidden_states=emb)
            feat = tap.features[up_ft_index].float()
            total = feat if total is None else total + feat
    feats = total / ensemble
    if upsample:
        feats = F.interpolate(feats, (H, W), mode="bilinear", align_corners=False)
    return feats


def _multiple_of_64(n: int) -> int:
    return max(64, int(round(n / 64)) * 64)


def _scale_points(points, src: tuple[int, int], dst: tuple[int, int]) -> list[list[float]]:
    """``[[x, y], ...]`` from an ``src = (H, W)`` image to ``dst``, pixel centres kept, clipped to the image."""
    (h0, w0), (h1, w1) = src, dst
    out = []
    for x, y in points:
        out.append([min(max((x + 0.5) * w1 / w0 - 0.5, 0.0), w1 - 1.0),
                    min(max((y + 0.5) * h1 / h0 - 0.5, 0.0), h1 - 1.0)])
    return out


def _unit_image(image: Any) -> np.ndarray:
    """PIL / uint8 array -> float32 ``[224, 224, 3]`` in [0, 1], resized bilinearly as the reference does."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    t = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    t = F.interpolate(t, (FIDELITY_SIZE, FIDELITY_SIZE), mode="bilinear", align_corners=False)
    return t[0].permute(1, 2, 0).clamp(0, 1).numpy()


def _mean_of(values) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def run_dragbench(root: str | Path | Sequence[DragBenchSample], components: Any, *, mode: str = "fast",
                  out_dir: str | Path | None = None, runtime: Any = None, max_samples: int | None = None,
                  warmup: int = 0, t: int = 261, up_ft_index: int = 1, ensemble: int = 8, seed: int = 42,
                  feature_cache: dict | None = None, progress: bool = True, **config: Any) -> dict[str, Any]:
    """Drag every DragBench sample with DragDiffusion in ``mode`` and score it (MD and PSNR/SSIM at 224).

    Per sample: the image, mask and points are resized to the nearest multiple of 64 per side (the engine's
    requirement; DragBench's 512 px sides are already multiples, so they stay as they are; image bilinear, mask
    nearest, points with pixel centres kept), :meth:`DragDiffusionEngine.edit` runs with the sample's prompt, the
    result is resized back to the original size (antialiased bilinear) and saved as uint8
    ``out_dir/<category>/<sample>/dragged_image.png``. MD compares :func:`dift_features` of the source and of
    the saved dragged image (both with the sample's prompt) with :func:`mean_distance` at the original size;
    PSNR and SSIM (:mod:`dragrt.bench.quality`) compare both images resized to 224 x 224. The reference's
    runner trains a LoRA per image first: pass ``lora=True`` for that (off by default, as in the engine).

    Args:
        root: a DragBench folder (:func:`read_dragbench`) or already-read samples.
        components: the SD1.x pipeline (:class:`~dragrt.runtime.models.sd.SDComponents`), also the MD extractor.
        mode: the engine's mode, ``"fast"`` or ``"reference"``.
        out_dir: where dragged images go; ``None`` = not written (MD is computed from the uint8 image anyway).
        runtime: a ``RuntimeConfig`` for the engine.
        max_samples: only the first N samples (sorted by category and name).
        warmup: untimed edits of the first samples before the timed pass (compilation, graph capture).
        t, up_ft_index, ensemble, seed: :func:`dift_features` settings (the reference's by default).
        feature_cache: a dict keeping the source images' features between calls (pass the same dict to both
            modes' runs; keyed by category, name and the extractor settings).
        progress: print one line per sample to stderr.
        **config: :class:`DragDiffusionConfig` fields (``max_steps``, ``num_inference_steps``, ``lora``, ...).

    Returns:
        ``{"mode", "n_samples", "n_pairs", "rows", "means", "extractor", "fidelity_note", "warmup_s", "config"}``:
        ``rows`` one dict per sample (``category``, ``name``, ``size``, ``edit_size``, ``distances_px``,
        ``md_px``, ``psnr_224``, ``ssim_224``, ``edit_s`` (engine total), ``wall_s``, ``drag_steps``, ``path``);
        ``means`` ``md_px`` (over all point pairs of all samples, as the reference), ``psnr_224``, ``ssim_224``,
        ``edit_s`` and ``wall_s`` (per edit).
    """
    from dragrt.bench import harness, quality
    from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine

    samples = list(root) if isinstance(root, (list, tuple)) else read_dragbench(root)
    if max_samples is not None:
        if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
            raise ValueError(f"max_samples={max_samples!r} is not allowed; use an integer >= 1")
        samples = samples[:max_samples]
    if not samples:
        raise ValueError("no DragBench samples to run")
    if not isinstance(warmup, int) or not 0 <= warmup <= len(samples):
        raise ValueError(f"warmup={warmup!r} is not allowed; use 0 to the number of samples ({len(samples)})")
    dd_config = DragDiffusionConfig(mode=mode, **config)
    out = Path(out_dir) if out_dir is not None else None
    dift = {"t": t, "up_ft_index": up_ft_index, "ensemble": ensemble, "seed": seed}
    cache = feature_cache if feature_cache is not None else {}
    engine = DragDiffusionEngine(components, dd_config, runtime)

    def edit(s: DragBenchSample) -> tuple[Any, tuple[int, int]]:
        H, W = s.image.height, s.image.width
        h, w = _multiple_of_64(H), _multiple_of_64(W)
        image, mask = s.image, s.mask
        handles, targets = s.handle_points, s.target_points
        if (h, w) != (H, W):
            image = s.image.resize((w, h), Image.BILINEAR)
            mask = np.asarray(Image.fromarray(s.mask * 255).resize((w, h), Image.NEAREST)) > 0
            handles, targets = _scale_points(handles, (H, W), (h, w)), _scale_points(targets, (H, W), (h, w))
        return engine.edit(image, s.prompt, handles, targets, np.asarray(mask, dtype=np.uint8)), (h, w)

    warm = []
    try:
        for s in samples[:warmup]:
            warm.append(harness.timed_call(lambda s=s: edit(s))[1])
        rows = []
        for i, s in enumerate(samples):
            (result, edit_size), wall = harness.timed_call(lambda s=s: edit(s))
            H, W = s.image.height, s.image.width
            img = result.image.detach().float().clamp(0, 1)
            if tuple(img.shape[-2:]) != (H, W):
                img = F.interpolate(img, (H, W), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
            u8 = (img[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
            dragged = Image.fromarray(u8)
            path = None
            if out is not None:
                folder = out / s.category / s.name if s.category else out / s.name
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / DRAGGED_FILE
                dragged.save(path)
            key = (s.category, s.name, str(s.folder), tuple(sorted(dift.items())))
            if key not in cache:
                cache[key] = dift_features(components, s.image, s.prompt, upsample=False, **dift).cpu()
            src_feat = cache[key]
            dst_feat = dift_features(components, dragged, s.prompt, upsample=False, **dift).cpu()
            dists = mean_distance(src_feat, dst_feat, s.handle_points, s.target_points, (H, W))
            src_224, dst_224 = _unit_image(s.image), _unit_image(dragged)
            row = {"category": s.category, "name": s.name, "size": [H, W], "edit_size": list(edit_size),
                   "n_pairs": len(dists), "distances_px": dists, "md_px": float(np.mean(dists)),
                   "psnr_224": quality.psnr(src_224, dst_224), "ssim_224": quality.ssim(src_224, dst_224),
                   "edit_s": float(result.timings["total"]), "wall_s": wall, "drag_steps": int(result.steps),
                   "path": str(path) if path is not None else None}
            rows.append(row)
            if progress:
                print(f"[dragbench {mode}] {i + 1}/{len(samples)} {s.category}/{s.name}: MD {row['md_px']:.2f} px, "
                      f"PSNR {row['psnr_224']:.2f} dB, SSIM {row['ssim_224']:.3f}, {row['edit_s']:.2f} s",
                      file=sys.stderr)
    finally:
        engine.close()
    all_d = [d for r in rows for d in r["distances_px"]]
    means = {"md_px": _mean_of(all_d), "psnr_224": _mean_of(r["psnr_224"] for r in rows),
             "ssim_224": _mean_of(r["ssim_224"] for r in rows), "edit_s": _mean_of(r["edit_s"] for r in rows),
             "wall_s": _mean_of(r["wall_s"] for r in rows)}
    extractor = {"name": "dift", "model": str(getattr(components, "source", "?")), **dift,
                 "note": "the reference uses SD2.1 DIFT; here the evaluated pipeline's own UNet"}
    return {"mode": mode, "n_samples": len(rows), "n_pairs": len(all_d), "rows": rows, "means": means,
            "extractor": extractor, "fidelity_note": LPIPS_NOTE, "warmup_s": warm,
            "config": {k: v for k, v in vars(dd_config).items() if k != "lora_config"}}
