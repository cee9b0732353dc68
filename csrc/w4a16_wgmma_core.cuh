// The W4A16 prefill GEMM on Hopper's warpgroup MMA (csrc/w4a16_wgmma.cu, sm_90a), written once for the device and
// the host like the other *_core.cuh: on the GPU each thread runs it for its own lane (L = 1, the wgmma real); the
// tests' emulation (tests/csrc/host_emu.cu) runs it for all 128 lanes of a warpgroup (L = 128, the wgmma emulated
// from the PTX ISA's layouts), so the fragment and descriptor bookkeeping is tested in CI without a GPU.
//
//   y[m, n] = round(sum_k x[m, k] * w[n, k] + bias[n]),  w[n, k] = (q[n, k] - z[n, g]) * s[n, g] rounded to x's dtype
//
// - the reference's dequantized weight bit for bit (q - z is exact in the magic-number arithmetic, the product
// rounded once), its products exact in the tensor cores' fp32 sums, summed over all of K in one chain of wgmma - no
// per-group epilogue (the group's scale is in the weight), so the tensor cores are never stopped inside a tile.
//
// The operands as in the W4A8 kernel (w4a8_wgmma_core.cuh): W is the wgmma's A, 64 rows a warpgroup, dequantized
// into registers from the packed nibbles (no fp16 copy of W is ever written to memory, shared or global), and x's
// tokens are its N (BM: 128 or 256), read by the tensor cores from shared memory as cp.async left them.
// wgmma.mma_async.m64n{BM}k16.f32.{f16,bf16}, A in registers (PTX ISA; the per-warp layout of mma.m16n8k16's A):
//   A: lane l of warp w (g = l / 4, t = l % 4): a0 = row 16w + g, k 2t, 2t + 1; a1 = row 16w + g + 8, the same k;
//      a2 / a3 = those rows, k 2t + 8, 2t + 9 (two elements a register, the lower k in the low half)
//   B: in shared memory, K-major without swizzle: core matrices of 8 tokens x 16 bytes (8 elements) of k, the next
//      8 elements of k LBO bytes on, the next 8 tokens SBO bytes on
//   D: d[4c + e] = row 16w + g + 8 (e / 2), token 8c + 2t + (e % 2), c = 0..BM/8 - 1
// A stage is 64 k: x as 8 chunks of 16 bytes (8 elements) of k, each chunk the block's BM tokens x 16 bytes
// (kChunk = 16 BM bytes; LBO = kChunk, SBO = 128; k-tile kt's descriptor starts at chunk 2 kt - the W4A8 stage's
// layout, whose 128 bytes of k are 128 int8 there and 64 fp16 here), and W as 128 rows x 32 packed bytes.
//
// A's registers from the packed row (the canonical layout: word j of a stage's 8 = k 8j..8j + 7, nibble i = k 8j + i):
// k-tile kt is words 2kt (k 0..7 of the tile) and 2kt + 1 (k 8..15); lane t needs k 2t, 2t + 1 - byte t of word
// 2kt - and k 2t + 8, 2t + 9 - byte t of word 2kt + 1. One PRMT makes v = (byte t of word 2kt, byte t of word 2kt + 1,
// the same two again); then
//   fp16: (v & 0x00F0000F) | 0x64006400 = (1024 + q[2t], 1024 + 16 q[2t + 1]) -> one HFMA2 by (1, 1/16) minus
//         (1024 + z, 64 + z) gives (q - z) for both, exactly; v >> 8 the same for k 2t + 8, 2t + 9;
//   bf16: its 7-bit mantissa has no room for 16 q: (v & 0xF) | ((v >> 4) & 0xF0000) | 0x43004300 = (128 + q, 128 + q')
//         then minus (128 + z);
// and one HFMA2 by (s, s) plus -0 rounds (q - z) * s once - the reference's weight.
//
// Block: 2 warpgroups (256 threads), a 128 (rows of W) x BM (tokens) tile of the output transposed, each warpgroup 64
// rows. K in stages of 64 through a ring of kStages buffers, kStages - 1 in flight. Each warpgroup keeps one stage's
// wgmma in flight while it dequantizes the next stage's A into its other set of registers: issue stage s (4 wgmma,
// A set s % 2), wait until only those are pending (stage s - 1's are done: its A set and, once both warpgroups are
// past the block barrier, its buffer free), barrier, refill that buffer with stage s + kStages - 1, dequantize stage
// s + 1 into A set (s + 1) % 2. The accumulators stay in the tensor cores' chain from a tile's first k-tile (scale-d
// 0) to its last; a tile's outputs leave through shared memory (tile_out, tile_store). Persistent CTAs walk their
// tiles as one stream of stages (the W4A8 kernel's TileWalk), the copies running ahead across tiles' boundaries.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "hd_common.cuh"
#include "w4a16_mma_core.cuh"
#include "w4a8_wgmma_core.cuh"

