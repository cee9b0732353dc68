"""QuantConfig.input_scales: a per-channel multiplier of a layer's input (AWQ's 1/s where no scale folds
into the previous op), held by QuantLinear as ``input_scale``, its weight quantized divided by it."""
import warnings

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, calibrate, ops, patch_model, save_quantized
from minicpm_int4.awq import search_input_scale
from minicpm_int4.checkpoint import CheckpointMismatchError, load_pretrained_quantized, load_quantized
from minicpm_int4.gptq import gptq_quantize
from minicpm_int4.packing import pack_int4
from minicpm_int4.patch import dequantize_model
from minicpm_int4.quantize import quantize_weight
from minicpm_int4.reference import gemm_tolerance

import transformers
from helpers import assert_gemm_close, random_input_scale

NATIVE = hasattr(transformers, "MiniCPMV4_6Config")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "int8"])
@pytest.mark.parametrize("m_rows", [1, 3, 17])
def test_forward_multiplies_the_input_and_the_weight_holds_w_over_m(dtype, act, m_rows):
    torch.manual_seed(m_rows)
    lin = nn.Linear(96, 40).to(dtype)
    m = random_input_scale(96)
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="torch", act=act), input_scale=m)
    stored = m.to(dtype)
    assert ql.input_scale.dtype == dtype and torch.equal(ql.input_scale, stored)
    # the int4 weight is W / m, quantized as any weight is (m as stored: the product is W again)
    qw = quantize_weight((lin.weight.float() / stored.float()).to(dtype), 32, "search")
    assert torch.equal(ql.qweight, pack_int4(qw.q)) and torch.equal(ql.scales, qw.scales)
    # the forward is the plain int4 layer on x * m
    plain = _without_input_scale(ql)
    x = torch.randn(2, m_rows, 96).to(dtype)
    y = ql(x)
    assert torch.equal(y, plain(x * stored))
    if act is None:  # and x @ dequantized_weight().T, up to the two roundings of a product by m
        w_eff = ql.dequantized_weight()
        x2 = x.reshape(-1, 96)
        ref = (x2.float() @ w_eff.float().t() + lin.bias.float()).to(dtype)
        mag = x2.abs().double() @ w_eff.abs().double().t()
        tol = gemm_tolerance(x2, w_eff, dtype, ref) + torch.finfo(dtype).eps * mag.float()
        assert ((y.reshape(-1, 40).double() - ref.double()).abs() <= tol.double()).all()
    assert "input_scale=True" in repr(ql)
    assert ql.weight_bytes == plain.weight_bytes + 96 * stored.element_size()


def test_statistics_of_the_input_are_scaled_to_the_scaled_input():
    """The channel weights (activation-aware search) and the Hessian (gptq) handed to from_linear are
    of the layer's own input x: the layer sees x * m, so they are scaled by m (m^2; m H m)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = random_input_scale(64, seed=1)
    x = torch.randn(200, 64) * torch.linspace(0.2, 3, 64)
    cw, h = x.square().mean(0), x.t() @ x
    ql = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="torch"), channel_weight=cw, input_scale=m)
    ws = lin.weight / m
    expect = quantize_weight(ws, 32, "search", channel_weight=cw * m.square())
    assert torch.equal(ql.qweight, pack_int4(expect.q)) and torch.equal(ql.zeros, expect.zeros)
    qg = QuantLinear.from_linear(lin, QuantConfig(group_size=32, method="gptq", backend="torch"), hessian=h,
                                 input_scale=m)
    expect = gptq_quantize(ws, m[:, None] * h * m[None, :], 32, damp=QuantConfig().gptq_damp)
    assert torch.equal(qg.qweight, pack_int4(expect.q)) and torch.equal(qg.scales, expect.scales)


def test_bad_input_scales_are_named():
    lin = nn.Linear(64, 32)
    cfg = QuantConfig(group_size=32, backend="torch")
    with pytest.raises(ValueError, match=r"input_scale must be a tensor of shape \(64,\).*got \(32,\)"):
        QuantLinear.from_linear(lin, cfg, input_scale=torch.ones(32))
    for bad in (torch.zeros(64), -torch.ones(64), torch.full((64,), float("nan")), torch.ones(64, dtype=torch.int32)):
        with pytest.raises(ValueError, match="input_scale must hold finite positive floating-point multipliers"):
            QuantLinear.from_linear(lin, cfg, input_scale=bad)
    with pytest.raises(TypeError, match="input_scale='yes' must be True or False"):
        QuantLinear(64, 32, group_size=32, input_scale="yes")


def _outlier_mlp():
    """Two Linears whose inputs have a few channels ~30x the rest (as trained models' do); in an
    nn.Sequential no scale folds into a previous op, so input scales are the only way to scale them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).eval()
    gain = torch.ones(128)
    gain[[3, 40, 77, 101]] = 30.0

    def batch(seed):
        return torch.randn(6, 16, 128, generator=torch.Generator().manual_seed(seed)) * gain

    return model, batch


