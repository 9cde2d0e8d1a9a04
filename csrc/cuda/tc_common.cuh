// Tensor-core primitives of the bf16 / fp16 kernels (sm_80+): ldmatrix, mma.sync m16n8k16 with
// fp32 accumulation, cp.async with commit / wait groups, b16x2 packing. Inline PTX on the device;
// with LFI_CUDA_EMULATE the same calls go to the lane-level model of csrc/emu/cuda_emu.h, which
// rebuilds the warp's matrices from the documented fragment layouts (PTX ISA, "Matrix Fragments
// for mma.m16n8k16"), so a kernel that puts an element in the wrong register computes a wrong
// result under the emulator too.
//
// Fragment layouts used by the kernels (g = lane / 4, t = lane % 4; "x2" = two b16 in one 32-bit
// register, the lower column / row in the low half):
//   A (16x16, row-major):  a0 = A[g][2t..+1]   a1 = A[g+8][2t..+1]   a2 = A[g][2t+8..+9]   a3 = A[g+8][2t+8..+9]
//   B (16x8, "col"):       b0 = B[2t..+1][g]   b1 = B[2t+8..+9][g]
//   C / D (16x8, fp32):    c0 = C[g][2t]  c1 = C[g][2t+1]  c2 = C[g+8][2t]  c3 = C[g+8][2t+1]
// Two adjacent n8 accumulator tiles of P hold exactly an A fragment of P (k16): the scores never
// leave registers between Q K^T and P V.
#pragma once

#include <cstdint>

#include "cuda_common.cuh"

namespace lfi {
namespace tc {

// The b16 storage types: at::BFloat16 / at::Half are c10 types in the emulator, CUDA's otherwise.
template <typename T>
struct B16;
template <>
struct B16<__nv_bfloat16> {
  static constexpr int32_t code = kBF16;
};
template <>
struct B16<__half> {
  static constexpr int32_t code = kF16;
};

// One element as float, the conversion fixed by the type.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

#ifdef LFI_CUDA_EMULATE

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { ::lfi_emu::ldmatrix_x4(r, p, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { ::lfi_emu::ldmatrix_x4(r, p, true); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const float c[4] = {d[0], d[1], d[2], d[3]};
  ::lfi_emu::mma_m16n8k16<T>(d, a, b, c);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  ::lfi_emu::cp_async(dst, src, 16, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::lfi_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { ::lfi_emu::cp_async_wait(N); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a(lo), b(hi);
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}

// ex2.approx.ftz.f32 on the device; the host's polynomial here (relative error < 2e-7).
__device__ __forceinline__ float ex2(float x) { return fast_exp2(x); }
// lg2.approx.ftz.f32 on the device.
__device__ __forceinline__ float lg2(float x) { return std::log2(x); }

#else  // CUDA

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16 bytes global -> shared, bypassing L1; bytes past src_bytes (0 or 16) are zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Base-2 exponential, one MUFU.EX2 (relative error ~2^-22; ex2(-inf) = 0, subnormal results
// flush to 0, which is below the b16 resolution of P anyway).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Base-2 logarithm, one MUFU.LG2 (absolute error ~2^-22 near 1; subnormal inputs flush to 0: -inf).
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

#endif

}  // namespace tc
}  // namespace lfi
