"""GPU tests: the same comparisons on MiniCPM-V's real layer shapes, compile and CUDA graphs.
Skipped without CUDA (conftest.py)."""
import os

import pytest
import torch

from minicpm_int4 import QuantConfig, QuantLinear, ops, patch_model
from minicpm_int4.reference import quantize_per_token_int8_ref, w4a16_gemm_ref, w4a8_gemm_ref

from helpers import assert_gemm_close, check_empty_batch, check_quantlinear_backend, dequant, random_qweight, w4a8_tolerance

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_empty", "compiled_triton")]


@pytest.fixture
def compiled_triton():
    """These tests are about the compiled kernels: under TRITON_INTERPRET=1 the Triton kernels would
    run in the interpreter on copies of the CUDA tensors (other tile configs, no inline PTX), so
    refuse rather than pass on the wrong thing."""
    if ops.triton_interpreter_active():
        pytest.fail("the gpu tests need the compiled Triton kernels, but TRITON_INTERPRET=1 is set: unset it")
# (N, K) of real layers: MiniCPM-V 4.6 LLM (Qwen3.5 4096 hidden) and vision (768), Llama-3-8B, Qwen2-7B
REAL_SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (1024, 4096), (2304, 768), (768, 3072),
               (14336, 4096), (4096, 14336), (18944, 3584), (3584, 18944), (4608, 3584)]


def _cuda_layer(n, k, gs, dtype):
    qweight, scales, zeros, g = random_qweight(n, k, gs, dtype, device="cuda")
    assert qweight.is_cuda and scales.is_cuda and zeros.is_cuda
    return qweight, scales, zeros, g


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("m", [1, 17])
def test_triton_w4a16_group_sizes(group_size, m):
    n, k = 1000, 1536
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton")
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x, dequant(qweight, scales, zeros, gs, x.dtype))


CUDA_VARIANTS = {"auto": 0, "gemv": 1, "mma": 2}  # bindings.cpp: CUDA-core GEMV, tensor-core kernel


@pytest.mark.parametrize("variant", list(CUDA_VARIANTS), ids=lambda v: v)
@pytest.mark.parametrize("m", [1, 2, 5, 8, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_extension_w4a16(m, dtype, variant):
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k = 4104, 4096  # N not a multiple of the block's rows
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    if variant == "auto":
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="cuda")
    else:
        y = torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, bias, gs, CUDA_VARIANTS[variant])
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("variant", [3, 4], ids=["ahead2", "ring"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_extension_lookahead_variants(dtype, variant):
    """Variant 3 (the tensor-core kernel requesting W two chunks ahead, the bench's `w4a16-cuda-ahead2`)
    and variant 4 (W copied four chunks ahead into a ring in shared memory, `w4a16-cuda-ring`) give
    variant 2's bits: the same chunks summed in the same order, for every block shape the launcher picks on
    this GPU (two tiles, one tile of 8 or of 16 warps), both column blocks of x, and K from 1 to 12 chunks a
    warp; with an input scale or a channel order they refuse, naming variant 2."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    c_ops = torch.ops.minicpm_int4_C
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    # 2 tiles; 1 x 8; 1 x 16 warps; 2 tiles with 12 chunks a warp (the ring's wrap, three times over)
    for n, k, group_size in ((64 * sms, 1024, 128), (4104, 2048, 32), (1000, 1536, -1), (64 * sms, 12288, 64)):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        bias = torch.randn(n, dtype=dtype, device="cuda")
        for m in (1, 5, 16, 17):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
            c_ops.w4a16_gemm_out(x, qweight, scales, zeros, bias, gs, y, variant)
            assert torch.equal(y, c_ops.w4a16_gemm(x, qweight, scales, zeros, bias, gs, 2)), (n, k, m)
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, dequant(qweight, scales, zeros, gs, dtype))
    with pytest.raises(RuntimeError, match=f"variant {variant} .* plain x only"):
        c_ops.w4a16_gemm(x, qweight, scales, zeros, None, gs, variant, torch.ones(k, dtype=dtype, device="cuda"))


@pytest.mark.parametrize("variant", ["gemv", "mma"])
@pytest.mark.parametrize("nk", REAL_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_cuda_extension_real_shapes(nk, variant):
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128 if k % 128 == 0 else -1, torch.bfloat16)
    if variant == "mma" and k % 128:
        pytest.skip("the tensor-core kernel needs K % 128 == 0")
    for m in (1, 4):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, None, gs, CUDA_VARIANTS[variant])
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x,
                          dequant(qweight, scales, zeros, gs, torch.bfloat16))


@pytest.mark.parametrize("m", [1, 3, 8, 13])
@pytest.mark.parametrize("nk", [(4104, 4096), (1000, 1544), (768, 3072)], ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_cuda_extension_poisoned_output(nk, m, group_size):
    """The CUDA kernel writes every output element: `out` is filled with NaN before each run.
    K = 1544 is not a multiple of 32 (the one-word-per-lane path); M = 13 spans two launches."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k = nk
    if group_size != -1 and k % group_size:
        pytest.skip("K not divisible by the group size")
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, torch.float16)
    variants = [1, 2] if k % 128 == 0 else [1]
    for variant in variants:
        for _ in range(2):  # fresh random inputs each run
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
            torch.ops.minicpm_int4_C.w4a16_gemm_out(x, qweight, scales, zeros, None, gs, out, variant)
            assert_gemm_close(out, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x,
                              dequant(qweight, scales, zeros, gs, x.dtype))


def test_cuda_extension_rejects_bad_inputs():
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    qweight, scales, zeros, gs = _cuda_layer(64, 256, 32, torch.float16)
    x = torch.randn(2, 256, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="fp16 or bf16"):
        torch.ops.minicpm_int4_C.w4a16_gemm(x.float(), qweight, scales, zeros, None, 32)
    with pytest.raises(RuntimeError, match="not divisible by group_size"):
        torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, None, 96)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        misaligned = torch.zeros(64 * 32 + 1, dtype=torch.int32, device="cuda")[1:].view(64, 32)  # 4-byte offset
        torch.ops.minicpm_int4_C.w4a16_gemm(x, misaligned, scales, zeros, None, 32)
    with pytest.raises(RuntimeError, match="tensor-core kernel needs K % 128"):
        q2, s2, z2, _ = _cuda_layer(64, 1544, -1, torch.float16)
        torch.ops.minicpm_int4_C.w4a16_gemm(torch.randn(1, 1544, dtype=torch.float16, device="cuda"), q2, s2, z2,
                                            None, 1544, 2)
    with pytest.raises(RuntimeError, match="variant must be"):
        torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, None, 32, 7)
    with pytest.raises(RuntimeError, match=r"the warpgroup-MMA prefill GEMM \(variant 5\) needs K % 64 == 0"):
        torch.ops.minicpm_int4_C.w4a16_gemm(torch.randn(20, 1544, dtype=torch.float16, device="cuda"), q2, s2, z2,
                                            None, 1544, 5)
    # a bad input scale or channel order (test_cuda_extension_input_scale_fused and _input_perm_read_with_x run good ones)
    c_ops, k = torch.ops.minicpm_int4_C, 256
    scale = torch.exp(torch.randn(k, device="cuda")).half()
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    with pytest.raises(RuntimeError, match=r"input_scale must have shape \[K=256\]"):
        c_ops.w4a16_gemm(x, qweight, scales, zeros, None, gs, 0, scale[:-8])
    with pytest.raises(RuntimeError, match="input_scale is Float but the activations are"):
        c_ops.quantize_per_token_int8(x, scale.float())
    with pytest.raises(RuntimeError, match="input_perm must be int32"):
        c_ops.w4a16_gemm(x, qweight, scales, zeros, None, gs, 0, None, perm.long())
    with pytest.raises(RuntimeError, match=r"input_perm must have shape \[K=256\]"):
        c_ops.quantize_per_token_int8(x, None, perm[:-8])


