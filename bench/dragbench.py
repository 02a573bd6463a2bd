"""DragBench folders (DragDiffusion's benchmark), read safely, and its point-accuracy metric.

Layout (the released ``DragBench.zip``): ``ROOT/<category>/<sample>/original_image.png`` and
``meta_data.pkl``, a pickle of ``{"prompt": str, "points": [[x, y], ...], "mask": uint8 [H, W]}`` where the
points alternate handle, target and the mask is > 0 where the image may change. The pickle is read with the
converter's allow-list unpickler (containers and numpy arrays only): a DragBench file can never run code.

MD (mean distance) as the DragDiffusion evaluation computes it: for each handle, the source feature vector
at the handle pixel is compared by cosine similarity with every pixel of the dragged image's feature map
(both upsampled to the source size); the argmax is where the content went, and MD is the mean Euclidean
distance of those positions to the targets, in pixels. The reference uses DIFT features of SD2.1 (not
available here); :func:`mean_distance` takes any feature maps, so the same protocol runs with whatever
extractor is at hand, and says which in the result.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dragrt.runtime.models.stylegan2_convert import UnsafeCheckpointError, restricted_load

IMAGE_FILE = "original_image.png"
META_FILE = "meta_data.pkl"


@dataclass
class DragBenchSample:
    """One DragBench sample. Points are ``[x, y]`` pixels of ``image``; ``mask`` is ``[H, W]`` uint8 with
    1 = may change (the file's > 0)."""

    category: str
    name: str
    folder: Path
    image: Image.Image
    prompt: str
    handle_points: list[list[float]]
    target_points: list[list[float]]
    mask: np.ndarray


def read_sample(folder: str | Path, category: str = "") -> DragBenchSample:
    """Read one sample folder; ``ValueError`` names the file and what is wrong with it."""
    folder = Path(folder)
    image_path, meta_path = folder / IMAGE_FILE, folder / META_FILE
    for p in (image_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"DragBench sample {folder}: missing {p.name}")
    try:
        with open(meta_path, "rb") as f:
            meta = restricted_load(f, str(meta_path))
    except UnsafeCheckpointError as exc:
        raise ValueError(f"{meta_path}: refused: {exc}") from None
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{meta_path}: not a readable pickle ({exc})") from None
    if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
        raise ValueError(f"{meta_path}: expected a dict with prompt, points and mask")
    image = Image.open(image_path).convert("RGB")
    points = np.asarray(meta["points"], dtype=np.float64).reshape(-1, 2)
    if len(points) == 0 or len(points) % 2:
        raise ValueError(f"{meta_path}: points must alternate handle, target (an even count > 0), got {len(points)}")
    if not np.isfinite(points).all():
        raise ValueError(f"{meta_path}: points contain NaN or infinite values")
    mask = np.asarray(meta["mask"])
    if mask.shape != (image.height, image.width):
        raise ValueError(f"{meta_path}: mask is {list(mask.shape)} but the image is {image.height}x{image.width}")
    return DragBenchSample(category=category, name=folder.name, folder=folder, image=image,
                           prompt=str(meta["prompt"]), handle_points=points[0::2].tolist(),
                           target_points=points[1::2].tolist(), mask=(mask > 0).astype(np.uint8))


def read_dragbench(root: str | Path) -> list[DragBenchSample]:
    """Every sample under ``root`` (category folders of sample folders, or sample folders directly),
    sorted by category and name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DragBench root {root} is not a folder")
    samples = []
    for meta in sorted(root.rglob(META_FILE)):
        folder = meta.parent
        category = folder.parent.name if folder.parent != root else ""
        samples.append(read_sample(folder, category))
    if not samples:
        raise ValueError(f"{root}: no DragBench samples (folders with {IMAGE_FILE} and {META_FILE})")
    return samples


def write_sample(folder: str | Path, image: Image.Image, prompt: str, handle_points, target_points,
                 mask: np.ndarray) -> Path:
    """Write a sample in DragBench's layout (for tests and for users building their own sets)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(folder / IMAGE_FILE)
    flat = [list(map(int, p)) for pair in zip(handle_points, target_points) for p in pair]
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({"prompt": prompt, "points": flat, "mask": np.asarray(mask, dtype=np.uint8)}, f, protocol=4)
    return folder


def mean_distance(source_features: torch.Tensor, dragged_features: torch.Tensor, handle_points, target_points,
                  image_size: tuple[int, int]) -> list[float]:
    """DragBench's point-accuracy distances: per handle, where the source feature at the handle went.

    Args:
        source_features, dragged_features: ``[1, C, h, w]`` feature maps of the source and the dragged image
            (any extractor; the reference uses DIFT), upsampled here bilinearly to ``image_size``.
        handle_points, target_points: ``[[x, y], ...]`` source-image pixels.
        image_size: ``(H, W)`` of the source image.

    Returns:
        The Euclidean distance in pixels from each handle's best match in the dragged image to its target.
    """
    src = F.interpolate(source_features.float(), image_size, mode="bilinear")
    dst = F.normalize(F.interpolate(dragged_features.float(), image_size, mode="bilinear")[0], dim=0)  # [C, H, W]
    w = image_size[1]
    out = []
    for (hx, hy), (tx, ty) in zip(handle_points, target_points):
        vec = F.normalize(src[0, :, int(round(hy)), int(round(hx))], dim=0)
        sim = torch.einsum("c,chw->hw", vec, dst)
        idx = int(torch.argmax(sim))
        out.append(math.dist((idx % w, idx // w), (tx, ty)))
    return out
