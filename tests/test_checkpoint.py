import importlib.util
import json
import os

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
    cfg = QuantConfig(group_size=32, quantize_audio=omni, quantize_tts=omni, exclude=("tts.head_text",) if omni else ())
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


def test_loading_into_a_model_patched_already(tmp_path):
    """load_quantized into a model whose Linears are QuantLinears already: they must hold what the
    checkpoint holds (else the mismatch is named, not a shape error deep in a tensor), and they run
    as saved - a W4A8 checkpoint stays W4A8, not the act the model was patched with."""
    model = build_native("4_6")
    patch_model(model, QuantConfig(group_size=32, act="int8", exclude=("*.fc1",)), progress=False)
    save_quantized(model, tmp_path)
    fresh = load_quantized(build_native("4_6"), tmp_path)
    ids, pv, ts = prompt_with_image(model)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, pixel_values=pv, target_sizes=ts).logits

    wrong_group = build_native("4_6")
    patch_model(wrong_group, QuantConfig(group_size=128, exclude=("*.fc1",)), progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint module '.*' has group_size=32 but the model's "
                                                      r"QuantLinear has group_size=128"):
        load_quantized(wrong_group, tmp_path)
    fc1_too = build_native("4_6")
    patch_model(fc1_too, QuantConfig(group_size=32), progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"module '.*\.fc1' is a QuantLinear in the model but not int4 "
                                                      r"in the checkpoint"):
        load_quantized(fc1_too, tmp_path)
    w4a16 = build_native("4_6")
    patch_model(w4a16, QuantConfig(group_size=32, backend="torch", exclude=("*.fc1",)), progress=False)
    load_quantized(w4a16, tmp_path)
    layers = [m for m in w4a16.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act == "int8" and m.backend == "auto" for m in layers)
    assert torch.equal(logits(w4a16), logits(fresh)) and torch.equal(logits(fresh), logits(model))


def test_save_refuses_a_folder_of_other_model_weights(tmp_path):
    """save_quantized into the fp16 model's own folder would overwrite its model.safetensors and
    config.json: refused, nothing written. A new folder, an empty one, or an earlier int4 checkpoint's
    (overwritten) are fine."""
    src = tmp_path / "fp"
    model = build_native("4_6")
    model.save_pretrained(src)
    before = {f: (src / f).read_bytes() for f in os.listdir(src)}
    patch_model(model, QuantConfig(group_size=32), progress=False)
    with pytest.raises(ValueError, match=r"save_quantized: .*fp' holds model weights \(model.safetensors\) and is not "
                                         r"a minicpm_int4 checkpoint \(no quant_config.json\)"):
        save_quantized(model, src)
    assert {f: (src / f).read_bytes() for f in os.listdir(src)} == before
    (tmp_path / "empty").mkdir()
    for folder in ("new", "empty", "new"):  # the second "new" is an int4 checkpoint by then
        save_quantized(model, tmp_path / folder)
        assert (tmp_path / folder / "quant_config.json").exists()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="holds model weights"):
        save_quantized(model, tmp_path / "shards")


def test_load_pretrained_quantized_rebuilds_from_config_module_by_module(tmp_path, monkeypatch):
    import transformers

    from minicpm_int4.checkpoint import load_pretrained_quantized, parameters_on_meta
    from minicpm_int4.tiny import build_native

    model = build_native("4_6", dtype=torch.bfloat16)
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path, report)
    if int(transformers.__version__.split(".")[0]) >= 5:  # 5.x warns "`torch_dtype` is deprecated" on a read
        monkeypatch.setattr(transformers.PretrainedConfig, "torch_dtype",
                            property(lambda self: pytest.fail("read the deprecated config.torch_dtype")))
    loaded = load_pretrained_quantized(str(tmp_path))
    assert loaded.dtype == torch.bfloat16
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


