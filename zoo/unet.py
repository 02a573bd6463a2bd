"""zoo:faces-sd: a text-to-image latent diffusion model in Stable Diffusion 1.5's pipeline shape.

All pieces are the diffusers / transformers classes SD1.5 uses, at toy width:

* ``unet``: ``UNet2DConditionModel`` with SD1.5's structure (``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``,
  ``UpBlock2D`` + ``CrossAttnUpBlock2D`` x3, two ResNets per level, one transformer per attention: 16
  transformer blocks, ``up_blocks[2]`` at the full latent resolution as DragDiffusion expects), widths
  32/64/80/80 (:func:`unet_config`, under 10 MB in fp16), ``cross_attention_dim`` = the text tower's width,
  ``sample_size`` 32 (256 px images);
* ``vae``: the frozen zoo:faces-vae (:mod:`dragrt.zoo.vae`), latents times its ``scaling_factor``;
* ``text_encoder`` / ``tokenizer``: the frozen text tower of zoo:faces-clip and its CLIP tokenizer
  (77 tokens; the UNet reads ``last_hidden_state``, as SD does);
* ``scheduler``: ``DDIMScheduler`` with DragDiffusion's settings (:data:`SD15_SCHEDULER_CONFIG`: SD's
  scaled-linear 0.00085..0.012 betas over 1000 steps, epsilon prediction).

Training (``python -m dragrt.zoo.train faces-sd --run-dir DIR --minutes 9``, run twice; ``--export`` on the
last): renders streamed from seeds are encoded on the fly by the frozen VAE (a posterior sample, as SD's
training does) and their captions by the frozen text tower, into a ring buffer on the GPU; every step
trains on a random batch of that buffer (each image is used a few times, with fresh noise and timesteps).
Epsilon prediction on SD's DDPM schedule with uniform timesteps and Min-SNR-5 loss weights, 10% of captions
dropped to the empty prompt (classifier-free guidance), AdamW, bf16 autocast, EMA of the weights. The
schedule (warmup, cosine) is planned once from the measured step rate over :attr:`UNetHParams.planned_seconds`
of training (two 9-minute chunks) and stored in the checkpoint.

Evaluation (the EMA weights, through ``StableDiffusionPipeline``): ``eval_samples`` held-out captions,
DDIM 50 steps, classifier-free guidance at each scale of ``guidance_scales`` (5 is the headline), decoded
by the VAE and scored by the attribute model (zoo:faces-attributes) against the caption's categorical
attributes: accuracy per attribute and mean (target 0.8). The classifier's own accuracy on the renders of
the same captions, and on their VAE round trips, is reported beside it (the ceiling). With the attribute reader
(zoo:faces-attribute-details installed), also ``caption_agreement``: how often the continuous attributes the
captions describe (a wide smile, looking left, a big nose, ...; :data:`dragrt.zoo.world.CAPTION_BINS`) land in the
bin the caption says, with its ceilings on renders and round trips.

:func:`export` writes a diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors):
``StableDiffusionPipeline.from_pretrained(folder)`` and :func:`dragrt.runtime.models.sd.load_sd` load it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG, SD15_UNET_CONFIG
from dragrt.zoo import training
from dragrt.zoo import vae as zvae

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

NAME = "faces-sd"
#: Shipped size limit of the UNet's fp16 weights (bytes).
MAX_UNET_BYTES = 10_000_000
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
FROZEN = "frozen"  # run_dir/frozen/{vae,text_encoder,tokenizer}: the exact frozen parts training used

#: The zoo models this one is built on (keyword defaults of :func:`train`).
DEFAULT_VAE = "zoo:faces-vae"
DEFAULT_CLIP = "zoo:faces-clip"
DEFAULT_ATTRIBUTES = "zoo:faces-attributes"


def unet_config(cross_attention_dim: int, *, smoke: bool = False) -> dict[str, Any]:
    """SD1.5's UNet config (:data:`SD15_UNET_CONFIG`) at toy width for 256 px images (32x32 latents).

    Widths 32/64/80/80 with 16 GroupNorm groups and 2 attention heads per transformer (head widths 16/32/40,
    multiples of 8 for the fused attention kernels); 4.7 M parameters with a 256-wide text tower. ``smoke``:
    16/16/32/32 channels and 8x8 latents (64 px), same block kinds.
    """
    if not isinstance(cross_attention_dim, int) or not 1 <= cross_attention_dim <= 4096:
        raise ValueError(f"cross_attention_dim must be an int in [1, 4096], got {cross_attention_dim!r}")
    cfg = dict(SD15_UNET_CONFIG)
    cfg.update(
        sample_size=8 if smoke else 32,
        block_out_channels=[16, 16, 32, 32] if smoke else [32, 64, 80, 80],
        norm_num_groups=8 if smoke else 16,
        attention_head_dim=2,
        cross_attention_dim=cross_attention_dim,
    )
    return cfg


def build_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """A randomly initialised ``UNet2DConditionModel`` with SD1.5's block layout (checked)."""
    from diffusers import UNet2DConditionModel

    _check_layout(config)
    return UNet2DConditionModel.from_config(dict(config))


def _check_layout(config: Mapping[str, Any]) -> None:
    for key in ("down_block_types", "up_block_types", "layers_per_block"):
        value = list(config[key]) if isinstance(config[key], (list, tuple)) else config[key]
        if value != SD15_UNET_CONFIG[key]:
            raise ValueError(f"{key} must be SD1.5's {SD15_UNET_CONFIG[key]!r} (DragDiffusion relies on the "
                             f"block layout), got {config[key]!r}")


#: First held-out seed of the validation captions: settings (the CFG scale) are chosen on these, never on the
#: evaluation's captions (seeds ``0..eval_samples-1``, ``eval_samples`` at most 100 000), which report them.
VALIDATION_START = 1_000_000


@dataclass(frozen=True)
class UNetHParams:
    """Training and evaluation settings of faces-sd (stored in the checkpoint; a resumed run keeps them).

    Attributes:
        image_size: render size (8 x the UNet's ``sample_size``).
        batch_size: training samples per step (drawn from the latent buffer).
        fresh_per_step: new renders encoded into the buffer per step (``batch_size / fresh_per_step`` is how
            often, on average, each render is trained on).
        buffer_size: latent ring buffer capacity (latents fp32 + text states bf16, on the device).
        min_fill: renders encoded before the first step of a chunk.
        lr, lr_floor, warmup, weight_decay, grad_clip: AdamW and its warmup + cosine schedule.
        ema_decay: EMA decay (with the ``(1 + n) / (10 + n)`` warmup).
        caption_dropout: probability of training on the empty prompt (classifier-free guidance).
        lower_face_weight: extra weight of the loss on the lower face (``training.REGIONS["lower_face"]``: where
            moustaches, goatees and beards are drawn), ``1 + w`` there against 1 elsewhere, each sample's weights
            normalised to mean 1; 0 (default): SD's plain loss. A fine-tune option aimed at the beards faces-sd
            draws where its captions ask for none.
        min_snr_gamma: Min-SNR loss weighting ``min(SNR, gamma) / SNR`` (0 disables it).
        planned_seconds: training seconds the schedule is planned for, over all chunks.
        min_steps, max_steps: bounds of the planned schedule; ``fixed_steps`` > 0: no planning (smoke).
        calib_skip, calib_steps: steps skipped, then timed, to plan.
        reserve_s: seconds of each chunk kept for saving and evaluation.
        eval_samples, eval_steps, guidance_scales, main_guidance: the evaluation (DDIM steps, CFG scales).
        eval_batch: prompts per pipeline call; grid_samples: samples in ``run_dir/samples.png``.
        num_workers: loader processes (-1: all CPUs but two, at most 14).
        init: the exported pipeline folder (or ``zoo:`` name) whose UNet a new run started from; ``""``: random.
        init_history: what ``init`` was when the run started (:func:`dragrt.zoo.training.describe_start`).
    """

    image_size: int = 256
    batch_size: int = 256
    fresh_per_step: int = 64
    buffer_size: int = 32_768
    min_fill: int = 8_192
    lr: float = 8e-4
    lr_floor: float = 0.1
    warmup: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    lower_face_weight: float = 0.0
    min_snr_gamma: float = 5.0
    planned_seconds: float = 930.0
    min_steps: int = 2_000
    max_steps: int = 200_000
    fixed_steps: int = 0
    calib_skip: int = 300
    calib_steps: int = 500
    reserve_s: float = 45.0
    eval_samples: int = 256
    eval_steps: int = 50
    guidance_scales: tuple[float, ...] = (5.0,)  # (3, 5, 7.5) triples the evaluation time
    main_guidance: float = 5.0
    eval_batch: int = 256
    grid_samples: int = 16
    num_workers: int = -1
    init: str = ""
    init_history: str = ""


