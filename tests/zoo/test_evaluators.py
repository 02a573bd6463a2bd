"""The zoo's evaluators: soft-argmax geometry, augmentation that moves labels with pixels, training that
learns, smoke train -> export -> load round trips, size limits, loading errors, Frechet distance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dragrt.zoo import (
    data,
    evaluators,
    evaluators_attributes,
    evaluators_details,
    evaluators_landmarks,
    registry,
    training,
    world,
)
from dragrt.zoo import train as zoo_train


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny CPU models: one thread is 10x faster than two on a shared, busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_soft_argmax_peaks_and_confidence():
    logits = torch.full((1, 2, 64, 64), -30.0)
    logits[0, 0, 10, 20] = 30.0  # row 10 (y), column 20 (x)
    xy, p, spread, conf = evaluators.soft_argmax(logits, 4)
    assert xy[0, 0].tolist() == pytest.approx([20 * 4 + 1.5, 10 * 4 + 1.5], abs=1e-3)
    assert conf[0, 0] == pytest.approx(1.0, abs=1e-4) and spread[0, 0] < 1e-2
    assert xy[0, 1].tolist() == pytest.approx([127.5, 127.5], abs=1e-3)  # uniform: the image centre
    assert conf[0, 1] < 0.01 and spread[0, 1] > 50
    assert torch.allclose(p.sum((-1, -2)), torch.ones(1, 2))
    # stray mass far from the peak pulls the global expectation, not the windowed one
    two = torch.full((1, 1, 64, 64), -30.0)
    two[0, 0, 10, 20], two[0, 0, 10, 21], two[0, 0, 60, 60] = 4.0, 4.0, 2.0
    g, *_ = evaluators.soft_argmax(two, 4)
    loc, *_ = evaluators.soft_argmax(two, 4, window=3)
    assert loc[0, 0].tolist() == pytest.approx([20.5 * 4 + 1.5, 10 * 4 + 1.5], abs=1e-3)
    assert (g[0, 0] - loc[0, 0]).norm() > 5


def test_gaussian_targets_are_centred_on_the_landmark():
    lms = torch.tensor([[[100.3, 57.9], [31.0, 200.25]]])
    t = evaluators_landmarks.gaussian_targets(lms, 64, 64, 4)
    xy, *_ = evaluators.soft_argmax(torch.log(t.clamp_min(1e-30)), 4)
    torch.testing.assert_close(xy, lms, atol=1e-3, rtol=0)


def test_random_affine_moves_landmarks_with_the_pixels():
    n, size = 3, 96
    pts = torch.tensor([[30.2, 40.7], [60.0, 50.5], [45.5, 70.25]])
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.zeros(n, 3, size, size)
    for i, (x, y) in enumerate(pts):
        img[i] = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.0**2))
    gen = torch.Generator().manual_seed(0)
    out, moved = evaluators.random_affine(img, pts[:, None], rotate_deg=15, scale=(0.85, 1.15), shift_px=10,
                                          generator=gen)
    w = out[:, 0]
    centroid = torch.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], 1) / w.sum((1, 2))[:, None]
    torch.testing.assert_close(centroid, moved[:, 0], atol=0.05, rtol=0)
    assert (moved[:, 0] - pts).norm(dim=1).min() > 0.5  # it did move


def test_networks_shapes_and_resizing():
    torch.manual_seed(0)
    lm = evaluators.LandmarkNet(**evaluators_landmarks.SMOKE.arch).eval()
    at = evaluators.AttributeNet(**evaluators_attributes.SMOKE.arch).eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        o = lm(x)
        o256 = lm(evaluators.to_input_size(x))
        a = at(x)
    assert o.landmarks.shape == (2, len(world.LANDMARK_NAMES), 2) and o.confidence.shape == (2, 22)
    torch.testing.assert_close(o.landmarks, (o256.landmarks + 0.5) / 2 - 0.5)  # input-pixel coordinates
    assert set(o.named()) == set(world.LANDMARK_NAMES)
    assert a.continuous.shape == (2, len(world.CONTINUOUS)) and 0 <= a.continuous.min() <= a.continuous.max() <= 1
    assert a.categorical.shape == (2, len(world.CATEGORICAL)) and a.features.shape == (2, 16)
    assert a.value("smile").shape == (2,) and a.probs("hat").shape == (2, len(world.CATEGORICAL["hat"]))
    with pytest.raises(ValueError, match="images"):
        lm(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="smiles"):
        a.value("smiles")


def test_shipped_architectures_fit_the_size_budget():
    for mod in (evaluators_landmarks, evaluators_attributes):
        model = evaluators._KINDS[mod.KIND](**mod.GPU.arch)
        assert evaluators.num_params(model) * 2 < 1.99e6, mod.NAME  # fp16 bytes, < 2 MB with the header


@pytest.fixture(scope="module")
def batch():
    seeds = [11, 12, 13, 14]
    out = world.render_batch(seeds)
    return data.image_to_tensor(out["images"]), {
        "landmarks": torch.from_numpy(out["landmarks"]),
        "continuous": torch.from_numpy(out["continuous"]),
        "categorical": torch.from_numpy(out["categorical"]),
    }


@pytest.mark.parametrize("mod", [evaluators_landmarks, evaluators_attributes, evaluators_details],
                         ids=lambda m: m.KIND)
def test_training_steps_reduce_the_loss(mod, batch):
    torch.manual_seed(0)
    images, labels = batch
    model = evaluators._KINDS[mod.KIND](**mod.SMOKE.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(14):
        loss, _ = mod.loss_fn(model, images, labels, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("mod", [evaluators_landmarks, evaluators_attributes], ids=lambda m: m.KIND)
def test_smoke_train_export_load_round_trip(mod, tmp_path, monkeypatch, capsys):
    run, dest = tmp_path / "run", tmp_path / "weights" / mod.NAME
    assert zoo_train.main([mod.NAME, "--run-dir", str(run), "--smoke", "--device", "cpu", "--minutes", "2",
                           "--export", str(dest)]) == 0
    metrics = training.read_metrics(run)
    assert metrics["steps"] == mod.SMOKE.total_steps and metrics["done"] and metrics["n"] == mod.SMOKE.eval_n
    assert (metrics["mean_px"] if mod.KIND == "landmarks" else metrics["mean_mae"]) > 0
    for f in ("model.safetensors", "config.json", "MODEL_CARD.md"):
        assert (dest / f).is_file()
    card = (dest / "MODEL_CARD.md").read_text()
    assert f"zoo:{mod.NAME}" in card and "commit" in card and "steps: 6" in card
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["kind"] == mod.KIND and cfg["landmark_names"] == list(world.LANDMARK_NAMES)

    # the shipped model equals the trained one with fp16-rounded weights
    ckpt = training.load_checkpoint(run)
    ref = evaluators._KINDS[mod.KIND](**ckpt["arch"])
    ref.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    ref.eval()
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    loader = evaluators.load_landmark_model if mod.KIND == "landmarks" else evaluators.load_attribute_model
    shipped = loader(f"zoo:{mod.NAME}")
    x = data.image_to_tensor(world.render_batch([2_000_000_123, 5])["images"])
    with torch.no_grad():
        a, b = shipped(x), ref(x)
    field = "landmarks" if mod.KIND == "landmarks" else "continuous"
    torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0)

    # resuming a finished run trains no more and still reports
    mod.train(run, minutes=1, device="cpu", seed=0, smoke=True)
    again = training.read_metrics(run)
    assert again["steps"] == metrics["steps"] and again["chunks"] == 2


def test_crop_patches_reads_the_pixels_around_a_centre():
    img = torch.arange(2 * 3 * 256 * 256, dtype=torch.float32).reshape(2, 3, 256, 256)
    centres = torch.tensor([[100.0, 60.0], [1.0, 254.0]])  # x, y
    p = evaluators.crop_patches(img, centres, 5)
    torch.testing.assert_close(p[0], img[0, :, 58:63, 98:103])
    assert (p[1, :, :, :1] == 0).all() and (p[1, :, -1:] == 0).all()  # outside the image: zeros
    torch.testing.assert_close(p[1, :, :4, 1:], img[1, :, 252:256, 0:4])
    half = evaluators.crop_patches(img, torch.tensor([[100.5, 60.0], [0.0, 0.0]]), 5)
    torch.testing.assert_close(half[0], (img[0, :, 58:63, 98:103] + img[0, :, 58:63, 99:104]) / 2)


def test_attribute_reader_takes_the_detail_attributes_from_the_detail_model():
    torch.manual_seed(0)
    at = evaluators.AttributeNet(**evaluators_attributes.SMOKE.arch).eval()
    lm = evaluators.LandmarkNet(**evaluators_landmarks.SMOKE.arch).eval()
    det = evaluators.DetailNet(**evaluators_details.SMOKE.arch).eval()
    reader = evaluators.AttributeReader(at, lm, det).eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1  # resized to 256 once, for all three
    with torch.no_grad():
        out, plain = reader(x), at(x)
        x256 = evaluators.to_input_size(x)
        detail = det(x256, lm(x256).landmarks)
    cols = [world.CONTINUOUS_INDEX[a] for a in evaluators.DETAIL_ATTRIBUTES]
    others = [i for i in range(len(world.CONTINUOUS)) if i not in cols]
    torch.testing.assert_close(out.continuous[:, cols], detail)
    torch.testing.assert_close(out.continuous[:, others], plain.continuous[:, others])
    assert torch.equal(out.categorical, plain.categorical) and torch.equal(out.features, plain.features)
    torch.testing.assert_close(reader.features(x), plain.features)
    assert det.config["attributes"] == list(evaluators.DETAIL_ATTRIBUTES)
    with pytest.raises(ValueError, match="256 x 256"):
        det(x, torch.zeros(2, 22, 2))
    with pytest.raises(ValueError, match="unknown continuous attributes"):
        evaluators.DetailNet(attributes=("smiles",))
    for bad in ((), ("smile", "smile")):
        with pytest.raises(ValueError, match="distinct continuous attributes"):
            evaluators.DetailNet(attributes=bad)


def test_detail_model_smoke_train_export_and_load(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "details"
    assert zoo_train.main([evaluators_details.NAME, "--run-dir", str(run), "--smoke", "--device", "cpu",
                           "--export", str(dest)]) == 0
    metrics = training.read_metrics(run)
    assert metrics["n"] == evaluators_details.SMOKE.eval_n and set(metrics["mae"]) == set(evaluators.DETAIL_ATTRIBUTES)
    assert "faces-attribute-details" in (dest / "MODEL_CARD.md").read_text()
    shipped = evaluators.load_model(dest, "attribute-details")
    ckpt = training.load_checkpoint(run)
    ref = evaluators.DetailNet(**ckpt["arch"])
    ref.load_state_dict({k: v.half().float() for k, v in ckpt["model"].items()})
    faces = world.render_batch([2_000_000_123, 5])
    x, marks = data.image_to_tensor(faces["images"]), torch.from_numpy(faces["landmarks"])
    with torch.no_grad():
        torch.testing.assert_close(shipped(x, marks), ref.eval()(x, marks), atol=0, rtol=0)
    if "faces-attributes" not in registry.available() or "faces-landmarks" not in registry.available():
        pytest.skip("zoo:faces-attributes / zoo:faces-landmarks are not installed")
    reader = evaluators.load_attribute_model(details=dest)
    assert isinstance(reader, evaluators.AttributeReader)
    assert isinstance(evaluators.load_attribute_model(details=False), evaluators.AttributeNet)


def test_the_shipped_reader_reads_what_the_attribute_model_alone_cannot():
    """With zoo:faces-attribute-details installed, load_attribute_model() reads smile, nose_size and brow_tilt
    (chance for the attribute model alone: MAE ~0.25) from the landmark regressor's estimates and a nose patch."""
    needed = {"faces-attributes", "faces-landmarks", "faces-attribute-details"}
    if not needed <= set(registry.available()):
        pytest.skip(f"needs {', '.join(sorted(needed))} installed")
    faces = world.render_batch(world.held_out_seeds(60, start=3000))
    x, truth = data.image_to_tensor(faces["images"]), torch.from_numpy(faces["continuous"])
    reader, plain = evaluators.load_attribute_model(), evaluators.load_attribute_model(details=False)
    assert isinstance(reader, evaluators.AttributeReader)
    with torch.no_grad():
        ours, theirs = reader(x), plain(x)
    for name in ("smile", "nose_size", "brow_tilt", "brow_raise", "gaze"):
        i = world.CONTINUOUS_INDEX[name]
        mae = (ours.continuous[:, i] - truth[:, i]).abs().mean()
        base = (theirs.continuous[:, i] - truth[:, i]).abs().mean()
        assert mae < 0.1 and mae < 0.6 * base, (name, float(mae), float(base))
    assert torch.equal(ours.categorical, theirs.categorical)


