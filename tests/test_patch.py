"""patch_model on tiny random-weight models built from the real transformers classes."""
import copy

import pytest
import torch
from torch import nn

import minicpm_int4
from minicpm_int4 import QuantConfig, QuantLinear, patch_model
from minicpm_int4.models import detect_layout
from minicpm_int4.tiny import build_native, build_remote_layout, prompt_with_image, remote_inputs

EPS32 = torch.finfo(torch.float32).eps
NATIVE = ["4_6", "4_7", "ocr"]


def _dequantized_twin(original, patched):
    """A copy of the original model whose quantized Linears carry the dequantized int4 weights:
    it computes the same math as the patched model with torch's own matmul."""
    twin = copy.deepcopy(original)
    for name, mod in patched.named_modules():
        if isinstance(mod, QuantLinear):
            twin.get_submodule(name).weight.data.copy_(mod.dequantized_weight())
    return twin


def _equivalence_bound(report):
    # both models compute every layer in fp32 and differ only in summation order: per layer at most
    # K * eps32 relative, summed over the quantized layers on the path
    ks = [d.in_features for d in report.quantized]
    return len(ks) * max(ks) * EPS32


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _native_inputs(model, kind):
    if kind == "4_7":  # 4.7's canvas M-RoPE needs tokenizer-resolved marker ids; text only here
        return dict(input_ids=torch.tensor([[7, 8, 9, 10, 11, 12]]))
    ids, pv, ts = prompt_with_image(model)
    return dict(input_ids=ids, pixel_values=pv, target_sizes=ts)