HPARAMS = UNetHParams()
#: A run started from a trained UNet (``init``): half the peak learning rate, a short warmup.
FINETUNE_CHANGES: dict[str, Any] = {"lr": 4e-4, "warmup": 100}
SMOKE_HPARAMS = UNetHParams(
    image_size=64, batch_size=4, fresh_per_step=2, buffer_size=16, min_fill=4, lr=3e-3, warmup=3,
    ema_decay=0.9, planned_seconds=0.0, min_steps=1, max_steps=16, fixed_steps=16, calib_skip=0, calib_steps=0,
    reserve_s=0.0, eval_samples=4, eval_steps=2, guidance_scales=(5.0,), eval_batch=4, grid_samples=4,
    num_workers=0,
)


def _validate(hp: UNetHParams) -> None:
    checks = [
        ("batch_size", hp.batch_size, 1, 1 << 16), ("fresh_per_step", hp.fresh_per_step, 1, 1 << 16),
        ("buffer_size", hp.buffer_size, hp.batch_size, 1 << 22), ("min_fill", hp.min_fill, 1, hp.buffer_size),
        ("caption_dropout", hp.caption_dropout, 0.0, 1.0), ("eval_steps", hp.eval_steps, 1, 1000),
        ("lower_face_weight", hp.lower_face_weight, 0.0, 100.0),
        ("eval_samples", hp.eval_samples, 1, 100_000),
    ]
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ValueError(f"UNetHParams.{name} must be in [{lo}, {hi}], got {value}")
    if hp.main_guidance not in hp.guidance_scales:
        raise ValueError(f"UNetHParams.main_guidance {hp.main_guidance} must be one of guidance_scales "
                         f"{hp.guidance_scales}")


# --------------------------------------------------------------------------------------------------
# Frozen parts: VAE, text tower, tokenizer
# --------------------------------------------------------------------------------------------------


@dataclass
class Frozen:
    """The frozen parts training conditions on (fp32, eval mode, no grad)."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    source: dict[str, str] = field(default_factory=dict)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def to(self, device: torch.device) -> Frozen:
        for m in (self.vae, self.text_encoder):
            nn.Module.to(m, device)
            m.eval().requires_grad_(False)
        return self

    def save(self, folder: Path) -> None:
        """Write ``vae/``, ``text_encoder/`` (fp16, as shipped: the zoo sources are fp16 already) and
        ``tokenizer/`` into ``folder``."""
        import copy

        folder.mkdir(parents=True, exist_ok=True)
        vae16 = nn.Module.to(copy.deepcopy(self.vae), dtype=torch.float16)
        vae16.save_pretrained(str(folder / "vae"), safe_serialization=True)
        save_text_encoder(self.text_encoder, folder / "text_encoder", torch.float16)
        save_tokenizer(self.tokenizer, folder / "tokenizer")
        (folder / "source.json").write_text(json.dumps(self.source, indent=2, sort_keys=True) + "\n")


def save_text_encoder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype) -> None:
    """The text tower in the hub's key layout (``text_model.*``), which transformers 4 and 5 both load."""
    from dragrt.zoo.clip import save_text_encoder as save

    save(text_encoder, folder, dtype)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """``save_pretrained`` plus the BPE files (transformers 5 writes only ``tokenizer.json``)."""
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (folder / "vocab.json").is_file():
        backend.model.save(str(folder))


def load_tokenizer(folder: Path, max_length: int = 77) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer (vocab.json + merges.txt or tokenizer.json)")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = max_length
    return tok


def load_frozen_folder(folder: Path) -> Frozen:
    """Frozen parts from a folder with ``vae/``, ``text_encoder/``, ``tokenizer/`` (a run's ``frozen/`` or an
    exported faces-sd pipeline folder)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (folder / sub).is_dir():
            raise FileNotFoundError(f"{folder / sub} is missing; expected vae/, text_encoder/ and tokenizer/")
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32, local_files_only=True)
    vae.eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32, local_files_only=True)
    tok = load_tokenizer(folder / "tokenizer", te.config.max_position_embeddings)
    source = {}
    if (folder / "source.json").is_file():
        source = json.loads((folder / "source.json").read_text())
    return Frozen(vae=vae, text_encoder=te, tokenizer=tok, source=source or {"folder": str(folder)})


def load_text_tower(path: str | os.PathLike) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The text tower + tokenizer of ``path``: a faces-clip export (``zoo:faces-clip``, read by
    :func:`dragrt.zoo.clip.load_clip`) or a folder with ``text_encoder/`` and ``tokenizer/``."""
    from transformers import CLIPTextModel

    folder = training.resolve_zoo_path(path, "text tower")
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=torch.float32, local_files_only=True)
        return te, load_tokenizer(folder / "tokenizer", te.config.max_position_embeddings)
    from dragrt.zoo.clip import load_clip, text_encoder_from_clip

    clip, tok = load_clip(folder, "cpu", torch.float32)
    te = text_encoder_from_clip(clip)
    nn.Module.to(te, dtype=torch.float32)
    return te, tok


def load_frozen(vae_path: str | os.PathLike, clip_path: str | os.PathLike) -> Frozen:
    te, tok = load_text_tower(clip_path)
    return Frozen(vae=zvae.load_vae(vae_path), text_encoder=te, tokenizer=tok,
                  source={"vae": os.fspath(vae_path), "clip": os.fspath(clip_path)})


def smoke_frozen(seed: int = 0) -> Frozen:
    """Random tiny stand-ins for ``--smoke``: a 16-wide VAE (scaling factor measured on 8 held-out renders),
    a 2-layer, 32-wide CLIP text tower and the faces-world tokenizer of :mod:`dragrt.zoo.text`."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel

    from dragrt.zoo import text

    with tempfile.TemporaryDirectory() as tmp:  # Frozen.save writes the tokenizer where the run keeps it
        tok = text.build_tokenizer(tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = zvae.build_vae(zvae.SMOKE_CONFIG).eval()
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=text.MAX_LENGTH, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    lat = zvae.posterior_means(vae, zvae.heldout_images(8, zvae.SMOKE_CONFIG["sample_size"]))
    vae.register_to_config(scaling_factor=zvae.latent_scaling_factor(lat))
    return Frozen(vae=vae, text_encoder=te.eval(), tokenizer=tok, source={"smoke": "random"})


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids ``[N, 77]`` padded to the model length, as ``StableDiffusionPipeline`` pads prompts."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class LatentBuffer:
    """A ring buffer on the device of scaled latents ``[4, h, w]`` (fp32), text states ``[77, D]`` (bf16) and,
    with ``boxes`` (a run with a lower-face loss weight), lower-face boxes ``[4]`` (fp32,
    :func:`dragrt.zoo.training.region_boxes`; ``None`` in :meth:`sample` without)."""

    def __init__(self, capacity: int, latent_shape: Sequence[int], text_shape: Sequence[int],
                 device: torch.device, *, boxes: bool = True) -> None:
        self.capacity = capacity
        self.latents = torch.empty(capacity, *latent_shape, device=device)
        self.text = torch.empty(capacity, *text_shape, device=device, dtype=torch.bfloat16)
        self.boxes = torch.empty(capacity, 4, device=device) if boxes else None
        self.count = 0  # insertions so far

    @property
    def size(self) -> int:
        return min(self.count, self.capacity)

    def add(self, latents: torch.Tensor, text: torch.Tensor, boxes: torch.Tensor | None = None) -> None:
        if (boxes is None) != (self.boxes is None):
            raise ValueError("LatentBuffer.add: boxes are given exactly when the buffer keeps them")
        n = latents.shape[0]
        idx = (torch.arange(n, device=self.latents.device) + self.count) % self.capacity
        self.latents[idx] = latents.float()
        self.text[idx] = text.to(torch.bfloat16)
        if self.boxes is not None:
            self.boxes[idx] = boxes.to(self.boxes.device, torch.float32)
        self.count += n

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.size == 0:
            raise ValueError("LatentBuffer.sample: the buffer is empty")
        idx = torch.randint(self.size, (n,), device=self.latents.device, generator=generator)
        boxes = None if self.boxes is None else self.boxes[idx]
        return self.latents[idx], self.text[idx].float(), boxes  # autocast casts text back (CUDA)


@torch.no_grad()
def encode_batch(frozen: Frozen, images: torch.Tensor, captions: Sequence[str], generator: torch.Generator,
                 autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE latents (a posterior sample, as SD trains) and text states of one loader batch."""
    device = images.device
    ids = tokenize(frozen.tokenizer, captions).to(device, non_blocking=True)
    with autocast:
        latents = frozen.vae.encode(images).latent_dist.sample(generator).float() * frozen.scaling_factor
        text = frozen.text_encoder(ids).last_hidden_state
    return latents, text


