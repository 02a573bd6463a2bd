"""Configuration: one documented dataclass per concern.

Every field says what it trades off. Lossy or risky options are off by default and say so. Values are
checked when the object is built, and a bad value raises ``ValueError`` naming the field and what it
accepts, so a typo never reaches torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KERNEL_CHOICES = ("auto", "triton", "reference")


def default_cache_dir() -> Path:
    """``$DRAGRT_CACHE``, else ``$XDG_CACHE_HOME/dragrt``, else ``~/.cache/dragrt``."""
    env = os.environ.get("DRAGRT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dragrt"


@dataclass
class RuntimeConfig:
    """Where and how dragrt runs. Shared by every engine, the CLI and the server.

    Attributes:
        device: ``"auto"`` (the first CUDA GPU if one is usable, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``. The CPU runs every method, slowly: it exists for tests and small models.
        dtype: compute precision of the models. ``"auto"`` is float16 on CUDA and float32 on the CPU.
            float16/bfloat16 halve memory and run the matrix units at full rate; latents that are
            optimised are always kept in float32 (as the reference implementations do), so this does
            not change the optimiser's arithmetic. bfloat16 avoids float16 overflow at some precision cost.
        kernels: which implementation of dragrt's own ops runs: ``"auto"`` (Triton on CUDA, the PyTorch
            reference elsewhere), ``"triton"`` (fail with every reason if it cannot run) or
            ``"reference"`` (the plain PyTorch spec: slower, the parity baseline). The environment
            variable ``DRAGRT_KERNELS`` overrides this default; see :mod:`dragrt.kernels.dispatch`.
        compile_mode: ``torch.compile`` mode for the engines' hot steps: ``"auto"`` (``"default"`` on CUDA,
            eager on the CPU), ``"none"`` (eager), or a ``torch.compile`` mode. Compiling costs tens of
            seconds once per model and shape (the benchmarks report it apart from steady state) and buys
            lower per-step latency (DragGAN at 512 on an H200: 4.3 -> 2.6 ms per step). The engines
            capture CUDA graphs themselves, so ``"default"`` or ``"max-autotune-no-cudagraphs"`` (autotuned
            kernels, a much longer compile) are the modes to use with them; ``"reduce-overhead"`` and
            ``"max-autotune"`` add Inductor's own CUDA graphs inside those captures.
        cache_dir: where inversions, LoRAs and reference features are cached by content hash. Deleting
            it only costs recomputation.
    """

    device: str = "auto"
    dtype: str = "auto"
    kernels: str = "auto"
    compile_mode: str = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        self.device = _check_device(self.device)
        self.dtype = _check_choice("dtype", _DTYPE_ALIASES.get(self.dtype, self.dtype), ("auto", *_DTYPES))
        self.kernels = _check_choice("kernels", self.kernels, KERNEL_CHOICES)
        self.compile_mode = _check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        if not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be a path, got {type(self.cache_dir).__name__}")
        self.cache_dir = Path(self.cache_dir).expanduser()

    def replace(self, **changes) -> RuntimeConfig:
        """A copy with some fields changed (validated like a new object)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown RuntimeConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def torch_device(self) -> torch.device:
        """The resolved device: ``"auto"`` becomes ``cuda`` when a GPU is usable, else ``cpu``."""
        if self.device == "auto":
            return torch.device("cuda" if cuda_usable() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda":
            if not cuda_usable():
                raise ValueError(f"device={self.device!r} was asked for, but no CUDA GPU is usable here")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device={self.device!r}: only {torch.cuda.device_count()} CUDA device(s) here "
                    f"(allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1})"
                )
        return dev

    def resolved_compile_mode(self) -> str | None:
        """The ``torch.compile`` mode to use, or ``None`` for eager (``"auto"``: compile on CUDA only)."""
        if self.compile_mode == "auto":
            return "default" if self.torch_device().type == "cuda" else None
        return None if self.compile_mode == "none" else self.compile_mode

    def torch_dtype(self) -> torch.dtype:
        """The resolved compute dtype: ``"auto"`` is float16 on CUDA and float32 on the CPU."""
        if self.dtype == "auto":
            return torch.float16 if self.torch_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


def cuda_usable() -> bool:
    """True when at least one CUDA device can be used (``device_count`` is the honest probe:
    ``is_available`` can say True with ``CUDA_VISIBLE_DEVICES=""``)."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:  # a broken driver install must read as "no GPU", not crash the caller
        return False


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def _check_device(value: object) -> str:
    if isinstance(value, torch.device):
        value = str(value)
    ok = isinstance(value, str) and (
        value in ("auto", "cpu", "cuda")
        or (value.startswith("cuda:") and value[5:].isdigit())
    )
    if not ok:
        raise ValueError(f"device={value!r} is not allowed; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


@contextlib.contextmanager
def force_eager() -> Iterator[None]:
    """Run ``torch.compile``d callables eagerly inside the block (``torch.compiler.set_stance``; without it,
    before torch 2.6, the block runs as it would anyway)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
