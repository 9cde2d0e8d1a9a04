"""InteractionViT: a timm VisionTransformer with K persistent interaction queries.

See lfi.nn.interaction_queries for how the queries run through the ViT's own blocks. Summary:

* the only new parameters are the K query vectors (K x C), plus one scalar per block with gated
  read-back: for vit_small_patch16_224 with K = 8 that is 3,072 parameters, 0.014 % of the backbone;
* ``student(images)`` with the defaults (read_back="off", head="cls") never touches the queries:
  the prediction, its cost and its numbers are those of the plain timm model;
* ``student(images, return_maps=True)`` also returns a ``QueryMaps`` with, per supervised layer,
  the query rows (q), the patch keys (k) and, on request, the exact maps (B, H, K, Np).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lfi.nn.interaction_queries import InteractionQueries, QueryMaps, check_block

__all__ = ["InteractionViT", "resolve_layers"]

HEADS = ("cls", "cls+queries")


def resolve_layers(spec, depth: int) -> list:
    """'all' | 'last' | 'lastN' | 'firstN' | int | sequence of ints (negative = from the end) -> sorted block ids."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(depth))
        if s == "last":
            return [depth - 1]
        for prefix in ("last", "first"):
            if s.startswith(prefix) and s[len(prefix):].isdigit():
                n = int(s[len(prefix):])
                if not 1 <= n <= depth:
                    raise ValueError(f"supervised_layers={spec!r}: need 1 <= N <= depth={depth}")
                return list(range(depth - n, depth)) if prefix == "last" else list(range(n))
        if all(p.strip().lstrip("-").isdigit() for p in s.split(",")):
            return resolve_layers([int(p) for p in s.split(",")], depth)
        raise ValueError(
            f"supervised_layers must be 'all', 'last', 'lastN', 'firstN', an int or a list of ints, got {spec!r}")
    accepted = "'all', 'last', 'lastN', 'firstN', an int or a list of ints (negative = from the end)"
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, (bool, bytes)) or not hasattr(spec, "__iter__"):
        raise TypeError(f"supervised_layers must be {accepted}, got {spec!r} ({type(spec).__name__})")
    out = []
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"supervised_layers must be {accepted}, got {spec!r} (item {i!r} is not an int)")
        if not -depth <= i < depth:
            raise ValueError(f"supervised_layers: layer {i!r} is out of range for a ViT of depth {depth} "
                             f"(valid: {-depth}..{depth - 1})")
        out.append(i % depth)
    if not out:
        raise ValueError("supervised_layers is empty")
    return sorted(set(out))


def sincos_pos_embed(grid, dim: int) -> Tensor:
    """(gh * gw, dim) fixed 2-D sine-cosine position embeddings (as in MAE / MoCo v3)."""
    gh, gw = grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need embed_dim % 4 == 0, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        out = pos[:, None] * omega[None, :]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, 1).float()


def _create_timm(name: str, pretrained, num_classes, img_size, timm_kwargs: dict) -> nn.Module:
    import timm

    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if pretrained is True:
        raise ValueError(
            "pretrained=True would download weights from the hub; lfi loads local files only: pass "
            "pretrained='/path/to/model.safetensors' (or .pth/.bin) or pretrained=False")
    if pretrained:
        path = Path(os.fspath(pretrained)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"student weights file not found: {path} (pretrained= must be a local file)")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


