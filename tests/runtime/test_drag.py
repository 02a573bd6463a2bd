"""The static (kernel) forms of motion supervision and tracking equal the published code paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dragrt.kernels import bilinear_sample, use_kernels
from dragrt.runtime import drag

IMPLS = ["reference", "triton"]


def _xy(rc: list[list[int]], device) -> torch.Tensor:
    return torch.tensor([[c, r] for r, c in rc], dtype=torch.float32, device=device)


@pytest.mark.parametrize("impl", IMPLS)
def test_draggan_motion_loss_and_gradient_equal_the_renderer(device, impl) -> None:
    size = (512, 512)
    feat = torch.randn(1, 5, 128, 128, device=device, requires_grad=True)
    points = [[100, 200], [400, 37], [3, 508], [250, 250]]
    targets = [[130, 180], [380, 60], [40, 470], [250, 251]]  # the last is within 1 px: no motion term
    state = drag.DragGANLiteralState()
    lit_points = [list(p) for p in points]
    loss_lit, stop = drag.draggan_step_literal(feat, size, state, lit_points, targets, None, 20.0)
    assert not stop and lit_points == points  # first step: each handle tracks to itself
    (g_lit,) = torch.autograd.grad(loss_lit, feat)
    r1, _ = drag.draggan_radii(512)
    handles, tgts = _xy(points, device), _xy(targets, device)
    pad = torch.tensor([[10.0, 10.0]], device=device)
    handles = torch.cat([handles, pad])  # a padded slot, inactive
    tgts = torch.cat([tgts, pad + 50])
    active = torch.tensor([True, True, True, True, False], device=device)
    with use_kernels(impl):
        loss = drag.draggan_motion_loss(feat, handles, tgts, active, size, r1)
        (g,) = torch.autograd.grad(loss, feat)
    torch.testing.assert_close(loss, loss_lit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, g_lit, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_draggan_tracking_equals_the_renderer(device, impl) -> None:
    size = (512, 512)
    feat0 = torch.randn(1, 6, 128, 128, device=device)
    points = [[100, 200], [400, 37], [5, 500]]
    state = drag.DragGANLiteralState()
    drag.draggan_step_literal(feat0, size, state, [list(p) for p in points], points, None, 20.0)
    feat1 = feat0 + 0.3 * torch.randn_like(feat0)  # the features after an update
    lit_points = [list(p) for p in points]
    drag.draggan_step_literal(feat1, size, state, lit_points, points, None, 20.0)
    _, r2 = drag.draggan_radii(512)
    with use_kernels(impl):
        refs = bilinear_sample(feat0, _xy(points, device), size)[0]
        new = drag.draggan_track(feat1, refs, _xy(points, device), size, r2)
    assert new.cpu().tolist() == _xy(lit_points, "cpu").tolist()
    assert lit_points != points  # the noise moved at least one handle: the comparison is not vacuous


def test_draggan_disc_reproduces_the_linspace_quirk(device) -> None:
    """Far from the origin the reference's disc is shifted (its grid is linspace(0, H, H)); so is ours."""
    size = (512, 512)
    # Native size = image size and d = (1, 0): every sample lands on one pixel, so the rows that get a
    # gradient are exactly the disc's rows.
    feat = torch.randn(1, 1, 512, 512, device=device, requires_grad=True)
    handles = torch.tensor([[400.0, 400.0]], device=device)
    targets = torch.tensor([[450.0, 400.0]], device=device)
    with use_kernels("reference"):
        loss = drag.draggan_motion_loss(feat, handles, targets, torch.tensor([True], device=device), size, 3)
    (g,) = torch.autograd.grad(loss, feat)
    rows = g[0, 0].abs().sum(1).nonzero()[:, 0].tolist()
    assert rows == [397, 398, 399, 400, 401, 402]  # not the symmetric 398..402


def test_draggan_mask_term_matches_the_renderer(device) -> None:
    size = (64, 64)
    feat = torch.randn(1, 3, 16, 16, device=device, requires_grad=True)
    state = drag.DragGANLiteralState()
    mask = torch.zeros(64, 64, device=device)
    mask[:, 32:] = 1
    pts = [[20, 20]]
    loss_lit, _ = drag.draggan_step_literal(feat, size, state, pts, [[20, 20]], mask, 20.0)  # no motion term
    feat0 = feat.detach() + 0
    ours = drag.draggan_mask_loss(feat, feat0, mask[None, None], size, 20.0)
    torch.testing.assert_close(ours, torch.as_tensor(loss_lit, device=device, dtype=ours.dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_dragdiffusion_motion_loss_equals_drag_utils(device, impl) -> None:
    grid = (64, 64)
    feat = torch.randn(1, 7, 16, 16, device=device, requires_grad=True)
    f1 = F.interpolate(feat, grid, mode="bilinear")
    handles_rc = [torch.tensor([20.0, 30.0]), torch.tensor([0.0, 40.0]), torch.tensor([50.0, 50.0])]
    targets_rc = [torch.tensor([25.0, 22.0]), torch.tensor([10.0, 45.0]), torch.tensor([51.0, 50.0])]
    loss_lit = drag.dragdiffusion_motion_loss_literal(f1, [h.to(device) for h in handles_rc],
                                                      [t.to(device) for t in targets_rc])
    (g_lit,) = torch.autograd.grad(loss_lit, feat)
    hx = torch.stack([h.flip(0) for h in handles_rc]).to(device)
    tx = torch.stack([t.flip(0) for t in targets_rc]).to(device)
    with use_kernels(impl):
        loss = drag.dragdiffusion_motion_loss(feat, hx, tx, torch.ones(3, dtype=torch.bool, device=device), grid)
        (g,) = torch.autograd.grad(loss, feat)
    torch.testing.assert_close(loss, loss_lit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, g_lit, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_dragdiffusion_tracking_equals_drag_utils(device, impl) -> None:
    grid = (64, 64)
    feat0 = torch.randn(1, 9, 16, 16, device=device)
    feat1 = feat0 + 0.2 * torch.randn_like(feat0)
    init = [torch.tensor([20.0, 30.0]), torch.tensor([2.0, 60.0])]
    cur = [torch.tensor([22.0, 29.0]), torch.tensor([1.0, 62.0])]
    lit = drag.dragdiffusion_track_literal(F.interpolate(feat0, grid, mode="bilinear"),
                                           F.interpolate(feat1, grid, mode="bilinear"),
                                           [c.clone() for c in cur], init)
    with use_kernels(impl):
        refs = bilinear_sample(feat0, torch.stack([p.flip(0) for p in init]).to(device), grid)[0]
        new = drag.dragdiffusion_track(feat1, refs, torch.stack([p.flip(0) for p in cur]).to(device), grid)
    assert new.cpu().tolist() == [p.flip(0).tolist() for p in lit]
