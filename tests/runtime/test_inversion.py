"""DDIM inversion as DragDiffusion runs it, on the tiny random SD (CPU, float32).

The published arithmetic (drag_pipeline.py ``inv_step`` / ``step``) is written out once more in this file, by
hand, as the oracle for ``mode="reference"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dragrt.runtime import inversion as inv
from dragrt.runtime.cache import TensorCache
from dragrt.runtime.models import sd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = inv.InversionConfig(num_inference_steps=10, strength=0.5)  # 5 inversion steps: t = 401


@pytest.fixture(scope="module")
def tiny() -> sd.SDComponents:
    if sd.assets_dir() is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    return sd.build_random_sd15(tiny=True, seed=0)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def encoded(tiny: sd.SDComponents, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return inv.encode_image(tiny, pixels), inv.encode_prompt(tiny, "a photo of a cat")


def _published_inversion(components: sd.SDComponents, x: torch.Tensor, emb: torch.Tensor, steps: int,
                         n_actual: int) -> list[torch.Tensor]:
    """DragPipeline.invert (guidance 1) + inv_step, transcribed: the oracle."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    latents = [x]
    with torch.no_grad():
        for i, t in enumerate(reversed(scheduler.timesteps)):
            if i >= n_actual:
                continue
            eps = components.unet(x, t, encoder_hidden_states=emb).sample
            next_step = t
            timestep = min(t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps, 999)
            alpha_t = scheduler.alphas_cumprod[timestep] if timestep >= 0 else scheduler.final_alpha_cumprod
            alpha_next = scheduler.alphas_cumprod[next_step]
            beta_t = 1 - alpha_t
            pred_x0 = (x - beta_t**0.5 * eps) / alpha_t**0.5
            pred_dir = (1 - alpha_next) ** 0.5 * eps
            x = alpha_next**0.5 * pred_x0 + pred_dir
            latents.append(x)
    return latents


# ---------------------------------------------------------------------------------------------- schedule


def test_default_config_inverts_35_steps_to_t_681(tiny: sd.SDComponents) -> None:
    cfg = inv.InversionConfig()
    assert (cfg.num_inference_steps, cfg.strength, cfg.guidance_scale) == (50, 0.7, 1.0)
    assert cfg.num_actual_steps == 35 and cfg.start_index == 15
    seen = []

    def stub(latent, t, emb):  # records what the UNet would be called with; cheap
        seen.append(int(t))
        return torch.zeros_like(latent)

    x = torch.randn(1, 4, 8, 8)
    emb = torch.zeros(1, 77, 32)
    for mode in ("reference", "fast"):
        seen.clear()
        res = inv.ddim_invert(tiny, x, emb, cfg, mode=mode, unet_fn=stub)
        assert res.t == 681
        assert seen == list(range(1, 682, 20)) == list(res.inversion_timesteps)
        assert res.denoise_timesteps == tuple(range(681, 0, -20)) and len(res.denoise_timesteps) == 35
    sched = inv.ddim_schedule(tiny.scheduler, 50)
    assert sched.timesteps[15] == 681 and sched.timesteps[0] == 981 and sched.timesteps[-1] == 1


def test_config_validation() -> None:
    for kwargs, field in [({"num_inference_steps": 0}, "num_inference_steps"), ({"strength": 0.0}, "strength"),
                          ({"strength": 1.5}, "strength"), ({"guidance_scale": 0.5}, "guidance_scale"),
                          ({"guidance_scale": float("nan")}, "guidance_scale"),
                          ({"num_inference_steps": 2, "strength": 0.2}, "rounds to 0")]:
        with pytest.raises(ValueError, match=field):
            inv.InversionConfig(**kwargs)
    assert inv.InversionConfig(num_inference_steps=50, strength=0.25).num_actual_steps == 12  # round half even


