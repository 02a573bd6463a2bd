"""The StyleGAN2 trainer's lazy regularisers, which differentiate twice: ours = their convolutions through
``conv_double_backward`` (what ``zoo/stylegan2_train.py`` runs), reference = PyTorch's own double backward of
the same convolutions (the plain ``F.conv2d`` path). Same networks, same draws, same work otherwise.

On CUDA: the zoo's 128 px preset (``GPU_PRESET_128``: fp16 in the top four resolutions, batch 32, path length
at batch 16), eager (the trainer replays these steps from CUDA graphs: ``profile_zoo.py sg2-128-graphs`` against
``sg2-128-graphs-refdb`` times whole training steps). On the CPU: the 64 px preset of the CPU run (batch 16).
Each record keeps the largest relative difference between the two paths' weight gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dragrt.bench import harness
from dragrt.bench.scenarios import register


@register("sg2-regularisers", needs_cuda=False,
          description="StyleGAN2 trainer: R1 and path-length steps, twice-differentiable convs vs PyTorch's")
def sg2_regularisers(budget_ms: float, quick: bool) -> list[dict[str, Any]]:
    from dragrt.runtime.models import conv_double_backward as cdb
    from dragrt.zoo import stylegan2_train as st

    cuda = harness.cuda_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = st.TrainConfig(**(st.GPU_PRESET_128 if cuda else st.CPU_PRESET_64))
    gen, disc = st.build_networks(cfg, seed=0)
    gen, disc = gen.to(dev).train(), disc.to(dev).train()
    pl_batch = max(cfg.batch_size // cfg.pl_batch_shrink, 1)
    reals = torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1

    def path_length_step() -> list[torch.Tensor]:
        ws = st.mix_styles(gen, torch.randn(pl_batch, cfg.z_dim, device=dev), cfg.style_mixing_prob)
        st.path_lengths(gen.synthesis(ws, noise_mode="random"), ws).mean().backward()
        return [p.grad for p in gen.parameters()]

    def r1_step() -> list[torch.Tensor]:
        penalty, _ = st.r1_penalty(disc, reals)
        penalty.mean().backward()
        return [p.grad for p in disc.parameters()]

    def timed(step: Callable[[], list[torch.Tensor]], nets: tuple[torch.nn.Module, ...], twice: bool
              ) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            for net in nets:
                net.zero_grad(set_to_none=True)
            with cdb.enabled(twice):
                return step()
        return run

    records = []
    for name, step, nets in (("path-length", path_length_step, (gen,)), ("r1", r1_step, (disc,))):
        grads = {}
        for twice in (True, False):  # the same draws for both: the gradients must agree
            torch.manual_seed(0)
            grads[twice] = [g.float().clone() for g in timed(step, nets, twice)() if g is not None]
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                   for a, b in zip(grads[True], grads[False]))
        reps = {"budget_ms": budget_ms, "min_reps": 5 if quick else 10, "max_reps": 50 if quick else 200}
        ours = harness.time_cuda(timed(step, nets, True), **reps)
        reference = harness.time_cuda(timed(step, nets, False), **reps)
        batch = pl_batch if name == "path-length" else cfg.batch_size
        records.append(harness.make_record(
            f"sg2-regularisers.{cfg.resolution}.{name}",
            {"resolution": cfg.resolution, "batch": batch, "device": dev.type, "num_fp16_res": cfg.num_fp16_res,
             "channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
             "threads": torch.get_num_threads()},
            ours, reference,
            extra={"max_relative_grad_diff": diff}))
    return records
