"""``dragrt demo``: a point-drag edit end to end, written as before/after images and an animated GIF.

``--method draggan`` (the default) drags, with DragGAN's engine, the zoo's StyleGAN2 of the toy-faces world
(``zoo:faces-stylegan2``) when it is installed: the zoo's landmark regressor finds the mouth corners, they are
dragged into a wider smile, and the same regressor measures where they landed. Without it, the default is a
*differentiable procedural renderer* -- a few dozen soft coloured discs composited over a gradient, whose disc
centres play the role of StyleGAN's ``w`` -- dragged with DragGAN's own algorithm and dragrt's kernels (motion
supervision via ``bilinear_sample``, tracking via ``patch_track``, Adam on the latent, stop within 2 px); it
needs no weights and shows a visible drag on a CPU in about a minute. ``--model stylegan2-random`` runs the
engine on a full-size random-weight StyleGAN2 (real timings, meaningless pictures). ``--method dragdiffusion``
runs DragDiffusion on ``zoo:faces-sd`` or an SD1.x pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from dragrt.kernels import bilinear_sample
from dragrt.runtime import drag
from dragrt.runtime.config import RuntimeConfig

WHAT_IT_IS = (
    "no trained StyleGAN2 is installed (zoo:faces-stylegan2), so this demo drags a differentiable procedural "
    "renderer (soft coloured discs; their centres are the latent) with DragGAN's algorithm and dragrt's kernels: "
    "motion supervision via bilinear_sample, point tracking via patch_track."
)


class DiscRenderer(torch.nn.Module):
    """A differentiable stand-in generator: ``K`` soft discs composited back to front over a gradient.

    The latent is ``centres [K, 2]`` (``[x, y]`` pixels); radii, colours and the background are fixed
    by the seed. ``forward(centres) -> [1, 3, S, S]`` in [0, 1].
    """

    def __init__(self, size: int = 256, n_discs: int = 36, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.register_buffer("radius", size * (0.04 + 0.09 * torch.rand(n_discs, generator=g)))
        self.register_buffer("color", 0.15 + 0.85 * torch.rand(n_discs, 3, generator=g))
        top, bottom = torch.rand(3, generator=g), torch.rand(3, generator=g)
        ramp = torch.linspace(0, 1, size)[:, None, None]
        self.register_buffer("background", (top * (1 - ramp) + bottom * ramp).permute(2, 0, 1)[None].expand(
            1, 3, size, size).contiguous())
        self.register_buffer("init_centres", size * (0.1 + 0.8 * torch.rand(n_discs, 2, generator=g)))
        ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                                indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]))  # [2, S, S]

    def forward(self, centres: torch.Tensor) -> torch.Tensor:
        img = self.background
        d2 = ((self.grid[None] - centres[:, :, None, None]) ** 2).sum(1)  # [K, S, S]
        # Soft edge about 1.5 px wide, so that moving a disc has a gradient.
        alpha = torch.sigmoid((self.radius[:, None, None] - d2.clamp_min(1e-6).sqrt()) / 1.5)
        for k in range(centres.shape[0]):
            a = alpha[k][None, None]
            img = img * (1 - a) + self.color[k][None, :, None, None] * a
        return img


def features(img: torch.Tensor) -> torch.Tensor:
    """A feature map at half the image resolution, like DragGAN's b128 map of a 256 px model: the colour
    and two blurs of it, so that a point inside a flat disc is still told apart by its surroundings.
    ``[1, 9, S/2, S/2]``."""
    small = F.avg_pool2d(img, 2)
    blur = F.avg_pool2d(small, 5, stride=1, padding=2, count_include_pad=False)
    wide = F.avg_pool2d(small, 11, stride=1, padding=5, count_include_pad=False)
    return torch.cat([small, blur, wide], 1)


def _draw(img: torch.Tensor | Image.Image, handles, targets, scale: int = 1) -> Image.Image:
    """The image (a ``[1, 3, H, W]`` tensor in [0, 1] or a PIL image) with handles (red), targets (blue)
    and arrows drawn on it; coordinates are ``[x, y]`` pixels of the image."""
    if isinstance(img, Image.Image):
        pil = img.convert("RGB")
    else:
        arr = (img[0].permute(1, 2, 0).clamp(0, 1).detach().cpu().numpy() * 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    d = ImageDraw.Draw(pil)
    for (hx, hy), (tx, ty) in zip(torch.as_tensor(handles).tolist(), torch.as_tensor(targets).tolist()):
        hx, hy, tx, ty = ((v + 0.5) * scale for v in (hx, hy, tx, ty))
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=2)
        d.ellipse([hx - 5, hy - 5, hx + 5, hy + 5], fill=(230, 40, 40), outline=(255, 255, 255))
        d.ellipse([tx - 5, ty - 5, tx + 5, ty + 5], fill=(40, 90, 230), outline=(255, 255, 255))
    return pil


#: The most optimisation steps a demo takes (``max_steps`` / ``--steps``).
MAX_DEMO_STEPS = 10000


def _check_steps(max_steps: int) -> None:
    if not 1 <= max_steps <= MAX_DEMO_STEPS:
        raise ValueError(f"max_steps={max_steps} is not allowed; use 1 to {MAX_DEMO_STEPS}")


def run_demo(out_dir: Path, *, seed: int = 0, size: int = 256, max_steps: int = 400, lr: float = 1.0,
             device: str = "auto", progress: bool = True) -> dict:
    """Drag two handles of a procedural image; write before.png, after.png, drag.gif and edit.json.

    ``lr`` is Adam's step on the disc centres, in pixels (DragGAN's 1e-3 is for StyleGAN's ``w``). With
    seed 0 at 256 px, lr 0.5 left the handles 10-30 px short after 300 steps; lr 1.0 reaches the targets
    in 166 steps (248 before the loop used :mod:`dragrt.runtime.drag`'s disc).
    """
    from tqdm import tqdm

    if size < 64 or size > 1024 or size % 2:
        raise ValueError(f"size={size} is not allowed; use an even number of pixels from 64 to 1024")
    _check_steps(max_steps)
    dev = RuntimeConfig(device=device).torch_device()
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = DiscRenderer(size=size, seed=seed).to(dev)
    w0 = gen.init_centres.clone()
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)

    # Two handles on the centres of the two largest of the top-most discs (drawn last, so not hidden),
    # dragged about a quarter of the image.
    top = torch.arange(len(gen.radius) - 12, len(gen.radius), device=dev)
    order = top[torch.argsort(gen.radius[top], descending=True)[:2]]
    handles = w0[order].round().clamp(0, size - 1)
    shift = torch.tensor([[0.25, -0.12], [-0.2, 0.18]], device=dev) * size
    targets = (handles + shift).clamp(size * 0.05, size * 0.95).round()
    initial = handles.clone()

    # DragGAN's radii at 512 px scaled to this size (r2), and its stop distance max(2 * S / 512, 2) px. The
    # motion disc is one pixel wider than DragGAN's scaled r1 (2 px at 256): flat discs need the context.
    _, r2 = drag.draggan_radii(size)
    r1 = drag.draggan_radii(size)[0] + 1
    stop_px = drag.draggan_stop_distance(size)
    grid_size = (size, size)
    active = torch.ones(len(handles), dtype=torch.bool, device=dev)

    with torch.no_grad():
        img0 = gen(w)
        feat0 = features(img0)
        ref = bilinear_sample(feat0, handles, grid_size)[0]  # [P, C]
    frames = [_draw(img0, handles, targets, 1)]
    step_ms, steps = [], 0
    bar = tqdm(total=max_steps, desc="dragging", unit="step", disable=not progress, mininterval=0.5)
    for steps in range(1, max_steps + 1):
        t0 = time.perf_counter()
        img = gen(w)
        feat = features(img)
        handles = drag.draggan_track(feat, ref, handles, grid_size, r2)
        dist = (targets - handles).norm(dim=1)
        if bool((dist <= stop_px).all()):
            break
        loss = drag.draggan_motion_loss(feat, handles, targets, active, grid_size, r1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if steps % 4 == 0:
            frames.append(_draw(img.detach(), handles, targets, 1))
        bar.update(1)
        bar.set_postfix(dist=f"{float(dist.max()):.1f}px")
    bar.close()

    with torch.no_grad():
        final = gen(w)
    frames.append(_draw(final, handles, targets, 1))
    _draw(img0, initial, targets, 1).save(out_dir / "before.png")
    _draw(final, handles, targets, 1).save(out_dir / "after.png")
    frames[0].save(out_dir / "drag.gif", save_all=True, append_images=frames[1:] + [frames[-1]] * 8,
                   duration=60, loop=0)
    reached = bool(((targets - handles).norm(dim=1) <= stop_px).all())
    record = {
        "what": WHAT_IT_IS,
        "model": {"kind": "procedural disc renderer (stand-in)", "seed": seed, "size": size},
        "algorithm": {"method": "DragGAN motion supervision + L2 point tracking", "r1": r1, "r2": r2,
                      "optimizer": "Adam", "lr": lr, "stop_px": stop_px},
        "handle_points": initial.tolist(), "target_points": targets.tolist(), "final_points": handles.tolist(),
        "steps": steps, "reached_targets": reached, "device": str(dev),
        "ms_per_step_p50": float(np.median(step_ms)) if step_ms else None,
        "kernels": "dragrt.kernels via dispatch",
    }
    (out_dir / "edit.json").write_text(json.dumps(record, indent=2))
    return record


STYLEGAN2_RANDOM_WHAT = (
    "DragGAN engine on a full-size StyleGAN2 config-f generator with RANDOM weights (no real StyleGAN2 weights "
    "can be had here; the zoo's trained generator is small: zoo:faces-stylegan2, the demo's default): the drag, "
    "the tracking and the timings are real; the pictures are what an untrained generator draws."
)


def _drag_session(session, out_dir: Path, max_steps: int, progress: bool) -> tuple[dict, Image.Image]:
    """Run ``session``'s drag (its points already set): before.png, after.png, drag.gif (a preview frame every 2
    steps) and the session export ``edit.*``; returns (steps, done, start / final / target points and ms per step;
    the final image)."""
    from tqdm import tqdm

    targets = [p["target"] for p in session.points]
    start = [p["handle"] for p in session.points]
    before = session.image()
    scale = max(1, DISPLAY_MIN_SIZE // before.width)
    _draw(before, start, targets, scale).save(out_dir / "before.png")
    frames = [_draw(before, start, targets, scale)]
    step_ms: list[float] = []
    last = None
    bar = tqdm(total=max_steps, desc="dragging", unit="step", disable=not progress, mininterval=0.5)
    for ev in session.run(max_steps=max_steps, preview_every=2, preview_size=before.width):
        step_ms.append(ev.ms)
        last = ev
        if ev.preview is not None:
            frames.append(_draw(ev.preview, list(ev.handles.values()), targets, scale))
        bar.update(1)
        bar.set_postfix(dist=f"{max(ev.distances.values()):.1f}px")
    bar.close()
    after = session.image()
    final = [p["handle"] for p in session.points]
    _draw(after, final, targets, scale).save(out_dir / "after.png")
    frames.append(_draw(after, final, targets, scale))
    frames[0].save(out_dir / "drag.gif", save_all=True, append_images=frames[1:] + [frames[-1]] * 8,
                   duration=120, loop=0)
    session.export(out_dir / "edit")
    return {"steps": 0 if last is None else last.step + 1, "reached_targets": bool(last and last.done),
            "handle_points": start, "final_points": final, "target_points": targets,
            "ms_per_step_p50": float(np.median(step_ms)) if step_ms else None}, after


def run_stylegan2_random(out_dir: Path, *, seed: int = 0, resolution: int = 256, max_steps: int = 40,
                         device: str = "auto", progress: bool = True) -> dict:
    """Drag two points with :class:`~dragrt.runtime.session.EditSession` on a random-weight config-f
    generator; write before.png, after.png, drag.gif (a frame every 2 steps) and the edit record."""
    from dragrt.runtime.models.stylegan2 import PRESET_RESOLUTIONS, Generator, stylegan2_config
    from dragrt.runtime.session import EditSession

    if resolution not in PRESET_RESOLUTIONS:
        raise ValueError(f"resolution={resolution} is not allowed; choose one of {PRESET_RESOLUTIONS}")
    _check_steps(max_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = RuntimeConfig(device=device)
    torch.manual_seed(seed)
    G = Generator.from_config(stylegan2_config(resolution))
    session = EditSession.from_seed(G, seed, runtime=runtime, model_id=f"stylegan2-config-f-{resolution}-random")
    r = resolution
    session.add_point([round(0.35 * r), round(0.45 * r)], [round(0.5 * r), round(0.4 * r)])
    session.add_point([round(0.65 * r), round(0.6 * r)], [round(0.6 * r), round(0.75 * r)])
    rec, _ = _drag_session(session, out_dir, max_steps, progress)
    return {"what": STYLEGAN2_RANDOM_WHAT, "device": str(runtime.torch_device()), **rec}


#: The DragGAN demo's default model once it is installed (else the procedural discs).
DRAGGAN_ZOO_MODEL = "zoo:faces-stylegan2"
#: The zoo demo's edit: each mouth corner moves out by this fraction of the image and up by ZOO_LIFT (a wider
#: smile), so the landmark regressor can tell whether the corners landed where they were dragged; at least
#: ZOO_MIN_MOVE_PX pixels each way, so that a small generator's drag is longer than the 2 px stopping distance.
ZOO_WIDEN, ZOO_LIFT = 0.05, 0.03
ZOO_MIN_MOVE_PX = (5, 4)
#: With no seed given, the zoo demo drags the first of samples 0 .. ZOO_SEED_SEARCH - 1 whose two mouth corners the
#: landmark regressor finds with at least this confidence (else the surest of them): the handles are its estimates,
#: and a corner it barely sees is placed off the mouth (the 35 k-step 64 px model's sample 0: 0.29).
ZOO_MIN_CORNER_CONFIDENCE, ZOO_SEED_SEARCH = 0.5, 16
#: Images of the demo smaller than this are drawn enlarged (nearest neighbour) in before/after.png and drag.gif.
DISPLAY_MIN_SIZE = 256


def _model_input(images: list[Image.Image]) -> torch.Tensor:
    """PIL images as the zoo's evaluators take them: float ``[N, 3, H, W]`` in [-1, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def _measured_smile(images: list[Image.Image]) -> list[float] | None:
    """The smile (0 frown .. 1 wide smile) of each image as the zoo's attribute reader measures it, or ``None``
    when the detail model that reads it is not installed (the attribute model alone reads it at chance)."""
    from dragrt.zoo import evaluators

    if not evaluators.reader_installed():
        return None
    with torch.no_grad():
        return evaluators.load_attribute_model()(_model_input(images)).value("smile").tolist()


