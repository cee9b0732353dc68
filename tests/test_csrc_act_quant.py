"""The CUDA activation quantizer (csrc/act_quant.cu) run on the CPU, bit for bit against reference.py.

tests/csrc/host_emu.cu runs the kernel's own per-thread code (csrc/act_quant_core.cuh) for every
thread of every row's block, with the block max in between, and the launcher's own choice of path
(16-byte pieces kept in registers, 16-byte pieces read twice, or element by element). The math is
exact (a max, one correctly rounded division, rint), so the result must equal the reference's in
every bit, zero rows and NaN rows included, also with a layer's input scale multiplied in as x is
read (the reference quantizes torch's x * input_scale), and with an act-order layer's channel order
read with x (the reference quantizes x[:, input_perm]). Inputs end at an inaccessible page
(csrc_emu.guarded).
"""
import pytest
import torch

from minicpm_int4.reference import quantize_per_token_int8_ref

from csrc_emu import guarded
from helpers import random_input_scale

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _emulate(emu, x, force_scalar=False, input_scale=None, input_perm=None):
    m, k = x.shape
    x_q = torch.full((m, k), -128, dtype=torch.int8)  # -128 is never written: spots a missed element
    scale = torch.full((m,), float("inf"))
    path = emu.minicpm_int4_act_quant_emulate(x.data_ptr(), x_q.data_ptr(), scale.data_ptr(), m, k, x.stride(0),
                                              DTYPE_CODE[x.dtype], int(force_scalar),
                                              None if input_scale is None else input_scale.data_ptr(),
                                              None if input_perm is None else input_perm.data_ptr())
    return x_q, scale, path


def _assert_exact(x, x_q, scale, input_scale=None):
    q_ref, s_ref = quantize_per_token_int8_ref(x, input_scale)
    assert torch.equal(x_q, q_ref), f"{int((x_q != q_ref).sum())} elements differ"
    assert torch.equal(scale.isnan(), s_ref.isnan()) and torch.equal(scale.nan_to_num(), s_ref.nan_to_num())


def _rows(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m).unsqueeze(1)  # rows of very different size
    if m >= 3:
        x[1] = 0                          # a zero row: scale 0, x_q 0
        x[2, k // 2] = 1e4 if dtype != torch.float16 else 6e4   # one outlier dominates its row
    # ties: values that land exactly on k + 0.5 after the division (checks round-half-to-even)
    x[0, :4] = torch.tensor([127.0, 63.5, -0.5, 1.5]) * (x[0].abs().max() / 127)
    return x.to(dtype)


def _expected_path(x):
    """The launcher's rule (act_quant_core.cuh): 16-byte pieces when the rows allow them, kept in
    registers up to 8 per thread of 256, else read twice; otherwise element by element."""
    esize, k = x.element_size(), x.shape[1]
    if x.data_ptr() % 16 or (x.stride(0) * esize) % 16 or (k * esize) % 16:
        return "scalar"
    return "regs" if k * esize // 16 <= 8 * 256 else "two-pass"


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [768, 4096, 4304, 1000, 18944, 1001, 13])  # 18944: two-pass; 1001, 13: scalar
@pytest.mark.parametrize("m", [1, 3, 17])
def test_act_quant_emulation_bit_exact(emu, dtype, k, m):
    x = guarded(_rows(m, k, dtype, seed=k + m))
    x_q, scale, path = _emulate(emu, x)
    assert ("scalar" if path < 0 else "two-pass" if path == 0 else "regs") == _expected_path(x)
    _assert_exact(x, x_q, scale)


