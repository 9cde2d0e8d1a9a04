"""backend="auto" routes calls that want no maps to F.scaled_dot_product_attention (issue 10, part 4).

The rule (lfi._dispatch.routes_to_sdpa): backend="auto" with LFI_BACKEND unset or "auto", CPU or
CUDA tensors, need_weights=False, no kl_target, no attn_mask, is_causal only with M == N, H != Hkv
only where SDPA takes enable_gqa. Routed calls must be bit-identical (outputs and gradients) to a
direct SDPA call with the same arguments. Each condition is tested on both sides, by spying on
which implementation runs: F.scaled_dot_product_attention as the op module calls it, our forward
kernels (the body of the custom op lfi::interaction_attention_fwd, with the backend it was given),
and the eager dropout path. (Our kernels called in plain eager mode without the custom-op
dispatcher, issue 10 part 5: test_eager_fast_path.py.)
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import BACKEND_PARAMS
from helpers import DEVICE
from helpers import GRAD_TOL
from helpers import backend_params
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from helpers import run_and_compare
from lfi import _dispatch
from lfi.ops import interaction_attention

OPS_MODULE = sys.modules["lfi.ops.interaction_attention"]


@pytest.fixture
def calls(monkeypatch):
    """Records, in order, "sdpa", "op:<backend>" (our forward kernels, as the custom op
    lfi::interaction_attention_fwd or its eager fast path run them) and "eager_dropout"."""
    seen: list[str] = []
    real_sdpa = F.scaled_dot_product_attention
    real_op = OPS_MODULE._forward_kernels
    real_dropout = OPS_MODULE.reference.attention_with_dropout

    def sdpa(*args, **kwargs):
        seen.append("sdpa")
        return real_sdpa(*args, **kwargs)

    def op(*args, **kwargs):
        seen.append(f"op:{args[9]}")
        return real_op(*args, **kwargs)

    def dropout(*args, **kwargs):
        seen.append("eager_dropout")
        return real_dropout(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(OPS_MODULE, "_forward_kernels", op)
    monkeypatch.setattr(OPS_MODULE.reference, "attention_with_dropout", dropout)
    monkeypatch.delenv("LFI_BACKEND", raising=False)
    return seen


def _auto() -> str:
    """The backend "auto" runs when a call is not routed (torch on CPU, triton on CUDA)."""
    return _dispatch.resolve("auto", DEVICE)


def _qkv(B=2, H=2, Hkv=2, M=9, N=9, D=16, *, seed="qkv", requires_grad=False, dtype=torch.float32):
    return make_qkv(B, H, Hkv, M, N, D, gen=make_gen("sdpa_routing", seed), requires_grad=requires_grad,
                    dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Which implementation runs
# --------------------------------------------------------------------------------------------------

ROUTED = {
    # id: (q/k/v shape kwargs, call kwargs)
    "self": (dict(), dict()),
    "cross_M_ne_N": (dict(M=5, N=13), dict()),
    "causal_M_eq_N": (dict(M=11, N=11), dict(is_causal=True)),
    "dropout": (dict(), dict(dropout_p=0.3)),
    "dropout_causal": (dict(M=7, N=7), dict(dropout_p=0.2, is_causal=True)),
    "gqa": (dict(H=4, Hkv=2, M=6, N=10), dict()),
    "gqa_causal_dropout": (dict(H=4, Hkv=1, M=8, N=8), dict(is_causal=True, dropout_p=0.1)),
    "scale": (dict(M=4, N=12), dict(scale=0.3)),
    "scale_int": (dict(M=4, N=12), dict(scale=1)),
    "Dv_ne_D": (dict(M=4, N=12), dict(), ),
    "is_causal_false_explicit": (dict(), dict(is_causal=False)),
    "need_weights_false_explicit": (dict(), dict(need_weights=False)),
}


@pytest.mark.parametrize("case", list(ROUTED))
def test_routed_to_sdpa(calls, case):
    shape, kw = ROUTED[case]
    q, k, v = _qkv(seed=case, **shape)
    if case == "Dv_ne_D":
        v = randn((2, 2, 12, 24), make_gen("dv", case))
    interaction_attention(q, k, v, **kw)
    assert calls == ["sdpa"]


@pytest.mark.parametrize("env", [None, "auto", ""], ids=["unset", "auto", "empty"])
def test_routed_with_lfi_backend_auto(calls, monkeypatch, env):
    if env is not None:
        monkeypatch.setenv("LFI_BACKEND", env)
    q, k, v = _qkv()
    interaction_attention(q, k, v, backend="auto")
    assert calls == ["sdpa"]


def _mask(kind, M, N):
    g = make_gen("mask", kind)
    if kind == "bool":
        return (torch.rand(M, N, generator=g) < 0.8).to(DEVICE)
    return torch.randn(1, 1, M, N, generator=g).to(DEVICE)


NOT_ROUTED = {
    # id: (q/k/v shape kwargs, call kwargs (a callable gets (q, k, v)), expected calls; "op:auto"
    # stands for the backend auto picks)
    "need_weights": (dict(), dict(need_weights=True), ["op:auto"]),
    "need_weights_rows": (dict(), dict(need_weights=True, weights_rows=(2, 5)), ["op:auto"]),
    "average_weights": (dict(), dict(need_weights=True, average_attn_weights=True), ["op:auto"]),
    "kl_target": (dict(M=5, N=13), lambda q, k, v: dict(kl_target=torch.softmax(
        randn((2, 1, 5, 13), make_gen("t")), -1)), ["op:auto"]),
    "bool_mask": (dict(), lambda q, k, v: dict(attn_mask=_mask("bool", 9, 9)), ["op:auto"]),
    "float_mask": (dict(), lambda q, k, v: dict(attn_mask=_mask("float", 9, 9)), ["op:auto"]),
    "all_true_bool_mask": (dict(), lambda q, k, v: dict(attn_mask=torch.ones(9, 9, dtype=torch.bool,
                                                                             device=DEVICE)), ["op:auto"]),
    "causal_M_lt_N": (dict(M=5, N=13), dict(is_causal=True), ["op:auto"]),
    "causal_M_gt_N": (dict(M=13, N=5), dict(is_causal=True), ["op:auto"]),
    "explicit_torch": (dict(), dict(backend="torch"), ["op:torch"]),
    "explicit_torch_dropout": (dict(), dict(backend="torch", dropout_p=0.3), ["eager_dropout"]),
    "dropout_with_maps": (dict(), dict(dropout_p=0.3, need_weights=True), ["eager_dropout"]),
    "dropout_with_mask": (dict(), lambda q, k, v: dict(dropout_p=0.3, attn_mask=_mask("bool", 9, 9)),
                          ["eager_dropout"]),
}


@pytest.mark.parametrize("case", list(NOT_ROUTED))
def test_not_routed(calls, case):
    shape, kw, want = NOT_ROUTED[case]
    q, k, v = _qkv(seed=case, **shape)
    if callable(kw):
        kw = kw(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # dropout on a non-torch backend falls back, warning once
        interaction_attention(q, k, v, **kw)
    assert calls == [c.replace("op:auto", f"op:{_auto()}") for c in want]


@pytest.mark.parametrize("backend", backend_params(exclude=("torch",)))
def test_explicit_backend_is_never_routed(calls, backend):
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the once-per-process dropout fallback warning
        interaction_attention(q, k, v, backend=backend)
        interaction_attention(q, k, v, dropout_p=0.2, backend=backend)
    assert calls == [f"op:{backend}", "eager_dropout"]


@pytest.mark.parametrize("env", BACKEND_PARAMS)
def test_lfi_backend_env_forces_our_kernels(calls, monkeypatch, env):
    monkeypatch.setenv("LFI_BACKEND", env)
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interaction_attention(q, k, v)
        interaction_attention(q, k, v, dropout_p=0.2)
    assert calls == [f"op:{env}", "eager_dropout"]


def test_lfi_backend_env_invalid_still_raises(calls, monkeypatch):
    monkeypatch.setenv("LFI_BACKEND", "flash")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="LFI_BACKEND"):
        interaction_attention(q, k, v)
    assert calls == []


def test_gqa_needs_enable_gqa(calls, monkeypatch):
    """Without SDPA's enable_gqa (torch < 2.5) grouped-query calls stay on our kernels."""
    monkeypatch.setattr(_dispatch, "SDPA_GQA", False)
    q, k, v = _qkv(H=4, Hkv=2)
    interaction_attention(q, k, v)
    q, k, v = _qkv(H=2, Hkv=2)
    interaction_attention(q, k, v)
    assert calls == [f"op:{_auto()}", "sdpa"]


