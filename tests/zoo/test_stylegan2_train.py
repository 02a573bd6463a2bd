"""The faces StyleGAN2 trainer: smoke training, R1, Frechet distance, export -> load_generator round trip."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dragrt.runtime.models import conv_double_backward as cdb
from dragrt.runtime.models import stylegan2 as sg2
from dragrt.runtime.models import stylegan2_convert as conv
from dragrt.runtime.models.stylegan2 import Generator
from dragrt.zoo import evaluators, training
from dragrt.zoo import stylegan2_train as st

SMOKE_STEPS = 2  # with r1/pl every 2 steps, step 0 runs every phase


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A smoke run of SMOKE_STEPS steps, then a resumed chunk of one more step (shared by the tests)."""
    run = tmp_path_factory.mktemp("sg2") / "run"
    init_g, init_d = st.build_networks(st.TrainConfig.preset(smoke=True), seed=0)
    first = st.train(run, minutes=2, device="cpu", seed=0, smoke=True, max_steps=SMOKE_STEPS)
    ckpt = training.load_checkpoint(run)
    after_first = {**ckpt, **st._load_part(run, ckpt)}  # checkpoint.pt (G, EMA) + checkpoint_d.pt (D, Adam)
    second = st.train(run, minutes=2, device="cpu", seed=0, smoke=True, max_steps=1)
    return {"run": run, "first": first, "second": second, "after_first": after_first,
            "init_G": init_g.state_dict(), "init_D": init_d.state_dict()}


def test_smoke_training_changes_weights_with_finite_losses(smoke_run: dict) -> None:
    first, ckpt = smoke_run["first"], smoke_run["after_first"]
    assert first["steps"] == SMOKE_STEPS and first["nonfinite_losses"] == 0
    for key in ("last_chunk_loss_G", "last_chunk_loss_D", "last_chunk_r1", "last_chunk_pl"):
        assert math.isfinite(first[key]), key
    assert first["last_chunk_diversity"] == pytest.approx(
        first["last_chunk_spread_fake"] / first["last_chunk_spread_real"], rel=1e-3)
    assert 0 < first["last_chunk_diversity"] < 10
    for net, init in (("G", smoke_run["init_G"]), ("D", smoke_run["init_D"])):
        params = {k for k, v in init.items() if v.is_floating_point() and "resample_filter" not in k
                  and "noise_const" not in k and "w_avg" not in k}
        changed = {k for k in params if not torch.equal(ckpt[net][k], init[k])}
        assert changed == params, f"{net}: unchanged {sorted(params - changed)}"
        assert all(torch.isfinite(ckpt[net][k]).all() for k in params)
    # The EMA generator moved too, and w_avg is tracked.
    key = "synthesis.b16.conv1.weight"
    ema = st.ema_state_dict(ckpt)
    assert not torch.equal(ema[key], smoke_run["init_G"][key]) and not torch.equal(ema[key], ckpt["G"][key])
    assert ckpt["G"]["mapping.w_avg"].abs().sum() > 0


def test_resume_continues_the_run(smoke_run: dict) -> None:
    second = smoke_run["second"]
    assert second["steps"] == SMOKE_STEPS + 1 and second["chunks"] == 2
    ckpt = training.load_checkpoint(smoke_run["run"])
    assert [h["chunk"] for h in ckpt["history"]] == [0, 1]
    assert json.loads((smoke_run["run"] / training.METRICS).read_text())["steps"] == SMOKE_STEPS + 1
    with pytest.raises(ValueError, match="resolution"):
        st.train(smoke_run["run"], minutes=1, device="cpu", smoke=True, resolution=32, max_steps=0)


def test_full_size_checkpoint_fits_the_device_transfer_limits(tmp_path: Path) -> None:
    """The 256 px run's resumable state: two files under 16 MiB each (what comes back from a device run),
    with Adam's state restored (second moments to bf16 precision; first moments exactly, being 0-momentum)."""
    cfg = st.TrainConfig.preset(256)
    gen, disc = st.build_networks(cfg, seed=0)
    g_ema = copy.deepcopy(gen)
    opt_g, opt_d = st._adam(gen.parameters(), cfg, cfg.pl_interval), st._adam(disc.parameters(), cfg, cfg.r1_interval)
    for net, opt in ((gen, opt_g), (disc, opt_d)):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    with torch.no_grad():
        next(g_ema.parameters()).add_(0.01)
    st._save(tmp_path, cfg, gen, disc, g_ema, opt_g, opt_d, 1, 32, 0, torch.zeros([]), 1.0, None, [], 0)
    sizes = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    assert set(sizes) == {training.CHECKPOINT, st.CHECKPOINT_PART} and max(sizes.values()) < 15 * 2**20, sizes
    ckpt = training.load_checkpoint(tmp_path)
    part = st._load_part(tmp_path, ckpt)
    restored = st._adam(gen.parameters(), cfg, cfg.pl_interval)
    restored.load_state_dict(st._expand_adam(part["opt_G"]))
    for p in gen.parameters():
        a, b = opt_g.state[p], restored.state[p]
        torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], rtol=8e-3, atol=0)
        assert torch.equal(b["step"], a["step"]) and not b["exp_avg"].any()
    ema = st.ema_state_dict(ckpt)
    for k, v in g_ema.state_dict().items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=1e-5)


def test_batch_spread_measures_how_different_the_images_are() -> None:
    img = torch.rand(1, 3, 8, 8)
    assert st.batch_spread(img.repeat(6, 1, 1, 1)).item() == pytest.approx(0.0, abs=1e-7)  # collapsed
    pair = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])  # std of (0, 1), unbiased: sqrt(1/2)
    assert st.batch_spread(pair).item() == pytest.approx(math.sqrt(0.5))
    gen = torch.Generator().manual_seed(0)
    assert st.batch_spread(2.0 * torch.randn(512, 3, 8, 8, generator=gen)).item() == pytest.approx(2.0, rel=0.02)
    assert math.isnan(st._diversity({})) and st._diversity({"spread_fake": 0.1, "spread_real": 0.4}) == 0.25
    with pytest.raises(ValueError, match="N >= 2"):
        st.batch_spread(img)


