"""Quality of the drag methods on the model zoo's world: a fixed suite of drag tasks with exact ground truth.

Every task is a held-out face ``p`` of :mod:`dragrt.zoo.world` and an edit ``p' = p.replace(...)`` of one of
its attributes. The image to edit is ``render(p)``, the prompt its caption, the handles are named landmarks
of ``render(p)`` and the targets the same landmarks of ``render(p')``: a perfect drag turns the image into
``render(p')``. Kinds (:data:`KINDS`), with the ground-truth displacements measured on the first 20 tasks
of each kind at 256 px:

- ``mouth_corner``: ``smile`` 0-0.2 -> +0.6-0.75 (smile up). One handle: a mouth corner (8-11 px); several:
  both corners (8-11 px).
- ``open_mouth``: ``mouth_open`` 0-0.1 -> 0.8-1. One: ``lower_lip`` (10-13 px); several: ``upper_lip``
  (4.5-5 px) and ``lower_lip``.
- ``raise_eyebrow``: ``brow_raise`` 0-0.1 -> 0.9-1. One: the inner or outer point of a brow (6-8 px);
  several: both points of that brow.
- ``move_eye``: ``eye_height`` +-0.55-0.75 and ``gaze`` +-0.3-0.45 (the eyes move, the pupils within them).
  One: a pupil (8-11 px); several: both pupils.
- ``turn_head``: ``head_yaw`` 0.4-0.6 -> +-0.2-0.3 (10-14 degrees). One: ``nose_tip`` (11-19 px); several:
  ``nose_tip`` and ``chin`` (4.5-8 px).

The world's attribute ranges bound how far a landmark can move (a full brow raise is about 8 px), so some
displacements stay under 8 px. A task is skipped when a dragged landmark moves less than
:data:`MIN_DISPLACEMENT_PX` or more than :data:`MAX_DISPLACEMENT_PX`, or is not visible at its start and at
its end (a pixel within 3 px of each must change by :data:`VISIBLE_CONTRAST` levels or more: not so for a brow
under a hat, or brown brows on dark brown skin). Each kind cycles through four variants: one or several
handles, with or without a mask.

The **region** of a task is what the edit may change: every pixel that differs between ``render(p)`` and
``render(p')``, plus the start and end of every landmark that moves, dilated by a disc of
:data:`MASK_MARGIN_PX` (24 px). Masked tasks pass it to the editor as the mask (1 = may change); unmasked
tasks pass none, and both are scored outside the same region, so the two variants are comparable.

Scores of one edit (:func:`score_edit`), measured by the zoo's evaluators (``zoo:faces-landmarks``: mean
error 0.31 px on held-out renders; ``zoo:faces-attributes``):

- ``drag_error_px``: mean distance from the dragged landmarks, as the landmark regressor finds them in the
  edited image, to their targets. ``handle_start_error_px`` is the same measure on the unedited image (what
  doing nothing scores); ``displacement_px`` the ground-truth handle-to-target distance.
- ``drag_success``: the fraction of dragged landmarks within :data:`SUCCESS_RADIUS_PX` (3 px) of their
  targets. The suite's displacements are at least 4 px, so doing nothing scores 0.
- ``psnr_outside_mask`` (dB, capped at :data:`PSNR_MAX_DB` for identical pixels) and ``ssim_outside_mask``
  (Gaussian window 11, sigma 1.5, computed on the whole image with reflected borders and averaged over the
  pixels outside the region), against the source image.
- ``feature_distance``: ``|f(source) - f(composite)| / mean(|f(source)|, |f(composite)|)`` with ``f`` the
  attribute model's feature vector and ``composite`` the edited image outside the region and the source
  inside it, so that only changes outside the region count (0 = none). ``feature_distance_full`` is the
  same between source and edited image: how much the edit changed the face as a whole (the oracle's value
  is the size of a perfect edit).
- ``untouched_landmark_drift_px``: landmarks the edit does not move (ground truth) and that lie outside
  the region: mean distance between the regressor's estimates on the source and on the edited image.
  ``None`` when the task has none (a head turn moves every landmark).

Editors are callables ``editor(task) -> image`` (uint8 ``[H, W, 3]``, float ``[H, W, 3]`` or torch
``[1, 3, H, W]`` in [0, 1]) or ``-> EditOutput`` when the edit starts from another image than the task's
(DragGAN edits the projection of the render into its latent space) or times only part of the call.
:func:`run_suite` runs one editor over the tasks; :func:`compare_modes` pairs two runs (a method's fast and
reference modes) task by task.

Calibration editors: :func:`identity_editor` (returns the input: drag error = the displacement) and
:func:`oracle_editor` (re-renders ``p'``: drag error = the regressor's error, well under 1 px).

Pixel constants are at 256 px and scale with the task size. Errors are in pixels of the task image.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dragrt.bench import harness
from dragrt.zoo import world

KINDS: tuple[str, ...] = ("mouth_corner", "open_mouth", "raise_eyebrow", "move_eye", "turn_head")
#: (several handles, masked) per variant; task j of kind k gets variant (j + k) % 4.
VARIANTS: tuple[tuple[bool, bool], ...] = ((False, True), (True, True), (False, False), (True, False))
REFERENCE_SIZE = 256
MIN_DISPLACEMENT_PX = 4.0
MAX_DISPLACEMENT_PX = 40.0
MASK_MARGIN_PX = 24.0
SUCCESS_RADIUS_PX = 3.0
#: A landmark whose ground truth moves at most this much counts as untouched by the edit.
UNTOUCHED_TOLERANCE_PX = 0.25
#: A dragged landmark must have a pixel within this distance of its start, and one of its end, that the edit changes
#: by at least VISIBLE_CONTRAST (of 255, in some channel): otherwise it is hidden (a brow under a hat) or too faint
#: to see (brown brows on dark brown skin, where the regressor missed by 4.5 px).
VISIBLE_RADIUS_PX = 3.0
VISIBLE_CONTRAST = 32
PSNR_MAX_DB = 100.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
#: compare_modes: mean paired drag-error differences up to this many px count as equal whatever the spread.
NOISE_FLOOR_PX = 0.1
#: Candidate held-out faces per (suite seed, kind).
_SEEDS_PER_KIND = 10_000
_MAX_SUITE_SEED = 10**6

METRICS: tuple[str, ...] = (
    "drag_error_px", "handle_start_error_px", "displacement_px", "drag_success", "psnr_outside_mask",
    "ssim_outside_mask", "feature_distance", "feature_distance_full", "untouched_landmark_drift_px",
    "landmark_confidence",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class DragTask:
    """One drag task with its ground truth.

    Attributes:
        name: unique in the suite, e.g. ``"mouth_corner-h17-multi-mask"`` (``h17`` = held-out face 17).
        kind: one of :data:`KINDS`.
        seed: the held-out face seed (``world.HELD_OUT_OFFSET + i``) whose params are edited.
        image: uint8 ``[S, S, 3]``, ``render(params, S)``.
        prompt: the caption of ``params``.
        handle_points, target_points: ``[[x, y], ...]`` pixels of ``image`` (pixel centres at integers): the
            dragged landmarks in ``render(params)`` and in ``render(target_params)``.
        landmarks: names of the dragged landmarks, in handle order.
        mask: uint8 ``[S, S]`` with 1 = may change (the region), or ``None`` for the unmasked variant.
        region: bool ``[S, S]``: what the edit may change; scores outside it measure fidelity.
        untouched: landmarks that the edit does not move and that lie outside the region.
        params, target_params: the face before and after the edit.
        variant: ``"single"`` or ``"multi"`` (several handles).
        size: ``S``.
    """

    name: str
    kind: str
    seed: int
    image: np.ndarray
    prompt: str
    handle_points: list[list[float]]
    target_points: list[list[float]]
    landmarks: tuple[str, ...]
    mask: np.ndarray | None
    region: np.ndarray
    untouched: tuple[str, ...]
    params: world.FaceParams
    target_params: world.FaceParams
    variant: str
    size: int = REFERENCE_SIZE

    @property
    def masked(self) -> bool:
        return self.mask is not None

    @property
    def displacement_px(self) -> float:
        """Mean ground-truth handle-to-target distance, pixels."""
        d = np.asarray(self.target_points, np.float64) - np.asarray(self.handle_points, np.float64)
        return float(np.linalg.norm(d, axis=1).mean())

    @property
    def scale(self) -> float:
        """Pixels of this task per pixel at 256."""
        return self.size / REFERENCE_SIZE


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _edit_for(kind: str, p: world.FaceParams, rng: np.random.Generator
              ) -> tuple[world.FaceParams, world.FaceParams, tuple[str, ...], tuple[str, ...]]:
    """(source params, target params, single-handle landmarks, several-handle landmarks) of one kind."""
    if kind == "mouth_corner":
        s = _u(rng, 0.0, 0.2)
        src, dst = p.replace(smile=s), p.replace(smile=min(1.0, s + _u(rng, 0.6, 0.75)))
        one = ("mouth_left",) if rng.random() < 0.5 else ("mouth_right",)
        return src, dst, one, ("mouth_left", "mouth_right")
    if kind == "open_mouth":
        src, dst = p.replace(mouth_open=_u(rng, 0.0, 0.1)), p.replace(mouth_open=_u(rng, 0.8, 1.0))
        return src, dst, ("lower_lip",), ("upper_lip", "lower_lip")
    if kind == "raise_eyebrow":
        src, dst = p.replace(brow_raise=_u(rng, 0.0, 0.1)), p.replace(brow_raise=_u(rng, 0.9, 1.0))
        side = "left" if rng.random() < 0.5 else "right"
        end = "inner" if rng.random() < 0.5 else "outer"
        return src, dst, (f"{side}_brow_{end}",), (f"{side}_brow_outer", f"{side}_brow_inner")
    if kind == "move_eye":
        down = rng.random() < 0.5
        h0 = _u(rng, 0.0, 0.2) if down else _u(rng, 0.8, 1.0)
        h1 = min(1.0, max(0.0, h0 + (1 if down else -1) * _u(rng, 0.55, 0.75)))
        g0 = _u(rng, 0.2, 0.8)
        g1 = min(1.0, max(0.0, g0 + (1 if g0 < 0.5 else -1) * _u(rng, 0.3, 0.45)))
        src, dst = p.replace(eye_height=h0, gaze=g0), p.replace(eye_height=h1, gaze=g1)
        one = ("left_pupil",) if rng.random() < 0.5 else ("right_pupil",)
        return src, dst, one, ("left_pupil", "right_pupil")
    if kind == "turn_head":
        y0 = _u(rng, 0.4, 0.6)
        y1 = y0 + (1 if rng.random() < 0.5 else -1) * _u(rng, 0.2, 0.3)
        return p.replace(head_yaw=y0), p.replace(head_yaw=y1), ("nose_tip",), ("nose_tip", "chin")
    raise ValueError(f"kind={kind!r} is not allowed; choose one of: {', '.join(KINDS)}")


def disc_dilate(seed: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of a bool ``[H, W]`` map by a disc of ``radius`` pixels."""
    r = int(math.floor(radius))
    if r <= 0:
        return seed.astype(bool).copy()
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = torch.from_numpy(((xx**2 + yy**2) <= radius**2).astype(np.float32))[None, None]
    x = torch.from_numpy(seed.astype(np.float32))[None, None]
    return (F.conv2d(x, kernel, padding=r)[0, 0] > 0.5).numpy()


