"""`minicpm-int4 env`: what this install can run and why not, for bug reports and the GPU suite's log.

Versions (minicpm_int4, torch + its CUDA, triton, transformers, the peers), the devices, each
backend's availability with the reason when it is missing (Triton kernels, the Triton interpreter,
the compiled extension `minicpm_int4._C`, nvcc for building it), the measured dispatch table,
which backend `backend="auto"` picks for a few decode and prefill shapes on this machine, and
whether transformers' from_pretrained / save_pretrained handle int4 models here.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

import torch

from . import __version__, ops
from .bench.env import env_info, model_kernels_ran_on
from .dispatch import borrowed_from

# (M, N, K) that "auto" is asked about: decode M = 1 and 16, prefill, on a 4096 x 4096 layer
PROBE_SHAPES = ((1, 4096, 4096), (16, 4096, 4096), (4096, 4096, 4096))
# (M, K) of the activation quantizer: a prefill batch into a 4096-wide layer and into Llama-3's down_proj
ACT_QUANT_PROBES = ((4096, 4096), (4096, 14336))


def _backends() -> Dict:
    kernels, triton_why = ops._triton_kernels()
    interp = bool(kernels is not None and kernels.INTERPRET)
    ext, ext_why = ops._cuda_ext()
    ext_ops: List[str] = []
    w4a8_kernel = w4a16_prefill = None
    if ext is not None:
        ext_ops = sorted(n for n in ("w4a16_gemm", "quantize_per_token_int8", "w4a8_gemm") if hasattr(ext, n))
        if torch.cuda.is_available():
            try:  # which W4A8 GEMM the launcher takes on this GPU (csrc/bindings.cpp)
                from . import _C

                w4a8_kernel = _C.w4a8_kernel()
            except (ImportError, AttributeError, RuntimeError) as e:
                w4a8_kernel = f"unknown ({e})"
            try:  # what its W4A16 launcher runs past M = 16 (the wgmma prefill GEMM on an H100 / H200)
                from . import _C

                w4a16_prefill = _C.w4a16_prefill_kernel()
            except (ImportError, AttributeError, RuntimeError) as e:
                w4a16_prefill = f"unknown ({e})"
    return {
        "torch": {"available": True, "what": "reference.py (the CPU path and the specification)"},
        "triton": {"available": kernels is not None, "reason": triton_why, "interpreter": interp,
                   "interpreter_problem": kernels.interpreter_problem() if interp else None,
                   "launch": _triton_launch(kernels, interp)},
        "cuda": {"available": ext is not None, "reason": ext_why, "ops": ext_ops, "w4a8_kernel": w4a8_kernel,
                 "w4a16_prefill_kernel": w4a16_prefill,
                 "nvcc": shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                                  if os.environ.get("CUDA_HOME") else None),
                 "torch_cuda_build": torch.version.cuda},
    }


def _triton_launch(kernels, interp: bool) -> Optional[str]:
    """How the compiled Triton kernels are launched (kernels/_launch.py): directly on a repeated
    specialisation, or through Triton's own launch and why."""
    if kernels is None or interp:
        return None
    from .kernels import _launch

    if not _launch.ENABLED:
        how = "Triton's own launch (MINICPM_INT4_FAST_LAUNCH=0)"
    elif not _launch._SUPPORTED:
        how = f"Triton's own launch (the direct one needs triton >= 3.4, this is {_launch.triton.__version__})"
    else:
        how = "a repeated specialisation directly into its launcher (MINICPM_INT4_FAST_LAUNCH=0: Triton's own)"
    from .kernels import _common

    if not _common.AUTOTUNE_CACHE:
        tuned = "autotuning timed in each process (MINICPM_INT4_AUTOTUNE_CACHE=0)"
    elif not _common.autotune_cache_supported():
        tuned = "autotuning timed in each process (its on-disk cache needs triton >= 3.4)"
    else:
        tuned = "autotuning results cached on disk (MINICPM_INT4_AUTOTUNE_CACHE=0: timed in each process)"
    return f"{how}; {tuned}"


def _auto_picks(device: torch.device) -> List[Dict]:
    probes = [("w4a16_gemm", dict(m=m, n=n, k=k)) for m, n, k in PROBE_SHAPES]
    probes += [("quantize_per_token_int8", dict(m=m, k=k)) for m, k in ACT_QUANT_PROBES]
    probes += [("w4a8_gemm", dict(m=m, n=n, k=k, group_size=128)) for m, n, k in PROBE_SHAPES[2:]]
    picks = []
    for op, shape in probes:
        try:
            be = ops.resolve_backend("auto", device, op, shape=tuple(shape.values()) or None)
        except Exception as e:  # report, do not fail: this command is what users run when things fail
            be = f"error: {type(e).__name__}: {e}"
        picks.append({"op": op, **shape, "backend": be})
    return picks


def _dispatch_table(device: torch.device) -> Dict:
    from .dispatch import _device_identity, describe

    if device.type != "cuda":
        return describe()
    return describe(*_device_identity(torch.cuda.current_device() if device.index is None else device.index))


