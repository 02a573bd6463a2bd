"""The measuring instruments of the zoo: a landmark regressor and an attribute model, trained only on the
toy-faces world's ground truth (:mod:`dragrt.zoo.world`).

Both take images as float ``[N, 3, H, W]`` in ``[-1, 1]`` (resized internally to 256 x 256 when another
size comes in) and return dataclasses:

* :class:`LandmarkNet` -> :class:`LandmarkOutput`: ``landmarks [N, L, 2]`` in pixels of the *input* image
  (pixel centres at integers, as in :mod:`~dragrt.zoo.world`), a per-landmark ``confidence`` in ``[0, 1]``
  (the heatmap mass within 6 px of the estimate: low on images the regressor does not recognise as faces)
  and ``spread`` (the heatmap's standard deviation, pixels). Heatmaps at stride 4, soft-argmax (over the
  7 x 7 cells around the peak at inference).
* :class:`AttributeNet` -> :class:`AttributeOutput`: the ``CONTINUOUS`` attributes in ``[0, 1]``, one
  logit vector per ``CATEGORICAL`` attribute, their argmax, and a ``features`` vector (the penultimate
  layer, for a Frechet distance between image sets; :func:`frechet_distance`).

* :class:`DetailNet`: the continuous attributes that a few pixels carry (:data:`DETAIL_ATTRIBUTES`: smile,
  brows, gaze, nose size, ...) from the landmarks and a patch around the nose tip; :class:`AttributeReader`
  puts it behind the attribute model's interface, fed by the landmark regressor.

:func:`load_landmark_model` / :func:`load_attribute_model` read the shipped weights (``zoo:faces-landmarks``,
``zoo:faces-attributes``, and ``zoo:faces-attribute-details`` when installed: then the attribute model comes back
as an :class:`AttributeReader`); :func:`evaluate_landmarks` / :func:`evaluate_attributes` /
:func:`evaluate_details` measure a model on held-out renders. Training lives in
:mod:`dragrt.zoo.evaluators_landmarks`, :mod:`dragrt.zoo.evaluators_attributes` and
:mod:`dragrt.zoo.evaluators_details`; the shared loop, augmentation and export are here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data, training, world
from .registry import installed, resolve

INPUT_SIZE = world.IMAGE_SIZE
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = 1
CONFIDENCE_RADIUS_PX = 6.0  # at 256

# --------------------------------------------------------------------------------------------------------
# Networks


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU(inplace=True) if act else nn.Identity())


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(c, c), ConvBNAct(c, c, act=False))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class Backbone(nn.Module):
    """Stem at stride 2, then four stages at strides 4, 8, 16, 32 (each a stride-2 conv and res blocks)."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        if len(widths) != 5 or len(blocks) != 4:
            raise ValueError(f"widths needs 5 entries and blocks 4; got {widths}, {blocks}")
        self.stem = ConvBNAct(3, widths[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBNAct(widths[i], widths[i + 1], 3, 2), *[ResBlock(widths[i + 1]) for _ in range(n)])
            for i, n in enumerate(blocks)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats  # strides 4, 8, 16, 32


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] in [-1, 1]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1]; got {images.dtype}")
    return images


def to_input_size(images: Tensor) -> Tensor:
    """Resize ``[N, 3, H, W]`` to the evaluators' 256 x 256 (antialiased bilinear) when needed."""
    h, w = images.shape[-2:]
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                         antialias=True)


@dataclass
class LandmarkOutput:
    landmarks: Tensor  # [N, L, 2] pixels of the input image, [x, y]
    confidence: Tensor  # [N, L] heatmap mass near the estimate, in [0, 1]
    spread: Tensor  # [N, L] heatmap standard deviation, pixels of the input image
    logits: Tensor  # [N, L, h, w] heatmap logits at stride `stride` of the 256 input
    stride: int = 4

    def named(self) -> dict[str, Tensor]:
        """Landmarks by name: ``{name: [N, 2]}``."""
        return {n: self.landmarks[:, i] for i, n in enumerate(world.LANDMARK_NAMES)}


