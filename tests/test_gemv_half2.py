"""The M = 1 GEMV's packed variant (kernels/w4a16.py GEMV_HALF2, variant "triton-h2"): each word's products made
and added two at a time in fp16. Three layers of checks, each against reference.py's specification of its
arithmetic (gemv_half2_words) or its derived bound (gemv_half2_tolerance):
- the inline PTX strings (what a GPU runs; the interpreter cannot) executed instruction by instruction here;
- the Triton-op twin the interpreter runs, word by word, bit for bit;
- the whole GEMV (split-K, masks, bias, input scale / channel order) within the bound, and the bound itself
  derived, not loose: the fp32 GEMV's tighter bound fails the packed results where the fp16 roundings show.
"""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from minicpm_int4 import ops
from minicpm_int4.kernels import w4a16
from minicpm_int4.packing import pack_int4
from minicpm_int4.reference import (GEMV_HALF2_X_SCALE, gemm_tolerance, gemv_half2_tolerance, gemv_half2_words,
                                    w4a16_gemm_ref)

from helpers import dequant, random_input_scale, random_qweight
from test_w4a16 import _run_pairs_ptx

interpreter = pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs triton with TRITON_INTERPRET=1")


def _f16_bits(v) -> int:
    return int(np.array([v], dtype=np.float64).astype(np.float16).view(np.uint16)[0])


def _pair(a, b) -> int:
    return _f16_bits(a) | _f16_bits(b) << 16


def _x_values(g, k):
    """fp16 x with every regime the packed products meet: ordinary, fp16's largest, and values whose
    2**-6 multiple is subnormal (under 2**-8) or zero."""
    x = torch.randn(k, generator=g, dtype=torch.float64)
    pick = torch.rand(k, generator=g, dtype=torch.float64)
    x = torch.where(pick < 0.1, x * 6e4 / 4, x)                 # up to fp16's largest (clamped below)
    x = torch.where((pick >= 0.1) & (pick < 0.25), x * 1e-4, x)  # x * 2**-6 subnormal
    x = torch.where(pick >= 0.97, torch.zeros_like(x), x)
    return x.clamp(-65504, 65504).to(torch.float16)


@triton.jit
def _words_kernel(x_ptr, qw_ptr, z_ptr, out_ptr, m0, m1, m2, m3, KW: tl.constexpr, R: tl.constexpr,
                  PAIRS: tl.constexpr, ASM: tl.constexpr = False):
    """The packed GEMV's per-word sums of R rows x KW words (the kernel's own helpers: the twin, or with ASM - a
    GPU - the inline PTX; tests/test_gpu.py). m0..m3: w4a16.GEMV_MASKS, as the GEMV takes them."""
    rows = tl.arange(0, R)
    kw = tl.arange(0, KW)
    words = tl.load(qw_ptr + rows[:, None] * KW + kw[None, :])
    z = tl.load(z_ptr + rows).to(tl.float32)[:, None]
    if PAIRS:
        x32 = x_ptr.to(tl.pointer_type(tl.int32))
        xa, xb, xc, xd = w4a16._x_pairs_of_words(tl.load(x32 + kw * 4), tl.load(x32 + kw * 4 + 1),
                                                 tl.load(x32 + kw * 4 + 2), tl.load(x32 + kw * 4 + 3), ASM)
    else:
        xv = tl.load(x_ptr + kw[:, None] * 8 + tl.arange(0, 8)[None, :])
        x0, x1, x2, x3, x4, x5, x6, x7 = w4a16._split8(xv)
        xa, xb, xc, xd = w4a16._x_pairs(x0, x1, x2, x3, x4, x5, x6, x7)
    d = w4a16._h2_word_dot(words, z, xa, xb, xc, xd, m0, m1, m2, m3, ASM)
    tl.store(out_ptr + rows[:, None] * KW + kw[None, :], d)


