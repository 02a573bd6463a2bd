"""The benchmark harness: timing, environment stamps and JSON records.

Units: every duration whose name ends in ``_ms`` is in milliseconds, ``_s`` in seconds; memory ending
in ``_mb`` is in MiB (2**20 bytes); bandwidth in GB/s is 1e9 bytes per second.

On a CUDA device each repetition is timed by its own pair of CUDA events, so that percentiles describe
single calls. Without CUDA the same API times each call with :func:`time.perf_counter_ns`, which keeps
the harness testable on a CPU; every :class:`Timing` records which clock it used.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
RESULTS_ENV = "DRAGRT_BENCH_RESULTS"
COMMIT_ENV = "DRAGRT_BENCH_COMMIT"
CLOCK_CUDA = "cuda_events"
CLOCK_CPU = "perf_counter"
_MIB = float(2**20)
_L2_FLUSH_BYTES = 256 * 2**20
_REPO_ROOT = Path(__file__).resolve().parent.parent


def cuda_available() -> bool:
    """True when a CUDA device can be used (``device_count() > 0``, not only ``is_available()``)."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:
        return False


def _sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits; ``None`` and non-finite values give ``None``."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-repetition times of one callable and their statistics.

    Attributes:
        times_ms: duration of every timed repetition, in ms, in the order they ran.
        clock: ``"cuda_events"`` (device time between two CUDA events) or ``"perf_counter"`` (host time).
        peak_mem_mb: peak CUDA memory allocated above what was allocated when the timed region began, in
            MiB; for ``graph=True`` the region starts before capture, so the graph's pool counts. ``None``
            on a CPU.
        warmup_reps: untimed calls made before timing.
        graph: whether the times are CUDA graph replays.
    """

    times_ms: list[float]
    clock: str = CLOCK_CPU
    peak_mem_mb: float | None = None
    warmup_reps: int = 0
    graph: bool = False

    @property
    def n(self) -> int:
        """Number of timed repetitions."""
        return len(self.times_ms)

    @property
    def p50_ms(self) -> float:
        """Median time, ms."""
        return percentile(self.times_ms, 50)

    @property
    def p90_ms(self) -> float:
        """90th percentile, ms."""
        return percentile(self.times_ms, 90)

    @property
    def p95_ms(self) -> float:
        """95th percentile, ms."""
        return percentile(self.times_ms, 95)

    @property
    def p99_ms(self) -> float:
        """99th percentile, ms."""
        return percentile(self.times_ms, 99)

    @property
    def min_ms(self) -> float:
        """Fastest repetition, ms."""
        return min(self.times_ms) if self.times_ms else math.nan

    @property
    def mean_ms(self) -> float:
        """Arithmetic mean, ms."""
        return sum(self.times_ms) / len(self.times_ms) if self.times_ms else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Summary for JSON: times to 4 significant digits (ms), peak memory to 0.01 MiB."""
        return {
            "p50_ms": _sig(self.p50_ms),
            "p90_ms": _sig(self.p90_ms),
            "p95_ms": _sig(self.p95_ms),
            "p99_ms": _sig(self.p99_ms),
            "min_ms": _sig(self.min_ms),
            "mean_ms": _sig(self.mean_ms),
            "n": self.n,
            "clock": self.clock,
            "peak_mem_mb": None if self.peak_mem_mb is None else round(float(self.peak_mem_mb), 2),
            "warmup_reps": self.warmup_reps,
            "graph": self.graph,
        }


def _check_reps(min_reps: int, max_reps: int) -> None:
    if min_reps < 1:
        raise ValueError(f"min_reps must be >= 1, got {min_reps}")
    if max_reps < min_reps:
        raise ValueError(f"max_reps ({max_reps}) must be >= min_reps ({min_reps})")


