// cp.async as the kernels use it (device code only, sm_80+: csrc/w4a8_gemm.cu, csrc/w4a8_wgmma.cu, and the
// W4A16 tensor-core kernel's ring variant in csrc/w4a16_gemv.cu).
#pragma once

#include <cuda_runtime.h>

namespace minicpm_int4_cp {

// One 16-byte piece into shared memory: `bytes` of it from src, the rest zero-filled (src-size: nothing is read
// past it). NARROW: as two 8-byte copies, for rows of packed W that are only 8-byte aligned (K % 32 == 16).
template <bool NARROW>
__device__ __forceinline__ void piece(void* smem, const void* src, int bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (NARROW) {
    const int lo = bytes < 8 ? bytes : 8, hi = bytes > 8 ? bytes - 8 : 0;
    const char* src_hi = hi ? static_cast<const char*>(src) + 8 : static_cast<const char*>(src);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(lo) : "memory");
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst + 8), "l"(src_hi), "r"(hi) : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
  }
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// until at most N of this thread's groups are in flight
template <int N>
__device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

}  // namespace minicpm_int4_cp