def soft_argmax(logits: Tensor, stride: int, window: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Heatmap logits ``[N, L, h, w]`` -> (expected [x, y] ``[N, L, 2]`` in pixels of the 256 input,
    probabilities ``[N, L, h, w]``, spread ``[N, L]``, confidence ``[N, L]``), in float32.

    ``window=r``: the expectation only over the ``(2r+1)^2`` cells around the most likely cell
    (renormalised), so stray mass far away cannot pull the estimate; ``None``: over the whole map
    (training uses this: every cell gets a gradient)."""
    n, l, h, w = logits.shape
    p = torch.softmax(logits.float().reshape(n, l, h * w), dim=-1).reshape(n, l, h, w)
    xs = (torch.arange(w, device=logits.device, dtype=torch.float32) + 0.5) * stride - 0.5
    ys = (torch.arange(h, device=logits.device, dtype=torch.float32) + 0.5) * stride - 0.5
    q = p
    if window is not None:
        best = p.reshape(n, l, h * w).argmax(-1)
        bx, by = best % w, torch.div(best, w, rounding_mode="floor")
        ix = torch.arange(w, device=logits.device)
        iy = torch.arange(h, device=logits.device)
        mx = ((ix.view(1, 1, w) - bx[..., None]).abs() <= window).float()  # [N, L, w]
        my = ((iy.view(1, 1, h) - by[..., None]).abs() <= window).float()  # [N, L, h]
        q = p * my[..., :, None] * mx[..., None, :]
        q = q / q.sum((-1, -2), keepdim=True).clamp_min(1e-30)
    px, py = q.sum(2), q.sum(3)  # [N, L, w], [N, L, h]
    ex, ey = (px * xs).sum(-1), (py * ys).sum(-1)
    pgx, pgy = p.sum(2), p.sum(3)
    var = (pgx * (xs - ex[..., None]) ** 2).sum(-1) + (pgy * (ys - ey[..., None]) ** 2).sum(-1)
    spread = var.clamp_min(0).sqrt()
    d2 = (xs.view(1, 1, 1, w) - ex[..., None, None]) ** 2 + (ys.view(1, 1, h, 1) - ey[..., None, None]) ** 2
    conf = (p * (d2 <= CONFIDENCE_RADIUS_PX**2)).sum((-1, -2))
    return torch.stack([ex, ey], -1), p, spread, conf


class LandmarkNet(nn.Module):
    """Backbone + a top-down feature pyramid to stride 4 + one heatmap per landmark (soft-argmax)."""

    def __init__(self, widths=(16, 24, 48, 80, 128), blocks=(1, 2, 2, 1), decoder: int = 48,
                 num_landmarks: int = len(world.LANDMARK_NAMES)) -> None:
        super().__init__()
        self.config = dict(widths=list(widths), blocks=list(blocks), decoder=decoder, num_landmarks=num_landmarks)
        self.backbone = Backbone(tuple(widths), tuple(blocks))
        self.lateral = nn.ModuleList(nn.Conv2d(c, decoder, 1) for c in widths[1:])
        self.smooth = nn.ModuleList(ConvBNAct(decoder, decoder) for _ in range(3))
        self.head = nn.Conv2d(decoder, num_landmarks, 1)
        self.stride = 4
        self.window = 3  # inference: soft-argmax over 7 x 7 cells around the peak

    def heatmaps(self, x: Tensor) -> Tensor:
        """Heatmap logits ``[N, L, 64, 64]`` of 256 x 256 inputs."""
        f4, f8, f16, f32 = self.backbone(x)
        y = self.lateral[3](f32)
        for lat, sm, f in zip((self.lateral[2], self.lateral[1], self.lateral[0]), self.smooth, (f16, f8, f4)):
            y = sm(lat(f) + F.interpolate(y, size=f.shape[-2:], mode="nearest"))
        return self.head(y)

    def forward(self, images: Tensor) -> LandmarkOutput:
        images = _check_images(images)
        h, w = images.shape[-2:]
        logits = self.heatmaps(to_input_size(images))
        xy, _, spread, conf = soft_argmax(logits, self.stride, window=self.window)
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            scale = xy.new_tensor([w / INPUT_SIZE, h / INPUT_SIZE])
            xy = (xy + 0.5) * scale - 0.5
            spread = spread * math.sqrt(w * h) / INPUT_SIZE
        return LandmarkOutput(landmarks=xy, confidence=conf, spread=spread, logits=logits, stride=self.stride)


@dataclass
class AttributeOutput:
    continuous: Tensor  # [N, K] in [0, 1], order of world.CONTINUOUS
    logits: dict[str, Tensor]  # name -> [N, C]
    categorical: Tensor  # [N, M] argmax class indices, order of world.CATEGORICAL
    features: Tensor  # [N, D] penultimate layer

    def probs(self, name: str) -> Tensor:
        if name not in self.logits:
            raise ValueError(f"unknown categorical attribute {name!r}; choose one of {', '.join(self.logits)}")
        return self.logits[name].float().softmax(-1)

    def value(self, name: str) -> Tensor:
        """A continuous attribute ``[N]`` by name."""
        if name not in world.CONTINUOUS_INDEX:
            raise ValueError(f"unknown continuous attribute {name!r}; choose one of {', '.join(world.CONTINUOUS)}")
        return self.continuous[:, world.CONTINUOUS_INDEX[name]]


class AttributeNet(nn.Module):
    """Backbone + pooled stride-16/32 features -> a feature vector -> continuous and categorical heads."""

    def __init__(self, widths=(16, 32, 64, 96, 128), blocks=(2, 2, 1, 1), feature_dim: int = 192,
                 num_continuous: int = len(world.CONTINUOUS),
                 classes: Mapping[str, int] | None = None) -> None:
        super().__init__()
        classes = dict(classes or {k: len(v) for k, v in world.CATEGORICAL.items()})
        self.config = dict(widths=list(widths), blocks=list(blocks), feature_dim=feature_dim,
                           num_continuous=num_continuous, classes=classes)
        self.backbone = Backbone(tuple(widths), tuple(blocks))
        self.neck = nn.Sequential(nn.Linear(2 * widths[3] + 2 * widths[4], feature_dim), nn.SiLU(inplace=True),
                                  nn.Linear(feature_dim, feature_dim))
        self.act = nn.SiLU()
        self.classes = classes
        self.head = nn.Linear(feature_dim, num_continuous + sum(classes.values()))
        self.num_continuous = num_continuous

    def features(self, images: Tensor) -> Tensor:
        """The ``[N, D]`` feature vector (before the heads' nonlinearity) of images in [-1, 1]."""
        images = _check_images(images)
        _, _, f16, f32 = self.backbone(to_input_size(images))
        pooled = [f16.mean((2, 3)), f16.amax((2, 3)), f32.mean((2, 3)), f32.amax((2, 3))]
        return self.neck(torch.cat(pooled, 1))

    def forward(self, images: Tensor) -> AttributeOutput:
        feats = self.features(images)
        out = self.head(self.act(feats))
        cont = torch.sigmoid(out[:, : self.num_continuous].float())
        logits, start = {}, self.num_continuous
        for name, c in self.classes.items():
            logits[name] = out[:, start : start + c]
            start += c
        cat = torch.stack([v.argmax(-1) for v in logits.values()], 1)
        return AttributeOutput(continuous=cont, logits=logits, categorical=cat, features=feats)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


#: The continuous attributes :class:`DetailNet` reads: all but ``face_width`` (the landmarks do not move with it).
DETAIL_ATTRIBUTES = ("smile", "mouth_open", "mouth_width", "eye_open", "eye_size", "eye_spacing", "eye_height",
                     "gaze", "brow_raise", "brow_tilt", "nose_size", "head_yaw", "head_roll")


def crop_patches(images: Tensor, centres: Tensor, size: int) -> Tensor:
    """``[N, 3, size, size]`` patches of 256 x 256 ``images`` centred on ``centres [N, 2]`` (pixels, centres at
    integers), 1:1 pixel scale, bilinear, zeros outside."""
    lin = torch.arange(size, device=images.device, dtype=torch.float32) - (size - 1) / 2
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    c = centres.float()
    px, py = c[:, 0, None, None] + gx, c[:, 1, None, None] + gy
    h, w = images.shape[-2:]
    grid = torch.stack([(px + 0.5) / w * 2 - 1, (py + 0.5) / h * 2 - 1], -1)
    return F.grid_sample(images, grid.to(images.dtype), align_corners=False)


class DetailNet(nn.Module):
    """The attributes a global model reads poorly, from landmarks: an MLP on the landmark layout (smile lifts the
    mouth corners by up to 7 px, brow_tilt turns the brows' inner ends) and a small CNN on a patch around the
    nose tip (nose_size shows in the nose's radius, which no landmark follows). ``forward(images, landmarks)``:
    256 x 256 images in [-1, 1] and their landmarks ``[N, L, 2]`` (pixels) -> ``[N, len(attributes)]`` in [0, 1],
    in the order of ``attributes``."""

    def __init__(self, hidden: int = 256, layers: int = 3, patch: int = 32, patch_widths=(16, 32, 64),
                 num_landmarks: int = len(world.LANDMARK_NAMES),
                 attributes: tuple[str, ...] | list[str] = DETAIL_ATTRIBUTES) -> None:
        super().__init__()
        unknown = [a for a in attributes if a not in world.CONTINUOUS_INDEX]
        if not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes must name distinct continuous attributes, at least one; got {attributes}")
        if unknown:
            raise ValueError(f"unknown continuous attributes {unknown}; choose from {', '.join(world.CONTINUOUS)}")
        self.config = dict(hidden=hidden, layers=layers, patch=patch, patch_widths=list(patch_widths),
                           num_landmarks=num_landmarks, attributes=list(attributes))
        self.attributes = list(attributes)
        self.patch = patch
        mlp: list[nn.Module] = []
        width = 2 * num_landmarks
        for _ in range(layers):
            mlp += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.geometry = nn.Sequential(*mlp)
        convs: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(patch_widths):
            convs += [nn.Conv2d(cin, c, 3, 1 if i == 0 else 2, 1), nn.SiLU()]
            cin = c
        self.nose = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden + cin, len(self.attributes))

    def forward(self, images: Tensor, landmarks: Tensor) -> Tensor:
        images = _check_images(images)
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"DetailNet takes {INPUT_SIZE} x {INPUT_SIZE} images (and landmarks in their pixels); "
                             f"got {tuple(images.shape[-2:])}")
        return self.from_patches(self.nose_patches(images, landmarks), landmarks)

    def nose_patches(self, images: Tensor, landmarks: Tensor) -> Tensor:
        """The ``[N, 3, patch, patch]`` patches the CNN reads, around the nose tips of ``landmarks``."""
        return crop_patches(images, landmarks[:, world.LANDMARK_INDEX["nose_tip"]], self.patch)

    def from_patches(self, patches: Tensor, landmarks: Tensor) -> Tensor:
        """:meth:`forward` from :meth:`nose_patches` (training degrades the patches, not whole images)."""
        geo = self.geometry((landmarks.float() / (INPUT_SIZE / 2) - 1).flatten(1).to(patches.dtype))
        return torch.sigmoid(self.head(torch.cat([geo, self.nose(patches)], 1)).float())


