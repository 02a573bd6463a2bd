"""DragDiffusion at real size: a full SD1.5-config pipeline (860M UNet, VAE, CLIP text) with random weights, 512 px.

Latency does not depend on weight values. Ours = the engine's fast mode, reference = its reference mode (the
published path, reload-free), measured in the same run on the same components, image, prompt and points:

- ``dragdiffusion.512.step`` / ``.step-mask``: ms per drag iteration without / with a mask (the mask term needs
  the full UNet; without it the fast forward stops after ``up_blocks[2]``).
- ``dragdiffusion.512.edit``: a whole edit without LoRA (inversion + 80 drag iterations + 35-step denoise +
  decode), with the inversion computed and cached; stages per phase.
- ``dragdiffusion.512.lora``: per-image LoRA training (80 steps, batch 4, rank 16).
- ``dragdiffusion.512.edit-lora``: the whole edit with LoRA training (ours, its LoRA not cached) against the
  reference's LoRA + edit (scenario ``dragdiffusion-lora`` after the LoRA record, or ``dragdiffusion-edit-lora``
  alone).
- ``dragdiffusion.512.attention``: the fast drag step with SDPA against xformers (when installed).
- ``dragdiffusion.512.step-channels-last`` / ``.edit-channels-last`` (scenario ``dragdiffusion-layout``): the fast
  engine on a channels-last UNet against the same engine on the NCHW one (both ours: the layout decision).

Targets are placed far from the handles; with random weights tracking is erratic and an edit may still stop
early, so each record says how many iterations each mode ran (``extra.ours_steps`` / ``reference_steps``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dragrt.bench import harness
from dragrt.bench.scenarios import register
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine

SIZE = 512
PROMPT = "a photo of a cat sitting on a wooden table"
HANDLES = [[200.0, 220.0], [320.0, 300.0]]
TARGETS = [[300.0, 220.0], [380.0, 400.0]]


def _image(size: int) -> torch.Tensor:
    # A smooth colourful test pattern in [-1, 1] (content does not change latency).
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([torch.sin(6 * x + 2 * y), torch.cos(5 * y - 3 * x), torch.sin(4 * (x + y))])
    return img[None].clamp(-1, 1)


def _mask(size: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[size // 4: 7 * size // 8, size // 4: 7 * size // 8] = 1
    return m


def _wall(fn, reps: int) -> tuple[harness.Timing, Any]:
    """Synchronised wall-clock times of ``reps`` calls (for multi-second, host-orchestrated phases) and the last
    call's return value (a warm run: its per-stage timings go in the record)."""
    times = []
    out = None
    with harness.PeakMemory() as mem:
        for _ in range(reps):
            out, seconds = harness.timed_call(fn)
            times.append(seconds * 1e3)
    return harness.Timing(times_ms=times, clock="perf_counter", peak_mem_mb=mem.mb), out


@contextlib.contextmanager
def _counting_kept_step_replays() -> Iterator[list[int]]:
    """Inside the block, each LoRA training that replays a kept step (``lora._train_warm``) appends to the yielded
    list: what the records say about replays is counted, not assumed (a kept step that never matched went
    unnoticed in earlier records). Adds no device work."""
    from dragrt.runtime.models import lora

    replays: list[int] = []
    replay = lora._train_warm
    lora._train_warm = lambda *a, **k: (replays.append(1), replay(*a, **k))[1]
    try:
        yield replays
    finally:
        lora._train_warm = replay


def _first_step_peak_mb(engine: DragDiffusionEngine, mask: torch.Tensor | None) -> tuple[float, float]:
    """``(seconds, MiB)`` of a drag's ``start`` and first ``step``: the time, and the peak CUDA memory above the
    prepared engine. For the fast engine the first step of a kind captures its CUDA graph, whose pool and buffers
    then stay allocated, so the timed replays (which allocate nothing) report a peak of 0: this is the memory a
    drag needs. Call it once per kind, before the timed steps."""
    def first() -> None:
        engine.start(HANDLES, TARGETS, mask)
        engine.step()

    with harness.PeakMemory() as mem:
        seconds = harness.measure_compile(first)
    return seconds, round(mem.mb, 1)


