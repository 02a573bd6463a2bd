"""Why the zoo's diffusion trainers run far below their arithmetic: one training step, timed alone, in variants.

Usage (GPU machine):

    python bench/tools/zoo_step_variants.py unet OUT [VARIANT ...]
    python bench/tools/zoo_step_variants.py vae OUT [VARIANT ...]
    python bench/tools/zoo_step_variants.py {unet,vae} OUT --smoke   # any machine: tiny batch on the CPU

``unet``: the faces-sd UNet (the shipped config, ``zoo.unet.unet_config(128)``, random weights) at the trainer's
batch 256 on 32 x 32 latents with 77 text states: ``diffusion_loss`` (min-SNR 5) under bf16 autocast, backward,
gradient clipping, fused AdamW -- the trainer's step without its data. The step costs ~1 TFLOP (``profile_zoo.py
flops``: 4.0 GFLOP a sample) and took 148 ms on an H200 (2026-12-04): 15x its arithmetic. ``vae``: the faces-vae
loss step (``vae_loss``) at batch 32 on 256 px images.

A variant is a dash-joined set of tokens: ``base`` (as the trainer), ``cl`` (the network and its input in
channels-last), ``compile`` (the trainer's ``--compile default``: blocks / encoder and decoder compiled),
``graph`` (the whole step captured in one CUDA graph, capturable AdamW; unet only), ``fp32`` (no autocast),
``math`` / ``flash`` / ``efficient`` / ``cudnn`` (SDPA restricted to that kernel), ``prof`` (the kernel table
to ``OUT/<what>_<variant>_prof.txt``). Each prints one JSON line (ms per step: the median of 20 steps, CUDA
events, after a second of warm-up) and all go to ``OUT/<what>_variants.json``. Default variants: ``base-prof cl
compile flash efficient math graph`` (unet), ``base-prof cl compile`` (vae).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from dragrt.bench import harness

STEPS = 20
DEFAULTS = {"unet": ["base-prof", "cl", "compile", "flash", "efficient", "math", "graph"],
            "vae": ["base-prof", "cl", "compile"]}


def _sdpa_only(tokens: set[str]):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = [b for name, b in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION),
                                ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION))
              if name in tokens]
    return (lambda: sdpa_kernel(chosen)) if chosen else contextlib.nullcontext


def make_unet_step(tokens: set[str], dev: torch.device, smoke: bool):
    from diffusers import DDIMScheduler

    from dragrt.runtime.models.sd import SD15_SCHEDULER_CONFIG
    from dragrt.zoo import training
    from dragrt.zoo import unet as zunet

    config = zunet.unet_config(128)  # the shipped faces-sd UNet's (faces-clip's text states are 128 wide)
    torch.manual_seed(0)
    unet = zunet.build_unet(config).to(dev).train()
    batch = 4 if smoke else 256
    fmt = torch.channels_last if "cl" in tokens else torch.contiguous_format
    unet.to(memory_format=fmt)
    x0 = torch.randn(batch, 4, 32, 32, device=dev).contiguous(memory_format=fmt)
    text = torch.randn(batch, 77, config["cross_attention_dim"], device=dev)
    ac = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod.to(dev)
    if "compile" in tokens:
        training.compile_forwards([*unet.down_blocks, unet.mid_block, *unet.up_blocks], "default")
    graphed = "graph" in tokens and dev.type == "cuda"
    opt = torch.optim.AdamW(unet.parameters(), lr=4e-4, weight_decay=0.01,
                            **({"fused": True, "capturable": graphed} if dev.type == "cuda" else {"foreach": True}))
    autocast = (contextlib.nullcontext() if "fp32" in tokens or dev.type != "cuda"
                else torch.autocast("cuda", dtype=torch.bfloat16))
    attention = _sdpa_only(tokens)

    def body() -> None:
        with autocast, attention():
            loss = zunet.diffusion_loss(unet, x0, text, ac, None, min_snr_gamma=5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0, foreach=True)
        opt.step()

    return harness.captured(body) if graphed else body


def make_vae_step(tokens: set[str], dev: torch.device, smoke: bool):
    from dragrt.zoo import training
    from dragrt.zoo import vae as zvae

    torch.manual_seed(0)
    vae = zvae.build_vae().to(dev).train()
    fmt = torch.channels_last if "cl" in tokens else torch.contiguous_format
    vae.to(memory_format=fmt)
    batch, size = (2, 64) if smoke else (32, 256)
    images = (torch.rand(batch, 3, size, size, device=dev) * 2 - 1).contiguous(memory_format=fmt)
    if "compile" in tokens:
        training.compile_forwards([vae.encoder, vae.decoder], "default")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.9, 0.99),
                            **({"fused": True} if dev.type == "cuda" else {"foreach": True}))
    autocast = (contextlib.nullcontext() if "fp32" in tokens or dev.type != "cuda"
                else torch.autocast("cuda", dtype=torch.bfloat16))
    gen = torch.Generator(dev).manual_seed(0)
    attention = _sdpa_only(tokens)

    def body() -> None:
        with autocast, attention():
            loss, _ = zvae.vae_loss(vae, images, zvae.HPARAMS, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0, foreach=True)
        opt.step()

    return body


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--smoke"]
    smoke = "--smoke" in argv
    if len(args) < 2 or args[0] not in DEFAULTS:
        print(__doc__, file=sys.stderr)
        return 2
    what, out = args[0], Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if smoke else "cuda")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # as the trainers (zoo.vae.setup_torch)
    make = make_unet_step if what == "unet" else make_vae_step
    results = {}
    for variant in args[2:] or DEFAULTS[what]:
        tokens = set(variant.split("-"))
        torch._dynamo.reset()
        t = time.perf_counter()
        try:
            step = make(tokens, dev, smoke)
            timing = harness.time_cuda(step, warmup_ms=0 if smoke else 1000, budget_ms=0,
                                       min_reps=2 if smoke else STEPS)
            r = {"what": what, "variant": variant, "ms_per_step": round(timing.p50_ms, 2),
                 "setup_s": round(time.perf_counter() - t, 1)}
            if dev.type == "cuda":
                r["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if "prof" in tokens:
                r.update(harness.kernel_profile(step, 3, out / f"{what}_{variant}_prof.txt"))
        except Exception as e:  # noqa: BLE001 - a failed variant is a result too
            r = {"what": what, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(r), flush=True)
        results[variant] = r
        (out / f"{what}_variants.json").write_text(json.dumps(results, indent=1))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