def _points_map(points: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), bool)
    ij = np.clip(np.rint(points).astype(int), 0, size - 1)
    out[ij[:, 1], ij[:, 0]] = True
    return out


def _make_task(kind: str, face_seed: int, variant: tuple[bool, bool], size: int) -> DragTask | None:
    multi, masked = variant
    rng = np.random.default_rng([face_seed, KINDS.index(kind)])
    src, dst, single_names, multi_names = _edit_for(kind, world.sample_params(face_seed), rng)
    names = multi_names if multi else single_names
    a, b = world.render(src, size), world.render(dst, size)
    scale = size / REFERENCE_SIZE
    idx = [world.LANDMARK_INDEX[n] for n in names]
    handles, targets = a.landmarks[idx].astype(np.float64), b.landmarks[idx].astype(np.float64)
    disp = np.linalg.norm(targets - handles, axis=1)
    if disp.min() < MIN_DISPLACEMENT_PX * scale or disp.max() > MAX_DISPLACEMENT_PX * scale:
        return None
    inside = np.concatenate([handles, targets])
    if (inside < 0).any() or (inside > size - 1).any():
        return None
    diff = np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).max(-1)  # [S, S]
    changed = diff > 0
    near = disc_dilate(diff >= VISIBLE_CONTRAST, VISIBLE_RADIUS_PX * scale)
    for h, t in zip(handles, targets):
        if not (near[_points_map(h[None], size)].any() and near[_points_map(t[None], size)].any()):
            return None  # hidden (under a hat, hair or a moustache) or too faint: nothing to drag
    motion = np.linalg.norm(b.landmarks - a.landmarks, axis=1)
    moved = motion > UNTOUCHED_TOLERANCE_PX * scale
    seed_map = changed | _points_map(np.concatenate([a.landmarks[moved], b.landmarks[moved], inside]), size)
    region = disc_dilate(seed_map, MASK_MARGIN_PX * scale)
    ij = np.clip(np.rint(a.landmarks).astype(int), 0, size - 1)
    untouched = tuple(n for i, n in enumerate(world.LANDMARK_NAMES)
                      if not moved[i] and not region[ij[i, 1], ij[i, 0]])
    tag = f"{'multi' if multi else 'single'}-{'mask' if masked else 'nomask'}"
    return DragTask(
        name=f"{kind}-h{face_seed - world.HELD_OUT_OFFSET}-{tag}", kind=kind, seed=int(face_seed), image=a.image,
        prompt=a.caption, handle_points=handles.tolist(), target_points=targets.tolist(), landmarks=tuple(names),
        mask=region.astype(np.uint8) if masked else None, region=region, untouched=untouched, params=src,
        target_params=dst, variant="multi" if multi else "single", size=size,
    )


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) <= hi:
        raise ValueError(f"{name}={value!r} is not allowed; use an integer from {lo} to {hi}")
    return int(value)


