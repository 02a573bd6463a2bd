"""DragDiffusion engine: fast mode equals the published path (reference mode) on a tiny random SD pipeline.

The tiny UNet (runtime.models.sd.tiny_unet_config) has SD1.5's block kinds with one layer per block: 10
transformer blocks instead of 16, so mutual self-attention starts at block 4 here (up_blocks[2] and [3], as
start_layer=10 selects on SD1.5). Images are 128 px: latent 16x16, half-resolution grid 64x64.
"""

from __future__ import annotations

import pytest
import torch

from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine
from dragrt.runtime.models.layout import non_nchw_weights
from dragrt.runtime.models.sd import build_random_sd15

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 128
PROMPT = "a cartoon face"
HANDLES = [[40.0, 50.0], [90.0, 80.0]]
TARGETS = [[70.0, 50.0], [90.0, 110.0]]
BASE = {"start_layer": 4, "max_steps": 6}


@pytest.fixture(scope="module")
def sd():
    return build_random_sd15(tiny=True, seed=0)


def _image(k: float = 1.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    return torch.stack([torch.sin(9 * k * x), torch.cos(7 * y), torch.sin(5 * (x + k * y))])[None]


def _engines(sd, **kw):
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    return {mode: DragDiffusionEngine(sd, DragDiffusionConfig(mode=mode, **{**BASE, **kw}), rt)
            for mode in ("reference", "fast")}


def _mask() -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE)
    m[20:110, 30:120] = 1
    return m


@pytest.mark.parametrize("with_mask", [False, True])
def test_fast_mode_tracks_the_same_points_and_latent_as_the_reference(sd, with_mask):
    eng = _engines(sd)
    results, latents = {}, {}
    for mode, e in eng.items():
        e.prepare(_image(), PROMPT)
        e.start(HANDLES, TARGETS, _mask() if with_mask else None)
        results[mode] = list(e.run())
        latents[mode] = e.latent()
    ref, fast = results["reference"], results["fast"]
    assert len(ref) == len(fast) == 6
    for r, f in zip(ref, fast):
        assert r.handles == f.handles
        assert f.loss == pytest.approx(r.loss, rel=1e-4, abs=1e-5)
    z0 = eng["fast"].prepared.z_t
    moved = (latents["reference"] - z0).abs().max()
    assert moved > 1e-3  # the optimisation changed the latent
    # With a mask, |x_prev - x_prev0| starts at 0 where abs() has no derivative: rounding (SDPA vs the reference's
    # score-matrix attention) picks the subgradient sign, so the modes agree to 1% of the move instead of 0.1%.
    tol = 1e-2 if with_mask else 1e-3
    torch.testing.assert_close(latents["fast"], latents["reference"], rtol=0, atol=float(moved) * tol)
    # inversions: published arithmetic + score-matrix attention vs a x + b eps + SDPA: float rounding apart
    torch.testing.assert_close(eng["fast"].prepared.z_t, eng["reference"].prepared.z_t, rtol=1e-3, atol=1e-4)


def test_a_channels_last_unet_edits_the_same_and_the_reference_keeps_nchw():
    """diffusers' ``pipe.unet.to(memory_format=torch.channels_last)``: the fast mode runs it as it is (the kernels
    read any strides) and tracks the same points; the reference mode's copies are NCHW, as the published code."""
    results = {}
    for layout in ("nchw", "channels_last"):
        pipe = build_random_sd15(tiny=True, seed=0)
        if layout == "channels_last":
            pipe.unet.to(memory_format=torch.channels_last)
        eng = _engines(pipe)
        assert non_nchw_weights(eng["reference"].unet) == non_nchw_weights(eng["reference"].unet_fp32) == []
        e = eng["fast"]
        e.prepare(_image(), PROMPT)
        e.start(HANDLES, TARGETS)
        results[layout] = ([r.handles for r in e.run()], e.latent(), e.prepared.z_t)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the engine left it so
    # on the CPU the engine does not convert an NCHW UNet itself (channels_last is measured on CUDA only)
    nchw = build_random_sd15(tiny=True, seed=0)
    _engines(nchw)
    assert non_nchw_weights(nchw.unet) == []
    (h_n, z_n, z0_n), (h_c, z_c, z0_c) = results["nchw"], results["channels_last"]
    assert h_c == h_n
    # oneDNN sums channels-last convolutions in another order: float rounding, which the inversion's steps carry
    # on (measured: 1e-4 of the latent's norm, 2.8e-4 at most against values up to 1.7, on one CPU; elementwise
    # 1e-4 held on another), then Adam's normalised steps on the near-zero gradient entries: within 1% of the
    # drag's move. A layout mistake would be off by the values' own size.
    assert float((z0_c - z0_n).norm() / z0_n.norm()) < 1e-3
    torch.testing.assert_close(z0_c, z0_n, rtol=0, atol=1e-3 * float(z0_n.abs().max()))
    torch.testing.assert_close(z_c, z_n, rtol=0, atol=float((z_n - z0_n).abs().max()) * 1e-2)


