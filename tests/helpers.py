"""Shared test helpers: random quantized layers and derived tolerances."""
import torch

from minicpm_int4.packing import pack_int4, unpack_int4
from minicpm_int4.quantize import quantize_rtn
from minicpm_int4.reference import dequantize_ref

EPS32 = torch.finfo(torch.float32).eps


def random_qweight(n, k, group_size, dtype, seed=0):
    """A random fp weight quantized with rtn: (qweight, scales, zeros, effective group size)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    qw = quantize_rtn(w, group_size)
    gs = k if group_size == -1 else group_size
    return pack_int4(qw.q), qw.scales, qw.zeros, gs


def gemm_tolerance(x, w, out_dtype, y_ref):
    """Elementwise bound for |kernel - reference| when both use the same rounded operands and
    accumulate in fp32 in different orders, then round once to out_dtype:
        one ulp of out_dtype at |y| (two roundings of nearby values) plus the fp32 summation bound
        2 * K * eps32 * (|x| @ |w|.T)   (each of two sums errs by at most K * eps32 * sum|terms|),
    plus one subnormal step for outputs near zero."""
    k = x.shape[1]
    mag = x.abs().double() @ w.abs().double().t()
    fin = torch.finfo(out_dtype)
    return (fin.eps * y_ref.abs().double() + 2 * k * EPS32 * mag + fin.tiny).float()


def assert_gemm_close(y, y_ref, x, w):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert torch.isfinite(y).all(), "output has NaN/inf (an element never written?)"
    tol = gemm_tolerance(x, w, y.dtype, y_ref)
    err = (y.double() - y_ref.double()).abs().float()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst excess {(err - tol).max().item():.3g}"


def dequant(qweight, scales, zeros, gs, dtype):
    return dequantize_ref(qweight, scales, zeros, gs, out_dtype=dtype)


def w4a8_tolerance(x_q, x_scale, qweight, scales, zeros, gs, out_dtype, y_ref):
    """Integer parts are exact; the fp32 part sums G products acc_g * s_g then scales: each step errs
    by <= eps32 relative, so |kernel - ref| <= 2 * (G + 2) * eps32 * sum_g |acc_g s_g| |x_scale|,
    plus one ulp of out_dtype from the final rounding of both."""
    q = unpack_int4(qweight).double()
    m, k = x_q.shape
    g = k // gs
    z = zeros.double().repeat_interleave(gs, 1)
    xg = x_q.double().reshape(m, g, gs)
    wg = (q - z).reshape(-1, g, gs)
    acc = torch.einsum("mgk,ngk->mng", xg, wg)
    mag = (acc.abs() * scales.double().abs().unsqueeze(0)).sum(-1) * x_scale.double().abs().unsqueeze(1)
    fin = torch.finfo(out_dtype)
    return 2 * (g + 2) * EPS32 * mag + fin.eps * y_ref.double().abs() + fin.tiny
