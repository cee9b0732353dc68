"""The W4A16 prefill GEMM on Hopper's warpgroup MMA (csrc/w4a16_wgmma.cu, sm_90a) run on the CPU against reference.py.

tests/csrc/host_emu.cu runs the kernel's own code (csrc/w4a16_wgmma_core.cuh) CTA by CTA in the kernel's order:
every thread's 16-byte copies into the ring of stages in the layout the descriptors describe (zero-filled past M and
N), every warpgroup's scales and zero points loaded a stage ahead, its dequantization of W into the A registers of
the set it is not multiplying (the PRMT that gathers a lane's bytes, the magic-number conversion, the zero point and
scale), the wgmma emulated from the PTX ISA's layouts - A from the 128 lanes' registers, x through the 64-bit
descriptor the kernel builds (start, LBO and SBO decoded from its bit fields, no swizzle), D's layout - over a stream
of stages that crosses tiles' boundaries (persistent CTAs, sized here for 3 SMs so that every shape with more than
3 tiles has CTAs that work through several), then every tile's store through shared memory. Shared memory starts as
0xA5 bytes, the output as NaN, every global input ends at an inaccessible page (csrc_emu.guarded).

What is left to the GPU (tests/test_gpu.py): the real wgmma (whether the hardware reads the layouts as the PTX ISA
says), the async-proxy fence, cp.async's pipeline and the waits, the overlap of one stage's wgmma with the next
stage's dequantization, and timing.
"""
import pytest
import torch

from minicpm_int4.reference import dequantize_ref, w4a16_gemm_ref

from csrc_emu import guarded
from helpers import assert_gemm_close, random_qweight

DTYPES = [torch.float16, torch.bfloat16]
CODE = {torch.float16: 0, torch.bfloat16: 1}


