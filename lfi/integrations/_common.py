"""Shared helpers of the drop-in integrations: class swapping and the patch report."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from lfi._dispatch import CHOICES

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


def warn_skipped(report: PatchReport, what: str) -> None:
    if report.skipped:
        listed = ", ".join(f"{n} ({c})" for n, c, _ in report.skipped[:10])
        more = f" and {len(report.skipped) - 10} more" if len(report.skipped) > 10 else ""
        warnings.warn(
            f"{what}: {len(report.skipped)} attention module(s) were not converted to lfi and keep their own "
            f"attention (capture_attention does not see them): {listed}{more}. See the returned PatchReport.",
            UserWarning,
            stacklevel=3,
        )


def looks_like_attention(m: nn.Module) -> bool:
    return "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower()
