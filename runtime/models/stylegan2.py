"""StyleGAN2 generator (mapping + synthesis) in plain PyTorch ops.

The architecture, the arithmetic and the parameter/buffer names follow NVIDIA stylegan2-ada-pytorch
(``training/networks.py``, config-f "skip" generator), so ``Generator.state_dict()`` has exactly the keys and
shapes of a real ``G_ema`` and real checkpoints load with ``load_state_dict(strict=True)`` (after
:mod:`dragrt.runtime.models.stylegan2_convert` has turned the pickle into safetensors). What is the same
as NVIDIA's reference (non-CUDA) path, operation for operation:

- equalised learning rate: weights are stored unscaled and multiplied at run time by
  ``lr_multiplier / sqrt(fan_in)`` (fully connected) or ``1 / sqrt(fan_in)`` (ToRGB styles);
- mapping: z normalised by its 2nd moment, ``num_layers`` FC layers with lrelu, ``w_avg`` tracked with
  ``w_avg_beta`` in training mode, truncation ``w_avg.lerp(w, psi)`` on the first ``truncation_cutoff`` ws;
- modulated conv with demodulation (eps 1e-8), fused (grouped conv) or unfused, with the fp16
  pre-normalisation; upsampling conv as transposed conv (stride 2) + FIR filter ``[1,3,3,1]``
  (``upfirdn2d``), ToRGB skip architecture with ``upsample2d`` of the running image;
- bias + leaky ReLU(0.2) * sqrt(2), clamped to ``+-conv_clamp`` when set; per-layer noise
  (``noise_const`` * ``noise_strength``);
- fp16 for the top ``num_fp16_res`` resolutions (``res >= max(2**(log2(R) + 1 - num_fp16_res), 8)``).

What differs, on purpose:
- every convolution is called through :mod:`dragrt.runtime.models.conv_double_backward`: ``F.conv2d`` /
  ``F.conv_transpose2d`` themselves, unless a trainer's regulariser turns on its twice-differentiable path.
- fp16 blocks run in fp32 unless the input is on a CUDA device (as NVIDIA's StyleGAN3 layers do); the
  channels-last memory format of NVIDIA's fp16 blocks is not reproduced (layout only, same math).
- ``synthesis(..., noise_mode=...)`` defaults to ``'const'`` (DragGAN's choice); NVIDIA defaults to ``'random'``.
- Only the ``'skip'`` architecture (every StyleGAN2 generator that was published) is implemented.
- Extra outputs for editing: ``return_features`` (the block outputs DragGAN's fork returns) and
  ``stop_after`` (stop after one block; the image is not computed).

Layouts: ``z [N, z_dim]``, ``c [N, c_dim]``, ``ws [N, num_ws, w_dim]``, images ``[N, C, H, W]`` in about
``[-1, 1]`` (not clamped), float32.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dragrt.runtime.models import conv_double_backward as cdb

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # NVIDIA's def_gain for 'lrelu'; np.sqrt(2) and math.sqrt(2) are the same double
DEMOD_EPS = 1e-8
NOISE_MODES = ("const", "random", "none")
ACTIVATIONS = ("lrelu", "linear")
PRESET_RESOLUTIONS = (256, 512, 1024)


# ---------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------


def _check_shape(name: str, t: object, expected: Sequence[int | None], layout: str) -> None:
    """Raise ``ValueError`` naming ``name`` and its layout when ``t`` is not a tensor of ``expected`` shape
    (``None`` = any size)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of layout {layout}, got {type(t).__name__}")
    if t.ndim != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have layout {layout} = {want}, got shape {list(t.shape)}")


def _fp16_supported(device: torch.device) -> bool:
    """fp16 blocks run in fp16 only on CUDA devices; elsewhere they fall back to fp32 (NVIDIA's StyleGAN3
    layers make the same choice; CPU half convolutions are slow and not what the checkpoints were tuned on)."""
    return device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# Ops (NVIDIA's reference implementations, re-expressed in plain torch)
# ---------------------------------------------------------------------------------------------------------


