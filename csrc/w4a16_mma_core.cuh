// The warp-level work of the W4A16 tensor-core decode kernel (csrc/w4a16_gemv.cu, M = 1..16),
// written once for the device and the host: on the GPU a warp runs it with L = 1 (each thread its
// own lane, the mma a real mma.sync); tests/csrc/host_emu.cu runs it with L = 32 (all lanes'
// registers in arrays, the mma emulated from the PTX fragment layout), so the fragment bookkeeping
// is tested in CI without a GPU.
//
// Layout: the canonical one (packing.py), no repacking - qweight int32 [N, K/8] (nibble i of word
// j = q[n, 8j + i]), scales / zeros [N, K/G] in x's dtype, x [M, K] with row stride ldx.
//
// The product y^T = W x^T on m16n8k16 tensor cores: A = a 16 x 16 tile of W (rows n, cols k),
// B = x^T (16 k x 8 rows of x), C = 16 n x 8 m in fp32. A mma sums over its 16 k in any order, so
// the kernel picks which actual k sits in each logical column, the same for A and B: lane (g, t)
// (g = lane / 4, t = lane % 4) of a warp owns, in a 128-k chunk, the 32 consecutive k
// [32t, 32t + 32): four canonical words per row (one 16-byte load), for rows g and g + 8 of the
// tile. Word i of those (8 k) feeds k-tiles 2i and 2i + 1 of the chunk:
//
//   k-tile 2i + h:  logical cols (2t, 2t+1)   <-  nibbles (2h, 2h + 4)      of word i
//                   logical cols (2t+8, 2t+9) <-  nibbles (2h + 1, 2h + 5)
//
// which are exactly the pairs one LOP3 extracts into a half2 / bfloat162 (w & 0x000F000F for
// nibbles 0 and 4, w & 0x00F000F0 for 1 and 5, the same on w >> 8 for 2, 6 and 3, 7), so no
// nibble is moved twice. x is read as 16-byte loads of the same 32 k, and two PRMTs give each
// k-tile's B registers. The nibble bits land in the mantissa of a magic number: fp16
// 0x6400 | q = 1024 + q, 0x6400 | q << 4 = 1024 + 16q; bf16 0x4300 | q = 128 + q (its 7-bit
// mantissa has no room for 16q, so bf16 shifts each nibble down); subtracting the magic plus the
// zero point is exact and gives the small integer q - z.
//
// Scaling: when a 128-k chunk lies in one group (G a multiple of 128, or per channel), the
// tensor cores sum x * (q - z) exactly-multiplied in fp32 and the chunk's sum is scaled once per
// row (POST); otherwise each weight is (q - z) * s rounded to x's dtype - the reference's own
// dequantized weight - before the mma.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "hd_common.cuh"

namespace minicpm_int4_mma {

using minicpm_int4_hd::ldg;

constexpr int kWarps = 8;             // warps per block (W); they split K (chunk c goes to warp c % W)
constexpr int kWarpsSmallN = 16;      // W when N gives fewer blocks than SMs (k/v projections)
constexpr int kChunk = 128;           // k per chunk: 4 lanes x 32
constexpr int kMaxM = 16;             // rows of x per launch: NB = 1 or 2 mma column blocks of 8
// Chunks of W a warp has requested ahead of the one it multiplies (AHEAD): 1 is the kernel's default,
// 2 the deeper variant (launcher variant 3) that keeps up to three chunks' loads in flight a warp.
constexpr int kAheadDeep = 2;

// ---- packed pairs: two fp16 / bf16 in a uint32 (low half = first element) ----------------------
template <typename T> struct Pair;
template <> struct Pair<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024, 1024)
  MINICPM_HD static float lo(uint32_t v) { return __half2float(__ushort_as_half(static_cast<unsigned short>(v & 0xFFFFu))); }
  MINICPM_HD static float hi(uint32_t v) { return __half2float(__ushort_as_half(static_cast<unsigned short>(v >> 16))); }
  MINICPM_HD static uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  MINICPM_HD static float to_f32(__half v) { return __half2float(v); }
  MINICPM_HD static __half from_f32(float v) { return __float2half_rn(v); }
};
template <> struct Pair<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // (128, 128)
  MINICPM_HD static float lo(uint32_t v) { return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(v & 0xFFFFu))); }
  MINICPM_HD static float hi(uint32_t v) { return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(v >> 16))); }
  MINICPM_HD static uint32_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  MINICPM_HD static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  MINICPM_HD static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};

