// W4A16 decode GEMV / skinny GEMM for M = 1..8 rows: y = x @ dequant(W).T (+ bias).
//
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch).
//
// Layout (canonical, minicpm_int4/packing.py):
//   x        [M, K]     fp16 or bf16, row stride ldx (elements), unit stride along K
//   qweight  int32 [N, K/8]  nibble i (bits 4i..4i+3) of word j = q[n, 8j + i], values 0..15
//   scales   [N, K/G]   same dtype as x;  zeros [N, K/G] integer zero points, same dtype
//   bias     [N] or nullptr;  out [M, N] same dtype as x, row stride ldo
// Math: w = (q - z) * s in fp32, rounded once to the activation dtype (the reference's rule),
// multiplied with x in fp32 and accumulated in fp32; one rounding of the result.
//
// One warp per output row n: each lane reads one packed word (8 weights) per step, so a warp reads
// 128 contiguous bytes of the row per step (coalesced); the x values it needs come from L1/L2.
// The MT rows of x share every weight load. A warp-shuffle reduction ends each row.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int MT>
__global__ void w4a16_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight,
                                  const T* __restrict__ scales, const T* __restrict__ zeros,
                                  const T* __restrict__ bias, T* __restrict__ out,
                                  int N, int K, int group_size, long ldx, long ldo) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const int kw_total = K / 8;
  const int groups = K / group_size;
  const int32_t* wrow = qweight + static_cast<long>(n) * kw_total;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;

  for (int kw = lane; kw < kw_total; kw += 32) {
    const uint32_t word = static_cast<uint32_t>(__ldg(wrow + kw));
    const int k0 = kw * 8;
    const int g = k0 / group_size;  // 8 | group_size, so one word lies in one group
    const float s = to_f32(scales[static_cast<long>(n) * groups + g]);
    const float z = to_f32(zeros[static_cast<long>(n) * groups + g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float q = static_cast<float>((word >> (4 * i)) & 0xFu);
      const float w = to_f32(from_f32<T>((q - z) * s));
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m] = fmaf(to_f32(x[m * ldx + k0 + i]), w, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (bias != nullptr) v += to_f32(bias[n]);
      out[m * ldo + n] = from_f32<T>(v);
    }
  }
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const T* scales, const T* zeros, const T* bias, T* out,
                   int M, int N, int K, int group_size, long ldx, long ldo, cudaStream_t stream) {
  dim3 block(32 * kWarpsPerBlock);
  dim3 grid((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
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
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16. Returns cudaErrorInvalidValue for arguments the kernel cannot take.
extern "C" cudaError_t minicpm_int4_w4a16_gemv(const void* x, const int32_t* qweight, const void* scales,
                                               const void* zeros, const void* bias, void* out, int M, int N,
                                               int K, int group_size, long ldx, long ldo, int dtype,
                                               cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 != 0 || group_size <= 0 || group_size % 8 != 0 || K % group_size != 0)
    return cudaErrorInvalidValue;
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
