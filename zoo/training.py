"""What every zoo training script shares: resumable checkpoints, a wall-clock budget, fp16 export, model cards.

Each trainer is a module with two functions (registered in :mod:`dragrt.zoo.train`)::

    train(run_dir: Path, *, minutes: float, device: str, seed: int, smoke: bool) -> dict  # metrics
    export(run_dir: Path, dest: Path) -> Path                                          # shipped weights

``train`` resumes from ``run_dir`` when a checkpoint is there, trains until its total step target or the
``minutes`` budget (whichever first), saves a checkpoint, evaluates, writes ``run_dir/metrics.json`` and returns
the metrics. ``smoke=True`` shrinks everything (model width, batch, steps) so a CPU test runs it in seconds.
GPU runs come in chunks of at most 10 minutes, so the budget check runs every step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dragrt.zoo.registry import CARD

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


class Budget:
    """A wall-clock budget: ``expired()`` once ``minutes`` have passed since construction."""

    def __init__(self, minutes: float) -> None:
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        self.seconds = float(minutes) * 60.0
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.elapsed >= self.seconds


def save_checkpoint(run_dir: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically. ``state`` holds only tensors, numbers, strings, lists and
    dicts of them (model and optimizer state dicts, step counters, RNG states), so :func:`load_checkpoint`
    can read it with ``weights_only=True``: our own resumable training state, never a shipped file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or ``None`` when ``run_dir`` has none.
    Read with ``weights_only=True``: tensors and plain containers only, no code runs."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)


def write_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / METRICS
    path.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    return path


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else {}


def fp16_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's floating-point tensors in fp16 (others as they are), contiguous, on the CPU."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        out[k] = (v.half() if v.is_floating_point() else v).contiguous()
    return out


def staged_export(export: Callable[..., Path]) -> Callable[..., Path]:
    """Make a trainer's ``export(run_dir, dest, **options)`` write ``dest`` only once it has succeeded.

    The wrapped export writes into a fresh folder beside ``dest``; then every file it wrote is moved to the same
    place under ``dest`` by ``os.replace``. So an export that fails (a missing checkpoint, weights over the
    budget) leaves ``dest`` as it was, and a process that holds the old weights memory-mapped (safetensors'
    ``load_file`` maps the file; a running demo) keeps reading them intact: a rename never rewrites the old
    file's bytes, as writing in place would. Files of ``dest`` the export does not write stay. Returns the path
    the export returned, moved under ``dest``. An export with a ``final_dest`` keyword is told ``dest`` (it
    writes into the stage folder, but may name what it writes after where it will land)."""
    wants_final = "final_dest" in inspect.signature(export).parameters

    @functools.wraps(export)
    def wrapper(run_dir: str | os.PathLike, dest: str | os.PathLike, **options: Any) -> Path:
        dest = Path(dest)
        if dest.exists() and not dest.is_dir():
            raise NotADirectoryError(f"export: dest={str(dest)!r} is a file; give a folder to write the model into")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.export-", dir=dest.parent))
        try:
            if wants_final:
                options = {**options, "final_dest": dest}
            written = Path(export(run_dir, stage, **options))
            for src in sorted(stage.rglob("*")):
                if src.is_file():
                    target = dest / src.relative_to(stage)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return dest / written.relative_to(stage)

    return wrapper


def device_name(device: torch.device) -> str:
    """What a model card names as the training device: the GPU's name, or the CPU and its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


def git_commit(default: str = "unknown") -> str:
    """The commit of the checkout (``DRAGRT_BENCH_COMMIT`` wins: the device machine has no .git)."""
    env = os.environ.get("DRAGRT_BENCH_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip() or default
    except (OSError, subprocess.CalledProcessError):
        return default


def write_card(dest: str | os.PathLike, *, name: str, summary: str, data: str, training: Mapping[str, Any],
               metrics: Mapping[str, Any], files: list[str], status: str | None = None) -> Path:
    """Write ``dest/MODEL_CARD.md``: what the model is, its status (``status``: e.g. a missed target, said at
    the top), the data, training (steps, device, device time, commit, command) and the measured metrics."""
    dest = Path(dest)
    lines = [f"# zoo:{name}", "", summary, ""]
    if status:
        lines += ["## Status", "", status, ""]
    lines += ["## Data", "", data, "", "## Training", ""]
    lines += [f"- {k}: {v}" for k, v in training.items()]
    lines += ["", "## Metrics", ""]
    lines += [f"- {k}: {v}" for k, v in metrics.items()]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files] + [""]
    path = dest / CARD
    path.write_text("\n".join(lines))
    return path


