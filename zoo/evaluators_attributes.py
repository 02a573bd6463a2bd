"""Train the attribute model ``zoo:faces-attributes`` on renderer ground truth.

``python -m dragrt.zoo.train faces-attributes --run-dir runs/faces-attributes --minutes 9 --export`` on one
GPU (about 3.5 minutes of training + evaluation on 1000 held-out renders); ``--smoke --device cpu`` for a
seconds-long CPU check. Resumes from ``run_dir/checkpoint.pt``.

Recipe: :class:`~dragrt.zoo.evaluators.AttributeNet` (continuous attributes through a sigmoid, one softmax
head per categorical attribute, a 192-d feature vector for Frechet distances), AdamW with warmup and a
cosine, bf16 autocast on CUDA; each rendered batch is used ``echo`` times under a fresh small shift / scale,
blur and noise. No colour jitter (colours are labels), no rotation (head roll is a label), no flips (gaze and
yaw are labels). Loss: mean cross-entropy over the categorical attributes + 4 x L1 of the continuous ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import evaluators as ev
from . import world

NAME = "faces-attributes"
KIND = "attributes"

GPU = ev.FitConfig(batch_size=64, lr=2e-3, total_steps=60_000, train_minutes=3.3, warmup_steps=300, echo=3,
                   weight_decay=0.05, eval_n=1000,
                   arch=dict(widths=(16, 32, 64, 96, 128), blocks=(2, 2, 1, 1), feature_dim=192))
SMOKE = ev.FitConfig(batch_size=4, lr=3e-3, total_steps=6, train_minutes=1.0, warmup_steps=1, echo=2, eval_n=4,
                     num_workers=0, log_every=2, arch=dict(widths=(8, 8, 12, 16, 16), blocks=(0, 1, 0, 0),
                                                           feature_dim=16))
CONTINUOUS_WEIGHT = 4.0


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    images, _ = ev.random_affine(images, None, rotate_deg=0.0, scale=(0.97, 1.03), shift_px=8.0, generator=gen)
    return ev.degrade(images, p_blur=0.25, max_noise=0.04, generator=gen)


def loss_fn(model: nn.Module, images: Tensor, batch: dict, gen: torch.Generator) -> tuple[Tensor, dict]:
    images = augment(images, gen)
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    out = model(images)
    cat = batch["categorical"]
    ce = torch.stack([F.cross_entropy(out.logits[name].float(), cat[:, i])
                      for i, name in enumerate(world.CATEGORICAL)]).mean()
    l1 = (out.continuous.float() - batch["continuous"].float()).abs().mean()
    acc = (out.categorical == cat).float().mean()
    return ce + CONTINUOUS_WEIGHT * l1, {"ce": ce.detach(), "mae": l1.detach(), "acc": acc.detach()}


def config(smoke: bool) -> ev.FitConfig:
    return SMOKE if smoke else GPU


def train(run_dir: str | os.PathLike, *, minutes: float, device: str, seed: int, smoke: bool) -> dict:
    return ev.fit(run_dir, kind=KIND, cfg=config(smoke), loss_fn=loss_fn, eval_fn=ev.evaluate_attributes,
                  minutes=minutes, device=device, seed=seed, smoke=smoke)


def headline(metrics: Mapping) -> dict:
    out = {
        "held-out renders": metrics.get("n"),
        "mean categorical accuracy": ev.round_metric(metrics.get("mean_accuracy")),
        "min categorical accuracy": ev.round_metric(metrics.get("min_accuracy")),
        "mean continuous MAE": ev.round_metric(metrics.get("mean_mae")),
        "target": "accuracy >= 0.95 on every categorical attribute",
    }
    out.update({f"accuracy {k}": ev.round_metric(v) for k, v in metrics.get("accuracy", {}).items()})
    out.update({f"MAE {k}": ev.round_metric(v) for k, v in metrics.get("mae", {}).items()})
    return out


def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    return ev.export(run_dir, dest, kind=KIND, name=NAME, headline=headline, summary=(
        "Attribute model of the toy-faces world: 256x256 RGB in [-1, 1] -> "
        f"{len(world.CONTINUOUS)} continuous attributes in [0, 1], {len(world.CATEGORICAL)} categorical "
        "attributes and a 192-d feature vector (for Frechet distances). Load with "
        "dragrt.zoo.evaluators.load_attribute_model('zoo:faces-attributes')."))
