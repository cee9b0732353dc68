"""Take a GPU suite's output folder (run_gpu_suite.sh's 8 files) into the repository in one step:
copy it to benchmarks/results/<gpu>/, regenerate README.md's performance section, the dispatch
table (minicpm_int4/dispatch_table.json) and <gpu>/targets.md, and say what was done and what is
missing, so that a GPU session's few minutes end in a commit rather than in hand-copying.

    python benchmarks/ingest_gpu_results.py /work/.device/<...>/files   (the device tool's files_at)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional

SUITE_FILES = ("suite.log", "bench.json", "bench.md", "speedup_vs_m.png", "bandwidth.png",
               "profile.json", "profile.md", "e2e.png")
# written by a call's extra stage when it ran benchmarks/decode_sweep.py (its launch settings), and by the opt-in
# counters stage (benchmarks/ncu_counters.py: Nsight Compute's hardware counters): copied where present
OPTIONAL_FILES = ("decode_sweep.json", "decode_sweep.md", "counters.json", "counters.md")


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the folder name under benchmarks/results/)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a folder name from the device name {name!r}")
    return slug


def _load(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ingest(src: str, root: str, dispatch_table: Optional[str] = None) -> Dict:
    """Copy `src`'s suite files into `root`/benchmarks/results/<gpu>/ and regenerate what is derived
    from them. `dispatch_table`: where to write the table (default: `root`'s package). Returns a
    report: the folder, the files copied, the files missing, warnings, and the targets table."""
    from ..dispatch import table_from_bench
    from .readme import update_readme
    from .targets import targets_markdown

    bench = _load(os.path.join(src, "bench.json"))
    profile = _load(os.path.join(src, "profile.json"))
    if bench is None and profile is None:
        raise FileNotFoundError(f"{src} has neither bench.json nor profile.json: not a GPU suite's output")
    env = (bench or profile)["env"]
    device = env.get("device_name")
    if not device or str(env.get("device", "")).startswith("cpu"):
        raise ValueError(f"{src}: the results were not measured on a GPU (device {device!r}); "
                         "only GPU results go to benchmarks/results/")
    slug = device_slug(device)
    dest = os.path.join(root, "benchmarks", "results", slug)
    os.makedirs(dest, exist_ok=True)
    copied = [f for f in SUITE_FILES + OPTIONAL_FILES if os.path.exists(os.path.join(src, f))]
    for f in copied:
        # a profile-only call (SUITE_STAGES=install,profile, after a call that ran the bench) keeps the bench
        # call's suite.log: its own goes beside it
        to = "suite.profile.log" if f == "suite.log" and bench is None and os.path.exists(os.path.join(dest, f)) else f
        shutil.copyfile(os.path.join(src, f), os.path.join(dest, to))
    report = {"folder": dest, "device": device, "copied": copied,
              "missing": [f for f in SUITE_FILES if f not in copied], "warnings": []}
    if "counters.md" in copied:  # the hardware counters' table, printed with the targets for the closing note
        with open(os.path.join(src, "counters.md")) as f:
            report["counters"] = f.read()
    for name, res in (("bench", bench), ("profile", profile)):
        if res is not None and res.get("incomplete"):
            report["warnings"].append(f"{name}.json is marked incomplete: {res['incomplete']}")
        if res is not None and res.get("env", {}).get("commit") != env.get("commit"):
            report["warnings"].append(f"{name}.json comes from another commit ({res['env'].get('commit')})")
    for e in (bench or {}).get("errors", []):
        report["warnings"].append(f"bench error: {e['backend']} on {e['n']} x {e['k']}: {e['error'][:200]}")
    for r in (profile or {}).get("runs", []):
        if r.get("error"):
            report["warnings"].append(f"profile error: {r['model']} {r['weights']} {r['mode']}: {r['error'][:200]}")
    report["readme_changed"] = update_readme(os.path.join(root, "README.md"), os.path.join(root, "benchmarks", "results"))
    if bench is None:  # a profile-only call: targets.md re-made with the bench already in the folder
        bench = _load(os.path.join(dest, "bench.json"))
        if bench is not None and bench.get("rows"):
            md = targets_markdown(bench, profile)
            with open(os.path.join(dest, "targets.md"), "w") as f:
                f.write(md)
            report["targets"] = md
        return report
    if profile is None:  # a bench-only call (e.g. after a profile-only one): targets.md keeps the folder's profile
        profile = _load(os.path.join(dest, "profile.json"))
        if profile is not None:
            report["warnings"].append("targets.md's end-to-end rows come from the profile.json already in "
                                      f"{dest} (commit {profile.get('env', {}).get('commit')})")
    if bench.get("rows"):
        path = dispatch_table or os.path.join(root, "minicpm_int4", "dispatch_table.json")
        table = table_from_bench(bench, _load(path))  # other GPUs' entries are kept
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
        report["dispatch_table"] = path
        md = targets_markdown(bench, profile)
        with open(os.path.join(dest, "targets.md"), "w") as f:
            f.write(md)
        report["targets"] = md
    return report


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="ingest_gpu_results", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the GPU suite's output folder (the device tool's files_at)")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                   help="the repository root (default: this checkout)")
    args = p.parse_args(argv)
    rep = ingest(args.src, args.root)
    print(f"{rep['device']}: copied {', '.join(rep['copied'])} to {rep['folder']}")
    if rep["missing"]:
        print(f"not in {args.src}: {', '.join(rep['missing'])}")
    for w in rep["warnings"]:
        print(f"warning: {w}")
    print("README.md performance section " + ("regenerated" if rep["readme_changed"] else "unchanged"))
    if rep.get("dispatch_table"):
        print(f"dispatch table written: {rep['dispatch_table']}")
    if rep.get("targets"):
        print(rep["targets"])
    if rep.get("counters"):
        print(rep["counters"])
    table = " minicpm_int4/dispatch_table.json" if rep.get("dispatch_table") else ""
    print(f"next: git add {os.path.relpath(rep['folder'], args.root)} README.md{table} && git commit "
          "(quote the targets table in the closing notes)")
    return 0
