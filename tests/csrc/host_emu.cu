// The CUDA kernels of csrc/ run on the CPU, block by block: the W4A16 decode kernels
// (csrc/w4a16_gemv.cu), the W4A16 prefill GEMM (csrc/w4a16_wgmma.cu), the activation quantizer
// (csrc/act_quant.cu) and the W4A8 GEMMs (csrc/w4a8_gemm.cu, csrc/w4a8_wgmma.cu).
//
// CUDA-core GEMV: every thread's work is the kernel's own code (thread_partials in
// csrc/w4a16_gemv_core.cuh), and so are the host-side choices (chunk_shift_for, rows_per_block).
// Tensor-core kernel: every warp's work is the kernel's own code (warp_partials in
// csrc/w4a16_mma_core.cuh) run for all 32 lanes at once, with the mma emulated from the PTX
// fragment layout (HostMma), and so are the output mapping and the host-side choices. This file
// replaces only what needs a GPU - shuffles, shared memory, the launch - with a sequential
// emulation in the kernels' order of additions. Built by tests/test_csrc_gemv.py with
// `nvcc -shared` (host code only, no GPU needed) and called through ctypes.
#include "../../csrc/w4a16_gemv_core.cuh"
#include "../../csrc/w4a16_mma_core.cuh"
#include "../../csrc/act_quant_core.cuh"
#include "../../csrc/w4a8_gemm_core.cuh"
#include "../../csrc/w4a8_wgmma_core.cuh"
#include "../../csrc/w4a16_wgmma_core.cuh"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using namespace minicpm_int4_gemv;

// One block: kThreads threads' partial sums, each warp's xor-shuffle butterfly (every lane adds its
// partner's value at each step, as __shfl_xor_sync does), lane 0's sum into warp_sums, then finish.
template <typename T, int MT, int R>
void run_block(const Params<T>& p, int n0, bool fast, const T* bias, T* out, long ldo) {
  std::vector<float> acc(static_cast<size_t>(kThreads) * MT * R);
  for (int tid = 0; tid < kThreads; ++tid) {
    float a[MT][R];
    if (p.input_scale != nullptr)  // the launcher's choice of instantiation
      thread_partials<T, MT, R, true>(p, n0, tid, fast, a);
    else
      thread_partials<T, MT, R, false>(p, n0, tid, fast, a);
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) acc[(static_cast<size_t>(tid) * MT + m) * R + r] = a[m][r];
  }
  for (int m = 0; m < MT; ++m) {
    for (int r = 0; r < R; ++r) {
      float warp_sums[kWarps];
      for (int w = 0; w < kWarps; ++w) {
        float v[32], next[32];
        for (int lane = 0; lane < 32; ++lane) v[lane] = acc[(static_cast<size_t>(w * 32 + lane) * MT + m) * R + r];
        for (int off = 16; off > 0; off >>= 1) {
          for (int lane = 0; lane < 32; ++lane) next[lane] = v[lane] + v[lane ^ off];
          for (int lane = 0; lane < 32; ++lane) v[lane] = next[lane];
        }
        warp_sums[w] = v[0];
      }
      const int n = n0 + r;
      if (n < p.N) out[m * ldo + n] = finish<T>(warp_sums, bias, n);
    }
  }
}

template <typename T, int MT, int R>
void run_grid(const Params<T>& p, bool fast, const T* bias, T* out, long ldo) {
  for (int n0 = 0; n0 < p.N; n0 += R) run_block<T, MT, R>(p, n0, fast, bias, out, ldo);
}

// The instantiations csrc/w4a16_gemv.cu launches (MT * R <= kMaxRows); false for any other pair.
template <typename T, int MT>
bool dispatch_r(const Params<T>& p, int r, bool fast, const T* bias, T* out, long ldo) {
  if constexpr (MT == 1) {
    if (r == 8) return run_grid<T, 1, 8>(p, fast, bias, out, ldo), true;
  }
  if constexpr (MT <= 2) {
    if (r == 4) return run_grid<T, MT, 4>(p, fast, bias, out, ldo), true;
  }
  if constexpr (MT <= 4) {
    if (r == 2) return run_grid<T, MT, 2>(p, fast, bias, out, ldo), true;
  }
  if (r == 1) return run_grid<T, MT, 1>(p, fast, bias, out, ldo), true;
  return false;
}

template <typename T>
int emulate(const T* x, const int32_t* qweight, const T* scales, const T* zeros, const T* bias, T* out, int M,
            int N, int K, int group_size, long ldx, long ldo, int rows, int sms, const T* ms) {
  const int chunk_shift = chunk_shift_for(K, group_size);
  const bool fast = chunk_shift >= 0;
  for (int m0 = 0; m0 < M; m0 += 8) {
    const int mt = (M - m0) < 8 ? (M - m0) : 8;
    const Params<T> p{x + static_cast<long>(m0) * ldx, qweight, scales, zeros, N, K, group_size, ldx, chunk_shift, 0xFu, ms};
    T* os = out + static_cast<long>(m0) * ldo;
    const int r = rows > 0 ? rows : rows_per_block(mt, N, sms);
    bool ok = false;
    switch (mt) {
      case 1: ok = dispatch_r<T, 1>(p, r, fast, bias, os, ldo); break;
      case 2: ok = dispatch_r<T, 2>(p, r, fast, bias, os, ldo); break;
      case 3: ok = dispatch_r<T, 3>(p, r, fast, bias, os, ldo); break;
      case 4: ok = dispatch_r<T, 4>(p, r, fast, bias, os, ldo); break;
      case 5: ok = dispatch_r<T, 5>(p, r, fast, bias, os, ldo); break;
      case 6: ok = dispatch_r<T, 6>(p, r, fast, bias, os, ldo); break;
      case 7: ok = dispatch_r<T, 7>(p, r, fast, bias, os, ldo); break;
      default: ok = dispatch_r<T, 8>(p, r, fast, bias, os, ldo); break;
    }
    if (!ok) return -1;
  }
  return 0;
}

