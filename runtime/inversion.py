"""Image encoding, prompt encoding and DDIM inversion as DragDiffusion runs them, plus the DDIM step it drags with.

Reference: Yujun-Shi/DragDiffusion @ ebe659a, ``drag_pipeline.py`` (``DragPipeline.image2latent``,
``get_text_embeddings``, ``invert``, ``inv_step``, ``step``) and ``utils/ui_utils.py::run_drag`` (spec
``ref_dragdiffusion.md`` §1, §6). What ``run_drag`` does with a real image, and what this module reproduces:

1. ``image2latent``: pixels ``uint8 / 127.5 - 1`` -> ``vae.encode(x).latent_dist.mean * 0.18215`` (the posterior
   MEAN, never a sample; 0.18215 is SD1's ``vae.config.scaling_factor``, which is what is read here).
2. ``get_text_embeddings``: tokenizer with ``padding="max_length", max_length=77`` -> ``text_encoder(ids)[0]``
   (the last hidden state, no attention mask).
3. ``invert(..., guidance_scale=1.0, num_inference_steps=50, num_actual_inference_steps=round(0.7 * 50) = 35)``:
   ``scheduler.set_timesteps(50)`` gives ``981, 961, ..., 1`` (SD's DDIM config: steps_offset 1, "leading");
   the loop walks ``reversed(timesteps) = 1, 21, ..., 681`` and stops after 35 steps, so the inverted latent
   ``z_t`` sits at ``t = timesteps[50 - 35] = 681``. Each step: ``eps = unet(x, t_next, emb)`` (the UNet sees the
   *target* timestep with the *current* latent, the usual DDIM-inversion approximation), then ``inv_step``.
4. The final denoise runs the remaining ``timesteps[15:] = 681, 661, ..., 1`` (35 steps) with diffusers'
   ``DDIMScheduler.step`` (eta 0); the drag loop's one-step ``x_{t-1}`` uses ``DragPipeline.step``.

Two modes: ``"reference"`` performs the published arithmetic step by step (scalars as 0-d float32 CPU tensors
taken from ``alphas_cumprod``, exactly the expression order of ``inv_step``), under ``torch.no_grad`` and in the
UNet's dtype (the reference runs an fp16 pipeline). ``"fast"`` computes the same maths under
``torch.inference_mode`` with each step folded into ``x_next = a * x + b * eps`` (two Python floats per step,
derived in float64, see :func:`ddim_step_coefficients`), timesteps pre-staged on the device (no host syncs, no
per-step host-to-device copies) and an optional ``unet_fn`` (a compiled or CUDA-graphed UNet). The two differ only
by float rounding (``reference`` vs ``fast`` agree to ~1e-6 in float32; a test checks it).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dragrt.runtime.cache.store import TensorCache, content_hash, metadata_json, module_fingerprint

if TYPE_CHECKING:
    from dragrt.runtime.models.sd import SDComponents

__all__ = [
    "Mode",
    "image_pixels",
    "image_to_tensor",
    "encode_image",
    "encode_prompt",
    "DDIMSchedule",
    "ddim_schedule",
    "DDIMCoefficients",
    "ddim_step",
    "ddim_inv_step",
    "ddim_step_coefficients",
    "ddim_inv_step_coefficients",
    "InversionConfig",
    "InversionResult",
    "ddim_invert",
    "components_fingerprint",
    "invert_image",
]

Mode = Literal["fast", "reference"]
UNetFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _check_mode(mode: Any) -> str:
    if mode not in ("fast", "reference"):
        raise ValueError(f"mode must be 'fast' or 'reference', got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------------
# Images and prompts
# --------------------------------------------------------------------------------------------------


def image_pixels(image: Any, *, name: str = "image") -> np.ndarray | Tensor:
    """The canonical form of an input image: a uint8 ``[H, W, 3]`` array (from a PIL image or uint8 array) or a
    float ``[1, 3, H, W]`` tensor in [-1, 1] (given as such). Cache keys hash this form, so a PIL image and its
    array give the same key. H and W must be positive multiples of 8 (the VAE downsamples 8x).

    Raises:
        ValueError: wrong type, layout, dtype, size or value range (the message names ``name``).
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        image = np.array(image.convert("RGB") if image.mode != "RGB" else image)  # a writable copy
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} as an array must be uint8 [H, W, 3] (RGB), got {image.dtype} {list(image.shape)}")
        H, W = image.shape[:2]
        pixels: np.ndarray | Tensor = image if image.flags.writeable and image.flags.c_contiguous else image.copy()
    elif isinstance(image, Tensor):
        t = image.detach()
        if t.dim() == 3:
            t = t[None]
        if not t.is_floating_point() or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
            raise ValueError(f"{name} as a tensor must be float [1, 3, H, W] in [-1, 1], got {t.dtype} "
                             f"{list(image.shape)}")
        if t.numel():
            lo, hi = torch.aminmax(t.float())
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3):
                raise ValueError(f"{name} values must lie in [-1, 1] (pixels / 127.5 - 1), got {lo:.4g} to {hi:.4g}")
        H, W = t.shape[-2:]
        pixels = t
    else:
        raise ValueError(f"{name} must be a PIL image, a uint8 [H, W, 3] array or a float [1, 3, H, W] tensor in "
                         f"[-1, 1], got {type(image).__name__}")
    if H < 8 or W < 8 or H % 8 or W % 8:
        raise ValueError(f"{name} height and width must be positive multiples of 8 (the VAE downsamples 8x), "
                         f"got {H}x{W}")
    return pixels


