"""Pure-PyTorch specification of every dragrt op.

These functions are the spec, the CPU fallback, the test oracle and the benchmark baseline: every fast
implementation has the same signature and must give the same numbers (tolerances per dtype live in the
tests). They run on any device and any floating dtype, and accumulate in float32.

Coordinates: a point is ``[x, y]`` (column, row) in pixels of a *sampling grid*, origin at the centre of
the top-left pixel, so integer coordinates are pixel centres. The sampling grid is either the feature map
itself or a virtual bilinear resize of it to ``size = (H_s, W_s)`` (``F.interpolate(mode="bilinear",
align_corners=False)``, PyTorch's rule), which is what the reference drag methods build before sampling:

- DragGAN upsamples its b128 feature map to the image size and samples it with
  ``grid_sample(align_corners=True)`` at fractional points;
- DragDiffusion upsamples its up_blocks[2] map to half the image size and samples it with its own
  bilinear patch interpolation (the same formula, in bounds).

Sampling the virtual grid at a fractional point is bilinear between its four nearest grid pixels (zeros
outside the grid, as ``grid_sample``'s default padding), where each grid pixel is itself bilinear in the
native map. The ops do both steps on the native map, touching at most 4x4 native pixels per point, and
never build the upsampled map; :func:`upsampled_taps_1d` is that coordinate map, exact (it is not the
affine map ``x * n / S``, which differs wherever a native pixel centre falls between two grid pixels).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dragrt.kernels import dispatch

METRICS = ("l1", "l2")


# --- the coordinate map ----------------------------------------------------------------------------------

def upsampled_taps_1d(coord: Tensor, grid_size: int, native_size: int) -> tuple[Tensor, Tensor]:
    """Native taps of a 1-D sample at ``coord`` of a virtual bilinear resize ``native_size -> grid_size``.

    Args:
        coord: any shape, float; positions in grid pixels (pixel centres at integers).
        grid_size: size of the virtual resized axis (``H_s`` or ``W_s``), >= 1.
        native_size: size of the native axis (``H`` or ``W``), >= 1.

    Returns:
        ``(index, weight)``, each ``coord.shape + (4,)``: native indices (always in range) and weights
        (float32, or float64 for float64 coordinates), with ``sum_k weight_k * f[index_k]`` equal to
        sampling the resized axis at ``coord`` linearly, with zero padding outside ``[0, grid_size - 1]``.
    """
    # PyTorch's upsample computes source coordinates in float32 for float/half maps and in float64 for
    # double maps: do the same (the caller passes float64 points with float64 maps).
    coord = coord if coord.dtype == torch.float64 else coord.float()
    scale = native_size / grid_size
    g0 = torch.floor(coord)
    frac = coord - g0
    idx, wts = [], []
    for corner, w_corner in ((g0, 1.0 - frac), (g0 + 1.0, frac)):
        valid = (corner >= 0) & (corner <= grid_size - 1)
        # PyTorch's upsample (align_corners=False): src = scale * (dst + 0.5) - 0.5, clamped below at 0.
        src = torch.clamp(scale * (corner + 0.5) - 0.5, min=0.0)
        i0 = torch.clamp(torch.floor(src), 0, native_size - 1)
        lam = src - i0
        i1 = torch.clamp(i0 + 1, max=native_size - 1)
        # Invalid corners (outside the grid, or a NaN/inf coordinate) read pixel 0 with weight 0.
        i0, i1 = (torch.where(valid, i, torch.zeros_like(i)) for i in (i0, i1))
        lam = torch.where(valid, lam, torch.zeros_like(lam))
        w = torch.where(valid, w_corner, torch.zeros_like(w_corner))
        idx += [i0, i1]
        wts += [w * (1.0 - lam), w * lam]
    return torch.stack(idx, -1).long(), torch.stack(wts, -1)


def upsampled_taps_2d(points: Tensor, size: tuple[int, int], native_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """2-D version of :func:`upsampled_taps_1d` for ``points[..., 2]`` as ``[x, y]``.

    Returns ``(flat_index, weight)`` of shape ``points.shape[:-1] + (16,)``: flat indices into an ``H*W``
    plane (row-major) and float32 weights.
    """
    (gh, gw), (h, w) = size, native_hw
    ix, wx = upsampled_taps_1d(points[..., 0], gw, w)
    iy, wy = upsampled_taps_1d(points[..., 1], gh, h)
    flat = (iy[..., :, None] * w + ix[..., None, :]).flatten(-2)
    weight = (wy[..., :, None] * wx[..., None, :]).flatten(-2)
    return flat, weight


def feature_to_grid(points: Tensor, size: tuple[int, int], native_hw: tuple[int, int]) -> Tensor:
    """Map image-space pixel points ``[x, y]`` of an image of ``size`` onto a grid of ``native_hw``
    with the same field of view (pixel-centre aligned): ``(p + 0.5) * n / S - 0.5``.

    Use it to place a point of one resolution on another (e.g. a click at 512 px onto DragDiffusion's
    256 px grid is ``round(p * 256 / 512)`` in the reference, see the engines); it is *not* the sampling
    map of a bilinear upsample, which :func:`upsampled_taps_1d` implements exactly.
    """
    (gh, gw), (h, w) = size, native_hw
    scale = points.new_tensor([w / gw, h / gh])
    return (points + 0.5) * scale - 0.5


def _check_sample_args(feat: Tensor, points: Tensor, size: tuple[int, int] | None) -> tuple[int, int]:
    if feat.dim() != 4:
        raise ValueError(f"feat must be [N, C, H, W], got shape {tuple(feat.shape)}")
    if not feat.is_floating_point():
        raise ValueError(f"feat must be a floating tensor, got {feat.dtype}")
    if points.dim() != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be [P, 2] as [x, y], got shape {tuple(points.shape)}")
    if points.device != feat.device:
        raise ValueError(f"points are on {points.device} but feat is on {feat.device}")
    if size is None:
        return int(feat.shape[-2]), int(feat.shape[-1])
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise ValueError(f"size must be (H_s, W_s) with both >= 1, got {size}")
    return int(size[0]), int(size[1])


# --- bilinear_sample --------------------------------------------------------------------------------------

@dispatch.register("bilinear_sample", "reference", devices=("cpu", "cuda"),
                   dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), priority=0)
def bilinear_sample(feat: Tensor, points: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Sample ``feat`` bilinearly at fractional points of its (virtually resized) grid.

    Args:
        feat: ``[N, C, H, W]`` feature map, any floating dtype, any memory format.
        points: ``[P, 2]`` points ``[x, y]`` in pixels of the sampling grid (see the module docstring);
            points outside the grid read zeros. Treated as constants (no gradient).
        size: ``(H_s, W_s)`` of the virtual bilinear resize the points refer to, or ``None`` for the
            native grid.

    Returns:
        ``[N, P, C]`` in ``feat``'s dtype (computed in float32, float64 kept), differentiable in ``feat``.
    """
    gh, gw = _check_sample_args(feat, points, size)
    return _sample_acc(feat, points, (gh, gw)).to(feat.dtype)