MINICPM_HD uint32_t pack2(uint32_t lo16, uint32_t hi16) { return (lo16 & 0xFFFFu) | (hi16 << 16); }

// a * b + c on both halves, rounded once to T (exact here whenever the result is representable).
// Host: in float, exact for the products that occur (a small integer times a 16-bit float) and then
// rounded once like the hardware's fma.
template <typename T>
MINICPM_HD uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
  using V2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
  V2 r = __hfma2(*reinterpret_cast<const V2*>(&a), *reinterpret_cast<const V2*>(&b), *reinterpret_cast<const V2*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
#else
  const float l = static_cast<float>(static_cast<double>(Pair<T>::lo(a)) * Pair<T>::lo(b) + Pair<T>::lo(c));
  const float h = static_cast<float>(static_cast<double>(Pair<T>::hi(a)) * Pair<T>::hi(b) + Pair<T>::hi(c));
  return pack2(Pair<T>::bits(l), Pair<T>::bits(h));
#endif
}

template <typename T> MINICPM_HD uint32_t splat(float v) { const uint32_t b = Pair<T>::bits(v); return pack2(b, b); }

using minicpm_int4_hd::byte_perm;

// Per row of a lane (g or g + 8) and chunk: what the dequantization subtracts and multiplies.
struct RowConsts {
  uint32_t zlo;   // fp16: -(1024 + z) pairs (for 1024 + q); bf16: -(128 + z)
  uint32_t zhi;   // fp16: -(64 + z) (for (1024 + 16q) / 16); bf16: unused
  uint32_t s2;    // the scale, both halves (pre-scaling)
  float s;        // the scale in fp32 (post-scaling)
};

// From the raw bits of a row's scale and zero point (one 2-byte load each).
template <typename T>
MINICPM_HD RowConsts row_consts(uint32_t s_bits, uint32_t z_bits) {
  RowConsts rc;
  const uint32_t z2 = pack2(z_bits, z_bits), minus_one = splat<T>(-1.f);
  rc.s2 = pack2(s_bits, s_bits);
  rc.s = Pair<T>::lo(rc.s2);
  // z is an integer 0..15: -(magic + z) is exact in one fma
  if constexpr (std::is_same<T, __half>::value) {
    rc.zlo = fma2<T>(z2, minus_one, splat<T>(-1024.f));
    rc.zhi = fma2<T>(z2, minus_one, splat<T>(-64.f));
  } else {
    rc.zlo = fma2<T>(z2, minus_one, splat<T>(-128.f));
    rc.zhi = rc.zlo;
  }
  return rc;
}

// (a & b) | c; ASM: as one LOP3 on the device. Left to itself, ptxas split it into an AND and an OR in the
// ring variant's loop for the mask of nibbles 1 and 5 (+0.2 - 0.45 instructions a weight); the default
// kernels keep the plain expression, which it compiles to one LOP3 there.
MINICPM_HD uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  return (a & b) | c;
#endif
}

