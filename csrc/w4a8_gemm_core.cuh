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
// Block: a kBM x kBN tile of the output (rows of x x rows of W), 8 warps as 2 (m) x 4 (n), each a
// 64 x 32 tile = 4 x 4 mma tiles. K in stages of kBK = 128 through shared memory (cp.async, kStages
// deep); a stage is 4 k-tiles of 32 consecutive k, so a group (32, 64, 128 ... or all of K) ends on a
// k-tile boundary (per channel with K % 32 == 16: the last k-tile half zero). Layouts are the canonical ones (packing.py), nothing repacked:
//   x_q int8 [M, K] (row stride K), qweight int32 [N, K/8] read as bytes (byte i of a row holds
//   k = 2i in its low nibble, 2i + 1 in its high one), scales / zeros [N, K/G] (fp16, bf16 or fp32).
//
// Fragments (PTX ISA, mma.m16n8k32 .s8; g = lane / 4, t = lane % 4): A a0 = row g, k 4t..4t+3;
// a1 = row g + 8, the same k; a2 / a3 = rows g / g + 8, k 16 + 4t..; B b0 = k 4t..4t+3 of column g,
// b1 = k 16 + 4t..; C c0, c1 = row g, columns 2t, 2t + 1, c2, c3 = row g + 8. An mma sums over its 32
// k in any order, so the kernel chooses which actual k sits at each logical k, the same for A and B:
// lane t takes the 8 consecutive k [8t, 8t + 8) of the k-tile - one 8-byte load of a row of x gives
// (a0, a2), and one packed word of a row of W (its 8 nibbles) gives (b0, b1):
//   lo = ((w & 0x0F0F0F0F) | 0x80808080) - z * 0x01010101     bytes 128 + q - z of k 0, 2, 4, 6
//   hi = the same on w >> 4                                    k 1, 3, 5, 7
//   b0 = PRMT(lo, hi: k 0, 1, 2, 3) ^ 0x80808080, b1 = PRMT(k 4, 5, 6, 7) ^ 0x80808080
// (q - z lies in [-15, 15]: every byte stays in [113, 143] before the XOR, so no borrow crosses a byte).
//
// Shared memory rows are padded so that a warp's fragment loads hit distinct banks: x rows 160 bytes
// (LDS.64 by 16 lanes = 4 rows x 32 bytes), W rows 80 bytes (LDS.32 by 32 lanes = 8 rows x 16 bytes).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstring>

#include "hd_common.cuh"

namespace minicpm_int4_w4a8 {

using minicpm_int4_hd::byte_perm;
using minicpm_int4_hd::ldg;

constexpr int kBM = 128;          // rows of x per block
constexpr int kBN = 128;          // rows of W (output columns) per block
constexpr int kBK = 128;          // k per pipeline stage
constexpr int kKT = 32;           // k per mma (a k-tile)
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;
constexpr int kMT = kBM / kWarpsM / 16;  // m16 tiles per warp: 4
constexpr int kNT = kBN / kWarpsN / 8;   // n8 tiles per warp: 4
constexpr int kStages = 3;
constexpr int kStrideA = kBK + 32;       // bytes per row of x in shared memory
constexpr int kStrideB = kBK / 2 + 16;   // bytes per row of packed W
constexpr int kStageA = kBM * kStrideA;
constexpr int kStageB = kBN * kStrideB;
constexpr int kStageBytes = kStageA + kStageB;
constexpr int kSmemBytes = kStages * kStageBytes;  // 92160: dynamic shared memory, opted in by the launcher
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
  int sz_dtype;           // of scales and zeros
  int out_dtype;          // of out and bias
};

// Block id -> (row block, column block), kGroupM row blocks at a time: consecutive blocks share W's tile.
MINICPM_HD void block_tile(int pid, int M, int N, int& bm, int& bn) {
  const int nbm = (M + kBM - 1) / kBM, nbn = (N + kBN - 1) / kBN;
  const int width = kGroupM * nbn;
  const int first = (pid / width) * kGroupM;
  const int size = nbm - first < kGroupM ? nbm - first : kGroupM;
  bm = first + (pid % width) % size;
  bn = (pid % width) / size;
}