@pytest.mark.parametrize("variant", list(CUDA_VARIANTS), ids=lambda v: v)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_extension_input_scale_fused(dtype, variant):
    """The extension's decode kernels multiply a layer's input scale into their loads of x: the same
    bits as the same kernel given torch's x * m (the same sums in the same order; where the launcher
    splits K over fewer warps for a scaled 9..16-row slice, within the tolerance), at M = 1 and 16 with
    group size 32 (weights scaled before the mma), 5 and 17 (two launches) with 128 (after), and a
    scale view that is not 16-byte aligned (copied by the bindings). Also the quantizer's, strided x.
    Small shapes: the GPU suite runs this under compute-sanitizer."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    c_ops = torch.ops.minicpm_int4_C
    n, k = 1032, 2048  # N not a multiple of the blocks' rows
    for group_size, ms in ((32, (1, 16)), (128, (5, 17))):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        scale = torch.exp(torch.randn(k + 1, device="cuda")).to(dtype)[1:]  # 2 bytes past an aligned start
        bias = torch.randn(n, dtype=dtype, device="cuda")
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            if variant == "auto":
                y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="cuda", input_scale=scale)
            else:
                y = c_ops.w4a16_gemm(x, qweight, scales, zeros, bias, gs, CUDA_VARIANTS[variant], scale)
            xm = x * scale
            pre = c_ops.w4a16_gemm(xm, qweight, scales, zeros, bias, gs, CUDA_VARIANTS[variant])
            # bit for bit where both launches split K alike: a scaled 9..16-row slice takes 8 warps where
            # an unscaled one may take 16 (fewer one-tile blocks than SMs), which sums in another order
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            alike = variant == "gemv" or m <= 8 or (n + 15) // 16 >= sms or (n + 31) // 32 >= 2 * sms
            if alike:
                assert torch.equal(y, pre), f"G={group_size} M={m}: {int((y != pre).sum())} outputs differ"
            else:
                assert torch.equal(y[16:], pre[16:]), f"G={group_size} M={m}: the rows past 16 differ"
            assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, bias, gs), xm,
                              dequant(qweight, scales, zeros, gs, dtype))
    strided = torch.randn(9, k + 8, dtype=dtype, device="cuda")[:, :k]
    xq, s = c_ops.quantize_per_token_int8(strided, scale)
    xq_ref, s_ref = quantize_per_token_int8_ref(strided * scale)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


# fp16 for each variant, bf16 through "auto" (the emulation covers both dtypes in every instantiation):
# few cases, as the sanitizer stage runs them all
@pytest.mark.parametrize("variant,dtype", [("auto", torch.float16), ("auto", torch.bfloat16), ("gemv", torch.float16),
                                           ("mma", torch.float16)], ids=["auto-fp16", "auto-bf16", "gemv-fp16", "mma-fp16"])
def test_cuda_extension_input_perm_read_with_x(dtype, variant):
    """An act-order layer's channel order: the tensor-core kernel reads x through it, the GEMV's x is
    gathered by the bindings first, and so is a layer's with an input scale too - every way, the bits of
    the same kernel on torch's x[:, perm] (where the launches split K alike, as for the input scale),
    at M = 1, 5, 16, 17 with group sizes 32 and 128, a channel-order view that is not 16-byte aligned
    (copied), and the quantizer's three paths. Small shapes: the GPU suite runs this under compute-sanitizer."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    c_ops = torch.ops.minicpm_int4_C
    n, k = 1032, 2048
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    perm = torch.cat([torch.zeros(1, dtype=torch.int32, device="cuda"),
                      torch.randperm(k, device="cuda").to(torch.int32)])[1:]  # 4 bytes past an aligned start
    scale = torch.exp(torch.randn(k, device="cuda")).to(dtype)
    for group_size, ms in ((32, (1, 16)), (128, (5, 17))):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        bias = torch.randn(n, dtype=dtype, device="cuda")
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            xg = x[:, perm.long()]
            for with_scale in (False, True):
                msc = scale if with_scale else None
                if variant == "auto":
                    y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="cuda", input_scale=msc,
                                       input_perm=perm)
                else:
                    y = c_ops.w4a16_gemm(x, qweight, scales, zeros, bias, gs, CUDA_VARIANTS[variant], msc, perm)
                pre = c_ops.w4a16_gemm(xg, qweight, scales, zeros, bias, gs, CUDA_VARIANTS[variant], msc)
                # read through the order (tensor cores, no scale): a 9..16-row slice takes 8 warps where
                # the plain kernel may take 16, as with an input scale; gathered by the bindings: the same
                read = variant != "gemv" and not with_scale
                alike = not read or m <= 8 or (n + 15) // 16 >= sms or (n + 31) // 32 >= 2 * sms
                if alike:
                    assert torch.equal(y, pre), f"G={group_size} M={m} scale={with_scale}: {int((y != pre).sum())} differ"
                else:
                    assert torch.equal(y[16:], pre[16:]), f"G={group_size} M={m}: the rows past 16 differ"
                xe = xg * scale if with_scale else xg
                assert_gemm_close(y, w4a16_gemm_ref(xe, qweight, scales, zeros, bias, gs), xe,
                                  dequant(qweight, scales, zeros, gs, dtype))
    for kq in (2048, 18944, 1001) if variant == "auto" else ():  # the quantizer: registers, two reads, one by one
        pq = torch.randperm(kq, device="cuda").to(torch.int32)
        xq_in = torch.randn(3, kq, dtype=dtype, device="cuda")
        xq_in[1] = 0
        sq = torch.exp(torch.randn(kq, device="cuda")).to(dtype)
        for msc in (None, sq):
            xq, s = c_ops.quantize_per_token_int8(xq_in, msc, pq)
            xq_ref, s_ref = quantize_per_token_int8_ref(xq_in[:, pq.long()], msc)
            assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref), (kq, msc is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_extension_act_quant_every_path_small(dtype):
    """The CUDA activation quantizer's three paths - 16-byte pieces kept in registers (K = 2048), read
    twice (K = 18944 fp16 / bf16, 9000 fp32), element by element (K = 1001) - with and without an
    input scale, on a few rows: bit for bit against the reference. Small, so that the GPU suite's
    compute-sanitizer stage (which selects the `cuda_extension` tests) checks every path's accesses."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    for k in (2048, 18944 if dtype != torch.float32 else 9000, 1001):
        x = torch.randn(3, k, dtype=dtype, device="cuda")
        x[1] = 0  # a zero row: scale 0, x_q 0
        scale = torch.exp(torch.randn(k, device="cuda")).to(dtype)
        for m in (None, scale):
            xq, s = torch.ops.minicpm_int4_C.quantize_per_token_int8(x, m)
            xq_ref, s_ref = quantize_per_token_int8_ref(x, m)
            assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref), (k, m is not None)


@pytest.mark.parametrize("variant", [1, 2])
def test_cuda_extension_misaligned_x_is_copied(variant):
    """A view of x at an odd offset (not 16-byte aligned) is copied by the bindings, not refused."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    qweight, scales, zeros, gs = _cuda_layer(96, 512, 128, torch.float16)
    base = torch.randn(3 * 512 + 1, dtype=torch.float16, device="cuda")
    x = base[1:].view(3, 512)  # 2-byte offset
    y = torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, None, gs, variant)
    assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x,
                      dequant(qweight, scales, zeros, gs, torch.float16))


def test_references_give_the_same_bits_on_the_gpu_as_on_the_cpu():
    """reference.py is the specification on every device: run on CUDA tensors it must give the CPU's bits
    (torch divides by a Python number on CUDA as a multiplication by its reciprocal, and has no int64
    matmul there: the first bench on an H200 found both)."""
    x = torch.randn(300, 4096, dtype=torch.float16) * torch.rand(300, 1).half() * 10
    x[1] = 0
    xq, s = quantize_per_token_int8_ref(x)
    xq_gpu, s_gpu = quantize_per_token_int8_ref(x.cuda())
    assert torch.equal(xq_gpu.cpu(), xq) and torch.equal(s_gpu.cpu(), s)
    qweight, scales, zeros, gs = random_qweight(512, 4096, 128, torch.float16)
    bias = torch.randn(512, dtype=torch.float16)
    y = w4a8_gemm_ref(xq, s, qweight, scales, zeros, bias, gs, torch.float16)
    y_gpu = w4a8_gemm_ref(xq.cuda(), s.cuda(), qweight.cuda(), scales.cuda(), zeros.cuda(), bias.cuda(), gs,
                          torch.float16)
    assert torch.equal(y_gpu.cpu(), y)


@pytest.mark.parametrize("m,k", [(1, 4096), (17, 3584), (4096, 4096), (130, 18944)])
def test_triton_act_quant_bit_exact(m, k):
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    x[0, 3] = 3e4
    xq, s = ops.quantize_per_token_int8(x, backend="triton")
    xq_ref, s_ref = quantize_per_token_int8_ref(x)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m,k", [(17, 3584), (4096, 4096), (130, 18944)])
def test_act_quant_with_an_input_scale_bit_exact(m, k, dtype, backend):
    """A W4A8 layer's input scale: Triton and CUDA multiply it inside their pass (registers, and the
    two-read path at K = 18944); both give the bits of quantizing x * m."""
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    x[0, 3] = 3e3
    scale = torch.exp(torch.randn(k, device="cuda")).to(dtype)
    scale[3] = 1.5  # the outlier's channel: stays finite in fp16
    xq, s = ops.quantize_per_token_int8(x, backend=backend, input_scale=scale)
    xq_ref, s_ref = quantize_per_token_int8_ref(x * scale)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("m,k", [(1, 4096), (17, 3584), (4096, 4096), (130, 18944), (3, 1001)])
def test_cuda_act_quant_bit_exact(m, k, dtype):
    """csrc/act_quant.cu against the reference, every bit: register-cached rows, rows read twice
    (K = 18944), element-by-element rows (K = 1001), a zero row and an outlier."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    x[0, 3] = 3e4
    if m > 2:
        x[2] = 0
    xq, s = ops.quantize_per_token_int8(x, backend="cuda")
    xq_ref, s_ref = quantize_per_token_int8_ref(x)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)
    strided = torch.randn(m, k + 8, dtype=dtype, device="cuda")[:, :k]
    xq, s = torch.ops.minicpm_int4_C.quantize_per_token_int8(strided)
    xq_ref, s_ref = quantize_per_token_int8_ref(strided)
    assert torch.equal(xq, xq_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("nk", [(4096, 4096), (2304, 768), (14336, 4096)], ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("m", [17, 256])
def test_triton_w4a8_real_shapes(nk, m):
    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    x_q, s = quantize_per_token_int8_ref(x)
    y = ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, 128, torch.float16, backend="triton")
    y_ref = w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, torch.float16)
    tol = w4a8_tolerance(x_q, s, qweight, scales, zeros, gs, torch.float16, y_ref)
    assert ((y.double() - y_ref.double()).abs() <= tol).all()
    from minicpm_int4.kernels import w4a8

    with w4a8.flat_groups():  # the opt-in flat group loop (the bench's w4a8-triton-flat): the same bits
        assert torch.equal(ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, 128, torch.float16, backend="triton"), y)


# The CUDA W4A8 GEMM (csrc/w4a8_gemm.cu) does the reference's fp32 operations in its order after exact int32
# group sums, so it must give reference.w4a8_gemm_ref's bits (tests/test_csrc_w4a8.py checks its code on the CPU).
def _w4a8_cuda_bits(n, k, group_size, m, dtype, out_dtype=None, bias=True):
    out_dtype = out_dtype or dtype
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    x[0, k // 3] = 40.0  # an outlier row
    if m > 2:
        x[2] = 0         # a zero row: scale 0
    x_q, s = quantize_per_token_int8_ref(x)
    b = torch.randn(n, dtype=out_dtype, device="cuda") if bias else None
    torch.full((m * n + 4096,), float("nan"), dtype=torch.float32, device="cuda")  # freed into the cache: poison
    y = ops.w4a8_gemm(x_q, s, qweight, scales, zeros, b, gs, out_dtype, backend="cuda")
    y_ref = w4a8_gemm_ref(x_q, s, qweight, scales, zeros, b, gs, out_dtype)
    assert not y.isnan().any(), "outputs never written"
    assert torch.equal(y, y_ref), (n, k, group_size, m, dtype, int((y != y_ref).sum()))


@pytest.mark.parametrize("case", [(72, 272, -1, 3), (200, 384, 32, 17), (130, 4304, -1, 130), (264, 512, 128, 129),
                                  (40, 160, -1, 1)], ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a8_small(case):
    """Odd sizes (N, M past a 128-tile; K % 128 != 0; K % 32 == 16 per channel, whose W rows are copied 8
    bytes at a time): the reference's bits for fp16 and bf16 layers, an fp32 output. Small enough for
    the GPU suite's compute-sanitizer stage (-k cuda_extension)."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k, group_size, m = case
    for dtype in (torch.float16, torch.bfloat16):
        _w4a8_cuda_bits(n, k, group_size, m, dtype)
    _w4a8_cuda_bits(n, k, group_size, m, torch.bfloat16, out_dtype=torch.float32, bias=False)
    # both block shapes forced (the launcher picks 64-row blocks for grids this small): the same bits
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, torch.float16)
    x_q, s = quantize_per_token_int8_ref(torch.randn(m, k, dtype=torch.float16, device="cuda"))
    ys = [torch.ops.minicpm_int4_C.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, torch.float16, rows)
          for rows in (0, 64, 128)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[1], ys[2])
    assert torch.equal(ys[2], w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, torch.float16))


