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