namespace minicpm_int4_w4a16_wg {

using minicpm_int4_hd::byte_perm;
using minicpm_int4_hd::ldg;
using minicpm_int4_mma::fma2;
using minicpm_int4_mma::pack2;
using minicpm_int4_mma::Pair;
using minicpm_int4_mma::splat;
// the persistent CTAs' grid and walk over 128-row W blocks x BM-token blocks: the W4A8 kernel's (its BM only sizes
// the blocks: 256 here too)
using minicpm_int4_w4a8_wg::blocks;
using minicpm_int4_w4a8_wg::cta_tiles;
using minicpm_int4_w4a8_wg::grid_ctas;
using minicpm_int4_w4a8_wg::TileWalk;
using minicpm_int4_w4a8_wg::walk_next;
using minicpm_int4_w4a8_wg::walk_start;

constexpr int kBN = minicpm_int4_w4a8_wg::kBN;  // rows of W per block (2 warpgroups x 64): 128
constexpr int kBK = 64;                         // k per stage
constexpr int kKT = 16;                         // k per wgmma
constexpr int kThreads = 256;
constexpr int kSBO = 128;                       // bytes between 8-token core matrices
constexpr int kStrideW = kBK / 2;               // bytes per row of packed W a stage: 32 (a warp's 8 rows a phase
                                                // of 16-byte loads, 2 rows of them, land on distinct banks)
constexpr int kOutStride = kBN * 2 + 16;        // bytes per token of the output tile in shared memory (+16: a lane
                                                // quad's tokens 2t land on distinct bank groups)
static_assert(kBN * kStrideW / 16 == kThreads, "one 16-byte piece of W a thread a stage");

template <int BM>
struct Tile {
  static_assert(BM == 128 || BM == 256, "128 or 256 tokens a block: the wgmma's N");
  static constexpr int kBM = BM;
  static constexpr int kStages = BM == 128 ? 6 : 4;  // 20 / 36 KiB a stage
  static constexpr int kAhead = kStages - 1;         // stages in flight: a buffer is refilled once both warpgroups
                                                     // are done with the stage it held
  static constexpr int kChunk = BM * 16;             // bytes of one 8-element k chunk of the block's tokens: the LBO
  static constexpr int kStageX = (kBK / 8) * kChunk;  // 16384 / 32768
  static constexpr int kStageBytes = kStageX + kBN * kStrideW;
  static constexpr int kOutBytes = BM * kOutStride;  // the output tile, after the ring
  static constexpr int kSmemBytes = kStages * kStageBytes + kOutBytes;  // 157696 / 217088: opted in by the launcher
  static constexpr int kAcc = BM / 2;                // fp32 accumulators a thread: 64 / 128
  static constexpr int kPiecesX = BM * 8 / kThreads;  // 16-byte pieces of x a thread a stage: 4 / 8
};
static_assert(Tile<128>::kSmemBytes <= 232448 && Tile<256>::kSmemBytes <= 232448, "sm_90's 227 KiB a block");

// What the kernel takes: K a multiple of 64 (whole stages; rows of packed W 32-byte aligned) and a group of 32, or a
// power of two from 64 dividing K (one or two groups a stage; a stage's group found by a shift), or per channel
// (G = K).
inline bool supported(int K, int G) {
  return K > 0 && K % kBK == 0 && G > 0 && K % G == 0 && (G == 32 || G == K || (G >= kBK && (G & (G - 1)) == 0));
}
// The shift that gives a stage's group from its first k (k >> shift): log2 G, or 31 per channel (every k < 2**31 in
// group 0); G = 32 (two groups a stage) does not use it.
inline int group_shift(int K, int G) {
  if (G == K) return 31;
  int shift = 0;
  while ((1 << shift) < G) ++shift;
  return shift;
}

// Tokens a block: 256 (m64n256k16: the tensor cores' work a stage doubles, W's copy and dequantization per stage do
// not) where the 256-token tiles fill as many waves of the SMs as 128-token ones would, else 128 (M <= 128, or a grid
// that 256-token tiles would leave with fewer waves' worth of CTAs busy: cost model, waves x a tile's relative time,
// 256-token tiles 1.8x a 128-token one's - a static rule until the bench's w4a16-cuda-wgmma rows replace it).
MINICPM_HD int block_tokens(int M, int N, int sms) {
  if (M <= 128 || sms <= 0) return 128;
  const long w128 = (blocks<128>(M, N) + sms - 1) / sms, w256 = (blocks<256>(M, N) + sms - 1) / sms;
  return w256 * 18 <= w128 * 10 ? 256 : 128;
}

// ---- split-K: a grid under one wave of tiles ----------------------------------------------------------------------
// Where the 128-token tiles are too few to fill the SMs (M <= 128, or M = 256 on a 4096-wide layer: 64 tiles on 132
// SMs), each tile is computed by a cluster of `splits` CTAs (2, 4 or 8; thread block clusters, sm_90), CTA r of it
// summing k-blocks [stages r / splits, stages (r + 1) / splits): a decode-sized M is W-bound, and a tile a CTA
// would leave most SMs - and most of HBM's bandwidth - idle. Each CTA writes its partial sums to its own shared
// memory (part_out: fp32, the ring's space, free by then); after the cluster's barrier CTA r reads a share of the
// tile from every CTA of the cluster (distributed shared memory), adds them in rank order - the same order whichever
// CTA finishes first: deterministic -, adds the bias, rounds once and stores (split_reduce). No workspace in global
// memory, no second kernel, no atomics. The largest power of two up to kMaxSplit that keeps tiles x splits within
// the SMs and at least kMinSplitStages stages a CTA (a CTA's pipeline fill and the reduction cost a few stages'
// time); the launcher takes fewer where the GPU fits fewer such clusters at once (cudaOccupancyMaxActiveClusters).
// 128-token blocks only (a grid under one wave never takes 256: block_tokens).
constexpr int kMaxSplit = 8;        // the portable cluster size
constexpr int kMinSplitStages = 4;  // 256 k a CTA at least
MINICPM_HD int split_k(int M, int N, int K, int sms) {
  const long tiles = blocks<128>(M, N);
  const int stages = K / kBK;
  int s = 1;
  while (2 * s <= kMaxSplit && tiles * 2 * s <= sms && stages / (2 * s) >= kMinSplitStages) s *= 2;
  return s;
}
// CTA `rank` of a tile's `splits`: its k-blocks [kb0, kb1).
MINICPM_HD void split_range(int stages, int splits, int rank, int& kb0, int& kb1) {
  kb0 = static_cast<int>(static_cast<long>(stages) * rank / splits);
  kb1 = static_cast<int>(static_cast<long>(stages) * (rank + 1) / splits);
}
constexpr int kPartStride = kBN + 4;  // floats a token in a CTA's partial tile [token][row of W]: + 4, so that a
                                      // warp's 32 lanes (rows g, tokens 2t) write 32 distinct banks
static_assert(128 * kPartStride * 4 <= Tile<128>::kStages * Tile<128>::kStageBytes, "a partial tile in the ring");

template <typename T>
struct Params {
  const T* x;             // [M, K], row stride ldx (a multiple of 8), 16-byte aligned
  const uint8_t* qb;      // the packed weight's bytes [N, K/2], 16-byte aligned
  const T* scales;        // [N, K/G]
  const T* zeros;         // [N, K/G], integer values 0..15
  const T* bias;          // [N], or nullptr
  T* out;                 // [M, N], row stride ldo
  int M, N, K, G;
  int groups;             // K / G: the row stride of scales and zeros
  int gshift;             // group_shift(K, G)
  long ldx, ldo;
  uint32_t mask;          // fp16: 0x00F0000F, bf16: 0x0000000F - passed at run time so that the masks stay one LOP3
  int splits = 1;         // CTAs a tile (split-K over a cluster: split_k), 1: a tile a CTA, persistent
};

// The launcher's arguments (w4a16_wgmma.cu launch; the emulation takes the same): whether the kernel takes them -
// block_tokens (plan's tokens) 0 for the rule, 128 or 256; split 0 (the rule), 1 (none) or 2 / 4 / 8 CTAs a tile, with 128-token
// blocks and a k-block or more a CTA - and then its plan: the tokens a block and the CTAs a tile. wide: 256-token
// blocks allowed by the rule, may_split: split-K allowed by it (the launcher's environment switches).
inline bool args_ok(int M, int N, int K, int G, long ldx, long ldo, int dtype, int block_tokens, int split, int sms) {
  return supported(K, G) && M > 0 && N > 0 && sms > 0 && ldx >= K && ldx % 8 == 0 && ldo >= N &&
         (dtype == 0 || dtype == 1) && (block_tokens == 0 || block_tokens == 128 || block_tokens == 256) &&
         (split == 0 || split == 1 || split == 2 || split == 4 || split == 8) &&
         (split <= 1 || (block_tokens != 256 && K / kBK >= split));
}
inline void plan(int M, int N, int K, int sms, int tokens, int split, bool wide, bool may_split, int& bm,
                 int& splits) {
  bm = split > 1 ? 128 : tokens != 0 ? tokens : wide ? block_tokens(M, N, sms) : 128;
  splits = split > 1 ? split : split == 0 && bm == 128 && may_split ? split_k(M, N, K, sms) : 1;
}

// The kernel's parameters for x's dtype T (the nibble mask its dequantization takes: fp16 0x00F0000F, bf16 0xF).
template <typename T>
Params<T> make_params(const void* x, const int32_t* qweight, const void* scales, const void* zeros, const void* bias,
                      void* out, int M, int N, int K, int G, long ldx, long ldo, int splits) {
  Params<T> p{static_cast<const T*>(x), reinterpret_cast<const uint8_t*>(qweight), static_cast<const T*>(scales),
              static_cast<const T*>(zeros), static_cast<const T*>(bias), static_cast<T*>(out), M, N, K, G, K / G,
              group_shift(K, G), ldx, ldo, std::is_same<T, __half>::value ? 0x00F0000Fu : 0x0000000Fu};
  p.splits = splits;
  return p;
}

// ---- copies: the 16-byte pieces thread tid copies each stage ----------------------------------------------------
// x: piece u = tid + 256 i (i < BM / 32) is token tok0 + 32 i (tok0 = 8 (tid / 64) + tid % 8), chunk (tid / 8) % 8;
// W: row tid / 2, bytes 16 (tid % 2) of the row's 32. Zero-filled past M and N (K is whole stages).
struct CopyPlan {
  const uint8_t* x;    // the first x piece's source at k = 0
  const uint8_t* w;    // the W piece's
  int dstx, dstw;      // their offsets in a stage
  long xstep;          // bytes between x pieces i and i + 1 (32 tokens)
  unsigned rows_ok;    // bit i: piece i's token inside M (i < kPiecesX); bit kPiecesX: the W row inside N
};

template <typename T, int BM>
MINICPM_HD CopyPlan copy_plan(const Params<T>& p, int m0, int n0, int tid) {
  using TT = Tile<BM>;
  CopyPlan c;
  const int tok0 = 8 * (tid / 64) + tid % 8, chunk = (tid / 8) % 8, row = tid / 2, half = tid % 2;
  c.x = reinterpret_cast<const uint8_t*>(p.x + static_cast<long>(m0 + tok0) * p.ldx + 8 * chunk);
  c.w = p.qb + static_cast<long>(n0 + row) * (p.K / 2) + 16 * half;
  c.dstx = chunk * TT::kChunk + 16 * tok0;
  c.dstw = TT::kStageX + row * kStrideW + 16 * half;
  c.xstep = 32 * p.ldx * static_cast<long>(sizeof(T));
  c.rows_ok = 0;
  MINICPM_UNROLL
  for (int i = 0; i < TT::kPiecesX; ++i) c.rows_ok |= static_cast<unsigned>(m0 + tok0 + 32 * i < p.M) << i;
  c.rows_ok |= static_cast<unsigned>(n0 + row < p.N) << TT::kPiecesX;
  return c;
}

// Piece i (x: i < kPiecesX; then W) of k-block kb: its offset in the stage, source and bytes (16, or 0: zero-filled,
// src then a valid address that is not read).
template <typename T, int BM>
MINICPM_HD void stage_piece(const Params<T>& p, const CopyPlan& c, int kb, int i, int& dst, const void*& src,
                            int& bytes) {
  constexpr int kPiecesX = Tile<BM>::kPiecesX;
  const bool ok = (c.rows_ok >> i) & 1;
  bytes = ok ? 16 : 0;
  if (i < kPiecesX) {
    dst = c.dstx + 16 * 32 * i;
    src = ok ? static_cast<const void*>(c.x + c.xstep * i + static_cast<long>(kb) * kBK * static_cast<long>(sizeof(T)))
             : static_cast<const void*>(p.x);
  } else {
    dst = c.dstw;
    src = ok ? static_cast<const void*>(c.w + static_cast<long>(kb) * (kBK / 2)) : static_cast<const void*>(p.qb);
  }
}

// The load side of a CTA's stream: the next stage to copy - its tile and k-block - and that tile's copy plan.
struct LoadCursor {
  int kb;
  TileWalk w;
  CopyPlan plan;
};

// (cta, grid: the CTA's place among the tiles' CTAs - its cluster's under split-K, one tile each -; kb0: the
// first k-block it sums, kb1 the end: a tile's K is [kb0, kb1), all of it (0, stages) but under split-K)
template <typename T, int BM>
MINICPM_HD LoadCursor load_start(const Params<T>& p, int cta, int grid, int tid, int kb0) {
  LoadCursor c;
  c.kb = kb0;
  c.w = walk_start<BM>(p.M, cta, grid);
  c.plan = copy_plan<T, BM>(p, c.w.bm * BM, c.w.bn * kBN, tid);
  return c;
}

template <typename T, int BM>
MINICPM_HD void load_step(const Params<T>& p, int kb0, int kb1, int tid, LoadCursor& c) {
  if (++c.kb < kb1) return;
  c.kb = kb0;
  walk_next(c.w);
  c.plan = copy_plan<T, BM>(p, c.w.bm * BM, c.w.bn * kBN, tid);
}

// The descriptor of k-tile kt of a stage's x (no swizzle, K-major): start, LBO = kChunk, SBO = 128, each >> 4.
template <int BM>
MINICPM_HD uint64_t x_desc(uint32_t addr, int kt) {
  constexpr int kChunk = Tile<BM>::kChunk;
  return minicpm_int4_hd::wgmma_desc(addr + 2 * kt * kChunk, kChunk, kSBO);
}

// ---- a warpgroup's registers: L lanes of them (1 on the device, 128 in the emulation) ----------------------------
// GS: groups a stage, 1 (G a multiple of 64, or per channel) or 2 (G = 32: k-tiles 0, 1 and 2, 3).
template <int BM, int L, int GS>
struct WgState {
  float acc[L][Tile<BM>::kAcc];  // the tile's sums (the wgmma's D)
  uint32_t a[2][4][L][4];        // two sets of A: 4 k-tiles each
  uint32_t sraw[GS][2][L];       // the next stage's scale and zero point bits, rows g and g + 8 (loaded a step early)
  uint32_t zraw[GS][2][L];
  int row[2][L];                 // offsets of the lane's rows in scales / zeros (rows past N read row N - 1)
  int aoff[2][L];                // offsets in a stage's W of the lane's rows (g, g + 8)
  uint32_t sel[L];               // the PRMT selector: byte t of the first word, byte t of the second, twice
};

// The warpgroup's rows for a tile: n0w its first row of W, w_rows its first in the block's tile; lanes[l]: 0..127.
template <typename T, int BM, int L, int GS>
MINICPM_HD void wg_rows(const Params<T>& p, int n0w, int w_rows, const int (&lanes)[L], WgState<BM, L, GS>& st) {
  for (int l = 0; l < L; ++l) {
    const int lane = lanes[l] & 31, g = lane >> 2, t = lane & 3, r = 16 * (lanes[l] >> 5) + g;
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h) {
      st.row[h][l] = (n0w + r + 8 * h < p.N ? n0w + r + 8 * h : p.N - 1) * p.groups;
      st.aoff[h][l] = Tile<BM>::kStageX + (w_rows + r + 8 * h) * kStrideW;
    }
    st.sel[l] = static_cast<uint32_t>(t | (4 + t) << 4 | t << 8 | (4 + t) << 12);
  }
}