def test_act_quant_every_path_is_exercised():
    shapes = [(m, k, d) for d in DTYPE_CODE for k in (768, 4096, 4304, 1000, 18944, 1001, 13) for m in (1, 3, 17)]
    paths = {_expected_path(guarded(torch.zeros(m, k, dtype=d))) for m, k, d in shapes}
    assert paths == {"regs", "two-pass", "scalar"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_act_quant_emulation_strided_nan_and_scalar_path(emu, dtype):
    m, k = 5, 2048
    full = guarded(_rows(m, k + 8, dtype, seed=3))
    x = full[:, :k]                       # row stride k + 8: still 16-byte rows
    x[3, 7] = float("nan")                # NaN row: scale NaN, x_q zeros (as the reference)
    x_q, scale, path = _emulate(emu, x)
    assert path > 0
    _assert_exact(x, x_q, scale)
    assert scale[3].isnan() and (x_q[3] == 0).all()
    x_q2, scale2, path2 = _emulate(emu, x, force_scalar=True)
    assert path2 == -1 and torch.equal(x_q2, x_q) and torch.equal(scale2.nan_to_num(), scale.nan_to_num())


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [4096, 18944, 1001])  # registers, two-pass, element by element
def test_act_quant_emulation_input_scale_bit_exact(emu, dtype, k):
    """x * input_scale as x is read: the reference's quantization of torch's x * m, every path; the
    register path's cache holds the products (pass 2 must not multiply again)."""
    m = guarded(random_input_scale(k, dtype, seed=k + 3))
    # rows of very different size, outliers, ties and a zero row, divided by max(m) so that x * m stays
    # finite in fp16 (an inf in a row has no defined int8); the small rows become fp16 subnormals
    x = guarded((_rows(17, k, torch.float32, seed=k) / m.float().max()).to(dtype))
    x_q, scale, path = _emulate(emu, x, input_scale=m)
    assert ("scalar" if path < 0 else "two-pass" if path == 0 else "regs") == _expected_path(x)
    _assert_exact(x, x_q, scale, m)
    q_plain, s_plain = quantize_per_token_int8_ref(x)
    assert not torch.equal(scale.nan_to_num(), s_plain.nan_to_num()), "the scale must change the result"
    if path != -1:  # the same through the element-by-element path
        x_q2, scale2, path2 = _emulate(emu, x, force_scalar=True, input_scale=m)
        assert path2 == -1 and torch.equal(x_q2, x_q) and torch.equal(scale2.nan_to_num(), scale.nan_to_num())


def test_act_quant_emulation_misaligned_input_scale_takes_element_path(emu):
    """An input scale that is not 16-byte aligned cannot be read in 16-byte pieces: the launcher's
    rule sends the rows element by element, with the same bits."""
    k = 2048
    x = guarded(_rows(3, k, torch.float16, seed=9))
    m_full = guarded(random_input_scale(k + 1, torch.float16, seed=4))
    m = m_full[:k]  # guarded() ends the buffer at a page: its start is 2 bytes short of a 16-byte boundary
    assert m.data_ptr() % 16 != 0 and x.data_ptr() % 16 == 0
    x_q, scale, path = _emulate(emu, x, input_scale=m)
    assert path == -1
    _assert_exact(x, x_q, scale, m)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [4096, 18944, 1001])  # registers, two-pass, element by element
def test_act_quant_emulation_input_perm_bit_exact(emu, dtype, k):
    """x read through a channel order (an act-order layer's input_perm): the reference's quantization
    of x[:, perm], every path, a strided x; the register path's cache holds the gathered pieces."""
    g = torch.Generator().manual_seed(k + 21)
    perm = guarded(torch.randperm(k, generator=g).to(torch.int32))
    full = guarded(_rows(17, k + 8, dtype, seed=k + 1))
    x = full[:, :k] if k % 8 == 0 else guarded(_rows(17, k, dtype, seed=k + 1))
    x_q, scale, path = _emulate(emu, x, input_perm=perm)
    assert ("scalar" if path < 0 else "two-pass" if path == 0 else "regs") == _expected_path(x)
    _assert_exact(x[:, perm.long()], x_q, scale)
    assert not torch.equal(x_q, quantize_per_token_int8_ref(x)[0]), "the order must change the result"
    if path != -1:  # the same through the element-by-element path
        x_q2, scale2, path2 = _emulate(emu, x, force_scalar=True, input_perm=perm)
        assert path2 == -1 and torch.equal(x_q2, x_q) and torch.equal(scale2.nan_to_num(), scale.nan_to_num())


def test_act_quant_emulation_refuses_an_input_scale_with_an_input_perm(emu):
    """No instantiation reads x through a channel order and multiplies an input scale in: the
    launcher refuses the pair (cudaErrorInvalidValue; the bindings gather x first)."""
    k = 256
    x = guarded(_rows(2, k, torch.float16, seed=1))
    perm = guarded(torch.randperm(k, generator=torch.Generator().manual_seed(1)).to(torch.int32))
    m = guarded(random_input_scale(k, torch.float16, seed=2))
    assert _emulate(emu, x, input_scale=m, input_perm=perm)[2] == -3