def _card_item(line: str) -> tuple[str, str] | None:
    """``(key, value)`` of a card's ``- key: value`` line (as :func:`write_card` writes them), else None."""
    if not line.startswith("- ") or ": " not in line:
        return None
    key, value = line[2:].split(": ", 1)
    return key, value


def card_values(text: str, section: str = "Metrics") -> dict[str, str]:
    """The ``- key: value`` lines of a card's ``## {section}`` section, as text; empty when the card has no such
    section."""
    _, sep, rest = text.partition(f"\n## {section}\n")
    body = rest.partition("\n## ")[0] if sep else ""
    return dict(item for item in map(_card_item, body.splitlines()) if item is not None)


def replace_card_metrics(text: str, metrics: Mapping[str, Any], status: str | None) -> str:
    """A card's ``text`` (as :func:`write_card` writes it) with the ``- key: value`` lines of its ``## Metrics``
    section set to ``metrics`` (lines it lacks are added at the section's end; other lines, hand-written notes
    included, are kept) and its ``## Status`` section set to ``status`` (removed when None)."""
    head, sep, rest = text.partition("\n## Metrics\n")
    if not sep:
        raise ValueError("the card has no '## Metrics' section; re-export the model to rewrite it")
    section, more, tail = rest.partition("\n## ")
    lines = section.split("\n")
    todo = dict(metrics)
    for i, ln in enumerate(lines):
        key = (_card_item(ln) or (None,))[0]
        if key in todo:
            lines[i] = f"- {key}: {todo.pop(key)}"
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=0)
    lines[last + 1:last + 1] = [f"- {k}: {v}" for k, v in todo.items()]
    # the status section sits between the summary and "## Data" (write_card's order)
    before, st, after = head.partition("\n## Status\n")
    if st:
        after = after[after.index("\n## "):] if "\n## " in after else ""
        head = before + after
    if status:
        at = head.find("\n## ")
        block = f"\n## Status\n\n{status}\n"
        head = head + block if at < 0 else head[:at] + block + head[at:]
    return head + sep + "\n".join(lines) + more + tail


#: ``torch.compile`` modes a trainer accepts (``--compile MODE``; off by default).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str | None) -> None:
    """``ValueError`` naming the allowed modes unless ``mode`` is ``None`` or one of :data:`COMPILE_MODES`."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r} is not allowed; choose one of {', '.join(COMPILE_MODES)} or None")


def check_cuda_graphs(cuda_graphs: Any, compile_mode: str | None, device: torch.device) -> None:
    """``ValueError`` unless a trainer's ``cuda_graphs`` can run: a bool, on a CUDA device, and not together
    with ``compile_mode='reduce-overhead'`` (which makes graphs of its own)."""
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    if cuda_graphs and compile_mode == "reduce-overhead":
        raise ValueError("cuda_graphs=True and compile_mode='reduce-overhead' both make CUDA graphs; use "
                         "compile_mode 'default' or 'max-autotune-no-cudagraphs' with cuda_graphs, or drop cuda_graphs")
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got device={str(device)!r}")


def compile_forwards(modules: list[nn.Module], mode: str | None) -> None:
    """Compile each module's ``forward`` in place (an instance attribute: parameter names and state dicts stay
    as they are, so checkpoints and exports do not change), with static shapes; nothing when ``mode`` is None."""
    check_compile_mode(mode)
    if mode is None:
        return
    for m in modules:
        m.__dict__.pop("forward", None)
        m.forward = torch.compile(m.forward, mode=mode, dynamic=False)


def uncompile_forwards(modules: list[nn.Module]) -> None:
    """Undo :func:`compile_forwards` (e.g. before an evaluation at other shapes, which would compile again)."""
    for m in modules:
        m.__dict__.pop("forward", None)


class ReplayedStep:
    """One part of a training iteration (forward, backward, optimiser step: a zero-argument ``fn``), run eagerly,
    or with ``cuda_graph`` from a CUDA graph: the first call runs ``fn`` eagerly on a side stream (optimiser
    states, cuDNN plans and lazy compilations are made there, as capture requires), the second captures it
    and replays it, every later call replays it. The launches of thousands of small kernels from Python go;
    the work stays the same, random draws included (a replayed draw takes the generator's offset of the
    moment, as an eager one would).

    ``fn`` must read its inputs from tensors that stay in place (static buffers), update its state in place
    (parameters, optimiser states, accumulators) and never wait for the device. ``before_capture`` runs just
    before the capture, outside it (e.g. ``zero_grad(set_to_none=True)``, so that no gradient of another
    graph is freed inside this one). A capture that fails is reported through ``on_fallback`` and the step
    runs eagerly from then on. ``generators``: the CUDA generators ``fn`` draws from other than the device's
    default one (which every capture follows by itself); each is registered with the graph, so that a replay
    advances it as an eager call would.
    """

    def __init__(self, fn: Callable[[], None], *, cuda_graph: bool = False, device: torch.device | None = None,
                 before_capture: Callable[[], None] | None = None,
                 on_fallback: Callable[[str], None] | None = None,
                 generators: Sequence[torch.Generator] = ()) -> None:
        if cuda_graph and (device is None or torch.device(device).type != "cuda"):
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device={device!r}")
        self.fn, self.cuda_graph = fn, cuda_graph
        self.device = torch.device(device) if device is not None else None
        self.before_capture, self.on_fallback = before_capture, on_fallback
        self.generators = tuple(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.cuda_graph:
            self.fn()
        elif self.calls == 1:
            caller = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                self.fn()
            caller.wait_stream(side)
        else:
            if self.graph is None:
                self._capture()
            if self.graph is not None:
                self.graph.replay()
            else:
                self.fn()

    def _capture(self) -> None:
        if self.before_capture is not None:
            self.before_capture()
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            # thread_local: a DataLoader's pin-memory thread may touch CUDA while this thread captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.fn()  # recorded, not run: the caller replays it
        except Exception as exc:  # noqa: BLE001 - any capture failure: keep training, eagerly
            self.cuda_graph = False
            torch.cuda.synchronize(self.device)
            if self.on_fallback is not None:
                self.on_fallback(f"{type(exc).__name__}: {exc}")
            return
        self.graph = graph


def describe_start(path: str | os.PathLike) -> str:
    """What a run started from, for its model card: ``path`` (a folder or ``zoo:`` name) with the steps,
    commit and own start its card records (e.g. ``"zoo:faces-vae (2600 steps at commit 5fe377e, from random
    initialisation)"``), so the cards of a chain of fine-tunes tell the whole training history."""
    from dragrt.zoo.registry import card_path

    resolve_zoo_path(path, "init")  # the weights must exist
    card = card_path(path)
    facts = {}
    if card.is_file():
        for line in card.read_text().splitlines():
            for key in ("steps", "commit", "started from"):
                if line.startswith(f"- {key}: ") and key not in facts:
                    facts[key] = line[len(key) + 4:].strip()
    if "steps" not in facts:
        return str(path)
    return (f"{path} ({facts['steps']} steps at commit {facts.get('commit', '?')}, "
            f"from {facts.get('started from', 'random initialisation')})")


