"""Options shared by the KL ops: target kinds, temperature, reductions, target validation."""
from __future__ import annotations

import torch

from lfi.ops._validation import FLOAT_DTYPES, as_4d, check_float

TARGET_KINDS = ("probs", "logits", "log_probs")
REDUCTIONS = ("batchmean", "mean", "sum", "none")


def check_options(target_is: str, temperature, reduction: str) -> float:
    """Checks the shared options; returns temperature as a float."""
    if target_is not in TARGET_KINDS:
        raise ValueError(f"target_is must be one of {TARGET_KINDS}, got {target_is!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return check_float("temperature", temperature, positive=True)


def target_scale(target_is: str, temperature: float) -> float:
    """Logit targets share the student's temperature; log-probabilities are taken as they are."""
    return 1.0 / temperature if target_is == "logits" else 1.0


def check_dense_target(target, shape, student: torch.Tensor, target_is: str, validate: bool) -> torch.Tensor:
    """The dense target as a 4-D view broadcastable to `shape` = (B, H, M, N)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor broadcastable to (B, H, M, N) = {tuple(shape)}, "
                        f"got {type(target).__name__}")
    if target.dtype not in FLOAT_DTYPES:
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if target.device != student.device:
        raise ValueError(f"target is on {target.device} but the student is on {student.device}")
    target4 = as_4d("target", target, shape, "(B, H, M, N)")
    # Checks of the values are skipped while torch.compile traces (they are data-dependent).
    if not torch.compiler.is_compiling():
        if target_is == "probs" and (validate or checks_values_free(target)) and bool((target < 0).any()):
            raise ValueError("target has negative probabilities (target_is='probs' needs target >= 0)")
        if validate:
            _check_rows_sum_to_one(target, target_is)
    return target4


def checks_values_free(t: torch.Tensor) -> bool:
    """Whether a check of t's values runs on every call. On the CPU it costs a pass over t; on a
    GPU reading its result waits for the device: a host-device synchronisation per call, which
    drains the launch queue (the host then launches every following kernel while the GPU idles) and
    is not allowed while a CUDA graph is captured. There the values are checked only with
    validate=True; unchecked, a negative probability makes its row's KL NaN in every backend (as
    F.kl_div), never a wrong number."""
    return t.device.type == "cpu"


def _check_rows_sum_to_one(target: torch.Tensor, target_is: str) -> None:
    if target_is == "logits":
        return
    t = target.double()
    mass = t.sum(-1) if target_is == "probs" else torch.logsumexp(t, -1).exp()
    tol = 1e-3 if target.dtype in (torch.float16, torch.bfloat16) else 1e-5
    worst = (mass - 1).abs().max().item()
    if not worst <= tol * target.shape[-1] ** 0.5 + tol:
        raise ValueError(f"validate=True: target rows must sum to 1 over the keys, worst row is off by {worst:.3g}")


def reduce_rows(kl: torch.Tensor, reduction: str, batch: int) -> torch.Tensor:
    """'none': per row; 'sum': over all rows; 'mean': sum / number of rows;
    'batchmean': sum / batch (the student's leading dim, as in F.kl_div)."""
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    # max(1, .): an empty input (interaction_attention with B, H or M = 0) reduces to 0, not 0 / 0.
    return total / max(1, kl.numel() if reduction == "mean" else batch)
