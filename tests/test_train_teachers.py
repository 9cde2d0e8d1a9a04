"""CLIPTeacher on a tiny random-weight open_clip model (maps, concept selection, temperature calibration,
config/CLI wiring); SyntheticTeacher; the synthetic dataset."""
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from helpers import TINY_CLIP  # noqa: E402
from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.teachers import CLIPTeacher  # noqa: E402
from lfi.teachers import SyntheticTeacher  # noqa: E402
from lfi.teachers import TeacherMaps  # noqa: E402


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


def test_clip_teacher_from_local_file(tiny_clip, clip_weights):
    t = CLIPTeacher("ViT-S-16", pretrained=str(clip_weights), concepts=["dog", "cat"], model_kwargs=TINY_CLIP)
    ref = CLIPTeacher(tiny_clip, concepts=["dog", "cat"])
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(t(x).probs, ref(x).probs)


def test_synthetic_colour_task_label_is_the_target_colour():
    import colorsys

    from lfi.data.synthetic import COLOURS

    ds = SyntheticShapes(40, img_size=32, seed=3)
    x, y, m = ds.tensors()
    assert ds.task == "colour" and ds.concepts[0] == ds.target == "stripes" and ds.classes == list(COLOURS)
    assert x.shape == (40, 3, 32, 32) and m.shape == (40, 6, 32, 32) and set(y.tolist()) == {0, 1, 2, 3}
    hues = list(COLOURS.values())
    for i in range(40):
        px = x[i][:, m[i, 0] > 0]  # the striped object's pixels
        bright = px[:, px.sum(0) >= px.sum(0).median()]  # the unshaded stripes
        h = colorsys.rgb_to_hsv(*bright.mean(1).tolist())[0]
        dist = [min(abs(h - hh), 1 - abs(h - hh)) for hh in hues]
        assert min(range(4), key=dist.__getitem__) == int(y[i]), (i, h)
    assert m[:, 0].flatten(1).amax(1).eq(1).all()  # the target is in every image, with 3 distractors
    assert (m.flatten(2).amax(2) > 0).sum(1).eq(4).all()
    assert torch.equal(SyntheticShapes(4, seed=3).images, SyntheticShapes(4, seed=3).images)
    for style in ("noisy", "pale", "textured"):
        assert SyntheticShapes(4, seed=3, style=style).images.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="task"):
        SyntheticShapes(4, task="colours")
    with pytest.raises(ValueError, match="unknown concept"):
        SyntheticShapes(4, concepts=["circle", "square"])  # shapes are the quadrant task's concepts


def test_synthetic_quadrant_task():
    ds = SyntheticShapes(24, img_size=32, task="quadrant", num_distractors=4, seed=3)
    x, y, m = ds.tensors()
    assert ds.concepts[0] == "circle" and m.shape == (24, 6, 32, 32)
    for i in range(24):  # the label is the quadrant of the designated concept (concept 0)
        ys, xs = m[i, 0].nonzero(as_tuple=True)
        cy, cx = ys.float().mean() + 0.5, xs.float().mean() + 0.5
        assert int(y[i]) == 2 * int(cy > 16) + int(cx > 16)


def test_synthetic_teacher_oracle():
    ds = SyntheticShapes(24, img_size=32, seed=3)
    x, y, m = ds.tensors()
    out = SyntheticTeacher(ds.concepts, (8, 8), sigma=0.5, score_noise=0.0, confuse=0.0)(x, m)
    assert out.probs.shape == (24, 6, 8, 8)
    torch.testing.assert_close(out.flat().sum(-1), torch.ones(24, 6))
    assert torch.equal(out.valid, m.flatten(2).amax(-1) > 0)
    cov = F.adaptive_avg_pool2d(m, (8, 8)).flatten(2)
    mass = (out.flat() * (cov > 0)).sum(-1)  # the map's mass sits on the object
    assert mass[out.valid].min() > 0.6