def time_cuda(
    fn: Callable[[], Any],
    *,
    warmup_ms: float = 25,
    budget_ms: float = 200,
    min_reps: int = 10,
    max_reps: int = 10000,
    graph: bool = False,
    flush_l2: bool = False,
) -> Timing:
    """Time a zero-argument callable, one measurement per call.

    Args:
        fn: the work; its return value is discarded.
        warmup_ms: untimed calls run until this much wall time (ms) has passed (at least one call).
        budget_ms: timed calls run until this much wall time (ms) has passed, at least ``min_reps`` and
            at most ``max_reps`` of them.
        min_reps, max_reps: bounds on the number of timed calls.
        graph: on CUDA, capture ``fn`` once into a ``torch.cuda.CUDAGraph`` after warm-up (warm-up runs on
            a side stream) and time replays. Ignored without CUDA (the Timing then says ``graph=False``).
        flush_l2: on CUDA, overwrite a 256 MiB buffer before every call (outside the timed events), so
            that each call starts with a cold L2 cache.

    Returns:
        A :class:`Timing` with ``clock="cuda_events"`` on CUDA, else ``clock="perf_counter"``.
    """
    _check_reps(min_reps, max_reps)
    if cuda_available():
        return _time_cuda_events(fn, warmup_ms, budget_ms, min_reps, max_reps, graph, flush_l2)
    return _time_perf_counter(fn, warmup_ms, budget_ms, min_reps, max_reps)


def captured(fn: Callable[[], Any], warmup_calls: int = 3) -> Callable[[], None]:
    """``fn`` captured into a CUDA graph after ``warmup_calls`` eager calls on a side stream (the capture itself
    runs nothing); returns the graph's ``replay`` (each call one replay of ``fn``'s work). For tools timing a
    step that a runtime path replays the same way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_perf_counter(
    fn: Callable[[], Any], warmup_ms: float, budget_ms: float, min_reps: int, max_reps: int
) -> Timing:
    warm = 0
    t0 = time.perf_counter()
    while warm == 0 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn()
        warm += 1
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < max_reps:
        a = time.perf_counter_ns()
        fn()
        b = time.perf_counter_ns()
        times.append((b - a) / 1e6)
        if len(times) >= min_reps and (time.perf_counter() - t0) * 1e3 >= budget_ms:
            break
    return Timing(times_ms=times, clock=CLOCK_CPU, peak_mem_mb=None, warmup_reps=warm, graph=False)


def _cuda_warmup(fn: Callable[[], Any], warmup_ms: float) -> tuple[int, float]:
    """Run ``fn`` on the current stream until ``warmup_ms`` have passed; returns (calls, median ms)."""
    per_call: list[float] = []
    t0 = time.perf_counter()
    while not per_call or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end))
    return len(per_call), percentile(per_call[-10:], 50)


def _time_cuda_events(
    fn: Callable[[], Any],
    warmup_ms: float,
    budget_ms: float,
    min_reps: int,
    max_reps: int,
    graph: bool,
    flush_l2: bool,
) -> Timing:
    flush_buf = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    torch.cuda.synchronize()

    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            warm, est_ms = _cuda_warmup(fn, warmup_ms)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        target: Callable[[], Any] = cuda_graph.replay
        w2, est_ms = _cuda_warmup(target, 0)
        warm += w2
    else:
        warm, est_ms = _cuda_warmup(fn, warmup_ms)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        target = fn

    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < max_reps:
        remaining_ms = budget_ms - (time.perf_counter() - t0) * 1e3
        want = math.ceil(max(remaining_ms, 0.0) / max(est_ms, 1e-3))
        batch = min(max(want, min_reps - len(times), 1), max_reps - len(times))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(batch)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(batch)]
        for i in range(batch):
            if flush_buf is not None:
                flush_buf.zero_()
            starts[i].record()
            target()
            ends[i].record()
        torch.cuda.synchronize()
        got = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
        times.extend(got)
        est_ms = max(sum(got) / len(got), 1e-3)
        if len(times) >= min_reps and (time.perf_counter() - t0) * 1e3 >= budget_ms:
            break

    peak_mb = max(torch.cuda.max_memory_allocated() - base, 0) / _MIB
    return Timing(times_ms=times, clock=CLOCK_CUDA, peak_mem_mb=peak_mb, warmup_reps=warm, graph=graph)


def synchronize() -> None:
    """Wait for all queued CUDA work; does nothing without CUDA."""
    if cuda_available():
        torch.cuda.synchronize()


def timed_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` for one call, synchronised with the device before and after (no-op without CUDA)."""
    synchronize()
    t0 = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t0


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.mb``: the peak CUDA memory allocated inside the block above what
    was allocated when it began, in MiB (e.g. an engine's first step, whose CUDA graph pool later timed replays do
    not show)."""

    mb: float = 0.0

    def __enter__(self) -> PeakMemory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize()
        self.mb = (torch.cuda.max_memory_allocated() - self._base) / _MIB


def kernel_profile(fn: Callable[[], Any], reps: int,
                   table_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """torch.profiler over ``reps`` calls of ``fn`` (CPU + CUDA activity; kernels replayed from CUDA graphs count
    too), summarised by :func:`profile_summary`. For tools, not for records: profiling slows the calls it
    watches."""
    from torch.profiler import ProfilerActivity, profile

    synchronize()
    t0 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        synchronize()
    return profile_summary(prof, reps, time.perf_counter() - t0, table_path)


#: Kernel kinds of :func:`kernel_kind` for kernels not written by Triton, first match wins: (kind, lowercase name
#: fragments).
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("fmha", "flash", "attention", "attn", "sdpa", "dot_do_o", "convert_dq")),  # cuDNN SDPA helpers
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "memcpy", "memset", "convert")),
    ("convolution", ("conv", "dgrad", "wgrad", "fprop", "implicit", "cudnn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "matmul", "cublas", "sm90_xmma", "sm80_xmma")),
    ("norm", ("norm",)),
    ("elementwise", ("elementwise", "vectorized", "reduce")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (:data:`KERNEL_KINDS`; ``other`` when none matches): a coarse
    split of a profile (attention, convolutions, matmuls, norms, layout changes, ...), for reading, not for
    records."""
    low = name.lower()
    if low.startswith("triton"):  # Inductor's fused kernels: named after every op they fuse ("..._convolution_3")
        return "norm" if "norm" in low else "fused (triton)"
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")


