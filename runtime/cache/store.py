"""Content hashes and a two-level (memory LRU + safetensors on disk) tensor cache.

- :func:`content_hash`: SHA-256 of structured Python values (tensors, arrays, images, configs), stable across
  processes, devices and dict orderings; unknown types are refused rather than hashed by ``repr``.
- :func:`module_fingerprint`: SHA-256 of a network's class, config and every parameter/buffer (names, shapes,
  dtypes and exact bytes), remembered per tensor so that repeated calls only re-hash what changed.
- :class:`TensorCache`: ``key -> dict[str, Tensor]`` (+ string metadata) kept in a small in-memory LRU and,
  optionally, as ``<directory>/<namespace>/<key>.safetensors``. A damaged file never breaks a session: it is
  reported with a warning, deleted, and treated as a miss.

The inversion and LoRA caches (:mod:`dragrt.runtime.inversion`, :mod:`dragrt.runtime.models.lora`) build their keys
with :func:`content_hash` over everything that determines the result, prefixed with a domain string, so one
:class:`TensorCache` can hold both kinds of entries without collisions.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["content_hash", "module_fingerprint", "TensorCache", "CacheWarning"]


class CacheWarning(UserWarning):
    """A cache file could not be read or written; the cache carried on without it."""


# --------------------------------------------------------------------------------------------------
# content_hash
# --------------------------------------------------------------------------------------------------


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _put_bytes(h: Any, tag: bytes, payload: bytes | memoryview) -> None:
    # tag + 8-byte length + payload: no two different sequences of values feed the same byte stream.
    h.update(tag)
    h.update(struct.pack("<Q", len(payload)))
    h.update(payload)


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` in C order, on the host (one device-to-host copy for GPU tensors)."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def _feed_tensor(h: Any, t: Tensor) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"content_hash: cannot hash a {t.layout} tensor (dense strided tensors only)")
    if t.device.type == "meta":
        raise TypeError("content_hash: cannot hash a meta tensor (it holds no values)")
    _put_bytes(h, b"T", f"{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}".encode())
    _put_bytes(h, b"t", _tensor_bytes(t))


def _feed(h: Any, obj: Any) -> None:
    """Feed one value into the hash ``h`` (tagged, length-prefixed, recursive)."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):  # before int: bool is an int subclass
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, enum.Enum):
        _put_bytes(h, b"E", _type_name(obj).encode())
        _feed(h, obj.value)
    elif isinstance(obj, int):
        _put_bytes(h, b"I", str(int(obj)).encode())
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))  # exact: the IEEE double, so 0.7 != 0.70000001
    elif isinstance(obj, str):
        _put_bytes(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _put_bytes(h, b"Y", bytes(obj))
    elif isinstance(obj, Tensor):
        _feed_tensor(h, obj)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError("content_hash: cannot hash a numpy array of dtype object")
        arr = np.ascontiguousarray(obj)
        _put_bytes(h, b"A", f"{arr.dtype.str}|{list(arr.shape)}".encode())
        _put_bytes(h, b"a", memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    elif isinstance(obj, np.generic):
        _feed(h, np.asarray(obj))
    elif isinstance(obj, torch.dtype):
        _put_bytes(h, b"D", str(obj).encode())
    elif isinstance(obj, torch.device):
        _put_bytes(h, b"V", str(obj).encode())
    elif _is_pil_image(obj):
        _put_bytes(h, b"P", f"{obj.mode}|{list(obj.size)}".encode())
        palette = obj.getpalette() if obj.mode in ("P", "PA") else None
        _feed(h, bytes(palette) if palette is not None else None)
        _put_bytes(h, b"p", obj.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _put_bytes(h, b"C", _type_name(obj).encode())
        fields = dataclasses.fields(obj)
        h.update(struct.pack("<Q", len(fields)))
        for f in fields:
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Mapping):
        # Sorted by each key's own digest: any hashable key type, and independent of insertion order.
        items = []
        for k, v in obj.items():
            kh = hashlib.sha256()
            _feed(kh, k)
            items.append((kh.digest(), k, v))
        items.sort(key=lambda kv: kv[0])
        h.update(b"M" + struct.pack("<Q", len(items)))
        for _, k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        # Lists and tuples hash alike: a config read back from JSON keeps its key.
        h.update(b"L" + struct.pack("<Q", len(obj)))
        for item in obj:
            _feed(h, item)
    else:
        raise TypeError(
            f"content_hash: cannot hash an object of type {_type_name(obj)}; supported: torch tensors, numpy arrays, "
            "PIL images, str, bytes, int, float, bool, None, dicts, lists/tuples and dataclasses of these"
        )


def _is_pil_image(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def content_hash(*parts: Any) -> str:
    """SHA-256 (hex) of ``parts``: equal values give equal keys across runs, processes and devices.

    Hashed by content and structure, with a type tag and a length before every item, so ``("ab", "c")`` and
    ``("a", "bc")`` differ:

    - torch tensors: dtype, shape and the exact bytes (C order; a CUDA tensor hashes like its CPU copy;
      ``requires_grad``, strides and device do not matter);
    - numpy arrays (dtype incl. byte order, shape, bytes) and numpy scalars; PIL images (mode, size, palette,
      pixel bytes); ``str`` (UTF-8), ``bytes``; ``int``; ``float`` (its exact IEEE double); ``bool``; ``None``;
      ``torch.dtype`` / ``torch.device``; enums;
    - dicts (any key order gives the same hash), lists and tuples (hashed alike, so JSON round trips keep
      keys), dataclass instances (class name + fields in order), recursively.

    Raises:
        TypeError: an object of any other type (named in the message); nothing is hashed by ``repr``.
    """
    h = hashlib.sha256()
    h.update(b"dragrt.content_hash.v1")
    _feed(h, list(parts))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# module_fingerprint
# --------------------------------------------------------------------------------------------------

# module -> {tensor name -> (identity key, digest)}; weak so a dropped model frees its entry.
_TENSOR_DIGESTS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple, bytes]]] = weakref.WeakKeyDictionary()
_DIGEST_LOCK = threading.Lock()


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return None