def test_later_renders_reuse_the_original_branch(sd):
    """reuse_original_branch (default): the first render of a prepared image keeps branch 0's self-attention keys
    and values; later renders (a session's next drags) denoise the edited branch alone against them -- batch 1
    instead of 2, the same image as the two-branch pass. A new prepare records again."""
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    eng = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", **BASE), rt)
    plain = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", reuse_original_branch=False, **BASE), rt)
    for e in (eng, plain):
        e.prepare(_image(), PROMPT)
    g = torch.Generator().manual_seed(0)
    z0 = eng.prepared.z_t
    z1, z2 = (z0 + 0.05 * torch.randn(z0.shape, generator=g) for _ in range(2))
    batches = []
    hook = sd.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        first = eng.denoise(z1)
        assert set(batches) == {2} and eng._kv_store[0] is eng.prepared
        torch.testing.assert_close(first, plain.denoise(z1), rtol=0, atol=1e-6)
        batches.clear()
        second = eng.denoise(z2)
        assert batches == [1] * len(eng.prepared.denoise_timesteps)
        torch.testing.assert_close(second, plain.denoise(z2), rtol=1e-4, atol=1e-5)
        eng.prepare(_image(2.0), PROMPT)
        batches.clear()  # (the inversion runs batch 1)
        eng.denoise(eng.prepared.z_t)
        assert set(batches) == {2} and eng._kv_store[0] is eng.prepared  # recorded for the new image
    finally:
        hook.remove()
    eng.close()
    assert eng._kv_store is None


def test_compiled_blocks_record_and_replay_without_recompiling(aot_eager_compile):
    """With compiled blocks (the aot_eager backend here): the first render (record) and the second (replay) compile
    their variants, later renders compile nothing new, and all give the uncompiled engine's images."""
    from torch._dynamo.utils import counters

    pipe = build_random_sd15(tiny=True, seed=0)
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="default")
    eng = DragDiffusionEngine(pipe, DragDiffusionConfig(mode="fast", **BASE), rt)
    eng.prepare(_image(), PROMPT)
    z0 = eng.prepared.z_t
    g = torch.Generator().manual_seed(0)
    zs = [z0 + 0.05 * torch.randn(z0.shape, generator=g) for _ in range(3)]
    images = [eng.denoise(zs[0]), eng.denoise(zs[1])]  # record, then replay: each kind compiled once
    graphs = counters["stats"]["unique_graphs"]
    images.append(eng.denoise(zs[2]))
    assert counters["stats"]["unique_graphs"] == graphs
    plain = DragDiffusionEngine(build_random_sd15(tiny=True, seed=0), DragDiffusionConfig(mode="fast", **BASE),
                                RuntimeConfig(device="cpu", dtype="float32", compile_mode="none"))
    plain.prepare(_image(), PROMPT)
    for img, z in zip(images, zs):
        torch.testing.assert_close(img, plain.denoise(z), rtol=1e-4, atol=1e-5)


