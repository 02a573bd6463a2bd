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