def test_r1_penalty_of_a_known_function() -> None:
    # D(x) = sum(a * x) + 0.5 * |x|^2 per sample: grad = a + x, so R1 = |a + x|^2.
    torch.manual_seed(0)
    a = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4)

    def disc(img: torch.Tensor) -> torch.Tensor:
        return (img * a).sum([1, 2, 3]) + 0.5 * img.square().sum([1, 2, 3])

    penalty, logits = st.r1_penalty(disc, x)
    torch.testing.assert_close(penalty, (a + x).square().sum([1, 2, 3]))
    torch.testing.assert_close(logits, disc(x))
    # The graph is kept: d/dx_n of R1 = 2 (a + x_n).
    scale = torch.tensor(2.0, requires_grad=True)
    penalty, _ = st.r1_penalty(lambda img: scale * disc(img), x)
    penalty.sum().backward()  # R1 = scale^2 |a + x|^2 -> d/dscale = 2 scale |a + x|^2
    torch.testing.assert_close(scale.grad, 4.0 * (a + x).square().sum())


def test_regularisers_differentiate_twice_through_plain_convolutions(conv_kernels) -> None:
    """R1 and path length, differentiated into G's and D's weights: the same gradients with and without
    conv_double_backward, and with it no convolution whose kernel is a feature map (PyTorch's own double
    backward issues those, one per channel for the FIR blurs; slow fallback kernels on a GPU)."""
    cfg = st.TrainConfig.preset(smoke=True)
    gen, disc = st.build_networks(cfg, seed=0)
    kernel = 4  # the largest real kernels: 3x3 convolutions and the 4-tap FIR filter

    def grads(on: bool) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
        gen.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        rec = conv_kernels()
        with cdb.enabled(on), rec:
            ws = st.mix_styles(gen, torch.randn(4, cfg.z_dim), 0.9)
            st.path_lengths(gen.synthesis(ws, noise_mode="random"), ws).mean().backward()
            penalty, _ = st.r1_penalty(disc, torch.randn(4, 3, cfg.resolution, cfg.resolution))
            penalty.mean().backward()
        return [p.grad.clone() for net in (gen, disc) for p in net.parameters() if p.grad is not None], rec.shapes

    (ref, ref_shapes), (fast, fast_shapes) = grads(False), grads(True)
    assert len(ref) == len(fast) > 10
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(s[-1] > kernel for s in ref_shapes)
    assert fast_shapes and max(s[-1] for s in fast_shapes) <= kernel


def test_the_trainer_runs_its_regularisers_through_plain_convolutions(tmp_path: Path, conv_kernels) -> None:
    rec = conv_kernels()
    with rec:  # step 0 runs every part: G, path length, D, R1
        st.train(tmp_path / "run", minutes=1, device="cpu", smoke=True, max_steps=1, evaluate_metrics=False)
    assert len(rec.shapes) > 50 and max(s[-1] for s in rec.shapes) <= 4


def test_frechet_distance_on_gaussians_with_known_answer() -> None:
    # 2x2 covariances that do not commute: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S_a S_b.
    mu_a, mu_b = np.array([1.0, -2.0]), np.array([0.5, 1.0])
    s_a = np.array([[2.0, 0.6], [0.6, 1.0]])
    s_b = np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s_a @ s_b
    expected = (np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b)
                - 2 * math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m))))
    assert evaluators.frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-10)
    # From samples: N(0, I) against N(mu, 4 I) in 8-D -> |mu|^2 + 8 (1 + 4 - 2 * 2) = |mu|^2 + 8.
    rng = np.random.default_rng(0)
    mu = np.full(8, 0.5)
    a = rng.standard_normal((20000, 8))
    b = torch.from_numpy(mu + 2.0 * rng.standard_normal((20000, 8)))
    assert evaluators.frechet_distance(a, b) == pytest.approx(float(mu @ mu) + 8.0, rel=0.03)
    assert abs(evaluators.frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError, match="feature size"):
        evaluators.frechet_distance(a, a[:, :3])
    with pytest.raises(ValueError, match="N >= 2"):
        evaluators.frechet_distance(a[:1], a)


