"""Capture exact attention maps from models whose attention runs through lfi.

```python
lfi.integrations.timm.patch(model)
with lfi.capture_attention(model, layers=[-1], rows=slice(0, 1)) as maps:
    logits = model(x)
maps[-1]          # (B, H, 1, N): the CLS row of the last layer's softmax maps
```

Which modules count as attention layers: every module of a class made by lfi (the timm, open_clip
and ``nn.MultiheadAttention`` drop-ins, class attribute ``_lfi_attention = True``) and, for
Hugging Face models loaded with ``attn_implementation="lfi"``, the modules whose second output the
model records as ``attentions``. ``attention_modules(model)`` lists them in ``named_modules`` order;
``layers`` indexes that list.

Protocol for layer implementations (all of lfi's integrations follow it): one call,

    out, maps = attend(module, q, k, v, attn_mask, dropout_p, is_causal, scale)

which asks ``capture_rows(module, M)`` for the rows to compute (None when no capture is active),
runs ``interaction_attention(..., need_weights=rows is not None, weights_rows=rows)`` and hands the
maps to the capture with ``deliver(module, maps, M, start)``. ``capturing(module)`` says whether a
capture is active for the module (layers skip lfi entirely when it is not and nothing else asks
for maps, see ``lfi.integrations``).

Only the requested rows are computed by the op (``weights_rows``), so capturing the CLS row of a
ViT never materializes an N x N map.
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from lfi.ops.interaction_attention import interaction_attention

__all__ = ["capture_attention", "AttentionMaps", "attention_modules", "capture_rows", "deliver", "capturing", "attend"]

_SPEC_ATTR = "_lfi_capture"

# Finders contributed by integrations (e.g. Hugging Face): fn(model) -> iterable of attention
# modules that are not lfi classes themselves but run through lfi.
_FINDERS: list[Callable[[nn.Module], Iterable[nn.Module]]] = []


def _register_finder(fn: Callable[[nn.Module], Iterable[nn.Module]]) -> None:
    if fn not in _FINDERS:
        _FINDERS.append(fn)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention layer of `model` that runs through lfi, in module order."""
    extra: set[int] = set()
    for finder in _FINDERS:
        extra.update(id(m) for m in finder(model))
    return [
        (name, m) for name, m in model.named_modules()
        if getattr(type(m), "_lfi_attention", False) or id(m) in extra
    ]


# --------------------------------------------------------------------------------------------
# The per-module capture request and the layer-side protocol
# --------------------------------------------------------------------------------------------
RowsSpec = Union[None, int, slice, Sequence[int]]


_ROWS_FORM = ("None (all rows), an int row, a slice with step 1 or a (start, stop) pair of ints "
              "(rows start..stop-1; negative values count from the end)")


def _int_item(rows, x) -> int:
    if isinstance(x, (bool, str, bytes)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"rows must be {_ROWS_FORM}; got rows={rows!r}, whose item {x!r} is not an int")
    return int(x)


def _rows_pair(rows: RowsSpec) -> tuple[Optional[int], Optional[int]]:
    """(start, stop) as given (None = the edge) for a slice or pair spec; checks the form only."""
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise ValueError(f"rows must be {_ROWS_FORM}; got rows={rows!r} (step {rows.step})")
        return tuple(None if x is None else _int_item(rows, x) for x in (rows.start, rows.stop))
    try:
        items = None if isinstance(rows, (str, bytes)) else tuple(rows)
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise TypeError(f"rows must be {_ROWS_FORM}; got rows={rows!r} ({type(rows).__name__})")
    return _int_item(rows, items[0]), _int_item(rows, items[1])


def _check_rows(rows: RowsSpec) -> None:
    """Checks the form of a rows spec before any call is seen (the range needs M, checked per call):
    its type, and for a pair or slice whose bounds share a sign (so their order does not depend on
    M) that start < stop."""
    if rows is None:
        return
    if isinstance(rows, bool) or not isinstance(rows, numbers.Integral):
        start, stop = _rows_pair(rows)
        if start is not None and stop is not None and (start < 0) == (stop < 0) and start >= stop:
            raise ValueError(f"rows={rows!r} selects no query row: rows must be {_ROWS_FORM}, with start < stop")


