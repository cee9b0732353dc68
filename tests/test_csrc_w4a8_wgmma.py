"""The warpgroup-MMA W4A8 GEMM (csrc/w4a8_wgmma.cu, sm_90a) run on the CPU, bit for bit against reference.py.

tests/csrc/host_emu.cu runs the kernel's own code (csrc/w4a8_wgmma_core.cuh) block by block in the launch
order: every thread's 16-byte copies into the stage's buffer in the layout the descriptors describe (zero-filled
past M, N and K), every warpgroup's unpacking of W into the A registers (the two shared loads, the PRMT that
joins their halves, the zero point subtracted in the bytes), the wgmma emulated from the PTX ISA's layouts - A
from the 128 lanes' registers (CUTLASS's ALayout_64x32), x read through the 64-bit descriptor the kernel builds
(start, LBO and SBO decoded from its bit fields, no swizzle), the accumulators' CLayout_64x128 - then every
group's scaling and every store. Its fp32 arithmetic is the reference's, so the result must equal the
reference's bits, and the mma.sync kernel's (test_csrc_w4a8.py). Shared memory starts as 0xA5 bytes and the
output as NaN; every global input ends at an inaccessible page (csrc_emu.guarded).

What is left to the GPU (tests/test_gpu.py): the real wgmma (whether the hardware reads the layouts as the PTX
ISA says), the async proxy fence, cp.async's pipeline and the waits, and timing.
"""
import pytest
import torch

from minicpm_int4.reference import w4a8_gemm_ref, w4a8_tolerance

from test_csrc_w4a8 import CODE, _assert_reference_bits, _emulate, _inputs, emulation_args, extreme_products_stay_exact


