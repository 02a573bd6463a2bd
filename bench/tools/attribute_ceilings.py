"""Is it the autoencoder or the instrument? The attribute classifier (zoo:faces-attributes) on held-out renders
after degradations of known size, against the same renders after a VAE round trip.

Usage:
    python bench/tools/attribute_ceilings.py [VAE] [--images 256] [--bound-images 0] [--bound-steps 150]

For ``--images`` held-out renders (the captions and seeds of faces-sd's evaluation): categorical accuracy, mean and
per attribute, and PSNR against the render, of the clean renders, Gaussian blurs (sigma 1, 1.5, 2 px), area
down-sampling by 2 and 4 then bilinear up-sampling, Gaussian noise (std 0.05 of the [-1, 1] range), and the round
trips through ``VAE`` (default zoo:faces-vae). A classifier that keeps its accuracy under blurs as strong (in PSNR)
as the round trip, while the round trip loses it, is a sound instrument: the autoencoder changes what it
measures, not only how sharp it is. With ``--bound-images M``, the first M renders are also decoded from latents
optimised for the decoder (``vae_decoder_bound.py``, ``--bound-steps`` Adam steps): if those score far better than
the round trips, the encoder loses the attributes (and so do the latents a diffusion model is trained on); if not,
the decoder does. Prints one JSON line. CPU: ~2 minutes for 256 images; the bound ~1.2 s a step per 4 images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dragrt.zoo import unet as zunet
from dragrt.zoo import vae as zvae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_decoder_bound import optimise_latents  # noqa: E402


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` (reflected edges; taps out to 3 sigma)."""
    half = max(1, round(3 * sigma))
    taps = torch.exp(-torch.arange(-half, half + 1, dtype=x.dtype) ** 2 / (2 * sigma * sigma))
    taps = taps / taps.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, half, half), mode="reflect"), taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    small = F.interpolate(x, scale_factor=1 / factor, mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean PSNR (dB) of ``x`` against ``ref`` (both [-1, 1]), as the VAE's metric: on uint8 pixels."""
    return round(zvae.psnr(zvae.to_uint8(x), zvae.to_uint8(ref)).mean().item(), 3)


def row(model, images: torch.Tensor, renders: torch.Tensor, target: torch.Tensor) -> dict:
    acc = zunet.attribute_accuracy(model, images, target)
    return {"psnr_db": None if torch.equal(images, renders) else psnr(images, renders),  # None: the renders
            "accuracy": acc["mean"], "per_attribute": acc["per_attribute"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", nargs="?", default="zoo:faces-vae", help="exported AutoencoderKL folder or zoo:NAME")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--bound-images", type=int, default=0, help="renders also decoded from optimised latents")
    parser.add_argument("--bound-steps", type=int, default=150)
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 100_000 or not 0 <= args.bound_images <= args.images or args.bound_steps < 1:
        parser.error("--images must be 1..100000, --bound-images 0..--images and --bound-steps >= 1")
    from dragrt.zoo.evaluators import load_attribute_model

    torch.manual_seed(0)
    model = load_attribute_model(zunet.DEFAULT_ATTRIBUTES, torch.device("cpu"))
    vae = zvae.load_vae(args.vae)
    _, target = zunet.heldout_captions(args.images)
    renders_u8 = zvae.heldout_images(args.images, int(vae.config.sample_size))
    renders = renders_u8.float() / 127.5 - 1
    variants = {
        "renders": renders,
        "blur_sigma_1": gaussian_blur(renders, 1.0), "blur_sigma_1.5": gaussian_blur(renders, 1.5),
        "blur_sigma_2": gaussian_blur(renders, 2.0),
        "down_up_2": down_up(renders, 2), "down_up_4": down_up(renders, 4),
        "noise_0.05": (renders + 0.05 * torch.randn_like(renders)).clamp(-1, 1),
        "vae_round_trips": zvae.round_trips(vae, renders_u8),
    }
    out = {"vae": args.vae, "images": args.images,
           "variants": {name: row(model, x, renders, target) for name, x in variants.items()}}
    m = args.bound_images
    if m:
        *_, (steps, z) = optimise_latents(vae, renders_u8[:m], args.bound_steps)
        with torch.no_grad():
            decoded = zvae._decode(vae, z, 8)  # round_trips' batched decode, on these latents
        out["bound"] = {"images": m, "steps": steps,
                        "vae_round_trips": row(model, variants["vae_round_trips"][:m], renders[:m], target[:m]),
                        "optimised_latents": row(model, decoded, renders[:m], target[:m])}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
