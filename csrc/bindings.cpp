// Torch bindings for the CUDA kernels in csrc/*.cu, registered as torch.ops.minicpm_int4_C.*
// (their own namespace: the public ops are declared in Python, minicpm_int4/ops.py, and call these).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>

#include "launchers.h"  // the launchers of csrc/*.cu, declared once

namespace {

// Error messages are built here with std::to_string and std::string, never with an ostream: TORCH_CHECK
// given several pieces formats them through a std::ostringstream instantiated in this library, and where
// the library carries its own copy of libstdc++ (the GPU image's build links it statically) that copy's
// locale facets are not the process's, so formatting a number crashed the process (an H200 run: every
// check that printed a size died in basic_ostream::_M_insert<long>) or truncated the message. One std::string
// or literal per TORCH_CHECK is passed through untouched (c10::str's string specialisations), and the
// c10::Error it throws is formatted in libc10, which links the shared libstdc++.
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const at::Device& d) { return d.str(); }  // (Device::str is libc10's)
inline std::string piece(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  (out += ... += piece(args));
  return out;
}

// A layer's input scale as the kernels read it: undefined for None, else [K] of x's dtype on x's
// device, contiguous and 16-byte aligned (read 16 bytes at a time; a view with an offset is copied).
at::Tensor checked_input_scale(const char* op, const std::optional<at::Tensor>& input_scale, const at::Tensor& x) {
  if (!input_scale.has_value()) return at::Tensor();
  const at::Tensor& m = *input_scale;
  TORCH_CHECK(m.dim() == 1 && m.size(0) == x.size(1), msg(op, ": input_scale must have shape [K=", x.size(1),
              "] (one multiplier per input channel), got ", m.sizes()));
  TORCH_CHECK(m.scalar_type() == x.scalar_type(), msg(op, ": input_scale is ", m.scalar_type(),
              " but the activations are ", x.scalar_type(),
              " (x * input_scale is computed in the activations' dtype)"));
  TORCH_CHECK(m.device() == x.device(), msg(op, ": input_scale is on ", m.device(), " but x is on ", x.device()));
  if (m.is_contiguous() && reinterpret_cast<uintptr_t>(m.data_ptr()) % 16 == 0) return m;
  return at::empty({m.size(0)}, m.options()).copy_(m);  // a fresh allocation: contiguous and aligned
}

// An act-order layer's channel order as the kernels read it: undefined for None, else int32 [K] on
// x's device, contiguous and 16-byte aligned (read 16 bytes at a time; a view with an offset is
// copied). That it is a permutation of 0..K-1 is the caller's to keep (QuantLinear checks its own
// when it is loaded; checking here would cost a host sync every call): the kernels read x[perm[k]].
at::Tensor checked_input_perm(const char* op, const std::optional<at::Tensor>& input_perm, const at::Tensor& x) {
  if (!input_perm.has_value()) return at::Tensor();
  const at::Tensor& g = *input_perm;
  TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(1), msg(op, ": input_perm must have shape [K=", x.size(1),
              "] (the input channel of each weight column), got ", g.sizes()));
  TORCH_CHECK(g.scalar_type() == at::kInt, msg(op, ": input_perm must be int32, got ", g.scalar_type()));
  TORCH_CHECK(g.device() == x.device(), msg(op, ": input_perm is on ", g.device(), " but x is on ", x.device()));
  if (g.is_contiguous() && reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0) return g;
  return at::empty({g.size(0)}, g.options()).copy_(g);
}