def image_to_tensor(image: Any, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    name: str = "image") -> Tensor:
    """``[1, 3, H, W]`` in [-1, 1]: as the reference's ``preprocess_image``, ``torch.from_numpy(u8).float() / 127.5
    - 1`` then a cast to ``dtype`` (float tensors pass through, cast)."""
    pixels = image_pixels(image, name=name)
    if isinstance(pixels, np.ndarray):
        x = torch.from_numpy(pixels).float() / 127.5 - 1  # [H, W, 3]
        x = x.permute(2, 0, 1)[None]  # "h w c -> 1 c h w"
    else:
        x = pixels
    return x.to(device=device, dtype=dtype)


def encode_image(components: SDComponents, image: Any) -> Tensor:
    """VAE posterior mean x ``vae.config.scaling_factor``: ``[1, 4, H/8, W/8]`` in the VAE's dtype and device.

    As ``DragPipeline.image2latent`` (``latent_dist.mean * 0.18215``; 0.18215 is SD1's scaling factor). ``image``:
    PIL image, uint8 ``[H, W, 3]`` array or float ``[1, 3, H, W]`` tensor in [-1, 1]; H, W multiples of 8.
    """
    vae = components.vae
    p = next(vae.parameters())
    x = image_to_tensor(image, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return latent


def encode_prompt(components: SDComponents, prompt: str) -> Tensor:
    """Text embeddings ``[1, 77, D]`` (D = 768 for SD1.5) in the text encoder's dtype and device.

    As ``DragPipeline.get_text_embeddings`` / ``lora_utils.encode_prompt``: ``tokenizer(prompt,
    padding="max_length", max_length=tokenizer.model_max_length (77), truncation=True)`` then
    ``text_encoder(ids)[0]`` (last hidden state, no attention mask). ``get_text_embeddings`` does not pass
    ``truncation``: for prompts within 77 tokens both are the same; a longer prompt makes the reference fail
    (more positions than the encoder has) while here it is cut at 77 tokens, as the reference's LoRA trainer does.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    tok = components.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # [1, 77]
    te = components.text_encoder
    device = next(te.parameters()).device
    with torch.no_grad():
        return te(ids.to(device))[0]


# --------------------------------------------------------------------------------------------------
# DDIM schedule and steps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMSchedule:
    """What DDIM needs from a scheduler, after ``set_timesteps(num_inference_steps)``.

    Attributes:
        alphas_cumprod: ``[num_train_timesteps]`` float32 on the CPU (``alpha-bar``), as the scheduler holds it.
        final_alpha_cumprod: 0-d float32: ``1.0`` if ``set_alpha_to_one`` else ``alphas_cumprod[0]`` (SD: the latter).
        num_train_timesteps: 1000 for SD.
        num_inference_steps: the schedule length (50 in DragDiffusion).
        timesteps: the denoising order, e.g. ``(981, 961, ..., 1)`` for SD with 50 steps.
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: Tensor
    num_train_timesteps: int
    num_inference_steps: int
    timesteps: tuple[int, ...]

    @property
    def step_ratio(self) -> int:
        """``num_train_timesteps // num_inference_steps`` (20 for 1000 / 50): the stride both steps use."""
        return self.num_train_timesteps // self.num_inference_steps

    def _check_t(self, t: Any) -> int:
        if isinstance(t, Tensor):
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < self.num_train_timesteps:
            raise ValueError(f"timestep must be an int in 0..{self.num_train_timesteps - 1}, got {t!r}")
        return int(t)

    def step_alphas(self, t: int, *, prev_inclusive: bool = False) -> tuple[Tensor, Tensor]:
        """``(alpha_prod_t, alpha_prod_t_prev)`` of ``DragPipeline.step`` as 0-d float32 tensors.

        ``prev = t - step_ratio``; ``alpha_prev = alphas_cumprod[prev] if prev > 0 else final_alpha_cumprod``.
        DragPipeline.step tests ``prev > 0``; diffusers' ``DDIMScheduler.step`` (the reference's final denoise)
        tests ``prev >= 0`` (``prev_inclusive=True``). They differ only when ``prev == 0`` and
        ``set_alpha_to_one`` is set; with SD's schedule (steps_offset 1, set_alpha_to_one False) never.
        """
        t = self._check_t(t)
        prev = t - self.step_ratio
        use_table = prev >= 0 if prev_inclusive else prev > 0
        a_prev = self.alphas_cumprod[prev] if use_table else self.final_alpha_cumprod
        return self.alphas_cumprod[t], a_prev

    def inv_step_alphas(self, t: int) -> tuple[Tensor, Tensor]:
        """``(alpha_prod_t, alpha_prod_t_next)`` of ``DragPipeline.inv_step`` for the inversion step *to* ``t``.

        As published: ``cur = min(t - step_ratio, 999)``; ``alpha_t = alphas_cumprod[cur] if cur >= 0 else
        final_alpha_cumprod``; ``alpha_next = alphas_cumprod[t]`` (999 is ``num_train_timesteps - 1``). The first
        step (``t = 1``) therefore starts from ``final_alpha_cumprod`` (= ``alphas_cumprod[0]`` for SD).
        """
        t = self._check_t(t)
        cur = min(t - self.step_ratio, self.num_train_timesteps - 1)
        a_t = self.alphas_cumprod[cur] if cur >= 0 else self.final_alpha_cumprod
        return a_t, self.alphas_cumprod[t]


_SCHEDULES: weakref.WeakKeyDictionary[Any, dict[int, DDIMSchedule]] = weakref.WeakKeyDictionary()


def ddim_schedule(scheduler: Any, num_inference_steps: int) -> DDIMSchedule:
    """The :class:`DDIMSchedule` of ``scheduler``'s config (betas, offsets, spacing) with ``num_inference_steps``.

    A fresh ``DDIMScheduler`` is built from the config (the reference constructs its own ``DDIMScheduler`` and
    calls ``set_timesteps``), so the caller's scheduler object is never mutated. Memoised per scheduler object.
    """
    if isinstance(scheduler, DDIMSchedule):
        if num_inference_steps not in (None, scheduler.num_inference_steps):
            raise ValueError(f"num_inference_steps={num_inference_steps} does not match the schedule's "
                             f"{scheduler.num_inference_steps}")
        return scheduler
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps must be in 1..{n_train} (num_train_timesteps), "
                         f"got {num_inference_steps}")
    try:
        memo = _SCHEDULES.setdefault(scheduler, {})
    except TypeError:  # not weak-referenceable
        memo = {}
    if num_inference_steps in memo:
        return memo[num_inference_steps]
    from diffusers import DDIMScheduler

    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(num_inference_steps)
    sched = DDIMSchedule(
        alphas_cumprod=ddim.alphas_cumprod.detach().to("cpu", torch.float32).clone(),
        final_alpha_cumprod=torch.as_tensor(ddim.final_alpha_cumprod, dtype=torch.float32).clone(),
        num_train_timesteps=n_train,
        num_inference_steps=num_inference_steps,
        timesteps=tuple(int(t) for t in ddim.timesteps),
    )
    memo[num_inference_steps] = sched
    return sched


