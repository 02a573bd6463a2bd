"""Which implementation of an op runs.

Three inputs decide, and nothing else:

1. the default, ``"auto"``: the highest-priority implementation that supports the call (Triton on CUDA,
   the PyTorch reference everywhere else; Triton's CPU interpreter only when asked for by name);
2. the environment variable ``DRAGRT_KERNELS``: ``auto``, ``triton`` or ``reference`` for every op, or
   per op, e.g. ``DRAGRT_KERNELS=triton,patch_track=reference``;
3. the context manager :func:`use_kernels`, which beats the environment inside its block.

Each implementation declares what it supports as data (devices, dtypes, a run-time requirement) and
explains a refusal in words. When nothing fits, the error lists every implementation's reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

ENV_VAR = "DRAGRT_KERNELS"
CHOICES = ("auto", "triton", "reference")


class KernelUnavailableError(RuntimeError):
    """No implementation of an op can run the call; the message lists every implementation's reason."""


@dataclass(frozen=True)
class Implementation:
    """One implementation of one op, with what it supports declared as data.

    Attributes:
        op: the op's name, e.g. ``"bilinear_sample"``.
        name: ``"triton"`` or ``"reference"``.
        fn: the callable; same signature as the op's reference.
        devices: device types it runs on (``"cuda"``, ``"cpu"``).
        dtypes: floating dtypes of the main input it accepts.
        priority: higher wins under ``auto``.
        requirement: returns ``None`` when the implementation can run in this process for a device type,
            else the reason it cannot (a missing package, no GPU, ...).
        auto_devices: device types where ``auto`` may pick it (default: all of ``devices``). Triton on the
            CPU runs only through its interpreter, which exists for tests: ``auto`` never picks it there.
    """

    op: str
    name: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: int = 0
    requirement: Callable[[str], str | None] | None = None
    auto_devices: tuple[str, ...] | None = None

    def refusal(self, device: torch.device | str, dtype: torch.dtype | None) -> str | None:
        """``None`` if this implementation can run on ``device``/``dtype`` here, else why not."""
        dev = torch.device(device).type
        if dev == "cuda":
            from dragrt.runtime.config import cuda_usable

            if not cuda_usable():
                return "no CUDA GPU is usable in this process"
        if self.requirement is not None:
            reason = self.requirement(dev)
            if reason:
                return reason
        if dev not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {dev}"
        if dtype is not None and dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"supports {names}, not {str(dtype).removeprefix('torch.')}"
        return None


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# select() results by (op, device type, dtype, choice, interpreter flag): a hit costs ~1 us instead of ~8 us
# of support checks, which matters for ops called eagerly in a loop (measured on a CPU, 2026-11).
_SELECTED: dict[tuple, Implementation] = {}
_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("dragrt_kernels", default=None)


