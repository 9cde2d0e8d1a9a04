"""lfi.ops.attention_kl_qk API: the custom ops (opcheck) and bad input (ValueError / TypeError naming
the argument). How the KL suites test: tests/kl_cases.py.
"""
from __future__ import annotations

import pytest
import torch

from helpers import DEVICE
from helpers import make_gen
from helpers import randn
from kl_cases import implicit_teacher
from kl_cases import key_mask_of
from kl_cases import make_target
from lfi.ops import attention_kl_qk

# --------------------------------------------------------------------------------------------------
# The custom ops: opcheck
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["dense", "implicit"])
def test_opcheck(backend, teacher):
    gen = make_gen("klqk_opcheck", backend, teacher)
    B, H, Hkv, M, N, D = 2, 2, 1, 5, 20, 16
    q = randn((B, H, M, D), gen, requires_grad=True)
    k = randn((B, Hkv, N, D), gen, requires_grad=True)
    key_mask = key_mask_of("B11N", B, H, M, N, gen)
    if teacher == "dense":
        tgt, q_t, k_t, is_logits = make_target((B, 1, M, N), "probs", gen), None, None, False
    else:
        (q_t, k_t), tgt, is_logits = implicit_teacher(B, M, N, 8, gen), None, True
    args = (q, k, tgt, q_t, k_t, key_mask, 0.25 / 1.5, 0.35 / 1.5, is_logits, backend)
    op = torch.ops.lfi.attention_kl_qk_fwd.default
    torch.library.opcheck(op, args)
    kl, stats, tstats = op(*args)
    assert kl.shape == (B, H, M) and stats.shape == tstats.shape == (B, H, M, 2) and kl.dtype == torch.float32
    g = randn((B, H, M), gen)
    torch.library.opcheck(torch.ops.lfi.attention_kl_qk_bwd.default,
                          (g, q.detach(), k.detach(), tgt, q_t, k_t, key_mask, stats, tstats, *args[6:]))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

EB, EH, EM, EN, ED = 2, 2, 3, 8, 16


def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _err(**over):
    def build():
        kw = dict(q=_x(EB, EH, EM, ED), k=_x(EB, 1, EN, ED), target=torch.softmax(_x(EB, 1, EM, EN), -1))
        kw.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return kw
    return build


def _pair(qt_shape, kt_shape, qt_dtype=torch.float32, kt_dtype=torch.float32):
    return lambda: (_x(*qt_shape, dtype=qt_dtype), _x(*kt_shape, dtype=kt_dtype))


ERROR_CASES = [
    ("q_3d", _err(q=lambda: _x(EB, EM, ED)), ValueError, r"\bq\b"),
    ("q_not_tensor", _err(q=[[1.0]]), TypeError, r"\bq\b"),
    ("k_int", _err(k=lambda: _x(EB, 1, EN, ED).long()), TypeError, r"\bk\b"),
    ("k_head_dim", _err(k=lambda: _x(EB, 1, EN, ED + 1)), ValueError, r"\bk\b"),
    ("k_batch", _err(k=lambda: _x(EB + 1, 1, EN, ED)), ValueError, r"\bk\b"),
    ("heads_not_divisible", _err(q=lambda: _x(EB, 3, EM, ED), k=lambda: _x(EB, 2, EN, ED),
                                 target=lambda: torch.rand(EB, 1, EM, EN, device=DEVICE)), ValueError, r"H"),
    ("qk_dtype", _err(k=lambda: _x(EB, 1, EN, ED, dtype=torch.float16)), TypeError, r"dtype"),
    ("target_shape", _err(target=lambda: torch.rand(EB, 1, EM, EN + 1, device=DEVICE)), ValueError, r"target"),
    ("target_heads", _err(target=lambda: torch.rand(EB, 3, EM, EN, device=DEVICE)), ValueError, r"target"),
    ("target_int", _err(target=lambda: torch.ones(EB, 1, EM, EN, dtype=torch.long, device=DEVICE)), TypeError,
     r"target"),
    ("target_not_tensor", _err(target="probs"), TypeError, r"target"),
    ("target_device", _err(target=lambda: torch.empty(EB, 1, EM, EN, device="meta")), ValueError, r"target"),
    ("target_triple", _err(target=lambda: (_x(EB, 1, EM, 4), _x(EB, 1, EN, 4), _x(1))), ValueError,
     r"\(q_t, k_t\)"),
    ("q_t_batch", _err(target=_pair((EB + 1, 1, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_heads", _err(target=_pair((EB, 3, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_rows", _err(target=_pair((EB, 1, EM + 1, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("q_t_3d", _err(target=_pair((EB, EM, 4), (EB, 1, EN, 4))), ValueError, r"q_t"),
    ("k_t_keys", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN + 1, 4))), ValueError, r"k_t"),
    ("k_t_dim", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN, 5))), ValueError, r"k_t"),
    ("k_t_batch", _err(target=_pair((EB, 1, EM, 4), (EB + 1, 1, EN, 4))), ValueError, r"k_t"),
    ("teacher_heads_not_divisible", _err(target=_pair((EB, EH, EM, 4), (EB, 3, EN, 4))), ValueError, r"Htk|heads"),
    ("teacher_dtypes", _err(target=_pair((EB, 1, EM, 4), (EB, 1, EN, 4), kt_dtype=torch.float16)), TypeError,
     r"q_t"),
    ("q_t_int", _err(target=lambda: (_x(EB, 1, EM, 4).long(), _x(EB, 1, EN, 4))), TypeError, r"q_t"),
    ("k_t_not_tensor", _err(target=lambda: (_x(EB, 1, EM, 4), None)), TypeError, r"k_t"),
    ("teacher_device", _err(target=lambda: (_x(EB, 1, EM, 4, device="meta"), _x(EB, 1, EN, 4, device="meta"))),
     TypeError, r"q_t"),
    ("scale_t_with_dense", _err(scale_t=0.5), ValueError, r"scale_t"),
    ("reduction", _err(reduction="avg"), ValueError, r"reduction"),
    ("target_is", _err(target_is="probabilities"), ValueError, r"target_is"),
    ("temperature", _err(temperature=0), ValueError, r"temperature"),
    ("temperature_negative", _err(temperature=-2.0), ValueError, r"temperature"),
    ("key_mask_dtype", _err(key_mask=lambda: torch.ones(EN, dtype=torch.uint8, device=DEVICE)), TypeError,
     r"key_mask"),
    ("key_mask_shape", _err(key_mask=lambda: torch.ones(EB, 1, EM + 1, EN, dtype=torch.bool, device=DEVICE)),
     ValueError, r"key_mask"),
    ("backend", _err(backend="jax"), ValueError, r"backend"),
    ("validate", _err(target=lambda: torch.rand(EB, 1, EM, EN, device=DEVICE) * 3, validate=True), ValueError,
     r"validate"),
]


@pytest.mark.parametrize("build,exc,pattern", [pytest.param(b, e, p, id=i) for i, b, e, p in ERROR_CASES])
def test_errors(build, exc, pattern):
    kw = build()
    with pytest.raises(exc, match=pattern):
        attention_kl_qk(kw.pop("q"), kw.pop("k"), kw.pop("target"), **kw)
