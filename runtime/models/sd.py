"""Stable Diffusion 1.5 through diffusers: configs, random full-size builds, offline loading, feature taps.

Everything here works without a network: every diffusers / transformers call passes
``local_files_only=True``, paths are checked before any library sees them (so a typo gives our
``FileNotFoundError``, never a hub lookup), and the configs SD1.5 needs are written here as data.

- :data:`SD15_UNET_CONFIG`, :data:`SD15_VAE_CONFIG`, :data:`SD15_SCHEDULER_CONFIG`: SD1.5 in diffusers'
  config format (what ``unet/config.json`` etc. hold, without the ``_class_name`` bookkeeping), equal to
  what diffusers derives from the original ``v1-inference.yaml`` (a test checks it).
- :func:`tiny_unet_config`, :func:`tiny_vae_config`, :func:`tiny_text_config`: the same block kinds at
  toy widths, for CPU tests.
- :func:`build_random_sd15`: SD1.5-shaped models with random weights (latency work) or tiny ones (tests).
- :func:`load_sd`: a diffusers folder, or one ``.safetensors`` in the original CompVis/A1111 key layout.
- :func:`save_sd_folder` / :func:`save_sd_single_file`: write either format back (fixtures, exports).
- :class:`UNetFeatureTap`: forward hooks on ``unet.up_blocks[i]`` (DragDiffusion reads ``up_blocks[2]``),
  with an optional truncated forward.

All models come back in eval mode with ``requires_grad=False``: the engines optimise latents, never
weights (LoRA helpers add their own trainable parameters).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

# --------------------------------------------------------------------------------------------------
# Configs (data)
# --------------------------------------------------------------------------------------------------

#: SD1.5 UNet (860M parameters) in diffusers' format. Derived from ``v1-inference.yaml``:
#: model_channels 320 x channel_mult [1, 2, 4, 4]; attention at downsample factors 1, 2, 4 (the first three
#: levels); num_res_blocks 2; num_heads 8 (diffusers calls the head *count* ``attention_head_dim`` for SD1);
#: context_dim 768; image_size 512 / 8 = latent 64.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "transformer_layers_per_block": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}

#: SD1.x VAE (84M parameters): ch 128 x ch_mult [1, 2, 4, 4], num_res_blocks 2, z_channels 4, no attention
#: outside the mid block; latents are multiplied by ``scaling_factor`` before the UNet sees them.
SD15_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

#: The DDIM scheduler DragDiffusion builds (spec ref_dragdiffusion.md §1): the SD1 training schedule
#: (linear_start 0.00085, linear_end 0.012, 1000 steps, scaled_linear), no sample clipping, final alpha
#: from the schedule (not 1), steps_offset 1 and "leading" spacing, so 50 steps give t = 981, 961, ..., 1.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

#: ``model_index.json`` of a diffusers StableDiffusionPipeline folder, as :func:`save_sd_folder` writes it.
_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_unet_config() -> dict[str, Any]:
    """A toy UNet with SD1.5's block kinds (3 cross-attention levels + 1 plain, mirrored on the way up).

    Widths 32/64/96/128 keep every tensor tiny while GroupNorm keeps SD's 32 groups, so the same model can
    also be described by an original-SD yaml. ``up_blocks[2]`` outputs 64 channels at the full latent
    resolution, like SD1.5's 640 channels at 64x64. ``cross_attention_dim`` matches :func:`tiny_text_config`.
    """
    cfg = dict(SD15_UNET_CONFIG)
    cfg.update(
        sample_size=16,
        block_out_channels=[32, 64, 96, 128],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    return cfg


def tiny_vae_config() -> dict[str, Any]:
    """A toy SD-style VAE: four levels (8x downsampling, like SD), 32/32/64/64 channels, 4 latent channels."""
    cfg = dict(SD15_VAE_CONFIG)
    cfg.update(sample_size=128, block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    return cfg


def tiny_text_config() -> dict[str, Any]:
    """A toy CLIP text tower (2 layers, width 32) with SD's vocabulary, so the real tokenizer drives it.

    Keys are ``transformers.CLIPTextConfig`` arguments; token ids follow the SD1 text encoder config.
    """
    return {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


# --------------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------------

TEXT_ENCODER_CONFIG_FILE = "sd15_text_encoder_config.json"
TOKENIZER_DIR = "sd15_tokenizer"
ORIGINAL_CONFIG_FILE = "sd15_v1-inference.yaml"


def assets_dir() -> Path | None:
    """The folder of real third-party assets (tokenizer, configs, TAESD weights), or ``None``.

    ``$DRAGRT_ASSETS`` when set, else ``../shared/assets`` next to the repository root (the folder holding
    ``runtime/`` in a checkout). ``None`` when that folder does not exist: callers skip or explain.
    """
    env = os.environ.get("DRAGRT_ASSETS")
    if env:
        path = Path(env).expanduser()
    else:
        repo_root = Path(__file__).resolve().parents[2]  # runtime/models/sd.py -> repository root
        path = repo_root.parent / "shared" / "assets"
    return path if path.is_dir() else None


def _asset(name: str, what: str) -> Path:
    root = assets_dir()
    if root is None:
        raise FileNotFoundError(
            f"{what} comes from the assets folder, which was not found: set DRAGRT_ASSETS to a folder holding "
            f"{name} (default: ../shared/assets beside the repository)"
        )
    path = root / name
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist (assets folder {root})")
    return path


def load_sd15_tokenizer(path: str | os.PathLike | None = None, *, max_length: int = 77) -> CLIPTokenizer:
    """The real SD1.x CLIP BPE tokenizer, offline.

    Args:
        path: a tokenizer folder (vocab.json, merges.txt, ...); default: ``sd15_tokenizer`` in :func:`assets_dir`.
        max_length: the text encoder's context (77 tokens for SD1.x). The stored CLIP tokenizer config says
            8192, which would make ``padding="max_length"`` pad to 8192 tokens; pipelines read
            ``tokenizer.model_max_length``, so it is set to this value.
    """
    from transformers import CLIPTokenizer

    folder = Path(path) if path is not None else _asset(TOKENIZER_DIR, "the SD1.5 tokenizer")
    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe_files and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {folder}: expected vocab.json + merges.txt, or tokenizer.json, in it"
        )
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=max_length)


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


@dataclass
class SDComponents:
    """The pieces of an SD1.x pipeline, loaded once and shared by the engines.

    Attributes:
        unet: noise predictor, ``[N, 4, h, w]`` latents (scaled by ``vae.config.scaling_factor``) ->
            ``[N, 4, h, w]`` epsilon; h, w = image size / 8.
        vae: ``AutoencoderKL``, images ``[N, 3, H, W]`` in [-1, 1] <-> unscaled latents ``[N, 4, H/8, W/8]``.
        text_encoder: ``CLIPTextModel``, token ids ``[N, 77]`` -> hidden states ``[N, 77, 768]``.
        tokenizer: the CLIP tokenizer (``model_max_length`` 77).
        scheduler: a ``DDIMScheduler`` (DragDiffusion's settings unless the loaded folder says otherwise).
        config: the config of each component (``"unet"``, ``"vae"``, ``"text_encoder"``, ``"scheduler"``).
        source: where the weights came from (a path, or ``"random"``).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "random"

    def modules(self) -> dict[str, nn.Module]:
        """The three networks by name."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SDComponents:
        """Move/cast the networks in place; returns ``self``."""
        for module in self.modules().values():
            nn.Module.to(module, device=device, dtype=dtype)  # diffusers' own .to warns on every dtype cast
        return self


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _components_config(unet: Any, vae: Any, text_encoder: Any, scheduler: Any) -> dict[str, dict[str, Any]]:
    return {
        "unet": _public(unet.config),
        "vae": _public(vae.config),
        "text_encoder": text_encoder.config.to_dict(),
        "scheduler": _public(scheduler.config),
    }


def build_random_sd15(
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    tiny: bool = False,
    seed: int = 0,
) -> SDComponents:
    """SD1.5-shaped components with random weights (deterministic per ``seed`` and device).

    Full size (``tiny=False``) is the real architecture: 860M-parameter UNet, 84M VAE, 123M CLIP text
    encoder (config from ``sd15_text_encoder_config.json`` in the assets); it is built directly on
    ``device`` (about 30 s on 2 busy CPU cores, seconds on a GPU) and is meant for latency and memory work, its
    outputs are meaningless. ``tiny=True`` uses :func:`tiny_unet_config` & co. for tests (well under a second).
    The tokenizer is the real one from the assets in both cases (``FileNotFoundError`` when they are absent).
    The global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device(device)
    unet_cfg = tiny_unet_config() if tiny else dict(SD15_UNET_CONFIG)
    vae_cfg = tiny_vae_config() if tiny else dict(SD15_VAE_CONFIG)
    if tiny:
        text_cfg = CLIPTextConfig(**tiny_text_config())
    else:
        text_cfg = CLIPTextConfig.from_json_file(str(_asset(TEXT_ENCODER_CONFIG_FILE, "the SD1.5 text encoder config")))
    tokenizer = load_sd15_tokenizer(max_length=text_cfg.max_position_embeddings)

    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(text_cfg)
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    for module in (unet, vae, text_encoder):
        # nn.Module.to: diffusers' override warns on every dtype cast, even with nothing to keep in fp32.
        _freeze(nn.Module.to(module, dtype=dtype))
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        config=_components_config(unet, vae, text_encoder, scheduler),
        source="random-tiny" if tiny else "random",
    )


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save_sd_folder(components: SDComponents, path: str | os.PathLike) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (safetensors weights); returns its path.

    Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.
    ``StableDiffusionPipeline.from_pretrained(path)`` and :func:`load_sd` both read it.
    """
    import diffusers

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(root / "unet", safe_serialization=True)
    components.vae.save_pretrained(root / "vae", safe_serialization=True)
    components.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    components.tokenizer.save_pretrained(root / "tokenizer")
    backend = getattr(components.tokenizer, "backend_tokenizer", None)
    if backend is not None and not (root / "tokenizer" / "vocab.json").is_file():
        # transformers 5 writes only tokenizer.json; SD folders (and transformers 4's CLIPTokenizer) also
        # carry the BPE files. The tokenizers BPE model writes them byte-identical to CLIP's originals.
        backend.model.save(str(root / "tokenizer"))
    components.scheduler.save_pretrained(root / "scheduler")
    for part in ("unet", "vae", "text_encoder"):
        # a model loaded with from_pretrained records its source folder: a local path is not part of the model
        cfg_file = root / part / "config.json"
        cfg = json.loads(cfg_file.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    index = {**_MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    index["scheduler"] = ["diffusers", type(components.scheduler).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root


# Original (CompVis ldm / A1111 / ComfyUI) single-file layout: three prefixes, and the UNet's blocks
# numbered as flat input_blocks / middle_block / output_blocks lists.
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_TEXT = "cond_stage_model.transformer."
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    per = layers_per_block + 1  # LDM slots per level: the resnets (+ attention), then the resampler
    if m := re.fullmatch(r"(time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(\w+)", key):
        return f"{_UNET_TOP_TO_LDM[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_RESNET_TO_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_RESNET_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_RESNET_TO_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if up_has_attention[block] else 1
        return f"output_blocks.{block * per + layers_per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"UNet parameter {key!r} has no place in the original SD1 layout (not an SD1-style UNet?)")


def _vae_key_to_ldm(key: str, value: torch.Tensor, n_levels: int) -> tuple[str, torch.Tensor]:
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{m[1]}.norm_out.{m[2]}", value
    if re.fullmatch(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.\w+", key):
        return key, value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = n_levels - 1 - int(m[1])  # LDM numbers decoder levels from the lowest resolution up
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}", value
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        return f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", value
    attention = r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)"
    if m := re.fullmatch(attention, key):
        if m[2] != "group_norm" and m[3] == "weight":
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}", value
    raise ValueError(f"VAE parameter {key!r} has no place in the original SD1 layout (not an SD1-style VAE?)")


def to_original_sd_state_dict(components: SDComponents) -> dict[str, torch.Tensor]:
    """The weights in the original single-file SD1 layout (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), as A1111 and ComfyUI load them.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
    ``convert_ldm_clip_checkpoint`` (tests check the round trip is exact). Tensors are shared, not copied.
    """
    unet_cfg = components.unet.config
    up_has_attention = ["CrossAttn" in t for t in unet_cfg.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, value in components.unet.state_dict().items():
        out[_LDM_UNET + _unet_key_to_ldm(key, unet_cfg.layers_per_block, up_has_attention)] = value
    n_levels = len(components.vae.config.block_out_channels)
    for key, value in components.vae.state_dict().items():
        ldm_key, ldm_value = _vae_key_to_ldm(key, value, n_levels)
        out[_LDM_VAE + ldm_key] = ldm_value
    for key, value in components.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel (no "text_model." level); the original layout has it.
        out[_LDM_TEXT + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def save_sd_single_file(components: SDComponents, path: str | os.PathLike) -> Path:
    """Write one ``.safetensors`` checkpoint in the original SD1 layout (see :func:`to_original_sd_state_dict`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_sd_single_file: path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_original_sd_state_dict(components).items()}
    save_file(tensors, str(path), metadata={"format": "pt", "written_by": "dragrt"})
    return path


