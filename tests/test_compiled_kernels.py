"""Every Triton kernel of lfi compiled for Hopper (sm_90), no GPU needed.

The CPU interpreter that runs the rest of this suite cannot catch compiled-mode problems (a dot too
small for the tensor cores, register spills, shared memory over the limit, code that only fails to
compile). This module runs ``benchmarks/kernel_report.py --ci`` once, in a subprocess with
TRITON_INTERPRET unset (so the interpreter setting of this session is untouched): the shipped
launchers are called for bf16/fp16 at D = 64 and 128 with every feature (masks, causal, GQA, fused
KL, maps) and the KL ops; each launch's representative config (the LFI_AUTOTUNE=0 default when the
launchers have one, else the first config autotuning can pick) is compiled for sm_90 and its ptxas
log and SASS are checked. A deliberately spilling fp32 probe kernel (not a candidate) proves the
spill and tensor-core detection work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.py"
ATTENTION_STAGES = {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"}
KL_STAGES = {"kl_fwd", "kl_bwd", "kl_qk_fwd", "kl_qk_bwd_dq", "kl_qk_bwd_dk"}


def _toolchain_missing() -> str | None:
    """Why Triton's NVIDIA toolchain is unusable here, or None."""
    try:
        import triton.backends.nvidia as nvidia
        from triton.backends.nvidia.compiler import get_ptxas
        tools = [Path(get_ptxas(90).path), Path(nvidia.__file__).parent / "bin" / "cuobjdump"]
    except Exception as exc:  # noqa: BLE001
        return f"Triton's NVIDIA backend or ptxas is not available ({exc})"
    missing = [str(t) for t in tools if not t.exists()]
    return f"Triton's NVIDIA tools are missing: {', '.join(missing)}" if missing else None


pytestmark = pytest.mark.skipif(_toolchain_missing() is not None, reason=str(_toolchain_missing()))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """The report's records for the CI set (one subprocess per test session)."""
    out = tmp_path_factory.mktemp("compiled_kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPORT), "--ci", "--json", str(out / "ci.json"),
                           "--md", str(out / "ci.md")], env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.time() - t0
    print(f"\nkernel_report.py --ci: {elapsed:.0f} s; {proc.stderr.strip().splitlines()[-1:] or ''}")
    assert proc.returncode == 0, f"kernel_report.py --ci failed:\n{proc.stderr[-6000:]}"
    return json.loads((out / "ci.json").read_text())


def _where(r) -> str:
    return f"{r['stage']} {r['kernel']} [{r['case']}] {r['config']} {r['target']}"


def _checked(records):
    return [r for r in records if not r.get("probe")]


def test_every_kernel_is_covered(records):
    """Every stage was captured from the launchers, for each dtype and head dim (capture works)."""
    recs = _checked(records)
    for dtype in ("bf16", "fp16"):
        for d in (64, 128):
            stages = {r["stage"] for r in recs if r["op"] == "interaction_attention" and r["dtype"] == dtype
                      and r["head_dim"] == d}
            assert ATTENTION_STAGES <= stages, f"{dtype} D={d}: missing {ATTENTION_STAGES - stages}"
    kl = {r["stage"] for r in recs if r["op"] != "interaction_attention"}
    assert KL_STAGES <= kl, f"missing KL stages {KL_STAGES - kl}"
    for r in recs:
        assert r["target"] == "sm_90" and r["candidate"], _where(r)


def test_every_kernel_compiles(records):
    failed = [f"{_where(r)}: {r['error']}" for r in _checked(records) if r["error"] is not None]
    assert not failed, "kernels that do not compile for sm_90:\n" + "\n".join(failed)


def test_candidates_do_not_spill(records):
    spilled = [f"{_where(r)}: {r['spill_bytes']} B spilled, {r['regs']} registers"
               for r in _checked(records) if r["error"] is None and r["spill_bytes"]]
    assert not spilled, "configs autotuning can pick that spill registers:\n" + "\n".join(spilled)


def test_candidates_fit_shared_memory(records):
    over = [f"{_where(r)}: {r['smem_bytes']} B > {r['smem_limit']} B"
            for r in _checked(records) if r["error"] is None and not r["fits_smem"]]
    assert not over, "configs autotuning can pick that exceed shared memory:\n" + "\n".join(over)


