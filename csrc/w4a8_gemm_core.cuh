// The W4A8 GEMM of csrc/w4a8_gemm.cu, written once for the device and the host: int8 activations x
// int4 weights on m16n8k32 int8 mma.sync, int32 accumulation per group, the asymmetric zero point
// exact, then the reference's fp32 arithmetic (reference.w4a8_gemm_ref) operation for operation:
//
//   acc_g  = sum_{k in g} x_q[m, k] * (q[n, k] - z[n, g])            int32, exact
//   y     := fadd(y, fmul(float(acc_g), s[n, g]))                     groups in order, no fma
//   out    = round(fadd(fmul(y, x_scale[m]), bias[n]))                to the output dtype
//
// so the kernel gives the reference's bits (tests/csrc/host_emu.cu runs this code on the CPU with
// every warp's 32 lanes held at once, L = 32, and the mma emulated from the PTX fragment layout).
//
// Block: a (64 WM) x 128 tile of the output (rows of x x rows of W), WM x 4 warps (WM = 2, or 1 for grids
// too small to fill the GPU: Block), each a 64 x 32 tile = 4 x 4 mma tiles. K in stages of kBK = 128 through shared memory (cp.async, kStages
// deep); a stage is 4 k-tiles of 32 consecutive k, so a group (32, 64, 128 ... or all of K) ends on a
// k-tile boundary (per channel with K % 32 == 16: the last k-tile half zero). Layouts are the canonical ones (packing.py), nothing repacked:
//   x_q int8 [M, K] (row stride K), qweight int32 [N, K/8] read as bytes (byte i of a row holds
//   k = 2i in its low nibble, 2i + 1 in its high one), scales / zeros [N, K/G] (fp16, bf16 or fp32).
//
// Fragments (PTX ISA, mma.m16n8k32 .s8; g = lane / 4, t = lane % 4): A a0 = row g, k 4t..4t+3;
// a1 = row g + 8, the same k; a2 / a3 = rows g / g + 8, k 16 + 4t..; B b0 = k 4t..4t+3 of column g,
// b1 = k 16 + 4t..; C c0, c1 = row g, columns 2t, 2t + 1, c2, c3 = row g + 8. An mma sums over its 32
// k in any order, so the kernel chooses which actual k sits at each logical k, the same for A and B:
// lane t takes the 8 consecutive k [8t, 8t + 8) of the k-tile, so that one packed word of a row of W
// (its 8 nibbles) gives (b0, b1):
//   lo = ((w & 0x0F0F0F0F) | 0x80808080) - z * 0x01010101     bytes 128 + q - z of k 0, 2, 4, 6
//   hi = the same on w >> 4                                    k 1, 3, 5, 7
//   b0 = PRMT(lo, hi: k 0, 1, 2, 3) ^ 0x80808080, b1 = PRMT(k 4, 5, 6, 7) ^ 0x80808080
// (q - z lies in [-15, 15]: every byte stays in [113, 143] before the XOR, so no borrow crosses a byte).
// For A the same k: once a stage of x has landed in shared memory, its 4-byte words are permuted within
// each 32-byte k-tile to the order 0, 2, 4, 6, 1, 3, 5, 7 (permute_x, a pass of the whole block), so that
// one ldmatrix.x4 - lane t receiving word t of a 16-byte row segment - gives every lane its
// (a0, a1, a2, a3) = k [8t, 8t + 4) and [8t + 4, 8t + 8) of rows g and g + 8, in the register order the
// mma takes (loaded as two 8-byte halves, the quad had to be assembled with moves).
//
// Shared memory rows are padded so that fragment loads hit distinct banks: x rows 144 bytes (ldmatrix
// reads 8 rows x 16 bytes per matrix; the permute pass 2 rows x 64 bytes per phase), W rows 80 bytes
// (LDS.32 by 32 lanes = 8 rows x 16 bytes).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstring>

#include "hd_common.cuh"