// Word w (nibbles 0..7 = 8 consecutive k of one row) -> the four pairs (nib 0,4), (1,5), (2,6),
// (3,7) as q - z (POST) or (q - z) * s rounded to T.
template <typename T, bool POST, bool ASM = false>
MINICPM_HD void dequant_word(uint32_t w, const RowConsts& rc, uint32_t mask_lo, uint32_t out[4]) {
  const uint32_t one = splat<T>(1.f);
  if constexpr (std::is_same<T, __half>::value) {
    const uint32_t sixteenth = splat<T>(1.f / 16.f);
    const uint32_t w8 = w >> 8;
    if constexpr (ASM) {
      out[0] = fma2<T>(and_or(w, mask_lo, Pair<T>::kMagic), one, rc.zlo);                  // 1024 + q - (1024 + z)
      out[1] = fma2<T>(and_or(w, mask_lo << 4, Pair<T>::kMagic), sixteenth, rc.zhi);       // (1024 + 16q) / 16 - (64 + z)
      out[2] = fma2<T>(and_or(w8, mask_lo, Pair<T>::kMagic), one, rc.zlo);
      out[3] = fma2<T>(and_or(w8, mask_lo << 4, Pair<T>::kMagic), sixteenth, rc.zhi);
    } else {
      out[0] = fma2<T>((w & mask_lo) | Pair<T>::kMagic, one, rc.zlo);
      out[1] = fma2<T>((w & (mask_lo << 4)) | Pair<T>::kMagic, sixteenth, rc.zhi);
      out[2] = fma2<T>((w8 & mask_lo) | Pair<T>::kMagic, one, rc.zlo);
      out[3] = fma2<T>((w8 & (mask_lo << 4)) | Pair<T>::kMagic, sixteenth, rc.zhi);
    }
  } else {
    MINICPM_UNROLL
    for (int j = 0; j < 4; ++j) {
      const uint32_t v = w >> (4 * j);
      out[j] = fma2<T>(ASM ? and_or(v, mask_lo, Pair<T>::kMagic) : (v & mask_lo) | Pair<T>::kMagic, one, rc.zlo);
    }
  }
  if constexpr (!POST) {
    const uint32_t minus_zero = 0x80008000u;  // x + (-0) = x for every x, zeros included
    MINICPM_UNROLL
    for (int j = 0; j < 4; ++j) out[j] = fma2<T>(out[j], rc.s2, minus_zero);  // (q - z) * s, one rounding
  }
}

// ---- the tensor-core op --------------------------------------------------------------------------
// d = a b + c for one warp; a/b/c hold L lanes' registers (L = 1: this thread's, on the device).
struct DeviceMma {
  template <typename T>
  MINICPM_HD static void run(const uint32_t (*a)[4], const uint32_t (*b)[2], float (*c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __half>::value) {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3])
                   : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
    } else {
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3])
                   : "r"(a[0][0]), "r"(a[0][1]), "r"(a[0][2]), "r"(a[0][3]), "r"(b[0][0]), "r"(b[0][1]));
    }
#else
    (void)a, (void)b, (void)c;
#endif
  }
};

// The same op on the host for all 32 lanes, from the PTX ISA's m16n8k16 fragment layout (.f16 /
// .bf16 A row-major, B column-major, f32 C): g = lane / 4, t = lane % 4,
//   A: a[l][0] = (A[g][2t], A[g][2t+1]), a[l][1] = rows g+8, a[l][2] = cols 2t+8, 2t+9 of row g,
//      a[l][3] = row g+8, cols 2t+8, 2t+9;   B: b[l][0] = (B[2t][g], B[2t+1][g]), b[l][1] = rows 2t+8, 2t+9;
//   C: c[l][0..1] = C[g][2t, 2t+1], c[l][2..3] = C[g+8][2t, 2t+1].
// The products are exact in fp32 and summed in k order (the hardware's order and rounding inside
// an mma differ; the tests' tolerance is derived for any fp32 summation order).
struct HostMma {
  template <typename T>
  MINICPM_HD static void run(const uint32_t (*a)[4], const uint32_t (*b)[2], float (*c)[4]) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = Pair<T>::lo(a[l][r]);
        A[row][col + 1] = Pair<T>::hi(a[l][r]);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * t + 8 * r][g] = Pair<T>::lo(b[l][r]);
        B[2 * t + 8 * r + 1][g] = Pair<T>::hi(b[l][r]);
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float acc = c[l][e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        c[l][e] = acc;
      }
    }
  }
};

template <typename T> struct Params {
  const T* x;
  const int32_t* qweight;
  const T* scales;
  const T* zeros;
  int M, N, K, group_size;
  long ldx;
  uint32_t mask_lo;  // 0x000F000F, passed at run time so that ptxas keeps (w & mask) | magic one LOP3
  int group_shift;   // group of k = k >> group_shift (31 per channel)
  const T* input_scale;  // [K] or nullptr: x * input_scale (rounded to T) is what the mma reads as x
  const int32_t* input_perm;  // [K] or nullptr: x[:, input_perm] is what the mma reads as x (never with input_scale)
};