def register(
    op: str,
    name: str,
    *,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
    priority: int = 0,
    requirement: Callable[[str], str | None] | None = None,
    auto_devices: tuple[str, ...] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as implementation ``name`` of ``op``."""
    if name not in CHOICES[1:]:
        raise ValueError(f"implementation name {name!r} is not one of {CHOICES[1:]}")

    def deco(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[name] = Implementation(op, name, fn, devices, dtypes, priority, requirement,
                                                            auto_devices)
        _SELECTED.clear()
        return fn

    return deco


def ops() -> list[str]:
    """Names of the registered ops."""
    _load_builtin_ops()
    return sorted(_REGISTRY)


def implementations(op: str) -> list[Implementation]:
    """The implementations of ``op``, highest priority first."""
    _load_builtin_ops()
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return sorted(_REGISTRY[op].values(), key=lambda i: -i.priority)


def parse_choice(spec: str, source: str = ENV_VAR) -> dict[str, str]:
    """Parse ``"triton"`` or ``"triton,patch_track=reference"`` into ``{"*": ..., op: ...}``."""
    out: dict[str, str] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        op, _, name = item.rpartition("=")
        op, name = (op.strip() or "*"), name.strip()
        if name not in CHOICES:
            raise ValueError(f"{source}: {item!r} is not allowed; use one of {', '.join(CHOICES)}, "
                             f"optionally per op as OP=NAME (e.g. 'triton,patch_track=reference')")
        out[op] = name
    return out


@functools.lru_cache(maxsize=16)
def _parse_env(spec: str) -> dict[str, str]:
    return parse_choice(spec)


def current_choice(op: str) -> tuple[str, str]:
    """The choice for ``op`` and where it came from (``"context"``, ``ENV_VAR`` or ``"default"``)."""
    ctx = _CONTEXT.get()
    if ctx is not None and (op in ctx or "*" in ctx):
        return ctx.get(op, ctx.get("*", "auto")), "context"
    env = os.environ.get(ENV_VAR, "")
    if env.strip():
        parsed = _parse_env(env)
        if op in parsed or "*" in parsed:
            return parsed.get(op, parsed.get("*", "auto")), ENV_VAR
    return "auto", "default"


@contextlib.contextmanager
def use_kernels(choice: str = "auto", **per_op: str) -> Iterator[None]:
    """Run the block with ``choice`` for every op, or ``per_op`` names for some.

    >>> with use_kernels("reference"):
    ...     pass  # every dragrt op runs its PyTorch reference here
    """
    spec = {"*": choice, **per_op}
    for op, name in spec.items():
        if name not in CHOICES:
            raise ValueError(f"use_kernels: {op}={name!r} is not allowed; use one of {', '.join(CHOICES)}")
    token = _CONTEXT.set(spec)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def select(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> Implementation:
    """The implementation that runs ``op`` for inputs on ``device`` with ``dtype``.

    Raises:
        KernelUnavailableError: the chosen implementation refuses, or (under ``auto``) all do; the message
            gives every implementation's reason and how the choice was made.
    """
    dev = device.type if isinstance(device, torch.device) else torch.device(device).type
    choice, source = current_choice(op)
    key = (op, dev, dtype, choice, triton_interpret())
    hit = _SELECTED.get(key)
    if hit is not None:
        return hit
    impl = _select_uncached(op, dev, dtype, choice, source)
    _SELECTED[key] = impl
    return impl


def _select_uncached(op: str, dev: str, dtype: torch.dtype | None, choice: str, source: str) -> Implementation:
    impls = implementations(op)
    if choice == "auto":
        candidates = [i for i in impls if i.auto_devices is None or dev in i.auto_devices]
    else:
        candidates = [i for i in impls if i.name == choice]
    for impl in candidates:
        if impl.refusal(dev, dtype) is None:
            return impl
    reasons = "; ".join(f"{i.name}: {i.refusal(dev, dtype) or 'usable'}" for i in impls)
    how = f"kernels={choice!r} (from {source})"
    if not candidates:
        reasons = f"no implementation named {choice!r}; " + reasons
    raise KernelUnavailableError(
        f"no implementation of {op} can run on {dev}"
        f"{'' if dtype is None else ' with ' + str(dtype).removeprefix('torch.')} under {how}: {reasons}"
    )


def describe(device_types: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, dict[str, dict[str, str]]]:
    """For ``dragrt info``: per op, per implementation, per device type: ``"usable"`` or the reason."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for op in ops():
        out[op] = {
            impl.name: {dev: impl.refusal(dev, None) or "usable" for dev in device_types}
            for impl in implementations(op)
        }
    return out


# --- requirements shared by implementations -------------------------------------------------------------

def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors, slowly, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the package triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must be reported, not crash dispatch
        return f"triton failed to import ({type(exc).__name__}: {exc})"
    return None


def triton_requirement(device_type: str) -> str | None:
    """Triton runs on CUDA GPUs, and on the CPU only under the interpreter (``TRITON_INTERPRET=1``)."""
    err = _triton_import_error()
    if err:
        return err
    if device_type == "cuda":
        return None  # whether a GPU is usable is checked for every implementation
    if device_type == "cpu":
        return None if triton_interpret() else "on the CPU only under the interpreter (set TRITON_INTERPRET=1)"
    return f"no Triton backend for {device_type}"


TRITON_DEVICES = ("cuda", "cpu")  # cpu: interpreter only, enforced by triton_requirement


def _load_builtin_ops() -> None:
    # The ops register themselves on import; importing here keeps dispatch usable on its own.
    import dragrt.kernels.ops  # noqa: F401
