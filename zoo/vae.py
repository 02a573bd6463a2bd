"""zoo:faces-vae: an SD-style ``AutoencoderKL`` (8x downsampling, 4 latent channels) trained on the faces renders.

The architecture is Stable Diffusion's autoencoder at toy width: four ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` levels (three 2x downsamplings: 256 px -> 32x32x4 latents), a mid block with one
self-attention, GroupNorm + SiLU, a diagonal-Gaussian posterior. Only the widths differ from SD's
(:data:`MODEL_CONFIG`: 32/64/64/64 channels, one ResNet per level; about 1.25 M parameters, 2.5 MB in fp16).

Training (``python -m dragrt.zoo.train faces-vae --run-dir DIR --minutes 8 --export``): renders streamed
from seeds (:func:`dragrt.zoo.data.make_loader`), loss = L1 + a gradient (edge) L1 + SD's KL weight, AdamW,
bf16 autocast on CUDA, an EMA of the weights (what is evaluated and shipped). The learning-rate schedule
(warmup, cosine) is planned once, from the step rate measured early in the first chunk and the chunk's
minutes, and stored in the checkpoint, so resumed chunks continue the same schedule.

Evaluation on held-out renders (seeds ``world.HELD_OUT_OFFSET + i``): PSNR and SSIM of the round trip
(posterior mean, decoded, quantised to uint8) and the latent ``scaling_factor`` = 1 / std of the posterior
means (SD1's is 0.18215), written into the exported config so ``latents * scaling_factor`` has unit std.

:func:`export` writes a diffusers folder (``config.json`` + fp16 ``diffusion_pytorch_model.safetensors``
+ ``MODEL_CARD.md``): ``AutoencoderKL.from_pretrained(folder)`` loads it; :func:`load_vae` also takes
``"zoo:faces-vae"``. The helpers at the bottom (EMA, schedule, step planner, loader stream) are shared
with :mod:`dragrt.zoo.unet`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dragrt.zoo import training

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

NAME = "faces-vae"
#: Shipped size limit of the fp16 weights (bytes).
MAX_BYTES = 3_000_000
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

#: ``AutoencoderKL`` config: SD1's block kinds (4 levels = 8x downsampling, 4 latent channels, mid attention).
MODEL_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 256,
    "scaling_factor": 0.18215,  # replaced by the measured value at export
}

#: ``--smoke``: the same block kinds at width 16, 64 px images.
SMOKE_CONFIG: dict[str, Any] = {
    **MODEL_CONFIG,
    "block_out_channels": [16, 16, 16, 16],
    "norm_num_groups": 8,
    "sample_size": 64,
}


@dataclass(frozen=True)
class VAEHParams:
    """Training settings of faces-vae (stored in the checkpoint; a resumed run keeps the stored ones).

    Attributes:
        image_size: training and evaluation resolution (pixels).
        batch_size: images per step.
        lr: AdamW peak learning rate; ``lr_floor`` is the cosine's end as a fraction of it.
        warmup: linear warmup steps.
        weight_decay: AdamW weight decay.
        kl_weight: KL weight in SD's convention (per-image KL sum over per-pixel loss sum; SD uses 1e-6).
        grad_weight: weight of the L1 loss on horizontal/vertical image differences (sharper edges).
        ema_decay: EMA decay (with the usual ``(1 + n) / (10 + n)`` warmup).
        grad_clip: global gradient-norm clip.
        max_steps: hard cap on the step count (the planned schedule is never longer).
        min_steps: shortest schedule the planner may choose.
        fixed_steps: if > 0, the schedule length, no planning (smoke runs).
        calib_steps: steps timed (after ``calib_skip`` warm-up steps) to plan the schedule.
        calib_skip: steps not timed (cuDNN autotuning, loader start).
        reserve_s: seconds of the chunk kept for evaluation and saving.
        eval_images: held-out renders in the evaluation.
        num_workers: loader processes (-1: all CPUs but two, at most 14).
        mse_weight: weight of a mean-squared-error term (PSNR's own loss; L1 favours the median pixel and lets
            edges blur): e.g. for a decoder fine-tune aimed at PSNR, as Stable Diffusion's ft-MSE decoder was. 0
            in the recipe so far.
        eye_weight: extra weight of the pixel losses (L1, MSE, the edge term) on the eyes
            (``training.REGIONS["eyes"]``: where glasses' frames are drawn), ``1 + w`` there against 1 elsewhere,
            each image's weights normalised to mean 1; 0 (default): uniform. Aimed at the frames, which cost the
            round trips 1.9 dB (``bench/tools/vae_psnr_by_attribute.py``).
        decoder_only: train the decoder (and ``post_quant_conv``) only, the encoder frozen: the latent space
            stays exactly that of the starting weights, so a diffusion model trained on it stays valid
            (Stable Diffusion's ft-MSE autoencoder was made this way); the export keeps the start's
            ``scaling_factor`` (the scale the diffusion model was trained at). Needs ``init``.
        encoder_only: train the encoder (and ``quant_conv``) only, the decoder frozen: what a diffusion model's
            samples are decoded by stays bit for bit (its samples do not change) while the round trips of real
            images -- what inversion-based edits start from -- improve; the export keeps the starting
            ``scaling_factor``, so the diffusion model's latents keep their scale. Needs ``init``. Chosen when the
            decoder reconstructs far better from optimised latents than from the encoder's
            (``bench/tools/vae_decoder_bound.py``; 2026-12-04: 28.9 dB against 26.2 on 4 held-out faces).
        init: the exported folder (or ``zoo:`` name) a new run started from; ``""``: random weights.
        init_history: what ``init`` was when the run started (:func:`dragrt.zoo.training.describe_start`).
    """

    image_size: int = 256
    batch_size: int = 32
    lr: float = 6e-4
    lr_floor: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.0
    kl_weight: float = 1e-6
    grad_weight: float = 0.5
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    max_steps: int = 60_000
    min_steps: int = 500
    fixed_steps: int = 0
    calib_steps: int = 300
    calib_skip: int = 200
    reserve_s: float = 30.0
    eval_images: int = 256
    num_workers: int = -1
    mse_weight: float = 0.0
    eye_weight: float = 0.0
    decoder_only: bool = False
    encoder_only: bool = False
    init: str = ""
    init_history: str = ""


HPARAMS = VAEHParams()
#: A run started from trained weights (``init``): half the peak learning rate, a short warmup.
FINETUNE_CHANGES: dict[str, Any] = {"lr": 3e-4, "warmup": 100}
SMOKE_HPARAMS = VAEHParams(image_size=64, batch_size=4, lr=2e-3, warmup=5, ema_decay=0.9, max_steps=24,
                           min_steps=1, fixed_steps=24, calib_steps=0, calib_skip=0, reserve_s=0.0,
                           eval_images=8, num_workers=0)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def build_vae(config: Mapping[str, Any] | None = None) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` (default :data:`MODEL_CONFIG`)."""
    from diffusers import AutoencoderKL

    cfg = dict(MODEL_CONFIG if config is None else config)
    levels = len(cfg["block_out_channels"])
    if levels != 4:
        raise ValueError(f"block_out_channels must have 4 levels (8x downsampling like SD), got {levels}")
    bad = [c for c in cfg["block_out_channels"] if c % cfg["norm_num_groups"]]
    if bad:
        raise ValueError(f"block_out_channels {bad} are not multiples of norm_num_groups={cfg['norm_num_groups']}")
    return AutoencoderKL.from_config(cfg)


def load_vae(path: str | os.PathLike = "zoo:" + NAME, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """The exported autoencoder (a diffusers folder, or ``"zoo:faces-vae"``), frozen, in eval mode."""
    from diffusers import AutoencoderKL

    folder = training.resolve_zoo_path(path, "load_vae")
    for name in ("config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"load_vae: {folder / name} is missing; expected an exported {NAME} folder")
    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    nn.Module.to(vae, device)
    vae.eval().requires_grad_(False)
    return vae


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, hp: VAEHParams,
             generator: torch.Generator | None = None, *,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one batch ``images`` ``[B, 3, H, W]`` in [-1, 1]; returns ``(loss, parts)`` (parts
    as detached 0-d tensors: reading them synchronises, so the loop reads them only when it logs).

    ``L1(x, x') + grad_weight * L1(dx, dx') + mse_weight * MSE(x, x') + kl_weight * KL / (3 H W)``: the KL is
    summed per image and divided by the pixel count, i.e. SD's weighting of a per-pixel sum against a per-image
    KL sum. ``weights`` (``[B, 1, H, W]``, :func:`dragrt.zoo.training.region_weights`) weight the pixel terms by
    position, each image's normalised to mean 1 (the edge terms take the weights of the pixel each difference
    ends at).
    """
    params = vae.encode(images).latent_dist.parameters.float()
    mean, logvar = params.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = vae.decode(z).sample.float()
    target = images.float()
    if weights is None:
        w = wx = wy = 1.0
    else:
        w = training.normalised_weights(weights.float())
        wx, wy = w[..., :, 1:], w[..., 1:, :]
    l1 = ((recon - target).abs() * w).mean()
    grad = (((recon.diff(dim=-1) - target.diff(dim=-1)).abs() * wx).mean()
            + ((recon.diff(dim=-2) - target.diff(dim=-2)).abs() * wy).mean())
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    pixels = target[0].numel()
    mse = ((recon - target).square() * w).mean()
    loss = l1 + hp.grad_weight * grad + hp.mse_weight * mse + hp.kl_weight * kl / pixels
    return loss, {"l1": l1.detach(), "grad": grad.detach(), "mse": mse.detach(), "kl": kl.detach()}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, 3, H, W]`` (what a saved image holds)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images ``[N, C, H, W]`` (peak 255); capped at 100 dB for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).clamp_max(100.0).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of uint8 images ``[N, C, H, W]``: Gaussian window, per channel, averaged (Wang et al.)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = a.double() / 255.0, b.double() / 255.0
    c = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64, device=x.device) - (window - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def heldout_images(n: int, size: int, start: int = 0) -> torch.Tensor:
    """Held-out renders ``[n, 3, size, size]`` uint8 (seeds ``world.HELD_OUT_OFFSET + start + i``)."""
    from dragrt.zoo import world

    batch = world.render_batch(world.held_out_seeds(n, start), size)
    return torch.from_numpy(np.ascontiguousarray(batch["images"])).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def posterior_means(vae: AutoencoderKL, images_u8: torch.Tensor, *, batch: int = 32) -> torch.Tensor:
    """Posterior means (unscaled latents) ``[N, 4, H/8, W/8]`` float32 on the CPU, of uint8 images."""
    device, dtype = _module_device_dtype(vae)
    out = []
    for i in range(0, len(images_u8), batch):
        x = images_u8[i:i + batch].to(device).to(dtype) / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int) -> torch.Tensor:
    device, dtype = _module_device_dtype(vae)
    return torch.cat([vae.decode(latents[i:i + batch].to(device).to(dtype)).sample.float().clamp(-1, 1).cpu()
                      for i in range(0, len(latents), batch)])


@torch.no_grad()
def round_trips(vae: AutoencoderKL, images_u8: torch.Tensor, *, batch: int = 32) -> torch.Tensor:
    """The decoded posterior means of uint8 images: float32 ``[N, 3, H, W]`` in [-1, 1] on the CPU."""
    return _decode(vae, posterior_means(vae, images_u8, batch=batch), batch)


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """SD's latent scale: 1 / std of all latent values (SD1 measured 0.18215 on its data the same way)."""
    std = latents.float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latent_scaling_factor: latents have std {std}; cannot scale them to unit std")
    return 1.0 / std


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images_u8: torch.Tensor, *, batch: int = 32,
             ceilings: bool = False) -> dict[str, float]:
    """Round-trip quality on ``images_u8`` (posterior mean, decoded, quantised) and the latent statistics;
    with ``ceilings``, :func:`attribute_ceilings` too, on the same round trips (one encode and decode)."""
    device, _ = _module_device_dtype(vae)
    latents = posterior_means(vae, images_u8, batch=batch)
    recons = _decode(vae, latents, batch)
    p, s = [], []
    for i in range(0, len(images_u8), batch):
        recon = to_uint8(recons[i:i + batch].to(device))
        ref = images_u8[i:i + batch].to(device)
        # on the VAE's device: the float64 SSIM convolutions took ~2 minutes on a busy 32-core host
        p.append(psnr(recon, ref).cpu())
        s.append(ssim(recon, ref).cpu())
    psnrs = torch.cat(p)
    return {
        "psnr_db": round(psnrs.mean().item(), 3),
        "psnr_db_min": round(psnrs.min().item(), 3),
        "ssim": round(torch.cat(s).mean().item(), 4),
        "scaling_factor": latent_scaling_factor(latents),
        "latent_mean": round(latents.mean().item(), 4),
        "latent_std": round(latents.std().item(), 4),
        "eval_images": len(images_u8),
        **(attribute_ceilings(vae, images_u8, batch=batch, recon=recons) if ceilings else {}),
    }


@torch.no_grad()
def attribute_ceilings(vae: AutoencoderKL, images_u8: torch.Tensor, *, batch: int = 32,
                       recon: torch.Tensor | None = None) -> dict[str, float]:
    """What round trips keep of the attributes a diffusion model on this VAE is scored on (its ceiling): the
    zoo's attribute reader's categorical accuracy and caption agreement (:func:`dragrt.zoo.unet.caption_agreement`)
    on the round trips of held-out renders ``images_u8`` (seeds ``0..n-1``, as :func:`heldout_images` makes them),
    beside the same on the renders. ``{}`` when the reader (zoo:faces-attribute-details) is not installed.
    ``recon``: the round trips (:func:`round_trips`), when the caller has them already."""
    from dragrt.zoo import evaluators
    from dragrt.zoo import unet as zunet

    if not evaluators.reader_installed():
        return {}
    reader = evaluators.load_attribute_model(device=_module_device_dtype(vae)[0])
    if recon is None:
        recon = round_trips(vae, images_u8, batch=batch)
    renders = images_u8.float() / 127.5 - 1
    _, cats = zunet.heldout_captions(len(images_u8))
    bins = zunet.heldout_caption_bins(len(images_u8))
    out = {}
    for name, images in (("renders", renders), ("round_trips", recon)):
        accuracy, agreement = zunet.score(reader, images, cats, bins)
        out[f"categorical_accuracy_{name}"] = accuracy["mean"]
        out[f"caption_agreement_{name}"] = agreement["mean"]
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(run_dir: str | os.PathLike, *, minutes: float = 8.0, device: str = "cuda", seed: int = 0,
          smoke: bool = False, init: str | os.PathLike | None = None, decoder_only: bool = False,
          encoder_only: bool = False, mse_weight: float | None = None, batch_size: int | None = None,
          lr: float | None = None, compile_mode: str | None = None,
          eye_weight: float | None = None) -> dict[str, Any]:
    """Train (or resume) faces-vae in ``run_dir`` for at most ``minutes`` of wall time; returns the metrics.

    The chunk stops at ``minutes`` minus the evaluation reserve, or when the planned schedule is done,
    then saves ``checkpoint.pt``, evaluates the EMA weights on held-out renders and writes ``metrics.json``.
    ``init`` (an exported folder or ``zoo:faces-vae``) starts a new run from those weights (with
    :data:`FINETUNE_CHANGES`); ``decoder_only`` then freezes the encoder, ``encoder_only`` the decoder,
    ``mse_weight`` sets the new run's MSE term, ``batch_size`` its batch, ``lr`` its peak learning rate and
    ``eye_weight`` its loss weight on the eyes (see :class:`VAEHParams`). A resumed run keeps what its
    checkpoint says; passing any of them for it is an error.
    ``compile_mode`` (:data:`dragrt.zoo.training.COMPILE_MODES`) compiles the encoder's and decoder's forwards
    for this chunk.
    """
    budget = training.Budget(minutes)
    training.check_compile_mode(compile_mode)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    setup_torch(dev)
    state = training.load_checkpoint(run_dir)
    if decoder_only and encoder_only:
        raise ValueError("decoder_only and encoder_only exclude each other: freeze one half or neither")
    if decoder_only and init is None:
        raise ValueError("decoder_only needs init: the frozen encoder must come from trained weights")
    if encoder_only and init is None:
        raise ValueError("encoder_only needs init: the frozen decoder must come from trained weights")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or not 1 <= batch_size <= 1024):
        raise ValueError(f"batch_size={batch_size!r} is not allowed; use an integer in [1, 1024]")
    if mse_weight is not None and not (isinstance(mse_weight, (int, float)) and 0 <= mse_weight < 1e3):
        raise ValueError(f"mse_weight={mse_weight!r} is not allowed; use a number in [0, 1000)")
    if lr is not None and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr <= 1e-2):
        raise ValueError(f"lr={lr!r} is not allowed; use a number in (0, 0.01]")
    if eye_weight is not None and not (isinstance(eye_weight, (int, float)) and not isinstance(eye_weight, bool)
                                       and 0 <= eye_weight <= 100):
        raise ValueError(f"eye_weight={eye_weight!r} is not allowed; use a number in [0, 100]")
    if state is not None:
        if state.get("name") != NAME:
            raise ValueError(f"{run_dir} holds a checkpoint of {state.get('name')!r}, not {NAME!r}")
        given = {"init": init is not None, "decoder_only": decoder_only, "encoder_only": encoder_only,
                 "mse_weight": mse_weight is not None, "batch_size": batch_size is not None, "lr": lr is not None,
                 "eye_weight": eye_weight is not None}
        *first, last = given
        training.refuse_init_on_resume(run_dir, any(given.values()), f"{', '.join(first)} and {last}")
        hp = VAEHParams(**state["hparams"])
        config = dict(state["config"])
        seed = int(state["seed"])
    else:
        hp = SMOKE_HPARAMS if smoke else HPARAMS
        config = dict(SMOKE_CONFIG if smoke else MODEL_CONFIG)
        if init is not None:
            hp = training.start_from(hp, init, {} if smoke else FINETUNE_CHANGES, decoder_only=bool(decoder_only),
                                     encoder_only=bool(encoder_only))
        if mse_weight is not None:
            hp = dataclasses.replace(hp, mse_weight=float(mse_weight))
        if batch_size is not None:
            hp = dataclasses.replace(hp, batch_size=batch_size)
        if lr is not None:
            hp = dataclasses.replace(hp, lr=float(lr))
        if eye_weight is not None:
            hp = dataclasses.replace(hp, eye_weight=float(eye_weight))

    torch.manual_seed(seed)
    if state is None and init is not None:
        vae = load_vae(init).requires_grad_(True)  # the exported model itself (fp32), trained from here
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    else:
        vae = build_vae(config)
    vae.to(dev)
    trainable = trainable_parameters(vae, frozen_half(hp))
    ema = Ema(vae, hp.ema_decay)
    opt = torch.optim.AdamW(trainable, lr=hp.lr, betas=(0.9, 0.99), weight_decay=hp.weight_decay,
                            **optimizer_kernel(dev))
    progress = Progress()
    if state is not None:
        restore_training_state(state, vae, ema, opt)
        progress = Progress(**state["progress"])
    if progress.schedule_steps == 0 and hp.fixed_steps > 0:
        progress.schedule_steps = hp.fixed_steps
    planner = StepPlanner(hp.calib_skip, hp.calib_steps, hp.min_steps, hp.max_steps)

    start_step = progress.step
    stream = batch_stream(hp.batch_size, seed=seed, step=start_step, size=hp.image_size,
                          num_workers=hp.num_workers, device=dev)
    gen = torch.Generator(dev).manual_seed(training.mix_seed(seed, start_step, 1))
    autocast = autocast_for(dev)
    compiled = [vae.encoder, vae.decoder]
    training.compile_forwards(compiled, compile_mode)
    vae.train()
    chunk_start = time.monotonic()
    losses: list[float] = []
    train_end = budget.seconds - hp.reserve_s
    while not progress.done() and budget.elapsed < train_end:
        batch = next(stream)
        for group in opt.param_groups:
            group["lr"] = hp.lr * training.lr_factor(progress.step, hp.warmup, progress.schedule_steps or hp.max_steps,
                                            hp.lr_floor)
        weights = None
        if hp.eye_weight:
            boxes = training.region_boxes(batch["landmarks"].to(dev, non_blocking=True), hp.image_size, "eyes")
            weights = training.region_weights(boxes, hp.image_size, hp.eye_weight)
        with autocast:
            loss, parts = vae_loss(vae, batch["image"], hp, gen, weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, hp.grad_clip, foreach=True)
        opt.step()
        ema.update(vae)
        progress.step += 1
        progress.images += hp.batch_size
        if progress.step % 10 == 0 or smoke:
            losses.append(loss.item())
        if progress.schedule_steps == 0 and planner.wants_time(progress.step - start_step):
            synchronize(dev)
            planned = planner.observe(progress.step - start_step, progress.step, time.monotonic(),
                                      train_end - budget.elapsed)
            if planned:
                progress.schedule_steps = planned
        if progress.step % 500 == 0:
            _log(f"{NAME} step {progress.step}/{progress.schedule_steps or '?'} loss {loss.item():.4f} "
                 f"l1 {parts['l1']:.4f} kl {parts['kl']:.1f} lr {opt.param_groups[0]['lr']:.2e} "
                 f"{budget.elapsed:.0f}s")
    stream.close()  # a chunk too short to plan leaves schedule_steps 0: the next chunk plans
    chunk_seconds = time.monotonic() - chunk_start
    progress.seconds += chunk_seconds
    progress.chunks += 1

    training.save_checkpoint(run_dir, {
        "name": NAME, "config": config, "hparams": asdict(hp), "seed": seed, "progress": asdict(progress),
        **training_state(vae, ema, opt),
    })

    training.uncompile_forwards(compiled)  # the evaluation runs other shapes: eager, no second compile
    eval_vae = ema.copy_to(vae).eval()
    t0 = time.monotonic()
    held_out = heldout_images(hp.eval_images, hp.image_size)
    metrics: dict[str, Any] = evaluate(eval_vae, held_out, ceilings=True)
    if hp.encoder_only or hp.decoder_only:  # the diffusion model's latents keep the scale they were trained at:
        # the start's config (after encoder rounds it is an earlier encoder's scale, not this encoder's measured one)
        metrics["scaling_factor_measured"] = metrics["scaling_factor"]
        metrics["scaling_factor"] = float(config["scaling_factor"])
    metrics.update(_loss_window_metrics(losses))
    metrics.update(
        name=NAME, step=progress.step, schedule_steps=progress.schedule_steps, images_seen=progress.images,
        train_seconds=round(progress.seconds, 1), chunks=progress.chunks, eval_seconds=round(time.monotonic() - t0, 1),
        chunk_steps=progress.step - start_step, device=str(dev), device_name=training.device_name(dev), seed=seed,
        smoke=smoke, params=sum(p.numel() for p in vae.parameters()), target_psnr_db=28.0,
        compile_mode=compile_mode, steps_per_second=round((progress.step - start_step) / max(chunk_seconds, 1e-6), 2),
        commit=training.git_commit(),
    )
    metrics["meets_target"] = metrics["psnr_db"] >= 28.0
    training.write_metrics(run_dir, metrics)
    return metrics


def write_round_trip_grid(vae: AutoencoderKL, path: str | os.PathLike, n: int = 8, thumb: int = 128) -> Path:
    """A PNG of ``n`` held-out renders (top row) over their round trips through ``vae`` (posterior mean,
    bottom row), each ``thumb`` pixels wide: ``docs/zoo/faces-vae_round_trips.png`` is
    ``write_round_trip_grid(load_vae(), "docs/zoo/faces-vae_round_trips.png")``."""
    from PIL import Image

    device, dtype = _module_device_dtype(vae)
    size = int(vae.config.sample_size)
    images = heldout_images(n, size)
    with torch.no_grad():
        z = posterior_means(vae, images)
        recon = to_uint8(vae.decode(z.to(device, dtype)).sample).cpu()
    rows = [torch.cat(list(x), dim=2) for x in (images, recon)]  # [3, size, n * size] each
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    out = Image.fromarray(grid).resize((n * thumb, 2 * thumb), Image.LANCZOS)
    path = Path(path)
    out.save(path, optimize=True)
    return path


#: The state-dict key prefixes of each half of an ``AutoencoderKL`` (what ``--decoder-only`` / ``--encoder-only``
#: keep frozen).
HALF_PREFIXES: dict[str, tuple[str, ...]] = {"encoder": ("encoder.", "quant_conv."),
                                             "decoder": ("decoder.", "post_quant_conv.")}


def frozen_half(hp: VAEHParams) -> str | None:
    """Which half of the autoencoder a run keeps frozen: ``"encoder"`` (``decoder_only``), ``"decoder"``
    (``encoder_only``) or ``None`` (every weight trains)."""
    return "encoder" if hp.decoder_only else "decoder" if hp.encoder_only else None


def trainable_parameters(vae: AutoencoderKL, frozen: str | None) -> list[nn.Parameter]:
    """Every parameter, or those of the half that is not ``frozen``: ``"encoder"`` freezes ``encoder`` and
    ``quant_conv`` (the encoder then runs without building a graph), ``"decoder"`` freezes ``decoder`` and
    ``post_quant_conv`` (``requires_grad`` off; gradients still flow through them to the latents)."""
    halves = {"encoder": (vae.encoder, vae.quant_conv), "decoder": (vae.decoder, vae.post_quant_conv)}
    if frozen is None:
        return list(vae.parameters())
    if frozen not in halves:
        raise ValueError(f"frozen={frozen!r} is not allowed; choose encoder, decoder or None")
    for module in halves[frozen]:
        if module is not None:
            module.requires_grad_(False)
    return [p for half, modules in halves.items() if half != frozen for m in modules if m is not None
            for p in m.parameters()]


_HOW_TRAINED = {
    "encoder": "encoder frozen: the decoder fine-tuned, the latent space unchanged",
    "decoder": "decoder frozen: the encoder fine-tuned, the decoder (what diffusion samples go through) unchanged",
    None: "all weights fine-tuned",
}


def _start_flags(hparams: Mapping[str, Any], smoke: bool) -> str:
    """The trainer flags that set up the run described by ``hparams`` (for its model card's command)."""
    flags = [flag for key, flag in (("decoder_only", "--decoder-only"), ("encoder_only", "--encoder-only"))
             if hparams.get(key)]
    if hparams.get("mse_weight"):
        flags.append(f"--mse-weight {hparams['mse_weight']:g}")
    recipe = SMOKE_HPARAMS if smoke else HPARAMS
    if hparams.get("batch_size", 0) != recipe.batch_size:
        flags.append(f"--batch {hparams['batch_size']}")
    recipe_lr = FINETUNE_CHANGES["lr"] if hparams.get("init") and not smoke else recipe.lr
    if hparams.get("lr", recipe_lr) != recipe_lr:
        flags.append(f"--lr {hparams['lr']:g}")
    if hparams.get("eye_weight"):
        flags.append(f"--eye-weight {hparams['eye_weight']:g}")
    return "".join(" " + f for f in flags)


@training.staged_export
def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write the EMA weights of ``run_dir`` as a diffusers ``AutoencoderKL`` folder in fp16 (with the measured
    ``scaling_factor``; a run with a frozen half keeps its start's) and a model card into ``dest``; returns
    ``dest``."""
    run_dir, dest = Path(run_dir), Path(dest)
    state = training.load_checkpoint(run_dir)
    if state is None or state.get("name") != NAME:
        raise FileNotFoundError(f"export: {run_dir} has no {NAME} checkpoint; train first")
    metrics = training.read_metrics(run_dir)
    if "scaling_factor" not in metrics:
        raise FileNotFoundError(f"export: {run_dir}/{training.METRICS} lacks scaling_factor; run train to evaluate")
    vae = build_vae(state["config"])
    vae.load_state_dict(ema_model_state(vae, state))
    vae.register_to_config(scaling_factor=float(metrics["scaling_factor"]))
    dest.mkdir(parents=True, exist_ok=True)
    nn.Module.to(vae, dtype=torch.float16)
    vae.save_pretrained(str(dest), safe_serialization=True)
    size = (dest / WEIGHTS_FILE).stat().st_size
    if size > MAX_BYTES and not metrics.get("smoke"):
        raise ValueError(f"export: {NAME} weights are {size} bytes, over the {MAX_BYTES}-byte budget")
    progress = state["progress"]
    frozen = frozen_half(VAEHParams(**state["hparams"]))
    training.write_card(
        dest, name=NAME,
        summary=("Stable-Diffusion-style AutoencoderKL (diffusers), 8x downsampling to 4 latent channels, "
                 f"block_out_channels {list(state['config']['block_out_channels'])}, "
                 f"{sum(p.numel() for p in vae.parameters())} parameters, fp16 safetensors ({size} bytes). "
                 "Latents times `scaling_factor` (in config.json) have unit std on held-out renders"
                 + (" (the scale of the encoder this one was fine-tuned from, kept for the diffusion model trained "
                    f"at it; this encoder's latents measure {metrics['scaling_factor_measured']:.4f})."
                    if "scaling_factor_measured" in metrics else ".")),
        data=("Faces-world renders (dragrt.zoo.world) streamed from training seeds; evaluation on held-out "
              "seeds 2_000_000_000 + i."),
        training={
            "steps": progress["step"], "images seen": progress["images"], "chunks": progress["chunks"],
            "train seconds": round(progress["seconds"], 1), "device": metrics.get("device_name", "?"),
            "commit": metrics.get("commit", "?"), "hparams": json.dumps(state["hparams"], sort_keys=True),
            "started from": training.card_start(state["hparams"], "; " + _HOW_TRAINED[frozen]),
            "command": training.card_command(NAME, state["hparams"], _start_flags(state["hparams"],
                                                                                 bool(metrics.get("smoke")))),
        },
        metrics={k: metrics[k] for k in ("psnr_db", "psnr_db_min", "ssim", "scaling_factor",
                                         "scaling_factor_measured", "eval_images",
                                         "categorical_accuracy_renders", "categorical_accuracy_round_trips",
                                         "caption_agreement_renders", "caption_agreement_round_trips")
                 if k in metrics},
        files=["config.json", WEIGHTS_FILE],
        status=training.target_status(metrics, f"{metrics.get('psnr_db')} dB PSNR on held-out renders", "28 dB",
                                      NAME),
    )
    return dest


def _loss_window_metrics(losses: list[float]) -> dict[str, float]:
    if not losses:
        return {}
    k = max(1, min(20, len(losses) // 4))
    return {"loss_first": round(float(np.mean(losses[:k])), 5), "loss_last": round(float(np.mean(losses[-k:])), 5)}


# --------------------------------------------------------------------------------------------------
# Shared helpers (also used by dragrt.zoo.unet)
# --------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a resumable run stands."""

    step: int = 0
    images: int = 0
    schedule_steps: int = 0  # 0 until planned
    seconds: float = 0.0
    chunks: int = 0

    def done(self) -> bool:
        return self.schedule_steps > 0 and self.step >= self.schedule_steps


class StepPlanner:
    """Plans a schedule length from the measured step rate: after ``skip`` steps of the chunk, time ``steps``
    steps, then ``observe`` returns the schedule's total length (the steps done plus those that fit in 95 %
    of the seconds left, clipped to ``[min_steps, max_steps]``), once; ``0`` before (``steps == 0``
    disables it)."""

    def __init__(self, skip: int, steps: int, min_steps: int, max_steps: int) -> None:
        self.skip, self.steps, self.min_steps, self.max_steps = skip, steps, min_steps, max_steps
        self.t0: float | None = None
        self.done = steps <= 0

    def wants_time(self, chunk_step: int) -> bool:
        """Whether ``observe`` needs the time after ``chunk_step`` steps (the caller synchronises the GPU)."""
        return not self.done and chunk_step in (self.skip, self.skip + self.steps)

    def observe(self, chunk_step: int, step: int, now: float, seconds_left: float) -> int:
        if self.done:
            return 0
        if chunk_step == self.skip:
            self.t0 = now
            return 0
        if self.t0 is None or chunk_step < self.skip + self.steps:
            return 0
        self.done = True
        rate = self.steps / max(now - self.t0, 1e-6)
        more = int(0.95 * rate * max(seconds_left, 0.0))  # 5 % margin: the rate can sag once prefetch drains
        return max(min(max(step + more, self.min_steps), self.max_steps), step + 1)


class Ema:
    """Exponential moving average of a module's floating-point parameters (fp32 copies; buffers copied).

    ``decay_n = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early averages follow the weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.shadow = [p.detach().float().clone() for n, p in model.named_parameters() if p.is_floating_point()]
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in model.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)

    def compact_state(self, model: nn.Module) -> dict[str, Any]:
        """The average as ``average - parameter`` in fp16 (CPU): half the bytes of fp32, and since the
        difference is small, its fp16 rounding (~5e-4 of it) is far below the parameters' own precision."""
        params = dict(model.named_parameters())
        delta = {n: (s - params[n].detach().float()).to("cpu", torch.float16) for n, s in zip(self.names, self.shadow)}
        return {"updates": self.updates, "delta": delta}

    def load_compact_state(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`compact_state`; ``model`` must already hold the saved parameters."""
        params, delta = dict(model.named_parameters()), state["delta"]
        missing = [n for n in self.names if n not in delta]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        self.updates = int(state["updates"])
        self.shadow = [params[n].detach().float() + delta[n].to(params[n].device).float() for n in self.names]

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters (cast to each parameter's dtype)."""
        state = dict(model.state_dict())
        for n, s in zip(self.names, self.shadow):
            state[n] = s.to(dtype=state[n].dtype, device=state[n].device)
        return state

    def copy_to(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding the averaged parameters."""
        clone = copy.deepcopy(model)
        clone.load_state_dict(self.model_state(model))
        return clone


def training_state(model: nn.Module, ema: Ema, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The resumable state, compact: the parameters in fp32, the EMA as an fp16 difference
    (:meth:`Ema.compact_state`) and Adam's second moments in bf16 (their rounding changes step sizes by
    ~0.2 %); Adam's first moments (a ~10-step memory at beta1 = 0.9) are not kept and restart at zero.
    For a 4.4 M-parameter UNet: 35 MB instead of 71 MB."""
    sd = opt.state_dict()
    adam = {i: {"step": torch.as_tensor(st["step"]).detach().to("cpu", torch.float32),
                "exp_avg_sq": st["exp_avg_sq"].detach().to("cpu", torch.bfloat16)} for i, st in sd["state"].items()}
    return {
        "model": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "ema": ema.compact_state(model),
        "optimizer": {"state": adam, "param_groups": sd["param_groups"]},
    }


def restore_training_state(state: Mapping[str, Any], model: nn.Module, ema: Ema,
                           opt: torch.optim.Optimizer) -> None:
    """Load what :func:`training_state` saved into freshly built ``model``, ``ema`` and ``opt``."""
    model.load_state_dict(state["model"])
    ema.load_compact_state(model, state["ema"])
    saved = state["optimizer"]
    adam = {i: {"step": st["step"], "exp_avg": torch.zeros_like(st["exp_avg_sq"], dtype=torch.float32),
                "exp_avg_sq": st["exp_avg_sq"].float()} for i, st in saved["state"].items()}
    kernels = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**g, **{k: now[k] for k in kernels if k in now}}  # this run's kernels (e.g. GPU run resumed on CPU)
              for g, now in zip(saved["param_groups"], opt.param_groups)]
    opt.load_state_dict({"state": adam, "param_groups": groups})


def ema_model_state(model: nn.Module, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``model``'s state dict with the EMA parameters of a checkpoint saved by :func:`training_state`."""
    model.load_state_dict(state["model"])
    helper = Ema(model, 0.0)
    helper.load_compact_state(model, state["ema"])
    return helper.model_state(model)


def default_workers(requested: int) -> int:
    return training.default_workers(requested, cap=14)


class BatchStream:
    """Endless batches of :func:`dragrt.zoo.data.make_loader`, ``image`` moved to ``device`` as float32 in
    [-1, 1] (the workers send uint8: 4x less to move between processes).

    The loader's stream is keyed by ``(seed, epoch)`` with ``epoch = step``: a run resumed at step ``step``
    sees a fresh, reproducible stream (given the worker count). A loader that ends is reopened on the next
    epoch key."""

    def __init__(self, batch_size: int, *, seed: int, step: int, size: int, num_workers: int,
                 device: torch.device, loader_fn: Callable[..., Any] | None = None) -> None:
        if loader_fn is None:
            from dragrt.zoo.data import make_loader as loader_fn
        self.loader_fn = loader_fn
        self.batch_size, self.size, self.device = batch_size, size, device
        self.num_workers = default_workers(num_workers)
        self.seed, self.step, self.restarts = seed, step, 0
        self._it: Iterator[Mapping[str, Any]] | None = None

    def _open(self) -> Iterator[Mapping[str, Any]]:
        loader = self.loader_fn(self.batch_size, seed=self.seed, num_workers=self.num_workers, size=self.size,
                                epoch=self.step + (self.restarts << 32), uint8=True,
                                pin_memory=self.device.type == "cuda")
        return iter(loader)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(3):
            if self._it is None:
                self._it = self._open()
            try:
                batch = dict(next(self._it))
                break
            except StopIteration:
                self._it = None
                self.restarts += 1
        else:
            raise RuntimeError("make_loader yielded no batches three times in a row")
        images = batch["image"].to(self.device, non_blocking=True)
        batch["image"] = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def batch_stream(batch_size: int, *, seed: int, step: int, size: int, num_workers: int,
                 device: torch.device) -> BatchStream:
    return BatchStream(batch_size, seed=seed, step=step, size=size, num_workers=num_workers, device=device)


def setup_torch(device: torch.device) -> None:
    """TF32 matmuls and cuDNN autotuning on CUDA (fixed shapes); nothing elsewhere."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but no CUDA GPU is usable here; pass --device cpu (with --smoke)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's fused CUDA kernel on GPUs, the multi-tensor one elsewhere (the per-tensor loop is slow)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = [
    "HPARAMS", "MODEL_CONFIG", "NAME", "SMOKE_CONFIG", "SMOKE_HPARAMS", "BatchStream", "Ema", "Progress",
    "StepPlanner", "VAEHParams", "build_vae", "evaluate", "export", "heldout_images", "latent_scaling_factor",
    "load_vae", "posterior_means", "psnr", "ssim", "train", "vae_loss",
]