def test_synthetic_teacher_is_an_imperfect_deterministic_vlm():
    ds = SyntheticShapes(400, img_size=32, seed=5)
    _, _, m = ds.tensors()
    present = m.flatten(2).amax(-1) > 0
    t = SyntheticTeacher(ds.concepts, (8, 8))
    out = t(None, m)
    torch.testing.assert_close(out.flat().sum(-1), torch.ones(400, 6))
    # its own scores decide validity: it misses present concepts and hallucinates absent ones
    miss = (present & ~out.valid).sum() / present.sum()
    halluc = (~present & out.valid).sum() / (~present).sum()
    assert 0.03 < miss < 0.13 and 0.02 < halluc < 0.13, (miss, halluc)
    assert torch.equal(out.valid, out.scores > 0.5)  # (every image has other objects to confuse a concept with)
    # a fraction of the valid maps are another object's map
    oracle = SyntheticTeacher(ds.concepts, (8, 8), score_noise=0.0, confuse=0.0)(None, m)
    differs = (out.flat() - oracle.flat()).abs().sum(-1) > 1e-6
    conf = (differs & out.valid & present).sum() / (out.valid & present).sum()
    assert 0.09 < conf < 0.21, conf
    assert ((out.flat() - 1 / 64).abs().amax(-1)[~out.valid] < 1e-6).all()  # invalid: uniform, no loss
    # the same image gives the same answer in any batch, and the errors depend on the seed
    perm = torch.randperm(400)
    again = t(None, m[perm])
    assert torch.equal(again.probs, out.probs[perm]) and torch.equal(again.valid, out.valid[perm])
    assert not torch.equal(SyntheticTeacher(ds.concepts, (8, 8), seed=1)(None, m).valid, out.valid)
    with pytest.raises(ValueError, match="confuse"):
        SyntheticTeacher(ds.concepts, (8, 8), confuse=1.5)


# ---- concept selection (valid), temperature calibration, config/CLI wiring ---------------------
CONCEPTS5 = ["dog", "cat", "car", "tree", "boat"]


def _teacher(clip, **kw):
    kw.setdefault("concepts", CONCEPTS5)
    kw.setdefault("grid", (4, 4))
    return CLIPTeacher(clip, **kw)


def _student_maps(B, K, grid, seed=0, H=2, D=8, layers=2):
    from lfi.nn.interaction_queries import LayerMaps
    from lfi.nn.interaction_queries import QueryMaps

    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    out = []
    for li in range(layers):
        q = torch.randn(B, H, K, D, generator=g).requires_grad_(True)
        k = torch.randn(B, H, N, D, generator=g).requires_grad_(True)
        out.append(LayerMaps(li, q, k, torch.randn(B, H, N, D, generator=g), D ** -0.5))
    return QueryMaps(out, grid=tuple(grid))


def _loss_and_grads(loss_fn, qm, tm):
    loss = loss_fn(qm, tm)
    tensors = [t for lm in qm for t in (lm.q, lm.k)]
    return loss.detach(), torch.autograd.grad(loss, tensors)


def test_clip_teacher_topk_invalid_concepts_carry_no_loss(tiny_clip):
    from lfi.nn.interaction_loss import InteractionLoss

    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    t = _teacher(tiny_clip, select="topk", topk=1)
    tm = t(x)
    B, Kt = tm.scores.shape
    top = tm.scores.argmax(1)
    # exactly the image's top-scored concept is valid; the others are not
    assert tm.valid.dtype == torch.bool and tm.valid.shape == (B, Kt)
    assert torch.equal(tm.valid, F.one_hot(top, Kt).bool())
    K = 8  # more queries than concepts: auto assignment would be "fixed"
    loss_fn = InteractionLoss(assignment="fixed")
    qm = _student_maps(B, K, (4, 4))
    loss, grads = _loss_and_grads(loss_fn, qm, tm)
    index, weight = loss_fn.last_assignment
    assert torch.equal(weight[:, :Kt], tm.valid.float()) and weight[:, Kt:].eq(0).all()
    assert loss > 0
    # replacing the maps of every absent concept changes neither the loss nor any gradient
    g = torch.Generator().manual_seed(5)
    noise = torch.softmax(4 * torch.randn(tm.probs.shape, generator=g).flatten(2), -1).view_as(tm.probs)
    absent = (~tm.valid).view(B, Kt, 1, 1)
    perturbed = TeacherMaps(torch.where(absent, noise, tm.probs), valid=tm.valid, scores=tm.scores,
                            concepts=tm.concepts)
    loss2, grads2 = _loss_and_grads(loss_fn, qm, perturbed)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # only the query rows of present concepts get a gradient
    valid_q = torch.zeros(B, K, dtype=torch.bool)
    valid_q[:, :Kt] = tm.valid
    for gq in grads[0::2]:
        assert gq.transpose(1, 2)[~valid_q].abs().max() == 0
        assert gq.transpose(1, 2)[valid_q].abs().min() > 0
    # changing the student query of an absent concept leaves the loss and the other gradients alone
    b0, c0 = 0, int((~tm.valid[0]).nonzero()[0])
    qm2 = _student_maps(B, K, (4, 4))
    with torch.no_grad():
        for lm in qm2:
            lm.q[b0, :, c0] += 3.0
    loss3, grads3 = _loss_and_grads(loss_fn, qm2, tm)
    torch.testing.assert_close(loss3, loss, rtol=0, atol=0)
    for li, (a, b) in enumerate(zip(grads, grads3)):
        if li % 2 == 0:  # q: all rows but the perturbed one (which has zero gradient either way)
            keep = torch.ones(B, K, dtype=torch.bool)
            keep[b0, c0] = False
            torch.testing.assert_close(b.transpose(1, 2)[keep], a.transpose(1, 2)[keep], rtol=0, atol=0)
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    # ... while changing a present concept's map does change the loss
    present = tm.valid.view(B, Kt, 1, 1)
    changed = TeacherMaps(torch.where(present, noise, tm.probs), valid=tm.valid, scores=tm.scores)
    assert (loss_fn(qm, changed) - loss).abs() > 1e-4
    # topk / hungarian assignments never pick an absent concept
    for assignment in ("topk", "hungarian"):
        fn = InteractionLoss(assignment=assignment)
        fn(qm, tm)
        index, weight = fn.last_assignment
        picked = tm.valid.gather(1, index)
        assert not (weight.bool() & ~picked).any(), assignment
        assert weight.sum(1).eq(1).all(), assignment  # one present concept per image -> one supervised query


