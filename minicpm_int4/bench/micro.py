"""Kernel microbenchmarks: every backend on every Linear shape at every M, against fp16."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import ops
from .backends import Backend, default_backends
from .env import Rotating, copy_bandwidth_gbps, env_info, host_us_per_call, kernel_time_ms, rotating_copies
from .shapes import M_SWEEP, LinearShape

CHECK_ROWS = 16          # rows of x compared against the backend's reference before timing
PEER_REL_TOL = 2e-2      # peers round differently from us; they must still compute the same product


class KernelMismatch(AssertionError):
    pass


def _check(name: str, prepared, x: torch.Tensor) -> str:
    """Correctness before timing, on the backend's own inputs: ours within the derived bound of
    reference.py (a mismatch raises: timing a wrong kernel is worthless); peers, which round
    differently, within PEER_REL_TOL of their own dequantized product (a mismatch is recorded)."""
    if prepared.reference is None:
        return "unchecked"
    xs = x[:CHECK_ROWS]
    y = prepared.run(xs)
    y_ref = prepared.reference(xs)
    if not torch.isfinite(y).all():
        raise KernelMismatch(f"{name}: non-finite output")
    if prepared.tolerance is not None:
        err = (y.double() - y_ref.double()).abs()
        bad = err > prepared.tolerance(xs, y_ref).double()
        if bad.any():
            raise KernelMismatch(f"{name}: {int(bad.sum())} outputs outside the derived bound "
                                 f"(max error {err.max().item():.3g})")
        return "ok"
    rel = ((y.float() - y_ref.float()).norm() / y_ref.float().norm().clamp_min(1e-30)).item()
    return "ok" if rel <= PEER_REL_TOL else f"mismatch (relative error {rel:.3g})"


TIMING = ("kernel time: calls replayed from a CUDA graph (each row's `timing`; the host's launch cost is "
          "`host_us`, apart)")
# M up to which each row also records the host time per call (decode sizes, where it can exceed the kernel's)
HOST_TIMED_MAX_M = 16


def run_microbench(shapes: Sequence[LinearShape], ms: Sequence[int] = M_SWEEP,
                   backends: Optional[List[Backend]] = None, device: Optional[torch.device] = None,
                   dtype: torch.dtype = torch.float16, group_size: int = 128, rep_ms: float = 100,
                   progress: bool = True, copy_bw_gbps: Optional[float] = None,
                   time_budget_s: Optional[float] = None,
                   checkpoint: Optional[Callable[[Dict], object]] = None) -> Dict:
    """Time every backend on every shape at every M. Shapes run in order (lm_head-sized ones last): fp16 and our
    default backends over all of them, then our measurement variants, then the peers; past `time_budget_s`, or
    on Ctrl-C / SIGINT, it stops and returns what it has, marked incomplete.
    `checkpoint(result so far)` is called after each (shape, backend) (the CLI writes it to disk)."""
    import time

    t_start = time.monotonic()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = backends if backends is not None else default_backends()
    result = {"kind": "microbench", "env": env_info(device),
              "config": {"dtype": str(dtype).replace("torch.", ""), "group_size": group_size, "ms": list(ms),
                         "rep_ms": rep_ms, "timing": TIMING if device.type == "cuda" else "cpu",
                         "backends": [b.name for b in backends]},
              "skipped": {}, "rows": [], "act_quant": []}
    bw = copy_bw_gbps if copy_bw_gbps is not None else copy_bandwidth_gbps(device)
    result["copy_bandwidth_gbps"] = bw
    live = []
    for b in backends:
        why = b.available(device)
        if why:
            result["skipped"][b.name] = why
            print(f"[bench] {b.name}: skipped ({why})")
        else:
            live.append(b)
    esize = torch.empty((), dtype=dtype).element_size()
    shapes = sorted(shapes, key=lambda s: s.n >= 100_000)  # stable: vocabulary projections last
    # fp16 and our defaults over every shape first - the rows the targets are judged on and the dispatch table's
    # W4A8 entries come from -, then our measurement variants (the rows that decide the next defaults), the peers
    # last: a time budget that runs out cuts the peers' rows (nice to have), then the variants' last shapes,
    # before any target's row
    tier = lambda b: 2 if b.family == "peer" else 1 if b.is_variant else 0  # noqa: E731
    work = [(s, b) for t in (0, 1, 2) for s in shapes for b in live if tier(b) == t]
    bar = _bar(len(work) * len(ms), progress)
    result["errors"] = []
    try:
        result["act_quant"] = _bench_act_quant(shapes, ms, device, dtype, bw, rep_ms, live)
        _sweep(work, ms, bar, result, device, dtype, group_size, rep_ms, esize, bw, t_start, time_budget_s, checkpoint)
    except KeyboardInterrupt:
        result["incomplete"] = "interrupted"
        print("[bench] interrupted: writing the results so far")
    _add_speedups(result["rows"])
    return result


def _sweep(work, ms, bar, result, device, dtype, group_size, rep_ms, esize, bw, t_start, time_budget_s, checkpoint=None):
    import time

    for shape, b in work:
        if time_budget_s is not None and time.monotonic() - t_start > time_budget_s:
            result["incomplete"] = f"time budget of {time_budget_s:.0f} s reached before {shape.label} / {b.name}"
            print(f"[bench] {result['incomplete']}")
            return
        try:
            _time_shape(shape, b, ms, bar, result, device, dtype, group_size, rep_ms, esize, bw)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded and reported; one failing case must not lose the sweep
            result["errors"].append({"model": shape.model, "n": shape.n, "k": shape.k, "backend": b.name,
                                     "family": b.family, "error": f"{type(e).__name__}: {str(e)[:500]}"})
            print(f"[bench] {shape.label} {b.name}: {type(e).__name__}: {str(e)[:200]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if checkpoint is not None:
            _add_speedups(result["rows"])
            checkpoint(result)


def _time_shape(shape, b, ms, bar, result, device, dtype, group_size, rep_ms, esize, bw):
    n, k = shape.n, shape.k
    g = torch.Generator(device=device).manual_seed(n * 31 + k)
    w = (torch.randn(n, k, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)
    first = b.prepare(w, group_size)
    copies = [first] + [b.prepare(w, group_size) for _ in range(rotating_copies(first.weight_bytes, device) - 1)]
    rot = Rotating(copies)
    for m in ms:
        bar.update(1)
        if not b.supports(m) or (shape.ms is not None and m not in shape.ms):
            continue
        x = torch.randn(m, k, device=device, dtype=dtype)
        status = _check(b.name, first, x)
        med, p20, p80, how = kernel_time_ms(lambda: rot.next().run(x), device, rep_ms=rep_ms)
        host_us = host_us_per_call(lambda: rot.next().run(x), device) if m <= HOST_TIMED_MAX_M else None
        host_triton = None
        if host_us is not None and getattr(b, "backend", "").startswith("triton"):
            from ..kernels import _launch  # the same calls with every kernel launched by Triton's own path

            with _launch.through_triton():
                host_triton = host_us_per_call(lambda: rot.next().run(x), device)
        nbytes = first.weight_bytes + b.activation_bytes(m, k, n, esize)
        gbps = nbytes / (med * 1e-3) / 1e9
        result["rows"].append({
            "model": shape.model, "n": n, "k": k, "m": m, "backend": b.name, "family": b.family,
            "median_ms": med, "p20_ms": p20, "p80_ms": p80, "bytes": nbytes,
            "tflops": 2 * m * n * k / (med * 1e-3) / 1e12, "gbps": gbps, "pct_copy_bw": 100 * gbps / bw,
            "check": status, "rotating_copies": len(copies), "host_us": host_us,
            "host_us_triton_launch": host_triton, "timing": how,
            # a stacked shape of fuse_projections' (timed at one-token calls only, bench/shapes.py)
            "fused": shape.ms is not None})
        del x


# The Triton quantizer's measurement variants: warps a row (kernels/act_quant.py ACT_QUANT_WARPS) in place
# of its default, block / 512 - candidates of backend="auto" too (dispatch.ACT_QUANT_CANDIDATES)
ACT_QUANT_VARIANTS = {name: w for name, w in ops.ACT_QUANT_TRITON_WARPS.items() if w is not None}


def _act_quant_variant(backend: str):
    """(ops backend, context) of a quantizer row: "triton-4w" / "triton-16w" are the Triton kernel with 4 / 16
    warps a row (kernels/act_quant.py ACT_QUANT_WARPS), measurement variants."""
    if backend in ACT_QUANT_VARIANTS:
        from ..kernels import act_quant

        return "triton", act_quant.warps_per_row(ACT_QUANT_VARIANTS[backend])
    return backend, contextlib.nullcontext()


def _bench_act_quant(shapes, ms, device, dtype, bw, rep_ms, live):
    if not any(b.name.startswith("w4a8") for b in live):
        return []
    rows = []
    backends = ["triton", *ACT_QUANT_VARIANTS] if device.type == "cuda" else ["torch"]
    if device.type == "cuda" and ops.cuda_extension_error() is None:
        backends.append("cuda")  # csrc/act_quant.cu beside the Triton kernel
    for k in sorted({s.k for s in shapes if s.ms is None}):
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            # copies past twice the L2, as for the weights: at 4096 x 4096 one x (32 MiB) would stay in an H200's L2
            rot = Rotating([x] + [torch.randn_like(x) for _ in range(rotating_copies(x.nbytes, device) - 1)])
            ref = ops.quantize_per_token_int8(x, "torch")
            for backend in backends:
                op_backend, switch = _act_quant_variant(backend)
                with switch:
                    # bit for bit against the reference first (the dispatch table takes only checked times)
                    got = ops.quantize_per_token_int8(x, op_backend)
                    check = "ok" if all(torch.equal(a, b) for a, b in zip(got, ref)) else "mismatch"
                    med, p20, p80, how = kernel_time_ms(lambda: ops.quantize_per_token_int8(rot.next(), op_backend),
                                                        device, rep_ms=rep_ms)
                nbytes = m * k * x.element_size() + m * k + 4 * m
                gbps = nbytes / (med * 1e-3) / 1e9
                rows.append({"m": m, "k": k, "backend": backend, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                             "bytes": nbytes, "gbps": gbps, "pct_copy_bw": 100 * gbps / bw, "timing": how,
                             "check": check})
    return rows


def _add_speedups(rows):
    fp = {(r["model"], r["n"], r["k"], r["m"]): r["median_ms"] for r in rows if r["backend"] == "fp16"}
    for r in rows:
        base = fp.get((r["model"], r["n"], r["k"], r["m"]))
        r["speedup_vs_fp16"] = base / r["median_ms"] if base else None


class _NullBar:
    def update(self, n):
        pass


def _bar(total, enabled):
    if not enabled:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total, desc="bench", unit="case")
