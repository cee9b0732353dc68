// The C launchers of csrc/*.cu: the one declaration of each, included by the .cu file that defines
// it and by bindings.cpp that calls it. extern "C" names carry no parameter types, so a signature
// written twice could drift apart and still link (arguments silently misread); with this header a
// definition that differs from its declaration is a compile error ("conflicting declaration").
//
// No torch headers: plain pointers, sizes and a cudaStream_t. Every launcher returns
// cudaErrorInvalidValue / cudaErrorMisalignedAddress for arguments its kernels cannot take (the
// bindings check them first and raise with a message), else the launch's cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// y[M, N] = x[M, K] @ dequant(qweight, scales, zeros).T (+ bias), int4 weights in the canonical
// layout (packing.py): qweight int32 [N, K/8], scales/zeros [N, K/group_size] in x's dtype,
// bias [N] or NULL. ldx / ldo: row strides of x and out, in elements.
// input_scale: NULL, or [K] in x's dtype, 16-byte aligned: y = (x * input_scale) @ ..., each
// product rounded to x's dtype (torch's x * input_scale), multiplied as x is loaded.
// input_perm: NULL, or int32 [K], a permutation of 0..K-1, 16-byte aligned: y = x[:, input_perm] @ ..., x read
// through it (an act-order layer's channel order; its values are the caller's to check). Only with the
// tensor-core kernel and no input_scale (minicpm_int4_w4a16_reads_perm), else cudaErrorInvalidValue.
// dtype: 0 = fp16, 1 = bf16. variant: 0 = auto (tensor cores where mma_supported; M > 16 on a GPU with the
// sm_90a build: the warpgroup-MMA prefill GEMM where it takes the layer, minicpm_int4_w4a16_takes_wgmma), 1 = the
// CUDA-core GEMV, 2 = tensor cores, 3 = tensor cores with two chunks of W requested ahead instead of
// one, 4 = tensor cores with W copied (cp.async) four chunks ahead into a ring in shared memory (scales
// and zero points loaded as far ahead into registers) - measurement variants: plain x only, no
// input_scale or input_perm, else cudaErrorInvalidValue. 5 = the warpgroup-MMA prefill GEMM (below), any M (split-K
// over a cluster of CTAs a tile where its tiles are too few to fill the SMs), 6 = it with a tile a CTA, never split
// (a measurement variant).
cudaError_t minicpm_int4_w4a16_gemv(const void* x, const void* input_scale, const int32_t* input_perm,
                                    const int32_t* qweight, const void* scales, const void* zeros, const void* bias,
                                    void* out, int M, int N, int K, int group_size, int64_t ldx, int64_t ldo, int dtype,
                                    int variant, cudaStream_t stream);

// 1 where minicpm_int4_w4a16_gemv runs the warpgroup-MMA prefill GEMM (csrc/w4a16_wgmma.cu) for these
// arguments: variant 5 or 6, or variant 0 with M > 16 on a GPU that runs its sm_90a build, for a (K, group_size) it takes
// and unless MINICPM_INT4_W4A16_WGMMA=0. That kernel takes no input_scale or input_perm: the caller passes x
// gathered and multiplied (else cudaErrorInvalidValue).
int minicpm_int4_w4a16_takes_wgmma(int M, int K, int group_size, int variant);

// 1 where the tensor-core kernel (variant 2) takes (K, group_size), else 0.
int minicpm_int4_w4a16_mma_supported(int K, int group_size);

// 1 where minicpm_int4_w4a16_gemv reads x through an input_perm for these arguments (the tensor-core
// kernel runs, and there is no input scale), else 0: the caller passes x gathered and no input_perm.
int minicpm_int4_w4a16_reads_perm(int K, int group_size, int variant, int has_input_scale);

// The W4A16 prefill GEMM on Hopper's warpgroup MMA (csrc/w4a16_wgmma.cu, sm_90a; minicpm_int4_w4a16_gemv runs it
// where minicpm_int4_w4a16_takes_wgmma says so): 1 where it takes (K, group_size) - K % 64 == 0 and a group of 32,
// a power of two from 64, or K -; 1 where the current GPU runs it (an sm_90a build, loaded for an H100 / H200); 1
// where MINICPM_INT4_W4A16_WGMMA=0 turns it off (read once per process: never the launcher's choice, variant 5
// cudaErrorNotPermitted); 1 where MINICPM_INT4_W4A16_WGMMA_SPLIT=0 turns its split-K off (a tile a CTA always).
int minicpm_int4_w4a16_wgmma_supported(int K, int group_size);
int minicpm_int4_w4a16_wgmma_available(void);
int minicpm_int4_w4a16_wgmma_disabled(void);
int minicpm_int4_w4a16_wgmma_split_disabled(void);
// The CTAs a tile (split-K) the launcher's choice takes for an M x N x K GEMM on the current GPU with `sms` SMs
// (dtype 0 fp16, 1 bf16): 1 unsplit, 2 / 4 / 8; 0 where the kernel does not run here or take the layer; negative: a
// CUDA error.
int minicpm_int4_w4a16_wgmma_splits(int M, int N, int K, int group_size, int dtype, int sms);