@pytest.mark.parametrize("m", [17, 300])
@pytest.mark.parametrize("nkg", [(4096, 4096, 128), (2304, 768, 128), (14336, 4096, 64), (4096, 14336, 32),
                                 (1152, 4304, -1), (18944, 3584, 128)], ids=lambda s: f"N{s[0]}-K{s[1]}-G{s[2]}")
def test_cuda_extension_w4a8_real_shapes(nkg, m):
    """M = 17 and 300 take the launcher's 64-row blocks on shapes whose 128-row grid is under the SM count, and
    128-row ones on the rest (N >= 14336 at M = 300 on an H100 / H200)."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    _w4a8_cuda_bits(*nkg, m, torch.float16)
    _w4a8_cuda_bits(*nkg, m, torch.bfloat16, bias=False)


def _hopper_wgmma_expected():
    """The suite builds an H100 / H200 for sm_90a (setup.py's default there): the wgmma kernel must then run."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return torch.cuda.get_device_capability() == (9, 0) and (archs is None or "9.0a" in archs)


def _w4a8_wgmma_kernels(case, tokens):
    """The warpgroup-MMA kernel (csrc/w4a8_wgmma.cu) forced (kernel=2) with `tokens` (128 or 64) tokens a block, and
    with 128: the launcher's choice (0) and the mma.sync kernel (1) - the reference's bits from each, the check that
    the hardware reads the layouts as tests/test_csrc_w4a8_wgmma.py's emulation does; kernel=3 (the fused epilogue)
    within the derived tolerance. Elsewhere than an sm_90a build on an H100 / H200: kernel=2 raises a clear error;
    under MINICPM_INT4_W4A8_WGMMA=0 (128: forced 64-token blocks) too - the GPU suite's switches."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k, group_size, m = case
    c_ops = torch.ops.minicpm_int4_C
    switch = os.environ.get("MINICPM_INT4_W4A8_WGMMA")
    for dtype in (torch.float16, torch.bfloat16):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        x[0, k // 3] = 40.0
        x_q, s = quantize_per_token_int8_ref(x)
        b = torch.randn(n, dtype=dtype, device="cuda")
        y_ref = w4a8_gemm_ref(x_q, s, qweight, scales, zeros, b, gs, dtype)
        if switch == "0" or (switch == "128" and tokens == 64):  # the switches (the suite sets them when these failed)
            with pytest.raises(RuntimeError, match=f"turned off by MINICPM_INT4_W4A8_WGMMA={switch}"):
                c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, b, gs, dtype, tokens, 2)
            # the launcher's choice: mma.sync, or the 128-token blocks
            assert torch.equal(c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, b, gs, dtype), y_ref)
            return
        if not _hopper_wgmma_expected():
            with pytest.raises(RuntimeError, match="wgmma kernel needs an H100 / H200 and an extension built for sm_90a"):
                c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, b, gs, dtype, tokens, 2)
            return
        torch.full((m * n + 4096,), float("nan"), dtype=torch.float32, device="cuda")  # freed into the cache: poison
        # (block_rows, kernel): wgmma's blocks of `tokens`, then with 128 the launcher's choice and mma.sync; fused last
        runs = ((tokens, 2),) + (((0, 0), (0, 1)) if tokens == 128 else ()) + ((tokens, 3),)
        ys = [c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, b, gs, dtype, rows, kern) for rows, kern in runs]
        assert not any(y.isnan().any() for y in ys), "outputs never written"
        for (rows, kern), y in zip(runs[:-1], ys[:-1]):
            assert torch.equal(y, y_ref), (case, dtype, rows, kern, int((y != y_ref).sum()))
        # kernel=3, the fused epilogue: not the reference's bits, within its derived tolerance
        tol = w4a8_tolerance(x_q, s, qweight, scales, zeros, gs, dtype, y_ref)
        assert ((ys[-1].double() - y_ref.double()).abs() <= tol.double()).all(), (case, dtype)
    with pytest.raises(RuntimeError, match=r"kernel must be 0 .*, 1 .*, 2 .* or 3 .*, got 4"):
        c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, dtype, 0, 4)


@pytest.mark.parametrize("tokens", [128, 64], ids=["t128", "t64"])
@pytest.mark.parametrize("case", [(264, 512, 128, 129), (72, 160, 32, 3), (136, 256, -1, 130), (40, 768, -1, 17),
                                  (200, 384, 64, 1), (24, 4304, -1, 5)], ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a8_wgmma_small(case, tokens):
    """Odd sizes (N, M past a tile; K % 128 != 0; per channel over 2 and 6 stages: the run-time groups, and with
    K % 32 == 16: W's rows 8-byte aligned, copied 8 bytes at a time, a last k-tile half past K), small
    enough for the GPU suite's compute-sanitizer stage (-k cuda_extension); its wgmma-smoke stage runs them first,
    then, should they fail, the t128 ones alone under MINICPM_INT4_W4A8_WGMMA=128 (the 64-token blocks off)."""
    _w4a8_wgmma_kernels(case, tokens)


@pytest.mark.parametrize("tokens", [128, 64], ids=["t128", "t64"])
@pytest.mark.parametrize("case", [(4096, 4096, 128, 4096), (4096, 4096, 128, 300), (2304, 768, 128, 1024),
                                  (14336, 4096, 64, 129), (4096, 14336, 32, 17), (18944, 3584, 128, 1),
                                  (1152, 4096, -1, 260), (1152, 4304, -1, 1024)],
                         ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a8_wgmma_real_shapes(case, tokens):
    _w4a8_wgmma_kernels(case, tokens)


def _w4a16_wgmma_check(case):
    """The warpgroup-MMA W4A16 prefill GEMM (csrc/w4a16_wgmma.cu) forced (variant 5) on fresh random data into a
    poisoned output: within the derived tolerance of the reference, the same bits again on a second run, and from
    the launcher's choice (variant 0) past 16 rows; x = rows of the identity gives the dequantized weight itself,
    which must be the reference's bit for bit (the check that the hardware reads A's registers and x's descriptor
    as tests/test_csrc_w4a16_wgmma.py's emulation does); an input scale and a channel order (applied to x by the
    bindings first) give the bits of torch's x[:, perm] * scale. Elsewhere than an sm_90a build on an H100 / H200,
    or under MINICPM_INT4_W4A16_WGMMA=0 (the GPU suite's switch), variant 5 raises a clear error."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    n, k, group_size, m = case
    c_ops = torch.ops.minicpm_int4_C
    switch = os.environ.get("MINICPM_INT4_W4A16_WGMMA")
    for dtype in (torch.float16, torch.bfloat16):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(n, dtype=dtype, device="cuda")
        if switch == "0":
            with pytest.raises(RuntimeError, match="turned off by MINICPM_INT4_W4A16_WGMMA=0"):
                c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 5)
            return
        if not _hopper_wgmma_expected():
            with pytest.raises(RuntimeError, match="needs a GPU that runs the extension's sm_90a build"):
                c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 5)
            return
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        c_ops.w4a16_gemm_out(x, qweight, scales, zeros, b, gs, y, 5)
        w = dequant(qweight, scales, zeros, gs, dtype)
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, b, gs), x, w)
        assert torch.equal(c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 5), y), "not deterministic"
        if m > 16:
            assert torch.equal(c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 0), y), "variant 0 past 16 rows"
        y6 = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        c_ops.w4a16_gemm_out(x, qweight, scales, zeros, b, gs, y6, 6)  # a tile a CTA, whatever the split rule says
        assert_gemm_close(y6, w4a16_gemm_ref(x, qweight, scales, zeros, b, gs), x, w)
        eye = torch.eye(k, dtype=dtype, device="cuda")[: min(k, 512)]
        wt = c_ops.w4a16_gemm(eye, qweight, scales, zeros, None, gs, 5)
        assert torch.equal(wt, w[:, : eye.shape[0]].t().contiguous()), "the dequantized weight's bits"
        perm = torch.randperm(k, device="cuda").to(torch.int32)
        scale = torch.exp(torch.randn(k, device="cuda")).to(dtype)
        ys = c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 5, scale, perm)
        assert torch.equal(ys, c_ops.w4a16_gemm(x[:, perm.long()] * scale, qweight, scales, zeros, b, gs, 5))


