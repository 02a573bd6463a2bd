"""Per-image LoRA for DragDiffusion: training (peft), diffusers-compatible files, fusing, caching.

Reference: Yujun-Shi/DragDiffusion ``utils/lora_utils.py::train_lora`` (spec ``ref_dragdiffusion.md`` §4), read
at the version on GitHub (diffusers ``LoRAAttnProcessor`` era). What it does, and what :func:`train_image_lora`
reproduces:

- ``accelerate.utils.set_seed(0)`` first, then the LoRA layers are created: one diffusers ``LoRALinearLayer``
  (rank 16, no ``network_alpha``, so the update is ``up(down(x))`` with scale 1) on ``to_q``, ``to_k``, ``to_v``
  and ``to_out[0]`` of every attention processor of the UNet (32 attention modules = 128 linear layers in SD1.5).
  ``LoRALinearLayer`` builds ``down = Linear(in, r)`` and ``up = Linear(r, out)`` (each drawing nn.Linear's
  default init), then ``normal_(down, std=1/r)`` and ``zeros_(up)``: the same distribution as peft's
  ``init_lora_weights="gaussian"``. Here the LoRA is injected with peft (``lora_alpha = r``: scaling 1) and
  initialised in exactly that order of draws on the CPU generator, in float32.
- UNet, VAE, text encoder frozen and cast to fp16; LoRA parameters stay float32 (they are created in float32
  and accelerate's ``prepare_model`` only moves them). The UNet forward is *not* under autocast (accelerate wraps
  the forward of the ``AttnProcsLayers`` container, which is never called), so the base layers run in fp16 and
  the LoRA branch in fp32; ``mixed_precision="fp16"`` still brings a dynamic ``GradScaler`` on CUDA.
- AdamW(lr 5e-4, betas (0.9, 0.999), weight_decay 1e-2, eps 1e-8), constant schedule, 80 steps, batch 4.
- Text: ``tokenizer(prompt, truncation=True, padding="max_length", max_length=model_max_length)`` ->
  ``text_encoder(ids)[0]`` once, repeated to the batch.
- Every step: 4 x ``transforms.Resize(512, BILINEAR)`` + ``RandomCrop(512)`` + ``ToTensor`` +
  ``Normalize([0.5], [0.5])`` of the same uint8 image (identity for a 512 x 512 image: PIL returns a copy and
  RandomCrop draws nothing), ``vae.encode(batch).latent_dist.sample() * scaling_factor`` (re-encoded every
  step), ``noise = randn_like``, ``timesteps = randint(0, num_train_timesteps, (bsz,))`` on the device,
  ``DDPMScheduler.add_noise`` (the model's own betas), ``unet(noisy, timesteps, emb)``, MSE in float32 against
  the noise (or ``get_velocity`` for v-prediction models), ``backward``, ``step``, ``zero_grad``.
- Saved with ``LoraLoaderMixin.save_lora_weights`` -> ``pytorch_lora_weights.safetensors`` in that era's
  attention-processor key format (``unet.<attn path>.processor.to_q_lora.down.weight``); :func:`load_lora`
  reads it (and today's peft format) and :func:`save_lora` writes today's format, which diffusers'
  ``pipe.load_lora_weights(folder)`` loads.

``mode="reference"`` runs that loop literally (transforms on PIL images, a VAE encode of the 4-image batch
every step, a ``DDPMScheduler``, plain ``AdamW``, ``GradScaler`` when the UNet is fp16 on CUDA).
``mode="fast"`` runs the same maths with the waste removed: the image is resized and normalised once and
encoded ONCE; the posterior mean and std are kept and every step draws ``mean + std * randn`` (the same
distribution, and the same draw as ``latent_dist.sample()``, which is literally ``mean + std * randn``); no host
syncs in the loop (device-side timesteps and noise tables, fused AdamW, a sync-free GradScaler with it); the
UNet under autocast (fp16 or bf16) with float32 LoRA master weights; on CUDA, after an eager first step, the
whole step is replayed from one CUDA graph (the eager step is CPU-bound), through the UNet's compiled blocks when
a fast engine compiled them. For non-square images (where RandomCrop really crops) fast mode encodes each
distinct crop once, on first use, and runs eagerly (the crops are drawn on the host). With the same seed both
modes draw the same random numbers in the same order, so on the CPU in float32 they train the same LoRA up to
rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dragrt.runtime.cache.store import TensorCache, content_hash, metadata_json
from dragrt.runtime.config import force_eager
from dragrt.runtime.models.layout import nchw_weights

if TYPE_CHECKING:
    from dragrt.runtime.models.sd import SDComponents

__all__ = [
    "LoRAConfig",
    "LORA_WEIGHT_NAME",
    "lora_target_modules",
    "train_image_lora",
    "train_or_load_lora",
    "convert_lora_state_dict",
    "save_lora",
    "load_lora",
    "lora_fingerprint",
    "fused_lora",
    "release_lora_graphs",
]

#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights(folder)`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_LEGACY_BIN_NAME = "pytorch_lora_weights.bin"
_ADAPTER = "dragrt_lora"
_DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAConfig:
    """Per-image LoRA training settings; the defaults are DragDiffusion's (UI and DragBench script).

    Attributes:
        rank: LoRA rank r (16); ``lora_alpha = r``, so the update is ``B @ A`` unscaled, as ``LoRALinearLayer``
            without ``network_alpha``.
        learning_rate: AdamW learning rate (5e-4), constant schedule.
        steps: optimisation steps (80).
        batch_size: copies of the image per step (4), each with its own posterior sample, noise and timestep.
        seed: the reference calls ``accelerate.utils.set_seed(0)`` before creating the LoRA layers.
        betas, weight_decay, eps: the reference's AdamW arguments ((0.9, 0.999), 1e-2, 1e-8).
        resolution: ``Resize(resolution)`` + ``RandomCrop(resolution)`` (512 in the reference; tests use less).
        target_modules: linear layers that get a LoRA (peft matching: the name or its last dotted parts).
    """

    rank: int = 16
    learning_rate: float = 5e-4
    steps: int = 80
    batch_size: int = 4
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    resolution: int = 512
    target_modules: tuple[str, ...] = _DEFAULT_TARGETS

    def __post_init__(self) -> None:
        def whole(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in {lo}..{hi}, got {v!r}")

        def real(name: str, v: Any, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> None:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
            if not ok:
                interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
                raise ValueError(f"{name} must be a number in {interval}, got {v!r}")

        whole("rank", 1, 1024)
        whole("steps", 1, 1_000_000)
        whole("batch_size", 1, 256)
        whole("seed", 0, 2**63 - 1)
        whole("resolution", 8, 8192)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")
        real("learning_rate", self.learning_rate, 0.0, 1.0, open_lo=True)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            real(f"betas[{i}]", b, 0.0, 1.0, open_hi=True)
        real("weight_decay", self.weight_decay, 0.0, 1.0)
        real("eps", self.eps, 0.0, 1.0, open_lo=True)
        if (not isinstance(self.target_modules, (tuple, list)) or not self.target_modules
                or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ValueError(f"target_modules must be a non-empty tuple of module names, got {self.target_modules!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def lora_alpha(self) -> int:
        """``= rank`` (scaling 1), as the reference's ``LoRALinearLayer`` without ``network_alpha``."""
        return self.rank