// variant: 0 = auto (the tensor-core kernel where it applies, else the CUDA-core GEMV), 1 = the
// CUDA-core GEMV, 2 = the tensor-core kernel (K % 128 == 0, group size a power of two >= 32 or K),
// 3 = the tensor-core kernel with two chunks of W requested ahead instead of one, 4 = the tensor-core kernel
// with W copied four chunks ahead into a ring in shared memory (measurements; plain x), 5 = the warpgroup-MMA prefill
// GEMM (sm_90a; variant 0 takes it for M > 16 where it runs; split-K over a cluster of CTAs a tile where its tiles are
// too few for the SMs), 6 = it with a tile a CTA, never split (a measurement).
// input_scale: None, or [K] of the activation dtype: y = (x * input_scale) @ ..., multiplied in the
// kernels' loads of x (each product rounded to x's dtype, torch's x * input_scale).
// input_perm: None, or int32 [K], a permutation: y = (x[:, input_perm] * input_scale) @ ..., x read through
// it by the tensor-core kernel where the layer has no input scale, else gathered here first (x[:, perm]:
// the CUDA-core GEMV has no such instantiations; minicpm_int4_w4a16_reads_perm).
void w4a16_gemm_out(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                    at::Tensor& out, int64_t variant, const std::optional<at::Tensor>& input_scale,
                    const std::optional<at::Tensor>& input_perm) {
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scales.is_cuda() && zeros.is_cuda(),
              "minicpm_int4_C.w4a16_gemm: all tensors must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "w4a16_gemm: x must be [M, K] with unit stride along K");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              msg("w4a16_gemm (cuda): activations must be fp16 or bf16, got ", x.scalar_type()));
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "w4a16_gemm: qweight must be contiguous int32 [N, K/8]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) * 8 == K, msg("w4a16_gemm: qweight packs K=", qweight.size(1) * 8, " but x has K=", K));
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && K % group_size == 0, msg("w4a16_gemm: K=", K,
              " is not divisible by group_size=", group_size));
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && zeros.scalar_type() == x.scalar_type(),
              "w4a16_gemm: scales/zeros must have the activation dtype");
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous() && scales.size(0) == N && scales.size(1) == K / group_size &&
              zeros.sizes() == scales.sizes(), "w4a16_gemm: scales/zeros must be contiguous [N, K/group_size]");
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->scalar_type() == x.scalar_type() && bias->numel() == N && bias->is_contiguous(),
                "w4a16_gemm: bias must be a contiguous CUDA tensor [N] of the activation dtype");
    bias_ptr = bias->data_ptr();
  }
  TORCH_CHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "w4a16_gemm: sizes exceed int32");
  TORCH_CHECK(variant >= 0 && variant <= 6, msg("w4a16_gemm (cuda): variant must be 0 (auto), 1 (CUDA-core GEMV), "
              "2 (tensor cores), 3 (tensor cores, two chunks of W ahead), 4 (tensor cores, W through a ring in "
              "shared memory), 5 (the warpgroup-MMA prefill GEMM, sm_90a) or 6 (it without split-K), got ", variant));
  const bool wg_forced = variant == 5 || variant == 6;
  TORCH_CHECK(!wg_forced || minicpm_int4_w4a16_wgmma_supported(static_cast<int>(K), static_cast<int>(group_size)),
              msg("w4a16_gemm (cuda): the warpgroup-MMA prefill GEMM (variant ", variant, ") needs K % 64 == 0 and a "
                  "group size of 32, a power of two from 64, or K; got K=", K, ", group_size=", group_size,
                  " (variant 0 takes it)"));
  TORCH_CHECK(!wg_forced || !minicpm_int4_w4a16_wgmma_disabled(),
              msg("w4a16_gemm (cuda): the warpgroup-MMA prefill GEMM (variant ", variant, ") is turned off by "
                  "MINICPM_INT4_W4A16_WGMMA=0"));
  TORCH_CHECK(variant < 2 || wg_forced || minicpm_int4_w4a16_mma_supported(static_cast<int>(K), static_cast<int>(group_size)),
              msg("w4a16_gemm (cuda): the tensor-core kernel needs K % 128 == 0 and a group size that is a power of two "
                  ">= 32 or K; got K=", K, ", group_size=", group_size, " (variant 0 or 1 takes it)"));
  TORCH_CHECK(variant < 3 || wg_forced || (!input_scale.has_value() && !input_perm.has_value()),
              msg("w4a16_gemm (cuda): variant ", variant, " (", variant == 3 ? "two chunks of W ahead" : "the shared-memory ring",
                  ") is built for plain x only: no input_scale or input_perm (variant 2 takes them)"));
  TORCH_CHECK(K % 32 != 0 || reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "w4a16_gemm (cuda): qweight must be 16-byte aligned for 16-byte loads (got a view with an offset?)");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == x.scalar_type() && out.dim() == 2 && out.size(0) == M &&
              out.size(1) == N && out.stride(1) == 1,
              "w4a16_gemm: out must be [M, N] of the activation dtype, unit stride along N");
  TORCH_CHECK(out.device() == x.device() && qweight.device() == x.device() && scales.device() == x.device() &&
              zeros.device() == x.device(), "w4a16_gemm: all tensors must be on the same device");
  const at::Tensor ms = checked_input_scale("w4a16_gemm", input_scale, x);
  at::Tensor perm = checked_input_perm("w4a16_gemm", input_perm, x);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(!wg_forced || minicpm_int4_w4a16_wgmma_available(),
              msg("w4a16_gemm (cuda): the warpgroup-MMA prefill GEMM (variant ", variant, ") needs a GPU that runs the extension's "
                  "sm_90a build (an H100 / H200 with TORCH_CUDA_ARCH_LIST including 9.0a); this is ", x.device()));
  if (M == 0) return;
  // The kernel reads x 16 bytes at a time: a view with an odd offset or row stride is copied
  // (an [M, K] row of a decode step: a few KiB, negligible next to the weights). Where the kernel
  // does not read x through the channel order, x is gathered (a fresh, aligned tensor).
  // The warpgroup-MMA prefill GEMM (M > 16 on an H100 / H200, or variants 5, 6) reads x as it is: gathered and multiplied
  // by the input scale here first (x[:, perm] * input_scale, torch's product: the reference's rounding).
  const bool wgmma = minicpm_int4_w4a16_takes_wgmma(static_cast<int>(M), static_cast<int>(K), static_cast<int>(group_size),
                                                    static_cast<int>(variant)) != 0;
  const bool gather = perm.defined() && (wgmma || !minicpm_int4_w4a16_reads_perm(static_cast<int>(K), static_cast<int>(group_size),
                                                                                 static_cast<int>(variant), ms.defined() ? 1 : 0));
  const bool x_aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (M == 1 || x.stride(0) % 8 == 0);
  at::Tensor xa = gather ? x.index_select(1, perm) : x_aligned ? x : at::empty({M, K}, x.options()).copy_(x);
  if (gather) perm = at::Tensor();
  const bool premultiply = wgmma && ms.defined();
  if (premultiply) xa = xa * ms;
  cudaError_t err = minicpm_int4_w4a16_gemv(
      xa.data_ptr(), ms.defined() && !premultiply ? ms.data_ptr() : nullptr, perm.defined() ? perm.data_ptr<int32_t>() : nullptr,
      qweight.data_ptr<int32_t>(), scales.data_ptr(),
      zeros.data_ptr(), bias_ptr, out.data_ptr(),
      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(group_size), M == 1 ? K : xa.stride(0),
      out.stride(0), x.scalar_type() == at::kHalf ? 0 : 1, static_cast<int>(variant),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, msg("minicpm_int4_C.w4a16_gemm: kernel launch failed: ", cudaGetErrorString(err)));
}

