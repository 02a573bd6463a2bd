"""python -m dragrt.zoo.check: the shipped zoo re-measured against its cards."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dragrt.zoo import check, registry

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_zoo_model_has_a_check():
    assert set(check.CHECKS) == set(registry.KNOWN)


@pytest.mark.skipif(not registry.installed("faces-landmarks"), reason="zoo:faces-landmarks is not installed")
def test_the_shipped_landmark_regressor_measures_what_its_card_says(capsys):
    result = check.check("zoo:faces-landmarks", images=20)
    row = result["rows"][0]
    assert row["metric"] == "mean error (px at 256)" and row["target"] == "<= 1.5" and row["meets"] is True
    # 20 of the card's 1000 held-out faces (the first 20): within 0.1 px of its mean of 0.315
    assert row["card"] == pytest.approx(0.315) and abs(row["measured"] - row["card"]) < 0.1
    assert result["images"] == 20 and result["card_images"] == 1000 and result["meets_targets"]
    assert check.main(["faces-landmarks", "--images", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["measured"] == row["measured"]  # deterministic


def test_a_missed_target_is_shown_and_fails_the_exit_status(monkeypatch, capsys):
    fake = dataclasses.replace(check.CHECKS["faces-vae"], measure=lambda n, dev: {"psnr_db": 27.5, "ssim": 0.9})
    monkeypatch.setitem(check.CHECKS, "faces-vae", fake)
    monkeypatch.setattr(registry, "installed", lambda *names: True)
    assert check.main(["zoo:faces-vae", "--images", "4"]) == 1
    out, err = capsys.readouterr()
    assert "measuring zoo:faces-vae on 4 held-out renders ..." in err  # before the (minutes of) measuring
    assert "psnr_db" in out and "27.5" in out and ">= 28  MISSES" in out
    assert "categorical_accuracy_round_trips" in out  # not measured: shown as '-'
    res = check.check("faces-vae", images=4)
    assert [r["meets"] for r in res["rows"]] == [False, None, None] and not res["meets_targets"]


@pytest.mark.parametrize(("argv", "message"), [
    (["faces-vae", "--images", "1"], "images=1 is not allowed; use an integer from 2 to 10000"),
    (["faces-nope"], "unknown zoo model(s) faces-nope; choose from faces-landmarks"),
    (["faces-vae", "--device", "gpu0"], "device='gpu0' is not a device; use e.g. 'cpu' or 'cuda'"),
])
def test_bad_arguments_name_the_field_and_what_is_allowed(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        check.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_model_that_is_not_installed_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(SystemExit):
        check.main(["faces-clip"])
    assert "python -m dragrt.zoo.train faces-clip --run-dir runs/faces-clip --export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check.main([])
    assert "no zoo model is installed" in capsys.readouterr().err