@pytest.mark.parametrize("kind", NATIVE)
def test_native_models(kind):
    model = build_native(kind)
    original = copy.deepcopy(model)
    inputs = _native_inputs(model, kind)
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert report.layout == "minicpmv-native" and detect_layout(original).name == "minicpmv-native"
    by_name = {d.name: d for d in report.decisions}
    # defaults: LLM + vision quantized; lm_head, merger and tiny projections kept, with reasons
    assert by_name["model.language_model.layers.3.mlp.gate_proj"].action == "quantized"
    assert by_name["model.vision_tower.encoder.layers.0.mlp.fc1"].action == "quantized"
    assert by_name["model.vision_tower.encoder.layers.0.mlp.fc1"].part == "vision"
    assert by_name["lm_head"].action == "kept" and "quantize_lm_head=False" in by_name["lm_head"].reason
    assert by_name["model.merger.mlp.0.linear_1"].action == "kept" and by_name["model.merger.mlp.0.linear_1"].part == "merger"
    assert by_name["model.vision_tower.vit_merger.linear_1"].part == "merger"
    assert by_name["model.language_model.layers.0.linear_attn.in_proj_a"].action == "kept"
    assert "too small" in by_name["model.language_model.layers.0.linear_attn.in_proj_b"].reason
    assert by_name["model.language_model.layers.0.linear_attn.in_proj_qkv"].action == "quantized"
    n_linear = sum(isinstance(m, nn.Linear) for m in original.modules())
    assert len(report.decisions) == n_linear
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(report.quantized)
    assert report.bytes_after < report.bytes_before
    text = str(report)
    assert "model.language_model.layers.3.mlp.gate_proj" in text and "quantized" in text and "MiB" in text

    with torch.no_grad():
        y = model(**inputs).logits
        y_twin = _dequantized_twin(original, model)(**inputs).logits
        y_fp = original(**inputs).logits
    assert _rel(y, y_twin) <= _equivalence_bound(report)
    assert _rel(y, y_fp) < 1.0  # int4 noise, not garbage
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_remote_code_layout(llm):
    model = build_remote_layout(llm)
    original = copy.deepcopy(model)
    ids, pv = remote_inputs(model)
    report = patch_model(model, QuantConfig(group_size=32, quantize_resampler=True), progress=False)
    assert report.layout == "minicpmv-remote"
    by_name = {d.name: d for d in report.decisions}
    # nn.MultiheadAttention reads out_proj.weight itself: never replaced, even when its part is quantized
    assert by_name["resampler.attn.out_proj"].action == "kept"
    assert "reads .out_proj.weight directly" in by_name["resampler.attn.out_proj"].reason
    assert isinstance(model.resampler.attn.out_proj, nn.Linear)
    assert by_name["resampler.kv_proj"].action == "quantized" and by_name["resampler.kv_proj"].part == "resampler"
    assert by_name["llm.lm_head"].part == "lm_head" and by_name["llm.lm_head"].action == "kept"
    assert by_name["vpm.encoder.layers.0.mlp.fc1"].part == "vision"
    assert by_name["llm.model.layers.0.mlp.down_proj"].action == "quantized"
    with torch.no_grad():
        y = model(ids, pv).logits
        y_twin = _dequantized_twin(original, model)(ids, pv).logits
    assert _rel(y, y_twin) <= _equivalence_bound(report)
    out = model.generate(ids, pv, max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == 3


def test_resampler_kept_by_default():
    model = build_remote_layout("qwen2")
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    d = {x.name: x for x in report.decisions}["resampler.kv_proj"]
    assert d.action == "kept" and "quantize_resampler=False" in d.reason


def test_static_cache_generation_of_a_patched_llm():
    """A static KV cache gives the same tokens as the dynamic one, except under transformers < 4.42,
    whose static cache takes its dtype from o_proj.weight, which a QuantLinear has not: there it
    fails, loudly (README, Compatibility)."""
    from helpers import static_cache_reads_linear_weights

    model = build_remote_layout("llama")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    ids = torch.tensor([[7, 8, 9, 10]])
    dynamic = model.llm.generate(ids, max_new_tokens=3, do_sample=False)
    model.llm.generation_config.cache_implementation = "static"
    if static_cache_reads_linear_weights():
        with pytest.raises(AttributeError, match="weight"):
            model.llm.generate(ids, max_new_tokens=3, do_sample=False)
    else:
        assert torch.equal(model.llm.generate(ids, max_new_tokens=3, do_sample=False), dynamic)


def test_batched_left_padded_generate_on_the_triton_kernels():
    """The Triton kernels inside a real generate loop: a batch of prompts of different lengths, left
    padded, greedy. Prefill runs the tiled kernel (M = 3 x 7 tokens), each step after it the decode
    kernel at M = 3, and the prompt generated alone the decode kernel (M = 2), then the GEMV (M = 1).
    down_proj's K = 256 is split across programs, finished in the same launch through the layer's
    workspace counters, which each launch must leave at zero for the next. Every step's logits match
    the same model on the torch reference backend, and the prompt alone (no padding) matches its row
    of the batch: all of them differ only in fp32 summation order."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
    on_triton = copy.deepcopy(model)
    report = patch_model(model, QuantConfig(group_size=32, backend="torch", method="rtn"), progress=False)
    patch_model(on_triton, QuantConfig(group_size=32, backend="triton", method="rtn"), progress=False)
    g = torch.Generator().manual_seed(4)
    lens = [7, 2, 5]
    prompts = [torch.randint(10, model.config.vocab_size, (n,), generator=g) for n in lens]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, -len(p):], mask[row, -len(p):] = p, 1
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        out = on_triton.generate(input_ids=ids, attention_mask=mask, **kw)
        alone = on_triton.generate(input_ids=prompts[1][None], attention_mask=torch.ones(1, lens[1], dtype=torch.long), **kw)
    from minicpm_int4.kernels import w4a16

    # the premise: down_proj (N = 64, K = 256) is split across programs by both decode kernels
    assert w4a16._decode_blocks(64, 256, 32, ids.device)[3] > 1 and w4a16._gemv_blocks(64, 256 // 8, ids.device)[3] > 1
    bound = _equivalence_bound(report)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == len(alone.logits) == 3
    for step in range(3):
        assert _rel(out.logits[step], ref.logits[step]) <= bound, f"step {step}"
        assert _rel(alone.logits[step][0], ref.logits[step][1]) <= bound, f"step {step}, the prompt alone"
    assert torch.equal(alone.sequences[0, -3:], ref.sequences[1, -3:])
    workspaces = [m.workspace for m in on_triton.modules() if isinstance(m, QuantLinear) and m.workspace is not None]
    assert workspaces and all(bool((w == 0).all()) for w in workspaces)


def _as_loaded(build, **kwargs):
    """A model as from_pretrained leaves it: built, then weights of other values loaded into it (so the
    hook-based weight norm's `.weight` attribute is stale until its next forward)."""
    model = build(**kwargs)
    model.load_state_dict(build(**kwargs, seed=1).state_dict())
    return model


def test_omni_layout_audio_and_tts_parts():
    model = _as_loaded(build_remote_layout, llm="qwen2", omni=True)
    original = copy.deepcopy(model)
    d = {x.name: x for x in patch_model(model, QuantConfig(group_size=32), progress=False).decisions}
    assert d["apm.layers.0.fc1"].part == "audio" and "quantize_audio=False" in d["apm.layers.0.fc1"].reason
    assert d["audio_projection_layer.linear1"].part == "audio" and d["audio_projection_layer.linear1"].action == "kept"
    for name in ("tts.head_code.0", "tts.head_text", "tts.model.layers.0.mlp.up_proj", "tts.projector.linear1"):
        assert d[name].part == "tts" and "quantize_tts=False" in d[name].reason
    assert d["llm.model.layers.0.mlp.down_proj"].action == "quantized"

    model = copy.deepcopy(original)
    cfg = QuantConfig(group_size=32, quantize_audio=True, quantize_tts=True)
    report = patch_model(model, cfg, progress=False)
    d = {x.name: x for x in report.decisions}
    for name in ("apm.layers.0.fc1", "apm.layers.0.self_attn.q_proj", "audio_projection_layer.linear2",
                 "tts.model.layers.0.mlp.up_proj", "tts.head_code.1", "tts.head_text"):
        assert d[name].action == "quantized", (name, d[name].reason)
    mel = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_twin = model.audio_embed(mel), _dequantized_twin(original, model).audio_embed(mel)
    assert _rel(y, y_twin) <= _equivalence_bound(report)

    # the weight-normed heads are quantized from the weight their forward computes with: computed on
    # access for the parametrized ones; for the hook-based one only its next forward refreshes the
    # attribute, which until then holds the weights the model was built with
    head = original.tts.head_text
    stale = head.weight.detach().clone()
    with torch.no_grad():
        head(torch.zeros(1, head.in_features))
    assert not torch.equal(stale, head.weight)
    for name in ("tts.head_code.0", "tts.head_text"):
        src = original.get_submodule(name)
        plain = nn.Linear(src.in_features, src.out_features, bias=False)
        plain.weight.data.copy_(src.weight)
        want, got = QuantLinear.from_linear(plain, cfg), model.get_submodule(name)
        for buf in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(got, buf), getattr(want, buf)), (name, buf)


def test_linears_with_hooks_are_kept_and_their_hooks_still_run():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Linear(128, 128))
    seen = []

    def record_input(mod, args):
        seen.append(tuple(args[0].shape))

    model[0].register_forward_pre_hook(record_input)
    model[2].register_forward_hook(lambda mod, args, out: out * 2)
    model[3]._hf_hook = object()  # where accelerate's dispatch_model leaves its hook
    report = patch_model(model, QuantConfig(group_size=32, include=("*",)), progress=False)
    reasons = [x.reason for x in report.decisions]
    assert [x.action for x in report.decisions] == ["kept"] * 3
    assert "forward hooks (" in reasons[0] and "record_input)" in reasons[0]
    assert "forward hooks (" in reasons[1] and "<lambda>" in reasons[1]
    assert "accelerate hook (object" in reasons[2]
    model(torch.randn(3, 64))
    assert seen == [(3, 64)]


