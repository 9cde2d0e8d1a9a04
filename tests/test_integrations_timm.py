"""timm drop-in: lfi.nn.InteractionAttention, lfi.integrations.timm.patch/unpatch, capture_attention.

Small random-weight ViTs (img 32, patch 8: N = 17 tokens). Most tests use backend="torch";
test_triton_backend runs the Triton kernels end to end (interpreter on CPU).
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
from timm.utils import AttentionExtract  # noqa: E402

import lfi  # noqa: E402
import lfi.integrations.timm as lfi_timm  # noqa: E402
from helpers import BACKENDS  # noqa: E402
from helpers import DEVICE  # noqa: E402
from lfi.nn import InteractionAttention  # noqa: E402

ATOL = RTOL = 1e-5
GRAD_ATOL = GRAD_RTOL = 1e-4


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def tiny_vit(seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    kw = {"img_size": 32, "patch_size": 8, "depth": 2, **kw}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw).to(DEVICE)


def images(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g).to(DEVICE)


def eager_copy(model: nn.Module) -> nn.Module:
    """A copy running timm's non-fused (eager softmax) path."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, Attention):
            m.fused_attn = False
    return ref


def eager_maps(model: nn.Module, x) -> list[torch.Tensor]:
    """All layers' (B, H, N, N) maps from timm's eager path, via AttentionExtract hooks."""
    ref = eager_copy(model)
    out = AttentionExtract(ref, method="hook", mode="train" if model.training else "eval")(x)
    return list(out.values())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------
# outputs, gradients, unpatch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_patch_outputs_and_grads_match(mode):
    ref = tiny_vit()
    model = copy.deepcopy(ref)
    report = lfi_timm.patch(model, backend="torch")
    assert len(report.patched) == 2 and not report.skipped
    assert all(type(b.attn) is InteractionAttention for b in model.blocks)
    for m in (ref, model):
        m.train(mode == "train")  # all drop rates are 0
    x = images()
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(xr), model(xp)
    close(out, out_ref)
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    close(xp.grad, xr.grad, GRAD_ATOL, GRAD_RTOL)
    gr, gp = grads(ref), grads(model)
    assert gr.keys() == gp.keys()
    for n in gr:
        close(gp[n], gr[n], GRAD_ATOL, GRAD_RTOL)


def test_unpatch_restores_exactly():
    model = tiny_vit().eval()
    x = images()
    before_out = model(x)
    before_dict = {i: set(b.attn.__dict__) for i, b in enumerate(model.blocks)}
    lfi_timm.patch(model, backend="torch")
    report = lfi_timm.unpatch(model)
    assert len(report.patched) == 2
    for i, b in enumerate(model.blocks):
        assert type(b.attn) is Attention
        assert set(b.attn.__dict__) == before_dict[i]
    assert torch.equal(model(x), before_out)
    # patching twice is harmless, and a second unpatch is a no-op
    lfi_timm.patch(model)
    assert lfi_timm.patch(model).already == [f"blocks.{i}.attn" for i in range(2)]
    lfi_timm.unpatch(model)
    assert len(lfi_timm.unpatch(model).patched) == 0
    assert torch.equal(model(x), before_out)


def test_state_dict_unchanged_and_attn_layer():
    ref = tiny_vit().eval()
    built = tiny_vit(seed=5, attn_layer=InteractionAttention).eval()
    assert all(type(b.attn) is InteractionAttention for b in built.blocks)
    assert list(built.state_dict()) == list(ref.state_dict())
    built.load_state_dict(ref.state_dict())  # pretrained timm weights load unchanged
    for b in built.blocks:
        b.attn.lfi_backend = "torch"
    x = images()
    close(built(x), ref(x))
    with lfi.capture_attention(built, layers=[-1], rows=0) as maps:
        built(x)
    assert maps[-1].shape == (2, 3, 1, 17)
    lfi_timm.unpatch(built)
    assert all(type(b.attn) is Attention for b in built.blocks)
    assert torch.equal(built(x), ref(x))


# ------------------------------------------------------------------------------------------
# Attention options: qk_norm, scale_norm, gate, qkv_bias, attn_mask, is_causal
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    {},
    {"qk_norm": True, "qkv_bias": True},
    {"scale_norm": True, "qk_norm": True, "gated": True, "proj_bias": False},
], ids=["plain", "qknorm-bias", "scalenorm-gated"])
@pytest.mark.parametrize("masking", ["none", "bool", "float", "causal", "causal+mask"])
def test_attention_options(opts, masking):
    torch.manual_seed(3)
    B, N, C, H = 2, 11, 32, 4
    ref = Attention(C, num_heads=H, norm_layer=nn.LayerNorm, **opts).to(DEVICE).eval()
    for p in ref.parameters():  # non-trivial norm weights
        nn.init.normal_(p, std=0.3)
    eager = eager_copy(ref)
    mod = copy.deepcopy(ref)
    lfi_timm.patch(mod, backend="torch")
    assert type(mod) is InteractionAttention
    x = torch.randn(B, N, C, device=DEVICE)
    kw = {}
    if masking in ("bool", "causal+mask"):
        kw["attn_mask"] = torch.rand(B, 1, N, N, device=DEVICE) > 0.3
        kw["attn_mask"][..., 0] = True  # no fully masked row (timm's eager path gives NaN there)
    elif masking == "float":
        kw["attn_mask"] = torch.randn(1, H, N, N, device=DEVICE)
    if masking.startswith("causal"):
        kw["is_causal"] = True
    expected = eager(x, **kw)  # timm's eager path (is_causal wins over attn_mask)
    close(mod(x, **kw), expected)
    if masking != "causal+mask":  # SDPA rejects both at once
        close(ref(x, **kw), expected)