def setup_filter(taps: Sequence[float] | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A normalised FIR filter for :func:`upfirdn2d` (NVIDIA ``setup_filter`` with its defaults).

    A 1-D list of fewer than 8 taps becomes its 2-D outer product (``[1,3,3,1]`` -> ``[4, 4]``); 8 taps or
    more stay separable (1-D). The filter is divided by its sum, so a constant signal keeps its value.

    Returns:
        float32 ``[fh, fw]`` or ``[taps]``.
    """
    f = torch.as_tensor(taps, dtype=torch.float32, device=device)
    if f.ndim == 0:
        f = f[None]
    if f.ndim not in (1, 2) or f.numel() == 0:
        raise ValueError(f"resample filter must be 1-D or 2-D and non-empty, got shape {list(f.shape)}")
    if f.ndim == 1 and f.numel() < 8:
        f = torch.outer(f, f)
    return f / f.sum()


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    x, y = (value, value) if isinstance(value, int) else tuple(value)
    if not (isinstance(x, int) and isinstance(y, int) and x >= 1 and y >= 1):
        raise ValueError(f"{name} must be an int >= 1 or a pair of them, got {value!r}")
    return x, y


def _padding4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    """``p``, ``[px, py]`` or ``[px0, px1, py0, py1]`` -> ``(px0, px1, py0, py1)``."""
    if isinstance(padding, int):
        return padding, padding, padding, padding
    p = [int(v) for v in padding]
    if len(p) == 2:
        return p[0], p[0], p[1], p[1]
    if len(p) == 4:
        return p[0], p[1], p[2], p[3]
    raise ValueError(f"padding must be an int, [x, y] or [x0, x1, y0, y1], got {padding!r}")


def _filter_size(f: Tensor | None) -> tuple[int, int]:
    """``(fw, fh)`` of a 2-D ``[fh, fw]`` or separable ``[taps]`` filter; ``(1, 1)`` for ``None``."""
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(
    x: Tensor,
    f: Tensor | None,
    up: int | Sequence[int] = 1,
    down: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> Tensor:
    """Upsample by zero insertion, pad (negative = crop), convolve with a FIR filter, downsample.

    For each channel: insert ``up - 1`` zeros after every pixel; pad by ``padding`` (given with respect to
    the upsampled image); convolve with ``f`` (a true convolution unless ``flip_filter``) keeping only
    outputs whose footprint lies inside the padded image; keep every ``down``-th pixel. ``gain`` scales
    the signal (applied to the filter as ``gain ** (f.ndim / 2)``). Same semantics as NVIDIA's
    ``upfirdn2d`` and ``scipy.signal.upfirdn``.

    Args:
        x: ``[N, C, H, W]``, any float dtype.
        f: float32 ``[fh, fw]``, separable ``[taps]``, or ``None`` (identity).
        up, down: integer factors >= 1, an int or ``[x, y]``.
        padding: int, ``[x, y]`` or ``[x0, x1, y0, y1]``, in upsampled pixels.

    Returns:
        ``[N, C, (H*up + py0 + py1 - fh + 1) / down, (W*up + px0 + px1 - fw + 1) / down]`` (rounded up).
    """
    _check_shape("x", x, [None, None, None, None], "[N, C, H, W]")
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    if f.ndim not in (1, 2) or f.dtype != torch.float32:
        raise ValueError(f"f must be a float32 [fh, fw] or [taps] filter, got {f.dtype} {list(f.shape)}")
    batch, channels, in_h, in_w = x.shape
    upx, upy = _pair(up, "up")
    downx, downy = _pair(down, "down")
    px0, px1, py0, py1 = _padding4(padding)
    fw, fh = _filter_size(f)
    if in_w * upx + px0 + px1 < fw or in_h * upy + py0 + py1 < fh:
        raise ValueError("upfirdn2d: the padded, upsampled image is smaller than the filter")

    # 1. Zero insertion.
    x = x.reshape([batch, channels, in_h, 1, in_w, 1])
    x = F.pad(x, [0, upx - 1, 0, 0, 0, upy - 1])
    x = x.reshape([batch, channels, in_h * upy, in_w * upx])
    # 2. Pad, then crop where the padding is negative.
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0) : x.shape[2] - max(-py1, 0), max(-px0, 0) : x.shape[3] - max(-px1, 0)]
    # 3. Filter (conv2d is a correlation, so flip for a true convolution) and 4. decimate, in one strided
    # convolution: the outputs that keeping every down-th one would throw away are never computed.
    f = (f * (gain ** (f.ndim / 2))).to(x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    f = f[None, None].repeat([channels, 1] + [1] * f.ndim)
    if f.ndim == 4:
        return cdb.conv2d(x, f, stride=(downy, downx), groups=channels)
    x = cdb.conv2d(x, f.unsqueeze(2), stride=(1, downx), groups=channels)
    return cdb.conv2d(x, f.unsqueeze(3), stride=(downy, 1), groups=channels)


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """Upsample ``[N, C, H, W]`` by ``up`` with FIR filter ``f`` to ``[N, C, H*up, W*up]`` (NVIDIA
    ``upsample2d`` with zero extra padding: the signal gain ``up**2`` compensates the inserted zeros)."""
    fw, fh = _filter_size(f)
    p = [(fw + up - 1) // 2, (fw - up) // 2, (fh + up - 1) // 2, (fh - up) // 2]
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def conv2d_resample(
    x: Tensor,
    w: Tensor,
    f: Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    groups: int = 1,
    flip_weight: bool = True,
) -> Tensor:
    """2-D convolution with optional FIR-filtered upsampling (NVIDIA ``conv2d_resample``, the two paths the
    generator uses; no downsampling).

    ``up == 1``: a plain ``conv2d`` with symmetric ``padding``. ``up > 1``: a transposed convolution with
    stride ``up`` followed by ``upfirdn2d`` with ``f`` and gain ``up**2``, with padding arranged so the
    result equals: zero-insert ``x``, low-pass with ``f``, then convolve with ``w``.

    Args:
        x: ``[N, I*groups, H, W]``.
        w: ``[O*groups, I, kh, kw]``, same dtype as ``x``.
        f: float32 filter from :func:`setup_filter` (needed when ``up > 1``).
        padding: padding of the (upsampled) image, in pixels.
        flip_weight: ``True`` = correlation (what ``conv2d`` computes), ``False`` = convolution.

    Returns:
        ``[N, O*groups, H*up + 2*padding - kh + 1, ...]`` (``[N, O*groups, H*up, W*up]`` for ``padding = k//2``).
    """
    _check_shape("x", x, [None, None, None, None], "[N, C, H, W]")
    _check_shape("w", w, [None, None, None, None], "[O, I, kh, kw]")
    if w.dtype != x.dtype:
        raise ValueError(f"w ({w.dtype}) and x ({x.dtype}) must have the same dtype")
    if not isinstance(up, int) or up < 1:
        raise ValueError(f"up must be an int >= 1, got {up!r}")
    out_channels, in_per_group, kh, kw = (int(s) for s in w.shape)
    px0 = px1 = py0 = py1 = int(padding)

    if up == 1:
        if kh > 1 or kw > 1:
            w = w if flip_weight else w.flip([2, 3])
        return cdb.conv2d(x, w, padding=[py0, px0], groups=groups)

    if f is None:
        raise ValueError("conv2d_resample with up > 1 needs a resample filter f")
    fw, fh = _filter_size(f)
    px0 += (fw + up - 1) // 2
    px1 += (fw - up) // 2
    py0 += (fh + up - 1) // 2
    py1 += (fh - up) // 2
    # conv_transpose2d wants [I, O, kh, kw] (per group).
    if groups == 1:
        w = w.transpose(0, 1)
    else:
        w = w.reshape(groups, out_channels // groups, in_per_group, kh, kw).transpose(1, 2)
        w = w.reshape(groups * in_per_group, out_channels // groups, kh, kw)
    px0 -= kw - 1
    px1 -= kw - up
    py0 -= kh - 1
    py1 -= kh - up
    pxt = max(min(-px0, -px1), 0)
    pyt = max(min(-py0, -py1), 0)
    # The transposed conv mirrors the kernel relative to conv2d: flip when a correlation was asked for.
    if flip_weight and (kh > 1 or kw > 1):
        w = w.flip([2, 3])
    x = cdb.conv_transpose2d(x, w, stride=up, padding=[pyt, pxt], groups=groups)
    return upfirdn2d(x, f, padding=[px0 + pxt, px1 + pxt, py0 + pyt, py1 + pyt], gain=up * up)


def bias_act(
    x: Tensor,
    b: Tensor | None = None,
    act: str = "linear",
    gain: float | None = None,
    clamp: float | None = None,
) -> Tensor:
    """``clamp(act(x + b) * gain, -clamp, clamp)`` with the bias on dim 1 (NVIDIA ``_bias_act_ref``).

    ``act`` is ``'lrelu'`` (slope 0.2, default gain sqrt(2)) or ``'linear'`` (default gain 1).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not supported; choose one of {ACTIVATIONS}")
    if b is not None:
        x = x + b.reshape([-1 if i == 1 else 1 for i in range(x.ndim)])
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    if gain is None:
        gain = LRELU_GAIN if act == "lrelu" else 1.0
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``x / sqrt(mean(x**2, dim) + eps)``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    noise: Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: Tensor | None = None,
    demodulate: bool = True,
    flip_weight: bool = True,
    fused_modconv: bool = True,
) -> Tensor:
    """StyleGAN2 modulated (and demodulated) convolution, NVIDIA ``modulated_conv2d`` step for step.

    Per sample n: ``w_n = weight * styles[n]`` (scaling input channels); with ``demodulate`` each output
    channel of ``w_n`` is divided by ``sqrt(sum(w_n**2) + 1e-8)``; then ``x[n]`` is convolved with
    ``w_n`` (see :func:`conv2d_resample` for ``up``), and ``noise`` is added.

    ``fused_modconv=True`` runs one grouped convolution with per-sample weights; ``False`` scales the
    activations before and after a shared-weight convolution (cheaper for large batches). Both compute
    the same function. fp16 inputs with ``demodulate`` are pre-normalised against overflow first.

    Args:
        x: ``[N, I, H, W]``.
        weight: ``[O, I, kh, kw]``.
        styles: ``[N, I]``.
        noise: broadcastable to the output ``[N, O, H*up, W*up]`` (e.g. ``[H, W]`` or ``[N, 1, H, W]``).

    Returns:
        ``[N, O, H*up, W*up]`` for ``padding = kh // 2``, dtype of ``x``.
    """
    batch = x.shape[0]
    _check_shape("weight", weight, [None, None, None, None], "[O, I, kh, kw]")
    out_channels, in_channels, kh, kw = weight.shape
    _check_shape("x", x, [batch, in_channels, None, None], "[N, I, H, W]")
    _check_shape("styles", styles, [batch, in_channels], "[N, I]")

    if x.dtype == torch.float16 and demodulate:
        weight = weight * (
            1 / math.sqrt(in_channels * kh * kw) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True)
        )  # max_Ikk
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)  # max_I

    w = None
    dcoefs = None
    if demodulate or fused_modconv:
        w = weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)  # [N, O, I, kh, kw]
    if demodulate:
        dcoefs = (w.square().sum(dim=[2, 3, 4]) + DEMOD_EPS).rsqrt()  # [N, O]
    if demodulate and fused_modconv:
        w = w * dcoefs.reshape(batch, -1, 1, 1, 1)  # [N, O, I, kh, kw]

    if not fused_modconv:
        x = x * styles.to(x.dtype).reshape(batch, -1, 1, 1)
        x = conv2d_resample(x, weight.to(x.dtype), f=resample_filter, up=up, padding=padding,
                            flip_weight=flip_weight)
        if demodulate and noise is not None:
            # NVIDIA's fma() is addcmul: one rounding, not two.
            return torch.addcmul(noise.to(x.dtype), x, dcoefs.to(x.dtype).reshape(batch, -1, 1, 1))
        if demodulate:
            return x * dcoefs.to(x.dtype).reshape(batch, -1, 1, 1)
        if noise is not None:
            return x + noise.to(x.dtype)
        return x

    x = x.reshape(1, -1, *x.shape[2:])  # [1, N*I, H, W]
    w = w.reshape(-1, in_channels, kh, kw)  # [N*O, I, kh, kw]
    x = conv2d_resample(x, w.to(x.dtype), f=resample_filter, up=up, padding=padding, groups=batch,
                        flip_weight=flip_weight)
    x = x.reshape(batch, -1, *x.shape[2:])  # [N, O, H', W']
    if noise is not None:
        # NVIDIA adds in place (x.add_(noise)): computed in the promoted dtype, stored in x's dtype.
        x = (x + noise).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


