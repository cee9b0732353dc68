"""Hardware counters (Nsight Compute) of the decode and prefill kernels the bench times: DRAM / L2 / SM
throughput, occupancy and what limits it, issue-slot use, the largest warp stalls - why each kernel runs at
the speed the bench measured (minicpm_int4/bench/counters.py). On a GPU machine with ncu, after the package
is installed (the GPU suite's `counters` stage, named in SUITE_STAGES):

    python benchmarks/ncu_counters.py --out DIR [--time-budget-s 60] [--cases N:K:M:backend,...]

Writes DIR/counters.json and DIR/counters.md, which ingest_gpu_results.py copies where present.
"""
import sys

from minicpm_int4.bench.counters import main

if __name__ == "__main__":
    sys.exit(main())
