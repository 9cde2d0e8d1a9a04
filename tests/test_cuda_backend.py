"""backend="cuda": the C++/CUDA extension lfi_C (csrc/), loaded by lfi.backends.cuda._ext.

(a) the extension JIT-compiles and links with the CUDA sources (nvcc, TORCH_CUDA_ARCH_LIST) and
    loads; skipped only where nvcc is absent. The build is cached (torch's extension directory),
    so only a cold cache pays the compile (minutes on 2 cores);
(b) the CPU kernels of the extension against float64 references: interaction_attention (shapes,
    dtypes, masks, causal, fully masked rows, maps / weights_rows / averaging, strided inputs, mask
    gradients, fused KL), attention_kl, attention_kl_qk, and opcheck of the custom ops with
    backend="cuda";
(c) the same comparisons on a GPU with the CUDA kernels (skipped without a GPU);
(d) opt-in (LFI_TEST_CUDA_EMULATOR=1): the CUDA kernels compiled as host C++ against a CPU
    emulator of threads, barriers and warp shuffles (csrc/emu), against the reference -- the only
    way to execute the CUDA code paths on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

from helpers import (
    DTYPE_IDS, assert_close, bool_mask, detached64, float_mask, make_gen, make_qkv, randn, run_and_compare,
)
from lfi.backends.cuda import _ext
from lfi.ops import attention_kl, attention_kl_qk, interaction_attention
from test_attention_kl import HUGE_ROWS, check_huge_magnitude_rows
from test_attention_kl_qk import check_huge_magnitude_rows_qk

HAS_GPU = torch.cuda.is_available()
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False): the CUDA kernels are only compiled here"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="gpu", marks=pytest.mark.skipif(not HAS_GPU, reason=NO_GPU)),
]


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Builds (once, cached) and loads the extension; skips only when a tool is missing."""
    if not _ext.is_loaded() and _ext.PROBE["aot"] is None and _ext.PROBE["build_problem"] is not None:
        pytest.skip(f"cannot build the lfi_C extension here: {_ext.PROBE['build_problem']}")
    _ext.load()
    return _ext.extension_info()


def _dtypes(device):
    return [torch.float16, torch.bfloat16, torch.float32] + ([torch.float64] if device == "cpu" else [])


# ------------------------------------------------------------------------------------------------
# (a) build
# ------------------------------------------------------------------------------------------------

