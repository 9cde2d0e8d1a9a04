"""Runs are never lost or mixed, output paths are checked before any work, bad files are named
(issue 13, parts 4-5)."""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from lfi import cli as lfi_cli  # noqa: E402
from lfi.benchmark import write_json_atomic  # noqa: E402
from lfi.data.folders import load_imagefolder  # noqa: E402
from lfi.data.folders import reset_skipped  # noqa: E402
from lfi.data.folders import skipped_images  # noqa: E402
from lfi.data.synthetic import SyntheticShapes  # noqa: E402
from lfi.train import checkpoint as ckpt  # noqa: E402
from lfi.train.cli import main  # noqa: E402
from lfi.train.config import TrainConfig  # noqa: E402
from lfi.train.config import demo_config  # noqa: E402
from lfi.train.trainer import Trainer  # noqa: E402

TINY_STUDENT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
TRAIN_ARGS = ["train", "--data", "synthetic", "--student-kwargs", "patch_size=8,embed_dim=32,depth=2,num_heads=2",
              "--synthetic-train", "32", "--synthetic-val", "16", "--epochs", "1", "--batch-size", "16",
              "--no-progress", "--quiet", "--threads", "1", "--device", "cpu"]


def tiny(out, **kw):
    cfg = demo_config(student_kwargs=dict(TINY_STUDENT), synthetic_train=32, synthetic_val=16, batch_size=16,
                      epochs=1, out=str(out), save_every=1, quiet=True, threads=1)
    return cfg.replace(**kw)


def lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines()]


def one_line_error(capsys, cmd):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"lfi {cmd}: error: "), err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    Trainer(tiny(out)).run()
    return out


