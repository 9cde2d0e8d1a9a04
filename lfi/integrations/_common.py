"""Shared helpers of the drop-in integrations: class swapping, the patch report, the rule that sends
calls asking nothing of lfi to the original forward, the TorchScript path and SDPA interception.

How a converted module runs (every integration follows it):

* No maps requested (no ``capture_attention`` of the module, no ``need_weights`` / hooks asking for
  them) and backend "auto" (module attribute ``lfi_backend`` and ``LFI_BACKEND``): the original
  class's forward runs, so outputs are bit-identical to the unpatched model (``runs_original``).
* Maps requested, or an explicit backend: lfi's fused op runs (``lfi.capture.attend``).
* Under ``torch.jit.script``: the original forward is compiled (``script_copy``); under
  ``torch.jit.trace`` the original forward is recorded. TorchScript programs never hold lfi's op:
  they are bit-identical to the scripted / traced unpatched module (maps, where the original
  returns any, are the original's).
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lfi._dispatch import CHOICES, env_backend
from lfi.capture import attend, capturing

_ORIG_CLASS = "_lfi_orig_class"
_BACKEND = "lfi_backend"


@dataclass
class PatchReport:
    """What ``patch`` / ``unpatch`` did.

    patched: names of the modules whose class was swapped.
    already: names of modules that were already lfi modules (left as they were).
    skipped: (name, class name, reason) of attention-like modules that were *not* converted
        (e.g. timm's EVA / RoPE attention variants): they keep running their own attention and
        ``capture_attention`` does not see them.
    """

    patched: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patched)

    def __bool__(self) -> bool:
        return True

    def summary(self) -> str:
        lines = [f"{len(self.patched)} module(s) converted, {len(self.already)} already lfi, "
                 f"{len(self.skipped)} attention-like module(s) not converted"]
        lines += [f"  not converted: {n} ({c}): {r}" for n, c, r in self.skipped]
        return "\n".join(lines)


def check_backend(backend: str) -> str:
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def swap(m: nn.Module, new_cls: type, backend: Optional[str]) -> None:
    """m.__class__ = new_cls, remembering the original class (unpatch restores it)."""
    m.__dict__[_ORIG_CLASS] = type(m)
    m.__class__ = new_cls
    if backend is not None and backend != "auto":
        m.__dict__[_BACKEND] = backend


def unswap(m: nn.Module, default: type) -> bool:
    """Restores the class `swap` replaced (or `default`); False if `m` was not swapped by lfi."""
    if not getattr(type(m), "_lfi_attention", False):
        return False
    m.__class__ = m.__dict__.pop(_ORIG_CLASS, default)
    m.__dict__.pop(_BACKEND, None)
    m.__dict__.pop("_lfi_capture", None)
    return True


def set_backend(m: nn.Module, backend: str) -> None:
    if backend == "auto":
        m.__dict__.pop(_BACKEND, None)
    else:
        m.__dict__[_BACKEND] = backend


def warn_skipped(report: PatchReport, what: str, stacklevel: int = 3) -> None:
    """Warns (UserWarning, at `stacklevel`) about the attention modules `report` lists as skipped."""
    if report.skipped:
        listed = ", ".join(f"{n} ({c})" for n, c, _ in report.skipped[:10])
        more = f" and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        warnings.warn(
            f"{what}: {len(report.skipped)} attention module(s) were not converted to lfi and keep their own "
            f"attention (capture_attention does not see them): {listed}{more}. See the returned PatchReport.",
            UserWarning,
            stacklevel=stacklevel,
        )


def convert_modules(model: nn.Module, backend: str, choose: Callable[[nn.Module], tuple[Optional[type], str]],
                    unconverted_reason: Callable[[nn.Module], str], warn: bool, what: str) -> PatchReport:
    """The conversion loop of the integrations' ``patch``: every module of `model` (the model itself
    included) that is already an lfi module gets `backend` (``report.already``); otherwise
    ``choose(m)`` -> (lfi class, "") converts it (``report.patched``) or (None, reason) with a
    non-empty reason lists it as skipped ((None, "") leaves it alone). Attention-like modules left
    unconverted and not listed yet are listed with ``unconverted_reason(m)``; `warn` warns about the
    skipped ones, naming `what` (e.g. "lfi.integrations.timm.patch")."""
    check_backend(backend)
    report = PatchReport()
    converted: set[int] = set()
    for name, m in model.named_modules():
        if getattr(type(m), "_lfi_attention", False):
            set_backend(m, backend)
            report.already.append(name)
            continue
        new_cls, reason = choose(m)
        if new_cls is not None:
            swap(m, new_cls, backend)
            report.patched.append(name)
            converted.add(id(m))
        elif reason:
            report.skipped.append((name, type(m).__name__, reason))
    listed = {n for n, _, _ in report.skipped}
    for name, cls_name in unconverted_attention(model, converted):
        if name not in listed:
            report.skipped.append((name, cls_name, unconverted_reason(model.get_submodule(name))))
    if warn:
        warn_skipped(report, what, stacklevel=4)
    return report


def restore_modules(model: nn.Module, originals) -> PatchReport:
    """The integrations' ``unpatch``: restores the class every converted module of `model` had
    (``swap`` remembers it), else the original class paired with its lfi class in `originals`
    ((lfi class, original class) pairs, the first match wins: modules built as lfi classes)."""
    report = PatchReport()
    for name, m in model.named_modules():
        original = next((orig for lfi_cls, orig in originals if isinstance(m, lfi_cls)), None)
        if original is not None and unswap(m, original):
            report.patched.append(name)
    return report


# --------------------------------------------------------------------------------------------
# When lfi runs, and what runs otherwise
# --------------------------------------------------------------------------------------------
def runs_original(module: nn.Module) -> bool:
    """True when a call of the converted `module` asks nothing of lfi: no active capture and backend
    "auto" (its ``lfi_backend`` and ``LFI_BACKEND``), or ``torch.jit.trace`` is recording it (a
    TorchScript program, traced or scripted, is the original module's). The module then runs its
    original class's forward, the exact computation of the unpatched model. Callers add their own
    map requests (``need_weights``, ``output_attentions``, hooks that must see the maps)."""
    if torch.jit.is_tracing():
        return True
    return not capturing(module) and getattr(module, "lfi_backend", "auto") == "auto" and env_backend() == "auto"


def script_copy(fn, name: str = "_lfi_orig_forward"):
    """A copy of the function `fn` (an original class's ``forward``) named `name`, to be stored as a
    class attribute of the lfi class and called as ``self._lfi_orig_forward(...)`` in its
    ``torch.jit.is_scripting()`` branch: TorchScript then compiles the original forward's source
    (under the new name: it refuses two methods named ``forward``), so a scripted converted module is
    the scripted original module."""
    g = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    functools.update_wrapper(g, fn)
    del g.__wrapped__  # inspect.getsource must read this function's own code, not follow the wrapper
    g.__name__ = g.__qualname__ = name
    g.__kwdefaults__ = fn.__kwdefaults__
    return g


_SDPA = F.scaled_dot_product_attention


class _SDPAToLfi(TorchFunctionMode):
    """Runs every ``F.scaled_dot_product_attention`` call made while active as ``lfi.capture.attend``
    of `module` (same arguments and semantics: bool mask True = attend or additive float mask,
    dropout, is_causal, scale; grouped-query heads natively), so the capture receives the maps."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        out, _ = attend(self.module, query, key, value, attn_mask, dropout_p, is_causal, scale)
        return out


class SDPAAttention:
    """Mixin of the lfi classes made for attention modules whose own forward calls
    ``F.scaled_dot_product_attention`` once per call (timm's ``fused_attn`` path).

    ``class LfiX(SDPAAttention, X)`` keeps X's forward untouched — so ``torch.jit.script`` and
    ``torch.jit.trace`` see exactly X — and wraps the call: when nothing asks lfi for anything
    (``runs_original``) the call is X's, bit for bit; when a capture is active (or an explicit
    backend is set) X's forward runs with its fused path switched on (``fused_attn = True`` for the
    call) and its SDPA call runs as ``lfi.capture.attend``, which computes the requested rows' maps.
    """

    _lfi_attention = True
    lfi_backend: str = "auto"

    def __call__(self, *args, **kwargs):
        if runs_original(self):
            return super().__call__(*args, **kwargs)
        d = self.__dict__
        fused = d.get("fused_attn", None)
        if fused is not None:
            d["fused_attn"] = True  # the eager (non-fused) path computes softmax itself: no SDPA call to take
        try:
            with _SDPAToLfi(self):
                return super().__call__(*args, **kwargs)
        finally:
            if fused is not None:
                d["fused_attn"] = fused


# --------------------------------------------------------------------------------------------
# Finding attention-like modules (for the report)
# --------------------------------------------------------------------------------------------
# child modules / parameters whose presence marks an attention module: fused or separate q, k, v
# projections under the names common in timm, open_clip, torch and Hugging Face code
_PROJECTION_SETS = (
    ("qkv",), ("to_qkv",), ("in_proj_weight",), ("q", "k", "v"), ("q", "kv"), ("q_proj", "k_proj", "v_proj"),
    ("to_q", "to_k", "to_v"), ("query", "key", "value"), ("q_proj", "kv_proj"),
)
_ATTENTION_CALLS = ("scaled_dot_product_attention", "multi_head_attention_forward", "flex_attention")


@functools.lru_cache(maxsize=None)
def _forward_calls_attention(cls: type) -> bool:
    """Whether the source of cls.forward calls an attention function (False when it cannot be read)."""
    fwd = getattr(cls, "forward", None)
    if fwd is None or fwd is nn.Module.forward:
        return False
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):
        return False
    return any(name in src for name in _ATTENTION_CALLS)


def looks_like_attention(m: nn.Module) -> bool:
    """Whether `m` computes attention itself: an ``nn.MultiheadAttention``, a module with q/k/v
    projections (``qkv``, ``q``/``k``/``v``, ``q``/``kv``, ``q_proj``/``k_proj``/``v_proj``, ...), a
    class whose forward calls SDPA / ``multi_head_attention_forward``, or a class named ``*Attention``
    / ``*Attn`` / ``*AttentionPool*``. Containers of such modules (blocks) are not."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    names = set(m._modules) | set(m._parameters)
    if any(all(n in names for n in group) for group in _PROJECTION_SETS):
        return True
    cls = type(m)
    lower = cls.__name__.lower()
    if lower.endswith(("attention", "attn")) or "attentionpool" in lower or "attnpool" in lower:
        return True
    return _forward_calls_attention(cls)


def unconverted_attention(model: nn.Module, converted: set[int]) -> list[tuple[str, str]]:
    """(name, class name) of the attention-like modules of `model` that are neither lfi modules nor in
    `converted` (ids), nor inside one of them (their projections are not separate attention)."""
    found = []
    inside: list[str] = []  # name prefixes of the modules already accounted for ("" is the root)
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if getattr(type(m), "_lfi_attention", False) or id(m) in converted or looks_like_attention(m):
            if not (getattr(type(m), "_lfi_attention", False) or id(m) in converted):
                found.append((name, type(m).__name__))
            inside.append(name + "." if name else "")
    return found