class DDIMCoefficients(NamedTuple):
    """One DDIM (or inverse DDIM) step as ``x_out = a * x + b * eps`` (eta 0). Unpacks as ``a, b``."""

    a: float
    b: float

    def apply(self, x: Tensor, eps: Tensor) -> Tensor:
        """``a * x + b * eps`` (two elementwise kernels; differentiable; graph-capturable: a, b are constants)."""
        return torch.add(x * self.a, eps, alpha=self.b)


def _coefficients(a_from: Tensor, a_to: Tensor) -> DDIMCoefficients:
    # x_to = sqrt(a_to) * (x - sqrt(1 - a_from) * eps) / sqrt(a_from) + sqrt(1 - a_to) * eps
    #      = sqrt(a_to / a_from) * x + (sqrt(1 - a_to) - sqrt(a_to / a_from) * sqrt(1 - a_from)) * eps
    af, at = float(a_from), float(a_to)  # the float32 table values, widened exactly to float64
    a = math.sqrt(at / af)
    b = math.sqrt(1.0 - at) - a * math.sqrt(1.0 - af)
    return DDIMCoefficients(a, b)


def _as_schedule(schedule: Any, num_inference_steps: int | None) -> DDIMSchedule:
    if isinstance(schedule, DDIMSchedule):
        return ddim_schedule(schedule, num_inference_steps)
    if num_inference_steps is None:
        raise ValueError("num_inference_steps is required when a diffusers scheduler (not a DDIMSchedule) is given")
    return ddim_schedule(schedule, num_inference_steps)


