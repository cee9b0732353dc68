"""The AutoAWQ conversion checked against AutoAWQ itself (autoawq 0.2.9, its last release; pure Python).

The other AWQ tests use a stand-in class and a packer written in test_foreign (awq_pack); these use
AutoAWQ's own WQLinear_GEMM - the layer transformers 4.x builds when it loads an AWQ checkpoint, which
is how the remote-code MiniCPM-V 2.x models (pinned to transformers 4.40 - 4.55) run AWQ - packed by its
own from_linear, dequantized by its own packing_utils.dequantize_gemm and run by its own forward (the
pure-torch path it takes without its CUDA kernels).

CI installs autoawq in its transformers 4.55 stage (.ci/run) with MINICPM_INT4_REQUIRE_AUTOAWQ=1, so
these run there and fail rather than skip if it is missing; elsewhere they skip, naming why.

AutoAWQ's top-level `import awq` imports its whole quantizer (datasets, its model zoo): the tests load
only its layer and packing modules, with the package's __init__ bypassed (and restored afterwards).
"""
import os
import types

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, patch_model
from helpers import assert_close_to_unfused_bias, dequant, load_submodules, record_layer_io
from test_foreign import _random_layer, awq_pack


@pytest.fixture(scope="module")
def autoawq():
    """AutoAWQ's layer module (WQLinear_GEMM) and its packing utilities."""
    gen = load_submodules("awq", ("modules.linear.gemm", "utils.packing_utils"))
    mods = next(gen)
    if mods is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_AUTOAWQ") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_AUTOAWQ=1 but autoawq is not installed")
        pytest.skip("autoawq is not installed (CI installs it in its transformers 4.55 stage)")
    yield types.SimpleNamespace(gemm=mods.gemm, packing=mods.packing_utils, WQLinear_GEMM=mods.gemm.WQLinear_GEMM)
    next(gen, None)


@pytest.fixture
def naive_forward(autoawq, monkeypatch):
    """AutoAWQ's forward without its CUDA / Triton kernels: dequantize_gemm, then torch.matmul in fp16."""
    monkeypatch.setattr(autoawq.gemm, "awq_ext", None)
    monkeypatch.setattr(autoawq.gemm, "TRITON_AVAILABLE", False)
    monkeypatch.setattr(autoawq.gemm, "user_has_been_warned", True)


def _from_linear(autoawq, w, z, s, group_size, bias=None):
    """AutoAWQ's own packing of weight w [N, K] with zero points z and scales s [N, G] (it takes them as
    [G, N], as its quantizer hands them over)."""
    n, k = w.shape
    lin = nn.Linear(k, n, bias=bias is not None).half()
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return autoawq.WQLinear_GEMM.from_linear(lin, 4, group_size, scales=s.t().contiguous().half(),
                                             zeros=z.t().contiguous().half())


