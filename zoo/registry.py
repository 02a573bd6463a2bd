"""``zoo:<name>`` model paths: the shipped weights of the model zoo.

``resolve("zoo:faces-landmarks")`` is the package folder ``dragrt/zoo/weights/faces-landmarks`` (config,
fp16 safetensors and model card); any other path comes back as a :class:`~pathlib.Path`, unchanged.

A model shipped inside another one is stored once: ``zoo:faces-vae`` is byte for byte the ``vae/`` of
``zoo:faces-sd`` (the UNet was trained on its latents), so ``weights/faces-vae`` holds its model card and an
alias file naming ``faces-sd/vae``, which :func:`resolve` follows. :func:`share_identical` (run by every export
into the package, and by ``python -m dragrt.zoo.registry``) turns a copy into an alias only when the weights
are identical; an export of the model itself writes real files again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

PREFIX = "zoo:"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CARD = "MODEL_CARD.md"
#: In a model folder: ``{"target": "<model>/<subfolder>", "sha256": {file: digest}}``, the shipped files' place.
ALIAS_FILE = "zoo_alias.json"
#: All zoo weights together (the zoo issue's budget).
BUDGET_BYTES = 32_000_000
#: Models that may be stored as a part of another model's folder: name -> that part.
SHARED: dict[str, str] = {"faces-vae": "faces-sd/vae"}
# config keys that say where a file came from or which library wrote it, not what the model is
_PROVENANCE_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version")

#: Every zoo model and the module that trains it (mirrors dragrt.zoo.train.TRAINERS, which imports torch).
KNOWN: tuple[str, ...] = ("faces-landmarks", "faces-attributes", "faces-attribute-details", "faces-clip",
                          "faces-vae", "faces-sd", "faces-stylegan2")


def is_zoo(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def train_command(name: str) -> str:
    return f"python -m dragrt.zoo.train {name} --run-dir runs/{name} --export"


def _holds_weights(folder: Path) -> bool:
    return folder.is_dir() and any(f.is_file() and f.name not in (CARD, ALIAS_FILE) for f in folder.iterdir())


def alias_target(folder: Path) -> Path | None:
    """The folder an alias in ``folder`` points to (``None`` without an alias file); ``ValueError`` for an alias
    that leaves the weights folder."""
    f = folder / ALIAS_FILE
    if not f.is_file():
        return None
    target = json.loads(f.read_text()).get("target", "")
    parts = Path(target).parts
    if not target or Path(target).is_absolute() or ".." in parts or len(parts) != 2:
        raise ValueError(f"{f}: 'target' must be '<model>/<subfolder>' inside the zoo, got {target!r}")
    return folder.parent / target


def available() -> dict[str, Path]:
    """Shipped zoo models: name -> the folder with their files (a folder counts once it holds a file other than its
    card, or an alias to a folder that does). A folder's own weight files win over an alias left beside them (an
    export untarred over the alias, before :func:`share_identical` has dropped it): they are the newer model."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    out = {}
    for d in sorted(WEIGHTS_DIR.iterdir()):
        if not d.is_dir() or d.name.startswith((".", "_")):
            continue
        if _holds_weights(d):
            out[d.name] = d
        elif (target := alias_target(d)) is not None and _holds_weights(target):
            out[d.name] = target
    return out


def installed(*names: str) -> bool:
    """Whether every named zoo model (``"faces-sd"`` or ``"zoo:faces-sd"``) is shipped in this install."""
    have = available()
    return all((_zoo_name(n) if is_zoo(n) else n) in have for n in names)


def card_path(path: str | os.PathLike) -> Path:
    """The model card of ``path``: for ``zoo:NAME`` the one in the model's own folder (an alias's folder keeps its
    card), else ``PATH/MODEL_CARD.md``."""
    if is_zoo(path):
        return WEIGHTS_DIR / _zoo_name(path) / CARD
    return Path(path) / CARD


def _zoo_name(path: str) -> str:
    name = path[len(PREFIX):].strip().strip("/")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"zoo model path must look like 'zoo:<name>'; got {path!r}")
    return name