class AttributeReader(nn.Module):
    """An attribute model whose :data:`DETAIL_ATTRIBUTES` come from a :class:`DetailNet` on the landmark model's
    estimates; categorical attributes and ``features`` stay the attribute model's. Same call and output as
    :class:`AttributeNet` (what :func:`load_attribute_model` returns when the detail model is installed)."""

    def __init__(self, attributes: AttributeNet, landmarks: LandmarkNet, details: DetailNet) -> None:
        super().__init__()
        self.attributes, self.landmarks, self.details = attributes, landmarks, details
        self.register_buffer("columns", torch.tensor([world.CONTINUOUS_INDEX[a] for a in details.attributes]),
                             persistent=False)

    def features(self, images: Tensor) -> Tensor:
        return self.attributes.features(images)

    def forward(self, images: Tensor) -> AttributeOutput:
        images = to_input_size(_check_images(images))
        out = self.attributes(images)
        detail = self.details(images, self.landmarks(images).landmarks)
        cont = out.continuous.clone()
        cont[:, self.columns] = detail.to(cont.dtype)
        return AttributeOutput(continuous=cont, logits=out.logits, categorical=out.categorical, features=out.features)


# --------------------------------------------------------------------------------------------------------
# Loading shipped weights

_KINDS = {"landmarks": LandmarkNet, "attributes": AttributeNet, "attribute-details": DetailNet}


