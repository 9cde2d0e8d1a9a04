// A small CPU emulator of the CUDA subset used by csrc/cuda/*.cu, so that the kernels' logic
// (indexing, shared-memory tiles, barriers, warp shuffles, masking) can be tested on machines
// without a GPU. Compiled only with LFI_CUDA_EMULATE (lfi.backends.cuda._ext.load_emulator()).
//
// Model: blocks run one after another; each CUDA thread of a block is a std::thread;
// __syncthreads() is a block-wide std::barrier; a warp-collective operation (shuffle, fragment
// exchange) writes the lane's values into one of two per-warp exchange buffers, waits on a
// per-warp barrier and reads: the buffers alternate from one collective to the next (a lane can
// only rewrite a buffer after every lane has passed the following collective's barrier, i.e. has
// finished reading it), so one barrier per collective suffices. Slow (OS threads), meant for
// small shapes. Dynamic shared memory is one NaN-filled buffer per block
// (every byte 0xFF: NaN as float32, float16 and bfloat16 alike).
//
// Tensor-core subset (csrc/cuda/tc_common.cuh), modelled per lane so that a kernel's fragment
// layout or synchronisation bug changes its results:
//  * ldmatrix.m8n8.x4[.trans].b16: each lane passes its row address; the warp's 32 addresses are
//    exchanged and each lane assembles its four registers exactly as the PTX ISA specifies
//    (register i: matrix i, row lane/4, columns 2*(lane%4), +1; .trans: the transposed element);
//    a row address not 16-byte aligned is an error;
//  * mma.sync.m16n8k16.row.col.f32.{bf16,f16}: the warp's A (4 x b16x2) and B (2 x b16x2)
//    registers are exchanged and each lane computes its own four accumulators from the matrices
//    rebuilt with the PTX ISA "Matrix Fragments for mma.m16n8k16" layouts (A: a0..a3 = rows g /
//    g+8, columns 2t.. / 2t+8..; B: b0, b1 = rows 2t.. / 2t+8.., column g; C/D: c0, c1 = row g,
//    columns 2t, 2t+1; c2, c3 = row g+8; g = lane/4, t = lane%4);
//  * cp.async (16 bytes, zero-filled past src_bytes) + commit_group / wait_group: the copy is
//    deferred until a wait_group retires its group, and its destination is poisoned (0xFF bytes:
//    NaN) when issued, so reading a tile before waiting for it reads NaN, and waiting for the
//    wrong group reads NaN or the stale tile.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorEmulated = 999;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T, cudaFuncAttribute, int) { return cudaSuccess; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace lfi_emu {

struct Block {
  int threads = 0;
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<float> exchange;  // 2 x 32 floats per warp (alternating)
  std::vector<uint64_t> xwords;  // 2 x kXWords words per lane (alternating): fragment / address exchange
  std::vector<float> shared;
  std::mutex error_mutex;
  std::string error;  // first error detected by the emulator (reported by cudaGetLastError)
};
constexpr int kXWords = 8;

inline Block& block() {
  static Block b;
  return b;
}

inline thread_local dim3 t_thread_idx;
inline thread_local unsigned t_collective = 0;  // this lane's count of warp collectives: buffer parity
inline dim3 g_block_idx, g_block_dim;

inline float* shared_memory() { return block().shared.data(); }

// Records the first error the emulator detects (e.g. a misaligned ldmatrix row address); the
// launch's cudaGetLastError() returns it.
inline void fail(const std::string& msg) {
  Block& b = block();
  std::lock_guard<std::mutex> lock(b.error_mutex);
  if (b.error.empty()) b.error = msg;
}

// Every lane of the calling thread's warp contributes W words; all receives the warp's 32 * W
// words (lane-major). All 32 lanes must call it together (as for a .sync warp instruction).
template <int W>
inline void warp_gather(const uint64_t (&mine)[W], uint64_t (&all)[32 * W]) {
  static_assert(W <= kXWords, "exchange buffer too small");
  Block& b = block();
  const int tid = static_cast<int>(t_thread_idx.x), w = tid / 32, lane = tid % 32;
  const unsigned parity = t_collective++ & 1u;
  uint64_t* x = b.xwords.data() + (static_cast<size_t>(w) * 2 + parity) * 32 * kXWords;
  for (int i = 0; i < W; ++i) x[lane * kXWords + i] = mine[i];
  b.warp_barriers[w]->arrive_and_wait();
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < W; ++i) all[l * W + i] = x[l * kXWords + i];
}