def start_from(hp: Any, init: str | os.PathLike, changes: Mapping[str, Any], **fields: Any) -> Any:
    """``hp`` (a trainer's hyper-parameter dataclass with ``init`` and ``init_history`` fields) for a new run
    started from the exported weights ``init``: with ``changes`` (the trainer's fine-tuning schedule) and
    ``fields`` applied, and the start recorded for the model card (:func:`describe_start`)."""
    return dataclasses.replace(hp, **changes, **fields, init=str(init), init_history=describe_start(init))


def refuse_init_on_resume(run_dir: str | os.PathLike, given: bool, what: str = "init") -> None:
    """``ValueError`` when start-of-run options (``what``) are ``given`` for ``run_dir``, which holds a run."""
    if given:
        raise ValueError(f"{run_dir} holds a run already; {what} apply to a new run only (resume without them, "
                         "or use another run directory)")


def card_start(hparams: Mapping[str, Any], how: str = "") -> str:
    """The model card's "started from" line of a run: ``random initialisation``, or what ``init`` was
    (``init_history``) followed by ``how`` (e.g. ``"; the decoder fine-tuned"``)."""
    init = hparams.get("init", "")
    if not init:
        return "random initialisation"
    return f"{hparams.get('init_history') or init}{how}"


def card_command(name: str, hparams: Mapping[str, Any], flags: str = "") -> str:
    """The model card's command line of a run: with ``--init`` when it started from exported weights, and the
    trainer's extra start ``flags``."""
    init = hparams.get("init", "")
    start = (f" --init {init}" if init else "") + flags
    resume = "(then again, without the start options, to resume)" if start else "(again to resume)"
    return f"python -m dragrt.zoo.train {name} --run-dir RUN --minutes M{start} --export {resume}"


def target_status(metrics: Mapping[str, Any], measured: str, target: str, name: str) -> str | None:
    """The card's status line of a model that misses its target (``metrics["meets_target"]`` false), else None."""
    if metrics.get("meets_target", True):
        return None
    return (f"**Below target:** {measured} against the target {target}. Shipped as a provisional model so that the "
            "demos and evaluations that need it run; every number it produces should be read with this in mind. "
            f"Train further (the command below; `--init zoo:{name}` starts a new run from these very weights) and "
            "re-export to replace it.")


