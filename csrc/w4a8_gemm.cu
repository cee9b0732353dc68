// W4A8 GEMM for prefill sizes: int8 activations (the per-token quantizer's) x int4 weights on int8
// tensor cores (m16n8k32 mma.sync, sm_80 and newer), y = x_scale * sum_g (x_q (q - z)^T)_g * s_g + bias
// with the reference's bits (w4a8_gemm_core.cuh says how). A 128 x 128 output tile per block of 8
// warps (64 x 128 of 4 warps where 128-row blocks would not fill the GPU), K through a 3-stage cp.async
// pipeline of 128-k stages in 90 KiB (59 KiB) of dynamic shared memory;
// rows of packed W only 8-byte aligned (K % 32 == 16, per-channel layers such as the vision MLP's K = 4304)
// are copied 8 bytes at a time.
//
// No torch headers: plain pointers, sizes and a cudaStream_t (bindings.cpp wraps it for torch). The
// warp-level work lives in the header, shared with the CPU emulation the tests run; this file adds the
// copies into shared memory, the pipeline's waits and barriers, and the launch.
#include <cuda_runtime.h>

#include "cp_async.cuh"
#include "launchers.h"
#include "smem_opt_in.h"
#include "w4a8_gemm_core.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "minicpm_int4's CUDA kernels need sm_80 or newer (m16n8k32 int8 mma.sync, cp.async)"
#endif

namespace {

namespace w8 = minicpm_int4_w4a8;
namespace cp = minicpm_int4_cp;

template <int WM, bool NARROW_W>
__device__ __forceinline__ void load_stage(const w8::Params& p, const w8::CopyPlan& plan, uint8_t* stage, int kb) {
  using B = w8::Block<WM>;
#pragma unroll
  for (int i = 0; i < B::kPiecesA + B::kPiecesB; ++i) {
    int dst, bytes;
    const void* src;
    w8::stage_piece<WM>(p, plan, kb, i, dst, src, bytes);
    if (i >= B::kPiecesA && NARROW_W)
      cp::piece<true>(stage + dst, src, bytes);
    else
      cp::piece<false>(stage + dst, src, bytes);
  }
}

template <int WM, int GT, bool MAGIC, bool NARROW_W, typename SZ>
__global__ void __launch_bounds__(w8::Block<WM>::kThreads, 1) w4a8_gemm_kernel(w8::Params p) {
  using B = w8::Block<WM>;
  extern __shared__ __align__(16) uint8_t smem[];
  int bm, bn;
  w8::block_tile<WM>(blockIdx.x, p.M, p.N, bm, bn);
  const int m0 = bm * B::kBM, n0 = bn * w8::kBN;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp / w8::kWarpsN) * w8::kWarpRows, wn = (warp % w8::kWarpsN) * (w8::kBN / w8::kWarpsN);
  const int lanes[1] = {static_cast<int>(threadIdx.x & 31)};
  w8::WarpState<1> st;
  w8::warp_init(p, n0 + wn, lanes, st);
  const w8::CopyPlan plan = w8::copy_plan<WM>(p, m0, n0, threadIdx.x);

  const int stages = (p.K + w8::kBK - 1) / w8::kBK;
#pragma unroll
  for (int s = 0; s < w8::kStages - 1; ++s) {
    if (s < stages) load_stage<WM, NARROW_W>(p, plan, smem + s * B::kStageBytes, s);
    cp::commit();  // one group per stage, empty ones included: the wait below counts them
  }
  for (int kb = 0; kb < stages; ++kb) {
    cp::wait<w8::kStages - 2>();  // stage kb has landed (this thread's copies) ...
    __syncthreads();                   // ... and every thread's; all warps are done with stage kb - 1
    const int next = kb + w8::kStages - 1;
    if (next < stages) load_stage<WM, NARROW_W>(p, plan, smem + (next % w8::kStages) * B::kStageBytes, next);
    cp::commit();
    uint8_t* stage = smem + (kb % w8::kStages) * B::kStageBytes;
    w8::permute_x<WM>(stage, threadIdx.x);  // x's words into ldmatrix order (w4a8_gemm_core.cuh) ...
    __syncthreads();                        // ... all of them, before any warp reads its fragments
    w8::warp_stage<GT, MAGIC, SZ, w8::DeviceMma, 1>(p, stage, stage + B::kStageA, kb, wm, wn, lanes, st);
  }
  w8::warp_store<1>(p, m0 + wm, n0 + wn, lanes, st);
}

// Opt each instantiation in to its dynamic shared memory, once per device.
template <int WM, int GT, bool MAGIC, bool NARROW_W, typename SZ>
cudaError_t opt_in_smem() {
  static bool done[64] = {};
  return minicpm_int4_launch::opt_in_smem(done, reinterpret_cast<const void*>(w4a8_gemm_kernel<WM, GT, MAGIC, NARROW_W, SZ>),
                                          w8::Block<WM>::kSmemBytes);
}

