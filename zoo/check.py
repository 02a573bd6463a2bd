"""Re-measure the shipped zoo against its model cards: ``python -m dragrt.zoo.check [NAME ...] [--images N]``.

Each named model (default: every installed one) is loaded from its shipped fp16 weights, exactly as the rest of
dragrt loads it, and its headline metrics are measured again on the card's held-out faces (the first ``N`` of
them; faces-sd: the first ``N`` of its held-out captions; faces-stylegan2: ``N`` samples against ``N`` renders).
One table per model puts each number beside the card's and the zoo issue's target, so that anyone can see that
the shipped files are what the cards describe, on a CPU in about a minute a model at the default counts.

Smaller counts than the cards' are noisier (a few hundredths of an accuracy at 64 faces), and two metrics depend
on the count itself: faces-stylegan2's Frechet distance grows as ``N`` shrinks (a biased estimator; the card's
uses 2000 samples), and faces-sd's accuracy is over ``N`` captions (the card's, 256). ``--images`` the cards' count
gives the cards' numbers (up to the precision: the cards were measured on GPUs, mostly before the fp16 export).

Exit status: 0 when every measured metric with a target meets it, 1 when one misses it, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dragrt.zoo import registry, training


@dataclass(frozen=True)
class Check:
    """How to re-measure one zoo model: ``measure(n, device)`` returns its card's metrics (card keys) measured on
    ``n`` faces; ``shown`` lists the keys printed; ``targets`` maps a key to the zoo issue's bound
    (``(">=" or "<=", value)``); ``counts`` says what ``n`` counts; ``card_count`` names the card key holding the
    card's own count."""

    images: int
    shown: tuple[str, ...]
    targets: Mapping[str, tuple[str, float]]
    counts: str
    card_count: str
    measure: Callable[[int, torch.device], dict[str, Any]]