def _as_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _as_float(name: str, value: object, *, positive: bool = False, unit: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} must be a finite number")
    v = float(value)
    if positive and v <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")
    if unit and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1]")
    return v


@dataclass
class MappingConfig:
    """Mapping network z (+ c) -> w (NVIDIA ``mapping_kwargs``).

    Attributes:
        num_layers: FC layers (8 in every published StyleGAN2; fewer makes a faster, weaker mapping).
        embed_features: width of the label embedding; ``None`` = ``w_dim`` (unused when ``c_dim == 0``).
        layer_features: width of the hidden FC layers; ``None`` = ``w_dim``.
        activation: ``'lrelu'`` (slope 0.2, gain sqrt(2)) or ``'linear'``.
        lr_multiplier: equalised-lr multiplier of the FC layers (0.01: the stored weights are 100x the
            effective ones). Must match the checkpoint; it is part of the arithmetic, not a training knob.
        w_avg_beta: decay of the running mean ``w_avg`` updated in training mode (``None`` = no ``w_avg``
            buffer, and truncation is impossible).
    """

    num_layers: int = 8
    embed_features: int | None = None
    layer_features: int | None = None
    activation: str = "lrelu"
    lr_multiplier: float = 0.01
    w_avg_beta: float | None = 0.995

    def __post_init__(self) -> None:
        self.num_layers = _as_int("mapping.num_layers", self.num_layers, 1)
        if self.embed_features is not None:
            self.embed_features = _as_int("mapping.embed_features", self.embed_features, 1)
        if self.layer_features is not None:
            self.layer_features = _as_int("mapping.layer_features", self.layer_features, 1)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"mapping.activation={self.activation!r} is not supported; choose one of {ACTIVATIONS}")
        self.lr_multiplier = _as_float("mapping.lr_multiplier", self.lr_multiplier, positive=True)
        if self.w_avg_beta is not None:
            self.w_avg_beta = _as_float("mapping.w_avg_beta", self.w_avg_beta, unit=True)


