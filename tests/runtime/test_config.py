from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dragrt.runtime.config import RuntimeConfig, default_cache_dir


def test_defaults_resolve_on_this_machine() -> None:
    cfg = RuntimeConfig()
    dev = cfg.torch_device()
    assert dev.type in ("cpu", "cuda")
    assert cfg.torch_dtype() == (torch.float16 if dev.type == "cuda" else torch.float32)
    assert cfg.kernels == "auto" and cfg.compile_mode == "auto"
    assert cfg.resolved_compile_mode() == ("default" if dev.type == "cuda" else None)
    # the autotuning mode that composes with the engines' own CUDA graphs passes through as it is
    tuned = RuntimeConfig(device="cpu", compile_mode="max-autotune-no-cudagraphs")
    assert tuned.resolved_compile_mode() == "max-autotune-no-cudagraphs"


def test_aliases_and_paths() -> None:
    cfg = RuntimeConfig(device="cpu", dtype="bf16", cache_dir="~/x")
    assert cfg.dtype == "bfloat16" and cfg.torch_dtype() == torch.bfloat16
    assert cfg.cache_dir == Path("~/x").expanduser()


@pytest.mark.parametrize("field,value,message", [
    ("device", "gpu", "device='gpu' is not allowed"),
    ("device", "cuda:x", "device='cuda:x' is not allowed"),
    ("dtype", "float8", "dtype='float8' is not allowed; choose one of: auto, float32"),
    ("kernels", "cuda", "kernels='cuda' is not allowed; choose one of: auto, triton, reference"),
    ("compile_mode", "fast", "compile_mode='fast' is not allowed"),
    ("cache_dir", 3, "cache_dir must be a path"),
])
def test_bad_values_name_the_field_and_the_choices(field, value, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RuntimeConfig(**{field: value})


def test_replace_validates() -> None:
    cfg = RuntimeConfig(device="cpu")
    assert cfg.replace(kernels="reference").kernels == "reference"
    with pytest.raises(ValueError, match="unknown RuntimeConfig field"):
        cfg.replace(speed="max")
    with pytest.raises(ValueError, match="kernels="):
        cfg.replace(kernels="fastest")


def test_cuda_device_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU is usable"):
        RuntimeConfig(device="cuda").torch_device()


def test_cache_dir_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DRAGRT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DRAGRT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "dragrt"