def _sample_acc(feat: Tensor, points: Tensor, size: tuple[int, int]) -> Tensor:
    """:func:`bilinear_sample` without the final cast: ``[N, P, C]`` in float32 (float64 for float64)."""
    n, c, h, w = feat.shape
    flat, weight = upsampled_taps_2d(points, size, (h, w))  # [P, 16]
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    taps = feat.reshape(n, c, h * w)[:, :, flat.reshape(-1)].to(acc)  # [N, C, P*16]
    taps = taps.reshape(n, c, *flat.shape)  # [N, C, P, 16]
    return (taps * weight.to(acc)).sum(-1).transpose(1, 2)  # [N, P, C]


@dispatch.register("bilinear_sample_backward", "reference", devices=("cpu", "cuda"),
                   dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), priority=0)
def bilinear_sample_backward(grad_out: Tensor, points: Tensor, feat_shape: tuple[int, int, int, int],
                             size: tuple[int, int] | None = None) -> Tensor:
    """Gradient of :func:`bilinear_sample` with respect to ``feat``: ``[N, C, H, W]`` in ``grad_out``'s dtype.

    ``grad_out`` is ``[N, P, C]``. The op is linear in ``feat``, so the gradient does not depend on it.
    """
    n, c, h, w = feat_shape
    gh, gw = (h, w) if size is None else (int(size[0]), int(size[1]))
    flat, weight = upsampled_taps_2d(points, (gh, gw), (h, w))  # [P, 16]
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    contrib = grad_out.to(acc).transpose(1, 2)[..., None] * weight.to(acc)  # [N, C, P, 16]
    grad = torch.zeros(n, c, h * w, dtype=acc, device=grad_out.device)
    grad.index_add_(2, flat.reshape(-1), contrib.reshape(n, c, -1))
    return grad.reshape(n, c, h, w).to(grad_out.dtype)


# --- patch_track ------------------------------------------------------------------------------------------

