"""The interactive edit session: what a user (the CLI, the server, an embedding editor) holds for a drag edit.

An :class:`EditSession` owns one engine and the state of one edit: the current latent, the points (by id), the
mask, the runs made so far and an undo history. Two methods share it:

- DragGAN (:class:`~dragrt.runtime.engines.draggan.DragGANEngine`): the latent is ``w+`` ``[1, num_ws, w_dim]``;
  start from a seed (:meth:`EditSession.from_seed`) or a latent (:meth:`EditSession.from_latent`).
- DragDiffusion (:class:`~dragrt.runtime.engines.dragdiffusion.DragDiffusionEngine`): the latent is the DDIM-inverted
  ``z_t`` ``[1, 4, H/8, W/8]`` of an image; start from the image and its prompt (:meth:`EditSession.from_image`).

>>> s = EditSession.from_seed(G, 0)                                    # doctest: +SKIP
>>> s = EditSession.from_image(sd, Image.open("cat.png"), "a photo of a cat")   # or DragDiffusion
>>> pid = s.add_point(handle=[120, 200], target=[160, 190])            # [x, y] image pixels, origin top-left
>>> for ev in s.run(max_steps=200, preview_every=10): show(ev.preview or ev.handles)
>>> s.export("out/edit")          # out/edit.png, out/edit.json, the latent (+ out/edit_mask.png, ...)
>>> s2 = EditSession.open("out/edit.json", G)                          # the same latent, points and mask

Rules the whole class keeps:

- Every public method checks its input before touching anything; bad input raises ``ValueError`` naming the
  field and the allowed range, and the session is left exactly as it was.
- The session's state is one immutable snapshot (latent, points, mask, runs); every edit replaces it and pushes
  the previous snapshot onto a bounded undo history, so ``undo()`` / ``redo()`` cover point edits, mask edits
  and whole runs (undoing a run puts the latent and the handles back).
- While ``run()`` is iterating, only :meth:`EditSession.stop` and reads of the committed state (``points``,
  ``mask``, ``latent()``, ...) are allowed, from any thread; everything else raises :class:`SessionBusyError`.

The session reaches its engine only through a small private backend (:class:`_GANBackend`,
:class:`_DiffusionBackend`): latent checks, start and run, the engine's latent and handles, full images, previews
and what the edit record says about the model. Points, mask, history, runs, export and open are one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import secrets
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from dragrt import __version__
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines.dragdiffusion import DragDiffusionConfig, DragDiffusionEngine
from dragrt.runtime.engines.draggan import DragGANConfig, DragGANEngine, check_latent
from dragrt.runtime.engines.stepping import StepResult
from dragrt.runtime.models.preview import PreviewDecoder
from dragrt.runtime.models.sd import SDComponents

__all__ = ["EditSession", "SessionBusyError", "SessionEvent", "model_sha256", "PREVIEW_METHODS", "RECORD_FORMAT",
           "RECORD_VERSION", "to_pil"]

RECORD_FORMAT = "dragrt-edit-session"
# Version 1 records of either method: DragDiffusion records add fields (``method`` says which) and change none.
RECORD_VERSION = 1
HISTORY_LIMIT = 100
_RECORD_SUFFIXES = (".json", ".png", ".safetensors")
METHODS = ("draggan", "dragdiffusion")
#: How DragDiffusion previews are decoded: ``"vae"`` the pipeline's own VAE (exact, the most work), ``"latent2rgb"``
#: a 4x3 matrix (free, rough colours), ``"taesd"`` the tiny autoencoder (close to the VAE, weights from the assets
#: folder), ``"auto"`` the VAE when it is small (below ``SMALL_VAE_PARAMETERS``, as our zoo model's), else TAESD
#: when its weights are found, else latent2rgb. DragGAN previews are always renders of the generator.
PREVIEW_METHODS = ("auto", "vae", "latent2rgb", "taesd")
SMALL_VAE_PARAMETERS = 20_000_000
_PREVIEW_DECODE_CAP = 1 << 15  # PreviewDecoder's size cap: decode at the image's size, the session shrinks after


class SessionBusyError(RuntimeError):
    """The session is running (``run()`` is iterating): stop it, or let it finish, before editing."""


@dataclass(frozen=True)
class _Point:
    id: int
    handle: tuple[float, float]  # x, y image px
    target: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "handle": list(self.handle), "target": list(self.target)}


@dataclass(frozen=True, eq=False)
class _State:
    """One undoable snapshot. Its tensors are never modified in place, so snapshots can share them."""

    latent: Tensor  # float32 on the engine's device: DragGAN [1, num_ws, w_dim], DragDiffusion z_t [1, 4, h, w]
    points: tuple[_Point, ...]
    mask: Tensor | None  # [H, W] uint8 on the CPU, 255 = may change, 0 = fixed
    runs: tuple[dict[str, Any], ...]


@dataclass
class SessionEvent:
    """One optimisation step of :meth:`EditSession.run`.

    Attributes:
        step: index of the step within this run, from 0.
        max_steps: the run's step limit (for progress: ``step + 1`` of ``max_steps``).
        handles: point id -> ``[x, y]`` handle position after this step's tracking, image pixels.
        distances: point id -> distance from the handle to its target, pixels.
        loss: the step's loss (motion supervision + mask term).
        ms: wall time since the previous event, milliseconds (it includes the consumer's time between events).
        done: every handle is within the engine's stop distance; the run ends with this event.
        preview: a picture of the current latent, RGB, at most ``preview_size`` pixels on its longer side, on
            every ``preview_every``-th step (steps ``preview_every - 1``, ``2 * preview_every - 1``, ...);
            ``None`` otherwise. DragGAN: the generator's image. DragDiffusion: the clean latent one UNet forward
            predicts, through the session's preview decoder (not the final denoise; see ``preview_method``).
    """

    step: int
    max_steps: int
    handles: dict[int, list[float]]
    distances: dict[int, float]
    loss: float
    ms: float
    done: bool
    preview: Image.Image | None = None


# --- backends: everything the session asks of an engine -----------------------------------------------------------


class _GANBackend:
    """DragGAN: ``w+`` latents ``[1, num_ws, w_dim]``; images and previews are renders of the generator."""

    method = "draggan"
    latent_suffix = "_w"  # PREFIX_w.safetensors
    latent_keys = ("w", "w0")
    latent_doc = {"w": "current latent", "w0": "starting latent"}
    latent_layout = "[1, num_ws, w_dim]"
    preview_method = "render"

    def __init__(self, engine: DragGANEngine) -> None:
        self.engine = engine

    @property
    def config(self) -> DragGANConfig:
        return self.engine.config

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.engine.size
        return w, h

    @property
    def prompt(self) -> str | None:
        return None

    def check_latent(self, name: str, value: object) -> Tensor:
        G = self.engine.G
        return check_latent(name, value, G.num_ws, G.w_dim).to(self.engine.device)

    def initial_latent(self, latent: Tensor, w0: object) -> Tensor:
        return latent.clone() if w0 is None else self.check_latent("w0", w0)

    def start(self, latent: Tensor, handles: list, targets: list, mask: Tensor | None) -> None:
        self.engine.start(latent, handles, targets, mask)

    def run(self, max_steps: int) -> Iterator[StepResult]:
        return self.engine.run(max_steps=max_steps)

    def latent(self) -> Tensor:
        return self.engine.latent()

    def handles(self) -> list[list[float]]:
        return self.engine.handles

    def render(self, latent: Tensor) -> Image.Image:
        return to_pil(self.engine.render(latent))

    def preview(self, max_size: int) -> Image.Image:
        return to_pil(self.engine.render(), max_size)

    def model_sha256(self) -> str:
        return model_sha256(self.engine.G)

    def default_model_id(self) -> str | None:
        return _default_model_id(self.engine.G)

    def extra_files(self, stem: str) -> dict[str, tuple[str, bytes, dict[str, Any]]]:
        return {}

    def record_fields(self, model_id: str | None, model_hash: str) -> dict[str, Any]:
        G = self.engine.G
        return {"engine": {"name": "draggan", "config": dataclasses.asdict(self.engine.config)},
                "model": {"id": model_id, "sha256": model_hash, "num_ws": G.num_ws, "w_dim": G.w_dim,
                          "resolution": self.engine.resolution,
                          "config": G.config.to_dict() if hasattr(G, "config") else None}}


class _DiffusionBackend:
    """DragDiffusion on a prepared image: the latent is ``z_t`` ``[1, 4, H/8, W/8]``; images are the full denoise
    (``render``), previews one UNet forward plus the preview decoder (``preview``).

    Args:
        engine: a DragDiffusionEngine whose ``prepare()`` ran.
        preview_method: one of :data:`PREVIEW_METHODS` (recorded; ``decoder`` is what it resolved to).
        decoder: the preview decoder, ``None`` = the pipeline's VAE (:func:`_preview_decoder`).
        unet_sha256: :func:`model_sha256` of the UNet *before* a LoRA was fused into it (fast mode fuses in place).
        lora_source: how the LoRA came (a file name, ``"state dict"``, ``"trained"``), for the record.
    """

    method = "dragdiffusion"
    latent_suffix = "_latent"  # PREFIX_latent.safetensors
    latent_keys = ("z_t", "z_t0")
    latent_doc = {"z_t": "current (optimised) z_t", "z_t0": "inverted z_t of the source image (the un-edited branch)"}
    latent_layout = "[1, 4, H/8, W/8]"

    def __init__(self, engine: DragDiffusionEngine, preview_method: str, decoder: PreviewDecoder | None,
                 unet_sha256: str | None = None, lora_source: str | None = None) -> None:
        prepared = engine.prepared
        if prepared is None:
            raise ValueError("engine: call prepare(image, prompt) on the DragDiffusionEngine first (or start the "
                             "session with EditSession.from_image)")
        if unet_sha256 is None:
            if prepared.lora is not None and engine.unet is engine.sd.unet:
                raise ValueError("engine: its LoRA is fused into the shared UNet, so the base model can no longer be "
                                 "hashed for the edit record; start the session with EditSession.from_image instead")
            unet_sha256 = model_sha256(engine.sd.unet)
        self.engine = engine
        self.preview_method = preview_method
        self.decoder = decoder
        self.unet_sha256 = unet_sha256
        self.lora = None if prepared.lora is None else {"fingerprint": _lora_fingerprint(prepared.lora),
                                                        "source": lora_source}

    @property
    def config(self) -> DragDiffusionConfig:
        return self.engine.config

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.engine.prepared.image.shape[-2:]
        return int(w), int(h)

    @property
    def prompt(self) -> str | None:
        return self.engine.prepared.prompt

    def check_latent(self, name: str, value: object) -> Tensor:
        return _check_z(name, value, list(self.engine.prepared.z_t.shape)).to(self.engine.device)

    def initial_latent(self, latent: Tensor, w0: object) -> Tensor:
        return self.engine.prepared.z_t.detach().float().clone()

    def start(self, latent: Tensor, handles: list, targets: list, mask: Tensor | None) -> None:
        self.engine.start(handles, targets, mask, latent=latent)

    def run(self, max_steps: int) -> Iterator[StepResult]:
        return self.engine.run(max_steps=max_steps)

    def latent(self) -> Tensor:
        return self.engine.latent()

    def handles(self) -> list[list[float]]:
        return self.engine.handles  # the engine keeps them on its half-resolution grid, within the image

    def render(self, latent: Tensor) -> Image.Image:
        return to_pil(self.engine.render(latent))

    def preview(self, max_size: int) -> Image.Image:
        return to_pil(self.engine.preview(decoder=self.decoder) * 2 - 1, max_size)  # [0, 1] -> [-1, 1]

    def model_sha256(self) -> str:
        return self.unet_sha256

    def default_model_id(self) -> str | None:
        source = self.engine.sd.source
        return (Path(str(source)).name or None) if source else None

    def extra_files(self, stem: str) -> dict[str, tuple[str, bytes, dict[str, Any]]]:
        img = self.engine.prepared.image.detach().float()  # [1, 3, H, W] in [-1, 1]
        u8 = ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous().cpu()
        return {"source": (f"{stem}_source.png", _png_bytes(Image.fromarray(u8.numpy())),
                           {"size": list(self.size), "role": "the input image; open() inverts it again"})}

    def record_fields(self, model_id: str | None, model_hash: str) -> dict[str, Any]:
        sd = self.engine.sd
        return {"prompt": self.engine.prepared.prompt,
                "engine": {"name": "dragdiffusion", "config": _jsonable(dataclasses.asdict(self.engine.config))},
                "model": {"id": model_id, "sha256": model_hash, "sha256_of": "the UNet's state dict, without LoRA",
                          "source": sd.source, "unet_config": _jsonable(sd.config.get("unet"))},
                "lora": self.lora}


def _preview_decoder(components: SDComponents, device: torch.device, method: str) -> PreviewDecoder | None:
    """What DragDiffusion previews decode with (:data:`PREVIEW_METHODS`); ``None`` = the pipeline's VAE."""
    if method == "vae":
        return None
    if method == "auto" and sum(p.numel() for p in components.vae.parameters()) < SMALL_VAE_PARAMETERS:
        return None
    return PreviewDecoder(method, preview_size=_PREVIEW_DECODE_CAP, device=device)


class EditSession:
    """An interactive drag edit (DragGAN or DragDiffusion): points by id, a mask, runs, undo/redo, export and
    re-open.

    Build one with :meth:`from_seed`, :meth:`from_latent` (DragGAN), :meth:`from_image` (DragDiffusion) or
    :meth:`open`. The constructor takes a ready engine (the session owns it from then on) and a latent.

    Args:
        engine: the engine that runs the drags: a ``DragGANEngine`` (it renders with ``engine.G`` and
            ``engine.config.noise_mode``) or a ``DragDiffusionEngine`` whose ``prepare()`` ran (without a fused
            LoRA; :meth:`from_image` handles LoRAs).
        w: the starting latent (finite): DragGAN ``[1, num_ws, w_dim]``, DragDiffusion ``z_t`` of the prepared
            image's shape ``[1, 4, H/8, W/8]``.
        seed: DragGAN: the seed ``w`` was drawn from, if any (recorded by :meth:`export`).
        w0: DragGAN: the latent the edit originally started from (default: ``w``), saved next to the current one.
            (DragDiffusion's is always the inverted ``engine.prepared.z_t``.)
        model_id: a free-form model name for the edit record (default: the converted checkpoint's source file
            name when the generator came from :func:`~dragrt.runtime.models.stylegan2_convert.load_generator`;
            the last part of ``SDComponents.source`` for DragDiffusion).
        preview_method: DragDiffusion: how previews are decoded, one of :data:`PREVIEW_METHODS`. DragGAN takes
            only ``"auto"`` (its previews are renders).
    """

    def __init__(self, engine: DragGANEngine | DragDiffusionEngine, w: Tensor, *, seed: int | None = None,
                 w0: Tensor | None = None, model_id: str | None = None, preview_method: str = "auto") -> None:
        _check_choice("preview_method", preview_method, PREVIEW_METHODS)
        backend: _GANBackend | _DiffusionBackend
        if isinstance(engine, DragGANEngine):
            if preview_method != "auto":
                raise ValueError(f"preview_method={preview_method!r} applies to DragDiffusion sessions; DragGAN "
                                 "previews are renders of the generator (use 'auto')")
            backend = _GANBackend(engine)
        elif isinstance(engine, DragDiffusionEngine):
            if seed is not None or w0 is not None:
                raise ValueError("seed and w0 apply to DragGAN sessions; a DragDiffusion session starts from the "
                                 "engine's inverted z_t")
            backend = _DiffusionBackend(engine, preview_method, _preview_decoder(engine.sd, engine.device,
                                                                                 preview_method))
        else:
            raise ValueError(f"engine must be a DragGANEngine or a DragDiffusionEngine, got {type(engine).__name__}")
        self._setup(backend, w, seed=seed, w0=w0, model_id=model_id)

    def _setup(self, backend: _GANBackend | _DiffusionBackend, w: object, *, seed: int | None = None,
               w0: object = None, model_id: str | None = None) -> None:
        self._backend = backend
        self._engine = backend.engine
        latent = backend.check_latent(backend.latent_keys[0], w)
        self._w0 = backend.initial_latent(latent, w0)
        self._seed = None if seed is None else int(seed)
        self._model_id = model_id if model_id is not None else backend.default_model_id()
        self._state = _State(latent=latent, points=(), mask=None, runs=())
        self._next_id = 1
        self._undo: deque[_State] = deque(maxlen=HISTORY_LIMIT)
        self._redo: deque[_State] = deque(maxlen=HISTORY_LIMIT)
        self._lock = threading.RLock()
        self._running = False
        self._stop = threading.Event()
        self._image_cache: tuple[Tensor, Image.Image] | None = None

    # --- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def from_seed(cls, generator: torch.nn.Module, seed: int, *, config: DragGANConfig | None = None,
                  runtime: RuntimeConfig | None = None, model_id: str | None = None) -> EditSession:
        """DragGAN: start from the latent the reference draws for ``seed`` (0 to 2**32 - 1), with the configured
        truncation."""
        engine = DragGANEngine(generator, config, runtime)
        return cls(engine, engine.latent_from_seed(seed), seed=seed, model_id=model_id)

    @classmethod
    def from_latent(cls, generator: torch.nn.Module, w: Tensor | np.ndarray | str | os.PathLike[str], *,
                    config: DragGANConfig | None = None, runtime: RuntimeConfig | None = None,
                    model_id: str | None = None) -> EditSession:
        """DragGAN: start from a latent: a ``[1, num_ws, w_dim]`` tensor or array, or the path of a
        ``.safetensors`` file holding it under the key ``w`` (as :meth:`export` writes it)."""
        if isinstance(w, (str, os.PathLike)):
            w = _read_latent_file(Path(w), ("w",))["w"]
        latent = check_latent("w", w, generator.num_ws, generator.w_dim)
        return cls(DragGANEngine(generator, config, runtime), latent, model_id=model_id)

    @classmethod
    def from_image(cls, components: SDComponents, image: Any, prompt: str = "", *,
                   config: DragDiffusionConfig | None = None, runtime: RuntimeConfig | None = None,
                   lora: Any = None, model_id: str | None = None, cache: Any = None,
                   preview_method: str = "auto") -> EditSession:
        """DragDiffusion: start an edit of ``image``. Builds a ``DragDiffusionEngine`` and prepares the image (VAE
        encode and DDIM inversion with ``prompt``, cached by content when the engine has a cache; a LoRA first when
        one is given or ``config.lora`` is set). The session's latent is the inverted ``z_t``.

        Args:
            components: the SD pipeline (loaded once, shared). Its UNet's state-dict hash (:func:`model_sha256`,
                cached per module) is taken now, before a LoRA is fused into it, for the edit record.
            image: a PIL image, a uint8 ``[H, W, 3]`` array or a float ``[1, 3, H, W]`` tensor in [-1, 1]; H and W
                multiples of 64. Points and the mask are in its pixels.
            prompt: the text prompt the image is inverted (and denoised) with; ``""`` is allowed.
            config: the engine's knobs (default: the reference's).
            runtime: where to run (not stored in the record: it belongs to the machine).
            lora: ``None`` (train one when ``config.lora`` is set, else none), a LoRA state dict, or the path of a
                LoRA ``.safetensors`` file.
            model_id: a free-form model name for the edit record (default: the last part of
                ``components.source``).
            cache: the engine's cache of inversions and LoRAs (see ``DragDiffusionEngine``).
            preview_method: how run() previews are decoded, one of :data:`PREVIEW_METHODS`.

        Raises:
            ValueError: a bad argument (the message names it); nothing is kept.
            FileNotFoundError: ``preview_method="taesd"`` without the TAESD weights.
        """
        if not isinstance(components, SDComponents):
            raise ValueError(f"components must be SDComponents (an SD1.x pipeline), got {type(components).__name__}")
        _check_choice("preview_method", preview_method, PREVIEW_METHODS)
        if config is not None and not isinstance(config, DragDiffusionConfig):
            raise ValueError(f"config must be a DragDiffusionConfig, got {type(config).__name__}")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        unet_hash = model_sha256(components.unet)  # before prepare() may fuse a LoRA into the shared UNet
        engine = DragDiffusionEngine(components, config, runtime, cache=cache)
        try:
            decoder = _preview_decoder(components, engine.device, preview_method)
            prepared = engine.prepare(image, prompt, lora=lora)
            backend = _DiffusionBackend(engine, preview_method, decoder, unet_hash, _lora_source(lora, engine.config))
            session = cls.__new__(cls)
            session._setup(backend, prepared.z_t, model_id=model_id)
        except BaseException:
            engine.close()  # gives the shared UNet its exact weights back when a LoRA was fused
            raise
        return session

    @classmethod
    def open(cls, record_path: str | os.PathLike[str], model: Any, *,
             config: DragGANConfig | DragDiffusionConfig | None = None, runtime: RuntimeConfig | None = None,
             strict: bool = True, model_id: str | None = None, lora: Any = None, cache: Any = None,
             preview_method: str = "auto") -> EditSession:
        """Re-open what :meth:`export` wrote: latent, points, mask, runs and engine config (and the seed, or the
        prompt and source image). The record's ``method`` says which engine.

        Args:
            record_path: ``PREFIX.json`` or ``PREFIX``.
            model: must be the model the edit was made with: DragGAN, the StyleGAN2 generator (its state-dict
                hash, :func:`model_sha256`, is compared with the record's); DragDiffusion, the ``SDComponents``
                (the hash of its UNet is compared, then the source image is prepared again with the recorded
                prompt; the inverted ``z_t0`` saved with the edit replaces the new inversion, so a device whose
                inversion differs in the last bits still pairs the edit with the same un-edited branch).
            config: overrides the engine config stored in the record (a ``DragGANConfig`` or a
                ``DragDiffusionConfig``, matching the record's method).
            runtime: where to run (not stored in the record: it belongs to the machine).
            strict: refuse (``ValueError``) a model whose hash differs from the record's (DragDiffusion: or a LoRA
                whose fingerprint differs); ``False`` only warns (the edit then renders differently).
            model_id: overrides the record's model id.
            lora: DragDiffusion: the LoRA the edit was made with (state dict or file), when the record has one
                that ``config.lora`` does not train again; checked against the recorded fingerprint.
            cache: DragDiffusion: the engine's cache of inversions and LoRAs.
            preview_method: DragDiffusion: how previews are decoded (:data:`PREVIEW_METHODS`).

        Returns:
            A session with the exported latent, points, mask, seed, runs and config; the undo history starts
            empty. The latent is bit-identical, and so is ``image()`` on the same device. On CUDA two renders of
            one latent can differ by about 1e-4 (cuDNN's TF32 convolutions, on by default; measured on an H200),
            which now and then moves one uint8 value by 1.
        """
        path = _record_file(record_path)
        record = _read_record(path)
        _check_choice("preview_method", preview_method, PREVIEW_METHODS)
        method = record.get("method", "draggan")
        if method == "dragdiffusion":
            return cls._open_dragdiffusion(path, record, model, config=config, runtime=runtime, strict=strict,
                                           model_id=model_id, lora=lora, cache=cache, preview_method=preview_method)
        if method != "draggan":
            raise ValueError(f"{path}: method {method!r} is not one this dragrt opens ({', '.join(METHODS)})")
        if lora is not None or cache is not None or preview_method != "auto":
            raise ValueError(f"lora, cache and preview_method apply to DragDiffusion edits; {path} is a DragGAN edit")
        if isinstance(model, SDComponents) or not isinstance(model, torch.nn.Module):
            raise ValueError(f"{path} is a DragGAN edit: pass the StyleGAN2 generator it was made with as model, got "
                             f"{type(model).__name__}")
        if config is not None and not isinstance(config, DragGANConfig):
            raise ValueError(f"config must be a DragGANConfig for a DragGAN edit, got {type(config).__name__}")

        entry = record.get("model") or {}
        _check_model_hash(path, entry, model_sha256(model), strict, "this generator's", "the generator")
        if config is None:
            config = _config_from_record(path, record.get("engine", {}).get("config"), DragGANConfig)
        latents = _read_latent_file(_record_member(path, record, "latent"), ("w",))
        seed = record.get("seed")
        session = cls(DragGANEngine(model, config, runtime), latents["w"], w0=latents.get("w0"),
                      seed=seed if isinstance(seed, int) else None,
                      model_id=model_id if model_id is not None else entry.get("id"))
        session._restore(path, record)
        return session

    @classmethod
    def _open_dragdiffusion(cls, path: Path, record: dict[str, Any], components: Any, *,
                            config: Any, runtime: RuntimeConfig | None, strict: bool, model_id: str | None,
                            lora: Any, cache: Any, preview_method: str) -> EditSession:
        if not isinstance(components, SDComponents):
            raise ValueError(f"{path} is a DragDiffusion edit: pass the SDComponents it was made with as model, got "
                             f"{type(components).__name__}")
        if config is not None and not isinstance(config, DragDiffusionConfig):
            raise ValueError(f"config must be a DragDiffusionConfig for a DragDiffusion edit, got "
                             f"{type(config).__name__}")
        entry = record.get("model") or {}
        unet_hash = model_sha256(components.unet)
        _check_model_hash(path, entry, unet_hash, strict, "this pipeline's UNet", "the SD components", stacklevel=4)
        if config is None:
            config = _config_from_record(path, record.get("engine", {}).get("config"), DragDiffusionConfig)
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: 'prompt' must be a string, got {prompt!r}")
        recorded_lora = record.get("lora")
        if recorded_lora is not None and not isinstance(recorded_lora, dict):
            raise ValueError(f"{path}: 'lora' must be null or an object, got {recorded_lora!r}")
        want_fp = None if recorded_lora is None else recorded_lora.get("fingerprint")
        if recorded_lora is not None and lora is None and not config.lora:
            raise ValueError(f"lora: {path} was made with a LoRA (fingerprint {want_fp}, from "
                             f"{recorded_lora.get('source')}); pass the same weights as lora= (a state dict or its "
                             "file), or a config with lora=True to train it again")
        with Image.open(_record_member(path, record, "source")) as img:
            source = img.convert("RGB")
        latents = _read_latent_file(_record_member(path, record, "latent"), ("z_t", "z_t0"))

        engine = DragDiffusionEngine(components, config, runtime, cache=cache)
        try:
            decoder = _preview_decoder(components, engine.device, preview_method)
            prepared = engine.prepare(source, prompt, lora=lora)
            got_fp = _lora_fingerprint(prepared.lora)
            if got_fp != want_fp:
                message = (f"{path} was made with LoRA fingerprint {want_fp}; this session's LoRA is {got_fp}. "
                           "Pass the LoRA the edit was made with")
                if strict:
                    raise ValueError(message + ", or strict=False to open it anyway (it will render differently).")
                warnings.warn(message + "; opening anyway (strict=False).", stacklevel=3)
            z_t0 = _check_z("z_t0", latents["z_t0"], list(prepared.z_t.shape))
            engine.prepared = dataclasses.replace(prepared, z_t=z_t0.to(engine.device))
            source_name = _lora_source(lora, config) if lora is not None else (recorded_lora or {}).get("source")
            backend = _DiffusionBackend(engine, preview_method, decoder, unet_hash, source_name)
            session = cls.__new__(cls)
            session._setup(backend, latents["z_t"], model_id=model_id if model_id is not None else entry.get("id"))
            session._restore(path, record)
        except BaseException:
            engine.close()
            raise
        return session

    def _restore(self, path: Path, record: dict[str, Any]) -> None:
        """Points, mask, runs and the next point id of a record (checked like user input)."""
        points: list[_Point] = []
        for i, p in enumerate(record.get("points") or []):
            if not isinstance(p, dict) or not _is_int(p.get("id")) or p["id"] < 1 or p["id"] in {q.id for q in points}:
                raise ValueError(f"{path}: points[{i}] needs a unique integer 'id' >= 1")
            points.append(_Point(int(p["id"]), self._xy(f"points[{i}].handle", p.get("handle")),
                                 self._xy(f"points[{i}].target", p.get("target"))))
        n_max = self._backend.config.max_handles
        if len(points) > n_max:
            raise ValueError(f"{path}: {len(points)} points; at most max_handles={n_max}")
        mask = None
        if record.get("mask"):
            with Image.open(_record_member(path, record, "mask")) as img:
                mask = self._mask_u8(img)
        runs = record.get("runs") or []
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise ValueError(f"{path}: 'runs' must be a list of objects")
        next_id = record.get("next_point_id", 1)
        self._next_id = max(int(next_id) if _is_int(next_id) else 1, 1 + max((p.id for p in points), default=0))
        self._state = dataclasses.replace(self._state, points=tuple(points), mask=mask, runs=tuple(runs))

    # --- reading the state ------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """``"draggan"`` or ``"dragdiffusion"``."""
        return self._backend.method

    @property
    def points(self) -> list[dict[str, Any]]:
        """The points ``[{"id": int, "handle": [x, y], "target": [x, y]}, ...]`` in image pixels (origin top-left),
        in the order they were added. During a run: the handles as they were when it started."""
        return [p.as_dict() for p in self._state.points]

    @property
    def mask(self) -> Tensor | None:
        """The mask ``[H, W]`` float32 in [0, 1] (1 = may change, 0 = fixed) at its stored 8-bit precision
        (multiples of 1/255), or ``None``."""
        m = self._state.mask
        return None if m is None else m.float() / 255.0

    @property
    def runs(self) -> list[dict[str, Any]]:
        """The runs that led to the current latent: ``steps``, ``max_steps``, ``done``, ``stopped``, the
        ``points`` at the start and the ``final_handles`` (an undone run leaves this list)."""
        return json.loads(json.dumps(list(self._state.runs)))

    @property
    def seed(self) -> int | None:
        """The seed of the starting latent, when the session began from one (DragGAN)."""
        return self._seed

    @property
    def prompt(self) -> str | None:
        """DragDiffusion: the prompt the image was inverted with; ``None`` for DragGAN."""
        return self._backend.prompt

    @property
    def preview_method(self) -> str:
        """How previews are made: DragDiffusion, one of :data:`PREVIEW_METHODS` as chosen; DragGAN, ``"render"``."""
        return self._backend.preview_method

    @property
    def model_id(self) -> str | None:
        """The model name written to edit records."""
        return self._model_id

    @property
    def config(self) -> DragGANConfig | DragDiffusionConfig:
        """The engine's configuration (read-only by convention: it was fixed when the engine was built)."""
        return self._backend.config

    @property
    def size(self) -> tuple[int, int]:
        """Image ``(width, height)`` in pixels; points must lie in ``0..width-1`` x ``0..height-1``."""
        return self._backend.size

    @property
    def running(self) -> bool:
        """Whether ``run()`` is iterating now."""
        return self._running

    @property
    def can_undo(self) -> bool:
        """Whether :meth:`undo` has something to undo."""
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        """Whether :meth:`redo` has something to redo."""
        return bool(self._redo)

    def latent(self) -> Tensor:
        """A copy of the current latent, float32 on the engine's device: DragGAN ``[1, num_ws, w_dim]``,
        DragDiffusion ``z_t`` ``[1, 4, H/8, W/8]``. During a run: the latent the run started from (the run's result
        is committed when it ends)."""
        return self._state.latent.clone()

    def image(self) -> Image.Image:
        """The current latent's image as an RGB ``uint8`` PIL image of the session's size: DragGAN, the generator's
        render (NVIDIA's conversion ``clamp(x * 127.5 + 128, 0, 255)``); DragDiffusion, the full denoise of the
        edited ``z_t`` paired with the inverted one (the engine's ``render``: a UNet call per remaining DDIM step,
        the expensive part of an edit). Cached until the latent changes."""
        with self._lock:
            self._check_idle("image")
            return self._image_of(self._state.latent).copy()

    # --- editing (not while running) --------------------------------------------------------------------------

    def add_point(self, handle: Sequence[float], target: Sequence[float]) -> int:
        """Add a handle/target pair; returns its id (integers from 1, never reused in this session).

        Args:
            handle, target: ``[x, y]`` image pixels, origin top-left, each within ``0..size-1`` (finite; the engine
                rounds them when a run starts, as the reference does: DragGAN to whole pixels, DragDiffusion to its
                half-resolution grid).
        """
        with self._lock:
            self._check_idle("add_point")
            new = _Point(self._next_id, self._xy("handle", handle), self._xy("target", target))
            config = self._backend.config
            n_max = config.max_handles
            if len(self._state.points) >= n_max:
                raise ValueError(f"points: the session already has {n_max} points, the most the engine takes "
                                 f"({type(config).__name__}.max_handles={n_max}); remove one first")
            self._commit(dataclasses.replace(self._state, points=(*self._state.points, new)))
            self._next_id += 1
            return new.id

    def move_point(self, id: int, handle: Sequence[float] | None = None, target: Sequence[float] | None = None) -> None:
        """Move the handle and/or the target of point ``id`` (``[x, y]`` image pixels, as :meth:`add_point`)."""
        with self._lock:
            self._check_idle("move_point")
            index = self._index_of(id)
            if handle is None and target is None:
                raise ValueError("move_point needs a new handle, a new target or both ([x, y] image pixels)")
            old = self._state.points[index]
            new = _Point(old.id, old.handle if handle is None else self._xy("handle", handle),
                         old.target if target is None else self._xy("target", target))
            points = list(self._state.points)
            points[index] = new
            self._commit(dataclasses.replace(self._state, points=tuple(points)))

    def remove_point(self, id: int) -> None:
        """Remove point ``id``."""
        with self._lock:
            self._check_idle("remove_point")
            index = self._index_of(id)
            points = self._state.points[:index] + self._state.points[index + 1:]
            self._commit(dataclasses.replace(self._state, points=points))

    def set_mask(self, mask: Tensor | np.ndarray | Image.Image | None) -> None:
        """Set the region that may change, or clear it with ``None``.

        Args:
            mask: ``[H, W]`` (the image's size) as a tensor or array with values in [0, 1] (1 = may change,
                0 = fixed; booleans allowed), or a PIL image read as 8-bit grey (255 = may change). Stored at
                8-bit precision, as the edit record saves it. As in the references: DragGAN applies the fixed
                region term only when the mask has both fully fixed (0) and fully free (1) pixels; DragDiffusion
                treats every value above 0 as free and applies its term when any pixel is free.
        """
        with self._lock:
            self._check_idle("set_mask")
            m = None if mask is None else self._mask_u8(mask)
            self._commit(dataclasses.replace(self._state, mask=m))

    def undo(self) -> bool:
        """Undo the last point edit, mask edit or run; ``False`` when there is nothing to undo."""
        with self._lock:
            self._check_idle("undo")
            if not self._undo:
                return False
            self._redo.append(self._state)
            self._state = self._undo.pop()
            return True

    def redo(self) -> bool:
        """Redo the last undone change; ``False`` when there is nothing to redo (any new edit clears redo)."""
        with self._lock:
            self._check_idle("redo")
            if not self._redo:
                return False
            self._undo.append(self._state)
            self._state = self._redo.pop()
            return True

    # --- running ----------------------------------------------------------------------------------------------

    def run(self, max_steps: int | None = None, preview_every: int = 0, preview_size: int = 256
            ) -> Iterator[SessionEvent]:
        """Drag: (re)start the engine from the current latent, points and mask, and yield an event per step.

        The run ends when every handle is within the stop distance, after ``max_steps``, when :meth:`stop` is
        called (from any thread; at most one more event arrives) or when the iterator is closed (``break`` out of a
        ``for`` loop closes it; an iterator that is kept but no longer advanced keeps the session busy). Its result is
        then committed as one undoable change: the latent moves to where the drag ended (DragGAN ``w+``,
        DragDiffusion the optimised ``z_t``) and each point's handle to its tracked position (targets stay, as in
        the references' UIs), so a second ``run()`` drags further. If the engine raises, nothing is committed.

        The engine reads step ``k`` while it already computes step ``k + 1``; when a run is stopped early the
        committed state is therefore that next step (one tracking step past the last event).

        Args:
            max_steps: step limit, an integer >= 1 (default: the engine config's ``max_steps``).
            preview_every: attach a preview to every ``preview_every``-th event; 0 = never. DragGAN renders the
                full image (``engine.render()``); DragDiffusion runs one UNet forward and the preview decoder
                (``preview_method``), not the full denoise. Either costs about a step, so keep it sparse where
                steps are fast.
            preview_size: longest side of previews in pixels (>= 1); previews are only ever downscaled.

        Returns:
            An iterator of :class:`SessionEvent`. Arguments and points are checked now; the run itself starts
            at the first ``next()``.
        """
        limit = self._backend.config.max_steps if max_steps is None else max_steps
        _check_int("max_steps", limit, 1)
        _check_int("preview_every", preview_every, 0)
        _check_int("preview_size", preview_size, 1)
        with self._lock:
            self._check_idle("run")
            if not self._state.points:
                raise ValueError("points: run needs at least one point; add one with add_point(handle, target)")
            self._stop.clear()  # a stop() from now on, even before the first next(), ends this run
        return self._run(limit, preview_every, preview_size)

    def stop(self) -> None:
        """Ask the current run to end; safe from any thread. The run yields at most one more event (the step
        being computed), then commits what it reached; a run returned by ``run()`` but not yet iterated ends
        before its first step. Without a run it does nothing (the next ``run()`` starts afresh)."""
        self._stop.set()

    def _run(self, limit: int, preview_every: int, preview_size: int) -> Iterator[SessionEvent]:
        with self._lock:
            self._check_idle("run")
            if self._stop.is_set():
                return
            start = self._state
            if not start.points:
                raise ValueError("points: run needs at least one point; add one with add_point(handle, target)")
            self._running = True
        backend = self._backend
        ids = [p.id for p in start.points]
        mask = None if start.mask is None else start.mask.float() / 255.0
        last: SessionEvent | None = None
        n_events, stopped = 0, False
        try:
            backend.start(start.latent, [p.handle for p in start.points], [p.target for p in start.points], mask)
            with contextlib.closing(backend.run(limit)) as results:
                for r in results:
                    want_preview = preview_every > 0 and (r.step + 1) % preview_every == 0
                    last = SessionEvent(
                        step=r.step, max_steps=limit, handles=dict(zip(ids, r.handles)),
                        distances=dict(zip(ids, r.distances)), loss=r.loss, ms=r.ms, done=r.done,
                        preview=backend.preview(preview_size) if want_preview else None)
                    n_events += 1
                    yield last
                    if self._stop.is_set():
                        stopped = not last.done
                        break
        except GeneratorExit:  # the consumer closed the iterator: keep what was reached, like stop()
            done = last is not None and last.done
            self._finish(start, n_events, limit, done=done, stopped=not done)
            raise
        except BaseException:
            with self._lock:
                self._running = False
            raise
        self._finish(start, n_events, limit, done=last is not None and last.done, stopped=stopped)

    def _finish(self, start: _State, n_events: int, limit: int, done: bool, stopped: bool) -> None:
        """Commit the engine's final latent and handles as one undoable change and leave the running state."""
        try:
            latent = self._backend.latent()
            handles = self._backend.handles()
            points = tuple(_Point(p.id, (float(h[0]), float(h[1])), p.target) for p, h in zip(start.points, handles))
            record = {"steps": n_events, "max_steps": limit, "done": done, "stopped": stopped,
                      "mask": start.mask is not None, "points": [p.as_dict() for p in start.points],
                      "final_handles": [{"id": p.id, "handle": list(p.handle)} for p in points]}
            with self._lock:
                self._commit(dataclasses.replace(start, latent=latent, points=points, runs=(*start.runs, record)))
        finally:
            with self._lock:
                self._running = False

    # --- export -----------------------------------------------------------------------------------------------

    def export(self, path_prefix: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the edit: ``PREFIX.png`` (the current image, as :meth:`image`), the latents, ``PREFIX_mask.png``
        when a mask is set (8-bit grey, 255 = may change) and ``PREFIX.json`` (the edit record, written last).
        DragGAN's latents go to ``PREFIX_w.safetensors`` (``w`` = the current latent, ``w0`` = the starting one,
        float32 ``[1, num_ws, w_dim]``); DragDiffusion's to ``PREFIX_latent.safetensors`` (``z_t`` = the current
        latent, ``z_t0`` = the inverted one, float32 ``[1, 4, H/8, W/8]``), next to ``PREFIX_source.png``, the input
        image, which :meth:`open` prepares again.

        Every file is written to a temporary name in the same folder and renamed into place only once all were
        written, so a failing export leaves no partial files and does not touch an earlier export. The folder
        must exist. A ``PREFIX_mask.png`` left by an earlier export is removed when the session has no mask.

        Args:
            path_prefix: ``folder/name`` (a trailing ``.json``, ``.png`` or ``.safetensors`` is dropped).

        Returns:
            The edit record written to ``PREFIX.json``: ``format``/``format_version``, ``method``,
            ``dragrt_version``, ``points``, ``next_point_id``, ``mask`` (file and sha256, or null), ``seed``,
            ``engine`` (name and config), ``model`` (``id``, ``sha256`` of the state dict: DragGAN the generator's,
            with its config; DragDiffusion the UNet's, without LoRA), ``image`` and ``latent`` (file and sha256)
            and ``runs``; DragDiffusion adds ``source`` (file and sha256), ``prompt`` and ``lora`` (its
            fingerprint and source, or null).
        """
        prefix = _export_prefix(path_prefix)
        backend = self._backend
        with self._lock:
            self._check_idle("export")
        model_hash = backend.model_sha256()  # outside the lock: hashing a large model takes a while
        with self._lock:
            self._check_idle("export")
            state = self._state
            image = self._image_of(state.latent)
            next_id = self._next_id
        key, key0 = backend.latent_keys
        names = {"image": f"{prefix.name}.png", "latent": f"{prefix.name}{backend.latent_suffix}.safetensors",
                 "mask": f"{prefix.name}_mask.png", "record": f"{prefix.name}.json"}
        files = {"image": _png_bytes(image),
                 "latent": save_safetensors({key: state.latent.detach().cpu().contiguous(),
                                             key0: self._w0.detach().cpu().contiguous()},
                                            metadata={"format": RECORD_FORMAT, "layout": backend.latent_layout})}
        extra = backend.extra_files(prefix.name)
        for name, (file_name, data, _) in extra.items():
            names[name], files[name] = file_name, data
        if state.mask is not None:
            files["mask"] = _png_bytes(Image.fromarray(state.mask.numpy()))
        record = {
            "format": RECORD_FORMAT,
            "format_version": RECORD_VERSION,
            "method": backend.method,
            "dragrt_version": __version__,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "image": {"file": names["image"], "size": list(self.size), "sha256": _sha256(files["image"])},
            **{name: {"file": file_name, "sha256": _sha256(data), **info}
               for name, (file_name, data, info) in extra.items()},
            "latent": {"file": names["latent"], "sha256": _sha256(files["latent"]), "keys": dict(backend.latent_doc)},
            "mask": None if state.mask is None else {"file": names["mask"], "sha256": _sha256(files["mask"]),
                                                     "convention": "8-bit grey, 255 = may change, 0 = fixed"},
            "points": [p.as_dict() for p in state.points],
            "next_point_id": next_id,
            "seed": self._seed,
            **backend.record_fields(self._model_id, model_hash),
            "runs": list(state.runs),
        }
        files["record"] = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8")
        folder = prefix.parent
        try:
            _write_atomically([(folder / names[key], data) for key, data in files.items()])
        except OSError as exc:
            raise OSError(exc.errno, f"export to {prefix}: cannot write in {folder} ({exc.strerror or exc}); "
                                     "nothing was written", str(folder)) from exc
        if state.mask is None:
            with contextlib.suppress(FileNotFoundError):
                (folder / names["mask"]).unlink()
        return record

    # --- helpers ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release what the session holds on shared models: a DragDiffusion session whose LoRA is fused into the
        shared UNet gives the UNet its exact weights back. Idempotent; afterwards every method that would run or
        change the edit raises ``RuntimeError`` (reads of the committed state still work). Also ``with
        EditSession...(...) as s:`` closes on exit."""
        with self._lock:
            if getattr(self, "_closed", False):
                return
            self._check_idle("close")
            closer = getattr(self._engine, "close", None)
            if callable(closer):
                closer()
            self._closed = True

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._running:
            self.close()

    def _check_idle(self, what: str) -> None:
        if getattr(self, "_closed", False):
            raise RuntimeError(f"{what}: the session is closed; open a new one")
        if self._running:
            raise SessionBusyError(f"{what}: the session is running; call stop() (or let run() finish) first")

    def _commit(self, new: _State) -> None:
        """Replace the state with ``new`` as one undoable change (the caller holds the lock)."""
        self._undo.append(self._state)
        self._redo.clear()
        self._state = new

    def _index_of(self, id: object) -> int:
        ids = [p.id for p in self._state.points]
        if not _is_int(id) or int(id) not in ids:
            raise ValueError(f"id={id!r} is not a point of this session; existing ids: {ids}")
        return ids.index(int(id))

    def _xy(self, name: str, value: object) -> tuple[float, float]:
        """``[x, y]`` within the image, as floats."""
        width, height = self.size
        if isinstance(value, (str, bytes)):
            raise ValueError(f"{name} must be [x, y] (two numbers, image pixels), got {value!r}")
        try:
            t = torch.as_tensor(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be [x, y] (two numbers, image pixels), got {value!r}") from None
        if t.shape != (2,):
            raise ValueError(f"{name} must be [x, y] (two numbers, image pixels), got shape {list(t.shape)}")
        x, y = t.tolist()
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{name}=[{x}, {y}] contains NaN or infinity; use finite pixel coordinates")
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise ValueError(f"{name}=[{x:g}, {y:g}] is outside the image: x must be within 0 to {width - 1} and "
                             f"y within 0 to {height - 1} (pixels, origin top-left)")
        return float(x), float(y)

    def _mask_u8(self, mask: object) -> Tensor:
        """A user mask -> ``[H, W]`` uint8 on the CPU, 255 = may change."""
        width, height = self.size
        if isinstance(mask, Image.Image):
            if mask.size != (width, height):
                raise ValueError(f"mask must be {width}x{height} pixels (the image's size), got a "
                                 f"{mask.size[0]}x{mask.size[1]} image")
            return torch.from_numpy(np.array(mask.convert("L"), dtype=np.uint8))
        try:
            m = torch.as_tensor(mask.detach().cpu() if isinstance(mask, Tensor) else mask)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"mask must be an [H, W] tensor, array or PIL image, got {type(mask).__name__}") from None
        if m.shape != (height, width):
            raise ValueError(f"mask must be [H, W] = [{height}, {width}] (1 = may change, 0 = fixed), "
                             f"got shape {list(m.shape)}")
        if m.is_complex():
            raise ValueError(f"mask must hold real numbers in 0 to 1, got dtype {m.dtype}")
        m = m.to(torch.float64)
        if not torch.isfinite(m).all() or (m < 0).any() or (m > 1).any():
            raise ValueError(f"mask values must be within 0 to 1 (1 = may change, 0 = fixed), got min "
                             f"{m.min().item()}, max {m.max().item()} (NaN and infinity are not allowed; for "
                             "0..255 data pass a PIL image or divide by 255)")
        return (m * 255).round().to(torch.uint8)

    def _image_of(self, latent: Tensor) -> Image.Image:
        """The image of ``latent``, cached for the latent object (state latents never change in place)."""
        cached = self._image_cache
        if cached is not None and cached[0] is latent:
            return cached[1]
        pil = self._backend.render(latent)
        self._image_cache = (latent, pil)
        return pil


# --- model hash ---------------------------------------------------------------------------------------------------

_MODEL_HASHES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def model_sha256(generator: torch.nn.Module) -> str:
    """SHA-256 of a generator's weights: over ``state_dict()`` in sorted key order, for each tensor its key,
    dtype and shape, then its bytes (C order, little-endian as stored). Independent of the device.

    Computed once per module and cached; the cache is dropped when a tensor is replaced or changed in place
    (``load_state_dict``, ``.to()``, optimiser steps), which it notices by the tensors' storage and version.
    """
    state = generator.state_dict()
    fingerprint = tuple((k, v.device.type, v.data_ptr(), _version(v)) for k, v in state.items())
    cached = _MODEL_HASHES.get(generator)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()
    _MODEL_HASHES[generator] = (fingerprint, digest)
    return digest


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


# --- small helpers ------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; use an integer >= {minimum}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check_z(name: str, value: object, shape: list[int]) -> Tensor:
    """A DragDiffusion latent as a detached float32 copy of ``shape`` with finite values, else a ``ValueError``."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, Tensor) or list(value.shape) != shape or not value.is_floating_point():
        got = f"shape {list(value.shape)}, {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a float {shape} latent (the z_t of the prepared image: 4 channels at 1/8 "
                         f"of its size), got {got}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.detach().to(torch.float32).clone()


def _keys_text(keys: tuple[str, ...]) -> str:
    return f"the key '{keys[0]}'" if len(keys) == 1 else "the keys " + ", ".join(f"'{k}'" for k in keys)


def _read_latent_file(path: Path, keys: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of a latent ``.safetensors`` file (needs ``keys``: ``w`` for DragGAN, ``z_t``, ``z_t0`` for
    DragDiffusion)."""
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no latent file (a .safetensors file with {_keys_text(keys)})",
                                str(path))
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise ValueError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    if any(k not in tensors for k in keys):
        raise ValueError(f"{path}: holds {sorted(tensors)}, but a latent file needs {_keys_text(keys)}")
    return tensors