@dataclass
class SynthesisConfig:
    """Synthesis network ws -> image (NVIDIA ``synthesis_kwargs``).

    Attributes:
        channel_base: channels of block ``res`` are ``min(channel_base // res, channel_max)`` (32768 for
            config-f: 512 channels up to b64, 256 at b128, 128 at b256, 64 at b512, 32 at b1024).
        channel_max: upper bound on the channels of any block.
        num_fp16_res: the top N resolutions run in fp16 on CUDA (about 2x faster there, with the overflow
            guards ``conv_clamp`` and the modconv pre-normalisation); 0 = everything in fp32. On other
            devices these blocks fall back to fp32.
        conv_clamp: clamp conv outputs (after bias and activation) to ``+-conv_clamp``; ``None`` = no
            clamp. 256 in NVIDIA's fp16 checkpoints; part of the arithmetic, must match the checkpoint.
        architecture: only ``'skip'`` (ToRGB at every block, summed with the upsampled image).
        resample_filter: FIR taps for up-sampling (``[1, 3, 3, 1]``, binomial).
        use_noise: per-layer noise inputs (``noise_const`` buffers and ``noise_strength`` parameters).
        activation: activation of the synthesis convs, ``'lrelu'`` or ``'linear'``.
    """

    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    architecture: str = "skip"
    resample_filter: tuple[float, ...] = (1, 3, 3, 1)
    use_noise: bool = True
    activation: str = "lrelu"

    def __post_init__(self) -> None:
        self.channel_base = _as_int("synthesis.channel_base", self.channel_base, 1)
        self.channel_max = _as_int("synthesis.channel_max", self.channel_max, 1)
        self.num_fp16_res = _as_int("synthesis.num_fp16_res", self.num_fp16_res, 0)
        if self.conv_clamp is not None:
            self.conv_clamp = _as_float("synthesis.conv_clamp", self.conv_clamp, positive=True)
        if self.architecture != "skip":
            raise ValueError(f"synthesis.architecture={self.architecture!r} is not supported; only 'skip' "
                             "(the StyleGAN2 config-e/f generator) is implemented")
        taps = tuple(self.resample_filter)
        if not taps or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in taps):
            raise ValueError(f"synthesis.resample_filter={self.resample_filter!r} must be a non-empty list of numbers")
        if sum(taps) == 0:
            raise ValueError("synthesis.resample_filter must not sum to 0")
        self.resample_filter = tuple(int(t) if float(t).is_integer() else float(t) for t in taps)
        if not isinstance(self.use_noise, bool):
            raise ValueError(f"synthesis.use_noise={self.use_noise!r} must be True or False")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"synthesis.activation={self.activation!r} is not supported; choose one of {ACTIVATIONS}")


# Keys NVIDIA's constructors accept that change neither the parameter names nor the result beyond float
# rounding: they are dropped (the converter keeps the original kwargs in its JSON record).
IGNORED_KWARGS = {
    "fp16_channels_last": "memory format of fp16 blocks (layout only)",
    "fused_modconv_default": "fused or unfused modulated conv (same function)",
}


