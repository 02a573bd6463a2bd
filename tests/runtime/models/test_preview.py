"""Cheap latent previews: the latent2rgb table, our TAESD against the real weights, preview encoding.

The TAESD tests read the real weights from ../shared/assets (or $DRAGRT_ASSETS) and skip with the reason
when they are absent. The photo is scikit-image's astronaut (512x512, public domain).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dragrt.runtime.models import preview as pv
from dragrt.runtime.models.sd import assets_dir

ASSETS = assets_dir()
HAS_TAESD = ASSETS is not None and all((ASSETS / f).is_file() for f in (pv.TAESD_ENCODER_FILE, pv.TAESD_DECODER_FILE))
needs_taesd = pytest.mark.skipif(
    not HAS_TAESD, reason="TAESD weights (taesd_encoder/decoder.safetensors in ../shared/assets) are absent"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return 10.0 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """scikit-image's astronaut as ``[1, 3, 512, 512]`` float32 in [0, 1]."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test photo")
    image = Image.fromarray(skimage_data.astronaut()).convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def taesd() -> tuple[torch.nn.Module, torch.nn.Module]:
    if not HAS_TAESD:
        pytest.skip("TAESD weights are absent")
    return pv.load_taesd()


@pytest.fixture(scope="module")
def photo_round_trip(photo: torch.Tensor, taesd) -> tuple[torch.Tensor, torch.Tensor]:
    encoder, decoder = taesd
    with torch.no_grad():
        latents = pv.taesd_encode(photo, encoder)  # [1, 4, 64, 64]
        decoded = pv.taesd_decode(latents, decoder)  # [1, 3, 512, 512]
    return latents, decoded


# ---------------------------------------------------------------------------------------------- latent2rgb


