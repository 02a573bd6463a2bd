"""zoo:faces-sd: SD1.5-shaped UNet config, smoke training on frozen VAE + text tower, evaluation through
StableDiffusionPipeline with an attribute model, resumption, export, and loading the exported folder with
both ``load_sd`` and ``StableDiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dragrt.zoo import training, world
from dragrt.zoo import unet as zunet
from dragrt.zoo import vae as zvae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_vae_folder(folder):
    torch.manual_seed(0)
    vae = zvae.build_vae(zvae.SMOKE_CONFIG).eval()
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _tiny_clip_folder(folder):
    """A random tiny CLIP in the faces-clip export layout (config, weights, tokenizer files)."""
    from safetensors.torch import save_file

    from dragrt.zoo import clip as zclip
    from dragrt.zoo import text

    tok = text.build_tokenizer(folder)
    torch.manual_seed(0)
    model = zclip.build_clip(zclip.SMOKE_RECIPE, tok)
    model.config.save_pretrained(str(folder))
    state = {k: v for k, v in training.fp16_state_dict(model).items() if not k.endswith("position_ids")}
    save_file(state, str(folder / zclip.WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _tiny_attribute_folder(folder):
    from safetensors.torch import save_file

    from dragrt.zoo import evaluators

    torch.manual_seed(0)
    model = evaluators.AttributeNet(widths=(8, 8, 8, 8, 8), blocks=(1, 1, 1, 1), feature_dim=16)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / evaluators.CONFIG).write_text(json.dumps(evaluators.model_config("attributes", model)))
    save_file(training.fp16_state_dict(model), str(folder / evaluators.WEIGHTS))
    return folder


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces-sd")
    vae_dir = _tiny_vae_folder(root / "vae")
    clip_dir = _tiny_clip_folder(root / "clip")
    attr_dir = _tiny_attribute_folder(root / "attributes")
    run = root / "run"
    metrics = zunet.train(run, minutes=5, device="cpu", seed=0, smoke=True, vae_path=vae_dir, clip_path=clip_dir,
                          attributes_path=attr_dir)
    return SimpleNamespace(root=root, run=run, metrics=metrics, attributes=attr_dir)


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    return zunet.export(smoke_run.run, tmp_path_factory.mktemp("export") / "faces-sd")


@pytest.mark.parametrize("hidden", [128, 256])
def test_shipped_unet_is_sd15_shaped_and_fits(hidden):
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = zunet.build_unet(zunet.unet_config(hidden))
    n = sum(p.numel() for p in unet.parameters())
    assert 2 * n <= zunet.MAX_UNET_BYTES - 100_000, f"{2 * n} fp16 bytes"
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    transformers = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(transformers) == 16  # as SD1.5: 6 down, 1 mid, 9 up
    assert unet.config.sample_size == 32 and unet.config.cross_attention_dim == hidden


def test_up_blocks_2_is_the_full_resolution_feature():
    from dragrt.runtime.models.sd import UNetFeatureTap

    torch.manual_seed(0)
    cfg = zunet.unet_config(32, smoke=True)
    unet = zunet.build_unet(cfg).eval()
    with UNetFeatureTap(unet, [2], stop_after=True) as tap, torch.no_grad():
        tap.run(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
    assert tap.features[2].shape == (1, cfg["block_out_channels"][1], 8, 8)


def test_config_errors():
    with pytest.raises(ValueError, match="cross_attention_dim"):
        zunet.unet_config(0)
    with pytest.raises(ValueError, match="down_block_types"):
        zunet.build_unet({**zunet.unet_config(32), "down_block_types": ["DownBlock2D"] * 4})
    with pytest.raises(ValueError, match="caption_dropout"):
        zunet._validate(zunet.UNetHParams(caption_dropout=1.5))


def test_smoke_training_lowers_loss_and_scores_samples(smoke_run):
    m = smoke_run.metrics
    assert m["loss_last"] < m["loss_first"]
    assert m["step"] == zunet.SMOKE_HPARAMS.fixed_steps
    assert m["scaling_factor"] == 0.5  # the given VAE's
    assert 0.0 <= m["attribute_accuracy"] <= 1.0
    assert set(m["attribute_accuracy_per_attribute"]) >= {"hat", "glasses", "hair_colour"}
    assert 0.0 <= m["classifier_on_renders"] <= 1.0 and 0.0 <= m["classifier_on_vae_round_trips"] <= 1.0
    assert (smoke_run.run / "samples.png").is_file()
    assert (smoke_run.run / zunet.FROZEN / "text_encoder" / "model.safetensors").is_file()


def test_resume_continues_from_checkpoint(smoke_run):
    again = zunet.train(smoke_run.run, minutes=5, device="cpu", seed=99, smoke=True)
    assert again["chunks"] == smoke_run.metrics["chunks"] + 1
    assert again["step"] == smoke_run.metrics["step"]  # the schedule was done; nothing more to train
    assert again["seed"] == 0 and again["attribute_accuracy"] is None  # no attribute model this time
    assert "skipped" in again["attribute_note"]


class _StepBudget:
    """A budget whose clock advances one second per look (about ``minutes * 60`` training steps)."""

    def __init__(self, minutes):
        self.seconds, self.looks = minutes * 60, 0

    @property
    def elapsed(self):
        self.looks += 1
        return float(self.looks)


def test_interrupted_run_resumes_with_its_frozen_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "Budget", _StepBudget)
    part = zunet.train(tmp_path, minutes=8 / 60, device="cpu", seed=3, smoke=True)  # random stand-ins
    assert 0 < part["step"] < zunet.SMOKE_HPARAMS.fixed_steps
    assert (tmp_path / zunet.FROZEN / "source.json").is_file()
    rest = zunet.train(tmp_path, minutes=100 / 60, device="cpu", seed=0, smoke=True)
    assert rest["step"] == zunet.SMOKE_HPARAMS.fixed_steps and rest["chunks"] == 2 and rest["seed"] == 3
    assert rest["chunk_steps"] == rest["step"] - part["step"]
    assert rest["scaling_factor"] == part["scaling_factor"]


def test_export_ships_the_given_vae_and_text_tower(smoke_run, exported):
    from safetensors.torch import load_file

    vae_in = load_file(str(smoke_run.root / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_out = load_file(str(exported / "vae" / "diffusion_pytorch_model.safetensors"))
    assert vae_in.keys() == vae_out.keys()
    assert all(torch.equal(vae_in[k].half(), vae_out[k]) for k in vae_in)
    clip_in = load_file(str(smoke_run.root / "clip" / "model.safetensors"))
    text_out = load_file(str(exported / "text_encoder" / "model.safetensors"))
    assert text_out and all(torch.equal(clip_in[k], v) for k, v in text_out.items())


def test_export_loads_with_load_sd_and_stable_diffusion_pipeline(exported):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG, load_sd

    for part, file in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        tensors = load_file(str(exported / part / f"{file}.safetensors"))
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, part
    assert (exported / training.CARD).is_file()
    components = load_sd(exported)
    assert components.vae.config.scaling_factor == 0.5
    assert components.tokenizer.model_max_length == 77
    for key in ("beta_schedule", "beta_start", "beta_end", "steps_offset", "set_alpha_to_one", "timestep_spacing"):
        assert components.scheduler.config[key] == SD15_SCHEDULER_CONFIG[key]

    pipe = StableDiffusionPipeline.from_pretrained(str(exported), local_files_only=True, safety_checker=None,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    out = pipe("a round cartoon face with a cap", num_inference_steps=2, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and (out >= 0).all() and (out <= 1).all()


def test_export_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no faces-sd checkpoint"):
        zunet.export(tmp_path, tmp_path / "out")


def test_smoke_stand_ins():
    frozen = zunet.smoke_frozen()
    assert frozen.text_encoder.config.hidden_size == 32
    assert frozen.scaling_factor > 0
    ids = zunet.tokenize(frozen.tokenizer, ["a round cartoon face", ""])
    assert ids.shape == (2, 77)


class _Fixed(nn.Module):
    """An attribute model that answers ``field`` with the next rows of ``values``, batch after batch."""

    def __init__(self, field: str, values: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.field, self.values, self.seen = field, values, 0

    def forward(self, images):
        out = self.values[self.seen:self.seen + len(images)]
        self.seen += len(images)
        return SimpleNamespace(**{self.field: out})


def test_attribute_accuracy_counts_hits():
    target = torch.zeros(4, 9, dtype=torch.long)
    preds = target.clone()
    preds[0, 0] = 1  # one miss in head_shape
    preds[:, 8] = 3  # every beard wrong
    acc = zunet.attribute_accuracy(_Fixed("categorical", preds), torch.zeros(4, 3, 8, 8), target, batch=3)
    assert acc["per_attribute"]["head_shape"] == 0.75 and acc["per_attribute"]["beard"] == 0.0
    assert acc["mean"] == pytest.approx(1 - 5 / 36, abs=1e-4)
    # confusion[attribute][asked][read]: every beard asked as none, read as full (class 3)
    assert acc["confusion"]["beard"] == [[0, 0, 0, 4], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert acc["confusion"]["head_shape"] == [[3, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4]
    assert acc["confusion"]["background_colour"][0][0] == 4 and len(acc["confusion"]["background_colour"]) == 10
    with pytest.raises(ValueError, match="targets"):
        zunet.attribute_accuracy(_Fixed("categorical", preds), torch.zeros(3, 3, 8, 8), target)


def test_caption_agreement_bins_the_readings_as_the_captions_do():
    from dragrt.zoo import world

    n = 6
    params = [world.sample_params(s) for s in world.held_out_seeds(n)]
    truth = torch.tensor([[p.attributes()[c] for c in world.CONTINUOUS] for p in params])
    bins = zunet.heldout_caption_bins(n)
    assert bins[2] == world.caption_bins(params[2].attributes())

    r = zunet.caption_agreement(_Fixed("continuous", truth), torch.zeros(n, 3, 8, 8), bins, batch=4)
    assert r["mean"] == 1.0 and set(r["per_attribute"]) == set(world.CAPTION_BINS) and r["n"] == n
    wrong = truth.clone()
    i = world.CONTINUOUS_INDEX["smile"]
    wrong[0, i] = 0.9 if truth[0, i] <= 0.8 else 0.1  # another mouth phrase
    r = zunet.caption_agreement(_Fixed("continuous", wrong), torch.zeros(n, 3, 8, 8), bins, batch=4)
    assert r["per_attribute"]["smile"] == round(1 - 1 / n, 4)
    assert r["mean"] == pytest.approx(1 - 1 / (n * len(world.CAPTION_BINS)), abs=1e-4)
    with pytest.raises(ValueError, match="targets"):
        zunet.caption_agreement(_Fixed("continuous", truth), torch.zeros(n - 1, 3, 8, 8), bins)


class _Both(nn.Module):
    """An attribute reader answering fixed ``categorical`` and ``continuous`` rows; counts the images it reads."""

    def __init__(self, categorical: torch.Tensor, continuous: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.cat, self.cont, self.seen = categorical, continuous, 0

    def forward(self, images):
        rows = slice(self.seen, self.seen + len(images))
        self.seen += len(images)
        return SimpleNamespace(categorical=self.cat[rows], continuous=self.cont[rows])


def test_score_gives_both_measures_from_one_pass():
    """``score``: the same numbers as attribute_accuracy and caption_agreement, reading each image once."""
    from dragrt.zoo import world

    n = 5
    params = [world.sample_params(s) for s in world.held_out_seeds(n)]
    cont = torch.tensor([[p.attributes()[c] for c in world.CONTINUOUS] for p in params])
    cont[1, world.CONTINUOUS_INDEX["smile"]] = 0.99
    target = torch.zeros(n, len(world.CATEGORICAL), dtype=torch.long)
    cat = target.clone()
    cat[0, 2] = 1
    bins, images = zunet.heldout_caption_bins(n), torch.zeros(n, 3, 8, 8)
    model = _Both(cat, cont)
    acc, agree = zunet.score(model, images, target, bins, batch=2)
    assert model.seen == n
    assert acc == zunet.attribute_accuracy(_Fixed("categorical", cat), images, target)
    assert agree == zunet.caption_agreement(_Fixed("continuous", cont), images, bins)
    assert zunet.score(_Both(cat, cont), images, target)[1] is None
    with pytest.raises(ValueError, match="caption_agreement: 5 images but 4 targets"):
        zunet.score(model, images, target, bins[:4])


def test_heldout_captions_match_the_renderer():
    from dragrt.zoo import world

    captions, cats = zunet.heldout_captions(3)
    face = world.render_seed(world.held_out_seeds(3)[2], 32)
    assert captions[2] == face.caption and cats[2].tolist() == face.categorical.tolist()
    # validation captions (settings are chosen on them) are other faces than the card's evaluation captions
    val, val_cats = zunet.heldout_captions(2, zunet.VALIDATION_START)
    face = world.render_seed(world.held_out_seeds(1, zunet.VALIDATION_START + 1)[0], 32)
    assert val[1] == face.caption and val_cats[1].tolist() == face.categorical.tolist()
    assert zunet.heldout_captions(2, 1)[0] == captions[1:3] and not set(val) & set(zunet.heldout_captions(64)[0])
    assert zunet.heldout_caption_bins(2, 1) == zunet.heldout_caption_bins(3)[1:]


def test_diffusion_loss_weights():
    from diffusers import DDIMScheduler

    from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG

    ac = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod

    def zero_unet(x, t, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(x))

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(512, 4, 8, 8, generator=g)
    t = torch.full((512,), 5)  # low noise: SNR >> 5
    plain = zunet.diffusion_loss(zero_unet, x0, None, ac, g, timesteps=t)
    weighted = zunet.diffusion_loss(zero_unet, x0, None, ac, g, timesteps=t, min_snr_gamma=5.0)
    snr = (ac[5] / (1 - ac[5])).item()
    assert plain.item() == pytest.approx(1.0, abs=0.03)  # E[eps^2]
    assert weighted.item() == pytest.approx(5.0 / snr, rel=0.05)


def test_latent_buffer_ring():
    buf = zunet.LatentBuffer(4, (1, 1, 1), (2, 3), torch.device("cpu"))
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1, torch.Generator())
    for v in range(6):
        buf.add(torch.full((1, 1, 1, 1), float(v)), torch.zeros(1, 2, 3), torch.full((1, 4), v / 10))
    assert buf.size == 4 and sorted(buf.latents.flatten().tolist()) == [2.0, 3.0, 4.0, 5.0]
    lat, text, boxes = buf.sample(8, torch.Generator().manual_seed(0))
    assert lat.shape == (8, 1, 1, 1) and text.dtype == torch.float32
    assert torch.allclose(boxes, lat.view(8, 1).expand(8, 4) / 10)  # each latent keeps its own box


def test_region_weights_and_the_weighted_loss():
    """region_weights marks the latent pixels whose centres lie in a box; a loss weighted by them counts errors
    there 1 + w times, normalised per sample, and all-ones weights give the plain loss."""
    from diffusers import DDIMScheduler

    from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG

    w = training.region_weights(torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]]), 4, 3.0)
    assert w.shape == (2, 1, 4, 4)
    expect = torch.ones(4, 4)
    expect[2:, 1] = 4.0  # centres 0.375 (x) and 0.625, 0.875 (y) inside; 0.125 / 0.625 outside
    assert torch.equal(w[0, 0], expect) and torch.equal(w[1, 0], torch.ones(4, 4))  # an empty box weighs nothing

    ac = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    err = torch.zeros(2, 4, 4, 4)
    err[0, :, 3, 1] = 1.0  # sample 0's prediction is off by 1 inside its box, sample 1's nowhere

    def unet(x, t, encoder_hidden_states):  # predicts the very noise drawn (same generator seed) plus err
        return SimpleNamespace(sample=(x - ac[t].sqrt().view(-1, 1, 1, 1) * x0)
                               / (1 - ac[t]).sqrt().view(-1, 1, 1, 1) + err)

    plain = zunet.diffusion_loss(unet, x0, None, ac, torch.Generator().manual_seed(0), timesteps=t)
    ones = zunet.diffusion_loss(unet, x0, None, ac, torch.Generator().manual_seed(0), timesteps=t,
                                weights=torch.ones(2, 1, 4, 4))
    weighted = zunet.diffusion_loss(unet, x0, None, ac, torch.Generator().manual_seed(0), timesteps=t, weights=w)
    assert plain.item() == pytest.approx(4 / 64 / 2, rel=1e-4) and ones.item() == pytest.approx(plain.item())
    assert weighted.item() == pytest.approx(4 * 4.0 / 64 / (22 / 16) / 2, rel=1e-4)  # mean weight 22/16


def test_lower_face_weight_trains_a_new_run_and_is_on_its_card(smoke_run, exported, tmp_path, monkeypatch):
    """The loss of every step gets the lower-face weights of the step's own latents (1 + 4 in the box, 1 out,
    the box a part of the image); the run records the weight; the card's command repeats it."""
    import math

    seen = []
    loss = zunet.diffusion_loss

    def spy(*args, weights=None, **kw):
        seen.append(None if weights is None else weights.clone())
        return loss(*args, weights=weights, **kw)

    monkeypatch.setattr(zunet, "diffusion_loss", spy)
    run = tmp_path / "run"
    m = zunet.train(run, minutes=5, device="cpu", seed=0, smoke=True, vae_path=smoke_run.root / "vae",
                    clip_path=smoke_run.root / "clip", init=exported, lower_face_weight=4)
    assert m["step"] == zunet.SMOKE_HPARAMS.fixed_steps == len(seen) and math.isfinite(m["loss_last"])
    for w in seen:
        assert w.shape == (4, 1, 8, 8) and set(w.unique().tolist()) == {1.0, 5.0}
        assert 0.05 < (w == 5.0).float().mean() < 0.5
    monkeypatch.setattr(zunet, "diffusion_loss", loss)
    assert training.load_checkpoint(run)["hparams"]["lower_face_weight"] == 4.0
    card = (zunet.export(run, tmp_path / "out") / training.CARD).read_text()
    assert f"--init {exported} --lower-face-weight 4 --export" in card
    with pytest.raises(ValueError, match="init and lower_face_weight apply to a new run only"):
        zunet.train(run, minutes=1, device="cpu", smoke=True, lower_face_weight=4)
    for bad in (-1, 101, True, "4"):
        with pytest.raises(ValueError, match="lower_face_weight must be"):
            zunet.train(tmp_path / f"bad{bad}", minutes=1, device="cpu", smoke=True,
                        vae_path=smoke_run.root / "vae", clip_path=smoke_run.root / "clip", lower_face_weight=bad)
    from dragrt.zoo import train as zoo_train

    calls = []
    monkeypatch.setattr(zunet, "train", lambda run_dir, **kw: calls.append(kw) or {"step": 0})
    assert zoo_train.main(["faces-sd", "--run-dir", str(tmp_path / "x"), "--lower-face-weight", "2.5"]) == 0
    assert calls[0]["lower_face_weight"] == 2.5
    with pytest.raises(SystemExit):
        zoo_train.main(["faces-vae", "--run-dir", str(tmp_path / "y"), "--lower-face-weight", "2"])


