"""Train ``zoo:faces-attribute-details``: the continuous attributes the attribute model reads poorly.

``python -m dragrt.zoo.train faces-attribute-details --run-dir runs/faces-attribute-details --device cpu
--minutes 12 --export`` (10 minutes of training on a 2-core CPU, where rendering is the cost; ``--device cuda``
on a GPU); ``--smoke --device cpu`` for a seconds-long check. Resumes from ``run_dir/checkpoint.pt``.

Why: ``zoo:faces-attributes`` pools whole-image features, and ``smile``, ``nose_size`` and ``brow_tilt`` -- a few
pixels of a 256 px face -- came out at chance (MAE ~0.25). They are geometry: smile lifts the mouth corners by up
to 7 px, brow_tilt turns the brows' inner ends, the nose's radius grows by 4.5 px with nose_size. Recipe:
:class:`~dragrt.zoo.evaluators.DetailNet` (an MLP on the 22 landmarks, a small CNN on a 32 px patch around the
nose tip) trained on the renderer's true landmarks plus Gaussian noise of :data:`LANDMARK_NOISE_PX` (the landmark
regressor's held-out error is ~0.3 px), L1 on the attributes, AdamW with warmup and a cosine; each rendered batch
serves ``echo`` steps under fresh noise. Evaluated on held-out renders with the landmark regressor's estimates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import evaluators as ev
from . import world

NAME = "faces-attribute-details"
KIND = "attribute-details"
LANDMARK_NOISE_PX = 0.4

CPU = ev.FitConfig(batch_size=128, lr=2e-3, total_steps=16000, train_minutes=10.0, warmup_steps=200, echo=4,
                   weight_decay=1e-4, eval_n=1000, num_workers=1, log_every=200)
SMOKE = ev.FitConfig(batch_size=4, lr=3e-3, total_steps=4, train_minutes=1.0, warmup_steps=1, echo=2, eval_n=4,
                     num_workers=0, log_every=2, arch=dict(hidden=64, layers=2, patch=8, patch_widths=(4, 4)))


def loss_fn(model: nn.Module, images: Tensor, batch: dict, gen: torch.Generator) -> tuple[Tensor, dict]:
    marks = batch["landmarks"].float()
    marks = marks + LANDMARK_NOISE_PX * torch.randn(marks.shape, generator=gen, device=marks.device)
    patches = ev.degrade(model.nose_patches(images, marks), p_blur=0.25, max_noise=0.04, generator=gen)
    cols = [world.CONTINUOUS_INDEX[a] for a in model.attributes]
    l1 = (model.from_patches(patches, marks) - batch["continuous"][:, cols].float()).abs().mean()
    return l1, {"mae": l1.detach()}


def config(smoke: bool) -> ev.FitConfig:
    return SMOKE if smoke else CPU


def train(run_dir: str | os.PathLike, *, minutes: float, device: str, seed: int, smoke: bool) -> dict:
    return ev.fit(run_dir, kind=KIND, cfg=config(smoke), loss_fn=loss_fn, eval_fn=ev.evaluate_details,
                  minutes=minutes, device=device, seed=seed, smoke=smoke)


def headline(metrics: Mapping) -> dict:
    r = ev.round_metric
    out: dict = {"held-out renders": metrics.get("n"),
                 "mean MAE (estimated landmarks)": r(metrics.get("mean_mae")),
                 "mean MAE (true landmarks)": r(metrics.get("mean_mae_true_landmarks")),
                 "mean MAE of zoo:faces-attributes on the same attributes": r(metrics.get("mean_mae_attribute_model"))}
    base = metrics.get("mae_attribute_model", {})
    for k, v in metrics.get("mae", {}).items():
        out[f"MAE {k}"] = r(v) if k not in base else f"{r(v)} (zoo:faces-attributes: {r(base[k])})"
    return out


def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    return ev.export(run_dir, dest, kind=KIND, name=NAME, headline=headline, summary=(
        "Detail reader of the toy-faces world: 256x256 RGB in [-1, 1] and its 22 landmarks -> "
        f"{len(ev.DETAIL_ATTRIBUTES)} continuous attributes in [0, 1] ({', '.join(ev.DETAIL_ATTRIBUTES)}). "
        "dragrt.zoo.evaluators.load_attribute_model() uses it (with zoo:faces-landmarks' estimates) for these "
        "attributes whenever it is installed; load it alone with load_model(path, 'attribute-details')."),
        train_args="--device cpu --minutes 12")
