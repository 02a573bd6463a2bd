"""zoo:faces-vae: smoke training, resumption, export round trip, metrics and the latent scaling factor."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dragrt.zoo import training
from dragrt.zoo import vae as zvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("faces-vae-run")
    metrics = zvae.train(run, minutes=5, device="cpu", seed=0, smoke=True)
    return run, metrics


def test_shipped_config_fits_budget_and_is_sd_shaped():
    vae = zvae.build_vae()
    n = sum(p.numel() for p in vae.parameters())
    assert 2 * n <= zvae.MAX_BYTES, f"{2 * n} fp16 bytes"
    assert vae.config.latent_channels == 4
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D"] * 4  # 3 downsamplings: 8x
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert vae.encode(x).latent_dist.mean.shape == (1, 4, 8, 8)


def test_build_vae_rejects_bad_configs():
    with pytest.raises(ValueError, match="4 levels"):
        zvae.build_vae({**zvae.MODEL_CONFIG, "block_out_channels": [32, 64, 64]})
    with pytest.raises(ValueError, match="norm_num_groups"):
        zvae.build_vae({**zvae.MODEL_CONFIG, "block_out_channels": [32, 48, 64, 64]})


def test_smoke_training_lowers_loss_and_reports(smoke_run):
    run, m = smoke_run
    assert m["loss_last"] < m["loss_first"]
    assert m["step"] == zvae.SMOKE_HPARAMS.fixed_steps
    for key in ("psnr_db", "ssim", "scaling_factor", "latent_std"):
        assert math.isfinite(m[key])
    assert m["scaling_factor"] == pytest.approx(1 / m["latent_std"], rel=1e-3)
    assert json.loads((run / training.METRICS).read_text())["step"] == m["step"]


def test_attribute_ceilings_of_the_shipped_vae():
    """What faces-vae's round trips keep of the attributes faces-sd is scored on: the renders read right (the
    reader's own accuracy), the round trips lose part of it -- most for the few-pixel continuous attributes."""
    from dragrt.zoo import registry

    if not {"faces-vae", "faces-attributes", "faces-landmarks", "faces-attribute-details"} <= set(registry.available()):
        pytest.skip("needs the shipped VAE and the attribute reader")
    vae, images = zvae.load_vae(), zvae.heldout_images(24, 256)
    c = zvae.attribute_ceilings(vae, images, batch=8)
    # the evaluation's one encode-and-decode gives the same ceilings and the same round-trip metrics
    assert zvae.evaluate(vae, images[:8], batch=8, ceilings=True) == {
        **zvae.evaluate(vae, images[:8], batch=8), **zvae.attribute_ceilings(vae, images[:8], batch=8)}
    assert set(c) == {"categorical_accuracy_renders", "categorical_accuracy_round_trips", "caption_agreement_renders",
                      "caption_agreement_round_trips"}
    assert c["categorical_accuracy_renders"] >= 0.95 and c["caption_agreement_renders"] >= 0.85
    assert c["caption_agreement_round_trips"] < c["caption_agreement_renders"] - 0.1


def test_finished_run_only_evaluates_again(smoke_run):
    run, first = smoke_run
    again = zvae.train(run, minutes=5, device="cpu", seed=123, smoke=True)  # seed comes from the checkpoint
    assert again["step"] == first["step"] and again["chunks"] == first["chunks"] + 1
    assert again["seed"] == 0 and again["chunk_steps"] == 0
    assert again["psnr_db"] == pytest.approx(first["psnr_db"], abs=1e-3)  # EMA kept as an fp16 difference


class _StepBudget:
    """A budget whose clock advances one second per look: ``minutes * 60`` looks, i.e. about that many steps."""

    def __init__(self, minutes):
        self.seconds, self.looks = minutes * 60, 0

    @property
    def elapsed(self):
        self.looks += 1
        return float(self.looks)


def test_interrupted_run_resumes_to_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "Budget", _StepBudget)
    part = zvae.train(tmp_path, minutes=10 / 60, device="cpu", seed=0, smoke=True)
    assert 0 < part["step"] < zvae.SMOKE_HPARAMS.fixed_steps
    rest = zvae.train(tmp_path, minutes=100 / 60, device="cpu", seed=0, smoke=True)
    assert rest["step"] == zvae.SMOKE_HPARAMS.fixed_steps and rest["chunks"] == 2
    assert rest["chunk_steps"] == rest["step"] - part["step"]
    assert rest["images_seen"] == rest["step"] * zvae.SMOKE_HPARAMS.batch_size