def _resolve_rows(rows: RowsSpec, M: int) -> tuple[int, int]:
    """(start, stop) with 0 <= start < stop <= M for a rows spec (None = all rows)."""
    if rows is None:
        return 0, M
    if isinstance(rows, bool):
        raise TypeError(f"rows must be {_ROWS_FORM}; got rows={rows!r} (bool)")
    if isinstance(rows, numbers.Integral):
        r = int(rows) + (M if rows < 0 else 0)
        if not 0 <= r < M:
            raise IndexError(f"rows={rows} is out of range for {M} query rows (an int row must be in -{M}..{M - 1})")
        return r, r + 1
    start, stop, _ = slice(*_rows_pair(rows)).indices(M)
    if start >= stop:
        raise ValueError(f"rows={rows!r} selects no query row out of this call's {M}: rows must be {_ROWS_FORM}, "
                         "selecting at least one row")
    return start, stop


@dataclass
class _Request:
    key: object                  # the key the maps are stored under (the layer index as given)
    rows: RowsSpec
    heads: str                   # "all" or "mean"
    grad: bool
    store: Callable[[object, torch.Tensor], None]


def capture_rows(module: nn.Module, M: int) -> Optional[tuple[int, int]]:
    """The (start, stop) query rows whose maps `module` must compute in this call, or None when
    no capture is active for it. M is the number of query rows of the call."""
    req = getattr(module, _SPEC_ATTR, None)
    if req is None:
        return None
    return _resolve_rows(req.rows, M)


def deliver(module: nn.Module, weights: torch.Tensor, M: int, start: int = 0) -> None:
    """Hands maps (B, H, R, N) holding query rows start..start+R-1 (of M) to the active capture of
    `module`. `weights` may cover more rows than were requested (e.g. when the layer computed all
    of them anyway); the requested rows are sliced out here."""
    req = getattr(module, _SPEC_ATTR, None)
    if req is None:
        return
    r0, r1 = _resolve_rows(req.rows, M)
    if (r0, r1) != (start, start + weights.shape[-2]):
        weights = weights[..., r0 - start : r1 - start, :]
    if req.heads == "mean":
        weights = weights.mean(1)
    if not req.grad:
        weights = weights.detach()
    req.store(req.key, weights)


def capturing(module: nn.Module) -> bool:
    """True while a ``capture_attention`` block selects `module`."""
    return getattr(module, _SPEC_ATTR, None) is not None


