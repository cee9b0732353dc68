"""Checkpoints named by Hugging Face Hub model id (hub.py): nothing downloads here, so the Hub is
huggingface_hub's own cache, laid out as it lays it out (models--owner--name/refs/main and
snapshots/<commit>/), read by the real snapshot_download in offline mode; what an online fetch asks for
is checked against a stand-in for snapshot_download."""
import json
import os
import shutil

import pytest
import torch

from minicpm_int4 import QuantConfig, QuantLinear, patch_model
from minicpm_int4.checkpoint import load_pretrained_quantized
from minicpm_int4.hub import CheckpointNotFoundError, checkpoint_dir, copy_support_files, looks_like_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """publish(folder, repo_id): folder's files as huggingface_hub's cache holds a downloaded model; the
    Hub itself out of reach (HF_HUB_OFFLINE), as on a machine that fetched the model before."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def publish(folder, repo_id):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        return repo / "snapshots" / COMMIT

    return publish


def test_repo_ids_and_local_paths_are_told_apart(tmp_path):
    for name in ("openbmb/MiniCPM-V-4_6-AWQ", "gpt2", "a.b/c-d_e.1"):
        assert looks_like_repo_id(name), name
    for name in ("./x", "/abs/x", "~/x", "a/b/c", "x/../y", "model.safetensors", "", "-x/y"):
        assert not looks_like_repo_id(name), name
    assert checkpoint_dir(str(tmp_path)) == str(tmp_path)  # a folder is returned as it is
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointNotFoundError, match="is a file, not a checkpoint folder"):
        checkpoint_dir(str(tmp_path / "f.txt"))
    with pytest.raises(CheckpointNotFoundError, match="no_such': no such folder"):
        checkpoint_dir(str(tmp_path / "no_such"))


def test_a_model_neither_local_nor_fetchable_is_named(hub_cache):
    with pytest.raises(CheckpointNotFoundError, match=r"'nobody-here/no-such-model' is not a local folder, and no "
                                                      r"Hugging Face Hub model of that name could be fetched \("):
        checkpoint_dir("nobody-here/no-such-model")


def _fake_snapshot_download(remote, calls):
    """snapshot_download as it behaves online, over a local folder standing for the Hub repo: the files its
    own filter (huggingface_hub.utils.filter_repo_objects) lets through, copied into a snapshot folder."""
    from huggingface_hub.utils import filter_repo_objects

    def fetch(repo_id, revision=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append(list(allow_patterns))
        snap = remote.parent / "snapshot"
        snap.mkdir(exist_ok=True)
        files = [str(f.relative_to(remote)) for f in remote.rglob("*") if f.is_file()]
        for f in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / f, snap / f)
        return str(snap)
    return fetch


@pytest.mark.parametrize("weights", ["safetensors", "bin", "both"])
def test_an_online_fetch_asks_for_configs_code_and_one_kind_of_weights(tmp_path, monkeypatch, weights):
    import huggingface_hub

    remote = tmp_path / "repo"
    remote.mkdir()
    for f in ("config.json", "tokenizer.json", "modeling_x.py", "README.md", "model.onnx", "merges.txt",
              "original/consolidated.safetensors", "original/params.json", "additional_chat_templates/tool.jinja"):
        (remote / f).parent.mkdir(exist_ok=True)
        (remote / f).write_text("x")
    if weights in ("safetensors", "both"):
        (remote / "model.safetensors").write_text("x")
    if weights in ("bin", "both"):
        (remote / "pytorch_model.bin").write_text("x")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(remote, calls))
    folder = checkpoint_dir("owner/model")
    got = set(os.listdir(folder))
    assert {"config.json", "tokenizer.json", "modeling_x.py", "merges.txt", "additional_chat_templates"} <= got
    assert not got & {"README.md", "model.onnx", "original"}  # (the Hub's patterns match across folders)
    assert os.listdir(os.path.join(folder, "additional_chat_templates")) == ["tool.jinja"]
    # safetensors where the model has them (never both kinds); *.bin in a second call only where it has none
    assert ("model.safetensors" in got) == (weights != "bin") and ("pytorch_model.bin" in got) == (weights == "bin")
    assert len(calls) == (3 if weights == "bin" else 2)  # (+ the chat templates' folder)
    calls.clear()
    shutil.rmtree(folder)
    # load_pretrained_quantized passes its revision on (a pinned commit, not main's latest)
    revisions = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None, **kw: revisions.append(revision) or str(tmp_path / "repo"))
    with pytest.raises(ValueError):  # (the stand-in config.json is no JSON)
        load_pretrained_quantized("owner/model", revision="v1.0")
    assert revisions and set(revisions) == {"v1.0"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(remote, calls))
    assert set(os.listdir(checkpoint_dir("owner/model", weights=False))) == {
        "config.json", "tokenizer.json", "modeling_x.py", "merges.txt", "additional_chat_templates"}
    assert len(calls) == 2


def test_support_files_are_carried_but_not_what_the_int4_folder_has_or_must_not_have(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "additional_chat_templates").mkdir(parents=True)
    (src / "assets").mkdir()
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
             "chat_template.jinja", "processing_x.py", "merges.txt", "tokenizer.model", "LICENSE",
             "generation_config.json",  # (where the int4 folder has none: a model that cannot generate)
             # not carried:
             "config.json", "quantize_config.json", "quant_config.json",
             "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "README.md", ".gitattributes",
             "modeling_x.py")
    for f in names:
        (src / f).write_text(f"src {f}")
    (src / "additional_chat_templates" / "tool.jinja").write_text("t")
    (src / "assets" / "logo.json").write_text("{}")
    dst.mkdir()
    (dst / "modeling_x.py").write_text("written from the model")
    copied = copy_support_files(str(src), str(dst))
    assert sorted(copied) == sorted(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                     "preprocessor_config.json", "chat_template.jinja", "processing_x.py", "merges.txt",
                                     "tokenizer.model", "LICENSE", "generation_config.json",
                                     os.path.join("additional_chat_templates", "tool.jinja")])
    assert (dst / "modeling_x.py").read_text() == "written from the model"  # never overwritten


def test_an_awq_checkpoint_by_hub_id_loads_converts_and_carries_its_tokenizer(tmp_path, hub_cache, capsys):
    """A published AWQ model named by its id: load_pretrained_quantized and `minicpm-int4 convert` read
    it from the cache; the converted folder gets the tokenizer and processor files beside the int4
    checkpoint (AutoTokenizer loads from it), not the model card or AutoGPTQ's record."""
    import transformers
    from helpers import save_word_tokenizer
    from test_foreign import _native_or_skip, _write_foreign
    from minicpm_int4.cli import main
    from minicpm_int4.tiny import prompt_with_image

    model = _native_or_skip()
    patch_model(model, QuantConfig(group_size=32), progress=False)
    folder = tmp_path / "awq"
    _write_foreign(model, folder, "awq")
    save_word_tokenizer(folder)
    (folder / "README.md").write_text("the fp16 model's card")
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_resize": False}))
    hub_cache(folder, "minicpm-int4-tests/tiny-awq")

    loaded = load_pretrained_quantized("minicpm-int4-tests/tiny-awq", progress=False)
    ids, pv, ts = prompt_with_image(model)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits
        assert torch.equal(loaded(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits, want)

    out = tmp_path / "int4"
    assert main(["convert", "minicpm-int4-tests/tiny-awq", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "MODEL minicpm-int4-tests/tiny-awq: fetching its configs from the Hugging Face Hub" in captured.err
    assert "copied" in captured.out and "tokenizer.json" in captured.out
    got = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"} <= got
    assert not got & {"README.md", "quantize_config.json"}
    assert json.loads((out / "preprocessor_config.json").read_text()) == {"do_resize": False}
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("w3 w5")["input_ids"] == [5, 7]
    converted = load_pretrained_quantized(str(out), progress=False)
    assert sum(isinstance(m, QuantLinear) for m in converted.modules()) > 0
    with torch.no_grad():
        assert torch.equal(converted(input_ids=ids, pixel_values=pv.half(), target_sizes=ts).logits, want)
    # a name that is neither: one line, exit 2
    assert main(["convert", "minicpm-int4-tests/not-there", str(tmp_path / "x"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minicpm-int4 convert: MODEL 'minicpm-int4-tests/not-there' is not a local folder, and no "
                          "Hugging Face Hub model of that name could be fetched")


def test_quantize_and_eval_by_hub_id(tmp_path, hub_cache, capsys):
    """`minicpm-int4 quantize owner/model OUT` of a remote-code model (MiniCPM-V 2.x's kind, every
    transformers): the model and its code come from the cache, OUT gets its tokenizer; eval takes both by id
    (the int4 one published in turn)."""
    from helpers import save_word_tokenizer, write_word_prompts
    from test_checkpoint import _remote_code_checkpoint
    from minicpm_int4.cli import main

    fp = _remote_code_checkpoint(tmp_path)
    save_word_tokenizer(fp)
    hub_cache(fp, "minicpm-int4-tests/tiny-fp")
    prompts = tmp_path / "prompts.txt"
    write_word_prompts(prompts)
    out = tmp_path / "int4"
    common = ["--device", "cpu", "--dtype", "fp32", "--trust-remote-code"]
    assert main(["quantize", "minicpm-int4-tests/tiny-fp", str(out), *common, "--group-size", "32"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "quant_config.json", "config.json", "modeling_tinyv.py"} <= set(
        os.listdir(out))
    hub_cache(out, "minicpm-int4-tests/tiny-int4")
    capsys.readouterr()
    assert main(["eval", "minicpm-int4-tests/tiny-fp", "minicpm-int4-tests/tiny-int4", *common,
                 "--prompts", str(prompts), "--json", str(tmp_path / "eval.json")]) == 0
    assert "next-token KL divergence" in capsys.readouterr().out
    res = json.loads((tmp_path / "eval.json").read_text())
    assert (res["model"], res["quantized"]) == ("minicpm-int4-tests/tiny-fp", "minicpm-int4-tests/tiny-int4")
