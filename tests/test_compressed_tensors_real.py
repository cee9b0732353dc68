"""The compressed-tensors reader checked against compressed-tensors itself.

test_foreign packs compressed-tensors' pack-quantized tensors with a packer of its own (ct_pack), written from
compressed-tensors' packing code. These tests use the package: its own pack_to_int32, and checkpoints written
the way llm-compressor writes them (apply_quantization_config, the weights' min-max qparams by its
calculate_qparams, ModelCompressor.compress_model, save_pretrained, ModelCompressor.update_config - its
config.json record included), read back by load_pretrained_quantized and compared bit for bit with
compressed-tensors' own PackedQuantizationCompressor.decompress, and with the weights transformers' own
compressed-tensors loader dequantizes; and patch_model's exact conversion of the layers compressed-tensors holds
compressed in memory (transformers 5.x's from_pretrained of such a folder).

CI runs this file twice (.ci/run), each time with MINICPM_INT4_REQUIRE_COMPRESSED_TENSORS=1 so that it fails
rather than skips without the package: with compressed-tensors 0.20.1 (the newest) and with 0.18.0, the last
that writes act-order groups (`actorder: group`, a `weight_g_idx` per layer; 0.19 removed it, but checkpoints
written before remain). Elsewhere it skips, naming why.
"""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

from minicpm_int4 import QuantLinear
from minicpm_int4.checkpoint import load_pretrained_quantized
from minicpm_int4.foreign import detect
from helpers import assert_gemm_close, record_layer_io
from test_foreign import _random_layer, ct_pack


@pytest.fixture(scope="module")
def ct():
    try:
        import compressed_tensors
    except ImportError as e:
        if os.environ.get("MINICPM_INT4_REQUIRE_COMPRESSED_TENSORS") == "1":
            pytest.fail(f"MINICPM_INT4_REQUIRE_COMPRESSED_TENSORS=1 but compressed-tensors does not import: {e}")
        pytest.skip(f"compressed-tensors is not installed ({e}; CI installs it beside the main venv's transformers)")
    return compressed_tensors


def _version(ct):
    return tuple(int(p) for p in ct.__version__.split(".")[:2])


