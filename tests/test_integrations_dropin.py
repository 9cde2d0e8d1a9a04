"""Drop-in guarantees of the integrations (issue 14, parts 1, 3, 4, 5):

* a patched timm / open_clip / Hugging Face model, and ``lfi.nn.MultiheadAttention``, whose call asks
  for no maps runs the unpatched computation: ``torch.equal`` against the unpatched model (fp32 and
  bf16, with and without autograd, eval and train with dropout);
* patched modules ``torch.jit.script`` (and save/load) and ``torch.jit.trace`` to the unpatched
  module's program: bit-identical outputs;
* modern ViT attention is converted (timm ``AttentionRope`` with grouped kv heads, ``EvaAttention``,
  ``RelPosAttention``, ``AttentionPoolLatent``; open_clip ``AttentionalPooler`` and RN50
  ``AttentionPool2d``): no-maps outputs equal, captured maps equal the float64 softmax of the very
  q / k / mask the unpatched module hands to SDPA, and ``capture_attention`` lists them;
* every attention-like module left unconverted is in the patch report (found by structure);
* Hugging Face: ``config.output_attentions`` stays refused by transformers for non-eager
  implementations, ``set_output_attentions(model)`` opts one model in.

Tiny random models (a few thousand to a few hundred thousand parameters) on CPU.
"""
from __future__ import annotations

