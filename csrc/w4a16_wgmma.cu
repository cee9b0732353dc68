// W4A16 prefill GEMM on Hopper's warpgroup MMA (sm_90a): y = x @ dequant(W).T (+ bias) for fp16 / bf16 x, W
// dequantized in registers as the wgmma's A operand - the reference's weight bit for bit - and x read by the tensor
// cores from shared memory (w4a16_wgmma_core.cuh says how, and runs on the host in the tests' emulation). A 128 (rows
// of W) x 128 or 256 (tokens) output tile per block of 2 warpgroups, K through a ring of 64-k stages (cp.async, all
// but one in flight), each warpgroup's wgmma on one stage in flight while it dequantizes the next stage's A.
// Persistent CTAs, one an SM; where the tiles are too few to fill the SMs (M <= 128, or a narrow layer at a few
// hundred tokens), split-K: a tile a cluster of 2 - 8 CTAs, their partial sums added through distributed shared
// memory (w4a16_wgmma_core.cuh, split_k). The decode kernels (w4a16_gemv.cu) keep M <= 16; w4a16_gemv.cu's entry point takes
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
                                     wg::DqCursor& dc, int s, int total, int buf, int kb, int kb0, int kb1, int wgi,
                                     const int (&lanes)[1], wg::WgState<BM, 1, GS>& st) {
  using TT = wg::Tile<BM>;
  const uint32_t addr = dev.smem_addr(smem + buf * TT::kStageBytes);
  dev.fence_a(st.a[SET]);
  dev.fence();
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) dev.mma<T>(st.acc, st.a[SET][kt], wg::x_desc<BM>(addr, kt), kb == kb0 && kt == 0);
  dev.commit();
  dev.wait<1>();
  if (s + 1 < total) {
    cp::wait<TT::kAhead - 2>();  // this thread's copies of stage s + 1 landed
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    if (s + TT::kAhead < total) {
      const int lbuf = buf == 0 ? TT::kStages - 1 : buf - 1;  // (s + kAhead) % kStages, kAhead = kStages - 1
      load_stage<T, BM>(p, lc.plan, smem + lbuf * TT::kStageBytes, lc.kb);
      wg::load_step<T, BM>(p, kb0, kb1, threadIdx.x, lc);
    }
    cp::commit();  // one group a step, empty ones included: the wait above counts them
    const int nbuf = buf == TT::kStages - 1 ? 0 : buf + 1;
    wg::dequant_stage<T>(smem + nbuf * TT::kStageBytes, p.mask, st, st.a[SET ^ 1]);
    wg::dq_step(p, kb0, kb1, wgi, lanes, dc, st);
  }
}

// Thread block clusters (split-K): the barrier of all the cluster's threads (release / acquire: the shared-memory
// writes before it are seen by the other CTAs' reads after it), this CTA's rank in its cluster, and the address in
// CTA `rank`'s shared memory of what is at `part` in this one's (a generic address: plain loads read it).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ int cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
}
struct ClusterParts {
  const float* part;  // this CTA's partial tile
  __device__ __forceinline__ const float* operator()(int rank) const {
    uint64_t r;
    asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(r) : "l"(reinterpret_cast<uint64_t>(part)), "r"(rank));
    return reinterpret_cast<const float*>(r);
  }
};

#endif  // MINICPM_WGMMA16

