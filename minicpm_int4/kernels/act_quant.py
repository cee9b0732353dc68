"""Dynamic per-token (per-row) symmetric int8 quantization of activations.

    x_ptr     [M, K] fp16 / bf16 / fp32, row stride stride_xm
    m_ptr     [K] x's dtype: the layer's input scale (read only when HAS_SCALE)
    p_ptr     int32 [K]: the layer's input_perm (read only when HAS_PERM): the row quantized is
              x[row, perm], gathered as it is read
    xq_ptr    int8 [M, K], row stride stride_qm
    scale_ptr fp32 [M]

scale = max|x_row| / 127 (fp32, correctly rounded division), x_q = rint(x / scale) clamped to
[-127, 127]; a zero row stores scale 0 and zeros. One program per row. When the row fits in one
block (K <= MAX_SINGLE_BLOCK) it is read from memory once and kept in registers; longer rows take a
second, cached read. HAS_SCALE: the row is x * m, rounded to x's dtype as torch's own multiply
rounds it (the product of two fp16 / bf16 values is exact in fp32, so one rounding of it is the
correctly rounded product), so the fused pass gives the bits of `x * m` followed by this kernel
without writing and re-reading x * m. HAS_PERM (an act-order layer, foreign.py): element k of the
row is x[row, perm[k]] (times m[k] with HAS_SCALE), the bits of quantizing torch's gather.
"""
import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._launch import fast_launch
from ._common import _times_input_scale, module_setting, next_pow2

MAX_SINGLE_BLOCK = 16384
# Warps per row (one program a row): None = block / 512 (16 elements a thread), 4 to 32. The H200 run had
# the default at 65% of copy bandwidth on 4096 x 4096 (8 warps) and 25 - 29% at K = 12288 / 14336 (32 warps).
# Rows in flight an SM, from the registers kernels/aot.py reads on sm_90a (65536 a SM, allocated in 8s,
# at most 2048 threads): a 4K-wide row (8 warps, 36 registers) 6; a 16K-wide row (K = 12288 / 14336)
# with 32 warps (37 -> 40 registers x 1024 threads) only 1 - its loads, block-wide max and stores do not
# overlap another row's -, with 16 warps (53 registers) 2, with 4 (157) 3. The bench's `triton-4w` and
# `triton-16w` quantizer rows time those two beside the default. The same bits whatever the count.
ACT_QUANT_WARPS = None


def warps_per_row(n: int):
    """Run the quantizer with `n` warps a row (ACT_QUANT_WARPS) inside the block (the benchmark's
    `triton-4w` quantizer rows; not thread-safe)."""
    return module_setting(globals(), "ACT_QUANT_WARPS", n)
# x + 1.5 * 2**23 - 1.5 * 2**23 rounds an fp32 |x| < 2**22 to the nearest integer, ties to even
# (the package's rounding rule), in the interpreter and on the GPU alike.
_RNE_MAGIC = 12582912.0


@triton.jit
def _quantize_block(x, scale, safe_scale):
    v = tl.math.div_rn(x, safe_scale)
    v = (v + 12582912.0) - 12582912.0
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    v = tl.where(scale > 0, v, 0.0)
    return v.to(tl.int8)


@triton.jit
def _load_row_block(x_row, m_ptr, p_ptr, offs, K, HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr):
    """fp32 [BLOCK_K] of the row (gathered through input_perm when HAS_PERM; times the input scale,
    rounded to x's dtype, when HAS_SCALE)."""
    if HAS_PERM:
        x = tl.load(x_row + tl.load(p_ptr + offs, mask=offs < K, other=0), mask=offs < K, other=0)
    else:
        x = tl.load(x_row + offs, mask=offs < K, other=0)
    if HAS_SCALE:
        m = tl.load(m_ptr + offs, mask=offs < K, other=0)
        x = _times_input_scale(x, m)
    return x.to(tl.float32)


@fast_launch
@triton.jit
def _act_quant_kernel(x_ptr, m_ptr, p_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_qm,
                      BLOCK_K: tl.constexpr, SINGLE_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_PERM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_BLOCK:
        x = _load_row_block(x_row, m_ptr, p_ptr, offs, K, HAS_SCALE, HAS_PERM)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.math.div_rn(amax, 127.0)
        safe = tl.where(scale > 0, scale, 1.0)
        tl.store(q_row + offs, _quantize_block(x, scale, safe), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_row_block(x_row, m_ptr, p_ptr, k0 + offs, K, HAS_SCALE, HAS_PERM)
            amax = tl.maximum(amax, tl.abs(x))
        amax_s = tl.max(amax, axis=0)
        scale = tl.math.div_rn(amax_s, 127.0)
        safe = tl.where(scale > 0, scale, 1.0)
        for k0 in range(0, K, BLOCK_K):
            x = _load_row_block(x_row, m_ptr, p_ptr, k0 + offs, K, HAS_SCALE, HAS_PERM)
            tl.store(q_row + k0 + offs, _quantize_block(x, scale, safe), mask=k0 + offs < K)
    tl.store(scale_ptr + row, scale)


def quantize_per_token_int8_triton(x, input_scale=None, input_perm=None, warps=None):
    """x [M, K] -> (x_q int8 [M, K], scale fp32 [M]) of x, or of x * input_scale ([K], x's dtype),
    x read as x[:, input_perm] (int32 [K]) where one is given. Validated by ops.quantize_per_token_int8.
    warps: warps a row for this call (None: ACT_QUANT_WARPS, else the row's block / 512; dispatch.py's
    "triton-4w" / "triton-16w")."""
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return x_q, scale
    block = next_pow2(max(k, 16))
    single = block <= MAX_SINGLE_BLOCK
    if not single:
        block = 4096
    num_warps = 4 if INTERPRET else warps or ACT_QUANT_WARPS or min(32, max(4, block // 512))
    has_scale = input_scale is not None
    _act_quant_kernel[(m,)](x, input_scale if has_scale else x, x if input_perm is None else input_perm, x_q, scale,
                            k, x.stride(0), x_q.stride(0), BLOCK_K=block, SINGLE_BLOCK=single, HAS_SCALE=has_scale,
                            HAS_PERM=input_perm is not None, num_warps=num_warps)
    return x_q, scale
