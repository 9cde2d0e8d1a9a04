"""LFI: fast, exact attention machinery for Learning from Interactions."""
from lfi._version import __version__
from lfi.ops import interaction_attention  # noqa: E402

__all__ = ["interaction_attention", "capture_attention", "capture", "integrations", "nn", "__version__"]

# Loaded on first use so that `import lfi` stays light (no timm / open_clip / transformers import).
_LAZY_SUBMODULES = ("capture", "integrations", "nn")
_LAZY_ATTRS = {"capture_attention": "lfi.capture"}


def __getattr__(name):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"lfi.{name}")
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lfi' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_SUBMODULES) + list(_LAZY_ATTRS))
