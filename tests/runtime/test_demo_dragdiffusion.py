"""``dragrt demo --method dragdiffusion``: the session-driven DragDiffusion demo on a saved SD folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dragrt import cli
from dragrt.runtime.models.sd import build_random_sd15, save_sd_folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    save_sd_folder(build_random_sd15(tiny=True, seed=0), folder)
    return folder


def test_dragdiffusion_demo_writes_the_edit(sd_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--method", "dragdiffusion", "--model", str(sd_folder), "--steps", "3",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "DragDiffusion on" in text and "mouth corner" in text
    for name in ("before.png", "after.png", "drag.gif", "edit.json", "edit.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "after.png").size == (128, 128)  # the tiny UNet's native size: 16 x 8
    record = json.loads((out / "edit.json").read_text())
    assert record["method"] == "dragdiffusion" and "cartoon face" in record["prompt"]
    assert len(record["runs"]) == 1 and 1 <= record["runs"][0]["steps"] <= 3


def test_draggan_models_are_checked_per_method(tmp_path, capsys):
    assert cli.main(["demo", "--model", "tiny-sd", "--out", str(tmp_path)]) == 2
    assert "--model 'tiny-sd' is not allowed with --method draggan" in capsys.readouterr().err


def test_missing_zoo_pipeline_is_one_line_naming_the_training_command(tmp_path, capsys, monkeypatch):
    from dragrt.zoo import registry

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "empty")
    assert cli.main(["demo", "--method", "dragdiffusion", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "zoo model 'faces-sd' is not installed" in err and "dragrt.zoo.train faces-sd" in err
    assert "Traceback" not in err