def test_export_round_trip(smoke_run, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    run, m = smoke_run
    dest = zvae.export(run, tmp_path / "faces-vae")
    weights = load_file(str(dest / zvae.WEIGHTS_FILE))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert (dest / training.CARD).is_file()
    direct = AutoencoderKL.from_pretrained(str(dest), local_files_only=True)
    assert direct.config.scaling_factor == pytest.approx(m["scaling_factor"])
    vae = zvae.load_vae(dest)
    assert not any(p.requires_grad for p in vae.parameters())
    images = zvae.heldout_images(4, 64)
    again = zvae.evaluate(vae, images)
    assert again["psnr_db"] == pytest.approx(m["psnr_db"], abs=0.3)  # fp16 weights, 4 of the 8 images
    with pytest.raises(FileNotFoundError, match="no faces-vae checkpoint"):
        zvae.export(tmp_path / "empty", tmp_path / "x")


def test_export_over_an_older_one_replaces_files_by_rename(smoke_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run, _ = smoke_run
    dest = tmp_path / "faces-vae"
    dest.mkdir()
    (dest / "zoo_alias.json").write_text("{}")  # a file the export does not write stays
    old = {"w": torch.arange(6, dtype=torch.float16)}
    save_file(old, str(dest / zvae.WEIGHTS_FILE))
    mapped = load_file(str(dest / zvae.WEIGHTS_FILE))  # maps the file, as a running demo would hold it
    assert zvae.export(run, dest) == dest
    assert torch.equal(mapped["w"], old["w"])  # the old bytes were not rewritten under the mapping
    assert "w" not in load_file(str(dest / zvae.WEIGHTS_FILE))
    assert (dest / "zoo_alias.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces-vae"]  # no staging folder left


def test_load_vae_names_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zvae.load_vae(tmp_path / "nope")


def test_scaling_factor_is_inverse_std():
    g = torch.Generator().manual_seed(0)
    latents = 0.25 + 5.5 * torch.randn(64, 4, 8, 8, generator=g)
    assert zvae.latent_scaling_factor(latents) == pytest.approx(1 / latents.std().item())
    assert 1 / 5.5 == pytest.approx(zvae.latent_scaling_factor(latents), rel=0.02)
    with pytest.raises(ValueError, match="std"):
        zvae.latent_scaling_factor(torch.ones(2, 4, 8, 8))


def test_posterior_means_and_scaling_on_a_model():
    torch.manual_seed(0)
    vae = zvae.build_vae(zvae.SMOKE_CONFIG).eval()
    images = zvae.heldout_images(3, 64)
    lat = zvae.posterior_means(vae, images, batch=2)
    assert lat.shape == (3, 4, 8, 8) and lat.dtype == torch.float32
    scaled = lat * zvae.latent_scaling_factor(lat)
    assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)


def test_psnr_and_ssim():
    a = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert zvae.psnr(a, a).tolist() == [100.0, 100.0]
    assert zvae.ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    b = (a.int() + 5).clamp(max=255)
    b = torch.where(a.int() + 5 > 255, a.int() - 5, b).to(torch.uint8)  # every pixel off by exactly 5
    assert zvae.psnr(a, b)[0].item() == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-4)
    assert zvae.ssim(a, torch.zeros_like(a)).max().item() < 0.1
    with pytest.raises(ValueError, match="shapes"):
        zvae.psnr(a, a[:1])


def test_lr_schedule_and_planner():
    assert training.lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert training.lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert training.lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert training.lr_factor(1000, 10, 100, 0.1) == pytest.approx(0.1)
    planner = zvae.StepPlanner(skip=2, steps=10, min_steps=50, max_steps=10_000)
    assert planner.wants_time(2) and not planner.wants_time(5)
    assert planner.observe(2, 2, now=100.0, seconds_left=60.0) == 0
    total = planner.observe(12, 12, now=101.0, seconds_left=60.0)  # 10 steps/s, 60 s left
    assert total == 12 + 570  # 10 steps/s over 95 % of the 60 s left
    assert planner.observe(13, 13, now=102.0, seconds_left=1.0) == 0  # plans once