def load_init_unet(init: str | os.PathLike) -> tuple[dict[str, Any], UNet2DConditionModel]:
    """The config (checked for SD1.5's block layout, as :func:`build_unet` does) and the fp32 UNet of the exported
    pipeline folder ``init`` (or ``zoo:faces-sd``): a run started from it fine-tunes that model."""
    from diffusers import UNet2DConditionModel

    folder = training.resolve_zoo_path(init, "init") / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"init: {folder} has no UNet config; expected an exported {NAME} pipeline folder")
    unet = UNet2DConditionModel.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}
    _check_layout(config)  # a UNet DragDiffusion cannot use is refused here
    return config, unet


def diffusion_loss(unet: nn.Module, x0: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor,
                   generator: torch.Generator, *, min_snr_gamma: float = 0.0,
                   timesteps: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon-prediction loss on SD's forward process ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``,
    ``t`` uniform in ``[0, T)``; per-sample MSE weighted by ``min(SNR, gamma) / SNR`` when ``gamma > 0``.
    ``weights`` (``[N, 1, h, w]``, :func:`dragrt.zoo.training.region_weights`) weight each sample's squared
    errors by position, normalised to mean 1, so that a sample's loss keeps its scale."""
    n = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(len(alphas_cumprod), (n,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    a = alphas_cumprod[timesteps].float().view(n, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = unet(xt, timesteps, encoder_hidden_states=text).sample.float()
    if weights is None:
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
    else:
        mse = ((pred - noise).pow(2) * training.normalised_weights(weights)).mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = (a / (1 - a)).view(n)
        mse = mse * snr.clamp(max=min_snr_gamma) / snr
    return mse.mean()


class _LearningRate:
    """The learning rate of every group of ``opt``: a float, or (``on_device``, for an optimiser step replayed
    from a CUDA graph, which would otherwise keep the rate of its capture) one device tensor filled in place."""

    def __init__(self, opt: torch.optim.Optimizer, value: float, device: torch.device, *, on_device: bool) -> None:
        self.opt, self.value = opt, float(value)
        self.tensor = torch.tensor(self.value, device=device) if on_device else None
        for group in opt.param_groups:
            group["lr"] = self.tensor if on_device else self.value

    def set(self, value: float) -> None:
        self.value = float(value)
        if self.tensor is not None:
            self.tensor.fill_(self.value)
        else:
            for group in self.opt.param_groups:
                group["lr"] = self.value

    def restore_float(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.value


def train(run_dir: str | os.PathLike, *, minutes: float = 9.0, device: str = "cuda", seed: int = 0,
          smoke: bool = False, vae_path: str | os.PathLike | None = None, clip_path: str | os.PathLike | None = None,
          attributes_path: str | os.PathLike | None = None,
          init: str | os.PathLike | None = None, compile_mode: str | None = None,
          cuda_graphs: bool = False, lower_face_weight: float | None = None) -> dict[str, Any]:
    """Train (or resume) faces-sd in ``run_dir`` for at most ``minutes``; returns the metrics.

    The first chunk copies the frozen VAE, text tower and tokenizer (``vae_path``, default zoo:faces-vae;
    ``clip_path``, default zoo:faces-clip; with ``smoke`` and no paths, random tiny stand-ins) into
    ``run_dir/frozen``; resumed chunks and :func:`export` use that copy. ``attributes_path`` (default
    zoo:faces-attributes; none with ``smoke``) is the attribute model of the evaluation, skipped with a
    note when it is not there. ``init`` (an exported pipeline folder or ``zoo:faces-sd``) starts a new run that
    fine-tunes that UNet (:func:`load_init_unet`, with :data:`FINETUNE_CHANGES`); ``compile_mode``
    (:data:`dragrt.zoo.training.COMPILE_MODES`) compiles the UNet's blocks for this chunk's training steps;
    ``cuda_graphs`` (CUDA only) replays the training step -- its noise and timestep draws, forward, backward,
    clipping and AdamW -- from one CUDA graph (:class:`dragrt.zoo.training.ReplayedStep`) instead of launching
    its ~5 400 kernels from Python: the same updates from the same seed. Measured alone on an H100 at batch 256
    (``bench/tools/zoo_step_variants.py unet``): 166 ms eager (75 ms of GPU work), 74 ms replayed, 37 ms
    replayed with ``compile_mode='default'``. ``lower_face_weight`` sets a new run's
    :attr:`UNetHParams.lower_face_weight`.
    """
    from diffusers import DDIMScheduler

    budget = training.Budget(minutes)
    training.check_compile_mode(compile_mode)
    dev = torch.device(device)
    training.check_cuda_graphs(cuda_graphs, compile_mode, dev)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    zvae.setup_torch(dev)
    state = training.load_checkpoint(run_dir)
    if state is not None:
        if state.get("name") != NAME:
            raise ValueError(f"{run_dir} holds a checkpoint of {state.get('name')!r}, not {NAME!r}")
        training.refuse_init_on_resume(run_dir, init is not None or lower_face_weight is not None,
                                       "init and lower_face_weight")
        hp = UNetHParams(**{**state["hparams"], "guidance_scales": tuple(state["hparams"]["guidance_scales"])})
        seed, smoke = int(state["seed"]), bool(state["smoke"])
    else:
        hp = SMOKE_HPARAMS if smoke else HPARAMS
        if init is not None:
            hp = training.start_from(hp, init, {} if smoke else FINETUNE_CHANGES)
        if lower_face_weight is not None:
            if isinstance(lower_face_weight, bool) or not isinstance(lower_face_weight, (int, float)):
                raise ValueError(f"lower_face_weight must be a number in [0, 100], got {lower_face_weight!r}")
            hp = replace(hp, lower_face_weight=float(lower_face_weight))
    _validate(hp)

    frozen_dir = run_dir / FROZEN
    if not (frozen_dir / "vae").is_dir():
        if smoke and vae_path is None and clip_path is None:
            first = smoke_frozen(seed)
        else:
            first = load_frozen(vae_path or DEFAULT_VAE, clip_path or DEFAULT_CLIP)
        first.save(frozen_dir)
    frozen = load_frozen_folder(frozen_dir).to(dev)  # every chunk and the export read this same copy
    hidden = int(frozen.text_encoder.config.hidden_size)
    unet = None
    if state is not None:
        config = dict(state["config"])
    elif init is not None:
        config, unet = load_init_unet(init)  # fine-tune that model: its architecture, its weights
    else:
        config = unet_config(hidden, smoke=smoke)
    if config["cross_attention_dim"] != hidden:
        raise ValueError(f"the UNet's cross_attention_dim {config['cross_attention_dim']} differs from the text "
                         f"tower's hidden size {hidden}")
    latent_hw = config["sample_size"]
    if hp.image_size != latent_hw * 8:
        raise ValueError(f"image_size {hp.image_size} must be 8 x the UNet sample_size {latent_hw}")

    torch.manual_seed(seed)
    if unet is None:
        unet = build_unet(config)
    unet.to(dev)
    ema = zvae.Ema(unet, hp.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=hp.lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay,
                            **zvae.optimizer_kernel(dev), **({"capturable": True} if cuda_graphs else {}))
    progress = zvae.Progress()
    if state is not None:
        zvae.restore_training_state(state, unet, ema, opt)
        progress = zvae.Progress(**state["progress"])
    if progress.schedule_steps == 0 and hp.fixed_steps > 0:
        progress.schedule_steps = hp.fixed_steps
    planner = zvae.StepPlanner(hp.calib_skip, hp.calib_steps, hp.min_steps, hp.max_steps)
    alphas_cumprod = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod.to(dev)

    start_step = progress.step
    autocast = zvae.autocast_for(dev)
    gen = torch.Generator(dev).manual_seed(training.mix_seed(seed, start_step, 2))
    stream = zvae.BatchStream(hp.fresh_per_step, seed=seed, step=start_step, size=hp.image_size,
                              num_workers=hp.num_workers, device=dev)
    ctx_len = int(frozen.text_encoder.config.max_position_embeddings)
    weighted = hp.lower_face_weight > 0
    buffer = LatentBuffer(hp.buffer_size, (4, latent_hw, latent_hw), (ctx_len, hidden), dev, boxes=weighted)
    empty = encode_text(frozen, [""], dev, autocast).to(torch.bfloat16).float()  # [1, 77, D], as buffered

    def buffer_batch(buf: LatentBuffer) -> None:
        """Encode the stream's next batch into ``buf`` (with its lower-face boxes when the loss weighs them)."""
        batch = next(stream)
        boxes = None
        if weighted:  # pinned landmarks, moved without blocking
            boxes = training.region_boxes(batch["landmarks"].to(dev, non_blocking=True), hp.image_size,
                                          "lower_face")
        buf.add(*encode_batch(frozen, batch["image"], batch["caption"], gen, autocast), boxes)

    fill_start = time.monotonic()
    while not progress.done() and buffer.count < hp.min_fill:  # a finished run only evaluates
        buffer_batch(buffer)
    fill_seconds = time.monotonic() - fill_start

    compiled = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    training.compile_forwards(compiled, compile_mode)
    unet.train()
    # The step reads its batch from static buffers and writes its loss to one, so that it can be replayed from
    # a CUDA graph (cuda_graphs); a replayed AdamW reads its learning rate from a device tensor.
    x0_in = torch.empty(hp.batch_size, 4, latent_hw, latent_hw, device=dev)
    text_in = torch.empty(hp.batch_size, ctx_len, hidden, device=dev)
    weights_in = torch.ones(hp.batch_size, 1, latent_hw, latent_hw, device=dev) if weighted else None
    last_loss = torch.zeros((), device=dev)
    lr_now = _LearningRate(opt, hp.lr, dev, on_device=cuda_graphs)

    def step() -> None:
        with autocast:
            loss = diffusion_loss(unet, x0_in, text_in, alphas_cumprod, gen, min_snr_gamma=hp.min_snr_gamma,
                                  weights=weights_in)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), hp.grad_clip, foreach=True)
        opt.step()
        last_loss.copy_(loss.detach())

    def fallback(err: str) -> None:
        zvae._log(f"{NAME}: CUDA-graph capture of the training step failed ({err}); it runs eagerly from now on")

    run_step = training.ReplayedStep(step, cuda_graph=cuda_graphs, device=dev,
                                     before_capture=lambda: opt.zero_grad(set_to_none=True), on_fallback=fallback,
                                     generators=(gen,))
    losses: list[float] = []
    train_end = budget.seconds - hp.reserve_s
    loop_start = time.monotonic()
    while not progress.done() and budget.elapsed < train_end:
        buffer_batch(buffer)
        x0, text, boxes = buffer.sample(hp.batch_size, gen)
        drop = torch.rand(hp.batch_size, device=dev, generator=gen) < hp.caption_dropout
        x0_in.copy_(x0)
        if weights_in is not None:
            weights_in.copy_(training.region_weights(boxes, latent_hw, hp.lower_face_weight))
        torch.where(drop.view(-1, 1, 1), empty, text, out=text_in)
        lr_now.set(hp.lr * training.lr_factor(progress.step, hp.warmup, progress.schedule_steps or hp.max_steps,
                                              hp.lr_floor))
        run_step()
        ema.update(unet)
        progress.step += 1
        progress.images += hp.fresh_per_step
        if progress.step % 10 == 0 or smoke:
            losses.append(last_loss.item())
        if progress.schedule_steps == 0 and planner.wants_time(progress.step - start_step):
            zvae.synchronize(dev)
            now = time.monotonic()
            # A first chunk shorter than the plan gets a schedule that ends inside it (a one-chunk run must not
            # stop at a high learning rate); resumed chunks keep the schedule planned in the first.
            plan = min(hp.planned_seconds, train_end - (loop_start - budget.start) + progress.seconds)
            left = plan - progress.seconds - (now - loop_start)
            planned = planner.observe(progress.step - start_step, progress.step, now, left)
            if planned:
                progress.schedule_steps = planned
                zvae._log(f"{NAME}: schedule planned for {planned} steps")
        if progress.step % 1000 == 0:
            zvae._log(f"{NAME} step {progress.step}/{progress.schedule_steps or '?'} loss {last_loss.item():.4f} "
                      f"lr {lr_now.value:.2e} {budget.elapsed:.0f}s")
    stream.close()
    replayed = run_step.graph is not None
    del run_step  # the graph and its memory pool
    lr_now.restore_float()  # checkpoints hold a plain learning rate whatever the chunk's kernels
    chunk_steps = progress.step - start_step
    loop_seconds = time.monotonic() - loop_start
    progress.seconds += loop_seconds
    progress.chunks += 1
    training.save_checkpoint(run_dir, {
        "name": NAME, "config": config, "hparams": _hparams_dict(hp), "seed": seed, "smoke": smoke,
        "progress": asdict(progress), "scaling_factor": frozen.scaling_factor,
        **zvae.training_state(unet, ema, opt),
    })
    del buffer

    t0 = time.monotonic()
    training.uncompile_forwards(compiled)  # the evaluation runs other shapes: eager, no second compile
    eval_unet = ema.copy_to(unet).eval().requires_grad_(False)
    if attributes_path is None and not smoke:
        attributes_path = DEFAULT_ATTRIBUTES
    metrics: dict[str, Any] = evaluate(eval_unet, frozen, hp, attributes_path=attributes_path, seed=seed,
                                       grid_path=run_dir / "samples.png")
    metrics.update(zvae._loss_window_metrics(losses))
    metrics.update(
        name=NAME, step=progress.step, schedule_steps=progress.schedule_steps, images_seen=progress.images,
        train_seconds=round(progress.seconds, 1), chunks=progress.chunks, chunk_steps=chunk_steps,
        steps_per_second=round(chunk_steps / max(loop_seconds, 1e-6), 2), fill_seconds=round(fill_seconds, 1),
        eval_seconds=round(time.monotonic() - t0, 1), device=str(dev), device_name=training.device_name(dev),
        seed=seed, smoke=smoke, params=sum(p.numel() for p in unet.parameters()),
        scaling_factor=frozen.scaling_factor, frozen_source=frozen.source, commit=training.git_commit(),
        samples_per_render=round(hp.batch_size / hp.fresh_per_step, 2),
        compile_mode=compile_mode, cuda_graphs=cuda_graphs, replayed_step=replayed,
    )
    training.write_metrics(run_dir, metrics)
    return metrics


def evaluate_folder(path: str | os.PathLike = "zoo:" + NAME, *, guidance_scales: Sequence[float] = (5.0,),
                    samples: int = HPARAMS.eval_samples, steps: int = HPARAMS.eval_steps, device: str = "cpu",
                    attributes_path: str | os.PathLike = DEFAULT_ATTRIBUTES, seed: int = 0,
                    caption_start: int = 0, progress: bool = False,
                    vae: str | os.PathLike | None = None, grid_path: str | os.PathLike | None = None
                    ) -> dict[str, Any]:
    """:func:`evaluate` of an exported pipeline folder (default the shipped ``zoo:faces-sd``) at each CFG scale
    of ``guidance_scales``: the same held-out captions and sampling seed as a training run's evaluation
    (``seed`` 0, ``caption_start`` 0), so the shipped card's number comes back at its scale (fp32 on a CPU, fp16
    on a GPU). Choose settings (the CFG scale) on other captions, e.g. ``caption_start=VALIDATION_START``, and
    report them on the card's. ``progress``: a progress bar while sampling (the CLI's). ``vae`` (an exported
    AutoencoderKL folder or ``zoo:`` name with the pipeline's autoencoder config, ``scaling_factor`` included)
    decodes the samples instead of the pipeline's ``vae/``: how another decoder (e.g. a ``--decoder-only``
    fine-tune, whose latent space is the pipeline's) would change the samples' scores, without a UNet round.
    ``grid_path``: the first samples at the first scale as a PNG grid there, as a training run's ``samples.png``."""
    scales = tuple(float(g) for g in guidance_scales)
    if not scales or not all(math.isfinite(g) and g >= 1.0 for g in scales):
        raise ValueError(f"guidance_scales must be one or more finite numbers >= 1, got {list(guidance_scales)}")
    if isinstance(caption_start, bool) or not isinstance(caption_start, int) \
            or not 0 <= caption_start <= VALIDATION_START:
        raise ValueError(f"caption_start must be an integer in [0, {VALIDATION_START}], got {caption_start!r}")
    dev = torch.device(device)
    hp = replace(HPARAMS, guidance_scales=scales, main_guidance=scales[0], eval_samples=samples, eval_steps=steps,
                 eval_batch=max(1, min(HPARAMS.eval_batch if dev.type == "cuda" else 64, samples)))
    _validate(hp)
    folder = training.resolve_zoo_path(path, "evaluate")
    unet, frozen = load_pipeline_parts(folder, dev)
    if vae is not None:
        other = training.resolve_zoo_path(vae, "evaluate")
        _check_same_vae_config(other, folder / "vae", "evaluate", "decode this UNet's latents")
        frozen.vae = zvae.load_vae(other, dev)
    out = evaluate(unet, frozen, hp, attributes_path=attributes_path, seed=seed, caption_start=caption_start,
                   progress=progress, grid_path=Path(grid_path) if grid_path is not None else None)
    out.update(folder=str(folder), device=str(dev), vae=str(vae) if vae is not None else str(folder / "vae"))
    return out


def _check_same_vae_config(src: Path, dest: Path, who: str, purpose: str) -> None:
    """``ValueError`` naming the differing keys when the autoencoder configs of folders ``src`` and ``dest`` differ
    (provenance aside): ``src`` could not ``purpose``."""
    from dragrt.zoo import registry

    def config(folder: Path) -> dict[str, Any]:
        f = folder / "config.json"
        if not f.is_file():
            raise FileNotFoundError(f"{who}: {folder} lacks config.json; expected an exported AutoencoderKL folder")
        return registry.without_provenance(json.loads(f.read_text()))

    new_cfg, old_cfg = config(src), config(dest)
    if new_cfg != old_cfg:
        differ = sorted(k for k in set(new_cfg) | set(old_cfg) if new_cfg.get(k) != old_cfg.get(k))
        raise ValueError(f"{who}: {src} has another config than {dest} ({', '.join(differ)}): it could not "
                         f"{purpose}")


def load_pipeline_parts(path: str | os.PathLike, device: torch.device) -> tuple[UNet2DConditionModel, Frozen]:
    """The UNet (fp32, eval mode, no gradients) and the frozen parts of an exported pipeline folder (or
    ``zoo:`` name), on ``device``."""
    from diffusers import UNet2DConditionModel

    folder = training.resolve_zoo_path(path, "load_pipeline_parts")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32,
                                                local_files_only=True)
    unet.to(device).eval().requires_grad_(False)
    return unet, load_frozen_folder(folder).to(device)


#: What decides how a pipeline's latents become images: the parts of its autoencoder :func:`adopt_vae` keeps.
DECODING_PARTS = zvae.HALF_PREFIXES["decoder"]
#: How the pipeline card's line about an adopted autoencoder starts (one such line: the latest adoption's).
_ADOPTED_LINE = "- vae/ replaced on "
#: How the card's line about an adopted autoencoder with another decoder starts (one per adoption: a history).
_DECODER_LINE = "- decoder replaced on "
#: In such a line: the device (and, since 2026-12-06, the dtype) of the re-measure.
_REMEASURED = re.compile(r"re-measured through it on (\S+?)(?: in (fp16|fp32))?[ (]")
#: The metrics a faces-sd card lists (what :func:`export` writes and ``adopt_vae(remeasure=...)`` re-measures).
CARD_METRICS = ("attribute_accuracy", "attribute_accuracy_by_guidance", "attribute_accuracy_per_attribute",
                "classifier_on_renders", "classifier_on_vae_round_trips", "classifier_on_vae_round_trips_per_attribute",
                "caption_agreement", "caption_agreement_per_attribute", "caption_agreement_on_renders",
                "caption_agreement_on_vae_round_trips", "main_guidance", "eval_samples", "eval_ddim_steps",
                "attribute_note")


def _card_status(metrics: Mapping[str, Any]) -> str | None:
    """The card's status line for ``metrics`` (None when they meet the 80 % target)."""
    return training.target_status(
        metrics, f"{metrics.get('attribute_accuracy')} of sampled attributes correct (CFG "
                 f"{metrics.get('main_guidance')}; the classifier scores "
                 f"{metrics.get('classifier_on_vae_round_trips')} on VAE round trips of renders, the ceiling "
                 "this VAE allows)", "0.8", NAME)


def card_eval_settings(card: Mapping[str, str], where: str) -> dict[str, Any]:
    """The :func:`evaluate_folder` settings a card's sample metrics were measured with (its ``main_guidance``,
    ``eval_samples`` and ``eval_ddim_steps``; the defaults where it lacks one), from :func:`training.card_values`;
    ``ValueError`` naming ``where`` for a value that is not a number."""
    try:
        return dict(guidance_scales=(float(card.get("main_guidance", HPARAMS.main_guidance)),),
                    samples=int(card.get("eval_samples", HPARAMS.eval_samples)),
                    steps=int(card.get("eval_ddim_steps", HPARAMS.eval_steps)))
    except ValueError as exc:
        raise ValueError(f"{where}: the card's main_guidance, eval_samples or eval_ddim_steps is not a number "
                         f"({exc}); fix the card or re-export the pipeline") from None


def _precision(device: str) -> str:
    """The dtype :func:`evaluate_folder` samples in on ``device`` (a torch device, or a card's device line: a CUDA
    GPU's name): fp16 on CUDA, fp32 elsewhere."""
    return "fp16" if device.startswith(("cuda", "NVIDIA")) else "fp32"


def _measured_on(card_text: str) -> str:
    """Where a card's sample metrics were measured, as ``DEVICE in DTYPE``: the latest re-measure's (its
    ``- decoder replaced on`` line), else the export's (its evaluation ran on the training device)."""
    for line in reversed(card_text.splitlines()):
        if line.startswith(_DECODER_LINE) and (m := _REMEASURED.search(line)):
            return f"{m.group(1)} in {m.group(2) or _precision(m.group(1))}"
    device = training.card_values(card_text, "Training").get("device", "?")
    return f"{device} in {_precision(device)}"


def adopt_vae(vae: str | os.PathLike = DEFAULT_VAE, pipeline: str | os.PathLike = "zoo:" + NAME, *,
              remeasure: str | None = None, attributes_path: str | os.PathLike = DEFAULT_ATTRIBUTES,
              grid_path: str | os.PathLike | None = None) -> bool:
    """Give the exported pipeline ``pipeline`` the autoencoder ``vae`` (its ``vae/`` files replaced); it must have
    the pipeline's config, ``scaling_factor`` included (the latent space the UNet was trained in).

    When ``vae`` decodes exactly as the pipeline's own (bit-identical ``decoder`` and ``post_quant_conv``: an
    ``--encoder-only`` faces-vae fine-tune), the samples and every sample metric on the card stay as they are;
    only the round trips of images change, which inversion-based edits (DragDiffusion) start from. A dated line
    on the card says so (replacing an earlier adoption's).

    Another decoder (a ``--decoder-only`` fine-tune) changes the samples, so it is refused (``ValueError`` saying
    what differs) unless ``remeasure`` names a device: the card's evaluation (its captions, seed, CFG scale,
    sample and step counts) then runs again through ``vae`` before anything is replaced, the card's sample
    metrics and status are rewritten with the new numbers, and a dated line keeps the old ones (``grid_path``:
    the first of those samples as a PNG grid, as a training run's ``samples.png``). Returns
    ``False`` when the pipeline has these very files already."""
    from safetensors.torch import load_file

    from dragrt.zoo import registry

    src = training.resolve_zoo_path(vae, "adopt_vae")
    dest = training.resolve_zoo_path(pipeline, "adopt_vae") / "vae"
    files = ("config.json", zvae.WEIGHTS_FILE)
    for folder in (src, dest):
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"adopt_vae: {folder} lacks {', '.join(missing)}; expected an exported "
                                    "AutoencoderKL folder")
    if registry.same_files(src, dest):  # the pipeline's own folder included (zoo:faces-vae as an alias)
        return False

    _check_same_vae_config(src, dest, "adopt_vae", "decode the pipeline's latents as before; fine-tune the "
                           "pipeline's UNet on it instead")
    new_w, old_w = load_file(str(src / zvae.WEIGHTS_FILE)), load_file(str(dest / zvae.WEIGHTS_FILE))
    decoding = sorted(k for k in set(new_w) | set(old_w) if k.startswith(DECODING_PARTS))
    changed = [k for k in decoding if k not in new_w or k not in old_w or not torch.equal(new_w[k], old_w[k])]
    card = dest.parent / training.CARD
    card_text = card.read_text() if card.is_file() else None
    remeasured = None
    if not decoding or changed:
        if remeasure is None:
            raise ValueError(f"adopt_vae: {vae} decodes differently from {dest} ({len(changed)} of {len(decoding)} "
                             f"decoder tensors differ, e.g. {changed[:2]}): the pipeline's samples would change; "
                             "re-measure its card through it (remeasure=DEVICE, --remeasure DEVICE) or fine-tune "
                             "the pipeline's UNet on it instead")
        try:
            remeasure_dev = torch.device(remeasure)
        except (RuntimeError, TypeError):
            raise ValueError(f"adopt_vae: remeasure={remeasure!r} is not a device; use e.g. 'cpu' or 'cuda'") from None
        if card_text is None:
            raise FileNotFoundError(f"adopt_vae: {card} is missing; remeasure rewrites the card's sample metrics")
        before = training.card_values(card_text)
        remeasured = evaluate_folder(dest.parent, device=remeasure, attributes_path=attributes_path,
                                     vae=src, progress=True, grid_path=grid_path,
                                     **card_eval_settings(before, f"adopt_vae: {card}"))
    for f in files:  # a new file, then a rename: whoever has the old one memory-mapped keeps reading it intact
        tmp = dest / f"{f}.tmp"
        tmp.write_bytes((src / f).read_bytes())
        os.replace(tmp, dest / f)
    if card_text is None:
        return True
    stamp = f"{time.strftime('%Y-%m-%d')} (commit {training.git_commit()}) by the autoencoder of {vae}"
    # the card says what vae/ is now: an earlier encoder adoption's line no longer holds
    text = "".join(ln for ln in card_text.splitlines(keepends=True) if not ln.startswith(_ADOPTED_LINE))
    if remeasured is None:
        line = (f"{_ADOPTED_LINE}{stamp}: the same decoder and scaling_factor, bit for bit, so the samples and "
                "their metrics above are unchanged; its encoder differs: the round trips of images (what "
                "inversion-based edits start from; the round-trip ceilings above were measured before) are those "
                f"on {vae}'s card\n")
    else:
        shown = ("attribute_accuracy", "classifier_on_vae_round_trips", "caption_agreement")
        was = ", ".join(f"{k} {before.get(k, '?')} -> {remeasured.get(k, '?')}" for k in shown)
        line = (f"{_DECODER_LINE}{stamp}, whose decoder differs: the sample metrics above were re-measured "
                f"through it on {remeasure} in {_precision(str(remeasure_dev))} (`python -m dragrt.zoo.unet "
                f"adopt-vae VAE --remeasure DEVICE`: the card's captions, seed and settings; the numbers before, "
                f"from {_measured_on(text)}): {was}\n")
        text = training.replace_card_metrics(text, {k: remeasured[k] for k in CARD_METRICS if k in remeasured},
                                             _card_status(remeasured))
    at = text.find("\n## Files")
    card.write_text(text + line if at < 0 else text[:at].rstrip("\n") + "\n" + line + text[at:])
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m dragrt.zoo.unet evaluate [FOLDER] [--guidance 3 5 7.5] [--device cpu]``: the attribute accuracy
    (and caption agreement) of an exported faces-sd pipeline (default the shipped one) at each CFG scale.
    ``python -m dragrt.zoo.unet adopt-vae [VAE] [--pipeline FOLDER] [--remeasure DEVICE]``: :func:`adopt_vae`
    (default: the shipped zoo:faces-vae into the shipped zoo:faces-sd)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dragrt.zoo.unet", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="attribute accuracy of samples at each CFG scale")
    ev.add_argument("folder", nargs="?", default="zoo:" + NAME, help="exported pipeline folder or zoo:NAME")
    ev.add_argument("--guidance", type=float, nargs="+", default=[HPARAMS.main_guidance], metavar="SCALE")
    ev.add_argument("--samples", type=int, default=HPARAMS.eval_samples, help="held-out captions (default 256)")
    ev.add_argument("--steps", type=int, default=HPARAMS.eval_steps, help="DDIM steps (default 50)")
    ev.add_argument("--caption-start", type=int, default=0, metavar="I",
                    help=f"first held-out seed of the captions (default 0, the card's; {VALIDATION_START}: the "
                         "validation captions to choose settings on)")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--vae", default=None, metavar="FOLDER",
                    help="decode the samples with this autoencoder instead of the pipeline's (same config; e.g. a "
                         "--decoder-only fine-tune)")
    ad = sub.add_parser("adopt-vae", help="give the pipeline another autoencoder of its config (a new encoder; a new "
                                          "decoder with --remeasure)")
    ad.add_argument("vae", nargs="?", default=DEFAULT_VAE, help="exported AutoencoderKL folder or zoo:NAME")
    ad.add_argument("--pipeline", default="zoo:" + NAME, help="exported pipeline folder or zoo:NAME")
    ad.add_argument("--remeasure", default=None, metavar="DEVICE",
                    help="for another decoder: re-run the card's evaluation through it on DEVICE (cpu: ~9 min) and "
                         "rewrite the card's sample metrics")
    ad.add_argument("--grid", default=None, metavar="PNG", help="with --remeasure: save the first samples there")
    args = parser.parse_args(argv)
    if args.command == "adopt-vae":
        try:
            if args.grid is not None and args.remeasure is None:
                raise ValueError("--grid saves the samples of --remeasure; give --remeasure DEVICE too")
            changed = adopt_vae(args.vae, args.pipeline, remeasure=args.remeasure, grid_path=args.grid)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(str(exc))
        print(f"{args.pipeline}: vae/ is now that of {args.vae}" if changed
              else f"{args.pipeline}: vae/ holds the files of {args.vae} already; nothing to do")
        if changed and str(args.pipeline) == "zoo:" + NAME:
            from dragrt.zoo import registry

            for line in registry.share_identical_report():
                print(line)
        return 0
    try:
        m = evaluate_folder(args.folder, guidance_scales=args.guidance, samples=args.samples, steps=args.steps,
                            device=args.device, caption_start=args.caption_start, progress=True, vae=args.vae)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    keys = ("folder", "vae", "device", "eval_samples", "caption_start", "eval_ddim_steps",
            "attribute_accuracy_by_guidance", "attribute_accuracy_per_attribute", "attribute_confusion",
            "classifier_on_renders",
            "classifier_on_vae_round_trips", "classifier_on_vae_round_trips_per_attribute", "attribute_note",
            "caption_agreement_by_guidance", "caption_agreement_per_attribute",
            "caption_agreement_on_renders", "caption_agreement_on_vae_round_trips", "caption_agreement_note")
    print(json.dumps({k: m[k] for k in keys if k in m}, indent=2))
    return 0