def ddim_step_coefficients(schedule: Any, t: int, num_inference_steps: int | None = None, *,
                           prev_inclusive: bool = False) -> DDIMCoefficients:
    """``(a, b)`` with ``DragPipeline.step(eps, t, x) == a * x + b * eps`` (eta 0).

    Derivation: ``pred_x0 = (x - sqrt(1 - A_t) eps) / sqrt(A_t)`` and ``x_prev = sqrt(A_p) pred_x0 + sqrt(1 - A_p)
    eps``, so ``a = sqrt(A_p / A_t)`` and ``b = sqrt(1 - A_p) - a sqrt(1 - A_t)``, where ``A_t, A_p`` are
    :meth:`DDIMSchedule.step_alphas`. Evaluated in float64 from the float32 table entries; applying them differs
    from the published expression only by rounding. For the drag loop (fixed ``t``) they are two constants a
    CUDA graph can bake in.

    Args:
        schedule: a :class:`DDIMSchedule`, or a diffusers scheduler plus ``num_inference_steps``.
        prev_inclusive: ``True`` for diffusers' ``DDIMScheduler.step`` boundary (see :meth:`DDIMSchedule.step_alphas`).
    """
    sched = _as_schedule(schedule, num_inference_steps)
    a_t, a_prev = sched.step_alphas(t, prev_inclusive=prev_inclusive)
    return _coefficients(a_t, a_prev)


def ddim_inv_step_coefficients(schedule: Any, t: int, num_inference_steps: int | None = None) -> DDIMCoefficients:
    """``(a, b)`` with ``DragPipeline.inv_step(eps, t, x) == a * x + b * eps`` (same algebra as
    :func:`ddim_step_coefficients`, alphas from :meth:`DDIMSchedule.inv_step_alphas`)."""
    sched = _as_schedule(schedule, num_inference_steps)
    a_t, a_next = sched.inv_step_alphas(t)
    return _coefficients(a_t, a_next)


