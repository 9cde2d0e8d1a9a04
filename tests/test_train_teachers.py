"""CLIPTeacher on a tiny random-weight open_clip model; SyntheticTeacher; the synthetic dataset."""
import warnings

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.teachers import CLIPTeacher, SyntheticTeacher, TeacherMaps  # noqa: E402

TINY_CLIP = dict(embed_dim=64, vision_cfg=dict(image_size=64, patch_size=16, layers=2, width=128, head_width=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=4, layers=2))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model("ViT-S-16", pretrained=None, **TINY_CLIP).eval()


def test_tokenizer_offline():
    tok = open_clip.get_tokenizer("ViT-B-16")
    assert tok(["a photo of a dog."]).shape == (1, 77)


def test_clip_teacher_maps(tiny_clip):
    concepts = ["dog", "cat", "traffic_light"]
    t = CLIPTeacher(tiny_clip, concepts=concepts, grid=(8, 8), temperature=0.05)
    x = torch.rand(2, 3, 32, 32)
    out = t(x)
    assert isinstance(out, TeacherMaps) and out.probs.shape == (2, 3, 8, 8) and out.concepts == concepts
    torch.testing.assert_close(out.flat().sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(2))
    # the pooled embedding used for the scores is CLIP's own image embedding
    patches, pooled = t.dense_features(x)
    assert patches.shape == (2, 4, 4, 64)
    ref = F.normalize(tiny_clip.encode_image(t.preprocess(x)), dim=-1)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)
    # dense path = out_proj(v(ln_1(x))) of the last block, then ln_post and proj (manual recomputation)
    v = tiny_clip.visual
    xx = v.conv1(t.preprocess(x)).flatten(2).transpose(1, 2)
    xx = torch.cat([v.class_embedding.view(1, 1, -1).expand(2, -1, -1), xx], 1) + v.positional_embedding
    xx = v.transformer.resblocks[0](v.ln_pre(xx))
    last = v.transformer.resblocks[-1]
    C = xx.shape[-1]
    val = F.linear(last.ln_1(xx), last.attn.in_proj_weight[2 * C:], last.attn.in_proj_bias[2 * C:])
    dense = F.normalize(v.ln_post(last.attn.out_proj(val)[:, 1:]) @ v.proj, dim=-1)
    torch.testing.assert_close(patches.flatten(1, 2), dense, atol=1e-5, rtol=1e-5)
    text = t.text_embeddings()
    logits = torch.einsum("bnd,kd->bkn", dense, text).view(2, 3, 4, 4) / 0.05
    ref_probs = torch.softmax(F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False).flatten(2), -1)
    torch.testing.assert_close(out.flat(), ref_probs, atol=1e-5, rtol=1e-4)
    # the text embeddings are cached
    assert t.text_embeddings() is text
    t.set_concepts(["car"])
    assert t(x).probs.shape == (2, 1, 8, 8)


def test_clip_teacher_input_normalisation(tiny_clip):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = CLIPTeacher(tiny_clip, concepts=["dog"], input_mean=mean, input_std=std)
    b = CLIPTeacher(tiny_clip, concepts=["dog"])
    x01 = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(a.preprocess((x01 - 0.5) / 0.25), b.preprocess(x01), atol=1e-5, rtol=1e-5)


def test_clip_teacher_missing_weights_file():
    with pytest.raises(FileNotFoundError, match="/nowhere/clip.safetensors"):
        CLIPTeacher("ViT-B-16", pretrained="/nowhere/clip.safetensors", concepts=["dog"])


def test_clip_teacher_from_local_file(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    t = CLIPTeacher("ViT-S-16", pretrained=str(path), concepts=["dog", "cat"], model_kwargs=TINY_CLIP)
    ref = CLIPTeacher(tiny_clip, concepts=["dog", "cat"])
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(t(x).probs, ref(x).probs)


def test_synthetic_teacher_and_dataset():
    ds = SyntheticShapes(24, img_size=32, seed=3)
    x, y, m = ds.tensors()
    assert x.shape == (24, 3, 32, 32) and m.shape == (24, 6, 32, 32) and set(y.tolist()) <= {0, 1, 2, 3}
    # the label is the quadrant of the designated concept (concept 0)
    for i in range(24):
        ys, xs = m[i, 0].nonzero(as_tuple=True)
        cy, cx = ys.float().mean() + 0.5, xs.float().mean() + 0.5
        assert int(y[i]) == 2 * int(cy > 16) + int(cx > 16)
    t = SyntheticTeacher(ds.concepts, (8, 8))
    out = t(x, m)
    assert out.probs.shape == (24, 6, 8, 8)
    torch.testing.assert_close(out.flat().sum(-1), torch.ones(24, 6))
    assert out.valid[:, 0].all() and out.valid.sum(1).eq(5).all()  # target + 4 distractors
    # the map's mass sits on the object
    cov = F.adaptive_avg_pool2d(m, (8, 8)).flatten(2)
    mass = (out.flat() * (cov > 0)).sum(-1)
    assert mass[out.valid].min() > 0.6
    # deterministic generation
    assert torch.equal(SyntheticShapes(4, seed=3).images, SyntheticShapes(4, seed=3).images)