def model_config(kind: str, model: nn.Module) -> dict:
    """What config.json records: the architecture and the world it was trained on (names checked on load)."""
    return {
        "format": FORMAT,
        "kind": kind,
        "arch": model.config,
        "input_size": INPUT_SIZE,
        "landmark_names": list(world.LANDMARK_NAMES),
        "continuous": list(world.CONTINUOUS),
        "categorical": {k: list(v) for k, v in world.CATEGORICAL.items()},
    }


def build_model(config: Mapping) -> nn.Module:
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"config kind must be one of {', '.join(_KINDS)}; got {kind!r}")
    world_now = {"landmark_names": list(world.LANDMARK_NAMES), "continuous": list(world.CONTINUOUS),
                 "categorical": {k: list(v) for k, v in world.CATEGORICAL.items()}}
    for key, now in world_now.items():
        if key in config and config[key] != now:
            raise ValueError(f"these {kind} weights were trained on another world ({key} differ); retrain them")
    return _KINDS[kind](**config["arch"])


def load_model(path_or_zoo: str | os.PathLike, kind: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read ``config.json`` + ``model.safetensors`` from a folder (or ``zoo:<name>``) into an eval-mode model."""
    from safetensors.torch import load_file

    folder = resolve(path_or_zoo)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{folder} needs {CONFIG} and {WEIGHTS} (an exported {kind} model)")
    config = json.loads(cfg_path.read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{folder} holds a {config.get('kind')!r} model, not {kind!r}")
    model = build_model(config)
    state = load_file(str(w_path))
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()


def load_landmark_model(path_or_zoo: str | os.PathLike = "zoo:faces-landmarks", device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> LandmarkNet:
    return load_model(path_or_zoo, "landmarks", device, dtype)


DETAILS_MODEL = "zoo:faces-attribute-details"


def load_attribute_model(path_or_zoo: str | os.PathLike = "zoo:faces-attributes",
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                         details: str | os.PathLike | bool = "auto") -> AttributeNet | AttributeReader:
    """The attribute model; with a detail model (``details``: ``"auto"`` = ``zoo:faces-attribute-details`` when
    installed, a path, or ``False`` for none) an :class:`AttributeReader` that reads :data:`DETAIL_ATTRIBUTES`
    from the landmarks of ``zoo:faces-landmarks`` and a nose patch (far better for ``smile``, ``nose_size``,
    ``brow_tilt``: see the detail model's card)."""
    model = load_model(path_or_zoo, "attributes", device, dtype)
    if details == "auto":
        details = DETAILS_MODEL if installed(DETAILS_MODEL) else False
    if details is False or details is None:
        return model
    if details is True:
        details = DETAILS_MODEL
    return AttributeReader(model, load_landmark_model(device=device, dtype=dtype),
                           load_model(details, "attribute-details", device, dtype)).eval()


def reader_installed() -> bool:
    """Whether :func:`load_attribute_model` gives the :class:`AttributeReader` (the attribute, landmark and detail
    models all shipped): the few-pixel attributes (smile, nose size, ...) are read well only then."""
    return installed("faces-attributes", "faces-landmarks", DETAILS_MODEL)


# --------------------------------------------------------------------------------------------------------
# Evaluation on held-out renders


def _held_out_loader(n: int, seed: int, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    ds = data.FaceSeeds(world.held_out_seeds(n, start=seed), world.IMAGE_SIZE, uint8=True)
    kw = {"worker_init_fn": data._worker_init} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, **kw)


def _model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def evaluate_landmarks(model: LandmarkNet, n: int = 1000, seed: int = 0, batch_size: int = 50,
                       num_workers: int = 0) -> dict[str, Any]:
    """Mean/median/p95/max Euclidean error (pixels at 256) over held-out faces ``seed .. seed + n``."""
    was_training = model.training
    model.eval()
    device, dtype = _model_device(model)
    errs, confs = [], []
    for batch in _held_out_loader(n, seed, batch_size, num_workers):
        images = data.uint8_to_float(batch["image"].to(device)).to(dtype)
        out = model(images)
        errs.append((out.landmarks.float().cpu() - batch["landmarks"]).norm(dim=-1))
        confs.append(out.confidence.float().cpu())
    model.train(was_training)
    e, c = torch.cat(errs).numpy(), torch.cat(confs).numpy()
    return {
        "n": int(e.shape[0]),
        "mean_px": float(e.mean()),
        "median_px": float(np.median(e)),
        "p95_px": float(np.percentile(e, 95)),
        "max_px": float(e.max()),
        "per_landmark_px": {name: float(e[:, i].mean()) for i, name in enumerate(world.LANDMARK_NAMES)},
        "mean_confidence": float(c.mean()),
    }


@torch.no_grad()
def evaluate_attributes(model: AttributeNet, n: int = 1000, seed: int = 0, batch_size: int = 50,
                        num_workers: int = 0) -> dict[str, Any]:
    """Accuracy of every categorical attribute and MAE of every continuous one on held-out faces."""
    was_training = model.training
    model.eval()
    device, dtype = _model_device(model)
    hits, abs_err = [], []
    for batch in _held_out_loader(n, seed, batch_size, num_workers):
        images = data.uint8_to_float(batch["image"].to(device)).to(dtype)
        out = model(images)
        hits.append((out.categorical.cpu() == batch["categorical"]).float())
        abs_err.append((out.continuous.float().cpu() - batch["continuous"]).abs())
    model.train(was_training)
    h, a = torch.cat(hits).numpy(), torch.cat(abs_err).numpy()
    acc = {name: float(h[:, i].mean()) for i, name in enumerate(world.CATEGORICAL)}
    mae = {name: float(a[:, i].mean()) for i, name in enumerate(world.CONTINUOUS)}
    return {
        "n": int(h.shape[0]),
        "accuracy": acc,
        "mean_accuracy": float(np.mean(list(acc.values()))),
        "min_accuracy": float(min(acc.values())),
        "mae": mae,
        "mean_mae": float(np.mean(list(mae.values()))),
    }


@torch.no_grad()
def evaluate_details(model: DetailNet, n: int = 1000, seed: int = 0, batch_size: int = 50,
                     num_workers: int = 0) -> dict[str, Any]:
    """MAE of every attribute of a :class:`DetailNet` on held-out faces, from ``zoo:faces-landmarks``' estimates
    (how it is used) and from the true landmarks; beside them the attribute model's own MAE on the same faces
    (``zoo:faces-attributes`` when installed)."""
    was_training = model.training
    model.eval()
    device, dtype = _model_device(model)
    marks = load_landmark_model(device=device, dtype=dtype)
    base = load_attribute_model(device=device, dtype=dtype, details=False) if installed("faces-attributes") else None
    cols = [world.CONTINUOUS_INDEX[a] for a in model.attributes]
    err: dict[str, list[Tensor]] = {"estimated": [], "true": [], "base": []}
    for batch in _held_out_loader(n, seed, batch_size, num_workers):
        images = data.uint8_to_float(batch["image"].to(device)).to(dtype)
        truth = batch["continuous"][:, cols]
        err["estimated"].append((model(images, marks(images).landmarks).float().cpu() - truth).abs())
        err["true"].append((model(images, batch["landmarks"].to(device)).float().cpu() - truth).abs())
        if base is not None:
            err["base"].append((base(images).continuous[:, cols].float().cpu() - truth).abs())
    model.train(was_training)
    out: dict[str, Any] = {"n": n}
    for key, label in (("estimated", "mae"), ("true", "mae_true_landmarks"), ("base", "mae_attribute_model")):
        if err[key]:
            e = torch.cat(err[key]).mean(0)
            out[label] = {a: float(v) for a, v in zip(model.attributes, e)}
            out[f"mean_{label}"] = float(e.mean())
    return out


def _as_features(name: str, x: Any) -> np.ndarray:
    a = x.detach().double().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be features [N, D] with N >= 2, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the squared 2-Wasserstein distance between
    two Gaussians. ``tr (S_a S_b)^(1/2)`` is computed as ``tr (S_a^(1/2) S_b S_a^(1/2))^(1/2)`` (the same
    eigenvalues, but of a symmetric matrix), all in float64 with ``eigh``: no scipy needed."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"means must be [D] and covariances [D, D] with one D; got {mu_a.shape}, {cov_a.shape}, "
                         f"{mu_b.shape}, {cov_b.shape}")
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_cross = float(np.sqrt(np.clip(vals, 0.0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_cross)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between the Gaussians fitted (mean, unbiased covariance) to two feature sets
    ``[N_a, D]`` and ``[N_b, D]`` (numpy arrays or tensors): FID's formula in any feature space."""
    a, b = _as_features("feats_a", feats_a), _as_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must be features of the same feature size D, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1]),
                                       b.mean(0), np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1]))


