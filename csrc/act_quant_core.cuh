// The per-thread work of the per-token int8 activation quantizer (csrc/act_quant.cu), written once
// for the device and the host: the kernel runs it on the GPU, tests/csrc/host_emu.cu runs it
// thread by thread on the CPU and the tests compare it with reference.py bit for bit.
//
//   x [M, K] fp16 / bf16 / fp32, row stride ldx;  x_q int8 [M, K] contiguous;  scale fp32 [M]
//   scale = max|x_row| / 127 (correctly rounded), x_q = rint(x / scale) (ties to even, correctly
//   rounded division) clamped to [-127, 127]; a row of zeros gets scale 0 and zeros; a NaN in a row
//   makes its scale NaN and its x_q zeros (as the reference: NaN > 0 is false).
//   With a layer's input scale m [K] (QuantConfig.input_scales), all of this is done to x * m, each
//   product rounded to x's dtype as torch's x * m is, computed as x is read (no pass of its own).
//   With an act-order layer's channel order perm [K] (int32, a permutation; QuantLinear.input_perm),
//   all of this is done to x[perm] (then times m): element k is read from x[perm[k]].
//
// One block of kThreads threads per row. Vector path (the row's bytes a multiple of 16 and
// 16-byte aligned): thread t reads 16-byte pieces t, t + kThreads, ...; rows of up to
// kThreads * U pieces stay in registers between the max and the quantization (one read of x),
// longer rows are read a second time. Otherwise one element per step.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "hd_common.cuh"

namespace minicpm_int4_aq {

using minicpm_int4_hd::ldg;

constexpr int kThreads = 256;
constexpr int kMaxU = 8;  // 16-byte pieces per thread kept in registers: K <= 16384 fp16 / 8192 fp32

template <typename T> struct Elem;
// f32: an element's bits as fp32; round: fp32 -> the nearest T, as fp32 (identity for fp32).
template <> struct Elem<__half> {
  MINICPM_HD static float f32(uint32_t bits16) { return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16))); }
  MINICPM_HD static float round(float v) { return __half2float(__float2half_rn(v)); }
  MINICPM_HD static uint32_t bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
template <> struct Elem<__nv_bfloat16> {
  MINICPM_HD static float f32(uint32_t bits16) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits16)));
  }
  MINICPM_HD static float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
  MINICPM_HD static uint32_t bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
template <> struct Elem<float> {
  MINICPM_HD static float f32(uint32_t bits) { return minicpm_int4_hd::as_float(bits); }
  MINICPM_HD static float round(float v) { return v; }
  MINICPM_HD static uint32_t bits(float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
};

MINICPM_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);  // never contracted into an fma
#else
  return a * b;
#endif
}

// x * m in T, as fp32: torch's x * input_scale. For fp16 / bf16 the fp32 product is exact (11 + 11
// or 8 + 8 significant bits) and rounding it to T is the one rounding; for fp32 it is the fp32 product.
template <typename T> MINICPM_HD float times(float v, float m) { return Elem<T>::round(mul_rn(v, m)); }

template <typename T> constexpr int kPerPiece = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes

template <typename T> MINICPM_HD float load_one(const T* p) {
  uint32_t bits = 0;
  std::memcpy(&bits, p, sizeof(T));
  return Elem<T>::f32(bits);
}

// The elements of one 16-byte piece as fp32.
template <typename T>
MINICPM_HD void unpack_piece(const uint4& u, float (&v)[kPerPiece<T>]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (sizeof(T) == 4) {
    MINICPM_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = Elem<T>::f32(w[i]);
  } else {
    MINICPM_UNROLL
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Elem<T>::f32(w[i] & 0xFFFFu);
      v[2 * i + 1] = Elem<T>::f32(w[i] >> 16);
    }
  }
}

