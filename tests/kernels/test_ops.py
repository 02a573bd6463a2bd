"""The three ops against their references and against the literal reference-method code paths.

Every Triton test runs the real kernel: on a GPU natively, on a CPU through TRITON_INTERPRET=1 (set by
conftest), at small odd shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dragrt.kernels import bilinear_sample, masked_blend, patch_track, reference, use_kernels

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tolerance of an implementation against the reference op in the same dtype (both accumulate in float32
# and round once, so they may differ by about one rounding of the output): (atol, rtol).
TOL = {
    torch.float32: (2e-6, 2e-6),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --- literal reference-method code paths, written as the published code does them ---------------------------

def draggan_sample(feat: torch.Tensor, points_xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DragGAN: upsample the map to the image size (align_corners=False), grid_sample(align_corners=True)."""
    h, w = size
    up = F.interpolate(feat, size, mode="bilinear", align_corners=False)
    gx = points_xy[:, 0] / (w - 1) * 2 - 1
    gy = points_xy[:, 1] / (h - 1) * 2 - 1
    grid = torch.stack([gx, gy], -1)[None, None].expand(feat.shape[0], -1, -1, -1).to(feat.dtype)
    return F.grid_sample(up, grid, mode="bilinear", align_corners=True)[:, :, 0].transpose(1, 2)


def dragdiffusion_patch(feat_up: torch.Tensor, y1: float, y2: float, x1: float, x2: float) -> torch.Tensor:
    """DragDiffusion's hand-written bilinear interpolation of a shifted patch (rows [y1, y2), cols [x1, x2))."""
    x1f, x2f, y1f, y2f = math.floor(x1), math.floor(x2), math.floor(y1), math.floor(y2)
    x1c, x2c, y1c, y2c = x1f + 1, x2f + 1, y1f + 1, y2f + 1
    wa = (x1c - x1) * (y1c - y1)
    wb = (x1c - x1) * (y1 - y1f)
    wc = (x1 - x1f) * (y1c - y1)
    wd = (x1 - x1f) * (y1 - y1f)
    ia = feat_up[:, :, y1f:y2f, x1f:x2f]
    ib = feat_up[:, :, y1c:y2c, x1f:x2f]
    ic = feat_up[:, :, y1f:y2f, x1c:x2c]
    id_ = feat_up[:, :, y1c:y2c, x1c:x2c]
    return ia * wa + ib * wb + ic * wc + id_ * wd


def literal_track(feat: torch.Tensor, refs: torch.Tensor, centers_xy: torch.Tensor, r: int, metric: str,
                  size: tuple[int, int] | None) -> torch.Tensor:
    """DragGAN / DragDiffusion tracking: crop the clipped window of the upsampled map, argmin of the distance."""
    up = feat if size is None else F.interpolate(feat, size, mode="bilinear", align_corners=False)
    h, w = up.shape[-2:]
    out = []
    for (px, py), ref in zip(centers_xy.round().long().tolist(), refs):
        top, bottom = max(py - r, 0), min(py + r + 1, h)
        left, right = max(px - r, 0), min(px + r + 1, w)
        patch = up[0, :, top:bottom, left:right]
        diff = patch - ref[:, None, None]
        dist = torch.linalg.norm(diff, dim=0) if metric == "l2" else diff.abs().sum(0)
        idx = int(torch.argmin(dist.reshape(-1)))
        width = right - left
        out.append([left + idx % width, top + idx // width])
    return torch.tensor(out, dtype=torch.float32)


def edge_points(h: int, w: int, extra: int = 0) -> torch.Tensor:
    """Points on every border, in the interior at odd fractions, outside the map, and random ones."""
    fixed = [[0, 0], [w - 1, h - 1], [w - 1, 0], [0, h - 1], [0.5, 0.25], [w - 1.25, h - 1.75],
             [-0.5, 1.0], [-1.5, -1.5], [w - 0.5, h / 2], [w + 3.0, 1.0], [w / 3, h + 0.7], [1.37, 2.91]]
    pts = torch.tensor(fixed, dtype=torch.float32)
    if extra:
        rnd = torch.rand(extra, 2) * torch.tensor([w + 2.0, h + 2.0]) - 1.0
        pts = torch.cat([pts, rnd])
    return pts


# --- the coordinate map ----------------------------------------------------------------------------------

@pytest.mark.parametrize("native,grid", [(7, 28), (13, 52), (5, 17), (64, 256), (11, 11), (17, 5), (1, 4)])
def test_upsampled_taps_reproduce_interpolate(native: int, grid: int) -> None:
    """Sampling the virtual grid at its integer pixels equals F.interpolate(bilinear, align_corners=False)."""
    feat = torch.randn(1, 3, native, native + 2, dtype=torch.float64)
    size = (grid, grid + 3)
    up = F.interpolate(feat, size, mode="bilinear", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).double()
    got = reference.bilinear_sample(feat, pts, size)  # [1, P, C]
    torch.testing.assert_close(got[0].T.reshape(1, 3, *size), up, atol=1e-12, rtol=1e-12)


def test_affine_map_is_not_the_upsample() -> None:
    """Why the op composes two bilinear steps: native bilinear at the affine-mapped point differs from the
    upsample-then-sample path wherever a native pixel centre falls between two grid pixels."""
    feat = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    size = (32, 32)
    pts = torch.tensor([[5.5, 9.5]], dtype=torch.float64)  # between grid pixels 5|6 and 9|10
    literal = draggan_sample(feat, pts, size)
    ours = reference.bilinear_sample(feat, pts, size)
    affine = reference.bilinear_sample(feat, reference.feature_to_grid(pts, size, (8, 8)), None)
    torch.testing.assert_close(ours, literal, atol=1e-12, rtol=1e-12)
    assert (affine - literal).abs().max() > 1e-3


# --- bilinear_sample ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,size", [((2, 5, 7, 9), (28, 36)), ((1, 3, 13, 11), (52, 44)), ((1, 4, 5, 6), None),
                                        ((1, 2, 16, 16), (64, 64))])
