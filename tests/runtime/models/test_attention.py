"""Attention processors: plain SDPA equals diffusers' own, mutual self-attention matches its definition."""

from __future__ import annotations

import copy

import pytest
import torch

from dragrt.runtime.models.attention import (
    AttnProcessor,
    MutualSelfAttnProcessor,
    mutual_self_attention,
    resolve_attention_backend,
    set_attention_backend,
    transformer_self_attentions,
)
from dragrt.runtime.models.sd import tiny_unet_config


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(tiny_unet_config()).eval().requires_grad_(False)


def _diffusers_default(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    emb = torch.randn(batch, 77, 32, generator=g)
    return x, torch.tensor([500]), emb


def test_transformer_blocks_in_forward_order(unet):
    blocks = transformer_self_attentions(unet)
    names = [n for n, _ in blocks]
    # tiny config: layers_per_block 1 -> 3 down, 1 mid, 3 x 2 up transformer blocks (SD1.5: 6 + 1 + 9 = 16)
    assert len(names) == 10
    assert names[0].startswith("down_blocks.0.") and names[3].startswith("mid_block.")
    assert names[4].startswith("up_blocks.1.") and names[-1].startswith("up_blocks.3.")
    assert all(n.endswith("attn1") for n in names)


def test_fused_qkv_is_the_same_function_and_input_gradient(unet):
    """fuse_qkv: self-attention's q/k/v from one matmul with the stacked weights gives the UNet's output and its
    gradient with respect to the latents (what a drag step needs); not with the reference's math backend."""
    x, t, emb = _inputs()
    results = []
    for fuse in (False, True):
        set_attention_backend(unet, "sdpa", fuse_qkv=fuse)
        xg = x.clone().requires_grad_(True)
        out = unet(xg, t, encoder_hidden_states=emb).sample
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xg.grad))
    _diffusers_default(unet)
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fuse_qkv=True is not allowed with backend='math'"):
        set_attention_backend(unet, "math", fuse_qkv=True)


def test_fused_qkv_stacks_plain_and_merged_projections_only():
    """What can be stacked: plain linear maps (biases all or none), and LoRA layers that offer a merged weight;
    a projection that is not one linear map (peft's two-branch forward) keeps the three separate calls."""
    from types import SimpleNamespace

    from dragrt.runtime.models.attention import _fused_qkv_projection

    lin = [torch.nn.Linear(4, 4, bias=False) for _ in range(3)]
    w, b = _fused_qkv_projection(SimpleNamespace(to_q=lin[0], to_k=lin[1], to_v=lin[2]))
    assert torch.equal(w, torch.cat([m.weight for m in lin])) and b is None
    mixed = SimpleNamespace(to_q=torch.nn.Linear(4, 4), to_k=lin[1], to_v=lin[2])
    assert _fused_qkv_projection(mixed) is None  # one bias, two without

    class Merged(torch.nn.Module):
        def dragrt_weight_and_bias(self):
            return torch.ones(4, 4), None

    w, _ = _fused_qkv_projection(SimpleNamespace(to_q=lin[0], to_k=Merged(), to_v=lin[2]))
    assert torch.equal(w[4:8], torch.ones(4, 4))
    assert _fused_qkv_projection(SimpleNamespace(to_q=lin[0], to_k=torch.nn.Sequential(lin[1]), to_v=lin[2])) is None


def test_our_sdpa_processor_equals_diffusers_default(unet):
    x, t, emb = _inputs()
    _diffusers_default(unet)
    want = unet(x, t, encoder_hidden_states=emb).sample
    assert set_attention_backend(unet, "auto") == "sdpa"
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    got = unet(x, t, encoder_hidden_states=emb).sample
    set_attention_backend(unet, "math")
    math_ = unet(x, t, encoder_hidden_states=emb).sample
    _diffusers_default(unet)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(math_, want, rtol=1e-5, atol=1e-5)


