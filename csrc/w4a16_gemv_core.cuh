// The per-thread work of the W4A16 decode GEMV (csrc/w4a16_gemv.cu), written once for the device
// and the host: the kernel calls it on the GPU, and tests/csrc/host_emu.cu runs the same code
// on the CPU, thread by thread, so that the arithmetic and indexing are tested in CI without a GPU.
//
// Layout (canonical, minicpm_int4/packing.py; no repacking):
//   x        [M, K]          fp16 or bf16, row stride ldx (elements); 16-byte aligned rows
//   qweight  int32 [N, K/8]  nibble i (bits 4i..4i+3) of word j = q[n, 8j + i], values 0..15
//   scales   [N, K/G]        same dtype as x;  zeros [N, K/G] integer zero points, same dtype
//
// Math: y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * (q[n, k] - z[n, g]), in fp32. Each weight
// becomes the exact small integer q - z by one LOP3 and one FADD: nibble j of a 16-bit half word,
// ANDed out in place and ORed into the exponent bits of 2**(23 - 4j), reads as the float
// 2**(23 - 4j) + q (the nibble's lowest bit is that float's unit), and subtracting 2**(23 - 4j) + z
// is exact - no shift per nibble, no int-to-float convert. The scale multiplies the fp32 sum of a
// 32-weight chunk (one group), so a weight costs LOP3 + FADD + one FFMA per row of x. This is the
// exact (q - z) * s rather than that weight rounded to x's dtype: reference.gemm_tolerance allows it
// (the Triton decode kernels do the same).
//
// Work split: a block of kThreads threads owns R consecutive output rows and splits all of K
// between its threads: chunk c (32 weights of every row, one 16-byte load per row) goes to thread
// c % kThreads, so a single row of x fills the GPU and a thread issues R independent 16-byte loads
// at once. The MT rows of x share every weight; the R rows share every x value. Each thread ends
// with acc[MT][R]; the kernel sums them over the block (warp shuffles, then the warps in order).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#include <cstring>

#include "hd_common.cuh"

