"""Where an autoencoder's round trips lose their PSNR: the held-out renders of the card's evaluation, grouped by each
categorical attribute (glasses, hat, beard, hair style, ...), with the mean round-trip PSNR of every group.

Usage:
    python bench/tools/vae_psnr_by_attribute.py [VAE] [--images 256]

``VAE``: an exported AutoencoderKL folder or zoo name (default zoo:faces-vae). The PSNR is the card's (round trips of
the posterior means quantised to uint8, seeds ``world.HELD_OUT_OFFSET + i``), so the mean over all images is the
card's ``psnr_db`` at the same ``--images``. Prints one JSON line: the overall mean, then for every categorical
attribute each class's ``[images, mean PSNR]``, and the correlation of PSNR with each continuous attribute.
CPU: ~1 minute for 256 images.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dragrt.zoo import vae as zvae
from dragrt.zoo import world


def by_attribute(psnrs: np.ndarray, params: list[world.FaceParams]) -> dict[str, dict[str, list[float]]]:
    """For every categorical attribute, each class present: ``[images, mean PSNR]`` (rounded to 0.01 dB)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in world.CATEGORICAL_NAMES:
        groups: dict[str, list[float]] = {}
        for p, v in zip(params, psnrs):
            groups.setdefault(getattr(p, name), []).append(float(v))
        out[name] = {c: [len(groups[c]), round(float(np.mean(groups[c])), 2)]
                     for c in world.CATEGORICAL[name] if c in groups}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("vae", nargs="?", default="zoo:" + zvae.NAME)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args(argv)
    if args.images < 2:
        ap.error(f"--images must be at least 2, got {args.images}")
    vae = zvae.load_vae(args.vae).eval()
    size = int(vae.config.sample_size)
    renders = zvae.heldout_images(args.images, size)
    psnrs = zvae.psnr(zvae.to_uint8(zvae.round_trips(vae, renders)), renders).numpy()
    params = [world.sample_params(s) for s in world.held_out_seeds(args.images)]
    continuous = {name: round(float(np.corrcoef([getattr(p, name) for p in params], psnrs)[0, 1]), 3)
                  for name in world.CONTINUOUS}
    print(json.dumps({"vae": args.vae, "images": args.images, "psnr_db": round(float(psnrs.mean()), 3),
                      "by_class": by_attribute(psnrs, params), "correlation_with_continuous": continuous}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
