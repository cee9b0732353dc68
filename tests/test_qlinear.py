import json
import re
import warnings

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, ops, patch_model

from helpers import assert_gemm_close, check_quantlinear_backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_its_dequantized_weight(dtype, group_size, bias):
    lin = nn.Linear(256, 96, bias=bias).to(dtype)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=group_size, method="rtn"))
    assert ql.qweight.dtype == torch.int32 and ql.qweight.shape == (96, 32)
    assert ql.scales.dtype == dtype and ql.scales.shape == (96, 256 // (256 if group_size == -1 else group_size))
    x = torch.randn(2, 5, 256, dtype=dtype)            # leading shape (2, 5)
    y = ql(x)
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    w = ql.dequantized_weight()
    assert w.shape == (96, 256) and w.dtype == dtype
    x2 = x.reshape(-1, 256)
    y_ref = (x2.float() @ w.float().t() + (lin.bias.float() if bias else 0)).to(dtype)
    assert_gemm_close(y.reshape(-1, 96), y_ref, x2, w)
    # and (round to nearest) the dequantized weight is within half a step of the original
    step = ql.scales.float().repeat_interleave(256 // ql.scales.shape[1], 1)
    tol = 0.5 * step + torch.finfo(dtype).eps * lin.weight.float().abs() + 1e-7
    assert ((w.float() - lin.weight.float()).abs() <= tol).all()


def test_leading_shapes_and_scalar_batch():
    ql = QuantLinear.from_linear(nn.Linear(64, 64), QuantConfig(group_size=32))
    assert ql(torch.randn(64)).shape == (64,)
    assert ql(torch.randn(3, 2, 4, 64)).shape == (3, 2, 4, 64)
    assert ql(torch.randn(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Linear(100, 64), r"\[N=64, K=100\]: in_features K=100 is not divisible by group_size=32"),
    (lambda: nn.Linear(0, 64), "empty"),
])
def test_unquantizable_layers_raise_value_error_naming_shape(make, match):
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(make(), QuantConfig(group_size=32))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_features=100, out_features=40), ValueError, "in_features must be a multiple of 8"),
    (dict(in_features=96, out_features=40, group_size=64), ValueError, "not divisible by group_size=64"),
    (dict(in_features=96, out_features=40, group_size=48), ValueError, "group_size=48 must be one of"),
    (dict(in_features=0, out_features=4), ValueError, "must be positive integers"),
    (dict(in_features=64, out_features=4, dtype=torch.int8), TypeError, "dtype torch.int8 is not supported"),
    (dict(in_features=64, out_features=4, dtype=torch.float64), TypeError, "dtype torch.float64 is not supported"),
    (dict(in_features=64, out_features=4, act="fp8"), ValueError, "act='fp8' must be None"),
    (dict(in_features=64, out_features=4, backend="tensorrt"), ValueError, "backend='tensorrt' must be one of"),
    (dict(in_features=72, out_features=4, group_size=-1, backend="cuda", act="int8"), ValueError,
     "backend='cuda' with act='int8' needs in_features % 16 == 0"),
])
def test_constructor_refuses_layers_it_cannot_hold(kwargs, error, match):
    """The constructor is public (and load_quantized builds layers from a checkpoint's JSON): buffers
    that cannot hold a valid int4 weight (K // 8 truncating, groups that do not divide K) are refused
    with the reason, not built to give wrong answers later."""
    with pytest.raises(error, match=match):
        QuantLinear(**{"group_size": 32, **kwargs})
    assert QuantLinear(72, 4, group_size=-1).qweight.shape == (4, 9)  # per channel: any K % 8 == 0


def test_fp64_layers_are_kept_by_patch_model_with_the_reason():
    from minicpm_int4 import patch_model

    model = nn.Sequential(nn.Linear(64, 64).double(), nn.Linear(64, 64))
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert [d.action for d in report.decisions] == ["kept", "quantized"]
    assert "dtype torch.float64 is not supported" in report.decisions[0].reason
    with pytest.raises(TypeError, match="x.weight: dtype torch.float64"):
        QuantLinear.from_linear(nn.Linear(64, 64).double(), QuantConfig(group_size=32), name="x")