def _hparams_dict(hp: UNetHParams) -> dict[str, Any]:
    d = asdict(hp)
    d["guidance_scales"] = list(hp.guidance_scales)
    return d


@torch.no_grad()
def encode_text(frozen: Frozen, captions: Sequence[str], device: torch.device, autocast) -> torch.Tensor:
    ids = tokenize(frozen.tokenizer, captions).to(device)
    with autocast:
        return frozen.text_encoder(ids).last_hidden_state


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def make_pipeline(unet: UNet2DConditionModel, frozen: Frozen, dtype: torch.dtype):
    """A ``StableDiffusionPipeline`` over copies of the parts in ``dtype`` (DDIM, DragDiffusion's settings)."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = [copy.deepcopy(m) for m in (unet, frozen.vae, frozen.text_encoder)]
    for m in parts:
        nn.Module.to(m, dtype=dtype)
        m.eval().requires_grad_(False)
    pipe = StableDiffusionPipeline(
        vae=parts[1], text_encoder=parts[2], tokenizer=frozen.tokenizer, unet=parts[0],
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, captions: Sequence[str], *, steps: int, guidance: float, seed: int, batch: int,
             size: int, on_chunk: Callable[[int], Any] | None = None,
             negative_prompts: Sequence[str] | None = None) -> torch.Tensor:
    """Images ``[N, 3, size, size]`` in [-1, 1] (float32, on the CPU) for ``captions``, in chunks of ``batch``,
    each chunk's noise from ``torch.Generator(device).manual_seed(seed + chunk index)``; ``on_chunk(n)`` after
    each chunk of ``n`` images (a progress bar's ``update``). ``negative_prompts`` (one a caption; ``None``: the
    empty prompt) replace the unconditional branch of classifier-free guidance, as diffusers'
    ``negative_prompt`` does."""
    if negative_prompts is not None and len(negative_prompts) != len(captions):
        raise ValueError(f"negative_prompts: {len(negative_prompts)} given for {len(captions)} captions; "
                         "give one a caption")
    device = pipe.unet.device
    out = []
    for i in range(0, len(captions), batch):
        gen = torch.Generator(device).manual_seed(seed + i // batch)
        negative = None if negative_prompts is None else list(negative_prompts[i:i + batch])
        images = pipe(prompt=list(captions[i:i + batch]), negative_prompt=negative, num_inference_steps=steps,
                      guidance_scale=guidance, height=size, width=size, generator=gen, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
        if on_chunk is not None:
            on_chunk(images.shape[0])
    return torch.cat(out)


def heldout_captions(n: int, start: int = 0) -> tuple[list[str], torch.Tensor]:
    """The captions of held-out seeds ``start..start+n-1`` and their categorical attributes ``[n, M]`` (no
    rendering)."""
    from dragrt.zoo import world

    params = [world.sample_params(s) for s in world.held_out_seeds(n, start)]
    cats = torch.from_numpy(np.stack([p.categorical() for p in params]))
    return [world.caption(p) for p in params], cats


def heldout_caption_bins(n: int, start: int = 0) -> list[dict[str, str]]:
    """What the captions of held-out seeds ``start..start+n-1`` say of each continuous attribute they describe
    (:func:`dragrt.zoo.world.caption_bins`; ``""``: nothing)."""
    from dragrt.zoo import world

    return [world.caption_bins(world.sample_params(s).attributes()) for s in world.held_out_seeds(n, start)]


@torch.no_grad()
def _read(model: nn.Module, images: torch.Tensor, fields: Sequence[str], batch: int) -> list[torch.Tensor]:
    """``model(images).<field>`` for each of ``fields``, from one pass over batches, on the CPU."""
    p = next(model.parameters())
    parts: list[list[torch.Tensor]] = [[] for _ in fields]
    for i in range(0, len(images), batch):
        out = model(images[i:i + batch].to(p.device, p.dtype))
        for acc, name in zip(parts, fields):
            acc.append(getattr(out, name).float().cpu())
    return [torch.cat(acc) for acc in parts]


def _accuracy(categorical: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    from dragrt.zoo import world

    read, target = categorical.long(), target.long()
    hits = (read == target).float()
    per = {name: round(hits[:, j].mean().item(), 4) for j, name in enumerate(world.CATEGORICAL)}
    # confusion[name][asked][read]: counts, classes in world.CATEGORICAL[name]'s order
    confusion = {}
    for j, (name, classes) in enumerate(world.CATEGORICAL.items()):
        k = len(classes)
        confusion[name] = torch.bincount(target[:, j] * k + read[:, j], minlength=k * k).view(k, k).tolist()
    return {"per_attribute": per, "mean": round(hits.mean().item(), 4), "n": int(hits.shape[0]),
            "confusion": confusion}


def _agreement(continuous: torch.Tensor, target: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    from dragrt.zoo import world

    measured = [world.caption_bins(dict(zip(world.CONTINUOUS, row.tolist()))) for row in continuous]
    per = {name: round(float(np.mean([m[name] == t[name] for m, t in zip(measured, target)])), 4)
           for name in world.CAPTION_BINS}
    return {"per_attribute": per, "mean": round(float(np.mean(list(per.values()))), 4), "n": len(target)}


def attribute_accuracy(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                       batch: int = 64) -> dict[str, Any]:
    """Categorical accuracy of ``model`` (an attribute model: images [-1, 1] -> ``.categorical`` ``[N, M]``)
    on ``images`` against ``target`` ``[N, M]``: per attribute (``world.CATEGORICAL`` order), the mean, and
    ``confusion[attribute][asked][read]`` counts (classes in ``world.CATEGORICAL[attribute]``'s order)."""
    return score(model, images, target, batch=batch)[0]


def caption_agreement(model: nn.Module, images: torch.Tensor, target: Sequence[Mapping[str, str]], *,
                      batch: int = 64) -> dict[str, Any]:
    """How often what an attribute reader measures on ``images`` (``.continuous``, binned by
    :func:`dragrt.zoo.world.caption_bins`) is what their captions say (``target``, from
    :func:`heldout_caption_bins`): per described continuous attribute and the mean. A caption that says nothing
    of an attribute (``""``) asks for its middle range."""
    if images.shape[0] != len(target):
        raise ValueError(f"caption_agreement: {images.shape[0]} images but {len(target)} targets")
    return _agreement(_read(model, images, ("continuous",), batch)[0], target)


def score(model: nn.Module, images: torch.Tensor, target: torch.Tensor,
          bins: Sequence[Mapping[str, str]] | None = None, *, batch: int = 64) -> tuple[dict, dict | None]:
    """:func:`attribute_accuracy` and, with caption ``bins`` (an attribute reader's ``model``),
    :func:`caption_agreement` of ``images``, from one pass of ``model`` over them (``None`` without ``bins``)."""
    if images.shape[0] != target.shape[0]:
        raise ValueError(f"attribute_accuracy: {images.shape[0]} images but {target.shape[0]} targets")
    if bins is not None and images.shape[0] != len(bins):
        raise ValueError(f"caption_agreement: {images.shape[0]} images but {len(bins)} targets")
    if bins is None:
        return _accuracy(_read(model, images, ("categorical",), batch)[0], target), None
    categorical, continuous = _read(model, images, ("categorical", "continuous"), batch)
    return _accuracy(categorical, target), _agreement(continuous, bins)


def _load_attribute_model(path: str | os.PathLike | None, device: torch.device) -> tuple[nn.Module | None, str]:
    if path is None:
        return None, "no attribute model given (smoke run)"
    try:
        from dragrt.zoo.evaluators import load_attribute_model

        return load_attribute_model(path, device), ""
    except (FileNotFoundError, ImportError) as exc:
        return None, f"attribute model unavailable ({type(exc).__name__}: {exc})"


@torch.no_grad()
def evaluate(unet: UNet2DConditionModel, frozen: Frozen, hp: UNetHParams, *,
             attributes_path: str | os.PathLike | None, seed: int = 0,
             grid_path: Path | None = None, caption_start: int = 0, progress: bool = False) -> dict[str, Any]:
    """Sample held-out captions (seeds ``caption_start`` on) through ``StableDiffusionPipeline`` (DDIM
    ``eval_steps``, each CFG scale) and score the samples with the attribute model; see the module docstring.
    ``progress``: a progress bar over the samples of every scale (minutes on a CPU)."""
    from tqdm.auto import tqdm

    device = next(unet.parameters()).device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    captions, target = heldout_captions(hp.eval_samples, caption_start)
    size = hp.image_size
    model, note = _load_attribute_model(attributes_path, device)
    # the continuous attributes captions describe (smile, gaze, ...) need the attribute reader (details model)
    from dragrt.zoo.evaluators import AttributeReader

    bins = heldout_caption_bins(hp.eval_samples, caption_start) if isinstance(model, AttributeReader) else None
    pipe = make_pipeline(unet, frozen, dtype)
    out: dict[str, Any] = {"eval_samples": len(captions), "caption_start": caption_start,
                           "eval_ddim_steps": hp.eval_steps,
                           "guidance_scales": list(hp.guidance_scales), "main_guidance": hp.main_guidance}
    by_scale: dict[str, Any] = {}
    agree_by_scale: dict[str, Any] = {}
    bar = tqdm(total=len(captions) * len(hp.guidance_scales), desc="sampling held-out captions", unit="image",
               disable=not progress)
    for g in hp.guidance_scales:
        bar.set_postfix_str(f"CFG {g}")
        images = generate(pipe, captions, steps=hp.eval_steps, guidance=g, seed=training.mix_seed(seed, 7),
                          batch=hp.eval_batch, size=size, on_chunk=bar.update)
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        if bad:
            out[f"nonfinite_samples_at_{g}"] = bad  # scored as they are (NaN pixels -> 0)
            images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=-1.0)
        if g == hp.main_guidance and grid_path is not None:
            save_grid(images[:hp.grid_samples], grid_path, captions[:hp.grid_samples])
        if model is not None:
            by_scale[str(g)], agree_by_scale[str(g)] = score(model, images, target, bins)
    bar.close()
    if model is None:
        out["attribute_accuracy"] = None
        out["attribute_note"] = f"attribute accuracy skipped: {note}"
        return out
    main = by_scale[str(hp.main_guidance)]
    out.update(attribute_accuracy=main["mean"], attribute_accuracy_per_attribute=main["per_attribute"],
               attribute_confusion=main["confusion"],
               attribute_accuracy_by_guidance={k: v["mean"] for k, v in by_scale.items()},
               attribute_target=0.8, meets_target=main["mean"] >= 0.8)
    # The ceiling: the classifier on the renders of the same captions, and on their VAE round trips.
    renders_u8 = zvae.heldout_images(hp.eval_samples, size, caption_start)
    renders = renders_u8.float() / 127.5 - 1
    on_renders = score(model, renders, target, bins)
    on_round_trips = score(model, zvae.round_trips(frozen.vae, renders_u8), target, bins)
    out["classifier_on_renders"] = on_renders[0]["mean"]
    out["classifier_on_vae_round_trips"] = on_round_trips[0]["mean"]
    out["classifier_on_vae_round_trips_per_attribute"] = on_round_trips[0]["per_attribute"]
    if bins is None:
        out["caption_agreement"] = None
        out["caption_agreement_note"] = ("the continuous attributes captions describe need the attribute reader "
                                         "(zoo:faces-attribute-details installed)")
        return out
    agree = agree_by_scale[str(hp.main_guidance)]
    out.update(caption_agreement=agree["mean"], caption_agreement_per_attribute=agree["per_attribute"],
               caption_agreement_by_guidance={k: v["mean"] for k, v in agree_by_scale.items()},
               caption_agreement_on_renders=on_renders[1]["mean"],
               caption_agreement_on_vae_round_trips=on_round_trips[1]["mean"])
    return out


