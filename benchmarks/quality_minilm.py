"""Quantization quality on real trained weights (all-MiniLM-L6-v2): rtn vs search vs
activation-aware search vs gptq at group sizes 32/64/128, and how much calibration each needs (a
sweep over the number of calibration sentences at group size 128), gptq's dampening at each
group size, mixed precision's layer ranking (QuantConfig.sensitivity), and per-layer input scales
(QuantConfig.input_scales) with W4A16 and W4A8 activations. Writes JSON + Markdown (~25 min on 2
CPU cores).

    python benchmarks/quality_minilm.py [OUT_DIR]      (default benchmarks/results/cpu)
"""
import json
import os
import sys

from minicpm_int4.bench.env import env_info
from minicpm_int4.bench.quality import (INPUT_SCALES_GROUP_SIZES, damp_table, input_scales_table, mixed_precision_table,
                                        run_calibration_sweep, run_damp_sweep, run_input_scales, run_minilm_quality,
                                        run_mixed_precision, summary_table, sweep_table)

import torch


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    result = run_minilm_quality()
    result["env"] = env_info(torch.device("cpu"))
    with open(os.path.join(out_dir, "minilm_quality.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = ["## Quantization quality on all-MiniLM-L6-v2 (real trained weights)", "",
          f"- {result['layers']} Linear layers; calibration on {result['calibration_sentences']} sentences, "
          f"errors and embedding cosine on {result['eval_sentences']} held-out sentences",
          f"- recon err = ||W - Wq|| / ||W||; output err = ||X (W - Wq)^T|| / ||X W^T|| on held-out activations X",
          "- rtn: round to nearest, min/max range; search: clipping-range search; act-search: the search with each "
          "input channel's error weighted by its mean squared activation on the calibration sentences "
          "(BERT is post-norm, so no AWQ scale can be folded exactly: models.SCALE_FOLDS has no pattern for it); "
          "gptq: `patch_model(QuantConfig(method=\"gptq\"), calibration=...)`, error feedback along each layer's "
          "input Hessian from the calibration sentences (its per-group ranges searched as act-search's)",
          f"- torch {result['env']['torch']}, commit `{result['env']['commit']}`, {result['env']['timestamp_utc']}", "",
          summary_table(result), ""]
    sweep = run_calibration_sweep()
    sweep["env"] = result["env"]
    with open(os.path.join(out_dir, "minilm_calibration_sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    md += [f"## How much calibration: group size {sweep['group_size']}, each method calibrated on the first n "
           "sentences", "",
           "- held-out output error as above, averaged over the layers of each width: in_features 384 (attention "
           "q/k/v/o, FFN up) and 1536 (FFN down); GPTQ's Hessian has rank <= tokens, and patch_model warns below "
           "in_features tokens",
           f"- search does not use the calibration (its rows repeat); same {sweep['eval_sentences']} held-out "
           "sentences", "", sweep_table(sweep), ""]
    damps = run_damp_sweep()
    damps["env"] = result["env"]
    with open(os.path.join(out_dir, "minilm_gptq_damp.json"), "w") as f:
        json.dump(damps, f, indent=1)
    md += ["## GPTQ's dampening (QuantConfig.gptq_damp: H + d * mean(diag H) * I)", "",
           f"- calibrated on all {damps['calibration_sentences']} sentences, errors and cosine on the "
           f"{damps['eval_sentences']} held-out ones, as above; the default is 0.1 (the paper's 0.01 before)", "",
           damp_table(damps), ""]
    mixed = {method: run_mixed_precision(method=method) for method in ("search", "gptq")}
    mixed["env"] = result["env"]
    with open(os.path.join(out_dir, "minilm_mixed_precision.json"), "w") as f:
        json.dump(mixed, f, indent=1)
    first = mixed["search"]
    md += [f"## Mixed precision: which layers stay in high precision (QuantConfig.sensitivity), group size "
           f"{first['group_size']}", "",
           f"- `patch_model(QuantConfig(method=m, keep_most_sensitive=k or weight_budget_bytes=B, sensitivity=s), "
           f"calibration)` on all {first['calibration_sentences']} sentences, embedding error on the "
           f"{first['eval_sentences']} held-out ones; budgets are the all-int4 Linear bytes plus the given fp32 bytes",
           f"- model: each layer ranked by how much of the int4 model's output error on {first['sensitivity_batches']} "
           "calibration sentences (evenly spaced) goes away with it alone back in high precision (a budget is "
           "filled per byte kept); layer: by its own relative output error on its calibration inputs; random: k "
           "layers drawn at random (mean over draws)", ""]
    for method in ("search", "gptq"):
        md += [f"### method {method}", "", mixed_precision_table(mixed[method]), ""]
    scales = run_input_scales(group_sizes=INPUT_SCALES_GROUP_SIZES)
    scales["env"] = result["env"]
    with open(os.path.join(out_dir, "minilm_input_scales.json"), "w") as f:
        json.dump(scales, f, indent=1)
    md += ["## Input scales (QuantConfig.input_scales) with W4A16 and W4A8 activations", "",
           f"- `patch_model(QuantConfig(method=m, input_scales=s), calibration)` on all {scales['calibration_sentences']} "
           f"sentences, embedding error on the {scales['eval_sentences']} held-out ones: with input scales, each layer "
           "where no AWQ scale folds (in post-norm BERT: all of them) gets a per-channel multiplier of its input, "
           "searched as the folds' (alpha = 0, no scale, is a candidate), and its weight is quantized divided by it",
           "- activations fp32: the W4A16 computation; int8: the same int4 layers with act=\"int8\" (per-token int8 "
           "activations, the W4A8 GEMM's torch reference); the first row is the fp model with int8 activations alone",
           "- mean output err: the layers' held-out ||X (W - W_eff)^T|| / ||X W^T||, W_eff the weight the layer "
           "computes with (its input scale included)", "", input_scales_table(scales), ""]
    with open(os.path.join(out_dir, "minilm_quality.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "cpu"))
