#!/usr/bin/env bash
# GPU check: one command for a machine with a CUDA GPU, where torch, triton, timm, einops, pytest,
# pytest-xdist and pytest-benchmark are already installed and there is no network. It installs lfi
# without dependencies, runs the Triton backend's tests on the GPU (compiled kernels, heuristic
# configs, plus the autotuned first call), then benchmarks at ViT shapes side by side with eager and
# SDPA (autotuned), the whole timm ViT-B/16 patched and unpatched, and dQ by atomics. About 6.5 min on
# an H200 with 16 cores (2026-12-04: tests 192 s, benchmarks ~110 s); the step limits add up to 10.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Files under $OUT (at most 8 come back from the lent machine): summary.txt (step status, device,
# versions, failures, tables), log.txt (every step's full output, appended as it runs, so a run cut
# short keeps what it did), failures.txt (each failing test's traceback, written as it fails),
# profile.md (benchmarks/gpu_profile.py), bench.json, bench_vit.json, bench_atomic_dq.json.
# Each step runs in its own process group, killed whole at its limit (run 2 of 2026-12-04 timed its
# benchmarks while a killed step's xdist workers were still compiling: 1-min load average 5-8).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
: >"$OUT/summary.txt"
: >"$OUT/log.txt"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, appends its output to log.txt
    # CMD runs in its own process group, killed whole at the limit: pytest-xdist workers and
    # compiler processes must not outlive their step and load the machine during the benchmarks.
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "===== $name: $*" >>"$OUT/log.txt"
    setsid "$@" >>"$OUT/log.txt" 2>&1 &
    local pid=$!
    ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null ) &
    local watchdog=$!
    wait "$pid"
    local rc=$?
    kill "$watchdog" 2>/dev/null
    kill -KILL -- "-$pid" 2>/dev/null  # anything of the step still running
    note "$name: rc=$rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    return $rc
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { note "gpu_check: no CUDA device visible to torch"; exit 2; }

# `python -m pip`: a plain `pip` there may belong to another interpreter than the `python` that has torch.
step install 180 python -m pip install --no-deps --no-build-isolation -e .
# An old setuptools installs in legacy develop mode, which ignores package_dir (lfi.kernels lives in
# kernels/): then a regular install, and the source tree kept off sys.path so that it cannot shadow it.
if ! python -c "import lfi.kernels" 2>/dev/null; then
    step install_regular 180 python -m pip install --no-deps --no-build-isolation .
    export PYTHONSAFEPATH=1
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; python -m lfi info; } \
    >>"$OUT/summary.txt" 2>&1
python -c "import lfi.kernels" || { note "gpu_check: lfi.kernels does not import"; exit 3; }

# xdist spreads the Triton compilations over the CPU cores (the tests are compile-bound).
workers=()
python -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) > 16 ? 16 : $(nproc) ))")

# Correctness of the compiled kernels against float64 references: every Triton test of the suite
# (the interaction_attention, attention_kl and attention_kl_qk ops, maps, masks, GQA, KL, the NaN/inf
# contract, higher-order autograd, routing), heuristic configs so each kernel variant compiles once;
# test_cuda_triton_autotuned runs the autotuned first call. Not the cuda backend (its nvcc JIT build
# takes minutes; LFI_GPU_CHECK_CUDA_EXT=1 below).
# Files in order of interest: a run cut short has covered the attention op first. Each failure's
# traceback lands in failures.txt as it happens (tests/conftest.py, LFI_TEST_FAILURE_LOG).
LFI_AUTOTUNE=0 LFI_TEST_FAILURE_LOG="$OUT/failures.txt" step tests ${LFI_GPU_CHECK_TEST_S:-220} python -m pytest -q -p no:cacheprovider \
    "${workers[@]}" -rfE -k "(triton or routing) and not compiled_kernels" --maxfail=60 \
    tests/test_interaction_attention.py tests/test_interaction_attention_maps.py \
    tests/test_interaction_attention_masks.py tests/test_interaction_attention_backends.py \
    tests/test_numerics_contract.py tests/test_library.py tests/test_autograd_higher.py tests/test_fused_kl.py \
    tests/test_enable_gqa.py tests/test_triton_maps_stats.py tests/test_sdpa_routing.py tests \
    -p no:benchmark

