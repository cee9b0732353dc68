"""W4A8: int8 activations x int4 weights on int8 tensor cores, exact asymmetric zero points.

    xq_ptr  int8 [M, K]; xs_ptr fp32 [M] (per-token scales)
    qw_ptr  int32 [N, K/8]; s_ptr, z_ptr [N, K/G] (scales, integer zero points); b_ptr [N]
    out_ptr [M, N] in OUT_DTYPE

Per group g (the K tiles of one group are accumulated in int32 before any scaling):
    acc_g = dot(x_q, q) - z * rowsum(x_q)          exact integers (|acc_g| < 2**31 for K < 2**20)
    y    += float(acc_g) * s_g                      fp32, groups in order (as reference.w4a8_gemm_ref)
    y     = y * x_scale (+ bias)
The int4 values are unpacked to int8 in registers; q - z is never formed, so int8 holds q exactly.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import _grouped_tile, autotune, _round_to, _unpack_int4_tile, tl_dtype


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    # Two [BLOCK_M, BLOCK_N] accumulators (int32 per group, fp32 across groups) live at once, so
    # 128x256 and 256x128 tiles spill hundreds of bytes per thread (kernels/aot.py); not offered.
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]]


@autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "G"])
@triton.jit
def _w4a8_gemm_kernel(
    xq_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KW, G, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, K, G):
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for kk in range(0, G, BLOCK_K):
            k0 = g0 + kk
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xq = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
            offs_kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)  # 16-byte loads
            words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + offs_kw[:, None],
                            mask=(offs_kw[:, None] < KW) & n_mask[None, :], other=0)
            q = _unpack_int4_tile(words, BLOCK_K // 8, BLOCK_N).to(tl.int8)
            acc += tl.dot(xq, q, out_dtype=tl.int32)
            xsum += tl.sum(xq.to(tl.int32), axis=1)
        g = g0 // G
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.int32)
        acc -= z[None, :] * xsum[:, None]
        y += acc.to(tl.float32) * s[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0)
    y = y * xs[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _round_to(y, OUT_DTYPE),
             mask=m_mask[:, None] & n_mask[None, :])


def w4a8_gemm_triton(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype):
    """Validated by ops.w4a8_gemm; group_size is positive here (G == K for per-channel)."""
    m, k = x_q.shape
    n = qweight.shape[0]
    g = group_size
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    if g in (32, 64, 128):
        block_k = min(g, 32 if INTERPRET else 64)
    else:  # per channel: one group spanning K; tiles past K are masked
        block_k = 32 if INTERPRET else 64
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _w4a8_gemm_kernel[grid](
        x_q, x_scale, qweight, scales, zeros, bias if has_bias else scales, out,
        m, n, k, k // 8, g, triton.next_power_of_2(m),
        x_q.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=has_bias, OUT_DTYPE=tl_dtype(out_dtype), BLOCK_K=block_k,
    )
    return out
