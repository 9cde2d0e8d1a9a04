"""Trainer: checkpoint save/resume reproduces the run; clear errors; ImageFolder + CLIP teacher;
`lfi eval` over domain folders; `lfi maps`."""
import json

import pytest
import torch

pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from helpers import TINY_CLIP  # noqa: E402
from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.train import checkpoint as ckpt  # noqa: E402
from lfi.train.cli import main  # noqa: E402
from lfi.train.config import TrainConfig  # noqa: E402
from lfi.train.config import demo_config  # noqa: E402
from lfi.train.trainer import Trainer  # noqa: E402

TINY_STUDENT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_synthetic(tmp_path, **kw):
    cfg = demo_config(student_kwargs=dict(TINY_STUDENT, drop_path_rate=0.1), synthetic_train=48, synthetic_val=32,
                      batch_size=16, epochs=2, out=str(tmp_path), save_every=1, quiet=True, threads=1)
    return cfg.replace(**kw)


def test_checkpoint_resume_reproduces_next_epoch(tmp_path):
    full = Trainer(tiny_synthetic(tmp_path / "full")).run()["history"]
    first = Trainer(tiny_synthetic(tmp_path / "resumed"))
    first.run(max_epochs=1)
    path = tmp_path / "resumed" / "checkpoint.safetensors"
    tensors, meta = ckpt.load_checkpoint(path)
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch" in tensors
    assert meta["epoch"] == 0 and meta["global_step"] == 3 and meta["format"] == ckpt.FORMAT
    assert json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    second = Trainer(tiny_synthetic(tmp_path / "resumed", resume="auto"))
    assert second.start_epoch == 1 and second.global_step == 3
    hist = second.run()["history"]
    assert len(hist) == 2
    for key in ("train_loss", "train_kl", "train_acc", "val_acc", "map_score"):
        assert hist[1][key] == full[1][key], key  # bit-identical continuation
    a = ckpt.model_state(ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.safetensors")[0])
    b = ckpt.model_state(ckpt.load_checkpoint(path)[0])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    student, _ = ckpt.load_student(path)
    assert student.num_queries == 6


def write_folder(root, n=24, seed=0):
    SyntheticShapes(n, img_size=32, task="quadrant", seed=seed).save_imagefolder(root)
    return root


def folder_args(data, out, weights, *extra):
    return ["train", "--data", str(data), "--teacher", "ViT-S-16", "--teacher-weights", str(weights),
            "--teacher-kwargs", json.dumps(TINY_CLIP), "--student", "vit_tiny_patch16_224",
            "--student-kwargs", "patch_size=8,embed_dim=32,depth=2,num_heads=2", "--img-size", "32",
            "--queries", "4", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", str(out),
            "--no-progress", "--threads", "1", *extra]


def test_folder_training_eval_and_maps(tmp_path, clip_weights, capsys):
    train = write_folder(tmp_path / "train", 24, seed=0)
    domains = tmp_path / "domains"
    write_folder(domains / "photo", 12, seed=1)
    write_folder(domains / "sketch", 12, seed=2)
    out = tmp_path / "run"
    assert main(folder_args(train, out, clip_weights, "--val-split", "0.25")) == 0
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["concepts"] == ["bottom-left", "bottom-right", "top-left", "top-right"]
    assert meta["config"]["assignment"] == "fixed"  # auto: 4 concepts for 4 queries
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert hist[0]["map_score"] is not None and hist[0]["train_kl"] > 0
    capsys.readouterr()
    res = tmp_path / "eval.json"
    assert main(["eval", str(out / "checkpoint.safetensors"), "--data", str(domains), "--workers", "0",
                 "--json", str(res)]) == 0
    text = capsys.readouterr().out
    assert "photo" in text and "sketch" in text and "mean" in text
    r = json.loads(res.read_text())
    assert set(r["domains"]) == {"photo", "sketch"} and 0 <= r["mean_map_score"] <= 1
    img = next((domains / "photo" / "top-left").glob("*.png"))
    png = tmp_path / "maps.png"
    assert main(["maps", str(out / "checkpoint.safetensors"), str(img), "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    # topk assignment when there are more concepts than queries
    out2 = tmp_path / "run_topk"
    assert main(folder_args(train, out2, clip_weights, "--queries", "2", "--max-steps-per-epoch", "1")) == 0
    assert json.loads((out2 / "checkpoint.json").read_text())["config"]["assignment"] == "topk"


def test_clear_errors(tmp_path, clip_weights, capsys):
    train = write_folder(tmp_path / "train", 8)
    cases = [
        (["train", "--data", str(tmp_path / "missing")], "data path does not exist"),
        (folder_args(tmp_path / "train" / "top-left", tmp_path / "o", clip_weights), "not an ImageFolder"),
        (folder_args(train, tmp_path / "o", tmp_path / "nope.safetensors"), "teacher weights file not found"),
        (folder_args(train, tmp_path / "o", clip_weights, "--concepts", "a,b,c"), "3 entries but the data has 4"),
        (folder_args(train, tmp_path / "o", clip_weights, "--concepts", "top-left: a,bottom-left: b,x: c,y: d"),
         "does not match the classes"),
        (folder_args(train, tmp_path / "o", clip_weights, "--assignment", "fixed", "--queries", "2"),
         "--assignment fixed"),
        (["train", "--data", str(train), "--teacher", "ViT-S-16"], "--teacher-weights"),
        (["train", "--data", str(train), "--teacher", "synthetic"], "synthetic"),
        (["eval", str(tmp_path / "none.safetensors"), "--data", str(train)], "checkpoint not found"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err, (argv, err)


def test_config_roundtrip():
    cfg = TrainConfig(student_kwargs={"depth": 2}, lam=0.5)
    assert TrainConfig.from_dict(json.loads(cfg.dumps())) == cfg


def test_folder_data_is_built_once_with_the_students_normalisation(tmp_path, monkeypatch):
    """The class count comes from the folder names, so each ImageFolder view is built once, already with
    the student's mean/std (deit: ImageNet's, not the neutral 0.5 a first pass would use)."""
    import lfi.data.folders as folders

    SyntheticShapes(24, img_size=32, seed=3).save_imagefolder(tmp_path / "data")
    calls = []
    real = folders.load_imagefolder

    def counting(path, transform=None, **kw):
        calls.append(next(t for t in transform.transforms if type(t).__name__ == "Normalize").mean)
        return real(path, transform, **kw)

    monkeypatch.setattr(folders, "load_imagefolder", counting)
    cfg = TrainConfig(data=str(tmp_path / "data"), teacher="none", student="deit_tiny_patch16_224",
                      student_kwargs=dict(TINY_STUDENT), img_size=32, queries=4, epochs=1, val_split=0.25,
                      workers=0, out=str(tmp_path / "run"), quiet=True, threads=1, device="cpu")
    trainer = Trainer(cfg)
    assert len(calls) == 2  # the training view and the evaluation view of the split, once each
    assert all(tuple(m) == tuple(trainer.mean) for m in calls) and tuple(trainer.mean) != (0.5, 0.5, 0.5)
    assert trainer.classes == sorted(p.name for p in (tmp_path / "data").iterdir())
