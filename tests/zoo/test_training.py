"""dragrt.zoo.training helpers every trainer shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragrt.zoo import training


@training.staged_export
def _export(run_dir, dest, *, fail_after_writing: bool = False):
    dest = Path(dest)
    (dest / "unet").mkdir(parents=True, exist_ok=True)
    (dest / "unet" / "weights.bin").write_text(f"new from {run_dir}")
    (dest / "record.json").write_text("new record")
    if fail_after_writing:
        raise ValueError("export: weights over the budget")
    return dest / "record.json"


def test_staged_export_moves_what_it_wrote_and_keeps_the_rest(tmp_path):
    dest = tmp_path / "model"
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "weights.bin").write_text("old")
    (dest / "MODEL_CARD.md").write_text("kept")
    assert _export("run-1", dest) == dest / "record.json"  # the returned path, under dest
    assert (dest / "unet" / "weights.bin").read_text() == "new from run-1"
    assert (dest / "record.json").read_text() == "new record"
    assert (dest / "MODEL_CARD.md").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staged_export_that_fails_leaves_dest_as_it_was(tmp_path):
    dest = tmp_path / "model"
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "weights.bin").write_text("old")
    with pytest.raises(ValueError, match="over the budget"):
        _export("run-2", dest, fail_after_writing=True)
    assert (dest / "unet" / "weights.bin").read_text() == "old"
    assert not (dest / "record.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staged_export_creates_a_new_folder_and_refuses_a_file(tmp_path):
    assert _export("run-3", tmp_path / "a" / "b") == tmp_path / "a" / "b" / "record.json"
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="dest=.*is a file"):
        _export("run-3", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("region, attribute, least", [
    ("lower_face", "beard", {"moustache": 1.0, "goatee": 1.0, "full": 0.95}),
    ("eyes", "glasses", {"round": 0.95, "square": 0.95}),
])
def test_region_boxes_hold_what_the_renderer_draws_there(region, attribute, least):
    """A region's box bounds what the renderer draws there: the pixels an extra changes on the same face lie inside
    it (a full beard's edge may spill a little past the jaw points, a frame's corner past the pad), and the box is a
    part of the image only."""
    import numpy as np
    import torch

    from dragrt.zoo import world

    for s in range(6):
        p = world.sample_params(s).replace(**{attribute: "none"})
        bare = world.render(p, 128)
        x0, y0, x1, y1 = (training.region_boxes(torch.from_numpy(bare.landmarks)[None], 128, region)[0] * 128).tolist()
        assert 0.04 < (x1 - x0) * (y1 - y0) / 128 ** 2 < 0.25, (s, (x0, y0, x1, y1))
        for value, share in least.items():
            changed = np.abs(world.render(p.replace(**{attribute: value}), 128).image.astype(int)
                             - bare.image.astype(int)).sum(-1) > 30
            ys, xs = np.nonzero(changed)
            inside = (xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0) & (ys + 0.5 <= y1)
            assert len(xs) > 20 and inside.mean() >= share, (s, value, inside.mean())


def test_region_boxes_refuse_other_shapes_and_regions():
    import torch

    with pytest.raises(ValueError, match=r"landmarks must be \[N, 22, 2\], got \[3, 2\]"):
        training.region_boxes(torch.zeros(3, 2), 128, "lower_face")
    with pytest.raises(ValueError, match="region 'ears' is not one of lower_face, eyes"):
        training.region_boxes(torch.zeros(1, 22, 2), 128, "ears")
    w = torch.tensor([[[[1.0, 3.0]]], [[[2.0, 2.0]]]])
    assert torch.equal(training.normalised_weights(w), torch.tensor([[[[0.5, 1.5]]], [[[1.0, 1.0]]]]))


def test_replace_card_metrics_rewrites_the_metrics_and_the_status_and_keeps_the_notes(tmp_path):
    card = training.write_card(tmp_path, name="m", summary="A model.", data="Renders.", training={"device": "cpu"},
                               metrics={"score": 0.5, "per": {"a": 1.0}}, files=["w.safetensors"],
                               status="**Below target:** 0.5 against 0.8.")
    text = card.read_text().replace("\n\n## Files", "\n- a note: kept as written\n\n## Files")
    assert training.card_values(text) == {"score": "0.5", "per": "{'a': 1.0}", "a note": "kept as written"}
    assert training.card_values(text, "Training") == {"device": "cpu"}

    met = training.replace_card_metrics(text, {"score": 0.9, "new": 3}, None)
    assert training.card_values(met) == {"score": "0.9", "per": "{'a': 1.0}", "a note": "kept as written",
                                         "new": "3"}
    assert "## Status" not in met and "Below target" not in met
    assert met.index("# zoo:m") < met.index("## Data") < met.index("## Metrics") < met.index("## Files")
    assert met.split("## Files")[1] == text.split("## Files")[1]
    below = training.replace_card_metrics(met, {"score": 0.1}, "**Below target:** 0.1 against 0.8.")
    assert below.index("A model.") < below.index("## Status\n\n**Below target:** 0.1") < below.index("## Data")
    assert training.replace_card_metrics(below, {}, "**Below target:** 0.1 against 0.8.") == below  # idempotent
    with pytest.raises(ValueError, match="the card has no '## Metrics' section"):
        training.replace_card_metrics("# zoo:m\n\nA model.\n", {"score": 1}, None)
