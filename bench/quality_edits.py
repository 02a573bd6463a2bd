"""Quality of attribute edits on the model zoo's world: sliders and blended (masked) edits.

Two scorers, both measured by the attribute model ``zoo:faces-attributes`` (load it with
:func:`dragrt.zoo.evaluators.load_attribute_model`; it takes images in [-1, 1], resized to 256 px):

:func:`score_slider` scores one face edited at several slider scales ``s_0 .. s_{S-1}`` along one continuous
attribute ``a`` of :data:`dragrt.zoo.world.CONTINUOUS`. With ``v_i`` the attribute model's prediction of ``a``
on image ``i``:

- ``values``: the ``v_i``, in the order of ``scales`` (attributes are in [0, 1]).
- ``slope``: the least-squares slope of ``v`` against the scale: attribute change per unit of slider scale
  (0 = the slider does nothing to ``a``). ``intercept`` is the fitted value at scale 0.
- ``r2``: the fit's coefficient of determination, ``1 - SS_res / SS_tot`` (1 = the change is linear in the
  scale); ``None`` when the predictions do not vary at all (``SS_tot = 0``), where it is undefined.
- ``reference_scale``: the scale closest to 0 (the first one on a tie); the image at it is the reference.
- ``drift``: for every *other* continuous attribute, the largest absolute difference, over all scales, of its
  prediction from its prediction on the reference image (0 = the slider leaves it alone). ``mean_drift`` is
  their mean, ``max_drift`` / ``max_drift_attribute`` the largest one and its name.
- ``categorical_kept``: the fraction of the categorical attributes (:data:`dragrt.zoo.world.CATEGORICAL`)
  whose predicted class is the reference image's at every scale (1 = none flips); ``categorical_changed``
  names the ones that flip.

:func:`score_blend` scores one blended edit: an original image, the edited image and the mask of the region
the edit was meant to change, with target classes for some categorical attributes:

- ``predicted`` / ``success``: per target attribute, the class the attribute model predicts on the whole
  edited image and whether it equals the target; ``success_rate`` is the fraction of targets met.
  ``target_probability`` is the model's softmax probability of the target class on the edited image, and
  ``original_predicted`` the class it predicts on the original (a target already met there is no edit).
- ``psnr_outside_mask`` (dB, peak 1 on [0, 1] images, capped at :data:`dragrt.bench.quality.PSNR_MAX_DB` for
  identical pixels) and ``ssim_outside_mask`` (:func:`dragrt.bench.quality.ssim`: Gaussian window, computed on
  the whole image, averaged over the pixels outside the mask) between the edited and the original image.
- ``changed_fraction_outside_mask``: the fraction of pixels outside the mask where some channel differs by more
  than :data:`CHANGE_TOLERANCE` (one uint8 level) between edited and original (0 = untouched outside).
- ``mask_fraction``: the fraction of the image inside the mask.

Calibration editors built from the renderer's ground truth check the scorers without any generator:
:func:`oracle_slider` re-renders a face with one continuous attribute shifted per scale, and
:func:`oracle_blend` re-renders it with categorical attributes changed, masked where the pixels differ.

The attribute model alone reads ``smile``, ``nose_size`` and ``brow_tilt`` at chance (held-out MAE ~0.25: a few
pixels of the face carry them); with ``zoo:faces-attribute-details`` installed (shipped),
``load_attribute_model()`` reads them and the other landmark-borne attributes from the landmark regressor's
estimates and a nose patch (held-out MAE 0.03-0.05 for all 13; ``face_width`` stays the attribute model's, 0.16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dragrt.bench import quality
from dragrt.zoo import world

#: oracle_slider: attribute change per unit of slider scale (attributes are in [0, 1]).
DEFAULT_STEP = 0.2
#: oracle_blend: the changed pixels are dilated by a disc of this radius (pixels, whatever the size). It covers
#: the reach of the SSIM window (11 taps: up to 5 px in x and in y, 7.1 px away), so that the SSIM outside the
#: mask of a perfect edit is exactly 1 (with 4 px it measured 0.995-0.9995: the window saw the edit).
BLEND_MASK_DILATION_PX = 8.0
#: score_blend: a pixel outside the mask counts as changed when some channel moves by more than this (in [0, 1]).
CHANGE_TOLERANCE = 1.0 / 255.0
#: Images may overshoot [-1, 1] by this much (resampling ringing); they are clamped to [-1, 1] before scoring.
RANGE_SLACK = 0.04
MIN_SIZE = 16
_BATCH = 16


# --------------------------------------------------------------------------------------------------------
# Input checks


def _check_images(name: str, images: Any, *, batch: int | None = None, min_batch: int = 1) -> Tensor:
    """A float tensor ``[N, 3, H, W]`` in [-1, 1] (clamped copy), or ValueError naming ``name``."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch tensor [N, 3, H, W] in [-1, 1]; got {type(images).__name__}")
    shape = list(images.shape)
    if images.dim() != 4 or shape[1] != 3:
        raise ValueError(f"{name} must be [N, 3, H, W] (RGB) in [-1, 1]; got shape {shape}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} must hold exactly {batch} image(s), got {shape[0]} (shape {shape})")
    if shape[0] < min_batch:
        raise ValueError(f"{name} must hold at least {min_batch} images, got {shape[0]} (shape {shape})")
    if min(shape[2:]) < MIN_SIZE:
        raise ValueError(f"{name} must be at least {MIN_SIZE}x{MIN_SIZE} px; got {shape[3]}x{shape[2]}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1]; got {images.dtype}")
    x = images.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; use finite values in [-1, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        raise ValueError(f"{name} values span [{lo:.3g}, {hi:.3g}]; images must be in [-1, 1]")
    return x.clamp(-1.0, 1.0)


def _check_scales(scales: Any, n: int | None = None) -> np.ndarray:
    try:
        s = np.asarray([float(v) for v in scales], np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"scales must be a sequence of finite floats; got {scales!r}") from None
    if n is not None and len(s) != n:
        raise ValueError(f"scales must have one value per image: len(scales)={len(s)}, images hold {n}")
    if len(s) < 2:
        raise ValueError(f"scales must hold at least 2 values; got {len(s)}")
    if not np.isfinite(s).all():
        raise ValueError(f"scales must be finite floats; got {s.tolist()}")
    if np.ptp(s) == 0:
        raise ValueError(f"scales must not all be equal (no slope to fit); got {s.tolist()}")
    return s


def _check_continuous(attribute: Any) -> str:
    if attribute not in world.CONTINUOUS_INDEX:
        raise ValueError(f"attribute={attribute!r} is not allowed; choose one of: {', '.join(world.CONTINUOUS)}")
    return str(attribute)


def _check_target(target: Any) -> dict[str, int]:
    """``{categorical attribute: class name or index}`` -> ``{name: class index}``."""
    if not isinstance(target, Mapping) or not target:
        raise ValueError(f"target must be a non-empty dict of categorical attribute -> class; got {target!r}")
    out: dict[str, int] = {}
    for name, cls in target.items():
        if name not in world.CATEGORICAL:
            raise ValueError(f"target attribute {name!r} is not allowed; choose one of: "
                             f"{', '.join(world.CATEGORICAL)}")
        classes = world.CATEGORICAL[name]
        if isinstance(cls, str):
            if cls not in classes:
                raise ValueError(f"target {name}={cls!r} is not allowed; choose one of: {', '.join(classes)}")
            out[name] = classes.index(cls)
        elif isinstance(cls, (int, np.integer)) and not isinstance(cls, bool) and 0 <= int(cls) < len(classes):
            out[name] = int(cls)
        else:
            raise ValueError(f"target {name}={cls!r} is not allowed; use a class name ({', '.join(classes)}) "
                             f"or an index from 0 to {len(classes) - 1}")
    return out


def _check_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` with 1 = edited region (bool or values in [0, 1], threshold 0.5) -> bool ``[H, W]``."""
    m = mask.detach().float().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if m.ndim == 4 and m.shape[:2] == (1, 1):
        m = m[0, 0]
    if m.shape != shape:
        raise ValueError(f"mask must be [H, W] = {list(shape)} (1 = edited region); got shape {list(m.shape)}")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number):
            raise ValueError(f"mask must be bool or numbers in [0, 1]; got dtype {m.dtype}")
        m = m.astype(np.float64)
        if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError("mask values must be finite and in [0, 1] (1 = edited region)")
        m = m > 0.5
    if not m.any():
        raise ValueError("mask selects no pixel; mark the edited region with 1")
    if m.all():
        raise ValueError("mask covers the whole image; leave some pixels outside it (0) to score fidelity")
    return m


# --------------------------------------------------------------------------------------------------------
# Scorers


def _model_input(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def _predict(images: Tensor, attribute_model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(continuous ``[N, K]``, categorical class indices ``[N, M]``, softmax probabilities per name ``[N, C]``)."""
    dev, dt = _model_input(attribute_model)
    cont, cat, probs = [], [], []
    for i in range(0, images.shape[0], _BATCH):
        out = attribute_model(images[i : i + _BATCH].to(dev, dt))
        cont.append(out.continuous.float().cpu().numpy())
        cat.append(out.categorical.cpu().numpy())
        probs.append({n: out.probs(n).cpu().numpy() for n in world.CATEGORICAL})
    return (np.concatenate(cont).astype(np.float64), np.concatenate(cat),
            {n: np.concatenate([p[n] for p in probs]) for n in world.CATEGORICAL})


#: Readings that spread less than this (times ``max(1, |mean|)``) are constant: the attribute readers compute in
#: float32, whose batched layers round the rows of one batch apart by a few 1e-9, and an R^2 of that is noise.
_CONSTANT_SPREAD = 1e-6


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float | None]:
    """Least-squares ``y ~ slope * x + intercept``: (slope, intercept, R^2 or None when y is constant to the
    readers' float32 resolution, :data:`_CONSTANT_SPREAD`)."""
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    intercept = float(ym - slope * xm)
    ss_tot = float(((y - ym) ** 2).sum())
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    constant = float(y.max() - y.min()) <= _CONSTANT_SPREAD * max(1.0, abs(float(ym)))
    return slope, intercept, (None if constant else 1.0 - ss_res / ss_tot)


def score_slider(images: Tensor, scales: Sequence[float], attribute: str,
                 attribute_model: torch.nn.Module) -> dict[str, Any]:
    """Score a slider edit: the same face at ``S`` slider scales (numbers: module docstring).

    Args:
        images: float ``[S, 3, H, W]`` in [-1, 1], ``S >= 2``, image ``i`` at ``scales[i]``.
        scales: ``S`` finite floats, not all equal (any order).
        attribute: the continuous attribute the slider drives, one of :data:`dragrt.zoo.world.CONTINUOUS`.
        attribute_model: ``load_attribute_model()`` in eval mode.

    Returns:
        ``attribute``, ``scales``, ``values``, ``slope``, ``intercept``, ``r2``, ``reference_scale``, ``drift``
        (dict), ``mean_drift``, ``max_drift``, ``max_drift_attribute``, ``categorical_kept``,
        ``categorical_changed``.
    """
    x = _check_images("images", images, min_batch=2)
    s = _check_scales(scales, x.shape[0])
    attribute = _check_continuous(attribute)
    cont, cat, _ = _predict(x, attribute_model)
    k = world.CONTINUOUS_INDEX[attribute]
    values = cont[:, k]
    slope, intercept, r2 = _fit_line(s, values)
    ref = int(np.argmin(np.abs(s)))
    dev = np.abs(cont - cont[ref]).max(0)
    drift = {n: float(dev[i]) for i, n in enumerate(world.CONTINUOUS) if n != attribute}
    worst = max(drift, key=drift.__getitem__)
    kept = (cat == cat[ref]).all(0)
    return {
        "attribute": attribute,
        "scales": s.tolist(),
        "values": values.tolist(),
        "slope": slope,
        "intercept": intercept,
        "r2": r2,
        "reference_scale": float(s[ref]),
        "drift": drift,
        "mean_drift": float(np.mean(list(drift.values()))),
        "max_drift": drift[worst],
        "max_drift_attribute": worst,
        "categorical_kept": float(kept.mean()),
        "categorical_changed": [n for i, n in enumerate(world.CATEGORICAL) if not kept[i]],
    }


def _unit_hwc(x: Tensor) -> np.ndarray:
    """``[1, 3, H, W]`` in [-1, 1] -> float32 ``[H, W, 3]`` in [0, 1]."""
    return ((x[0].permute(1, 2, 0) + 1.0) * 0.5).clamp(0, 1).numpy().astype(np.float32)


def score_blend(edited: Tensor, original: Tensor, mask: Any, target: Mapping[str, str | int],
                attribute_model: torch.nn.Module) -> dict[str, Any]:
    """Score a blended (masked) edit (numbers: module docstring).

    Args:
        edited, original: float ``[1, 3, H, W]`` in [-1, 1], the same size.
        mask: ``[H, W]`` (tensor or array; bool or values in [0, 1], thresholded at 0.5), 1 = the region the edit
            was meant to change. It must leave pixels both inside and outside.
        target: categorical attribute -> wanted class (name or index), e.g. ``{"hat": "cap"}``.
        attribute_model: ``load_attribute_model()`` in eval mode.

    Returns:
        ``target`` (class names), ``predicted``, ``original_predicted``, ``success`` (dicts by attribute),
        ``target_probability``, ``success_rate``, ``psnr_outside_mask``, ``ssim_outside_mask``,
        ``changed_fraction_outside_mask``, ``mask_fraction``.
    """
    e = _check_images("edited", edited, batch=1)
    o = _check_images("original", original, batch=1)
    if e.shape != o.shape:
        raise ValueError(f"edited and original must have the same shape; got {list(e.shape)} and {list(o.shape)}")
    m = _check_mask(mask, tuple(e.shape[-2:]))
    want = _check_target(target)
    _, cat, probs = _predict(torch.cat([e, o]), attribute_model)
    names = {n: world.CATEGORICAL[n] for n in want}
    idx = {n: world.CATEGORICAL_NAMES.index(n) for n in want}
    success = {n: bool(cat[0, idx[n]] == c) for n, c in want.items()}
    a, b = _unit_hwc(e), _unit_hwc(o)
    outside = ~m
    changed = np.abs(a - b).max(-1) > CHANGE_TOLERANCE
    return {
        "target": {n: names[n][c] for n, c in want.items()},
        "predicted": {n: names[n][int(cat[0, idx[n]])] for n in want},
        "original_predicted": {n: names[n][int(cat[1, idx[n]])] for n in want},
        "success": success,
        "target_probability": {n: float(probs[n][0, c]) for n, c in want.items()},
        "success_rate": float(np.mean(list(success.values()))),
        "psnr_outside_mask": quality.psnr(a, b, outside),
        "ssim_outside_mask": quality.ssim(a, b, outside),
        "changed_fraction_outside_mask": float(changed[outside].mean()),
        "mask_fraction": float(m.mean()),
    }


# --------------------------------------------------------------------------------------------------------
# Calibration editors (renderer ground truth)


def _to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """uint8 ``[H, W, 3]`` images -> float32 ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def oracle_slider(seed: int, attribute: str, scales: Sequence[float], size: int = world.IMAGE_SIZE, *,
                  step: float = DEFAULT_STEP) -> tuple[Tensor, np.ndarray]:
    """The perfect slider: face ``world.sample_params(seed)`` re-rendered with ``attribute`` set to
    ``clip(v0 + scale * step, 0, 1)`` per scale, ``v0`` its own value.

    The world only accepts attributes in [0, 1], so values are clipped there: near the ends of the range the
    ground truth saturates and its slope is below ``step``. Compare a measured slope with the least-squares
    slope of the returned ground-truth values against ``scales``, not with ``step``.

    Args:
        seed: a face seed in [0, 2**63) (held-out seeds: :func:`dragrt.zoo.world.held_out_seeds`).
        attribute: one of :data:`dragrt.zoo.world.CONTINUOUS`.
        scales: at least 2 finite floats, not all equal.
        size: image size in pixels, 16 to 2048 (the attribute model reads 256).
        step: attribute change per unit of scale, in (0, 1].

    Returns:
        (images float32 ``[S, 3, size, size]`` in [-1, 1], ground-truth attribute values float64 ``[S]``).
    """
    attribute = _check_continuous(attribute)
    s = _check_scales(scales)
    if not (isinstance(step, (int, float)) and 0 < step <= 1):
        raise ValueError(f"step={step!r} is not allowed; use a number in (0, 1]")
    p = world.sample_params(seed)
    values = np.clip(getattr(p, attribute) + s * float(step), 0.0, 1.0)
    images = [world.render(p.replace(**{attribute: float(v)}), size).image for v in values]
    return _to_tensor(images), values


def oracle_blend(seed: int, target: Mapping[str, str | int], size: int = world.IMAGE_SIZE
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The perfect blended edit: face ``world.sample_params(seed)`` and the same face with the ``target``
    categorical classes, with the mask of every pixel that differs (any channel), dilated by a disc of
    :data:`BLEND_MASK_DILATION_PX` pixels.

    Raises ValueError when a target class is already the face's, or when the change is invisible (a hair
    style under a hat): there is nothing to edit.

    Returns:
        (original ``[1, 3, size, size]``, edited ``[1, 3, size, size]``, both float32 in [-1, 1], mask float32
        ``[size, size]`` with 1 = edited region).
    """
    want = _check_target(target)
    p = world.sample_params(seed)
    same = [n for n, c in want.items() if getattr(p, n) == world.CATEGORICAL[n][c]]
    if same:
        raise ValueError(f"target {', '.join(f'{n}={getattr(p, n)!r}' for n in same)} is already the face's "
                         f"class for seed {seed}; choose another class or seed")
    a = world.render(p, size).image
    b = world.render(p.replace(**{n: world.CATEGORICAL[n][c] for n, c in want.items()}), size).image
    diff = (a != b).any(-1)
    if not diff.any():
        raise ValueError(f"target {dict(target)!r} changes no pixel of seed {seed} (hidden); choose another")
    mask = quality.disc_dilate(diff, BLEND_MASK_DILATION_PX)
    images = _to_tensor([a, b])
    return images[:1], images[1:], torch.from_numpy(mask.astype(np.float32))


__all__ = [
    "BLEND_MASK_DILATION_PX",
    "CHANGE_TOLERANCE",
    "DEFAULT_STEP",
    "oracle_blend",
    "oracle_slider",
    "score_blend",
    "score_slider",
]

