"""What the drag engines share around their step: the result type and the pipelined run loop.

An engine's ``step()`` returns device tensors ``(handles [P, 2], done [], loss [])`` without waiting for the
device. :func:`pipelined_run` turns steps into :class:`StepResult` s while keeping the GPU busy: the host copies
step ``k``'s tensors into pinned buffers (:class:`PinnedReadback`) and reads them only after it has queued step
``k + 1``, which makes no update once the edit is done (on the CPU and in reference modes each step is read at
once). ``step_result`` converts the read values (the engine's coordinates) into a result in image pixels.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class StepResult:
    """One optimisation step as the host sees it.

    ``handles`` are ``[x, y]`` image pixels after tracking, ``distances`` the distance of each to its
    target (px), ``done`` whether every handle is within the stop distance (no update was made),
    ``loss`` the step's loss, ``ms`` wall time since the previous result.
    """

    step: int
    handles: list[list[float]]
    distances: list[float]
    done: bool
    loss: float
    ms: float


class PinnedReadback:
    """Copies of ``(handles, done, loss)`` into pinned host buffers, enqueued on the current stream, with an event
    to wait on. Two alternating sets, so that a copy never overwrites the set the host is reading."""

    def __init__(self) -> None:
        self._sets: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._n = 0

    def copy(self, handles: Tensor, done: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor, torch.cuda.Event]:
        key = self._n % 2
        self._n += 1
        bufs = self._sets.get(key)
        if bufs is None or bufs[0].shape != handles.shape:
            bufs = (torch.empty(handles.shape, pin_memory=True), torch.empty((), dtype=torch.bool, pin_memory=True),
                    torch.empty((), pin_memory=True))
            self._sets[key] = bufs
        bufs[0].copy_(handles, non_blocking=True)
        bufs[1].copy_(done, non_blocking=True)
        bufs[2].copy_(loss.detach(), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return (*bufs, ev)


def host_copy(handles: Tensor, done: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
    """The unpipelined snapshot (CPU, or reference modes that read values back anyway)."""
    return handles.clone(), done.clone(), loss.detach().clone(), None


def step_result(k: int, snapshot: tuple, t_last: float, to_image: Callable[[list[list[float]]], list[list[float]]],
                targets: list[list[float]]) -> StepResult:
    """Wait for ``snapshot`` (``(handles, done, loss, event or None)``) and build step ``k``'s result; handles are
    mapped to image pixels by ``to_image`` and compared with ``targets`` (image pixels)."""
    handles, done, loss, ev = snapshot
    if ev is not None:
        ev.synchronize()
    h = to_image(handles[: len(targets)].tolist())
    dist = [math.dist(a, b) for a, b in zip(h, targets)]
    return StepResult(step=k, handles=h, distances=dist, done=bool(done), loss=float(loss),
                      ms=(time.perf_counter() - t_last) * 1e3)


def run_limit(max_steps: Any, default: int) -> int:
    """``run(max_steps=...)``: ``None`` -> the config's ``default``; else an integer >= 1 (``ValueError`` naming it)."""
    if max_steps is None:
        return default
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} is not allowed; use an integer >= 1 (or None for the config's "
                         f"max_steps={default})")
    return max_steps


def pipelined_run(step: Callable[[], tuple[Tensor, Tensor, Tensor]], snapshot: Callable[..., tuple],
                  result: Callable[[int, tuple, float], StepResult], limit: int) -> Iterator[StepResult]:
    """Steps until a result says ``done`` or ``limit`` steps; yields one result per step.

    A snapshot with a device event (a fast mode on CUDA) is read after step ``k + 1`` was queued, so the GPU never
    waits for the host; the step after the last one makes no update. A host snapshot (the CPU, or a reference
    mode, which reads values back as the published code does) is read at once: there is nothing to overlap, and
    such a run takes no step past the one that finished the edit, as the published loops stop there (a reference
    mode doing one more step than its paper would flatter our ratios).
    """
    t_last = time.perf_counter()

    def read(item: tuple[int, Any]) -> StepResult:
        nonlocal t_last
        r = result(item[0], item[1], t_last)
        t_last = time.perf_counter()
        return r

    pending: tuple[int, Any] | None = None
    for k in range(limit):
        snap = snapshot(*step())
        if pending is not None:
            r, pending = read(pending), None
            yield r
            if r.done:
                return
        if snap[-1] is not None:
            pending = (k, snap)
            continue
        r = read((k, snap))
        yield r
        if r.done:
            return
    if pending is not None:
        yield read(pending)