@pytest.mark.parametrize("case", [(264, 512, 128, 129), (72, 192, 32, 3), (136, 256, -1, 300), (40, 640, 64, 17),
                                  (2040, 256, 128, 2000)], ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a16_wgmma_small(case):
    """Odd sizes: N and M past a tile, two groups a stage (G = 32), per channel, 10 stages (the 6-buffer ring
    reused), and a grid the launcher gives 256-token blocks (m64n256k16) with both edges partial - small enough for
    the GPU suite's compute-sanitizer stage (-k cuda_extension); its wgmma-smoke stage runs them first and turns the
    kernel off for the rest of the suite should they fail (MINICPM_INT4_W4A16_WGMMA=0)."""
    _w4a16_wgmma_check(case)


@pytest.mark.parametrize("case", [(1024, 4096, 128, 64), (4096, 4096, 128, 3), (264, 768, 32, 17), (136, 4096, -1, 130),
                                  (72, 2048, 64, 1)], ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a16_wgmma_split_small(case):
    """Split-K (csrc/w4a16_wgmma_core.cuh split_k): grids under one wave of tiles on an H100 / H200 - a KV projection
    at 64 tokens (8 tiles: 8 CTAs each), a 4096-wide layer at 3 (32 tiles: 4, or 2 on an H100 PCIe's 114 SMs), G = 32
    with 12 stages (2), per channel past a block both ways (8), one token (8) - each tile a thread block cluster whose
    CTAs add their partial sums through distributed shared memory. The launcher's plan (_C.w4a16_wgmma_splits) splits
    them; the output poisoned first is within the reference's tolerance, deterministic (the partials added in rank
    order whichever CTA finishes first), within it of the unsplit kernel (variant 6), and x = identity rows gives the
    reference's dequantized weight bit for bit. Under MINICPM_INT4_W4A16_WGMMA_SPLIT=0 (the GPU suite's switch,
    should these fail) the plan is 1 and variant 5 is variant 6. Its own stage of the suite (wgmma16-split-smoke) runs
    them after the unsplit kernel's (wgmma16-smoke, with the split off)."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    if not _hopper_wgmma_expected() or os.environ.get("MINICPM_INT4_W4A16_WGMMA") == "0":
        pytest.skip("the warpgroup-MMA prefill GEMM does not run here (test_cuda_extension_w4a16_wgmma_small says why)")
    from minicpm_int4 import _C

    n, k, group_size, m = case
    c_ops = torch.ops.minicpm_int4_C
    off = os.environ.get("MINICPM_INT4_W4A16_WGMMA_SPLIT") == "0"
    for dtype in (torch.float16, torch.bfloat16):
        qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
        splits = _C.w4a16_wgmma_splits(m, n, k, gs, dtype == torch.bfloat16)
        assert splits == 1 if off else splits in (2, 4, 8), splits
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(n, dtype=dtype, device="cuda")
        y = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
        c_ops.w4a16_gemm_out(x, qweight, scales, zeros, b, gs, y, 5)
        w = dequant(qweight, scales, zeros, gs, dtype)
        y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, b, gs)
        assert_gemm_close(y, y_ref, x, w)
        for _ in range(3):
            assert torch.equal(c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 5), y), "not deterministic"
        y6 = c_ops.w4a16_gemm(x, qweight, scales, zeros, b, gs, 6)
        assert_gemm_close(y6, y_ref, x, w)
        if off:
            assert torch.equal(y6, y)
        eye = torch.eye(k, dtype=dtype, device="cuda")[torch.arange(m, device="cuda") * 7 % k]  # m rows, 1s spread
        wt = c_ops.w4a16_gemm(eye, qweight, scales, zeros, None, gs, 5)
        assert torch.equal(wt, w[:, torch.arange(m, device="cuda") * 7 % k].t().contiguous()), "the weight's bits"


@pytest.mark.parametrize("case", [(4096, 4096, 128, 4096), (12288, 4096, 128, 1024), (4096, 14336, 32, 300),
                                  (18944, 3584, 128, 17), (2304, 768, 64, 1024), (1152, 4096, -1, 260)],
                         ids=lambda c: f"N{c[0]}-K{c[1]}-G{c[2]}-M{c[3]}")
def test_cuda_extension_w4a16_wgmma_real_shapes(case):
    _w4a16_wgmma_check(case)


def test_cuda_extension_says_what_w4a16_runs_past_16_rows():
    """minicpm_int4._C.w4a16_prefill_kernel() (what `minicpm-int4 env` prints): wgmma on an sm_90a build on an
    H100 / H200, the decode kernel in slices elsewhere or under the suite's switch, saying why."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    from minicpm_int4 import _C

    what = _C.w4a16_prefill_kernel()
    if os.environ.get("MINICPM_INT4_W4A16_WGMMA") == "0":
        assert "MINICPM_INT4_W4A16_WGMMA=0" in what and not what.startswith("wgmma"), what
    elif not _hopper_wgmma_expected():
        assert "no sm_90a build" in what, what
    else:
        assert what.startswith("wgmma (warpgroup MMA, sm_90a)"), what
        split_off = os.environ.get("MINICPM_INT4_W4A16_WGMMA_SPLIT") == "0"
        assert ("MINICPM_INT4_W4A16_WGMMA_SPLIT=0" in what) == split_off, what


def test_cuda_extension_says_which_w4a8_kernel_it_takes():
    """minicpm_int4._C.w4a8_kernel() (what `minicpm-int4 env` prints): wgmma on an sm_90a build on an H100 / H200,
    with the GPU suite's switches named; mma.sync elsewhere, saying why."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    from minicpm_int4 import _C

    what, switch = _C.w4a8_kernel(), os.environ.get("MINICPM_INT4_W4A8_WGMMA")
    if switch == "0":
        assert what.startswith("mma.sync") and "MINICPM_INT4_W4A8_WGMMA=0" in what
    elif not _hopper_wgmma_expected():
        assert what.startswith("mma.sync (no sm_90a build"), what
    elif switch == "128":
        assert what.startswith("wgmma, 128-token blocks only"), what
    else:
        assert what.startswith("wgmma (warpgroup MMA, sm_90a)"), what


def test_auto_runs_each_cuda_pick_on_the_real_extension(monkeypatch):
    """What backend="auto" may pick among the extension's kernels (ops.W4A16_CUDA_VARIANTS, ops.W4A8_CUDA_ARGS),
    through ops on the real bindings: each W4A8 pick the reference's bits, forcing the wgmma kernel only with the
    block tokens the extension reports allowed here (ops._w4a8_wgmma_tokens, checked against this GPU and the
    suite's switch); each W4A16 pick its launcher variant's bits."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    switch = os.environ.get("MINICPM_INT4_W4A8_WGMMA")
    ops._w4a8_wgmma_tokens.cache_clear()
    tokens = ops._w4a8_wgmma_tokens(torch.cuda.current_device())
    if switch == "0" or not _hopper_wgmma_expected():
        assert tokens == frozenset()
    else:
        assert tokens == (frozenset({128}) if switch == "128" else frozenset({64, 128}))
    n, k, g, m = 264, 512, 128, 129
    qweight, scales, zeros, gs = _cuda_layer(n, k, g, torch.float16)
    x_q, s = quantize_per_token_int8_ref(torch.randn(m, k, dtype=torch.float16, device="cuda"))
    y_ref = w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, torch.float16)
    for pick, (rows, kernel) in ops.W4A8_CUDA_ARGS.items():
        if kernel == 2 and rows not in tokens:
            continue
        monkeypatch.setattr(ops, "resolve_backend", lambda *a, pick=pick, **kw: pick)
        y = ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, g, torch.float16, backend="auto")
        assert torch.equal(y, y_ref), pick
    x = torch.randn(4, 4096, dtype=torch.float16, device="cuda")
    qweight, scales, zeros, gs = _cuda_layer(1024, 4096, 128, torch.float16)
    ops.cuda_wgmma_w4a16_runs.cache_clear()
    wgmma_runs = ops.cuda_wgmma_w4a16_runs(torch.cuda.current_device())
    assert wgmma_runs == (_hopper_wgmma_expected() and os.environ.get("MINICPM_INT4_W4A16_WGMMA") != "0")
    for pick, (variant, _) in ops.W4A16_CUDA_VARIANTS.items():
        monkeypatch.setattr(ops, "resolve_backend", lambda *a, pick=pick, **kw: pick)
        y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="auto")
        if pick in ops.W4A16_WGMMA_CANDIDATES and not wgmma_runs:  # where the prefill GEMM does not run: Triton's
            monkeypatch.undo()
            assert torch.equal(y, ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton")), pick
            continue
        assert torch.equal(y, torch.ops.minicpm_int4_C.w4a16_gemm(x, qweight, scales, zeros, None, 128, variant)), pick


def test_cuda_extension_w4a8_wgmma_refuses_what_it_does_not_take():
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    # groups of 96 (a foreign checkpoint's; the package's quantizer makes 32 / 64 / 128 / per channel, all wgmma's):
    # the mma.sync kernel's alone
    gs = 96
    qweight = torch.randint(-2**31, 2**31 - 1, (64, 288 // 8), dtype=torch.int32, device="cuda")
    scales = (torch.rand(64, 288 // gs, device="cuda") * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (64, 288 // gs), device="cuda").half()
    x_q, s = quantize_per_token_int8_ref(torch.randn(20, 288, dtype=torch.float16, device="cuda"))
    with pytest.raises(RuntimeError, match="the wgmma kernel needs a group size of 32, 64 or a multiple of 128"):
        torch.ops.minicpm_int4_C.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, torch.float16, 0, 2)
    y = torch.ops.minicpm_int4_C.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, torch.float16)  # launcher: mma.sync
    assert torch.equal(y, w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, torch.float16))


def test_cuda_extension_w4a8_rejects_bad_inputs():
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    c_ops = torch.ops.minicpm_int4_C
    qweight, scales, zeros, gs = _cuda_layer(64, 264, -1, torch.float16)  # K % 16 == 8
    x_q = torch.randint(-127, 128, (20, 264), dtype=torch.int8, device="cuda")
    s = torch.rand(20, device="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs K % 16 == 0"):
        ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, torch.float16, backend="cuda")
    with pytest.raises(RuntimeError, match="needs K % 16 == 0"):
        c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, torch.float16)
    qweight, scales, zeros, gs = _cuda_layer(64, 256, 32, torch.float16)
    x_q = torch.randint(-127, 128, (20, 256), dtype=torch.int8, device="cuda")
    with pytest.raises(RuntimeError, match="x_scale must be fp32"):
        c_ops.w4a8_gemm(x_q, s.half(), qweight, scales, zeros, None, 32, torch.float16)
    with pytest.raises(RuntimeError, match="bias must be a contiguous tensor"):
        c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, torch.zeros(64, device="cuda"), 32, torch.float16)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        c_ops.w4a8_gemm(x_q, s, torch.cat([qweight.flatten(), qweight.flatten()[:1]])[1:].view(64, 32), scales, zeros,
                        None, 32, torch.float16)
    with pytest.raises(RuntimeError, match="out_dtype must be fp16, bf16 or fp32"):
        c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, 32, torch.int32)
    with pytest.raises(RuntimeError, match="block_rows must be 0 .*, 64 or 128, got 96"):
        c_ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, 32, torch.float16, 96)
    # a strided view of x_q is copied, not misread
    wide = torch.randint(-127, 128, (20, 272), dtype=torch.int8, device="cuda")
    view = wide[:, 16:]
    y = c_ops.w4a8_gemm(view, s, qweight, scales, zeros, None, 32, torch.float16)
    assert torch.equal(y, w4a8_gemm_ref(view, s, qweight, scales, zeros, None, 32, torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w4a8_cuda_quantlinear_and_graph(dtype):
    """QuantLinear(act='int8', backend='cuda'): decode rows on the CUDA W4A16 kernels, prefill rows through
    the CUDA quantizer and W4A8 GEMM (the reference's bits: the quantizer is exact too), and a CUDA-graph
    replay equal to the eager call."""
    if ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    torch.manual_seed(0)
    lin = torch.nn.Linear(3072, 1536, dtype=dtype, device="cuda")
    for m in (1, 16, 17, 300):
        check_quantlinear_backend(lin, 128, "int8", (m,), "cuda")
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=128, backend="cuda", act="int8"))
    ref = QuantLinear.from_linear(lin, QuantConfig(group_size=128, backend="torch", act="int8"))
    x = torch.randn(300, 3072, dtype=dtype, device="cuda")
    assert torch.equal(ql(x), ref(x))
    static_x = x.clone()
    ql(static_x)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = ql(static_x)
    static_x.copy_(torch.randn_like(x))
    g.replay()
    assert torch.equal(static_y, ql(static_x))