@pytest.mark.parametrize("n,k,group_size", [(24, 96, 32), (40, 256, 64), (16, 384, 128), (24, 136, -1)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_test_packer_is_compressed_tensors_packing(ct, n, k, group_size, symmetric):
    """test_foreign.ct_pack, which the other compressed-tensors tests pack with, writes the words
    compressed-tensors' pack_to_int32 writes: the weights' signed values (q - 8) packed along K, the zero
    points' along N (N = 24, 40: a last word padded past N)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    q, z, s = _random_layer(n, k, group_size, seed=n + k, zmin=8 if symmetric else 0, zmax=8 if symmetric else 15)
    mine = ct_pack(q, z, s, symmetric=symmetric)
    assert torch.equal(pack_to_int32((q - 8).to(torch.int8), 4), mine["weight_packed"])
    if not symmetric:
        assert torch.equal(pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0), mine["weight_zero_point"])


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _compressed_in_memory(ct, dtype, group_size, symmetric, actorder, seed=0):
    """A tiny Llama quantized and compressed in memory as llm-compressor does before saving, its min-max
    qparams by compressed-tensors' calculate_qparams; act-order: each layer's groups are G input channels
    scattered at random over K, as GPTQ's activation order leaves them. The same arguments give the same
    model. Returns (model, scheme, compressor)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    model = _tiny_llama(dtype)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric,
                            strategy="channel" if group_size == -1 else "group",
                            group_size=None if group_size == -1 else group_size,
                            **({"actorder": "group"} if actorder else {}))
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    gen = torch.Generator().manual_seed(seed)
    quantized = 0
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.detach().float()
        n, k = w.shape
        g = k if group_size == -1 else group_size
        if actorder:
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // g).to(torch.int32)
            module.weight_g_idx.data.copy_(g_idx)
            w = w[:, torch.argsort(g_idx, stable=True)]
        scale, zero = calculate_qparams(w.reshape(n, k // g, g).amin(-1), w.reshape(n, k // g, g).amax(-1), args)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN
        quantized += 1
    assert quantized == 14
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    return model, scheme, compressor


def _write_like_llm_compressor(ct, out, dtype, group_size, symmetric, actorder, seed=0):
    """_compressed_in_memory's model saved as llm-compressor saves it (its config record included). Returns
    the scheme (for decompress)."""
    model, scheme, compressor = _compressed_in_memory(ct, dtype, group_size, symmetric, actorder, seed)
    model.save_pretrained(out)
    compressor.update_config(out)
    return scheme


def _saved_tensors(folder):
    from safetensors.torch import load_file
    tensors = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        tensors.update(load_file(f))
    return tensors


CASES = [(32, False, False, torch.float16), (128, False, False, torch.bfloat16), (64, True, False, torch.float16),
         (-1, False, False, torch.bfloat16), (-1, True, False, torch.float16),
         (128, False, True, torch.float16), (64, True, True, torch.bfloat16)]


@pytest.mark.parametrize("group_size,symmetric,actorder,dtype", CASES)
def test_llm_compressor_checkpoint_reads_exactly(ct, tmp_path, group_size, symmetric, actorder, dtype):
    """A checkpoint compressed-tensors wrote loads with every int4 layer holding the weight compressed-tensors'
    own decompress gives, bit for bit (act-order: with the channel order its weight_g_idx implies), and each
    layer's output within the GEMM bound of x @ that weight."""
    if actorder and _version(ct) >= (0, 19):
        pytest.skip(f"compressed-tensors {ct.__version__} no longer writes act-order groups (0.18 does; CI runs both)")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    out = str(tmp_path / "ct")
    scheme = _write_like_llm_compressor(ct, out, dtype, group_size, symmetric, actorder)
    fmt = detect(out)
    assert (fmt.method, fmt.group_size, fmt.symmetric) == ("compressed-tensors", group_size, symmetric)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"].get("actorder") == ("group" if actorder else None)
    tensors = _saved_tensors(out)
    assert any(key.endswith(".weight_g_idx") for key in tensors) == actorder

    model = load_pretrained_quantized(out, progress=False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and not isinstance(model.lm_head, QuantLinear)
    permuted = 0
    for name, layer in layers.items():
        local = {key[len(name) + 1:]: t for key, t in tensors.items() if key.startswith(name + ".")}
        theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert theirs.dtype == dtype and torch.equal(layer.dequantized_weight(), theirs), name
        permuted += layer.input_perm is not None
    # act-order: a layer of one group (K = G) has nothing to reorder; down_proj (K = 256) has 2 / 4 groups
    assert permuted == (0 if not actorder else 14 if group_size == 64 else 2)

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = record_layer_io(model, layers, ids)
    for name, (x, y) in seen.items():
        w = layers[name].dequantized_weight()
        assert_gemm_close(y, F.linear(x.float(), w.float()).to(dtype), x, w)


@pytest.mark.parametrize("group_size,symmetric", [(32, False), (128, True), (-1, False)])
def test_transformers_own_loader_dequantizes_the_same_weights(ct, tmp_path, group_size, symmetric):
    """The same checkpoint through transformers' own compressed-tensors loader, dequantized to fp Linears
    (what a user of transformers gets): every one holds the weight load_pretrained_quantized's QuantLinear
    computes with, bit for bit."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    out = str(tmp_path / "ct")
    _write_like_llm_compressor(ct, out, torch.float16, group_size, symmetric, actorder=False)
    import inspect
    kw = ({"dequantize": True} if "dequantize" in inspect.signature(CompressedTensorsConfig).parameters
          else {"run_compressed": False})
    hf = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(**kw))
    ours = load_pretrained_quantized(out, progress=False)
    checked = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantLinear):
            theirs = hf.get_submodule(name)
            assert type(theirs) is torch.nn.Linear and torch.equal(theirs.weight, layer.dequantized_weight()), name
            checked += 1
    assert checked == 14


@pytest.mark.parametrize("group_size,symmetric,actorder", [(32, False, False), (-1, True, False), (64, False, True)])
def test_patch_model_converts_compressed_layers_exactly(ct, tmp_path, group_size, symmetric, actorder):
    """A model whose Linears compressed-tensors holds compressed in memory (its compress_model, as llm-compressor
    leaves a model before saving it and transformers 5.x loads a checkpoint): patch_model converts every one
    to a QuantLinear holding the weight compressed-tensors' own decompress gives from the same module state,
    bit for bit, with no warning - the QuantLinears load_pretrained_quantized makes from the saved checkpoint -
    and the model runs (compressed-tensors' hook that decompresses the model on its first forward finds
    nothing left to do)."""
    import warnings

    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from minicpm_int4 import QuantConfig, patch_model
    if actorder and _version(ct) >= (0, 19):
        pytest.skip(f"compressed-tensors {ct.__version__} no longer writes act-order groups (0.18 does; CI runs both)")
    out = str(tmp_path / "ct")
    scheme = _write_like_llm_compressor(ct, out, torch.float16, group_size, symmetric, actorder)
    model = _compressed_in_memory(ct, torch.float16, group_size, symmetric, actorder)[0]  # the same model
    states = {name: {k: t.clone() for k, t in m.state_dict().items()} for name, m in model.named_modules()
              if hasattr(m, "weight_packed")}
    assert len(states) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = patch_model(model, QuantConfig(), progress=False)
    assert sum(d.action == "converted" for d in report.decisions) == 14
    for name, state in states.items():
        layer = model.get_submodule(name)
        theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert isinstance(layer, QuantLinear) and torch.equal(layer.dequantized_weight(), theirs), name
    loaded = load_pretrained_quantized(out, progress=False)
    for name in states:
        mine, theirs = model.get_submodule(name).state_dict(), loaded.get_submodule(name).state_dict()
        assert sorted(mine) == sorted(theirs) and all(torch.equal(t, theirs[k]) for k, t in mine.items()), name
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    layers = {name: model.get_submodule(name) for name in states}
    for name, (x, y) in record_layer_io(model, layers, ids).items():  # (compressed-tensors' decompress hook ran)
        w = layers[name].dequantized_weight()
        assert_gemm_close(y, F.linear(x.float(), w.float()).to(torch.float16), x, w)


@pytest.mark.parametrize("group_size,actorder", [(128, False), (-1, False), (64, True)])
def test_transformers_loaded_checkpoint_patched_is_the_checkpoint(ct, tmp_path, group_size, actorder):
    """The user's path on transformers 5.x: from_pretrained(llm-compressor folder), which holds compressed-tensors'
    layers compressed, then patch_model: the same logits as load_pretrained_quantized(folder), bit for bit (the
    same QuantLinears); and saved with save_pretrained (the model's quantizer was compressed-tensors') or
    save_quantized, it loads back as this package's checkpoint with those logits; model.dequantize() works.
    (Symmetric schemes: transformers 5.25 does not load an asymmetric one compressed - it compares the packed zero
    points' shape with the unpacked one; test_patch_model_converts_compressed_layers_exactly converts those from
    memory.)"""
    import warnings

    from transformers import AutoModelForCausalLM

    from minicpm_int4 import QuantConfig, patch_model, save_quantized
    if actorder and _version(ct) >= (0, 19):
        pytest.skip(f"compressed-tensors {ct.__version__} no longer writes act-order groups (0.18 does; CI runs both)")
    out = str(tmp_path / "ct")
    _write_like_llm_compressor(ct, out, torch.float16, group_size, True, actorder)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(hasattr(m, "weight_packed") for m in model.modules()) == 14
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = patch_model(model, QuantConfig(), progress=False)
    assert sum(d.action == "converted" for d in report.decisions) == 14
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_pretrained_quantized(out, progress=False)(ids).logits
        assert torch.equal(model(ids).logits, want)
        model.save_pretrained(tmp_path / "hf")
        assert detect(str(tmp_path / "hf")) is None  # not read as a compressed-tensors folder again
        assert torch.equal(load_pretrained_quantized(str(tmp_path / "hf"), progress=False)(ids).logits, want)
        save_quantized(model, tmp_path / "ours")
        assert torch.equal(load_pretrained_quantized(str(tmp_path / "ours"), progress=False)(ids).logits, want)
    # the model's quantizer is this package's now: model.dequantize() (compressed-tensors' raises
    # NotImplementedError) gives fp Linears with the int4 model's weights
    assert type(model.hf_quantizer).__name__ == "MiniCPMInt4HfQuantizer"
    weights = {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.dequantize()
    assert len(weights) == 14 and all(type(model.get_submodule(n)) is torch.nn.Linear
                                      and torch.equal(model.get_submodule(n).weight, w) for n, w in weights.items())


def test_a_forward_before_patch_model_is_said(ct, tmp_path):
    """A forward of the loaded model before patch_model makes compressed-tensors decompress every layer (its
    hook): patch_model then quantizes their fp weights again, and says so (test_patch has the message)."""
    from transformers import AutoModelForCausalLM

    from minicpm_int4 import QuantConfig, patch_model
    out = str(tmp_path / "ct")
    _write_like_llm_compressor(ct, out, torch.float16, 128, True, False)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)))
    assert not any(hasattr(m, "weight_packed") for m in model.modules())
    with pytest.warns(UserWarning, match=r"14 layer\(s\) compressed-tensors had quantized to int4 hold its decompressed"):
        report = patch_model(model, QuantConfig(), progress=False)
    assert sum(d.action == "quantized" for d in report.decisions) == 14