namespace minicpm_int4_w4a8 {

using minicpm_int4_hd::byte_perm;
using minicpm_int4_hd::ldg;

constexpr int kBN = 128;          // rows of W (output columns) per block
constexpr int kBK = 128;          // k per pipeline stage
constexpr int kKT = 32;           // k per mma (a k-tile)
constexpr int kWarpsN = 4;        // warps along N in a block; along M: the block's WM (Block)
constexpr int kWarpRows = 64;     // rows of x per warp
constexpr int kMT = kWarpRows / 16;      // m16 tiles per warp: 4
constexpr int kNT = kBN / kWarpsN / 8;   // n8 tiles per warp: 4
constexpr int kStages = 3;
constexpr int kStrideA = kBK + 16;       // bytes per row of x in shared memory (ldmatrix: 8 rows, 8 bank groups)
constexpr int kStrideB = kBK / 2 + 16;   // bytes per row of packed W
constexpr int kStageB = kBN * kStrideB;

// A block of WM x kWarpsN warps: WM = 2, 128 rows of x (8 warps, one block an SM: 92160 bytes of shared
// memory, ~220 registers a thread), or WM = 1, 64 rows (4 warps, 59904 bytes: two or three blocks an SM),
// for grids of 128-row blocks too small to fill the GPU (a few hundred rows of x, or narrow N).
template <int WM>
struct Block {
  static_assert(WM == 1 || WM == 2, "64 or 128 rows of x per block");
  static constexpr int kBM = kWarpRows * WM;                     // rows of x per block
  static constexpr int kWarps = WM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStageA = kBM * kStrideA;                 // x's part of a stage; W's follows it
  static constexpr int kStageBytes = kStageA + kStageB;
  static constexpr int kSmemBytes = kStages * kStageBytes;       // dynamic, opted in by the launcher
  static constexpr int kPiecesA = kBM * kBK / 16 / kThreads;     // 16-byte pieces of x per thread a stage: 4
  static constexpr int kPiecesB = kBN * kBK / 2 / 16 / kThreads; // of W: 2 (WM = 2) or 4
  static constexpr int kRowStepA = kThreads / (kBK / 16);        // rows of x between a thread's pieces
  static constexpr int kRowStepB = kThreads / (kBK / 32);        // rows of W
  static constexpr int kPermute = kBM * (kBK / kKT) / kThreads;  // 32-byte units a thread permutes: 2
};
constexpr int kGroupM = 8;               // block rows of a group in the launch order (L2 reuse of W)
// float(acc) as (acc + bits of 1.5 * 2**23) - 1.5 * 2**23, exact for |acc| < 2**22: a group of G k has
// |acc| <= 127 * 15 * G, so G <= kMagicMaxG; longer groups (per channel) convert with I2F
constexpr int kMagicMaxG = 2048;

// dtype codes of scales / zeros / bias / out: 0 = fp16, 1 = bf16, 2 = fp32
MINICPM_HD float load_f32(const void* p, long i, int dtype) {
  if (dtype == 2) return ldg(static_cast<const float*>(p) + i);
  const unsigned short b = ldg(static_cast<const unsigned short*>(p) + i);
  return dtype == 0 ? __half2float(__ushort_as_half(b)) : __bfloat162float(__ushort_as_bfloat16(b));
}

// Element i of a scales / zeros array of dtype SZ as its raw bits (a register), and those bits as fp32: a load
// kept in its raw form until it is used, so that nothing waits for it before then.
template <typename SZ>
MINICPM_HD uint32_t load_bits(const void* base, int i) {
  if constexpr (sizeof(SZ) == 2) return ldg(static_cast<const unsigned short*>(base) + i);
  else return ldg(static_cast<const uint32_t*>(base) + i);
}
template <typename SZ> MINICPM_HD float bits_to_f32(uint32_t b);
template <> MINICPM_HD float bits_to_f32<__half>(uint32_t b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <> MINICPM_HD float bits_to_f32<__nv_bfloat16>(uint32_t b) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
}
template <> MINICPM_HD float bits_to_f32<float>(uint32_t b) { return minicpm_int4_hd::as_float(b); }

MINICPM_HD void store_f32(void* p, long i, float v, int dtype) {
  if (dtype == 2)
    static_cast<float*>(p)[i] = v;
  else if (dtype == 0)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}

// IEEE single operations, each rounded once (never contracted into an fma: the reference's bits)
MINICPM_HD float fmul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // the host compiler may not fuse either
  return r;
#endif
}
MINICPM_HD float fadd_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