def _published_update(x: Tensor, eps: Tensor, alpha_from: Tensor, alpha_to: Tensor) -> Tensor:
    # The expression order of DragPipeline.step / inv_step, with 0-d float32 CPU scalars as there.
    beta_from = 1 - alpha_from
    pred_x0 = (x - beta_from**0.5 * eps) / alpha_from**0.5
    pred_dir = (1 - alpha_to) ** 0.5 * eps
    return alpha_to**0.5 * pred_x0 + pred_dir


def ddim_step(schedule: Any, model_output: Tensor, timestep: int, x: Tensor, *,
              num_inference_steps: int | None = None, prev_inclusive: bool = False) -> Tensor:
    """``x_{t-1}`` from ``x_t`` and the predicted noise: ``DragPipeline.step`` (eta 0), differentiable.

    ``prev = t - num_train // num_inference``; ``A_p = alphas_cumprod[prev] if prev > 0 else final_alpha_cumprod``;
    ``pred_x0 = (x - (1 - A_t)**0.5 * eps) / A_t**0.5``; ``x_prev = A_p**0.5 * pred_x0 + (1 - A_p)**0.5 * eps``,
    evaluated in that order with the scalars as 0-d float32 tensors (so on fp16 inputs the result is fp16, as
    in the reference). The precomputed form is :func:`ddim_step_coefficients`.

    Args:
        schedule: a :class:`DDIMSchedule`, or a diffusers scheduler plus ``num_inference_steps``.
        model_output: epsilon ``[N, 4, h, w]``; x: the latent at ``timestep``, same shape.
    """
    sched = _as_schedule(schedule, num_inference_steps)
    a_t, a_prev = sched.step_alphas(timestep, prev_inclusive=prev_inclusive)
    return _published_update(x, model_output, a_t, a_prev)


def ddim_inv_step(schedule: Any, model_output: Tensor, timestep: int, x: Tensor, *,
                  num_inference_steps: int | None = None) -> Tensor:
    """One DDIM inversion step *to* ``timestep``: ``DragPipeline.inv_step`` (eta 0), differentiable.

    ``cur = min(t - num_train // num_inference, 999)``; ``A_t = alphas_cumprod[cur] if cur >= 0 else
    final_alpha_cumprod``; ``A_n = alphas_cumprod[t]``; ``pred_x0 = (x - (1 - A_t)**0.5 * eps) / A_t**0.5``;
    ``x_next = A_n**0.5 * pred_x0 + (1 - A_n)**0.5 * eps``.
    """
    sched = _as_schedule(schedule, num_inference_steps)
    a_t, a_next = sched.inv_step_alphas(timestep)
    return _published_update(x, model_output, a_t, a_next)


# --------------------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InversionConfig:
    """DDIM inversion settings (DragDiffusion's ``run_drag``: 50 steps, strength 0.7, guidance 1.0).

    Attributes:
        num_inference_steps: length of the DDIM schedule (``set_timesteps``), 1..num_train_timesteps (1000).
        strength: fraction of the schedule that is inverted, in (0, 1]: ``n_actual = round(strength * steps)``
            (Python's round, half to even, as the reference) inversion steps, ending at
            ``t = timesteps[steps - n_actual]`` (681 for the defaults on SD's schedule).
        guidance_scale: 1.0 = no classifier-free guidance (the reference for real images). ``> 1`` runs each
            step on the batch ``[uncond, cond]`` with the empty prompt as ``uncond`` and combines
            ``u + g * (c - u)``, as the reference's ``invert`` intends (published, that branch reads an undefined
            ``text_input`` and raises ``NameError``; its ``__call__`` shows the intended form).
    """

    num_inference_steps: int = 50
    strength: float = 0.7
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        n = self.num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise ValueError(f"num_inference_steps must be an int in 1..1000, got {n!r}")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 < s <= 1):
            raise ValueError(f"strength must be a number in (0, 1], got {s!r}")
        if round(s * n) < 1:
            raise ValueError(f"strength={s} x num_inference_steps={n} rounds to 0 inversion steps; "
                             "raise either so that round(strength * num_inference_steps) >= 1")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 1.0:
            raise ValueError(f"guidance_scale must be a finite number >= 1.0 (1.0 = no guidance), got {g!r}")

    @property
    def num_actual_steps(self) -> int:
        """``round(strength * num_inference_steps)``: how many inversion steps run (35 by default)."""
        return round(self.strength * self.num_inference_steps)

    @property
    def start_index(self) -> int:
        """``num_inference_steps - num_actual_steps``: index of ``t`` in the denoising timesteps (15)."""
        return self.num_inference_steps - self.num_actual_steps