// The 16-byte pieces of stage kb (k from kb * kBK) that thread tid copies into shared memory: piece
// i < kPiecesA of x, then kPiecesB of W. dst: offset in the stage; src: the global address; bytes: how
// many of the piece's bytes lie inside x or W (16; 0 past M, N or K; 8 for the half of a W piece at the
// end of a row when K % 32 == 16) - the rest is zero-filled, and src is then a valid address.
constexpr int kPiecesA = kBM * kBK / 16 / kThreads;       // 4
constexpr int kPiecesB = kBN * kBK / 2 / 16 / kThreads;   // 2
MINICPM_HD void stage_piece(const Params& p, int m0, int n0, int kb, int tid, int i, int& dst, const void*& src,
                            int& bytes) {
  const int k0 = kb * kBK;
  if (i < kPiecesA) {
    const int c = tid + kThreads * i, row = c / (kBK / 16), col = c % (kBK / 16);
    dst = row * kStrideA + 16 * col;
    bytes = m0 + row < p.M && k0 + 16 * col < p.K ? 16 : 0;
    src = bytes ? static_cast<const void*>(p.xq + static_cast<long>(m0 + row) * p.K + k0 + 16 * col) : p.xq;
  } else {
    const int c = tid + kThreads * (i - kPiecesA), row = c / (kBK / 32), col = c % (kBK / 32);
    const int left = (p.K - k0 - 32 * col) / 2;  // bytes of the row from the piece on
    dst = kStageA + row * kStrideB + 16 * col;
    bytes = n0 + row < p.N && left > 0 ? (left < 16 ? left : 16) : 0;
    src = bytes ? static_cast<const void*>(p.qb + static_cast<long>(n0 + row) * (p.K / 2) + k0 / 2 + 16 * col) : p.qb;
  }
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
  int grp;                      // the current group (warp-uniform), -1 before the first
  int left;                     // its k-tiles still to come: a counter, not a division by G every k-tile
};

template <int L>
MINICPM_HD void warp_init(WarpState<L>& st) {
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
  MINICPM_HD static void first(const uint32_t (*a)[4], const uint32_t (*b)[2], int32_t (*c)[4]) {
    for (int l = 0; l < 32; ++l)  // what acc held is not read (finish_group<.., false> leaves it)
      for (int e = 0; e < 4; ++e) c[l][e] = 0;
    run(a, b, c);
  }
};

// The zero points of the group starting at k: W rows n0w + 8 nt + g (rows past N read row N - 1).
template <int L>
MINICPM_HD void load_zeros(const Params& p, int n0w, int grp, const int (&lanes)[L], WarpState<L>& st) {
  const int groups = p.groups;
  for (int l = 0; l < L; ++l) {
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt) {
      int n = n0w + 8 * nt + (lanes[l] >> 2);
      n = n < p.N ? n : p.N - 1;
      const int z = static_cast<int>(load_f32(p.zeros, static_cast<long>(n) * groups + grp, p.sz_dtype));
      st.zz[nt][l] = static_cast<uint32_t>(z) * 0x01010101u;
    }
  }
}

