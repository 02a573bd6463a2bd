"""StyleGAN2 generator and safe checkpoint conversion: names, ops against plain formulas, conversions.

Everything runs on the CPU with the 'tiny' preset (or on the meta device for the real presets).
"""

from __future__ import annotations

import argparse
import builtins
import collections
import contextlib
import json
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dragrt.runtime.models import stylegan2 as sg2
from dragrt.runtime.models import stylegan2_convert as conv
from dragrt.runtime.models.stylegan2 import Generator, GeneratorConfig, stylegan2_config
from dragrt.runtime.models.stylegan2_convert import UnsafeCheckpointError


def tiny_generator(noise: bool = True) -> Generator:
    """The tiny preset in eval mode, with non-zero noise strengths and w_avg so they matter."""
    gen = Generator.from_config(stylegan2_config("tiny")).eval()
    with torch.no_grad():
        if noise:
            for name, p in gen.named_parameters():
                if name.endswith("noise_strength"):
                    p.fill_(0.3)
        gen.mapping.w_avg.normal_()
    return gen


def random_ws(gen: Generator, n: int = 2) -> torch.Tensor:
    return torch.randn([n, gen.num_ws, gen.w_dim])


# ---------------------------------------------------------------------------------------------------------
# Names and shapes of the real presets (meta device: no memory)
# ---------------------------------------------------------------------------------------------------------


def nvidia_keys(resolution: int, mapping_layers: int = 8) -> set[str]:
    """NVIDIA G_ema key names for a skip generator, written from the naming rules (spec section 7)."""
    keys = {f"mapping.fc{i}.{p}" for i in range(mapping_layers) for p in ("weight", "bias")} | {"mapping.w_avg"}
    layer = ("weight", "bias", "noise_strength", "noise_const", "resample_filter", "affine.weight", "affine.bias")
    res = 4
    while res <= resolution:
        b = f"synthesis.b{res}"
        keys |= {f"{b}.resample_filter", f"{b}.torgb.weight", f"{b}.torgb.bias", f"{b}.torgb.affine.weight",
                 f"{b}.torgb.affine.bias"}
        keys |= {f"{b}.conv1.{p}" for p in layer}
        keys |= {f"{b}.const"} if res == 4 else {f"{b}.conv0.{p}" for p in layer}
        res *= 2
    return keys


@pytest.mark.parametrize("resolution, num_ws", [(256, 14), (512, 16), (1024, 18)])
def test_preset_names_and_shapes_match_nvidia(resolution: int, num_ws: int) -> None:
    with torch.device("meta"):
        gen = Generator.from_config(stylegan2_config(resolution))
    sd = gen.state_dict()
    assert gen.num_ws == num_ws == gen.config.num_ws == gen.mapping.num_ws
    assert set(sd) == nvidia_keys(resolution)
    shapes = {k: list(v.shape) for k, v in sd.items()}
    assert shapes["synthesis.b128.conv1.weight"][0] == 256  # DragGAN's feature map: 256 channels
    assert shapes["synthesis.b4.const"] == [512, 4, 4]
    assert shapes["synthesis.b128.conv0.weight"] == [256, 512, 3, 3]
    assert shapes[f"synthesis.b{resolution}.torgb.weight"] == [3, 32768 // resolution, 1, 1]
    assert shapes["mapping.fc0.weight"] == [512, 512]
    assert shapes["mapping.w_avg"] == [512]
    assert shapes["synthesis.b8.conv0.affine.weight"] == [512, 512]
    assert shapes["synthesis.b8.conv0.noise_const"] == [8, 8]
    assert shapes["synthesis.b8.conv0.noise_strength"] == []
    assert shapes["synthesis.b8.resample_filter"] == [4, 4]
    assert shapes["synthesis.b64.torgb.affine.bias"] == [512]


def test_fp16_blocks_and_channels_follow_nvidia_rules() -> None:
    with torch.device("meta"):
        gen = Generator.from_config(stylegan2_config(512))
    fp16 = [res for res in gen.synthesis.block_resolutions if getattr(gen.synthesis, f"b{res}").use_fp16]
    assert fp16 == [64, 128, 256, 512]
    assert [gen.config.channels(r) for r in (4, 64, 128, 256, 512)] == [512, 512, 256, 128, 64]


def test_config_dict_round_trip_and_nvidia_layouts() -> None:
    cfg = stylegan2_config(512)
    assert GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # StyleGAN3 repository's StyleGAN2: synthesis kwargs at the top level, plus a harmless extra key.
    flat = {"z_dim": 512, "w_dim": 512, "c_dim": 0, "img_resolution": 512, "img_channels": 3,
            "mapping_kwargs": {"num_layers": 8}, "channel_base": 32768, "channel_max": 512,
            "num_fp16_res": 4, "conv_clamp": 256, "fused_modconv_default": "inference_only"}
    assert GeneratorConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match="conv_kernel"):
        GeneratorConfig.from_dict({**flat, "conv_kernel": 3})
    with pytest.raises(ValueError, match="img_resolution"):
        GeneratorConfig(img_resolution=48)
    with pytest.raises(ValueError, match="architecture"):
        GeneratorConfig.from_dict({**cfg.to_dict(), "synthesis_kwargs": {"architecture": "resnet"}})


