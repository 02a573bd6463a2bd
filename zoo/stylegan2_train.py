"""Trainer ``faces-stylegan2``: our StyleGAN2 generator trained on the toy-faces renders.

``python -m dragrt.zoo.train faces-stylegan2 --run-dir DIR --minutes 8.5 [--export]`` trains (resuming from
``DIR/checkpoint.pt``), evaluates and, with ``--export``, writes the shipped generator in the converter's
format (``generator.safetensors`` + ``generator.json``, read by
:func:`dragrt.runtime.models.stylegan2_convert.load_generator`), a model card and a sample grid.

The recipe is StyleGAN2's (config-e/f as trained by NVIDIA's stylegan2-ada-pytorch, without ADA: the data
are endless, rendered on the fly from seeds, so nothing is memorised and no augmentation is needed):

- generator: :class:`dragrt.runtime.models.stylegan2.Generator` (NVIDIA's parameter names), small:
  z/w 256, 4 mapping layers, ``channel_base`` 8192 and ``channel_max`` 128 (128 channels up to b64,
  64 at b128 -- DragGAN's feature map --, 32 at b256), fp16 with ``conv_clamp`` 256 in the top four
  resolutions on CUDA, as NVIDIA trains; about 2.5 M parameters, 4.9 MB in fp16 (at 128 px,
  :data:`GPU_PRESET_128`: ``channel_max`` 96, batch 32; at 64 px, the CPU run, :data:`CPU_PRESET_64`);
- discriminator: :class:`Discriminator`, StyleGAN2's residual D (FromRGB, residual blocks with FIR-blurred
  stride-2 downsampling, minibatch standard deviation, epilogue), same channel rule and fp16 blocks;
- losses: non-saturating logistic; lazy R1 on reals every 16 steps (``gamma`` 1 at 256 px); lazy path
  length regularisation every 4 steps on half a batch (weight 2, NVIDIA's default) -- it makes the
  generator's ``w`` space smoother, which is what DragGAN optimises. Both differentiate twice; their
  convolutions go through :mod:`dragrt.runtime.models.conv_double_backward` (whose derivatives are plain
  convolutions, as NVIDIA's ``conv2d_gradfix`` makes them), not PyTorch's double backward;
- Adam(betas (0, 0.99), lr 0.0025), with the lazy-regularisation correction of lr and betas;
  style mixing (p 0.9, a crossover point per sample); G EMA with a 10 k image half-life and NVIDIA's
  ramp-up (the half-life is at most 5 % of the images seen, which matters for runs this short);
  NaN/Inf gradients zeroed as NVIDIA does for its fp16 blocks.

Runs are resumable in chunks (each ``train`` call stops on its wall-clock budget, leaving time for the
evaluation). The state is two files, ``checkpoint.pt`` and ``checkpoint_d.pt``, each under 16 MiB (see
:func:`_save`), so a run directory can be copied off a device machine and carried to the next one. An export
ships the discriminator beside the generator (fp16), so that a new run can also continue from the shipped model
itself (``--init zoo:faces-stylegan2``, :func:`shipped_start`) when the run directory is gone: a new session
starts from the repository, not from the last session's ignored folders.
Metrics after every chunk: the Frechet distance between generated samples (truncation 1) and held-out
renders in the attribute classifier's feature space, and the landmark regressor's mean confidence on
samples and on renders (see :func:`evaluate`); in the log and the metrics (``last_chunk_diversity``), how much
the fakes of a batch differ from each other against the reals (:func:`batch_spread`): mode collapse shows there
long before the losses say anything.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dragrt.runtime.models import conv_double_backward as cdb
from dragrt.runtime.models import stylegan2 as sg2
from dragrt.runtime.models.stylegan2 import (
    FullyConnectedLayer,
    Generator,
    GeneratorConfig,
    bias_act,
    setup_filter,
    upfirdn2d,
)
from dragrt.zoo import evaluators, training

NAME = "faces-stylegan2"
#: The 64 px run, sized for a 2-core CPU (the 32 px recipe of CONTRIBUTING.md scaled up one block): narrow
#: networks in fp32, batch 16 (the GAN learns per step), R1 at 5x NVIDIA's heuristic ``2e-4 * res**2 / batch``
#: (20x trained as well as 1x at 32 px), a 1 kimg EMA. ~2.4 steps/s with two threads.
CPU_PRESET_64: dict[str, Any] = dict(resolution=64, z_dim=64, w_dim=64, mapping_layers=4, channel_base=2048,
                                     channel_max=64, num_fp16_res=0, batch_size=16, r1_gamma=0.256,
                                     ema_kimg=1.0, ema_rampup=0.05)
#: The 128 px run, the zoo's next generator (a GPU, ``--cuda-graphs``, in 8.5-minute chunks continued across
#: sessions with ``--init``): NVIDIA's one-GPU auto config at 128 px takes batch 32 (``min(4096 // res, 32)``),
#: and a step at batch 32 learns about as much as one at 64 for half the work (the GAN learns per step:
#: CONTRIBUTING.md); R1 at 5x the heuristic, as at 64 px. ``channel_max`` 96 (96 channels up to b64, 64 at
#: b128) keeps G + D at 5.1 MB in fp16, where 128 would take 8.0 MB: the zoo's 32 MB must also hold the 64 px
#: generator until this one beats it, and a faces-vae that differs from faces-sd's copy (2.5 MB more).
GPU_PRESET_128: dict[str, Any] = dict(resolution=128, channel_max=96, batch_size=32, r1_gamma=0.5)
RESOLUTIONS = (64, 128, 256)
DEFAULT_RESOLUTION = 256
#: Shipped generator files (in ``dest`` of :func:`export`).
GENERATOR_FILE = "generator.safetensors"
GENERATOR_RECORD = "generator.json"
SAMPLES_FILE = "samples.png"
#: The discriminator shipped beside the generator (fp16), so that a later run can continue from the export
#: (``--init``); the editing runtime never loads it.
DISCRIMINATOR_FILE = "discriminator.safetensors"
#: The shipped generator must stay below this many bytes (fp16 weights); the discriminator too.
MAX_GENERATOR_BYTES = 8 * 1024 * 1024
MAX_DISCRIMINATOR_BYTES = 8 * 1024 * 1024
#: TrainConfig fields that fix the networks' shapes: a run started from an export keeps the export's.
ARCHITECTURE_FIELDS = ("resolution", "z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max", "conv_clamp",
                       "mbstd_group", "smoke")
MAX_SAMPLES_PNG_BYTES = 300 * 1024
#: Zoo names of the evaluators (``dragrt.zoo.evaluators``).
ATTRIBUTE_MODEL = "zoo:faces-attributes"
LANDMARK_MODEL = "zoo:faces-landmarks"
EVAL_CACHE = "eval_real.pt"
#: Runs above this resolution also report their metrics at it (keys ``..._64px``): the scale of the 64 px generator
#: shipped until d5c6987 (FD 117, confidence 0.495), whose card numbers a 128 px run's own do not compare with (its
#: renders are sharper), and of the runs of other resolutions that may follow.
COMPARE_RESOLUTION = 64
COMPARED_METRICS = ("frechet_distance_attr", "landmark_conf_samples")
#: The second file of the resumable state (D and the optimizers; ``checkpoint.pt`` holds the rest).
CHECKPOINT_PART = "checkpoint_d.pt"
#: Tensors that stay float32 in the shipped file: the FIR filters (upfirdn2d takes float32 filters only)
#: and ``w_avg`` (truncation lerps it with float32 latents).
FP32_SUFFIXES = ("resample_filter", "w_avg")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a run (stored in the checkpoint; a resumed run keeps it).

    Attributes:
        resolution: image size, 256 (default), 128, or 64 (the CPU run, :data:`CPU_PRESET_64`; any power of two
            >= 8 with ``smoke``).
        z_dim, w_dim: latent sizes; mapping_layers: FC layers of the mapping network.
        channel_base, channel_max: channels of block ``res`` are ``min(channel_base // res, channel_max)``
            in G and D alike.
        num_fp16_res: the top N resolutions of G and D run in fp16 on CUDA (0 = fp32 everywhere).
        conv_clamp: clamp of conv outputs in G and D (NVIDIA: 256 with fp16 blocks).
        batch_size: images per step (a multiple of ``mbstd_group``).
        lr, beta1, beta2: Adam of G and D (before the lazy-regularisation correction).
        r1_gamma, r1_interval: R1 weight (penalty ``gamma / 2 * |grad D(real)|^2``) and lazy interval.
        pl_weight, pl_interval, pl_batch_shrink, pl_decay: path length regularisation (weight 0 = off).
        style_mixing_prob: probability that a sample takes its later styles from a second latent.
        ema_kimg, ema_rampup: G EMA half-life in thousands of images, capped at ``ema_rampup`` x images seen.
        mbstd_group: minibatch-std group size of D.
        total_kimg: stop training after this many thousand real images (the wall-clock budget usually ends
            a chunk first).
        init: the export (folder or ``zoo:`` name) a new run started from (``--init``); ``""``: random weights.
        init_history: what ``init`` was when the run started (:func:`dragrt.zoo.training.describe_start`).
        num_workers: DataLoader workers rendering faces.
        eval_samples, eval_reals: samples and held-out renders for the metrics.
    """

    resolution: int = DEFAULT_RESOLUTION
    z_dim: int = 256
    w_dim: int = 256
    mapping_layers: int = 4
    channel_base: int = 8192
    channel_max: int = 128
    num_fp16_res: int = 4
    conv_clamp: float | None = 256.0
    batch_size: int = 32
    lr: float = 0.0025
    beta1: float = 0.0
    beta2: float = 0.99
    r1_gamma: float = 1.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    style_mixing_prob: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float | None = 0.05
    mbstd_group: int = 4
    total_kimg: float = 25_000.0
    num_workers: int = -1  # -1: zoo.training.default_workers (DRAGRT_ZOO_WORKERS, else cores - 2, at most 14)
    eval_samples: int = 2000
    eval_reals: int = 2000
    smoke: bool = False
    init: str = ""
    init_history: str = ""

    def __post_init__(self) -> None:
        res = self.resolution
        if self.smoke:
            if not (isinstance(res, int) and res >= 8 and res & (res - 1) == 0):
                raise ValueError(f"resolution={res!r} is not allowed; use a power of two >= 8 for a smoke run")
        elif res not in RESOLUTIONS:
            raise ValueError(f"resolution={res!r} is not allowed; choose one of {RESOLUTIONS}")
        for name, lo in (("z_dim", 1), ("w_dim", 1), ("mapping_layers", 1), ("channel_base", 1),
                         ("channel_max", 1), ("num_fp16_res", 0), ("batch_size", 1), ("r1_interval", 1),
                         ("pl_interval", 1), ("pl_batch_shrink", 1), ("mbstd_group", 1), ("num_workers", -1),
                         ("eval_samples", 2), ("eval_reals", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= {lo}"
                                 + (" (-1: automatic)" if name == "num_workers" else ""))
        if self.batch_size % self.mbstd_group:
            raise ValueError(f"batch_size={self.batch_size} is not allowed; use a multiple of mbstd_group="
                             f"{self.mbstd_group}")
        if self.batch_size // self.pl_batch_shrink < 1:
            raise ValueError(f"pl_batch_shrink={self.pl_batch_shrink} is not allowed; use 1 to batch_size")
        for name in ("lr", "ema_kimg", "total_kimg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} is not allowed; use a finite number > 0")
        for name in ("r1_gamma", "pl_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} is not allowed; use a finite number >= 0")
        for name in ("beta1", "beta2", "style_mixing_prob", "pl_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}={v!r} is not allowed; use a number in [0, 1]")
        if self.ema_rampup is not None and not 0.0 < self.ema_rampup <= 1.0:
            raise ValueError(f"ema_rampup={self.ema_rampup!r} is not allowed; use None or a number in (0, 1]")
        if self.conv_clamp is not None and not self.conv_clamp > 0:
            raise ValueError(f"conv_clamp={self.conv_clamp!r} is not allowed; use None or a number > 0")
        self.generator_config()  # the channel rule must give >= 1 channel everywhere

    @classmethod
    def preset(cls, resolution: int | None = None, smoke: bool = False, **overrides: Any) -> TrainConfig:
        """The recommended run at ``resolution`` (256, 128, or 64: the 2-core CPU run), or the tiny test run of
        ``smoke``."""
        if smoke:
            base = dict(resolution=16 if resolution is None else resolution, z_dim=16, w_dim=16, mapping_layers=2,
                        channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=256.0, batch_size=4,
                        r1_interval=2, pl_interval=2, ema_kimg=0.01, num_workers=0, eval_samples=24,
                        eval_reals=24, smoke=True)
        else:
            res = DEFAULT_RESOLUTION if resolution is None else resolution
            presets = {64: CPU_PRESET_64, 128: GPU_PRESET_128}
            base = dict(presets.get(res, {"resolution": res}))
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def generator_config(self) -> GeneratorConfig:
        return GeneratorConfig(
            img_resolution=self.resolution, z_dim=self.z_dim, w_dim=self.w_dim, img_channels=3,
            mapping={"num_layers": self.mapping_layers},
            synthesis={"channel_base": self.channel_base, "channel_max": self.channel_max,
                       "num_fp16_res": self.num_fp16_res, "conv_clamp": self.conv_clamp},
        )


# ---------------------------------------------------------------------------------------------------------
# Discriminator (StyleGAN2 "resnet" architecture)
# ---------------------------------------------------------------------------------------------------------


def _half_supported(device: torch.device) -> bool:
    """fp16 D blocks run in fp16 on CUDA only (as the generator's blocks)."""
    return device.type == "cuda"


class DiscriminatorConv(nn.Module):
    """Equalised-lr convolution of D, optionally downsampling by 2, with bias and activation.

    The weight ``[O, I, k, k]`` is stored as drawn (N(0, 1)) and scaled by ``1 / sqrt(I k k)`` when used.
    Downsampling low-passes with the FIR ``resample_filter`` and then strides: a 3x3 conv pads the blurred
    image so that the stride-2 conv lands on ``H / 2``; a 1x1 conv (the residual skip) blurs and keeps
    every second pixel. ``gain`` scales the output (and the clamp) after the activation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: str = "lrelu", down: int = 1, resample_filter: Sequence[float] = (1, 3, 3, 1),
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        if down not in (1, 2):
            raise ValueError(f"down={down!r} is not allowed; choose 1 or 2")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.down = down
        self.conv_clamp = conv_clamp
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.act_gain = sg2.LRELU_GAIN if activation == "lrelu" else 1.0

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        """``x [N, I, H, W]`` -> ``[N, O, H / down, W / down]`` in the dtype of ``x``."""
        w = (self.weight * self.weight_gain).to(x.dtype)
        pad = self.kernel_size // 2
        if self.down == 1:
            x = cdb.conv2d(x, w, padding=pad)
        else:
            taps = int(self.resample_filter.shape[-1])
            lo, hi = pad + (taps - 1) // 2, pad + (taps - 2) // 2
            if self.kernel_size == 1:
                x = cdb.conv2d(upfirdn2d(x, self.resample_filter, down=2, padding=[lo, hi, lo, hi]), w)
            else:
                x = cdb.conv2d(upfirdn2d(x, self.resample_filter, padding=[lo, hi, lo, hi]), w, stride=2)
        b = None if self.bias is None else self.bias.to(x.dtype)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        return bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """One resolution of the residual D: ``[fromrgb] -> conv0 (3x3) -> conv1 (3x3, down 2)``, plus a
    1x1 downsampling skip without bias; both branches scaled by ``sqrt(1/2)`` and summed.

    The first block (``in_channels == 0``) reads the image through ``fromrgb`` (1x1 conv + lrelu).
    """

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 use_fp16: bool = False, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.resolution = resolution
        self.use_fp16 = use_fp16
        if in_channels == 0:
            self.fromrgb = DiscriminatorConv(img_channels, tmp_channels, 1, conv_clamp=conv_clamp)
        self.conv0 = DiscriminatorConv(tmp_channels, tmp_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = DiscriminatorConv(tmp_channels, out_channels, 3, down=2, conv_clamp=conv_clamp)
        self.skip = DiscriminatorConv(tmp_channels, out_channels, 1, bias=False, activation="linear", down=2)

    def forward(self, x: Tensor | None, img: Tensor) -> Tensor:
        dtype = torch.float16 if self.use_fp16 and _half_supported(img.device) else torch.float32
        x = self.fromrgb(img.to(dtype)) if self.in_channels == 0 else x.to(dtype)
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


def minibatch_stddev(x: Tensor, group_size: int, num_channels: int = 1) -> Tensor:
    """Append ``num_channels`` feature maps holding the standard deviation of the features over groups of
    ``group_size`` samples (averaged over channels and pixels): how varied the batch is, for D to see.

    Sample ``n`` belongs to group ``n % (N / G)``; ``N`` must be a multiple of the group size
    ``G = min(group_size, N)``. ``[N, C, H, W]`` -> ``[N, C + num_channels, H, W]``.
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g or c % num_channels:
        raise ValueError(f"minibatch_stddev: batch {n} must be a multiple of the group size {g} and channels {c} "
                         f"of num_channels {num_channels}")
    y = x.float().reshape(g, -1, num_channels, c // num_channels, h, w)  # [G, M, F, c, H, W]
    y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over the group
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [M, F]
    y = y.reshape(-1, num_channels, 1, 1).repeat(g, 1, h, w)  # [N, F, H, W]
    return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std -> conv 3x3 -> FC (lrelu) -> FC to one logit (float32)."""

    def __init__(self, in_channels: int, resolution: int = 4, mbstd_group: int = 4, mbstd_channels: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.mbstd_group = mbstd_group
        self.mbstd_channels = mbstd_channels
        self.conv = DiscriminatorConv(in_channels + mbstd_channels, in_channels, 3, conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution * resolution, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = minibatch_stddev(x.float(), self.mbstd_group, self.mbstd_channels)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """StyleGAN2's residual discriminator: image ``[N, C, R, R]`` -> logits ``[N]`` (float32).

    Blocks ``b{R}``, ..., ``b8`` each halve the resolution; block ``b{res}`` has ``channels(res)`` channels
    in and ``channels(res / 2)`` out, with ``channels(res) = min(channel_base // res, channel_max)``; the
    epilogue ``b4`` ends in one logit. Blocks at ``res >= fp16_resolution`` (the top ``num_fp16_res``
    resolutions, as in the generator) run in fp16 on CUDA.
    """

    def __init__(self, img_resolution: int, img_channels: int = 3, channel_base: int = 8192, channel_max: int = 128,
                 num_fp16_res: int = 0, conv_clamp: float | None = None, mbstd_group: int = 4) -> None:
        super().__init__()
        log2 = int(math.log2(img_resolution)) if img_resolution >= 4 else 0
        if img_resolution < 8 or 2**log2 != img_resolution:
            raise ValueError(f"img_resolution={img_resolution!r} is not allowed; use a power of two >= 8")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        fp16_resolution = max(2 ** (log2 + 1 - num_fp16_res), 8)

        def channels(res: int) -> int:
            c = min(channel_base // res, channel_max)
            if c < 1:
                raise ValueError(f"channel_base={channel_base} gives 0 discriminator channels at {res}x{res}")
            return c

        for res in self.block_resolutions:
            in_channels = 0 if res == img_resolution else channels(res)
            block = DiscriminatorBlock(in_channels, channels(res), channels(res // 2), res, img_channels,
                                       use_fp16=res >= fp16_resolution, conv_clamp=conv_clamp)
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(channels(4), mbstd_group=mbstd_group, conv_clamp=conv_clamp)

    def forward(self, img: Tensor) -> Tensor:
        sg2._check_shape("img", img, [None, self.img_channels, self.img_resolution, self.img_resolution],
                         "[N, C, H, W]")
        x = None
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x, img)
        return self.b4(x).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# Losses and regularisers
# ---------------------------------------------------------------------------------------------------------


def r1_penalty(discriminator: Callable[[Tensor], Tensor], reals: Tensor) -> tuple[Tensor, Tensor]:
    """R1 gradient penalty: ``|d sum(D(x)) / d x_n|^2`` for every real image ``x_n``.

    The graph is kept (``create_graph``), so ``penalty.mean().backward()`` reaches D's weights.

    Returns:
        ``(penalty [N] float32, logits [N])``.
    """
    reals = reals.detach().requires_grad_(True)
    logits = discriminator(reals)
    (grad,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
    return grad.float().square().sum(dim=list(range(1, grad.ndim))), logits


def batch_spread(images: Tensor) -> Tensor:
    """How different the images of a batch are: the standard deviation over the batch, averaged over
    channels and pixels (0 for identical images). The trainer logs the fakes' spread over the reals' as
    ``diversity``: well below 1 is mode collapse (G ignoring its latents), which the losses alone hide."""
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"batch_spread: images must be [N >= 2, C, H, W]; got {list(images.shape)}")
    return images.detach().float().std(dim=0).mean()


def path_lengths(images: Tensor, ws: Tensor) -> Tensor:
    """Per-sample path length ``sqrt(mean_i |J_i^T y|^2)`` with ``y`` random image-space noise scaled by
    ``1 / sqrt(H W)`` and ``J_i`` the Jacobian of the image w.r.t. style vector ``i`` (StyleGAN2's
    path length regulariser). Graph kept for the backward."""
    noise = torch.randn_like(images) / math.sqrt(images.shape[2] * images.shape[3])
    (grad,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    return grad.float().square().sum(dim=2).mean(dim=1).sqrt()


def mix_styles(generator: Generator, z: Tensor, prob: float) -> Tensor:
    """``ws`` of ``z``, where each sample, with probability ``prob``, takes its styles from a crossover
    index (uniform in ``[1, num_ws)``) on from a second random latent (StyleGAN's mixing regulariser)."""
    ws = generator.mapping(z, None)
    if prob <= 0:
        return ws
    n, num_ws = ws.shape[0], ws.shape[1]
    cut = torch.randint(1, num_ws, [n, 1], device=ws.device)
    cut = torch.where(torch.rand([n, 1], device=ws.device) < prob, cut, torch.full_like(cut, num_ws))
    other = generator.mapping(torch.randn_like(z), None, skip_w_avg_update=True)
    take_other = (torch.arange(num_ws, device=ws.device)[None, :] >= cut)[:, :, None]
    return torch.where(take_other, other, ws)


# ---------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Networks, checkpoint state
# ---------------------------------------------------------------------------------------------------------


def build_networks(cfg: TrainConfig, seed: int) -> tuple[Generator, Discriminator]:
    """G and D initialised from ``seed`` (float32, CPU)."""
    torch.manual_seed(seed)
    gen = Generator.from_config(cfg.generator_config())
    disc = Discriminator(cfg.resolution, 3, channel_base=cfg.channel_base, channel_max=cfg.channel_max,
                         num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp, mbstd_group=cfg.mbstd_group)
    return gen, disc


@dataclass
class ShippedStart:
    """A new run's start from an export (:func:`shipped_start`): its configuration, G (the shipped EMA
    generator, for both G and its EMA), D (``None`` when the export has none: D starts from random weights)
    and the counters of the run that wrote it."""

    config: TrainConfig
    generator: dict[str, Tensor]
    discriminator: dict[str, Tensor] | None
    step: int
    nimg: int
    chunk: int
    train_seconds: float
    pl_mean: float


def shipped_start(init: str | os.PathLike, resolution: int | None = None, smoke: bool = False,
                  config_overrides: Mapping[str, Any] | None = None) -> ShippedStart:
    """Read the export ``init`` (a folder written by :func:`export`, or ``zoo:faces-stylegan2``) as the start
    of a new run. The networks keep the export's shapes (``resolution`` and the :data:`ARCHITECTURE_FIELDS` of
    ``config_overrides`` must agree with it); the training settings may change (``config_overrides``). As
    NVIDIA's ``--resume`` from a network pickle: G, its EMA and D continue, Adam starts afresh, and so do
    this run's chunks of data. Unlike it, G starts from the shipped EMA weights (the raw G is not shipped).
    ``ValueError`` naming ``init`` for anything else."""
    from safetensors.torch import load_file

    from dragrt.runtime.models import stylegan2_convert as conv

    folder = training.resolve_zoo_path(init, "init")
    if not (folder / GENERATOR_RECORD).is_file():
        raise ValueError(f"init={str(init)!r}: {folder} has no {GENERATOR_RECORD}; give a folder written by "
                         "--export (or zoo:faces-stylegan2)")
    shipped = conv.load_generator(folder)
    source = shipped.checkpoint_record.get("source", {})
    if source.get("format") != "dragrt-zoo" or "train_config" not in source:
        raise ValueError(f"init={str(init)!r}: {folder / GENERATOR_RECORD} does not come from this trainer's "
                         "--export (no train_config in its source); a converted checkpoint cannot be trained on")
    cfg = TrainConfig.from_dict(source["train_config"])
    overrides = dict(config_overrides or {})
    if resolution is not None:
        overrides.setdefault("resolution", resolution)
    overrides.setdefault("smoke", smoke)
    clash = sorted(k for k in ARCHITECTURE_FIELDS if k in overrides and overrides[k] != getattr(cfg, k))
    if clash:
        raise ValueError(f"init={str(init)!r} is a {'smoke ' if cfg.smoke else ''}{cfg.resolution} px network; "
                         f"{', '.join(f'{k}={overrides[k]!r}' for k in clash)} would change its shape "
                         f"(its {', '.join(f'{k}={getattr(cfg, k)!r}' for k in clash)}): start a new run without "
                         "init for another architecture")
    history = training.describe_start(init)
    d_path = folder / DISCRIMINATOR_FILE
    disc = None
    if d_path.is_file():
        disc = {k: v.float() for k, v in load_file(str(d_path)).items()}
    else:
        history += "; a new discriminator (the export has none)"
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k not in ARCHITECTURE_FIELDS},
                              init=str(init), init_history=history)
    return ShippedStart(
        config=cfg, generator={k: v.float() for k, v in shipped.state_dict().items()}, discriminator=disc,
        step=int(source.get("steps", 0)), nimg=round(float(source.get("kimg", 0.0)) * 1000),
        chunk=int(source.get("chunks", 1)), train_seconds=float(source.get("train_seconds", 0.0)),
        pl_mean=float(source.get("pl_mean", 0.0)))


def _adam(params: Iterator[nn.Parameter], cfg: TrainConfig, interval: int | None,
          capturable: bool = False) -> torch.optim.Adam:
    """Adam with NVIDIA's lazy-regularisation correction: with a regulariser every ``interval`` steps the
    optimiser steps ``(interval + 1) / interval`` times per minibatch, so lr and betas are rescaled.
    ``capturable``: the step counts stay on the device, so that a step can be replayed from a CUDA graph."""
    ratio = interval / (interval + 1) if interval else 1.0
    return torch.optim.Adam(params, lr=cfg.lr * ratio, betas=(cfg.beta1**ratio, cfg.beta2**ratio), eps=1e-8,
                            capturable=capturable)


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} is not usable here (no CUDA); use 'cpu' (with smoke=True)")
    return dev


def _sanitize_grads(module: nn.Module) -> None:
    """NaN -> 0, +-Inf -> +-1e5 in every gradient (NVIDIA does this for its fp16 blocks). As NVIDIA does it: on
    the gradients flattened into one buffer and copied back (a handful of kernels instead of one per parameter:
    88 in G, 33 in D at 128 px)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
    torch._foreach_copy_(grads, [part.view(g.shape) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


COMPILE_MODES = training.COMPILE_MODES


def _compiled(module: nn.Module, mode: str) -> Callable[..., Tensor]:
    """``module`` compiled with ``mode`` (static shapes); it shares the module's parameters."""
    return torch.compile(module, mode=mode, dynamic=False)


@torch.no_grad()
def _update_ema(g_ema: Generator, gen: Generator, beta: float) -> None:
    """``G_ema <- G_ema + (1 - beta) (G - G_ema)`` for the parameters; buffers (``w_avg``) copied."""
    torch._foreach_lerp_(list(g_ema.parameters()), [p.detach() for p in gen.parameters()], 1.0 - beta)
    for b_ema, b in zip(g_ema.buffers(), gen.buffers()):
        b_ema.copy_(b)


def _ema_beta(cfg: TrainConfig, nimg: int) -> float:
    ema_nimg = cfg.ema_kimg * 1000.0
    if cfg.ema_rampup is not None:
        ema_nimg = min(ema_nimg, nimg * cfg.ema_rampup)
    return 0.5 ** (cfg.batch_size / max(ema_nimg, 1e-8))


# ---------------------------------------------------------------------------------------------------------
# Sampling, sample grid
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(gen: Generator, n: int, seed: int, device: torch.device, batch: int = 64,
             truncation_psi: float = 1.0, noise_mode: str = "const") -> Tensor:
    """``n`` images ``[n, 3, R, R]`` float32 in ``[-1, 1]`` (clamped, on ``device``) from ``z`` drawn by a
    generator seeded with ``seed``."""
    rng = torch.Generator().manual_seed(int(seed))
    z = torch.randn([n, gen.z_dim], generator=rng)
    out = []
    for i in range(0, n, batch):
        img = gen(z[i:i + batch].to(device), None, truncation_psi=truncation_psi, noise_mode=noise_mode)
        out.append(img.float().clamp(-1, 1))
    return torch.cat(out)


def _png_bytes(images: Tensor, columns: int, thumb: int, palette: bool) -> bytes:
    from PIL import Image

    x = images.float().clamp(-1, 1)
    if x.shape[-1] != thumb:
        x = F.interpolate(x, size=(thumb, thumb), mode="area")
    x = ((x + 1) * 127.5).round().to(torch.uint8).cpu()
    rows = (x.shape[0] + columns - 1) // columns
    grid = torch.full([3, rows * thumb, columns * thumb], 255, dtype=torch.uint8)
    for i, im in enumerate(x):
        r, c = divmod(i, columns)
        grid[:, r * thumb:(r + 1) * thumb, c * thumb:(c + 1) * thumb] = im
    pil = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if palette:
        pil = pil.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_sample_grid(gen: Generator, path: str | os.PathLike, device: torch.device, n: int = 16,
                      seed: int = 0, max_bytes: int = MAX_SAMPLES_PNG_BYTES) -> Path:
    """A ``sqrt(n)``-wide grid of samples (truncation 1, const noise) as a PNG of at most ``max_bytes``:
    the largest thumbnails (full size first) that fit in true colour or, failing that, a 256-colour palette."""
    images = generate(gen, n, seed, device).cpu()
    columns = max(1, int(math.ceil(math.sqrt(n))))
    res = images.shape[-1]
    sizes = [s for s in (res, 192, 160, 128, 96, 64, 48, 32) if s <= res] or [res]
    data = b""
    for size in sizes:  # the largest thumbnails that fit, in true colour or else with a 256-colour palette
        for palette in (False, True):
            data = _png_bytes(images, columns, size, palette)
            if len(data) <= max_bytes:
                break
        if len(data) <= max_bytes:
            break
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def _load_evaluators(device: torch.device) -> tuple[Any, Any, list[str]]:
    """``(attribute model or None, landmark model or None, notes)``."""
    notes: list[str] = []
    try:
        from dragrt.zoo import evaluators
    except ImportError as exc:
        return None, None, [f"evaluators unavailable (dragrt.zoo.evaluators: {exc}); metrics skipped"]
    models = []
    for what, loader, name in (("attribute classifier", "load_attribute_model", ATTRIBUTE_MODEL),
                               ("landmark regressor", "load_landmark_model", LANDMARK_MODEL)):
        try:
            model = getattr(evaluators, loader)(name, device)
        except Exception as exc:  # a missing or broken evaluator only skips its metric
            notes.append(f"{what} {name} unavailable ({type(exc).__name__}: {exc}); its metric is skipped")
            model = None
        models.append(model)
    return models[0], models[1], notes


def _model_key(model: Any) -> str:
    """A fingerprint of an evaluator's weights (so cached real-image statistics follow the evaluator)."""
    if not isinstance(model, nn.Module):
        return type(model).__name__
    total = 0.0
    count = 0
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                total += float(t.double().abs().sum())
                count += t.numel()
    return f"{type(model).__name__}:{count}:{total:.9e}"


@torch.no_grad()
def _attribute_features(model: Any, images: Tensor, device: torch.device, batch: int = 100) -> Tensor:
    return torch.cat([model.features(images[i:i + batch].to(device)).float().cpu()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def _landmark_confidence(model: Any, images: Tensor, device: torch.device, batch: int = 100) -> Tensor:
    """Per-image mean landmark confidence ``[N]``."""
    out = []
    for i in range(0, len(images), batch):
        pred = model(images[i:i + batch].to(device))
        conf = pred.confidence  # LandmarkOutput: [N, L] in [0, 1]
        out.append(conf.float().reshape(conf.shape[0], -1).mean(1).cpu())
    return torch.cat(out)


def _held_out_images(n: int, size: int, num_workers: int) -> Tensor:
    """The first ``n`` held-out renders, float32 ``[n, 3, size, size]`` in ``[-1, 1]`` on the CPU."""
    from dragrt.zoo import data

    loader = data.make_loader(min(100, n), num_workers=num_workers, size=size, held_out=n, uint8=True)
    return data.uint8_to_float(torch.cat([b["image"] for b in loader])[:n])


def evaluate(g_ema: Generator, cfg: TrainConfig, device: torch.device, run_dir: Path | None = None,
             seed: int = 0, resolution: int | None = None) -> dict[str, Any]:
    """Metrics of the EMA generator against held-out renders.

    ``resolution`` (default: the generator's) compares at a lower resolution: the samples are area-downsampled
    to it and the renders drawn at it, so that generators of different resolutions can be ranked on one scale
    (the metrics of a 128 px generator at 64 px against a 64 px one's). The metrics' names do not change;
    ``eval_resolution`` records it.

    - ``frechet_distance_attr``: Frechet distance between ``eval_samples`` samples (truncation 1, const noise,
      ``z`` seeded by ``seed``) and the first ``eval_reals`` held-out renders, both in the attribute
      classifier's feature space (``features(images)``). The renders' features are cached in
      ``run_dir/eval_real.pt`` (``eval_real_<R>px.pt`` at a lower ``resolution``; keyed by the evaluator's
      weights, the count and the resolution).
    - ``landmark_conf_samples`` / ``landmark_conf_renders``: the landmark regressor's mean per-landmark
      confidence on the samples and on the renders.

    A missing evaluator skips its metric with a note in ``eval_notes``.
    """
    return _evaluate_at(g_ema, cfg, device, run_dir, seed, [cfg.resolution if resolution is None else resolution])[0]


def _evaluate_at(g_ema: Generator, cfg: TrainConfig, device: torch.device, run_dir: Path | None, seed: int,
                 resolutions: Sequence[int]) -> list[dict[str, Any]]:
    """:func:`evaluate` at each of ``resolutions``, from one load of the evaluators and one batch of samples."""
    t0 = time.monotonic()
    for res in resolutions:
        if isinstance(res, bool) or not isinstance(res, int) or not 16 <= res <= cfg.resolution or res & (res - 1):
            raise ValueError(f"resolution={res!r} is not allowed; use a power of two from 16 to the generator's "
                             f"{cfg.resolution}")
    attr, lm, notes = _load_evaluators(device)
    samples = None
    if attr is not None or lm is not None:
        g_ema.eval()
        samples = generate(g_ema, cfg.eval_samples, seed=1_000_003 + seed, device=device)
    results = []
    for res in resolutions:
        out: dict[str, Any] = {"eval_samples": cfg.eval_samples, "eval_reals": cfg.eval_reals, "eval_resolution": res}
        if samples is not None:
            out.update(_metrics_at(samples, attr, lm, cfg, device, run_dir, res))
        out["eval_notes"] = notes
        out["eval_seconds"] = round(time.monotonic() - t0, 1)  # the first includes the shared loading and sampling
        t0 = time.monotonic()
        results.append(out)
    return results


def _metrics_at(samples: Tensor, attr: Any, lm: Any, cfg: TrainConfig, device: torch.device, run_dir: Path | None,
                res: int) -> dict[str, float]:
    """The metrics of :func:`evaluate` at ``res``: ``samples`` area-downsampled to it, renders drawn at it (their
    statistics cached in ``run_dir``)."""
    key = f"{_model_key(attr)}|{_model_key(lm)}|{cfg.eval_reals}|{res}"
    cache_name = EVAL_CACHE if res == cfg.resolution else f"eval_real_{res}px.pt"
    cache_path = None if run_dir is None else Path(run_dir) / cache_name
    cached = torch.load(cache_path, weights_only=True) if cache_path is not None and cache_path.is_file() else None
    if cached is not None and cached.get("key") == key:
        real_feats, real_conf = cached.get("features"), cached.get("confidence")
    else:
        reals = _held_out_images(cfg.eval_reals, res, training.default_workers(cfg.num_workers, cap=14))
        real_feats = real_conf = None
        if attr is not None:
            real_feats = _attribute_features(attr, reals, device)
        if lm is not None:
            real_conf = _landmark_confidence(lm, reals, device)
        if cache_path is not None:
            torch.save({"key": key, "features": real_feats, "confidence": real_conf}, cache_path)
    if res != samples.shape[-1]:
        samples = F.interpolate(samples, size=(res, res), mode="area")
    out = {}
    if attr is not None:
        fake_feats = _attribute_features(attr, samples, device)
        out["frechet_distance_attr"] = float(f"{evaluators.frechet_distance(fake_feats, real_feats):.6g}")
    if lm is not None:
        out["landmark_conf_samples"] = float(f"{float(_landmark_confidence(lm, samples, device).mean()):.5g}")
        out["landmark_conf_renders"] = float(f"{float(real_conf.mean()):.5g}")
    return out


def _run_metrics(g_ema: Generator, cfg: TrainConfig, device: torch.device, run_dir: Path, seed: int) -> dict[str, Any]:
    """A run's metrics (:func:`evaluate`), and above :data:`COMPARE_RESOLUTION` the :data:`COMPARED_METRICS` at it
    too (``<name>_64px``), from the same samples."""
    if cfg.resolution <= COMPARE_RESOLUTION:
        return evaluate(g_ema, cfg, device, run_dir, seed=seed)
    metrics, low = _evaluate_at(g_ema, cfg, device, run_dir, seed, [cfg.resolution, COMPARE_RESOLUTION])
    metrics.update({f"{k}_{COMPARE_RESOLUTION}px": low[k] for k in COMPARED_METRICS if k in low})
    metrics["eval_seconds"] = round(metrics["eval_seconds"] + low["eval_seconds"], 1)
    return metrics


def evaluate_run(run_dir: str | os.PathLike, device: str = "cuda", seed: int = 0) -> dict[str, Any]:
    """Evaluate the EMA generator of an existing run (e.g. once the evaluators are shipped) and merge the
    metrics into ``run_dir/metrics.json``; a later ``export`` puts them on the model card."""
    run_dir = Path(run_dir)
    ckpt = training.load_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"run_dir={str(run_dir)!r} has no {training.CHECKPOINT}; train first")
    dev = _device(device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    g_ema = Generator.from_config(cfg.generator_config())
    g_ema.load_state_dict(ema_state_dict(ckpt))
    g_ema = g_ema.to(dev).eval().requires_grad_(False)
    metrics = {**training.read_metrics(run_dir), **_run_metrics(g_ema, cfg, dev, run_dir, seed)}
    metrics["samples_png"] = str(write_sample_grid(g_ema, run_dir / SAMPLES_FILE, dev, seed=seed))
    training.write_metrics(run_dir, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _endless(loader: Any) -> Iterator[Tensor]:
    while True:
        for batch in loader:
            yield batch["image"]


def _default_reals(cfg: TrainConfig, seed: int, epoch: int, device: torch.device) -> Iterator[Tensor]:
    """The rendered training stream keyed by ``(seed, epoch)``: uint8 batches (4x less to move from the
    workers and to the device; converted to ``[-1, 1]`` there)."""
    from dragrt.zoo import data

    workers = training.default_workers(cfg.num_workers, cap=14)
    loader = data.make_loader(cfg.batch_size, seed=seed, num_workers=workers, size=cfg.resolution,
                              epoch=epoch, uint8=True, pin_memory=device.type == "cuda")
    return _endless(loader)


def _load_images(out: Tensor, batch: Tensor) -> None:
    """A uint8 (0..255) or float ([-1, 1]) image batch into ``out`` (float32 ``[-1, 1]``, on its device, in place:
    the static buffer every part of an iteration reads)."""
    out.copy_(batch.to(out.device, non_blocking=True))
    if batch.dtype == torch.uint8:
        out.div_(127.5).sub_(1.0)


def _log(msg: str) -> None:
    print(f"[{NAME}] {msg}", file=sys.stderr, flush=True)


def train(run_dir: str | os.PathLike, *, minutes: float, device: str = "cuda", seed: int = 0, smoke: bool = False,
          resolution: int | None = None, max_steps: int | None = None, evaluate_metrics: bool = True,
          config_overrides: Mapping[str, Any] | None = None, reals: Iterator[Tensor] | None = None,
          compile_mode: str | None = None, cuda_graphs: bool = False,
          channels_last: bool = False, init: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or resume) the faces StyleGAN2 in ``run_dir`` for at most ``minutes`` of wall-clock time.

    Args:
        run_dir: checkpoint, metrics, cached evaluation statistics and the sample grid.
        minutes: budget of this call, evaluation included (training stops early enough to evaluate).
        device: torch device ('cuda' for real runs).
        seed: initialisation, latents and data stream (the stream also depends on the chunk number, so a
            resumed run sees new faces).
        smoke: tiny networks, batch 4, a few CPU steps (tests).
        resolution: 256 (default), 128 or 64 for a new run; a resumed run keeps its own (a different value is an
            error).
        max_steps: stop this call after this many steps (tests; ``None`` = budget only).
        evaluate_metrics: compute the metrics (:func:`evaluate`) at the end.
        config_overrides: :class:`TrainConfig` fields for a new run (on resume they must match the run's).
        reals: batches ``[B, 3, R, R]`` (float in ``[-1, 1]`` or uint8) instead of the rendered stream (tests).
        compile_mode: ``torch.compile`` mode (:data:`COMPILE_MODES`) of G's synthesis and of D in the main
            G and D steps (the lazy R1 and path-length steps need double backward and stay eager); ``None``:
            eager throughout. Not part of the run (a resumed chunk may choose differently): eager, a step is
            bound by dispatching ~30 k small ops from Python (measured ~0.5 s per step on an H200 at 256 px
            for a 2.5 TFLOP step), which is what compiling and CUDA graphs remove.
        cuda_graphs: replay each part of an iteration (the G step, the D step, the path-length and R1 steps)
            from a CUDA graph, captured on its second use (:class:`training.ReplayedStep`): the same work without
            launching ~30 k kernels from Python every iteration. CUDA only; combines with ``compile_mode``
            ``'default'`` or ``'max-autotune-no-cudagraphs'`` (``'reduce-overhead'`` makes graphs of its own).
            Not part of the run, like ``compile_mode``.
        channels_last: G's and D's convolution weights and the real batch in channels-last (NHWC) memory, so that
            cuDNN runs NHWC kernels without converting layouts. Measured on an H200 at 128 px, batch 64, graphed,
            NCHW: 161 ms of GPU time a step, 6% of it in cuDNN's NCHW<->NHWC conversions and 44% in an sm80
            "indexed" implicit-GEMM convolution. Same maths; not part of the run (a resumed chunk may choose).
        init: start a new run from an export (a folder written by :func:`export`, or ``zoo:faces-stylegan2``)
            instead of random weights: its networks, counters and configuration (``config_overrides`` may change
            the training settings, not the shapes); see :func:`shipped_start`. A new run only.

    Returns:
        The metrics (also written to ``run_dir/metrics.json``).
    """
    budget = training.Budget(minutes)
    training.check_compile_mode(compile_mode)
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps={max_steps!r} is not allowed; use None or an integer >= 0")
    dev = _device(device)
    training.check_cuda_graphs(cuda_graphs, compile_mode, dev)
    if not isinstance(channels_last, bool):
        raise ValueError(f"channels_last must be True or False, got {channels_last!r}")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = training.load_checkpoint(run_dir, map_location="cpu")
    start = None
    if ckpt is not None:
        training.refuse_init_on_resume(run_dir, init is not None)
        cfg = TrainConfig.from_dict(ckpt["config"])
        if resolution is not None and resolution != cfg.resolution:
            raise ValueError(f"resolution={resolution} does not match the run in {run_dir} ({cfg.resolution} px); "
                             "use another --run-dir for another resolution")
        if smoke != cfg.smoke:
            raise ValueError(f"smoke={smoke} does not match the run in {run_dir} (smoke={cfg.smoke})")
        stored = cfg.to_dict()
        differ = sorted(k for k, v in dict(config_overrides or {}).items() if k not in stored or stored[k] != v)
        if differ:
            raise ValueError(f"config_overrides {', '.join(differ)} differ from the run in {run_dir}; a resumed run "
                             "keeps its configuration (use another --run-dir)")
    elif init is not None:
        start = shipped_start(init, resolution, smoke, config_overrides)
        cfg = start.config
    else:
        cfg = TrainConfig.preset(resolution, smoke, **dict(config_overrides or {}))

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    gen, disc = build_networks(cfg, seed)
    g_ema = copy.deepcopy(gen).eval().requires_grad_(False)
    gen.train().requires_grad_(True)
    disc.train().requires_grad_(True)
    opt_g = _adam(gen.parameters(), cfg, cfg.pl_interval if cfg.pl_weight > 0 else None, cuda_graphs)
    opt_d = _adam(disc.parameters(), cfg, cfg.r1_interval if cfg.r1_gamma > 0 else None, cuda_graphs)
    step, nimg, chunk = 0, 0, 0
    pl_mean = torch.zeros([])
    train_seconds = 0.0
    eval_seconds_last: float | None = None
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        part = _load_part(run_dir, ckpt)
        gen.load_state_dict(ckpt["G"])
        g_ema.load_state_dict(ema_state_dict(ckpt))
        disc.load_state_dict(part["D"])
        opt_g.load_state_dict(_expand_adam(part["opt_G"]))
        opt_d.load_state_dict(_expand_adam(part["opt_D"]))
        step, nimg, chunk = int(ckpt["step"]), int(ckpt["nimg"]), int(ckpt["chunk"]) + 1
        pl_mean = ckpt["pl_mean"].float()
        train_seconds = float(ckpt["train_seconds"])
        eval_seconds_last = ckpt.get("eval_seconds_last")
        history = list(ckpt.get("history", []))
    elif start is not None:
        for m in (gen, g_ema):
            m.load_state_dict(start.generator)
        if start.discriminator is not None:
            disc.load_state_dict(start.discriminator)
        step, nimg, chunk = start.step, start.nimg, start.chunk
        pl_mean = torch.tensor(start.pl_mean)
        train_seconds = start.train_seconds
    for m in (gen, disc, g_ema):
        m.to(dev, memory_format=layout)  # (only 4-D tensors, the convolution weights, change layout)
    for opt in (opt_g, opt_d):  # optimizer state follows its parameters (capturable: the step count too; layout)
        for group in opt.param_groups:
            group["capturable"] = cuda_graphs  # a loaded state brings the saving chunk's choice
        for state in opt.state.values():
            for k, v in state.items():
                if isinstance(v, Tensor) and k != "step":
                    state[k] = v.to(dev, memory_format=layout) if v.dim() == 4 else v.to(dev)
                elif isinstance(v, Tensor) and cuda_graphs:
                    state[k] = v.to(dev, torch.float32)
    pl_mean = pl_mean.to(dev)
    # Latents and noise: a stream per chunk, so a resumed run continues with fresh randomness.
    torch.manual_seed(seed * 1_000_003 + chunk)
    if reals is None:
        reals = _default_reals(cfg, seed, chunk, dev)

    # Leave room for the evaluation and the final checkpoint: the last chunk's measured time, with margin.
    if evaluate_metrics and not cfg.smoke:
        reserve = 1.3 * eval_seconds_last + 15.0 if eval_seconds_last is not None else 45.0
    else:
        reserve = 0.0
    train_limit = max(budget.seconds - reserve, 0.0)
    batch, pl_batch = cfg.batch_size, max(1, cfg.batch_size // cfg.pl_batch_shrink)
    r1_on, pl_on = cfg.r1_gamma > 0, cfg.pl_weight > 0
    sums = {k: torch.zeros([], device=dev)
            for k in ("loss_G", "loss_D", "r1", "pl", "D_real", "D_fake", "spread_fake", "spread_real")}
    counts = dict.fromkeys(sums, 0)
    logged = {k: (0.0, 0) for k in sums}  # (sum, count) at the last log line: each line averages its own window
    nonfinite = torch.zeros([], device=dev)
    start_step, start_nimg = step, nimg
    t_start = time.monotonic()
    t_log = t_ckpt = t_start
    how = "resuming" if ckpt else f"starting from {cfg.init_history}" if start else "starting"
    _log(f"{how} at step {step} ({nimg / 1000:.1f} kimg), chunk {chunk}, "
         f"{cfg.resolution} px, batch {batch}, device {dev}, budget {budget.seconds:.0f} s "
         f"(training {train_limit:.0f} s)")

    synthesis, disc_main = gen.synthesis, disc  # eager modules: what the lazy regularisers use
    if compile_mode is not None:
        synthesis, disc_main = _compiled(gen.synthesis, compile_mode), _compiled(disc, compile_mode)

    def run_g(n: int, synth: Callable[..., Tensor] = synthesis) -> tuple[Tensor, Tensor]:
        z = torch.randn([n, cfg.z_dim], device=dev)
        ws = mix_styles(gen, z, cfg.style_mixing_prob)
        return synth(ws, noise_mode="random"), ws

    accumulated: list[str] = []  # the names the part being run eagerly accumulates

    def accumulate(name: str, value: Tensor) -> None:  # in place: a captured step adds to the same tensors
        value = value.detach().float()
        nonfinite.add_((~torch.isfinite(value)).float())
        sums[name].add_(torch.nan_to_num(value))
        accumulated.append(name)

    # Every iteration: the G step and the D step, plus the lazy regularisers every pl_interval / r1_interval
    # steps. Each part reads the real batch from one static buffer and updates its state in place, so that it
    # can be replayed from a CUDA graph (``cuda_graphs``).
    real = torch.empty([batch, 3, cfg.resolution, cfg.resolution], device=dev).contiguous(memory_format=layout)

    def g_main() -> None:  # G: non-saturating loss
        disc.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        fake, _ = run_g(batch)
        loss_g = F.softplus(-disc_main(fake)).mean()
        loss_g.backward()
        _sanitize_grads(gen)
        opt_g.step()
        accumulate("loss_G", loss_g)
        if batch > 1:
            accumulate("spread_fake", batch_spread(fake))
            accumulate("spread_real", batch_spread(real))

    # The lazy regularisers differentiate twice: their convolutions take the path whose derivatives are plain
    # convolutions again (conv_double_backward; PyTorch's own double backward runs slow fallback kernels).
    def g_pl() -> None:  # G: lazy path length regularisation
        opt_g.zero_grad(set_to_none=True)
        with cdb.enabled():
            fake, ws = run_g(pl_batch, gen.synthesis)
            lengths = path_lengths(fake, ws)
            pl_mean.copy_(pl_mean.lerp(torch.nan_to_num(lengths.mean().detach()), cfg.pl_decay))
            penalty = (lengths - pl_mean).square().mean()
            (penalty * cfg.pl_weight * cfg.pl_interval).backward()
        _sanitize_grads(gen)
        opt_g.step()
        accumulate("pl", penalty)

    def d_main() -> None:  # D: logistic loss on fakes and reals
        disc.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake, _ = run_g(batch)
        logits_fake = disc_main(fake)
        logits_real = disc_main(real)
        loss_d = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
        loss_d.backward()
        _sanitize_grads(disc)
        opt_d.step()
        accumulate("loss_D", loss_d)
        accumulate("D_real", logits_real.mean())
        accumulate("D_fake", logits_fake.mean())

    def d_r1() -> None:  # D: lazy R1 on reals
        disc.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        with cdb.enabled():
            penalty, _ = r1_penalty(disc, real)
            (penalty.mean() * (cfg.r1_gamma / 2) * cfg.r1_interval).backward()
        _sanitize_grads(disc)
        opt_d.step()
        accumulate("r1", penalty.mean())

    def clear_grads() -> None:
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)

    def fallback(what: str) -> Callable[[str], None]:
        return lambda err: _log(f"CUDA-graph capture of the {what} failed ({err}); it runs eagerly from now on")

    parts = {what: training.ReplayedStep(fn, cuda_graph=cuda_graphs, device=dev, before_capture=clear_grads,
                                         on_fallback=fallback(what))
             for what, fn in (("G step", g_main), ("path-length step", g_pl), ("D step", d_main), ("R1 step", d_r1))}
    # What each part accumulates, learnt from its first call (always eager): a replay adds on the device only.
    part_names: dict[str, tuple[str, ...]] = {}

    def run_part(what: str) -> None:
        accumulated.clear()
        parts[what]()
        names = part_names.setdefault(what, tuple(accumulated))
        for name in names:
            counts[name] += 1

    while nimg < cfg.total_kimg * 1000:
        if max_steps is not None and step - start_step >= max_steps:
            break
        if step > start_step and budget.elapsed >= train_limit:
            break
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are dead
        incoming = next(reals)
        if incoming.shape != real.shape:
            raise ValueError(f"real batch has shape {list(incoming.shape)}; expected [{batch}, 3, {cfg.resolution}, "
                             f"{cfg.resolution}]")
        _load_images(real, incoming)
        run_part("G step")
        if pl_on and step % cfg.pl_interval == 0:
            run_part("path-length step")
        run_part("D step")
        if r1_on and step % cfg.r1_interval == 0:
            run_part("R1 step")

        step += 1
        nimg += batch
        _update_ema(g_ema, gen, _ema_beta(cfg, nimg))

        now = time.monotonic()
        if now - t_log >= (5.0 if cfg.smoke else 30.0):
            t_log = now
            done = (nimg - start_nimg) / 1000
            rate = (now - t_start) / max(done, 1e-9)
            totals = {k: (float(v), counts[k]) for k, v in sums.items()}  # one device read per accumulator
            means = {k: (t - logged[k][0]) / (n - logged[k][1]) for k, (t, n) in totals.items() if n > logged[k][1]}
            logged = totals
            losses = " ".join(f"{k} {v:.3f}" for k, v in means.items() if not k.startswith("spread_"))
            _log(f"step {step} kimg {nimg / 1000:.1f} ({rate:.1f} s/kimg) {losses} "
                 f"diversity {_diversity(means):.3f} elapsed {budget.elapsed:.0f} s")
        if now - t_ckpt >= 180.0 and not cfg.smoke:
            t_ckpt = now
            _save(run_dir, cfg, gen, disc, g_ema, opt_g, opt_d, step, nimg, chunk, pl_mean,
                  train_seconds + now - t_start, eval_seconds_last, history, seed)

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    chunk_train_seconds = time.monotonic() - t_start
    train_seconds += chunk_train_seconds
    chunk_kimg = (nimg - start_nimg) / 1000
    summary = {k: round(float(sums[k]) / counts[k], 5) for k in sums if counts[k]}
    chunk_record = {"chunk": chunk, "steps": step - start_step, "kimg": round(chunk_kimg, 3),
                    "train_seconds": round(chunk_train_seconds, 1), **summary}
    history.append(chunk_record)
    _save(run_dir, cfg, gen, disc, g_ema, opt_g, opt_d, step, nimg, chunk, pl_mean, train_seconds,
          eval_seconds_last, history, seed)

    metrics: dict[str, Any] = {
        "name": NAME,
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "steps": step,
        "kimg": round(nimg / 1000, 3),
        "chunks": chunk + 1,
        "device": str(dev),
        "device_name": training.device_name(dev),
        "train_seconds_total": round(train_seconds, 1),
        "chunk_train_seconds": round(chunk_train_seconds, 1),
        "chunk_kimg": round(chunk_kimg, 3),
        "sec_per_kimg": round(chunk_train_seconds / chunk_kimg, 3) if chunk_kimg > 0 else None,
        "nonfinite_losses": int(float(nonfinite)),
        "pl_mean": round(float(pl_mean), 5),
        "generator_params": sum(p.numel() for p in g_ema.state_dict().values()),
        "compile_mode": compile_mode,
        "cuda_graphs": cuda_graphs,
        "channels_last": channels_last,
        "replayed_parts": sorted(what for what, ps in parts.items() if ps.graph is not None),
        "config": cfg.to_dict(),
        **{f"last_chunk_{k}": v for k, v in summary.items()},
    }
    if "spread_fake" in summary:
        metrics["last_chunk_diversity"] = round(_diversity(summary), 4)
    if evaluate_metrics:
        t_eval = time.monotonic()
        try:
            metrics.update(_run_metrics(g_ema, cfg, dev, run_dir, seed))
            metrics["samples_png"] = str(write_sample_grid(g_ema, run_dir / SAMPLES_FILE, dev, seed=seed))
        except Exception as exc:  # the chunk's training is saved already; report the failure, keep the run
            metrics["eval_error"] = f"{type(exc).__name__}: {exc}"
            _log(f"evaluation failed: {metrics['eval_error']}")
        eval_seconds_last = time.monotonic() - t_eval
        _save(run_dir, cfg, gen, disc, g_ema, opt_g, opt_d, step, nimg, chunk, pl_mean, train_seconds,
              eval_seconds_last, history, seed)
    metrics["wall_seconds"] = round(budget.elapsed, 1)
    training.write_metrics(run_dir, metrics)
    _log(f"done: step {step}, {nimg / 1000:.1f} kimg, {budget.elapsed:.0f} s; "
         + ", ".join(f"{k} {metrics[k]}" for k in ("frechet_distance_attr", "landmark_conf_samples",
                                                    "landmark_conf_renders") if k in metrics))
    return metrics


def _card_command(cfg: TrainConfig, device: str = "cuda") -> str:
    """The command that trains a run like ``cfg``'s on ``device`` (the trainer's own CLI: it takes the
    resolution; a CPU has no 10-minute limit per call, so its chunks are longer)."""
    if cfg.smoke:
        init = f", init={cfg.init!r}" if cfg.init else ""
        return f"dragrt.zoo.stylegan2_train.train(RUN, minutes=M, device='cpu', smoke=True{init}) (a test run)"
    preset = TrainConfig.preset(cfg.resolution)
    settings = f" --batch {cfg.batch_size}" if cfg.batch_size != preset.batch_size else ""
    settings += f" --r1-gamma {cfg.r1_gamma:g}" if cfg.r1_gamma != preset.r1_gamma else ""
    start = f" --init {cfg.init}" if cfg.init else ""
    again = ", without --init" if start else ""
    if device == "cpu":
        how = f"--device cpu --minutes 55 (repeated{again})"
    else:
        how = f"--minutes 8.5 (repeated{again}; --cuda-graphs or --compile MODE only change the speed)"
    return (f"python -m dragrt.zoo.stylegan2_train --run-dir RUN --resolution {cfg.resolution}{settings}{start} {how} "
            "--export DEST")


def _draggan_note(resolution: int) -> str:
    """How DragGAN's defaults run on a generator under 256 px (the runtime's own rules, :mod:`dragrt.runtime.drag`)."""
    from dragrt.runtime import drag

    r1, r2 = drag.draggan_pixel_radii(resolution)
    ref1, ref2 = drag.draggan_radii(resolution)
    return (f"DragGAN on this model keeps 256 px's radii, {r1} and {r2} px, where the reference's would shrink to "
            f"{ref1} and {ref2} px (`dragrt.runtime.drag.draggan_default_radii`), and takes its features from "
            f"b{drag.draggan_feature_resolution(resolution)}, half the image as DragGAN's b128 is at 256 px "
            "(`DragGANConfig.feature_resolution`).")


def _card_status(cfg: TrainConfig, name: str = NAME) -> str | None:
    """The card's status of a run below the resolution the zoo issue asks for (256 px, or 128 px if 256 px does not
    reach quality within the budget), of a 128 px run (that fallback, said as such), or of one exported beside the
    demo's model (zoo model ``name`` other than :data:`NAME`: a run still in training)."""
    if cfg.smoke:
        return None
    parts = []
    if cfg.resolution == 128:
        parts.append(
            "**128 px**, the zoo issue's fallback from 256 px: the device machine lends 30 minutes a session, "
            "and a 256 px generator was not trained within that budget. The same command with `--resolution 256` "
            f"(the trainer's default) trains one. {_draggan_note(cfg.resolution)}")
    if cfg.resolution < 128:
        parts.append(
            f"**Below target:** {cfg.resolution} px, where the zoo asks for 256 px (128 px if 256 px does not "
            "reach quality within the budget). A provisional model, so that `dragrt demo` drags a trained "
            f"StyleGAN2 rather than the procedural discs. {_draggan_note(cfg.resolution)} A 128 or "
            "256 px run on a GPU (the same command with `--resolution 128`, no `--device cpu`) replaces it.")
    if name != NAME:
        parts.append(
            f"**In training:** a run continued chunk by chunk across sessions (`python -m "
            f"dragrt.zoo.stylegan2_train --run-dir RUN --init zoo:{name} --cuda-graphs --minutes 8.5 --export "
            f"zoo/weights/{name}`, a new RUN each session), shipped so that it can be continued. `dragrt demo` "
            f"keeps zoo:{NAME} until this one draws better faces; `dragrt demo --model zoo:{name}` drags it now.")
    return "\n\n".join(parts) or None


def _diversity(means: Mapping[str, float]) -> float:
    """The fakes' batch spread over the reals' (:func:`batch_spread`; ``nan`` before any step)."""
    fake, real = means.get("spread_fake", math.nan), means.get("spread_real", math.nan)
    return fake / real if real > 0 else math.nan


def _compact_adam(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Adam's state as saved: the second moments in bfloat16 (their precision only scales the steps by
    ~0.4 %), the first moments only when ``beta1 > 0`` (with ``beta1 = 0`` they are the last gradient,
    overwritten by the next step: dropping them is exact)."""
    sd = opt.state_dict()
    keep_first = any(g["betas"][0] > 0 for g in sd["param_groups"])
    state = {}
    for i, st in sd["state"].items():
        entry = {"step": torch.as_tensor(st["step"]).detach().cpu().float(),
                 "exp_avg_sq": st["exp_avg_sq"].detach().to("cpu", torch.bfloat16)}
        if keep_first:
            entry["exp_avg"] = st["exp_avg"].detach().to("cpu", torch.bfloat16)
        state[i] = entry
    return {"state": state, "param_groups": sd["param_groups"]}


def _expand_adam(sd: Mapping[str, Any]) -> dict[str, Any]:
    state = {}
    for i, st in sd["state"].items():
        second = st["exp_avg_sq"].float()
        first = st["exp_avg"].float() if "exp_avg" in st else torch.zeros_like(second)
        state[i] = {"step": st["step"], "exp_avg": first, "exp_avg_sq": second}
    return {"state": state, "param_groups": sd["param_groups"]}


def _save(run_dir: Path, cfg: TrainConfig, gen: Generator, disc: Discriminator, g_ema: Generator,
          opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, step: int, nimg: int, chunk: int,
          pl_mean: Tensor, train_seconds: float, eval_seconds_last: float | None,
          history: list[dict[str, Any]], seed: int) -> Path:
    """Write the resumable state as two files, each under the device tool's 16 MiB per file (about 14 MiB
    each for the 256 px run, 29 MB together):

    - ``checkpoint.pt`` (:func:`training.save_checkpoint`): counters, config, history, G (float32, with its
      buffers) and ``G_ema - G`` in fp16 (the EMA is G plus a small difference: fp16 keeps it to ~5e-4 of
      the difference);
    - ``checkpoint_d.pt``: D (float32) and the Adam states of G and D (see :func:`_compact_adam`).

    The second file is written first and both carry the step, so a crash between the two writes is
    detected on resume instead of mixing states.
    """
    def cpu(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    ema_delta = {k: (p_ema.detach() - p.detach()).to("cpu", torch.float16)
                 for (k, p_ema), (_, p) in zip(g_ema.named_parameters(), gen.named_parameters())}
    part = {"step": step, "D": cpu(disc.state_dict()), "opt_G": _compact_adam(opt_g), "opt_D": _compact_adam(opt_d)}
    part_path = run_dir / CHECKPOINT_PART
    tmp = part_path.with_suffix(".tmp")
    torch.save(part, tmp)
    os.replace(tmp, part_path)
    return training.save_checkpoint(run_dir, {
        "config": cfg.to_dict(), "seed": seed, "G": cpu(gen.state_dict()), "G_ema_delta": ema_delta,
        "step": step, "nimg": nimg, "chunk": chunk, "pl_mean": pl_mean.detach().cpu(),
        "train_seconds": float(train_seconds), "eval_seconds_last": eval_seconds_last, "history": history,
        "commit": training.git_commit(),
    })


def _load_part(run_dir: Path, ckpt: Mapping[str, Any]) -> dict[str, Any]:
    path = run_dir / CHECKPOINT_PART
    if not path.is_file():
        raise ValueError(f"{run_dir} has {training.CHECKPOINT} but not {CHECKPOINT_PART}: copy both files of a run")
    part = torch.load(path, map_location="cpu", weights_only=True)
    if part.get("step") != ckpt.get("step"):
        raise ValueError(f"{path} (step {part.get('step')}) and {training.CHECKPOINT} (step {ckpt.get('step')}) "
                         "are from different saves; restore both files of one save")
    return part


def ema_state_dict(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    """The EMA generator's state dict from a checkpoint: G's state plus the stored difference."""
    state = {k: v.clone() for k, v in ckpt["G"].items()}
    for k, delta in ckpt["G_ema_delta"].items():
        state[k] = state[k] + delta.float()
    return state


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def shipped_state_dict(net: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A network's tensors (G's or D's, or their state dict) as shipped: fp16, except :data:`FP32_SUFFIXES`
    (float32), contiguous, CPU."""
    out = {}
    for k, v in (net.state_dict() if isinstance(net, nn.Module) else net).items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float() if k.endswith(FP32_SUFFIXES) else v.half()
        out[k] = v.clone(memory_format=torch.contiguous_format)
    return out


@training.staged_export
def export(run_dir: str | os.PathLike, dest: str | os.PathLike, *, final_dest: str | os.PathLike | None = None) -> Path:
    """Write the EMA generator of ``run_dir`` to ``dest``: ``generator.safetensors`` (fp16) +
    ``generator.json`` (the record :func:`~dragrt.runtime.models.stylegan2_convert.load_generator` reads,
    source format ``dragrt-zoo``), ``samples.png`` and ``MODEL_CARD.md``; and the discriminator
    (``discriminator.safetensors``, fp16), from which a later run continues (``init``, :func:`shipped_start`).
    Exported into the zoo under another name than the demo's model (``zoo/weights/faces-stylegan2-128``), the
    card and record carry that name and say the run is still in training (``final_dest``: where the staged export
    lands, given by :func:`dragrt.zoo.training.staged_export`).

    Returns:
        ``dest/generator.json`` (what ``load_generator`` takes).
    """

    from dragrt.runtime.models import stylegan2_convert as conv
    from dragrt.zoo import registry

    run_dir, dest = Path(run_dir), Path(dest)
    ckpt = training.load_checkpoint(run_dir)
    if ckpt is None:
        raise ValueError(f"run_dir={str(run_dir)!r} has no {training.CHECKPOINT}; train first")
    cfg = TrainConfig.from_dict(ckpt["config"])
    # the zoo name it will have (``final_dest``: where training.staged_export moves ``dest``'s files): a folder of
    # the zoo beside the demo's model (a run in training) is named by it
    final = Path(final_dest) if final_dest is not None else dest
    name = final.name if final.resolve().parent == registry.WEIGHTS_DIR.resolve() else NAME
    g_ema = Generator.from_config(cfg.generator_config())
    g_ema.load_state_dict(ema_state_dict(ckpt))
    tensors = shipped_state_dict(g_ema)
    conv.check_state_dict(cfg.generator_config(), tensors, str(run_dir))
    d_tensors = shipped_state_dict(_load_part(run_dir, ckpt)["D"])
    for what, shipped_tensors, limit in (("generator", tensors, MAX_GENERATOR_BYTES),
                                         ("discriminator", d_tensors, MAX_DISCRIMINATOR_BYTES)):
        size = sum(t.numel() * t.element_size() for t in shipped_tensors.values())
        if size > limit:
            raise ValueError(f"the {what} takes {size} bytes in fp16; the zoo allows at most {limit}")

    dest.mkdir(parents=True, exist_ok=True)
    json_path = dest / GENERATOR_RECORD
    metrics = training.read_metrics(run_dir)
    conv.write_generator(
        tensors, cfg.generator_config(), json_path,
        source={"format": "dragrt-zoo", "zoo_name": name, "trainer": "dragrt.zoo.stylegan2_train",
                "network": "G_ema", "steps": int(ckpt["step"]), "kimg": round(int(ckpt["nimg"]) / 1000, 3),
                "chunks": int(ckpt["chunk"]) + 1, "train_seconds": round(float(ckpt["train_seconds"]), 1),
                "pl_mean": float(ckpt["pl_mean"]), "commit": ckpt.get("commit"), "train_config": cfg.to_dict(),
                "discriminator": DISCRIMINATOR_FILE},
        notes=["fp16 weights; resample filters and mapping.w_avg in float32"])
    from safetensors.torch import save_file

    save_file(d_tensors, str(dest / DISCRIMINATOR_FILE), metadata={"network": "D", "trainer": NAME})
    os.chmod(dest / DISCRIMINATOR_FILE, 0o644)  # (safetensors writes 0600; package data is shared)

    # The grid is drawn by the shipped (fp16-rounded) weights, loaded the way the runtime loads them.
    shipped = conv.load_generator(json_path)
    write_sample_grid(shipped, dest / SAMPLES_FILE, torch.device("cpu"))
    compared = tuple(f"{k}_{COMPARE_RESOLUTION}px" for k in COMPARED_METRICS)
    shown = {k: metrics[k] for k in ("frechet_distance_attr", "landmark_conf_samples", "landmark_conf_renders",
                                     *compared, "eval_samples", "eval_reals", "sec_per_kimg", "nonfinite_losses",
                                     "eval_notes") if k in metrics}
    role = ("the default model of `dragrt demo` (DragGAN)" if name == NAME
            else f"a run beside the demo's zoo:{NAME}, not yet its replacement")
    training.write_card(
        dest, name=name,
        summary=(f"A StyleGAN2 generator ({cfg.resolution} px, z/w {cfg.z_dim}/{cfg.w_dim}, {cfg.mapping_layers} "
                 f"mapping layers, channel_base {cfg.channel_base}, channel_max {cfg.channel_max}, "
                 f"{cfg.generator_config().num_ws} styles; NVIDIA's parameter names) trained from scratch on "
                 f"the toy-faces renders: {role}. Load it with "
                 "`dragrt.runtime.models.stylegan2_convert.load_generator`. `samples.png`: 16 samples of the "
                 f"shipped weights, truncation 1, const noise. `{DISCRIMINATOR_FILE}`: the discriminator, from "
                 "which a new run continues training (`--init`); the editing runtime does not load it."),
        data=("Endless stream of procedurally rendered cartoon faces (`dragrt.zoo.world`), rendered on the fly "
              "from training seeds in [0, 2e9) by DataLoader workers; held-out seeds 2e9 + i are used only for "
              "the metrics."),
        training={"steps": int(ckpt["step"]), "kimg": round(int(ckpt["nimg"]) / 1000, 3),
                  "chunks": int(ckpt["chunk"]) + 1, "batch": cfg.batch_size,
                  "device time (training, s)": round(float(ckpt["train_seconds"]), 1),
                  "device": metrics.get("device_name", metrics.get("device", "?")),
                  "loss": (f"non-saturating logistic; lazy R1 gamma {cfg.r1_gamma} every {cfg.r1_interval}; "
                           f"path length weight {cfg.pl_weight} every {cfg.pl_interval}; style mixing "
                           f"{cfg.style_mixing_prob}; G EMA half-life {cfg.ema_kimg} kimg (ramp-up "
                           f"{cfg.ema_rampup})"),
                  "optimizer": f"Adam lr {cfg.lr} betas ({cfg.beta1}, {cfg.beta2}) (lazy-reg corrected)",
                  "precision": f"fp16 in the top {cfg.num_fp16_res} resolutions on CUDA, conv_clamp {cfg.conv_clamp}",
                  "commit": ckpt.get("commit") or training.git_commit(),
                  "started from": cfg.init_history or cfg.init or "random initialisation",
                  "command": _card_command(cfg, str(metrics.get("device", "cuda")))},
        metrics=shown or {"note": "no metrics recorded"},
        files=[GENERATOR_FILE, GENERATOR_RECORD, SAMPLES_FILE, DISCRIMINATOR_FILE, training.CARD],
        status=_card_status(cfg, name),
    )
    return json_path



def main(argv: list[str] | None = None) -> int:
    """``python -m dragrt.zoo.stylegan2_train --run-dir DIR [--minutes M] [--resolution 256|128|64] [--batch N]
    [--init EXPORT] [--export DEST]``: the zoo CLI plus the choice of resolution and batch for a new run (``python -m
    dragrt.zoo.train faces-stylegan2`` trains the 256 px preset)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dragrt.zoo.stylegan2_train", description=main.__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, choices=RESOLUTIONS, default=None,
                        help=f"new runs only (default {DEFAULT_RESOLUTION})")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="images per step for a new run (default: the preset's, 32 at 256 and 128 px); "
                             "a multiple of 4 (the minibatch-std group). A larger batch trains more images a second "
                             "(eager steps are bound by Python dispatch) but the GAN learns per step: batch 128 "
                             "learned far less than 16 from the same number of images (CONTRIBUTING.md)")
    parser.add_argument("--r1-gamma", type=float, default=None, metavar="G",
                        help="R1 weight of a new run, or of one started with --init (default: the preset's, 5x "
                             "NVIDIA's heuristic 2e-4 * res**2 / batch); more weakens a discriminator that runs ahead")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                        help=f"torch.compile G's synthesis and D in the main steps ({', '.join(COMPILE_MODES)})")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each part of an iteration from a CUDA graph (CUDA only; not with "
                             "--compile reduce-overhead)")
    parser.add_argument("--channels-last", action="store_true",
                        help="G's and D's convolutions in channels-last (NHWC) memory (for cuDNN's NHWC kernels)")
    parser.add_argument("--init", default=None, metavar="PATH",
                        help="start a new run from an export (a folder written by --export, or zoo:faces-stylegan2): "
                             "its G, G's EMA, D and counters; fresh Adam states")
    parser.add_argument("--no-train", action="store_true", help="only evaluate/export an existing run")
    parser.add_argument("--evaluate", action="store_true", help="with --no-train: re-evaluate the run")
    parser.add_argument("--export", type=Path, default=None, help="write the shipped generator to this folder")
    args = parser.parse_args(argv)
    if not args.no_train:
        overrides = {k: v for k, v in (("batch_size", args.batch), ("r1_gamma", args.r1_gamma)) if v is not None}
        try:
            metrics = train(args.run_dir, minutes=args.minutes, device=args.device, seed=args.seed,
                            resolution=args.resolution, compile_mode=args.compile, cuda_graphs=args.cuda_graphs,
                            channels_last=args.channels_last, config_overrides=overrides or None, init=args.init)
        except (ValueError, FileNotFoundError) as exc:  # a setting or a path the trainer refused: say which
            parser.error(str(exc))
        print(json.dumps(metrics, indent=2, sort_keys=True))
    elif args.evaluate:
        print(json.dumps(evaluate_run(args.run_dir, args.device, args.seed), indent=2, sort_keys=True))
    if args.export is not None:
        print(export(args.run_dir, args.export))
    return 0


if __name__ == "__main__":
    sys.exit(main())