@pytest.mark.parametrize("which", ["4_6", "llama"])
def test_compile_fullgraph_patched_tiny_model(which):
    from minicpm_int4.tiny import build_native, build_remote_layout
    if which == "llama":
        model = build_remote_layout("llama", dtype=torch.float16).cuda()
        lm = model.llm
        fn = lambda ids: lm(input_ids=ids, use_cache=False).logits  # noqa: E731
    else:
        model = build_native("4_6", dtype=torch.float16, device="cuda")
        lm = model.model.language_model
        fn = lambda ids: lm(input_ids=ids, use_cache=False).last_hidden_state  # noqa: E731
    patch_model(model, QuantConfig(group_size=32), progress=False)
    ids = torch.tensor([[7, 8, 9, 10]], device="cuda")
    with torch.no_grad():
        eager = fn(ids)
        out = torch.compile(fn, fullgraph=True)(ids)
    # inductor may fuse the surrounding fp16 ops differently: compare at the fp16 rounding level
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)


def test_demo_on_gpu(capsys, tmp_path):
    """The README's first command where a GPU is present: the tiny model patched onto the compiled
    kernels (fp16, backend "auto"), generation, and the timings only a GPU run prints."""
    import json
    import math

    from minicpm_int4.cli import main

    out_json = tmp_path / "demo.json"
    assert main(["demo", "--size", "tiny", "--new-tokens", "4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "device cuda" in out and "forward (prompt + image) on" in out
    d = json.loads(out_json.read_text())
    assert d["fp_ms"] > 0 and d["int4_ms"] > 0 and math.isfinite(d["logits_rel_err"])
    assert d["bytes_int4"] < d["bytes_fp"]


def test_profile_graphed_decode_is_one_cuda_graph_per_step():
    """What `minicpm-int4 profile` calls graphed: a patched tiny Llama's decode step compiled by
    transformers (static cache, mode="reduce-overhead") with no graph break and nothing inductor
    declines to capture in CUDA graphs, fp16 and int4."""
    from minicpm_int4.bench.e2e import run_profile

    res = run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=16, new_tokens=8, modes=["graphed"],
                      group_size=32, device=torch.device("cuda"), dtype=torch.float16)
    assert [r["weights"] for r in res["runs"]] == ["float16", "int4"]
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["graph_breaks"] == 0 and r["cudagraph_skips"] == 0, r
        assert r["generate_ms"] > 0 and r["peak_bytes"] > 0


def test_profile_cudagraph_mode_captures_the_decode_step():
    """What `minicpm-int4 profile` calls cudagraph: a tiny Llama's decode step captured by hand in one CUDA
    graph (fp16 and int4, backend="auto"), replayed for every step after the warm-up, and decoding the eager
    static-cache decode's tokens."""
    from minicpm_int4.bench.e2e import CHECK_TOKENS, WARMUP_STEPS, run_profile

    res = run_profile(models=["llama3-v2.5"], size="tiny", prompt_tokens=16, new_tokens=24, modes=["cudagraph"],
                      group_size=32, device=torch.device("cuda"), dtype=torch.float16)
    # int4-fused: q / k / v and gate / up one GEMM each (fuse_projections), captured and replayed the same way
    assert [r["weights"] for r in res["runs"]] == ["float16", "int4", "int4-fused"]
    assert res["runs"][2]["stacked_calls"] > 0 and res["runs"][2]["fusion_off"] == []
    for r in res["runs"]:
        assert "error" not in r, r
        assert r["emulated"] is False and r["capture_ms"] > 0 and r["graph_step_ms"] > 0
        assert r["replayed_steps"] == 24 - 1 - WARMUP_STEPS - 1
        assert r["tokens_same_as_eager"] == r["tokens_checked"] == CHECK_TOKENS, r
        assert r["peak_bytes"] > 0 and r["tokens_per_s"] > 0


@pytest.mark.parametrize("act,backend,m", [(None, "auto", 1), (None, "triton", 4), ("int8", "auto", 32), (None, "cuda", 1)])
def test_cuda_graph_capture(act, backend, m):
    # M = 4: the decode kernel's split-K counters (the layer's workspace) across replays
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    lin = torch.nn.Linear(4096, 4096, dtype=torch.float16, device="cuda")
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=128, act=act, backend=backend))
    x = torch.randn(m, 4096, dtype=torch.float16, device="cuda")
    y_eager = ql(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (autotuning) outside capture
            ql(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = ql(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y_graph, ql(x), rtol=0, atol=0)
    assert not torch.equal(y_graph, y_eager)
    assert torch.count_nonzero(ql.workspace) == 0


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_fused_projections_real_shapes_and_cuda_graph(backend):
    """fuse_projections on Llama-3-8B's attention (q 4096, k / v 1024 rows of 4096) and a bias on q only: one
    stacked GEMM a token, each layer's output within the reference's bound, captured in a CUDA graph and
    replayed on new inputs (the group's split-K counters left at zero), then layer by layer again at 17 rows."""
    import torch._dynamo  # (here, not below its first use: an import of torch in the body makes `torch` local)
    from torch import nn

    from minicpm_int4 import fuse_projections

    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    torch.manual_seed(0)
    parent = nn.Module()
    for name, n in (("q_proj", 4096), ("k_proj", 1024), ("v_proj", 1024)):
        lin = nn.Linear(4096, n, bias=name == "q_proj", dtype=torch.float16, device="cuda")
        setattr(parent, name, QuantLinear.from_linear(lin, QuantConfig(group_size=128, backend=backend)))
    layers = [parent.q_proj, parent.k_proj, parent.v_proj]
    (group,) = fuse_projections(parent).groups
    x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")

    def check(outs, x):
        for y, layer in zip(outs, layers):
            w = dequant(layer.qweight, layer.scales, layer.zeros, 128, torch.float16)
            ref = w4a16_gemm_ref(x, layer.qweight, layer.scales, layer.zeros, layer.bias, 128)
            assert_gemm_close(y, ref, x, w)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (autotuning) outside capture
            check([layer(x) for layer in layers], x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [layer(x) for layer in layers]
    assert group.calls == 3 and group.active
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        check(outs, x)
    assert torch.count_nonzero(group.workspace) == 0
    x17 = torch.randn(17, 4096, dtype=torch.float16, device="cuda")
    check([layer(x17) for layer in layers], x17)
    assert group.calls == 3

    # compiled with CUDA graph trees (transformers' compiled decode): one stacked GEMM in the graph, replayed on
    # new inputs with the stacked tensors as static inputs (fusion._mark_static), no recompile after the first
    def step(h):
        h = h * 2  # (the projections' input made inside the step, as a norm makes it)
        return [layer(h) for layer in layers]

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(4):
        x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            outs = [y.clone() for y in compiled(x)]
        check(outs, x * 2)
    assert group.in_graph and group.active and group._pending is None and group.calls == 3
    assert torch.count_nonzero(group.workspace) == 0


@pytest.mark.parametrize("asm", [True, False], ids=["ptx", "triton-ops"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_triton_dequantization_paths(group_size, dtype, asm, monkeypatch):
    # the inline-PTX dequantization (the default: decode kernel, M = 2..16, and the sm_90 prefill row
    # tile, M = 64) and its Triton-op twin (what the interpreter checks in CI) against the reference;
    # ragged N and K = 4304 (per channel only)
    from minicpm_int4.kernels import w4a16
    monkeypatch.setattr(w4a16, "PTX_DEQUANT", asm)
    n, k = (1000, 4304) if group_size == -1 else (1000, 4096)
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    for m in (2, 5, 16, 64):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        y = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton")
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("nk,group_size", [((4096, 4096), 128), ((14336, 4096), 128), ((1024, 4096), 64),
                                           ((1152, 4304), -1), ((4096, 14336), 32)], ids=str)
def test_packed_gemv_ptx_is_its_twin_and_its_specification(nk, group_size, monkeypatch):
    """The packed M = 1 GEMV (w4a16.GEMV_HALF2, "triton-h2") on real shapes - K split across programs or not, a
    per-channel K = 4304 (masked steps) -, x from fp16's largest to subnormal multiples: its inline PTX gives the
    bits of its Triton-op twin (what CI's interpreter holds to reference.gemv_half2_words), x read as pairs or as
    values (a layer's input scale); within reference.gemv_half2_tolerance; and per word, the PTX's sums are the
    specification's bit for bit (tests/test_gemv_half2.py's word kernel, compiled)."""
    from minicpm_int4.kernels import w4a16
    from minicpm_int4.packing import pack_int4
    from minicpm_int4.reference import gemv_half2_tolerance, gemv_half2_words

    from test_gemv_half2 import _words_kernel, _x_values

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, torch.float16)
    g = torch.Generator().manual_seed(n + k)
    x = _x_values(g, k)[None, :].cuda()
    scales = (scales.float() * 1e-3).half()  # y inside fp16 with x up to 65504
    scale = torch.exp(torch.randn(k, generator=g) * 0.5).half().cuda()
    workspace = ops.w4a16_workspace(n, "cuda")
    for kw in ({}, {"input_scale": scale}):
        with w4a16.half2_gemv():
            y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace, **kw)
            monkeypatch.setattr(w4a16, "PTX_DEQUANT", False)
            y_twin = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace, **kw)
            monkeypatch.setattr(w4a16, "PTX_DEQUANT", True)
        torch.cuda.synchronize()
        assert torch.equal(y, y_twin) and torch.count_nonzero(workspace) == 0
        xt = x * scale if kw else x
        y_ref = w4a16_gemm_ref(xt, qweight, scales, zeros, None, gs)
        assert torch.isfinite(y).all()
        assert ((y.double() - y_ref.double()).abs() <= gemv_half2_tolerance(xt, qweight, scales, zeros, gs, y_ref)).all()
    r, kwords = 64, 16
    q = torch.randint(0, 16, (r, kwords * 8), generator=g, dtype=torch.int32)
    zr = torch.randint(0, 16, (r, 1), generator=g).half()
    xr = _x_values(g, kwords * 8)[None, :]
    out = torch.empty(r, kwords, dtype=torch.float32, device="cuda")
    words = pack_int4(q)
    for pairs in (True, False):
        _words_kernel[(1,)](xr.cuda(), words.cuda(), zr.cuda(), out, *w4a16.GEMV_MASKS, KW=kwords, R=r, PAIRS=pairs,
                            ASM=True)
        assert torch.equal(out.cpu().view(torch.int32), gemv_half2_words(xr, words, zr, kwords * 8).view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nk,group_size", [((4096, 4096), 128), ((12288, 4096), 32), ((1000, 4304), -1),
                                           ((3584, 18944), 64)], ids=str)
def test_prefill_as_dequant_and_matmul(nk, group_size, dtype):
    """backend="auto"'s "triton-dq" prefill: the compiled dequantization kernel (inline PTX) writes the
    reference's weight bit for bit, and with cuBLAS's matmul the layer is within the reference's tolerance."""
    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    assert torch.equal(w4a16.dequantize_triton(qweight, scales, zeros, gs), dequant(qweight, scales, zeros, gs, dtype))
    bias = torch.randn(n, dtype=dtype, device="cuda")
    for m in (17, 4096):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        with w4a16.dequant_prefill():
            y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton")
        assert_gemm_close(y, w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("nk,group_size,dtype", [((4096, 4096), 128, torch.float16), ((1000, 4096), 64, torch.bfloat16)],
                         ids=["4096x4096-g128-fp16", "1000x4096-g64-bf16"])
def test_prefill_row_tile_either_side_of_the_dot(nk, group_size, dtype):
    """The prefill row tile as the dot's first operand (w4a16.PREFILL_W_LHS, the default: y.T = W @ x.T, the
    256-token tiles among its configs) and as its second (rhs_prefill, the bench's w4a16-triton-rhs rows),
    each against the reference, over M that leave partial tiles (N = 1000 too); one-hot rows of x give
    each path's dequantized weights, which must be the reference's bits. (Two cases: each new autotune
    key compiles every config, seconds each, in the suite's test stage.)"""
    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    bias = torch.randn(n, dtype=dtype, device="cuda")
    w = dequant(qweight, scales, zeros, gs, dtype)
    for m in (17, 4096):
        x = torch.randn(m, k, dtype=dtype, device="cuda")
        ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
        assert_gemm_close(ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton"), ref, x, w)
        with w4a16.rhs_prefill():
            assert_gemm_close(ops.w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend="triton"), ref, x, w)
    # (M = 17 with the bias: the autotune key and compiled kernels above again; the sum w + b rounded once)
    eye, expect = torch.eye(k, dtype=dtype, device="cuda")[:17], (w[:, :17].t().float() + bias.float()).to(dtype)
    assert torch.equal(ops.w4a16_gemm(eye, qweight, scales, zeros, bias, group_size, backend="triton"), expect)
    with w4a16.rhs_prefill():
        assert torch.equal(ops.w4a16_gemm(eye, qweight, scales, zeros, bias, group_size, backend="triton"), expect)


@pytest.mark.parametrize("act,backend", [(None, "triton"), ("int8", "triton"), (None, "cuda")])
def test_forward_has_no_host_sync(act, backend):
    # the ops' forward (checks, backend choice, launches) never waits for the GPU: decode steps queue
    # back to back. Warm-up first: Triton's autotuning on a new shape does synchronize.
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    lin = torch.nn.Linear(4096, 1024, dtype=torch.bfloat16, device="cuda")
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=128, act=act, backend=backend))
    xs = [torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda") for m in (1, 16, 64)]
    refs = [ql(x) for x in xs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [ql(x) for x in xs]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# few cases: each new (shape, dtype, M = 1 or not, fix-up or not) autotunes and compiles three configs
@pytest.mark.parametrize("nk,m,dtype", [((4096, 4096), 1, torch.float16), ((4096, 4096), 4, torch.bfloat16),
                                        ((1024, 4096), 16, torch.float16)], ids=["N4096-M1-fp16", "N4096-M4-bf16", "N1024-M16-fp16"])
def test_triton_splitk_in_one_launch(nk, m, dtype):
    # the decode kernel's in-launch split-K reduction (the last program of a row tile adds the
    # partials in a fixed order): on a GPU programs really race, so repeat it; every result must be
    # the two-launch path's bits, and the counters must be back at zero. M = 1 through the decode
    # kernel as the benchmark's `w4a16-triton-tc` rows run it.
    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    assert w4a16._decode_blocks(n, k, gs, x.device)[3] > 1
    workspace = ops.w4a16_workspace(n, "cuda")
    with w4a16.tensor_core_decode():
        two_launches = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton")
        outs = [ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton", workspace=workspace)
                for _ in range(50)]
    torch.cuda.synchronize()
    assert all(torch.equal(y, two_launches) for y in outs)
    assert torch.count_nonzero(workspace) == 0
    assert_gemm_close(outs[0], w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), x,
                      dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("nk,m,dtype", [((4096, 4096), 16, torch.float16), ((1024, 4096), 4, torch.bfloat16)],
                         ids=["N4096-M16-fp16", "N1024-M4-bf16"])
def test_triton_decode_long_trip(nk, m, dtype):
    """The decode kernel with two groups of 128 a loop trip (w4a16.DECODE_TRIP_WORDS = 32, the bench's
    w4a16-triton-trip32 rows) on the GPU, as QuantLinear calls it (split-K finished in the launch): within the
    reference's bound, counters back at zero, and where its plan splits K as the default's does, the
    default's bits (the dot steps add in the same order)."""
    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    workspace = ops.w4a16_workspace(n, "cuda")
    short = w4a16._decode_blocks(n, k, gs, x.device)
    y_short = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton", workspace=workspace)
    with w4a16.long_decode_trip():
        long = w4a16._decode_blocks(n, k, gs, x.device)
        y_long = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton", workspace=workspace)
    torch.cuda.synchronize()
    assert long[2] == 2 * short[2] and torch.count_nonzero(workspace) == 0
    if long[3] == short[3]:
        assert torch.equal(y_long, y_short)
    assert_gemm_close(y_long, w4a16_gemm_ref(x, qweight, scales, zeros, None, gs), x,
                      dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("nk,group_size,m,dtype", [((4096, 4096), 128, 16, torch.float16),
                                                    ((4096, 4096), 128, 4, torch.bfloat16),
                                                    ((1152, 4304), -1, 16, torch.float16)],
                         ids=["N4096-G128-M16-fp16", "N4096-G128-M4-bf16", "N1152-K4304-perchannel-M16-fp16"])
def test_triton_decode_fragment_order(nk, group_size, m, dtype):
    """The decode kernel's fragment order (w4a16.DECODE_FRAGMENT: the dequantized tile made in the tensor cores'
    register layout, the default on this GPU) against the natural order (the bench's w4a16-triton-staged rows) on
    the GPU: with integer x each dot step's sum is an exact integer in fp32 and the steps add in the same order, so
    both give the same bits; with random x, the reference's bound."""
    from minicpm_int4.kernels import _common, w4a16

    n, k = nk
    gs = k if group_size == -1 else group_size
    assert w4a16._decode_fragment(torch.device("cuda"), 64, 16, False, w4a16.DECODE_FRAGMENT) == (
        w4a16.FRAGMENT_ON_SM80 or _common.target_capability(torch.device("cuda")) >= 90)
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    workspace = ops.w4a16_workspace(n, "cuda")
    x_int = torch.randint(-8, 9, (m, k), device="cuda").to(dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda") * 4
    fragment = [w4a16.w4a16_gemm_triton(v, qweight, scales, zeros, None, gs, workspace, variant=None)
                for v in (x_int, x)]
    with w4a16._setting("DECODE_FRAGMENT", True):
        forced = [w4a16.w4a16_gemm_triton(v, qweight, scales, zeros, None, gs, workspace) for v in (x_int, x)]
    with w4a16.staged_decode():
        staged = [w4a16.w4a16_gemm_triton(v, qweight, scales, zeros, None, gs, workspace) for v in (x_int, x)]
    torch.cuda.synchronize()
    assert torch.count_nonzero(workspace) == 0
    assert torch.equal(forced[0], staged[0])
    for y, v in zip(fragment + forced, (x_int, x) * 2):
        assert_gemm_close(y, w4a16_gemm_ref(v, qweight, scales, zeros, None, gs), v,
                          dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("variant,m", [("triton-tc", 1), ("triton-prefetch", 1), ("triton-unsplit", 1), ("triton-h2", 1),
                                       ("triton-direct", 1), ("triton-trip32", 8), ("triton-staged", 8),
                                       ("triton-dq", 64), ("triton-rhs", 300)])
def test_triton_variant_per_call_is_its_switch(variant, m):
    """A Triton variant as backend="auto" runs it where the dispatch table picked it (w4a16_gemm_triton's
    `variant`: one setting changed for the call) gives the bits of the module switch the bench timed it under,
    with the layer's workspace (counters back at zero), on a MiniCPM-V 4.6 LLM shape."""
    from minicpm_int4.kernels import w4a16

    n, k = 4096, 4096
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    bias = torch.randn(n, dtype=torch.float16, device="cuda")
    workspace = ops.w4a16_workspace(n, "cuda")
    y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, bias, gs, workspace, variant=variant)
    with w4a16._variant_switch(variant):
        y_switch = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, bias, gs, workspace)
    torch.cuda.synchronize()
    assert torch.equal(y, y_switch) and torch.count_nonzero(workspace) == 0
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    if variant == "triton-h2":  # fp16 products: its own derived bound
        from minicpm_int4.reference import gemv_half2_tolerance

        assert ((y.double() - y_ref.double()).abs() <= gemv_half2_tolerance(x, qweight, scales, zeros, gs, y_ref)).all()
    else:
        assert_gemm_close(y, y_ref, x, dequant(qweight, scales, zeros, gs, torch.float16))


@pytest.mark.parametrize("nk,group_size,dtype,settings", [
    ((4096, 4096), 128, torch.float16, {}), ((12288, 4096), 32, torch.bfloat16, {}),
    ((4096, 4096), -1, torch.float16, {"GEMV_HALF2": True}), ((12288, 4096), 128, torch.float16, {"GEMV_HALF2": True}),
    ((4096, 4096), 128, torch.float16, {"GEMV_HALF2": True, "GEMV_PREFETCH": True}),
    ((4096, 4096), 64, torch.bfloat16, {"GEMV_PREFETCH": True})],
    ids=["split-g128", "unsplit-g32-bf16", "packed-per-channel", "packed-unsplit", "packed-prefetch",
         "prefetch-g64-bf16"])
def test_triton_gemv_direct_loads_give_the_gemvs_bits(nk, group_size, dtype, settings):
    # GEMV_DIRECT_LOADS on the GPU: x's words and the scales / zero points through the inline-PTX loads
    # (LD_V4_B32_PTX, LD_B16_PTX; the interpreter runs their tl.load twin), the default GEMV's bits in each path,
    # K split (the fixup's counters back at zero) or not
    import contextlib

    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    workspace = ops.w4a16_workspace(n, "cuda")
    assert w4a16._direct_x(x, None, None)
    with contextlib.ExitStack() as stack:
        for name, value in settings.items():
            stack.enter_context(w4a16._setting(name, value))
        y = w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace)
        with w4a16.direct_gemv():
            y_direct = [w4a16.w4a16_gemm_triton(x, qweight, scales, zeros, None, gs, workspace) for _ in range(3)]
    torch.cuda.synchronize()
    assert torch.count_nonzero(workspace) == 0
    for yd in y_direct:
        assert torch.equal(yd, y)


@pytest.mark.parametrize("nk,dtype", [((1024, 4096), torch.float16), ((4096, 4096), torch.bfloat16),
                                      ((768, 3072), torch.float16)], ids=["N1024-fp16", "N4096-bf16", "N768-K3072-fp16"])
def test_triton_gemv_splitk_in_one_launch(nk, dtype):
    # the M = 1 GEMV splits K where the rows alone give too few threads (a GQA k / v projection of 1024
    # rows on any GPU; 4096 rows on an H100 / H200), reduced in the same launch with the layer's
    # workspace: programs really race here, so repeat it; every result the two-launch path's bits,
    # counters back at zero, and K split or not, within the reference's tolerance
    from minicpm_int4.kernels import w4a16

    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, dtype)
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    split = w4a16._gemv_blocks(n, k // 8, x.device)[3]
    assert split > 1 or n != 1024
    workspace = ops.w4a16_workspace(n, "cuda")
    two_launches = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton")
    outs = [ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton", workspace=workspace)
            for _ in range(50)]
    with w4a16.unsplit_gemv():
        unsplit = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton", workspace=workspace)
    with w4a16.prefetch_gemv():  # the next step's words loaded ahead: the same products in the same order
        ahead = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton", workspace=workspace)
    torch.cuda.synchronize()
    assert torch.equal(ahead, outs[0])
    assert all(torch.equal(y, two_launches) for y in outs)
    assert torch.count_nonzero(workspace) == 0
    ref, w = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs), dequant(qweight, scales, zeros, gs, dtype)
    assert_gemm_close(outs[0], ref, x, w)
    assert_gemm_close(unsplit, ref, x, w)


# few variants: each new (dtype, shape) compiles the decode kernel's autotune configs once more
@pytest.mark.parametrize("m", [1, 16, 17])
@pytest.mark.parametrize("nk, group_size, dtype", [((4096, 4096), 128, torch.float16), ((4096, 4096), 128, torch.bfloat16),
                                                   ((1152, 4304), -1, torch.float16)], ids=lambda v: str(v))
def test_triton_w4a16_input_scale(nk, group_size, dtype, m):
    """A layer's input scale multiplied into the compiled kernels' loads of x (the GEMV, the
    tensor-core decode kernel with m as x.T's tile on sm_90 / as a column on sm_80, split-K in one
    launch; the prefill kernel's x tiles on sm_90, a separate pass before it on sm_80): against the
    reference on x * m."""
    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, group_size, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    scale = torch.exp(torch.randn(k, device="cuda")).to(dtype)
    workspace = ops.w4a16_workspace(n, "cuda")
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, group_size, backend="triton", workspace=workspace,
                       input_scale=scale)
    assert torch.count_nonzero(workspace) == 0
    xm = x * scale
    assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, None, gs), xm,
                      dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("fused", [True, None], ids=["fused", "default"])
