"""The experiment's controls (lfi.train.controls) and their wiring into the Trainer."""
import math

import pytest
import torch

pytest.importorskip("timm")

from torch.utils.data import DataLoader  # noqa: E402

from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.teachers import SyntheticTeacher  # noqa: E402
from lfi.teachers import TeacherMaps  # noqa: E402
from lfi.train.config import demo_config  # noqa: E402
from lfi.train.controls import MapHead  # noqa: E402
from lfi.train.controls import distill_loss  # noqa: E402
from lfi.train.controls import leak_check  # noqa: E402
from lfi.train.controls import teacher_features  # noqa: E402
from lfi.train.trainer import Trainer  # noqa: E402
from lfi.train.trainer import shuffled  # noqa: E402

TINY = dict(synthetic_train=64, synthetic_val=32, epochs=1, batch_size=16, max_steps_per_epoch=2,
            student_kwargs=dict(patch_size=4, embed_dim=32, depth=2, num_heads=2))


def test_map_head_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    head = MapHead(12, 3)
    tokens = torch.randn(4, 16, 12, generator=g)
    probs = torch.rand(4, 3, 4, 4, generator=g) + 0.01
    probs = probs / probs.flatten(2).sum(-1)[..., None, None]
    valid = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    tm = TeacherMaps(probs=probs, valid=valid)
    loss = head.loss(tokens, tm)
    logits = (tokens.double() @ head.proj.weight.double().T + head.proj.bias.double()).transpose(1, 2)
    t = probs.flatten(2).double()
    kl = (t * (t.log() - logits.log_softmax(-1))).sum(-1)
    ref = (kl * valid).sum() / valid.sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert head.proj.weight.grad.abs().sum() > 0
    # an invalid concept's map carries no weight
    probs2 = probs.clone()
    probs2[0, 1] = probs2[0, 1].flip(-1)
    torch.testing.assert_close(head.loss(tokens, TeacherMaps(probs=probs2, valid=valid)), loss.detach())


def test_distill_loss_is_hinton_kd():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    T = 2.0
    p_t = (t.double() / T).softmax(-1)
    ref = (p_t * (p_t.log() - (s.double() / T).log_softmax(-1))).sum(-1).mean() * T * T
    torch.testing.assert_close(distill_loss(s, t, T).double(), ref, rtol=1e-5, atol=1e-7)
    assert distill_loss(t, t, T).abs() < 1e-6


def _leak(task: str, **teacher):
    kw = dict(img_size=32, task=task, num_distractors=4 if task == "quadrant" else 3)
    train, val = SyntheticShapes(400, seed=1, **kw), SyntheticShapes(200, seed=2, **kw)
    t = SyntheticTeacher(train.concepts, (8, 8), **teacher)
    xt, yt = teacher_features(t, DataLoader(train, batch_size=128))
    xv, yv = teacher_features(t, DataLoader(val, batch_size=128))
    assert xt.shape == (400, 6 * 64 + 6) and yt.shape == (400,)
    return leak_check(xt, yt, xv, yv, 4)


def test_leak_check_catches_a_leaking_teacher_and_passes_the_colour_task():
    leaky = _leak("quadrant", sigma=0.5, score_noise=0.0, confuse=0.0)  # the first demo: the map is the label
    assert leaky["best"] > 0.9, leaky
    clean = _leak("colour")
    assert clean["best"] < clean["chance"] + 0.12, clean  # the maps carry no colour
    assert set(clean) == {"logistic", "mlp", "chance", "best", "classifier"}
    assert not any(p.requires_grad for p in clean["classifier"].parameters())


def test_shuffled_teacher_rolls_every_field():
    tm = TeacherMaps(probs=torch.rand(3, 2, 4, 4), valid=torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool),
                     scores=torch.rand(3, 2))
    sh = shuffled(tm)
    assert torch.equal(sh.probs[1], tm.probs[0]) and torch.equal(sh.valid[0], tm.valid[2])
    assert torch.equal(sh.scores[2], tm.scores[1])


@pytest.mark.parametrize("arm", [dict(supervision="map_head"), dict(supervision="logits"),
                                 dict(teacher_shuffle=True), dict(lam=0.0, read_back="off")])
def test_trainer_runs_every_control(tmp_path, arm):
    cfg = demo_config(**TINY, **arm).replace(out=str(tmp_path / "run"), quiet=True, save_every=0)
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.step_module.named_parameters()}
    res = tr.run()
    assert len(res["history"]) == 1 and math.isfinite(res["history"][0]["train_loss"])
    changed = {n for n, p in tr.step_module.named_parameters() if not torch.equal(p, before[n])}
    queries = {n for n in changed if ".interaction." in n}
    if arm.get("supervision") == "map_head":
        assert any(n.startswith("map_head.") for n in changed) and not queries
        assert res["history"][0]["train_kl"] > 0
    elif arm.get("supervision") == "logits":
        assert tr.step_module.teacher_classifier is not None and not queries
        assert res["history"][0]["train_kl"] > 0
    elif arm.get("teacher_shuffle"):
        assert queries  # the queries are trained (on the wrong maps)
    else:
        assert not queries and res["history"][0]["train_kl"] == 0
    assert (tr.eval_teacher is None) == (arm.get("supervision", "queries") != "queries" or cfg.lam == 0)


def test_trainer_control_errors(tmp_path):
    with pytest.raises(ValueError, match="supervision"):
        Trainer(demo_config(**TINY, supervision="maps").replace(out=str(tmp_path / "a"), quiet=True))
    ck = tmp_path / "checkpoint.safetensors"
    ck.write_bytes(b"not read: the config is refused first")
    with pytest.raises(ValueError, match="map_head"):
        Trainer(demo_config(**TINY, supervision="map_head").replace(out=str(tmp_path / "b"), quiet=True,
                                                                     resume=str(ck)))
