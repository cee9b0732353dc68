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

from minicpm_int4.dispatch import PACKAGE_TABLE_PATH, load_table, picks, table_from_bench


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
    entry = table["devices"][name]
    won = {op: ", ".join(f"{b} {n}" for b, n in counts.items() if b != "triton") or "none"
           for op, counts in picks(entry).items()}
    print(f"{args.out}: on {name}, (N, K, M) cases where a candidate other than the Triton kernels' defaults is "
          f"fastest: {won['w4a16']} (of {len(entry['w4a16'])} entries); the activation quantizer timed at "
          f"{len(entry['act_quant'])} (K, M), another than Triton's default fastest: {won['act_quant']}; W4A8 "
          f"(quantizer + GEMM) timed beside Triton's at {len(entry['w4a8'])} (N, K, M), another path fastest: "
          f"{won['w4a8']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