// The dequantization side of a CTA's stream: the tile and k-block of the next stage to dequantize (its rows' scales
// and zero points are loaded a step before it is); dq_step moves it on, the warpgroup's rows for a new tile.
struct DqCursor {
  TileWalk w;
  int kb;
};

template <typename T, int BM, int L, int GS>
MINICPM_HD void dq_step(const Params<T>& p, int kb0, int kb1, int wgi, const int (&lanes)[L], DqCursor& c,
                        WgState<BM, L, GS>& st) {
  if (++c.kb < kb1) return;
  c.kb = kb0;
  walk_next(c.w);
  wg_rows(p, c.w.bn * kBN + 64 * wgi, 64 * wgi, lanes, st);
}

// The scale and zero point bits of k-block kb's group(s) for the lane's rows (2-byte loads, raw: turned into the
// dequantization's constants when used, a step later).
template <typename T, int BM, int L, int GS>
MINICPM_HD void load_sz(const Params<T>& p, int kb, WgState<BM, L, GS>& st) {
  const unsigned short* s = reinterpret_cast<const unsigned short*>(p.scales);
  const unsigned short* z = reinterpret_cast<const unsigned short*>(p.zeros);
  for (int l = 0; l < L; ++l)
    MINICPM_UNROLL
    for (int j = 0; j < GS; ++j) {
      const int grp = GS == 2 ? 2 * kb + j : (kb * kBK) >> p.gshift;
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        st.sraw[j][h][l] = ldg(s + st.row[h][l] + grp);
        st.zraw[j][h][l] = ldg(z + st.row[h][l] + grp);
      }
    }
}

