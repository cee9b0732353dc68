"""Writers shared by bench and profile: JSON (every raw figure), Markdown tables, PNG plots."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from ..dispatch import borrowed_from
from .env import model_kernels_ran_on

MICRO_SCHEMA_KEYS = ("kind", "env", "config", "copy_bandwidth_gbps", "skipped", "rows", "act_quant")
ROW_KEYS = ("model", "n", "k", "m", "backend", "family", "median_ms", "p20_ms", "p80_ms", "bytes", "tflops",
            "gbps", "pct_copy_bw", "check", "speedup_vs_fp16")


def _write_text(path: str, text: str) -> str:
    """Written beside and renamed into place: a run killed mid-write leaves the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_json(result: Dict, path: str) -> str:
    return _write_text(path, json.dumps(result, indent=1, default=str))


def write_checkpoint(result: Dict, out_dir: str, stem: str) -> List[str]:
    """JSON + Markdown of a run still in progress, no plots (`bench` and `profile` call this after each
    finished piece): a process that crashes or is killed keeps what it measured. Marked incomplete;
    the final write_all replaces both files."""
    snap = dict(result)
    snap.setdefault("incomplete", "checkpoint: written while the run was still going (it did not finish)")
    md = micro_markdown(snap) if snap["kind"] == "microbench" else profile_markdown(snap)
    return [write_json(snap, os.path.join(out_dir, f"{stem}.json")), _write_text(os.path.join(out_dir, f"{stem}.md"), md)]