// Per lane, before a warp's loop: where its rows of W, their scales and zero points, and its rows of
// x start (rows past N read row N - 1, rows of x past M re-read row M - 1: their outputs are dropped).
template <int NT, int NB, int L>
struct LaneRows {
  const uint4* wp[NT][2][L];
  const unsigned short* sp[NT][2][L];
  const unsigned short* zp[NT][2][L];
  int kl[L];            // the lane's first k in a chunk (32 t)
  const int32_t* pp[L]; // P: this lane's channel indices, from chunk 0
  const void* xp[NB][L];  // its rows of x (T)
};

template <typename T, int NT, int NB, bool P, int L>
MINICPM_HD void lane_rows(const Params<T>& p, int n0, const int (&lanes)[L], LaneRows<NT, NB, L>& r) {
  const int groups = p.K / p.group_size;
  for (int l = 0; l < L; ++l) {
    const int g = lanes[l] >> 2, t = lanes[l] & 3;
    r.kl[l] = 32 * t;
    r.pp[l] = P ? p.input_perm + r.kl[l] : nullptr;
    MINICPM_UNROLL
    for (int nt = 0; nt < NT; ++nt)
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        int n = n0 + 16 * nt + g + 8 * h;
        n = n < p.N ? n : p.N - 1;
        r.wp[nt][h][l] = reinterpret_cast<const uint4*>(p.qweight + static_cast<long>(n) * (p.K / 8)) + t;
        r.sp[nt][h][l] = reinterpret_cast<const unsigned short*>(p.scales) + static_cast<long>(n) * groups;
        r.zp[nt][h][l] = reinterpret_cast<const unsigned short*>(p.zeros) + static_cast<long>(n) * groups;
      }
    MINICPM_UNROLL
    for (int nb = 0; nb < NB; ++nb) {
      const unsigned row = 8 * nb + g < p.M ? 8 * nb + g : p.M - 1;
      r.xp[nb][l] = p.x + static_cast<unsigned long>(row) * static_cast<unsigned long>(p.ldx);
    }
  }
}

// One chunk's raw weights for a lane's rows: the 16-byte piece of each row, its scale and zero point.
template <int NT, int L>
struct RawChunk {
  uint4 w[NT][2][L];
  unsigned short s[NT][2][L], z[NT][2][L];
};

