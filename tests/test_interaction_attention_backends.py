"""interaction_attention: backend selection and backend-specific behaviour, against the float64
reference (tests/reference.py): backend="auto" and LFI_BACKEND, agreement between backends, the torch
backend's row chunks and kept maps, dropout (torch; the fallback of the other backends), and the
GPU-only cases (compiled Triton kernels at larger shapes).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import BACKEND_PARAMS
from helpers import DTYPE_IDS
from helpers import HAS_CUDA
from helpers import assert_close
from helpers import backend_params
from helpers import bool_mask
from helpers import detached64
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import run_and_compare
from lfi.ops import interaction_attention
from reference import reference_attention

# --------------------------------------------------------------------------------------------------
# backend="auto", LFI_BACKEND, agreement between backends, the torch backend's row chunks
# --------------------------------------------------------------------------------------------------

def test_auto_backend_matches_reference():
    gen = make_gen("auto")
    q, k, v = make_qkv(2, 2, 1, 9, 14, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, bool_mask((9, 14), gen), need_weights=True, gen=gen)


@pytest.mark.parametrize("env_backend", BACKEND_PARAMS)
def test_lfi_backend_env_overrides_auto(monkeypatch, env_backend):
    """LFI_BACKEND picks the backend behind backend="auto" (DESIGN.md section 2)."""
    monkeypatch.setenv("LFI_BACKEND", env_backend)
    gen = make_gen("env", env_backend)
    q, k, v = make_qkv(1, 2, 2, 9, 14, 16, gen=gen, requires_grad=True)
    run_and_compare("auto", q, k, v, need_weights=True, gen=gen)


@pytest.mark.parametrize("backend", backend_params(exclude=("torch",)))
def test_backends_agree(backend):
    """Sanity: with the same fp16 inputs every other backend is close to the torch backend."""
    gen = make_gen("agree")
    q, k, v = make_qkv(1, 2, 2, 17, 33, 32, dtype=torch.float16, gen=gen)
    mask = bool_mask((17, 33), gen)
    a = interaction_attention(q, k, v, mask, need_weights=True, backend=backend)
    b = interaction_attention(q, k, v, mask, need_weights=True, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("chunk_bytes", ["1", "4000"], ids=["1row", "few_rows"])
def test_torch_backend_row_chunks(monkeypatch, chunk_bytes):
    """The torch backend computes in row chunks (LFI_TORCH_CHUNK_BYTES bounds a chunk): results must
    not depend on where the chunk boundaries fall (masks with an M dim, causal, map rows, mask grad)."""
    monkeypatch.setenv("LFI_TORCH_CHUNK_BYTES", chunk_bytes)
    gen = make_gen("chunks", chunk_bytes)
    B, H, M, N = 2, 2, 23, 19
    q, k, v = make_qkv(B, H, 1, M, N, 16, gen=gen, requires_grad=True)
    mask = float_mask((1, H, M, N), gen, neg_inf_frac=0.2)
    mask[0, 1, 9] = float("-inf")
    mask.requires_grad_(True)
    for average in (False, True):
        run_and_compare("torch", q, k, v, mask, is_causal=True, need_weights=True, average=average,
                        rows=(4, 19), gen=gen)


# --------------------------------------------------------------------------------------------------
# Dropout (kept light)
# --------------------------------------------------------------------------------------------------

def test_dropout_torch_backend():
    gen = make_gen("dropout")
    q, k, v = make_qkv(2, 2, 2, 12, 30, 16, gen=gen, requires_grad=True)
    ref_out, ref_p = reference_attention(*detached64(q, k, v))
    # p = 0.0 is exactly the no-dropout path.
    out0 = interaction_attention(q, k, v, dropout_p=0.0, backend="torch")
    assert_close(out0, ref_out, torch.float32, name="out (dropout_p=0)")

    torch.manual_seed(1234)
    out1, w1 = interaction_attention(q, k, v, dropout_p=0.5, need_weights=True, backend="torch")
    torch.manual_seed(1234)
    out2, w2 = interaction_attention(q, k, v, dropout_p=0.5, need_weights=True, backend="torch")
    assert torch.isfinite(out1).all()
    assert not torch.allclose(out1, out0), "dropout_p=0.5 must change the output"
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)  # same seed -> same result
    # The returned maps are taken before dropout: the exact P.
    assert_close(w1, ref_p, torch.float32, name="weights (pre-dropout)")
    # Gradients flow and are finite.
    gq, gk, gv = torch.autograd.grad((out1 * out1).sum() + w1.sum(), (q, k, v))
    for g in (gq, gk, gv):
        assert torch.isfinite(g).all()
    # Dropout is unbiased in expectation: averaging many draws approaches the no-dropout output.
    torch.manual_seed(0)
    with torch.no_grad():
        mean = sum(interaction_attention(q, k, v, dropout_p=0.5, backend="torch") for _ in range(100)) / 100
    assert (mean - out0).abs().mean() < 0.05  # about 0.015 expected


@pytest.mark.parametrize("backend", backend_params(exclude=("torch",)))
def test_dropout_falls_back_with_one_warning(backend):
    """A backend without fused dropout (triton, cuda) runs the torch path for dropout_p > 0 (same
    draws for the same seed) and warns once per process. Run in a subprocess so that other tests
    cannot have used up the warning."""
    preload = "from lfi.backends.cuda import _ext; _ext.load()" if backend == "cuda" else ""  # no build noise
    code = textwrap.dedent(
        """
        import os, warnings, torch
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        from lfi.ops import interaction_attention
        PRELOAD
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(dev) for _ in range(3))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.manual_seed(7)
            a = interaction_attention(q, k, v, dropout_p=0.3, backend=BACKEND)
            torch.manual_seed(7)
            b = interaction_attention(q, k, v, dropout_p=0.3, backend=BACKEND)
        user = [r for r in rec if issubclass(r.category, UserWarning)]
        assert len(user) == 1, [str(r.message) for r in rec]
        torch.manual_seed(7)
        c = interaction_attention(q, k, v, dropout_p=0.3, backend="torch")
        assert torch.equal(a, b) and torch.equal(a, c)
        d = interaction_attention(q, k, v, backend="torch")
        assert not torch.allclose(a, d) and torch.isfinite(a).all()
        print("OK")
        """
    ).replace("PRELOAD", preload).replace("BACKEND", repr(backend))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------
# GPU-only
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: compiled Triton kernels and fp16 tensor-core paths")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_triton_larger_shapes(dtype):
    gen = make_gen("cuda_large", DTYPE_IDS[dtype])
    B, H, M, N, D = 2, 6, 197, 197, 64
    q, k, v = make_qkv(B, H, H, M, N, D, dtype=dtype, gen=gen, device="cuda", requires_grad=True)
    mask = bool_mask((B, 1, 1, N), gen, p_true=0.9, device="cuda")
    run_and_compare("triton", q, k, v, mask, need_weights=True, rows=(180, 197), gen=gen)
    run_and_compare("triton", q, k, v, is_causal=True, need_weights=True, average=True, gen=gen)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device: the autotuner runs compiled kernels only")
@pytest.mark.parametrize("atomic_dq", [False, True], ids=["dq_kernel", "dq_atomic"])
def test_cuda_triton_autotuned(atomic_dq, monkeypatch):
    """The first call of a shape bucket autotunes: each candidate config runs several times on the
    caller's buffers before the real launch. Outputs, maps and gradients of that very call must
    match the reference (the atomic dQ accumulator is zeroed around the timing runs)."""
    monkeypatch.setenv("LFI_AUTOTUNE", "1")
    monkeypatch.setenv("LFI_DQ_ATOMIC", "1" if atomic_dq else "0")
    gen = make_gen("cuda_autotuned", str(atomic_dq))
    B, H, M, N, D = 2, 4, 197 + atomic_dq, 197 + atomic_dq, 64  # a new autotune key for each case
    q, k, v = make_qkv(B, H, H, M, N, D, dtype=torch.bfloat16, gen=gen, device="cuda", requires_grad=True)
    run_and_compare("triton", q, k, v, need_weights=True, gen=gen)
    run_and_compare("triton", q, k, v, is_causal=True, loss="out", gen=gen)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_auto_picks_triton_and_matches():
    gen = make_gen("cuda_auto")
    q, k, v = make_qkv(1, 2, 2, 64, 96, 64, dtype=torch.float16, gen=gen, device="cuda", requires_grad=True)
    run_and_compare("auto", q, k, v, need_weights=True, gen=gen)


def test_torch_backend_backward_reads_full_maps():
    """backend="torch" keeps the returned maps of every row (its P, in the compute dtype) for the
    backward instead of recomputing them, as eager attention keeps P: same gradients, and an
    in-place edit of those maps before backward is refused as autograd refuses it for eager."""
    from lfi.backends.torch import interaction_attention as ref

    gen = make_gen("keep_probs")
    q, k, v = make_qkv(2, 2, 1, 9, 21, 16, gen=gen, requires_grad=True)
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    assert ref.probs_to_keep(q, w, 0, 9) is w
    assert ref.probs_to_keep(q, w[:, :, :4], 0, 4) is None and ref.probs_to_keep(q.half(), w.half(), 0, 9) is None
    run_and_compare("torch", q, k, v, need_weights=True, gen=gen)
    run_and_compare("torch", q, k, v, bool_mask((2, 1, 9, 21), gen), is_causal=True, need_weights=True, gen=gen)
    out, w = interaction_attention(q, k, v, need_weights=True, backend="torch")
    w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # Without maps, one row chunk: the maps are still computed and kept for the backward, not returned.
    assert ref.keeps_maps_for_backward(q, k, v, None, None)
    assert not ref.keeps_maps_for_backward(q.detach(), k.detach(), v.detach(), None, None)
    assert not ref.keeps_maps_for_backward(q.half(), k.half(), v.half(), None, None)
    run_and_compare("torch", q, k, v, loss="out", gen=gen)
