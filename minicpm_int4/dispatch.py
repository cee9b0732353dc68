"""The measured rule behind backend="auto" on CUDA for W4A16: which of the Triton kernel and the
CUDA extension is faster for a layer shape and M, per GPU model, read from benchmark results.

`minicpm_int4/dispatch_table.json` (package data) is written by
`python benchmarks/make_dispatch_table.py benchmarks/results/<gpu>/bench.json` from a `bench` run:
an entry says the CUDA kernel was faster than Triton for that (N, K) at that M on that GPU. Absent
an entry (another GPU, an unmeasured shape, M beyond the CUDA kernel's range) "auto" means Triton:
nothing is guessed.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
CUDA_MAX_M = 16


def m_bucket(m: int) -> int:
    """Decode M is measured at 1, 2, 4, 8, 16: a query uses the next measured M at or above it."""
    b = 1
    while b < m:
        b *= 2
    return b


@functools.lru_cache(maxsize=None)
def load_table(path: str = TABLE_PATH) -> Dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def _rules_for(device_name: str, table: Dict) -> Dict:
    entry = table.get("devices", {}).get(device_name)
    if not entry:
        return {}
    return {(r["n"], r["k"], r["m"]): r["backend"] for r in entry["w4a16"]}


@functools.lru_cache(maxsize=None)
def _cached_rules(device_name: str, path: str) -> Dict:
    return _rules_for(device_name, load_table(path))


def w4a16_auto_backend(m: int, n: int, k: int, device_index: int, cuda_available: bool,
                       path: str = TABLE_PATH, device_name: Optional[str] = None) -> str:
    """"cuda" where the table says the extension measured faster for this GPU, (N, K) and M; else "triton"."""
    if not cuda_available or m > CUDA_MAX_M:
        return "triton"
    rules = _cached_rules(device_name or _device_name(device_index), path)
    return rules.get((n, k, m_bucket(m)), "triton")


def table_from_bench(bench: Dict, existing: Optional[Dict] = None) -> Dict:
    """Add one GPU's measurements to a dispatch table: CUDA wins where its median beats Triton's."""
    rows = bench["rows"]
    med = {(r["n"], r["k"], r["m"], r["backend"]): r["median_ms"] for r in rows if r.get("check") == "ok"}
    rules = []
    for (n, k, m, b), t in sorted(med.items()):
        if b != "w4a16-cuda" or m > CUDA_MAX_M:
            continue
        tri = med.get((n, k, m, "w4a16-triton"))
        if tri is not None and t < tri:
            rules.append({"n": n, "k": k, "m": m, "backend": "cuda", "cuda_ms": t, "triton_ms": tri})
    table = dict(existing or {})
    devices = dict(table.get("devices", {}))
    env = bench["env"]
    devices[env["device_name"]] = {"commit": env.get("commit"), "timestamp_utc": env.get("timestamp_utc"),
                                   "torch": env.get("torch"), "triton": env.get("triton"), "w4a16": rules}
    table["devices"] = devices
    return table