// The product of chunk c: dequantize the raw words into A fragments, load x into B fragments, and
// the mma into acc (POST: each 128-k chunk's fp32 sum times the row's scale). r by value: by reference,
// nvcc kept some of it in memory and the default kernels' loops grew by an instruction or two a chunk.
template <typename T, int NT, int NB, bool POST, class Mma, int L, bool S, bool P, bool ASM = false>
MINICPM_HD void chunk_product(const Params<T>& p, int c, const LaneRows<NT, NB, L> r, const RawChunk<NT, L>& cur,
                              float (&acc)[NT][NB][L][4]) {
  uint32_t a[NT][8][L][4];
  uint32_t b[NB][8][L][2];
  float sc[NT][L][2];  // POST: the scales of rows g and g + 8
  for (int l = 0; l < L; ++l) {
    MINICPM_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      MINICPM_UNROLL
      for (int h = 0; h < 2; ++h) {
        const RowConsts rc = row_consts<T>(cur.s[nt][h][l], cur.z[nt][h][l]);
        sc[nt][l][h] = rc.s;
        const uint4 w4 = cur.w[nt][h][l];
        const uint32_t words[4] = {w4.x, w4.y, w4.z, w4.w};
        MINICPM_UNROLL
        for (int i = 0; i < 4; ++i) {
          uint32_t d[4];
          dequant_word<T, POST, ASM>(words[i], rc, p.mask_lo, d);
          // k-tile 2i: nibbles (0,4) -> A reg h (cols 2t, 2t+1), (1,5) -> A reg 2 + h (cols 2t+8, 2t+9);
          // k-tile 2i + 1: nibbles (2,6) and (3,7)
          a[nt][2 * i][l][h] = d[0];
          a[nt][2 * i][l][2 + h] = d[1];
          a[nt][2 * i + 1][l][h] = d[2];
          a[nt][2 * i + 1][l][2 + h] = d[3];
        }
      }
    }
    MINICPM_UNROLL
    for (int i = 0; i < 4; ++i) {
      // S: the input scale's 8 k of this piece, shared by every row of x
      [[maybe_unused]] uint4 mv;
      if constexpr (S) mv = ldg(reinterpret_cast<const uint4*>(p.input_scale + c * kChunk + r.kl[l] + 8 * i));
      // P: the channel of each of the piece's 8 k, shared by every row of x
      [[maybe_unused]] int idx[8];
      if constexpr (P) minicpm_int4_hd::load_idx8(r.pp[l] + c * kChunk + 8 * i, idx);
      MINICPM_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        if constexpr (P) {
          // the element pairs the k-tiles take (below), packed straight from the gathered 2-byte
          // loads: one PRMT per pair instead of packing a piece and then permuting it
          const unsigned short* row = static_cast<const unsigned short*>(r.xp[nb][l]);
          uint32_t e[8];
          MINICPM_UNROLL
          for (int j = 0; j < 8; ++j) e[j] = ldg(row + idx[j]);
          b[nb][2 * i][l][0] = e[0] | (e[4] << 16);
          b[nb][2 * i][l][1] = e[1] | (e[5] << 16);
          b[nb][2 * i + 1][l][0] = e[2] | (e[6] << 16);
          b[nb][2 * i + 1][l][1] = e[3] | (e[7] << 16);
          continue;
        }
        uint4 xv = ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(r.xp[nb][l]) + c * kChunk + r.kl[l] + 8 * i));
        if constexpr (S) {
          const uint32_t minus_zero = 0x80008000u;  // x * m + (-0) = x * m, signed zeros included
          xv.x = fma2<T>(xv.x, mv.x, minus_zero);
          xv.y = fma2<T>(xv.y, mv.y, minus_zero);
          xv.z = fma2<T>(xv.z, mv.z, minus_zero);
          xv.w = fma2<T>(xv.w, mv.w, minus_zero);
        }
        // x[k0 + 8i + j] = element j of xv; k-tile 2i + h takes (j = 2h, 2h + 4) and (2h + 1, 2h + 5)
        b[nb][2 * i][l][0] = byte_perm(xv.x, xv.z, 0x5410);
        b[nb][2 * i][l][1] = byte_perm(xv.x, xv.z, 0x7632);
        b[nb][2 * i + 1][l][0] = byte_perm(xv.y, xv.w, 0x5410);
        b[nb][2 * i + 1][l][1] = byte_perm(xv.y, xv.w, 0x7632);
      }
    }
  }
  if constexpr (POST) {
    MINICPM_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      MINICPM_UNROLL
      for (int nb = 0; nb < NB; ++nb) {
        float part[L][4];
        for (int l = 0; l < L; ++l)
          MINICPM_UNROLL
          for (int e = 0; e < 4; ++e) part[l][e] = 0.f;
        MINICPM_UNROLL
        for (int kt = 0; kt < 8; ++kt) Mma::template run<T>(a[nt][kt], b[nb][kt], part);
        for (int l = 0; l < L; ++l)
          MINICPM_UNROLL
          for (int e = 0; e < 4; ++e) acc[nt][nb][l][e] = fmaf(part[l][e], sc[nt][l][e >> 1], acc[nt][nb][l][e]);
      }
    }
  } else {
    MINICPM_UNROLL
    for (int kt = 0; kt < 8; ++kt)
      MINICPM_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        MINICPM_UNROLL
        for (int nb = 0; nb < NB; ++nb) Mma::template run<T>(a[nt][kt], b[nb][kt], acc[nt][nb]);
  }
}

template <int NT, int NB, int L>
MINICPM_HD void zero_acc(float (&acc)[NT][NB][L][4]) {
  MINICPM_UNROLL
  for (int nt = 0; nt < NT; ++nt)
    MINICPM_UNROLL
    for (int nb = 0; nb < NB; ++nb)
      for (int l = 0; l < L; ++l)
        MINICPM_UNROLL
        for (int e = 0; e < 4; ++e) acc[nt][nb][l][e] = 0.f;
}

