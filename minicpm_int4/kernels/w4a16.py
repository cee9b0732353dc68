"""W4A16: y = x @ dequant(Wq).T (+ bias), int4 weights dequantized in registers, never in memory.

Pointers (canonical layout, packing.py):
    x_ptr    [M, K]        fp16 / bf16 / fp32, row stride stride_xm, unit stride along K
    m_ptr    [K]           the layer's input scale in x's dtype, read only when HAS_SCALE (in_scale_ptr
                           in the prefill kernel)
    qw_ptr   int32 [N, K/8] 8 nibbles per word along K, row stride stride_qn
    s_ptr    [N, K/G]      scales, x's dtype, row stride stride_sn
    z_ptr    [N, K/G]      integer zero points stored in x's dtype
    b_ptr    [N]           bias (read only when HAS_BIAS)
    out_ptr  [M, N]        x's dtype
    part_ptr [SPLIT_K, M, N] fp32 partial sums (decode kernel with SPLIT_K > 1)
    count_ptr int32 [N / 16]  split-K arrival counters, zero between launches (the layer's workspace)

Three regimes (picked here by M):
  M = 1   (_w4a16_gemv_kernel): no tensor cores. A program owns a few rows of W and streams all of
          K in 16-byte loads (4 per thread per step, so enough loads are in flight) - or, where the
          rows alone give too few threads to keep the memory system busy (N = 1024 - 4096 on an
          H100 / H200), a split of K, reduced as the decode kernel's is (GEMV_THREADS_PER_SM); per packed word
          it forms x_i * (q_i - z) for the 8 nibbles with one AND, one FADD and one FFMA each (the
          nibble ANDed out together with the exponent of a power of two that makes its lowest bit
          the float's unit is read as a float: no shift, no int-to-float convert, no rescaling of
          x) and applies the scale once per word; one reduction over K at the end. Its inner loop
          issues 4.1-4.3 SASS instructions per weight on sm_90a at G = 128 (kernels/aot.py; 4.3-4.5
          with triton 3.6, the GPU image's compiler), 4.4-4.5 on sm_80: was 4.7 with x scaled by
          16**-j and one exponent for every nibble, 42.5 for the multiply-reduce GEMV before that.
          An H200 at 85% of its bandwidth leaves ~3.6-3.9 (see GEMV_MAX_M). Variant GEMV_HALF2 (fp16):
          the products and their sums two at a time in fp16, ~3.0 (_h2_word_dot). Variant
          GEMV_DIRECT_LOADS: x, scales and zero points loaded by each thread for its own words (inline
          PTX loads), not once a program and through shared memory: no barrier in the loop.
          It multiplies by the exact (q - z) * s rather than by that weight rounded to x's dtype;
          reference.gemm_tolerance allows the half ulp of w this moves each product.
  decode  (2 <= M <= 16, _w4a16_decode_kernel): computed transposed, y.T = W @ x.T, so the weight
          tile [64 rows, 128 of K] is the dot's wide operand in the layout it is loaded in (16-byte
          loads along K; the 8 nibbles of a word are joined in registers) and x.T [K, 16] the narrow
          one (wgmma m64n16k16 on Hopper). Each weight becomes the exact small integer q - z in x's
          dtype, two at a time (inline PTX, _dequant_pairs: one LOP3 puts nibbles j and j + 4 into
          the mantissas of a magic-number fp16 / bf16 pair, one packed HADD2 / HFMA2 subtracts magic
          + z), in a column order that pairs them; x's rows are permuted to match inside each
          thread's registers. The group's scale multiplies the dot's fp32 result. 3.1-3.5 SASS
          instructions per weight on sm_90a (aot.py), against 4.75-4.9 with fp32 dequantization and
          ~14 for the [K, N]-oriented dot before that. K is split across programs until about two
          programs per SM run; the last program of each row tile to finish adds the fp32 partials in
          a fixed order (deterministic) with the bias, in the same launch (_splitk_fixup; it needs
          the caller's zeroed counters, which QuantLinear owns; without them _splitk_reduce_kernel
          does it in a second launch). Like the GEMV it multiplies by the exact (q - z) * s
          (within reference.gemm_tolerance's half ulp of w).
  prefill (M  > 16): tiled GEMM on tensor cores; w = ((q - z) * s) in fp32 rounded once to x's
          dtype (the reference's rule), a tile per step (dequantized as W's rows, the first operand
          of y.T = W @ x.T - PREFILL_W_LHS - or transposed for y = x @ W.T, or directly as [K, N]:
          _prefill_w_rows), grouped tile order for L2 reuse,
          autotuned tile shapes. Every K tile lies inside one group (BLOCK_K divides G, or G == K),
          so scales and zeros are read once per tile.
"""
import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET, _common
from ._launch import fast_launch
from ._common import (_grouped_tile, _times_input_scale, autotune, cdiv, config_tag, min_capability, next_pow2,
                      _round_to, row_slices, tag_config, _unpack_int4_tile, num_sms)

DECODE_MAX_M = 16
# M at or below which the CUDA-core GEMV runs instead of the tensor-core decode kernel. The GEMV needs
# no split-K and no workspace, the decode kernel issues fewer instructions per weight (aot.py: 4.1-4.3
# vs ~3.1-3.5 on sm_90a; an H200 moving 0.53 bytes per int4 weight at 85% of 4.8 TB/s leaves 132 SMs x
# 128 lanes x ~1.9 GHz / 7.7e12 weights/s = ~4.2 at perfect issue, ~3.6-3.9 in practice) and, given
# the layer's workspace, finishes its split-K in the same launch; which is faster at M = 1 is for the
# benchmark to say (`w4a16-triton-tc`), and the dispatch table it writes picks that one.
GEMV_MAX_M = 1
# The decode kernels (M <= 16) multiply a layer's input scale (QuantConfig.input_scales) into x as they
# load it, instead of a separate launch and pass over x (at decode sizes about as long as the GEMM).
# Static cost in SASS instructions per weight of the loop (kernels/aot.py; 4096 x 4096 G = 128 and
# 1152 x 4304 per channel, fp16 / bf16; M = 1 for the GEMV, 4 / 16 for the decode kernel): the GEMV
# 4.20 - 4.78 -> 4.29 - 5.07 (sm_80 / sm_90a); the tensor-core decode kernel on sm_90a 2.94 - 3.53 -> 3.20 - 3.67 (m loaded as x.T's
# tile), on sm_80 4.17 - 4.94 -> 3.86 - 4.73 (m as a vector: fewer, because the multiplied tile
# reaches the mma registers by ldmatrix where the plain one is read 16 bits at a time; m as a tile
# there: 6.30 - 7.03). With triton 3.6 (the lent GPUs' image): GEMV -0.12 - +0.27, decode on sm_90a
# 2.77 - 3.31 -> 3.14 - 3.70, on sm_80 4.33 - 5.05 -> 5.00 - 5.83 (as a tile 6.00 - 6.50).
# False: x * m in its own pass first (benchmarks/input_scale_cost.py times both).
FUSE_INPUT_SCALE = True
# The decode kernels (M <= 16) also read x through a layer's input_perm (an act-order GPTQ /
# compressed-tensors checkpoint's channel order, foreign.py): x[perm[k]] loaded where x[k] was, the
# permutation (int32, 4 bytes per input channel) read beside x. A gather pass of its own costs a launch
# and as much time as a decode GEMM of a small layer. Reading through it costs each x element a scalar
# load (kernels/aot.py, SASS instructions per weight, 4096 x 4096 fp16): the GEMV +0.16 - 0.82, the
# tensor-core kernel +0.3 - 1.3 on sm_80 and +1.2 - 1.5 on sm_90a (past an H200's ~3.6 - 3.9 budget);
# which wins is benchmarks/input_scale_cost.py's to say on a GPU. Prefill (M > 16) gathers first: there
# the pass is a few percent of the GEMM and the tile loads stay contiguous. False: gather first at decode too.
FUSE_INPUT_PERM = True
# The prefill kernel (M > 16) likewise, each x tile multiplied between its load and the dot; None: by
# GPU (_fuse_prefill_scale). On sm_90a the multiplied tile reaches wgmma from registers instead of shared
# memory, for +0.25 - 0.5 SASS instructions per weight on 4096 x 4096 (G = 64 / 128: 128x256 tile
# 4.92 -> 5.42, 128x128 6.38 -> 6.81; +0.9 on 128x64), inside the tensor cores' issue budget (BLOCK_M / 16
# per weight). On sm_80 every warp multiplies the rows it feeds to mma.sync, once per warp column:
# +1.1 - 2.4 (64x128 5.86 -> 6.98, 128x128 7.94 -> 10.38), near the BLOCK_M / 8 budget of the 64-row
# tiles, so there x * m takes its own pass (~M x K x 4 bytes of traffic, ~6% of a 4096^3 GEMM). fp32
# layers always do (their FMA tiles spill with it). benchmarks/input_scale_cost.py times both: on an H200
# (triton 3.6, 4096 x 4096, G = 128, M = 4096) the fused multiply took the GEMM from 363 to 473 us, the
# separate pass to 410 us, so compiled kernels take the pass everywhere now; the interpreter keeps the
# fused tiles (what the CPU tests check by default; they run both).
FUSE_INPUT_SCALE_PREFILL = None
# The inline-PTX dequantization of the decode kernel and of the prefill row tile (fp16 / bf16 on a
# GPU). False: the same numbers in the same order from Triton ops (what the interpreter runs), e.g.
# to rule the PTX out on a new GPU.
PTX_DEQUANT = True


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


@triton.jit
def _load_dequant_rows(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS, stride_qn, stride_sn,
                       m0, m1, m2, m3, W_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """The same tile as _load_dequant_tile but as W's rows, [BLOCK_N, BLOCK_K], built in registers
    by _dequant_rows (no [K/8, 8, N] reshape through shared memory)."""
    offs_kw = tl.multiple_of(k0 // 8, BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    n_mask = offs_n < N
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_kw[None, :],
                    mask=n_mask[:, None] & (offs_kw < KW)[None, :], other=0)
    g = tl.minimum(k0 // G, NUM_GROUPS - 1)
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)[:, None]
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)[:, None]
    return _dequant_rows(words, z, s, m0, m1, m2, m3, W_DTYPE, True, ASM)


def _decode_configs():
    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    # stages keep several weight tiles in flight per program (the kernel is latency-bound otherwise)
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in [(4, 2), (4, 3), (4, 4)]]


# Masks of nibbles 0..3 of a 16-bit half word, passed to the decode kernel as runtime arguments:
# ptxas then reads them from the constant bank inside one LOP3 ((w & mask) | exponent). As literals
# both constants need a register, and it re-materialises them with a move per use (aot.py counted
# ~0.8 extra instructions per weight on sm_90a).
NIBBLE_MASKS = (0xF, 0xF0, 0xF00, 0xF000)
# The GEMV's (_nibbles_dot): nibble j with the exponent of 2**(23 - 4j), the same way in.
GEMV_MASKS = (0x4B00000F, 0x490000F0, 0x47000F00, 0x4500F000)


@triton.jit
def _q_minus_z8(words, zf, m0, m1, m2, m3):
    """The exact q - z (fp32) of nibbles 0..7 of int32 words [R, W], zero points zf [R, 1] (fp32).

    Nibble j of a half word (bits 4j..4j+3) ORed into the exponent of 2**(23 - 4j) reads as the float
    2**(23 - 4j) + q: the nibble's lowest bit is that float's unit. So one LOP3 and one FADD make
    q - z exactly, with no shift and no int-to-float convert. m0..m3 are the masks NIBBLE_MASKS."""
    hi = words >> 16
    n0 = ((words & m0) | 0x4B000000).to(tl.float32, bitcast=True) - (zf + 8388608.0)   # 2**23
    n1 = ((words & m1) | 0x49000000).to(tl.float32, bitcast=True) - (zf + 524288.0)    # 2**19
    n2 = ((words & m2) | 0x47000000).to(tl.float32, bitcast=True) - (zf + 32768.0)     # 2**15
    n3 = ((words & m3) | 0x45000000).to(tl.float32, bitcast=True) - (zf + 2048.0)      # 2**11
    n4 = ((hi & m0) | 0x4B000000).to(tl.float32, bitcast=True) - (zf + 8388608.0)
    n5 = ((hi & m1) | 0x49000000).to(tl.float32, bitcast=True) - (zf + 524288.0)
    n6 = ((hi & m2) | 0x47000000).to(tl.float32, bitcast=True) - (zf + 32768.0)
    n7 = ((hi & m3) | 0x45000000).to(tl.float32, bitcast=True) - (zf + 2048.0)
    return n0, n1, n2, n3, n4, n5, n6, n7