def test_loading_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m dragrt.zoo.train faces-landmarks"):
        evaluators.load_landmark_model("zoo:faces-landmarks")
    with pytest.raises(FileNotFoundError, match="config.json"):
        evaluators.load_attribute_model(tmp_path)
    model = evaluators.AttributeNet(**evaluators_attributes.SMOKE.arch)
    folder = tmp_path / "attr"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(training.fp16_state_dict(model), str(folder / "model.safetensors"))
    cfg = evaluators.model_config("attributes", model)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not 'landmarks'"):
        evaluators.load_landmark_model(folder)
    assert isinstance(evaluators.load_attribute_model(folder), evaluators.AttributeNet)  # no detail model there
    (folder / "config.json").write_text(json.dumps({**cfg, "continuous": ["smile"]}))
    with pytest.raises(ValueError, match="another world"):
        evaluators.load_attribute_model(folder)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    assert evaluators.frechet_distance(a, b) < 0.05
    assert evaluators.frechet_distance(a, b + 1.0) == pytest.approx(8.0, rel=0.05)
    assert evaluators.frechet_distance(a, b * 2.0) == pytest.approx(8.0, rel=0.1)  # 8 * (2 - 1)^2
    with pytest.raises(ValueError, match="features"):
        evaluators.frechet_distance(a, b[:, :4])