// A set `set` from the stage's packed W: 4 k-tiles x the lane's 4 registers, (q - z) * s rounded to T.
template <typename T, int BM, int L, int GS>
MINICPM_HD void dequant_stage(const uint8_t* stage, uint32_t mask, WgState<BM, L, GS>& st, uint32_t (*a)[L][4]) {
  constexpr bool kHalf = std::is_same<T, __half>::value;
  const uint32_t minus_zero = 0x80008000u;  // x + (-0) = x for every x, zeros included
  for (int l = 0; l < L; ++l)
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h) {
      uint32_t w[8];
#ifdef __CUDA_ARCH__
      const uint4 lo = *reinterpret_cast<const uint4*>(stage + st.aoff[h][l]);
      const uint4 hi = *reinterpret_cast<const uint4*>(stage + st.aoff[h][l] + 16);
      w[0] = lo.x, w[1] = lo.y, w[2] = lo.z, w[3] = lo.w, w[4] = hi.x, w[5] = hi.y, w[6] = hi.z, w[7] = hi.w;
#else
      std::memcpy(w, stage + st.aoff[h][l], 32);
#endif
      MINICPM_UNROLL
      for (int j = 0; j < GS; ++j) {
        // the group's constants: -(magic + z) exact in one fma (z an integer 0..15), the scale in both halves
        const uint32_t z2 = pack2(st.zraw[j][h][l], st.zraw[j][h][l]), s2 = pack2(st.sraw[j][h][l], st.sraw[j][h][l]);
        const uint32_t minus_one = splat<T>(-1.f);
        uint32_t zc, mul;
        if constexpr (kHalf) {
          zc = fma2<T>(z2, minus_one, pack2(Pair<T>::bits(-1024.f), Pair<T>::bits(-64.f)));  // (-(1024 + z), -(64 + z))
          mul = pack2(Pair<T>::bits(1.f), Pair<T>::bits(1.f / 16.f));
        } else {
          zc = fma2<T>(z2, minus_one, splat<T>(-128.f));
          mul = splat<T>(1.f);
        }
        MINICPM_UNROLL
        for (int kk = 0; kk < 4 / GS; ++kk) {
          const int kt = j * (4 / GS) + kk;
          const uint32_t v = byte_perm(w[2 * kt], w[2 * kt + 1], st.sel[l]);
          uint32_t q0, q1;
          if constexpr (kHalf) {
            q0 = (v & mask) | Pair<T>::kMagic;
            q1 = ((v >> 8) & mask) | Pair<T>::kMagic;
          } else {
            const uint32_t u = v >> 4;
            q0 = (v & mask) | (u & (mask << 16)) | Pair<T>::kMagic;
            q1 = ((v >> 8) & mask) | ((u >> 8) & (mask << 16)) | Pair<T>::kMagic;
          }
          a[kt][l][h] = fma2<T>(fma2<T>(q0, mul, zc), s2, minus_zero);      // k 2t, 2t + 1 (a0 / a1: rows g / g + 8)
          a[kt][l][2 + h] = fma2<T>(fma2<T>(q1, mul, zc), s2, minus_zero);  // k 2t + 8, 2t + 9 (a2 / a3)
        }
      }
    }
}

