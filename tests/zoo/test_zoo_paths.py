"""``zoo:<name>`` works wherever a model path is accepted, and a model that is not shipped says how to train it."""

from __future__ import annotations

import pytest

from dragrt.runtime.models.sd import load_sd
from dragrt.runtime.models.stylegan2_convert import load_generator
from dragrt.zoo import registry


@pytest.mark.parametrize("loader, name", [(load_sd, "faces-sd"), (load_generator, "faces-stylegan2")])
def test_loaders_resolve_zoo_paths(loader, name, monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)  # an install without this model
    with pytest.raises(FileNotFoundError, match=rf"zoo model '{name}' is not installed.*dragrt.zoo.train {name}"):
        loader(f"zoo:{name}")


def test_load_generator_reads_a_zoo_style_folder(tmp_path):
    from dragrt.runtime.models.stylegan2 import Generator, stylegan2_config
    from dragrt.runtime.models.stylegan2_convert import save_generator

    G = Generator.from_config(stylegan2_config("tiny"))
    (tmp_path / "faces-stylegan2").mkdir()
    save_generator(G, tmp_path / "faces-stylegan2" / "generator")
    loaded = load_generator(tmp_path / "faces-stylegan2")
    assert loaded.img_resolution == G.img_resolution
    with pytest.raises(FileNotFoundError, match="generator.json does not exist"):
        load_generator(tmp_path)


def test_shipped_evaluators_and_clip_are_registered():
    have = registry.available()
    assert {"faces-landmarks", "faces-attributes", "faces-clip"} <= set(have)
    for name in have:
        assert registry.card_path(f"zoo:{name}").is_file()
