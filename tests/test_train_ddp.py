"""2-process DDP on CPU (gloo) through `torchrun -m lfi.train`: equals one process on the union batch."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")

from lfi.train import checkpoint as ckpt  # noqa: E402
from lfi.train.config import demo_config  # noqa: E402
from lfi.train.trainer import Trainer  # noqa: E402

# An oracle teacher and one distractor: two valid concepts in every image, so both ranks have the same
# loss normaliser (the mean over valid pairs) and DDP's gradient average equals the union batch's.
ARGS = dict(synthetic_train=64, synthetic_val=32, epochs=1, max_steps_per_epoch=1, warmup_epochs=0.0,
            synthetic_distractors=1, synthetic_score_noise=0.0, synthetic_confuse=0.0)


def test_ddp_two_processes_match_single_process(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lfi.train",
           "--data", "synthetic", "--student", "vit_tiny_patch16_224",
           "--student-kwargs", "patch_size=8,embed_dim=32,depth=2,num_heads=2",
           "--synthetic-train", "64", "--synthetic-val", "32", "--epochs", "1", "--max-steps-per-epoch", "1",
           "--warmup-epochs", "0", "--batch-size", "8", "--threads", "1", "--device", "cpu", "--no-progress",
           "--synthetic-distractors", "1", "--synthetic-score-noise", "0", "--synthetic-confuse", "0",
           "--out", str(out), "--quiet"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tensors, meta = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    assert meta["world_size"] == 2 and meta["global_step"] == 1
    # After one AdamW step the first moment is exp_avg = (1 - beta1) * grad: the DDP-averaged gradient
    # must equal the single-process gradient on the union batch. (Parameters are not compared: Adam's
    # first step is ~lr * sign(grad), which amplifies rounding noise in near-zero gradients.)
    ddp_m = {k: v for k, v in tensors.items() if k.endswith(".exp_avg")}

    cfg = demo_config(student_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), batch_size=16,
                      out=str(tmp_path / "single"), save_every=1, quiet=True, threads=1, **ARGS)
    Trainer(cfg).run()
    single = ckpt.load_checkpoint(tmp_path / "single" / "checkpoint.safetensors")[0]
    single_m = {k: v for k, v in single.items() if k.endswith(".exp_avg")}
    assert set(ddp_m) == set(single_m) and len(ddp_m) > 10
    scale = max(v.abs().max().item() for v in single_m.values())
    for k, v in single_m.items():
        torch.testing.assert_close(ddp_m[k], v, atol=1e-4 * scale, rtol=1e-3, msg=k)
    assert scale > 0
    # the DDP ranks agree with each other: rank 0 saved; parameters moved by ~lr from the same init
    init = Trainer(cfg.replace(out=str(tmp_path / "init"))).student.state_dict()
    ddp_state, single_state = ckpt.model_state(tensors), ckpt.model_state(single)
    for k, v in init.items():
        assert (ddp_state[k] - v).abs().max() <= 1.01 * cfg.lr + 1e-6, k
        assert (single_state[k] - v).abs().max() <= 1.01 * cfg.lr + 1e-6, k
