"""``dragrt bench``: list, run, compare, plot, readme.

``main(argv)`` returns an exit status: 0 on success, 1 when a scenario raised, 2 for a usage error
(unknown scenario, missing README markers), 3 when a scenario needs CUDA and none is available.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any

from dragrt.bench import harness, report, scenarios

README = Path(__file__).resolve().parent / "README.md"
EXIT_SCENARIO_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_CUDA = 3
QUICK_BUDGET_MS = 50.0
#: The largest timing budget per measured callable ``--budget-ms`` takes: ten minutes.
MAX_BUDGET_MS = 600_000.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dragrt bench", description="dragrt benchmark harness")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("list", help="list registered scenarios")

    r = sub.add_parser("run", help="run scenarios and write one JSON record per result")
    r.add_argument("scenario", nargs="+", metavar="SCENARIO")
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default: bench/results or ${harness.RESULTS_ENV})",
    )
    r.add_argument(
        "--budget-ms", type=float, default=None, help="timing budget per measured callable, ms (default 200)"
    )
    r.add_argument("--quick", action="store_true", help=f"smaller sweep; budget defaults to {QUICK_BUDGET_MS:g} ms")

    c = sub.add_parser("compare", help="table of the latest record per (scenario, GPU)")
    c.add_argument("--results", type=Path, default=None, help="results folder")

    pl = sub.add_parser("plot", help="latency bars and stage breakdown as a PNG")
    pl.add_argument("out_png", type=Path, metavar="OUT.png")
    pl.add_argument("--results", type=Path, default=None, help="results folder")

    rd = sub.add_parser("readme", help="regenerate the results section of bench/README.md")
    rd.add_argument("--results", type=Path, default=None, help="results folder")
    rd.add_argument("--readme", type=Path, default=README, help="README to rewrite (default: bench/README.md)")
    return p


def _summary(rec: dict[str, Any], path: Path) -> str:
    o, r = rec.get("ours") or {}, rec.get("reference") or {}
    sp = rec.get("speedup")
    return (
        f"{rec.get('scenario')} [{(rec.get('env') or {}).get('gpu')}] "
        f"ours p50 {o.get('p50_ms')} ms p95 {o.get('p95_ms')} ms | ref p50 {r.get('p50_ms')} ms | "
        f"speedup {sp if sp is not None else '-'}x | peak {o.get('peak_mem_mb')} MB -> {path}"
    )


def _cmd_list() -> int:
    for name in scenarios.names():
        s = scenarios.get(name)
        print(f"{name:<28} {'cuda' if s.needs_cuda else 'any ':<5} {s.description}")
    for mod, err in scenarios.load_errors().items():
        print(f"(scenario module {mod!r} failed to import: {err})", file=sys.stderr)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        chosen = [scenarios.get(n) for n in args.scenario]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    if args.budget_ms is not None and not 0 <= args.budget_ms <= MAX_BUDGET_MS:
        print(f"error: --budget-ms={args.budget_ms:g} is not allowed; use 0 to {MAX_BUDGET_MS:g} ms (0: the minimum "
              "repetitions only)", file=sys.stderr)
        return EXIT_USAGE
    if not harness.cuda_available():
        need = [s.name for s in chosen if s.needs_cuda]
        if need:
            print(
                f"error: scenario(s) {', '.join(need)} need a CUDA GPU, and no CUDA device is available "
                "(torch.cuda.device_count() == 0). Nothing was measured or written; run on a GPU machine "
                "(bash bench/gpu.sh).",
                file=sys.stderr,
            )
            return EXIT_NO_CUDA
    budget = args.budget_ms if args.budget_ms is not None else (QUICK_BUDGET_MS if args.quick else 200.0)
    status = 0
    for s in chosen:
        written = 0
        try:
            for rec in s(budget, args.quick):  # each record is written as it comes (a generator yields as it goes)
                path = harness.write_record(rec, args.out)
                written += 1
                print(_summary(rec, path), flush=True)
        except Exception:
            kept = f" (after writing {written} record(s))" if written else ""
            print(f"error: scenario {s.name} failed{kept}:\n{traceback.format_exc()}", file=sys.stderr)
            status = EXIT_SCENARIO_FAILED
    return status


def _cmd_compare(args: argparse.Namespace) -> int:
    latest = harness.latest_by_scenario(harness.load_records(args.results))
    print(format_or_none(list(latest.values())), end="")
    return 0


def format_or_none(records: list[dict[str, Any]]) -> str:
    """:func:`report.format_table`, or a one-line note when there are no records."""
    if not records:
        return "no records found\n"
    return report.format_table(records)


def _cmd_plot(args: argparse.Namespace) -> int:
    latest = harness.latest_by_scenario(harness.load_records(args.results))
    out = report.plot(list(latest.values()), args.out_png)
    print(f"wrote {out} ({len(latest)} record(s))")
    return 0


def _cmd_readme(args: argparse.Namespace) -> int:
    try:
        changed = report.update_readme(args.readme, harness.load_records(args.results))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{'updated' if changed else 'unchanged'}: {args.readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``dragrt bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        return _cmd_list()
    if args.cmd == "run":
        return _cmd_run(args)
    if args.cmd == "compare":
        return _cmd_compare(args)
    if args.cmd == "plot":
        return _cmd_plot(args)
    return _cmd_readme(args)


if __name__ == "__main__":
    raise SystemExit(main())