def test_ema_tracks_weights():
    lin = torch.nn.Linear(2, 2)
    ema = zvae.Ema(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.add_(1.0)
    for _ in range(200):
        ema.update(lin)
    averaged = ema.copy_to(lin)
    assert torch.allclose(averaged.weight, lin.weight, atol=1e-5)
    with pytest.raises(ValueError, match="decay"):
        zvae.Ema(lin, decay=1.0)


def test_compact_training_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ema = zvae.Ema(model, 0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    for _ in range(5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
    state = zvae.training_state(model, ema, opt)
    assert {v.dtype for v in state["ema"]["delta"].values()} == {torch.float16}
    assert all("exp_avg" not in st for st in state["optimizer"]["state"].values())

    torch.manual_seed(1)
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    ema2 = zvae.Ema(model2, 0.9)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, foreach=True)
    zvae.restore_training_state(state, model2, ema2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.shadow, ema2.shadow):
        assert torch.allclose(a, b, atol=1e-5)
    assert ema2.updates == 5
    v1 = [opt.state[p]["exp_avg_sq"] for p in model.parameters()]
    v2 = [opt2.state[p]["exp_avg_sq"] for p in model2.parameters()]
    for a, b in zip(v1, v2):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-12)
    exported = zvae.ema_model_state(model2, state)
    assert torch.allclose(exported["0.weight"], ema.shadow[0], atol=1e-5)


def _assert_only_this_half_moved(start, done, frozen: str) -> None:
    """The exported ``done`` holds ``start``'s ``frozen`` half bit for bit and moved most tensors of the other."""
    from safetensors.torch import load_file

    a, b = load_file(str(start / zvae.WEIGHTS_FILE)), load_file(str(done / zvae.WEIGHTS_FILE))
    kept = [k for k in a if k.startswith(zvae.HALF_PREFIXES[frozen])]
    tuned = [k for k in a if k not in kept]
    assert kept and tuned and all(k.startswith(sum(zvae.HALF_PREFIXES.values(), ())) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in kept)
    assert sum(not torch.equal(a[k], b[k]) for k in tuned) > len(tuned) // 2


def test_decoder_only_finetune_keeps_the_latent_space(smoke_run, tmp_path):
    """--init + --decoder-only: the exported encoder is bit-identical to the start (so a diffusion model trained on
    its latents stays valid), the decoder moved, the card says where the run started, and misuse is refused."""

    start = zvae.export(smoke_run[0], tmp_path / "start")
    run = tmp_path / "ft"
    m = zvae.train(run, minutes=5, device="cpu", seed=1, smoke=True, init=start, decoder_only=True, mse_weight=2.0)
    assert m["step"] == zvae.SMOKE_HPARAMS.fixed_steps
    state = training.load_checkpoint(run)
    assert state["hparams"]["decoder_only"] is True and state["hparams"]["init"] == str(start)
    assert state["hparams"]["mse_weight"] == 2.0
    assert m["scaling_factor"] == pytest.approx(json.loads((start / "config.json").read_text())["scaling_factor"],
                                                rel=1e-3)  # same encoder, same latent statistics (fp16 weights)
    done = zvae.export(run, tmp_path / "done")
    _assert_only_this_half_moved(start, done, frozen="encoder")
    card = (done / training.CARD).read_text()
    assert "encoder frozen" in card and f"--init {start} --decoder-only --mse-weight 2 " in card
    steps = zvae.SMOKE_HPARAMS.fixed_steps  # the start's own card, carried into this one: the chain's history
    assert f"- started from: {start} ({steps} steps at commit " in card and "from random initialisation)" in card

    # A start whose config keeps an earlier encoder's scale (as the shipped one does after encoder rounds): the
    # decoder round keeps that scale too, the one the diffusion model's latents were trained at.
    config = json.loads((start / "config.json").read_text())
    (start / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.77}))
    m2 = zvae.train(tmp_path / "ft2", minutes=5, device="cpu", seed=1, smoke=True, init=start, decoder_only=True)
    assert m2["scaling_factor"] == 0.77 and m2["scaling_factor_measured"] == pytest.approx(m["scaling_factor"],
                                                                                          rel=1e-3)
    assert json.loads((zvae.export(tmp_path / "ft2", tmp_path / "done2") / "config.json").read_text())[
        "scaling_factor"] == pytest.approx(0.77)

    with pytest.raises(ValueError, match="decoder_only needs init"):
        zvae.train(tmp_path / "x", minutes=1, device="cpu", smoke=True, decoder_only=True)
    with pytest.raises(ValueError, match="new run only"):
        zvae.train(run, minutes=1, device="cpu", smoke=True, init=start)
    with pytest.raises(ValueError, match="new run only"):
        zvae.train(run, minutes=1, device="cpu", smoke=True, mse_weight=1.0)
    with pytest.raises(ValueError, match=r"mse_weight=-1 is not allowed; use a number in \[0, 1000\)"):
        zvae.train(tmp_path / "y", minutes=1, device="cpu", smoke=True, mse_weight=-1)


