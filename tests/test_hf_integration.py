"""transformers' own save_pretrained / from_pretrained on int4 models (hf_integration.py), under every
transformers CI runs: 5.x, and 4.55 / 4.40 (.ci/run), where what differs is named."""
import importlib.util
import json

import pytest
import torch

import transformers
from minicpm_int4 import QuantConfig, QuantLinear, patch_model, save_quantized
from minicpm_int4.checkpoint import load_pretrained_quantized
from minicpm_int4.hf_integration import QUANT_METHOD, quantization_config, register

TF_MAJOR = int(transformers.__version__.split(".")[0])
NO_REGISTRY = register()
# transformers 4.x builds a quantized model under accelerate's init_empty_weights
NEEDS_ACCELERATE = not NO_REGISTRY and TF_MAJOR < 5 and importlib.util.find_spec("accelerate") is None


def _fp_llama(path, dtype=torch.float16, tie=False):
    """A tiny Llama written with save_pretrained (a class every transformers 4.40+ / 5.x has)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return _load(path, dtype)


def _load(path, dtype=torch.float16, **kwargs):
    from transformers import LlamaForCausalLM

    key = "dtype" if TF_MAJOR >= 5 else "torch_dtype"
    return LlamaForCausalLM.from_pretrained(path, **{key: dtype}, **kwargs).eval()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 14, 15, 92, 65, 35]])).logits


def _check_loaded(model, expected_logits, names):
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == names
    for m in layers.values():  # the split-K counters: real, zero, beside the weights (4.x left them on meta)
        assert m.workspace.device == m.qweight.device and torch.count_nonzero(m.workspace) == 0
    assert torch.equal(_logits(model), expected_logits)


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """A patched model saved by transformers' save_pretrained carries its int4 record in config.json;
    from_pretrained builds the QuantLinears and loads the int4 tensors (before: the Linears' weights
    loaded as missing, i.e. random, with a warning). The same folder, sharded or not, and a
    save_quantized folder load through both load paths with the same bits."""
    model = _fp_llama(tmp_path / "fp")
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    names = {d.name for d in report.quantized}
    expected = _logits(model)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and set(qc["modules"]) == names and qc["config"]["group_size"] == 32
    _check_loaded(load_pretrained_quantized(str(out), progress=False), expected, names)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    _check_loaded(load_pretrained_quantized(str(sharded), progress=False), expected, names)
    ours = tmp_path / "ours"
    save_quantized(model, ours)
    if NEEDS_ACCELERATE:
        with pytest.raises(ImportError, match=r"needs accelerate \(pip install accelerate\); "
                                              r"minicpm_int4.checkpoint.load_pretrained_quantized\(path\) loads it"):
            _load(out)
        return
    for folder in (out, sharded, ours):
        _check_loaded(_load(folder), expected, names)
    if TF_MAJOR >= 5:  # generate() may compile the decode step of a model whose quantizer says it compiles
        assert _load(out).hf_quantizer.is_compileable
    # a bf16 load of the fp16 checkpoint: the layers follow the model's dtype, as nn.Linear's do
    bf16 = _load(out, torch.bfloat16)
    layer = bf16.get_submodule(sorted(names)[0])
    assert layer.scales.dtype == torch.bfloat16 and _logits(bf16).dtype == torch.bfloat16


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
@pytest.mark.skipif(NEEDS_ACCELERATE, reason=f"transformers {transformers.__version__} needs accelerate "
                                             "for quantizers, which is not installed")
def test_import_order_does_not_matter(tmp_path):
    """A fresh interpreter: `import minicpm_int4` before transformers does not import transformers'
    quantizer registry (~2 s), yet from_pretrained finds the method (the import hook registers it when
    transformers loads the registry); and after transformers, it registers at once."""
    import subprocess
    import sys

    model = _fp_llama(tmp_path / "fp")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    model.save_pretrained(tmp_path / "hf")
    load = (f"from transformers import LlamaForCausalLM\n"
            f"m = LlamaForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})\n"
            "assert type(m.model.layers[0].mlp.down_proj).__name__ == 'QuantLinear'\n")
    first = "import sys, minicpm_int4\nassert 'transformers.quantizers' not in sys.modules\n" + load
    after = "import transformers.modeling_utils, minicpm_int4\n" + load
    for code in (first, after):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
@pytest.mark.skipif(NEEDS_ACCELERATE, reason=f"transformers {transformers.__version__} needs accelerate "
                                             "for quantizers, which is not installed")
def test_quantize_while_loading(tmp_path):
    """from_pretrained(fp checkpoint, quantization_config=...) loads the fp weights, then patch_model:
    the same layers and bits as patching by hand."""
    by_hand = _fp_llama(tmp_path / "fp")
    report = patch_model(by_hand, QuantConfig(group_size=32), progress=False)
    loaded = _load(tmp_path / "fp", quantization_config=quantization_config(QuantConfig(group_size=32)))
    _check_loaded(loaded, _logits(by_hand), {d.name for d in report.quantized})


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
def test_tied_head_saved_once_by_save_pretrained(tmp_path):
    """save_pretrained stores a tied lm_head / embedding once; loading gives one tensor again."""
    model = _fp_llama(tmp_path / "fp", tie=True)
    patch_model(model, QuantConfig(group_size=32), progress=False)
    model.save_pretrained(tmp_path / "hf")
    loaded = load_pretrained_quantized(str(tmp_path / "hf"), progress=False)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(_logits(loaded), _logits(model))


def test_an_int4_lm_head_tied_to_the_embeddings_is_untied(tmp_path):
    """quantize_lm_head on a model whose lm_head is tied to the input embeddings: the lm_head becomes int4
    and the embeddings stay fp16, so the model is untied, which the report and config.tie_word_embeddings
    say. Before, transformers' tie_weights() (from_pretrained, resize_token_embeddings, PEFT) hung the
    embeddings' matrix on the QuantLinear as a `weight` its forward never read (and save_pretrained wrote),
    and 5.x's from_pretrained of the saved model failed (AttributeError: QuantLinear has no attribute
    `weight`). A folder saved before this, whose config.json still says tied, loads too, untied."""
    import shutil

    model = _fp_llama(tmp_path / "fp", tie=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    report = patch_model(model, QuantConfig(group_size=32, quantize_lm_head=True), progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    assert any(n.startswith("lm_head: tied to the input embeddings") for n in report.notes), report.notes
    expected = _logits(model)
    model.tie_weights()
    assert "weight" not in model.lm_head._parameters and "lm_head.weight" not in model.state_dict()
    assert torch.equal(_logits(model), expected)

    folders = {"ours": tmp_path / "ours"}
    save_quantized(model, folders["ours"])
    if not NO_REGISTRY:  # save_pretrained writes the int4 record where transformers has a quantizer registry
        folders["hf"] = tmp_path / "hf"
        model.save_pretrained(folders["hf"])
    for name in list(folders):  # as saved before the untying: config.json says tied
        cfg = json.loads((folders[name] / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is False
        folders[name + "-tied"] = tmp_path / (name + "-tied")
        shutil.copytree(folders[name], folders[name + "-tied"])
        (folders[name + "-tied"] / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    loads = {name: lambda f=f: load_pretrained_quantized(str(f), progress=False) for name, f in folders.items()}
    if not NO_REGISTRY and not NEEDS_ACCELERATE:
        loads.update({f"from_pretrained {name}": lambda f=f: _load(f) for name, f in folders.items() if "hf" in name})
    for name, load in loads.items():
        loaded = load()
        assert isinstance(loaded.lm_head, QuantLinear), name
        assert loaded.config.tie_word_embeddings is False, name
        loaded.tie_weights()
        assert "weight" not in loaded.lm_head._parameters, name
        assert torch.equal(_logits(loaded), expected), name


def test_the_config_record_follows_the_model(tmp_path):
    """config.quantization_config names exactly the QuantLinears the model holds (after mixed
    precision put some back, after a second patch_model); where transformers has no quantizer
    registry (4.40) nothing is written and patching works as before."""
    from minicpm_int4 import calibrate

    model = _fp_llama(tmp_path / "fp", dtype=torch.float32)
    calib = calibrate(model, [torch.tensor([[1, 2, 3, 4, 5]])], progress=False)
    report = patch_model(model, QuantConfig(group_size=32, keep_most_sensitive=2), progress=False, calibration=calib)
    qc = getattr(model.config, "quantization_config", None)
    if NO_REGISTRY:
        assert qc is None and "has no quantizer registry" in NO_REGISTRY and TF_MAJOR == 4
        return
    assert set(qc.modules) == {d.name for d in report.quantized} and len(report.kept) >= 2
    patch_model(model, QuantConfig(group_size=32), progress=False)  # the two kept layers now int4 too
    assert set(model.config.quantization_config.modules) == {n for n, m in model.named_modules()
                                                             if isinstance(m, QuantLinear)}
    assert model.config.to_dict()["quantization_config"]["quant_method"] == QUANT_METHOD


def test_dequantize_gives_back_linears_with_the_int4_weights(tmp_path):
    """dequantize_model (and transformers' model.dequantize() on a from_pretrained int4 model): every
    QuantLinear becomes an nn.Linear holding exactly the weight it computed with; the config's int4
    record goes, so save_pretrained writes a plain fp checkpoint."""
    from minicpm_int4 import dequantize_model

    model = _fp_llama(tmp_path / "fp", dtype=torch.float32)
    patch_model(model, QuantConfig(group_size=32), progress=False)
    weights = {n: (m.dequantized_weight(), m.bias) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expected = _logits(model)
    model.save_pretrained(tmp_path / "int4")
    assert dequantize_model(model) == len(weights)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for name, (w, b) in weights.items():
        lin = model.get_submodule(name)
        assert type(lin) is torch.nn.Linear and torch.equal(lin.weight, w) and not lin.weight.requires_grad
        assert (b is None) == (lin.bias is None)
    # the same function up to the matmul's summation order (fp32: relative 1e-5 across two layers)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert getattr(model.config, "quantization_config", None) is None
    if NO_REGISTRY or NEEDS_ACCELERATE:
        return
    loaded = _load(tmp_path / "int4", torch.float32)
    loaded.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "fp_again")
    assert "quantization_config" not in json.loads((tmp_path / "fp_again" / "config.json").read_text())


def test_a_patched_model_pickles(tmp_path):
    """torch.save(model) of a patched transformers model: its config's quantization_config is an
    instance of a class register() defines, which pickle must find by name - also in a fresh
    interpreter where nothing has registered yet."""
    import subprocess
    import sys

    import io

    model = _fp_llama(tmp_path / "fp")
    try:
        torch.save(model, io.BytesIO())
    except Exception as e:  # (transformers 5.10's models hold a local class: "Can't pickle local object ...")
        pytest.skip(f"transformers {transformers.__version__}'s own fp model does not pickle: {type(e).__name__}: {e}")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    torch.save(model, tmp_path / "model.pt")
    code = ("import torch\n"
            f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
            "assert type(m.model.layers[0].mlp.down_proj).__name__ == 'QuantLinear'\n"
            "qc = getattr(m.config, 'quantization_config', None)\n"
            "print(type(qc).__name__, sorted(qc.modules)[0] if qc is not None else None)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if not NO_REGISTRY:
        assert r.stdout.split() == ["MiniCPMInt4Config", "model.layers.0.mlp.down_proj"]


def test_a_folder_without_an_int4_record_is_named(tmp_path):
    _fp_llama(tmp_path / "fp")
    with pytest.raises(FileNotFoundError, match=r"is not a minicpm_int4 checkpoint: quant_config.json not found, "
                                                r"and no config.json with a 'minicpm_int4' quantization_config"):
        load_pretrained_quantized(str(tmp_path / "fp"))


@pytest.mark.parametrize("kind,int4_head", [("4_6", False), ("ocr", False), ("ocr", True)])
def test_native_minicpmv_through_from_pretrained(kind, int4_head, tmp_path):
    """The product's path: MiniCPM-V 4.6 (and the OCR model, whose lm_head is tied to the embeddings:
    kept so, or int4 and untied) patched, saved by save_pretrained, loaded by
    AutoModelForImageTextToText.from_pretrained: the same logits on an image prompt, the vision tower's
    int4 layers included. (Native classes: 5.x.)"""
    from minicpm_int4.tiny import build_native, prompt_with_image

    model = build_native(kind)  # fp32: a .to(fp16) would also round the rotary inv_freq buffers, which a load recomputes
    report = patch_model(model, QuantConfig(group_size=32, quantize_lm_head=int4_head), progress=False)
    assert {d.part for d in report.quantized} >= {"llm", "vision"} | ({"lm_head"} if int4_head else set())
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == {d.name for d in report.quantized}
    if kind == "ocr" and not int4_head:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    if int4_head:
        loaded.tie_weights()
        assert "weight" not in loaded.get_output_embeddings()._parameters
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pv, target_sizes=ts).logits,
                           model(input_ids=ids, pixel_values=pv, target_sizes=ts).logits)


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
def test_input_scales_survive_save_pretrained_and_from_pretrained(tmp_path):
    """A layer holding an input scale (QuantConfig.input_scales) is recorded as such in config.json, and
    from_pretrained / load_pretrained_quantized build it with the buffer the checkpoint holds (under 5.x
    and 4.x, whose quantizer builds the layers under accelerate's init_empty_weights)."""
    from minicpm_int4 import calibrate

    model = _fp_llama(tmp_path / "fp", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 160, (1, 32), generator=g) for _ in range(4)]
    report = patch_model(model, QuantConfig(group_size=32, input_scales=True), progress=False,
                         calibration=calibrate(model, batches, progress=False))
    scaled = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None}
    assert scaled, report.notes  # o_proj (GQA: no fold) takes one
    model.save_pretrained(tmp_path / "hf")
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert {n for n, spec in qc["modules"].items() if spec.get("input_scale")} == scaled
    expected = _logits(model)
    loaders = [lambda: load_pretrained_quantized(str(tmp_path / "hf"), progress=False)]
    if not NEEDS_ACCELERATE:
        loaders.append(lambda: _load(tmp_path / "hf", torch.float32))
    for load in loaders:
        loaded = load()
        assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None} == scaled
        assert torch.equal(_logits(loaded), expected)


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"no quantizer registry in this transformers: {NO_REGISTRY}")
def test_a_converted_model_gets_this_packages_quantizer(tmp_path):
    """A model transformers loaded through another quantization method keeps that method's quantizer as
    `model.hf_quantizer` (transformers asks it when the model saves, compiles, trains or dequantizes). Once
    patch_model has converted every one of its layers, the quantizer is this package's - model.dequantize()
    gives fp Linears with the int4 model's weights instead of the other method's NotImplementedError - and
    not while one of its layers is left; a model loaded without one gets none."""
    import types

    from test_patch import _ct_linear, _ct_scheme
    from test_foreign import _random_layer

    class OtherQuantizer:  # compressed-tensors' quantizer, as far as this goes: it cannot dequantize
        def dequantize(self, model, dtype=None):
            raise NotImplementedError("compressed-tensors has no implementation of `dequantize`")

    model = _fp_llama(tmp_path / "fp", dtype=torch.float16)
    q, z, s = _random_layer(128, 128, 32, seed=1)
    model.model.layers[0].self_attn.q_proj = _ct_linear(q, z, s, _ct_scheme())
    model.model.layers[1].self_attn.q_proj = _ct_linear(q, z, s, _ct_scheme(num_bits=8))  # a scheme it keeps
    model.hf_quantizer = other = OtherQuantizer()
    model.config.quantization_config = types.SimpleNamespace(quant_method="compressed-tensors")
    with pytest.warns(UserWarning, match="already quantized by another package"):
        patch_model(model, QuantConfig(group_size=32), progress=False)
    assert model.hf_quantizer is other  # a layer of that method is left: still its model

    model = _fp_llama(tmp_path / "fp", dtype=torch.float16)
    model.model.layers[0].self_attn.q_proj = _ct_linear(q, z, s, _ct_scheme())
    model.hf_quantizer = OtherQuantizer()
    # what from_pretrained with a quantizer also sets (4.x's dequantize deletes them)
    model.quantization_method, model.config._pre_quantization_dtype = "compressed-tensors", torch.float16
    patch_model(model, QuantConfig(group_size=32), progress=False)
    assert type(model.hf_quantizer).__name__ == "MiniCPMInt4HfQuantizer" and model.quantization_method == QUANT_METHOD
    assert model.hf_quantizer.quantization_config is model.config.quantization_config
    weights = {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.dequantize()
    assert not any(isinstance(m, QuantLinear) for m in model.modules()) and len(weights) == 14
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None

    plain = _fp_llama(tmp_path / "fp", dtype=torch.float16)
    patch_model(plain, QuantConfig(group_size=32), progress=False)
    assert getattr(plain, "hf_quantizer", None) is None


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
def test_save_pretrained_of_fused_projections(tmp_path):
    """fuse_projections leaves the layers' tensors as row views of one stacked tensor each: transformers'
    save_pretrained (one file and sharded; it finds tensors that share storage itself) and save_quantized write
    each layer's own rows, which load back into the same logits."""
    from minicpm_int4 import fuse_projections

    model = _fp_llama(tmp_path / "fp")
    report = patch_model(model, QuantConfig(group_size=32, min_out_features=16), progress=False)
    names = {d.name for d in report.quantized}
    expected = _logits(model)
    fused = fuse_projections(model)
    assert {tuple(g.names) for g in fused.groups} == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    assert torch.equal(_logits(model), expected)  # (six rows: layer by layer, the same bits)
    model.save_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    save_quantized(model, tmp_path / "ours")
    for folder in ("hf", "sharded", "ours"):
        _check_loaded(load_pretrained_quantized(str(tmp_path / folder), progress=False), expected, names)


def test_weight_init_passes_over_modules_that_hold_int4_layers():
    """transformers 5.0 - 5.3 run every module's _init_weights after from_pretrained has loaded the tensors
    (later versions pass over a module whose tensors all loaded), and SiglipAttention's initialises
    q_proj.weight, which a QuantLinear has not: from_pretrained of a model with int4 attention in a SigLIP
    tower stopped in an AttributeError there (the remote-code round trip of test_checkpoint.py under 5.0).
    build_quantized_modules marks such a parent, which has no tensors of its own, initialised. That pass
    of 5.0 - 5.3 is replayed here, so that any transformers checks it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from minicpm_int4.checkpoint import _quant_modules
    from minicpm_int4.hf_integration import build_quantized_modules

    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                             image_size=28, patch_size=14)
    torch.manual_seed(0)
    src = SiglipVisionModel(cfg)
    config = QuantConfig(group_size=32)
    patch_model(src, config, progress=False)
    model = SiglipVisionModel(cfg)
    for m in model.modules():  # unflagged, as from_pretrained builds it (its constructor's init flags every module)
        m.__dict__.pop("_is_hf_initialized", None)
    build_quantized_modules(model, _quant_modules(src), config.to_dict())
    # by what they hold: the module tree and the attention's class differ between versions (4.44: SiglipSdpaAttention)
    attn = next(m for m in model.modules() if hasattr(m, "q_proj"))
    mlp = next(m for m in model.modules() if hasattr(m, "fc1"))
    assert all(isinstance(m, QuantLinear) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1))
    for m in model.modules():  # transformers 5.0 - 5.3: PreTrainedModel._initialize_weights over every module
        if not getattr(m, "_is_hf_initialized", False):
            model._init_weights(m)
    attn._is_hf_initialized = False  # without the mark, the attention's own init reads q_proj.weight
    with pytest.raises(AttributeError, match="has no `weight`"):
        model._init_weights(attn)


@pytest.mark.skipif(bool(NO_REGISTRY), reason=f"{NO_REGISTRY}")
@pytest.mark.skipif(NEEDS_ACCELERATE, reason=f"transformers {transformers.__version__} needs accelerate "
                                             "for quantizers, which is not installed")
def test_from_pretrained_refuses_scales_that_are_not_finite(tmp_path):
    """from_pretrained checks what it loaded as load_quantized does (QuantLinear.check_loaded): a NaN scale in
    the file - no save writes one - is named, not left to turn the layer's outputs into NaN."""
    from safetensors.torch import load_file, save_file

    model = _fp_llama(tmp_path / "fp")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    tensors = load_file(str(out / "model.safetensors"))
    victim = sorted(k for k in tensors if k.endswith(".scales"))[0]
    tensors[victim][2, 1] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    # (5.x: the quantizer's check after loading names the module; 4.x sets each module's tensors through its own
    # load_state_dict, with no prefix, where the layer's check refuses it first)
    who = victim[:-len(".scales")] if TF_MAJOR >= 5 else "QuantLinear"
    with pytest.raises(ValueError, match=rf"^{who}: scales: 1 NaN / inf value\(s\), the first at \[2, 1\] \(nan\)"):
        _load(out)
