import importlib.util
import os
import subprocess
import sys

import pytest

from minicpm_int4.cli import main


def test_demo_prints_report_memory_and_agreement(capsys, tmp_path):
    out_json = tmp_path / "demo.json"
    assert main(["demo", "--size", "tiny", "--new-tokens", "4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "layout minicpmv-native" in out
    assert "weight memory" in out and "MiB" in out
    assert "prompt logits: relative error" in out and "top-1 agreement" in out
    assert "greedy generation (4 new tokens)" in out
    assert out_json.exists()


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


def test_quantize_command_round_trip(tmp_path):
    # a real from_pretrained checkpoint that the test writes itself
    from minicpm_int4.tiny import build_native
    src = tmp_path / "fp"
    build_native("4_6").to(dtype=__import__("torch").bfloat16).save_pretrained(src)
    out = tmp_path / "int4"
    assert main(["quantize", str(src), str(out), "--model-class", "MiniCPMV4_6ForConditionalGeneration",
                 "--group-size", "32"]) == 0
    assert (out / "model.safetensors").exists() and (out / "quant_config.json").exists()
