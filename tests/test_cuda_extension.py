"""backend="cuda": the C++/CUDA extension lfi_C (csrc/) itself, as loaded by lfi.backends.cuda._ext.

Only what is specific to the extension lives here; its kernels' correctness, gradients, numerics and
errors are checked by the shared suite, in which "cuda" is one backend of the matrix
(helpers.BACKEND_PARAMS: the CPU kernels on a machine without a GPU, the CUDA kernels on a GPU).

(a) the extension JIT-compiles and links with the CUDA sources (nvcc, TORCH_CUDA_ARCH_LIST) and
    loads; skipped only where nvcc is absent. The build is cached (torch's extension directory),
    so only a cold cache pays the compile (minutes on 2 cores); its build info and the dispatch
    table ("auto" never picks the extension for CPU tensors);
(b) opt-in (LFI_TEST_CUDA_EMULATOR=1): the CUDA kernels compiled as host C++ against a CPU
    emulator of threads, barriers and warp shuffles (csrc/emu), against the reference -- the only
    way to execute the CUDA code paths on a machine without a GPU. The fp32 cases here run the
    CUDA-core kernels; bf16 / fp16 inputs with head dims up to 128 run the tensor-core kernels
    (csrc/cuda/attention_tc.cu), whose grid runs by default in tests/test_cuda_emulator.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from cuda_emu_util import attention_bwd
from cuda_emu_util import attention_fwd
from cuda_emu_util import check_kl_qk
from cuda_emu_util import close
from helpers import bool_mask
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from lfi.backends.cuda import _ext

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Builds (once, cached) and loads the extension; skips only when a tool is missing."""
    if not _ext.is_loaded() and _ext.PROBE["aot"] is None and _ext.PROBE["build_problem"] is not None:
        pytest.skip(f"cannot build the lfi_C extension here: {_ext.PROBE['build_problem']}")
    _ext.load()
    return _ext.extension_info()


# ------------------------------------------------------------------------------------------------
# (a) build, build info, dispatch
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


# ------------------------------------------------------------------------------------------------
# (b) the CUDA kernels under the CPU emulator (opt-in)
# ------------------------------------------------------------------------------------------------

EMULATE = os.environ.get("LFI_TEST_CUDA_EMULATOR", "0") == "1"


@pytest.fixture(scope="module")
def emu():
    if not EMULATE:
        pytest.skip("set LFI_TEST_CUDA_EMULATOR=1 to run the CUDA kernels under the CPU emulator (builds "
                    "another extension, minutes)")
    return _ext.load_emulator()


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
    got, want = attention_fwd(emu, q, k, v, mask, target, scale, causal, rows)
    tol = 3e-5 if dtype == torch.float32 else 2e-3
    for name, g, w in zip(("out", "stats", "weights", "kl", "tnorm"), got, want):
        if w is not None:
            close(g, w, tol, tol, name)
    go = randn((B, H, M, Dv), gen, dtype, "cpu")
    gw = randn((B, H, rows[1] - rows[0], N), gen, dtype, "cpu") if rows[1] > rows[0] else None
    gkl = torch.randn(B, H, M, generator=gen) if target is not None else None
    got_g, want_g = attention_bwd(emu, got, want, q, k, v, mask, target, scale, causal, rows, go, gw, gkl)
    for name, g, w in zip(("dq", "dk", "dv", "dmask"), got_g, want_g):
        if w is not None:
            close(g, w, 10 * tol, 10 * tol, name)


@pytest.mark.parametrize("logits_t", [False, True], ids=["probs", "logits"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
def test_emulated_cuda_kl(emu, masked, logits_t):
    """attention_kl and (float32: the CUDA-core kernels) attention_kl_qk under the emulator."""
    from lfi.backends.torch import attention_kl as RK

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
        close(a, b, 3e-5, 3e-5, name=name)
    close(emu.kl_bwd(g, lg, t, km, got[1], got[2], 0.7, 1.3, logits_t),
          RK.kl_backward(g.double(), lg.double(), t.double(), km, want[1], want[2], 0.7, 1.3, logits_t),
          3e-5, 3e-5, name="dlogits")
    q, k = torch.randn(B, H, M, D, generator=gen), torch.randn(B, 1, N, D, generator=gen)
    qt, kt = torch.randn(B, H, M, 16, generator=gen), torch.randn(B, 1, N, 16, generator=gen)
    for tgt, q_t, k_t, lt in ((t, None, None, logits_t), (None, qt, kt, True)):
        check_kl_qk(emu, q, k, tgt, q_t, k_t, km, g, 0.3, 0.25, lt, 1e-4, 1e-4)