def _stage_timings(timings: dict[str, float]) -> dict[str, dict[str, float]]:
    return {k: {"p50_ms": v * 1e3, "p95_ms": v * 1e3} for k, v in timings.items()}


_SHARED: dict[str, Any] = {}


def _shared() -> dict[str, Any]:
    """One SD1.5-config pipeline and one fast + one reference engine for all the scenarios of a process
    (building the 860M UNet and compiling its blocks is done once)."""
    if not _SHARED:
        from dragrt.runtime.cache.store import TensorCache
        from dragrt.runtime.models.sd import build_random_sd15

        harness.progress("dragdiffusion: building the SD1.5-config pipeline (random weights)")
        sd = build_random_sd15(torch.float16, "cuda", seed=0)
        runtime = RuntimeConfig(device="cuda", dtype="float16")
        fast = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast"), runtime, cache=TensorCache("bench"))
        ref = DragDiffusionEngine(sd, DragDiffusionConfig(mode="reference"), runtime)
        image = _image(SIZE)
        # cold start: the first prepare compiles the UNet blocks while inverting
        harness.progress("dragdiffusion: first prepare of the fast engine (compiles the UNet blocks)")
        cold_prepare = harness.measure_compile(lambda: fast.prepare(image, PROMPT))
        _SHARED.update(sd=sd, runtime=runtime, fast=fast, ref=ref, image=image, first_step_mb={},
                       compile_s={"ours_first_prepare": cold_prepare})
    return _SHARED


def _started() -> dict[str, Any]:
    """:func:`_shared` with the fast engine's first drag step taken (it captures the step and compiles its
    backward: timed into ``compile_s``) and the reference engine prepared: where the step and edit scenarios
    start. The LoRA scenario needs neither and skips them (minutes of a device call, cold)."""
    sh = _shared()
    if "ours_first_step" not in sh["compile_s"]:
        harness.progress("dragdiffusion: the fast engine's first drag step (graph capture, backward compile)")
        cold_step, step_mb = _first_step_peak_mb(sh["fast"], None)
        sh["ref"].prepare(sh["image"], PROMPT)
        sh["first_step_mb"]["step"] = step_mb
        sh["compile_s"]["ours_first_step"] = cold_step
    return sh


BASE_CONFIG = {"resolution": SIZE, "unet": "SD1.5 config (random weights)", "dtype": "float16", "handles": 2,
               "prompt": PROMPT, "max_drag_steps": 80, "inversion_steps": 35}


@register("dragdiffusion-step", needs_cuda=True,
          description="DragDiffusion 512 px ms per drag step (no mask / mask; SDPA vs xformers), fast vs reference")