// ---- the output tile --------------------------------------------------------------------------------------------
// Each lane's sums + bias, rounded to T (the reference's fp32 add, then its cast), into the tile [token][row of W]
// (kOutStride bytes a token); tile_store then copies it out 16 bytes at a time.
template <typename T, int BM, int L, int GS>
MINICPM_HD void tile_out(const Params<T>& p, int n0, int wrow, const int (&lanes)[L], const WgState<BM, L, GS>& st,
                         uint8_t* tile) {
  for (int l = 0; l < L; ++l) {
    const int lane = lanes[l] & 31, g = lane >> 2, t = lane & 3, r = wrow + 16 * (lanes[l] >> 5) + g;
    float bs[2];
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h)
      bs[h] = p.bias != nullptr && n0 + r + 8 * h < p.N ? Pair<T>::to_f32(ldg(p.bias + n0 + r + 8 * h)) : 0.f;
    MINICPM_UNROLL
    for (int c = 0; c < BM / 8; ++c)
      MINICPM_UNROLL
      for (int e = 0; e < 4; ++e) {
        float v = st.acc[l][4 * c + e];
        if (p.bias != nullptr) v = v + bs[e >> 1];
        const int tok = 8 * c + 2 * t + (e & 1), row = r + 8 * (e >> 1);
        const T o = Pair<T>::from_f32(v);
#ifdef __CUDA_ARCH__
        *reinterpret_cast<T*>(tile + tok * kOutStride + 2 * row) = o;
#else
        std::memcpy(tile + tok * kOutStride + 2 * row, &o, 2);
#endif
      }
  }
}

