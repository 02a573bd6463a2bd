"""Twice-differentiable convolutions: values, first and second derivatives against F.conv2d / F.conv_transpose2d
(the reference) and against finite differences (float64, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dragrt.runtime.models import conv_double_backward as cdb

# (transposed, in channels, out channels, kernel, stride, padding, output padding, groups, size)
CASES = [
    (False, 4, 6, 3, 1, 1, 0, 1, 7),
    (False, 4, 6, 3, 2, 0, 0, 1, 9),  # odd size, stride 2: the adjoint needs an output padding of 0
    (False, 4, 6, 3, 2, 1, 0, 1, 8),  # even size: output padding 1
    (False, 6, 6, 4, 2, 0, 0, 6, 10),  # depthwise, strided (the FIR blurs of upfirdn2d)
    (False, 4, 4, 1, 1, 0, 0, 2, 5),
    (True, 4, 6, 3, 2, 0, 0, 1, 5),  # the generator's upsampling convolution
    (True, 4, 6, 3, 2, 1, 1, 2, 4),
]


def _make(case, seed=0):
    transposed, cin, cout, k, stride, pad, opad, groups, size = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, size, size, generator=g, dtype=torch.float64, requires_grad=True)
    shape = (cin, cout // groups, k, k) if transposed else (cout, cin // groups, k, k)
    w = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w


def _op(case, reference: bool):
    transposed, _, _, _, stride, pad, opad, groups, _ = case

    def f(x, w):
        if reference:
            if transposed:
                return F.conv_transpose2d(x, w, None, stride, pad, opad, groups)
            return F.conv2d(x, w, None, stride, pad, 1, groups)
        with cdb.enabled():
            if transposed:
                return cdb.conv_transpose2d(x, w, stride, pad, opad, groups)
            return cdb.conv2d(x, w, stride, pad, groups)
    return f


@pytest.mark.parametrize("case", CASES)
def test_values_and_both_orders_of_derivative_match_the_reference(case):
    x, w = _make(case)
    ref, fast = _op(case, True), _op(case, False)
    y_ref, y = ref(x, w), fast(x, w)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y_ref)

    def penalty(f):  # an R1-like penalty: the squared gradient w.r.t. the input and the weight, differentiated
        gx, gw = torch.autograd.grad((f(x, w) * dy).sum(), (x, w), create_graph=True)
        p = gx.square().sum() + 0.5 * gw.square().sum() + (gx * x).sum()
        return (gx, gw, *torch.autograd.grad(p, (x, w)))

    for a, b in zip(penalty(fast), penalty(ref)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]])
def test_gradgradcheck_against_finite_differences(case):
    x, w = _make(case, seed=1)
    fast = _op(case, False)
    assert torch.autograd.gradcheck(fast, (x, w))
    assert torch.autograd.gradgradcheck(fast, (x, w))


def test_a_constant_filter_gets_no_weight_gradient_and_no_per_group_calls(conv_kernels):
    """A strided depthwise blur with a constant filter (upfirdn2d's), differentiated twice: the reference issues
    one convolution per channel with a feature map as its kernel; this path only ever convolves with the filter."""
    channels = 8
    x = torch.randn(2, channels, 12, 12, dtype=torch.float64, requires_grad=True)
    f = torch.ones(channels, 1, 4, 4, dtype=torch.float64) / 16  # no grad: a buffer

    def second_derivative(on: bool):
        rec = conv_kernels()
        with cdb.enabled(on), rec:
            y = cdb.conv2d(x, f, stride=2, groups=channels)
            (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            (ggx,) = torch.autograd.grad(gx.square().sum(), x)
        return ggx, rec.shapes

    (ref, ref_shapes), (fast, fast_shapes) = second_derivative(False), second_derivative(True)
    torch.testing.assert_close(fast, ref)
    assert any(s[-1] > 4 for s in ref_shapes)
    assert fast_shapes and all(s == (channels, 1, 4, 4) for s in fast_shapes)


def test_off_by_default_and_outside_autograd():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(3, 2, 3, 3)
    assert not cdb.is_enabled()
    assert cdb.conv2d(x, w).grad_fn.name() == "ConvolutionBackward0"
    with cdb.enabled():
        assert cdb.is_enabled()
        assert "Conv" in cdb.conv2d(x, w).grad_fn.name() and cdb.conv2d(x, w).grad_fn.name() != "ConvolutionBackward0"
        with torch.no_grad():
            assert cdb.conv2d(x, w).grad_fn is None
        with cdb.enabled(False):
            assert not cdb.is_enabled()
        assert cdb.is_enabled()
    assert not cdb.is_enabled()
    with pytest.raises(ValueError, match="on must be True or False"):
        with cdb.enabled("yes"):
            pass
    with pytest.raises(ValueError, match="stride must be an int or a pair"), cdb.enabled():
        cdb.conv2d(x, w, stride=(1, 1, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_both_orders_match_the_reference_on_cuda(dtype):
    """cuDNN's kernels (fp16 as the StyleGAN2 trainer's top resolutions run), NCHW and channels-last inputs."""
    for case in CASES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x64, w64 = _make(case, seed=2)
            x = x64.detach().to("cuda", dtype).contiguous(memory_format=layout).requires_grad_(True)
            w = w64.detach().to("cuda", dtype).requires_grad_(True)
            dy = torch.randn_like(_op(case, True)(x, w))
            results = []
            for reference in (True, False):
                f = _op(case, reference)
                gx, gw = torch.autograd.grad((f(x, w) * dy).sum(), (x, w), create_graph=True)
                p = gx.float().square().sum() + gw.float().square().sum()
                results.append((gx, gw, *torch.autograd.grad(p, (x, w))))
            tol = 2e-2 if dtype == torch.float16 else 5e-3  # of the largest value (fp32 convolutions may use TF32)
            for a, b in zip(*results):
                err = (a.float() - b.float()).abs().max() / b.float().abs().max()
                assert err < tol, (case, layout, err.item())
