"""Pure-PyTorch reference implementations: the specification of every op, and the CPU path.

Shapes (canonical layout, see packing.py): x [M, K]; qweight int32 [N, K // 8];
scales, zeros [N, K // G]; bias [N] or None; G = group_size (a positive divisor of K here:
ops.py turns the per-channel -1 into K before calling anything).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .packing import unpack_int4

INT8_MAX = 127


def dequantize_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], in fp32, rounded once to out_dtype."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((q - z) * s).to(out_dtype or scales.dtype)


def w4a16_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: Optional[torch.Tensor], group_size: int,
) -> torch.Tensor:
    """y = x @ W.T + bias with W dequantized in x's dtype, accumulated in fp32, returned in x's dtype."""
    w = dequantize_ref(qweight, scales, zeros, group_size, out_dtype=x.dtype)
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_per_token_int8_ref(x: torch.Tensor,
                                input_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8: scale = max|x_row| / 127 (fp32), x_q = round(x / scale).

    A row of zeros gets scale 0 and x_q = 0 (never NaN). Returns (x_q int8 [M, K], scale fp32 [M]).
    With `input_scale` ([K], x's dtype) the row quantized is x * input_scale computed in x's dtype (torch's
    `x * input_scale`: one rounding), the product the kernels that fuse the multiply must reproduce bit for bit.
    """
    if input_scale is not None:
        x = x * input_scale
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    # divided by a tensor, not the number 127: on CUDA torch turns a division by a Python scalar into a
    # multiplication by its reciprocal (rounded twice, an ulp off the quotient in some rows), on the CPU
    # it divides; a tensor divisor is a correctly rounded division on every device, as in the kernels
    scale = amax / torch.full_like(amax, INT8_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x_q = torch.round(x32 / safe.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    x_q = torch.where(scale.unsqueeze(-1) > 0, x_q, torch.zeros_like(x_q))
    return x_q.to(torch.int8), scale


def w4a8_gemm_ref(
    x_q: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
    zeros: torch.Tensor, bias: Optional[torch.Tensor], group_size: int, out_dtype: torch.dtype,
) -> torch.Tensor:
    """int8 activations x int4 weights with exact integer zero-point handling, per group g:

        acc_g[m, n] = sum_{k in g} x_q[m, k] * q[n, k] - zeros[n, g] * sum_{k in g} x_q[m, k]   (exact)
        y[m, n]     = x_scale[m] * sum_g acc_g[m, n] * scales[n, g]   (fp32, groups in order) + bias
    """
    m, k = x_q.shape
    q = unpack_int4(qweight)
    n = q.shape[0]
    g = k // group_size
    xg = x_q.reshape(m, g, group_size)
    qg = q.reshape(n, g, group_size)
    # the integer dot products through fp64 (CUDA has no int64 matmul): every product is an integer of at
    # most 127 * 15 and every partial sum one below 2**53 for K < 2**42, so fp64 holds each exactly, in any
    # order of summation, and the int64 result is the exact integer sum
    dot = torch.einsum("mgk,ngk->mng", xg.double(), qg.double()).to(torch.int64)
    xg = xg.to(torch.int64)
    xsum = xg.sum(-1)                                        # [M, G]
    acc = dot - zeros.to(torch.int64).unsqueeze(0) * xsum.unsqueeze(1)  # [M, N, G], exact
    y = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    s = scales.float()
    for gi in range(g):  # the kernels' order of fp32 accumulation
        y = y + acc[:, :, gi].float() * s[:, gi].unsqueeze(0)
    y = y * x_scale.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def gemm_tolerance(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype, y_ref: torch.Tensor,
                   chunk: int = 8192) -> torch.Tensor:
    """Derived elementwise bound for |y - y_ref| when y and y_ref accumulate x [M, K] times the
    dequantized w [N, K] in fp32 in different orders and round once to out_dtype:

        eps(out_dtype) * |y_ref|  +  (2 * K * eps32 + eps(w.dtype) / 2) * (|x| @ |w|.T)  +  tiny(out_dtype)

    (one ulp of the output from two roundings of nearby values; each fp32 sum of K terms errs by at
    most K * eps32 * sum|terms|; a kernel may multiply by the exact (q - z) * s instead of its
    rounding to the activation dtype - the decode kernels (M <= 16) apply s to a group's sum -
    which moves each product by at most half an ulp of w; one subnormal step near zero). In fp64,
    N in chunks."""
    k = x.shape[1]
    eps32 = torch.finfo(torch.float32).eps
    fin = torch.finfo(out_dtype)
    xa = x.abs().double()
    mag = torch.cat([xa @ w[i:i + chunk].abs().double().t() for i in range(0, w.shape[0], chunk)], dim=1)
    w_unit = torch.finfo(w.dtype).eps / 2
    return (fin.eps * y_ref.abs().double() + (2 * k * eps32 + w_unit) * mag + fin.tiny).float()


# The packed M = 1 GEMV (kernels/w4a16.py GEMV_HALF2) multiplies x by this before its fp16 products
GEMV_HALF2_X_SCALE = 2.0 ** -6


def _round_to_fp16(v: torch.Tensor) -> torch.Tensor:
    """fp64 -> fp16 with one correct rounding (numpy's conversion is direct; torch's passes through fp32,
    which can round twice)."""
    import numpy as np

    return torch.from_numpy(v.detach().double().cpu().numpy().astype(np.float16)).to(v.device)


def gemv_half2_words(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The packed GEMV's per-word sums (GEMV_HALF2), the specification of its fp16 arithmetic: x [1, K] fp16 ->
    [N, K / 8] fp32, word w of row n being

        lo + hi in fp32,  lo = fl(fl(fl(fl(t_0 x_0) + t_1 x_1) + t_2 x_2) + t_3 x_3),  hi the same over i = 4..7,

    with t_i = q[n, 8w + i] - z, x_i = fl(x[8w + i] * 2**-6), fl() one rounding to fp16 (each a + b * c fused).
    The kernel multiplies each by 2**6 times the group's scale and sums them in fp32."""
    n = qweight.shape[0]
    k = x.shape[1]
    xt = _round_to_fp16(x[0].double() * GEMV_HALF2_X_SCALE).double().reshape(k // 8, 8)
    t = (unpack_int4(qweight).double() - zeros.double().repeat_interleave(group_size, dim=1)).reshape(n, k // 8, 8)
    halves = []
    for first in (0, 4):
        p = _round_to_fp16(t[:, :, first] * xt[:, first]).double()
        for i in range(first + 1, first + 4):  # every value below is exact in fp64 before its rounding
            p = _round_to_fp16(t[:, :, i] * xt[:, i] + p).double()
        halves.append(p.float())
    return halves[0] + halves[1]


def gemv_half2_tolerance(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, y_ref: torch.Tensor) -> torch.Tensor:
    """Derived bound for |packed GEMV - w4a16_gemm_ref| (x [1, K] fp16): gemm_tolerance's terms (fp32 sums in
    another order, the reference's rounding of w, one ulp of the output) plus the fp16 arithmetic's:

        1.01 * 4 * u * sum_k |x_k| |q_k - z| |s|      each half's 4 roundings, each within u = 2**-11 of a
                                                      partial sum (at most the sum of |terms| so far);
        + 2**6 * eta * sum_k |s| (|q_k - z| + 1.01)   the subnormal floor: a rounding of x * 2**-6 or of a
                                                      partial sum below fp16's normal range errs by at most
                                                      eta = 2**-25 (half its spacing), 8 roundings a word.

    In fp64. No term for overflow: with |x| <= 65504 every partial sum is below 4 * 15 * 1023.5 < 65504."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv_half2_tolerance: x must be one row [1, K] (the packed GEMV's M = 1), got {tuple(x.shape)}")
    u, eta = 2.0 ** -11, 2.0 ** -25
    w = dequantize_ref(qweight, scales, zeros, group_size, x.dtype)
    sa = scales.double().abs().repeat_interleave(group_size, dim=1)
    t = (unpack_int4(qweight).double() - zeros.double().repeat_interleave(group_size, dim=1)).abs()
    mag = x.double().abs() @ (t * sa).t()
    floor = 2.0 ** 6 * eta * ((t + 1.01) * sa).sum(dim=1)
    return (gemm_tolerance(x, w, x.dtype, y_ref).double() + 1.01 * 4 * u * mag + floor[None, :]).float()


def w4a8_tolerance(x_q: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, group_size: int, out_dtype: torch.dtype, y_ref: torch.Tensor,
                   chunk: int = 4096) -> torch.Tensor:
    """Derived bound for |w4a8 kernel - w4a8_gemm_ref|: the integer parts are exact, the fp32 part
    sums G products acc_g * s_g and scales by x_scale (each step within eps32 relative), so

        2 * (G + 2) * eps32 * |x_scale| * sum_g |acc_g * s_g|  +  eps(out_dtype) * |y_ref|  +  tiny."""
    m, k = x_q.shape
    g = k // group_size
    xg = x_q.double().reshape(m, g, group_size)
    parts = []
    for i in range(0, qweight.shape[0], chunk):
        q = unpack_int4(qweight[i:i + chunk]).double()
        z = zeros[i:i + chunk].double().repeat_interleave(group_size, 1)
        wg = (q - z).reshape(q.shape[0], g, group_size)
        acc = torch.einsum("mgk,ngk->mng", xg, wg)
        parts.append((acc.abs() * scales[i:i + chunk].double().abs().unsqueeze(0)).sum(-1))
    mag = torch.cat(parts, dim=1) * x_scale.double().abs().unsqueeze(1)
    eps32 = torch.finfo(torch.float32).eps
    fin = torch.finfo(out_dtype)
    return (2 * (g + 2) * eps32 * mag + fin.eps * y_ref.double().abs() + fin.tiny).float()
