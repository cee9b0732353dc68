// W4A16 decode GEMV / skinny GEMM for M = 1..8 rows of x: y = x @ dequant(W).T (+ bias).
//
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch).
// The per-thread arithmetic lives in w4a16_gemv_core.cuh (shared with the CPU emulation the tests
// run); this file adds the block reduction, the choice of rows per block and the launch.
//
//   bias [N] or nullptr; out [M, N] same dtype as x, row stride ldo. Larger M: launched in slices of
//   8 rows (the extension is meant for decode; the Triton kernels take larger M).
#include <cuda_runtime.h>

#include "w4a16_gemv_core.cuh"

namespace {

using namespace minicpm_int4_gemv;

template <typename T, int MT, int R>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(Params<T> p, const T* __restrict__ bias,
                                                            T* __restrict__ out, long ldo, bool fast) {
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * R;
  float acc[MT][R];
  thread_partials<T, MT, R>(p, n0, tid, fast, acc);

  __shared__ float warp_sums[MT * R][kWarps];
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) warp_sums[m * R + r][warp] = v;
    }
  }
  __syncthreads();
  if (tid < MT * R) {
    const int m = tid / R, r = tid % R, n = n0 + r;
    if (n < p.N) out[m * ldo + n] = finish<T>(warp_sums[tid], bias, n);
  }
}

// SMs of the current device, cached per device (read once; the attribute query is cheap but not free).
int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132;
  if (dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 132;
  if (dev < kMaxDevices) cache[dev] = sms;
  return sms;
}

template <typename T, int MT, int R>
void launch_r(const Params<T>& p, const T* bias, T* out, long ldo, bool fast, cudaStream_t stream) {
  const dim3 grid((p.N + R - 1) / R);
  w4a16_gemv_kernel<T, MT, R><<<grid, kThreads, 0, stream>>>(p, bias, out, ldo, fast);
}

template <typename T, int MT>
void launch_mt(const Params<T>& p, int r, const T* bias, T* out, long ldo, bool fast, cudaStream_t stream) {
  // MT * R <= kMaxRows: the instantiations that can be picked
  if constexpr (MT == 1) {
    if (r == 8) return launch_r<T, 1, 8>(p, bias, out, ldo, fast, stream);
  }
  if constexpr (MT <= 2) {
    if (r == 4) return launch_r<T, MT, 4>(p, bias, out, ldo, fast, stream);
  }
  if constexpr (MT <= 4) {
    if (r == 2) return launch_r<T, MT, 2>(p, bias, out, ldo, fast, stream);
  }
  launch_r<T, MT, 1>(p, bias, out, ldo, fast, stream);
}

template <typename T>
cudaError_t launch(const T* x, const int32_t* qweight, const T* scales, const T* zeros, const T* bias, T* out,
                   int M, int N, int K, int group_size, long ldx, long ldo, cudaStream_t stream) {
  const int chunk_shift = chunk_shift_for(K, group_size);
  const bool fast = chunk_shift >= 0;
  const int sms = sm_count();
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mt = (M - m0) < 8 ? (M - m0) : 8;
    const Params<T> p{x + static_cast<long>(m0) * ldx, qweight, scales, zeros, N, K, group_size, ldx, chunk_shift, 0xFu};
    T* os = out + static_cast<long>(m0) * ldo;
    const int r = rows_per_block(mt, N, sms);
    switch (mt) {
      case 1: launch_mt<T, 1>(p, r, bias, os, ldo, fast, stream); break;
      case 2: launch_mt<T, 2>(p, r, bias, os, ldo, fast, stream); break;
      case 3: launch_mt<T, 3>(p, r, bias, os, ldo, fast, stream); break;
      case 4: launch_mt<T, 4>(p, r, bias, os, ldo, fast, stream); break;
      case 5: launch_mt<T, 5>(p, r, bias, os, ldo, fast, stream); break;
      case 6: launch_mt<T, 6>(p, r, bias, os, ldo, fast, stream); break;
      case 7: launch_mt<T, 7>(p, r, bias, os, ldo, fast, stream); break;
      default: launch_mt<T, 8>(p, r, bias, os, ldo, fast, stream); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16. Returns cudaErrorInvalidValue / cudaErrorMisalignedAddress for
// arguments the kernel cannot take (the bindings check them first and raise with a message; this
// is the last line of defence).
extern "C" cudaError_t minicpm_int4_w4a16_gemv(const void* x, const int32_t* qweight, const void* scales,
                                               const void* zeros, const void* bias, void* out, int M, int N,
                                               int K, int group_size, long ldx, long ldo, int dtype,
                                               cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 != 0 || group_size <= 0 || group_size % 8 != 0 || K % group_size != 0)
    return cudaErrorInvalidValue;
  // x is read 8 values (16 bytes) at a time; qweight's rows 16 bytes at a time when K % 32 == 0
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0) return cudaErrorMisalignedAddress;
  if (K % 32 == 0 && (reinterpret_cast<uintptr_t>(qweight) & 15) != 0) return cudaErrorMisalignedAddress;
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
