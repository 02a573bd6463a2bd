"""The toy-faces world: determinism, exact landmark geometry, local edits, captions, seeds, data streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from dragrt.zoo import data, world
from dragrt.zoo.world import CATEGORICAL, CONTINUOUS, LANDMARK_INDEX, LANDMARK_NAMES


def _lm(params: world.FaceParams) -> np.ndarray:
    return world.render(params, 128).landmarks  # small renders: geometry is the same at every size


def test_api_sizes():
    assert world.IMAGE_SIZE == 256
    assert len(LANDMARK_NAMES) >= 16 and len(set(LANDMARK_NAMES)) == len(LANDMARK_NAMES)
    assert len(CONTINUOUS) >= 8
    assert {"hair_colour", "hair_style", "skin_tone", "iris_colour", "background_colour", "glasses", "hat",
            "beard", "head_shape"} <= set(CATEGORICAL)
    assert all(len(v) >= 2 for v in CATEGORICAL.values())


def test_render_is_deterministic_and_shaped():
    a, b = world.render_seed(12345), world.render_seed(12345)
    assert a.image.shape == (256, 256, 3) and a.image.dtype == np.uint8
    assert a.landmarks.shape == (len(LANDMARK_NAMES), 2) and a.landmarks.dtype == np.float32
    assert a.continuous.shape == (len(CONTINUOUS),) and a.continuous.dtype == np.float32
    assert a.categorical.shape == (len(CATEGORICAL),) and a.categorical.dtype == np.int64
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert a.caption == b.caption and a.params == b.params
    c = world.render_seed(12346)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 10
    assert ((a.continuous >= 0) & (a.continuous <= 1)).all()


def test_variety_over_seeds():
    params = [world.sample_params(s) for s in range(400)]
    for name, classes in CATEGORICAL.items():
        seen = {getattr(p, name) for p in params}
        assert seen == set(classes), name
    cont = np.stack([p.continuous() for p in params])
    assert (cont.min(0) < 0.05).all() and (cont.max(0) > 0.95).all()
    assert len({world.caption(p) for p in params}) == 400


def test_landmarks_scale_with_size_and_stay_in_frame():
    p = world.sample_params(7)
    l256, l128 = world.render(p, 256).landmarks, world.render(p, 128).landmarks
    np.testing.assert_allclose(l128, (l256 + 0.5) / 2 - 0.5, atol=1e-4)
    lms = world.render_batch(range(50), size=64)["landmarks"] * 4  # approximately 256-px units
    assert lms.min() > 0 and lms.max() < 256


def test_pixel_centre_convention_matches_pil_drawing():
    # A disc drawn through the renderer's geometry has its centroid where the geometry says.
    size = 200
    p = world.sample_params(3).replace(head_roll=0.8, scale=1.05, shift_x=3.3)
    g = world._Geometry(p, size, world.SUPERSAMPLE)
    canvas = Image.new("L", (size * world.SUPERSAMPLE,) * 2, 0)
    painter = world._Painter(g, canvas)
    painter.poly(world._ellipse(10.3, -20.7, 9, 6, 64), 255, yaw=False)
    painter.flush()
    img = np.asarray(canvas.reduce(world.SUPERSAMPLE), dtype=float)
    ys, xs = np.mgrid[:size, :size]
    centroid = np.array([(img * xs).sum(), (img * ys).sum()]) / img.sum()
    np.testing.assert_allclose(centroid, g.output(np.array([[10.3, -20.7]]))[0], atol=0.05)


def test_pupils_are_dark_pixels():
    # The pupil landmark lands on the drawn pupil (frontal eyes, open enough for the pupil to show).
    hits = 0
    for s in range(12):
        p = world.sample_params(s).replace(eye_open=0.9, eye_size=0.8, glasses="none")
        f = world.render(p)
        for name in ("left_pupil", "right_pupil"):
            x, y = np.round(f.landmarks[LANDMARK_INDEX[name]]).astype(int)
            hits += f.image[y, x].max() < 70
    assert hits == 24


def _moved(a: np.ndarray, b: np.ndarray) -> set[str]:
    return {LANDMARK_NAMES[i] for i in np.flatnonzero(np.abs(a - b).max(1) > 1e-4)}


def test_smile_moves_only_mouth_corners_up():
    p = world.sample_params(21).replace(smile=0.1)
    a, b = _lm(p), _lm(p.replace(smile=0.9))
    assert _moved(a, b) == {"mouth_left", "mouth_right"}
    for name in ("mouth_left", "mouth_right"):
        i = LANDMARK_INDEX[name]
        assert b[i, 1] < a[i, 1] - 3.0  # up by > 6 px at 256


def test_local_edits_move_only_their_landmarks():
    p = world.sample_params(5).replace(head_roll=0.5)
    cases = {
        ("mouth_open", 0.0, 1.0): {"upper_lip", "lower_lip"},
        ("mouth_width", 0.0, 1.0): {"mouth_left", "mouth_right"},
        ("brow_raise", 0.0, 1.0): {"left_brow_inner", "left_brow_outer", "right_brow_inner", "right_brow_outer"},
        ("gaze", 0.0, 1.0): {"left_pupil", "right_pupil"},
        ("eye_open", 0.0, 1.0): {"left_eye_top", "left_eye_bottom", "right_eye_top", "right_eye_bottom"},
        ("nose_size", 0.0, 1.0): {"nose_tip"},  # only through its depth under yaw
    }
    for (field, lo, hi), expected in cases.items():
        a, b = _lm(p.replace(**{field: lo})), _lm(p.replace(**{field: hi}))
        moved = _moved(a, b)
        if field == "nose_size":
            assert moved <= expected, field
        else:
            assert moved == expected, field
    a, b = _lm(p.replace(mouth_open=0.0)), _lm(p.replace(mouth_open=1.0))
    i, j = LANDMARK_INDEX["lower_lip"], LANDMARK_INDEX["upper_lip"]
    assert b[i, 1] - b[j, 1] > 6.0 and abs(a[i, 1] - a[j, 1]) < 1e-4
    a, b = _lm(p.replace(brow_raise=0.0)), _lm(p.replace(brow_raise=1.0))
    assert (b[LANDMARK_INDEX["left_brow_inner"], 1] < a[LANDMARK_INDEX["left_brow_inner"], 1] - 2.0)
    a, b = _lm(p.replace(gaze=0.0)), _lm(p.replace(gaze=1.0))
    assert b[LANDMARK_INDEX["left_pupil"], 0] > a[LANDMARK_INDEX["left_pupil"], 0] + 2.0


def test_roll_rotates_and_yaw_shifts_features():
    p = world.sample_params(9).replace(head_roll=0.5, head_yaw=0.5)
    a, b = _lm(p), _lm(p.replace(head_roll=1.0))
    da = np.linalg.norm(a[:, None] - a[None], axis=-1)
    db = np.linalg.norm(b[:, None] - b[None], axis=-1)
    np.testing.assert_allclose(da, db, atol=1e-3)  # a rigid rotation
    v0 = a[LANDMARK_INDEX["right_eye_outer"]] - a[LANDMARK_INDEX["left_eye_outer"]]
    v1 = b[LANDMARK_INDEX["right_eye_outer"]] - b[LANDMARK_INDEX["left_eye_outer"]]
    angle = np.degrees(np.arctan2(v1[1], v1[0]) - np.arctan2(v0[1], v0[0]))
    assert angle == pytest.approx(12.0, abs=0.01)  # clockwise on screen (y down)
    c = _lm(p.replace(head_yaw=1.0))
    nose, chin, jaw = LANDMARK_INDEX["nose_tip"], LANDMARK_INDEX["chin"], LANDMARK_INDEX["left_jaw"]
    assert c[nose, 0] > a[nose, 0] + 5.0  # turned to the image's right: features shift right,
    assert 0.5 < c[chin, 0] - a[chin, 0] < c[nose, 0] - a[nose, 0]  # the chin less, the jaw outline least
    assert 0 < c[jaw, 0] - a[jaw, 0] < c[chin, 0] - a[chin, 0]


def test_params_validation_names_the_field():
    p = world.sample_params(0)
    with pytest.raises(ValueError, match="smile"):
        p.replace(smile=1.5)
    with pytest.raises(ValueError, match="hair_style"):
        p.replace(hair_style="mullet")
    with pytest.raises(ValueError, match="unknown"):
        p.replace(moustache=1)
    with pytest.raises(ValueError, match="seed"):
        world.sample_params(-1)
    with pytest.raises(ValueError, match="size"):
        world.render(p, 8)


def test_captions_use_the_vocabulary():
    vocab = set(world.VOCABULARY)
    assert len(vocab) == len(world.VOCABULARY) and all(w == w.lower() for w in vocab)
    for s in range(300):
        p = world.sample_params(s)
        cap = world.caption(p)
        assert set(world.caption_tokens(cap)) <= vocab
        attrs = {n: getattr(p, n) for n in CONTINUOUS}
        attrs.update({n: CATEGORICAL[n].index(getattr(p, n)) for n in CATEGORICAL})
        assert world.caption(attrs) == cap
    p = world.sample_params(1).replace(smile=1.0, mouth_open=1.0, glasses="round", hat="tophat", hair_style="long",
                                       hair_colour="red", background_colour="green", iris_colour="blue", eye_size=1.0)
    cap = world.caption(p)
    for phrase in ("a wide smile with an open mouth", "round glasses", "a top hat", "long red hair",
                   "on a green background", "big"):
        assert phrase in cap
    with pytest.raises(ValueError, match="hat"):
        world.caption({**p.attributes(), "hat": "crown"})


def test_unnamed_extras_are_the_phrases_a_caption_leaves_out():
    """A caption names an extra (glasses, hat, beard) only when present: unnamed_extras lists every phrase of each
    extra the face has none of, and nothing of one it has."""
    bare = world.sample_params(3).replace(glasses="none", hat="none", beard="none")

    def added(key, c):  # the caption's part that an extra adds
        (part,) = set(world.caption(bare.replace(**{key: c})).split(", ")) - set(world.caption(bare).split(", "))
        return part

    phrases = {key: [added(key, c) for c in CATEGORICAL[key][1:]] for key in world.EXTRAS}
    assert phrases["beard"] == ["a moustache", "a goatee", "a full beard"]
    for s in range(300):
        p = world.sample_params(s)
        cap, unnamed = world.caption(p), world.unnamed_extras(p)
        for key in world.EXTRAS:
            named = [ph for ph in phrases[key] if ph in cap.split(", ")]
            if getattr(p, key) == "none":
                assert not named and all(ph in unnamed for ph in phrases[key]), (s, key)
            else:
                assert len(named) == 1 and not set(phrases[key]) & set(unnamed), (s, key)
        assert world.unnamed_extras(p.attributes()) == unnamed
    assert world.unnamed_extras(bare) == [ph for key in world.EXTRAS for ph in phrases[key]]
    assert world.unnamed_extras(bare.replace(glasses="round", hat="cap", beard="full")) == []
    with pytest.raises(ValueError, match="unnamed_extras takes FaceParams or a mapping"):
        world.unnamed_extras("a face")


def test_caption_bins_are_what_the_caption_says():
    """caption_bins gives, per continuous attribute a caption describes, the phrase it uses ("" = not mentioned):
    the scorer of samples against their captions reads the same thresholds."""
    for s in range(400):
        p = world.sample_params(s)
        cap, bins = world.caption(p), world.caption_bins(p.attributes())
        assert set(bins) == set(world.CAPTION_BINS)
        for name in ("gaze", "brow_raise", "brow_tilt", "nose_size", "head_yaw", "head_roll"):
            phrases = [b for b, _ in world.CAPTION_BINS[name]]
            assert [b for b in phrases if b in cap] == ([bins[name]] if bins[name] else []), (s, name, cap)
        eyes = next(part for part in cap.split(", ") if part.endswith("eyes") or " eyes " in part).split()
        assert (eyes[0] in ("big", "small")) == bool(bins["eye_size"]) and ("sleepy" in eyes) == bool(bins["eye_open"])
        assert ("open mouth" in cap) == (bins["mouth_open"] == "open")
        assert bins["smile"] in cap or (bins["smile"] == "a neutral mouth" and "an open mouth" in cap)
    edge = world.sample_params(0).replace(smile=0.8, eye_size=0.33, head_roll=0.1)
    assert world.caption_bins(edge.attributes())["smile"] == "a smile"  # thresholds are strict, as in the text
    assert world.caption_bins(edge.attributes())["eye_size"] == ""
    assert world.caption_bins(edge.attributes())["head_roll"] == "a tilted head"


def test_seed_conventions():
    held = world.held_out_seeds(100)
    assert held[0] == world.HELD_OUT_OFFSET and len(held) == 100
    tr = world.train_seeds(10_000, seed=0)
    assert tr.min() >= 0 and tr.max() < world.HELD_OUT_OFFSET
    assert not set(tr.tolist()) & set(held)
    s = list(itertools.islice(data.stream_seeds(3, 0, 0, 2), 2000)) + list(itertools.islice(
        data.stream_seeds(3, 0, 1, 2), 2000))
    assert max(s) < world.HELD_OUT_OFFSET and len(set(s)) == 4000
    assert list(itertools.islice(data.stream_seeds(3, 1, 0, 2), 5)) != s[:5]
    assert list(itertools.islice(data.stream_seeds(3, 0, 0, 2), 5)) == s[:5]


def test_render_batch_matches_render_seed():
    out = world.render_batch([4, 5, 6], size=64)
    assert out["images"].shape == (3, 64, 64, 3) and len(out["captions"]) == 3
    f = world.render_seed(5, 64)
    np.testing.assert_array_equal(out["images"][1], f.image)
    np.testing.assert_array_equal(out["landmarks"][1], f.landmarks)
    np.testing.assert_array_equal(out["categorical"][1], f.categorical)


def test_data_loader_yields_tensors():
    loader = data.make_loader(4, seed=2, num_workers=0, size=64)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["landmarks"].shape == (4, len(LANDMARK_NAMES), 2)
    assert batch["categorical"].dtype == torch.int64 and len(batch["caption"]) == 4
    again = next(iter(data.make_loader(4, seed=2, num_workers=0, size=64)))
    torch.testing.assert_close(batch["image"], again["image"])
    f = world.render_seed(int(batch["seed"][0]), 64)
    np.testing.assert_array_equal(data.tensor_to_image(batch["image"][0]), f.image)
    held = next(iter(data.make_loader(2, held_out=2, size=64)))
    assert held["seed"].tolist() == list(world.held_out_seeds(2))
    u8 = next(iter(data.make_loader(4, seed=2, num_workers=0, size=64, uint8=True)))
    assert u8["image"].dtype == torch.uint8 and u8["image"].shape == (4, 3, 64, 64)
    torch.testing.assert_close(data.uint8_to_float(u8["image"]), batch["image"])