def test_bad_shapes_are_named() -> None:
    gen = tiny_generator()
    with pytest.raises(ValueError, match=r"ws must have layout \[N, num_ws, w_dim\]"):
        gen.synthesis(torch.zeros(1, gen.num_ws + 1, gen.w_dim))
    with pytest.raises(ValueError, match=r"z must have layout \[N, z_dim\]"):
        gen.mapping(torch.zeros(1, 7), None)
    with pytest.raises(ValueError, match="noise_mode"):
        gen.synthesis(random_ws(gen), noise_mode="fixed")
    with pytest.raises(ValueError, match="stop_after"):
        gen.synthesis(random_ws(gen), return_features=True, stop_after=12)


# ---------------------------------------------------------------------------------------------------------
# Ops against plain formulas
# ---------------------------------------------------------------------------------------------------------


def test_upsample2d_is_the_3_1_polyphase_formula() -> None:
    # With [1,3,3,1] and gain 4 (2 per axis), each axis maps x[i] to
    #   out[2i] = (x[i-1] + 3 x[i]) / 4,   out[2i+1] = (3 x[i] + x[i+1]) / 4   (zeros outside).
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)

    def axis(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.movedim(dim, -1)
        prev = F.pad(t, [1, 0])[..., :-1]
        nxt = F.pad(t, [0, 1])[..., 1:]
        out = torch.stack([(prev + 3 * t) / 4, (3 * t + nxt) / 4], dim=-1).flatten(-2)
        return out.movedim(-1, dim)

    expected = axis(axis(x, 3), 2)
    got = sg2.upsample2d(x, sg2.setup_filter([1, 3, 3, 1]))
    assert got.shape == (2, 3, 10, 14)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def naive_upfirdn(x: np.ndarray, f: np.ndarray, up: int, down: int, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Zero-insert, pad/crop, true 2-D convolution by explicit sums, decimate (one channel)."""
    px0, px1, py0, py1 = pad
    u = np.zeros((x.shape[0] * up, x.shape[1] * up))
    u[::up, ::up] = x
    u = np.pad(u, ((max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0))))
    u = u[max(-py0, 0): u.shape[0] - max(-py1, 0), max(-px0, 0): u.shape[1] - max(-px1, 0)]
    fh, fw = f.shape
    out = np.zeros((u.shape[0] - fh + 1, u.shape[1] - fw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sum(u[i + a, j + b] * f[fh - 1 - a, fw - 1 - b] for a in range(fh) for b in range(fw))
    return out[::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1, 2, 1)), (1, 2, (1, 2, 0, 1)), (3, 2, (-1, 2, 1, -2))])
def test_upfirdn2d_matches_its_definition(up: int, down: int, pad: tuple[int, int, int, int]) -> None:
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    f = torch.rand(3, 4)  # asymmetric: checks that the filter is flipped (a true convolution)
    got = sg2.upfirdn2d(x, f, up=up, down=down, padding=list(pad), gain=1.5)
    for c in range(2):
        want = naive_upfirdn(x[0, c].numpy(), f.double().numpy() * 1.5, up, down, pad)
        np.testing.assert_allclose(got[0, c].numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("down", [[2, 3], [3, 1], [2, 2]])
def test_separable_upfirdn2d_decimates_each_axis_by_its_own_factor(down: list[int]) -> None:
    """A ``[taps]`` filter is two 1-D passes, each strided by its axis' factor (``down = [x, y]``): the same
    image as the 2-D outer-product filter, and the definition's samples ``[::down_y, ::down_x]``."""
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    taps = torch.tensor([1.0, 2.0, 4.0, 3.0])  # asymmetric
    pad = [2, 1, 1, 3]
    got = sg2.upfirdn2d(x, taps, down=down, padding=pad)
    outer = torch.outer(taps, taps)
    torch.testing.assert_close(got, sg2.upfirdn2d(x, outer, down=down, padding=pad), rtol=1e-12, atol=1e-12)
    full = naive_upfirdn(x[1, 2].numpy(), outer.double().numpy(), 1, 1, tuple(pad))
    np.testing.assert_allclose(got[1, 2].numpy(), full[:: down[1], :: down[0]], rtol=1e-9, atol=1e-9)


def explicit_modconv(x, weight, styles, noise, up, demodulate):
    """One sample at a time: modulate, demodulate, then a true convolution (up: zero-insert, FIR, conv)."""
    f = sg2.setup_filter([1, 3, 3, 1]).double()
    outs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)  # [O, I, k, k]
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        xn = x[n : n + 1]
        if up == 1:
            y = F.conv2d(xn, w, padding=weight.shape[-1] // 2)
        else:
            # pad (3, 2): the 3x3 conv and the 4-tap filter both fit inside the zero-inserted image
            xu = torch.from_numpy(np.stack([naive_upfirdn(xn[0, c].numpy(), f.numpy() * 4, 2, 1, (3, 2, 3, 2))
                                            for c in range(xn.shape[1])]))[None]
            y = F.conv2d(xu, w.flip([2, 3]))
        outs.append(y if noise is None else y + noise)
    return torch.cat(outs)


@pytest.mark.parametrize("up, demodulate", [(1, True), (2, True), (1, False)])
def test_modulated_conv_equals_explicit_per_sample_conv(up: int, demodulate: bool) -> None:
    x = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    weight = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    styles = torch.randn(3, 5, dtype=torch.float64)
    noise = torch.randn(6 * up, 6 * up, dtype=torch.float64)
    want = explicit_modconv(x, weight, styles, noise, up, demodulate)
    f = sg2.setup_filter([1, 3, 3, 1])
    for fused in (True, False):
        got = sg2.modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=1, resample_filter=f,
                                   demodulate=demodulate, flip_weight=(up == 1), fused_modconv=fused)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_fused_and_unfused_generators_agree() -> None:
    gen = tiny_generator()
    ws = random_ws(gen, 3)
    fused = gen.synthesis(ws, fused_modconv=True)
    unfused = gen.synthesis(ws, fused_modconv=False)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_fp16_blocks_run_in_half_where_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = tiny_generator()
    ws = random_ws(gen, 1)
    ref_img, ref_feats = gen.synthesis(ws, return_features=True)
    assert all(f.dtype == torch.float32 for f in ref_feats)  # CPU: fp16 blocks fall back to fp32
    monkeypatch.setattr(sg2, "_fp16_supported", lambda device: True)
    img, feats = gen.synthesis(ws, return_features=True)
    assert [f.dtype for f in feats] == [torch.float32, torch.float32, torch.float16, torch.float16]
    assert img.dtype == torch.float32
    torch.testing.assert_close(img, ref_img, rtol=0, atol=2e-2)
    forced = gen.synthesis(ws, force_fp32=True)
    torch.testing.assert_close(forced, ref_img, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])  # batch 1: fused fp16 modconv; batch 3: unfused (NVIDIA's rule)
