// The W4A8 GEMM on Hopper's warpgroup MMA (csrc/w4a8_wgmma.cu, sm_90a), written once for the device and the
// host like w4a8_gemm_core.cuh, whose arithmetic it keeps operation for operation (the reference's bits; the FMA
// instantiations fuse the epilogue's multiply and add - within reference.w4a8_tolerance, not its bits):
//
//   acc_g  = sum_{k in g} x_q[m, k] * (q[n, k] - z[n, g])            int32, exact
//   y     := fadd(y, fmul(float(acc_g), s[n, g]))                     groups in order, no fma
//   out    = round(fadd(fmul(y, x_scale[m]), bias[n]))                to the output dtype
//
// The operands swap places against the mma.sync kernel: W is the wgmma's A, 64 rows a warpgroup, held in
// registers - unpacked there from the packed nibbles into the exact bytes q - z, so no int8 copy of W is ever
// written to shared memory - and x's tokens are its N (BM: 128, or 64 - Tile), read by the tensor cores from
// shared memory as cp.async left them. wgmma.mma_async.m64n128k32.s32.s8.s8 (m64n64k32 for BM = 64), A in
// registers (PTX ISA; CUTLASS's SM90_64x128x32_S32S8S8_RS_TN):
//   A: lane l of warp w of the warpgroup (g = l / 4, t = l % 4) holds a0 = row 16w + g, k 4t..4t+3;
//      a1 = row 16w + g + 8, the same k; a2 / a3 = those rows, k 16 + 4t..   (mma.m16n8k32's A, per warp)
//   B: in shared memory, K-major without swizzle: core matrices of 8 tokens x 16 bytes of k (128 contiguous
//      bytes), the next 16 bytes of k LBO bytes on, the next 8 tokens SBO bytes on (the descriptor's fields)
//   D: d[4c + e] = row 16w + g + 8 (e / 2), token 8c + 2t + (e % 2), c = 0..BM/8 - 1 (mma's C, per n8 chunk)
// A stage's x is laid out as 8 chunks of 16 bytes of k, each the block's BM tokens x 16 bytes (kChunk = 16 BM
// bytes): LBO = kChunk, SBO = 128, and k-tile kt's descriptor starts at chunk 2 kt. The copies write 8
// consecutive tokens of one chunk per 8 lanes (conflict-free), and read 8 rows x 64 bytes of x a warp.
//
// A word of A from the packed row (byte i: k 2i low nibble, 2i + 1 high): lane t needs k 4t..4t+3 (bytes 2t,
// 2t + 1 of the k-tile's 16) and k 16 + 4t.. (bytes 8 + 2t, 9 + 2t). The two 4-byte shared loads at 4 (t / 2)
// and 8 + 4 (t / 2) hold them as their low (t even) or high halves; one PRMT joins them into the word
// w = bytes (2t, 2t + 1, 8 + 2t, 9 + 2t), and word_to_b (the mma.sync kernel's) gives (a0, a2) from it:
// lo = nibbles k 4t, 4t + 2, 16 + 4t, 16 + 4t + 2, hi the odd ones, PRMT 0x5140 / 0x7362 interleave them.
//
// Block: 2 warpgroups (256 threads), a 128 (rows of W) x BM (tokens) tile of the output transposed, each
// warpgroup 64 rows of W. K in stages of 128 through 5 buffers of shared memory (8 for BM = 64), all but one
// stage in flight: a stage's buffer is written again at the next stage, whose barrier every warpgroup reaches
// after waiting for its wgmma on it (each group's wgmma are waited for before its epilogue). A group's
// (32, 64, 128: GT = 1, 2, 4 k-tiles) wgmma are issued, waited for and the sums scaled into y; the two warpgroups
// take turns issuing (wg_stage), so that one's epilogue runs beside the other's wgmma. Longer groups (multiples of
// 128, per channel: GT = 0) add a stage's 4 k-tiles at a time and are scaled at their last stage. The CTAs are
// persistent (grid_ctas: one an SM), each walking its tiles (TileWalk) as one stream of stages whose copies run
// kAhead stages ahead across tiles' boundaries (LoadCursor); a tile's outputs leave through shared memory
// (wg_tile_out, tile_store).
#pragma once

