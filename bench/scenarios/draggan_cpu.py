"""DragGAN step latency on the CPU with the embedded zoo model, the path `dragrt demo` takes on a machine
without a GPU: zoo:faces-stylegan2 (128 px), fast mode against reference mode in the same run.

On the CPU neither mode compiles or captures anything; the fast mode is the engine's static step (truncated
forward, the kernels' PyTorch implementations, masked Adam), the reference mode viz/renderer.py's step.
``extra.finished_step`` times steps of an edit whose targets are 1 px from the handles (done at every step: both
modes skip the backward, the fast one since edaf604), as the quality suite's one-step edits are.
"""

from __future__ import annotations

from typing import Any

import torch

from dragrt.bench import harness
from dragrt.bench.scenarios import register
from dragrt.bench.scenarios.draggan import far_points
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine

MODEL = "zoo:faces-stylegan2"
# Timed steps per mode and handle count: few enough that no edit converges while timed (a converged reference
# step skips its backward and would look cheaper; each record says whether one did), enough for stable
# percentiles on a busy 2-core machine.
MAX_STEPS = 100


@register("draggan-cpu", needs_cuda=False,
          description="DragGAN ms per step on the CPU, zoo:faces-stylegan2 (128 px), fast vs reference mode")
def draggan_cpu(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    from dragrt.runtime.models.stylegan2_convert import load_generator

    G = load_generator(MODEL)
    res = G.img_resolution
    gen = torch.Generator().manual_seed(0)
    records = []
    for n in (1, 2) if quick else (1, 2, 5):
        handles, targets = far_points(n, res, gen)
        engines = {m: DragGANEngine(G, DragGANConfig(mode=m), RuntimeConfig(device="cpu"))
                   for m in ("fast", "reference")}
        w = engines["fast"].latent_from_seed(0)
        near = [[x + 1, y] for x, y in handles]  # 1 px away: every step is a finished one (no update to make)
        timings, tracks, converged, finished = {}, {}, {}, {}
        for m, eng in engines.items():
            eng.start(w, handles, targets)
            tracks[m] = []
            for _ in range(5):
                eng.step()
                tracks[m].append(eng.handles)
            eng.start(w, handles, targets)
            timings[m] = harness.time_cuda(eng.step, warmup_ms=0, budget_ms=budget_ms, min_reps=10,
                                           max_reps=MAX_STEPS)
            converged[m] = bool(eng.step()[1])
            eng.start(w, handles, near)
            t = harness.time_cuda(eng.step, warmup_ms=0, budget_ms=0, min_reps=20, max_reps=20)
            finished[m] = {"p50_ms": t.p50_ms, "still_done": bool(eng.step()[1])}
        diff = (torch.tensor(tracks["fast"]) - torch.tensor(tracks["reference"])).abs().max().item()
        fast = engines["fast"]
        records.append(harness.make_record(
            f"draggan-cpu.{res}.h{n}",
            {"resolution": res, "handles": n, "generator": MODEL, "device": "cpu",
             "threads": torch.get_num_threads(), "feature_resolution": fast.feature_resolution,
             "r1": fast.r1_px, "r2": fast.r2_px, "lr": fast.config.lr},
            timings["fast"], timings["reference"],
            extra={"max_tracked_point_diff_px_5_steps": diff, "converged_while_timed": converged,
                   "finished_step": finished}))
    return records