// SPLIT: a tile a cluster of p.splits CTAs (split-K, 128-token blocks: w4a16_wgmma_core.cuh); else persistent CTAs.
template <typename T, int BM, int GS, bool SPLIT>
__global__ void __launch_bounds__(wg::kThreads, 1) w4a16_wgmma_kernel(wg::Params<T> p) {
#if MINICPM_WGMMA16
  using TT = wg::Tile<BM>;
  static_assert(TT::kAhead == TT::kStages - 1 && TT::kAhead >= 2, "step's buffers and waits");
  static_assert(!SPLIT || BM == 128, "split-K takes 128-token blocks");
  extern __shared__ __align__(128) uint8_t smem[];
  const int wgi = threadIdx.x >> 7;
  const int lanes[1] = {static_cast<int>(threadIdx.x & 127)};
  const int stages = p.K / wg::kBK;
  // the CTA's place among the tiles' CTAs (a cluster's under split-K: its tile) and the k-blocks it sums
  int cta = blockIdx.x, grid = gridDim.x, kb0 = 0, kb1 = stages, rank = 0;
  if constexpr (SPLIT) {
    rank = cluster_rank();
    cta = blockIdx.x / p.splits;
    grid = gridDim.x / p.splits;
    wg::split_range(stages, p.splits, rank, kb0, kb1);
  }
  const int tiles = wg::cta_tiles<BM>(p.M, p.N, cta, grid), total = tiles * (kb1 - kb0);
  DeviceWg dev;
  wg::LoadCursor lc = wg::load_start<T, BM>(p, cta, grid, threadIdx.x, kb0);
#pragma unroll
  for (int s = 0; s < TT::kAhead; ++s) {
    if (s < total) {
      load_stage<T, BM>(p, lc.plan, smem + s * TT::kStageBytes, lc.kb);
      wg::load_step<T, BM>(p, kb0, kb1, threadIdx.x, lc);
    }
    cp::commit();
  }
  wg::WgState<BM, 1, GS> st;
  wg::DqCursor dc{wg::walk_start<BM>(p.M, cta, grid), kb0};
  wg::wg_rows(p, dc.w.bn * wg::kBN + 64 * wgi, 64 * wgi, lanes, st);
  wg::load_sz(p, kb0, st);
  cp::wait<TT::kAhead - 1>();  // stage 0 landed
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  wg::dequant_stage<T>(smem, p.mask, st, st.a[0]);
  wg::dq_step(p, kb0, kb1, wgi, lanes, dc, st);
  int s = 0, buf = 0;  // the stream's stage, and its buffer
  wg::TileWalk w = wg::walk_start<BM>(p.M, cta, grid);
  for (int t = 0; t < tiles; ++t, wg::walk_next(w)) {
    for (int kb = kb0; kb < kb1; ++kb, ++s) {
      if (s + 1 < total) wg::load_sz(p, dc.kb, st);  // stage s + 1's scales and zero points, used after the wait
      if (s & 1)
        step<T, BM, GS, 1>(p, dev, smem, lc, dc, s, total, buf, kb, kb0, kb1, wgi, lanes, st);
      else
        step<T, BM, GS, 0>(p, dev, smem, lc, dc, s, total, buf, kb, kb0, kb1, wgi, lanes, st);
      buf = buf == TT::kStages - 1 ? 0 : buf + 1;
    }
    dev.wait<0>();
    dev.fence_acc(st.acc);
    if constexpr (SPLIT) {
      // the partial sums into the ring (both warpgroups' wgmma done reading it, past the barrier), then the cluster's
      // barrier: every CTA's partial tile written; this CTA's share of the tile summed from all of them; and the
      // barrier again, so that no CTA leaves (its shared memory with it) while another reads its partial tile
      cp::wait<0>();  // (no copy is in flight past the last stage: its own wait saw to that)
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
      float* part = reinterpret_cast<float*>(smem);
      wg::part_out(64 * wgi, lanes, st, part);
      cluster_sync();
      wg::split_reduce<T, BM>(p, w.bm * BM, w.bn * wg::kBN, ClusterParts{part}, p.splits, rank, threadIdx.x);
      cluster_sync();
    } else {
      // the tile's sums out through shared memory (the barrier before: the last tile's tile_store has read the buffer)
      uint8_t* tile = smem + TT::kStages * TT::kStageBytes;
      __syncthreads();
      wg::tile_out(p, w.bn * wg::kBN, 64 * wgi, lanes, st, tile);
      __syncthreads();
      wg::tile_store<T, BM>(p, w.bm * BM, w.bn * wg::kBN, tile, threadIdx.x);
    }
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
      done, reinterpret_cast<const void*>(w4a16_wgmma_kernel<T, BM, GS, false>), TT::kSmemBytes);
  if (err != cudaSuccess) return err;
  w4a16_wgmma_kernel<T, BM, GS, false><<<static_cast<unsigned>(wg::grid_ctas<BM>(p.M, p.N, sms)), wg::kThreads,
                                         TT::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// The split kernel's launch configuration: a cluster of `splits` CTAs a tile, `tiles` tiles.
struct ClusterLaunch {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg;
  ClusterLaunch(int splits, long tiles, int smem, cudaStream_t stream) : cfg{} {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(splits);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(tiles * splits), 1, 1);
    cfg.blockDim = dim3(wg::kThreads, 1, 1);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
};

// Of splits, splits / 2, ..., 2: the largest whose `tiles` clusters the GPU holds all at once
// (cudaOccupancyMaxActiveClusters: a cluster's CTAs share a GPC, one CTA an SM here, so fewer than SMs / splits may
// fit; asked once per device and cluster size), else 1 (the persistent kernel). Negative: a CUDA error.
template <typename T, int GS>
cudaError_t split_opt_in() {  // the split kernel's shared memory past 48 KiB, asked once per device
  static bool done[64] = {};
  return minicpm_int4_launch::opt_in_smem(done, reinterpret_cast<const void*>(w4a16_wgmma_kernel<T, 128, GS, true>),
                                          wg::Tile<128>::kSmemBytes);
}

template <typename T, int GS>
int fitting_splits(int splits, long tiles) {
  using TT = wg::Tile<128>;
  auto kernel = w4a16_wgmma_kernel<T, 128, GS, true>;
  static int fits[64][4] = {};  // per device and log2 splits: clusters that fit + 1 (0: not asked yet)
  cudaError_t err = split_opt_in<T, GS>();
  if (err != cudaSuccess) return -static_cast<int>(err);
  int dev = 0;
  err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return -static_cast<int>(err);
  for (; splits > 1; splits /= 2) {
    const int lg = splits == 2 ? 1 : splits == 4 ? 2 : 3;
    int n = dev < 64 ? fits[dev][lg] - 1 : -1;
    if (n < 0) {
      const ClusterLaunch one(splits, 1, TT::kSmemBytes, nullptr);
      if (cudaOccupancyMaxActiveClusters(&n, kernel, &one.cfg) != cudaSuccess) {
        (void)cudaGetLastError();  // (not sticky: cleared, so that the launch reports its own)
        n = 0;
      }
      if (dev < 64) fits[dev][lg] = n + 1;
    }
    if (n >= tiles) return splits;
  }
  return 1;
}

// Split-K: a cluster of p.splits CTAs a tile (cudaLaunchKernelEx's cluster dimension); unless forced, as many as
// fitting_splits allows (the persistent kernel where none).
template <typename T, int GS>
cudaError_t launch_split(wg::Params<T> p, bool forced, int sms, cudaStream_t stream) {
  using TT = wg::Tile<128>;
  auto kernel = w4a16_wgmma_kernel<T, 128, GS, true>;
  const long tiles = wg::blocks<128>(p.M, p.N);
  if (!forced) {  // (fitting_splits opts the kernel in)
    const int fit = fitting_splits<T, GS>(p.splits, tiles);
    if (fit < 0) return static_cast<cudaError_t>(-fit);
    p.splits = fit;
    if (p.splits == 1) return launch<T, 128, GS>(p, sms, stream);
  } else if (const cudaError_t err = split_opt_in<T, GS>(); err != cudaSuccess) {
    return err;
  }
  const ClusterLaunch launch(p.splits, tiles, TT::kSmemBytes, stream);
  return cudaLaunchKernelEx(&launch.cfg, kernel, p);
}

template <typename T>
cudaError_t launch_t(const wg::Params<T>& p, int bm, bool forced, int sms, cudaStream_t stream) {
  const bool two = p.G == 32;  // two groups a stage
  if (p.splits > 1) return two ? launch_split<T, 2>(p, forced, sms, stream) : launch_split<T, 1>(p, forced, sms, stream);
  if (bm == 256) return two ? launch<T, 256, 2>(p, sms, stream) : launch<T, 256, 1>(p, sms, stream);
  return two ? launch<T, 128, 2>(p, sms, stream) : launch<T, 128, 1>(p, sms, stream);
}

// MINICPM_INT4_W4A16_WGMMA, read once per process: "0" turns the kernel off (never the launcher's choice; forcing it
// is refused), "128" its 256-token blocks - the GPU suite's way to measure everything else should it fail on a GPU.
// MINICPM_INT4_W4A16_WGMMA_SPLIT=0 likewise turns its split-K (thread block clusters) off.
int wgmma_switch() {
  static const int value = minicpm_int4_launch::env_switch("MINICPM_INT4_W4A16_WGMMA");
  return value;
}
int split_switch() {
  static const int value = minicpm_int4_launch::env_switch("MINICPM_INT4_W4A16_WGMMA_SPLIT");
  return value;
}

}  // namespace