def test_installed_torch_has_enable_gqa():
    assert _dispatch.SDPA_GQA  # torch >= 2.5 everywhere this project installs


def test_bad_inputs_are_rejected_before_routing(calls):
    """A routed call checks its inputs exactly like any other: SDPA would take D = 300."""
    q, k, v = _qkv(D=300)
    with pytest.raises(ValueError, match="256"):
        interaction_attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        interaction_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        interaction_attention(q, k, v, backend="flash")
    assert calls == []


def test_rule_as_a_function(monkeypatch):
    monkeypatch.delenv("LFI_BACKEND", raising=False)
    cpu = torch.device("cpu")
    base = dict(need_weights=False, kl_target=False, attn_mask=False, is_causal=False, M=4, N=4, H=2, Hkv=2)
    assert _dispatch.routes_to_sdpa("auto", cpu, **base)
    assert _dispatch.routes_to_sdpa("auto", torch.device("cuda"), **base)
    assert not _dispatch.routes_to_sdpa("auto", torch.device("meta"), **base)
    for backend in ("torch", "triton", "cuda", "Torch", None):
        assert not _dispatch.routes_to_sdpa(backend, cpu, **base)
    for key in ("need_weights", "kl_target", "attn_mask"):
        assert not _dispatch.routes_to_sdpa("auto", cpu, **{**base, key: True})
    assert _dispatch.routes_to_sdpa("auto", cpu, **{**base, "is_causal": True})
    assert not _dispatch.routes_to_sdpa("auto", cpu, **{**base, "is_causal": True, "M": 3})
    assert _dispatch.routes_to_sdpa("auto", cpu, **{**base, "M": 3})
    assert _dispatch.routes_to_sdpa("auto", cpu, **{**base, "H": 4}) == _dispatch.SDPA_GQA