# ------------------------------------------------------------------------------------------
# capture_attention
# ------------------------------------------------------------------------------------------
def test_capture_matches_eager_maps():
    model = tiny_vit().eval()
    x = images()
    ref_maps = eager_maps(model, x)
    lfi_timm.patch(model, backend="torch")
    with lfi.capture_attention(model) as maps:  # all layers, all rows
        out = model(x)
    close(out, eager_copy(model)(x))
    assert list(maps.keys()) == [0, 1] and len(maps) == 2
    for i in range(2):
        assert maps[i].shape == (2, 3, 17, 17)
        close(maps[i], ref_maps[i])
        assert not maps[i].requires_grad
    assert maps.names[1] == "blocks.1.attn"
    # the CLS row of the last layer, by negative index
    with lfi.capture_attention(model, layers=[-1], rows=slice(0, 1)) as maps:
        model(x)
    assert list(maps.keys()) == [-1]
    assert maps[-1].shape == (2, 3, 1, 17)
    close(maps[-1], ref_maps[-1][:, :, :1])
    close(maps[1], maps[-1])  # the positive index reaches the same layer
    # other row specs, head mean
    for rows, sl in [(-1, slice(16, 17)), ((3, 9), slice(3, 9)), (slice(-4, None), slice(13, 17))]:
        with lfi.capture_attention(model, layers=0, rows=rows, heads="mean") as maps:
            model(x)
        close(maps[0], ref_maps[0][:, :, sl].mean(1))
    # outside the block nothing is captured any more
    assert all("_lfi_capture" not in b.attn.__dict__ for b in model.blocks)


def test_capture_grad_matches_eager():
    model = tiny_vit().train()
    lfi_timm.patch(model, backend="torch")
    ref = eager_copy(model)
    lfi_timm.unpatch(ref)
    x = images()
    # reference: a loss on the CLS row of the last eager map + the logits
    store = {}
    h = ref.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    out_ref = ref(x)
    loss_ref = out_ref.square().mean() + (store["a"][:, :, 0] * torch.linspace(0, 1, 17, device=DEVICE)).sum()
    loss_ref.backward()
    h.remove()
    with lfi.capture_attention(model, layers=[-1], rows=0, grad=True) as maps:
        out = model(x)
    assert maps[-1].requires_grad
    loss = out.square().mean() + (maps[-1][:, :, 0] * torch.linspace(0, 1, 17, device=DEVICE)).sum()
    loss.backward()
    close(loss, loss_ref)
    gr, gp = grads(ref), grads(model)
    for n in gr:
        close(gp[n], gr[n], GRAD_ATOL, GRAD_RTOL)


def test_capture_errors():
    model = tiny_vit().eval()
    with pytest.raises(ValueError, match="no attention layer"):
        with lfi.capture_attention(model):
            pass
    lfi_timm.patch(model, backend="torch")
    with pytest.raises(IndexError):
        with lfi.capture_attention(model, layers=[2]):
            pass
    with pytest.raises(ValueError, match="heads"):
        with lfi.capture_attention(model, heads="max"):
            pass
    with pytest.raises(ValueError, match="same layer"):
        with lfi.capture_attention(model, layers=[1, -1]):
            pass
    with lfi.capture_attention(model, layers=[0]):
        with pytest.raises(RuntimeError, match="already"):
            with lfi.capture_attention(model, layers=[0]):
                pass
    with lfi.capture_attention(model, layers=[0, 1]) as maps:
        model.blocks[0](model._pos_embed(model.patch_embed(images())))  # only layer 0 runs
    assert 0 in maps and 1 not in maps and len(maps) == 1
    with pytest.raises(KeyError, match="did not run"):
        maps[1]
    with lfi.capture_attention(model, rows=40) as maps:
        with pytest.raises(IndexError):
            model(images())


