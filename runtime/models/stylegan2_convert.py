"""Safe StyleGAN2 checkpoint conversion: NVIDIA ``.pkl`` or rosinality ``.pt`` -> ``OUT.safetensors`` + ``OUT.json``.

Why: an NVIDIA pickle is a ``pickle.dump`` of ``{'G', 'D', 'G_ema', 'augment_pipe', 'training_set_kwargs'}``
whose modules are ``torch_utils.persistence`` objects; unpickling them normally ``exec``s the Python source
stored inside (``meta['module_src']``) and whatever else the pickle names. Here they are read with a
restricted unpickler that builds tensors and plain containers only, once; afterwards the runtime loads
safetensors (:func:`load_generator`), which cannot run code.

What a real NVIDIA pickle references (found by pickling modules wrapped like ``persistent_class`` does, with
torch 2.13 / numpy 2.4 at protocols 2-5; older torch/numpy spell some names differently, see the allow-list):
``torch_utils.persistence._reconstruct_persistent_obj``, ``collections.OrderedDict``, ``dnnlib.util.EasyDict``,
``torch._utils._rebuild_parameter``, ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``
(each storage is a nested legacy ``torch.save`` blob, read here with ``torch.load(weights_only=True)``),
numpy's ``dtype``/``ndarray``/``_reconstruct``/``scalar``/``_frombuffer`` (module attributes such as
``weight_gain`` are numpy scalars), ``builtins.set`` and ``_codecs.encode`` (protocol 2/3 only). Storage
classes such as ``torch.FloatStorage`` never appear in the outer pickle: they live inside the nested blobs,
where ``torch.load(weights_only=True)`` checks them. Everything else is refused with
:class:`UnsafeCheckpointError` naming the global.

Rosinality ``.pt`` files are ``torch.save`` archives: ``torch.load(weights_only=True)`` reads them (with
``argparse.Namespace`` allowed for the ``args`` entry of training checkpoints), and :func:`rosinality_key_map`
renames their keys to NVIDIA's.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dragrt.runtime.models.stylegan2 import Generator, GeneratorConfig, setup_filter

FORMAT_NAME = "dragrt-stylegan2"
FORMAT_VERSION = 1
SOURCE_FORMATS = ("auto", "nvidia", "rosinality")
# Rosinality's generate.py truncates towards g_ema.mean_latent(4096); we estimate a missing w_avg the same way.
ROSINALITY_MEAN_LATENT_SAMPLES = 4096
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled 0x1950a86a20f9469cfc6c


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint asked for something outside the allow-list (a global, a persistent id, a hooked
    tensor). Nothing it asked for was called. ``global_name`` is ``"module.name"`` when a global was refused."""

    def __init__(self, message: str, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


class EasyDict(dict):
    """Stand-in for ``dnnlib.EasyDict``: a plain dict whose items can also be read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@dataclass
class PersistentObject:
    """What ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` would have rebuilt, left as data.

    Attributes:
        class_name: the class in the pickled source (``'Generator'``, ``'SynthesisLayer'``, ...).
        state: the object's ``__dict__`` (for modules: ``_parameters``, ``_buffers``, ``_modules``,
            ``_init_args``, ``_init_kwargs``, ...).
        version: ``torch_utils.persistence`` format version (6 for every public release).
        module_src_sha256: hash of the stored source (recorded for provenance; the source is never run).
    """

    class_name: str
    state: dict[str, Any]
    version: int | None = None
    module_src_sha256: str | None = None


# ---------------------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------------------


def _reconstruct_persistent_obj(meta: object) -> PersistentObject:
    """Replacement for NVIDIA's hook: returns the recorded state, never touches ``meta['module_src']``
    beyond hashing it."""
    if not isinstance(meta, Mapping):
        raise UnsafeCheckpointError(f"persistent object record must be a dict, got {type(meta).__name__}")
    if meta.get("type") != "class":
        raise UnsafeCheckpointError(f"persistent object of type {meta.get('type')!r} (only 'class' is known)")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, Mapping):
        raise UnsafeCheckpointError("persistent object record lacks a class_name string or a state dict")
    src = meta.get("module_src")
    src_hash = hashlib.sha256(src.encode("utf-8")).hexdigest() if isinstance(src, str) else None
    version = meta.get("version")
    return PersistentObject(class_name, dict(state), version if isinstance(version, int) else None, src_hash)


def _check_hooks(hooks: object, what: str) -> None:
    if hooks:
        raise UnsafeCheckpointError(f"a {what} carries backward hooks; refusing to rebuild it")


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object,
                    requires_grad: object = False, backward_hooks: object = None, metadata: object = None) -> Tensor:
    """Checked ``torch._utils._rebuild_tensor_v2``: a view of a typed storage, no hooks, no extra state
    (``metadata`` holds Python attributes set on the tensor; they are dropped)."""
    if not isinstance(storage, torch.TypedStorage):
        raise UnsafeCheckpointError(f"tensor rebuild got a {type(storage).__name__} instead of a typed storage")
    if not (isinstance(storage_offset, int) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(isinstance(v, int) for v in (*size, *stride))):
        raise UnsafeCheckpointError("tensor rebuild with a non-integer offset, size or stride")
    _check_hooks(backward_hooks, "tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        # set_() checks that offset/size/stride stay inside the storage.
        return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: object, requires_grad: object = False, backward_hooks: object = None,
                       state: object = None) -> Tensor:
    """Checked ``torch._utils._rebuild_parameter(_with_state)``: returns the plain tensor (extra state dropped)."""
    if not isinstance(data, Tensor):
        raise UnsafeCheckpointError(f"parameter rebuild got a {type(data).__name__} instead of a tensor")
    _check_hooks(backward_hooks, "parameter")
    return data


def _load_storage_from_bytes(blob: object) -> torch.TypedStorage:
    """Replacement for ``torch.storage._load_from_bytes`` (which calls ``torch.load(weights_only=False)``)."""
    if not isinstance(blob, (bytes, bytearray)):
        raise UnsafeCheckpointError(f"storage blob must be bytes, got {type(blob).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"an embedded tensor storage was refused by torch.load(weights_only=True): "
                                    f"{exc}") from exc
    except Exception as exc:
        raise ValueError(f"an embedded tensor storage could not be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, torch.TypedStorage):
        raise UnsafeCheckpointError(f"an embedded storage blob holds a {type(obj).__name__}, not a storage")
    return obj


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return codecs.encode(text, "latin1")


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` (numpy 2) or ``numpy.core.<submodule>.<name>`` (numpy 1)."""
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafeCheckpointError(f"numpy has no {submodule}.{name} here")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    """``(module, name)`` -> what the unpickler gets instead. Nothing else can be named by a checkpoint."""
    allowed: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("dnnlib.util", "EasyDict"): EasyDict,
        ("dnnlib", "EasyDict"): EasyDict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for builtins_name in ("builtins", "__builtin__"):  # protocol 2 pickles use the Python 2 name
        allowed[(builtins_name, "set")] = set
        allowed[(builtins_name, "frozenset")] = frozenset
    for prefix in ("numpy._core", "numpy.core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = _numpy_attr("multiarray", "_reconstruct")
        allowed[(f"{prefix}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
        allowed[(f"{prefix}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :func:`_allowed_globals`; persistent ids are refused."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is not None:
            return target
        qualified = f"{module}.{name}"
        hint = ""
        if module.startswith("dnnlib.tflib"):
            hint = (" This is a TensorFlow-era pickle: convert it with NVIDIA's legacy.py (in an isolated "
                    "environment) first, then convert the resulting PyTorch pickle.")
        raise UnsafeCheckpointError(
            f"{self._source}: refused global {qualified!r}: it is not on the allow-list (tensors, containers, "
            f"numpy scalars and NVIDIA persistence records). The checkpoint may try to run code; nothing was "
            f"called.{hint}",
            qualified,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._source}: refused persistent id {pid!r} (a torch.save archive is "
                                    "not an NVIDIA pickle)")


def restricted_load(file: BinaryIO, source: str = "<pickle>") -> Any:
    """Unpickle ``file`` with the allow-list of this module (see the module docstring)."""
    return _RestrictedUnpickler(file, source).load()


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into our naming: ``config`` + ``state_dict`` (NVIDIA keys) + provenance."""

    config: GeneratorConfig
    state_dict: dict[str, Tensor]
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _plain(obj: Any) -> Any:
    """EasyDicts / OrderedDicts / tuples -> dicts and lists, numpy scalars -> Python numbers (for configs)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _jsonable(obj: Any) -> Any:
    """Like :func:`_plain`, with anything else written as its ``repr`` (provenance only)."""
    obj = _plain(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return repr(obj)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def expected_shapes(config: GeneratorConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``Generator.from_config(config).state_dict()``, built on the meta device (no memory)."""
    with torch.device("meta"):
        gen = Generator.from_config(config)
    return {k: tuple(v.shape) for k, v in gen.state_dict().items()}


def check_state_dict(config: GeneratorConfig, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``config``'s generator
    and only floating-point tensors."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {list(state_dict[k].shape)} (expected {list(expected[k])})"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    not_float = [k for k, v in state_dict.items() if not (isinstance(v, Tensor) and v.is_floating_point())]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:8])}")
    if not_float:
        problems.append(f"non-float entries: {', '.join(not_float[:8])}")
    if problems:
        raise ValueError(f"{source}: does not match the StyleGAN2 generator its config describes: "
                         + " | ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# NVIDIA pickles
# ---------------------------------------------------------------------------------------------------------

_NVIDIA_POSITIONAL = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_kwargs",
                      "synthesis_kwargs")


