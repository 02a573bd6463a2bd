"""Real photos into a StyleGAN2 generator: projection (NVIDIA ``projector.py``) and pivotal tuning (PTI).

DragGAN edits latents, so a photo must first become one. DragGAN ships no inversion (its README sends users
to PTI; spec ``ref_draggan.md`` §6), so this module brings both halves:

- :func:`project`: NVIDIA stylegan2-ada-pytorch's projector. ``w`` starts at the mean of 10000 mapped
  ``z`` (seeded as NVIDIA seeds them) and is optimised with Adam under a learning rate that ramps up over
  the first 5% of the steps and down (cosine) over the last 25%; Gaussian noise of ``w_std * 0.05`` is
  added to ``w`` at each step and decays quadratically to zero at 75% of the steps; the generator's
  per-layer noise inputs are re-drawn and optimised too, held back by NVIDIA's multi-scale autocorrelation
  penalty (weight 1e5) and renormalised to zero mean / unit variance after each step. The generator itself
  is never written to: its weights are read as detached tensors and the noise buffers are optimised copies.
- :func:`pivotal_tuning`: PTI (Roich et al. 2021). With the projected ``w`` fixed as the pivot, fine-tune
  a *copy* of the generator's synthesis weights (Adam, lr 3e-4, 350 steps) on ``L2 + perceptual`` so the
  photo's details the latent space cannot express are absorbed by the weights.
- :func:`invert`: both in a row; the returned generator renders the inversion with ``noise_mode='const'``.

The perceptual term is pluggable (:class:`FeatureDistance`), because no pretrained VGG/LPIPS weights can be
downloaded here, and dragrt never downloads any: :class:`PixelDistance` (L2 / L1, always available),
:class:`ModuleFeatureDistance` (features of any torch module, e.g. the model zoo's evaluators) and
:class:`LPIPSVGG16` (LPIPS on a VGG16 trunk, from weight files the user already has on disk; what NVIDIA's
projector uses). Without a feature distance the projection is a pixel-loss projection, which is faithful
in PSNR and blurrier in perception than NVIDIA's LPIPS projection.

Phases of an inversion: 1. prepare the target (center crop, Lanczos to the generator's resolution,
``[-1, 1]``) -> 2. ``w`` statistics from mapped ``z`` -> 3. optimise ``w`` (+ noise) -> 4. optionally
tune a generator copy around the pivot -> 5. save ``w`` + noise (safetensors) and a JSON record.

Layouts: images ``[N, C, H, W]`` float32 in ``[-1, 1]`` (generator outputs are not clamped), ``w``
``[1, num_ws, w_dim]``, noise buffers ``[res, res]`` keyed by their generator ``state_dict`` names
(``synthesis.b8.conv0.noise_const``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dragrt.runtime.models.stylegan2 import Generator

SPACES = ("w", "w+")
PIXEL_LOSSES = ("l2", "l1")
#: NVIDIA's projector draws the ``z`` of its ``w`` statistics from ``np.random.RandomState(123)``.
W_STATS_SEED = 123
FORMAT_NAME = "dragrt-projection"
FORMAT_VERSION = 1
#: LPIPS downsamples larger images to 256 px before VGG16 (NVIDIA's projector: "VGG was built for 224x224").
LPIPS_MAX_SIZE = 256


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ProjectorConfig:
    """Projection and pivotal tuning. Defaults are NVIDIA's ``projector.py`` and PTI's ``hyperparameters.py``.

    Attributes:
        num_steps: Adam steps on ``w`` (NVIDIA: 1000). Fewer steps stop before the learning rate has ramped
            down; quality drops gracefully, not sharply (PTI's first inversion uses 450).
        initial_learning_rate: peak Adam step size on ``w`` and the noise (NVIDIA: 0.1; PTI's own projector
            uses 0.005 with its pivots). The schedule multiplies it by a ramp-up and a cosine ramp-down.
        initial_noise_factor: std of the Gaussian added to ``w`` at step 0, as a fraction of ``w_std`` (the
            spread of mapped latents; NVIDIA: 0.05). Helps escape poor basins early; 0 = off.
        lr_rampdown_length: fraction of the steps, at the end, over which the learning rate falls to 0
            along half a cosine (NVIDIA: 0.25). In ``(0, 1]``.
        lr_rampup_length: fraction of the steps, at the start, over which it rises linearly from 0
            (NVIDIA: 0.05). In ``[0, 1]``; 0 = start at full rate.
        noise_ramp_length: fraction of the steps after which the ``w`` noise is 0 (it decays as
            ``(1 - t / length)**2``; NVIDIA: 0.75). In ``(0, 1]``.
        regularize_noise_weight: weight of the autocorrelation penalty on the optimised noise buffers
            (NVIDIA: 1e5). Lower lets the noise absorb image content that ``w`` should explain (worse
            edits); higher keeps the noise white.
        w_avg_samples: mapped ``z`` used for the start point ``w_avg`` and the scalar spread ``w_std``
            (NVIDIA: 10000; PTI: 600). More costs one batched mapping pass.
        space: ``"w"`` (NVIDIA: one ``w`` repeated for every layer) or ``"w+"`` (one style per layer).
            ``w`` stays on the generator's manifold, so edits and DragGAN drags behave as on generated
            images, but it reconstructs photos less exactly; ``w+`` has ``num_ws`` times the freedom and
            reconstructs better (sharper, closer colours) at the cost of latents off the manifold that
            edit less predictably. PTI tunes around a ``w`` pivot for that reason.
        optimize_noise: re-draw the generator's noise inputs and optimise them with ``w`` (NVIDIA: always).
            ``False`` keeps the generator's ``noise_const`` buffers as they are: the result then renders
            correctly on the unmodified generator, at a lower PSNR.
        pixel_loss: ``"l2"`` (mean squared error) or ``"l1"`` (mean absolute error), in ``[-1, 1]`` units.
        pixel_weight: weight of the pixel loss. ``None`` = 1.0 without a feature distance and 0.0 with one
            (NVIDIA's projector uses LPIPS alone).
        feature_weight: weight of the ``feature_distance`` passed to :func:`project` (ignored without one).
        seed: seeds the noise re-draw, the per-step ``w`` noise and PTI's locality samples (NVIDIA's CLI:
            303). Same seed, device and inputs -> the same result.
        force_fp32: run fp16 blocks in float32 during projection (NVIDIA's projector: no; PTI's: yes).
            Only matters on CUDA with ``num_fp16_res > 0``; slower, slightly more exact gradients.
        pti_steps: pivotal-tuning steps. 0 = no tuning in :func:`invert` (the default); PTI uses 350.
        pti_lr: Adam step size on the synthesis weights (PTI: 3e-4). Higher fits faster and forgets the
            rest of the latent space faster.
        pti_l2_weight: weight of the pixel MSE in tuning (PTI: 1).
        pti_feature_weight: weight of the feature distance in tuning (PTI: 1, with LPIPS-AlexNet).
        pti_stop_distance: stop tuning once the distance to the target is at most this: the feature distance
            when one is given, else the pixel MSE (PTI: LPIPS <= 0.07). ``None`` = always run ``pti_steps``.
            Checking costs a host sync per step.
        pti_locality_weight: weight of PTI's locality regulariser: at each step one ``z`` (truncation 0.5)
            is mapped, moved to distance ``pti_locality_alpha`` from the pivot, and the tuned and original
            generators (noise off) must agree there (MSE + feature distance). PTI's code: 0.1. Off (0) by
            default: it doubles the synthesis work of a step and only matters for edits far from the pivot.
        pti_locality_alpha: distance from the pivot, in ``w`` units over all layers, of the locality samples
            (PTI: 30, for FFHQ's 18 x 512 ``w+``; scale it with the spread of your generator's ``w``).
    """

    num_steps: int = 1000
    initial_learning_rate: float = 0.1
    initial_noise_factor: float = 0.05
    lr_rampdown_length: float = 0.25
    lr_rampup_length: float = 0.05
    noise_ramp_length: float = 0.75
    regularize_noise_weight: float = 1e5
    w_avg_samples: int = 10000
    space: str = "w"
    optimize_noise: bool = True
    pixel_loss: str = "l2"
    pixel_weight: float | None = None
    feature_weight: float = 1.0
    seed: int = 303
    force_fp32: bool = False
    pti_steps: int = 0
    pti_lr: float = 3e-4
    pti_l2_weight: float = 1.0
    pti_feature_weight: float = 1.0
    pti_stop_distance: float | None = None
    pti_locality_weight: float = 0.0
    pti_locality_alpha: float = 30.0

    def __post_init__(self) -> None:
        _int_field("num_steps", self.num_steps, 1)
        _int_field("w_avg_samples", self.w_avg_samples, 2)
        _int_field("seed", self.seed, 0)
        _int_field("pti_steps", self.pti_steps, 0)
        _float_field("initial_learning_rate", self.initial_learning_rate, low=0.0, low_open=True)
        _float_field("pti_lr", self.pti_lr, low=0.0, low_open=True)
        _float_field("initial_noise_factor", self.initial_noise_factor, low=0.0)
        _float_field("lr_rampdown_length", self.lr_rampdown_length, low=0.0, high=1.0, low_open=True)
        _float_field("lr_rampup_length", self.lr_rampup_length, low=0.0, high=1.0)
        _float_field("noise_ramp_length", self.noise_ramp_length, low=0.0, high=1.0, low_open=True)
        for name in ("regularize_noise_weight", "feature_weight", "pti_l2_weight", "pti_feature_weight",
                     "pti_locality_weight"):
            _float_field(name, getattr(self, name), low=0.0)
        _float_field("pti_locality_alpha", self.pti_locality_alpha, low=0.0, low_open=True)
        if self.pixel_weight is not None:
            _float_field("pixel_weight", self.pixel_weight, low=0.0)
        if self.pti_stop_distance is not None:
            _float_field("pti_stop_distance", self.pti_stop_distance, low=0.0)
        _choice("space", self.space, SPACES)
        _choice("pixel_loss", self.pixel_loss, PIXEL_LOSSES)
        for name in ("optimize_noise", "force_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use True or False")

    def resolved_pixel_weight(self, has_feature_distance: bool) -> float:
        """``pixel_weight``, with ``None`` resolved: 0.0 when a feature distance is used, else 1.0."""
        if self.pixel_weight is not None:
            return float(self.pixel_weight)
        return 0.0 if has_feature_distance else 1.0

    def replace(self, **changes: Any) -> ProjectorConfig:
        """A copy with some fields changed (validated like a new object)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ProjectorConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProjectorConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"projector config must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ProjectorConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _int_field(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; use an integer >= {minimum}")


