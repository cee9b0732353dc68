"""Per-token int8 activation quantization: Triton (interpreter) bit-exact against reference.py."""
import numpy as np
import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.reference import quantize_per_token_int8_ref

from helpers import random_input_scale

pytestmark = pytest.mark.usefixtures("poison_empty")
triton_only = pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")


def _cases(m, k, dtype):
    x = torch.randn(m, k, dtype=dtype) * 3
    if m > 1:
        x[1] = 0                       # an all-zero row
    if m > 2:
        x[2, k // 3] = 6e4 if dtype == torch.float16 else 1e6   # one huge outlier
    return x


@triton_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (17, 256), (130, 72)], ids=lambda v: str(v))
def test_triton_bit_exact(m, k, dtype):
    x = _cases(m, k, dtype)
    xq, s = ops.quantize_per_token_int8(x, backend="triton")
    xq_ref, s_ref = quantize_per_token_int8_ref(x)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(xq, xq_ref)
    assert torch.equal(s, s_ref)


@triton_only
def test_triton_long_rows_take_the_two_read_path():
    from minicpm_int4.kernels import act_quant
    x = torch.randn(3, act_quant.MAX_SINGLE_BLOCK + 40, dtype=torch.float16)
    xq, s = ops.quantize_per_token_int8(x, backend="triton")
    xq_ref, s_ref = quantize_per_token_int8_ref(x)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


def test_reference_semantics():
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 127.0], [-1.0, 0.25, 0.0, 0.0]])
    xq, s = quantize_per_token_int8_ref(x)
    assert s[0] == 0 and (xq[0] == 0).all()                      # zero row: scale 0, no NaN
    assert s[1] == 1.0 and xq[1].tolist() == [1, -2, 0, 127]     # 0.5 rounds half to even -> 0
    assert xq[2].tolist() == [-127, 32, 0, 0]                    # 0.25 / (1/127) = 31.75 -> 32
    err = (xq.float() * s[:, None] - x).abs()
    assert (err <= 0.5 * s[:, None] + 1e-6).all()
    # the scale is the correctly rounded quotient max|x| / 127 (numpy's float32 division), not max|x| times
    # a rounded 1/127 (what torch computes for a division by a Python number on CUDA)
    x = torch.randn(4096, 8) * torch.rand(4096, 1) * 100
    amax = x.abs().amax(-1).numpy()
    s = quantize_per_token_int8_ref(x)[1]
    assert torch.equal(s, torch.from_numpy(amax / np.float32(127)))
    assert not torch.equal(s, torch.from_numpy(amax * (np.float32(1) / np.float32(127))))  # they do differ


@triton_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (17, 256), (130, 72)], ids=lambda v: str(v))
def test_triton_input_scale_fused_bit_exact(m, k, dtype):
    """The input scale multiplied inside the quantizer's pass gives the bits of quantizing x * m (as
    QuantLinear computed it before, in x's dtype), zero and outlier rows included."""
    x = _cases(m, k, dtype)
    scale = random_input_scale(k, dtype, seed=m)
    if m > 2:
        scale[k // 3] = 0.75  # the outlier channel: fp16's 6e4 times it stays finite
    xq, s = ops.quantize_per_token_int8(x, backend="triton", input_scale=scale)
    xq_ref, s_ref = quantize_per_token_int8_ref(x * scale)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)
    assert torch.equal(quantize_per_token_int8_ref(x, scale)[0], xq_ref)
    # the scale changes the result (the test would see a kernel that ignored it)
    assert not torch.equal(xq, ops.quantize_per_token_int8(x, backend="triton")[0])


@triton_only
def test_triton_input_scale_on_the_two_read_path():
    from minicpm_int4.kernels import act_quant
    k = act_quant.MAX_SINGLE_BLOCK + 40
    x = torch.randn(3, k, dtype=torch.bfloat16)
    scale = random_input_scale(k, torch.bfloat16)
    xq, s = ops.quantize_per_token_int8(x, backend="triton", input_scale=scale)
    xq_ref, s_ref = quantize_per_token_int8_ref(x * scale)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


@triton_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (17, 256)], ids=lambda v: str(v))
def test_triton_input_perm_gathered_in_the_pass(m, k, dtype):
    """An act-order layer's channel order (input_perm) read inside the quantizer's pass: the bits of
    quantizing x[:, perm] (times the input scale, in the permuted order), zero and outlier rows
    included, on the one-read and the two-read path."""
    from minicpm_int4.kernels import act_quant

    x = _cases(m, k, dtype)
    g = torch.Generator().manual_seed(m + k)
    perm = torch.randperm(k, generator=g).to(torch.int32)
    scale = random_input_scale(k, dtype, seed=m)
    xp = x[:, perm.long()]
    if m > 2:
        scale[(perm == k // 3).nonzero().item()] = 0.75  # the outlier's column: fp16's 6e4 times it stays finite
    for input_scale in (None, scale):
        want = quantize_per_token_int8_ref(xp, input_scale)
        assert torch.equal(want[0], quantize_per_token_int8_ref(xp if input_scale is None else xp * input_scale)[0])
        for single in (act_quant.MAX_SINGLE_BLOCK, 32):  # rows in one block, or (K > 32) the two-read path
            act_quant.MAX_SINGLE_BLOCK, saved = single, act_quant.MAX_SINGLE_BLOCK
            try:
                got = ops.quantize_per_token_int8(x, backend="triton", input_scale=input_scale, input_perm=perm)
            finally:
                act_quant.MAX_SINGLE_BLOCK = saved
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        # the reference and the op's torch backend gather first
        got = ops.quantize_per_token_int8(x, backend="torch", input_scale=input_scale, input_perm=perm)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(got[0], ops.quantize_per_token_int8(x, backend="triton", input_scale=scale)[0])


def test_input_scale_reference_rounds_the_product_in_x_dtype():
    # 1 + 2^-10 times 1 + 2^-10 is 1 + 2^-9 + 2^-20 exactly: fp16 rounds it to 1 + 2^-9 before the
    # quantizer sees it, as `x * m` does; an fp32 product would keep the 2^-20
    x = torch.tensor([[1 + 2 ** -10, 127.0]], dtype=torch.float16)
    scale = torch.tensor([1 + 2 ** -10, 1.0], dtype=torch.float16)
    xq, s = quantize_per_token_int8_ref(x, scale)
    assert torch.equal(xq, quantize_per_token_int8_ref(x * scale)[0]) and s.item() == 1.0


@pytest.mark.parametrize("bad, match", [
    (torch.ones(63, dtype=torch.float16), r"input_scale must have shape \[K=64\]"),
    (torch.ones(64, dtype=torch.float32), r"input_scale is torch.float32 but the activations are torch.float16"),
    (torch.ones(64, dtype=torch.float16, device="meta"), r"input_scale is on meta but the input is on cpu"),
    ("0.5", r"input_scale must have shape \[K=64\].*got str"),
])
def test_bad_input_scale_is_named(bad, match):
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.quantize_per_token_int8(x, backend="torch", input_scale=bad)
