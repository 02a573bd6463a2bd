"""The measuring helpers of bench/tools (the VAE and attribute-ceiling studies) against what they must compute."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "tools"))
import attribute_ceilings as ceil  # noqa: E402
import compare_generators as compare  # noqa: E402
import drag_seeds  # noqa: E402
import fir_variants as fir  # noqa: E402
import negative_extras  # noqa: E402
import vae_decoder_bound as bound  # noqa: E402
import vae_psnr_by_attribute  # noqa: E402


def test_gaussian_blur_is_a_normalised_gaussian_and_down_up_keeps_flat_images() -> None:
    impulse = torch.zeros(1, 2, 15, 15)
    impulse[:, :, 7, 7] = 1.0
    out = ceil.gaussian_blur(impulse, 1.0)
    t = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-t**2 / 2)
    g = g / g.sum()
    torch.testing.assert_close(out[0, 1, 4:11, 4:11], g[:, None] * g[None, :])
    assert abs(out.sum().item() - 2.0) < 1e-5  # two channels, each summing to 1
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(ceil.gaussian_blur(flat, 2.0), flat)
    torch.testing.assert_close(ceil.down_up(flat, 4), flat)
    assert ceil.down_up(torch.rand(2, 3, 16, 16), 2).shape == (2, 3, 16, 16)


def test_optimised_latents_start_at_the_encoder_and_fit_the_decoder_better() -> None:
    from dragrt.zoo import vae as zvae

    torch.manual_seed(0)
    vae = zvae.build_vae(zvae.SMOKE_CONFIG).eval().requires_grad_(False)
    images = (torch.rand(2, 3, 32, 32) * 255).to(torch.uint8)
    target = images.float() / 127.5 - 1
    seen = list(bound.optimise_latents(vae, images, steps=30, lr=0.05, every=10))
    assert [s for s, _ in seen] == [0, 10, 20, 30]
    torch.testing.assert_close(seen[0][1], zvae.posterior_means(vae, images))

    def mse(z: torch.Tensor) -> float:
        with torch.no_grad():
            return (vae.decode(z).sample - target).square().mean().item()

    assert mse(seen[-1][1]) < 0.9 * mse(seen[0][1])
    report = bound.decoder_bound(vae, images, steps=30, lr=0.05)
    assert report["optimised"][-1]["mean"] > report["encoder_latents_mean"]


def test_compare_generators_loads_an_export_as_its_cards_metrics_see_it() -> None:
    """The shipped generator, as the cards' evaluation builds it: its EMA weights and its training configuration."""
    from dragrt.runtime.models import stylegan2_convert as conv
    from dragrt.zoo import training

    gen, cfg = compare.load_export("zoo:faces-stylegan2")
    shipped = conv.load_generator(training.resolve_zoo_path("zoo:faces-stylegan2", "init")).float().eval()
    assert cfg.resolution == shipped.img_resolution == 128 and not gen.training
    z = torch.randn(2, cfg.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gen(z, None, noise_mode="const"), shipped(z, None, noise_mode="const"))


def test_fir_variants_record_the_depthwise_filters_and_compute_what_they_compute() -> None:
    """The recorded calls are the FIR filters of G and D (4 x 4, one per channel); every variant gives the
    reference's output and input gradient."""
    from dragrt.runtime.models import stylegan2 as sg2
    from dragrt.zoo import stylegan2_train as st

    torch.testing.assert_close(torch.outer(fir.binomial_factor(4, torch.device("cpu")),
                                           fir.binomial_factor(4, torch.device("cpu"))), sg2.setup_filter([1, 3, 3, 1]))
    cfg = st.TrainConfig.preset(32, smoke=True)
    calls = fir.record_depthwise_calls(cfg, torch.device("cpu"), 4)
    assert calls and all(w[1:] == (1, 4, 4) and x[1] == w[0] for (x, w, *_), n in calls.items())
    assert {stride for (_, _, stride, _, _) in calls} == {(1, 1), (2, 2)}  # G's blurs and D's downsampling skips
    rows = fir.compare(calls, torch.device("cpu"))
    assert [r["variant"] for r in rows] == list(fir.VARIANTS)
    assert all(r["max_rel_diff"] < 1e-5 and r["ms_per_pass"] > 0 for r in rows)


def test_drag_seeds_parses_seed_ranges_and_sums_up_the_corners() -> None:
    import pytest

    assert drag_seeds.seed_list("0-3") == [0, 1, 2, 3] and drag_seeds.seed_list("5,2") == [5, 2]
    for bad in ("", "3-1", "a", "-1,2"):
        with pytest.raises(ValueError, match="--seeds .* is not allowed; use A-B or A,B,C"):
            drag_seeds.seed_list(bad)
    rows = [{"distance_before_px": [7.0, 7.0], "distance_after_px": [4.0, 8.0]},
            {"distance_before_px": [8.0, 6.0], "distance_after_px": [5.0, 5.0]}]
    assert drag_seeds.summarise(rows) == {"seeds": 2, "mean_distance_before_px": 7.0, "mean_distance_after_px": 5.5,
                                          "corners_closer": 3, "corners": 4}


def test_negative_extras_names_what_each_caption_leaves_out_and_counts_extras_drawn_anyway() -> None:
    from dragrt.zoo import world

    start = 1_000_000
    prompts = negative_extras.negative_prompts(6, start)
    for seed, prompt in zip(world.held_out_seeds(6, start), prompts):
        assert prompt == ", ".join(world.unnamed_extras(world.sample_params(seed)))
    # confusion[name][asked][read], class 0 "none": asked none 5 times, read as some extra twice
    confusion = {name: [[0] * len(world.CATEGORICAL[name]) for _ in world.CATEGORICAL[name]]
                 for name in world.CATEGORICAL}
    confusion["beard"][0] = [3, 1, 1, 0]
    confusion["beard"][2] = [4, 0, 6, 0]  # asked a goatee: not counted
    confusion["glasses"][0] = [7, 0, 0]
    assert negative_extras.false_extras(confusion) == {"glasses": [7, 0], "hat": [0, 0], "beard": [5, 2]}


def test_vae_psnr_by_attribute_groups_each_image_under_its_classes() -> None:
    import numpy as np

    from dragrt.zoo import world

    params = [world.sample_params(0).replace(glasses="none", hat="cap"),
              world.sample_params(1).replace(glasses="round", hat="cap"),
              world.sample_params(2).replace(glasses="round", hat="none")]
    table = vae_psnr_by_attribute.by_attribute(np.array([30.0, 20.0, 25.0]), params)
    assert list(table) == list(world.CATEGORICAL_NAMES)
    assert table["glasses"] == {"none": [1, 30.0], "round": [2, 22.5]}  # classes absent here are left out
    assert table["hat"] == {"none": [1, 25.0], "cap": [2, 25.0]}  # in the renderer's class order
    assert all(sum(n for n, _ in groups.values()) == 3 for groups in table.values())
