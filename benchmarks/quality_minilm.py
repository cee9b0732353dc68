"""Quantization quality on real trained weights (all-MiniLM-L6-v2): rtn vs search vs
activation-aware search vs gptq at group sizes 32/64/128, and how much calibration each needs (a
sweep over the number of calibration sentences at group size 128), and gptq's dampening at each
group size. Writes JSON + Markdown (~15 min on 2 CPU cores).

    python benchmarks/quality_minilm.py [OUT_DIR]      (default benchmarks/results/cpu)
"""
import json
import os
import sys

from minicpm_int4.bench.env import env_info
from minicpm_int4.bench.quality import (damp_table, run_calibration_sweep, run_damp_sweep, run_minilm_quality,
                                        summary_table, sweep_table)

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
    with open(os.path.join(out_dir, "minilm_quality.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results", "cpu"))
