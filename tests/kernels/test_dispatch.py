"""Dispatch: default, environment variable, context manager; declared support; errors with every reason."""

from __future__ import annotations

import pytest
import torch

from dragrt.kernels import dispatch
from dragrt.kernels.dispatch import KernelUnavailableError, use_kernels

OP = "test_scale_by_two"


@pytest.fixture
def toy_op():
    """A trivial op with a 'triton' implementation that needs a missing thing, and a reference."""
    dispatch._load_builtin_ops()
    dispatch.register(OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float64))(
        lambda x: x * 2)
    dispatch.register(OP, "triton", devices=("cuda",), dtypes=(torch.float32,), priority=10,
                      requirement=lambda dev: "the frobnicator is not installed")(lambda x: x * 2 + 0)
    yield OP
    dispatch._REGISTRY.pop(OP)


def test_auto_picks_the_first_implementation_that_fits(toy_op, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    impl = dispatch.select(toy_op, "cpu", torch.float32)
    assert impl.name == "reference"
    assert dispatch.current_choice(toy_op) == ("auto", "default")


def test_forced_implementation_that_cannot_run_lists_every_reason(toy_op, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with use_kernels("triton"):
        with pytest.raises(KernelUnavailableError) as err:
            dispatch.select(toy_op, "cpu", torch.float32)
    msg = str(err.value)
    assert "triton: the frobnicator is not installed" in msg
    assert "reference: usable" in msg
    assert "kernels='triton' (from context)" in msg


def test_dtype_refusal_is_explained(toy_op, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.raises(KernelUnavailableError, match="supports float32, float64, not float16"):
        dispatch.select(toy_op, "cpu", torch.float16)


def test_environment_variable_per_op_and_context_priority(toy_op, monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, f"triton,{toy_op}=reference")
    assert dispatch.current_choice(toy_op) == ("reference", dispatch.ENV_VAR)
    assert dispatch.current_choice("patch_track") == ("triton", dispatch.ENV_VAR)
    with use_kernels("auto"):
        assert dispatch.current_choice(toy_op) == ("auto", "context")
    with use_kernels("reference", **{toy_op: "triton"}):
        assert dispatch.current_choice(toy_op) == ("triton", "context")
        assert dispatch.current_choice("masked_blend") == ("reference", "context")


def test_bad_environment_value_names_the_variable(toy_op, monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="DRAGRT_KERNELS: 'cuda' is not allowed"):
        dispatch.select(toy_op, "cpu", torch.float32)
    with pytest.raises(ValueError, match="use_kernels"):
        with use_kernels("fast"):
            pass


def test_context_manager_restores_on_error(toy_op, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    with pytest.raises(RuntimeError):
        with use_kernels("reference"):
            raise RuntimeError("boom")
    assert dispatch.current_choice(toy_op) == ("auto", "default")


def test_builtin_ops_declare_triton_and_reference() -> None:
    table = dispatch.describe(("cpu", "cuda"))
    for op in ("bilinear_sample", "bilinear_sample_backward", "patch_track", "masked_blend"):
        assert set(table[op]) == {"triton", "reference"}
        assert table[op]["reference"]["cpu"] == "usable"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = dispatch.triton_requirement("cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_requirement("cpu") is None


def test_real_op_reports_why_triton_refuses(monkeypatch) -> None:
    """With the interpreter off and no GPU, forcing Triton on a CPU tensor fails with the reason."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs Triton on CUDA tensors; this checks the CPU refusal")
    from dragrt.kernels import bilinear_sample

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_kernels("triton"), pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        bilinear_sample(torch.randn(1, 2, 3, 3), torch.zeros(1, 2))


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select("patch_track", "cpu", torch.float32).name == "reference"
    with use_kernels("triton"):
        assert dispatch.select("patch_track", "cpu", torch.float32).name == "triton"
