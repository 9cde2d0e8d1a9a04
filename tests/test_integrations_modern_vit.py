"""Modern ViT attention in the integrations (issue 14, part 4):

* converted modules (timm ``AttentionRope`` with grouped kv heads, ``EvaAttention``,
  ``RelPosAttention``, ``AttentionPoolLatent``, ``RotAttentionPool2d``, ``AttentionPool2d``; open_clip
  ``AttentionalPooler`` and RN50 ``AttentionPool2d``): no-maps outputs equal, captured maps equal the
  float64 softmax of the very q / k / mask the unpatched module hands to SDPA, and
  ``capture_attention`` lists them;
* every attention-like module left unconverted is in the patch report (found by structure).

Tiny random modules and models (tests/integration_models.py) on CPU.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import DEVICE
from integration_models import assert_equal
from integration_models import timm_model
from reference import reference_attention

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from open_clip.modified_resnet import AttentionPool2d as OCAttentionPool2d  # noqa: E402
from open_clip.transformer import AttentionalPooler  # noqa: E402
from timm.layers import AttentionPool2d as TimmAttentionPool2d  # noqa: E402
from timm.layers import AttentionPoolLatent  # noqa: E402
from timm.layers import AttentionRope  # noqa: E402
from timm.layers import RotAttentionPool2d  # noqa: E402
from timm.models.eva import EvaAttention  # noqa: E402
from timm.models.vision_transformer_relpos import RelPosAttention  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.open_clip as lfi_oc  # noqa: E402
import lfi.integrations.timm as lfi_timm  # noqa: E402
from lfi.capture import attention_modules  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*not converted to lfi")
MAP_ATOL = MAP_RTOL = 2e-6  # fp32 maps against the float64 softmax


# ------------------------------------------------------------------------------------------
# Modern ViT attention: converted modules, their maps, capture_attention
# ------------------------------------------------------------------------------------------
def _rope(n, head_dim, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2 * head_dim, generator=g).to(DEVICE)  # (sin | cos) per token, as timm's rope


def _module_case(kind):
    """(unpatched module, call args, patch function, M query rows, N keys)."""
    g = torch.Generator().manual_seed(9)
    torch.manual_seed(0)
    if kind == "attention_rope_gqa":
        m = AttentionRope(32, num_heads=4, num_kv_heads=2, qkv_fused=False, qk_norm=True, norm_layer=nn.LayerNorm)
        x = torch.randn(2, 11, 32, generator=g)
        return m, (x.to(DEVICE), _rope(10, 8)), lfi_timm.patch, 11, 11
    if kind == "eva_rope_mask":
        m = EvaAttention(32, num_heads=4, qkv_fused=False, norm_layer=nn.LayerNorm)
        x = torch.randn(2, 9, 32, generator=g)
        mask = torch.rand(2, 1, 9, 9, generator=g) > 0.3
        mask[..., 0] = True
        return m, (x.to(DEVICE), _rope(8, 8), mask.to(DEVICE)), lfi_timm.patch, 9, 9
    if kind == "relpos_bias":
        m = RelPosAttention(32, num_heads=4)
        x = torch.randn(2, 10, 32, generator=g)
        bias = torch.randn(1, 4, 10, 10, generator=g)  # shared relative position bias, as a float mask
        return m, (x.to(DEVICE), bias.to(DEVICE)), lfi_timm.patch, 10, 10
    if kind == "attention_pool_latent":
        m = AttentionPoolLatent(32, num_heads=4, latent_len=3, pool_type="")
        x = torch.randn(2, 13, 32, generator=g)
        return m, (x.to(DEVICE),), lfi_timm.patch, 3, 13
    if kind == "timm_rot_attention_pool2d":  # RoPE on the H*W tokens, the mean token first
        m = RotAttentionPool2d(32, ref_feat_size=3, head_dim=8, pool_type="")
        x = torch.randn(2, 32, 3, 3, generator=g)
        return m, (x.to(DEVICE),), lfi_timm.patch, 10, 10
    if kind == "timm_attention_pool2d":
        m = TimmAttentionPool2d(32, feat_size=3, head_dim=8, class_token=True, pool_type="")
        x = torch.randn(2, 32, 3, 3, generator=g)
        return m, (x.to(DEVICE),), lfi_timm.patch, 10, 10
    if kind == "open_clip_attentional_pooler":
        m = AttentionalPooler(32, context_dim=24, n_head=4, n_queries=5)
        x = torch.randn(2, 13, 24, generator=g)
        return m, (x.to(DEVICE),), lfi_oc.patch, 5, 13
    if kind == "open_clip_attention_pool2d":
        m = OCAttentionPool2d(3, 32, num_heads=4, output_dim=16)
        x = torch.randn(2, 32, 3, 3, generator=g)
        return m, (x.to(DEVICE),), lfi_oc.patch, 10, 10
    raise AssertionError(kind)


MODULE_CASES = ["attention_rope_gqa", "eva_rope_mask", "relpos_bias", "attention_pool_latent",
                "timm_rot_attention_pool2d", "timm_attention_pool2d", "open_clip_attentional_pooler",
                "open_clip_attention_pool2d"]


def _sdpa_reference_maps(monkeypatch, module, args):
    """Runs the unpatched `module` and returns the float64 softmax maps of the SDPA call it makes
    (its own q, k, mask, scale), via the test suite's reference."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        seen.append(reference_attention(q, k, v, attn_mask, is_causal, scale)[1])
        return real(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)  # how these modules call it
        out = module(*args)
    assert len(seen) == 1
    return out, seen[0]


