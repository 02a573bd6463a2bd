"""SD1.5 configs, random builds, offline loading (diffusers folder and original single file), feature taps.

Tiny models on the CPU; full-size SD1.5 only on the meta device (shapes, no weights). Real assets
(tokenizer, text encoder config, original yaml) are read from ../shared/assets and the tests that need
them skip with the reason when that folder is absent.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from dragrt.runtime.models import sd

ASSETS = sd.assets_dir()
needs_assets = pytest.mark.skipif(
    ASSETS is None, reason="real assets folder (../shared/assets or $DRAGRT_ASSETS) is absent: tokenizer/configs"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE=1 is set too, by conftest)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny() -> sd.SDComponents:
    if ASSETS is None:
        pytest.skip("real assets folder is absent: the tiny build uses the real tokenizer")
    return sd.build_random_sd15(tiny=True, seed=0)


@pytest.fixture(scope="module")
def tiny_folder(tiny: sd.SDComponents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sd.save_sd_folder(tiny, tmp_path_factory.mktemp("sd") / "tiny-diffusers")


def _assert_same_output(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical weights give the same function, but not always the same bits: CPU GEMM kernels pick their
    vector paths by the weights' memory alignment, and safetensors maps a file's tensors at any offset (seen:
    1.5e-6 apart, 0 once the loaded weights are copied to fresh memory). Float32 rounding apart, equal."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _inputs(components: sd.SDComponents, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = components.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=g)  # [N, 4, h, w]
    ids = components.tokenizer(
        ["a photo of an astronaut"], padding="max_length", max_length=components.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids  # [N, 77]
    with torch.no_grad():
        emb = components.text_encoder(ids)[0]  # [N, 77, D]
    return latents, emb


def _assert_same_weights(a: sd.SDComponents, b: sd.SDComponents) -> None:
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), f"{name}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}"
        different = [k for k in sa if not torch.equal(sa[k], sb[k].to(sa[k].dtype))]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------------------------------------- configs


@needs_assets
def test_sd15_configs_equal_what_diffusers_derives_from_the_original_yaml() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
        fetch_original_config,
    )

    original = fetch_original_config(str(ASSETS / sd.ORIGINAL_CONFIG_FILE), local_files_only=True)
    from_yaml = {
        "unet": create_unet_diffusers_config_from_ldm(original, {}),
        "vae": create_vae_diffusers_config_from_ldm(original, {}),
    }
    ours = {"unet": sd.SD15_UNET_CONFIG, "vae": sd.SD15_VAE_CONFIG}
    for name, derived in from_yaml.items():
        for key, value in derived.items():
            if key in ours[name]:
                assert ours[name][key] == value, f"{name}.{key}: ours {ours[name][key]!r}, yaml {value!r}"
    with torch.device("meta"):
        for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
            a = cls.from_config(ours[name]).state_dict()
            b = cls.from_config(from_yaml[name]).state_dict()
            assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}, name
    assert sum(v.numel() for v in a.values()) == 83_653_863  # the SD1.x VAE
    assert original["model"]["params"]["scale_factor"] == sd.SD15_VAE_CONFIG["scaling_factor"]


def test_ddim_scheduler_matches_dragdiffusion() -> None:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(50)
    # spec ref_dragdiffusion.md §1: inversion strength 0.7 of 50 steps -> t = timesteps[15] = 681
    assert scheduler.timesteps[0].item() == 981 and scheduler.timesteps[15].item() == 681
    assert scheduler.timesteps[-1].item() == 1
    assert scheduler.betas[0].item() == pytest.approx(0.00085)
    assert scheduler.betas[-1].item() == pytest.approx(0.012)
    assert scheduler.final_alpha_cumprod.item() == pytest.approx(scheduler.alphas_cumprod[0].item())


def test_full_size_unet_on_meta_has_sd15_shapes() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd.SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    # Feature shapes at 512 px (latent 64x64): what DragDiffusion's code lists for up_blocks[0..3].
    latents = torch.empty(1, 4, 64, 64, device="meta")  # [N, 4, h, w]
    emb = torch.empty(1, 77, 768, device="meta")  # [N, tokens, D]
    with sd.UNetFeatureTap(unet, [0, 1, 2, 3]) as tap:
        out = unet(latents, 681, encoder_hidden_states=emb).sample
    assert out.shape == (1, 4, 64, 64)
    shapes = {i: tuple(f.shape) for i, f in tap.features.items()}
    assert shapes == {0: (1, 1280, 16, 16), 1: (1, 1280, 32, 32), 2: (1, 640, 64, 64), 3: (1, 320, 64, 64)}
    with sd.UNetFeatureTap(unet, [2], stop_after=True) as tap:
        assert tap.run(latents, 681, encoder_hidden_states=emb) is None
    assert tuple(tap.features[2].shape) == (1, 640, 64, 64)


# ---------------------------------------------------------------------------------------------- assets


def test_assets_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DRAGRT_ASSETS", str(tmp_path))
    assert sd.assets_dir() == tmp_path
    monkeypatch.setenv("DRAGRT_ASSETS", str(tmp_path / "missing"))
    assert sd.assets_dir() is None
    with pytest.raises(FileNotFoundError, match="DRAGRT_ASSETS"):
        sd.load_sd15_tokenizer()


@needs_assets
def test_real_tokenizer_loads_offline(no_network: None) -> None:
    tokenizer = sd.load_sd15_tokenizer()
    assert tokenizer.model_max_length == 77  # the stored config says 8192
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == 77


# ---------------------------------------------------------------------------------------------- building


def test_tiny_components_build(tiny: sd.SDComponents) -> None:
    for name, module in tiny.modules().items():
        assert not module.training, name
        assert not any(p.requires_grad for p in module.parameters()), name
    assert tiny.unet.config.down_block_types == sd.SD15_UNET_CONFIG["down_block_types"]
    assert tiny.unet.config.up_block_types == sd.SD15_UNET_CONFIG["up_block_types"]
    assert tiny.config["unet"]["block_out_channels"] == [32, 64, 96, 128]
    assert tiny.config["scheduler"]["steps_offset"] == 1
    latents, emb = _inputs(tiny)
    assert emb.shape == (1, 77, 32)
    with torch.no_grad():
        eps = tiny.unet(latents, 681, encoder_hidden_states=emb).sample
        image = tiny.vae.decode(latents / tiny.vae.config.scaling_factor).sample
    assert eps.shape == (1, 4, 16, 16) and torch.isfinite(eps).all()
    assert image.shape == (1, 3, 128, 128)


@needs_assets
def test_random_build_is_deterministic_per_seed_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sd.build_random_sd15(tiny=True, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = sd.build_random_sd15(tiny=True, seed=5)
    c = sd.build_random_sd15(tiny=True, seed=6, dtype=torch.bfloat16)
    _assert_same_weights(a, b)
    w_a, w_c = a.unet.conv_in.weight, c.unet.conv_in.weight
    assert w_c.dtype == torch.bfloat16 and not torch.equal(w_a, w_c.float())


# ---------------------------------------------------------------------------------------------- loading


def test_folder_round_trip_gives_identical_weights_and_output(
    tiny: sd.SDComponents, tiny_folder: Path, no_network: None
) -> None:
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for file in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json"):
        assert (tiny_folder / file).is_file(), file

    loaded = sd.load_sd(tiny_folder, torch_dtype=torch.float32, device="cpu")
    _assert_same_weights(tiny, loaded)
    assert loaded.source == str(tiny_folder)
    assert loaded.tokenizer.model_max_length == 77
    latents, emb = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.unet(latents, 681, encoder_hidden_states=emb).sample
        out = loaded.unet(latents, 681, encoder_hidden_states=_inputs(loaded)[1]).sample
    _assert_same_output(out, ref)


def test_folder_loads_in_half_precision(tiny_folder: Path) -> None:
    loaded = sd.load_sd(tiny_folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for m in loaded.modules().values() for p in m.parameters()} == {torch.bfloat16}


def test_single_file_in_original_layout_round_trip(
    tiny: sd.SDComponents, tiny_folder: Path, tmp_path: Path, no_network: None
) -> None:
    file = sd.save_sd_single_file(tiny, tmp_path / "tiny-original.safetensors")
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[-2:] == [1, 1]
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks.", "vae.")) for k in keys)

    loaded = sd.load_sd(file, config_dir=tiny_folder)
    _assert_same_weights(tiny, loaded)
    latents, emb = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.unet(latents, 681, encoder_hidden_states=emb).sample
        out = loaded.unet(latents, 681, encoder_hidden_states=emb).sample
    _assert_same_output(out, ref)


def test_original_layout_matches_diffusers_converters_at_full_size() -> None:
    """Our writer is the exact inverse of diffusers' single-file converters, checked on SD1.5 itself (meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        components = sd.SDComponents(
            unet=UNet2DConditionModel.from_config(sd.SD15_UNET_CONFIG),
            vae=AutoencoderKL.from_config(sd.SD15_VAE_CONFIG),
            text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                      num_attention_heads=12, num_hidden_layers=12)),
            tokenizer=None,
            scheduler=None,
        )
    original = sd.to_original_sd_state_dict(components)
    # A real SD1.5 checkpoint has 686 UNet, 248 VAE and 196 text tensors (+ an old position_ids buffer).
    counts = {p: sum(k.startswith(p) for k in original) for p in ("model.", "first_stage_model.", "cond_stage_model.")}
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in original  # diffusers' v1 probe
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original  # upsampler after plain block
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in original  # upsampler after attention
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in original  # LDM counts decoder levels upward
    for converted, module in (
        (convert_ldm_unet_checkpoint(original, sd.SD15_UNET_CONFIG), components.unet),
        (convert_ldm_vae_checkpoint(original, sd.SD15_VAE_CONFIG), components.vae),
    ):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)


