// The warpgroup-MMA kernels' synchronization, device code only (csrc/w4a8_wgmma.cu, csrc/w4a16_wgmma.cu: each one's
// DeviceWg adds its own register fences): a buffer's address in the shared window the descriptors take,
// wgmma.fence before a run of wgmma that reads registers written since, commit of the issued wgmma as one group, and
// the wait until at most N groups are pending.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace minicpm_int4_wgmma {

struct WgSync {
  __device__ __forceinline__ uint32_t smem_addr(const uint8_t* q) const {
    return static_cast<uint32_t>(__cvta_generic_to_shared(q));
  }
  __device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
  __device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
  template <int N>
  __device__ __forceinline__ void wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
  }
};

}  // namespace minicpm_int4_wgmma