#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "w4a8_gemm_core.cuh"

namespace minicpm_int4_w4a8_wg {

namespace w8 = minicpm_int4_w4a8;
using minicpm_int4_hd::byte_perm;
using minicpm_int4_hd::ldg;

constexpr int kBN = 128;                     // rows of W per block (2 warpgroups x 64)
constexpr int kBK = 128;                     // k per stage
constexpr int kKT = 32;                      // k per wgmma
constexpr int kThreads = 256;
constexpr int kSBO = 128;                    // bytes between 8-token core matrices
constexpr int kStrideW = kBK / 2 + 16;       // bytes per row of packed W (80: 8 rows x 2 words hit 16 banks)
constexpr int kOutStride = kBN * 4 + 16;     // bytes per token of the output tile in shared memory (fp32 at most;
                                             // +16: a lane quad's 4 tokens 2t land on 4 bank groups)
constexpr int kPiecesW = kBN * kBK / 2 / 16 / kThreads;  // 16-byte pieces of W a thread a stage: 2
static_assert(kThreads == 256, "the copy plan: tokens tok0 + 32 i, 8 x 4 chunks a warp");

// A block's tokens: BM = 128 (m64n128k32) or 64 (m64n64k32: twice the tiles, for grids that leave SMs idle
// (block_tokens), at a higher cost a product: W's unpacking and copies serve half as many tokens).
template <int BM>
struct Tile {
  static_assert(BM == 64 || BM == 128, "64 or 128 tokens a block: the wgmma's N");
  static constexpr int kBM = BM;                         // tokens per block: the wgmma's N
  static constexpr int kStages = BM == 128 ? 5 : 8;      // buffers (a 64-token stage is half the tensor cores' work:
                                                         // more of them in flight to cover the same latency)
  static constexpr int kAhead = kStages - 1;             // stages in flight: a buffer is refilled the stage after use
  static constexpr int kChunk = BM * 16;                 // bytes of one 16-byte k chunk of the block's tokens: the LBO
  static constexpr int kStageX = (kBK / 16) * kChunk;    // 16384 / 8192
  static constexpr int kStageBytes = kStageX + kBN * kStrideW;
  static constexpr int kOutBytes = BM * kOutStride;      // the output tile, after the ring of stages
  static constexpr int kSmemBytes = kStages * kStageBytes + kOutBytes;  // 200704 / 181248: opted in by the launcher
  static constexpr int kAcc = BM / 2;                    // int32 accumulators a thread: 64 / 32 (BM / 8 n8 chunks x 4)
  static constexpr int kPiecesX = BM * kBK / 16 / kThreads;  // 16-byte pieces of x a thread a stage: 4 / 2
};
static_assert(Tile<128>::kSmemBytes <= 232448 && Tile<64>::kSmemBytes <= 232448, "sm_90's 227 KiB a block");

// K % 32 == 0 (whole k-tiles, rows of packed W 16-byte aligned) and a group of 32, 64 or 128, or a multiple of
// 128 that divides K; or per channel (G = K) with K % 16 == 0 - a last stage of fewer than 4 k-tiles (K % 128 != 0)
// and, where K % 32 == 16 (SigLIP's MLP, K = 4304), a last k-tile half past K, zero in x and W; the rows of packed
// W are then only 8-byte aligned, and copied 8 bytes at a time (narrow_w: the NARROW instantiations).
inline bool supported(int K, int G) {
  return K > 0 && K % 16 == 0 && G > 0 && K % G == 0 && (G == 32 || G == 64 || G % 128 == 0 || G == K);
}
inline bool narrow_w(int K) { return K % 32 != 0; }
inline int static_group_tiles(int G) { return G == 32 || G == 64 || G == 128 ? G / kKT : 0; }
template <int BM>
MINICPM_HD long blocks(int M, int N) { return static_cast<long>((M + BM - 1) / BM) * ((N + kBN - 1) / kBN); }

// The 16-byte pieces thread tid copies each stage, worked out once (copy_plan; stage_piece then adds the stage's
// k): x - piece u = tid + 256 i (i < BM / 32) is token 8 (u / 64) + u % 8 = tok0 + 32 i, chunk (u / 8) % 8 (the
// same for every i); W - row tid / 4 + 64 i, bytes 16 (tid % 4) of the stage's 64. dst: offset in the stage;
// src: the global address; bytes: 16, or 0 past M, N or K (the piece zero-filled, src then a valid address that
// is not read).
struct CopyPlan {
  const int8_t* x;     // the first x piece's source at k = 0
  const uint8_t* w;    // the first W piece's
  int dstx, dstw;      // their offsets in a stage
  int kx, kw;          // the k each starts at within a stage (x: 16 c; W: 32 (tid % 4))
  unsigned rows_ok;    // bit i: piece i's token lies inside M (i < kPiecesX) or its row inside N
};

template <int BM>
MINICPM_HD CopyPlan copy_plan(const w8::Params& p, int m0, int n0, int tid) {
  using T = Tile<BM>;
  CopyPlan c;
  const int tok0 = 8 * (tid / 64) + tid % 8, chunk = (tid / 8) % 8, row0 = tid / 4, cb = 16 * (tid % 4);
  c.kx = 16 * chunk;
  c.kw = 2 * cb;
  c.x = p.xq + static_cast<long>(m0 + tok0) * p.K + c.kx;
  c.w = p.qb + static_cast<long>(n0 + row0) * (p.K / 2) + cb;
  c.dstx = chunk * T::kChunk + 16 * tok0;
  c.dstw = T::kStageX + row0 * kStrideW + cb;
  c.rows_ok = 0;
  MINICPM_UNROLL
  for (int i = 0; i < T::kPiecesX; ++i) c.rows_ok |= static_cast<unsigned>(m0 + tok0 + 32 * i < p.M) << i;
  MINICPM_UNROLL
  for (int i = 0; i < kPiecesW; ++i) c.rows_ok |= static_cast<unsigned>(n0 + row0 + 64 * i < p.N) << (T::kPiecesX + i);
  return c;
}

// narrow: per channel with K % 32 == 16 (narrow_w), where a W piece can lie half inside K (constant in the
// kernel's instantiations: the K % 32 == 0 ones keep the all-or-nothing test)
template <int BM>
MINICPM_HD void stage_piece(const w8::Params& p, const CopyPlan& c, int kb, int i, int& dst, const void*& src,
                            int& bytes, bool narrow) {
  constexpr int kPiecesX = Tile<BM>::kPiecesX;
  const int k0 = kb * kBK;
  if (i < kPiecesX) {
    dst = c.dstx + 16 * 32 * i;
    bytes = (c.rows_ok >> i) & 1 && k0 + c.kx < p.K ? 16 : 0;
    src = bytes ? static_cast<const void*>(c.x + static_cast<long>(32 * i) * p.K + k0) : p.xq;
  } else {
    const int j = i - kPiecesX;
    dst = c.dstw + 64 * kStrideW * j;
    if (narrow) {
      const int left = (p.K - k0 - c.kw) / 2;  // bytes of the row from the piece on: 16 or more, 8, or none
      bytes = (c.rows_ok >> i) & 1 && left > 0 ? (left < 16 ? left : 16) : 0;
    } else {
      bytes = (c.rows_ok >> i) & 1 && k0 + c.kw < p.K ? 16 : 0;  // K % 32 == 0: a piece is all in or all out
    }
    src = bytes ? static_cast<const void*>(c.w + static_cast<long>(64 * j) * (p.K / 2) + k0 / 2) : p.qb;
  }
}

// The descriptor of k-tile kt of a stage's x (no swizzle, K-major): start, LBO = kChunk, SBO = 128, each >> 4.
// addr: the stage's offset in shared memory (the device's shared window; the emulation's buffer).
template <int BM>
MINICPM_HD uint64_t x_desc(uint32_t addr, int kt) {
  constexpr int kChunk = Tile<BM>::kChunk;
  return minicpm_int4_hd::wgmma_desc(addr + 2 * kt * kChunk, kChunk, kSBO);
}

// A warpgroup's registers, L lanes of them (L = 1 on the device, 128 in the emulation), for BM tokens a block.
template <int BM, int L>
struct WgState {
  static constexpr int kAcc = Tile<BM>::kAcc;
  int32_t acc[L][kAcc];     // a group's integer sums
  uint32_t a[4][L][4];      // A of a group's (GT > 0) or a stage's (GT = 0) k-tiles
  float y[L][kAcc];         // sum over finished groups, fp32
  uint32_t zz[2][L];        // the current group's zero points of the lane's rows g, g + 8, in all 4 bytes
  uint32_t znext[2][L];     // the next group's, raw: loaded a group ahead
  uint32_t sbits[2][L];     // the current group's scales, raw: loaded at its start, used at its end
  int row[2][L];            // offsets of the lane's rows in scales / zeros (rows past N read row N - 1)
  int aoff[2][L];           // offsets in a stage's W of the lane's A words: rows g, g + 8, bytes 4 (t / 2)
  uint32_t sel[L];          // the PRMT selector that joins their halves (t even: low halves; odd: high)
  int grp;                  // GT = 0: the current group, -1 before the first
  int left;                 // GT = 0: its stages still to come
};

// n0w: the warpgroup's first row of W (w_rows: in the block's tile); lanes[l]: 0..127 within the warpgroup.
template <int BM, int L>
MINICPM_HD void wg_init(const w8::Params& p, int n0w, int w_rows, const int (&lanes)[L], WgState<BM, L>& st) {
  for (int l = 0; l < L; ++l) {
    const int lane = lanes[l] & 31, g = lane >> 2, t = lane & 3, r = 16 * (lanes[l] >> 5) + g;
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h) {
      st.row[h][l] = (n0w + r + 8 * h < p.N ? n0w + r + 8 * h : p.N - 1) * p.groups;
      st.aoff[h][l] = Tile<BM>::kStageX + (w_rows + r + 8 * h) * kStrideW + 4 * (t >> 1);
    }
    st.sel[l] = (t & 1) ? 0x7632u : 0x5410u;
    MINICPM_UNROLL
    for (int i = 0; i < Tile<BM>::kAcc; ++i) st.y[l][i] = 0.f;
  }
  st.grp = -1;
  st.left = 0;
}