def test_clip_teacher_threshold_selection(tiny_clip):
    t = _teacher(tiny_clip, select="threshold", threshold=0.5)
    scores = torch.tensor([[0.6, 0.3, 0.05, 0.03, 0.02], [0.4, 0.35, 0.15, 0.05, 0.05]])
    # 0.5: image 0 has one concept above it; none of image 1 passes -> its top-1 stays valid
    assert t.select_concepts(scores).tolist() == [[True, False, False, False, False],
                                                  [True, False, False, False, False]]
    t.threshold = 0.3
    assert t.select_concepts(scores).tolist() == [[True, True, False, False, False],
                                                  [True, True, False, False, False]]
    t.threshold = 0.15  # >= is inclusive
    assert t.select_concepts(scores)[1].tolist() == [True, True, True, False, False]
    # on the real scores: valid = (scores >= threshold) or the top-1 concept
    x = torch.rand(4, 3, 32, 32)
    ref = t(x).scores
    srt = ref[0].sort(descending=True).values
    t.threshold = float(srt[1] + srt[2]) / 2  # image 0: exactly its 2 best concepts pass
    tm = t(x)
    assert torch.equal(tm.scores, ref)
    expected = (ref >= t.threshold) | F.one_hot(ref.argmax(1), 5).bool()
    assert torch.equal(tm.valid, expected) and tm.valid[0].sum() == 2 and tm.valid.sum(1).ge(1).all()
    t.threshold = 1.0  # nothing reaches 1: every image keeps exactly its top-1 concept
    assert torch.equal(t(x).valid, F.one_hot(ref.argmax(1), 5).bool())


def test_clip_teacher_select_all_and_topk_k(tiny_clip):
    x = torch.rand(3, 3, 32, 32)
    tm = _teacher(tiny_clip, select="all")(x)
    assert tm.valid.shape == (3, 5) and tm.valid.all()
    tm = _teacher(tiny_clip, select="topk", topk=3)(x)
    assert tm.valid.sum(1).eq(3).all()
    assert torch.equal(tm.valid.gather(1, tm.scores.topk(3, dim=1).indices), torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("select,target,grid", [("topk", 0.5, (8, 8)), ("threshold", 0.3, (4, 4)),
                                                ("all", 0.8, (7, 5))])
def test_clip_teacher_auto_temperature_hits_target_entropy(tiny_clip, select, target, grid):
    x = torch.rand(3, 3, 32, 32)
    t = _teacher(tiny_clip, temperature="auto", target_entropy=target, select=select, topk=2, threshold=0.2,
                 grid=grid)
    tm = t(x)
    N = grid[0] * grid[1]
    p = tm.flat().double()
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, K) nats
    mean_valid = (ent * tm.valid).sum(1) / tm.valid.sum(1)
    goal = target * math.log(N)
    torch.testing.assert_close(mean_valid, torch.full_like(mean_valid, goal), rtol=1e-3, atol=0)
    T = t.last_temperature
    assert T.shape == (3,) and (T > 1e-4).all() and (T < 10).all()
    # the maps are softmax(similarities / T) with that temperature (one T per image)
    patches, _ = t.dense_features(x)
    sims = F.interpolate(torch.einsum("bhwd,kd->bkhw", patches, t.text_embeddings()), size=grid, mode="bilinear",
                         align_corners=False)
    torch.testing.assert_close(tm.flat(), torch.softmax(sims.flatten(2) / T.view(3, 1, 1), -1), atol=1e-5, rtol=1e-4)
    # per image: an image's maps do not depend on the rest of its batch
    torch.testing.assert_close(t(x[1:2]).probs, tm.probs[1:2], atol=1e-5, rtol=1e-4)
    # deterministic
    assert torch.equal(t(x).probs, tm.probs)


