"""The CUDA W4A16 GEMV (csrc/w4a16_gemv.cu), its arithmetic and indexing run on the CPU.

tests/csrc/host_emu.cu compiles the kernel's per-thread code (csrc/w4a16_gemv_core.cuh) and
its launcher's choices (fast or general path, rows per block) for the host with nvcc, and runs
every block and thread in turn, with the warp shuffles and the cross-warp sum emulated in the
kernel's order. These tests compare that with reference.py under the derived GEMM tolerance, for
every instantiation (rows of x MT x rows per block R), both paths, every group size, bias or none
and a strided x. Every input buffer ends at an inaccessible page, so a read past its end (a row
past N, a chunk past K) kills the test run instead of passing unnoticed.

What is left to the GPU (tests/test_gpu.py): the shuffles and the mma themselves, the 16-byte
loads' alignment in hardware, the launch, and timing. Needs nvcc (the `emu` fixture, conftest.py).
"""
import pytest
import torch

from minicpm_int4.reference import w4a16_gemm_ref

from csrc_emu import guarded as _guarded
from helpers import assert_gemm_close, dequant, random_qweight

VALID_R = {mt: [r for r in (1, 2, 4, 8) if mt * r <= 8] for mt in range(1, 9)}


def _emulate(emu, x, qweight, scales, zeros, bias, group_size, rows=0, sms=132, kernel="gemv", warps=0):
    """The CUDA-core GEMV (rows = R, rows per block) or the tensor-core kernel (rows = N-tiles per
    block, warps per block); 0 = the launcher's own choice for `sms` SMs."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype)
    args = [x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            bias.data_ptr() if bias is not None else None, out.data_ptr()]
    dtype = 0 if x.dtype == torch.float16 else 1
    if kernel == "gemv":
        rc = emu.minicpm_int4_gemv_emulate(*args, m, n, k, group_size, x.stride(0), out.stride(0), dtype, rows, sms)
    else:
        rc = emu.minicpm_int4_mma_emulate(*args, m, n, k, group_size, x.stride(0), out.stride(0), dtype, rows, warps, sms)
    assert rc == 0, f"{kernel}: no instantiation for M={m} rows={rows} (rc {rc})"
    return out


# (N, K, group size as quantized (-1 = per channel)): which path the launcher takes and why
SHAPES = [
    (37, 8192, 128),   # fast path, 256 chunks: every thread has two, four chunks per group
    (19, 4160, 64),    # fast path, 130 chunks: two threads get a second chunk
    (11, 1056, 32),    # fast path, 33 chunks: most threads idle, one group per chunk
    (23, 2080, -1),    # fast path per channel (chunk_shift 30)
    (29, 1152, 96),    # general path: 96/32 is not a power of two
    (13, 1160, -1),    # general path: per channel with K % 32 = 8
    (17, 272, 16),     # general path: groups of 16
]


def _layer(n, k, group_size, dtype, seed):
    if group_size in (-1, 32, 64, 128):
        qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=seed)
    else:  # a group size quantize.py does not offer: random codes, scales and zero points
        g = torch.Generator().manual_seed(seed)
        from minicpm_int4.packing import pack_int4

        qweight = pack_int4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8))
        scales = (torch.rand(n, k // group_size, generator=g) * 0.01 + 1e-3).to(dtype)
        zeros = torch.randint(0, 16, (n, k // group_size), generator=g).to(dtype)
        gs = group_size
    return qweight, scales, zeros, gs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_gemv_emulation_matches_reference_every_instantiation(emu, shape, dtype):
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n + k)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    w = dequant(qweight, scales, zeros, gs, dtype)
    g = torch.Generator().manual_seed(k)
    for mt in range(1, 9):
        for r in VALID_R[mt]:
            x = _guarded(torch.randn(mt, k, generator=g).to(dtype))
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if (mt + r) % 2 else None
            y = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=r)
            assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 8, 11, 16, 19], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("sms", [1, 132], ids=["sms1", "sms132"])
def test_gemv_emulation_launcher_choices_and_strided_x(emu, m, sms, dtype):
    """M past 8 runs in slices of 8 with the launcher's own rows per block; x is a view whose rows
    are 8 elements longer than K (ldx != K)."""
    n, k = 45, 4096
    qweight, scales, zeros, gs = _layer(n, k, 128, dtype, seed=m)
    g = torch.Generator().manual_seed(100 + m)
    x_full = _guarded(torch.randn(m, k + 8, generator=g).to(dtype))
    x = x_full[:, :k]
    bias = torch.randn(n, generator=g).to(dtype)
    y = _emulate(emu, x, _guarded(qweight), _guarded(scales), _guarded(zeros), bias, gs, rows=0, sms=sms)
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, dequant(qweight, scales, zeros, gs, dtype))


def test_gemv_launcher_choices(emu):
    cs = emu.minicpm_int4_gemv_chunk_shift
    assert [cs(4096, 32), cs(4096, 64), cs(4096, 128), cs(4096, 4096)] == [0, 1, 2, 30]
    assert [cs(4096 + 8, 4096 + 8), cs(1152, 96), cs(272, 16), cs(4096, 8)] == [-1, -1, -1, -1]
    rpb = emu.minicpm_int4_gemv_rows_per_block
    # H100 (132 SMs): R = 8 needs ceil(N / 8) >= 528 blocks, i.e. N >= 4217
    assert [rpb(1, 4096, 132), rpb(1, 12288, 132), rpb(1, 768, 132), rpb(1, 100, 132)] == [4, 8, 1, 1]
    assert [rpb(2, 12288, 132), rpb(3, 12288, 132), rpb(5, 12288, 132), rpb(8, 12288, 132)] == [4, 2, 1, 1]
    assert [rpb(mt, 10 ** 6, 1) for mt in range(1, 9)] == [8, 4, 2, 2, 1, 1, 1, 1]


# Tensor-core kernel: (N, K, group size): N not a multiple of 16 or 32, chunk counts below and
# above the 8 warps of a block, pre-scaled (G = 32, 64) and post-scaled (G >= 128, per channel) weights
MMA_SHAPES = [
    (37, 4096, 128),   # 32 chunks: 4 per warp; post-scaled
    (19, 1024, 32),    # 8 chunks; a lane's 32 k = one group: pre-scaled
    (21, 1536, 64),    # 12 chunks: warps 0-3 get two; pre-scaled
    (23, 2048, -1),    # per channel: post-scaled, group shift 31
    (13, 3072, 256),   # post-scaled, a group spans two chunks
    (45, 640, 128),    # 5 chunks: three warps idle (eleven of 16)
    (17, 6144, 64),    # 48 chunks: 3 per warp of 16, 6 per warp of 8
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_mma_emulation_matches_reference(emu, shape, dtype):
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n * k)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    w = dequant(qweight, scales, zeros, gs, dtype)
    g = torch.Generator().manual_seed(n + 7)
    for m in (1, 3, 8, 9, 16):
        for tiles, warps in ((1, 8), (2, 8), (1, 16)):  # the instantiations the launcher has
            x = _guarded(torch.randn(m, k, generator=g).to(dtype))
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if (m + tiles + warps // 8) % 2 else None
            y = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps)
            assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [2, 17, 35], ids=lambda m: f"M{m}")
def test_mma_emulation_slices_and_strided_x(emu, m, dtype):
    """M past 16 runs in slices of 16 with the launcher's own tile count; x rows are 8 elements
    longer than K."""
    n, k = 40, 1024
    qweight, scales, zeros, gs = _layer(n, k, 128, dtype, seed=m)
    g = torch.Generator().manual_seed(200 + m)
    x = _guarded(torch.randn(m, k + 8, generator=g).to(dtype))[:, :k]
    bias = torch.randn(n, generator=g).to(dtype)
    for sms in (1, 132):  # 2 tiles x 8 warps; 1 tile x 16 warps
        y = _emulate(emu, x, _guarded(qweight), _guarded(scales), _guarded(zeros), bias, gs, rows=0, sms=sms, kernel="mma")
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x,
                          dequant(qweight, scales, zeros, gs, dtype))


def test_mma_launcher_choices(emu):
    ok, post, tiles = emu.minicpm_int4_mma_supported, emu.minicpm_int4_mma_post_scale, emu.minicpm_int4_mma_tiles_per_block
    warps = emu.minicpm_int4_mma_warps_per_block
    assert [ok(4096, 32), ok(4096, 128), ok(4096, 4096), ok(12288, 12288), ok(1152, 1152)] == [1, 1, 1, 1, 1]
    # K % 128 != 0, a group size that is not a power of two or below 32: the CUDA-core GEMV's
    assert [ok(4104, 4104), ok(4304, 4304), ok(4096, 96), ok(4096, 16), ok(4160, 64)] == [0, 0, 0, 0, 0]
    assert [post(4096, 32), post(4096, 64), post(4096, 128), post(4096, 256), post(4096, 4096)] == [0, 0, 1, 1, 1]
    # two 16-row tiles per block while ceil(N / 32) >= 2 blocks per SM (H100: 132 SMs)
    assert [tiles(4096, 132), tiles(8448, 132), tiles(12288, 132), tiles(64, 1)] == [1, 2, 2, 2]
    # 16 warps per block when one-tile blocks are fewer than the SMs (N < 16 * 132 = 2112 on an H100)
    assert [warps(1024, 1, 132), warps(2096, 1, 132), warps(2112, 1, 132), warps(4096, 1, 132), warps(512, 2, 1)] == [
        16, 16, 8, 8, 8]
    with pytest.raises(AssertionError, match="rc -1"):  # no instantiation with 2 tiles and 16 warps
        x = torch.randn(1, 1024).half()
        qweight, scales, zeros, gs = _layer(8, 1024, 128, torch.float16, seed=1)
        _emulate(emu, x, qweight, scales, zeros, None, gs, rows=2, kernel="mma", warps=16)
    with pytest.raises(AssertionError, match="rc -2"):  # the tensor-core kernel refuses what it cannot take
        x = torch.randn(1, 4160).half()
        qweight, scales, zeros, gs = _layer(8, 4160, 64, torch.float16, seed=1)
        _emulate(emu, x, qweight, scales, zeros, None, gs, kernel="mma")
