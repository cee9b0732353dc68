"""Write minicpm_int4/dispatch_table.json from a `minicpm-int4 bench` result: where the CUDA
extension measured faster than the Triton kernel, backend="auto" will use it on that GPU.

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
    print(f"{TABLE_PATH}: {len(table['devices'][name]['w4a16'])} (N, K, M) cases where the CUDA kernel wins on {name}")