def test_clip_teacher_fixed_temperature_reproduces_old_maps(tiny_clip):
    x = torch.rand(2, 3, 32, 32)
    for T in (0.01, 0.05):
        t = _teacher(tiny_clip, temperature=T, grid=(8, 8))
        out = t(x)
        patches, pooled = t.dense_features(x)
        # the pre-"auto" computation, verbatim
        logits = torch.einsum("bhwd,kd->bkhw", patches, t.text_embeddings()) / T
        logits = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.equal(out.probs, torch.softmax(logits.flatten(2), -1).view_as(logits))
        assert torch.equal(t.last_temperature, torch.full((2,), T))
    assert CLIPTeacher.__init__.__kwdefaults__["temperature"] == "auto"


def test_calibrate_temperature_edge_cases():
    from lfi.teachers.clip import calibrate_temperature

    sims = torch.zeros(2, 3, 16)  # flat similarities: every T gives log(16) > target -> t_min
    T = calibrate_temperature(sims, None, 0.5)
    assert torch.allclose(T, torch.full((2,), 1e-4), rtol=1e-4)
    # only valid maps count: an invalid, very different map does not move the temperature
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(1, 2, 16, generator=g) * 0.1
    valid = torch.tensor([[True, False]])
    other = sims.clone()
    other[0, 1] = torch.randn(16, generator=g) * 5
    assert torch.equal(calibrate_temperature(sims, valid, 0.5), calibrate_temperature(other, valid, 0.5))


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(temperature=True), "temperature"),
    (dict(target_entropy=0.0), "target_entropy"), (dict(target_entropy=1.0), "target_entropy"),
    (dict(target_entropy=1.5), "target_entropy"), (dict(select="best"), "select"),
    (dict(topk=0), "topk"), (dict(topk=1.5), "topk"), (dict(topk=True), "topk"),
    (dict(topk=6), "topk"),  # more than the 5 concepts
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"), (dict(threshold=-0.1), "threshold"),
])
def test_clip_teacher_bad_arguments(tiny_clip, kwargs, name):
    with pytest.raises(ValueError, match=name):
        _teacher(tiny_clip, **kwargs)


def test_clip_teacher_topk_checked_against_concepts(tiny_clip):
    t = _teacher(tiny_clip, topk=3)
    with pytest.raises(ValueError, match=r"topk must be an int in 1\.\.K \(K = 2 concepts\)"):
        t.set_concepts(["dog", "cat"])
    _teacher(tiny_clip, topk=9, select="all")  # topk only matters for select="topk"


def test_train_config_and_cli_build_the_teacher(tiny_clip):
    from types import SimpleNamespace

    from lfi.train import cli
    from lfi.train.config import TrainConfig
    from lfi.train.trainer import build_teacher

    argv = ["train", "--data", "somewhere", "--teacher", "ViT-S-16", "--teacher-random",
            "--teacher-kwargs", json.dumps(TINY_CLIP), "--templates", "a {}.|the {}.",
            "--teacher-temperature", "auto", "--teacher-target-entropy", "0.3", "--teacher-select", "threshold",
            "--teacher-topk", "2", "--teacher-threshold", "0.4"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert (cfg.teacher_temperature, cfg.teacher_target_entropy, cfg.teacher_select, cfg.teacher_topk,
            cfg.teacher_threshold) == ("auto", 0.3, "threshold", 2, 0.4)
    assert TrainConfig.from_dict(json.loads(cfg.dumps())) == cfg
    d = TrainConfig()
    assert (d.teacher_temperature, d.teacher_target_entropy, d.teacher_select, d.teacher_topk,
            d.teacher_threshold) == ("auto", 0.5, "topk", 1, 0.5)
    args = cli.build_parser().parse_args(["train", "--data", "x", "--teacher-temperature", "0.05"])
    fixed = cli.config_from_args(args)
    assert fixed.teacher_temperature == 0.05
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--data", "x", "--teacher-temperature", "hot"])
    student = SimpleNamespace(grid=(4, 4))
    mean, std = (0.5,) * 3, (0.5,) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the same seed gives the same ones
        torch.manual_seed(0)
        built = [build_teacher(cfg, student, CONCEPTS5, mean, std, "cpu", False)]  # train
        torch.manual_seed(0)
        built.append(cli._checkpoint_clip_teacher(cfg, None, student, CONCEPTS5, mean, std, "cpu"))  # eval / maps
    for t in built:
        assert isinstance(t, CLIPTeacher)
        assert (t.temperature, t.target_entropy, t.select, t.topk, t.threshold) == ("auto", 0.3, "threshold", 2, 0.4)
        assert t.templates == ("a {}.", "the {}.") and t.grid == (4, 4) and t.concepts == CONCEPTS5
    # same weights, same configuration -> the same maps, selection and temperatures
    x = torch.rand(2, 3, 32, 32)
    a, b = built[0](x), built[1](x)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.valid, b.valid)
    assert torch.equal(built[0].last_temperature, built[1].last_temperature)
