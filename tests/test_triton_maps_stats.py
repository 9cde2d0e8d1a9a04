"""The row statistics of the Triton forward's maps path.

Rows that write maps take two passes over the keys: the first finds each row's max m and sum l,
the second writes P = exp(S - m) / l exactly. With 16-bit inputs the first pass sums the rows on the
tensor cores (P rounded to float16, float32 accumulation; kernels/interaction_attention.py,
`_ones_column`), rescaling the running sums whenever a later key block raises the row max. These
tests pin that: the pair (m, log l) the maps path stores agrees with the single-pass (no maps)
path and with the float64 logsumexp within the float16 rounding of P (relative 2^-11 per term), on
keys whose scores grow along the row so that the max moves in every key block.
"""
from __future__ import annotations

import pytest
import torch

from helpers import BACKENDS
from helpers import make_gen
from helpers import make_qkv
from reference import reference_lse

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not usable here")

# log l moves by at most 2^-11 (relative rounding of each P <= 1) plus float32 rounding.
LOG_L_TOL = 2.0 ** -10


def _rising_keys(dtype, causal):
    """q, k, v with M != N, N not a multiple of any block, D = 40, whose scores rise along the keys
    (each key scaled by 1 + 3 n / N) so that the row max grows from block to block."""
    q, k, v = make_qkv(1, 2, 2, 37, 37 if causal else 150, 40, dtype=torch.float32, gen=make_gen(5))
    ramp = 1.0 + 3.0 * torch.arange(k.shape[2], dtype=torch.float32, device=k.device) / k.shape[2]
    return q.to(dtype), (k * ramp[:, None]).to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_maps_pass_statistics(dtype, causal):
    from lfi.backends.triton.interaction_attention import attention_forward

    q, k, v = _rising_keys(dtype, causal)
    M = q.shape[2]
    scale = q.shape[-1] ** -0.5
    _, stats_maps, maps, _, _ = attention_forward(q, k, v, None, scale, causal, 0, M)
    _, stats_online, _, _, _ = attention_forward(q, k, v, None, scale, causal, 0, 0)
    assert maps.shape == (1, 2, M, k.shape[2])
    lse_maps = stats_maps[..., 0].double() + stats_maps[..., 1].double()
    lse_online = stats_online[..., 0].double() + stats_online[..., 1].double()
    torch.testing.assert_close(lse_maps, lse_online, atol=LOG_L_TOL, rtol=0)
    torch.testing.assert_close(lse_maps, reference_lse(q, k, is_causal=causal), atol=LOG_L_TOL, rtol=0)
    # The maps are normalised by that l: each row sums to 1 up to the maps' own rounding.
    row_sums = maps.double().sum(-1)
    torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=2e-2 if dtype == torch.bfloat16 else 4e-3,
                               rtol=0)
