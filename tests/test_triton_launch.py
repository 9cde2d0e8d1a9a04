"""Direct launches of compiled Triton kernels (lfi.backends.triton._launch.TunedKernel), no GPU needed.

A launch whose key was seen before skips Triton's JITFunction.run and calls the compiled kernel's
launcher itself. These tests run the shipped launchers in a subprocess with TRITON_INTERPRET unset
and only what needs a GPU faked (an sm_90 driver; compilation returns a recording kernel per Triton
cache key), and check against JITFunction.run: the same compiled kernel, grid, stream and
arguments for every launch of the attention op (plain, maps with a mask and causal, fused KL,
grouped heads; forward and backward) and both KL ops; a new Triton specialization (a misaligned
tensor) or a launch hook goes through JITFunction.run again. On a GPU, direct launches give
bit-identical results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ["LFI_AUTOTUNE"] = sys.argv[2]
sys.path.insert(0, sys.argv[1])
import torch
from kernel_report import FakeDriver
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

driver.set_active(FakeDriver())
LOG, JIT_RUNS = [], [0]


class RecordingKernel:
    # What the faked compilation returns, one per Triton cache key: records its launches.
    function, packed_metadata = "function", "packed_metadata"

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        LOG.append((self, args))


def compile_recording(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = self.device_caches[device][0][key] = RecordingKernel()
    return kernel


jit_run = JITFunction.run


def counted_run(self, *args, **kwargs):
    JIT_RUNS[0] += 1
    return jit_run(self, *args, **kwargs)


JITFunction._do_compile = compile_recording
JITFunction.run = counted_run

from lfi import _dispatch
usable = _dispatch._unusable_reason
_dispatch._unusable_reason = lambda backend, device: None if backend == "triton" else usable(backend, device)
from lfi.backends.triton._launch import TunedKernel
from lfi.ops import attention_kl, attention_kl_qk, interaction_attention

torch.manual_seed(0)
B, H, M, N, D = 2, 4, 197, 197, 64


def tensor(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype).requires_grad_()


q, k, v, k2, v2 = tensor(B, H, M, D), tensor(B, H, N, D), tensor(B, H, N, D), tensor(B, 2, N, D), tensor(B, 2, N, D)
mask = torch.rand(B, 1, M, N) > 0.1
target = torch.rand(B, H, M, N)
logits = tensor(B, H, M, N, dtype=torch.float16)


def grads(y, *xs):
    ys = y if isinstance(y, tuple) else (y,)
    torch.autograd.grad([t.float().sum() for t in ys], xs, allow_unused=True)


CASES = {
    "plain": lambda: grads(interaction_attention(q, k, v, backend="triton"), q, k, v),
    "maps_mask_causal": lambda: grads(interaction_attention(q, k, v, attn_mask=mask, is_causal=True,
                                                            need_weights=True, backend="triton"), q, k, v),
    "fused_kl": lambda: grads(interaction_attention(q, k, v, kl_target=target, backend="triton"), q, k, v),
    "gqa": lambda: grads(interaction_attention(q, k2, v2, enable_gqa=True, backend="triton"), q, k2, v2),
    "attention_kl": lambda: grads(attention_kl(logits, target, backend="triton"), logits),
    "attention_kl_qk": lambda: grads(attention_kl_qk(q, k, target, backend="triton"), q, k),
}


def normalized(log):
    # Tensors by what a launch depends on (fresh outputs get new addresses); the launch hooks and
    # their metadata (JITFunction.run passes Triton's empty hook chains, direct launches None) dropped.
    def arg(a):
        if isinstance(a, torch.Tensor):
            return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
        return [type(a).__name__, a if isinstance(a, (int, float, str, bool, type(None))) else repr(a)]
    return [[id(kernel), *map(arg, args[:6]), *map(arg, args[9:])] for kernel, args in log]


def run(case):
    LOG.clear()
    JIT_RUNS[0] = 0
    CASES[case]()
    return list(LOG), JIT_RUNS[0]


result = {}
for case in CASES:
    TunedKernel.fast_launch = False
    run(case)  # autotuning (LFI_AUTOTUNE=1) picks its config here
    through_jit, jit_runs = run(case)
    TunedKernel.fast_launch = True
    run(case)
    direct, direct_jit_runs = run(case)
    result[case] = {"launches": len(through_jit), "jit_runs": jit_runs, "direct_jit_runs": direct_jit_runs,
                    "same": normalized(through_jit) == normalized(direct)}

# A misaligned q (2-byte offset): Triton specializes pointers on 16-byte alignment.
aligned_kernels = {id(kernel) for kernel, _ in run("plain")[0]}
q_misaligned = torch.empty(B * H * M * D + 1, dtype=torch.bfloat16)[1:].view(B, H, M, D).copy_(q).requires_grad_()
q_saved, q = q, q_misaligned
log, jit_runs = run("plain")
again, again_jit_runs = run("plain")
result["misaligned"] = {"jit_runs": jit_runs, "again_jit_runs": again_jit_runs,
                        "new_kernels": len({id(kernel) for kernel, _ in log} - aligned_kernels),
                        "same": normalized(log) == normalized(again)}
q = q_saved

# Another M of the same specialization (199 rows: not a multiple of 16, same bucket): a new launch
# key, Triton's cached kernels.
q = tensor(B, H, 199, D)
log, jit_runs = run("plain")
result["other_m"] = {"jit_runs": jit_runs, "launches": len(log),
                     "new_kernels": len({id(kernel) for kernel, _ in log} - aligned_kernels)}
q = q_saved

hook_calls = []
knobs.runtime.launch_enter_hook.add(hook_calls.append)
log, jit_runs = run("plain")
result["hooked"] = {"jit_runs": jit_runs, "launches": len(log)}
print(json.dumps(result))
"""