@needs_assets
def test_single_file_with_original_yaml_config(tmp_path: Path, no_network: None) -> None:
    """The yaml route (the default for A1111 files): UNet/VAE from an original-style yaml, CLIP from the assets.

    A tiny yaml keeps UNet and VAE small; the text encoder is SD's real architecture (its config is the asset).
    """
    import yaml
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    original = {"model": {"params": {
        "scale_factor": 0.18215,
        "unet_config": {"params": {
            "in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 3, 4],
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 1, "num_heads": 2, "transformer_depth": 1,
            "context_dim": 768, "use_spatial_transformer": True, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2],
            "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
    }}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(original))
    g = torch.Generator().manual_seed(0)
    with init_empty_weights(include_buffers=False):  # 123M parameters: fill with noise, skip the slow init
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(ASSETS / sd.TEXT_ENCODER_CONFIG_FILE)))
    text_encoder.load_state_dict(
        {k: torch.randn(v.shape, generator=g).half() * 0.02 for k, v in text_encoder.state_dict().items()},
        assign=True,
    )
    source = sd.SDComponents(
        unet=UNet2DConditionModel.from_config({**sd.tiny_unet_config(), "cross_attention_dim": 768}),
        vae=AutoencoderKL.from_config(sd.tiny_vae_config()),
        text_encoder=text_encoder,
        tokenizer=None,
        scheduler=None,
    )
    file = sd.save_sd_single_file(source, tmp_path / "a1111-style.safetensors")
    loaded = sd.load_sd(file, config_dir=tmp_path / "tiny.yaml")
    _assert_same_weights(loaded, source)
    assert loaded.tokenizer.model_max_length == 77
    assert loaded.scheduler.config.steps_offset == 1


