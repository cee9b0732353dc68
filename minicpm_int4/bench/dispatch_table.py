"""A dispatch table from a `minicpm-int4 bench` result: where the CUDA extension or a variant of the Triton
kernels (at M = 1 the tensor-core decode kernel or the GEMV prefetching / unsplit, at 2..16 the decode kernel's
long trip, past M = 16 the weight dequantized and torch's matmul or the prefill tile as x @ W.T) measured faster
than the Triton kernels' defaults, backend="auto" uses it on that GPU; likewise the fastest activation quantizer
per (K, M) and the fastest W4A8 path per (N, K, M) (minicpm_int4/dispatch.py).

    minicpm-int4 bench --out my-bench && minicpm-int4 dispatch-table my-bench/bench.json --out my-table.json
    MINICPM_INT4_DISPATCH_TABLE=my-table.json python ...      (set before minicpm_int4 is imported)

A table that exists at --out gains (or has replaced) this GPU's entry and keeps the others'.
`python benchmarks/make_dispatch_table.py` is the same with --out defaulting to the package's own table
(minicpm_int4/dispatch_table.json, what a GPU session commits).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from ..dispatch import TABLE_ENV, picks, table_from_bench
from .report import write_json


def _read_bench(path: str) -> dict:
    if not os.path.exists(path):
        raise SystemExit(f"dispatch-table: {path}: no such file (a `minicpm-int4 bench --out DIR` run writes DIR/bench.json)")
    with open(path) as f:
        try:
            bench = json.load(f)
        except json.JSONDecodeError as e:
            raise SystemExit(f"dispatch-table: {path} is not JSON ({e})")
    if not isinstance(bench, dict) or "rows" not in bench or "device_name" not in bench.get("env", {}):
        raise SystemExit(f"dispatch-table: {path} is not a `minicpm-int4 bench` result (no rows / env.device_name)")
    if str(bench["env"].get("device", "cuda")).split(":")[0] != "cuda":
        raise SystemExit(f"dispatch-table: {path} was timed on {bench['env']['device']}, not a GPU: a table takes "
                         "CUDA timings only")
    return bench


def main(argv=None, default_out: Optional[str] = None, prog: str = "minicpm-int4 dispatch-table") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("bench_json", help="a bench run's bench.json")
    p.add_argument("--out", default=default_out, required=default_out is None,
                   help="the table to write, or to add this GPU's entry to" +
                        (f" (default: the package's, {default_out})" if default_out else ""))
    args = p.parse_args(argv)
    bench = _read_bench(args.bench_json)
    existing = None
    if os.path.exists(args.out):
        with open(args.out) as f:
            try:
                existing = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"dispatch-table: {args.out} exists and is not a table (not JSON: {e}); "
                                 "name another --out")
        if not isinstance(existing, dict) or not isinstance(existing.get("devices", {}), dict):
            raise SystemExit(f"dispatch-table: {args.out} exists and is not a dispatch table; name another --out")
    table = table_from_bench(bench, existing)
    write_json(table, args.out)  # beside, then renamed into place
    name = bench["env"]["device_name"]
    entry = table["devices"][name]
    won = {op: ", ".join(f"{b} {n}" for b, n in counts.items() if b != "triton") or "none"
           for op, counts in picks(entry).items()}
    print(f"{args.out}: on {name}, (N, K, M) cases where a candidate other than the Triton kernels' defaults is "
          f"fastest: {won['w4a16']} (of {len(entry['w4a16'])} entries); the activation quantizer timed at "
          f"{len(entry['act_quant'])} (K, M), another than Triton's default fastest: {won['act_quant']}; W4A8 "
          f"(quantizer + GEMM) timed beside Triton's at {len(entry['w4a8'])} (N, K, M), another path fastest: "
          f"{won['w4a8']}")
    if default_out is None or os.path.abspath(args.out) != os.path.abspath(default_out):
        print(f"backend='auto' reads it where {TABLE_ENV}={os.path.abspath(args.out)} is set before minicpm_int4 "
              "is imported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