def test_triton_w4a16_input_scale_prefill_at_4096_rows(fused, monkeypatch):
    """The prefill kernel with the scale in its x tiles (forced; the autotuner's 4096-row choice, e.g. the
    128x256 tile at 243 registers on sm_90a) and the default (a separate pass when compiled), at the M the
    benchmarks time, against the reference on x * m."""
    from minicpm_int4.kernels import w4a16

    monkeypatch.setattr(w4a16, "FUSE_INPUT_SCALE_PREFILL", fused)
    n = k = 4096
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, torch.float16)
    x = torch.randn(4096, k, dtype=torch.float16, device="cuda")
    scale = torch.exp(torch.randn(k, device="cuda") * 0.5).half()
    y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton", input_scale=scale)
    xm = x * scale
    assert_gemm_close(y, w4a16_gemm_ref(xm, qweight, scales, zeros, None, gs), xm,
                      dequant(qweight, scales, zeros, gs, torch.float16))


# The long sweep last, so that a time-limited run (the GPU suite) covers every other check first.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 256])
@pytest.mark.parametrize("nk", REAL_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_triton_w4a16_real_shapes(nk, m, dtype):
    n, k = nk
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, dtype)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    bias = torch.randn(n, dtype=dtype, device="cuda")
    y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 128, backend="triton")
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, bias, gs)
    assert_gemm_close(y, y_ref, x, dequant(qweight, scales, zeros, gs, dtype))


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_empty_batch_on_gpu(backend):
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(f"CUDA extension: {ops.cuda_extension_error()}")
    check_empty_batch("cuda", backend)


