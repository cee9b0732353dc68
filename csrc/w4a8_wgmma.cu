// W4A8 GEMM on Hopper's warpgroup MMA (sm_90a): int8 activations x int4 weights, wgmma.mma_async
// m64n128k32 s8 (m64n64k32 for 64-token blocks) with W unpacked in registers as the A operand and x read by the
// tensor cores from shared memory, the reference's bits (w4a8_wgmma_core.cuh says how, and runs on the host in the
// tests' emulation). A 128 (rows of W) x 128 (tokens) output tile per block of 2 warpgroups taking turns at the
// tensor cores, K through 5 buffers of 128-k stages (cp.async, 4 in flight, 130 KiB; the output tile leaves through
// 66 KiB more); or 128 x 64 tiles through 8 buffers (block_tokens: where the 128-token tiles would leave much of
// the last wave of SMs idle). Persistent CTAs, one an SM.
//
// Built for every arch (one source), but the kernel has a body only where __CUDA_ARCH_FEAT_SM90_ALL is defined
// (nvcc -gencode arch=compute_90a): the launcher asks whether the code loaded for this GPU is that body (by its
// registers: minicpm_int4_w4a8_wgmma_available) before it takes this kernel, and the mma.sync kernel
// (w4a8_gemm.cu) serves every other GPU and shape.
// No torch headers: plain pointers, sizes and a cudaStream_t.
#include <cuda_runtime.h>

#include "cp_async.cuh"
#include "launchers.h"
#include "smem_opt_in.h"
#include "w4a8_wgmma_core.cuh"
#include "wgmma_s8.cuh"
#include "wgmma_sync.cuh"

