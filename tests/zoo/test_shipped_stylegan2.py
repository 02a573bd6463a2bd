"""The shipped 128 px zoo:faces-stylegan2: it loads offline, draws varied faces that the zoo's landmark regressor
finds as its card says, and `dragrt demo` drags it by default."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dragrt import cli
from dragrt.runtime import demo
from dragrt.runtime.models.stylegan2_convert import load_generator
from dragrt.zoo import evaluators, registry
from dragrt.zoo import stylegan2_train as st

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _card_metric(key: str) -> float:
    text = (registry.WEIGHTS_DIR / st.NAME / "MODEL_CARD.md").read_text()
    return float(re.search(rf"^- {key}: ([0-9.]+)$", text, re.M).group(1))


def test_samples_are_varied_faces_the_landmark_regressor_finds_as_the_card_says() -> None:
    G = load_generator("zoo:faces-stylegan2")
    cfg = json.loads((registry.resolve("zoo:faces-stylegan2") / st.GENERATOR_RECORD).read_text())
    assert G.img_resolution == cfg["config"]["img_resolution"] == 128
    with torch.no_grad():
        samples = st.generate(G, 48, seed=1_000_003, device=torch.device("cpu"))  # the card's first 48 samples
        conf = st._landmark_confidence(evaluators.load_landmark_model(), samples, torch.device("cpu"))
    assert abs(float(conf.mean()) - _card_metric("landmark_conf_samples")) < 0.1
    reals = st._held_out_images(48, 128, num_workers=0)
    # varied: the samples differ from each other about as much as renders do (a collapsed G is far below 1)
    assert float(st.batch_spread(samples) / st.batch_spread(reals)) > 0.7
    card = (registry.WEIGHTS_DIR / st.NAME / "MODEL_CARD.md").read_text()
    assert "**128 px**, the zoo issue's fallback" in card and "Below target" not in card


def test_dragrt_demo_drags_the_shipped_stylegan2_by_default(tmp_path, capsys) -> None:
    """The README's first command: DragGAN on zoo:faces-stylegan2, whose mouth corners (found by the landmark
    regressor) move towards their targets as the same regressor measures them."""
    assert demo.default_draggan_model() == "zoo:faces-stylegan2"
    out = tmp_path / "demo"
    assert cli.main(["demo", "--device", "cpu", "--out", str(out)]) == 0
    assert "DragGAN on zoo:faces-stylegan2" in capsys.readouterr().out
    rec = json.loads((out / "demo.json").read_text())
    assert rec["resolution"] == 128 and rec["radii_px"] == [2, 6] and rec["feature_resolution"] == 64
    # the sample dragged is one whose mouth corners the regressor sees clearly (the handles are its estimates)
    assert 0 <= rec["seed"] < demo.ZOO_SEED_SEARCH
    assert min(rec["landmark_confidence_before"]) >= demo.ZOO_MIN_CORNER_CONFIDENCE
    before = torch.tensor(rec["mouth_corners_measured_before"]) - torch.tensor(rec["target_points"], dtype=torch.float)
    after = torch.tensor(rec["measured_error_to_targets_px"])
    assert (after < before.norm(dim=1)).all(), (before.norm(dim=1), after)