def _err(x, w, w_eff):
    return ((x @ (w_eff.float() - w).t()).norm() / (x @ w.t()).norm()).item()


def test_patch_model_scales_each_layer_no_worse_on_its_calibration_inputs():
    """The scale is searched per layer with alpha = 0 (none) a candidate, on the calibration inputs,
    under round to nearest: with method='rtn' each layer's error on those inputs is no larger than
    without a scale (up to the rounding of W / m), and the layer fed by the outlier channels gains."""
    model, batch = _outlier_mlp()
    calib = calibrate(model, [batch(i) for i in range(4)], progress=False)
    cfg = QuantConfig(group_size=32, method="rtn", backend="torch", min_out_features=1)
    plain_model = _copy(model)
    plain = patch_model(plain_model, cfg, calibration=calib, progress=False)
    scaled_model = _copy(model)
    report = patch_model(scaled_model, cfg.replace(input_scales=True), calibration=calib, progress=False)
    assert scaled_model[0].input_scale is not None  # the outliers make alpha > 0 win there
    assert "input scale (AWQ, alpha=" in report.decisions[0].reason
    assert any(n.startswith("input scales: ") and " of the 2 layers quantized now" in n for n in report.notes)
    errs = {}
    for i in (0, 2):
        x, w = calib.stats[str(i)].sample, model[i].weight.detach()
        errs[i] = (_err(x, w, plain_model[i].dequantized_weight()), _err(x, w, scaled_model[i].dequantized_weight()))
        assert errs[i][1] <= errs[i][0] * (1 + 1e-3), errs
    assert errs[0][1] < 0.7 * errs[0][0], errs  # AWQ's point: the error on the salient channels shrinks
    # the bytes: the report counts the multipliers
    scaled_bytes = sum(d.bytes_after for d in report.decisions)
    extra = sum(m.input_scale.numel() * 4 for m in scaled_model if isinstance(m, QuantLinear) and m.input_scale is not None)
    assert scaled_bytes == plain.bytes_after + extra


def test_dequantize_model_keeps_the_scaled_function():
    model, batch = _outlier_mlp()
    calib = calibrate(model, [batch(i) for i in range(4)], progress=False)
    patch_model(model, QuantConfig(group_size=32, backend="torch", min_out_features=1, input_scales=True),
                calibration=calib, progress=False)
    x = batch(9)
    with torch.no_grad():
        y = model(x)
        dequantize_model(model)
        assert isinstance(model[0], nn.Linear)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_input_scales_need_calibration():
    model, _ = _outlier_mlp()
    with pytest.raises(ValueError, match="input_scales searches each layer's scale on its calibration inputs"):
        patch_model(model, QuantConfig(input_scales=True, min_out_features=1), progress=False)
    assert isinstance(model[0], nn.Linear)  # refused before anything changed


def test_no_scale_without_calibration_inputs_or_gain():
    lin = nn.Linear(64, 64)
    assert search_input_scale(lin, None, 32) is None
    model = nn.Sequential(lin)
    calib = calibrate(model, [torch.randn(4, 8, 64)], progress=False)  # no outliers: alpha = 0 may win
    found = search_input_scale(lin, calib.stats["0"], 32)
    assert found is None or (0 < found[0] <= 1 and found[1].shape == (64,) and (found[1] > 0).all())


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _scaled_tiny_model():
    from minicpm_int4.tiny import build_native

    model = build_native("4_6")
    ids = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calib = calibrate(model, ids, progress=False)
    # the layers where no scale folds (o_proj, out_proj, ...) get input scales where the search finds one
    report = patch_model(model, QuantConfig(group_size=32, method="gptq", input_scales=True), calibration=calib,
                         progress=False)
    scaled = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert scaled, report.notes
    return model, ids[0], scaled


