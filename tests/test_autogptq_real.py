"""GPTQ reading and conversion checked against AutoGPTQ itself (auto-gptq 0.7.1, its last release, built
without its CUDA kernels).

The GPTQ checkpoint tests (test_foreign) pack with a packer written there (gptq_pack); these check it
against AutoGPTQ's own QuantLinear.pack, and check patch_model's conversion of AutoGPTQ's live layers -
what AutoGPTQ's from_quantized (and transformers 4.x through optimum) builds with exllama disabled, as
OpenBMB's instructions for MiniCPM-o 2.6 int4 do - against AutoGPTQ's own forward (the pure-torch path
it takes without its kernels): the same weight bit for bit, act-order (desc_act) included.

CI installs auto-gptq in its transformers 4.55 stage (.ci/run) with MINICPM_INT4_REQUIRE_AUTOGPTQ=1, so
these run there and fail rather than skip if it is missing; elsewhere they skip, naming why. AutoGPTQ's
top-level import pulls in its whole quantizer: the tests load only its layer modules (helpers.load_submodules).
"""
import os
import warnings

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, patch_model
from minicpm_int4.patch import convertible_foreign

from helpers import assert_close_to_unfused_bias, load_submodules, record_layer_io
from test_foreign import _act_order_g_idx, _random_layer, gptq_pack

KERNELS = {"cuda": "qlinear_cuda", "cuda-old": "qlinear_cuda_old", "triton": "qlinear_triton"}


@pytest.fixture(scope="module")
def autogptq():
    """AutoGPTQ's QuantLinear classes, by QUANT_TYPE, and its exllama one (which is not converted)."""
    gen = load_submodules("auto_gptq", [f"nn_modules.qlinear.{m}" for m in (*KERNELS.values(), "qlinear_exllama")])
    mods = next(gen)
    if mods is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_AUTOGPTQ") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_AUTOGPTQ=1 but auto-gptq is not installed")
        pytest.skip("auto-gptq is not installed (CI installs it in its transformers 4.55 stage)")
    classes = {kernel: getattr(mods, m).QuantLinear for kernel, m in KERNELS.items()}
    assert all(cls.QUANT_TYPE == kernel for kernel, cls in classes.items())
    classes["exllama"] = mods.qlinear_exllama.QuantLinear
    yield classes
    next(gen, None)


def _pack(cls, q, z, s, group_size, g_idx=None, bias=None, dtype=torch.float16):
    """AutoGPTQ's own packing (QuantLinear.pack, as its quantizer calls it: scales and integer zero points
    [N, G], g_idx [K]) of the weight (q - z) * s in `dtype` (with power-of-two scales exact, so that pack's
    round((W + z s) / s) gives back q), into a layer holding `dtype` scales and bias (AutoGPTQ's
    weight_dtype: bf16 where a model is loaded with torch_dtype=torch.bfloat16)."""
    n, k = q.shape
    gs = k if group_size == -1 else group_size
    gi = (torch.arange(k) // gs) if g_idx is None else g_idx.long()
    w = (q.float() - z.float()[:, gi]) * s.float()[:, gi]
    lin = nn.Linear(k, n, bias=bias is not None).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias)
    layer = cls(4, group_size, k, n, bias is not None, weight_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.pack(lin, s.clone(), z.to(torch.int32).clone(), gi.to(torch.int32))
    return layer


def _pow2_layer(n, k, group_size, seed):
    """q, integer zero points 1..15 (a v1 zero point of 0 is unreadable: test_foreign) and power-of-two
    scales [N, G]."""
    q, z, _ = _random_layer(n, k, group_size, seed=seed, zmin=1)
    g = torch.Generator().manual_seed(seed + 1)
    s = torch.pow(2.0, -torch.randint(5, 11, z.shape, generator=g).float()).half()
    return q, z, s


@pytest.mark.parametrize("kernel", ["cuda", "cuda-old", "triton"])
@pytest.mark.parametrize("n, k, group_size", [(64, 96, 32), (32, 256, 128), (64, 128, -1)])
def test_test_packer_is_autogptqs_packing(autogptq, kernel, n, k, group_size):
    """test_foreign.gptq_pack, which every GPTQ checkpoint test packs with, writes the words AutoGPTQ's
    QuantLinear.pack writes (the v1 format: zero points stored minus 1)."""
    q, z, s = _pow2_layer(n, k, group_size, seed=n + k)
    layer = _pack(autogptq[kernel], q, z, s, group_size)
    mine = gptq_pack(q, z, s, v1=True, group_size=k if group_size == -1 else group_size)
    for t in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(layer, t), mine[t]), t


def _their_weight(layer):
    """The weight AutoGPTQ's forward computes with, [N, K]: its output for the identity (one product per
    output, so exact), without the bias."""
    bias, layer.bias = layer.bias, None
    try:
        with torch.no_grad():
            return layer(torch.eye(layer.infeatures, dtype=layer.scales.dtype)).t().contiguous()
    finally:
        layer.bias = bias