def test_ptx_strings_give_the_specified_word_sums():
    """X_PAIRS_F16_PTX (x's words of fp16 pairs -> the pairs (x_j, x_{j+4}) * 2**-6) then H2_DOT_F16_PTX (one
    word's two fp16 chains, added in fp32), executed here with exact lane arithmetic and one rounding per
    instruction, give reference.gemv_half2_words' value bit for bit: every zero point, words that put every
    nibble value at every position, x from fp16's largest to subnormal multiples."""
    from minicpm_int4.kernels.w4a16 import H2_DOT_F16_PTX, X_PAIRS_F16_PTX

    g = torch.Generator().manual_seed(11)
    checked = 0
    for z in range(16):
        for base in range(0, 16, 3):
            q = [(base + 5 * i + z) % 16 for i in range(8)]
            word = sum(qi << (4 * i) for i, qi in enumerate(q))
            x = _x_values(g, 8)
            xw = {f"${4 + i}": _f16_bits(float(x[2 * i])) | _f16_bits(float(x[2 * i + 1])) << 16 for i in range(4)}
            pairs = _run_pairs_ptx(X_PAIRS_F16_PTX.value, xw, outputs=4)
            regs = {"$1": word, "$2": _pair(-(1024.0 + z), -(1024.0 + z)), "$3": _pair(-(64.0 + z), -(64.0 + z)),
                    **{f"${4 + j}": pairs[j] for j in range(4)}}
            (got,) = _run_pairs_ptx(H2_DOT_F16_PTX.value, regs, outputs=1)
            qweight = pack_int4(torch.tensor([q], dtype=torch.int32))
            want = gemv_half2_words(x[None, :], qweight, torch.full((1, 1), float(z), dtype=torch.float16), 8)
            assert got == int(want.view(torch.int32)[0, 0]) & 0xFFFFFFFF, (z, q, x.tolist())
            checked += 1
    assert checked == 16 * 6
    for sign in (1.0, -1.0):  # a chain's largest sums, 4 * 15 * 65504 * 2**-6, finite
        x = torch.full((8,), sign * 65504.0, dtype=torch.float16)
        xw = {f"${4 + i}": _pair(sign * 65504.0, sign * 65504.0) for i in range(4)}
        pairs = _run_pairs_ptx(X_PAIRS_F16_PTX.value, xw, outputs=4)
        regs = {"$1": 0xFFFFFFFF, "$2": _pair(-1024.0, -1024.0), "$3": _pair(-64.0, -64.0),
                **{f"${4 + j}": pairs[j] for j in range(4)}}
        (got,) = _run_pairs_ptx(H2_DOT_F16_PTX.value, regs, outputs=1)
        want = gemv_half2_words(x[None, :], pack_int4(torch.full((1, 8), 15, dtype=torch.int32)),
                                torch.zeros(1, 1, dtype=torch.float16), 8)
        assert torch.isfinite(want).all() and abs(float(want)) > 1e5
        assert got == int(want.view(torch.int32)[0, 0]) & 0xFFFFFFFF


@interpreter
@pytest.mark.parametrize("paired_loads", [True, False], ids=["x-pairs", "x-values"])
def test_twin_gives_the_specified_word_sums(paired_loads):
    """The interpreter's twin of the PTX (_x_pairs_of_words or _x_pairs, then _h2_word_dot): every word's
    sum bit for bit against reference.gemv_half2_words, on 40 rows of fresh random words, zero points and x
    (x's pairs loaded as words, or made from its values as the input-scale path does)."""
    g = torch.Generator().manual_seed(7 + paired_loads)
    r, kw = 64, 16
    q = torch.randint(0, 16, (r, kw * 8), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (r, 1), generator=g).to(torch.float16)
    x = _x_values(g, kw * 8)[None, :]
    out = torch.empty(r, kw, dtype=torch.float32)
    qweight = pack_int4(q)
    _words_kernel[(1,)](x, qweight, zeros, out, *w4a16.GEMV_MASKS, KW=kw, R=r, PAIRS=paired_loads)
    want = gemv_half2_words(x, qweight, zeros, kw * 8)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))