def _read_record(path: Path) -> dict[str, Any]:
    """The JSON edit record at ``path``, with its format and version checked."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON edit record ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: not a {RECORD_FORMAT} record (its 'format' is "
                         f"{record.get('format') if isinstance(record, dict) else None!r})")
    version = record.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= RECORD_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not readable here (1 to {RECORD_VERSION})")
    return record


def _check_model_hash(path: Path, entry: dict[str, Any], got: str, strict: bool, whose: str, what: str,
                      stacklevel: int = 3) -> None:
    """Refuse (``strict``) or warn about a model whose state-dict sha256 differs from the record's."""
    want = entry.get("sha256")
    if want == got:
        return
    message = (f"{path} was made with model {entry.get('id')!r} (sha256 {want}); {whose} state-dict sha256 is "
               f"{got}. Pass {what} the edit was made with")
    if strict:
        raise ValueError(message + ", or strict=False to open it anyway (it will render differently).")
    warnings.warn(message + "; opening anyway (strict=False).", stacklevel=stacklevel)


def _jsonable(value: Any) -> Any:
    """``value`` as JSON data (anything JSON cannot hold becomes its ``str``)."""
    return json.loads(json.dumps(value, default=str))


def _lora_fingerprint(weights: dict[str, Tensor] | None) -> str | None:
    """The content fingerprint of a LoRA state dict (``dragrt.runtime.models.lora.lora_fingerprint``), or ``None``
    without one."""
    if weights is None:
        return None
    from dragrt.runtime.models.lora import lora_fingerprint  # imported when needed: it pulls in peft-style helpers

    return lora_fingerprint(weights)


