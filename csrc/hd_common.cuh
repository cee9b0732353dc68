// What the *_core.cuh headers share: functions compiled for the device and the host (the kernels
// run them on the GPU, tests/csrc/host_emu.cu on the CPU), `#pragma unroll` for the device pass
// only (the host compiler would warn about it), read-only loads and bit casts that work on both,
// and the gathered read of x through an act-order layer's channel order.
#pragma once

#include <vector_types.h>

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
  P v;  // a byte copy: the host compiler's type-based alias analysis must not reorder the emulation's reads
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof v);
  return v;
#endif
}

// A plain load (shared memory on the device; on the host a byte copy, as ldg's).
template <typename P> MINICPM_HD P ld(const P* p) {
#ifdef __CUDA_ARCH__
  return *p;
#else
  P v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof v);
  return v;
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

// PRMT: bytes of the 64-bit (y:x) picked by the low 3 bits of each selector nibble (__byte_perm).
MINICPM_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return r;
#endif
}

// A wgmma shared-memory matrix descriptor without swizzle (K-major core matrices of 8 rows x 16 bytes): the start
// address, the leading byte offset (the next 16 bytes of k) and the stride byte offset (the next 8 rows), each >> 4
// in its 14-bit field; base offset and swizzle mode 0 (the W4A8 and W4A16 warpgroup-MMA kernels' x operand).
MINICPM_HD uint64_t wgmma_desc(uint32_t start, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((start & 0x3FFFF) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}

// Its fields back (the emulations' wgmma read x through them); false for a descriptor with a swizzle or a base offset,
// which these kernels never build.
MINICPM_HD bool wgmma_desc_fields(uint64_t desc, uint32_t& start, uint32_t& lbo, uint32_t& sbo) {
  start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  return (desc >> 62) == 0 && ((desc >> 49) & 7) == 0;
}

// An act-order layer's channel order (QuantLinear.input_perm, int32 [K], 16-byte aligned): weight
// column k multiplies x[perm[k]]. The kernels read x through it where they would read x[k .. k + 7]
// as one 16-byte piece: the 8 indices (two 16-byte loads, shared by every row of x), then one 2-byte
// load per element (x is a few KiB, in L1/L2), packed into the piece the plain load would have given
// (gather8, the quantizer's) or straight into the mma's operand pairs (the tensor-core kernel's own).
MINICPM_HD void load_idx8(const int32_t* perm, int (&idx)[8]) {
  const int4 a = ldg(reinterpret_cast<const int4*>(perm)), b = ldg(reinterpret_cast<const int4*>(perm) + 1);
  idx[0] = a.x, idx[1] = a.y, idx[2] = a.z, idx[3] = a.w;
  idx[4] = b.x, idx[5] = b.y, idx[6] = b.z, idx[7] = b.w;
}

// row[idx[0 .. 7]] of 2-byte elements (fp16 / bf16 bits) as one 16-byte piece, element i in bits
// 16i .. 16i + 15 as a plain load of 8 consecutive elements places it.
MINICPM_HD uint4 gather8(const void* row, const int (&idx)[8]) {
  const unsigned short* r = static_cast<const unsigned short*>(row);
  uint32_t w[4];
MINICPM_UNROLL
  for (int i = 0; i < 4; ++i)
    w[i] = static_cast<uint32_t>(ldg(r + idx[2 * i])) | (static_cast<uint32_t>(ldg(r + idx[2 * i + 1])) << 16);
  uint4 u;
  u.x = w[0], u.y = w[1], u.z = w[2], u.w = w[3];
  return u;
}

}  // namespace minicpm_int4_hd
