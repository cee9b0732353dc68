"""Time the Triton decode kernels' launch-plan settings on a GPU, so that one device call says which
values of kernels/w4a16.py's settings a default should take, where the bench times only the defaults and
one variant each.

Per (N x K, M), fp16, G = 128, the layer called as QuantLinear calls it (ops.quantized_linear with the layer's
workspace: split-K finished in the same launch), each call checked against reference.py (the derived
bound) before it is timed with the bench's timing (a CUDA graph of calls over weight copies that do not
fit in L2, bench/env.py kernel_time_ms):
  M = 1:     the CUDA-core GEMV, GEMV_THREADS_PER_SM (the threads an SM K is split to give) x GEMV_PREFETCH
             (its next step of W loaded before it computes the current one) x GEMV_HALF2 (its products in fp16
             pairs: 96 registers a thread where the fp32 path holds 128, so more threads an SM may pay); the other
             GEMV_DIRECT_LOADS (x, scales and zero points loaded by each thread for its own words, no barrier) x
             GEMV_PREFETCH x GEMV_HALF2 at the default split; and the tensor-core decode
             kernel at M = 1 (GEMV_MAX_M = 0) over the decode settings below;
  M = 2..16: the tensor-core decode kernel, DECODE_PROGRAMS_PER_SM (the programs an SM K is split to give)
             x DECODE_TRIP_WORDS (packed words of K a loop trip: 16 = one group of 128, 32 = two); and at the
             default plan with DECODE_FRAGMENT = False (its dequantized tile in natural order, moved into the
             tensor cores' layout through 16 KB of shared memory a program; at M = 1 on the tensor-core kernel).
Every row keeps the plan the settings made (split, steps a trip) and GB/s against the copy bandwidth
measured in the same run; the Markdown lists, per (shape, M), each setting's time over the default's.
Writes decode_sweep.json and decode_sweep.md in --out, rewritten after each shape (a run cut short keeps
what it measured). On the GPU machine, after the suite's install (its `extra` stage, with the profile):

    SUITE_STAGES=install,extra,profile SUITE_DEADLINE_S=280 \\
        SUITE_EXTRA_CMD='python3 benchmarks/decode_sweep.py --out "$OUT" --time-budget-s 100' SUITE_EXTRA_S=130 \\
        bash benchmarks/run_gpu_suite.sh

On a CPU (the interpreter, tiny shapes: what tests/test_bench.py runs) it checks the harness, not speed.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

DEFAULT_SHAPES = ((4096, 4096), (12288, 4096), (4096, 12288), (14336, 4096))
GEMV_THREADS = (256, 512, 1024, 2048)
PROGRAMS_PER_SM = (1, 2, 4, 8)
TRIP_WORDS = (16, 32)


@contextlib.contextmanager
def _settings(**values):
    """kernels/w4a16.py's module settings at these values inside the block (the launch plans are cached by
    their arguments, which include the settings, so no cache goes stale)."""
    from minicpm_int4.kernels import w4a16

    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(w4a16._setting(name, value))
        yield


def settings_for(m: int, gemv_threads=GEMV_THREADS, programs=PROGRAMS_PER_SM, trips=TRIP_WORDS) -> List[Dict]:
    """The settings timed at M: dicts of kernels/w4a16.py names -> values ({} is the default, first)."""
    from minicpm_int4.kernels import w4a16

    out: List[Dict] = [{}]
    if m == 1:
        for threads, prefetch, half2 in itertools.product(gemv_threads, (False, True), (False, True)):
            s = {"GEMV_THREADS_PER_SM": threads, "GEMV_PREFETCH": prefetch, "GEMV_HALF2": half2}
            if any(getattr(w4a16, k) != v for k, v in s.items()):
                out.append(s)
        # the loads of x, scales and zero points made where they are used, at the default split
        for prefetch, half2 in itertools.product((False, True), (False, True)):
            s = {"GEMV_DIRECT_LOADS": not w4a16.GEMV_DIRECT_LOADS, "GEMV_PREFETCH": prefetch, "GEMV_HALF2": half2}
            out.append(s)
    for pps, trip in itertools.product(programs, trips):
        s = {"DECODE_PROGRAMS_PER_SM": pps, "DECODE_TRIP_WORDS": trip}
        if m == 1:
            s = {"GEMV_MAX_M": 0, **s}  # the tensor-core kernel at M = 1
        elif all(getattr(w4a16, k) == v for k, v in s.items()):
            continue  # the default
        out.append(s)
    if w4a16.DECODE_FRAGMENT is not False:  # the natural order, the bench's w4a16-triton-staged rows
        out.append({"GEMV_MAX_M": 0, "DECODE_FRAGMENT": False} if m == 1 else {"DECODE_FRAGMENT": False})
    return out


def _plan(n: int, k: int, m: int, group_size: int, device: torch.device) -> Dict:
    """The launch plan the current settings make for this call (the kernel, split of K, steps a trip)."""
    from minicpm_int4.kernels import w4a16

    if m <= w4a16.GEMV_MAX_M:
        block_n, block_kw, warps, split, _ = w4a16._gemv_blocks(n, k // 8, device)
        return {"kernel": "gemv", "block_n": block_n, "block_kw": block_kw, "warps": warps, "split_k": split}
    block_n, block_kw, steps, split = w4a16._decode_blocks(n, k, group_size, device)
    return {"kernel": "decode", "block_n": block_n, "block_kw": block_kw, "steps": steps, "split_k": split,
            "fragment": w4a16._decode_fragment(device, block_n, block_kw, False, w4a16.DECODE_FRAGMENT)}


def _label(setting: Dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def sweep(shapes: Sequence = DEFAULT_SHAPES, ms: Sequence[int] = (1, 4, 16), device: Optional[str] = None,
          rep_ms: float = 10, time_budget_s: Optional[float] = None, out: Optional[str] = None,
          gemv_threads=GEMV_THREADS, programs=PROGRAMS_PER_SM, trips=TRIP_WORDS, group_size: int = 128) -> Dict:
    from minicpm_int4.bench.backends import OursW4A16, OursW4A16TritonHalf2
    from minicpm_int4.bench.env import Rotating, copy_bandwidth_gbps, env_info, kernel_time_ms, rotating_copies
    from minicpm_int4.bench.micro import _check

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16
    t0 = time.monotonic()
    bw = copy_bandwidth_gbps(device)
    result = {"kind": "decode_sweep", "env": env_info(device), "copy_bandwidth_gbps": bw,
              "config": {"dtype": "float16", "group_size": group_size, "ms": list(ms), "rep_ms": rep_ms,
                         "shapes": [list(s) for s in shapes]}, "rows": [], "errors": []}
    cases = [(s, m, st) for s in shapes for m in ms for st in settings_for(m, gemv_threads, programs, trips)]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases), desc="decode sweep", unit="case")
    except ImportError:  # progress lines instead
        bar = None
    done = 0
    for n, k in shapes:
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
            result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {n} x {k}"
            print(f"[decode-sweep] {result['incomplete']}", flush=True)
            break
        g = torch.Generator(device=device).manual_seed(n * 31 + k)
        w = (torch.randn(n, k, generator=g, device=device) * 0.02).to(dtype)
        # the bench's own Triton W4A16 row: QuantLinear's call with the layer's workspace, its reference and bound
        ours = OursW4A16("triton")
        first = ours.prepare(w, group_size)
        # the same layer, checked against the packed GEMV's own bound (its M = 1 settings only)
        packed = OursW4A16TritonHalf2().prepare(w, group_size) if 1 in ms else None
        rot = Rotating([first] + [ours.prepare(w, group_size)
                                  for _ in range(rotating_copies(first.weight_bytes, device) - 1)])
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            for setting in settings_for(m, gemv_threads, programs, trips):
                row = {"n": n, "k": k, "m": m, "setting": setting, "label": _label(setting), "default": not setting}
                try:
                    with _settings(**setting):
                        row["plan"] = _plan(n, k, m, group_size, device)
                        # raises outside the derived bound
                        _check(f"w4a16-triton {row['label']}", packed if setting.get("GEMV_HALF2") else first, x)
                        med, p20, p80, how = kernel_time_ms(lambda: rot.next().run(x), device, rep_ms=rep_ms)
                    nbytes = first.weight_bytes + ours.activation_bytes(m, k, n, 2)
                    row.update({"median_ms": med, "p20_ms": p20, "p80_ms": p80, "timing": how, "bytes": nbytes,
                                "gbps": nbytes / (med * 1e-3) / 1e9,
                                "pct_copy_bw": 100 * nbytes / (med * 1e-3) / 1e9 / bw, "check": "ok"})
                    result["rows"].append(row)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one failing setting must not lose the sweep
                    result["errors"].append({**row, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                    print(f"[decode-sweep] {n} x {k} M={m} {row['label']}: {type(e).__name__}: {str(e)[:200]}",
                          flush=True)
                done += 1
                if bar is not None:
                    bar.update(1)
        del first, rot
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if out:
            write(result, out)
    if bar is not None:
        bar.close()
    if out:
        write(result, out)
    return result


def table(result: Dict) -> str:
    """Markdown: per (shape, M), every setting timed, fastest first, with its time over the default's."""
    timings = sorted({r["timing"] for r in result["rows"]})
    how = ("kernel time from a CUDA graph of calls over rotating weight copies" if timings == ["cuda-graph"]
           else f"timing: {', '.join(timings) or '-'} (not GPU kernel time: no speed is implied)")
    lines = [f"## Decode sweep ({result['env'].get('device_name', result['env'].get('device', '?'))})", "",
             f"- copy bandwidth measured: {result['copy_bandwidth_gbps']:.0f} GB/s; fp16, G = "
             f"{result['config']['group_size']}; {how}", f"- commit {result['env'].get('commit')}, torch "
             f"{result['env'].get('torch')}, triton {result['env'].get('triton')}", ""]
    if result.get("incomplete"):
        lines += [f"- **incomplete**: {result['incomplete']}", ""]
    lines += ["| N x K | M | setting | plan | us | GB/s | % copy bw | default's time over this |", "|---|---|---|---|---|---|---|---|"]
    groups: Dict = {}
    for r in result["rows"]:
        groups.setdefault((r["n"], r["k"], r["m"]), []).append(r)
    for (n, k, m), rows in groups.items():
        base = next((r for r in rows if r["default"]), None)
        for r in sorted(rows, key=lambda r: r["median_ms"]):
            plan = " ".join(f"{a}={b}" for a, b in r["plan"].items())
            ratio = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
            lines.append(f"| {n} x {k} | {m} | {'**default**' if r['default'] else r['label']} | {plan} | "
                         f"{r['median_ms'] * 1e3:.2f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.1f}% | {ratio} |")
    for e in result["errors"]:
        lines.append(f"\n- {e['n']} x {e['k']} M={e['m']} {e['label']}: {e['error']}")
    return "\n".join(lines) + "\n"


