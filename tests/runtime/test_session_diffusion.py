"""EditSession with the DragDiffusion engine on a tiny random SD1.5 (CPU): from_image, runs, previews, undo/redo,
export/open, bad input and busy errors. The DragGAN side is tests/runtime/test_session.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine
from dragrt.runtime.models.preview import PreviewDecoder
from dragrt.runtime.models.sd import assets_dir, build_random_sd15
from dragrt.runtime.session import EditSession, SessionBusyError, model_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUNTIME = RuntimeConfig(device="cpu", compile_mode="none")
# The tiny UNet has 10 transformer blocks (the reference's start_layer 10 of SD's 16 would leave none mutual); a
# 10-step schedule inverted halfway keeps the inversion and the final denoise at 5 UNet calls each.
CONFIG = DragDiffusionConfig(max_steps=3, start_layer=4, num_inference_steps=10, inversion_strength=0.5,
                             max_handles=2, cuda_graph=False, compile=False)
PROMPT = "a cartoon face"
# Even pixels map to whole cells of the half-resolution grid, so handles come back unchanged before tracking.
HANDLES = [[40, 60], [90, 30]]
TARGETS = [[70, 60], [90, 70]]


@pytest.fixture(scope="module")
def sd():
    return build_random_sd15(tiny=True)


@pytest.fixture(scope="module")
def source() -> Image.Image:
    """128x128 RGB: smooth colour ramps plus a disc, so the features have something to track."""
    y, x = np.mgrid[0:128, 0:128].astype(np.float32) / 127
    disc = ((x - 0.35) ** 2 + (y - 0.45) ** 2 < 0.04).astype(np.float32)
    rgb = np.stack([x, y, 0.5 * (1 - x) + 0.5 * disc], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def new_session(sd, source, **kwargs) -> EditSession:
    return EditSession.from_image(sd, source, PROMPT, config=CONFIG, runtime=RUNTIME, **kwargs)


def with_points(s: EditSession) -> EditSession:
    for h, t in zip(HANDLES, TARGETS):
        s.add_point(h, t)
    return s


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def full_state(s: EditSession) -> dict:
    """The public view plus (privately) the snapshot object, both histories and the next point id."""
    return {"points": s.points, "mask": s.mask, "latent": s.latent(), "runs": s.runs, "running": s.running,
            "state": s._state, "undo": list(s._undo), "redo": list(s._redo), "next_id": s._next_id}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["state"] is b["state"], "the state snapshot was replaced"
    for key in ("undo", "redo"):
        assert len(a[key]) == len(b[key]) and all(p is q for p, q in zip(a[key], b[key])), f"{key} history changed"
    assert torch.equal(a["latent"], b["latent"])
    assert (a["mask"] is None) == (b["mask"] is None) and (a["mask"] is None or torch.equal(a["mask"], b["mask"]))
    for key in ("points", "runs", "running", "next_id"):
        assert a[key] == b[key], key


# --- opening ------------------------------------------------------------------------------------------------------


def test_from_image_starts_at_the_inverted_latent(sd, source) -> None:
    s = new_session(sd, source)
    assert s.method == "dragdiffusion" and s.prompt == PROMPT and s.seed is None
    assert s.size == (128, 128) and s.points == [] and s.mask is None and s.runs == [] and not s.can_undo
    assert s.config == CONFIG and s.model_id == "random-tiny" and s.preview_method == "auto"
    z = s.latent()
    assert z.shape == (1, 4, 16, 16) and z.dtype == torch.float32
    assert torch.equal(z, s._engine.prepared.z_t)
    image = s.image()  # the full denoise of the (unedited) latent
    assert image.mode == "RGB" and image.size == (128, 128)
    assert np.array_equal(pixels(image), pixels(s.image()))


# --- runs ---------------------------------------------------------------------------------------------------------


def test_run_yields_events_commits_the_latent_and_undoes_as_one_change(sd, source) -> None:
    s = with_points(new_session(sd, source))
    z0, points0 = s.latent(), s.points
    events = list(s.run(max_steps=3, preview_every=2, preview_size=48))

    assert [e.step for e in events] == [0, 1, 2] and not any(e.done for e in events)
    assert all(e.max_steps == 3 and set(e.handles) == {1, 2} == set(e.distances) for e in events)
    assert all(np.isfinite(e.loss) and e.ms >= 0 for e in events)
    assert events[0].handles == {1: [40.0, 60.0], 2: [90.0, 30.0]}  # the reference tracks from the second step on
    assert events[0].distances == pytest.approx({1: 30.0, 2: 40.0})
    assert [e.step for e in events if e.preview is not None] == [1]
    assert events[1].preview.size == (48, 48) and events[1].preview.mode == "RGB"

    # The optimised z_t and the tracked handles are committed; targets stay.
    assert not torch.equal(s.latent(), z0) and torch.equal(s.latent(), s._engine.latent())
    assert [p["handle"] for p in s.points] == [events[-1].handles[1], events[-1].handles[2]]
    assert [p["target"] for p in s.points] == [[70.0, 60.0], [90.0, 70.0]]
    (run,) = s.runs
    assert run["steps"] == 3 and not run["done"] and not run["stopped"] and run["points"] == points0
    z1 = s.latent()

    assert s.undo() and torch.equal(s.latent(), z0) and s.points == points0 and s.runs == []
    assert s.redo() and torch.equal(s.latent(), z1) and s.runs == [run]

    # A second run starts from the committed latent and handles.
    second = list(s.run(max_steps=2))
    assert second[0].handles == events[-1].handles
    assert [r["steps"] for r in s.runs] == [3, 2]
    assert not torch.equal(s.latent(), z1)


def test_a_handle_on_the_last_pixel_stays_in_the_image(sd, source) -> None:
    # x = 127 of 128 rounds to the half-resolution grid's 64 (one past it); the engine clamps to cell 63 = pixel 126.
    s = new_session(sd, source)
    s.add_point([127, 127], [100, 100])
    list(s.run(max_steps=1))
    assert s._engine.handles == [[126.0, 126.0]] and s.points[0]["handle"] == [126.0, 126.0]
    assert len(list(s.run(max_steps=1))) == 1  # and a second run starts from it


@pytest.mark.parametrize("method", ["auto", "vae", "latent2rgb", "taesd"])
def test_previews_are_rgb_images_of_the_requested_size(sd, source, method) -> None:
    if method == "taesd" and (assets_dir() is None or not (assets_dir() / "taesd_decoder.safetensors").is_file()):
        pytest.skip("the TAESD weights are not in the assets folder")
    s = with_points(new_session(sd, source, preview_method=method))
    decoder = s._backend.decoder
    if method in ("auto", "vae"):  # the tiny VAE is far below the size where auto switches to a cheap decoder
        assert decoder is None
    else:
        assert isinstance(decoder, PreviewDecoder) and decoder.method == method
    assert s.preview_method == method
    big, small = [next(s.run(max_steps=1, preview_every=1, preview_size=size)).preview for size in (500, 50)]
    assert big.mode == small.mode == "RGB"
    assert big.size == (128, 128)  # previews are only ever downscaled
    assert small.size == (50, 50)


def test_a_run_with_a_mask_uses_it(sd, source) -> None:
    s = with_points(new_session(sd, source))
    free = np.zeros((128, 128), dtype=bool)
    free[:, :100] = True
    s.set_mask(free)
    events = list(s.run(max_steps=2))
    assert len(events) == 2 and s.runs[0]["mask"] is True
    assert s._engine._fast.keep is not None  # the x_{t-1} term outside the mask is on


# --- validation and busy errors -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edited(sd, source) -> EditSession:
    """A session with points, a mask, a run and a redo history (bad input must leave all of it alone)."""
    s = with_points(new_session(sd, source))
    s.set_mask(torch.ones(128, 128))
    list(s.run(max_steps=1))
    s.move_point(1, target=[72, 60])
    s.undo()
    return s


NAN = float("nan")
BAD_INPUT = [
    ("handle x outside", lambda s, p: s.add_point([128, 10], [5, 5]),
     r"handle=\[128, 10\] is outside the image: x must be within 0 to 127"),
    ("target y negative", lambda s, p: s.add_point([3, 3], [5, -1]), r"target=.*y within 0 to 127"),
    ("target NaN", lambda s, p: s.move_point(1, target=[NAN, 5]), r"target=.*NaN or infinity"),
    ("too many points", lambda s, p: s.add_point([1, 1], [2, 2]), r"DragDiffusionConfig.max_handles=2"),
    ("unknown id", lambda s, p: s.remove_point(7), r"id=7 is not a point.*\[1, 2\]"),
    ("mask wrong shape", lambda s, p: s.set_mask(torch.ones(16, 16)), r"mask must be \[H, W\] = \[128, 128\]"),
    ("mask image wrong size", lambda s, p: s.set_mask(Image.new("L", (64, 128))), r"mask must be 128x128 pixels"),
    ("mask above 1", lambda s, p: s.set_mask(np.full((128, 128), 2.0)), r"mask values must be within 0 to 1"),
    ("run max_steps 0", lambda s, p: s.run(max_steps=0), r"max_steps=0 is not allowed; use an integer >= 1"),
    ("run preview_every negative", lambda s, p: s.run(preview_every=-1), r"preview_every=-1 .* >= 0"),
    ("export to a folder", lambda s, p: s.export(p), r"names a folder"),
]


@pytest.mark.parametrize("call,message", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_a_value_error_and_changes_nothing(edited, call, message, tmp_path) -> None:
    before = full_state(edited)
    with pytest.raises(ValueError, match=message):
        call(edited, tmp_path)
    assert_same_state(before, full_state(edited))
    assert list(tmp_path.iterdir()) == []


def test_bad_construction_is_a_value_error_naming_the_field(sd, source) -> None:
    with pytest.raises(ValueError, match="prompt must be a string"):
        EditSession.from_image(sd, source, 3, config=CONFIG, runtime=RUNTIME)
    with pytest.raises(ValueError, match=r"preview_method='fast' is not allowed; choose one of: auto, vae, "):
        new_session(sd, source, preview_method="fast")
    with pytest.raises(ValueError, match="multiples of 64"):
        new_session(sd, source.resize((100, 100)))
    with pytest.raises(ValueError, match="components must be SDComponents"):
        EditSession.from_image(sd.unet, source, PROMPT, runtime=RUNTIME)
    with pytest.raises(ValueError, match="config must be a DragDiffusionConfig"):
        EditSession.from_image(sd, source, PROMPT, config=object(), runtime=RUNTIME)
    engine = DragDiffusionEngine(sd, CONFIG, RUNTIME)
    with pytest.raises(ValueError, match=r"engine: call prepare\(image, prompt\)"):
        EditSession(engine, torch.zeros(1, 4, 16, 16))
    z = engine.prepare(source, PROMPT).z_t
    with pytest.raises(ValueError, match=r"z_t must be a float \[1, 4, 16, 16\] latent"):
        EditSession(engine, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="z_t contains NaN"):
        EditSession(engine, torch.full_like(z, NAN))
    with pytest.raises(ValueError, match="seed and w0 apply to DragGAN sessions"):
        EditSession(engine, z, seed=0)
    s = EditSession(engine, z)  # a ready engine works as well
    assert torch.equal(s.latent(), z) and s.size == (128, 128)


def test_editing_while_running_is_refused_and_changes_nothing(sd, source, tmp_path) -> None:
    s = with_points(new_session(sd, source))
    it = s.run(max_steps=3)
    next(it)
    assert s.running
    before = full_state(s)
    for call in (lambda: s.add_point([1, 1], [2, 2]), lambda: s.move_point(1, target=[1, 1]),
                 lambda: s.remove_point(1), lambda: s.set_mask(None), s.undo, s.redo, s.run, s.image,
                 lambda: s.export(tmp_path / "e")):
        with pytest.raises(SessionBusyError, match="the session is running; call stop"):
            call()
    assert_same_state(before, full_state(s))
    assert list(tmp_path.iterdir()) == []
    s.stop()
    assert len(list(it)) <= 1  # at most the step being computed
    assert not s.running and s.runs[-1]["stopped"] and torch.equal(s.latent(), s._engine.latent())


# --- export and open ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(sd, source, tmp_path_factory):
    """An edit with a soft mask and a run, exported once: (session, record, folder)."""
    folder = tmp_path_factory.mktemp("export")
    s = with_points(new_session(sd, source))
    s.set_mask(torch.linspace(0, 1, 128).repeat(128, 1))  # soft: the 8-bit values must round-trip exactly
    list(s.run(max_steps=2))
    return s, s.export(folder / "edit.json"), folder


def test_export_writes_the_edit(sd, source, exported) -> None:
    s, record, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ["edit.json", "edit.png", "edit_latent.safetensors",
                                                        "edit_mask.png", "edit_source.png"]
    assert json.loads((folder / "edit.json").read_text()) == record
    assert record["format"] == "dragrt-edit-session" and record["format_version"] == 1
    assert record["method"] == "dragdiffusion" and record["prompt"] == PROMPT and record["seed"] is None
    assert record["points"] == s.points and record["next_point_id"] == 3 and record["runs"] == s.runs
    assert record["engine"] == {"name": "dragdiffusion", "config": dataclasses.asdict(CONFIG)}
    assert record["model"]["sha256"] == model_sha256(sd.unet) and record["model"]["id"] == "random-tiny"
    assert record["lora"] is None and record["mask"]["file"] == "edit_mask.png"
    assert record["source"]["file"] == "edit_source.png" and record["image"]["size"] == [128, 128]
    assert np.array_equal(pixels(Image.open(folder / "edit.png")), pixels(s.image()))
    assert np.array_equal(pixels(Image.open(folder / "edit_source.png")), pixels(source))
    latents = load_file(folder / "edit_latent.safetensors")
    assert torch.equal(latents["z_t"], s.latent()) and torch.equal(latents["z_t0"], s._engine.prepared.z_t)


def test_open_restores_the_edit(sd, exported) -> None:
    s, _, folder = exported
    o = EditSession.open(folder / "edit", sd, runtime=RUNTIME)
    assert o.method == "dragdiffusion" and o.prompt == PROMPT and o.config == s.config
    assert torch.equal(o.latent(), s.latent()) and torch.equal(o._engine.prepared.z_t, s._engine.prepared.z_t)
    assert o.points == s.points and torch.equal(o.mask, s.mask) and o.runs == s.runs and not o.can_undo
    assert np.array_equal(pixels(o.image()), pixels(s.image()))
    o.remove_point(2)
    assert o.add_point([10, 10], [20, 20]) == 3  # point ids are never reused, across open too
    events = list(o.run(max_steps=1))  # the re-prepared engine drags on from the restored latent
    assert len(events) == 1 and len(o.runs) == len(s.runs) + 1


def test_open_refuses_another_model_or_the_wrong_kind(sd, exported) -> None:
    from small_draggan import small_generator

    _, _, folder = exported
    other = build_random_sd15(tiny=True, seed=1)
    with pytest.raises(ValueError, match=r"made with model .*UNet state-dict sha256 .* strict=False"):
        EditSession.open(folder / "edit.json", other, runtime=RUNTIME)
    with pytest.warns(UserWarning, match="opening anyway"):
        o = EditSession.open(folder / "edit.json", other, strict=False, runtime=RUNTIME)
    assert o.points == exported[0].points
    with pytest.raises(ValueError, match="is a DragDiffusion edit: pass the SDComponents"):
        EditSession.open(folder / "edit.json", small_generator(), runtime=RUNTIME)
    with pytest.raises(ValueError, match="preview_method='x' is not allowed"):
        EditSession.open(folder / "edit.json", sd, runtime=RUNTIME, preview_method="x")


def test_open_a_draggan_record_with_sd_components_is_refused(sd, tmp_path) -> None:
    from small_draggan import small_generator

    EditSession.from_seed(small_generator(), 0, runtime=RUNTIME).export(tmp_path / "gan")
    with pytest.raises(ValueError, match="is a DragGAN edit: pass the StyleGAN2 generator"):
        EditSession.open(tmp_path / "gan.json", sd, runtime=RUNTIME)
    with pytest.raises(ValueError, match="lora, cache and preview_method apply to DragDiffusion edits"):
        EditSession.open(tmp_path / "gan.json", small_generator(), runtime=RUNTIME, preview_method="vae")


def test_a_lora_is_fingerprinted_and_must_come_back_on_open(source, tmp_path) -> None:
    from dragrt.runtime.models.lora import lora_fingerprint

    lora_sd = build_random_sd15(tiny=True)  # its own copy: fast mode fuses the LoRA into the shared UNet
    base_hash = model_sha256(lora_sd.unet)
    g = torch.Generator().manual_seed(3)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weights = {f"unet.{path}.lora_A.weight": torch.randn(4, 32, generator=g) * 0.1,
               f"unet.{path}.lora_B.weight": torch.randn(32, 4, generator=g) * 0.1}
    s = with_points(new_session(lora_sd, source, lora=weights))
    list(s.run(max_steps=1))
    record = s.export(tmp_path / "edit")
    assert record["lora"] == {"fingerprint": lora_fingerprint(weights), "source": "state dict"}
    assert record["model"]["sha256"] == base_hash  # the base UNet, hashed before the LoRA was fused
    s._engine.close()  # gives the shared UNet its own weights back
    assert model_sha256(lora_sd.unet) == base_hash

    with pytest.raises(ValueError, match=r"lora: .* was made with a LoRA .*pass the same weights as lora="):
        EditSession.open(tmp_path / "edit", lora_sd, runtime=RUNTIME)
    other = {k: v * 2 for k, v in weights.items()}
    with pytest.raises(ValueError, match=r"made with LoRA fingerprint .*strict=False"):
        EditSession.open(tmp_path / "edit", lora_sd, runtime=RUNTIME, lora=other)
    assert model_sha256(lora_sd.unet) == base_hash  # the failed open un-fused its LoRA
    o = EditSession.open(tmp_path / "edit", lora_sd, runtime=RUNTIME, lora=weights)
    assert torch.equal(o.latent(), s.latent()) and o.points == s.points
    assert o.export(tmp_path / "again")["lora"] == record["lora"]


def test_close_restores_a_fused_lora_and_refuses_further_edits(sd, source):
    from dragrt.runtime.models.lora import LoRAConfig

    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    config = dataclasses.replace(CONFIG, lora=True, lora_config=LoRAConfig(steps=1, batch_size=1))
    with EditSession.from_image(sd, source, PROMPT, config=config, runtime=RUNTIME) as s:
        assert any(not torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
        s.add_point([40, 40], [60, 40])
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    with pytest.raises(RuntimeError, match="closed"):
        s.add_point([10, 10], [20, 20])
    assert s.points[0]["handle"] == [40.0, 40.0]
    s.close()  # idempotent
