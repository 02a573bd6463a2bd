"""Slider and blended-edit scores (dragrt.bench.quality_edits) calibrated on the renderer's ground truth: oracle
sliders and blends must score what the world says they are, identity edits must score nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragrt.bench import quality_edits as qe
from dragrt.zoo import evaluators, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALES = [-1.0, -0.5, 0.0, 0.5, 1.0]
H = world.held_out_seeds(4)  # held-out faces h0..h3


@pytest.fixture(scope="module")
def model():
    return evaluators.load_attribute_model().eval()


def _gt_slope(scales, values) -> float:
    return float(np.polyfit(np.asarray(scales), np.asarray(values), 1)[0])


# Attributes the model reads well (model card MAE 0.02-0.06). Measured on these faces with step 0.2 (ground-truth
# slope 0.200, no clipping): head_yaw h0 0.202 / h2 0.219, head_roll h0 0.228, eye_height h0 0.230 (at most +15%),
# R^2 0.991-0.998, mean drift 0.026-0.042, max drift 0.06-0.10, no categorical flip. With zoo:faces-attribute-details
# (2026-12-04) the few-pixel attributes too: smile h0 0.194 / h2 0.191, nose_size h2 0.175, brow_tilt h2 0.220, R^2
# >= 0.98 (the attribute model alone: slopes 0.000-0.021). Tolerances: 30% on the slope, R^2 >= 0.9, mean drift
# <= 0.08, max drift <= 0.2.
@pytest.mark.parametrize("attribute, face", [("head_yaw", 0), ("head_yaw", 2), ("head_roll", 0), ("eye_height", 0),
                                             ("smile", 0), ("smile", 2), ("nose_size", 2), ("brow_tilt", 2)])
def test_oracle_slider_slope_matches_ground_truth(model, attribute, face) -> None:
    images, values = qe.oracle_slider(H[face], attribute, SCALES)
    assert images.shape == (5, 3, 256, 256) and images.dtype == torch.float32
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
    gt = _gt_slope(SCALES, values)
    assert gt == pytest.approx(qe.DEFAULT_STEP, abs=1e-9)  # these faces sit far enough from the range's ends
    r = qe.score_slider(images, SCALES, attribute, model)
    assert r["slope"] == pytest.approx(gt, rel=0.3)
    assert r["r2"] >= 0.9
    assert r["reference_scale"] == 0.0
    assert len(r["values"]) == 5 and r["values"] == sorted(r["values"])  # monotonic along the slider
    assert set(r["drift"]) == set(world.CONTINUOUS) - {attribute}
    assert r["mean_drift"] <= 0.08 and r["max_drift"] <= 0.2
    assert r["max_drift"] == r["drift"][r["max_drift_attribute"]]
    assert r["categorical_kept"] == 1.0 and r["categorical_changed"] == []


def test_oracle_slider_clips_to_the_valid_range() -> None:
    p = world.sample_params(H[0])
    images, values = qe.oracle_slider(H[0], "head_yaw", [-10.0, 0.0, 10.0], size=64, step=0.5)
    assert images.shape == (3, 3, 64, 64)
    assert values.tolist() == [0.0, pytest.approx(p.head_yaw), 1.0]


def test_identity_slider_scores_zero(model) -> None:
    images, _ = qe.oracle_slider(H[0], "head_yaw", [0.0, 1.0])
    same = images[:1].repeat(4, 1, 1, 1)
    r = qe.score_slider(same, [2.0, -1.0, 0.5, 1.0], "head_yaw", model)
    # The readers' batched float32 layers round rows of one batch apart (~1e-9 on one CPU, a few 1e-9 on another):
    # a slope or drift of that size is rounding; any real effect of a slider is orders of magnitude larger.
    assert r["slope"] == pytest.approx(0.0, abs=1e-7)
    assert r["r2"] is None  # the predictions do not vary: R^2 is undefined
    assert r["reference_scale"] == 0.5  # the scale closest to 0
    assert r["mean_drift"] == pytest.approx(0.0, abs=1e-7) and r["max_drift"] == pytest.approx(0.0, abs=1e-7)
    assert r["categorical_kept"] == 1.0
    assert r["intercept"] == pytest.approx(r["values"][0], abs=1e-7)


@pytest.mark.parametrize("face, target", [(0, {"hat": "cap"}), (3, {"glasses": "round"}),
                                          (2, {"hair_colour": "blue", "beard": 3})])
def test_oracle_blend_succeeds_and_leaves_the_outside_alone(model, face, target) -> None:
    original, edited, mask = qe.oracle_blend(H[face], target)
    assert original.shape == edited.shape == (1, 3, 256, 256) and mask.shape == (256, 256)
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    r = qe.score_blend(edited, original, mask, target, model)
    assert r["success_rate"] == 1.0 and all(r["success"].values())
    assert all(p > 0.9 for p in r["target_probability"].values())  # measured 0.993-1.000
    assert r["original_predicted"] == {n: getattr(world.sample_params(H[face]), n) for n in target}
    assert r["psnr_outside_mask"] == 100.0  # identical outside: quality.psnr's cap
    assert r["ssim_outside_mask"] == pytest.approx(1.0, abs=1e-6)  # the dilation covers the SSIM window
    assert r["changed_fraction_outside_mask"] == 0.0
    assert 0.0 < r["mask_fraction"] < 0.5


def test_identity_blend_fails_the_target(model) -> None:
    original, _, mask = qe.oracle_blend(H[0], {"hat": "cap"})
    r = qe.score_blend(original.clone(), original, mask, {"hat": "cap"}, model)
    assert r["success"] == {"hat": False} and r["success_rate"] == 0.0
    assert r["predicted"] == {"hat": "beanie"} and r["target"] == {"hat": "cap"}
    assert r["target_probability"]["hat"] < 0.05
    assert r["psnr_outside_mask"] == 100.0 and r["changed_fraction_outside_mask"] == 0.0


def test_blend_that_leaks_outside_the_mask_is_caught(model) -> None:
    # The hat changes as asked, but so does the background, which lies outside the hat's mask.
    original, _, mask = qe.oracle_blend(H[0], {"hat": "cap"})
    p = world.sample_params(H[0]).replace(hat="cap", background_colour="green")
    leaky = torch.from_numpy(world.render(p).image).permute(2, 0, 1)[None].float() / 127.5 - 1
    r = qe.score_blend(leaky, original, mask, {"hat": "cap"}, model)
    assert r["success_rate"] == 1.0
    assert r["psnr_outside_mask"] < 20.0 and r["ssim_outside_mask"] < 0.99
    assert r["changed_fraction_outside_mask"] > 0.5  # the background is most of the image


def test_oracle_blend_refuses_a_no_op() -> None:
    with pytest.raises(ValueError, match="hat='beanie' is already"):
        qe.oracle_blend(H[0], {"hat": "beanie"})


def _images(n=3, size=32):
    return torch.zeros(n, 3, size, size)


@pytest.mark.parametrize("kwargs, field", [
    (dict(images=_images(1), scales=[0.0]), "images"),
    (dict(images=_images(3)[:, :1]), "images"),
    (dict(images=np.zeros((3, 3, 32, 32))), "images"),
    (dict(images=_images(3, size=8)), "images"),
    (dict(images=_images().to(torch.uint8)), "images"),
    (dict(images=_images() + 2.0), "images"),
    (dict(images=_images() * float("nan")), "images"),
    (dict(scales=[0.0, 1.0]), "scales"),
    (dict(scales=[0.0, 1.0, float("inf")]), "scales"),
    (dict(scales=[1.0, 1.0, 1.0]), "scales"),
    (dict(scales=["a", 1.0, 2.0]), "scales"),
    (dict(attribute="hat"), "attribute"),
])
def test_score_slider_rejects_bad_inputs(model, kwargs, field) -> None:
    args = dict(images=_images(), scales=[0.0, 1.0, 2.0], attribute="head_yaw", attribute_model=model) | kwargs
    with pytest.raises(ValueError, match=field):
        qe.score_slider(**args)


def _mask(size=32):
    m = torch.zeros(size, size)
    m[8:16, 8:16] = 1
    return m


@pytest.mark.parametrize("kwargs, field", [
    (dict(edited=_images(2)), "edited"),
    (dict(original=_images(1) - 3.0), "original"),
    (dict(original=_images(1, size=64)), "same shape"),
    (dict(mask=torch.zeros(16, 16)), "mask"),
    (dict(mask=torch.zeros(32, 32)), "mask"),
    (dict(mask=torch.ones(32, 32)), "mask"),
    (dict(mask=_mask() * 2), "mask"),
    (dict(target={}), "target"),
    (dict(target={"smile": "up"}), "target"),
    (dict(target={"hat": "crown"}), "hat"),
    (dict(target={"hat": 4}), "hat"),
    (dict(target={"hat": True}), "hat"),
])
def test_score_blend_rejects_bad_inputs(model, kwargs, field) -> None:
    args = dict(edited=_images(1), original=_images(1), mask=_mask(), target={"hat": "cap"},
                attribute_model=model) | kwargs
    with pytest.raises(ValueError, match=field):
        qe.score_blend(**args)


def test_oracles_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="attribute"):
        qe.oracle_slider(H[0], "beard", SCALES)
    with pytest.raises(ValueError, match="scales"):
        qe.oracle_slider(H[0], "smile", [0.0])
    with pytest.raises(ValueError, match="step"):
        qe.oracle_slider(H[0], "smile", SCALES, step=0.0)
    with pytest.raises(ValueError, match="size"):
        qe.oracle_slider(H[0], "smile", SCALES, size=8)
    with pytest.raises(ValueError, match="target"):
        qe.oracle_blend(H[0], {"nose": "big"})