// Group grp starts: its zero points (loaded when the group before started; the first group's now) into zz, the
// next group's loaded; its scales loaded into sbits, used at its end.
template <typename SZ, int BM, int L>
MINICPM_HD void start_group(const w8::Params& p, int grp, WgState<BM, L>& st) {
  const int ahead = grp + 1 < p.groups ? grp + 1 : grp;
  for (int l = 0; l < L; ++l)
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h) {
      if (grp == 0) st.znext[h][l] = w8::load_bits<SZ>(p.zeros, st.row[h][l]);
      st.zz[h][l] = static_cast<uint32_t>(static_cast<int>(w8::bits_to_f32<SZ>(st.znext[h][l]))) * 0x01010101u;
      st.znext[h][l] = w8::load_bits<SZ>(p.zeros, st.row[h][l] + ahead);
      st.sbits[h][l] = w8::load_bits<SZ>(p.scales, st.row[h][l] + grp);
    }
}

// y += float(acc) * s for the lane's rows (the group's scales; I2FP is full rate on sm_90): the reference's multiply
// and add, each rounded (its bits), or with FMA one fused multiply-add - a third fewer instructions in the epilogue,
// which bounds the kernel (w4a8_wgmma.cu), rounded once: within reference.w4a8_tolerance, not its bits.
MINICPM_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

