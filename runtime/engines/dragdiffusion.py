"""DragDiffusion on a Stable Diffusion 1.x pipeline: optimise the inverted latent ``z_t`` so handles move to targets.

Two modes with one meaning (spec: ../shared/specs/ref_dragdiffusion.md; defaults as its file lists them):

- ``reference``: the published path (``run_drag`` + ``drag_diffusion_update``), reload-free but otherwise
  literal: the UNet cast to fp32 with its weights requiring gradients (the published code never freezes
  them), autocast fp16 + GradScaler on CUDA, the full UNet every step, the feature map upsampled densely to
  half the image size, per-handle Python loops with ``.item()`` reads, ``torch.optim.Adam``; the final
  denoise with the reference's mutual self-attention (queries concatenated along the token axis), both
  branches decoded. It runs on copies of the networks, so it never changes the shared pipeline.
- ``fast``: the same algorithm with the waste removed: frozen fp16/bf16 UNet (gradients only to ``z_t``), the
  forward stops after ``up_blocks[2]`` when no mask is drawn (the loss then only needs those features), sparse
  sampling and tracking on the native 64x64 map through dragrt's kernels, a padded handle array, a device-side
  Adam with the GradScaler's skip-and-halve rule (no host syncs), the UNet's blocks compiled and the whole step
  replayed from one CUDA graph; the final denoise replays one captured UNet call per step and decodes only the
  edited branch. Inversions and LoRAs are cached by content hash.

Phases of an edit (one entry point, :meth:`DragDiffusionEngine.edit`, runs them all):
1. ``prepare(image, prompt, lora=...)``: per-image LoRA (optional), VAE encode, DDIM inversion (cached).
2. ``start(handle_points, target_points, mask)``: initial features ``F0`` and ``x_{t-1}`` of the inverted latent.
3. ``step()`` / ``run()``: motion supervision + point tracking until every handle is within 2 px (half
   resolution) of its target or ``max_steps``.
4. ``denoise()``: 35 DDIM steps of ``[original, edited]`` with mutual self-attention; the edited image.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dragrt.kernels import bilinear_sample
from dragrt.runtime import drag
from dragrt.runtime.config import RuntimeConfig
from dragrt.runtime.engines import stepping
from dragrt.runtime.engines.stepping import StepResult
from dragrt.runtime.models.attention import (
    ATTENTION_BACKENDS,
    AttnProcessor,
    BranchZeroKVProcessor,
    mutual_self_attention,
    resolve_attention_backend,
    set_attention_backend,
    transformer_self_attentions,
)
from dragrt.runtime.models.sd import SDComponents, UNetFeatureTap

MODES = ("fast", "reference")


@dataclass
class DragDiffusionConfig:
    """DragDiffusion's knobs; defaults are the reference's (``drag_ui.py`` real-image tab, spec §1-§5).

    Attributes:
        mode: ``"fast"`` or ``"reference"`` (module docstring). Same algorithm; the reference is slower by design.
        num_inference_steps: DDIM schedule length (50).
        inversion_strength: fraction of the schedule inverted (0.7 -> 35 steps, ``t = timesteps[15]`` = 681).
        lr: Adam step size on ``z_t`` ("latent lr", 0.01).
        max_steps: at most this many drag iterations ("n_pix_step", 80).
        lambda_mask: weight of the ``x_{t-1}`` term outside the mask (0.1); it applies only when a mask is drawn.
        r_m: motion-supervision patch radius on the half-resolution grid (1: 3x3).
        r_p: tracking window radius (3: 7x7).
        feature_block: ``unet.up_blocks`` index of the feature map (2: the reference's ``unet_feature_idx=[3]``).
        stop_distance: every handle within this many half-resolution px of its target ends the drag (2.0).
        start_layer: first transformer block with mutual self-attention in the final denoise (10 of 16).
        start_step: first denoise step with mutual self-attention (0).
        lora: train a per-image LoRA before inverting (the reference's optional "Train LoRA" button). Off by
            default as a choice of the caller, not of the algorithm; see :class:`LoRAConfig` for its knobs.
        lora_config: the LoRA's knobs (rank 16, lr 5e-4, 80 steps, batch 4); ``None`` = defaults.
        attention: ``"auto"`` (SDPA), ``"sdpa"``, ``"cudnn"`` (SDPA with cuDNN's fused attention first, CUDA
            only) or ``"xformers"`` for the fast mode's attention.
        fuse_qkv: fast mode: self-attention's q, k and v from one matmul with the three weights stacked
            (:class:`~dragrt.runtime.models.attention.AttnProcessor`); the same function. Off until timed
            (``bench/tools/profile_dragdiffusion.py OUT cl cl-fusedqkv``).
        max_handles: padded size of the fast mode's handle arrays on CUDA (more handles -> an error, not a
            recapture); the most handles an edit may have. On the CPU the arrays hold exactly the edit's handles.
        cuda_graph: replay the fast drag step, the inversion and denoise UNet calls and the LoRA training step
            from CUDA graphs (CUDA only).
        reuse_original_branch: fast mode: keep the original branch's self-attention keys and values of the final
            denoise (they depend on the prepared image only) and, for later renders of the same prepared image
            (a session's next drags), denoise the edited branch alone against them: batch 1 instead of 2, the
            same numbers. Costs their memory (SD1.5 at 512 px, start_layer 10: ~0.8 GB in fp16).
        channels_last: fast mode on CUDA: run the UNet in channels-last memory format, converting the given
            pipeline's UNet in place (diffusers' ``pipe.unet.to(memory_format=torch.channels_last)``). Measured on
            an H200 at 512 px: drag step 9.45 against 12.83 ms in NCHW, edit 0.96 against 1.21 s
            (``dragdiffusion-layout``). The reference mode always runs NCHW (the published layout): NCHW copies,
            and its LoRA trains with NCHW weights swapped in (:func:`~dragrt.runtime.models.layout.nchw_weights`).
            Fast engines sharing one pipeline must agree on it: converting replaces the UNet's weight tensors,
            which another engine's captured CUDA graphs still point to.
        compile: compile the UNet's blocks with ``torch.compile`` in fast mode (``RuntimeConfig.compile_mode``
            picks the mode; ``auto`` = on CUDA only). The per-image LoRA trains through them too: its first
            training compiles their training variants once for the process.
    """

    mode: str = "fast"
    num_inference_steps: int = 50
    inversion_strength: float = 0.7
    lr: float = 0.01
    max_steps: int = 80
    lambda_mask: float = 0.1
    r_m: int = 1
    r_p: int = 3
    feature_block: int = 2
    stop_distance: float = 2.0
    start_layer: int = 10
    start_step: int = 0
    lora: bool = False
    lora_config: Any = None
    attention: str = "auto"
    fuse_qkv: bool = False
    max_handles: int = 16
    cuda_graph: bool = True
    reuse_original_branch: bool = True
    channels_last: bool = True
    compile: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; choose one of: {', '.join(MODES)}")
        for name in ("num_inference_steps", "max_steps", "r_m", "r_p", "max_handles"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= 1")
        for name in ("feature_block", "start_layer", "start_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} is not allowed; use an integer >= 0")
        if not (isinstance(self.inversion_strength, (int, float)) and 0 < self.inversion_strength <= 1):
            raise ValueError(f"inversion_strength={self.inversion_strength!r} is not allowed; use a number in (0, 1]")
        if round(self.inversion_strength * self.num_inference_steps) < 1:
            raise ValueError(f"inversion_strength={self.inversion_strength} x num_inference_steps="
                             f"{self.num_inference_steps} inverts no step; raise either")
        for name in ("lr", "stop_distance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} is not allowed; use a finite number > 0")
        lam = self.lambda_mask
        if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lambda_mask={self.lambda_mask!r} is not allowed; use a finite number >= 0")
        for name in ("lora", "fuse_qkv", "cuda_graph", "reuse_original_branch", "channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use True or False")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not allowed; choose one of: "
                             f"{', '.join(ATTENTION_BACKENDS)}")

    @property
    def inversion_steps(self) -> int:
        """How many DDIM steps are inverted (and denoised): ``round(strength * num_inference_steps)``."""
        return round(self.inversion_strength * self.num_inference_steps)


@dataclass
class DragDiffusionResult:
    """What :meth:`DragDiffusionEngine.edit` returns.

    ``image``: ``[1, 3, H, W]`` float32 in [0, 1] (the edited image, input size). ``handles``: final handle
    positions ``[[x, y], ...]`` in image pixels. ``steps``: drag iterations run. ``timings``: seconds per phase
    (``lora``, ``inversion``, ``start``, ``drag``, ``denoise``, ``total``). ``latent``: the optimised ``z_t``.
    """

    image: Tensor
    handles: list[list[float]]
    steps: int
    timings: dict[str, float]
    latent: Tensor
    history: list[StepResult] = field(default_factory=list)


@dataclass
class _Prepared:
    image: Tensor  # [1, 3, H, W] in [-1, 1], on the device
    prompt: str
    text_emb: Tensor  # [1, 77, D] in the UNet dtype
    z_t: Tensor  # [1, 4, h, w] float32 inverted latent
    t: int  # the drag timestep
    denoise_timesteps: list[int]
    denoise_coefficients: list[tuple[float, float]]  # (a, b) of each denoise step: x_prev = a * x + b * eps
    lora: dict[str, Tensor] | None
    a: float  # x_{t-1} = a * z_t + b * eps (DDIM, eta 0)
    b: float


@dataclass
class _FastState:
    z: Tensor  # [1, 4, h, w] float32 leaf being optimised
    handles: Tensor  # [slots, 2] x, y on the half-resolution grid (slots: stepping.handle_slots)
    targets: Tensor
    init_handles: Tensor
    active: Tensor  # [slots] bool (False: a padding row)
    refs: Tensor  # [slots, C] features at the initial handles (from F0)
    x_prev0: Tensor | None  # [1, 4, h, w] initial x_{t-1} (mask term)
    keep: Tensor | None  # [1, 1, h, w] 1 - mask at latent resolution
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_t: Tensor
    step: Tensor  # float32 scalar: iterations run (tracking starts at 1)
    scale: Tensor  # GradScaler's loss scale
    done: Tensor
    loss: Tensor
    graph: torch.cuda.CUDAGraph | None = None
    n: int = 0
    readback: stepping.PinnedReadback = field(default_factory=stepping.PinnedReadback)


class DragDiffusionEngine:
    """DragDiffusion on loaded SD components (loaded once; the engine keeps them).

    >>> sd = load_sd("path/to/sd15")                                   # doctest: +SKIP
    >>> engine = DragDiffusionEngine(sd)
    >>> result = engine.edit(image, "a photo of a cat", handle_points=[[200, 260]], target_points=[[240, 260]])
    >>> result.image.shape                                             # [1, 3, H, W] in [0, 1]
    """

    def __init__(self, components: SDComponents, config: DragDiffusionConfig | None = None,
                 runtime: RuntimeConfig | None = None, *, cache: Any = None) -> None:
        self.config = cfg = config or DragDiffusionConfig()
        self.runtime = runtime or RuntimeConfig()
        self.device = self.runtime.torch_device()
        self.sd = components
        n_up = len(components.unet.up_blocks)
        if not cfg.feature_block < n_up:
            raise ValueError(f"feature_block={cfg.feature_block} is out of range; this UNet has {n_up} up blocks")
        self.dtype = next(components.unet.parameters()).dtype
        self.cache = cache
        if cfg.mode == "fast":
            self.attention = resolve_attention_backend(cfg.attention, self.device)
            self.unet = components.unet
            if cfg.channels_last and self.device.type == "cuda":
                self.unet.to(memory_format=torch.channels_last)  # before any compile or capture sees a layout
            set_attention_backend(self.unet, self.attention, fuse_qkv=cfg.fuse_qkv)
            mode = self.runtime.resolved_compile_mode() if cfg.compile else None
            if mode:
                _compile_blocks(self.unet, mode)
        else:
            self.attention = "math"
            # The reference's networks as it runs them: fp16 for inversion and denoise, an fp32 copy with weight
            # gradients for the drag. Copies: the shared pipeline (maybe compiled by a fast engine) stays as is.
            # run_drag calls set_default_attn_processor (diffusers' classic score-matrix attention): "math".
            self.unet = _plain_copy(components.unet)
            set_attention_backend(self.unet, "math")
            self.unet_fp32 = _plain_copy(components.unet).float().requires_grad_(True)
            set_attention_backend(self.unet_fp32, "math")
        self._stream = torch.cuda.Stream(self.device) if (self.device.type == "cuda" and cfg.mode == "fast") else None
        self.prepared: _Prepared | None = None
        self._base_fingerprint: str | None = None
        self._fast: _FastState | None = None
        # One fast state (buffers + captured step graph) per forward kind (with / without the mask term), kept
        # across start() calls and across prepared images of the same size and schedule (the prompt embedding
        # is refilled in place): a new drag refills the buffers instead of capturing again, so an interactive
        # run starts with its first step.
        self._fast_states: dict[bool, _FastState] = {}
        self._ref: dict | None = None
        self._unet_graphs: dict[tuple, dict[str, Any]] = {}  # whole-UNet graphs (inversion, denoise)
        # The final denoise's original-branch keys/values per step and mutual layer, for the prepared image they
        # belong to (reuse_original_branch), and the per-layer processors that record / replay them.
        self._kv_store: tuple[_Prepared, list[list[tuple[Tensor, Tensor]]]] | None = None
        self._kv_procs: list[BranchZeroKVProcessor] | None = None
        self._graph_key: tuple | None = None
        self._text_emb: Tensor | None = None

    def _on_engine_stream(self) -> contextlib.AbstractContextManager:
        return stepping.on_stream(self._stream, self.device)

    # --- phase 1: LoRA, encode, invert ----------------------------------------------------------------------

    def prepare(self, image: Any, prompt: str = "", *, lora: Any = None, progress: bool = False) -> _Prepared:
        """Encode and invert ``image`` with ``prompt`` (cached by content), training or applying a LoRA first.

        Args:
            image: PIL image, uint8 ``[H, W, 3]`` array, or float ``[1, 3, H, W]`` tensor in [-1, 1]; H and W
                multiples of 64 (the UNet halves the 1/8-size latent three times).
            prompt: the text prompt (the reference inverts with it; "" is allowed).
            lora: ``None`` (train one when ``config.lora`` is set, else none), a LoRA state dict, or a path to
                a ``pytorch_lora_weights.safetensors`` (diffusers or DragDiffusion's older key format).
        """
        from dragrt.runtime import inversion as inv
        from dragrt.runtime.models import lora as lora_mod

        cfg = self.config
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        img = _image_tensor(image).to(self.device)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        self._set_lora(None)  # the previous image's LoRA must not be part of this one's training or key
        self._kv_store = None  # the previous image's original-branch keys/values (memory for this one's work)
        if self._base_fingerprint is None:
            self._base_fingerprint = inv.components_fingerprint(self.sd)  # once, on the base weights (~1 s)
        weights = None
        if isinstance(lora, (str, bytes)) or hasattr(lora, "__fspath__"):
            weights = lora_mod.load_lora(lora)
        elif isinstance(lora, dict):
            weights = lora
        elif lora is not None:
            raise ValueError(f"lora must be None, a LoRA state dict or a path, got {type(lora).__name__}")
        elif cfg.lora:
            lcfg = cfg.lora_config or lora_mod.LoRAConfig()
            weights = lora_mod.train_or_load_lora(self.sd, img, prompt, lcfg, mode=cfg.mode, cache=self.cache,
                                                  model_fingerprint=self._base_fingerprint, progress=progress,
                                                  cuda_graph=cfg.cuda_graph)
        times["lora"] = time.perf_counter() - t0
        self._set_lora(weights)
        icfg = inv.InversionConfig(num_inference_steps=cfg.num_inference_steps, strength=cfg.inversion_strength,
                                   guidance_scale=1.0)
        t1 = time.perf_counter()
        lora_fp = lora_mod.lora_fingerprint(weights) if weights is not None else None
        with self._unet_for_inversion() as unet_fn:
            res = inv.invert_image(self.sd, img, prompt, icfg, lora_fingerprint=lora_fp, cache=self.cache,
                                   model_fingerprint=self._base_fingerprint, mode=cfg.mode, unet_fn=unet_fn,
                                   progress=progress)
        times["inversion"] = time.perf_counter() - t1
        emb = inv.encode_prompt(self.sd, prompt).to(self.device, self.dtype)
        sched = inv.ddim_schedule(self.sd.scheduler, cfg.num_inference_steps)  # once: it builds a scheduler
        a, b = inv.ddim_step_coefficients(sched, int(res.t))
        # the final denoise steps with diffusers' DDIMScheduler.step (its boundary rule)
        denoise_coefficients = [tuple(inv.ddim_step_coefficients(sched, int(t), prev_inclusive=True))
                                for t in res.denoise_timesteps]
        # Captured graphs read the prompt embedding in place and bake in the latent size and the drag timestep: a
        # new image of the same size and schedule refills the embedding and keeps them (no recapture).
        graph_key = (tuple(res.z_t.shape), int(res.t), tuple(emb.shape))
        if graph_key == self._graph_key:
            self._text_emb.copy_(emb)
        else:
            self._fast_states = {}
            self._graph_key, self._text_emb = graph_key, emb
        self._fast = self._ref = None
        self.prepared = _Prepared(image=img, prompt=prompt, text_emb=self._text_emb, z_t=res.z_t.detach().float(),
                                  t=int(res.t), denoise_timesteps=[int(x) for x in res.denoise_timesteps],
                                  denoise_coefficients=denoise_coefficients, lora=weights, a=a, b=b)
        self.prepared_timings = times
        return self.prepared

    @contextlib.contextmanager
    def _unet_for_inversion(self) -> Iterator[Callable | None]:
        """The UNet call the inversion uses: the engine's own (fast: compiled blocks replayed from a CUDA graph;
        reference: its fp16 copy, eager)."""
        unet = self.unet
        if self._use_graphs():

            def call(latent: Tensor, t: Any, emb: Tensor) -> Tensor:
                return self._unet_graph_call("plain", latent, t, emb).clone()
        else:
            def call(latent: Tensor, t: Any, emb: Tensor) -> Tensor:
                return unet(latent.to(self.dtype), t, encoder_hidden_states=emb.to(self.dtype)).sample

        yield call

    def _set_lora(self, weights: dict[str, Tensor] | None) -> None:
        """Fuse the LoRA into the UNet weights the engine runs (fast: the shared frozen UNet, restored exactly on the
        next prepare or :meth:`close`; reference: its own copies). The published code keeps LoRA attention
        processors instead (rank-16 side products, well under 1% of the UNet's work): the reference mode fuses
        too, a deliberate and documented difference."""
        from dragrt.runtime.models import lora as lora_mod

        exit_stack = getattr(self, "_lora_stack", None)
        if exit_stack is not None:
            exit_stack.close()
            self._lora_stack = None
        if weights is None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(lora_mod.fused_lora(self.unet, weights))
        if self.config.mode == "reference":
            stack.enter_context(lora_mod.fused_lora(self.unet_fp32, weights))
        self._lora_stack = stack  # captured graphs read the weights in place: replays see the fused weights

    def close(self) -> None:
        """Undo a fused LoRA (the shared UNet gets its exact weights back) and drop captured graphs, the kept LoRA
        training step's included (:func:`~dragrt.runtime.models.lora.release_lora_graphs`)."""
        from dragrt.runtime.models import lora as lora_mod

        self._set_lora(None)
        self._drop_graphs()
        if self.config.mode == "fast":
            lora_mod.release_lora_graphs(self.unet)

    def _drop_graphs(self) -> None:
        """Forget the edit state and the captured graphs (they read this image's prompt embedding and latents)."""
        self._fast = self._ref = None
        self._fast_states = {}
        self._unet_graphs = {}
        self._graph_key = self._text_emb = None
        self._kv_store = self._kv_procs = None  # (the graphs that read the processors' buffers are gone)

    # --- phase 2: start --------------------------------------------------------------------------------------

    def start(self, handle_points, target_points, mask: Any = None, *, latent: Tensor | None = None) -> None:
        """Begin the drag on the prepared image.

        Args:
            latent: start from this ``z_t`` ``[1, 4, h, w]`` instead of the inversion (a second drag continues
                from the first one's result, as in an interactive session); the final denoise still pairs it with
                the inverted latent as the un-edited branch.
            handle_points, target_points: ``[[x, y], ...]`` image pixels (origin top-left), same count, 1 to
                ``max_handles``; mapped to the half-resolution grid and rounded as the reference does.
            mask: ``[H, W]`` (image size) with 1 = may change, 0 = keep, or ``None`` (no mask: no regulariser,
                as in the reference when nothing is drawn).
        """
        if self.prepared is None:
            raise RuntimeError("call prepare(image, prompt) before start()")
        p = self.prepared
        H, W = p.image.shape[-2:]
        self.size = (int(0.5 * H), int(0.5 * W))  # the reference's sup_res
        handles = self._grid_points("handle_points", handle_points, H, W)
        targets = self._grid_points("target_points", target_points, H, W)
        if handles.shape != targets.shape:
            raise ValueError(f"handle_points has {len(handles)} points but target_points has {len(targets)}")
        keep = self._check_mask(mask, H, W)
        self._z_start = p.z_t if latent is None else self._check_latent(latent)
        self._n_handles = len(handles)
        self._targets_host = [[x * W / self.size[1], y * H / self.size[0]] for x, y in targets.tolist()]
        with self._on_engine_stream():
            if self.config.mode == "reference":
                self._start_reference(handles, targets, keep)
            else:
                self._start_fast(handles, targets, keep)

    def _grid_points(self, name: str, points: Any, H: int, W: int) -> Tensor:
        t = stepping.check_points(name, points, self.config.max_handles)
        if (t[:, 0] < 0).any() or (t[:, 0] > W - 1).any() or (t[:, 1] < 0).any() or (t[:, 1] > H - 1).any():
            raise ValueError(f"{name}: x must be within 0 to {W - 1} and y within 0 to {H - 1} px, got {t.tolist()}")
        # The reference: torch.round([y / H * sup_h, x / W * sup_w]) in float32 (round half to even). A point in
        # the last pixel row/column can round to sup_h / sup_w, one past the grid (the reference then indexes
        # out of range); we clamp to the grid instead.
        gh, gw = self.size
        x = torch.round((t[:, 0] / W * gw).float()).clamp(0, gw - 1)
        y = torch.round((t[:, 1] / H * gh).float()).clamp(0, gh - 1)
        return torch.stack([x, y], dim=1)

    def _check_latent(self, latent: Any) -> Tensor:
        shape = tuple(self.prepared.z_t.shape)
        if not isinstance(latent, Tensor) or tuple(latent.shape) != shape or not latent.is_floating_point():
            got = f"shape {list(latent.shape)}" if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"latent must be a float {list(shape)} z_t of the prepared image, got {got}")
        if not torch.isfinite(latent).all():
            raise ValueError("latent contains NaN or infinite values")
        return latent.detach().float().to(self.device)

    def _check_mask(self, mask: Any, H: int, W: int) -> Tensor | None:
        if mask is None:
            return None
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask, dtype=torch.float32)
        if m.dim() != 2 or tuple(m.shape) != (H, W):
            raise ValueError(f"mask must be [H, W] = [{H}, {W}] (1 = may change), got {tuple(m.shape)}")
        if not torch.isfinite(m).all() or (m < 0).any():
            raise ValueError("mask values must be >= 0 (0 = keep, anything above 0 = may change)")
        # The reference: mask > 0 -> 1, nearest to sup_res, nearest again to the latent size.
        m = (m > 0).float()[None, None]
        m = F.interpolate(m, self.size, mode="nearest")
        h, w = self.prepared.z_t.shape[-2:]
        m = F.interpolate(m, (h, w), mode="nearest")
        if m.sum() == 0:
            return None  # using_mask = interp_mask.sum() != 0
        return (1.0 - m).to(self.device)

    def _unet_dtype_autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else contextlib.nullcontext()

    def _start_fast(self, handles: Tensor, targets: Tensor, keep: Tensor | None) -> None:
        cfg, p, dev = self.config, self.prepared, self.device
        n = len(handles)
        slots = stepping.handle_slots(n, cfg.max_handles, dev)
        h_buf = torch.zeros(slots, 2, device=dev)
        t_buf = torch.zeros(slots, 2, device=dev)
        h_buf[:n], t_buf[:n] = handles.to(dev), targets.to(dev)
        active = torch.zeros(slots, dtype=torch.bool, device=dev)
        active[:n] = True
        z = self._z_start.clone().to(dev)
        with torch.no_grad():
            feat0, eps0 = self._features(z, full=keep is not None)
            refs = bilinear_sample(feat0, h_buf, self.size)[0].float().contiguous()
            x_prev0 = (p.a * z + p.b * eps0.float()) if keep is not None else None
        st = stepping.kept_state(self._fast_states, keep is not None, slots)
        if st is None:
            st = _FastState(
                z=z.requires_grad_(True), handles=h_buf, targets=t_buf, init_handles=h_buf.clone(), active=active,
                refs=refs, x_prev0=x_prev0, keep=keep,
                exp_avg=torch.zeros_like(z), exp_avg_sq=torch.zeros_like(z), adam_t=torch.zeros((), device=dev),
                step=torch.zeros((), device=dev), scale=torch.full((), 65536.0, device=dev),
                done=torch.zeros((), dtype=torch.bool, device=dev), loss=torch.zeros((), device=dev))
            self._fast_states[keep is not None] = st
        else:  # refill the buffers a captured graph reads (same shapes: same image, padded handles)
            with torch.no_grad():
                for dst, src in ((st.z, z), (st.handles, h_buf), (st.targets, t_buf), (st.init_handles, h_buf),
                                 (st.active, active), (st.refs, refs), (st.x_prev0, x_prev0), (st.keep, keep)):
                    if dst is not None:
                        dst.copy_(src)
                for t in (st.exp_avg, st.exp_avg_sq, st.adam_t, st.step, st.loss):
                    t.zero_()
                st.scale.fill_(65536.0)
                st.done.fill_(False)
        self._fast = st

    def _features(self, z: Tensor, full: bool) -> tuple[Tensor, Tensor | None]:
        """``up_blocks[feature_block]`` output ``[1, C, h', w']`` and (``full``) the UNet's eps ``[1, 4, h, w]``;
        without ``full`` the forward stops after the feature block."""
        p = self.prepared
        tap = UNetFeatureTap(self.unet, [self.config.feature_block], stop_after=not full)
        t = torch.full((1,), p.t, device=self.device, dtype=torch.long)
        eps = tap.run(z.to(self.dtype), t, encoder_hidden_states=p.text_emb)
        return tap.features[self.config.feature_block], eps

    def _fast_body(self) -> None:
        """One fast drag iteration on static buffers (capturable): forward, track, test, loss, backward, Adam."""
        cfg, st, p = self.config, self._fast, self.prepared
        feat, eps = self._features(st.z, full=st.keep is not None)
        with torch.no_grad():
            new = drag.dragdiffusion_track(feat.detach(), st.refs, st.handles, self.size, cfg.r_p)
            tracked = st.active[:, None] & (st.step > 0)  # the reference tracks from the second iteration
            st.handles.copy_(torch.where(tracked, new, st.handles))
            dist = torch.linalg.vector_norm(st.targets - st.handles, dim=1)
            st.done.copy_(((dist < cfg.stop_distance) | ~st.active).all())
        loss = drag.dragdiffusion_motion_loss(feat, st.handles, st.targets, st.active, self.size, cfg.r_m)
        if st.keep is not None:
            x_prev = p.a * st.z + p.b * eps.float()
            loss = loss + cfg.lambda_mask * ((x_prev - st.x_prev0) * st.keep).abs().sum()
        with torch.no_grad():
            st.loss.copy_(loss.detach())
            st.step.add_(1.0)
        if stepping.finished_on_host(self.device, st.done):  # no update to make (nor a scale to halve): no backward
            return
        (grad,) = torch.autograd.grad(loss * st.scale, st.z)
        with torch.no_grad():
            grad = grad / st.scale
            finite = torch.isfinite(grad).all()
            # GradScaler: a non-finite gradient skips the update and halves the scale (its growth interval, 2000
            # good steps, is never reached within a drag).
            drag.masked_adam_(st.z, torch.nan_to_num(grad), st.exp_avg, st.exp_avg_sq, st.adam_t,
                              st.done | ~finite, cfg.lr)
            st.scale.copy_(torch.where(finite | st.done, st.scale, st.scale * 0.5))

    def _step_fast(self) -> tuple[Tensor, Tensor, Tensor]:
        st = self._fast
        stepping.fast_step(st, self._use_graphs(), lambda: (st.z, st.handles, st.exp_avg, st.exp_avg_sq, st.adam_t,
                                                            st.step, st.scale, st.done, st.loss),
                           self._fast_body, self._stream, self.device)
        return st.handles[: self._n_handles], st.done, st.loss

    # --- reference mode --------------------------------------------------------------------------------------

    def _start_reference(self, handles: Tensor, targets: Tensor, keep: Tensor | None) -> None:
        cfg, p = self.config, self.prepared
        unet = self.unet_fp32
        z = self._z_start.clone().float()
        emb = p.text_emb.float()
        t = p.t
        with torch.no_grad():
            eps0, f0 = self._ref_forward(unet, z, t, emb)
            x_prev0 = p.a * z + p.b * eps0
        z.requires_grad_(True)
        points = [torch.tensor([y, x]) for x, y in handles.tolist()]
        self._ref = {
            "z": z, "emb": emb, "F0": f0, "x_prev0": x_prev0, "keep": keep,
            "handles": points, "handles_init": copy.deepcopy(points),
            "targets": [torch.tensor([y, x]) for x, y in targets.tolist()],
            "optim": torch.optim.Adam([z], lr=cfg.lr),
            "scaler": torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"),
            "step": 0,
        }

    def _ref_forward(self, unet: torch.nn.Module, z: Tensor, t: int, emb: Tensor) -> tuple[Tensor, Tensor]:
        # forward_unet_features: full UNet, up_blocks[2] output upsampled (bilinear) to half the image size.
        tap = UNetFeatureTap(unet, [self.config.feature_block])
        eps = tap.run(z, t, encoder_hidden_states=emb)
        feat = F.interpolate(tap.features[self.config.feature_block], self.size, mode="bilinear")
        return eps, feat

    def _step_reference(self) -> tuple[Tensor, Tensor, Tensor]:
        cfg, ref, p = self.config, self._ref, self.prepared
        z = ref["z"]
        with self._unet_dtype_autocast():
            eps, f1 = self._ref_forward(self.unet_fp32, z, p.t, ref["emb"])
            x_prev = p.a * z + p.b * eps
            if ref["step"] != 0:
                ref["handles"] = drag.dragdiffusion_track_literal(ref["F0"], f1, ref["handles"], ref["handles_init"],
                                                                  cfg.r_p)
            dists = [(p_ - t_).norm() for p_, t_ in zip(ref["handles"], ref["targets"])]
            done = bool((torch.tensor(dists) < cfg.stop_distance).all())
            loss: Tensor | float = 0.0
            if not done:
                loss = drag.dragdiffusion_motion_loss_literal(f1, ref["handles"], ref["targets"], cfg.r_m)
                if ref["keep"] is not None:
                    loss = loss + cfg.lambda_mask * ((x_prev - ref["x_prev0"]) * ref["keep"]).abs().sum()
                loss.item()  # the published loop prints loss.item() each step: the read (a sync) stays, the print not
        if not done:
            ref["scaler"].scale(loss).backward()
            ref["scaler"].step(ref["optim"])
            ref["scaler"].update()
            ref["optim"].zero_grad()
        ref["step"] += 1
        handles = torch.tensor([[float(q[1]), float(q[0])] for q in ref["handles"]])
        loss_t = loss.detach().float() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        return handles, torch.tensor(done), loss_t

    # --- phase 3: steps --------------------------------------------------------------------------------------

    def step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One drag iteration. Returns ``(handles [P, 2] half-resolution grid px, done [], loss [])`` as device
        tensors without waiting for the device in fast mode."""
        if self._fast is None and self._ref is None:
            raise RuntimeError("call start() before step()")
        if self.config.mode == "reference":
            return self._step_reference()
        return self._step_fast()

    def run(self, max_steps: int | None = None) -> Iterator[StepResult]:
        """Iterations until every handle is within ``stop_distance`` or ``max_steps`` (default
        ``config.max_steps``); yields one :class:`StepResult` per iteration (handles and distances in image
        pixels). Fast mode reads iteration ``k`` while the device runs ``k + 1`` (no update once done)."""
        limit = stepping.run_limit(max_steps, self.config.max_steps)
        return stepping.pipelined_run(self.step, self._snapshot, self._result, limit)

    def _snapshot(self, handles: Tensor, done: Tensor, loss: Tensor) -> tuple:
        if self.device.type != "cuda" or self.config.mode == "reference":
            return stepping.host_copy(handles, done, loss)
        with self._on_engine_stream():
            return self._fast.readback.copy(handles, done, loss)

    def _result(self, k: int, snapshot: tuple, t_last: float) -> StepResult:
        return stepping.step_result(k, snapshot, t_last, self._to_image, self._targets_host)

    def _to_image(self, grid_points: list[list[float]]) -> list[list[float]]:
        """Half-resolution grid ``[x, y]`` -> image pixels."""
        H, W = self.prepared.image.shape[-2:]
        sy, sx = H / self.size[0], W / self.size[1]
        return [[x * sx, y * sy] for x, y in grid_points]

    @property
    def handles(self) -> list[list[float]]:
        """Current handle positions ``[[x, y], ...]`` in image pixels (reads the device)."""
        if self._fast is not None:
            with self._on_engine_stream():
                pts = self._fast.handles[: self._n_handles].tolist()
        else:
            pts = [[float(q[1]), float(q[0])] for q in self._ref["handles"]]
        return self._to_image(pts)

    def latent(self) -> Tensor:
        """The current (optimised) ``z_t`` ``[1, 4, h, w]`` float32."""
        if self._fast is not None:
            with self._on_engine_stream():
                return self._fast.z.detach().clone()
        if self._ref is not None:
            return self._ref["z"].detach().clone()
        raise RuntimeError("call start() before latent()")

    # --- phase 4: denoise ------------------------------------------------------------------------------------

    @torch.no_grad()
    def denoise(self, latent: Tensor | None = None) -> Tensor:
        """Denoise ``[original z_t, edited z_t]`` for the remaining steps with mutual self-attention and return
        the edited image ``[1, 3, H, W]`` float32 in [0, 1] at the input size."""
        p = self.prepared
        if p is None:
            raise RuntimeError("call prepare() (and start()/run()) before denoise()")
        z_edit = (self.latent() if latent is None else latent).to(self.device)
        if self.config.mode == "reference":
            return self._denoise_reference(z_edit)
        with self._on_engine_stream():
            out = self._denoise_fast(z_edit)
        return out

    def _denoise_latents(self, z_edit: Tensor, unet_call: Callable[[Tensor, int, int], Tensor], *,
                         edited_only: bool = False) -> Tensor:
        """The DDIM loop over ``[original z_t, edited z_t]`` (or the edited branch alone); ``unet_call(latents, t,
        step index)`` gives eps. Returns the final latents of the branches it ran."""
        p = self.prepared
        latents = (z_edit.float() if edited_only else torch.cat([p.z_t.to(z_edit), z_edit.float()])).to(self.dtype)
        for i, (t, (a, b)) in enumerate(zip(p.denoise_timesteps, p.denoise_coefficients)):
            eps = unet_call(latents, t, i)
            latents = (a * latents.float() + b * eps.float()).to(self.dtype)
        return latents

    def _mutual(self, literal: bool):
        cfg = self.config
        return mutual_self_attention(self.unet, cfg.start_layer, backend=self.attention, literal=literal,
                                     fuse_qkv=cfg.fuse_qkv)

    def _denoise_fast(self, z_edit: Tensor) -> Tensor:
        cfg, p = self.config, self.prepared
        if cfg.start_step > 0:
            raise ValueError("start_step > 0 is not supported by the fast denoise yet; use mode='reference'")
        if not cfg.reuse_original_branch:
            with self._mutual(literal=False):
                latents = self._denoise_latents(z_edit, lambda x, t, i: self._denoise_unet("mutual", x, t))
            return self._decode(latents[1:])
        stored = self._kv_store[1] if self._kv_store is not None and self._kv_store[0] is p else None
        if stored is None:  # first render of this prepared image: both branches, branch 0's k/v kept
            return self._decode(self._record_original_branch(z_edit))
        procs = self._branch_zero_processors()
        with mutual_self_attention(self.unet, cfg.start_layer, processors=procs):
            for proc in procs:  # a later render: the edited branch alone against the kept keys/values
                proc.mode = "replay"

            def call(x: Tensor, t: int, i: int) -> Tensor:
                for proc, (k, v) in zip(procs, stored[i]):
                    proc.k.copy_(k)
                    proc.v.copy_(v)
                return self._denoise_unet("mutual-replay", x, t)

            edited = self._denoise_latents(z_edit, call, edited_only=True)
        return self._decode(edited)

    def _denoise_unet(self, kind: str, x: Tensor, t: int) -> Tensor:
        """eps of the final denoise's UNet call ``kind`` on ``x`` (a graph replay on CUDA)."""
        emb = self.prepared.text_emb.expand(x.shape[0], -1, -1)
        if self._use_graphs():
            return self._unet_graph_call(kind, x, t, emb)
        return self.unet(x, torch.tensor([t], device=self.device), encoder_hidden_states=emb).sample

    def _record_original_branch(self, z_edit: Tensor) -> Tensor:
        """The first render of a prepared image: the final denoise of both branches, with the processors keeping
        branch 0's self-attention keys/values of every step for later renders (``self._kv_store``). Returns the
        edited branch's final latents."""
        procs = self._branch_zero_processors()
        self._kv_store = None  # the previous image's keys/values go before this image's are made
        record: list[list[tuple[Tensor, Tensor]]] = []

        def call(x: Tensor, t: int, i: int) -> Tensor:
            eps = self._denoise_unet("mutual-record", x, t)
            record.append([(proc.k.clone(), proc.v.clone()) for proc in procs])
            return eps

        with mutual_self_attention(self.unet, self.config.start_layer, processors=procs):
            for proc in procs:
                proc.mode = "record"
            edited = self._denoise_latents(z_edit, call)[1:]
        self._kv_store = (self.prepared, record)
        return edited

    def _branch_zero_processors(self) -> list[BranchZeroKVProcessor]:
        """One :class:`BranchZeroKVProcessor` per mutual layer, made once: captured graphs read and write their
        buffers in place."""
        if self._kv_procs is None:
            n = len(transformer_self_attentions(self.unet)) - self.config.start_layer
            self._kv_procs = [BranchZeroKVProcessor(self.attention, fuse_qkv=self.config.fuse_qkv)
                              for _ in range(max(n, 0))]
        return self._kv_procs

    def _use_graphs(self) -> bool:
        return self.config.mode == "fast" and self.config.cuda_graph and self.device.type == "cuda"

    def _unet_graph_call(self, kind: str, x: Tensor, t: Any, emb: Tensor) -> Tensor:
        """``unet(x, t, emb).sample`` replayed from a CUDA graph captured on first use, one per ``kind`` (the
        attention processors active at capture: ``"plain"`` or ``"mutual"``) and input shapes. The returned tensor is
        the graph's output buffer: the next replay overwrites it. Inputs are copied into the graph's buffers, so
        the inversion (under ``inference_mode``) and the denoise share the mechanism."""
        key = (kind, tuple(x.shape), tuple(emb.shape))
        with torch.inference_mode(False), torch.no_grad():
            g = self._unet_graphs.get(key)
            if g is None:
                # graphs of another image size are not needed any more: free their memory pools
                self._unet_graphs = {k: v for k, v in self._unet_graphs.items() if k[1][1:] == key[1][1:]}
                bufs = {"x": torch.zeros(x.shape, device=self.device, dtype=self.dtype),
                        "t": torch.zeros(1, device=self.device, dtype=torch.long),
                        "emb": torch.zeros(emb.shape, device=self.device, dtype=self.dtype)}
                for name, value in (("x", x), ("emb", emb)):
                    bufs[name].copy_(value)
                with self._on_engine_stream():
                    for _ in range(2):  # warm-up: compilation, cuDNN plans, the memory pool
                        self.unet(bufs["x"], bufs["t"], encoder_hidden_states=bufs["emb"])
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self._stream):
                        out = self.unet(bufs["x"], bufs["t"], encoder_hidden_states=bufs["emb"]).sample
                g = self._unet_graphs[key] = {"graph": graph, "out": out, **bufs}
            with self._on_engine_stream():
                g["x"].copy_(x)
                if isinstance(t, Tensor):
                    g["t"].copy_(t.reshape(1))  # a device timestep: no host sync
                else:
                    g["t"].fill_(int(t))
                g["emb"].copy_(emb)
                g["graph"].replay()
            return g["out"]

    def _decode(self, latents: Tensor) -> Tensor:
        vae = self.sd.vae
        img = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
        img = (img.float() / 2 + 0.5).clamp(0, 1)
        H, W = self.prepared.image.shape[-2:]
        if img.shape[-2:] != (H, W):
            img = F.interpolate(img, (H, W), mode="bilinear")
        return img

    def _denoise_reference(self, z_edit: Tensor) -> Tensor:
        cfg, p = self.config, self.prepared
        unet = self.unet
        emb2 = torch.cat([p.text_emb] * 2)
        sched = copy.deepcopy(self.sd.scheduler)
        sched.set_timesteps(cfg.num_inference_steps)
        skip = cfg.num_inference_steps - cfg.inversion_steps
        latents = torch.cat([p.z_t.to(self.device), z_edit]).to(self.dtype)
        # The reference's attention editor: score-matrix attention everywhere, mutual from start_layer on.
        literal = mutual_self_attention(unet, cfg.start_layer, backend="math", literal=True)
        with literal:
            for i, t in enumerate(sched.timesteps):
                if i < skip:
                    continue
                if i - skip < cfg.start_step:
                    with _processors(unet, AttnProcessor("math")):
                        eps = unet(latents, t, encoder_hidden_states=emb2).sample
                else:
                    eps = unet(latents, t, encoder_hidden_states=emb2).sample
                latents = sched.step(eps, t, latents, return_dict=False)[0]
        vae = self.sd.vae
        image = vae.decode(latents / vae.config.scaling_factor).sample  # both branches, as the pipeline does
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        H, W = p.image.shape[-2:]
        return F.interpolate(image[1:2], (H, W), mode="bilinear")

    def render(self, latent: Tensor | None = None) -> Tensor:
        """The edited image of ``latent`` (default: the current one) in [-1, 1], ``[1, 3, H, W]`` float32: the full
        denoise (the same as :meth:`denoise`, rescaled), the engine-neutral name sessions use."""
        return self.denoise(latent) * 2 - 1

    @torch.no_grad()
    def preview(self, latent: Tensor | None = None, decoder: Any = None) -> Tensor:
        """A cheap look at where the drag is going: the clean latent ``x0`` the UNet predicts from ``z_t`` (one
        forward, no gradients), decoded by ``decoder`` (a :class:`~dragrt.runtime.models.preview.PreviewDecoder`)
        or, by default, by the pipeline's own VAE. Returns ``[1, 3, H, W]`` float32 in [0, 1]."""
        p = self.prepared
        if p is None:
            raise RuntimeError("call prepare() before preview()")
        z = (self.latent() if latent is None else self._check_latent(latent)).to(self.device)
        with self._on_engine_stream():
            t = torch.full((1,), p.t, device=self.device, dtype=torch.long)
            eps = self.unet(z.to(self.dtype), t, encoder_hidden_states=p.text_emb).sample.float()
            alpha = float(self.sd.scheduler.alphas_cumprod[p.t])
            x0 = (z - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
            if decoder is not None:
                return decoder.decode(x0)
            return self._decode(x0)

    # --- one call --------------------------------------------------------------------------------------------

    def edit(self, image: Any, prompt: str, handle_points, target_points, mask: Any = None, *, lora: Any = None,
             progress: bool = False, callback: Callable[[StepResult], None] | None = None) -> DragDiffusionResult:
        """The whole edit: prepare (LoRA, inversion; cached), drag, denoise. See the phase methods for
        argument details; ``callback`` sees every drag iteration."""
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        self.prepare(image, prompt, lora=lora, progress=progress)
        times.update(self.prepared_timings)
        t1 = time.perf_counter()
        self.start(handle_points, target_points, mask)
        times["start"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        history = []
        for r in self.run():
            history.append(r)
            if callback is not None:
                callback(r)
        times["drag"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        image_out = self.denoise()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        times["denoise"] = time.perf_counter() - t3
        times["total"] = time.perf_counter() - t0
        last = history[-1] if history else None
        return DragDiffusionResult(image=image_out, handles=last.handles if last else self.handles,
                                   steps=len(history), timings=times, latent=self.latent(), history=history)


# --------------------------------------------------------------------------------------------------------------


def _image_tensor(image: Any) -> Tensor:
    """PIL / uint8 HWC array / float [1, 3, H, W] tensor in [-1, 1] -> float32 [1, 3, H, W] in [-1, 1]."""
    if isinstance(image, Tensor):
        t = image.detach()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[:2] != (1, 3) or not t.is_floating_point():
            raise ValueError(f"image tensor must be float [1, 3, H, W] in [-1, 1], got {tuple(image.shape)} "
                             f"{image.dtype}")
        t = t.float()
    else:
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image must be a PIL image, a uint8 [H, W, 3] array or a float [1, 3, H, W] tensor, "
                             f"got {arr.dtype} array of shape {arr.shape}")
        t = torch.from_numpy(arr.copy()).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]
    H, W = t.shape[-2:]
    if H % 64 or W % 64 or H < 64 or W < 64:
        raise ValueError(f"image height and width must be multiples of 64 (the UNet downsamples the 1/8 latent three "
                         f"times), got {H}x{W}; resize or crop it first")
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or infinite values")
    return t


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without any per-instance compiled ``forward`` a fast engine may have set, in NCHW (the
    published code's layout, whatever layout the shared pipeline was given)."""
    from dragrt.runtime.models.layout import to_nchw_

    out = copy.deepcopy(module)
    for m in out.modules():
        m.__dict__.pop("forward", None)
    return to_nchw_(out)


def _compile_blocks(unet: torch.nn.Module, mode: str) -> None:
    """Compile the forward of each down/mid/up block in place (once per UNet). The UNet's own forward, the
    feature-tap hooks and the early stop stay eager between blocks, so the truncated forward still works."""
    if getattr(unet, "_dragrt_compiled", None) == mode:
        return
    # Dynamo caches per code object: the three CrossAttnDownBlock2D share one forward, and each sees up to three
    # call kinds (inversion under inference mode, the drag step with gradients, the batch-2 denoise), so the
    # default limit of 8 variants was hit on an H200 and the rest ran eagerly. Allow enough for SD's blocks.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    for blk in blocks:
        blk.__dict__.pop("forward", None)
        blk.forward = torch.compile(blk.forward, mode=mode, dynamic=False)
    unet._dragrt_compiled = mode


@contextlib.contextmanager
def _processors(unet: torch.nn.Module, processor: Any) -> Iterator[None]:
    saved = unet.attn_processors
    unet.set_attn_processor(processor)
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
