// W4A16 prefill GEMM on Hopper's warpgroup MMA (sm_90a): y = x @ dequant(W).T (+ bias) for fp16 / bf16 x, W
// dequantized in registers as the wgmma's A operand - the reference's weight bit for bit - and x read by the tensor
// cores from shared memory (w4a16_wgmma_core.cuh says how, and runs on the host in the tests' emulation). A 128 (rows
// of W) x 128 or 256 (tokens) output tile per block of 2 warpgroups, K through a ring of 64-k stages (cp.async, all
// but one in flight), each warpgroup's wgmma on one stage in flight while it dequantizes the next stage's A.
// Persistent CTAs, one an SM. The decode kernels (w4a16_gemv.cu) keep M <= 16; w4a16_gemv.cu's entry point takes
// this kernel for larger M where the GPU runs its sm_90a build (variant 0), or when asked (variant 5).
//
// Built for every arch (one source), but the kernel has a body only where __CUDA_ARCH_FEAT_SM90_ALL is defined
// (nvcc -gencode arch=compute_90a); minicpm_int4_w4a16_wgmma_available asks whether the code loaded for this GPU is
// that body (by its registers), as the W4A8 kernel's does.
// No torch headers: plain pointers, sizes and a cudaStream_t.
#include <cuda_runtime.h>

#include "cp_async.cuh"
#include "launchers.h"
#include "smem_opt_in.h"
#include "w4a16_wgmma_core.cuh"
#include "wgmma_f16.cuh"
#include "wgmma_sync.cuh"

namespace {

namespace wg = minicpm_int4_w4a16_wg;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MINICPM_WGMMA16 1
#else
#define MINICPM_WGMMA16 0
#endif

// Registers the kernel's body needs at least (the stub of other archs: under 16): what
// minicpm_int4_w4a16_wgmma_available tells the two apart by.
constexpr int kBodyMinRegs = 96;

#if MINICPM_WGMMA16  // the device code the kernel's body uses: compiled for sm_90a only

// The warpgroup-wide operations for one thread (the emulation's HostWg does them for all 128 lanes).
struct DeviceWg : minicpm_int4_wgmma::WgSync {
  // the accumulators as the async wgmma left them: no read of them moves above the wait before this
  template <int NA>
  __device__ __forceinline__ void fence_acc(float (*d)[NA]) {
#pragma unroll
    for (int i = 0; i < NA; ++i) asm volatile("" : "+f"(d[0][i])::"memory");
  }
  // a set of A registers as computed here, before the wgmma.fence: their dequantization is register arithmetic the
  // compiler could otherwise sink past the fence into the run of wgmma
  __device__ __forceinline__ void fence_a(uint32_t (*a)[1][4]) {
#pragma unroll
    for (int k = 0; k < 4; ++k)
      asm volatile("" : "+r"(a[k][0][0]), "+r"(a[k][0][1]), "+r"(a[k][0][2]), "+r"(a[k][0][3])::"memory");
  }
  template <typename T, int NA>
  __device__ __forceinline__ void mma(float (*d)[NA], const uint32_t (*a)[4], uint64_t desc, bool first) {
    static_assert(NA == 64 || NA == 128, "m64n128k16 or m64n256k16");
    constexpr bool kHalf = std::is_same<T, __half>::value;
    if constexpr (NA == 64) {
      if constexpr (kHalf) MINICPM_WGMMA_M64N128K16("f16", d, a, desc, first);
      else MINICPM_WGMMA_M64N128K16("bf16", d, a, desc, first);
    } else {
      if constexpr (kHalf) MINICPM_WGMMA_M64N256K16("f16", d, a, desc, first);
      else MINICPM_WGMMA_M64N256K16("bf16", d, a, desc, first);
    }
  }
};

namespace cp = minicpm_int4_cp;

template <typename T, int BM>
__device__ __forceinline__ void load_stage(const wg::Params<T>& p, const wg::CopyPlan& plan, uint8_t* stage, int kb) {
#pragma unroll
  for (int i = 0; i < wg::Tile<BM>::kPiecesX + 1; ++i) {
    int dst, bytes;
    const void* src;
    wg::stage_piece<T, BM>(p, plan, kb, i, dst, src, bytes);
    cp::piece<false>(stage + dst, src, bytes);
  }
}

// Stage s (in buffer buf, tile-local k-block kb; its A in set SET): its 4 wgmma issued; then, once only they are
// pending (stage s - 1's done, by both warpgroups once past the barrier), the stage kAhead on copied into s - 1's
// buffer and stage s + 1 - landed, fenced for the async proxy - dequantized into the other set.
template <typename T, int BM, int GS, int SET>
__device__ __forceinline__ void step(const wg::Params<T>& p, DeviceWg& dev, uint8_t* smem, wg::LoadCursor& lc,
                                     wg::DqCursor& dc, int s, int total, int buf, int kb, int stages, int wgi,
                                     const int (&lanes)[1], wg::WgState<BM, 1, GS>& st) {
  using TT = wg::Tile<BM>;
  const uint32_t addr = dev.smem_addr(smem + buf * TT::kStageBytes);
  dev.fence_a(st.a[SET]);
  dev.fence();
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) dev.mma<T>(st.acc, st.a[SET][kt], wg::x_desc<BM>(addr, kt), kb == 0 && kt == 0);
  dev.commit();
  dev.wait<1>();
  if (s + 1 < total) {
    cp::wait<TT::kAhead - 2>();  // this thread's copies of stage s + 1 landed
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (s + TT::kAhead < total) {
      const int lbuf = buf == 0 ? TT::kStages - 1 : buf - 1;  // (s + kAhead) % kStages, kAhead = kStages - 1
      load_stage<T, BM>(p, lc.plan, smem + lbuf * TT::kStageBytes, lc.kb);
      wg::load_step<T, BM>(p, stages, threadIdx.x, lc);
    }
    cp::commit();  // one group a step, empty ones included: the wait above counts them
    const int nbuf = buf == TT::kStages - 1 ? 0 : buf + 1;
    wg::dequant_stage<T>(smem + nbuf * TT::kStageBytes, p.mask, st, st.a[SET ^ 1]);
    wg::dq_step(p, stages, wgi, lanes, dc, st);
  }
}

