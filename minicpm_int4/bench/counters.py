"""Hardware counters of the kernels the bench times, read by Nsight Compute (`ncu`): why a kernel runs at the
speed the bench measured, not only how fast.

The bench says the decode kernels stream their weights at about half the copy bandwidth on the H200 (the
tensor-core kernel too, at ~2.1 - 2.5 SASS instructions a weight, under the issue budget) and that M = 16 runs
slower than M = 1 on the same bytes; which wall each kernel hits - DRAM, L2, the issue slots, or too few loads in
flight (low occupancy, warps stalled on long scoreboard) - is what the hardware counters say and timings
cannot. One call of this module profiles a short list of (N x K, M, backend) cases, each kernel launch once,
and writes per kernel: duration, DRAM / L2 / SM throughput as % of peak, achieved and theoretical occupancy
(and what limits it), issue-slot use, eligible warps, registers, grid, waves, and the three largest warp-stall
reasons. Every raw counter ncu reported is kept in the JSON.

How: the parent runs `ncu` on a child process of this module (`--child`). The child prepares each case
as the bench does (bench/backends.py: the same weights, the layer's call path, checked against reference.py
first), warms it up (compiles, autotunes) outside any profiled range, then calls it once between
cudaProfilerStart / Stop (ncu --profile-from-start off), after a marker kernel of its own (a one-thread Triton
kernel named `minicpm_int4_ncu_marker`) that says where the case's kernels begin in ncu's list. ncu runs with --clock-control none
(the clocks the timings ran at; the device README asks it) and its default cache control (caches flushed
before each pass: the weights come from DRAM, as the bench's rotating copies make them).

    minicpm-int4 counters --out DIR [--time-budget-s 60] [--cases N:K:M:backend,...]
    (python benchmarks/ncu_counters.py in a checkout: the same)

Writes DIR/counters.json and DIR/counters.md (or, where ncu is missing or cannot read the counters, a
counters.json that says why). Needs a GPU and ncu; the suite's `counters` stage runs it after the bench.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import triton
import triton.language as tl

# ncu sections read (each one's metrics, nothing else: a section name is valid on every ncu that ships it,
# where a metric name spelt wrong would fail the whole run)
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "SchedulerStats", "WarpStateStats")
MARKER = "minicpm_int4_ncu_marker"  # launched before each case's call: where its kernels begin in ncu's list

# Default cases: Llama3-V 2.5's largest LLM shapes (MLP gate / up and down, #3's "large shapes"), the decode
# kernels at M = 1 and 16 (#3 / #5's targets) and the prefill ones at 4096, beside fp16 (cuBLAS) as the yardstick
DECODE_SHAPES = ((14336, 4096), (4096, 14336))
DECODE_BACKENDS = {1: ("fp16", "w4a16-triton", "w4a16-triton-unsplit", "w4a16-triton-tc", "w4a16-triton-direct",
                       "w4a16-cuda", "w4a16-cuda-gemv", "w4a16-cuda-ahead2", "w4a16-cuda-ring"),
                   16: ("fp16", "w4a16-triton", "w4a16-triton-trip32", "w4a16-triton-staged", "w4a16-cuda",
                        "w4a16-cuda-ahead2", "w4a16-cuda-ring")}
PREFILL_SHAPE, PREFILL_M = (14336, 4096), 4096
PREFILL_BACKENDS = ("fp16", "w4a16-triton", "w4a16-triton-rhs", "w4a16-triton-dq", "w4a16-cuda-wgmma", "w4a8-triton",
                    "w4a8-cuda")

# summary field -> the counters that give it, the first one present wins: the raw page's metric names (names differ
# across ncu versions), then the details page's display names (an ncu that wrote that layout instead: read too)
FIELDS = {
    "duration_us": ("gpu__time_duration.sum", "Duration"),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                 "DRAM Throughput"),
    "dram_read_bytes": ("dram__bytes_read.sum",),
    "l2_bytes": ("lts__t_bytes.sum",),
    "warp_instructions": ("smsp__inst_executed.sum", "sm__inst_executed.sum", "Executed Instructions"),
    "l2_pct": ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 Cache Throughput"),
    "l1_pct": ("l1tex__throughput.avg.pct_of_peak_sustained_active", "L1/TEX Cache Throughput"),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "Compute (SM) Throughput"),
    "occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", "Achieved Occupancy"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", "Theoretical Occupancy"),
    "issue_active_pct": ("smsp__issue_active.avg.pct_of_peak_sustained_active", "One or More Eligible"),
    "eligible_warps": ("smsp__warps_eligible.avg.per_cycle_active", "Eligible Warps Per Scheduler"),
    "registers": ("launch__registers_per_thread", "Registers Per Thread"),
    "block": ("launch__block_size", "Block Size"),
    "grid": ("launch__grid_size", "Grid Size"),
    "waves": ("launch__waves_per_multiprocessor", "Waves Per SM"),
    "smem_dynamic_bytes": ("launch__shared_mem_per_block_dynamic", "Dynamic Shared Memory Per Block"),
    "smem_static_bytes": ("launch__shared_mem_per_block_static", "Static Shared Memory Per Block"),
}
# occupancy limit -> (raw name, details-page name): blocks an SM by that resource
OCCUPANCY_LIMITS = {"registers": ("launch__occupancy_limit_registers", "Block Limit Registers"),
                    "shared_mem": ("launch__occupancy_limit_shared_mem", "Block Limit Shared Mem"),
                    "warps": ("launch__occupancy_limit_warps", "Block Limit Warps"),
                    "blocks": ("launch__occupancy_limit_blocks", "Block Limit SM"),
                    "barriers": ("launch__occupancy_limit_barriers", "Block Limit Barriers")}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
# base units -> microseconds / bytes (ncu scales units unless --print-units base; both are read)
TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}
PREFIXES = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1 << 20, "Gi": 1 << 30}
COUNTED = re.compile(r"^(Ki|Mi|Gi|K|M|G|T)?(byte|inst|sector|cycle)s?$")  # counts ncu may scale: "Mbyte", "Kinst"

# Counters read beside the sections where this ncu knows them (ncu --query-metrics; a name it does not know would
# fail the whole run): the bytes DRAM and L2 moved and the warp instructions issued, so that a row says whether a
# weight byte was read once, how much x was re-read from L2, and the instructions a weight it took, beside the
# static counts of kernel_inspection.md / cuda_kernel_inspection.md
EXTRA_METRICS = ("dram__bytes_read.sum", "lts__t_bytes.sum", "smsp__inst_executed.sum")


@triton.jit
def minicpm_int4_ncu_marker(ptr):
    tl.store(ptr, tl.load(ptr) + 1)


def default_cases() -> List[Dict]:
    """The first shape at M = 1, 16 and the prefill's M, then the other decode shapes (a time budget that runs
    out cuts the last ones: every regime is profiled once before any is profiled twice)."""
    cases = []
    for i, (n, k) in enumerate(DECODE_SHAPES):
        for m, backends in DECODE_BACKENDS.items():
            cases += [{"n": n, "k": k, "m": m, "backend": b} for b in backends]
        if i == 0:
            pn, pk = PREFILL_SHAPE
            cases += [{"n": pn, "k": pk, "m": PREFILL_M, "backend": b} for b in PREFILL_BACKENDS]
    return cases


def parse_cases(spec: str) -> List[Dict]:
    """'N:K:M:backend,...' -> cases (a wrong spec is a ValueError that names it)."""
    cases = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"case {item!r}: expected N:K:M:backend, e.g. 14336:4096:1:w4a16-cuda")
        try:
            n, k, m = (int(p) for p in parts[:3])
        except ValueError:
            raise ValueError(f"case {item!r}: N, K and M must be integers") from None
        cases.append({"n": n, "k": k, "m": m, "backend": parts[3]})
    if not cases:
        raise ValueError("no cases given")
    return cases


# ---- the parent: ncu around the child, its CSV read back ---------------------------------------------------------

def find_ncu() -> Optional[str]:
    """$NCU, then ncu on PATH, then the CUDA toolkit's and Nsight Compute's usual homes."""
    for cand in [os.environ.get("NCU"), shutil.which("ncu"), "/usr/local/cuda/bin/ncu",
                 *sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True),
                 *sorted(glob.glob("/usr/local/cuda*/nsight-compute*/ncu"), reverse=True)]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def ncu_command(ncu: str, log_path: str, child: Sequence[str], sections: Sequence[str] = SECTIONS,
                base_units: bool = True, metrics: Sequence[str] = ()) -> List[str]:
    """ncu around `child`: the clocks left alone (--clock-control none), only the ranges between
    cudaProfilerStart / Stop profiled, the raw page as CSV (in base units) into `log_path`."""
    cmd = [ncu, "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
           "--csv", "--page", "raw", *(["--print-units", "base"] if base_units else []), "--log-file", log_path]
    for s in sections:
        cmd += ["--section", s]
    if metrics:
        cmd += ["--metrics", ",".join(metrics)]
    return cmd + list(child)


def known_metrics(ncu: str, wanted: Sequence[str] = EXTRA_METRICS, timeout_s: float = 20) -> List[str]:
    """The names of `wanted` this ncu lists for the GPU (`ncu --query-metrics`: base names, one a line), by base
    name; none where the query fails."""
    try:
        proc = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    listed = set(re.findall(r"^\s*([a-z0-9_]+__[a-z0-9_]+)", proc.stdout, re.M))
    return [m for m in wanted if m.split(".")[0] in listed]


def _number(text: str) -> Optional[float]:
    t = (text or "").strip().replace(",", "")
    if not t or t.lower() in ("n/a", "nan", "-"):
        return None
    try:
        return float(t)
    except ValueError:
        return None


def read_raw_csv(text: str) -> List[Dict]:
    """ncu's `--csv --page raw` output (header row, units row, one row per kernel; ==PROF== lines and the
    application's output around it ignored) -> [{"kernel": name, "metrics": {name: (value, unit)}}], in launch
    order. The details page's layout (a row per metric: "Metric Name", "Metric Unit", "Metric Value") is read too."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(line for line in lines[start:] if line.startswith('"')))))
    header = rows[0]
    if {"Metric Name", "Metric Value"} <= set(header):
        return _read_long(header, rows[1:])
    units = rows[1] if len(rows) > 1 and not (rows[1] and rows[1][0].strip().isdigit()) else None
    body = rows[2:] if units is not None else rows[1:]
    out = []
    for r in body:
        if len(r) != len(header):
            continue
        rec = dict(zip(header, r))
        metrics = {}
        for i, name in enumerate(header):
            if "__" not in name:  # ID, Kernel Name, Block Size, ...: not counters
                continue
            metrics[name] = (r[i], units[i] if units else "")
        out.append({"kernel": rec.get("Kernel Name", "?"), "id": rec.get("ID"), "metrics": metrics})
    return out


