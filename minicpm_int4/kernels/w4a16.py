"""W4A16: y = x @ dequant(Wq).T (+ bias), int4 weights dequantized in registers, never in memory.

Pointers (canonical layout, packing.py):
    x_ptr    [M, K]        fp16 / bf16 / fp32, row stride stride_xm, unit stride along K
    qw_ptr   int32 [N, K/8] 8 nibbles per word along K, row stride stride_qn
    s_ptr    [N, K/G]      scales, x's dtype, row stride stride_sn
    z_ptr    [N, K/G]      integer zero points stored in x's dtype
    b_ptr    [N]           bias (read only when HAS_BIAS)
    out_ptr  [M, N]        x's dtype; or fp32 partial sums [SPLIT_K, M, N] when SPLIT_K > 1

Dequantization of a [BLOCK_K, BLOCK_N] tile: w = ((q - z) * s) in fp32, rounded once to x's dtype
(the reference's rule), then a tensor-core dot with fp32 accumulation. Every K tile lies inside one
group (the launcher picks BLOCK_K dividing G, or G == K), so scales and zeros are read once per tile.

Two regimes (ops.py picks by M):
  decode  (M <= 16): one program per tile of rows (the widest tile that still gives ~2 programs per
          SM) streaming all of K, so the result is written by the kernel itself; K is split across
          programs only for narrow layers (then fp32 partials are reduced in a fixed order, no
          atomics: deterministic). M = 1 uses a multiply-reduce GEMV, 2..16 a dot padded to 16 rows.
  prefill (M  > 16): tiled GEMM, grouped tile order for L2 reuse, autotuned tile shapes.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import _grouped_tile, autotune, _round_to, _unpack_int4_tile, num_sms

DECODE_MAX_M = 16


@triton.jit
def _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, NUM_GROUPS,
                       stride_qn, stride_sn, W_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Dequantized weight tile [BLOCK_K, BLOCK_N] (transposed W) starting at K offset k0."""
    offs_kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (offs_kw[:, None] < K // 8) & (offs_n[None, :] < N)
    words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + offs_kw[:, None], mask=mask, other=0)
    q = _unpack_int4_tile(words, BLOCK_K // 8, BLOCK_N)
    g = tl.minimum(k0 // G, NUM_GROUPS - 1)  # tiles past K are masked; keep the group index valid
    n_mask = offs_n < N
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
    return _round_to((q.to(tl.float32) - z[None, :]) * s[None, :], W_DTYPE)


def _decode_configs():
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in [(4, 3), (8, 3), (4, 4)]]


@autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "K", "G", "BLOCK_N", "BLOCK_K", "SPLIT_K"])
@triton.jit
def _w4a16_decode_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G, NUM_GROUPS, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om, stride_ok,
    K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_begin = pid_k * K_PER_SPLIT
    w_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_begin + kk
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, NUM_GROUPS,
                               stride_qn, stride_sn, w_dtype, BLOCK_K, BLOCK_N)
        if BLOCK_M == 1:
            # GEMV: no tensor cores, a multiply and a reduction over K in fp32
            acc += tl.sum(x.to(tl.float32).reshape(BLOCK_K, 1) * w.to(tl.float32), axis=0)[None, :]
        elif DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _round_to(acc, w_dtype), mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


def _prefill_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


@autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K", "G"])
@triton.jit
def _w4a16_prefill_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G, NUM_GROUPS, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        w = _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, K, G, NUM_GROUPS,
                               stride_qn, stride_sn, w_dtype, BLOCK_K, BLOCK_N)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _round_to(acc, w_dtype), mask=mask)


def _block_k(k: int, group_size: int, cap: int) -> int:
    """A K tile that never straddles two groups: it divides G, or G == K (one group)."""
    if group_size == k and group_size not in (32, 64, 128):
        return min(cap, max(16, triton.next_power_of_2(k)))
    return min(group_size, cap)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 layers: exact fp32 products (no tf32). bf16 under the interpreter: its bf16 dot is wrong,
    # so the interpreter computes bf16 tiles in fp32 (GPUs use bf16 tensor cores).
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _decode_blocks(m: int, n: int, k: int, group_size: int, device: torch.device):
    """(BLOCK_N, BLOCK_K, SPLIT_K) for the decode kernel. The widest row tile that still gives about
    two programs per SM; K is split across programs only when even the narrowest tile leaves SMs idle
    (split partial sums cost a second pass). Every K tile stays inside one group."""
    if INTERPRET:
        block_n, block_k = 32, _block_k(k, group_size, 64)
    else:
        block_k = _block_k(k, group_size, 256)
        narrowest = 8 if m == 1 else 16  # tl.dot needs 16 rows of W per tile
        block_n = narrowest
        for bn in (128, 64, 32, 16):
            if bn >= narrowest and triton.cdiv(n, bn) >= 2 * num_sms(device):
                block_n = bn
                break
    return block_n, block_k, _split_k(n, k, block_n, block_k, device)


def _split_k(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K splits so that (N tiles x splits) covers every SM, each split keeping >= 2 K tiles."""
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while n_tiles * split < num_sms(device) and k_tiles // (split * 2) >= 2:
        split *= 2
    return split


def w4a16_gemm_triton(x, qweight, scales, zeros, bias, group_size):
    """x [M, K] @ dequant(qweight [N, K/8], scales/zeros [N, K/G]).T + bias -> [M, N] in x.dtype.
    Inputs are validated by ops.w4a16_gemm; group_size here is positive (G == K for per-channel)."""
    m, k = x.shape
    n = qweight.shape[0]
    g = group_size
    num_groups = k // g
    dot_fp32 = _dot_fp32(x.dtype)
    has_bias = bias is not None
    b = bias if has_bias else scales  # any valid pointer; never read
    if m <= DECODE_MAX_M:
        block_m = 1 if m == 1 else 16
        block_n, block_k, split = _decode_blocks(m, n, k, g, x.device)
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        split = triton.cdiv(k, k_per_split)
        if split == 1:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        else:
            out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, block_n), split)
        _w4a16_decode_kernel[grid](
            x, qweight, scales, zeros, b, out, m, n, k, g, num_groups, m,
            x.stride(0), qweight.stride(0), scales.stride(0), out.stride(-2), out.stride(0) if split > 1 else 0,
            k_per_split, HAS_BIAS=has_bias, SPLIT_K=split, DOT_FP32=dot_fp32,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
        if split == 1:
            return out
        y = out.sum(0)
        if has_bias:
            y = y + bias.float()
        return y.to(x.dtype)

    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = _block_k(k, g, 32 if INTERPRET else 64)
    m_bucket = triton.next_power_of_2(m)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _w4a16_prefill_kernel[grid](
        x, qweight, scales, zeros, b, out, m, n, k, g, num_groups, m_bucket,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=has_bias, DOT_FP32=dot_fp32, BLOCK_K=block_k,
    )
    return out