// Thread tid's share of the tile: 16-byte pieces u = tid + 256 i of the BM tokens x 256 bytes, token u / 16, piece
// u % 16 of its row; element by element where out's rows are not 16-byte aligned or at N's edge.
template <typename T, int BM>
MINICPM_HD void tile_store(const Params<T>& p, int m0, int n0, const uint8_t* tile, int tid) {
  const bool vec = ((reinterpret_cast<uintptr_t>(p.out) | static_cast<uintptr_t>(p.ldo * 2)) & 15) == 0;
  for (int u = tid; u < BM * 16; u += kThreads) {
    const int tok = u / 16, col = (u % 16) * 8, m = m0 + tok, n = n0 + col;
    if (m >= p.M || n >= p.N) continue;
    const uint8_t* src = tile + tok * kOutStride + col * 2;
    uint8_t* dst = reinterpret_cast<uint8_t*>(p.out + static_cast<long>(m) * p.ldo + n);
    if (vec && n + 8 <= p.N) {
#ifdef __CUDA_ARCH__
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
      std::memcpy(dst, src, 16);
#endif
    } else {
      const int left = p.N - n < 8 ? p.N - n : 8;
      for (int j = 0; j < 2 * left; ++j) dst[j] = src[j];
    }
  }
}

// ---- split-K's partial tiles and their sum ----------------------------------------------------------------------
// Each lane's fp32 sums as they are into the CTA's partial tile [token][row of W] (kPartStride floats a token).
template <int BM, int L, int GS>
MINICPM_HD void part_out(int wrow, const int (&lanes)[L], const WgState<BM, L, GS>& st, float* part) {
  for (int l = 0; l < L; ++l) {
    const int lane = lanes[l] & 31, g = lane >> 2, t = lane & 3, r = wrow + 16 * (lanes[l] >> 5) + g;
    MINICPM_UNROLL
    for (int c = 0; c < BM / 8; ++c)
      MINICPM_UNROLL
      for (int e = 0; e < 4; ++e) part[(8 * c + 2 * t + (e & 1)) * kPartStride + r + 8 * (e >> 1)] = st.acc[l][4 * c + e];
  }
}