// One warp's partial sums over its chunks (c = warp, warp + W, ...) for the 16 * NT rows from
// n0 and the 8 * NB rows of x: acc[nt][nb][l][e] in the C layout. lanes[l] = the lane ids held.
// S: p.input_scale is set, and each 16-byte piece of x is multiplied by the same piece of it as it
// is loaded (one packed HFMA2 with -0 per pair: x * m rounded once to T, the bits of torch's x * m).
// P: p.input_perm is set, and each piece is gathered through it (the 8 indices loaded once for
// every row of x, then one 2-byte load per element; hd_common.cuh); never with S.
template <typename T, int NT, int NB, bool POST, int W, class Mma, int L, bool S = false, bool P = false, int AHEAD = 1>
MINICPM_HD void warp_partials(const Params<T>& p, int n0, int warp, const int (&lanes)[L], float (&acc)[NT][NB][L][4]) {
  static_assert(!(S && P), "x read through a channel order is not multiplied by an input scale here: "
                           "the launcher gathers x first for a layer with both");
  const int chunks = p.K / kChunk;
  LaneRows<NT, NB, L> r;
  lane_rows<T, NT, NB, P, L>(p, n0, lanes, r);
  zero_acc<NT, NB, L>(acc);

  // AHEAD chunks of lookahead for the weights (the HBM stream): chunk c + AHEAD * W's words, scales
  // and zero points are loaded before chunk c is dequantized, so each lane keeps AHEAD + 1 chunks'
  // 16-byte weight loads in flight (AHEAD = 2: 12 more registers a lane per 16-row tile). A trip with
  // no chunk that far ahead re-reads its own (an L1 hit) instead of branching.
  // x (a few KiB, L1/L2-resident) is loaded in the trip that uses it: registers for occupancy.
  static_assert(AHEAD == 1 || AHEAD == 2, "lookahead of 1 or 2 chunks");
  auto load = [&](int c, RawChunk<NT, L>& raw) {
    for (int l = 0; l < L; ++l) {
      const int k0 = c * kChunk + r.kl[l];  // this lane's 32 k, all in one group
      const int grp = k0 >> p.group_shift;
      MINICPM_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        MINICPM_UNROLL
        for (int h = 0; h < 2; ++h) {  // rows g, g + 8 of the tile
          raw.w[nt][h][l] = ldg(r.wp[nt][h][l] + 4 * c);
          raw.s[nt][h][l] = ldg(r.sp[nt][h][l] + grp);
          raw.z[nt][h][l] = ldg(r.zp[nt][h][l] + grp);
        }
    }
  };
  RawChunk<NT, L> cur;
  [[maybe_unused]] RawChunk<NT, L> mid;  // AHEAD = 2: the chunk after cur
  if (warp < chunks) {
    load(warp, cur);
    if constexpr (AHEAD == 2) load(warp + W < chunks ? warp + W : warp, mid);
  }
#ifdef __CUDA_ARCH__
// AHEAD + 1 trips per iteration: the buffers' rotation becomes a register renaming, not moves
#pragma unroll(AHEAD + 1)
#endif
  for (int c = warp; c < chunks; c += W) {
    RawChunk<NT, L> next;
    load(c + AHEAD * W < chunks ? c + AHEAD * W : c, next);
    chunk_product<T, NT, NB, POST, Mma, L, S, P>(p, c, r, cur, acc);
    if constexpr (AHEAD == 2) {
      cur = mid;
      mid = next;
    } else {
      cur = next;
    }
  }
}

