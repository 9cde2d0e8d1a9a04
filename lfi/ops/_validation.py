"""Input checks shared by the public ops: every error names the argument and what was expected."""
from __future__ import annotations

import numbers
import operator

import torch

from lfi._numerics import MAX_HEAD_DIM

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndims: tuple[int, ...], layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got {t.dim()} dims ({_describe(t)})")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Checks q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv), all 4-D (callers unsqueeze 3-D).

    Runs on every call: each shape is read once (a torch.Size per access is not free)."""
    B, H, M, D = q.shape
    kB, Hkv, N, kD = k.shape
    vB, vH, vN, Dv = v.shape
    if kB != B or vB != B:
        raise ValueError(
            f"batch sizes differ: q has B={B}, k has B={kB}, v has B={vB}; "
            "expected q (B, H, M, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv)"
        )
    if vH != Hkv:
        raise ValueError(f"k has {Hkv} heads but v has {vH}: expected v (B, Hkv, N, Dv) with Hkv={Hkv}")
    if Hkv == 0 and H != 0:
        raise ValueError(f"k has Hkv=0 heads but q has H={H}: expected k (B, Hkv, N, D) with Hkv >= 1")
    if Hkv != 0 and H % Hkv != 0:
        raise ValueError(
            f"q has H={H} heads and k has Hkv={Hkv}: grouped-query attention needs H % Hkv == 0"
        )
    if kD != D:
        raise ValueError(f"head dims differ: q has D={D}, k has D={kD}; expected k (B, Hkv, N, {D})")
    if vN != N:
        raise ValueError(
            f"k has N={N} keys but v has {vN}: expected v (B, Hkv, {N}, Dv)"
        )
    for name, t, d in (("q", q, D), ("k", k, kD), ("v", v, Dv)):
        if d > MAX_HEAD_DIM or d < 1:
            raise ValueError(f"{name} head dim must be in 1..{MAX_HEAD_DIM}, got {d} ({_describe(t)})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    device = q.device
    if not (k.device == device and v.device == device):
        raise ValueError(f"q, k and v must be on one device, got q {device}, k {k.device}, v {v.device}")


def empty_dims(q: torch.Tensor, k: torch.Tensor) -> list[str]:
    """The names of the empty dims of q (B, H, M, D) / k (B, Hkv, N, D), e.g. ["M=0"]; [] if none.

    What the ops do with them (check_qkv lets them through):
    - interaction_attention returns what F.scaled_dot_product_attention returns on CPU: B, H or
      M = 0 give empty outputs (B, H, M, Dv) and empty maps; N = 0 (no key at all) makes every
      query row fully masked, and our contract for such rows (zeros in out and maps, zero KL and
      zero gradients, never NaN) is also what SDPA gives there, so out is zeros (B, H, M, Dv),
      the maps (B, H, R, 0). These results are cheap (no kernel runs) and keep a model working
      on an empty batch, as SDPA does.
    - attention_kl and attention_kl_qk raise a ValueError naming the empty dim: a reduced KL loss
      over no rows has no meaningful value ("batchmean" / "mean" would be 0 / 0)."""
    B, H, M, _ = q.shape
    N = k.shape[2]
    return [f"{n}=0" for n, size in (("B", B), ("H", H), ("M", M), ("N", N)) if size == 0]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ValueError: the KL ops raised ValueError for these
    before, so callers catching either keep working."""


