"""DragGAN step latency at real size: StyleGAN2 config-f generators with random weights.

Latency does not depend on weight values, so random weights at the real architecture measure what a
user with a real checkpoint gets. Ours = the engine's fast mode (frozen generator, truncated forward,
kernels, CUDA-graph replay); reference = its reference mode (viz/renderer.py's step literally), both
in the same run on the same generator and latent.
"""

from __future__ import annotations

from typing import Any

import torch

from dragrt.bench import harness
from dragrt.bench.scenarios import register
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine
from dragrt.runtime.models.stylegan2 import Generator, stylegan2_config


def far_points(n: int, res: int, gen: torch.Generator) -> tuple[list[list[float]], list[list[float]]]:
    """``n`` handles in the middle half of a ``res`` px image and targets 0.2 ``res`` away: far enough that no
    handle converges while being timed (a converged reference step skips its backward and would look cheaper)."""
    h = (torch.rand(n, 2, generator=gen) * 0.5 + 0.25) * res
    t = (h + res * 0.2).clamp(0, res - 1)
    return h.round().tolist(), t.round().tolist()


def _engine(G: Generator, mode: str) -> DragGANEngine:
    return DragGANEngine(G, DragGANConfig(mode=mode), RuntimeConfig(device="cuda"))


@register("draggan", needs_cuda=True, description="DragGAN ms per step at 256/512/1024, fast vs reference mode")
def draggan(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    records = []
    for res in (512,) if quick else (256, 512, 1024):
        torch.manual_seed(0)
        G = Generator.from_config(stylegan2_config(res)).cuda()
        for n in (1, 5):
            handles, targets = far_points(n, res, gen)
            fast, ref = _engine(G, "fast"), _engine(G, "reference")
            w = fast.latent_from_seed(0)

            # Cold start (first step of a new engine: compile + warm-up + CUDA-graph capture), then parity
            # on the device: how far apart the two modes' tracked points are over the first 5 steps.
            # Graph replays allocate nothing (their pool is reserved at capture), so the timed region's
            # peak says 0: report the peak of starting the edit and its first step instead.
            with harness.PeakMemory() as mem:
                fast.start(w, handles, targets)
                cold_s = harness.measure_compile(fast.step)
            engine_mem_mb = mem.mb
            ref.start(w, handles, targets)
            ref.step()
            tracks = {"fast": [fast.handles], "ref": [ref.handles]}
            for _ in range(4):
                fast.step()
                ref.step()
                tracks["fast"].append(fast.handles)
                tracks["ref"].append(ref.handles)
            diff = (torch.tensor(tracks["fast"]) - torch.tensor(tracks["ref"])).abs().max().item()

            fast.start(w, handles, targets)
            fast.step()
            ours = harness.time_cuda(fast.step, budget_ms=budget_ms)
            preview = harness.time_cuda(fast.render, budget_ms=budget_ms / 2)
            ref.start(w, handles, targets)
            ref_cold_s = harness.measure_compile(ref.step)
            reference = harness.time_cuda(ref.step, budget_ms=budget_ms)
            records.append(harness.make_record(
                f"draggan.{res}.h{n}",
                {"resolution": res, "handles": n, "generator": "stylegan2 config-f (random weights)",
                 "num_fp16_res": G.config.synthesis.num_fp16_res, "feature": "b128",
                 "r1": fast.r1_px, "r2": fast.r2_px, "lr": fast.config.lr},
                ours, reference,
                stages={"ours": {"step": ours, "preview_render": preview}},
                compile_s={"ours_first_step": cold_s, "reference_first_step": ref_cold_s},
                extra={"max_tracked_point_diff_px_5_steps": diff, "ours_start_peak_mem_mb": round(engine_mem_mb, 1),
                       "note": "random weights: fp16 b64/b128 features make near-ties common, so a 1 px "
                               "difference between the modes' roundings can appear"}))
            del fast, ref
        del G
        torch.cuda.empty_cache()
    return records