import copy
import io
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE
from reference import reference_attention
from torch import nn

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from open_clip.modified_resnet import AttentionPool2d as OCAttentionPool2d  # noqa: E402
from open_clip.transformer import AttentionalPooler  # noqa: E402
from timm.layers import AttentionPool2d as TimmAttentionPool2d  # noqa: E402
from timm.layers import AttentionPoolLatent, AttentionRope, RotAttentionPool2d  # noqa: E402
from timm.models.eva import EvaAttention  # noqa: E402
from timm.models.vision_transformer_relpos import RelPosAttention  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.open_clip as lfi_oc  # noqa: E402
import lfi.integrations.timm as lfi_timm  # noqa: E402
from lfi.capture import attention_modules  # noqa: E402
from lfi.nn import MultiheadAttention  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.trace` is",
                                        "ignore:.*not converted to lfi")
CAPTURE = sys.modules["lfi.capture"]
MAP_ATOL = MAP_RTOL = 2e-6  # fp32 maps against the float64 softmax


def assert_equal(a, b):
    """Bit-identical tensors (or nested tuples of them)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max abs difference {(a.double() - b.double()).abs().max().item():.3g}"


def grads(model):
    return [p.grad for p in model.parameters()]


# ------------------------------------------------------------------------------------------
# Model zoo: (unpatched model, input) builders, all tiny
# ------------------------------------------------------------------------------------------
def _img(size, seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g).to(DEVICE)


TIMM_MODELS = {
    # name: (timm model, kwargs, image size); attention classes in the comment
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),  # Attention
    "vit_map": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, global_pool="map"), 32),  # + pool
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),  # EvaAttention with RoPE
    "pe_rope": ("vit_pe_core_tiny_patch16_384", dict(img_size=32, depth=2), 32),  # AttentionRope + AttentionPoolLatent
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4), 32),
}
TIMM_CONVERTED = {"vit": 2, "vit_map": 3, "eva02": 2, "pe_rope": 3, "relpos": 2}


def timm_model(key, seed=0, **extra):
    name, kw, size = TIMM_MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw, **extra).to(DEVICE), _img(size)


def clip_model(kind="vit", seed=0):
    torch.manual_seed(seed)
    text_cfg = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    if kind == "rn":
        vision_cfg = dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=32)
    else:
        vision_cfg = dict(image_size=64, patch_size=16, layers=2, width=64, head_width=16)
        if kind == "pool":
            vision_cfg.update(attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=4)
    model = open_clip.create_model("ViT-S-16", pretrained=None, embed_dim=32, vision_cfg=vision_cfg,
                                   text_cfg=text_cfg)
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def text():
    return open_clip.get_tokenizer("ViT-S-16")(["a cat", "a photo of a dog on the grass"]).to(DEVICE)


# ------------------------------------------------------------------------------------------
# 1. no maps requested: bit-identical to the unpatched model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("key", list(TIMM_MODELS))
def test_timm_no_maps_bit_identical(key, dtype):
    ref, x = timm_model(key)
    ref = ref.to(dtype).eval()
    model = copy.deepcopy(ref)
    report = lfi_timm.patch(model)
    assert len(report.patched) == TIMM_CONVERTED[key] and not report.skipped, report.summary()
    x = x.to(dtype)
    with torch.no_grad():
        assert_equal(model(x), ref(x))
    out, out_ref = model(x), ref(x)
    assert_equal(out, out_ref)
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    assert_equal(grads(model), grads(ref))


def test_timm_no_maps_bit_identical_training_with_dropout():
    """Training with attention dropout: the same SDPA calls draw the same random numbers."""
    ref, x = timm_model("vit", attn_drop_rate=0.2, proj_drop_rate=0.1)
    ref.train()
    model = copy.deepcopy(ref)
    lfi_timm.patch(model)
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    assert_equal(out, ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["vit", "pool", "rn"])
def test_open_clip_no_maps_bit_identical(kind, dtype, text):
    """Both towers (the text tower with its causal float mask), with autograd and without (where
    torch's nn.MultiheadAttention takes its inference fast path)."""
    ref = clip_model(kind).to(dtype).eval()
    model = copy.deepcopy(ref)
    report = lfi_oc.patch(model)
    assert not report.skipped, report.summary()
    assert len(report.patched) == {"vit": 4, "pool": 5, "rn": 3}[kind]
    img = _img(64).to(dtype)
    with torch.no_grad():
        assert_equal(model.encode_image(img), ref.encode_image(img))
        assert_equal(model.encode_text(text), ref.encode_text(text))
    out = model.encode_image(img).float().sum() + model.encode_text(text).float().sum()
    out_ref = ref.encode_image(img).float().sum() + ref.encode_text(text).float().sum()
    assert_equal(out, out_ref)
    out.backward()
    out_ref.backward()
    assert_equal(grads(model), grads(ref))


MHA_CASES = {
    "self_bf": (dict(batch_first=True), "self", None),
    "seq_first_kpm": (dict(batch_first=False), "cross", "kpm"),
    "kdim_vdim_mask": (dict(batch_first=True, kdim=12, vdim=20), "cross", "float"),
    "causal_bool": (dict(batch_first=True), "self", "bool"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_no_maps_bit_identical(case, dtype):
    cfg, kind, mask = MHA_CASES[case]
    torch.manual_seed(0)
    E, H, B, L, S = 16, 4, 3, 5, 7
    ref = nn.MultiheadAttention(E, H, **cfg).to(DEVICE, dtype).eval()
    mod = copy.deepcopy(ref)
    mod.__class__ = MultiheadAttention
    g = torch.Generator().manual_seed(5)
    bf = cfg["batch_first"]
    shape = (lambda n, d: (B, n, d)) if bf else (lambda n, d: (n, B, d))
    q = torch.randn(*shape(L, E), generator=g).to(DEVICE, dtype)
    k = q if kind == "self" else torch.randn(*shape(S, cfg.get("kdim", E)), generator=g).to(DEVICE, dtype)
    v = q if kind == "self" else torch.randn(*shape(S, cfg.get("vdim", E)), generator=g).to(DEVICE, dtype)
    S = k.shape[1 if bf else 0]
    kw = {}
    if mask == "kpm":
        kw["key_padding_mask"] = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kw["key_padding_mask"][1, -2:] = True
    elif mask == "float":
        kw["attn_mask"] = torch.randn(L, S, generator=g).to(DEVICE, dtype)
    elif mask == "bool":
        kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool, device=DEVICE).triu(1)  # True = masked out
    with torch.no_grad():  # torch's inference fast path where it applies
        assert_equal(mod(q, k, v, need_weights=False, **kw), ref(q, k, v, need_weights=False, **kw))
    assert_equal(mod(q, k, v, need_weights=False, **kw), ref(q, k, v, need_weights=False, **kw))


@pytest.fixture
def hf_lfi_auto():
    transformers = pytest.importorskip("transformers")
    import lfi.integrations.transformers as lfi_hf

    before = dict(lfi_hf._REGISTERED)
    lfi_hf.register(backend="auto")
    yield transformers, lfi_hf
    for name, backend in before.items():
        lfi_hf.register(name, backend=backend)


def _hf_clip(transformers, impl, seed=0):
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=8)
    text_cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg = transformers.CLIPConfig(text_config=text_cfg, vision_config=vision, projection_dim=32)
    torch.manual_seed(seed)
    return transformers.AutoModel.from_config(cfg, attn_implementation=impl).to(DEVICE)


def _hf_inputs():
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g).to(DEVICE),
                input_ids=torch.randint(2, 100, (2, 10), generator=g).to(DEVICE), attention_mask=mask.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_no_maps_bit_identical_to_sdpa(hf_lfi_auto, dtype):
    """attn_implementation="lfi" without output_attentions / capture is transformers' sdpa path."""
    transformers, _ = hf_lfi_auto
    model = _hf_clip(transformers, "lfi").to(dtype).eval()
    ref = _hf_clip(transformers, "sdpa", seed=1).to(dtype).eval()
    ref.load_state_dict(model.state_dict())
    kw = _hf_inputs()
    kw["pixel_values"] = kw["pixel_values"].to(dtype)
    out, exp = model(**kw), ref(**kw)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert_equal(out[name], exp[name])
    (out.logits_per_image.float().sum()).backward()
    (exp.logits_per_image.float().sum()).backward()
    assert_equal(grads(model), grads(ref))


# ------------------------------------------------------------------------------------------
# what runs: the original forward, or lfi (and when)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def op_calls(monkeypatch):
    """Counts the interaction_attention calls made through lfi.capture.attend."""
    seen = []
    real = CAPTURE.interaction_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(CAPTURE, "interaction_attention", spy)
    monkeypatch.delenv("LFI_BACKEND", raising=False)
    return seen


def test_lfi_runs_only_when_asked(op_calls, monkeypatch):
    ref, x = timm_model("pe_rope")
    model = copy.deepcopy(ref).eval()
    lfi_timm.patch(model)
    model(x)
    assert op_calls == []  # no maps: timm's forward only
    with lfi.capture_attention(model, layers=[0, -1], rows=0):
        model(x)
    assert op_calls == ["auto", "auto"]  # only the captured layers
    op_calls.clear()
    monkeypatch.setenv("LFI_BACKEND", "torch")  # an explicit backend asks for our kernels
    model(x)
    assert op_calls == ["auto"] * 3
    monkeypatch.delenv("LFI_BACKEND")
    op_calls.clear()
    lfi_timm.patch(model, backend="torch")
    model(x)
    assert op_calls == ["torch"] * 3


# ------------------------------------------------------------------------------------------
# 2. TorchScript: script (and save/load) and trace give the unpatched module's program
# ------------------------------------------------------------------------------------------
def _script_roundtrip(module):
    scripted = torch.jit.script(module)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)  # a fully compiled program: no Python fallbacks
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("key", ["vit", "eva02", "pe_rope", "relpos"])
def test_timm_torchscript(key):
    ref, x = timm_model(key)
    ref.eval()
    model = copy.deepcopy(ref)
    lfi_timm.patch(model)
    scripted = _script_roundtrip(model)
    with torch.no_grad():
        assert_equal(scripted(x), torch.jit.script(ref)(x))
        assert_equal(scripted(x), ref(x))
        assert_equal(torch.jit.trace(model, x)(x), ref(x))
    assert all(type(m).__name__.startswith(("Interaction", "Lfi")) for _, m in attention_modules(model))


@pytest.mark.parametrize("kind", ["vit", "pool", "rn"])
def test_open_clip_torchscript(kind, text):
    ref = clip_model(kind).eval()
    model = copy.deepcopy(ref)
    lfi_oc.patch(model)
    scripted = _script_roundtrip(model)  # used to stop on lfi's mha_supported annotation
    img = _img(64)
    with torch.no_grad():
        assert_equal(scripted.encode_image(img), ref.encode_image(img))
        assert_equal(scripted.encode_text(text), ref.encode_text(text))
        traced = torch.jit.trace(model.visual, img)
        assert_equal(traced(img), ref.visual(img))


def test_multihead_attention_torchscript():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, kdim=12, vdim=20).eval()
    mod = copy.deepcopy(ref)
    mod.__class__ = MultiheadAttention
    scripted = _script_roundtrip(mod)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 12, generator=g), torch.randn(2, 7, 20, generator=g)
    assert_equal(scripted(q, k, v), ref(q, k, v))  # need_weights=True: torch's maps when scripted
    assert_equal(scripted(q, k, v, need_weights=False), ref(q, k, v, need_weights=False))
    traced = torch.jit.trace(mod, (q, k, v))
    assert_equal(traced(q, k, v), ref(q, k, v))


# ------------------------------------------------------------------------------------------
# 3. modern ViT attention: converted modules, their maps, capture_attention
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
# the report: every attention-like module that is not converted
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


# ------------------------------------------------------------------------------------------
# Hugging Face: config.output_attentions
# ------------------------------------------------------------------------------------------
def test_transformers_output_attentions_config(hf_lfi_auto):
    transformers, lfi_hf = hf_lfi_auto
    model = _hf_clip(transformers, "lfi").eval()
    eager = _hf_clip(transformers, "eager", seed=1).eval()
    eager.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="not supported"):  # transformers' own setter, unchanged
        model.config.vision_config.output_attentions = True
    kw = _hf_inputs()
    assert model(**kw).vision_model_output.attentions is None
    assert lfi_hf.set_output_attentions(model) == 3  # CLIPConfig and its text / vision configs
    out = model(**kw)
    exp = eager(**kw, output_attentions=True)
    for tower in ("vision_model_output", "text_model_output"):
        assert len(out[tower].attentions) == 2
        for a, b in zip(out[tower].attentions, exp[tower].attentions):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    lfi_hf.set_output_attentions(model, False)
    assert model(**kw).vision_model_output.attentions is None
    sdpa = _hf_clip(transformers, "sdpa")
    with pytest.raises(ValueError, match="not an implementation registered by lfi"):
        lfi_hf.set_output_attentions(sdpa)
    with pytest.raises(ValueError, match="not supported"):
        sdpa.config.output_attentions = True