at::Tensor w4a16_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                      int64_t variant, const std::optional<at::Tensor>& input_scale,
                      const std::optional<at::Tensor>& input_perm) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "w4a16_gemm: x must be [M, K] and qweight [N, K/8]");
  at::Tensor out = at::empty({x.size(0), qweight.size(0)}, x.options());
  w4a16_gemm_out(x, qweight, scales, zeros, bias, group_size, out, variant, input_scale, input_perm);
  return out;
}

// Per-token int8: (x_q int8 [M, K] contiguous, scale fp32 [M]); x fp16 / bf16 / fp32 [M, K] with unit
// stride along K (any row stride; 16-byte rows take the vector path); of x[:, input_perm] * input_scale
// where they are given.
std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8(const at::Tensor& x,
                                                           const std::optional<at::Tensor>& input_scale,
                                                           const std::optional<at::Tensor>& input_perm) {
  TORCH_CHECK(x.is_cuda(), "minicpm_int4_C.quantize_per_token_int8: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_per_token_int8: x must be [M, K] with unit stride along K");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              msg("quantize_per_token_int8 (cuda): activations must be fp16, bf16 or fp32, got ", x.scalar_type()));
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < (1LL << 31) && K < (1LL << 31), "quantize_per_token_int8: sizes exceed int32");
  const at::Tensor ms = checked_input_scale("quantize_per_token_int8", input_scale, x);
  at::Tensor perm = checked_input_perm("quantize_per_token_int8", input_perm, x);
  // the quantizer reads x through the channel order or multiplies the input scale in, not both (no
  // such instantiation; no reader of checkpoints makes such a layer): then x is gathered first
  const at::Tensor xs = perm.defined() && ms.defined() ? x.index_select(1, perm) : x;
  if (ms.defined()) perm = at::Tensor();
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0 || K == 0) {
    scale.zero_();
    return {xq, scale};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int dtype = x.scalar_type() == at::kHalf ? 0 : x.scalar_type() == at::kBFloat16 ? 1 : 2;
  cudaError_t err = minicpm_int4_act_quant(xs.data_ptr(), ms.defined() ? ms.data_ptr() : nullptr,
                                           perm.defined() ? perm.data_ptr<int32_t>() : nullptr, xq.data_ptr<int8_t>(),
                                           scale.data_ptr<float>(), static_cast<int>(M), static_cast<int>(K),
                                           M == 1 ? K : xs.stride(0), dtype, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, msg("minicpm_int4_C.quantize_per_token_int8: kernel launch failed: ",
              cudaGetErrorString(err)));
  return {xq, scale};
}

