"""Does faces-sd know what a caption leaves out? Its captions name glasses, a hat or a beard only when a face has
one, so "no beard" is said by silence. This samples the same held-out captions twice at one CFG scale: with the
empty negative prompt (as the card's evaluation), then with a negative prompt naming every extra the caption leaves
out (``dragrt.zoo.world.unnamed_extras``: "a moustache, a goatee, a full beard" for a face without a beard), and
scores both with the attribute classifier. If the misses of absent extras (small beards drawn where none was asked)
go away, the UNet can draw the absence and the captions do not ask for it; if not, the UNet cannot.

Usage:
    python bench/tools/negative_extras.py [--pipeline zoo:faces-sd] [--samples 128] [--caption-start 1000000]
                                          [--guidance 5] [--steps 50] [--device cpu]

Prints one JSON line: the mean categorical accuracy and the per-attribute accuracy of each run, and for every
extra how many faces asked for none of it were read as having some. The captions default to the validation
captions (``caption_start`` 1 000 000), not the card's evaluation ones; the run without a negative prompt draws
the samples of ``python -m dragrt.zoo.unet evaluate --samples N --caption-start 1000000`` (same noise, batch 64 on
the CPU). CPU: ~2.5 s a sample and run (fp32, 2 cores).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from dragrt.zoo import training, world
from dragrt.zoo import unet as zunet
from dragrt.zoo.evaluators import load_attribute_model


def negative_prompts(n: int, start: int) -> list[str]:
    """One negative prompt for each held-out caption ``start..start+n-1``: its unnamed extras, comma-joined."""
    return [", ".join(world.unnamed_extras(world.sample_params(s))) for s in world.held_out_seeds(n, start)]


def false_extras(confusion: dict[str, list[list[int]]]) -> dict[str, list[int]]:
    """For each extra, from a confusion table (``[asked][read]`` counts, class 0 "none"): ``[faces asked for none
    of it, those read as having some]``."""
    return {name: [sum(confusion[name][0]), sum(confusion[name][0][1:])] for name in world.EXTRAS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default="zoo:" + zunet.NAME)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--caption-start", type=int, default=zunet.VALIDATION_START)
    ap.add_argument("--guidance", type=float, default=zunet.HPARAMS.main_guidance)
    ap.add_argument("--steps", type=int, default=zunet.HPARAMS.eval_steps)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error(f"--samples must be at least 1, got {args.samples}")
    if args.guidance <= 1.0:
        ap.error(f"--guidance must be above 1 (a negative prompt acts through CFG), got {args.guidance}")

    dev = torch.device(args.device)
    unet, frozen = zunet.load_pipeline_parts(args.pipeline, dev)
    pipe = zunet.make_pipeline(unet, frozen, torch.float16 if dev.type == "cuda" else torch.float32)
    model = load_attribute_model(zunet.DEFAULT_ATTRIBUTES, dev)
    captions, target = zunet.heldout_captions(args.samples, args.caption_start)
    runs = {"empty": None, "unnamed_extras": negative_prompts(args.samples, args.caption_start)}
    result = {"pipeline": str(training.resolve_zoo_path(args.pipeline, "negative_extras")), "samples": args.samples,
              "caption_start": args.caption_start, "guidance": args.guidance, "ddim_steps": args.steps}
    bar = tqdm(total=args.samples * len(runs), desc="sampling", unit="image")
    for name, negative in runs.items():
        bar.set_postfix_str(f"negative prompt: {name}")
        images = zunet.generate(pipe, captions, steps=args.steps, guidance=args.guidance,
                                seed=training.mix_seed(args.seed, 7), batch=min(args.samples, 64),
                                size=zunet.HPARAMS.image_size, negative_prompts=negative, on_chunk=bar.update)
        acc, _ = zunet.score(model, images, target)
        result[name] = {"mean": acc["mean"], "per_attribute": acc["per_attribute"],
                        "extras_drawn_where_none_asked": false_extras(acc["confusion"])}
    bar.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
