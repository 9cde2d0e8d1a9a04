"""open_clip drop-in (both towers) and lfi.nn.MultiheadAttention (torch.nn.MultiheadAttention drop-in)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import Attention as OCAttention  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.open_clip as lfi_oc  # noqa: E402
from helpers import DEVICE  # noqa: E402
from lfi.nn import MultiheadAttention  # noqa: E402

ATOL = RTOL = 1e-5
GRAD_ATOL = GRAD_RTOL = 1e-4
logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def tiny_clip(seed=0, vision=None, text=None):
    torch.manual_seed(seed)
    vision_cfg = dict(image_size=64, patch_size=16, layers=2, width=128, head_width=32, **(vision or {}))
    text_cfg = dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=2, **(text or {}))
    model = open_clip.create_model("ViT-S-16", pretrained=None, embed_dim=64, vision_cfg=vision_cfg, text_cfg=text_cfg)
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def inputs():
    tok = open_clip.get_tokenizer("ViT-S-16")
    text = tok(["a cat", "a photo of a dog on the grass"]).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 64, 64, generator=g).to(DEVICE)
    return img, text


def encode(model, img, text):
    return model.encode_image(img), model.encode_text(text)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patch_outputs_and_grads_match(mode, inputs):
    img, text = inputs
    ref = tiny_clip()
    model = copy.deepcopy(ref)
    report = lfi_oc.patch(model, backend="torch")
    assert len(report.patched) == 4 and not report.skipped
    assert all(type(b.attn) is MultiheadAttention for b in model.visual.transformer.resblocks)
    assert all(type(b.attn) is MultiheadAttention for b in model.transformer.resblocks)
    for m in (ref, model):
        m.train(mode == "train")
    ri, rt = encode(ref, img, text)
    pi, pt = encode(model, img, text)
    close(pi, ri)
    close(pt, rt)
    (ri.square().sum() + rt.square().sum()).backward()
    (pi.square().sum() + pt.square().sum()).backward()
    gr, gp = grads(ref), grads(model)
    assert gr.keys() == gp.keys()
    for n in gr:
        close(gp[n], gr[n], GRAD_ATOL, GRAD_RTOL)


def _torch_mha_maps(model, fn):
    """Reference maps from torch's own nn.MultiheadAttention (need_weights=True), per block."""
    maps = []

    def pre_hook(mod, args, kwargs):
        q, k, v = args[:3]
        with torch.no_grad():
            _, w = nn.MultiheadAttention.forward(mod, q, k, v, attn_mask=kwargs.get("attn_mask"),
                                                 need_weights=True, average_attn_weights=False)
        maps.append(w)

    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    hooks = [b.attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return maps


def test_capture_matches_torch_maps(inputs):
    img, text = inputs
    model = tiny_clip().eval()
    ref_maps = _torch_mha_maps(model, lambda: encode(model, img, text))
    lfi_oc.patch(model, backend="torch")
    names = [n for n, _ in lfi.capture.attention_modules(model)]
    assert names == ["visual.transformer.resblocks.0.attn", "visual.transformer.resblocks.1.attn",
                     "transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    with lfi.capture_attention(model) as maps:
        encode(model, img, text)
    for i in range(4):
        close(maps[i], ref_maps[i])
    # text tower: the causal float mask is honoured (upper triangle exactly zero)
    text_map = maps[-1]
    assert text_map.shape == (2, 4, 77, 77)
    assert torch.all(text_map.triu(1) == 0)
    # CLS row of the last vision layer, head mean
    with lfi.capture_attention(model, layers=[1], rows=0, heads="mean") as maps:
        model.encode_image(img)
    close(maps[1], ref_maps[1][:, :, :1].mean(1))


def test_capture_grad(inputs):
    img, _ = inputs
    model = tiny_clip().train()
    lfi_oc.patch(model, backend="torch")
    with lfi.capture_attention(model, layers=[1], rows=0, grad=True) as maps:
        model.encode_image(img)
    maps[1].square().sum().backward()
    assert model.visual.transformer.resblocks[1].attn.in_proj_weight.grad.abs().sum() > 0


def test_unpatch_restores_exactly(inputs):
    img, text = inputs
    model = tiny_clip().eval()
    before = encode(model, img, text)
    keys = {n: set(m.__dict__) for n, m in model.named_modules()}
    lfi_oc.patch(model)
    assert len(lfi_oc.unpatch(model).patched) == 4
    assert all(type(b.attn) is nn.MultiheadAttention for b in model.transformer.resblocks)
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == keys
    after = encode(model, img, text)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_custom_blocks(inputs):
    """open_clip's own Attention (CustomResidualAttentionBlock): qk_norm, head scale, inner norm."""
    img, text = inputs
    ref = tiny_clip(vision=dict(qk_norm=True, scale_heads=True, scale_attn_inner=True),
                    text=dict(qk_norm=True, scale_attn=True)).eval()
    for m in ref.modules():
        if isinstance(m, OCAttention) and m.head_scale is not None:
            nn.init.uniform_(m.head_scale, 0.5, 1.5)
    model = copy.deepcopy(ref)
    report = lfi_oc.patch(model, backend="torch")
    assert len(report.patched) == 4
    assert all(type(b.attn) is lfi_oc.OpenCLIPAttention for b in model.transformer.resblocks)
    ri, rt = encode(ref, img, text)
    pi, pt = encode(model, img, text)
    close(pi, ri)
    close(pt, rt)
    with lfi.capture_attention(model, layers=[-1]) as maps:
        model.encode_text(text)
    assert torch.all(maps[-1].triu(1) == 0)
    close(maps[-1].sum(-1), torch.ones(2, 4, 77, device=DEVICE))
    lfi_oc.unpatch(model)
    assert all(type(b.attn) is OCAttention for b in model.transformer.resblocks)


@pytest.mark.parametrize("mask", ["none", "float", "bool3d"])
def test_open_clip_attention_variants(mask):
    torch.manual_seed(0)
    B, L, C, H = 2, 9, 32, 4
    x = torch.randn(B, L, C, device=DEVICE)
    attn_mask = None
    if mask == "float":
        attn_mask = torch.randn(L, L, device=DEVICE)
    elif mask == "bool3d":  # open_clip convention: True = masked out
        attn_mask = torch.rand(B * H, L, L, device=DEVICE) > 0.6
        attn_mask[..., 0] = False
    ref = OCAttention(C, H, qk_norm=True, scale_heads=True, inner_norm=True).to(DEVICE).eval()
    nn.init.uniform_(ref.head_scale, 0.5, 1.5)
    mod = copy.deepcopy(ref)
    lfi_oc.patch(mod, backend="torch")
    close(mod(x, attn_mask=attn_mask), ref(x, attn_mask=attn_mask))
    # scaled cosine attention (open_clip's own path needs 3-D bmm inputs): check against the formula
    cos = OCAttention(C, H, scaled_cosine=True).to(DEVICE).eval()
    with torch.no_grad():
        cos.logit_scale.copy_(torch.rand(H, 1, 1) * 3)
    lfi_oc.patch(cos, backend="torch")
    q, k, v = F.linear(x, cos.in_proj_weight, cos.in_proj_bias).view(B, L, 3, H, -1).permute(2, 0, 3, 1, 4)
    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    s = s * cos.logit_scale.clamp(max=cos.logit_scale_max).exp()
    if mask == "float":
        s = s + attn_mask
    elif mask == "bool3d":
        s = s.masked_fill(attn_mask.view(B, H, L, L), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    close(cos(x, attn_mask=attn_mask), cos.out_proj(o))


def test_unsupported_mha_is_reported():
    model = nn.ModuleDict({
        "pool": nn.MultiheadAttention(16, 2, batch_first=True),
        "biased": nn.MultiheadAttention(16, 2, add_bias_kv=True),
    })
    with pytest.warns(UserWarning, match="not converted"):
        report = lfi_oc.patch(model)
    assert report.patched == [] and {n for n, _, _ in report.skipped} == {"pool", "biased"}
    report = lfi_oc.patch(model, all_mha=True, warn=False)
    assert report.patched == ["pool"] and type(model["biased"]) is nn.MultiheadAttention


# ------------------------------------------------------------------------------------------
# lfi.nn.MultiheadAttention against torch.nn.MultiheadAttention
# ------------------------------------------------------------------------------------------
MHA_CASES = {
    "bf-self": dict(batch_first=True),
    "seq-first": dict(batch_first=False),
    "kdim-vdim": dict(batch_first=True, kdim=12, vdim=20),
    "no-bias": dict(batch_first=True, bias=False),
}
MASK_CASES = ["none", "float2d", "bool2d", "bool3d", "kpm-bool", "kpm-float", "both", "causal-hint", "unbatched"]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("mask", MASK_CASES)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(case, mask):
    torch.manual_seed(0)
    E, H, B, L, S = 16, 4, 3, 5, 7
    cfg = MHA_CASES[case]
    ref = nn.MultiheadAttention(E, H, **cfg).to(DEVICE).train()  # dropout 0: train == eval math
    mod = copy.deepcopy(ref)
    mod.__class__ = MultiheadAttention
    mod.lfi_backend = "torch"
    self_attn = cfg.get("kdim") is None and mask in ("causal-hint", "unbatched")
    if self_attn:
        S = L
    kd, vd = cfg.get("kdim", E), cfg.get("vdim", E)
    bf = cfg["batch_first"]
    shape = (lambda n, d: (B, n, d)) if bf else (lambda n, d: (n, B, d))
    q = torch.randn(*shape(L, E), device=DEVICE)
    k = q if self_attn else torch.randn(*shape(S, kd), device=DEVICE)
    v = q if self_attn else torch.randn(*shape(S, vd), device=DEVICE)
    kw = {}
    if mask == "float2d":
        kw["attn_mask"] = torch.randn(L, S, device=DEVICE)
    elif mask == "bool2d":
        kw["attn_mask"] = torch.rand(L, S, device=DEVICE) > 0.7
        kw["attn_mask"][:, 0] = False
    elif mask == "bool3d":
        kw["attn_mask"] = torch.rand(B * H, L, S, device=DEVICE) > 0.7
        kw["attn_mask"][..., 0] = False
    elif mask == "kpm-bool":
        kw["key_padding_mask"] = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kw["key_padding_mask"][1, -2:] = True
    elif mask == "kpm-float":
        kw["key_padding_mask"] = torch.randn(B, S, device=DEVICE)
    elif mask == "both":
        kw["attn_mask"] = torch.rand(L, S, device=DEVICE) > 0.7
        kw["attn_mask"][:, 0] = False
        kw["key_padding_mask"] = torch.randn(B, S, device=DEVICE)
    elif mask == "causal-hint":
        kw["attn_mask"] = torch.full((L, S), float("-inf"), device=DEVICE).triu(1)
        kw["is_causal"] = True
    elif mask == "unbatched":
        q, k, v = ((t[0] if bf else t[:, 0]) for t in (q, k, v))
    for need, avg in [(False, True), (True, True), (True, False)]:
        o_ref, w_ref = ref(q, k, v, need_weights=need, average_attn_weights=avg, **kw)
        o, w = mod(q, k, v, need_weights=need, average_attn_weights=avg, **kw)
        close(o, o_ref)
        if need:
            close(w, w_ref)
        else:
            assert w is None
    # gradients w.r.t. inputs and parameters
    qg = q.detach().clone().requires_grad_()
    o_ref = ref(qg, qg if self_attn else k, qg if self_attn else v, need_weights=False, **kw)[0]
    (o_ref * torch.arange(o_ref.numel(), device=DEVICE).view_as(o_ref).sin()).sum().backward()
    g_ref = qg.grad.clone()
    qg.grad = None
    o = mod(qg, qg if self_attn else k, qg if self_attn else v, need_weights=False, **kw)[0]
    (o * torch.arange(o.numel(), device=DEVICE).view_as(o).sin()).sum().backward()
    close(qg.grad, g_ref, GRAD_ATOL, GRAD_RTOL)
    for (n, p), (_, pr) in zip(mod.named_parameters(), ref.named_parameters()):
        close(p.grad, pr.grad, GRAD_ATOL, GRAD_RTOL)


def test_multihead_attention_causal_hint_needs_mask():
    mod = MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="attn_mask"):
        mod(x, x, x, is_causal=True)


def test_timm_trunk_attention_is_converted():
    """open_clip towers with a timm trunk (vision_cfg.timm_model_name) hold timm Attention modules."""
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.ModuleDict({"trunk": timm_layers.Attention(32, num_heads=4), "mha": nn.MultiheadAttention(32, 4)})
    report = lfi_oc.patch(model, all_mha=True)
    assert sorted(report.patched) == ["mha", "trunk"]
    assert type(model["trunk"]) is lfi.nn.InteractionAttention
    lfi_oc.unpatch(model)
    assert type(model["trunk"]) is timm_layers.Attention and type(model["mha"]) is nn.MultiheadAttention