def _collect_state_dict(obj: PersistentObject, prefix: str, out: dict[str, Tensor]) -> None:
    """Walk ``_parameters``, persistent ``_buffers`` and ``_modules`` like ``nn.Module.state_dict`` does."""
    st = obj.state
    params = st.get("_parameters") or {}
    buffers = st.get("_buffers") or {}
    non_persistent = st.get("_non_persistent_buffers_set") or set()
    modules = st.get("_modules") or {}
    if not all(isinstance(m, Mapping) for m in (params, buffers, modules)):
        raise ValueError(f"{prefix or 'root'} ({obj.class_name}): _parameters/_buffers/_modules are not dicts")
    for kind, items in (("parameter", params), ("buffer", buffers)):
        for name, t in items.items():
            if t is None or (kind == "buffer" and name in non_persistent):
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{kind} {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[f"{prefix}{name}"] = t
    for name, sub in modules.items():
        if sub is None:
            continue
        if not isinstance(sub, PersistentObject):
            raise ValueError(f"submodule {prefix}{name} is a {type(sub).__name__}, not a persistent module record")
        _collect_state_dict(sub, f"{prefix}{name}.", out)


def read_nvidia_pickle(path: str | os.PathLike[str], key: str = "G_ema") -> LoadedCheckpoint:
    """Read an NVIDIA stylegan2-ada-pytorch / StyleGAN3-repo StyleGAN2 pickle safely (see the module docstring).

    Args:
        path: the ``.pkl``.
        key: which network of the pickle's dict to take (``'G_ema'``: the averaged generator everyone uses).

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing was called).
        ValueError: not a StyleGAN2 generator, or its weights do not match its own config.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4).startswith(b"PK\x03\x04"):
            raise ValueError(f"{path}: a zip archive (torch.save), not an NVIDIA pickle; rosinality .pt files "
                             "go through load_rosinality")
        f.seek(0)
        data = restricted_load(f, str(path))
    if isinstance(data, PersistentObject):
        net, used_key = data, None
    elif isinstance(data, Mapping):
        if key not in data:
            raise ValueError(f"{path}: no {key!r} entry; the pickle holds {sorted(map(str, data))}")
        net, used_key = data[key], key
    else:
        raise ValueError(f"{path}: expected a dict of networks, got {type(data).__name__}")
    if not isinstance(net, PersistentObject):
        raise ValueError(f"{path}: {key!r} is a {type(net).__name__}, not a persistent network record")
    if net.class_name != "Generator":
        raise ValueError(f"{path}: {key!r} is a {net.class_name!r}, not a Generator")

    init_args = net.state.get("_init_args") or ()
    init_kwargs = _plain(net.state.get("_init_kwargs") or {})
    if not isinstance(init_args, (tuple, list)) or not isinstance(init_kwargs, dict):
        raise ValueError(f"{path}: _init_args/_init_kwargs of {key!r} are not a tuple and a dict")
    if len(init_args) > len(_NVIDIA_POSITIONAL):
        raise ValueError(f"{path}: {len(init_args)} positional init args; a StyleGAN2 Generator takes at most "
                         f"{len(_NVIDIA_POSITIONAL)}")
    kwargs = {**dict(zip(_NVIDIA_POSITIONAL, _plain(list(init_args)))), **init_kwargs}
    config = GeneratorConfig.from_dict(kwargs)

    state_dict: dict[str, Tensor] = {}
    _collect_state_dict(net, "", state_dict)
    check_state_dict(config, state_dict, str(path))
    source = {
        "format": "nvidia-pickle",
        "key": used_key,
        "class_name": net.class_name,
        "persistence_version": net.version,
        "module_src_sha256": net.module_src_sha256,
        "init_kwargs": _jsonable(kwargs),
    }
    return LoadedCheckpoint(config, state_dict, source)


def load_nvidia_pickle(path: str | os.PathLike[str], key: str = "G_ema") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config_dict, state_dict)`` of the generator in an NVIDIA pickle, without running its code.

    ``config_dict`` is :meth:`GeneratorConfig.to_dict` (NVIDIA's kwargs layout); ``state_dict`` has NVIDIA's
    key names, loads into ``Generator.from_config(config_dict)`` with ``strict=True``. See
    :func:`read_nvidia_pickle` for errors.
    """
    loaded = read_nvidia_pickle(path, key)
    return loaded.config.to_dict(), loaded.state_dict


# ---------------------------------------------------------------------------------------------------------
# Rosinality checkpoints
# ---------------------------------------------------------------------------------------------------------


def rosinality_key_map(n_mlp: int, img_resolution: int) -> dict[str, tuple[str, str]]:
    """Rosinality ``Generator`` key -> ``(our key, transform)``.

    Transforms: ``'same'``; ``'drop0'`` (modulated-conv weight ``[1, O, I, k, k]`` -> ``[O, I, k, k]``, const
    ``[1, C, 4, 4]`` -> ``[C, 4, 4]``); ``'scalar'`` (``noise.weight [1]`` -> ``noise_strength []``);
    ``'flat'`` (ToRGB bias ``[1, C, 1, 1]`` -> ``[C]``); ``'noise'`` (``[1, 1, R, R]`` -> ``noise_const [R, R]``).

    Rosinality -> ours (NVIDIA):

    - ``style.{i+1}.weight/bias`` -> ``mapping.fc{i}.weight/bias``
    - ``input.input`` -> ``synthesis.b4.const``; ``conv1.*`` -> ``synthesis.b4.conv1.*``;
      ``to_rgb1.*`` -> ``synthesis.b4.torgb.*``
    - ``convs.{2k}.*`` / ``convs.{2k+1}.*`` / ``to_rgbs.{k}.*`` -> ``synthesis.b{2**(k+3)}.conv0.*`` /
      ``.conv1.*`` / ``.torgb.*``
    - inside a layer: ``conv.weight`` -> ``weight``; ``conv.modulation.weight/bias`` -> ``affine.weight/bias``;
      ``noise.weight`` -> ``noise_strength``; ``activate.bias`` (styled convs) or ``bias`` (ToRGB) -> ``bias``
    - ``noises.noise_0`` -> ``synthesis.b4.conv1.noise_const``; ``noises.noise_{2k+1}`` / ``noise_{2k+2}`` ->
      ``synthesis.b{2**(k+3)}.conv0`` / ``.conv1.noise_const``
    - ``latent_avg`` (top level of the checkpoint, handled by :func:`read_rosinality`) -> ``mapping.w_avg``

    Not mapped (checked by :func:`read_rosinality` to be 4x our filter, then dropped): the blur kernels
    ``convs.{2k}.conv.blur.kernel`` and ``to_rgbs.{k}.upsample.kernel``. Our ``resample_filter`` buffers are
    generated from ``[1, 3, 3, 1]``.
    """
    out: dict[str, tuple[str, str]] = {}
    for i in range(n_mlp):
        out[f"style.{i + 1}.weight"] = (f"mapping.fc{i}.weight", "same")
        out[f"style.{i + 1}.bias"] = (f"mapping.fc{i}.bias", "same")
    out["input.input"] = ("synthesis.b4.const", "drop0")

    def styled(src: str, dst: str) -> None:
        out[f"{src}.conv.weight"] = (f"{dst}.weight", "drop0")
        out[f"{src}.conv.modulation.weight"] = (f"{dst}.affine.weight", "same")
        out[f"{src}.conv.modulation.bias"] = (f"{dst}.affine.bias", "same")
        out[f"{src}.noise.weight"] = (f"{dst}.noise_strength", "scalar")
        out[f"{src}.activate.bias"] = (f"{dst}.bias", "same")

    def torgb(src: str, dst: str) -> None:
        out[f"{src}.conv.weight"] = (f"{dst}.weight", "drop0")
        out[f"{src}.conv.modulation.weight"] = (f"{dst}.affine.weight", "same")
        out[f"{src}.conv.modulation.bias"] = (f"{dst}.affine.bias", "same")
        out[f"{src}.bias"] = (f"{dst}.bias", "flat")

    styled("conv1", "synthesis.b4.conv1")
    torgb("to_rgb1", "synthesis.b4.torgb")
    out["noises.noise_0"] = ("synthesis.b4.conv1.noise_const", "noise")
    for k in range(int(math.log2(img_resolution)) - 2):
        block = f"synthesis.b{2 ** (k + 3)}"
        styled(f"convs.{2 * k}", f"{block}.conv0")
        styled(f"convs.{2 * k + 1}", f"{block}.conv1")
        torgb(f"to_rgbs.{k}", f"{block}.torgb")
        out[f"noises.noise_{2 * k + 1}"] = (f"{block}.conv0.noise_const", "noise")
        out[f"noises.noise_{2 * k + 2}"] = (f"{block}.conv1.noise_const", "noise")
    return out


_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "same": lambda t: t,
    "drop0": lambda t: t.reshape(t.shape[1:]) if t.ndim >= 1 and t.shape[0] == 1 else t,
    "scalar": lambda t: t.reshape([]) if t.numel() == 1 else t,
    "flat": lambda t: t.reshape(-1),
    "noise": lambda t: t.reshape(t.shape[-2:]) if t.ndim == 4 and t.shape[:2] == (1, 1) else t,
}


