"""DragGAN on a StyleGAN2 generator: optimise the first styles of ``w+`` so handles move to targets.

Two modes with one meaning (spec: ../shared/specs/ref_draggan.md):

- ``reference``: the published step, literally (``viz/renderer.py``): full generator forward with the
  image, feature map upsampled to the image, per-handle tracking and ``grid_sample``, ``.item()`` reads,
  weight gradients of the whole generator computed and thrown away, ``torch.optim.Adam``. The parity
  oracle and the speed baseline.
- ``fast``: the same algorithm with the waste removed: frozen generator (gradients only to ``w``), the
  forward stops after the feature block, sampling and tracking on the native map through dragrt's kernels,
  a padded handle array (one graph for 1 to ``max_handles`` handles), a device-side Adam that skips the
  update once every handle is done (no host sync to decide), and on CUDA the whole step (forward,
  tracking, loss, backward, Adam) replayed from one CUDA graph. The image is rendered only for previews.

Phases of an edit: 1. ``start`` (latent, handles, targets, mask) -> 2. ``step`` until done (each returns
device tensors) -> 3. ``render`` when a picture is wanted.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dragrt.kernels import bilinear_sample
from dragrt.runtime import drag
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines import stepping
from dragrt.runtime.engines.stepping import StepResult

MODES = ("fast", "reference")


@dataclass
class DragGANConfig:
    """DragGAN's knobs. Defaults are the reference code's (gradio app), except where noted.

    Attributes:
        mode: ``"fast"`` or ``"reference"`` (see the module docstring). Same results; the reference is
            slower by design.
        lr: Adam step size on ``w`` (reference: 1e-3, every model).
        latent_space: ``"w+"`` (a style vector per layer, the default) or ``"w"`` (one vector repeated).
        num_free_ws: how many leading styles are optimised (reference: 6; the rest stay at ``w0``).
        r1, r2: motion-supervision disc radius and tracking window half-size, in pixels *at 512 px*;
            scaled by ``H / 512`` and rounded, as the reference does (3 / 12 -> 3 / 12 at 512, 6 / 24 at 1024).
            ``None`` (default): the reference's 3 / 12, except on generators under 256 px, where they would
            shrink below 2 / 6 px (0 / 2 px at 64: an empty disc) and are kept there
            (:func:`~dragrt.runtime.drag.draggan_default_radii`; a deliberate difference). A given radius that
            rounds to 0 px is an error.
        lambda_mask: weight of the fixed-region feature term (gradio and imgui apps: 20).
        tracking_metric: ``"l2"`` (the code) or ``"l1"`` (the paper).
        truncation_psi: truncation of the initial latent from a seed (reference: 0.7).
        noise_mode: StyleGAN noise inputs: ``"const"`` (reference), ``"random"`` or ``"none"``.
        feature_resolution: the block whose output is the feature map. ``None`` = DragGAN's b128 (its
            hard-coded index 5) on generators of 256 px and more; under 256 px the block at half the image
            resolution, as b128 is on a 256 px model, in both modes (a deliberate difference: at 128 px the
            reference's index 5 is the top block, near RGB, and under 128 px there is none, where the reference
            fails). On the zoo's StyleGAN2s the top block lost mouth corners in tracking: at 128 px, 32 seeds of
            the demo's edit ended 5.4 px from their targets on average with b128 and 4.7 px with b64, 50 and 56
            of 64 corners closer (``bench/tools/drag_seeds.py``; CONTRIBUTING.md); at 64 px b32 kept corners that
            b64 lost. ``feature_resolution=128`` on a 128 px model is the reference's choice. The rule:
            :func:`dragrt.runtime.drag.draggan_feature_resolution`.
        max_handles: padded size of the handle arrays in fast mode on CUDA (more handles -> an error, not a
            recapture); the most handles an edit may have. On the CPU the arrays hold exactly the edit's handles.
        max_steps: upper bound of :meth:`DragGANEngine.run` (the reference's gradio loop never stops by
            itself; the engine stops when every handle is within ``max(2 H / 512, 2)`` px, or here).
        cuda_graph: replay the fast step from a captured CUDA graph (CUDA only; captured at the first step).
    """

    mode: str = "fast"
    lr: float = 1e-3
    latent_space: str = "w+"
    num_free_ws: int = 6
    r1: float | None = None
    r2: float | None = None
    lambda_mask: float = 20.0
    tracking_metric: str = "l2"
    truncation_psi: float = 0.7
    noise_mode: str = "const"
    feature_resolution: int | None = None
    max_handles: int = 16
    max_steps: int = 500
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("latent_space", self.latent_space, ("w+", "w"))
        _choice("tracking_metric", self.tracking_metric, ("l2", "l1"))
        _choice("noise_mode", self.noise_mode, ("const", "random", "none"))
        _positive("lr", self.lr)
        for name in ("r1", "r2"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not (self.lambda_mask >= 0 and math.isfinite(self.lambda_mask)):
            raise ValueError(f"lambda_mask={self.lambda_mask!r} is not allowed; use a number >= 0")
        if not 0.0 <= self.truncation_psi <= 1.0:
            raise ValueError(f"truncation_psi={self.truncation_psi!r} is not allowed; use 0 to 1")
        for name in ("num_free_ws", "max_handles", "max_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use an integer >= 1")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} is not allowed; use a finite number > 0")


@dataclass
class _FastState:
    w: Tensor  # the optimised styles (the engine's ``w``), a leaf
    w0: Tensor  # [1, num_ws, w_dim] the start latent (fixed styles come from it)
    handles: Tensor  # [slots, 2] x, y (image px), integers after tracking (slots: stepping.handle_slots)
    targets: Tensor  # [slots, 2]
    active: Tensor  # [slots] bool (False: a padding row)
    refs: Tensor  # [slots, C] float32: feature at each initial handle
    feat0: Tensor | None  # [1, C, h, w] features of the first step (for the mask term)
    fixed: Tensor | None  # [1, 1, H, W] 1 = fixed region, or None
    exp_avg: Tensor
    exp_avg_sq: Tensor
    t: Tensor  # float32 scalar: Adam's step count (advances only on real updates)
    done: Tensor  # bool scalar
    loss: Tensor  # float32 scalar
    graph: torch.cuda.CUDAGraph | None = None
    n: int = 0
    readback: stepping.PinnedReadback = field(default_factory=stepping.PinnedReadback)


class DragGANEngine:
    """Drag editing on a :class:`~dragrt.runtime.models.stylegan2.Generator`.

    >>> engine = DragGANEngine(G)                       # doctest: +SKIP
    >>> engine.start(engine.latent_from_seed(0), handle_points=[[120, 200]], target_points=[[160, 190]])
    >>> for r in engine.run(): print(r.step, r.handles, r.done)
    >>> image = engine.render()                         # [1, 3, H, W] in [-1, 1]
    """

    def __init__(self, generator: torch.nn.Module, config: DragGANConfig | None = None,
                 runtime: RuntimeConfig | None = None) -> None:
        self.config = config or DragGANConfig()
        self.runtime = runtime or RuntimeConfig()
        self.device = self.runtime.torch_device()
        cfg = self.config
        if cfg.mode == "fast":
            # Fast mode freezes the generator it is given (eval mode, no parameter gradients).
            self.G = generator.to(self.device).eval().requires_grad_(False)
        else:
            # As the reference: its own module (the renderer rebuilds G from the checkpoint), left in train
            # mode with gradients on. A copy, so that the caller's generator (maybe shared with a fast
            # engine, whose compiled forward assumes eval mode) is not switched to train mode.
            self.G = copy.deepcopy(generator).to(self.device).train().requires_grad_(True)
        self.resolution = int(self.G.img_resolution)
        blocks = list(self.G.synthesis.block_resolutions)
        res = cfg.feature_resolution or drag.draggan_feature_resolution(self.resolution)
        if res not in blocks:
            raise ValueError(f"feature_resolution={res} is not a block of this generator; choose one of {blocks}")
        self.feature_resolution = res
        self.feature_index = blocks.index(res)
        self.size = (self.resolution, self.resolution)
        # the radii in the reference's units (pixels at 512) and in this generator's pixels
        self.r1, self.r2 = drag.draggan_default_radii(self.resolution, cfg.r1, cfg.r2)
        self.r1_px, self.r2_px = drag.draggan_radii(self.resolution, self.r1, self.r2)
        for name, value, px in (("r1", self.r1, self.r1_px), ("r2", self.r2, self.r2_px)):
            if px < 1:  # an empty motion disc (no gradient) or a 1-pixel tracking window (handles never move)
                raise ValueError(f"{name}={value:g} is {px} px at this generator's {self.resolution} px (radii are "
                                 f"in pixels at 512, scaled by H / 512 and rounded); use {name} >= "
                                 f"{drag.draggan_min_radius(self.resolution, 1):g} here (1 px)")
        self.stop_px = drag.draggan_stop_distance(self.resolution)
        if cfg.num_free_ws > self.G.num_ws:
            raise ValueError(f"num_free_ws={cfg.num_free_ws} exceeds this generator's {self.G.num_ws} styles")
        # The hot forward (b4..b128) compiled in fast mode when the runtime asks for it; the reference mode
        # always runs the module as published.
        mode = self.runtime.resolved_compile_mode() if cfg.mode == "fast" else None
        self._synthesis = torch.compile(self.G.synthesis, mode=mode) if mode else self.G.synthesis
        self.w: Tensor | None = None
        self.w0: Tensor | None = None
        self._fast: _FastState | None = None
        self._fast_states: dict[bool, _FastState] = {}
        self._ref: dict | None = None
        # Fast mode on CUDA runs on a stream of its own, from start() through warm-up, capture and replay
        # (why: stepping.on_stream).
        self._stream = torch.cuda.Stream(self.device) if (self.device.type == "cuda" and cfg.mode == "fast") else None

    def _on_engine_stream(self) -> contextlib.AbstractContextManager:
        return stepping.on_stream(self._stream, self.device)

    # --- phase 1: latent, handles, targets ----------------------------------------------------------------

    def latent_from_seed(self, seed: int) -> Tensor:
        """``w = mapping(z)`` with ``z = RandomState(seed).randn(1, z_dim)`` and the configured truncation,
        as the reference draws it. Returns ``[1, num_ws, w_dim]`` float32."""
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed={seed!r} is not allowed; use an integer from 0 to 2**32 - 1")
        z = torch.from_numpy(np.random.RandomState(int(seed)).randn(1, self.G.z_dim)).to(self.device, torch.float32)
        c = torch.zeros(1, self.G.c_dim, device=self.device)
        with torch.no_grad():
            # DragGAN's generator code (stylegan3's networks_stylegan2) never updates w_avg here, even in
            # train mode (update_emas=False): skip the stylegan2-ada training-mode update likewise.
            return self.G.mapping(z, c, truncation_psi=self.config.truncation_psi, skip_w_avg_update=True).float()

    def start(self, w: Tensor, handle_points, target_points, mask: Tensor | None = None) -> None:
        """Begin an edit from latent ``w`` ``[1, num_ws, w_dim]``.

        Args:
            handle_points, target_points: ``[[x, y], ...]`` image pixels (origin top-left), the same count,
                1 to ``max_handles``; rounded to whole pixels as the reference's points are.
            mask: ``[H, W]`` with 1 = the region that may change and 0 = fixed (the diffusers / DragDiffusion
                convention; the reference's internal fixed-region mask is ``1 - mask``), or ``None``.
        """
        cfg = self.config
        w = self._check_latent(w)
        handles = self._check_points("handle_points", handle_points)
        targets = self._check_points("target_points", target_points)
        if handles.shape != targets.shape:
            raise ValueError(f"handle_points has {len(handles)} points but target_points has {len(targets)}")
        fixed = self._check_mask(mask)
        with self._on_engine_stream():
            w0 = w.detach().clone()
            free = w.detach().clone() if cfg.latent_space == "w+" else w[:, 0, :].detach().clone()
            slots = stepping.handle_slots(len(handles), cfg.max_handles, self.device)
            reuse = stepping.kept_state(self._fast_states, fixed is not None, slots) if cfg.mode == "fast" else None
            if reuse is None:
                self.w0, self.w = w0, free.requires_grad_(True)
            else:  # the buffers a captured graph reads: refill them
                with torch.no_grad():
                    reuse.w.copy_(free)
                    reuse.w0.copy_(w0)
                self.w0, self.w = reuse.w0, reuse.w
            if cfg.mode == "reference":
                self._start_reference(handles, targets, fixed)
            else:
                self._start_fast(handles, targets, fixed, reuse, slots)

    def _check_latent(self, w: Tensor) -> Tensor:
        return check_latent("w", w, self.G.num_ws, self.G.w_dim).to(self.device)

    def _check_points(self, name: str, points) -> Tensor:
        t = stepping.check_points(name, points, self.config.max_handles)
        hi = self.resolution - 1
        if (t < 0).any() or (t > hi).any():
            raise ValueError(f"{name}: every coordinate must be within the image, 0 to {hi} px, got {t.tolist()}")
        return torch.round(t).float()

    def _check_mask(self, mask: Tensor | None) -> Tensor | None:
        if mask is None:
            return None
        m = torch.as_tensor(mask, dtype=torch.float32)
        if m.shape != self.size:
            raise ValueError(f"mask must be [H, W] = {list(self.size)} (1 = may change), got {tuple(m.shape)}")
        if not torch.isfinite(m).all() or (m < 0).any() or (m > 1).any():
            raise ValueError("mask values must be within 0 to 1 (1 = may change, 0 = fixed)")
        fixed = (1.0 - m).to(self.device)
        # As the reference: the fixed-region term only applies when the mask has both regions.
        return fixed if bool(fixed.min() == 0) and bool(fixed.max() == 1) else None

    def _ws(self) -> Tensor:
        cfg = self.config
        w = self.w if cfg.latent_space == "w+" else self.w.unsqueeze(1).repeat(1, cfg.num_free_ws, 1)
        return torch.cat([w[:, : cfg.num_free_ws], self.w0[:, cfg.num_free_ws:]], dim=1)

    # --- phase 2: steps -------------------------------------------------------------------------------------

    def step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One optimisation step. Returns device tensors ``(handles [P, 2], done [], loss [])`` without
        waiting for the device (reference mode reads values back, as the published code does)."""
        if self.w is None:
            raise RuntimeError("call start() before step()")
        if self.config.mode == "reference":
            return self._step_reference()
        return self._step_fast()

    def run(self, max_steps: int | None = None) -> Iterator[StepResult]:
        """Steps until every handle is within the stop distance or ``max_steps``; yields a result per step.

        In fast mode the host reads step ``k`` while the device already runs step ``k + 1`` (the extra step
        makes no update once done), so the GPU never waits for the host.
        """
        limit = stepping.run_limit(max_steps, self.config.max_steps)
        return stepping.pipelined_run(self.step, self._snapshot, self._result, limit)

    def _snapshot(self, handles: Tensor, done: Tensor, loss: Tensor) -> tuple:
        if self.device.type != "cuda" or self.config.mode == "reference":
            return stepping.host_copy(handles, done, loss)
        with self._on_engine_stream():
            return self._fast.readback.copy(handles, done, loss)

    def _result(self, k: int, snapshot: tuple, t_last: float) -> StepResult:
        return stepping.step_result(k, snapshot, t_last, lambda h: h, self._targets_host)

    # --- fast mode ------------------------------------------------------------------------------------------

    def _features(self, ws: Tensor) -> Tensor:
        _, feats = self._synthesis(ws, noise_mode=self.config.noise_mode, return_features=True,
                                   stop_after=self.feature_resolution)
        return feats[-1]

    def _start_fast(self, handles: Tensor, targets: Tensor, fixed: Tensor | None, reuse: _FastState | None,
                    slots: int) -> None:
        dev = self.device
        n = len(handles)
        pad = torch.zeros(slots, 2, device=dev)
        h_buf, t_buf = pad.clone(), pad.clone()
        h_buf[:n], t_buf[:n] = handles.to(dev), targets.to(dev)
        active = torch.zeros(slots, dtype=torch.bool, device=dev)
        active[:n] = True
        with torch.no_grad():
            feat0 = self._features(self._ws())
            refs = bilinear_sample(feat0, h_buf, self.size)[0].float().contiguous()
        fixed4 = None if fixed is None else fixed[None, None]
        if reuse is None:
            # One state (buffers + captured step graph) per forward kind (with / without the mask term), kept
            # across start() calls: a new drag refills the buffers instead of capturing again.
            reuse = _FastState(
                w=self.w, w0=self.w0, handles=h_buf, targets=t_buf, active=active, refs=refs,
                feat0=feat0.detach() if fixed is not None else None, fixed=fixed4,
                exp_avg=torch.zeros_like(self.w), exp_avg_sq=torch.zeros_like(self.w),
                t=torch.zeros((), device=dev), done=torch.zeros((), dtype=torch.bool, device=dev),
                loss=torch.zeros((), device=dev))
            self._fast_states[fixed is not None] = reuse
        else:
            with torch.no_grad():
                for dst, src in ((reuse.handles, h_buf), (reuse.targets, t_buf), (reuse.active, active),
                                 (reuse.refs, refs), (reuse.feat0, feat0), (reuse.fixed, fixed4)):
                    if dst is not None:
                        dst.copy_(src)
                for t in (reuse.exp_avg, reuse.exp_avg_sq, reuse.t, reuse.loss):
                    t.zero_()
                reuse.done.fill_(False)
        self._fast = reuse
        self._n_handles = n
        self._targets_host = targets.tolist()

    def _fast_body(self) -> None:
        """The whole fast step on static buffers (capturable): track, test, loss, backward, masked Adam."""
        cfg, st = self.config, self._fast
        w = self.w
        feat = self._features(self._ws())
        with torch.no_grad():
            new = drag.draggan_track(feat.detach(), st.refs, st.handles, self.size, self.r2_px, cfg.tracking_metric)
            st.handles.copy_(torch.where(st.active[:, None], new, st.handles))
            dist = torch.linalg.vector_norm(st.targets - st.handles, dim=1)
            st.done.copy_(((dist <= self.stop_px) | ~st.active).all())
        loss = drag.draggan_motion_loss(feat, st.handles, st.targets, st.active, self.size, self.r1_px)
        if st.fixed is not None:
            loss = loss + drag.draggan_mask_loss(feat, st.feat0, st.fixed, self.size, cfg.lambda_mask)
        st.loss.copy_(loss.detach())
        if stepping.finished_on_host(self.device, st.done):  # no update to make: no backward
            return
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            drag.masked_adam_(w, grad, st.exp_avg, st.exp_avg_sq, st.t, st.done, cfg.lr)

    def _step_fast(self) -> tuple[Tensor, Tensor, Tensor]:
        st = self._fast
        stepping.fast_step(st, self.config.cuda_graph and self.device.type == "cuda",
                           lambda: (self.w, st.handles, st.exp_avg, st.exp_avg_sq, st.t, st.done, st.loss),
                           self._fast_body, self._stream, self.device)
        return st.handles[: self._n_handles], st.done, st.loss

    # --- reference mode -------------------------------------------------------------------------------------

    def _start_reference(self, handles: Tensor, targets: Tensor, fixed: Tensor | None) -> None:
        self._ref = {
            "points": [[int(y), int(x)] for x, y in handles.tolist()],
            "targets": [[int(y), int(x)] for x, y in targets.tolist()],
            "state": drag.DragGANLiteralState(),
            "mask": fixed,
            "optim": torch.optim.Adam([self.w], lr=self.config.lr),
        }
        self._n_handles = len(handles)
        self._targets_host = targets.tolist()

    def _step_reference(self) -> tuple[Tensor, Tensor, Tensor]:
        cfg, ref = self.config, self._ref
        img, feats = self.G.synthesis(self._ws(), noise_mode=cfg.noise_mode, return_features=True)
        loss, stop = drag.draggan_step_literal(feats[self.feature_index], self.size, ref["state"], ref["points"],
                                               ref["targets"], ref["mask"], cfg.lambda_mask, self.r1, self.r2)
        if not stop:
            ref["optim"].zero_grad()
            loss.backward()
            ref["optim"].step()
        handles = torch.tensor([[x, y] for y, x in ref["points"]], dtype=torch.float32)
        loss_t = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        return handles, torch.tensor(stop), loss_t

    # --- phase 3: pictures ----------------------------------------------------------------------------------

    @torch.no_grad()
    def render(self, w: Tensor | None = None) -> Tensor:
        """The image of ``w`` ``[1, num_ws, w_dim]`` (default: the current latent), ``[1, 3, H, W]`` float32 in
        about [-1, 1]."""
        if w is None:
            if self.w is None:
                raise RuntimeError("call start() before render(), or pass a latent")
            with self._on_engine_stream():
                w = self._ws().detach()
        with self._on_engine_stream():
            return self.G.synthesis(w.to(self.device), noise_mode=self.config.noise_mode).float()

    def latent(self) -> Tensor:
        """The full ``w+`` ``[1, num_ws, w_dim]`` the generator currently sees (free styles + fixed ones)."""
        with self._on_engine_stream():
            return self._ws().detach().clone()

    @property
    def handles(self) -> list[list[float]]:
        """Current handle positions ``[[x, y], ...]`` (reads the device)."""
        if self._fast is not None and self.config.mode == "fast":
            with self._on_engine_stream():
                out = self._fast.handles[: self._n_handles].clone()
            return out.tolist()
        return [[float(x), float(y)] for y, x in self._ref["points"]]


def check_latent(name: str, w: object, num_ws: int, w_dim: int) -> Tensor:
    """``w`` (tensor or numpy array) as a detached float32 copy ``[1, num_ws, w_dim]`` with finite values, else a
    ``ValueError`` naming ``name`` and the expected shape."""
    if isinstance(w, np.ndarray):
        w = torch.from_numpy(w)
    if not isinstance(w, Tensor) or tuple(w.shape) != (1, num_ws, w_dim) or not w.is_floating_point():
        got = f"shape {list(w.shape)}, {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a float [1, {num_ws}, {w_dim}] latent (num_ws, w_dim of this generator), "
                         f"got {got}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return w.detach().to(torch.float32).clone()