// MAGIC (|v| < 2**22): the exact convert as an integer add and an FADD on sm_80 / 86 / 89, whose I2F runs
// on a quarter-rate pipe; sm_90 has a full-rate I2FP. The same value either way.
template <bool MAGIC>
MINICPM_HD float int_to_float(int32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (MAGIC) return minicpm_int4_hd::as_float(static_cast<uint32_t>(v + 0x4B400000)) - 12582912.0f;
#endif
#ifdef __CUDA_ARCH__
  return __int2float_rn(v);
#else
  return static_cast<float>(v);  // round to nearest, as the reference's int64 -> fp32
#endif
}

struct Params {
  const int8_t* xq;       // [M, K], row stride K, 16-byte aligned
  const float* xs;        // [M]
  const uint8_t* qb;      // the packed weight's bytes [N, K/2], 16-byte aligned
  const void* scales;     // [N, K/G]
  const void* zeros;      // [N, K/G], integer values 0..15
  const void* bias;       // [N] in the output dtype, or nullptr
  void* out;              // [M, N], row stride ldo
  int M, N, K, G;
  int group_tiles;        // k-tiles per group: G / 32, or K / 32 rounded up per channel (group_tiles_for)
  int groups;             // K / G: the row stride of scales and zeros (no division in the kernel)
  uint32_t mask_lo;       // 0x0F0F0F0F, passed at run time so that (w & mask) | 0x80808080 is one LOP3
  long ldo;
  int sz_dtype;           // of scales and zeros (the launcher picks the kernel instantiated for it)
  int out_dtype;          // of out and bias
};

// Block id -> (row block, column block), kGroupM row blocks at a time: consecutive blocks share W's tile.
template <int WM>
MINICPM_HD void block_tile(int pid, int M, int N, int& bm, int& bn) {
  constexpr int kBM = Block<WM>::kBM;
  const int nbm = (M + kBM - 1) / kBM, nbn = (N + kBN - 1) / kBN;
  const int width = kGroupM * nbn;
  const int first = (pid / width) * kGroupM;
  const int size = nbm - first < kGroupM ? nbm - first : kGroupM;
  bm = first + (pid % width) % size;
  bn = (pid % width) / size;
}

// The 16-byte pieces a thread copies into shared memory each stage: kPiecesA of x (rows ra + kRowStepA i,
// bytes 16 ca.. of the stage's 128), then kPiecesB of W (rows rb + kRowStepB i, bytes 16 cb.. of the stage's
// 64). What does not change from stage to stage is worked out once (copy_plan): the rows' offsets, which
// rows lie inside M and N, the piece's k; stage_piece then adds the stage's k. dst: offset in the stage;
// src: the global address; bytes: how many of the piece's bytes lie inside x or W (16; 0 past M, N or K;
// 8 for the half of a W piece at the end of a row when K % 32 == 16) - the rest is zero-filled, and src is
// then a valid address that is not read.
struct CopyPlan {
  long xa, wb;        // byte offsets of the thread's first piece of x and of W, at k = 0
  int dsta, dstb;     // their offsets in a stage
  int ka, kw;         // the k each piece starts at within a stage (x: 16 per piece, W: 32)
  unsigned rows_ok;   // bit i: piece i's row lies inside M (x, i < kPiecesA) or N (W)
};

template <int WM>
MINICPM_HD CopyPlan copy_plan(const Params& p, int m0, int n0, int tid) {
  using B = Block<WM>;
  CopyPlan c;
  const int ra = tid / (kBK / 16), ca = tid % (kBK / 16), rb = tid / (kBK / 32), cb = tid % (kBK / 32);
  c.ka = 16 * ca;
  c.kw = 32 * cb;
  c.xa = static_cast<long>(m0 + ra) * p.K + c.ka;
  c.wb = static_cast<long>(n0 + rb) * (p.K / 2) + c.kw / 2;
  c.dsta = ra * kStrideA + c.ka;
  c.dstb = B::kStageA + rb * kStrideB + c.kw / 2;
  c.rows_ok = 0;
  MINICPM_UNROLL
  for (int i = 0; i < B::kPiecesA; ++i) c.rows_ok |= static_cast<unsigned>(m0 + ra + B::kRowStepA * i < p.M) << i;
  MINICPM_UNROLL
  for (int i = 0; i < B::kPiecesB; ++i)
    c.rows_ok |= static_cast<unsigned>(n0 + rb + B::kRowStepB * i < p.N) << (B::kPiecesA + i);
  return c;
}