namespace mm = minicpm_int4_mma;

// cp.async for the ring variant, per warp: each copy waits in its commit group until a wait lets that group
// land (the oldest first, as cp.async.wait_group does), so a slot read before its group landed holds what
// the ring held before - the poison it starts with, or an older chunk - and the result is wrong.
struct HostCp {
  struct Copy {
    void* dst;
    const void* src;
    int bytes, size;
  };
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  // __host__ __device__ as the core's callers (host code only: the device pass sees empty bodies)
  MINICPM_HD void copy16(void* dst, const void* src, int bytes) {
#ifndef __CUDA_ARCH__
    open.push_back({dst, src, bytes, 16});
#endif
  }
  MINICPM_HD void commit() {
#ifndef __CUDA_ARCH__
    groups.push_back(open);
    open.clear();
#endif
  }
  template <int N> MINICPM_HD void wait() {
#ifndef __CUDA_ARCH__
    while (static_cast<int>(groups.size()) > N) {
      for (const Copy& c : groups.front()) {
        std::memset(c.dst, 0, static_cast<size_t>(c.size));
        if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));  // reads only `bytes` of src
      }
      groups.erase(groups.begin());
    }
#endif
  }
};

// mode: 0 the default, 1 two chunks of W ahead (variant 3), 2 the ring in shared memory (variant 4); 3 the
// ring reading each slot one copy group too early (a control: the deferred copies must make it wrong)
template <typename T, int NT, int NB, bool POST, int W, int MODE = 0>
void mma_grid(const mm::Params<T>& p, const T* bias, T* out, long ldo) {
  int lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l;
  std::vector<float> acc_store(static_cast<size_t>(W) * NT * NB * 32 * 4);
  auto acc = reinterpret_cast<float(*)[NT][NB][32][4]>(acc_store.data());
  std::vector<unsigned char> ring(MODE >= 2 ? static_cast<size_t>(mm::ring_warp_bytes<NT>()) : 0);
  for (int n0 = 0; n0 < p.N; n0 += 16 * NT) {
    for (int w = 0; w < W; ++w) {
      if (p.input_perm != nullptr) {  // the launcher's choice of instantiation (never both)
        mm::warp_partials<T, NT, NB, POST, W, mm::HostMma, 32, false, true>(p, n0, w, lanes, acc[w]);
      } else if (p.input_scale != nullptr) {
        mm::warp_partials<T, NT, NB, POST, W, mm::HostMma, 32, true>(p, n0, w, lanes, acc[w]);
      } else if constexpr (MODE >= 2) {
        std::fill(ring.begin(), ring.end(), static_cast<unsigned char>(0xFF));  // poison: every nibble 15
        HostCp cp;
        constexpr int kWait = MODE == 3 ? mm::kRingDepth : mm::kRingDepth - 1;
        mm::warp_partials_ring<T, NT, NB, POST, W, mm::HostMma, 32, HostCp, kWait>(p, n0, w, lanes, ring.data(), cp,
                                                                                  acc[w]);
      } else {
        mm::warp_partials<T, NT, NB, POST, W, mm::HostMma, 32, false, false, MODE == 1 ? mm::kAheadDeep : 1>(
            p, n0, w, lanes, acc[w]);
      }
    }
    for (int slot = 0; slot < NT * NB * 4; ++slot) {
      const int e = slot & 3, nb = (slot >> 2) % NB, nt = (slot >> 2) / NB;
      for (int lane = 0; lane < 32; ++lane) {
        float vals[W];
        for (int w = 0; w < W; ++w) vals[w] = acc[w][nt][nb][lane][e];
        int m, n;
        mm::slot_output(n0, NB, slot, lane, m, n);
        mm::store_output<T, W>(vals, bias, out, ldo, p.M, p.N, m, n);
      }
    }
  }
}

// The kernel's instantiations (csrc/w4a16_gemv.cu launch_mma_nb); false for any other choice.
// mode 1 / 2: the variant-3 / variant-4 instantiations (plain x only, as the launcher); 3: the control above.
template <typename T, int NB>
bool mma_dispatch(const mm::Params<T>& p, int nt, int warps, bool post, int mode, const T* bias, T* out, long ldo) {
  auto run = [&](auto nt_c, auto w_c) {
    constexpr int NTc = decltype(nt_c)::value, Wc = decltype(w_c)::value;
    if (mode == 1)
      post ? mma_grid<T, NTc, NB, true, Wc, 1>(p, bias, out, ldo) : mma_grid<T, NTc, NB, false, Wc, 1>(p, bias, out, ldo);
    else if (mode == 2)
      post ? mma_grid<T, NTc, NB, true, Wc, 2>(p, bias, out, ldo) : mma_grid<T, NTc, NB, false, Wc, 2>(p, bias, out, ldo);
    else if (mode == 3)
      post ? mma_grid<T, NTc, NB, true, Wc, 3>(p, bias, out, ldo) : mma_grid<T, NTc, NB, false, Wc, 3>(p, bias, out, ldo);
    else
      post ? mma_grid<T, NTc, NB, true, Wc>(p, bias, out, ldo) : mma_grid<T, NTc, NB, false, Wc>(p, bias, out, ldo);
    return true;
  };
  if (nt == 2 && warps == mm::kWarps) return run(std::integral_constant<int, 2>{}, std::integral_constant<int, mm::kWarps>{});
  if (nt == 1 && warps == mm::kWarps) return run(std::integral_constant<int, 1>{}, std::integral_constant<int, mm::kWarps>{});
  if (nt == 1 && warps == mm::kWarpsSmallN)
    return run(std::integral_constant<int, 1>{}, std::integral_constant<int, mm::kWarpsSmallN>{});
  return false;
}