class InteractionViT(nn.Module):
    """A timm ViT student with K learnable interaction queries.

    Args:
        model: a timm model name (built with ``timm.create_model(model, pretrained=..., num_classes=,
            img_size=, **timm_kwargs)``) or an existing timm VisionTransformer.
        num_queries: K.
        supervised_layers: blocks whose query maps are returned / supervised: "all", "last",
            "lastN", "firstN", an int or a list of ints. The queries enter at the first of them.
        num_classes, img_size, **timm_kwargs: passed to timm.create_model (e.g. patch_size,
            embed_dim, depth, num_heads for a tiny model).
        pretrained: False, or a local weights file (never downloads).
        pos_embed_init: None (timm's init / the pretrained weights) or "sincos": overwrite the
            patch position embeddings with fixed 2-D sin-cos values (still learnable; prefix-token
            entries set to 0). Helps small ViTs trained from scratch (used by the demo).
        read_back: "off" | "on" | "gated" (see InteractionQueries). With "off" the queries never
            change the prediction.
        head: "cls" (the timm head on the pooled tokens, queries unused) or "cls+queries" (a learned
            softmax-weighted sum of the normalised final queries, K weights, is added to the pooled
            feature before the head).
        query_init_std: std of the normal query init.
        backend: lfi op backend for the query attention ("auto").
    """

    def __init__(self, model: Union[str, nn.Module] = "vit_small_patch16_224", num_queries: int = 8,
                 supervised_layers="all", *, num_classes: Optional[int] = None, img_size=None,
                 pretrained=False, read_back: str = "off", head: str = "cls", query_init_std: float = 0.02,
                 pos_embed_init: Optional[str] = None, backend: str = "auto", **timm_kwargs):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if isinstance(model, str):
            self.model_name = model
            vit = _create_timm(model, pretrained, num_classes, img_size, timm_kwargs)
        elif isinstance(model, nn.Module):
            if timm_kwargs or num_classes is not None or img_size is not None or pretrained:
                raise ValueError("num_classes/img_size/pretrained/timm kwargs apply only when `model` is a name")
            self.model_name = getattr(getattr(model, "pretrained_cfg", {}), "get", lambda *_: None)("architecture") \
                or type(model).__name__
            vit = model
        else:
            raise TypeError(f"model must be a timm model name or module, got {type(model).__name__}")
        for attr in ("patch_embed", "blocks", "norm", "num_prefix_tokens", "_pos_embed", "forward_head", "pool"):
            if not hasattr(vit, attr):
                raise TypeError(f"{type(vit).__name__} is not a timm VisionTransformer (no `{attr}`)")
        for i, blk in enumerate(vit.blocks):
            check_block(blk, i)
        self.vit = vit
        self.depth = len(vit.blocks)
        self.layers = resolve_layers(supervised_layers, self.depth)
        self.num_prefix = int(vit.num_prefix_tokens)
        self.embed_dim = int(getattr(vit, "embed_dim", vit.blocks[0].norm1.normalized_shape[0]))
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.head_type = head
        self.backend = backend
        self.interaction = InteractionQueries(num_queries, self.embed_dim, self.depth, read_back=read_back,
                                              init_std=query_init_std)
        # cls+queries head: learned softmax weights over the K final queries (K parameters)
        self.query_pool = nn.Parameter(torch.zeros(num_queries)) if head == "cls+queries" else None
        if pos_embed_init not in (None, "sincos"):
            raise ValueError(f"pos_embed_init must be None or 'sincos', got {pos_embed_init!r}")
        if pos_embed_init == "sincos":
            self._init_sincos()
        self.spec = dict(model=self.model_name, num_queries=num_queries, supervised_layers=self.layers,
                         read_back=read_back, head=head, num_classes=num_classes, img_size=img_size,
                         pos_embed_init=pos_embed_init, timm_kwargs=dict(timm_kwargs))

    @torch.no_grad()
    def _init_sincos(self) -> None:
        pe = getattr(self.vit, "pos_embed", None)
        if pe is None:
            raise ValueError("pos_embed_init='sincos' needs a ViT with learned position embeddings")
        n_patch = self.grid[0] * self.grid[1]
        emb = sincos_pos_embed(self.grid, self.embed_dim).to(pe.dtype)
        pe.zero_()
        pe[0, pe.shape[1] - n_patch:] = emb

    # ----------------------------------------------------------------------------------------
    @property
    def num_queries(self) -> int:
        return self.interaction.num_queries

    @property
    def read_back(self) -> str:
        return self.interaction.read_back

    @property
    def num_classes(self) -> int:
        return int(self.vit.num_classes)

    @property
    def img_size(self) -> tuple:
        return tuple(self.vit.patch_embed.img_size)

    @property
    def grid(self) -> tuple:
        """(rows, cols) of the patch grid at img_size."""
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        g = self.grid
        return g[0] * g[1]

    def queries_change_prediction(self) -> bool:
        return self.read_back != "off" or self.head_type != "cls"

    def overhead(self) -> dict:
        """Parameters added to the backbone: the queries (and read-back gates)."""
        added = sum(p.numel() for p in self.interaction.parameters())
        added += 0 if self.query_pool is None else self.query_pool.numel()
        backbone = sum(p.numel() for p in self.vit.parameters())
        return dict(params=added, backbone_params=backbone, percent=100.0 * added / backbone)

    # ----------------------------------------------------------------------------------------
    def _check_images(self, x: Tensor) -> tuple:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        in_chans = self.vit.patch_embed.proj.in_channels if hasattr(self.vit.patch_embed, "proj") else x.shape[1]
        if x.shape[1] != in_chans:
            raise ValueError(f"images have {x.shape[1]} channels, the student expects {in_chans}")
        pe = self.vit.patch_embed
        if getattr(self.vit, "dynamic_img_size", False):
            ph, pw = pe.patch_size
            if x.shape[2] % ph or x.shape[3] % pw:
                raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the patch size {(ph, pw)}")
            return x.shape[2] // ph, x.shape[3] // pw
        if tuple(x.shape[2:]) != tuple(pe.img_size):
            raise ValueError(
                f"images are {x.shape[2]}x{x.shape[3]} but the student was built for "
                f"{pe.img_size[0]}x{pe.img_size[1]}: "
                "resize the images (e.g. --img-size) or build the student with img_size=...")
        return self.grid

    def forward_features(self, images: Tensor, *, return_maps: bool = False, materialize: bool = False,
                         use_queries: Optional[bool] = None):
        """(normed tokens (B, L, C), final queries (B, K, C) or None, QueryMaps or None)."""
        grid = self._check_images(images)
        if use_queries is None:
            use_queries = return_maps or self.queries_change_prediction()
        if return_maps and not use_queries:
            raise ValueError("return_maps=True needs the queries (use_queries=False drops them)")
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        if use_queries and x.shape[1] != self.num_prefix + grid[0] * grid[1]:
            raise ValueError("patch dropout changes the token count; InteractionViT needs patch_drop_rate=0")
        last = (self.depth - 1) if self.queries_change_prediction() else self.layers[-1]
        first = self.layers[0]
        z = None
        maps = QueryMaps(grid=tuple(grid)) if return_maps else None
        keep_set = set(self.layers)
        for i, blk in enumerate(vit.blocks):
            if use_queries and first <= i <= last:
                if z is None:
                    z = self.interaction.initial(x.shape[0], x.dtype)
                keep = return_maps and i in keep_set
                x, z, lm = self.interaction(blk, i, x, z, self.num_prefix, keep=keep, materialize=materialize,
                                            backend=self.backend)
                if lm is not None:
                    maps.layers.append(lm)
            else:
                x = blk(x)
        x = vit.norm(x)
        return x, z, maps

    def forward_head(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        vit = self.vit
        if self.head_type == "cls" or z is None:
            return vit.forward_head(x)
        pooled = vit.pool(x)
        w = torch.softmax(self.query_pool, 0).to(z.dtype)
        pooled = pooled + torch.einsum("k,bkc->bc", w, vit.norm(z))
        pooled = vit.fc_norm(pooled)
        pooled = vit.head_drop(pooled)
        return vit.head(pooled)

    def forward(self, images: Tensor, return_maps: bool = False, *, materialize: bool = False,
                use_queries: Optional[bool] = None):
        """logits (B, num_classes), or (logits, QueryMaps) with return_maps.

        materialize: also write the exact maps (B, H, K, Np) through interaction_attention in the
            forward (otherwise LayerMaps.maps computes them on first access; the loss never needs them).
        use_queries: force the queries on/off (default: on when return_maps or when they change the
            prediction, i.e. read-back or the cls+queries head).
        """
        x, z, maps = self.forward_features(images, return_maps=return_maps, materialize=materialize,
                                           use_queries=use_queries)
        logits = self.forward_head(x, z)
        return (logits, maps) if return_maps else logits

    def extra_repr(self) -> str:
        return (f"model={self.model_name!r}, queries={self.num_queries}, supervised_layers={self.layers}, "
                f"head={self.head_type!r}")
