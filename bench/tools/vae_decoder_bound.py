"""How well could a faces-vae decoder reconstruct with better latents? The question behind choosing which half of
the autoencoder to train next.

Usage:
    python bench/tools/vae_decoder_bound.py [VAE] [--images 4] [--steps 200] [--start 0]

For each of ``--images`` held-out renders (seeds ``world.HELD_OUT_OFFSET + start + i``), the encoder's posterior
mean is decoded (the round trip the VAE's PSNR measures), then the latent alone is optimised against the frozen
decoder (Adam, lr 0.02, mean squared error: PSNR's own loss) for ``--steps`` steps. If the optimised latents
reconstruct far better than the encoder's, the decoder is not the bottleneck: train the encoder
(``--encoder-only``), which leaves a diffusion model's samples exactly as they are. Prints one JSON line: PSNR of
the encoder's latents and of the optimised ones (mean and per image, every 50 steps) and how far the latents
moved (``|z - z_enc| / |z_enc|``). CPU is fine: 4 images x 200 steps take about 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from dragrt.zoo import vae as zvae


def optimise_latents(vae, images_u8: torch.Tensor, steps: int, lr: float = 0.02,
                     every: int = 50) -> Iterator[tuple[int, torch.Tensor]]:
    """Latents optimised against ``vae``'s frozen decoder for ``images_u8`` (Adam from the encoder's posterior
    means, mean squared error: PSNR's own loss): ``(step, latents)`` at step 0, every ``every`` steps and at the
    last."""
    target = images_u8.float() / 127.5 - 1
    z = zvae.posterior_means(vae, images_u8).requires_grad_(True)
    yield 0, z.detach().clone()
    opt = torch.optim.Adam([z], lr=lr)
    for i in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        (vae.decode(z).sample - target).square().mean().backward()
        opt.step()
        if i % every == 0 or i == steps:
            yield i, z.detach().clone()


def decoder_bound(vae, images_u8: torch.Tensor, steps: int, lr: float = 0.02) -> dict:
    """PSNR (dB) of ``vae``'s round trips of ``images_u8`` and of its decoder on latents optimised for them."""

    def psnr(z: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return [round(v, 3) for v in zvae.psnr(zvae.to_uint8(vae.decode(z).sample), images_u8).tolist()]

    out: dict = {"encoder_latents_psnr": None, "optimised": []}
    t0 = time.monotonic()
    for i, z in optimise_latents(vae, images_u8, steps, lr):
        p = psnr(z)
        if i == 0:
            z_enc = z
            out["encoder_latents_psnr"] = p
            continue
        out["optimised"].append({"step": i, "psnr": p, "mean": round(sum(p) / len(p), 3),
                                 "latent_change": round(((z - z_enc).norm() / z_enc.norm()).item(), 4),
                                 "seconds": round(time.monotonic() - t0, 1)})
    enc = out["encoder_latents_psnr"]
    out["encoder_latents_mean"] = round(sum(enc) / len(enc), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", nargs="?", default="zoo:faces-vae", help="exported AutoencoderKL folder or zoo:NAME")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="first held-out index")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = zvae.load_vae(args.vae)  # fp32, frozen, eval
    images = zvae.heldout_images(args.images, int(vae.config.sample_size), start=args.start)
    print(json.dumps({"vae": args.vae, "images": args.images, **decoder_bound(vae, images, args.steps)}))


if __name__ == "__main__":
    main()