def resolve(path: str | os.PathLike) -> Path:
    """``zoo:<name>`` -> the shipped folder of that model (``FileNotFoundError`` naming the model, the
    available ones and the training command when it is missing); anything else -> ``Path(path)``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model path must be a str or os.PathLike; got {type(path).__name__}")
    if not is_zoo(path):
        return Path(path)
    name = _zoo_name(path)
    have = available()
    if name in have:
        return have[name]
    listing = ", ".join(have) if have else "none shipped yet"
    hint = (f"train it with: {train_command(name)}" if name in KNOWN
            else f"known zoo models: {', '.join(KNOWN)}")
    raise FileNotFoundError(f"zoo model {name!r} is not installed in {WEIGHTS_DIR} (available: {listing}); {hint}")


def describe() -> dict[str, dict]:
    """Every known zoo model: ``installed``, ``path`` (the folder with its files), ``bytes`` (of those files),
    ``stored_in`` (another model's part it is stored as, for an alias), ``below_target`` (its card says it misses
    its target: a provisional model), and the training command when it is missing."""
    have = available()
    out: dict[str, dict] = {}
    for name in KNOWN:
        folder = have.get(name)
        card = WEIGHTS_DIR / name / CARD
        info: dict = {"installed": folder is not None, "path": str(folder) if folder else None}
        if folder is not None:
            info["bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != CARD)
            own = WEIGHTS_DIR / name
            info["stored_in"] = str(folder.relative_to(WEIGHTS_DIR)) if folder != own else None
            info["below_target"] = card.is_file() and "**Below target:**" in card.read_text()
        else:
            info["train"] = train_command(name)
        out[name] = info
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def without_provenance(config: dict) -> dict:
    """A JSON config without the keys that say where it was loaded from or which library version wrote it."""
    return {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS}


def same_files(a: Path, b: Path) -> bool:
    """``a``'s shipped files (card aside) all exist in ``b`` with the same bytes; JSON configs may differ only in
    provenance keys (where they were loaded from, library versions)."""
    files = [f for f in a.iterdir() if f.is_file() and f.name not in (CARD, ALIAS_FILE)]
    if not files:
        return False
    for f in files:
        g = b / f.name
        if not g.is_file():
            return False
        if f.suffix == ".json":
            if without_provenance(json.loads(f.read_text())) != without_provenance(json.loads(g.read_text())):
                return False
        elif f.stat().st_size != g.stat().st_size or _digest(f) != _digest(g):
            return False
    return True


def share_identical(weights_dir: Path | None = None) -> list[str]:
    """Store each :data:`SHARED` model once: where ``NAME``'s files equal those of its part of another model, they
    are replaced by an alias file (the card stays). A folder holding both an alias and weight files of its own (an
    export untarred over it) drops the stale alias first. Returns the names turned into aliases."""
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    done = []
    for name, part in SHARED.items():
        folder, target = root / name, root / part
        if alias_target(folder) is not None and _holds_weights(folder):
            unshare(folder)  # an export unpacked over the alias (from another machine): its own files win
        if alias_target(folder) is not None or not _holds_weights(target) or not same_files(folder, target):
            continue
        files = sorted(f.name for f in target.iterdir() if f.is_file() and f.suffix != ".json")
        (folder / ALIAS_FILE).write_text(json.dumps(
            {"target": part, "sha256": {n: _digest(target / n) for n in files}}, indent=2, sort_keys=True) + "\n")
        for f in folder.iterdir():
            if f.is_file() and f.name not in (CARD, ALIAS_FILE):
                f.unlink()
        card = folder / CARD
        if card.is_file():
            card.write_text(card.read_text().rstrip("\n") + f"\n\nStored once: the files are those of `{part}/` "
                            f"(byte-identical; `{ALIAS_FILE}` records their SHA-256). `zoo:{name}` resolves there.\n")
        done.append(name)
    return done


def share_identical_report(weights_dir: Path | None = None) -> list[str]:
    """:func:`share_identical`, as one line per model it turned into an alias (for the commands that export)."""
    return [f"zoo:{name} is identical to zoo:{SHARED[name]}: stored once, as an alias"
            for name in share_identical(weights_dir)]


def unshare(folder: Path) -> None:
    """Drop ``folder``'s alias (an export is about to write the model's own files there)."""
    (Path(folder) / ALIAS_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    shared = share_identical()
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
             for d in sorted(WEIGHTS_DIR.iterdir()) if d.is_dir()}
    print(json.dumps({"aliased": shared, "bytes": sizes, "total_bytes": sum(sizes.values()),
                      "budget_bytes": BUDGET_BYTES}, indent=2))
    sys.exit(0)
