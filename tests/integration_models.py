"""Tiny unpatched models for the integration tests (timm, open_clip), and bit-identity checks.

Each builder returns a freshly seeded random model (no downloads) on helpers.DEVICE; timm and
open_clip are imported on first use, so a module that imports this one still skips cleanly (with
pytest.importorskip) where they are missing.
"""
from __future__ import annotations

import torch

from helpers import DEVICE


def assert_equal(a, b):
    """Bit-identical tensors (or nested tuples of them)."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal(x, y)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), f"max abs difference {(a.double() - b.double()).abs().max().item():.3g}"


def grads(model):
    """The .grad of every parameter, in order."""
    return [p.grad for p in model.parameters()]


# ------------------------------------------------------------------------------------------
# Model zoo: (unpatched model, input) builders, all tiny
# ------------------------------------------------------------------------------------------
def image(size, seed=1, B=2):
    """A (B, 3, size, size) float32 random image batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, size, size, generator=g).to(DEVICE)


TIMM_MODELS = {
    # name: (timm model, kwargs, image size); attention classes in the comment
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32),  # Attention
    "vit_map": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, global_pool="map"), 32),  # + pool
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2), 28),  # EvaAttention with RoPE
    "pe_rope": ("vit_pe_core_tiny_patch16_384", dict(img_size=32, depth=2), 32),  # AttentionRope + AttentionPoolLatent
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, depth=2, embed_dim=64, num_heads=4), 32),
}
TIMM_CONVERTED = {"vit": 2, "vit_map": 3, "eva02": 2, "pe_rope": 3, "relpos": 2}


def timm_model(key, seed=0, **extra):
    """(model, image batch) for a TIMM_MODELS key; `extra` goes to timm.create_model."""
    import timm

    name, kw, size = TIMM_MODELS[key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw, **extra).to(DEVICE), image(size)


def clip_model(kind="vit", seed=0):
    """A tiny open_clip CLIP: kind "vit" (ViT tower), "pool" (ViT with an attentional pooler) or "rn"
    (ModifiedResNet tower, AttentionPool2d)."""
    import open_clip

    torch.manual_seed(seed)
    text_cfg = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    if kind == "rn":
        vision_cfg = dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=32)
    else:
        vision_cfg = dict(image_size=64, patch_size=16, layers=2, width=64, head_width=16)
        if kind == "pool":
            vision_cfg.update(attentional_pool=True, attn_pooler_queries=5, attn_pooler_heads=4)
    model = open_clip.create_model("ViT-S-16", pretrained=None, embed_dim=32, vision_cfg=vision_cfg,
                                   text_cfg=text_cfg)
    return model.to(DEVICE)