def test_encoder_only_finetune_keeps_the_decoder_and_the_scale(smoke_run, tmp_path):
    """--init + --encoder-only: the exported decoder is bit-identical to the start (a diffusion model's samples,
    which only the decoder sees, do not change), the encoder moved, the start's scaling_factor is kept (the
    measured one reported beside it), the card says so, and misuse is refused."""

    start = zvae.export(smoke_run[0], tmp_path / "start")
    start_scale = json.loads((start / "config.json").read_text())["scaling_factor"]
    run = tmp_path / "ft"
    m = zvae.train(run, minutes=5, device="cpu", seed=1, smoke=True, init=start, encoder_only=True, mse_weight=1.0,
                   batch_size=2, lr=1e-4)
    assert m["step"] == zvae.SMOKE_HPARAMS.fixed_steps
    state = training.load_checkpoint(run)
    assert state["hparams"]["encoder_only"] is True and state["hparams"]["decoder_only"] is False
    assert state["hparams"]["batch_size"] == 2 and m["images_seen"] == 2 * zvae.SMOKE_HPARAMS.fixed_steps
    assert state["hparams"]["lr"] == 1e-4
    assert m["scaling_factor"] == start_scale and m["scaling_factor_measured"] != start_scale
    done = zvae.export(run, tmp_path / "done")
    assert json.loads((done / "config.json").read_text())["scaling_factor"] == pytest.approx(start_scale)
    _assert_only_this_half_moved(start, done, frozen="decoder")
    card = (done / training.CARD).read_text()
    assert "decoder frozen: the encoder fine-tuned" in card
    assert f"--init {start} --encoder-only --mse-weight 1 --batch 2 --lr 0.0001 --export" in card
    assert "scaling_factor_measured" in card and "kept for the diffusion model" in card

    with pytest.raises(ValueError, match="encoder_only needs init"):
        zvae.train(tmp_path / "x", minutes=1, device="cpu", smoke=True, encoder_only=True)
    with pytest.raises(ValueError, match="decoder_only and encoder_only exclude each other"):
        zvae.train(tmp_path / "x", minutes=1, device="cpu", smoke=True, init=start, encoder_only=True,
                   decoder_only=True)
    with pytest.raises(ValueError, match=r"batch_size=0 is not allowed; use an integer in \[1, 1024\]"):
        zvae.train(tmp_path / "y", minutes=1, device="cpu", smoke=True, batch_size=0)
    with pytest.raises(ValueError, match="new run only"):
        zvae.train(run, minutes=1, device="cpu", smoke=True, batch_size=4)
    for bad in (0, -1e-4, 0.5, True):
        with pytest.raises(ValueError, match=r"lr=.* is not allowed; use a number in \(0, 0.01\]"):
            zvae.train(tmp_path / "y", minutes=1, device="cpu", smoke=True, lr=bad)
    with pytest.raises(ValueError, match="new run only"):
        zvae.train(run, minutes=1, device="cpu", smoke=True, lr=1e-4)


