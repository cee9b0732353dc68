"""The measured rule behind backend="auto" on CUDA for W4A16: which kernel is fastest for a layer
shape and M, per GPU model, read from benchmark results; and likewise for the per-token int8 activation
quantizer (Triton or the CUDA extension's, by K and M: act_quant_auto_backend) and the W4A8 GEMM (Triton
or the CUDA extension's, or a variant of either, W4A8_CANDIDATES, by N, K, M and the group size measured:
w4a8_auto_backend).

The candidates: "triton" (the Triton kernels as ops.py picks them by M, with kernels/w4a16.py's settings:
the CUDA-core GEMV at M = 1, the tensor-core decode kernel at 2..16, the fused prefill kernel past M = 16);
the Triton variants, each one of those settings changed for the call (TRITON_CANDIDATES; kernels/w4a16.py
VARIANTS): at M = 1 "triton-tc" (the tensor-core decode kernel instead of the GEMV: fewer instructions per
weight, split-K finished in the same launch with the layer's workspace), "triton-prefetch" (the GEMV with its
next step of W loaded ahead), "triton-unsplit" (the GEMV with K never split), "triton-h2" (its products in
fp16 pairs) and "triton-direct" (its x, scales and zero points loaded by each thread for its own words, no shared
memory between); at 2..16 "triton-trip32" (the decode kernel with two groups of 128 a loop trip) and
"triton-staged" (it with its dequantized tile in natural
order, moved into the tensor cores' layout through shared memory); past 16 "triton-dq" (the weight dequantized
whole by a Triton kernel, then torch's matmul) and "triton-rhs" (the prefill row tile as the dot's second operand,
y = x @ W.T); and, with the extension built, M <= 16, "cuda" (its launcher's choice) and its variants
(CUDA_CANDIDATES): "cuda-gemv" (its CUDA-core GEMV, launcher variant 1), "cuda-ahead2" and "cuda-ring" (its
tensor-core kernel with W requested two chunks ahead, variant 3, or through a ring in shared memory, variant 4:
for a layer they do not take - an input scale, a channel order, K % 128 != 0 or a group size that is no power
of two - ops.py runs "cuda"'s kernel); past 16, with the extension built, "cuda-wgmma" (its warpgroup-MMA
prefill GEMM, launcher variant 5, sm_90a, split-K over clusters of CTAs where its tiles are too few for the SMs;
"cuda-wgmma-nosplit", variant 6, it with a tile a CTA: for a layer they do not take - K % 64 != 0, or a group that
is neither 32 nor a power of two - ops.py runs "triton"). So a
GPU run that measures a variant faster makes "auto" take it for that shape with no change to the code's
defaults. `minicpm_int4/dispatch_table.json` (package data) is written by
`python benchmarks/make_dispatch_table.py benchmarks/results/<gpu>/bench.json` from a `bench` run (its
rows `w4a16-<candidate>`): every (N, K, M) where another candidate was timed beside "triton" is an entry, with
every candidate's median, so that the lookup can take the fastest of those available (no extension built: the
best Triton one). M = 1 takes its own entry (other kernels run there). 2..16 rows take the entry at their
bucket (m_bucket: the next power of two, as the kernels' own instantiations go), else at the measured decode M
nearest it on a log scale (the larger on a tie): the decode kernels stream W once whatever M, so a measured M
stands for its neighbours. Past M = 16 a query takes the entry at the largest measured M at or below
its own: "triton-dq" pays a fixed cost (writing the fp16
weight) that a larger M only amortises further, so where it won at a measured M it wins above it (and a
tile layout that won at a large M keeps winning where tiles are full); below the smallest measured
prefill M, "triton"; and never "triton-dq" for a weight whose fp16 copy would pass DEQUANT_MAX_BYTES.
A GPU without an entry of its own reads the entry of a measured GPU of the same compute capability (SAME_ARCH,
table_entry_for: an H100 the H200's); absent an entry (a GPU of an unmeasured architecture, an unmeasured shape)
"auto" means "triton": nothing is guessed.

MINICPM_INT4_DISPATCH_TABLE=<path>, set before minicpm_int4 is imported, reads the table from there
instead: the GPU suite writes one from the bench it has just run, so that its end-to-end profile runs
"auto" as a committed table would make it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections import Counter
from typing import Dict, Optional

PACKAGE_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")
TABLE_ENV = "MINICPM_INT4_DISPATCH_TABLE"
TABLE_PATH = os.environ.get(TABLE_ENV) or PACKAGE_TABLE_PATH  # the table "auto" reads
CUDA_MAX_M = 16
# the W4A16 candidates that need the extension: its launcher's choice and its variants (ops.W4A16_CUDA_VARIANTS)
CUDA_CANDIDATES = ("cuda", "cuda-gemv", "cuda-ahead2", "cuda-ring", "cuda-wgmma", "cuda-wgmma-nosplit")
# the CUDA candidates measured and picked past the decode sizes only (the rest: M <= CUDA_MAX_M)
CUDA_PREFILL_CANDIDATES = ("cuda-wgmma", "cuda-wgmma-nosplit")
# The Triton kernels' variants (kernels/w4a16.py VARIANTS: one of that module's settings changed for a call) and
# the M they are measured and picked at (a candidate is only ever compared where it runs something other than
# "triton": "triton-tc" / "-prefetch" / "-unsplit" / "-h2" / "-direct" change the M = 1 GEMV (-h2 fp16 layers only: its
# products in fp16 pairs, within reference.gemv_half2_tolerance - for other dtypes it is the default GEMV),
# "triton-trip32" and "-staged" the 2..16-row decode kernel, "triton-dq" / "-rhs" the prefill path)
TRITON_CANDIDATES = {"triton-tc": (1, 1), "triton-prefetch": (1, 1), "triton-unsplit": (1, 1), "triton-h2": (1, 1),
                     "triton-direct": (1, 1),
                     "triton-trip32": (2, CUDA_MAX_M), "triton-staged": (2, CUDA_MAX_M),
                     "triton-dq": (CUDA_MAX_M + 1, None), "triton-rhs": (CUDA_MAX_M + 1, None)}
# The per-token int8 activation quantizer's candidates (the bench's act_quant rows): the Triton kernel, it with 4 /
# 16 warps a row for the call (kernels/act_quant.py ACT_QUANT_WARPS; its default is the row's block / 512), and
# the extension's (csrc/act_quant.cu). All give the reference's bits.
ACT_QUANT_CANDIDATES = ("triton", "triton-4w", "triton-16w", "cuda")
# The W4A8 GEMM's candidates (bench rows `w4a8-<candidate>`: the per-token quantizer + the GEMM) and what each
# needs to run: None (a Triton kernel: "triton-flat" is kernels/w4a8.py's W4A8_FLAT_GROUPS for the call), "cuda"
# (the extension's W4A8 GEMM taking the layer: its launcher's choice, or the mma.sync kernel forced - "cuda-mma" -
# with 64-token blocks - "cuda-m64"), or the block tokens of its warpgroup-MMA kernel forced ("cuda-t64" /
# "cuda-t128": that kernel on this GPU with those blocks allowed). Not the wgmma kernel's fused epilogue
# (`w4a8-cuda-fma`), which is within the reference's tolerance but not its bits: measured, never picked.
W4A8_CANDIDATES = {"triton": None, "triton-flat": None, "cuda": "cuda", "cuda-mma": "cuda", "cuda-m64": "cuda",
                   "cuda-t64": 64, "cuda-t128": 128}
# "triton-dq" holds the layer's weight dequantized (2 bytes a weight) for the call's length: past this size
# "auto" keeps the fused prefill kernel whatever was measured (a 150k-vocabulary lm_head would take 1.2 GB)
DEQUANT_MAX_BYTES = 256 * 2**20
# A GPU the table has no entry for reads the entry of a measured GPU of the same compute capability (an H100 the
# H200's, say: table_entry_for), where the entry records its capability. Which kernel is fastest for a shape is
# set by what an architecture fixes - instructions per weight, the launch floor, the tensor-core rate, registers
# and shared memory per SM - more than by the bandwidth, which moves the margins; every candidate computes the
# same numbers, so a borrowed pick can cost speed, never accuracy, and a bench on the GPU itself replaces it
# (make_dispatch_table.py adds its own entry). MINICPM_INT4_DISPATCH_SAME_ARCH=0 (before import) or
# SAME_ARCH = False: such a GPU runs "triton" everywhere, as one of another architecture always does.
SAME_ARCH_ENV = "MINICPM_INT4_DISPATCH_SAME_ARCH"
SAME_ARCH = os.environ.get(SAME_ARCH_ENV, "1") != "0"


def m_bucket(m: int) -> int:
    """Decode M is measured at 1, 2, 4, 8, 16: a query uses the next measured M at or above it."""
    b = 1
    while b < m:
        b *= 2
    return b


@functools.lru_cache(maxsize=None)
def load_table(path: str = TABLE_PATH) -> Dict:
    if not os.path.exists(path):
        if path == TABLE_PATH != PACKAGE_TABLE_PATH:  # named by the user: say so, once
            warnings.warn(f"{TABLE_ENV}={path}: no such file; backend='auto' uses the Triton kernels everywhere",
                          stacklevel=2)
        return {}
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _device_identity(index: int):
    """(name, compute capability as "9.0", SM count) of the CUDA device `index`."""
    import torch

    p = torch.cuda.get_device_properties(index)
    return p.name, f"{p.major}.{p.minor}", p.multi_processor_count


def table_entry_for(device_name: str, capability: Optional[str] = None, path: str = TABLE_PATH,
                    same_arch: Optional[bool] = None, sm_count: Optional[int] = None) -> Optional[str]:
    """The GPU whose measurements backend="auto" reads on `device_name`: its own entry; else, with `same_arch`
    (default SAME_ARCH) and the capability known, a measured GPU's of the same compute capability - of those,
    the one with the SM count nearest `sm_count` (the kernels' split-K plans and waves follow it), then the most
    W4A16 entries, then by name; else None (auto means "triton")."""
    devices = load_table(path).get("devices", {})
    if device_name in devices:
        return device_name
    if capability is None or not (SAME_ARCH if same_arch is None else same_arch):
        return None

    def sm_gap(e):
        return abs(e["sm_count"] - sm_count) if sm_count and e.get("sm_count") else math.inf

    kin = [(sm_gap(e), -len(e.get("w4a16", [])), name) for name, e in devices.items()
           if e.get("capability") == capability]
    return min(kin)[2] if kin else None


@functools.lru_cache(maxsize=None)
def _table_device(index: int, path: str, same_arch: bool) -> str:
    """The table entry (a GPU's name) the CUDA device `index` reads (callers pass SAME_ARCH: read per call)."""
    name, capability, sm_count = _device_identity(index)
    return table_entry_for(name, capability, path, same_arch, sm_count) or name


def _rules_for(device_name: str, table: Dict) -> Dict:
    entry = table.get("devices", {}).get(device_name)
    if not entry:
        return {}
    return {(r["n"], r["k"], r["m"]): r["times_ms"] for r in entry["w4a16"]}


@functools.lru_cache(maxsize=None)
def _cached_rules(device_name: str, path: str) -> Dict:
    return _rules_for(device_name, load_table(path))


@functools.lru_cache(maxsize=None)
def _prefill_ms(device_name: str, path: str) -> Dict:
    """(N, K) -> the sorted prefill M (> CUDA_MAX_M) this GPU's table has entries at."""
    return _measured_ms(device_name, path, CUDA_MAX_M + 1, None)


@functools.lru_cache(maxsize=None)
def _decode_ms(device_name: str, path: str) -> Dict:
    """(N, K) -> the sorted decode M of 2..16 rows this GPU's table has entries at."""
    return _measured_ms(device_name, path, 2, CUDA_MAX_M)


def _decode_entry_m(device_name: str, path: str, n: int, k: int, bucket: int) -> Optional[int]:
    """The measured decode M whose entry 2..16 rows of this bucket (the kernels' own: the next power of two) take:
    the bucket, else the measured decode M nearest it."""
    measured = _decode_ms(device_name, path).get((n, k))
    return _nearest_m(measured, bucket, lambda mm: mm) if measured else None


def _nearest_m(items, m: int, m_of):
    """The item whose M (m_of(item)) is nearest m on a log scale, the larger on a tie."""
    return min(items, key=lambda e: (abs(math.log2(m_of(e)) - math.log2(max(m, 1))), -m_of(e)))


def _measured_ms(device_name: str, path: str, first: int, last: Optional[int]) -> Dict:
    out: Dict = {}
    for n, k, m in _cached_rules(device_name, path):
        if m >= first and (last is None or m <= last):
            out.setdefault((n, k), []).append(m)
    return {nk: sorted(ms) for nk, ms in out.items()}


def w4a16_auto_backend(m: int, n: int, k: int, device_index: int, cuda_available: bool,
                       path: str = TABLE_PATH, device_name: Optional[str] = None) -> str:
    """"triton" or another candidate (CUDA_CANDIDATES, TRITON_CANDIDATES): the fastest measured for this GPU,
    (N, K) and M among those available (cuda_available: the extension is built); "triton" where nothing was
    measured."""
    return _w4a16_pick(m, n, k, cuda_available, path, device_name or _table_device(device_index, path, SAME_ARCH), DEQUANT_MAX_BYTES)


@functools.lru_cache(maxsize=4096)
def _w4a16_pick(m: int, n: int, k: int, cuda_available: bool, path: str, device_name: str,
                dequant_max_bytes: int) -> str:
    """w4a16_auto_backend's answer, once per (M, layer shape) and DEQUANT_MAX_BYTES (a module setting, read per
    call): every layer of every decode step asks (the table is read once per path, as load_table is)."""
    if m > CUDA_MAX_M:
        measured = [mm for mm in _prefill_ms(device_name, path).get((n, k), ()) if mm <= m]
        if not measured:
            return "triton"
        m = measured[-1]
    elif m > 1:  # 2..16 rows: the decode kernels stream W once whatever M
        m = _decode_entry_m(device_name, path, n, k, m_bucket(m))
        if m is None:
            return "triton"
    times = _cached_rules(device_name, path).get((n, k, m))
    if not times:
        return "triton"
    usable = {b: t for b, t in times.items() if (b not in CUDA_CANDIDATES or cuda_available)
              and (b != "triton-dq" or 2 * n * k <= dequant_max_bytes)}
    return min(usable, key=usable.get) if usable else "triton"


@functools.lru_cache(maxsize=None)
def _act_quant_rules(device_name: str, path: str) -> Dict:
    """K -> [(M, {backend: median ms})] of this GPU's measured activation-quantizer entries."""
    entry = load_table(path).get("devices", {}).get(device_name) or {}
    out: Dict = {}
    for r in entry.get("act_quant", []):
        out.setdefault(r["k"], []).append((r["m"], r["times_ms"]))
    return out


def act_quant_auto_backend(m: int, k: int, device_index: int, cuda_available: bool, path: str = TABLE_PATH,
                           device_name: Optional[str] = None) -> str:
    """An ACT_QUANT_CANDIDATES name for the per-token int8 quantizer of an [M, K] x: the fastest measured on
    this GPU at this K (rows are read whole, so K decides how each program works), at the measured M nearest
    M on a log scale (the larger on a tie), among those that can run ("cuda": the extension is built);
    "triton" where this K was not measured."""
    entries = _act_quant_rules(device_name or _table_device(device_index, path, SAME_ARCH), path).get(k)
    if not entries:
        return "triton"
    _, times = _nearest_m(entries, m, lambda e: e[0])
    usable = {c: t for c, t in times.items() if c in ACT_QUANT_CANDIDATES and (c != "cuda" or cuda_available)}
    return min(usable, key=usable.get) if usable else "triton"


@functools.lru_cache(maxsize=None)
def _w4a8_rules(device_name: str, path: str) -> Dict:
    """(N, K) -> (group size measured, [(M, {backend: median ms})]) of this GPU's W4A8 entries."""
    entry = load_table(path).get("devices", {}).get(device_name) or {}
    out: Dict = {}
    for r in entry.get("w4a8", []):
        out.setdefault((r["n"], r["k"]), (r["group_size"], []))[1].append((r["m"], r["times_ms"]))
    return out


def w4a8_auto_backend(m: int, n: int, k: int, group_size: int, device_index: int, cuda_available: bool,
                      path: str = TABLE_PATH, device_name: Optional[str] = None, wgmma_tokens=()) -> str:
    """A W4A8_CANDIDATES name for the W4A8 GEMM of an [M, K] x_q and an [N, K] weight of this group size: the
    fastest measured on this GPU for (N, K) at the measured M nearest M on a log scale (the larger on a
    tie) among those that can run here, if the bench measured this group size (each group ends in an epilogue
    of its own: the balance between the kernels moves with it); "triton" where nothing was measured.
    cuda_available: the extension is built and its W4A8 kernel takes K and the group size (the caller checks);
    wgmma_tokens: the block tokens its warpgroup-MMA kernel can be forced to on this GPU (the measured shape
    and group size are ones it takes: the bench ran it)."""
    g, entries = _w4a8_rules(device_name or _table_device(device_index, path, SAME_ARCH), path).get((n, k), (None, None))
    if not entries or g != group_size:
        return "triton"
    _, times = _nearest_m(entries, m, lambda e: e[0])
    need = lambda c: W4A8_CANDIDATES.get(c, False)  # noqa: E731 (False: a name this version does not know)
    usable = {c: t for c, t in times.items() if need(c) is None or (cuda_available and (
        need(c) == "cuda" or need(c) in wgmma_tokens))}
    return min(usable, key=usable.get) if usable else "triton"


def describe(device_name: Optional[str] = None, capability: Optional[str] = None,
             sm_count: Optional[int] = None) -> Dict:
    """The table "auto" reads: its path, whether MINICPM_INT4_DISPATCH_TABLE chose it, the GPUs it has
    measurements for and, given a GPU's name (and compute capability), how many rules it holds for that GPU -
    `this_device_entry` names the GPU they were measured on where it is another of the same capability (SAME_ARCH)
    (result files and `minicpm-int4 env` carry this, so that a profile says what "auto" ran on)."""
    table = load_table(TABLE_PATH)
    out = {"path": TABLE_PATH, "from_env": TABLE_PATH != PACKAGE_TABLE_PATH, "exists": os.path.exists(TABLE_PATH),
           "devices": sorted(table.get("devices", {}))}
    if device_name is not None:
        used = table_entry_for(device_name, capability, TABLE_PATH, sm_count=sm_count)
        entry = table.get("devices", {}).get(used) if used else None
        out["this_device"] = device_name
        if used is not None and used != device_name:
            out["this_device_entry"] = used
            out["this_device_capability"] = capability
        out["this_device_rules"] = len(entry["w4a16"]) if entry else 0
        out["this_device_act_quant_entries"] = len(entry.get("act_quant", [])) if entry else 0
        out["this_device_w4a8_entries"] = len(entry.get("w4a8", [])) if entry else 0
        out["this_device_picks"] = picks(entry) if entry else {}
    return out


def borrowed_from(described: Dict) -> str:
    """"" or, for a describe() whose GPU reads another's entry, the words that say whose (for reports)."""
    used = described.get("this_device_entry")
    if not used:
        return ""
    return (f", {used}'s (none of its own; the same compute capability {described.get('this_device_capability')}; "
            f"{SAME_ARCH_ENV}=0 turns this off)")


def picks(entry: Dict) -> Dict:
    """Per op of one GPU's table entry, how many entries each candidate wins (what "auto" runs there)."""
    return {op: dict(sorted(Counter(r["backend"] for r in entry.get(op, [])).items()))
            for op in ("w4a16", "act_quant", "w4a8")}


# candidate -> the M (first, last; None: any) it is a choice at; its bench rows are "w4a16-<candidate>"
_CANDIDATE_M = {"triton": (1, None), **{c: (1, CUDA_MAX_M) for c in CUDA_CANDIDATES},
                **{c: (CUDA_MAX_M + 1, None) for c in CUDA_PREFILL_CANDIDATES}, **TRITON_CANDIDATES}
_CANDIDATES = {f"w4a16-{c}": c for c in _CANDIDATE_M}  # bench row -> candidate


def _candidate(r: Dict) -> Optional[str]:
    cand = _CANDIDATES.get(r["backend"])
    if cand is None or r.get("check") != "ok":
        return None
    first, last = _CANDIDATE_M[cand]
    if r["m"] < first or (last is not None and r["m"] > last):
        return None
    return cand


def _act_quant_entries(bench: Dict) -> list:
    """Every (K, M) where the bench timed the Triton quantizer and another candidate (ACT_QUANT_CANDIDATES; a
    row whose output check failed is no time; runs before the check was recorded have none), with every
    candidate's median."""
    times: Dict = {}
    for r in bench.get("act_quant", []):
        if r["backend"] in ACT_QUANT_CANDIDATES and r.get("check", "ok") == "ok" and r.get("median_ms") is not None:
            times.setdefault((r["k"], r["m"]), {})[r["backend"]] = r["median_ms"]
    return [{"k": k, "m": m, "backend": min(t, key=t.get), "times_ms": dict(sorted(t.items()))}
            for (k, m), t in sorted(times.items()) if "triton" in t and len(t) >= 2]


def _w4a8_entries(bench: Dict) -> list:
    """Every (N, K, M) where the bench timed the Triton W4A8 path (quantizer + GEMM: `w4a8-triton`) and another
    candidate (`w4a8-<candidate>`: the CUDA one, a variant of either) with their checks passed, with every
    candidate's median and the bench's group size (one per bench run)."""
    gs = (bench.get("config") or {}).get("group_size", 128)
    rows = {f"w4a8-{c}": c for c in W4A8_CANDIDATES}
    times: Dict = {}
    for r in bench.get("rows", []):
        if r["backend"] in rows and r.get("check") == "ok":
            times.setdefault((r["n"], r["k"], r["m"]), {})[rows[r["backend"]]] = r["median_ms"]
    return [{"n": n, "k": k, "m": m, "group_size": gs, "backend": min(t, key=t.get), "times_ms": dict(sorted(t.items()))}
            for (n, k, m), t in sorted(times.items()) if "triton" in t and len(t) >= 2]


def table_from_bench(bench: Dict, existing: Optional[Dict] = None) -> Dict:
    """Add one GPU's measurements to a dispatch table: an entry for every (N, K, M) where another candidate was
    timed beside "triton" - those "triton" won too, since the lookups at an unmeasured M go by which M were
    measured - with every candidate's median and the fastest."""
    times: Dict = {}
    for r in bench["rows"]:
        cand = _candidate(r)
        if cand is not None:
            times.setdefault((r["n"], r["k"], r["m"]), {})[cand] = r["median_ms"]
    rules = []
    for (n, k, m), t in sorted(times.items()):
        if "triton" not in t or len(t) < 2:  # no baseline, or nothing beside it, measured: no claim
            continue
        rules.append({"n": n, "k": k, "m": m, "backend": min(t, key=t.get), "times_ms": dict(sorted(t.items()))})
    table = dict(existing or {})
    devices = dict(table.get("devices", {}))
    env = bench["env"]
    devices[env["device_name"]] = {"commit": env.get("commit"), "timestamp_utc": env.get("timestamp_utc"),
                                   "torch": env.get("torch"), "triton": env.get("triton"),
                                   # what another GPU of the same architecture matches on (table_entry_for)
                                   "capability": env.get("capability"), "sm_count": env.get("sm_count"),
                                   "w4a16": rules,
                                   "act_quant": _act_quant_entries(bench), "w4a8": _w4a8_entries(bench)}
    table["devices"] = devices
    return table
