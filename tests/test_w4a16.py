"""W4A16 Triton kernels (decode and prefill) against reference.py, under TRITON_INTERPRET=1.

Interpreter note: fp16 and fp32 tl.dot are exact there, bf16 tl.dot is not, so bf16 tiles are
computed in fp32 under the interpreter (kernels/w4a16.py, _dot_fp32); GPUs use bf16 tensor cores
and the gpu-marked tests cover that.
"""
import pytest
import torch

from minicpm_int4 import ops
from minicpm_int4.reference import w4a16_gemm_ref

from helpers import assert_gemm_close, dequant, random_input_scale, random_qweight

pytestmark = [pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs triton with TRITON_INTERPRET=1"),
              pytest.mark.usefixtures("poison_empty")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (N, K) not multiples of the block sizes (BLOCK_N 32, BLOCK_K 32/64 in the interpreter)
SHAPES = {32: (70, 96), 64: (45, 192), 128: (33, 384), -1: (40, 200)}


def _check_triton_vs_reference(n, k, group_size, m, dtype, weight_seed, x_seed, x_scale=1.0):
    """Fresh random weights, x (times x_scale) and bias through the Triton backend, against reference.py."""
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=weight_seed)
    g = torch.Generator().manual_seed(x_seed)
    x = torch.randn(m, k, generator=g).to(dtype) * x_scale
    bias = torch.randn(n, generator=g).to(dtype)
    y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton")
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    assert_gemm_close(y, y_ref, x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_w4a16_triton_matches_reference(m, group_size, dtype, has_bias):
    n, k = SHAPES[group_size]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=m + n)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if has_bias else None
    y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton")
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    assert_gemm_close(y, y_ref, x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m", [17, 64], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("lhs", [True, False], ids=["w-lhs", "w-rhs"])
def test_w4a16_prefill_row_dequant_matches_reference(m, group_size, dtype, lhs, monkeypatch):
    # the prefill kernel's GPU path (W tile dequantized as rows): the product computed transposed, the rows
    # the dot's first operand (PREFILL_W_LHS), or the rows transposed as its second; the test above runs the
    # [K, N] path the interpreter picks by default
    from minicpm_int4.kernels import w4a16

    monkeypatch.setattr(w4a16, "PREFILL_W_ROWS", True)
    monkeypatch.setattr(w4a16, "PREFILL_W_LHS", lhs)
    launched = []
    monkeypatch.setattr(w4a16, "_w4a16_prefill_kernel", _Recording(w4a16._w4a16_prefill_kernel, "prefill", launched,
                                                                   flags=("W_LHS",)))
    n, k = SHAPES[group_size]
    if group_size == -1 and lhs:  # a K the K tile (32 here) divides: ragged K takes x @ W.T (PREFILL_W_LHS)
        k = 224
    _check_triton_vs_reference(n, k, group_size, m, dtype, weight_seed=m * n + 1, x_seed=m)
    assert launched == ["prefill" + (" W_LHS" if lhs else "")]


def test_w4a16_prefill_paths_dequantize_alike(monkeypatch):
    # every prefill path rounds (q - z) * s once to the dtype (the reference's rule): with x one-hot
    # rows each output is one dequantized weight, so the [K, N] tile and the row tile, either side of
    # the dot, must agree bit for bit
    from minicpm_int4.kernels import w4a16

    n, k = 45, 192
    qweight, scales, zeros, gs = random_qweight(n, k, 64, torch.bfloat16, seed=3)
    x = torch.eye(k, dtype=torch.bfloat16)[:32]
    outs = []
    for rows, lhs in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(w4a16, "PREFILL_W_ROWS", rows)
        monkeypatch.setattr(w4a16, "PREFILL_W_LHS", lhs)
        outs.append(ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="triton"))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[1], dequant(qweight, scales, zeros, gs, torch.bfloat16)[:, :32].t())


def test_w4a16_triton_split_k_large_k():
    # enough K tiles for the decode kernel to split K across programs (fp32 partial sums)
    n, k = 50, 2048
    qweight, scales, zeros, gs = random_qweight(n, k, 128, torch.float16)
    x = torch.randn(2, k, dtype=torch.float16)
    from minicpm_int4.kernels.w4a16 import _decode_blocks
    assert _decode_blocks(n, k, 128, x.device)[3] > 1
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton")
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x, dequant(qweight, scales, zeros, gs, x.dtype))


def test_w4a16_triton_strided_input_rows():
    n, k = 40, 128
    qweight, scales, zeros, gs = random_qweight(n, k, 64, torch.float16)
    big = torch.randn(5, 2 * k, dtype=torch.float16)
    x = big[:, :k]  # non-contiguous rows: the op makes them contiguous
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="triton")
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x, dequant(qweight, scales, zeros, gs, x.dtype))