def test_fp16_on_cuda_is_close_to_fp32(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convs err ~2e-3 vs the CPU
    gen = tiny_generator().cuda()
    ws = random_ws(gen, batch).cuda()
    img, feats = gen.synthesis(ws, return_features=True)
    assert [f.dtype for f in feats] == [torch.float32, torch.float32, torch.float16, torch.float16]
    ref = gen.synthesis(ws, force_fp32=True)
    torch.testing.assert_close(img, ref, rtol=0, atol=2e-2)
    cpu = gen.cpu().synthesis(ws.cpu())
    torch.testing.assert_close(ref.cpu(), cpu, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Generator behaviour
# ---------------------------------------------------------------------------------------------------------


def test_return_features_one_per_block() -> None:
    gen = tiny_generator()
    ws = random_ws(gen)
    img, feats = gen.synthesis(ws, return_features=True)
    assert img.shape == (2, 3, 32, 32)
    assert [tuple(f.shape) for f in feats] == [(2, gen.config.channels(r), r, r) for r in (4, 8, 16, 32)]
    torch.testing.assert_close(img, gen.synthesis(ws), rtol=0, atol=0)


def test_stop_after_gives_the_same_features_and_skips_the_rest() -> None:
    gen = tiny_generator()
    ws = random_ws(gen)
    _, full = gen.synthesis(ws, return_features=True)
    calls = collections.Counter()
    for name, module in gen.synthesis.named_modules():
        if name.endswith(("torgb", "conv0", "conv1")):
            module.register_forward_hook(lambda m, i, o, name=name: calls.update([name]))
    img, part = gen.synthesis(ws, return_features=True, stop_after=16)
    assert img is None and len(part) == 3
    for a, b in zip(part, full):
        assert torch.equal(a, b)
    assert not any("torgb" in n or n.startswith("b32") for n in calls), calls
    assert calls["b16.conv1"] == 1


def test_truncation() -> None:
    gen = tiny_generator()
    z = torch.randn(4, gen.z_dim)
    plain = gen.mapping(z, None)
    assert plain.shape == (4, gen.num_ws, gen.w_dim)
    assert torch.equal(gen.mapping(z, None, truncation_psi=1), plain)
    avg = gen.mapping(z, None, truncation_psi=0)
    assert torch.equal(avg, gen.mapping.w_avg.expand_as(avg))
    half = gen.mapping(z, None, truncation_psi=0.5, truncation_cutoff=3)
    torch.testing.assert_close(half[:, :3], (plain[:, :3] + gen.mapping.w_avg) / 2)
    assert torch.equal(half[:, 3:], plain[:, 3:])


def test_w_avg_tracks_in_training_mode_only() -> None:
    gen = tiny_generator()
    before = gen.mapping.w_avg.clone()
    gen.mapping(torch.randn(4, gen.z_dim), None)
    assert torch.equal(gen.mapping.w_avg, before)  # eval mode
    gen.train()
    w = gen.mapping(torch.randn(4, gen.z_dim), None, truncation_psi=1)[:, 0]
    torch.testing.assert_close(gen.mapping.w_avg, w.mean(0).lerp(before, 0.995))


def test_noise_modes_and_determinism() -> None:
    gen = tiny_generator()
    ws = random_ws(gen)
    a = gen.synthesis(ws, noise_mode="const")
    assert torch.equal(a, gen.synthesis(ws, noise_mode="const"))
    assert not torch.allclose(a, gen.synthesis(ws, noise_mode="random"))
    quiet = tiny_generator(noise=False)
    quiet.load_state_dict({k: v for k, v in gen.state_dict().items() if not k.endswith("noise_strength")},
                          strict=False)
    torch.testing.assert_close(gen.synthesis(ws, noise_mode="none"), quiet.synthesis(ws), rtol=0, atol=0)


def test_gradients_reach_ws_with_frozen_generator() -> None:
    gen = tiny_generator().requires_grad_(False)
    ws = random_ws(gen).requires_grad_(True)
    _, feats = gen.synthesis(ws, return_features=True, stop_after=16)
    feats[-1].square().mean().backward()
    # b4 reads ws[0..1], b8 ws[1..3], b16 ws[3..5]; ToRGB is skipped, so b16's features depend on ws[0..4].
    per_w = ws.grad.abs().sum(dim=(0, 2))
    assert (per_w[:5] > 0).all() and (per_w[5:] == 0).all(), per_w
    assert all(p.grad is None for p in gen.parameters())


# ---------------------------------------------------------------------------------------------------------
# Safe unpickling
# ---------------------------------------------------------------------------------------------------------


class _SystemCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",))


class _EvilStorage:
    """A storage whose nested torch.save blob is itself a code-running pickle."""

    def __init__(self, marker: str) -> None:
        self.blob = pickle.dumps(_SystemCall(marker))

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


@pytest.mark.parametrize("payload, refused", [(_SystemCall, os.system.__module__ + ".system"),
                                              (_EvalCall, "builtins.eval")])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, payload, refused: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload(str(marker))}))
    with pytest.raises(UnsafeCheckpointError, match="refused global") as info:
        conv.load_nvidia_pickle(path)
    assert info.value.global_name == refused
    assert not marker.exists()