template <typename T>
int mma_emulate(const T* x, const int32_t* qweight, const T* scales, const T* zeros, const T* bias, T* out, int M,
                int N, int K, int group_size, long ldx, long ldo, int tiles, int warps, int sms, const T* ms,
                const int32_t* perm, int mode) {
  if (!mm::mma_supported(K, group_size)) return -2;
  if (perm != nullptr && ms != nullptr) return -3;  // as the launcher: no such instantiation
  if (mode != 0 && (perm != nullptr || ms != nullptr)) return -3;  // variants 3 and 4: plain x only
  const bool post = mm::mma_post_scale(K, group_size);
  const int nt = tiles > 0 ? tiles : mm::mma_tiles_per_block(N, sms);
  const int w = warps > 0 ? warps : mm::mma_warps_per_block(N, nt, sms);
  for (int m0 = 0; m0 < M; m0 += mm::kMaxM) {
    const int rows = (M - m0) < mm::kMaxM ? (M - m0) : mm::kMaxM;
    const mm::Params<T> p{x + static_cast<long>(m0) * ldx, qweight, scales, zeros, rows, N, K, group_size, ldx,
                          0x000F000Fu, mm::group_shift_for(K, group_size), ms, perm};
    T* os = out + static_cast<long>(m0) * ldo;
    // the launcher applies it to every slice
    const int ws = mm::mma_warps_for_launch(w, rows, ms != nullptr || perm != nullptr);
    const bool ok = rows > 8 ? mma_dispatch<T, 2>(p, nt, ws, post, mode, bias, os, ldo)
                             : mma_dispatch<T, 1>(p, nt, ws, post, mode, bias, os, ldo);
    if (!ok) return -1;
  }
  return 0;
}

namespace aq = minicpm_int4_aq;

// One block per row: every thread's pass 1, the block max (exact in any order, NaN-propagating),
// the row's scale, every thread's pass 2 - the kernel's sequence with its own per-thread code.
template <typename T, int U, bool S, bool P>
void act_quant_rows(const T* x, const T* ms, const int32_t* perm, int8_t* xq, float* scale, int M, int K, long ldx,
                    bool vec) {
  std::vector<uint4> caches(static_cast<size_t>(aq::kThreads) * (U > 0 ? U : 1));
  for (int m = 0; m < M; ++m) {
    const T* row = x + static_cast<long>(m) * ldx;
    float amax = 0.f;
    bool nan = false;
    for (int tid = 0; tid < aq::kThreads; ++tid) {
      auto& cache = *reinterpret_cast<uint4(*)[U > 0 ? U : 1]>(&caches[static_cast<size_t>(tid) * (U > 0 ? U : 1)]);
      const float v = aq::thread_absmax<T, U, S, P>(row, ms, perm, K, tid, vec, cache).value();
      nan = nan || v != v;
      amax = fmaxf(amax, v);
    }
    float s, safe;
    aq::row_scale(nan ? NAN : amax, s, safe);
    scale[m] = s;
    for (int tid = 0; tid < aq::kThreads; ++tid) {
      const auto& cache = *reinterpret_cast<const uint4(*)[U > 0 ? U : 1]>(&caches[static_cast<size_t>(tid) * (U > 0 ? U : 1)]);
      aq::thread_quantize<T, U, S, P>(row, ms, perm, xq + static_cast<long>(m) * K, K, tid, vec, s, safe, cache);
    }
  }
}

template <typename T, bool S, bool P>
void act_quant_u(const T* x, const T* ms, const int32_t* perm, int8_t* xq, float* scale, int M, int K, long ldx,
                 bool vec) {
  switch (aq::cache_pieces(K, sizeof(T), vec)) {
    case 1: act_quant_rows<T, 1, S, P>(x, ms, perm, xq, scale, M, K, ldx, vec); break;
    case 2: act_quant_rows<T, 2, S, P>(x, ms, perm, xq, scale, M, K, ldx, vec); break;
    case 4: act_quant_rows<T, 4, S, P>(x, ms, perm, xq, scale, M, K, ldx, vec); break;
    case 8: act_quant_rows<T, 8, S, P>(x, ms, perm, xq, scale, M, K, ldx, vec); break;
    default: act_quant_rows<T, 0, S, P>(x, ms, perm, xq, scale, M, K, ldx, vec); break;
  }
}

template <typename T>
int act_quant(const T* x, const T* ms, const int32_t* perm, int8_t* xq, float* scale, int M, int K, long ldx,
              int force_scalar) {
  if (perm != nullptr && ms != nullptr) return -3;  // as the launcher: no such instantiation
  const bool vec = !force_scalar && aq::vector_path(x, ldx, K, sizeof(T), ms, perm);
  if (perm != nullptr)
    act_quant_u<T, false, true>(x, ms, perm, xq, scale, M, K, ldx, vec);
  else if (ms != nullptr)
    act_quant_u<T, true, false>(x, ms, perm, xq, scale, M, K, ldx, vec);
  else
    act_quant_u<T, false, false>(x, ms, perm, xq, scale, M, K, ldx, vec);
  return vec ? aq::cache_pieces(K, sizeof(T), vec) : -1;
}

namespace w8 = minicpm_int4_w4a8;