extern "C" int minicpm_int4_w4a16_wgmma_available() {
  static int cached[64];
  static bool asked[64] = {};
  return minicpm_int4_launch::body_built(cached, asked, reinterpret_cast<const void*>(w4a16_wgmma_kernel<__half, 128, 1, false>),
                                            kBodyMinRegs);
}

extern "C" int minicpm_int4_w4a16_wgmma_disabled() { return wgmma_switch() == 0 ? 1 : 0; }

extern "C" int minicpm_int4_w4a16_wgmma_supported(int K, int group_size) { return wg::supported(K, group_size) ? 1 : 0; }

extern "C" int minicpm_int4_w4a16_wgmma_split_disabled() { return split_switch() == 0 ? 1 : 0; }

// The CTAs a tile the launcher's choice (variant 5) takes for this GEMM on the current GPU (`sms` SMs): split_k's
// rule, lowered to the clusters that fit at once; 1 where it does not split (256-token blocks, the switch, a grid of
// a wave or more); 0 where the kernel does not run here or take (K, group_size); negative: a CUDA error.
extern "C" int minicpm_int4_w4a16_wgmma_splits(int M, int N, int K, int group_size, int dtype, int sms) {
  if (!wg::supported(K, group_size) || M <= 0 || N <= 0 || sms <= 0 || (dtype != 0 && dtype != 1) ||
      minicpm_int4_w4a16_wgmma_disabled() || !minicpm_int4_w4a16_wgmma_available())
    return 0;
  int bm, splits;
  wg::plan(M, N, K, sms, 0, 0, wgmma_switch() != 128, split_switch() != 0, bm, splits);
  if (splits == 1) return 1;
  const long tiles = wg::blocks<128>(M, N);
  const bool two = group_size == 32;
  if (dtype == 0) return two ? fitting_splits<__half, 2>(splits, tiles) : fitting_splits<__half, 1>(splits, tiles);
  return two ? fitting_splits<__nv_bfloat16, 2>(splits, tiles) : fitting_splits<__nv_bfloat16, 1>(splits, tiles);
}