@dataclass
class InversionResult:
    """The result of a DDIM inversion.

    Attributes:
        z_t: the inverted latent ``[1, 4, h, w]`` at timestep ``t`` (the UNet's dtype, its device); a normal
            (non-inference) tensor the caller may optimise.
        t: the timestep of ``z_t`` (681 for the defaults).
        denoise_timesteps: the ``num_actual_steps`` timesteps the final denoise runs, starting at ``t``
            (``681, 661, ..., 1``).
        inversion_timesteps: the timesteps the inversion stepped to (``1, 21, ..., 681``).
        latents: with ``return_intermediates``: ``[x_0, x_1, ..., z_t]`` (``num_actual_steps + 1`` latents, the
            reference's ``latents_list``), else ``None``.
        x0: the starting latent (the VAE posterior mean x scaling factor for :func:`invert_image`).
        cache_key: the content hash the result is cached under (:func:`invert_image`), else ``None``.
        from_cache: whether :func:`invert_image` found it in the cache.
    """

    z_t: Tensor
    t: int
    denoise_timesteps: tuple[int, ...]
    inversion_timesteps: tuple[int, ...]
    config: InversionConfig
    latents: list[Tensor] | None = None
    x0: Tensor | None = None
    cache_key: str | None = None
    from_cache: bool = False


