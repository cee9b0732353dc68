"""The CPU-side costs tests/test_cpu_costs.py times with pytest-benchmark, run and committed so that
they are tracked from one change to the next: results/cpu/cpu_costs.{json,md}.

    python benchmarks/cpu_costs.py [--out benchmarks/results/cpu]

Host costs, not GPU timings: the QuantLinear call through the reference backend, patch_model on a
tiny model, and the host path of a Triton decode call (checks, dispatch, launch plan) with the kernel
launch replaced by a counter. Run it on an otherwise idle machine; the table names the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def summarize(raw: Dict, env: Dict) -> Dict:
    """pytest-benchmark's JSON -> the figures worth keeping (microseconds), with `env` (bench.env.env_info:
    device, versions, commit, time) naming the CPU pytest-benchmark saw."""
    rows: List[Dict] = []
    for b in raw["benchmarks"]:
        st = b["stats"]
        rows.append({"test": b["name"], "median_us": st["median"] * 1e6, "iqr_us": st["iqr"] * 1e6,
                     "min_us": st["min"] * 1e6, "rounds": st["rounds"]})
    brand = raw.get("machine_info", {}).get("cpu", {}).get("brand_raw")
    env = dict(env, device_name=brand or env.get("device_name"))
    return {"env": env, "rows": rows}


def markdown(summary: Dict) -> str:
    e = summary["env"]
    lines = [f"# CPU-side costs ({e['device_name']})", "",
             f"commit {e['commit']}, {e['timestamp_utc']}, python {e['python']}, torch {e['torch']}, "
             f"triton {e['triton']}", "",
             "| test | median (us) | IQR (us) | min (us) | rounds |", "|---|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['test']} | {r['median_us']:.1f} | {r['iqr_us']:.1f} | {r['min_us']:.1f} | {r['rounds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = os.path.join(tmp, "raw.json")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_costs.py",
               "--benchmark-enable", f"--benchmark-json={raw_path}"]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            print(f"cpu_costs: pytest exited {rc}; nothing written", file=sys.stderr)
            return rc
        with open(raw_path) as f:
            raw = json.load(f)
    import torch

    from minicpm_int4.bench.env import env_info

    summary = summarize(raw, env_info(torch.device("cpu")))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_costs.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "cpu_costs.md"), "w") as f:
        f.write(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