def test_ddim_step_matches_dragpipeline_and_diffusers(tiny: sd.SDComponents) -> None:
    from diffusers import DDIMScheduler

    sched = inv.ddim_schedule(tiny.scheduler, 50)
    ref = DDIMScheduler.from_config(tiny.scheduler.config)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in (681, 21, 1):
        ours = inv.ddim_step(sched, eps, t, x)
        # DragPipeline.step, transcribed
        prev = t - 1000 // 50
        a_t = ref.alphas_cumprod[t]
        a_p = ref.alphas_cumprod[prev] if prev > 0 else ref.final_alpha_cumprod
        published = a_p**0.5 * ((x - (1 - a_t) ** 0.5 * eps) / a_t**0.5) + (1 - a_p) ** 0.5 * eps
        assert torch.equal(ours, published)
        # diffusers' step (the reference's final denoise) agrees
        torch.testing.assert_close(ours, ref.step(eps, t, x, eta=0.0).prev_sample, rtol=0, atol=1e-6)
        a, b = inv.ddim_step_coefficients(tiny.scheduler, t, 50)
        torch.testing.assert_close(a * x + b * eps, ours, rtol=0, atol=2e-6)
        torch.testing.assert_close(inv.ddim_step_coefficients(sched, t).apply(x, eps), ours, rtol=0, atol=2e-6)
    # gradients flow through the plain function (the drag loop's regulariser needs them)
    xg = x.clone().requires_grad_(True)
    inv.ddim_step(sched, eps, 681, xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.full_like(x, inv.ddim_step_coefficients(sched, 681).a))


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_image_posterior_mean_and_input_kinds(tiny: sd.SDComponents, pixels: np.ndarray) -> None:
    x = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        expected = tiny.vae.encode(x).latent_dist.mean * 0.18215
    for image in (pixels, Image.fromarray(pixels), x):
        latent = inv.encode_image(tiny, image)
        assert latent.shape == (1, 4, 8, 8)
        assert torch.equal(latent, expected)
    with pytest.raises(ValueError, match="multiples of 8"):
        inv.encode_image(tiny, pixels[:60])
    with pytest.raises(ValueError, match="uint8"):
        inv.encode_image(tiny, pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inv.encode_image(tiny, x * 3)


def test_encode_prompt(tiny: sd.SDComponents) -> None:
    emb = inv.encode_prompt(tiny, "a photo of a cat")
    ids = tiny.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(emb, tiny.text_encoder(ids)[0])
    assert emb.shape == (1, 77, 32)
    assert inv.encode_prompt(tiny, "word " * 200).shape == (1, 77, 32)  # truncated, not an error
    with pytest.raises(ValueError, match="prompt"):
        inv.encode_prompt(tiny, None)


# ---------------------------------------------------------------------------------------------- inversion


def test_reference_mode_is_the_published_loop(tiny: sd.SDComponents, encoded) -> None:
    x0, emb = encoded
    res = inv.ddim_invert(tiny, x0, emb, SMALL, mode="reference", return_intermediates=True)
    oracle = _published_inversion(tiny, x0, emb, 10, 5)
    assert res.t == 401 and len(res.latents) == 6
    for ours, published in zip(res.latents, oracle):
        assert torch.equal(ours, published)
    assert torch.equal(res.z_t, oracle[-1])


def test_fast_mode_equals_reference_in_float32(tiny: sd.SDComponents, encoded) -> None:
    x0, emb = encoded
    ref = inv.ddim_invert(tiny, x0, emb, SMALL, mode="reference", return_intermediates=True)
    fast = inv.ddim_invert(tiny, x0, emb, SMALL, mode="fast", return_intermediates=True)
    for a, b in zip(ref.latents, fast.latents):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not fast.z_t.is_inference()
    fast.z_t.requires_grad_(True)  # the drag optimises it: must be a normal tensor


def test_inversion_then_denoise_reconstructs(tiny: sd.SDComponents, encoded) -> None:
    x0, emb = encoded

    def denoise(z, res, fn):
        sched = inv.ddim_schedule(tiny.scheduler, res.config.num_inference_steps)
        for t in res.denoise_timesteps:
            z = inv.ddim_step(sched, fn(z, torch.tensor(t), emb), t, z)
        return z

    # eps independent of x (but not of t): inversion and denoise are exact inverses when the steps line up.
    def t_only(x, t, e):
        return tiny.unet(torch.zeros_like(x), t, encoder_hidden_states=e).sample

    with torch.no_grad():
        res = inv.ddim_invert(tiny, x0, emb, SMALL, mode="reference", unet_fn=t_only)
        torch.testing.assert_close(denoise(res.z_t, res, t_only), x0, rtol=0, atol=1e-5)

        # a smooth noise predictor (the real network, damped): the usual DDIM-inversion approximation
        def damped(x, t, e):
            return 0.02 * tiny.unet(x, t, encoder_hidden_states=e).sample

        cfg = inv.InversionConfig(num_inference_steps=20, strength=0.7)
        res = inv.ddim_invert(tiny, x0, emb, cfg, mode="fast", unet_fn=damped)
        err = (denoise(res.z_t, res, damped) - x0).abs().max()
        assert err < 0.05 * x0.abs().max()


def test_guidance(tiny: sd.SDComponents, encoded) -> None:
    x0, emb = encoded
    plain = inv.ddim_invert(tiny, x0, emb, SMALL, mode="fast")
    cfg = inv.InversionConfig(num_inference_steps=10, strength=0.5, guidance_scale=3.0)
    guided = inv.ddim_invert(tiny, x0, emb, cfg, mode="fast")
    assert (guided.z_t - plain.z_t).abs().max() > 1e-3
    # with uncond == cond, u + g (c - u) = c: guidance changes nothing
    same = inv.ddim_invert(tiny, x0, emb, cfg, mode="reference", uncond_embeddings=emb)
    torch.testing.assert_close(same.z_t, plain.z_t, rtol=1e-5, atol=1e-5)


def test_invert_image_cache(tiny: sd.SDComponents, pixels: np.ndarray, tmp_path) -> None:
    calls = []
    handle = tiny.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        cache = TensorCache("inversion", tmp_path)
        first = inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache)
        assert len(calls) == 5 and not first.from_cache and first.cache_key
        again = inv.invert_image(tiny, Image.fromarray(pixels), "a cat", SMALL, cache=cache)  # same pixels
        assert len(calls) == 5 and again.from_cache and again.cache_key == first.cache_key
        assert torch.equal(again.z_t, first.z_t) and again.t == first.t == 401
        assert again.denoise_timesteps == first.denoise_timesteps
        disk = inv.invert_image(tiny, pixels, "a cat", SMALL, cache=TensorCache("inversion", tmp_path))
        assert len(calls) == 5 and disk.from_cache and torch.equal(disk.z_t, first.z_t)
        assert torch.equal(disk.x0, inv.encode_image(tiny, pixels))

        one_pixel = pixels.copy()
        one_pixel[10, 20, 1] ^= 1
        keys = {first.cache_key}
        for kwargs in ({"image": one_pixel}, {"prompt": "a dog"}, {"lora_fingerprint": "abc"},
                       {"config": inv.InversionConfig(num_inference_steps=10, strength=0.6)}, {"mode": "reference"}):
            args = {"image": pixels, "prompt": "a cat", "config": SMALL, **kwargs}
            res = inv.invert_image(tiny, args.pop("image"), args.pop("prompt"), args.pop("config"), cache=cache,
                                   **args)
            assert not res.from_cache
            keys.add(res.cache_key)
        assert len(keys) == 6
        traj = inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache, return_intermediates=True)
        assert not traj.from_cache and len(traj.latents) == 6  # the cached entry had no trajectory
        assert inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache, return_intermediates=True).from_cache
    finally:
        handle.remove()


def test_model_change_changes_the_key(tiny: sd.SDComponents, pixels: np.ndarray) -> None:
    cache = TensorCache("inversion")
    first = inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache)
    w = tiny.unet.conv_out.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[0, 0, 0, 0] += 1e-3
    try:
        assert inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache).cache_key != first.cache_key
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert inv.invert_image(tiny, pixels, "a cat", SMALL, cache=cache).from_cache