// A finished group: y += float(acc) * s for the lane's columns n0w + 8 nt + 2t (+1); acc = 0.
// RESET: zero acc here; false where the group's first mma will ignore acc instead (Mma::first).
template <bool MAGIC, bool RESET, int L>
MINICPM_HD void finish_group(const Params& p, int n0w, int grp, const int (&lanes)[L], WarpState<L>& st) {
  const int groups = p.groups;
  for (int l = 0; l < L; ++l) {
    float s[kNT][2];
    MINICPM_UNROLL
    for (int nt = 0; nt < kNT; ++nt)
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        int n = n0w + 8 * nt + 2 * (lanes[l] & 3) + h;
        n = n < p.N ? n : p.N - 1;
        s[nt][h] = load_f32(p.scales, static_cast<long>(n) * groups + grp, p.sz_dtype);
      }
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

// One warp's work on stage kb, held in shared memory at `stage` (kStageBytes): its 64 rows of x from
// row wm (of the stage's tile) and 32 rows of W from wn, n0w = the first of those W rows in W.
// GT: k-tiles per group when a stage holds whole groups (G = 32, 64, 128: GT = 1, 2, 4), where every group
// starts and ends at a k-tile known at compile time; GT = 0: any other group (per channel, G >= 256),
// followed at run time with the warp's counter.
template <int GT, bool MAGIC, class Mma, int L>
MINICPM_HD void warp_stage(const Params& p, const uint8_t* stage, int kb, int wm, int wn, int n0w,
                           const int (&lanes)[L], WarpState<L>& st) {
  static_assert(GT == 0 || GT == 1 || GT == 2 || GT == 4, "a stage of 4 k-tiles holds whole groups of 1, 2 or 4");
  MINICPM_UNROLL
  for (int kt = 0; kt < kBK / kKT; ++kt) {
    const int kg = kb * kBK + kKT * kt;
    if (kg >= p.K) break;  // the last stage's tail (K % 128 != 0): zero-filled, skipped
    // (K % 32 == 16: the last k-tile is half inside K, its other half zero in x and W)
    if constexpr (GT > 0) {
      if (kt % GT == 0) load_zeros<L>(p, n0w, (kb * (kBK / kKT) + kt) / GT, lanes, st);
    } else if (st.left == 0) {  // a group starts at this k-tile
      st.grp += 1;
      st.left = p.group_tiles;
      load_zeros<L>(p, n0w, st.grp, lanes, st);
    }
    uint32_t a[kMT][L][4], b[kNT][L][2];
    for (int l = 0; l < L; ++l) {
      const int g = lanes[l] >> 2, t = lanes[l] & 3;
      MINICPM_UNROLL
      for (int mt = 0; mt < kMT; ++mt)
        MINICPM_UNROLL
        for (int h = 0; h < 2; ++h) {  // rows g, g + 8: (a0, a2), (a1, a3)
          const uint8_t* src = stage + (wm + 16 * mt + g + 8 * h) * kStrideA + kKT * kt + 8 * t;
          uint32_t v[2];
#ifdef __CUDA_ARCH__
          const uint2 u = *reinterpret_cast<const uint2*>(src);
          v[0] = u.x, v[1] = u.y;
#else
          std::memcpy(v, src, 8);
#endif
          a[mt][l][h] = v[0];
          a[mt][l][2 + h] = v[1];
        }
      MINICPM_UNROLL
      for (int nt = 0; nt < kNT; ++nt) {
        const uint8_t* src = stage + kStageA + (wn + 8 * nt + g) * kStrideB + (kKT / 2) * kt + 4 * t;
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
      if (kt % GT == GT - 1) finish_group<MAGIC, false, L>(p, n0w, (kb * (kBK / kKT) + kt) / GT, lanes, st);
    } else {
      st.left -= 1;
      if (st.left == 0 || kg + kKT >= p.K) {
        finish_group<MAGIC, true, L>(p, n0w, st.grp, lanes, st);
        st.left = 0;
      }
    }
  }
}

// The warp's outputs: rows m0w + 16 mt + g (+8), columns n0w + 8 nt + 2t (+1), inside [M, N].
template <int L>
MINICPM_HD void warp_store(const Params& p, int m0w, int n0w, const int (&lanes)[L], const WarpState<L>& st) {
  for (int l = 0; l < L; ++l) {
    const int g = lanes[l] >> 2, t = lanes[l] & 3;
    MINICPM_UNROLL
    for (int mt = 0; mt < kMT; ++mt)
      MINICPM_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int m = m0w + 16 * mt + g + 8 * (e >> 1);
        if (m >= p.M) continue;
        const float xs = ldg(p.xs + m);
        MINICPM_UNROLL
        for (int nt = 0; nt < kNT; ++nt) {
          const int n = n0w + 8 * nt + 2 * t + (e & 1);
          if (n >= p.N) continue;
          float v = fmul_rn(st.y[mt][nt][l][e], xs);
          if (p.bias != nullptr) v = fadd_rn(v, load_f32(p.bias, n, p.out_dtype));
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
inline long blocks(int M, int N) { return static_cast<long>((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN); }

}  // namespace minicpm_int4_w4a8
