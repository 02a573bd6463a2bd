"""The shipped zoo:faces-vae and zoo:faces-sd: they load offline and measure what their cards say."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from dragrt import cli
from dragrt.runtime.models.sd import load_sd
from dragrt.zoo import registry
from dragrt.zoo import vae as zvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _card_metric(name: str, key: str) -> float:
    text = (registry.WEIGHTS_DIR / name / "MODEL_CARD.md").read_text()
    return float(re.search(rf"^- {key}: ([0-9.]+)$", text, re.M).group(1))


def test_vae_round_trip_matches_its_card():
    vae = zvae.load_vae("zoo:faces-vae", "cpu", torch.float32)
    got = zvae.evaluate(vae, zvae.heldout_images(8, 256), batch=8)
    # 8 of the card's 256 held-out renders (the first 8): within 1 dB of its mean
    assert abs(got["psnr_db"] - _card_metric("faces-vae", "psnr_db")) < 1.0
    cfg = json.loads((registry.resolve("zoo:faces-vae") / "config.json").read_text())
    assert abs(got["scaling_factor"] - cfg["scaling_factor"]) < 0.1 * cfg["scaling_factor"]


def test_faces_sd_is_an_sd15_shaped_pipeline_around_the_shipped_vae_and_clip():
    sd = load_sd("zoo:faces-sd", device="cpu", torch_dtype=torch.float32)
    cfg = sd.unet.config
    assert list(cfg.down_block_types)[:3] == ["CrossAttnDownBlock2D"] * 3 and cfg.sample_size * 8 == 256
    assert sd.text_encoder.config.hidden_size == cfg.cross_attention_dim
    folder = registry.WEIGHTS_DIR

    # zoo:faces-vae is stored once, as faces-sd's vae/; its alias records the digest of the weights its card
    # describes (a retrained VAE exports its own files again)
    weights = folder / "faces-sd" / "vae" / zvae.WEIGHTS_FILE
    assert registry.resolve("zoo:faces-vae") == weights.parent
    alias = json.loads((folder / "faces-vae" / registry.ALIAS_FILE).read_text())
    assert alias["sha256"][zvae.WEIGHTS_FILE] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # a model below its target says so at the top of its card (faces-sd: 80 % of sampled attributes; faces-vae: 28 dB)
    for name, key, target in (("faces-sd", "attribute_accuracy", 0.8), ("faces-vae", "psnr_db", 28.0)):
        below = _card_metric(name, key) < target
        assert ("**Below target:**" in (folder / name / "MODEL_CARD.md").read_text()) == below, name


def test_the_dragdiffusion_demo_runs_on_the_shipped_default(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--method", "dragdiffusion", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert "DragDiffusion on zoo:faces-sd" in capsys.readouterr().out
    record = json.loads((out / "edit.json").read_text())
    assert record["runs"][0]["steps"] <= 2 and (out / "after.png").is_file()
    # the mouth is masked, as a user would draw it: the handle inside the mask, most of the face outside
    from PIL import Image

    mask = np.asarray(Image.open(out / "edit_mask.png")) > 0
    hx, hy = record["runs"][0]["points"][0]["handle"]  # where the run started
    assert record["runs"][0]["mask"] and mask[round(hy), round(hx)] and 0.02 < mask.mean() < 0.2


def test_a_plain_diffusers_from_pretrained_loads_and_samples():
    """The folder is a StableDiffusionPipeline: from_pretrained with no dtype gives float32 parts that run together."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(registry.resolve("zoo:faces-sd")), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    assert {next(getattr(pipe, n).parameters()).dtype for n in ("unet", "vae", "text_encoder")} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a round cartoon face", num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