def check_points(name: str, points: Any, max_handles: int) -> Tensor:
    """User points ``[[x, y], ...]`` as float64 ``[P, 2]``: 1 to ``max_handles`` finite points, else a
    ``ValueError`` naming ``name`` and what is allowed. The caller checks them against its image."""
    try:
        t = torch.as_tensor(points, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a list of [x, y] pairs: {exc}") from None
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must be [[x, y], ...] with at least one point, got shape {tuple(t.shape)}")
    if t.shape[0] > max_handles:
        raise ValueError(f"{name}: {t.shape[0]} points; at most max_handles={max_handles}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return t


def handle_slots(n: int, max_handles: int, device: torch.device) -> int:
    """Rows of a fast step's handle buffers for an edit of ``n`` handles: ``max_handles`` on CUDA, where the step is
    captured and replayed on static shapes (the next drag refills the same buffers, padding rows inactive), else
    ``n``. On the CPU nothing is captured, and every padding row costs a real handle's share of tracking and
    sampling: a DragGAN step on the 64 px zoo model of the time took 23 ms with 16 rows for 1 or 5 handles (bench
    ``draggan-cpu``)."""
    return max_handles if device.type == "cuda" else n


def finished_on_host(device: torch.device, done: Tensor) -> bool:
    """Whether a fast step is done and the host may know it for free: on the CPU. The masked Adam would then make
    no update, so the fast bodies skip their backward (about half a step), as the references' loops do; on CUDA a
    step never waits for the host and the masked update decides on the device."""
    return device.type == "cpu" and bool(done)


def kept_state(states: dict, key: Any, slots: int) -> Any:
    """The fast state an engine kept under ``key`` if its handle buffers have ``slots`` rows (refill it: a captured
    graph reads those buffers), else ``None`` (build one: on the CPU, an edit with another number of handles)."""
    st = states.get(key)
    return st if st is not None and len(st.handles) == slots else None


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream | None, device: torch.device) -> Iterator[None]:
    """Run the block on a fast engine's own CUDA stream, ordered after and before the caller's stream by
    stream waits (no host waits); a no-op without a stream. Capturing the backward from the stream where the
    latent's gradient accumulator lives is what lets autograd run inside a CUDA graph (capturing from the
    default stream failed on an H200 with cudaErrorStreamCaptureImplicit)."""
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        yield
    caller.wait_stream(stream)


def capture_step(body: Callable[[], None], state: tuple[Tensor, ...], stream: torch.cuda.Stream,
                 device: torch.device) -> torch.cuda.CUDAGraph:
    """Capture one optimisation step ``body`` into a CUDA graph on ``stream``: two warm-up calls first
    (compilation, cuDNN plans, memory pools), then the capture; the tensors in ``state`` (everything the step
    updates) are put back afterwards, so capturing does not advance the edit."""
    with on_stream(stream, device):
        keep = [t.detach().clone() for t in state]
        for _ in range(2):
            body()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    with on_stream(stream, device), torch.no_grad():
        for dst, src in zip(state, keep):
            dst.copy_(src)
    return graph


def fast_step(st: Any, use_graph: bool, state: Callable[[], tuple[Tensor, ...]], body: Callable[[], None],
              stream: torch.cuda.Stream | None, device: torch.device) -> None:
    """One fast-mode step of an engine's state ``st`` (its ``graph``, ``n``): the step graph is captured on first
    use when ``use_graph`` (``state()`` names the tensors the capture must put back), then replayed on the
    engine's stream; without a graph ``body`` runs eagerly there."""
    if use_graph and st.graph is None:
        st.graph = capture_step(body, state(), stream, device)
    with on_stream(stream, device):
        if st.graph is not None:
            st.graph.replay()
        else:
            body()
    st.n += 1