def window_offsets(radius: int, device: torch.device | str | None = None) -> Tensor:
    """``[(2r+1)^2, 2]`` integer offsets ``[dx, dy]`` of a square window in row-major order (dy outer)."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1)], -1)


def _check_track_args(feat: Tensor, ref_vectors: Tensor, centers: Tensor, radius: int, metric: str,
                      size: tuple[int, int] | None) -> tuple[int, int]:
    gh, gw = _check_sample_args(feat, centers, size)
    if feat.shape[0] != 1:
        raise ValueError(f"patch_track searches one feature map: feat must be [1, C, H, W], got {tuple(feat.shape)}")
    if ref_vectors.shape != (centers.shape[0], feat.shape[1]):
        raise ValueError(f"ref_vectors must be [P, C] = [{centers.shape[0]}, {feat.shape[1]}], "
                         f"got {tuple(ref_vectors.shape)}")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return gh, gw


@dispatch.register("patch_track", "reference", devices=("cpu", "cuda"),
                   dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), priority=0)
def patch_track(feat: Tensor, ref_vectors: Tensor, centers: Tensor, radius: int, metric: str = "l2",
                size: tuple[int, int] | None = None) -> Tensor:
    """Nearest-neighbour point tracking: per handle, the grid pixel of the window whose feature is closest.

    For handle ``j`` the candidates are the integer grid pixels ``round(centers[j]) + [dx, dy]`` with
    ``|dx|, |dy| <= radius``, clipped to the grid (pixels outside are not candidates). The distance to
    ``ref_vectors[j]`` is L1 (sum of absolute differences) or L2 (Euclidean norm) over channels, in
    float32. Ties go to the first candidate in row-major order (smallest dy, then smallest dx), as
    ``torch.argmin`` does over the reference's cropped window. (The only exact ties in real features are
    the border pixels a bilinear upsample duplicates; the literal upsample-then-crop path breaks those by
    float rounding of equal values, this op by position.)

    Args:
        feat: ``[1, C, H, W]`` current features.
        ref_vectors: ``[P, C]`` feature of each handle at its initial position.
        centers: ``[P, 2]`` current handle positions ``[x, y]`` in grid pixels, rounded to the grid as
            ``floor(x + 0.5)``.
        radius: window half-size in grid pixels (DragGAN r2 = 12 at 512; DragDiffusion r_p = 3).
        metric: ``"l1"`` or ``"l2"``.
        size: ``(H_s, W_s)`` of the virtual bilinear resize the grid is, or ``None`` for the native map.

    Returns:
        ``[P, 2]`` new positions ``[x, y]`` (integers, in ``centers``' dtype), on the device, no host sync.
    """
    gh, gw = _check_track_args(feat, ref_vectors, centers, radius, metric, size)
    base = torch.floor(centers.float() + 0.5)  # [P, 2]
    cand = base[:, None, :] + window_offsets(radius, feat.device)[None]  # [P, K, 2]
    inside = (cand[..., 0] >= 0) & (cand[..., 0] <= gw - 1) & (cand[..., 1] >= 0) & (cand[..., 1] <= gh - 1)
    vals = _window_values(feat, base, radius, (gh, gw)).float()  # [P, K, C]
    diff = vals - ref_vectors.float()[:, None, :]
    dist = diff.abs().sum(-1) if metric == "l1" else torch.linalg.vector_norm(diff, dim=-1)
    dist = torch.where(inside, dist, torch.full_like(dist, float("inf")))
    best = torch.argmin(dist, dim=1)  # first minimum
    new = torch.gather(cand, 1, best[:, None, None].expand(-1, 1, 2))[:, 0]
    return new.to(centers.dtype)


def _window_values(feat: Tensor, base: Tensor, radius: int, size: tuple[int, int]) -> Tensor:
    """``[P, K, C]``: the sampling grid's values at each window pixel ``base[j] + [dx, dy]`` (``K = (2r + 1)^2``,
    row-major with ``dy`` outer, as :func:`window_offsets`), which is :func:`_sample_acc` at those points, computed
    per axis. A window's pixels are whole grid pixels, so those of one row share their four native row taps and
    those of one column their four column taps: rows are blended once per ``(handle, dy)``, then columns, instead
    of a 16-tap gather per candidate (float32 sums in another order; ~4x faster on a CPU for DragGAN's 5 handles,
    radius 6, 64 channels). Float32, float64 for float64 maps.
    """
    (gh, gw), (_, c, h, w) = size, feat.shape
    acc = torch.float64 if feat.dtype == torch.float64 else torch.float32
    offsets = torch.arange(-radius, radius + 1, device=feat.device, dtype=base.dtype)
    xs, ys = base[:, :1] + offsets, base[:, 1:] + offsets  # [P, S], S = 2r + 1
    ix, wx = upsampled_taps_1d(xs, gw, w)  # [P, S, 4]
    iy, wy = upsampled_taps_1d(ys, gh, h)
    n_p, s = xs.shape
    rows = feat[0][:, iy.reshape(-1)].to(acc).reshape(c, n_p, s, 4, w)  # [C, P, S (dy), 4, W]
    rows = (rows * wy.to(acc)[None, :, :, :, None]).sum(3)  # [C, P, S, W]
    cols = torch.gather(rows, 3, ix.reshape(1, n_p, 1, s * 4).expand(c, n_p, s, s * 4))  # [C, P, S, S*4]
    vals = (cols.reshape(c, n_p, s, s, 4) * wx.to(acc)[None, :, None]).sum(-1)  # [C, P, S (dy), S (dx)]
    return vals.permute(1, 2, 3, 0).reshape(n_p, s * s, c)


# --- masked_blend -----------------------------------------------------------------------------------------

def _check_blend_args(fg: Tensor, src: Tensor, mask: Tensor, noise: Tensor | None) -> None:
    if fg.dim() != 4:
        raise ValueError(f"fg must be [N, C, H, W], got shape {tuple(fg.shape)}")
    n, c, h, w = fg.shape
    if src.dim() != 4 or src.shape[1:] != fg.shape[1:] or src.shape[0] not in (1, n):
        raise ValueError(f"src must be [N or 1, {c}, {h}, {w}], got shape {tuple(src.shape)}")
    if mask.dim() != 4 or mask.shape[2:] != (h, w) or mask.shape[1] not in (1, c) or mask.shape[0] not in (1, n):
        raise ValueError(f"mask must be [N or 1, 1 or {c}, {h}, {w}] (1 = keep fg), got shape {tuple(mask.shape)}")
    if noise is not None and noise.shape != fg.shape:
        raise ValueError(f"noise must have fg's shape {tuple(fg.shape)}, got {tuple(noise.shape)}")
    for name, t in (("src", src), ("mask", mask), ("noise", noise)):
        if t is not None and t.device != fg.device:
            raise ValueError(f"{name} is on {t.device} but fg is on {fg.device}")


def check_alpha(alpha_t: float) -> float:
    """A number ``alpha_t`` as a float in [0, 1], else a ``ValueError`` naming the range."""
    a = float(alpha_t)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha_t={alpha_t!r} is not allowed; it is alphas_cumprod[t], in [0, 1]")
    return a


def alpha_vector(alpha_t: float | Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """``alpha_t`` (a float, a 0-d tensor or ``[N]`` per sample) as a float32 ``[N]`` tensor."""
    if alpha_t is None:
        return None
    a = torch.as_tensor(alpha_t, dtype=torch.float32, device=device)
    if a.dim() == 0:
        return a.expand(n)
    if a.shape != (n,):
        raise ValueError(f"alpha_t must be a number, a 0-d tensor or [N] = [{n}], got shape {tuple(a.shape)}")
    return a


@dispatch.register("masked_blend", "reference", devices=("cpu", "cuda"),
                   dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64), priority=0)
def masked_blend(fg: Tensor, src: Tensor, mask: Tensor, alpha_t: float | Tensor | None = None,
                 noise: Tensor | None = None) -> Tensor:
    """Blend a foreground with a (re-noised) source outside the mask.

    ``out = fg * m + bg * (1 - m)`` with ``bg = sqrt(alpha_t) * src + sqrt(1 - alpha_t) * noise`` (the
    re-noising ``q_sample`` / ``add_noise`` of Blended Diffusion), or ``bg = src`` when ``noise`` is
    ``None`` (the plain lerp, e.g. the final pixel paste).

    Args:
        fg: ``[N, C, H, W]`` the sample being edited.
        src: ``[N or 1, C, H, W]`` the clean source (latent or image).
        mask: ``[N or 1, 1 or C, H, W]``, 1 = edited region (keep ``fg``), 0 = background; soft values blend.
        alpha_t: cumulative alpha (``alphas_cumprod[t]``) in [0, 1]: a number, 0-d tensor or ``[N]``;
            required with ``noise``.
        noise: ``[N, C, H, W]`` standard normal noise, or ``None`` for the plain lerp.

    Returns:
        ``[N, C, H, W]`` in ``fg``'s dtype, computed in float32; differentiable in fg, src, mask, noise.
    """
    _check_blend_args(fg, src, mask, noise)
    acc = torch.float64 if fg.dtype == torch.float64 else torch.float32
    bg = src.to(acc)
    if noise is not None:
        if alpha_t is None:
            raise ValueError("alpha_t is required when noise is given")
        if isinstance(alpha_t, (int, float)):
            a = check_alpha(alpha_t)
            bg = math.sqrt(a) * bg + math.sqrt(1.0 - a) * noise.to(acc)
        else:
            av = alpha_vector(alpha_t, fg.shape[0], fg.device).to(acc)[:, None, None, None]
            bg = torch.sqrt(av) * bg + torch.sqrt(1.0 - av) * noise.to(acc)
    m = mask.to(acc)
    return (fg.to(acc) * m + bg * (1.0 - m)).to(fg.dtype)
