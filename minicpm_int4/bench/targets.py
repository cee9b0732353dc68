"""The issues' performance targets, checked against a GPU run's results (never typed by hand).

    minicpm-int4 targets benchmarks/results/<gpu>/        prints the table, writes targets.md there

Reads bench.json (and profile.json when present) from a results folder and states, per target,
the measured figure (worst and median over the shapes the target names), the threshold, and
whether it is met; a target the run did not measure (a backend skipped, a time budget cut short)
is "not measured", never met. The closing notes of a GPU session quote this table.

Targets (issue: what):
  #3  W4A16 Triton, M = 1: >= 85% of the measured copy bandwidth on the large shapes (the faster
      of the GEMV and the tensor-core decode kernel per shape: what backend="auto" runs once the
      dispatch table is made); M = 16: >= 3x fp16; M = 4096: >= 0.9x fp16.
  #4  W4A8 (activation quantization included), M = 4096 on MiniCPM-V 4.6's shapes: >= 1.5x fp16
      and faster than W4A16 Triton (and, where the run timed the CUDA W4A8 kernel, the same for the
      faster of the Triton and CUDA paths against the faster W4A16 prefill); the activation quantizer
      at M x K = 4096 x 4096: >= 70% of copy bandwidth.
  #5  CUDA extension, M = 1 on the large shapes: >= 90% of copy bandwidth, and faster than Triton.
"Large shapes": the LLM weights of at least 4096 x 4096 (vision tower and k/v projections are
smaller), the vocabulary projection included.

Beside the verdicts, the decode rows' time is split into a per-call floor and a streaming bandwidth
(stream_fits), and fp16's floor gives the most of the copy bandwidth one call of each large int4 shape
could show: what part of a per-shape percentage a kernel can still close.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

LARGE_WEIGHTS = 4096 * 4096


@dataclass
class Target:
    issue: int
    what: str
    threshold: float
    unit: str                      # "%" (of copy bandwidth) or "x" (ratio)
    strict: bool = False           # "faster than": the threshold itself is not met
    per_shape: List[Tuple[str, float]] = field(default_factory=list)   # (label, measured)

    @property
    def worst(self) -> Optional[float]:
        return min(v for _, v in self.per_shape) if self.per_shape else None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(v for _, v in self.per_shape) if self.per_shape else None

    @property
    def verdict(self) -> str:
        if not self.per_shape:
            return "not measured"
        ok = self.worst > self.threshold if self.strict else self.worst >= self.threshold
        return "met" if ok else "not met"

    def fmt(self, v: Optional[float]) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}%" if self.unit == "%" else f"{v:.2f}x"


def _ok_rows(bench: Dict) -> Dict:
    return {(r["model"], r["n"], r["k"], r["m"], r["backend"]): r for r in bench.get("rows", []) if r.get("check") == "ok"}


def _shapes(bench: Dict, pick: Callable[[str, int, int], bool]) -> List[Tuple[str, int, int]]:
    return list(dict.fromkeys((r["model"], r["n"], r["k"]) for r in bench.get("rows", []) if pick(r["model"], r["n"], r["k"])))


def _large(model: str, n: int, k: int) -> bool:
    return n * k >= LARGE_WEIGHTS


def _collect(bench: Dict, target: Target, shapes, value: Callable[[Dict, Tuple[str, int, int]], Optional[float]]) -> Target:
    by = _ok_rows(bench)
    for s in shapes:
        v = value(by, s)
        if v is not None:
            target.per_shape.append((f"{s[0]} {s[1]} x {s[2]}", v))
    return target


def _row(by, s, m, backend):
    return by.get((s[0], s[1], s[2], m, backend))


def _fastest(by, s, m, backends) -> Optional[Dict]:
    """The fastest row of these backends for shape s at M (None where none was timed)."""
    rows = [r for r in (_row(by, s, m, b) for b in backends) if r]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def _best_triton_m1(by, s) -> Optional[Dict]:
    return _fastest(by, s, 1, ("w4a16-triton", "w4a16-triton-tc"))


def check_targets(bench: Dict) -> List[Target]:
    large = _shapes(bench, _large)
    v46 = _shapes(bench, lambda model, n, k: model == "minicpmv4.6")
    out = []

    def speedup(m, backend):
        return lambda by, s: (_row(by, s, m, backend) or {}).get("speedup_vs_fp16")

    def m1_bw(by, s):
        r = _best_triton_m1(by, s)
        return r["pct_copy_bw"] if r else None

    out.append(_collect(bench, Target(3, "W4A16 Triton, M = 1: % of copy bandwidth (faster of GEMV / tensor-core kernel)",
                                      85, "%"), large, m1_bw))
    out.append(_collect(bench, Target(3, "W4A16 Triton, M = 16: speedup over fp16", 3.0, "x"), large,
                        speedup(16, "w4a16-triton")))
    out.append(_collect(bench, Target(3, "W4A16 Triton, M = 4096: speedup over fp16", 0.9, "x"), large,
                        speedup(4096, "w4a16-triton")))

    measured = {r["backend"] for r in bench.get("rows", [])}

    def best_speedup(m, backends):
        def value(by, s):
            vals = [v for v in (speedup(m, b)(by, s) for b in backends) if v is not None]
            return max(vals) if vals else None
        return value

    # The Triton kernels as backend="auto" runs them where the bench measured a variant (dispatch.py's
    # TRITON_CANDIDATES, whose table this bench makes) faster for the shape: a line each where such rows exist
    if measured & {"w4a16-triton-prefetch", "w4a16-triton-unsplit", "w4a16-triton-h2", "w4a16-triton-direct"}:
        def m1_auto_bw(by, s):
            r = _fastest(by, s, 1, ("w4a16-triton", "w4a16-triton-tc", "w4a16-triton-prefetch", "w4a16-triton-unsplit",
                                    "w4a16-triton-h2", "w4a16-triton-direct"))
            return r["pct_copy_bw"] if r else None

        out.append(_collect(bench, Target(3, "W4A16 Triton as backend='auto' takes it (the fastest of the GEMV, "
                                          "prefetching or unsplit, and the tensor-core kernel), M = 1: % of copy "
                                          "bandwidth", 85, "%"), large, m1_auto_bw))
    if "w4a16-triton-trip32" in measured:
        out.append(_collect(bench, Target(3, "W4A16 Triton as backend='auto' takes it (the faster of the decode "
                                          "kernel's one- and two-group loop trips), M = 16: speedup over fp16", 3.0,
                                          "x"), large, best_speedup(16, ("w4a16-triton", "w4a16-triton-trip32"))))
    if "w4a16-triton-rhs" in measured:
        out.append(_collect(bench, Target(3, "W4A16 Triton fused prefill kernel, the faster tile order (W @ x.T or "
                                          "x @ W.T) as backend='auto' takes it, M = 4096: speedup over fp16", 0.9, "x"),
                            large, best_speedup(4096, ("w4a16-triton", "w4a16-triton-rhs"))))
    if "w4a16-triton-dq" in measured:
        out.append(_collect(bench, Target(3, "W4A16 as backend='auto' takes it (the fastest of the fused kernel in "
                                          "either tile order and dequantization + matmul), M = 4096: speedup over "
                                          "fp16", 0.9, "x"),
                            large, best_speedup(4096, ("w4a16-triton", "w4a16-triton-rhs", "w4a16-triton-dq"))))
    if "w4a16-cuda-wgmma" in measured:
        out.append(_collect(bench, Target(3, "W4A16 CUDA warpgroup-MMA prefill GEMM (the fused dequantization on "
                                          "Hopper's wgmma), M = 4096: speedup over fp16", 0.9, "x"),
                            large, speedup(4096, "w4a16-cuda-wgmma")))
        out.append(_collect(bench, Target(3, "W4A16 as backend='auto' takes it with the extension (the fastest of the "
                                          "Triton prefill kernels, dequantization + matmul and the CUDA wgmma GEMM), "
                                          "M = 4096: speedup over fp16", 0.9, "x"),
                            large, best_speedup(4096, ("w4a16-triton", "w4a16-triton-rhs", "w4a16-triton-dq",
                                                       "w4a16-cuda-wgmma"))))
    out.append(_collect(bench, Target(4, "W4A8 (with activation quantization), M = 4096, MiniCPM-V 4.6 shapes: speedup over fp16",
                                      1.5, "x"), v46, speedup(4096, "w4a8-triton")))

    def w4a8_over_w4a16(by, s):
        a, b = _row(by, s, 4096, "w4a8-triton"), _row(by, s, 4096, "w4a16-triton")
        return b["median_ms"] / a["median_ms"] if a and b else None

    out.append(_collect(bench, Target(4, "W4A8 over W4A16 Triton (time ratio), M = 4096, MiniCPM-V 4.6 shapes", 1.0, "x",
                                      strict=True), v46, w4a8_over_w4a16))

    if any(r["backend"] == "w4a8-cuda" for r in bench.get("rows", [])):
        # as backend="auto" takes them: every W4A8 candidate of the dispatch table (the fused-epilogue row is no candidate)
        from ..dispatch import W4A8_CANDIDATES

        w4a8s = tuple(f"w4a8-{c}" for c in W4A8_CANDIDATES)
        w4a16s = ("w4a16-triton", "w4a16-triton-rhs", "w4a16-triton-dq")

        def w4a8_best_speedup(by, s):
            r = _fastest(by, s, 4096, w4a8s)
            return r.get("speedup_vs_fp16") if r else None

        def w4a8_best_over_w4a16_best(by, s):
            a, b = _fastest(by, s, 4096, w4a8s), _fastest(by, s, 4096, w4a16s)
            return b["median_ms"] / a["median_ms"] if a and b else None

        out.append(_collect(bench, Target(4, "W4A8, the faster of Triton and the CUDA kernel (the fastest of their "
                                          "variants backend='auto' can take; with activation quantization), M = 4096, "
                                          "MiniCPM-V 4.6 shapes: speedup over fp16", 1.5, "x"),
                            v46, w4a8_best_speedup))
        out.append(_collect(bench, Target(4, "W4A8 (faster of Triton / CUDA) over W4A16 (fastest of fused in either "
                                          "tile order / dequant + matmul), time ratio, M = 4096, MiniCPM-V 4.6 shapes",
                                          1.0, "x", strict=True),
                            v46, w4a8_best_over_w4a16_best))
    aq = Target(4, "activation quantization (Triton), M x K = 4096 x 4096: % of copy bandwidth", 70, "%")
    for r in bench.get("act_quant", []):
        if r["m"] == 4096 and r["k"] == 4096 and r["backend"] == "triton":
            aq.per_shape.append(("4096 x 4096", r["pct_copy_bw"]))
    out.append(aq)
    variants = [r for r in bench.get("act_quant", []) if r["m"] == 4096 and r["k"] == 4096 and r.get("check", "ok") == "ok"
                and r["backend"] in ("triton", "triton-4w", "triton-16w")]
    if any(r["backend"] != "triton" for r in variants):
        aq_auto = Target(4, "activation quantization (Triton as backend='auto' takes it: the fastest of its warps-a-row "
                            "variants), M x K = 4096 x 4096: % of copy bandwidth", 70, "%")
        aq_auto.per_shape.append(("4096 x 4096", max(r["pct_copy_bw"] for r in variants)))
        out.append(aq_auto)

    def cuda_bw(by, s):
        r = _row(by, s, 1, "w4a16-cuda")
        return r["pct_copy_bw"] if r else None

    def cuda_over_triton(by, s):
        c, t = _row(by, s, 1, "w4a16-cuda"), _best_triton_m1(by, s)
        return t["median_ms"] / c["median_ms"] if c and t else None

    out.append(_collect(bench, Target(5, "CUDA extension, M = 1: % of copy bandwidth", 90, "%"), large, cuda_bw))
    out.append(_collect(bench, Target(5, "CUDA extension over the faster Triton kernel (time ratio), M = 1", 1.0, "x",
                                      strict=True), large, cuda_over_triton))

    from ..dispatch import CUDA_CANDIDATES

    cuda_rows = tuple(f"w4a16-{c}" for c in CUDA_CANDIDATES)

    def cuda_auto_bw(by, s):  # the fastest of the launcher's choice and its variants, as the dispatch table picks
        r = _fastest(by, s, 1, cuda_rows)
        return r["pct_copy_bw"] if r else None

    if any(r["backend"] in cuda_rows[1:] for r in bench.get("rows", [])):
        out.append(_collect(bench, Target(5, "CUDA extension as backend='auto' takes it (the fastest of the default and "
                                          "its variants: CUDA-core GEMV, two chunks ahead, shared-memory ring), M = 1: "
                                          "% of copy bandwidth", 90, "%"), large, cuda_auto_bw))
    return out


# A fit needs this many distinct weight sizes, the largest at least SPREAD times the smallest: else the
# floor and the bandwidth cannot be told apart.
FIT_MIN_SIZES = 4
FIT_MIN_SPREAD = 4.0
TRITON_BEST = "w4a16-triton (faster of GEMV / tensor-core kernel)"


@dataclass
class StreamFit:
    """t = floor + bytes / bandwidth, least squares over one backend's shapes at one M."""
    backend: str
    m: int
    floor_us: float
    gbps: float
    r2: float
    shapes: int
    mb_range: Tuple[float, float]