def test_missing_path_gives_our_error_not_a_hub_error(tmp_path: Path, no_network: None) -> None:
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*diffusers folder"):
        sd.load_sd(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.load_sd("runwayml/stable-diffusion-v1-5")  # a hub id is just a missing local path here


def test_incomplete_folder_names_what_is_missing(tiny_folder: Path, tmp_path: Path, no_network: None) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet weights.*diffusion_pytorch_model\.safetensors"):
        sd.load_sd(broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"vae is missing"):
        sd.load_sd(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not a diffusers model"):
        sd.load_sd(empty)


def test_bad_single_files_give_clear_errors(
    tiny: sd.SDComponents, tiny_folder: Path, tmp_path: Path, no_network: None
) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle we would open")
    with pytest.raises(ValueError, match=r"not a \.safetensors file"):
        sd.load_sd(ckpt)
    # A diffusers UNet file is not a full checkpoint in the original layout.
    with pytest.raises(ValueError, match=r"no UNet weights \(model\.diffusion_model\.\*\)"):
        sd.load_sd(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors", config_dir=tiny_folder)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        sd.load_sd(garbage, config_dir=tiny_folder)
    file = sd.save_sd_single_file(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(FileNotFoundError, match="config_dir .* does not exist"):
        sd.load_sd(file, config_dir=tmp_path / "no-config")
    with pytest.raises(FileNotFoundError, match=r"unet config"):
        sd.load_sd(file, config_dir=tmp_path)  # a folder without unet/config.json


def test_single_file_without_assets_asks_for_a_config(
    tiny: sd.SDComponents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    file = sd.save_sd_single_file(tiny, tmp_path / "tiny.safetensors")
    monkeypatch.setenv("DRAGRT_ASSETS", str(tmp_path / "no-assets"))
    with pytest.raises(FileNotFoundError, match="DRAGRT_ASSETS"):
        sd.load_sd(file)


def test_checkpoint_that_does_not_fit_the_architecture_is_refused(
    tiny: sd.SDComponents, tiny_folder: Path, tmp_path: Path, no_network: None
) -> None:
    from safetensors.torch import load_file, save_file

    file = sd.save_sd_single_file(tiny, tmp_path / "tiny.safetensors")
    # Same widths, one more resnet per level: LDM block numbers shift and shapes stop matching.
    bigger = tmp_path / "bigger"
    sd.save_sd_folder(tiny, bigger)
    cfg = json.loads((bigger / "unet" / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (bigger / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"UNet weights in .*tiny\.safetensors do not fit the architecture"):
        sd.load_sd(file, config_dir=bigger)
    # A tensor missing from the file: diffusers would leave it uninitialised (on meta) without a word.
    state = load_file(str(file))
    del state["model.diffusion_model.out.2.bias"]
    save_file(state, str(tmp_path / "truncated.safetensors"))
    with pytest.raises(ValueError, match=r"UNet weights .* do not fit .*1 missing: conv_out\.bias"):
        sd.load_sd(tmp_path / "truncated.safetensors", config_dir=tiny_folder)


# ---------------------------------------------------------------------------------------------- feature tap


def test_feature_tap_shapes_and_removal(tiny: sd.SDComponents) -> None:
    latents, emb = _inputs(tiny)
    with torch.no_grad():
        plain = tiny.unet(latents, 681, encoder_hidden_states=emb).sample
        with sd.UNetFeatureTap(tiny.unet, [2, 0, 3]) as tap:
            tapped = tiny.unet(latents, 681, encoder_hidden_states=emb).sample
    assert torch.equal(plain, tapped)  # hooks only observe
    shapes = {i: tuple(f.shape) for i, f in tap.features.items()}
    assert shapes == {0: (1, 128, 4, 4), 2: (1, 64, 16, 16), 3: (1, 32, 16, 16)}
    assert not tap.attached
    assert all(len(block._forward_hooks) == 0 for block in tiny.unet.up_blocks)
    with pytest.raises(ValueError, match="out of range"):
        sd.UNetFeatureTap(tiny.unet, [4])


def test_truncated_forward_equals_full_forward_features_with_gradients(tiny: sd.SDComponents) -> None:
    latents, emb = _inputs(tiny)
    z_full = latents.clone().requires_grad_(True)
    z_cut = latents.clone().requires_grad_(True)

    with sd.UNetFeatureTap(tiny.unet, [2]) as tap:
        eps = tap.run(z_full, 681, encoder_hidden_states=emb)
    full = tap.features[2]
    assert eps is not None and eps.shape == (1, 4, 16, 16)

    cut_tap = sd.UNetFeatureTap(tiny.unet, [2], stop_after=True)
    assert cut_tap.run(z_cut, 681, encoder_hidden_states=emb) is None  # attaches for the call only
    assert not cut_tap.attached
    cut = cut_tap.features[2]

    assert full.shape == cut.shape == (1, 64, 16, 16)
    torch.testing.assert_close(cut, full, rtol=0, atol=0)
    assert full.requires_grad and cut.requires_grad  # graph kept, weights frozen
    (full.square().mean()).backward()
    (cut.square().mean()).backward()
    assert z_full.grad is not None and z_full.grad.abs().sum() > 0
    torch.testing.assert_close(z_cut.grad, z_full.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in tiny.unet.parameters())