#endif  // MINICPM_WGMMA16

template <typename T, int BM, int GS>
__global__ void __launch_bounds__(wg::kThreads, 1) w4a16_wgmma_kernel(wg::Params<T> p) {
#if MINICPM_WGMMA16
  using TT = wg::Tile<BM>;
  static_assert(TT::kAhead == TT::kStages - 1 && TT::kAhead >= 2, "step's buffers and waits");
  extern __shared__ __align__(128) uint8_t smem[];
  const int grid = gridDim.x, cta = blockIdx.x, wgi = threadIdx.x >> 7;
  const int lanes[1] = {static_cast<int>(threadIdx.x & 127)};
  const int stages = p.K / wg::kBK;
  const int tiles = wg::cta_tiles<BM>(p.M, p.N, cta, grid), total = tiles * stages;
  DeviceWg dev;
  wg::LoadCursor lc = wg::load_start<T, BM>(p, cta, grid, threadIdx.x);
#pragma unroll
  for (int s = 0; s < TT::kAhead; ++s) {
    if (s < total) {
      load_stage<T, BM>(p, lc.plan, smem + s * TT::kStageBytes, lc.kb);
      wg::load_step<T, BM>(p, stages, threadIdx.x, lc);
    }
    cp::commit();
  }
  wg::WgState<BM, 1, GS> st;
  wg::DqCursor dc{wg::walk_start<BM>(p.M, cta, grid), 0};
  wg::wg_rows(p, dc.w.bn * wg::kBN + 64 * wgi, 64 * wgi, lanes, st);
  wg::load_sz(p, 0, st);
  cp::wait<TT::kAhead - 1>();  // stage 0 landed
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  wg::dequant_stage<T>(smem, p.mask, st, st.a[0]);
  wg::dq_step(p, stages, wgi, lanes, dc, st);
  int s = 0, buf = 0;  // the stream's stage, and its buffer
  wg::TileWalk w = wg::walk_start<BM>(p.M, cta, grid);
  for (int t = 0; t < tiles; ++t, wg::walk_next(w)) {
    for (int kb = 0; kb < stages; ++kb, ++s) {
      if (s + 1 < total) wg::load_sz(p, dc.kb, st);  // stage s + 1's scales and zero points, used after the wait
      if (s & 1)
        step<T, BM, GS, 1>(p, dev, smem, lc, dc, s, total, buf, kb, stages, wgi, lanes, st);
      else
        step<T, BM, GS, 0>(p, dev, smem, lc, dc, s, total, buf, kb, stages, wgi, lanes, st);
      buf = buf == TT::kStages - 1 ? 0 : buf + 1;
    }
    // the tile's sums: every wgmma done, then out through shared memory (the barrier before: the last tile's
    // tile_store has read the buffer)
    dev.wait<0>();
    dev.fence_acc(st.acc);
    uint8_t* tile = smem + TT::kStages * TT::kStageBytes;
    __syncthreads();
    wg::tile_out(p, w.bn * wg::kBN, 64 * wgi, lanes, st, tile);
    __syncthreads();
    wg::tile_store<T, BM>(p, w.bm * BM, w.bn * wg::kBN, tile, threadIdx.x);
  }
#else
  (void)p;
  __trap();  // never launched: the launcher asks minicpm_int4_w4a16_wgmma_available first
#endif
}