# --------------------------------------------------------------------------------------------------------
# Augmentation (on the training device, per sample)


def random_affine(images: Tensor, landmarks: Tensor | None, *, rotate_deg: float, scale: tuple[float, float],
                  shift_px: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
    """Warp ``[N, 3, H, W]`` by a random rotation/scale/shift about the centre; move ``landmarks``
    (``[N, L, 2]`` pixels, pixel centres at integers) exactly as the image content moves. The augmentation
    helpers draw on ``images.device``: pass a ``generator`` of that device (or None)."""
    n, _, h, w = images.shape
    dev = images.device
    r = lambda: torch.rand(n, device=dev, generator=generator, dtype=torch.float32)  # noqa: E731
    ang = (r() * 2 - 1) * math.radians(rotate_deg)
    s = scale[0] + (scale[1] - scale[0]) * r()
    t = torch.stack([(r() * 2 - 1) * shift_px * 2 / w, (r() * 2 - 1) * shift_px * 2 / h], 1)
    c, sn = torch.cos(ang), torch.sin(ang)
    fwd = torch.stack([torch.stack([c, -sn], 1), torch.stack([sn, c], 1)], 1) * s[:, None, None]  # out = A in + t
    inv = fwd.transpose(1, 2) / (s * s)[:, None, None]  # (s R)^-1 = R^T / s
    theta = torch.cat([inv, -(inv @ t[:, :, None])], 2).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if landmarks is None:
        return out, None
    size = landmarks.new_tensor([w, h])
    u = (landmarks + 0.5) * 2 / size - 1
    u = u @ fwd.to(landmarks.dtype).transpose(1, 2) + t.to(landmarks.dtype)[:, None]
    return out, (u + 1) * size / 2 - 0.5


def photometric(images: Tensor, *, contrast: float, brightness: float, gain: float,
                generator: torch.Generator | None = None) -> Tensor:
    """Per-sample contrast, brightness and per-channel gain jitter of images in [-1, 1]."""
    n = images.shape[0]
    r = lambda *s: torch.rand(*s, generator=generator, device=images.device).to(images.dtype)  # noqa: E731
    c = 1 + (r(n, 1, 1, 1) * 2 - 1) * contrast
    b = (r(n, 1, 1, 1) * 2 - 1) * brightness
    g = 1 + (r(n, 3, 1, 1) * 2 - 1) * gain
    return ((images * c + b) * g).clamp(-1, 1)


def degrade(images: Tensor, *, p_blur: float, max_noise: float, generator: torch.Generator | None = None) -> Tensor:
    """Blur (a 2x down-up resample) a random ``p_blur`` of the images and add Gaussian noise of a random
    std in ``[0, max_noise]``: generated images are softer and noisier than renders."""
    n, _, h, w = images.shape
    r = lambda *s: torch.rand(*s, generator=generator, device=images.device).to(images.dtype)  # noqa: E731
    blurred = F.interpolate(F.avg_pool2d(images, 2), size=(h, w), mode="bilinear", align_corners=False)
    pick = (r(n, 1, 1, 1) < p_blur).to(images.dtype)
    images = images + pick * (blurred - images)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + noise * r(n, 1, 1, 1) * max_noise).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------------
