"""Tables and plots from benchmark records (the JSON written by :func:`dragrt.bench.harness.write_record`).

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dragrt.bench.harness import latest_by_scenario

BEGIN_MARKER = "<!-- results:begin -->"
END_MARKER = "<!-- results:end -->"

_SIDES = ("ours", "reference")
_COLUMNS = (
    "scenario",
    "gpu",
    "ours p50 ms",
    "ours p95 ms",
    "ref p50 ms",
    "speedup",
    "peak mem MB (ours / ref)",
    "compile s",
    "commit",
)


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _compile_cell(c: Any) -> str:
    if isinstance(c, Mapping):
        return " / ".join(f"{k} {_num(v)}" for k, v in c.items()) or "-"
    return _num(c)


def _mem_cell(ours: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    o, r = ours.get("peak_mem_mb"), ref.get("peak_mem_mb")
    if o is None and r is None:
        return "-"
    return f"{_num(o)} / {_num(r)}"


def _sorted(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(records, key=lambda r: (str(r.get("scenario")), str((r.get("env") or {}).get("gpu"))))


def format_table(records: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table, one row per record, sorted by scenario then GPU.

    Columns: scenario, gpu, ours p50/p95 (ms), reference p50 (ms), speedup (reference p50 / ours p50),
    peak memory (MiB, ours / reference), compile time (s) and commit. Missing values show as ``-``.
    """
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join("---" for _ in _COLUMNS) + "|"]
    for rec in _sorted(records):
        env = rec.get("env") or {}
        ours = rec.get("ours") or {}
        ref = rec.get("reference") or {}
        sp = rec.get("speedup")
        row = [
            _cell(rec.get("scenario", "?")),
            _cell(env.get("gpu", "?")),
            _num(ours.get("p50_ms")),
            _num(ours.get("p95_ms")),
            _num(ref.get("p50_ms")),
            f"{_num(sp, 3)}x" if _num(sp) != "-" else "-",
            _mem_cell(ours, ref),
            _compile_cell(rec.get("compile_s")),
            _cell(env.get("commit") or "-"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _label(rec: Mapping[str, Any], many_gpus: bool) -> str:
    name = str(rec.get("scenario", "?"))
    return f"{name}\n{(rec.get('env') or {}).get('gpu', '?')}" if many_gpus else name


def _pos(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else math.nan


def plot(records: Iterable[Mapping[str, Any]], out_png: str | os.PathLike[str]) -> Path:
    """Draw p50 latency bars (ours vs reference per record, log scale, whiskers to p95) into ``out_png``.

    Records that carry ``stages`` get a second subplot: stacked per-stage p50 (ms, linear scale), one bar
    for ours and one for the reference. Returns the PNG's path.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    recs = _sorted(records)
    staged = [r for r in recs if any((r.get(s) or {}).get("stages") for s in ("ours", "reference"))]
    many_gpus = len({(r.get("env") or {}).get("gpu") for r in recs}) > 1
    width = max(6.0, 1.2 * max(len(recs), len(staged) * 1.5, 1) + 2)
    fig = Figure(figsize=(width, 4.5 * (2 if staged else 1)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if staged else 1, 1, squeeze=False)[:, 0]

    ax = axes[0]
    if not recs:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        xs = list(range(len(recs)))
        w = 0.38
        for off, side, colour in ((-w / 2, "ours", "tab:blue"), (w / 2, "reference", "tab:gray")):
            p50 = [_pos((r.get(side) or {}).get("p50_ms")) for r in recs]
            p95 = [_pos((r.get(side) or {}).get("p95_ms")) for r in recs]
            up = [
                b - a if math.isfinite(a) and math.isfinite(b) and b > a else 0.0 for a, b in zip(p50, p95, strict=True)
            ]
            ax.bar(
                [x + off for x in xs],
                p50,
                w,
                yerr=[[0.0] * len(recs), up],
                capsize=3,
                color=colour,
                label=side,
            )
        for x, r in zip(xs, recs, strict=True):
            sp = r.get("speedup")
            tops = [_pos((r.get(s) or {}).get(k)) for s in _SIDES for k in ("p50_ms", "p95_ms")]
            tops = [t for t in tops if math.isfinite(t)]
            if isinstance(sp, (int, float)) and tops:
                top = max(tops)
                ax.annotate(f"{sp:.3g}x", (x, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(xs, [_label(r, many_gpus) for r in recs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("latency p50, ms (whisker: p95)")
        ax.set_title("ours vs reference, same run")
        ax.legend(fontsize=8)

    if staged:
        ax2 = axes[1]
        stage_names: list[str] = []
        for r in staged:
            for side in ("ours", "reference"):
                for k in (r.get(side) or {}).get("stages") or {}:
                    if k not in stage_names:
                        stage_names.append(k)
        cmap = matplotlib.colormaps["tab20"]
        colours = {k: cmap(i % 20) for i, k in enumerate(stage_names)}
        ticks, labels = [], []
        x = 0.0
        for r in staged:
            for side in ("ours", "reference"):
                bottom = 0.0
                for k, t in ((r.get(side) or {}).get("stages") or {}).items():
                    v = _pos((t or {}).get("p50_ms"))
                    if not math.isfinite(v):
                        continue
                    ax2.bar(x, v, 0.8, bottom=bottom, color=colours[k])
                    bottom += v
                ticks.append(x)
                labels.append(f"{_label(r, many_gpus)}\n{'ours' if side == 'ours' else 'ref'}")
                x += 1.0
            x += 0.6
        ax2.legend(handles=[Patch(color=colours[k], label=k) for k in stage_names], fontsize=8, ncols=2)
        ax2.set_xticks(ticks, labels, rotation=20, ha="right", fontsize=8)
        ax2.set_ylabel("per-stage p50, ms (stacked)")
        ax2.set_title("stage breakdown")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, format="png")
    return out


def results_section(records: Iterable[Mapping[str, Any]]) -> str:
    """The generated README block: the latest record per (scenario, GPU) as a table, plus a note."""
    latest = list(latest_by_scenario(list(records)).values())
    note = (
        f"Latest record per (scenario, GPU), {len(latest)} row(s). Generated by `dragrt bench readme`; "
        "do not edit by hand. Speedups are ratios measured in the same run; compare absolute times only "
        "on the same GPU.\n"
    )
    return note + "\n" + format_table(latest)


def replace_marked_section(text: str, body: str) -> str:
    """``text`` with everything between :data:`BEGIN_MARKER` and :data:`END_MARKER` replaced by ``body``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    b = text.find(BEGIN_MARKER)
    e = text.find(END_MARKER, b + len(BEGIN_MARKER)) if b >= 0 else -1
    if b < 0 or e < 0:
        raise ValueError(f"markers {BEGIN_MARKER!r} ... {END_MARKER!r} not found in order")
    head = text[: b + len(BEGIN_MARKER)]
    return head + "\n" + body.rstrip("\n") + "\n" + text[e:]


def update_readme(readme: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> bool:
    """Rewrite the marked results section of ``readme``; returns True when the file changed."""
    p = Path(readme)
    old = p.read_text(encoding="utf-8")
    new = replace_marked_section(old, results_section(records))
    if new != old:
        p.write_text(new, encoding="utf-8")
    return new != old


__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "format_table",
    "plot",
    "replace_marked_section",
    "results_section",
    "update_readme",
]