namespace minicpm_int4_gemv {

using minicpm_int4_hd::as_float;
using minicpm_int4_hd::ldg;

constexpr int kThreads = 128;  // threads per block; K is split between all of them
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 8;    // R (rows per block) is 1, 2, 4 or 8; MT * R <= 8 (registers)

template <typename T> struct Vec;
template <> struct Vec<__half> {
  using T2 = __half2;
  MINICPM_HD static float to_f32(__half v) { return __half2float(v); }
  MINICPM_HD static float2 to_f32x2(__half2 v) { return __half22float2(v); }
  MINICPM_HD static __half from_f32(float v) { return __float2half_rn(v); }
  MINICPM_HD static uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <> struct Vec<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  MINICPM_HD static float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  MINICPM_HD static float2 to_f32x2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  MINICPM_HD static __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
  MINICPM_HD static uint32_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// Exponent bits of 2**23, 2**19, 2**15, 2**11: nibble j of a half word ORed into the j-th reads
// as 2**(23 - 4j) + q.
MINICPM_HD constexpr uint32_t exp_bits(int j) { return (150u - 4u * j) << 23; }  // 0x4B000000, 0x49000000, ...
MINICPM_HD constexpr float base(int j) { return j == 0 ? 8388608.f : j == 1 ? 524288.f : j == 2 ? 32768.f : 2048.f; }

template <typename T> struct Params {
  const T* x;
  const int32_t* qweight;
  const T* scales;
  const T* zeros;
  int N, K, group_size;
  long ldx;
  int chunk_shift;       // fast path: chunk c (32 weights) lies in group c >> chunk_shift
  uint32_t nibble_mask;  // 0xF, passed at run time: see word_dot
  const T* input_scale;  // [K] or nullptr: the kernel computes with x * input_scale rounded to T
};

// A 16-byte piece of x (8 values) as fp32.
template <typename T>
MINICPM_HD void to_f32x8(const uint4& u, float f[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
MINICPM_UNROLL
  for (int i = 0; i < 4; ++i) {
    typename Vec<T>::T2 h;
    std::memcpy(static_cast<void*>(&h), &w[i], sizeof h);  // bit copy (T2 has no trivial assignment)
    const float2 v = Vec<T>::to_f32x2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// The 8 values x[m, k0 .. k0 + 7] as fp32 (one 16-byte load).
template <typename T>
MINICPM_HD void load_x8(const T* p, float f[8]) {
  to_f32x8<T>(ldg(reinterpret_cast<const uint4*>(p)), f);
}

// Both halves of a packed pair times b's, each rounded once to T: torch's x * m for two values.
// Device: one HMUL2 (fp16) / HFMA2.BF16 with -0 (bf16). Host: the fp32 product is exact (11 + 11
// or 8 + 8 significant bits), so rounding it to T is the same one rounding.
template <typename T>
MINICPM_HD uint32_t mul2(uint32_t a, uint32_t b) {
  typename Vec<T>::T2 ha, hb;
  std::memcpy(static_cast<void*>(&ha), &a, sizeof ha);
  std::memcpy(static_cast<void*>(&hb), &b, sizeof hb);
#ifdef __CUDA_ARCH__
  const typename Vec<T>::T2 r = __hmul2(ha, hb);
  uint32_t out;
  std::memcpy(&out, static_cast<const void*>(&r), sizeof out);
  return out;
#else
  const float2 fa = Vec<T>::to_f32x2(ha), fb = Vec<T>::to_f32x2(hb);
  return Vec<T>::bits(fa.x * fb.x) | (Vec<T>::bits(fa.y * fb.y) << 16);
#endif
}

// sum_i xf[m][i] * (q_i - z) over the 8 nibbles of `word` into part[m] (two chains: lo / hi half).
// mask[j] = 0xF << 4j held in registers: with both constants literal, ptxas splits (w & mask) | exp
// into two LOP3s (counted: 2 per weight); with the mask a run-time value it is one LOP3.
template <int MT>
MINICPM_HD void word_dot(uint32_t word, const uint32_t mask[4], const float zm[4], const float (*xf)[8],
                         float (*part)[2]) {
  const uint32_t hi = word >> 16;
  float d[8];
MINICPM_UNROLL
  for (int j = 0; j < 4; ++j) {
    d[j] = as_float((word & mask[j]) | exp_bits(j)) - zm[j];
    d[j + 4] = as_float((hi & mask[j]) | exp_bits(j)) - zm[j];
  }
MINICPM_UNROLL
  for (int m = 0; m < MT; ++m) {
MINICPM_UNROLL
    for (int j = 0; j < 4; ++j) {
      part[m][0] = fmaf(xf[m][j], d[j], part[m][0]);
      part[m][1] = fmaf(xf[m][j + 4], d[j + 4], part[m][1]);
    }
  }
}

// x[m, k0 .. k0 + 7] for the MT rows of x as fp32; with S, each piece times the input scale's
// (loaded once for all MT rows) in packed pairs before the conversion.
template <typename T, int MT, bool S>
MINICPM_HD void load_rows(const Params<T>& p, long k0, float (*xf)[8]) {
  if constexpr (S) {
    // (addressed this way - the scale's piece index, one x base for the rows - because other forms
    // made ptxas keep a pointer word on the stack and reload it every trip in common instantiations)
    const uint4 mu = ldg(reinterpret_cast<const uint4*>(p.input_scale) + (k0 >> 3));
    const T* xk = p.x + k0;
MINICPM_UNROLL
    for (int m = 0; m < MT; ++m) {
      uint4 u = ldg(reinterpret_cast<const uint4*>(xk + m * p.ldx));
      u.x = mul2<T>(u.x, mu.x);
      u.y = mul2<T>(u.y, mu.y);
      u.z = mul2<T>(u.z, mu.z);
      u.w = mul2<T>(u.w, mu.w);
      to_f32x8<T>(u, xf[m]);
    }
  } else {
MINICPM_UNROLL
    for (int m = 0; m < MT; ++m) load_x8(p.x + m * p.ldx + k0, xf[m]);
  }
}

template <typename T, int R>
MINICPM_HD void group_consts(const T* const (&srow)[R], const T* const (&zrow)[R], int g, float s[R], float zm[R][4]) {
MINICPM_UNROLL
  for (int r = 0; r < R; ++r) {
    s[r] = Vec<T>::to_f32(ldg(srow[r] + g));
    const float z = Vec<T>::to_f32(ldg(zrow[r] + g));  // a small integer: exact
MINICPM_UNROLL
    for (int j = 0; j < 4; ++j) zm[r][j] = base(j) + z;
  }
}

// Thread `tid`'s partial sums acc[m][r] = its share of y[m, n0 + r] (before bias). Rows past N
// read row N - 1 (their sums are dropped by the caller). fast: K % 32 == 0 and the group size a
// power-of-two multiple of 32 or K, so a 32-weight chunk is one 16-byte load per row inside group
// c >> chunk_shift; otherwise one word (8 weights) per row per step. S: p.input_scale is set (its
// 8 values are loaded once per step for all MT rows of x).
template <typename T, int MT, int R, bool S = false>
MINICPM_HD void thread_partials(const Params<T>& p, int n0, int tid, bool fast, float acc[MT][R]) {
  const long kw_total = p.K / 8;
  const int groups = p.K / p.group_size;
  const int32_t* wrow[R];
  const T* srow[R];
  const T* zrow[R];
MINICPM_UNROLL
  for (int r = 0; r < R; ++r) {
    const long n = (n0 + r < p.N) ? n0 + r : p.N - 1;
    wrow[r] = p.qweight + n * kw_total;
    srow[r] = p.scales + n * groups;
    zrow[r] = p.zeros + n * groups;
  }
  uint32_t mask[4];
MINICPM_UNROLL
  for (int j = 0; j < 4; ++j) mask[j] = p.nibble_mask << (4 * j);
MINICPM_UNROLL
  for (int m = 0; m < MT; ++m)
MINICPM_UNROLL
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  if (fast) {
    const int chunks = p.K / 32;
    for (int c = tid; c < chunks; c += kThreads) {
      uint4 w[R];
MINICPM_UNROLL
      for (int r = 0; r < R; ++r) w[r] = ldg(reinterpret_cast<const uint4*>(wrow[r]) + c);
      float s[R], zm[R][4];
      group_consts<T, R>(srow, zrow, c >> p.chunk_shift, s, zm);
      float part[MT][R][2];
MINICPM_UNROLL
      for (int m = 0; m < MT; ++m)
MINICPM_UNROLL
        for (int r = 0; r < R; ++r) part[m][r][0] = part[m][r][1] = 0.f;
MINICPM_UNROLL
      for (int j = 0; j < 4; ++j) {
        float xf[MT][8];
        load_rows<T, MT, S>(p, 32L * c + 8 * j, xf);
MINICPM_UNROLL
        for (int r = 0; r < R; ++r) {
          const uint32_t word = j == 0 ? w[r].x : j == 1 ? w[r].y : j == 2 ? w[r].z : w[r].w;
          float pr[MT][2];
MINICPM_UNROLL
          for (int m = 0; m < MT; ++m) pr[m][0] = part[m][r][0], pr[m][1] = part[m][r][1];
          word_dot<MT>(word, mask, zm[r], xf, pr);
MINICPM_UNROLL
          for (int m = 0; m < MT; ++m) part[m][r][0] = pr[m][0], part[m][r][1] = pr[m][1];
        }
      }
MINICPM_UNROLL
      for (int m = 0; m < MT; ++m)
MINICPM_UNROLL
        for (int r = 0; r < R; ++r) acc[m][r] = fmaf(part[m][r][0] + part[m][r][1], s[r], acc[m][r]);
    }
  } else {
    for (long kw = tid; kw < kw_total; kw += kThreads) {  // one word (8 weights) per row per step
      float s[R], zm[R][4];
      group_consts<T, R>(srow, zrow, static_cast<int>(kw * 8 / p.group_size), s, zm);  // 8 | G: one group
      float xf[MT][8];
      load_rows<T, MT, S>(p, 8 * kw, xf);
MINICPM_UNROLL
      for (int r = 0; r < R; ++r) {
        float pr[MT][2];
MINICPM_UNROLL
        for (int m = 0; m < MT; ++m) pr[m][0] = pr[m][1] = 0.f;
        word_dot<MT>(static_cast<uint32_t>(ldg(wrow[r] + kw)), mask, zm[r], xf, pr);
MINICPM_UNROLL
        for (int m = 0; m < MT; ++m) acc[m][r] = fmaf(pr[m][0] + pr[m][1], s[r], acc[m][r]);
      }
    }
  }
}

// Host-side choices, shared with the emulation.
// The fast path's chunk_shift: chunk c (32 weights) lies in group c >> chunk_shift; -1 when K or
// the group size does not allow 32-weight chunks inside one group (the general path then).
inline int chunk_shift_for(int K, int group_size) {
  if (K % 32 != 0) return -1;
  if (group_size == K) return 30;  // per channel: every chunk is in group 0
  if (group_size % 32 != 0 || ((group_size / 32) & (group_size / 32 - 1)) != 0) return -1;
  int shift = 0;
  while ((32 << shift) < group_size) ++shift;
  return shift;
}

// Rows per block R for MT rows of x: as many as registers allow (MT * R <= kMaxRows) while the
// grid still gives each of `sms` SMs at least 4 blocks (16 warps) to hide memory latency with.
inline int rows_per_block(int mt, int n, int sms) {
  int r = kMaxRows / mt;
  r = r >= 8 ? 8 : r >= 4 ? 4 : r >= 2 ? 2 : 1;
  while (r > 1 && (n + r - 1) / r < 4 * sms) r /= 2;
  return r;
}

// The block's sum for one output, from the four warps' sums in warp order, plus bias, rounded once.
template <typename T>
MINICPM_HD T finish(const float (&warp_sums)[kWarps], const T* bias, int n) {
  float v = warp_sums[0];
MINICPM_UNROLL
  for (int w = 1; w < kWarps; ++w) v += warp_sums[w];
  if (bias != nullptr) v += Vec<T>::to_f32(ldg(bias + n));
  return Vec<T>::from_f32(v);
}

}  // namespace minicpm_int4_gemv