template <bool FMA, typename SZ, int BM, int L>
MINICPM_HD void epilogue(WgState<BM, L>& st) {
  for (int l = 0; l < L; ++l) {
    const float s0 = w8::bits_to_f32<SZ>(st.sbits[0][l]), s1 = w8::bits_to_f32<SZ>(st.sbits[1][l]);
    MINICPM_UNROLL
    for (int i = 0; i < Tile<BM>::kAcc; ++i) {
      const float a = w8::int_to_float<false>(st.acc[l][i]), s = (i & 2) ? s1 : s0;
      st.y[l][i] = FMA ? fma_rn(a, s, st.y[l][i]) : w8::fadd_rn(st.y[l][i], w8::fmul_rn(a, s));
    }
  }
}

// The lane's A of k-tile kt from the stage's packed W: rows g, g + 8 of its warp's 16, zero points zz.
template <int BM, int L>
MINICPM_HD void load_a(const uint8_t* stage, int kt, const WgState<BM, L>& st, uint32_t mask, uint32_t (*a)[4]) {
  for (int l = 0; l < L; ++l)
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h) {
      const uint8_t* src = stage + st.aoff[h][l] + 16 * kt;
      uint32_t lo, hi;
#ifdef __CUDA_ARCH__
      lo = *reinterpret_cast<const uint32_t*>(src);
      hi = *reinterpret_cast<const uint32_t*>(src + 8);
#else
      std::memcpy(&lo, src, 4);
      std::memcpy(&hi, src + 8, 4);
#endif
      w8::word_to_b(byte_perm(lo, hi, st.sel[l]), st.zz[h][l], mask, a[l][h], a[l][2 + h]);
    }
}

