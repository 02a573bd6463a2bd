"""Where DragDiffusion's fast drag step and edit spend their time on a GPU (issue #6: step <= 12 ms, edit >= 8x).

Usage (GPU machine, full-size SD1.5-config pipeline with random weights, 512 px):

    python bench/tools/profile_dragdiffusion.py OUT [VARIANT ...]
    python bench/tools/profile_dragdiffusion.py OUT --smoke [VARIANT ...]   # any machine: tiny pipeline, CPU

Variants (each builds its own pipeline and fast engine, so each pays its compile):

- ``cl``: as shipped (the UNet in channels-last, ``DragDiffusionConfig.channels_last``; blocks compiled with
  ``torch.compile`` mode ``default``);
- ``nchw``: the same in NCHW (``channels_last=False``);
- ``autotune``: as shipped with the blocks compiled in mode ``max-autotune-no-cudagraphs`` (slow to compile);
- ``cl-fusedqkv``: as shipped with ``DragDiffusionConfig(fuse_qkv=True)`` (self-attention's q/k/v in one matmul);
- ``cl-cudnnattn``: as shipped with ``attention="cudnn"`` (SDPA with cuDNN's fused attention first);
- ``cl-cudnnattn-fusedqkv``: both.

Per variant: the cold prepare and first step (compile + capture), ms per drag step (CUDA events, p50 over 2 s),
a whole edit with the inversion computed and its stages, and a kernel profile of 10 captured steps written to
``OUT/dd_VARIANT_prof.txt``. One JSON line per variant, all of them in ``OUT/dragdiffusion.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from dragrt.bench import harness
from dragrt.bench.scenarios.dragdiffusion import HANDLES, PROMPT, SIZE, TARGETS, _image
from dragrt.runtime.cache.store import TensorCache
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine
from dragrt.runtime.models.sd import build_random_sd15

#: name -> (compile mode, channels_last, other DragDiffusionConfig fields)
VARIANTS = {"nchw": ("default", False, {}), "cl": ("default", True, {}),
            "autotune": ("max-autotune-no-cudagraphs", True, {}), "cl-fusedqkv": ("default", True, {"fuse_qkv": True}),
            "cl-cudnnattn": ("default", True, {"attention": "cudnn"}),
            "cl-cudnnattn-fusedqkv": ("default", True, {"attention": "cudnn", "fuse_qkv": True})}


def run_variant(name: str, out: Path, smoke: bool = False) -> dict:
    """``smoke``: the tiny pipeline on the CPU at 128 px, eager (a check of this script, not a measurement)."""
    mode, channels_last, fields = VARIANTS[name]
    torch._dynamo.reset()
    if smoke:
        sd = build_random_sd15(tiny=True, seed=0)
        runtime = RuntimeConfig(device="cpu", dtype="float32", compile_mode="none")
        size, scale, config = 128, 128 / SIZE, DragDiffusionConfig(mode="fast", start_layer=4, max_steps=3)
    else:
        sd = build_random_sd15(torch.float16, "cuda", seed=0)
        runtime = RuntimeConfig(device="cuda", compile_mode=mode)
        size, scale, config = SIZE, 1.0, DragDiffusionConfig(mode="fast")
    # the engine converts the UNet (CUDA only: the smoke run on the CPU stays NCHW either way)
    config = dataclasses.replace(config, channels_last=channels_last, **fields)
    engine = DragDiffusionEngine(sd, config, runtime, cache=TensorCache(f"profile-{name}"))
    image = _image(size)
    handles = [[x * scale, y * scale] for x, y in HANDLES]
    targets = [[x * scale, y * scale] for x, y in TARGETS]
    r: dict = {"variant": name, "compile_mode": runtime.resolved_compile_mode(), "channels_last": channels_last}
    r["cold_prepare_s"] = round(harness.measure_compile(lambda: engine.prepare(image, PROMPT)), 1)

    def first() -> None:
        engine.start(handles, targets)
        engine.step()

    r["cold_first_step_s"] = round(harness.measure_compile(first), 1)
    step = harness.time_cuda(engine.step, budget_ms=200 if smoke else 2000)
    r.update(step_p50_ms=round(step.p50_ms, 3), step_p95_ms=round(step.p95_ms, 3))
    r.update({f"step_{k}": v for k, v in harness.kernel_profile(engine.step, 10, out / f"dd_{name}_prof.txt").items()})
    engine.cache.clear()
    engine.edit(image, PROMPT, handles, targets)  # warm: the whole-UNet graphs of inversion and denoise
    engine.cache.clear()
    result, seconds = harness.timed_call(lambda: engine.edit(image, PROMPT, handles, targets))
    r["edit_ms"] = round(seconds * 1e3, 1)
    r["edit_steps"] = result.steps
    r["edit_stages_ms"] = {k: round(v * 1e3, 1) for k, v in result.timings.items()}
    engine.close()
    return r


def main(out: Path, variants: list[str], smoke: bool = False) -> None:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        try:
            results[v] = run_variant(v, out, smoke)
        except Exception as e:  # noqa: BLE001 - a failed variant is a result too
            results[v] = {"variant": v, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(results[v]), flush=True)
        (out / "dragdiffusion.json").write_text(json.dumps(results, indent=1))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    args = sys.argv[2:]
    smoke = "--smoke" in args
    main(Path(sys.argv[1]), [a for a in args if a != "--smoke"] or ["nchw", "cl"], smoke)
