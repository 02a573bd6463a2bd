"""Cheap previews of SD1.x latents: a 4x3 linear map ("latent2rgb") or TAESD, plus JPEG/PNG encoding.

Both decoders take **scaled** latents, i.e. what the UNet sees (VAE latents x 0.18215), ``[N, 4, h, w]``,
and return images ``[N, 3, H, W]`` in [0, 1]:

- ``latent2rgb``: one 4x3 matrix multiply per pixel (ComfyUI's default preview, "Approx cheap" in A1111):
  h x w output (upscaled on request), colours only roughly right, costs nothing.
- ``taesd``: Ollin Boer Bohan's Tiny AutoEncoder for SD (MIT), 8h x 8w output close to the real VAE
  (about 25-28 dB on photos), about 1% of the SD VAE decoder's work. Our own module definitions, laid out
  so the published weights (``taesd_encoder.safetensors`` / ``taesd_decoder.safetensors``) load with
  ``strict=True``.

:class:`PreviewDecoder` picks one and caps the preview size; :func:`encode_preview` makes the bytes a
server sends (ComfyUI's binary preview frames carry JPEG or PNG).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dragrt.runtime.models.sd import assets_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderTiny
    from PIL import Image

# --------------------------------------------------------------------------------------------------
# latent2rgb
# --------------------------------------------------------------------------------------------------

#: Latent -> RGB factors for SD1.x, rows = latent channels 0..3, columns = R, G, B. The values ComfyUI ships
#: for its SD15 latent format (comfyanonymous/ComfyUI ``comfy/latent_formats.py``, class ``SD15``,
#: ``latent_rgb_factors``; used by ``latent_preview.py``'s ``Latent2RGBPreviewer``, which applies them to the
#: sampler's x0, i.e. scaled latents, and maps the result from [-1, 1] to [0, 1]).
LATENT_RGB_SD15: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
#: ComfyUI defines no bias for SD1.x (its SDXL and later formats have one); kept as data for symmetry.
LATENT_RGB_SD15_BIAS: tuple[float, float, float] = (0.0, 0.0, 0.0)


def latent_to_rgb(
    latents: torch.Tensor,
    *,
    factors: tuple[tuple[float, ...], ...] = LATENT_RGB_SD15,
    bias: tuple[float, ...] = LATENT_RGB_SD15_BIAS,
    upscale: int = 1,
) -> torch.Tensor:
    """Approximate RGB of scaled SD latents by a per-pixel linear map.

    Args:
        latents: ``[N, C, h, w]`` scaled latents (C = ``len(factors)``, 4 for SD1.x), any float dtype/device.
        factors: ``C`` rows of (R, G, B) weights.
        bias: (R, G, B) added before the [-1, 1] -> [0, 1] mapping.
        upscale: integer nearest-neighbour upscale (8 gives the image's size).

    Returns:
        ``[N, 3, h * upscale, w * upscale]`` float32 in [0, 1].
    """
    if latents.ndim != 4 or latents.shape[1] != len(factors):
        raise ValueError(f"latents must be [N, {len(factors)}, h, w], got {tuple(latents.shape)}")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)  # [C, 3]
    offset = torch.tensor(bias, dtype=torch.float32, device=latents.device).view(1, 3, 1, 1)
    rgb = torch.einsum("nchw,cr->nrhw", latents.float(), weight) + offset  # [N, 3, h, w] in ~[-1, 1]
    image = ((rgb + 1.0) * 0.5).clamp_(0.0, 1.0)
    if upscale > 1:
        image = F.interpolate(image, scale_factor=upscale, mode="nearest")
    return image


# --------------------------------------------------------------------------------------------------
# TAESD
# --------------------------------------------------------------------------------------------------

TAESD_ENCODER_FILE = "taesd_encoder.safetensors"
TAESD_DECODER_FILE = "taesd_decoder.safetensors"
TAESD_WIDTH = 64  # channels of every hidden layer


def _conv3x3(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, padding=1, **kwargs)


class TAESDClamp(nn.Module):
    """Soft clamp of the decoder input to (-3, 3): ``3 * tanh(x / 3)`` (identity near 0, no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3.0) * 3.0


class TAESDBlock(nn.Module):
    """Residual unit: three 3x3 convolutions (ReLU between) plus a skip, then ReLU.

    Parameter names (``conv.0``, ``conv.2``, ``conv.4``, ``skip``) match the published weights.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(n_in, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, kernel_size=1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def build_taesd_encoder(latent_channels: int = 4) -> nn.Sequential:
    """TAESD encoder, image ``[N, 3, H, W]`` in [0, 1] -> scaled latents ``[N, 4, H/8, W/8]``.

    15 stages: an input conv and one block at full resolution, then three times (stride-2 conv without
    bias, three blocks), then a conv to the latent channels. Indices are the weight-file key prefixes.
    """
    w = TAESD_WIDTH
    layers: list[nn.Module] = [_conv3x3(3, w), TAESDBlock(w, w)]
    for _ in range(3):
        layers += [_conv3x3(w, w, stride=2, bias=False), TAESDBlock(w, w), TAESDBlock(w, w), TAESDBlock(w, w)]
    layers.append(_conv3x3(w, latent_channels))
    return nn.Sequential(*layers)


def build_taesd_decoder(latent_channels: int = 4) -> nn.Sequential:
    """TAESD decoder, scaled latents ``[N, 4, h, w]`` -> image ``[N, 3, 8h, 8w]`` (about [0, 1], unclamped).

    20 stages: soft clamp, conv + ReLU, then three times (three blocks, 2x nearest upsample, conv without
    bias), one more block and a conv to RGB. Indices are the weight-file key prefixes.
    """
    w = TAESD_WIDTH
    layers: list[nn.Module] = [TAESDClamp(), _conv3x3(latent_channels, w), nn.ReLU()]
    for _ in range(3):
        layers += [TAESDBlock(w, w), TAESDBlock(w, w), TAESDBlock(w, w)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv3x3(w, w, bias=False)]
    layers += [TAESDBlock(w, w), _conv3x3(w, 3)]
    return nn.Sequential(*layers)


def _taesd_files(dir: str | os.PathLike | None) -> tuple[Path, Path]:
    if dir is None:
        root = assets_dir()
        if root is None:
            raise FileNotFoundError(
                f"TAESD weights: no folder given and no assets folder found; set DRAGRT_ASSETS or pass the folder "
                f"holding {TAESD_ENCODER_FILE} and {TAESD_DECODER_FILE}"
            )
    else:
        root = Path(dir).expanduser()
    files = (root / TAESD_ENCODER_FILE, root / TAESD_DECODER_FILE)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"TAESD weights: {', '.join(missing)} not found (expected both files in {root})")
    return files


def _read_float32(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(file)).items()}  # stored bf16


def load_taesd(
    dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Sequential, nn.Sequential]:
    """The real TAESD (SD1.x) encoder and decoder, loaded with ``strict=True``, frozen, in eval mode.

    Args:
        dir: folder holding ``taesd_encoder.safetensors`` and ``taesd_decoder.safetensors``; default: the
            assets folder (:func:`dragrt.runtime.models.sd.assets_dir`).
        device, dtype: where and in what precision the modules run (weights are stored bf16, read as fp32).

    Raises:
        FileNotFoundError: a weight file is missing (the message names it).
    """
    enc_file, dec_file = _taesd_files(dir)
    encoder, decoder = build_taesd_encoder(), build_taesd_decoder()
    encoder.load_state_dict(_read_float32(enc_file), strict=True)
    decoder.load_state_dict(_read_float32(dec_file), strict=True)
    for module in (encoder, decoder):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return encoder, decoder


@functools.lru_cache(maxsize=4)
def _default_taesd(device: str, dtype: torch.dtype) -> tuple[nn.Sequential, nn.Sequential]:
    return load_taesd(None, device=device, dtype=dtype)


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def taesd_encode(images: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] (H, W multiples of 8) -> scaled SD latents ``[N, 4, H/8, W/8]``.

    ``encoder`` defaults to the asset weights on ``images.device`` (loaded once, cached). Returns float32.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
        raise ValueError(f"images must be [N, 3, H, W] with H, W multiples of 8, got {tuple(images.shape)}")
    if encoder is None:
        encoder = _default_taesd(str(images.device), torch.float32)[0]
    return encoder(images.to(_param_dtype(encoder))).float()


def taesd_decode(latents: torch.Tensor, decoder: nn.Module | None = None) -> torch.Tensor:
    """Scaled SD latents ``[N, 4, h, w]`` (VAE latents x 0.18215) -> images ``[N, 3, 8h, 8w]`` in [0, 1].

    ``decoder`` defaults to the asset weights on ``latents.device`` (loaded once, cached). Returns float32.
    """
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"latents must be [N, 4, h, w], got {tuple(latents.shape)}")
    if decoder is None:
        decoder = _default_taesd(str(latents.device), torch.float32)[1]
    return decoder(latents.to(_param_dtype(decoder))).float().clamp_(0.0, 1.0)


def load_taesd_as_autoencoder_tiny(
    dir: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderTiny:
    """The same TAESD weights in diffusers' ``AutoencoderTiny`` (default config = TAESD for SD1.x).

    The key mapping is clean: the encoder's ``layers`` Sequential has the published indices
    (``encoder.layers.<i>``); the decoder's soft clamp is inside ``DecoderTiny.forward`` instead of a layer,
    so published decoder index ``i`` becomes ``decoder.layers.<i - 1>``. Loaded with ``strict=True``.
    Conventions differ from :func:`taesd_decode`: ``AutoencoderTiny`` takes and returns images in [-1, 1]
    (``decode(z).sample`` = 2 x our output - 1, unclamped) and has ``scaling_factor`` 1.0, so it also takes
    the scaled SD latents.
    """
    from diffusers import AutoencoderTiny

    enc_file, dec_file = _taesd_files(dir)
    state: dict[str, torch.Tensor] = {}
    for key, value in _read_float32(enc_file).items():
        state[f"encoder.layers.{key}"] = value
    for key, value in _read_float32(dec_file).items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    model = AutoencoderTiny()
    model.load_state_dict(state, strict=True)
    return nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Preview decoder and encoding
# --------------------------------------------------------------------------------------------------

PREVIEW_METHODS = ("auto", "latent2rgb", "taesd")
PREVIEW_FORMATS = ("jpeg", "png")


def _capped_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class PreviewDecoder:
    """Turn scaled SD latents into small preview images, cheaply.

    Args:
        method: ``"latent2rgb"`` (free, rough colours), ``"taesd"`` (close to the real VAE; about 2 x 50
            GFLOP at 512 px, milliseconds on a GPU, roughly a second on 2 CPU cores; fails when its
            weights are missing) or ``"auto"`` (TAESD when its weights are found, else latent2rgb).
        preview_size: cap on the longer side of the preview in pixels (ComfyUI's ``--preview-size``,
            default 512). Previews are made at the image's size (8x the latent) and shrunk (antialiased)
            to fit; smaller previews save encoding time and bandwidth, not decoding time.
        taesd_dir: folder of the TAESD weights (default: the assets folder).
        device: where TAESD runs (default the CPU); latents are moved there, previews come back on the CPU.

    Calls never build autograd graphs and never modify their input.
    """

    def __init__(
        self,
        method: str = "auto",
        *,
        preview_size: int = 512,
        taesd_dir: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if method not in PREVIEW_METHODS:
            raise ValueError(f"method={method!r} is not allowed; choose one of: {', '.join(PREVIEW_METHODS)}")
        if not isinstance(preview_size, int) or preview_size < 8:
            raise ValueError(f"preview_size must be an int >= 8 (pixels), got {preview_size!r}")
        self.preview_size = preview_size
        self.device = torch.device(device)
        self._decoder: nn.Module | None = None
        if method in ("auto", "taesd"):
            try:
                _, self._decoder = load_taesd(taesd_dir, device=self.device)
            except FileNotFoundError:
                if method == "taesd":
                    raise
        self.method = "taesd" if self._decoder is not None else "latent2rgb"

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[N, 4, h, w]`` -> previews ``[N, 3, H, W]`` float32 in [0, 1] on the CPU, where
        ``max(H, W) <= preview_size`` and H:W = h:w (H = 8h when that fits)."""
        if latents.ndim != 4 or latents.shape[1] != 4:
            raise ValueError(f"latents must be [N, 4, h, w], got {tuple(latents.shape)}")
        latents = latents.detach()
        target = _capped_size(8 * latents.shape[2], 8 * latents.shape[3], self.preview_size)
        if self._decoder is not None:
            image = taesd_decode(latents.to(self.device), self._decoder)  # [N, 3, 8h, 8w]
        else:
            image = latent_to_rgb(latents)  # [N, 3, h, w]
        if tuple(image.shape[-2:]) != target:
            shrinking = image.shape[-1] > target[1]
            image = F.interpolate(image, size=target, mode="bilinear", align_corners=False, antialias=shrinking)
        return image.clamp_(0.0, 1.0).cpu()

    def encode(self, latents: torch.Tensor, format: str = "jpeg", *, index: int = 0, quality: int = 85) -> bytes:
        """The preview of ``latents[index]`` as JPEG or PNG bytes (see :func:`encode_preview`)."""
        image = self.decode(latents[index : index + 1])[0]
        return encode_preview(image, format, max_size=self.preview_size, quality=quality)


def _to_pil(img: torch.Tensor | np.ndarray | Image.Image) -> Image.Image:
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W] (or [1, 3, H, W]) in [0, 1], got {tuple(img.shape)}")
        # Round, don't truncate: truncation darkens every pixel by half a level on average.
        array = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)
    array = np.asarray(img)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be [H, W, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array)


def encode_preview(
    img: torch.Tensor | np.ndarray | Image.Image,
    format: str = "jpeg",
    max_size: int = 512,
    *,
    quality: int = 85,
) -> bytes:
    """Encode a preview image as JPEG or PNG bytes, shrunk so its longer side is at most ``max_size``.

    Args:
        img: ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in [0, 1], an ``[H, W, 3]`` array (uint8, or float in
            [0, 1]), or a PIL image.
        format: ``"jpeg"`` (or ``"jpg"``) or ``"png"``, any case.
        max_size: cap on the longer side in pixels (>= 1); aspect ratio is kept, small images are not enlarged.
        quality: JPEG quality 1..95 (ignored for PNG).
    """
    from PIL import Image

    fmt = format.lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in PREVIEW_FORMATS:
        raise ValueError(f"format={format!r} is not allowed; choose one of: jpeg, jpg, png")
    if not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an int >= 1 (pixels), got {max_size!r}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in 1..95, got {quality}")
    pil = _to_pil(img)
    if max(pil.size) > max_size:
        width, height = pil.size
        new_h, new_w = _capped_size(height, width, max_size)
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG", compress_level=1)  # previews are transient: speed over size
    return buffer.getvalue()
