"""Host time of each Triton launch site of the package, through Triton's own launch and through the
package's direct launch of a repeated specialisation (kernels/_launch.py), measured without a GPU:
results/cpu/triton_launch_cost.{json,md}.

    python benchmarks/triton_launch_cost.py [--out benchmarks/results/cpu] [--calls 2000] [--name STEM]

The kernels are compiled for sm_90 and launched into a stand-in driver that records the launch
(kernels/launch_check.py): what is timed is the host's share of a call up to Triton's launcher - checks,
planning, allocations, binding and lookup - which both ways pay the same outside the launch; the C
launcher's own cost (the same both ways) is not in it. On a GPU the bench's `host_us` and
`host_us_triton_launch` rows time the same calls with the real launcher. Run it on an otherwise idle
machine; the table names the CPU and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(calls: int, python: str = sys.executable) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINICPM_INT4_FAST_LAUNCH")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([python, "-m", "minicpm_int4.kernels.launch_check", "--check", "--cost", "--calls", str(calls)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"launch_check wrote no report (rc {proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(lines[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"launch_check found launches that differ from Triton's: {lines[-1][:2000]}")
    return report


def markdown(summary: dict) -> str:
    e = summary["env"]
    lines = [f"# Host time of a Triton launch site ({e['device_name']})", "",
             f"commit {e['commit']}, {e['timestamp_utc']}, python {e['python']}, torch {e['torch']}, "
             f"triton {summary['triton']}; kernels compiled for sm_{summary['capability']}, launched into a "
             "stand-in driver that records the launch (the C launcher itself is not timed)", "",
             "Each row is one call of the site's host function (its checks, launch plan, allocations and "
             "Triton launch), median over interleaved blocks. `Triton` binds and specialises every argument "
             "per call (an autotuned kernel also builds the autotuner's key); `direct` is the package's "
             "launch of a specialisation seen before (kernels/_launch.py), which the same run checked hands "
             "the launcher the same compiled kernel and arguments as Triton.", "",
             "| launch site | Triton (us) | direct (us) | saved (us) |", "|---|---:|---:|---:|"]
    for site, r in summary["host_us"].items():
        lines.append(f"| {site} | {r['triton_us']:.1f} | {r['fast_us']:.1f} | {r['triton_us'] - r['fast_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu"))
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--name", default="triton_launch_cost", help="file name stem (e.g. triton_launch_cost_triton3.6 "
                   "for the GPU image's triton)")
    args = p.parse_args(argv)
    report = measure(args.calls)
    if not report.get("supported"):
        print(f"triton_launch_cost: the direct launch is off on triton {report.get('triton')}; nothing written",
              file=sys.stderr)
        return 1
    import torch

    from minicpm_int4.bench.env import env_info

    env = env_info(torch.device("cpu"))
    try:  # the CPU's name (platform.processor() is empty on Linux)
        with open("/proc/cpuinfo") as f:
            env["device_name"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    summary = {"env": env, "triton": report["triton"], "capability": report["capability"],
               "host_us": report["host_us"], "checked_sites": [s["site"] for s in report["sites"]]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