@pytest.mark.skipif(not NATIVE, reason="the native MiniCPM-V 4.6 class needs transformers 5.x")
def test_checkpoints_keep_the_input_scales(tmp_path):
    model, ids, scaled = _scaled_tiny_model()
    with torch.no_grad():
        expected = model(ids).logits
    save_quantized(model, tmp_path / "q")
    loaded = load_pretrained_quantized(str(tmp_path / "q"), progress=False)
    got = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert got == scaled
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    # into a model patched already without them: a named mismatch, not a silent wrong answer
    from minicpm_int4.tiny import build_native

    other = build_native("4_6")
    patch_model(other, QuantConfig(group_size=32), progress=False)
    with pytest.raises(CheckpointMismatchError, match="has input_scale=True but the model's QuantLinear has "
                                                      "input_scale=False"):
        load_quantized(other, str(tmp_path / "q"), progress=False)


@pytest.mark.skipif(not NATIVE, reason="the native MiniCPM-V 4.6 class needs transformers 5.x")
def test_transformers_save_and_from_pretrained_keep_the_input_scales(tmp_path):
    from minicpm_int4.hf_integration import register

    assert register() is None  # transformers 5.x has the quantizer registry
    model, ids, scaled = _scaled_tiny_model()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    got = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert got == scaled
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_triton_backend_and_compile_with_an_input_scale():
    """The input scale goes into the layer's op: the Triton decode kernel (here the interpreter) multiplies
    it into its loads of x, and a fullgraph compile traces the op with it."""
    if not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")  # (test_gpu.py has its compiled-kernel twin)
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).half()
    m = random_input_scale(64, seed=2)
    tri = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="triton"), input_scale=m)
    ref = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="torch"), input_scale=m)
    x = torch.randn(3, 64).half()
    y, y_ref = tri(x), ref(x)
    # both backends multiply x by the same stored m, then run their GEMM on the same int4 weight
    w_int4 = QuantLinear.dequantized_weight(_without_input_scale(ref))
    assert_gemm_close(y, y_ref, x * ref.input_scale, w_int4)
    compiled = torch.compile(ref, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), y_ref)


@pytest.mark.parametrize("rows", [3, 17, 40])
def test_w4a8_layer_multiplies_the_input_scale_inside_its_activation_quantizer(rows, monkeypatch):
    """A W4A8 layer hands its input scale to its op; from W4A8_MIN_M rows on, the Triton activation
    quantizer multiplies it in its one pass over x (no pass of its own), with the bits of the plain
    layer on x * m; below, the W4A16 decode path multiplies first. Eager and a fullgraph compile."""
    from minicpm_int4 import ops

    if not ops.triton_interpreter_active():
        pytest.skip("needs TRITON_INTERPRET=1")
    kernels = ops._triton_kernels()[0]
    seen = []
    quantizer = kernels.quantize_per_token_int8_triton
    monkeypatch.setattr(kernels, "quantize_per_token_int8_triton",
                        lambda x, input_scale=None, input_perm=None, warps=None: seen.append((x, input_scale))
                        or quantizer(x, input_scale, input_perm, warps))
    torch.manual_seed(rows)
    lin = nn.Linear(64, 48).half()
    m = random_input_scale(64, seed=3)
    tri = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="triton", act="int8"), input_scale=m)
    plain = _without_input_scale(tri)
    x = torch.randn(rows, 64).half()
    y = tri(x)
    assert torch.equal(y, plain(x * tri.input_scale))
    if rows >= ops.W4A8_MIN_M:
        # the layer's own input (not x * m) reached the quantizer, with the scale
        assert torch.equal(seen[0][0], x) and seen[0][1] is tri.input_scale
    else:
        assert not seen
    ref = QuantLinear.from_linear(lin, QuantConfig(group_size=32, backend="torch", act="int8"), input_scale=m)
    compiled = torch.compile(ref, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ref(x))