def write(result: Dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("decode_sweep.json", json.dumps(result, indent=1, default=str)),
                       ("decode_sweep.md", table(result))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="decode_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES), help="NxK,...")
    p.add_argument("--ms", default="1,4,16", help="token counts, each <= 16")
    p.add_argument("--gemv-threads", default=",".join(map(str, GEMV_THREADS)), help="GEMV_THREADS_PER_SM values")
    p.add_argument("--programs", default=",".join(map(str, PROGRAMS_PER_SM)), help="DECODE_PROGRAMS_PER_SM values")
    p.add_argument("--trips", default=",".join(map(str, TRIP_WORDS)), help="DECODE_TRIP_WORDS values (16, 32)")
    p.add_argument("--rep-ms", type=float, default=10)
    p.add_argument("--time-budget-s", type=float, default=None, help="start no new shape past this")
    p.add_argument("--out", default="decode-sweep-out")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
        ms, threads, programs, trips = _ints(a.ms), _ints(a.gemv_threads), _ints(a.programs), _ints(a.trips)
    except ValueError as e:
        p.error(f"comma-separated integers (shapes as NxK): {e}")
    if not shapes or any(len(s) != 2 or s[1] % 128 for s in shapes):
        p.error(f"--shapes {a.shapes!r}: NxK with K a multiple of the group size, 128")
    if not ms or any(not 1 <= m <= 16 for m in ms):
        p.error(f"--ms {a.ms!r}: decode sizes, 1 to 16")
    if any(t not in (16, 32) for t in trips) or any(v < 1 for v in threads + programs):
        p.error("--trips: 16 or 32; --gemv-threads / --programs: positive")
    result = sweep(shapes, ms, a.device, a.rep_ms, a.time_budget_s, a.out, threads, programs, trips)
    print(table(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