def _layer_and_x(n, k, group_size, seed, large=False):
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (_x_values(g, k) if large else torch.randn(k, generator=g).to(torch.float16))[None, :]
    if large:  # keep y inside fp16 with x up to 65504
        scales = (scales.float() * 1e-3).to(torch.float16)
    return qweight, scales, zeros, gs, x


def _assert_within(y, x, qweight, scales, zeros, gs, bias=None):
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    assert torch.isfinite(y).all()
    tol = gemv_half2_tolerance(x, qweight, scales, zeros, gs, y_ref)
    err = (y.double() - y_ref.double()).abs()
    assert (err <= tol.double()).all(), f"{int((err > tol).sum())} outputs outside; worst {(err - tol).max():.3g}"
    return y_ref, err


@interpreter
@pytest.mark.parametrize("shape,group_size", [((33, 384), 32), ((70, 1024), 64), ((33, 384), 128), ((70, 1024), 128),
                                              ((40, 200), -1), ((70, 1024), -1)],
                         ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else f"g{v}")
@pytest.mark.parametrize("large", [False, True], ids=["x-normal", "x-extremes"])
def test_packed_gemv_within_its_derived_bound(shape, group_size, large):
    """Through ops (the backend QuantLinear calls) with the variant's switch: odd N, K a multiple of 8 but not of
    the step (200 - masked), K split across programs (1024), bias, x from fp16's largest to subnormal multiples
    (where, without the 2**-6, a chain overflows: 4 * 15 * 65504); the same launches as the per-call variant."""
    n, k = shape
    qweight, scales, zeros, gs, x = _layer_and_x(n, k, group_size, seed=n + k + group_size, large=large)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    workspace = ops.w4a16_workspace(n)
    with w4a16.half2_gemv():
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=workspace)
    assert torch.count_nonzero(workspace) == 0
    _assert_within(y, x, qweight, scales, zeros, gs, bias)
    y_call = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, bias, gs, workspace, variant="triton-h2")
    assert torch.equal(y, y_call)