def _float_field(name: str, value: object, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (high is None or v <= high)
    if not ok:
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        rng = f"a finite number {lo}" if high is None else f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name}={value!r} is not allowed; use {rng}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def learning_rate(step: int, config: ProjectorConfig) -> float:
    """Adam step size at ``step`` (0-based) of ``config.num_steps``: NVIDIA's ramp-up x cosine ramp-down."""
    t = step / config.num_steps
    down = min(1.0, (1.0 - t) / config.lr_rampdown_length)
    ramp = 0.5 - 0.5 * math.cos(down * math.pi)
    if config.lr_rampup_length > 0:
        ramp *= min(1.0, t / config.lr_rampup_length)
    return config.initial_learning_rate * ramp


def w_noise_scale(step: int, w_std: float, config: ProjectorConfig) -> float:
    """Std of the Gaussian added to ``w`` at ``step``: ``w_std * factor * max(0, 1 - t / ramp)**2``."""
    t = step / config.num_steps
    return w_std * config.initial_noise_factor * max(0.0, 1.0 - t / config.noise_ramp_length) ** 2


# ---------------------------------------------------------------------------------------------------------
# Targets and metrics
# ---------------------------------------------------------------------------------------------------------


def prepare_target(
    target: Any,
    resolution: int,
    channels: int = 3,
    *,
    target_range: tuple[float, float] = (-1.0, 1.0),
) -> Tensor:
    """A target image as the generator sees it: ``[1, C, R, R]`` float32 in ``[-1, 1]`` on the CPU.

    Accepted inputs:
        - a PIL image (any mode PIL can convert to RGB / L);
        - a numpy array ``[H, W]`` or ``[H, W, C]`` (the PIL / imageio layout): ``uint8`` in 0..255, or float
          in ``target_range``;
        - a torch tensor ``[C, H, W]`` or ``[1, C, H, W]`` (the torch layout): ``uint8`` in 0..255, or float
          in ``target_range`` (default ``(-1, 1)``, what the generator outputs; pass ``(0, 1)`` for images in
          ``[0, 1]``: the two cannot be told apart from the values).

    Non-square images are center-cropped to a square, then resized with Lanczos to ``resolution`` (as NVIDIA's
    projector does; 8-bit inputs are resized in 8 bits like PIL, float inputs per channel in float). One
    channel is repeated to three for an RGB generator. Float values beyond the range by up to half its span
    are clamped (generator outputs overshoot a little); more than that means a wrong ``target_range`` and is
    an error, as are NaN/inf values, a batch of more than one image and 4-channel arrays.
    """
    from PIL import Image

    lo, hi = _check_range(target_range)
    if isinstance(target, Image.Image):
        pil = target.convert("RGB" if channels == 3 else "L")
        return _from_uint8(np.asarray(pil), resolution, channels)
    if isinstance(target, np.ndarray):
        arr = target
        if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
            raise ValueError(f"target array has shape {list(arr.shape)}: numpy targets are [H, W, C] "
                             "(the PIL layout); transpose a [C, H, W] array, or pass a torch tensor")
        if arr.ndim not in (2, 3):
            raise ValueError(f"target array must be [H, W] or [H, W, C], got shape {list(arr.shape)}")
        hwc = arr[:, :, None] if arr.ndim == 2 else arr
    elif isinstance(target, Tensor):
        t = target.detach()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError(f"target must be one image, got a batch of {t.shape[0]} (shape {list(t.shape)})")
            t = t[0]
        if t.ndim != 3:
            raise ValueError(f"target tensor must be [C, H, W] or [1, C, H, W], got shape {list(target.shape)}")
        if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            raise ValueError(f"target tensor has shape {list(target.shape)}: tensors are [C, H, W] (the torch "
                             "layout); permute an [H, W, C] tensor")
        if t.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"target tensor must be uint8 or floating point, got {t.dtype}")
        if t.dtype != torch.uint8:
            t = t.float()
        hwc = t.permute(1, 2, 0).cpu().numpy()
    else:
        raise ValueError(f"target must be a PIL image, a numpy array or a torch tensor, got {type(target).__name__}")

    if hwc.shape[0] < 1 or hwc.shape[1] < 1:
        raise ValueError(f"target image is empty: shape {list(hwc.shape)}")
    c = hwc.shape[2]
    if c not in (1, 3) or (c == 3 and channels == 1):
        raise ValueError(f"target has {c} channels; this generator takes {channels} "
                         f"({'drop the alpha channel first' if c == 4 else 'convert the image first'})")
    if hwc.dtype == np.uint8:
        return _from_uint8(hwc, resolution, channels)
    if not np.issubdtype(hwc.dtype, np.floating):
        raise ValueError(f"target array must be uint8 or floating point, got {hwc.dtype}")
    x = hwc.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("target contains NaN or infinite values")
    slack = 0.5 * (hi - lo)
    if x.min() < lo - slack or x.max() > hi + slack:
        raise ValueError(f"target values span [{x.min():.3g}, {x.max():.3g}], far outside target_range="
                         f"({lo:g}, {hi:g}); pass the range the image is in (e.g. (0, 1) or (-1, 1))")
    x = ((x - lo) / (hi - lo)).clip(0.0, 1.0)  # [H, W, C] in [0, 1]
    x = _center_crop(x)
    if x.shape[0] != resolution:
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, i])).resize((resolution, resolution),
                                                                            Image.Resampling.LANCZOS))
                      for i in range(x.shape[2])], axis=2).clip(0.0, 1.0)
    out = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None] * 2 - 1
    return _match_channels(out, channels)