int dtype_code(at::ScalarType t) { return t == at::kHalf ? 0 : t == at::kBFloat16 ? 1 : t == at::kFloat ? 2 : -1; }

// W4A8 for prefill sizes: y = x_scale * (x_q (q - z)^T per group, times the scales) + bias in out_dtype, with
// reference.w4a8_gemm_ref's bits. x_q int8 [M, K] and x_scale fp32 [M] (the per-token quantizer's), the weight
// in the canonical layout with scales / zeros of fp16, bf16 or fp32; K % 16 == 0 and a group size that is a
// multiple of 32 dividing K, or K (per channel).
// kernel: 0 = the launcher's choice (what ops.py passes): the warpgroup-MMA kernel (csrc/w4a8_wgmma.cu) on a GPU
// with its sm_90a build where it takes (K, group_size), else the mma.sync one; 1 = mma.sync; 2 = wgmma (an error
// where it cannot run); 3 = wgmma with the epilogue's multiply and add fused (within reference.w4a8_tolerance, not
// the reference's bits) - the bench's w4a8-cuda-mma / w4a8-cuda-fma rows force 1 / 3.
// block_rows: rows of x (tokens) per block, 64 or 128, or 0 for the launcher's choice by the device's SMs - either
// kernel's (the bench's w4a8-cuda-m64 rows force mma.sync's 64, its w4a8-cuda-t64 / -t128 rows wgmma's).
at::Tensor w4a8_gemm(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& qweight,
                     const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                     int64_t group_size, at::ScalarType out_dtype, int64_t block_rows, int64_t kernel) {
  TORCH_CHECK(x_q.is_cuda() && x_scale.is_cuda() && qweight.is_cuda() && scales.is_cuda() && zeros.is_cuda(),
              "minicpm_int4_C.w4a8_gemm: all tensors must be CUDA tensors");
  TORCH_CHECK(x_scale.device() == x_q.device() && qweight.device() == x_q.device() && scales.device() == x_q.device() &&
              zeros.device() == x_q.device(), "w4a8_gemm: all tensors must be on the same device");
  TORCH_CHECK(x_q.scalar_type() == at::kChar && x_q.dim() == 2,
              msg("w4a8_gemm: x_q must be int8 [M, K], got ", x_q.scalar_type(), " ", x_q.sizes()));
  const int64_t M = x_q.size(0), K = x_q.size(1), N = qweight.size(0);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 1 && x_scale.size(0) == M,
              msg("w4a8_gemm: x_scale must be fp32 [M=", M, "], got ", x_scale.scalar_type(), " ", x_scale.sizes()));
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous() &&
              qweight.size(1) * 8 == K, msg("w4a8_gemm: qweight must be contiguous int32 [N, K/8] with K=", K,
              ", got ", qweight.scalar_type(), " ", qweight.sizes()));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "w4a8_gemm (cuda): qweight must be 16-byte aligned (got a view with an offset?)");
  TORCH_CHECK(minicpm_int4_w4a8_supported(static_cast<int>(K), static_cast<int>(group_size)),
              msg("w4a8_gemm (cuda): the kernel needs K % 16 == 0 and a group size that is a multiple of 32 dividing K, "
                  "or K (per channel); got K=", K, ", group_size=", group_size, " (backend='triton' takes it)"));
  const int sz = dtype_code(scales.scalar_type());
  TORCH_CHECK(sz >= 0 && zeros.scalar_type() == scales.scalar_type(),
              msg("w4a8_gemm: scales and zeros must share one of fp16 / bf16 / fp32, got ", scales.scalar_type(), " and ",
                  zeros.scalar_type()));
  TORCH_CHECK(scales.is_contiguous() && zeros.is_contiguous() && scales.dim() == 2 && scales.size(0) == N &&
              scales.size(1) == K / group_size && zeros.sizes() == scales.sizes(),
              msg("w4a8_gemm: scales/zeros must be contiguous [N, K/group_size] = [", N, ", ", K / group_size, "], got ",
                  scales.sizes()));
  const int od = dtype_code(out_dtype);
  TORCH_CHECK(od >= 0, msg("w4a8_gemm: out_dtype must be fp16, bf16 or fp32, got ", out_dtype));
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x_q.device() && bias->scalar_type() == out_dtype &&
                bias->numel() == N && bias->is_contiguous(),
                msg("w4a8_gemm: bias must be a contiguous tensor [N=", N, "] of out_dtype (", out_dtype, ") on x_q's device"));
    bias_ptr = bias->data_ptr();
  }
  TORCH_CHECK(M < (1LL << 31) && N < (1LL << 31) && K < (1LL << 31), "w4a8_gemm: sizes exceed int32");
  TORCH_CHECK(block_rows == 0 || block_rows == 64 || block_rows == 128,
              msg("w4a8_gemm (cuda): block_rows must be 0 (the launcher's choice), 64 or 128, got ", block_rows));
  TORCH_CHECK(kernel >= 0 && kernel <= 3,
              msg("w4a8_gemm (cuda): kernel must be 0 (the launcher's choice), 1 (mma.sync), 2 (wgmma) or 3 (wgmma, "
                  "fused epilogue), got ", kernel));
  if (kernel >= 2) {
    TORCH_CHECK(minicpm_int4_w4a8_wgmma_supported(static_cast<int>(K), static_cast<int>(group_size)),
                msg("w4a8_gemm (cuda): the wgmma kernel needs a group size of 32, 64 or a multiple of 128 dividing K, "
                    "or per channel (group_size = K); got K=", K, ", group_size=", group_size,
                    " (kernel=0 or 1 takes it)"));
    TORCH_CHECK(!minicpm_int4_w4a8_wgmma_disabled(),
                "w4a8_gemm (cuda): the wgmma kernel is turned off by MINICPM_INT4_W4A8_WGMMA=0 (read when the process "
                "first ran a W4A8 GEMM); kernel=0 or 1 runs the mma.sync kernel");
    TORCH_CHECK(block_rows != 64 || !minicpm_int4_w4a8_wgmma_t64_disabled(),
                "w4a8_gemm (cuda): the wgmma kernel's 64-token blocks are turned off by MINICPM_INT4_W4A8_WGMMA=128 "
                "(read when the process first ran a W4A8 GEMM); block_rows=0 or 128 runs its 128-token blocks");
    const c10::cuda::CUDAGuard probe(x_q.device());
    TORCH_CHECK(minicpm_int4_w4a8_wgmma_available(),
                "w4a8_gemm (cuda): the wgmma kernel needs an H100 / H200 and an extension built for sm_90a "
                "(TORCH_CUDA_ARCH_LIST=9.0a); kernel=0 or 1 runs the mma.sync kernel");
  }
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  if (M == 0) return out;
  const c10::cuda::CUDAGuard guard(x_q.device());
  // the kernel copies rows of x_q 16 bytes at a time: a strided or offset view is copied (fresh, aligned)
  const bool x_ok = x_q.is_contiguous() && reinterpret_cast<uintptr_t>(x_q.data_ptr()) % 16 == 0;
  const at::Tensor xq = x_ok ? x_q : at::empty({M, K}, x_q.options()).copy_(x_q);
  const at::Tensor xs = x_scale.contiguous();
  cudaError_t err = minicpm_int4_w4a8_gemm(xq.data_ptr<int8_t>(), xs.data_ptr<float>(), qweight.data_ptr<int32_t>(),
                                           scales.data_ptr(), zeros.data_ptr(), bias_ptr, out.data_ptr(),
                                           static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                           static_cast<int>(group_size), N, sz, od, static_cast<int>(block_rows),
                                           static_cast<int>(kernel), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, msg("minicpm_int4_C.w4a8_gemm: kernel launch failed: ", cudaGetErrorString(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY(minicpm_int4_C, m) {
  m.def("w4a16_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int group_size, "
        "int variant=0, Tensor? input_scale=None, Tensor? input_perm=None) -> Tensor");
  m.def("w4a16_gemm_out(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, int group_size, "
        "Tensor(a!) out, int variant=0, Tensor? input_scale=None, Tensor? input_perm=None) -> ()");
  m.def("quantize_per_token_int8(Tensor x, Tensor? input_scale=None, Tensor? input_perm=None) -> (Tensor, Tensor)");
  m.def("w4a8_gemm(Tensor x_q, Tensor x_scale, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
        "int group_size, ScalarType out_dtype, int block_rows=0, int kernel=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(minicpm_int4_C, CUDA, m) {
  m.impl("w4a16_gemm", &w4a16_gemm);
  m.impl("w4a16_gemm_out", &w4a16_gemm_out);
  m.impl("quantize_per_token_int8", &quantize_per_token_int8);
  m.impl("w4a8_gemm", &w4a8_gemm);
}

// minicpm_int4._C.w4a8_kernel(): which CUDA W4A8 GEMM the launcher (kernel=0) takes on the current GPU for the
// shapes the wgmma kernel takes (groups of 32, 64 or multiples of 128, and per channel - other group sizes always
// go to mma.sync), and why - for `minicpm-int4 env`.
static PyObject* w4a8_kernel(PyObject*, PyObject*) {
  const char* what;
  if (minicpm_int4_w4a8_wgmma_disabled())
    what = "mma.sync (the wgmma kernel is turned off by MINICPM_INT4_W4A8_WGMMA=0)";
  else if (!minicpm_int4_w4a8_wgmma_available())
    what = "mma.sync (no sm_90a build of the wgmma kernel for this GPU: it needs an H100 / H200 and "
           "TORCH_CUDA_ARCH_LIST=9.0a)";
  else if (minicpm_int4_w4a8_wgmma_t64_disabled())
    what = "wgmma, 128-token blocks only (its 64-token blocks are turned off by MINICPM_INT4_W4A8_WGMMA=128)";
  else
    what = "wgmma (warpgroup MMA, sm_90a), 64- or 128-token blocks by the launcher's waves rule";
  return PyUnicode_FromString(what);
}

// minicpm_int4._C.w4a16_prefill_kernel(): what the CUDA W4A16 launcher (variant 0) runs past M = 16 on the current GPU
// for the layers the warpgroup-MMA prefill GEMM takes (K % 64 == 0, groups of 32 or powers of two from 64, per
// channel), and why - for `minicpm-int4 env` and ops.py's "auto".
static PyObject* w4a16_prefill_kernel(PyObject*, PyObject*) {
  const char* what;
  if (minicpm_int4_w4a16_wgmma_disabled())
    what = "the tensor-core decode kernel in slices of 16 rows (the wgmma prefill GEMM is turned off by "
           "MINICPM_INT4_W4A16_WGMMA=0)";
  else if (!minicpm_int4_w4a16_wgmma_available())
    what = "the tensor-core decode kernel in slices of 16 rows (no sm_90a build of the wgmma prefill GEMM for this GPU: "
           "it needs an H100 / H200 and TORCH_CUDA_ARCH_LIST=9.0a)";
  else if (minicpm_int4_w4a16_wgmma_split_disabled())
    what = "wgmma (warpgroup MMA, sm_90a), 128- or 256-token blocks by the launcher's waves rule, split-K turned off "
           "by MINICPM_INT4_W4A16_WGMMA_SPLIT=0";
  else
    what = "wgmma (warpgroup MMA, sm_90a), 128- or 256-token blocks by the launcher's waves rule, split-K over clusters "
           "of 2 - 8 CTAs where the tiles are too few for the SMs";
  return PyUnicode_FromString(what);
}

// minicpm_int4._C.w4a16_wgmma_splits(M, N, K, group_size, bf16=False): the CTAs a tile (split-K over a thread block
// cluster) the launcher's choice of the W4A16 warpgroup-MMA GEMM takes for this GEMM on the current GPU - 1 unsplit,
// 2 / 4 / 8 - or 0 where that kernel does not run here or take the layer: for the GPU tests and `minicpm-int4 env`.
static PyObject* w4a16_wgmma_splits(PyObject*, PyObject* args) {
  int M = 0, N = 0, K = 0, G = 0, bf16 = 0;
  if (!PyArg_ParseTuple(args, "iiii|p", &M, &N, &K, &G, &bf16)) return nullptr;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    PyErr_SetString(PyExc_RuntimeError, "w4a16_wgmma_splits: no CUDA device");
    return nullptr;
  }
  const int r = minicpm_int4_w4a16_wgmma_splits(M, N, K, G, bf16 ? 1 : 0, sms);
  if (r < 0) {
    PyErr_Format(PyExc_RuntimeError, "w4a16_wgmma_splits: %s", cudaGetErrorString(static_cast<cudaError_t>(-r)));
    return nullptr;
  }
  return PyLong_FromLong(r);
}

static PyMethodDef methods[] = {
    {"w4a8_kernel", w4a8_kernel, METH_NOARGS, "Which CUDA W4A8 GEMM the launcher takes on the current GPU, and why."},
    {"w4a16_prefill_kernel", w4a16_prefill_kernel, METH_NOARGS,
     "What the CUDA W4A16 launcher runs past M = 16 on the current GPU, and why."},
    {"w4a16_wgmma_splits", w4a16_wgmma_splits, METH_VARARGS,
     "w4a16_wgmma_splits(M, N, K, group_size, bf16=False): the CTAs a tile (split-K) the W4A16 wgmma GEMM takes here."},
    {nullptr, nullptr, 0, nullptr}};

// `import minicpm_int4._C` loads this library, which runs the registrations above.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "minicpm_int4 CUDA kernels", -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