def test_wrong_input_dtype_and_features():
    ql = QuantLinear.from_linear(nn.Linear(64, 64).half(), QuantConfig(group_size=32))
    with pytest.raises(TypeError, match="holds a torch.float16 layer but got torch.float32 input"):
        ql(torch.randn(2, 64))
    with pytest.raises(ValueError, match="input has 32 features"):
        ql(torch.randn(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="lives on cpu but got input on meta"):
        ql(torch.randn(2, 64, dtype=torch.float16, device="meta"))
    with pytest.raises(ValueError, match="input is a 0-d tensor; it needs a last dimension of 64 features"):
        ql(torch.tensor(1.0, dtype=torch.float16))
    x = torch.randn(64, dtype=torch.float16)  # one vector, as nn.Linear takes it
    assert torch.equal(ql(x), ql(x[None])[0]) and ql(x).shape == (64,)


def test_autocast_casts_the_input_to_the_layer_dtype():
    """Drop-in for nn.Linear under torch.autocast (fp32 norm outputs feeding the Linears): the input is
    cast to the layer's dtype, in which the int4 kernels compute; outside autocast it is an error."""
    ql = QuantLinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16), QuantConfig(group_size=32))
    x = torch.randn(2, 3, 64)
    with pytest.raises(TypeError, match="holds a torch.bfloat16 layer but got torch.float32 input"):
        ql(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ql(x)
        with pytest.raises(ValueError, match="input has 63 features"):
            ql(x[..., :63])
        with pytest.raises(TypeError, match="got torch.int64 input"):
            ql(torch.ones(2, 64, dtype=torch.long))
    assert y.dtype == torch.bfloat16 and torch.equal(y, ql(x.to(torch.bfloat16)))


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_dtype_conversions_of_a_layer():
    """model.half() / .bfloat16() / .float() convert a QuantLinear like an nn.Linear: the scales, zeros
    and bias change dtype (qweight stays int32) and the layer computes in the new dtype; a dtype no
    int4 kernel computes in (model.double(), complex) is refused before anything changes."""
    torch.manual_seed(5)
    ql = QuantLinear.from_linear(nn.Linear(128, 48).half(), QuantConfig(group_size=64))
    for convert, dtype in ((nn.Module.bfloat16, torch.bfloat16), (nn.Module.float, torch.float32),
                           (lambda m: m.to(torch.float16), torch.float16)):
        before = ql.dequantized_weight().float()
        convert(ql)
        assert (ql.scales.dtype, ql.zeros.dtype, ql.bias.dtype, ql.qweight.dtype) == (dtype, dtype, dtype, torch.int32)
        assert ql.workspace.dtype == torch.int32 and ql.dtype == dtype and f"dtype={dtype}" in repr(ql)
        # the zeros are small integers (exact in every dtype); against the weight before, at most three
        # roundings: the scale into the new dtype, the new weight, the old weight (2^-8 + 2^-8 + 2^-11
        # for fp16 -> bf16, the worst step) < 2 eps(bf16)
        w = ql.dequantized_weight()
        assert w.dtype == dtype
        assert torch.allclose(w.float(), before, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=0)
        x = torch.randn(3, 128, dtype=dtype)
        assert_gemm_close(ql(x), (x.float() @ w.float().t() + ql.bias.float()).to(dtype), x, w)
    state = {k: v.clone() for k, v in ql.state_dict().items()}
    for bad in (nn.Module.double, lambda m: m.to(torch.complex64)):
        with pytest.raises(TypeError, match=r"QuantLinear\(128 -> 48\): converting it to torch\.(float64|complex64) "
                                            r"is not supported: int4 layers compute in fp16, bf16 or fp32"):
            bad(ql)
        assert all(torch.equal(v, ql.state_dict()[k]) and v.dtype == ql.state_dict()[k].dtype for k, v in state.items())


def test_meta_device_forward_gives_shapes():
    """A model built on the meta device (init_empty_weights, shape tracing) runs its QuantLinears like
    nn.Linear does there: the output's shape and dtype, whatever backend the layer asks for."""
    for backend in ("auto", "torch", "triton"):
        ql = QuantLinear(64, 24, group_size=32, dtype=torch.bfloat16, device="meta", backend=backend)
        y = ql(torch.empty(2, 5, 64, dtype=torch.bfloat16, device="meta"))
        assert y.device.type == "meta" and y.shape == (2, 5, 24) and y.dtype == torch.bfloat16
        # the ops themselves, and under autocast (which has no meta device type)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ql(torch.empty(3, 64, dtype=torch.float32, device="meta").to(torch.bfloat16))
        assert y.shape == (3, 24)
    x = torch.empty(4, 64, dtype=torch.float16, device="meta")
    y = ops.w4a16_gemm(x, torch.empty(24, 8, dtype=torch.int32, device="meta"),
                       torch.empty(24, 2, dtype=torch.float16, device="meta"),
                       torch.empty(24, 2, dtype=torch.float16, device="meta"), None, 32)
    assert y.device.type == "meta" and y.shape == (4, 24)


def test_from_linear_needs_a_quant_config():
    with pytest.raises(TypeError, match="config must be a QuantConfig, got dict"):
        QuantLinear.from_linear(nn.Linear(64, 64), {"group_size": 32})


def test_not_a_linear():
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_reading_the_fp_weight_says_what_the_layer_holds():
    """Code written for nn.Linear that reads its fp weight (transformers' resize_token_embeddings on an int4
    lm_head) gets an AttributeError that says what the layer holds and what to do; hasattr stays False,
    and other missing attributes keep torch's own message."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ql = QuantLinear.from_linear(nn.Linear(64, 48), QuantConfig(group_size=32))
    assert not hasattr(ql, "weight")
    with pytest.raises(AttributeError, match=r"QuantLinear \(64 -> 48\) has no `weight`: it holds it as int4 "
                                             r"\(qweight, scales, zeros\) and dequantized_weight\(\) gives"):
        ql.weight
    with pytest.raises(AttributeError, match=r"^'QuantLinear' object has no attribute 'weights'$"):
        ql.weights
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    patch_model(model, QuantConfig(group_size=32, quantize_lm_head=True), progress=False)
    with pytest.raises(AttributeError, match=r"runs on the fp model: before patch_model, or after "
                                             r"minicpm_int4.dequantize_model\(model\)"):
        import inspect  # (mean_resizing, transformers >= 4.46: the new rows' init, which reads the weights too)

        takes = inspect.signature(model.resize_token_embeddings).parameters
        quiet = {"mean_resizing": False} if "mean_resizing" in takes else {}
        model.resize_token_embeddings(200, **quiet)


def test_w4a8_module_matches_reference_path():
    lin = nn.Linear(128, 64)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=64, act="int8"))
    assert ql.act == "int8"
    x = torch.randn(20, 128)
    from minicpm_int4.reference import quantize_per_token_int8_ref, w4a8_gemm_ref
    x_q, s = quantize_per_token_int8_ref(x)
    assert torch.equal(ql(x), w4a8_gemm_ref(x_q, s, ql.qweight, ql.scales, ql.zeros, ql.bias, 64, torch.float32))


@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize("input_perm", [False, True])
def test_compiles_fullgraph_without_graph_breaks(act, input_perm):
    ql = QuantLinear.from_linear(nn.Linear(128, 64), QuantConfig(group_size=32, act=act))
    if input_perm:  # an act-order GPTQ layer's (foreign.py): the op reads x's channels in its order
        perm = torch.randperm(128, generator=torch.Generator().manual_seed(0)).to(torch.int32)
        permuted = QuantLinear(128, 64, group_size=32, dtype=ql.dtype, act=act, input_perm=True)
        permuted.load_state_dict({**ql.state_dict(), "input_perm": perm})
        x = torch.randn(4, 24, 128)
        assert torch.equal(permuted(x), ql(x[..., perm.long()]))
        ql = permuted
    x = torch.randn(4, 24, 128)
    compiled = torch.compile(ql, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ql(x))


def test_loading_an_input_perm_that_is_not_a_permutation_is_refused():
    """The decode kernels read x at input_perm's indices: load_state_dict refuses one that is not a
    permutation of the input channels, naming the module, before it reaches the layer."""
    model = nn.Sequential(QuantLinear(64, 16, group_size=32, input_perm=True))
    good = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    model.load_state_dict({**model.state_dict(), "0.input_perm": good})
    for bad in (torch.where(good == 7, 9, good), torch.where(good == 7, 64, good), torch.where(good == 7, -1, good)):
        with pytest.raises(ValueError, match=r"^0: input_perm is not a permutation of the 64 input channels"):
            model.load_state_dict({**model.state_dict(), "0.input_perm": bad})
        assert torch.equal(model[0].input_perm, good)
    ql = QuantLinear(64, 16, group_size=32, input_perm=True)
    with pytest.raises(ValueError, match=r"^QuantLinear: input_perm is not a permutation"):
        ql.load_state_dict({**ql.state_dict(), "input_perm": torch.zeros(64, dtype=torch.int32)})


def test_loading_scales_or_zeros_that_are_not_finite_is_refused():
    """A NaN / inf scale, zero point or input scale turns the outputs of its group (or channel) into NaN with no
    error; no save writes one (a damaged file, or a cast that overflowed): load_state_dict refuses it naming the
    module and the first place, and the layer keeps what it held."""
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 16), QuantConfig(group_size=32), input_scale=torch.rand(64) + 0.5))
    held = {k: v.clone() for k, v in model.state_dict().items()}
    for name, index, value, shown in (("scales", (3, 1), float("nan"), "nan"), ("zeros", (0, 0), float("-inf"), "-inf"),
                                      ("input_scale", (5,), float("inf"), "inf")):
        bad = held[f"0.{name}"].clone()
        bad[index] = value
        with pytest.raises(ValueError, match=rf"^0: {name}: 1 NaN / inf value\(s\), the first at "
                                             rf"\[{', '.join(map(str, index))}\] \({shown}\) - a damaged checkpoint"):
            model.load_state_dict({**held, f"0.{name}": bad})
        assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())
    model.load_state_dict(held)


@pytest.mark.parametrize("act", [None, "int8"])
def test_torch_export_with_a_dynamic_batch(act, tmp_path):
    """torch.export of a patched model: the int4 layers are the package's ops in the graph (no graph
    break, no decomposition into the reference), the batch stays dynamic across the W4A8 threshold
    (decode rows take W4A16 inside the op's caller, so both sides of it are checked), and the saved
    program reloads and computes the same bits."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64))
    patch_model(model, QuantConfig(group_size=32, act=act, min_out_features=1), progress=False)
    x = torch.randn(ops.W4A8_MIN_M + 3, 128)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert targets & {"minicpm_int4.w4a16_gemm.default", "minicpm_int4.w4a8_linear.default"} == {
        "minicpm_int4.w4a8_linear.default" if act else "minicpm_int4.w4a16_gemm.default"}
    path = tmp_path / "int4.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    for rows in (x.shape[0], 1, 5):
        xb = torch.randn(rows, 128)
        assert torch.equal(loaded(xb), model(xb))


@pytest.mark.parametrize("act", [None, "int8"])
def test_torch_export_with_an_input_scale(act, tmp_path):
    """A layer's input scale (QuantConfig.input_scales) goes into its op as a buffer argument: the
    exported program keeps it (no separate multiply node), saves, reloads and computes the same bits
    on both sides of the W4A8 threshold."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 64)
    m = torch.exp(torch.randn(256))
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(),
                          QuantLinear.from_linear(lin, QuantConfig(group_size=32, act=act), input_scale=m))
    x = torch.randn(ops.W4A8_MIN_M + 3, 128)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    calls = [n for n in ep.graph.nodes if n.op == "call_function"
             and str(n.target) in ("minicpm_int4.w4a16_gemm.default", "minicpm_int4.w4a8_linear.default")]
    assert len(calls) == 1 and len(calls[0].args) == 9 and calls[0].args[8] is not None
    assert not any(n.op == "call_function" and "mul" in str(n.target) for n in ep.graph.nodes)
    torch.export.save(ep, str(tmp_path / "scaled.pt2"))
    loaded = torch.export.load(str(tmp_path / "scaled.pt2")).module()
    for rows in (x.shape[0], 1, 5):
        xb = torch.randn(rows, 128)
        assert torch.equal(loaded(xb), model(xb))


def test_state_dict_keys():
    ql = QuantLinear.from_linear(nn.Linear(64, 64), QuantConfig(group_size=32))
    assert set(ql.state_dict()) == {"qweight", "scales", "zeros", "bias"}


def test_workspace_is_zeroed_per_layer_and_not_saved():
    ql = QuantLinear.from_linear(nn.Linear(64, 40), QuantConfig(group_size=32))
    assert ql.workspace.dtype == torch.int32 and ql.workspace.shape == (ops.w4a16_workspace_numel(40),)
    assert torch.count_nonzero(ql.workspace) == 0
    assert "workspace" not in ql.state_dict()
    state = ql.state_dict()
    ql.workspace.fill_(7)  # e.g. a module materialised with to_empty(): loading weights zeroes it
    ql.load_state_dict(state)
    assert torch.count_nonzero(ql.workspace) == 0


def test_forward_reads_the_tensors_the_module_holds_now():
    """The forward reads its buffers and bias from the module's own dicts (a cheaper lookup than
    attribute access): what it computes with must follow every way they change - assignment,
    load_state_dict, a dtype conversion, a bias set to None."""
    torch.manual_seed(3)
    ql = QuantLinear.from_linear(nn.Linear(64, 24), QuantConfig(group_size=32))
    other = QuantLinear.from_linear(nn.Linear(64, 24), QuantConfig(group_size=32))
    x = torch.randn(3, 64)

    def expected(layer, x):
        w = layer.dequantized_weight().float()
        return x.float() @ w.t() + (layer.bias.float() if layer.bias is not None else 0)

    assert_gemm_close(ql(x), expected(ql, x).to(x.dtype), x, ql.dequantized_weight())
    ql.scales = ql.scales * 2                                    # assignment replaces the buffer
    ql.zeros = other.zeros.clone()
    ql.bias = nn.Parameter(torch.randn(24), requires_grad=False)
    assert_gemm_close(ql(x), expected(ql, x).to(x.dtype), x, ql.dequantized_weight())
    ql.load_state_dict(other.state_dict())                      # copied into the buffers in place
    assert torch.equal(ql(x), other(x))
    ql.bias = None
    assert_gemm_close(ql(x), expected(ql, x).to(x.dtype), x, ql.dequantized_weight())
    ql = ql.to(torch.bfloat16)                                  # _apply swaps every tensor
    xb = x.bfloat16()
    assert ql(xb).dtype == torch.bfloat16
    assert_gemm_close(ql(xb), expected(ql, xb).to(torch.bfloat16), xb, ql.dequantized_weight())


@pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
def test_tensors_set_as_views_with_other_strides_are_held_contiguous():
    """The forward hands its tensors to the kernels unchecked, and they read them row-major: a state dict of views
    with other strides (transposes of contiguous tensors, every-other-element slices), loaded with assign=True -
    which sets them as they are - or a tensor set by hand, is held as a contiguous copy, and the Triton kernels give
    the layer's bits (read as row-major, the views gave other numbers: no error)."""
    torch.manual_seed(11)
    k = 128
    lin = nn.Linear(k, 40, dtype=torch.float16)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="triton"),
                                 input_scale=torch.rand(k) + 0.5)
    ql.input_perm = torch.randperm(k).to(torch.int32)  # (an act-order checkpoint's channel order)
    xs = [torch.randn(m, k, dtype=torch.float16) for m in (1, 3)]
    expect = [ql(x) for x in xs]
    views = {n: t.t().contiguous().t() if t.dim() == 2 else t.repeat_interleave(2)[::2]
             for n, t in ql.state_dict().items()}
    assert not any(v.is_contiguous() for v in views.values())
    loaded = QuantLinear(k, 40, group_size=32, dtype=torch.float16, backend="triton", input_scale=True,
                         input_perm=True)
    loaded.load_state_dict(views, assign=True)
    held = loaded.state_dict()
    for name, v in views.items():
        assert held[name].is_contiguous() and torch.equal(held[name], v), name
    assert isinstance(loaded.bias, nn.Parameter)
    for x, y in zip(xs, expect):
        assert torch.equal(loaded(x), y)
    loaded.scales = views["scales"]
    assert loaded.scales.is_contiguous() and torch.equal(loaded(xs[1]), expect[1])


