"""LoRA adapters (PEFT) on QuantLinear layers: peft_integration.py.

CI runs these in a stage of their own with peft installed (.ci/run) and MINICPM_INT4_REQUIRE_PEFT=1, so
that they fail rather than skip there; elsewhere they skip where peft is not installed, naming why."""
import copy
import os

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, dequantize_model, patch_model
from minicpm_int4.tiny import build_native, prompt_with_image

EPS32 = torch.finfo(torch.float32).eps
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft():
    try:
        import peft
    except ImportError:
        if os.environ.get("MINICPM_INT4_REQUIRE_PEFT") == "1":
            pytest.fail("MINICPM_INT4_REQUIRE_PEFT=1 but peft is not installed")
        pytest.skip("peft is not installed (CI installs it in a stage of its own)")
    return peft


def _randomize_adapters(model, seed):
    """LoRA B starts at zero (the adapted model is the base model): give every adapter weight a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _build(kind, dtype=torch.float32):
    """A tiny random model and how to run it: the native MiniCPM-V 4.6 (transformers 5.x) or the remote-code
    MiniCPM-V 2.6 layout (every transformers; its LoRA fine-tuning recipes pin 4.40). The image goes in in the
    dtype of the model's parameters as they are at the call (peft's kbit preparation casts them)."""
    from minicpm_int4.tiny import NativeModelUnavailable, build_remote_layout, remote_inputs

    def like_params(m, t):
        return t.to(next(p for p in m.parameters() if p.is_floating_point()).dtype)

    if kind == "remote":
        model = build_remote_layout("qwen2", dtype=dtype, seed=0)
        ids, pv = remote_inputs(model)
        return model, lambda m: m(ids, like_params(m, pv)).logits
    try:
        model = build_native("4_6", seed=0, dtype=dtype)
    except NativeModelUnavailable as e:
        pytest.skip(str(e))
    ids, pv, ts = prompt_with_image(model)
    return model, lambda m: m(input_ids=ids, pixel_values=like_params(m, pv), target_sizes=ts).logits


def _int4_and_twin(peft, kind, dtype=torch.float32):
    """The same tiny model patched to int4, and its dequantized twin (nn.Linear layers holding the weights
    the int4 layers compute with), each with the same LoRA adapters; and how to run them."""
    from minicpm_int4.peft_integration import lora_config

    model, run = _build(kind, dtype)
    report = patch_model(model, QuantConfig(group_size=32, backend="torch"), progress=False)
    twin = copy.deepcopy(model)
    dequantize_model(twin)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    int4 = peft.get_peft_model(model, lora_config(**kw))
    fp = peft.get_peft_model(twin, peft.LoraConfig(**kw))
    _randomize_adapters(int4, seed=1)
    fp.load_state_dict(int4.state_dict(), strict=False)  # the adapters; the base weights differ in kind
    return int4, fp, report, run


def _bound(report):
    # both compute each layer in fp32 and differ in summation order only: at most K * eps32 relative per
    # quantized layer on the path (forward, and again for the gradients flowing back through it)
    ks = [d.in_features for d in report.quantized]
    return 2 * len(ks) * max(ks) * EPS32


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("kind", ["native", "remote"])
def test_lora_on_int4_layers_computes_and_learns_as_on_their_dequantized_twin(peft, kind):
    from minicpm_int4.peft_integration import lora_layer_class

    int4, fp, report, run = _int4_and_twin(peft, kind)
    adapted = {n: m for n, m in int4.named_modules() if isinstance(m, lora_layer_class())}
    assert adapted and all(isinstance(m.base_layer, QuantLinear) for m in adapted.values())
    assert any(n.endswith("mlp.up_proj") for n in adapted)
    trainable = {n for n, p in int4.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert trainable == {n for n, p in fp.named_parameters() if p.requires_grad}

    y4, yf = run(int4), run(fp)
    with int4.disable_adapter():
        base = run(int4)
    assert _rel(y4, yf) <= _bound(report)
    assert _rel(y4, base) > 100 * _bound(report)  # the adapters change the output
    y4.pow(2).mean().backward()
    yf.pow(2).mean().backward()
    g4 = torch.cat([p.grad.flatten() for n, p in sorted(int4.named_parameters()) if n in trainable])
    gf = torch.cat([p.grad.flatten() for n, p in sorted(fp.named_parameters()) if n in trainable])
    assert g4.abs().sum() > 0 and _rel(g4, gf) <= _bound(report)


@pytest.mark.parametrize("kind", ["native", "remote"])
def test_a_few_steps_train_the_adapters_and_leave_the_int4_weights(peft, kind):
    int4, _, _, run = _int4_and_twin(peft, kind)
    frozen = {n: b.clone() for n, b in int4.named_buffers() if n.endswith(("qweight", "scales", "zeros"))}
    target = None
    opt = torch.optim.AdamW([p for p in int4.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        logits = run(int4)
        if target is None:  # one token everywhere, which the model does not predict yet
            target = torch.full(logits.shape[:-1], int(logits.mean(dim=tuple(range(logits.dim() - 1))).argmin()))
        loss = nn.functional.cross_entropy(logits.flatten(0, -2).float(), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(b, frozen[n]) for n, b in int4.named_buffers() if n in frozen)


def test_triton_backend_forward_and_backward_match_the_reference(peft):
    """The adapted layer on the Triton kernels (the interpreter here) against the torch reference backend:
    the same int4 layer, the same adapter."""
    from minicpm_int4 import ops
    from minicpm_int4.peft_integration import lora_config

    if not ops.triton_interpreter_active():
        pytest.skip("needs the Triton kernels importable on CPU (TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48, dtype=torch.float16))
    outs = {}
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base)
        patch_model(model, QuantConfig(group_size=32, backend=backend, min_out_features=1), progress=False)
        pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=["0"]))
        _randomize_adapters(pm, seed=5)
        x = torch.randn(3, 64, dtype=torch.float16, generator=torch.Generator().manual_seed(6), requires_grad=True)
        y = pm(x)
        y.float().pow(2).sum().backward()
        outs[backend] = (y.detach(), x.grad, pm.base_model.model[0].lora_A["default"].weight.grad)
    for a, b in zip(outs["triton"], outs["torch"]):
        # fp16 outputs of fp32 sums in another order: a few fp16 ulps of the largest value
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=4 * 2**-10 * b.float().abs().max().item())


def test_saved_adapter_loads_onto_a_reloaded_int4_model(peft, tmp_path):
    from minicpm_int4 import save_quantized
    from minicpm_int4.checkpoint import load_pretrained_quantized
    from minicpm_int4.peft_integration import load_adapter

    model, run = _build("native")
    report = patch_model(model, QuantConfig(group_size=32), progress=False)
    save_quantized(model, tmp_path / "int4", report)
    from minicpm_int4.peft_integration import lora_config

    pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_adapters(pm, seed=2)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        want = run(pm)

    # PEFT alone does not know the int4 layers in a saved adapter's config: load_adapter registers them
    with pytest.raises(ValueError, match="not supported"):
        peft.PeftModel.from_pretrained(load_pretrained_quantized(str(tmp_path / "int4")), str(tmp_path / "adapter"))
    again = load_adapter(load_pretrained_quantized(str(tmp_path / "int4")), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(run(again), want)


def test_what_needs_the_fp_weight_is_refused_clearly(peft):
    from minicpm_int4.peft_integration import lora_config

    def adapted(**kw):
        model, _ = _build("remote")
        patch_model(model, QuantConfig(group_size=32), progress=False)
        return peft.get_peft_model(model, lora_config(r=4, target_modules=["up_proj"], **kw))

    with pytest.raises(ValueError, match="use_dora is not supported"):
        adapted(use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' reads the base layer's floating-point weight"):
        adapted(init_lora_weights="pissa")
    pm = adapted()
    with pytest.raises(NotImplementedError, match="would round the adapter's update away"):
        pm.merge_and_unload()
    from minicpm_int4.tiny import remote_inputs

    ids, pv = remote_inputs(pm.base_model.model)
    with pytest.raises(NotImplementedError, match=r"different adapters \(adapter_names=\)"):
        pm.eval()(ids, pv, adapter_names=["default"])  # (PEFT's mixed-adapter batch: inference only)
    from packaging.version import Version

    if Version(peft.__version__) >= Version("0.14"):  # (0.13's unload() copies a `.weight` the int4 layer lacks)
        plain = adapted().unload()  # the adapters taken off: the int4 layers as they were
        assert isinstance(plain.get_submodule("llm.model.layers.0.mlp.up_proj"), QuantLinear)


@pytest.mark.parametrize("kind", ["native", "remote"])
def test_peft_prepare_for_kbit_training_then_autocast(peft, kind):
    """The QLoRA recipe: peft.prepare_model_for_kbit_training casts the model's other parameters to fp32 (the
    int4 layers' biases too); training then runs under torch.autocast in the int4 layers' dtype (Trainer's
    bf16=True), which casts their inputs. Without autocast the int4 layers name the mismatch."""
    from minicpm_int4.peft_integration import lora_config

    model, run = _build(kind, torch.bfloat16)
    patch_model(model, QuantConfig(group_size=32), progress=False)
    with_bias = [m for m in model.modules() if isinstance(m, QuantLinear) and m.bias is not None]
    assert with_bias  # (the vision tower's)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(m.scales.dtype == torch.bfloat16 for m in with_bias)
    pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_adapters(pm, seed=7)
    with pytest.raises(TypeError, match="holds a torch.bfloat16 layer but got torch.float32 input"):
        run(pm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run(pm).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_trainer_accepts_adapters_over_a_model_loaded_by_from_pretrained(peft, tmp_path):
    """A model transformers loaded from an int4 folder carries this package's quantizer: its Trainer checks
    that the quantization method supports training (adapters over the frozen int4 layers) before it trains,
    and still refuses the int4 model without adapters."""
    import transformers
    from transformers import trainer_utils

    from minicpm_int4.hf_integration import register
    from minicpm_int4.peft_integration import lora_config

    if register() is not None or not hasattr(trainer_utils, "validate_quantization_for_training"):
        pytest.skip(f"transformers {transformers.__version__}: no quantizer registry or no separate training check")
    model, _ = _build("native")
    patch_model(model, QuantConfig(group_size=32), progress=False)
    model.save_pretrained(str(tmp_path / "int4"))
    loaded = type(model).from_pretrained(str(tmp_path / "int4"))
    assert loaded.is_quantized and loaded.hf_quantizer.is_trainable
    with pytest.raises(ValueError, match="purely quantized"):
        trainer_utils.validate_quantization_for_training(loaded)
    pm = peft.get_peft_model(loaded, lora_config(r=4, target_modules=TARGETS))
    trainer_utils.validate_quantization_for_training(pm)  # (raised "do not support training" before)


@pytest.mark.parametrize("kind", ["native", "remote"])
def test_merged_model_computes_as_the_adapted_one_and_quantizes_again(peft, kind):
    """merged_model: the adapters merged into fp weights (dequantized W + B A * scaling), the PEFT wrappers
    gone, the unadapted int4 layers kept; patch_model quantizes the merged layers again, within half an int4
    step of the merged weight (round to nearest)."""
    from minicpm_int4.peft_integration import lora_config, lora_layer_class, merged_model

    model, run = _build(kind)
    report = patch_model(model, QuantConfig(group_size=32, backend="torch"), progress=False)
    n_int4 = len(report.quantized)
    pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    _randomize_adapters(pm, seed=8)
    with torch.no_grad():
        want = run(pm)
    adapted = [n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, lora_layer_class())]
    merged = merged_model(pm)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(type(merged.get_submodule(n)) is nn.Linear for n in adapted)
    assert sum(isinstance(m, QuantLinear) for m in merged.modules()) == n_int4 - len(adapted)
    with torch.no_grad():
        got = run(merged)
    assert _rel(got, want) <= _bound(report)  # the same sums, grouped otherwise

    weights = {n: merged.get_submodule(n).weight.detach().clone() for n in adapted}
    patch_model(merged, QuantConfig(group_size=32, method="rtn"), progress=False)
    for n, w in weights.items():
        q = merged.get_submodule(n)
        assert isinstance(q, QuantLinear)
        step = q.scales.float().repeat_interleave(32, dim=1)
        assert ((q.dequantized_weight().float() - w.float()).abs() <= 0.5 * step * (1 + 1e-3) + 1e-7).all(), n


def test_lora_layers_over_fused_projections_share_one_stacked_call(peft):
    """fuse_projections on a model with LoRA adapters: a LoRA layer calls its base QuantLinear with its own
    input, so q / k / v and gate / up still make one stacked call a token (adapted or not), and the adapted
    model's one-token output is the unfused one's within the summation-order bound."""
    from minicpm_int4 import fuse_projections
    from minicpm_int4.peft_integration import lora_config, lora_layer_class

    from minicpm_int4.tiny import NativeModelUnavailable

    try:
        model = build_native("4_6", seed=0)
    except NativeModelUnavailable as e:  # transformers 4.x
        pytest.skip(str(e))
    # (min_out_features=16: the tiny model's 32-row k / v projections are int4 too, as full-size ones are)
    report = patch_model(model, QuantConfig(group_size=32, backend="torch", min_out_features=16), progress=False)
    int4 = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    _randomize_adapters(int4, seed=1)
    ids = torch.randint(0, 200, (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = int4(input_ids=ids).logits
        fused = fuse_projections(int4)
        after = int4(input_ids=ids).logits
    ran = {tuple(g.names) for g in fused.groups if g.calls == 1}
    assert {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")} <= ran, ran
    assert all(g.active for g in fused.groups)
    adapted = [m for m in int4.modules() if isinstance(m, lora_layer_class())]
    assert any(m.base_layer._fusion is not None for m in adapted)
    assert _rel(after, before) <= _bound(report)