// The W4A8 GEMM, block by block in the launch order: each stage's pieces copied into the block's
// shared memory as the kernel's threads would (stage_piece: zero-filled past M, N and K), every thread's
// permute pass over x (permute_x), then each warp's work on it (warp_stage, 32 lanes, HostMma - its
// ldmatrix too, from the row addresses the lanes hand it), then each warp's stores. Shared memory starts
// as 0xA5 bytes, so a fragment read from anywhere no copy wrote shows in the result.
template <int WM, int GT, bool MAGIC, typename SZ>
void w4a8_grid(const w8::Params& p) {
  using B = w8::Block<WM>;
  int lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l;
  std::vector<uint8_t> smem(B::kSmemBytes);
  std::vector<w8::WarpState<32>> st(B::kWarps);
  const long nblocks = w8::blocks(p.M, p.N, WM);
  const int stages = (p.K + w8::kBK - 1) / w8::kBK;
  for (long pid = 0; pid < nblocks; ++pid) {
    int bm, bn;
    w8::block_tile<WM>(static_cast<int>(pid), p.M, p.N, bm, bn);
    const int m0 = bm * B::kBM, n0 = bn * w8::kBN;
    std::fill(smem.begin(), smem.end(), static_cast<uint8_t>(0xA5));
    for (int w = 0; w < B::kWarps; ++w) w8::warp_init(p, n0 + (w % w8::kWarpsN) * (w8::kBN / w8::kWarpsN), lanes, st[w]);
    for (int kb = 0; kb < stages; ++kb) {
      uint8_t* stage = smem.data() + (kb % w8::kStages) * B::kStageBytes;
      for (int tid = 0; tid < B::kThreads; ++tid)
        for (int i = 0; i < B::kPiecesA + B::kPiecesB; ++i) {
          int dst, bytes;
          const void* src;
          w8::stage_piece<WM>(p, w8::copy_plan<WM>(p, m0, n0, tid), kb, i, dst, src, bytes);
          std::memcpy(stage + dst, src, bytes);
          std::memset(stage + dst + bytes, 0, 16 - bytes);
        }
      for (int tid = 0; tid < B::kThreads; ++tid) w8::permute_x<WM>(stage, tid);
      for (int w = 0; w < B::kWarps; ++w) {
        const int wm = (w / w8::kWarpsN) * w8::kWarpRows, wn = (w % w8::kWarpsN) * (w8::kBN / w8::kWarpsN);
        w8::warp_stage<GT, MAGIC, SZ, w8::HostMma, 32>(p, stage, stage + B::kStageA, kb, wm, wn, lanes, st[w]);
      }
    }
    for (int w = 0; w < B::kWarps; ++w) {
      const int wm = (w / w8::kWarpsN) * w8::kWarpRows, wn = (w % w8::kWarpsN) * (w8::kBN / w8::kWarpsN);
      w8::warp_store<32>(p, m0 + wm, n0 + wn, lanes, st[w]);
    }
  }
}

template <int WM, typename SZ>
void w4a8_groups(const w8::Params& p) {
  switch (w8::static_group_tiles(p.K, p.G)) {  // the launcher's instantiations
    case 1: w4a8_grid<WM, 1, true, SZ>(p); break;
    case 2: w4a8_grid<WM, 2, true, SZ>(p); break;
    case 4: w4a8_grid<WM, 4, true, SZ>(p); break;
    default: w8::magic_convert(p.G) ? w4a8_grid<WM, 0, true, SZ>(p) : w4a8_grid<WM, 0, false, SZ>(p);
  }
}

template <typename SZ>
void w4a8_sz(const w8::Params& p, int wm) {
  wm == 1 ? w4a8_groups<1, SZ>(p) : w4a8_groups<2, SZ>(p);
}

namespace wgk = minicpm_int4_w4a8_wg;

// The warpgroup-MMA W4A8 GEMM (csrc/w4a8_wgmma.cu): its persistent CTAs one after another (grid_ctas for `sms`
// SMs), each through its stream of stages in the kernel's order - the first kAhead stages copied into the ring of
// buffers, then per stage the copy of the stage kAhead on (load_start / load_step: across tiles' boundaries,
// each tile's copy plan as the kernel's 256 threads work it out; zero-filled past M, N and K) and each
// warpgroup's work on this stage (wg_stage, its 128 lanes at once, HostWg reading x through the descriptors the
// kernel builds), a tile's outputs after its last stage - into the tile buffer by every lane, then out of it by
// every thread. Shared memory starts as 0xA5 bytes.
template <int GT, bool FMA, typename SZ, int BM>
void w4a8_wg_grid(const w8::Params& p, int sms) {
  using T = wgk::Tile<BM>;
  int lanes[128];
  for (int l = 0; l < 128; ++l) lanes[l] = l;
  std::vector<uint8_t> smem(T::kSmemBytes);
  std::vector<wgk::WgState<BM, 128>> st(2);
  wgk::HostWg wg;
  wg.base = smem.data();
  const int grid = wgk::grid_ctas<BM>(p.M, p.N, sms);
  const int stages = (p.K + wgk::kBK - 1) / wgk::kBK;
  auto copy = [&](std::vector<wgk::LoadCursor>& lc, int s, int cta) {
    uint8_t* stage = smem.data() + (s % T::kStages) * T::kStageBytes;
    for (int tid = 0; tid < wgk::kThreads; ++tid) {
      for (int i = 0; i < T::kPiecesX + wgk::kPiecesW; ++i) {
        int dst, bytes;
        const void* src;
        wgk::stage_piece<BM>(p, lc[tid].plan, lc[tid].kb, i, dst, src, bytes, wgk::narrow_w(p.K));
        std::memcpy(stage + dst, src, bytes);
        std::memset(stage + dst + bytes, 0, 16 - bytes);
      }
      wgk::load_step<BM>(p, stages, tid, lc[tid]);
    }
  };
  for (int cta = 0; cta < grid; ++cta) {
    std::fill(smem.begin(), smem.end(), static_cast<uint8_t>(0xA5));
    const int tiles = wgk::cta_tiles<BM>(p.M, p.N, cta, grid), total = tiles * stages;
    std::vector<wgk::LoadCursor> lc;
    for (int tid = 0; tid < wgk::kThreads; ++tid) lc.push_back(wgk::load_start<BM>(p, cta, grid, tid));
    for (int s = 0; s < T::kAhead && s < total; ++s) copy(lc, s, cta);
    int s = 0;
    wgk::TileWalk walk = wgk::walk_start<BM>(p.M, cta, grid);
    for (int t = 0; t < tiles; ++t, wgk::walk_next(walk)) {
      const int m0 = walk.bm * BM, n0 = walk.bn * wgk::kBN;
      for (int w = 0; w < 2; ++w) wgk::wg_init(p, n0 + 64 * w, 64 * w, lanes, st[w]);
      for (int kb = 0; kb < stages; ++kb, ++s) {
        if (s + T::kAhead < total) copy(lc, s + T::kAhead, cta);
        uint8_t* stage = smem.data() + (s % T::kStages) * T::kStageBytes;
        for (int w = 0; w < 2; ++w) wgk::wg_stage<GT, FMA, SZ, wgk::HostWg>(p, wg, stage, kb, st[w]);
      }
      uint8_t* tile = smem.data() + T::kStages * T::kStageBytes;
      for (int w = 0; w < 2; ++w) wgk::wg_tile_out(p, m0, n0, 64 * w, lanes, st[w], tile);
      for (int tid = 0; tid < wgk::kThreads; ++tid) wgk::tile_store<BM>(p, m0, n0, tile, tid);
    }
  }
}