def test_a_tensor_set_by_hand_that_the_layer_cannot_hold_is_refused():
    """What the forward hands the kernels unchecked is checked as it is set: a shape they would read out of bounds,
    a dtype they would misread, a channel order that is not one. None (no bias / input scale) is still taken."""
    ql = QuantLinear.from_linear(nn.Linear(64, 24, dtype=torch.float16), QuantConfig(group_size=32),
                                 input_scale=torch.ones(64))
    before = {n: t.clone() for n, t in ql.state_dict().items()}
    for name, value, what in (
            ("qweight", torch.zeros(24, 4, dtype=torch.int32), "qweight must be a torch.int32 tensor of shape (24, 8), "
                                                                "got torch.int32 (24, 4)"),
            ("qweight", torch.zeros(24, 8, dtype=torch.int64), "qweight must be a torch.int32 tensor of shape (24, 8), "
                                                                "got torch.int64 (24, 8)"),
            ("scales", torch.ones(24, 1, dtype=torch.float16), "scales must be a torch.float16 / torch.bfloat16 / "
                                                               "torch.float32 tensor of shape (24, 2)"),
            ("zeros", torch.zeros(24, 2, dtype=torch.float64), "zeros must be a torch.float16 / torch.bfloat16"),
            ("bias", nn.Parameter(torch.zeros(25, dtype=torch.float16)), "bias must be"),
            ("input_scale", torch.ones(63, dtype=torch.float16), "input_scale must be"),
            ("input_perm", torch.arange(64), "input_perm must be a torch.int32 tensor of shape (64,)"),
            ("input_perm", torch.zeros(64, dtype=torch.int32),
             "input_perm is not a permutation of the 64 input channels")):
        with pytest.raises(ValueError, match=re.escape(f"QuantLinear(64 -> 24): {what}")):
            setattr(ql, name, value)
    after = ql.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    ql.bias, ql.input_scale = None, None
    assert ql.bias is None and ql.input_scale is None and ql(torch.randn(2, 64, dtype=torch.float16)).shape == (2, 24)


@pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
def test_forward_passes_its_workspace_to_the_decode_kernel(monkeypatch):
    # a decode-size input on a layer whose K is split: one launch, the layer's counters back at zero
    from minicpm_int4.kernels import w4a16

    ql = QuantLinear.from_linear(nn.Linear(1024, 16, dtype=torch.float16), QuantConfig(group_size=128, backend="triton"))
    x = torch.randn(4, 1024, dtype=torch.float16)
    expect = ops.w4a16_gemm(x, ql.qweight, ql.scales, ql.zeros, ql.bias, 128, backend="triton")
    assert w4a16._decode_blocks(16, 1024, 128, x.device)[3] > 1

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the split-K reduce kernel ran: the layer's workspace was not passed")

    monkeypatch.setattr(w4a16, "_splitk_reduce_kernel", NoLaunch())
    assert torch.equal(ql(x), expect)
    assert torch.count_nonzero(ql.workspace) == 0


@pytest.mark.skipif(not ops.triton_interpreter_active(), reason="needs TRITON_INTERPRET=1")
def test_a_layer_without_workspace_reduces_its_split_k_in_a_second_launch(monkeypatch):
    """`layer.workspace = None` (README, Compatibility: one layer run on several CUDA streams at once):
    the split decode kernels and GEMV reduce in a second launch, to the same bits, and the layer still
    loads weights and converts."""
    from minicpm_int4.kernels import w4a16

    torch.manual_seed(5)
    ql = QuantLinear.from_linear(nn.Linear(1024, 16, dtype=torch.float16), QuantConfig(group_size=128, backend="triton"))
    assert w4a16._decode_blocks(16, 1024, 128, ql.qweight.device)[3] > 1
    assert w4a16._gemv_blocks(16, 1024 // 8, ql.qweight.device)[3] > 1
    xs = [torch.randn(m, 1024, dtype=torch.float16) for m in (1, 3)]
    with_workspace = [ql(x) for x in xs]
    ql.workspace = None
    launches = []
    reduce_kernel = w4a16._splitk_reduce_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return reduce_kernel[grid]

    monkeypatch.setattr(w4a16, "_splitk_reduce_kernel", Counting())
    for x, y in zip(xs, with_workspace):
        assert torch.equal(ql(x), y)
    assert len(launches) == 2
    ql.load_state_dict(ql.state_dict())
    assert ql.workspace is None and ql.to(torch.bfloat16)(xs[1].bfloat16()).dtype == torch.bfloat16


def test_config_validation():
    with pytest.raises(ValueError, match="group_size=16"):
        QuantConfig(group_size=16)
    with pytest.raises(ValueError, match="backend"):
        QuantConfig(backend="cutlass")
    with pytest.raises(ValueError, match="unknown model part 'decoder'"):
        QuantConfig(act={"decoder": "int8"})
    with pytest.raises(ValueError, match="only 4-bit"):
        QuantConfig(bits=3)
    for act in ("int8", {"vision": "int8"}):  # the CUDA extension has a W4A8 kernel (csrc/w4a8_gemm.cu)
        assert QuantConfig(backend="cuda", act=act).backend == "cuda"
    assert QuantConfig(backend="cuda", act={"vision": None}).backend == "cuda"
    c = QuantConfig(act={"vision": "int8"}, include="*.q_proj")
    assert c.act_for("vision") == "int8" and c.act_for("llm") is None and c.include == ("*.q_proj",)
    assert QuantConfig.from_dict(c.to_dict()) == c
    # wrong types are named, not taken: "False" is truthy (the part would be quantized), 128.0 passes
    # `in GROUP_SIZES` and then makes float buffer shapes, None is not a pattern list
    for kw, what in (({"quantize_lm_head": "False"}, "quantize_lm_head='False': must be True or False"),
                     ({"fold_scales": 0}, "fold_scales=0: must be True or False"),
                     ({"group_size": 128.0}, "group_size=128.0: must be an integer"),
                     ({"group_size": True}, "group_size=True: must be an integer"),
                     ({"keep_most_sensitive": 1.5}, "keep_most_sensitive=1.5: must be an integer"),
                     ({"min_out_features": "64"}, "min_out_features='64': must be an integer"),
                     ({"weight_budget_bytes": 1e9}, "weight_budget_bytes=1000000000.0: must be an integer"),
                     ({"include": None}, "include=None: must be a pattern or a list of patterns"),
                     ({"exclude": ["*.q_proj", 3]}, "exclude: patterns must be strings"),
                     ({"gptq_damp": "0.1"}, "gptq_damp='0.1': must be a number"),
                     ({"gptq_damp": True}, "gptq_damp=True: must be a number"),
                     ({"sensitivity_batches": 2.0}, "sensitivity_batches=2.0: must be an integer")):
        with pytest.raises(TypeError, match=re.escape(what)):
            QuantConfig(**kw)
    for damp in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gptq_damp=.*must be in \(0, 1\]"):
            QuantConfig(gptq_damp=damp)
    assert QuantConfig().gptq_damp == 0.1 and type(QuantConfig(gptq_damp=np_one()).gptq_damp) is float
    with pytest.raises(ValueError, match=r"sensitivity='global': must be one of \('model', 'layer'\)"):
        QuantConfig(sensitivity="global")
    with pytest.raises(ValueError, match="sensitivity_batches=0: must be >= 1"):
        QuantConfig(sensitivity_batches=0)
    for kw, what in (({"method": "awq"}, "QuantConfig.method='awq': must be one of"),
                     ({"act": {"vision": "int4"}}, "QuantConfig.act['vision']='int4': must be one of"),
                     ({"act": "fp8"}, "QuantConfig.act='fp8': must be None, 'int8' or a dict part -> act"),
                     ({"min_out_features": 0}, "QuantConfig.min_out_features must be >= 1"),
                     ({"keep_most_sensitive": -1}, "QuantConfig.keep_most_sensitive must be >= 0"),
                     ({"weight_budget_bytes": 0}, "QuantConfig.weight_budget_bytes must be positive")):
        with pytest.raises(ValueError, match=re.escape(what)):
            QuantConfig(**kw)
    with pytest.raises(ValueError, match=re.escape("QuantConfig.from_dict: unknown fields ['bitz']")):
        QuantConfig.from_dict({**QuantConfig().to_dict(), "bitz": 4})
    assert (QuantConfig().sensitivity, QuantConfig().sensitivity_batches) == ("model", 4)
    new_fields = ("gptq_damp", "sensitivity", "sensitivity_batches")
    old_checkpoint = {k: v for k, v in QuantConfig().to_dict().items() if k not in new_fields}  # saved before them
    assert QuantConfig.from_dict(old_checkpoint) == QuantConfig()
    import numpy as np  # a dependency of transformers
    c = QuantConfig(group_size=np.int64(64), weight_budget_bytes=np.int64(2**20), exclude=["lm_head"])
    assert type(c.group_size) is int and type(c.weight_budget_bytes) is int and c.exclude == ("lm_head",)
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def np_one():
    import numpy as np

    return np.float32(1.0)


def test_default_method_is_search_and_no_worse_than_rtn():
    lin = nn.Linear(256, 64)
    assert QuantConfig().method == "search"
    err = lambda m: (QuantLinear.from_linear(lin, QuantConfig(group_size=64, method=m)).dequantized_weight() - lin.weight).norm()  # noqa: E731
    assert err("search") <= err("rtn")


@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize("m", [5, 20])  # W4A8 layers: the W4A16 decode path below W4A8_MIN_M rows, int8 above
def test_gradients_flow_to_the_input_and_bias(act, m):
    """The int4 weights are frozen; x and bias get the gradients of y = x @ dequant(W).T + b (for W4A8
    the activations' int8 rounding passes the gradient straight through), at every M."""
    lin = nn.Linear(128, 64)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=32, act=act))
    ql.bias.requires_grad_(True)
    x = torch.randn(m, 128, requires_grad=True)
    g = torch.randn(m, 64)
    ql(x).backward(g)
    w = ql.dequantized_weight()
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ql.bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)
    op = torch.ops.minicpm_int4.w4a8_linear if act else torch.ops.minicpm_int4.w4a16_gemm
    torch.library.opcheck(op.default, (x.detach().requires_grad_(), ql.qweight, ql.scales, ql.zeros, ql.bias, 32, "torch"))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 70), groups=st.integers(1, 3), gi=st.integers(0, 3), di=st.integers(0, 2),
       lead=st.lists(st.integers(0, 3), min_size=0, max_size=2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_quantlinear_matches_dequantized_matmul_property(n, groups, gi, di, lead, bias, seed):
    group_size = [32, 64, 128, -1][gi]
    dtype = [torch.float16, torch.bfloat16, torch.float32][di]
    k = groups * (64 if group_size == -1 else group_size)
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=group_size))
    x = torch.randn(*lead, k, dtype=dtype)
    y = ql(x)
    assert y.shape == (*lead, n) and y.dtype == dtype
    x2, w = x.reshape(-1, k), ql.dequantized_weight()
    y_ref = (x2.float() @ w.float().t() + (lin.bias.float() if bias else 0)).to(dtype)
    assert_gemm_close(y.reshape(-1, n), y_ref, x2, w)


