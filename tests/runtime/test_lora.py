"""Per-image LoRA (peft) on the tiny random SD, CPU float32: training modes, files, fusing, caching."""

from __future__ import annotations

import contextlib
import copy
import json

import numpy as np
import pytest
import torch

from dragrt.runtime import inversion as inv
from dragrt.runtime.cache import TensorCache
from dragrt.runtime.models import lora, sd
from dragrt.runtime.models.layout import non_nchw_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny: 64 px crops (8 x 8 latents), a big learning rate so that 4 steps visibly move the loss.
CFG = lora.LoRAConfig(rank=4, steps=4, batch_size=2, resolution=64, learning_rate=3e-2)
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny() -> sd.SDComponents:
    if sd.assets_dir() is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    return sd.build_random_sd15(tiny=True, seed=0)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(tiny: sd.SDComponents, pixels: np.ndarray) -> dict[str, dict]:
    """Both modes once: weights, per-step losses, VAE encoder calls, and the UNet state before training."""
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    out = {}
    for mode in ("reference", "fast"):
        calls, losses = [], []
        handle = tiny.vae.encoder.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        try:
            weights = lora.train_image_lora(tiny, pixels, PROMPT, CFG, mode=mode, progress=False,
                                            callback=lambda step, loss, losses=losses: losses.append(float(loss)))
        finally:
            handle.remove()
        out[mode] = {"weights": weights, "losses": losses, "encodes": len(calls)}
    out["before"] = before
    return out