template <int WM>
MINICPM_HD void stage_piece(const Params& p, const CopyPlan& c, int kb, int i, int& dst, const void*& src, int& bytes) {
  using B = Block<WM>;
  const int k0 = kb * kBK;
  if (i < B::kPiecesA) {
    dst = c.dsta + B::kRowStepA * kStrideA * i;
    bytes = (c.rows_ok >> i) & 1 && k0 + c.ka < p.K ? 16 : 0;
    src = bytes ? static_cast<const void*>(p.xq + c.xa + static_cast<long>(B::kRowStepA * i) * p.K + k0) : p.xq;
  } else {
    const int j = i - B::kPiecesA, left = (p.K - k0 - c.kw) / 2;  // bytes of the row from the piece on
    dst = c.dstb + B::kRowStepB * kStrideB * j;
    bytes = (c.rows_ok >> i) & 1 && left > 0 ? (left < 16 ? left : 16) : 0;
    src = bytes ? static_cast<const void*>(p.qb + c.wb + static_cast<long>(B::kRowStepB * j) * (p.K / 2) + k0 / 2) : p.qb;
  }
}

// The permute pass over a landed stage of x: thread tid reorders the 4-byte words of kPermute 32-byte
// k-tile rows to 0, 2, 4, 6, 1, 3, 5, 7 (the ldmatrix order above). Rows past M and k past K are zeros
// either way.
template <int WM>
MINICPM_HD void permute_x(uint8_t* stage, int tid) {
  using B = Block<WM>;
  MINICPM_UNROLL
  for (int i = 0; i < B::kPermute; ++i) {
    const int u = tid + B::kThreads * i, row = u / (kBK / kKT), unit = u % (kBK / kKT);
    uint8_t* q = stage + row * kStrideA + kKT * unit;
#ifdef __CUDA_ARCH__
    const uint4 lo = *reinterpret_cast<const uint4*>(q), hi = *reinterpret_cast<const uint4*>(q + 16);
    *reinterpret_cast<uint4*>(q) = make_uint4(lo.x, lo.z, hi.x, hi.z);
    *reinterpret_cast<uint4*>(q + 16) = make_uint4(lo.y, lo.w, hi.y, hi.w);
#else
    uint32_t w[8], o[8];
    std::memcpy(w, q, 32);
    for (int j = 0; j < 4; ++j) o[j] = w[2 * j], o[4 + j] = w[2 * j + 1];
    std::memcpy(q, o, 32);
#endif
  }
}

// The row address lane `lane` hands ldmatrix.x4 for m16 tile mt of k-tile kt: matrix j = lane / 8 (rows g
// or g + 8: j % 2; 16-byte segment j / 2 of the k-tile), its row lane % 8.
MINICPM_HD const uint8_t* ldsm_row(const uint8_t* stage, int wm, int mt, int kt, int lane) {
  const int j = lane >> 3, r = lane & 7;
  return stage + (wm + 16 * mt + r + 8 * (j & 1)) * kStrideA + kKT * kt + 16 * (j >> 1);
}

// (b0, b1) of one packed word: q - z as signed bytes, k 0..3 and 4..7 of the word in order (mask: 0x0F0F0F0F).
MINICPM_HD void word_to_b(uint32_t w, uint32_t zz, uint32_t mask, uint32_t& b0, uint32_t& b1) {
  const uint32_t lo = ((w & mask) | 0x80808080u) - zz;
  const uint32_t hi = (((w >> 4) & mask) | 0x80808080u) - zz;
  b0 = byte_perm(lo, hi, 0x5140) ^ 0x80808080u;
  b1 = byte_perm(lo, hi, 0x7362) ^ 0x80808080u;
}

// A warp's registers, L lanes of them (L = 1 on the device).
template <int L>
struct WarpState {
  int32_t acc[kMT][kNT][L][4];  // the group's integer sums
  float y[kMT][kNT][L][4];      // sum over finished groups, fp32
  uint32_t zz[kNT][L];          // the zero point of the lane's W row (column g of each n8 tile), in all 4 bytes
  uint32_t znext[kNT][L];       // the next group's zero points, raw bits: loaded a group ahead of their use
  uint32_t sbits[kNT][2][L];    // this group's scales of the lane's columns, raw
  uint32_t snext[kNT][2][L];    // the next group's, raw: loaded a group ahead of their use, as the zero points
  int zrow[kNT][L];             // offsets of those rows in zeros (n * K / G; rows past N read row N - 1)
  int srow[kNT][2][L];          // offsets in scales of the lane's output columns 2t, 2t + 1 of each n8 tile
  int grp;                      // the current group (warp-uniform), -1 before the first
  int left;                     // its k-tiles still to come: a counter, not a division by G every k-tile
};

