"""Lazy attributes of a package (PEP 562), so that importing it stays light.

One definition for every package of lfi that defers an optional or heavy import (timm, open_clip,
transformers, the training layer):

    __getattr__, __dir__, __all__ = lazy_names(__name__, {"Trainer": "lfi.train.trainer"}, submodules=("x",))

A name is imported on first access and then stored in the package's namespace, so later look-ups are
plain attribute reads. ``hints`` maps a name to the message of the ImportError raised when its module
cannot be imported (e.g. which optional dependency to install).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Mapping, Sequence


def lazy_names(package: str, attrs: Mapping[str, str], submodules: Sequence[str] = (),
               hints: Mapping[str, str] | None = None) -> tuple[Callable, Callable, list]:
    """Returns (__getattr__, __dir__, __all__) for `package`.

    attrs: public name -> module defining it; submodules: names of subpackages imported on access
    (``package.name``); hints: public name -> ImportError message when its module is missing."""
    hints = dict(hints or {})

    def __getattr__(name: str):
        if name in attrs:
            try:
                value = getattr(importlib.import_module(attrs[name]), name)
            except ImportError as exc:
                if name in hints:
                    raise ImportError(hints[name]) from exc
                raise
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(attrs) | set(submodules))

    return __getattr__, __dir__, sorted(set(attrs) | set(submodules))
