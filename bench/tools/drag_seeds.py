"""How reliably DragGAN drags a zoo StyleGAN2: the `dragrt demo` edit (widen the smile: both mouth corners out and
up) on several samples, measured by the zoo's landmark regressor.

Usage:
    python bench/tools/drag_seeds.py [MODEL] [--seeds 0-7] [--feature-resolution R] [--r1 R1] [--r2 R2]
                                     [--steps 200] [--device cpu] [--out DIR]

MODEL: a StyleGAN2 generator the demo takes (default ``zoo:faces-stylegan2``; a folder written by the trainer's
``--export`` too). ``--feature-resolution`` / ``--r1`` / ``--r2`` set the engine's
:class:`~dragrt.runtime.engines.draggan.DragGANConfig` (radii in its 512-px units: ``--r2 12`` is 3 px at 128 px);
unset, the engine's defaults. For each seed the demo's edit runs (``demo.run_stylegan2_zoo``, its outputs under
``DIR/seed-N``) and one JSON line gives each corner's distance to its target before (the regressor's reading of
the sample) and after (its reading of the edited image), the tracked handles and the smile reading. The last
line sums up: the mean distance after, and how many corners ended closer than they started. Decides defaults such
as the feature block and the tracking window for a new generator (CONTRIBUTING.md). CPU: ~25 s a seed at 128 px
(2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path


def seed_list(text: str) -> list[int]:
    """``"0-7"`` or ``"0,3,5"`` -> seeds (``ValueError`` naming ``--seeds`` otherwise)."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r} is not allowed; use A-B or A,B,C with integers >= 0")
    return seeds


def summarise(records: list[dict]) -> dict:
    """Mean distance after, and the corners that ended closer than they started, over ``records``."""
    before = [d for r in records for d in r["distance_before_px"]]
    after = [d for r in records for d in r["distance_after_px"]]
    return {"seeds": len(records), "mean_distance_before_px": round(sum(before) / len(before), 2),
            "mean_distance_after_px": round(sum(after) / len(after), 2),
            "corners_closer": sum(a < b for a, b in zip(after, before)), "corners": len(after)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="zoo:faces-stylegan2")
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--feature-resolution", type=int, default=None)
    ap.add_argument("--r1", type=float, default=None)
    ap.add_argument("--r2", type=float, default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="the demos' outputs (default: a temporary folder)")
    args = ap.parse_args()
    from dragrt.runtime import demo
    from dragrt.runtime.engines.draggan import DragGANConfig

    try:
        seeds = seed_list(args.seeds)
        config = DragGANConfig(feature_resolution=args.feature_resolution, r1=args.r1, r2=args.r2)
    except ValueError as exc:
        ap.error(str(exc))
    out = args.out or Path(tempfile.mkdtemp(prefix="drag-seeds-"))
    records = []
    for seed in seeds:
        try:
            rec = demo.run_stylegan2_zoo(out / f"seed-{seed}", model=args.model, seed=seed, max_steps=args.steps,
                                         device=args.device, progress=False, config=config)
        except (ValueError, FileNotFoundError) as exc:  # a model, block or setting the demo refused: say which
            ap.error(str(exc))
        row = {"seed": seed, "feature_resolution": rec["feature_resolution"], "radii_px": rec["radii_px"],
               "distance_before_px": [round(math.dist(m, t), 2) for m, t in
                                      zip(rec["mouth_corners_measured_before"], rec["target_points"])],
               "distance_after_px": [round(d, 2) for d in rec["measured_error_to_targets_px"]],
               "tracked_final": rec["final_points"], "smile_before_after": rec["smile_measured_before_after"]}
        records.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": summarise(records), "model": args.model, "out": str(out)}), flush=True)


if __name__ == "__main__":
    main()