class _Counting:
    """Wraps a custom op to count the calls that go through the dispatcher."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.op(*args, **kwargs)


@pytest.mark.parametrize("act", [None, "int8"])
def test_eager_inference_skips_the_dispatcher_with_the_same_result(act, monkeypatch):
    # eager inference calls the implementations directly (ops.eager_fast_path); anything that needs
    # the op - gradients, fake tensors, the profiler - still goes through it
    ql = QuantLinear.from_linear(nn.Linear(128, 64), QuantConfig(group_size=32, act=act, backend="torch"))
    x = torch.randn(20, 128)  # >= W4A8_MIN_M: the int8 path for act="int8"
    names = ["_w4a16_gemm_op"] if act is None else ["_w4a8_linear_op"]
    counters = {}
    for name in names:
        counters[name] = _Counting(getattr(ops, name))
        monkeypatch.setattr(ops, name, counters[name])
    with torch.no_grad():
        y = ql(x)
    assert all(c.calls == 0 for c in counters.values())
    with torch.no_grad(), torch.profiler.profile():
        assert torch.equal(ql(x), y)
    assert all(c.calls == 1 for c in counters.values())
    with torch.inference_mode():
        assert torch.equal(ql(x), y)
    assert all(c.calls == 1 for c in counters.values())
    xg = x.clone().requires_grad_()  # autograd needs the op's registered backward
    assert torch.equal(ql(xg), y) and counters[names[0]].calls == 2
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():  # the op's fake implementation
        out = ql(mode.from_tensor(x))
    assert out.shape == (20, 64) and type(out) is not torch.Tensor


def test_eager_fast_path_conditions():
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert ops.eager_fast_path(x, None)
    assert ops.eager_fast_path(x, None)                                  # grad mode, nothing requires grad
    assert not ops.eager_fast_path(x.clone().requires_grad_(), None)     # an autograd graph to record
    assert not ops.eager_fast_path(x, nn.Parameter(torch.zeros(8)))     # a trainable bias
    assert not ops.eager_fast_path(nn.Parameter(x), None)                # a tensor subclass
    ql = QuantLinear.from_linear(nn.Linear(8, 4), QuantConfig(group_size=-1, backend="torch"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; users still call it
        traced = torch.jit.trace(ql, (x,))
    assert "minicpm_int4::w4a16_gemm" in str(traced.inlined_graph)      # torch.jit.trace records the op
    assert torch.equal(traced(x), ql(x))


def test_eager_fast_path_follows_the_dispatch_mode_stack(monkeypatch):
    """The fast path asks the C++ mode stack whether a dispatch mode is active, not the Python flag of
    torch.utils._python_dispatch: torch 2.4 left that flag set after a FakeTensorMode exited (as set here),
    and every later eager call of the process took the dispatcher."""
    import torch.utils._python_dispatch as python_dispatch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8)
    with FakeTensorMode():
        pass
    monkeypatch.setattr(python_dispatch, "_is_in_torch_dispatch_mode", True)  # torch 2.4, after that exit
    with torch.no_grad():
        assert ops.eager_fast_path(x, None)
        with FlopCounterMode(display=False):  # a mode that takes plain tensors: the op, so that it counts
            assert not ops.eager_fast_path(x, None)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), groups=st.integers(1, 3), gi=st.integers(0, 3), di=st.integers(0, 2),
       m=st.sampled_from([0, 1, 2, 3, 5, 16, 17, 33]), lead=st.integers(1, 2), bias=st.booleans(),
       act=st.sampled_from([None, "int8"]), k8=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_triton_quantlinear_property(n, groups, gi, di, m, lead, bias, act, k8, seed):
    """QuantLinear(backend="triton") in the interpreter over random layer shapes, token counts
    (empty included), dtypes, group sizes (per channel with any K % 8 == 0: rows whose packed stride
    is not 16-byte aligned) and both activation paths, against the reference path of the same layer
    (helpers.check_quantlinear_backend)."""
    if not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    group_size = [32, 64, 128, -1][gi]
    dtype = [torch.float16, torch.bfloat16, torch.float32][di]
    k = 8 * k8 if group_size == -1 else groups * group_size  # per channel: any K the packing allows
    torch.manual_seed(seed)
    check_quantlinear_backend(nn.Linear(k, n, bias=bias).to(dtype), group_size, act, (lead, m), "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("act", [None, "int8"])
def test_a_bias_recast_from_outside_computes_as_before(backend, act, monkeypatch):
    """peft.prepare_model_for_kbit_training sets every fp16 / bf16 parameter's .data to fp32, the int4
    layers' biases included: the layer hands the kernels its bias in its own dtype again (the CUDA
    extension requires it; exact: it came from that dtype), and computes as before."""
    from minicpm_int4 import ops

    if backend == "triton" and not ops.triton_interpreter_active():
        pytest.skip("needs the Triton kernels importable on CPU (TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(nn.Linear(64, 48).to(torch.bfloat16),
                                 QuantConfig(group_size=32, backend=backend, act=act))
    x = torch.randn(20, 64, dtype=torch.bfloat16)  # M > 16: W4A8 runs its own kernel
    want = ql(x)
    ql.bias.data = ql.bias.data.float()
    seen = []
    real = ops.quantized_linear
    monkeypatch.setattr(ops, "quantized_linear", lambda *a: seen.append(a[4].dtype) or real(*a))
    assert torch.equal(ql(x), want) and ql.bias.dtype == torch.float32
    assert seen == [torch.bfloat16]
