"""pytest-benchmark micro-benchmarks of the kernels (GPU only: marked ``cuda``; they assert results, never times).

Run on a GPU machine:
    pytest tests/benchmarks --benchmark-json=OUT/micro.json

pytest-benchmark times with the host clock and does not wait for the GPU, so every target is wrapped with
``harness.sync_wrapper`` (a CUDA synchronise after each call): these numbers include launch and sync
overhead, unlike the CUDA-event scenarios of ``dragrt bench run kernels``.
"""

from __future__ import annotations

import pytest
import torch

from dragrt.bench import harness
from dragrt.kernels import bilinear_sample, masked_blend, patch_track, use_kernels

pytestmark = pytest.mark.cuda

IMPLS = ["triton", "reference"]


def _run(benchmark, step):
    # Warm-up rounds keep Triton's first-call compilation out of the statistics.
    return benchmark.pedantic(harness.sync_wrapper(step), rounds=50, warmup_rounds=5)


@pytest.fixture
def draggan_feat():
    torch.manual_seed(0)
    return torch.randn(1, 256, 128, 128, device="cuda", requires_grad=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_bilinear_sample_fwd_bwd_draggan512(benchmark, draggan_feat, impl) -> None:
    pts = torch.rand(10 * 29, 2, device="cuda") * 500

    def step():
        with use_kernels(impl):
            out = bilinear_sample(draggan_feat, pts, (512, 512))
            return torch.autograd.grad(out.float().sum(), draggan_feat)[0]

    grad = _run(benchmark, step)
    assert grad.shape == draggan_feat.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_patch_track_draggan512_10_handles(benchmark, draggan_feat, impl) -> None:
    feat = draggan_feat.detach()
    centers = (torch.rand(10, 2, device="cuda") * 480 + 16).round()
    refs = torch.randn(10, 256, device="cuda")

    def step():
        with use_kernels(impl):
            return patch_track(feat, refs, centers, 12, "l2", (512, 512))

    new = _run(benchmark, step)
    assert (new - centers).abs().max() <= 12


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_blend_4x4x128x128(benchmark, impl) -> None:
    fg, src, noise = torch.randn(3, 4, 4, 128, 128, device="cuda", dtype=torch.float16).unbind(0)
    mask = (torch.rand(1, 1, 128, 128, device="cuda") > 0.5).half()

    def step():
        with use_kernels(impl):
            return masked_blend(fg, src, mask, 0.35, noise)

    out = _run(benchmark, step)
    assert out.shape == fg.shape