def drag_suite(n_per_kind: int = 4, seed: int = 0, *, size: int = REFERENCE_SIZE,
               kinds: Sequence[str] = KINDS) -> list[DragTask]:
    """The fixed suite: ``n_per_kind`` tasks of every kind, deterministic in (``n_per_kind``, ``seed``, ``size``).

    Args:
        n_per_kind: tasks per kind, 1 to 1000. Task ``j`` of a suite is the same whatever ``n_per_kind``.
        seed: suite seed, 0 to 10**6; each (seed, kind) draws faces from its own range of held-out seeds.
        size: image size in pixels, 64 to 1024, a multiple of 64 (the diffusion engines need it).
        kinds: a subset of :data:`KINDS`.

    Returns:
        The tasks, interleaved by kind (the first ``len(kinds)`` tasks hold one of each), so that a prefix
        of the list is a balanced smaller suite.
    """
    n_per_kind = _check_int("n_per_kind", n_per_kind, 1, 1000)
    seed = _check_int("seed", seed, 0, _MAX_SUITE_SEED)
    size = _check_int("size", size, 64, 1024)
    if size % 64:
        raise ValueError(f"size={size} is not allowed; use a multiple of 64 from 64 to 1024")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds={list(kinds)!r} is not allowed; choose a non-empty subset of: {', '.join(KINDS)}")
    per_kind: list[list[DragTask]] = []
    for k in kinds:
        ki = KINDS.index(k)
        found: list[DragTask] = []
        for face_seed in world.held_out_seeds(_SEEDS_PER_KIND, start=(seed * len(KINDS) + ki) * _SEEDS_PER_KIND):
            task = _make_task(k, face_seed, VARIANTS[(len(found) + ki) % len(VARIANTS)], size)
            if task is not None:
                found.append(task)
                if len(found) == n_per_kind:
                    break
        else:
            raise RuntimeError(f"only {len(found)} of {n_per_kind} {k} tasks found in {_SEEDS_PER_KIND} faces")
        per_kind.append(found)
    return [tasks[j] for j in range(n_per_kind) for tasks in per_kind]


