"""Motion supervision and point tracking shared by the DragGAN and DragDiffusion engines.

Each method has two forms with the same meaning:

- the *literal* form follows the published code step for step (dense upsample of the feature map,
  per-handle ``torch.where`` / ``grid_sample`` / crops, Python loops, host reads): it is the engines'
  ``reference`` mode, the parity oracle and the benchmark baseline;
- the *static* form computes the same numbers on the native feature map through dragrt's kernels, for a
  padded array of handles (``active`` marks the real ones), with no host synchronisation and shapes that
  never change, so that one captured graph serves 1 to N handles.

Coordinates: handles and targets are ``[x, y]`` in pixels of the method's grid (DragGAN: the image;
DragDiffusion: half the image), as float tensors holding integers after tracking. The literal forms take
the reference's own ``[row, col]`` lists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dragrt.kernels import bilinear_sample, patch_track
from dragrt.kernels.reference import window_offsets

# --- DragGAN ---------------------------------------------------------------------------------------------

def draggan_radii(image_size: int, r1: float = 3, r2: float = 12) -> tuple[int, int]:
    """DragGAN's motion and tracking radii at a resolution: ``round(r / 512 * H)`` (3 / 12 at 512)."""
    return round(r1 / 512 * image_size), round(r2 / 512 * image_size)


def draggan_min_radius(image_size: int, pixels: int) -> float:
    """The smallest radius in 512-px units (``r1`` / ``r2`` of DragGANConfig) that :func:`draggan_radii` rounds to
    ``pixels`` at ``image_size``: DragGAN's defaults shrink to nothing on small generators (``r1=3`` is 0 px
    below 86 px, where the motion loss has no pixels at all)."""
    return pixels * 512 / image_size


#: The smallest default DragGAN radii (motion disc, tracking window; image pixels): the reference's at 256 px.
#: Its 3 and 12 pixels at 512 shrink with the image, to 0 and 2 px at 64 px.
MIN_RADII_PX = (2, 6)


def draggan_default_radii(image_size: int, r1: float | None = None, r2: float | None = None) -> tuple[float, float]:
    """``(r1, r2)`` in pixels at 512 (DragGANConfig's units) that DragGAN runs with at ``image_size``: a given
    radius as it is; ``None``: the reference's 3 / 12, raised to :func:`draggan_min_radius` where it would be
    smaller than :data:`MIN_RADII_PX` at ``image_size`` -- generators under 256 px, where the reference's radii
    degenerate (every published DragGAN model is 256 px or more, where this is the reference's value)."""
    out = []
    for given, r, px, floor in zip((r1, r2), (3.0, 12.0), draggan_radii(image_size), MIN_RADII_PX):
        out.append(given if given is not None else r if px >= floor else draggan_min_radius(image_size, floor))
    return out[0], out[1]


def draggan_pixel_radii(image_size: int, r1: float | None = None, r2: float | None = None) -> tuple[int, int]:
    """The motion and tracking radii in image pixels that a DragGANConfig's ``r1`` / ``r2`` (maybe ``None``) give at
    ``image_size``."""
    return draggan_radii(image_size, *draggan_default_radii(image_size, r1, r2))


