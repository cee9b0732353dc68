"""Regenerate README.md's performance section from benchmarks/results/<gpu>/{bench,profile}.json."""
import os
import sys

from minicpm_int4.bench.readme import update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    changed = update_readme(os.path.join(ROOT, "README.md"), os.path.join(ROOT, "benchmarks", "results"))
    print("README.md updated" if changed else "README.md already up to date")
    sys.exit(0)