// One warpgroup's work on stage kb (x at `stage`, its W rows at the offsets wg_init worked out): GT = 1, 2, 4 - the
// stage's groups, each one's A unpacked, its wgmma issued and waited for, then scaled into y; GT = 0 - the stage's
// 4 k-tiles onto the group's sums, waited for, and scaled at the group's last stage. Wg: DeviceWg or the
// emulation's HostWg (base: shared memory's start).
//
// Turns: the two warpgroups issue their wgmma alternately, group by group - warpgroup 0 first in each stage
// (take_turn(first) waits for the other's pass_turn unless first; pass_turn(last) lets the other go, the last group
// of a stage excepted for warpgroup 1) - so that the tensor cores run one's group while the other scales its last
// one into y, instead of both issuing at once and both then waiting through their epilogues side by side.
//
// One set of accumulators: with a second set for the next group's wgmma while this group's epilogue runs (and
// its A in a second set of registers), ptxas 13.0 serialized the wgmma anyway (C7513 / C7514: registers of a
// wgmma read or defined within its pipeline stage) and the 128-token tile spilled; in one block the two
// warpgroups' epilogues run between the tensor cores' work on the other's groups only as the scheduler lets them.
template <int GT, bool FMA, typename SZ, class Wg, int BM, int L>
MINICPM_HD void wg_stage(const w8::Params& p, Wg& wg, const uint8_t* stage, int kb, WgState<BM, L>& st) {
  const uint32_t addr = wg.smem_addr(stage);
  if constexpr (GT > 0) {
    MINICPM_UNROLL
    for (int j = 0; j < 4 / GT; ++j) {
      const int kt0 = GT * j;
      if (kb * kBK + kKT * kt0 >= p.K) break;  // the last stage's tail (K % 128 != 0): whole groups past K
      const bool last = j + 1 == 4 / GT || kb * kBK + kKT * (kt0 + GT) >= p.K;  // the stage's last group
      start_group<SZ>(p, kb * (4 / GT) + j, st);
      MINICPM_UNROLL
      for (int kt = 0; kt < GT; ++kt) load_a(stage, kt0 + kt, st, p.mask_lo, st.a[kt]);
      wg.template fence_a<GT>(st.a);
      wg.take_turn(j == 0);
      wg.fence_acc(st.acc);  // the last epilogue's reads of acc stay above the wgmma that overwrite it
      wg.fence();
      MINICPM_UNROLL
      for (int kt = 0; kt < GT; ++kt) wg.mma(st.acc, st.a[kt], x_desc<BM>(addr, kt0 + kt), kt == 0);
      wg.commit();
      wg.pass_turn(last);
      wg.template wait<0>();
      wg.fence_acc(st.acc);
      epilogue<FMA, SZ>(st);
    }
  } else {
    const bool starts = st.left == 0;
    if (starts) {  // a group starts at this stage
      st.grp += 1;
      st.left = (p.G + kBK - 1) / kBK;  // (per channel with K % 128 != 0: the last stage a part one)
      start_group<SZ>(p, st.grp, st);
    }
    MINICPM_UNROLL
    for (int kt = 0; kt < 4; ++kt) load_a(stage, kt, st, p.mask_lo, st.a[kt]);
    wg.template fence_a<4>(st.a);
    wg.take_turn(true);
    wg.fence_acc(st.acc);
    wg.fence();
    MINICPM_UNROLL
    for (int kt = 0; kt < 4; ++kt) wg.mma(st.acc, st.a[kt], x_desc<BM>(addr, kt), starts && kt == 0);
    wg.commit();
    wg.pass_turn(true);
    wg.template wait<0>();  // (wait 1 would let the next stage's A overwrite registers this stage's wgmma read)
    st.left -= 1;
    if (st.left == 0) {
      wg.fence_acc(st.acc);
      epilogue<FMA, SZ>(st);
    }
  }
}

