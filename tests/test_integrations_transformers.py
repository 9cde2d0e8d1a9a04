"""Hugging Face transformers: attn_implementation="lfi" (AttentionInterface + AttentionMaskInterface).

Every model is built from a tiny random config twice (lfi and eager, same weights) and compared.
Each model gets its own deep-copied config: from_config stores the attention implementation on the
config object it is given.
"""
from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModel  # noqa: E402
from transformers import CLIPConfig  # noqa: E402
from transformers import Dinov2Config  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from transformers import SiglipConfig  # noqa: E402
from transformers import ViTConfig  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.transformers as lfi_hf  # noqa: E402
from helpers import DEVICE  # noqa: E402

ATOL = RTOL = 1e-5
GRAD_ATOL = GRAD_RTOL = 1e-4

VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
CONFIGS = {
    "vit": lambda: ViTConfig(**VISION),
    "dinov2": lambda: Dinov2Config(**VISION),
    "clip": lambda: CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32),
    "siglip": lambda: SiglipConfig(text_config=TEXT, vision_config=VISION),
}
HAS_TEXT = {"clip", "siglip"}


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.fixture(scope="module", autouse=True)
def registered():
    lfi_hf.register(backend="torch")
    yield
    lfi_hf.register(backend="auto")


def build(name: str, impl: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModel.from_config(copy.deepcopy(CONFIGS[name]()), attn_implementation=impl).to(DEVICE)


def pair(name: str):
    model = build(name, "lfi")
    ref = build(name, "eager", seed=1)
    ref.load_state_dict(model.state_dict())
    assert model.config._attn_implementation == "lfi" and ref.config._attn_implementation == "eager"
    return model, ref


def model_inputs(name: str, padded: bool = True):
    g = torch.Generator().manual_seed(2)
    kw = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g).to(DEVICE)}
    if name in HAS_TEXT:
        kw["input_ids"] = torch.randint(2, 100, (2, 10), generator=g).to(DEVICE)
        if padded:
            mask = torch.ones(2, 10, dtype=torch.long)
            mask[1, 6:] = 0
            kw["attention_mask"] = mask.to(DEVICE)
    return kw


def flat(out) -> dict[str, torch.Tensor]:
    """Every tensor in a (nested) ModelOutput, keyed by path."""
    res = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            res[prefix] = obj
        elif isinstance(obj, (tuple, list)):
            for i, o in enumerate(obj):
                walk(f"{prefix}.{i}", o)
        elif hasattr(obj, "keys"):
            for k in obj.keys():
                walk(f"{prefix}.{k}", obj[k])

    walk("", out)
    return res


def attentions(out) -> list[torch.Tensor]:
    return [v for k, v in flat(out).items() if ".attentions." in k or k.startswith(".attentions")]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_attentions_match_eager(name, mode):
    model, ref = pair(name)
    for m in (model, ref):
        m.train(mode == "train")  # attention dropout is 0 in these configs
    kw = model_inputs(name)
    out = flat(model(**kw, output_attentions=True))
    exp = flat(ref(**kw, output_attentions=True))
    assert out.keys() == exp.keys()
    n_att = sum(".attentions." in k or k.startswith(".attentions") for k in out)
    assert n_att == (4 if name in HAS_TEXT else 2)
    for k in exp:
        close(out[k], exp[k])
    # without output_attentions: same outputs, no maps computed or returned
    plain = model(**kw)
    assert not attentions(plain)


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_gradients_match_eager(name):
    model, ref = pair(name)
    model.train()
    ref.train()
    kw = model_inputs(name)
    for m in (model, ref):
        out = m(**kw, output_attentions=True)
        loss = sum(t.float().square().mean() for t in flat(out).values() if t.is_floating_point())
        loss.backward()  # through the outputs and through every returned map
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        if pr.grad is None:
            assert p.grad is None, n
            continue
        close(p.grad, pr.grad, GRAD_ATOL, GRAD_RTOL)


def retained_maps_grads(model, kw, seed: int) -> list[torch.Tensor]:
    """w.grad of every returned map (B, H, Q, KV) after a backward from a random linear loss on the
    outputs only, never on the maps: what transformers' test_retain_grad_hidden_states_attentions and
    attention x gradient attribution rely on. An entry is None when that map does not feed the outputs."""
    out = model(**kw, output_attentions=True)
    maps = attentions(out)
    for w in maps:
        w.retain_grad()
    g = torch.Generator().manual_seed(seed)
    map_ids = {id(w) for w in maps}
    tensors = [t for t in flat(out).values() if t.is_floating_point() and t.requires_grad and id(t) not in map_ids]
    sum((t * torch.randn(t.shape, generator=g).to(t)).sum() for t in tensors).backward()
    return [w.grad for w in maps]


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_retained_maps_grads_match_eager(name):
    """out.attentions[i].retain_grad() then backward from the outputs: w.grad equals eager's (the maps
    feed the outputs as eager's do, through lfi's attention_pv), train mode included."""
    model, ref = pair(name)
    model.train()
    ref.train()  # attention dropout is 0 in these configs
    kw = model_inputs(name)
    got, exp = retained_maps_grads(model, kw, seed=3), retained_maps_grads(ref, kw, seed=3)
    assert len(got) == len(exp) == (4 if name in HAS_TEXT else 2)
    for g, e in zip(got, exp):
        assert g is not None, "returned maps are not on the autograd path of the outputs"
        close(g, e, GRAD_ATOL, GRAD_RTOL)