def test_denoise_matches_the_reference_and_reconstructs_branch_zero(sd):
    eng = _engines(sd)
    z = None
    images = {}
    for mode, e in eng.items():
        e.prepare(_image(), PROMPT)
        if z is None:
            z = e.prepared.z_t + 0.05 * torch.randn(e.prepared.z_t.shape, generator=torch.Generator().manual_seed(0))
        e.start(HANDLES, TARGETS)
        images[mode] = e.denoise(z)
    assert images["fast"].shape == (1, 3, SIZE, SIZE)
    assert 0 <= images["fast"].min() and images["fast"].max() <= 1
    torch.testing.assert_close(images["fast"], images["reference"], rtol=1e-4, atol=1e-4)
    # Denoising the un-edited latent reproduces the plain DDIM reconstruction (mutual attention is then a no-op).
    fast = eng["fast"]
    same = fast.denoise(fast.prepared.z_t)
    with torch.no_grad():
        x = fast.prepared.z_t
        from dragrt.runtime import inversion as inv

        for t in fast.prepared.denoise_timesteps:
            eps = fast.unet(x, torch.tensor([t]), encoder_hidden_states=fast.prepared.text_emb).sample
            a, b = inv.ddim_step_coefficients(sd.scheduler, t, 50, prev_inclusive=True)
            x = a * x + b * eps
        plain = (sd.vae.decode(x / sd.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(same, plain, rtol=0, atol=5e-4)  # batch of 2 vs 1: rounding only


def test_edit_runs_every_phase_and_stops_at_the_targets(sd):
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    engine = DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt)
    near = [[h[0] + 2, h[1]] for h in HANDLES]  # 1 grid px away: done at the first check
    res = engine.edit(_image(), PROMPT, HANDLES, near)
    assert res.steps == 1 and res.history[0].done
    assert set(res.timings) >= {"lora", "inversion", "start", "drag", "denoise", "total"}
    assert res.image.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(res.latent, engine.prepared.z_t)  # done before any update: latent unchanged
    far = engine.edit(_image(), PROMPT, HANDLES, TARGETS)
    assert far.steps == BASE["max_steps"] and not far.history[-1].done
    assert all(len(r.handles) == 2 and len(r.distances) == 2 for r in far.history)


@pytest.mark.parametrize("with_mask", [False, True])
def test_a_finished_cpu_step_skips_the_backward_and_reports_the_reference_loss(sd, with_mask, grad_calls):
    """On the CPU a fast step whose handles are all within the stop distance takes no backward through the UNet
    (the masked Adam would make no update; the reference's loop stops before its backward); its loss and the
    unchanged latent are the reference's."""
    near = [[h[0] + 2, h[1]] for h in HANDLES]  # 1 grid px away: done at the first check
    eng = _engines(sd)
    out = {}
    for mode, e in eng.items():
        e.prepare(_image(), PROMPT)
        e.start(HANDLES, near, _mask() if with_mask else None)
        grad_calls.clear()
        (r,) = list(e.run())
        out[mode] = (r, e.latent(), list(grad_calls))
    (ref, ref_z, _), (fast, fast_z, fast_calls) = out["reference"], out["fast"]
    assert fast.done and ref.done and fast.handles == ref.handles and not fast_calls
    assert fast.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-6)  # (0: the reference computes none once done)
    torch.testing.assert_close(fast_z, eng["fast"].prepared.z_t, rtol=0, atol=0)
    torch.testing.assert_close(ref_z, eng["reference"].prepared.z_t, rtol=0, atol=0)  # (inversions: rounding apart)


def test_fused_qkv_edits_the_same():
    """DragDiffusionConfig(fuse_qkv=True): every self-attention projects q/k/v with one matmul, the final
    denoise's mutual processors included (first render and later, replayed renders); the same tracked points,
    latent and images as separate projections, up to float rounding."""
    from dragrt.runtime.models.attention import AttnProcessor

    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    out = {}
    for fuse in (False, True):
        pipe = build_random_sd15(tiny=True, seed=0)
        engine = DragDiffusionEngine(pipe, DragDiffusionConfig(**BASE, fuse_qkv=fuse), rt)
        procs = pipe.unet.attn_processors.values()
        assert all(isinstance(q, AttnProcessor) and q.fuse_qkv == fuse for q in procs)
        first = engine.edit(_image(), PROMPT, HANDLES, TARGETS)
        again = engine.edit(_image(), PROMPT, HANDLES, TARGETS)  # the same prepared image: branch 0 replayed
        assert all(q.fuse_qkv == fuse for q in engine._branch_zero_processors())
        out[fuse] = (first, again)
    (f0, a0), (f1, a1) = out[False], out[True]
    assert [r.handles for r in f1.history] == [r.handles for r in f0.history]
    moved = float((f0.latent - engine.prepared.z_t).abs().max())
    assert moved > 1e-3
    torch.testing.assert_close(f1.latent, f0.latent, rtol=0, atol=moved * 1e-3)
    for got, want in ((f1.image, f0.image), (a1.image, a0.image)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_second_drag_continues_from_a_given_latent(sd):
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    engine = DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt)
    engine.prepare(_image(), PROMPT)
    engine.start(HANDLES, TARGETS)
    list(engine.run(max_steps=3))
    z1 = engine.latent()
    engine.start(engine.handles, TARGETS, latent=z1)
    torch.testing.assert_close(engine.latent(), z1)
    list(engine.run(max_steps=2))
    assert not torch.equal(engine.latent(), z1)
    preview = engine.preview()
    assert preview.shape == (1, 3, SIZE, SIZE) and 0 <= preview.min() and preview.max() <= 1