// Persistent CTAs: min(tiles, SMs) of them, CTA c taking tiles c, c + grid, c + 2 grid, ..., their stages one
// stream, so that the copies run kAhead stages ahead across the tiles' boundaries - the next tile's first stages
// land while this one's last are computed and its outputs stored - instead of each tile's CTA starting cold (one
// CTA an SM: nothing else hides a fill or a store; at K = 768 a tile is 6 stages).
template <int BM>
MINICPM_HD int grid_ctas(int M, int N, int sms) {
  const long tiles = blocks<BM>(M, N);
  return static_cast<int>(sms > 0 && tiles > sms ? sms : tiles);
}

// Tokens a block for an M x N GEMM on `sms` SMs: the persistent CTAs work through ceil(tiles / sms) tiles each
// (the last wave partly idle), so a GEMM takes about waves x a tile's time, and a 64-token tile's time is
// kStageCost64 / kStageCost128 of a 128-token one's - their stage loops' instructions a thread (sm_90a, nvcc 13.0,
// G = 128, the reference's epilogue; the kernel is issue-bound - w4a8_wgmma.cu): the epilogue halves with the
// tokens, W's unpacking does not. 64 where that makes the GEMM shorter: M <= 64 (a 128-token block half empty or
// more) and grids under one wave of 128-token tiles that 64-token ones leave under one wave too (a 768-wide layer at
// M = 1024: 48 tiles on 132 SMs; 4096 x 4096 at M = 256: 64) - not a 768-wide layer at M = 4096 (192 tiles, 2 waves,
// against 3 waves of 64-token tiles at 0.77 the time). A static model until a GPU's measurements (the bench's
// w4a8-cuda-t64 / -t128 rows) replace it.
constexpr int kStageCost128 = 518;
constexpr int kStageCost64 = 400;
MINICPM_HD int block_tokens(int M, int N, int sms) {
  const long w128 = (blocks<128>(M, N) + sms - 1) / sms, w64 = (blocks<64>(M, N) + sms - 1) / sms;
  return w64 * kStageCost64 < w128 * kStageCost128 ? 64 : 128;
}

// A CTA's tiles in order: tile id i is (token block i % nbm, W block i / nbm) - token blocks fastest, so that the
// CTAs at work at once share a few W tiles (read once from HBM, then from L2) and all of x's - walked by an add and
// a compare a tile, no division in the loop.
struct TileWalk {
  int bm, bn;    // the current tile
  int dq, dr;    // grid / nbm, grid % nbm: the step to the CTA's next tile
  int nbm;
};

template <int BM>
MINICPM_HD TileWalk walk_start(int M, int cta, int grid) {
  TileWalk w;
  w.nbm = (M + BM - 1) / BM;
  w.bm = cta % w.nbm;
  w.bn = cta / w.nbm;
  w.dq = grid / w.nbm;
  w.dr = grid % w.nbm;
  return w;
}

MINICPM_HD void walk_next(TileWalk& w) {
  w.bm += w.dr;
  w.bn += w.dq;
  if (w.bm >= w.nbm) {
    w.bm -= w.nbm;
    w.bn += 1;
  }
}

// The load side of a CTA's stream: the next stage to copy - its tile and k-block - and that tile's copy plan.
struct LoadCursor {
  int kb;
  TileWalk w;
  CopyPlan plan;
};

