"""The README's performance section, generated from benchmarks/results/<gpu>/ (never typed by hand).

    python benchmarks/update_readme.py        rewrites the block between the markers in README.md
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from .env import model_kernels_ran_on
from .report import fmt_value

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
HEADLINE_M = (1, 16, 4096)


def _load(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _largest_llm_shapes(rows: List[Dict]) -> List[Dict]:
    """Per model, the LLM shape with the most weight bytes, lm_head excluded (N < 100k), and fuse_projections'
    stacked shapes (timed at M = 1 only)."""
    best = {}
    for r in rows:
        if r["n"] >= 100_000 or r.get("fused"):
            continue
        key = r["model"]
        if key not in best or r["n"] * r["k"] > best[key][0] * best[key][1]:
            best[key] = (r["n"], r["k"])
    return [{"model": m, "n": nk[0], "k": nk[1]} for m, nk in best.items()]


def bench_summary(bench: Dict, rel: str) -> List[str]:
    rows = bench["rows"]
    by = {(r["model"], r["n"], r["k"], r["m"], r["backend"]): r for r in rows}
    ours = [b for b in dict.fromkeys(r["backend"] for r in rows) if r_family(rows, b) == "ours"]
    head = ["model", "N x K"] + [f"{b} M={m}" for b in ours for m in HEADLINE_M]
    out = [f"Speedup over fp16 `torch.matmul` (x), with % of the measured copy bandwidth "
           f"({bench['copy_bandwidth_gbps']:.0f} GB/s) in brackets for M <= 16, "
           + ("the kernels' own time (replayed from CUDA graphs; the host's launch cost is apart, in bench.md):"
              if bench["config"].get("timing", "").startswith("kernel time") else
              "timed with events around eager calls: where the host takes longer to launch a call than its kernel "
              "runs (decode sizes), the host's time, not the kernel's:"), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in _largest_llm_shapes(rows):
        cells = [s["model"], f"{s['n']} x {s['k']}"]
        for b in ours:
            for m in HEADLINE_M:
                r = by.get((s["model"], s["n"], s["k"], m, b))
                if not r or r.get("speedup_vs_fp16") is None:
                    cells.append("-")
                elif m <= 16:
                    cells.append(f"{r['speedup_vs_fp16']:.2f}x ({r['pct_copy_bw']:.0f}%)")
                else:
                    cells.append(f"{r['speedup_vs_fp16']:.2f}x")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"Full tables: [{rel}/bench.md]({rel}/bench.md); plots: ![speedup]({rel}/speedup_vs_m.png)", ""]
    return out


def r_family(rows, backend):
    return next(r["family"] for r in rows if r["backend"] == backend)


def profile_summary(profile: Dict, rel: str) -> List[str]:
    out = ["End to end (batch 1, random weights, "
           f"{profile['config']['prompt_tokens']}-token prompt + image, {profile['config']['new_tokens']} new tokens):", "",
           "| model | weights | mode | decode tokens/s | prefill ms | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for r in profile["runs"]:
        if r.get("error"):
            out.append(f"| {r['model']} | {r['weights']} | {r['mode']} | failed: {r['error'][:60]} | | |")
            continue
        out.append(f"| {r['model']} | {r['weights']} | {r['mode']} | {fmt_value(r.get('tokens_per_s'), '{:.1f}')} | "
                   f"{fmt_value(r.get('prefill_ms'), '{:.1f}')} | {(r.get('peak_bytes') or 0) / 2**20:.0f} |")
    out.append("")
    if any(r.get("model") == "minicpmv4.6" for r in profile["runs"]) and profile.get("env", {}).get("model_kernels"):
        # what the 4.6 LLM's linear attention ran on shapes its every figure, fp16 and int4 alike
        out += ["MiniCPM-V 4.6's linear-attention layers ran on " + ", ".join(model_kernels_ran_on(profile["env"]))
                + ".", ""]
    out += [f"Details: [{rel}/profile.md]({rel}/profile.md)", ""]
    return out


def performance_section(results_root: str, readme_dir: str) -> str:
    lines = [START, ""]
    found = False
    for gpu in sorted(os.listdir(results_root)) if os.path.isdir(results_root) else []:
        d = os.path.join(results_root, gpu)
        bench, profile = _load(os.path.join(d, "bench.json")), _load(os.path.join(d, "profile.json"))
        if bench is None and profile is None:
            continue
        found = True
        env = (bench or profile)["env"]
        rel = os.path.relpath(d, readme_dir)
        lines += [f"### {env.get('device_name')}", "",
                  f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}; commit "
                  f"`{str(env.get('commit'))[:12]}`, {env.get('timestamp_utc')}", ""]
        if bench:
            lines += bench_summary(bench, rel)
        if profile:
            lines += profile_summary(profile, rel)
    if not found:
        lines += ["No GPU results are committed yet: the kernels are verified against the reference (in the",
                  "Triton interpreter; the CUDA kernels' own per-thread and per-warp code in a CPU emulation) but not timed.",
                  "A GPU session runs `benchmarks/run_gpu_suite.sh`, commits `benchmarks/results/<gpu>/`, and",
                  "regenerates this section with `python benchmarks/update_readme.py`.", ""]
    lines.append(END)
    return "\n".join(lines)


def update_readme(readme: str, results_root: str) -> bool:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} block")
    new = text[: text.index(START)] + performance_section(results_root, os.path.dirname(os.path.abspath(readme))) + \
        text[text.index(END) + len(END):]
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return new != text