@triton.jit
def _dequant_rows(words, zf, sf, m0, m1, m2, m3, DTYPE: tl.constexpr, SCALE: tl.constexpr,
                  ASM: tl.constexpr = False):
    """int32 words [R, W] (8 nibbles each), zero points zf and scales sf [R, 1] (fp32) ->
    [R, 8 * W] in DTYPE, column 8 * w + i from nibble i of word w: the exact small integer q - z, or
    with SCALE the reference's weight, (q - z) * s (exact in fp32) rounded once to DTYPE.
    ASM (SCALE, fp16 / bf16, GPU): the same numbers by the inline PTX SCALED_*_PTX, two per
    instruction."""
    if ASM:
        if DTYPE == tl.float16:
            n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
                SCALED_F16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r",
                [words, _pair_bits(-(zf + 1024.0), DTYPE), _pair_bits(sf, DTYPE), _pair_bits(-(zf + 64.0), DTYPE)],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        else:
            n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
                SCALED_BF16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
                [words, _pair_bits(-(zf + 128.0), DTYPE), _pair_bits(sf, DTYPE)],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        n0, n1, n2, n3, n4, n5, n6, n7 = _q_minus_z8(words, zf, m0, m1, m2, m3)
        if SCALE:
            n0, n1, n2, n3, n4, n5, n6, n7 = n0 * sf, n1 * sf, n2 * sf, n3 * sf, n4 * sf, n5 * sf, n6 * sf, n7 * sf
    # join appends a last axis: [R, W, 2, 2, 2] with index (c, b, a) holding nibble 4c + 2b + a
    w = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(_round_to(w, DTYPE), (words.shape[0], words.shape[1] * 8))


# Paired dequantization: one 32-bit word of 8 nibbles -> the 8 exact small integers q - z as fp16 /
# bf16, two per instruction. One LOP3 puts nibbles j and j + 4 (16 bits apart) into the mantissas of
# a magic-number pair, one packed add / FMA subtracts magic + z:
#   fp16: 0x6400 | q = 1024 + q, 0x6400 | q << 4 = 1024 + 16q (times 1/16 in the FMA): nibbles
#         (0, 4) and (1, 5) from the word, (2, 6) and (3, 7) from word >> 8 - 9 instructions a word;
#   bf16: 0x4300 | q = 128 + q (7-bit mantissa: no room for 16q), each pair shifted down - 11.
# The pairs (nibble j, nibble j + 4) end in t0..t3. Operands: $8 = word, $9 = the pair -(magic + z),
# fp16's -(magic / 16 + z) pair ZHI. tests/test_w4a16.py executes the composed strings on every
# nibble and zero point.
_PTX_REGS = "{ .reg .b32 w4, w8, w12, t0, t1, t2, t3, c, nz, u0, u1, u2, u3; "
_F16_Q_MINUS_Z = (
    "shr.u32 w8, $8, 8; mov.b32 c, 0x2C002C00; "
    "lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA; lop3.b32 t1, $8, 0x00F000F0, 0x64006400, 0xEA; "
    "lop3.b32 t2, w8, 0x000F000F, 0x64006400, 0xEA; lop3.b32 t3, w8, 0x00F000F0, 0x64006400, 0xEA; "
    "add.rn.f16x2 t0, t0, $9; fma.rn.f16x2 t1, t1, c, ZHI; add.rn.f16x2 t2, t2, $9; fma.rn.f16x2 t3, t3, c, ZHI; ")
_BF16_Q_MINUS_Z = (
    "shr.u32 w4, $8, 4; shr.u32 w8, $8, 8; shr.u32 w12, $8, 12; mov.b32 c, 0x3F803F80; "
    "lop3.b32 t0, $8, 0x000F000F, 0x43004300, 0xEA; lop3.b32 t1, w4, 0x000F000F, 0x43004300, 0xEA; "
    "lop3.b32 t2, w8, 0x000F000F, 0x43004300, 0xEA; lop3.b32 t3, w12, 0x000F000F, 0x43004300, 0xEA; "
    "fma.rn.bf16x2 t0, t0, c, $9; fma.rn.bf16x2 t1, t1, c, $9; fma.rn.bf16x2 t2, t2, c, $9; fma.rn.bf16x2 t3, t3, c, $9; ")
# The decode kernel keeps the pairs side by side: outputs $0..$7 = nibbles 0..7, $j and $(j + 4) from tj.
_PAIRED_OUT = "mov.b32 {$0, $4}, t0; mov.b32 {$1, $5}, t1; mov.b32 {$2, $6}, t2; mov.b32 {$3, $7}, t3; }"
# The prefill row tile multiplies by the scale pair $10 (x * s + -0: one rounding of the exact
# (q - z) * s, the reference's weight) and puts the values back in natural k order by four PRMTs
# (x's tile comes from shared memory: its columns cannot be permuted for free).
_SCALED_OUT = (
    "mov.b32 nz, 0x80008000; fma.rn.T2 t0, t0, $10, nz; fma.rn.T2 t1, t1, $10, nz; fma.rn.T2 t2, t2, $10, nz; "
    "fma.rn.T2 t3, t3, $10, nz; "
    "prmt.b32 u0, t0, t1, 0x5410; prmt.b32 u1, t2, t3, 0x5410; prmt.b32 u2, t0, t1, 0x7632; prmt.b32 u3, t2, t3, 0x7632; "
    "mov.b32 {$0, $1}, u0; mov.b32 {$2, $3}, u1; mov.b32 {$4, $5}, u2; mov.b32 {$6, $7}, u3; }")
PAIRS_F16_PTX = tl.constexpr(_PTX_REGS + _F16_Q_MINUS_Z.replace("ZHI", "$10") + _PAIRED_OUT)
PAIRS_BF16_PTX = tl.constexpr(_PTX_REGS + _BF16_Q_MINUS_Z + _PAIRED_OUT)
SCALED_F16_PTX = tl.constexpr(_PTX_REGS + _F16_Q_MINUS_Z.replace("ZHI", "$11") + _SCALED_OUT.replace("T2", "f16x2"))
SCALED_BF16_PTX = tl.constexpr(_PTX_REGS + _BF16_Q_MINUS_Z + _SCALED_OUT.replace("T2", "bf16x2"))
# The M = 1 GEMV's packed variant (GEMV_HALF2, fp16 only): one word's sum_i x_i * (q_i - z) with the products
# made and added two at a time in fp16 - the pairs (q_j - z, q_{j+4} - z) of _F16_Q_MINUS_Z times the pairs
# (x_j, x_{j+4}), one HMUL2 and three HFMA2, one chain of four terms a half - then the two halves added in fp32:
# 17 instructions a word where the fp32 path (_nibbles_dot) spends ~28. Operands: $1 = word, $2 = the pair
# -(1024 + z), $3 = -(64 + z), $4..$7 = x's pairs (x_j, x_{j+4}) for j = 0..3, times 2**-6 (X_PAIRS_F16_PTX);
# $0 = the fp32 sum. _h2_word_dot has the Triton-op twin.
H2_DOT_F16_PTX = tl.constexpr(
    "{ .reg .b32 w8, t0, t1, t2, t3, c, p; .reg .b16 lo, hi; .reg .f32 flo, fhi, sum; "
    + _F16_Q_MINUS_Z.replace("$9", "$2").replace("$8", "$1").replace("ZHI", "$3")
    + "mul.rn.f16x2 p, t0, $4; fma.rn.f16x2 p, t1, $5, p; fma.rn.f16x2 p, t2, $6, p; fma.rn.f16x2 p, t3, $7, p; "
      "mov.b32 {lo, hi}, p; cvt.f32.f16 flo, lo; cvt.f32.f16 fhi, hi; add.rn.f32 sum, flo, fhi; mov.b32 $0, sum; }")
# x's 8 values of a word, loaded as 4 words of fp16 pairs ($4..$7: (x0, x1), (x2, x3), (x4, x5), (x6, x7)), into
# the pairs (x_j, x_{j+4}) ($0..$3) by PRMT, each times 2**-6 (HMUL2: exact but for values under 2**-8, which it
# rounds to fp16's subnormal spacing 2**-24), so that no sum of four products (at most 4 * 15 * 1023.5) overflows
# for any finite x; the kernel multiplies the scales by 2**6. Once per word of x a thread holds, not per row.
X_PAIRS_F16_PTX = tl.constexpr(
    "{ .reg .b32 s; mov.b32 s, 0x24002400; "
    "prmt.b32 $0, $4, $6, 0x5410; prmt.b32 $1, $4, $6, 0x7632; prmt.b32 $2, $5, $7, 0x5410; "
    "prmt.b32 $3, $5, $7, 0x7632; "
    "mul.rn.f16x2 $0, $0, s; mul.rn.f16x2 $1, $1, s; mul.rn.f16x2 $2, $2, s; mul.rn.f16x2 $3, $3, s; }")
H2_X_SCALE = 2.0 ** -6  # (0x2400 in fp16; the kernel multiplies the scales by 64.0 to undo it)
# The M = 1 GEMV's loads made in the layout of their use (GEMV_DIRECT_LOADS): x's 16 bytes for a word of W as 4
# words of pairs, and a row's scale or zero point. A tl.load's layout is the coalescer's (a [W] vector spread over
# the threads, a [rows, groups] tile), and Triton then moves what it loaded to the word tile's threads through
# shared memory (STS, BAR.SYNC, LDS every step); an inline-asm operand takes its user's layout, so each thread
# loads what it multiplies: x's words again in every warp that holds their columns (L1 hits), a row's scale and
# zero point once for the thread's words of a group (4 words of 16 or 4 in one group; identical addresses merged by
# the compiler). Read-only data (.nc): nothing in the launch writes x, the scales or the zero points.
LD_V4_B32_PTX = tl.constexpr("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];")
LD_B16_PTX = tl.constexpr("ld.global.nc.b16 $0, [$1];")


def _use_ptx(dot_fp32: bool) -> bool:
    """The inline-PTX dequantization: on a GPU, for fp16 / bf16 tensor-core dots, unless switched off."""
    return PTX_DEQUANT and not INTERPRET and not dot_fp32


@triton.jit
def _pair_bits(v, DTYPE: tl.constexpr):
    """fp32 [R, 1] (exactly representable in DTYPE) -> int32 holding it in DTYPE twice."""
    h = v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _q_minus_z_pairs(words, zf, m0, m1, m2, m3, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """int32 words [R, W], zero points zf [R, 1] (fp32) -> nibbles 0..7's exact q - z, eight [R, W] in DTYPE.
    ASM: PAIRS_*_PTX (GPU, fp16 / bf16), nibbles j and j + 4 made by one instruction (and packed side by side
    in a register wherever the caller puts them next to each other); otherwise the same numbers with Triton ops
    (the interpreter; fp32)."""
    if ASM:
        if DTYPE == tl.float16:
            zlo = _pair_bits(-(zf + 1024.0), DTYPE)
            zhi = _pair_bits(-(zf + 64.0), DTYPE)
            n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
                PAIRS_F16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, zlo, zhi], dtype=(tl.float16,) * 8,
                is_pure=True, pack=1)
        else:
            zlo = _pair_bits(-(zf + 128.0), DTYPE)
            n0, n1, n2, n3, n4, n5, n6, n7 = tl.inline_asm_elementwise(
                PAIRS_BF16_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, zlo], dtype=(tl.bfloat16,) * 8,
                is_pure=True, pack=1)
    else:
        n0, n1, n2, n3, n4, n5, n6, n7 = _q_minus_z8(words, zf, m0, m1, m2, m3)
        n0, n1, n2, n3 = n0.to(DTYPE), n1.to(DTYPE), n2.to(DTYPE), n3.to(DTYPE)
        n4, n5, n6, n7 = n4.to(DTYPE), n5.to(DTYPE), n6.to(DTYPE), n7.to(DTYPE)
    return n0, n1, n2, n3, n4, n5, n6, n7