// ---- the ring variant (launcher variant 4): W through shared memory, kRingDepth chunks ahead ------------
// Why: the register lookahead above keeps one chunk (NT KiB a warp) of W in flight per warp while it
// multiplies another, and a block of 8 warps with two tiles holds ~136 registers a thread, so an SM runs
// one such block: ~16 KiB of HBM reads in flight an SM, about what the H200 run's 2.1 TB/s streaming rate
// means at a loaded DRAM latency near 1 us (Little's law: bytes in flight = bandwidth x latency), half
// of the copy bandwidth. Here each lane copies its own 16-byte pieces of chunk c + D * W with cp.async
// into a ring of D slots in shared memory, and loads that chunk's scales and zero points (2 bytes each,
// too small for cp.async) into a register ring of the same depth, so D - 1 chunks stay in flight while it
// multiplies one: D = 4 keeps three (3 - 6 KiB a warp, 24 - 48 KiB a block of 8 warps; with one tile, two or
// three such blocks an SM).
//
// A slot holds, per lane, its 2 NT pieces of W, lane-minor (uint4 w[2 NT][32]: a warp's reads of one piece
// are 512 contiguous bytes, no bank conflict). Each lane reads back only what it copied itself, so
// cp.async.wait_group is all the synchronisation (no barrier); a slot is refilled after the chunk read from
// it has been multiplied (the mma consumed its registers), so a refill never overwrites what is still to
// be read. The loop runs D trips an iteration so that every slot index is a constant. Trips past the warp's
// last chunk still commit a group (empty copies: src-size 0, nothing read) so the wait count stays fixed.
// Plain x only (no input scale, no channel order), as variant 3; x is read as in the default kernel.
constexpr int kRingDepth = 4;
template <int NT> MINICPM_HD constexpr int ring_slot_bytes() { return 32 * 16 * 2 * NT; }
template <int NT> MINICPM_HD constexpr int ring_warp_bytes() { return kRingDepth * ring_slot_bytes<NT>(); }

// Cp: the copies' policy - cp.async on the device (csrc/w4a16_gemv.cu), a deferred copy per commit
// group on the host (tests/csrc/host_emu.cu: a group lands only when a wait lets it, so a slot read too
// early reads what the ring held before). copy16(dst, src, bytes): `bytes` (16 or 0) of src, the rest
// zero-filled; commit(); wait<N>().
// WAIT: the copy groups a trip leaves in flight before it reads its slot - kRingDepth - 1, the chunks
// after its own; the emulation's control case instantiates kRingDepth (one too many: a slot read before
// its copy landed) to show that its deferred copies catch that.
template <typename T, int NT, int NB, bool POST, int W, class Mma, int L, class Cp, int WAIT = kRingDepth - 1>
MINICPM_HD void warp_partials_ring(const Params<T>& p, int n0, int warp, const int (&lanes)[L], unsigned char* ring,
                                   Cp& cp, float (&acc)[NT][NB][L][4]) {
  constexpr int D = kRingDepth, kSlot = ring_slot_bytes<NT>();
  const int chunks = p.K / kChunk;
  LaneRows<NT, NB, L> r;
  lane_rows<T, NT, NB, false, L>(p, n0, lanes, r);
  zero_acc<NT, NB, L>(acc);
  auto w_at = [&](int slot, int nt, int h, int lane) {
    return reinterpret_cast<uint4*>(ring + slot * kSlot) + (nt * 2 + h) * 32 + lane;
  };
  // scales and zero points: D chunks ahead in registers (slot j of sz: the chunk of trip j)
  unsigned short ss[D][NT][2][L], zz[D][NT][2][L];
  // chunk c into slot `slot`; past the warp's last chunk (c >= chunks) nothing is read: the copies are
  // zero-fills (src-size 0) and the scales' loads re-read chunk 0's (no branch around the copies)
  auto issue = [&](int c, int slot) {
    const bool valid = c < chunks;
    const int cc = valid ? c : 0;
    for (int l = 0; l < L; ++l) {
      const int grp = (cc * kChunk + r.kl[l]) >> p.group_shift;
      MINICPM_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        MINICPM_UNROLL
        for (int h = 0; h < 2; ++h) {
          cp.copy16(w_at(slot, nt, h, lanes[l]), r.wp[nt][h][l] + 4 * cc, valid ? 16 : 0);
          ss[slot][nt][h][l] = ldg(r.sp[nt][h][l] + grp);
          zz[slot][nt][h][l] = ldg(r.zp[nt][h][l] + grp);
        }
    }
  };
  auto read = [&](int slot, RawChunk<NT, L>& raw) {
    for (int l = 0; l < L; ++l)
      MINICPM_UNROLL
      for (int nt = 0; nt < NT; ++nt)
        MINICPM_UNROLL
        for (int h = 0; h < 2; ++h) {
          raw.w[nt][h][l] = minicpm_int4_hd::ld(w_at(slot, nt, h, lanes[l]));
          raw.s[nt][h][l] = ss[slot][nt][h][l];
          raw.z[nt][h][l] = zz[slot][nt][h][l];
        }
  };
  // D groups first (empty ones too: a trip always waits for the group committed D trips before it)
  MINICPM_UNROLL
  for (int j = 0; j < D; ++j) {
    issue(warp + j * W, j);
    cp.commit();
  }
  // D trips an iteration, so that each trip's slot is a constant (shared-memory offsets in the
  // instructions, registers for the scales)
  for (int c0 = warp; c0 < chunks; c0 += D * W) {
    MINICPM_UNROLL
    for (int j = 0; j < D; ++j) {
      const int c = c0 + j * W;
      if (c < chunks) {
        cp.template wait<WAIT>();
        RawChunk<NT, L> raw;
        read(j, raw);
        chunk_product<T, NT, NB, POST, Mma, L, false, false, true>(p, c, r, raw, acc);
        issue(c + D * W, j);
        cp.commit();
      }
    }
  }
  cp.template wait<0>();  // nothing in flight when the block's reduction starts (or the kernel exits)
}

