"""Where to take the StyleGAN2 trainer's FIR filtering next: its depthwise convolutions, timed alone, in variants.

Usage:
    python bench/tools/fir_variants.py OUT [--smoke]     # GPU machine; --smoke: a 32 px network on the CPU

After ``conv_double_backward`` (2026-12-06, H100, 128 px preset, batch 32, graphed) a training step spends ~28 % of
its GPU time in ATen's fp16 depthwise kernels (``conv_depthwise2d_*``): the 4 x 4 low-pass filters of
``upfirdn2d`` (G's upsampling, D's blur before every stride-2 convolution), one channel at a time. This tool
records every depthwise convolution one forward pass of G and D makes at the trainer's preset and batch (the
``cdb.conv2d`` calls whose groups equal their channels), then times each distinct call, forward and backward to
its input (the filter is a constant), as the trainer runs it and in variants of the same arithmetic:

- ``depthwise``: as now, the 2-D ``[4, 4]`` filter, NCHW;
- ``separable``: the filter as its two 1-D factors (``[1, 4]`` then ``[4, 1]``; the binomial filter is their outer
  product), 8 taps a pixel instead of 16, in two passes;
- ``channels_last``: the 2-D filter on NHWC input (the layout cuDNN's grouped kernels take);
- ``separable_channels_last``: both.

Each variant is checked against ``depthwise`` (the largest difference, relative to the output's scale, is
printed) and timed by ``harness.time_cuda``: the median of 20 CUDA-event measurements per call, after warm-up.
Prints one JSON line per variant (milliseconds per forward pass of G plus D, forward and backward of every
recorded call, and the speedup against ``depthwise``) and writes them all to ``OUT/fir_variants.json``. The
winner, if any, goes into ``upfirdn2d``; measure the whole step again then (``profile_zoo.py sg2-128-graphs``).
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from dragrt.bench import harness
from dragrt.runtime.models import conv_double_backward as cdb
from dragrt.zoo import stylegan2_train as st

VARIANTS = ("depthwise", "separable", "channels_last", "separable_channels_last")
REPEATS = 20

Call = tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[int, int], torch.dtype]


def record_depthwise_calls(cfg: st.TrainConfig, device: torch.device, batch: int) -> collections.Counter:
    """The depthwise convolutions (``groups == channels > 1``) of one forward pass of G's synthesis and of D at
    ``cfg``'s networks: ``(x shape, filter shape, stride, padding, dtype) -> count``."""
    gen, disc = st.build_networks(cfg, seed=0)
    gen, disc = gen.to(device), disc.to(device)
    seen: collections.Counter = collections.Counter()
    original = cdb.conv2d

    def recording(x, w, stride=1, padding=0, groups=1):
        if groups > 1 and groups == x.shape[1] and w.shape[1] == 1:
            seen[(tuple(x.shape), tuple(w.shape), _pair(stride), _pair(padding), x.dtype)] += 1
        return original(x, w, stride=stride, padding=padding, groups=groups)

    with mock.patch.object(cdb, "conv2d", recording), torch.no_grad():
        ws = gen.mapping(torch.randn(batch, cfg.z_dim, device=device), None)
        disc(gen.synthesis(ws, noise_mode="const"))
    return seen


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def binomial_factor(taps: int, device: torch.device) -> torch.Tensor:
    """The normalised 1-D binomial filter whose outer product is ``setup_filter``'s 2-D one (``[1, 3, 3, 1] / 8``
    for 4 taps)."""
    row = torch.tensor([1.0])
    for _ in range(taps - 1):
        row = F.pad(row, [0, 1]) + F.pad(row, [1, 0])
    return (row / row.sum()).to(device)


def variant_fn(name: str, call: Call, device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                      Callable[[torch.Tensor], torch.Tensor]]:
    """``(prepare, run)`` for one recorded call: ``prepare`` lays out the input, ``run`` filters it."""
    (n, c, h, w), (_, _, fh, fw), stride, padding, dtype = call
    if fh != fw:
        raise ValueError(f"a {fh} x {fw} filter: this tool times square binomial filters only")
    f1 = binomial_factor(fh, device)
    f2 = torch.outer(f1, f1)
    full = f2[None, None].repeat(c, 1, 1, 1).to(dtype)
    row = f1.view(1, 1, 1, fw).repeat(c, 1, 1, 1).to(dtype)
    col = f1.view(1, 1, fh, 1).repeat(c, 1, 1, 1).to(dtype)
    layout = torch.channels_last if name.endswith("channels_last") else torch.contiguous_format

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=layout)

    if name.startswith("separable"):
        def run(x: torch.Tensor) -> torch.Tensor:
            x = F.conv2d(x, row, stride=(1, stride[1]), padding=(0, padding[1]), groups=c)
            return F.conv2d(x, col, stride=(stride[0], 1), padding=(padding[0], 0), groups=c)
    else:
        def run(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, full, stride=stride, padding=padding, groups=c)
    return prepare, run


def compare(calls: collections.Counter, device: torch.device, variants=VARIANTS) -> list[dict]:
    """Each variant's time per pass (every call forward + backward to its input, times its count) and its largest
    difference from ``depthwise``, relative to the largest output magnitude."""
    if variants[0] != "depthwise":
        raise ValueError("the first variant must be depthwise, the reference the others are checked against")
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {call: torch.randn(call[0], generator=gen).to(device, call[4]) for call in calls}
    expected, grads = {}, {}
    rows = []
    for name in variants:
        total, worst = 0.0, 0.0
        for call, count in calls.items():
            prepare, run = variant_fn(name, call, device)
            x = prepare(inputs[call]).requires_grad_(True)
            y = run(x)
            if call not in grads:  # one upstream gradient per call, shared by every variant
                grads[call] = torch.randn(y.shape, generator=gen).to(device, y.dtype)
            grad = grads[call]
            (gx,) = torch.autograd.grad(y, x, grad)
            y, gx = y.detach().float(), gx.float()
            if name == "depthwise":
                expected[call] = (y, gx)
            ref_y, ref_g = expected[call]
            scale = max(float(ref_y.abs().max()), float(ref_g.abs().max()), 1e-12)
            worst = max(worst, float((y - ref_y).abs().max()) / scale, float((gx - ref_g).abs().max()) / scale)

            def step(x=x, run=run, grad=grad):
                torch.autograd.grad(run(x), x, grad)

            reps = dict(min_reps=REPEATS, max_reps=REPEATS) if device.type == "cuda" else dict(min_reps=3, max_reps=3)
            total += count * harness.time_cuda(step, budget_ms=0, **reps).p50_ms
        rows.append({"variant": name, "ms_per_pass": round(total, 3), "max_rel_diff": float(f"{worst:.3g}")})
    base = rows[0]["ms_per_pass"]
    for r in rows:
        r["speedup"] = round(base / r["ms_per_pass"], 3) if r["ms_per_pass"] > 0 else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="a 32 px smoke network at batch 4 on the CPU")
    args = ap.parse_args()
    if args.smoke:
        device, cfg = torch.device("cpu"), st.TrainConfig.preset(32, smoke=True)
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (or --smoke)")
        device, cfg = torch.device("cuda"), st.TrainConfig.preset(128)
        torch.backends.cudnn.benchmark = True
    calls = record_depthwise_calls(cfg, device, cfg.batch_size)
    rows = compare(calls, device)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"resolution": cfg.resolution, "batch": cfg.batch_size, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "calls": sum(calls.values()), "distinct_calls": len(calls), "rows": rows}
    for r in rows:
        print(json.dumps(r), flush=True)
    (args.out / "fir_variants.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
