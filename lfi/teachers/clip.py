"""CLIPTeacher: MaskCLIP-style dense text-to-patch interaction maps from an open_clip model.

For images x and text concepts c_1..c_K:

    tokens      = the first L-1 residual blocks of the vision tower on x (CLIP's own preprocessing)
    dense patch = out_proj( v( ln_1(tokens) ) )   the last block's value path: no query-key mixing,
                                                  no residual, no MLP (MaskCLIP / ClearCLIP style)
    e_p         = normalize( ln_post(dense patch) @ proj )            (B, Nt, D)
    t_c         = normalize( mean over templates of normalize(encode_text(template.format(c))) )
    logits      = e_p . t_c / temperature                            (B, K, ht, wt)
    maps        = softmax over patches of bilinear_resize(logits, student grid)  -> (B, K, Np)

Image-level scores are CLIP's usual zero-shot scores: the normal pooled image embedding against
t_c (softmax over concepts at CLIP's logit scale). They decide which concepts supervise each image
(``select``: "topk" (default, k = 1), "threshold" or "all"), returned as ``TeacherMaps.valid``;
InteractionLoss gives the maps of invalid concepts no weight.

``temperature="auto"`` (default) calibrates the temperature per image by bisection on
log(temperature) so that the mean entropy of the image's valid maps is
``target_entropy * log(Np)`` (see ``calibrate_temperature``).

Weights come from a local file only (``pretrained="/path/open_clip_model.safetensors"``; OpenAI
ViT weights need the quick-GELU variant: model "ViT-B-16-quickgelu" or ``quick_gelu=True``).
Text embeddings are cached per (concepts, templates).
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfi.teachers.base import TeacherMaps, resize_log_maps

__all__ = ["CLIPTeacher", "DEFAULT_TEMPLATES", "CLIP_MEAN", "CLIP_STD", "SELECT_POLICIES", "calibrate_temperature",
           "map_entropy"]

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.", "a photo of a large {}.")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SELECT_POLICIES = ("topk", "threshold", "all")
# temperature="auto": bisection on log(temperature) over [T_MIN, T_MAX] (cosine similarities are in
# [-1, 1], so 1e-4 is practically one-hot and 10 practically uniform), AUTO_STEPS halvings of the
# interval: log T to 11.5 / 2**20 ~ 1e-5, far below what changes the entropy by 1e-3.
AUTO_T_MIN, AUTO_T_MAX, AUTO_STEPS = 1e-4, 10.0, 20


def map_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of softmax(logits) over the last dim."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def calibrate_temperature(sims: Tensor, valid: Optional[Tensor], target_entropy: float, *,
                          t_min: float = AUTO_T_MIN, t_max: float = AUTO_T_MAX, steps: int = AUTO_STEPS) -> Tensor:
    """Per-image temperature (B,) for patch similarities ``sims`` (B, K, Np): the T in [t_min, t_max]
    for which the mean over the image's valid concepts of entropy(softmax(sims / T)) equals
    ``target_entropy * log(Np)``.

    Bisection on log T (the entropy of softmax(z / T) is non-decreasing in T), ``steps`` halvings,
    no gradient, deterministic (no data-dependent control flow, no atomics). Images whose target is
    out of reach end at (within the last interval of) t_min or t_max. ``valid`` None = all concepts.
    """
    B, K, N = sims.shape
    sims = sims.detach().float()
    valid = torch.ones(B, K, dtype=torch.bool, device=sims.device) if valid is None else valid.to(sims.device).bool()
    w = valid.float()
    count = w.sum(1).clamp_min(1.0)
    target = float(target_entropy) * math.log(N)
    lo = torch.full((B,), math.log(t_min), device=sims.device)
    hi = torch.full((B,), math.log(t_max), device=sims.device)
    for _ in range(int(steps)):
        mid = 0.5 * (lo + hi)
        h = (map_entropy(sims / mid.exp().view(B, 1, 1)) * w).sum(1) / count
        too_flat = h > target
        hi = torch.where(too_flat, mid, hi)
        lo = torch.where(too_flat, lo, mid)
    return (0.5 * (lo + hi)).exp()


def _load_open_clip(name: str, pretrained, quick_gelu: bool, model_kwargs: dict):
    import open_clip

    if pretrained is None:
        warnings.warn(f"CLIPTeacher({name!r}) has random weights (pretrained=None): its maps are meaningless "
                      "except for tests. Pass pretrained='/path/to/weights.safetensors'.", UserWarning, stacklevel=3)
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, **model_kwargs)
    path = Path(os.fspath(pretrained)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP teacher weights file not found: {path}. lfi never downloads weights: download an open_clip "
            f"checkpoint for {name!r} yourself (e.g. open_clip_pytorch_model.bin / .safetensors) and pass its path "
            "(--teacher-weights).")
    return open_clip.create_model(name, pretrained=str(path), force_quick_gelu=quick_gelu, **model_kwargs)


def _check_select(select, topk, threshold, num_concepts: Optional[int] = None) -> None:
    if select not in SELECT_POLICIES:
        raise ValueError(f"select must be one of {SELECT_POLICIES}, got {select!r}")
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1 or (
            select == "topk" and num_concepts is not None and topk > num_concepts):
        k = "the number of concepts" if num_concepts is None else f"{num_concepts} concepts"
        raise ValueError(f"topk must be an int in 1..K (K = {k}), got {topk!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def _check_temperature(temperature, target_entropy) -> None:
    if isinstance(temperature, str):
        if temperature != "auto":
            raise ValueError(f"temperature must be a float > 0 or 'auto', got {temperature!r}")
    elif isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a float > 0 or 'auto', got {temperature!r}")
    if isinstance(target_entropy, bool) or not isinstance(target_entropy, numbers.Real) or not 0 < target_entropy < 1:
        raise ValueError(f"target_entropy must be in (0, 1) (a fraction of log(Np)), got {target_entropy!r}")


class CLIPTeacher(nn.Module):
    """Dense text-to-patch maps from an open_clip CLIP (see module docstring).

    Which concepts supervise an image (``select``; returned as ``TeacherMaps.valid`` (B, K) bool,
    next to the zero-shot ``scores`` they are chosen from):

    * ``"topk"`` (default, ``topk=1``): the ``topk`` best-scored concepts of each image. On a
      single-label classification dataset the concepts are the classes and an image shows one of
      them: its top-1 zero-shot concept is the best label-free guess, and the maps of the other
      classes (objects that are not in the image) would teach the student to attend to whatever
      patch resembles an absent class. Before this option every concept of every image was
      supervised (with ``assignment="fixed"``, i.e. #concepts <= #queries, all classes' maps).
    * ``"threshold"``: the concepts whose zero-shot probability is >= ``threshold``; when none
      passes, the image's top-1 concept stays valid, so each image keeps at least one map.
    * ``"all"``: every concept valid (the old behaviour; for multi-label data where any concept
      may be present, or with concepts chosen per image upstream).

    Temperature (``temperature``): a float divides the cosine similarities before the patch
    softmax (as before); ``"auto"`` (default) picks it per image by bisection on log T in
    [1e-4, 10] (20 steps, no gradient) so that the mean entropy of that image's *valid* maps is
    ``target_entropy * log(Np)`` (Np = patches of the output grid, i.e. the student's). Per image,
    not per batch, so an image's maps do not depend on the other images in its batch: an image gets
    the same maps in training, ``lfi eval`` / ``lfi maps`` (other batch sizes) and on any DDP rank. The cost is
    that sharpness differences *between* images are normalised away (those between an image's valid
    concepts are kept). The temperatures of the last call are in ``last_temperature`` (B,).
    Why "auto" is the default: the old fixed 0.01 is CLIP's *image-level* logit scale, not a
    calibration of patch-level similarities; patch cosine similarities of MaskCLIP-style dense
    features have a model-dependent spread, and at 0.01 the maps can be near one-hot (a
    single-patch target that also depends on the grid size). A target entropy is model- and
    grid-independent: 0.5 * log(Np) is the entropy of a uniform map over sqrt(Np) patches (14 of
    196 for a 14 x 14 grid), a blob rather than a point. Pass ``temperature=0.01`` for the old maps
    (reproduced exactly).

    Args:
        model: an open_clip model name (e.g. "ViT-B-16") or a built open_clip CLIP model.
        pretrained: local weights file for a model name (None = random weights, for tests only).
        concepts: the concept names (e.g. class names); ``set_concepts`` changes them later.
        templates: prompt templates with one "{}".
        temperature: "auto" (default) or a float > 0: softmax temperature over patches on the cosine
            similarities (0.01 = CLIP's learned logit scale of 100; the old default).
        target_entropy: for temperature="auto", the target mean entropy of the valid maps as a
            fraction of log(Np), in (0, 1) (default 0.5).
        select: "topk" (default) | "threshold" | "all": which concepts are valid per image.
        topk: for select="topk", the number of best-scored concepts kept per image (1..K; default 1).
        threshold: for select="threshold", the zero-shot probability a concept needs, in (0, 1]
            (default 0.5); the top-1 concept is always kept.
        grid: the student's patch grid (rows, cols); None = the teacher's own grid.
        input_mean, input_std: the normalisation of the images the teacher is given (the student's);
            images are mapped back to [0, 1] and renormalised with CLIP's mean/std. Default
            (0, 0, 0) / (1, 1, 1): images in [0, 1].
        tokenizer: an open_clip tokenizer (default: open_clip.get_tokenizer(model name), offline).
        quick_gelu: force QuickGELU (needed for OpenAI's original weights).
        residual, mlp: also add the residual stream / the last block's MLP to the dense path
            (MaskCLIP variants; both off by default, as in ClearCLIP).
        model_kwargs: extra kwargs for open_clip.create_model (e.g. a tiny vision_cfg for tests).
    """

    needs_masks = False

    def __init__(self, model: Union[str, nn.Module] = "ViT-B-16", pretrained: Optional[str] = None,
                 concepts: Optional[Sequence[str]] = None, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 temperature: Union[float, str] = "auto", target_entropy: float = 0.5, select: str = "topk",
                 topk: int = 1, threshold: float = 0.5, grid: Optional[Sequence[int]] = None,
                 input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0), tokenizer=None, quick_gelu: bool = False,
                 residual: bool = False, mlp: bool = False, model_kwargs: Optional[dict] = None, device=None):
        super().__init__()
        import open_clip

        _check_temperature(temperature, target_entropy)  # before loading any weights
        _check_select(select, topk, threshold)

        if isinstance(model, str):
            self.model_name = model
            clip = _load_open_clip(model, pretrained, quick_gelu, dict(model_kwargs or {}))
        else:
            if pretrained is not None:
                raise ValueError("pretrained applies only when `model` is a name")
            self.model_name = type(model).__name__
            clip = model
        visual = getattr(clip, "visual", None)
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise TypeError(f"CLIPTeacher needs an open_clip CLIP with a ViT vision tower (visual.{attr} missing)")
        if getattr(visual, "attn_pool", None) is not None:
            raise TypeError("CLIPTeacher does not support vision towers with attentional pooling (CoCa)")
        self.clip = clip.eval().requires_grad_(False)
        if device is not None:
            self.clip.to(device)
        self.tokenizer = tokenizer or open_clip.get_tokenizer(self.model_name if isinstance(model, str) else "ViT-B-16")
        self.templates = tuple(templates)
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder")
        self.temperature = "auto" if isinstance(temperature, str) else float(temperature)
        self.target_entropy = float(target_entropy)
        self.select, self.topk, self.threshold = select, int(topk), float(threshold)
        self.last_temperature: Optional[Tensor] = None  # (B,) temperatures of the last forward
        self.grid = None if grid is None else tuple(int(g) for g in grid)
        self.residual, self.mlp = bool(residual), bool(mlp)
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        mean = getattr(visual, "image_mean", None) or CLIP_MEAN
        std = getattr(visual, "image_std", None) or CLIP_STD
        self.register_buffer("clip_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_mean", torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("in_std", torch.tensor(input_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict = {}
        self.concepts: list = []
        if concepts is not None:
            self.set_concepts(concepts)

    # ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True):  # the teacher is always frozen and in eval mode
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def set_concepts(self, concepts: Sequence[str]) -> None:
        concepts = [str(c) for c in concepts]
        if not concepts:
            raise ValueError("CLIPTeacher needs at least one concept")
        _check_select(self.select, self.topk, self.threshold, len(concepts))
        self.concepts = concepts
        self.text_embeddings()  # compute and cache

    @torch.no_grad()
    def text_embeddings(self, concepts: Optional[Sequence[str]] = None) -> Tensor:
        """(K, D) L2-normalised text embeddings (template-averaged), cached."""
        concepts = list(self.concepts if concepts is None else concepts)
        key = (tuple(concepts), self.templates, str(self.device))
        if key not in self._text_cache:
            prompts = [t.format(c.replace("_", " ")) for c in concepts for t in self.templates]
            tokens = self.tokenizer(prompts).to(self.device)
            emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            emb = F.normalize(emb.view(len(concepts), len(self.templates), -1).mean(1), dim=-1)
            self._text_cache[key] = emb
        return self._text_cache[key]

    def preprocess(self, images: Tensor) -> Tensor:
        """Student-normalised images -> CLIP-normalised images at CLIP's resolution."""
        x = images.float() * self.in_std + self.in_mean
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.clip_mean) / self.clip_std

    @torch.no_grad()
    def dense_features(self, images: Tensor):
        """-> (patch embeddings (B, ht, wt, D) normalised, pooled image embedding (B, D) normalised)."""
        v = self.clip.visual
        x = self.preprocess(images).to(v.conv1.weight.dtype)
        x = v.conv1(x)
        B, C, ht, wt = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
        x = torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks[:-1]:
            x = blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        # pooled embedding: the full last block (CLIP's usual image embedding)
        full = last(x if batch_first else x.transpose(0, 1))
        full = full if batch_first else full.transpose(0, 1)
        pooled = v.ln_post(full[:, 0]) @ v.proj
        # dense path: value projection of ln_1(x), out_proj, no attention mixing
        attn = last.attn
        h = last.ln_1(x)
        w, b = attn.in_proj_weight, attn.in_proj_bias
        val = F.linear(h, w[2 * C:], None if b is None else b[2 * C:])
        dense = last.ls_1(attn.out_proj(val))
        if self.residual:
            dense = dense + x
        if self.mlp:
            dense = dense + last.ls_2(last.mlp(last.ln_2(dense)))
        dense = v.ln_post(dense[:, 1:]) @ v.proj
        return F.normalize(dense.float(), dim=-1).view(B, ht, wt, -1), F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def forward(self, images: Tensor, masks=None) -> TeacherMaps:
        """-> TeacherMaps(probs (B, K, *grid), valid (B, K) bool (``select``), scores (B, K) zero-shot
        probabilities, concepts); sets ``last_temperature`` (B,)."""
        if not self.concepts:
            raise ValueError("CLIPTeacher has no concepts: pass concepts=... or call set_concepts()")
        text = self.text_embeddings()
        patches, pooled = self.dense_features(images)
        with torch.autocast(patches.device.type, enabled=False):  # similarities / T in float32 even under AMP
            return self._maps(patches.float(), pooled.float(), text.float())

    def select_concepts(self, scores: Tensor) -> Tensor:
        """(B, K) zero-shot probabilities -> (B, K) bool: the concepts that supervise each image."""
        _check_select(self.select, self.topk, self.threshold, scores.shape[1])
        if self.select == "all":
            return torch.ones_like(scores, dtype=torch.bool)
        valid = torch.zeros_like(scores, dtype=torch.bool)
        if self.select == "topk":
            return valid.scatter_(1, scores.topk(self.topk, dim=1).indices, True)
        valid = scores >= self.threshold
        return valid.scatter_(1, scores.argmax(1, keepdim=True), True)  # at least the top-1 concept

    def _maps(self, patches: Tensor, pooled: Tensor, text: Tensor) -> TeacherMaps:
        scale = self.clip.logit_scale.exp().float() if hasattr(self.clip, "logit_scale") else 100.0
        scores = torch.softmax(scale * pooled @ text.t(), -1)
        valid = self.select_concepts(scores)
        sims = torch.einsum("bhwd,kd->bkhw", patches, text)
        B = sims.shape[0]
        if self.temperature == "auto":
            if self.grid is not None:
                sims = resize_log_maps(sims, self.grid)  # linear, so resizing sims or sims / T is the same
            temp = calibrate_temperature(sims.flatten(2), valid, self.target_entropy)
            logits = sims / temp.view(B, 1, 1, 1)
        else:
            logits = sims / self.temperature  # the same operations, in the same order, as before "auto"
            if self.grid is not None:
                logits = resize_log_maps(logits, self.grid)
            temp = torch.full((B,), self.temperature, device=sims.device)
        self.last_temperature = temp
        probs = torch.softmax(logits.flatten(2), -1).view_as(logits)
        return TeacherMaps(probs=probs, valid=valid, scores=scores, concepts=list(self.concepts))

    def extra_repr(self) -> str:
        return (f"model={self.model_name!r}, concepts={len(self.concepts)}, templates={len(self.templates)}, "
                f"temperature={self.temperature!r}"
                + (f", target_entropy={self.target_entropy}" if self.temperature == "auto" else "")
                + f", select={self.select!r}"
                + (f", topk={self.topk}" if self.select == "topk" else "")
                + (f", threshold={self.threshold}" if self.select == "threshold" else "")
                + f", grid={self.grid}")