def draggan_feature_resolution(image_size: int) -> int:
    """The block whose features DragGAN tracks and supervises by default on a generator of ``image_size``: the
    reference's b128 (its index 5) from 256 px up; below, the block at half the image, as b128 is at 256 px
    (a deliberate difference: at 128 px index 5 is the top block, and under 128 px there is none)."""
    return max(min(128, image_size // 2), 4)


def draggan_stop_distance(image_size: int) -> float:
    """Handles within this many pixels of their targets are done: ``max(2 / 512 * H, 2)``."""
    return max(2 / 512 * image_size, 2.0)


def draggan_motion_loss(feat: Tensor, handles: Tensor, targets: Tensor, active: Tensor,
                        size: tuple[int, int], r1_px: int) -> Tensor:
    """DragGAN's motion-supervision loss, static form.

    Args:
        feat: ``[1, C, h, w]`` the generator's feature map (b128), differentiable.
        handles, targets: ``[P, 2]`` ``[x, y]`` image pixels (integers after tracking).
        active: ``[P]`` bool, False for padding.
        size: ``(H, W)`` image size: the virtual upsample the reference builds.
        r1_px: disc radius in image pixels (:func:`draggan_radii`).

    Returns:
        Scalar: ``sum_i mean_{q in disc_i, c} |sg(F(q)) - F(q + d_i)|`` over active handles further than 1 px
        from their targets, with the reference's disc: pixels ``(i, j)`` with
        ``sqrt((i*H/(H-1) - y)^2 + (j*W/(W-1) - x)^2) < r1`` (its ``linspace(0, H, H)`` grid, which shifts
        the disc by up to a pixel far from the origin; reproduced, not corrected).
    """
    h, w = size
    n_p = handles.shape[0]
    win = window_offsets(r1_px + 1, feat.device)  # superset of every quirked disc (the shift is under 1 px)
    base = torch.round(handles)
    q = base[:, None, :] + win[None]  # [P, K, 2]
    qy = q[..., 1] * (h / (h - 1))
    qx = q[..., 0] * (w / (w - 1))
    dist = torch.sqrt((qy - handles[:, None, 1]) ** 2 + (qx - handles[:, None, 0]) ** 2)
    inside = (q[..., 0] >= 0) & (q[..., 0] <= w - 1) & (q[..., 1] >= 0) & (q[..., 1] <= h - 1)
    sel = ((dist < r1_px) & inside).float()  # [P, K]
    diff = targets - handles
    norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    d = diff / (norm + 1e-7)
    f_q = bilinear_sample(feat, q.reshape(-1, 2), size).detach()
    f_qd = bilinear_sample(feat, (q + d[:, None, :]).reshape(-1, 2), size)
    err = (f_q.float() - f_qd.float()).abs().mean(-1).reshape(n_p, -1)  # [P, K], mean over C
    per_handle = (err * sel).sum(1) / sel.sum(1).clamp_min(1.0)
    use = active & (norm[:, 0] > 1)
    return (per_handle * use).sum()


def draggan_mask_loss(feat: Tensor, feat0: Tensor, fixed: Tensor, size: tuple[int, int], lam: float) -> Tensor:
    """``lam * mean(|up(F) * M - up(F0) * M|)`` over the full upsampled ``C x H x W`` (M = 1 fixed region).

    The mean of an absolute value cannot be taken on the native map, so this term upsamples densely, as
    the reference does; it is only evaluated when a mask with both regions is set.
    """
    up = F.interpolate(feat, size, mode="bilinear")
    up0 = F.interpolate(feat0, size, mode="bilinear")
    return lam * F.l1_loss(up * fixed, up0 * fixed)


def draggan_track(feat: Tensor, ref_vectors: Tensor, handles: Tensor, size: tuple[int, int], r2_px: int,
                  metric: str = "l2") -> Tensor:
    """DragGAN point tracking (static form): nearest feature in a ``(2 r2 + 1)^2`` window, L2 by default."""
    return patch_track(feat, ref_vectors, handles, r2_px, metric, size)


class DragGANLiteralState:
    """What the reference renderer keeps between steps: the first step's upsampled features and the
    feature vector at each initial handle (reset when the number of points changes)."""

    def __init__(self) -> None:
        self.feat0_resize: Tensor | None = None
        self.feat_refs: list[Tensor] | None = None


def draggan_track_literal(feat_resize: Tensor, feat_refs: list[Tensor], points: list[list[int]],
                          r2: float = 12) -> list[list[int]]:
    """The renderer's point tracking on the upsampled map ``[1, C, H, W]``: per point, crop the clipped
    window, L2 to the reference vector, ``argmin`` read back with ``.item()``; ``points`` updated in place."""
    h, w = feat_resize.shape[-2:]
    with torch.no_grad():
        for j, point in enumerate(points):
            r = round(r2 / 512 * h)
            up, down = max(point[0] - r, 0), min(point[0] + r + 1, h)
            left, right = max(point[1] - r, 0), min(point[1] + r + 1, w)
            feat_patch = feat_resize[:, :, up:down, left:right]
            dist = torch.linalg.norm(feat_patch - feat_refs[j].reshape(1, -1, 1, 1), dim=1)
            _, idx = torch.min(dist.view(1, -1), -1)
            width = right - left
            points[j] = [idx.item() // width + up, idx.item() % width + left]
    return points


def draggan_motion_literal(feat_resize: Tensor, points: list[list[int]], targets: list[list[int]],
                           r1: float = 3) -> tuple[Tensor | float, bool]:
    """The renderer's motion loss on the upsampled map: per point, the quirked disc by ``torch.where``,
    ``grid_sample`` at ``q + d`` against the detached ``F(q)``. Returns ``(loss, stop)``."""
    h, w = feat_resize.shape[-2:]
    xx, yy = torch.meshgrid(torch.linspace(0, h, h), torch.linspace(0, w, w), indexing="ij")
    xx, yy = xx.to(feat_resize.device), yy.to(feat_resize.device)
    loss: Tensor | float = 0.0
    stop = True
    for j, point in enumerate(points):
        direction = torch.Tensor([targets[j][1] - point[1], targets[j][0] - point[0]])
        if torch.linalg.norm(direction) > max(2 / 512 * h, 2):
            stop = False
        if torch.linalg.norm(direction) > 1:
            distance = ((xx - point[0]) ** 2 + (yy - point[1]) ** 2) ** 0.5
            relis, reljs = torch.where(distance < round(r1 / 512 * h))
            direction = direction / (torch.linalg.norm(direction) + 1e-7)
            gridh = (relis + direction[1]) / (h - 1) * 2 - 1
            gridw = (reljs + direction[0]) / (w - 1) * 2 - 1
            grid = torch.stack([gridw, gridh], dim=-1).unsqueeze(0).unsqueeze(0)
            target = F.grid_sample(feat_resize.float(), grid, align_corners=True).squeeze(2)
            loss = loss + F.l1_loss(feat_resize[:, :, relis, reljs].detach(), target)
    return loss, stop


def draggan_step_literal(feat: Tensor, image_size: tuple[int, int], state: DragGANLiteralState,
                         points: list[list[int]], targets: list[list[int]], mask: Tensor | None, lam: float,
                         r1: float = 3, r2: float = 12) -> tuple[Tensor | float, bool]:
    """DragGAN's step after the generator forward, as ``viz/renderer.py`` (after the July 2023 fix that
    detaches F(q) and samples F(q + d)) writes it: upsample, track each point, motion loss per point.

    ``points``/``targets`` are ``[[row, col], ...]`` in image pixels; ``points`` is updated in place by
    tracking, as in the reference. ``mask`` is ``[H, W]`` with 1 = fixed region. Returns ``(loss, stop)``;
    the caller steps its optimiser only when ``stop`` is False.
    """
    h, w = image_size
    feat_resize = F.interpolate(feat, [h, w], mode="bilinear")
    if state.feat_refs is None:
        state.feat0_resize = F.interpolate(feat.detach(), [h, w], mode="bilinear")
        state.feat_refs = [state.feat0_resize[:, :, round(p[0]), round(p[1])] for p in points]
    draggan_track_literal(feat_resize, state.feat_refs, points, r2)
    loss, stop = draggan_motion_literal(feat_resize, points, targets, r1)
    if mask is not None and mask.min() == 0 and mask.max() == 1:
        m = mask.to(feat.device)[None, None]
        loss = loss + lam * F.l1_loss(feat_resize * m, state.feat0_resize * m)
    return loss, stop


# --- DragDiffusion ---------------------------------------------------------------------------------------

def dragdiffusion_motion_loss(feat: Tensor, handles: Tensor, targets: Tensor, active: Tensor,
                              size: tuple[int, int], r_m: int = 1) -> Tensor:
    """DragDiffusion's motion-supervision loss, static form.

    Args:
        feat: ``[1, C, h, w]`` UNet up_blocks[2] output, differentiable.
        handles, targets: ``[P, 2]`` ``[x, y]`` in half-resolution grid pixels (integers after tracking).
        active: ``[P]`` bool, False for padding.
        size: ``(H/2, W/2)``: the grid the reference upsamples the map to.
        r_m: patch radius (1: 3x3 patches).

    Returns:
        Scalar: ``sum_i (2 r_m + 1)^2 * mean_{q in patch_i, c} |sg(F(q)) - F(q + d_i)|`` over active handles at
        least 2 px from their targets, patches clipped to the grid as the reference clips them.
    """
    gh, gw = size
    n_p = handles.shape[0]
    win = window_offsets(r_m, feat.device)
    q = torch.floor(handles)[:, None, :] + win[None]  # int(p) - r_m .. int(p) + r_m
    valid = ((q[..., 0] >= 0) & (q[..., 0] <= gw - 1) & (q[..., 1] >= 0) & (q[..., 1] <= gh - 1)).float()
    diff = targets - handles
    norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    d = diff / norm.clamp_min(1e-12)
    f_q = bilinear_sample(feat, q.reshape(-1, 2), size).detach()
    f_qd = bilinear_sample(feat, (q + d[:, None, :]).reshape(-1, 2), size)
    err = (f_q.float() - f_qd.float()).abs().mean(-1).reshape(n_p, -1)
    per_handle = (2 * r_m + 1) ** 2 * (err * valid).sum(1) / valid.sum(1).clamp_min(1.0)
    use = active & (norm[:, 0] >= 2)
    return (per_handle * use).sum()


def dragdiffusion_track(feat: Tensor, ref_vectors: Tensor, handles: Tensor, size: tuple[int, int],
                        r_p: int = 3) -> Tensor:
    """DragDiffusion point tracking (static form): L1 nearest neighbour in a ``(2 r_p + 1)^2`` window."""
    return patch_track(feat, ref_vectors, handles, r_p, "l1", size)


def _interpolate_feature_patch(feat: Tensor, y1: Tensor, y2: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
    # DragDiffusion's hand-written bilinear interpolation of a shifted patch (its tensor slice bounds).
    x1f, x2f, y1f, y2f = (torch.floor(v).long() for v in (x1, x2, y1, y2))
    x1c, x2c, y1c, y2c = x1f + 1, x2f + 1, y1f + 1, y2f + 1
    wa = (x1c.float() - x1) * (y1c.float() - y1)
    wb = (x1c.float() - x1) * (y1 - y1f.float())
    wc = (x1 - x1f.float()) * (y1c.float() - y1)
    wd = (x1 - x1f.float()) * (y1 - y1f.float())
    ia = feat[:, :, y1f:y2f, x1f:x2f]
    ib = feat[:, :, y1c:y2c, x1f:x2f]
    ic = feat[:, :, y1f:y2f, x1c:x2c]
    id_ = feat[:, :, y1c:y2c, x1c:x2c]
    return ia * wa + ib * wb + ic * wc + id_ * wd


def dragdiffusion_motion_loss_literal(f1: Tensor, handles: list[Tensor], targets: list[Tensor],
                                      r_m: int = 1) -> Tensor | float:
    """``drag_utils.drag_diffusion_update``'s motion loss on the upsampled map ``f1 [1, C, H/2, W/2]``
    with ``[row, col]`` tensors, as published."""
    _, _, max_r, max_c = f1.shape
    loss: Tensor | float = 0.0
    for pi, ti in zip(handles, targets):
        if (ti - pi).norm() < 2.0:
            continue
        di = (ti - pi) / (ti - pi).norm()
        r1, r2 = max(0, int(pi[0]) - r_m), min(max_r, int(pi[0]) + r_m + 1)
        c1, c2 = max(0, int(pi[1]) - r_m), min(max_c, int(pi[1]) + r_m + 1)
        f0_patch = f1[:, :, r1:r2, c1:c2].detach()
        f1_patch = _interpolate_feature_patch(f1, r1 + di[0], r2 + di[0], c1 + di[1], c2 + di[1])
        loss = loss + ((2 * r_m + 1) ** 2) * F.l1_loss(f0_patch, f1_patch)
    return loss


def dragdiffusion_track_literal(f0: Tensor, f1: Tensor, handles: list[Tensor], handles_init: list[Tensor],
                                r_p: int = 3) -> list[Tensor]:
    """``drag_utils.point_tracking``: L1 to the initial feature at the initial handle, in place."""
    with torch.no_grad():
        _, _, max_r, max_c = f0.shape
        for i in range(len(handles)):
            pi0, pi = handles_init[i], handles[i]
            f0_vec = f0[:, :, int(pi0[0]), int(pi0[1])]
            r1, r2 = max(0, int(pi[0]) - r_p), min(max_r, int(pi[0]) + r_p + 1)
            c1, c2 = max(0, int(pi[1]) - r_p), min(max_c, int(pi[1]) + r_p + 1)
            neighbour = f1[:, :, r1:r2, c1:c2]
            all_dist = (f0_vec.unsqueeze(-1).unsqueeze(-1) - neighbour).abs().sum(dim=1).squeeze(0)
            row, col = divmod(all_dist.argmin().item(), all_dist.shape[-1])
            handles[i][0] = r1 + row
            handles[i][1] = c1 + col
    return handles


def masked_adam_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: Tensor, skip: Tensor,
                 lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """``torch.optim.Adam`` (defaults, no weight decay) on one tensor, as device ops only, skipping the whole
    update (moments and step count included) where ``skip`` is True: the references do not step once every
    handle is done (or, behind a GradScaler, when the gradient is not finite), and deciding that on the host
    would cost a sync per step. Shared by the DragGAN and DragDiffusion fast engines."""
    go = ~skip
    t.add_(go.float())
    exp_avg.copy_(torch.where(go, exp_avg.lerp(grad, 1 - beta1), exp_avg))
    exp_avg_sq.copy_(torch.where(go, exp_avg_sq * beta2 + (1 - beta2) * grad * grad, exp_avg_sq))
    tt = t.clamp_min(1.0)
    bias1 = 1 - beta1**tt
    bias2_sqrt = torch.sqrt(1 - beta2**tt)
    denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
    param.copy_(torch.where(go, param - (lr / bias1) * exp_avg / denom, param))