@pytest.mark.parametrize("kind", MODULE_CASES)
def test_converted_module_outputs_and_maps(kind, monkeypatch):
    ref, args, patch, M, N = _module_case(kind)
    ref = ref.to(DEVICE).eval()
    for m in ref.modules():  # timm's fused path is the one the maps are taken from
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    out_ref, maps_ref = _sdpa_reference_maps(monkeypatch, ref, args)
    model = copy.deepcopy(ref)
    report = patch(model)
    assert len(report.patched) == 1 and not report.skipped, report.summary()
    assert_equal(model(*args), out_ref)  # no maps asked: the original forward
    (name, layer), = attention_modules(model)
    with lfi.capture_attention(model, grad=True) as maps:
        out = model(*args)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert maps[0].shape == (2, 4, M, N) and maps[0].requires_grad
    torch.testing.assert_close(maps[0].double(), maps_ref, atol=MAP_ATOL, rtol=MAP_RTOL)
    maps[0].square().sum().backward()  # the maps are in the graph of the module's parameters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with lfi.capture_attention(model, rows=slice(1, 3)) as rows:
        model(*args)
    torch.testing.assert_close(rows[0].double(), maps_ref[:, :, 1:3], atol=MAP_ATOL, rtol=MAP_RTOL)
    if hasattr(layer, "fused_attn"):  # timm's non-fused setting: the capture still gets the maps
        layer.fused_attn = False
        with lfi.capture_attention(model, rows=0) as row0:
            model(*args)
        torch.testing.assert_close(row0[0].double(), maps_ref[:, :, :1], atol=MAP_ATOL, rtol=MAP_RTOL)
        assert layer.fused_attn is False  # the switch is restored after the call
    original = type(ref.attn if isinstance(ref, AttentionalPooler) else ref)
    unpatched = (lfi_timm if patch is lfi_timm.patch else lfi_oc).unpatch(model)
    assert len(unpatched.patched) == 1 and type(layer) is original


def test_capture_sees_modern_vit_layers():
    model, x = timm_model("pe_rope")
    model.eval()
    lfi_timm.patch(model)
    names = [n for n, _ in attention_modules(model)]
    assert names == ["blocks.0.attn", "blocks.1.attn", "attn_pool"]
    with lfi.capture_attention(model, layers=[-1], rows=None) as maps:
        model(x)
    B, N = x.shape[0], (32 // 16) ** 2 + 1
    assert maps[-1].shape == (B, 8, 1, N)  # the latent query over the tokens
    torch.testing.assert_close(maps[-1].sum(-1), torch.ones(B, 8, 1))


# ------------------------------------------------------------------------------------------
# The patch report: every attention-like module that is not converted
# ------------------------------------------------------------------------------------------
def test_report_names_maxvit_partition_attention():
    torch.manual_seed(0)
    model = timm.create_model("maxvit_rmlp_pico_rw_256", pretrained=False, img_size=64).eval()
    attn_like = [n for n, m in model.named_modules() if "qkv" in m._modules]
    assert attn_like, "the model must hold partition attention"
    with pytest.warns(UserWarning, match="not converted"):
        report = lfi_timm.patch(model)
    assert report.patched == []
    assert [n for n, _, _ in report.skipped] == attn_like


def test_report_finds_attention_by_structure_and_source():
    class Tokens(nn.Module):  # calls SDPA itself, no projections, no telling name
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    class QKVMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 16)

    class Block(nn.Module):  # a container of attention is not itself listed
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.mlp = nn.Linear(8, 8)

    model = nn.ModuleDict({"tok": Tokens(), "mix": QKVMixer(), "block": Block()})
    report = lfi_oc.patch(model, warn=False)
    assert sorted((n, c) for n, c, _ in report.skipped) == [
        ("block.attn", "MultiheadAttention"), ("mix", "QKVMixer"), ("tok", "Tokens")]
    assert "all_mha=True" in dict((n, r) for n, _, r in report.skipped)["block.attn"]

