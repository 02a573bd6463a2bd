"""Can faces-vae's encoder, as it is built, reach what its decoder allows? The question after
``vae_decoder_bound.py`` found the decoder far better on optimised latents than on the encoder's.

Usage:
    python bench/tools/vae_encoder_capacity.py [VAE] [--images 8] [--steps 300] [--lr 3e-4] [--bound-steps 200]

An overfitting test: the encoder alone (decoder frozen, as ``--encoder-only`` trains it) is trained with Adam on
the mean squared error of its round trips of ``--images`` fixed held-out renders, the whole set every step, and
the PSNR of those round trips is printed every 25 steps, next to the decoder's bound on the same images (latents
optimised against the frozen decoder, :func:`vae_decoder_bound.decoder_bound`). An encoder that cannot even fit a
handful of images up to the bound is short of capacity (a wider encoder is the lever, not more steps); one that
fits them quickly but gains little on held-out faces in training is short of steps or data per step. Prints one
JSON line. CPU: 8 images x 300 steps take about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_decoder_bound import decoder_bound  # noqa: E402

from dragrt.zoo import vae as zvae  # noqa: E402


def encoder_fit(vae, images_u8: torch.Tensor, steps: int, lr: float) -> dict:
    """Train ``vae``'s encoder (and quant_conv) alone on ``images_u8``; PSNR of its round trips every 25 steps."""
    target = images_u8.float() / 127.5 - 1
    vae.requires_grad_(False)
    params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)

    def psnr() -> float:
        with torch.no_grad():
            return round(zvae.psnr(zvae.to_uint8(zvae.round_trips(vae, images_u8)), images_u8).mean().item(), 3)

    curve = [{"step": 0, "psnr": psnr(), "seconds": 0.0}]
    t0 = time.monotonic()
    for i in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        z = vae.encode(target).latent_dist.mean
        (vae.decode(z).sample - target).square().mean().backward()
        opt.step()
        if i % 25 == 0 or i == steps:
            curve.append({"step": i, "psnr": psnr(), "seconds": round(time.monotonic() - t0, 1)})
            print(json.dumps(curve[-1]), file=sys.stderr, flush=True)
    return {"encoder_fit": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", nargs="?", default="zoo:faces-vae", help="exported AutoencoderKL folder or zoo:NAME")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--bound-steps", type=int, default=200, help="decoder-bound steps (0: skip the bound)")
    parser.add_argument("--start", type=int, default=0, help="first held-out index")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = zvae.load_vae(args.vae)  # the bound leaves it as loaded; the fit below trains a fresh copy
    images = zvae.heldout_images(args.images, int(vae.config.sample_size), start=args.start)
    out = {"vae": args.vae, "images": args.images, "lr": args.lr}
    if args.bound_steps > 0:
        bound = decoder_bound(vae, images, args.bound_steps)
        out["decoder_bound"] = {"encoder_latents_mean": bound["encoder_latents_mean"],
                                "optimised_mean": bound["optimised"][-1]["mean"]}
        print(json.dumps(out["decoder_bound"]), file=sys.stderr, flush=True)
    out.update(encoder_fit(zvae.load_vae(args.vae), images, args.steps, args.lr))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