@interpreter
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["pos", "neg"])
def test_packed_gemv_does_not_overflow_at_fp16s_largest_x(sign):
    """The worst case of a chain: x = +-65504 (fp16's largest) on every input and q - z = 15 (or -15) on every
    weight, so that each half's four products add up to about 4 * 15 * 65504 * 2**-6 = 61410, just under fp16's
    largest: finite, within the bound. Without x's 2**-6 (or with 2**-4) the first sums overflow to inf."""
    n, k = 8, 256
    q = torch.full((n, k), 15, dtype=torch.int32)
    q[n // 2:] = 0  # half the rows q - z = -15: z = 15 there
    zeros = torch.zeros(n, k // 64, dtype=torch.float16)
    zeros[n // 2:] = 15
    scales = torch.full((n, k // 64), 2.0 ** -14, dtype=torch.float16)
    x = torch.full((1, k), sign * 65504.0, dtype=torch.float16)
    qweight = pack_int4(q)
    with w4a16.half2_gemv():
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, 64)
    _assert_within(y, x, qweight, scales, zeros, 64)


@interpreter
def test_packed_gemv_reads_x_through_input_scale_and_channel_order():
    """A layer's input scale and act-order channel order: x's values made first (x[perm] * m, rounded to fp16 as
    torch rounds it), then paired - the same bound against the reference of the transformed x."""
    n, k = 48, 512
    qweight, scales, zeros, gs, x = _layer_and_x(n, k, 128, seed=5)
    scale = random_input_scale(k, torch.float16, seed=6)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(7)).to(torch.int32)
    for kw in ({"input_scale": scale}, {"input_perm": perm}, {"input_scale": scale, "input_perm": perm}):
        with w4a16.half2_gemv():
            y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, ops.w4a16_workspace(n), **kw)
        xt = x[:, perm.long()] if "input_perm" in kw else x
        xt = xt * scale if "input_scale" in kw else xt
        _assert_within(y, xt, qweight, scales, zeros, gs)


@interpreter
def test_packed_gemv_misaligned_x_reads_values():
    """x starting 2 bytes past a 4-byte boundary (a view) cannot be read as words of pairs: the launcher reads its
    values instead, with the same result as an aligned copy."""
    n, k = 24, 256
    qweight, scales, zeros, gs, x = _layer_and_x(n, k, 64, seed=9)
    buf = torch.empty(k + 1, dtype=torch.float16)
    buf[1:] = x[0]
    xv = buf[1:][None, :]
    assert xv.data_ptr() % 4 == 2
    with w4a16.half2_gemv():
        y_view = w4a16.w4a16_gemm_triton(xv, qweight, scales, zeros, None, gs)
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs)
    assert torch.equal(y_view, y)


@interpreter
def test_packed_gemv_is_its_specification_and_its_bound_near_the_fp32_gemvs():
    """The whole GEMV is the specification's word sums times 2**6 s, added in fp32 and rounded once to fp16:
    within that rounding plus fp32's order (a scale, group or split-K slip is far outside it); and its derived
    bound stays within a small factor of the fp32 GEMV's (gemm_tolerance, whose term for the reference's own
    rounding of w to fp16 is of the same order as the chains' roundings) - the guarantee users get is close."""
    n, k = 256, 1024
    qweight, scales, zeros, gs, x = _layer_and_x(n, k, 128, seed=21)
    with w4a16.half2_gemv():
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, ops.w4a16_workspace(n))
    y_ref, err = _assert_within(y, x, qweight, scales, zeros, gs)
    terms = gemv_half2_words(x, qweight, zeros, gs).double() * (
        scales.double().repeat_interleave(gs // 8, dim=1) / GEMV_HALF2_X_SCALE)
    spec = terms.sum(dim=1)
    eps32 = torch.finfo(torch.float32).eps
    order = (k // 8 + 2) * eps32 * terms.abs().sum(dim=1)
    assert ((y[0].double() - spec).abs() <= 2.0 ** -11 * (spec.abs() + order) + order + 2.0 ** -25).all()
    fp32_tol = gemm_tolerance(x, dequant(qweight, scales, zeros, gs, x.dtype), x.dtype, y_ref).double()
    ratio = gemv_half2_tolerance(x, qweight, scales, zeros, gs, y_ref).double() / fp32_tol
    assert 1 < ratio.min() and ratio.max() < 6, (ratio.min(), ratio.max())


@interpreter
@pytest.mark.parametrize("nk", [(40, 1024), (24, 200)], ids=["split", "masked"])
def test_packed_gemv_with_the_prefetch_gives_the_same_bits(nk):
    """decode_sweep.py times GEMV_HALF2 with GEMV_PREFETCH (each trip's next words of W and x's pairs loaded before
    it computes its own): only the loads move, so the bits are the packed GEMV's alone - K split or masked."""
    n, k = nk
    qweight, scales, zeros, gs, x = _layer_and_x(n, k, 64 if k % 64 == 0 else -1, seed=13)
    gs = gs if k % 64 == 0 else k
    workspace = ops.w4a16_workspace(n)
    with w4a16.half2_gemv():
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace)
        with w4a16.prefetch_gemv():
            y_ahead = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace)
    assert torch.equal(y, y_ahead)
    _assert_within(y_ahead, x, qweight, scales, zeros, gs)


@interpreter
def test_other_dtypes_keep_the_fp32_gemv():
    """bf16 / fp32 layers are not packed (bf16's 8-bit significand is too coarse for the chains): under the switch
    they launch the fp32 GEMV, bit for bit what they launch without it."""
    for dtype in (torch.bfloat16, torch.float32):
        qweight, scales, zeros, gs = random_qweight(20, 256, 64, dtype, seed=4)
        x = torch.randn(1, 256, dtype=dtype)
        with w4a16.half2_gemv():
            y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs)
        assert torch.equal(y, w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs))