# --------------------------------------------------------------------------------------------------
# Loading (offline only)
# --------------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = "a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
_SINGLE_FILE = "a single .safetensors checkpoint in the original SD layout (model.diffusion_model.*, ...)"


def load_sd(
    path_or_file: str | os.PathLike,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config_dir: str | os.PathLike | None = None,
) -> SDComponents:
    """Load SD1.x components from local files only; never touches the network.

    Args:
        path_or_file: ``zoo:<name>`` (a shipped zoo pipeline); a diffusers folder (``unet/``, ``vae/``,
            ``text_encoder/`` with configs and weights; ``tokenizer/`` and ``scheduler/`` optional: the SD1.5
            tokenizer from the assets and :data:`SD15_SCHEDULER_CONFIG` fill in); or one ``.safetensors`` file
            in the original CompVis / A1111 key layout (UNet, VAE and CLIP text encoder in one file).
        torch_dtype: dtype of the returned networks.
        device: where they are put.
        config_dir: single files only: where the architecture comes from. A diffusers-format folder with
            ``unet/config.json`` and ``vae/config.json`` (e.g. one written by :func:`save_sd_folder`; its
            ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` are used when present), or an original
            ``.yaml`` inference config. Default: ``sd15_v1-inference.yaml`` from the assets. The text encoder
            config and tokenizer come from the assets unless the folder has its own.

    Raises:
        FileNotFoundError: a path, config or weight file is missing (the message names it and what was
            expected there).
        ValueError: the file is not a supported checkpoint, or its tensors do not fit the architecture
            (missing, unexpected or wrongly shaped tensors are listed).
    """
    from dragrt.zoo.registry import resolve

    path = resolve(path_or_file).expanduser()  # "zoo:<name>" -> the shipped folder
    device = torch.device(device)
    if not path.exists():
        raise FileNotFoundError(f"load_sd: {path} does not exist; expected {_FOLDER_LAYOUT} or {_SINGLE_FILE}")
    if path.is_dir():
        if config_dir is not None:
            raise ValueError(
                f"load_sd: config_dir is for single-file checkpoints; {path} is a folder with its own configs"
            )
        return _load_folder(path, torch_dtype, device)
    return _load_single_file(path, torch_dtype, device, config_dir)


