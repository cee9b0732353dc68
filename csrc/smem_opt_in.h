// Host side, shared by the launchers whose kernels take more than the 48 KiB of dynamic shared memory a
// launch gets without asking (the W4A8 GEMMs, the W4A16 tensor-core kernel's ring variant).
#pragma once

#include <cuda_runtime.h>

namespace minicpm_int4_launch {

// Raise `kernel`'s dynamic shared memory limit to `bytes` on the current device, once per device: `done` is
// the caller's per-kernel record (a function-local static of the launcher that instantiates the kernel).
inline cudaError_t opt_in_smem(bool (&done)[64], const void* kernel, int bytes) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && done[dev]) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && dev < 64) done[dev] = true;
  return err;
}

}  // namespace minicpm_int4_launch