def test_patching_twice_is_harmless():
    model = build_native("4_6")
    r1 = patch_model(model, QuantConfig(group_size=32), progress=False)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        y1 = model(input_ids=ids).logits
    r2 = patch_model(model, QuantConfig(group_size=32), progress=False)
    with torch.no_grad():
        y2 = model(input_ids=ids).logits
    assert torch.equal(y1, y2)
    assert len(r2.quantized) == len(r1.quantized)
    assert all(d.action == "already quantized" for d in r2.quantized)


class _SharedLinear(nn.Module):
    """One Linear at three places (twice in one parent, once inside a Sequential), and a plain one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(128, 128)
        self.b = self.a
        self.seq = nn.Sequential(self.a)
        self.out = nn.Linear(128, 64)

    def forward(self, x):
        return self.out(self.seq(self.b(self.a(x))))


def test_a_module_at_several_places_is_one_quantlinear(tmp_path):
    """A Linear shared by several places (named_children lists it once per parent, the first time
    only) becomes one QuantLinear at every place, reported once: before, one place stayed fp32 unseen,
    another got a second int4 copy, and the report called the shared weight tied (int4 adding memory)."""
    from minicpm_int4 import calibrate, load_quantized, save_quantized

    torch.manual_seed(11)
    model = _SharedLinear()
    x = torch.randn(5, 128)
    twin_src = copy.deepcopy(model)
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert model.a is model.b is model.seq[0] and isinstance(model.a, QuantLinear)
    assert [d.name for d in report.decisions] == ["a", "out"]
    a = report.decisions[0]
    assert a.action == "quantized" and "one module, also at b, seq.0" in a.reason and "tied" not in a.reason
    assert a.bytes_after < a.bytes_before
    twin = _dequantized_twin(twin_src, model)
    assert twin.a is twin.b is twin.seq[0]
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, twin(x), rtol=1e-4, atol=1e-5)  # fp32: reference GEMM vs torch's matmul
    again = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert [(d.name, d.action) for d in again.decisions] == [("a", "already quantized"), ("out", "already quantized")]
    # a checkpoint round trip keeps it one module, at every place
    save_quantized(model, tmp_path)
    loaded = load_quantized(_SharedLinear(), tmp_path)
    assert loaded.a is loaded.b is loaded.seq[0] and isinstance(loaded.a, QuantLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    # mixed precision puts the original back at every place
    fresh = _SharedLinear()
    calib = calibrate(fresh, [(torch.randn(4, 128),)], progress=False)
    report = patch_model(fresh, QuantConfig(group_size=32, keep_most_sensitive=2), progress=False, calibration=calib)
    assert all(d.action == "kept" for d in report.decisions)
    assert type(fresh.a) is nn.Linear and fresh.a is fresh.b is fresh.seq[0]


def test_a_compiled_model_is_patched_as_the_model_itself(tmp_path):
    """patch_model(torch.compile(model)): the wrapper's names all start with `_orig_mod.`, which no
    layout matches - the merger's Linears were taken for part 'other' and quantized (43 int4 layers
    instead of 35). The model inside is patched, with its own names; the wrapper retraces and runs
    the int4 layers; calibration, comparison and checkpoints use the same names."""
    from minicpm_int4 import calibrate, load_quantized, save_quantized
    from minicpm_int4.evaluate import compare_models

    plain, ids = build_native("4_6"), torch.tensor([[5, 9, 2, 7]])
    compiled = torch.compile(build_native("4_6"), backend="eager")
    with torch.no_grad():
        compiled(input_ids=ids)  # traced once before patching: it must retrace
    cfg = QuantConfig(group_size=32)
    calib = calibrate(compiled, [ids], progress=False)
    assert calib.stats and not any(n.startswith("_orig_mod") for n in calib.stats)
    expected = patch_model(plain, cfg, progress=False, calibration=calibrate(plain, [ids], progress=False))
    report = patch_model(compiled, cfg, progress=False, calibration=calib)
    assert [(d.name, d.part, d.action) for d in report.decisions] == [(d.name, d.part, d.action) for d in expected.decisions]
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, plain(input_ids=ids).logits)
    result = compare_models(torch.compile(build_native("4_6"), backend="eager"), compiled, [ids])  # fp vs int4
    ran = {r["name"] for r in result["layers"]}  # text only: the LLM's int4 layers, by their own names
    assert ran == {d.name for d in expected.quantized if d.part == "llm"}
    assert all(r["rel_output_error"] > 0 for r in result["layers"])
    save_quantized(compiled, tmp_path)
    reloaded = load_quantized(build_native("4_6"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits)
    again = torch.compile(build_native("4_6"), backend="eager")
    assert load_quantized(again, tmp_path) is again
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_model_inside_a_wrapper_keeps_its_layout():
    """A MiniCPM-V model held by a user's module (a pipeline with a head of its own): its layout is
    found where it is, so the merger / resampler / lm_head stay in high precision as they do for the
    model alone - before, every Linear was part 'other' of a generic layout and was quantized."""
    from minicpm_int4.models import detect_layout, text_module

    class Pipeline(nn.Module):
        def __init__(self, vlm):
            super().__init__()
            self.vlm = vlm
            self.head = nn.Linear(vlm.config.text_config.vocab_size, 64)

    expected = patch_model(build_native("4_6"), QuantConfig(group_size=32), progress=False)
    wrapped = Pipeline(build_native("4_6"))
    report = patch_model(wrapped, QuantConfig(group_size=32), progress=False)
    assert report.layout == "minicpmv-native" and "found at submodule 'vlm'" in report.notes[0]
    got = {d.name: (d.part, d.action) for d in report.decisions}
    assert got.pop("head") == ("other", "quantized")
    assert got == {f"vlm.{d.name}": (d.part, d.action) for d in expected.decisions}
    assert {d.part for d in expected.decisions if d.action == "kept"} >= {"merger", "lm_head"}
    remote = Pipeline.__new__(Pipeline)
    nn.Module.__init__(remote)
    remote.inner = nn.ModuleDict({"mllm": build_remote_layout("qwen2")})
    layout = detect_layout(remote)
    assert layout.name == "minicpmv-remote" and layout.root == "inner.mllm"
    assert layout.part_of("inner.mllm.resampler.kv_proj") == "resampler" and layout.part_of("llm.x") == "other"
    assert text_module(remote) is remote.inner["mllm"].llm


def test_include_exclude_and_per_part_act():
    model = build_native("4_6")
    cfg = QuantConfig(group_size=32, exclude=("*.mlp.down_proj",), include=("lm_head",), act={"vision": "int8"})
    report = patch_model(model, cfg, progress=False)
    d = {x.name: x for x in report.decisions}
    assert d["model.language_model.layers.0.mlp.down_proj"].action == "kept"
    assert "excluded by pattern" in d["model.language_model.layers.0.mlp.down_proj"].reason
    assert d["lm_head"].action == "quantized" and "included by pattern" in d["lm_head"].reason
    assert d["model.vision_tower.encoder.layers.0.mlp.fc1"].path.startswith("w4a8")
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.act == "int8"
    assert d["model.language_model.layers.0.mlp.gate_proj"].path == "w4a16"
    assert not report.notes  # every pattern matched something


def test_a_pattern_that_matches_nothing_is_said():
    """exclude=("*.q_prj",) (a typo) used to exclude nothing without a word: the whole model was
    quantized. Such patterns are now warned about and noted in the report."""
    model = build_native("4_6")
    cfg = QuantConfig(group_size=32, exclude=("*.q_prj", "*.k_proj"), include=("lm_head.weight",))
    with pytest.warns(UserWarning) as caught:
        report = patch_model(model, cfg, progress=False)
    said = [str(w.message) for w in caught if "matches no Linear" in str(w.message)]
    assert len(said) == 2 and len(report.notes) == 2
    assert "QuantConfig.include pattern 'lm_head.weight' matches no Linear of this model" in said[0]
    assert "exclude pattern '*.q_prj'" in said[1] and "such as 'model." in said[1]
    assert any("excluded by pattern '*.k_proj'" in d.reason for d in report.decisions)


def test_unquantizable_shape_is_kept_with_reason():
    model = nn.Sequential(nn.Linear(100, 128), nn.ReLU(), nn.Linear(128, 128))
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert report.layout == "generic"
    assert report.decisions[0].action == "kept" and "not divisible by group_size=32" in report.decisions[0].reason
    assert report.decisions[1].action == "quantized"


def test_report_serialises():
    model = build_native("4_6")
    report = patch_model(model, QuantConfig(group_size=64), progress=False)
    d = report.to_dict()
    assert d["layout"] == "minicpmv-native" and d["config"]["group_size"] == 64
    assert len(d["decisions"]) == len(report.decisions)
    assert "Linear layers int4" in report.summary()


@pytest.mark.parametrize("which", ["4_6", "llama"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_patched_llm_compiles_fullgraph(which, grad):
    """torch.compile(fullgraph=True) traces a patched model's language model without graph breaks
    (aot_eager on CPU: the same graph capture and autograd tracing as inductor, without codegen).
    Where it fails, the same model unpatched is compiled too: if that fails as well, this torch cannot
    trace this transformers' model at all (torch 2.4's dynamo and transformers 4.55's mask code), which
    is not the int4 layers' doing - a skip that names it."""
    def llm(model):
        if which == "llama":
            return lambda ids: model.llm(input_ids=ids, use_cache=False).logits
        return lambda ids: model.model.language_model(input_ids=ids, use_cache=False).last_hidden_state

    def build():
        return build_remote_layout("llama") if which == "llama" else build_native("4_6")

    import torch._dynamo

    model = build()
    fn = llm(model)
    patch_model(model, QuantConfig(group_size=32), progress=False)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.set_grad_enabled(grad):
        eager = fn(ids)
        try:
            out = torch.compile(fn, fullgraph=True, backend="aot_eager")(ids)
        except torch._dynamo.exc.Unsupported as e:
            torch._dynamo.reset()
            try:
                torch.compile(llm(build()), fullgraph=True, backend="aot_eager")(ids)
            except torch._dynamo.exc.Unsupported as unpatched:
                import transformers

                pytest.skip(f"torch {torch.__version__} cannot compile transformers {transformers.__version__}'s "
                            f"{which} LLM fullgraph even unpatched: {str(unpatched).splitlines()[0][:200]}")
            raise e
    # torch's default fp32 tolerance, not bit equality: under dynamo transformers may take another,
    # equivalent code path (with torch 2.11 the *unpatched* 4.6 LLM differs from eager by 3.6e-7,
    # patched by 4.8e-7; with 2.13 both are bit-equal), so exact bits are not this package's to promise
    torch.testing.assert_close(out, eager)


