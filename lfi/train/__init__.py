"""LFI training layer: config, trainer (AdamW + warmup/cosine, AMP, DDP, resume), demo, CLI.

    from lfi.train import TrainConfig, Trainer, run_training, run_demo
    result = run_training(TrainConfig(data="path/to/imagefolder", teacher="ViT-B-16",
                                      teacher_weights="clip.safetensors", out="runs/exp1"))

Command line: ``lfi demo | train | eval | maps`` (see lfi.train.cli), or ``python -m lfi.train``
(also under ``torchrun --nproc_per_node=N -m lfi.train --data ...``).
"""
from __future__ import annotations

from lfi._lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {
    "TrainConfig": "lfi.train.config",
    "demo_config": "lfi.train.config",
    "Trainer": "lfi.train.trainer",
    "run_training": "lfi.train.trainer",
    "run_demo": "lfi.train.demo",
    "evaluate": "lfi.train.evaluation",
    "evaluate_checkpoint": "lfi.train.evaluation",
    "load_for_eval": "lfi.train.evaluation",
    "collect_maps": "lfi.train.maps",
    "render_maps": "lfi.train.maps",
    "checkpoint_maps_png": "lfi.train.maps",
    "leak_check": "lfi.train.controls",
    "save_checkpoint": "lfi.train.checkpoint",
    "load_checkpoint": "lfi.train.checkpoint",
    "load_student": "lfi.train.checkpoint",
})
