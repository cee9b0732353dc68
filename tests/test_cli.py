import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from minicpm_int4.cli import main


def test_demo_prints_report_memory_and_agreement(capsys, tmp_path):
    out_json = tmp_path / "demo.json"
    assert main(["demo", "--model", "4.6", "--size", "tiny", "--new-tokens", "4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "layout minicpmv-native" in out
    assert "weight memory" in out and "MiB" in out
    assert "prompt logits: relative error" in out and "top-1 agreement" in out
    assert "greedy generation (4 new tokens)" in out
    assert out_json.exists()


@pytest.mark.parametrize("model", ["llama3-v2.5", "2.6"])
def test_demo_on_the_remote_code_layouts(capsys, model):
    assert main(["demo", "--model", model, "--size", "tiny", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "layout minicpmv-remote" in out and "remote code" in out
    assert "prompt logits: relative error" in out and "greedy generation (3 new tokens)" in out


def test_demo_default_falls_back_to_the_remote_layout_without_native_classes(capsys):
    """transformers 4.x (which the 2.x models pin) has no native 4.6 class: the README's demo command
    still runs there, on the 2.6 layout, and says so. CI runs this under 5.x and 4.x."""
    import transformers

    native = hasattr(transformers, "MiniCPMV4_6Config")
    assert main(["demo", "--size", "tiny", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    if native:
        assert "layout minicpmv-native" in out and "instead" not in out
    else:
        assert "has no MiniCPMV4_6Config" in out and "the demo runs the MiniCPM-V 2.6 layout" in out
        assert "layout minicpmv-remote" in out


def test_python_dash_m_entry_point():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "minicpm_int4", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout


def test_no_top_level_kernels_package_is_installed():
    # `kernels` is the Hugging Face kernels library's name; transformers imports it when present
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        assert "minicpm_int4" not in (spec.origin or "") and not any(
            "minicpm" in p for p in (spec.submodule_search_locations or []))
    import minicpm_int4.kernels as k
    assert k.__name__ == "minicpm_int4.kernels"


def _save_tiny_model_with_tokenizer(path):
    """A real from_pretrained directory the test writes itself: tiny MiniCPM-V 4.6 + word tokenizer."""
    import torch

    from helpers import save_word_tokenizer
    from minicpm_int4.tiny import build_native

    save_word_tokenizer(path)
    build_native("4_6").to(torch.float32).save_pretrained(path)


def test_quantize_and_eval_commands(tmp_path, capsys):
    import json

    from helpers import write_word_prompts

    src, out = tmp_path / "fp", tmp_path / "int4"
    assert main(["quantize", str(src), str(out), "--input-scales"]) == 2  # before anything is loaded
    assert ("--input-scales searches each layer's scale on its calibration inputs: give --calibration prompts.txt "
            "and/or --calibration-images") in capsys.readouterr().err
    _save_tiny_model_with_tokenizer(src)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    assert main(["quantize", str(src), str(out), "--model-class", "MiniCPMV4_6ForConditionalGeneration",
                 "--dtype", "fp32", "--group-size", "32", "--calibration", str(prompts),
                 "--keep-most-sensitive", "2", "--input-scales", "--verify-load"]) == 0
    text = capsys.readouterr().out
    assert "keep_most_sensitive=2" in text and "activation-aware search" in text
    assert "input scales: " in text and "layers quantized now multiply their input" in text
    assert "model-output sensitivity rank 1 of" in text and "model sensitivity" in text  # the default ranking
    assert "reloaded module by module: process peak RSS" in text
    assert f"load it with minicpm_int4.checkpoint.load_pretrained_quantized({str(out)!r})" in text
    assert f"MiniCPMV4_6ForConditionalGeneration.from_pretrained({str(out)!r})" in text  # native: 5.x, a registry
    assert (out / "model.safetensors").exists() and (out / "quant_config.json").exists() and (out / "config.json").exists()

    report = tmp_path / "eval.json"
    assert main(["eval", str(src), str(out), "--model-class", "MiniCPMV4_6ForConditionalGeneration", "--dtype", "fp32",
                 "--prompts", str(prompts), "--text", str(prompts), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "next-token KL divergence" in text and "perplexity on" in text and "| layer |" in text
    res = json.loads(report.read_text())
    assert res["tokens"] == 6 * 12 and 0 <= res["top1_agreement"] <= 1 and res["kl_divergence"] >= 0
    assert res["layers"] and all(r["rel_output_error"] > 0 for r in res["layers"])


def test_quantize_with_gptq(tmp_path, capsys):
    import json

    from helpers import write_word_prompts
    from minicpm_int4.checkpoint import load_pretrained_quantized

    src, out = tmp_path / "fp", tmp_path / "int4"
    assert main(["quantize", str(src), str(out), "--method", "gptq"]) == 2  # before anything is loaded
    assert ("--method gptq fits each layer to its calibration inputs: give --calibration prompts.txt and/or "
            "--calibration-images") in capsys.readouterr().err
    _save_tiny_model_with_tokenizer(src)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts, lines=12, words=40)
    assert main(["quantize", str(src), str(out), "--model-class", "MiniCPMV4_6ForConditionalGeneration",
                 "--dtype", "fp32", "--group-size", "32", "--method", "gptq", "--calibration", str(prompts)]) == 0
    text = capsys.readouterr().out
    assert "gptq on 480 calibration tokens" in text
    assert "no calibration input reached it: clipping-range search instead of gptq" in text  # the vision tower
    assert "saw no calibration input and got the clipping-range search instead of gptq" in text  # the note
    assert "calibration prompts with images reach the vision tower (CLI: --calibration-images)" in text
    assert json.loads((out / "quant_config.json").read_text())["config"]["method"] == "gptq"
    model = load_pretrained_quantized(str(out))
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[7, 8, 9]])).logits
    assert torch.isfinite(logits).all()


def test_quantize_with_calibration_images(tmp_path, capsys, monkeypatch):
    """--calibration-images: each image, with a calibration line as its prompt, goes through the model's
    processor and chat template, so gptq fits the vision tower on image tokens instead of falling back
    to the search. Bad images, an empty folder and a model without a processor fail in one line
    before the model loads. eval --images compares on image prompts the same way."""
    import json

    from helpers import tiny_minicpmv4_6_processor, write_random_images, write_word_prompts
    from minicpm_int4 import cli
    from minicpm_int4.tiny import IMAGE_TOKEN_ID

    src, out = tmp_path / "fp", tmp_path / "int4"
    _save_tiny_model_with_tokenizer(src)  # skips (NativeModelUnavailable) where transformers has no 4.6
    folder = tmp_path / "imgs"
    write_random_images(folder)
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts, lines=12, words=40)
    common = ["--model-class", "MiniCPMV4_6ForConditionalGeneration", "--dtype", "fp32", "--group-size", "32"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_an_image.png").write_text("plain text")
    png = (folder / "img0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])  # a real header, half the data
    capsys.readouterr()  # save_pretrained's progress bar
    for images, message in [(tmp_path / "nowhere", "no such file or folder"),
                            (tmp_path / "empty", "the folder has no image"),
                            (tmp_path / "not_an_image.png", "cannot read"),
                            (tmp_path / "truncated.png", "truncated.png' as an image"),
                            (folder, "needs the model's processor, which does not load")]:  # none saved in src
        assert main(["quantize", str(src), str(out), *common, "--calibration-images", str(images)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "loading" not in err, err
    assert not out.exists()

    monkeypatch.setattr(cli, "_load_processor", lambda args, flag: tiny_minicpmv4_6_processor(IMAGE_TOKEN_ID))
    # images only: gptq needs no --calibration then; each image gets the generic prompt
    assert main(["quantize", str(src), str(out), *common, "--method", "gptq", "--calibration-images", str(folder)]) == 0
    captured = capsys.readouterr()
    assert "calibration: 0 text prompt(s), 3 image prompt(s)" in captured.err
    decisions = json.loads((out / "quant_config.json").read_text())["decisions"]
    vision = [d for d in decisions if d["part"] == "vision" and d["action"] == "quantized"]
    assert vision and all("gptq on" in d["reason"] for d in vision)
    assert "no calibration input reached it" not in captured.out
    # text and images: the lines calibrate the LLM, and are the images' prompts in turn
    out2 = tmp_path / "int4_both"
    assert main(["quantize", str(src), str(out2), *common, "--method", "gptq", "--calibration", str(prompts),
                 "--calibration-images", str(folder / "img0.png"), str(folder / "img1.png"), "--calib-samples", "5",
                 "--keep-most-sensitive", "2"]) == 0
    captured = capsys.readouterr()
    assert "calibration: 5 text prompt(s), 2 image prompt(s)" in captured.err
    llm = {d["name"]: d for d in json.loads((out2 / "quant_config.json").read_text())["decisions"]}
    tokens = int(llm["model.language_model.layers.0.mlp.up_proj"]["reason"].split("gptq on ")[1].split()[0])
    assert tokens > 5 * 40  # the 5 lines' 200 tokens reach the LLM, and the image prompts' too
    # mixed precision's sensitivity batches are spread over text and image prompts: the vision tower's
    # layers change the model's output there, so they are ranked by it too
    vision2 = [d for d in llm.values() if d["part"] == "vision" and d["model_sensitivity"] is not None]
    assert vision2 and all(d["model_sensitivity"] != 0 for d in vision2)
    assert "did not change the model's output" not in captured.out

    # eval --images: image prompts compared too, so the vision tower's layers get output errors
    report = tmp_path / "eval.json"
    assert main(["eval", str(src), str(out), *common[:4], "--images", str(folder), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "tokens (0 text prompt(s), 3 image prompt(s)): next-token KL divergence" in text
    res = json.loads(report.read_text())
    assert res["image_prompts"] == 3 and res["prompts"] == 0 and res["kl_divergence"] >= 0
    errors = {r["name"]: r["rel_output_error"] for r in res["layers"]}
    assert {d["name"] for d in vision} <= set(errors) and all(errors[d["name"]] > 0 for d in vision)
    assert main(["eval", str(src), str(out), *common[:4], "--prompts", str(prompts), "--images", str(folder / "img2.png")]) == 0
    assert "tokens (12 text prompt(s), 1 image prompt(s))" in capsys.readouterr().out
    assert main(["eval", str(src), str(out), *common[:4], "--images", str(tmp_path / "empty")]) == 2
    assert "--images " in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main(["eval", str(src), str(out), *common[:4], "--prompts", str(tmp_path / "blank.txt")]) == 2
    err = capsys.readouterr().err
    assert "the file has no non-empty line" in err and "loading" not in err  # before any model loads
    assert "no calibration input reached it" not in captured.out


def test_quantize_per_part_activations_and_patterns(tmp_path, capsys):
    """--act picks W4A8 per model part, --include / --exclude pick layers by name, as QuantConfig does;
    what the config refuses (mixed precision without calibration) is refused before the model loads.
    The checkpoint keeps the choices and reloads into the same paths."""
    import json

    from minicpm_int4 import QuantLinear
    from minicpm_int4.checkpoint import load_pretrained_quantized

    src, out = tmp_path / "fp", tmp_path / "int4"
    _save_tiny_model_with_tokenizer(src)
    capsys.readouterr()
    assert main(["quantize", str(src), str(out), "--keep-most-sensitive", "2"]) == 2
    err = capsys.readouterr().err
    assert "rank layers by their output error on calibration inputs: give --calibration" in err and "loading" not in err
    assert main(["quantize", str(src), str(out), "--dtype", "fp32", "--group-size", "32", "--act", "vision=int8",
                 "--exclude", "*layers.3.mlp*", "--include", "model.merger.mlp.0.linear_1",
                 "--sensitivity", "layer", "--sensitivity-batches", "2"]) == 0
    saved = json.loads((out / "quant_config.json").read_text())
    assert (saved["config"]["sensitivity"], saved["config"]["sensitivity_batches"]) == ("layer", 2)
    assert saved["config"]["act"] == {"vision": "int8"} and saved["config"]["exclude"] == ["*layers.3.mlp*"]
    by = {d["name"]: d for d in saved["decisions"]}
    assert by["model.vision_tower.encoder.layers.0.mlp.fc1"]["path"].startswith("w4a8")
    assert by["model.language_model.layers.0.mlp.up_proj"]["path"] == "w4a16"
    assert by["model.language_model.layers.3.mlp.up_proj"]["action"] == "kept"
    assert "excluded by pattern '*layers.3.mlp*'" in by["model.language_model.layers.3.mlp.up_proj"]["reason"]
    assert by["model.merger.mlp.0.linear_1"]["action"] == "quantized"  # merger is off by default; included by name
    model = load_pretrained_quantized(str(out))
    fc1 = model.get_submodule("model.vision_tower.encoder.layers.0.mlp.fc1")
    assert isinstance(fc1, QuantLinear) and fc1.act == "int8"
    assert model.get_submodule("model.language_model.layers.0.mlp.up_proj").act is None


def test_a_native_checkpoint_that_also_ships_remote_code_is_native(tmp_path, capsys, monkeypatch):
    """A checkpoint can carry remote code (an auto_map) beside a class transformers has natively; without
    --trust-remote-code transformers loads the native class, and so does the CLI: the model class with
    the LM head (not AutoModel, which would drop it) and image calibration through its processor."""
    import json

    from helpers import tiny_minicpmv4_6_processor, write_random_images, write_word_prompts
    from minicpm_int4 import cli
    from minicpm_int4.tiny import IMAGE_TOKEN_ID

    src = tmp_path / "fp"
    _save_tiny_model_with_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV"}
    (src / "config.json").write_text(json.dumps(cfg))
    write_random_images(tmp_path / "imgs", sizes=((60, 60),))
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    monkeypatch.setattr(cli, "_load_processor", lambda args, flag: tiny_minicpmv4_6_processor(IMAGE_TOKEN_ID))
    capsys.readouterr()
    assert main(["quantize", str(src), str(tmp_path / "int4"), "--dtype", "fp32", "--group-size", "32",
                 "--calibration", str(prompts), "--calibration-images", str(tmp_path / "imgs")]) == 0
    captured = capsys.readouterr()
    assert "with AutoModelForImageTextToText (fp32)" in captured.err
    assert "calibration: 6 text prompt(s), 1 image prompt(s)" in captured.err
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in captured.out and "lm_head" in captured.out


def test_images_without_pillow_are_one_clear_error(monkeypatch, tmp_path):
    from minicpm_int4.cli import CLIError, _open_image

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL raises ImportError
    with pytest.raises(CLIError, match=r"--images needs Pillow to read images \(pip install pillow\)"):
        _open_image(tmp_path / "a.png", "--images", verify_only=True)


def test_image_batches_are_the_processors_own_inputs():
    """With a chat template the image goes in a user turn; without one, the processor's image token
    before the prompt: the same pixels and the same number of image placeholders either way, pixel
    values in the model's dtype, and every placeholder filled by the model's image features."""
    from PIL import Image

    from helpers import tiny_minicpmv4_6_processor
    from minicpm_int4.cli import _image_batches
    from minicpm_int4.tiny import IMAGE_TOKEN_ID, build_native

    model = build_native("4_6")
    proc = tiny_minicpmv4_6_processor(IMAGE_TOKEN_ID)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in [(80, 120), (50, 40)]]
    chat = _image_batches(proc, images, ["w1 w2 w3"], "cpu", torch.bfloat16)
    assert len(chat) == 2 and all(b["pixel_values"].dtype == torch.bfloat16 for b in chat)
    # the user turn ends with the prompt, then the generation prompt ("assistant": a word this vocabulary lacks)
    tokens = proc.tokenizer.convert_ids_to_tokens(chat[1]["input_ids"][0].tolist())
    assert tokens[-6:] == ["w1", "w2", "w3", "<|im_end|>", "<|im_start|>", "[UNK]"], tokens
    proc.chat_template = None
    plain = _image_batches(proc, images, None, "cpu", torch.float32)
    for a, b in zip(chat, plain):
        assert torch.equal(a["pixel_values"], b["pixel_values"].bfloat16()) and torch.equal(a["target_sizes"], b["target_sizes"])
        assert int((a["input_ids"] == IMAGE_TOKEN_ID).sum()) == int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) > 0
    with torch.no_grad():
        for b in plain:  # the model accepts them: placeholders and image features match in number
            assert torch.isfinite(model(**b).logits).all()


def test_env_reports_backends_and_why_not(capsys, tmp_path):
    import json

    from minicpm_int4 import ops

    out = tmp_path / "env.json"
    assert main(["env", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    info = json.loads(out.read_text())
    assert text.startswith("minicpm_int4 ") and f"torch {torch.__version__}" in text
    assert info["torch"] == torch.__version__ and info["backends"]["torch"]["available"]
    assert info["backends"]["triton"]["available"] == (ops._triton_kernels()[0] is not None)
    assert info["backends"]["triton"]["interpreter"] == ops.triton_interpreter_active()
    if ops.cuda_extension_error():  # CI: not built, and the report says why and how to build it
        assert not info["backends"]["cuda"]["available"]
        assert "backend cuda: unavailable - the CUDA extension minicpm_int4._C is not built" in text
        assert "MINICPM_INT4_BUILD_CUDA=1" in text
    if not torch.cuda.is_available():
        assert {p["backend"] for p in info["auto"]} == {"torch"}
        assert "w4a16_gemm M=1 N=4096 K=4096: torch" in text
    from minicpm_int4.hf_integration import register

    h = info["transformers_integration"]
    assert h["registered"] == (register() is None)
    line = next(x for x in text.splitlines() if x.startswith("transformers from_pretrained / save_pretrained: "))
    assert ("'minicpm_int4' registered" in line) == h["registered"] and (h["reason"] or "") in line


def test_env_report_of_a_gpu_install(monkeypatch):
    """The GPU branches of the report, from a collected report edited to look like a CUDA install."""
    from minicpm_int4 import diagnose

    info = diagnose.collect("cpu")
    info.update(device="cuda:0", device_name="NVIDIA H200", capability="9.0", sm_count=132,
                total_memory_bytes=141 * 2**30, cuda_devices=["NVIDIA H200", "NVIDIA H200"])
    info["backends"]["triton"].update(available=True, interpreter=False, launch=None)
    info["backends"]["cuda"].update(available=True, ops=["quantize_per_token_int8", "w4a16_gemm"])
    info["auto"] = [{"op": "w4a16_gemm", "m": 1, "n": 4096, "k": 4096, "backend": "cuda"},
                    {"op": "quantize_per_token_int8", "m": 4096, "k": 14336, "backend": "cuda"}]
    info["dispatch_table"].update(devices=["NVIDIA H200"], this_device="NVIDIA H200", this_device_rules=7,
                                  this_device_act_quant_entries=15)
    text = diagnose.format_report(info)
    assert "device: cuda:0 (NVIDIA H200), sm_90, 132 SMs, 141 GiB" in text
    assert "CUDA devices: NVIDIA H200, NVIDIA H200" in text
    assert "backend triton: compiled kernels\n" in text
    assert "backend cuda: minicpm_int4._C loaded (quantize_per_token_int8, w4a16_gemm)" in text
    assert "W4A8 GEMM on this GPU" not in text  # (no answer from the extension: no line)
    info["backends"]["cuda"]["w4a8_kernel"] = "wgmma, 128-token blocks only (...)"
    assert ("backend cuda: minicpm_int4._C loaded (quantize_per_token_int8, w4a16_gemm)\n"
            "  W4A8 GEMM on this GPU: wgmma, 128-token blocks only (...)\n") in diagnose.format_report(info)
    info["backends"]["cuda"]["w4a16_prefill_kernel"] = "wgmma (warpgroup MMA, sm_90a), 128- or 256-token blocks (...)"
    assert ("  W4A8 GEMM on this GPU: wgmma, 128-token blocks only (...)\n"
            "  W4A16 past 16 rows (backend='cuda') on this GPU: wgmma (warpgroup MMA, sm_90a), 128- or 256-token "
            "blocks (...)\n") in diagnose.format_report(info)
    assert "w4a16_gemm M=1 N=4096 K=4096: cuda" in text and "quantize_per_token_int8 M=4096 K=14336: cuda" in text
    assert ("dispatch table: 1 GPU(s) measured: NVIDIA H200\n  NVIDIA H200: 7 measured rule(s), the activation "
            "quantizer timed at 15 (K, M)") in text
    info["dispatch_table"]["this_device_picks"] = {"w4a16": {"cuda": 5, "cuda-gemv": 2}, "act_quant": {}, "w4a8": {}}
    assert ("quantizer timed at 15 (K, M)\n    w4a16 entries won by: cuda 5, cuda-gemv 2\n"
            in diagnose.format_report(info))  # (an op without entries: no line)
    # an H100 reading the H200's entry (dispatch.SAME_ARCH): the line says whose
    borrowed = dict(info["dispatch_table"], this_device="NVIDIA H100 80GB HBM3", this_device_entry="NVIDIA H200",
                    this_device_capability="9.0")
    assert ("  NVIDIA H100 80GB HBM3: 7 measured rule(s), NVIDIA H200's (none of its own; the same compute capability "
            "9.0; MINICPM_INT4_DISPATCH_SAME_ARCH=0 turns this off), the activation quantizer timed at 15 (K, M)\n"
            in diagnose.format_report(dict(info, dispatch_table=borrowed)))
    hint = "    to measure this GPU's own: minicpm-int4 bench --out b && minicpm-int4 dispatch-table b/bench.json"
    assert hint in diagnose.format_report(dict(info, dispatch_table=borrowed))
    assert hint in diagnose.format_report(dict(info, dispatch_table=dict(info["dispatch_table"], this_device_rules=0)))
    assert hint not in text  # (the H200 has its own)
    info["dispatch_table"].update(from_env=True, path="/tmp/suite-table.json", exists=True)
    assert "NVIDIA H200 (MINICPM_INT4_DISPATCH_TABLE=/tmp/suite-table.json)\n" in diagnose.format_report(info)
    # how the compiled Triton kernels are launched (kernels/_launch.py), and why not directly
    from minicpm_int4.kernels import _launch

    info["backends"]["triton"]["launch"] = diagnose._triton_launch(object(), False)
    assert ("backend triton: compiled kernels\n  launched: " + info["backends"]["triton"]["launch"]) in diagnose.format_report(info)
    monkeypatch.setattr(_launch, "ENABLED", False)
    assert diagnose._triton_launch(object(), False).startswith("Triton's own launch (MINICPM_INT4_FAST_LAUNCH=0); "
                                                              "autotuning results cached on disk")
    from minicpm_int4.kernels import _common

    monkeypatch.setattr(_common, "autotune_cache_supported", lambda: False)
    assert diagnose._triton_launch(object(), False).endswith("(its on-disk cache needs triton >= 3.4)")
    monkeypatch.setattr(_common, "AUTOTUNE_CACHE", False)
    assert diagnose._triton_launch(object(), False).endswith("autotuning timed in each process (MINICPM_INT4_AUTOTUNE_CACHE=0)")
    monkeypatch.setattr(_launch, "ENABLED", True)
    monkeypatch.setattr(_launch, "_SUPPORTED", False)
    assert "the direct one needs triton >= 3.4" in diagnose._triton_launch(object(), False)
    assert diagnose._triton_launch(None, False) is None and diagnose._triton_launch(object(), True) is None


@pytest.mark.parametrize("argv, message", [
    (["bench", "--ms", "0,16"], "token counts must be positive integers"),
    (["bench", "--ms", "1,x"], "is not a comma-separated list of integers"),
    (["bench", "--models", "minicpmv4.6,nosuch"], "unknown ['nosuch']: choose from minicpmv4.6,"),
    (["profile", "--models", "minicpmv2.6"], "unknown ['minicpmv2.6']: choose from minicpmv4.6,llama3-v2.5"),
    (["profile", "--modes", "eager,fast"], "unknown ['fast']: choose from eager,cudagraph,graphed"),
    # counts that would run nothing, or fail only after minutes of loading and quantizing
    (["profile", "--new-tokens", "0"], "argument --new-tokens: '0': must be a positive integer"),
    (["profile", "--prompt-tokens", "-5"], "argument --prompt-tokens: '-5': must be a positive integer"),
    (["demo", "--new-tokens", "x"], "argument --new-tokens: 'x' is not an integer"),
    (["bench", "--max-n", "0"], "argument --max-n: '0': must be a positive integer"),
    (["bench", "--backends", "w4a16-triton,nosuch"], "unknown backend ['nosuch']: choose from fp16,w4a16-triton,"),
    (["quantize", "m", "o", "--calib-samples", "0"], "argument --calib-samples: '0': must be a positive integer"),
    (["quantize", "m", "o", "--keep-most-sensitive", "-1"], "'-1': must be a non-negative integer"),
    (["quantize", "m", "o", "--weight-budget-mib", "-3"], "argument --weight-budget-mib: '-3': must be a positive number"),
    (["quantize", "m", "o", "--sensitivity", "global"], "argument --sensitivity: invalid choice: 'global'"),
    (["quantize", "m", "o", "--sensitivity-batches", "0"], "argument --sensitivity-batches: '0': must be a positive integer"),
    (["eval", "m", "o", "--max-length", "0"], "argument --max-length: '0': must be a positive integer"),
    (["quantize", "m", "o", "--act", "fp8"], "argument --act: 'fp8': give int8, none, or part=int8[,part=int8...]"),
    (["quantize", "m", "o", "--act", "eyes=int8"], "unknown model part 'eyes' in 'eyes=int8': choose from llm,"),
    (["quantize", "m", "o", "--act", "vision=int4"], "'vision=int4': the activations of a part are int8 or none"),
])
def test_bench_and_profile_refuse_bad_lists_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("xpu", "--device xpu: the int4 layers run on cuda or cpu"),
    ("bogus", "--device bogus: not a device"),
    ("cuda:99", "--device cuda:99: "),
])
@pytest.mark.parametrize("command", [["demo", "--size", "tiny"], ["bench"], ["profile"]])
def test_a_device_torch_cannot_use_is_one_line(command, device, message, capsys):
    assert main([*command, "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"minicpm-int4 {command[0]}: {message}") and "Traceback" not in "".join(err)


@pytest.mark.parametrize("qc, scheme", [({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "nf4"),
                                        ({"load_in_8bit": True}, "int8")])
def test_quantize_refuses_a_bitsandbytes_checkpoint_before_loading_it(capsys, tmp_path, qc, scheme):
    """MiniCPM-V's official -int4 checkpoints are bitsandbytes nf4: quantize names that and what to quantize
    instead, exit 2, before any loading (a hub name is loaded, and patch_model then lists and warns)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", **qc}}))
    assert main(["quantize", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"is a bitsandbytes {scheme} checkpoint" in err and "quantize the fp16 / bf16 model" in err
    assert "loading" not in err and not (tmp_path / "out").exists()