# The 2 <= M <= 16 decode kernel (interpreter tiles: BLOCK_N 16, dot steps of 4 words, 2 steps a trip,
# 4 "SMs"): (N, K, group) chosen so that each path runs - EVEN or masked (N and/or K remainders),
# scales per dot step or per channel, K split across programs (fp32 partials + the reduce kernel).
DECODE_CASES = {
    "even-g32": (32, 128, 32),
    "even-g128-split": (16, 1024, 128),
    "even-per-channel": (48, 128, -1),
    "masked-n-g64": (21, 192, 64),
    "masked-k-per-channel": (16, 136, -1),
    "masked-split-g32": (20, 1056, 32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", [2, 5, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_w4a16_decode_paths(case, m, dtype):
    from minicpm_int4.kernels.w4a16 import _decode_blocks

    n, k, group_size = DECODE_CASES[case]
    gs = k if group_size == -1 else group_size
    block_n, block_kw, steps, split = _decode_blocks(n, k, gs, torch.device("cpu"))
    assert (n % block_n == 0 and (k // 8) % (block_kw * steps * split) == 0) == case.startswith("even")
    assert (split > 1) == ("split" in case)
    _check_triton_vs_reference(n, k, group_size, m, dtype, weight_seed=n * k + m, x_seed=k + m, x_scale=4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", [2, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_w4a16_decode_long_trip(case, m, dtype):
    """DECODE_TRIP_WORDS = 32 (long_decode_trip, the bench's w4a16-triton-trip32 rows): twice the dot steps a
    loop trip. The steps add in the same order either way, so where the split of K is the same the bits are
    the default's; where the longer trip splits K fewer ways (fewer trips to share out), the reference's
    bound holds."""
    from minicpm_int4.kernels import w4a16

    n, k, group_size = DECODE_CASES[case]
    gs = k if group_size == -1 else group_size
    qweight, scales, zeros, _ = random_qweight(n, k, group_size, dtype, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k), dtype=torch.float32).to(dtype) * 4
    short = w4a16._decode_blocks(n, k, gs, x.device)
    y_short = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton")
    with w4a16.long_decode_trip():
        long = w4a16._decode_blocks(n, k, gs, x.device)
        y_long = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton")
    assert long[2] == 2 * short[2] and long[:2] == short[:2]
    if long[3] == short[3]:
        assert torch.equal(y_long, y_short)
    assert_gemm_close(y_long, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x,
                      dequant(qweight, scales, zeros, gs, x.dtype))


# The decode kernel on the GPU plan's tile (64 rows, 16-word steps: DECODE_INTERPRETER_TILES = False), where it
# dequantizes in the tensor cores' fragment order (DECODE_FRAGMENT): G = 128 and per channel; EVEN or masked rows
# and words, K split across programs.
FRAGMENT_CASES = {
    "even-g128": (64, 256, 128),
    "even-g128-split": (128, 2048, 128),
    "masked-n-g128": (70, 384, 128),
    "even-per-channel": (64, 256, -1),
    "masked-k-per-channel": (64, 136, -1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", [2, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", list(FRAGMENT_CASES))
def test_w4a16_decode_fragment_order(case, m, dtype, monkeypatch):
    """The fragment order (rows and columns relabelled so that the dot's first operand is already in the tensor
    cores' register layout; x.T's rows permuted alike) against the natural order on the same tile and split: with
    integer x every dot step's sum is an exact integer in fp32 and the groups add in the same order, so the two
    give the same bits - a row or column sent to the wrong place would not; with random x, the reference's
    bound."""
    from minicpm_int4.kernels import w4a16

    monkeypatch.setattr(w4a16, "DECODE_INTERPRETER_TILES", False)
    n, k, group_size = FRAGMENT_CASES[case]
    gs = k if group_size == -1 else group_size
    block_n, block_kw, steps, split = w4a16._decode_blocks(n, k, gs, torch.device("cpu"))
    assert (block_n, block_kw) == (64, 16) and (split > 1) == ("split" in case)
    assert (n % block_n == 0 and (k // 8) % (block_kw * steps * split) == 0) == case.startswith("even")
    qweight, scales, zeros, _ = random_qweight(n, k, group_size, dtype, seed=n * k + m)
    g = torch.Generator().manual_seed(k + m)
    x_int = torch.randint(-8, 9, (m, k), generator=g).to(dtype)
    x = (torch.randn(m, k, generator=g) * 4).to(dtype)
    launched = []
    monkeypatch.setattr(w4a16, "_w4a16_decode_kernel", _Recording(w4a16._w4a16_decode_kernel, "decode", launched,
                                                                  flags=("FRAGMENT",)))
    outs = {}
    for fragment in (True, False):
        monkeypatch.setattr(w4a16, "DECODE_FRAGMENT", fragment)
        outs[fragment] = [ops.w4a16_gemm(v, qweight, scales, zeros, None, group_size, backend="triton")
                          for v in (x_int, x)]
    assert launched == ["decode FRAGMENT"] * 2 + ["decode"] * 2
    assert torch.equal(outs[True][0], outs[False][0])
    for y, v in zip(outs[True], (x_int, x)):
        assert_gemm_close(y, w4a16_gemm_ref(v, qweight, scales, zeros, None, gs), v,
                          dequant(qweight, scales, zeros, gs, dtype))


def test_decode_fragment_order_needs_the_gpu_tile(monkeypatch):
    """The fragment order is a relabelling of what 4 warps hold of a 64 x 16-word tile: other tiles (the
    interpreter's small ones, G = 32 / 64's 4- and 8-word steps) take the natural order whatever the setting, and on
    a GPU fp32 layers' FMA dots do too; None picks it in the interpreter where the tile allows."""
    from minicpm_int4.kernels import w4a16

    cpu = torch.device("cpu")
    assert w4a16._decode_fragment(cpu, 64, 16, False, None)
    assert w4a16._decode_fragment(cpu, 64, 16, True, True)   # the interpreter's fp32 dots (bf16, fp32)
    assert not w4a16._decode_fragment(cpu, 64, 16, False, False)
    for block_n, block_kw in [(16, 4), (64, 8), (64, 4), (16, 16)]:
        assert not w4a16._decode_fragment(cpu, block_n, block_kw, False, True)
    monkeypatch.setattr(w4a16, "INTERPRET", False)
    assert not w4a16._decode_fragment(cpu, 64, 16, True, True)
    assert w4a16._decode_fragment(cpu, 64, 16, False, True)
    assert w4a16.DECODE_FRAGMENT is None  # the default: by GPU


def test_decode_plans_are_tuned_apart():
    """The decode kernel's autotuner (num_stages: weight tiles in flight) keys on every plan value that changes
    the bytes a pipeline stage holds: the steps a loop trip (DECODE_TRIP_WORDS; a long trip's stage is twice
    the default's), the split and the tile, and on the tile's order (DECODE_FRAGMENT: the natural order holds a
    16 KB buffer more a program), so that a variant's launches (the bench's `w4a16-triton-trip32`
    rows, decode_sweep's trips, a table's "triton-trip32" pick) are not run on the config timed for the
    default's plan of the same shape."""
    from minicpm_int4.kernels import w4a16

    kernel = w4a16._w4a16_decode_kernel
    keys = getattr(kernel, "tuner", kernel).keys  # (fast_launch wraps the autotuner on a GPU)
    assert {"STEPS", "SPLIT_K", "BLOCK_N", "GROUP_W", "M_BUCKET", "N", "KW", "FRAGMENT"} <= set(keys)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the split-K reduce kernel was launched although a workspace was given")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m", [3, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("case", ["even-g128-split", "masked-split-g32"])
def test_w4a16_decode_splitk_in_one_launch(case, m, dtype, monkeypatch):
    # with a workspace the last program of each row tile reduces the partials (no second launch):
    # the same bits as the two-launch path, within the reference's tolerance, counters back at zero
    from minicpm_int4.kernels import w4a16

    has_bias = m == 3
    n, k, group_size = DECODE_CASES[case]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k + m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype) * 4
    bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
    two_launches = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton")
    workspace = ops.w4a16_workspace(n)
    monkeypatch.setattr(w4a16, "_splitk_reduce_kernel", _NoLaunch())
    for _ in range(2):  # the counters the first call used serve the second
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=workspace)
        assert torch.equal(y, two_launches)
        assert torch.count_nonzero(workspace) == 0
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, dequant(qweight, scales, zeros, gs, dtype))


def test_w4a16_decode_splitk_needs_zeroed_counters():
    # the counters are the whole synchronisation: a tile whose counter does not start at zero is
    # reduced before its partials exist (poisoned as NaN here). This is why QuantLinear allocates
    # its workspace zeroed, outside capture, and load_state_dict zeroes it again.
    n, k, group_size = DECODE_CASES["even-g128-split"]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=1)
    x = torch.randn(3, k, dtype=torch.float16)
    workspace = ops.w4a16_workspace(n)
    workspace[0] = 1
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", workspace=workspace)
    assert torch.isnan(y).any()


class _LaunchLog:
    """Every launch of a w4a16 kernel: its name, grid (a callable grid as the grid it gives the first config)
    and arguments, tensors as (dtype, shape) - what decides the kernel's work; kernel[grid](...) passes
    through."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            norm = lambda v: (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.log.append((self.name, grid if not callable(grid) else "callable", tuple(map(norm, args)),
                             tuple(sorted((k, norm(v)) for k, v in kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)
        return launch


W4A16_KERNELS = ("_w4a16_gemv_kernel", "_w4a16_decode_kernel", "_w4a16_prefill_kernel", "_w4a16_dequant_kernel",
                 "_splitk_reduce_kernel")
# a variant (w4a16.VARIANTS) and an M where it changes what runs for the layer below (K split by default at
# M = 1 and in the decode kernel, the prefill tile dequantized as rows so that its side of the dot matters)
VARIANT_M = {"triton-tc": 1, "triton-prefetch": 1, "triton-unsplit": 1, "triton-h2": 1, "triton-direct": 1,
             "triton-trip32": 5, "triton-staged": 5, "triton-dq": 40, "triton-rhs": 40}


@pytest.mark.parametrize("variant", list(VARIANT_M))
def test_a_variant_changes_one_call_as_its_switch_does(variant, monkeypatch):
    """w4a16_gemm_triton(variant=v), what ops runs where dispatch.py's table picked v, launches what the
    module switch the bench's `w4a16-<v>` rows are timed under launches - the same kernels, grids and
    arguments, so the same bits - and not what the module's own settings launch; the module's settings are
    left as they were, and the result is the reference's within its tolerance."""
    from minicpm_int4.kernels import w4a16

    assert set(VARIANT_M) == set(w4a16.VARIANTS)
    monkeypatch.setattr(w4a16, "PREFILL_W_ROWS", True)
    # the GPU's decode tile, where the fragment order runs ("triton-staged" switches it off)
    monkeypatch.setattr(w4a16, "DECODE_INTERPRETER_TILES", variant != "triton-staged")
    n, k, group_size = 16, 1024, 128
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=len(variant))
    g = torch.Generator().manual_seed(VARIANT_M[variant])
    x = torch.randn(VARIANT_M[variant], k, generator=g).to(torch.float16)
    bias = torch.randn(n, generator=g).to(torch.float16)
    if VARIANT_M[variant] == 1:
        assert w4a16._gemv_blocks(n, k // 8, x.device)[3] > 1
    log = []
    for name in W4A16_KERNELS:
        monkeypatch.setattr(w4a16, name, _LaunchLog(getattr(w4a16, name), name, log))
    settings = {name: getattr(w4a16, name) for name, _ in w4a16.VARIANTS.values()}

    def run(**kw):
        del log[:]
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, bias, gs, ops.w4a16_workspace(n), **kw)
        return y, list(log)

    y, launched = run(variant=variant)
    assert {name: getattr(w4a16, name) for name in settings} == settings
    with w4a16._variant_switch(variant):
        y_switch, launched_switch = run()
    default, launched_default = run()
    assert launched == launched_switch and torch.equal(y, y_switch)
    assert launched != launched_default
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    if variant == "triton-h2":  # fp16 products: its own derived bound (tests/test_gemv_half2.py)
        from minicpm_int4.reference import gemv_half2_tolerance

        assert ((y.double() - y_ref.double()).abs() <= gemv_half2_tolerance(x, qweight, scales, zeros, gs, y_ref)).all()
    else:
        assert_gemm_close(y, y_ref, x, dequant(qweight, scales, zeros, gs, x.dtype))
    with pytest.raises(ValueError, match="unknown variant 'triton-fast'"):
        w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, bias, gs, variant="triton-fast")


@pytest.mark.parametrize("group_size", [32, -1], ids=lambda g: f"g{g}")
def test_tensor_core_decode_at_m1_in_one_launch(group_size, monkeypatch):
    # the `w4a16-triton-tc` rows run M = 1 through the decode kernel with the layer's workspace
    from minicpm_int4.kernels import w4a16

    n, k = 20, 1056 if group_size == 32 else 1024
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=2)
    x = torch.randn(1, k, dtype=torch.float16)
    assert w4a16._decode_blocks(n, k, gs, x.device)[3] > 1
    monkeypatch.setattr(w4a16, "_splitk_reduce_kernel", _NoLaunch())
    workspace = ops.w4a16_workspace(n)
    with w4a16.tensor_core_decode():
        y = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", workspace=workspace)
    assert torch.count_nonzero(workspace) == 0
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x, dequant(qweight, scales, zeros, gs, x.dtype))