template <bool FMA, typename SZ, int BM>
void w4a8_wg_groups(const w8::Params& p, int sms) {
  switch (wgk::static_group_tiles(p.G)) {  // the launcher's instantiations
    case 1: w4a8_wg_grid<1, FMA, SZ, BM>(p, sms); break;
    case 2: w4a8_wg_grid<2, FMA, SZ, BM>(p, sms); break;
    case 4: w4a8_wg_grid<4, FMA, SZ, BM>(p, sms); break;
    default: w4a8_wg_grid<0, FMA, SZ, BM>(p, sms);
  }
}

template <typename SZ>
void w4a8_wg_sz(const w8::Params& p, bool fma, int bm, int sms) {
  if (bm == 64)
    fma ? w4a8_wg_groups<true, SZ, 64>(p, sms) : w4a8_wg_groups<false, SZ, 64>(p, sms);
  else
    fma ? w4a8_wg_groups<true, SZ, 128>(p, sms) : w4a8_wg_groups<false, SZ, 128>(p, sms);
}

}  // namespace

namespace {

namespace w16 = minicpm_int4_w4a16_wg;

// The warpgroup-MMA W4A16 prefill GEMM (csrc/w4a16_wgmma.cu): its CTAs one after another, each through its stream of
// stages in the kernel's order - the first kAhead stages copied into the ring, both warpgroups' rows, scales and zero
// points and stage 0's A; then per stage: the next stage's scales and zero points loaded, each warpgroup's 4 wgmma on
// this stage (HostWg reading x through the descriptors the kernel builds, A from its set s % 2), the copy of the
// stage kAhead on into the previous stage's buffer, the next stage dequantized into the other set (dq_step crossing
// into the next tile as the kernel's cursor does). Persistent (p.splits == 1: grid_ctas for `sms` SMs), a tile's
// outputs after its last stage, into the tile buffer by every lane and out of it by every thread. Split-K (p.splits
// CTAs a tile, a cluster): each CTA of a cluster through its k-blocks (split_range) into its own shared memory, its
// partial tile written by every lane (part_out) - all of the cluster's, as its barrier makes them - then each CTA's
// share of the tile summed by every thread from all of them (split_reduce), the CTAs' shared memories side by side.
// Shared memory starts as 0xA5 bytes.
template <typename T, int BM, int GS>
void w4a16_wg_grid(const w16::Params<T>& p, int sms) {
  using TT = w16::Tile<BM>;
  int lanes[128];
  for (int l = 0; l < 128; ++l) lanes[l] = l;
  std::vector<w16::WgState<BM, 128, GS>> st(2);
  const int stages = p.K / w16::kBK;
  // CTA (cta, grid) of the tiles' walk, through k-blocks [kb0, kb1) of each of its tiles in `smem`; done(walk) after
  // each tile's last stage
  auto run = [&](std::vector<uint8_t>& smem, int cta, int grid, int kb0, int kb1, const auto& done) {
    std::fill(smem.begin(), smem.end(), static_cast<uint8_t>(0xA5));
    w16::HostWg hw;
    hw.base = smem.data();
    auto copy = [&](std::vector<w16::LoadCursor>& lc, int s) {
      uint8_t* stage = smem.data() + (s % TT::kStages) * TT::kStageBytes;
      for (int tid = 0; tid < w16::kThreads; ++tid) {
        for (int i = 0; i < TT::kPiecesX + 1; ++i) {
          int dst, bytes;
          const void* src;
          w16::stage_piece<T, BM>(p, lc[tid].plan, lc[tid].kb, i, dst, src, bytes);
          std::memcpy(stage + dst, src, bytes);
          std::memset(stage + dst + bytes, 0, 16 - bytes);
        }
        w16::load_step<T, BM>(p, kb0, kb1, tid, lc[tid]);
      }
    };
    const int tiles = w16::cta_tiles<BM>(p.M, p.N, cta, grid), total = tiles * (kb1 - kb0);
    std::vector<w16::LoadCursor> lc;
    for (int tid = 0; tid < w16::kThreads; ++tid) lc.push_back(w16::load_start<T, BM>(p, cta, grid, tid, kb0));
    for (int s = 0; s < TT::kAhead && s < total; ++s) copy(lc, s);
    std::vector<w16::DqCursor> dc(2, w16::DqCursor{w16::walk_start<BM>(p.M, cta, grid), kb0});
    for (int w = 0; w < 2; ++w) {
      w16::wg_rows(p, dc[w].w.bn * w16::kBN + 64 * w, 64 * w, lanes, st[w]);
      w16::load_sz(p, kb0, st[w]);
      w16::dequant_stage<T>(smem.data(), p.mask, st[w], st[w].a[0]);
      w16::dq_step(p, kb0, kb1, w, lanes, dc[w], st[w]);
    }
    int s = 0, buf = 0;
    w16::TileWalk walk = w16::walk_start<BM>(p.M, cta, grid);
    for (int t = 0; t < tiles; ++t, w16::walk_next(walk)) {
      for (int kb = kb0; kb < kb1; ++kb, ++s) {
        const int set = s & 1;
        for (int w = 0; w < 2; ++w) {
          if (s + 1 < total) w16::load_sz(p, dc[w].kb, st[w]);
          const uint32_t addr = hw.smem_addr(smem.data() + buf * TT::kStageBytes);
          for (int kt = 0; kt < 4; ++kt)
            hw.mma<T>(st[w].acc, st[w].a[set][kt], w16::x_desc<BM>(addr, kt), kb == kb0 && kt == 0);
        }
        if (s + 1 < total) {
          if (s + TT::kAhead < total) copy(lc, s + TT::kAhead);
          const int nbuf = buf == TT::kStages - 1 ? 0 : buf + 1;
          for (int w = 0; w < 2; ++w) {
            w16::dequant_stage<T>(smem.data() + nbuf * TT::kStageBytes, p.mask, st[w], st[w].a[set ^ 1]);
            w16::dq_step(p, kb0, kb1, w, lanes, dc[w], st[w]);
          }
        }
        buf = buf == TT::kStages - 1 ? 0 : buf + 1;
      }
      done(walk);
    }
  };
  if (p.splits == 1) {
    std::vector<uint8_t> smem(TT::kSmemBytes);
    const int grid = w16::grid_ctas<BM>(p.M, p.N, sms);
    for (int cta = 0; cta < grid; ++cta)
      run(smem, cta, grid, 0, stages, [&](const w16::TileWalk& walk) {
        uint8_t* tile = smem.data() + TT::kStages * TT::kStageBytes;
        for (int w = 0; w < 2; ++w) w16::tile_out(p, walk.bn * w16::kBN, 64 * w, lanes, st[w], tile);
        for (int tid = 0; tid < w16::kThreads; ++tid)
          w16::tile_store<T, BM>(p, walk.bm * BM, walk.bn * w16::kBN, tile, tid);
      });
    return;
  }
  if constexpr (BM == 128) {
    const int tiles = static_cast<int>(w16::blocks<128>(p.M, p.N));
    std::vector<std::vector<uint8_t>> smem(p.splits, std::vector<uint8_t>(TT::kSmemBytes));
    struct Parts {
      std::vector<std::vector<uint8_t>>* smem;
      const float* operator()(int rank) const { return reinterpret_cast<const float*>((*smem)[rank].data()); }
    };
    for (int tile = 0; tile < tiles; ++tile) {
      w16::TileWalk at{};
      for (int rank = 0; rank < p.splits; ++rank) {
        int kb0, kb1;
        w16::split_range(stages, p.splits, rank, kb0, kb1);
        run(smem[rank], tile, tiles, kb0, kb1, [&](const w16::TileWalk& walk) {
          at = walk;
          for (int w = 0; w < 2; ++w)
            w16::part_out(64 * w, lanes, st[w], reinterpret_cast<float*>(smem[rank].data()));
        });
      }
      for (int rank = 0; rank < p.splits; ++rank)
        for (int tid = 0; tid < w16::kThreads; ++tid)
          w16::split_reduce<T, BM>(p, at.bm * BM, at.bn * w16::kBN, Parts{&smem}, p.splits, rank, tid);
    }
  }
}

template <typename T>
void w4a16_wg_t(const w16::Params<T>& p, int bm, int sms) {
  const bool two = p.G == 32;
  if (bm == 256)
    two ? w4a16_wg_grid<T, 256, 2>(p, sms) : w4a16_wg_grid<T, 256, 1>(p, sms);
  else
    two ? w4a16_wg_grid<T, 128, 2>(p, sms) : w4a16_wg_grid<T, 128, 1>(p, sms);
}

}  // namespace

