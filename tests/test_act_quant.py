"""Per-token int8 activation quantization: Triton (interpreter) bit-exact against reference.py."""
import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.reference import quantize_per_token_int8_ref

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