# --------------------------------------------------------------------------------------------------
# Bit-identity with direct SDPA calls: outputs and gradients
# --------------------------------------------------------------------------------------------------

IDENTITY = {
    "self": (dict(), dict()),
    "cross": (dict(M=5, N=13), dict()),
    "causal": (dict(M=11, N=11), dict(is_causal=True)),
    "scale": (dict(M=4, N=12), dict(scale=0.3)),
    "gqa": (dict(H=4, Hkv=2, M=6, N=10), dict()),
    "gqa_causal": (dict(H=6, Hkv=2, M=7, N=7), dict(is_causal=True, scale=0.2)),
    "dropout": (dict(M=6, N=10), dict(dropout_p=0.3)),
    "dropout_gqa_causal": (dict(H=4, Hkv=1, M=8, N=8), dict(dropout_p=0.25, is_causal=True)),
    "fp64": (dict(dtype=torch.float64), dict()),
    "bf16": (dict(dtype=torch.bfloat16, M=5, N=13), dict()),
    "fp16_dropout": (dict(dtype=torch.float16), dict(dropout_p=0.1)),
}


def _sdpa_args(kw, gqa):
    args = (None, kw.get("dropout_p", 0.0), kw.get("is_causal", False))
    extra = {"scale": kw.get("scale")}
    if gqa:
        extra["enable_gqa"] = True
    return args, extra


@pytest.mark.parametrize("case", list(IDENTITY))
def test_bit_identical_to_sdpa(case):
    shape, kw = IDENTITY[case]
    q, k, v = _qkv(seed=("id", case), requires_grad=True, **shape)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    args, extra = _sdpa_args(kw, q.shape[1] != k.shape[1])
    torch.manual_seed(11)
    out = interaction_attention(q, k, v, **kw)
    torch.manual_seed(11)
    want = F.scaled_dot_product_attention(q2, k2, v2, *args, **extra)
    assert torch.equal(out, want)
    g = randn(out.shape, make_gen("grad", case), dtype=out.dtype)
    out.backward(g)
    want.backward(g)
    for name, a, b in (("q", q, q2), ("k", k, k2), ("v", v, v2)):
        _assert_same_grad(a.grad, b.grad, name)


def _assert_same_grad(a, b, name=""):
    """Bit-identical on CPU; on CUDA SDPA's own backward may accumulate with atomics (flash,
    memory-efficient), so two identical calls agree only to rounding."""
    if a.is_cuda:
        atol, rtol = GRAD_TOL[a.dtype]
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)
    else:
        assert torch.equal(a, b), name