def _infer_rosinality_config(sd: Mapping[str, Tensor], args: Any, source: str) -> GeneratorConfig:
    """n_mlp, style_dim, resolution and the channel rule from tensor shapes."""
    if "style.1.weight" not in sd or "input.input" not in sd:
        raise ValueError(f"{source}: not a rosinality StyleGAN2 generator state dict (no style.1.weight / input.input)")
    n_mlp = 0
    while f"style.{n_mlp + 1}.weight" in sd:
        n_mlp += 1
    style_dim = int(sd["style.1.weight"].shape[1])
    num_up = 0
    while f"to_rgbs.{num_up}.conv.weight" in sd:
        num_up += 1
    img_resolution = 2 ** (num_up + 2)
    channels = {4: int(sd["input.input"].shape[1])}
    for k in range(num_up):
        weight = sd.get(f"convs.{2 * k}.conv.weight")
        if weight is None or weight.ndim != 5:
            raise ValueError(f"{source}: convs.{2 * k}.conv.weight missing or not [1, O, I, k, k]")
        channels[2 ** (k + 3)] = int(weight.shape[1])
    channel_max = max(channels.values())
    bases = [c * res for res, c in channels.items() if c < channel_max]
    cm = getattr(args, "channel_multiplier", None) if args is not None else None
    if isinstance(cm, int) and cm > 0:
        bases.insert(0, 16384 * cm)  # rosinality's table is min(16384 * multiplier // res, 512)
    channel_base = bases[0] if bases else channel_max * img_resolution
    bad = [res for res, c in channels.items() if min(channel_base // res, channel_max) != c]
    if bad:
        raise ValueError(f"{source}: channels per resolution {channels} do not follow min(channel_base // res, "
                         "channel_max) for any channel_base; this generator cannot be expressed in NVIDIA's layout")
    lr_mlp = getattr(args, "lr_mlp", None) if args is not None else None
    return GeneratorConfig(
        img_resolution=img_resolution, z_dim=style_dim, c_dim=0, w_dim=style_dim, img_channels=3,
        mapping={"num_layers": n_mlp, "lr_multiplier": float(lr_mlp) if lr_mlp else 0.01},
        synthesis={"channel_base": channel_base, "channel_max": channel_max, "num_fp16_res": 0, "conv_clamp": None},
    )


def _estimate_w_avg(config: GeneratorConfig, state_dict: Mapping[str, Tensor], num_samples: int) -> Tensor:
    """Mean of ``mapping(z)`` over ``num_samples`` z from a seeded generator (seed 0)."""
    gen = Generator.from_config(config).eval().requires_grad_(False)
    gen.load_state_dict(state_dict, strict=True)
    z = torch.randn([num_samples, config.z_dim], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return gen.mapping(z, None, skip_w_avg_update=True)[:, 0].mean(dim=0)


def read_rosinality(path: str | os.PathLike[str], key: str = "g_ema") -> LoadedCheckpoint:
    """Read a rosinality/stylegan2-pytorch checkpoint with ``torch.load(weights_only=True)`` and rename it.

    Accepts training checkpoints (``{'g', 'd', 'g_ema', 'g_optim', 'd_optim', 'args', ...}``), converted
    ones (``{'g_ema', 'latent_avg'}``) and a bare generator state dict. A missing ``latent_avg`` is estimated
    as the mean of 4096 mapped z (seed 0), as rosinality's ``mean_latent(4096)`` does, and noted.

    Architecture differences (rosinality vs NVIDIA; none changes the parameters, all are float rounding):
    rosinality multiplies the modulated weights by ``1/sqrt(fan_in)`` before demodulating (NVIDIA does not;
    the two agree except that the demodulation eps ``1e-8`` is then relatively ``fan_in`` times larger), and
    applies the ToRGB gain to the weight instead of the styles; truncation is ``a + psi*(w - a)`` instead
    of ``lerp``. Rosinality has no ``conv_clamp`` and runs in fp32: the converted config sets
    ``conv_clamp=None`` and ``num_fp16_res=0``.
    """
    path = Path(path)
    allow = [argparse.Namespace]  # training checkpoints pickle their argparse args
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(torch.serialization, "safe_globals"):
                with torch.serialization.safe_globals(allow):
                    ckpt = torch.load(path, map_location="cpu", weights_only=True)
            else:  # torch < 2.5
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{path}: refused by torch.load(weights_only=True): {exc}") from exc
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    if key in ckpt:
        sd, used_key = ckpt[key], key
    elif "input.input" in ckpt:
        sd, used_key = ckpt, None
    else:
        raise ValueError(f"{path}: no {key!r} entry; the checkpoint holds {sorted(map(str, ckpt))}")
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: {key!r} is a {type(sd).__name__}, not a state dict")
    args = ckpt.get("args")
    config = _infer_rosinality_config(sd, args, str(path))
    mapping = rosinality_key_map(config.mapping.num_layers, config.img_resolution)

    reference_filter = setup_filter(config.synthesis.resample_filter)
    kernel_keys = re.compile(r"^(convs\.\d+\.conv\.blur\.kernel|to_rgbs\.\d+\.upsample\.kernel)$")
    out: dict[str, Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k in mapping:
            dst, transform = mapping[k]
            out[dst] = _TRANSFORMS[transform](v)
        elif kernel_keys.match(k):
            if tuple(v.shape) != tuple(reference_filter.shape) or not torch.allclose(v.float() / 4, reference_filter):
                raise ValueError(f"{path}: {k} is not the [1, 3, 3, 1] blur kernel (times 4) this generator uses")
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"{path}: unknown rosinality key(s): {', '.join(sorted(unknown)[:8])}")

    # Buffers rosinality does not store: our resample filters.
    for name in expected_shapes(config):
        if name.endswith("resample_filter"):
            out[name] = reference_filter.clone()

    notes = []
    latent_avg = ckpt.get("latent_avg")
    if isinstance(latent_avg, Tensor):
        out["mapping.w_avg"] = latent_avg.reshape(-1).float()
        w_avg_source = "latent_avg"
    else:
        out["mapping.w_avg"] = torch.zeros([config.w_dim])
        out["mapping.w_avg"] = _estimate_w_avg(config, out, ROSINALITY_MEAN_LATENT_SAMPLES)
        w_avg_source = f"estimated: mean of mapping(z) over {ROSINALITY_MEAN_LATENT_SAMPLES} z (seed 0)"
        notes.append(f"the checkpoint has no latent_avg; mapping.w_avg was {w_avg_source}, as rosinality's "
                     "mean_latent(4096) does, so truncation differs slightly from any other estimate")
    check_state_dict(config, out, str(path))
    source = {"format": "rosinality", "key": used_key, "w_avg_source": w_avg_source,
              "args": _jsonable(vars(args)) if isinstance(args, argparse.Namespace) else None}
    return LoadedCheckpoint(config, out, source, notes)


def load_rosinality(path: str | os.PathLike[str], key: str = "g_ema") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config_dict, state_dict)`` in NVIDIA naming from a rosinality ``.pt``; see :func:`read_rosinality`."""
    loaded = read_rosinality(path, key)
    return loaded.config.to_dict(), loaded.state_dict


# ---------------------------------------------------------------------------------------------------------
# Conversion and loading
# ---------------------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike[str]) -> str:
    """``'rosinality'`` for ``torch.save`` files (zip or legacy), ``'nvidia'`` for other pickles."""
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY_MAGIC))
    if head.startswith(b"PK\x03\x04") or head == _TORCH_LEGACY_MAGIC:
        return "rosinality"
    if head[:1] == b"\x80":
        return "nvidia"
    raise ValueError(f"{path}: neither a pickle nor a torch.save archive")


def _output_stem(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".safetensors", ".json") else p


def output_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``OUT`` (or ``OUT.safetensors`` / ``OUT.json``) -> ``(OUT.safetensors, OUT.json)``."""
    stem = _output_stem(path)
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def convert(in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], source_format: str = "auto",
            key: str | None = None) -> dict[str, Any]:
    """Convert a checkpoint to ``OUT.safetensors`` (the state dict, contiguous, dtypes as stored) and
    ``OUT.json`` (config, source format, SHA-256 of input and output).

    Args:
        in_path: NVIDIA ``.pkl`` or rosinality ``.pt``.
        out_path: ``OUT``, ``OUT.safetensors`` or ``OUT.json``; both files are written (atomically).
        source_format: ``'auto'`` (by file signature), ``'nvidia'`` or ``'rosinality'``.
        key: the network to take (default ``'G_ema'`` / ``'g_ema'``).

    Returns:
        The JSON record that was written.
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"source_format={source_format!r} is not allowed; choose one of {SOURCE_FORMATS}")
    in_path = Path(in_path)
    fmt = detect_format(in_path) if source_format == "auto" else source_format
    if fmt == "nvidia":
        loaded = read_nvidia_pickle(in_path, key or "G_ema")
    else:
        loaded = read_rosinality(in_path, key or "g_ema")

    source = {"file_name": in_path.name, "sha256": sha256_file(in_path), "size_bytes": in_path.stat().st_size,
              **loaded.source}
    return write_generator(loaded.state_dict, loaded.config, out_path, source=source, notes=loaded.notes)


def write_generator(state_dict: Mapping[str, Tensor], config: GeneratorConfig, out_path: str | os.PathLike[str], *,
                    source: Mapping[str, Any], notes: Any = ()) -> dict[str, Any]:
    """Write ``OUT.safetensors`` (the state dict, contiguous, dtypes as given) and ``OUT.json`` (config, source,
    SHA-256 of the weights), both atomically and world-readable: the format :func:`load_generator` reads. Used by
    :func:`convert`, :func:`save_generator` and the zoo's StyleGAN2 export. Returns the JSON record."""
    check_state_dict(config, state_dict, str(out_path))
    st_path, json_path = output_paths(out_path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): each tensor owns its bytes (safetensors refuses shared or strided storage).
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()}
    tmp = st_path.with_name(st_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    os.chmod(tmp, 0o644)  # safetensors writes 0600; weights are meant to be shared (package data, caches)
    os.replace(tmp, st_path)

    dtypes = collections.Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    record = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": "stylegan2",
        "config": config.to_dict(),
        "num_ws": config.num_ws,
        "source": dict(source),
        "weights": {"file": st_path.name, "sha256": sha256_file(st_path), "num_tensors": len(tensors),
                    "num_elements": sum(t.numel() for t in tensors.values()), "dtypes": dict(dtypes),
                    "size_bytes": st_path.stat().st_size},
        "notes": list(notes),
    }
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    return record


