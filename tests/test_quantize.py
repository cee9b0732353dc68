import pytest
import torch
from hypothesis import given, settings, strategies as st

from minicpm_int4.quantize import QMAX, check_quantizable, quantize_rtn, quantize_weight
from minicpm_int4.search import quantize_search

GROUPS = [32, 64, 128, -1]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _dequant32(qw, k):
    gs = k if qw.group_size == -1 else qw.group_size
    s = qw.scales.float().repeat_interleave(gs, 1)
    z = qw.zeros.float().repeat_interleave(gs, 1)
    return (qw.q.float() - z) * s


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), groups=st.integers(1, 3), gi=st.integers(0, 3), di=st.integers(0, 2),
       scale=st.floats(1e-3, 1e2), seed=st.integers(0, 2**16))
def test_every_weight_within_half_a_step(n, groups, gi, di, scale, seed):
    group_size, dtype = GROUPS[gi], DTYPES[di]
    k = groups * (128 if group_size == -1 else group_size)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * scale).to(dtype)
    qw = quantize_rtn(w, group_size)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= QMAX
    assert qw.scales.dtype == dtype and qw.zeros.dtype == dtype
    assert torch.equal(qw.zeros, qw.zeros.round()) and (qw.zeros >= 0).all() and (qw.zeros <= QMAX).all()
    gs = k if group_size == -1 else group_size
    step = qw.scales.float().repeat_interleave(gs, 1)
    err = (_dequant32(qw, k) - w.float()).abs()
    # half a step, plus fp32 rounding of w / s (relative eps32) in the quantizer
    bound = 0.5 * step * (1 + 4 * torch.finfo(torch.float32).eps) + torch.finfo(torch.float32).eps * w.float().abs()
    assert (err <= bound).all(), (err - bound).max()


def test_all_zero_and_constant_groups_are_exact():
    w = torch.zeros(2, 64)
    w[1] = 3.0
    qw = quantize_rtn(w, 32)
    assert torch.equal(_dequant32(qw, 64)[0], w[0])
    assert torch.allclose(_dequant32(qw, 64)[1], w[1], rtol=0, atol=0.5 * qw.scales.float().max().item())


@pytest.mark.parametrize("bad, match", [
    (torch.randn(4, 100), "not divisible by group_size=32"),
    (torch.randint(0, 3, (4, 64)), "floating-point"),
    (torch.randn(0, 64), "empty"),
    (torch.randn(64), "2-D"),
    (torch.randn(4, 64).index_put_((torch.tensor([2]), torch.tensor([7])), torch.tensor(float("nan"))),
     r"has 1 NaN/inf value\(s\), the first at \[2, 7\] \(nan\)"),
    (torch.randn(4, 64).half().index_put_((torch.tensor([0, 3]), torch.tensor([1, 9])), torch.tensor(float("-inf")).half()),
     r"has 2 NaN/inf value\(s\), the first at \[0, 1\] \(-inf\)"),
])
def test_check_quantizable_names_the_problem(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_quantizable(bad, 32)


def test_unknown_group_size_and_method():
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_rtn(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_weight(torch.randn(4, 64), 32, method="hqq")


@pytest.mark.parametrize("group_size", GROUPS)
def test_search_never_worse_than_rtn_on_any_group_and_deterministic(group_size):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 256, generator=g)
    w[:, 5] *= 20  # an outlier channel, as real weights have
    gs = 256 if group_size == -1 else group_size
    rtn, srch = quantize_rtn(w, group_size), quantize_search(w, group_size)
    e_rtn = ((_dequant32(rtn, 256) - w) ** 2).reshape(48, -1, gs).sum(-1)
    e_srch = ((_dequant32(srch, 256) - w) ** 2).reshape(48, -1, gs).sum(-1)
    assert (e_srch <= e_rtn).all()
    assert e_srch.sum() < e_rtn.sum()  # and strictly better overall on gaussian weights
    again = quantize_search(w, group_size)
    assert torch.equal(again.q, srch.q) and torch.equal(again.scales, srch.scales)