// Per-token int8: scale[m] = max|x[m, :]| / 127, xq[m, k] = rint(x[m, k] / scale[m]) in [-127, 127].
// x [M, K] with row stride ldx (elements); xq contiguous [M, K]. dtype: 0 = fp16, 1 = bf16, 2 = fp32.
// input_scale: NULL, or [K] in x's dtype: then all of this is done to x * input_scale (each product
// rounded to x's dtype, as torch's x * input_scale), multiplied as x is read.
// input_perm: NULL, or int32 [K] as above: all of this is done to x[:, input_perm], read through it;
// only without an input_scale (else cudaErrorInvalidValue: the caller gathers x first).
cudaError_t minicpm_int4_act_quant(const void* x, const void* input_scale, const int32_t* input_perm, int8_t* xq,
                                   float* scale, int M, int K, int64_t ldx, int dtype, cudaStream_t stream);

// W4A8 for prefill: out[M, N] = x_scale[m] * sum over groups g of (x_q (q - z)^T)_g * scales[n, g] + bias,
// int32 per group on int8 tensor cores, then the reference's fp32 operations in its order (its bits).
// xq int8 [M, K] contiguous and x_scale fp32 [M] (the per-token quantizer's); qweight int32 [N, K/8]
// canonical (packing.py), both 16-byte aligned (else cudaErrorMisalignedAddress); scales / zeros
// [N, K/group_size] contiguous, of sz_dtype; bias [N] of out_dtype or NULL; out row stride ldo
// (elements). Dtypes: 0 = fp16, 1 = bf16, 2 = fp32. Needs K % 16 == 0 and group_size a multiple of 32
// dividing K, or K (per channel) - minicpm_int4_w4a8_supported - else cudaErrorInvalidValue.
// kernel: 0 = the launcher's choice - the warpgroup-MMA kernel (csrc/w4a8_wgmma.cu) where this GPU has its
// sm_90a build (minicpm_int4_w4a8_wgmma_available) and it takes (K, group_size)
// (minicpm_int4_w4a8_wgmma_supported), else the mma.sync one -; 1 = mma.sync; 2 = wgmma (cudaErrorInvalidValue
// for a shape it does not take, cudaErrorNoKernelImageForDevice without the build); 3 = wgmma with the epilogue's
// multiply and add fused (fewer instructions; within the reference's tolerance, not its bits).
// block_rows: rows of x (tokens) per block, 128 or 64, or 0 for the kernel's own choice - mma.sync: 8 or 4 warps,
// 128 unless such blocks would be fewer than the device's SMs (minicpm_int4_w4a8_block_rows); wgmma: m64n128k32 or
// m64n64k32 tiles, by the waves of persistent CTAs each leaves (w4a8_wgmma_core.cuh, block_tokens).
cudaError_t minicpm_int4_w4a8_gemm(const int8_t* xq, const float* x_scale, const int32_t* qweight, const void* scales,
                                   const void* zeros, const void* bias, void* out, int M, int N, int K, int group_size,
                                   int64_t ldo, int sz_dtype, int out_dtype, int block_rows, int kernel,
                                   cudaStream_t stream);

// 1 where minicpm_int4_w4a8_gemm takes (K, group_size), else 0.
int minicpm_int4_w4a8_supported(int K, int group_size);
// 1 where its warpgroup-MMA kernel takes them: a group of 32, 64 or a multiple of 128, or per channel.
int minicpm_int4_w4a8_wgmma_supported(int K, int group_size);
// 1 where the current GPU runs the warpgroup-MMA kernel (an sm_90a build, loaded for an H100 / H200).
int minicpm_int4_w4a8_wgmma_available(void);
// 1 where MINICPM_INT4_W4A8_WGMMA=0 turns it off (read once per process): never the launcher's choice, and
// kernel = 2 / 3 give cudaErrorNotPermitted.
int minicpm_int4_w4a8_wgmma_disabled(void);
// 1 where MINICPM_INT4_W4A8_WGMMA=128 turns its 64-token blocks off: the launcher keeps to 128-token ones, and
// block_rows = 64 goes to the mma.sync kernel (kernel 0) or gives cudaErrorNotPermitted (kernel 2 / 3).
int minicpm_int4_w4a8_wgmma_t64_disabled(void);

#ifdef __cplusplus
}
#endif
