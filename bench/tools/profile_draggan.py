"""Profile one DragGAN fast step at 512 px (random config-f weights) and time a few variants.

Usage (on a GPU): python bench/tools/profile_draggan.py [--compile]
Prints the top CUDA kernels of one eager step and the p50 ms per step of each variant.
"""

from __future__ import annotations

import argparse

import torch

from dragrt.bench import harness
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine
from dragrt.runtime.models.stylegan2 import Generator, stylegan2_config


def engine(G, **kw):
    e = DragGANEngine(G, DragGANConfig(**kw), RuntimeConfig(device="cuda"))
    w = e.latent_from_seed(0)
    e.start(w, [[200, 200], [300, 320]], [[300, 300], [400, 420]])
    return e


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    G = Generator.from_config(stylegan2_config(512)).cuda()

    e = engine(G, cuda_graph=False)
    for _ in range(3):
        e.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        e.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))

    def measure(name, **kw):
        e = engine(G, **kw)
        cold = harness.measure_compile(e.step)
        t = harness.time_cuda(e.step, budget_ms=400)
        print(f"{name:<40} p50 {t.p50_ms:.3f} ms  p95 {t.p95_ms:.3f} ms  first step {cold:.2f} s")

    measure("graph (default)")
    measure("eager", cuda_graph=False)
    torch.backends.cudnn.benchmark = True
    measure("graph + cudnn.benchmark")
    torch.backends.cudnn.benchmark = False
    if args.compile:
        G.synthesis.forward = torch.compile(G.synthesis.forward)
        measure("graph + torch.compile(synthesis)")


if __name__ == "__main__":
    main()