def test_malicious_storage_blob_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _EvilStorage(str(marker))}))
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        conv.load_nvidia_pickle(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# NVIDIA pickle round trip (fake torch_utils.persistence, registered only while writing)
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_nvidia_modules():
    """``torch_utils.persistence`` and ``dnnlib.util`` stand-ins so pickle can name their globals."""
    torch_utils = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("the stand-in is for writing only")

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils.persistence = persistence
    dnnlib = types.ModuleType("dnnlib")
    dnnlib_util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    dnnlib_util.EasyDict = dnnlib.EasyDict = EasyDict
    dnnlib.util = dnnlib_util
    fakes = {"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
             "dnnlib.util": dnnlib_util}
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield persistence._reconstruct_persistent_obj, EasyDict
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Persistent:
    """Pickles like a ``persistent_class`` instance: ``(_reconstruct_persistent_obj, (meta,))``."""

    def __init__(self, reconstruct, class_name: str, state: dict) -> None:
        self.reconstruct, self.class_name, self.state = reconstruct, class_name, state

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": 'raise RuntimeError("must not run")',
                "class_name": self.class_name, "state": self.state}
        return (self.reconstruct, (meta,))


def as_persistent(module: torch.nn.Module, reconstruct, easy_dict, init_kwargs=None) -> _Persistent:
    """The module's real ``__dict__`` (parameters, buffers, hooks, ...) with submodules made persistent,
    plus what persistence adds (init args) and a numpy scalar attribute as NVIDIA's layers have."""
    state = {k: v for k, v in module.__dict__.items() if k not in ("config", "checkpoint_record")}
    state["_modules"] = collections.OrderedDict(
        (k, as_persistent(m, reconstruct, easy_dict)) for k, m in module._modules.items())
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs if init_kwargs is not None else easy_dict()
    state["np_gain"] = np.float64(1 / np.sqrt(3))
    return _Persistent(reconstruct, type(module).__name__, state)