def _read_long(header: List[str], body: List[List[str]]) -> List[Dict]:
    col = {name: i for i, name in enumerate(header)}
    kernels: Dict[str, Dict] = {}
    for r in body:
        if len(r) != len(header):
            continue
        k = kernels.setdefault(r[col["ID"]], {"kernel": r[col["Kernel Name"]] if "Kernel Name" in col else "?",
                                              "id": r[col["ID"]], "metrics": {}})
        unit = r[col["Metric Unit"]] if "Metric Unit" in col else ""
        k["metrics"].setdefault(r[col["Metric Name"]], (r[col["Metric Value"]], unit))
    return list(kernels.values())  # (dicts keep the order the IDs came in: launch order)


def _value(metrics: Dict, names: Sequence[str], field: str) -> Optional[float]:
    for name in names:
        if name in metrics:
            raw, unit = metrics[name]
            unit = unit.split("/")[0]  # "Kbyte/block" -> Kbyte
            v = _number(raw)
            if v is None:
                continue
            if field.endswith("_us"):
                v *= TIME_UNITS.get(unit, 1.0)
            else:
                hit = COUNTED.match(unit)
                v *= PREFIXES[hit.group(1) or ""] if hit else 1.0
            return v
    return None


def summarize_kernel(row: Dict) -> Dict:
    """One kernel's summary (FIELDS), its occupancy limits and its three largest stall reasons."""
    m = row["metrics"]
    s = {"kernel": row["kernel"]}
    for field, names in FIELDS.items():
        s[field] = _value(m, names, field)
    limits = {k: _value(m, names, k) for k, names in OCCUPANCY_LIMITS.items()}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        low = min(limits.values())
        s["occupancy_limited_by"] = [k for k, v in limits.items() if v == low]
        s["blocks_per_sm_limit"] = low
    stalls = []
    for name, (raw, _unit) in m.items():
        hit = STALL.match(name)
        v = _number(raw)
        if hit and v is not None and hit.group(1) != "selected":  # "selected": issuing, not a stall
            stalls.append((hit.group(1), v))
    s["top_stalls"] = sorted(stalls, key=lambda t: -t[1])[:3]
    return s


