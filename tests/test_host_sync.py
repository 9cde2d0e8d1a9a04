"""No call synchronises with the device, and what that leaves unchecked.

Reading a device tensor's value on the host (``.item()``, ``bool(t.any())``, ``nonzero``) waits for
the GPU: the launch queue drains, the host launches every following kernel while the GPU idles, and
CUDA graph capture fails. On a GPU, lfi's ops check no values of device tensors unless asked
(``validate=True``); on the CPU such checks are free and stay (a negative target probability raises
there). These tests run every op, forward and backward, with the value checks as on a GPU
(``lfi.ops._kl.checks_values_free`` patched to False) under a dispatch mode that records every aten op
whose result depends on tensor values on the host; lfi runs its plain eager path under it
(``observes_only``), the one a user's call takes. Unchecked, a negative target probability must give
its row's KL NaN in every backend (as F.kl_div), the other rows unchanged.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE
from helpers import bool_mask
from helpers import float_mask
from helpers import make_gen
from helpers import make_qkv
from helpers import randn
from integration_models import timm_model
from kl_cases import key_mask_of
from kl_cases import make_target
from lfi.ops import attention_kl
from lfi.ops import attention_kl_qk
from lfi.ops import interaction_attention

aten = torch.ops.aten
# Ops whose result (a Python value, or an output's size) depends on tensor values: each waits for
# the device when the tensor lives on a GPU.
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default, aten.equal.default,
    aten.allclose.default, aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
    aten.unique_consecutive.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
}


class SyncRecorder(TorchDispatchMode):
    """Records the host-synchronising aten ops run under it."""

    observes_only = True  # lfi's ops run their plain eager path, as without the mode

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def values_unchecked(monkeypatch):
    """Value checks as on a GPU: only with validate=True."""
    import lfi.ops._kl

    monkeypatch.setattr(lfi.ops._kl, "checks_values_free", lambda t: False)


B, H, M, N, D = 2, 2, 5, 9, 8


def _probs(gen, shape=(B, 1, M, N)):
    return make_target(shape, "probs", gen)


# Each case: setup(backend, gen) builds inputs (and models) and returns the step to record: a
# forward and a backward.
def _attention(Hkv=H, **kw):
    def setup(backend, gen):
        q, k, v = make_qkv(B, H, Hkv, M, N, D, gen=gen, requires_grad=True)
        extra = {name: f(gen) if callable(f) else f for name, f in kw.items()}

        def step():
            outs = interaction_attention(q, k, v, backend=backend, **extra)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward([o.float().sum() * (i + 1) for i, o in enumerate(outs)])
        return step
    return setup


def _kl(target_is="probs", key_mask=False):
    def setup(backend, gen):
        logits = randn((B, H, M, N), gen, requires_grad=True)
        target = make_target((B, 1, M, N), target_is, gen)
        mask = key_mask_of("B11N", B, H, M, N, gen) if key_mask else None
        return lambda: attention_kl(logits, target, target_is=target_is, key_mask=mask, backend=backend).backward()
    return setup


def _kl_qk(target_is="probs", key_mask=False):
    def setup(backend, gen):
        q, k = randn((B, H, M, D), gen, requires_grad=True), randn((B, H, N, D), gen, requires_grad=True)
        target = make_target((B, 1, M, N), target_is, gen)
        mask = key_mask_of("B11N", B, H, M, N, gen) if key_mask else None
        return lambda: attention_kl_qk(q, k, target, target_is=target_is, key_mask=mask, backend=backend).backward()
    return setup


def _timm_patched_capture(backend, gen):
    """A timm ViT patched by lfi, every layer's maps captured, a loss on logits and maps."""
    import lfi
    import lfi.integrations.timm as lfi_timm

    model, images = timm_model("vit")
    lfi_timm.patch(model, backend=backend)

    def step():
        with lfi.capture_attention(model, grad=True) as maps:
            logits = model(images)
        (logits.sum() + sum(m.float().sum() for m in maps.values())).backward()
    return step


def _interaction_vit_loss(backend, gen):
    """The training layer's step: InteractionViT with its query maps, InteractionLoss against a
    teacher's maps, plus the classification loss."""
    from lfi.models import InteractionViT
    from lfi.nn.interaction_loss import InteractionLoss
    from lfi.teachers.base import TeacherMaps

    torch.manual_seed(0)
    student = InteractionViT("vit_tiny_patch16_224", num_queries=3, backend=backend, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, num_classes=4).to(DEVICE)
    images, labels = randn((2, 3, 32, 32), gen), torch.tensor([0, 3], device=DEVICE)
    teacher = TeacherMaps(torch.softmax(randn((2, 3, 16), gen), -1).view(2, 3, 4, 4))
    interaction_loss = InteractionLoss(backend=backend)

    def step():
        logits, maps = student(images, return_maps=True)
        (torch.nn.functional.cross_entropy(logits, labels) + interaction_loss(maps, teacher)).backward()
    return step