// The warp's state before its first stage; n0w: its first row of W.
template <int L>
MINICPM_HD void warp_init(const Params& p, int n0w, const int (&lanes)[L], WarpState<L>& st) {
  for (int l = 0; l < L; ++l)
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      const int nz = n0w + 8 * nt + (lanes[l] >> 2);
      st.zrow[nt][l] = (nz < p.N ? nz : p.N - 1) * p.groups;
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int ns = n0w + 8 * nt + 2 * (lanes[l] & 3) + h;
        st.srow[nt][h][l] = (ns < p.N ? ns : p.N - 1) * p.groups;
      }
    }
  MINICPM_UNROLL
  for (int mt = 0; mt < kMT; ++mt)
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      for (int l = 0; l < L; ++l)
        MINICPM_UNROLL
        for (int e = 0; e < 4; ++e) st.acc[mt][nt][l][e] = 0, st.y[mt][nt][l][e] = 0.f;
  st.grp = -1;
  st.left = 0;
}

// The int8 tensor-core op for one warp: c += a b (run), or c = a b (first: a group's first k-tile, whatever c
// held - no registers zeroed per group), L lanes' registers. Not volatile: a pure function of its operands,
// which the compiler may schedule among the loads.
struct DeviceMma {
  MINICPM_HD static void run(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0][0]), "+r"(c[0][1]), "+r"(c[0][2]), "+r"(c[0][3])
        : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
#else
    (void)a, (void)b, (void)c;
#endif
  }
  // ldmatrix.x4: this lane's (a0, a1, a2, a3) from the rows the warp's lanes address (row[0]: this lane's)
  MINICPM_HD static void ldsm_x4(const uint8_t* const* row, uint32_t (*a)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row[0]));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(a[0][0]), "=r"(a[0][1]), "=r"(a[0][2]), "=r"(a[0][3])
                 : "r"(addr));
#else
    (void)row, (void)a;
#endif
  }
  MINICPM_HD static void first(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
        : "=r"(c[0][0]), "=r"(c[0][1]), "=r"(c[0][2]), "=r"(c[0][3])
        : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]), "r"(0));
#else
    (void)a, (void)b, (void)c;
#endif
  }
};

// The same op on the host for all 32 lanes, from the fragment layout above; exact integers.
struct HostMma {
  MINICPM_HD static void run(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
    int A[16][32], B[32][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 4; ++j)
          A[g + 8 * (r & 1)][4 * t + 16 * (r >> 1) + j] = static_cast<int8_t>((a[l][r] >> (8 * j)) & 0xFFu);
      for (int r = 0; r < 2; ++r)
        for (int j = 0; j < 4; ++j) B[4 * t + 16 * r + j][g] = static_cast<int8_t>((b[l][r] >> (8 * j)) & 0xFFu);
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        int32_t s = c[l][e];
        for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
        c[l][e] = s;
      }
    }
  }
  // ldmatrix.x4 from the PTX ISA (.b16, 8 x 8 matrices): lanes 8j .. 8j + 7 address the rows of matrix j, and
  // lane i receives in register j the 4 bytes 4 (i % 4) .. of matrix j's row i / 4
  MINICPM_HD static void ldsm_x4(const uint8_t* const* row, uint32_t (*a)[4]) {
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < 4; ++j) std::memcpy(&a[i][j], row[8 * j + i / 4] + 4 * (i % 4), 4);
  }
  MINICPM_HD static void first(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
    for (int l = 0; l < 32; ++l)  // what acc held is not read (finish_group<.., false> leaves it)
      for (int e = 0; e < 4; ++e) c[l][e] = 0;
    run(a, b, c);
  }
};

