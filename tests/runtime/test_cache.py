"""content_hash, module_fingerprint and TensorCache (memory LRU + safetensors on disk) on the CPU."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dragrt.runtime.cache import CacheWarning, TensorCache, content_hash, module_fingerprint, store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- content_hash


def test_content_hash_is_stable_across_runs() -> None:
    # A golden value: the encoding must never change silently (disk caches outlive processes).
    value = content_hash("a", 1, 2.5, None, True, b"x", [1, 2], {"k": "v"}, torch.arange(4, dtype=torch.int32))
    assert value == content_hash("a", 1, 2.5, None, True, b"x", (1, 2), {"k": "v"}, torch.arange(4, dtype=torch.int32))
    assert value == "0352ea973b90c0febf33eedfcc18bf7738dd2c08e0c4e944abee556ecb0c02c4"


def test_content_hash_structure_and_types_matter() -> None:
    assert content_hash("ab", "c") != content_hash("a", "bc")
    assert len({content_hash(1), content_hash(1.0), content_hash(True), content_hash("1"), content_hash(b"1")}) == 5
    assert content_hash({"a": 1, "b": 2}) == content_hash({"b": 2, "a": 1})
    assert content_hash([1, 2]) == content_hash((1, 2))  # JSON round trips keep their key
    assert content_hash([1, 2]) != content_hash([2, 1])
    assert content_hash(0.7) != content_hash(0.7000000001)
    assert content_hash(None) != content_hash([])


def test_content_hash_tensors_by_value_dtype_and_shape() -> None:
    t = torch.randn(3, 4)
    assert content_hash(t) == content_hash(t.clone().requires_grad_(True))
    assert content_hash(t) == content_hash(t.t().contiguous().t())  # strides do not matter, values do
    assert content_hash(t) != content_hash(t.double())
    assert content_hash(t) != content_hash(t.reshape(4, 3))
    one = t.clone()
    one[1, 2] += 1e-6
    assert content_hash(t) != content_hash(one)
    b = torch.randn(5, dtype=torch.bfloat16)
    assert content_hash(b) == content_hash(b.clone()) != content_hash(b.float())
    assert content_hash(torch.empty(0)) != content_hash(torch.empty(0, 1))
    if torch.cuda.is_available():
        assert content_hash(t.cuda()) == content_hash(t)


def test_content_hash_arrays_images_dataclasses() -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_hash(a) == content_hash(a.copy()) != content_hash(a.astype(np.int16))
    assert content_hash(a) != content_hash(torch.from_numpy(a))  # tagged by kind
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    img2 = img.copy()
    img2.putpixel((3, 5), (0, 0, 1))
    assert content_hash(img) == content_hash(img.copy()) != content_hash(img2)

    @dataclasses.dataclass
    class Cfg:
        steps: int = 50
        strength: float = 0.7

    assert content_hash(Cfg()) == content_hash(Cfg()) != content_hash(Cfg(strength=0.8))
    assert content_hash(Cfg()) != content_hash({"steps": 50, "strength": 0.7})


def test_content_hash_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="builtins.set"):
        content_hash({1, 2})
    with pytest.raises(TypeError, match="object"):
        content_hash([1, {"x": object()}])
    with pytest.raises(TypeError, match="meta"):
        content_hash(torch.empty(2, device="meta"))


# ---------------------------------------------------------------------------------------------- module_fingerprint


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def test_module_fingerprint_sensitivity() -> None:
    a, b = _net(), _net()
    assert module_fingerprint(a) == module_fingerprint(b) == module_fingerprint(copy.deepcopy(a))
    with torch.no_grad():
        b[2].weight[1, 3] += 1e-3
    assert module_fingerprint(b) != module_fingerprint(a)
    c = _net()
    c[1].running_mean[0] = 5.0  # buffers count too
    assert module_fingerprint(c) != module_fingerprint(a)

    class Compiled(torch.nn.Module):  # what torch.compile(module) returns: the module under _orig_mod
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    assert module_fingerprint(Compiled(a)) == module_fingerprint(a)  # compile wrapper looked through
    assert module_fingerprint(_net().double()) != module_fingerprint(a)


def test_module_fingerprint_rehashes_only_changed_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    first = module_fingerprint(net)
    calls = []
    real = store._feed_tensor
    monkeypatch.setattr(store, "_feed_tensor", lambda h, t: (calls.append(tuple(t.shape)), real(h, t)))
    assert module_fingerprint(net) == first
    assert calls == []  # nothing changed: nothing hashed
    saved = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    changed = module_fingerprint(net)
    assert changed != first and calls == [(8, 4)]
    with torch.no_grad():
        net[0].weight.copy_(saved)  # restored in place (as fused_lora does): back to the first fingerprint
    calls.clear()
    assert module_fingerprint(net) == first and calls == [(8, 4)]
    calls.clear()
    assert module_fingerprint(net, refresh=True) == first
    assert len(calls) == len(list(net.parameters())) + len(list(net.buffers()))


# ---------------------------------------------------------------------------------------------- TensorCache


def test_memory_cache_lru_and_copies() -> None:
    cache = TensorCache("unit", max_items=2)
    x = torch.arange(6.0)
    cache.put("a", {"x": x}, {"note": "first"})
    x.zero_()  # the cache holds a copy
    got = cache.get("a")
    assert torch.equal(got["x"], torch.arange(6.0))
    got["x"].fill_(7)  # and hands out copies
    assert torch.equal(cache.get("a")["x"], torch.arange(6.0))
    assert cache.metadata("a") == {"note": "first"}
    cache.put("b", {"x": x})
    cache.get("a")  # a is now the most recent
    cache.put("c", {"x": x})
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.get("b") is None and cache.misses == 1
    cache.clear()
    assert cache.get("a") is None


def test_disk_round_trip(tmp_path) -> None:
    tensors = {"f32": torch.randn(2, 3), "bf16": torch.randn(4, dtype=torch.bfloat16),
               "i64": torch.arange(5), "scalar": torch.tensor(3.5)}
    TensorCache("inv", tmp_path).put("k1", tensors, {"prompt": "a cat"})
    path = tmp_path / "inv" / "k1.safetensors"
    assert path.is_file() and not list((tmp_path / "inv").glob("*.tmp"))
    fresh = TensorCache("inv", tmp_path)  # a new session: memory empty
    got = fresh.get("k1", device="cpu")
    assert fresh.hits_disk == 1
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    assert fresh.metadata("k1") == {"prompt": "a cat"}
    fresh.get("k1")
    assert fresh.hits_memory == 1
    assert fresh.keys() == ["k1"]
    fresh.delete("k1")
    assert not path.exists() and fresh.get("k1") is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "foreign"])
def test_damaged_files_are_dropped_with_a_warning(tmp_path, damage: str) -> None:
    TensorCache("ns", tmp_path).put("key", {"x": torch.randn(64)})
    path = tmp_path / "ns" / "key.safetensors"
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) - 17])
    elif damage == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:  # a valid safetensors file that this cache did not write
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    cache = TensorCache("ns", tmp_path)
    with pytest.warns(CacheWarning, match="ignoring unreadable cache file"):
        assert cache.get("key") is None
    assert not path.exists()
    cache.put("key", {"x": torch.ones(1)})  # the session carries on
    assert torch.equal(TensorCache("ns", tmp_path).get("key")["x"], torch.ones(1))


def test_unwritable_directory_keeps_memory_entry(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = TensorCache("ns", blocker)
    with pytest.warns(CacheWarning, match="could not write"):
        cache.put("key", {"x": torch.ones(2)})
    assert torch.equal(cache.get("key")["x"], torch.ones(2))


def test_cache_argument_checks(tmp_path) -> None:
    cache = TensorCache("ns", tmp_path)
    with pytest.raises(ValueError, match="key"):
        cache.put("../escape", {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="reserved"):
        cache.put("k", {"x": torch.ones(1)}, {"dragrt.checksum": "x"})
    with pytest.raises(ValueError, match="metadata"):
        cache.put("k", {"x": torch.ones(1)}, {"n": 3})
    with pytest.raises(ValueError, match="namespace"):
        TensorCache("a/b")
    with pytest.raises(ValueError, match="max_items"):
        TensorCache("ns", max_items=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put("k", {"x": torch.ones(1)})
    (tmp_path / "ns" / ".k.stale.tmp").write_bytes(b"partial")
    cache.clear()
    assert os.listdir(tmp_path / "ns") == []