def test_lora_is_trained_fused_and_removed_exactly(sd):
    from dragrt.runtime.models.lora import LoRAConfig

    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    engine = DragDiffusionEngine(sd, DragDiffusionConfig(lora=True, lora_config=LoRAConfig(steps=2, batch_size=1),
                                                         **BASE), rt)
    engine.prepare(_image(), PROMPT)
    assert engine.prepared.lora is not None
    changed = [k for k, v in sd.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(".to_" in k for k in changed)  # fused into the attention projections only
    engine.close()
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())


def test_bad_input_names_the_field(sd):
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    engine = DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt)
    with pytest.raises(RuntimeError, match="prepare"):
        engine.start(HANDLES, TARGETS)
    with pytest.raises(ValueError, match="multiples of 64"):
        engine.prepare(torch.zeros(1, 3, 100, 128), PROMPT)
    engine.prepare(_image(), PROMPT)
    with pytest.raises(ValueError, match="handle_points: x must be within 0 to 127"):
        engine.start([[130, 5]], [[5, 5]])
    with pytest.raises(ValueError, match="2 points but target_points has 1"):
        engine.start(HANDLES, TARGETS[:1])
    with pytest.raises(ValueError, match=r"mask must be \[H, W\] = \[128, 128\]"):
        engine.start(HANDLES, TARGETS, torch.ones(64, 64))
    with pytest.raises(ValueError, match="latent must be a float"):
        engine.start(HANDLES, TARGETS, latent=torch.zeros(1, 4, 8, 8))
    engine.start(HANDLES, TARGETS)
    with pytest.raises(ValueError, match="max_steps=0 is not allowed"):
        engine.run(max_steps=0)
    for bad in ({"lr": 0}, {"inversion_strength": 1.5}, {"max_steps": 0}, {"mode": "turbo"}, {"attention": "x"},
                {"reuse_original_branch": "yes"}, {"channels_last": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DragDiffusionConfig(**bad)
    with pytest.raises(ValueError, match="feature_block=7 is out of range"):
        DragDiffusionEngine(sd, DragDiffusionConfig(feature_block=7), rt)


@pytest.mark.cuda
def test_fast_mode_on_cuda_graphs_and_compiled_blocks_match_the_reference():
    """On a GPU: fp16 UNet, compiled blocks, one CUDA graph per step against the reference (fp32 + autocast)."""
    sd = build_random_sd15(torch.float16, "cuda", tiny=True, seed=0)
    rt = RuntimeConfig(device="cuda", dtype="float16")
    eng = {mode: DragDiffusionEngine(sd, DragDiffusionConfig(mode=mode, **BASE), rt) for mode in ("reference", "fast")}
    handles = {}
    for mode, e in eng.items():
        e.prepare(_image(), PROMPT)
        e.start(HANDLES, TARGETS, _mask())
        handles[mode] = [r.handles for r in e.run()]
    assert eng["fast"]._fast.graph is not None
    # channels_last (default): the fast engine converted the shared UNet on CUDA; the reference's copies are NCHW
    assert sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not sd.unet.conv_in.weight.is_contiguous()
    assert non_nchw_weights(eng["reference"].unet) == []
    ref, fast = handles["reference"], handles["fast"]
    assert ref[0] == fast[0]
    # fp16 features on random weights: near-ties can round either way, as with DragGAN on the GPU
    assert max(abs(a - b) for r, f in zip(ref, fast) for p, q in zip(r, f) for a, b in zip(p, q)) <= 4.0
    images = {mode: e.denoise(eng["fast"].latent()) for mode, e in eng.items()}
    assert (images["fast"] - images["reference"]).abs().mean() < 2e-2
    # a later render of the same prepared image: the edited branch alone (batch 1, its own graph) against the kept
    # keys/values of the original branch
    z2 = eng["fast"].latent() + 0.05 * torch.randn(eng["fast"].latent().shape, device="cuda",
                                                   generator=torch.Generator("cuda").manual_seed(0))
    again = {mode: e.denoise(z2) for mode, e in eng.items()}
    assert any(k[0] == "mutual-replay" for k in eng["fast"]._unet_graphs)
    assert (again["fast"] - again["reference"]).abs().mean() < 2e-2
    # The inversion replays a captured UNet graph in fast mode: the same z_t as fast mode's eager call of the same
    # compiled blocks. (Against the reference's eager "math"-attention fp16 UNet, 35 fp16 inversion steps on random
    # weights drift by a few percent of the latent on an H200, so that comparison measures rounding, not the graph.)
    eager = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", cuda_graph=False, **BASE), rt)
    eager.prepare(_image(), PROMPT)
    z_graph, z_eager = eng["fast"].prepared.z_t, eager.prepared.z_t
    assert (z_graph - z_eager).abs().mean() < 1e-2 * z_eager.abs().mean()

    # a second image of the same size keeps every captured graph (the prompt embedding is refilled in place)
    # and edits exactly as a fresh engine does
    fast = eng["fast"]
    step_graph, unet_graphs = fast._fast_states[True].graph, dict(fast._unet_graphs)
    fresh = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", **BASE), rt)
    out = {}
    for name, e in (("reused", fast), ("fresh", fresh)):
        e.prepare(_image(1.7), "another prompt")
        e.start(HANDLES, TARGETS, _mask())
        out[name] = ([r.handles for r in e.run()], e.latent(), e.denoise())
    assert fast._fast_states[True].graph is step_graph
    assert all(fast._unet_graphs[k]["graph"] is g["graph"] for k, g in unet_graphs.items())
    # the same kernels replayed; two captures may still pick different cuBLAS/cuDNN algorithms, so allow rounding
    steps = [(p, q) for r, f in zip(out["reused"][0], out["fresh"][0]) for p, q in zip(r, f)]
    assert len(out["reused"][0]) == len(out["fresh"][0])
    assert max(abs(a - b) for p, q in steps for a, b in zip(p, q)) <= 2.0
    torch.testing.assert_close(out["reused"][1], out["fresh"][1], rtol=1e-2, atol=1e-2)
    assert (out["reused"][2] - out["fresh"][2]).abs().mean() < 1e-2


@pytest.mark.parametrize("with_mask", [False, True])
def test_a_new_start_refills_the_same_buffers_and_matches_a_fresh_engine(sd, with_mask):
    """start() reuses the fast state (and, on CUDA, its captured graph): it must reset everything an edit keeps."""
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    mask = _mask() if with_mask else None
    reused, fresh = (DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt) for _ in range(2))
    for e in (reused, fresh):
        e.prepare(_image(), PROMPT)
    reused.start(HANDLES, TARGETS, mask)
    first = reused._fast
    list(reused.run(max_steps=3))
    reused.start(HANDLES, TARGETS, mask)
    assert reused._fast is first
    got = [r.handles for r in reused.run(max_steps=3)]
    fresh.start(HANDLES, TARGETS, mask)
    want = [r.handles for r in fresh.run(max_steps=3)]
    assert got == want
    torch.testing.assert_close(reused.latent(), fresh.latent(), rtol=0, atol=0)


def test_a_new_start_with_another_handle_count_builds_buffers_of_its_size_on_the_cpu(sd):
    """On the CPU the fast buffers hold exactly the edit's handles (no padding rows to track and sample): a
    one-handle edit after a two-handle one gets one-row buffers and equals a fresh engine's."""
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    reused, fresh = (DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt) for _ in range(2))
    for e in (reused, fresh):
        e.prepare(_image(), PROMPT)
    reused.start(HANDLES, TARGETS)
    assert len(reused._fast.handles) == 2
    list(reused.run(max_steps=2))
    reused.start(HANDLES[:1], TARGETS[:1])
    assert len(reused._fast.handles) == 1
    got = [r.handles for r in reused.run(max_steps=3)]
    fresh.start(HANDLES[:1], TARGETS[:1])
    assert got == [r.handles for r in fresh.run(max_steps=3)]
    torch.testing.assert_close(reused.latent(), fresh.latent(), rtol=0, atol=0)


