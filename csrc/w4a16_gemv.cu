// W4A16 decode kernels for a few rows of x: y = x @ dequant(W).T (+ bias), two of them:
//   - tensor cores (w4a16_mma_core.cuh): M = 1..16 per launch on m16n8k16 mma.sync, for K % 128 == 0
//     and G a power of two >= 32 (or per channel) - every MiniCPM-V LLM layer;
//   - a CUDA-core GEMV (w4a16_gemv_core.cuh): M = 1..8 per launch, any K % 8 == 0 and G % 8 == 0.
// "auto" takes the tensor-core kernel where it applies. Larger M runs in slices of 16 - but on a GPU that runs
// the sm_90a build, M > 16 goes to the warpgroup-MMA prefill GEMM (csrc/w4a16_wgmma.cu) where it takes the layer
// (variant 0; variant 5 forces it, 6 with a tile a CTA). A layer's input scale (QuantConfig.input_scales)
// is multiplied into x as it is loaded, by instantiations of their own (S = true). The tensor-core
// kernel also reads x through an act-order layer's channel order (input_perm; P = true, a layer
// without an input scale - what GPTQ / compressed-tensors checkpoints give); for the other cases the
// bindings gather x first (the GEMV's instantiations would double its build time for layers that
// are rare: act-order and K % 128 != 0).
//
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch).
// The per-thread / per-warp code lives in the two headers, shared with the CPU emulation the tests
// run; this file adds the block reductions, the choices of rows per block and the launches.
//
//   bias [N] or nullptr; out [M, N] same dtype as x, row stride ldo.
#include <cuda_runtime.h>

#include "cp_async.cuh"
#include "launchers.h"
#include "smem_opt_in.h"
#include "w4a16_gemv_core.cuh"
#include "w4a16_mma_core.cuh"
#include "w4a16_wgmma_core.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "minicpm_int4's CUDA kernels need sm_80 or newer (bf16 and m16n8k16 mma.sync)"
#endif