template <typename T, int BM, int GS>
cudaError_t launch(const wg::Params<T>& p, int sms, cudaStream_t stream) {
  using TT = wg::Tile<BM>;
  static bool done[64] = {};
  const cudaError_t err = minicpm_int4_launch::opt_in_smem(
      done, reinterpret_cast<const void*>(w4a16_wgmma_kernel<T, BM, GS>), TT::kSmemBytes);
  if (err != cudaSuccess) return err;
  w4a16_wgmma_kernel<T, BM, GS><<<static_cast<unsigned>(wg::grid_ctas<BM>(p.M, p.N, sms)), wg::kThreads,
                                  TT::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_t(const wg::Params<T>& p, int bm, int sms, cudaStream_t stream) {
  const bool two = p.G == 32;  // two groups a stage
  if (bm == 256) return two ? launch<T, 256, 2>(p, sms, stream) : launch<T, 256, 1>(p, sms, stream);
  return two ? launch<T, 128, 2>(p, sms, stream) : launch<T, 128, 1>(p, sms, stream);
}

// MINICPM_INT4_W4A16_WGMMA, read once per process: "0" turns the kernel off (never the launcher's choice; forcing it
// is refused), "128" its 256-token blocks - the GPU suite's way to measure everything else should it fail on a GPU.
int wgmma_switch() {
  static const int value = minicpm_int4_launch::env_switch("MINICPM_INT4_W4A16_WGMMA");
  return value;
}

}  // namespace

extern "C" int minicpm_int4_w4a16_wgmma_available() {
  static int cached[64];
  static bool asked[64] = {};
  return minicpm_int4_launch::body_built(cached, asked, reinterpret_cast<const void*>(w4a16_wgmma_kernel<__half, 128, 1>), kBodyMinRegs);
}

extern "C" int minicpm_int4_w4a16_wgmma_disabled() { return wgmma_switch() == 0 ? 1 : 0; }

extern "C" int minicpm_int4_w4a16_wgmma_supported(int K, int group_size) { return wg::supported(K, group_size) ? 1 : 0; }

cudaError_t minicpm_int4_w4a16_wg::launch(const void* x, const int32_t* qweight, const void* scales, const void* zeros,
                                          const void* bias, void* out, int M, int N, int K, int group_size, int64_t ldx,
                                          int64_t ldo, int dtype, int block_tokens, int sms, cudaStream_t stream) {
  if (!wg::supported(K, group_size) || M <= 0 || N <= 0 || sms <= 0 || ldx < K || ldx % 8 != 0 || ldo < N ||
      (dtype != 0 && dtype != 1) || (block_tokens != 0 && block_tokens != 128 && block_tokens != 256))
    return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || (reinterpret_cast<uintptr_t>(qweight) & 15) != 0)
    return cudaErrorMisalignedAddress;
  if (block_tokens == 256 && wgmma_switch() == 128) return cudaErrorNotPermitted;
  const int bm = block_tokens != 0 ? block_tokens : wgmma_switch() == 128 ? 128 : wg::block_tokens(M, N, sms);
  const long tiles = bm == 256 ? wg::blocks<256>(M, N) : wg::blocks<128>(M, N);
  if (tiles * (K / wg::kBK) > 0x7FFFFFFFL) return cudaErrorInvalidValue;  // (a CTA's stream of stages: an int)
  if (minicpm_int4_w4a16_wgmma_disabled()) return cudaErrorNotPermitted;
  if (!minicpm_int4_w4a16_wgmma_available()) return cudaErrorNoKernelImageForDevice;
  if (dtype == 0) {
    const wg::Params<__half> p{static_cast<const __half*>(x), reinterpret_cast<const uint8_t*>(qweight),
                               static_cast<const __half*>(scales), static_cast<const __half*>(zeros),
                               static_cast<const __half*>(bias), static_cast<__half*>(out), M, N, K, group_size,
                               K / group_size, wg::group_shift(K, group_size), ldx, ldo, 0x00F0000Fu};
    return launch_t<__half>(p, bm, sms, stream);
  }
  const wg::Params<__nv_bfloat16> p{static_cast<const __nv_bfloat16*>(x), reinterpret_cast<const uint8_t*>(qweight),
                                    static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros),
                                    static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), M, N, K,
                                    group_size, K / group_size, wg::group_shift(K, group_size), ldx, ldo, 0x0000000Fu};
  return launch_t<__nv_bfloat16>(p, bm, sms, stream);
}