// Group grp starts: its zero points and scales (loaded when the group before started; the first group's
// now) into zz and sbits, and the next group's loaded - not waited for until the next group starts, so their
// latency hides behind a group's mma (loaded at their use, or even within the group, the loads were not:
// the compiler sank them next to the epilogue).
template <typename SZ, int L>
MINICPM_HD void start_group(const Params& p, int grp, WarpState<L>& st) {
  const int ahead = grp + 1 < p.groups ? grp + 1 : grp;
  for (int l = 0; l < L; ++l) {
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      if (grp == 0) {
        st.znext[nt][l] = load_bits<SZ>(p.zeros, st.zrow[nt][l]);
        MINICPM_UNROLL
        for (int h = 0; h < 2; ++h) st.snext[nt][h][l] = load_bits<SZ>(p.scales, st.srow[nt][h][l]);
      }
      const int z = static_cast<int>(bits_to_f32<SZ>(st.znext[nt][l]));
      st.zz[nt][l] = static_cast<uint32_t>(z) * 0x01010101u;
      st.znext[nt][l] = load_bits<SZ>(p.zeros, st.zrow[nt][l] + ahead);
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        st.sbits[nt][h][l] = st.snext[nt][h][l];
        st.snext[nt][h][l] = load_bits<SZ>(p.scales, st.srow[nt][h][l] + ahead);
      }
    }
  }
}

// A finished group: y += float(acc) * s for the lane's columns n0w + 8 nt + 2t (+1); acc = 0.
// RESET: zero acc here; false where the group's first mma will ignore acc instead (Mma::first).
template <bool MAGIC, bool RESET, typename SZ, int L>
MINICPM_HD void finish_group(WarpState<L>& st) {
  for (int l = 0; l < L; ++l) {
    float s[kNT][2];
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) s[nt][h] = bits_to_f32<SZ>(st.sbits[nt][h][l]);
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt)
      MINICPM_UNROLL
      for (int nt = 0; nt < kNT; ++nt)
        MINICPM_UNROLL
        for (int e = 0; e < 4; ++e) {
          st.y[mt][nt][l][e] = fadd_rn(st.y[mt][nt][l][e], fmul_rn(int_to_float<MAGIC>(st.acc[mt][nt][l][e]), s[nt][e & 1]));
          if constexpr (RESET) st.acc[mt][nt][l][e] = 0;
        }
  }
}

// One warp's work on stage kb, held in shared memory at `stage` (x's rows) and `stage_w` (W's): its 64 rows
// of x from row wm (of the stage's tile) and 32 rows of W from wn. SZ: the dtype of scales and zeros.
// GT: k-tiles per group when a stage holds whole groups (G = 32, 64, 128: GT = 1, 2, 4), where every group
// starts and ends at a k-tile known at compile time; GT = 0: any other group (per channel, G >= 256),
// followed at run time with the warp's counter.
template <int GT, bool MAGIC, typename SZ, class Mma, int L>
MINICPM_HD void warp_stage(const Params& p, const uint8_t* stage, const uint8_t* stage_w, int kb, int wm, int wn,
                           const int (&lanes)[L], WarpState<L>& st) {
  static_assert(GT == 0 || GT == 1 || GT == 2 || GT == 4, "a stage of 4 k-tiles holds whole groups of 1, 2 or 4");
  MINICPM_UNROLL
  for (int kt = 0; kt < kBK / kKT; ++kt) {
    const int kg = kb * kBK + kKT * kt;
    if (kg >= p.K) break;  // the last stage's tail (K % 128 != 0): zero-filled, skipped
    // (K % 32 == 16: the last k-tile is half inside K, its other half zero in x and W)
    if constexpr (GT > 0) {
      if (kt % GT == 0) start_group<SZ, L>(p, (kb * (kBK / kKT) + kt) / GT, st);
    } else if (st.left == 0) {  // a group starts at this k-tile
      st.grp += 1;
      st.left = p.group_tiles;
      start_group<SZ, L>(p, st.grp, st);
    }
    uint32_t a[kMT][L][4], b[kNT][L][2];
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt) {  // (a0, a1, a2, a3) by ldmatrix from the permuted stage
      const uint8_t* rows[L];
      for (int l = 0; l < L; ++l) rows[l] = ldsm_row(stage, wm, mt, kt, lanes[l]);
      Mma::ldsm_x4(rows, a[mt]);
    }
    for (int l = 0; l < L; ++l) {
      const int g = lanes[l] >> 2, t = lanes[l] & 3;
      MINICPM_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        const uint8_t* src = stage_w + (wn + 8 * nt + g) * kStrideB + (kKT / 2) * kt + 4 * t;
        uint32_t w;
#ifdef __CUDA_ARCH__
        w = *reinterpret_cast<const uint32_t*>(src);
#else
        std::memcpy(&w, src, 4);
#endif
        word_to_b(w, st.zz[nt][l], p.mask_lo, b[nt][l][0], b[nt][l][1]);
      }
    }
    // GT > 0: a group's first k-tile sets acc (Mma::first) instead of adding to it
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt)
      MINICPM_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        if (GT > 0 && kt % (GT > 0 ? GT : 1) == 0)
          Mma::first(a[mt], b[nt], st.acc[mt][nt]);
        else
          Mma::run(a[mt], b[nt], st.acc[mt][nt]);
      }
    if constexpr (GT > 0) {
      if (kt % GT == GT - 1) finish_group<MAGIC, false, SZ, L>(st);
    } else {
      st.left -= 1;
      if (st.left == 0 || kg + kKT >= p.K) {
        finish_group<MAGIC, true, SZ, L>(st);
        st.left = 0;
      }
    }
  }
}