def write_nvidia_pickle(gen: Generator, path, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with fake_nvidia_modules() as (reconstruct, easy_dict):
        kwargs = easy_dict(gen.config.to_dict())
        kwargs["mapping_kwargs"] = easy_dict(kwargs["mapping_kwargs"])
        kwargs["synthesis_kwargs"] = easy_dict(kwargs["synthesis_kwargs"])
        snapshot = {"G": None, "D": None, "G_ema": as_persistent(gen, reconstruct, easy_dict, kwargs),
                    "augment_pipe": None, "training_set_kwargs": easy_dict(resolution=gen.img_resolution)}
        path.write_bytes(pickle.dumps(snapshot, protocol=protocol))
    assert "torch_utils" not in sys.modules or not hasattr(sys.modules["torch_utils"], "persistence")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_nvidia_pickle_round_trip_is_bit_exact(tmp_path, protocol: int) -> None:
    gen = tiny_generator().requires_grad_(False)
    pkl = tmp_path / "network-snapshot.pkl"
    write_nvidia_pickle(gen, pkl, protocol)

    config_dict, state_dict = conv.load_nvidia_pickle(pkl)
    assert config_dict == gen.config.to_dict()
    assert set(state_dict) == set(gen.state_dict())

    record = conv.convert(pkl, tmp_path / "out" / "tiny")
    assert record["source"]["format"] == "nvidia-pickle" and record["source"]["class_name"] == "Generator"
    assert len(record["source"]["sha256"]) == 64 and record["num_ws"] == gen.num_ws
    on_disk = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert on_disk == record
    loaded = conv.load_generator(tmp_path / "out" / "tiny.safetensors")
    ws = random_ws(gen)
    assert torch.equal(loaded.synthesis(ws), gen.synthesis(ws))
    z = torch.randn(2, gen.z_dim)
    assert torch.equal(loaded(z, None, truncation_psi=0.7), gen(z, None, truncation_psi=0.7))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_load_generator_detects_tampering(tmp_path) -> None:
    gen = tiny_generator()
    pkl = tmp_path / "g.pkl"
    write_nvidia_pickle(gen, pkl)
    conv.convert(pkl, tmp_path / "g")
    weights = tmp_path / "g.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        conv.load_generator(tmp_path / "g")


def test_cli_main(tmp_path, capsys) -> None:
    gen = tiny_generator()
    pkl = tmp_path / "g.pkl"
    write_nvidia_pickle(gen, pkl)
    assert conv.main([str(pkl), str(tmp_path / "g")]) == 0
    assert "num_ws 8" in capsys.readouterr().out
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G_ema": _SystemCall(str(tmp_path / "pwned"))}))
    assert conv.main([str(evil), str(tmp_path / "e")]) == 2
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "e.safetensors").exists()
    assert "dragrt convert stylegan2: refused:" in capsys.readouterr().err
    assert conv.main([str(tmp_path / "missing.pkl"), str(tmp_path / "m")]) == 1
    assert f"input {tmp_path / 'missing.pkl'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------