@pytest.mark.parametrize("record", ["dict", "config object"])
def test_converted_model_is_saved_without_the_foreign_quantization_config(tmp_path, record):
    """A model transformers loaded from an AWQ / GPTQ checkpoint carries that method's
    config.quantization_config; where patch_model converted its layers and transformers has no quantizer
    registry (4.40) to take this package's record, it stays. save_quantized must not write it into
    config.json: the folder would then read back as an AWQ checkpoint. It writes the model without it
    (and leaves the model's config as it was); the folder is this package's checkpoint whatever a
    config.json says, and reloads with the same logits."""
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from minicpm_int4 import foreign
    from minicpm_int4.checkpoint import load_pretrained_quantized

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    if record == "config object":  # as from_pretrained leaves it: an AwqConfig, quant_method an enum
        from transformers.utils.quantization_config import QuantizationMethod

        awq = types.SimpleNamespace(**{**awq, "quant_method": QuantizationMethod.AWQ})
    model.config.quantization_config = awq
    save_quantized(model, tmp_path)
    assert model.config.quantization_config is awq
    written = json.loads((tmp_path / "config.json").read_text()).get("quantization_config") or {}
    assert written.get("quant_method") in (None, "minicpm_int4")
    assert foreign.detect(str(tmp_path)) is None
    # a config.json naming a foreign method does not make this package's folder a foreign one
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": dict(awq if record == "dict"
                                                                                         else vars(awq), quant_method="awq")}))
    assert foreign.detect(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained_quantized(str(tmp_path))
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_pretrained_quantized_keeps_tied_weights_tied(tmp_path):
    """The OCR model ties lm_head to the embeddings (kept in high precision): rebuilt from meta, the
    two names get one tensor again, not two copies (a vocab x hidden matrix twice: 1.2 GB for a
    151k-token vocabulary at 4096 in bf16)."""
    from minicpm_int4.checkpoint import load_pretrained_quantized

    model = build_native("ocr")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path, report)
    loaded = load_pretrained_quantized(str(tmp_path))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    # parameters() lists a shared tensor once: a copy would add one
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pv, target_sizes=ts).logits,
                           loaded(input_ids=ids, pixel_values=pv, target_sizes=ts).logits)


REMOTE_CONFIG = """
from transformers import PretrainedConfig


class TinyVConfig(PretrainedConfig):
    model_type = "tinyv"

    def __init__(self, llm_config=None, vision_config=None, **kwargs):
        self.llm_config = llm_config or {}
        self.vision_config = vision_config or {}
        super().__init__(**kwargs)
"""

REMOTE_MODELING = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, SiglipVisionConfig, SiglipVisionModel

from minicpm_int4.tiny import Resampler

from .configuration_tinyv import TinyVConfig


class TinyV(PreTrainedModel):
    config_class = TinyVConfig

    def __init__(self, config):
        super().__init__(config)
        self.llm = LlamaForCausalLM(LlamaConfig(**config.llm_config))
        vpm = SiglipVisionModel(SiglipVisionConfig(**config.vision_config))
        self.vpm = getattr(vpm, "vision_model", vpm)
        self.resampler = Resampler(4, config.llm_config["hidden_size"], 2, config.vision_config["hidden_size"])
        self.post_init()

    def forward(self, input_ids, pixel_values):
        emb = self.llm.get_input_embeddings()(input_ids)
        img = self.resampler(self.vpm(pixel_values).last_hidden_state).to(emb.dtype)
        return self.llm(inputs_embeds=torch.cat([img, emb[:, img.shape[1]:]], dim=1))