extern "C" {

// dtype 0 = fp16, 1 = bf16; rows = R for every slice (0: rows_per_block with `sms` SMs, as the
// launcher picks); input_scale: NULL or [K] of x's dtype. Returns 0, or -1 for a (slice rows, R)
// pair the kernel has no instantiation for.
int minicpm_int4_gemv_emulate(const void* x, const int32_t* qweight, const void* scales, const void* zeros,
                              const void* bias, void* out, int M, int N, int K, int group_size, long ldx, long ldo,
                              int dtype, int rows, int sms, const void* input_scale) {
  if (dtype == 0)
    return emulate<__half>(static_cast<const __half*>(x), qweight, static_cast<const __half*>(scales),
                           static_cast<const __half*>(zeros), static_cast<const __half*>(bias),
                           static_cast<__half*>(out), M, N, K, group_size, ldx, ldo, rows, sms,
                           static_cast<const __half*>(input_scale));
  return emulate<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), qweight,
                                static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros),
                                static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), M, N, K,
                                group_size, ldx, ldo, rows, sms, static_cast<const __nv_bfloat16*>(input_scale));
}

// The tensor-core kernel: tiles = N-tiles per block, warps = warps per block (0: as the launcher
// picks with `sms` SMs); input_scale as above; input_perm NULL or int32 [K] (x read through it);
// mode = 1 / 2: the launcher's variant 3 (two chunks of W ahead) / 4 (the ring in shared memory); 3: the
// ring reading its slots one copy group early (a control, no launcher variant).
// Returns 0, -1 for a tile count without an instantiation, -2 where the kernel does not apply,
// -3 for an input scale and a channel order together, or either with mode 1 or 2 (the launcher's
// cudaErrorInvalidValue).
int minicpm_int4_mma_emulate(const void* x, const int32_t* qweight, const void* scales, const void* zeros,
                             const void* bias, void* out, int M, int N, int K, int group_size, long ldx, long ldo,
                             int dtype, int tiles, int warps, int sms, const void* input_scale,
                             const int32_t* input_perm, int mode) {
  if (dtype == 0)
    return mma_emulate<__half>(static_cast<const __half*>(x), qweight, static_cast<const __half*>(scales),
                               static_cast<const __half*>(zeros), static_cast<const __half*>(bias),
                               static_cast<__half*>(out), M, N, K, group_size, ldx, ldo, tiles, warps, sms,
                               static_cast<const __half*>(input_scale), input_perm, mode);
  return mma_emulate<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x), qweight,
                                    static_cast<const __nv_bfloat16*>(scales), static_cast<const __nv_bfloat16*>(zeros),
                                    static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), M, N, K,
                                    group_size, ldx, ldo, tiles, warps, sms, static_cast<const __nv_bfloat16*>(input_scale),
                                    input_perm, mode);
}

