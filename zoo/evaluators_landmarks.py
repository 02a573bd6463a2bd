"""Train the landmark regressor ``zoo:faces-landmarks`` on renderer ground truth.

``python -m dragrt.zoo.train faces-landmarks --run-dir runs/faces-landmarks --minutes 9 --export`` on one GPU
(about 3.5 minutes of training + evaluation on 1000 held-out renders); ``--smoke --device cpu`` for a
seconds-long CPU check. Resumes from ``run_dir/checkpoint.pt``.

Recipe: :class:`~dragrt.zoo.evaluators.LandmarkNet` (stride-4 heatmaps, soft-argmax), AdamW with warmup and a
cosine, bf16 autocast on CUDA; each rendered batch is used ``echo`` times under fresh random rotation / scale /
shift (landmarks moved with the pixels), colour jitter, blur and noise. No flips (left/right labels).
Loss: cross-entropy of the heatmap against a Gaussian (1 cell) at the true point + L1 of the soft-argmax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from . import evaluators as ev

NAME = "faces-landmarks"
KIND = "landmarks"

GPU = ev.FitConfig(batch_size=64, lr=2e-3, total_steps=60_000, train_minutes=3.3, warmup_steps=300, echo=4,
                   weight_decay=0.05, eval_n=1000,
                   arch=dict(widths=(16, 24, 48, 80, 128), blocks=(1, 2, 2, 1), decoder=48))
SMOKE = ev.FitConfig(batch_size=4, lr=3e-3, total_steps=6, train_minutes=1.0, warmup_steps=1, echo=2, eval_n=4,
                     num_workers=0, log_every=2, arch=dict(widths=(8, 8, 12, 16, 16), blocks=(0, 1, 0, 0),
                                                           decoder=12))
SIGMA_CELLS = 1.0
COORD_WEIGHT = 0.2


def gaussian_targets(landmarks: Tensor, h: int, w: int, stride: int, sigma: float = SIGMA_CELLS) -> Tensor:
    """Normalised Gaussians ``[N, L, h, w]`` centred on ``landmarks`` (pixels of the 256 input)."""
    cx = (landmarks[..., 0] + 0.5) / stride - 0.5
    cy = (landmarks[..., 1] + 0.5) / stride - 0.5
    xs = torch.arange(w, device=landmarks.device, dtype=torch.float32)
    ys = torch.arange(h, device=landmarks.device, dtype=torch.float32)
    gx = torch.exp(-0.5 * ((xs - cx[..., None]) / sigma) ** 2)  # [N, L, w]
    gy = torch.exp(-0.5 * ((ys - cy[..., None]) / sigma) ** 2)  # [N, L, h]
    t = gy[..., :, None] * gx[..., None, :]
    return t / t.sum((-1, -2), keepdim=True).clamp_min(1e-12)


def augment(images: Tensor, landmarks: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    images, landmarks = ev.random_affine(images, landmarks, rotate_deg=10.0, scale=(0.9, 1.1), shift_px=12.0,
                                         generator=gen)
    images = ev.photometric(images, contrast=0.2, brightness=0.1, gain=0.1, generator=gen)
    return ev.degrade(images, p_blur=0.25, max_noise=0.05, generator=gen), landmarks


def loss_fn(model: nn.Module, images: Tensor, batch: dict, gen: torch.Generator) -> tuple[Tensor, dict]:
    images, lms = augment(images, batch["landmarks"].float(), gen)
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    logits = model.heatmaps(images).float()
    xy, _, _, _ = ev.soft_argmax(logits, model.stride)
    n, l, h, w = logits.shape
    target = gaussian_targets(lms, h, w, model.stride)
    ce = -(target * torch.log_softmax(logits.reshape(n, l, -1), -1).reshape(n, l, h, w)).sum((-1, -2)).mean()
    err = (xy - lms).norm(dim=-1).mean()
    l1 = (xy - lms).abs().mean()
    return ce + COORD_WEIGHT * l1, {"ce": ce.detach(), "err_px": err.detach()}


def config(smoke: bool) -> ev.FitConfig:
    return SMOKE if smoke else GPU


def train(run_dir: str | os.PathLike, *, minutes: float, device: str, seed: int, smoke: bool) -> dict:
    return ev.fit(run_dir, kind=KIND, cfg=config(smoke), loss_fn=loss_fn, eval_fn=ev.evaluate_landmarks,
                  minutes=minutes, device=device, seed=seed, smoke=smoke)


def headline(metrics: Mapping) -> dict:
    per = metrics.get("per_landmark_px", {})
    worst = max(per, key=per.get) if per else None
    return {
        "held-out renders": metrics.get("n"),
        "mean error (px at 256)": _r(metrics.get("mean_px")),
        "median error (px)": _r(metrics.get("median_px")),
        "p95 error (px)": _r(metrics.get("p95_px")),
        "worst landmark": f"{worst} {_r(per[worst])} px" if worst else None,
        "mean confidence": _r(metrics.get("mean_confidence")),
        "target": "mean error <= 1.5 px",
    }


def _r(v):
    return None if v is None else round(float(v), 3)


def export(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    return ev.export(run_dir, dest, kind=KIND, name=NAME, headline=headline, summary=(
        "Landmark regressor of the toy-faces world: 256x256 RGB in [-1, 1] -> "
        f"{len(ev.world.LANDMARK_NAMES)} landmarks (pixels) + per-landmark confidence. A small ResNet-style "
        "backbone with a feature pyramid to stride 4 and soft-argmax heatmaps. Load with "
        "dragrt.zoo.evaluators.load_landmark_model('zoo:faces-landmarks')."))
