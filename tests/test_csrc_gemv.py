"""The CUDA W4A16 GEMV (csrc/w4a16_gemv.cu), its arithmetic and indexing run on the CPU.

tests/csrc/host_emu.cu compiles the kernel's per-thread code (csrc/w4a16_gemv_core.cuh) and
its launcher's choices (fast or general path, rows per block) for the host with nvcc, and runs
every block and thread in turn, with the warp shuffles and the cross-warp sum emulated in the
kernel's order. These tests compare that with reference.py under the derived GEMM tolerance, for
every instantiation (rows of x MT x rows per block R), both paths, every group size, bias or none
and a strided x. Every input buffer ends at an inaccessible page, so a read past its end (a row
past N, a chunk past K) kills the test run instead of passing unnoticed.

With a layer's input scale (QuantConfig.input_scales) the kernels multiply it into x as they load it:
their result must be, bit for bit, what they give for torch's x * input_scale (the same sums in the
same order), and so within the GEMM tolerance of the reference. Likewise the tensor-core kernel reading
x through an act-order layer's channel order (input_perm) gives the bits it gives for x[:, input_perm].

What is left to the GPU (tests/test_gpu.py): the shuffles and the mma themselves, the 16-byte
loads' alignment in hardware, the launch, and timing. Needs nvcc (the `emu` fixture, conftest.py).
"""
import pytest
import torch

from minicpm_int4.reference import w4a16_gemm_ref

from csrc_emu import guarded as _guarded
from helpers import assert_gemm_close, dequant, random_input_scale, random_qweight

VALID_R = {mt: [r for r in (1, 2, 4, 8) if mt * r <= 8] for mt in range(1, 9)}