// The warp's outputs: rows m0w + 16 mt + g (+8), columns n0w + 8 nt + 2t (+1), inside [M, N]. The lane's 8
// token scales and 8 biases are loaded together first (one wait, not one per output).
template <int L>
MINICPM_HD void warp_store(const Params& p, int m0w, int n0w, const int (&lanes)[L], const WarpState<L>& st) {
  for (int l = 0; l < L; ++l) {
    const int g = lanes[l] >> 2, t = lanes[l] & 3;
    float xs[kMT][2], bs[kNT][2];
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt)
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int m = m0w + 16 * mt + g + 8 * h;
        xs[mt][h] = m < p.M ? ldg(p.xs + m) : 0.f;
      }
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const int n = n0w + 8 * nt + 2 * t + h;
        bs[nt][h] = p.bias != nullptr && n < p.N ? load_f32(p.bias, n, p.out_dtype) : 0.f;
      }
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt)
      MINICPM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int m = m0w + 16 * mt + g + 8 * (e >> 1);
        if (m >= p.M) continue;
        MINICPM_UNROLL
        for (int nt = 0; nt < kNT; ++nt) {
          const int n = n0w + 8 * nt + 2 * t + (e & 1);
          if (n >= p.N) continue;
          float v = fmul_rn(st.y[mt][nt][l][e], xs[mt][e >> 1]);
          if (p.bias != nullptr) v = fadd_rn(v, bs[nt][e & 1]);
          store_f32(p.out, static_cast<long>(m) * p.ldo + n, v, p.out_dtype);
        }
      }
  }
}

// Host-side choices, shared with the emulation: the kernel takes K % 16 == 0 (16-byte rows of x_q) and G a
// multiple of 32 dividing K (a group ends on a k-tile), or per channel (G == K). Rows of packed W are
// 16-byte aligned when K % 32 == 0, else 8-byte: then they are copied 8 bytes at a time (narrow_w).
inline bool supported(int K, int G) {
  return K > 0 && K % 16 == 0 && G > 0 && K % G == 0 && (G % kKT == 0 || G == K);
}
inline bool narrow_w(int K) { return K % 32 != 0; }
inline int group_tiles_for(int K, int G) { return G == K ? (K + kKT - 1) / kKT : G / kKT; }
// The instantiation's GT (warp_stage): 1, 2, 4 for G = 32, 64, 128 (not per channel), else 0.
inline int static_group_tiles(int K, int G) { return G != K && (G == 32 || G == 64 || G == 128) ? G / kKT : 0; }
inline bool magic_convert(int G) { return G <= kMagicMaxG; }
inline long blocks(int M, int N, int wm) {
  const int bm = kWarpRows * wm;
  return static_cast<long>((M + bm - 1) / bm) * ((N + kBN - 1) / kBN);
}
// Rows of x per block, as warps along M (Block's WM): 128-row blocks (WM = 2) unless they are fewer than the
// GPU's SMs - a few hundred rows of x, or a narrow layer - where 64-row blocks (half the work a block, two or
// more an SM) spread over more of them. wm_forced: 1 or 2 (the bench's variants), 0 = this rule.
inline int block_warps_m(int M, int N, int sms, int wm_forced) {
  if (wm_forced == 1 || wm_forced == 2) return wm_forced;
  return blocks(M, N, 2) < sms ? 1 : 2;
}

}  // namespace minicpm_int4_w4a8