def profile_summary(prof: Any, calls: int, seconds: float,
                    table_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A finished torch.profiler over ``calls`` calls that took ``seconds``: ``prof_wall_ms`` per call,
    ``kernels_per_call``, ``gpu_busy_ms`` per call (the sum of kernel times) and ``gpu_ms_by_kind`` (that sum split
    by :func:`kernel_kind`, largest first); the top CUDA and CPU tables go to ``table_path`` when given."""
    from torch.profiler import DeviceType

    ka = prof.key_averages()
    kernels = [e for e in ka if e.device_type == DeviceType.CUDA]
    if table_path is not None:
        Path(table_path).write_text(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=110)
                                    + "\n\n" + ka.table(sort_by="self_cpu_time_total", row_limit=25))
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1000 / calls
    return {"prof_wall_ms": round(1000 * seconds / calls, 3), "kernels_per_call": sum(e.count for e in kernels) / calls,
            "gpu_busy_ms": round(sum(e.self_device_time_total for e in kernels) / 1000 / calls, 3),
            "gpu_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}}


_PROGRESS_T0 = time.monotonic()


def progress(message: str) -> None:
    """One line on stderr, flushed, with the seconds since this process imported the harness: what a long
    scenario is doing, so that a run cut off at a device call's limit still says where it got to."""
    print(f"[bench +{time.monotonic() - _PROGRESS_T0:.0f} s] {message}", file=sys.stderr, flush=True)


def measure_compile(fn: Callable[[], Any]) -> float:
    """Seconds taken by one synchronised call of ``fn``: use it for the first (compiling/capturing) call."""
    return timed_call(fn)[1]


def sync_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` followed by a CUDA synchronise (no-op without CUDA), e.g. for pytest-benchmark targets."""
    use_cuda = cuda_available()

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if use_cuda:
            torch.cuda.synchronize()
        return out

    return wrapped


def gbs(nbytes: float, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes/s) of moving ``nbytes`` bytes in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth_gbs(nbytes: int, budget_ms: float, *, device: str = "cuda") -> float:
    """Achieved copy bandwidth, GB/s, counting bytes read plus bytes written (2 * ``nbytes``).

    Copies a float32 buffer of ``nbytes`` bytes with ``dst.copy_(src)`` and uses the median time. Other
    scenarios divide their own bandwidth by this number, measured in the same run.

    Raises:
        RuntimeError: ``device`` is CUDA and no CUDA device is available.
    """
    if torch.device(device).type == "cuda" and not cuda_available():
        raise RuntimeError("copy_bandwidth_gbs on 'cuda' needs a CUDA GPU, and none is available")
    numel = max(int(nbytes) // 4, 1)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if src.device.type == "cuda":
        t = time_cuda(lambda: dst.copy_(src), budget_ms=budget_ms)
    else:
        t = _time_perf_counter(lambda: dst.copy_(src), 5.0, budget_ms, 10, 10000)
    return gbs(2 * numel * 4, t.p50_ms)


@functools.lru_cache(maxsize=1)
def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        r = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    return lines[0] if r.returncode == 0 and lines else None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:
            return None
    return None


def _git_commit(root: Path = _REPO_ROOT) -> str | None:
    """Short HEAD hash of ``root`` plus ``-dirty`` when it has changes outside bench/results; else None."""
    override = os.environ.get(COMMIT_ENV)
    if override:
        return override
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return None
        commit = head.stdout.strip()
        status = subprocess.run(
            [git, "--no-optional-locks", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if status.returncode == 0 and status.stdout.strip():
            commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return None


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def env_info() -> dict[str, Any]:
    """What the numbers depend on: GPU, driver, library versions, commit, host and UTC time.

    ``commit`` is ``$DRAGRT_BENCH_COMMIT`` when set (for copies of the tree without ``.git``), else the
    short HEAD hash of this checkout with ``-dirty`` when it has uncommitted changes, else ``None``.
    """
    gpu = "cpu"
    if cuda_available():
        try:
            gpu = torch.cuda.get_device_name(torch.cuda.current_device())
        except Exception:
            gpu = "cuda"
    return {
        "gpu": gpu,
        "driver": _driver_version() if gpu != "cpu" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _dist_version("triton", "pytorch-triton"),
        "diffusers": _dist_version("diffusers"),
        "xformers": _dist_version("xformers"),
        "python": platform.python_version(),
        "commit": _git_commit(),
        # "warm" / "cold": bench/gpu.sh ran with a compile cache carried in or empty (compile times depend on it)
        "compile_cache": os.environ.get("DRAGRT_COMPILE_CACHE_STATE"),
        "hostname": socket.gethostname(),
        "time_utc": _utc_now(),
    }


def _timing_dict(t: Timing | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(t, Timing):
        return t.to_dict()
    if not isinstance(t, Mapping):
        raise TypeError(f"{what} must be a Timing or a dict, got {type(t).__name__}")
    d = dict(t)
    missing = [k for k in ("p50_ms", "p95_ms") if k not in d]
    if missing:
        raise ValueError(f"{what} lacks {missing}")
    d.setdefault("peak_mem_mb", None)
    if isinstance(d.get("stages"), Mapping):
        d["stages"] = {k: _timing_dict(v, f"{what}.stages[{k!r}]") for k, v in d["stages"].items()}
    return d


def _is_timing_like(v: Any) -> bool:
    return isinstance(v, Timing) or (isinstance(v, Mapping) and "p50_ms" in v)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Timing):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    if isinstance(x, torch.Size):
        return list(x)
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return str(x)


def make_record(
    scenario: str,
    config: Mapping[str, Any],
    ours: Timing | Mapping[str, Any],
    reference: Timing | Mapping[str, Any],
    *,
    stages: Mapping[str, Any] | None = None,
    compile_s: float | Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One benchmark result as a JSON-ready dict.

    Args:
        scenario: the scenario's name (one record per measured configuration).
        config: what was measured (shapes, dtypes, steps, budget...).
        ours, reference: our path and the reference path, timed in the same run.
        stages: per-stage timings, either ``{"ours": {stage: timing}, "reference": {stage: timing}}`` or
            ``{stage: timing}`` (taken as ours); stored as ``ours["stages"]`` / ``reference["stages"]``.
        compile_s: seconds for the first (compiling/capturing) call, a number or ``{"ours": s, ...}``.
        extra: anything else worth keeping (e.g. bandwidth in GB/s).
        env: the environment stamp; default :func:`env_info`.

    Returns:
        ``{"schema", "scenario", "env", "config", "ours", "reference", "speedup", "compile_s", "extra"}``
        where ``speedup`` is reference p50 / ours p50 to 3 significant digits (None if undefined).
    """
    o = _timing_dict(ours, "ours")
    r = _timing_dict(reference, "reference")
    if stages:
        if set(stages) <= {"ours", "reference"} and not any(_is_timing_like(v) for v in stages.values()):
            per_side = stages
        else:
            per_side = {"ours": stages}
        for side, d in (("ours", o), ("reference", r)):
            if per_side.get(side):
                d["stages"] = {k: _timing_dict(v, f"{side}.stages[{k!r}]") for k, v in per_side[side].items()}
    speedup = None
    op50, rp50 = o.get("p50_ms"), r.get("p50_ms")
    if isinstance(op50, (int, float)) and isinstance(rp50, (int, float)) and op50 > 0:
        speedup = _sig(rp50 / op50, 3)
    if isinstance(compile_s, Mapping):
        comp: Any = {k: _sig(v) for k, v in compile_s.items()}
    else:
        comp = _sig(compile_s)
    record = {
        "schema": SCHEMA_VERSION,
        "scenario": str(scenario),
        "env": dict(env) if env is not None else env_info(),
        "config": dict(config),
        "ours": o,
        "reference": r,
        "speedup": speedup,
        "compile_s": comp,
        "extra": dict(extra) if extra else {},
    }
    return _jsonable(record)


def default_results_dir() -> Path:
    """``$DRAGRT_BENCH_RESULTS`` when set, else the ``results`` folder beside this file."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "results"


def slug(text: str) -> str:
    """Lower-case file-name-safe form: runs of anything but ``[a-z0-9.]`` become ``-``."""
    s = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.")
    return s or "unknown"


def parse_time_utc(value: str | None) -> _dt.datetime:
    """An ISO 8601 stamp as an aware UTC datetime; missing or unreadable stamps sort first."""
    floor = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    if not value:
        return floor
    try:
        t = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return floor
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc)


def write_record(record: Mapping[str, Any], results_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``record`` as ``<scenario>__<gpu-slug>__<YYYYmmddTHHMMSS>.json`` (UTC) and return its path.

    The folder is ``results_dir``, else :func:`default_results_dir`. Keys are sorted, indent 2. A name
    already taken gets a ``-1``, ``-2``... suffix, so no record is overwritten.
    """
    out = Path(results_dir) if results_dir is not None else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    env = record.get("env") or {}
    stamp_t = parse_time_utc(env.get("time_utc")) if env.get("time_utc") else _dt.datetime.now(_dt.timezone.utc)
    stem = f"{slug(record.get('scenario', 'unknown'))}__{slug(env.get('gpu', 'unknown'))}__" + stamp_t.strftime(
        "%Y%m%dT%H%M%S"
    )
    path = out / f"{stem}.json"
    i = 1
    while path.exists():
        path = out / f"{stem}-{i}.json"
        i += 1
    text = json.dumps(_jsonable(record), indent=2, sort_keys=True, allow_nan=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_records(results_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every ``*.json`` record in the folder (default :func:`default_results_dir`), sorted by file name.

    Files that are not a JSON object with a ``scenario`` key are skipped.
    """
    d = Path(results_dir) if results_dir is not None else default_results_dir()
    if not d.is_dir():
        return []
    records = []
    for p in sorted(d.glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "scenario" in rec:
            records.append(rec)
    return records


def record_key(record: Mapping[str, Any]) -> str:
    """``"<scenario>@<gpu>"``: the key of :func:`latest_by_scenario`."""
    return f"{record.get('scenario')}@{(record.get('env') or {}).get('gpu', 'unknown')}"


def latest_by_scenario(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest record (by ``env.time_utc``) per (scenario, GPU), keyed by :func:`record_key`.

    On equal stamps the later record in ``records`` wins. Keys are sorted.
    """
    best: dict[str, tuple[_dt.datetime, dict[str, Any]]] = {}
    for rec in records:
        k = record_key(rec)
        t = parse_time_utc((rec.get("env") or {}).get("time_utc"))
        if k not in best or t >= best[k][0]:
            best[k] = (t, rec)
    return {k: best[k][1] for k in sorted(best)}


__all__ = [
    "Timing",
    "copy_bandwidth_gbs",
    "cuda_available",
    "default_results_dir",
    "env_info",
    "gbs",
    "latest_by_scenario",
    "load_records",
    "make_record",
    "measure_compile",
    "percentile",
    "record_key",
    "sync_wrapper",
    "synchronize",
    "time_cuda",
    "write_record",
]
