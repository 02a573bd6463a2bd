"""zoo:<name> model paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragrt.zoo import registry


@pytest.fixture
def weights(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    (tmp_path / "faces-landmarks").mkdir()
    (tmp_path / "faces-landmarks" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "faces-vae").mkdir()  # empty: not shipped
    (tmp_path / "faces-clip").mkdir()
    (tmp_path / "faces-clip" / "MODEL_CARD.md").write_text("card only")  # not shipped either
    return tmp_path


def test_plain_paths_pass_through():
    assert registry.resolve("some/dir") == Path("some/dir")
    assert registry.resolve(Path("/abs/x")) == Path("/abs/x")
    assert registry.resolve("runwayml/stable-diffusion-v1-5") == Path("runwayml/stable-diffusion-v1-5")


def test_zoo_names_resolve_to_the_package_folder(weights):
    assert registry.resolve("zoo:faces-landmarks") == weights / "faces-landmarks"
    assert registry.available() == {"faces-landmarks": weights / "faces-landmarks"}


def test_missing_model_names_it_and_the_command(weights):
    with pytest.raises(FileNotFoundError) as err:
        registry.resolve("zoo:faces-vae")
    msg = str(err.value)
    assert "faces-vae" in msg and "faces-landmarks" in msg
    assert "python -m dragrt.zoo.train faces-vae" in msg
    with pytest.raises(FileNotFoundError, match="known zoo models"):
        registry.resolve("zoo:nope")


def test_malformed_zoo_paths(weights):
    for bad in ("zoo:", "zoo:../etc", "zoo:a/b"):
        with pytest.raises(ValueError, match="zoo:<name>"):
            registry.resolve(bad)
    with pytest.raises(TypeError):
        registry.resolve(3)


def test_default_weights_dir_is_in_the_package():
    assert registry.WEIGHTS_DIR.name == "weights" and registry.WEIGHTS_DIR.parent.name == "zoo"
    assert set(registry.available()) <= set(registry.KNOWN) | {p.name for p in registry.WEIGHTS_DIR.glob("*")}


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_model_identical_to_a_part_of_another_is_stored_once(weights):
    vae = {"config.json": '{"a": 1, "_name_or_path": "runs/x"}', "w.safetensors": "weights"}
    _folder(weights / "faces-vae", {**vae, "MODEL_CARD.md": "vae card"})
    _folder(weights / "faces-sd" / "vae", {**vae, "config.json": '{"a": 1}'})
    _folder(weights / "faces-sd", {"model_index.json": "{}"})
    assert registry.share_identical(weights) == ["faces-vae"]
    assert sorted(p.name for p in (weights / "faces-vae").iterdir()) == ["MODEL_CARD.md", registry.ALIAS_FILE]
    assert registry.resolve("zoo:faces-vae") == weights / "faces-sd" / "vae"
    assert registry.available()["faces-vae"] == weights / "faces-sd" / "vae"
    card = registry.card_path("zoo:faces-vae").read_text()  # the alias keeps its own card, which says so
    assert card.startswith("vae card\n") and "`faces-sd/vae/`" in card
    assert registry.share_identical(weights) == []  # already an alias
    registry.unshare(weights / "faces-vae")  # an export of faces-vae itself
    assert "faces-vae" not in registry.available()  # card only until the export writes its files


def test_an_export_unpacked_over_an_alias_replaces_it(weights):
    vae = {"config.json": '{"a": 1}', "w.safetensors": "old decoder"}
    _folder(weights / "faces-sd" / "vae", vae)
    _folder(weights / "faces-vae", {**vae, "MODEL_CARD.md": "card"})
    assert registry.share_identical(weights) == ["faces-vae"]
    _folder(weights / "faces-vae", {**vae, "w.safetensors": "new decoder"})  # a tar from the device, alias left over
    # before anything drops the alias, zoo:faces-vae is already the new files, not the alias's old ones (2026-12-06:
    # an adopt-vae right after the untar found faces-sd's vae/ "already" identical to zoo:faces-vae)
    assert registry.resolve("zoo:faces-vae") == weights / "faces-vae"
    assert registry.share_identical(weights) == []
    assert registry.resolve("zoo:faces-vae") == weights / "faces-vae"  # its own, newer files
    assert not (weights / "faces-vae" / registry.ALIAS_FILE).exists()
    _folder(weights / "faces-sd" / "vae", {"w.safetensors": "new decoder"})  # faces-sd exported on them: stored once
    assert registry.share_identical(weights) == ["faces-vae"]
    assert registry.resolve("zoo:faces-vae") == weights / "faces-sd" / "vae"


def test_different_files_are_not_shared(weights):
    _folder(weights / "faces-vae", {"config.json": '{"a": 1}', "w.safetensors": "new decoder"})
    _folder(weights / "faces-sd" / "vae", {"config.json": '{"a": 1}', "w.safetensors": "old decoder"})
    assert registry.share_identical(weights) == []
    _folder(weights / "faces-sd" / "vae", {"config.json": '{"a": 2}', "w.safetensors": "new decoder"})
    assert registry.share_identical(weights) == []  # a config that says something else
    assert registry.resolve("zoo:faces-vae") == weights / "faces-vae"


def test_an_alias_must_stay_inside_the_zoo(weights):
    _folder(weights / "faces-vae", {registry.ALIAS_FILE: '{"target": "../../etc"}'})
    with pytest.raises(ValueError, match="inside the zoo"):
        registry.resolve("zoo:faces-vae")


def test_shipped_zoo_fits_its_budget():
    """All zoo weights together at most 32 MB (the zoo issue's budget); an alias resolves to real files."""
    files = [f for f in registry.WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= registry.BUDGET_BYTES == 32_000_000
    for name, folder in registry.available().items():
        assert any(f.suffix == ".safetensors" for f in folder.rglob("*")), name


def test_exports_into_the_package_keep_shared_parts_stored_once(weights, monkeypatch):
    """`python -m dragrt.zoo.train NAME --export`: the model's own files replace an alias in its folder, and a
    model identical to a part of another becomes an alias afterwards (here faces-sd's export)."""
    from dragrt.zoo import train
    vae = {"config.json": '{"a": 1}', "w.safetensors": "decoder v2"}

    class FakeTrainer:
        @staticmethod
        def export(run_dir, dest):
            files = vae if dest.name == "faces-vae" else {"model_index.json": "{}"}
            _folder(dest, {**files, "MODEL_CARD.md": f"{dest.name} card"})
            if dest.name == "faces-sd":
                _folder(dest / "vae", vae)
            return dest

    monkeypatch.setattr(train, "trainer", lambda name: FakeTrainer)
    _folder(weights / "faces-vae", {registry.ALIAS_FILE: '{"target": "faces-sd/vae"}', "MODEL_CARD.md": "old"})
    assert train.main(["faces-vae", "--run-dir", "r", "--no-train", "--export"]) == 0
    assert registry.resolve("zoo:faces-vae") == weights / "faces-vae"  # its own files, the stale alias gone
    assert train.main(["faces-sd", "--run-dir", "r", "--no-train", "--export"]) == 0
    assert registry.resolve("zoo:faces-vae") == weights / "faces-sd" / "vae"  # identical now: stored once
    assert not (weights / "faces-vae" / "w.safetensors").exists()


def test_a_failed_export_into_the_package_keeps_the_model_resolvable(weights, monkeypatch, capsys):
    """An export that fails (here: over the budget) leaves the alias, so zoo:NAME still resolves, and says why."""
    from dragrt.zoo import train, training

    @training.staged_export
    def export(run_dir, dest):
        _folder(dest, {"w.safetensors": "too big"})
        raise ValueError("export: faces-vae weights are 9 bytes, over the 8-byte budget")

    monkeypatch.setattr(train, "trainer", lambda name: type("T", (), {"export": staticmethod(export)}))
    _folder(weights / "faces-sd" / "vae", {"config.json": '{"a": 1}', "w.safetensors": "decoder"})
    _folder(weights / "faces-vae", {registry.ALIAS_FILE: '{"target": "faces-sd/vae"}', "MODEL_CARD.md": "old"})
    with pytest.raises(SystemExit) as exit_:
        train.main(["faces-vae", "--run-dir", "r", "--no-train", "--export"])
    assert exit_.value.code == 2 and "over the 8-byte budget" in capsys.readouterr().err
    assert registry.resolve("zoo:faces-vae") == weights / "faces-sd" / "vae"
    assert sorted(p.name for p in (weights / "faces-vae").iterdir()) == ["MODEL_CARD.md", registry.ALIAS_FILE]