template <int BM>
MINICPM_HD LoadCursor load_start(const w8::Params& p, int cta, int grid, int tid) {
  LoadCursor c;
  c.kb = 0;
  c.w = walk_start<BM>(p.M, cta, grid);
  c.plan = minicpm_int4_w4a8_wg::copy_plan<BM>(p, c.w.bm * BM, c.w.bn * kBN, tid);  // (qualified: not w8's, by ADL)
  return c;
}

// The stage after: the next k-block, or the next tile's first (its plan worked out: once a tile).
template <int BM>
MINICPM_HD void load_step(const w8::Params& p, int stages, int tid, LoadCursor& c) {
  if (++c.kb < stages) return;
  c.kb = 0;
  walk_next(c.w);
  c.plan = minicpm_int4_w4a8_wg::copy_plan<BM>(p, c.w.bm * BM, c.w.bn * kBN, tid);  // (qualified: not w8's, by ADL)
}

// The tiles CTA cta works through (each (K + 127) / 128 stages; the launcher keeps tiles x stages below 2**31).
template <int BM>
MINICPM_HD int cta_tiles(int M, int N, int cta, int grid) {
  return static_cast<int>((blocks<BM>(M, N) - cta + grid - 1) / grid);
}

// A tile's outputs leave through shared memory (each lane's 64 sums are 2 rows of W x 32 tokens of out [M, N]:
// stored straight from the registers, a warp's store covered 4 tokens x 16 bytes, and the per-output bounds,
// dtype and address work cost ~42 instructions an output - as much as 6 stages of the main loop):
//   wg_tile_out: each lane's y * x_scale (+ bias), rounded to the output dtype - the reference's operations -,
//                into the tile [token][row of W] (kOutStride bytes a token; tokens and rows past M, N too);
//   tile_store:  after a barrier, the block's 256 threads copy it to out 16 bytes at a time (rows of out
//                16-byte aligned: out's address and ldo; else, and at N's edge, element by element).
template <typename OT, int BM, int L>
MINICPM_HD void wg_tile_out_t(const w8::Params& p, int m0, int n0, int wrow, const int (&lanes)[L],
                              const WgState<BM, L>& st, uint8_t* tile) {
  for (int l = 0; l < L; ++l) {
    const int lane = lanes[l] & 31, g = lane >> 2, t = lane & 3, r = wrow + 16 * (lanes[l] >> 5) + g;
    float bs[2];
    MINICPM_UNROLL
    for (int h = 0; h < 2; ++h)
      bs[h] = p.bias != nullptr && n0 + r + 8 * h < p.N ? w8::load_f32(p.bias, n0 + r + 8 * h, p.out_dtype) : 0.f;
    MINICPM_UNROLL
    for (int c = 0; c < BM / 8; ++c) {
      float xs[2];
      MINICPM_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int m = m0 + 8 * c + 2 * t + e;
        xs[e] = m < p.M ? ldg(p.xs + m) : 0.f;
      }
      MINICPM_UNROLL
      for (int e = 0; e < 4; ++e) {
        float v = w8::fmul_rn(st.y[l][4 * c + e], xs[e & 1]);
        if (p.bias != nullptr) v = w8::fadd_rn(v, bs[e >> 1]);
        const int tok = 8 * c + 2 * t + (e & 1), row = r + 8 * (e >> 1);
        OT* dst = reinterpret_cast<OT*>(tile + tok * kOutStride) + row;
        if constexpr (sizeof(OT) == 4) *dst = v;
        else if constexpr (std::is_same<OT, __half>::value) *dst = __float2half_rn(v);
        else *dst = __float2bfloat16_rn(v);
      }
    }
  }
}

template <int BM, int L>
MINICPM_HD void wg_tile_out(const w8::Params& p, int m0, int n0, int wrow, const int (&lanes)[L],
                            const WgState<BM, L>& st, uint8_t* tile) {
  if (p.out_dtype == 0) wg_tile_out_t<__half>(p, m0, n0, wrow, lanes, st, tile);
  else if (p.out_dtype == 1) wg_tile_out_t<__nv_bfloat16>(p, m0, n0, wrow, lanes, st, tile);
  else wg_tile_out_t<float>(p, m0, n0, wrow, lanes, st, tile);
}

