// Tile building blocks of the tensor-core kernels (attention_tc.cu, kl.cu's attention_kl_qk), on top of the primitives of tc_common.cuh: staging rows of a (b, head) slice
// into padded shared tiles with cp.async (element copies for a strided source or a partial 16-byte
// chunk, zeros past the last row and past D), the cp.async double-buffer step, the two warp-level
// products (A B^T from two shared tiles; accumulator registers times a shared tile), quad
// reductions over the four lanes that share an accumulator row, and the store of a warp's 16 rows.
// All kernels using them run blocks of kTcThreads = 128 threads (4 warps x 16 rows or keys).
#pragma once

#include <type_traits>

#include "tc_common.cuh"

namespace lfi {
namespace tc {

using ::lfi::cuda_k::kFull;

constexpr int kTcThreads = 128;

// Base pointer of t at (b, head) and whether its rows can be copied in 16-byte chunks (contiguous
// last dim, rows and base 16-byte aligned).
template <typename T>
struct RowSource {
  const T* base;
  int64_t rs, es;  // row and element strides
  bool vec;
};

template <typename T>
__device__ __forceinline__ RowSource<T> row_source(const Strided& t, int64_t b, int64_t head) {
  RowSource<T> r;
  r.base = static_cast<const T*>(t.ptr) + b * t.s[0] + head * t.s[1];
  r.rs = t.s[2];
  r.es = t.s[3];
  r.vec = t.s[3] == 1 && t.s[2] % 8 == 0 && reinterpret_cast<uintptr_t>(r.base) % 16 == 0;
  return r;
}

// Staging grid: CHP 16-byte chunk columns per row (a power of two >= DP / 8), so that each
// thread keeps one column and walks rows threadIdx.x / CHP + k * (kTcThreads / CHP).
template <int DP>
constexpr int staging_columns() { return DP / 8 <= 4 ? 4 : (DP / 8 <= 8 ? 8 : 16); }

// Stages rows [row0, row0 + ROWS) x dims [0, DP) of `src` into dst (row stride LD): cp.async for
// whole in-range 16-byte chunks, element copies for a partial chunk (D % 8 != 0) or a strided
// source, zeros past `limit` rows and past D (the padding must be 0, not garbage: 0 * NaN = NaN).
template <typename T, int ROWS, int DP, int LD>
__device__ __forceinline__ void stage_rows(T* dst, const RowSource<T> src, int64_t row0, int64_t limit, int D) {
  constexpr int CHP = staging_columns<DP>(), RSTEP = kTcThreads / CHP;
  const int d0 = static_cast<int>(threadIdx.x % CHP) * 8;
  if (d0 >= DP) return;
  for (int r = static_cast<int>(threadIdx.x / CHP); r < ROWS; r += RSTEP) {
    T* d = dst + r * LD + d0;
    const int64_t row = row0 + r;
    if (row < limit && d0 < D) {
      const T* s = src.base + row * src.rs;
      if (src.vec && d0 + 8 <= D) {
        cp_async16(d, s + d0, 16);
      } else {
        uint16_t* d16 = reinterpret_cast<uint16_t*>(d);
        const uint16_t* s16 = reinterpret_cast<const uint16_t*>(s);
        for (int e = 0; e < 8; ++e) d16[e] = d0 + e < D ? s16[(d0 + e) * src.es] : uint16_t(0);
      }
    } else {
      uint64_t* d64 = reinterpret_cast<uint64_t*>(d);
      d64[0] = 0;
      d64[1] = 0;
    }
  }
}

// The common case: all ROWS rows in range, a 16-byte aligned contiguous source and D % 8 == 0:
// one cp.async per chunk of dims < D, a 64-bit pointer step per row group. The padding dims
// [D, DP) are zeroed once at the start of the kernel (zero_padding).
template <typename T, int ROWS, int DP, int LD>
__device__ __forceinline__ void stage_rows_full(T* dst, const RowSource<T>& src, int64_t row0, int D) {
  constexpr int CHP = staging_columns<DP>(), RSTEP = kTcThreads / CHP;
  const int d0 = static_cast<int>(threadIdx.x % CHP) * 8, r = static_cast<int>(threadIdx.x / CHP);
  if (d0 >= D) return;
  const T* s = src.base + (row0 + r) * src.rs + d0;
  T* d = dst + r * LD + d0;
  const int64_t step = RSTEP * src.rs;
#pragma unroll
  for (int k = 0; k < ROWS / RSTEP; ++k) {
    cp_async16(d + k * RSTEP * LD, s, 16);
    s += step;
  }
}

// Zeroes the dims [D, DP) (whole chunks past D) of `rows` rows of a tile buffer.
template <typename T, int DP, int LD>
__device__ __forceinline__ void zero_padding(T* dst, int rows, int D) {
  constexpr int CH = DP / 8;
  for (int idx = static_cast<int>(threadIdx.x); idx < rows * CH; idx += kTcThreads) {
    const int r = idx / CH, d0 = (idx - r * CH) * 8;
    if (d0 >= D) {
      uint64_t* d64 = reinterpret_cast<uint64_t*>(dst + r * LD + d0);
      d64[0] = 0;
      d64[1] = 0;
    }
  }
}

// Stages one tile: stage_rows_full when FULL (all rows in range, 16-byte aligned contiguous
// source, D % 8 == 0), else stage_rows. A constant `full` at an inlined call site leaves one branch.
template <typename T, int ROWS, int DP, int LD>
__device__ __forceinline__ void stage_tile(T* dst, const RowSource<T>& src, int64_t row0, int64_t limit, int D,
                                           bool full) {
  if (full) stage_rows_full<T, ROWS, DP, LD>(dst, src, row0, D);
  else stage_rows<T, ROWS, DP, LD>(dst, src, row0, limit, D);
}

// Stages key tile `tile` (rows 64 tile ..) of K and, when with_v, V into buffer tile & 1 of the
// double buffers Ks / Vs (64 x LD each), and commits the group. (A flag, not a null Vs: the
// compiler cannot prove a shared-memory pointer non-null, and the test cost the fast loops a
// 64-bit compare and a branch per tile.)
template <typename T, int DP, int LD>
__device__ __forceinline__ void stage_kv(T* Ks, T* Vs, const RowSource<T>& ksrc, const RowSource<T>& vsrc,
                                         int64_t tile, bool full, bool with_v, int64_t N, int D, int Dv) {
  const int64_t j0 = tile * 64;
  const int off = static_cast<int>(tile & 1) * 64 * LD;  // 32-bit: no 64-bit multiply per stage
  stage_tile<T, 64, DP, LD>(Ks + off, ksrc, j0, N, D, full);
  if (with_v) stage_tile<T, 64, DP, LD>(Vs + off, vsrc, j0, N, Dv, full);
  cp_async_commit();
}

// One step of a cp.async double buffer: issues tile it + 1 (stage(it + 1) stages and commits it)
// when there is one (always when HAS_NEXT), waits for tile `it` (this thread's copies), then a barrier makes every
// thread's copies visible. The caller ends the step with __syncthreads() before the buffer of
// tile `it` is staged again (two tiles later).
template <bool HAS_NEXT = false, typename Stage>
__device__ __forceinline__ void pipeline_advance(Stage&& stage, int64_t it, int64_t ntiles) {
  if (HAS_NEXT || it + 1 < ntiles) {  // HAS_NEXT: known at compile time (the fast loops)
    stage(it + 1);
    cp_async_wait<1>();  // everything but the tile just issued has landed
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// acc[nt] += A (16 x DP, rows of `a` at row stride LD, the warp's 16 rows) x B^T, B = 8 NT rows of
// `bt` (row stride LD): 16 x 8 NT in NT accumulator tiles. Both operands from shared memory.
template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], const T* a, const T* bt, int lane) {
#pragma unroll
  for (int ks = 0; ks < DP / 16; ++ks) {
    uint32_t af[4];
    ldsm_x4(af, a + (lane & 15) * LD + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t kb[4];
      ldsm_x4(kb, bt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
      mma16816<T>(acc[2 * np], af, b0);
      mma16816<T>(acc[2 * np + 1], af, b1);
    }
  }
}

// out[ot] += X (16 x 8 NT, in accumulator-tile registers x) times B (8 NT rows of `bm`, row stride
// LD): 16 x DP. X is packed to b16 A fragments (two accumulator tiles = one k16 fragment).
template <typename T, int DP, int LD, int NT>
__device__ __forceinline__ void mma_xb(float (&out)[DP / 8][4], const float (&x)[NT][4], const T* bm, int lane) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const uint32_t xa[4] = {pack2<T>(x[2 * kk][0], x[2 * kk][1]), pack2<T>(x[2 * kk][2], x[2 * kk][3]),
                            pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                            pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < DP / 16; ++dp) {
      uint32_t vb[4];
      ldsm_x4_t(vb, bm + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
      const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
      mma16816<T>(out[2 * dp], xa, b0);
      mma16816<T>(out[2 * dp + 1], xa, b1);
    }
  }
}

// Sum / max over the quad of lanes (lane ^ 1, lane ^ 2) that holds one accumulator row.
__device__ __forceinline__ float quad_sum(float v) { return ::lfi::cuda_k::lanes_sum<4>(v); }
__device__ __forceinline__ float quad_max(float v) { return ::lfi::cuda_k::lanes_max<4>(v); }

template <int N>
__device__ __forceinline__ void zero_acc(float (&a)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[n][e] = 0.0f;
}

// Calls f(nt, e, rr, c) for every element e of the warp's NT accumulator tiles: element (nt, e) is
// row g + 8 rr (rr = e / 2) and column c = 8 nt + 2 t + e % 2 of the 16 x 8 NT block.
template <int NT, typename F>
__device__ __forceinline__ void for_each_acc(int lane, F&& f) {
  const int t4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(nt, e, e >> 1, nt * 8 + 2 * t4 + (e & 1));
}

// The maxima of the accumulator rows g and g + 8 over NT tiles, reduced over the row's quad.
template <int NT>
__device__ __forceinline__ void acc_row_max(float (&tmax)[2], const float (&s)[NT][4]) {
  tmax[0] = tmax[1] = neg_inf<float>();
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    tmax[0] = fmaxf(tmax[0], fmaxf(s[nt][0], s[nt][1]));
    tmax[1] = fmaxf(tmax[1], fmaxf(s[nt][2], s[nt][3]));
  }
  tmax[0] = quad_max(tmax[0]);
  tmax[1] = quad_max(tmax[1]);
}

// Multiplies the accumulator rows g (elements 0, 1) and g + 8 (2, 3) by alpha[0] / alpha[1].
template <int OT>
__device__ __forceinline__ void scale_acc_rows(float (&acc)[OT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int ot = 0; ot < OT; ++ot)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[ot][e] *= alpha[e >> 1];
}

// Stores mul * acc (a warp's 16 x 8 OT accumulator tiles: rows first + g and first + g + 8, dims
// 8 ot + 2 t + c) into rows < M, dims < D of the (B, heads, M, D) tensor `out` at (b, head).
template <int OT>
__device__ __forceinline__ void store_acc_rows(const Strided& out, const float (&acc)[OT][4], int64_t b,
                                               int64_t head, int64_t first, int64_t M, int64_t D, float mul,
                                               int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t i = first + g + 8 * rr;
    if (i >= M) continue;
    const int64_t base = b * out.s[0] + head * out.s[1] + i * out.s[2];
#pragma unroll
    for (int ot = 0; ot < OT; ++ot)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = ot * 8 + 2 * t4 + c;
        if (e < D) ::lfi::cuda_k::stf(out.ptr, base + e * out.s[3], out.dtype, acc[ot][2 * rr + c] * mul);
      }
  }
}

// Calls launch(std::integral_constant<int, DP>) with the head dim d padded to DP in {32, 64, 96, 128}
// (the callers route larger dims to the CUDA-core kernels).
template <typename Launch>
const char* with_padded_head_dim(int64_t d, Launch launch) {
  if (d <= 32) return launch(std::integral_constant<int, 32>{});
  if (d <= 64) return launch(std::integral_constant<int, 64>{});
  if (d <= 96) return launch(std::integral_constant<int, 96>{});
  return launch(std::integral_constant<int, 128>{});
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls launch(TypeTag<T>, std::integral_constant<int, DP>) for the b16 type of `dtype` (kBF16 or
// kF16) and the head dim d padded as with_padded_head_dim.
template <typename Launch>
const char* with_b16_and_head_dim(int32_t dtype, int64_t d, Launch launch) {
  return with_padded_head_dim(d, [&](auto dp) {
    return dtype == kBF16 ? launch(TypeTag<__nv_bfloat16>{}, dp) : launch(TypeTag<__half>{}, dp);
  });
}

}  // namespace tc
}  // namespace lfi