def test_a_tied_lm_head_quantized_is_reported_as_adding_memory():
    """The OCR model ties lm_head to the embeddings: quantizing lm_head (quantize_lm_head=True, for
    decode speed) frees nothing, since the embeddings keep the weight, so the report counts the int4
    copy on top and says why; the untied 4.6 lm_head saves its bytes as usual."""
    from minicpm_int4.packing import packed_bytes

    tied = build_native("ocr")
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    d = next(d for d in patch_model(tied, QuantConfig(group_size=32, quantize_lm_head=True), progress=False).decisions
             if d.part == "lm_head")
    packed = packed_bytes(d.out_features, d.in_features, 32, torch.float32)
    assert d.action == "quantized" and d.bytes_after == d.bytes_before + packed
    assert "weight tied to model.language_model.embed_tokens.weight" in d.reason and "adds memory" in d.reason
    untied = build_native("4_6")
    d = next(d for d in patch_model(untied, QuantConfig(group_size=32, quantize_lm_head=True), progress=False).decisions
             if d.part == "lm_head")
    assert d.bytes_after == packed_bytes(d.out_features, d.in_features, 32, torch.float32) and "tied" not in d.reason


def test_originals_are_freed_as_layers_are_swapped(monkeypatch):
    """Peak memory while patching is the model plus one layer, not the fp16 model plus every int4
    layer: once a Linear is swapped nothing holds it (unless mixed precision may put it back)."""
    import gc
    import weakref

    model = build_native("4_6")
    refs = [weakref.ref(m) for m in model.modules() if type(m) is nn.Linear]
    alive, from_linear = [], QuantLinear.from_linear.__func__

    def spy(cls, lin, *args, **kwargs):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        return from_linear(cls, lin, *args, **kwargs)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(spy))
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    assert len(alive) == len(report.quantized) > 10
    assert alive == list(range(len(refs), len(refs) - len(alive), -1))  # one fewer alive at every call