CALLS = {
    "attention": _attention(),
    "attention_maps": _attention(need_weights=True),
    "attention_causal_bool_mask_maps": _attention(is_causal=True, need_weights=True,
                                                  attn_mask=lambda g: bool_mask((B, 1, M, N), g)),
    "attention_float_mask_grad": _attention(
        attn_mask=lambda g: float_mask((B, H, M, N), g, neg_inf_frac=0.2).requires_grad_()),
    "attention_gqa_rows_avg": _attention(Hkv=1, need_weights=True, weights_rows=(1, 4), average_attn_weights=True),
    "attention_kl": _attention(kl_target=_probs),
    "attention_kl_maps_mask": _attention(kl_target=_probs, need_weights=True,
                                         attn_mask=lambda g: bool_mask((B, 1, 1, N), g)),
    "attention_kl_op_probs": _kl(),
    "attention_kl_op_logits_mask": _kl("logits", key_mask=True),
    "attention_kl_op_log_probs": _kl("log_probs"),
    "attention_kl_qk_probs_mask": _kl_qk(key_mask=True),
    "attention_kl_qk_logits": _kl_qk("logits"),
    "timm_patched_capture": _timm_patched_capture,
    "interaction_vit_loss": _interaction_vit_loss,
}


@pytest.mark.parametrize("call", list(CALLS))
def test_no_host_sync(backend, call, values_unchecked):
    step = CALLS[call](backend, make_gen("host_sync", call, backend))
    step()  # first call (autotuning, compilation, caches) outside the recorder
    with SyncRecorder() as recorder:
        step()
    assert recorder.syncs == [], f"{call} on backend {backend!r} synchronises: {recorder.syncs}"


def test_recorder_sees_a_value_read():
    """The recorder catches the checks these tests guard against (with the values checked, as on the
    CPU, the negative-probability check reads one value back)."""
    gen = make_gen("host_sync_recorder")
    logits, target = randn((B, H, M, N), gen, device="cpu"), make_target((B, 1, M, N), "probs", gen, device="cpu")
    with SyncRecorder() as recorder:
        attention_kl(logits, target, backend="torch")
    assert recorder.syncs == ["aten._local_scalar_dense.default"], recorder.syncs  # bool(t.any()), once


# --------------------------------------------------------------------------------------------------
# A negative target probability: ValueError where checked, else NaN on its row only
# --------------------------------------------------------------------------------------------------

BAD_ROW = (1, 0, 3)  # (b, h, m) of the row whose target gets a negative entry (h = 0: shared by heads)


def _with_negative(target):
    bad = target.clone()
    bad[BAD_ROW][2] = -0.25
    return bad


def _kl_rows(op, backend, target, gen_name, validate=False):
    """Per-row KL (B, H, M) of one op on fixed inputs."""
    gen = make_gen("negative_target", gen_name)
    if op == "attention_kl":
        logits = randn((B, H, M, N), gen)
        return attention_kl(logits, target, reduction="none", validate=validate, backend=backend)
    if op == "attention_kl_qk":
        q, k = randn((B, H, M, D), gen), randn((B, H, N, D), gen)
        return attention_kl_qk(q, k, target, reduction="none", validate=validate, backend=backend)
    q, k, v = make_qkv(B, H, H, M, N, D, gen=gen)
    return interaction_attention(q, k, v, kl_target=target, kl_reduction="none", backend=backend)[1]


OPS = ["attention_kl", "attention_kl_qk", "interaction_attention"]


@pytest.mark.parametrize("op", OPS)
def test_negative_probability_unchecked_gives_nan_row(backend, op, values_unchecked):
    target = _probs(make_gen("negative_target", op, "target"))
    good = _kl_rows(op, backend, target, op)
    bad = _kl_rows(op, backend, _with_negative(target), op)
    b, _, m = BAD_ROW
    assert torch.isnan(bad[b, :, m]).all(), f"{op} ({backend}): the rows with a negative entry gave {bad[b, :, m]}"
    others = torch.ones_like(bad, dtype=torch.bool)
    others[b, :, m] = False
    assert torch.isfinite(good).all()
    assert torch.equal(bad[others], good[others]), f"{op} ({backend}): rows without the negative entry changed"


@pytest.mark.parametrize("op", OPS)
def test_negative_probability_raises_where_checked(op):
    """On the CPU every call checks; with validate=True (the KL ops) every device does."""
    bad = _with_negative(_probs(make_gen("negative_target", op, "target")))
    if op != "interaction_attention":
        with pytest.raises(ValueError, match="(?i)negative"):
            _kl_rows(op, "torch", bad, op, validate=True)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="(?i)negative"):
            _kl_rows(op, "torch", bad, op)
    else:
        assert math.isnan(_kl_rows(op, "torch", bad, op)[BAD_ROW].item())