# ------------------------------------------------------------------------------------------------
# 1. a run folder is never reused by accident
# ------------------------------------------------------------------------------------------------
def test_train_refuses_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TRAIN_ARGS, "--out", str(out)]) == 0
    assert len(lines(out / "metrics.jsonl")) == 1
    capsys.readouterr()
    assert main([*TRAIN_ARGS, "--out", str(out)]) == 2
    err = one_line_error(capsys, "train")
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert len(lines(out / "metrics.jsonl")) == 1  # untouched
    assert main([*TRAIN_ARGS, "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert [r["epoch"] for r in lines(out / "metrics.jsonl")] == [1]  # one run's epochs, not two
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert main([*TRAIN_ARGS, "--out", str(out), "--overwrite", "--resume", "auto"]) == 2
    assert "give one of them" in one_line_error(capsys, "train")
    # resuming continues the run: metrics.jsonl holds the checkpoint's epochs, then the new ones
    assert main([*TRAIN_ARGS, "--epochs", "2", "--out", str(out), "--resume", "auto"]) == 0
    assert [r["epoch"] for r in lines(out / "metrics.jsonl")] == [1, 2]


def test_trainer_api_enforces_the_rule(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(FileExistsError, match="--overwrite"):
        Trainer(tiny(out))
    with pytest.raises(FileExistsError, match="no checkpoint to resume"):
        Trainer(tiny(out, resume="auto"))  # nothing to resume: it would start over and mix
    Trainer(tiny(out, overwrite=True, save_every=0)).run()
    assert [r["epoch"] for r in lines(out / "metrics.jsonl")] == [1]
    assert not (out / "checkpoint.safetensors").exists()
    Trainer(tiny(tmp_path / "empty")).run()  # an empty or new folder needs no flag


def test_demo_rerun_starts_its_runs_over(tmp_path):
    from lfi.train.demo import run_demo

    small = dict(synthetic_train=64, synthetic_val=32, epochs=1)
    run_demo(tmp_path, quick=True, jobs=1, threads=1, **small)
    run_demo(tmp_path, quick=True, jobs=1, threads=1, **small)
    runs = sorted(tmp_path.glob("*_seed0"))
    assert runs
    for run in runs:
        assert [r["epoch"] for r in lines(run / "metrics.jsonl")] == [1], run


# ------------------------------------------------------------------------------------------------
# 2. atomic writes
# ------------------------------------------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one(run_dir, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "checkpoint.safetensors"
    shutil.copy(run_dir / "checkpoint.safetensors", path)
    shutil.copy(run_dir / "checkpoint.json", tmp_path / "checkpoint.json")
    before = path.read_bytes(), (tmp_path / "checkpoint.json").read_bytes()
    student, _ = ckpt.load_student(path)

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, student, None, {"epoch": 5})
    assert (path.read_bytes(), (tmp_path / "checkpoint.json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    ckpt.load_checkpoint(path)


def test_failed_json_writes_keep_the_previous_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"old": 1}')
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})  # lfi bench --json
    with pytest.raises(RuntimeError):
        ckpt.atomic_write(path, lambda p: (p.write_text("{half"), (_ for _ in ()).throw(RuntimeError("crash"))))
    assert path.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    ckpt.atomic_write_text(path, '{"new": 1}')
    assert json.loads(path.read_text()) == {"new": 1}


# ------------------------------------------------------------------------------------------------
# 3. output paths checked before any work; no silent overwrite
# ------------------------------------------------------------------------------------------------
def test_bench_json_path_checked_first(tmp_path, capsys, monkeypatch):
    from lfi import benchmark

    def never(*a, **k):
        raise AssertionError("benchmark ran before the --json path was checked")

    monkeypatch.setattr(benchmark, "run_comparison", never)
    bad = tmp_path / "missing" / "x.json"
    assert lfi_cli.main(["bench", "--json", str(bad), "--shape", "1,1,4,4,4"]) == 2
    assert str(bad) in one_line_error(capsys, "bench")
    old = tmp_path / "x.json"
    old.write_text("{}")
    assert lfi_cli.main(["bench", "--json", str(old), "--shape", "1,1,4,4,4"]) == 2
    err = one_line_error(capsys, "bench")
    assert str(old) in err and "--overwrite" in err and old.read_text() == "{}"


@pytest.mark.parametrize("argv, flag, says", [
    (["--shape", "a,b,c,d,e"], "--shape", "expected integers B,H,M,N,D"),
    (["--shape", "1,2,3"], "--shape", "expected B,H,M,N,D"),
    (["--shape", "1,0,4,4,4"], "--shape", ">= 1"),
    (["--min-time", "-1"], "--min-time", "> 0"),
    (["--min-time", "nan"], "--min-time", "> 0"),
    (["--impls", ",,,"], "--impls", "comma-separated list"),
    (["--impls", "eager,nope"], "--impls", "unknown implementation 'nope'"),
    (["--threads", "1.5"], "--threads", "an integer > 0"),
    (["--dtype", "fp8"], "--dtype", "unknown dtype 'fp8'"),
])
def test_bench_options_get_one_line_errors(argv, flag, says, capsys, monkeypatch):
    from lfi import benchmark

    monkeypatch.setattr(benchmark, "run_comparison", lambda *a, **k: pytest.fail("ran with a bad option"))
    with pytest.raises(SystemExit) as info:
        lfi_cli.main(["bench", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lfi bench: error: argument {flag}: ") and says in err, err


def test_eval_and_maps_paths_checked_first(run_dir, tmp_path, capsys):
    ck = str(run_dir / "checkpoint.safetensors")
    bad = tmp_path / "missing" / "r.json"
    assert main(["eval", ck, "--data", "synthetic", "--json", str(bad)]) == 2
    assert str(bad) in one_line_error(capsys, "eval")
    old = tmp_path / "r.json"
    old.write_text("{}")
    assert main(["eval", ck, "--data", "synthetic", "--json", str(old)]) == 2
    assert str(old) in one_line_error(capsys, "eval") and old.read_text() == "{}"
    bad_png = tmp_path / "missing" / "m.png"
    assert main(["maps", ck, "--synthetic", "0", "--out", str(bad_png)]) == 2
    assert str(bad_png) in one_line_error(capsys, "maps")
    png = tmp_path / "m.png"
    assert main(["maps", ck, "--synthetic", "0", "--out", str(png)]) == 0
    size = png.stat().st_size
    capsys.readouterr()
    assert main(["maps", ck, "--synthetic", "0", "--out", str(png)]) == 2
    assert "--overwrite" in one_line_error(capsys, "maps") and png.stat().st_size == size
    assert main(["maps", ck, "--synthetic", "0", "--out", str(png), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------------------
# 4. bad files, named
# ------------------------------------------------------------------------------------------------
def folder_with_a_truncated_image(root):
    SyntheticShapes(16, img_size=32, task="quadrant", seed=0).save_imagefolder(root)
    bad = sorted(root.rglob("*.png"))[3]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def test_imagefolder_skips_or_names_a_truncated_image(tmp_path):
    from torchvision import transforms as T

    bad = folder_with_a_truncated_image(tmp_path / "data")
    ds = load_imagefolder(tmp_path / "data", T.ToTensor())
    i = [p for p, _ in ds.samples].index(str(bad))
    with pytest.warns(RuntimeWarning, match=str(bad)):
        x, y = ds[i]
    assert torch.equal(x, ds[i + 1][0]) and y == ds[i + 1][1]  # deterministic: the next readable image
    assert ds.skipped.value == 1
    reset_skipped(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b[1]) for b in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))
    assert n == len(ds) and skipped_images(ds) == 1  # counted across DataLoader workers
    strict = load_imagefolder(tmp_path / "data", T.ToTensor(), strict=True)
    with pytest.raises(ValueError, match=str(bad)):
        strict[i]


def test_training_counts_skips_and_strict_fails(tmp_path, capsys):
    bad = folder_with_a_truncated_image(tmp_path / "data")
    cfg = TrainConfig(data=str(tmp_path / "data"), teacher="none", student="vit_tiny_patch16_224",
                      student_kwargs=dict(TINY_STUDENT), img_size=32, queries=4, epochs=1, batch_size=8, workers=0,
                      out=str(tmp_path / "run"), progress=False, quiet=True, threads=1, device="cpu", save_every=1,
                      val_data=str(tmp_path / "data"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        hist = Trainer(cfg).run()["history"]
    assert hist[0]["skipped_images"] == 1 and any(str(bad) in str(x.message) for x in w)
    assert hist[0]["val_skipped_images"] == 1  # validation counts its own skips (not the training view's)
    report = tmp_path / "eval.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", str(tmp_path / "run" / "checkpoint.safetensors"), "--data", str(tmp_path / "data"),
                     "--no-maps", "--workers", "0", "--json", str(report)]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    assert json.loads(report.read_text())["domains"]["data"]["skipped_images"] == 1
    argv = ["train", "--data", str(tmp_path / "data"), "--teacher", "none", "--student", "vit_tiny_patch16_224",
            "--student-kwargs", "patch_size=8,embed_dim=32,depth=2,num_heads=2", "--img-size", "32", "--queries", "4",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "strict"),
            "--no-progress", "--quiet", "--threads", "1", "--device", "cpu", "--strict"]
    assert main(argv) == 2
    assert str(bad) in one_line_error(capsys, "train")


def test_corrupt_checkpoint_and_image_are_named(run_dir, tmp_path, capsys):
    path = tmp_path / "checkpoint.safetensors"
    data = (run_dir / "checkpoint.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    shutil.copy(run_dir / "checkpoint.json", tmp_path / "checkpoint.json")
    assert main(["eval", str(path), "--data", "synthetic"]) == 2
    err = one_line_error(capsys, "eval")
    assert str(path) in err and "not a valid lfi checkpoint" in err
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="not a valid lfi checkpoint"):
        Trainer(tiny(tmp_path / "run", resume=str(path)))
    (tmp_path / "checkpoint.json").write_text("{trunc")
    assert main(["eval", str(path), "--data", "synthetic"]) == 2
    assert "not a valid lfi checkpoint" in one_line_error(capsys, "eval")
    img = tmp_path / "notimage.jpg"
    img.write_text("hello")
    assert main(["maps", str(run_dir / "checkpoint.safetensors"), str(img), "--out", str(tmp_path / "m.png")]) == 2
    err = one_line_error(capsys, "maps")
    assert str(img) in err and "not a readable image" in err


# ------------------------------------------------------------------------------------------------
# 3. Ctrl-C: a resumable checkpoint, and the resumed run is the uninterrupted one
# ------------------------------------------------------------------------------------------------
def _sigint_at_step(monkeypatch, trainer, at: int):
    """Sends a real SIGINT to this process after `at` optimizer steps (the trainer's handler catches it)."""
    import os
    import signal

    real = trainer.train_step
    count = {"n": 0}

    def step(batch):
        r = real(batch)
        count["n"] += 1
        if count["n"] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(trainer, "train_step", step)


@pytest.mark.parametrize("at", [3, 2])  # mid-epoch 2 (2 steps per epoch: step 3 is its first), end of epoch 1
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, at):
    from lfi.train.interrupt import TrainingInterrupted

    kw = dict(epochs=3, save_every=0, synthetic_train=32, batch_size=16, student_kwargs=dict(TINY_STUDENT,
              drop_path_rate=0.1))
    full = Trainer(tiny(tmp_path / "full", **kw)).run()["history"]
    trainer = Trainer(tiny(tmp_path / "cut", **kw))
    _sigint_at_step(monkeypatch, trainer, at)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    err = info.value
    assert err.checkpoint is not None and Path(err.checkpoint).is_file() and "--resume auto" in str(err)
    assert (err.epoch, err.step) == ((2, 1) if at == 3 else (2, 0))
    assert len(lines(tmp_path / "cut" / "metrics.jsonl")) == 1  # the finished epoch only
    rest = Trainer(tiny(tmp_path / "cut", **kw).replace(resume="auto")).run()["history"]
    keys = ("train_loss", "train_acc", "val_acc", "step")
    assert [{k: r[k] for k in keys} for r in rest] == [{k: r[k] for k in keys} for r in full]
    assert [r["epoch"] for r in lines(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3]


def test_ctrl_c_in_lfi_train_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import lfi.train.trainer as trainer_mod

    real_step = trainer_mod.Trainer.train_step

    def step(self, batch):
        import os
        import signal

        r = real_step(self, batch)
        os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    out = tmp_path / "run"
    assert main(TRAIN_ARGS + ["--out", str(out), "--save-every", "0"]) == 130
    err = capsys.readouterr().err
    assert "resumable checkpoint" in err and "--resume auto" in err and (out / "checkpoint.safetensors").is_file()


def test_demo_ctrl_c_then_resume_matches_an_uninterrupted_demo(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import lfi.train.trainer as trainer_mod
    from lfi.train.demo import RESULT_FILE
    from lfi.train.demo import run_demo

    small = dict(synthetic_train=64, synthetic_val=32, epochs=2, batch_size=32)  # 2 steps per epoch, 4 per run
    clean = run_demo(tmp_path / "clean", quick=True, jobs=1, threads=1, **small)
    real_step, calls = trainer_mod.Trainer.train_step, {"n": 0}

    def step(self, batch):
        r = real_step(self, batch)
        calls["n"] += 1
        if calls["n"] == 11:  # the third run, first step of its second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt, match="2 of .* runs.*--resume"):
        run_demo(out, quick=True, jobs=1, threads=1, **small)
    assert len(list(out.glob(f"*/{RESULT_FILE}"))) == 2 and len(list(out.glob("*/checkpoint.safetensors"))) == 3
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", real_step)
    capsys.readouterr()
    resumed = run_demo(out, quick=True, jobs=1, threads=1, resume=True, **small)
    assert "2 finished run(s) reused, 1 continued from their checkpoints" in capsys.readouterr().out
    for arm, s in clean["summary"]["main"].items():
        if arm != "target":
            assert resumed["summary"]["main"][arm]["curves"] == s["curves"], arm
    metrics = [[r["epoch"] for r in lines(p)] for p in sorted(out.glob("*/metrics.jsonl"))]
    assert metrics == [[1, 2]] * len(metrics)  # no stale or repeated records