int minicpm_int4_mma_supported(int K, int group_size) { return mm::mma_supported(K, group_size) ? 1 : 0; }
int minicpm_int4_mma_post_scale(int K, int group_size) { return mm::mma_post_scale(K, group_size) ? 1 : 0; }
int minicpm_int4_mma_tiles_per_block(int n, int sms) { return mm::mma_tiles_per_block(n, sms); }
int minicpm_int4_mma_warps_per_block(int n, int tiles, int sms) { return mm::mma_warps_per_block(n, tiles, sms); }
int minicpm_int4_mma_warps_for_launch(int warps, int rows, int scaled_or_permuted) {
  return mm::mma_warps_for_launch(warps, rows, scaled_or_permuted != 0);
}

// The activation quantizer; dtype 0 fp16, 1 bf16, 2 fp32; input_scale NULL or [K] of x's dtype;
// input_perm NULL or int32 [K]. Returns the path taken: -1 element by element, 0 vector path with a
// second read, U > 0 vector path with U pieces per thread in registers; -3 for an input scale and a
// channel order together (the launcher's cudaErrorInvalidValue).
int minicpm_int4_act_quant_emulate(const void* x, int8_t* xq, float* scale, int M, int K, long ldx, int dtype,
                                   int force_scalar, const void* input_scale, const int32_t* input_perm) {
  if (dtype == 0)
    return act_quant<__half>(static_cast<const __half*>(x), static_cast<const __half*>(input_scale), input_perm, xq,
                             scale, M, K, ldx, force_scalar);
  if (dtype == 1)
    return act_quant<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(x),
                                    static_cast<const __nv_bfloat16*>(input_scale), input_perm, xq, scale, M, K, ldx,
                                    force_scalar);
  return act_quant<float>(static_cast<const float*>(x), static_cast<const float*>(input_scale), input_perm, xq, scale,
                          M, K, ldx, force_scalar);
}

int minicpm_int4_gemv_chunk_shift(int K, int group_size) { return chunk_shift_for(K, group_size); }
int minicpm_int4_gemv_rows_per_block(int mt, int n, int sms) { return rows_per_block(mt, n, sms); }

// The W4A8 GEMM, as csrc/w4a8_gemm.cu's launcher takes it (dtypes 0 fp16, 1 bf16, 2 fp32; block_rows 0, 64 or
// 128, 0 choosing by `sms` SMs as the launcher does). Returns the rows per block it ran with, or -2 where the
// kernel does not apply (minicpm_int4_w4a8_supported) - the launcher's cudaErrorInvalidValue.
int minicpm_int4_w4a8_emulate(const int8_t* xq, const float* x_scale, const int32_t* qweight, const void* scales,
                              const void* zeros, const void* bias, void* out, int M, int N, int K, int group_size,
                              long ldo, int sz_dtype, int out_dtype, int block_rows, int sms) {
  if (!w8::supported(K, group_size) || N <= 0 || ldo < N || sz_dtype < 0 || sz_dtype > 2 ||
      (block_rows != 0 && block_rows != 64 && block_rows != 128))
    return -2;
  const w8::Params p{xq, x_scale, reinterpret_cast<const uint8_t*>(qweight), scales, zeros, bias, out, M, N, K,
                     group_size, w8::group_tiles_for(K, group_size), K / group_size, 0x0F0F0F0Fu, ldo, sz_dtype, out_dtype};
  const int wm = w8::block_warps_m(M, N, sms, block_rows / w8::kWarpRows);
  if (sz_dtype == 0)
    w4a8_sz<__half>(p, wm);
  else if (sz_dtype == 1)
    w4a8_sz<__nv_bfloat16>(p, wm);
  else
    w4a8_sz<float>(p, wm);
  return wm * w8::kWarpRows;
}

int minicpm_int4_w4a8_supported(int K, int group_size) { return w8::supported(K, group_size) ? 1 : 0; }
int minicpm_int4_w4a8_magic_convert(int group_size) { return w8::magic_convert(group_size) ? 1 : 0; }
int minicpm_int4_w4a8_static_group_tiles(int K, int group_size) { return w8::static_group_tiles(K, group_size); }
int minicpm_int4_w4a8_block_tile(int pid, int M, int N, int block_rows) {
  int bm, bn;
  if (block_rows == 64)
    w8::block_tile<1>(pid, M, N, bm, bn);
  else
    w8::block_tile<2>(pid, M, N, bm, bn);
  return bm * 65536 + bn;
}
int minicpm_int4_w4a8_block_rows(int M, int N, int sms) { return w8::block_warps_m(M, N, sms, 0) * w8::kWarpRows; }