# No call reads a device value back (every op, a patched timm ViT, the training step; on CUDA the
# target checks are off by design) and the ops' plain-eager route matches the custom ops bit for bit
# (torch and Triton backends: not the cuda one, whose build takes minutes).
step host_sync 45 python -m pytest -q -p no:cacheprovider -rfE -k "not cuda" \
    tests/test_host_sync.py tests/test_eager_fast_path.py -p no:benchmark

if [ "${LFI_GPU_CHECK_BENCH:-1}" = "1" ]; then  # LFI_GPU_CHECK_BENCH=0: the tests only
# Speed and peak memory at ViT shapes, bf16, side by side (pytest-benchmark medians in the JSON).
# TRITON_PRINT_AUTOTUNING logs each autotuned kernel's timings and choice.
TRITON_PRINT_AUTOTUNING=1 step bench 120 python -m pytest benchmarks/test_bench_interaction_attention.py \
    --benchmark-only -q -p no:cacheprovider --lfi-dtype bf16 --lfi-target-time 0.5 \
    --lfi-shapes vit_b_n197,vit_b_n577,xattn_m16_n197 --lfi-impls eager,sdpa,lfi_auto,lfi_triton \
    --benchmark-json="$OUT/bench.json"
# Device time per kernel against wall time per call (what the host costs), two shapes; then the
# host time of the Triton path on this machine's CPU with the launches faked (as measured on the
# development machine, benchmarks/launcher_overhead.py), to relate the two machines' figures.
# Then lfi_triton with every launch through Triton's JITFunction.run (--direct-launch 0), against the first.
step profile 110 bash -c "python benchmarks/gpu_profile.py --shapes vit_b_n197,xattn_m16_n197 >'$OUT/profile.md' \
    && python benchmarks/launcher_overhead.py --calls 300 >>'$OUT/profile.md' \
    && python benchmarks/gpu_profile.py --shapes vit_b_n197,xattn_m16_n197 --impls lfi_triton --direct-launch 0 \
       >>'$OUT/profile.md' && python benchmarks/launcher_overhead.py --calls 300 --direct-launch 0 >>'$OUT/profile.md'"
# The whole timm ViT-B/16 (B = 32, bf16): patched with lfi vs timm's SDPA and eager paths, maps
# none / CLS row of the last layer / last layer / all layers.
step bench_vit 60 python -m pytest benchmarks/test_bench_vit.py --benchmark-only -q -p no:cacheprovider \
    --lfi-dtype bf16 --lfi-target-time 0.5 --benchmark-json="$OUT/bench_vit.json"
# dQ by float32 atomics inside the dK/dV kernel (LFI_DQ_ATOMIC=1) against the default dQ kernel.
LFI_DQ_ATOMIC=1 step bench_atomic_dq 40 python -m pytest benchmarks/test_bench_interaction_attention.py \
    --benchmark-only -q -p no:cacheprovider --lfi-dtype bf16 --lfi-target-time 0.5 \
    --lfi-shapes vit_b_n197,vit_b_n1025 --lfi-impls lfi_triton -k "fwd+bwd" \
    --benchmark-json="$OUT/bench_atomic_dq.json"
fi
# Opt-in (LFI_GPU_CHECK_CUDA_EXT=1, ~4+ minutes of nvcc): the lfi_C extension's tensor-core kernels,
# built for this GPU only, tested and timed next to Triton and SDPA.
if [ "${LFI_GPU_CHECK_CUDA_EXT:-0}" = "1" ]; then
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 step cuda_ext 420 python -m pytest -q -p no:cacheprovider \
        tests/test_cuda_extension.py tests/test_numerics_contract.py -k cuda
    step bench_cuda 150 python -m pytest benchmarks/test_bench_interaction_attention.py --benchmark-only -q \
        -p no:cacheprovider --lfi-dtype bf16 --lfi-shapes vit_b_n197,vit_b_n577 \
        --lfi-impls eager,sdpa,lfi_triton,lfi_cuda --benchmark-json="$OUT/bench_cuda.json"
fi

{
    echo "----- test failures (short summary)"
    grep -E "^(FAILED|ERROR) " "$OUT/log.txt" | head -60
    [ -s "$OUT/failures.txt" ] && { echo "----- first failures"; head -c 6000 "$OUT/failures.txt"; }
    [ -s "$OUT/profile.md" ] && { echo "----- profile"; cat "$OUT/profile.md"; }
    for f in bench bench_vit bench_atomic_dq; do
        [ -s "$OUT/$f.json" ] && { echo "----- $f"; python benchmarks/summarize.py "$OUT/$f.json"; }
    done
} >>"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
exit $status
