"""W4A16: y = x @ dequant(Wq).T (+ bias), int4 weights dequantized in registers, never in memory.

Pointers (canonical layout, packing.py):
    x_ptr    [M, K]        fp16 / bf16 / fp32, row stride stride_xm, unit stride along K
    qw_ptr   int32 [N, K/8] 8 nibbles per word along K, row stride stride_qn
    s_ptr    [N, K/G]      scales, x's dtype, row stride stride_sn
    z_ptr    [N, K/G]      integer zero points stored in x's dtype
    b_ptr    [N]           bias (read only when HAS_BIAS)
    out_ptr  [M, N]        x's dtype; or fp32 partial sums [SPLIT_K, M, N] when SPLIT_K > 1

Two regimes (ops.py picks by M):
  M = 1   (_w4a16_gemv_kernel): no tensor cores. A program owns a few rows of W and streams all of
          K in 16-byte loads (4 per thread per step, so enough loads are in flight); per packed word
          it forms x_i * (q_i - z) for the 8 nibbles with one AND, one FADD and one FFMA each (the
          nibble ANDed into the exponent of 2**23 is read as a float: no shift, no int-to-float
          convert) and applies the scale once per word; one reduction over K at the end. Its inner
          loop issues ~5 SASS instructions per weight on sm_90a (kernels/aot.py; the budget for
          HBM speed is ~5), against 42.5 for the multiply-reduce GEMV it replaced.
          It multiplies by the exact (q - z) * s rather than by that weight rounded to x's dtype;
          reference.gemm_tolerance allows the half ulp of w this moves each product.
  decode  (2 <= M <= 16): w = ((q - z) * s) in fp32 rounded once to x's dtype (the reference's
          rule), a dot padded to 16 rows with fp32 accumulation; one program per tile of rows (the
          widest tile that still gives ~2 programs per SM) streaming all of K; K is split across
          programs only for narrow layers (fp32 partials reduced in a fixed order: deterministic).
  prefill (M  > 16): tiled GEMM with the same dequantization, grouped tile order for L2 reuse,
          autotuned tile shapes. Every K tile lies inside one group (BLOCK_K divides G, or G == K),
          so scales and zeros are read once per tile.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import _grouped_tile, autotune, min_capability, _round_to, _unpack_int4_tile, num_sms

DECODE_MAX_M = 16


@triton.jit
def _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS,
                       stride_qn, stride_sn, W_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Dequantized weight tile [BLOCK_K, BLOCK_N] (transposed W) starting at K offset k0, a multiple
    of BLOCK_K (said to the compiler, with KW = K / 8 passed whole, so that it emits 16-byte loads)."""
    offs_kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    mask = (offs_kw[:, None] < KW) & (offs_n[None, :] < N)
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
    M, N, K, KW, G, NUM_GROUPS, M_BUCKET,
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
        w = _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS,
                               stride_qn, stride_sn, w_dtype, BLOCK_K, BLOCK_N)
        if DOT_FP32:
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


@triton.jit
def _x_columns(x_ptr, kw, KW, EVEN: tl.constexpr):
    """x[8 * kw + i] * 16**-(i % 4) for i = 0..7 as eight [BLOCK_KW] fp32 vectors (the power of two
    meets _nibbles_dot's unshifted nibbles; exact). One contiguous load per word of x, scaled before
    it is split and spread to the threads that hold the weights (so once per element, not per row)."""
    ptrs = x_ptr + kw[:, None] * 8 + tl.arange(0, 8)[None, :]
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(kw < KW)[:, None], other=0)
    pow2 = ((127 - 4 * (tl.arange(0, 8) % 4)) << 23).to(tl.float32, bitcast=True)
    x = (x.to(tl.float32) * pow2[None, :]).reshape(kw.shape[0], 4, 2)
    x_even, x_odd = tl.split(x)                                 # i = 0 2 4 6 | 1 3 5 7
    x04, x26 = tl.split(x_even.reshape(kw.shape[0], 2, 2))
    x15, x37 = tl.split(x_odd.reshape(kw.shape[0], 2, 2))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibble(src_m, j: tl.constexpr, zm):
    """(q - z) * 16**j (fp32, exact) for nibble j (0..3, bits 4j..4j+3) of src_m = word | 0x4B000000:
    keeping the exponent bits of 2**23 and the nibble in place gives 2**23 + q * 16**j (one AND, no
    shift, no int-to-float convert); zm = 2**23 + z * 16**j."""
    return (src_m & (0x4B000000 | (0xF << (4 * j)))).to(tl.float32, bitcast=True) - zm