BF16 = torch.bfloat16
CASES = {  # name: (kernel, N, K, group size, act-order, bias, dtype)
    "cuda_g32_act": ("cuda", 64, 128, 32, True, True, torch.float16),
    "cuda_g128_act": ("cuda", 32, 256, 128, True, False, torch.float16),
    "cuda_g64_bf16": ("cuda", 96, 128, 64, False, True, BF16),
    "old_g64": ("cuda-old", 64, 192, 64, False, True, torch.float16),
    # MiniCPM-o 2.6 int4 as OpenBMB loads it: per channel (its act-order is then no reordering), bf16
    "old_per_row_bf16": ("cuda-old", 32, 160, -1, False, False, BF16),  # (AutoGPTQ packs K in 32s)
    "triton_g32_act": ("triton", 64, 96, 32, True, False, torch.float16),
}


def test_patch_model_converts_autogptq_layers_exactly(autogptq):
    """A model holding AutoGPTQ layers of its cuda, cuda-old and triton kernels (groups of 32 / 64 / 128 and
    one per row; act-order; bias or none; fp16 and bf16 scales) and one exllama layer: patch_model converts
    the first ones into QuantLinears whose weight, in input-channel order, is bit for bit the one AutoGPTQ
    computes with (its cuda layer's forward for the triton one, whose forward needs a GPU: the same buffers
    mean the same weight), and whose output is AutoGPTQ's own forward's within the GEMM bound of the dtype
    (M = 1, 3, 17); the exllama layer (its kernel reorders the buffers on the GPU) is listed and left."""
    model, theirs, xs = nn.ModuleDict(), {}, {}
    for i, (name, (kernel, n, k, gs, act_order, bias, dtype)) in enumerate(CASES.items()):
        q, z, s = _random_layer(n, k, gs, seed=i, zmin=1, dtype=dtype)
        g_idx = _act_order_g_idx(k, gs, seed=50 + i) if act_order else None
        b = (torch.randn(n) * 0.1).to(dtype) if bias else None
        model[name] = _pack(autogptq[kernel], q, z, s, gs, g_idx, b, dtype)
        twin = model[name] if kernel != "triton" else _pack(autogptq["cuda"], q, z, s, gs, g_idx, b, dtype)
        xs[name] = [torch.randn(m, k).to(dtype) for m in (1, 3, 17)]
        with torch.no_grad():
            theirs[name] = (_their_weight(twin), [twin(x) for x in xs[name]])
    model["exl"] = autogptq["exllama"](4, 32, 128, 32, False)
    assert [convertible_foreign(m) for m in model.values()] == ["gptq"] * len(CASES) + [None]

    with pytest.warns(UserWarning, match=r"1 layer\(s\) already quantized by another package \(auto_gptq QuantLinear\)"):
        report = patch_model(model, QuantConfig(backend="torch"), progress=False)
    by = {d.name: d for d in report.decisions}
    assert (by["exl"].action, by["exl"].path) == ("kept", "other")
    assert f"{len(CASES)} AutoGPTQ QuantLinear layer(s) converted exactly" in " ".join(report.notes)
    for name, (kernel, n, k, gs, act_order, bias, dtype) in CASES.items():
        ql = model[name]
        assert isinstance(ql, QuantLinear) and by[name].action == "converted", name
        assert ql.group_size == gs and (ql.input_perm is not None) == act_order and (ql.bias is not None) == bias
        assert ql.scales.dtype == dtype and by[name].dtype == str(dtype).replace("torch.", "")
        w, ys = theirs[name]
        assert torch.equal(ql.dequantized_weight(), w), name
        for x, y in zip(xs[name], ys):
            with torch.no_grad():
                assert_close_to_unfused_bias(ql(x), y, x, w, ql.bias)