@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("n,k,group_size", [(40, 72, -1), (33, 96, 32), (70, 192, 64), (1000, 1544, -1)],
                         ids=lambda v: str(v))
def test_triton_quantlinear_odd_shapes(n, k, group_size, dtype, act):
    """The compiled kernels on what real layers rarely have and the interpreter cannot judge: packed
    rows not 16-byte aligned (per channel, K = 72 / 1544), N off every tile, tiny K, every M regime
    (empty, GEMV, split-K decode, prefill tiles, W4A8 from M = 17)."""
    lin = torch.nn.Linear(k, n, dtype=dtype, device="cuda")
    for m in (0, 1, 3, 16, 17, 33):
        check_quantlinear_backend(lin, group_size, act, (m,), "triton")


@pytest.mark.parametrize("op", ["w4a16", "w4a8"])
def test_gemm_past_32_bit_offsets(op):
    """M x N >= 2**31 (a 151936-vocabulary lm_head over 16384 tokens, K small to keep it quick): the
    launcher cuts the rows into slices whose offsets fit 32 bits; the rows on both sides of the cut
    and the last ones match the reference (the output is poisoned first: a row never written is NaN)."""
    from minicpm_int4.kernels._common import row_slices

    m, n, k = 16384, 151936, 128
    assert len(row_slices(m, k, n)) == 2
    qweight, scales, zeros, gs = _cuda_layer(n, k, 128, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    if op == "w4a16":
        y = ops.w4a16_gemm(x, qweight, scales, zeros, None, 128, backend="triton")
    else:
        x_q, s = quantize_per_token_int8_ref(x)
        y = ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, 128, torch.float16, backend="triton")
    cut = row_slices(m, k, n)[0][1]
    for rows in (slice(cut - 64, cut + 64), slice(m - 64, m), slice(0, 64)):
        xr = x[rows]
        if op == "w4a16":
            assert_gemm_close(y[rows], w4a16_gemm_ref(xr, qweight, scales, zeros, None, gs), xr,
                              dequant(qweight, scales, zeros, gs, x.dtype))
        else:
            x_q, s = quantize_per_token_int8_ref(xr)
            y_ref = w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, torch.float16)
            tol = w4a8_tolerance(x_q, s, qweight, scales, zeros, gs, torch.float16, y_ref)
            assert ((y[rows].double() - y_ref.double()).abs() <= tol).all()
    assert torch.isfinite(y).all()


