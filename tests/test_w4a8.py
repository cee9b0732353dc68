"""W4A8 GEMM (int8 activations x int4 weights) against reference.py under TRITON_INTERPRET=1."""
import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.reference import quantize_per_token_int8_ref, w4a8_gemm_ref
from minicpm_int4.packing import unpack_int4

from helpers import random_qweight, w4a8_tolerance

pytestmark = pytest.mark.usefixtures("poison_empty")
triton_only = pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
SHAPES = {32: (70, 96), 64: (45, 192), 128: (33, 384), -1: (40, 200)}


@triton_only
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m", [1, 3, 17, 130], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_w4a8_triton_matches_reference(m, group_size, out_dtype, has_bias):
    n, k = SHAPES[group_size]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, out_dtype, seed=m)
    x = torch.randn(m, k)
    if m > 2:
        x[1] = 0
        x[2, 7] = 1e3
    x_q, x_scale = quantize_per_token_int8_ref(x)
    bias = torch.randn(n, dtype=out_dtype) if has_bias else None
    y = ops.w4a8_gemm(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, backend="triton")
    y_ref = w4a8_gemm_ref(x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype)
    assert torch.isfinite(y).all()
    tol = w4a8_tolerance(x_q, x_scale, qweight, scales, zeros, gs, out_dtype, y_ref)
    assert ((y.double() - y_ref.double()).abs() <= tol).all()
    if m > 2 and not has_bias:
        assert (y[1] == 0).all()  # a zero row stays exactly zero


def test_w4a8_reference_integer_part_is_exact():
    # with unit scales the reference must equal the exact integer computation
    n, k, gs = 16, 64, 32
    qweight, scales, zeros, _ = random_qweight(n, k, gs, torch.float32)
    scales = torch.ones_like(scales)
    x_q = torch.randint(-127, 128, (5, k), dtype=torch.int8)
    y = w4a8_gemm_ref(x_q, torch.ones(5), qweight, scales, zeros, None, gs, torch.float32)
    exact = x_q.long() @ (unpack_int4(qweight).long() - zeros.long().repeat_interleave(gs, 1)).t()
    assert torch.equal(y, exact.float())


def test_w4a8_linear_uses_w4a16_for_decode_rows():
    n, k = 40, 128
    qweight, scales, zeros, gs = random_qweight(n, k, 64, torch.float32)
    x = torch.randn(ops.W4A8_MIN_M - 1, k)
    y = ops.w4a8_linear(x, qweight, scales, zeros, None, 64, backend="torch")
    assert torch.equal(y, ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="torch"))
    x = torch.randn(ops.W4A8_MIN_M, k)
    y = ops.w4a8_linear(x, qweight, scales, zeros, None, 64, backend="torch")
    x_q, s = quantize_per_token_int8_ref(x)
    assert torch.equal(y, w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, 64, torch.float32))
