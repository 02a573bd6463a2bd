"""Rank faces-stylegan2 exports of different resolutions on one scale.

Usage:
    python bench/tools/compare_generators.py EXPORT [EXPORT ...] [--resolution 64] [--samples 2000] [--device cpu]

The Frechet distance in the attribute classifier's feature space and the landmark regressor's confidence depend
on the resolution compared at: a 64 px generator's samples are measured against 64 px renders, a 128 px one's
against 128 px renders, so their card numbers do not rank them. This tool evaluates every export at one
resolution (default: the lowest among them): samples area-downsampled to it, held-out renders drawn at it
(``stylegan2_train.evaluate(..., resolution=R)``, the same samples, seeds and renders as the cards' metrics).
An EXPORT is a folder written by ``python -m dragrt.zoo.stylegan2_train --export`` or a ``zoo:`` name. Prints one
JSON line per export. CPU is fine: two exports at 2 000 samples take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dragrt.runtime.models.stylegan2 import Generator
from dragrt.zoo import stylegan2_train as st


def load_export(path: str) -> tuple[Generator, st.TrainConfig]:
    """The EMA generator of an export (float32, eval mode) and the configuration it was trained with."""
    start = st.shipped_start(path)
    gen = Generator.from_config(start.config.generator_config())
    gen.load_state_dict(start.generator)
    return gen.eval().requires_grad_(False), start.config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", metavar="EXPORT")
    ap.add_argument("--resolution", type=int, default=None, help="compare at this resolution (default: the lowest)")
    ap.add_argument("--samples", type=int, default=None,
                    help="samples and renders per export (default: each export's own eval_samples / eval_reals)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    loaded = []
    for path in args.exports:
        try:
            loaded.append((path, *load_export(path)))
        except (ValueError, FileNotFoundError) as exc:
            ap.error(str(exc))
    res = args.resolution or min(cfg.resolution for _, _, cfg in loaded)
    device = torch.device(args.device)
    for path, gen, cfg in loaded:
        t0 = time.monotonic()
        try:
            if args.samples is not None:
                cfg = st.TrainConfig.from_dict({**cfg.to_dict(), "eval_samples": args.samples,
                                                "eval_reals": args.samples})
            metrics = st.evaluate(gen.to(device), cfg, device, resolution=res)
        except ValueError as exc:
            ap.error(f"{path}: {exc}")
        print(json.dumps({"export": path, "generator_resolution": cfg.resolution, **metrics,
                          "seconds": round(time.monotonic() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