def _random_lora(unet: torch.nn.Module, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {}
    for path in lora.lora_target_modules(unet):
        layer = unet.get_submodule(path)
        w[f"unet.{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        w[f"unet.{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
    return w


def _eval_loss(c: sd.SDComponents, pixels: np.ndarray, weights=None, n: int = 16) -> float:
    """Denoising loss on a fixed batch (posterior mean, 16 timesteps over [0, 1000), fixed noise)."""
    g = torch.Generator().manual_seed(123)
    x0 = inv.encode_image(c, pixels).repeat(n, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(0, 999, n).long()
    ac = c.scheduler.alphas_cumprod
    noisy = ac[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
    emb = inv.encode_prompt(c, PROMPT).repeat(n, 1, 1)
    with torch.no_grad(), (lora.fused_lora(c.unet, weights) if weights else contextlib.nullcontext()):
        pred = c.unet(noisy, t, emb).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


# ---------------------------------------------------------------------------------------------- config, targets


def test_config_defaults_and_validation() -> None:
    c = lora.LoRAConfig()
    assert (c.rank, c.learning_rate, c.steps, c.batch_size, c.seed) == (16, 5e-4, 80, 4, 0)
    assert (c.betas, c.weight_decay, c.eps, c.resolution, c.lora_alpha) == ((0.9, 0.999), 1e-2, 1e-8, 512, 16)
    assert c.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    for kwargs, field in [({"rank": 0}, "rank"), ({"learning_rate": 0.0}, "learning_rate"), ({"steps": 0}, "steps"),
                          ({"batch_size": 0}, "batch_size"), ({"resolution": 100}, "resolution"),
                          ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"target_modules": ()}, "target_modules")]:
        with pytest.raises(ValueError, match=field):
            lora.LoRAConfig(**kwargs)


def test_sd15_has_128_lora_layers_in_32_attention_modules() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real architecture, no weights
        unet = UNet2DConditionModel.from_config(sd.SD15_UNET_CONFIG)
    paths = lora.lora_target_modules(unet)  # the layers peft wraps (train_image_lora checks they agree)
    assert len(paths) == 128
    assert len({p.rsplit(".", 2 if p.endswith("to_out.0") else 1)[0] for p in paths}) == 32
    assert len(unet.attn_processors) == 32  # the reference's LoRAAttnProcessor count


def test_tiny_target_count(tiny: sd.SDComponents) -> None:
    paths = lora.lora_target_modules(tiny.unet)
    # tiny UNet: 3 down + 1 mid + 6 up transformer blocks, attn1 + attn2 each, 4 projections each
    assert len(paths) == 80
    assert paths[:4] == [f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}"
                         for p in ("to_q", "to_k", "to_v", "to_out.0")]


# ---------------------------------------------------------------------------------------------- training


def test_init_is_reference_lora_linear_layer(tiny: sd.SDComponents) -> None:
    unet = copy.deepcopy(tiny.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = lora._inject(unet, lora.LoRAConfig(rank=4), torch.device("cpu"))
        a1 = lora._weights_of(layers)
        lora._strip(unet)
        del unet.peft_config
        torch.manual_seed(0)
        a2 = lora._weights_of(lora._inject(unet, lora.LoRAConfig(rank=4), torch.device("cpu")))
    assert all(torch.equal(a1[k], a2[k]) for k in a1)  # same seed, same init
    A = torch.cat([v.flatten() for k, v in a1.items() if "lora_A" in k])
    assert all(v.abs().max() == 0 for k, v in a1.items() if "lora_B" in k)  # up = 0
    assert abs(A.std().item() - 1 / 4) < 0.01 and all(v.dtype == torch.float32 for v in a1.values())


def test_fast_and_reference_train_the_same_lora(trained) -> None:
    ref, fast = trained["reference"], trained["fast"]
    assert len(ref["losses"]) == len(fast["losses"]) == CFG.steps
    # Same seed, same draws in the same order, float32 on the CPU: the same numbers.
    np.testing.assert_allclose(fast["losses"], ref["losses"], rtol=1e-6, atol=1e-7)
    assert ref["weights"].keys() == fast["weights"].keys()
    assert len(ref["weights"]) == 160
    for k, v in ref["weights"].items():
        torch.testing.assert_close(fast["weights"][k], v, rtol=1e-5, atol=1e-7)
        assert v.dtype == torch.float32


def test_merged_lora_forward_trains_the_same_lora(tiny: sd.SDComponents, pixels: np.ndarray, trained) -> None:
    """lora_forward='merged' (one linear map with W + B @ A per layer, gradients to A and B through it) computes
    the same function and gradients as peft's branch: in float32 on the CPU the same losses and weights up to
    rounding; peft's forward is back afterwards and the UNet untouched; a bad choice is a clear error."""
    losses = []
    merged = lora.train_image_lora(tiny, pixels, PROMPT, CFG, progress=False, lora_forward="merged",
                                   callback=lambda step, loss: losses.append(float(loss)))
    branch = trained["fast"]
    np.testing.assert_allclose(losses, branch["losses"], rtol=1e-5, atol=1e-6)
    assert merged.keys() == branch["weights"].keys()
    # B starts at zero: all of it is what training did. Element by element, Adam's normalised steps magnify
    # rounding where a gradient nearly cancels (a few 1e-3 here); over the whole update the two agree to ~1e-3.
    ups = [k for k in merged if "lora_B" in k]
    num = sum((merged[k] - branch["weights"][k]).norm() ** 2 for k in ups) ** 0.5
    den = sum(branch["weights"][k].norm() ** 2 for k in ups) ** 0.5
    assert den > 0.1 and num / den < 5e-3
    after = tiny.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained["before"].items())
    with pytest.raises(ValueError, match="lora_forward must be one of 'branch', 'merged'"):
        lora.train_image_lora(tiny, pixels, PROMPT, CFG, lora_forward="fused")


def test_merged_lora_under_fused_qkv_attention_trains_the_same_lora(tiny: sd.SDComponents, pixels: np.ndarray,
                                                                    trained, monkeypatch) -> None:
    """With attention processors that stack q/k/v (fuse_qkv), the merged LoRA layers' weights are stacked too:
    every self-attention takes the fused path, and training matches peft's branch as the merged forward does."""
    from dragrt.runtime.models import attention

    fused_calls = []
    original = attention._fused_qkv_projection

    def counting(attn):
        out = original(attn)
        fused_calls.append(out is not None)
        return out

    monkeypatch.setattr(attention, "_fused_qkv_projection", counting)
    saved = tiny.unet.attn_processors
    attention.set_attention_backend(tiny.unet, "sdpa", fuse_qkv=True)
    losses = []
    try:
        w = lora.train_image_lora(tiny, pixels, PROMPT, CFG, progress=False, lora_forward="merged",
                                  callback=lambda step, loss: losses.append(float(loss)))
    finally:
        tiny.unet.set_attn_processor(saved)
    assert fused_calls and all(fused_calls)
    # (other processors than the branch run's diffusers defaults: rounding moves the later losses by ~2e-5)
    np.testing.assert_allclose(losses, trained["fast"]["losses"], rtol=1e-4, atol=1e-6)
    ups = [k for k in w if "lora_B" in k]
    num = sum((w[k] - trained["fast"]["weights"][k]).norm() ** 2 for k in ups) ** 0.5
    assert num / sum(trained["fast"]["weights"][k].norm() ** 2 for k in ups) ** 0.5 < 5e-3


def test_merged_forward_is_the_layer_and_its_gradients(tiny: sd.SDComponents) -> None:
    """One peft layer: the merged map equals base(x) + B(A(x)) * scaling in value and in the gradients of A
    and B (scaling != 1 included), and leaving the block restores peft's forward."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    net.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["0"]), net, adapter_name=lora._ADAPTER)
    layer = net[0]
    for w in (layer.lora_A[lora._ADAPTER].weight, layer.lora_B[lora._ADAPTER].weight):
        torch.nn.init.normal_(w)
    x = torch.randn(4, 6)
    results = []
    for merged in (False, True):
        ctx = lora._merged_forwards([("0", layer)]) if merged else contextlib.nullcontext()
        for w in layer.parameters():
            w.grad = None
        with ctx:
            y = net(x)
            (y * torch.arange(5.0)).sum().backward()
        results.append((y.detach(), [w.grad.clone() for w in (layer.lora_A[lora._ADAPTER].weight,
                                                              layer.lora_B[lora._ADAPTER].weight)]))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
    assert "forward" not in layer.__dict__


def test_vae_is_encoded_every_step_in_reference_and_once_in_fast(trained) -> None:
    assert trained["reference"]["encodes"] == CFG.steps
    assert trained["fast"]["encodes"] == 1


def test_training_lowers_the_loss(tiny: sd.SDComponents, pixels: np.ndarray, trained) -> None:
    base = _eval_loss(tiny, pixels)
    for mode in ("reference", "fast"):
        assert _eval_loss(tiny, pixels, trained[mode]["weights"]) < base - 0.02


def test_unet_is_left_as_it_was(tiny: sd.SDComponents, trained) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    after = tiny.unet.state_dict()
    assert after.keys() == trained["before"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["before"].items())
    assert not any(isinstance(m, BaseTunerLayer) for m in tiny.unet.modules())
    assert not any(p.requires_grad for p in tiny.unet.parameters())
    assert not hasattr(tiny.unet, "peft_config") and not tiny.unet.training


def test_reference_trains_in_nchw_on_a_channels_last_unet(pixels: np.ndarray, trained) -> None:
    """A fast engine makes the shared UNet channels-last on CUDA: the reference mode still trains the published
    layout (NCHW weights while it trains: the same LoRA bit for bit) and gives the UNet back its own tensors."""
    cl = sd.build_random_sd15(tiny=True, seed=0)
    cl.unet.to(memory_format=torch.channels_last)
    convs = [q for q in cl.unet.parameters() if q.dim() == 4]
    ptrs = [q.data_ptr() for q in convs]
    seen = []

    def check(step: int, loss: torch.Tensor) -> None:
        seen.append(non_nchw_weights(cl.unet) == [])

    weights = lora.train_image_lora(cl, pixels, PROMPT, CFG, mode="reference", progress=False, callback=check)
    assert seen == [True] * CFG.steps
    assert [q.data_ptr() for q in convs] == ptrs
    assert len(non_nchw_weights(cl.unet)) == len(convs)
    for k, v in trained["reference"]["weights"].items():
        assert torch.equal(weights[k], v), k


def test_non_square_image_crops_like_the_reference(tiny: sd.SDComponents) -> None:
    # 40 x 56 -> Resize(32) -> 32 x 44 -> RandomCrop(32): real random crops; fast encodes each distinct crop once.
    image = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    cfg = lora.LoRAConfig(rank=2, steps=2, batch_size=2, resolution=32, learning_rate=1e-2)
    ref = lora.train_image_lora(tiny, image, PROMPT, cfg, mode="reference", progress=False)
    fast = lora.train_image_lora(tiny, image, PROMPT, cfg, mode="fast", progress=False)
    for k, v in ref.items():
        torch.testing.assert_close(fast[k], v, rtol=1e-5, atol=1e-7)


def test_training_input_checks(tiny: sd.SDComponents, pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="mode"):
        lora.train_image_lora(tiny, pixels, PROMPT, CFG, mode="quick")
    with pytest.raises(ValueError, match="image"):
        lora.train_image_lora(tiny, pixels.astype(np.float32), PROMPT, CFG)
    with pytest.raises(ValueError, match="prompt"):
        lora.train_image_lora(tiny, pixels, 3, CFG)
    as_tensor = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 127.5 - 1
    assert np.array_equal(lora._training_pixels(as_tensor), pixels)  # float input quantises back exactly

    def interrupt(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a failure mid-training still gives the UNet back intact
        lora.train_image_lora(tiny, pixels, PROMPT, lora.LoRAConfig(rank=2, steps=3, batch_size=1, resolution=64),
                              progress=False, callback=interrupt)
    assert lora.lora_target_modules(tiny.unet) and not lora._has_peft_layers(tiny.unet)
    assert not hasattr(tiny.unet, "peft_config") and not any(p.requires_grad for p in tiny.unet.parameters())


# ---------------------------------------------------------------------------------------------- fusing, files


def test_fused_lora_equals_peft_and_restores_exactly(tiny: sd.SDComponents, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    weights = _random_lora(tiny.unet)
    folder = tmp_path / "lora"
    assert lora.save_lora(weights, folder) == folder / "pytorch_lora_weights.safetensors"
    wrapped = copy.deepcopy(tiny.unet)
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=wrapped, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(folder))  # diffusers reads our file
    assert sum(isinstance(m, BaseTunerLayer) for m in wrapped.modules()) == 80

    g = torch.Generator().manual_seed(5)
    x, emb, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10, 700])
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    with torch.no_grad():
        plain = tiny.unet(x, t, emb).sample
        peft_out = wrapped(x, t, emb).sample
        with lora.fused_lora(tiny.unet, weights) as fused_unet:
            assert fused_unet is tiny.unet
            fused = tiny.unet(x, t, emb).sample
            with lora.fused_lora(tiny.unet, weights, scale=-1.0):  # nesting: cancels the first
                torch.testing.assert_close(tiny.unet(x, t, emb).sample, plain, rtol=1e-4, atol=1e-4)
        restored = tiny.unet(x, t, emb).sample
    assert (peft_out - plain).abs().max() > 0.1  # the LoRA matters
    torch.testing.assert_close(fused, peft_out, rtol=1e-4, atol=1e-4)
    assert torch.equal(restored, plain)
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())  # bit-exact restore

    bad = dict(weights)
    bad["unet.nope.to_q.lora_A.weight"] = torch.zeros(4, 4)
    bad["unet.nope.to_q.lora_B.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="nope"), lora.fused_lora(tiny.unet, bad):
        pass
    assert all(torch.equal(v, before[k]) for k, v in tiny.unet.state_dict().items())


def test_save_load_round_trip_and_old_key_formats(tiny: sd.SDComponents, tmp_path) -> None:
    from safetensors.torch import save_file

    weights = _random_lora(tiny.unet, seed=1)
    loaded = lora.load_lora(lora.save_lora(weights, tmp_path / "new"))
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert lora.lora_fingerprint(loaded) == lora.lora_fingerprint(weights)

    # DragDiffusion's file: AttnProcsLayers keys ("...attn1.processor.to_q_lora.down.weight"), "unet." prefixed
    old = {}
    for key, value in weights.items():
        path, ab = key.removeprefix("unet.").rsplit(".lora_", 1)
        attn, proj = (path[: -len(".to_out.0")], "to_out") if path.endswith("to_out.0") else path.rsplit(".", 1)
        old[f"unet.{attn}.processor.{proj}_lora.{'down' if ab.startswith('A') else 'up'}.weight"] = value
    save_file(old, str(tmp_path / "pytorch_lora_weights.safetensors"))
    from_old = lora.load_lora(tmp_path)
    assert from_old.keys() == weights.keys() and all(torch.equal(from_old[k], weights[k]) for k in weights)
    assert lora.lora_fingerprint(from_old) == lora.lora_fingerprint(weights)
    unprefixed = {k.removeprefix("unet."): v for k, v in old.items()}  # unet.save_attn_procs wrote no prefix
    assert lora.convert_lora_state_dict(unprefixed).keys() == weights.keys()
    torch.save(unprefixed, tmp_path / "legacy.bin")
    assert lora.load_lora(tmp_path / "legacy.bin").keys() == weights.keys()

    # an adapter saved with lora_alpha = 2 r: folded into B
    key_b = next(k for k in weights if "lora_B" in k)
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "alpha.safetensors"), metadata=meta)
    assert torch.equal(lora.load_lora(tmp_path / "alpha.safetensors")[key_b], weights[key_b] * 2)

    with pytest.raises(ValueError, match="text encoder"):
        lora.convert_lora_state_dict({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="only lora_A"):
        lora.convert_lora_state_dict({"unet.a.to_q.lora_A.weight": torch.zeros(4, 8)})
    with pytest.raises(ValueError, match="not in a supported format"):
        lora.convert_lora_state_dict({"lora_unet_down_blocks_0.alpha": torch.tensor(1.0)})
    with pytest.raises(FileNotFoundError):
        lora.load_lora(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- cache


def test_train_or_load_lora_cache(tiny: sd.SDComponents, pixels: np.ndarray, tmp_path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    real = lora.train_image_lora
    monkeypatch.setattr(lora, "train_image_lora", lambda *a, **k: (runs.append(1), real(*a, **k))[1])
    cfg = lora.LoRAConfig(rank=2, steps=1, batch_size=1, resolution=64)
    cache = TensorCache("lora", tmp_path)
    first = lora.train_or_load_lora(tiny, pixels, PROMPT, cfg, cache=cache, progress=False)
    assert len(runs) == 1
    as_tensor = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 127.5 - 1  # the engine passes this
    again = lora.train_or_load_lora(tiny, as_tensor, PROMPT, cfg, cache=cache, progress=False)
    disk = lora.train_or_load_lora(tiny, pixels, PROMPT, cfg, cache=TensorCache("lora", tmp_path), progress=False)
    assert len(runs) == 1  # both hits: no training
    for k, v in first.items():
        assert torch.equal(again[k], v) and torch.equal(disk[k], v)
    lora.train_or_load_lora(tiny, pixels, PROMPT, lora.LoRAConfig(rank=2, steps=1, batch_size=1, resolution=64,
                                                                   seed=1), cache=cache, progress=False)
    assert len(runs) == 2  # the seed is part of the key


# ---------------------------------------------------------------------------------------------- compiled blocks


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_training_runs_compiled_blocks_once_per_process(pixels: np.ndarray, aot_eager_compile,
                                                             channels_last: bool) -> None:
    """A fast engine compiles the UNet's blocks; fast LoRA training runs through them (compiling their training
    variants once: a second image's fresh LoRA layers reuse them), reference training runs them eagerly; the
    compiled blocks train the same LoRA as plain ones. Also on a channels-last UNet (a fast engine's layout on
    CUDA), where reference training swaps NCHW weights in and back without costing a recompile."""
    from torch._dynamo.utils import counters

    from dragrt.runtime.engines.dragdiffusion import _compile_blocks

    if sd.assets_dir() is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    cfg = lora.LoRAConfig(rank=4, steps=2, batch_size=2, resolution=64, learning_rate=3e-2)

    def build() -> sd.SDComponents:
        c = sd.build_random_sd15(tiny=True, seed=0)
        c.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return c

    plain = lora.train_image_lora(build(), pixels, PROMPT, cfg, progress=False)  # the same layout, uncompiled
    c = build()
    _compile_blocks(c.unet, "default")

    def graphs() -> int:
        return counters["stats"]["unique_graphs"]

    assert c.unet not in lora._TRAINED_COMPILED  # the progress bar says the first training compiles
    first = lora.train_image_lora(c, pixels, PROMPT, cfg, progress=False)
    assert c.unet in lora._TRAINED_COMPILED
    compiled = graphs()
    assert compiled >= 9  # 4 down, mid, 4 up blocks
    lora.train_image_lora(c, 255 - pixels, PROMPT, cfg, progress=False)
    lora.train_image_lora(c, pixels, PROMPT, cfg, mode="reference", progress=False)
    lora.train_image_lora(c, 255 - pixels, PROMPT, cfg, progress=False)  # after the reference's weight swap
    assert graphs() == compiled
    # AOTAutograd reorders float32 sums; Adam's normalised first steps let that show in single entries
    ups = [k for k in plain if "lora_B" in k]
    num = sum((first[k] - plain[k]).norm() ** 2 for k in ups) ** 0.5
    assert num / sum(plain[k].norm() ** 2 for k in ups) ** 0.5 < 1e-3


def test_a_kept_step_is_keyed_by_the_settings_and_the_weights_where_they_are(tiny: sd.SDComponents) -> None:
    """What decides whether a kept LoRA training step may be replayed (CUDA only; the checks are plain Python):
    the settings that shape it (not the step count or the seed), the attention processors, and every UNet weight
    still being the tensor it was (a layout change replaces them)."""
    emb = inv.encode_prompt(tiny, PROMPT).repeat(CFG.batch_size, 1, 1)
    key = lora._warm_key(tiny, CFG, emb, None, "branch")
    assert key == lora._warm_key(tiny, lora.LoRAConfig(**{**CFG.__dict__, "steps": 9, "seed": 5}), emb, None,
                                 "branch")
    assert key != lora._warm_key(tiny, lora.LoRAConfig(**{**CFG.__dict__, "rank": 8}), emb, None, "branch")
    assert key != lora._warm_key(tiny, CFG, emb, None, "merged")
    assert key != lora._warm_key(tiny, CFG, emb, torch.bfloat16, "branch")
    pipe = sd.build_random_sd15(tiny=True, seed=0)
    kept = lora._Warm(graph=None, loss=torch.zeros(()), params=[], opt=None, scaler=None, mean=emb, std=emb,
                      emb=emb, add_noise=None, key=lora._warm_key(pipe, CFG, emb, None, "branch"),
                      pointers=lora._pointers(pipe.unet))
    assert kept.usable(pipe.unet, kept.key) and not kept.usable(pipe.unet, key + (1,))
    pipe.unet.to(memory_format=torch.channels_last)  # new weight tensors for the 4-D ones
    assert not kept.usable(pipe.unet, kept.key)
    lora._WARM[pipe.unet] = kept
    lora.release_lora_graphs(pipe.unet)
    assert pipe.unet not in lora._WARM
    assert lora._is_square(np.zeros((64, 64, 3), np.uint8), 64) and not lora._is_square(np.zeros((64, 80, 3)), 64)
    assert lora._is_square(np.zeros((128, 128, 3)), 64)  # resized to the crop size: nothing to crop


def test_the_next_training_finds_the_kept_step_usable(tiny, pixels, monkeypatch) -> None:
    """A kept step records the UNet's own weight pointers, taken once the peft layers are stripped, so that the
    next training with the same settings replays it (on the CPU no step is captured: a stand-in is kept here,
    and the CUDA test below checks the replay itself)."""
    lora.release_lora_graphs(tiny.unet)
    empty = dict(graph=None, loss=None, params=[], opt=None, scaler=None, mean=None, std=None, emb=None,
                 add_noise=None)
    monkeypatch.setattr(lora, "_train_fast", lambda *a, **k: lora._Warm(**empty) if k["keep"] else None)
    replays = []
    monkeypatch.setattr(lora, "_train_warm", lambda warm, *a: replays.append(warm) or {})
    cfg = lora.LoRAConfig(rank=4, steps=1, batch_size=1, resolution=64)
    lora.train_image_lora(tiny, pixels, PROMPT, cfg, progress=False)
    kept = lora._WARM[tiny.unet]
    assert kept.pointers == lora._pointers(tiny.unet) and kept.paths
    lora.train_image_lora(tiny, pixels, PROMPT, cfg, progress=False)
    assert replays == [kept]
    lora.train_image_lora(tiny, pixels, PROMPT, cfg, progress=False, reuse_graph=False)
    assert replays == [kept] and tiny.unet not in lora._WARM
    lora.release_lora_graphs(tiny.unet)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_a_kept_training_step_trains_as_a_fresh_capture(pixels: np.ndarray, monkeypatch) -> None:
    """reuse_graph: the second training on a UNet replays the first one's captured step from its first step (no
    peft layers made, no eager step, no capture), for another image and prompt too, and trains what a fresh
    capture trains; a UNet whose weights moved (channels-last) captures anew; release frees it."""
    if sd.assets_dir() is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    c = sd.build_random_sd15(torch.float16, "cuda", tiny=True, seed=0)
    cfg = lora.LoRAConfig(rank=4, steps=6, batch_size=2, resolution=64, learning_rate=3e-2)
    other = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    injected = []
    inject = lora._inject
    monkeypatch.setattr(lora, "_inject", lambda *a, **k: (injected.append(1), inject(*a, **k))[1])

    def train(image, prompt=PROMPT, **kw):
        losses = []
        w = lora.train_image_lora(c, image, prompt, cfg, progress=False,
                                  callback=lambda step, loss: losses.append(float(loss)), **kw)
        return w, losses

    def close(a, b) -> None:
        (wa, la), (wb, lb) = a, b
        np.testing.assert_allclose(la, lb, rtol=2e-2)
        ups = [k for k in wa if "lora_B" in k]
        num = sum((wa[k] - wb[k]).norm() ** 2 for k in ups) ** 0.5
        den = sum(wb[k].norm() ** 2 for k in ups) ** 0.5
        assert den > 0 and num / den < 2e-2

    fresh = train(pixels, reuse_graph=False)
    assert c.unet not in lora._WARM and len(injected) == 1
    train(pixels)  # captures and keeps
    assert c.unet in lora._WARM and len(injected) == 2
    again = train(pixels)  # replays the kept step
    assert len(injected) == 2 and len(again[1]) == cfg.steps
    close(again, fresh)
    kept_other = train(other, "a photo of a dog")
    assert len(injected) == 2
    close(kept_other, train(other, "a photo of a dog", reuse_graph=False))  # (a fresh capture, dropping the kept)
    assert c.unet not in lora._WARM
    train(pixels)
    c.unet.to(memory_format=torch.channels_last)
    train(pixels)
    assert len(injected) == 5  # the moved weights made it capture anew
    lora.release_lora_graphs(c.unet)
    assert c.unet not in lora._WARM


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, channels_last, lora_forward", [
    (torch.float16, False, "branch"), (torch.bfloat16, False, "branch"), (torch.float16, True, "branch"),
    (torch.float16, True, "merged")])
def test_captured_training_step_trains_the_same_lora_as_the_eager_one(pixels: np.ndarray, dtype,
                                                                       channels_last: bool, lora_forward: str) -> None:
    """Fast mode on CUDA: step 1 eager, then one captured CUDA graph (forward, backward, GradScaler for fp16,
    fused AdamW) replayed. Same draws from the same generator stream: the same losses and weights as eager fast
    steps, up to GPU rounding; and the UNet comes back untouched. Also on a channels-last UNet (what a fast
    DragDiffusion engine makes of the shared pipeline on CUDA), and with the merged LoRA forward (its eager steps
    against peft's too)."""
    if sd.assets_dir() is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    c = sd.build_random_sd15(dtype, "cuda", tiny=True, seed=0)
    if channels_last:
        c.unet.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    cfg = lora.LoRAConfig(rank=4, steps=6, batch_size=2, resolution=64, learning_rate=3e-2)
    out = {}
    for graph in (False, True):
        losses = []
        w = lora.train_image_lora(c, pixels, PROMPT, cfg, progress=False, cuda_graph=graph, lora_forward=lora_forward,
                                  callback=lambda step, loss, losses=losses: losses.append(float(loss)))
        out[graph] = (w, losses)
    if lora_forward != "branch":
        losses = []
        lora.train_image_lora(c, pixels, PROMPT, cfg, progress=False, cuda_graph=False,
                              callback=lambda step, loss: losses.append(float(loss)))
        np.testing.assert_allclose(out[False][1], losses, rtol=2e-2)
    (w_eager, l_eager), (w_graph, l_graph) = out[False], out[True]
    assert len(l_graph) == cfg.steps and l_graph[0] == l_eager[0]  # step 1 runs eagerly in both
    # a different random stream would give losses apart by tens of percent; rounding gives far less
    np.testing.assert_allclose(l_graph, l_eager, rtol=2e-2)
    assert w_graph.keys() == w_eager.keys()
    ups = [k for k in w_eager if "lora_B" in k]  # zero at the start: all of it is what training did
    num = sum((w_graph[k] - w_eager[k]).norm() ** 2 for k in ups) ** 0.5
    den = sum(w_eager[k].norm() ** 2 for k in ups) ** 0.5
    assert den > 0 and num / den < 2e-2
    after = c.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert bool(non_nchw_weights(c.unet)) == channels_last  # the layout it came in
