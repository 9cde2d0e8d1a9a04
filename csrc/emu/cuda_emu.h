// A small CPU emulator of the CUDA subset used by csrc/cuda/*.cu, so that the kernels' logic
// (indexing, shared-memory tiles, barriers, warp shuffles, masking) can be tested on machines
// without a GPU. Compiled only with LFI_CUDA_EMULATE (lfi.backends.cuda._ext.load_emulator()).
//
// Model: blocks run one after another; each CUDA thread of a block is a std::thread;
// __syncthreads() is a block-wide std::barrier; a warp shuffle writes the lane's value into a
// per-warp exchange buffer, waits on a per-warp barrier, reads, and waits again. Slow (OS
// threads), meant for small shapes. Dynamic shared memory is one NaN-filled buffer per block.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
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
  std::vector<float> exchange;  // 32 floats per warp
  std::vector<float> shared;
};

inline Block& block() {
  static Block b;
  return b;
}

inline thread_local dim3 t_thread_idx;
inline dim3 g_block_idx, g_block_dim;

inline float* shared_memory() { return block().shared.data(); }

inline void syncthreads() { block().block_barrier->arrive_and_wait(); }

inline float shuffle(float v, int src_lane) {
  Block& b = block();
  const int tid = static_cast<int>(t_thread_idx.x), w = tid / 32, lane = tid % 32;
  b.exchange[w * 32 + lane] = v;
  b.warp_barriers[w]->arrive_and_wait();
  const float r = b.exchange[w * 32 + (src_lane & 31)];
  b.warp_barriers[w]->arrive_and_wait();
  return r;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), int64_t grid, int threads, size_t smem_bytes, const Args&... args) {
  Block& b = block();
  b.threads = threads;
  g_block_dim.x = static_cast<unsigned>(threads);
  for (int64_t bid = 0; bid < grid; ++bid) {
    g_block_idx.x = static_cast<unsigned>(bid);
    // NaN-filled: a kernel reading shared memory it never wrote produces NaN in the tests.
    b.shared.assign(smem_bytes / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN());
    b.exchange.assign(threads, 0.0f);
    b.block_barrier = std::make_unique<std::barrier<>>(threads);
    b.warp_barriers.clear();
    for (int w = 0; w < (threads + 31) / 32; ++w) b.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t]() {
        t_thread_idx.x = static_cast<unsigned>(t);
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace lfi_emu

#define threadIdx (::lfi_emu::t_thread_idx)
#define blockIdx (::lfi_emu::g_block_idx)
#define blockDim (::lfi_emu::g_block_dim)

inline void __syncthreads() { ::lfi_emu::syncthreads(); }
inline float __shfl_sync(unsigned, float v, int src) { return ::lfi_emu::shuffle(v, src); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  return ::lfi_emu::shuffle(v, static_cast<int>(::lfi_emu::t_thread_idx.x % 32) ^ mask);
}