def attribute(rows: List[Dict], cases: List[Dict]) -> Dict:
    """Kernels -> the cases the child ran, in order, by the marker launched before each. Returns
    {"cases": [case + "kernels"], "unattributed": [...]} (all rows there, in order, when the markers do not
    match the cases: never a kernel given to the wrong case)."""
    marks = [i for i, r in enumerate(rows) if MARKER in r["kernel"]]
    if len(marks) != len(cases):
        return {"cases": [dict(c, kernels=[]) for c in cases], "unattributed": [summarize_kernel(r) for r in rows],
                "warning": f"{len(marks)} marker kernel(s) ({MARKER}) for {len(cases)} case(s): kernels not attributed"}
    out = []
    for j, (c, start) in enumerate(zip(cases, marks)):
        end = marks[j + 1] if j + 1 < len(marks) else len(rows)
        out.append(dict(c, kernels=[summarize_kernel(r) for r in rows[start + 1:end]]))
    return {"cases": out, "unattributed": [summarize_kernel(r) for r in rows[:marks[0]]] if marks else []}


def _case_totals(case: Dict) -> Dict:
    """Over the case's kernels: time, GB/s on the bench's byte count, DRAM and L2 bytes over that count (1.0:
    each byte moved once), and thread instructions a weight (warp instructions x 32 / (N K): the static counts'
    measure, with every instruction outside the K loop in it)."""
    ks = case.get("kernels") or []

    def total(field):
        vals = [k[field] for k in ks if k.get(field) is not None]
        return sum(vals) if vals and len(vals) == len(ks) else None

    dur = total("duration_us")
    tot = {"kernels_total_us": dur}
    if dur and case.get("bytes"):
        tot["gbps"] = case["bytes"] / (dur * 1e-6) / 1e9
    for field, key in (("dram_read_bytes", "dram_read_over_bytes"), ("l2_bytes", "l2_over_bytes")):
        v = total(field)
        if v is not None and case.get("bytes"):
            tot[key] = v / case["bytes"]
    inst = total("warp_instructions")
    if inst is not None and case.get("n") and case.get("k"):
        tot["thread_inst_per_weight"] = inst * 32 / (case["n"] * case["k"])
    return tot