def test_latent_to_rgb_shape_range_and_values() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 7, 5, generator=g) * 3  # odd sizes, values beyond the clamp
    rgb = pv.latent_to_rgb(latents)
    assert rgb.shape == (2, 3, 7, 5) and rgb.dtype == torch.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    pixel = latents[1, :, 3, 2]  # one pixel by hand: (sum_c z_c * F[c, rgb] + 1) / 2, clamped
    expected = ((pixel @ torch.tensor(pv.LATENT_RGB_SD15) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(rgb[1, :, 3, 2], expected)
    assert torch.equal(pv.latent_to_rgb(torch.zeros(1, 4, 3, 3)), torch.full((1, 3, 3, 3), 0.5))
    up = pv.latent_to_rgb(latents.half(), upscale=8)
    assert up.shape == (2, 3, 56, 40)
    torch.testing.assert_close(up[:, :, ::8, ::8], rgb, atol=2e-3, rtol=0)  # half input, float32 math
    with pytest.raises(ValueError, match=r"\[N, 4, h, w\]"):
        pv.latent_to_rgb(torch.zeros(1, 3, 4, 4))


@needs_taesd
def test_latent_to_rgb_table_orientation_on_a_real_photo(photo, photo_round_trip) -> None:
    """Rows are latent channels, columns R, G, B: the preview of real latents looks like the photo."""
    latents, _ = photo_round_trip
    small = F.interpolate(photo, size=latents.shape[-2:], mode="area")  # [1, 3, 64, 64]
    preview = pv.latent_to_rgb(latents)
    for channel in range(3):  # each colour channel on its own, so a swapped column would fail
        corr = np.corrcoef(preview[0, channel].flatten(), small[0, channel].flatten())[0, 1]
        assert corr > 0.85, f"channel {channel}: correlation {corr:.3f}"
    reversed_rows = pv.latent_to_rgb(latents, factors=pv.LATENT_RGB_SD15[::-1])
    assert np.corrcoef(reversed_rows.flatten(), small.flatten())[0, 1] < 0.0
    assert _psnr(preview, small) > 15.0  # measured 17.8 dB: a rough preview, as intended


# ---------------------------------------------------------------------------------------------- TAESD


@needs_taesd
def test_taesd_loads_real_weights_strictly(taesd) -> None:
    from safetensors import safe_open

    encoder, decoder = taesd
    for module, file in ((encoder, pv.TAESD_ENCODER_FILE), (decoder, pv.TAESD_DECODER_FILE)):
        with safe_open(str(ASSETS / file), "pt") as f:
            file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert ours == file_shapes
        assert len(ours) == 67
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert isinstance(decoder[0], pv.TAESDClamp)
    # Loading is strict: a stray key is refused.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        pv.build_taesd_decoder().load_state_dict({**decoder.state_dict(), "99.weight": torch.zeros(1)})


@needs_taesd
def test_taesd_round_trip_of_a_real_photo(photo, photo_round_trip) -> None:
    latents, decoded = photo_round_trip
    assert latents.shape == (1, 4, 64, 64)
    assert 0.5 < latents.std().item() < 1.5  # scaled SD latents have roughly unit spread
    assert decoded.shape == photo.shape and decoded.min() >= 0 and decoded.max() <= 1
    psnr = _psnr(decoded, photo)
    assert psnr >= 25.0, f"TAESD round trip PSNR {psnr:.2f} dB"  # measured 25.35 dB


@needs_taesd
def test_autoencoder_tiny_matches_our_taesd(photo, photo_round_trip, taesd) -> None:
    encoder, decoder = taesd
    latents, _ = photo_round_trip
    model = pv.load_taesd_as_autoencoder_tiny()
    crop = photo[:, :, 128:256, 200:328]  # a 128 px crop keeps this cheap
    z_crop = latents[:, :, 16:32, 25:41]
    with torch.no_grad():
        ours_z = encoder(crop)
        ours_img = decoder(z_crop)
        theirs_z = model.encode(crop * 2 - 1).latents  # AutoencoderTiny takes images in [-1, 1]
        theirs_img = model.decode(z_crop).sample  # and returns [-1, 1]
    torch.testing.assert_close(theirs_z, ours_z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs_img, ours_img * 2 - 1, atol=1e-4, rtol=1e-4)


def test_taesd_missing_weights_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"taesd_encoder\.safetensors"):
        pv.load_taesd(tmp_path)


# ---------------------------------------------------------------------------------------------- preview decoder


def test_preview_decoder_latent2rgb_caps_the_size() -> None:
    decoder = pv.PreviewDecoder("latent2rgb", preview_size=200)
    latents = torch.randn(2, 4, 64, 48)  # a 512x384 image
    images = decoder.decode(latents)
    assert images.shape == (2, 3, 200, 150)
    assert images.min() >= 0 and images.max() <= 1
    full = pv.PreviewDecoder("latent2rgb", preview_size=1024).decode(latents)
    assert full.shape == (2, 3, 512, 384)  # never larger than the image itself
    with pytest.raises(ValueError, match="method="):
        pv.PreviewDecoder("vae")
    with pytest.raises(ValueError, match="preview_size"):
        pv.PreviewDecoder("latent2rgb", preview_size=0)


def test_preview_decoder_taesd_without_weights(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        pv.PreviewDecoder("taesd", taesd_dir=tmp_path)
    assert pv.PreviewDecoder("auto", taesd_dir=tmp_path).method == "latent2rgb"


@needs_taesd
def test_preview_decoder_taesd(photo_round_trip) -> None:
    latents, decoded = photo_round_trip
    decoder = pv.PreviewDecoder("auto", preview_size=128)
    assert decoder.method == "taesd"
    crop = latents[:, :, 8:24, 16:48]  # [1, 4, 16, 32]: a 128x256 image
    small = decoder.decode(crop)
    assert small.shape == (1, 3, 64, 128)  # capped at 128 on the longer side
    full = F.interpolate(decoded[:, :, 64:192, 128:384], size=(64, 128), mode="bilinear", antialias=True)
    assert _psnr(small, full) > 30.0  # same decoder, same shrink
    data = decoder.encode(crop[:, :, :, :16], "jpeg")
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (128, 128)


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_preview_jpeg_is_decodable_and_capped() -> None:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 300, 700, generator=g)
    data = pv.encode_preview(image, "jpeg", max_size=512)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.format == "JPEG" and im.mode == "RGB"
        assert max(im.size) <= 512 and im.size == (512, 219)  # aspect kept
    small = pv.encode_preview(image[None, :, :30, :40], "JPG", max_size=512)
    with Image.open(io.BytesIO(small)) as im:
        assert im.size == (40, 30)  # never enlarged


def test_encode_preview_png_is_lossless() -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    data = pv.encode_preview(array, "png", max_size=64)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        assert np.array_equal(np.array(im), array)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    assert pv.encode_preview(tensor, "PNG") == data  # rounding, not truncation


def test_encode_preview_rejects_bad_arguments() -> None:
    image = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match="format="):
        pv.encode_preview(image, "webp")
    with pytest.raises(ValueError, match="max_size"):
        pv.encode_preview(image, max_size=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        pv.encode_preview(torch.zeros(4, 8, 8))