def save_generator(generator: Generator, out_path: str | os.PathLike[str], *,
                   source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Save a :class:`Generator` (e.g. one fine-tuned by pivotal tuning) in the converted format, dtypes as they
    are; ``load_generator(out_path)`` gives it back. ``source`` is free-form provenance for the record."""
    return write_generator(generator.state_dict(), generator.config, out_path,
                           source={"format": "dragrt", **dict(source or {})})


def load_generator(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                   verify: bool = True) -> Generator:
    """Load a converted generator (the normal way to load one).

    Args:
        path: ``OUT``, ``OUT.safetensors`` or ``OUT.json`` written by :func:`convert`, a folder holding
            ``generator.json`` + ``generator.safetensors``, or ``zoo:<name>``.
        device: where the weights go.
        verify: check the SHA-256 of the safetensors file against the JSON record (about 1 s per GB).

    Returns:
        The :class:`Generator` in eval mode with ``requires_grad`` off on every parameter (the editing engines
        optimise latents only; turn it back on for fine-tuning). ``gen.checkpoint_record`` holds the JSON record.
    """
    from dragrt.zoo.registry import resolve

    path = resolve(path)  # "zoo:<name>" -> the shipped folder
    if path.is_dir():
        path = path / "generator"  # a folder holding generator.json + generator.safetensors (the zoo's layout)
    st_path, json_path = output_paths(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"load_generator: {json_path} does not exist; expected OUT.json + OUT.safetensors "
                                "written by `dragrt convert stylegan2` (or a zoo:<name> / folder holding generator.*)")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT_NAME or not isinstance(record.get("format_version"), int):
        raise ValueError(f"{json_path}: not a {FORMAT_NAME} record")
    if record["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{json_path}: format_version {record['format_version']} is newer than this dragrt "
                         f"reads ({FORMAT_VERSION})")
    config = GeneratorConfig.from_dict(record["config"])
    if verify:
        want = record.get("weights", {}).get("sha256")
        got = sha256_file(st_path)
        if want != got:
            raise ValueError(f"{st_path}: SHA-256 {got} does not match the record's {want}")
    state_dict = load_file(str(st_path), device=str(device))
    with torch.device("meta"):
        gen = Generator.from_config(config)
    gen.load_state_dict(state_dict, strict=True, assign=True)
    gen.checkpoint_record = record
    return gen.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    """``dragrt convert stylegan2 IN OUT [--format auto|nvidia|rosinality] [--key NAME]``.

    Exit codes: 0 written, 1 bad input, 2 refused as unsafe.
    """
    parser = argparse.ArgumentParser(
        prog="dragrt convert stylegan2",
        description="Convert a StyleGAN2 checkpoint (NVIDIA .pkl or rosinality .pt) to OUT.safetensors + "
                    "OUT.json without running code from it.")
    parser.add_argument("input", help="NVIDIA .pkl or rosinality .pt")
    parser.add_argument("output", help="OUT: writes OUT.safetensors and OUT.json")
    parser.add_argument("--format", choices=SOURCE_FORMATS, default="auto", help="source format (default: auto)")
    parser.add_argument("--key", default=None, help="network to take (default: G_ema / g_ema)")
    args = parser.parse_args(argv)
    if not Path(args.input).is_file():
        print(f"{parser.prog}: error: input {args.input}: no such file (a NVIDIA .pkl or rosinality .pt)",
              file=sys.stderr)
        return 1
    try:
        record = convert(args.input, args.output, source_format=args.format, key=args.key)
    except UnsafeCheckpointError as exc:
        print(f"{parser.prog}: refused: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    st_path, json_path = output_paths(args.output)
    cfg = record["config"]
    print(f"{record['source']['format']} -> {st_path} + {json_path}: {cfg['img_resolution']}px, "
          f"num_ws {record['num_ws']}, {record['weights']['num_elements']:,} weights")
    for note in record["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
