"""Train one zoo model: ``python -m dragrt.zoo.train NAME --run-dir DIR [--minutes M] [--export DEST]``.

Resumable: run the same command again (e.g. in 10-minute chunks on a GPU) and it continues from
``DIR/checkpoint.pt``. ``--export`` writes the shipped fp16 weights and the model card to ``DEST``
(default: the package's ``weights/<name>/``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

#: zoo model name -> module implementing ``train`` and ``export`` (see :mod:`dragrt.zoo.training`).
TRAINERS: dict[str, str] = {
    "faces-landmarks": "dragrt.zoo.evaluators_landmarks",
    "faces-attributes": "dragrt.zoo.evaluators_attributes",
    "faces-attribute-details": "dragrt.zoo.evaluators_details",
    "faces-clip": "dragrt.zoo.clip",
    "faces-vae": "dragrt.zoo.vae",
    "faces-sd": "dragrt.zoo.unet",
    "faces-stylegan2": "dragrt.zoo.stylegan2_train",
}

#: Trainers that can start a new run from exported weights (``--init``).
INIT_TRAINERS = ("faces-vae", "faces-sd", "faces-stylegan2")
#: Trainers whose steps can be compiled (``--compile MODE``).
COMPILE_TRAINERS = ("faces-vae", "faces-sd", "faces-stylegan2")
#: Trainers whose new runs take another batch size (``--batch N``).
BATCH_TRAINERS = ("faces-vae", "faces-stylegan2")
#: Options handed to the trainer as given: (argparse dest, flag, the trainers that take it, ``train`` keyword).
PASSED_OPTIONS = (("mse_weight", "--mse-weight", ("faces-vae",), "mse_weight"),
                  ("lr", "--lr", ("faces-vae",), "lr"),
                  ("lower_face_weight", "--lower-face-weight", ("faces-sd",), "lower_face_weight"),
                  ("eye_weight", "--eye-weight", ("faces-vae",), "eye_weight"),
                  ("compile", "--compile", COMPILE_TRAINERS, "compile_mode"),
                  ("cuda_graphs", "--cuda-graphs", ("faces-stylegan2", "faces-sd"), "cuda_graphs"),
                  ("channels_last", "--channels-last", ("faces-stylegan2",), "channels_last"))


def trainer(name: str):
    """The trainer module of zoo model ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in TRAINERS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(sorted(TRAINERS))}")
    return importlib.import_module(TRAINERS[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragrt.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(TRAINERS))
    parser.add_argument("--run-dir", type=Path, required=True, help="checkpoints and metrics (resumed if present)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this chunk (default 9)")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for a CPU check")
    parser.add_argument("--no-train", action="store_true", help="only export an existing run")
    parser.add_argument("--export", type=Path, nargs="?", const=True, default=None,
                        help="write shipped weights + model card (default dest: the package's weights/NAME)")
    parser.add_argument("--init", default=None, metavar="PATH",
                        help=f"start a new run from exported weights (a folder or zoo:NAME) instead of random ones; "
                             f"for {', '.join(INIT_TRAINERS)}")
    parser.add_argument("--decoder-only", action="store_true",
                        help="faces-vae with --init: fine-tune the decoder only (the latent space stays the same)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="faces-vae with --init: fine-tune the encoder only (the decoder, which diffusion samples "
                             "go through, stays the same; round trips of images improve)")
    parser.add_argument("--mse-weight", type=float, default=None, metavar="W",
                        help="faces-vae, new runs: weight of an MSE term in the loss (PSNR's own; 0 in the recipe)")
    parser.add_argument("--lr", type=float, default=None, metavar="LR",
                        help="faces-vae, new runs: peak learning rate (default: the recipe's, 3e-4 with --init)")
    parser.add_argument("--eye-weight", type=float, default=None, metavar="W",
                        help="faces-vae, new run: the pixel losses weigh the eyes (where glasses' frames are drawn) "
                             "1 + W against 1 elsewhere (default 0: uniform)")
    parser.add_argument("--lower-face-weight", type=float, default=None, metavar="W",
                        help="faces-sd, new run: the loss weighs the lower face (where beards are drawn) 1 + W "
                             "against 1 elsewhere (default 0: SD's plain loss)")
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help=f"{', '.join(BATCH_TRAINERS)}, new runs: images per step (default: the recipe's; e.g. "
                             "4 for faces-vae on a CPU)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help=f"torch.compile mode for this chunk's training steps ({', '.join(COMPILE_TRAINERS)}; "
                             "default, reduce-overhead or max-autotune-no-cudagraphs; off by default)")
    parser.add_argument("--cuda-graphs", action="store_const", const=True, default=None,
                        help="faces-stylegan2: replay each part of an iteration (G, D, path length, R1) from a CUDA "
                             "graph; faces-sd: the training step (CUDA only; not with --compile reduce-overhead)")
    parser.add_argument("--channels-last", action="store_const", const=True, default=None,
                        help="faces-stylegan2: G's and D's convolutions in channels-last (NHWC) memory")
    args = parser.parse_args(argv)
    module = trainer(args.name)
    extra = {}
    if args.init is not None:
        if args.name not in INIT_TRAINERS:
            parser.error(f"--init is not supported for {args.name}; it is for {', '.join(INIT_TRAINERS)}")
        extra["init"] = args.init
    if args.decoder_only:
        if args.name != "faces-vae" or args.init is None:
            parser.error("--decoder-only is for faces-vae with --init")
        extra["decoder_only"] = True
    if args.encoder_only:
        if args.name != "faces-vae" or args.init is None:
            parser.error("--encoder-only is for faces-vae with --init")
        if args.decoder_only:
            parser.error("--encoder-only and --decoder-only exclude each other")
        extra["encoder_only"] = True
    if args.batch is not None:
        if args.name not in BATCH_TRAINERS:
            parser.error(f"--batch is for {', '.join(BATCH_TRAINERS)}")
        if args.name == "faces-stylegan2":
            extra["config_overrides"] = {"batch_size": args.batch}
        else:
            extra["batch_size"] = args.batch
    for dest, flag, names, keyword in PASSED_OPTIONS:
        value = getattr(args, dest)
        if value is not None:
            if args.name not in names:
                parser.error(f"{flag} is for {', '.join(names)}")
            extra[keyword] = value
    if not args.no_train:
        try:
            metrics = module.train(args.run_dir, minutes=args.minutes, device=args.device, seed=args.seed,
                                   smoke=args.smoke, **extra)
        except (ValueError, FileNotFoundError) as exc:  # a setting or a path the trainer refused: say which
            parser.error(str(exc))
        print(json.dumps(metrics, indent=2, sort_keys=True))
    if args.export is not None:
        from dragrt.zoo import registry

        dest = registry.WEIGHTS_DIR / args.name if args.export is True else args.export
        try:
            written = module.export(args.run_dir, dest)  # staged: a failed export leaves dest as it was
        except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
            parser.error(str(exc))
        registry.unshare(dest)  # the model's own files are there now
        print(written)
        if args.export is True:
            for line in registry.share_identical_report():
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