@dataclass
class GeneratorConfig:
    """A StyleGAN2 generator, as NVIDIA's ``Generator(**init_kwargs)`` describes it.

    Attributes:
        img_resolution: output size R (a power of two >= 4); blocks b4..bR.
        z_dim: input latent size (0 = no z; then ``c_dim`` must be > 0).
        c_dim: class-label size (0 = unconditional).
        w_dim: intermediate latent size (512 in every published model).
        img_channels: output channels (3 = RGB).
        mapping: :class:`MappingConfig`.
        synthesis: :class:`SynthesisConfig`.
    """

    img_resolution: int = 256
    z_dim: int = 512
    c_dim: int = 0
    w_dim: int = 512
    img_channels: int = 3
    mapping: MappingConfig = field(default_factory=MappingConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)

    def __post_init__(self) -> None:
        r = _as_int("img_resolution", self.img_resolution, 4)
        if r & (r - 1):
            raise ValueError(f"img_resolution={self.img_resolution!r} must be a power of two >= 4")
        self.img_resolution = r
        self.z_dim = _as_int("z_dim", self.z_dim, 0)
        self.c_dim = _as_int("c_dim", self.c_dim, 0)
        self.w_dim = _as_int("w_dim", self.w_dim, 1)
        self.img_channels = _as_int("img_channels", self.img_channels, 1)
        if self.z_dim == 0 and self.c_dim == 0:
            raise ValueError("z_dim and c_dim are both 0: the mapping network would have no input")
        if isinstance(self.mapping, Mapping):
            self.mapping = MappingConfig(**self.mapping)
        if isinstance(self.synthesis, Mapping):
            self.synthesis = SynthesisConfig(**self.synthesis)
        if not isinstance(self.mapping, MappingConfig) or not isinstance(self.synthesis, SynthesisConfig):
            raise ValueError("mapping and synthesis must be MappingConfig / SynthesisConfig (or dicts of their fields)")
        for res in self.block_resolutions:
            if self.channels(res) < 1:
                raise ValueError(f"synthesis.channel_base={self.synthesis.channel_base} gives 0 channels "
                                 f"at {res}x{res}")

    # Derived quantities -----------------------------------------------------------------------------------
    @property
    def block_resolutions(self) -> list[int]:
        """``[4, 8, ..., img_resolution]``."""
        return [2**i for i in range(2, int(math.log2(self.img_resolution)) + 1)]

    def channels(self, res: int) -> int:
        """Feature channels of block ``res``: ``min(channel_base // res, channel_max)``."""
        return min(self.synthesis.channel_base // res, self.synthesis.channel_max)

    @property
    def fp16_resolution(self) -> int:
        """Blocks with ``res >= fp16_resolution`` use fp16 (when ``num_fp16_res > 0``, on CUDA)."""
        return max(2 ** (int(math.log2(self.img_resolution)) + 1 - self.synthesis.num_fp16_res), 8)

    @property
    def num_ws(self) -> int:
        """Style vectors consumed: one per conv plus the last ToRGB (``2*log2(R) - 2``: 14/16/18 for 256/512/1024)."""
        return 2 * int(math.log2(self.img_resolution)) - 2

    # Dict round trip (NVIDIA init_kwargs layout) ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """NVIDIA's ``Generator`` kwargs: ``{z_dim, c_dim, w_dim, img_resolution, img_channels,
        mapping_kwargs, synthesis_kwargs}`` (JSON-serialisable)."""
        synthesis = dataclasses.asdict(self.synthesis)
        synthesis["resample_filter"] = list(self.synthesis.resample_filter)
        return {
            "z_dim": self.z_dim,
            "c_dim": self.c_dim,
            "w_dim": self.w_dim,
            "img_resolution": self.img_resolution,
            "img_channels": self.img_channels,
            "mapping_kwargs": dataclasses.asdict(self.mapping),
            "synthesis_kwargs": synthesis,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneratorConfig:
        """Build from :meth:`to_dict` output or from NVIDIA ``init_kwargs``.

        Accepts stylegan2-ada-pytorch's layout (``mapping_kwargs`` / ``synthesis_kwargs``) and the StyleGAN3
        repository's StyleGAN2 layout (synthesis kwargs at the top level). Keys in :data:`IGNORED_KWARGS` are
        dropped; any other unknown key raises ``ValueError`` (e.g. a StyleGAN3 generator's ``conv_kernel``).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"generator config must be a mapping, got {type(d).__name__}")
        top_fields = {"z_dim", "c_dim", "w_dim", "img_resolution", "img_channels"}
        mapping_fields = {f.name for f in dataclasses.fields(MappingConfig)}
        synthesis_fields = {f.name for f in dataclasses.fields(SynthesisConfig)}
        top: dict[str, Any] = {}
        mapping: dict[str, Any] = {}
        synthesis: dict[str, Any] = {}
        unknown: list[str] = []

        def take(src: Mapping[str, Any], allowed: set[str], dst: dict[str, Any], where: str) -> None:
            for k, v in src.items():
                if k in allowed:
                    dst[k] = v
                elif k not in IGNORED_KWARGS:
                    unknown.append(f"{where}{k}")

        for k, v in d.items():
            if k in top_fields:
                top[k] = v
            elif k == "mapping_kwargs":
                take(dict(v or {}), mapping_fields, mapping, "mapping_kwargs.")
            elif k == "synthesis_kwargs":
                take(dict(v or {}), synthesis_fields, synthesis, "synthesis_kwargs.")
            elif k in synthesis_fields:  # StyleGAN3 repo: Generator(..., mapping_kwargs={}, **synthesis_kwargs)
                synthesis[k] = v
            elif k not in IGNORED_KWARGS:
                unknown.append(k)
        if unknown:
            raise ValueError(f"unknown StyleGAN2 generator config key(s): {', '.join(sorted(unknown))} "
                             "(is this a StyleGAN3 or another non-StyleGAN2 generator?)")
        if "img_resolution" not in top:
            raise ValueError("generator config lacks img_resolution")
        if "resample_filter" in synthesis and synthesis["resample_filter"] is not None:
            synthesis["resample_filter"] = tuple(synthesis["resample_filter"])
        return cls(mapping=MappingConfig(**mapping), synthesis=SynthesisConfig(**synthesis), **top)


def stylegan2_config(resolution: int | str = 512) -> GeneratorConfig:
    """Preset configs.

    Args:
        resolution: 256, 512 or 1024: config-f-like generators as NVIDIA trains them (channel_base 32768,
            channel_max 512, 8 mapping layers, num_fp16_res 4, conv_clamp 256; num_ws 14/16/18).
            ``'tiny'``: a 32x32 generator for tests (z/w 32, channel_base 512, channel_max 32, 2 mapping
            layers, fp16 on b16/b32 on CUDA, conv_clamp 256).
    """
    if resolution == "tiny":
        return GeneratorConfig(
            img_resolution=32, z_dim=32, w_dim=32,
            mapping=MappingConfig(num_layers=2),
            synthesis=SynthesisConfig(channel_base=512, channel_max=32, num_fp16_res=2, conv_clamp=256),
        )
    if resolution not in PRESET_RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r} has no preset; choose one of {PRESET_RESOLUTIONS} or 'tiny'")
    return GeneratorConfig(
        img_resolution=int(resolution), z_dim=512, w_dim=512,
        mapping=MappingConfig(num_layers=8),
        synthesis=SynthesisConfig(channel_base=32768, channel_max=512, num_fp16_res=4, conv_clamp=256),
    )


