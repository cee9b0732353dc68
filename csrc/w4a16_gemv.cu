// W4A16 decode GEMV / skinny GEMM for M = 1..8 rows: y = x @ dequant(W).T (+ bias).
//
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch).
//
// Layout (canonical, minicpm_int4/packing.py) - no repacking is needed for this kernel:
//   x        [M, K]          fp16 or bf16, row stride ldx (elements), unit stride along K
//   qweight  int32 [N, K/8]  nibble i (bits 4i..4i+3) of word j = q[n, 8j + i], values 0..15
//   scales   [N, K/G]        same dtype as x;  zeros [N, K/G] integer zero points, same dtype
//   bias     [N] or nullptr; out [M, N] same dtype as x, row stride ldo
//
// Math (the reference's rule): w = (q - z) * s rounded once to the activation dtype, products with
// x and their sums in fp32, one rounding of the result.
//
// Work split: one warp per output row n. Fast path (K % 32 == 0, so every row of qweight is 16-byte
// aligned): each lane loads 16 bytes (4 words = 32 weights, all in one group since G >= 32 and
// 32 | G) per step, so a warp streams 512 contiguous bytes of the row per step. int4 -> fp16/bf16
// without int-to-float converts: (word >> 4i) & 0x000F000F | MAGIC puts nibbles i and i+4 into the
// mantissas of a half2 holding (MAGIC_VALUE + q); subtracting (MAGIC_VALUE + z) is exact, and the
// multiply by s rounds once, exactly like the fp32 product rounded to the dtype. The MT rows of x
// share every weight load. A warp-shuffle reduction ends each row. Other K: one word per lane-step.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T> struct Vec;
template <> struct Vec<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kMagicValue = 1024.f;
  __device__ static float to_f32(__half v) { return __half2float(v); }
  __device__ static __half from_f32(float v) { return __float2half_rn(v); }
  __device__ static T2 splat(float v) { return __float2half2_rn(v); }
  __device__ static float2 to_f32x2(T2 v) { return __half22float2(v); }
};
template <> struct Vec<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16x2(128, 128)
  static constexpr float kMagicValue = 128.f;
  __device__ static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
  __device__ static T2 splat(float v) { return __float2bfloat162_rn(v); }
  __device__ static float2 to_f32x2(T2 v) { return __bfloat1622float2(v); }
};

// (a & b) | c in one instruction
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Dequantize one packed word into 8 weights (fp32 values of the dtype-rounded weights), in order.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, typename Vec<T>::T2 zm, typename Vec<T>::T2 s2, float w[8]) {
  using V = Vec<T>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bits = lop3_and_or(word >> (4 * i), 0x000F000Fu, V::kMagic);
    typename V::T2 h = *reinterpret_cast<const typename V::T2*>(&bits);  // (MAGIC + q_i, MAGIC + q_{i+4})
    h = __hmul2(__hsub2(h, zm), s2);                                      // (q - z) exact, * s rounds once
    const float2 f = V::to_f32x2(h);
    w[i] = f.x;
    w[i + 4] = f.y;
  }
}

template <typename T, int MT>
__global__ void w4a16_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                                  const T* __restrict__ scales, const T* __restrict__ zeros,
                                  const T* __restrict__ bias, T* __restrict__ out,
                                  int N, int K, int group_size, long ldx, long ldo) {
  using V = Vec<T>;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const int kw_total = K / 8;
  const int groups = K / group_size;
  const int32_t* wrow = qweight + static_cast<long>(n) * kw_total;
  const T* srow = scales + static_cast<long>(n) * groups;
  const T* zrow = zeros + static_cast<long>(n) * groups;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  int kw_done = 0;
  if ((K & 31) == 0) {
    const uint4* wrow4 = reinterpret_cast<const uint4*>(wrow);
    const int kv_total = K / 32;
    for (int kv = lane; kv < kv_total; kv += 32) {
      const uint4 words = __ldg(wrow4 + kv);
      const int k0 = kv * 32;
      const int g = k0 / group_size;
      const typename V::T2 zm = V::splat(V::kMagicValue + V::to_f32(zrow[g]));  // exact: small integers
      const typename V::T2 s2 = V::splat(V::to_f32(srow[g]));
      const uint32_t wv[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float w[8];
        dequant_word<T>(wv[j], zm, s2, w);
        const int kb = k0 + 8 * j;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const T* xr = x + m * ldx + kb;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m] = fmaf(V::to_f32(xr[i]), w[i], acc[m]);
        }
      }
    }
    kw_done = kw_total;
  }
  for (int kw = kw_done + lane; kw < kw_total; kw += 32) {  // general K: one word per lane-step
    const uint32_t word = static_cast<uint32_t>(__ldg(wrow + kw));
    const int k0 = kw * 8;
    const int g = k0 / group_size;  // 8 | group_size: a word lies in one group
    const typename V::T2 zm = V::splat(V::kMagicValue + V::to_f32(zrow[g]));
    const typename V::T2 s2 = V::splat(V::to_f32(srow[g]));
    float w[8];
    dequant_word<T>(word, zm, s2, w);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const T* xr = x + m * ldx + k0;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[m] = fmaf(V::to_f32(xr[i]), w[i], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (bias != nullptr) v += V::to_f32(bias[n]);
      out[m * ldo + n] = V::from_f32(v);
    }
  }
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const T* scales, const T* zeros, const T* bias, T* out,
                   int M, int N, int K, int group_size, long ldx, long ldo, cudaStream_t stream) {
  const dim3 block(32 * kWarpsPerBlock);
  const dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mt = (M - m0) < 8 ? (M - m0) : 8;
    const T* xs = x + static_cast<long>(m0) * ldx;
    T* os = out + static_cast<long>(m0) * ldo;
    switch (mt) {
#define MINICPM_CASE(MTV) \
      case MTV: w4a16_gemv_kernel<T, MTV><<<grid, block, 0, stream>>>(xs, qweight, scales, zeros, bias, os, N, K, group_size, ldx, ldo); break;
      MINICPM_CASE(1) MINICPM_CASE(2) MINICPM_CASE(3) MINICPM_CASE(4)
      MINICPM_CASE(5) MINICPM_CASE(6) MINICPM_CASE(7) MINICPM_CASE(8)
#undef MINICPM_CASE
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16. Returns cudaErrorInvalidValue for arguments the kernel cannot take
// (the bindings check them first and raise with a message; this is the last line of defence).
extern "C" cudaError_t minicpm_int4_w4a16_gemv(const void* x, const int32_t* qweight, const void* scales,
                                               const void* zeros, const void* bias, void* out, int M, int N,
                                               int K, int group_size, long ldx, long ldo, int dtype,
                                               cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 != 0 || group_size <= 0 || group_size % 8 != 0 || K % group_size != 0)
    return cudaErrorInvalidValue;
  if ((K % 32 == 0) && (group_size % 32 != 0)) return cudaErrorInvalidValue;  // 32-weight vectors span one group
  if ((reinterpret_cast<uintptr_t>(qweight) & 15) != 0) return cudaErrorMisalignedAddress;
  if (dtype == 0)
    return launch<__half>(static_cast<const __half*>(x), qweight, static_cast<const __half*>(scales),
                          static_cast<const __half*>(zeros), static_cast<const __half*>(bias),
                          static_cast<__half*>(out), M, N, K, group_size, ldx, ldo, stream);
  if (dtype == 1)
    return launch<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), qweight,
                                 static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros),
                                 static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), M, N, K,
                                 group_size, ldx, ldo, stream);
  return cudaErrorInvalidValue;
}