@pytest.mark.parametrize("m", [1, 2], ids=["gemv-M1", "decode-M2"])
def test_w4a16_magic_nibbles_exact(m):
    # every nibble value against every zero point (q - z from -15 to 15) in each of the 8 nibble
    # positions, x powers of two, scales 1: each product is exact and the sums are small, so both
    # decode kernels (the M = 1 GEMV's fp32 FMAs, the 2..16-row kernel's dot) must give the exact
    # fp64 sum
    k = 16 * 8
    q = torch.arange(k).remainder(16).repeat(16, 1)
    q = torch.stack([q.roll(r, 1) for r in range(16)]).reshape(256, k)[::16]  # rotate nibbles across positions
    zeros = torch.arange(16, dtype=torch.float32).unsqueeze(1)
    from minicpm_int4.packing import pack_int4

    qweight = pack_int4(q)
    x = torch.stack([2.0 ** -(torch.arange(k) % 7), 2.0 ** -(torch.arange(k) % 5)])[:m]
    scales = torch.ones(16, 1)
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, -1, backend="triton")
    exact = x.double() @ (q.double() - zeros.double()).t()
    assert torch.equal(y.double(), exact)


# The M = 1 GEMV kernel (interpreter tiles: BLOCK_N 4, BLOCK_KW 8 words): (N, K, group) chosen so that
# each of its paths runs - EVEN (no masks) or masked, scales read per row and step (a step inside one
# group) or per word (a step spanning groups), per-channel.
GEMV_CASES = {
    "even-per-word-g32": (16, 128, 32),
    "even-one-group-g64": (20, 256, 64),
    "even-one-group-g128": (8, 1024, 128),
    "even-per-channel": (16, 128, -1),
    "masked-per-channel": (18, 136, -1),
    "masked-per-word-g32": (7, 96, 32),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("split", ["unsplit", "split-k"])
def test_w4a16_gemv_paths(case, dtype, split, monkeypatch):
    # GEMV_SPLIT = 1: each program streams all of K (the plan for N large enough to fill the GPU);
    # None: these shapes are too small to fill even the interpreter's 4 "SMs", so K is split across
    # programs (16-row tiles; N masked where it is no multiple of 16) and reduced in a second launch
    # (no workspace here)
    from minicpm_int4.kernels import w4a16

    monkeypatch.setattr(w4a16, "GEMV_SPLIT", 1 if split == "unsplit" else None)
    n, k, group_size = GEMV_CASES[case]
    block_n, block_kw, _, n_split, kw_per_split = w4a16._gemv_blocks(n, k // 8, torch.device("cpu"))
    gs = k if group_size == -1 else group_size
    # (K / 8 no multiple of the step: never split, so that K is masked in the narrow tile only)
    assert (n_split > 1) == (split == "split-k" and (k // 8) % block_kw == 0)
    if n_split == 1:
        assert (n % block_n == 0 and (k // 8) % block_kw == 0) == case.startswith("even")
    else:
        assert block_n == 16 and kw_per_split % block_kw == 0 and (n_split - 1) * kw_per_split < k // 8 <= n_split * kw_per_split
    assert (block_kw <= gs // 8) == ("one-group" in case or "per-channel" in case)
    # x larger than the weights' scale
    _check_triton_vs_reference(n, k, group_size, 1, dtype, weight_seed=n * k, x_seed=k, x_scale=4.0)


@pytest.mark.parametrize("case", list(GEMV_CASES))
@pytest.mark.parametrize("split", ["unsplit", "split-k"])
@pytest.mark.parametrize("x_read", ["plain", "scaled-permuted"])
def test_w4a16_gemv_prefetch_gives_the_same_bits(case, split, x_read, monkeypatch):
    # GEMV_PREFETCH: each trip loads the next trip's words and x before it multiplies its own (the last
    # trip re-reads its own step where K is even, loads masked words where it is not): the same products
    # in the same order, so the same bits, split or not, with a bias and through the layer's workspace,
    # and with x read through a channel order and multiplied by an input scale as it is loaded
    from minicpm_int4.kernels import w4a16

    monkeypatch.setattr(w4a16, "GEMV_SPLIT", 1 if split == "unsplit" else None)
    n, k, group_size = GEMV_CASES[case]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=3 * n + k)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, k, generator=g).to(torch.float16) * 4
    bias = torch.randn(n, generator=g).to(torch.float16)
    extra = {}
    if x_read != "plain":
        extra = {"input_scale": random_input_scale(k, torch.float16, seed=k),
                 "input_perm": torch.randperm(k, generator=g).to(torch.int32)}
    plain = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=ops.w4a16_workspace(n),
                           **extra)
    launches = []
    kernel = w4a16._w4a16_gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["PREFETCH"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(w4a16, "_w4a16_gemv_kernel", Spy())
    with w4a16.prefetch_gemv():
        ahead = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton",
                               workspace=ops.w4a16_workspace(n), **extra)
    assert launches == [True] and not w4a16.GEMV_PREFETCH  # the switch reached the kernel, and is undone
    assert torch.equal(ahead, plain)
    if not extra:
        assert_gemm_close(ahead, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x,
                          dequant(qweight, scales, zeros, gs, torch.float16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ["even-per-word-g32", "even-one-group-g64", "even-one-group-g128"])
def test_w4a16_gemv_splitk_in_one_launch(case, dtype, monkeypatch):
    # with the layer's workspace the GEMV's split K is reduced by the last program of each 16-row tile
    # (as the decode kernel's): the same bits as the second launch, counters back at zero, and K split
    # or not, within the reference's tolerance
    from minicpm_int4.kernels import w4a16

    n, k, group_size = GEMV_CASES[case]
    assert w4a16._gemv_blocks(n, k // 8, torch.device("cpu"))[3] > 1
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).to(dtype) * 4
    bias = torch.randn(n, generator=g).to(dtype) if case != "even-one-group-g128" else None
    two_launches = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton")
    workspace = ops.w4a16_workspace(n)
    with monkeypatch.context() as mp:
        mp.setattr(w4a16, "_splitk_reduce_kernel", _NoLaunch())
        for _ in range(2):  # the counters the first call used serve the second
            y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=workspace)
            assert torch.equal(y, two_launches)
            assert torch.count_nonzero(workspace) == 0
    ref, w = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), dequant(qweight, scales, zeros, gs, dtype)
    assert_gemm_close(y, ref, x, w)
    monkeypatch.setattr(w4a16, "GEMV_SPLIT", 1)
    assert_gemm_close(ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton"), ref, x, w)


# (M, kernel, case, variant: the decode kernel's m as x.T's tile (sm_90) or as a column (sm_80); the
# prefill kernel's weight tile dequantized as rows (GPUs; "rhs": the rows the dot's second operand,
# PREFILL_W_LHS False) or as [K, N])
INPUT_SCALE_CASES = [(1, "gemv", case, None) for case in GEMV_CASES] + [
    (m, "decode", case, False) for m in (3, 16) for case in DECODE_CASES] + [
    (16, "decode", case, True) for case in ("even-g32", "masked-n-g64", "masked-split-g32")] + [
    (17, "prefill", "masked-n-g64", False), (64, "prefill", "even-g32", False),
    (17, "prefill", "masked-k-per-channel", True), (33, "prefill", "even-g128-split", True),
    (17, "prefill", "masked-n-g64", "rhs")]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m, kernel, case, tile", INPUT_SCALE_CASES, ids=lambda v: str(v))
def test_input_scale_multiplied_as_x_is_loaded(m, kernel, case, tile, dtype, monkeypatch):
    """A layer's input scale (QuantConfig.input_scales) inside the kernels' loads of x - the GEMV's
    (M = 1), the tensor-core decode kernel's (2..16, split-K in one launch or two; m loaded either
    way) and the prefill kernel's (either weight tile; fp16 / bf16), masked and even tiles - gives the
    bits of the same kernel on x * m computed by torch. Against the reference on x * m within its
    tolerance too."""
    from minicpm_int4.kernels import w4a16

    if kernel == "prefill":
        monkeypatch.setattr(w4a16, "PREFILL_W_ROWS", bool(tile))
        monkeypatch.setattr(w4a16, "PREFILL_W_LHS", tile != "rhs")
    else:
        monkeypatch.setattr(w4a16, "SCALE_AS_TILE", tile)
    n, k, group_size = (GEMV_CASES if kernel == "gemv" else DECODE_CASES)[case]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k + m)
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g).to(dtype) * 4
    bias = torch.randn(n, generator=g).to(dtype) if m != 16 else None
    scale = random_input_scale(k, dtype, seed=m)
    launched = []
    for name in ("_w4a16_gemv_kernel", "_w4a16_decode_kernel", "_w4a16_prefill_kernel"):
        kern = getattr(w4a16, name)
        monkeypatch.setattr(w4a16, name, _Recording(kern, name, launched))
    for workspace in (None, ops.w4a16_workspace(n)) if kernel != "prefill" else (None,):
        launched.clear()
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=workspace,
                           input_scale=scale)
        # the scale went in with x (no separate pass), but for fp32 layers' prefill (their FMA tiles spill)
        fused = not (kernel == "prefill" and dtype == torch.float32)
        assert launched == [f"_w4a16_{kernel}_kernel" + (" HAS_SCALE" if fused else "")]
        xm = x * scale
        assert torch.equal(y, ops.w4a16_gemm(xm, qweight, scales, zeros, bias, group_size, backend="triton",
                                             workspace=workspace))
    assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, bias, gs), xm, dequant(qweight, scales, zeros, gs, dtype))
    # the scale matters (a kernel that ignored it would fail here)
    assert not torch.equal(y, ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton"))


def test_prefill_takes_the_input_scale_in_a_pass_of_its_own_when_compiled(monkeypatch):
    """FUSE_INPUT_SCALE_PREFILL = None (the default): compiled kernels multiply x * m in a pass of their own
    on every GPU - on sm_80 mma.sync's per-warp-column multiply costs up to +2.4 SASS instructions per
    weight, and on an H200 the fused sm_90 tiles (+0.25 - 0.5, tests/test_aot.py) measured slower than the
    pass (473 against 410 us on a 4096^3 GEMM of 363) - and fp32 layers always (a spill); the interpreter
    runs the fused kernel. True / False force it, but for fp32."""
    from minicpm_int4.kernels import _common, w4a16

    x16, x32 = torch.empty(2, 8, dtype=torch.float16), torch.empty(2, 8)
    monkeypatch.setattr(w4a16, "INTERPRET", False)
    for cap, fused in ((80, False), (86, False), (89, False), (90, False), (100, False)):
        monkeypatch.setattr(_common, "target_capability", lambda device=None, cap=cap: cap)
        assert w4a16._fuse_prefill_scale(x16) is fused and not w4a16._fuse_prefill_scale(x32)
        for forced in (True, False):
            monkeypatch.setattr(w4a16, "FUSE_INPUT_SCALE_PREFILL", forced)
            assert w4a16._fuse_prefill_scale(x16) is forced and not w4a16._fuse_prefill_scale(x32)
        monkeypatch.setattr(w4a16, "FUSE_INPUT_SCALE_PREFILL", None)
    monkeypatch.setattr(w4a16, "INTERPRET", True)
    assert w4a16._fuse_prefill_scale(x16)


@pytest.mark.parametrize("m, flag", [(3, "FUSE_INPUT_SCALE"), (17, "FUSE_INPUT_SCALE_PREFILL")])
def test_input_scale_fusion_can_be_switched_off(m, flag, monkeypatch):
    """w4a16.FUSE_INPUT_SCALE (decode) / FUSE_INPUT_SCALE_PREFILL = False: x * m in a pass of its own
    (what benchmarks/input_scale_cost.py times against the fused kernels), the kernel launched without
    the scale, and the same bits as fused."""
    from minicpm_int4.kernels import w4a16

    n, k, group_size = DECODE_CASES["masked-n-g64"]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    scale = random_input_scale(k, torch.float16, seed=m)
    name = "_w4a16_decode_kernel" if m <= 16 else "_w4a16_prefill_kernel"
    launched = []
    monkeypatch.setattr(w4a16, name, _Recording(getattr(w4a16, name), name, launched))
    fused = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", input_scale=scale)
    monkeypatch.setattr(w4a16, flag, False)
    separate = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", input_scale=scale)
    assert launched[0] == f"{name} HAS_SCALE" and launched[-1] == name
    assert torch.equal(fused, separate)


# (M, kernel, case, dtype): the GEMV at M = 1, the tensor-core decode kernel (split-K in one launch or
# two), and prefill, which gathers first. Every tile shape in fp16; the order is read the same way for
# every dtype, so bf16 / fp32 (fp32 dots, fp32 prefill's unfused scale) on masked tiles only
_F16, _BF16, _F32 = torch.float16, torch.bfloat16, torch.float32
INPUT_PERM_CASES = [(1, "gemv", case, _F16) for case in GEMV_CASES] + [
    (1, "gemv", case, dtype) for case in ("masked-per-channel", "masked-per-word-g32") for dtype in (_BF16, _F32)] + [
    (3, "decode", case, _F16) for case in ("even-g32", "even-g128-split", "even-per-channel", "masked-n-g64",
                                           "masked-k-per-channel")] + [
    (3, "decode", "masked-n-g64", _BF16), (3, "decode", "masked-k-per-channel", _F32),
    (16, "decode", "masked-split-g32", _F16), (16, "decode", "even-per-channel", _BF16),
    (17, "prefill", "masked-n-g64", _F16), (17, "prefill", "masked-n-g64", _BF16), (40, "prefill", "even-per-channel", _F32)]


@pytest.mark.parametrize("m, kernel, case, dtype", INPUT_PERM_CASES,
                         ids=lambda v: str(v).split(".")[-1] if isinstance(v, torch.dtype) else str(v))
def test_input_perm_read_as_x_is_loaded(m, kernel, case, dtype, monkeypatch):
    """An act-order layer's channel order (QuantLinear.input_perm, foreign.py) read by the decode kernels
    as they load x - x[perm[k]] where x[k] was, masked and even tiles, with and without an input scale
    (which is in W's column order) - gives the bits of the same kernel on torch's gather x[:, perm];
    prefill gathers first and launches its kernel without it. Against the reference within its
    tolerance too, and a kernel that ignored the order would fail."""
    from minicpm_int4.kernels import w4a16

    n, k, group_size = (GEMV_CASES if kernel == "gemv" else DECODE_CASES)[case]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k + m + 1)
    g = torch.Generator().manual_seed(m + k + 1)
    x = torch.randn(m, k, generator=g).to(dtype) * 4
    bias = torch.randn(n, generator=g).to(dtype) if m != 16 else None
    perm = torch.randperm(k, generator=g).to(torch.int32)
    xp = x[:, perm.long()]
    launched = []
    for name in ("_w4a16_gemv_kernel", "_w4a16_decode_kernel", "_w4a16_prefill_kernel"):
        monkeypatch.setattr(w4a16, name, _Recording(getattr(w4a16, name), name, launched))
    for scale in (None, random_input_scale(k, dtype, seed=m + 1)):
        for workspace in (None, ops.w4a16_workspace(n)) if kernel != "prefill" else (None,):
            launched.clear()
            y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", workspace=workspace,
                               input_scale=scale, input_perm=perm)
            fused_scale = scale is not None and not (kernel == "prefill" and dtype == torch.float32)
            assert launched == [f"_w4a16_{kernel}_kernel" + (" HAS_SCALE" if fused_scale else "")
                                + (" HAS_PERM" if kernel != "prefill" else "")]
            assert torch.equal(y, ops.w4a16_gemm(xp, qweight, scales, zeros, bias, group_size, backend="triton",
                                                 workspace=workspace, input_scale=scale))
    xm = xp * scale
    assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, bias, gs), xm, dequant(qweight, scales, zeros, gs, dtype))
    assert not torch.equal(y, ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton",
                                             input_scale=scale))