def test_half_precision_tiles_use_tensor_cores(records):
    """bf16/fp16 kernels that hold a tl.dot compile it to HGMMA (wgmma) or HMMA (mma.sync)."""
    scalar = [f"{_where(r)}: {r['dots']} tl.dot, no HGMMA/HMMA in the SASS" for r in _checked(records)
              if r["error"] is None and r["dtype"] in ("bf16", "fp16") and r["dots"] and not r["tensor_cores"]]
    assert not scalar, "half-precision dots without tensor cores:\n" + "\n".join(scalar)


def test_main_loops_are_found(records):
    """The per-score-element figure is measured for every tensor-core kernel (the loop finder works),
    except with one key (N = 1, a constant: the compiler removes the key loops)."""
    missing = [_where(r) for r in _checked(records) if r["error"] is None and r["tensor_cores"]
               and "n1" not in r["features"]
               and not (r["sass_per_score_element"] and r["sass_per_score_element"] > 0 and r["loops"])]
    assert not missing, "no main loop found in:\n" + "\n".join(missing)


def test_exact_dkdv_runs_in_two_launches(records):
    """Exact float32 dK/dV with the fused KL, GQA, causal masking and a bool mask (one kernel for
    both spilled 92 B) is launched twice, dV then dK (the launcher's dkdv_parts): two distinct
    compilations per config, checked above like every other (no spill, shared memory)."""
    recs = [r for r in _checked(records) if r["stage"] == "bwd_dkdv" and r["dtype"] == "fp32" and not r["tf32"]
            and {"kl", "gqa", "causal", "bool_mask"} <= set(r["features"])]
    configs = {r["config"] for r in recs}
    assert configs and len(recs) == 2 * len(configs), [(r["config"], r["compile_key"]) for r in recs]
    assert len({r["compile_key"] for r in recs}) == len(recs)


def test_spill_and_scalar_detection_work(records):
    """The report's own probe (an fp32 "ieee" dot on CUDA cores whose 256 x 128 accumulator needs more
    registers than a thread has, launched, bound and compiled like the kernels above) must be reported
    as spilling, without tensor cores, with an FFMA main loop: the checks above can fail."""
    probes = [r for r in records if r.get("probe")]
    assert probes, "the spill-detection probe is missing from the report"
    for r in probes:
        assert r["error"] is None, f"{_where(r)}: {r['error']}"
        assert r["spill_bytes"] and r["spill_bytes"] > 0, f"{_where(r)}: spill not detected ({r['spill_bytes']})"
        assert r["dots"] and not r["tensor_cores"], f"{_where(r)}: an FMA dot reported as tensor cores"
        assert r["loop_kind"] == "ffma" and r["sass_per_score_element"] > 0, f"{_where(r)}: {r['loop_kind']}"


def test_sweep_with_forced_tiles(tmp_path):
    """``--sweep --filter --tiles`` (how the float32 lists' tiles were chosen, RESULTS.md): the filtered
    call's tiled launch is compiled at each forced tile, recorded as forced and not as a candidate,
    and summarized; a TF32 dQ with the fused KL and a float mask at N = 197 spills at both tiles of
    its former list (RESULTS.md: 128x32 w8 s2 80 B, 64x32 w4 s2 176 B), so the summary counts them,
    and not at the first tile of its list now (128x16 w8 s2)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(REPORT), "--sweep", "fp32", "--filter",
                           "bwd_dq .*D64 nomaps float_mask causal kl vit197$",
                           "--tiles", "128x32x8x2 64x32x4x2 128x16x8x2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert sorted(r["config"] for r in records) == ["128x16 w8 s2", "128x32 w8 s2", "64x32 w4 s2"]
    for r in records:
        assert r["forced"] and not r["candidate"] and r["stage"] == "bwd_dq" and r["tf32"], _where(r)
        assert r["error"] is None and (r["spill_bytes"] > 0) == (r["config"] != "128x16 w8 s2"), _where(r)
    assert "| bwd_dq | fp32/tf32 | 64 | 2 of 3 |" in proc.stdout