def test_patch_model_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="a lone nn.Linear cannot replace itself: use QuantLinear.from_linear"):
        patch_model(nn.Linear(64, 64), progress=False)
    with pytest.raises(TypeError, match=r"config must be a QuantConfig, got dict \(QuantConfig\(\*\*d\)"):
        patch_model(nn.Sequential(nn.Linear(64, 64)), {"group_size": 32}, progress=False)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        patch_model("openbmb/MiniCPM-V-4_6", progress=False)
    with pytest.warns(UserWarning, match="Sequential has no nn.Linear layers"):
        report = patch_model(nn.Sequential(nn.ReLU()), progress=False)
    assert report.summary() == "layout generic: no nn.Linear layers found; nothing was quantized"


def test_linear_subclasses_with_their_own_forward_are_kept():
    """A subclass of nn.Linear that computes something else (an adapter, a scaled or clipped output)
    would silently lose that computation in a QuantLinear: kept, whatever `include` says; subclasses
    that keep Linear's forward (parametrized ones, NonDynamicallyQuantizableLinear) are quantized."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Renamed(nn.Linear):
        pass

    model = nn.Sequential(ScaledLinear(64, 64), Renamed(64, 64), nn.Linear(64, 64))
    report = patch_model(model, QuantConfig(group_size=32, include=("*",)), progress=False)
    assert [d.action for d in report.decisions] == ["kept", "quantized", "quantized"]
    assert "ScaledLinear subclasses nn.Linear with a forward of its own" in report.decisions[0].reason
    assert type(model[0]) is ScaledLinear and isinstance(model[1], QuantLinear)


def _ct_scheme(num_bits=4, strategy="group", group_size=32, symmetric=False, actorder=None, input_activations=None):
    """compressed-tensors' QuantizationScheme of a layer, as far as patch_model reads it."""
    import types
    weights = types.SimpleNamespace(num_bits=num_bits, type="int", strategy=strategy, symmetric=symmetric,
                                    group_size=None if strategy == "channel" else group_size, actorder=actorder)
    return types.SimpleNamespace(weights=weights, input_activations=input_activations, output_activations=None)


