"""Shared test setup: offline hubs, the Triton interpreter on CPU machines, markers, fixed seeds."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dragrt.runtime.config import cuda_usable  # noqa: E402

HAS_CUDA = cuda_usable()
if not HAS_CUDA:
    # Without a GPU the Triton kernels run through Triton's interpreter, on CPU tensors (tiny shapes).
    # Must be set before the first Triton kernel module is imported (they are imported lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-cuda", action="store_true", default=False,
                     help="fail (instead of skip) tests marked cuda when no GPU is usable; "
                          "also set by DRAGRT_REQUIRE_CUDA=1")


def _tensorrt_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return ("TensorRT is not installed here (its PyPI packages fetch their libraries from NVIDIA at "
                f"install time, which this environment cannot reach): {type(exc).__name__}")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "cuda" in item.keywords and not HAS_CUDA:
        require = item.config.getoption("--require-cuda") or os.environ.get("DRAGRT_REQUIRE_CUDA", "0") not in ("", "0")
        if require:
            pytest.fail("needs a CUDA GPU, and --require-cuda / DRAGRT_REQUIRE_CUDA=1 forbids skipping it")
        pytest.skip("needs a CUDA GPU (run on the device machine: bash bench/gpu.sh)")
    if "trt" in item.keywords:
        reason = _tensorrt_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture(autouse=True)
def _exact_float32() -> None:
    # Parity tests compare float32 paths: cuDNN and cuBLAS default to TF32 on Ampere and later, which
    # rounds float32 convolutions to 10-bit mantissas (measured on an H200: 2.5e-3 differences).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def grad_calls(monkeypatch):
    """A list that grows by one on every ``torch.autograd.grad`` call of the test (clear it between phases):
    tells whether a step took its backward."""
    calls: list[int] = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


class _ConvKernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the weight shape of every ``aten.convolution`` run inside (``.shapes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def conv_kernels() -> type[_ConvKernels]:
    """A class of context managers, each recording the kernel shape of every convolution run inside it
    (``with (rec := conv_kernels()): ...; rec.shapes``)."""
    return _ConvKernels


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests (opt in with ``pytestmark = pytest.mark.usefixtures(...)``).

    Small models gain nothing from two threads, and on a busy 2-core machine the OpenMP workers wait on
    each other: measured here, a tiny UNet forward took 1.5 s with 2 threads and 0.03 s with 1, a 16-step
    drag 7-20 s against 0.7 s, a 512 px TAESD round trip 7.1 s against 4.4 s.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device() -> torch.device:
    """The fast device of this machine: CUDA when usable, else the CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def aot_eager_compile(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``torch.compile`` with the aot_eager backend (dynamo + AOTAutograd, no code generation: seconds on a CPU,
    where inductor would build C++ for minutes), dynamo's caches reset around the test; yields the list of the
    modes asked for."""
    original, modes = torch.compile, []

    def compile_aot_eager(fn, *, mode=None, dynamic=None, **kwargs):
        modes.append(mode)
        return original(fn, backend="aot_eager", dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    yield modes
    torch._dynamo.reset()