def check_float(name: str, value, *, none_ok: bool = False, positive: bool = False,
                unit_interval: bool = False):
    """`value` as a Python float: a real, finite number (not a bool, str or tensor), or None when
    `none_ok`. positive: > 0; unit_interval: in [0, 1). Wrong types raise ArgumentTypeError,
    bad values ValueError; both messages name `name` and what was expected."""
    expected = "a finite real number"
    if positive:
        expected += " > 0"
    if unit_interval:
        expected += " in [0, 1)"
    if none_ok:
        expected += " or None"
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    x = float(value)
    # x - x == 0 exactly when x is finite (inf - inf and NaN - NaN are NaN): unlike math.isfinite, it
    # also traces under torch.compile(dynamic=True), where a float argument may be a SymFloat.
    if not x - x == 0.0 or (positive and not x > 0) or (unit_interval and not 0.0 <= x < 1.0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return x


def _index(name: str, value, x, expected: str) -> int:
    """x, an item of the argument `value`, as an int: Python ints and integer types with __index__
    (numpy ints, integer 0-dim tensors); not bool, float or str."""
    bad = isinstance(x, (bool, str, bytes))
    if not bad:
        try:
            return operator.index(x)
        except TypeError:
            bad = True
    raise ArgumentTypeError(f"{name} must be {expected}, got {value!r}: item {x!r} ({type(x).__name__}) is not an int")


def normalize_mask(attn_mask, B: int, H: int, M: int, N: int, q: torch.Tensor):
    """Returns the mask as a 4-D view broadcastable to (B, H, M, N) (no copy), or None."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor (bool or float) or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(
            f"attn_mask must be bool (True = attend) or floating point (added to the scores), got {attn_mask.dtype}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    if attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must broadcast to (B, H, M, N) = {(B, H, M, N)}, got shape {tuple(attn_mask.shape)}")
    mask = attn_mask
    if attn_mask.dim() < 4:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    for size, want in zip(mask.shape, (B, H, M, N)):
        if size not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, M, N) = {(B, H, M, N)}"
            )
    return mask


def check_weights_rows(weights_rows, need_weights: bool, M: int) -> tuple[int, int]:
    """Returns (start, stop) of the query rows whose weights are returned; (0, 0) when none are."""
    if weights_rows is None:
        return (0, M) if need_weights else (0, 0)
    if not need_weights:
        raise ValueError("weights_rows is only meaningful with need_weights=True")
    expected = "a (start, stop) pair of ints or a slice of ints with step 1"
    if isinstance(weights_rows, slice):
        if weights_rows.step not in (None, 1):
            raise ValueError(f"weights_rows must be a contiguous range, got step {weights_rows.step}")
        for x in (weights_rows.start, weights_rows.stop):
            if x is not None:
                _index("weights_rows", weights_rows, x, expected)
        # Python slice semantics: negative bounds count from the end, None means the edge.
        start, stop, _ = weights_rows.indices(M)
    else:
        try:
            items = None if isinstance(weights_rows, (str, bytes)) else tuple(weights_rows)
        except TypeError:
            items = None
        if items is None or len(items) != 2:
            raise ArgumentTypeError(
                f"weights_rows must be {expected}, got {weights_rows!r} ({type(weights_rows).__name__})")
        start, stop = (_index("weights_rows", weights_rows, x, expected) for x in items)
    if not 0 <= start < stop <= M:
        raise ValueError(f"weights_rows must satisfy 0 <= start < stop <= M = {M}, got ({start}, {stop})")
    return start, stop


def as_4d(name: str, t, shape: tuple[int, int, int, int], what: str) -> torch.Tensor:
    """A view of `t` with dims left-padded to 4 that broadcasts to `shape`; errors name `name`."""
    if t.dim() > 4:
        raise ValueError(f"{name} must broadcast to {what} = {tuple(shape)}, got shape {tuple(t.shape)}")
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    for size, want in zip(t4.shape, shape):
        if size not in (1, want):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {what} = {tuple(shape)}")
    return t4


def check_key_mask(key_mask, shape, device) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = keep the key) or None, got "
                        f"{key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__}")
    if key_mask.device != device:
        raise ValueError(f"key_mask is on {key_mask.device} but the student is on {device}")
    return as_4d("key_mask", key_mask, shape, "(B, H, M, N)")


def check_enable_gqa(enable_gqa, H: int, Hkv: int) -> None:
    """enable_gqa as in F.scaled_dot_product_attention: True allows grouped-query heads (H % Hkv == 0,
    checked by check_qkv); False requires H == Hkv and raises SDPA's error type (RuntimeError)
    otherwise. None (lfi's default) allows grouped heads implicitly, as lfi always has: every call
    that SDPA accepts behaves the same, and callers that pass unexpanded kv heads without the
    keyword (lfi's integrations, existing code) keep working."""
    if enable_gqa is None:
        return
    if not isinstance(enable_gqa, bool):
        raise ArgumentTypeError(f"enable_gqa must be a bool or None, got {enable_gqa!r} ({type(enable_gqa).__name__})")
    if not enable_gqa and H != Hkv:
        raise RuntimeError(
            f"enable_gqa=False but q has H={H} heads and k, v have Hkv={Hkv}: without grouped-query attention "
            "the head counts must match (F.scaled_dot_product_attention raises here too); pass enable_gqa=True "
            "(or leave it None) for grouped-query heads, H % Hkv == 0")