def _check_mode(mode: Any) -> str:
    if mode not in ("fast", "reference"):
        raise ValueError(f"mode must be 'fast' or 'reference', got {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------------
# Targets, injection, removal
# --------------------------------------------------------------------------------------------------


def _clean(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule for a list of target names: the full name, or its tail after a dot.
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_target_modules(unet: nn.Module, target_modules: tuple[str, ...] = _DEFAULT_TARGETS) -> list[str]:
    """Paths (``torch.compile``'s ``_orig_mod`` dropped) of the ``nn.Linear`` layers a LoRA goes on, in module
    order. SD1.5: 128 layers (to_q/k/v/out.0) in 32 attention modules (attn1 + attn2 of 16 transformer blocks)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for name, module in unet.named_modules():
        clean = _clean(name)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if "lora_" in clean or "base_layer" in clean:
            continue
        if isinstance(module, nn.Linear) and _matches(clean, target_modules):
            out.append(clean)
    return out


def _linear_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Clean path -> module for every module (peft-wrapped layers resolve to the wrapper)."""
    return {_clean(n): m for n, m in unet.named_modules()}


def _peft_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _has_peft_layers(unet: nn.Module) -> bool:
    return bool(_peft_layers(unet))


def _inject(unet: nn.Module, config: LoRAConfig, device: torch.device) -> list[tuple[str, nn.Module]]:
    """Wrap the target layers with peft LoRA layers and initialise them as the reference does.

    peft creates placeholder adapters (outside the global RNG stream) and the float32 parameters are then made
    here, so that (a) the init is not rounded to the base dtype (peft casts adapters to an fp16 base's dtype) and
    (b) the CPU generator is consumed as diffusers' ``LoRALinearLayer`` consumes it: per attention module in
    ``attn_processors`` order, per projection q, k, v, out: nn.Linear's kaiming-uniform init of ``down`` and of
    ``up``, then ``normal_(down, std=1/r)``; ``up = 0``.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    expected = lora_target_modules(unet, config.target_modules)
    if not expected:
        raise ValueError(f"the UNet has no linear layers named {list(config.target_modules)}: nothing to train")
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                             target_modules=list(config.target_modules), init_lora_weights=False)
    # peft's own placeholder init must not consume the global generator (the draws below are the reference's).
    # (Its meta-device mode would skip the placeholders but runs nn.init through Python decompositions: slower.)
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(peft_config, unet, adapter_name=_ADAPTER)
    layers = [(_clean(n), m) for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)]
    got = [n for n, _ in layers]
    if got != expected:
        raise RuntimeError(f"peft wrapped {len(got)} layers but {len(expected)} were expected "
                           f"(first difference: {sorted(set(got) ^ set(expected))[:3]})")
    for _, layer in layers:
        base = layer.get_base_layer()
        down, up = _reference_init(base.in_features, base.out_features, config.rank)
        layer.lora_A[_ADAPTER].weight = nn.Parameter(down.to(device))
        layer.lora_B[_ADAPTER].weight = nn.Parameter(up.to(device))
    return layers


def _reference_init(in_features: int, out_features: int, r: int) -> tuple[Tensor, Tensor]:
    """One layer's ``(down [r, in], up [out, r])`` float32 on the CPU, drawn from the global CPU generator as
    diffusers' ``LoRALinearLayer`` draws them (see :func:`_inject`)."""
    down = torch.empty(r, in_features)
    up = torch.empty(out_features, r)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # nn.Linear(in, r)'s default init (draws only)
    nn.init.kaiming_uniform_(up, a=math.sqrt(5))  # nn.Linear(r, out)'s
    nn.init.normal_(down, std=1 / r)
    nn.init.zeros_(up)
    return down, up


#: How fast mode runs a LoRA layer: ``"branch"`` as peft does (``base(x) + B(A(x))``: two skinny matmuls more per
#: layer and pass) or ``"merged"`` (``linear(x, W + B @ A)``: one matmul, whose weight gradient autograd turns into
#: those of A and B; the same function and gradients, other roundings).
LORA_FORWARDS = ("branch", "merged")


@contextlib.contextmanager
def _merged_forwards(layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Run each peft LoRA layer as one linear map with the weight ``W + scaling * B @ A`` (formed in float32,
    rounded once to the base weight's dtype) inside the block; peft's own forward comes back afterwards.

    The update's gradient reaches ``A`` and ``B`` through the merged weight: ``dB = dW' A^T`` and ``dA = B^T dW'``
    with ``dW' = dY^T X``, the gradients the branch ``B(A(x))`` gets. What changes is the work: one dense
    weight-gradient matmul instead of four skinny ones and two more forward ones, per layer."""
    patched = []
    for path, layer in layers:
        if not isinstance(layer.lora_dropout[_ADAPTER], nn.Identity):
            raise ValueError(f"lora_forward='merged' needs lora_dropout=0 (layer {path} has dropout)")
        base = layer.get_base_layer()
        a, b = layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]
        scaling = float(layer.scaling[_ADAPTER])

        def weight_and_bias(_base=base, _a=a, _b=b, _s=scaling) -> tuple[Tensor, Tensor | None]:
            delta = _b.weight @ _a.weight
            if _s != 1.0:
                delta = delta * _s
            return (_base.weight.float() + delta.float()).to(_base.weight.dtype), _base.bias

        def forward(x: Tensor, *args: Any, _merged=weight_and_bias, **kwargs: Any) -> Tensor:
            return F.linear(x, *_merged())

        # instance attributes: the class's forward is untouched; attention processors that fuse the q/k/v
        # projections (attention.AttnProcessor(fuse_qkv=True)) read the merged weight
        layer.forward, layer.dragrt_weight_and_bias = forward, weight_and_bias
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("dragrt_weight_and_bias", None)


def _strip(unet: nn.Module) -> None:
    """Replace every peft wrapper by its base layer (the UNet is left exactly as before injection)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if not isinstance(module, BaseTunerLayer) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())


def _weights_of(layers: list[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path, layer in layers:
        out[f"unet.{path}.lora_A.weight"] = layer.lora_A[_ADAPTER].weight.detach().clone()
        out[f"unet.{path}.lora_B.weight"] = layer.lora_B[_ADAPTER].weight.detach().clone()
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _training_pixels(image: Any) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the reference trains from the uint8 image (``Image.fromarray``). A float tensor in
    [-1, 1] is quantised back: ``round((x + 1) * 127.5)`` (exact for tensors made as ``u8 / 127.5 - 1``)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB") if image.mode != "RGB" else image).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image as an array must be uint8 [H, W, 3] (RGB), got {image.dtype} {list(image.shape)}")
        return np.ascontiguousarray(image)
    if isinstance(image, Tensor):
        t = image.detach()
        if t.dim() == 3:
            t = t[None]
        if not t.is_floating_point() or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
            raise ValueError(f"image as a tensor must be float [1, 3, H, W] in [-1, 1], got {t.dtype} "
                             f"{list(image.shape)}")
        t = t.float().cpu()
        if not torch.isfinite(t).all() or t.min() < -1.001 or t.max() > 1.001:
            raise ValueError("image tensor values must lie in [-1, 1] (pixels / 127.5 - 1)")
        u8 = ((t[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return u8.permute(1, 2, 0).contiguous().numpy()
    raise ValueError(f"image must be a PIL image, a uint8 [H, W, 3] array or a float [1, 3, H, W] tensor in "
                     f"[-1, 1], got {type(image).__name__}")


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int): the short side becomes `size`, the long one int(size * long / short).
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)  # (new_h, new_w)


def _resize(pil: Any, size: int) -> Any:
    from PIL import Image

    new_h, new_w = _resized_size(pil.height, pil.width, size)
    if (new_h, new_w) == (pil.height, pil.width):
        return pil  # torchvision returns the image untouched when the size already matches
    return pil.resize((new_w, new_h), Image.BILINEAR)


def _crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision RandomCrop.get_params: nothing drawn when the image already has the crop size; else top,
    # then left, each from torch's global generator.
    if h == size and w == size:
        return 0, 0
    i = int(torch.randint(0, h - size + 1, size=(1,)).item())
    j = int(torch.randint(0, w - size + 1, size=(1,)).item())
    return i, j


def _to_normalized(arr: np.ndarray) -> Tensor:
    # ToTensor (uint8 HWC -> float CHW / 255) then Normalize([0.5], [0.5]): (x - 0.5) / 0.5.
    x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    return x.sub(0.5).div(0.5)


class _AddNoise:
    """``DDPMScheduler.add_noise`` / ``get_velocity`` with the tables staged on the device once (fast mode).

    Elementwise identical to diffusers: ``alphas_cumprod`` cast to the sample dtype, ``[t] ** 0.5`` and
    ``(1 - [t]) ** 0.5`` (here the powers are taken on the whole table, then gathered).
    """

    def __init__(self, alphas_cumprod: Tensor, device: torch.device, dtype: torch.dtype) -> None:
        ac = alphas_cumprod.to(device=device).to(dtype)
        self.sqrt_a = ac**0.5
        self.sqrt_1ma = (1 - ac) ** 0.5

    def __call__(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.sqrt_a[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1ma[t].view(-1, 1, 1, 1) * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.sqrt_a[t].view(-1, 1, 1, 1) * noise - self.sqrt_1ma[t].view(-1, 1, 1, 1) * x0


def _ddpm(components: SDComponents) -> Any:
    from diffusers import DDPMScheduler

    # The reference loads DDPMScheduler from the model's scheduler folder: same betas as our DDIM config. Keys
    # DDPM does not take (set_alpha_to_one, ...) are dropped so diffusers does not warn about them.
    allowed = set(inspect.signature(DDPMScheduler.__init__).parameters)
    config = {k: v for k, v in dict(components.scheduler.config).items() if k in allowed}
    return DDPMScheduler.from_config(config)


def _optimizer_step(loss: Tensor, opt: torch.optim.Optimizer, scaler: Any) -> None:
    """Backward, step and zero the gradients (``set_to_none``, torch's default), through ``scaler`` (a GradScaler,
    as accelerate's fp16 mixed precision does) when one is given."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def train_image_lora(
    components: SDComponents,
    image: Any,
    prompt: str,
    config: LoRAConfig | None = None,
    *,
    mode: str = "fast",
    progress: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    cuda_graph: bool = True,
    lora_forward: str = "branch",
    reuse_graph: bool = True,
) -> dict[str, Tensor]:
    """Fine-tune a LoRA on one image (DragDiffusion's "Train LoRA"); the UNet is left exactly as it was.

    Args:
        components: the SD pipeline; all three networks must be frozen (they are, from :mod:`.sd`). The UNet is
            temporarily wrapped with peft layers, so nothing else may use it during training.
        image: PIL image, uint8 ``[H, W, 3]`` array or float ``[1, 3, H, W]`` tensor in [-1, 1] (quantised to
            uint8, as the reference trains from the uint8 image). Any size: it is resized / cropped to
            ``config.resolution`` as the reference does.
        prompt: the text prompt (the reference trains with the same prompt it inverts with).
        mode: ``"reference"`` or ``"fast"`` (module docstring).
        progress: tqdm bar (the only per-step host work in fast mode).
        callback: ``callback(step, loss)`` after every optimiser step (``loss`` a detached 0-d device tensor;
            reading it synchronises, which is the caller's choice).
        autocast_dtype: fast mode on CUDA: the autocast dtype (default: the UNet's dtype when fp16/bf16, else
            bf16 where supported). fp16 uses a GradScaler; fp32 disables autocast. Ignored elsewhere.
        cuda_graph: fast mode on CUDA with a square image: run the first step eagerly, then replay the others
            from one captured CUDA graph (3.4x faster per step on an H200; the same maths and random draws).
        lora_forward: fast mode: :data:`LORA_FORWARDS` (``"branch"``, peft's; ``"merged"``, one matmul with
            ``W + B @ A`` per layer). Reference mode always runs peft's.
        reuse_graph: fast mode with a captured step: keep it (its LoRA parameters, optimiser state and memory
            pool, ~3 GB for SD1.5 at 512 px) for this UNet's next training with the same settings, which then
            replays it from its first step: no peft layers to make, no eager step, no capture. The kept step
            is used only while every UNet weight is the same tensor as at capture (:func:`release_lora_graphs`
            frees it).

    Returns:
        The LoRA weights, float32 on the UNet's device, in diffusers' peft-style keys:
        ``unet.<module path>.lora_A.weight`` ``[r, in]`` and ``unet.<module path>.lora_B.weight`` ``[out, r]``
        (``lora_alpha = r``: the update is ``B @ A``).
    """
    config = config or LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    _check_mode(mode)
    if lora_forward not in LORA_FORWARDS:
        raise ValueError(f"lora_forward must be one of {', '.join(map(repr, LORA_FORWARDS))}, got {lora_forward!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    pixels = _training_pixels(image)
    unet = components.unet
    if _has_peft_layers(unet):
        raise ValueError("the UNet already holds peft LoRA layers; unload them before training a new LoRA")
    device = next(unet.parameters()).device

    from dragrt.runtime.inversion import encode_prompt

    emb = encode_prompt(components, prompt).repeat(config.batch_size, 1, 1)  # [B, 77, D], computed once
    devices = [device] if device.type == "cuda" else []
    was_training = unet.training
    had_peft_config = hasattr(unet, "peft_config")
    # Frozen base (the reference: unet.requires_grad_(False)); flags restored afterwards.
    grad_flags = [(q, q.requires_grad) for q in unet.parameters()]
    unet.requires_grad_(False)
    try:
        # Fast mode runs a fast engine's compiled UNet blocks compiled: the first LoRA compiles their training
        # variants (minutes on a GPU, once a process: later images' fresh LoRA layers reuse them), the step then
        # takes 35 ms instead of 52 (H200, captured). Reference mode runs them eagerly.
        # The reference trains in the published layout (NCHW) even when a fast engine made the UNet channels-last.
        stance = contextlib.ExitStack()
        if mode == "reference":
            stance.enter_context(force_eager())
            stance.enter_context(nchw_weights(unet))
        with torch.random.fork_rng(devices=devices), stance:
            torch.manual_seed(config.seed)  # accelerate's set_seed(0): CPU and every CUDA generator
            key = _warm_key(components, config, emb, autocast_dtype, lora_forward) if mode == "fast" else None
            warm = _WARM.get(unet) if mode == "fast" else None
            if warm is not None and not (reuse_graph and warm.usable(unet, key)):
                release_lora_graphs(unet)  # another setting, or the weights moved: make room for a new one
                warm = None
            if warm is not None and cuda_graph and _is_square(pixels, config.resolution):
                return _train_warm(warm, components, pixels, emb, config, progress, callback)
            kept = None
            try:
                layers = _inject(unet, config, device)
                params = [w for _, layer in layers
                          for w in (layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight)]
                if mode == "reference":
                    _train_reference(components, pixels, emb, params, config, progress, callback)
                else:
                    merged = _merged_forwards(layers) if lora_forward == "merged" else contextlib.nullcontext()
                    with merged:
                        kept = _train_fast(components, pixels, emb, params, config, progress, callback,
                                           autocast_dtype, cuda_graph, keep=reuse_graph)
                    if kept is not None:
                        kept.paths, kept.key = [path for path, _ in layers], key
                weights = _weights_of(layers)
            finally:
                _strip(unet)
                if not had_peft_config and hasattr(unet, "peft_config"):
                    del unet.peft_config
            if kept is not None:
                # The UNet's weights as usable() will see them, without the peft layers: unet.parameters() lists
                # theirs while they are injected, and pointers taken then never matched again (an H200 test).
                kept.pointers = _pointers(unet)
                _WARM[unet] = kept
    finally:
        unet.train(was_training)
        for q, flag in grad_flags:
            q.requires_grad_(flag)
    return weights


def _reference_batch(pixels: np.ndarray, config: LoRAConfig, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The reference's per-step image batch: ``bsz`` x (Resize, RandomCrop, ToTensor, Normalize) on PIL."""
    from PIL import Image

    images = []
    for _ in range(config.batch_size):
        pil = _resize(Image.fromarray(pixels), config.resolution)
        i, j = _crop_offsets(pil.height, pil.width, config.resolution)
        s = config.resolution
        if (i, j, s, s) != (0, 0, pil.height, pil.width):
            pil = pil.crop((j, i, j + s, i + s))
        images.append(_to_normalized(np.asarray(pil)).to(device, dtype=dtype).unsqueeze(0))
    return torch.cat(images, dim=0)


def _train_reference(components: SDComponents, pixels: np.ndarray, emb: Tensor, params: list[Tensor],
                     config: LoRAConfig, progress: bool, callback: Callable | None) -> None:
    from tqdm.auto import tqdm

    unet, vae = components.unet, components.vae
    device = next(unet.parameters()).device
    unet_dtype = next(unet.parameters()).dtype
    vae_dtype = next(vae.parameters()).dtype
    ddpm = _ddpm(components)
    n_train = int(ddpm.config.num_train_timesteps)
    prediction = ddpm.config.prediction_type
    opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay,
                            eps=config.eps)
    # accelerate(mixed_precision="fp16") on CUDA: a default dynamic GradScaler around backward and step.
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and unet_dtype == torch.float16) else None
    for step in tqdm(range(config.steps), desc="training LoRA", disable=not progress):
        unet.train()
        batch = _reference_batch(pixels, config, device, vae_dtype)
        with torch.no_grad():
            x0 = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(x0)
        bsz = x0.shape[0]
        timesteps = torch.randint(0, n_train, (bsz,), device=x0.device).long()
        noisy = ddpm.add_noise(x0, noise, timesteps)
        pred = unet(noisy, timesteps, emb).sample
        if prediction == "epsilon":
            target = noise
        elif prediction == "v_prediction":
            target = ddpm.get_velocity(x0, noise, timesteps)
        else:
            raise ValueError(f"unknown prediction_type {prediction!r} in the scheduler config")
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        _optimizer_step(loss, opt, scaler)
        if callback is not None:
            callback(step, loss.detach())


@dataclass(eq=False)
class _Warm:
    """A fast-mode LoRA training step kept for the next training on the same UNet (``reuse_graph``): the
    captured graph and every tensor it reads or writes that is not the UNet's (the LoRA parameters ``A0, B0, A1,
    ...`` of the layers in ``paths``, the optimiser and GradScaler states, the posterior moments, the text
    embedding, the noise tables)."""

    graph: Any
    loss: Tensor
    params: list[Tensor]
    opt: Any
    scaler: Any
    mean: Tensor
    std: Tensor
    emb: Tensor
    add_noise: Any
    paths: list[str] = dataclasses.field(default_factory=list)
    key: Any = None
    pointers: tuple[int, ...] = ()

    def usable(self, unet: nn.Module, key: Any) -> bool:
        # the graph reads the UNet's weights where they were at capture: a layout change or a reload moves them
        return key == self.key and _pointers(unet) == self.pointers


#: The kept training step of each UNet (:class:`_Warm`); an entry goes with its UNet.
_WARM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release_lora_graphs(unet: nn.Module | None = None) -> None:
    """Free the LoRA training step kept for ``unet`` (every UNet's when ``None``) by ``train_image_lora(...,
    reuse_graph=True)``: its CUDA graph, memory pool and states. The next training captures anew."""
    for key in [unet] if unet is not None else list(_WARM.keys()):
        _WARM.pop(key, None)


def _pointers(unet: nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in (*unet.parameters(), *unet.buffers()))


def _warm_key(components: SDComponents, config: LoRAConfig, emb: Tensor, autocast_dtype: torch.dtype | None,
              lora_forward: str) -> tuple:
    """Everything a captured step bakes in besides the UNet's weights and the per-image inputs: the settings
    (the step count and the seed aside: the count is how many replays, the seed only draws the initial
    weights), the dtypes, the text embedding's shape, the schedule, and how the UNet computes attention."""
    unet, vae = components.unet, components.vae
    fields = dataclasses.asdict(config)
    fields.pop("steps")
    fields.pop("seed")
    procs = tuple((name, type(p).__name__, getattr(p, "backend", None), getattr(p, "fuse_qkv", None))
                  for name, p in unet.attn_processors.items())
    schedule = json.dumps(dict(components.scheduler.config), sort_keys=True, default=str)
    return (tuple(sorted((k, str(v)) for k, v in fields.items())), autocast_dtype, lora_forward,
            next(unet.parameters()).dtype, next(vae.parameters()).dtype, tuple(emb.shape), emb.dtype,
            float(vae.config.scaling_factor), schedule, procs, bool(getattr(unet, "_dragrt_compiled", None)))


def _is_square(pixels: np.ndarray, res: int) -> bool:
    """Whether the reference's Resize + RandomCrop leave nothing to crop (the only case a step is captured)."""
    return _resized_size(pixels.shape[0], pixels.shape[1], res) == (res, res)


def _train_warm(warm: _Warm, components: SDComponents, pixels: np.ndarray, emb: Tensor, config: LoRAConfig,
                progress: bool, callback: Callable | None) -> dict[str, Tensor]:
    """A fast-mode training from a kept step: the reference's initial draws into the kept LoRA parameters,
    optimiser and GradScaler back to their initial state, this image's posterior moments and this prompt's
    embedding into the kept inputs, then ``config.steps`` replays. The same random draws as a training that
    captures (the generator was seeded just before; every replay takes the offset of the moment)."""
    from tqdm.auto import tqdm

    vae = components.vae
    vae_dtype = next(vae.parameters()).dtype
    device = warm.loss.device
    with torch.no_grad():
        for a, b in zip(warm.params[0::2], warm.params[1::2]):
            down, up = _reference_init(a.shape[1], b.shape[0], config.rank)
            a.copy_(down)
            b.copy_(up)
        for state in warm.opt.state.values():  # AdamW's moments and (capturable) step counts
            for v in state.values():
                if isinstance(v, Tensor):
                    v.zero_()
        if warm.scaler is not None:  # a new GradScaler's scale and growth count
            warm.scaler._scale.fill_(warm.scaler._init_scale)
            warm.scaler._growth_tracker.zero_()
        mean, std = _square_moments(vae, _normalized_image(pixels, config.resolution, device, vae_dtype),
                                    config.batch_size)
        warm.mean.copy_(mean)
        warm.std.copy_(std)
        warm.emb.copy_(emb)
    bar = tqdm(total=config.steps, desc="training LoRA (fast, kept step)", disable=not progress)
    try:
        for step in range(config.steps):
            warm.graph.replay()
            bar.update()
            if callback is not None:
                callback(step, warm.loss.clone())
    finally:
        bar.close()
    out: dict[str, Tensor] = {}
    for path, a, b in zip(warm.paths, warm.params[0::2], warm.params[1::2]):
        out[f"unet.{path}.lora_A.weight"] = a.detach().clone()
        out[f"unet.{path}.lora_B.weight"] = b.detach().clone()
    return out


def _normalized_image(pixels: np.ndarray, res: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The reference's Resize + ToTensor + Normalize of the image, done once: ``[1, 3, H', W']`` (its crops are
    slices of it: cropping commutes with the pointwise maps)."""
    from PIL import Image

    return _to_normalized(np.asarray(_resize(Image.fromarray(pixels), res))).to(device, dtype=dtype)[None]


@torch.no_grad()
def _square_moments(vae: nn.Module, full: Tensor, bsz: int) -> tuple[Tensor, Tensor]:
    """Fast mode's one VAE call for a square image: the batch of ``bsz`` identical images the reference encodes
    every step (same kernels, same output layout, so the same posterior mean and std, ``[bsz, 4, h, w]``, as its
    first step, bit for bit)."""
    dist = vae.encode(full.repeat(bsz, 1, 1, 1)).latent_dist
    return dist.mean, dist.std


#: UNets whose compiled blocks have run a fast LoRA training in this process (their training variants exist).
_TRAINED_COMPILED: weakref.WeakSet = weakref.WeakSet()


def _train_fast(components: SDComponents, pixels: np.ndarray, emb: Tensor, params: list[Tensor],
                config: LoRAConfig, progress: bool, callback: Callable | None,
                autocast_dtype: torch.dtype | None, cuda_graph: bool, keep: bool = False) -> _Warm | None:
    """Fast-mode training; with ``keep`` and a captured step, returns what a later training replays (the
    caller fills in the layer paths, the settings key and the UNet's weight pointers)."""
    from tqdm.auto import tqdm

    unet, vae = components.unet, components.vae
    device = next(unet.parameters()).device
    unet_dtype = next(unet.parameters()).dtype
    vae_dtype = next(vae.parameters()).dtype
    sf = float(vae.config.scaling_factor)
    bsz, res = config.batch_size, config.resolution
    sched_cfg = components.scheduler.config
    n_train = int(sched_cfg.num_train_timesteps)
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction_type {prediction!r} in the scheduler config")
    add_noise = _AddNoise(_ddpm(components).alphas_cumprod, device, vae_dtype)

    full = _normalized_image(pixels, res, device, vae_dtype)
    H, W = full.shape[-2:]
    moments: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
    layout = torch.contiguous_format

    def encode(offsets: list[tuple[int, int]]) -> None:
        # Crops not seen yet, encoded in batches of exactly bsz (padded with repeats): the batch size the
        # reference encodes with, so the VAE picks the same kernels and output layout.
        nonlocal layout
        todo = sorted({o for o in offsets if o not in moments})
        if not todo:
            return
        todo += [todo[-1]] * (-len(todo) % bsz)
        for start in range(0, len(todo), bsz):
            chunk = todo[start:start + bsz]
            crops = torch.cat([full[:, :, i:i + res, j:j + res] for i, j in chunk], dim=0)
            with torch.no_grad():
                dist = vae.encode(crops).latent_dist
            for k, o in enumerate(chunk):
                moments[o] = (dist.mean[k:k + 1], dist.std[k:k + 1])
            out = dist.parameters
            cl = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            layout = torch.channels_last if cl else torch.contiguous_format

    square = (H, W) == (res, res)
    if square:
        mean, std = _square_moments(vae, full, bsz)

    if device.type == "cuda":
        if autocast_dtype is None:
            if unet_dtype in (torch.float16, torch.bfloat16):
                autocast_dtype = unet_dtype
            else:
                autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if autocast_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"autocast_dtype must be torch.float16, torch.bfloat16 or torch.float32, "
                             f"got {autocast_dtype}")
        use_autocast = autocast_dtype != torch.float32
        scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
        # fused AdamW reads the scaler's found_inf / scale on the device: no host sync per step.
        # (capturable: the step count stays on the device, so the step can be captured in a CUDA graph).
        opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.betas,
                                weight_decay=config.weight_decay, eps=config.eps, fused=True, capturable=cuda_graph)
        if use_autocast:
            # peft casts a layer's input to its adapter's dtype (float32 here) and autocast casts it straight
            # back to the autocast dtype for the LoRA matmul: two activation-sized copies per layer and pass,
            # for a round trip that changes no value (fp16/bf16 -> fp32 is exact). Skip it.
            for layer in _peft_layers(unet):
                if hasattr(layer, "cast_input_dtype_enabled"):
                    layer.cast_input_dtype_enabled = False
    else:
        use_autocast, scaler = False, None
        opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.betas,
                                weight_decay=config.weight_decay, eps=config.eps)

    def body() -> Tensor:
        # Same draws, same order as the reference: [crop offsets], posterior sample, noise, timesteps.
        if square:
            sample = torch.randn(mean.shape, device=device, dtype=vae_dtype)
            x0 = (mean + std * sample) * sf  # latent_dist.sample() * scaling_factor, as the reference
        else:
            offsets = [_crop_offsets(H, W, res) for _ in range(bsz)]
            encode(offsets)
            m = torch.cat([moments[o][0] for o in offsets])
            s = torch.cat([moments[o][1] for o in offsets])
            sample = torch.randn(m.shape, device=device, dtype=vae_dtype)
            # randn_like below follows x0's memory layout, and which numbers land where depends on it: give x0
            # the layout of the reference's (the VAE output's: NCHW on CUDA, channels-last from oneDNN on CPU).
            x0 = ((m + s * sample) * sf).contiguous(memory_format=layout)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, n_train, (bsz,), device=device)
        noisy = add_noise(x0, noise, timesteps)
        target = noise if prediction == "epsilon" else add_noise.velocity(x0, noise, timesteps)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            pred = unet(noisy, timesteps, emb, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        _optimizer_step(loss, opt, scaler)
        return loss.detach()

    # A square image (no crops drawn on the host) on CUDA: the first step runs eagerly (on a side stream, as
    # CUDA-graph capture wants: it also creates the optimiser and scaler states), then one whole step --
    # draws, forward, backward, GradScaler, AdamW -- is captured and replayed for the rest. The eager step is
    # CPU-bound (~5300 kernel launches, 175 ms against 52 ms of GPU work on an H200 at 512 px, batch 4).
    # Replays draw their random numbers from the same generator stream, so they train the same LoRA.
    graphed = device.type == "cuda" and cuda_graph and square and config.steps > 1
    bar = tqdm(total=config.steps, desc="training LoRA (fast)", disable=not progress)
    if getattr(unet, "_dragrt_compiled", None) and unet not in _TRAINED_COMPILED:
        # a fast engine compiled the blocks: this process's first LoRA compiles their training variants
        bar.set_postfix_str("compiling the training step (once a process, minutes on a GPU)")

    def report(step: int, loss: Tensor) -> None:
        if step == 0:
            bar.set_postfix_str("")
        bar.update()
        if callback is not None:
            callback(step, loss.clone() if graphed else loss)  # a graph's output is overwritten by the next replay

    try:
        if not graphed:
            for step in range(config.steps):
                report(step, body())
            return None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            loss = body()
        torch.cuda.current_stream(device).wait_stream(side)
        report(0, loss)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = body()  # captured, not run: the replays below are steps 1 .. steps - 1
        for step in range(1, config.steps):
            graph.replay()
            report(step, loss)
        if keep:
            return _Warm(graph=graph, loss=loss, params=params, opt=opt, scaler=scaler, mean=mean, std=std, emb=emb,
                         add_noise=add_noise)
        del graph
        return None
    finally:
        bar.close()
        if getattr(unet, "_dragrt_compiled", None):
            _TRAINED_COMPILED.add(unet)


# --------------------------------------------------------------------------------------------------
# Key formats, files
# --------------------------------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_PROCS_KEY = re.compile(r"^(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_COMPAT_KEY = re.compile(
    r"^(?P<path>.+)\.(?P<proj>to_q|to_k|to_v|to_out\.0)\.(?:lora|lora_layer)\.(?P<ud>down|up)\.weight$")


def convert_lora_state_dict(state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
                            ) -> dict[str, Tensor]:
    """A UNet LoRA state dict in diffusers' peft-style keys: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``.

    Reads:
    - peft / diffusers >= 0.26 keys (``[unet.]<path>.lora_A[.<adapter>].weight``);
    - the attention-processor keys DragDiffusion's trainer writes (diffusers 0.2x ``AttnProcsLayers``):
      ``[unet.]<attn path>.processor.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` (``down`` -> ``lora_A``,
      ``up`` -> ``lora_B``, ``to_out`` -> ``to_out.0``);
    - ``LoRACompatibleLinear`` keys: ``[unet.]<path>.{to_q,...,to_out.0}.lora[_layer].{down,up}.weight``.
    ``metadata``: a safetensors header; when its ``lora_adapter_metadata`` gives ``unet.lora_alpha != unet.r``,
    ``alpha / r`` is folded into ``lora_B`` so that the result always means ``W + B @ A``.

    Raises:
        ValueError: text-encoder LoRA keys (DragDiffusion trains none; fusing only the UNet part would change the
            model silently), unknown keys, or unpaired A / B tensors.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"LoRA entry {key!r} is a {type(value).__name__}, not a tensor")
        k = key
        if k.startswith(("text_encoder.", "text_encoder_2.", "lora_te")):
            raise ValueError(f"LoRA key {key!r} belongs to a text encoder; only UNet LoRAs are supported")
        k = k.removeprefix("unet.")
        if m := _PROCS_KEY.match(k):
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            new = f"unet.{m['path']}.{proj}.lora_{'A' if m['ud'] == 'down' else 'B'}.weight"
        elif m := _COMPAT_KEY.match(k):
            new = f"unet.{m['path']}.{m['proj']}.lora_{'A' if m['ud'] == 'down' else 'B'}.weight"
        elif m := _PEFT_KEY.match(k):
            new = f"unet.{m['path']}.lora_{m['ab']}.weight"
        else:
            raise ValueError(f"LoRA key {key!r} is not in a supported format (diffusers/peft "
                             "'unet.<path>.lora_A.weight', or DragDiffusion's "
                             "'<path>.processor.to_q_lora.down.weight')")
        if new in out:
            raise ValueError(f"LoRA keys map twice onto {new!r} (duplicate entries in different formats?)")
        out[new] = value
    paths = {k.rsplit(".lora_", 1)[0] for k in out}
    for path in sorted(paths):
        a, b = out.get(f"{path}.lora_A.weight"), out.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"LoRA for {path!r} has only {'lora_B' if a is None else 'lora_A'}; both are needed")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA for {path!r}: A {list(a.shape)} and B {list(b.shape)} do not pair as "
                             "[r, in] and [out, r]")
    scale = _metadata_scale(metadata)
    if scale != 1.0:
        out = {k: (v * scale if ".lora_B." in k else v) for k, v in out.items()}
    return out


def _metadata_scale(metadata: Mapping[str, str] | None) -> float:
    if not metadata or "lora_adapter_metadata" not in metadata:
        return 1.0
    try:
        info = json.loads(metadata["lora_adapter_metadata"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"LoRA file: unreadable lora_adapter_metadata ({exc})") from None
    for pattern in ("unet.alpha_pattern", "unet.rank_pattern"):
        if info.get(pattern):
            raise ValueError(f"LoRA file: per-layer {pattern.split('.')[1]} is not supported")
    if info.get("unet.use_dora"):
        raise ValueError("LoRA file: DoRA adapters are not supported")
    r, alpha = info.get("unet.r"), info.get("unet.lora_alpha")
    if r is None or alpha is None:
        return 1.0
    scale = float(alpha) / float(r)
    if info.get("unet.use_rslora"):
        scale = float(alpha) / math.sqrt(float(r))
    return scale


def save_lora(weights: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write ``weights`` as diffusers does (``save_lora_weights``): safetensors, peft-style ``unet.*`` keys, header
    ``{"format": "pt"}``. ``path``: a folder (``pytorch_lora_weights.safetensors`` goes in it, so
    ``pipe.load_lora_weights(folder)`` finds it) or a ``.safetensors`` file name. Atomic. Returns the file."""
    from safetensors.torch import save

    path = Path(path).expanduser()
    file = path if path.suffix == ".safetensors" else path / LORA_WEIGHT_NAME
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in convert_lora_state_dict(weights).items()}
    data = save(tensors, metadata={"format": "pt"})
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=str(file.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return file


def load_lora(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a UNet LoRA (CPU tensors, stored dtype) in peft-style keys (:func:`convert_lora_state_dict`).

    ``path``: a ``.safetensors`` / ``.bin`` file, or a folder holding ``pytorch_lora_weights.safetensors``
    (else its only ``.safetensors`` file, else ``pytorch_lora_weights.bin``). ``.bin`` files are read with
    ``torch.load(weights_only=True)`` (tensors only, no code runs).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"load_lora: {path} does not exist; expected a {LORA_WEIGHT_NAME} file or its folder")
    if path.is_dir():
        candidates = [path / LORA_WEIGHT_NAME]
        others = sorted(p for p in path.glob("*.safetensors") if p.name != LORA_WEIGHT_NAME)
        if len(others) == 1:
            candidates.append(others[0])
        candidates.append(path / _LEGACY_BIN_NAME)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"load_lora: no {LORA_WEIGHT_NAME} (or a single .safetensors, or "
                                    f"{_LEGACY_BIN_NAME}) in {path}")
        path = found
    metadata: dict[str, str] | None = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ValueError(f"load_lora: {path} is not a readable safetensors file ({type(exc).__name__}: {exc})"
                             ) from exc
    elif path.suffix in (".bin", ".pt", ".pth"):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"load_lora: {path} holds a {type(state).__name__}, not a state dict")
    else:
        raise ValueError(f"load_lora: {path} must be a .safetensors or .bin file")
    return convert_lora_state_dict(state, metadata)


def lora_fingerprint(weights: Mapping[str, Tensor]) -> str:
    """Content hash of a LoRA (keys normalised by :func:`convert_lora_state_dict`, exact values and dtypes), so
    the same LoRA read from the old or the new key format gets the same fingerprint."""
    return content_hash("dragrt.lora-weights.v1", convert_lora_state_dict(weights))


# --------------------------------------------------------------------------------------------------
# Fusing
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fused_lora(unet: nn.Module, weights: Mapping[str, Tensor], scale: float = 1.0) -> Iterator[nn.Module]:
    """Add ``scale * B @ A`` into the weights of the targeted linear layers for the duration of the block.

    The LoRA update of peft (``lora_alpha = r``: scaling 1; any other alpha was folded into B on load) is
    ``y = W x + b + scale * B (A x)``; fused, ``y = (W + scale * B @ A) x + b``: the same function, evaluated by the
    plain UNet at full speed (compiled blocks and captured CUDA graphs keep working: the weights change in
    place). The sum is formed in float32 and rounded once to the weight's dtype. On exit the original tensors are
    copied back from saved copies: bit-exact. Nesting works (inner contexts restore to the outer state).

    Args:
        unet: the UNet (``torch.compile`` wrappers and peft-wrapped layers are looked through).
        weights: a LoRA state dict in any format :func:`convert_lora_state_dict` reads.
        scale: the LoRA strength (1.0 = as trained; diffusers' ``cross_attention_kwargs={"scale": s}``).

    Raises:
        ValueError: a LoRA module missing from the UNet, not a linear layer, or with mismatched shapes.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    norm = convert_lora_state_dict(weights)
    modules = _linear_layers(unet)
    targets: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    for key in sorted(k for k in norm if k.endswith(".lora_A.weight")):
        path = key[len("unet."):-len(".lora_A.weight")]
        a, b = norm[key], norm[f"unet.{path}.lora_B.weight"]
        module = modules.get(path)
        if module is None:
            raise ValueError(f"fused_lora: the UNet has no module {path!r} (LoRA for a different architecture?)")
        if hasattr(module, "get_base_layer"):
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            raise ValueError(f"fused_lora: {path!r} is a {type(module).__name__}, not a linear layer")
        if tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"fused_lora: {path!r} weight is {list(weight.shape)} but the LoRA gives "
                             f"B {list(b.shape)} @ A {list(a.shape)}")
        targets.append((path, module, a, b))
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad():
            for _, module, a, b in targets:
                w = module.weight
                delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
                original = w.detach().clone()
                saved.append((w, original))
                w.copy_((w.float() + delta * float(scale)).to(w.dtype))
        yield unet
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)


# --------------------------------------------------------------------------------------------------
# Cached entry point
# --------------------------------------------------------------------------------------------------


def train_or_load_lora(
    components: SDComponents,
    image: Any,
    prompt: str,
    config: LoRAConfig | None = None,
    *,
    cache: TensorCache | None = None,
    mode: str = "fast",
    model_fingerprint: str | None = None,
    progress: bool = True,
    callback: Callable[[int, Tensor], None] | None = None,
    cuda_graph: bool = True,
) -> dict[str, Tensor]:
    """:func:`train_image_lora` through a content-hash cache (memory and/or disk).

    The key hashes the image (as the uint8 pixels training sees), the prompt, the pipeline
    (``model_fingerprint`` or :func:`dragrt.runtime.inversion.components_fingerprint`: UNet, VAE and text encoder
    weights), the :class:`LoRAConfig` (seed included), the scheduler config, ``mode``, the UNet dtype and the
    device type. A hit returns copies on the UNet's device without training.
    """
    config = config or LoRAConfig()
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
    _check_mode(mode)
    if cache is not None and not isinstance(cache, TensorCache):
        raise ValueError(f"cache must be a TensorCache or None, got {type(cache).__name__}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    pixels = _training_pixels(image)

    def train() -> dict[str, Tensor]:
        return train_image_lora(components, pixels, prompt, config, mode=mode, progress=progress, callback=callback,
                                cuda_graph=cuda_graph)

    if cache is None:
        return train()
    from dragrt.runtime.inversion import components_fingerprint

    p = next(components.unet.parameters())
    sched = {k: v for k, v in dict(components.scheduler.config).items() if not k.startswith("_")}
    key = content_hash("dragrt.lora.v1", pixels, prompt,
                       model_fingerprint if model_fingerprint is not None else components_fingerprint(components),
                       config, sched, mode, p.dtype, p.device.type)
    got = cache.get(key, device=p.device)
    if got is not None:
        return got
    weights = train()
    cache.put(key, weights, metadata={"kind": "lora", "mode": mode,
                                      "config": metadata_json(dataclasses.asdict(config)), "prompt": prompt})
    return weights
