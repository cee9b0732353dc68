"""A GPU suite's output folder -> benchmarks/results/<gpu>/, README.md, the dispatch table and
targets.md, in one step (minicpm_int4/bench/ingest.py).

    python benchmarks/ingest_gpu_results.py <the device tool's files_at folder>
"""
import sys

from minicpm_int4.bench.ingest import main

if __name__ == "__main__":
    sys.exit(main())