def test_export_round_trip_gives_the_same_images(smoke_run: dict, tmp_path: Path) -> None:
    json_path = st.export(smoke_run["run"], tmp_path / "export")
    dest = json_path.parent
    assert json_path == dest / st.GENERATOR_RECORD
    record = json.loads((dest / st.GENERATOR_RECORD).read_text())
    assert record["format"] == conv.FORMAT_NAME and record["source"]["format"] == "dragrt-zoo"
    assert (dest / st.GENERATOR_FILE).stat().st_size <= st.MAX_GENERATOR_BYTES
    png = (dest / st.SAMPLES_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) <= st.MAX_SAMPLES_PNG_BYTES
    assert "faces-stylegan2" in (dest / training.CARD).read_text()

    loaded = conv.load_generator(json_path)
    ckpt = training.load_checkpoint(smoke_run["run"])
    reference = Generator.from_config(st.TrainConfig.from_dict(ckpt["config"]).generator_config()).eval()
    reference.load_state_dict(st.ema_state_dict(ckpt))
    rounded = {k: v.float() for k, v in st.shipped_state_dict(reference).items()}
    reference.load_state_dict(rounded)
    z = torch.randn(4, loaded.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = loaded(z, None, truncation_psi=0.7)
        want = reference(z, None, truncation_psi=0.7)
        again = conv.load_generator(dest / "generator")(z, None, truncation_psi=0.7)
    assert got.dtype == torch.float32 and got.shape == (4, 3, 16, 16)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # only the fp16 product of the noise differs
    assert torch.equal(got, again)

    # The DragGAN engine runs on it (fast mode, CPU).
    from dragrt.runtime.config import RuntimeConfig
    from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine

    engine = DragGANEngine(loaded, DragGANConfig(r1=96.0, r2=192.0, lr=0.05, cuda_graph=False),
                           RuntimeConfig(device="cpu", compile_mode="none"))
    engine.start(engine.latent_from_seed(0), handle_points=[[4, 5]], target_points=[[9, 8]])
    handles, _, loss = engine.step()
    assert math.isfinite(float(loss)) and handles.shape[-1] == 2 and engine.feature_resolution == 8  # half of 16 px
    assert engine.render().shape == (1, 3, 16, 16)


def test_a_new_run_continues_from_an_export(smoke_run: dict, tmp_path: Path) -> None:
    """``init``: a new run starts from an export's shipped networks (G and its EMA from the shipped EMA, D from
    discriminator.safetensors, fp16-rounded) and counters, with fresh Adam states; its card says where it started."""
    from safetensors.torch import load_file

    dest = st.export(smoke_run["run"], tmp_path / "export").parent
    record = json.loads((dest / st.GENERATOR_RECORD).read_text())["source"]
    ckpt = training.load_checkpoint(smoke_run["run"])
    assert (record["steps"], record["chunks"], record["trainer"]) == (ckpt["step"], ckpt["chunk"] + 1,
                                                                       "dragrt.zoo.stylegan2_train")
    shipped_d = load_file(str(dest / st.DISCRIMINATOR_FILE))
    d_ckpt = st._load_part(smoke_run["run"], ckpt)["D"]
    assert shipped_d.keys() == d_ckpt.keys()
    assert all(shipped_d[k].dtype == (torch.float32 if k.endswith(st.FP32_SUFFIXES) else torch.float16)
               for k in shipped_d)
    torch.testing.assert_close(shipped_d["b16.conv0.weight"].float(), d_ckpt["b16.conv0.weight"], atol=2e-3, rtol=1e-3)

    run = tmp_path / "continued"
    st.train(run, minutes=1, device="cpu", smoke=True, max_steps=0, evaluate_metrics=False, init=dest,
             config_overrides={"lr": 0.001})
    new = training.load_checkpoint(run)
    assert (new["step"], new["nimg"], new["chunk"]) == (ckpt["step"], ckpt["nimg"], ckpt["chunk"] + 1)
    shipped_g = conv.load_generator(dest).state_dict()
    for k, v in new["G"].items():
        assert torch.equal(v, shipped_g[k].float()), k
    assert all(d.abs().max() == 0 for d in new["G_ema_delta"].values())  # the EMA starts at G
    part = st._load_part(run, new)
    for k, v in part["D"].items():
        assert torch.equal(v, shipped_d[k].float()), k
    assert part["opt_G"]["state"] == {} and part["opt_D"]["state"] == {}  # Adam starts afresh
    cfg = st.TrainConfig.from_dict(new["config"])
    assert (cfg.lr, cfg.init, cfg.batch_size) == (0.001, str(dest), 4)
    assert cfg.init_history.startswith(str(dest)) and "new discriminator" not in cfg.init_history

    # It trains on from there and its export says so; a resumed run keeps going without init.
    st.train(run, minutes=1, device="cpu", smoke=True, max_steps=1, evaluate_metrics=False)
    card = (st.export(run, tmp_path / "export2").parent / training.CARD).read_text()
    assert f"- started from: {cfg.init_history}" in card and f"init={str(dest)!r}" in card
    assert f"- `{st.DISCRIMINATOR_FILE}`" in card
    with pytest.raises(ValueError, match="holds a run already"):
        st.train(run, minutes=1, device="cpu", smoke=True, max_steps=0, init=dest)


def test_an_export_without_a_discriminator_starts_a_new_one_and_bad_starts_are_clear_errors(
        smoke_run: dict, tmp_path: Path) -> None:
    dest = st.export(smoke_run["run"], tmp_path / "export").parent
    (dest / st.DISCRIMINATOR_FILE).unlink()  # an export of an earlier version
    start = st.shipped_start(dest, smoke=True)
    assert start.discriminator is None
    assert start.config.init_history.endswith("a new discriminator (the export has none)")
    with pytest.raises(ValueError, match=r"is a smoke 16 px network; resolution=32 would change its shape"):
        st.shipped_start(dest, resolution=32, smoke=True)
    with pytest.raises(ValueError, match=r"channel_max=32 would change its shape \(its channel_max=16\)"):
        st.shipped_start(dest, smoke=True, config_overrides={"channel_max": 32})
    with pytest.raises(ValueError, match="has no generator.json"):
        st.shipped_start(tmp_path, smoke=True)
    with pytest.raises(FileNotFoundError, match="init: .* does not exist"):
        st.shipped_start(tmp_path / "nowhere")
    record = json.loads((dest / st.GENERATOR_RECORD).read_text())
    del record["source"]["train_config"]  # a converted NVIDIA checkpoint has no trainer config
    (dest / st.GENERATOR_RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not come from this trainer's --export"):
        st.shipped_start(dest, smoke=True)


def test_the_shipped_model_can_be_continued() -> None:
    """zoo:faces-stylegan2 is a valid start of a new run (its record holds the trainer's config; its discriminator
    ships beside it)."""
    start = st.shipped_start("zoo:faces-stylegan2")
    assert start.config.resolution == 128 and start.step > 0 and start.nimg > 0
    assert start.discriminator is not None
    gen, disc = st.build_networks(start.config, seed=0)
    gen.load_state_dict(start.generator)
    disc.load_state_dict(start.discriminator)


@pytest.fixture
def stand_in_evaluators(monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Small untrained evaluators in place of the zoo's (the numbers mean nothing; the plumbing is what is
    tested): ``(attribute model, landmark model)``."""
    torch.manual_seed(0)
    attr = evaluators.AttributeNet(widths=(4, 4, 8, 8, 8), blocks=(1, 1, 1, 1), feature_dim=8).eval()
    lm = evaluators.LandmarkNet(widths=(4, 4, 8, 8, 8), blocks=(1, 1, 1, 1), decoder=4).eval()
    monkeypatch.setattr(st, "_load_evaluators", lambda device: (attr, lm, []))
    return attr, lm


@pytest.mark.usefixtures("stand_in_evaluators")
def test_evaluate_reports_frechet_distance_and_landmark_confidence(smoke_run: dict) -> None:
    run = smoke_run["run"]
    (run / st.EVAL_CACHE).unlink(missing_ok=True)
    metrics = st.evaluate_run(run, device="cpu")
    assert math.isfinite(metrics["frechet_distance_attr"]) and metrics["frechet_distance_attr"] > 0
    for key in ("landmark_conf_samples", "landmark_conf_renders"):
        assert 0.0 <= metrics[key] <= 1.0
    cache = torch.load(run / st.EVAL_CACHE, weights_only=True)  # the renders' statistics, for the next chunk
    n = metrics["eval_reals"]
    assert cache["features"].shape == (n, 8) and cache["confidence"].shape == (n,)
    assert json.loads((run / training.METRICS).read_text())["frechet_distance_attr"] == metrics["frechet_distance_attr"]


def test_evaluate_at_a_lower_resolution_downsamples_the_samples_and_draws_the_renders_there(
        stand_in_evaluators: tuple[torch.nn.Module, torch.nn.Module]) -> None:
    """Generators of different resolutions ranked on one scale: the samples area-downsampled, the renders drawn at
    the lower resolution, everything else as the card's metrics."""
    attr, lm = stand_in_evaluators
    cfg = st.TrainConfig.preset(32, smoke=True, eval_samples=12, eval_reals=10)
    g_ema, _ = st.build_networks(cfg, seed=0)
    g_ema.eval().requires_grad_(False)
    cpu = torch.device("cpu")
    metrics = st.evaluate(g_ema, cfg, cpu, resolution=16)
    assert metrics["eval_resolution"] == 16
    samples = F.interpolate(st.generate(g_ema, 12, seed=1_000_003, device=cpu), size=(16, 16), mode="area")
    reals = st._held_out_images(10, 16, 0)
    with torch.no_grad():
        expected = evaluators.frechet_distance(attr.features(samples), attr.features(reals))
        conf = lm(samples).confidence.float().mean()
    assert metrics["frechet_distance_attr"] == pytest.approx(float(expected), rel=1e-4)
    assert metrics["landmark_conf_samples"] == pytest.approx(float(conf), rel=1e-4)
    assert st.evaluate(g_ema, cfg, cpu)["eval_resolution"] == 32
    for bad in (64, 24, 8, True):
        with pytest.raises(ValueError, match=f"resolution={bad!r} is not allowed; use a power of two from 16"):
            st.evaluate(g_ema, cfg, cpu, resolution=bad)


@pytest.mark.usefixtures("stand_in_evaluators")
def test_runs_above_the_compare_resolution_also_report_their_metrics_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 128 px run's chunk reports its metrics at 64 px too (here: a 32 px smoke run at 16 px), which its card
    shows, so that runs of different resolutions rank on one scale (the 64 px generator shipped until d5c6987's)."""
    monkeypatch.setattr(st, "COMPARE_RESOLUTION", 16)
    run = tmp_path / "run"
    metrics = st.train(run, minutes=2, device="cpu", smoke=True, resolution=32, max_steps=1)
    ckpt = training.load_checkpoint(run)
    cfg = st.TrainConfig.from_dict(ckpt["config"])
    g_ema = Generator.from_config(cfg.generator_config())
    g_ema.load_state_dict(st.ema_state_dict(ckpt))
    low = st.evaluate(g_ema, cfg, torch.device("cpu"), resolution=16)
    assert metrics["eval_resolution"] == 32 and (run / "eval_real_16px.pt").is_file()
    for key in st.COMPARED_METRICS:
        assert metrics[f"{key}_16px"] == pytest.approx(low[key], rel=1e-4)
    assert metrics["frechet_distance_attr_16px"] != pytest.approx(metrics["frechet_distance_attr"], rel=1e-3)
    st.export(run, tmp_path / "export")
    card = (tmp_path / "export" / training.CARD).read_text()
    assert f"- frechet_distance_attr_16px: {metrics['frechet_distance_attr_16px']}" in card
    monkeypatch.setattr(st, "COMPARE_RESOLUTION", 32)  # not above it: no second evaluation
    assert "frechet_distance_attr_32px" not in st.evaluate_run(run, device="cpu")


def test_missing_evaluators_skip_the_metrics_with_a_note(smoke_run: dict) -> None:
    first = smoke_run["first"]
    if "frechet_distance_attr" not in first:
        assert first["eval_notes"] and "skipped" in " ".join(first["eval_notes"])


def test_fp16_blocks_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CUDA path (fp16 blocks in G and D, conv_clamp), exercised on the CPU."""
    monkeypatch.setattr(sg2, "_fp16_supported", lambda device: True)
    monkeypatch.setattr(st, "_half_supported", lambda device: True)
    cfg = st.TrainConfig.preset(smoke=True, num_fp16_res=2)
    gen, disc = st.build_networks(cfg, seed=1)
    img = gen(torch.randn(4, cfg.z_dim), None, noise_mode="random")
    logits = disc(img)
    assert img.dtype == torch.float32 and logits.dtype == torch.float32 and logits.shape == (4,)
    assert disc.b16.conv0.weight.dtype == torch.float32  # parameters stay float32; the blocks compute in fp16
    reals = iter([torch.rand(4, 3, 16, 16) * 2 - 1])
    metrics = st.train(tmp_path / "run16", minutes=1, device="cpu", seed=1, smoke=True, max_steps=1,
                       evaluate_metrics=False, config_overrides={"num_fp16_res": 2}, reals=reals)
    assert metrics["steps"] == 1 and metrics["nonfinite_losses"] == 0  # step 0 runs every phase


def test_shipped_configs_fit_the_budget_and_feed_draggan() -> None:
    for res in st.RESOLUTIONS:
        cfg = st.TrainConfig.preset(res)
        with torch.device("meta"):
            gen, disc = Generator.from_config(cfg.generator_config()), st.Discriminator(
                res, channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res)
        size = sum(t.numel() * (4 if k.endswith(st.FP32_SUFFIXES) else 2) for k, t in gen.state_dict().items())
        assert size <= st.MAX_GENERATOR_BYTES
        assert min(res, 128) in gen.synthesis.block_resolutions  # DragGAN's b128 feature map, or the top block
        assert cfg.batch_size % cfg.mbstd_group == 0
        assert list(disc.block_resolutions) == [2**i for i in range(int(math.log2(res)), 2, -1)]


def test_discriminator_shapes_and_minibatch_std() -> None:
    torch.manual_seed(0)
    conv3 = st.DiscriminatorConv(2, 5, 3, down=2)
    conv1 = st.DiscriminatorConv(2, 5, 1, down=2, bias=False, activation="linear")
    x = torch.randn(3, 2, 8, 8)
    assert conv3(x).shape == (3, 5, 4, 4) and conv1(x).shape == (3, 5, 4, 4)
    # A constant image stays constant through the blur of the 1x1 skip (away from the zero padding).
    ones = conv1(torch.ones(1, 2, 8, 8))
    torch.testing.assert_close(ones[..., 1:-1, 1:-1], ones[..., 1:2, 1:2].expand_as(ones[..., 1:-1, 1:-1]))
    # Minibatch std: groups n % (N / G); a group of identical samples has std sqrt(1e-8).
    y = torch.zeros(4, 1, 2, 2)
    y[1] = 2.0  # group 1 holds samples 1 and 3 (G = 2): values 2 and 0 -> std 1
    out = st.minibatch_stddev(y, group_size=2)
    assert out.shape == (4, 2, 2, 2)
    torch.testing.assert_close(out[:, 1, 0, 0], torch.tensor([1e-4, 1.0, 1e-4, 1.0]))


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"resolution=100 .* \(64, 128, 256\)"):
        st.TrainConfig.preset(100)
    with pytest.raises(ValueError, match="batch_size=30 .* mbstd_group"):
        st.TrainConfig.preset(256, batch_size=30)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        st.TrainConfig.preset(256, channels=3)
    with pytest.raises(ValueError, match="train first"):
        st.export("/nonexistent/run", "/tmp/never")


def test_compiled_main_steps_compute_the_same_networks(aot_eager_compile: list, tmp_path: Path) -> None:
    """compile_mode: G's synthesis and D compiled (sharing their parameters) give the eager outputs and
    gradients; a smoke run with them trains with finite losses (the lazy R1 / path-length steps stay eager:
    double backward); a bad mode is a clear error."""
    modes = aot_eager_compile
    cfg = st.TrainConfig.preset(smoke=True)
    gen, disc = st.build_networks(cfg, seed=3)
    synth_c, disc_c = st._compiled(gen.synthesis, "default"), st._compiled(disc, "default")
    ws = gen.mapping(torch.randn(4, cfg.z_dim, generator=torch.Generator().manual_seed(0)), None)
    eager_img = gen.synthesis(ws, noise_mode="const")
    comp_img = synth_c(ws, noise_mode="const")
    torch.testing.assert_close(comp_img, eager_img, rtol=1e-5, atol=1e-5)
    disc.zero_grad()
    disc(eager_img.detach()).sum().backward()
    eager_grads = [p.grad.clone() for p in disc.parameters()]
    disc.zero_grad()
    disc_c(eager_img.detach()).sum().backward()
    for a, b in zip(eager_grads, (p.grad for p in disc.parameters())):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

    m = st.train(tmp_path / "run", minutes=2, device="cpu", seed=0, smoke=True, max_steps=3,
                 evaluate_metrics=False, compile_mode="default")
    assert m["steps"] == 3 and m["compile_mode"] == "default" and m["nonfinite_losses"] == 0
    assert all(math.isfinite(m[f"last_chunk_{k}"]) for k in ("loss_G", "loss_D", "r1", "pl"))
    assert modes.count("default") == 4  # two in the check above, G's synthesis and D in the run
    with pytest.raises(ValueError, match="compile_mode='fast' is not allowed"):
        st.train(tmp_path / "bad", minutes=1, device="cpu", smoke=True, max_steps=1, compile_mode="fast")


def test_cli_passes_a_new_runs_batch(tmp_path, monkeypatch) -> None:
    """`python -m dragrt.zoo.stylegan2_train --batch N`: the batch of a new run (a config override, which a resumed
    run must match); without it, the preset's."""
    calls = []
    monkeypatch.setattr(st, "train", lambda run_dir, **kw: calls.append(kw) or {})
    assert st.main(["--run-dir", str(tmp_path), "--device", "cpu", "--batch", "128"]) == 0
    assert st.main(["--run-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert calls[0]["config_overrides"] == {"batch_size": 128} and calls[1]["config_overrides"] is None
    assert st.main(["--run-dir", str(tmp_path), "--device", "cpu", "--r1-gamma", "2", "--batch", "16"]) == 0
    assert calls[2]["config_overrides"] == {"batch_size": 16, "r1_gamma": 2.0}
    with pytest.raises(ValueError, match="batch_size=6 is not allowed; use a multiple of mbstd_group=4"):
        st.TrainConfig.preset(256, batch_size=6)


def test_model_card_command_trains_a_run_like_the_exported_one() -> None:
    assert st._card_command(st.TrainConfig.preset(128)).startswith(
        "python -m dragrt.zoo.stylegan2_train --run-dir RUN --resolution 128 --minutes")
    assert "--resolution 128 --batch 128 --minutes" in st._card_command(st.TrainConfig.preset(128, batch_size=128))
    assert "--resolution 128 --r1-gamma 2 --minutes" in st._card_command(st.TrainConfig.preset(128, r1_gamma=2.0))
    assert "smoke=True" in st._card_command(st.TrainConfig.preset(smoke=True))
    cpu = st._card_command(st.TrainConfig.preset(64), "cpu")
    assert "--resolution 64 --device cpu --minutes 55" in cpu and "--batch" not in cpu
    assert "--device" not in st._card_command(st.TrainConfig.preset(256), "cuda:0")
    cont = st._card_command(st.TrainConfig.preset(64, init="zoo:faces-stylegan2"), "cpu")
    assert "--resolution 64 --init zoo:faces-stylegan2 --device cpu --minutes 55 (repeated, without --init)" in cont


def test_the_64_px_preset_is_the_cpu_recipe_and_its_card_says_it_is_below_target() -> None:
    """64 px is a preset of its own (the CPU run: the 32 px recipe of CONTRIBUTING one block up), refused nowhere
    a resolution is taken; its exported card says that it is below the 128/256 px the zoo asks for."""
    cfg = st.TrainConfig.preset(64)
    assert (cfg.resolution, cfg.batch_size, cfg.z_dim, cfg.channel_max, cfg.num_fp16_res, cfg.smoke) == (
        64, 16, 64, 64, 0, False)
    assert cfg.r1_gamma == pytest.approx(5 * 2e-4 * 64**2 / 16, rel=0.01)  # 5x NVIDIA's heuristic
    assert st.TrainConfig.preset(64, batch_size=32).batch_size == 32
    status = st._card_status(cfg)
    assert status.startswith("**Below target:** 64 px") and "128" in status
    assert st._card_status(st.TrainConfig.preset(256)) is None
    # 128 px: the zoo issue's fallback, said as such, not below target
    at_128 = st._card_status(st.TrainConfig.preset(128))
    assert at_128.startswith("**128 px**, the zoo issue's fallback") and "--resolution 256" in at_128
    assert "Below target" not in at_128
    # a run exported beside the demo's model says it is still in training, and how to continue it
    beside = st._card_status(st.TrainConfig.preset(128), "faces-stylegan2-128")
    assert "**In training:**" in beside and "--init zoo:faces-stylegan2-128" in beside
    assert "Below target" not in beside
    both = st._card_status(cfg, "faces-stylegan2-64b")
    assert both.startswith("**Below target:** 64 px") and "**In training:**" in both


def test_an_export_beside_the_demos_model_is_named_by_its_folder(smoke_run: dict, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Exported into the zoo as faces-stylegan2-128, the card and record are zoo:faces-stylegan2-128's, not the
    demo's model's; an export outside the zoo keeps the trainer's name."""
    from dragrt.zoo import registry

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    json_path = st.export(smoke_run["run"], tmp_path / "weights" / "faces-stylegan2-128")
    card = (json_path.parent / training.CARD).read_text()
    assert card.startswith("# zoo:faces-stylegan2-128\n") and "not yet its replacement" in card
    assert "the default model of `dragrt demo`" not in card  # a smoke run: no status, but the role is said
    assert json.loads(json_path.read_text())["source"]["zoo_name"] == "faces-stylegan2-128"
    assert registry.available() == {"faces-stylegan2-128": json_path.parent}
    outside = (st.export(smoke_run["run"], tmp_path / "elsewhere").parent / training.CARD).read_text()
    assert outside.startswith("# zoo:faces-stylegan2\n") and "the default model of `dragrt demo`" in outside


def test_the_128_px_preset_ships_g_and_d_within_the_zoo_budget() -> None:
    """The shipped generator is the 128 px preset's G and D in fp16 (their tensors and safetensors headers), and
    the zoo keeps room for a faces-vae that is no longer faces-sd's copy."""
    from dragrt.zoo import registry

    cfg = st.TrainConfig.preset(128)
    assert (cfg.resolution, cfg.batch_size, cfg.channel_max, cfg.z_dim) == (128, 32, 96, 256)
    assert cfg.r1_gamma == pytest.approx(5 * 2e-4 * 128**2 / 32, rel=0.03)  # 5x NVIDIA's heuristic, as at 64 px
    with torch.device("meta"):
        gen, disc = Generator.from_config(cfg.generator_config()), st.Discriminator(
            128, channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res)
    new = sum(t.numel() * (4 if k.endswith(st.FP32_SUFFIXES) else 2)
              for net in (gen, disc) for k, t in net.state_dict().items())
    folder = registry.WEIGHTS_DIR / st.NAME
    weights = sum((folder / name).stat().st_size for name in (st.GENERATOR_FILE, st.DISCRIMINATOR_FILE))
    assert 4_000_000 < new < weights < new + 100_000
    shipped = sum(f.stat().st_size for f in registry.WEIGHTS_DIR.rglob("*") if f.is_file())
    vae_copy = sum(f.stat().st_size for f in (registry.WEIGHTS_DIR / "faces-sd" / "vae").rglob("*") if f.is_file())
    assert shipped + vae_copy <= registry.BUDGET_BYTES


def test_cli_refusals_are_usage_errors_not_tracebacks(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--cuda-graphs", "--minutes", "0.1"])
    assert exit_info.value.code == 2
    assert "error: cuda_graphs=True needs a CUDA device, got device='cpu'" in capsys.readouterr().err


def test_zoo_train_command_passes_the_batch_to_a_new_run(monkeypatch, tmp_path) -> None:
    """``python -m dragrt.zoo.train faces-stylegan2 --batch N`` reaches the run's config as the trainer's own
    ``--batch`` does (one flag for every zoo trainer that takes a batch)."""
    from dragrt.zoo import train as zoo_train

    calls = []
    monkeypatch.setattr(st, "train", lambda run_dir, **kw: calls.append(kw) or {"steps": 0})
    assert zoo_train.main(["faces-stylegan2", "--run-dir", str(tmp_path), "--device", "cpu", "--batch", "128"]) == 0
    assert calls[0]["config_overrides"] == {"batch_size": 128}
    assert zoo_train.main(["faces-stylegan2", "--run-dir", str(tmp_path), "--device", "cpu"]) == 0
    assert "config_overrides" not in calls[1] and "cuda_graphs" not in calls[1]
    assert zoo_train.main(["faces-stylegan2", "--run-dir", str(tmp_path), "--cuda-graphs"]) == 0
    assert calls[2]["cuda_graphs"] is True
    assert zoo_train.main(["faces-stylegan2", "--run-dir", str(tmp_path), "--channels-last"]) == 0
    assert calls[3]["channels_last"] is True and "channels_last" not in calls[2]
    assert zoo_train.main(["faces-stylegan2", "--run-dir", str(tmp_path), "--init", "zoo:faces-stylegan2"]) == 0
    assert calls[4]["init"] == "zoo:faces-stylegan2" and "init" not in calls[3]
    assert st.main(["--run-dir", str(tmp_path), "--init", "zoo:faces-stylegan2"]) == 0  # the trainer's own CLI
    assert calls[5]["init"] == "zoo:faces-stylegan2"
    with pytest.raises(SystemExit):  # the other trainers do not take it
        zoo_train.main(["faces-vae", "--run-dir", str(tmp_path), "--cuda-graphs"])


def test_channels_last_trains_as_the_nchw_loop(tmp_path: Path) -> None:
    """channels_last only changes where the convolution weights and the real batch live in memory: a smoke run
    from the same seed gives the NCHW run's losses and weights up to the convolution algorithms' rounding."""
    runs = {}
    for cl in (False, True):
        run = tmp_path / f"cl{cl}"
        m = st.train(run, minutes=2, device="cpu", seed=0, smoke=True, max_steps=4, evaluate_metrics=False,
                     channels_last=cl)
        runs[cl] = (m, training.load_checkpoint(run)["G"])
    (nchw, g_nchw), (nhwc, g_nhwc) = runs[False], runs[True]
    assert nhwc["channels_last"] is True and nchw["channels_last"] is False and nhwc["nonfinite_losses"] == 0
    for k in ("loss_G", "loss_D", "r1", "pl", "D_real", "D_fake"):
        assert nhwc[f"last_chunk_{k}"] == pytest.approx(nchw[f"last_chunk_{k}"], rel=1e-3, abs=1e-5), k
    convs = [k for k, v in g_nhwc.items() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1]
    assert convs and all(g_nhwc[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert not any(g_nhwc[k].is_contiguous() for k in convs)
    for k, v in g_nchw.items():
        torch.testing.assert_close(g_nhwc[k].contiguous(), v, rtol=1e-3, atol=1e-5)
    # a chunk may choose its layout: the NCHW run resumes in channels-last (Adam's moments follow their weights)
    again = st.train(tmp_path / "clFalse", minutes=2, device="cpu", seed=0, smoke=True, max_steps=2,
                     evaluate_metrics=False, channels_last=True)
    assert again["steps"] == 6 and again["nonfinite_losses"] == 0 and again["channels_last"] is True
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        st.train(tmp_path / "bad", minutes=1, device="cpu", smoke=True, max_steps=1, channels_last="yes")


def test_cuda_graphs_are_a_clear_error_where_they_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        st.train(tmp_path / "a", minutes=1, device="cpu", smoke=True, max_steps=1, cuda_graphs=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        st.train(tmp_path / "b", minutes=1, device="cpu", smoke=True, max_steps=1, cuda_graphs=True,
                 compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        st.train(tmp_path / "c", minutes=1, device="cpu", smoke=True, max_steps=1, cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        training.ReplayedStep(lambda: None, cuda_graph=True, device=torch.device("cpu"))
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_sanitize_grads_is_nan_to_num_of_every_gradient() -> None:
    """NaN -> 0, +-Inf -> +-1e5 in every gradient, in place (a channels-last one too); no gradient stays none."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    net[0].to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    params = list(net.parameters())
    for p in params[:-1]:  # the last one has no gradient
        p.grad = torch.randn(p.shape, generator=g).contiguous(
            memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)
    params[0].grad[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    params[2].grad[0, :3] = torch.tensor([-math.inf, math.nan, math.inf])
    held = [p.grad for p in params[:-1]]
    want = [torch.nan_to_num(t, nan=0.0, posinf=1e5, neginf=-1e5) for t in held]
    st._sanitize_grads(net)
    for p, h, w in zip(params, held, want):
        assert p.grad is h and torch.equal(p.grad, w)  # in place, the same values as nan_to_num
    assert params[0].grad.is_contiguous(memory_format=torch.channels_last) and params[-1].grad is None


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of ``training.ReplayedStep`` (its control flow, tested on the CPU)."""

    def __init__(self, capture_fails: bool) -> None:
        self.capture_fails, self.replays, self.captures = capture_fails, 0, 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = self

        class Graph:
            def replay(self) -> None:
                fake.replays += 1

        class Stream:
            def __init__(self, *a, **k) -> None:
                pass

            def wait_stream(self, other) -> None:
                pass

        @contextlib.contextmanager
        def graph(g, **kwargs):
            fake.captures += 1
            fake.capturing = True
            try:
                yield
                if fake.capture_fails:  # as a capture invalidated by an op in the step
                    raise RuntimeError("operation not permitted when stream is capturing")
            finally:
                fake.capturing = False

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


@pytest.mark.parametrize("capture_fails", [False, True])
def test_replayed_step_warms_up_captures_once_then_replays(monkeypatch: pytest.MonkeyPatch,
                                                           capture_fails: bool) -> None:
    """First call eager, second captures (the zero_grad-like hook just before) and replays, later calls replay;
    a capture that fails is reported once and the step runs eagerly from then on, each call exactly once."""
    fake = _FakeCuda(capture_fails)
    fake.install(monkeypatch)
    fake.capturing = False
    eager_runs, events, reports = [], [], []
    step = training.ReplayedStep(lambda: eager_runs.append(fake.capturing), before_capture=lambda: events.append(1),
                                 on_fallback=reports.append)
    step.cuda_graph, step.device = True, torch.device("cuda")  # (the constructor refuses CUDA without a GPU)
    for _ in range(4):
        step()
    assert fake.captures == 1 and events == [1] and step.calls == 4
    if capture_fails:
        assert fake.replays == 0 and step.graph is None and not step.cuda_graph
        assert len(reports) == 1 and "RuntimeError: operation not permitted" in reports[0]
        assert eager_runs == [False, True, False, False, False]  # warm-up, failed capture, then 3 eager calls
    else:
        assert fake.replays == 3 and step.graph is not None and not reports
        assert eager_runs == [False, True]  # the warm-up, then the recording


def test_replayed_step_runs_eagerly_without_graphs() -> None:
    seen = []
    step = training.ReplayedStep(lambda: seen.append(len(seen)))
    for _ in range(3):
        step()
    assert seen == [0, 1, 2] and step.calls == 3 and step.graph is None


def test_no_part_of_an_iteration_reads_the_device_on_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a CUDA graph cannot hold, caught on the CPU: no part of an iteration (G, path length, D, R1) reads a
    tensor's value on the host (``item``, ``bool``, ``float``: ``_local_scalar_dense``), makes a tensor from Python
    data (``lift_fresh``: a pageable host-to-device copy on CUDA) or an op whose output size depends on the data
    (``nonzero``, ``masked_select``, ``unique``). Adam's own CPU step reads its step count and is exempt: on CUDA
    it runs capturable (the count on the device)."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    forbidden = {"_local_scalar_dense", "lift_fresh", "nonzero", "masked_select", "unique", "_unique2"}
    seen: dict[str, int] = {}

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            seen[name] = seen.get(name, 0) + 1
            if name in forbidden:
                raise AssertionError(f"{name} inside a part of the iteration")
            return func(*args, **(kwargs or {}))

    run_part, adam_step = training.ReplayedStep.__call__, torch.optim.Adam.step

    def guarded(self) -> None:
        with NoHostReads():
            run_part(self)

    def exempt(self, *args, **kwargs):
        with _disable_current_modes():
            return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(training.ReplayedStep, "__call__", guarded)
    monkeypatch.setattr(torch.optim.Adam, "step", exempt)
    m = st.train(tmp_path / "run", minutes=1, device="cpu", smoke=True, max_steps=2, evaluate_metrics=False)
    assert m["steps"] == 2 and math.isfinite(m["last_chunk_r1"]) and math.isfinite(m["last_chunk_pl"])
    assert seen["convolution_backward"] > 0 and seen["randn"] > 0  # the guard saw the parts run
    with pytest.raises(AssertionError, match="_local_scalar_dense inside a part"), NoHostReads():
        float(torch.ones(2).sum())  # the guard itself works


@pytest.mark.cuda
def test_cuda_graphs_train_as_the_eager_loop(tmp_path: Path) -> None:
    """Every part of an iteration replayed from a CUDA graph trains the networks the eager loop trains from the
    same seed: the same random draws (a replayed draw takes the generator's offset of the moment) and the same
    updates, up to cuDNN's choice of algorithms; a resumed chunk continues with graphs."""
    steps = 6  # every part is captured (R1 and path length every 2 steps) and replayed at least once
    runs = {}
    for graphs in (False, True):
        run = tmp_path / f"graphs{graphs}"
        m = st.train(run, minutes=3, device="cuda", seed=0, smoke=True, max_steps=steps, evaluate_metrics=False,
                     cuda_graphs=graphs)
        runs[graphs] = (m, training.load_checkpoint(run)["G"])
    (eager, g_eager), (graphed, g_graphed) = runs[False], runs[True]
    assert graphed["replayed_parts"] == ["D step", "G step", "R1 step", "path-length step"]
    assert eager["replayed_parts"] == [] and graphed["nonfinite_losses"] == 0
    for k in ("loss_G", "loss_D", "r1", "pl", "D_real", "D_fake"):
        assert graphed[f"last_chunk_{k}"] == pytest.approx(eager[f"last_chunk_{k}"], rel=2e-3, abs=1e-4), k
    init_g, _ = st.build_networks(st.TrainConfig.preset(smoke=True), seed=0)
    for k, v in init_g.state_dict().items():
        moved = (g_eager[k].float() - v.float()).norm()
        apart = (g_graphed[k].float() - g_eager[k].float()).norm()
        assert apart <= 0.02 * moved + 1e-6, (k, float(apart), float(moved))
    again = st.train(tmp_path / "graphsTrue", minutes=3, device="cuda", seed=0, smoke=True, max_steps=3,
                     evaluate_metrics=False, cuda_graphs=True)
    assert again["steps"] == steps + 3 and again["nonfinite_losses"] == 0 and again["replayed_parts"]