// Piece i of x[row][perm] (16 bytes): the elements at perm[i * V .. i * V + V - 1] packed as a plain
// load of piece i places them (indices 16 bytes at a time; 16-byte aligned perm).
template <typename T>
MINICPM_HD uint4 gather_piece(const uint4* xp, const int32_t* perm, int i) {
  if constexpr (sizeof(T) == 4) {
    const int4 idx = ldg(reinterpret_cast<const int4*>(perm) + i);
    const uint32_t* r = reinterpret_cast<const uint32_t*>(xp);
    return make_uint4(ldg(r + idx.x), ldg(r + idx.y), ldg(r + idx.z), ldg(r + idx.w));
  } else {
    int idx[8];
    minicpm_int4_hd::load_idx8(perm + 8 * i, idx);
    return minicpm_int4_hd::gather8(xp, idx);
  }
}

// Piece i of the row (16 bytes), or with P of the row read through perm, and with S that piece
// times the input scale's piece i, element by element, as T bits: the rest of the kernel never
// knows the difference. (bits() rounds the exact fp32 product to T once: times() without its round
// trip back to fp32.)
template <typename T, bool S, bool P = false>
MINICPM_HD uint4 fetch_piece(const uint4* xp, const uint4* mp, const int32_t* perm, int i) {
  uint4 raw;
  if constexpr (P)
    raw = gather_piece<T>(xp, perm, i);
  else
    raw = ldg(xp + i);
  if constexpr (!S) {
    return raw;
  } else {
    float v[kPerPiece<T>], m[kPerPiece<T>];
    unpack_piece<T>(raw, v);
    unpack_piece<T>(ldg(mp + i), m);
    uint32_t w[4];
    if constexpr (sizeof(T) == 4) {
      MINICPM_UNROLL
      for (int j = 0; j < 4; ++j) w[j] = Elem<T>::bits(mul_rn(v[j], m[j]));
    } else {
      MINICPM_UNROLL
      for (int j = 0; j < 4; ++j)
        w[j] = Elem<T>::bits(mul_rn(v[2 * j], m[2 * j])) | (Elem<T>::bits(mul_rn(v[2 * j + 1], m[2 * j + 1])) << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// Element k of the row (with P, element perm[k]), or with S that times m[k] in T, as fp32.
template <typename T, bool S, bool P = false>
MINICPM_HD float fetch_one(const T* row, const T* ms, const int32_t* perm, int k) {
  const float v = load_one(row + (P ? ldg(perm + k) : k));
  if constexpr (S) return times<T>(v, load_one(ms + k));
  return v;
}

// Running max of |x| that lets a NaN through (fmaxf would drop it).
struct AbsMax {
  float m = 0.f;
  bool nan = false;
  MINICPM_HD void add(float v) {
    nan = nan || (v != v);
    m = fmaxf(m, fabsf(v));
  }
  MINICPM_HD float value() const { return nan ? NAN : m; }
};

MINICPM_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;  // IEEE division, round to nearest even
#endif
}

// scale = amax / 127; the divisor used for the row (1 for a zero or NaN row, whose x_q are zeros).
MINICPM_HD void row_scale(float amax, float& scale, float& safe) {
  scale = div_rn(amax, 127.f);
  safe = scale > 0.f ? scale : 1.f;
}

MINICPM_HD int8_t quantize_one(float v, float scale, float safe) {
  if (!(scale > 0.f)) return 0;
  float q = rintf(div_rn(v, safe));  // ties to even in the default rounding mode
  q = fminf(fmaxf(q, -127.f), 127.f);
  return static_cast<int8_t>(q);
}

// Pass 1 of thread `tid`: its pieces (vector path, cached in `cache` when U > 0) or elements.
// S: ms (the input scale, [K]) multiplies x as it is read; the cache holds the products.
// P: x is read through perm (the channel order, [K]); the cache holds the gathered pieces.
template <typename T, int U, bool S = false, bool P = false>
MINICPM_HD AbsMax thread_absmax(const T* row, const T* ms, const int32_t* perm, int K, int tid, bool vec,
                                uint4 (&cache)[U > 0 ? U : 1]) {
  AbsMax am;
  if (vec) {
    const int pieces = K / kPerPiece<T>;
    const uint4* p = reinterpret_cast<const uint4*>(row);
    const uint4* mp = reinterpret_cast<const uint4*>(ms);
    if constexpr (U > 0) {
      MINICPM_UNROLL
      for (int u = 0; u < U; ++u) {
        const int i = tid + u * kThreads;
        cache[u] = i < pieces ? fetch_piece<T, S, P>(p, mp, perm, i) : make_uint4(0u, 0u, 0u, 0u);
        float v[kPerPiece<T>];
        unpack_piece<T>(cache[u], v);
        MINICPM_UNROLL
        for (int j = 0; j < kPerPiece<T>; ++j) am.add(v[j]);
      }
    } else {
      for (int i = tid; i < pieces; i += kThreads) {
        float v[kPerPiece<T>];
        unpack_piece<T>(fetch_piece<T, S, P>(p, mp, perm, i), v);
        MINICPM_UNROLL
        for (int j = 0; j < kPerPiece<T>; ++j) am.add(v[j]);
      }
    }
  } else {
    for (int k = tid; k < K; k += kThreads) am.add(fetch_one<T, S, P>(row, ms, perm, k));
  }
  return am;
}

// Pass 2 of thread `tid`: the same pieces (from `cache` when U > 0) or elements, quantized.
template <typename T, int U, bool S = false, bool P = false>
MINICPM_HD void thread_quantize(const T* row, const T* ms, const int32_t* perm, int8_t* qrow, int K, int tid, bool vec,
                                float scale, float safe, const uint4 (&cache)[U > 0 ? U : 1]) {
  constexpr int V = kPerPiece<T>;
  if (vec) {
    const int pieces = K / V;
    const uint4* p = reinterpret_cast<const uint4*>(row);
    const uint4* mp = reinterpret_cast<const uint4*>(ms);
    auto one_piece = [&](int i, const uint4& raw) {
      float v[V];
      unpack_piece<T>(raw, v);
      int8_t q[V];
      MINICPM_UNROLL
      for (int j = 0; j < V; ++j) q[j] = quantize_one(v[j], scale, safe);
      if constexpr (V == 8) {
        uint2 out;
        std::memcpy(&out, q, 8);
        reinterpret_cast<uint2*>(qrow)[i] = out;
      } else {
        uint32_t out;
        std::memcpy(&out, q, 4);
        reinterpret_cast<uint32_t*>(qrow)[i] = out;
      }
    };
    if constexpr (U > 0) {
      MINICPM_UNROLL
      for (int u = 0; u < U; ++u) {
        const int i = tid + u * kThreads;
        if (i < pieces) one_piece(i, cache[u]);
      }
    } else {
      for (int i = tid; i < pieces; i += kThreads) one_piece(i, fetch_piece<T, S, P>(p, mp, perm, i));
    }
  } else {
    for (int k = tid; k < K; k += kThreads) qrow[k] = quantize_one(fetch_one<T, S, P>(row, ms, perm, k), scale, safe);
  }
}

// Host-side choices, shared with the emulation: the vector path and the register cache size.
// input_scale: nullptr, or [K] read in 16-byte pieces beside x's (so it too must be 16-byte aligned);
// input_perm: nullptr, or [K] int32 read 16 bytes at a time (the same).
inline bool vector_path(const void* x, long ldx, int K, int esize, const void* input_scale = nullptr,
                        const void* input_perm = nullptr) {
  return (reinterpret_cast<uintptr_t>(x) & 15) == 0 && (reinterpret_cast<uintptr_t>(input_scale) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(input_perm) & 15) == 0 && (ldx * esize) % 16 == 0 &&
         (static_cast<long>(K) * esize) % 16 == 0;
}
inline int cache_pieces(int K, int esize, bool vec) {  // U: 0 (second read), 1, 2, 4 or 8
  if (!vec) return 0;
  const int pieces = K * esize / 16;
  for (int u = 1; u <= kMaxU; u *= 2)
    if (pieces <= u * kThreads) return u;
  return 0;
}

}  // namespace minicpm_int4_aq