// The warpgroup-MMA kernel on the host: arguments as minicpm_int4_w4a8_emulate's, fma = 1 for the fused epilogue
// (the op's kernel=3), block_tokens 64 / 128 or 0 for the launcher's choice (wgk::block_tokens), sms: the SMs its
// persistent CTAs are sized for; returns the CTAs x 256 + the tokens a block, or -2 where the kernel does not take
// the shape (its launcher's cudaErrorInvalidValue).
int minicpm_int4_w4a8_wgmma_emulate(const int8_t* xq, const float* x_scale, const int32_t* qweight, const void* scales,
                                    const void* zeros, const void* bias, void* out, int M, int N, int K, int group_size,
                                    long ldo, int sz_dtype, int out_dtype, int fma, int block_tokens, int sms) {
  if (!wgk::supported(K, group_size) || M <= 0 || N <= 0 || ldo < N || sz_dtype < 0 || sz_dtype > 2 || sms <= 0 ||
      (block_tokens != 0 && block_tokens != 64 && block_tokens != 128))
    return -2;
  const int bm = block_tokens != 0 ? block_tokens : wgk::block_tokens(M, N, sms);
  const w8::Params p{xq, x_scale, reinterpret_cast<const uint8_t*>(qweight), scales, zeros, bias, out, M, N, K,
                     group_size, w8::group_tiles_for(K, group_size), K / group_size, 0x0F0F0F0Fu, ldo, sz_dtype, out_dtype};
  if (sz_dtype == 0)
    w4a8_wg_sz<__half>(p, fma != 0, bm, sms);
  else if (sz_dtype == 1)
    w4a8_wg_sz<__nv_bfloat16>(p, fma != 0, bm, sms);
  else
    w4a8_wg_sz<float>(p, fma != 0, bm, sms);
  return (bm == 64 ? wgk::grid_ctas<64>(M, N, sms) : wgk::grid_ctas<128>(M, N, sms)) * 256 + bm;
}
int minicpm_int4_w4a8_wgmma_supported(int K, int group_size) { return wgk::supported(K, group_size) ? 1 : 0; }
// Tile t of CTA cta of `grid` for BM tokens a block (TileWalk, as the kernel walks them): bm * 65536 + bn.
int minicpm_int4_w4a8_wgmma_tile(int BM, int M, int cta, int grid, int t) {
  wgk::TileWalk w = BM == 64 ? wgk::walk_start<64>(M, cta, grid) : wgk::walk_start<128>(M, cta, grid);
  for (int i = 0; i < t; ++i) wgk::walk_next(w);
  return w.bm * 65536 + w.bn;
}
int minicpm_int4_w4a8_wgmma_cta_tiles(int BM, int M, int N, int cta, int grid) {
  return BM == 64 ? wgk::cta_tiles<64>(M, N, cta, grid) : wgk::cta_tiles<128>(M, N, cta, grid);
}
int minicpm_int4_w4a8_wgmma_grid(int BM, int M, int N, int sms) {
  return BM == 64 ? wgk::grid_ctas<64>(M, N, sms) : wgk::grid_ctas<128>(M, N, sms);
}
int minicpm_int4_w4a8_wgmma_block_tokens(int M, int N, int sms) { return wgk::block_tokens(M, N, sms); }

// The W4A16 warpgroup-MMA kernel on the host: x [M, K] (row stride ldx), the canonical qweight, scales / zeros of x's
// dtype (dtype 0 fp16, 1 bf16), bias or NULL, out [M, N] (row stride ldo); block_tokens 128 / 256 or 0 for the
// kernel's rule (w16::block_tokens), split 0 for its rule (w16::split_k), 1 none, 2 / 4 / 8 forced - as the launcher
// takes them (but for the GPU's cluster occupancy, which it may lower the rule's split by); sms: the SMs its CTAs are
// sized for. Returns the CTAs x 1024 + the tokens a block + the CTAs a tile (the splits), or -2 where the
// kernel does not take the arguments (its launcher's cudaErrorInvalidValue).
int minicpm_int4_w4a16_wgmma_emulate(const void* x, const int32_t* qweight, const void* scales, const void* zeros,
                                     const void* bias, void* out, int M, int N, int K, int group_size, long ldx, long ldo,
                                     int dtype, int block_tokens, int split, int sms) {
  if (!w16::args_ok(M, N, K, group_size, ldx, ldo, dtype, block_tokens, split, sms)) return -2;
  int bm, splits;
  w16::plan(M, N, K, sms, block_tokens, split, true, true, bm, splits);
  if (dtype == 0)
    w4a16_wg_t(w16::make_params<__half>(x, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo, splits), bm,
               sms);
  else
    w4a16_wg_t(w16::make_params<__nv_bfloat16>(x, qweight, scales, zeros, bias, out, M, N, K, group_size, ldx, ldo,
                                               splits), bm, sms);
  const long ctas = splits > 1 ? w16::blocks<128>(M, N) * splits
                               : (bm == 256 ? w16::grid_ctas<256>(M, N, sms) : w16::grid_ctas<128>(M, N, sms));
  return static_cast<int>(ctas) * 1024 + bm + splits;
}
int minicpm_int4_w4a16_wgmma_supported(int K, int group_size) { return w16::supported(K, group_size) ? 1 : 0; }
int minicpm_int4_w4a16_wgmma_block_tokens(int M, int N, int sms) { return w16::block_tokens(M, N, sms); }  // the rule
int minicpm_int4_w4a16_wgmma_split_k(int M, int N, int K, int sms) { return w16::split_k(M, N, K, sms); }  // the rule

}  // extern "C"