@pytest.mark.parametrize("m, flag", [(1, "FUSE_INPUT_PERM"), (3, "FUSE_INPUT_PERM"), (3, "FUSE_INPUT_SCALE")])
def test_input_perm_gathered_first_where_not_fused(m, flag, monkeypatch):
    """w4a16.FUSE_INPUT_PERM = False: the decode kernels get x gathered by torch (a pass of its own,
    what benchmarks/input_scale_cost.py times against reading x through the order). With the input
    scale's fusion off, x * m needs x in W's column order, so the gather comes first too. Same bits."""
    from minicpm_int4.kernels import w4a16

    n, k, group_size = DECODE_CASES["masked-n-g64"]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, torch.float16, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).half()
    perm = torch.randperm(k, generator=g).to(torch.int32)
    scale = random_input_scale(k, torch.float16, seed=m)
    name = "_w4a16_gemv_kernel" if m == 1 else "_w4a16_decode_kernel"
    launched = []
    monkeypatch.setattr(w4a16, name, _Recording(getattr(w4a16, name), name, launched))
    fused = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", input_scale=scale,
                           input_perm=perm)
    monkeypatch.setattr(w4a16, flag, False)
    separate = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", input_scale=scale,
                              input_perm=perm)
    assert launched[0] == f"{name} HAS_SCALE HAS_PERM"
    assert launched[-1] == name + (" HAS_SCALE" if flag == "FUSE_INPUT_PERM" else "")
    assert torch.equal(fused, separate)