cudaError_t minicpm_int4_w4a16_wg::launch(const void* x, const int32_t* qweight, const void* scales, const void* zeros,
                                          const void* bias, void* out, int M, int N, int K, int group_size, int64_t ldx,
                                          int64_t ldo, int dtype, int block_tokens, int split, int sms,
                                          cudaStream_t stream) {
  if (!wg::args_ok(M, N, K, group_size, ldx, ldo, dtype, block_tokens, split, sms)) return cudaErrorInvalidValue;
  if ((reinterpret_cast<uintptr_t>(x) & 15) != 0 || (reinterpret_cast<uintptr_t>(qweight) & 15) != 0)
    return cudaErrorMisalignedAddress;
  if (block_tokens == 256 && wgmma_switch() == 128) return cudaErrorNotPermitted;
  if (split > 1 && split_switch() == 0) return cudaErrorNotPermitted;
  int bm, splits;
  wg::plan(M, N, K, sms, block_tokens, split, wgmma_switch() != 128, split_switch() != 0, bm, splits);
  const long tiles = bm == 256 ? wg::blocks<256>(M, N) : wg::blocks<128>(M, N);
  if (tiles * (K / wg::kBK) > 0x7FFFFFFFL) return cudaErrorInvalidValue;  // (a CTA's stream of stages: an int)
  if (minicpm_int4_w4a16_wgmma_disabled()) return cudaErrorNotPermitted;
  if (!minicpm_int4_w4a16_wgmma_available()) return cudaErrorNoKernelImageForDevice;
  if (dtype == 0)
    return launch_t<__half>(wg::make_params<__half>(x, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo,
                                                   splits), bm, split > 1, sms, stream);
  return launch_t<__nv_bfloat16>(wg::make_params<__nv_bfloat16>(x, qweight, scales, zeros, bias, out, M, N, K,
                                                                 group_size, ldx, ldo, splits), bm, split > 1, sms, stream);
}