def _identity(t: Tensor) -> tuple | None:
    """What must be unchanged for a remembered digest to still describe ``t``; ``None`` = do not remember."""
    v = _version(t)
    if v is None or t.device.type == "meta":
        return None
    return (id(t), t.data_ptr(), v, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, str(t.device))


def _config_for_hash(value: Any) -> Any:
    """A config as plain data: bookkeeping keys (``_name_or_path``, ``_diffusers_version``,
    ``transformers_version``, ...) dropped, odd leaf values replaced by their type and ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): _config_for_hash(v) for k, v in value.items()
                if not str(k).startswith("_") and str(k) != "transformers_version"}
    if isinstance(value, (list, tuple)):
        return [_config_for_hash(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    return f"<{_type_name(value)}>{value!r}"


def _module_config(module: nn.Module) -> Any:
    config = getattr(module, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):  # transformers PretrainedConfig
        config = config.to_dict()
    if not isinstance(config, Mapping):
        return f"<{_type_name(config)}>"
    return _config_for_hash(config)


def module_fingerprint(module: nn.Module, *, refresh: bool = False) -> str:
    """SHA-256 (hex) of a network: class name, ``config`` (diffusers / transformers, bookkeeping keys dropped),
    then every parameter and buffer in registration order: name, dtype, shape and exact bytes.

    Two modules with the same class, config and weights get the same fingerprint on any device; changing one
    weight changes it. ``torch.compile`` wrappers are looked through (``_orig_mod`` is dropped from the class
    and from parameter names), so a compiled model keeps its fingerprint.

    Cost: the first call copies every tensor to the host and hashes it (SHA-256 runs at roughly 1-2 GB/s, plus
    the device-to-host copy: about 1-2 s for SD1.5's fp16 UNet, well under 1 s for the VAE and text encoder).
    Each tensor's digest is remembered, keyed by the tensor's identity, storage address, shape, strides and
    autograd version counter (which every in-place op bumps: ``copy_``, ``add_``, optimizer steps,
    ``load_state_dict``). Later calls re-hash only tensors that changed: free when nothing did, and about
    10% of the UNet after :func:`dragrt.runtime.models.lora.fused_lora` rewrote the attention projections.

    Args:
        refresh: forget the remembered digests and hash everything again. Needed only if weights were replaced
            without any in-place op *and* the new storage happens to reuse the old address with the same
            version counter (e.g. ``p.data = new_tensor`` after freeing the old one).
    """
    base = getattr(module, "_orig_mod", module)  # torch.compile's OptimizedModule
    with _DIGEST_LOCK:
        remembered = {} if refresh else dict(_TENSOR_DIGESTS.get(base, {}))
    fresh: dict[str, tuple[tuple, bytes]] = {}
    h = hashlib.sha256()
    h.update(b"dragrt.module_fingerprint.v1")
    _feed(h, _type_name(base))
    _feed(h, _module_config(base))
    named = [("param", n, p) for n, p in base.named_parameters(remove_duplicate=False)]
    named += [("buffer", n, b) for n, b in base.named_buffers(remove_duplicate=False)]
    h.update(struct.pack("<Q", len(named)))
    for kind, name, t in named:
        clean = name.replace("_orig_mod.", "")
        ident = _identity(t)
        entry = remembered.get(f"{kind}:{name}")
        if ident is not None and entry is not None and entry[0] == ident:
            digest = entry[1]
        else:
            th = hashlib.sha256()
            _feed_tensor(th, t)
            digest = th.digest()
        if ident is not None:
            fresh[f"{kind}:{name}"] = (ident, digest)
        _feed(h, kind)
        _feed(h, clean)
        h.update(digest)
    with _DIGEST_LOCK:
        _TENSOR_DIGESTS[base] = fresh
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# TensorCache
# --------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_RESERVED = "dragrt."
_CHECKSUM_KEY = "dragrt.checksum"
_FORMAT_KEY = "dragrt.format"
_FORMAT = "tensor-cache/1"


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{what} must be 1-200 characters of letters, digits, '_', '.', '-' starting with a letter or digit "
            f"(a file name), got {value!r}"
        )
    return value


def _tensors_checksum(tensors: Mapping[str, Tensor]) -> str:
    return content_hash(dict(tensors))


class TensorCache:
    """``key -> dict[str, Tensor]`` in a memory LRU, optionally backed by safetensors files on disk.

    Entries live in memory (the ``max_items`` most recently used) and, when ``directory`` is given, in
    ``directory/namespace/<key>.safetensors`` (written atomically: a temporary file in the same folder, then
    ``os.replace``). Metadata (``dict[str, str]``) travels in the safetensors header, next to a checksum of the
    tensors; a file that cannot be parsed, is truncated or fails the checksum is reported with a
    :class:`CacheWarning`, deleted and treated as a miss. Disk errors on write are warnings too: the entry then
    lives in memory only. Thread-safe.

    Entries are copies: :meth:`put` stores detached clones and :meth:`get` returns fresh tensors by default, so a
    caller optimising a cached latent in place cannot corrupt the cache.

    Args:
        namespace: a sub-folder name (letters, digits, ``_.-``), e.g. ``"inversion"`` or ``"lora"``.
        directory: root folder of the disk cache, or ``None`` for memory only (created on first write).
        max_items: how many entries the memory level keeps (0: none, every hit comes from disk).

    Attributes:
        hits_memory, hits_disk, misses: counters (tests and logs use them).
    """

    def __init__(self, namespace: str, directory: str | os.PathLike | None = None, max_items: int = 8) -> None:
        self.namespace = _check_name("namespace", namespace)
        if isinstance(max_items, bool) or not isinstance(max_items, int) or not 0 <= max_items <= 1_000_000:
            raise ValueError(f"max_items must be an int in 0..1000000, got {max_items!r}")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise ValueError(f"directory must be a path or None, got {type(directory).__name__}")
        self.directory = Path(directory).expanduser() / namespace if directory is not None else None
        self.max_items = max_items
        self._memory: OrderedDict[str, tuple[dict[str, Tensor], dict[str, str]]] = OrderedDict()
        self._lock = threading.RLock()
        self.hits_memory = 0
        self.hits_disk = 0
        self.misses = 0

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else None
        return (f"TensorCache(namespace={self.namespace!r}, directory={where!r}, max_items={self.max_items}, "
                f"in_memory={len(self._memory)})")

    # -- paths
    def path(self, key: str) -> Path | None:
        """Where ``key`` lives on disk (``None`` for a memory-only cache)."""
        _check_name("key", key)
        return None if self.directory is None else self.directory / f"{key}.safetensors"

    # -- reads
    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        path = self.path(key)
        return path is not None and path.is_file()

    def get(self, key: str, device: torch.device | str | None = None, *, copy: bool = True
            ) -> dict[str, Tensor] | None:
        """The tensors stored under ``key``, or ``None`` on a miss.

        Args:
            device: move the tensors there (default: where they were stored; CPU for disk entries).
            copy: return fresh tensors (default). ``False`` returns the cached tensors themselves when no move is
                needed: faster for large entries, but the caller must not modify them in place.
        """
        entry = self._lookup(key)
        if entry is None:
            return None
        tensors, _ = entry
        out = {}
        for name, t in tensors.items():
            moved = t.to(device) if device is not None else t
            out[name] = moved.clone() if (copy and moved is t) else moved
        return out

    def metadata(self, key: str) -> dict[str, str] | None:
        """The metadata stored with ``key`` (without the cache's own ``dragrt.*`` fields), or ``None``."""
        entry = self._lookup(key, count=False)
        return None if entry is None else dict(entry[1])

    def _lookup(self, key: str, *, count: bool = True) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        _check_name("key", key)
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                if count:
                    self.hits_memory += 1
                return entry
            entry = self._read_disk(key)
            if entry is None:
                if count:
                    self.misses += 1
                return None
            if count:
                self.hits_disk += 1
            self._remember(key, entry)
            return entry

    def _read_disk(self, key: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta.get(_FORMAT_KEY) != _FORMAT:
                raise ValueError(f"not a dragrt cache file (header {_FORMAT_KEY}={meta.get(_FORMAT_KEY)!r})")
            expected = meta.get(_CHECKSUM_KEY)
            if expected != _tensors_checksum(tensors):
                raise ValueError("checksum mismatch (the file was modified or only partly written)")
        except Exception as exc:  # any damage: warn, delete, miss
            warnings.warn(f"TensorCache[{self.namespace}]: ignoring unreadable cache file {path} "
                          f"({type(exc).__name__}: {exc}); deleting it", CacheWarning, stacklevel=4)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        user_meta = {k: v for k, v in meta.items() if not k.startswith(_RESERVED)}
        return tensors, user_meta

    # -- writes
    def put(self, key: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
        """Store ``tensors`` (copied) under ``key``, replacing any previous entry.

        Args:
            tensors: names (non-empty strings) to dense tensors; any device and dtype.
            metadata: string to string, kept in the file header; keys starting with ``dragrt.`` are reserved.
        """
        _check_name("key", key)
        if not isinstance(tensors, Mapping):
            raise ValueError(f"tensors must be a dict of name -> Tensor, got {type(tensors).__name__}")
        clean: dict[str, Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if not isinstance(t, Tensor) or t.layout != torch.strided or t.device.type == "meta":
                raise ValueError(f"tensors[{name!r}] must be a dense tensor with values, got {type(t).__name__}")
            clean[name] = t.detach().clone()
        meta: dict[str, str] = {}
        for k, v in (metadata or {}).items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
            if k.startswith(_RESERVED):
                raise ValueError(f"metadata key {k!r}: keys starting with {_RESERVED!r} are reserved")
            meta[k] = v
        with self._lock:
            self._remember(key, (clean, meta))
            if self.directory is not None:
                self._write_disk(key, clean, meta)

    def _remember(self, key: str, entry: tuple[dict[str, Tensor], dict[str, str]]) -> None:
        if self.max_items == 0:
            return
        self._memory[key] = entry
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def _write_disk(self, key: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        from safetensors.torch import save

        path = self.path(key)
        assert path is not None
        tmp_name = None
        try:
            cpu = {name: t.to("cpu").contiguous() for name, t in tensors.items()}
            header = {**meta, _FORMAT_KEY: _FORMAT, _CHECKSUM_KEY: _tensors_checksum(cpu)}
            data = save(cpu, metadata=header)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=str(path.parent))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
        except Exception as exc:
            warnings.warn(f"TensorCache[{self.namespace}]: could not write {path} ({type(exc).__name__}: {exc}); "
                          "the entry is kept in memory only", CacheWarning, stacklevel=4)
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass

    def delete(self, key: str) -> None:
        """Remove ``key`` from memory and disk (no error when absent)."""
        path = self.path(key)
        with self._lock:
            self._memory.pop(key, None)
            if path is not None:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def clear(self, *, disk: bool = True) -> None:
        """Drop every entry from memory and, with ``disk=True``, this namespace's files (incl. stale temporaries)."""
        with self._lock:
            self._memory.clear()
            if disk and self.directory is not None and self.directory.is_dir():
                for p in self.directory.iterdir():
                    if p.suffix in (".safetensors", ".tmp") and p.is_file():
                        try:
                            p.unlink()
                        except OSError:
                            pass

    def keys(self) -> list[str]:
        """Keys present in memory or on disk."""
        with self._lock:
            found = list(self._memory)
        if self.directory is not None and self.directory.is_dir():
            for p in sorted(self.directory.glob("*.safetensors")):
                if p.stem not in found:
                    found.append(p.stem)
        return found


def metadata_json(value: Any) -> str:
    """Helper for metadata values: compact, key-sorted JSON (dataclasses become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