def _fit(points: List[Tuple[float, float]]) -> Optional[Tuple[float, float, float]]:
    """(intercept, slope, R^2) of y on x, or None where the x do not spread enough to separate them."""
    xs = [x for x, _ in points]
    if len(set(xs)) < FIT_MIN_SIZES or max(xs) < FIT_MIN_SPREAD * min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    slope = sxy / sxx
    icpt = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in points)
    ss_res = sum((y - icpt - slope * x) ** 2 for x, y in points)
    return icpt, slope, (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def stream_fits(bench: Dict, ms: Sequence[int] = (1, 16)) -> List[StreamFit]:
    """Per backend and M (decode sizes), the kernel time of every shape fitted as a per-call floor plus the
    bytes moved (packed weights, scales, zeros, x, y: the rows' `bytes`) over a streaming bandwidth.

    The floor is what a call costs whatever its size (its launch inside the CUDA graph, the ramp-up and tail
    of its grid, a split-K fix-up); the bandwidth, what it streams at once running. A percentage of copy
    bandwidth per shape mixes the two, and at decode sizes the floor is most of it: 8.9 MB (an int4
    4096 x 4096 layer) take 2.1 us at 4.2 TB/s, beside a floor of ~3 us that fp16's cuBLAS call pays too.
    Rows that failed their check, and rows timed eagerly (the host's launch cost would be the floor), are
    left out; `TRITON_BEST` is the faster Triton kernel per shape at M = 1, what target #3 takes."""
    out = []
    usable = [r for r in bench.get("rows", []) if r.get("check") in ("ok", "unchecked") and r.get("median_ms")
              and r.get("bytes") and not str(r.get("timing", "")).startswith("eager")]
    for m in ms:
        at_m = [r for r in usable if r["m"] == m]
        series: Dict[str, List[Tuple[float, float]]] = {}
        for r in at_m:
            series.setdefault(r["backend"], []).append((r["bytes"] / 1e6, r["median_ms"] * 1e3))
        if m == 1:
            by = {(r["model"], r["n"], r["k"], r["m"], r["backend"]): r for r in at_m}
            best = [_best_triton_m1(by, s) for s in dict.fromkeys((r["model"], r["n"], r["k"]) for r in at_m)]
            best = [(r["bytes"] / 1e6, r["median_ms"] * 1e3) for r in best if r]
            if best:
                series[TRITON_BEST] = best
        for backend, points in series.items():
            fit = _fit(points)
            if fit is None or fit[1] <= 0:
                continue
            xs = [x for x, _ in points]
            out.append(StreamFit(backend, m, fit[0], 1e3 / fit[1], fit[2], len(points), (min(xs), max(xs))))
    return out


def stream_fit_lines(bench: Dict, fits: Optional[List[StreamFit]] = None) -> List[str]:
    """The fits as a Markdown table, and what fp16's floor leaves of the copy bandwidth for one call of
    each large int4 shape at M = 1 (the bound a per-shape percentage target meets)."""
    fits = stream_fits(bench) if fits is None else fits
    if not fits:
        return ["No fit: too few shapes of different sizes were timed."]
    bw = bench.get("copy_bandwidth_gbps") or 0.0
    out = ["Kernel time against bytes moved, fitted over this run's shapes as t = floor + bytes / bandwidth "
           "(least squares; derived from the rows, not measured apart). The floor is paid per call whatever "
           "the size; the bandwidth is the kernel's once it streams.", "",
           "| backend | M | floor us | streaming GB/s | % of copy bw | R^2 | shapes | MB |",
           "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        pct = f"{100 * f.gbps / bw:.0f}%" if bw else "-"
        out.append(f"| {f.backend} | {f.m} | {f.floor_us:.2f} | {f.gbps:.0f} | {pct} | {f.r2:.3f} | {f.shapes} | "
                   f"{f.mb_range[0]:.1f} - {f.mb_range[1]:.1f} |")
    fp = next((f for f in fits if f.backend == "fp16" and f.m == 1), None)
    if fp and bw:
        sizes = {}
        for r in bench.get("rows", []):
            if r["m"] == 1 and r["backend"] == "w4a16-triton" and _large(r["model"], r["n"], r["k"]) and r.get("bytes"):
                sizes.setdefault((r["n"], r["k"]), r["bytes"] / 1e6)
        if sizes:
            cells, bounds = [], []
            for (n, k), mb in sorted(sizes.items(), key=lambda kv: kv[1]):
                bound = 100 * ceiling_fraction(mb, fp.floor_us, bw)
                bounds.append(bound)
                cells.append(f"{n} x {k} ({mb:.1f} MB) {bound:.0f}%")
            out += ["", f"fp16's floor at M = 1 is {fp.floor_us:.2f} us. A call that paid only that and streamed at the "
                    f"copy bandwidth would show, as % of copy bandwidth per large int4 shape at M = 1: "
                    + ", ".join(cells) + "."]
            above = [label for t, label in ((85, "#3's M = 1 target (85%)"), (90, "#5's (90%)")) if max(bounds) < t]
            if above:
                out += ["", f"Every one is below {' and '.join(above)}: no kernel reaches "
                        f"{'it' if len(above) == 1 else 'them'} in one call of these sizes under this timing; the "
                        "streaming bandwidth in the table is the part a kernel can close."]
    return out


# The bench's measurement variants and the default each is an alternative to (bench/backends.py).
# (variant, the kernel it would replace, the M compared at)
VARIANTS = (("w4a16-triton-prefetch", "w4a16-triton", 1), ("w4a16-triton-unsplit", "w4a16-triton", 1),
            ("w4a16-triton-h2", "w4a16-triton", 1), ("w4a16-triton-direct", "w4a16-triton", 1),
            ("w4a16-triton-tc", "w4a16-triton", 1), ("w4a16-triton-trip32", "w4a16-triton", 16),
            ("w4a16-triton-staged", "w4a16-triton", 16),
            ("w4a16-cuda-gemv", "w4a16-cuda", 1), ("w4a16-cuda-ahead2", "w4a16-cuda", 1),
            ("w4a16-cuda-ahead2", "w4a16-cuda", 16), ("w4a16-cuda-ring", "w4a16-cuda", 1),
            ("w4a16-cuda-ring", "w4a16-cuda", 16),
            ("w4a16-triton-dq", "w4a16-triton", 1024), ("w4a16-triton-dq", "w4a16-triton", 4096),
            ("w4a16-triton-rhs", "w4a16-triton", 256), ("w4a16-triton-rhs", "w4a16-triton", 4096),
            ("w4a16-cuda-wgmma", "w4a16-triton", 256), ("w4a16-cuda-wgmma", "w4a16-triton", 4096),
            ("w4a16-cuda-wgmma-nosplit", "w4a16-cuda-wgmma", 256),
            ("w4a8-triton-flat", "w4a8-triton", 4096), ("w4a8-cuda", "w4a8-triton", 256),
            ("w4a8-cuda", "w4a8-triton", 1024), ("w4a8-cuda", "w4a8-triton", 4096),
            ("w4a8-cuda-m64", "w4a8-cuda", 1024), ("w4a8-cuda-m64", "w4a8-cuda", 4096),
            ("w4a8-cuda-mma", "w4a8-cuda", 256), ("w4a8-cuda-mma", "w4a8-cuda", 1024),
            ("w4a8-cuda-mma", "w4a8-cuda", 4096), ("w4a8-cuda-fma", "w4a8-cuda", 1024),
            ("w4a8-cuda-fma", "w4a8-cuda", 4096), ("w4a8-cuda-t64", "w4a8-cuda", 256),
            ("w4a8-cuda-t64", "w4a8-cuda", 1024), ("w4a8-cuda-t64", "w4a8-cuda", 4096),
            ("w4a8-cuda-t128", "w4a8-cuda", 256), ("w4a8-cuda-t128", "w4a8-cuda", 1024))


def variant_lines(bench: Dict) -> List[str]:
    """Each measurement variant against the kernel it would replace at its M, per shape the two share:
    default time / variant time (above 1: the variant is faster), median and range over all shapes and
    over the large ones. What decides whether a variant becomes the default; where a shape's W4A16 variant
    is faster, the dispatch table made from the same bench already has backend="auto" take it there
    (dispatch.py's candidates)."""
    by = _ok_rows(bench)
    out = []
    for variant, default, m in VARIANTS:
        ratios = []
        for model, n, k in dict.fromkeys((r["model"], r["n"], r["k"]) for r in bench.get("rows", [])):
            a, b = by.get((model, n, k, m, variant)), by.get((model, n, k, m, default))
            if a and b:
                ratios.append((_large(model, n, k), b["median_ms"] / a["median_ms"]))
        if not ratios:
            continue
        cells = []
        for label, vals in (("all", [v for _, v in ratios]), ("large", [v for big, v in ratios if big])):
            cells.append(f"{statistics.median(vals):.2f}x ({min(vals):.2f} - {max(vals):.2f}, {len(vals)})"
                         if vals else "-")
        out.append(f"| {variant} | {default} | {m} | {cells[0]} | {cells[1]} |")
    if not out:
        return []
    return (["Measurement variants: the default's time over the variant's (above 1.00x the variant is "
             "faster), median (range, shapes).", "", "| variant | instead of | M | all shapes | large shapes |",
             "|---|---|---|---|---|"] + out)


def act_quant_variant_lines(bench: Dict, m: int = 4096) -> List[str]:
    """The Triton quantizer's warps-a-row variants (`triton-4w`, `triton-16w`) against its default, per K
    at M = m: % of copy bandwidth each, and the default's time over the variant's (above 1.00x the
    variant is faster)."""
    from .micro import ACT_QUANT_VARIANTS

    rows = {(r["k"], r["backend"]): r for r in bench.get("act_quant", [])
            if r["m"] == m and r.get("check", "ok") == "ok"}
    out = []
    for k in sorted({k for k, _ in rows}):
        b = rows.get((k, "triton"))
        for name, warps in ACT_QUANT_VARIANTS.items():
            a = rows.get((k, name))
            if a and b:
                out.append(f"| {k} | {warps} warps a row (`{name}`) | {b['pct_copy_bw']:.1f}% | {a['pct_copy_bw']:.1f}% | "
                           f"{b['median_ms'] / a['median_ms']:.2f}x |")
    if not out:
        return []
    return ([f"Activation quantizer (Triton) at M = {m}, warps a row against the default (block / 512):", "",
             "| K | variant | default | variant | default time / variant's |", "|---|---|---|---|---|"] + out)


def ceiling_fraction(mb: float, floor_us: float, gbps: float) -> float:
    """The fraction of `gbps` one call moving `mb` megabytes shows when it pays `floor_us` and then streams
    at `gbps`: mb / (floor + mb / gbps) / gbps."""
    stream_us = mb / gbps * 1e3
    return stream_us / (max(floor_us, 0.0) + stream_us)


def e2e_lines(profile: Optional[Dict]) -> List[str]:
    """#6's closing figures: decode tokens/s fp16 vs int4 per model and mode, peak and weight memory."""
    if not profile:
        return ["No profile.json: end-to-end figures not measured."]
    runs = {(r["model"], r["mode"], r["weights"]): r for r in profile.get("runs", [])}
    out = ["| model | mode | fp tokens/s | int4 tokens/s | int4 / fp | fp peak MiB | int4 peak MiB | fp weights MiB | int4 weights MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in profile.get("runs", [])):
        int4 = runs.get((model, mode, "int4"))
        fp = next((r for (m_, md, w), r in runs.items() if m_ == model and md == mode and not w.startswith("int4")), None)

        def cell(r, key, scale=1.0, f="{:.1f}"):
            if not r or r.get("error") or r.get(key) is None:
                return "failed" if r and r.get("error") else "-"
            return f.format(r[key] / scale)

        ratio = "-"
        if fp and int4 and fp.get("tokens_per_s") and int4.get("tokens_per_s"):
            ratio = f"{int4['tokens_per_s'] / fp['tokens_per_s']:.2f}x"
        out.append(f"| {model} | {mode} | {cell(fp, 'tokens_per_s')} | {cell(int4, 'tokens_per_s')} | {ratio} | "
                   f"{cell(fp, 'peak_bytes', 2**20, '{:.0f}')} | {cell(int4, 'peak_bytes', 2**20, '{:.0f}')} | "
                   f"{cell(fp, 'weight_bytes', 2**20, '{:.0f}')} | {cell(int4, 'weight_bytes', 2**20, '{:.0f}')} |")
    fused = [(model, mode, r) for (model, mode, w), r in runs.items() if w == "int4-fused"]
    if fused:  # the same int4 layers after fuse_projections (fusion.py)
        out += ["", "Sibling projections fused (`int4-fused`: the int4 model after `fuse_projections`, q / k / v, gate / up "
                "and the linear attention's input projections one GEMM each at one-token decode) against the int4 run:", "",
                "| model | mode | int4 tokens/s | int4-fused tokens/s | fused / int4 | int4 launches saved a token "
                "| groups that ran stacked |",
                "|---|---|---|---|---|---|---|"]
        for model, mode, r in fused:
            base = runs.get((model, mode, "int4")) or {}
            a, b = base.get("tokens_per_s"), r.get("tokens_per_s")
            # (the evidence that the fused model computed fused: eager / captured calls, or a compiled graph's)
            ran = (f"{r['groups_ran_stacked']} of {r['fused_groups']}" if r.get("groups_ran_stacked") is not None
                   else "-")
            out.append(f"| {model} | {mode} | {'-' if a is None else f'{a:.1f}'} | "
                       f"{'failed' if r.get('error') else '-' if b is None else f'{b:.1f}'} | "
                       f"{f'{b / a:.2f}x' if a and b else '-'} | {r.get('launches_saved_per_token', '-')} | {ran} |")
    w4a8 = [(model, r) for (model, mode, w), r in runs.items() if w == "int4-w4a8" and mode == "eager"]
    if w4a8:  # profile --w4a8: the same int4 layers with int8 activations, eager
        out += ["", "W4A8 end to end (`profile --w4a8`, eager: the int4 layers with int8 activations from 17 rows on; "
                "W4A16's time over W4A8's, above 1.00x W4A8 is faster):", "",
                "| model | int4 vision ms | int4-w4a8 vision ms | ratio | int4 prefill ms | int4-w4a8 prefill ms | ratio |",
                "|---|---|---|---|---|---|---|"]
        for model, r in w4a8:
            base = runs.get((model, "eager", "int4")) or {}
            cells = []
            for key in ("vision_ms", "prefill_ms"):
                a, b = base.get(key), r.get(key)
                cells += ["-" if a is None else f"{a:.1f}", "failed" if r.get("error") else "-" if b is None else f"{b:.1f}",
                          f"{a / b:.2f}x" if a and b else "-"]
            out.append(f"| {model} | " + " | ".join(cells) + " |")
    return out


def targets_markdown(bench: Dict, profile: Optional[Dict] = None) -> str:
    env = bench.get("env", {})
    targets = check_targets(bench)
    out = ["## Targets of the issues, from this run", "",
           f"- device: **{env.get('device_name')}**; torch {env.get('torch')}, triton {env.get('triton')}; "
           f"commit `{env.get('commit')}`, {env.get('timestamp_utc')}",
           f"- measured copy bandwidth: {bench.get('copy_bandwidth_gbps', 0):.0f} GB/s"]
    if bench.get("incomplete"):
        out.append(f"- **the sweep is incomplete**: {bench['incomplete']}")
    for name, why in bench.get("skipped", {}).items():
        out.append(f"- `{name}` skipped: {why}")
    out += ["", "| issue | target | threshold | worst | median | shapes | verdict |", "|---|---|---|---|---|---|---|"]
    for t in targets:
        out.append(f"| #{t.issue} | {t.what} | {'>' if t.strict else '>='} {t.fmt(t.threshold)} | "
                   f"{t.fmt(t.worst)} | {t.fmt(t.median)} | {len(t.per_shape)} | {t.verdict} |")
    out += ["", "Per shape:", ""]
    for t in targets:
        if t.per_shape:
            out.append(f"- #{t.issue} {t.what}: " + ", ".join(f"{label} {t.fmt(v)}" for label, v in t.per_shape))
    out += ["", "### Floor and streaming bandwidth at decode sizes (#3, #5)", ""] + stream_fit_lines(bench)
    variants = variant_lines(bench)
    if variants:
        out += [""] + variants
    aq_variants = act_quant_variant_lines(bench)
    if aq_variants:
        out += [""] + aq_variants
    out += ["", "### End to end (#6)", ""] + e2e_lines(profile)
    return "\n".join(out) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="minicpm-int4 targets", description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="a results folder with bench.json (and profile.json), e.g. benchmarks/results/<gpu>")
    p.add_argument("--no-write", action="store_true", help="print only; do not write targets.md into the folder")
    args = p.parse_args(argv)
    path = os.path.join(args.results, "bench.json")
    if not os.path.exists(path):
        p.error(f"{path} does not exist (run `minicpm-int4 bench --out {args.results}` on a GPU first)")
    with open(path) as f:
        bench = json.load(f)
    profile = None
    if os.path.exists(os.path.join(args.results, "profile.json")):
        with open(os.path.join(args.results, "profile.json")) as f:
            profile = json.load(f)
    text = targets_markdown(bench, profile)
    print(text)
    if not args.no_write:
        with open(os.path.join(args.results, "targets.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
