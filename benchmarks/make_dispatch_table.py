"""Write minicpm_int4/dispatch_table.json from a `minicpm-int4 bench` result: where the CUDA
extension (or a variant of it) or one of the Triton kernels' variants (at M = 1 the
tensor-core decode kernel or the GEMV prefetching / unsplit, at 2..16 the decode kernel's long trip, past
M = 16 the weight dequantized and torch's matmul or the prefill tile as x @ W.T) measured faster than the
Triton kernels' defaults, backend="auto" will use it on that GPU; and the faster of the two activation
quantizers per (K, M) and the fastest W4A8 path per (N, K, M) - Triton's or the CUDA one, or a variant of
either (minicpm_int4/dispatch.py).

    python benchmarks/make_dispatch_table.py benchmarks/results/<gpu>/bench.json [--out PATH]

--out writes (or adds this GPU to) another table instead of the package's: the GPU suite writes one
from its own bench and points MINICPM_INT4_DISPATCH_TABLE at it for the profile that follows. The same
as `minicpm-int4 dispatch-table` (minicpm_int4/bench/dispatch_table.py), whose --out has no default.
"""
from minicpm_int4.bench.dispatch_table import main
from minicpm_int4.dispatch import PACKAGE_TABLE_PATH

if __name__ == "__main__":
    raise SystemExit(main(default_out=PACKAGE_TABLE_PATH, prog="make_dispatch_table.py"))
