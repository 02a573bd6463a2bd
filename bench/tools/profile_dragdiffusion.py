"""Where DragDiffusion's fast drag step and edit spend their time on a GPU (issue #6: step <= 12 ms, edit >= 8x).

Usage (GPU machine, full-size SD1.5-config pipeline with random weights, 512 px):

    python bench/tools/profile_dragdiffusion.py OUT [VARIANT ...]

Variants (each builds its own pipeline and fast engine, so each pays its compile):

- ``nchw``: as shipped (UNet blocks compiled with ``torch.compile`` mode ``default``, NCHW);
- ``cl``: the UNet in channels-last (``sd.unet.to(memory_format=torch.channels_last)``);
- ``autotune``: NCHW with the blocks compiled in mode ``max-autotune-no-cudagraphs`` (slow to compile).

Per variant: the cold prepare and first step (compile + capture), ms per drag step (CUDA events, p50 over 2 s),
a whole edit with the inversion computed and its stages, and a kernel profile of 10 captured steps written to
``OUT/dd_VARIANT_prof.txt``. One JSON line per variant, all of them in ``OUT/dragdiffusion.json``.
"""

from __future__ import annotations

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

VARIANTS = {"nchw": ("default", False), "cl": ("default", True), "autotune": ("max-autotune-no-cudagraphs", False)}


def run_variant(name: str, out: Path) -> dict:
    mode, channels_last = VARIANTS[name]
    torch._dynamo.reset()
    sd = build_random_sd15(torch.float16, "cuda", seed=0)
    if channels_last:
        sd.unet.to(memory_format=torch.channels_last)
    engine = DragDiffusionEngine(sd, DragDiffusionConfig(mode="fast"), RuntimeConfig(device="cuda", compile_mode=mode),
                                 cache=TensorCache(f"profile-{name}"))
    image = _image(SIZE)
    r: dict = {"variant": name, "compile_mode": mode, "channels_last": channels_last}
    r["cold_prepare_s"] = round(harness.measure_compile(lambda: engine.prepare(image, PROMPT)), 1)

    def first() -> None:
        engine.start(HANDLES, TARGETS)
        engine.step()

    r["cold_first_step_s"] = round(harness.measure_compile(first), 1)
    step = harness.time_cuda(engine.step, budget_ms=2000)
    r.update(step_p50_ms=round(step.p50_ms, 3), step_p95_ms=round(step.p95_ms, 3))
    r.update({f"step_{k}": v for k, v in harness.kernel_profile(engine.step, 10, out / f"dd_{name}_prof.txt").items()})
    engine.cache.clear()
    engine.edit(image, PROMPT, HANDLES, TARGETS)  # warm: the whole-UNet graphs of inversion and denoise
    engine.cache.clear()
    result, seconds = harness.timed_call(lambda: engine.edit(image, PROMPT, HANDLES, TARGETS))
    r["edit_ms"] = round(seconds * 1e3, 1)
    r["edit_steps"] = result.steps
    r["edit_stages_ms"] = {k: round(v * 1e3, 1) for k, v in result.timings.items()}
    engine.close()
    return r


def main(out: Path, variants: list[str]) -> None:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        try:
            results[v] = run_variant(v, out)
        except Exception as e:  # noqa: BLE001 - a failed variant is a result too
            results[v] = {"variant": v, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(results[v]), flush=True)
        (out / "dragdiffusion.json").write_text(json.dumps(results, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["nchw", "cl"])
