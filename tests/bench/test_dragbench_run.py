"""Running DragBench: DIFT features, the per-sample run in both modes, and ``dragrt eval dragbench``, on a tiny
synthetic DragBench-format folder and a tiny random SD1.5."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dragrt.bench import dragbench
from dragrt.runtime.models.sd import build_random_sd15, save_sd_folder

TINY = {"num_inference_steps": 4, "max_steps": 2, "start_layer": 4}
SIZE = 128


def _pattern(disc_x: int) -> Image.Image:
    """A smooth colour ramp with a red disc at ``(disc_x, 60)``."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    img = np.stack([xx * 1.5 + 30, yy * 1.5 + 30, 200 - (xx + yy) * 0.6], -1)
    img[(xx - disc_x) ** 2 + (yy - 60) ** 2 < 15**2] = [240, 40, 40]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dragbench")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[30:100, 30:110] = 1
    dragbench.write_sample(root / "animals" / "disc_nomask", _pattern(50), "a red disc", [[50, 60]], [[66, 60]],
                           np.zeros((SIZE, SIZE), np.uint8))
    dragbench.write_sample(root / "art_work" / "disc_mask", _pattern(60), "a red disc on a ramp",
                           [[60, 60], [40, 80]], [[76, 62], [44, 90]], mask)
    return root


@pytest.fixture(scope="module")
def sd():
    return build_random_sd15(tiny=True)


@pytest.fixture(scope="module")
def runs(bench_root, sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("dragged")
    cache: dict = {}
    return out, {mode: dragbench.run_dragbench(bench_root, sd, mode=mode, out_dir=out / mode, ensemble=2,
                                               feature_cache=cache, progress=False, **TINY)
                 for mode in ("fast", "reference")}


def test_run_writes_dragged_images_at_the_original_size_and_scores_them(runs) -> None:
    out, by_mode = runs
    for mode, res in by_mode.items():
        assert res["mode"] == mode and res["n_samples"] == 2 and res["n_pairs"] == 3
        for row, (cat, name) in zip(res["rows"], [("animals", "disc_nomask"), ("art_work", "disc_mask")]):
            path = out / mode / cat / name / dragbench.DRAGGED_FILE
            assert row["path"] == str(path) and path.is_file()
            assert Image.open(path).size == (SIZE, SIZE)
            assert row["edit_size"] == [SIZE, SIZE]
            assert all(math.isfinite(d) and d >= 0 for d in row["distances_px"])
            assert 0 <= row["md_px"] <= math.hypot(SIZE, SIZE)
            assert 0 < row["psnr_224"] <= 100 and -1 <= row["ssim_224"] <= 1
            assert row["edit_s"] > 0 and row["drag_steps"] >= 1
        m = res["means"]
        assert m["md_px"] == pytest.approx(np.mean([d for r in res["rows"] for d in r["distances_px"]]))
        assert all(m[k] is not None for k in ("psnr_224", "ssim_224", "edit_s", "wall_s"))
        assert res["extractor"]["name"] == "dift" and res["extractor"]["ensemble"] == 2
        assert "LPIPS" in res["fidelity_note"]


def test_non_multiple_of_64_samples_are_resized_for_the_engine_and_back(tmp_path, sd) -> None:
    img = _pattern(50).resize((100, 90))
    dragbench.write_sample(tmp_path / "c" / "odd", img, "a disc", [[40, 45]], [[55, 45]], np.ones((90, 100)))
    res = dragbench.run_dragbench(tmp_path, sd, mode="reference", out_dir=tmp_path / "out", ensemble=1,
                                  progress=False, **TINY)
    row = res["rows"][0]
    assert row["size"] == [90, 100] and row["edit_size"] == [64, 128]
    assert Image.open(tmp_path / "out" / "c" / "odd" / dragbench.DRAGGED_FILE).size == (100, 90)
    assert math.isfinite(row["md_px"])


def test_dift_features_shape_and_determinism(sd) -> None:
    img = _pattern(50)
    a = dragbench.dift_features(sd, img, "a red disc", ensemble=2)
    b = dragbench.dift_features(sd, img, "a red disc", ensemble=2)
    c = dragbench.dift_features(sd, img, "a red disc", ensemble=2, seed=7)
    C = sd.unet.up_blocks[1].resnets[-1].out_channels
    assert a.shape == (1, C, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    low = dragbench.dift_features(sd, img, "a red disc", ensemble=2, upsample=False)
    assert low.shape[-1] < SIZE
    with pytest.raises(ValueError, match="t=5000"):
        dragbench.dift_features(sd, img, "x", t=5000)


def test_identical_images_with_handle_on_target_give_zero_distance(sd) -> None:
    img = _pattern(50)
    f = dragbench.dift_features(sd, img, "a red disc", ensemble=1)
    pts = [[50, 60], [90, 20]]
    assert dragbench.mean_distance(f, f, pts, pts, (SIZE, SIZE)) == [0.0, 0.0]


def test_cli_eval_dragbench_writes_a_record(bench_root, sd, tmp_path, capsys) -> None:
    from dragrt.cli import main

    model = save_sd_folder(sd, tmp_path / "sd")
    rc = main(["eval", "dragbench", "--model", str(model), "--dragbench", str(bench_root), "--max-samples", "1",
               "--steps", "2", "--inference-steps", "4", "--warmup", "0", "--device", "cpu",
               "--out", str(tmp_path / "results"), "--images", str(tmp_path / "images")])
    assert rc == 0, capsys.readouterr().err
    records = list((tmp_path / "results").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["scenario"] == "quality-dragbench" and rec["config"]["samples"] == 1
    assert rec["ours"]["p50_ms"] > 0 and rec["reference"]["p50_ms"] > 0
    assert set(rec["quality"]) >= {"ours", "reference"}
    assert rec["quality"]["ours"]["mode"] == "fast" and rec["quality"]["reference"]["mode"] == "reference"
    assert math.isfinite(rec["quality"]["ours"]["means"]["md_px"])
    assert (tmp_path / "images" / "fast" / "animals" / "disc_nomask" / dragbench.DRAGGED_FILE).is_file()
    assert "MD px" in capsys.readouterr().out


def test_cli_eval_dragbench_errors(tmp_path, capsys) -> None:
    from dragrt.cli import main

    (tmp_path / "empty").mkdir()
    for argv, needle in [
        (["--dragbench", str(tmp_path / "empty"), "--model", str(tmp_path)], "no DragBench samples"),
        (["--dragbench", str(tmp_path / "missing"), "--model", str(tmp_path)], "is not a folder"),
        (["--model", str(tmp_path)], "needs --dragbench"),
    ]:
        assert main(["eval", "dragbench", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="no DragBench samples"):
        dragbench.run_dragbench(tmp_path / "empty", None)


def test_cli_eval_dragbench_missing_model(bench_root, tmp_path, capsys) -> None:
    from dragrt.cli import main

    assert main(["eval", "dragbench", "--dragbench", str(bench_root), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "error" in err and len(err.splitlines()) == 1, err
