"""Write minicpm_int4/dispatch_table.json from a `minicpm-int4 bench` result: where the CUDA
extension (or its shared-memory ring variant) or one of the Triton kernels' variants (at M = 1 the
tensor-core decode kernel or the GEMV prefetching / unsplit, at 2..16 the decode kernel's long trip, past
M = 16 the weight dequantized and torch's matmul or the prefill tile as x @ W.T) measured faster than the
Triton kernels' defaults, backend="auto" will use it on that GPU; and the faster of the two activation
quantizers per (K, M) and the fastest W4A8 path per (N, K, M) - Triton's or the CUDA one, or a variant of
either (minicpm_int4/dispatch.py).

    python benchmarks/make_dispatch_table.py benchmarks/results/<gpu>/bench.json [--out PATH]

--out writes (or adds this GPU to) another table instead of the package's: the GPU suite writes one
from its own bench and points MINICPM_INT4_DISPATCH_TABLE at it for the profile that follows.
"""
import argparse
import json
from collections import Counter

from minicpm_int4.dispatch import CUDA_CANDIDATES, PACKAGE_TABLE_PATH, TRITON_CANDIDATES, load_table, table_from_bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json")
    p.add_argument("--out", default=PACKAGE_TABLE_PATH, help="the table to write (default: the package's)")
    args = p.parse_args(argv)
    with open(args.bench_json) as f:
        bench = json.load(f)
    table = table_from_bench(bench, load_table(args.out))
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    name = bench["env"]["device_name"]
    rules = table["devices"][name]["w4a16"]
    wins = {b: sum(r["backend"] == b for r in rules) for b in (*CUDA_CANDIDATES, *TRITON_CANDIDATES)}
    aq = table["devices"][name].get("act_quant", [])
    w8 = table["devices"][name].get("w4a8", [])
    print(f"{args.out}: on {name}, (N, K, M) cases where a candidate other than the Triton kernels' defaults is "
          f"fastest: " + (", ".join(f"{b} {w}" for b, w in wins.items() if w) or "none") + f" (of {len(rules)} "
          f"entries); the activation quantizer timed at {len(aq)} (K, M), another than Triton's default fastest at "
          f"{sum(e['backend'] != 'triton' for e in aq)}"
          + "".join(f", {b} {n}" for b, n in sorted(Counter(e['backend'] for e in aq if e['backend'] != 'triton').items()))
          + f"; W4A8 (quantizer + GEMM) timed beside Triton's at {len(w8)} (N, K, M), "
          f"another path fastest at {sum(e['backend'] != 'triton' for e in w8)}"
          + "".join(f", {b} {n}" for b, n in sorted(Counter(e['backend'] for e in w8 if e['backend'] != 'triton').items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
