"""The demo drags for real: the handles move toward their targets and the files are written."""

from __future__ import annotations

import json

import torch
from PIL import Image

from dragrt.kernels import use_kernels
from dragrt.runtime import demo


def test_demo_moves_handles_toward_targets(tmp_path) -> None:
    rec = demo.run_demo(tmp_path, size=96, max_steps=60, progress=False, device="cpu")
    for name in ("before.png", "after.png", "drag.gif", "edit.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert Image.open(tmp_path / "after.png").size == (96, 96)
    saved = json.loads((tmp_path / "edit.json").read_text())
    assert saved["steps"] == rec["steps"] and "procedural" in saved["what"]
    start = torch.tensor(rec["handle_points"])
    end = torch.tensor(rec["final_points"])
    target = torch.tensor(rec["target_points"])
    before = (target - start).norm(dim=1)
    after = (target - end).norm(dim=1)
    assert (after < before - 5).all(), (before, after)


def test_disc_renderer_gradient_reaches_the_latent() -> None:
    gen = demo.DiscRenderer(size=64, n_discs=5, seed=1)
    w = gen.init_centres.clone().requires_grad_(True)
    gen(w).mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_demo_same_result_with_triton_kernels(tmp_path, device) -> None:
    """The demo's loop through the Triton kernels (the interpreter on a CPU) tracks the same points."""
    with use_kernels("reference"):
        a = demo.run_demo(tmp_path / "a", size=64, max_steps=3, progress=False, device=str(device))
    with use_kernels("triton"):
        b = demo.run_demo(tmp_path / "b", size=64, max_steps=3, progress=False, device=str(device))
    assert a["final_points"] == b["final_points"]


def test_stylegan2_random_demo_runs_the_engine(tmp_path, monkeypatch) -> None:
    """--model stylegan2-random: the DragGAN engine through an EditSession, files written, handles tracked.
    A full 256 px config-f generator is too slow for CI on 2 cores, so the preset is swapped for a small
    one here; the code path is the same."""
    from dragrt.runtime.models import stylegan2

    small = stylegan2.GeneratorConfig(img_resolution=256, z_dim=32, w_dim=32,
                                      mapping=stylegan2.MappingConfig(num_layers=2),
                                      synthesis=stylegan2.SynthesisConfig(channel_base=512, channel_max=16))
    monkeypatch.setattr(stylegan2, "stylegan2_config", lambda res: small)
    rec = demo.run_stylegan2_random(tmp_path, max_steps=3, progress=False, device="cpu")
    for name in ("before.png", "after.png", "drag.gif", "edit.json", "edit.png", "edit_w.safetensors"):
        assert (tmp_path / name).stat().st_size > 0
    assert rec["steps"] == 3 and len(rec["final_points"]) == 2
    assert "RANDOM weights" in rec["what"]


def test_draggan_demo_defaults_to_the_zoo_stylegan2_once_installed(tmp_path, monkeypatch, capsys) -> None:
    """With zoo:faces-stylegan2 installed, `dragrt demo` drags it: the landmark regressor's mouth corners are the
    handles, targets a wider smile, and the regressor measures the result (demo.json). Without it: the discs. A
    small random generator written in the zoo's format stands in for the trained one (the code path is the same)."""
    import shutil

    from dragrt import cli
    from dragrt.runtime.models import stylegan2
    from dragrt.runtime.models.stylegan2_convert import write_generator
    from dragrt.zoo import registry

    shipped_landmarks = registry.resolve("zoo:faces-landmarks")
    weights = tmp_path / "weights"
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)
    shutil.copytree(shipped_landmarks, weights / "faces-landmarks")
    assert demo.default_draggan_model() == "discs"
    cfg = stylegan2.GeneratorConfig(img_resolution=128, z_dim=32, w_dim=32,
                                    mapping=stylegan2.MappingConfig(num_layers=2),
                                    synthesis=stylegan2.SynthesisConfig(channel_base=512, channel_max=16))
    torch.manual_seed(0)
    G = stylegan2.Generator.from_config(cfg)
    write_generator(G.state_dict(), cfg, weights / "faces-stylegan2" / "generator", source={"format": "dragrt-zoo"})
    assert demo.default_draggan_model() == "zoo:faces-stylegan2"

    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert "DragGAN on zoo:faces-stylegan2" in capsys.readouterr().out
    rec = json.loads((out / "demo.json").read_text())
    for name in ("before.png", "after.png", "drag.gif", "edit.json", "edit_w.safetensors"):
        assert (out / name).stat().st_size > 0
    assert rec["steps"] == 3 and len(rec["handle_points"]) == 2 and rec["model"] == "zoo:faces-stylegan2"
    # DragGAN's radii at 128 px are 1 and 3 px; the demo keeps those of 256 px, and draws the images at 256
    assert rec["resolution"] == 128 and rec["radii_px"] == [2, 6]
    assert Image.open(out / "after.png").size == (256, 256)
    for (hx, hy), (x, y) in zip(rec["handle_points"], rec["mouth_corners_measured_before"]):
        assert (hx, hy) == (min(max(round(x), 0), 127), min(max(round(y), 0), 127))  # handles = detected corners
    (t0x, t0y), (t1x, t1y) = rec["target_points"]
    assert t0x <= rec["handle_points"][0][0] and t1x >= rec["handle_points"][1][0]  # outwards
    assert t0y <= rec["handle_points"][0][1] and t1y <= rec["handle_points"][1][1]  # and up
    assert rec["feature_resolution"] == 64  # half the image, as DragGAN's b128 is at 256 px
    # The engine's settings can be chosen (bench/tools/drag_seeds.py compares them): the reference's index 5 (the top
    # block at 128 px) and its own 3 px window
    from dragrt.runtime.engines.draggan import DragGANConfig

    rec = demo.run_stylegan2_zoo(tmp_path / "b128", seed=rec["seed"], max_steps=1, device="cpu", progress=False,
                                 config=DragGANConfig(feature_resolution=128, r2=12))
    assert rec["feature_resolution"] == 128 and rec["radii_px"] == [2, 3] and rec["steps"] == 1
    measured = torch.tensor(rec["mouth_corners_measured_after"])
    expected = (measured - torch.tensor(rec["target_points"], dtype=torch.float32)).norm(dim=1)
    torch.testing.assert_close(torch.tensor(rec["measured_error_to_targets_px"]), expected, rtol=1e-5, atol=1e-4)


def test_the_demos_measure_the_smile_with_the_zoo_reader(monkeypatch, tmp_path) -> None:
    """The zoo demos report the smile before and after the drag as the attribute reader measures it: on renders
    of one face at smile 0.1 and 0.9 it reads about those values; without the detail model it reports nothing
    (the attribute model alone reads smile at chance)."""
    import pytest

    from dragrt.zoo import registry, world

    if not {"faces-attributes", "faces-landmarks", "faces-attribute-details"} <= set(registry.available()):
        pytest.skip("the zoo's attribute reader is not installed")
    params = world.sample_params(world.held_out_seeds(1, start=7)[0])
    faces = [Image.fromarray(world.render(params.replace(smile=s)).image) for s in (0.1, 0.9)]
    low, high = demo._measured_smile(faces)
    assert abs(low - 0.1) < 0.1 and abs(high - 0.9) < 0.1
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    assert demo._measured_smile(faces) is None
