"""The M = 1 GEMV's loads made where they are used (kernels/w4a16.py GEMV_DIRECT_LOADS, variant "triton-direct"): x's
words of 2-byte pairs, and where a step spans several groups the scales and zero points, loaded by each thread for
its own words of W instead of once a program and moved through shared memory. Only the loads move, so the results
are the default GEMV's bits, in every path it takes (fp32 products, packed fp16 ones, the prefetch, K split or
not, the scale / zero branch of each group size); where its loads cannot be made so the GEMV loads as before.

The interpreter runs the loads' tl.load twin (the inline PTX, LD_V4_B32_PTX / LD_B16_PTX, is a GPU's: tests/test_gpu.py
runs it; tests/test_aot.py holds what the compiler makes of it)."""
import contextlib

import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.kernels import w4a16
from minicpm_int4.reference import gemm_tolerance, w4a16_gemm_ref

from helpers import dequant, random_input_scale, random_qweight

interpreter = pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs triton with TRITON_INTERPRET=1")


class _GemvLaunches:
    """The GEMV kernel's launches' keyword arguments (its constexprs), passed through to the kernel."""

    def __init__(self, kernel):
        self.kernel, self.kwargs = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _run(x, qweight, scales, zeros, gs, n, monkeypatch, input_scale=None, **settings):
    """(y, the launch's keyword arguments) of the GEMV under these module settings."""
    spy = _GemvLaunches(w4a16._w4a16_gemv_kernel)
    monkeypatch.setattr(w4a16, "_w4a16_gemv_kernel", spy)
    try:
        with contextlib.ExitStack() as stack:
            for name, value in settings.items():
                stack.enter_context(w4a16._setting(name, value))
            y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, ops.w4a16_workspace(n),
                                        input_scale=input_scale)
    finally:
        monkeypatch.setattr(w4a16, "_w4a16_gemv_kernel", spy.kernel)
    (kwargs,) = spy.kwargs
    return y, kwargs


# (dtype, N, K, group size, the GEMV's other settings): in the interpreter's plan a step is 8 words, so G = 32 (4
# words) takes the direct scale / zero loads of a step over two groups, G = 128 and per channel the row's one
CASES = {
    "fp16-g32-split": (torch.float16, 48, 1024, 32, {}),
    "fp16-g32-packed": (torch.float16, 48, 1024, 32, {"GEMV_HALF2": True}),
    "fp16-g32-packed-prefetch": (torch.float16, 32, 512, 32, {"GEMV_HALF2": True, "GEMV_PREFETCH": True}),
    "bf16-g32-prefetch": (torch.bfloat16, 32, 512, 32, {"GEMV_PREFETCH": True}),
    "bf16-g128": (torch.bfloat16, 48, 1024, 128, {}),
    "fp16-per-channel-unsplit": (torch.float16, 16, 256, -1, {"GEMV_SPLIT": 1}),
}


@interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_direct_loads_give_the_gemvs_bits(case, monkeypatch):
    dtype, n, k, group_size, settings = CASES[case]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k + group_size)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).to(dtype)
    y, kw = _run(x, qweight, scales, zeros, gs, n, monkeypatch, **settings)
    y_direct, kw_direct = _run(x, qweight, scales, zeros, gs, n, monkeypatch, GEMV_DIRECT_LOADS=True, **settings)
    assert not kw["DIRECT_X"] and not kw["DIRECT_SZ"] and kw.get("maxnreg") is None
    assert kw_direct["DIRECT_X"] and kw_direct["DIRECT_SZ"] and kw_direct["maxnreg"] == w4a16.GEMV_DIRECT_MAXNREG
    assert not kw_direct["LOAD_ASM"]  # (the interpreter: the loads' twin)
    assert kw_direct["EVEN"] and (kw_direct["SPLIT_K"] > 1) == (case != "fp16-per-channel-unsplit")
    assert (kw_direct["BLOCK_KW"] > kw_direct["GROUP_W"]) == (group_size == 32)
    assert torch.equal(y_direct, y)
    if not settings.get("GEMV_HALF2"):  # (the packed GEMV's own bound: tests/test_gemv_half2.py)
        y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, None, gs)
        w = dequant(qweight, scales, zeros, gs, dtype)
        assert ((y_direct.double() - y_ref.double()).abs() <= gemm_tolerance(x, w, dtype, y_ref)).all()


@interpreter
def test_direct_loads_fall_back_where_they_cannot(monkeypatch):
    """Rows or K that leave a ragged tile (masked loads), x not 16-byte aligned, x read through an input scale, fp32
    x or scales: those loads as before (DIRECT_X / DIRECT_SZ off), the rest direct, the bits the default's."""
    k = 512
    qweight, scales, zeros, gs = random_qweight(32, k, 32, torch.float16, seed=3)
    g = torch.Generator().manual_seed(5)
    buf = torch.randn(1, k + 8, generator=g).to(torch.float16)
    aligned, shifted = buf[:, :k], buf[:, 2:k + 2]  # (a fresh tensor's storage is 16-byte aligned; 4 bytes on: not)
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    m = random_input_scale(k, torch.float16, seed=6)
    q20, s20, z20, gs20 = random_qweight(20, k, 32, torch.float16, seed=4)  # 20 rows: a ragged row tile
    q32, s32, z32, gs32 = random_qweight(32, k, 32, torch.float32, seed=7)
    cases = [  # (x, layer, input scale, DIRECT_X, DIRECT_SZ)
        (aligned, (qweight, scales, zeros, gs, 32), None, True, True),
        (shifted.clone(), (qweight, scales, zeros, gs, 32), None, True, True),  # (a copy: aligned)
        (shifted, (qweight, scales, zeros, gs, 32), None, False, True),
        (aligned, (qweight, scales, zeros, gs, 32), m, False, True),
        (aligned, (q20, s20, z20, gs20, 20), None, False, False),
        (aligned.float(), (q32, s32, z32, gs32, 32), None, False, False),
    ]
    for x, (qw, s, z, group, n), scale, direct_x, direct_sz in cases:
        y, _ = _run(x, qw, s, z, group, n, monkeypatch, input_scale=scale)
        y_direct, kw = _run(x, qw, s, z, group, n, monkeypatch, input_scale=scale, GEMV_DIRECT_LOADS=True)
        assert (kw["DIRECT_X"], kw["DIRECT_SZ"]) == (direct_x, direct_sz), (x.dtype, n, scale is not None)
        assert torch.equal(y_direct, y)


def test_direct_loads_are_a_variant_the_table_can_pick():
    """"triton-direct" is one of the Triton variants (a bench row, a dispatch candidate at M = 1, warmed by the
    suite's cache); off by default until a GPU run measures it."""
    from minicpm_int4 import dispatch
    from minicpm_int4.bench import backends
    from minicpm_int4.kernels import warm_cache

    assert w4a16.VARIANTS["triton-direct"] == ("GEMV_DIRECT_LOADS", True) and w4a16.GEMV_DIRECT_LOADS is False
    assert dispatch.TRITON_CANDIDATES["triton-direct"] == (1, 1)
    assert "w4a16-triton-direct" in {b.name for b in backends.default_backends()}
    assert "w4a16-triton-direct" in warm_cache.SUITE_BACKENDS
