"""Attention-matching KL loss: lfi's fused ops vs the eager way. Time and peak memory.

Run:  pytest benchmarks/test_bench_attention_kl.py --benchmark-only [--benchmark-json=kl.json]
      python benchmarks/summarize.py kl.json       (one table per (op, shape), as for attention)

Two ops, each in {fwd, fwd+bwd} (backward: gradients to the student only):

* ``attention_kl_qk``: loss = KL(teacher || softmax(scale q k^T / T)) with an implicit teacher
  (q_t, k_t) (logits scale_t q_t k_t^T / T), batchmean. ``eager`` materializes both score maps,
  applies ``log_softmax`` (in float32) and ``F.kl_div(..., log_target=True, reduction="batchmean")``;
  lfi never builds an (M, N) map. Shapes: interaction queries (M in {16, 64} text/query tokens over
  N in {197, 1025, 4097} patch tokens, teacher = one map per query, Ht = Htk = 1) and self-attention
  distillation (M = N in {512, 1024, 4096}, teacher q_t/k_t with the student's heads).
* ``attention_kl``: the same loss on dense student logits (B, H, M, N) against a dense teacher map
  (B, 1, M, N) of probabilities; ``eager`` = ``F.kl_div(F.log_softmax(logits.float() / T), target)``.

Implementations: ``eager`` and ``lfi_torch`` everywhere; ``lfi_triton`` and ``lfi_cuda`` on CUDA only
(skipped with the reason elsewhere; the Triton interpreter is never timed). ``--lfi-impls`` filters
them by name, ``--lfi-dtype`` / ``--lfi-device`` / ``--lfi-threads`` / ``--lfi-target-time`` /
``--lfi-max-rounds`` apply as for the attention benchmarks. Shapes: the full set on CUDA and a
reduced set on CPU (B=2, H=4, still with N=4097 and M=N=4096 for the memory comparison);
override with the environment variable ``LFI_BENCH_KL_SHAPES`` = full | cpu | comma list of names.

Each test warms up once, measures the peak extra memory of one step (``lfi.benchmark.measure_peak_memory``:
CUDA max_memory_allocated, or peak RSS on CPU), then times a few rounds with ``benchmark.pedantic``
(on CPU as few as one round unless ``--lfi-min-rounds`` is given). The loss value is recorded too,
so that eager and lfi rows of one shape can be checked to agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from lfi import benchmark as bench

TEMPERATURE = 2.0
IMPL_NAMES = ("eager", "lfi_torch", "lfi_triton", "lfi_cuda")
CUDA_ONLY = ("lfi_triton", "lfi_cuda")


@dataclass(frozen=True)
class KLShape(bench.Shape):
    """An attention benchmark shape whose kind defaults to "cross" (interaction queries); "self":
    self-attention distillation (M == N)."""
    kind: str = "cross"

    @property
    def teacher_heads(self) -> int:
        """Interaction queries: one teacher map per query (CLIP text vs patches); self: per head."""
        return 1 if self.kind == "cross" else self.H


SHAPES_FULL = [
    *(KLShape(f"xq_m{m}_n{n}", 64, 12, m, n) for m in (16, 64) for n in (197, 1025, 4097)),
    *(KLShape(f"self_n{n}", 8, 12, n, n, kind="self") for n in (512, 1024, 4096)),
]
SHAPES_CPU = [
    KLShape("xq_m16_n197", 2, 4, 16, 197),
    KLShape("xq_m64_n1025", 2, 4, 64, 1025),
    KLShape("xq_m64_n4097", 2, 4, 64, 4097),
    KLShape("self_n512", 2, 4, 512, 512, kind="self"),
    KLShape("self_n4096", 2, 4, 4096, 4096, kind="self"),
]


def _device() -> torch.device:
    # benchmarks/conftest.py resolves --lfi-device at configure time; the shape set is chosen at
    # collection with the same default (CUDA when available).
    return bench.default_device()


def _shapes() -> list[KLShape]:
    which = os.environ.get("LFI_BENCH_KL_SHAPES", "auto").strip() or "auto"
    if which == "auto":
        which = "full" if _device().type == "cuda" else "cpu"
    if which == "full":
        return list(SHAPES_FULL)
    if which == "cpu":
        return list(SHAPES_CPU)
    by_name = {s.name: s for s in SHAPES_CPU + SHAPES_FULL} if _device().type == "cpu" else \
        {s.name: s for s in SHAPES_FULL + SHAPES_CPU}
    names = [n.strip() for n in which.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise pytest.UsageError(f"LFI_BENCH_KL_SHAPES: unknown shape(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names]


# --------------------------------------------------------------------------------------------------
# The competing implementations
# --------------------------------------------------------------------------------------------------

def eager_kl_qk(q, k, q_t, k_t, temperature=TEMPERATURE):
    """Materialized: scores in the input dtype, log-softmax and KL in float32."""
    H, Hkv = q.shape[1], k.shape[1]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
    if q_t.shape[1] != k_t.shape[1]:
        k_t = k_t.repeat_interleave(q_t.shape[1] // k_t.shape[1], dim=1)
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    u = (q_t @ k_t.transpose(-2, -1)) * q_t.shape[-1] ** -0.5
    log_p = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(u.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_t.expand_as(log_p), reduction="batchmean", log_target=True)


def lfi_kl_qk(backend):
    def fn(q, k, q_t, k_t, temperature=TEMPERATURE):
        from lfi.ops import attention_kl_qk
        return attention_kl_qk(q, k, (q_t, k_t), temperature=temperature, reduction="batchmean", backend=backend)
    return fn


def eager_kl_dense(logits, target, temperature=TEMPERATURE):
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return F.kl_div(log_p, target.float().expand_as(log_p), reduction="batchmean")


def lfi_kl_dense(backend):
    def fn(logits, target, temperature=TEMPERATURE):
        from lfi.ops import attention_kl
        return attention_kl(logits, target, temperature=temperature, reduction="batchmean", backend=backend)
    return fn


OPS = {
    "attention_kl_qk": {"eager": eager_kl_qk, "lfi_torch": lfi_kl_qk("torch"), "lfi_triton": lfi_kl_qk("triton"),
                        "lfi_cuda": lfi_kl_qk("cuda")},
    "attention_kl": {"eager": eager_kl_dense, "lfi_torch": lfi_kl_dense("torch"),
                     "lfi_triton": lfi_kl_dense("triton"), "lfi_cuda": lfi_kl_dense("cuda")},
}


class KLCase:
    """Inputs of one benchmark and a zero-argument step (forward, or forward + backward)."""

    def __init__(self, op: str, impl: str, shape: KLShape, device, dtype, mode: str, seed: int = 0):
        self.op, self.impl, self.shape, self.device, self.dtype, self.mode = op, impl, shape, device, dtype, mode
        self.fn = OPS[op][impl]
        g = torch.Generator(device="cpu").manual_seed(seed)
        bwd = mode == "fwd+bwd"
        s = shape

        def rand(*size, scale=1.0):
            return (torch.randn(*size, generator=g, dtype=torch.float32) * scale).to(device=device, dtype=dtype)

        if op == "attention_kl_qk":
            self.grad_inputs = [rand(s.B, s.H, s.M, s.D).requires_grad_(bwd),
                                rand(s.B, s.H, s.N, s.D).requires_grad_(bwd)]
            self.other = [rand(s.B, s.teacher_heads, s.M, s.D), rand(s.B, s.teacher_heads, s.N, s.D)]
        else:
            logits = rand(s.B, s.H, s.M, s.N, scale=2.0).requires_grad_(bwd)
            target = torch.softmax(torch.randn(s.B, 1, s.M, s.N, generator=g) * 2.0, -1).to(device=device, dtype=dtype)
            self.grad_inputs, self.other = [logits], [target]

    def step(self):
        if self.mode == "fwd":
            return self.fn(*self.grad_inputs, *self.other)
        for t in self.grad_inputs:
            t.grad = None
        loss = self.fn(*self.grad_inputs, *self.other)
        loss.backward()
        return loss

    def measure_peak(self):
        for t in self.grad_inputs:
            t.grad = None
        return bench.measure_peak_memory(self.step, self.device)

    def release(self):
        for t in self.grad_inputs:
            t.grad = None
        self.grad_inputs, self.other = [], []

    def info(self) -> dict:
        s = self.shape
        return {
            "op": self.op,
            "impl": self.impl,
            "label": self.impl,
            "shape": f"{self.op} {s.name}",  # one summarize.py table per (op, shape)
            "shape_name": s.name,
            "B": s.B, "H": s.H, "Hkv": s.H, "Ht": s.teacher_heads, "M": s.M, "N": s.N, "D": s.D,
            "kind": s.kind,
            "mode": self.mode,
            "maps": False,
            "temperature": TEMPERATURE,
            "dtype": bench.dtype_name(self.dtype),
            "device": str(self.device),
            "device_name": bench.device_name(self.device),
            "torch_threads": torch.get_num_threads(),
            "map_mib": s.map_bytes(torch.float32) / 2**20,  # one float32 (B, H, M, N) map
        }


def _params():
    out = []
    for op in OPS:
        for shape in _shapes():
            for impl in IMPL_NAMES:
                for mode in bench.MODES:
                    out.append(pytest.param(op, shape, impl, mode, id=f"{op}-{shape.name}-{impl}-{mode}"))
    return out


@pytest.mark.parametrize("op,shape,impl,mode", _params())
def test_attention_kl(benchmark, bench_config, run_case, request, op, shape, impl, mode):
    c = bench_config
    if impl not in {i.name for i in c.impls}:
        pytest.skip(f"{impl} not selected by --lfi-impls")
    if impl in CUDA_ONLY and c.device.type != "cuda":
        pytest.skip(f"{impl} is benchmarked on CUDA only (device is {c.device.type})")
    if impl != "eager":
        ok, reason = bench.get_impl(impl).available(c.device, c.dtype)
        if not ok:
            pytest.skip(reason)

    benchmark.group = f"{op} {shape.name} {mode}"
    explicit_min = request.config.getoption("--lfi-min-rounds")
    cuda = c.device.type == "cuda"
    run_case(lambda: KLCase(op, impl, shape, c.device, c.dtype, mode),
             min_rounds=explicit_min if explicit_min is not None else (c.min_rounds if cuda else 1),
             result_info=lambda loss: {"loss": float(loss.detach().float())})