// CTA `rank`'s share of its cluster's tile: the 4-row pieces u = 256 j + tid (token u / 32, rows 4 (u % 32) ..
// + 3: a warp's 32 pieces one token's 128 rows, 512 contiguous bytes of each partial and 256 of out) of the blocks j
// with j % splits == rank; each the sum of parts(0) .. parts(splits - 1) (the cluster's partial tiles, rank order:
// the device maps its own into each CTA's shared memory, mapa; the emulation has them side by side) + bias,
// rounded to T - the reference's fp32 add and cast - and stored 8 bytes at a time (element by element where out's
// rows are not 8-byte aligned or at N's edge); tokens past M and rows past N are not read.
template <typename T, int BM, typename Parts>
MINICPM_HD void split_reduce(const Params<T>& p, int m0, int n0, const Parts& parts, int splits, int rank, int tid) {
  static_assert(BM * kBN / 4 % kThreads == 0, "whole blocks of pieces");
  const bool vec = ((reinterpret_cast<uintptr_t>(p.out) | static_cast<uintptr_t>(p.ldo * 2)) & 7) == 0;
  for (int j = rank; j < BM * kBN / 4 / kThreads; j += splits) {
    const int u = j * kThreads + tid, tok = u / 32, row = (u % 32) * 4, m = m0 + tok, n = n0 + row;
    if (m >= p.M || n >= p.N) continue;
    float v[4];
    for (int s = 0; s < splits; ++s) {
      float q[4];
#ifdef __CUDA_ARCH__
      const float4 f = *reinterpret_cast<const float4*>(parts(s) + tok * kPartStride + row);
      q[0] = f.x, q[1] = f.y, q[2] = f.z, q[3] = f.w;
#else
      std::memcpy(q, parts(s) + tok * kPartStride + row, 16);
#endif
      MINICPM_UNROLL
      for (int i = 0; i < 4; ++i) v[i] = s == 0 ? q[i] : v[i] + q[i];
    }
    T o[4];
    MINICPM_UNROLL
    for (int i = 0; i < 4; ++i) {
      if (p.bias != nullptr && n + i < p.N) v[i] = v[i] + Pair<T>::to_f32(ldg(p.bias + n + i));
      o[i] = Pair<T>::from_f32(v[i]);
    }
    T* dst = p.out + static_cast<long>(m) * p.ldo + n;
    if (vec && n + 4 <= p.N) {
#ifdef __CUDA_ARCH__
      uint2 w;
      std::memcpy(&w, o, 8);
      *reinterpret_cast<uint2*>(dst) = w;
#else
      std::memcpy(dst, o, 8);
#endif
    } else {
      for (int i = 0; i < 4 && n + i < p.N; ++i) dst[i] = o[i];
    }
  }
}