def _without_input_scale(ql):
    plain = QuantLinear(ql.in_features, ql.out_features, bias=ql.bias is not None, group_size=ql.group_size,
                        dtype=ql.dtype, act=ql.act, backend=ql.backend)
    plain.load_state_dict({k: v for k, v in ql.state_dict().items() if k != "input_scale"})
    return plain


@pytest.mark.parametrize("config, named, flags", [
    (QuantConfig(input_scales=True), r"QuantConfig\(input_scales=True\)", "--input-scales"),
    (QuantConfig(method="gptq", input_scales=True), r"QuantConfig\(method='gptq', input_scales=True\)",
     "--method gptq --input-scales"),
    (QuantConfig(keep_most_sensitive=2), r"QuantConfig\(keep_most_sensitive / weight_budget_bytes\)",
     "--keep-most-sensitive K / --weight-budget-mib B"),
])
def test_quantizing_inside_from_pretrained_refuses_what_needs_calibration(config, named, flags):
    """from_pretrained(quantization_config=...) quantizes without calibration inputs: what needs them is
    refused where the config object is made, not deep inside loading, naming the CLI's flags for it."""
    from minicpm_int4.hf_integration import quantization_config

    with pytest.raises(ValueError, match=named + " needs calibration inputs, which quantizing inside from_pretrained"
                       + ".*minicpm-int4 quantize MODEL OUT " + flags + " --calibration prompts.txt"):
        quantization_config(config)


@pytest.mark.skipif(not NATIVE, reason="the native MiniCPM-V 4.6 class needs transformers 5.x")
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_with_input_scales_the_folds_run_for_every_method(method):
    """input_scales asks for a scale on every layer: where one folds into the previous op (free at
    runtime) it is folded, also with gptq and rtn (without input_scales only the search folds), and
    only the other layers hold an input_scale."""
    from minicpm_int4.models import scale_fold_groups
    from minicpm_int4.tiny import build_native

    def patched(input_scales):
        model = build_native("4_6")
        foldable = {c for _, cons, _ in scale_fold_groups(model) for c in cons}
        ids = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
        with warnings.catch_warnings():  # gptq's few-calibration-tokens warning: beside the point here
            warnings.simplefilter("ignore", UserWarning)
            report = patch_model(model, QuantConfig(group_size=32, method=method, input_scales=input_scales),
                                 calibration=calibrate(model, ids, progress=False), progress=False)
        return model, foldable, report

    model, foldable, report = patched(True)
    folded = [d.name for d in report.decisions if "folded into" in d.reason]
    assert folded and set(folded) <= foldable
    assert any(n.startswith("AWQ scales folded for ") for n in report.notes)
    scaled = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert not scaled & foldable
    _, _, plain = patched(False)
    assert not any("folded into" in d.reason for d in plain.decisions)


def test_a_group_whose_fold_search_chose_no_scale_gets_no_runtime_scale():
    """Runtime multipliers only where no scale can fold: the q/k/v of a block whose input_layernorm group
    searched and chose alpha = 0 keep no scale (each alone might have taken one, at a runtime cost the
    fold would not have had); the layers outside every fold group (o_proj, GQA) may take one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minicpm_int4.models import scale_fold_groups

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).half().eval()  # fp16: here layer 0's q/k/v group searches to alpha = 0
    groups = {c for _, cons, _ in scale_fold_groups(model) for c in cons}
    g = torch.Generator().manual_seed(0)
    calib = calibrate(model, [torch.randint(0, 160, (1, 32), generator=g) for _ in range(4)], progress=False)
    report = patch_model(model, QuantConfig(group_size=32, input_scales=True, backend="torch"), calibration=calib,
                         progress=False)
    folded = {d.name for d in report.decisions if "folded into" in d.reason}
    scaled = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert "model.layers.0.self_attn.q_proj" in groups - folded  # the case this test is about
    assert not scaled & groups
    assert scaled <= {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} - groups