class _Recording:
    """A launched Triton kernel, its name recorded (kernel[grid](...) passes through), with the flags
    (HAS_SCALE / HAS_PERM by default) it was launched with."""

    def __init__(self, kernel, name, log, flags=("HAS_SCALE", "HAS_PERM")):
        self.kernel, self.name, self.log, self.flags = kernel, name, log, flags

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(self.name + "".join(f" {flag}" for flag in self.flags if kwargs.get(flag)))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_prefill_config_choice_on_a_gpu(monkeypatch):
    # What the autotuner may time on a GPU (the interpreter has a single config, so CI never runs
    # this choice): fp32 layers get their own small FMA tiles, fp16/bf16 the tensor-core ones, and
    # 128x256 only from sm_90, the 256-token tiles only there and only for the transposed product
    # (W_LHS: BLOCK_M is its wgmma's n). Also the row-dequantized tile only for 64-wide K tiles (on sm_80
    # only with a Triton where it measured cheaper).
    from minicpm_int4.kernels import _common, w4a16

    monkeypatch.setattr(w4a16, "INTERPRET", False)
    cfgs = w4a16._prefill_configs()
    prune = w4a16._w4a16_prefill_kernel.early_config_prune   # as triton.autotune calls it
    tiles = lambda cs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cs}  # noqa: E731
    for cap in (80, 90):
        monkeypatch.setattr(_common, "target_capability", lambda device=None, cap=cap: cap)
        fp32 = prune(cfgs, {}, DOT_FP32=True)
        assert tiles(fp32) == {(bm, bn, w) for bm, bn, w, _ in w4a16.FP32_PREFILL_TILES}
        tc = prune(cfgs, {}, DOT_FP32=False)
        assert not tiles(tc) & tiles(fp32) and ((128, 256, 8) in tiles(tc)) == (cap >= 90)
        assert not any(bm == 256 for bm, _, _ in tiles(tc))
        lhs = prune(cfgs, {}, DOT_FP32=False, W_LHS=True)
        assert tiles(lhs) - tiles(tc) == ({(256, 128, 8), (256, 64, 4)} if cap >= 90 else set())
        assert w4a16._prefill_w_rows(torch.device("cpu"), 64) == (cap >= 90 or w4a16.ROW_TILE_ON_SM80)
        assert not w4a16._prefill_w_rows(torch.device("cpu"), 32)