# ---------------------------------------------------------------------------------------------------------
# Layers (names and registration order as in NVIDIA's networks.py)
# ---------------------------------------------------------------------------------------------------------


class FullyConnectedLayer(nn.Module):
    """Equalised-lr linear layer: ``act(x @ (weight * lr_multiplier / sqrt(in)).T + bias * lr_multiplier)``.

    Parameters: ``weight [out, in]`` (stored as ``randn / lr_multiplier`` at init), ``bias [out]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, in]`` -> ``[N, out]``."""
        _check_shape("x", x, [None, self.in_features], "[N, in_features]")
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return bias_act(x.matmul(w.t()), b, act=self.activation)


class MappingNetwork(nn.Module):
    """z (+ c) -> ws ``[N, num_ws, w_dim]`` (NVIDIA ``MappingNetwork``); parameters ``fc{i}.*``, ``embed.*``
    (conditional models only) and the buffer ``w_avg [w_dim]``."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None,
                 activation: str = "lrelu", lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.c_dim = c_dim
        self.w_dim = w_dim
        self.num_ws = num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        if embed_features is None:
            embed_features = w_dim
        if c_dim == 0:
            embed_features = 0
        if layer_features is None:
            layer_features = w_dim
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for idx in range(num_layers):
            layer = FullyConnectedLayer(features[idx], features[idx + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Tensor | None, c: Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, skip_w_avg_update: bool = False) -> Tensor:
        """Map latents to style vectors.

        Args:
            z: ``[N, z_dim]`` (any float dtype; used as float32). Ignored when ``z_dim == 0``.
            c: ``[N, c_dim]`` labels, or ``None`` for unconditional models.
            truncation_psi: 1 = no truncation, 0 = every truncated w is ``w_avg``; typical 0.5..1.
            truncation_cutoff: truncate only ``ws[:, :cutoff]`` (``None`` = all of them).
            skip_w_avg_update: do not update ``w_avg`` even in training mode.

        Returns:
            ``[N, num_ws, w_dim]`` float32 (``[N, w_dim]`` when built with ``num_ws=None``).
        """
        x = None
        if self.z_dim > 0:
            _check_shape("z", z, [None, self.z_dim], "[N, z_dim]")
            x = normalize_2nd_moment(z.to(torch.float32))
        if self.c_dim > 0:
            _check_shape("c", c, [None if x is None else x.shape[0], self.c_dim], "[N, c_dim]")
            y = normalize_2nd_moment(self.embed(c.to(torch.float32)))
            x = torch.cat([x, y], dim=1) if x is not None else y
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)

        if self.w_avg_beta is not None and self.training and not skip_w_avg_update:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))

        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])  # [N, num_ws, w_dim]

        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("truncation needs w_avg, but this mapping network was built with w_avg_beta=None")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                cutoff = _as_int("truncation_cutoff", truncation_cutoff, 0)
                x = torch.cat([self.w_avg.lerp(x[:, :cutoff], truncation_psi), x[:, cutoff:]], dim=1)
        return x


class SynthesisLayer(nn.Module):
    """Modulated conv + noise + bias + lrelu (NVIDIA ``SynthesisLayer``).

    Parameters: ``weight [O, I, k, k]``, ``bias [O]``, ``noise_strength []``, ``affine.weight [I, w_dim]``,
    ``affine.bias [I]``; buffers ``resample_filter [4, 4]``, ``noise_const [res, res]``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu",
                 resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.resolution = resolution
        self.up = up
        self.use_noise = use_noise
        self.activation = activation
        self.conv_clamp = conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.act_gain = LRELU_GAIN if activation == "lrelu" else 1.0
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", fused_modconv: bool = True) -> Tensor:
        """``x [N, I, res/up, res/up]``, ``w [N, w_dim]`` -> ``[N, O, res, res]`` in the dtype of ``x``."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r} is not allowed; choose one of {NOISE_MODES}")
        in_res = self.resolution // self.up
        _check_shape("x", x, [None, self.in_channels, in_res, in_res], "[N, I, H, W]")
        styles = self.affine(w)

        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device)
            noise = noise * self.noise_strength
        if self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength

        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter, flip_weight=(self.up == 1),
                             fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), act=self.activation, gain=self.act_gain, clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """1x1 modulated conv (no demodulation) + bias, clamped (NVIDIA ``ToRGBLayer``).

    Parameters: ``weight [C_img, I, 1, 1]``, ``bias [C_img]``, ``affine.weight [I, w_dim]``, ``affine.bias [I]``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor, w: Tensor, fused_modconv: bool = True) -> Tensor:
        """``x [N, I, H, W]``, ``w [N, w_dim]`` -> ``[N, C_img, H, W]`` in the dtype of ``x``."""
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused_modconv=fused_modconv)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the skip generator: (const | conv0 up) -> conv1 -> ToRGB, plus the upsampled image.

    ``b4``: ``const [C, 4, 4]``, ``conv1``, ``torgb``. Others: ``conv0`` (up 2), ``conv1``, ``torgb``.
    Every block has a ``resample_filter [4, 4]`` buffer for the image upsampling.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, resample_filter: Sequence[float] = (1, 3, 3, 1), conv_clamp: float | None = None,
                 use_fp16: bool = False, use_noise: bool = True, activation: str = "lrelu") -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.w_dim = w_dim
        self.resolution = resolution
        self.img_channels = img_channels
        self.is_last = is_last
        self.use_fp16 = use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = 0
        self.num_torgb = 0
        layer_kwargs = dict(w_dim=w_dim, resolution=resolution, resample_filter=resample_filter,
                            conv_clamp=conv_clamp, use_noise=use_noise, activation=activation)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, **layer_kwargs)
        self.num_conv += 1
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
        self.num_torgb += 1

    def compute_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        """float16 for fp16 blocks on CUDA (unless ``force_fp32``), else float32."""
        return torch.float16 if self.use_fp16 and not force_fp32 and _fp16_supported(device) else torch.float32

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, force_fp32: bool = False,
                fused_modconv: bool | None = None, noise_mode: str = "const",
                with_rgb: bool = True) -> tuple[Tensor, Tensor | None]:
        """Run the block.

        Args:
            x: ``[N, C_in, res/2, res/2]`` features of the previous block (``None`` for b4).
            img: ``[N, C_img, res/2, res/2]`` float32 image so far (``None`` for b4 or without RGB).
            ws: ``[N, num_conv + num_torgb, w_dim]``.
            fused_modconv: ``None`` = NVIDIA's rule: fused in eval mode when fp32 or batch 1.
            with_rgb: ``False`` skips ToRGB and the image (features only).

        Returns:
            ``(x [N, C_out, res, res]`` in the block dtype, ``img [N, C_img, res, res]`` float32 or ``None)``.
        """
        _check_shape("ws", ws, [None, self.num_conv + self.num_torgb, self.w_dim], "[N, num_conv+num_torgb, w_dim]")
        batch = ws.shape[0]
        dtype = self.compute_dtype(ws.device, force_fp32)
        if fused_modconv is None:
            fused_modconv = (not self.training) and (dtype == torch.float32 or batch == 1)
        w_iter = iter(ws.unbind(dim=1))

        if self.in_channels == 0:
            x = self.const.to(dtype=dtype).unsqueeze(0).repeat([batch, 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
        else:
            half = self.resolution // 2
            _check_shape("x", x, [batch, self.in_channels, half, half], "[N, C_in, H, W]")
            x = x.to(dtype=dtype)
            x = self.conv0(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode, fused_modconv=fused_modconv)

        if with_rgb:
            if img is not None:
                half = self.resolution // 2
                _check_shape("img", img, [batch, self.img_channels, half, half], "[N, C_img, H, W]")
                img = upsample2d(img, self.resample_filter)
            y = self.torgb(x, next(w_iter), fused_modconv=fused_modconv).to(torch.float32)
            img = img + y if img is not None else y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws ``[N, num_ws, w_dim]`` -> image ``[N, C_img, R, R]`` (NVIDIA ``SynthesisNetwork``, skip architecture);
    blocks ``b4``, ``b8``, ..., ``b{R}``."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 0, conv_clamp: float | None = None,
                 architecture: str = "skip", resample_filter: Sequence[float] = (1, 3, 3, 1),
                 use_noise: bool = True, activation: str = "lrelu") -> None:
        super().__init__()
        cfg = GeneratorConfig(img_resolution=img_resolution, w_dim=w_dim, img_channels=img_channels,
                              synthesis=SynthesisConfig(channel_base=channel_base, channel_max=channel_max,
                                                        num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
                                                        architecture=architecture, resample_filter=resample_filter,
                                                        use_noise=use_noise, activation=activation))
        self.w_dim = w_dim
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.block_resolutions = cfg.block_resolutions
        self.num_ws = 0
        for res in self.block_resolutions:
            block = SynthesisBlock(cfg.channels(res // 2) if res > 4 else 0, cfg.channels(res), w_dim=w_dim,
                                   resolution=res, img_channels=img_channels, is_last=(res == img_resolution),
                                   resample_filter=cfg.synthesis.resample_filter, conv_clamp=cfg.synthesis.conv_clamp,
                                   use_fp16=(res >= cfg.fp16_resolution),
                                   use_noise=use_noise, activation=activation)
            self.num_ws += block.num_conv
            if res == img_resolution:
                self.num_ws += block.num_torgb
            setattr(self, f"b{res}", block)

    def forward(self, ws: Tensor, noise_mode: str = "const", return_features: bool = False,
                force_fp32: bool = False, fused_modconv: bool | None = None,
                stop_after: int | None = None) -> Tensor | tuple[Tensor | None, list[Tensor]]:
        """Synthesise images (and/or the per-block features).

        Args:
            ws: ``[N, num_ws, w_dim]``; block ``b{res}`` reads ``ws[:, i : i + num_conv + 1]`` where ``i``
                counts the convs before it (b4: ws[0..1], b8: ws[1..3], b16: ws[3..5], ...).
            noise_mode: ``'const'`` (the stored ``noise_const``; deterministic), ``'random'`` (fresh
                Gaussian noise per call) or ``'none'``.
            return_features: also return ``features``: the output ``x`` of every block run, b4 first
                (``[N, C_res, res, res]`` in the block's dtype; index 5 is b128, DragGAN's feature map).
            force_fp32: run fp16 blocks in fp32.
            fused_modconv: ``None`` = NVIDIA's rule (fused in eval mode when fp32 or batch 1).
            stop_after: stop after block ``b{stop_after}``: later blocks and every ToRGB are skipped and the
                image is ``None``. Requires ``return_features=True``.

        Returns:
            ``img [N, C_img, R, R]`` float32, or ``(img, features)`` with ``return_features``.
        """
        _check_shape("ws", ws, [None, self.num_ws, self.w_dim], "[N, num_ws, w_dim]")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r} is not allowed; choose one of {NOISE_MODES}")
        if stop_after is not None:
            if stop_after not in self.block_resolutions:
                raise ValueError(f"stop_after={stop_after!r} is not a block resolution; choose one of "
                                 f"{self.block_resolutions}")
            if not return_features:
                raise ValueError("stop_after skips the image, so it needs return_features=True")
        ws = ws.to(torch.float32)
        x = img = None
        features: list[Tensor] = []
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            x, img = block(x, img, block_ws, force_fp32=force_fp32, fused_modconv=fused_modconv,
                           noise_mode=noise_mode, with_rgb=stop_after is None)
            if return_features:
                features.append(x)
            if res == stop_after:
                break
        if return_features:
            return img, features
        return img


class Generator(nn.Module):
    """StyleGAN2 generator: ``mapping`` (z, c -> ws) then ``synthesis`` (ws -> image).

    Construction mirrors NVIDIA's ``Generator(z_dim, c_dim, w_dim, img_resolution, img_channels,
    mapping_kwargs, synthesis_kwargs)``; see :class:`GeneratorConfig` for every field. Use
    :meth:`from_config` with :func:`stylegan2_config` presets, or
    :func:`dragrt.runtime.models.stylegan2_convert.load_generator` for converted checkpoints.
    ``state_dict()`` keys are NVIDIA's (``synthesis.b4.const``, ``mapping.fc0.weight``, ``mapping.w_avg``, ...).
    """

    def __init__(self, z_dim: int = 512, c_dim: int = 0, w_dim: int = 512, img_resolution: int | None = None,
                 img_channels: int = 3, mapping_kwargs: Mapping[str, Any] | None = None,
                 synthesis_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if img_resolution is None:
            raise ValueError("img_resolution is required (a power of two >= 4)")
        self.config = GeneratorConfig.from_dict({
            "z_dim": z_dim, "c_dim": c_dim, "w_dim": w_dim, "img_resolution": img_resolution,
            "img_channels": img_channels, "mapping_kwargs": dict(mapping_kwargs or {}),
            "synthesis_kwargs": dict(synthesis_kwargs or {}),
        })
        cfg = self.config
        self.z_dim = cfg.z_dim
        self.c_dim = cfg.c_dim
        self.w_dim = cfg.w_dim
        self.img_resolution = cfg.img_resolution
        self.img_channels = cfg.img_channels
        s = cfg.synthesis
        self.synthesis = SynthesisNetwork(w_dim=cfg.w_dim, img_resolution=cfg.img_resolution,
                                          img_channels=cfg.img_channels, channel_base=s.channel_base,
                                          channel_max=s.channel_max, num_fp16_res=s.num_fp16_res,
                                          conv_clamp=s.conv_clamp, architecture=s.architecture,
                                          resample_filter=s.resample_filter, use_noise=s.use_noise,
                                          activation=s.activation)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=cfg.z_dim, c_dim=cfg.c_dim, w_dim=cfg.w_dim, num_ws=self.num_ws,
                                      **dataclasses.asdict(cfg.mapping))

    @classmethod
    def from_config(cls, config: GeneratorConfig | Mapping[str, Any]) -> Generator:
        """Build from a :class:`GeneratorConfig` or its dict form (NVIDIA ``init_kwargs`` are accepted too)."""
        cfg = config if isinstance(config, GeneratorConfig) else GeneratorConfig.from_dict(config)
        return cls(**cfg.to_dict())

    def forward(self, z: Tensor, c: Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None,
                **synthesis_kwargs: Any) -> Tensor | tuple[Tensor | None, list[Tensor]]:
        """``z [N, z_dim]`` -> image ``[N, C_img, R, R]``.

        ``synthesis_kwargs`` go to :meth:`SynthesisNetwork.forward` (``noise_mode``, ``return_features``, ...).
        """
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, **synthesis_kwargs)
