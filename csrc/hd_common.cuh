// What the *_core.cuh headers share: functions compiled for the device and the host (the kernels
// run them on the GPU, tests/csrc/host_emu.cu on the CPU), `#pragma unroll` for the device pass
// only (the host compiler would warn about it), read-only loads and bit casts that work on both.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MINICPM_HD __host__ __device__ __forceinline__
#else
#define MINICPM_HD inline
#endif
#ifdef __CUDA_ARCH__
#define MINICPM_UNROLL _Pragma("unroll")
#else
#define MINICPM_UNROLL
#endif

namespace minicpm_int4_hd {

// A read-only load (the non-coherent texture path on the GPU).
template <typename P> MINICPM_HD P ldg(const P* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

MINICPM_HD float as_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

}  // namespace minicpm_int4_hd