def _require_file(folder: Path, names: Iterable[str], what: str) -> Path:
    names = list(names)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"load_sd: {what}: none of {', '.join(names)} found in {folder}")


def _require_weights(folder: Path, stem: str, what: str) -> None:
    candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.bin.index.json"]
    _require_file(folder, candidates, f"{what} weights")


def _load_folder(root: Path, dtype: torch.dtype, device: torch.device) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (root / "unet").is_dir() and not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"load_sd: {root} is a folder but not a diffusers model; expected {_FOLDER_LAYOUT}")
    weight_stems = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    for sub, stem in weight_stems.items():
        folder = root / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"load_sd: {folder} is missing; expected {_FOLDER_LAYOUT}")
        _require_file(folder, ["config.json"], f"the {sub} config")
        _require_weights(folder, stem, f"the {sub}")

    unet = UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype, local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(str(root / "text_encoder"), dtype=dtype, local_files_only=True)
    tokenizer = _tokenizer_for(root / "tokenizer", text_encoder)
    scheduler = _scheduler_for(root / "scheduler")
    for module in (unet, vae, text_encoder):
        _freeze(module.to(device))
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        config=_components_config(unet, vae, text_encoder, scheduler),
        source=str(root),
    )


def _tokenizer_for(folder: Path | None, text_encoder: Any) -> CLIPTokenizer:
    max_length = text_encoder.config.max_position_embeddings
    if folder is not None and folder.is_dir():
        return load_sd15_tokenizer(folder, max_length=max_length)
    return load_sd15_tokenizer(max_length=max_length)  # every SD1.x model shares CLIP's tokenizer