// Thread tid's share of the tile: 16-byte pieces u = tid + 256 i of the BM tokens x (128 x esize) bytes, token
// u / (8 esize), piece u % (8 esize) of its row.
template <int BM>
MINICPM_HD void tile_store(const w8::Params& p, int m0, int n0, const uint8_t* tile, int tid) {
  const int esize = p.out_dtype == 2 ? 4 : 2, per_row = 8 * esize, per_piece = 16 / esize;
  const bool vec = ((reinterpret_cast<uintptr_t>(p.out) | static_cast<uintptr_t>(p.ldo * esize)) & 15) == 0;
  for (int u = tid; u < BM * per_row; u += kThreads) {
    const int tok = u / per_row, col = (u % per_row) * per_piece, m = m0 + tok, n = n0 + col;
    if (m >= p.M || n >= p.N) continue;
    const uint8_t* src = tile + tok * kOutStride + col * esize;
    uint8_t* dst = static_cast<uint8_t*>(p.out) + (static_cast<long>(m) * p.ldo + n) * esize;
    if (vec && n + per_piece <= p.N) {
#ifdef __CUDA_ARCH__
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
      std::memcpy(dst, src, 16);
#endif
    } else {
      const int left = p.N - n < per_piece ? p.N - n : per_piece;
      for (int j = 0; j < left * esize; ++j) dst[j] = src[j];
    }
  }
}

// The warpgroup MMA on the host for all 128 lanes, from the layouts above; exact integers. base: the start of
// the emulation's shared memory (descriptor addresses are offsets from it).
struct HostWg {
  const uint8_t* base = nullptr;
  MINICPM_HD uint32_t smem_addr(const uint8_t* p) const { return static_cast<uint32_t>(p - base); }
  MINICPM_HD void fence() {}
  MINICPM_HD void take_turn(bool) {}
  MINICPM_HD void pass_turn(bool) {}
  MINICPM_HD void commit() {}
  template <int N> MINICPM_HD void wait() {}
  template <int NA>
  MINICPM_HD void fence_acc(int32_t (*)[NA]) {}
  template <int NK, int L>
  MINICPM_HD void fence_a(uint32_t (*)[L][4]) {}
  // NA = BM / 2 accumulators a lane: the m64n(BM)k32 product
  template <int NA>
  MINICPM_HD void mma(int32_t (*d)[NA], const uint32_t (*a)[4], uint64_t desc, bool first) const {
    constexpr int kBM = 2 * NA;
#ifndef __CUDA_ARCH__
    uint32_t start, lbo, sbo;
    if (!minicpm_int4_hd::wgmma_desc_fields(desc, start, lbo, sbo)) std::abort();  // no swizzle, no base offset
    int A[64][32], B[kBM][32];
    for (int l = 0; l < 128; ++l) {
      const int w = l / 32, g = (l % 32) / 4, t = l % 4;
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j)
          A[16 * w + g + 8 * (r & 1)][4 * t + 16 * (r >> 1) + j] = static_cast<int8_t>((a[l][r] >> (8 * j)) & 0xFFu);
    }
    for (int n = 0; n < kBM; ++n)
      for (int k = 0; k < 32; ++k)
        B[n][k] = static_cast<int8_t>(base[start + (k / 16) * lbo + (n / 8) * sbo + (n % 8) * 16 + k % 16]);
    for (int l = 0; l < 128; ++l) {
      const int w = l / 32, g = (l % 32) / 4, t = l % 4;
      for (int i = 0; i < NA; ++i) {
        const int row = 16 * w + g + 8 * ((i & 3) >> 1), col = 8 * (i / 4) + 2 * t + (i & 1);
        int32_t s = first ? 0 : d[l][i];
        for (int k = 0; k < 32; ++k) s += A[row][k] * B[col][k];
        d[l][i] = s;
      }
    }
#else
    (void)d, (void)a, (void)desc, (void)first;
#endif
  }
};

}  // namespace minicpm_int4_w4a8_wg