def test_retained_maps_grads_with_attention_dropout():
    """transformers' testers train with attention dropout 0.1: out = dropout(w) @ v depends on w, so
    w.retain_grad() must see a gradient from a loss on the outputs, as with eager."""
    cfg = ViTConfig(**VISION, attention_probs_dropout_prob=0.5)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation="lfi").to(DEVICE).train()
    grads = retained_maps_grads(model, model_inputs("vit"), seed=3)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_padding_mask_is_honoured(name):
    """The registered mask function must deliver padding masks (else they are silently dropped)."""
    model, ref = pair(name)
    model.eval()
    ref.eval()
    kw = model_inputs(name, padded=True)
    tm, tr = model.text_model, ref.text_model
    out = tm(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]).last_hidden_state
    close(out, tr(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"]).last_hidden_state)
    unpadded = tm(input_ids=kw["input_ids"]).last_hidden_state
    assert not torch.allclose(out[1], unpadded[1], atol=1e-3)  # the padding mask changes row 1
    close(out[0], unpadded[0])                                   # and nothing else


def test_is_causal_is_honoured(monkeypatch):
    """CLIP's text tower passes no mask (the sdpa mask is skipped) and is_causal=True instead."""
    model, ref = pair("clip")
    model.eval()
    ref.eval()
    seen = []
    capture_module = sys.modules["lfi.capture"]  # lfi.capture.attend runs the op for every integration
    real = capture_module.interaction_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *a, **kw):
        seen.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask, dropout_p, is_causal, *a, **kw)

    monkeypatch.setattr(capture_module, "interaction_attention", spy)
    ids = model_inputs("clip", padded=False)["input_ids"]
    with lfi.capture_attention(model.text_model, rows=None) as maps:
        out = model.text_model(input_ids=ids).last_hidden_state
    assert seen == [(True, True)] * 2
    close(out, ref.text_model(input_ids=ids).last_hidden_state)
    assert torch.all(maps[0].triu(1) == 0)


def test_gqa_causal_with_padding():
    """A decoder (Llama) with grouped-query heads, causal masking and left padding."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="lfi").to(DEVICE).eval()
    ref = AutoModel.from_config(copy.deepcopy(cfg), attn_implementation="eager").to(DEVICE).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 9)).to(DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0  # left padding
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    exp = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    valid = mask.bool()
    close(out.last_hidden_state[valid], exp.last_hidden_state[valid])
    for a, b in zip(out.attentions, exp.attentions):
        close(a[1], b[1])
        close(a[0][:, 3:], b[0][:, 3:])
    close(model(input_ids=ids[1:]).last_hidden_state, ref(input_ids=ids[1:]).last_hidden_state)


@pytest.mark.parametrize("name", ["vit", "siglip", "dinov2"])
def test_capture_attention(name):
    model, ref = pair(name)
    model.eval()
    ref.eval()
    kw = model_inputs(name)
    exp = attentions(ref(**kw, output_attentions=True))
    mods = lfi.capture.attention_modules(model)
    assert len(mods) == len(exp)
    with lfi.capture_attention(model, layers=[0, -1], rows=slice(0, 2)) as maps:
        model(**kw)
    close(maps[0], exp[0][:, :, :2])
    close(maps[-1], exp[-1][:, :, :2])
    with lfi.capture_attention(model, layers=-1, heads="mean", grad=True) as maps:
        out = model(**kw)
    close(maps[-1], exp[-1].mean(1))
    assert maps[-1].requires_grad
    (maps[-1].square().sum() + sum(t.sum() for t in flat(out).values())).backward()


def test_capture_grad_matches_eager():
    model, ref = pair("vit")
    model.train()
    ref.train()
    kw = model_inputs("vit")
    out = ref(**kw, output_attentions=True)
    (out.attentions[-1][:, :, 0].square().sum() + out.last_hidden_state.mean()).backward()
    with lfi.capture_attention(model, layers=[-1], rows=0, grad=True) as maps:
        out = model(**kw)
    (maps[-1].square().sum() + out.last_hidden_state.mean()).backward()
    for (n, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        if pr.grad is not None:
            close(p.grad, pr.grad, GRAD_ATOL, GRAD_RTOL)


def test_register_unregister_and_eager_models_are_not_captured():
    assert lfi_hf.is_registered()
    assert "lfi" in transformers.AttentionInterface()
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert "lfi" in ALL_MASK_ATTENTION_FUNCTIONS
    ref = build("vit", "eager")
    with pytest.raises(ValueError, match="no attention layer"):
        with lfi.capture_attention(ref):
            pass
    lfi_hf.register("lfi_test", backend="torch")
    try:
        model = build("vit", "lfi_test")
        with lfi.capture_attention(model, layers=-1) as maps:
            model(**model_inputs("vit"))
        assert maps[-1].shape == (2, 4, 17, 17)
    finally:
        lfi_hf.unregister("lfi_test")
    assert not lfi_hf.is_registered("lfi_test")
    with pytest.raises(ValueError):
        lfi_hf.register("lfi", backend="cuda-please")


def test_missing_transformers_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "lfi.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'lfi\[integrations\]'"):
        importlib.import_module("lfi.integrations.transformers")