def test_mse_term_adds_its_weight_times_the_squared_error():
    torch.manual_seed(0)
    vae = zvae.build_vae(zvae.SMOKE_CONFIG)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    base, parts = zvae.vae_loss(vae, x, zvae.SMOKE_HPARAMS, torch.Generator().manual_seed(1))
    with_mse, parts2 = zvae.vae_loss(vae, x, dataclasses.replace(zvae.SMOKE_HPARAMS, mse_weight=3.0),
                                     torch.Generator().manual_seed(1))
    assert parts["mse"] > 0 and torch.equal(parts["mse"], parts2["mse"])
    torch.testing.assert_close(with_mse - base, 3.0 * parts["mse"], rtol=1e-5, atol=1e-6)


def test_weighted_pixel_terms_count_the_weighted_pixels_more():
    """With weights, each pixel term (L1, MSE, the edge L1) is a weighted mean, each image's weights normalised to
    mean 1; all-ones weights give the plain loss."""
    from types import SimpleNamespace

    recon = torch.zeros(2, 3, 4, 4)
    recon[0, :, 1, 2] = 0.5  # image 0 is off by 0.5 at one pixel (inside the box), image 1 is exact
    stand_in = SimpleNamespace(
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(
            parameters=torch.cat([torch.zeros(2, 1, 1, 1), torch.full((2, 1, 1, 1), -30.0)], 1))),
        decode=lambda z: SimpleNamespace(sample=recon))
    hp = dataclasses.replace(zvae.SMOKE_HPARAMS, grad_weight=0.0, mse_weight=2.0, kl_weight=0.0)
    x = torch.zeros(2, 3, 4, 4)
    plain, parts = zvae.vae_loss(stand_in, x, hp, torch.Generator().manual_seed(0))
    ones, _ = zvae.vae_loss(stand_in, x, hp, torch.Generator().manual_seed(0), weights=torch.ones(2, 1, 4, 4))
    w = training.region_weights(torch.tensor([[0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]]), 4, 3.0)
    weighted, wparts = zvae.vae_loss(stand_in, x, hp, torch.Generator().manual_seed(0), weights=w)
    assert parts["l1"].item() == pytest.approx(3 * 0.5 / 96) and ones.item() == pytest.approx(plain.item())
    # image 0: 4 at (1, 2) of 16 pixels with one 4 -> mean weight 19/16; image 1: every pixel 4 -> weights all 1
    assert wparts["l1"].item() == pytest.approx(3 * 0.5 * (4 / (19 / 16)) / 96)
    assert wparts["mse"].item() == pytest.approx(3 * 0.25 * (4 / (19 / 16)) / 96)
    assert weighted.item() == pytest.approx(wparts["l1"].item() + 2.0 * wparts["mse"].item())


def test_eye_weight_trains_a_new_run_and_is_on_its_card(smoke_run, tmp_path, monkeypatch):
    """Every step's pixel losses get the eye-region weights of the step's own renders; the run records the weight,
    the card's command repeats it, a resumed run refuses it, and bad values are named."""
    seen = []
    loss = zvae.vae_loss

    def spy(*args, weights=None, **kw):
        seen.append(weights)
        return loss(*args, weights=weights, **kw)

    monkeypatch.setattr(zvae, "vae_loss", spy)
    start = zvae.export(smoke_run[0], tmp_path / "start")
    run = tmp_path / "run"
    m = zvae.train(run, minutes=5, device="cpu", seed=0, smoke=True, init=start, encoder_only=True, eye_weight=4)
    assert m["step"] == zvae.SMOKE_HPARAMS.fixed_steps == len(seen) and math.isfinite(m["psnr_db"])
    for w in seen:
        assert w.shape == (zvae.SMOKE_HPARAMS.batch_size, 1, 64, 64) and set(w.unique().tolist()) == {1.0, 5.0}
        assert 0.03 < (w == 5.0).float().mean() < 0.3
    assert training.load_checkpoint(run)["hparams"]["eye_weight"] == 4.0
    card = (zvae.export(run, tmp_path / "out") / training.CARD).read_text()
    assert "--encoder-only --eye-weight 4 --export" in card
    with pytest.raises(ValueError, match="new run only"):
        zvae.train(run, minutes=1, device="cpu", smoke=True, eye_weight=4)
    for bad in (-1, 101, True):
        with pytest.raises(ValueError, match=r"eye_weight=.* is not allowed; use a number in \[0, 100\]"):
            zvae.train(tmp_path / "bad", minutes=1, device="cpu", smoke=True, eye_weight=bad)
    monkeypatch.setattr(zvae, "vae_loss", loss)