def _scheduler_for(folder: Path | None) -> DDIMScheduler:
    from diffusers import DDIMScheduler

    config = dict(SD15_SCHEDULER_CONFIG)
    if folder is not None and (folder / "scheduler_config.json").is_file():
        # A model's own schedule (betas, prediction type) wins; DDIM's own fields keep our defaults when
        # the folder's scheduler is another kind (SD1.5 ships a PNDM config).
        config.update(_public(json.loads((folder / "scheduler_config.json").read_text())))
    return DDIMScheduler.from_config(config)


def _load_single_file(
    file: Path, dtype: torch.dtype, device: torch.device, config_dir: str | os.PathLike | None
) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
        fetch_original_config,
    )
    from safetensors.torch import load_file

    if file.suffix != ".safetensors":
        raise ValueError(
            f"load_sd: {file} is not a .safetensors file; expected {_FOLDER_LAYOUT} or {_SINGLE_FILE} "
            "(pickled .ckpt files can run code when loaded: convert them to safetensors first)"
        )

    # 1. Where the architecture comes from: a diffusers-format folder or an original yaml.
    if config_dir is None:
        config_path = _asset(ORIGINAL_CONFIG_FILE, f"load_sd({file.name}): the default SD1.5 architecture")
    else:
        config_path = Path(config_dir).expanduser()
        if not config_path.exists():
            raise FileNotFoundError(
                f"load_sd: config_dir {config_path} does not exist; expected a diffusers-format folder "
                "(unet/config.json, vae/config.json) or an original SD .yaml config"
            )
    local: Path | None = None
    if config_path.is_dir():
        for sub in ("unet", "vae"):
            _require_file(config_path / sub, ["config.json"], f"config_dir: the {sub} config")
        local = config_path
    elif config_path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"load_sd: config_dir {config_path} must be a folder or a .yaml file")

    # 2. Read the checkpoint once, check it is the original layout.
    try:
        checkpoint = load_file(str(file))
    except Exception as exc:
        raise ValueError(f"load_sd: {file} could not be read as safetensors ({type(exc).__name__}: {exc})") from exc
    for prefix, part in ((_LDM_UNET, "UNet"), (_LDM_VAE, "VAE"), (_LDM_TEXT + "text_model.", "CLIP text encoder")):
        if not any(k.startswith(prefix) for k in checkpoint):
            raise ValueError(
                f"load_sd: {file} has no {part} weights ({prefix}*); expected {_SINGLE_FILE} holding UNet, VAE "
                "and text encoder (for a diffusers folder pass the folder)"
            )

    # 3. UNet and VAE: configs and key conversion by diffusers' own single-file functions (what
    #    `from_single_file` runs), then a strict load. `from_single_file` itself leaves tensors that the
    #    file lacks on the meta device and fails later with "Cannot copy out of meta tensor"; the strict
    #    load names them instead.
    if local is None:
        original = fetch_original_config(str(config_path), local_files_only=True)
        unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
        vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint)
    else:
        unet_config = UNet2DConditionModel.load_config(str(local), subfolder="unet", local_files_only=True)
        vae_config = AutoencoderKL.load_config(str(local), subfolder="vae", local_files_only=True)
    unet = _strict_from_ldm(UNet2DConditionModel, unet_config, convert_ldm_unet_checkpoint, checkpoint, dtype,
                            f"the UNet weights in {file}", config_path)
    vae = _strict_from_ldm(AutoencoderKL, vae_config, convert_ldm_vae_checkpoint, checkpoint, dtype,
                           f"the VAE weights in {file}", config_path)

    # 4. Text encoder (CLIP keys are transformers' own under a prefix), tokenizer, scheduler.
    text_encoder = _text_encoder_from_checkpoint(checkpoint, local, dtype, file)
    tokenizer = _tokenizer_for(local / "tokenizer" if local else None, text_encoder)
    scheduler = _scheduler_for(local / "scheduler" if local else None)
    for module in (unet, vae, text_encoder):
        _freeze(module.to(device))
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        config=_components_config(unet, vae, text_encoder, scheduler),
        source=str(file),
    )