def default_workers(requested: int = -1, *, cap: int = 30) -> int:
    """DataLoader workers for a trainer: ``requested`` when >= 0, else ``DRAGRT_ZOO_WORKERS`` when set (several
    trainers sharing one machine split its cores that way: ``zoo/gpu_train.sh`` sets it per job), else the cores
    this process may use minus 2, at most ``cap``."""
    if requested >= 0:
        return requested
    env = os.environ.get("DRAGRT_ZOO_WORKERS", "").strip()
    if env:
        if not env.isdigit():
            raise ValueError(f"DRAGRT_ZOO_WORKERS={env!r} is not allowed; use an integer >= 0")
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers: not the host's)
    except AttributeError:
        cores = os.cpu_count() or 2
    return max(1, min(cap, cores - 2))


def resolve_zoo_path(path: str | os.PathLike, what: str) -> Path:
    """``"zoo:NAME"`` -> the shipped folder (:func:`dragrt.zoo.registry.resolve`, whose error says how to train a
    missing model); any other path must exist. ``what`` names the caller in the error."""
    from dragrt.zoo.registry import resolve

    folder = resolve(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{what}: {folder} does not exist")
    return folder


#: Face regions as the box of some landmarks, padded by a fraction of the image side. A trainer's loss can weigh
#: two more (``--lower-face-weight``, ``--eye-weight``), each bounding what the renderer draws there:
#: ``lower_face``: every moustache, goatee and full beard (96-99 % of a full beard's pixels; padded by one 8x
#: latent pixel at 256 px); ``eyes``: the glasses' frames (97-100 % of their pixels with a 24 px pad at 256 px).
#: ``mouth`` (28 px pad at 256 px) is the mask of ``dragrt demo --method dragdiffusion``.
REGIONS: dict[str, tuple[tuple[str, ...], float]] = {
    "lower_face": (("nose_tip", "mouth_left", "mouth_right", "upper_lip", "lower_lip", "chin", "left_jaw",
                    "right_jaw"), 1 / 32),
    "eyes": (("left_eye_outer", "left_eye_inner", "right_eye_inner", "right_eye_outer", "left_eye_top",
              "left_eye_bottom", "right_eye_top", "right_eye_bottom", "left_pupil", "right_pupil", "left_brow_outer",
              "left_brow_inner", "right_brow_inner", "right_brow_outer"), 3 / 32),
    "mouth": (("mouth_left", "mouth_right", "upper_lip", "lower_lip"), 7 / 64),
}


def region_boxes(landmarks: torch.Tensor, size: int, region: str) -> torch.Tensor:
    """Boxes ``[N, 4]`` (``x0, y0, x1, y1`` as fractions of the image side, clipped to [0, 1]) around
    :data:`REGIONS` ``region`` of ``size``-pixel renders, from their landmarks ``[N, L, 2]`` in pixels."""
    from dragrt.zoo import world

    if region not in REGIONS:
        raise ValueError(f"region_boxes: region {region!r} is not one of {', '.join(REGIONS)}")
    if landmarks.ndim != 3 or landmarks.shape[1:] != (len(world.LANDMARK_NAMES), 2):
        raise ValueError(f"region_boxes: landmarks must be [N, {len(world.LANDMARK_NAMES)}, 2], got "
                         f"{list(landmarks.shape)}")
    names, pad = REGIONS[region]
    pts = landmarks[:, [world.LANDMARK_NAMES.index(n) for n in names]].float() / size
    return torch.cat([pts.amin(1) - pad, pts.amax(1) + pad], 1).clamp(0.0, 1.0)


def region_weights(boxes: torch.Tensor, hw: int, weight: float) -> torch.Tensor:
    """Loss weights ``[N, 1, hw, hw]``: ``1 + weight`` at the pixels whose centres lie in ``boxes`` (``[N, 4]``,
    :func:`region_boxes`), 1 elsewhere."""
    centres = (torch.arange(hw, device=boxes.device, dtype=torch.float32) + 0.5) / hw
    in_x = (centres >= boxes[:, 0:1]) & (centres <= boxes[:, 2:3])
    in_y = (centres >= boxes[:, 1:2]) & (centres <= boxes[:, 3:4])
    return (1.0 + weight * (in_y[:, :, None] & in_x[:, None, :]).float()).unsqueeze(1)


def normalised_weights(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` ``[N, ...]`` divided by each sample's mean: a weighted mean of a sample's errors keeps the
    plain mean's scale."""
    return weights / weights.mean(dim=tuple(range(1, weights.ndim)), keepdim=True)


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from 1 to ``floor`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (a run seed, a step, a stream id), stable across platforms."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)