// Slot s = (nt * NB + nb) * 4 + e of lane `lane` -> the output it belongs to: (m, n).
MINICPM_HD void slot_output(int n0, int NB, int slot, int lane, int& m, int& n) {
  const int e = slot & 3, nb = (slot >> 2) % NB, nt = (slot >> 2) / NB;
  n = n0 + 16 * nt + (lane >> 2) + 8 * (e >> 1);
  m = 8 * nb + 2 * (lane & 3) + (e & 1);
}

// The block's value for one output from its warps' sums (in warp order), plus bias, rounded once;
// stored when (m, n) is inside the output.
template <typename T, int W>
MINICPM_HD void store_output(const float (&warp_vals)[W], const T* bias, T* out, long ldo, int M, int N,
                                 int m, int n) {
  if (m >= M || n >= N) return;
  float v = warp_vals[0];
  MINICPM_UNROLL
  for (int w = 1; w < W; ++w) v += warp_vals[w];
  if (bias != nullptr) v += Pair<T>::to_f32(ldg(bias + n));
  out[m * ldo + n] = Pair<T>::from_f32(v);
}

// Host-side choices, shared with the emulation.
// The tensor-core kernel takes K % 128 == 0 with G a power of two >= 32 (a lane's 32 k lie in one
// group, found by a shift) or per channel; POST scaling when every 128-k chunk lies in one group.
inline bool mma_supported(int K, int group_size) {
  return K % kChunk == 0 && (group_size == K || (group_size >= 32 && (group_size & (group_size - 1)) == 0));
}
inline bool mma_post_scale(int K, int group_size) { return group_size == K || group_size % kChunk == 0; }
inline int group_shift_for(int K, int group_size) {
  if (group_size == K) return 31;  // k < 2**31: every k in group 0
  int shift = 0;
  while ((1 << shift) < group_size) ++shift;
  return shift;
}

// N-tiles (16 rows) per block: 2 while that still gives every SM two blocks, else 1.
inline int mma_tiles_per_block(int n, int sms) { return (n + 31) / 32 >= 2 * sms ? 2 : 1; }
// Warps per block: 16 when the blocks (one per 16 * NT rows) are fewer than the SMs - a k/v
// projection of 1024 rows has 64 - so that the SMs that have one keep twice the loads in flight.
inline int mma_warps_per_block(int n, int tiles, int sms) { return tiles == 1 && (n + 15) / 16 < sms ? kWarpsSmallN : kWarps; }
// With an input scale or a channel order and two column blocks of x (M = 9..16), a 16-warp block's
// 128 registers per thread are too few (ptxas spills in the K loop): 8 warps there. The
// instantiations follow this rule.
inline int mma_warps_for_launch(int warps, int rows, bool scaled_or_permuted) {
  return scaled_or_permuted && rows > 8 ? kWarps : warps;
}

}  // namespace minicpm_int4_mma
