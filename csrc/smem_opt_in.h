// Host side, shared by the launchers whose kernels take more than the 48 KiB of dynamic shared memory a
// launch gets without asking (the W4A8 GEMMs, the W4A16 tensor-core kernel's ring variant and prefill GEMM), and by
// the warpgroup-MMA kernels' launchers (whether this GPU runs their body; their switches).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

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

// 1 where the code loaded for this GPU is `kernel`'s body rather than the trap stub the other archs' builds have
// (an sm_90a-only kernel: its body needs min_regs registers or more, the stub a handful) - read from the function's
// attributes, not from device memory: no copy that would break a CUDA graph being captured when the first call comes
// inside one. Asked once per device: `cached` / `asked` are the caller's per-kernel record.
inline int body_built(int (&cached)[64], bool (&asked)[64], const void* kernel, int min_regs) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev < 64 && asked[dev]) return cached[dev];
  cudaFuncAttributes attr{};
  int built = 0;
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess)
    built = attr.numRegs >= min_regs ? 1 : 0;
  else
    (void)cudaGetLastError();  // no code for this GPU: not available, and no error left behind
  if (dev < 64) cached[dev] = built, asked[dev] = true;
  return built;
}

// A kernel's switch in the environment: "0" -> 0 (turned off), "128" -> 128 (its other block size off), anything
// else or unset -> -1. The caller reads it once per process (a function-local static).
inline int env_switch(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return -1;
  const std::string s(v);
  return s == "0" ? 0 : s == "128" ? 128 : -1;
}

}  // namespace minicpm_int4_launch