inline int lane_id() { return static_cast<int>(t_thread_idx.x % 32); }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; register i of lane l holds matrix i's (row l/4, columns 2(l%4), 2(l%4)+1), or with
// trans its (rows 2(l%4), 2(l%4)+1, column l/4); the lower-indexed element in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  const uint64_t mine[1] = {reinterpret_cast<uint64_t>(row_addr)};
  uint64_t addr[32];
  warp_gather<1>(mine, addr);
  const int l = lane_id();
  if (mine[0] % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      const int row = trans ? 2 * (l % 4) + k : l / 4;
      const int col = trans ? l / 4 : 2 * (l % 4) + k;
      std::memcpy(&e[k], reinterpret_cast<const uint16_t*>(addr[8 * i + row]) + col, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

template <typename T>
inline float b16_lo(uint32_t w) {
  const uint16_t x = static_cast<uint16_t>(w & 0xffffu);
  return static_cast<float>(T(x, typename T::from_bits_t{}));
}
template <typename T>
inline float b16_hi(uint32_t w) {
  const uint16_t x = static_cast<uint16_t>(w >> 16);
  return static_cast<float>(T(x, typename T::from_bits_t{}));
}

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32: d = A B + c for the warp's 16x16 A, 16x8 B, in
// the PTX ISA fragment layouts (see the header comment); fp32 products and sums.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  const uint64_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  uint64_t all[32 * 6];
  warp_gather<6>(mine, all);
  // The matrices rebuilt from every lane's registers (only the rows / columns this lane's
  // accumulators need are used, but the whole layout is decoded: a layout bug anywhere shows).
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    uint32_t w[6];
    for (int i = 0; i < 6; ++i) w[i] = static_cast<uint32_t>(all[l * 6 + i]);
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[ar[i]][ac[i]] = b16_lo<T>(w[i]);
      A[ar[i]][ac[i] + 1] = b16_hi<T>(w[i]);
    }
    B[2 * t][g] = b16_lo<T>(w[4]);
    B[2 * t + 1][g] = b16_hi<T>(w[4]);
    B[2 * t + 8][g] = b16_lo<T>(w[5]);
    B[2 * t + 9][g] = b16_hi<T>(w[5]);
  }
  const int l = lane_id(), g = l / 4, t = l % 4;
  const int dr[4] = {g, g, g + 8, g + 8}, dc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[dr[i]][k] * B[k][dc[i]];
    d[i] = acc;
  }
}

// cp.async: per CUDA thread, copies issued but not yet committed, and committed groups in order.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};
struct AsyncState {
  std::vector<AsyncCopy> open;
  std::deque<std::vector<AsyncCopy>> groups;
};
inline thread_local AsyncState t_async;

// cp.async.cg.shared.global [dst], [src], bytes, src_bytes: deferred; the destination is
// poisoned now and receives its bytes (zero past src_bytes) when a wait retires the group.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    fail("cp.async: misaligned address");
  std::memset(dst, 0xff, static_cast<size_t>(bytes));
  t_async.open.push_back(AsyncCopy{dst, src, bytes, src_bytes});
}

inline void cp_async_commit() {
  t_async.groups.push_back(std::move(t_async.open));
  t_async.open.clear();
}

// cp.async.wait_group n: all but the n most recently committed groups are complete.
inline void cp_async_wait(int n) {
  while (static_cast<int>(t_async.groups.size()) > n) {
    for (const AsyncCopy& c : t_async.groups.front()) {
      std::memset(c.dst, 0, static_cast<size_t>(c.bytes));
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    }
    t_async.groups.pop_front();
  }
}

inline void syncthreads() { block().block_barrier->arrive_and_wait(); }

inline float shuffle(float v, int src_lane) {
  Block& b = block();
  const int tid = static_cast<int>(t_thread_idx.x), w = tid / 32, lane = tid % 32;
  const unsigned parity = t_collective++ & 1u;
  float* x = b.exchange.data() + (w * 2 + parity) * 32;
  x[lane] = v;
  b.warp_barriers[w]->arrive_and_wait();
  return x[src_lane & 31];
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, int threads, size_t smem_bytes, const Args&... args) {
  Block& b = block();
  b.threads = threads;
  g_block_dim.x = static_cast<unsigned>(threads);
  for (int64_t bid = 0; bid < grid; ++bid) {
    g_block_idx.x = static_cast<unsigned>(bid);
    // NaN-filled: a kernel reading shared memory it never wrote produces NaN in the tests.
    // Sized up to whole 16-byte chunks: the tensor-core kernels address it in 16-byte units.
    b.shared.assign(smem_bytes / sizeof(float) + 4, 0.0f);
    std::memset(b.shared.data(), 0xff, b.shared.size() * sizeof(float));
    b.exchange.assign(static_cast<size_t>((threads + 31) / 32) * 2 * 32, 0.0f);
    b.xwords.assign(static_cast<size_t>((threads + 31) / 32) * 2 * 32 * kXWords, 0);
    b.block_barrier = std::make_unique<std::barrier<>>(threads);
    b.warp_barriers.clear();
    for (int w = 0; w < (threads + 31) / 32; ++w) b.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t]() {
        t_thread_idx.x = static_cast<unsigned>(t);
        t_collective = 0;
        t_async = AsyncState{};
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace lfi_emu

inline cudaError_t cudaGetLastError() {
  ::lfi_emu::Block& b = ::lfi_emu::block();
  std::lock_guard<std::mutex> lock(b.error_mutex);
  return b.error.empty() ? cudaSuccess : cudaErrorEmulated;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  // The message stays valid until the next error is recorded; take a copy and clear it.
  static thread_local std::string msg;
  ::lfi_emu::Block& b = ::lfi_emu::block();
  std::lock_guard<std::mutex> lock(b.error_mutex);
  msg = b.error.empty() ? "emulated CUDA error" : "emulated CUDA error: " + b.error;
  b.error.clear();
  return msg.c_str();
}

#define threadIdx (::lfi_emu::t_thread_idx)
#define blockIdx (::lfi_emu::g_block_idx)
#define blockDim (::lfi_emu::g_block_dim)

inline void __syncthreads() { ::lfi_emu::syncthreads(); }
inline float __shfl_sync(unsigned, float v, int src) { return ::lfi_emu::shuffle(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return ::lfi_emu::shuffle(v, static_cast<int>(::lfi_emu::t_thread_idx.x % 32) ^ mask);
}