# Rosinality checkpoints
# ---------------------------------------------------------------------------------------------------------

ROS_STYLE_DIM, ROS_N_MLP, ROS_RES = 32, 2, 32
ROS_CHANNELS = {4: 32, 8: 32, 16: 32, 32: 16}


def rosinality_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors in rosinality's Generator layout (size 32, style_dim 32, n_mlp 2)."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    kernel = torch.tensor([1.0, 3, 3, 1])
    kernel = torch.outer(kernel, kernel) / 64 * 4
    sd = {}
    for i in range(1, ROS_N_MLP + 1):
        sd[f"style.{i}.weight"] = rnd(ROS_STYLE_DIM, ROS_STYLE_DIM, scale=100.0)  # randn / lr_mul
        sd[f"style.{i}.bias"] = rnd(ROS_STYLE_DIM, scale=10.0)

    def styled(prefix, cin, cout, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, cout, cin, 3, 3)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, ROS_STYLE_DIM)
        sd[f"{prefix}.conv.modulation.bias"] = rnd(cin, scale=0.1, offset=1.0)
        sd[f"{prefix}.noise.weight"] = rnd(1, scale=0.3)
        sd[f"{prefix}.activate.bias"] = rnd(cout, scale=0.1)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = kernel.clone()

    def to_rgb(prefix, cin, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, 3, cin, 1, 1)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, ROS_STYLE_DIM)
        sd[f"{prefix}.conv.modulation.bias"] = rnd(cin, scale=0.1, offset=1.0)
        sd[f"{prefix}.bias"] = rnd(1, 3, 1, 1, scale=0.1)
        if up:
            sd[f"{prefix}.upsample.kernel"] = kernel.clone()

    sd["input.input"] = rnd(1, ROS_CHANNELS[4], 4, 4)
    styled("conv1", ROS_CHANNELS[4], ROS_CHANNELS[4], False)
    to_rgb("to_rgb1", ROS_CHANNELS[4], False)
    sd["noises.noise_0"] = rnd(1, 1, 4, 4)
    for k, res in enumerate((8, 16, 32)):
        styled(f"convs.{2 * k}", ROS_CHANNELS[res // 2], ROS_CHANNELS[res], True)
        styled(f"convs.{2 * k + 1}", ROS_CHANNELS[res], ROS_CHANNELS[res], False)
        to_rgb(f"to_rgbs.{k}", ROS_CHANNELS[res], True)
        sd[f"noises.noise_{2 * k + 1}"] = rnd(1, 1, res, res)
        sd[f"noises.noise_{2 * k + 2}"] = rnd(1, 1, res, res)
    return sd


def rosinality_reference(sd, z, latent):
    """Rosinality's forward written out from its definition: mapping(z) and synthesis(latent) with its
    constant noise (weight scale on the weights, conv_transpose + blur for up-convs, FIR-upsampled skip)."""
    x = z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-8)
    for i in range(1, ROS_N_MLP + 1):
        w = sd[f"style.{i}.weight"]
        x = F.linear(x, w * (0.01 / math.sqrt(w.shape[1])))
        x = F.leaky_relu(x + sd[f"style.{i}.bias"] * 0.01, 0.2) * math.sqrt(2)

    def fir(t, k, pad0, pad1, up=1):
        if up > 1:
            u = t.new_zeros(t.shape[0], t.shape[1], t.shape[2] * up, t.shape[3] * up)
            u[:, :, ::up, ::up] = t
            t = u
        t = F.pad(t, [pad0, pad1, pad0, pad1])
        return F.conv2d(t, k.flip([0, 1])[None, None].repeat(t.shape[1], 1, 1, 1), groups=t.shape[1])

    def modconv(prefix, h, style, demodulate, up):
        weight = sd[f"{prefix}.conv.weight"][0]
        out_c, in_c, k, _ = weight.shape
        s = F.linear(style, sd[f"{prefix}.conv.modulation.weight"] / math.sqrt(ROS_STYLE_DIM),
                     sd[f"{prefix}.conv.modulation.bias"])
        outs = []
        for n in range(h.shape[0]):
            w = weight / math.sqrt(in_c * k * k) * s[n].reshape(1, -1, 1, 1)
            if demodulate:
                w = w * torch.rsqrt(w.square().sum(dim=[1, 2, 3]) + 1e-8).reshape(-1, 1, 1, 1)
            if up:
                y = F.conv_transpose2d(h[n : n + 1], w.transpose(0, 1), stride=2)
                y = fir(y, sd[f"{prefix}.conv.blur.kernel"], 1, 1)
            else:
                y = F.conv2d(h[n : n + 1], w, padding=k // 2)
            outs.append(y)
        return torch.cat(outs)

    def styled(prefix, h, style, noise, up=False):
        h = modconv(prefix, h, style, True, up) + sd[f"{prefix}.noise.weight"] * noise
        return F.leaky_relu(h + sd[f"{prefix}.activate.bias"].reshape(1, -1, 1, 1), 0.2) * math.sqrt(2)

    def to_rgb(prefix, h, style, skip):
        out = modconv(prefix, h, style, False, False) + sd[f"{prefix}.bias"]
        if skip is not None:
            out = out + fir(skip, sd[f"{prefix}.upsample.kernel"], 2, 1, up=2)
        return out

    h = sd["input.input"].repeat(latent.shape[0], 1, 1, 1)
    h = styled("conv1", h, latent[:, 0], sd["noises.noise_0"])
    skip = to_rgb("to_rgb1", h, latent[:, 1], None)
    for k in range(3):
        i = 1 + 2 * k
        h = styled(f"convs.{2 * k}", h, latent[:, i], sd[f"noises.noise_{2 * k + 1}"], up=True)
        h = styled(f"convs.{2 * k + 1}", h, latent[:, i + 1], sd[f"noises.noise_{2 * k + 2}"])
        skip = to_rgb(f"to_rgbs.{k}", h, latent[:, i + 2], skip)
    return x, skip


def test_rosinality_checkpoint_converts_and_matches_its_architecture(tmp_path) -> None:
    sd = rosinality_state_dict()
    latent_avg = torch.randn(ROS_STYLE_DIM)
    path = tmp_path / "550000.pt"
    args = argparse.Namespace(size=ROS_RES, latent=ROS_STYLE_DIM, n_mlp=ROS_N_MLP)
    torch.save({"g_ema": sd, "latent_avg": latent_avg, "args": args}, path)

    config_dict, ours = conv.load_rosinality(path)
    cfg = GeneratorConfig.from_dict(config_dict)
    assert (cfg.img_resolution, cfg.z_dim, cfg.w_dim, cfg.mapping.num_layers) == (ROS_RES, 32, 32, 2)
    assert [cfg.channels(r) for r in (4, 8, 16, 32)] == list(ROS_CHANNELS.values())
    assert cfg.synthesis.conv_clamp is None and cfg.synthesis.num_fp16_res == 0
    with torch.device("meta"):
        expected = Generator.from_config(cfg).state_dict()
    assert set(ours) == set(expected)
    assert all(ours[k].shape == expected[k].shape for k in expected)
    # Every rosinality tensor lands somewhere, reshaped but unchanged.
    for src, (dst, _) in conv.rosinality_key_map(ROS_N_MLP, ROS_RES).items():
        assert torch.equal(ours[dst].flatten(), sd[src].flatten()), src
    assert torch.equal(ours["mapping.w_avg"], latent_avg)

    conv.convert(path, tmp_path / "ros")
    gen = conv.load_generator(tmp_path / "ros")
    z = torch.randn(3, ROS_STYLE_DIM)
    latent = torch.randn(3, gen.num_ws, ROS_STYLE_DIM)
    want_w, want_img = rosinality_reference(sd, z, latent)
    torch.testing.assert_close(gen.mapping(z, None)[:, 0], want_w, rtol=1e-5, atol=1e-5)
    for fused in (True, False):
        torch.testing.assert_close(gen.synthesis(latent, fused_modconv=fused), want_img, rtol=1e-4, atol=1e-4)


def test_rosinality_without_latent_avg_estimates_it(tmp_path) -> None:
    sd = rosinality_state_dict()
    path = tmp_path / "bare.pt"
    torch.save({"g_ema": sd}, path)
    record = conv.convert(path, tmp_path / "bare")
    assert record["source"]["w_avg_source"].startswith("estimated") and record["notes"]
    gen = conv.load_generator(tmp_path / "bare")
    w = gen.mapping(torch.randn(4096, ROS_STYLE_DIM), None)[:, 0]
    torch.testing.assert_close(gen.mapping.w_avg, w.mean(0), rtol=0, atol=0.1 * w.std(0).max().item())