def attend(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    *,
    all_rows: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention of one lfi layer call: ``interaction_attention`` computing the maps of the rows
    the active capture of `module` asks for (or of every row when `all_rows`), handed to the capture.

    Args:
        module: the attention layer (its ``lfi_backend`` attribute is the backend unless `backend`
            is given; its capture request, if any, selects the rows).
        q: (B, H, M, D); k: (B, Hkv, N, D); v: (B, Hkv, N, Dv); attn_mask, dropout_p, is_causal,
            scale: as ``lfi.interaction_attention`` (bool mask True = attend, or additive float).
        all_rows: compute the maps of all M rows (e.g. ``need_weights=True`` of the caller).
        backend: overrides the module's backend.

    Returns:
        (out (B, H, M, Dv), maps) where maps is None when no row was asked for, else (B, H, R, N)
        for the computed rows (all M rows when `all_rows`, else those of the capture); the maps are
        in the autograd graph (the capture detaches its copy unless ``grad=True``).
    """
    M = q.shape[-2]
    rows = (0, M) if all_rows else capture_rows(module, M)
    if backend is None:
        backend = getattr(module, "lfi_backend", "auto")
    res = interaction_attention(
        q, k, v, attn_mask, dropout_p, is_causal, scale,
        need_weights=rows is not None, weights_rows=rows, backend=backend,
    )
    if rows is None:
        return res, None
    out, weights = res
    deliver(module, weights, M, rows[0])
    return out, weights


# --------------------------------------------------------------------------------------------
# The user-facing container and context manager
# --------------------------------------------------------------------------------------------
class AttentionMaps:
    """Maps captured by `capture_attention`, keyed by the layer index as given.

    ``maps[-1]`` works whether -1 or its positive equivalent was requested; ``len``, ``in``,
    iteration (over keys), ``keys()``, ``values()``, ``items()`` and ``get`` behave like a dict.
    ``names[key]`` is the module name of each layer. A layer called several times inside the
    context keeps the maps of its last call.
    """

    def __init__(self, keys: Sequence[object], index_of: dict, names: dict, num_layers: int):
        self._keys = list(keys)
        self._index_of = index_of       # key -> non-negative layer index
        self.names = names              # key -> module name
        self.num_layers = num_layers
        self._data: dict = {}

    # storage (called from inside the layers)
    def _store(self, key, weights: torch.Tensor) -> None:
        self._data[key] = weights

    def _lookup(self, key):
        if key in self._index_of:
            return key
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            idx = int(key) + (self.num_layers if key < 0 else 0)
            for k, i in self._index_of.items():
                if i == idx:
                    return k
        raise KeyError(f"layer {key!r} was not selected for capture; selected: {self._keys}")

    def __getitem__(self, key) -> torch.Tensor:
        k = self._lookup(key)
        if k not in self._data:
            raise KeyError(
                f"no attention maps were recorded for layer {key!r} ({self.names[k]}): the layer did not "
                "run inside the capture_attention block"
            )
        return self._data[k]

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key) -> bool:
        try:
            return self._lookup(key) in self._data
        except KeyError:
            return False

    def keys(self) -> list:
        return [k for k in self._keys if k in self._data]

    def values(self) -> list:
        return [self._data[k] for k in self.keys()]

    def items(self) -> list:
        return [(k, self._data[k]) for k in self.keys()]

    def __iter__(self) -> Iterator:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def clear(self) -> None:
        self._data.clear()

    def __repr__(self) -> str:
        body = ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in self.items())
        return f"AttentionMaps({{{body}}})"


_HEADS = ("all", "mean")


@contextlib.contextmanager
def capture_attention(
    model: nn.Module,
    layers: Union[None, int, Sequence[int]] = None,
    rows: RowsSpec = None,
    heads: str = "all",
    grad: bool = False,
):
    """Context manager: the selected attention layers of `model` also return their exact softmax
    maps while the block runs, computed by the fused op (no eager fallback).

    Args:
        model: a model patched by ``lfi.integrations.timm`` / ``.open_clip``, built with
            ``attn_layer=lfi.nn.InteractionAttention``, or a Hugging Face model with
            ``attn_implementation="lfi"`` (after ``lfi.integrations.transformers.register()``).
        layers: indices into ``attention_modules(model)`` (negative allowed), a single int, or
            None for all layers.
        rows: the query rows to keep: None (all), an int, a slice (negatives allowed, step 1) or a
            (start, stop) pair. Only these rows are computed (``weights_rows``).
        heads: "all" -> (B, H, R, N); "mean" -> head average (B, R, N).
        grad: False stores detached maps; True keeps them in the autograd graph so a loss on the
            maps back-propagates into the model (exact gradients through the softmax).

    Yields:
        AttentionMaps, filled as the layers run: ``maps[i]`` for each requested index ``i``.
    """
    if heads not in _HEADS:
        raise ValueError(f"heads must be one of {_HEADS}, got {heads!r}")
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be a bool, got {grad!r}")
    if rows is not None:
        _check_rows(rows)  # the form early; the range is checked per call
    mods = attention_modules(model)
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no attention layer that runs through lfi. Patch it first: "
            "lfi.integrations.timm.patch(model), lfi.integrations.open_clip.patch(model), "
            "timm.create_model(..., attn_layer=lfi.nn.InteractionAttention), or for Hugging Face "
            "lfi.integrations.transformers.register() and attn_implementation='lfi'."
        )
    L = len(mods)
    if layers is None:
        keys = list(range(L))
    elif isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        keys = [int(layers)]
    else:
        keys = list(layers)
    index_of: dict = {}
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"layers must hold ints, got {k!r}")
        idx = int(k) + (L if k < 0 else 0)
        if not 0 <= idx < L:
            raise IndexError(f"layer index {k} is out of range: the model has {L} lfi attention layers")
        if idx in index_of.values():
            raise ValueError(f"layer {k} selects the same layer as another index in layers={layers!r}")
        index_of[k] = idx
    maps = AttentionMaps(keys, index_of, {k: mods[i][0] for k, i in index_of.items()}, L)
    selected = []
    for k, idx in index_of.items():
        m = mods[idx][1]
        if getattr(m, _SPEC_ATTR, None) is not None:
            raise RuntimeError(f"{mods[idx][0]} is already being captured by another capture_attention block")
        selected.append(m)
    try:
        for k, m in zip(index_of, selected):
            setattr(m, _SPEC_ATTR, _Request(k, rows, heads, grad, maps._store))
        yield maps
    finally:
        for m in selected:
            if _SPEC_ATTR in m.__dict__:
                delattr(m, _SPEC_ATTR)
