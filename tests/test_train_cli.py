"""`lfi train` flags generated from TrainConfig; `lfi eval` / `lfi maps` build the training teacher;
the synthetic data's seed offsets are defined once."""
import dataclasses
import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("timm")

from helpers import TINY_CLIP  # noqa: E402
from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.train import cli  # noqa: E402
from lfi.train.config import DEMO_STUDENT  # noqa: E402
from lfi.train.config import SHIFT_SEED_OFFSET  # noqa: E402
from lfi.train.config import VAL_SEED_OFFSET  # noqa: E402
from lfi.train.config import TrainConfig  # noqa: E402
from lfi.train.config import demo_config  # noqa: E402
from lfi.train.evaluation import LoadedCheckpoint  # noqa: E402
from lfi.train.evaluation import checkpoint_teacher  # noqa: E402
from lfi.train.evaluation import eval_domains  # noqa: E402
from lfi.train.evaluation import load_for_eval  # noqa: E402
from lfi.train.trainer import Trainer  # noqa: E402
from lfi.train.trainer import build_teacher  # noqa: E402
from lfi.train.trainer import synthetic_datasets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_FLAG = {"synthetic_concepts", "synthetic_seed", "synthetic_sigma", "map_topk"}


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["train", *argv]))


# ------------------------------------------------------------------------------------------------
# flags from the dataclass
# ------------------------------------------------------------------------------------------------
def test_every_field_is_a_flag_with_its_default():
    parser = cli.build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {s: a for a in train._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        if f.name in NO_FLAG:
            assert "flag" not in f.metadata, f.name
            continue
        flag = f.metadata["flag"]
        name = ("--no-" if flag.negate else "--") + f.name.replace("_", "-")
        assert name in flags, name
        action = flags[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            assert action.default is False and action.nargs == 0, name
        elif flag.if_given:
            assert action.default is None, name
        else:
            assert action.default == default, name
        if flag.choices:
            assert list(action.choices) == list(flag.choices), name
        assert flag.group in {g.title for g in train._action_groups}, name
    # --help: the sections in order, every flag once
    text = train.format_help()
    heads = [m.group(1) for m in re.finditer(r"^(\w+):$", text, re.M)]
    assert heads[-6:] == ["data", "student", "teacher", "loss", "optimisation", "output"]
    assert text.count("--teacher-select {topk,threshold,all}") == 2  # usage + its section


def test_real_data_defaults_are_train_config():
    assert parse("--data", "/imgs") == TrainConfig(data="/imgs")


def test_synthetic_data_switches_to_the_demo_defaults():
    cfg = parse("--data", "synthetic")
    demo, d = demo_config(), TrainConfig()
    # flags that default to None keep the demo's value ...
    for name in ("img_size", "student", "student_kwargs", "queries", "read_back", "teacher", "pos_embed_init",
                 "assignment", "batch_size", "lr", "warmup_epochs", "synthetic_train", "synthetic_val"):
        assert getattr(cfg, name) == getattr(demo, name), name
    assert cfg.student_kwargs == DEMO_STUDENT and cfg.img_size == 32 and cfg.teacher == "synthetic"
    # ... the others set TrainConfig's defaults (as `lfi train` always did)
    for name in ("epochs", "device", "workers", "progress", "save_every", "quiet", "lam", "min_lr"):
        assert getattr(cfg, name) == getattr(d, name), name
    # another timm model on the built-in task does not inherit the tiny ViT's kwargs
    assert parse("--data", "synthetic", "--student", "vit_base_patch16_224").student_kwargs == {}
    assert parse("--data", "synthetic", "--student", "vit_base_patch16_224",
                 "--student-kwargs", "depth=2").student_kwargs == {"depth": 2}


def test_flag_values_reach_the_config():
    cfg = parse("--data", "/imgs", "--no-progress", "--quiet", "--deterministic", "--teacher-random",
                "--quick-gelu", "--teacher-shuffle", "--student-kwargs", "patch_size=8,embed_dim=32,flag=true",
                "--teacher-kwargs", '{"a": [1, 2]}', "--teacher-temperature", "0.05", "--img-size", "64",
                "--read-back", "gated", "--threads", "3", "--lr", "0.1", "--resume", "auto", "--val-split", "0.2")
    assert (cfg.progress, cfg.quiet, cfg.deterministic, cfg.teacher_random, cfg.quick_gelu,
            cfg.teacher_shuffle) == (False, True, True, True, True, True)
    assert cfg.student_kwargs == {"patch_size": 8, "embed_dim": 32, "flag": True}
    assert cfg.teacher_kwargs == {"a": [1, 2]} and cfg.teacher_temperature == 0.05
    assert (cfg.img_size, cfg.read_back, cfg.threads, cfg.lr, cfg.resume, cfg.val_split) == \
        (64, "gated", 3, 0.1, "auto", 0.2)
    assert TrainConfig.from_dict(json.loads(cfg.dumps())) == cfg
    for bad in (["--teacher-temperature", "hot"], ["--student-kwargs", "depth"], ["--amp", "fp8"],
                ["--epochs", "two"], ["--head", "mean"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["train", "--data", "x", *bad])


# ------------------------------------------------------------------------------------------------
# eval / maps build the training teacher
# ------------------------------------------------------------------------------------------------
def _same_clip_teacher(a, b):
    assert type(a) is type(b) and type(a).__name__ == "CLIPTeacher"
    for attr in ("templates", "temperature", "target_entropy", "select", "topk", "threshold", "concepts", "grid",
                 "image_size"):
        assert getattr(a, attr) == getattr(b, attr), attr
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(2, 3, 32, 32)
    ta, tb = a(x), b(x)
    assert torch.equal(ta.probs, tb.probs) and torch.equal(ta.valid, tb.valid)


def test_eval_and_maps_build_the_training_clip_teacher(tmp_path, clip_weights):
    argv = ["--data", "somewhere", "--teacher", "ViT-S-16", "--teacher-weights", str(clip_weights),
            "--teacher-kwargs", json.dumps(TINY_CLIP), "--templates", "a {}.|the {}.", "--teacher-temperature",
            "0.07", "--teacher-select", "threshold", "--teacher-threshold", "0.3", "--quick-gelu"]
    cfg = parse(*argv)
    SyntheticShapes(8, img_size=32, task="quadrant", seed=0).save_imagefolder(tmp_path / "photo")
    classes = sorted(p.name for p in (tmp_path / "photo").iterdir())
    concepts = [f"a {c}" for c in classes]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    student = SimpleNamespace(grid=(4, 4), img_size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = build_teacher(cfg, student, concepts, mean, std, "cpu", synthetic=False)  # what Trainer builds
        # a checkpoint of that run, as `lfi eval` loads it (config.json round trip)
        ck = LoadedCheckpoint(student, dict(classes=classes, concepts=concepts, mean=list(mean), std=list(std)),
                              TrainConfig.from_dict(json.loads(cfg.dumps())), torch.device("cpu"))
        domains = eval_domains(ck, str(tmp_path / "photo"), workers=0)
        # `lfi maps` and `--teacher-weights` overrides go through checkpoint_teacher
        maps_teacher = checkpoint_teacher(ck.cfg, student, concepts, ck.mean, ck.std, "cpu", synthetic_data=False)
        override = checkpoint_teacher(ck.cfg.replace(teacher_weights="/elsewhere.safetensors"), student, concepts,
                                      ck.mean, ck.std, "cpu", synthetic_data=False, weights=str(clip_weights))
    assert [d.name for d in domains] == ["photo"]
    for t in (domains[0].teacher, maps_teacher, override):
        _same_clip_teacher(trained, t)
    assert (trained.templates, trained.temperature, trained.select, trained.threshold) == \
        (("a {}.", "the {}."), 0.07, "threshold", 0.3)
    # no maps: no teacher; a run without a CLIP teacher: none to rebuild
    assert eval_domains(ck, str(tmp_path / "photo"), workers=0, maps=False)[0].teacher is None
    assert checkpoint_teacher(ck.cfg.replace(teacher="none"), student, concepts, mean, std, "cpu",
                              synthetic_data=False) is None
    with pytest.raises(ValueError, match="--teacher-weights"):
        eval_domains(LoadedCheckpoint(student, ck.meta, ck.cfg.replace(teacher_weights=None), ck.device),
                     str(tmp_path / "photo"), workers=0)


def test_eval_builds_the_training_synthetic_teacher(tmp_path):
    cfg = demo_config(student_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), synthetic_train=32,
                      synthetic_val=16, batch_size=16, epochs=1, out=str(tmp_path), save_every=1, quiet=True,
                      threads=1, synthetic_sigma=1.5, synthetic_score_noise=0.6, synthetic_confuse=0.4)
    trainer = Trainer(cfg)
    trainer.run()
    ck = load_for_eval(tmp_path / "checkpoint.safetensors", "cpu")
    domains = eval_domains(ck, "synthetic", batch_size=8)
    assert {d.name for d in domains} >= {"synthetic-clean", "synthetic-textured"}
    a, b = trainer.teacher, domains[0].teacher
    assert type(a) is type(b) and type(a).__name__ == "SyntheticTeacher"
    for attr in ("concepts", "grid", "sigma", "floor", "score_noise", "confuse", "seed"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert (b.sigma, b.score_noise, b.confuse) == (1.5, 0.6, 0.4)
    _, _, masks = trainer.data["val"].tensors()
    ta, tb = a(None, masks[:4]), b(None, masks[:4])
    assert torch.equal(ta.probs, tb.probs) and torch.equal(ta.valid, tb.valid)
    # the shifted test sets: every style on the same data seed, SHIFT_SEED_OFFSET past the training set's
    for d in domains:
        assert d.loader.dataset.seed == cfg.synthetic_seed + SHIFT_SEED_OFFSET
        assert d.teacher is b
    assert eval_domains(ck, "synthetic", maps=False)[0].teacher is None


# ------------------------------------------------------------------------------------------------
# seed offsets
# ------------------------------------------------------------------------------------------------
def test_seed_offsets_are_defined_once():
    from lfi.train import demo

    cfg = demo_config(synthetic_train=8, synthetic_val=4)
    train, val = synthetic_datasets(cfg)
    assert (train.seed, val.seed) == (cfg.synthetic_seed, cfg.synthetic_seed + VAL_SEED_OFFSET)
    assert demo.SHIFT_SEED_OFFSET is SHIFT_SEED_OFFSET
    assert len({0, VAL_SEED_OFFSET, SHIFT_SEED_OFFSET}) == 3
    for path in sorted((ROOT / "lfi").rglob("*.py")):
        if path.name == "config.py" and path.parent.name == "train":
            continue
        text = path.read_text(encoding="utf-8")
        for literal in (str(VAL_SEED_OFFSET), str(SHIFT_SEED_OFFSET)):
            assert not re.search(rf"\b{literal}\b", text), f"{path.relative_to(ROOT)}: literal seed offset {literal}"