namespace {

namespace w8 = minicpm_int4_w4a8;
namespace wg = minicpm_int4_w4a8_wg;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MINICPM_WGMMA 1
#else
#define MINICPM_WGMMA 0
#endif

// Registers the kernel's body needs at least (197 - 255 with nvcc 13.0; the stub of other archs: under 16):
// minicpm_int4_w4a8_wgmma_available tells the two apart by it.
constexpr int kBodyMinRegs = 96;

#if MINICPM_WGMMA  // the device code the kernel's body uses: compiled for sm_90a only (no unused code elsewhere)

// The warpgroup-wide operations for one thread (the emulation's HostWg does them for all 128 lanes).
// Turns (w4a8_wgmma_core.cuh, wg_stage): named barriers 1 (warpgroup 0 waits, 1 arrives) and 2 (1 waits, 0
// arrives), 256 threads each - 128 arriving, 128 waiting; every arrival is matched by one wait before the next
// (strict alternation within a stage; __syncthreads between stages), so no barrier ever counts two phases at once.
struct DeviceWg : minicpm_int4_wgmma::WgSync {
  int wgi;  // this thread's warpgroup: 0 or 1
  __device__ __forceinline__ void take_turn(bool first) {
    if (wgi == 1)
      asm volatile("bar.sync 2, 256;\n" ::: "memory");
    else if (!first)
      asm volatile("bar.sync 1, 256;\n" ::: "memory");
  }
  __device__ __forceinline__ void pass_turn(bool last) {
    if (wgi == 0)
      asm volatile("bar.arrive 2, 256;\n" ::: "memory");
    else if (!last)
      asm volatile("bar.arrive 1, 256;\n" ::: "memory");
  }
  // the accumulators as written by the async wgmma: no read of them moves above the wait before this
  template <int NA>
  __device__ __forceinline__ void fence_acc(int32_t (*d)[NA]) {
#pragma unroll
    for (int i = 0; i < NA; ++i) asm volatile("" : "+r"(d[0][i])::"memory");
  }
  // the A registers of the next NK wgmma as computed here, before the turn barrier: their unpacking is pure register
  // arithmetic, which the compiler otherwise sinks (the group's last k-tile's) past the barrier and the wgmma.fence
  // into the run of wgmma - ptxas then adds a warpgroup.arrive before the last one (C7519) - so that it runs while
  // this warpgroup holds the tensor cores' turn instead of while the other one does
  template <int NK, int L>
  __device__ __forceinline__ void fence_a(uint32_t (*a)[L][4]) {
#pragma unroll
    for (int k = 0; k < NK; ++k)
      asm volatile("" : "+r"(a[k][0][0]), "+r"(a[k][0][1]), "+r"(a[k][0][2]), "+r"(a[k][0][3])::"memory");
  }
  // d (+)= W (a: this lane's 4 registers) x the 2 NA tokens of x the descriptor points at; first: d = the product
  template <int NA>
  __device__ __forceinline__ void mma(int32_t (*d)[NA], const uint32_t (*a)[4], uint64_t desc, bool first) {
    static_assert(NA == 64 || NA == 32, "m64n128k32 or m64n64k32");
    if constexpr (NA == 64)
      MINICPM_WGMMA_M64N128K32_S8(d, a, desc, first);
    else
      MINICPM_WGMMA_M64N64K32_S8(d, a, desc, first);
  }
};

namespace cp = minicpm_int4_cp;

template <int BM, bool NARROW>
__device__ __forceinline__ void load_stage(const w8::Params& p, const wg::CopyPlan& plan, uint8_t* stage, int kb) {
#pragma unroll
  for (int i = 0; i < wg::Tile<BM>::kPiecesX + wg::kPiecesW; ++i) {
    int dst, bytes;
    const void* src;
    wg::stage_piece<BM>(p, plan, kb, i, dst, src, bytes, NARROW);
    if (NARROW && i >= wg::Tile<BM>::kPiecesX)  // (unrolled: settled at compile time)
      cp::piece<true>(stage + dst, src, bytes);
    else
      cp::piece<false>(stage + dst, src, bytes);
  }
}

// Stage s of the CTA's stream (tile-local k-block kb, in buffer `buf` = s % kStages): landed (this thread's copies;
// then the cross-proxy fence - cp.async writes through the generic proxy, wgmma reads through the async one - and
// every thread's), the stage kAhead on queued into the buffer of the stage before (both warpgroups waited for
// their wgmma on it before this barrier), then the warpgroup's work on stage s.
template <int GT, bool FMA, typename SZ, int BM, bool NARROW>
__device__ __forceinline__ void step(const w8::Params& p, DeviceWg& dev, uint8_t* smem, wg::LoadCursor& lc, int s,
                                     int total, int buf, int kb, int stages, wg::WgState<BM, 1>& st) {
  using T = wg::Tile<BM>;
  cp::wait<T::kAhead - 1>();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  if (s + T::kAhead < total) {
    const int lbuf = buf == 0 ? T::kStages - 1 : buf - 1;  // (s + kAhead) % kStages, kAhead = kStages - 1
    load_stage<BM, NARROW>(p, lc.plan, smem + lbuf * T::kStageBytes, lc.kb);
    wg::load_step<BM>(p, stages, threadIdx.x, lc);
  }
  cp::commit();  // one group per stage, empty ones included: the wait above counts them
  wg::wg_stage<GT, FMA, SZ, DeviceWg>(p, dev, smem + buf * T::kStageBytes, kb, st);
}

#endif  // MINICPM_WGMMA

template <int GT, bool FMA, typename SZ, int BM, bool NARROW>
__global__ void __launch_bounds__(wg::kThreads, 1) w4a8_wgmma_kernel(w8::Params p) {
#if MINICPM_WGMMA
  using T = wg::Tile<BM>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int grid = gridDim.x, cta = blockIdx.x, wgi = threadIdx.x >> 7;
  const int lanes[1] = {static_cast<int>(threadIdx.x & 127)};
  const int stages = (p.K + wg::kBK - 1) / wg::kBK;
  const int tiles = wg::cta_tiles<BM>(p.M, p.N, cta, grid), total = tiles * stages;
  DeviceWg dev{{}, wgi};
  wg::LoadCursor lc = wg::load_start<BM>(p, cta, grid, threadIdx.x);
#pragma unroll
  for (int s = 0; s < T::kAhead; ++s) {
    if (s < total) {
      load_stage<BM, NARROW>(p, lc.plan, smem + s * T::kStageBytes, lc.kb);
      wg::load_step<BM>(p, stages, threadIdx.x, lc);
    }
    cp::commit();
  }
  static_assert(T::kAhead == T::kStages - 1, "step's buffer of the stage kAhead on");
  wg::WgState<BM, 1> st;
  int s = 0, buf = 0;  // the stream's stage, and its buffer
  wg::TileWalk w = wg::walk_start<BM>(p.M, cta, grid);
  for (int t = 0; t < tiles; ++t, wg::walk_next(w)) {
    const int m0 = w.bm * BM, n0 = w.bn * wg::kBN;
    wg::wg_init(p, n0 + 64 * wgi, 64 * wgi, lanes, st);
    for (int kb = 0; kb < stages; ++kb, ++s) {
      step<GT, FMA, SZ, BM, NARROW>(p, dev, smem, lc, s, total, buf, kb, stages, st);
      buf = buf == T::kStages - 1 ? 0 : buf + 1;
    }
    // the outputs, through shared memory, while the next tile's first stages land (the tile buffer is free: every
    // thread passed a stage barrier since its last tile_store)
    uint8_t* tile = smem + T::kStages * T::kStageBytes;
    wg::wg_tile_out(p, m0, n0, 64 * wgi, lanes, st, tile);
    __syncthreads();
    wg::tile_store<BM>(p, m0, n0, tile, threadIdx.x);
  }
#else
  (void)p;
  __trap();  // never launched: the launcher asks minicpm_int4_w4a8_wgmma_available first
#endif
}

template <int GT, bool FMA, typename SZ, int BM, bool NARROW>
cudaError_t launch(const w8::Params& p, int sms, cudaStream_t stream) {
  using T = wg::Tile<BM>;
  static bool done[64] = {};
  const cudaError_t err = minicpm_int4_launch::opt_in_smem(
      done, reinterpret_cast<const void*>(w4a8_wgmma_kernel<GT, FMA, SZ, BM, NARROW>), T::kSmemBytes);
  if (err != cudaSuccess) return err;
  w4a8_wgmma_kernel<GT, FMA, SZ, BM, NARROW><<<static_cast<unsigned>(wg::grid_ctas<BM>(p.M, p.N, sms)),
                                               wg::kThreads, T::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <bool FMA, typename SZ, int BM>
cudaError_t launch_groups(const w8::Params& p, int sms, cudaStream_t stream) {
  switch (wg::static_group_tiles(p.G)) {
    case 1: return launch<1, FMA, SZ, BM, false>(p, sms, stream);
    case 2: return launch<2, FMA, SZ, BM, false>(p, sms, stream);
    case 4: return launch<4, FMA, SZ, BM, false>(p, sms, stream);
    default:  // multiples of 128 and per channel; rows of W only 8-byte aligned there alone (K % 32 == 16)
      return wg::narrow_w(p.K) ? launch<0, FMA, SZ, BM, true>(p, sms, stream)
                               : launch<0, FMA, SZ, BM, false>(p, sms, stream);
  }
}

template <typename SZ>
cudaError_t launch_sz(const w8::Params& p, bool fma, int bm, int sms, cudaStream_t stream) {
  if (bm == 64) return fma ? launch_groups<true, SZ, 64>(p, sms, stream) : launch_groups<false, SZ, 64>(p, sms, stream);
  return fma ? launch_groups<true, SZ, 128>(p, sms, stream) : launch_groups<false, SZ, 128>(p, sms, stream);
}

}  // namespace

// 1 where this GPU runs the kernel: the code loaded for it is an sm_90a build's, whose body needs 184 or more
// registers a thread (inspect-cuda), where the other archs' stub - a trap - needs a handful. Read from the
// function's attributes, not from device memory: no copy that would break a CUDA graph being captured when the
// first W4A8 call comes inside one. Asked once per device.
extern "C" int minicpm_int4_w4a8_wgmma_available() {
  static int cached[64];
  static bool asked[64] = {};
  return minicpm_int4_launch::body_built(cached, asked, reinterpret_cast<const void*>(w4a8_wgmma_kernel<4, false, __half, 128, false>), kBodyMinRegs);
}

// MINICPM_INT4_W4A8_WGMMA, read once per process: "0" turns the kernel off (the launcher never takes it, and
// forcing it is refused), "128" its 64-token blocks (the launcher's rule keeps to 128, forcing 64 is refused) - the
// GPU suite's way to measure everything else should the kernel, or its 64-token blocks alone, fail on a GPU.
namespace {
int wgmma_switch() {
  static const int value = minicpm_int4_launch::env_switch("MINICPM_INT4_W4A8_WGMMA");
  return value;
}
}  // namespace

extern "C" int minicpm_int4_w4a8_wgmma_disabled() { return wgmma_switch() == 0 ? 1 : 0; }
extern "C" int minicpm_int4_w4a8_wgmma_t64_disabled() { return wgmma_switch() == 128 ? 1 : 0; }

extern "C" int minicpm_int4_w4a8_wgmma_supported(int K, int group_size) { return wg::supported(K, group_size) ? 1 : 0; }

// The launch, for w4a8_gemm.cu's entry point (which checked the pointers and sizes): cudaErrorInvalidValue
// where the kernel does not take (K, G), cudaErrorNoKernelImageForDevice where this GPU has no sm_90a build.
// fma: the epilogue's multiply and add fused (w4a8_wgmma_core.cuh: within the reference's tolerance, not its bits).
// block_tokens: tokens a block, 128 or 64, or 0 for wg::block_tokens's choice. sms: the device's SMs - persistent
// CTAs, one an SM (grid_ctas).
cudaError_t minicpm_int4_w4a8_wgmma_launch(const minicpm_int4_w4a8::Params& p, bool fma, int block_tokens, int sms,
                                           cudaStream_t stream) {
  if (!wg::supported(p.K, p.G) || p.M <= 0 || sms <= 0 || (block_tokens != 0 && block_tokens != 64 && block_tokens != 128))
    return cudaErrorInvalidValue;
  if (block_tokens == 64 && minicpm_int4_w4a8_wgmma_t64_disabled()) return cudaErrorNotPermitted;
  const int bm = block_tokens != 0                           ? block_tokens
                 : minicpm_int4_w4a8_wgmma_t64_disabled() ? 128
                                                            : wg::block_tokens(p.M, p.N, sms);
  const long tiles = bm == 64 ? wg::blocks<64>(p.M, p.N) : wg::blocks<128>(p.M, p.N);
  if (tiles * ((p.K + wg::kBK - 1) / wg::kBK) > 0x7FFFFFFFL) return cudaErrorInvalidValue;  // (a CTA's stream of
                                                                                              // stages: an int)
  if (minicpm_int4_w4a8_wgmma_disabled()) return cudaErrorNotPermitted;
  if (!minicpm_int4_w4a8_wgmma_available()) return cudaErrorNoKernelImageForDevice;
  if (p.sz_dtype == 0) return launch_sz<__half>(p, fma, bm, sms, stream);
  if (p.sz_dtype == 1) return launch_sz<__nv_bfloat16>(p, fma, bm, sms, stream);
  return launch_sz<float>(p, fma, bm, sms, stream);
}