def save_grid(images: torch.Tensor, path: Path, captions: Sequence[str] | None = None, columns: int = 4) -> Path:
    """A PNG grid of ``images`` ``[N, 3, H, W]`` in [-1, 1] (and the captions beside it as JSON)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = np.full((rows * h, columns * w, 3), 255, np.uint8)
    u8 = zvae.to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = u8[i]
    Image.fromarray(grid).save(path)
    if captions is not None:
        path.with_suffix(".json").write_text(json.dumps(list(captions), indent=2) + "\n")
    return path


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@training.staged_export
def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors) with the EMA UNet, the frozen
    VAE, text tower and tokenizer training used, and DragDiffusion's DDIM scheduler; returns ``dest``."""
    from diffusers import DDIMScheduler

    from dragrt.runtime.models.sd import SDComponents, save_sd_folder

    run_dir, dest = Path(run_dir), Path(dest)
    state = training.load_checkpoint(run_dir)
    if state is None or state.get("name") != NAME:
        raise FileNotFoundError(f"export: {run_dir} has no {NAME} checkpoint; train first")
    frozen = load_frozen_folder(run_dir / FROZEN)
    if abs(frozen.scaling_factor - float(state["scaling_factor"])) > 1e-6:
        raise ValueError(f"export: {run_dir / FROZEN} VAE scaling_factor {frozen.scaling_factor} differs from the "
                         f"one training used ({state['scaling_factor']})")
    unet = build_unet(state["config"])
    unet.load_state_dict(zvae.ema_model_state(unet, state))
    components = SDComponents(unet=unet, vae=frozen.vae, text_encoder=frozen.text_encoder,
                              tokenizer=frozen.tokenizer, scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                              source=str(run_dir))
    components.to(dtype=torch.float16)
    save_sd_folder(components, dest)
    save_text_encoder(frozen.text_encoder, dest / "text_encoder", torch.float16)  # hub key layout
    unet_bytes = (dest / "unet" / UNET_WEIGHTS).stat().st_size
    if unet_bytes > MAX_UNET_BYTES and not state.get("smoke"):
        raise ValueError(f"export: the UNet weights are {unet_bytes} bytes, over the {MAX_UNET_BYTES}-byte budget")
    sizes = {sub: sum(f.stat().st_size for f in (dest / sub).rglob("*") if f.is_file())
             for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    metrics = training.read_metrics(run_dir)
    progress = state["progress"]
    training.write_card(
        dest, name=NAME,
        summary=("Text-to-image latent diffusion in Stable Diffusion 1.5's pipeline shape (diffusers "
                 "StableDiffusionPipeline folder): UNet2DConditionModel with SD1.5's block layout at widths "
                 f"{list(state['config']['block_out_channels'])} ({sum(p.numel() for p in unet.parameters())} "
                 "parameters), the zoo:faces-vae autoencoder, the zoo:faces-clip text tower and tokenizer, "
                 "DDIMScheduler with SD's training schedule. fp16 safetensors; bytes per part: "
                 f"{json.dumps(sizes, sort_keys=True)}, total {sum(sizes.values())}."),
        data=("Faces-world renders and captions (dragrt.zoo.world) streamed from training seeds, encoded on the "
              "fly by the frozen VAE and text tower; evaluation on held-out seeds 2_000_000_000 + i."),
        training={
            "steps": progress["step"], "renders seen": progress["images"], "chunks": progress["chunks"],
            "train seconds": round(progress["seconds"], 1),
            "steps per second": f"{metrics.get('steps_per_second', '?')} (last chunk; " + (
                "the step replayed from one CUDA graph)" if metrics.get("replayed_step") else "eager)"),
            "device": metrics.get("device_name", "?"),
            "commit": metrics.get("commit", "?"), "hparams": json.dumps(state["hparams"], sort_keys=True),
            "started from": ("the UNet of " if state["hparams"].get("init") else "")
                            + training.card_start(state["hparams"]),
            "command": training.card_command(NAME, state["hparams"], (
                f" --lower-face-weight {state['hparams']['lower_face_weight']:g}"
                if state["hparams"].get("lower_face_weight") else "")),
        },
        metrics={k: metrics[k] for k in CARD_METRICS if k in metrics},
        files=["model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"],
        status=_card_status(metrics),
    )
    return dest


__all__ = [
    "DEFAULT_ATTRIBUTES", "DEFAULT_CLIP", "DEFAULT_VAE", "HPARAMS", "NAME", "SMOKE_HPARAMS", "VALIDATION_START",
    "Frozen", "LatentBuffer",
    "UNetHParams", "attribute_accuracy", "build_unet", "diffusion_loss", "evaluate", "export", "generate",
    "heldout_captions", "load_frozen", "load_frozen_folder", "load_text_tower", "make_pipeline", "train",
    "unet_config",
]


if __name__ == "__main__":
    import sys

    sys.exit(main())