def _foreign_classes():
    """Stand-ins with the structure of other packages' quantized layers (none of them installs here)."""

    class WQLinear_GEMM(nn.Module):  # AutoAWQ: no nn.Linear; packed buffers (its GEMM layout)
        def __init__(self, k, n, g=32, bias=False):
            super().__init__()
            self.in_features, self.out_features, self.w_bit, self.group_size = k, n, 4, g
            self.register_buffer("qweight", torch.randint(0, 2**31 - 1, (k, n // 8), dtype=torch.int32))
            self.register_buffer("qzeros", torch.zeros(k // g, n // 8, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(k // g, n, dtype=torch.float16))
            self.register_buffer("bias", torch.randn(n).half() if bias else None)

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out_features)

    class GPTQLinear(WQLinear_GEMM):  # AutoGPTQ's QuantLinear: infeatures / outfeatures, g_idx
        def __init__(self, k, n):
            super().__init__(k, n)
            self.infeatures, self.outfeatures = self.__dict__.pop("in_features"), self.__dict__.pop("out_features")
            self.out_features = self.outfeatures
            self.register_buffer("g_idx", torch.arange(k, dtype=torch.int32) // 32)

    class CompressedLinear(nn.Linear):  # compressed-tensors: an nn.Linear whose weight was replaced (here by
        def __init__(self, k, n):        # a scheme patch_model does not convert: 8-bit weights)
            super().__init__(k, n, bias=False)
            del self.weight
            self.weight_packed = nn.Parameter(torch.zeros(n, k // 4, dtype=torch.int32), requires_grad=False)
            self.weight_scale = nn.Parameter(torch.ones(n, k // 32), requires_grad=False)
            self.quantization_scheme = _ct_scheme(num_bits=8)

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out_features)

    class Params4bit(nn.Parameter):
        pass

    class Linear4bit(nn.Linear):  # bitsandbytes: an nn.Linear whose weight is a Params4bit (uint8 on a GPU)
        def __init__(self, k, n):
            super().__init__(k, n)
            self.weight = Params4bit(torch.zeros(k * n // 2, 1, dtype=torch.uint8), requires_grad=False)

        def forward(self, x):
            return x.new_zeros(*x.shape[:-1], self.out_features)

    WQLinear_GEMM.__module__ = "awq.modules.linear.gemm"
    GPTQLinear.__module__ = "auto_gptq.nn_modules.qlinear.qlinear_cuda_old"
    CompressedLinear.__module__ = "compressed_tensors.linear.compressed_linear"
    Linear4bit.__module__ = Params4bit.__module__ = "bitsandbytes.nn.modules"
    return WQLinear_GEMM, GPTQLinear, CompressedLinear, Linear4bit


def test_layers_another_package_quantized_are_listed_kept_and_said():
    """Layers AutoGPTQ / GPTQModel, compressed-tensors or bitsandbytes quantized (found by structure:
    packed int4 tensors, or a Params4bit weight; whether or not they subclass nn.Linear), and an AutoAWQ
    layer a pattern excludes, are listed in the report as kept, untouched, with what to do instead in a
    note and a warning - load the checkpoint with load_pretrained_quantized, or patch the fp16 model -
    never quantized a second time nor crashed on (CompressedLinear has no `weight`); the plain Linears
    beside them are quantized."""
    import json

    from minicpm_int4.patch import foreign_quantization

    awq, gptq_cls, compressed, bnb = _foreign_classes()
    model = nn.ModuleDict({"awq": awq(64, 64), "gptq": gptq_cls(64, 64), "ct": compressed(64, 64),
                           "bnb": bnb(64, 64), "plain": nn.Linear(64, 64), "inner": nn.Sequential(nn.Linear(64, 64))})
    assert foreign_quantization(model["awq"]) == ("awq WQLinear_GEMM", "int4")
    assert foreign_quantization(model["bnb"]) == ("bitsandbytes Linear4bit", "bitsandbytes")
    assert foreign_quantization(model["plain"]) is None and foreign_quantization(QuantLinear(64, 64, group_size=32)) is None
    before = {name: (type(m), {k: v.clone() for k, v in m.state_dict().items()}) for name, m in model.items()}
    with pytest.warns(UserWarning, match=r"4 layer\(s\) already quantized by another package") as caught:
        report = patch_model(model, QuantConfig(group_size=32, include=("*",), exclude=("awq",)), progress=False)
    msg = str(caught[0].message)
    assert "load_pretrained_quantized" in msg and "patch the fp16 model" in msg and msg.endswith(report.notes[-1])
    by = {d.name: d for d in report.decisions}
    assert sorted(by) == ["awq", "bnb", "ct", "gptq", "inner.0", "plain"]
    assert [by[n].action for n in ("plain", "inner.0")] == ["quantized", "quantized"]
    for name, what in (("awq", "awq WQLinear_GEMM"), ("gptq", "auto_gptq GPTQLinear"),
                       ("ct", "compressed_tensors CompressedLinear"), ("bnb", "bitsandbytes Linear4bit")):
        d = by[name]
        assert (d.action, d.path, d.out_features, d.in_features) == ("kept", "other", 64, 64)
        assert f"already quantized by another package ({what})" in d.reason
        own = [t for n, t in list(model[name].named_parameters(recurse=False))
               + list(model[name].named_buffers(recurse=False)) if n != "bias"]  # the weight's bytes
        assert d.bytes_before == d.bytes_after == sum(t.numel() * t.element_size() for t in own)
        cls, state = before[name]
        assert type(model[name]) is cls and all(torch.equal(v, model[name].state_dict()[k]) for k, v in state.items())
    assert by["awq"].reason.endswith("excluded by pattern 'awq'")
    assert isinstance(model["plain"], QuantLinear) and isinstance(model["inner"][0], QuantLinear)
    json.dumps(report.to_dict())
    print(report)  # the table prints with them


def test_autoawq_fused_mlp_is_listed_kept_and_its_down_proj_converted():
    """AutoAWQ's fused MLP (from_quantized(fuse_layers=True), transformers' do_fuse) holds its gate and up
    projections' packed tensors itself (gate_proj_qweight, ...) and runs them with its own kernels: it is
    listed as kept, with the note and warning, not passed over in silence; its down_proj, a WQLinear_GEMM
    it calls as a module, is converted."""
    from minicpm_int4.patch import foreign_quantization

    awq_cls = _foreign_classes()[0]

    class QuantFusedMLP(nn.Module):
        def __init__(self, gate, down, up):
            super().__init__()
            for name, lin in (("gate_proj", gate), ("up_proj", up)):
                for t in ("qweight", "scales", "qzeros"):
                    self.register_buffer(f"{name}_{t}", getattr(lin, t))
            self.in_features, self.out_features, self.down_proj = gate.in_features, down.out_features, down

    QuantFusedMLP.__module__ = "awq.modules.fused.mlp"
    fused = QuantFusedMLP(awq_cls(64, 128), awq_cls(128, 64), awq_cls(64, 128))
    assert foreign_quantization(fused) == ("awq QuantFusedMLP", "int4")
    model = nn.ModuleDict({"mlp": fused})
    with pytest.warns(UserWarning, match=r"1 layer\(s\) already quantized by another package \(awq QuantFusedMLP\)"):
        report = patch_model(model, QuantConfig(), progress=False)
    by = {d.name: d for d in report.decisions}
    assert (by["mlp"].action, by["mlp"].path) == ("kept", "other") and by["mlp.down_proj"].action == "converted"
    assert isinstance(model["mlp"].down_proj, QuantLinear) and type(model["mlp"]) is QuantFusedMLP


@pytest.mark.parametrize("n, k, group_size", [(40, 256, 64), (24, 136, 136)], ids=["G64", "per-channel"])
def test_autoawq_gemm_layers_are_converted_exactly(n, k, group_size):
    """A model transformers loaded from an AWQ checkpoint holds AutoAWQ's WQLinear_GEMM layers (buffers in
    the GEMM layout, packed as AutoAWQ packs them: test_foreign.awq_pack). patch_model makes each a
    QuantLinear holding exactly the same q, zero points, scales and bias - one QuantLinear where one layer
    sits at two places - in the layers' fp16, with no warning; the result is the layer's own weight."""
    import warnings

    from minicpm_int4.packing import pack_int4
    from minicpm_int4.reference import w4a16_gemm_ref

    from helpers import assert_gemm_close, dequant
    from test_foreign import _random_layer, awq_pack

    awq_cls = _foreign_classes()[0]
    q, z, s = _random_layer(n, k, -1 if group_size == k else group_size, seed=n + k)
    layer = awq_cls(k, n, g=group_size, bias=True)
    for name, t in awq_pack(q, z, s).items():
        getattr(layer, name).copy_(t)
    bias = layer.bias.clone()
    model = nn.ModuleDict({"a": layer, "b": nn.Sequential(layer), "plain": nn.Linear(k, n)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted: no warning
        report = patch_model(model, QuantConfig(group_size=-1, include=("plain",)), progress=False)
    ql = model["a"]
    assert isinstance(ql, QuantLinear) and model["b"][0] is ql and isinstance(model["plain"], QuantLinear)
    d = {d.name: d for d in report.decisions}["a"]
    assert (d.action, d.path, d.dtype, d.out_features, d.in_features) == ("converted", "w4a16", "float16", n, k)
    assert "read exactly from awq WQLinear_GEMM" in d.reason and d.bytes_after == ql.weight_bytes
    assert "1 AutoAWQ WQLinear_GEMM layer(s) converted exactly" in report.notes[-1]
    assert ql.group_size == (-1 if group_size == k else group_size) and ql.scales.dtype == torch.float16
    assert torch.equal(ql.qweight, pack_int4(q)) and torch.equal(ql.scales, s)
    assert torch.equal(ql.zeros, z.to(torch.float16)) and torch.equal(ql.bias, bias)
    # a group size the kernels lack (AWQ allows any): left as it is, and said
    odd = awq_cls(k, n, g=8)
    odd.group_size = 8
    with pytest.warns(UserWarning, match="odd: already quantized by another package, not converted: odd: group_size=8"):
        r = patch_model(nn.ModuleDict({"odd": odd}), QuantConfig(), progress=False)
    assert [(d.action, d.path) for d in r.decisions] == [("kept", "other")] and r.decisions[0].bytes_after > 0
    x = torch.randn(3, k).half()
    w = dequant(ql.qweight, ql.scales, ql.zeros, ql.group_size if ql.group_size != -1 else k, torch.float16)
    assert_gemm_close(ql(x), w4a16_gemm_ref(x, ql.qweight, ql.scales, ql.zeros, bias, k if group_size == k else group_size),
                      x, w)


def _ct_linear(q, z, s, scheme, g_idx=None, bias=None):
    """A Linear as transformers 5.x holds one of a compressed-tensors checkpoint: an nn.Linear without its
    weight, holding the checkpoint's packed tensors (test_foreign.ct_pack: pack_to_int32's words, which
    tests/test_compressed_tensors_real.py checks against compressed-tensors itself) and its scheme."""
    from test_foreign import ct_pack

    n, k = q.shape
    lin = nn.Linear(k, n, bias=bias is not None).to(s.dtype)
    del lin.weight
    for name, t in ct_pack(q, z, s, symmetric=scheme.weights.symmetric).items():
        lin.register_parameter(name, nn.Parameter(t, requires_grad=False))
    if g_idx is not None:
        lin.register_parameter("weight_g_idx", nn.Parameter(g_idx, requires_grad=False))
    if bias is not None:
        lin.bias.data.copy_(bias)
    lin.quantization_scheme = scheme
    return lin


@pytest.mark.parametrize("case", ["G32-asym", "per-channel-sym", "G64-act-order"])
def test_compressed_tensors_layers_are_converted_exactly(case):
    """transformers 5.x loads an llm-compressor (compressed-tensors pack-quantized) checkpoint into plain
    nn.Linears holding its packed tensors. patch_model makes each a QuantLinear holding exactly the
    checkpoint's int4 numbers (act-order: its channels sorted by group, read through input_perm) and the
    layer's bias, with no warning; the layer computes with the weight compressed-tensors' decompression
    gives, (q - z) * s per channel's group."""
    import warnings

    from minicpm_int4.reference import dequantize_ref

    from helpers import assert_gemm_close
    from test_foreign import _random_layer

    n, k = 40, 256
    group_size, symmetric, actorder = {"G32-asym": (32, False, None), "per-channel-sym": (-1, True, None),
                                       "G64-act-order": (64, False, "group")}[case]
    q, z, s = _random_layer(n, k, group_size, seed=7, zmin=8 if symmetric else 0, zmax=8 if symmetric else 15)
    g = k if group_size == -1 else group_size
    g_idx = None
    if actorder:  # each group's G channels scattered over K
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(3))] = (torch.arange(k) // g).to(torch.int32)
    scheme = _ct_scheme(strategy="channel" if group_size == -1 else "group", group_size=group_size,
                        symmetric=symmetric, actorder=actorder)
    bias = torch.randn(n).half()
    layer = _ct_linear(q, z, s, scheme, g_idx, bias)
    if symmetric:  # the zero points compressed-tensors may hold for a symmetric scheme: all 0, as if absent
        layer.register_parameter("weight_zero_point", nn.Parameter(torch.zeros(n, 1, dtype=torch.int8), requires_grad=False))
    model = nn.ModuleDict({"a": layer, "plain": nn.Linear(k, n)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted: no warning
        report = patch_model(model, QuantConfig(include=("plain",)), progress=False)
    ql = model["a"]
    assert isinstance(ql, QuantLinear) and isinstance(model["plain"], QuantLinear)
    d = {d.name: d for d in report.decisions}["a"]
    assert (d.action, d.path, d.dtype, d.out_features, d.in_features) == ("converted", "w4a16", "float16", n, k)
    assert "read exactly from compressed-tensors (its int4 numbers" in d.reason and d.bytes_after == ql.weight_bytes
    assert d.bytes_before == sum(t.numel() * t.element_size() for name, t in layer.named_parameters() if name != "bias")
    assert "1 compressed-tensors pack-quantized layer(s) converted exactly" in report.notes[-1]
    # the weight compressed-tensors decompresses: column c of group g_idx[c] (in order without act-order)
    groups = (torch.arange(k) // g) if g_idx is None else g_idx.long()
    w = ((q - z[:, groups]).float() * s.float()[:, groups]).half()
    assert torch.equal(ql.dequantized_weight(), w) and torch.equal(ql.bias, bias)
    assert (ql.input_perm is not None) == bool(actorder)
    x = torch.randn(3, k).half()
    assert_gemm_close(ql(x), (x.float() @ w.float().t() + bias.float()).half(), x, w)
    assert torch.equal(dequantize_ref(ql.qweight, ql.scales, ql.zeros, g).index_select(
        1, torch.argsort(ql.input_perm)) if actorder else dequantize_ref(ql.qweight, ql.scales, ql.zeros, g), w)


def test_compressed_tensors_layers_it_cannot_convert_are_kept_and_said():
    """What patch_model cannot convert exactly stays as it is, listed with the reason: an act-order scheme
    whose weight_g_idx is missing (the checkpoint's channel order was not loaded: converting in column order
    would compute other weights), a layer whose tensors are on the meta device (offloaded: a QuantLinear of
    meta tensors would fail only at its first forward), and another scheme (8-bit weights, int8 activations)."""
    from test_foreign import _random_layer

    q, z, s = _random_layer(16, 128, 64, seed=2)
    lost = _ct_linear(q, z, s, _ct_scheme(group_size=64, actorder="group"))
    unset = _ct_linear(q, z, s, _ct_scheme(group_size=64, actorder="group"), g_idx=torch.full((128,), -1, dtype=torch.int32))
    half_set = torch.arange(128, dtype=torch.int32) // 64
    half_set[::2] = -1  # part of the order unset is no order: not read as the columns in order
    partly = _ct_linear(q, z, s, _ct_scheme(group_size=64, actorder="group"), g_idx=half_set)
    w4a8 = _ct_linear(q, z, s, _ct_scheme(group_size=64, input_activations=object()))
    q8, z8, s8 = _random_layer(16, 128, 64, seed=3, zmin=8, zmax=8)
    sym = _ct_linear(q8, z8, s8, _ct_scheme(group_size=64, symmetric=True))
    sym.register_parameter("weight_zero_point", nn.Parameter(torch.ones(16, 2, dtype=torch.int8), requires_grad=False))
    offloaded = _ct_linear(q, z, s, _ct_scheme(group_size=64)).to("meta")  # (accelerate / compressed-tensors offload)
    model = nn.ModuleDict({"lost": lost, "unset": unset, "partly": partly, "sym": sym, "w4a8": w4a8, "offloaded": offloaded})
    with pytest.warns(UserWarning) as caught:
        report = patch_model(model, QuantConfig(), progress=False)
    by = {d.name: d for d in report.decisions}
    for name in ("lost", "unset"):
        assert (by[name].action, by[name].path) == ("kept", "other") and type(model[name]) is nn.Linear
        assert (f"not converted: {name}: an act-order (actorder='group') compressed-tensors layer without its "
                "weight_g_idx") in by[name].reason
    assert (by["partly"].action, type(model["partly"])) == ("kept", nn.Linear)
    assert ("not converted: partly.weight_g_idx: group numbers -1..1, expected 2 groups of 64 numbered 0..1 (64 of "
            "the 128 channels negative: not set)") in by["partly"].reason
    assert (by["sym"].action, type(model["sym"])) == ("kept", nn.Linear)
    assert "not converted: sym.weight_zero_point: nonzero zero points in a symmetric scheme" in by["sym"].reason
    assert (by["offloaded"].action, type(model["offloaded"])) == ("kept", nn.Linear)
    assert "not converted: offloaded: its tensors are on the meta device" in by["offloaded"].reason
    assert (by["w4a8"].action, type(model["w4a8"])) == ("kept", nn.Linear)
    assert "already quantized by another package (compressed-tensors)" in by["w4a8"].reason
    assert any("load_pretrained_quantized" in str(w.message) for w in caught)


def test_layers_compressed_tensors_decompressed_are_quantized_again_and_said():
    """compressed-tensors decompresses a model it holds compressed on its first forward (a hook): a Linear
    then holds the fp weight of its int4 numbers and its scheme, status "decompressed". patch_model quantizes
    it like any Linear - from those weights, a second rounding - and says so, with how to keep the
    checkpoint's numbers (patch before the first forward, or load the folder with load_pretrained_quantized)."""
    import types

    model = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64), "plain": nn.Linear(64, 64)})
    for name in ("a", "b"):
        model[name].quantization_scheme = _ct_scheme()
        model[name].quantization_status = types.SimpleNamespace(value="decompressed")  # its enum's value
    model["b"].quantization_status = "frozen"  # llm-compressor's calibration state: its own fp weight, not said
    with pytest.warns(UserWarning, match=r"1 layer\(s\) compressed-tensors had quantized to int4 hold its "
                                         r"decompressed weights \(a forward ran before patch_model: a, \.\.\.\)") as caught:
        report = patch_model(model, QuantConfig(group_size=32, include=("*",)), progress=False)
    assert [d.action for d in report.decisions] == ["quantized"] * 3
    assert "load_pretrained_quantized" in report.notes[-1] and str(caught[0].message).endswith(report.notes[-1])
