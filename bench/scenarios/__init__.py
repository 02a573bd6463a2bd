"""The scenario registry.

A scenario is a function ``(budget_ms: float, quick: bool) -> Iterable[dict]`` returning (a list) or yielding
(a generator) records built with :func:`dragrt.bench.harness.make_record`; ``budget_ms`` is the timing budget
per measured callable, in ms, and ``quick`` asks for a smaller sweep. ``dragrt bench run`` writes each record as
soon as it comes, so a long scenario that yields keeps what it measured when it is cut off or fails later.
Register one with :func:`register`. Every module in this package is imported the first time the registry is
read, so a new ``scenarios/<name>.py`` needs no edit here; a module that fails to import is reported by
:func:`load_errors` instead of breaking the others.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

ScenarioFn = Callable[[float, bool], Iterable[dict[str, Any]]]


@dataclass(frozen=True)
class Scenario:
    """A registered scenario; calling it calls ``fn(budget_ms, quick)``."""

    name: str
    fn: ScenarioFn
    needs_cuda: bool = True
    description: str = ""

    def __call__(self, budget_ms: float, quick: bool) -> Iterable[dict[str, Any]]:
        return self.fn(budget_ms, quick)


_REGISTRY: dict[str, Scenario] = {}
_LOAD_ERRORS: dict[str, str] = {}
_discovered = False


def register(name: str, *, needs_cuda: bool = True, description: str = "") -> Callable[[ScenarioFn], ScenarioFn]:
    """Decorator adding ``fn`` to the registry under ``name``; returns ``fn`` unchanged.

    Raises:
        ValueError: ``name`` is already taken by a different function.
    """

    def deco(fn: ScenarioFn) -> ScenarioFn:
        old = _REGISTRY.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            owner = f"{old.fn.__module__}.{old.fn.__qualname__}"
            raise ValueError(f"scenario {name!r} is already registered by {owner}")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Scenario(name, fn, needs_cuda, description or (doc[0] if doc else ""))
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):  # noqa: F821 (set by the import system)
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:
            _LOAD_ERRORS[info.name] = f"{type(e).__name__}: {e}"


def get(name: str) -> Scenario:
    """The scenario registered as ``name``.

    Raises:
        KeyError: no such scenario (the message lists the known names).
    """
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(names()) or '(none)'}") from None


def names() -> list[str]:
    """Registered scenario names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def load_errors() -> dict[str, str]:
    """Scenario modules that failed to import: module name -> error."""
    _discover()
    return dict(_LOAD_ERRORS)


__all__ = ["Scenario", "get", "load_errors", "names", "register"]