# --------------------------------------------------------------------------------------------------------
# Image metrics


def as_float_image(image: Any, size: int | None = None, what: str = "image") -> np.ndarray:
    """uint8 ``[H, W, 3]``, float ``[H, W, 3]`` in [0, 1], or a torch ``[1, 3, H, W]`` / ``[3, H, W]`` in
    [0, 1] -> float32 ``[H, W, 3]`` in [0, 1]; with ``size``, H and W must equal it."""
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"{what} tensor must be [1, 3, H, W] or [3, H, W] in [0, 1], got {tuple(image.shape)}")
        arr = t.permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{what} must be [H, W, 3] (or a torch [1, 3, H, W]), got shape {list(arr.shape)}")
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(f"{what} is {arr.shape[1]}x{arr.shape[0]} px, the task is {size}x{size}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or floating point in [0, 1], got {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    if arr.min() < -0.02 or arr.max() > 1.02:
        raise ValueError(f"{what} values span [{arr.min():.3g}, {arr.max():.3g}]; float images must be in [0, 1]")
    return arr.clip(0.0, 1.0)


def _region_weights(region: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if region is None:
        return np.ones(shape, bool)
    r = np.asarray(region).astype(bool)
    if r.shape != shape:
        raise ValueError(f"region must be [H, W] = {list(shape)}, got {list(r.shape)}")
    return r


def psnr(a: Any, b: Any, where: np.ndarray | None = None) -> float:
    """PSNR in dB of two images in [0, 1] (peak 1) over the pixels where ``where`` is True (default all),
    capped at :data:`PSNR_MAX_DB` (identical pixels); NaN when ``where`` selects nothing."""
    x, y = as_float_image(a), as_float_image(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {list(x.shape)} vs {list(y.shape)}")
    w = _region_weights(where, x.shape[:2])
    if not w.any():
        return math.nan
    mse = float(np.mean((x[w].astype(np.float64) - y[w].astype(np.float64)) ** 2))
    if mse <= 10 ** (-PSNR_MAX_DB / 10):
        return PSNR_MAX_DB
    return float(-10.0 * math.log10(mse))


def _gaussian_1d(window: int, sigma: float) -> Tensor:
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def ssim_map(a: Any, b: Any, *, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Per-pixel SSIM ``[H, W]`` (mean over RGB) of two images in [0, 1] (data range 1): Gaussian-weighted local
    statistics (``window`` taps, ``sigma`` px, borders reflected), C1 = 0.01**2, C2 = 0.03**2 (Wang et al. 2004)."""
    x = torch.from_numpy(as_float_image(a)).permute(2, 0, 1)[None].double()  # [1, 3, H, W]
    y = torch.from_numpy(as_float_image(b)).permute(2, 0, 1)[None].double()
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {list(x.shape)} vs {list(y.shape)}")
    r = window // 2
    if min(x.shape[-2:]) <= r:
        raise ValueError(f"images of {x.shape[-1]}x{x.shape[-2]} px are too small for a {window}-tap SSIM window")
    g = _gaussian_1d(window, sigma).double()
    kh, kv = g.view(1, 1, 1, -1).repeat(3, 1, 1, 1), g.view(1, 1, -1, 1).repeat(3, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        t = F.pad(t, (r, r, r, r), mode="reflect")
        return F.conv2d(F.conv2d(t, kh, groups=3), kv, groups=3)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + SSIM_C1) * (2 * sxy + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (sxx + syy + SSIM_C2))
    return s.mean(1)[0].float().numpy()


def ssim(a: Any, b: Any, where: np.ndarray | None = None) -> float:
    """:func:`ssim_map` averaged over the pixels where ``where`` is True (default all); NaN if none."""
    m = ssim_map(a, b)
    w = _region_weights(where, m.shape)
    return float(m[w].mean()) if w.any() else math.nan


# --------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class EditOutput:
    """What an editor may return instead of a bare image.

    Attributes:
        image: the edited image (any form :func:`as_float_image` takes) at the task's size.
        source_image: what the edit started from when it is not ``task.image`` (DragGAN: the projection of
            the render); fidelity and landmark drift are measured against it. ``None`` = the task's image.
        target_points: where the dragged landmarks should end, when not ``task.target_points`` (DragGAN:
            the projection's own landmarks plus the ground-truth displacement). Pixels of the task image.
        timings: seconds per phase. ``"edit"``, when present, is what :func:`run_suite` reports as the edit
            time instead of the wall time of the editor call (DragGAN: without the projection, which both
            modes share).
    """

    image: Any
    source_image: Any = None
    target_points: list[list[float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _model_device(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def _batch(images: list[np.ndarray], model: torch.nn.Module) -> Tensor:
    """Float ``[H, W, 3]`` images in [0, 1] -> ``[N, 3, H, W]`` in [-1, 1] on the model's device and dtype."""
    dev, dt = _model_device(model)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).mul(2.0).sub(1.0).to(dev, dt)


@torch.no_grad()
def regress_landmarks(images: list[np.ndarray], landmark_model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Float ``[H, W, 3]`` images in [0, 1] -> (landmarks ``[N, L, 2]`` pixels, confidence ``[N, L]``)."""
    out = landmark_model(_batch(images, landmark_model))
    return out.landmarks.float().cpu().numpy(), out.confidence.float().cpu().numpy()


@torch.no_grad()
def attribute_features(images: list[np.ndarray], attribute_model: torch.nn.Module) -> np.ndarray:
    """Float ``[H, W, 3]`` images in [0, 1] -> the attribute model's feature vectors ``[N, D]``."""
    return attribute_model.features(_batch(images, attribute_model)).float().cpu().numpy()


def _relative_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = 0.5 * (np.linalg.norm(a) + np.linalg.norm(b))
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else 0.0


def score_edit(task: DragTask, edited_image: Any, landmark_model: torch.nn.Module,
               attribute_model: torch.nn.Module, *, source_image: Any = None,
               target_points: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Score one edit of ``task`` (see the module docstring for every number).

    Args:
        edited_image: the editor's output at the task's size (uint8 / float ``[H, W, 3]`` or torch
            ``[1, 3, H, W]``, in [0, 1]).
        landmark_model, attribute_model: ``load_landmark_model()`` / ``load_attribute_model()`` (eval mode).
        source_image: the image the edit started from (default ``task.image``).
        target_points: the dragged landmarks' targets (default ``task.target_points``), task pixels.

    Returns:
        A dict of :data:`METRICS` (floats; ``untouched_landmark_drift_px`` may be ``None``) plus
        ``dragged_landmarks_px`` (the regressor's ``[[x, y], ...]`` after the edit).
    """
    edited = as_float_image(edited_image, task.size, "edited image")
    source = as_float_image(task.image if source_image is None else source_image, task.size, "source image")
    targets = np.asarray(task.target_points if target_points is None else target_points, np.float64)
    if targets.shape != (len(task.landmarks), 2):
        raise ValueError(f"target_points must be {len(task.landmarks)} [x, y] pairs, got shape {list(targets.shape)}")
    lms, conf = regress_landmarks([source, edited], landmark_model)
    idx = [world.LANDMARK_INDEX[n] for n in task.landmarks]
    after = lms[1, idx].astype(np.float64)
    before = lms[0, idx].astype(np.float64)
    err = np.linalg.norm(after - targets, axis=1)
    start = np.linalg.norm(before - targets, axis=1)
    keep = ~task.region
    untouched = [world.LANDMARK_INDEX[n] for n in task.untouched]
    drift = (float(np.linalg.norm(lms[1, untouched] - lms[0, untouched], axis=1).mean()) if untouched else None)
    outside_only = np.where(keep[..., None], edited, source)  # the edit outside the region, the source inside
    feats = attribute_features([source, edited, outside_only], attribute_model)
    return {
        "drag_error_px": float(err.mean()),
        "handle_start_error_px": float(start.mean()),
        "displacement_px": task.displacement_px,
        "drag_success": float((err <= SUCCESS_RADIUS_PX * task.scale).mean()),
        "psnr_outside_mask": psnr(source, edited, keep),
        "ssim_outside_mask": ssim(source, edited, keep),
        "feature_distance": _relative_distance(feats[0], feats[2]),
        "feature_distance_full": _relative_distance(feats[0], feats[1]),
        "untouched_landmark_drift_px": drift,
        "landmark_confidence": float(conf[1, idx].mean()),
        "dragged_landmarks_px": after.tolist(),
    }


# --------------------------------------------------------------------------------------------------------
# Running a suite


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]


def _mean(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return float(np.mean(v)) if v else None


def _median(values: Iterable[Any]) -> float | None:
    v = _finite(values)
    return float(np.median(v)) if v else None


@dataclass
class SuiteResult:
    """One editor over a suite: per-task scores (with ``name``, ``kind``, ``variant``, ``masked``, ``edit_ms``,
    ``wall_ms``) in task order, and the seconds of untimed warm-up edits."""

    per_task: list[dict[str, Any]]
    warmup_s: list[float] = field(default_factory=list)

    @property
    def edit_ms(self) -> list[float]:
        return [float(r["edit_ms"]) for r in self.per_task]

    def timing(self) -> harness.Timing:
        """Edit times as a :class:`~dragrt.bench.harness.Timing` (host clock, one edit per repetition)."""
        return harness.Timing(times_ms=self.edit_ms, clock=harness.CLOCK_CPU, warmup_reps=len(self.warmup_s))

    def summary(self) -> dict[str, Any]:
        """Means and medians of every metric, per-kind and per-variant means, edit times (ms)."""
        rows = self.per_task
        out: dict[str, Any] = {"n_tasks": len(rows)}
        for m in METRICS:
            vals = [r.get(m) for r in rows]
            out[m] = {"mean": _mean(vals), "median": _median(vals)}
        out["edit_ms"] = {"mean": _mean(self.edit_ms), "median": _median(self.edit_ms)}
        per_kind_metrics = ("drag_error_px", "handle_start_error_px", "drag_success", "psnr_outside_mask",
                            "ssim_outside_mask", "feature_distance")

        def group(pred: Callable[[dict], bool]) -> dict[str, Any]:
            sel = [r for r in rows if pred(r)]
            return {"n": len(sel), **{m: _mean(r.get(m) for r in sel) for m in per_kind_metrics}}

        kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
        out["per_kind"] = {k: group(lambda r, k=k: r["kind"] == k) for k in kinds}
        out["per_variant"] = {
            "single": group(lambda r: r["variant"] == "single"),
            "multi": group(lambda r: r["variant"] == "multi"),
            "mask": group(lambda r: r["masked"]),
            "no_mask": group(lambda r: not r["masked"]),
        }
        return out


def run_suite(editor: Callable[[DragTask], Any], tasks: Sequence[DragTask], landmark_model: torch.nn.Module,
              attribute_model: torch.nn.Module, *, warmup: int = 0,
              progress: Callable[[int, DragTask, dict[str, Any]], None] | None = None) -> SuiteResult:
    """Run ``editor`` on every task and score it.

    Args:
        editor: ``editor(task) -> image | EditOutput`` (module docstring).
        tasks: from :func:`drag_suite`.
        landmark_model, attribute_model: the zoo's evaluators.
        warmup: untimed edits of the first tasks before the timed pass (compilation, graph capture); their
            results are discarded, their seconds kept in ``SuiteResult.warmup_s``.
        progress: ``progress(i, task, scores)`` after each scored task.

    Returns:
        A :class:`SuiteResult`. ``edit_ms`` is the editor's ``timings["edit"]`` when it reports one, else the
        wall time of the call (``wall_ms``, synchronised with CUDA).
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; build some with drag_suite()")
    warmup = _check_int("warmup", warmup, 0, len(tasks))
    warm: list[float] = []
    for task in tasks[:warmup]:
        warm.append(harness.timed_call(lambda task=task: editor(task))[1])
    rows = []
    for i, task in enumerate(tasks):
        out, wall_s = harness.timed_call(lambda task=task: editor(task))
        wall_ms = wall_s * 1e3
        if not isinstance(out, EditOutput):
            out = EditOutput(image=out)
        scores = score_edit(task, out.image, landmark_model, attribute_model, source_image=out.source_image,
                            target_points=out.target_points)
        edit_ms = out.timings["edit"] * 1e3 if "edit" in out.timings else wall_ms
        row = {"name": task.name, "kind": task.kind, "variant": task.variant, "masked": task.masked,
               "n_handles": len(task.landmarks), **scores, "edit_ms": edit_ms, "wall_ms": wall_ms}
        rows.append(row)
        if progress is not None:
            progress(i, task, row)
    return SuiteResult(per_task=rows, warmup_s=warm)


def compare_modes(ours: SuiteResult, reference: SuiteResult, *, noise_floor_px: float = NOISE_FLOOR_PX
                  ) -> dict[str, Any]:
    """Paired comparison of two runs over the same tasks (matched by name).

    ``d_i = drag_error(ours, i) - drag_error(reference, i)``; the quality counts as equal within noise when
    ``|mean(d)| <= max(2 * SE, noise_floor_px)`` with ``SE = std(d, ddof=1) / sqrt(n)`` (about a 95% interval
    of the mean difference containing 0). With one task there is no spread to estimate: the floor alone
    decides. Also reports the mean paired difference of PSNR and SSIM outside the mask (informational).
    """
    ref = {r["name"]: r for r in reference.per_task}
    pairs = [(r, ref[r["name"]]) for r in ours.per_task if r["name"] in ref]
    if not pairs:
        raise ValueError("ours and reference share no task names; run both on the same tasks")
    d = np.array([a["drag_error_px"] - b["drag_error_px"] for a, b in pairs], np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    threshold = max(2.0 * se if se is not None else 0.0, float(noise_floor_px))
    mean_d = float(d.mean())

    def paired(metric: str) -> float | None:
        return _mean(a[metric] - b[metric] for a, b in pairs
                     if a.get(metric) is not None and b.get(metric) is not None)

    return {
        "equal_within_noise": bool(abs(mean_d) <= threshold),
        "n_pairs": n,
        "drag_error_mean_diff_px": mean_d,
        "drag_error_diff_stderr_px": se,
        "threshold_px": threshold,
        "noise_floor_px": float(noise_floor_px),
        "psnr_outside_mask_mean_diff_db": paired("psnr_outside_mask"),
        "ssim_outside_mask_mean_diff": paired("ssim_outside_mask"),
        "rule": "equal when |mean(d)| <= max(2 * stderr(d), noise_floor_px), d = per-task drag error ours - reference",
    }


# --------------------------------------------------------------------------------------------------------
# Editors


def identity_editor(task: DragTask) -> np.ndarray:
    """Calibration: returns the input unchanged (drag error = the displacement, drag success 0)."""
    return task.image


def oracle_editor(task: DragTask) -> np.ndarray:
    """Calibration: the perfect edit, ``render(target_params)`` (drag error = the regressor's error)."""
    return world.render(task.target_params, task.size).image


CALIBRATION_EDITORS: dict[str, Callable[[DragTask], Any]] = {"identity": identity_editor, "oracle": oracle_editor}


def _to_unit_image(t: Tensor, size: int) -> np.ndarray:
    """``[1, 3, h, w]`` in [0, 1] -> float32 ``[size, size, 3]`` (antialiased bilinear when resized)."""
    t = t.detach().float().clamp(0, 1)
    if tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return t[0].permute(1, 2, 0).cpu().numpy()


class DragDiffusionEditor:
    """DragDiffusion on ``components`` in one mode: ``editor(task)`` runs ``engine.edit`` on the task's image
    (its size: a multiple of 64), caption, points and mask. No inversion cache, so both modes pay the same
    inversion per task. ``timings["edit"]`` is the engine's total (LoRA, inversion, drag, denoise)."""

    def __init__(self, components: Any, mode: str, *, runtime: Any = None, **config: Any) -> None:
        from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine

        self.config = DragDiffusionConfig(mode=mode, **config)
        self.engine = DragDiffusionEngine(components, self.config, runtime)

    def __call__(self, task: DragTask) -> EditOutput:
        result = self.engine.edit(task.image, task.prompt, task.handle_points, task.target_points, task.mask)
        return EditOutput(image=_to_unit_image(result.image, task.size),
                          timings={**result.timings, "edit": result.timings["total"]})

    def close(self) -> None:
        self.engine.close()


def dragdiffusion_editor(components: Any, mode: str, *, runtime: Any = None, **config: Any) -> DragDiffusionEditor:
    """A :class:`DragDiffusionEditor`; ``config`` are :class:`DragDiffusionConfig` fields (``max_steps``,
    ``num_inference_steps``, ``start_layer``, ``lora``...), ``runtime`` a ``RuntimeConfig``."""
    return DragDiffusionEditor(components, mode, runtime=runtime, **config)


class DragGANEditor:
    """DragGAN on a StyleGAN2 generator in one mode.

    DragGAN edits latents, so each render is first projected into the generator (:func:`~dragrt.runtime.
    projector.invert`, ``projection_steps`` Adam steps, pixel loss, ``w`` space, no pivotal tuning unless
    ``projector_config`` asks for it). The edit then starts from the projection, not from the render: its
    handles are the landmark regressor's estimates on the projected image (at the task size), its targets
    those plus the ground-truth displacement, and fidelity is measured against the projection. Projections
    are kept in ``inversion_cache`` (a dict keyed by task name): pass the same dict to the fast and the
    reference editor so both drag from the same latent. ``timings["edit"]`` covers start, drag steps and
    the final render, not the projection.

    Points map between the task size ``S`` and the generator's resolution ``R`` with pixel centres kept
    (``x_R = (x_S + 0.5) R / S - 0.5``); the mask is resized by nearest neighbour; the result is resized
    back to ``S`` (antialiased bilinear).
    """

    def __init__(self, generator: torch.nn.Module, mode: str, *, landmark_model: torch.nn.Module | None = None,
                 runtime: Any = None, projection_steps: int = 300, projector_config: Any = None,
                 inversion_cache: dict[str, Any] | None = None, **config: Any) -> None:
        from dragrt.runtime import projector
        from dragrt.runtime.config import RuntimeConfig
        from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine

        self.runtime = runtime or RuntimeConfig()
        self.device = self.runtime.torch_device()
        self.config = DragGANConfig(mode=mode, **config)
        steps = _check_int("projection_steps", projection_steps, 1, 100_000)
        pc = projector_config if projector_config is not None else projector.ProjectorConfig(num_steps=steps)
        if not isinstance(pc, projector.ProjectorConfig):
            raise ValueError(f"projector_config must be a ProjectorConfig, got {type(pc).__name__}")
        self.projector_config = pc
        if landmark_model is None:
            from dragrt.zoo.evaluators import load_landmark_model

            landmark_model = load_landmark_model(device=self.device)
        self.landmark_model = landmark_model
        self.cache = inversion_cache if inversion_cache is not None else {}
        # The editor's own generator copy: projections write their noise buffers into it.
        self.generator = copy.deepcopy(generator).to(self.device).eval().requires_grad_(False)
        self.resolution = int(self.generator.img_resolution)
        self._engine_cls = DragGANEngine
        self.engine = DragGANEngine(self.generator, self.config, self.runtime) if pc.pti_steps == 0 else None

    def _inversion(self, task: DragTask) -> Any:
        from dragrt.runtime import projector

        inv = self.cache.get(task.name)
        if inv is None:
            inv = projector.invert(self.generator, task.image, config=self.projector_config, device=self.device,
                                   progress=False)
            self.cache[task.name] = inv
        return inv

    def _to_generator_px(self, points: np.ndarray, size: int) -> list[list[float]]:
        r = self.resolution
        return np.clip((points + 0.5) * r / size - 0.5, 0, r - 1).tolist()

    def __call__(self, task: DragTask) -> EditOutput:
        t0 = time.perf_counter()
        inv = self._inversion(task)
        t_inv = time.perf_counter() - t0
        source = _to_unit_image((inv.image.float() + 1) / 2, task.size)
        lms, _ = regress_landmarks([source], self.landmark_model)
        idx = [world.LANDMARK_INDEX[n] for n in task.landmarks]
        handles = lms[0, idx].astype(np.float64)
        disp = np.asarray(task.target_points, np.float64) - np.asarray(task.handle_points, np.float64)
        targets = np.clip(handles + disp, 0, task.size - 1)
        mask = None
        if task.mask is not None:
            m = torch.from_numpy(task.mask.astype(np.float32))[None, None]
            mask = F.interpolate(m, size=(self.resolution, self.resolution), mode="nearest")[0, 0]
        harness.synchronize()
        t1 = time.perf_counter()
        if self.engine is None:  # pivotal tuning: every inversion has its own generator weights
            engine = self._engine_cls(inv.generator, self.config, self.runtime)
        else:
            engine = self.engine
            inv.projection.apply_noise(engine.G)
        engine.start(inv.projection.w, self._to_generator_px(handles, task.size),
                     self._to_generator_px(targets, task.size), mask)
        steps = sum(1 for _ in engine.run())
        image = engine.render()
        harness.synchronize()
        t_edit = time.perf_counter() - t1
        return EditOutput(image=_to_unit_image((image + 1) / 2, task.size), source_image=source,
                          target_points=targets.tolist(),
                          timings={"inversion": t_inv, "edit": t_edit, "steps": float(steps)})


def draggan_editor(generator: torch.nn.Module, mode: str, **kwargs: Any) -> DragGANEditor:
    """A :class:`DragGANEditor`; ``kwargs``: ``landmark_model``, ``runtime``, ``projection_steps``,
    ``projector_config``, ``inversion_cache`` and :class:`DragGANConfig` fields (``max_steps``, ``lr``...)."""
    return DragGANEditor(generator, mode, **kwargs)


def quality_object(ours: SuiteResult, reference: SuiteResult, *,
                   calibration: Mapping[str, SuiteResult] | None = None) -> dict[str, Any]:
    """The record's ``quality`` object: both modes' summaries and per-task scores, the paired comparison,
    and the calibration editors' summaries on the same tasks."""
    cmp = compare_modes(ours, reference)
    out: dict[str, Any] = {
        "ours": {**ours.summary(), "per_task": ours.per_task},
        "reference": {**reference.summary(), "per_task": reference.per_task},
        "equal_within_noise": cmp["equal_within_noise"],
        "comparison": cmp,
        "definitions": {
            "drag_success_radius_px": SUCCESS_RADIUS_PX,
            "mask_margin_px": MASK_MARGIN_PX,
            "psnr_max_db": PSNR_MAX_DB,
            "ssim": {"window": SSIM_WINDOW, "sigma": SSIM_SIGMA, "border": "reflect"},
            "pixel_constants_at": REFERENCE_SIZE,
        },
    }
    if calibration:
        out["calibration"] = {name: res.summary() for name, res in calibration.items()}
    return out


__all__ = [
    "CALIBRATION_EDITORS",
    "DragDiffusionEditor",
    "DragGANEditor",
    "DragTask",
    "EditOutput",
    "KINDS",
    "METRICS",
    "SuiteResult",
    "as_float_image",
    "attribute_features",
    "compare_modes",
    "disc_dilate",
    "drag_suite",
    "dragdiffusion_editor",
    "draggan_editor",
    "format_table",
    "identity_editor",
    "oracle_editor",
    "psnr",
    "quality_object",
    "regress_landmarks",
    "run_suite",
    "score_edit",
    "ssim",
    "ssim_map",
]


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def format_table(quality: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """A plain-text table of a :func:`quality_object`: one row per mode and per calibration editor."""
    labels = dict(labels or {})
    rows = [(labels.get("ours", "ours"), quality["ours"]), (labels.get("reference", "reference"), quality["reference"])]
    rows += [(f"({name})", s) for name, s in (quality.get("calibration") or {}).items()]
    head = (f"{'editor':<26} {'tasks':>5} {'drag err px':>11} {'median':>7} {'start px':>8} {'success':>7} "
            f"{'PSNR out':>8} {'SSIM out':>8} {'feat':>6} {'feat full':>9} {'drift px':>8} {'ms/edit':>9}")
    lines = [head, "-" * len(head)]
    for label, s in rows:
        lines.append(
            f"{label:<26} {s['n_tasks']:>5} {_fmt(s['drag_error_px']['mean'], '11.2f')} "
            f"{_fmt(s['drag_error_px']['median'], '7.2f')} {_fmt(s['handle_start_error_px']['mean'], '8.2f')} "
            f"{_fmt(s['drag_success']['mean'], '7.2f')} {_fmt(s['psnr_outside_mask']['mean'], '8.2f')} "
            f"{_fmt(s['ssim_outside_mask']['mean'], '8.4f')} {_fmt(s['feature_distance']['mean'], '6.3f')} "
            f"{_fmt(s['feature_distance_full']['mean'], '9.3f')} "
            f"{_fmt(s['untouched_landmark_drift_px']['mean'], '8.2f')} {_fmt(s['edit_ms']['median'], '9.1f')}"
        )
    c = quality["comparison"]
    se = c["drag_error_diff_stderr_px"]
    lines.append(
        f"ours - reference drag error: {c['drag_error_mean_diff_px']:+.3f} px over {c['n_pairs']} paired task(s)"
        f" (stderr {_fmt(se, '.3f')}, threshold {c['threshold_px']:.3f} px): "
        + ("equal within noise" if c["equal_within_noise"] else "NOT equal within noise")
    )
    return "\n".join(lines) + "\n"
