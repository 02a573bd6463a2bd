"""Where DragDiffusion's per-image LoRA step spends its time on a GPU (issue #6: LoRA at most ~4 s of a 5 s edit).

Usage (GPU machine, full-size SD1.5-config UNet with random weights, 512 px, batch 4, rank 16):

    python bench/tools/profile_lora.py OUT [VARIANT ...]

Each variant runs the fast trainer's step (``lora._train_fast``'s maths: posterior sample, noise, timesteps,
``add_noise``, UNet under autocast, MSE, backward, fused AdamW) with one change, and reports ms per step from
the median of 15 steps (CUDA events) after 5 warm-up steps (CUDA-graph variants: after capture). Variants:

- ``base``: as shipped (fp16 UNet, fp16 autocast, GradScaler, peft layers);
- ``cudnn``: ``torch.backends.cudnn.benchmark = True``;
- ``cl``: the UNet and its input in channels-last;
- ``bf16``: a bf16 UNet under bf16 autocast, no GradScaler;
- ``nolora``: no LoRA, gradients to the input only (the floor of this step's maths);
- ``graph``: ``base`` with the whole step (forward, backward, GradScaler, AdamW) captured in one CUDA graph;
- ``graph-bf16``: ``bf16`` captured likewise;
- ``graph-cl``: ``graph`` in channels-last;
- ``compile-graph``: ``graph`` with the UNet's blocks compiled (``torch.compile``, default mode) first;
- any other dash-joined set of the tokens ``compile``, ``graph``, ``cl``, ``bf16``, ``cudnnattn`` (the engine's
  ``attention="cudnn"``: SDPA tries cuDNN's fused attention first), ``cudnnbench``
  (``torch.backends.cudnn.benchmark = True``: the convolutions' algorithms timed at warm-up instead of picked by
  heuristics; the runtime leaves it off),
  ``merged`` (each LoRA layer one matmul with ``W + B @ A``: ``train_image_lora(lora_forward="merged")``),
  ``fusedqkv`` (dragrt's SDPA processors stacking the self-attention q/k/v projections: with ``merged``, the
  LoRA layers' merged weights too; without it, peft's layers keep three calls) and ``prof`` (the kernel table
  of this variant to ``OUT/lora_prof_<variant>.txt``), e.g. ``compile-graph-cl`` (what ships: the fast engine
  compiles its blocks on a channels-last UNet) or ``compile-graph-cl-cudnnattn``;
- ``fwd1``, ``fwd2``, ``fwd1-cl``, ``fwd2-cl``: not training: one UNet forward at batch 1 / 2 (the inversion's and
  the final denoise's), eager, captured in a CUDA graph, NCHW or channels-last, cuDNN benchmark on.

``base`` is also profiled (3 steps, torch.profiler): the top CUDA kernels go to ``OUT/lora_prof.txt``. One JSON
line per variant is printed and all of them are written to ``OUT/lora.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dragrt.bench import harness

WARMUP, STEPS = 5, 15


def make_step(sd, variant: str):
    """A zero-argument step for ``variant`` (``sd`` is changed in place: build a fresh one per variant)."""
    from dragrt.runtime.inversion import encode_prompt
    from dragrt.runtime.models import lora as L
    from dragrt.runtime.models.attention import set_attention_backend

    unet, vae = sd.unet, sd.vae
    dev = torch.device("cuda")
    if variant.startswith("fwd"):
        return make_forward(sd, variant)
    tokens = set(variant.split("-"))
    bf16 = "bf16" in tokens
    cl = "cl" in tokens
    compiled = "compile" in tokens
    if compiled:
        from dragrt.runtime.engines.dragdiffusion import _compile_blocks
    dtype = torch.bfloat16 if bf16 else torch.float16
    unet.to(dtype)
    if cl:
        unet.to(memory_format=torch.channels_last)
    cfg = L.LoRAConfig()
    emb = encode_prompt(sd, "a photo of a cat").to(dtype).repeat(4, 1, 1)
    torch.manual_seed(0)
    unet.requires_grad_(False)
    # dragrt's processors in every variant, as a fast engine sets them on the UNet its LoRA trains on
    set_attention_backend(unet, "cudnn" if "cudnnattn" in tokens else "sdpa", fuse_qkv="fusedqkv" in tokens)
    params = []
    if variant != "nolora":
        layers = L._inject(unet, cfg, dev)
        params = [w for _, lay in layers for w in (lay.lora_A[L._ADAPTER].weight, lay.lora_B[L._ADAPTER].weight)]
        for _, lay in layers:  # as the fast trainer: no fp32 round trip of each layer's input under autocast
            lay.cast_input_dtype_enabled = False
        if "merged" in tokens:
            L._merged_forwards(layers).__enter__()  # this variant's UNet is thrown away afterwards
    if compiled:
        _compile_blocks(unet, "default")
    add_noise = L._AddNoise(L._ddpm(sd).alphas_cumprod, dev, torch.float16)
    img = torch.rand(4, 3, 512, 512, device=dev, dtype=torch.float16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(img).latent_dist
    mean, std = dist.mean, dist.std
    graphed = "graph" in tokens
    scaler = None if bf16 else torch.amp.GradScaler("cuda")
    opt = (torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2, fused=True, capturable=graphed)
           if params else None)
    probe = torch.zeros(4, 4, 64, 64, device=dev, requires_grad=True) if not params else None

    def body() -> None:
        x0 = (mean + std * torch.randn(mean.shape, device=dev, dtype=mean.dtype)) * 0.18215
        if cl:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (4,), device=dev)
        noisy = add_noise(x0, noise, t)
        if probe is not None:
            noisy = noisy + probe
        with torch.autocast("cuda", dtype=dtype):
            pred = unet(noisy, t, emb, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        if opt is None:
            loss.backward()
            probe.grad = None
            return
        L._optimizer_step(loss, opt, scaler)

    return harness.captured(body) if graphed else body


def make_forward(sd, variant: str):
    from dragrt.runtime.inversion import encode_prompt

    unet, dev = sd.unet, torch.device("cuda")
    b = int(variant[3])
    fmt = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
    unet.to(memory_format=fmt)
    emb = encode_prompt(sd, "a photo of a cat").repeat(b, 1, 1)
    x = torch.randn(b, 4, 64, 64, device=dev, dtype=torch.float16).contiguous(memory_format=fmt)
    t = torch.tensor(500, device=dev)
    with torch.inference_mode():
        return harness.captured(lambda: unet(x, t, emb, return_dict=False))


def time_steps(step) -> float:
    """ms per step: the median of STEPS calls (CUDA events) after WARMUP untimed ones."""
    for _ in range(WARMUP):
        step()
    return harness.time_cuda(step, warmup_ms=0, budget_ms=0, min_reps=STEPS).p50_ms


def main(out: Path, variants: list[str]) -> None:
    from dragrt.runtime.models.sd import build_random_sd15

    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in variants:
        torch.backends.cudnn.benchmark = v == "cudnn" or v.startswith("fwd") or "cudnnbench" in v.split("-")
        sd = build_random_sd15(torch.float16, "cuda")
        t = time.perf_counter()
        try:
            step = make_step(sd, v)
            r = {"variant": v, "setup_s": round(time.perf_counter() - t, 1), "ms_per_step": round(time_steps(step), 2),
                 "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
            if v == "base":
                r.update(harness.kernel_profile(step, 3, out / "lora_prof.txt"))
            elif "prof" in v.split("-"):
                r.update(harness.kernel_profile(step, 3, out / f"lora_prof_{v}.txt"))
        except Exception as e:  # noqa: BLE001 - a failed variant is a result too
            r = {"variant": v, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(r), flush=True)
        results[v] = r
        (out / "lora.json").write_text(json.dumps(results, indent=1))
        del sd
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["base", "cudnn", "cl", "bf16", "nolora", "graph", "graph-bf16",
                                              "graph-cl", "fwd1", "fwd1-cl", "fwd2", "fwd2-cl", "compile-graph"])