def _lora_source(lora: Any, config: DragDiffusionConfig) -> str | None:
    """How a session's LoRA came, for the record: a file name, ``"state dict"``, ``"trained"`` or ``None``."""
    if isinstance(lora, (str, os.PathLike)):
        return Path(lora).name
    if isinstance(lora, dict):
        return "state dict"
    return "trained" if config.lora else None


def _default_model_id(generator: torch.nn.Module) -> str | None:
    record = getattr(generator, "checkpoint_record", None)
    source = record.get("source") if isinstance(record, dict) else None
    return source.get("file_name") if isinstance(source, dict) else None


def _config_from_record(path: Path, stored: object, config_class: type) -> Any:
    """The engine config (``DragGANConfig`` or ``DragDiffusionConfig``) stored in a record."""
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: the record has no engine config ('engine': {{'config': ...}})")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{path}: engine config has fields this dragrt does not know: {', '.join(unknown)}")
    if config_class is DragDiffusionConfig and isinstance(stored.get("lora_config"), dict):
        stored = {**stored, "lora_config": _lora_config_from_record(path, stored["lora_config"])}
    return config_class(**stored)


def _lora_config_from_record(path: Path, stored: dict[str, Any]) -> Any:
    from dragrt.runtime.models.lora import LoRAConfig

    known = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ValueError(f"{path}: engine config's lora_config has fields this dragrt does not know: "
                         f"{', '.join(unknown)}")
    return LoRAConfig(**stored)