namespace {

using namespace minicpm_int4_gemv;

template <typename T, int MT, int R, bool S>
__global__ void __launch_bounds__(kThreads) w4a16_gemv_kernel(Params<T> p, const T* __restrict__ bias,
                                                            T* __restrict__ out, long ldo, bool fast) {
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * R;
  float acc[MT][R];
  thread_partials<T, MT, R, S>(p, n0, tid, fast, acc);

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

// The block's sum of its warps' partials (shared memory, warp order) and the stores.
template <typename T, int NT, int NB, int W>
__device__ __forceinline__ void block_store(const float (&acc)[NT][NB][1][4], const minicpm_int4_mma::Params<T>& p,
                                            int n0, const T* __restrict__ bias, T* __restrict__ out, long ldo) {
  namespace mm = minicpm_int4_mma;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kSlots = NT * NB * 4;
  __shared__ float red[kSlots][W][32];  // [output slot][warp][lane]: conflict-free both ways
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(nt * NB + nb) * 4 + e][warp][lane] = acc[nt][nb][0][e];
  __syncthreads();
  for (int o = threadIdx.x; o < kSlots * 32; o += 32 * W) {
    const int slot = o >> 5, ln = o & 31;
    float vals[W];
#pragma unroll
    for (int w = 0; w < W; ++w) vals[w] = red[slot][w][ln];
    int m, n;
    mm::slot_output(n0, NB, slot, ln, m, n);
    mm::store_output<T, W>(vals, bias, out, ldo, p.M, p.N, m, n);
  }
}

template <typename T, int NT, int NB, bool POST, int W, bool S, bool P, int AHEAD>
__global__ void __launch_bounds__(32 * W)
    w4a16_mma_kernel(minicpm_int4_mma::Params<T> p, const T* __restrict__ bias, T* __restrict__ out, long ldo) {
  namespace mm = minicpm_int4_mma;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * 16 * NT;
  const int lanes[1] = {lane};
  float acc[NT][NB][1][4];
  mm::warp_partials<T, NT, NB, POST, W, mm::DeviceMma, 1, S, P, AHEAD>(p, n0, warp, lanes, acc);
  block_store<T, NT, NB, W>(acc, p, n0, bias, out, ldo);
}

// The ring variant's copies (w4a16_mma_core.cuh, warp_partials_ring): cp.async, one thread's own.
struct DeviceCp {
  MINICPM_HD void copy16(void* dst, const void* src, int bytes) {
#ifdef __CUDA_ARCH__
    minicpm_int4_cp::piece<false>(dst, src, bytes);
#else
    (void)dst, (void)src, (void)bytes;
#endif
  }
  MINICPM_HD void commit() {
#ifdef __CUDA_ARCH__
    minicpm_int4_cp::commit();
#endif
  }
  template <int N> MINICPM_HD void wait() {
#ifdef __CUDA_ARCH__
    minicpm_int4_cp::wait<N>();
#endif
  }
};

// Variant 4: the tensor-core kernel with W copied kRingDepth chunks ahead into a ring in shared memory
// (dynamic: W x ring_warp_bytes<NT>, 32 - 64 KiB; scales and zero points as far ahead in registers).
// One block an SM is all it asks for (minBlocks 1): one tile takes 64 - 128 registers (two or three blocks of
// 8 warps an SM anyway), two tiles 128 - 200 (one block, still 48 KiB of W in flight); left to its default,
// ptxas held the two-tile loops at 128 and spilled in them.
template <typename T, int NT, int NB, bool POST, int W>
__global__ void __launch_bounds__(32 * W, 1)
    w4a16_mma_ring_kernel(minicpm_int4_mma::Params<T> p, const T* __restrict__ bias, T* __restrict__ out, long ldo) {
  namespace mm = minicpm_int4_mma;
  extern __shared__ __align__(16) unsigned char ring_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * 16 * NT;
  const int lanes[1] = {lane};
  float acc[NT][NB][1][4];
  DeviceCp cp;
  mm::warp_partials_ring<T, NT, NB, POST, W, mm::DeviceMma, 1>(p, n0, warp, lanes,
                                                              ring_smem + warp * mm::ring_warp_bytes<NT>(), cp, acc);
  block_store<T, NT, NB, W>(acc, p, n0, bias, out, ldo);
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
  const bool s = p.input_scale != nullptr;
  if (s) {
    w4a16_gemv_kernel<T, MT, R, true><<<grid, kThreads, 0, stream>>>(p, bias, out, ldo, fast);
  } else {
    w4a16_gemv_kernel<T, MT, R, false><<<grid, kThreads, 0, stream>>>(p, bias, out, ldo, fast);
  }
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
cudaError_t launch(const T* x, const T* ms, const int32_t* qweight, const T* scales, const T* zeros, const T* bias,
                   T* out, int M, int N, int K, int group_size, long ldx, long ldo, cudaStream_t stream) {
  const int chunk_shift = chunk_shift_for(K, group_size);
  const bool fast = chunk_shift >= 0;
  const int sms = sm_count();
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mt = (M - m0) < 8 ? (M - m0) : 8;
    const Params<T> p{x + static_cast<long>(m0) * ldx, qweight, scales, zeros, N, K, group_size, ldx, chunk_shift, 0xFu, ms};
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

template <typename T, int NT, int NB, int W, bool S, bool P, int AHEAD = 1>
void launch_mma_sp(const minicpm_int4_mma::Params<T>& p, bool post, const T* bias, T* out, long ldo, cudaStream_t stream) {
  const dim3 grid((p.N + 16 * NT - 1) / (16 * NT));
  if (post)
    w4a16_mma_kernel<T, NT, NB, true, W, S, P, AHEAD><<<grid, 32 * W, 0, stream>>>(p, bias, out, ldo);
  else
    w4a16_mma_kernel<T, NT, NB, false, W, S, P, AHEAD><<<grid, 32 * W, 0, stream>>>(p, bias, out, ldo);
}

// The ring variant: its shared memory is past the 48 KiB a launch gets without asking, so the kernel's
// limit is raised once per device.
template <typename T, int NT, int NB, bool POST, int W>
void launch_mma_ring(const minicpm_int4_mma::Params<T>& p, const T* bias, T* out, long ldo, cudaStream_t stream) {
  constexpr int kSmem = W * minicpm_int4_mma::ring_warp_bytes<NT>();
  static bool done[64] = {};
  if (minicpm_int4_launch::opt_in_smem(done, reinterpret_cast<const void*>(w4a16_mma_ring_kernel<T, NT, NB, POST, W>),
                                       kSmem) != cudaSuccess)
    return;  // the launcher's cudaGetLastError reports it
  const dim3 grid((p.N + 16 * NT - 1) / (16 * NT));
  w4a16_mma_ring_kernel<T, NT, NB, POST, W><<<grid, 32 * W, kSmem, stream>>>(p, bias, out, ldo);
}

// mode: 0 = the default (one chunk of W ahead in registers), 1 = two chunks ahead (variant 3), 2 = the ring in
// shared memory (variant 4); 1 and 2 for plain x only (launch_any refuses them with a scale or an order).
template <typename T, int NT, int NB, int W>
void launch_mma_w(const minicpm_int4_mma::Params<T>& p, bool post, int mode, const T* bias, T* out, long ldo,
                  cudaStream_t stream) {
  constexpr int kDeep = minicpm_int4_mma::kAheadDeep;
  if (mode == 1) return launch_mma_sp<T, NT, NB, W, false, false, kDeep>(p, post, bias, out, ldo, stream);
  if (mode == 2) {
    if (post) return launch_mma_ring<T, NT, NB, true, W>(p, bias, out, ldo, stream);
    return launch_mma_ring<T, NT, NB, false, W>(p, bias, out, ldo, stream);
  }
  // scaled or permuted: 16 warps never take two column blocks (mma_warps_for_launch), so no such instantiations
  constexpr bool kLoadsOk = !(NB == 2 && W == minicpm_int4_mma::kWarpsSmallN);
  const bool s = p.input_scale != nullptr, g = p.input_perm != nullptr;
  if constexpr (kLoadsOk) {
    if (g) return launch_mma_sp<T, NT, NB, W, false, true>(p, post, bias, out, ldo, stream);
    if (s) return launch_mma_sp<T, NT, NB, W, true, false>(p, post, bias, out, ldo, stream);
  }
  launch_mma_sp<T, NT, NB, W, false, false>(p, post, bias, out, ldo, stream);
}

// The instantiations: NT = 2 with 8 warps (large N), NT = 1 with 8 or 16 warps.
template <typename T, int NB>
void launch_mma_nb(const minicpm_int4_mma::Params<T>& p, int nt, int warps, bool post, int mode, const T* bias, T* out,
                   long ldo, cudaStream_t stream) {
  if (nt == 2) return launch_mma_w<T, 2, NB, minicpm_int4_mma::kWarps>(p, post, mode, bias, out, ldo, stream);
  if (warps == minicpm_int4_mma::kWarpsSmallN)
    return launch_mma_w<T, 1, NB, minicpm_int4_mma::kWarpsSmallN>(p, post, mode, bias, out, ldo, stream);
  launch_mma_w<T, 1, NB, minicpm_int4_mma::kWarps>(p, post, mode, bias, out, ldo, stream);
}

template <typename T>
cudaError_t launch_mma(const T* x, const T* ms, const int32_t* perm, const int32_t* qweight, const T* scales,
                       const T* zeros, const T* bias, T* out, int M, int N, int K, int group_size, long ldx, long ldo,
                       int mode, cudaStream_t stream) {
  namespace mm = minicpm_int4_mma;
  const bool post = mm::mma_post_scale(K, group_size);
  const int sms = sm_count();
  const int nt = mm::mma_tiles_per_block(N, sms), warps = mm::mma_warps_per_block(N, nt, sms);
  for (int m0 = 0; m0 < M; m0 += mm::kMaxM) {
    const int rows = (M - m0) < mm::kMaxM ? (M - m0) : mm::kMaxM;
    const mm::Params<T> p{x + static_cast<long>(m0) * ldx, qweight, scales, zeros, rows, N, K, group_size, ldx, 0x000F000Fu,
                            mm::group_shift_for(K, group_size), ms, perm};
    T* os = out + static_cast<long>(m0) * ldo;
    const int w = mm::mma_warps_for_launch(warps, rows, ms != nullptr || perm != nullptr);
    if (rows > 8)
      launch_mma_nb<T, 2>(p, nt, w, post, mode, bias, os, ldo, stream);
    else
      launch_mma_nb<T, 1>(p, nt, w, post, mode, bias, os, ldo, stream);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_any(const T* x, const T* ms, const int32_t* perm, const int32_t* qweight, const T* scales,
                       const T* zeros, const T* bias, T* out, int M, int N, int K, int group_size, long ldx, long ldo,
                       int variant, cudaStream_t stream) {
  const bool mma_ok = minicpm_int4_mma::mma_supported(K, group_size);
  if (variant >= 2 && !mma_ok) return cudaErrorInvalidValue;
  const int mode = variant == 3 ? 1 : variant == 4 ? 2 : 0;
  if (mode != 0 && (ms != nullptr || perm != nullptr)) return cudaErrorInvalidValue;  // instantiated for plain x only
  const bool mma = variant >= 2 || (variant == 0 && mma_ok);
  if (perm != nullptr && (!mma || ms != nullptr)) return cudaErrorInvalidValue;  // x gathered first there
  if (mma)
    return launch_mma<T>(x, ms, perm, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo, mode, stream);
  return launch<T>(x, ms, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo, stream);
}

}  // namespace

// Declared in launchers.h (arguments, variants). Returns cudaErrorInvalidValue /
// cudaErrorMisalignedAddress for arguments the kernels cannot take (the bindings check them first
// and raise with a message; this is the last line of defence).
extern "C" cudaError_t minicpm_int4_w4a16_gemv(const void* x, const void* input_scale, const int32_t* input_perm,
                                               const int32_t* qweight, const void* scales, const void* zeros,
                                               const void* bias, void* out, int M, int N, int K, int group_size,
                                               int64_t ldx, int64_t ldo, int dtype, int variant, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0 || K % 8 != 0 || group_size <= 0 || group_size % 8 != 0 || K % group_size != 0 ||
      variant < 0 || variant > 6)
    return cudaErrorInvalidValue;
  if (minicpm_int4_w4a16_takes_wgmma(M, K, group_size, variant)) {  // prefill on Hopper (csrc/w4a16_wgmma.cu)
    if (input_scale != nullptr || input_perm != nullptr) return cudaErrorInvalidValue;  // the caller applies them first
    return minicpm_int4_w4a16_wg::launch(x, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo, dtype, 0,
                                         variant == 6 ? 1 : 0, sm_count(), stream);
  }
  // x, the input scale and the channel order are read 8 values (16 or 32 bytes) at a time; qweight's
  // rows 16 bytes at a time when K % 32 == 0
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || ldx % 8 != 0 || (reinterpret_cast<uintptr_t>(input_scale) & 15) != 0 ||
      (reinterpret_cast<uintptr_t>(input_perm) & 15) != 0)
    return cudaErrorMisalignedAddress;
  if (K % 32 == 0 && (reinterpret_cast<uintptr_t>(qweight) & 15) != 0) return cudaErrorMisalignedAddress;
  if (dtype == 0)
    return launch_any<__half>(static_cast<const __half*>(x), static_cast<const __half*>(input_scale), input_perm, qweight,
                              static_cast<const __half*>(scales), static_cast<const __half*>(zeros),
                              static_cast<const __half*>(bias), static_cast<__half*>(out), M, N, K, group_size, ldx,
                              ldo, variant, stream);
  if (dtype == 1)
    return launch_any<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x),
                                     static_cast<const __nv_bfloat16*>(input_scale), input_perm, qweight,
                                     static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros),
                                     static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), M, N, K,
                                     group_size, ldx, ldo, variant, stream);
  return cudaErrorInvalidValue;
}

extern "C" int minicpm_int4_w4a16_mma_supported(int K, int group_size) {
  return minicpm_int4_mma::mma_supported(K, group_size) ? 1 : 0;
}

extern "C" int minicpm_int4_w4a16_takes_wgmma(int M, int K, int group_size, int variant) {
  if (variant == 5 || variant == 6) return 1;  // forced: the wgmma launcher says why where it cannot run
  return variant == 0 && M > minicpm_int4_mma::kMaxM && minicpm_int4_w4a16_wgmma_supported(K, group_size) &&
                 !minicpm_int4_w4a16_wgmma_disabled() && minicpm_int4_w4a16_wgmma_available()
             ? 1
             : 0;
}

extern "C" int minicpm_int4_w4a16_reads_perm(int K, int group_size, int variant, int has_input_scale) {
  return !has_input_scale && variant != 1 && minicpm_int4_mma::mma_supported(K, group_size) ? 1 : 0;
}
