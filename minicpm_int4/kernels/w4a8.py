"""W4A8: int8 activations x int4 weights on int8 tensor cores, exact asymmetric zero points.

    xq_ptr  int8 [M, K]; xs_ptr fp32 [M] (per-token scales)
    qb_ptr  the packed weights read as bytes, int8 [N, K/2] (a view of int32 [N, K/8]: byte i of a
            row holds elements 2i (low nibble) and 2i+1 (high nibble))
    s_ptr, z_ptr [N, K/G] (scales, integer zero points); b_ptr [N]; out_ptr [M, N] in OUT_DTYPE

Per group g (the K tiles of one group are accumulated in int32 before any scaling):
    acc_g = dot(x_q, q - z)                         exact integers (|acc_g| < 2**31 for K < 2**20)
    y    += float(acc_g) * s_g                      fp32, groups in order (as reference.w4a8_gemm_ref)
    y     = y * x_scale (+ bias)
q - z lies in [-15, 15], so int8 holds it exactly and the result equals the reference's
sum(x_q * q) - z * sum(x_q) bit for bit, with no row sums of x to form.

The weight tile is unpacked as W's rows [BLOCK_N, BLOCK_K] (K contiguous: the K-major layout int8
wgmma wants for its second operand, so the transpose handed to tl.dot is free). On a GPU the
unpacking works on four bytes per instruction (inline PTX, USE_ASM): low nibbles are
((b & 0x0F0F0F0F) | 0x80808080) - z * 0x01010101, then XOR 0x80808080 (every byte is 128 + q - z
before the XOR, so no borrow crosses bytes); high nibbles the same after a shift by 4. That is under
one instruction per weight; aot.py counts ~2-2.7 SASS instructions per weight for the whole loop
on sm_90a, against 7.7 for the [K, N]-tile unpacking it replaced - which matters because int8
wgmma does ~4096 MACs per SM-clock, so a 128-row tile's MMAs take the time of ~4 instructions per
weight. On Hopper they do not hide them: Triton keeps a wgmma in flight only for an fp32 accumulator
(its pipeliner's rule; a plain int8 GEMM shows the same, kernels/_wgmma_probe.py), so each int8 dot
here is waited for before the next K step and unpacking and MMAs take turns - what the CUDA
extension's warpgroup kernel (csrc/w4a8_wgmma.cu) is for.
The interpreter cannot run inline PTX; there the same bytes are unpacked with int8 tensor ops.

Per-channel layers (PER_CHANNEL, G == K: the vision MLP's K = 4304, which no group size divides)
keep one int32 accumulator and scale it once at the end; run through the grouped loop they held an
fp32 and an int32 tile at once and spilled 16-160 bytes per thread on sm_80 (kernels/aot.py).
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET, _common
from ._launch import fast_launch
from ._common import _grouped_tile, autotune, cdiv, next_pow2, _round_to, row_slices, tl_dtype


def _configs():
    # Two [BLOCK_M, BLOCK_N] accumulators (int32 per group, fp32 across groups) live at once, so
    # 128x256 / 256x128 tiles spill hundreds of bytes per thread (kernels/aot.py); not offered.
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4)]]


# Four bytes per instruction: $1 = 4 packed weight bytes, $2 = the zero point in all 4 bytes.
# lop3 0xEA is (a & b) | c. tests/test_w4a8.py runs these instructions on every byte and zero point.
LOW_NIBBLES_MINUS_Z_PTX = tl.constexpr("{ .reg .b32 t; lop3.b32 t, $1, 0x0F0F0F0F, 0x80808080, 0xEA; "
                                       "sub.u32 t, t, $2; xor.b32 $0, t, 0x80808080; }")
HIGH_NIBBLES_MINUS_Z_PTX = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 4; lop3.b32 t, t, 0x0F0F0F0F, 0x80808080, "
                                        "0xEA; sub.u32 t, t, $2; xor.b32 $0, t, 0x80808080; }")


@triton.jit
def _q_minus_z_bytes(b, z, USE_ASM: tl.constexpr):
    """Packed bytes b int8 [R, KB] and zero points z int8 [R, KB] (one value per row, broadcast) ->
    q - z as int8 [R, 2 * KB], column 2i from the low nibble of byte i, 2i + 1 from the high one."""
    if USE_ASM:
        lo = tl.inline_asm_elementwise(LOW_NIBBLES_MINUS_Z_PTX, "=r,r,r", [b, z], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(HIGH_NIBBLES_MINUS_Z_PTX, "=r,r,r", [b, z], dtype=tl.int8, is_pure=True, pack=4)
    else:
        # int8 by the cast: triton 3.0 types a Python int constant int32, so `b & 0xF` was int32 there,
        # and its interpreter refused the int8 x int32 dot
        lo = ((b & 0xF) - z).to(tl.int8)
        hi = (((b >> 4) & 0xF) - z).to(tl.int8)
    return tl.reshape(tl.join(lo, hi), (b.shape[0], b.shape[1] * 2))


@triton.jit
def _w4a8_step(acc, xq_ptr, qb_ptr, k0, offs_m, offs_n, m_mask, n_mask, zb, K, KB, stride_xm, stride_qn,
               USE_ASM: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + dot(x_q[:, k0:k0 + BLOCK_K], (q - z)[:, k0:k0 + BLOCK_K].T), int32."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    xq = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                 mask=m_mask[:, None] & (offs_k[None, :] < K), other=0)
    offs_b = tl.multiple_of(k0 // 2, BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # 16-byte loads
    b = tl.load(qb_ptr + offs_n[:, None] * stride_qn + offs_b[None, :],
                mask=n_mask[:, None] & (offs_b[None, :] < KB), other=0)
    return tl.dot(xq, tl.trans(_q_minus_z_bytes(b, zb, USE_ASM)), acc, out_dtype=tl.int32)


@fast_launch
@autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "G", "FLAT_GROUPS", "SCALES_AHEAD"])
@triton.jit
def _w4a8_gemm_kernel(
    xq_ptr, xs_ptr, qb_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KB, G: tl.constexpr, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, USE_ASM: tl.constexpr, PER_CHANNEL: tl.constexpr,
    MAGIC_CVT: tl.constexpr, FLAT_GROUPS: tl.constexpr, SCALES_AHEAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if PER_CHANNEL:  # one group over all of K: a single int32 accumulator, scaled once
        s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.int8)
        zb = tl.broadcast_to(z[:, None], (BLOCK_N, BLOCK_K // 2))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            acc = _w4a8_step(acc, xq_ptr, qb_ptr, k0, offs_m, offs_n, m_mask, n_mask, zb, K, KB,
                             stride_xm, stride_qn, USE_ASM, BLOCK_K)
        y = acc.to(tl.float32) * s[None, :]
    else:
        y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sz_rows = offs_n * stride_sn
        if SCALES_AHEAD:
            s_next = tl.load(s_ptr + sz_rows, mask=n_mask, other=0)
            z_next = tl.load(z_ptr + sz_rows, mask=n_mask, other=0)
        for g0 in range(0, K, G):
            if SCALES_AHEAD:  # this group's loaded a group ahead; the next group's now (past the last: the last)
                s = s_next.to(tl.float32)
                z = z_next.to(tl.int8)
                g_next = tl.minimum(g0 + G, K - 1) // G
                s_next = tl.load(s_ptr + sz_rows + g_next, mask=n_mask, other=0)
                z_next = tl.load(z_ptr + sz_rows + g_next, mask=n_mask, other=0)
            else:
                g = g0 // G
                s = tl.load(s_ptr + sz_rows + g, mask=n_mask, other=0).to(tl.float32)
                z = tl.load(z_ptr + sz_rows + g, mask=n_mask, other=0).to(tl.int8)
            zb = tl.broadcast_to(z[:, None], (BLOCK_N, BLOCK_K // 2))
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            if FLAT_GROUPS:  # the group's K steps unrolled: the group loop is the innermost, the one pipelined
                for kk in tl.static_range(0, G, BLOCK_K):
                    acc = _w4a8_step(acc, xq_ptr, qb_ptr, g0 + kk, offs_m, offs_n, m_mask, n_mask, zb, K, KB,
                                     stride_xm, stride_qn, USE_ASM, BLOCK_K)
            else:
                for kk in range(0, G, BLOCK_K):
                    acc = _w4a8_step(acc, xq_ptr, qb_ptr, g0 + kk, offs_m, offs_n, m_mask, n_mask, zb, K, KB,
                                     stride_xm, stride_qn, USE_ASM, BLOCK_K)
            if MAGIC_CVT:  # int32 -> fp32 as (acc + bits of 1.5 * 2**23) - 1.5 * 2**23: exact for |acc| < 2**22
                accf = (acc + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            else:
                accf = acc.to(tl.float32)
            y += accf * s[None, :]
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0)
    y = y * xs[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], _round_to(y, OUT_DTYPE),
             mask=m_mask[:, None] & n_mask[None, :])


# None: by GPU. sm_80/86/89 convert int32 -> fp32 with I2F on a 16-per-clock pipe, which for a
# 128x128 tile at G = 128 takes as long as the group's int8 MMAs; the exact magic-number convert (an
# integer add and an FADD, full-rate pipes) replaces it there. sm_90 emits I2FP, kept. Per-channel
# layers convert once (and their |acc| may exceed 2**22), so always I2F. Tests set True / False.
W4A8_MAGIC_CVT = None
# The grouped loop as one runtime loop over groups with each group's K steps unrolled (FLAT_GROUPS), instead
# of a runtime loop inside it. Triton's pipeliner works on innermost loops only: nested, it pipelines the
# G / BLOCK_K = 2 steps of one group (G = 128) and each group starts its loads afresh - a memory latency
# per group, 32 of them over K = 4096 per output tile - which may be why the H200 ran W4A8 at 14% of its
# int8 peak (280 TOPS at M = 4096). Flat, the group loop is the pipelined one (kernels/aot.py, triton 3.9,
# sm_90a, 4096 x 4096 G = 128: twice the cp.async stages in shared memory, 49 - 82 KB, the same 154 - 255
# registers, no spills; sm_80's 128 x 128 and 128 x 64 configs spill 352 / 16 bytes there, which the
# autotuner can pass over). The same integers in the same order: the same bits. Off until the bench's
# `w4a8-triton-flat` rows time it.
W4A8_FLAT_GROUPS = False
# None: by GPU. The grouped loop loads a group's scales and zero points a group ahead (SCALES_AHEAD): 2-byte
# loads, outside Triton's cp.async stages, that the group's first unpacking otherwise waits for. Compiled
# (kernels/aot.py, triton 3.9, M = 4096, 4096 x 4096, G = 32 / 64 / 128, nested and flat): on sm_80 it cuts
# 3.2 - 18.7 SASS instructions per weight from most configs (G = 128 nested: 128x128 7.09 -> 3.78, 128x64
# 7.47 -> 3.97, 64x64 6.47 -> 3.16; 64x128 3.64 either way) for up to +61 registers, no new spills; on
# sm_90a it made the 128x128 configs spill (72 - 104 bytes) and cost up to +1.4 elsewhere, so Hopper keeps
# the loads at the group (its W4A8 path is the CUDA wgmma kernel). With triton 3.6 sm_80 gained in 12 of 20
# configs but lost in G = 128's 128-row ones (6.53 / 6.88 -> 8.69), so below 3.9 (versions between not
# measured) it stays off. The same bits. Tests set True / False.
W4A8_SCALES_AHEAD = None
SCALES_AHEAD_ON_SM80 = _common.triton_at_least(3, 9)


def flat_groups():
    """Run the grouped W4A8 GEMM with each group's K steps unrolled (W4A8_FLAT_GROUPS) inside the block (the
    benchmark's `w4a8-triton-flat` rows; not thread-safe)."""
    return _common.module_setting(globals(), "W4A8_FLAT_GROUPS", True)


