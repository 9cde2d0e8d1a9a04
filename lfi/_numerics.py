"""Numeric rules every op and backend shares (one definition each).

Row statistics. Every backend stores a softmax row's statistics as the pair (m, log l): the row max
m and l = sum exp(s - m), never folded into one logsumexp lse = m + log l. With huge scores (a
whole row at -1e30 or finfo.min from a float mask) m + log l rounds to m, and exp(s - lse) would
lose the 1/l: the pair keeps P = exp(s - m) / l exact (the uniform row, as in SDPA). A row with no
attended key stores (0, +inf), so its P is exactly 0. The KL ops keep the target's statistics the
same way, as (shift, log z). The kernels, the reference backend and the C++ structs point here.
"""
import torch

MAX_HEAD_DIM = 256  # the largest head dim any backend takes (Triton / CUDA tile tables stop there)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: float64 for float64, float32 otherwise
    (float16 / bfloat16 products and softmax statistics accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