def test_a_new_image_of_the_same_size_keeps_the_fast_state_and_matches_a_fresh_engine(sd):
    """prepare() of another image (same size) refills the prompt embedding in place and keeps the fast state, whose
    captured graphs read it: the edit must equal a fresh engine's, prompt included."""
    rt = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
    reused, fresh = (DragDiffusionEngine(sd, DragDiffusionConfig(**BASE), rt) for _ in range(2))
    reused.prepare(_image(), PROMPT)
    reused.start(HANDLES, TARGETS, _mask())
    list(reused.run(max_steps=2))
    state, emb = reused._fast_states[True], reused.prepared.text_emb
    got, want = {}, {}
    for e, out in ((reused, got), (fresh, want)):
        e.prepare(_image(1.7), "another prompt")
        e.start(HANDLES, TARGETS, _mask())
        out["handles"] = [r.handles for r in e.run(max_steps=3)]
        out["latent"], out["image"] = e.latent(), e.denoise()
    assert reused._fast_states[True] is state and reused.prepared.text_emb is emb
    assert got["handles"] == want["handles"]
    torch.testing.assert_close(got["latent"], want["latent"], rtol=0, atol=0)
    torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)
    # a different size starts over
    reused.prepare(torch.nn.functional.interpolate(_image(), (192, 192)), PROMPT)
    assert reused._fast_states == {}
