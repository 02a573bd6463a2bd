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
    "faces-clip": "dragrt.zoo.clip",
    "faces-vae": "dragrt.zoo.vae",
    "faces-sd": "dragrt.zoo.unet",
    "faces-stylegan2": "dragrt.zoo.stylegan2_train",
}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


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
    args = parser.parse_args(argv)
    module = trainer(args.name)
    if not args.no_train:
        metrics = module.train(args.run_dir, minutes=args.minutes, device=args.device, seed=args.seed,
                               smoke=args.smoke)
        print(json.dumps(metrics, indent=2, sort_keys=True))
    if args.export is not None:
        dest = WEIGHTS_DIR / args.name if args.export is True else args.export
        print(module.export(args.run_dir, dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