def _record_file(record_path: str | os.PathLike[str]) -> Path:
    if not isinstance(record_path, (str, os.PathLike)):
        raise ValueError(f"record_path must be a path, got {type(record_path).__name__}")
    path = Path(record_path)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no edit record (PREFIX.json written by EditSession.export)", str(path))
    return path


def _record_member(path: Path, record: dict[str, Any], key: str) -> Path:
    """The file an entry of the record names: a plain file name next to the record, whose sha256 must match."""
    entry = record.get(key)
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise ValueError(f"{path}: '{key}' must name a file next to the record, got {entry!r}")
    member = path.parent / name
    if not member.is_file():
        raise FileNotFoundError(errno.ENOENT, f"the record's {key} file is missing", str(member))
    if entry.get("sha256") != _sha256(member.read_bytes()):
        raise ValueError(f"{member}: its sha256 does not match the record's; the file changed after the export")
    return member


def _export_prefix(path_prefix: object) -> Path:
    if not isinstance(path_prefix, (str, os.PathLike)):
        raise ValueError(f"path_prefix must be a path such as 'out/edit', got {type(path_prefix).__name__}")
    prefix = Path(path_prefix)
    if prefix.suffix in _RECORD_SUFFIXES:
        prefix = prefix.with_suffix("")
    if not prefix.name or prefix.is_dir():
        raise ValueError(f"path_prefix={str(path_prefix)!r} names a folder; give a file name prefix such as "
                         "'out/edit' (writes out/edit.png, out/edit.json, ...)")
    folder = prefix.parent
    if not folder.exists():
        raise FileNotFoundError(errno.ENOENT, "the export folder does not exist; create it first", str(folder))
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "the export folder is not a folder", str(folder))
    return prefix


def _write_atomically(files: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temporary sibling (flushed to disk), then rename them into place in order; on any
    failure before the renames, remove the temporaries and leave the targets untouched."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def to_pil(img: Tensor, max_size: int | None = None) -> Image.Image:
    """``[1, C, H, W]`` in about [-1, 1] (C = 1 or 3) -> RGB uint8 image, area-downscaled on the device first
    so that its longer side is at most ``max_size``."""
    _, c, h, w = img.shape
    if c not in (1, 3):
        raise ValueError(f"cannot show a {c}-channel image as RGB (1 or 3 channels)")
    if max_size is not None and max(h, w) > max_size:
        scale = max_size / max(h, w)
        img = F.interpolate(img, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    u8 = (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)  # NVIDIA's gen_images.py conversion
    return Image.fromarray(u8[0].expand(3, -1, -1).permute(1, 2, 0).contiguous().cpu().numpy())  # [H, W, 3]