def run_counters(out_dir: str, cases: Optional[List[Dict]] = None, time_budget_s: float = 60,
                 sections: Sequence[str] = SECTIONS, dtype: str = "float16", group_size: int = 128,
                 ncu: Optional[str] = None, timeout_s: Optional[float] = None, echo: bool = True) -> Dict:
    """Profile `cases` under ncu and write counters.json / counters.md in `out_dir`. The child starts no case
    past `time_budget_s` from now (its start-up included); ncu prints its results only when the child exits, so
    the child must end by itself: the parent's `timeout_s` (default the budget plus 40 s, for the last case and
    ncu's report) only guards against a hang, and a run it stops has no numbers. `echo`: ncu's and the child's
    output (a line a case, ncu's passes a kernel) printed as it comes - the progress of a minute-long run."""
    from .backends import select_backends
    from .env import env_info

    cases = cases or default_cases()
    select_backends([c["backend"] for c in cases])  # an unknown name: a ValueError listing the known ones, before ncu
    os.makedirs(out_dir, exist_ok=True)
    result: Dict = {"kind": "counters", "sections": list(sections), "config": {"dtype": dtype, "group_size": group_size,
                    "time_budget_s": time_budget_s}, "requested": cases}
    ncu = ncu or find_ncu()
    if ncu is None:
        result["skipped"] = "ncu (Nsight Compute) not found: not on PATH, $NCU unset, none under /usr/local/cuda or /opt/nvidia"
        return _write(result, out_dir)
    import torch

    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device: hardware counters need a GPU"
        return _write(result, out_dir)
    result["env"] = env_info(torch.device("cuda"))
    with tempfile.TemporaryDirectory(prefix="minicpm-int4-ncu-") as tmp:
        cases_path, manifest, log = (os.path.join(tmp, f) for f in ("cases.json", "manifest.json", "ncu.csv"))
        with open(cases_path, "w") as f:
            json.dump(cases, f)
        child = [sys.executable, "-m", "minicpm_int4.bench.counters", "--child", "--cases-json", cases_path,
                 "--manifest", manifest, "--deadline", f"{time.time() + time_budget_s:.3f}", "--dtype", dtype,
                 "--group-size", str(group_size)]
        t0 = time.monotonic()
        limit = timeout_s if timeout_s is not None else time_budget_s + 40
        metrics = known_metrics(ncu)
        result["extra_metrics"] = metrics
        for units in (True, False):  # an ncu without --print-units: once more without it (fails in seconds)
            cmd = ncu_command(ncu, log, child, sections, base_units=units, metrics=metrics)
            result["command"] = " ".join(cmd)
            rc, out = run_streaming(cmd, max(limit - (time.monotonic() - t0), 1), echo=echo)
            # the CSV goes to --log-file; an ncu that printed it to stdout instead is read there
            text = open(log).read() if os.path.exists(log) else ""
            rows = read_raw_csv(text) or read_raw_csv(out)
            if rows or not (units and "print-units" in (text + out)):
                break
        result["wall_s"] = time.monotonic() - t0
        ran = json.load(open(manifest)) if os.path.exists(manifest) else {"cases": [], "errors": []}
    result["ncu_rc"] = rc
    result["child_errors"] = ran.get("errors", [])
    if not rows:
        errs = [line for line in (text + "\n" + out).splitlines() if "==ERROR==" in line][:10]
        result["error"] = "ncu reported no kernel (rc %s): %s" % (rc, " | ".join(errs) or (text + out)[-1500:])
        return _write(result, out_dir)
    att = attribute(rows, ran["cases"])
    for c in att["cases"]:
        c.update(_case_totals(c))
    result.update(att)
    result["raw"] = rows
    if ran.get("left_out"):
        result["incomplete"] = (f"{ran['left_out']} of {len(cases)} cases left out (time budget of {time_budget_s:.0f} s)")
    elif rc == "timeout":
        result["incomplete"] = "ncu was stopped at its timeout: the cases after the last attributed one are missing"
    return _write(result, out_dir)


