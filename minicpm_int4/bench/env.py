"""Where a measurement was taken (device, versions, commit) and how time and bandwidth are measured."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except Exception:
        return os.environ.get("MINICPM_INT4_COMMIT", "unknown")


def env_info(device: torch.device) -> Dict:
    """Device name, versions, commit and time: carried by every result file."""
    import transformers

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": os.environ.get("MINICPM_INT4_COMMIT") or git_commit(),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["peers"] = peer_versions()
    info["model_kernels"] = peer_versions(MODEL_KERNEL_PACKAGES)
    unusable = model_kernels_unusable(info["model_kernels"])
    if unusable:
        info["model_kernels_unusable"] = unusable
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    total_memory_bytes=p.total_memory, l2_cache_bytes=getattr(p, "L2_cache_size", None))
        from ..dispatch import describe

        info["dispatch_table"] = describe(info["device_name"], info["capability"], info["sm_count"])  # what backend="auto" ran on
    return info


PEER_PACKAGES = ("bitsandbytes", "gemlite")
# What transformers runs MiniCPM-V 4.6's LLM with where installed: its Qwen3.5 linear-attention layers take the
# gated delta rule from flash-linear-attention's fla (fla-core) and their short convolution from causal-conv1d,
# else a reference PyTorch implementation ("correct but much slower", transformers warns): the same for fp16 and
# int4, so it adds to both sides of an end-to-end comparison. Recorded so that the profile's numbers are read
# with it.
MODEL_KERNEL_PACKAGES = ("fla-core", "causal-conv1d")
# The module transformers imports for each (its hub_kernels' use_kernel_func_from_hub_with_fallback: the gated delta
# rule from fla.ops.gated_delta_rule, causal_conv1d_fn / _update from causal_conv1d); where that import fails,
# transformers takes its PyTorch path even though the package is installed
MODEL_KERNEL_MODULES = {"fla-core": "fla.ops.gated_delta_rule", "causal-conv1d": "causal_conv1d"}


def model_kernels_ran_on(env: Dict) -> list:
    """What MiniCPM-V 4.6's linear-attention layers run on in transformers with the install `env` (env_info)
    records, a phrase per package: its version, or the PyTorch path in its place and why."""
    unusable = env.get("model_kernels_unusable") or {}
    out = []
    for name, version in (env.get("model_kernels") or {}).items():
        if not version:
            out.append(f"PyTorch in place of {name} (not installed)")
        elif name in unusable:
            out.append(f"PyTorch in place of {name} ({version} installed, its import failed: {unusable[name]})")
        else:
            out.append(f"{name} {version}")
    return out


def model_kernels_unusable(versions: Dict) -> Dict:
    """{package: why} for each installed model-kernel package whose module does not import here (its installed
    version alone would claim the model ran on it)."""
    import importlib

    out = {}
    for name, version in versions.items():
        if not version or name not in MODEL_KERNEL_MODULES:
            continue
        try:
            importlib.import_module(MODEL_KERNEL_MODULES[name])
        except Exception as e:  # noqa: BLE001 (any failure makes transformers fall back)
            out[name] = f"{type(e).__name__}: {e}"[:300]
    return out


def peer_versions(packages=PEER_PACKAGES) -> Dict:
    """Installed versions of the peer libraries the bench compares with, or of other `packages` (None where
    absent), read from their metadata: importing gemlite needs a GPU."""
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (results/<gpu>/)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            quantiles: Sequence[float] = QUANTILES):
    """Median and quantiles (ms) of fn(). CUDA: triton.testing.do_bench (flushes L2 between runs).
    CPU: perf_counter over repeated calls (used by the harness tests, not for reported figures)."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(quantiles)))
    fn()
    samples, t_end = [], time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < t_end or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else samples * 99
    return tuple(statistics.median(samples) if q == 0.5 else qs[max(0, min(98, int(round(q * 100)) - 1))] for q in quantiles)


def kernel_time_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100,
                   quantiles: Sequence[float] = QUANTILES):
    """(median, p20, p80 in ms, how) of the GPU work of one fn() call. CUDA: many calls captured in one CUDA
    graph and replayed (triton.testing.do_bench_cudagraph; each sample the mean over the graph's calls),
    so a small kernel's time is its own and not the host's cost of launching it (host_us_per_call
    reports that): what a graphed decode step pays per layer. Events around eager calls would time the
    host instead wherever its launch takes longer than the kernel (on the H200 here, 20-80 us for a call
    whose kernel takes 5-10). Operands that must not be served from L2 rotate inside fn (Rotating): each
    captured call reads the next copy. Where fn cannot be captured, eager events (time_ms), and `how`
    says so with the reason. CPU: time_ms."""
    if device.type != "cuda":
        return (*time_ms(fn, device, rep_ms=rep_ms, quantiles=quantiles), "cpu")
    import triton.testing

    try:
        qs = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=list(quantiles))
        return (*qs, "cuda-graph")
    except Exception as e:  # e.g. a peer that synchronises inside its call
        torch.cuda.synchronize(device)
        why = f"eager (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        return (*time_ms(fn, device, rep_ms=rep_ms, quantiles=quantiles), why)


def host_us_per_call(fn: Callable[[], object], device: torch.device, calls: int = 50) -> float:
    """Host time (us) of one call of fn() with no synchronisation inside the timed loop: on a GPU
    what the CPU spends to get the work queued (checks, dispatch, launch), which an eager decode
    step pays once per layer. When it exceeds the kernel's own time, eager generation is bound by
    the host, not the GPU (CUDA graphs remove it). On CPU devices it includes the compute."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return elapsed / calls * 1e6


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth: (read + write bytes) / median time of one copy."""
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[0]
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Rotating:
    """Cycles through copies of a benchmark's operands so that weights are not served from L2."""

    def __init__(self, copies):
        self.copies, self.i = list(copies), 0

    def next(self):
        item = self.copies[self.i]
        self.i = (self.i + 1) % len(self.copies)
        return item


def rotating_copies(bytes_per_copy: int, device: torch.device, max_copies: int = 16) -> int:
    """How many operand copies exceed twice the L2 cache (at least 2)."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    need = -(-2 * l2 // max(1, bytes_per_copy))
    return int(max(2, min(max_copies, need)))