template <int WM, int GT, bool MAGIC, bool NARROW_W, typename SZ>
cudaError_t launch(const w8::Params& p, cudaStream_t stream) {
  using B = w8::Block<WM>;
  const cudaError_t err = opt_in_smem<WM, GT, MAGIC, NARROW_W, SZ>();
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>(w8::blocks(p.M, p.N, WM));
  w4a8_gemm_kernel<WM, GT, MAGIC, NARROW_W, SZ><<<blocks, B::kThreads, B::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// groups of 32 / 64 / 128 (K % 32 == 0 then): placed at compile time; any other group followed at run time
template <int WM, typename SZ>
cudaError_t launch_groups(const w8::Params& p, cudaStream_t stream) {
  switch (w8::static_group_tiles(p.K, p.G)) {
    case 1: return launch<WM, 1, true, false, SZ>(p, stream);
    case 2: return launch<WM, 2, true, false, SZ>(p, stream);
    case 4: return launch<WM, 4, true, false, SZ>(p, stream);
    default: break;
  }
  const bool magic = w8::magic_convert(p.G), narrow = w8::narrow_w(p.K);
  if (magic) return narrow ? launch<WM, 0, true, true, SZ>(p, stream) : launch<WM, 0, true, false, SZ>(p, stream);
  return narrow ? launch<WM, 0, false, true, SZ>(p, stream) : launch<WM, 0, false, false, SZ>(p, stream);
}

template <typename SZ>
cudaError_t launch_sz(const w8::Params& p, int wm, cudaStream_t stream) {
  return wm == 1 ? launch_groups<1, SZ>(p, stream) : launch_groups<2, SZ>(p, stream);
}

// The SMs of the current device, asked once per device.
cudaError_t sm_count(int& sms) {
  static int cached[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && cached[dev]) {
    sms = cached[dev];
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess && dev < 64) cached[dev] = sms;
  return err;
}

}  // namespace

// csrc/w4a8_wgmma.cu
cudaError_t minicpm_int4_w4a8_wgmma_launch(const minicpm_int4_w4a8::Params& p, bool fma, int block_tokens, int sms,
                                           cudaStream_t stream);

extern "C" int minicpm_int4_w4a8_supported(int K, int group_size) { return w8::supported(K, group_size) ? 1 : 0; }

extern "C" cudaError_t minicpm_int4_w4a8_gemm(const int8_t* xq, const float* x_scale, const int32_t* qweight,
                                              const void* scales, const void* zeros, const void* bias, void* out,
                                              int M, int N, int K, int group_size, int64_t ldo, int sz_dtype,
                                              int out_dtype, int block_rows, int kernel, cudaStream_t stream) {
  if (M < 0 || N <= 0 || !w8::supported(K, group_size) || sz_dtype < 0 || sz_dtype > 2 || out_dtype < 0 ||
      out_dtype > 2 || ldo < N || (block_rows != 0 && block_rows != 64 && block_rows != 128) || kernel < 0 ||
      kernel > 3)
    return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(xq) % 16 != 0 || reinterpret_cast<uintptr_t>(qweight) % 16 != 0)
    return cudaErrorMisalignedAddress;
  if (M == 0) return cudaSuccess;
  if (w8::blocks(M, N, 1) > 0x7FFFFFFFL || static_cast<long>(N) * (K / group_size) > 0x7FFFFFFFL)
    return cudaErrorInvalidValue;
  const w8::Params p{xq, x_scale, reinterpret_cast<const uint8_t*>(qweight), scales, zeros, bias, out, M, N, K,
                     group_size, w8::group_tiles_for(K, group_size), K / group_size, 0x0F0F0F0Fu, static_cast<long>(ldo),
                     sz_dtype, out_dtype};
  // the warpgroup-MMA kernel (sm_90a) where it takes the shape and this GPU has it, unless mma.sync is asked for;
  // block_rows are either kernel's tokens a block
  int sms = 0;
  if (kernel >= 2 || (kernel == 0 && minicpm_int4_w4a8_wgmma_supported(K, group_size) &&
                      !minicpm_int4_w4a8_wgmma_disabled() && minicpm_int4_w4a8_wgmma_available() &&
                      !(block_rows == 64 && minicpm_int4_w4a8_wgmma_t64_disabled()))) {
    const cudaError_t err = sm_count(sms);  // its persistent CTAs: one an SM
    if (err != cudaSuccess) return err;
    return minicpm_int4_w4a8_wgmma_launch(p, kernel == 3, block_rows, sms, stream);
  }
  if (block_rows == 0) {
    const cudaError_t err = sm_count(sms);
    if (err != cudaSuccess) return err;
  }
  const int wm = w8::block_warps_m(M, N, sms, block_rows / w8::kWarpRows);
  if (sz_dtype == 0) return launch_sz<__half>(p, wm, stream);
  if (sz_dtype == 1) return launch_sz<__nv_bfloat16>(p, wm, stream);
  return launch_sz<float>(p, wm, stream);
}
