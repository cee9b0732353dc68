"""Write minicpm_int4/dispatch_table.json from a `minicpm-int4 bench` result: where the CUDA
extension, or at M = 1 the Triton tensor-core decode kernel, measured faster than the Triton
kernels' default, backend="auto" will use it on that GPU (minicpm_int4/dispatch.py).

    python benchmarks/make_dispatch_table.py benchmarks/results/<gpu>/bench.json
"""
import json
import sys

from minicpm_int4.dispatch import TABLE_PATH, load_table, table_from_bench

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        bench = json.load(f)
    table = table_from_bench(bench, load_table())
    with open(TABLE_PATH, "w") as f:
        json.dump(table, f, indent=1)
    name = bench["env"]["device_name"]
    rules = table["devices"][name]["w4a16"]
    wins = {b: sum(r["backend"] == b for r in rules) for b in ("cuda", "triton-tc")}
    print(f"{TABLE_PATH}: on {name}, (N, K, M) cases where the CUDA kernel wins: {wins['cuda']}; "
          f"where M = 1 is faster on the Triton tensor-core kernel than on the GEMV: {wins['triton-tc']}")