def _emulate(emu, x, qweight, scales, zeros, bias, group_size, rows=0, sms=132, kernel="gemv", warps=0,
             input_scale=None, input_perm=None, mode=0):
    """The CUDA-core GEMV (rows = R, rows per block) or the tensor-core kernel (rows = N-tiles per
    block, warps per block); 0 = the launcher's own choice for `sms` SMs. input_scale: [K] or None;
    input_perm (the tensor-core kernel only): int32 [K] or None; mode (the tensor-core kernel only):
    1 = the launcher's variant 3, two chunks of W requested ahead; 2 = variant 4, the ring in shared
    memory; 3 = that ring reading each slot one copy group early (a control)."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype)
    args = [x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            bias.data_ptr() if bias is not None else None, out.data_ptr()]
    dtype = 0 if x.dtype == torch.float16 else 1
    ms = None if input_scale is None else input_scale.data_ptr()
    if kernel == "gemv":
        rc = emu.minicpm_int4_gemv_emulate(*args, m, n, k, group_size, x.stride(0), out.stride(0), dtype, rows, sms, ms)
    else:
        rc = emu.minicpm_int4_mma_emulate(*args, m, n, k, group_size, x.stride(0), out.stride(0), dtype, rows, warps,
                                          sms, ms, None if input_perm is None else input_perm.data_ptr(), mode)
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
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_mma_two_chunks_ahead_gives_the_same_bits(emu, shape, dtype):
    """Variant 3 requests W two chunks ahead of the one it multiplies (a trip with none that far re-reads
    its own): the same chunks in the same order, so the bits of the default kernel, for every
    instantiation and every count of chunks per warp (0 - 6, the ring's ends included). Buffers end at
    an inaccessible page, so a chunk read past K fails here."""
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n * k + 1)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    g = torch.Generator().manual_seed(n + 11)
    for m in (1, 9):
        for tiles, warps in ((1, 8), (2, 8), (1, 16)):
            x = _guarded(torch.randn(m, k, generator=g).to(dtype))
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if m == 1 else None
            one = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps)
            two = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps, mode=1)
            assert torch.equal(two, one), (m, tiles, warps)
    x = torch.randn(1, k, generator=g).to(dtype)
    with pytest.raises(AssertionError, match="rc -3"):  # built for plain x only, as the launcher
        _emulate(emu, x, qweight, scales, zeros, None, gs, kernel="mma", mode=1, input_scale=torch.ones(k, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", MMA_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_mma_ring_in_shared_memory_gives_the_same_bits(emu, shape, dtype):
    """Variant 4 copies each lane's pieces of W four chunks ahead into a ring in shared memory (cp.async)
    and loads the scales and zero points as far ahead in registers: the same chunks multiplied in the same
    order, so the bits of the default kernel, for every instantiation and every count of chunks per warp
    (0 - 6: a warp with fewer chunks than slots, the ring's wrap, zero-filled copies past the last chunk).
    The emulation lands each copy only when the kernel's wait lets its group land, on a ring that starts
    poisoned, and the control (mode 3: one group too many left in flight) must come out wrong - a read of a
    slot before its copy landed does not pass unnoticed here."""
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n * k + 2)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    g = torch.Generator().manual_seed(n + 13)
    for m in (1, 3, 9, 16):
        for tiles, warps in ((1, 8), (2, 8), (1, 16)):
            x = _guarded(torch.randn(m, k, generator=g).to(dtype))
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if m % 2 else None
            one = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps)
            ring = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps, mode=2)
            assert torch.equal(ring, one), (m, tiles, warps)
    x = _guarded(torch.randn(1, k, generator=g).to(dtype))
    early = _emulate(emu, x, qweight, scales, zeros, None, gs, rows=1, kernel="mma", warps=8, mode=3)
    right = _emulate(emu, x, qweight, scales, zeros, None, gs, rows=1, kernel="mma", warps=8, mode=2)
    assert not torch.equal(early, right), "reading each slot a group early went unnoticed"
    with pytest.raises(AssertionError, match="rc -3"):  # built for plain x only, as the launcher
        _emulate(emu, x, qweight, scales, zeros, None, gs, kernel="mma", mode=2, input_perm=torch.arange(k, dtype=torch.int32))


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
    # with an input scale, M = 9..16 (two column blocks of x) never takes 16 warps: 128 registers spill
    for_launch = emu.minicpm_int4_mma_warps_for_launch
    assert [for_launch(16, 8, 1), for_launch(16, 9, 1), for_launch(16, 16, 0), for_launch(8, 16, 1)] == [16, 8, 16, 8]
    with pytest.raises(AssertionError, match="rc -1"):  # no instantiation with 2 tiles and 16 warps
        x = torch.randn(1, 1024).half()
        qweight, scales, zeros, gs = _layer(8, 1024, 128, torch.float16, seed=1)
        _emulate(emu, x, qweight, scales, zeros, None, gs, rows=2, kernel="mma", warps=16)
    with pytest.raises(AssertionError, match="rc -2"):  # the tensor-core kernel refuses what it cannot take
        x = torch.randn(1, 4160).half()
        qweight, scales, zeros, gs = _layer(8, 4160, 64, torch.float16, seed=1)
        _emulate(emu, x, qweight, scales, zeros, None, gs, kernel="mma")


def _scaled_pair(emu, x, qweight, scales, zeros, bias, gs, m, **kw):
    """The kernel with the input scale fused, and the same kernel given torch's x * m. The tensor-core
    kernel's launcher gives a scaled slice of 9..16 rows 8 warps, not 16 (mma_warps_for_launch):
    the unscaled run takes the same warps per slice, so that both sum in the same order."""
    fused = _emulate(emu, x, qweight, scales, zeros, bias, gs, input_scale=m, **kw)
    xm = (x * m).contiguous()
    if kw.get("kernel") != "mma" or not kw.get("warps"):
        return fused, _emulate(emu, _guarded(xm), qweight, scales, zeros, bias, gs, **kw)
    premultiplied = torch.empty_like(fused)
    for m0 in range(0, x.shape[0], 16):  # the launcher's slices
        rows = min(16, x.shape[0] - m0)
        warps = emu.minicpm_int4_mma_warps_for_launch(kw["warps"], rows, 1)
        premultiplied[m0:m0 + rows] = _emulate(emu, _guarded(xm[m0:m0 + rows]), qweight, scales, zeros, bias, gs,
                                               **{**kw, "warps": warps})
    return fused, premultiplied


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[4], SHAPES[6]], ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_gemv_emulation_input_scale_is_x_times_m(emu, shape, dtype):
    """Both paths (fast: 32-weight chunks; general: one word per step), every rows-of-x count."""
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n + k + 1)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    m = _guarded(random_input_scale(k, dtype, seed=k))
    g = torch.Generator().manual_seed(k + 5)
    for mt in range(1, 9):
        r = VALID_R[mt][-1]
        x = _guarded(torch.randn(mt, k, generator=g).to(dtype))
        bias = _guarded(torch.randn(n, generator=g).to(dtype)) if mt % 2 else None
        fused, pre = _scaled_pair(emu, x, qweight, scales, zeros, bias, gs, m, rows=r)
        assert torch.equal(fused, pre), f"MT={mt} R={r}: {int((fused != pre).sum())} outputs differ"
        assert_gemm_close(fused, w4a16_gemm_ref(x * m, qweight, scales, zeros, bias, gs), x * m,
                          dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [MMA_SHAPES[0], MMA_SHAPES[1], MMA_SHAPES[3], MMA_SHAPES[6]],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_mma_emulation_input_scale_is_x_times_m(emu, shape, dtype):
    """Post- and pre-scaled weights, one and two mma column blocks (M <= 8, 9..16), every
    instantiation, a strided x, and M past 16 in slices (the scale is the same for every slice)."""
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n * k + 1)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    m = _guarded(random_input_scale(k, dtype, seed=k + 1))
    g = torch.Generator().manual_seed(n + 11)
    for rows_of_x in (1, 5, 16, 19):
        for tiles, warps in ((1, 8), (2, 8), (1, 16)):
            x = _guarded(torch.randn(rows_of_x, k + 8, generator=g).to(dtype))[:, :k]
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if (rows_of_x + tiles) % 2 else None
            fused, pre = _scaled_pair(emu, x, qweight, scales, zeros, bias, gs, m, rows=tiles, kernel="mma",
                                      warps=warps)
            assert torch.equal(fused, pre), f"M={rows_of_x} tiles={tiles} warps={warps}: outputs differ"
            assert_gemm_close(fused, w4a16_gemm_ref(x * m, qweight, scales, zeros, bias, gs), x * m,
                              dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_emulation_input_scale_products_round_in_x_dtype(emu, dtype):
    """Values whose product with the scale needs rounding (and one that overflows): the fused
    kernels see torch's x * m bits, not the exact product - checked through a one-hot weight, so
    that y[:, j] is x[:, c] * m[c] * (q - z) * s with every factor exact except x * m."""
    n, k, c = 16, 256, 37
    q = torch.full((n, k), 8, dtype=torch.uint8)
    q[:, c] = 9                                  # q - z = 1 at column c, 0 elsewhere
    from minicpm_int4.packing import pack_int4

    qweight = _guarded(pack_int4(q))
    scales = _guarded(torch.ones(n, 2, dtype=dtype))
    zeros = _guarded(torch.full((n, 2), 8.0, dtype=dtype))
    m = torch.ones(k, dtype=dtype)
    m[c] = 1.0 + 2.0 ** -7                       # x * m needs rounding in both dtypes
    big = torch.finfo(dtype).max                 # times m: past the largest finite value, inf
    x = torch.tensor([1.0 + 2.0 ** -3 + 2.0 ** -6, 3.0 + 2.0 ** -5, big, -1.75], dtype=dtype)
    x = _guarded(torch.randn(4, k).to(dtype).index_put_((torch.arange(4), torch.full((4,), c)), x))
    m = _guarded(m)
    expect = (x * m)[:, c]                       # torch's product, rounded to the dtype
    exact = x[:, c].double() * m[c].double()
    assert expect[0] != exact[0] and expect[1] != exact[1] and expect[2].isinf(), "the test's products must round"
    for kernel, rows in (("gemv", 1), ("mma", 1)):
        y = _emulate(emu, x, qweight, scales, zeros, None, 128, rows=rows, kernel=kernel, input_scale=m)
        assert torch.equal(y[:, 0], expect), (kernel, y[:, 0], expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [MMA_SHAPES[0], MMA_SHAPES[1], MMA_SHAPES[3], MMA_SHAPES[6]],
                         ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_mma_emulation_input_perm_is_x_gathered(emu, shape, dtype):
    """The tensor-core kernel reading x through a channel order (an act-order layer's input_perm):
    bit for bit what it gives for torch's x[:, perm] - pre- and post-scaled weights, one and two mma
    column blocks, every instantiation, a strided x, M past 16 in slices - and so within the GEMM
    tolerance of the reference. The channel order ends at an inaccessible page."""
    n, k, group_size = shape
    qweight, scales, zeros, gs = _layer(n, k, group_size, dtype, seed=n * k + 3)
    qweight, scales, zeros = _guarded(qweight), _guarded(scales), _guarded(zeros)
    g = torch.Generator().manual_seed(n + 13)
    perm = _guarded(torch.randperm(k, generator=g).to(torch.int32))
    w = dequant(qweight, scales, zeros, gs, dtype)
    for rows_of_x in (1, 5, 16, 19):
        for tiles, warps in ((1, 8), (2, 8), (1, 16)):
            x = _guarded(torch.randn(rows_of_x, k + 8, generator=g).to(dtype))[:, :k]
            bias = _guarded(torch.randn(n, generator=g).to(dtype)) if (rows_of_x + tiles) % 2 else None
            fused = _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma", warps=warps,
                             input_perm=perm)
            xg = x[:, perm.long()].contiguous()
            gathered = torch.empty_like(fused)
            for m0 in range(0, rows_of_x, 16):  # the launcher's slices, each with its warps (as for a scale)
                rows = min(16, rows_of_x - m0)
                ws = emu.minicpm_int4_mma_warps_for_launch(warps, rows, 1)
                gathered[m0:m0 + rows] = _emulate(emu, _guarded(xg[m0:m0 + rows]), qweight, scales, zeros, bias, gs,
                                                  rows=tiles, kernel="mma", warps=ws)
            assert torch.equal(fused, gathered), f"M={rows_of_x} tiles={tiles} warps={warps}: outputs differ"
            assert_gemm_close(fused, w4a16_gemm_ref(xg, qweight, scales, zeros, bias, gs), xg, w)
    assert not torch.equal(fused, _emulate(emu, x, qweight, scales, zeros, bias, gs, rows=tiles, kernel="mma",
                                           warps=warps)), "the order must change the result"


def test_mma_emulation_refuses_an_input_scale_with_an_input_perm(emu):
    """No instantiation reads x through a channel order and multiplies an input scale in: the
    launcher refuses the pair (cudaErrorInvalidValue; the bindings gather x first, then scale)."""
    k = 1024
    qweight, scales, zeros, gs = _layer(16, k, 128, torch.float16, seed=5)
    x = torch.randn(2, k).half()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5)).to(torch.int32)
    with pytest.raises(AssertionError, match="rc -3"):
        _emulate(emu, x, qweight, scales, zeros, None, gs, kernel="mma", input_scale=random_input_scale(k, torch.float16, seed=5),
                 input_perm=perm)