def dragdiffusion_step(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    from dragrt.runtime.models.attention import set_attention_backend, xformers_available

    sh = _started()
    fast, ref, sd, image = sh["fast"], sh["ref"], sh["sd"], sh["image"]
    records = []
    xformers_note = ("xformers usable: see dragdiffusion.512.attention" if xformers_available() else
                     "xformers not usable on this machine (not installed, or a wheel without kernels for this "
                     "torch: PyPI's newest, 0.0.35, targets torch 2.10), so only SDPA was measured")
    for name, mask in (("step", None), ("step-mask", _mask(SIZE))):
        first, first_mb = _first_step_peak_mb(fast, mask)
        first_mb = sh["first_step_mb"].setdefault(name, first_mb)  # the no-mask graph was captured in _shared
        ours = harness.time_cuda(fast.step, budget_ms=budget_ms)
        ref_first, ref_first_mb = _first_step_peak_mb(ref, mask)
        reference = harness.time_cuda(ref.step, budget_ms=budget_ms, min_reps=5)
        records.append(harness.make_record(
            f"dragdiffusion.{SIZE}.{name}", {**BASE_CONFIG, "mask": mask is not None, "attention": fast.attention},
            ours, reference,
            compile_s={"ours_first_step": first, "reference_first_step": ref_first, **sh["compile_s"]},
            extra={"note": "fast: frozen fp16 UNet, truncated after up_blocks[2] without a mask, kernels, one CUDA "
                           "graph per step; reference: fp32 UNet with weight gradients under fp16 autocast, dense "
                           "256x256 upsample, Python loops", "attention": xformers_note,
                   "ours_first_step_peak_mem_mb": first_mb, "reference_first_step_peak_mem_mb": ref_first_mb,
                   "peak_mem_note": "peak_mem_mb is the peak above the start of the timed steps (ours: 0, its graph "
                                    "pool was allocated by the first step); *_first_step_peak_mem_mb is the peak of "
                                    "starting the drag and its first step, above the prepared engine"}))
    if xformers_available():
        try:
            fx = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", attention="xformers"), sh["runtime"],
                                     cache=fast.cache)
            fx.prepare(image, PROMPT)
            fx.start(HANDLES, TARGETS)
            fx.step()
            t_x = harness.time_cuda(fx.step, budget_ms=budget_ms)
        finally:
            set_attention_backend(sd.unet, "sdpa")  # back to SDPA on the shared UNet (fast's graph is recaptured)
        fast.start(HANDLES, TARGETS)
        fast.step()
        t_s = harness.time_cuda(fast.step, budget_ms=budget_ms)
        records.append(harness.make_record(
            f"dragdiffusion.{SIZE}.attention", {**BASE_CONFIG, "ours": "sdpa", "reference": "xformers"}, t_s, t_x,
            extra={"note": "both fast mode; 'reference' here is xformers, not the published path"}))
    return records


@register("dragdiffusion-edit", needs_cuda=True,
          description="DragDiffusion 512 px full edit without LoRA (inversion computed / cached), fast vs reference")
