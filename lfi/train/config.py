"""TrainConfig: every knob of an LFI training run (CLI flags map 1:1 onto the fields)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["TrainConfig", "DEMO_STUDENT", "demo_config"]

# The tiny ViT of the built-in demo: 32x32 images, 4x4 patches (8x8 grid), width 48, depth 4, 3 heads.
DEMO_STUDENT = dict(patch_size=4, embed_dim=48, depth=4, num_heads=3)


@dataclass
class TrainConfig:
    # ---- data
    data: str = "synthetic"                  # ImageFolder root, or "synthetic" (built-in task)
    val_data: Optional[str] = None           # ImageFolder root for validation (real data)
    val_split: float = 0.0                   # hold out this fraction of --data when no --val-data
    img_size: int = 224
    augment: str = "flip"                    # none | flip | crop+flip (real data only)
    workers: int = 2
    synthetic_train: int = 2000              # built-in task sizes / generation
    synthetic_val: int = 1000
    synthetic_task: str = "colour"           # colour | quadrant (see lfi.data.synthetic)
    synthetic_style: str = "clean"
    synthetic_concepts: Optional[str] = None   # comma list; default: all concepts of the task
    synthetic_distractors: int = 3
    synthetic_seed: int = 1234               # data seed (independent of the training seed)
    # ---- student
    student: str = "vit_small_patch16_224"
    student_weights: Optional[str] = None    # local timm weights file
    student_kwargs: dict = field(default_factory=dict)
    queries: int = 8
    supervised_layers: str = "all"
    read_back: str = "off"                   # off | on | gated
    head: str = "cls"                        # cls | cls+queries
    pos_embed_init: Optional[str] = None     # None (timm / pretrained) | sincos (fixed 2-D init, from scratch)
    # ---- teacher
    teacher: str = "ViT-B-16"                # open_clip model name | "synthetic" | "none"
    teacher_weights: Optional[str] = None    # local open_clip weights file
    teacher_random: bool = False             # allow a random-weight CLIP teacher (tests only)
    teacher_kwargs: dict = field(default_factory=dict)   # extra open_clip.create_model kwargs
    concepts: Optional[str] = None           # comma list or file; default: the class names
    templates: Optional[str] = None          # '|'-separated prompt templates with {}
    teacher_temperature: Union[float, str] = "auto"  # float > 0, or "auto": per image, the mean entropy of the
    teacher_target_entropy: float = 0.5      #   valid maps = teacher_target_entropy * log(Np)
    teacher_select: str = "topk"             # concepts that supervise an image: topk | threshold | all
    teacher_topk: int = 1                    # select=topk: the k best zero-shot concepts (1 = the top class)
    teacher_threshold: float = 0.5           # select=threshold: zero-shot probability >= this (top-1 always)
    quick_gelu: bool = False
    synthetic_sigma: float = 1.0             # SyntheticTeacher: blur (patches), presence-score noise, confusions
    synthetic_score_noise: float = 0.35
    synthetic_confuse: float = 0.15
    teacher_shuffle: bool = False            # control: each image gets the teacher output of another image
    # ---- loss
    lam: float = 1.0                         # weight of the teacher loss (0 = baseline)
    supervision: str = "queries"             # what the teacher trains: queries (LFI) | map_head | logits (controls)
    kd_temperature: float = 2.0              # supervision=logits: distillation temperature
    assignment: str = "auto"                 # auto (fixed if concepts <= queries, else topk) | fixed | topk | hungarian
    heads: str = "broadcast"                 # broadcast | mean
    kl_temperature: float = 1.0
    # ---- optimisation
    epochs: int = 30
    batch_size: int = 64                     # per process
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    amp: str = "auto"                        # auto (bf16 on CUDA, off on CPU) | bf16 | off
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    threads: Optional[int] = None            # torch CPU threads
    max_steps_per_epoch: Optional[int] = None
    # ---- output
    out: str = "runs/exp"
    resume: Optional[str] = None             # checkpoint path, or "auto" (out/checkpoint.safetensors if present)
    save_every: int = 1
    eval_every: int = 1
    map_topk: float = 0.1                    # fraction of patches for the map-consistency score
    progress: bool = True
    quiet: bool = False

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def demo_config(**overrides) -> TrainConfig:
    """The built-in experiment's run (`lfi demo`): tiny ViT on the synthetic colour task with the
    VLM-like SyntheticTeacher; lam = 0 gives its plain-ViT baseline."""
    cfg = TrainConfig(
        data="synthetic", synthetic_task="colour", img_size=32, student="vit_tiny_patch16_224",
        student_kwargs=dict(DEMO_STUDENT), queries=6, supervised_layers="all", read_back="off", head="cls",
        pos_embed_init="sincos", teacher="synthetic", lam=1.0, assignment="fixed", epochs=15, batch_size=32, lr=1e-3,
        min_lr=1e-5, weight_decay=0.05, warmup_epochs=0.5, workers=0, progress=False, save_every=0, device="cpu",
        synthetic_train=1000, synthetic_val=500,
    )
    return cfg.replace(**overrides)