def test_attention_extract_on_patched_model():
    model = tiny_vit().eval()
    x = images()
    ref_maps = eager_maps(model, x)
    lfi_timm.patch(model, backend="torch")
    # hooks on attn_drop (AttentionExtract's default for method="hook")
    hooked = AttentionExtract(copy.deepcopy(model), method="hook")(x)
    assert list(hooked) == ["blocks.0.attn.attn_drop", "blocks.1.attn.attn_drop"]
    for got, want in zip(hooked.values(), ref_maps):
        close(got, want)
    # torch.fx graph extraction: the default "*attn.softmax" node pattern still matches
    fx = AttentionExtract(copy.deepcopy(model), method="fx")
    assert fx.names == ["blocks.0.attn.softmax", "blocks.1.attn.softmax"]
    out = fx(x)
    for got, want in zip(out.values(), ref_maps):
        close(got, want)


def test_attn_drop_hooks_in_training_with_dropout():
    """With hooks on attn_drop, training dropout is applied through attn_drop like timm's eager path:
    same RNG draws, so the same outputs and hooked maps for the same seed."""
    model = tiny_vit(attn_drop_rate=0.3).train()
    ref = eager_copy(model)
    lfi_timm.patch(model, backend="torch")
    x = images()
    seen = {"ref": [], "lfi": []}
    for key, m in (("ref", ref), ("lfi", model)):
        for b in m.blocks:
            b.attn.attn_drop.register_forward_hook(lambda mod, a, o, key=key: seen[key].append(o))
    torch.manual_seed(7)
    out_ref = ref(x)
    torch.manual_seed(7)
    out = model(x)
    close(out, out_ref)
    for a, b in zip(seen["lfi"], seen["ref"]):
        close(a, b)


def test_report_lists_unconverted_variants():
    """Converted classes are converted; attention-like modules of other classes (found by their
    projections / class name / SDPA call, not a list of names) are listed and left as they were."""
    from timm.layers import AttentionRope
    from timm.layers import DiffAttention

    class Mixer(nn.Module):  # no attention in its name: found by its q/k/v projections
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    model = nn.Sequential(Attention(32, num_heads=4), AttentionRope(32, num_heads=4), DiffAttention(32, num_heads=4),
                          Mixer())
    with pytest.warns(UserWarning, match="DiffAttention"):
        report = lfi_timm.patch(model)
    assert report.patched == ["0", "1"]
    assert [(n, c) for n, c, _ in report.skipped] == [("2", "DiffAttention"), ("3", "Mixer")]
    assert type(model[1]) is lfi_timm.LfiAttentionRope and type(model[2]) is DiffAttention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lfi_timm.patch(model, warn=False)


def test_dropout_in_training():
    model = tiny_vit(attn_drop_rate=0.5)
    lfi_timm.patch(model, backend="torch")
    x = images()
    model.eval()
    out_eval = model(x)
    close(out_eval, eager_copy(model)(x))
    model.train()
    torch.manual_seed(0)
    with lfi.capture_attention(model, layers=[-1]) as maps:
        out_train = model(x)
    assert not torch.allclose(out_train, out_eval, atol=1e-3)  # dropout is applied
    close(maps[-1].sum(-1), torch.ones(2, 3, 17, device=DEVICE))  # maps are taken before dropout


def test_import_lfi_is_light():
    code = ("import sys, lfi; bad = [m for m in ('timm', 'open_clip', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; lfi.capture_attention; lfi.nn; lfi.integrations; "
            "assert 'timm' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ------------------------------------------------------------------------------------------
# torch.compile and the Triton kernels
# ------------------------------------------------------------------------------------------
def test_torch_compile():
    ref = tiny_vit(depth=1).train()
    model = copy.deepcopy(ref)
    lfi_timm.patch(model, backend="torch")  # torch backend: compilable everywhere
    compiled = torch.compile(model)
    x = images()
    out_ref = ref(x)
    out = compiled(x)
    close(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    gr, gp = grads(ref), grads(model)
    for n in gr:
        close(gp[n], gr[n], GRAD_ATOL, GRAD_RTOL)
    ref_maps = eager_maps(model.train(), x)
    with lfi.capture_attention(model, rows=0, grad=True) as maps:
        compiled(x)
    close(maps[0], ref_maps[0][:, :, :1])
    maps[0].sum().backward()


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton not available")
def test_triton_backend():
    ref = tiny_vit().eval()
    model = copy.deepcopy(ref)
    lfi_timm.patch(model, backend="triton")
    x = images()
    ref_maps = eager_maps(ref, x)
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    with lfi.capture_attention(model, layers=[-1], rows=slice(0, 1), grad=True) as maps:
        out = model(xp)
    out_ref = ref(xr)
    close(out, out_ref, 1e-4, 1e-4)
    close(maps[-1], ref_maps[-1][:, :, :1], 1e-4, 1e-4)
    # gradients through the output and the maps, against the torch backend
    twin = copy.deepcopy(model)
    lfi_timm.patch(twin, backend="torch")
    xt = x.clone().requires_grad_()
    with lfi.capture_attention(twin, layers=[-1], rows=slice(0, 1), grad=True) as tmaps:
        out_t = twin(xt)
    (out.sum() + maps[-1].square().sum()).backward()
    (out_t.sum() + tmaps[-1].square().sum()).backward()
    close(xp.grad, xt.grad, 1e-4, 1e-4)