@triton.jit
def _dequant_pairs(words, zf, m0, m1, m2, m3, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """int32 words [R, W], zero points zf [R, 1] (fp32) -> the exact q - z as [R, 8 * W] in DTYPE,
    in the paired order: column 8 * w + 2 * j + e holds nibble j + 4 * e of word w (so the two
    values one instruction makes sit side by side, as the dot's operand packs them; the caller
    reads x's rows in the same order)."""
    n0, n1, n2, n3, n4, n5, n6, n7 = _q_minus_z_pairs(words, zf, m0, m1, m2, m3, DTYPE, ASM)
    # [R, W, 2, 2, 2], index (a, b, e) = column 4a + 2b + e = nibble (2a + b) + 4e
    w = tl.join(tl.join(tl.join(n0, n2), tl.join(n1, n3)), tl.join(tl.join(n4, n6), tl.join(n5, n7)))
    return tl.reshape(w, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _fragment_rows(BLOCK_N: tl.constexpr):
    """The weight rows (of the program's BLOCK_N = 64) whose words tile row r holds, for the fragment order
    (_dequant_fragment): r = 32a + 8w + l -> 16w + 8a + l."""
    r = tl.arange(0, BLOCK_N)
    return (r // 8 % 4) * 16 + (r // 32) * 8 + r % 8


@triton.jit
def _dequant_fragment(words, zf, m0, m1, m2, m3, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """The q - z of words [64, 16] (int32, loaded as rows _fragment_rows; zero points zf [64, 1], fp32) as the
    [64, 128] first operand of a tensor-core dot, in the order the tensor cores' register fragment holds it:
    tile row 16w + 8a + l is words row 32a + 8w + l, and column 32u + 8j + 2c + e holds nibble j + 4e of word
    4c + u (x.T's rows go the same way: k = 32c + 8u + 4e + j). Only a relabelling of the values each thread
    already holds, for 4 warps loading the [64, 16] words tile 16 bytes a thread (4 threads a row, 8 rows a
    warp, 2 rows apart by 32 a thread): each thread ends with its rows l and l + 8 of its warp's 16 and columns
    2c + e (+ 8, + 16q) of every 16 - an m16n8k16 / m64nNk16 A fragment - so the compiler passes the registers
    to mma.sync / wgmma as they are, where _dequant_pairs' natural order goes through shared memory (a store, a
    barrier and an ldmatrix a trip)."""
    n0, n1, n2, n3, n4, n5, n6, n7 = _q_minus_z_pairs(words, zf, m0, m1, m2, m3, DTYPE, ASM)
    # [64, 16 (4c + u), 2 (e), 2 (j & 1), 2 (j >> 1)]
    t = tl.join(tl.join(tl.join(n0, n4), tl.join(n1, n5)), tl.join(tl.join(n2, n6), tl.join(n3, n7)))
    t = tl.reshape(t, (2, 4, 8, 4, 4, 2, 2, 2))            # rows (a, w, l), words (c, u), e, j & 1, j >> 1
    t = tl.permute(t, (1, 0, 2, 4, 7, 6, 3, 5))            # rows (w, a, l), columns (u, j >> 1, j & 1, c, e)
    return tl.reshape(t, (64, 128))


@triton.jit
def _fragment_x(xt, BLOCK_M: tl.constexpr):
    """x.T's step [128, BLOCK_M] (row k) in _dequant_fragment's column order: row 32u + 8j + 2c + e <- k = 32c +
    8u + 4e + j."""
    return tl.reshape(tl.permute(tl.reshape(xt, (4, 4, 2, 2, 2, BLOCK_M)), (1, 3, 4, 0, 2, 5)), (128, BLOCK_M))


@triton.jit
def _load_input_scale(m_ptr, k, offs_m, K, EVEN: tl.constexpr, TILE: tl.constexpr):
    """The input scale for x.T's tile [len(k), len(offs_m)]: TILE loads it as that tile (the same k
    offsets, stride 0 along M), so it arrives in x.T's own layout (sm_90a: +0.2 SASS instructions
    per weight against +0.8 as a vector); else as a [len(k), 1] column broadcast along M (sm_80:
    -0.25 against the kernel without a scale, +2.1 as a tile; see FUSE_INPUT_SCALE)."""
    if TILE:
        ptrs = m_ptr + k[:, None] + 0 * offs_m[None, :]
        mask = (k < K)[:, None] & (offs_m >= 0)[None, :]
    else:  # one return below: Triton's if-branches must agree on the returned shape
        ptrs = m_ptr + k[:, None]
        mask = (k < K)[:, None]
    if EVEN:
        m = tl.load(ptrs)
    else:
        m = tl.load(ptrs, mask=mask, other=0)
    return m


@triton.jit
def _input_channels(p_ptr, k, K, EVEN: tl.constexpr, HAS_PERM: tl.constexpr):
    """The input channels that weight columns k multiply: k itself, or with HAS_PERM the layer's
    input_perm[k] (p_ptr int32 [K]; 0 past K, where the x load is masked too)."""
    if HAS_PERM:
        if EVEN:
            k = tl.load(p_ptr + k)
        else:
            k = tl.load(p_ptr + k, mask=k < K, other=0)
    return k


@fast_launch
@autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "KW", "GROUP_W", "BLOCK_N", "SPLIT_K", "STEPS", "HAS_SCALE", "HAS_PERM",
                                           "FRAGMENT"])
@triton.jit
def _w4a16_decode_kernel(
    x_ptr, m_ptr, p_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, count_ptr,
    M, N, KW, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om,
    KW_PER_SPLIT, m0, m1, m2, m3,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, FIXUP: tl.constexpr, DOT_FP32: tl.constexpr,
    EVEN: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_TILE: tl.constexpr, HAS_PERM: tl.constexpr,
    GROUP_W: tl.constexpr, PER_CHANNEL: tl.constexpr, ASM: tl.constexpr, FRAGMENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, STEPS: tl.constexpr,
):
    """2 <= M <= 16: y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * (q[n, k] - z[n, g]).

    Computed transposed (y.T = W @ x.T): the weight tile [BLOCK_N, BLOCK_K] is the dot's first
    operand, in the layout it is loaded in (16-byte loads along K, nibbles joined in registers: no
    transpose through shared memory), and x.T [BLOCK_K, 16] the small second one (wgmma m64n16 on
    Hopper). The dot multiplies x by the exact small integers q - z (_dequant_pairs; its column
    order within a word is nibbles 0 4 1 5 2 6 3 7, and x.T's rows are permuted alike); the group's
    scale is applied to the dot's fp32 result (per-channel: once at the end). FRAGMENT (64 rows, 16-word
    steps): the rows loaded in the order _fragment_rows and the tile made in the tensor cores' register order
    (_dequant_fragment, x.T's rows alike: _fragment_x), so that it reaches mma.sync / wgmma from the registers it
    was made in instead of through a shared-memory buffer each step. A step's scales and zero
    points are loaded one step ahead (_decode_group_sz): 2-byte loads, which Triton's pipeliner leaves
    out of its cp.async stages; loaded at their own step, they made each trip wait for them before
    its dequantization could begin. ASM: the PTX
    dequantization (fp16 / bf16 on a GPU), else its Triton-op twin. A loop trip makes STEPS dots of
    BLOCK_KW words (one group each: BLOCK_KW divides GROUP_W). Program (pid_n, pid_k) covers words
    [pid_k * KW_PER_SPLIT, +KW_PER_SPLIT) of its rows; with SPLIT_K > 1 it writes fp32 partial sums
    [SPLIT_K, M, N] to part_ptr. FIXUP: the program that finishes a row tile last (a counter per
    tile in count_ptr, which it sets back to zero) adds the partials in the order p = 0, 1, ... and
    writes y, so the result does not depend on which program that is; else _splitk_reduce_kernel does
    the same in a second launch. EVEN: no N or K remainder anywhere. HAS_SCALE: y = (x * m) @ W.T,
    the layer's input scale (m_ptr [K]) multiplied into x.T's tile as it is loaded, in x's dtype
    (BLOCK_M / BLOCK_N multiplies per weight: the x tile is narrow). HAS_PERM: x's channels read in
    the order p_ptr [K] (int32; the layer's input_perm): column k of W meets x[:, perm[k]]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_KW)
    n_mask = offs_n < N
    m_mask = offs_m < M
    x_dtype = x_ptr.dtype.element_ty
    dot_dtype = tl.float32 if DOT_FP32 else x_dtype
    if FRAGMENT:
        offs_wn = pid_n * BLOCK_N + _fragment_rows(BLOCK_N)
    else:
        offs_wn = offs_n
    wn_mask = offs_wn < N
    w_rows = qw_ptr + offs_wn[:, None] * stride_qn
    sz_rows = offs_n * stride_sn
    z_rows = offs_wn * stride_sn
    if PER_CHANNEL:
        s = tl.load(s_ptr + sz_rows, mask=n_mask, other=0).to(tl.float32)
        z = tl.load(z_ptr + z_rows, mask=wn_mask, other=0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    kw_begin = pid_k * KW_PER_SPLIT
    if not PER_CHANNEL:  # the first step's scales and zero points; each step then loads its successor's
        s, z = _decode_group_sz(s_ptr, z_ptr, sz_rows, z_rows, n_mask, wn_mask, kw_begin, KW, GROUP_W, EVEN)
    for kw0 in range(kw_begin, kw_begin + KW_PER_SPLIT, BLOCK_KW * STEPS):
        for step in tl.static_range(STEPS):
            kw_step = tl.multiple_of(kw0 + step * BLOCK_KW, BLOCK_KW)
            if not PER_CHANNEL:
                s_step, z_step = s, z
                s, z = _decode_group_sz(s_ptr, z_ptr, sz_rows, z_rows, n_mask, wn_mask, kw_step + BLOCK_KW, KW,
                                        GROUP_W, EVEN)
            kw = kw_step + offs_w
            k = kw_step * 8 + tl.arange(0, BLOCK_KW * 8)
            x_ptrs = x_ptr + offs_m[None, :] * stride_xm + _input_channels(p_ptr, k, KW * 8, EVEN, HAS_PERM)[:, None]
            if EVEN:
                words = tl.load(w_rows + kw[None, :])
                xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0)
                if HAS_SCALE:
                    xt = _times_input_scale(xt, _load_input_scale(m_ptr, k, offs_m, KW * 8, True, SCALE_TILE))
            else:
                words = tl.load(w_rows + kw[None, :], mask=wn_mask[:, None] & (kw < KW)[None, :], other=0)
                xt = tl.load(x_ptrs, mask=m_mask[None, :] & (k < KW * 8)[:, None], other=0)
                if HAS_SCALE:
                    xt = _times_input_scale(xt, _load_input_scale(m_ptr, k, offs_m, KW * 8, False, SCALE_TILE))
            if FRAGMENT:
                w = _dequant_fragment(words, z if PER_CHANNEL else z_step, m0, m1, m2, m3, dot_dtype, ASM)
                xt = _fragment_x(xt, BLOCK_M)
            else:
                w = _dequant_pairs(words, z if PER_CHANNEL else z_step, m0, m1, m2, m3, dot_dtype, ASM)
                # x's rows in the same order (a permutation inside each thread's registers):
                # row 8w + 2j + e <- k = 8w + j + 4e
                xt = tl.reshape(tl.permute(tl.reshape(xt, (BLOCK_KW, 2, 4, BLOCK_M)), (0, 2, 1, 3)),
                                (BLOCK_KW * 8, BLOCK_M))
            if PER_CHANNEL:
                if DOT_FP32:
                    acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(w, xt, acc)
            else:
                if DOT_FP32:
                    part = tl.dot(w, xt.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(w, xt)
                acc += part * s_step[:, None]
    if PER_CHANNEL:
        acc = acc * s[:, None]
    out_mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptrs, _round_to(acc, x_dtype), mask=out_mask)
    else:
        part_ptrs = part_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.store(part_ptrs + pid_k * M * N, acc, mask=out_mask)
        if FIXUP:
            _splitk_fixup(part_ptrs, out_ptrs, out_mask, count_ptr + pid_n, b_ptr + offs_n, n_mask, M * N,
                          HAS_BIAS, SPLIT_K, x_dtype)


@triton.jit
def _decode_group_sz(s_ptr, z_ptr, sz_rows, z_rows, n_mask, z_mask, kw, KW, GROUP_W: tl.constexpr,
                     EVEN: tl.constexpr):
    """The scales [BLOCK_N] and zero points [BLOCK_N, 1] (fp32) of the group that holds packed word kw (of
    rows sz_rows): loaded a dot step before the step that uses them, so that their latency passes while
    the step before is computed. Past the program's last step kw is a word of the next program's (a
    group loaded, never used) or K itself: EVEN reads the last group again (every row is real, no mask
    to make), else rows past N and words past K read zeros, as the step's masked words do."""
    if EVEN:
        g = tl.minimum(kw, KW - 1) // GROUP_W
        s = tl.load(s_ptr + sz_rows + g)
        z = tl.load(z_ptr + z_rows + g)
    else:
        in_k = tl.full(n_mask.shape, kw, tl.int32) < KW
        g = kw // GROUP_W
        s = tl.load(s_ptr + sz_rows + g, mask=n_mask & in_k, other=0)
        z = tl.load(z_ptr + z_rows + g, mask=z_mask & in_k, other=0)
    return s.to(tl.float32), z.to(tl.float32)[:, None]


@triton.jit
def _splitk_fixup(part_ptrs, out_ptrs, out_mask, count_ptr, b_ptrs, n_mask, MN, HAS_BIAS: tl.constexpr,
                  SPLIT_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Split-K without a second launch: the last of a row tile's SPLIT_K programs to arrive reduces.

    Each program has just stored its partial tile. The barrier orders every thread's stores before
    thread 0's release-acquire increment of the tile's counter (the pattern of CUTLASS's semaphore:
    __syncthreads, then one atomic at GPU scope); the program that sees SPLIT_K - 1 knows all the
    other partials are visible, reads them past L1 (.cg), adds them in the fixed order p = 0, 1, ...
    (the same sums as _splitk_reduce_kernel: bit-identical, independent of arrival order), adds the
    bias, rounds once and stores y, then sets the counter back to 0 for the next launch (also a CUDA
    graph's next replay). The counters must start at zero and must not be shared by launches that
    can run at the same time (ops.w4a16_workspace: one per layer)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        acc = tl.load(part_ptrs, mask=out_mask, other=0, cache_modifier=".cg")
        for p in tl.static_range(1, SPLIT_K):
            acc += tl.load(part_ptrs + p * MN, mask=out_mask, other=0, cache_modifier=".cg")
        if HAS_BIAS:
            acc += tl.load(b_ptrs, mask=n_mask, other=0).to(tl.float32)[:, None]
        tl.store(out_ptrs, _round_to(acc, OUT_DTYPE), mask=out_mask)
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


@fast_launch
@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, HAS_BIAS: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum_p part[p, i] (in order p = 0, 1, ...: deterministic) + bias, rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0)
    for p in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + p * MN + offs, mask=mask, other=0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, _round_to(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_words(x_ptr, m_ptr, p_ptr, kw, KW, EVEN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr):
    """x[8 * kw + i] as [BLOCK_KW, 8] in x's dtype: one contiguous load per word of x.
    HAS_SCALE: x * m (the layer's input scale, m_ptr [K]), rounded to x's dtype as torch does.
    HAS_PERM: x[perm[k]] in place of x[k] (p_ptr [K], the layer's input_perm; the scale is in W's
    column order, so it stays indexed by k)."""
    offs = kw[:, None] * 8 + tl.arange(0, 8)[None, :]
    if EVEN:
        x = tl.load(x_ptr + _input_channels(p_ptr, offs, KW * 8, True, HAS_PERM))
        if HAS_SCALE:
            x = _times_input_scale(x, tl.load(m_ptr + offs))
    else:
        x = tl.load(x_ptr + _input_channels(p_ptr, offs, KW * 8, False, HAS_PERM), mask=(kw < KW)[:, None], other=0)
        if HAS_SCALE:
            x = _times_input_scale(x, tl.load(m_ptr + offs, mask=(kw < KW)[:, None], other=0))
    return x


@triton.jit
def _x_columns(x):
    """_x_words' [BLOCK_KW, 8] as eight [BLOCK_KW] fp32 vectors, x[8 * kw + i] for i = 0..7: converted
    before it is split and spread to the threads that hold the weights (so once per element, not per
    row)."""
    return _split8(x.to(tl.float32))


@triton.jit
def _split8(x):
    """[R, 8] -> its eight columns, [R] each."""
    x = x.reshape(x.shape[0], 4, 2)
    x_even, x_odd = tl.split(x)                                 # i = 0 2 4 6 | 1 3 5 7
    x04, x26 = tl.split(x_even.reshape(x.shape[0], 2, 2))
    x15, x37 = tl.split(x_odd.reshape(x.shape[0], 2, 2))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _nibble_floats(words, z):
    """What _nibbles_dot / _gemv_q_minus_z mask and subtract: the word's nibbles 0..3 (lo) and 4..7 (hi) ORed with
    every exponent bit of 2**23, 2**19, 2**15, 2**11, and z plus each of those powers of two."""
    return (words | 0x4F000000, (words >> 16) | 0x4F000000,
            z + 8388608.0, z + 524288.0, z + 32768.0, z + 2048.0)


@triton.jit
def _nibbles_dot(words, z, x0, x1, x2, x3, x4, x5, x6, x7, m0, m1, m2, m3):
    """sum_i x_i * (q_i - z) over the 8 nibbles of each word, every product exact in fp32 (nibbles
    4..7 come from word >> 16). Each nibble becomes the float 2**(23 - 4j) + q for its place j
    (0..3, bits 4j..4j+3) in one AND: the word ORed once with 0x4F000000 (every exponent bit the
    four floats use) keeps, under the mask m_j = GEMV_MASKS[j] = exponent of 2**(23 - 4j) | nibble j,
    just that float's exponent and the nibble, whose lowest bit is the float's unit. One FADD of
    2**(23 - 4j) + z then gives q - z exactly: no shift, no int-to-float convert, and x needs no
    scaling by 16**-j. The masks come in as kernel arguments so that ptxas reads them from the
    constant bank inside the LOP3 (as literals it re-materialised them with a MOV per use on sm_90a:
    +0.45 SASS instructions per weight).
    (Each q - z is consumed as it is made: all eight made first, as _gemv_q_minus_z returns them, compiled
    to 127 - 167 registers where this takes 96 - 128.)"""
    lo, hi, z0, z1, z2, z3 = _nibble_floats(words, z)
    d = ((lo & m0).to(tl.float32, bitcast=True) - z0) * x0[None, :]
    d += ((lo & m1).to(tl.float32, bitcast=True) - z1) * x1[None, :]
    d += ((lo & m2).to(tl.float32, bitcast=True) - z2) * x2[None, :]
    d += ((lo & m3).to(tl.float32, bitcast=True) - z3) * x3[None, :]
    d += ((hi & m0).to(tl.float32, bitcast=True) - z0) * x4[None, :]
    d += ((hi & m1).to(tl.float32, bitcast=True) - z1) * x5[None, :]
    d += ((hi & m2).to(tl.float32, bitcast=True) - z2) * x6[None, :]
    d += ((hi & m3).to(tl.float32, bitcast=True) - z3) * x7[None, :]
    return d


@triton.jit
def _gemv_q_minus_z(words, z, m0, m1, m2, m3):
    """The exact q - z (fp32) of nibbles 0..7 of each word, made as _nibbles_dot makes them (m0..m3 the
    GEMV_MASKS): for the packed GEMV's Triton-op twin."""
    lo, hi, z0, z1, z2, z3 = _nibble_floats(words, z)
    return ((lo & m0).to(tl.float32, bitcast=True) - z0, (lo & m1).to(tl.float32, bitcast=True) - z1,
            (lo & m2).to(tl.float32, bitcast=True) - z2, (lo & m3).to(tl.float32, bitcast=True) - z3,
            (hi & m0).to(tl.float32, bitcast=True) - z0, (hi & m1).to(tl.float32, bitcast=True) - z1,
            (hi & m2).to(tl.float32, bitcast=True) - z2, (hi & m3).to(tl.float32, bitcast=True) - z3)


@triton.jit
def _half(v, HI: tl.constexpr, DTYPE: tl.constexpr = tl.float16):
    """The low (or HI: high) fp16 (or DTYPE: bf16) of int32 pairs."""
    if HI:
        v = v >> 16
    return (v & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _pack_halves(a, b):
    """fp16 a, b -> int32 pairs (a low, b high)."""
    return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _ld_words4(p, ASM: tl.constexpr):
    """The int32 at p, p + 1, p + 2, p + 3 (p 16-byte aligned) as four tensors of p's shape: one 16-byte load an
    element, in the layout where they are used (ASM: LD_V4_B32_PTX); else tl.load's twin (the interpreter)."""
    if ASM:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(LD_V4_B32_PTX, "=r,=r,=r,=r,l", [p], dtype=(tl.int32,) * 4,
                                                   is_pure=True, pack=1)
    else:
        w0, w1, w2, w3 = tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)
    return w0, w1, w2, w3


@triton.jit
def _ld_2byte(p, ASM: tl.constexpr):
    """The fp16 / bf16 values at p, loaded in the layout where they are used (ASM: LD_B16_PTX); else tl.load."""
    if ASM:
        v = tl.inline_asm_elementwise(LD_B16_PTX, "=h,l", [p], dtype=tl.int16, is_pure=True, pack=1)
        v = v.to(p.dtype.element_ty, bitcast=True)
    else:
        v = tl.load(p)
    return v


@triton.jit
def _pair_columns(x01, x23, x45, x67, DTYPE: tl.constexpr):
    """x's words of 2-byte pairs (x0 | x1 << 16, ...) -> x_0 .. x_7 in fp32 (exact): _x_columns' values."""
    return (_half(x01, False, DTYPE).to(tl.float32), _half(x01, True, DTYPE).to(tl.float32),
            _half(x23, False, DTYPE).to(tl.float32), _half(x23, True, DTYPE).to(tl.float32),
            _half(x45, False, DTYPE).to(tl.float32), _half(x45, True, DTYPE).to(tl.float32),
            _half(x67, False, DTYPE).to(tl.float32), _half(x67, True, DTYPE).to(tl.float32))


@triton.jit
def _x_pairs_of_words(x01, x23, x45, x67, ASM: tl.constexpr):
    """x's words of fp16 pairs [W] (x0 | x1 << 16, ...) -> the pairs (x_j, x_{j+4}) * 2**-6 for j = 0..3
    (X_PAIRS_F16_PTX; its twin from Triton ops)."""
    if ASM:
        xa, xb, xc, xd = tl.inline_asm_elementwise(X_PAIRS_F16_PTX, "=r,=r,=r,=r,r,r,r,r", [x01, x23, x45, x67],
                                                   dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    else:
        xa, xb, xc, xd = _x_pairs(_half(x01, False), _half(x01, True), _half(x23, False), _half(x23, True),
                                  _half(x45, False), _half(x45, True), _half(x67, False), _half(x67, True))
    return xa, xb, xc, xd


@triton.jit
def _x_pairs(x0, x1, x2, x3, x4, x5, x6, x7):
    """fp16 x_0..x_7 [W] -> the pairs (x_j, x_{j+4}) * 2**-6 as int32 [W] for j = 0..3 (one rounding of
    the exact product to fp16, as mul.rn.f16x2 makes it)."""
    x0, x1, x2, x3 = _x_prescale(x0), _x_prescale(x1), _x_prescale(x2), _x_prescale(x3)
    x4, x5, x6, x7 = _x_prescale(x4), _x_prescale(x5), _x_prescale(x6), _x_prescale(x7)
    return _pack_halves(x0, x4), _pack_halves(x1, x5), _pack_halves(x2, x6), _pack_halves(x3, x7)


@triton.jit
def _x_prescale(x):
    return (x.to(tl.float32) * 0.015625).to(tl.float16)  # H2_X_SCALE


@triton.jit
def _fma16(a, b, c):
    """fp16 a * b + c rounded once (fma.rn.f16): the exact value in fp64 - a product of an fp16 and a
    nibble difference has at most 15 significant bits, and any sum of it with an fp16 is a multiple of
    2**-24 below 2**20 - then one rounding to fp16."""
    return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float16)


@triton.jit
def _h2_word_dot(words, z, xa, xb, xc, xd, m0, m1, m2, m3, ASM: tl.constexpr):
    """The packed GEMV's sum_i x_i * (q_i - z) * 2**-6 of each word [R, W] (fp32): xa..xd int32 [W] x's pairs
    (_x_pairs), z fp32 [R, 1] or [R, W]. Two chains of fp16 products and sums, nibbles 0..3 and 4..7 (each
    rounded to fp16 at every step: a product, then three fused multiply-adds), added in fp32. ASM: the
    inline PTX H2_DOT_F16_PTX; else the same roundings in the same order from Triton ops (_fma16: the
    interpreter, or PTX_DEQUANT = False)."""
    if ASM:
        # (inline_asm_elementwise broadcasts its operands to one shape: the rows' pairs, x's words)
        d = tl.inline_asm_elementwise(
            H2_DOT_F16_PTX, "=r,r,r,r,r,r,r,r",
            [words, _pair_bits(-(z + 1024.0), tl.float16), _pair_bits(-(z + 64.0), tl.float16), xa[None, :],
             xb[None, :], xc[None, :], xd[None, :]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        t0, t1, t2, t3, t4, t5, t6, t7 = _gemv_q_minus_z(words, z, m0, m1, m2, m3)  # exact in fp32
        d = (_h2_chain(t0, t1, t2, t3, xa, xb, xc, xd, False).to(tl.float32)
             + _h2_chain(t4, t5, t6, t7, xa, xb, xc, xd, True).to(tl.float32))
    return d


@triton.jit
def _h2_chain(t0, t1, t2, t3, xa, xb, xc, xd, HI: tl.constexpr):
    """One half of H2_DOT_F16_PTX with Triton ops: fl(fl(fl(fl(t0 x0) + t1 x1) + t2 x2) + t3 x3) in fp16, x_j the
    low (or HI: high) halves of x's pairs. The first product is exact in fp32 (at most 4 x 11 bits), then
    rounded once, as mul.rn.f16x2 makes it; the rest fused (_fma16)."""
    p = (t0 * _half(xa, HI)[None, :].to(tl.float32)).to(tl.float16)
    p = _fma16(t1, _half(xb, HI)[None, :], p)
    p = _fma16(t2, _half(xc, HI)[None, :], p)
    return _fma16(t3, _half(xd, HI)[None, :], p)


@triton.jit
def _h2_x_step(x_ptr, m_ptr, p_ptr, kw, KW, EVEN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr,
               PAIR_LOADS: tl.constexpr, ASM: tl.constexpr):
    """x's pairs for the packed GEMV's words kw [W]: PAIR_LOADS (no input scale or channel order; x's start 4-byte
    aligned) reads them as 4 words of fp16 pairs per word of W (x0 | x1 << 16, ...) - no split of x's values
    across threads' registers; otherwise from _x_words' [W, 8] values."""
    if PAIR_LOADS:
        x32 = x_ptr.to(tl.pointer_type(tl.int32))
        if EVEN:
            x01 = tl.load(x32 + kw * 4)
            x23 = tl.load(x32 + kw * 4 + 1)
            x45 = tl.load(x32 + kw * 4 + 2)
            x67 = tl.load(x32 + kw * 4 + 3)
        else:
            x01 = tl.load(x32 + kw * 4, mask=kw < KW, other=0)
            x23 = tl.load(x32 + kw * 4 + 1, mask=kw < KW, other=0)
            x45 = tl.load(x32 + kw * 4 + 2, mask=kw < KW, other=0)
            x67 = tl.load(x32 + kw * 4 + 3, mask=kw < KW, other=0)
        xa, xb, xc, xd = _x_pairs_of_words(x01, x23, x45, x67, ASM)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7 = _split8(_x_words(x_ptr, m_ptr, p_ptr, kw, KW, EVEN, HAS_SCALE, HAS_PERM))
        xa, xb, xc, xd = _x_pairs(x0, x1, x2, x3, x4, x5, x6, x7)
    return xa, xb, xc, xd


@triton.jit
def _gemv_x(x_ptr, m_ptr, p_ptr, kw, KW, EVEN: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr,
            HALF2: tl.constexpr, PAIR_LOADS: tl.constexpr, ASM: tl.constexpr, DIRECT_X: tl.constexpr,
            LOAD_ASM: tl.constexpr):
    """The GEMV's x for words kw: _x_words' [W, 8], or with HALF2 _h2_x_step's four pair vectors. DIRECT_X (2-byte
    x, 16-byte aligned, no input scale or channel order, EVEN): x's four words of pairs a word of W, loaded where
    they are used (_ld_words4; LOAD_ASM its inline PTX) - with HALF2 made into the pairs."""
    if DIRECT_X:
        x01, x23, x45, x67 = _ld_words4(x_ptr.to(tl.pointer_type(tl.int32)) + kw * 4, LOAD_ASM)
        if HALF2:
            return _x_pairs_of_words(x01, x23, x45, x67, ASM)
        else:
            return x01, x23, x45, x67
    elif HALF2:
        return _h2_x_step(x_ptr, m_ptr, p_ptr, kw, KW, EVEN, HAS_SCALE, HAS_PERM, PAIR_LOADS, ASM)
    else:
        return _x_words(x_ptr, m_ptr, p_ptr, kw, KW, EVEN, HAS_SCALE, HAS_PERM)


@fast_launch
@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, m_ptr, p_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, count_ptr,
    N, KW, KW_PER_SPLIT, stride_qn, stride_sn, m0, m1, m2, m3,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_PERM: tl.constexpr, EVEN: tl.constexpr, GROUP_W: tl.constexpr,
    SPLIT_K: tl.constexpr, FIXUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    PREFETCH: tl.constexpr = False, HALF2: tl.constexpr = False, PAIR_LOADS: tl.constexpr = False,
    ASM: tl.constexpr = False, DIRECT_X: tl.constexpr = False, DIRECT_SZ: tl.constexpr = False,
    LOAD_ASM: tl.constexpr = False,
):
    """M = 1: y[n] = sum_g s[n, g] * sum_{k in g} x[k] * (q[n, k] - z[n, g]).

    A program owns BLOCK_N rows of W and streams all of K, BLOCK_KW packed words (8 * BLOCK_KW
    weights) of each row per step, in 16-byte loads. GROUP_W = words per group (a power of two; for
    per-channel scales any power of two >= KW). When BLOCK_KW <= GROUP_W a step lies in one group and
    scales/zeros are read once per row and step; otherwise as [BLOCK_N, groups] and broadcast to the
    groups' words in registers. (Loaded per word, their layout became the accumulator's under Triton
    3.6 - the GPU image's - and every nibble's product went through shared memory to reach it: 8.1
    SASS instructions per weight instead of 4.6.) The sum over K stays per thread until one reduction
    at the end. Program (pid_n, pid_k) covers words [pid_k * KW_PER_SPLIT, +KW_PER_SPLIT) of its rows
    (a multiple of BLOCK_KW); with SPLIT_K > 1 it writes its fp32 sums to part_ptr [SPLIT_K, N] and,
    with FIXUP, the last program of the row tile to arrive adds them in a fixed order (_splitk_fixup,
    a counter per 16 rows in count_ptr), as the decode kernel does; else _splitk_reduce_kernel does.
    EVEN: no N or K remainder in any program. HAS_SCALE: y = (x * m) @ W.T, the
    layer's input scale multiplied into x as it is loaded (once per element per program). HAS_PERM:
    x read through the layer's input_perm (p_ptr [K]), x[perm[k]] for column k. PREFETCH: each
    trip loads the next trip's words and x before it computes its own (a register double buffer:
    Triton pipelines only loads that feed a dot), so a program keeps a step of W in flight while it
    multiplies, and x's loads (L2 hits) wait behind it; the last trip re-reads its own step (EVEN; a
    cache hit) or loads masked words past K. HALF2 (fp16 x): each word's products made and added in
    fp16 pairs (_h2_word_dot; ASM: its inline PTX), x taken times 2**-6 and the scale times 2**6.
    DIRECT_X / DIRECT_SZ (GEMV_DIRECT_LOADS; EVEN): x's words, and where a step spans several groups the scales
    and zero points, loaded by each thread for the words it holds (_ld_words4, _ld_2byte; LOAD_ASM: inline PTX)
    rather than once per program and moved to those threads through shared memory: no barrier in the loop."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_w = tl.arange(0, BLOCK_KW)
    w_rows = qw_ptr + offs_n[:, None] * stride_qn
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    if SPLIT_K == 1:  # (bounds the compiler knows: the loop as it was before K could be split)
        kw_begin = 0
        kw_end = KW
    else:
        kw_begin = pid_k * KW_PER_SPLIT
        kw_end = kw_begin + KW_PER_SPLIT
    if PREFETCH:
        kw_first = kw_begin + offs_w
        if EVEN:
            ahead = tl.load(w_rows + kw_first[None, :])
        else:
            ahead = tl.load(w_rows + kw_first[None, :], mask=n_mask[:, None] & (kw_first < KW)[None, :], other=0)
        x_ahead = _gemv_x(x_ptr, m_ptr, p_ptr, kw_first, KW, EVEN, HAS_SCALE, HAS_PERM, HALF2, PAIR_LOADS, ASM,
                          DIRECT_X, LOAD_ASM)
    for kw0 in range(kw_begin, kw_end, BLOCK_KW):
        kw = kw0 + offs_w
        if PREFETCH:
            words = ahead
            xw = x_ahead
            if EVEN:  # (the last trip: its own step again, never past the program's words)
                kw_ahead = tl.minimum(kw0 + BLOCK_KW, kw_end - BLOCK_KW) + offs_w
                ahead = tl.load(w_rows + kw_ahead[None, :])
            else:
                kw_ahead = kw + BLOCK_KW
                ahead = tl.load(w_rows + kw_ahead[None, :], mask=n_mask[:, None] & (kw_ahead < KW)[None, :], other=0)
            x_ahead = _gemv_x(x_ptr, m_ptr, p_ptr, kw_ahead, KW, EVEN, HAS_SCALE, HAS_PERM, HALF2, PAIR_LOADS, ASM,
                              DIRECT_X, LOAD_ASM)
        else:
            if EVEN:
                words = tl.load(w_rows + kw[None, :])
            else:
                words = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw[None, :] < KW), other=0)
            xw = _gemv_x(x_ptr, m_ptr, p_ptr, kw, KW, EVEN, HAS_SCALE, HAS_PERM, HALF2, PAIR_LOADS, ASM, DIRECT_X,
                         LOAD_ASM)
        if not HALF2:
            if DIRECT_X:
                x01, x23, x45, x67 = xw
                x0, x1, x2, x3, x4, x5, x6, x7 = _pair_columns(x01, x23, x45, x67, x_ptr.dtype.element_ty)
            else:
                x0, x1, x2, x3, x4, x5, x6, x7 = _x_columns(xw)
        if DIRECT_SZ and BLOCK_KW > GROUP_W:
            # each thread's row and group: (kw0 + w) // GROUP_W, kw0 a multiple of BLOCK_KW (both powers of two)
            sz = offs_n[:, None] * stride_sn + (kw0 // GROUP_W + offs_w // GROUP_W)[None, :]
            s = _ld_2byte(s_ptr + sz, LOAD_ASM).to(tl.float32)
            z = _ld_2byte(z_ptr + sz, LOAD_ASM).to(tl.float32)
        elif BLOCK_KW <= GROUP_W:
            sz = offs_n * stride_sn + kw0 // GROUP_W
            s = tl.load(s_ptr + sz, mask=n_mask, other=0).to(tl.float32)[:, None]
            z = tl.load(z_ptr + sz, mask=n_mask, other=0).to(tl.float32)[:, None]
        else:
            # one scale and zero per (row, group), loaded as [BLOCK_N, groups] and broadcast to the
            # group's words in registers
            NG: tl.constexpr = BLOCK_KW // GROUP_W
            offs_g = kw0 // GROUP_W + tl.arange(0, NG)
            sz = offs_n[:, None] * stride_sn + offs_g[None, :]
            if EVEN:
                s = tl.load(s_ptr + sz).to(tl.float32)
                z = tl.load(z_ptr + sz).to(tl.float32)
            else:
                mask = n_mask[:, None] & (offs_g[None, :] * GROUP_W < KW)
                s = tl.load(s_ptr + sz, mask=mask, other=0).to(tl.float32)
                z = tl.load(z_ptr + sz, mask=mask, other=0).to(tl.float32)
            s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, NG, GROUP_W)), (BLOCK_N, BLOCK_KW))
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, NG, GROUP_W)), (BLOCK_N, BLOCK_KW))
        if HALF2:
            xa, xb, xc, xd = xw
            acc += _h2_word_dot(words, z, xa, xb, xc, xd, m0, m1, m2, m3, ASM) * (s * 64.0)
        else:
            acc += _nibbles_dot(words, z, x0, x1, x2, x3, x4, x5, x6, x7, m0, m1, m2, m3) * s
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
        tl.store(out_ptr + offs_n, _round_to(y, x_ptr.dtype.element_ty), mask=n_mask)
    else:  # as the decode kernel's [BLOCK_N, M] tile, with M = 1
        part_ptrs = part_ptr + offs_n[:, None]
        tl.store(part_ptrs + pid_k * N, y[:, None], mask=n_mask[:, None])
        if FIXUP:
            _splitk_fixup(part_ptrs, out_ptr + offs_n[:, None], n_mask[:, None], count_ptr + pid_n * (BLOCK_N // 16),
                          b_ptr + offs_n, n_mask, N, HAS_BIAS, SPLIT_K, x_ptr.dtype.element_ty)


def _prefill_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfgs = []
    for bm, bn, w, s in [(128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4),
                         (256, 128, 8, 3), (256, 64, 4, 3)]:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        # 128x256 and the 256-token tiles need Hopper's wgmma (accumulators in fewer registers) or sm_100's
        # tcgen05: they spill on sm_80 and on consumer Blackwell, sm_120 (aot.py). The 256-token tiles are
        # PREFILL_W_LHS's (BLOCK_M is its wgmma's n, up to 256); as x @ W.T with a fused input scale 256 x 64
        # spilled 136 bytes on sm_90a
        if 256 in (bm, bn):
            cfg = tag_config(cfg, min_capability=90, datacenter_mma=True, w_lhs=bm == 256)
        cfgs.append(cfg)
    # fp32 layers multiply in exact fp32 (FMA, no tensor cores): the tiles above spill kilobytes
    # per thread there (aot.py), so they get small ones of their own
    for bm, bn, w, s in FP32_PREFILL_TILES:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        cfgs.append(tag_config(cfg, dot_fp32=True))
    return cfgs


FP32_PREFILL_TILES = [(32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2)]  # spill-free on sm_80 / sm_90a (aot.py)


def _prefill_prune(configs, kwargs):
    """The fp32-dot configs for DOT_FP32 launches, the tensor-core ones otherwise (the 256-token tiles only
    for W_LHS launches); then by GPU."""
    if len(configs) <= 1:  # the interpreter's single config
        return configs
    fp32 = bool(kwargs.get("DOT_FP32", False))
    lhs = bool(kwargs.get("W_LHS", False))
    return min_capability([c for c in configs if config_tag(c, "dot_fp32", False) == fp32
                           and (lhs or not config_tag(c, "w_lhs", False))])


@triton.jit
def _prefill_x_tile(x_ptr, in_scale_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SCALE: tl.constexpr):
    """x's tile [BLOCK_M, BLOCK_K] (zeros past M and K), times the input scale with HAS_SCALE."""
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
    if HAS_SCALE:  # x * m as torch rounds it, in registers between the load and the dot
        x = _times_input_scale(x, tl.load(in_scale_ptr + offs_k, mask=offs_k < K, other=0)[None, :])
    return x


@fast_launch
@autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K", "G", "HAS_SCALE", "W_LHS"], prune=_prefill_prune)
@triton.jit
def _w4a16_prefill_kernel(
    x_ptr, in_scale_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, KW, G: tl.constexpr, NUM_GROUPS, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_om, m0, m1, m2, m3,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_FP32: tl.constexpr, W_ROWS: tl.constexpr,
    W_LHS: tl.constexpr, ASM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """M > 16. W_ROWS: dequantize the weight tile as W's rows with _dequant_rows and hand its
    transpose to the dot - on sm_90a 4.9-7.5 SASS instructions per weight with the inline PTX (ASM:
    two weights per LOP3 / HADD2 / HMUL2, PRMT back to k order), 6.0-8.1 with one LOP3, FADD and
    FMUL per weight, ~9-11.5 for the [K, N] tile; the dequantization must stay under the tile's
    tensor-core time. Else the [K, N] tile is dequantized directly (_load_dequant_tile): 32-wide K
    tiles, and sm_80 under a Triton whose transpose costs more than it saves (_prefill_w_rows).
    HAS_SCALE: y = (x * m) @ W.T, m (in_scale_ptr [K]) multiplied into each x tile after its load,
    rounded as torch's `x * m` (FUSE_INPUT_SCALE_PREFILL). W_LHS (row tiles): the tile computed
    transposed, y.T = W @ x.T, the dequantized rows the dot's first operand (PREFILL_W_LHS)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_dtype = x_ptr.dtype.element_ty
    if W_LHS:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _prefill_x_tile(x_ptr, in_scale_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, HAS_SCALE)
            w = _load_dequant_rows(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS, stride_qn, stride_sn,
                                   m0, m1, m2, m3, w_dtype, BLOCK_K, ASM)
            if DOT_FP32:
                acc_t += tl.dot(w.to(tl.float32), tl.trans(x).to(tl.float32), input_precision="ieee")
            else:
                acc_t += tl.dot(w, tl.trans(x))
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _prefill_x_tile(x_ptr, in_scale_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, HAS_SCALE)
            if W_ROWS:
                w = tl.trans(_load_dequant_rows(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS, stride_qn,
                                                stride_sn, m0, m1, m2, m3, w_dtype, BLOCK_K, ASM))
            else:
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


@fast_launch
@triton.jit
def _w4a16_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, G, NUM_GROUPS, stride_qn, stride_sn, stride_on,
                          m0, m1, m2, m3, ASM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W = dequant(qweight) [N, K] in out's dtype, the reference's weight bit for bit: program (pid_n, pid_k)
    writes rows [pid_n * BLOCK_N, +BLOCK_N) x columns [pid_k * BLOCK_K, +BLOCK_K) (inside one group), the
    prefill kernel's row tile (_load_dequant_rows, the inline PTX on a GPU), 8 consecutive columns a word:
    16-byte stores of fp16 / bf16."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _load_dequant_rows(qw_ptr, s_ptr, z_ptr, k0, offs_n, N, KW, G, NUM_GROUPS, stride_qn, stride_sn,
                           m0, m1, m2, m3, out_ptr.dtype.element_ty, BLOCK_K, ASM)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w,
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


DEQUANT_TILE = 4096  # weights a program writes: 32 a thread of its 4 warps (32 rows of a 128-wide K tile)
# M > 16 as dequantize_triton + torch's matmul (cuBLAS) instead of the fused prefill kernel. The weight is
# written once as fp16 (2 bytes a weight: ~10 us for 4096 x 4096 at HBM speed) and read back by the
# GEMM, which then runs at fp16's own speed: at M = 4096 that cost is a few percent of the GEMM, where
# the fused kernel ran at 0.49x of fp16 on the H200 (run 2); at small M the fused kernel reads 4x fewer
# weight bytes. Off here; backend="auto" takes it where dispatch.py's measured table has it faster
# (the bench's `w4a16-triton-dq` rows), per shape and M, and the dequantized weight is a temporary of
# N x K x 2 bytes (the caching allocator's) for the call's length.
PREFILL_DEQUANT = False
_INT32_ELEMENTS = 2**31 - 1  # the output elements one dequantization launch may address


def dequantize_triton(qweight, scales, zeros, group_size, out_dtype=None, out=None):
    """The [N, K] weight (q - z) * s, exact in fp32, rounded once to out_dtype (default scales' dtype):
    reference.dequantize_ref's bits, in one pass (0.5 byte read and 2 bytes written per fp16 weight).
    group_size is positive (G == K per channel). out: an [N, K] tensor to write into (unit stride along K;
    its dtype is the one rounded to), else a new one."""
    n, kw = qweight.shape
    k = kw * 8
    if out is None:
        out = torch.empty((n, k), dtype=out_dtype or scales.dtype, device=qweight.device)
    block_k = _block_k(k, group_size, 128)  # (inside one group: G = 32 / 64 take more rows instead)
    block_n = DEQUANT_TILE // block_k
    # (the PTX takes the scale in the output's dtype: only where that is the scales' own)
    asm = _use_ptx(out.dtype == torch.float32) and out.dtype == scales.dtype
    rows = max(block_n, _INT32_ELEMENTS // max(out.stride(0), 1) // block_n * block_n)  # int32 offsets a launch
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        _w4a16_dequant_kernel[(cdiv(r1 - r0, block_n), cdiv(k, block_k))](
            qweight[r0:r1], scales[r0:r1], zeros[r0:r1], out[r0:r1], r1 - r0, k, kw, group_size, k // group_size,
            qweight.stride(0), scales.stride(0), out.stride(0), *NIBBLE_MASKS, ASM=asm, BLOCK_K=block_k,
            BLOCK_N=block_n, num_warps=4)
    return out


def _block_k(k: int, group_size: int, cap: int) -> int:
    """A K tile that never straddles two groups: it divides G, or G == K (one group)."""
    if group_size == k and group_size not in (32, 64, 128):
        return min(cap, max(16, next_pow2(k)))
    return min(group_size, cap)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # fp32 layers: exact fp32 products (no tf32). bf16 under the interpreter: its bf16 dot is wrong,
    # so the interpreter computes bf16 tiles in fp32 (GPUs use bf16 tensor cores).
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


# The variants of these kernels that dispatch.py's measured table can pick for a layer shape and M (backend="auto"):
# each is one of this module's settings changed, for one call (w4a16_gemm_triton's `variant`: no module state,
# safe under threads and CUDA graphs). The measurement switches at the end of this file set the same for a
# block; the bench's `w4a16-<variant>` rows time them that way, beside `w4a16-triton` (the settings as they are).
VARIANTS = {
    "triton-tc": ("GEMV_MAX_M", 0),              # M = 1 on the tensor-core decode kernel, not the GEMV
    "triton-prefetch": ("GEMV_PREFETCH", True),  # M = 1: the GEMV loads its next step of W ahead
    "triton-unsplit": ("GEMV_SPLIT", 1),         # M = 1: the GEMV never splits K across programs
    "triton-h2": ("GEMV_HALF2", True),           # M = 1, fp16: the GEMV's products in fp16 pairs
    "triton-direct": ("GEMV_DIRECT_LOADS", True),  # M = 1: the GEMV's x, scales, zeros loaded where used (no smem)
    "triton-trip32": ("DECODE_TRIP_WORDS", 32),  # 2 <= M <= 16: two groups of 128 a decode-kernel loop trip
    "triton-staged": ("DECODE_FRAGMENT", False),  # 2 <= M <= 16: the dequantized tile in natural order (via smem)
    "triton-dq": ("PREFILL_DEQUANT", True),      # M > 16: the weight dequantized whole, then torch's matmul
    "triton-rhs": ("PREFILL_W_LHS", False),      # M > 16: the prefill row tile as the dot's second operand
}
_NO_VARIANT = {}  # (read only: the launchers' default)
_VARIANT_SETTINGS = {None: _NO_VARIANT, **{v: {name: value} for v, (name, value) in VARIANTS.items()}}


def _decode_blocks(n: int, k: int, group_size: int, device: torch.device):
    """(BLOCK_N, BLOCK_KW, STEPS, SPLIT_K) for the 2 <= M <= 16 kernel. A dot step is BLOCK_KW words
    inside one group; a loop trip is STEPS of them (DECODE_TRIP_WORDS words: 128 weights of K on a GPU).
    BLOCK_N = 64 rows is one Hopper wgmma (m64) and reads x once per 64 rows; K is split across programs
    until about DECODE_PROGRAMS_PER_SM programs per SM run, each keeping >= 2 trips."""
    return _decode_plan(n, k, group_size, num_sms(device), DECODE_PROGRAMS_PER_SM, DECODE_TRIP_WORDS,
                        INTERPRET and DECODE_INTERPRETER_TILES)[:4]


# The 2..16-row decode kernel's launch plan (_decode_plan), as settings so that benchmarks/decode_sweep.py can
# time other values on a GPU without editing the code: K is split until the grid has about this many programs
# an SM (each of 4 warps; ~96 registers a thread and 28 - 45 KB of shared memory, so up to 5 fit an SM)...
DECODE_PROGRAMS_PER_SM = 2
# ... and one loop trip covers this many packed words of K (16: 128 weights, one group of 128; 32 makes two
# dots a trip - more bytes a pipeline stage, fewer trips and barriers per byte; variant "triton-trip32", which
# backend="auto" takes per shape where a bench measured it faster)
DECODE_TRIP_WORDS = 16
# ... and the dequantized tile made in the tensor cores' register order (_dequant_fragment: rows and columns
# relabelled so that each thread already holds its mma.sync / wgmma A fragment) instead of the natural order,
# which Triton moves into that layout through shared memory each dot step (8 STS.128, a barrier and 8 LDSM.x4 a
# thread and trip; 16 KB of shared memory a program). Needs the GPU plan's tile (64 rows, 16-word steps: G = 128
# and per channel; G = 32 / 64 take the natural order). None: by GPU - sm_90+, and sm_80 - 89 from triton 3.9
# (FRAGMENT_ON_SM80): G = 128, 4096 x 4096, M = 16, SASS instructions per weight and shared memory a program,
# natural -> fragment order: sm_90a triton 3.9 3.06 -> 2.94 and 28 -> 12 KB (s2), triton 3.6 2.91 -> 2.78;
# sm_80 triton 3.9 4.30 -> 3.08 and 128 -> 88 registers, triton 3.6 4.48 -> 5.56 (x's rows gathered 2 bytes at
# a time with shuffles there; kernel_inspection.md). False: the natural order, variant "triton-staged", which
# backend="auto" takes per shape where a bench measured it faster. The interpreter takes it where its tiles allow
# (DECODE_INTERPRETER_TILES = False, as tests set it).
DECODE_FRAGMENT = None
FRAGMENT_ON_SM80 = _common.triton_at_least(3, 9)
# The interpreter's decode tiles: 16 rows and 4-word steps, so that the tests' small shapes cross every boundary;
# False (tests): the GPU plan's 64 rows and 16-word steps, the tile the fragment order needs.
DECODE_INTERPRETER_TILES = True


# Launch plans are pure functions of the layer's shape and the GPU's SM count: cached, so that a
# decode step's host work per layer is a dictionary lookup, not a dozen integer computations.
@functools.lru_cache(maxsize=4096)
def _decode_plan(n: int, k: int, group_size: int, sms: int, programs_per_sm: int, trip_words: int, small: bool):
    """(BLOCK_N, BLOCK_KW, STEPS, SPLIT_K, KW_PER_SPLIT, EVEN, PER_CHANNEL, GROUP_W) of _decode
    (programs_per_sm, trip_words: DECODE_PROGRAMS_PER_SM, DECODE_TRIP_WORDS; small: the interpreter's tiles)."""
    kw = k // 8
    per_channel = group_size >= k
    group_w = kw if per_channel else group_size // 8
    if small:  # small tiles so the tests' shapes cross every boundary (a trip of 2 steps, 4 with 32 words)
        block_n, block_kw, steps = 16, min(4, group_w) if not per_channel else 4, max(1, trip_words // 8)
    else:
        block_n = 64
        block_kw = 16 if per_channel else min(16, group_w)
        steps = max(1, trip_words // block_kw)
    trip = block_kw * steps
    n_tiles = cdiv(n, block_n)
    trips = cdiv(kw, trip)
    split = 1
    while n_tiles * split < programs_per_sm * sms and trips // (split * 2) >= 2:
        split *= 2
    kw_per_split = cdiv(cdiv(kw, split), trip) * trip
    split = cdiv(kw, kw_per_split)  # no program left without work
    even = n % block_n == 0 and kw % trip == 0 and kw_per_split * split == kw
    return block_n, block_kw, steps, split, kw_per_split, even, per_channel, 0 if per_channel else group_size // 8


# None: pick by K tile (row-oriented dequantization for 64-wide tiles); tests set True / False to run both paths
PREFILL_W_ROWS = None
# The prefill kernel's row tile computed transposed, y.T = W @ x.T: the dequantized weight rows are the dot's
# first operand, which Hopper's wgmma reads from registers, and x.T the second, which it reads from the
# shared memory x's pipelined copies (cp.async) land in. As the second operand (False: y = x @ W.T, the
# rows transposed) the weight tile is built in registers each K step and must be written to shared memory
# for the wgmma to read, so Triton waits for each step's wgmma to finish before the next step's dequantization
# (wgmma.wait_group 0): dequantization and tensor cores take turns. As the first operand Triton keeps a wgmma
# in flight while it dequantizes the next tile (wait_group 1; 3 with triton 3.6). Compiled for sm_90a,
# fp16 G = 128 N = K = 4096, loop SASS instructions per weight (kernels/aot.py; a 128-token tile's budget
# under the tensor cores is BLOCK_M / 16 = 8): triton 3.9 128x128 6.38 -> 7.03, 128x256 4.92 -> 5.78, and
# the 256-token tiles this layout allows (wgmma n = 256: BLOCK_M is the dot's N here) 7.6 - 9.2 of 16;
# triton 3.6 alike (6.19 -> 6.91, 4.95 -> 5.55). On sm_80 (mma.sync: both operands in registers, no
# overlap either way) it takes 0 - 0.35 fewer instructions and 3 - 56 fewer registers. Public Triton
# numbers say the same of upcast operands on Hopper (triton-lang/triton#11624: an upcast fp8 / fp4 operand
# on the left ran 1.3 - 3.5x faster than on the right, 2048 x 2048 x 1024). Not yet timed on a GPU: the bench's
# `w4a16-triton-rhs` rows time the other layout, False here (variant "triton-rhs", which backend="auto" takes per
# shape where they measure it faster). Not with the opt-in fused input scale
# (FUSE_INPUT_SCALE_PREFILL on a GPU): x * m, made in registers, would have to be written to shared memory for
# the wgmma's B, which serialises it again (0 in flight) and spills the 256 x 64 tile; that takes x @ W.T.
# Nor where K is no multiple of the K tile (a per-channel layer of ragged K, masked): there the transposed
# tiles kept no wgmma in flight and spilled more (1000 x 1032: 5 of 7 configs on sm_90a, 2 of 4 on sm_80,
# against 2 and 2 as x @ W.T).
PREFILL_W_LHS = True
# None: the decode kernel loads an input scale as x.T's tile on sm_90+ and as a vector on older GPUs
# and in the interpreter (_load_input_scale); tests set True / False to run both
SCALE_AS_TILE = None


def _decode_fragment(device: torch.device, block_n: int, block_kw: int, dot_fp32: bool, setting) -> bool:
    """Whether the decode kernel dequantizes in the tensor cores' fragment order (DECODE_FRAGMENT, or the call's
    variant's value of it): the 64-row tile of 16-word steps only, and on a GPU tensor-core dots only."""
    if block_n != 64 or block_kw != 16:
        return False
    if setting is not None:
        return bool(setting) and (INTERPRET or not dot_fp32)
    if INTERPRET:
        return True
    return not dot_fp32 and (FRAGMENT_ON_SM80 or _common.target_capability(device) >= 90)


def _decode_scale_tile(device: torch.device) -> bool:
    if SCALE_AS_TILE is not None:
        return SCALE_AS_TILE
    return not INTERPRET and _common.target_capability(device) >= 90


def _fuse_prefill_scale(x: torch.Tensor) -> bool:
    """Whether the prefill kernel multiplies the input scale into its x tiles (FUSE_INPUT_SCALE_PREFILL)."""
    if x.dtype == torch.float32:
        return False
    if FUSE_INPUT_SCALE_PREFILL is not None:
        return FUSE_INPUT_SCALE_PREFILL
    return INTERPRET  # compiled: the separate pass, measured faster on sm_90 (above) and sm_80's choice already


# sm_80 takes the row tile only from the Triton where it was measured cheaper (kernels/aot.py,
# N = K = 4096): triton 3.9 5.9 - 8.9 SASS instructions per weight against 9.6 - 13 for the [K, N]
# tile, within mma.sync's BLOCK_M / 8; triton 3.6 10.6 - 18.2 against 9.6 - 13 (its transpose for
# mma.sync costs more than the dequantization saves). Versions between were not measured.
ROW_TILE_ON_SM80 = _common.triton_at_least(3, 9)


def _prefill_w_rows(device: torch.device, block_k: int) -> bool:
    """Row-oriented dequantization (the paired PTX, then a transpose for the dot) for K tiles of 64:
    on sm_90a 4.9 - 7.4 SASS instructions per weight against 9 - 11.5 for the [K, N] tile; on sm_80
    where ROW_TILE_ON_SM80. With 32-wide tiles (group size 32) the transposed row tile does not
    compile for wgmma: Triton 3.6 fails its pass pipeline for the 128x256 and 64x128 configs, and
    Triton 3.9 aborts the process in LLVM ("Illegal shared layout"); those take the [K, N] tile
    (kernels/aot.py and tests/test_aot.py check both)."""
    if PREFILL_W_ROWS is not None:
        return PREFILL_W_ROWS
    return not INTERPRET and block_k >= 64 and (ROW_TILE_ON_SM80 or _common.target_capability(device) >= 90)


def _gemv_blocks(n: int, kw: int, device: torch.device, over=_NO_VARIANT):
    """(BLOCK_N, BLOCK_KW, num_warps, SPLIT_K, KW_PER_SPLIT) for the M = 1 kernel: each thread streams
    4 x 16-byte chunks (16 words) per step, so that enough loads are in flight; the row tile is the
    widest that still gives about two programs per SM, and K is split when the rows alone give too
    few threads to keep the memory system busy (_gemv_plan). over: a variant's settings (VARIANTS)."""
    return _gemv_plan(n, kw, num_sms(device), over.get("GEMV_SPLIT", GEMV_SPLIT), GEMV_THREADS_PER_SM)


# The threads per SM the M = 1 GEMV aims to have streaming W: its loop holds ~128 registers a thread
# (kernels/aot.py), so 512 threads (16 warps) fill an SM's 64K registers. Each thread keeps 64 bytes
# of W in flight per step: 32 KB an SM, about what an H100 / H200 needs in flight to run at its
# bandwidth (~3.35 - 4.8 TB/s x ~0.7 us of loaded latency / 132 SMs = 18 - 26 KB). The rows of W
# alone give 8 threads per row (N = 4096: 248 an SM, 16 KB; N = 1024, a GQA k / v projection: 62),
# so K is split across programs (SPLIT_K, each program at least one step of K) until the grid
# reaches this, in row tiles of 16 (a workspace counter each: ops.WORKSPACE_ROWS_PER_COUNTER).
GEMV_THREADS_PER_SM = 512
# None: split K by _gemv_plan; 1: never (the GEMV as it was before the split; for A/B timing and tests).
GEMV_SPLIT = None
# The M = 1 GEMV loads its next step of W (and of x) before it computes the current one (PREFETCH). On the H200
# the Triton GEMV, like every other int4 kernel here, streamed at 2.1 - 2.3 TB/s past its per-call floor
# where fp16's cuBLAS streams at 4.25 (bench/targets.py's fit of the committed run): a program that
# waits for each step's loads before it multiplies, and multiplies before it loads again, keeps W in
# flight for only part of each trip (its num_stages does nothing here: triton 3.9 compiles the same
# loop for 1 - 4, as it pipelines only loads that feed a dot). x's next step (one 16-byte load a thread,
# an L2 hit whose latency the plain loop waits out before its shuffle through shared memory) comes
# along. Compiled (kernels/aot.py, triton 3.9, fp16 G = 128): on sm_90a the next step's five 16-byte
# loads issue at the top of the loop for the same 127 - 128 registers, 4.16 - 4.17 -> 4.31 - 4.34 SASS
# instructions per weight (per channel, K = 4304: 4.57 -> 5.07); on sm_80 125 - 128 -> 163 - 165
# registers (3 programs of 4 warps an SM instead of 4), 4.43 - 4.45 -> 4.60 - 4.62. Off until a GPU
# run's `w4a16-triton-prefetch` rows say it is faster (variant "triton-prefetch": backend="auto" takes it per shape
# where they do).
GEMV_PREFETCH = False
# The M = 1 GEMV of fp16 layers makes each word's eight products two at a time in fp16 (HALF2, _h2_word_dot):
# the exact q - z pairs of the decode kernel's PTX (a LOP3 and a packed HADD2 / HFMA2 a pair), times x's pairs
# by one HMUL2 and three HFMA2 - a chain of four terms in each half -, the halves converted and added in fp32,
# the scale applied per word in fp32 as before. The fp32 path spends an AND, an FADD and an FFMA on each weight
# (4.2 - 4.4 SASS instructions per weight on sm_90a with the loop's overhead), more than an H200 issues at 85%
# of its copy bandwidth (~3.6 - 3.9 with memory stalls; ~4.7 at a perfect issue rate): whatever the loads in
# flight, that path cannot reach #3's target there. The price is precision: each half's four products and
# sums are rounded to fp16 (unit 2**-11) - as large, per term, as the rounding of the weight to fp16 that
# the reference itself makes -, bounded by reference.gemv_half2_tolerance, which the tests and the bench's
# check hold it to; x is scaled by 2**-6 first (exact in fp16's normal range), so that no sum of four
# products overflows for any finite fp16 x (without it |x| > 1092 could make inf), and the scale by 2**6.
# Off until a GPU run's `w4a16-triton-h2` rows say it is faster (variant "triton-h2": backend="auto" takes it
# per shape where they do); bf16 / fp32 layers keep the fp32 path (bf16's 8-bit significand is too coarse
# for the chains).
GEMV_HALF2 = False
# The M = 1 GEMV's x and (where a step spans several groups) scales and zero points loaded by each thread for the
# words of W it holds (LD_V4_B32_PTX, LD_B16_PTX), instead of once a program and then moved to those threads through
# shared memory: its loop keeps no barrier and no shared memory (sm_90a, G = 128: 20 BAR.SYNC, 8 STSM, 16 LDS a step
# before; 12, 4, 12 in the packed GEMV), so no warp of a program waits for the others' loads of x before it
# multiplies, at the price of x's words loaded - and, in the packed GEMV, paired - in each of the 4 warps that hold
# their columns (L1 hits; kernels/aot.py: SASS instructions per weight -0.1 to +0.2). Where its loads cannot be
# made so (a ragged K or rows: masks; an input scale or channel order, x in fp32 or not 16-byte aligned: x's part)
# the GEMV loads as before. Off until a GPU run's `w4a16-triton-direct` rows say it is faster (variant
# "triton-direct": backend="auto" takes it per shape where they do; decode_sweep.py times it with GEMV_HALF2 and
# GEMV_PREFETCH too).
GEMV_DIRECT_LOADS = False
# ... with this register ceiling (ptxas's maxnreg: 16 warps an SM, the fp32 GEMV's own occupancy). With
# no barrier left to hold them (ptxas moves no load past a bar.sync), ptxas sinks loads towards their use when it
# picks its own register count (sm_90a, packed GEMV: 80 registers, two of a thread's four 16-byte loads of W issued
# half-way through the step or later; sm_80 fp32 path: 96 registers, three of four) - each then waits out the
# memory's latency mid-step; under the ceiling every load of W issues in the first 5 - 22% of the step
# (kernels/aot.py; tests/test_aot.py holds it to the first quarter).
GEMV_DIRECT_MAXNREG = 128


@functools.lru_cache(maxsize=4096)
def _gemv_plan(n: int, kw: int, sms: int, force_split, threads_per_sm: int):
    if INTERPRET:  # small tiles so that the tests' shapes cross every boundary, split K included
        block_n, block_kw, warps = 4, 8, 1
    else:
        # a step that divides K / 8 needs no masks (EVEN); else the smallest power of two covering it
        block_kw = next((b for b in (128, 64, 32) if kw % b == 0), min(128, max(4, next_pow2(kw))))
        for warps in (4, 2, 1):
            block_n = 16 * 32 * warps // block_kw
            if warps == 1 or cdiv(n, block_n) >= 2 * sms:
                break
    target = threads_per_sm * sms
    trips = cdiv(kw, block_kw)
    split = 1
    # (not where K / 8 is no multiple of the step: masking K in a 16-row, 4-warp tile cost 5.2 - 6.0 SASS
    # instructions per weight against 4.6 - 5.2 for the narrow unsplit tile; K = 4304, SigLIP's MLP)
    if force_split != 1 and cdiv(n, block_n) * 32 * warps < target and kw % block_kw == 0 \
            and (INTERPRET or block_kw >= 32):
        tile_warps = max(1, block_kw // 32)  # 16 rows x BLOCK_KW words, 16 words a thread
        tile_threads = cdiv(n, 16) * 32 * tile_warps
        while tile_threads * split * 2 <= target and trips // (split * 2) >= 1:
            split *= 2
        # the divisor of the steps nearest that (the larger on a tie): every program gets as many
        # steps, so no step is masked where K / 8 is a multiple of BLOCK_KW (EVEN)
        split = min((d for d in range(1, trips + 1) if trips % d == 0), key=lambda d: (abs(d - split), -d))
        if split > 1:
            block_n, warps = 16, tile_warps
    kw_per_split = cdiv(cdiv(kw, split), block_kw) * block_kw
    split = cdiv(kw, kw_per_split)  # no program left without work
    return block_n, block_kw, warps, split, kw_per_split


def _gemv(x, qweight, scales, zeros, bias, group_size, workspace=None, input_scale=None, input_perm=None,
          over=_NO_VARIANT):
    n, kw = qweight.shape
    block_n, block_kw, warps, split, kw_per_split = _gemv_blocks(n, kw, x.device, over)
    # words per group as a power of two (per-channel: any power of two >= K/8 puts every word in group 0)
    group_w = group_size // 8 if group_size < x.shape[1] else next_pow2(kw)
    even = n % block_n == 0 and kw % block_kw == 0 and kw_per_split * split == kw
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    half2 = x.dtype == torch.float16 and over.get("GEMV_HALF2", GEMV_HALF2)  # (other dtypes: the fp32 path)
    direct = even and over.get("GEMV_DIRECT_LOADS", GEMV_DIRECT_LOADS)  # (their loads are not masked)
    part, fixup = _split_k_partials(out, split, workspace, cdiv(n, 16), "gemv")
    b = bias if bias is not None else scales  # any valid pointer; never read
    _w4a16_gemv_kernel[(cdiv(n, block_n), split)](
        x, x if input_scale is None else input_scale, x if input_perm is None else input_perm, qweight, scales,
        zeros, b, out, part, workspace if fixup else qweight,
        n, kw, kw_per_split, qweight.stride(0), scales.stride(0), *GEMV_MASKS,
        HAS_BIAS=bias is not None, HAS_SCALE=input_scale is not None, HAS_PERM=input_perm is not None, EVEN=even,
        GROUP_W=group_w, SPLIT_K=split, FIXUP=fixup, BLOCK_N=block_n, BLOCK_KW=block_kw,
        PREFETCH=over.get("GEMV_PREFETCH", GEMV_PREFETCH), HALF2=half2,
        PAIR_LOADS=half2 and input_scale is None and input_perm is None and x.data_ptr() % 4 == 0,
        ASM=half2 and PTX_DEQUANT and not INTERPRET, DIRECT_X=direct and _direct_x(x, input_scale, input_perm),
        DIRECT_SZ=direct and scales.element_size() == 2, LOAD_ASM=not INTERPRET,
        num_warps=warps, num_stages=1, maxnreg=GEMV_DIRECT_MAXNREG if direct else None,
    )
    if split > 1 and not fixup:
        _reduce_split_k(part, b, out, split, bias is not None)
    return out


def _direct_x(x, input_scale, input_perm) -> bool:
    """Whether the GEMV can load x as words of 2-byte pairs in the layout of their use (GEMV_DIRECT_LOADS): one 16-byte
    load a word of W needs x 16-byte aligned, in fp16 / bf16, read as it is (no input scale or channel order)."""
    return x.element_size() == 2 and x.data_ptr() % 16 == 0 and input_scale is None and input_perm is None


def _split_k_partials(out, split, workspace, counters: int, kernel: str):
    """(part, fixup) for a launch that splits K `split` ways: the fp32 partial sums [split, *out.shape]
    (out itself when it does not split), and whether the kernel finishes the split itself (FIXUP: given
    the layer's workspace, which must hold `counters`); else _reduce_split_k adds them after it."""
    if split == 1:
        return out, False
    if workspace is not None and workspace.numel() < counters:
        raise ValueError(f"w4a16 {kernel}: workspace of {workspace.numel()} counters for {counters} row tiles")
    return torch.empty((split, *out.shape), dtype=torch.float32, device=out.device), workspace is not None


def _reduce_split_k(part, b, out, split: int, has_bias: bool):
    """The split's partial sums (part [split, M, N]) added in a second launch into out [M, N] (+ b)."""
    block = 1024
    _splitk_reduce_kernel[(cdiv(out.numel(), block),)](
        part, b, out, out.numel(), out.shape[1], HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=block, num_warps=4)


def _decode(x, qweight, scales, zeros, bias, group_size, dot_fp32, workspace=None, input_scale=None,
            input_perm=None, over=_NO_VARIANT):
    m, k = x.shape
    n, kw = qweight.shape
    block_n, block_kw, steps, split, kw_per_split, even, per_channel, group_w = _decode_plan(
        n, k, group_size, num_sms(x.device), DECODE_PROGRAMS_PER_SM, over.get("DECODE_TRIP_WORDS", DECODE_TRIP_WORDS),
        INTERPRET and DECODE_INTERPRETER_TILES)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    part, fixup = _split_k_partials(out, split, workspace, cdiv(n, block_n), "decode")
    b = bias if bias is not None else scales  # any valid pointer; never read
    _w4a16_decode_kernel[(cdiv(n, block_n), split)](
        x, x if input_scale is None else input_scale, x if input_perm is None else input_perm, qweight, scales,
        zeros, b, out, part,
        workspace if fixup else qweight,
        m, n, kw, next_pow2(m),
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        kw_per_split, *NIBBLE_MASKS,
        HAS_BIAS=bias is not None, SPLIT_K=split, FIXUP=fixup, DOT_FP32=dot_fp32, EVEN=even,
        HAS_SCALE=input_scale is not None, SCALE_TILE=input_scale is not None and _decode_scale_tile(x.device),
        HAS_PERM=input_perm is not None,
        GROUP_W=group_w, PER_CHANNEL=per_channel, ASM=_use_ptx(dot_fp32),
        FRAGMENT=_decode_fragment(x.device, block_n, block_kw, dot_fp32, over.get("DECODE_FRAGMENT", DECODE_FRAGMENT)),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_KW=block_kw, STEPS=steps,
    )
    if split > 1 and not fixup:
        _reduce_split_k(part, b, out, split, bias is not None)
    return out


def w4a16_gemm_triton(x, qweight, scales, zeros, bias, group_size, workspace=None, input_scale=None,
                      input_perm=None, variant=None):
    """x [M, K] @ dequant(qweight [N, K/8], scales/zeros [N, K/G]).T + bias -> [M, N] in x.dtype.
    Inputs are validated by ops.w4a16_gemm; group_size here is positive (G == K for per-channel).
    workspace: int32 zeros, one per 16 rows (ops.w4a16_workspace; left at zero), or None: a split-K
    GEMV or decode then reduces in a second launch. variant: None (this module's settings) or a key of
    VARIANTS - one setting changed for this call alone, where dispatch.py's measured table says that is
    faster for the layer's shape and M (e.g. "triton-tc": M = 1 on the decode kernel, not the GEMV;
    "triton-dq": M > 16 as the weight dequantized whole, then torch's matmul). input_scale: [K] in x's dtype or None,
    y = (x * input_scale) @ ...: multiplied into x's loads by the GEMV and the decode kernel
    (FUSE_INPUT_SCALE), into the prefill kernel's x tiles in the interpreter (FUSE_INPUT_SCALE_PREFILL), else in a
    pass of its own first. input_perm: int32 [K] or None, y = (x[:, input_perm] * input_scale) @ ...:
    the decode kernels read x through it (FUSE_INPUT_PERM), prefill gathers first."""
    over = _VARIANT_SETTINGS.get(variant)
    if over is None:
        raise ValueError(f"w4a16_gemm_triton: unknown variant {variant!r}; expected None or one of {tuple(VARIANTS)}")
    if x.shape[0] == 0:  # an empty batch: nothing to launch (as act_quant / w4a8 / the CUDA bindings do)
        return torch.empty((0, qweight.shape[0]), dtype=x.dtype, device=x.device)
    decode = x.shape[0] <= DECODE_MAX_M
    if input_scale is not None or input_perm is not None:  # (a plain layer's call skips the decisions)
        fuse_scale = input_scale is not None and (FUSE_INPUT_SCALE if decode else _fuse_prefill_scale(x))
        # the scale is in W's column order: x * m in a pass of its own needs x gathered first
        if input_perm is not None and not (decode and FUSE_INPUT_PERM and (input_scale is None or fuse_scale)):
            x, input_perm = x.index_select(1, input_perm), None
        if input_scale is not None and not fuse_scale:
            x, input_scale = x * input_scale, None
    if x.shape[0] <= over.get("GEMV_MAX_M", GEMV_MAX_M):
        return _gemv(x, qweight, scales, zeros, bias, group_size, workspace, input_scale, input_perm, over)
    dot_fp32 = _dot_fp32(x.dtype)
    if decode:
        return _decode(x, qweight, scales, zeros, bias, group_size, dot_fp32, workspace, input_scale, input_perm,
                       over)
    if over.get("PREFILL_DEQUANT", PREFILL_DEQUANT):
        if input_scale is not None:  # (x was gathered above; the scale left for the fused tiles: torch's x * m)
            x = x * input_scale
        return torch.nn.functional.linear(x, dequantize_triton(qweight, scales, zeros, group_size), bias)
    m, k = x.shape
    n = qweight.shape[0]
    g = group_size
    num_groups = k // g
    has_bias = bias is not None
    b = bias if has_bias else scales  # any valid pointer; never read
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # fp32 FMA dots (no tensor cores) keep both operand tiles in registers: 32-wide K tiles there
    block_k = _block_k(k, g, 32 if INTERPRET or dot_fp32 else 64)
    w_rows = _prefill_w_rows(x.device, block_k)
    w_lhs = w_rows and over.get("PREFILL_W_LHS", PREFILL_W_LHS) and input_scale is None and k % block_k == 0
    for m0, m1 in row_slices(m, x.stride(0), out.stride(0)):  # one slice unless M x N >= 2**31
        xs, ys, ms = x[m0:m1], out[m0:m1], m1 - m0
        grid = lambda meta, ms=ms: (cdiv(ms, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _w4a16_prefill_kernel[grid](
            xs, xs if input_scale is None else input_scale, qweight, scales, zeros, b, ys, ms, n, k, k // 8, g,
            num_groups, next_pow2(ms), xs.stride(0), qweight.stride(0), scales.stride(0), ys.stride(0), *NIBBLE_MASKS,
            HAS_BIAS=has_bias, HAS_SCALE=input_scale is not None, DOT_FP32=dot_fp32, W_ROWS=w_rows,
            W_LHS=w_lhs, ASM=w_rows and _use_ptx(dot_fp32), BLOCK_K=block_k,
        )
    return out


def _setting(name: str, value):
    """This module's setting `name` at `value` inside the block (a measurement switch; not thread-safe)."""
    return _common.module_setting(globals(), name, value)


def _variant_switch(variant: str):
    return _setting(*VARIANTS[variant])


def tensor_core_decode():
    """Run M = 1 on the tensor-core decode kernel instead of the GEMV, inside the block (variant "triton-tc";
    the benchmark's `w4a16-triton-tc` rows; not thread-safe)."""
    return _variant_switch("triton-tc")


def rhs_prefill():
    """Run the prefill row tile as y = x @ W.T (the weight tile the dot's second operand) instead of
    PREFILL_W_LHS's transposed product, inside the block (variant "triton-rhs"; the benchmark's
    `w4a16-triton-rhs` rows; not thread-safe)."""
    return _variant_switch("triton-rhs")


def dequant_prefill():
    """Run M > 16 as the whole weight dequantized (dequantize_triton) and torch's matmul instead of the fused
    prefill kernel, inside the block (variant "triton-dq"; the benchmark's `w4a16-triton-dq` rows; not
    thread-safe)."""
    return _variant_switch("triton-dq")


def long_decode_trip():
    """Run the 2..16-row decode kernel with two groups of 128 a loop trip (DECODE_TRIP_WORDS = 32) instead of
    one, inside the block (variant "triton-trip32"; the benchmark's `w4a16-triton-trip32` rows; not
    thread-safe)."""
    return _variant_switch("triton-trip32")


def staged_decode():
    """Run the 2..16-row decode kernel with its dequantized tile in the natural order, which the compiler moves into
    the tensor cores' layout through shared memory (DECODE_FRAGMENT = False), inside the block (variant
    "triton-staged"; the benchmark's `w4a16-triton-staged` rows; not thread-safe)."""
    return _variant_switch("triton-staged")


def prefetch_gemv():
    """Run the M = 1 GEMV with its next step of W loaded ahead (GEMV_PREFETCH), inside the block (variant
    "triton-prefetch"; the benchmark's `w4a16-triton-prefetch` rows; not thread-safe)."""
    return _variant_switch("triton-prefetch")


def half2_gemv():
    """Run the M = 1 GEMV of fp16 layers with its products made in fp16 pairs (GEMV_HALF2), inside the block
    (variant "triton-h2"; the benchmark's `w4a16-triton-h2` rows; not thread-safe)."""
    return _variant_switch("triton-h2")


def direct_gemv():
    """Run the M = 1 GEMV with x, the scales and the zero points loaded by each thread for its own words of W, with
    no shared memory between (GEMV_DIRECT_LOADS), inside the block (variant "triton-direct"; the benchmark's
    `w4a16-triton-direct` rows; not thread-safe)."""
    return _variant_switch("triton-direct")


def unsplit_gemv():
    """Run the M = 1 GEMV without splitting K, inside the block (variant "triton-unsplit"; the benchmark's
    `w4a16-triton-unsplit` rows, beside `w4a16-triton`'s split where _gemv_plan splits: they tell
    GEMV_THREADS_PER_SM's worth; not thread-safe)."""
    return _variant_switch("triton-unsplit")