def run_streaming(cmd: Sequence[str], timeout_s: float, echo: bool = True, tail_lines: int = 2000):
    """(return code or "timeout", the output's last `tail_lines` lines) of `cmd`, stdout and stderr together,
    each line printed as it comes where `echo`. The command runs in a session of its own and past `timeout_s`
    the whole session is killed: ncu's profiled child too, which would otherwise keep the pipe (and the GPU)."""
    import collections
    import signal
    import threading

    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    fired = threading.Event()

    def kill():
        fired.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    tail: collections.deque = collections.deque(maxlen=tail_lines)
    try:
        for line in proc.stdout:
            tail.append(line)
            if echo:
                print(line, end="", flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted (Ctrl-C, the suite's stage limit): take the child along
            kill()
            proc.wait()
    return ("timeout" if fired.is_set() else rc), "".join(tail)


def _write(result: Dict, out_dir: str) -> Dict:
    from .report import _write_text, write_json

    write_json(result, os.path.join(out_dir, "counters.json"))
    _write_text(os.path.join(out_dir, "counters.md"), counters_markdown(result))
    return result


def _f(v, fmt="{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def counters_markdown(res: Dict) -> str:
    lines = ["## Hardware counters (Nsight Compute)", ""]
    env = res.get("env") or {}
    if env:
        lines.append(f"- device: **{env.get('device_name')}**; torch {env.get('torch')}, triton {env.get('triton')}, "
                     f"commit `{env.get('commit')}`, {env.get('timestamp_utc')}")
    if res.get("skipped"):
        return "\n".join(lines + [f"- skipped: {res['skipped']}", ""])
    lines.append(f"- ncu sections {', '.join(res.get('sections', []))}; --clock-control none; caches flushed "
                 "before each pass (the weights come from DRAM); one launch a case, after warm-up")
    for key in ("error", "warning", "incomplete"):
        if res.get(key):
            lines.append(f"- **{key}**: {res[key]}")
    for e in res.get("child_errors", []):
        lines.append(f"- case failed: {e.get('case')}: {e.get('error', '')[:300]}")
    lines += ["", "Reading it: DRAM % near 90 - the kernel streams at the memory's speed; DRAM % low with issue "
              "active high - instruction-bound (fewer instructions a weight); both low with `long_scoreboard` "
              "first among the stalls and low occupancy - too few loads in flight (more bytes in flight a warp, or "
              "more warps); L2 % high beside a modest DRAM % - operands re-read from L2 (x at M = 16).", "",
              "Per case (its first row): GB/s on the bench's byte count (weights, scales, zeros, x, y); DRAM read and L2 "
              "bytes over that count (1.0: each byte moved once); thread instructions a weight (warp instructions x 32 / "
              "(N K), everything the launch issued).", "",
              "| N x K | M | backend | kernel | us | GB/s (bench bytes) | DRAM read / bytes | L2 bytes / bytes "
              "| thread instr / weight | DRAM % | L2 % | SM % | occupancy % (theor.; limit) "
              "| issue active % | eligible warps | regs | grid x block | waves | top stalls (warps a issue) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res.get("cases", []):
        ks = c.get("kernels") or []
        if not ks:
            why = f"failed: {c['error'][:80]}" if c.get("error") else "no kernel attributed"
            lines.append(f"| {c['n']} x {c['k']} | {c['m']} | {c['backend']} | ({why}) |" + " - |" * 15)
            continue
        for i, k in enumerate(ks):
            per_case = (f"{_f(c.get('gbps'))} | {_f(c.get('dram_read_over_bytes'), '{:.2f}')} "
                        f"| {_f(c.get('l2_over_bytes'), '{:.2f}')} | {_f(c.get('thread_inst_per_weight'), '{:.2f}')}"
                        if i == 0 else " | | ")
            occ = f"{_f(k.get('occupancy_pct'))} ({_f(k.get('theoretical_occupancy_pct'))}"
            if k.get("occupancy_limited_by"):
                occ += f"; {'/'.join(k['occupancy_limited_by'])}"
            occ += ")"
            stalls = ", ".join(f"{n} {v:.1f}" for n, v in k.get("top_stalls", []))
            name = k["kernel"] if len(k["kernel"]) <= 48 else k["kernel"][:45] + "..."
            lines.append(
                f"| {c['n']} x {c['k']} | {c['m']} | {c['backend']} | `{name}` | {_f(k.get('duration_us'), '{:.2f}')} | {per_case} "
                f"| {_f(k.get('dram_pct'))} | {_f(k.get('l2_pct'))} | {_f(k.get('sm_pct'))} | {occ} "
                f"| {_f(k.get('issue_active_pct'))} | {_f(k.get('eligible_warps'), '{:.2f}')} | {_f(k.get('registers'))} "
                f"| {_f(k.get('grid'))} x {_f(k.get('block'))} | {_f(k.get('waves'), '{:.2f}')} | {stalls or '-'} |")
    if res.get("unattributed"):
        lines += ["", f"{len(res['unattributed'])} kernel(s) not attributed to a case: "
                  + ", ".join(f"`{k['kernel'][:40]}`" for k in res["unattributed"][:10])]
    return "\n".join(lines) + "\n"


# ---- the child: the cases, each launched once inside a profiled range ----------------------------------------------

def run_cases(cases: List[Dict], device, dtype, group_size: int, time_budget_s: Optional[float],
              start: Callable[[], None], stop: Callable[[], None], marker: Callable[[], None],
              sync: Callable[[], None], warmup: int = 3, on_case: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Prepare, check and warm each case, then run it once between start() and stop(), marker() first.
    Returns {"cases": the ones profiled, with their bytes, "errors": [...]}: a case that fails to prepare or
    check is an error entry and nothing of it is profiled (its marker is not launched either)."""
    import torch

    from .backends import select_backends
    from .micro import _check

    t0 = time.monotonic()
    ran: Dict = {"cases": [], "errors": []}
    esize = torch.empty((), dtype=dtype).element_size()
    weights: Dict = {}
    by_name = {b.name: b for b in select_backends(sorted({c["backend"] for c in cases}))}  # an unknown name: ValueError
    for i, case in enumerate(cases):
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
            print(f"[counters] time budget reached: {len(cases) - i} case(s) left out", flush=True)
            ran["left_out"] = len(cases) - i
            break
        print(f"[counters] case {i + 1}/{len(cases)}: {case['n']} x {case['k']}, M = {case['m']}, {case['backend']}",
              flush=True)
        try:
            backend = by_name[case["backend"]]
            why = backend.available(device)
            if why:
                raise RuntimeError(f"not available: {why}")
            if not backend.supports(case["m"]):
                raise RuntimeError(f"does not serve M = {case['m']}")
            n, k, m = case["n"], case["k"], case["m"]
            if (n, k) not in weights:
                weights.clear()  # one shape's weight at a time
                g = torch.Generator(device=device).manual_seed(n * 31 + k)
                weights[(n, k)] = (torch.randn(n, k, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
            prepared = backend.prepare(weights[(n, k)], group_size)
            x = torch.randn(m, k, device=device, dtype=dtype)
            check = _check(backend.name, prepared, x)
            for _ in range(warmup):
                prepared.run(x)
            sync()
        except Exception as e:  # recorded, and the next case runs
            ran["errors"].append({"case": case, "error": f"{type(e).__name__}: {e}"})
            continue
        entry = dict(case, check=check, bytes=prepared.weight_bytes + backend.activation_bytes(m, k, n, esize))
        start()
        try:
            marker()  # its marker launched: the case is listed, so that the markers and the cases still pair up
            prepared.run(x)
            sync()
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            ran["errors"].append({"case": case, "error": entry["error"]})
        finally:
            stop()
        ran["cases"].append(entry)
        if on_case is not None:
            on_case(ran)
        del prepared, x
    return ran


def _child(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("counters child: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cases = json.load(open(args.cases_json))

    def save(ran):
        with open(args.manifest, "w") as f:
            json.dump(ran, f)

    flag = torch.zeros(1, dtype=torch.int32, device=device)

    def marker():
        minicpm_int4_ncu_marker[(1,)](flag)

    marker()  # compiled here, outside the profiled ranges
    torch.cuda.synchronize()
    ran = run_cases(cases, device, getattr(torch, args.dtype), args.group_size, args.deadline - time.time(),
                    start=torch.cuda.profiler.start, stop=torch.cuda.profiler.stop,
                    marker=marker, sync=torch.cuda.synchronize, on_case=save)
    save(ran)
    for e in ran["errors"]:
        print(f"counters: case {e['case']} failed: {e['error']}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="minicpm-int4 counters", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for counters.json / counters.md")
    p.add_argument("--cases", help="N:K:M:backend,... (default: Llama3-V 2.5's MLP shapes, the decode kernels at "
                                   "M = 1 and 16, the prefill ones at 4096, fp16 beside each)")
    p.add_argument("--time-budget-s", type=float, default=60, help="no new case starts past this (default 60)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="ncu sections (default: %(default)s)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cases-json", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the child's: no case starts past it (epoch s)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)
    if not args.out:
        p.error("--out is required")
    try:
        cases = parse_cases(args.cases) if args.cases else default_cases()
    except ValueError as e:
        p.error(str(e))
    res = run_counters(args.out, cases, args.time_budget_s, [s for s in args.sections.split(",") if s],
                       args.dtype, args.group_size)
    print(counters_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