def test_autogptq_layers_that_do_not_compute_the_checkpoint_are_left(autogptq):
    """Kept, with the reason, where the conversion could not compute what the layer computes: a cuda-old
    layer holding an act-order g_idx (its kernels ignore g_idx), a stored zero point of 15 (a v1 zero point
    of 0: AutoGPTQ's kernels read it as 0 or as 16, depending on the kernel) and a group size the kernels
    lack."""
    q, z, s = _random_layer(32, 128, 32, seed=7, zmin=1)
    act = _pack(autogptq["cuda-old"], q, z, s, 32)
    act.g_idx = _act_order_g_idx(128, 32, seed=8)
    z0 = z.clone()
    z0[3, 1] = 0
    zero = _pack(autogptq["cuda"], q, z0, s, 32)
    q16, z16, s16 = _random_layer(32, 128, 16, seed=9, zmin=1)
    g16 = _pack(autogptq["cuda"], q16, z16, s16, 16)
    model = nn.ModuleDict({"act": act, "zero": zero, "g16": g16})
    with pytest.warns(UserWarning) as record:
        report = patch_model(model, QuantConfig(backend="torch"), progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "act: an act-order g_idx in AutoGPTQ's cuda-old layer, whose kernels ignore it" in text
    assert "zero.qzeros: a zero point reads 16 after the v1 format's +1" in text
    assert "g16: group_size=16" in text
    assert [(d.action, d.path) for d in report.decisions] == [("kept", "other")] * 3
    assert all(type(m).__name__ == "QuantLinear" and not isinstance(m, QuantLinear) for m in model.values())


@pytest.fixture(scope="module")
def autogptq_loading():
    """AutoGPTQ's make_quant (what its from_quantized runs to build the int4 layers) and
    dynamically_import_QuantLinear (which of its kernels it picks)."""
    gen = load_submodules("auto_gptq", ["utils.import_utils", "modeling._utils"], bypass=("utils", "modeling"))
    mods = next(gen)
    if mods is None:
        if os.environ.get("MINICPM_INT4_REQUIRE_AUTOGPTQ") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_AUTOGPTQ=1 but auto-gptq is not installed")
        pytest.skip("auto-gptq is not installed (CI installs it in its transformers 4.55 stage)")
    yield mods
    next(gen, None)


def test_minicpmo26_layout_loaded_as_autogptq_loads_its_int4(autogptq_loading):
    """End to end on a MiniCPM-o 2.6-layout model (Qwen2 LLM, SigLIP vision tower, resampler, Whisper audio
    encoder, TTS heads) in bf16, built as AutoGPTQ's from_quantized builds OpenBMB's MiniCPM-o 2.6 int4 (per
    channel, desc_act, exllama and exllamav2 disabled, torch_dtype=bfloat16): its make_quant puts its cuda-old
    layers (the kernel it picks for that) in the LLM's decoder, packed by their own pack (as the checkpoint
    was); patch_model converts every one of them, quantizes nothing else when told to exclude the other
    parts, and each QuantLinear computes AutoGPTQ's output for the activations the model fed that layer."""
    from minicpm_int4.tiny import build_remote_layout, remote_inputs

    picked = autogptq_loading.import_utils.dynamically_import_QuantLinear(
        use_triton=False, desc_act=True, group_size=-1, bits=4, disable_exllama=True, disable_exllamav2=True)
    assert picked.QUANT_TYPE == "cuda-old"
    model = build_remote_layout("qwen2", dtype=torch.bfloat16, omni=True)
    fp = {name: m for name, m in model.llm.named_modules()
          if isinstance(m, nn.Linear) and name.startswith("model.layers.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        autogptq_loading._utils.make_quant(model.llm, list(fp), bits=4, group_size=-1, desc_act=True,
                                           disable_exllama=True, disable_exllamav2=True)
    layers = {name: model.llm.get_submodule(name) for name in fp}
    assert {type(m).QUANT_TYPE for m in layers.values()} == {"cuda-old"} and len(layers) >= 7 * 2
    for i, (name, layer) in enumerate(layers.items()):
        n, k = fp[name].weight.shape
        q, z, s = _pow2_layer(n, k, -1, seed=200 + i)
        w = (q.float() - z.float()) * s.float()  # one group: [N, 1] broadcasts
        with torch.no_grad():
            fp[name].weight.copy_(w.to(torch.bfloat16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.pack(fp[name], s.to(torch.bfloat16), z.to(torch.int32), torch.zeros(k, dtype=torch.int32))
    assert all(m.scales.dtype == torch.bfloat16 for m in layers.values())

    ids, pv = remote_inputs(model)
    seen = record_layer_io(model, layers, ids, pv)
    weights = {name: _their_weight(m) for name, m in layers.items()}

    report = patch_model(model, QuantConfig(backend="torch", exclude=("vpm*", "resampler*", "llm.lm_head")),
                         progress=False)
    by = {d.name: d for d in report.decisions}
    for name in layers:
        full = f"llm.{name}"
        ql = model.get_submodule(full)
        assert isinstance(ql, QuantLinear) and by[full].action == "converted" and by[full].part == "llm", full
        assert ql.group_size == -1 and ql.input_perm is None and ql.scales.dtype == torch.bfloat16
        assert torch.equal(ql.dequantized_weight(), weights[name]), full
        x, y = seen[name]
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            assert_close_to_unfused_bias(ql(x2), y.reshape(x2.shape[0], -1), x2, weights[name], ql.bias)
    assert f"{len(layers)} AutoGPTQ QuantLinear layer(s) converted exactly" in " ".join(report.notes)
    others = [d for d in report.decisions if not d.name.startswith("llm.model.layers.")]
    assert others and all(d.action == "kept" for d in others)  # vision, resampler, audio, TTS, lm_head
    assert {d.part for d in others} >= {"vision", "audio", "tts"}
    with torch.no_grad():
        assert torch.isfinite(model(ids, pv).logits).all()
