"""Attention processors for diffusers UNets: backend choice (SDPA / xformers) and mutual self-attention.

- :func:`transformer_self_attentions`: every self-attention (``attn1``) of a UNet in forward order, numbered
  as DragDiffusion's controller numbers transformer blocks (SD1.5: 16 blocks; down 0-5, mid 6, up 7-15).
- :class:`MutualSelfAttnProcessor`: MasaCtrl-style mutual self-attention as DragDiffusion's final denoise uses
  it (spec ref_dragdiffusion.md §5): in the chosen blocks every branch of the batch attends to the keys and
  values of branch 0 (the un-edited reconstruction). ``literal=True`` does it as the reference writes it (the
  queries of both branches concatenated along the token axis, one attention call against branch 0's keys);
  the default broadcasts branch 0's keys and values to the batch. Softmax is per query row, so both give
  the same numbers.
- :func:`set_attention_backend`: ``"sdpa"`` (PyTorch ``scaled_dot_product_attention``), ``"cudnn"`` (the same
  with cuDNN's fused attention tried first, CUDA only), ``"xformers"`` (``memory_efficient_attention``, when
  installed) or ``"auto"`` (see :func:`default_attention_backend`);
  ``"math"`` (the score matrix materialised, as diffusers' classic ``AttnProcessor``) is what reference
  modes run, because the published code does.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "xformers")

#: ``"cudnn"``: SDPA's kernels in this order of preference (an order, not a restriction: a call cuDNN cannot take
#: -- a head dimension or dtype it lacks -- goes on to flash, then memory-efficient, then the maths).
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


_XFORMERS_OK: dict[str, bool] = {}


def xformers_available(device: torch.device | str = "cuda") -> bool:
    """True when xformers' memory-efficient attention actually runs on ``device`` (CUDA only). Checked once per
    device type with a tiny fp16 call: an importable wheel may still have no CUDA kernels (xformers 0.0.35's
    PyPI wheel on torch 2.11 imported fine and then had "no operator found" on an H200), which must fail here
    and not in the middle of an edit."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
        return False
    if "cuda" not in _XFORMERS_OK:
        try:
            import xformers.ops as xops

            q = torch.zeros(1, 8, 1, 8, device=device, dtype=torch.float16)
            xops.memory_efficient_attention(q, q, q)
            _XFORMERS_OK["cuda"] = True
        except Exception:  # noqa: BLE001 - any failure (import, missing kernels) means "not usable"
            _XFORMERS_OK["cuda"] = False
    return _XFORMERS_OK["cuda"]


def default_attention_backend(device: torch.device | str) -> str:
    """What ``"auto"`` means: SDPA. On an H200 with torch 2.11 SDPA's flash/cuDNN kernels were at least as
    fast as xformers 0.0.35 for SD1.5's shapes (``dragrt bench dragdiffusion-512-attention``), so SDPA is the
    default everywhere and xformers is an explicit choice."""
    return "sdpa"


def resolve_attention_backend(backend: str, device: torch.device | str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r} is not allowed; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        return default_attention_backend(device)
    if backend == "cudnn" and torch.device(device).type != "cuda":
        raise ValueError(f"attention='cudnn' runs on CUDA devices only; use attention='sdpa' on "
                         f"{torch.device(device).type}")
    if backend == "xformers":
        if torch.device(device).type != "cuda":
            raise ValueError("attention='xformers' runs on CUDA devices only; use attention='sdpa' on "
                             f"{torch.device(device).type}")
        if not xformers_available(device):
            raise ValueError("attention='xformers' needs an xformers build with CUDA kernels for this torch "
                             "(pip install xformers; `python -m xformers.info` shows its kernels); use "
                             "attention='sdpa' or 'auto'")
    return backend