def test_bit_identical_3d_inputs():
    """(B, L, E) inputs are passed to SDPA as given (SDPA takes them too)."""
    g = make_gen("3d")
    q, k, v = (randn(s, g, requires_grad=True) for s in ((2, 7, 16), (2, 11, 16), (2, 11, 8)))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    out = interaction_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    want = F.scaled_dot_product_attention(q2, k2, v2, dropout_p=0.2)
    assert out.shape == (2, 7, 8) and torch.equal(out, want)
    out.sum().backward()
    want.sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        _assert_same_grad(a.grad, b.grad)


def test_scale_none_stays_none(monkeypatch):
    """scale=None reaches SDPA as None (SDPA computes its default); a given scale as a float."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("scale", "absent"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.delenv("LFI_BACKEND", raising=False)
    q, k, v = _qkv()
    interaction_attention(q, k, v)
    interaction_attention(q, k, v, scale=0.5)
    assert seen == [None, 0.5]


def test_routed_matches_float64_reference():
    """Routing keeps our semantics: the routed result agrees with the float64 reference."""
    gen = make_gen("routed_ref")
    q, k, v = make_qkv(2, 4, 2, 10, 10, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, is_causal=True, need_weights=False, loss="out", gen=gen)
    q, k, v = make_qkv(2, 2, 2, 5, 19, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, scale=0.4, need_weights=False, loss="out", gen=gen)


def test_dropout_on_auto_is_sdpa_without_warning(calls):
    """dropout_p > 0 on auto without maps: SDPA's dropout, no eager fallback, no warning (also in a
    process where the fallback warning was never shown)."""
    q, k, v = _qkv(requires_grad=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = interaction_attention(q, k, v, dropout_p=0.4)
        out.sum().backward()
    assert calls == ["sdpa"]
    assert not [r for r in rec if issubclass(r.category, UserWarning)], [str(r.message) for r in rec]
    with torch.no_grad():
        plain = interaction_attention(q, k, v)
    assert not torch.allclose(out, plain)  # dropout was applied


# --------------------------------------------------------------------------------------------------
# torch.compile: the rule is plain Python on static properties
# --------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_routed_and_not():
    def f(q, k, v, mask):
        a = interaction_attention(q, k, v, is_causal=True)                     # routed
        b, w = interaction_attention(q, k, v, mask, need_weights=True)         # our kernels
        return a + b, w

    q, k, v = _qkv(M=9, N=9, requires_grad=True, seed="compile")
    mask = _mask("bool", 9, 9)
    torch._dynamo.reset()
    got, w = torch.compile(f, fullgraph=True)(q, k, v, mask)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want, w_want = f(q2, k2, v2, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_want, atol=1e-5, rtol=1e-5)
    (got.sum() + w.sum()).backward()
    (want.sum() + w_want.sum()).backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Integrations: patched modules default to backend="auto" and route when no maps are captured
# --------------------------------------------------------------------------------------------------

def test_timm_patch_routes_without_capture(calls):
    timm = pytest.importorskip("timm")
    import lfi
    import lfi.integrations.timm as lfi_timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2).to(DEVICE).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            depth=2).to(DEVICE).eval()
    ref.load_state_dict(model.state_dict())
    lfi_timm.patch(model)
    x = torch.randn(2, 3, 32, 32, generator=make_gen("img")).to(DEVICE)
    with torch.no_grad():
        out = model(x)
        assert calls == ["sdpa", "sdpa"]
        out_ref = ref(x)  # timm's own fused path: the same SDPA calls
    assert torch.equal(out, out_ref)
    calls.clear()
    with torch.no_grad(), lfi.capture_attention(model, layers=[-1], rows=slice(0, 1)):
        model(x)
    assert calls == ["sdpa", f"op:{_auto()}"]  # only the captured layer runs our kernels


def test_multihead_attention_routes_without_weights(calls):
    from lfi.nn import MultiheadAttention

    torch.manual_seed(0)
    mha = MultiheadAttention(32, 4, batch_first=True).to(DEVICE)
    x = torch.randn(2, 7, 32, generator=make_gen("mha")).to(DEVICE)
    mha(x, x, x, need_weights=False)
    assert calls == ["sdpa"]
    calls.clear()
    mha(x, x, x, need_weights=True)
    assert calls == [f"op:{_auto()}"]