def _emulate(emu, x, qweight, scales, zeros, bias, gs, block_tokens=0, sms=3, ldo=None, split=0):
    """The kernel's CTAs for `sms` SMs, blocks of 128 / 256 tokens (0: the kernel's rule), split-K over `split` CTAs
    a tile (0: the kernel's rule, 1: none - persistent CTAs); x may be a row-strided view (its row stride is the
    kernel's ldx). Returns out [M, N]."""
    m, k = x.shape
    n = qweight.shape[0]
    ldo = ldo or n
    out = torch.full((m, ldo), float("nan"), dtype=x.dtype)
    rc = emu.minicpm_int4_w4a16_wgmma_emulate(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k, gs, x.stride(0), ldo, CODE[x.dtype],
        block_tokens, split, sms)
    assert rc >= 0, f"the kernel does not take K={k}, group_size={gs} (rc {rc})"
    grid, low = divmod(rc, 1024)
    bm, splits = low - low % 128, low % 128
    assert bm == (128 if split > 1 else block_tokens or emu.minicpm_int4_w4a16_wgmma_block_tokens(m, n, sms))
    assert splits == (split if split > 1 else emu.minicpm_int4_w4a16_wgmma_split_k(m, n, k, sms)
                      if split == 0 and bm == 128 else 1)
    tiles = -(-m // bm) * -(-n // 128)
    assert grid == (tiles * splits if splits > 1 else min(tiles, sms))
    assert torch.isnan(out[:, n:]).all(), "wrote past N in a row of out"
    return out[:, :n]


def _inputs(m, n, k, group_size, dtype, seed, bias=False):
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return (guarded(x), guarded(qweight), guarded(scales), guarded(zeros), None if b is None else guarded(b)), gs


def _check(y, x, qweight, scales, zeros, bias, gs):
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    assert_gemm_close(y, y_ref, x, dequantize_ref(qweight, scales, zeros, gs, out_dtype=x.dtype))


# (M, N, K, group size as quantized (-1 = per channel), tokens a block or 0): what each exercises
SHAPES = [
    (1, 8, 64, 64, 0),        # one token, 8 rows of W (half of one warp's 16), one stage, one group
    (3, 130, 128, 32, 0),     # N past one block by 2 rows (126 rows zero-filled); two groups a stage (G = 32)
    (17, 72, 384, 128, 0),    # a group over two stages; 6 stages - every buffer of the 128-token ring once
    (130, 40, 768, 64, 0),    # M past one 128-token block by 2; 12 stages: the ring of 6 buffers reused
    (64, 200, 256, -1, 0),    # per channel: one group over all 4 stages
    (129, 136, 384, 128, 0),  # both M and N one past a block: 4 tiles on 3 SMs (a CTA with two, its stream across)
    (33, 96, 4096, -1, 0),    # a long K (64 stages): 2**12 products in each fp32 sum
    (260, 24, 192, 64, 256),  # 256-token blocks (m64n256k16; a ring of 4): M past one by 4, a second block nearly empty
    (300, 264, 320, 32, 256), # 256-token blocks, G = 32, 3 W blocks x 2 token blocks on 3 SMs
    (5, 16, 64, -1, 256),     # 256-token blocks, one stage, per channel with K = G = 64
    (260, 300, 64, 64, 0),    # one stage a tile, 9 tiles on 3 SMs: every stage crosses into the next tile (copies,
                              # scales and dequantization a tile ahead of the epilogue)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}-T{s[4]}")
def test_w4a16_wgmma_emulation_matches_reference(emu, shape, dtype):
    m, n, k, group_size, bm = shape
    (x, qweight, scales, zeros, bias), gs = _inputs(m, n, k, group_size, dtype, seed=m * 3 + n, bias=m % 2 == 1)
    y = _emulate(emu, x, qweight, scales, zeros, bias, gs, block_tokens=bm)
    _check(y, x, qweight, scales, zeros, bias, gs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_w4a16_wgmma_dequantizes_the_reference_weight_bit_for_bit(emu, dtype, group_size):
    # x = rows of the identity: each output is one weight times 1 plus exact zeros - the kernel's dequantized
    # weight itself, which must be the reference's ((q - z) * s rounded once to x's dtype), every nibble position,
    # both halves of every A register, rows g and g + 8 of every warp, every k-tile of every stage
    n, k = 136, 256
    qweight, scales, zeros, gs = random_qweight(n, k, group_size, dtype, seed=group_size + 7)
    scales = scales * (1 + torch.rand(scales.shape, generator=torch.Generator().manual_seed(3))).to(dtype)  # odd bits
    x = torch.eye(k, dtype=dtype)
    y = _emulate(emu, guarded(x), guarded(qweight), guarded(scales.contiguous()), guarded(zeros), None, gs)
    w = dequantize_ref(qweight, scales, zeros, gs, out_dtype=dtype)
    assert torch.equal(y.view(torch.int16), w.t().contiguous().view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_w4a16_wgmma_emulation_strided_x_and_out(emu, dtype):
    # x a view with row stride K + 72 (the kernel's ldx), out with row stride N + 5 (not 16-byte aligned: the tile
    # leaves element by element) - the columns between untouched
    m, n, k = 37, 72, 320
    (_, qweight, scales, zeros, bias), gs = _inputs(m, n, k, 64, dtype, seed=11, bias=True)
    x = guarded(torch.randn(m, k + 72, generator=torch.Generator().manual_seed(12)).to(dtype))
    xv = x[:, :k]
    y = _emulate(emu, xv, qweight, scales, zeros, bias, gs, ldo=n + 5)
    _check(y, xv.contiguous(), qweight, scales, zeros, bias, gs)


@pytest.mark.parametrize("k,group_size", [(4304, 4304), (96, 32), (384, 96), (256, 16), (200, 8)])
def test_w4a16_wgmma_refuses_what_it_does_not_take(emu, k, group_size):
    # K % 64 != 0 (SigLIP's 4304, 96) or a group that is neither 32 nor a multiple of 64: the launcher's
    # cudaErrorInvalidValue, never a silent wrong answer
    assert emu.minicpm_int4_w4a16_wgmma_supported(k, group_size) == 0
    x = torch.zeros(4, k, dtype=torch.float16)
    q = torch.zeros(8, max(1, k // 8), dtype=torch.int32)
    s = torch.ones(8, max(1, k // group_size), dtype=torch.float16)
    out = torch.zeros(4, 8, dtype=torch.float16)
    rc = emu.minicpm_int4_w4a16_wgmma_emulate(x.data_ptr(), q.data_ptr(), s.data_ptr(), s.data_ptr(), None,
                                              out.data_ptr(), 4, 8, k, group_size, k, 8, 0, 0, 0, 132)
    assert rc == -2


def test_w4a16_wgmma_supported_shapes_cover_the_llm_layers(emu):
    # every LLM layer of MiniCPM-V 4.6, Llama3-V 2.5 and 2.6 at the package's default group of 128 (K: 768 .. 18944)
    for k in (768, 3072, 3584, 4096, 12288, 14336, 18944):
        for gs in (32, 64, 128, k):
            assert emu.minicpm_int4_w4a16_wgmma_supported(k, gs) == 1, (k, gs)


@pytest.mark.parametrize("m,n,sms,expect", [
    (64, 4096, 132, 128),     # M <= 128: one 128-token block
    (128, 14336, 132, 128),
    (4096, 4096, 132, 256),   # 32 x 32 = 1024 tiles of 128 (8 waves) vs 512 of 256 (4 waves): 256
    (4096, 14336, 132, 256),
    (256, 4096, 132, 128),    # 64 tiles of 128 (1 wave) vs 32 of 256 (1 wave, twice the time each): 128
    (1024, 768, 132, 128),    # 48 tiles vs 24: both one wave
])
def test_w4a16_wgmma_block_tokens_rule(emu, m, n, sms, expect):
    assert emu.minicpm_int4_w4a16_wgmma_block_tokens(m, n, sms) == expect


# Split-K (a tile a cluster of 2 / 4 / 8 CTAs, csrc/w4a16_wgmma_core.cuh split_k): each CTA of a cluster through its
# share of the k-blocks into its own shared memory (its partial tile, part_out), then each CTA's share of the tile
# summed over all of the cluster's partial tiles in rank order, + bias, rounded and stored (split_reduce).
# (M, N, K, group size (-1 = per channel), CTAs a tile): what each exercises
SPLIT_SHAPES = [
    (1, 8, 256, 64, 2),       # one token, 8 rows: 2 CTAs of 2 stages; pieces past N / M not stored
    (3, 130, 448, 32, 2),     # 7 stages split 3 / 4; G = 32 (two groups a stage); N past a block: 2 clusters
    (17, 72, 576, 64, 8),     # 9 stages over 8 CTAs (1 each, one with 2): a CTA's only stage is its tile's first
    (64, 264, 1024, 128, 4),  # 3 W blocks; a group over two stages, the splits' boundaries inside none
    (128, 40, 512, -1, 4),    # per channel: one group over all the CTAs' stages; a full 128-token block
    (130, 136, 768, 128, 2),  # M and N past a block: 4 tiles (clusters), a second token block of 2
    (33, 96, 4096, -1, 8),    # a long K: 8 CTAs x 8 stages, their sums of 512 products each added in fp32
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: f"M{s[0]}-N{s[1]}-K{s[2]}-G{s[3]}-S{s[4]}")
def test_w4a16_wgmma_split_k_matches_reference(emu, shape, dtype):
    m, n, k, group_size, split = shape
    (x, qweight, scales, zeros, bias), gs = _inputs(m, n, k, group_size, dtype, seed=m * 5 + k, bias=m % 2 == 1)
    y = _emulate(emu, x, qweight, scales, zeros, bias, gs, split=split, sms=132)
    _check(y, x, qweight, scales, zeros, bias, gs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("split", [2, 4, 8])
def test_w4a16_wgmma_split_k_keeps_the_reference_weight_bit_for_bit(emu, dtype, split):
    # x = identity rows: each output is one weight times 1 in one CTA's partial tile and exact zeros in the others', so
    # any piece summed from the wrong place (token, row or CTA) or rounded twice differs from the reference's weight
    n, k = 136, 512
    qweight, scales, zeros, gs = random_qweight(n, k, 64, dtype, seed=split)
    scales = scales * (1 + torch.rand(scales.shape, generator=torch.Generator().manual_seed(5))).to(dtype)
    x = torch.eye(k, dtype=dtype)[:130]  # two token blocks, the second of 2 tokens
    y = _emulate(emu, guarded(x.contiguous()), guarded(qweight), guarded(scales.contiguous()), guarded(zeros), None, gs,
                 split=split, sms=132)
    w = dequantize_ref(qweight, scales, zeros, gs, out_dtype=dtype)
    assert torch.equal(y.view(torch.int16), w.t()[:130].contiguous().view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_w4a16_wgmma_split_k_by_its_rule_strided_out(emu, dtype):
    # the rule on 132 SMs: 2 tiles -> 8 CTAs each; out with row stride N + 3 (not 8-byte aligned: element by element)
    m, n, k = 64, 136, 4096
    assert emu.minicpm_int4_w4a16_wgmma_split_k(m, n, k, 132) == 8
    (x, qweight, scales, zeros, bias), gs = _inputs(m, n, k, 128, dtype, seed=21, bias=True)
    y = _emulate(emu, x, qweight, scales, zeros, bias, gs, sms=132, ldo=n + 3)
    _check(y, x, qweight, scales, zeros, bias, gs)


@pytest.mark.parametrize("m,n,k,sms,expect", [
    (64, 4096, 4096, 132, 4),     # 32 tiles: x 4 = 128 CTAs on 132 SMs (x 8 would not fit)
    (256, 4096, 4096, 132, 2),    # 64 tiles: 2 CTAs each
    (64, 1024, 4096, 132, 8),     # 8 tiles (a KV projection): 8 each, 8 stages a CTA
    (64, 1024, 768, 132, 2),      # K = 768: 12 stages, at least 4 a CTA
    (600, 4096, 4096, 132, 1),    # 160 tiles: past the SMs, persistent CTAs
    (4096, 4096, 4096, 132, 1),
    (17, 8, 192, 132, 1),         # 3 stages: too few to share
    (64, 4096, 4096, 114, 2),     # an H100 PCIe's 114 SMs: 32 x 4 = 128 would not fit, 32 x 2 does
])
def test_w4a16_wgmma_split_k_rule(emu, m, n, k, sms, expect):
    assert emu.minicpm_int4_w4a16_wgmma_split_k(m, n, k, sms) == expect


@pytest.mark.parametrize("k,split,block_tokens", [(512, 3, 0), (512, 16, 0), (512, 2, 256), (128, 4, 0)])
def test_w4a16_wgmma_split_k_refusals(emu, k, split, block_tokens):
    # a split other than 1 / 2 / 4 / 8, split-K with 256-token blocks, or more CTAs than stages: refused, not run
    x = torch.zeros(4, k, dtype=torch.float16)
    q = torch.zeros(8, k // 8, dtype=torch.int32)
    s = torch.ones(8, k // 64, dtype=torch.float16)
    out = torch.zeros(4, 8, dtype=torch.float16)
    rc = emu.minicpm_int4_w4a16_wgmma_emulate(x.data_ptr(), q.data_ptr(), s.data_ptr(), s.data_ptr(), None,
                                              out.data_ptr(), 4, 8, k, 64, k, 8, 0, block_tokens, split, 132)
    assert rc == -2