// ---- the warpgroup MMA on the host, for all 128 lanes, from the layouts above ----------------------------------
// The products are exact in double and each wgmma's 16 summed there, then added to the fp32 accumulator (the
// hardware's order and internal rounding differ: the tests' tolerance is derived for any fp32 summation order).
struct HostWg {
  const uint8_t* base = nullptr;
  MINICPM_HD uint32_t smem_addr(const uint8_t* q) const { return static_cast<uint32_t>(q - base); }
  template <typename T, int NA>
  MINICPM_HD void mma(float (*d)[NA], const uint32_t (*a)[4], uint64_t desc, bool first) const {
    constexpr int kBM = 2 * NA;
#ifndef __CUDA_ARCH__
    uint32_t start, lbo, sbo;
    if (!minicpm_int4_hd::wgmma_desc_fields(desc, start, lbo, sbo)) std::abort();  // no swizzle, no base offset
    double A[64][16], B[kBM][16];
    for (int l = 0; l < 128; ++l) {
      const int w = l / 32, g = (l % 32) / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = 16 * w + g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = Pair<T>::lo(a[l][r]);
        A[row][col + 1] = Pair<T>::hi(a[l][r]);
      }
    }
    for (int n = 0; n < kBM; ++n)
      for (int k = 0; k < 16; ++k) {
        uint16_t bits;
        std::memcpy(&bits, base + start + (k / 8) * lbo + (n / 8) * sbo + (n % 8) * 16 + (k % 8) * 2, 2);
        B[n][k] = Pair<T>::lo(bits);
      }
    for (int l = 0; l < 128; ++l) {
      const int w = l / 32, g = (l % 32) / 4, t = l % 4;
      for (int i = 0; i < NA; ++i) {
        const int row = 16 * w + g + 8 * ((i & 3) >> 1), col = 8 * (i / 4) + 2 * t + (i & 1);
        double s = 0;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[col][k];
        d[l][i] = static_cast<float>((first ? 0.0 : static_cast<double>(d[l][i])) + s);
      }
    }
#else
    (void)d, (void)a, (void)desc, (void)first;
#endif
  }
};

// The launch (csrc/w4a16_wgmma.cu; w4a16_gemv.cu's entry point calls it, having checked the arguments):
// out[M, N] = x @ dequant(W).T (+ bias) for fp16 (dtype 0) / bf16 (1) x [M, K] with row stride ldx (a multiple of 8),
// x and qweight 16-byte aligned (else cudaErrorMisalignedAddress); no input scale or channel order (the caller applies
// them to x first). block_tokens: 128 or 256, or 0 for block_tokens' rule (128 only under
// MINICPM_INT4_W4A16_WGMMA=128); split: 0 for split_k's rule (fewer where the GPU fits fewer clusters at once;
// none under MINICPM_INT4_W4A16_WGMMA_SPLIT=0), 1 never (a tile a CTA), 2 / 4 / 8 that many CTAs a tile (128-token
// blocks); sms: the device's SMs. cudaErrorInvalidValue where the kernel does not take the arguments (supported),
// cudaErrorNoKernelImageForDevice where this GPU has no sm_90a build, cudaErrorNotPermitted where
// MINICPM_INT4_W4A16_WGMMA turns it (0) or its 256-token blocks (128) off. A C++ function (its parameter types in its
// linked name), declared here once.
#if defined(__CUDACC__) && defined(CUDART_VERSION)
cudaError_t launch(const void* x, const int32_t* qweight, const void* scales, const void* zeros, const void* bias,
                   void* out, int M, int N, int K, int group_size, int64_t ldx, int64_t ldo, int dtype, int block_tokens,
                   int split, int sms, cudaStream_t stream);
#endif

}  // namespace minicpm_int4_w4a16_wg