def _mouth_corners(landmarks: Any, image: Image.Image) -> tuple[list[list[float]], list[float]]:
    """Mouth corners ``[[x, y], [x, y]]`` (left, right) of a PIL image, by the landmark regressor, and their
    confidences."""
    from dragrt.zoo import world

    with torch.no_grad():
        out = landmarks(_model_input([image]))
    idx = [world.LANDMARK_INDEX["mouth_left"], world.LANDMARK_INDEX["mouth_right"]]
    return out.landmarks[0, idx].tolist(), out.confidence[0, idx].tolist()


def run_stylegan2_zoo(out_dir: Path, *, model: Any = DRAGGAN_ZOO_MODEL, model_id: str | None = None,
                      seed: int | None = None, max_steps: int = 200, device: str = "auto",
                      progress: bool = True, config: Any = None) -> dict:
    """DragGAN on a trained StyleGAN2 of the faces world (``model``: ``zoo:faces-stylegan2`` by default, any path
    :func:`~dragrt.runtime.models.stylegan2_convert.load_generator` reads, or a loaded generator): the zoo's
    landmark regressor finds the mouth corners of sample ``seed`` (``None``: the first of the first
    ``ZOO_SEED_SEARCH`` samples where it finds both with ``ZOO_MIN_CORNER_CONFIDENCE``; recorded as ``seed``),
    they are dragged outwards and up (a wider smile), and the same regressor measures where they ended up.
    Writes before.png, after.png, drag.gif, the session export ``edit.*`` and the measurements ``demo.json``.
    ``model_id`` names the model in the records (default: ``model`` when it is a path); ``config``: the engine's
    :class:`~dragrt.runtime.engines.draggan.DragGANConfig` (default: DragGAN's, as the demo runs it)."""
    from dragrt.runtime.engines.draggan import DragGANEngine
    from dragrt.runtime.models.stylegan2_convert import load_generator
    from dragrt.runtime.session import EditSession, to_pil
    from dragrt.zoo.evaluators import load_landmark_model

    _check_steps(max_steps)
    G = model if isinstance(model, torch.nn.Module) else load_generator(model)
    model_id = model_id or (str(model) if not isinstance(model, torch.nn.Module) else "stylegan2 generator")
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = RuntimeConfig(device=device)
    landmarks = load_landmark_model()
    engine = DragGANEngine(G, config, runtime)  # one engine scores the candidates and then runs the edit
    best = None
    for s in ([seed] if seed is not None else range(ZOO_SEED_SEARCH)):
        w = engine.latent_from_seed(s)
        image = to_pil(engine.render(w))  # what the session's image() draws for this latent
        corners, confidence = _mouth_corners(landmarks, image)
        if best is None or min(confidence) > min(best[-1]):
            best = (s, w, image, corners, confidence)
        if min(confidence) >= ZOO_MIN_CORNER_CONFIDENCE:
            break
    seed, w, image, corners, confidence = best
    session = EditSession(engine, w, seed=seed, model_id=model_id)  # as EditSession.from_seed(G, seed) builds it
    r = image.width
    widen, lift = max(ZOO_WIDEN * r, ZOO_MIN_MOVE_PX[0]), max(ZOO_LIFT * r, ZOO_MIN_MOVE_PX[1])
    for (x, y), side in zip(corners, (-1, 1)):  # mouth_left is on the image's left
        handle = [min(max(round(x), 0), r - 1), min(max(round(y), 0), r - 1)]
        target = [min(max(round(x + side * widen), 0), r - 1), min(max(round(y - lift), 0), r - 1)]
        session.add_point(handle, target)
    rec, after = _drag_session(session, out_dir, max_steps, progress)
    measured, confidence_after = _mouth_corners(landmarks, after)
    errors = [math.dist(m, t) for m, t in zip(measured, rec["target_points"])]
    rec = {"model": model_id, "seed": seed, "device": str(runtime.torch_device()), "resolution": r, **rec,
           "radii_px": list(drag.draggan_pixel_radii(r, session.config.r1, session.config.r2)),
           "feature_resolution": engine.feature_resolution,
           "mouth_corners_measured_before": corners, "mouth_corners_measured_after": measured,
           "landmark_confidence_before": confidence, "landmark_confidence_after": confidence_after,
           "measured_error_to_targets_px": errors, "smile_measured_before_after": _measured_smile([image, after])}
    (out_dir / "demo.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


DRAGGAN_MODELS = ("discs", "stylegan2-random")  # besides a StyleGAN2 generator: zoo:<name>, a folder, a .json


def default_draggan_model() -> str:
    """``zoo:faces-stylegan2`` when it is installed, else the procedural ``discs``."""
    from dragrt.zoo import registry

    return DRAGGAN_ZOO_MODEL if registry.installed(DRAGGAN_ZOO_MODEL) else "discs"
DRAGDIFFUSION_DEFAULT_MODEL = "zoo:faces-sd"


def _print_smile(rec: dict) -> None:
    smile = rec.get("smile_measured_before_after")
    if smile:
        print(f"the zoo's attribute reader measures the smile (0 frown .. 1 wide smile) at {smile[0]:.2f} before, "
              f"{smile[1]:.2f} after")


def run_dragdiffusion(out_dir: Path, *, model: str = DRAGDIFFUSION_DEFAULT_MODEL, seed: int = 0, max_steps: int = 80,
                      device: str = "auto", progress: bool = True) -> dict:
    """DragDiffusion through :class:`~dragrt.runtime.session.EditSession` on an SD1.x pipeline (``model``: a
    diffusers folder, a single ``.safetensors`` or ``zoo:<name>``), on a face of the zoo's world rendered at the
    pipeline's native size: the handle is a mouth corner, the target where the same face's corner goes when it
    smiles more (renderer ground truth), the prompt the face's caption, and a mask over the mouth (the box of
    its landmarks, padded by 28 px at 256: ``dragrt.zoo.training.REGIONS["mouth"]``), as a user draws one in
    DragDiffusion's editor: the method's mask term holds the rest of the face (on seed 0's face, the edit keeps
    27.3 dB PSNR of the render, 28.8 outside the mask, against 25.4 without a mask). Writes
    before.png (the mask's outline in yellow), after.png, drag.gif (previews every 5 iterations) and the edit
    record (with edit_mask.png)."""
    from tqdm import tqdm

    from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig
    from dragrt.runtime.models.attention import transformer_self_attentions
    from dragrt.runtime.models.sd import load_sd
    from dragrt.runtime.session import EditSession
    from dragrt.zoo import training, world

    if not 1 <= max_steps <= 1000:
        raise ValueError(f"max_steps={max_steps} is not allowed; use 1 to 1000")
    runtime = RuntimeConfig(device=device)
    dev = runtime.torch_device()
    sd = load_sd(model, torch_dtype=torch.float16 if dev.type == "cuda" else torch.float32, device=dev)
    size = int(sd.unet.config.sample_size) * 8
    out_dir.mkdir(parents=True, exist_ok=True)
    params = world.sample_params(world.held_out_seeds(1, start=seed)[0])
    face = world.render(params, size)
    smiling = world.render(params.replace(smile=min(1.0, params.smile + 0.45)), size)
    i = world.LANDMARK_NAMES.index("mouth_right")
    handle = [round(float(v)) for v in face.landmarks[i]]
    target = [round(float(v)) for v in smiling.landmarks[i]]
    n_blocks = len(transformer_self_attentions(sd.unet))  # SD1.5: 16; start_layer 10 as the reference
    config = DragDiffusionConfig(max_steps=max_steps, start_layer=min(10, n_blocks))
    session = EditSession.from_image(sd, face.image, face.caption, config=config, runtime=runtime,
                                     model_id=str(model))
    session.add_point(handle, target)
    box = training.region_boxes(torch.from_numpy(face.landmarks)[None], size, "mouth")[0].double().numpy() * size
    (x0, y0), (x1, y1) = np.floor(box[:2]).astype(int), np.ceil(box[2:]).astype(int)
    mask = np.zeros((size, size), np.float32)
    mask[y0:y1, x0:x1] = 1.0
    session.set_mask(mask)
    before = Image.fromarray(face.image)
    shown = before.copy()  # the mask's outline on what is shown, not on what the attribute reader measures
    ImageDraw.Draw(shown).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 220, 0), width=2)
    frames = [_draw(shown, [handle], [target])]
    frames[0].save(out_dir / "before.png")
    step_ms: list[float] = []
    last = None
    bar = tqdm(total=max_steps, desc="dragging", unit="step", disable=not progress, mininterval=0.5)
    for ev in session.run(preview_every=5, preview_size=size):
        step_ms.append(ev.ms)
        last = ev
        if ev.preview is not None:
            frames.append(_draw(ev.preview, list(ev.handles.values()), [target]))
        bar.update(1)
        bar.set_postfix(dist=f"{max(ev.distances.values()):.1f}px")
    bar.close()
    after = session.image()
    final = [p["handle"] for p in session.points]
    _draw(after, final, [target]).save(out_dir / "after.png")
    frames.append(_draw(after, final, [target]))
    frames[0].save(out_dir / "drag.gif", save_all=True, append_images=frames[1:] + [frames[-1]] * 8,
                   duration=150, loop=0)
    session.export(out_dir / "edit")
    session.close()
    return {"model": str(model), "prompt": face.caption, "steps": 0 if last is None else last.step + 1,
            "reached_targets": bool(last and last.done), "device": str(dev), "handle_points": [handle],
            "final_points": final, "target_points": [target], "mask_box": [int(x0), int(y0), int(x1), int(y1)],
            "ms_per_step_p50": float(np.median(step_ms)) if step_ms else None,
            "smile_rendered_before_target": [params.smile, min(1.0, params.smile + 0.45)],
            "smile_measured_before_after": _measured_smile([before, after])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("draggan", "dragdiffusion"), default="draggan",
                   help="draggan (default) or dragdiffusion (needs an SD1.x pipeline: --model)")
    p.add_argument("--model", default=None,
                   help=f"draggan: a StyleGAN2 generator (zoo:<name>, a converted .json or its folder; default "
                        f"{DRAGGAN_ZOO_MODEL} when installed), discs (the procedural stand-in, the default "
                        "otherwise; a visible drag on a CPU in about a minute) or stylegan2-random (the engine on "
                        "a full-size random-weight StyleGAN2); "
                        f"dragdiffusion: an SD1.x diffusers folder, a .safetensors checkpoint or zoo:<name> "
                        f"(default {DRAGDIFFUSION_DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, default=Path("dragrt-demo"), help="output folder (default: ./dragrt-demo)")
    p.add_argument("--seed", type=int, default=None,
                   help="scene seed (default 0; a trained StyleGAN2: the first sample whose mouth corners the "
                        "landmark regressor sees clearly)")
    p.add_argument("--size", type=int, default=None, help="discs: image size in pixels, 64-1024 (default 256)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"maximum optimisation steps, 1-{MAX_DEMO_STEPS} (default 400 for discs, 40 for "
                        "stylegan2-random, 200 for a trained StyleGAN2)")
    p.add_argument("--resolution", type=int, default=None,
                   help="stylegan2-random: 256, 512 or 1024 (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def _check_flags(args: argparse.Namespace) -> None:
    """The flags every demo shares, named as the user typed them (the ``run_*`` functions name their parameters);
    nothing is created before every check passed."""
    if args.steps is not None and not 1 <= args.steps <= MAX_DEMO_STEPS:
        raise ValueError(f"--steps={args.steps} is not allowed; use an integer from 1 to {MAX_DEMO_STEPS}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed={args.seed} is not allowed; use an integer from 0 to 2**32 - 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder (it is created when missing)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r} cannot be written: {str(parent)!r} is not a writable folder")


def main(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.method == "dragdiffusion":
        model = args.model or DRAGDIFFUSION_DEFAULT_MODEL
        print(f"dragrt demo: DragDiffusion on {model}, dragging a mouth corner of a face from the zoo's world "
              "towards where it goes when the face smiles")
        rec = run_dragdiffusion(args.out, model=model, seed=args.seed or 0, max_steps=args.steps or 80,
                                device=args.device)
        print(f"{'reached' if rec['reached_targets'] else 'did not reach'} the target in {rec['steps']} steps on "
              f"{rec['device']} ({rec['ms_per_step_p50']:.1f} ms per step, including previews every 5 steps)")
        _print_smile(rec)
        for name in ("before.png", "after.png", "drag.gif", "edit.json", "edit.png", "edit_mask.png"):
            print(f"  wrote {args.out / name}")
        return 0
    args.model = args.model or default_draggan_model()
    # each size option belongs to one model: a trained generator draws at its own resolution
    for flag, value, owner in (("--size", args.size, "discs"), ("--resolution", args.resolution, "stylegan2-random")):
        if value is not None and args.model != owner:
            raise ValueError(f"{flag} is for --model {owner}, not {args.model} (a trained StyleGAN2 draws at its "
                             "own resolution)")
    if args.model not in DRAGGAN_MODELS:
        from dragrt.runtime.models.stylegan2_convert import load_generator

        try:
            G = load_generator(args.model)
        except FileNotFoundError as exc:
            raise ValueError(f"--model {args.model!r} is not allowed with --method draggan: it is not one of "
                             f"{', '.join(DRAGGAN_MODELS)} and not a StyleGAN2 generator ({exc})") from None
        print(f"dragrt demo: DragGAN on {args.model}, widening the smile of a sample: the zoo's landmark "
              "regressor finds the mouth corners, then measures where they were dragged to")
        rec = run_stylegan2_zoo(args.out, model=G, model_id=args.model, seed=args.seed, max_steps=args.steps or 200,
                                device=args.device)
        err = ", ".join(f"{e:.1f}" for e in rec["measured_error_to_targets_px"])
        print(f"sample {rec['seed']}: {'reached' if rec['reached_targets'] else 'did not reach'} the targets in "
              f"{rec['steps']} steps on {rec['device']} ({rec['ms_per_step_p50']:.1f} ms per step); the regressor "
              f"puts the corners {err} px from their targets")
        _print_smile(rec)
        for name in ("before.png", "after.png", "drag.gif", "demo.json", "edit.json", "edit.png",
                     "edit_w.safetensors"):
            print(f"  wrote {args.out / name}")
        return 0
    if args.model == "stylegan2-random":
        print(f"dragrt demo: {STYLEGAN2_RANDOM_WHAT}")
        rec = run_stylegan2_random(args.out, seed=args.seed or 0, resolution=args.resolution or 256,
                                   max_steps=args.steps or 40, device=args.device)
        print(f"{'reached' if rec['reached_targets'] else 'did not reach'} the targets in {rec['steps']} steps on "
              f"{rec['device']} ({rec['ms_per_step_p50']:.1f} ms per step, including previews every 2 steps)")
        for name in ("before.png", "after.png", "drag.gif", "edit.json", "edit.png", "edit_w.safetensors"):
            print(f"  wrote {args.out / name}")
        return 0
    print(f"dragrt demo: {WHAT_IT_IS}")
    rec = run_demo(args.out, seed=args.seed or 0, size=args.size or 256, max_steps=args.steps or 400,
                   device=args.device)
    moved = [math.dist(a, b) for a, b in zip(rec["handle_points"], rec["final_points"])]
    print(f"{'reached' if rec['reached_targets'] else 'did not reach'} the targets in {rec['steps']} steps "
          f"on {rec['device']} (handles moved {', '.join(f'{m:.0f}' for m in moved)} px; "
          f"{rec['ms_per_step_p50']:.1f} ms per step)")
    for name in ("before.png", "after.png", "drag.gif", "edit.json"):
        print(f"  wrote {args.out / name}")
    return 0
