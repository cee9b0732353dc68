import json

import pytest
import torch

from minicpm_int4 import QuantConfig, QuantLinear, load_quantized, patch_model, save_quantized
from minicpm_int4.checkpoint import CheckpointMismatchError
from minicpm_int4.tiny import build_native, build_remote_layout, prompt_with_image, remote_inputs


@pytest.mark.parametrize("kind", ["4_6", "ocr"])  # ocr ties lm_head to the embeddings
def test_round_trip_is_bit_identical(tmp_path, kind):
    model = build_native(kind, seed=0)
    report = patch_model(model, QuantConfig(group_size=64), progress=False)
    save_quantized(model, tmp_path, report)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert meta["config"]["group_size"] == 64 and len(meta["modules"]) == len(report.quantized)

    fresh = build_native(kind, seed=123)  # different random weights: everything must come from the file
    load_quantized(fresh, tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in fresh.modules()) == len(report.quantized)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pv, target_sizes=ts).logits
        b = fresh(input_ids=ids, pixel_values=pv, target_sizes=ts).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_remote_layout_round_trip(tmp_path, llm):
    """The MiniCPM-V 2.x layouts (transformers 4.x remote code); qwen2 as MiniCPM-o 2.6, whose TTS has
    weight-normed heads: a parametrized one quantized, a hook-based one kept in high precision."""
    omni = llm == "qwen2"
    model = build_remote_layout(llm, omni=omni)
    cfg = QuantConfig(group_size=32, quantize_audio=omni, quantize_tts=omni, exclude=("tts.head_text",))
    report = patch_model(model, cfg, progress=False)
    save_quantized(model, tmp_path, report)
    fresh = build_remote_layout(llm, omni=omni, seed=7)
    load_quantized(fresh, tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in fresh.modules()) == len(report.quantized)
    ids, pv = remote_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(ids, pv).logits, fresh(ids, pv).logits)
        if omni:
            assert isinstance(fresh.tts.head_code[0], QuantLinear) and not isinstance(fresh.tts.head_text, QuantLinear)
            mel, h = torch.randn(1, 16, 32), torch.randn(1, 5, model.llm.config.hidden_size)
            assert torch.equal(model.audio_embed(mel), fresh.audio_embed(mel))
            for a, b in zip(model.tts(h), fresh.tts(h)):
                assert torch.equal(a, b)


def test_mismatching_model_names_first_bad_tensor(tmp_path):
    model = build_native("4_6")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path)
    other = build_native("4_6")
    other.lm_head = torch.nn.Linear(64, 300, bias=False)  # a different vocabulary size
    with pytest.raises(CheckpointMismatchError, match=r"tensor 'lm_head.weight': checkpoint shape \(256, 64\) != model shape \(300, 64\)"):
        load_quantized(other, tmp_path)


def test_checkpoint_for_another_layout(tmp_path):
    model = build_native("4_6")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="does not exist in the model"):
        load_quantized(build_remote_layout("llama"), tmp_path)


def test_save_requires_a_patched_model_and_load_requires_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="patch_model"):
        save_quantized(build_native("4_6"), tmp_path)
    with pytest.raises(FileNotFoundError, match="quant_config.json"):
        load_quantized(build_native("4_6"), tmp_path)


def test_load_pretrained_quantized_rebuilds_from_config_module_by_module(tmp_path):
    from minicpm_int4.checkpoint import load_pretrained_quantized, parameters_on_meta
    from minicpm_int4.tiny import build_native

    model = build_native("4_6", dtype=torch.bfloat16)
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path, report)
    loaded = load_pretrained_quantized(str(tmp_path))
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(report.quantized)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pv, target_sizes=ts).logits,
                           loaded(input_ids=ids, pixel_values=pv, target_sizes=ts).logits)
    # the skeleton holds no parameter memory: every parameter is on the meta device until loaded
    with parameters_on_meta():
        skeleton = type(model)._from_config(model.config)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"  # the patch is undone on exit
