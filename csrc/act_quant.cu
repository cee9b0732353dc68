// Per-token (per-row) dynamic int8 activation quantization, one block per row:
//   scale[m] = max|x[m, :]| / 127,  x_q[m, k] = rint(x[m, k] / scale[m]) clamped to [-127, 127]
// (act_quant_core.cuh has the definition and the per-thread code shared with the CPU emulation),
// optionally of x * input_scale ([K], x's dtype), multiplied as x is read, or of x[:, input_perm]
// (an act-order layer's channel order), read through it (a layer with both: the bindings gather first).
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch).
#include <cuda_runtime.h>

#include "act_quant_core.cuh"
#include "launchers.h"

namespace {

using namespace minicpm_int4_aq;

template <typename T, int U, bool S, bool P>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(const T* __restrict__ x, const T* __restrict__ ms,
                                                           const int32_t* __restrict__ perm, int8_t* __restrict__ xq,
                                                           float* __restrict__ scale_out, int K, long ldx, bool vec) {
  const long m = blockIdx.x;
  const T* row = x + m * ldx;
  int8_t* qrow = xq + m * K;
  const int tid = threadIdx.x;
  uint4 cache[U > 0 ? U : 1];
  const AbsMax am = thread_absmax<T, U, S, P>(row, ms, perm, K, tid, vec, cache);
  // block max: NaN-propagating, order-free (a max is exact)
  float v = am.value();
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = (v != v || o != o) ? NAN : fmaxf(v, o);
  }
  __shared__ float warp_max[kThreads / 32];
  __shared__ float row_amax;
  if ((tid & 31) == 0) warp_max[tid >> 5] = v;
  __syncthreads();
  if (tid == 0) {
    float r = warp_max[0];
    for (int w = 1; w < kThreads / 32; ++w) r = (r != r || warp_max[w] != warp_max[w]) ? NAN : fmaxf(r, warp_max[w]);
    row_amax = r;
  }
  __syncthreads();
  float scale, safe;
  row_scale(row_amax, scale, safe);
  if (tid == 0) scale_out[m] = scale;
  thread_quantize<T, U, S, P>(row, ms, perm, qrow, K, tid, vec, scale, safe, cache);
}

template <typename T, bool S, bool P>
void launch_u(const T* x, const T* ms, const int32_t* perm, int8_t* xq, float* scale, int M, int K, long ldx, bool vec,
              cudaStream_t stream) {
  const dim3 grid(M);
  switch (cache_pieces(K, sizeof(T), vec)) {
    case 1: act_quant_kernel<T, 1, S, P><<<grid, kThreads, 0, stream>>>(x, ms, perm, xq, scale, K, ldx, vec); break;
    case 2: act_quant_kernel<T, 2, S, P><<<grid, kThreads, 0, stream>>>(x, ms, perm, xq, scale, K, ldx, vec); break;
    case 4: act_quant_kernel<T, 4, S, P><<<grid, kThreads, 0, stream>>>(x, ms, perm, xq, scale, K, ldx, vec); break;
    case 8: act_quant_kernel<T, 8, S, P><<<grid, kThreads, 0, stream>>>(x, ms, perm, xq, scale, K, ldx, vec); break;
    default: act_quant_kernel<T, 0, S, P><<<grid, kThreads, 0, stream>>>(x, ms, perm, xq, scale, K, ldx, vec); break;
  }
}

template <typename T>
cudaError_t launch(const T* x, const T* ms, const int32_t* perm, int8_t* xq, float* scale, int M, int K, long ldx,
                   cudaStream_t stream) {
  if (perm != nullptr && ms != nullptr) return cudaErrorInvalidValue;  // no such instantiation: x gathered first
  const bool vec = vector_path(x, ldx, K, sizeof(T), ms, perm);
  if (perm != nullptr)
    launch_u<T, false, true>(x, ms, perm, xq, scale, M, K, ldx, vec, stream);
  else if (ms != nullptr)
    launch_u<T, true, false>(x, ms, perm, xq, scale, M, K, ldx, vec, stream);
  else
    launch_u<T, false, false>(x, ms, perm, xq, scale, M, K, ldx, vec, stream);
  return cudaGetLastError();
}

}  // namespace

// Declared in launchers.h (dtype 0 = fp16, 1 = bf16, 2 = fp32). x_q is contiguous [M, K]; M < 2**31 blocks.
extern "C" cudaError_t minicpm_int4_act_quant(const void* x, const void* input_scale, const int32_t* input_perm,
                                              int8_t* xq, float* scale, int M, int K, int64_t ldx, int dtype,
                                              cudaStream_t stream) {
  if (M <= 0 || K <= 0 || ldx < K) return cudaErrorInvalidValue;
  if (dtype == 0)
    return launch<__half>(static_cast<const __half*>(x), static_cast<const __half*>(input_scale), input_perm, xq, scale,
                          M, K, ldx, stream);
  if (dtype == 1)
    return launch<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(input_scale),
                                 input_perm, xq, scale, M, K, ldx, stream);
  if (dtype == 2)
    return launch<float>(static_cast<const float*>(x), static_cast<const float*>(input_scale), input_perm, xq, scale, M,
                         K, ldx, stream);
  return cudaErrorInvalidValue;
}