def _env_lines(env: Dict, model_kernels: bool = False) -> List[str]:
    lines = [f"- device: **{env.get('device_name')}** ({env.get('device')})",
             f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}",
             f"- commit `{env.get('commit')}`, {env.get('timestamp_utc')}"]
    if env.get("peers"):
        lines.append("- peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items()))
    kernels = env.get("model_kernels")
    if model_kernels and kernels:  # (end-to-end only: the kernel rows do not run the model)
        lines.append("- MiniCPM-V 4.6's linear-attention layers (Qwen3.5) ran on " + ", ".join(model_kernels_ran_on(env))
                     + " (`bench/env.py`: the same for fp16 and int4)")
    d = env.get("dispatch_table")
    if d:
        where = "made from this run's bench" if d.get("from_env") else "the package's"
        lines.append(f"- backend=\"auto\": dispatch table {where}, {d.get('this_device_rules', 0)} measured rule(s) "
                     f"for this GPU{borrowed_from(d)} (`minicpm_int4/dispatch.py`)")
    return lines


def micro_markdown(result: Dict, decode_ms=(1, 16), prefill_ms=(4096,)) -> str:
    """Per model: one row per shape; fp16 time and each backend's speedup at the chosen M; and the
    decode rows' % of measured copy bandwidth."""
    rows = result["rows"]
    backends = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "fp16"]
    shown_ms = [m for m in list(decode_ms) + list(prefill_ms) if m in result["config"]["ms"]]
    by = {(r["model"], r["n"], r["k"], r["m"], r["backend"]): r for r in rows}
    out = ["## Kernel microbenchmarks", ""] + _env_lines(result["env"]) + [
        f"- measured copy bandwidth: **{result['copy_bandwidth_gbps']:.0f} GB/s**; "
        f"dtype {result['config']['dtype']}, group size {result['config']['group_size']}"]
    if result["config"].get("timing"):  # (bench files before it timed eager calls with events: no such key)
        out.append(f"- timing: {result['config']['timing']}")
    eager = sorted({f"`{r['backend']}`" for r in rows if str(r.get("timing", "")).startswith("eager")})
    if eager:
        out.append(f"- timed eagerly (no CUDA graph; the host's launch cost can be in these): {', '.join(eager)}; "
                   "the reason is in bench.json")
    out.append("")
    for name, why in result.get("skipped", {}).items():
        out.append(f"- `{name}` skipped: {why}")
    if result.get("incomplete"):
        out.append(f"- **incomplete**: {result['incomplete']}")
    for e in result.get("errors", []):
        out.append(f"- **error** {e['model']} {e['n']} x {e['k']} `{e['backend']}`: {e['error']}")
    out.append("")
    fused = {(r["model"], r["n"], r["k"]) for r in rows if r.get("fused")}
    for model in dict.fromkeys(r["model"] for r in rows):
        shapes = list(dict.fromkeys((r["n"], r["k"]) for r in rows if r["model"] == model))
        label = lambda n, k: f"{n} x {k}" + (" (fused)" if (model, n, k) in fused else "")  # noqa: E731
        out += [f"### {model}", ""]
        head = ["N x K"]
        for m in shown_ms:
            head.append(f"M={m} fp16 ms")
            head += [f"M={m} {b} x" for b in backends]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n, k in shapes:
            cells = [label(n, k)]
            for m in shown_ms:
                fp = by.get((model, n, k, m, "fp16"))
                cells.append(f"{fp['median_ms']:.4f}" if fp else "-")
                for b in backends:
                    r = by.get((model, n, k, m, b))
                    cells.append(f"{r['speedup_vs_fp16']:.2f}" if r and r.get("speedup_vs_fp16") else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if any(m_ == model for m_, _, _ in fused):
            out += ["(fused): the stacked GEMM of sibling projections `fuse_projections` makes (q / k / v, gate / up), "
                    "timed at M = 1, the one-token calls it runs at.", ""]
        dec = [r for r in rows if r["model"] == model and r["m"] <= 16 and r["backend"] != "fp16"]
        if dec:
            out += [f"% of copy bandwidth, decode (M <= 16), {model}:", ""]
            ms = sorted({r["m"] for r in dec})
            bks = list(dict.fromkeys(r["backend"] for r in dec))
            out += ["| N x K | backend | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|---|" + "---|" * len(ms)]
            for n, k in shapes:
                for b in bks:
                    vals = [by.get((model, n, k, m, b)) for m in ms]
                    if any(vals):
                        out.append(f"| {label(n, k)} | {b} | " + " | ".join(f"{v['pct_copy_bw']:.0f}%" if v else "-" for v in vals) + " |")
            out.append("")
    host = [r for r in rows if r.get("host_us") is not None and r["m"] == 1]
    if host:
        import statistics

        out += ["### host time per call, M = 1", "",
                "CPU time to queue one call (checks, dispatch, launch; no synchronisation) against the GPU time "
                "of the call, median over shapes. Where the host's exceeds the GPU's, eager decoding is bound by "
                "the CPU; CUDA graphs (`profile`'s graphed mode) remove the host's share. For our Triton "
                "backends, also the same calls with every kernel launched by Triton's own path rather than "
                "the package's direct launch of a repeated specialisation (kernels/_launch.py).", "",
                "| backend | host us | host us, Triton's launch | GPU us | shapes |", "|---|---|---|---|---|"]
        for b in dict.fromkeys(r["backend"] for r in host):
            mine = [r for r in host if r["backend"] == b]
            triton_launch = [r["host_us_triton_launch"] for r in mine if r.get("host_us_triton_launch") is not None]
            out.append(f"| {b} | {statistics.median(r['host_us'] for r in mine):.1f} | "
                       + (f"{statistics.median(triton_launch):.1f}" if triton_launch else "-") + " | "
                       f"{statistics.median(r['median_ms'] for r in mine) * 1e3:.1f} | {len(mine)} |")
        out.append("")
    from .targets import stream_fits, stream_fit_lines

    fits = stream_fits(result)
    if fits:
        out += ["### per-call floor and streaming bandwidth, decode sizes", ""] + stream_fit_lines(result, fits) + [""]
    if result.get("act_quant"):
        out += ["### per-token int8 activation quantization", "", "| M x K | backend | ms | GB/s | % copy bw |",
                "|---|---|---|---|---|"]
        for r in result["act_quant"]:
            out.append(f"| {r['m']} x {r['k']} | {r.get('backend', '-')} | {r['median_ms']:.4f} | {r['gbps']:.0f} | "
                       f"{r['pct_copy_bw']:.0f}% |")
        out.append("")
    return "\n".join(out)


def fmt_value(v, f="{:.2f}") -> str:
    """A table cell: numbers formatted, a missing figure (None: e.g. a decode time lost in timer
    noise on a tiny model) as "-"."""
    return f.format(v) if isinstance(v, (int, float)) else (v if v is not None else "-")


def _graphed_note(r: Dict) -> str:
    head = f"- {r['model']} {r['weights']} {r['mode']}: {r['graphed_by']}"
    if r["mode"] != "cudagraph":
        return (f"{head}; dynamo graph breaks: {r.get('graph_breaks', '-')}, "
                f"graphs not captured in CUDA graphs: {r.get('cudagraph_skips', '-')}")
    if r.get("replayed_steps") is None:
        return head
    same, n = "", r.get("tokens_checked")
    if n:
        same = (f"; its first {n} tokens are the eager decode's" if r["tokens_same_as_eager"] == n
                else f"; **its tokens leave the eager decode's at token {r['tokens_same_as_eager'] + 1} of {n} "
                     "checked**")
    capture = f", captured in {r['capture_ms']:.0f} ms" if r.get("capture_ms") is not None else ""
    emulated = " (emulated: nothing is captured off CUDA)" if r.get("emulated") else ""
    return (f"{head}{emulated}; {r['replayed_steps']} steps replayed{capture}, the graph's own time per step "
            f"{fmt_value(r.get('graph_step_ms'), '{:.3f}')} ms (decode ms/token: from the first replay to the end of "
            f"generate(), its Python loop included){same}")


def profile_markdown(result: Dict) -> str:
    out = ["## End-to-end profile", ""] + _env_lines(result["env"], model_kernels=True) + [
        f"- prompt {result['config']['prompt_tokens']} tokens + {result['config'].get('images', 0)} image, "
        f"{result['config']['new_tokens']} new tokens, batch 1",
        f"- measured copy bandwidth: {result.get('copy_bandwidth_gbps', float('nan')):.0f} GB/s"] + (
        [f"- **incomplete**: {result['incomplete']}"] if result.get("incomplete") else []) + ["",
        "| model | weights | mode | vision ms | prefill ms | decode ms/token | tokens/s | weight MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|"]
    fmt = fmt_value
    for r in result["runs"]:
        out.append(f"| {r['model']} | {r['weights']} | {r['mode']} | {fmt(r.get('vision_ms'))} | {fmt(r.get('prefill_ms'))} | "
                   f"{fmt(r.get('decode_ms_per_token'), '{:.3f}')} | {fmt(r.get('tokens_per_s'), '{:.1f}')} | "
                   f"{fmt(r.get('weight_bytes', 0) / 2**20, '{:.0f}')} | {fmt((r.get('peak_bytes') or 0) / 2**20, '{:.0f}')} |")
        if r.get("error"):
            out.append(f"| {r['model']} | {r['weights']} | {r['mode']} | failed: {r['error']} | | | | | |")
    notes = [_graphed_note(r) for r in result["runs"] if r.get("graphed_by")]
    notes += [f"- {r['model']} ({r['mode']} run): `patch_model` took {r['patch_model_s']:.1f} s"
              for r in result["runs"] if r.get("patch_model_s") is not None]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt, None
    except ImportError as e:
        return None, f"matplotlib is not installed ({e}); plots skipped"


# The backends the plots draw: fp16 (the baseline), our default kernels - what "auto" chooses between - and the
# peers. The bench's measurement variants (Backend.is_variant: prefetch, dq, rhs, unsplit, tc, ahead2, ring, flat, the forced
# CUDA W4A8 kernels and block sizes; bench/targets.py VARIANTS) stay in bench.md and targets.md; a line each in
# every panel made the plots unreadable (~15 backends x 12 shapes in one panel).
PLOTTED_OURS = ("w4a16-triton", "w4a16-cuda", "w4a8-triton", "w4a8-cuda")


def _plotted(row: Dict) -> bool:
    return row["backend"] in PLOTTED_OURS or row.get("family") in ("fp16", "peer")


def _colors(backends: Sequence[str]) -> Dict[str, str]:
    """One color per backend, the same in every panel and plot."""
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    return {b: palette[i % len(palette)] for i, b in enumerate(backends)}


def micro_plots(result: Dict, out_dir: str) -> List[str]:
    """speedup_vs_m.png (speedup over fp16 vs M, one panel per shape, a line per backend: our defaults solid, the
    peers dashed) and bandwidth.png (% of measured copy bandwidth at M = 1, a bar per backend and shape)."""
    plt, why = _plt()
    if plt is None:
        print(f"[bench] {why}")
        return []
    rows = [r for r in result["rows"] if _plotted(r)]
    order = [b for b in ("fp16", *PLOTTED_OURS) if any(r["backend"] == b for r in rows)]
    order += sorted({r["backend"] for r in rows} - set(order))
    color = _colors(order)
    files = []
    # (fuse_projections' stacked shapes, timed at M = 1 only, are bars in bandwidth.png, not lines here)
    shapes = list(dict.fromkeys((r["model"], r["n"], r["k"]) for r in rows if r["backend"] != "fp16" and not r.get("fused")))
    if shapes:
        cols = min(4, len(shapes))
        nrows = -(-len(shapes) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
        drawn = {}
        for ax, (model, n, k) in zip(axes.flat, shapes):
            for b in order:
                if b == "fp16":
                    continue
                pts = sorted((r["m"], r["speedup_vs_fp16"]) for r in rows if (r["model"], r["n"], r["k"]) == (model, n, k)
                             and r["backend"] == b and r.get("speedup_vs_fp16"))
                if pts:
                    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=color[b],
                                      ls="-" if b in PLOTTED_OURS else "--", label=b)
                    drawn.setdefault(b, line)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{model} {n}x{k}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(shapes):]:
            ax.axis("off")
        for ax in axes[:, 0]:
            ax.set_ylabel("speedup over fp16", fontsize=8)
        for ax in axes[-1, :]:
            ax.set_xlabel("M (tokens)", fontsize=8)
        top = 1 - 0.6 / (3 * nrows)  # room for the title and the legend: ~0.6 inch
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.suptitle(f"{result['env'].get('device_name')} - commit {str(result['env'].get('commit'))[:10]}: "
                     "speedup over fp16 torch.matmul", y=0.998, fontsize=9, va="top")
        fig.legend(list(drawn.values()), list(drawn), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.22 / (3 * nrows)),
                   ncol=min(8, max(1, len(drawn))), fontsize=8, frameon=False)
        files.append(os.path.join(out_dir, "speedup_vs_m.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)

    dec = [r for r in rows if r["m"] == 1 and r.get("pct_copy_bw") is not None]
    if dec:
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(shapes) + 2), 4.5))
        labels = list(dict.fromkeys(f"{r['model']}\n{r['n']}x{r['k']}" for r in dec))
        present = [b for b in order if any(r["backend"] == b for r in dec)]
        width = 0.8 / max(1, len(present))
        for i, b in enumerate(present):
            d = {f"{r['model']}\n{r['n']}x{r['k']}": r["pct_copy_bw"] for r in dec if r["backend"] == b}
            ax.bar([j + i * width for j in range(len(labels))], [d.get(l, 0) for l in labels], width, label=b,
                   color=color[b])
        ax.axhline(100, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("% of measured copy bandwidth (M = 1)")
        ax.legend(fontsize=7, ncol=min(4, len(present)))
        fig.tight_layout()
        files.append(os.path.join(out_dir, "bandwidth.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def profile_plot(result: Dict, out_dir: str) -> List[str]:
    plt, why = _plt()
    if plt is None:
        print(f"[profile] {why}")
        return []
    runs = [r for r in result["runs"] if r.get("decode_ms_per_token")]
    if not runs:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\n{r['weights']} {r['mode']}" for r in runs]
    axes[0].bar(range(len(runs)), [r["tokens_per_s"] for r in runs])
    axes[0].set_ylabel("decode tokens/s")
    axes[1].bar(range(len(runs)), [r.get("prefill_ms") or 0 for r in runs])
    axes[1].set_ylabel("prefill ms")
    for ax in axes:
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, fontsize=6, rotation=45, ha="right")
    fig.suptitle(f"{result['env'].get('device_name')} - commit {str(result['env'].get('commit'))[:10]}")
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def write_all(result: Dict, out_dir: str, stem: str) -> List[str]:
    """JSON + Markdown + PNGs for a microbench or profile result; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    files = [write_json(result, os.path.join(out_dir, f"{stem}.json"))]
    md = micro_markdown(result) if result["kind"] == "microbench" else profile_markdown(result)
    files.append(_write_text(os.path.join(out_dir, f"{stem}.md"), md))
    files += micro_plots(result, out_dir) if result["kind"] == "microbench" else profile_plot(result, out_dir)
    return files


def validate_micro(result: Dict) -> Optional[str]:
    """None if `result` has the microbench schema, else what is missing (used by tests and the README generator)."""
    for key in MICRO_SCHEMA_KEYS:
        if key not in result:
            return f"missing key {key!r}"
    for r in result["rows"]:
        for key in ROW_KEYS:
            if key not in r:
                return f"row missing key {key!r}: {r}"
    return None
