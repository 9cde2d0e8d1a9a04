"""Drop-in integrations, imported lazily (each needs its own optional dependency):

* ``lfi.integrations.timm`` — ``patch(model)`` / ``unpatch(model)`` for ``timm.layers.Attention``.
* ``lfi.integrations.open_clip`` — ``patch(model)`` / ``unpatch(model)`` for open_clip towers.
* ``lfi.integrations.transformers`` — ``register()``: ``attn_implementation="lfi"``.

Install the optional dependencies with ``pip install 'lfi[integrations]'``.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("timm", "open_clip", "transformers")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"lfi.integrations.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'lfi.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