def _run_pairs_ptx(asm: str, regs: dict, outputs: int = 8) -> list:
    """Execute the kernels' inline PTX (e.g. the decode kernel's dequantization: $8 = word, $9 / $10 = packed
    pairs) with exact fp16 / bf16 / fp32 lane arithmetic and one correct rounding per instruction (numpy's
    fp64 -> fp16 / fp32 conversions round once); returns $0..$(outputs - 1) as bit patterns."""
    import re

    import numpy as np

    mask = 0xFFFFFFFF
    regs = dict(regs)

    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0)

    def lanes(v, kind):  # 32-bit -> two Python floats (low half first)
        halves = (v & 0xFFFF, v >> 16)
        if kind == "f16":
            return [float(np.array([h], dtype=np.uint16).view(np.float16)[0]) for h in halves]
        return [float(np.array([h << 16], dtype=np.uint32).view(np.float32)[0]) for h in halves]

    def pack(vals, kind, exact=True):  # two floats -> 32-bit, rounded to nearest even (or asserted exact)
        out = []
        for f in vals:  # every value here is exact in fp64
            if kind == "f16":
                r = np.array([f], dtype=np.float64).astype(np.float16)
                bits = int(r.view(np.uint16)[0])
            else:
                r = torch.tensor([f], dtype=torch.float64).to(torch.bfloat16)
                bits = int(r.view(torch.int16)) & 0xFFFF
            assert not exact or float(r[0] if kind == "f16" else r) == f, f"{f} is not exact in {kind}"
            out.append(bits)
        return out[0] | out[1] << 16

    def f32(bits):
        return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])

    def f32_bits(f):  # one rounding of an exact fp64 value
        return int(np.array([f], dtype=np.float64).astype(np.float32).view(np.uint32)[0])

    body = asm.strip()[1:-1]
    for ins in filter(None, (i.strip() for i in body.split(";"))):
        if ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        m = re.fullmatch(r"\{([\w$]+), ([\w$]+)\}, ([\w$]+)", args.strip())
        if op == "mov.b32" and m:  # unpack: the first name takes the low half
            regs[m.group(1)], regs[m.group(2)] = regs[m.group(3)] & 0xFFFF, regs[m.group(3)] >> 16
            continue
        dst, *srcs = [t.strip() for t in args.split(",")]
        v = [val(t) for t in srcs]
        if op == "lop3.b32":
            res = 0
            for bit in range(32):
                idx = ((v[0] >> bit) & 1) << 2 | ((v[1] >> bit) & 1) << 1 | ((v[2] >> bit) & 1)
                res |= ((v[3] >> idx) & 1) << bit
        elif op == "shr.u32":
            res = v[0] >> v[1]
        elif op == "mov.b32":
            res = v[0] & mask
        elif op in ("add.rn.f16x2", "fma.rn.f16x2", "fma.rn.bf16x2", "mul.rn.f16x2"):
            kind = "bf16" if "bf16" in op else "f16"
            ls = [lanes(x, kind) for x in v]
            if op.startswith("add"):
                res = pack([a + b for a, b in zip(*ls)], kind)
            elif op.startswith("mul"):  # one rounding of the exact product
                res = pack([a * b for a, b in zip(*ls)], kind, exact=False)
            else:  # one rounding of the exact a * b + c (a product of two halves is exact in fp64)
                res = pack([a * b + c for a, b, c in zip(*ls)], kind, exact=False)
        elif op == "cvt.f32.f16":  # exact
            res = f32_bits(float(np.array([v[0] & 0xFFFF], dtype=np.uint16).view(np.float16)[0]))
        elif op == "add.rn.f32":  # the exact sum of two fp32 values in fp64 (their exponents are close here)
            res = f32_bits(f32(v[0]) + f32(v[1]))
        elif op == "prmt.b32":  # bytes of {b, a}: selector nibble i picks result byte i
            both = v[0] | v[1] << 32
            res = sum(((both >> (8 * ((v[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
        regs[dst] = res
    return [regs[f"${i}"] for i in range(outputs)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_pairs_ptx_gives_q_minus_z_for_every_nibble_and_zero_point(dtype):
    # On a GPU the decode kernel dequantizes with inline PTX the interpreter cannot run (it runs the
    # Triton-op twin in _dequant_pairs). Here those exact instruction strings are executed on words
    # that put every value 0..15 at every nibble position, for every zero point: output $i must be
    # nibble i's q - z, exactly, in the dtype (the twin's n_i).
    import numpy as np

    from minicpm_int4.kernels.w4a16 import PAIRS_BF16_PTX, PAIRS_F16_PTX

    def pair(f):
        if dtype == torch.float16:
            h = int(np.array([np.float16(f)]).view(np.uint16)[0])
        else:
            h = int(np.array([f], dtype=np.float32).view(np.uint32)[0]) >> 16
        return h | h << 16

    asm = (PAIRS_F16_PTX if dtype == torch.float16 else PAIRS_BF16_PTX).value
    checked = 0
    for z in range(16):
        regs = {"$9": pair(-(1024.0 + z)), "$10": pair(-(64.0 + z))} if dtype == torch.float16 else {"$9": pair(-(128.0 + z))}
        for base in range(16):
            q = [(base + 3 * i) % 16 for i in range(8)]
            word = sum(qi << (4 * i) for i, qi in enumerate(q))
            out = _run_pairs_ptx(asm, {**regs, "$8": word})
            expect = torch.tensor([qi - z for qi in q], dtype=dtype).view(torch.int16).tolist()
            assert [o if o < 0x8000 else o - 0x10000 for o in out] == expect, (z, q)
            checked += 1
    assert checked == 256


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1], ids=lambda g: f"g{g}")
def test_tensor_core_decode_at_m1(group_size, dtype, monkeypatch):
    # the benchmark's `w4a16-triton-tc` rows: M = 1 through the decode kernel instead of the GEMV
    from minicpm_int4.kernels import w4a16

    def no_gemv(*args):
        raise AssertionError("the GEMV ran inside tensor_core_decode()")

    monkeypatch.setattr(w4a16, "_gemv", no_gemv)
    n, k = SHAPES[group_size]
    with w4a16.tensor_core_decode():
        _check_triton_vs_reference(n, k, group_size, 1, dtype, weight_seed=5, x_seed=6)
    assert w4a16.GEMV_MAX_M == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_prefill_scaled_ptx_gives_the_reference_weight(dtype):
    # The sm_90 prefill row tile's PTX: (q - z) * s rounded once to the dtype (reference.dequantize_ref's
    # rule), outputs $0..$7 in natural nibble order, on every nibble position and value, every zero
    # point and fresh random scales (normal, tiny and large magnitudes).
    from minicpm_int4.kernels.w4a16 import SCALED_BF16_PTX, SCALED_F16_PTX

    def pair(f):
        h = int(torch.tensor([f], dtype=torch.float64).to(dtype).view(torch.int16)) & 0xFFFF
        return h | h << 16

    asm = (SCALED_F16_PTX if dtype == torch.float16 else SCALED_BF16_PTX).value
    g = torch.Generator().manual_seed(3)
    scales = (torch.randn(24, generator=g) * torch.tensor([1e-3, 1e-2, 1.0, 30.0]).repeat(6)).to(dtype)
    for si, s in enumerate(scales.tolist()):
        for z in range(16):
            regs = {"$9": pair(-(1024.0 + z)), "$10": pair(s), "$11": pair(-(64.0 + z))} if dtype == torch.float16 \
                else {"$9": pair(-(128.0 + z)), "$10": pair(s)}
            for base in range(0, 16, 5 if si else 1):
                q = [(base + 3 * i) % 16 for i in range(8)]
                word = sum(qi << (4 * i) for i, qi in enumerate(q))
                out = _run_pairs_ptx(asm, {**regs, "$8": word})
                expect = ((torch.tensor(q, dtype=torch.float32) - z) * s).to(dtype).view(torch.int16).tolist()
                assert [o if o < 0x8000 else o - 0x10000 for o in out] == expect, (s, z, q)


def test_row_slices_keep_every_offset_in_32_bits():
    from minicpm_int4.kernels._common import MAX_OFFSET, row_slices

    assert row_slices(4096, 4096, 151936) == [(0, 4096)]
    slices = row_slices(20000, 4096, 151936)  # a 151k-vocabulary lm_head over 20k tokens
    assert slices == [(0, 14080), (14080, 20000)] and 14080 * 151936 <= MAX_OFFSET + 1
    for m, span in ((10**6, 18944), (3, 2**30), (777, 5 * 10**6)):
        s = row_slices(m, span)
        assert s[0][0] == 0 and s[-1][1] == m and all(a[1] == b[0] for a, b in zip(s, s[1:]))
        assert all((m1 - m0) * span <= MAX_OFFSET + 1 for m0, m1 in s)


@pytest.mark.parametrize("op", ["w4a16", "w4a8"])
def test_gemms_past_32_bit_offsets_run_in_row_slices(op, monkeypatch):
    """With the offset limit lowered to 20 output rows, a 70-row prefill runs as 4 launches on row
    slices, giving the same bits as one launch (real calls slice only where M x N >= 2**31)."""
    from minicpm_int4.kernels import _common, w4a8, w4a16

    qweight, scales, zeros, gs = random_qweight(40, 128, 32, torch.float16, seed=3)
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(4)).half()
    bias = torch.randn(40, generator=torch.Generator().manual_seed(5)).half()
    x_q, s = ops.quantize_per_token_int8(x, backend="torch")

    def run():
        if op == "w4a16":
            return ops.w4a16_gemm(x, qweight, scales, zeros, bias, 32, backend="triton")
        return ops.w4a8_gemm(x_q, s, qweight, scales, zeros, bias, 32, torch.float16, backend="triton")

    whole = run()
    kernel_mod, name = (w4a16, "_w4a16_prefill_kernel") if op == "w4a16" else (w4a8, "_w4a8_gemm_kernel")
    kernel, launches = getattr(kernel_mod, name), []

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args[7])  # the slice's M (after x and the scale or qx and its scales)
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernel_mod, name, Counting())
    monkeypatch.setattr(_common, "MAX_OFFSET", 128 * 20)  # rows of K = 128 (x) and N = 40 (out): 20 rows
    sliced = run()
    assert launches == [20, 20, 20, 10] and torch.equal(whole, sliced)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n, k, group_size", [(70, 96, 32), (45, 192, 64), (33, 384, 128), (97, 1024, 128),
                                              (40, 200, -1), (17, 4304, -1)], ids=str)
def test_dequantize_triton_is_the_reference_weight(n, k, group_size, dtype):
    """The prefill-as-matmul path's weight: (q - z) * s rounded once, bit for bit the reference's, on N and K
    that the 32-row / 128-column tiles do not divide (every element written: torch.empty is poisoned)."""
    from minicpm_int4.kernels.w4a16 import dequantize_triton

    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=n + k)
    w = dequantize_triton(qweight, scales, zeros, gs)
    assert w.dtype == dtype and w.shape == (n, k)
    assert torch.equal(w, dequant(qweight, scales, zeros, gs, dtype))
    out = torch.full((n, k), float("nan"), dtype=dtype)  # into a given tensor: the same bits
    assert dequantize_triton(qweight, scales, zeros, gs, out=out) is out and torch.equal(out, w)
    for other in DTYPES:  # rounded once to another dtype, as the reference's out_dtype
        assert torch.equal(dequantize_triton(qweight, scales, zeros, gs, other), dequant(qweight, scales, zeros, gs, other))