"""


def _remote_code_checkpoint(root):
    """A MiniCPM-V 2.x-style remote-code checkpoint written here (config.json with auto_map, the code
    beside it, random weights), loaded as users load one: from_pretrained(trust_remote_code=True)."""
    import transformers

    src, ckpt = root / "tinyv_code", root / "tinyv_ckpt"
    src.mkdir()
    (src / "configuration_tinyv.py").write_text(REMOTE_CONFIG)
    (src / "modeling_tinyv.py").write_text(REMOTE_MODELING)
    (src / "config.json").write_text(json.dumps({
        "model_type": "tinyv", "architectures": ["TinyV"],
        "auto_map": {"AutoConfig": "configuration_tinyv.TinyVConfig", "AutoModel": "modeling_tinyv.TinyV"},
        "llm_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256),
        "vision_config": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)}))
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(str(src), trust_remote_code=True)
    model = transformers.AutoModel.from_config(cfg, trust_remote_code=True)
    if getattr(model, "_auto_class", None) is None:  # (4.48's from_config, unlike from_pretrained, did not register
        type(model).register_for_auto_class("AutoModel")  # it: save_pretrained then left the code out)
    model.save_pretrained(str(ckpt))
    return ckpt


def test_remote_code_files_are_saved_where_from_pretrained_did_not_register_the_class(tmp_path):
    """transformers 4.45 - 4.52's AutoModel.from_pretrained (4.40 - 4.44's for a Hub id) does not register a
    remote-code class for its auto class, so save_pretrained - and save_quantized, which asked the same
    registration - left the modeling files out, and the int4 folder did not load (replayed here by clearing
    it). save_quantized knows remote code by its module (transformers_modules) and registers it as
    config.auto_map names it."""
    import transformers

    from minicpm_int4.checkpoint import load_pretrained_quantized

    ckpt = _remote_code_checkpoint(tmp_path)
    model = transformers.AutoModel.from_pretrained(str(ckpt), trust_remote_code=True).eval()
    type(model)._auto_class = None
    patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path / "int4")
    assert {"modeling_tinyv.py", "configuration_tinyv.py"} <= set(os.listdir(tmp_path / "int4"))
    assert json.loads((tmp_path / "int4" / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_tinyv.TinyV"
    loaded = load_pretrained_quantized(str(tmp_path / "int4"), trust_remote_code=True, progress=False)
    ids = torch.randint(6, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    pv = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids, pv).logits, loaded(ids, pv).logits)


def test_save_quantized_writes_no_attention_choice_into_config_json(tmp_path):
    """transformers 4.46 - 4.53 mark a loaded model's config "attention implementation chosen"
    (_attn_implementation_autoset); a config.json saying so made the model rebuilt from it take eager attention
    instead of the sdpa of the model saved (other logits; caught under 4.48). save_quantized clears it in the
    file, as save_pretrained does, and leaves the live config as it was (replayed by setting it here)."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipConfig

    from minicpm_int4.checkpoint import _configs

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    model.config._attn_implementation_autoset = True
    save_quantized(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("_attn_implementation_autoset") is not True
    assert model.config._attn_implementation_autoset is True
    # a composite config's sub-configs (a vision tower's, a text model's) are cleared alike
    siglip = SiglipConfig()
    assert [id(c) for c in _configs(siglip)] == [id(siglip), id(siglip.text_config), id(siglip.vision_config)]


def test_a_config_naming_no_class_it_can_build_is_refused_by_name():
    """The model class comes from transformers or from an auto_map entry of that name; a config naming neither
    says so (and asks for model_class=) instead of building something else."""
    from transformers import LlamaConfig

    from minicpm_int4.checkpoint import _model_class_of

    cfg = LlamaConfig(architectures=["TinyV"], auto_map={"AutoConfig": "configuration_tinyv.TinyVConfig",
                                                         "AutoModel": "modeling_tinyv.OtherModel"})
    with pytest.raises(ValueError, match=r"names no transformers model class \(\['TinyV'\]\) .* pass model_class="):
        _model_class_of(cfg, "ckpt", trust_remote_code=True)
    cfg.auto_map["AutoModelForCausalLM"] = "modeling_tinyv.TinyV"
    with pytest.raises(ValueError, match="remote-code class modeling_tinyv.TinyV .* pass trust_remote_code=True"):
        _model_class_of(cfg, "ckpt", trust_remote_code=False)


def test_remote_code_model_round_trip_through_its_own_code(tmp_path):
    """MiniCPM-V 2.x / o-2.6 are remote code: save_quantized puts the modeling files beside the int4
    checkpoint (as save_pretrained does) and load_pretrained_quantized runs them again when trusted."""
    import transformers

    from minicpm_int4.checkpoint import load_pretrained_quantized

    ckpt = _remote_code_checkpoint(tmp_path)
    model = transformers.AutoModel.from_pretrained(str(ckpt), trust_remote_code=True).eval()
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    out = tmp_path / "int4"
    save_quantized(model, out, report)
    assert {"modeling_tinyv.py", "configuration_tinyv.py", "config.json"} <= set(os.listdir(out))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained_quantized(str(out))
    loaded = load_pretrained_quantized(str(out), trust_remote_code=True)
    assert type(loaded).__name__ == "TinyV" and sum(isinstance(m, QuantLinear) for m in loaded.modules()) == len(report.quantized)
    ids = torch.randint(6, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    pv = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids, pv).logits, loaded(ids, pv).logits)
    # the reloaded model saves its code again (its class knows its auto_map entry, as from_pretrained's does)
    save_quantized(loaded, tmp_path / "again")
    assert {"modeling_tinyv.py", "configuration_tinyv.py"} <= set(os.listdir(tmp_path / "again"))
    with torch.no_grad():
        again = load_pretrained_quantized(str(tmp_path / "again"), trust_remote_code=True)
        assert torch.equal(model(ids, pv).logits, again(ids, pv).logits)
    # transformers' own loader on the same folder (hf_integration.py), where this transformers can
    from minicpm_int4.hf_integration import register

    major = int(transformers.__version__.split(".")[0])
    if register() is None and (major >= 5 or importlib.util.find_spec("accelerate") is not None):  # 4.x: accelerate
        hf = transformers.AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
        assert sum(isinstance(m, QuantLinear) for m in hf.modules()) == len(report.quantized)
        with torch.no_grad():
            assert torch.equal(model(ids, pv).logits, hf(ids, pv).logits)