# The shared training loop of both evaluators


@dataclass
class FitConfig:
    """One evaluator's training recipe. Training stops at ``total_steps`` or after ``train_minutes`` of
    training time (summed over resumed chunks), whichever first; the learning rate follows a warmup and a
    cosine over that progress."""

    batch_size: int
    lr: float
    total_steps: int
    train_minutes: float
    warmup_steps: int = 300
    weight_decay: float = 0.05
    echo: int = 1  # optimizer steps per rendered batch (each with fresh augmentation)
    eval_n: int = 1000
    num_workers: int = -1  # -1: usable cores - 2 (at most 30)
    arch: dict = field(default_factory=dict)
    checkpoint_every_s: float = 120.0
    log_every: int = 100


def _num_workers(cfg: FitConfig) -> int:
    return training.default_workers(cfg.num_workers, cap=30)


def _lr_at(cfg: FitConfig, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# (model, images in [-1, 1], batch on the device, generator on the device) -> (loss, detached tensors to log)
LossFn = Callable[[nn.Module, Tensor, dict, torch.Generator], tuple[Tensor, dict[str, Tensor]]]
EvalFn = Callable[..., dict[str, Any]]


def fit(run_dir: str | os.PathLike, *, kind: str, cfg: FitConfig, loss_fn: LossFn, eval_fn: EvalFn,
        minutes: float, device: str, seed: int, smoke: bool) -> dict[str, Any]:
    """Train (or resume) an evaluator in ``run_dir`` within ``minutes``, evaluate it on ``cfg.eval_n``
    held-out renders and write ``metrics.json``. See :mod:`dragrt.zoo.training` for the contract."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = training.Budget(minutes)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    model = _KINDS[kind](**cfg.arch).to(dev)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.99))
    state = {"step": 0, "train_seconds": 0.0, "wall_seconds": 0.0, "chunk": 0, "losses": [], "images": 0}
    ckpt = training.load_checkpoint(run_dir)
    if ckpt is not None:
        if ckpt.get("kind") != kind or ckpt.get("arch") != model.config or bool(ckpt.get("smoke")) != smoke:
            raise ValueError(f"{run_dir} holds a checkpoint of another recipe (kind/arch/smoke differ); "
                             "use a fresh --run-dir")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.update({k: ckpt.get(k, state[k]) for k in state})
        state["chunk"] += 1
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + state["chunk"])
    target_s = cfg.train_minutes * 60.0

    def progress() -> float:
        return max(state["step"] / cfg.total_steps, state["train_seconds"] / target_s)

    def save() -> None:
        training.save_checkpoint(run_dir, {
            "kind": kind, "arch": model.config, "smoke": smoke, "model": model.state_dict(),
            "opt": opt.state_dict(), "device_name": training.device_name(dev), "seed": seed, **state})

    workers = _num_workers(cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t_start = time.monotonic()
    last_save = t_start
    running, logs = [], {}
    if progress() < 1.0:
        loader = data.make_loader(cfg.batch_size, seed=seed, num_workers=workers, epoch=state["chunk"],
                                  uint8=True, pin_memory=dev.type == "cuda")
        model.train()
        t_last = time.monotonic()
        stop = False
        for batch in loader:
            images_u8 = batch["image"].to(dev, non_blocking=True)
            batch = {k: v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
            base = data.uint8_to_float(images_u8)
            state["images"] += int(images_u8.shape[0])
            for _ in range(cfg.echo):
                lr = _lr_at(cfg, state["step"], progress())
                for g in opt.param_groups:
                    g["lr"] = lr
                with autocast:
                    loss, logs = loss_fn(model, base, batch, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                opt.step()
                state["step"] += 1
                running.append(float(loss.detach()) if state["step"] % 10 == 0 or smoke else None)
                now = time.monotonic()
                state["train_seconds"] += now - t_last
                t_last = now
                if state["step"] % cfg.log_every == 0:
                    vals = [v for v in running if v is not None]
                    state["losses"].append([state["step"], float(np.mean(vals)) if vals else float("nan")])
                    running = []
                    print(f"[{kind}] step {state['step']} loss {state['losses'][-1][1]:.4f} lr {lr:.2e} "
                          f"progress {progress():.3f} " + " ".join(f"{k} {float(v):.3f}" for k, v in logs.items()),
                          flush=True)
                if now - last_save > cfg.checkpoint_every_s:
                    save()
                    last_save = now
                if progress() >= 1.0 or budget.expired():
                    stop = True
                    break
            if stop:
                break
        del loader
        vals = [v for v in running if v is not None]
        if vals:
            state["losses"].append([state["step"], float(np.mean(vals))])
    state["wall_seconds"] += time.monotonic() - t_start
    save()
    model.eval()
    t_eval = time.monotonic()
    metrics = eval_fn(model, n=cfg.eval_n, seed=0, batch_size=min(50, cfg.eval_n),
                      num_workers=min(workers, 8))
    metrics.update({
        "steps": state["step"],
        "done": progress() >= 1.0,
        "progress": progress(),
        "train_seconds": round(state["train_seconds"], 1),
        "device_seconds": round(state["wall_seconds"] + time.monotonic() - t_eval, 1),
        "device": training.device_name(dev),
        "chunks": state["chunk"] + 1,
        "rendered_images": state["images"],
        "steps_per_s": round(state["step"] / max(state["train_seconds"], 1e-9), 2),
        "rendered_images_per_s": round(state["images"] / max(state["train_seconds"], 1e-9), 1),
        "final_loss": state["losses"][-1][1] if state["losses"] else None,
        "first_loss": state["losses"][0][1] if state["losses"] else None,
        "smoke": smoke,
    })
    training.write_metrics(run_dir, metrics)
    return metrics


@training.staged_export
def export(run_dir: str | os.PathLike, dest: str | os.PathLike, *, kind: str, name: str, summary: str,
           headline: Callable[[Mapping], Mapping], train_args: str = "--minutes 9") -> Path:
    """Write ``dest/model.safetensors`` (fp16), ``dest/config.json`` and the model card from a run
    (``train_args``: the recipe's training options, for the card's command)."""
    from safetensors.torch import save_file

    run_dir, dest = Path(run_dir), Path(dest)
    ckpt = training.load_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first (python -m dragrt.zoo.train {name} "
                                f"--run-dir {run_dir})")
    if ckpt.get("kind") != kind:
        raise ValueError(f"{run_dir} holds a {ckpt.get('kind')!r} checkpoint, not {kind!r}")
    model = _KINDS[kind](**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    dest.mkdir(parents=True, exist_ok=True)
    save_file(training.fp16_state_dict(model), str(dest / WEIGHTS), metadata={"kind": kind, "format": str(FORMAT)})
    os.chmod(dest / WEIGHTS, 0o644)  # package data: readable by everyone (safetensors writes 0600)
    (dest / CONFIG).write_text(json.dumps(model_config(kind, model), indent=2) + "\n")
    metrics = training.read_metrics(run_dir)
    args = "--smoke --device cpu" if ckpt.get("smoke") else train_args
    train_info = {
        "command": f"python -m dragrt.zoo.train {name} --run-dir RUN {args} --export",
        "steps": ckpt["step"],
        "chunks": ckpt["chunk"] + 1,
        "device": ckpt.get("device_name", "unknown"),
        "training seconds": round(float(ckpt["train_seconds"]), 1),
        "device seconds": metrics.get("device_seconds", round(float(ckpt["wall_seconds"]), 1)),
        "seed": ckpt.get("seed", 0),
        "commit": training.git_commit(),
        "parameters": num_params(model),
        "weights bytes": (dest / WEIGHTS).stat().st_size,
        "smoke": bool(ckpt.get("smoke")),
    }
    training.write_card(
        dest, name=name, summary=summary,
        data=("Rendered on the fly by dragrt.zoo.world from training seeds in [0, 2e9) (never the held-out "
              "seeds 2e9 + i); augmented on the device. Metrics on held-out renders 2e9 + 0 .. 2e9 + n."),
        training=train_info, metrics=dict(headline(metrics)), files=[WEIGHTS, CONFIG, training.CARD])
    return dest


def round_metric(v: Any) -> float | None:
    """A metric as a model card shows it: 4 decimals (``None`` stays ``None``)."""
    return None if v is None else round(float(v), 4)


def describe(cfg: FitConfig) -> dict:
    return asdict(cfg)