@pytest.fixture(scope="module", params=["0", "1"], ids=["heuristic", "autotuned"])
def launches(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(BENCHMARKS), request.param], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["plain", "maps_mask_causal", "fused_kl", "gqa", "attention_kl", "attention_kl_qk"])
def test_direct_launch_matches_jit_run(launches, case):
    r = launches[case]
    assert r["launches"] >= 2 and r["jit_runs"] == r["launches"], r  # forward and backward kernels
    assert r["direct_jit_runs"] == 0, r
    assert r["same"], r


def test_new_specialization_goes_through_jit_run(launches):
    r = launches["misaligned"]
    assert r["jit_runs"] > 0 and r["new_kernels"] > 0, r  # Triton compiled another variant
    assert r["again_jit_runs"] == 0 and r["same"], r  # then launched it directly
    r = launches["other_m"]
    assert r["jit_runs"] == r["launches"] and r["new_kernels"] == 0, r


def test_launch_hooks_go_through_jit_run(launches):
    r = launches["hooked"]
    assert r["launches"] > 0 and r["jit_runs"] == r["launches"], r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the compiled kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_direct_launch_on_gpu_is_bit_identical(monkeypatch, dtype):
    from triton.runtime.jit import JITFunction

    from lfi.backends.triton._launch import TunedKernel
    from lfi.ops import interaction_attention

    jit_runs = [0]
    jit_run = JITFunction.run

    def counted_run(self, *args, **kwargs):
        jit_runs[0] += 1
        return jit_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted_run)
    # TF32: exact float32 also launches its operand split directly through JITFunction.run
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 40, generator=gen, device="cuda").to(dtype) for n in (197, 77, 77))
    mask = torch.rand(2, 1, 197, 77, generator=gen, device="cuda") > 0.2
    grad_out = torch.randn(2, 4, 197, 40, generator=gen, device="cuda").to(dtype)
    grad_maps = torch.randn(2, 4, 197, 77, generator=gen, device="cuda").to(dtype)

    def call():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out, maps = interaction_attention(*x, attn_mask=mask, need_weights=True, backend="triton")
        torch.autograd.backward((out, maps), (grad_out, grad_maps))
        return [out, maps, *(t.grad for t in x)]

    monkeypatch.setattr(TunedKernel, "fast_launch", False)
    through_jit = call()
    monkeypatch.setattr(TunedKernel, "fast_launch", True)
    call()  # remembers the launches
    jit_runs[0] = 0
    direct = call()
    assert jit_runs[0] == 0
    for a, b in zip(through_jit, direct):
        assert torch.equal(a, b)
