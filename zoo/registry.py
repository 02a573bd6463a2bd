"""``zoo:<name>`` model paths: the shipped weights of the model zoo.

``resolve("zoo:faces-landmarks")`` is the package folder ``dragrt/zoo/weights/faces-landmarks`` (config,
fp16 safetensors and model card); any other path comes back as a :class:`~pathlib.Path`, unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "zoo:"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

#: Every zoo model and the module that trains it (mirrors dragrt.zoo.train.TRAINERS, which imports torch).
KNOWN: tuple[str, ...] = ("faces-landmarks", "faces-attributes", "faces-clip", "faces-vae", "faces-sd",
                          "faces-stylegan2")


def is_zoo(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def train_command(name: str) -> str:
    return f"python -m dragrt.zoo.train {name} --run-dir runs/{name} --export"


def available() -> dict[str, Path]:
    """Shipped zoo models: name -> folder (a folder counts once it holds a file other than its card)."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    out = {}
    for d in sorted(WEIGHTS_DIR.iterdir()):
        if d.is_dir() and not d.name.startswith((".", "_")) and any(
                f.is_file() and f.name != "MODEL_CARD.md" for f in d.iterdir()):
            out[d.name] = d
    return out


def resolve(path: str | os.PathLike) -> Path:
    """``zoo:<name>`` -> the shipped folder of that model (``FileNotFoundError`` naming the model, the
    available ones and the training command when it is missing); anything else -> ``Path(path)``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model path must be a str or os.PathLike; got {type(path).__name__}")
    if not is_zoo(path):
        return Path(path)
    name = path[len(PREFIX):].strip().strip("/")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"zoo model path must look like 'zoo:<name>'; got {path!r}")
    have = available()
    if name in have:
        return have[name]
    listing = ", ".join(have) if have else "none shipped yet"
    hint = (f"train it with: {train_command(name)}" if name in KNOWN
            else f"known zoo models: {', '.join(KNOWN)}")
    raise FileNotFoundError(f"zoo model {name!r} is not installed in {WEIGHTS_DIR} (available: {listing}); {hint}")
