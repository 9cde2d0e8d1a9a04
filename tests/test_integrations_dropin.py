"""Drop-in guarantees of the integrations (issue 14, parts 1, 3, 5):

* a patched timm / open_clip / Hugging Face model, and ``lfi.nn.MultiheadAttention``, whose call asks
  for no maps runs the unpatched computation: ``torch.equal`` against the unpatched model (fp32 and
  bf16, with and without autograd, eval and train with dropout); lfi's kernels run only when asked;
* patched modules ``torch.jit.script`` (and save/load) and ``torch.jit.trace`` to the unpatched
  module's program: bit-identical outputs;
* Hugging Face: ``config.output_attentions`` stays refused by transformers for non-eager
  implementations, ``set_output_attentions(model)`` opts one model in.

Modern ViT attention and the patch report: test_integrations_modern_vit.py. Tiny random models
(tests/integration_models.py) on CPU.
"""
from __future__ import annotations

import copy
import io
import logging
import sys

import pytest
import torch
from torch import nn

from helpers import DEVICE
from integration_models import TIMM_CONVERTED
from integration_models import TIMM_MODELS
from integration_models import assert_equal
from integration_models import clip_model
from integration_models import grads
from integration_models import image
from integration_models import timm_model

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

import lfi  # noqa: E402
import lfi.integrations.open_clip as lfi_oc  # noqa: E402
import lfi.integrations.timm as lfi_timm  # noqa: E402
from lfi.capture import attention_modules  # noqa: E402
from lfi.nn import MultiheadAttention  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated", "ignore:`torch.jit.trace` is",
                                        "ignore:.*not converted to lfi")
CAPTURE = sys.modules["lfi.capture"]


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
    img = image(64).to(dtype)
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
    img = image(64)
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