@triton.jit
def _nibbles_dot(words, z, x0, x1, x2, x3, x4, x5, x6, x7):
    """sum_i x_i * (q_i - z) over the 8 nibbles of each word (x_i carries 16**-(i % 4); nibbles 4..7
    come from word >> 16)."""
    lo = words | 0x4B000000
    hi = (words >> 16) | 0x4B000000
    zm0 = z + 8388608.0
    zm1 = z * 16.0 + 8388608.0
    zm2 = z * 256.0 + 8388608.0
    zm3 = z * 4096.0 + 8388608.0
    acc = _nibble(lo, 0, zm0) * x0[None, :]
    acc += _nibble(lo, 1, zm1) * x1[None, :]
    acc += _nibble(lo, 2, zm2) * x2[None, :]
    acc += _nibble(lo, 3, zm3) * x3[None, :]
    acc += _nibble(hi, 0, zm0) * x4[None, :]
    acc += _nibble(hi, 1, zm1) * x5[None, :]
    acc += _nibble(hi, 2, zm2) * x6[None, :]
    acc += _nibble(hi, 3, zm3) * x7[None, :]
    return acc


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    N, KW, stride_qn, stride_sn,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, GROUP_W: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """M = 1: y[n] = sum_g s[n, g] * sum_{k in g} x[k] * (q[n, k] - z[n, g]).

    A program owns BLOCK_N rows of W and streams all of K, BLOCK_KW packed words (8 * BLOCK_KW
    weights) of each row per step, in 16-byte loads. GROUP_W = words per group (a power of two; for
    per-channel scales any power of two >= KW). When BLOCK_KW <= GROUP_W a step lies in one group and
    scales/zeros are read once per row and step; otherwise once per word. The sum over K stays
    per thread until one reduction at the end. EVEN: N % BLOCK_N == 0 and KW % BLOCK_KW == 0."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    w_rows = qw_ptr + offs_n[:, None] * stride_qn
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        kw = kw0 + offs_w
        if EVEN:
            words = tl.load(w_rows + kw[None, :])
        else:
            words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw[None, :] < KW), other=0)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_columns(x_ptr, kw, KW, EVEN)
        if BLOCK_KW <= GROUP_W:
            sz = offs_n * stride_sn + kw0 // GROUP_W
            s = tl.load(s_ptr + sz, mask=n_mask, other=0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + sz, mask=n_mask, other=0).to(tl.float32)[:, None]
        else:
            sz = offs_n[:, None] * stride_sn + (kw // GROUP_W)[None, :]
            if EVEN:
                s = tl.load(s_ptr + sz).to(tl.float32)
                z = tl.load(z_ptr + sz).to(tl.float32)
            else:
                mask = n_mask[:, None] & (kw[None, :] < KW)
                s = tl.load(s_ptr + sz, mask=mask, other=0).to(tl.float32)
                z = tl.load(z_ptr + sz, mask=mask, other=0).to(tl.float32)
        acc += _nibbles_dot(words, z, x0, x1, x2, x3, x4, x5, x6, x7) * s
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs_n, _round_to(y, x_ptr.dtype.element_ty), mask=n_mask)


def _prefill_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        # 128x256 needs Hopper's wgmma (accumulators in fewer registers): it spills on sm_80 (aot.py)
        cfg.min_capability = 90 if bn == 256 else 0
        cfgs.append(cfg)
    return cfgs


@autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K", "G"], prune=min_capability)
@triton.jit
def _w4a16_prefill_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KW, G, NUM_GROUPS, M_BUCKET,
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
        w = _load_dequant_tile(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS,
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


def _decode_blocks(n: int, k: int, group_size: int, device: torch.device):
    """(BLOCK_N, BLOCK_K, SPLIT_K) for the decode kernel. The widest row tile that still gives about
    two programs per SM; K is split across programs only when even the narrowest tile leaves SMs idle
    (split partial sums cost a second pass). Every K tile stays inside one group."""
    if INTERPRET:
        block_n, block_k = 32, _block_k(k, group_size, 64)
    else:
        block_k = _block_k(k, group_size, 256)
        block_n = 16  # tl.dot needs 16 rows of W per tile
        for bn in (128, 64, 32, 16):
            if triton.cdiv(n, bn) >= 2 * num_sms(device):
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


def _gemv_blocks(n: int, kw: int, device: torch.device):
    """(BLOCK_N, BLOCK_KW, num_warps) for the M = 1 kernel: each thread streams 4 x 16-byte chunks
    (16 words) per step, so that enough loads are in flight; the row tile is the widest that still
    gives about two programs per SM."""
    if INTERPRET:
        return 4, 8, 1
    # a step that divides K / 8 needs no masks (EVEN); else the smallest power of two covering it
    block_kw = next((b for b in (128, 64, 32) if kw % b == 0), min(128, max(4, triton.next_power_of_2(kw))))
    for warps in (4, 2, 1):
        block_n = 16 * 32 * warps // block_kw
        if warps == 1 or triton.cdiv(n, block_n) >= 2 * num_sms(device):
            break
    return block_n, block_kw, warps


def _gemv(x, qweight, scales, zeros, bias, group_size):
    n, kw = qweight.shape
    block_n, block_kw, warps = _gemv_blocks(n, kw, x.device)
    # words per group as a power of two (per-channel: any power of two >= K/8 puts every word in group 0)
    group_w = group_size // 8 if group_size < x.shape[1] else triton.next_power_of_2(kw)
    even = n % block_n == 0 and kw % block_kw == 0
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _w4a16_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, n, kw,
        qweight.stride(0), scales.stride(0),
        HAS_BIAS=bias is not None, EVEN=even, GROUP_W=group_w, BLOCK_N=block_n, BLOCK_KW=block_kw,
        num_warps=warps, num_stages=1,
    )
    return out


def w4a16_gemm_triton(x, qweight, scales, zeros, bias, group_size):
    """x [M, K] @ dequant(qweight [N, K/8], scales/zeros [N, K/G]).T + bias -> [M, N] in x.dtype.
    Inputs are validated by ops.w4a16_gemm; group_size here is positive (G == K for per-channel)."""
    if x.shape[0] == 1:
        return _gemv(x, qweight, scales, zeros, bias, group_size)
    m, k = x.shape
    n = qweight.shape[0]
    g = group_size
    num_groups = k // g
    dot_fp32 = _dot_fp32(x.dtype)
    has_bias = bias is not None
    b = bias if has_bias else scales  # any valid pointer; never read
    if m <= DECODE_MAX_M:
        block_m = 16
        block_n, block_k, split = _decode_blocks(n, k, g, x.device)
        k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
        split = triton.cdiv(k, k_per_split)
        if split == 1:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        else:
            out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n, block_n), split)
        _w4a16_decode_kernel[grid](
            x, qweight, scales, zeros, b, out, m, n, k, k // 8, g, num_groups, m,
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
        x, qweight, scales, zeros, b, out, m, n, k, k // 8, g, num_groups, m_bucket,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=has_bias, DOT_FP32=dot_fp32, BLOCK_K=block_k,
    )
    return out