def test_from_pretrained_onto_the_gpu(tmp_path):
    """transformers' loader with device_map="cuda" (hf_integration.py): the int4 buffers and the
    split-K counters land on the GPU (the counters are not in the file: allocated there, zero), and
    the logits are the patched model's. backend="torch" keeps this about placement, not kernels."""
    from minicpm_int4.hf_integration import register
    from transformers import LlamaConfig, LlamaForCausalLM

    if register():
        pytest.skip(register())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")  # loaded in fp16 below, as the int4 model is
    from minicpm_int4.models import hf_dtype_kwargs

    model = LlamaForCausalLM.from_pretrained(tmp_path / "fp", **hf_dtype_kwargs(torch.float16)).cuda().eval()
    patch_model(model, QuantConfig(group_size=32, backend="torch"), progress=False)
    model.save_pretrained(tmp_path)
    import importlib.util  # device_map needs accelerate (not in every image): else load, then .cuda()

    on_gpu = {"device_map": "cuda"} if importlib.util.find_spec("accelerate") else {}
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, **on_gpu).cuda().eval()
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.qweight.is_cuda and m.workspace.is_cuda and m.backend == "torch" for m in layers)
    assert all(torch.count_nonzero(m.workspace) == 0 for m in layers)
    ids = torch.tensor([[3, 14, 15, 92, 65]], device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("group_size", [128, -1])
def test_gptq_on_the_gpu(group_size):
    # a real layer's shape (Llama-3-8B's o_proj): the Hessian gathered from a patched model's forward
    # on the GPU and GPTQ's loop there; the result is a CUDA QuantLinear whose output error on the
    # calibration inputs is below the activation-aware search's (what gptq is for) and close to the
    # same computation on the CPU (fp32 Cholesky factors differ by rounding, so not bit for bit)
    from torch import nn

    from minicpm_int4 import calibrate
    from minicpm_int4.gptq import gptq_quantize
    from minicpm_int4.search import quantize_search

    torch.manual_seed(0)
    k, n = 4096, 4096
    mix = torch.randn(k, k, device="cuda") / k ** 0.5 + torch.eye(k, device="cuda")
    batches = [((torch.randn(1024, k, device="cuda") @ mix).half(),) for _ in range(5)]  # 5120 tokens > K
    model = nn.Sequential(nn.Linear(k, n, bias=False)).half().cuda()
    w = model[0].weight.detach().float().clone()
    calib = calibrate(model, batches, progress=False)
    report = patch_model(model, QuantConfig(method="gptq", group_size=group_size), calibration=calib, progress=False)
    assert "gptq on 5120 calibration tokens" in report.decisions[0].reason
    ql = model[0]
    assert isinstance(ql, QuantLinear) and ql.qweight.is_cuda
    x = torch.cat([b[0] for b in batches]).float()

    def err(wq):
        return ((x @ (wq.float() - w).t()).norm() / (x @ w.t()).norm()).item()

    e_gpu = err(ql.dequantized_weight())
    e_search = err(quantize_search(w.half(), group_size, channel_weight=x.square().mean(0)).dequantize())
    h = x.cpu().t() @ x.cpu()
    e_cpu = err(gptq_quantize(w.half().cpu(), h, group_size).dequantize().cuda())
    assert e_gpu < e_search, (e_gpu, e_search)
    assert abs(e_gpu - e_cpu) < 0.02 * e_cpu, (e_gpu, e_cpu)


@pytest.mark.parametrize("backend,act,m", [("auto", None, 1), ("triton", None, 1), ("triton", None, 4),
                                           ("triton", None, 16), ("auto", None, 300), ("cuda", None, 1), ("cuda", None, 4),
                                           ("auto", "int8", 300)])
def test_input_perm_layer_on_gpu(backend, act, m):
    """An act-order GPTQ layer (QuantLinear.input_perm, foreign.py) on each backend: the Triton decode
    kernels and activation quantizer and the CUDA tensor-core kernel read x through the order, the other
    paths gather first; the bits
    of the same kernel on gathered x, against the layer's own weight in channel order, and in a CUDA graph."""
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    k, n = 4096, 4096
    lin = torch.nn.Linear(k, n, dtype=torch.float16, device="cuda")
    base = QuantLinear.from_linear(lin, QuantConfig(group_size=128, backend=backend, act=act))
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    ql = QuantLinear(k, n, group_size=128, dtype=torch.float16, device="cuda", backend=backend, act=act, input_perm=True)
    ql.load_state_dict({**base.state_dict(), "input_perm": perm})
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(ql(x), base(x[:, perm.long()]), rtol=0, atol=0)  # the same kernel on gathered x
    if act is None:
        w = ql.dequantized_weight()
        assert_gemm_close(ql(x), torch.nn.functional.linear(x, w, ql.bias), x, w)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ql(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y_graph = ql(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y_graph, ql(x), rtol=0, atol=0)


@pytest.mark.parametrize("method,act_order", [("awq", False), ("gptq", True), ("compressed-tensors", False)])
def test_foreign_checkpoint_converts_on_the_gpu(tmp_path, method, act_order):
    """load_pretrained_quantized(device="cuda") converts AWQ / GPTQ / compressed-tensors layers on the GPU
    (byte views, gathers, repacking there): the same buffers as the CPU's conversion, and the model runs."""
    from test_foreign import _native_or_skip, _write_foreign

    from minicpm_int4.checkpoint import load_pretrained_quantized
    from minicpm_int4.tiny import prompt_with_image

    model = _native_or_skip()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.zeros.clamp_(min=1)  # GPTQ v1 cannot store a zero point of 0
    _write_foreign(model, tmp_path / "ckpt", method, act_order=act_order)
    on_cpu = load_pretrained_quantized(str(tmp_path / "ckpt"), progress=False)
    on_gpu = load_pretrained_quantized(str(tmp_path / "ckpt"), device="cuda", progress=False)
    gpu_layers = dict(on_gpu.named_modules())
    for name, m in on_cpu.named_modules():
        if isinstance(m, QuantLinear):
            for key, t in m.state_dict().items():
                assert torch.equal(gpu_layers[name].state_dict()[key].cpu(), t), (name, key)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        logits = on_gpu(input_ids=ids.cuda(), pixel_values=pv.half().cuda(), target_sizes=ts.cuda()).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_bias_recast_to_fp32_runs_on_the_gpu_kernels(backend):
    """peft.prepare_model_for_kbit_training leaves the int4 layers' biases in fp32: the CUDA extension takes
    only a bias of the activation dtype, so the layer hands it one (the same numbers)."""
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(torch.nn.Linear(4096, 4096, dtype=torch.bfloat16, device="cuda"),
                                 QuantConfig(group_size=128, backend=backend))
    for m in (1, 16, 64):
        x = torch.randn(m, 4096, dtype=torch.bfloat16, device="cuda")
        want = ql(x)
        ql.bias.data = ql.bias.data.float()
        assert torch.equal(ql(x), want), m
        ql.bias.data = ql.bias.data.to(torch.bfloat16)


@pytest.mark.parametrize("backend,act", [("auto", None), ("triton", None), ("cuda", None), ("auto", "int8"),
                                         ("triton", "int8"), ("cuda", "int8")], ids=lambda v: {None: "w4a16", "int8": "w4a8"}.get(v, v))
def test_gradient_to_the_input_on_the_gpu(backend, act):
    """Fine-tuning through the int4 layers (LoRA adapters: peft_integration.py) needs x's gradient: on every
    GPU path, grad @ W (W: the dequantized int4 weight; W4A8's forward passes it straight through) summed in
    fp32 and rounded once to the layer's dtype."""
    if backend == "cuda" and ops.cuda_extension_error():
        pytest.skip(ops.cuda_extension_error())
    torch.manual_seed(0)
    n, k = 1024, 4096
    ql = QuantLinear.from_linear(torch.nn.Linear(k, n, dtype=torch.bfloat16, device="cuda"),
                                 QuantConfig(group_size=128, backend=backend, act=act))
    w = ql.dequantized_weight().double()
    for m in (1, 16) + (() if backend == "cuda" and act is None else (300,)):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        g = torch.randn(m, n, dtype=torch.bfloat16, device="cuda")
        ql(x).backward(g)
        want = g.double() @ w
        # fp32 sums of n products (at most n * eps32 of the sum of their magnitudes), then one bf16 rounding
        # (at most half an ulp: 2**-8 of the fp32 value)
        fp32_err = n * 2**-23 * (g.double().abs() @ w.abs())
        bound = fp32_err + 2**-8 * (want.abs() + fp32_err)
        assert x.grad is not None and ((x.grad.double() - want).abs() <= bound).all(), m


@pytest.mark.parametrize("act,m", [(None, 1), (None, 4), (None, 64), ("int8", 64)])
def test_triton_fast_launch_same_bits_and_taken(act, m, monkeypatch):
    # kernels/_launch.py on a real GPU: the repeated call launched directly gives Triton's own launch's
    # bits (same compiled kernel, same arguments), the direct path is really taken, and it captures
    # into a CUDA graph like Triton's (the stream it launches on is the capturing one)
    from minicpm_int4.kernels import _launch, act_quant, w4a8, w4a16  # noqa: F401 - (their kernels registered)

    kernels = _launch.LAUNCHERS
    if not kernels or not all(k.usable for k in kernels):
        pytest.skip(f"the fast launch path is off here (triton {__import__('triton').__version__})")
    lin = torch.nn.Linear(4096, 1024, dtype=torch.float16, device="cuda")
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=128, act=act, backend="triton"))
    x = torch.randn(m, 4096, dtype=torch.float16, device="cuda")
    monkeypatch.setattr(_launch, "ENABLED", False)
    y_triton = ql(x)
    monkeypatch.setattr(_launch, "ENABLED", True)
    ql(x)  # records the entries
    before = sum(k.launches for k in kernels)
    y_fast = ql(x)
    torch.cuda.synchronize()
    assert sum(k.launches for k in kernels) > before
    torch.testing.assert_close(y_fast, y_triton, rtol=0, atol=0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ql(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = ql(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(_launch, "ENABLED", False)
    torch.testing.assert_close(y_graph, ql(x), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (a layer on the one that is not current)")
@pytest.mark.parametrize("act", [None, "int8"])
def test_triton_kernels_run_on_the_gpu_of_their_tensors(act):
    """A layer on cuda:1 while cuda:0 is the current device (a model moved to a second GPU, or split over GPUs by a
    device_map): the Triton kernels launch on cuda:1 (ops._on_device) and give the bits they give with cuda:1
    current - decode and prefill, the activation quantizer and W4A8, the dequantization - and cuda:0 stays current."""
    lin = torch.nn.Linear(4096, 1032, dtype=torch.float16)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=128, act=act, backend="triton")).to("cuda:1")
    xs = [torch.randn(m, 4096, dtype=torch.float16, device="cuda:1") for m in (1, 3, 64)]
    with torch.cuda.device(1):
        expect = [ql(x) for x in xs] + [ql.dequantized_weight()]
    with torch.cuda.device(0):
        got = [ql(x) for x in xs] + [ql.dequantized_weight()]
        assert torch.cuda.current_device() == 0
    for y, e in zip(got, expect):
        assert y.device == torch.device("cuda:1")
        torch.testing.assert_close(y, e, rtol=0, atol=0)