def test_extension_built_with_cuda(extension):
    """The CUDA sources compiled (nvcc, TORCH_CUDA_ARCH_LIST, default "8.0;9.0" without a GPU),
    linked and loaded: the CUDA kernels are registered for the CUDA dispatch key."""
    if _ext.cuda_home() is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA sources cannot be compiled here")
    if os.environ.get("LFI_CUDA_EXT_CUDA", "1") == "0":
        pytest.skip("LFI_CUDA_EXT_CUDA=0 asks for a CPU-only build")
    info = extension
    assert info["built"] and info["error"] is None
    assert info["cuda"], f"the extension was built without its CUDA kernels: {info}"
    assert info["archs"] and all(int(a) >= 800 for a in info["archs"]), info["archs"]
    if info["how"] == "jit" and not HAS_GPU and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        pytest.fail("TORCH_CUDA_ARCH_LIST should have been set for the build")
    for op in ("attention_fwd", "attention_bwd", "kl_fwd", "kl_bwd", "kl_qk_fwd", "kl_qk_bwd"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lfi_C::{op}", key), (op, key)
    assert "cuda=1" in torch.ops.lfi_C.build_info()


def test_extension_info_and_dispatch(extension):
    from lfi import _dispatch

    info = _ext.extension_info()
    for key in ("built", "how", "path", "cuda", "archs", "error", "build_seconds"):
        assert key in info
    assert info["how"] in ("aot", "jit") and os.path.exists(info["path"])
    assert _dispatch.backend_status("cpu")["cuda"][0]
    assert _dispatch.resolve("cuda", torch.device("cpu")) == "cuda"
    assert "cuda" in _dispatch.BACKENDS
    # "auto" never picks the extension for CPU tensors.
    assert _dispatch.resolve("auto", torch.device("cpu")) in ("torch", "triton")


def test_float64_on_gpu_is_a_clear_error():
    if not HAS_GPU:
        pytest.skip(NO_GPU)
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        interaction_attention(q, q, q, backend="cuda")


# ------------------------------------------------------------------------------------------------
# (b, c) interaction_attention
# ------------------------------------------------------------------------------------------------

SHAPES = [
    dict(id="M5_N37_D64", B=2, H=2, Hkv=2, M=5, N=37, D=64),
    dict(id="M40_N17_D40_gqa2-1", B=1, H=2, Hkv=1, M=40, N=17, D=40),
    dict(id="M1_N1_D16", B=1, H=1, Hkv=1, M=1, N=1, D=16),
    dict(id="M7_N1_D16_gqa", B=2, H=4, Hkv=2, M=7, N=1, D=16),
    dict(id="M1_N300_D80", B=1, H=2, Hkv=2, M=1, N=300, D=80),
    dict(id="M33_N197_D128_gqa4-1", B=1, H=4, Hkv=1, M=33, N=197, D=128),
    dict(id="M12_N29_D40_Dv24", B=1, H=2, Hkv=2, M=12, N=29, D=40, Dv=24),
    dict(id="M9_N45_D256", B=1, H=1, Hkv=1, M=9, N=45, D=256),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_shapes(device, case):
    gen = make_gen("cuda-shapes", case["id"])
    q, k, v = make_qkv(case["B"], case["H"], case["Hkv"], case["M"], case["N"], case["D"], case.get("Dv"),
                       gen=gen, device=device, requires_grad=True)
    run_and_compare("cuda", q, k, v, need_weights=True, gen=gen)


DTYPE_CASES = [
    dict(id="plain", B=2, H=2, Hkv=2, M=5, N=37, D=64, mask=None, causal=False, rows=None),
    dict(id="gqa_causal_bool", B=1, H=2, Hkv=1, M=40, N=17, D=40, mask="bool", causal=True, rows=None),
    dict(id="float_rows_deadrow", B=1, H=2, Hkv=2, M=20, N=140, D=80, mask="float", causal=False, rows=(3, 18)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in DTYPE_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device", DEVICES)
def test_dtypes(device, dtype, case):
    if dtype not in _dtypes(device):
        pytest.skip("float64 runs on the CPU kernels only")
    gen = make_gen("cuda-dtypes", DTYPE_IDS[dtype], case["id"])
    B, H, Hkv, M, N, D = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D"))
    q, k, v = make_qkv(B, H, Hkv, M, N, D, dtype=dtype, gen=gen, device=device, requires_grad=True)
    mask = None
    if case["mask"] == "bool":
        mask = bool_mask((B, 1, M, N), gen, device=device)
    elif case["mask"] == "float":
        mask = float_mask((1, H, M, N), gen, dtype=dtype, device=device)
        mask[0, 1, 5] = float("-inf")  # a fully masked row inside the returned map rows
    run_and_compare("cuda", q, k, v, mask, is_causal=case["causal"], need_weights=True, rows=case["rows"],
                    gen=gen)


MASK_SHAPES = {"N": (37,), "B11N": (2, 1, 1, 37), "1HMN": (1, 2, 13, 37), "B1M1": (2, 1, 13, 1)}


@pytest.mark.parametrize("shape_id", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("device", DEVICES)
def test_masks(device, kind, shape_id):
    gen = make_gen("cuda-masks", kind, shape_id)
    q, k, v = make_qkv(2, 2, 1, 13, 37, 32, gen=gen, device=device, requires_grad=True)
    shape = MASK_SHAPES[shape_id]
    mask = bool_mask(shape, gen, device=device) if kind == "bool" else float_mask(shape, gen, device=device)
    run_and_compare("cuda", q, k, v, mask, need_weights=True, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_float_mask_huge_values(device):
    """Rows at -1e30 or finfo.min everywhere are uniform (as in SDPA), not masked; such values on
    some keys give them probability 0 (the row statistics (m, log l) are kept apart)."""
    gen = make_gen("cuda-huge")
    B, H, M, N = 1, 2, 6, 20
    q, k, v = make_qkv(B, H, H, M, N, 16, gen=gen, device=device, requires_grad=True)
    mask = float_mask((M, N), gen, device=device)
    fmin = torch.finfo(torch.float32).min
    mask[1] = -1e30
    mask[3, ::2] = -1e30
    mask[4] = fmin
    mask[5, 5:] = fmin
    _, w, _ = run_and_compare("cuda", q, k, v, mask, need_weights=True, gen=gen)
    uniform = torch.full((B, H, N), 1.0 / N, dtype=torch.float64)
    for row in (1, 4):
        torch.testing.assert_close(w[:, :, row].double().cpu(), uniform)


@pytest.mark.parametrize("M,N,mask", [(16, 16, None), (5, 37, None), (40, 17, "bool"), (37, 20, "float"),
                                      (1, 9, None), (9, 1, None), (70, 150, "bool")])
@pytest.mark.parametrize("device", DEVICES)
def test_causal(device, M, N, mask):
    gen = make_gen("cuda-causal", M, N, mask)
    B, H = 1, 2
    q, k, v = make_qkv(B, H, 1, M, N, 32, gen=gen, device=device, requires_grad=True)
    m = None
    if mask == "bool":
        m = bool_mask((B, H, M, N), gen, device=device)
    elif mask == "float":
        m = float_mask((M, N), gen, device=device)
    _, w, _ = run_and_compare("cuda", q, k, v, m, is_causal=True, need_weights=True, gen=gen)
    assert (w.detach().cpu()[..., torch.ones(M, N, dtype=torch.bool).triu(1)] == 0).all()


@pytest.mark.parametrize("name", ["bool_rows", "float_neginf_rows", "all_masked", "causal_plus_mask"])
@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device, name):
    """Rows without an attended key give exact zeros in out, weights and gradients (never NaN)."""
    gen = make_gen("cuda-dead", name)
    B, H, M, N = 2, 2, 21, 35
    q, k, v = make_qkv(B, H, 2, M, N, 16, gen=gen, device=device, requires_grad=True)
    causal = False
    dead = torch.zeros(B, H, M, dtype=torch.bool)
    if name == "bool_rows":
        mask = bool_mask((B, H, M, N), gen, p_true=0.8)
        for b, h, i in ((0, 0, 0), (0, 1, 5), (1, 0, 16), (1, 1, M - 1)):
            mask[b, h, i] = False
            dead[b, h, i] = True
    elif name == "float_neginf_rows":
        mask = float_mask((1, 1, M, N), gen)
        for i in (2, 16, M - 1):
            mask[0, 0, i] = float("-inf")
            dead[:, :, i] = True
    elif name == "all_masked":
        mask = torch.zeros(M, N, dtype=torch.bool)
        dead[:] = True
    else:
        mask = bool_mask((M, N), gen, p_true=0.9)
        mask[:, 0] = False
        causal = True
        dead[:, :, 0] = True
        for i in range(1, M):
            if not mask[i, : min(i + 1, N)].any():
                dead[:, :, i] = True
    out, w, grads = run_and_compare("cuda", q, k, v, mask.to(device), is_causal=causal, need_weights=True, gen=gen)
    assert (out.detach().cpu()[dead] == 0).all() and (w.detach().cpu()[dead] == 0).all()
    assert (grads["q"].cpu()[dead] == 0).all()
    if dead.all():
        assert (grads["k"] == 0).all() and (grads["v"] == 0).all()


@pytest.mark.parametrize("loss", ["out", "weights", "both"])
@pytest.mark.parametrize("rows,average", [(None, False), ((3, 21), False), ((36, 37), False), ((0, 1), True),
                                          ((16, 32), True)])
@pytest.mark.parametrize("device", DEVICES)
def test_weights_options(device, rows, average, loss):
    gen = make_gen("cuda-weights", rows, average, loss)
    q, k, v = make_qkv(1, 4, 2, 37, 45, 32, gen=gen, device=device, requires_grad=True)
    run_and_compare("cuda", q, k, v, need_weights=True, average=average, rows=rows, loss=loss, gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_stride0_grads(device):
    """q, k, v sliced from a packed qkv projection, an expanded (stride 0) mask, 3-D inputs and the
    stride-0 gradient of .sum()."""
    gen = make_gen("cuda-strided")
    B, L, H, D = 2, 19, 2, 16
    qkv = randn((B, L, 3, H, D), gen, device=device).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = bool_mask((1, 1, 1, L), gen, device=device).expand(B, H, L, L)
    run_and_compare("cuda", q, k, v, mask, need_weights=True, rows=(L - 4, L), gen=gen)
    out = interaction_attention(q, k, v, backend="cuda")
    ref = interaction_attention(q, k, v, backend="torch")
    g, = torch.autograd.grad(out.sum(), qkv)
    g_ref, = torch.autograd.grad(ref.sum(), qkv)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    q3, k3, v3 = (randn((2, 11 if i == 0 else 7, 16), gen, device=device, requires_grad=True) for i in range(3))
    run_and_compare("cuda", q3, k3, v3, need_weights=True, gen=gen)  # 3-D (B, L, D) inputs


@pytest.mark.parametrize("shape", [(1, 1, 13, 29), (2, 1, 1, 29), (2, 2, 13, 29)], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_float_mask_gradient(device, shape):
    gen = make_gen("cuda-dmask", shape)
    q, k, v = make_qkv(2, 2, 2, 13, 29, 16, gen=gen, device=device, requires_grad=True)
    mask = float_mask(shape, gen, device=device).requires_grad_(True)
    run_and_compare("cuda", q, k, v, mask, is_causal=shape[2] == 1, need_weights=True, rows=(2, 9), gen=gen)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_with_float32_mask(device):
    gen = make_gen("cuda-mask-dtype")
    q, k, v = make_qkv(1, 2, 2, 9, 27, 32, dtype=torch.float16, gen=gen, device=device, requires_grad=True)
    run_and_compare("cuda", q, k, v, float_mask((9, 27), gen, device=device), need_weights=True, gen=gen)


def _fused_kl_case(device, dtype, causal, gen):
    B, H, Hkv, M, N, D = 2, 4, 2, 19, 150, 32
    q, k, v = make_qkv(B, H, Hkv, M, N, D, dtype=dtype, gen=gen, device=device, requires_grad=True)
    mask = bool_mask((B, 1, M, N), gen, p_true=0.8)
    mask[0, 0, 3] = False  # a row without an attended key
    target = torch.rand(B, 1, M, N, generator=gen)
    target[1, 0, 7] = 0.0  # a row without target mass
    target[0, 0, 2, ::3] = 0.0  # t = 0 terms
    return q, k, v, mask.to(device), target.to(device)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_kl(device, dtype, causal):
    """interaction_attention(..., kl_target=t): out, maps, per-row KL and the gradients of a loss on
    all three against the torch backend in float64."""
    if dtype not in _dtypes(device):
        pytest.skip("float64 runs on the CPU kernels only")
    gen = make_gen("cuda-fused-kl", DTYPE_IDS[dtype], causal)
    q, k, v, mask, target = _fused_kl_case(device, dtype, causal, gen)
    kw = dict(is_causal=causal, need_weights=True, weights_rows=(4, 17), kl_target=target, kl_reduction="none")
    out, w, kl = interaction_attention(q, k, v, mask, backend="cuda", **kw)
    q64, k64, v64 = detached64(q, k, v)
    out_r, w_r, kl_r = interaction_attention(q64, k64, v64, mask, backend="torch", **kw)
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, out_r, dtype, name="out")
    assert_close(w, w_r, dtype, name="weights")
    assert_close(kl, kl_r, dtype, grad=True, name="kl")
    r = [randn(t.shape, gen, torch.float64, device) for t in (out, w, kl)]
    loss = sum((t.double() * ri).sum() for t, ri in zip((out, w, kl), r))
    loss_r = sum((t * ri).sum() for t, ri in zip((out_r, w_r, kl_r), r))
    for name, g, g_r in zip("qkv", torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(loss_r, (q64, k64, v64))):
        assert_close(g, g_r, dtype, grad=True, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------
# (b, c) attention_kl, attention_kl_qk
# ------------------------------------------------------------------------------------------------

def _check_kl(fn, inputs, dtype, **kw):
    """fn(*inputs, backend=...) on "cuda" vs "torch" in float64: per-row loss and input gradients."""
    got = fn(*inputs, backend="cuda", reduction="none", **kw)
    ins64 = detached64(*inputs)
    want = fn(*ins64, backend="torch", reduction="none", **kw)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, dtype, grad=True, name="kl")
    r = torch.randn(got.shape, dtype=torch.float64, device=got.device)
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    diff64 = [t for t in ins64 if isinstance(t, torch.Tensor) and t.requires_grad]
    for g, g_r in zip(torch.autograd.grad((got.double() * r).sum(), diff),
                      torch.autograd.grad((want * r).sum(), diff64)):
        assert g.dtype == dtype
        assert_close(g, g_r, dtype, grad=True, name="grad")


@pytest.mark.parametrize("target_is", ["probs", "logits", "log_probs"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device", DEVICES)
def test_attention_kl(device, dtype, masked, target_is):
    if dtype not in _dtypes(device):
        pytest.skip("float64 runs on the CPU kernels only")
    gen = make_gen("cuda-kl", DTYPE_IDS[dtype], masked, target_is)
    B, H, M, N = 2, 3, 7, 300
    logits = randn((B, H, M, N), gen, dtype, device, requires_grad=True, scale=3.0)
    if target_is == "probs":
        target = torch.rand(B, 1, M, N, generator=gen)
        target[0, 0, 1] = 0.0
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-6)
    elif target_is == "logits":
        target = torch.randn(B, 1, M, N, generator=gen) * 2
    else:
        target = torch.log_softmax(torch.randn(B, 1, M, N, generator=gen), -1)
    key_mask = None
    if masked:
        key_mask = torch.rand(B, 1, 1, N, generator=gen) < 0.6
        key_mask[1] = False  # rows without a kept key give 0
        key_mask = key_mask.to(device)
    _check_kl(lambda lg, t, **kw: attention_kl(lg, t, **kw), (logits, target.to(device)), dtype,
              target_is=target_is, temperature=1.5, key_mask=key_mask)


@pytest.mark.parametrize("where,value", HUGE_ROWS)
@pytest.mark.parametrize("device", DEVICES)
def test_attention_kl_huge_magnitude_rows(device, where, value):
    check_huge_magnitude_rows("cuda", where, value, device)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("device", DEVICES)
def test_attention_kl_qk_huge_magnitude_rows(device, where):
    check_huge_magnitude_rows_qk("cuda", where, device)


@pytest.mark.parametrize("teacher", ["dense_probs", "dense_logits", "implicit_1head", "implicit_Hheads"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("device", DEVICES)
def test_attention_kl_qk(device, dtype, teacher):
    if dtype not in _dtypes(device):
        pytest.skip("float64 runs on the CPU kernels only")
    gen = make_gen("cuda-klqk", DTYPE_IDS[dtype], teacher)
    B, H, Hkv, M, N, D = 2, 4, 2, 19, 70, 40
    q = randn((B, H, M, D), gen, dtype, device, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, dtype, device, requires_grad=True)
    key_mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.7).to(device)
    kw = dict(temperature=0.7, key_mask=key_mask)
    if teacher == "dense_probs":
        target = torch.rand(B, 1, M, N, generator=gen)
        target[0, 0, 3] = 0.0
        target = target.to(device)
    elif teacher == "dense_logits":
        target = torch.randn(B, H, M, N, generator=gen).to(device)
        kw["target_is"] = "logits"
    else:
        Ht = 1 if teacher == "implicit_1head" else H
        target = (randn((B, Ht, M, 24), gen, torch.float32, device), randn((B, 1, N, 24), gen, torch.float32, device))

    def fn(q_, k_, *rest, **kws):
        t = rest[0] if len(rest) == 1 else tuple(rest)
        return attention_kl_qk(q_, k_, t, **kws)

    inputs = (q, k, target) if isinstance(target, torch.Tensor) else (q, k, *target)
    _check_kl(fn, inputs, dtype, **kw)


# ------------------------------------------------------------------------------------------------
# (b, c) custom ops with backend="cuda": schema, fake kernels, autograd registration, AOT dispatch
# ------------------------------------------------------------------------------------------------

def _schema_args(op, named):
    args = []
    for a in op._schema.arguments:
        if a.name in named:
            args.append(named[a.name])
        elif a.has_default_value():
            args.append(a.default_value)
        elif isinstance(a.type, torch.OptionalType):
            args.append(None)
        else:
            raise AssertionError(f"unknown required argument {a.name!r} in {op._schema}")
    return tuple(args)


@pytest.mark.parametrize("case", ["nomask_norows", "floatmask_rows", "boolmask_causal_rows", "kl"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_attention(device, case):
    import lfi.ops  # noqa: F401

    gen = make_gen("cuda-opcheck", case)
    B, H, M, N, D = 2, 2, 9, 21, 16
    q, k, v = make_qkv(B, H, 1, M, N, D, gen=gen, device=device, requires_grad=True)
    mask, rows, causal, target = None, (0, 0), False, None
    if case == "floatmask_rows":
        mask, rows = float_mask((1, 1, M, N), gen, device=device).requires_grad_(True), (2, 7)
    elif case == "boolmask_causal_rows":
        mask, rows, causal = bool_mask((B, H, M, N), gen, device=device), (0, 4), True
    elif case == "kl":
        target, rows = torch.rand(B, 1, M, N, generator=gen).to(device), (0, M)
    fwd = torch.ops.lfi.interaction_attention_fwd.default
    named = dict(q=q, k=k, v=v, attn_mask=mask, scale=D ** -0.5, is_causal=causal, weights_start=rows[0],
                 weights_stop=rows[1], kl_target=target, backend="cuda")
    torch.library.opcheck(fwd, _schema_args(fwd, named))
    out, stats, weights, kl, tnorm = fwd(*_schema_args(fwd, named))
    assert stats.shape == (B, H, M, 2) and stats.dtype == torch.float32
    bwd = torch.ops.lfi.interaction_attention_bwd.default
    named.update(grad_out=torch.randn(out.shape, generator=gen).to(device), out=out, stats=stats,
                 grad_weights=torch.randn(weights.shape, generator=gen).to(device) if weights.numel() else None,
                 mask_grad=mask is not None and mask.dtype != torch.bool,
                 tnorm=tnorm if target is not None else None,
                 grad_kl=torch.randn(B, H, M, generator=gen).to(device) if target is not None else None)
    torch.library.opcheck(bwd, _schema_args(bwd, {n: (t.detach() if isinstance(t, torch.Tensor) else t)
                                                  for n, t in named.items()}))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kl_ops(device):
    import lfi.ops  # noqa: F401

    gen = make_gen("cuda-opcheck-kl")
    B, H, M, N, D = 2, 2, 5, 33, 16
    logits = randn((B, H, M, N), gen, device=device, requires_grad=True)
    target = torch.rand(B, 1, M, N, generator=gen).to(device)
    key_mask = (torch.rand(B, 1, 1, N, generator=gen) < 0.7).to(device)
    op = torch.ops.lfi.attention_kl_fwd.default
    args = (logits, target, key_mask, 0.8, 1.0, False, "cuda")
    torch.library.opcheck(op, args)
    kl, stats, tstats = op(*args)
    g = torch.randn(B, H, M, generator=gen).to(device)
    torch.library.opcheck(torch.ops.lfi.attention_kl_bwd.default,
                          (g, logits.detach(), target, key_mask, stats, tstats, 0.8, 1.0, False, "cuda"))
    q = randn((B, H, M, D), gen, device=device, requires_grad=True)
    k = randn((B, 1, N, D), gen, device=device, requires_grad=True)
    qt, kt = randn((B, 1, M, 8), gen, device=device), randn((B, 1, N, 8), gen, device=device)
    op = torch.ops.lfi.attention_kl_qk_fwd.default
    for tgt, q_t, k_t, logits_t in ((target, None, None, False), (None, qt, kt, True)):
        args = (q, k, tgt, q_t, k_t, key_mask, 0.25, 0.35, logits_t, "cuda")
        torch.library.opcheck(op, args)
        kl, stats, tstats = op(*args)
        torch.library.opcheck(torch.ops.lfi.attention_kl_qk_bwd.default,
                              (g, q.detach(), k.detach(), tgt, q_t, k_t, key_mask, stats, tstats, 0.25, 0.35, logits_t,
                               "cuda"))


def test_torch_compile_fullgraph_cpu():
    """The custom ops with backend="cuda" inside a compiled graph (opaque ops, fake kernels)."""
    gen = make_gen("cuda-compile")
    q, k, v = make_qkv(2, 2, 2, 12, 12, 16, gen=gen, device="cpu", requires_grad=True)
    mask = float_mask((1, 1, 12, 12), gen, device="cpu")

    def f(q, k, v):
        out, w = interaction_attention(q, k, v, mask, need_weights=True, weights_rows=(8, 12), backend="cuda")
        return out.sum() + (w * w).sum()

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(got, (q, k, v))
    g_ref = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# (d) the CUDA kernels under the CPU emulator (opt-in)
# ------------------------------------------------------------------------------------------------

EMULATE = os.environ.get("LFI_TEST_CUDA_EMULATOR", "0") == "1"


@pytest.fixture(scope="module")
def emu():
    if not EMULATE:
        pytest.skip("set LFI_TEST_CUDA_EMULATOR=1 to run the CUDA kernels under the CPU emulator (builds "
                    "another extension, minutes)")
    return _ext.load_emulator()


def _close(got, want, atol=3e-5, rtol=3e-5, name=""):
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{name}: inf pattern differs"
    assert torch.equal(got[~fin], want[~fin]), f"{name}: infinities differ"
    torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=rtol, msg=name)


EMU_ATTENTION = [
    dict(id="tiny", B=1, H=1, Hkv=1, M=3, N=5, D=16, Dv=16, mask=None, causal=False, rows=(0, 0), kl=False),
    dict(id="gqa_bool_rows_kl", B=1, H=2, Hkv=1, M=17, N=40, D=24, Dv=20, mask="bool", causal=False, rows=(2, 9),
         kl=True),
    dict(id="float_causal_maps_kl", B=1, H=2, Hkv=2, M=18, N=70, D=40, Dv=64, mask="float", causal=True,
         rows=(0, 18), kl=True),
    dict(id="bigD_causal", B=2, H=2, Hkv=1, M=5, N=33, D=70, Dv=130, mask=None, causal=True, rows=(0, 0),
         kl=False),
    dict(id="fp16_D130", B=1, H=1, Hkv=1, M=20, N=35, D=130, Dv=33, mask="bool", causal=True, rows=(3, 20),
         kl=False, dtype=torch.float16),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c["id"]) for c in EMU_ATTENTION])
def test_emulated_cuda_attention(emu, case):
    from lfi.backends.reference import interaction_attention as R

    gen = make_gen("emu", case["id"])
    dtype = case.get("dtype", torch.float32)
    B, H, Hkv, M, N, D, Dv = (case[x] for x in ("B", "H", "Hkv", "M", "N", "D", "Dv"))
    q, k, v = make_qkv(B, H, Hkv, M, N, D, Dv, dtype=dtype, gen=gen, device="cpu")
    mask = None
    if case["mask"] == "bool":
        mask = bool_mask((B, 1, M, N), gen, device="cpu")
        mask[0, 0, 2] = False
    elif case["mask"] == "float":
        mask = float_mask((1, H, M, N), gen, device="cpu")
        mask[0, 0, 0] = float("-inf")
    target = torch.rand(B, 1, M, N, generator=gen) if case["kl"] else None
    rows, causal, scale = case["rows"], case["causal"], D ** -0.5
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    t64 = None if target is None else target.double()
    q64, k64, v64 = q.double(), k.double(), v.double()
    want = R.attention_forward(q64, k64, v64, m64, scale, causal, *rows, t64)
    got = emu.attention_fwd(q, k, v, mask, scale, causal, *rows, target)
    tol = 3e-5 if dtype == torch.float32 else 2e-3
    for name, g, w in zip(("out", "stats", "weights", "kl", "tnorm"), got, want):
        if w is not None:
            _close(g, w, tol, tol, name)
    go = randn((B, H, M, Dv), gen, dtype, "cpu")
    gw = randn((B, H, rows[1] - rows[0], N), gen, dtype, "cpu") if rows[1] > rows[0] else None
    gkl = torch.randn(B, H, M, generator=gen) if target is not None else None
    mask_grad = mask is not None and mask.dtype != torch.bool
    want = R.attention_backward(go.double(), None if gw is None else gw.double(), q64, k64, v64, want[0], want[1],
                                m64, scale, causal, *rows, mask_grad, t64, want[4], gkl)
    got = emu.attention_bwd(go, gw, q, k, v, got[0], got[1], mask, scale, causal, *rows, mask_grad, target,
                            got[4] if target is not None else None, gkl)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got, want):
        if w is not None:
            _close(g, w, 10 * tol, 10 * tol, name)


@pytest.mark.parametrize("logits_t", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
def test_emulated_cuda_kl(emu, masked, logits_t):
    from lfi.backends.reference import attention_kl as RK, attention_kl_qk as RQ

    gen = make_gen("emu-kl", masked, logits_t)
    B, H, M, N, D = 2, 2, 5, 150, 24
    lg = torch.randn(B, H, M, N, generator=gen) * 3
    t = torch.randn(B, 1, M, N, generator=gen) if logits_t else torch.rand(B, 1, M, N, generator=gen)
    if not logits_t:
        t[0, 0, 1] = 0
    km = (torch.rand(B, 1, 1, N, generator=gen) < 0.6) if masked else None
    if masked:
        km[-1] = False
    g = torch.randn(B, H, M, generator=gen)
    want = RK.kl_forward(lg.double(), t.double(), km, 0.7, 1.3, logits_t)
    got = emu.kl_fwd(lg, t, km, 0.7, 1.3, logits_t)
    for name, a, b in zip(("kl", "stats", "tstats"), got, want):
        _close(a, b, name=name)
    _close(emu.kl_bwd(g, lg, t, km, got[1], got[2], 0.7, 1.3, logits_t),
           RK.kl_backward(g.double(), lg.double(), t.double(), km, want[1], want[2], 0.7, 1.3, logits_t), name="dlogits")
    q, k = torch.randn(B, H, M, D, generator=gen), torch.randn(B, 1, N, D, generator=gen)
    qt, kt = torch.randn(B, H, M, 16, generator=gen), torch.randn(B, 1, N, 16, generator=gen)
    for tgt, q_t, k_t, lt in ((t, None, None, logits_t), (None, qt, kt, True)):
        d = lambda x: None if x is None else x.double()  # noqa: E731
        want = RQ.kl_qk_forward(q.double(), k.double(), d(tgt), d(q_t), d(k_t), km, 0.3, 0.25, lt)
        got = emu.kl_qk_fwd(q, k, tgt, q_t, k_t, km, 0.3, 0.25, lt)
        for name, a, b in zip(("kl", "stats", "tstats"), got, want):
            _close(a, b, 1e-4, 1e-4, name=name)
        want_g = RQ.kl_qk_backward(g.double(), q.double(), k.double(), d(tgt), d(q_t), d(k_t), km, want[1], want[2],
                                   0.3, 0.25, lt)
        got_g = emu.kl_qk_bwd(g, q, k, tgt, q_t, k_t, km, got[1], got[2], 0.3, 0.25, lt)
        for name, a, b in zip(("dq", "dk"), got_g, want_g):
            _close(a, b, 1e-4, 1e-4, name=name)
