"""InteractionViT / InteractionQueries: shapes, gradients, exactness of the query maps, overhead."""
import pytest
import torch

pytest.importorskip("timm")

from lfi.models import InteractionViT  # noqa: E402
from lfi.models import resolve_layers  # noqa: E402
from lfi.nn.interaction_queries import QueryMaps  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(TINY)
    args.update(kw)
    return InteractionViT("vit_tiny_patch16_224", **{"num_queries": 3, **args}).eval()


def reference_query_forward(student, x):
    """float64 re-implementation: joint sequence [tokens; queries] with the mask, plain softmax."""
    vit = student.vit.double()
    z = student.interaction.queries.double().unsqueeze(0).expand(x.shape[0], -1, -1)
    t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x.double()))))
    P, L, K = student.num_prefix, t.shape[1], z.shape[1]
    maps = []
    for i, blk in enumerate(vit.blocks):
        if i < student.layers[0]:
            t = blk(t)
            continue
        xz = torch.cat([t, z], 1)
        h = blk.norm1(xz)
        a = blk.attn
        q, k, v = a.qkv(h).reshape(h.shape[0], L + K, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * a.scale
        allowed = torch.ones(L + K, L + K, dtype=torch.bool)
        allowed[L:, :] = False
        allowed[L:, P:L] = True
        if student.read_back == "off":
            allowed[:L, L:] = False
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        maps.append(p[:, :, L:, P:L])
        o = (p @ v).transpose(1, 2).reshape(h.shape[0], L + K, -1)
        xz = xz + blk.ls1(a.proj(o))
        xz = xz + blk.ls2(blk.mlp(blk.norm2(xz)))
        t, z = xz[:, :L], xz[:, L:]
    logits = student.forward_head(vit.norm(t), z)
    student.float()
    return logits, maps


@pytest.mark.parametrize("read_back", ["off", "on"])
def test_query_maps_match_float64_reference(read_back):
    s = tiny(read_back=read_back, supervised_layers="all")
    x = torch.randn(2, 3, 32, 32)
    logits, qm = s(x, return_maps=True, materialize=True)
    assert isinstance(qm, QueryMaps) and len(qm) == 3 and qm.grid == (4, 4)
    for lm in qm:
        assert lm.probs.shape == (2, 2, 3, 16) and lm.q.shape == (2, 2, 3, 16) and lm.k.shape == (2, 2, 16, 16)
        torch.testing.assert_close(lm.probs.sum(-1), torch.ones(2, 2, 3))
    ref_logits, ref_maps = reference_query_forward(s, x)
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-4, rtol=1e-4)
    for lm, ref in zip(qm, ref_maps):
        torch.testing.assert_close(lm.probs.double(), ref, atol=1e-5, rtol=1e-4)
        # lazily recomputed maps (through interaction_attention on the kept q, k, v) agree
        torch.testing.assert_close(lm.maps, lm.probs)


def test_queries_do_not_change_prediction_without_read_back():
    s = tiny()
    x = torch.randn(3, 3, 32, 32)
    plain = s.vit(x)
    torch.testing.assert_close(s(x), plain)
    logits, _ = s(x, return_maps=True)
    torch.testing.assert_close(logits, plain, atol=1e-6, rtol=1e-5)
    assert not s.queries_change_prediction()


def test_gradients_reach_queries_and_backbone():
    s = tiny(read_back="gated", head="cls+queries", supervised_layers="last2").train()
    x = torch.randn(2, 3, 32, 32)
    logits, qm = s(x, return_maps=True)
    assert qm.layer_ids == [1, 2]
    loss = logits.square().mean() + sum(lm.maps[..., 0].sum() for lm in qm)
    loss.backward()
    for name in ("interaction.queries", "interaction.gates", "query_pool", "vit.blocks.1.attn.qkv.weight",
                 "vit.patch_embed.proj.weight"):
        g = dict(s.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_overhead_vit_small_under_2_percent():
    s = InteractionViT("vit_small_patch16_224", num_queries=8, supervised_layers="all")
    ov = s.overhead()
    assert ov["params"] == 8 * 384
    assert ov["percent"] < 2.0 and ov["percent"] < 0.02


def test_errors():
    s = tiny()
    with pytest.raises(ValueError, match="32x32"):
        s(torch.randn(1, 3, 48, 48))
    with pytest.raises(FileNotFoundError, match="not found"):
        InteractionViT("vit_tiny_patch16_224", pretrained="/nonexistent/w.safetensors", **TINY)
    with pytest.raises(ValueError, match="local"):
        InteractionViT("vit_tiny_patch16_224", pretrained=True, **TINY)
    with pytest.raises(ValueError):
        s(torch.randn(1, 3, 32, 32), return_maps=True, use_queries=False)


def test_resolve_layers():
    assert resolve_layers("all", 4) == [0, 1, 2, 3]
    assert resolve_layers("last", 4) == [3]
    assert resolve_layers("last2", 4) == [2, 3]
    assert resolve_layers("first1", 4) == [0]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    assert resolve_layers("1,3", 4) == [1, 3]
    with pytest.raises(ValueError):
        resolve_layers([7], 4)


def test_sincos_init_and_registers():
    s = tiny(pos_embed_init="sincos")
    assert s.vit.pos_embed[0, 0].abs().sum() == 0  # cls entry
    r = InteractionViT("vit_tiny_patch16_224", num_queries=2, reg_tokens=2, **TINY).eval()
    assert r.num_prefix == 3
    _, qm = r(torch.randn(1, 3, 32, 32), return_maps=True, materialize=True)
    assert qm[0].probs.shape[-1] == 16  # maps over patches only: cls and registers excluded