def _landmarks(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import evaluators as ev
    from dragrt.zoo import evaluators_landmarks as lm

    return lm.headline(ev.evaluate_landmarks(ev.load_landmark_model(device=dev), n=n))


def _attributes(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import evaluators as ev
    from dragrt.zoo import evaluators_attributes as at

    return at.headline(ev.evaluate_attributes(ev.load_attribute_model(device=dev, details=False), n=n))


def _details(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import evaluators as ev
    from dragrt.zoo import evaluators_details as de

    return de.headline(ev.evaluate_details(ev.load_model(ev.DETAILS_MODEL, "attribute-details", dev), n=n))


def _clip(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import clip

    model, tokenizer = clip.load_clip(device=dev)
    return clip.evaluate(model, tokenizer, pairs=n, group=min(clip.RECIPE.eval_group, n),
                         render_size=clip.RECIPE.render_size)


def _vae(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import vae as zvae

    model = zvae.load_vae(device=dev, dtype=torch.float32)
    return zvae.evaluate(model, zvae.heldout_images(n, int(model.config.sample_size)), ceilings=True)


def _sd(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.zoo import unet as zunet

    card = registry.card_path("zoo:" + zunet.NAME)
    settings = zunet.card_eval_settings(training.card_values(card.read_text()), f"check: {card}")
    return zunet.evaluate_folder(device=str(dev), progress=True, **{**settings, "samples": n})


def _stylegan2(n: int, dev: torch.device) -> dict[str, Any]:
    from dragrt.runtime.models.stylegan2_convert import load_generator
    from dragrt.zoo import stylegan2_train as sgt

    g_ema = load_generator("zoo:" + sgt.NAME, device=dev).float()  # as the DragGAN engine loads it
    cfg = sgt.TrainConfig.from_dict(g_ema.checkpoint_record["source"]["train_config"])
    return sgt.evaluate(g_ema, dataclasses.replace(cfg, eval_samples=n, eval_reals=n, num_workers=0), dev)


CHECKS: dict[str, Check] = {
    "faces-landmarks": Check(500, ("mean error (px at 256)", "p95 error (px)", "mean confidence"),
                             {"mean error (px at 256)": ("<=", 1.5)}, "held-out renders", "held-out renders",
                             _landmarks),
    "faces-attributes": Check(500, ("min categorical accuracy", "mean categorical accuracy", "mean continuous MAE"),
                              {"min categorical accuracy": (">=", 0.95)}, "held-out renders", "held-out renders",
                              _attributes),
    "faces-attribute-details": Check(500, ("mean MAE (estimated landmarks)", "mean MAE (true landmarks)"), {},
                                     "held-out renders", "held-out renders", _details),
    "faces-clip": Check(500, ("i2t_top1", "t2i_top1", "i2t_top5", "zero_shot_mean"), {},
                        "held-out pairs, in groups of up to 100", "eval_pairs_scored", _clip),
    "faces-vae": Check(64, ("psnr_db", "ssim", "categorical_accuracy_round_trips"), {"psnr_db": (">=", 28.0)},
                       "held-out renders", "eval_images", _vae),
    "faces-sd": Check(16, ("attribute_accuracy", "classifier_on_vae_round_trips", "caption_agreement"),
                      {"attribute_accuracy": (">=", 0.8)}, "held-out captions, one sample each", "eval_samples", _sd),
    "faces-stylegan2": Check(256, ("frechet_distance_attr", "landmark_conf_samples", "landmark_conf_renders"), {},
                             "samples and as many held-out renders (the Frechet distance grows as they shrink)",
                             "eval_samples", _stylegan2),
}


def _number(value: Any) -> float | None:
    try:
        return float(str(value).split()[0])
    except (TypeError, ValueError, IndexError):
        return None


def check(name: str, images: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Re-measure the shipped ``name`` (``zoo:`` optional) on ``images`` faces (default: its :data:`CHECKS`
    count). Returns ``{"model", "images", "card_images", "seconds", "rows": [{"metric", "card", "measured",
    "target", "meets"}], "meets_targets"}``; ``meets`` is None for a metric without a target."""
    name = name.removeprefix(registry.PREFIX)
    if name not in CHECKS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(CHECKS)}")
    spec = CHECKS[name]
    n = spec.images if images is None else images
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000:
        raise ValueError(f"images={n!r} is not allowed; use an integer from 2 to 10000")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use e.g. 'cpu' or 'cuda'") from None
    registry.resolve("zoo:" + name)  # a missing model: FileNotFoundError naming its training command
    card = training.card_values(registry.card_path("zoo:" + name).read_text())
    t0 = time.monotonic()
    measured = spec.measure(n, dev)
    rows = []
    for key in spec.shown:
        now = _number(measured.get(key))
        bound = spec.targets.get(key)
        meets = None
        if bound is not None and now is not None:
            meets = now >= bound[1] if bound[0] == ">=" else now <= bound[1]
        rows.append({"metric": key, "card": _number(card.get(key)), "measured": now,
                     "target": None if bound is None else f"{bound[0]} {bound[1]:g}", "meets": meets})
    return {"model": f"zoo:{name}", "images": n, "counts": spec.counts,
            "card_images": _number(card.get(spec.card_count)), "device": str(dev),
            "seconds": round(time.monotonic() - t0, 1), "rows": rows,
            "meets_targets": all(r["meets"] is not False for r in rows)}


def format_result(result: Mapping[str, Any]) -> str:
    """One model's :func:`check` as a small table."""
    card_n = result["card_images"]
    lines = [f"{result['model']}: {result['images']} {result['counts']} (the card: "
             f"{'?' if card_n is None else int(card_n)}), {result['device']}, {result['seconds']} s"]
    width = max(len(r["metric"]) for r in result["rows"])
    lines.append(f"  {'metric':<{width}}  {'card':>9}  {'measured':>9}  target")
    for r in result["rows"]:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"
        verdict = "" if r["meets"] is None else ("  ok" if r["meets"] else "  MISSES")
        lines.append(f"  {r['metric']:<{width}}  {fmt(r['card']):>9}  {fmt(r['measured']):>9}  "
                     f"{r['target'] or '-'}{verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragrt.zoo.check", description=__doc__.splitlines()[0],
                                     epilog="Default counts: " + ", ".join(f"{k} {v.images}" for k, v in
                                                                            CHECKS.items()))
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"zoo models to check (default: every installed one of {', '.join(CHECKS)})")
    parser.add_argument("--images", type=int, default=None, help="faces per model (default: each model's own)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of tables")
    args = parser.parse_args(argv)
    names = [n.removeprefix(registry.PREFIX) for n in args.names] or [n for n in CHECKS if registry.installed(n)]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown zoo model(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if not names:
        parser.error("no zoo model is installed; train one with: " + registry.train_command("faces-landmarks"))
    ok = True
    for name in names:
        n = CHECKS[name].images if args.images is None else args.images
        print(f"measuring zoo:{name} on {n} {CHECKS[name].counts} ...", file=sys.stderr, flush=True)
        try:
            result = check(name, args.images, args.device)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(str(exc))
        ok = ok and result["meets_targets"]
        print(json.dumps(result) if args.json else format_result(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