def _attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tensor:
    """``softmax(q k^T * scale) v`` for ``[B, heads, N, d]`` queries and ``[B, heads, M, d]`` keys/values.

    ``backend="math"`` materialises the score matrix as diffusers' classic ``AttnProcessor`` and the
    reference's attention editor do (the reference modes use it: it is what the published code runs)."""
    if backend == "math":
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    if backend == "xformers":
        import xformers.ops as xops

        # xformers wants [B, N, heads, d]; expanded (stride-0) inputs are made contiguous.
        out = xops.memory_efficient_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                              v.transpose(1, 2).contiguous(), scale=scale)
        return out.transpose(1, 2)
    if backend == "cudnn":
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _projection(m: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` of a projection that is one linear map: a plain ``nn.Linear``, or a LoRA layer that
    offers its merged weight (``dragrt_weight_and_bias``, see :func:`dragrt.runtime.models.lora._merged_forwards`);
    ``None`` for anything else (e.g. peft's two-branch forward)."""
    if type(m) is nn.Linear:
        return m.weight, m.bias
    merged = getattr(m, "dragrt_weight_and_bias", None)
    return merged() if merged is not None else None


def _fused_qkv_projection(attn: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The ``[3 C, C]`` weight (and bias) of ``to_q``, ``to_k``, ``to_v`` stacked, when all three are one linear
    map each with biases alike; else ``None``. Made at every call (a copy of the weights, small beside the
    activations), so it follows weights changed in place (a fused LoRA) and LoRA weights in training."""
    parts = [_projection(m) for m in (attn.to_q, attn.to_k, attn.to_v)]
    if any(p is None for p in parts):
        return None
    biases = [b for _, b in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    weight = torch.cat([w for w, _ in parts])
    return weight, (None if biases[0] is None else torch.cat(biases))


class AttnProcessor:
    """Plain attention (self and cross) through the chosen backend, for the attention modules of SD1.x UNets
    (no group norm, spatial norm or attention masks: the UNet never passes one).

    ``fuse_qkv``: in self-attention, one matmul with the three projections' weights stacked instead of three
    (and one input gradient instead of three summed), where all three are one linear map each; the same
    function. Off in reference modes (the published code projects separately)."""

    def __init__(self, backend: str = "sdpa", fuse_qkv: bool = False) -> None:
        self.backend = backend
        self.fuse_qkv = fuse_qkv

    def _qkv(self, attn: nn.Module, hidden_states: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if getattr(attn, "group_norm", None) is not None or getattr(attn, "spatial_norm", None) is not None:
            raise ValueError("dragrt's attention processors support SD-style attention without group or spatial norm")
        if hidden_states.dim() != 3:
            raise ValueError(f"expected [B, N, C] hidden states, got shape {tuple(hidden_states.shape)}")
        context = hidden_states if context is None else context
        if context is not hidden_states and getattr(attn, "norm_cross", None) is not None:
            context = attn.norm_encoder_hidden_states(context)
        b, n, _ = hidden_states.shape
        fused = _fused_qkv_projection(attn) if self.fuse_qkv and context is hidden_states else None
        if fused is not None:
            q, k, v = F.linear(hidden_states, *fused).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        d = q.shape[-1] // heads
        # [B, N, heads * d] -> [B, heads, N, d]
        q = q.view(b, n, heads, d).transpose(1, 2)
        k = k.view(b, -1, heads, d).transpose(1, 2)
        v = v.view(b, -1, heads, d).transpose(1, 2)
        return q, k, v

    def _out(self, attn: nn.Module, out: Tensor, residual: Tensor) -> Tensor:
        b, heads, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, heads * d).to(residual.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if attention_mask is not None:
            raise ValueError("attention masks are not supported by dragrt's attention processors")
        q, k, v = self._qkv(attn, hidden_states, encoder_hidden_states)
        return self._out(attn, _attention(q, k, v, attn.scale, self.backend), hidden_states)


class MutualSelfAttnProcessor(AttnProcessor):
    """Self-attention in which every batch element attends to the keys/values of batch element 0.

    Args:
        backend: ``"sdpa"`` or ``"xformers"``.
        literal: compute it as the reference does (queries of the whole batch concatenated along the token
            axis, one attention call against branch 0); same numbers, used by the reference mode.
    """

    def __init__(self, backend: str = "sdpa", literal: bool = False, fuse_qkv: bool = False) -> None:
        super().__init__(backend, fuse_qkv=fuse_qkv)
        self.literal = literal

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError(f"{type(self).__name__} is for self-attention (attn1) modules only")
        if attention_mask is not None:
            raise ValueError("attention masks are not supported by dragrt's attention processors")
        q, k, v = self._qkv(attn, hidden_states, None)  # [B, heads, N, d]
        b, heads, n, d = q.shape
        if self.literal:
            # "(b h) n d -> h (b n) d" for the queries, branch 0 for keys and values.
            q_cat = q.permute(1, 0, 2, 3).reshape(1, heads, b * n, d)
            out = _attention(q_cat, k[:1], v[:1], attn.scale, self.backend)  # [1, heads, B * N, d]
            out = out.reshape(heads, b, n, d).permute(1, 0, 2, 3)
        else:
            k0, v0 = self._branch_zero(k, v)
            out = _attention(q, k0.expand(b, -1, -1, -1), v0.expand(b, -1, -1, -1), attn.scale, self.backend)
        return self._out(attn, out, hidden_states)

    def _branch_zero(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values every branch attends to (``[1, heads, N, d]`` each): branch 0's."""
        return k[:1], v[:1]


class BranchZeroKVProcessor(MutualSelfAttnProcessor):
    """Mutual self-attention whose branch-0 keys and values can be kept and reused.

    In DragDiffusion's final denoise the original branch (batch element 0) attends only to itself, so its
    trajectory, hence its keys and values at every step, depend on the prepared image alone, not on the edit.
    ``mode = "record"``: as :class:`MutualSelfAttnProcessor` (batch ``[original, edited...]``), and branch 0's
    keys and values are copied into ``self.k`` / ``self.v`` (buffers allocated on the first call and then
    written in place, so a CUDA graph captured later writes the same memory). ``mode = "replay"``: the batch
    holds the edited branches only; their queries attend to ``self.k`` / ``self.v``, which the caller fills
    with a recorded step's values before each call. Same maths as the mutual pass, without recomputing branch 0.
    """

    def __init__(self, backend: str = "sdpa", fuse_qkv: bool = False) -> None:
        super().__init__(backend, fuse_qkv=fuse_qkv)
        self.mode = "record"
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def _branch_zero(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.mode == "replay":
            if self.k is None or self.k.shape[1:] != k.shape[1:]:
                raise RuntimeError("BranchZeroKVProcessor: replay before a record of the same shapes")
            return self.k, self.v
        if self.mode != "record":
            raise ValueError(f"mode must be 'record' or 'replay', got {self.mode!r}")
        k0, v0 = k[:1], v[:1]
        if self.k is None or self.k.shape != k0.shape or self.k.dtype != k0.dtype:
            self.k = k0.clone(memory_format=torch.contiguous_format)
            self.v = v0.clone(memory_format=torch.contiguous_format)
        else:
            self.k.copy_(k0)
            self.v.copy_(v0)
        return k0, v0


def transformer_self_attentions(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attn1 module)`` of every transformer block in forward order (down blocks, mid block, up blocks),
    the numbering of DragDiffusion's attention controller (``cur_att_layer // 2``)."""
    order = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        for name, module in unet.named_modules():
            if name.startswith(part) and name.endswith(".attn1"):
                order.append((name, module))
    if not order:
        raise ValueError(f"{type(unet).__name__} has no transformer self-attention modules (attn1)")
    return order


def set_attention_backend(unet: nn.Module, backend: str = "auto", *, fuse_qkv: bool = False) -> str:
    """Give every attention module of ``unet`` dragrt's :class:`AttnProcessor` with ``backend`` (and
    ``fuse_qkv``); returns the backend used. ``ValueError`` when xformers is asked for and missing, or off CUDA."""
    if backend != "math":
        backend = resolve_attention_backend(backend, next(unet.parameters()).device)
    elif fuse_qkv:
        raise ValueError("fuse_qkv=True is not allowed with backend='math' (the reference modes' literal attention)")
    unet.set_attn_processor(AttnProcessor(backend, fuse_qkv=fuse_qkv))
    return backend


@contextlib.contextmanager
def mutual_self_attention(unet: nn.Module, start_layer: int = 10, *, backend: str = "sdpa",
                          literal: bool = False, processors: list[nn.Module] | None = None,
                          fuse_qkv: bool = False) -> Iterator[list[str]]:
    """Within the block, self-attention of transformer blocks ``start_layer`` and later is mutual (every branch
    attends to branch 0); other processors are kept. Yields the names of the modules changed. The previous
    processors come back on exit. ``processors``: one per changed module, used instead of a shared
    :class:`MutualSelfAttnProcessor` (e.g. :class:`BranchZeroKVProcessor`, which keeps per-layer state).
    ``fuse_qkv``: the shared processor's (:class:`AttnProcessor`)."""
    blocks = transformer_self_attentions(unet)
    if not 0 <= start_layer <= len(blocks):
        raise ValueError(f"start_layer={start_layer} is out of range; this UNet has {len(blocks)} transformer "
                         f"blocks (0 to {len(blocks)})")
    changed = blocks[start_layer:]
    if processors is None:
        processors = [MutualSelfAttnProcessor(backend, literal=literal, fuse_qkv=fuse_qkv)] * len(changed)
    elif len(processors) != len(changed):
        raise ValueError(f"{len(processors)} processors for {len(changed)} mutual self-attention modules")
    saved = {name: module.processor for name, module in blocks}
    try:
        for (_, module), proc in zip(changed, processors):
            module.set_processor(proc)
        yield [name for name, _ in changed]
    finally:
        for name, module in blocks:
            module.set_processor(saved[name])