def test_dequantize_triton_launches_in_row_slices_past_int32_offsets(monkeypatch):
    """A weight of 2**31 elements or more (its offsets would overflow int32) is written in row slices that
    each stay below; shown here by lowering the limit: slices of whole row tiles, the same bits."""
    from minicpm_int4.kernels import w4a16

    n, k, gs = 70, 256, 64
    qweight, scales, zeros, _ = random_qweight(n, k, gs, torch.float16, seed=5)
    launched = []
    monkeypatch.setattr(w4a16, "_w4a16_dequant_kernel", _Recording(w4a16._w4a16_dequant_kernel, "dq", launched))
    whole = w4a16.dequantize_triton(qweight, scales, zeros, gs)
    assert launched == ["dq"]
    real_cdiv, sizes = w4a16.cdiv, []
    monkeypatch.setattr(w4a16, "cdiv", lambda a, b: sizes.append(a) or real_cdiv(a, b))
    monkeypatch.setattr(w4a16, "_INT32_ELEMENTS", 20 * k)  # 20 rows' worth: slices of 64 rows (a row tile)
    assert torch.equal(w4a16.dequantize_triton(qweight, scales, zeros, gs), whole)
    assert sizes[0::2] == [64, 6] and len(launched) == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 128, -1], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("m", [17, 130], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("x_read", ["plain", "scaled-permuted"])
def test_prefill_as_dequant_and_matmul_matches_reference(m, group_size, dtype, x_read, monkeypatch):
    """M > 16 with the weight dequantized whole, then torch's matmul (what "auto" runs where the dispatch
    table has `triton-dq` faster): the fused prefill kernel is not launched, and the result is the
    reference's within its tolerance, bias, input scale and channel order included."""
    from minicpm_int4.kernels import w4a16

    n, k = SHAPES[group_size]
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=m + n + k)
    g = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    scale = perm = None
    xm = x
    if x_read == "scaled-permuted":
        scale, perm = random_input_scale(k, dtype, seed=m), torch.randperm(k, generator=g).to(torch.int32)
        xm = x[:, perm.long()] * scale
    launched = []
    for name in ("_w4a16_prefill_kernel", "_w4a16_dequant_kernel"):
        monkeypatch.setattr(w4a16, name, _Recording(getattr(w4a16, name), name, launched))
    with w4a16.dequant_prefill():
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton", input_scale=scale,
                           input_perm=perm)
    assert launched == ["_w4a16_dequant_kernel"]
    assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, bias, gs), xm, dequant(qweight, scales, zeros, gs, dtype))
    assert not w4a16.PREFILL_DEQUANT  # (the switch is the block's only)


