"""The op door: schemas and fake implementations (opcheck), backend rules, input checks."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from minicpm_int4 import ops

from helpers import check_empty_batch, random_qweight


def _layer(dtype=torch.float16, n=40, k=128, gs=64):
    qweight, scales, zeros, _ = random_qweight(n, k, gs, dtype)
    return qweight, scales, zeros


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("m", [1, 17])
def test_opcheck_w4a16(backend, m):
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    qweight, scales, zeros = _layer()
    x = torch.randn(m, 128, dtype=torch.float16)
    bias = torch.randn(40, dtype=torch.float16)
    torch.library.opcheck(torch.ops.minicpm_int4.w4a16_gemm.default, (x, qweight, scales, zeros, bias, 64, backend))
    torch.library.opcheck(torch.ops.minicpm_int4.w4a16_gemm.default, (x, qweight, scales, zeros, None, 64, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_w4a16_with_workspace(backend):
    # a split-K decode shape (interpreter tiles): the kernel counts into the workspace and leaves it
    # at zero, which is why the op does not declare it mutated; opcheck compares it before and after
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    qweight, scales, zeros = _layer(n=16, k=1024, gs=128)
    x = torch.randn(3, 1024, dtype=torch.float16)
    workspace = ops.w4a16_workspace(16)
    torch.library.opcheck(torch.ops.minicpm_int4.w4a16_gemm.default,
                          (x, qweight, scales, zeros, None, 128, backend, workspace))
    assert torch.count_nonzero(workspace) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_act_quant_and_w4a8(backend):
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    x = torch.randn(20, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.minicpm_int4.quantize_per_token_int8.default, (x, backend))
    qweight, scales, zeros = _layer(torch.bfloat16)
    x_q, s = ops.quantize_per_token_int8(x, backend="torch")
    torch.library.opcheck(torch.ops.minicpm_int4.w4a8_gemm.default,
                          (x_q, s, qweight, scales, zeros, None, 64, torch.bfloat16, backend))
    for rows in (ops.W4A8_MIN_M - 1, ops.W4A8_MIN_M):  # a W4A8 layer's op: both sides of the threshold
        xr = torch.randn(rows, 128, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.minicpm_int4.w4a8_linear.default,
                              (xr, qweight, scales, zeros, None, 64, backend, ops.w4a16_workspace(qweight.shape[0])))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_an_input_scale(backend):
    """The ops that take a layer's input scale (QuantConfig.input_scales): schemas, fakes and the
    gradient with respect to x (y = (x * m) @ W.T: grad_x = (grad @ W) * m), both sides of W4A8's
    threshold."""
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    qweight, scales, zeros = _layer(torch.bfloat16)
    scale = (torch.rand(128) + 0.5).to(torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    x = torch.randn(20, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.minicpm_int4.quantize_per_token_int8.default, (x, backend, scale))
    for rows in (ops.W4A8_MIN_M - 1, ops.W4A8_MIN_M):
        xr = torch.randn(rows, 128, dtype=torch.bfloat16)
        args = (qweight, scales, zeros, bias, 64, backend, ops.w4a16_workspace(qweight.shape[0]), scale)
        for op in (torch.ops.minicpm_int4.w4a8_linear.default, torch.ops.minicpm_int4.w4a16_gemm.default):
            torch.library.opcheck(op, (xr, *args))
    # the gradient: against autograd through (x * m) @ W.T with the same int4 weight
    w = ops.dequantize(qweight, scales, zeros, 64, torch.bfloat16).float()  # the weight the forward multiplies by
    xg = torch.randn(3, 128, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(3, 40)
    for op in (ops.w4a8_linear, ops.w4a16_gemm):
        (got,) = torch.autograd.grad(op(xg.bfloat16(), qweight, scales, zeros, bias, 64, backend=backend,
                                        input_scale=scale), xg, grad.bfloat16())
        (want,) = torch.autograd.grad(((xg * scale.float()) @ w.t()), xg, grad.bfloat16().float())
        # one rounding of each fp32 gradient to bf16 (half an ulp, 2^-8 relative); fp32 sums of 128 products
        torch.testing.assert_close(got, want.bfloat16().float(), rtol=2 ** -8, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_with_an_input_perm(backend):
    """The ops that take an act-order layer's channel order (QuantLinear.input_perm): schemas, fakes,
    both sides of W4A8's threshold, with and without an input scale, and the gradient with respect to x
    (y = (x[:, p] * m) @ W.T: the column-order gradient scattered back to channel p[j])."""
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    qweight, scales, zeros = _layer(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(128, generator=g).to(torch.int32)
    scale = (torch.rand(128, generator=g) + 0.5).to(torch.bfloat16)
    bias = torch.randn(40, dtype=torch.bfloat16)
    x = torch.randn(20, 128, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.minicpm_int4.quantize_per_token_int8.default, (x, backend, None, perm))
    for rows in (1, ops.W4A8_MIN_M - 1, ops.W4A8_MIN_M):
        xr = torch.randn(rows, 128, dtype=torch.bfloat16)
        for m in (None, scale):
            args = (qweight, scales, zeros, bias, 64, backend, ops.w4a16_workspace(qweight.shape[0]), m, perm)
            for op in (torch.ops.minicpm_int4.w4a8_linear.default, torch.ops.minicpm_int4.w4a16_gemm.default):
                torch.library.opcheck(op, (xr, *args))
    w = ops.dequantize(qweight, scales, zeros, 64, torch.bfloat16).float()
    xg = torch.randn(3, 128, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(3, 40)
    for op in (ops.w4a8_linear, ops.w4a16_gemm):
        (got,) = torch.autograd.grad(op(xg.bfloat16(), qweight, scales, zeros, bias, 64, backend=backend,
                                        input_scale=scale, input_perm=perm), xg, grad.bfloat16())
        (want,) = torch.autograd.grad(((xg[:, perm.long()] * scale.float()) @ w.t()), xg, grad.bfloat16().float())
        torch.testing.assert_close(got, want.bfloat16().float(), rtol=2 ** -8, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("bad, error, match", [
    (torch.arange(127, dtype=torch.int32), ValueError, r"input_perm must have shape \[K=128\].*got \(127,\)"),
    (torch.arange(128), TypeError, r"input_perm must be int32, got torch.int64"),
    (torch.arange(128, dtype=torch.int32, device="meta"), ValueError, r"input_perm is on meta but the input is on cpu"),
    ([0, 1], ValueError, r"input_perm must have shape \[K=128\].*got list"),
])
def test_bad_input_perm_is_named(bad, error, match):
    qweight, scales, zeros = _layer()
    x = torch.randn(3, 128, dtype=torch.float16)
    for call in (lambda: ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, input_perm=bad),
                 lambda: ops.w4a8_linear(x, qweight, scales, zeros, None, 64, input_perm=bad),
                 lambda: ops.quantize_per_token_int8(x, input_perm=bad)):
        with pytest.raises(error, match=match):
            call()


def test_triton_kernels_import():
    """Guards the interpreter tests: if the kernels failed to import, they would all be skipped."""
    kernels, why = ops._triton_kernels()
    assert kernels is not None, why
    assert os.environ.get("TRITON_INTERPRET") != "1" or ops.triton_interpreter_active()


def test_ops_live_in_the_package_namespace():
    for name in ("w4a16_gemm", "quantize_per_token_int8", "w4a8_gemm", "w4a8_linear"):
        assert hasattr(torch.ops.minicpm_int4, name)


def test_bad_inputs_get_clear_errors():
    qweight, scales, zeros = _layer()
    x = torch.randn(3, 128, dtype=torch.float16)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        ops.w4a16_gemm(x.to(torch.int32), qweight, scales, zeros, None, 64)
    with pytest.raises(TypeError, match="activations are torch.float32 but the weight scales are torch.float16"):
        ops.w4a16_gemm(x.float(), qweight, scales, zeros, None, 64)
    with pytest.raises(ValueError, match="x has K=120"):
        ops.w4a16_gemm(x[:, :120], qweight, scales, zeros, None, 64)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 48)
    with pytest.raises(ValueError, match=r"scales must have shape \[N=40, K/group_size = 128/32 = 4\]"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 32)
    # the group size passed where the bias goes: named as such, not as scales of the default group size's shape
    for op, args in ((ops.w4a16_gemm, (x,)), (ops.w4a8_linear, (x,)),
                     (ops.w4a8_gemm, (x.to(torch.int8), torch.ones(3)))):
        with pytest.raises(TypeError, match=r"bias must be a tensor \[N\] or None, got int 64 \(group_size comes "
                                            r"after bias: pass it as group_size=...\)"):
            op(*args, qweight, scales, zeros, 64)
    with pytest.raises(TypeError, match=r"bias must be a tensor \[N\] or None, got bool True$"):
        ops.w4a16_gemm(x, qweight, scales, zeros, True, 64)
    with pytest.raises(TypeError, match="group_size must be an int .* got float 64.0"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64.0)
    with pytest.raises(TypeError, match="scales must be a tensor, got list"):
        ops.w4a16_gemm(x, qweight, scales.tolist(), zeros, None, 64)
    with pytest.raises(TypeError, match="x_scale must be a tensor, got float"):
        ops.w4a8_gemm(x.to(torch.int8), 1.0, qweight, scales, zeros)
    # an integer scalar of numpy or torch is a group size like an int
    assert torch.equal(ops.w4a16_gemm(x, qweight, scales, zeros, None, np.int64(64)),
                       ops.w4a16_gemm(x, qweight, scales, zeros, None, 64))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.w4a16_gemm(x, qweight, scales, zeros, torch.zeros(3, dtype=torch.float16), 64)
    with pytest.raises(ValueError, match="2-D"):
        ops.w4a16_gemm(x[None], qweight, scales, zeros, None, 64)
    with pytest.raises(ValueError, match="scales is on meta but the input is on cpu"):
        ops.w4a16_gemm(x, qweight, scales.to("meta"), zeros, None, 64)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="cutlass")
    with pytest.raises(TypeError, match="workspace must be a contiguous int32 tensor"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, workspace=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="workspace must be a contiguous int32 tensor"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, workspace=torch.zeros(3, 2, dtype=torch.int32).t())
    with pytest.raises(ValueError, match=r"workspace has 2 elements; a layer with N=40 outputs needs 3"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, workspace=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="workspace is on meta but the input is on cpu"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, workspace=ops.w4a16_workspace(40, "meta"))
    with pytest.raises(TypeError, match="x_q must be int8"):
        ops.w4a8_gemm(x, torch.ones(3), qweight, scales, zeros)
    with pytest.raises(TypeError, match="x_scale must be fp32"):
        ops.w4a8_gemm(x.to(torch.int8), torch.ones(3, dtype=torch.float16), qweight, scales, zeros)


def test_the_rest_of_the_bad_inputs_get_clear_errors():
    """Each remaining check of the ops' inputs, by the message that names the problem."""
    qweight, scales, zeros = _layer()
    x = torch.randn(3, 128, dtype=torch.float16)
    xq, xs = x.to(torch.int8), torch.ones(3)
    with pytest.raises(TypeError, match="expected a tensor, got list"):
        ops.w4a16_gemm(x.tolist(), qweight, scales, zeros, None, 64)
    with pytest.raises(TypeError, match=r"qweight must be int32 \[N, K//8\], got torch.int64 \(40, 16\)"):
        ops.w4a16_gemm(x, qweight.long(), scales, zeros, None, 64)
    with pytest.raises(TypeError, match="group_size must be an int .* got bool True"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, True)
    with pytest.raises(TypeError, match="scales must be fp16/bf16/fp32, got torch.int32"):
        ops.w4a16_gemm(x, qweight, scales.int(), zeros.int(), None, 64)
    with pytest.raises(TypeError, match="zeros dtype torch.float32 differs from scales dtype torch.float16"):
        ops.w4a16_gemm(x, qweight, scales, zeros.float(), None, 64)
    with pytest.raises(TypeError, match="bias dtype torch.float32 differs from the output dtype torch.float16"):
        ops.w4a16_gemm(x, qweight, scales, zeros, torch.zeros(40), 64)
    with pytest.raises(ValueError, match="bias is on meta but the input is on cpu"):
        ops.w4a16_gemm(x, qweight, scales, zeros, torch.zeros(40, dtype=torch.float16, device="meta"), 64)
    with pytest.raises(ValueError, match="x_scale is on meta but x_q is on cpu"):
        ops.w4a8_gemm(xq, xs.to("meta"), qweight, scales, zeros, group_size=64)
    with pytest.raises(TypeError, match="out_dtype must be fp16/bf16/fp32, got torch.int32"):
        ops.w4a8_gemm(xq, xs, qweight, scales, zeros, group_size=64, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="w4a8_linear: activations are torch.float32 but the weight scales are "
                                        "torch.float16"):
        ops.w4a8_linear(x.float(), qweight, scales, zeros, group_size=64)
    # K a multiple of 8 (whole words) that the group size does not divide
    q40, s40, z40 = qweight[:, :5].contiguous(), scales[:, :1].contiguous(), zeros[:, :1].contiguous()
    with pytest.raises(ValueError, match="K=40 is not divisible by group_size=32"):
        ops.w4a16_gemm(x[:, :40], q40, s40, z40, None, 32)


