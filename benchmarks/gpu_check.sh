#!/usr/bin/env bash
# GPU check: one command for a machine with a CUDA GPU, where torch, triton, timm, einops, pytest and
# pytest-benchmark are already installed and there is no network. It installs lfi without
# dependencies, runs the Triton backend's tests on the GPU (compiled kernels, heuristic configs so
# each kernel variant compiles once), then the ViT-shape benchmarks side by side with eager and SDPA
# (autotuned; also dQ by atomics), and writes logs and JSON under $OUT (default ./gpu-check-out). Budget: < 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
status=0
step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, keeps going
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device visible to torch" | tee "$OUT/summary.txt"; exit 2; }
: >"$OUT/summary.txt"
step install 300 pip install --no-deps --no-build-isolation -e .
{ nvidia-smi; lfi info; } >"$OUT/device.txt" 2>&1

# Correctness of the compiled kernels against float64 references (tile shapes as the GPU picks them).
LFI_AUTOTUNE=0 step tests 240 python -m pytest -q -x -p no:cacheprovider \
    tests/test_interaction_attention*.py tests/test_fused_kl.py tests/test_sdpa_routing.py \
    -k "triton or routing"  # not the cuda backend: its JIT build with nvcc alone would take minutes

# The NaN/inf contract and higher-order autograd on the compiled kernels.
LFI_AUTOTUNE=0 step numerics 150 python -m pytest -q -p no:cacheprovider \
    tests/test_numerics_contract.py tests/test_autograd_higher.py tests/test_enable_gqa.py -k triton

# Speed and peak memory at ViT shapes, bf16, side by side (pytest-benchmark medians in the JSON).
step bench 300 python -m pytest benchmarks/test_bench_interaction_attention.py --benchmark-only -q \
    -p no:cacheprovider --lfi-dtype bf16 --lfi-shapes vit_b_n197,vit_b_n577,xattn_m16_n197 \
    --lfi-impls eager,sdpa,lfi_auto,lfi_triton --benchmark-json="$OUT/bench.json"
# dQ by float32 atomics inside the dK/dV kernel (LFI_DQ_ATOMIC=1) against the default dQ kernel.
LFI_DQ_ATOMIC=1 step bench_atomic_dq 150 python -m pytest benchmarks/test_bench_interaction_attention.py \
    --benchmark-only -q -p no:cacheprovider --lfi-dtype bf16 --lfi-shapes vit_b_n197,vit_b_n1025 \
    --lfi-impls lfi_triton -k "fwd+bwd" --benchmark-json="$OUT/bench_atomic_dq.json"
# Opt-in (LFI_GPU_CHECK_CUDA_EXT=1, ~4+ minutes of nvcc): the lfi_C extension's tensor-core kernels,
# built for this GPU only, tested and timed next to Triton and SDPA.
if [ "${LFI_GPU_CHECK_CUDA_EXT:-0}" = "1" ]; then
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 step cuda_ext 420 python -m pytest -q -p no:cacheprovider \
        tests/test_cuda_extension.py tests/test_numerics_contract.py -k cuda
    step bench_cuda 150 python -m pytest benchmarks/test_bench_interaction_attention.py --benchmark-only -q \
        -p no:cacheprovider --lfi-dtype bf16 --lfi-shapes vit_b_n197,vit_b_n577 \
        --lfi-impls eager,sdpa,lfi_triton,lfi_cuda --benchmark-json="$OUT/bench_cuda.json"
fi
# (at most 8 files come back: tables from the JSON with python benchmarks/summarize.py FILE)

cat "$OUT/summary.txt"
exit $status
