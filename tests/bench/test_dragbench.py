"""DragBench folders: safe reading, the writer round trip, and the mean-distance metric on known shifts."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dragrt.bench import dragbench


def _image(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8))


def test_round_trip_of_a_synthetic_dragbench(tmp_path) -> None:
    written = {}
    for i, (cat, name) in enumerate([("animals", "cat_1"), ("animals", "dog_2"), ("art_work", "paint_1")]):
        mask = np.zeros((24, 28), np.uint8)
        mask[5:15, 3 + i: 20] = 255
        handles, targets = [[3 + i, 4], [10, 11]], [[6, 4 + i], [12, 20]]
        dragbench.write_sample(tmp_path / cat / name, _image(i), f"a photo {i}", handles, targets, mask)
        written[name] = (handles, targets, (mask > 0).astype(np.uint8))
    samples = dragbench.read_dragbench(tmp_path)
    assert [(s.category, s.name) for s in samples] == [("animals", "cat_1"), ("animals", "dog_2"),
                                                       ("art_work", "paint_1")]
    for s in samples:
        handles, targets, mask = written[s.name]
        assert s.handle_points == handles and s.target_points == targets
        assert np.array_equal(s.mask, mask) and s.image.size == (28, 24)
        assert s.prompt.startswith("a photo")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_dragbench",))


def test_a_malicious_meta_file_is_refused_without_running_it(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "s"
    dragbench.write_sample(folder, _image(0), "x", [[1, 1]], [[2, 2]], np.zeros((24, 28), np.uint8))
    with open(folder / dragbench.META_FILE, "wb") as f:
        pickle.dump({"prompt": "x", "points": [[1, 1], [2, 2]], "mask": _Evil()}, f)
    with pytest.raises(ValueError, match="refused"):
        dragbench.read_sample(folder)
    assert not (tmp_path / "pwned_by_dragbench").exists()


def test_bad_points_and_masks_are_clear_errors(tmp_path) -> None:
    folder = tmp_path / "s"
    dragbench.write_sample(folder, _image(0), "x", [[1, 1]], [[2, 2]], np.zeros((24, 28), np.uint8))
    with open(folder / dragbench.META_FILE, "wb") as f:
        pickle.dump({"prompt": "x", "points": [[1, 1], [2, 2], [3, 3]], "mask": np.zeros((24, 28), np.uint8)}, f)
    with pytest.raises(ValueError, match="alternate handle, target"):
        dragbench.read_sample(folder)
    with open(folder / dragbench.META_FILE, "wb") as f:
        pickle.dump({"prompt": "x", "points": [[1, 1], [2, 2]], "mask": np.zeros((10, 10), np.uint8)}, f)
    with pytest.raises(ValueError, match="mask is"):
        dragbench.read_sample(folder)
    with pytest.raises(FileNotFoundError, match="missing original_image.png"):
        dragbench.read_sample(tmp_path)


def test_mean_distance_finds_where_the_content_went() -> None:
    torch.manual_seed(0)
    src = torch.randn(1, 16, 32, 40)
    shift = (3, -2)  # content moved by dx = 3, dy = -2
    dragged = torch.roll(src, shifts=(shift[1], shift[0]), dims=(2, 3))
    handles = [[10, 12], [25, 20], [30, 6]]
    exact = [[x + shift[0], y + shift[1]] for x, y in handles]
    assert dragbench.mean_distance(src, dragged, handles, exact, (32, 40)) == [0.0, 0.0, 0.0]
    off = [[x + 3, y + 4] for x, y in exact]
    assert dragbench.mean_distance(src, dragged, handles, off, (32, 40)) == pytest.approx([5.0, 5.0, 5.0])