def _strided(t):
    """t's values in a tensor with column-major strides (a transpose of a contiguous one): same shape, same values."""
    return t.t().contiguous().t() if t.dim() == 2 else t.repeat_interleave(2)[::2]


@pytest.mark.parametrize("name", ["qweight", "scales", "zeros", "bias"])
def test_views_with_other_strides_are_refused_not_read_as_row_major(name):
    """The kernels read a weight's tensors row-major with unit stride: a transposed view of the right shape would
    be read as if it were not one (the Triton backends gave wrong numbers, no error), so every op refuses it,
    naming the tensor; the same values made contiguous compute as ever."""
    qweight, scales, zeros = _layer(gs=32)
    bias = torch.randn(40, dtype=torch.float16)
    x = torch.randn(3, 128, dtype=torch.float16)
    t = dict(qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    view = {**t, name: _strided(t[name])}
    assert not view[name].is_contiguous() and torch.equal(view[name], t[name])
    match = re.escape(f"{name} must be contiguous (row-major), got a view of shape {tuple(t[name].shape)} with strides "
                      f"{view[name].stride()}")
    calls = [lambda w: ops.w4a16_gemm(x, w["qweight"], w["scales"], w["zeros"], w["bias"], 32),
             lambda w: ops.w4a8_linear(x, w["qweight"], w["scales"], w["zeros"], w["bias"], 32),
             lambda w: ops.w4a8_gemm(x.to(torch.int8), torch.ones(3), w["qweight"], w["scales"], w["zeros"], w["bias"],
                                     32)]
    if name != "bias":
        calls.append(lambda w: ops.dequantize(w["qweight"], w["scales"], w["zeros"], 32))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call(view)
        call(t)  # (the contiguous tensors pass)


def test_dequantize_checks_the_weight_as_the_gemm_does():
    qweight, scales, zeros = _layer()
    from minicpm_int4.reference import dequantize_ref

    assert torch.equal(ops.dequantize(qweight, scales, zeros, 64), dequantize_ref(qweight, scales, zeros, 64))
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        ops.dequantize(qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"scales must have shape \[N=40, K/group_size = 128/32 = 4\]"):
        ops.dequantize(qweight, scales, zeros, 32)
    with pytest.raises(TypeError, match=r"qweight must be int32 \[N, K//8\], got torch.int32 \(640,\)"):
        ops.dequantize(qweight.flatten(), scales, zeros, 64)
    with pytest.raises(TypeError, match="qweight must be a tensor, got list"):
        ops.dequantize(qweight.tolist(), scales, zeros, 64)
    with pytest.raises(ValueError, match="zeros is on meta but the input is on cpu"):
        ops.dequantize(qweight, scales, zeros.to("meta"), 64)
    with pytest.raises(TypeError, match="out_dtype must be fp16/bf16/fp32 or None"):
        ops.dequantize(qweight, scales, zeros, 64, torch.int8)


def test_on_device_makes_the_tensors_gpu_current_only_where_it_is_not(monkeypatch):
    """Triton launches on the current CUDA device: ops._on_device gives torch.cuda.device(d) for tensors on another
    GPU, and no context for the current one or the CPU."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or "guard")
    assert ops._on_device(torch.device("cuda", 1)) == "guard" and entered == [torch.device("cuda", 1)]
    assert ops._on_device(torch.device("cuda", 0)) is ops._NO_CONTEXT
    assert ops._on_device(torch.device("cpu")) is ops._NO_CONTEXT and len(entered) == 1


@pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
def test_every_triton_op_launches_under_the_device_of_its_tensors(monkeypatch):
    """Each op's Triton path runs inside ops._on_device(its tensors' device), layer calls too (W4A16 at decode and
    prefill sizes, the quantizer and W4A8); a GPU test checks it on two GPUs (tests/test_gpu.py)."""
    import contextlib

    from minicpm_int4 import QuantConfig, QuantLinear

    seen = []
    monkeypatch.setattr(ops, "_on_device", lambda d: seen.append(d) or contextlib.nullcontext())
    qweight, scales, zeros = _layer()
    calls = []
    for m in (1, 3, 17):  # (W4A8 runs its decode rows, M <= 16, on the W4A16 kernel; prefill quantizes, then the GEMM)
        x = torch.randn(m, 128, dtype=torch.float16)
        calls.append(lambda x=x: ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="triton"))
        calls.append(lambda x=x: ops.w4a8_linear(x, qweight, scales, zeros, None, 64, backend="triton"))
    calls.append(lambda: ops.quantize_per_token_int8(x, backend="triton"))
    calls.append(lambda: ops.w4a8_gemm(x.to(torch.int8), torch.ones(17), qweight, scales, zeros, None, 64,
                                       backend="triton"))
    for act in (None, "int8"):
        ql = QuantLinear.from_linear(torch.nn.Linear(128, 40, dtype=torch.float16),
                                     QuantConfig(group_size=64, act=act, backend="triton"))
        calls.append(lambda ql=ql: ql(torch.randn(20, 128, dtype=torch.float16)))
    for call in calls:
        before = len(seen)
        call()
        assert len(seen) > before
    assert set(seen) == {torch.device("cpu")}


def test_cuda_backend_on_cpu_tensors_raises():
    qweight, scales, zeros = _layer()
    x = torch.randn(3, 128, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="cuda")


@pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """The probe passes here (CI's triton); where it fails (triton 3.6 with numpy >= 2.4) the
    triton backend says why instead of failing inside the interpreter."""
    from minicpm_int4 import kernels

    assert kernels.interpreter_problem() is None
    monkeypatch.setattr(kernels, "interpreter_problem", lambda: "the interpreter is broken here")
    qweight, scales, zeros = _layer()
    with pytest.raises(RuntimeError, match="backend='triton' in the interpreter: the interpreter is broken here"):
        ops.w4a16_gemm(torch.randn(3, 128, dtype=torch.float16), qweight, scales, zeros, None, 64, backend="triton")


def test_auto_and_torch_on_cpu_use_the_reference():
    qweight, scales, zeros = _layer()
    x = torch.randn(3, 128, dtype=torch.float16)
    from minicpm_int4.reference import w4a16_gemm_ref
    y_ref = w4a16_gemm_ref(x, qweight, scales, zeros, None, 64)
    assert torch.equal(ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="auto"), y_ref)
    assert torch.equal(ops.w4a16_gemm(x, qweight, scales, zeros, None, 64, backend="torch"), y_ref)


def test_triton_on_cpu_without_interpreter_raises_instead_of_falling_back():
    code = (
        "import torch, minicpm_int4.ops as ops\n"
        "x = torch.randn(2, 64, dtype=torch.float16)\n"
        "q = torch.zeros(8, 8, dtype=torch.int32); s = torch.ones(8, 2, dtype=torch.float16)\n"
        "try:\n"
        "    ops.w4a16_gemm(x, q, s, s, None, 32, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


def test_cuda_extension_error_is_a_reason_not_a_crash():
    why = ops.cuda_extension_error()
    if why is not None:
        assert "minicpm_int4._C" in why


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    check_empty_batch("cpu", backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_does_not_change_the_results(backend):
    """Autocast lowers torch.matmul to bf16 / fp16; the reference backend's fp32 sums must not follow
    (the kernels are custom ops, outside autocast): the same bits with and without it."""
    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    qweight, scales, zeros = _layer(torch.float32, n=24, k=128, gs=32)
    x = torch.randn(20, 128)
    bias = torch.randn(24)

    def run():
        y = ops.w4a16_gemm(x, qweight, scales, zeros, bias, 32, backend=backend)
        x_q, s = ops.quantize_per_token_int8(x, backend=backend)
        return y, x_q, s, ops.w4a8_gemm(x_q, s, qweight, scales, zeros, bias, 32, torch.float32, backend=backend)

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_custom_ops_are_declared_with_types_not_strings():
    """torch < 2.5 builds a custom op's schema from its function's annotations as they are: a string
    annotation ('Tensor', as `from __future__ import annotations` makes every one) failed
    `import minicpm_int4` on torch 2.4, the oldest torch pyproject.toml takes. Newer torch resolves the
    strings, so only this test sees it here."""
    import inspect

    from torch._library.custom_ops import CustomOpDef

    defs = {name: v for name, v in vars(ops).items() if isinstance(v, CustomOpDef)}
    assert {d._name for d in defs.values()} == {"w4a16_gemm", "quantize_per_token_int8", "w4a8_gemm", "w4a8_linear"}
    for d in defs.values():
        sig = inspect.signature(d._init_fn)
        annotations = [p.annotation for p in sig.parameters.values()] + [sig.return_annotation]
        assert not any(isinstance(a, str) for a in annotations), (d._name, sig)


def test_works_without_triton():
    """triton installs only on Linux (pyproject): without it the package imports, patches and runs on
    the reference, `env` says why the Triton backend is missing, and backend='triton' raises naming it."""
    code = """
import sys
sys.modules["triton"] = None  # as if not installed: `import triton` fails, importlib.util.find_spec says None
import torch
from torch import nn
from minicpm_int4 import QuantConfig, QuantLinear, diagnose, patch_model
model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
patch_model(model, QuantConfig(group_size=32), progress=False)
assert model(torch.randn(2, 64)).shape == (2, 64)
assert "backend triton: unavailable - Triton kernels unavailable: ModuleNotFoundError: import of triton halted" in diagnose.format_report(diagnose.collect())
try:
    QuantLinear.from_linear(nn.Linear(64, 64), QuantConfig(group_size=32, backend="triton"))(torch.randn(1, 64))
except RuntimeError as e:
    assert "backend='triton' requested but Triton kernels unavailable" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