@pytest.mark.parametrize("argv, message", [
    (["faces-vae", "--decoder-only"], "--decoder-only is for faces-vae with --init"),
    (["faces-clip", "--init", "zoo:faces-clip"], "--init is not supported for faces-clip"),
    (["faces-clip", "--compile", "default"], "--compile is for faces-vae, faces-sd, faces-stylegan2"),
    (["faces-sd", "--mse-weight", "1"], "--mse-weight is for faces-vae"),
    (["faces-vae", "--encoder-only"], "--encoder-only is for faces-vae with --init"),
    (["faces-vae", "--init", "zoo:faces-vae", "--encoder-only", "--decoder-only"],
     "--encoder-only and --decoder-only exclude each other"),
    (["faces-sd", "--batch", "4"], "--batch is for faces-vae, faces-stylegan2"),
    (["faces-sd", "--lr", "1e-4"], "--lr is for faces-vae"),
    (["faces-sd", "--eye-weight", "2"], "--eye-weight is for faces-vae"),
    (["faces-vae", "--lower-face-weight", "2"], "--lower-face-weight is for faces-sd"),
    (["faces-vae", "--eye-weight", "-1"], "eye_weight=-1.0 is not allowed; use a number in [0, 100]"),
    (["faces-vae", "--lr", "0"], "lr=0.0 is not allowed; use a number in (0, 0.01]"),
    (["faces-vae", "--batch", "0"], "batch_size=0 is not allowed; use an integer in [1, 1024]"),
])
def test_train_command_refuses_init_flags_where_they_do_not_apply(argv, message, tmp_path, capsys):
    from dragrt.zoo import train as zoo_train

    with pytest.raises(SystemExit):
        zoo_train.main([*argv, "--run-dir", str(tmp_path), "--smoke", "--device", "cpu"])
    assert message in capsys.readouterr().err


def test_round_trip_grid_shows_renders_over_their_round_trips(smoke_run, tmp_path):
    from PIL import Image

    dest = zvae.export(smoke_run[0], tmp_path / "vae")
    vae = zvae.load_vae(dest)
    grid = np.asarray(Image.open(zvae.write_round_trip_grid(vae, tmp_path / "g.png", n=3, thumb=64)))
    assert grid.shape == (128, 192, 3)
    renders = zvae.heldout_images(3, vae.config.sample_size)  # [3, 3, 64, 64] uint8, the thumbs' size
    top = torch.cat(list(renders), dim=2).permute(1, 2, 0).numpy()
    assert np.abs(grid[:64].astype(int) - top.astype(int)).mean() < 2  # top row: the renders themselves
    assert np.abs(grid[64:].astype(int) - top.astype(int)).mean() > 2  # bottom row: the smoke VAE's round trips


def test_compiled_chunk_trains_and_saves_the_same_keys(aot_eager_compile, tmp_path):
    """compile_mode compiles the encoder's and decoder's forwards in place: training runs, the metrics say so,
    and the checkpoint and export keep their plain parameter names."""
    m = zvae.train(tmp_path / "run", minutes=5, device="cpu", seed=0, smoke=True, compile_mode="default")
    assert aot_eager_compile == ["default", "default"]
    assert m["compile_mode"] == "default" and math.isfinite(m["psnr_db"]) and m["steps_per_second"] > 0
    keys = set(training.load_checkpoint(tmp_path / "run")["model"])
    assert keys == set(zvae.build_vae(zvae.SMOKE_CONFIG).state_dict())
    with pytest.raises(ValueError, match="compile_mode='max' is not allowed"):
        zvae.train(tmp_path / "x", minutes=1, device="cpu", smoke=True, compile_mode="max")


def test_target_status_names_the_miss_and_how_to_train_on():
    assert training.target_status({"meets_target": True}, "29 dB", "28 dB", "faces-vae") is None
    line = training.target_status({"meets_target": False}, "26.1 dB PSNR", "28 dB", "faces-vae")
    assert line.startswith("**Below target:** 26.1 dB PSNR against the target 28 dB.")
    assert "`--init zoo:faces-vae` starts a new run from these very weights" in line