def test_bilinear_sample_equals_draggan_path(device, shape, size) -> None:
    feat = torch.randn(*shape, dtype=torch.float64)
    gh, gw = size or shape[-2:]
    pts = edge_points(gh, gw, extra=9).double()
    for impl in ("reference", "triton"):
        if impl == "triton":
            feat32, pts32 = feat.float().to(device), pts.float().to(device)
            with use_kernels("triton"):
                got = bilinear_sample(feat32, pts32, size)
            # The literal path rounds twice (upsample, then grid_sample) and on a GPU contracts into FMAs:
            # compare in float32 at a float32 tolerance, not at one rounding.
            torch.testing.assert_close(got, draggan_sample(feat32, pts32, (gh, gw)), atol=1e-5, rtol=1e-5)
        else:
            with use_kernels("reference"):
                got = bilinear_sample(feat, pts, size)
            torch.testing.assert_close(got, draggan_sample(feat, pts, (gh, gw)), atol=1e-12, rtol=1e-12)


def test_bilinear_sample_equals_dragdiffusion_patch(device) -> None:
    """DragDiffusion: up_blocks[2] map upsampled to half the image, 3x3 patch shifted by a unit vector."""
    feat = torch.randn(1, 6, 16, 16, device=device)
    size = (64, 64)
    up = F.interpolate(feat, size, mode="bilinear", align_corners=False)
    for (hx, hy), (dx, dy) in [((20, 31), (0.6, -0.8)), ((5, 60), (-0.28, 0.96)), ((40, 2), (1.0, 0.0))]:
        r1, r2 = max(0, hy - 1), min(size[0], hy + 2)
        c1, c2 = max(0, hx - 1), min(size[1], hx + 2)
        lit = dragdiffusion_patch(up, r1 + dy, r2 + dy, c1 + dx, c2 + dx)  # [1, C, rows, cols]
        ys, xs = torch.meshgrid(torch.arange(r1, r2) + dy, torch.arange(c1, c2) + dx, indexing="ij")
        pts = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1).float().to(device)
        for impl in ("reference", "triton"):
            with use_kernels(impl):
                got = bilinear_sample(feat, pts, size)
            assert_close(got[0].T.reshape(lit.shape), lit)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [None, (22, 39), (5, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bilinear_sample_triton_matches_reference(device, dtype, size, channels_last) -> None:
    feat = torch.randn(2, 37, 11, 13, device=device).to(dtype)
    if channels_last:
        feat = feat.to(memory_format=torch.channels_last)
    gh, gw = size or (11, 13)
    pts = edge_points(gh, gw, extra=5).to(device)
    with use_kernels("triton"):
        got = bilinear_sample(feat, pts, size)
    expected = reference.bilinear_sample(feat, pts, size)
    assert got.dtype == dtype and got.shape == (2, pts.shape[0], 37)
    assert_close(got, expected, dtype)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_sample_backward_triton_matches_reference(device, dtype) -> None:
    size = (33, 26)
    pts = edge_points(*size, extra=7).to(device)
    grads = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(1)
        feat = torch.randn(2, 19, 11, 13, device=device).to(dtype).requires_grad_(True)
        g = torch.randn(2, pts.shape[0], 19, device=device).to(dtype)
        with use_kernels(impl):
            (bilinear_sample(feat, pts, size).float() * g.float()).sum().backward()
        grads[impl] = feat.grad
    assert grads["triton"].dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(grads["triton"].double(), grads["reference"].double(), atol=4 * atol, rtol=4 * rtol)


def test_bilinear_sample_backward_touches_only_taps(device) -> None:
    feat = torch.randn(1, 4, 9, 9, device=device, requires_grad=True)
    pts = torch.tensor([[2.0, 3.0]], device=device)  # integer point on the native grid: exactly one pixel
    with use_kernels("triton"):
        bilinear_sample(feat, pts).sum().backward()
    nz = feat.grad.abs().sum(1)[0].nonzero().tolist()
    assert nz == [[3, 2]]
    torch.testing.assert_close(feat.grad[0, :, 3, 2], torch.ones(4, device=device))


def test_bilinear_sample_gradcheck_float64() -> None:
    feat = torch.randn(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    pts = edge_points(10, 12, extra=3).double()
    with use_kernels("reference"):
        assert torch.autograd.gradcheck(lambda f: bilinear_sample(f, pts, (10, 12)), (feat,))


def test_bilinear_sample_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"feat must be \[N, C, H, W\]"):
        bilinear_sample(torch.randn(3, 4, 5), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"points must be \[P, 2\]"):
        bilinear_sample(torch.randn(1, 3, 4, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="size must be"):
        bilinear_sample(torch.randn(1, 3, 4, 5), torch.zeros(2, 2), (0, 4))


# --- patch_track -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("size,radius", [((44, 52), 5), (None, 3), ((26, 33), 2)])
def test_patch_track_equals_literal(device, metric, size, radius) -> None:
    feat = torch.randn(1, 23, 11, 13)
    gh, gw = size or (11, 13)
    centers = torch.tensor([[3.0, 4.0], [gw - 1, gh - 1], [0.0, 0.0], [gw / 2, 1.0], [gw - 2.0, gh / 2]])
    up = feat if size is None else F.interpolate(feat, size, mode="bilinear", align_corners=False)
    # Reference vectors taken from the map near (not at) each centre, away from the border rows and columns
    # that a bilinear upsample duplicates (grid pixels 0-1 and the last 2 at 4x all equal a border pixel:
    # exact ties that the literal path breaks by float rounding and that we break by position).
    def inner(v: int, n: int) -> int:
        return min(max(v, 2), n - 3)

    refs = torch.stack([up[0, :, inner(int(y) + 1, gh), inner(int(x) - 1, gw)] for x, y in centers.tolist()])
    refs = refs + 0.01 * torch.randn_like(refs)
    expected = literal_track(feat, refs, centers, radius, metric, size)
    for impl in ("reference", "triton"):
        with use_kernels(impl):
            got = patch_track(feat.to(device), refs.to(device), centers.to(device), radius, metric, size)
        torch.testing.assert_close(got.cpu(), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("size,radius", [((44, 52), 5), (None, 3), ((26, 33), 0)])
def test_patch_track_window_values_are_the_sampled_grid(dtype, size, radius) -> None:
    """The reference's per-axis window (rows blended once per handle and dy) is _sample_acc at the window's pixels,
    borders and outside pixels included, for any memory format."""
    feat = torch.randn(1, 23, 11, 13, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gh, gw = size or (11, 13)
    base = torch.tensor([[3.0, 4.0], [gw - 1, gh - 1], [0.0, 0.0], [gw + 2.0, -1.0]])
    got = reference._window_values(feat, base, radius, (gh, gw))
    cand = (base[:, None, :] + reference.window_offsets(radius)[None]).reshape(-1, 2)
    want = reference._sample_acc(feat, cand, (gh, gw))[0].reshape(len(base), (2 * radius + 1) ** 2, -1)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-6  # float32 weights either way (integer window pixels): _sample_acc rounds their products wy * wx
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_patch_track_ties_go_to_the_first_candidate(device) -> None:
    feat = torch.ones(1, 5, 9, 9, device=device)
    refs = torch.zeros(3, 5, device=device)
    centers = torch.tensor([[4.0, 4.0], [0.0, 8.0], [8.4, 1.6]], device=device)
    expected = torch.tensor([[2.0, 2.0], [0.0, 6.0], [6.0, 0.0]], device=device)  # top-left of clipped windows
    for impl in ("reference", "triton"):
        with use_kernels(impl):
            torch.testing.assert_close(patch_track(feat, refs, centers, 2, "l1"), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patch_track_triton_matches_reference_dtypes(device, dtype) -> None:
    feat = torch.randn(1, 70, 16, 16, device=device).to(dtype)
    size = (64, 64)
    centers = torch.tensor([[10.0, 12.0], [50.0, 60.0], [63.0, 0.0], [31.0, 33.0]], device=device)
    refs = reference.bilinear_sample(feat.float(), centers + torch.tensor([2.0, -3.0], device=device), size)[0]
    with use_kernels("triton"):
        got = patch_track(feat, refs, centers, 6, "l2", size)
    expected = reference.patch_track(feat, refs, centers, 6, "l2", size)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_patch_track_rejects_bad_input() -> None:
    feat = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="ref_vectors must be"):
        patch_track(feat, torch.zeros(2, 3), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="radius must be"):
        patch_track(feat, torch.zeros(2, 4), torch.zeros(2, 2), -1)
    with pytest.raises(ValueError, match="metric must be"):
        patch_track(feat, torch.zeros(2, 4), torch.zeros(2, 2), 2, "cosine")
    with pytest.raises(ValueError, match=r"\[1, C, H, W\]"):
        patch_track(torch.randn(2, 4, 6, 6), torch.zeros(2, 4), torch.zeros(2, 2), 2)


# --- masked_blend ------------------------------------------------------------------------------------------

def blend_formula(fg, src, mask, alpha, noise):
    if noise is None:
        return fg * mask + src * (1 - mask)
    a = torch.as_tensor(alpha, dtype=fg.dtype, device=fg.device).reshape(-1, 1, 1, 1)
    return fg * mask + (a.sqrt() * src + (1 - a).sqrt() * noise) * (1 - mask)


BLEND_CASES = [
    # (fg, src, mask) shapes, alpha, with noise
    (((3, 4, 5, 7), (1, 4, 5, 7), (1, 1, 5, 7)), 0.3, True),
    (((2, 4, 9, 3), (2, 4, 9, 3), (2, 1, 9, 3)), [0.1, 0.9], True),
    (((2, 3, 5, 5), (2, 3, 5, 5), (1, 3, 5, 5)), None, False),
    (((1, 4, 17, 13), (1, 4, 17, 13), (1, 1, 17, 13)), 1.0, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes,alpha,with_noise", BLEND_CASES)
def test_masked_blend_triton_matches_reference(device, dtype, shapes, alpha, with_noise) -> None:
    fg_s, src_s, mask_s = shapes
    fg = torch.randn(fg_s, device=device).to(dtype)
    src = torch.randn(src_s, device=device).to(dtype)
    mask = torch.rand(mask_s, device=device).to(dtype)
    noise = torch.randn(fg_s, device=device).to(dtype) if with_noise else None
    alpha_t = torch.tensor(alpha, device=device) if isinstance(alpha, list) else alpha
    with use_kernels("triton"):
        got = masked_blend(fg, src, mask, alpha_t, noise)
    expected = reference.masked_blend(fg, src, mask, alpha_t, noise)
    assert got.dtype == dtype and got.shape == fg.shape
    assert_close(got, expected, dtype)
    exact = blend_formula(fg.double(), src.double(), mask.double(), alpha, None if noise is None else noise.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double(), exact, atol=4 * atol, rtol=4 * rtol)


def test_masked_blend_gradcheck_float64() -> None:
    fg = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    src = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.2, 0.7], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, m, n: masked_blend(a, b, m, alpha, n), (fg, src, mask, noise))
    assert torch.autograd.gradcheck(lambda a, b, m: masked_blend(a, b, m), (fg, src, mask))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_masked_blend_gradients_match_formula(device, impl) -> None:
    shapes = [(2, 3, 4, 5), (1, 3, 4, 5), (2, 1, 4, 5), (2, 3, 4, 5)]
    args = [torch.randn(s, device=device) for s in shapes]
    args[2] = args[2].sigmoid()
    ours = [a.clone().requires_grad_(True) for a in args]
    theirs = [a.clone().requires_grad_(True) for a in args]
    g = torch.randn(2, 3, 4, 5, device=device)
    with use_kernels(impl):
        (masked_blend(ours[0], ours[1], ours[2], 0.4, ours[3]) * g).sum().backward()
    (blend_formula(theirs[0], theirs[1], theirs[2], 0.4, theirs[3]) * g).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_masked_blend_rejects_bad_input() -> None:
    fg = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="mask must be"):
        masked_blend(fg, fg, torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="alpha_t is required"):
        masked_blend(fg, fg, torch.rand(1, 1, 5, 5), None, torch.randn_like(fg))
    with pytest.raises(ValueError, match=r"alpha_t must be"):
        masked_blend(fg, fg, torch.rand(1, 1, 5, 5), torch.rand(3), torch.randn_like(fg))


# --- compiled graphs ---------------------------------------------------------------------------------------

def _drag_step(feat_src, w, ref, handles, targets, fg, src, mask, noise):
    feat = feat_src * w  # stands in for a generator: gradient flows to w through the op
    new = patch_track(feat, ref, handles, 2, "l2", (24, 28))
    d = (targets - new) / ((targets - new).norm(dim=1, keepdim=True) + 1e-7)
    loss = (bilinear_sample(feat, new, (24, 28)).detach() - bilinear_sample(feat, new + d, (24, 28))).abs().mean()
    blended = masked_blend(fg, src, mask, 0.5, noise)
    return loss + blended.mean(), new


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ops_compile_fullgraph_without_breaks(device, impl) -> None:
    torch._dynamo.reset()
    feat_src = torch.randn(1, 8, 6, 7, device=device)
    ref = torch.randn(2, 8, device=device)
    handles = torch.tensor([[5.0, 6.0], [20.0, 11.0]], device=device)
    targets = torch.tensor([[9.0, 9.0], [15.0, 3.0]], device=device)
    fg, src, noise = torch.randn(3, 2, 4, 5, 5, device=device).unbind(0)
    mask = torch.rand(1, 1, 5, 5, device=device)
    w1 = torch.ones(1, 8, 1, 1, device=device, requires_grad=True)
    w2 = torch.ones(1, 8, 1, 1, device=device, requires_grad=True)
    compiled = torch.compile(_drag_step, fullgraph=True, backend="aot_eager")
    with use_kernels(impl):
        loss_c, new_c = compiled(feat_src, w1, ref, handles, targets, fg, src, mask, noise)
        loss_c.backward()
        loss_e, new_e = _drag_step(feat_src, w2, ref, handles, targets, fg, src, mask, noise)
        loss_e.backward()
    torch.testing.assert_close(new_c, new_e)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.cuda
def test_patch_track_and_sample_have_no_host_sync() -> None:
    feat = torch.randn(1, 256, 128, 128, device="cuda", requires_grad=True)
    handles = torch.tensor([[100.0, 200.0], [300.0, 310.0]], device="cuda")
    ref = torch.randn(2, 256, device="cuda")
    with use_kernels("triton"):
        patch_track(feat, ref, handles, 12, "l2", (512, 512))  # warm-up: compile the kernels
        bilinear_sample(feat, handles, (512, 512)).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            new = patch_track(feat, ref, handles, 12, "l2", (512, 512))
            bilinear_sample(feat, new, (512, 512)).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert new.device.type == "cuda"


@pytest.mark.cuda
def test_ops_capture_in_a_cuda_graph() -> None:
    """The engines replay their step from a CUDA graph: every op must be capturable and replay correctly."""
    feat = torch.randn(1, 64, 32, 32, device="cuda")
    ref = torch.randn(3, 64, device="cuda")
    handles = torch.tensor([[10.0, 20.0], [60.0, 70.0], [127.0, 0.0]], device="cuda")
    fg, src, noise = torch.randn(3, 2, 4, 16, 16, device="cuda").unbind(0)
    mask = torch.rand(1, 1, 16, 16, device="cuda")

    def step():
        new = patch_track(feat, ref, handles, 5, "l2", (128, 128))
        return new, bilinear_sample(feat, new, (128, 128)), masked_blend(fg, src, mask, 0.3, noise)

    with use_kernels("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        feat.copy_(torch.randn_like(feat))  # new inputs in place, as an engine does between steps
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
    for got, exp in zip(outs, expected):
        torch.testing.assert_close(got, exp)


def test_masked_blend_alpha_out_of_range_is_a_clear_error() -> None:
    fg = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"alpha_t=1.5 is not allowed; it is alphas_cumprod\[t\], in \[0, 1\]"):
        masked_blend(fg, fg, torch.rand(1, 1, 5, 5), 1.5, torch.randn_like(fg))