def dragdiffusion_edit(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    sh = _started()
    fast, ref, image = sh["fast"], sh["ref"], sh["image"]

    def edit_fast(clear: bool):
        if clear:
            fast.cache.clear()
        return fast.edit(image, PROMPT, HANDLES, TARGETS)

    edit_fast(True)  # cold: compiles the whole-UNet variants and captures the graphs (sh["compile_s"] has the rest)
    edit_uncached, res = _wall(lambda: edit_fast(True), 1 if quick else 3)
    edit_cached, res_cached = _wall(lambda: edit_fast(False), 1 if quick else 3)
    ref_edit, ref_r = _wall(lambda: ref.edit(image, PROMPT, HANDLES, TARGETS), 1)

    def first_preview():  # an interactive start: points set -> the first step's preview on screen
        fast.start(HANDLES, TARGETS)
        fast.step()
        fast.preview()

    first_preview()  # a later start reuses the captured step graph: time that (the warm, interactive path)
    to_preview, _ = _wall(first_preview, 1 if quick else 3)
    # the next drag's final render on the same prepared image: the edited branch alone against the original
    # branch's kept keys/values (reuse_original_branch); the first render of an image is the edit's denoise stage
    fast.denoise()
    rerender, _ = _wall(fast.denoise, 1 if quick else 3)
    return [harness.make_record(
        f"dragdiffusion.{SIZE}.edit", {**BASE_CONFIG, "lora": False, "inversion": "computed"},
        edit_uncached, ref_edit,
        stages={"ours": _stage_timings(res.timings), "reference": _stage_timings(ref_r.timings)},
        compile_s=sh["compile_s"],
        extra={"ours_steps": res.steps, "reference_steps": ref_r.steps,
               "ours_inversion_cached_p50_ms": edit_cached.p50_ms,
               "ours_time_to_first_preview_ms": to_preview.p50_ms,
               "ours_rerender_ms": rerender.p50_ms,
               "ours_cached_stages": _stage_timings(res_cached.timings)})]


LORA_CONFIG = {**BASE_CONFIG, "lora": True, "lora_steps": 80, "lora_batch": 4, "lora_rank": 16}


def _lora_shared() -> dict[str, Any]:
    """:func:`_shared` with the shared fast engine's fused LoRA (if any) undone: the LoRA scenarios train on the
    shared UNet."""
    sh = _shared()
    sh["fast"].close()
    return sh


def _lora_record(sh: dict[str, Any], quick: bool) -> dict[str, Any]:
    """``dragdiffusion.512.lora``: per-image LoRA training, ours (compiled once, then replaying the kept step)
    against the reference."""
    from dragrt.runtime.models.lora import LoRAConfig, train_image_lora

    sd, img_dev = sh["sd"], sh["image"].cuda()

    def train(mode: str, reuse_graph: bool = True):
        return train_image_lora(sd, img_dev, PROMPT, LoRAConfig(), mode=mode, progress=False, reuse_graph=reuse_graph)

    harness.progress("dragdiffusion-lora: first fast training (compiles the blocks' training variants)")
    lora_first = harness.measure_compile(lambda: train("fast"))
    harness.progress(f"dragdiffusion-lora: compiled in {lora_first:.0f} s; timing ours, then the reference")
    # the timed runs replay the step the first one captured and kept (what a session's later images get); a
    # fresh capture (a session's first image after the compile) is timed apart
    with _counting_kept_step_replays() as replays:
        lora_ours, _ = _wall(lambda: train("fast"), 1 if quick else 2)
    lora_recapture, _ = _wall(lambda: train("fast", reuse_graph=False), 1)
    lora_ref, _ = _wall(lambda: train("reference"), 1)
    return harness.make_record(f"dragdiffusion.{SIZE}.lora", LORA_CONFIG, lora_ours, lora_ref,
                               compile_s={"ours_first": lora_first},
                               extra={"ours": "replays the training step kept from the previous training",
                                      "ours_runs_that_replayed_the_kept_step": f"{len(replays)} of {lora_ours.n}",
                                      "ours_fresh_capture_p50_ms": lora_recapture.p50_ms})


def _edit_lora_record(sh: dict[str, Any], scenario: str) -> dict[str, Any]:
    """``dragdiffusion.512.edit-lora``: the whole edit with its LoRA trained (not cached), ours against the
    reference. Ours is the engine's second edit (the first, cold, compiles and captures; its time goes in
    ``compile_s``), whose LoRA stage replays the training step the first kept. ``scenario`` names the progress
    lines."""
    from dragrt.runtime.cache.store import TensorCache

    sd, image, runtime = sh["sd"], sh["image"], sh["runtime"]
    harness.progress(f"{scenario}: the edit with LoRA (a cold edit first: this engine's graphs)")
    fast_l = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast", lora=True), runtime, cache=TensorCache("bl"))
    ref_l = DragDiffusionEngine(sd, DragDiffusionConfig(mode="reference", lora=True), runtime)

    def edit_lora_fast():
        fast_l.cache.clear()
        return fast_l.edit(image, PROMPT, HANDLES, TARGETS)

    cold = harness.measure_compile(edit_lora_fast)
    harness.progress(f"{scenario}: cold edit with LoRA {cold:.0f} s; timing ours, then the reference")
    with _counting_kept_step_replays() as edit_replays:
        ours_l, res_l = _wall(edit_lora_fast, 1)
    fast_l.close()
    ref_l_t, ref_lr = _wall(lambda: ref_l.edit(image, PROMPT, HANDLES, TARGETS), 1)
    ref_l.close()
    return harness.make_record(
        f"dragdiffusion.{SIZE}.edit-lora", LORA_CONFIG, ours_l, ref_l_t,
        stages={"ours": _stage_timings(res_l.timings), "reference": _stage_timings(ref_lr.timings)},
        compile_s={"ours_cold_edit": cold, **sh["compile_s"]},
        extra={"ours_steps": res_l.steps, "reference_steps": ref_lr.steps,
               "ours": "a second edit of the engine: its LoRA stage replays the step the first one kept",
               "ours_runs_that_replayed_the_kept_step": f"{len(edit_replays)} of {ours_l.n}"})


@register("dragdiffusion-lora", needs_cuda=True,
          description="DragDiffusion 512 px per-image LoRA training and the edit with LoRA, fast vs reference")
def dragdiffusion_lora(budget_ms: float, quick: bool) -> Iterator[dict[str, Any]]:
    """Yields the LoRA record as soon as it is measured, then the edit with LoRA (a cold run on an H100 took
    longer than one device call: the first comes back even when the second is cut off; ``dragdiffusion-edit-lora``
    measures the second alone)."""
    sh = _lora_shared()
    yield _lora_record(sh, quick)
    yield _edit_lora_record(sh, "dragdiffusion-lora")


@register("dragdiffusion-edit-lora", needs_cuda=True,
          description="DragDiffusion 512 px edit with LoRA alone (the headline of the LoRA path), fast vs reference")
def dragdiffusion_edit_lora(budget_ms: float, quick: bool) -> Iterator[dict[str, Any]]:
    """``dragdiffusion-lora``'s second record without its first: a cold run fits one device call (on an H100,
    2026-12-05, both records together did not: ~25 s building, ~90 s compiling the inversion, ~200 s the LoRA
    training's blocks, then the cold edit's drag-step compile)."""
    yield _edit_lora_record(_lora_shared(), "dragdiffusion-edit-lora")


@register("dragdiffusion-layout", needs_cuda=True,
          description="DragDiffusion 512 px fast mode with the UNet in channels-last against NCHW (step and edit)")
def dragdiffusion_layout(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    """The decision data for channels-last (the fast engine's default): both fast, same weights; 'reference' is
    the fast engine on an NCHW UNet here (``DragDiffusionConfig(channels_last=False)``), not the published path."""
    from dragrt.runtime.cache.store import TensorCache
    from dragrt.runtime.models.sd import build_random_sd15

    sh = _shared()
    cl, image = sh["fast"], sh["image"]
    cl.close()  # no fused LoRA of another scenario on the shared UNet
    sd_nchw = build_random_sd15(torch.float16, "cuda", seed=0)
    nchw = DragDiffusionEngine(sd_nchw, DragDiffusionConfig(mode="fast", channels_last=False), sh["runtime"],
                               cache=TensorCache("bench-nchw"))
    cold_prepare = harness.measure_compile(lambda: nchw.prepare(image, PROMPT))
    cold_step, _ = _first_step_peak_mb(nchw, None)
    steps = {}
    for name, engine in (("channels_last", cl), ("nchw", nchw)):
        engine.prepare(image, PROMPT)
        engine.start(HANDLES, TARGETS)
        engine.step()
        steps[name] = harness.time_cuda(engine.step, budget_ms=budget_ms)
    edits = {}
    for name, engine in (("channels_last", cl), ("nchw", nchw)):
        engine.cache.clear()
        engine.edit(image, PROMPT, HANDLES, TARGETS)  # warm: this engine's whole-UNet graphs
        engine.cache.clear()
        edits[name], res = _wall(lambda e=engine: (e.cache.clear(), e.edit(image, PROMPT, HANDLES, TARGETS))[1],
                                 1 if quick else 3)
        edits[name + "_stages"] = _stage_timings(res.timings)
    nchw.close()
    note = "both fast mode; 'ours' = UNet in channels-last, 'reference' = the same engine on the NCHW UNet"
    return [
        harness.make_record(f"dragdiffusion.{SIZE}.step-channels-last", {**BASE_CONFIG, "layout": "channels_last"},
                            steps["channels_last"], steps["nchw"],
                            compile_s={"reference_first_prepare": cold_prepare, "reference_first_step": cold_step},
                            extra={"note": note}),
        harness.make_record(f"dragdiffusion.{SIZE}.edit-channels-last",
                            {**BASE_CONFIG, "layout": "channels_last", "lora": False, "inversion": "computed"},
                            edits["channels_last"], edits["nchw"],
                            stages={"ours": edits["channels_last_stages"], "reference": edits["nchw_stages"]},
                            extra={"note": note}),
    ]