def _default_unet_fn(unet: torch.nn.Module) -> UNetFn:
    def call(latent: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        return unet(latent, t, encoder_hidden_states=emb, return_dict=False)[0]

    return call


def _plain(t: Tensor) -> Tensor:
    """A normal tensor from one made under inference mode (they cannot take part in autograd later)."""
    return t.clone() if t.is_inference() else t


def ddim_invert(
    components: SDComponents,
    latent: Tensor,
    text_embeddings: Tensor,
    config: InversionConfig | None = None,
    *,
    mode: Mode = "fast",
    unet_fn: UNetFn | None = None,
    uncond_embeddings: Tensor | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
) -> InversionResult:
    """Deterministic DDIM inversion of ``latent`` for ``config.num_actual_steps`` steps (``DragPipeline.invert``).

    Args:
        components: the SD pipeline (its UNet, scheduler config, and text encoder for ``uncond`` when guiding).
        latent: ``[1, 4, h, w]`` scaled latent (:func:`encode_image`).
        text_embeddings: ``[1, 77, D]`` (:func:`encode_prompt`).
        mode: ``"reference"``: the published step arithmetic under ``no_grad``, UNet called with the timestep as
            a 0-d CPU int64 tensor (as iterating ``scheduler.timesteps`` gives it). ``"fast"``: the same maths
            under ``inference_mode`` with precomputed coefficients, device-side timesteps, no host syncs.
            Both run in the UNet's dtype (the latent and embeddings are cast to it).
        unet_fn: ``(latent [B,4,h,w], t (0-d int64 tensor), emb [B,77,D]) -> eps [B,4,h,w]`` to call instead of
            ``components.unet`` (e.g. a compiled or CUDA-graphed copy); must compute the same function.
        uncond_embeddings: the unconditional embeddings for ``guidance_scale > 1`` (default: the empty prompt).
        return_intermediates: also return the trajectory ``[x_0, ..., z_t]``.
        progress: show a tqdm bar.
    """
    config = config or InversionConfig()
    if not isinstance(config, InversionConfig):
        raise ValueError(f"config must be an InversionConfig, got {type(config).__name__}")
    _check_mode(mode)
    if not isinstance(latent, Tensor) or latent.dim() != 4 or latent.shape[0] != 1:
        raise ValueError(f"latent must be a [1, C, h, w] tensor, got "
                         f"{list(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__}")
    if not isinstance(text_embeddings, Tensor) or text_embeddings.dim() != 3 or text_embeddings.shape[0] != 1:
        raise ValueError("text_embeddings must be a [1, 77, D] tensor (encode_prompt)")
    unet = components.unet
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    sched = ddim_schedule(components.scheduler, config.num_inference_steps)
    n_actual = config.num_actual_steps
    inv_ts = tuple(reversed(sched.timesteps))[:n_actual]  # 1, 21, ..., 681
    t_final = sched.timesteps[config.start_index]
    assert inv_ts[-1] == t_final, (inv_ts, t_final)
    denoise_ts = sched.timesteps[config.start_index:]
    call = unet_fn or _default_unet_fn(unet)

    guided = config.guidance_scale > 1.0
    emb = text_embeddings.to(device=device, dtype=dtype)
    if guided:
        if uncond_embeddings is None:
            uncond_embeddings = encode_prompt(components, "")
        emb = torch.cat([uncond_embeddings.to(device=device, dtype=dtype), emb], dim=0)
    g = float(config.guidance_scale)

    from tqdm.auto import tqdm

    x = latent.detach().to(device=device, dtype=dtype)
    x0 = x
    trajectory: list[Tensor] | None = [x] if return_intermediates else None
    bar = tqdm(total=n_actual, desc="DDIM inversion", disable=not progress, leave=False)
    try:
        if mode == "reference":
            with torch.no_grad():
                for t in inv_ts:
                    model_in = torch.cat([x] * 2) if guided else x
                    eps = call(model_in, torch.tensor(t), emb)
                    if guided:
                        eps_u, eps_c = eps.chunk(2, dim=0)
                        eps = eps_u + g * (eps_c - eps_u)
                    x = ddim_inv_step(sched, eps, t, x)
                    if trajectory is not None:
                        trajectory.append(x)
                    bar.update(1)
        else:
            coefs = [ddim_inv_step_coefficients(sched, t) for t in inv_ts]
            with torch.inference_mode():
                t_dev = torch.tensor(inv_ts, dtype=torch.int64, device=device)
                for i, (a, b) in enumerate(coefs):
                    model_in = torch.cat([x] * 2) if guided else x
                    eps = call(model_in, t_dev[i], emb)
                    if guided:
                        eps_u, eps_c = eps.chunk(2, dim=0)
                        eps = eps_u + g * (eps_c - eps_u)
                    x = torch.add(x * a, eps.to(dtype), alpha=b)
                    if trajectory is not None:
                        trajectory.append(x)
                    bar.update(1)
    finally:
        bar.close()
    z_t = _plain(x)
    if trajectory is not None:
        trajectory = [_plain(v) for v in trajectory]
    return InversionResult(z_t=z_t, t=int(t_final), denoise_timesteps=tuple(denoise_ts),
                           inversion_timesteps=tuple(inv_ts), config=config, latents=trajectory, x0=_plain(x0))


# --------------------------------------------------------------------------------------------------
# Fingerprints and the cached entry point
# --------------------------------------------------------------------------------------------------

_TOKENIZER_HASHES: weakref.WeakKeyDictionary[Any, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    ident = (len(tokenizer), int(tokenizer.model_max_length))
    try:
        cached = _TOKENIZER_HASHES.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == ident:
        return cached[1]
    digest = content_hash("dragrt.tokenizer.v1", type(tokenizer).__name__, ident[1], dict(tokenizer.get_vocab()))
    try:
        _TOKENIZER_HASHES[tokenizer] = (ident, digest)
    except TypeError:
        pass
    return digest


def components_fingerprint(components: SDComponents) -> str:
    """Content hash of an SD pipeline: :func:`module_fingerprint` of the UNet, VAE and text encoder plus the
    tokenizer's vocabulary. Cheap after the first call (per-tensor digests are remembered); a LoRA fused into
    the UNet (:func:`dragrt.runtime.models.lora.fused_lora`) changes it (only the rewritten tensors are re-hashed).
    """
    return content_hash(
        "dragrt.sd-components.v1",
        module_fingerprint(components.unet),
        module_fingerprint(components.vae),
        module_fingerprint(components.text_encoder),
        _tokenizer_fingerprint(components.tokenizer),
    )


def _scheduler_config(components: SDComponents) -> dict[str, Any]:
    return {k: v for k, v in dict(components.scheduler.config).items() if not k.startswith("_")}


def invert_image(
    components: SDComponents,
    image: Any,
    prompt: str,
    config: InversionConfig | None = None,
    *,
    lora_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
    cache: TensorCache | None = None,
    mode: Mode = "fast",
    unet_fn: UNetFn | None = None,
    return_intermediates: bool = False,
    progress: bool = False,
) -> InversionResult:
    """Encode ``image`` (posterior mean) and DDIM-invert it with ``prompt``, through a content-hash cache.

    The cache key hashes everything the result depends on: the image (canonical pixels, see
    :func:`image_pixels`), the prompt, the model (``model_fingerprint``, default :func:`components_fingerprint`,
    which hashes the weights *as they are now*, so a fused LoRA is part of it), ``lora_fingerprint``, the
    :class:`InversionConfig`, the scheduler config, ``mode``, the UNet dtype and the device type. Entries hold
    ``z_t`` and ``x0`` (and the trajectory when it was asked for); a hit returns copies on the UNet's device.

    Args:
        image: PIL image, uint8 ``[H, W, 3]`` array or float ``[1, 3, H, W]`` tensor in [-1, 1]; H, W multiples of 8.
        lora_fingerprint: :func:`dragrt.runtime.models.lora.lora_fingerprint` of the LoRA applied to the UNet.
        model_fingerprint: a precomputed fingerprint of the base pipeline (skips hashing the weights); when given,
            the LoRA must be identified by ``lora_fingerprint``.
        cache: a :class:`TensorCache` (memory and/or disk), or ``None`` for no caching.
        mode, unet_fn, return_intermediates, progress: as :func:`ddim_invert`. ``unet_fn`` is not part of the key:
            it must compute the same function as ``components.unet``.
    """
    config = config or InversionConfig()
    if not isinstance(config, InversionConfig):
        raise ValueError(f"config must be an InversionConfig, got {type(config).__name__}")
    _check_mode(mode)
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if cache is not None and not isinstance(cache, TensorCache):
        raise ValueError(f"cache must be a TensorCache or None, got {type(cache).__name__}")
    pixels = image_pixels(image)
    p = next(components.unet.parameters())
    device, dtype = p.device, p.dtype
    key = None
    if cache is not None:
        key = content_hash(
            "dragrt.inversion.v1", pixels, prompt,
            model_fingerprint if model_fingerprint is not None else components_fingerprint(components),
            lora_fingerprint, config, _scheduler_config(components), mode, dtype, device.type,
        )
        got = cache.get(key, device=device)
        if got is not None and "z_t" in got and (not return_intermediates or "latents.0" in got):
            sched = ddim_schedule(components.scheduler, config.num_inference_steps)
            inv_ts = tuple(reversed(sched.timesteps))[: config.num_actual_steps]
            latents = None
            if return_intermediates:
                latents = [got[f"latents.{i}"] for i in range(config.num_actual_steps + 1)]
            return InversionResult(
                z_t=got["z_t"], t=sched.timesteps[config.start_index],
                denoise_timesteps=tuple(sched.timesteps[config.start_index:]), inversion_timesteps=inv_ts,
                config=config, latents=latents, x0=got.get("x0"), cache_key=key, from_cache=True,
            )
    x0 = encode_image(components, pixels)
    emb = encode_prompt(components, prompt)
    result = ddim_invert(components, x0, emb, config, mode=mode, unet_fn=unet_fn,
                         return_intermediates=return_intermediates, progress=progress)
    result.cache_key = key
    if cache is not None and key is not None:
        tensors = {"z_t": result.z_t, "x0": result.x0}
        if result.latents is not None:
            tensors.update({f"latents.{i}": v for i, v in enumerate(result.latents)})
        cache.put(key, tensors, metadata={
            "kind": "ddim-inversion", "t": str(result.t), "mode": mode, "dtype": str(dtype),
            "config": metadata_json(dataclasses.asdict(config)), "prompt": prompt,
        })
    return result