def test_cli_quantize_and_eval_of_a_remote_code_model(tmp_path, capsys):
    """The CLI on a remote-code model: calibration and evaluation on text go through its `llm` (the
    top-level forward of MiniCPM-V 2.x takes images and text together), the reload runs its code."""
    from helpers import save_word_tokenizer, write_word_prompts
    from minicpm_int4.cli import main

    ckpt = _remote_code_checkpoint(tmp_path)
    save_word_tokenizer(ckpt)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    common = ["--trust-remote-code", "--dtype", "fp32", "--device", "cpu"]  # --model-class: AutoModel, from auto_map
    assert main(["quantize", str(ckpt), str(tmp_path / "int4"), *common, "--group-size", "32",
                 "--calibration", str(prompts), "--verify-load", "--parts", "llm"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "activation-aware search" in out and "reloaded module by module" in out
    assert "with AutoModel (fp32)" in captured.err  # the default class of a config with an auto_map
    decisions = {d["name"]: d for d in json.loads((tmp_path / "int4" / "quant_config.json").read_text())["decisions"]}
    assert decisions["llm.model.layers.0.mlp.up_proj"]["action"] == "quantized"
    assert decisions["vpm.encoder.layers.0.mlp.fc1"]["action"] == "kept"  # --parts llm: vision stays
    with pytest.raises(SystemExit):
        main(["quantize", str(ckpt), str(tmp_path / "x"), "--parts", "llm,speech"])
    assert "unknown model part(s) ['speech']" in capsys.readouterr().err
    from helpers import write_random_images

    image = write_random_images(tmp_path / "imgs", sizes=((30, 40),))[0]
    assert main(["quantize", str(ckpt), str(tmp_path / "y"), *common, "--calibration-images", str(image)]) == 2
    err = capsys.readouterr().err  # its processor and forward are its own: the Python recipe instead
    assert "works with the native MiniCPM-V 4.x processors" in err and "call model(**batch) on each dict" in err
    assert main(["eval", str(ckpt), str(tmp_path / "int4"), *common, "--prompts", str(prompts), "--text", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert "next-token KL divergence" in out and "perplexity on" in out and "| llm.model.layers.0" in out


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    """A wrong path, a class transformers lacks, remote code without --trust-remote-code, a folder that
    is not an int4 checkpoint: one line naming the problem, exit code 2, no traceback; argparse
    refuses missing input files before anything loads."""
    from helpers import write_word_prompts
    from minicpm_int4.cli import main

    ckpt = _remote_code_checkpoint(tmp_path)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    out = str(tmp_path / "int4")

    def err_of(argv):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]  # the error line ("loading ..." progress may precede it)

    missing = str(tmp_path / "no_such_model")
    err = err_of(["quantize", missing, out, "--model-class", "AutoModel", "--device", "cpu"])
    assert err == f"minicpm-int4 quantize: MODEL {missing!r}: no such folder"
    err = err_of(["quantize", str(ckpt), out, "--model-class", "NoSuchModel", "--device", "cpu"])
    assert "--model-class NoSuchModel" in err and "has no such model class" in err
    err = err_of(["quantize", str(ckpt), out, "--model-class", "AutoModel", "--device", "cpu"])
    assert "trust_remote_code" in err or "trust-remote-code" in err
    assert not os.path.exists(out)
    err = err_of(["eval", str(ckpt), str(ckpt), "--prompts", str(prompts), "--device", "cpu"])
    assert "is not a minicpm_int4 checkpoint" in err
    err = err_of(["eval", str(ckpt), str(ckpt), "--device", "cpu"])
    assert "give --prompts, --images and/or --text" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = err_of(["quantize", str(ckpt), out, "--calibration", str(empty), "--model-class", "AutoModel",
                  "--trust-remote-code", "--device", "cpu"])
    assert "has no non-empty line" in err
    for argv, message in ((["quantize", str(ckpt), out, "--calibration", str(tmp_path / "nope.txt")], "does not exist"),
                          (["eval", str(ckpt), out, "--text", str(tmp_path / "nope.txt")], "does not exist"),
                          (["quantize", str(ckpt), str(prompts)], "exists and is not a directory"),
                          (["quantize", str(ckpt), str(ckpt)], "holds model weights (model.safetensors) and is not "
                                                               "a minicpm_int4 checkpoint")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setenv("MINICPM_INT4_TRACEBACK", "1")
    with pytest.raises(Exception, match="NoSuchModel"):
        main(["quantize", str(ckpt), out, "--model-class", "NoSuchModel"])


def test_generation_config_travels_with_the_checkpoint(tmp_path):
    """save_quantized writes the model's generation_config.json and load_pretrained_quantized reads it,
    as save_pretrained / from_pretrained do: generate() of the reloaded model stops at the checkpoint's
    end-of-turn token (without it, it ran on to the config's default length)."""
    from minicpm_int4.checkpoint import load_pretrained_quantized

    model = build_native("4_6", seed=0)
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    ids, pv, ts = prompt_with_image(model)
    inputs = dict(input_ids=ids, pixel_values=pv, target_sizes=ts)
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    # the first new token that did not come before it: the reloaded model must stop right after it
    stop_at = next(i for i in range(1, len(new)) if new[i] not in new[:i])
    model.generation_config.eos_token_id = [new[stop_at]]
    model.generation_config.max_new_tokens = 8
    model.generation_config.pad_token_id = 0
    save_quantized(model, tmp_path, report)
    assert (tmp_path / "generation_config.json").exists()

    loaded = load_pretrained_quantized(str(tmp_path))
    assert loaded.generation_config.eos_token_id == [new[stop_at]]
    assert loaded.generation_config.max_new_tokens == 8
    with torch.no_grad():
        out = loaded.generate(**inputs, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out == new[: stop_at + 1]
    # a folder without the file (written before it was saved) loads with the config-derived defaults
    (tmp_path / "generation_config.json").unlink()
    assert load_pretrained_quantized(str(tmp_path)).generation_config.eos_token_id != [new[stop_at]]


def test_a_tied_model_refuses_a_checkpoint_whose_tied_pair_differs(tmp_path):
    """The OCR model's lm_head is tied to its embeddings. Quantized, then dequantized (dequantize_model gives it
    a weight of its own) and patched again with the lm_head kept, the saved model holds two different matrices.
    One tied tensor cannot hold both: load_quantized into a tied model refuses, naming the pair, where it
    silently let one overwrite the other; load_pretrained_quantized builds the model untied from the saved
    config.json and computes as the saved model."""
    from minicpm_int4 import dequantize_model
    from minicpm_int4.checkpoint import load_pretrained_quantized

    model = build_native("ocr")
    patch_model(model, QuantConfig(group_size=32, quantize_lm_head=True), progress=False)
    dequantize_model(model)
    patch_model(model, QuantConfig(group_size=32), progress=False)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    save_quantized(model, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"tensors '.*embed_tokens.weight' and 'lm_head.weight' are one "
                                                      r"tensor in the model \(tied\) but differ in the checkpoint"):
        load_quantized(build_native("ocr", seed=5), tmp_path)
    loaded = load_pretrained_quantized(str(tmp_path), progress=False)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pv, target_sizes=ts).logits
        b = loaded(input_ids=ids, pixel_values=pv, target_sizes=ts).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5)  # fp32; the loaded tensors are file mappings (other BLAS paths)


def test_a_tensor_set_from_a_file_is_held_contiguous():
    """torch.save keeps a view's strides, so a .bin file can hold transposed tensors: what the loaders set in
    place of a meta tensor is a contiguous copy (the kernels read a QuantLinear's tensors row-major), a Parameter
    stays one."""
    from minicpm_int4.checkpoint import _assign

    model = torch.nn.Sequential(QuantLinear(64, 24, group_size=32, device="meta"))
    for key, shape in (("0.scales", (24, 2)), ("0.qweight", (24, 8)), ("0.bias", (24,))):
        dtype = torch.int32 if key == "0.qweight" else torch.float16
        t = (torch.randint(0, 99, shape[::-1]).to(dtype).t() if len(shape) == 2 else torch.randn(48).to(dtype)[::2])
        assert not t.is_contiguous()
        held = _assign(model, key, t)
        assert held.is_contiguous() and torch.equal(held, t) and model.state_dict(keep_vars=True)[key] is held
        assert isinstance(held, torch.nn.Parameter) == (key == "0.bias")


def test_a_checkpoint_that_does_not_fit_the_model_is_named_at_its_first_difference(tmp_path):
    """Each way a saved folder can differ from the model it is loaded into, by the message that names it."""
    from safetensors.torch import load_file, save_file

    model = build_native("4_6")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path)
    meta_path, weights_path = tmp_path / "quant_config.json", tmp_path / "model.safetensors"
    meta, tensors = json.loads(meta_path.read_text()), load_file(str(weights_path))
    layer = next(iter(meta["modules"]))
    spec = meta["modules"][layer]

    def load_edited(edit_meta=None, edit_tensors=None, edit_model=None):
        m, t = json.loads(json.dumps(meta)), dict(tensors)
        if edit_meta:
            edit_meta(m)
        if edit_tensors:
            edit_tensors(t)
        meta_path.write_text(json.dumps(m))
        save_file(t, str(weights_path))
        fresh = build_native("4_6")
        if edit_model:
            edit_model(fresh)
        load_quantized(fresh, tmp_path)

    with pytest.raises(CheckpointMismatchError, match="format_version 99 is not supported .*reads version 1"):
        load_edited(edit_meta=lambda m: m.update(format_version=99))
    parent, _, attr = layer.rpartition(".")
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint module '{layer}' is a Identity in the model, not a "
                                                      "Linear"):
        load_edited(edit_model=lambda f: setattr(f.get_submodule(parent), attr, torch.nn.Identity()))
    k, n = spec["in_features"], spec["out_features"]
    with pytest.raises(CheckpointMismatchError, match=f"checkpoint module '{layer}' is {n} x {k} but the model's is "
                                                      f"{n + 8} x {k}"):
        load_edited(edit_model=lambda f: setattr(f.get_submodule(parent), attr, torch.nn.Linear(k, n + 8)))
    with pytest.raises(CheckpointMismatchError, match=f"tensor '{layer}.scales' of the model is missing from the "
                                                      "checkpoint"):
        load_edited(edit_tensors=lambda t: t.pop(f"{layer}.scales"))
    with pytest.raises(CheckpointMismatchError, match=f"tensor '{layer}.scales': checkpoint dtype torch.float16 != "
                                                      r"model dtype torch.float32 \(a model saved in torch.float16: build "
                                                      "the model in that dtype - load_pretrained_quantized does"):
        load_edited(edit_tensors=lambda t: t.update({f"{layer}.scales": t[f"{layer}.scales"].half()}))
    with pytest.raises(CheckpointMismatchError, match=r"tensor 'extra.weight' in the checkpoint has no counterpart in "
                                                      r"the model \(1 unexpected tensors\)"):
        load_edited(edit_tensors=lambda t: t.update({"extra.weight": torch.ones(2)}))

    def poison(name, index, value):
        def edit(t):
            bad = t[f"{layer}.{name}"].clone()
            bad[index] = value
            t[f"{layer}.{name}"] = bad
        return edit

    # values no save writes (a damaged file): a NaN scale would make every output its group reaches NaN
    with pytest.raises(CheckpointMismatchError, match=rf"checkpoint module {layer}: scales: 1 NaN / inf value\(s\), "
                                                      r"the first at \[1, 0\] \(nan\) - a damaged checkpoint"):
        load_edited(edit_tensors=poison("scales", (1, 0), float("nan")))
    with pytest.raises(CheckpointMismatchError, match=rf"{layer}: zeros: 1 NaN / inf value\(s\), the first at "
                                                      r"\[2, 1\] \(inf\)"):
        load_edited(edit_tensors=poison("zeros", (2, 1), float("inf")))
    load_edited()  # (the folder as saved loads)
    # files that are not what they say: named, not json's line / column or safetensors' header message alone
    good = weights_path.read_bytes()
    weights_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors cannot be read as a safetensors file "
                                                      r"\(SafetensorError: .*\): a damaged or unfinished download"):
        load_quantized(build_native("4_6"), tmp_path)
    weights_path.write_bytes(good)
    meta_path.write_text('{"format_version": 1, "config": ')
    with pytest.raises(CheckpointMismatchError, match=r"quant_config.json is not valid JSON \(Expecting value: line 1"):
        load_quantized(build_native("4_6"), tmp_path)
    meta_path.write_text("[1, 2]")
    with pytest.raises(CheckpointMismatchError, match=r"quant_config.json: not a minicpm_int4 record"):
        load_quantized(build_native("4_6"), tmp_path)
    meta_path.write_text(json.dumps(meta))
    weights_path.rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointMismatchError, match=r"model.safetensors.index.json has no 'weight_map'"):
        load_quantized(build_native("4_6"), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}))
    load_quantized(build_native("4_6"), tmp_path)  # (a sharded folder loads)


def test_loaders_refuse_a_device_they_cannot_load_onto(tmp_path):
    """The device is checked before anything is read or built: a string that is no device, the meta device
    (which holds no values; before, the load ran and then said that every parameter was missing from the
    checkpoint) and a GPU the machine has not (before: torch's AssertionError from deep inside the load)."""
    from minicpm_int4.checkpoint import load_pretrained_quantized

    model = build_native("4_6")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path)
    for load in (lambda d: load_pretrained_quantized(str(tmp_path), device=d),
                 lambda d: load_quantized(build_native("4_6"), tmp_path, device=d)):
        with pytest.raises(ValueError, match=r"\(device='gpu0'\): not a device"):
            load("gpu0")
        with pytest.raises(ValueError, match=r"\(device='meta'\): the meta device holds no values"):
            load("meta")
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match=r"\(device='cuda'\): no CUDA device here \(torch "):
                load("cuda")
        else:
            with pytest.raises(RuntimeError, match=rf"\(device='cuda:{torch.cuda.device_count()}'\): this machine has"):
                load(f"cuda:{torch.cuda.device_count()}")
    assert load_pretrained_quantized(str(tmp_path), device=torch.device("cpu")).device.type == "cpu"