def _strict_load(
    model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, what: str, config_path: Path
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                problems.append(f"{len(items)} {label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
        raise ValueError(
            f"load_sd: {what} do not fit the architecture from {config_path} ({'; '.join(problems)}); "
            "is config_dir the right architecture for this checkpoint?"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)


def _strict_from_ldm(
    cls: Any,
    config: Mapping[str, Any],
    convert: Any,
    checkpoint: dict[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
    config_path: Path,
) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta: no random init of 860M weights
        model = cls.from_config(config)
    state = convert(checkpoint, config=dict(model.config))
    _strict_load(model, state, dtype, what, config_path)
    return model


def _text_encoder_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], local: Path | None, dtype: torch.dtype, file: Path
) -> CLIPTextModel:
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    if local is not None and (local / "text_encoder" / "config.json").is_file():
        config_file = local / "text_encoder" / "config.json"
    else:
        config_file = _asset(TEXT_ENCODER_CONFIG_FILE, "the SD1.5 text encoder config")
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (position_ids) real
        model = CLIPTextModel(CLIPTextConfig.from_json_file(str(config_file)))
    state = convert_ldm_clip_checkpoint(checkpoint)  # strips "cond_stage_model.transformer."
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5.6: flat model
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # old files keep a buffer copy
    _strict_load(model, state, dtype, f"the text encoder weights in {file}", config_file)
    return model


# --------------------------------------------------------------------------------------------------
# Feature taps
# --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a tap hook to end the UNet forward once every requested feature exists."""


class UNetFeatureTap:
    """Capture the outputs of chosen ``unet.up_blocks[i]`` with forward hooks (diffusers' forward untouched).

    DragDiffusion supervises and tracks points on ``up_blocks[2]``: ``[N, 640, 64, 64]`` for 512 px input
    (``[N, C_i, h_i, w_i]`` in general). Features keep their autograd graph, so a loss on them
    backpropagates into the latent.

    Usage::

        with UNetFeatureTap(unet, [2]) as tap:
            eps = unet(z, t, encoder_hidden_states=emb).sample
        feat = tap.features[2]                       # [N, 640, 64, 64]

        with UNetFeatureTap(unet, [2], stop_after=True) as tap:
            tap.run(z, t, encoder_hidden_states=emb)  # returns None: up_blocks[3] and conv_out never run

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (anything with an ``up_blocks`` ModuleList).
        indices: which up blocks to capture (0 = lowest resolution).
        stop_after: end the forward as soon as the last requested block has run (a truncated forward: for
            DragDiffusion's point tracking alone this skips up_blocks[3], the UNet's most expensive level,
            and conv_out). Only :meth:`run` catches the stop; a direct ``unet(...)`` call would see it raise.
    """

    def __init__(self, unet: nn.Module, indices: Iterable[int] = (2,), *, stop_after: bool = False) -> None:
        blocks = getattr(unet, "up_blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"UNetFeatureTap needs a UNet with an up_blocks ModuleList, got {type(unet).__name__}")
        self.indices = sorted(set(int(i) for i in indices))
        if not self.indices:
            raise ValueError("UNetFeatureTap: indices is empty; give at least one up block index")
        bad = [i for i in self.indices if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"UNetFeatureTap: up block indices {bad} out of range 0..{len(blocks) - 1}")
        self.unet = unet
        self.stop_after = stop_after
        self.features: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """True while the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> UNetFeatureTap:
        """Install the hooks (idempotent); returns ``self``."""
        if not self._handles:
            for i in self.indices:
                self._handles.append(self.unet.up_blocks[i].register_forward_hook(self._hook(i)))
        return self

    def remove(self) -> None:
        """Remove the hooks; captured features stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> UNetFeatureTap:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _hook(self, index: int):
        last = self.indices[-1]

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self.features[index] = output  # [N, C_i, h_i, w_i], graph kept
            if self.stop_after and index == last:
                raise _StopForward

        return hook

    def run(self, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """Call the UNet (attaching the hooks for the call if needed) and return its ``.sample``
        (``[N, 4, h, w]``), or ``None`` when ``stop_after`` cut the forward short. Features land in
        :attr:`features` either way."""
        self.features.clear()
        was_attached = self.attached
        self.attach()
        try:
            out = self.unet(*args, **kwargs)
        except _StopForward:
            return None
        finally:
            if not was_attached:
                self.remove()
        return out.sample if hasattr(out, "sample") else out[0]