@pytest.mark.parametrize("capability,wide", [(80, False), (86, False), (89, False), (90, True), (100, True), (120, False)])
def test_prefill_configs_offered_by_gpu(capability, wide, monkeypatch):
    """The prefill autotuner's configs per GPU (kernels/w4a16.py _prefill_prune): the 128 x 256 tile only where
    its accumulators fit - Hopper's wgmma, sm_100's tcgen05 - not on Ampere / Ada or consumer Blackwell
    (sm_120: mma.sync, where it spills as on sm_80, aot.py); fp32 layers their own small tiles. Tags kept
    beside the configs: Triton's on-disk autotuning cache rebuilds a config from its own attributes."""
    import triton

    from minicpm_int4.kernels import _common, w4a16

    monkeypatch.setattr(w4a16, "INTERPRET", False)
    configs = w4a16._prefill_configs()
    assert all(set(vars(c)) <= set(vars(triton.Config({}))) for c in configs)  # nothing of ours on them
    monkeypatch.setattr(_common, "target_capability", lambda device=None: capability)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in w4a16._prefill_prune(configs, {"DOT_FP32": False})}
    assert ((128, 256) in tiles) == wide and (128, 128) in tiles and (64, 64) in tiles
    fp32 = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in w4a16._prefill_prune(configs, {"DOT_FP32": True})}
    assert fp32 == {(bm, bn) for bm, bn, _, _ in w4a16.FP32_PREFILL_TILES}