def test_mutual_attention_literal_equals_broadcast_and_restores(unet):
    x, t, emb = _inputs()
    _diffusers_default(unet)
    before = dict(unet.attn_processors)
    outs = {}
    for literal in (False, True):
        with mutual_self_attention(unet, start_layer=4, literal=literal) as changed:
            assert len(changed) == 6 and all(n.startswith("up_blocks") for n in changed)
            outs[literal] = unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_branch_zero_is_a_plain_reconstruction_and_branch_one_changes(unet):
    x, t, emb = _inputs()
    _diffusers_default(unet)
    plain = unet(x, t, encoder_hidden_states=emb).sample
    with mutual_self_attention(unet, start_layer=4):
        mutual = unet(x, t, encoder_hidden_states=emb).sample
    # branch 0 attends to itself: unchanged; branch 1 attends to branch 0's keys/values: changed
    torch.testing.assert_close(mutual[0], plain[0], rtol=1e-5, atol=1e-5)
    assert (mutual[1] - plain[1]).abs().max() > 1e-3
    # with identical branches mutual attention is plain attention
    x2, emb2 = x[:1].expand(2, -1, -1, -1), emb[:1].expand(2, -1, -1)
    with mutual_self_attention(unet, start_layer=0):
        same = unet(x2, t, encoder_hidden_states=emb2).sample
    torch.testing.assert_close(same[1], plain[0], rtol=1e-5, atol=1e-5)


def test_mutual_processor_is_softmax_against_branch_zero():
    torch.manual_seed(3)

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            self.to_out = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Identity()])
            self.heads, self.scale = 2, 0.5
            self.residual_connection, self.rescale_output_factor = False, 1.0

    attn = Attn()
    h = torch.randn(2, 5, 8)
    out = MutualSelfAttnProcessor()(attn, h)
    q = attn.to_q(h).view(2, 5, 2, 4).transpose(1, 2)
    k = attn.to_k(h[:1]).view(1, 5, 2, 4).transpose(1, 2)
    v = attn.to_v(h[:1]).view(1, 5, 2, 4).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    want = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention"):
        MutualSelfAttnProcessor()(attn, h, encoder_hidden_states=h)


def test_backend_errors_name_the_choice(unet):
    with pytest.raises(ValueError, match="attention='flash'.*auto, sdpa, cudnn, xformers"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="xformers"):
        resolve_attention_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="attention='cudnn' runs on CUDA devices only"):
        resolve_attention_backend("cudnn", "cpu")
    with pytest.raises(ValueError, match="start_layer=11 is out of range; this UNet has 10"):
        with mutual_self_attention(unet, start_layer=11):
            pass


@pytest.mark.cuda
def test_cudnn_first_attention_is_sdpa(unet):
    """attention='cudnn' (SDPA with cuDNN's fused kernels first): the same UNet output and latent gradient as
    'sdpa', in fp16 on the GPU, also inside a compiled function (the preference is a context Dynamo keeps)."""
    net = copy.deepcopy(unet).cuda().half()
    x, t, emb = (a.cuda() for a in _inputs())
    x, emb = x.half(), emb.half()
    results = {}
    for backend in ("sdpa", "cudnn"):
        set_attention_backend(net, backend)
        xg = x.clone().requires_grad_(True)
        out = net(xg, t, encoder_hidden_states=emb).sample
        out.float().square().sum().backward()
        results[backend] = (out.detach().float(), xg.grad.float())
    torch.testing.assert_close(results["cudnn"][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results["cudnn"][1], results["sdpa"][1], rtol=5e-2, atol=5e-2)
    from dragrt.runtime.models.attention import _attention

    q = torch.randn(2, 8, 256, 40, device="cuda", dtype=torch.float16)
    compiled = torch.compile(lambda a: _attention(a, a, a, 40 ** -0.5, "cudnn"), fullgraph=True)
    torch.testing.assert_close(compiled(q), _attention(q, q, q, 40 ** -0.5, "sdpa"), rtol=2e-2, atol=2e-2)