def _check_range(target_range: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in target_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"target_range={target_range!r} must be a pair (low, high)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"target_range={target_range!r} must be finite with high > low")
    return lo, hi


def _center_crop(hwc: np.ndarray) -> np.ndarray:
    h, w = hwc.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return hwc[top:top + s, left:left + s]


def _from_uint8(hwc: np.ndarray, resolution: int, channels: int) -> Tensor:
    from PIL import Image

    hwc = _center_crop(hwc if hwc.ndim == 3 else hwc[:, :, None])
    if hwc.shape[0] != resolution:
        mode_arr = hwc[:, :, 0] if hwc.shape[2] == 1 else hwc
        pil = Image.fromarray(np.ascontiguousarray(mode_arr)).resize((resolution, resolution), Image.Resampling.LANCZOS)
        hwc = np.asarray(pil)
        hwc = hwc[:, :, None] if hwc.ndim == 2 else hwc
    out = torch.tensor(hwc).permute(2, 0, 1)[None].float() / 127.5 - 1
    return _match_channels(out, channels)


def _match_channels(img: Tensor, channels: int) -> Tensor:
    if img.shape[1] == 1 and channels == 3:
        img = img.repeat(1, 3, 1, 1)
    return img.contiguous()


def target_sha256(target: Tensor) -> str:
    """SHA-256 of a prepared target ``[1, C, R, R]`` quantised to uint8 ``[R, R, C]`` bytes (so a PIL image
    and the same pixels as an array or tensor hash alike)."""
    q = ((target[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return hashlib.sha256(q.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()


def psnr(image: Tensor, target: Tensor) -> float:
    """PSNR in dB of ``image`` (clamped to ``[-1, 1]``) against ``target``, both ``[N, C, H, W]`` in ``[-1, 1]``
    (peak-to-peak 2, i.e. the usual PSNR of the images in ``[0, 1]``). ``inf`` for identical images."""
    if image.shape != target.shape:
        raise ValueError(f"psnr: image {list(image.shape)} and target {list(target.shape)} differ in shape")
    mse = float((image.detach().float().clamp(-1, 1) - target.detach().float().to(image.device)).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(4.0 / mse)


# ---------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureDistance(Protocol):
    """A differentiable distance between generated images and one fixed target.

    ``prepare(target)`` is called once per target (``[1, C, H, W]`` float32 in ``[-1, 1]``, the generator's
    resolution) and returns whatever the distance needs later (e.g. the target's features, detached).
    ``distance(images, prepared)`` takes images ``[N, C, H, W]`` in ``[-1, 1]`` (not clamped) and returns
    ``[N]`` float32 distances, differentiable with respect to ``images``. Implementations must not keep
    gradients in their own parameters (the optimisers here ask autograd for the optimised tensors only).
    """

    def prepare(self, target: Tensor) -> Any: ...

    def distance(self, images: Tensor, prepared: Any) -> Tensor: ...


class PixelDistance:
    """Mean squared (``"l2"``) or absolute (``"l1"``) pixel difference in ``[-1, 1]`` units. Always available."""

    def __init__(self, kind: str = "l2") -> None:
        _choice("kind", kind, PIXEL_LOSSES)
        self.kind = kind

    def prepare(self, target: Tensor) -> Tensor:
        return target.detach()

    def distance(self, images: Tensor, prepared: Tensor) -> Tensor:
        diff = images - prepared
        return (diff.square() if self.kind == "l2" else diff.abs()).flatten(1).mean(1)

    def __repr__(self) -> str:
        return f"PixelDistance({self.kind!r})"


def _unit_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Scale every position's channel vector (dim 1) to unit length (LPIPS ``normalize_tensor``)."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode and restore every submodule's train/eval flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


class ModuleFeatureDistance:
    """A multi-scale feature distance from any torch module (e.g. one of the model zoo's evaluators).

    The module sees the images mapped to ``input_range`` (optionally resized to ``resize_to`` first, and
    at each factor of ``image_scales``); its feature maps are compared LPIPS-style: every ``[N, C, H, W]`` map
    is unit-normalised over channels (``normalize=True``), the squared difference is averaged over
    ``C, H, W`` and weighted, and the maps and scales are summed. ``[N, D]`` outputs (embeddings) are compared
    the same way with ``D`` as the channel dim.

    Args:
        module: any ``nn.Module``. It is run in eval mode (its flags are restored afterwards) and never
            written to; its parameters get no gradients from the optimisers here.
        layers: names of submodules (``dict(module.named_modules())`` keys) whose outputs are the features,
            captured with temporary forward hooks. ``None``: the module's own output, a tensor, a sequence
            or a dict of tensors.
        input_range: the value range the module expects (``(0, 1)`` for most classifiers; ``(-1, 1)`` is the
            generator's).
        resize_to: resize images to this square size before the module (``None`` = as they are).
        image_scales: image pyramid factors; each scale is a separate pass (``(1.0, 0.5)`` doubles the work).
        layer_weights: one weight per feature map (in ``layers`` order or output order); default 1 each.
        normalize: unit-normalise channel vectors before comparing (LPIPS does; removes feature magnitude).
    """

    def __init__(self, module: nn.Module, layers: Sequence[str] | None = None, *,
                 input_range: tuple[float, float] = (0.0, 1.0), resize_to: int | None = None,
                 image_scales: Sequence[float] = (1.0,), layer_weights: Sequence[float] | None = None,
                 normalize: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.layers = list(layers) if layers is not None else None
        if self.layers is not None:
            named = dict(module.named_modules())
            missing = [n for n in self.layers if n not in named]
            if missing or not self.layers:
                some = ", ".join(list(named)[1:12])
                raise ValueError(f"layers {missing or '[]'} are not submodules of {type(module).__name__} "
                                 f"(some that are: {some})")
        self.input_range = _check_range(input_range)
        if resize_to is not None:
            _int_field("resize_to", resize_to, 1)
        self.resize_to = resize_to
        scales = [float(s) for s in image_scales]
        if not scales or any(not (0 < s <= 1) for s in scales):
            raise ValueError(f"image_scales={tuple(image_scales)!r} must be factors in (0, 1]")
        self.image_scales = scales
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.normalize = bool(normalize)

    def _features(self, images: Tensor) -> list[Tensor]:
        lo, hi = self.input_range
        x = (images + 1) * (0.5 * (hi - lo)) + lo
        if self.resize_to is not None and x.shape[-1] != self.resize_to:
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", antialias=True,
                              align_corners=False)
        feats: list[Tensor] = []
        for s in self.image_scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True,
                                                  align_corners=False)
            feats.extend(self._run(xs))
        return feats

    def _run(self, x: Tensor) -> list[Tensor]:
        with _eval_mode(self.module):
            if self.layers is None:
                out = self.module(x)
                items = list(out.values()) if isinstance(out, Mapping) else (
                    [out] if isinstance(out, Tensor) else list(out))
            else:
                captured: dict[str, Tensor] = {}
                named = dict(self.module.named_modules())
                handles = [named[n].register_forward_hook(
                    lambda _m, _i, o, n=n: captured.__setitem__(n, o)) for n in self.layers]
                try:
                    self.module(x)
                finally:
                    for h in handles:
                        h.remove()
                items = [captured[n] for n in self.layers]
        if not items or not all(isinstance(t, Tensor) and t.ndim >= 2 for t in items):
            raise ValueError(f"{type(self.module).__name__} must give feature tensors [N, C, ...], got "
                             f"{[type(t).__name__ for t in items]}")
        return [t.float() for t in items]

    def prepare(self, target: Tensor) -> list[Tensor]:
        with torch.no_grad():
            feats = self._features(target)
        if self.layer_weights is not None and len(self.layer_weights) * len(self.image_scales) != len(feats):
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries but the module gives "
                             f"{len(feats) // len(self.image_scales)} feature maps")
        return [_unit_channels(f) if self.normalize else f for f in feats]

    def distance(self, images: Tensor, prepared: list[Tensor]) -> Tensor:
        feats = self._features(images)
        weights = (self.layer_weights or [1.0] * (len(feats) // len(self.image_scales))) * len(self.image_scales)
        total = images.new_zeros(images.shape[0])
        for f, t, w in zip(feats, prepared, weights):
            f = _unit_channels(f) if self.normalize else f
            total = total + w * (f - t).square().flatten(1).mean(1)
        return total


#: VGG16 ``features`` (torchvision layout): conv indices and channels up to relu5_3; max-pools at 4, 9, 16, 23.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
               (28, 512, 512))
VGG16_POOLS = (4, 9, 16, 23)
#: LPIPS taps: outputs of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (``features`` indices 3, 8, 15, 22, 29).
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)
#: LPIPS v0.1 input scaling (``ScalingLayer``) for images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPSVGG16(nn.Module):
    """LPIPS (v0.1) with a VGG16 trunk, the perceptual distance of NVIDIA's projector, from local files only.

    Images in ``[-1, 1]`` larger than 256 px are area-downsampled to 256 (NVIDIA's projector), scaled by
    LPIPS's shift/scale, run through VGG16's convolutions; the five ReLU taps are unit-normalised over
    channels, their squared differences weighted per channel by LPIPS's linear heads (or by 1 each, the
    "baseline" LPIPS, when no heads are loaded), averaged spatially and summed.

    Build with :meth:`from_files`; the constructor alone makes an untrained (random) trunk, which is only good
    for tests. Nothing is downloaded, ever.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        convs = {i: (cin, cout) for i, cin, cout in VGG16_CONVS}
        for i in range(VGG16_TAPS[-1] + 1):
            if i in convs:
                layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
            elif i in VGG16_POOLS:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1))
        for k, c in enumerate(VGG16_TAP_CHANNELS):
            self.register_buffer(f"lin{k}", torch.ones(c))
        self.has_linear_heads = False
        self.requires_grad_(False).eval()

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike[str], lpips_path: str | os.PathLike[str] | None = None,
                   device: torch.device | str = "cpu") -> LPIPSVGG16:
        """Load VGG16 weights (and optionally LPIPS's linear heads) from local files.

        Args:
            vgg_path: ``.safetensors`` or a torch ``state_dict`` file (read with ``weights_only=True``, so
                it cannot run code). Accepted key layouts: torchvision's ``vgg16`` (``features.0.weight``,
                ...; ``classifier.*`` is ignored), a bare ``features`` ``Sequential`` (``0.weight``), or an
                ``lpips.LPIPS(net='vgg')`` state dict (``net.slice1.0.weight``, ..., with ``lin{k}`` heads).
            lpips_path: LPIPS's head weights (``weights/v0.1/vgg.pth`` of the lpips package:
                ``lin{k}.model.1.weight [1, C, 1, 1]``). ``None``: heads from ``vgg_path`` when it has them,
                else the uniform baseline.
        """
        model = cls()
        model.load_weights(_read_tensors(vgg_path))
        if lpips_path is not None:
            model.load_weights(_read_tensors(lpips_path), heads_only=True)
        return model.to(device)

    def load_weights(self, state: Mapping[str, Tensor], heads_only: bool = False) -> None:
        """Copy trunk and/or head weights from ``state`` (layouts: see :meth:`from_files`)."""
        trunk: dict[int, dict[str, Tensor]] = {}
        heads: dict[int, Tensor] = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "module":
                parts = parts[1:]
            if len(parts) >= 3 and parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
                heads[int(parts[0][3:])] = value
            elif len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
                trunk.setdefault(int(parts[1]), {})[parts[2]] = value
            elif len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice") and parts[2].isdigit():
                trunk.setdefault(int(parts[2]), {})[parts[3]] = value
            elif len(parts) == 2 and parts[0].isdigit():
                trunk.setdefault(int(parts[0]), {})[parts[1]] = value
        if not heads_only:
            missing = [f"features.{i}.{p}" for i, _, _ in VGG16_CONVS for p in ("weight", "bias")
                       if p not in trunk.get(i, {})]
            if missing:
                raise ValueError(f"VGG16 weights lack {len(missing)} tensor(s), e.g. {', '.join(missing[:4])} "
                                 "(expected torchvision vgg16, a features Sequential or an lpips.LPIPS state dict)")
            with torch.no_grad():
                for i, cin, cout in VGG16_CONVS:
                    conv = self.features[i]
                    for p, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
                        t = trunk[i][p]
                        if tuple(t.shape) != shape:
                            raise ValueError(f"features.{i}.{p} has shape {list(t.shape)}, expected {list(shape)}")
                        getattr(conv, p).copy_(t.float())
        if heads_only and not heads:
            raise ValueError("no LPIPS heads (lin0..lin4 .weight) in the given file")
        if heads:
            if sorted(heads) != list(range(len(VGG16_TAP_CHANNELS))):
                raise ValueError(f"LPIPS heads must be lin0..lin4, got lin{sorted(heads)}")
            with torch.no_grad():
                for k, c in enumerate(VGG16_TAP_CHANNELS):
                    t = heads[k]
                    if t.numel() != c:
                        raise ValueError(f"lin{k} has {t.numel()} weights, expected {c}")
                    getattr(self, f"lin{k}").copy_(t.reshape(c).float())
            self.has_linear_heads = True

    def taps(self, images: Tensor) -> list[Tensor]:
        """Unit-normalised VGG16 features at the five LPIPS taps of ``images [N, 3, H, W]`` in ``[-1, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < 16:
            raise ValueError(f"LPIPSVGG16 takes RGB images [N, 3, H, W] of at least 16 x 16 (VGG16 halves them "
                             f"four times), got shape {list(images.shape)}")
        x = images.float()
        if x.shape[-1] > LPIPS_MAX_SIZE or x.shape[-2] > LPIPS_MAX_SIZE:
            x = F.interpolate(x, size=(LPIPS_MAX_SIZE, LPIPS_MAX_SIZE), mode="area")
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(_unit_channels(x))
        return out

    def prepare(self, target: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return self.taps(target)

    def distance(self, images: Tensor, prepared: list[Tensor]) -> Tensor:
        total = images.new_zeros(images.shape[0], dtype=torch.float32)
        for k, (f, t) in enumerate(zip(self.taps(images), prepared)):
            head = getattr(self, f"lin{k}").reshape(1, -1, 1, 1)
            total = total + ((f - t).square() * head).sum(1).mean((1, 2))
        return total

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS between two batches ``[N, 3, H, W]`` in ``[-1, 1]`` -> ``[N]``."""
        return self.distance(a, [t.detach() for t in self.taps(b)])


def _read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True`` (no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} does not exist (dragrt never downloads weights)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{p} could not be read as safetensors or a weights-only torch file "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p} does not hold a flat dict of tensors (a state_dict)")
    return dict(state)


# ---------------------------------------------------------------------------------------------------------
# Generator access (read-only)
# ---------------------------------------------------------------------------------------------------------


def _check_generator(generator: object) -> Generator:
    if not isinstance(generator, Generator):
        raise ValueError(f"generator must be a dragrt StyleGAN2 Generator, got {type(generator).__name__}")
    if generator.c_dim != 0:
        raise ValueError(f"conditional generators (c_dim={generator.c_dim}) are not supported by the projector")
    if generator.z_dim == 0:
        raise ValueError("the projector needs a generator with z_dim > 0 (for its w statistics)")
    return generator


def _resolve_device(generator: Generator, device: torch.device | str | None) -> torch.device:
    if device is None:
        return next(generator.parameters()).device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device") from None


def _frozen_state(module: nn.Module, device: torch.device) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module``, detached, on ``device`` (no copy when already there)."""
    state = {n: p.detach().to(device) for n, p in module.named_parameters()}
    state.update({n: b.detach().to(device) for n, b in module.named_buffers()})
    return state


def _frozen_copy(generator: Generator, device: torch.device) -> Generator:
    """A private eval-mode copy without parameter gradients (NVIDIA's projector works on one too). Measured on
    the 32 px test generator, 1 CPU thread: forward + backward take 15-18 ms this way against 20 ms through
    ``torch.func.functional_call`` on the caller's module (it re-binds ~100 tensors per call)."""
    return copy.deepcopy(generator).to(device).eval().requires_grad_(False)


def noise_buffer_names(generator: Generator) -> list[str]:
    """The generator's noise inputs, as ``state_dict`` names (``synthesis.b8.conv0.noise_const``)."""
    return [f"synthesis.{n}" for n, _ in generator.synthesis.named_buffers() if n.endswith("noise_const")]


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """Make ``value`` (e.g. an optimised leaf tensor) the buffer ``name`` (dotted) of ``module``."""
    owner_name, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner_name) if owner_name else module, attr, value)


def _map(generator: Generator, state: Mapping[str, Tensor], z: Tensor, truncation_psi: float = 1.0) -> Tensor:
    """``generator.mapping(z)`` with tensors from ``state`` (mapping-relative names): never updates ``w_avg``,
    never writes to the module."""
    return torch.func.functional_call(generator.mapping, dict(state), (z, None),
                                      {"truncation_psi": truncation_psi, "skip_w_avg_update": True})


def _synthesize(generator: Generator, state: Mapping[str, Tensor], ws: Tensor, noise_mode: str) -> Tensor:
    """``generator.synthesis(ws)`` (fp32, fused modconv as in eval mode at batch 1) with tensors from ``state``."""
    return torch.func.functional_call(generator.synthesis, dict(state), (ws,),
                                      {"noise_mode": noise_mode, "force_fp32": True, "fused_modconv": True})


def w_statistics(generator: Generator, num_samples: int = 10000,
                 device: torch.device | str | None = None) -> tuple[Tensor, float]:
    """NVIDIA's start point and spread: ``w_avg [1, 1, w_dim]`` (mean of ``num_samples`` mapped ``z`` drawn
    from ``np.random.RandomState(123)``) and ``w_std = sqrt(mean over samples of |w - w_avg|^2)``."""
    generator = _check_generator(generator)
    _int_field("num_samples", num_samples, 2)
    dev = _resolve_device(generator, device)
    z = torch.from_numpy(np.random.RandomState(W_STATS_SEED).randn(num_samples, generator.z_dim)).to(dev)
    with torch.no_grad():
        w = _map(generator, _frozen_state(generator.mapping, dev), z)[:, :1, :]  # [N, 1, w_dim]
    w_avg = w.mean(dim=0, keepdim=True)  # [1, 1, w_dim]
    w_std = float((w.double() - w_avg.double()).square().sum() / num_samples) ** 0.5
    return w_avg, w_std


def noise_regularization(noise: Sequence[Tensor]) -> Tensor:
    """NVIDIA's noise penalty: for every buffer ``[H, W]`` and each 2x average-pooled version of it down to
    8x8, the squared mean of its products with its 1-pixel shifts (wrap-around) along x and y."""
    total = noise[0].new_zeros(()) if noise else torch.zeros(())
    for buf in noise:
        x = buf[None, None]  # [1, 1, H, W]
        while True:
            total = total + (x * torch.roll(x, shifts=1, dims=3)).mean().square()
            total = total + (x * torch.roll(x, shifts=1, dims=2)).mean().square()
            if x.shape[2] <= 8:
                break
            x = F.avg_pool2d(x, kernel_size=2)
    return total


def _check_w(w: object, generator: Generator, name: str) -> Tensor:
    """``w`` as ``[1, num_ws, w_dim]`` float32 (``[1, w_dim]`` and ``[1, 1, w_dim]`` are broadcast)."""
    if not isinstance(w, Tensor):
        raise ValueError(f"{name} must be a tensor [1, num_ws, w_dim], got {type(w).__name__}")
    num_ws, w_dim = generator.num_ws, generator.w_dim
    w = w.detach().float()
    if w.ndim == 2:
        w = w[:, None]
    if w.ndim != 3 or w.shape[0] != 1 or w.shape[1] not in (1, num_ws) or w.shape[2] != w_dim:
        raise ValueError(f"{name} must be [1, num_ws, w_dim] = [1, {num_ws}, {w_dim}] (or [1, {w_dim}]), "
                         f"got shape {list(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return w.expand(1, num_ws, w_dim).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ProjectionResult:
    """What :func:`project` found.

    Attributes:
        w: ``[1, num_ws, w_dim]`` float32 (in ``"w"`` space every row is the same vector).
        noise: the noise inputs it was found with, ``{state_dict name: [res, res]}``. The image is reproduced
            by ``generator.synthesis(w, noise_mode='const')`` only after :meth:`apply_noise`.
        loss_history: ``[steps_run]`` float32 (CPU): the total loss of each step.
        image: ``[1, C, R, R]`` float32, the final rendering (about ``[-1, 1]``, not clamped).
        psnr: dB of ``image`` against the target (see :func:`psnr`).
        target_sha256: :func:`target_sha256` of the prepared target.
        config: the :class:`ProjectorConfig` used.
        elapsed_s: wall time of the optimisation, including the ``w`` statistics.
        target: the prepared target ``[1, C, R, R]`` in ``[-1, 1]`` (``None`` when loaded from disk).
    """

    w: Tensor
    noise: dict[str, Tensor]
    loss_history: Tensor
    image: Tensor
    psnr: float
    target_sha256: str
    config: ProjectorConfig
    elapsed_s: float = 0.0
    target: Tensor | None = field(default=None, repr=False)

    def apply_noise(self, generator: Generator) -> None:
        """Write :attr:`noise` into ``generator``'s ``noise_const`` buffers (in place)."""
        _write_noise(generator, self.noise)


def _write_noise(generator: Generator, noise: Mapping[str, Tensor]) -> None:
    buffers = dict(generator.named_buffers())
    expected = set(noise_buffer_names(generator))
    if set(noise) != expected:
        raise ValueError(f"noise buffers {sorted(set(noise) ^ expected)[:4]} do not match this generator's "
                         f"{len(expected)} noise inputs")
    with torch.no_grad():
        for name, value in noise.items():
            buf = buffers[name]
            if value.shape != buf.shape:
                raise ValueError(f"noise {name} has shape {list(value.shape)}, the generator's is {list(buf.shape)}")
            buf.copy_(value.to(buf.device, buf.dtype))


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def project(
    generator: Generator,
    target: Any,
    *,
    config: ProjectorConfig | None = None,
    feature_distance: FeatureDistance | None = None,
    device: torch.device | str | None = None,
    target_range: tuple[float, float] = (-1.0, 1.0),
    w_init: Tensor | None = None,
    apply_noise: bool = False,
    progress: bool = True,
    callback: Callable[[int, float, Callable[[], Tensor]], bool | None] | None = None,
) -> ProjectionResult:
    """Find the latent of ``target`` in ``generator`` (NVIDIA's projector; see the module docstring).

    Args:
        generator: a :class:`~dragrt.runtime.models.stylegan2.Generator` (unconditional). Read only: its
            weights and buffers are not written (unless ``apply_noise``), nor its train/eval mode.
        target: the image (see :func:`prepare_target` for the accepted types, layouts and ranges); it is
            center-cropped and Lanczos-resized to the generator's resolution.
        config: :class:`ProjectorConfig` (default: NVIDIA's settings, ``w`` space, pixel loss).
        feature_distance: the perceptual term (:class:`LPIPSVGG16`, :class:`ModuleFeatureDistance`, ...),
            weighted by ``config.feature_weight``. ``None``: pixel loss only.
        device: where to run (default: the generator's device). Tensors are read onto it; the generator is
            not moved.
        target_range: value range of float targets (see :func:`prepare_target`).
        w_init: start here instead of ``w_avg`` (``[1, w_dim]``, ``[1, 1, w_dim]``, or ``[1, num_ws, w_dim]``
            in ``"w+"`` space), e.g. an encoder's guess or an earlier result.
        apply_noise: write the optimised noise into ``generator`` at the end, so that
            ``generator.synthesis(result.w, noise_mode='const')`` renders ``result.image``.
        progress: show a tqdm bar (its loss read-out syncs with the device every 10 steps).
        callback: ``callback(step, loss, image_fn)`` after every step (``step`` = steps done, 1-based;
            ``loss`` a float, which syncs the device); ``image_fn()`` renders the current latent
            (``[1, C, R, R]`` in ``[-1, 1]``, no grad) only when called. Return ``False`` to stop early.

    Returns:
        :class:`ProjectionResult`, tensors on ``device``.
    """
    config = config if config is not None else ProjectorConfig()
    if not isinstance(config, ProjectorConfig):
        raise ValueError(f"config must be a ProjectorConfig, got {type(config).__name__}")
    generator = _check_generator(generator)
    if feature_distance is not None and not isinstance(feature_distance, FeatureDistance):
        raise ValueError(f"feature_distance must have prepare() and distance() (FeatureDistance), got "
                         f"{type(feature_distance).__name__}")
    pixel_weight = config.resolved_pixel_weight(feature_distance is not None)
    feature_weight = config.feature_weight if feature_distance is not None else 0.0
    if pixel_weight == 0 and feature_weight == 0:
        raise ValueError("nothing to optimise: pixel_weight is 0 and there is no weighted feature distance")
    dev = _resolve_device(generator, device)
    num_ws, w_dim = generator.num_ws, generator.w_dim
    started = time.perf_counter()

    # 1. Target.
    target_img = prepare_target(target, generator.img_resolution, generator.img_channels,
                                 target_range=target_range).to(dev)  # [1, C, R, R]
    pixel = PixelDistance(config.pixel_loss)
    prepared = feature_distance.prepare(target_img) if feature_distance is not None else None

    # 2. A private frozen copy of the generator, and the w statistics.
    work = _frozen_copy(generator, dev)
    w_avg, w_std = w_statistics(work, config.w_avg_samples, dev)

    # 3. Optimised tensors: w (one row or num_ws rows) and copies of the noise buffers.
    rows = 1 if config.space == "w" else num_ws
    if w_init is None:
        start = w_avg.expand(1, rows, w_dim)
    else:
        start = _check_w(w_init, generator, "w_init")
        if config.space == "w":
            if not torch.equal(start, start[:, :1].expand_as(start)):
                raise ValueError("w_init has different styles per layer, which space='w' cannot hold; use space='w+'")
            start = start[:, :1]
    w_opt = start.to(dev).clone().requires_grad_(True)  # [1, rows, w_dim]
    rng = torch.Generator(device=dev).manual_seed(config.seed)
    buffers = dict(work.named_buffers())
    noise = {n: buffers[n] for n in noise_buffer_names(work)}  # [res, res] each
    params = [w_opt]
    if config.optimize_noise:
        for name, buf in noise.items():
            noise[name] = torch.randn(buf.shape, generator=rng, device=dev).requires_grad_(True)
            _set_buffer(work, name, noise[name])
        params += list(noise.values())
    optimizer = torch.optim.Adam(params, betas=(0.9, 0.999), lr=config.initial_learning_rate)

    def render(ws: Tensor) -> Tensor:
        return work.synthesis(ws, noise_mode="const", force_fp32=config.force_fp32)

    def current_image() -> Tensor:
        with torch.no_grad():
            return render(w_opt.detach().expand(1, num_ws, w_dim)).clamp(-1, 1)

    # 4. Optimise.
    history = torch.zeros(config.num_steps, dtype=torch.float32, device=dev)
    steps_run = 0
    with _progress(config.num_steps, progress, "project") as bar:
        for step in range(config.num_steps):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            w_noise = torch.randn(w_opt.shape, generator=rng, device=dev) * w_noise_scale(step, w_std, config)
            image = render((w_opt + w_noise).expand(1, num_ws, w_dim))  # [1, C, R, R]
            loss = image.new_zeros(())
            if pixel_weight > 0:
                loss = loss + pixel_weight * pixel.distance(image, target_img).sum()
            if feature_weight > 0:
                loss = loss + feature_weight * feature_distance.distance(image, prepared).sum()
            if config.optimize_noise and config.regularize_noise_weight > 0:
                loss = loss + config.regularize_noise_weight * noise_regularization(list(noise.values()))
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            if config.optimize_noise:
                with torch.no_grad():
                    for buf in noise.values():
                        buf -= buf.mean()
                        buf *= buf.square().mean().rsqrt()
            history[step] = loss.detach()
            steps_run = step + 1
            bar.update(1)
            if progress and (steps_run % 10 == 0 or steps_run == config.num_steps):
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
            if callback is not None and callback(steps_run, float(loss.detach()), current_image) is False:
                break

    # 5. Result.
    for p in params:
        p.grad = None
    w_final = w_opt.detach().expand(1, num_ws, w_dim).clone()
    noise_out = {n: t.detach().clone() for n, t in noise.items()}
    with torch.no_grad():
        final = render(w_final)
    result = ProjectionResult(
        w=w_final, noise=noise_out, loss_history=history[:steps_run].cpu(), image=final,
        psnr=psnr(final, target_img), target_sha256=target_sha256(target_img), config=config,
        elapsed_s=time.perf_counter() - started, target=target_img,
    )
    if apply_noise:
        result.apply_noise(generator)
    return result


# ---------------------------------------------------------------------------------------------------------
# Pivotal tuning
# ---------------------------------------------------------------------------------------------------------


def pivotal_tuning(
    generator: Generator,
    w_pivot: Tensor | ProjectionResult,
    target: Any,
    *,
    config: ProjectorConfig | None = None,
    feature_distance: FeatureDistance | None = None,
    noise: Mapping[str, Tensor] | None = None,
    device: torch.device | str | None = None,
    target_range: tuple[float, float] = (-1.0, 1.0),
    progress: bool = True,
    callback: Callable[[int, float, Callable[[], Tensor]], bool | None] | None = None,
) -> Generator:
    """PTI: fine-tune a copy of ``generator`` so that ``w_pivot`` renders ``target``.

    The copy's synthesis weights are trained with Adam (``config.pti_lr``) for ``config.pti_steps`` steps on
    ``pti_l2_weight * MSE + pti_feature_weight * feature_distance`` (PTI: L2 + LPIPS), plus PTI's locality
    regulariser when ``pti_locality_weight > 0``, with every fp16 block in float32 (as PTI runs).
    ``generator`` itself is not modified (bit for bit: weights, buffers, flags).

    Args:
        generator: the generator the pivot was found in.
        w_pivot: ``[1, num_ws, w_dim]`` (or ``[1, w_dim]``), or a :class:`ProjectionResult` (its ``w``, and its
            noise unless ``noise`` is given).
        target: the image (see :func:`prepare_target`).
        config: its ``pti_*`` fields (``pti_steps`` must be >= 1 here) and ``seed``; default: PTI's settings
            (350 steps, lr 3e-4).
        feature_distance: the perceptual term; ``None`` = pixel MSE only.
        noise: noise buffers to write into the copy first (``ProjectionResult.noise``), so that the tuned
            generator renders the inversion with ``noise_mode='const'``; ``None`` keeps the generator's own.
        device: where to tune (default: the generator's device); the copy lives there.
        progress, callback: as in :func:`project` (``image_fn`` renders the pivot with the current weights).

    Returns:
        The tuned copy, in eval mode, with ``requires_grad=False`` on every parameter.
    """
    config = config if config is not None else ProjectorConfig(pti_steps=350)
    if not isinstance(config, ProjectorConfig):
        raise ValueError(f"config must be a ProjectorConfig, got {type(config).__name__}")
    if config.pti_steps < 1:
        raise ValueError("config.pti_steps=0 turns pivotal tuning off; set pti_steps >= 1 (PTI uses 350)")
    generator = _check_generator(generator)
    if feature_distance is not None and not isinstance(feature_distance, FeatureDistance):
        raise ValueError(f"feature_distance must have prepare() and distance() (FeatureDistance), got "
                         f"{type(feature_distance).__name__}")
    if isinstance(w_pivot, ProjectionResult):
        noise = w_pivot.noise if noise is None else noise
        w_pivot = w_pivot.w
    dev = _resolve_device(generator, device)
    w = _check_w(w_pivot, generator, "w_pivot").to(dev)  # [1, num_ws, w_dim]
    target_img = prepare_target(target, generator.img_resolution, generator.img_channels,
                                target_range=target_range).to(dev)
    prepared = feature_distance.prepare(target_img) if feature_distance is not None else None
    pixel = PixelDistance("l2")

    # 1. The copy (the caller's generator is only read from here on).
    tuned = copy.deepcopy(generator).to(dev).eval()
    tuned.requires_grad_(False)
    if noise is not None:
        _write_noise(tuned, noise)
    params = list(tuned.synthesis.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    optimizer = torch.optim.Adam(params, lr=config.pti_lr)

    # 2. Locality regulariser inputs: the original generator, read-only.
    locality = config.pti_locality_weight > 0
    if locality:
        orig_synthesis = _frozen_state(generator.synthesis, dev)
        orig_mapping = _frozen_state(generator.mapping, dev)
        rng = torch.Generator(device=dev).manual_seed(config.seed)

    def current_image() -> Tensor:
        with torch.no_grad():
            return tuned.synthesis(w, noise_mode="const", force_fp32=True).clamp(-1, 1)

    # 3. Tune.
    with _progress(config.pti_steps, progress, "pivotal tuning") as bar:
        for step in range(config.pti_steps):
            image = tuned.synthesis(w, noise_mode="const", force_fp32=True)  # [1, C, R, R]
            mse = pixel.distance(image, target_img).sum()
            loss = config.pti_l2_weight * mse
            dist = mse
            if feature_distance is not None and config.pti_feature_weight > 0:
                dist = feature_distance.distance(image, prepared).sum()
                loss = loss + config.pti_feature_weight * dist
            if config.pti_stop_distance is not None and float(dist.detach()) <= config.pti_stop_distance:
                break
            if locality:
                z = torch.randn(1, generator.z_dim, generator=rng, device=dev)
                with torch.no_grad():
                    w_sample = _map(generator, orig_mapping, z, truncation_psi=0.5)  # [1, num_ws, w_dim]
                    direction = w_sample - w
                    w_near = w + config.pti_locality_alpha * direction / direction.norm()
                    old = _synthesize(generator, orig_synthesis, w_near, noise_mode="none")
                new = tuned.synthesis(w_near, noise_mode="none", force_fp32=True)
                reg = pixel.distance(new, old).sum()
                if feature_distance is not None:
                    reg = reg + feature_distance.distance(new, feature_distance.prepare(old)).sum()
                loss = loss + config.pti_locality_weight * reg
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            bar.update(1)
            if progress and ((step + 1) % 10 == 0 or step + 1 == config.pti_steps):
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
            if callback is not None and callback(step + 1, float(loss.detach()), current_image) is False:
                break

    # 4. Frozen result.
    for p in tuned.parameters():
        p.grad = None
    return tuned.requires_grad_(False).eval()


@dataclass
class Inversion:
    """What :func:`invert` returns.

    Attributes:
        projection: the :class:`ProjectionResult` (``w`` is the latent to edit).
        generator: a copy of the input generator holding the projection's noise, tuned around the pivot when
            ``pti_steps > 0``: ``generator.synthesis(projection.w, noise_mode='const')`` renders :attr:`image`.
        image: ``[1, C, R, R]`` float32, the final rendering.
        psnr: dB of :attr:`image` against the target (``projection.psnr`` is the value before tuning).
    """

    projection: ProjectionResult
    generator: Generator
    image: Tensor
    psnr: float


def invert(
    generator: Generator,
    target: Any,
    *,
    config: ProjectorConfig | None = None,
    feature_distance: FeatureDistance | None = None,
    device: torch.device | str | None = None,
    target_range: tuple[float, float] = (-1.0, 1.0),
    progress: bool = True,
) -> Inversion:
    """A photo to an editable latent: :func:`project`, then :func:`pivotal_tuning` when ``config.pti_steps > 0``.

    The input generator is not modified; the returned one is a copy (see :class:`Inversion`).
    """
    config = config if config is not None else ProjectorConfig()
    result = project(generator, target, config=config, feature_distance=feature_distance, device=device,
                     target_range=target_range, progress=progress)
    if config.pti_steps > 0:
        tuned = pivotal_tuning(generator, result, result.target, config=config, feature_distance=feature_distance,
                               device=device, progress=progress)
    else:
        tuned = copy.deepcopy(generator).to(result.w.device).eval().requires_grad_(False)
        result.apply_noise(tuned)
    with torch.no_grad():
        image = tuned.synthesis(result.w, noise_mode="const", force_fp32=config.pti_steps > 0 or config.force_fp32)
    return Inversion(projection=result, generator=tuned, image=image, psnr=psnr(image, result.target))


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def projection_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT``, ``OUT.safetensors`` or ``OUT.json`` -> ``(OUT.safetensors, OUT.json)``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def save_projection(result: ProjectionResult, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``OUT.safetensors`` (``w``, ``noise.<name>``, ``image``, ``loss_history``) and ``OUT.json`` (format,
    config, PSNR, target SHA-256, the safetensors file's SHA-256). Both are written atomically.

    Returns:
        ``(safetensors path, json path)``.
    """
    from safetensors.torch import save_file

    if not isinstance(result, ProjectionResult):
        raise ValueError(f"save_projection needs a ProjectionResult, got {type(result).__name__}")
    st_path, json_path = projection_paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"w": result.w, "image": result.image, "loss_history": result.loss_history}
    tensors.update({f"noise.{n}": t for n, t in result.noise.items()})
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    tmp = st_path.with_name(st_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
    os.replace(tmp, st_path)
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": result.config.to_dict(),
        "psnr": result.psnr if math.isfinite(result.psnr) else None,
        "target_sha256": result.target_sha256,
        "elapsed_s": result.elapsed_s,
        "steps_run": int(result.loss_history.numel()),
        "w_shape": list(result.w.shape),
        "noise": sorted(result.noise),
        "safetensors_sha256": _sha256_file(st_path),
    }
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return st_path, json_path


def load_projection(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> ProjectionResult:
    """Read what :func:`save_projection` wrote (``OUT``, ``OUT.safetensors`` or ``OUT.json``); ``target`` is
    ``None``. Raises ``ValueError`` on a foreign, newer or tampered record."""
    from safetensors.torch import load_file

    st_path, json_path = projection_paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise ValueError(f"{json_path} is not a {FORMAT_NAME} record")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{json_path}: format_version {record['format_version']} is newer than this dragrt "
                         f"reads ({FORMAT_VERSION})")
    if record.get("safetensors_sha256") != _sha256_file(st_path):
        raise ValueError(f"{st_path} does not match the SHA-256 recorded in {json_path} (changed or replaced)")
    tensors = load_file(str(st_path), device=str(device))
    noise = {k[len("noise."):]: v for k, v in tensors.items() if k.startswith("noise.")}
    missing = {"w", "image", "loss_history"} - set(tensors)
    if missing or sorted(noise) != sorted(record.get("noise", [])) or list(tensors["w"].shape) != record["w_shape"]:
        raise ValueError(f"{st_path} does not hold the tensors {json_path} describes")
    psnr_value = record.get("psnr")
    return ProjectionResult(
        w=tensors["w"], noise=noise, loss_history=tensors["loss_history"].cpu(), image=tensors["image"],
        psnr=math.inf if psnr_value is None else float(psnr_value), target_sha256=record["target_sha256"],
        config=ProjectorConfig.from_dict(record["config"]), elapsed_s=float(record.get("elapsed_s", 0.0)),
    )


def _sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