@pytest.mark.parametrize("n, k, group_size", [(64, 96, 32), (32, 256, 128), (32, 136, -1)])
def test_test_packer_is_autoawqs_packing(autoawq, n, k, group_size):
    """test_foreign.awq_pack, which every AWQ checkpoint test packs with, writes the words AutoAWQ's
    from_linear writes for the same q, zero points and scales. (Power-of-two scales, so that from_linear's
    fp16 arithmetic, round((W + z s) / s), gives back q exactly.)"""
    q, z, _ = _random_layer(n, k, group_size, seed=n + k)
    g = torch.Generator().manual_seed(k)
    s = torch.pow(2.0, -torch.randint(5, 11, z.shape, generator=g).float()).half()
    w = ((q - z.repeat_interleave(k // z.shape[1], 1)).float() * s.float().repeat_interleave(k // z.shape[1], 1))
    layer = _from_linear(autoawq, w.half(), z, s, group_size if group_size != -1 else k)
    mine = awq_pack(q, z, s)
    assert torch.equal(layer.qweight, mine["qweight"]) and torch.equal(layer.qzeros, mine["qzeros"])
    assert torch.equal(layer.scales, mine["scales"])


def _quantized_like_autoawq(n, k, group_size, seed):
    """A random fp16 weight and AutoAWQ's asymmetric min-max zero points and scales for it ([N, G])."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    gs = k if group_size == -1 else group_size
    wg = w.float().view(n, k // gs, gs)
    mx, mn = wg.amax(-1), wg.amin(-1)
    s = ((mx - mn).clamp(min=1e-5) / 15).half()
    z = (-torch.round(mn / s.float())).clamp(0, 15)
    return w, z, s


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_model_converts_autoawq_layers_exactly(autoawq, naive_forward, backend):
    """A model holding AutoAWQ's WQLinear_GEMM layers (groups of 32, 64 and 128 and one group per row, bias
    or none): patch_model makes each a QuantLinear whose weight is bit for bit the weight AutoAWQ's
    dequantize_gemm gives, and whose output is AutoAWQ's own forward's within the fp16 GEMM tolerance
    (for M = 1, 3 and 17). A layer with a group size the kernels lack (16) is left, with a warning."""
    cases = {"g32": (64, 96, 32, True), "g64": (96, 128, 64, False), "g128": (32, 256, 128, True),
             "per_row": (64, 136, -1, True)}
    layers, weights = {}, {}
    for i, (name, (n, k, gs, bias)) in enumerate(cases.items()):
        w, z, s = _quantized_like_autoawq(n, k, gs, seed=i)
        b = (torch.randn(n) * 0.1).half() if bias else None
        layers[name] = _from_linear(autoawq, w, z, s, k if gs == -1 else gs, b)
        qw, qz, sc = layers[name].qweight, layers[name].qzeros, layers[name].scales
        weights[name] = autoawq.packing.dequantize_gemm(qw, qz, sc, 4, k if gs == -1 else gs).t()  # [N, K]
    w, z, s = _quantized_like_autoawq(32, 64, 16, seed=9)
    model = nn.ModuleDict({**layers, "g16": _from_linear(autoawq, w, z, s, 16)})
    xs = {name: [torch.randn(m, cases[name][1]).half() for m in (1, 3, 17)] for name in cases}
    theirs = {name: [model[name](x).reshape(x.shape[0], -1) for x in xs[name]] for name in cases}

    with pytest.warns(UserWarning, match="g16: already quantized by another package, not converted: g16: group_size=16"):
        report = patch_model(model, QuantConfig(backend=backend), progress=False)
    by = {d.name: d for d in report.decisions}
    assert (by["g16"].action, by["g16"].path) == ("kept", "other")
    assert type(model["g16"]).__name__ == "WQLinear_GEMM"
    for name, (n, k, gs, bias) in cases.items():
        ql = model[name]
        assert isinstance(ql, QuantLinear) and by[name].action == "converted"
        assert ql.group_size == gs and ql.scales.dtype == torch.float16 and (ql.bias is not None) == bias
        mine = dequant(ql.qweight, ql.scales, ql.zeros, k if gs == -1 else gs, torch.float16)
        assert torch.equal(mine, weights[name]), name
        for x, y_theirs in zip(xs[name], theirs[name]):
            assert_close_to_unfused_bias(ql(x), y_theirs, x, mine, ql.bias)


def test_converted_layer_repacks_to_autoawqs_words(autoawq):
    """The round trip: the canonical words patch_model holds, packed back with the test packer, are the
    words AutoAWQ wrote (so a converted model saved in AWQ's layout would be AutoAWQ's checkpoint)."""
    from minicpm_int4.packing import unpack_int4

    w, z, s = _quantized_like_autoawq(64, 128, 64, seed=3)
    layer = _from_linear(autoawq, w, z, s, 64)
    words = {t: getattr(layer, t).clone() for t in ("qweight", "qzeros", "scales")}
    model = nn.ModuleDict({"layer": layer})
    patch_model(model, QuantConfig(backend="torch"), progress=False)
    ql = model["layer"]
    back = awq_pack(unpack_int4(ql.qweight), ql.zeros.to(torch.int64), ql.scales)
    for t in words:
        assert torch.equal(back[t], words[t]), t


def test_minicpmv26_layout_loaded_as_transformers_loads_awq(autoawq, naive_forward):
    """End to end on a MiniCPM-V 2.6-layout model (Qwen2 LLM, SigLIP vision tower, resampler): transformers'
    own replace_with_awq_linear (what from_pretrained of an AWQ checkpoint runs, transformers 4.x) puts
    AutoAWQ layers in the LLM's decoder, their buffers are filled with AutoAWQ's packing of the fp16 weights
    (as loading the checkpoint does), then patch_model converts every one of them - the vision tower,
    resampler and lm_head excluded, as an AWQ checkpoint keeps them - and each QuantLinear computes
    AutoAWQ's output for the activations the model fed that layer (recorded with hooks)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"transformers {transformers.__version__} loads AWQ checkpoints into GPTQModel's layers, not "
                    "AutoAWQ's (CI runs this under transformers 4.55)")
    from transformers import AwqConfig
    from transformers.integrations import replace_with_awq_linear

    from minicpm_int4.tiny import build_remote_layout, remote_inputs

    model = build_remote_layout("qwen2", dtype=torch.float16)
    fp16 = {name: m for name, m in model.llm.model.named_modules() if isinstance(m, nn.Linear)}
    cfg = AwqConfig(bits=4, group_size=32, zero_point=True, version="gemm")
    out = replace_with_awq_linear(model.llm.model, quantization_config=cfg)
    replaced = out[0] if isinstance(out, tuple) else out
    assert replaced is model.llm.model
    awq_layers = {name: m for name, m in model.llm.model.named_modules() if type(m).__name__ == "WQLinear_GEMM"}
    assert sorted(awq_layers) == sorted(fp16) and len(awq_layers) >= 7 * 2  # q k v o gate up down, per layer
    for i, (name, layer) in enumerate(awq_layers.items()):
        w, z, s = _quantized_like_autoawq(*fp16[name].weight.shape, 32, seed=100 + i)
        packed = _from_linear(autoawq, w, z, s, 32, fp16[name].bias)
        layer.load_state_dict(packed.state_dict())

    ids, pv = remote_inputs(model)
    seen = record_layer_io(model, awq_layers, ids, pv)

    report = patch_model(model, QuantConfig(backend="torch", exclude=("vpm*", "resampler*", "llm.lm_head")),
                         progress=False)
    by = {d.name: d for d in report.decisions}
    for name, layer in awq_layers.items():
        full = f"llm.model.{name}"
        ql = model.get_submodule(full)
        assert isinstance(ql, QuantLinear) and by[full].action == "converted" and by[full].part == "llm", full
        w = autoawq.packing.dequantize_gemm(layer.qweight, layer.qzeros, layer.scales, 4, 32).t()
        mine = dequant(ql.qweight, ql.scales, ql.zeros, 32, torch.float16)
        assert torch.equal(mine, w), full
        x, y_theirs = seen[name]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            assert_close_to_unfused_bias(ql(x2), y_theirs.reshape(x2.shape[0], -1), x2, mine, ql.bias)
    assert f"{len(awq_layers)} AutoAWQ WQLinear_GEMM layer(s) converted exactly" in " ".join(report.notes)
    assert all(d.action == "kept" for d in report.decisions if d.name.startswith(("vpm", "resampler")))
    with torch.no_grad():
        assert torch.isfinite(model(ids, pv).logits).all()


def test_autoawq_fused_mlp_is_listed_kept_and_its_down_proj_converted(autoawq, monkeypatch):
    """AutoAWQ's fused MLP (its from_quantized(fuse_layers=True), transformers' do_fuse) keeps its gate and
    up projections' tensors as its own buffers and runs them with its CUDA kernels: patch_model lists it
    as kept, with the warning; its down_proj, a WQLinear_GEMM it calls as a module, is converted. (Its
    kernels are not installed here: a stand-in namespace lets the real class be built.)"""
    gen = load_submodules("awq", ("modules.fused.mlp",))
    fused_mod = next(gen).mlp
    try:
        monkeypatch.setattr(fused_mod, "awq_ext", types.SimpleNamespace(gemm_forward_cuda=None), raising=False)
        layers = [_from_linear(autoawq, *_quantized_like_autoawq(n, k, 32, seed=i), 32)
                  for i, (n, k) in enumerate([(128, 64), (64, 128), (128, 64)])]
        model = nn.ModuleDict({"mlp": fused_mod.QuantFusedMLP(*layers)})
        with pytest.warns(UserWarning, match=r"1 layer\(s\) already quantized by another package \(awq QuantFusedMLP\)"):
            report = patch_model(model, QuantConfig(backend="torch"), progress=False)
        by = {d.name: d for d in report.decisions}
        assert (by["mlp"].action, by["mlp"].path) == ("kept", "other") and by["mlp.down_proj"].action == "converted"
        assert isinstance(model["mlp"].down_proj, QuantLinear)
    finally:
        next(gen, None)