def _emulate_wg(emu, x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype, ldo=None, fma=False, sms=3,
                block_tokens=128):
    """The kernel's persistent CTAs sized for `sms` SMs (3: every shape with more than 3 tiles has CTAs that
    work through several, their stage streams crossing tiles' boundaries), blocks of 128 or 64 tokens (0: the
    launcher's choice)."""
    ptrs, out, (m, n, k, ldo) = emulation_args(x_q, x_scale, qweight, scales, zeros, bias, out_dtype, ldo)
    rc = emu.minicpm_int4_w4a8_wgmma_emulate(*ptrs, m, n, k, gs, ldo, CODE[scales.dtype], CODE[out_dtype], int(fma),
                                             block_tokens, sms)
    assert rc >= 0, f"the kernel does not take K={k}, group_size={gs} (rc {rc})"
    grid, bm = divmod(rc, 256)
    assert bm == (block_tokens or emu.minicpm_int4_w4a8_wgmma_block_tokens(m, n, sms))
    assert grid == min(-(-m // bm) * -(-n // 128), sms)
    return out[:, :n]


# (M, N, K, group size as quantized (-1 = per channel)): what each exercises
SHAPES = [
    (1, 8, 128, 128),      # one token, 8 rows of W (one warp's half of them), one stage, one group
    (3, 130, 256, 64),     # N past one block by 2 rows (a second W block, 126 rows masked); 2 groups a stage
    (17, 72, 384, 32),     # a group per k-tile (4 a stage)
    (130, 40, 768, 128),   # M past one 128-token block by 2; 6 stages: every one of the 5 buffers, one reused
    (64, 200, 256, -1),    # per channel, K = 256: one group over two stages (the run-time path, wait 1 between)
    (33, 96, 4224, -1),    # per channel over a long K (33 stages): |acc| past 2**22, the one I2F rounding
    (7, 16, 768, 256),     # G = 256: two stages a group, 3 groups
    (2, 16, 128, -1),      # per channel with K = G = 128: groups of 4 k-tiles placed at compile time
    (20, 48, 160, 32),     # K % 128 = 32: the last stage holds one k-tile (one group), the rest skipped
    (5, 24, 320, 64),      # K % 128 = 64: the last stage holds one group of two k-tiles
    (129, 136, 384, 128),  # both M and N one past a block
    (19, 40, 4304, -1),    # per channel, K % 32 == 16 (SigLIP's MLP): rows of W 8-byte aligned (NARROW's 8-byte copies),
                           # a last stage of 2.5 k-tiles - its third half past K, zero in x and W
    (6, 24, 4160, -1),     # per channel, K % 128 = 64: a last stage of two k-tiles
    (3, 8, 48, -1),        # per channel, K = 48: one stage, its second k-tile half past K
]


@pytest.mark.parametrize("sz_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}")
def test_w4a8_wgmma_emulation_gives_the_reference_bits(emu, shape, sz_dtype):
    m, n, k, group_size = shape
    args = _inputs(m, n, k, group_size, sz_dtype, seed=m * 5 + n)
    _assert_reference_bits(_emulate_wg(emu, *args), *args)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}")
def test_w4a8_wgmma_64_token_blocks_give_the_reference_bits(emu, shape):
    # m64n64k32 tiles: x's stage half as wide (LBO = 1024 in its descriptors), 2 pieces of x a thread, 32
    # accumulators a lane, a ring of 8 buffers (K = 768 / 4224: stages past the ring); M = 130 / 129: 3 token blocks
    m, n, k, group_size = shape
    args = _inputs(m, n, k, group_size, torch.bfloat16, seed=m * 7 + n, bias=True)
    _assert_reference_bits(_emulate_wg(emu, *args, block_tokens=64), *args)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_w4a8_wgmma_emulation_bias_output_dtypes_and_the_mma_sync_kernels_bits(emu, out_dtype):
    # scales of one dtype, output and bias of another; and the same bits as the mma.sync kernel (which the
    # launcher takes instead on other GPUs and shapes): both are the reference's, operation for operation
    args = _inputs(19, 136, 256, 64, torch.bfloat16, seed=5, bias=True, out_dtype=out_dtype)
    y = _emulate_wg(emu, *args)
    _assert_reference_bits(y, *args)
    view = torch.int16 if y.element_size() == 2 else torch.int32
    assert torch.equal(y.view(view), _emulate(emu, *args).view(view))


def test_w4a8_wgmma_emulation_strided_output_and_many_blocks(emu):
    # 3 x 3 tiles in the grouped order, out with a row stride
    args = _inputs(300, 260, 256, 128, torch.float16, seed=11, bias=True)
    _assert_reference_bits(_emulate_wg(emu, *args, ldo=264), *args)


@pytest.mark.parametrize("block_tokens", [128, 64])
@pytest.mark.parametrize("sms", [1, 2, 4, 132])
def test_w4a8_wgmma_persistent_ctas_give_the_same_bits(emu, sms, block_tokens):
    # 3 x 3 tiles of 3 stages (K = 384, G = 64: two groups a stage) over 1, 2, 4 persistent CTAs (9, 5 or 4, 3 or 2
    # tiles each: the copies' stream, kAhead = 4 stages ahead in a ring of 5 buffers, crosses tiles' boundaries
    # mid-ring; 64-token blocks: 5 x 3 tiles, 7 stages ahead in a ring of 8) and over one CTA a tile: the
    # reference's bits from every schedule
    args = _inputs(300, 260, 384, 64, torch.bfloat16, seed=sms, bias=True)
    _assert_reference_bits(_emulate_wg(emu, *args, sms=sms, block_tokens=block_tokens), *args)


def test_w4a8_wgmma_emulation_extreme_products_stay_exact(emu):
    extreme_products_stay_exact(lambda *args: _emulate_wg(emu, *args))


def test_w4a8_wgmma_takes_what_it_says(emu):
    # groups of 32, 64 or a multiple of 128 dividing K, and per channel with K % 16 == 0 (the vision MLP's K = 4304,
    # K % 32 == 16, included); other group sizes (96, 144: multiples of 32 the mma.sync kernel takes) are its alone
    ok = emu.minicpm_int4_w4a8_wgmma_supported
    assert ok(4096, 128) and ok(4096, 64) and ok(4096, 32) and ok(4096, 4096) and ok(12288, 256) and ok(160, 32)
    assert ok(4304, 4304) and ok(160, 160) and ok(48, 48) and ok(272, 272)
    assert not ok(272, 16) and not ok(288, 96) and not ok(288, 144) and not ok(4096, 512 * 3) and not ok(256, 512)
    assert not ok(4312, 4312) and not ok(4304, 16)
    x_q, x_scale, qweight, scales, zeros, _, _, _ = _inputs(4, 16, 288, -1, torch.float16, seed=1)
    out = torch.empty(4, 16, dtype=torch.float16)
    for k, g in ((288, 96), (288, 144), (280, 280)):
        assert emu.minicpm_int4_w4a8_wgmma_emulate(x_q.data_ptr(), x_scale.data_ptr(), qweight.data_ptr(),
                                                   scales.data_ptr(), zeros.data_ptr(), None, out.data_ptr(),
                                                   4, 16, k, g, 16, 0, 0, 0, 0, 132) == -2
    assert emu.minicpm_int4_w4a8_wgmma_emulate(x_q.data_ptr(), x_scale.data_ptr(), qweight.data_ptr(),
                                               scales.data_ptr(), zeros.data_ptr(), None, out.data_ptr(),
                                               4, 16, 256, 256, 16, 0, 0, 0, 96, 132) == -2  # 96 tokens a block
    # everything it takes, the mma.sync kernel takes too (the launcher's fallback where the GPU has no sm_90a build)
    for k in range(16, 1100, 16):
        for g in (32, 64, 96, 128, 256, 384, k):
            if ok(k, g):
                assert emu.minicpm_int4_w4a8_supported(k, g), (k, g)


@pytest.mark.parametrize("bm", [128, 64])
def test_w4a8_wgmma_persistent_ctas_cover_every_tile_once(emu, bm):
    # min(tiles, SMs) CTAs; CTA c's tiles c, c + grid, ... walked by adds (TileWalk): together every tile once
    for m, n, sms in ((4096, 4096, 132), (1000, 130, 132), (129, 4096, 132), (17, 12288, 132), (4096, 768, 132),
                      (1024, 4608, 114), (300, 260, 4), (128, 128, 132), (65, 768, 132)):
        nbm, nbn = -(-m // bm), -(-n // 128)
        grid = emu.minicpm_int4_w4a8_wgmma_grid(bm, m, n, sms)
        assert grid == min(nbm * nbn, sms)
        tiles = [divmod(emu.minicpm_int4_w4a8_wgmma_tile(bm, m, cta, grid, t), 65536)
                 for cta in range(grid) for t in range(emu.minicpm_int4_w4a8_wgmma_cta_tiles(bm, m, n, cta, grid))]
        assert sorted(tiles) == [(i, j) for i in range(nbm) for j in range(nbn)], (m, n, sms)


def test_w4a8_wgmma_block_tokens_rule(emu):
    # 64 tokens a block where waves x a tile's cost (the static model: a 64-token tile at 400 / 518 of a 128-token
    # one's) comes out shorter: M <= 64 (a 128-token block half empty or more); grids under one wave either way
    # (768-wide layers at M = 1024: 48 tiles on 132 SMs, 96 of 64 tokens; 4096 x 4096 at M = 256: 64 / 128). 128
    # where halving the tiles adds a wave: 768-wide at M = 4096 (192 tiles, 2 waves, against 3), 3072 x 768 at
    # M = 1024 (192); and where the 128-token tiles fill their waves (4096 x 4096 at M = 1024 and 4096)
    bt = emu.minicpm_int4_w4a8_wgmma_block_tokens
    assert bt(1, 4096, 132) == 64 and bt(64, 12288, 132) == 64 and bt(33, 768, 132) == 64
    assert bt(1024, 768, 132) == 64 and bt(256, 4096, 132) == 64 and bt(1024, 1024, 132) == 64
    assert bt(4096, 768, 132) == 128 and bt(1024, 3072, 132) == 128 and bt(256, 12288, 132) == 128
    assert bt(4096, 4096, 132) == 128 and bt(1024, 4096, 132) == 128 and bt(4096, 12288, 132) == 128
    assert bt(65, 4096, 1) == 128 and bt(64, 4096, 1) == 64  # one SM: the tokens' blocks alone decide
    # the rule's choice is what the launcher runs: the same bits either way
    args = _inputs(70, 136, 256, 64, torch.float16, seed=3)
    y = _emulate_wg(emu, *args, sms=132, block_tokens=0)
    assert torch.equal(y.view(torch.int16), _emulate_wg(emu, *args, sms=132, block_tokens=128).view(torch.int16))


@pytest.mark.parametrize("shape", [(17, 72, 384, 32), (130, 40, 768, 128), (33, 96, 4224, -1), (7, 16, 768, 256)],
                         ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}")
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_w4a8_wgmma_fused_epilogue_within_the_derived_tolerance(emu, shape, out_dtype):
    # kernel=3: y = fma(float(acc_g), s_g, y) per group - one rounding where the reference has two, so not its bits
    # but within reference.w4a8_tolerance (each step within eps32 relative); the integer sums are the same. fp32
    # scales: with bf16 ones (8 significant bits) a group sum's product (at most 17 bits at G = 32) is exact, and
    # the fused and unfused results agree
    m, n, k, group_size = shape
    args = _inputs(m, n, k, group_size, torch.float32, seed=m + n, bias=True, out_dtype=out_dtype)
    x_q, x_scale, qweight, scales, zeros, bias, gs, _ = args
    y = _emulate_wg(emu, *args, fma=True)
    assert not y.isnan().any()
    y_ref = w4a8_gemm_ref(x_q, x_scale, qweight, scales, zeros, bias, gs, out_dtype)
    tol = w4a8_tolerance(x_q, x_scale, qweight, scales, zeros, gs, out_dtype, y_ref)
    err = (y.double() - y_ref.double()).abs()
    assert (err <= tol.double()).all(), f"worst {err.max().item():.3g} over tolerance {tol.max().item():.3g}"
    # an fp32 output shows the fused rounding: where there are groups to add, some outputs differ from the unfused
    # kernel's bits (else the fma path would not be the one that ran); one group (per channel) is y = fma(a, s, 0)
    if out_dtype == torch.float32 and gs < k:
        assert not torch.equal(y, _emulate_wg(emu, *args))


def test_w4a8_wgmma_switches_are_read_as_documented(tmp_path):
    # MINICPM_INT4_W4A8_WGMMA (the GPU suite's fallbacks): "0" turns the kernel off, "128" its 64-token blocks
    # (forcing them refused before anything touches the GPU, the launcher's choice kept to 128); anything else
    # turns nothing off. csrc/w4a8_wgmma.cu's own launcher, linked into a host program (no GPU: a launch that gets
    # past the switches stops where the sm_90a build is missing)
    import os
    import shutil
    import subprocess

    from csrc_emu import ROOT

    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_NVCC") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("needs nvcc")
    exe = str(tmp_path / "probe")
    cmd = [nvcc, "-std=c++17", "-O1", "-arch=sm_80", "-o", exe, os.path.join(ROOT, "tests", "csrc", "wgmma_switch_probe.cu"),
           os.path.join(ROOT, "csrc", "w4a8_wgmma.cu"), "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    def probe(value):
        env = {k: v for k, v in os.environ.items() if k != "MINICPM_INT4_W4A8_WGMMA"}
        if value is not None:
            env["MINICPM_INT4_W4A8_WGMMA"] = value
        out = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return dict(kv.split("=") for kv in out.stdout.split())

    missing = "cudaErrorNoKernelImageForDevice"
    for value in (None, "1", "64", ""):
        assert probe(value) == {"disabled": "0", "t64_disabled": "0", "launch64": missing, "launch128": missing,
                                "launch0": missing}, value
    assert probe("0") == {"disabled": "1", "t64_disabled": "0", "launch64": "cudaErrorNotPermitted",
                          "launch128": "cudaErrorNotPermitted", "launch0": "cudaErrorNotPermitted"}
    assert probe("128") == {"disabled": "0", "t64_disabled": "1", "launch64": "cudaErrorNotPermitted",
                            "launch128": missing, "launch0": missing}
