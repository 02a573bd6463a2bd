"""Where the zoo trainers spend their time: the numbers behind CONTRIBUTING.md's notes on them.

Usage:
    python bench/tools/profile_zoo.py flops                 # any machine: FLOPs, saved activations, op counts
    python bench/tools/profile_zoo.py loader OUT            # GPU machine: renders/s of the loader
    python bench/tools/profile_zoo.py {vae,unet,sg2} OUT    # GPU machine: a real training loop, hooked
    python bench/tools/profile_zoo.py unet-graphs OUT        # ... faces-sd with its step replayed (--cuda-graphs)
    python bench/tools/profile_zoo.py sg2-128 OUT            # the same, StyleGAN2 at 128 px (preset batch)
    python bench/tools/profile_zoo.py sg2-128-graphs OUT     # ... with every part replayed from a CUDA graph
    python bench/tools/profile_zoo.py sg2-128-graphs-cl OUT  # ... and the networks in channels-last memory
    python bench/tools/profile_zoo.py sg2-128-graphs-refdb OUT  # ... the regularisers through PyTorch's own double
                                                                #     backward (the reference of conv_double_backward)
    python bench/tools/profile_zoo.py sg2-128-graphs-compile OUT  # ... the main steps compiled (--compile default)

``vae``/``unet``/``sg2`` run the trainer's own ``train`` and hook its once-per-step EMA update: the step rate
between steps 60 and 160 (one synchronise at each end), then a torch.profiler window of 10 steps
(``record_shapes=False``, ``key_averages`` only: a full table of a run takes minutes to build), written to
``OUT/WHAT_prof.txt``; the run is then stopped. Each prints one JSON line and writes ``OUT/WHAT.json``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from dragrt.bench import harness

T0, T1, P0, P1 = 60, 160, 165, 175  # step window timed, then the profiled window


class _Stop(Exception):
    pass


class StepHook:
    """Counts training steps; times ``[T0, T1)``, profiles ``[P0, P1)``, then stops the run."""

    def __init__(self, out: Path, what: str, result: dict) -> None:
        self.out, self.what, self.result, self.n = out, what, result, 0
        self.start = time.monotonic()  # the run's set-up, compiling and capturing included up to T0

    def __call__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.n += 1
        if self.n in (T0, T1, P0, P1):
            torch.cuda.synchronize()
        now = time.monotonic()
        if self.n == T0:
            self.t0 = now
            self.result[f"seconds_to_step_{T0}"] = round(now - self.start, 1)
        elif self.n == T1:
            self.result["steps_per_s_loop"] = round((T1 - T0) / (now - self.t0), 2)
        elif self.n == P0:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False)
            self.prof.__enter__()
            self.tp = now
        elif self.n == P1:
            self.prof.__exit__(None, None, None)
            summary = harness.profile_summary(self.prof, P1 - P0, now - self.tp, self.out / f"{self.what}_prof.txt")
            self.result.update(prof_wall_ms_per_step=summary["prof_wall_ms"],
                               kernels_per_step=summary["kernels_per_call"],
                               gpu_busy_ms_per_step=summary["gpu_busy_ms"])
            raise _Stop()


def hooked_run(what: str, out: Path) -> dict:
    from dragrt.zoo import stylegan2_train as sg2t
    from dragrt.zoo import unet as zunet
    from dragrt.zoo import vae as zvae

    result: dict = {}
    hook = StepHook(out, what, result)
    if what.startswith("sg2"):
        kw = {"resolution": 128} if "128" in what else {}
        kw["cuda_graphs"] = "-graphs" in what
        kw["channels_last"] = what.endswith("-cl")
        kw["compile_mode"] = "default" if what.endswith("-compile") else None
        module, name = sg2t, "_update_ema"
        # -refdb: the trainer's regulariser steps ask for cdb.enabled(), and get a context that leaves it off
        paths = (mock.patch.object(sg2t.cdb, "enabled", lambda on=True: contextlib.nullcontext())
                 if what.endswith("-refdb") else contextlib.nullcontext())

        def run() -> None:
            with paths:
                sg2t.train(out / "run", minutes=4, evaluate_metrics=False, **kw)
    else:
        module, name = zvae.Ema, "update"
        trainer = zvae if what == "vae" else zunet
        kw = {"cuda_graphs": True} if what == "unet-graphs" else {}
        run = lambda: trainer.train(out / f"run-{what}", minutes=3, **kw)  # noqa: E731
    original = getattr(module, name)

    def hooked(*args, **kwargs):
        original(*args, **kwargs)
        hook()

    setattr(module, name, hooked)
    try:
        run()
    except _Stop:
        pass
    finally:
        setattr(module, name, original)
    return result


def loader_rates() -> dict:
    from dragrt.zoo import vae as zvae

    def rate(batch: int, workers: int, n: int = 100) -> float:
        s = zvae.BatchStream(batch, seed=0, step=0, size=256, num_workers=workers, device=torch.device("cuda"))
        for _ in range(20):
            next(s)
        torch.cuda.synchronize()
        t = time.monotonic()
        for _ in range(n):
            next(s)
        torch.cuda.synchronize()
        s.close()
        return round(n * batch / (time.monotonic() - t), 1)

    return {"renders_per_s_b32_w14": rate(32, 14), "renders_per_s_b64_w14": rate(64, 14),
            "renders_per_s_b64_w7": rate(64, 7), "cpus": len(os.sched_getaffinity(0))}


def flops() -> dict:
    """FLOPs (torch.utils.flop_counter) and saved activations of one training step per sample, and the aten ops
    dispatched by one StyleGAN2 iteration; on whatever device is here (the CPU is fine)."""
    from diffusers import DDIMScheduler
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG
    from dragrt.zoo import stylegan2_train as sg2t
    from dragrt.zoo import unet as zunet
    from dragrt.zoo import vae as zvae

    def count(fn, n: int) -> tuple[float, float]:
        saved: list[int] = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().backward()
        return fc.get_total_flops() / n / 1e9, sum(saved) / n / 1e6

    out = {}
    torch.manual_seed(0)
    unet = zunet.build_unet(zunet.unet_config(256)).train()
    ac = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(4, 4, 32, 32), torch.randn(4, 77, 256)
    out["unet_gflop_per_sample"], out["unet_saved_mb_per_sample_fp32"] = count(
        lambda: zunet.diffusion_loss(unet, x0, text, ac, g, min_snr_gamma=5.0), 4)
    vae = zvae.build_vae().train()
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    out["vae_gflop_per_image"], out["vae_saved_mb_per_image_fp32"] = count(
        lambda: zvae.vae_loss(vae, x, zvae.HPARAMS)[0], 2)
    reals = itertools.repeat(torch.rand(4, 3, 256, 256) * 2 - 1)
    with tempfile.TemporaryDirectory() as d:
        kw = dict(minutes=30, device="cpu", max_steps=1, evaluate_metrics=False, reals=reals)
        sg2t.train(Path(d), config_overrides=dict(batch_size=4, num_workers=0), **kw)  # step 0: lazy regs too
        with profile(activities=[ProfilerActivity.CPU]) as p:
            sg2t.train(Path(d), **kw)  # a resumed chunk of one plain iteration (resume and save included)
    out["sg2_aten_ops_per_iteration"] = sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "flops":
        print(json.dumps(flops()))
        return 0
    if what not in ("loader", "vae", "unet", "unet-graphs", "sg2", "sg2-128", "sg2-128-graphs", "sg2-128-graphs-cl",
                    "sg2-128-graphs-refdb", "sg2-128-graphs-compile") or len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = loader_rates() if what == "loader" else hooked_run(what, out)
    (out / f"{what}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