def collect(device: Optional[str] = None) -> Dict:
    """Everything `minicpm-int4 env` prints, as a dict (JSON-serialisable)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = env_info(dev)
    info.pop("timestamp_utc", None)
    info["minicpm_int4"] = __version__
    info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    info["backends"] = _backends()
    info["auto"] = _auto_picks(dev)
    info["dispatch_table"] = _dispatch_table(dev)
    info["transformers_integration"] = _transformers_integration()
    return info


def _transformers_integration() -> Dict:
    """Whether from_pretrained / save_pretrained handle int4 models here (hf_integration.py)."""
    import importlib.util

    from .hf_integration import QUANT_METHOD, register
    from .models import transformers_major

    try:
        why = register()
    except Exception as e:  # report, do not fail
        why = f"{type(e).__name__}: {e}"
    out = {"quant_method": QUANT_METHOD, "registered": why is None, "reason": why}
    if why is None and transformers_major() < 5 and importlib.util.find_spec("accelerate") is None:
        import transformers  # registered: it is installed

        out["reason"] = f"from_pretrained under transformers {transformers.__version__} also needs accelerate (not installed)"
    return out


def format_report(info: Dict) -> str:
    b = info["backends"]
    lines = [
        f"minicpm_int4 {info['minicpm_int4']} (commit {info['commit']})",
        f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda'] or 'none: a CPU build'}), "
        f"triton {info['triton']}, transformers {info['transformers']}",
        "peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in info["peers"].items()),
        "MiniCPM-V 4.6's linear attention (transformers' Qwen3.5 layers) on a GPU runs on: " + ", ".join(model_kernels_ran_on(info)),
        f"device: {info['device']} ({info['device_name']})"
        + (f", sm_{info['capability'].replace('.', '')}, {info['sm_count']} SMs, "
           f"{info['total_memory_bytes'] / 2**30:.0f} GiB" if "capability" in info else ""),
    ]
    if len(info["cuda_devices"]) > 1:
        lines.append(f"CUDA devices: {', '.join(info['cuda_devices'])}")
    t = b["triton"]
    if not t["available"]:
        lines.append(f"backend triton: unavailable - {t['reason']}")
    elif t["interpreter"]:
        lines.append("backend triton: the interpreter (TRITON_INTERPRET=1: CPU tensors, slow but exact)"
                     + (f" - cannot run here: {t['interpreter_problem']}" if t["interpreter_problem"] else ""))
    else:
        lines.append("backend triton: compiled kernels" + ("" if info["device"].startswith("cuda")
                                                             else " (need CUDA tensors; none here)"))
        if t.get("launch"):
            lines.append(f"  launched: {t['launch']}")
    c = b["cuda"]
    if c["available"]:
        lines.append(f"backend cuda: minicpm_int4._C loaded ({', '.join(c['ops'])})")
        if c.get("w4a8_kernel"):
            lines.append(f"  W4A8 GEMM on this GPU: {c['w4a8_kernel']}")
        if c.get("w4a16_prefill_kernel"):
            lines.append(f"  W4A16 past 16 rows (backend='cuda') on this GPU: {c['w4a16_prefill_kernel']}")
    else:
        lines.append(f"backend cuda: unavailable - {c['reason']}")
        lines.append(f"  to build it: nvcc {c['nvcc'] or 'not found'}, torch CUDA build "
                     f"{c['torch_cuda_build'] or 'no (CPU torch)'}")
    lines.append("backend='auto' on " + info["device"] + ":")
    for p in info["auto"]:
        shape = " " + " ".join(f"{d.upper()}={p[d]}" for d in ("m", "n", "k", "group_size") if d in p) if "m" in p else ""
        lines.append(f"  {p['op']}{shape}: {p['backend']}")
    d = info["dispatch_table"]
    if d["devices"]:
        table = f"{len(d['devices'])} GPU(s) measured: {', '.join(d['devices'])}"
    elif d.get("from_env"):
        table = "no GPU measured in it (auto uses the Triton kernels everywhere on CUDA)"
    else:
        table = "none committed (auto uses the Triton kernels everywhere on CUDA)"
    if d.get("from_env"):
        table += f" (MINICPM_INT4_DISPATCH_TABLE={d['path']}{'' if d.get('exists') else ', no such file'})"
    lines.append(f"dispatch table: {table}")
    if "this_device" in d:
        aq, w8 = d.get("this_device_act_quant_entries"), d.get("this_device_w4a8_entries")
        lines.append(f"  {d['this_device']}: {d['this_device_rules']} measured rule(s)" + borrowed_from(d)
                     + (f", the activation quantizer timed at {aq} (K, M)" if aq else "")
                     + (f", W4A8 at {w8} (N, K, M)" if w8 else ""))
        for op, picks in (d.get("this_device_picks") or {}).items():
            if picks:
                lines.append(f"    {op} entries won by: " + ", ".join(f"{b} {n}" for b, n in picks.items()))
        if d.get("this_device_entry") or not d["this_device_rules"]:  # no measurements of this GPU's own
            lines.append("    to measure this GPU's own: minicpm-int4 bench --out b && minicpm-int4 dispatch-table "
                         "b/bench.json --out t.json, then MINICPM_INT4_DISPATCH_TABLE=t.json")
    h = info.get("transformers_integration")
    if h:
        state = f"quantization method {h['quant_method']!r} registered" if h["registered"] else "unavailable"
        lines.append(f"transformers from_pretrained / save_pretrained: {state}" + (f" - {h['reason']}" if h["reason"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="minicpm-int4 env", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")
    args = p.parse_args(argv)
    info = collect(args.device)
    print(format_report(info))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0