def _magic_convert(device: torch.device) -> bool:
    if W4A8_MAGIC_CVT is not None:
        return W4A8_MAGIC_CVT
    return not INTERPRET and _common.target_capability(device) < 90


def _scales_ahead(device: torch.device) -> bool:
    if W4A8_SCALES_AHEAD is not None:
        return W4A8_SCALES_AHEAD
    return not INTERPRET and SCALES_AHEAD_ON_SM80 and _common.target_capability(device) < 90


def w4a8_gemm_triton(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, flat=None):
    """Validated by ops.w4a8_gemm; group_size is positive here (G == K for per-channel). flat: each group's K
    steps unrolled (None: W4A8_FLAT_GROUPS), for this call - dispatch.py's "triton-flat"."""
    m, k = x_q.shape
    n = qweight.shape[0]
    g = group_size
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    if g in (32, 64, 128):
        block_k = min(g, 32 if INTERPRET else 64)
    else:  # per channel: one group spanning K, tail masked (128-wide tiles spill there: aot.py)
        block_k = 32 if INTERPRET else 64
    qbytes = qweight.view(torch.int8)  # [N, K/2], same memory
    has_bias = bias is not None
    for m0, m1 in row_slices(m, x_q.stride(0), out.stride(0)):  # one slice unless M x N >= 2**31
        xs, ss, ys, ms = x_q[m0:m1], x_scale[m0:m1], out[m0:m1], m1 - m0
        grid = lambda meta, ms=ms: (cdiv(ms, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4a8_gemm_kernel[grid](
            xs, ss, qbytes, scales, zeros, bias if has_bias else scales, ys,
            ms, n, k, k // 2, g, next_pow2(ms),
            xs.stride(0), qbytes.stride(0), scales.stride(0), ys.stride(0),
            HAS_BIAS=has_bias, OUT_DTYPE=tl_dtype(out_dtype), USE_ASM=not INTERPRET, PER_CHANNEL=g == k,
            MAGIC_CVT=g != k and _magic_convert(x_q.device), FLAT_GROUPS=W4A8_FLAT_GROUPS if flat is None else flat,
            SCALES_AHEAD=g != k and _scales_ahead(x_q.device),
            BLOCK_K=block_k,
        )
    return out
