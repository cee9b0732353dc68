"""The CUDA W4A8 GEMM (csrc/w4a8_gemm.cu) run on the CPU, bit for bit against reference.py.

tests/csrc/host_emu.cu runs the kernel's own code (csrc/w4a8_gemm_core.cuh) block by block in the
launch order: every thread's 16-byte copies into the block's shared memory (zero-filled past M, N and
K), every warp's fragment loads, zero-point subtraction and int8 mma (emulated from the PTX fragment
layout, exact integers), every finished group's scaling and every store. The kernel does the
reference's fp32 operations in the reference's order (an exact int32 sum per group, float(acc) * s
rounded, added to y rounded, y * x_scale, + bias, one rounding to the output dtype), so its result
must equal the reference's in every bit - not merely lie within a tolerance. Shared memory starts as
0xA5 bytes and the output as NaN, so a fragment that feeds a stored output but was read from a byte no
copy wrote, or an output never stored, shows (pieces past M, N or K are zero-filled, but only feed
outputs that are not stored, or k-tiles that are skipped); every global input ends at an inaccessible
page (csrc_emu.guarded), so a copy past the end of x_q or W kills the run.

What is left to the GPU (tests/test_gpu.py, and the suite's compute-sanitizer stage): the real
mma.sync's fragment layout, cp.async (the 8-byte copies of W's rows when K % 32 == 16 included: here
every piece is one memcpy of its valid bytes) and the pipeline's waits and barriers, and timing.
"""
import pytest
import torch

from minicpm_int4.packing import pack_int4
from minicpm_int4.reference import w4a8_gemm_ref

from csrc_emu import guarded
from helpers import random_qweight

CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _inputs(m, n, k, group_size, sz_dtype, seed, bias=False, out_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    if m >= 3:
        x_q[1] = 0                                    # a zero row (the quantizer's scale-0 row)
        x_q[2] = torch.where(torch.rand(k, generator=g) < 0.5, 127, -127).to(torch.int8)  # |x| at its bound
    x_scale = torch.rand(m, generator=g) * 0.02 + 1e-4
    if group_size in (-1, 32, 64, 128):
        qweight, scales, zeros, gs = random_qweight(n, k, group_size, sz_dtype, seed=seed)
    else:  # a group size quantize.py does not offer: random codes, scales and zero points
        qweight = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
        scales = (torch.rand(n, k // group_size, generator=g) * 0.01 + 1e-3).to(sz_dtype)
        zeros = torch.randint(0, 16, (n, k // group_size), generator=g).to(sz_dtype)
        gs = group_size
    out_dtype = out_dtype or sz_dtype
    b = (torch.randn(n, generator=g) * 0.1).to(out_dtype) if bias else None
    return x_q, x_scale, qweight, scales, zeros, b, gs, out_dtype


def emulation_args(x_q, x_scale, qweight, scales, zeros, bias, out_dtype, ldo=None):
    """(pointer arguments, out, (m, n, k, ldo)) for an emulated W4A8 kernel: every input copied to end at an
    inaccessible page, out [M, ldo] filled with NaN."""
    m, k = x_q.shape
    n = qweight.shape[0]
    ldo = ldo or n
    out = torch.full((m, ldo), float("nan"), dtype=out_dtype)
    ins = [guarded(t) for t in (x_q, x_scale, qweight, scales, zeros)] + [None if bias is None else guarded(bias)]
    ptrs = [None if t is None else t.data_ptr() for t in ins] + [out.data_ptr()]
    return ptrs, out, (m, n, k, ldo)


def _emulate(emu, x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype, ldo=None, block_rows=128, sms=132):
    """The kernel with 128- or 64-row blocks (block_rows; 0: the launcher's choice for `sms` SMs)."""
    ptrs, out, (m, n, k, ldo) = emulation_args(x_q, x_scale, qweight, scales, zeros, bias, out_dtype, ldo)
    rc = emu.minicpm_int4_w4a8_emulate(*ptrs, m, n, k, gs, ldo, CODE[scales.dtype], CODE[out_dtype], block_rows, sms)
    assert rc in (64, 128) and (block_rows == 0 or rc == block_rows), \
        f"the kernel does not take K={k}, group_size={gs} (rc {rc})"
    return out[:, :n]


def _assert_reference_bits(y, x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype):
    y_ref = w4a8_gemm_ref(x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype)
    assert not y.isnan().any(), f"{int(y.isnan().sum())} outputs never stored (or NaN)"
    diff = y.view(torch.int16 if y.element_size() == 2 else torch.int32) != \
        y_ref.view(torch.int16 if y.element_size() == 2 else torch.int32)
    assert not diff.any(), (f"{int(diff.sum())} of {diff.numel()} outputs differ from the reference's bits; "
                            f"worst {(y.double() - y_ref.double()).abs().max().item():.3g}")


# (M, N, K, group size as quantized (-1 = per channel)): what each exercises
SHAPES = [
    (1, 8, 128, 128),      # one row, one n8 tile, one stage, one group
    (3, 130, 256, 64),     # N past one block by 2 rows (a second column block, 126 rows masked)
    (17, 72, 384, 32),     # a group per k-tile; 3 stages = the pipeline depth
    (130, 40, 512, 128),   # M past one block by 2; 4 stages: buffers reused
    (64, 200, 160, -1),    # per channel, K % 128 = 32: the last stage holds one k-tile
    (33, 96, 4160, -1),    # per channel over a long K: |acc| past 2**22 (I2F, not the magic convert)
    (5, 24, 288, 96),      # a group size quantize.py does not offer (a multiple of 32): groups followed at run time
    (7, 16, 768, 256),     # G = 256: two stages a group (run time), and per channel with K = G = 128 below
    (2, 16, 128, -1),
    (20, 48, 272, -1),     # per channel, K % 32 = 16: rows of W 8-byte aligned, the last k-tile half inside K
    (9, 40, 4304, -1),     # MiniCPM-V 4.6's vision MLP K (per channel: no group size divides it)
]


@pytest.mark.parametrize("sz_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}")
def test_w4a8_emulation_gives_the_reference_bits(emu, shape, sz_dtype):
    m, n, k, group_size = shape
    args = _inputs(m, n, k, group_size, sz_dtype, seed=m * 7 + n)
    _assert_reference_bits(_emulate(emu, *args), *args)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > 1], ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}")
def test_w4a8_emulation_64_row_blocks_give_the_same_bits(emu, shape):
    # the 4-warp blocks (64 rows: their own copy plan - 4 pieces of W a thread - and permute pass) compute
    # every output exactly as the 8-warp ones do: the same integers in the same order
    m, n, k, group_size = shape
    args = _inputs(m, n, k, group_size, torch.bfloat16, seed=m + 3 * n, bias=True)
    y64 = _emulate(emu, *args, block_rows=64)
    _assert_reference_bits(y64, *args)
    assert torch.equal(y64.view(torch.int16), _emulate(emu, *args, block_rows=128).view(torch.int16))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_w4a8_emulation_bias_and_output_dtypes(emu, out_dtype):
    # scales of one dtype, output and bias of another (w4a8_gemm's out_dtype)
    args = _inputs(19, 136, 256, 64, torch.bfloat16, seed=5, bias=True, out_dtype=out_dtype)
    _assert_reference_bits(_emulate(emu, *args), *args)


def test_w4a8_emulation_strided_output_and_many_blocks(emu):
    # 3 x 3 blocks in the grouped launch order (every block's tile from block_tile), out with a row stride
    args = _inputs(300, 260, 256, 128, torch.float16, seed=11, bias=True)
    _assert_reference_bits(_emulate(emu, *args, ldo=264), *args)


def extreme_products_stay_exact(emulate):
    """|x| = 127 against q - z = +-15 everywhere: the largest group sums (127 * 15 * 128 = 243840, inside the
    magic convert's 2**22) and, per channel over K = 8192, 15.6M: past fp32's 2**24 integers, where only
    the one int32 -> fp32 rounding may differ from the exact sum - as in the reference. emulate(*args) -> y."""
    k = 8192
    x_q = torch.full((2, k), 127, dtype=torch.int8)
    x_q[1] = -127
    q = torch.full((16, k), 15, dtype=torch.uint8)
    q[8:] = 0
    qweight = pack_int4(q)
    for gs in (128, k):
        scales = torch.full((16, k // gs), 0.5, dtype=torch.float16)
        zeros = torch.zeros(16, k // gs, dtype=torch.float16)
        zeros[8:] = 15  # q - z = -15 for the second half of the rows
        x_scale = torch.ones(2)
        args = (x_q, x_scale, qweight, scales, zeros, None, gs, torch.float32)
        y = emulate(*args)
        _assert_reference_bits(y, *args)
        assert y[0, 0].item() == pytest.approx(127 * 15 * k * 0.5, rel=1e-6)


def test_w4a8_emulation_extreme_products_stay_exact(emu):
    extreme_products_stay_exact(lambda *args: _emulate(emu, *args))


def test_w4a8_emulation_refuses_what_the_kernel_does_not_take(emu):
    x_q, x_scale, qweight, scales, zeros, _, gs, _ = _inputs(4, 16, 264, -1, torch.float16, seed=1)
    out = torch.empty(4, 16, dtype=torch.float16)
    for k, g in ((264, 264), (256, 48), (256, 16), (256, 512), (272, 16)):  # K % 16, G % 32, G % 32, G > K, G % 32
        assert emu.minicpm_int4_w4a8_supported(k, g) == 0
        assert emu.minicpm_int4_w4a8_emulate(x_q.data_ptr(), x_scale.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                             zeros.data_ptr(), None, out.data_ptr(), 4, 16, k, g, 16, 0, 0, 0, 132) == -2
    assert emu.minicpm_int4_w4a8_emulate(x_q.data_ptr(), x_scale.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                         zeros.data_ptr(), None, out.data_ptr(), 4, 16, 256, 32, 16, 0, 0, 96, 132) == -2
    assert emu.minicpm_int4_w4a8_supported(4096, 128) == 1 and emu.minicpm_int4_w4a8_supported(4304, 4304) == 1
    # the magic int32 -> fp32 convert only where a group's sum stays below 2**22 (127 * 15 * G)
    assert emu.minicpm_int4_w4a8_magic_convert(2048) == 1 and emu.minicpm_int4_w4a8_magic_convert(4096) == 0
    assert 127 * 15 * 2048 < 2**22 <= 127 * 15 * 4096
    # groups of 32 / 64 / 128 placed at compile time (1 / 2 / 4 k-tiles of a 4-k-tile stage); the rest at run time
    assert [emu.minicpm_int4_w4a8_static_group_tiles(4096, g) for g in (32, 64, 128, 256, 4096)] == [1, 2, 4, 0, 0]
    assert emu.minicpm_int4_w4a8_static_group_tiles(128, 128) == 0  # per channel: the run-time path


def test_w4a8_block_order_covers_every_tile_once(emu):
    # the grouped launch order (8 row blocks at a time) is a permutation of the output's tiles
    for m, n in ((4096, 4096), (1000, 130), (129, 4096), (17, 12288)):
        for rows in (128, 64):
            nbm, nbn = -(-m // rows), -(-n // 128)
            tiles = [divmod(emu.minicpm_int4_w4a8_block_tile(pid, m, n, rows), 65536) for pid in range(nbm * nbn)]
            assert sorted(tiles) == [(i, j) for i in range(nbm) for j in range(nbn)]


def test_w4a8_block_rows_rule(emu):
    # 128-row blocks unless they would be fewer than the SMs: a few hundred rows of x, or a narrow layer
    rows = lambda m, n, sms=132: emu.minicpm_int4_w4a8_block_rows(m, n, sms)  # noqa: E731
    assert rows(4096, 4096) == 128 and rows(4096, 768) == 128 and rows(1024, 4096) == 128   # 1024, 192, 256 blocks
    assert rows(1024, 768) == 64 and rows(256, 4096) == 64 and rows(17, 12288) == 64      # 48, 64, 96 blocks
    assert rows(1024, 768, sms=40) == 128
    # the launcher's own choice runs it: 1024 x 768 on 132 SMs in 64-row blocks
    args = _inputs(300, 200, 256, 128, torch.float16, seed=2)
    assert torch.equal(_emulate(emu, *args, block_rows=0, sms=132), _emulate(emu, *args, block_rows=64))


def test_ops_rule_is_the_kernels(emu):
    # ops.cuda_w4a8_supported (what QuantLinear and ops check before a launch) says what the launcher takes
    from minicpm_int4 import ops

    for k in range(8, 700, 8):
        for g in (16, 32, 48, 64, 96, 128, 256, k):
            assert ops.cuda_w4a8_supported(k, g) == bool(emu.minicpm_int4_w4a8_supported(k, g)), (k, g)


def test_ops_names_an_old_extension_and_an_unsupported_shape(monkeypatch):
    from minicpm_int4 import ops

    class OldExt:  # a _C built before the W4A8 kernel: w4a16_gemm and the quantizer only
        w4a16_gemm = quantize_per_token_int8 = object()

    monkeypatch.setattr(ops, "_cuda_ext", lambda: (OldExt(), None))
    with pytest.raises(RuntimeError, match="built from an older checkout, without the W4A8 kernel; rebuild"):
        ops._cuda_w4a8(4096, 128)

    class Ext(OldExt):
        w4a8_gemm = object()

    monkeypatch.setattr(ops, "_cuda_ext", lambda: (Ext(), None))
    assert isinstance(ops._cuda_w4a8(4304, 4304), Ext)
    with pytest.raises(ValueError, match=r"needs K % 16 == 0 .* got K=4300, group_size=4300 \(backend='triton'"):
        ops._cuda_w4a8(4300, 4300)
