// Emulator build only (LFI_CUDA_EMULATE): a one-warp test kernel of the tensor-core primitives
// (csrc/cuda/tc_common.cuh), registered as torch.ops.lfi_C_emu.tc_selftest, so that the emulator's
// fragment / mma / cp.async model is itself tested (tests/test_cuda_emulator.py): the correct
// variant must reproduce a matmul, and each deliberately wrong variant must not.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../cuda/tc_common.cuh"

namespace lfi {
namespace tc_test {

using namespace ::lfi::tc;

// Variants: 0 correct; 1 A registers a1 / a2 swapped; 2 accumulators stored as if c1 were row
// g + 8; 3 no cp.async wait; 4 waits for the older group only (B still in flight); 5 B loaded
// without .trans; 6 no wait on the fragments of a second tile (stale buffer: the second product
// reads the first tile's B).
enum Variant { kOk = 0, kSwapA = 1, kBadC = 2, kNoWait = 3, kWaitOld = 4, kNoTrans = 5, kStale = 6 };

// C (16 x 16, fp32) = A (16 x 16) B (16 x 16), all row-major and contiguous; with two B tiles
// (B2 not null), C = A B + A B2 with B2 staged into the same shared buffer after the first product.
template <typename T>
__global__ void tc_selftest_kernel(const T* A, const T* B, const T* B2, float* C, int variant) {
  LFI_DYNAMIC_SMEM(smem_f);
  T* As = reinterpret_cast<T*>(smem_f);  // 16 rows of 16, padded to 24 (48 bytes: 16-byte aligned rows)
  T* Bs = As + 16 * 24;
  const int lane = threadIdx.x & 31;
  // One 16-byte chunk (8 elements) per lane and matrix: row lane / 2, half lane % 2.
  const int r = lane >> 1, c8 = (lane & 1) * 8;
  cp_async16(As + r * 24 + c8, A + r * 16 + c8, 16);
  cp_async_commit();
  cp_async16(Bs + r * 24 + c8, B + r * 16 + c8, 16);
  cp_async_commit();
  if (variant == kWaitOld) cp_async_wait<1>();
  else if (variant != kNoWait) cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], bb[4];
  // A: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
  ldsm_x4(a, As + (lane & 15) * 24 + (lane >> 4) * 8);
  if (variant == kSwapA) {
    const uint32_t x = a[1];
    a[1] = a[2];
    a[2] = x;
  }
  float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
  for (int tile = 0; tile < (B2 != nullptr ? 2 : 1); ++tile) {
    if (tile == 1) {
      __syncthreads();  // every lane has read the first B before it is overwritten
      cp_async16(Bs + r * 24 + c8, B2 + r * 16 + c8, 16);
      cp_async_commit();
      if (variant != kStale) cp_async_wait<0>();
      __syncthreads();
    }
    // B row-major (k x n): matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15), transposed.
    const T* brow = Bs + ((lane & 7) + ((lane >> 3) & 1) * 8) * 24 + (lane >> 4) * 8;
    if (variant == kNoTrans) ldsm_x4(bb, brow);
    else ldsm_x4_t(bb, brow);
    const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
    mma16816<T>(acc[0], a, b0);
    mma16816<T>(acc[1], a, b1);
  }
  const int g = lane >> 2, t = lane & 3;
  for (int n = 0; n < 2; ++n) {
    const int col = n * 8 + 2 * t;
    C[g * 16 + col] = acc[n][0];
    if (variant == kBadC) {
      C[(g + 8) * 16 + col + 1] = acc[n][1];
      C[g * 16 + col + 1] = acc[n][3];
    } else {
      C[g * 16 + col + 1] = acc[n][1];
      C[(g + 8) * 16 + col + 1] = acc[n][3];
    }
    C[(g + 8) * 16 + col] = acc[n][2];
  }
}

}  // namespace tc_test
}  // namespace lfi

namespace {

at::Tensor tc_selftest(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& b2,
                       int64_t variant) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 16}),
              "tc_selftest: a and b must be 16 x 16, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.is_contiguous() && b.is_contiguous(),
              "tc_selftest: a and b must be contiguous and of one dtype");
  const bool two = b2.has_value() && b2->defined();
  if (two) TORCH_CHECK(b2->sizes() == b.sizes() && b2->scalar_type() == b.scalar_type() && b2->is_contiguous(),
                       "tc_selftest: b2 must be like b");
  at::Tensor c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const size_t smem = 2 * 16 * 24 * 2;
  const int v = static_cast<int>(variant);
  if (a.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    LFI_LAUNCH(lfi::tc_test::tc_selftest_kernel<T>, 1, 32, smem, nullptr, a.const_data_ptr<T>(),
               b.const_data_ptr<T>(), two ? b2->const_data_ptr<T>() : nullptr, c.data_ptr<float>(), v);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kHalf, "tc_selftest: dtype must be bfloat16 or float16");
    using T = c10::Half;
    LFI_LAUNCH(lfi::tc_test::tc_selftest_kernel<T>, 1, 32, smem, nullptr, a.const_data_ptr<T>(),
               b.const_data_ptr<T>(), two ? b2->const_data_ptr<T>() : nullptr, c.data_ptr<float>(), v);
  }
  const cudaError_t e = cudaGetLastError();
  TORCH_CHECK(e == cudaSuccess, cudaGetErrorString(e));
  return c;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lfi_C_emu, m) {
  m.def("tc_selftest(Tensor a, Tensor b, Tensor? b2, int variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(lfi_C_emu, CPU, m) { m.impl("tc_selftest", &tc_selftest); }