def test_init_starts_a_new_run_from_an_exported_unet(smoke_run, exported, tmp_path):
    """--init: the new run fine-tunes the exported UNet (its config and weights), the card says so, and a run
    that exists already refuses it."""
    config, start = zunet.load_init_unet(exported)
    state = start.state_dict()
    saved = json.loads((exported / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == saved["block_out_channels"] == [16, 16, 32, 32]  # the smoke UNet's
    shipped = load_file(str(exported / "unet" / zunet.UNET_WEIGHTS))
    assert set(state) == set(shipped)
    assert all(torch.equal(state[k], shipped[k].float()) for k in shipped)
    with pytest.raises(FileNotFoundError, match="has no UNet config"):
        zunet.load_init_unet(tmp_path)

    run = tmp_path / "run"
    m = zunet.train(run, minutes=5, device="cpu", seed=0, smoke=True, vae_path=smoke_run.root / "vae",
                    clip_path=smoke_run.root / "clip", init=exported)
    assert m["step"] == zunet.SMOKE_HPARAMS.fixed_steps
    assert training.load_checkpoint(run)["hparams"]["init"] == str(exported)
    card = (zunet.export(run, tmp_path / "out") / training.CARD).read_text()
    assert f"the UNet of {exported}" in card and f"--init {exported}" in card
    with pytest.raises(ValueError, match="new run only"):
        zunet.train(run, minutes=1, device="cpu", smoke=True, init=exported)


def test_compiled_chunk_trains(smoke_run, aot_eager_compile, tmp_path):
    """compile_mode compiles the UNet's blocks in place for the chunk; the run and its export are unchanged
    in form."""
    m = zunet.train(tmp_path / "run", minutes=5, device="cpu", seed=0, smoke=True, vae_path=smoke_run.root / "vae",
                    clip_path=smoke_run.root / "clip", compile_mode="default")
    assert m["compile_mode"] == "default" and m["step"] == zunet.SMOKE_HPARAMS.fixed_steps
    assert len(aot_eager_compile) == 9 and set(aot_eager_compile) == {"default"}  # 4 down, mid, 4 up blocks
    assert not any("_orig_mod" in k for k in training.load_checkpoint(tmp_path / "run")["model"])


def test_evaluate_folder_scores_an_export_at_each_guidance(smoke_run, exported, capsys):
    """The shipped card's evaluation, re-run on an exported folder at several CFG scales (same captions and
    seed as the run's own evaluation, so its number at the run's scale comes back)."""
    m = zunet.evaluate_folder(exported, guidance_scales=(5.0, 2.0), samples=4, steps=2, device="cpu",
                              attributes_path=smoke_run.attributes, progress=True)
    err = capsys.readouterr().err  # one bar over both scales' samples
    assert "sampling held-out captions" in err and "8/8" in err
    assert set(m["attribute_accuracy_by_guidance"]) == {"5.0", "2.0"}
    run_accuracy = smoke_run.metrics["attribute_accuracy"]  # 4 samples x 9 attributes: fp16 weights may flip one
    assert m["attribute_accuracy_by_guidance"]["5.0"] == pytest.approx(run_accuracy, abs=0.03)
    assert 0.0 <= m["classifier_on_vae_round_trips"] <= 1.0 and m["eval_samples"] == 4
    assert sum(map(sum, m["attribute_confusion"]["beard"])) == 4  # the main scale's samples, asked x read
    per = m["classifier_on_vae_round_trips_per_attribute"]
    assert list(per) == list(world.CATEGORICAL) and m["caption_start"] == 0
    assert sum(per.values()) / len(per) == pytest.approx(m["classifier_on_vae_round_trips"], abs=1e-3)
    with pytest.raises(ValueError, match="guidance_scales must be one or more finite numbers >= 1"):
        zunet.evaluate_folder(exported, guidance_scales=(0.5,), device="cpu")
    with pytest.raises(SystemExit):
        zunet.main(["evaluate", str(exported), "--guidance", "0", "--device", "cpu"])
    assert "guidance_scales must be one or more finite numbers >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zunet.main(["evaluate", str(exported), "--caption-start", "-1", "--device", "cpu"])
    assert "caption_start must be an integer in [0, 1000000], got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"caption_start must be an integer in \[0, 1000000\], got 2.5"):
        zunet.evaluate_folder(exported, caption_start=2.5, device="cpu")


def test_generate_takes_a_negative_prompt_per_caption(exported):
    """Negative prompts replace CFG's empty prompt (diffusers' negative_prompt): the empty string gives the plain
    samples bit for bit, another prompt other samples; one is needed per caption."""
    unet, frozen = zunet.load_pipeline_parts(exported, torch.device("cpu"))
    pipe = zunet.make_pipeline(unet, frozen, torch.float32)
    caps = zunet.heldout_captions(3)[0]
    kw = dict(steps=2, guidance=5.0, seed=1, batch=2, size=zunet.SMOKE_HPARAMS.image_size)
    plain = zunet.generate(pipe, caps, **kw)
    assert torch.equal(zunet.generate(pipe, caps, negative_prompts=["", "", ""], **kw), plain)
    negative = zunet.generate(pipe, caps, negative_prompts=["a moustache", "a cap", ""], **kw)
    assert (negative[:2] - plain[:2]).abs().amax() > 1e-3 and torch.equal(negative[2], plain[2])
    with pytest.raises(ValueError, match="negative_prompts: 2 given for 3 captions; give one a caption"):
        zunet.generate(pipe, caps, negative_prompts=["", ""], **kw)


def _vae_variant(exported, folder, change):
    """A copy of the pipeline's autoencoder with ``change(name) -> bool`` selecting the tensors to perturb."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(exported / "vae", folder)
    w = load_file(str(folder / zvae.WEIGHTS_FILE))
    save_file({k: v + 0.01 if change(k) else v for k, v in w.items()}, str(folder / zvae.WEIGHTS_FILE))
    return folder


def test_adopt_vae_takes_a_new_encoder_and_keeps_the_samples(exported, tmp_path, capsys):
    """A faces-vae fine-tuned with its decoder frozen reaches the pipeline without retraining the UNet: its files
    replace vae/, the card records it, and the pipeline decodes exactly as before; an autoencoder that decodes
    differently (weights or config) is refused without touching the pipeline."""
    import shutil

    pipe = tmp_path / "faces-sd"
    shutil.copytree(exported, pipe)
    (pipe / training.CARD).write_text("# card\n\n## Metrics\n\n- psnr: 1\n\n## Files\n\n- `vae/`\n")
    before = {k: v.clone() for k, v in load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE)).items()}
    new_encoder = _vae_variant(exported, tmp_path / "enc", lambda k: k.startswith("encoder."))
    new_decoder = _vae_variant(exported, tmp_path / "dec", lambda k: k.startswith("decoder.conv_out"))
    new_scale = _vae_variant(exported, tmp_path / "scale", lambda k: False)
    cfg = json.loads((new_scale / "config.json").read_text())
    (new_scale / "config.json").write_text(json.dumps({**cfg, "scaling_factor": cfg["scaling_factor"] * 2}))

    for bad, message in ((new_decoder, r"2 of \d+ decoder tensors differ"), (new_scale, r"\(scaling_factor\)")):
        with pytest.raises(ValueError, match=message):
            zunet.adopt_vae(bad, pipe)
    assert load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE)).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE)).items())

    mapped = load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE))  # memory-mapped, as a running process holds it
    assert zunet.main(["adopt-vae", str(new_encoder), "--pipeline", str(pipe)]) == 0
    assert all(torch.equal(mapped[k], v) for k, v in before.items())  # replaced by a rename, not rewritten
    assert "vae/ is now that of" in capsys.readouterr().out
    after = load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE))
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith(zunet.DECODING_PARTS))
    assert sum(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder.")) > 0
    card = (pipe / training.CARD).read_text()
    assert card.index("- vae/ replaced on ") < card.index("## Files") and "bit for bit" in card
    assert zunet.adopt_vae(new_encoder, pipe) is False  # already adopted: nothing to do
    newer_encoder = _vae_variant(exported, tmp_path / "enc2", lambda k: k.startswith("encoder.conv_in"))
    assert zunet.adopt_vae(newer_encoder, pipe) is True
    card = (pipe / training.CARD).read_text()
    assert card.count("- vae/ replaced on ") == 1 and f"autoencoder of {newer_encoder}:" in card
    with pytest.raises(SystemExit):
        zunet.main(["adopt-vae", str(new_decoder), "--pipeline", str(pipe)])
    err = capsys.readouterr().err
    assert "decoder tensors differ" in err and "--remeasure DEVICE" in err


def test_adopt_vae_with_another_decoder_remeasures_the_card(smoke_run, exported, tmp_path, capsys):
    """A decoder fine-tune changes the samples: with remeasure the card's evaluation runs again through it (its
    settings read from the card) before vae/ is replaced, the sample metrics and the status follow the new
    numbers, and a dated line keeps the old ones; a bad device is named before anything changes."""
    import shutil

    pipe = tmp_path / "faces-sd"
    shutil.copytree(exported, pipe)
    card_before = (pipe / training.CARD).read_text()
    old = training.card_values(card_before)
    new_decoder = _vae_variant(exported, tmp_path / "dec", lambda k: k.startswith("decoder.conv_out"))
    with pytest.raises(ValueError, match=r"remeasure='gpu0' is not a device; use e.g. 'cpu' or 'cuda'"):
        zunet.adopt_vae(new_decoder, pipe, remeasure="gpu0")
    with pytest.raises(SystemExit):
        zunet.main(["adopt-vae", str(new_decoder), "--pipeline", str(pipe), "--grid", str(tmp_path / "g.png")])
    assert "--grid saves the samples of --remeasure; give --remeasure DEVICE too" in capsys.readouterr().err
    assert (pipe / training.CARD).read_text() == card_before

    assert zunet.adopt_vae(new_decoder, pipe, remeasure="cpu", attributes_path=smoke_run.attributes,
                           grid_path=tmp_path / "grid.png") is True
    assert "sampling held-out captions" in capsys.readouterr().err
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid.json").is_file()  # the samples and captions
    w = load_file(str(pipe / "vae" / zvae.WEIGHTS_FILE))
    assert all(torch.equal(v, load_file(str(new_decoder / zvae.WEIGHTS_FILE))[k]) for k, v in w.items())
    # the card's numbers are those of its own evaluation through the new decoder
    want = zunet.evaluate_folder(exported, vae=new_decoder, device="cpu", attributes_path=smoke_run.attributes,
                                 guidance_scales=(float(old["main_guidance"]),), samples=int(old["eval_samples"]),
                                 steps=int(old["eval_ddim_steps"]))
    card = (pipe / training.CARD).read_text()
    got = training.card_values(card)
    for key in ("attribute_accuracy", "classifier_on_vae_round_trips", "caption_agreement"):
        assert got[key] == str(want[key]), key
    assert ("**Below target:**" in card) == (want["attribute_accuracy"] < 0.8)
    line = next(ln for ln in card.splitlines() if ln.startswith("- decoder replaced on "))
    assert f"attribute_accuracy {old['attribute_accuracy']} -> {want['attribute_accuracy']}" in line
    assert "re-measured through it on cpu in fp32" in line and "the numbers before, from cpu" in line
    assert card.index(line) < card.index("## Files") and "- vae/ replaced on " not in card
    assert card.split("## Training")[1].split("## Metrics")[0] == \
        card_before.split("## Training")[1].split("## Metrics")[0]  # the rest of the card kept


def test_card_eval_settings_are_the_cards_own_with_the_defaults_for_what_it_lacks():
    """What adopt-vae --remeasure and python -m dragrt.zoo.check sample with: the card's CFG scale, sample and step
    counts; a card value that is not a number is named with its caller."""
    got = zunet.card_eval_settings({"main_guidance": "7.5", "eval_samples": "8"}, "here")
    assert got == {"guidance_scales": (7.5,), "samples": 8, "steps": zunet.HPARAMS.eval_steps}
    with pytest.raises(ValueError, match=r"^here: the card's main_guidance, eval_samples or eval_ddim_steps is not a "
                                         r"number"):
        zunet.card_eval_settings({"eval_ddim_steps": "fifty"}, "here")


def test_a_remeasure_names_where_the_numbers_it_replaces_were_measured():
    """The history line of a re-measure says where the card's numbers before it came from: the latest re-measure's
    device and dtype, else the export's (its training device; fp16 on a GPU, as evaluate_folder samples there).
    2026-12-06: a second re-measure named the H100 of the export for numbers a CPU re-measure had written."""
    card = "# x\n\n## Training\n\n- device: NVIDIA H100 80GB HBM3\n\n## Metrics\n\n- attribute_accuracy: 0.8\n"
    assert zunet._measured_on(card) == "NVIDIA H100 80GB HBM3 in fp16"
    assert zunet._measured_on(card.replace("NVIDIA H100 80GB HBM3", "cpu (2 cores)")) == "cpu (2 cores) in fp32"
    first = "- decoder replaced on 2026-12-06 (commit a) by X, whose decoder differs: the sample metrics above were " \
            "re-measured through it on cpu (`python -m ...`): attribute_accuracy 0.8 -> 0.81\n"  # before dtypes
    assert zunet._measured_on(card + first) == "cpu in fp32"
    second = first.replace("on cpu (", "on cuda:0 in fp16 (")
    assert zunet._measured_on(card + first + second) == "cuda:0 in fp16"
    assert zunet._measured_on(card + second + first) == "cpu in fp32"  # the latest line wins
    third = first.replace("on cpu (", "on mps (")  # sampled in fp32 there too, as everywhere but on CUDA
    assert zunet._measured_on(card + third) == "mps in fp32"


def test_evaluate_folder_decodes_with_another_vae_of_the_same_config(smoke_run, exported, tmp_path, capsys,
                                                                     monkeypatch):
    """--vae: the pipeline's samples decoded by another autoencoder of its config (a decoder fine-tune): the pipeline's
    own vae/ gives the plain evaluation's numbers, another decoder other images; a config that would decode the
    latents at another scale is refused, naming the key."""
    kw = dict(guidance_scales=(5.0,), samples=4, steps=2, device="cpu", attributes_path=smoke_run.attributes)
    plain = zunet.evaluate_folder(exported, **kw)
    same = zunet.evaluate_folder(exported, vae=exported / "vae", **kw)
    assert same["attribute_accuracy"] == plain["attribute_accuracy"] and same["vae"] == str(exported / "vae")
    assert plain["vae"] == str(exported / "vae")

    seen = []
    real = zunet.generate

    def spy(pipe, *args, **kws):
        seen.append(real(pipe, *args, **kws))
        return seen[-1]

    monkeypatch.setattr(zunet, "generate", spy)
    new_decoder = _vae_variant(exported, tmp_path / "dec", lambda k: k.startswith("decoder.conv_out"))
    zunet.evaluate_folder(exported, **kw)
    other = zunet.evaluate_folder(exported, vae=new_decoder, **kw)
    assert other["vae"] == str(new_decoder) and (seen[0] - seen[1]).abs().amax() > 1e-3  # other images
    new_scale = _vae_variant(exported, tmp_path / "scale", lambda k: False)
    cfg = json.loads((new_scale / "config.json").read_text())
    (new_scale / "config.json").write_text(json.dumps({**cfg, "scaling_factor": cfg["scaling_factor"] * 2}))
    with pytest.raises(ValueError, match=r"has another config than .* \(scaling_factor\): it could not decode"):
        zunet.evaluate_folder(exported, vae=new_scale, **kw)
    with pytest.raises(SystemExit):
        zunet.main(["evaluate", str(exported), "--vae", str(tmp_path / "missing"), "--device", "cpu"])
    assert "does not exist" in capsys.readouterr().err


def test_cuda_graphs_are_a_clear_error_where_they_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device, got device='cpu'"):
        zunet.train(tmp_path / "a", minutes=1, device="cpu", smoke=True, cuda_graphs=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        zunet.train(tmp_path / "b", minutes=1, device="cpu", smoke=True, cuda_graphs=True,
                    compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        zunet.train(tmp_path / "c", minutes=1, device="cpu", smoke=True, cuda_graphs="yes")
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before anything was written


def test_zoo_train_command_passes_cuda_graphs_to_faces_sd(monkeypatch, tmp_path):
    from dragrt.zoo import train as zoo_train

    calls = []
    monkeypatch.setattr(zunet, "train", lambda run_dir, **kw: calls.append(kw) or {"step": 0})
    assert zoo_train.main(["faces-sd", "--run-dir", str(tmp_path), "--cuda-graphs", "--compile", "default"]) == 0
    assert calls[0]["cuda_graphs"] is True and calls[0]["compile_mode"] == "default"
    assert zoo_train.main(["faces-sd", "--run-dir", str(tmp_path)]) == 0
    assert "cuda_graphs" not in calls[1]


def test_learning_rate_on_the_device_is_one_tensor_filled_in_place():
    """A replayed AdamW keeps the tensors of its capture: the rate must change in place, in every group; a
    checkpoint gets plain floats back."""
    params = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    lr = zunet._LearningRate(opt, 0.5, torch.device("cpu"), on_device=True)
    held = opt.param_groups[0]["lr"]
    assert isinstance(held, torch.Tensor) and opt.param_groups[1]["lr"] is held and float(held) == 0.5
    lr.set(0.25)
    assert opt.param_groups[0]["lr"] is held and float(held) == 0.25 and lr.value == 0.25
    lr.restore_float()
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    plain = zunet._LearningRate(opt, 0.1, torch.device("cpu"), on_device=False)
    plain.set(0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3] and plain.tensor is None


@pytest.mark.cuda
def test_cuda_graphs_train_as_the_eager_loop(smoke_run, tmp_path):
    """The training step replayed from a CUDA graph (compiled blocks or not) trains the UNet the eager loop trains
    from the same seed: the same draws from the trainer's own generator (registered with the graph), the same
    learning-rate schedule (a device tensor the replay reads), up to cuDNN's choice of algorithms; with
    ``lower_face_weight`` too (the step's weights a static buffer refilled before each replay)."""
    runs = {}
    for weight in (None, 4.0):
        for graphs in (False, True):
            run = tmp_path / f"graphs{graphs}-weight{weight}"
            m = zunet.train(run, minutes=5, device="cuda", seed=0, smoke=True, vae_path=smoke_run.root / "vae",
                            clip_path=smoke_run.root / "clip", cuda_graphs=graphs, lower_face_weight=weight)
            runs[graphs, weight] = (m, training.load_checkpoint(run))
    for graphs in (False, True):  # the weighted runs weigh: their losses are not the plain ones
        assert runs[graphs, 4.0][0]["loss_first"] != pytest.approx(runs[graphs, None][0]["loss_first"], rel=1e-3)
    (weighted_eager, _), (weighted_graphed, _) = runs[False, 4.0], runs[True, 4.0]
    for k in ("loss_first", "loss_last"):
        assert weighted_graphed[k] == pytest.approx(weighted_eager[k], rel=2e-3, abs=1e-4), k
    (eager, ck_eager), (graphed, ck_graphed) = runs[False, None], runs[True, None]
    assert graphed["replayed_step"] is True and eager["replayed_step"] is False
    assert graphed["step"] == eager["step"] == zunet.SMOKE_HPARAMS.fixed_steps
    for k in ("loss_first", "loss_last"):
        assert graphed[k] == pytest.approx(eager[k], rel=2e-3, abs=1e-4), k
    torch.manual_seed(0)  # the trainer's initial weights, as it draws them
    init = zunet.build_unet(ck_eager["config"]).state_dict()
    for k, v in ck_eager["model"].items():
        moved = (v.float() - init[k].float()).norm()
        apart = (ck_graphed["model"][k].float() - v.float()).norm()
        assert apart <= 0.02 * moved + 1e-5, (k, float(apart), float(moved))
    assert all(isinstance(g["lr"], float) for g in ck_graphed["optimizer"]["param_groups"])
