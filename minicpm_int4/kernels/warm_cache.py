"""A warm Triton cache for a GPU session: the kernels the bench and the profile launch, compiled here.

    python -m minicpm_int4.kernels.warm_cache build [--out .tcache] [--models ...] [--ms ...]   (here, no GPU)
    python -m minicpm_int4.kernels.warm_cache install .tcache                                  (on the GPU)

A GPU session has 15 device minutes, and Triton compiles each kernel specialisation on the GPU machine's CPU the
first time it is launched: the bench's Triton rows (the GPU suite's models, M = 1 / 16 / 256 / 4096, every W4A16 and
W4A8 variant, each autotune config), an odd M's prefill (the profile's prompts) and the activation quantizers are
151 kernels, 72 s of compiling on this 2-core machine (triton 3.6), spent inside the bench's time budget - and by
the profile where it runs first, in a call of its own, which also compiles fla-core's 60 for MiniCPM-V 4.6's linear
attention (31 s here) where the call carries fla-core. `build` compiles the same specialisations here, through
Triton's own JIT: the real launchers run on CPU tensors under launch_check's stand-in driver (every autotune config
compiled, nothing run) with the target's SM count, so the block sizes, split-K and specialisation (16-byte aligned
pointers, ints divisible by 16 or equal to 1) are those the GPU run makes; fla-core's are called as transformers'
Qwen3.5 layer calls them, imported with torch.cuda's device queries answering as an H100 does (_fla_cases). It packs
each compiled kernel (cubin + metadata) with the parts of Triton's cache key that are the same on any machine: the
hash of the kernel's source and specialisation, and of its compile options.

`install`, on the GPU machine, recomputes each kernel's key there - that machine's Triton build (`triton_key()`:
its libtriton differs by Python version), backend hash (ptxas version and arch) and cache-invalidating environment
variables, through Triton's own `get_cache_key` - and writes the kernels into its cache (TRITON_CACHE_DIR, or
Triton's default), so that their first launch finds them. Only where the parts built here hold there: the same Triton
version, GPU target, ptxas (backend hash) and environment; else it installs nothing and says why. A launch whose
specialisation was not built (another SM count's plans, a shape or M the build did not cover) compiles as ever.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

FORMAT = 1
MANIFEST = "manifest.json"
ARCHIVE = "kernels.tar.xz"
# what the GPU suite's bench runs (benchmarks/run_gpu_suite.sh: --models, --max-n, --ms, and its Triton backends)
# plus M = 17, the specialisation of an M no multiple of 16 (a prompt's prefill in the profile)
SUITE_MODELS = ("minicpmv4.6", "llama3-v2.5")
SUITE_MAX_N = 30000
SUITE_MS = (1, 16, 17, 256, 4096)
SUITE_BACKENDS = ("w4a16-triton", "w4a16-triton-prefetch", "w4a16-triton-unsplit", "w4a16-triton-h2",
                  "w4a16-triton-direct", "w4a16-triton-trip32", "w4a16-triton-staged",
                  "w4a16-triton-dq", "w4a16-triton-rhs", "w4a8-triton", "w4a8-triton-flat")
# The profile's MiniCPM-V 4.6 linear-attention kernels (its Qwen3.5 layers run flash-linear-attention's fla-core where
# the suite carries it - benchmarks/fetch_peer_wheels.sh): its chunked gated delta rule autotunes ~60 kernels on the
# first prefill, its recurrent one decodes. Their specialisation follows the call transformers makes
# (models/qwen3_5: q and k repeated to the value heads, g in fp32, beta in the model's dtype, no initial state at the
# prefill, the final state kept, q / k L2-normalised in the kernel) on the profile's prompt: 512 text tokens and one
# 28 x 28-patch image, which MiniCPMV4_6Config()'s vision tower and merger make 49 tokens (tests/test_warm_cache.py
# checks it against the model classes).
FLA_PROMPT_TOKENS = 512 + 49
FLA_HEADS, FLA_HEAD_DIM = 32, 128  # MiniCPMV4_6Config(): linear_num_value_heads, linear_key / value_head_dim
FLA_DEVICE = ("NVIDIA H100 80GB HBM3", (9, 0))  # what fla's import-time checks see (IS_NVIDIA_HOPPER: any H100 / H200)


class _Hashed:
    """A stand-in for the source / options object Triton's get_cache_key asks `.hash()` of."""

    def __init__(self, value: str):
        self.value = value

    def hash(self) -> str:
        return self.value


def _cache_key_hash(src_hash: str, backend_hash: str, options_hash: str, env_vars: Dict) -> str:
    """The cache directory's key of a kernel, as triton.compiler.compile makes it (this Triton's key format)."""
    from triton.runtime.cache import get_cache_key

    key = get_cache_key(_Hashed(src_hash), _Hashed(backend_hash), _Hashed(options_hash), env_vars)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _env_vars() -> Dict:
    from triton._C.libtriton import get_cache_invalidating_env_vars

    return dict(get_cache_invalidating_env_vars())


def unsupported_triton() -> Optional[str]:
    """Why this triton cannot build or key a warm cache, or None: the cache names a kernel by the hash of
    triton.runtime.cache.get_cache_key's key (triton 3.6, the GPU image's, has it; 3.4 has not)."""
    import triton
    import triton.runtime.cache

    if not hasattr(triton.runtime.cache, "get_cache_key"):
        return (f"triton {triton.__version__} has no triton.runtime.cache.get_cache_key, by whose key a warm cache "
                "names its kernels: build it with the GPU machine's triton (3.6 on this workplace's image)")
    return None


@contextlib.contextmanager
def _recording_keys(sink: Dict[str, Dict]):
    """Every compile's key parts, by the hash its cache directory is named after."""
    import triton.compiler.compiler as tcc

    original = tcc.get_cache_key

    def record(src, backend, options, env_vars):
        key = original(src, backend, options, env_vars)
        sink[hashlib.sha256(key.encode("utf-8")).hexdigest()] = {
            "name": src.name[:150], "src_hash": src.hash(), "options_hash": options.hash(),
            "backend_hash": backend.hash(), "env": sorted(env_vars.items())}
        return key

    tcc.get_cache_key = record
    try:
        yield
    finally:
        tcc.get_cache_key = original


def _random_int4(w: torch.Tensor, group_size: int):
    """Packed words, scales and zeros of w's shape and dtype with random values: a launch's specialisation
    depends on shapes, dtypes and alignment only, and quantizing the models' largest layers on a CPU takes long."""
    n, k = w.shape
    if group_size != -1 and k % group_size:  # (as quantize_rtn refuses it: the bench records that shape's error)
        raise ValueError(f"weight of shape [N={n}, K={k}]: K is not divisible by group_size={group_size}")
    groups = 1 if group_size == -1 else k // group_size
    return (torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32),
            torch.rand(n, groups, dtype=w.dtype) + 0.5, torch.randint(0, 16, (n, groups)).to(w.dtype))


def _cases(models, max_n, ms, backends, group_size, dtype):
    """[(label, call)]: the bench's Triton launches (bench/micro.py, bench/backends.py) as it makes them."""
    from .. import ops
    from ..bench import backends as bench_backends
    from ..bench.micro import _act_quant_variant
    from ..bench.shapes import all_shapes

    shapes = [s for s in all_shapes(tuple(models)) if s.n <= max_n]
    chosen = [b for b in bench_backends.select_backends(list(backends)) if b.name != "fp16"]
    not_triton = [b.name for b in chosen if not getattr(b, "backend", "").startswith("triton")]
    if not_triton:
        raise ValueError(f"warm_cache: {not_triton} run no Triton kernel; choose from the w4a16-triton* / w4a8-triton* "
                         "backends")
    cases = []
    if any(b.name.startswith("w4a8") for b in chosen):  # the bench times the quantizers where W4A8 is in the run
        for k in sorted({s.k for s in shapes if s.ms is None}):
            for m in ms:
                for name in ("triton", "triton-4w", "triton-16w"):
                    def quant(m=m, k=k, name=name):
                        op_backend, switch = _act_quant_variant(name)
                        with switch:
                            ops.quantize_per_token_int8(torch.randn(m, k, dtype=dtype), op_backend)
                    cases.append((f"act_quant {name} M={m} K={k}", quant))
    for s in shapes:
        for b in chosen:
            shape_ms = [m for m in ms if b.supports(m) and (s.ms is None or m in s.ms)]
            if shape_ms:
                def run(s=s, b=b, shape_ms=shape_ms):  # one weight a (shape, backend), every M
                    prepared = b.prepare(torch.empty(s.n, s.k, dtype=dtype), group_size)
                    for m in shape_ms:
                        prepared.run(torch.randn(m, s.k, dtype=dtype))
                cases.append((f"{s.label} {b.name} M={','.join(map(str, shape_ms))}", run))
    return cases


@contextlib.contextmanager
def _as_cuda_device(name: str, capability):
    """torch.cuda's device queries answered as on that GPU (fla-core's import-time hardware checks ask torch, not
    Triton's driver); launch_check's stand-in driver answers Triton's."""
    names = ("is_available", "device_count", "current_device", "get_device_name", "get_device_capability")
    saved = {n: getattr(torch.cuda, n) for n in names}
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda *a, **k: name
    torch.cuda.get_device_capability = lambda *a, **k: tuple(capability)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.cuda, n, f)


def _fla_cases(prompt_tokens: int, heads: int, dim: int, dtype):
    """([(label, call)], fla version or None, why not): the profile's linear-attention kernels through fla-core, as
    transformers' Qwen3.5 layer calls them (prefill: the chunked gated delta rule; decode: the recurrent one).
    Imported here, under the stand-in driver and _as_cuda_device, so that its import-time checks see the GPU; its
    autotuners time each config by launch_check's scripted timings (every config compiled)."""
    import gc
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        return [], None, "fla-core is not installed"
    import importlib.metadata

    from triton.runtime.autotuner import Autotuner

    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - an fla-core this Triton / torch cannot import: the rest is still built
        return [], None, f"fla-core did not import: {type(e).__name__}: {str(e)[:200]}"

    import warnings

    from . import launch_check

    with warnings.catch_warnings():  # (looking at every live object touches deprecated torch attributes)
        warnings.simplefilter("ignore")
        tuners = [o for o in gc.get_objects() if isinstance(o, Autotuner)]
    # (each config timed by a hash of the stand-in's record of its launch, as the package's own tuners are)
    launch_check._scripted_timings(*[t for t in tuners if _kernel_module(t).startswith("fla.")])

    def inputs(t):
        qkv = [torch.randn(1, t, heads, dim, dtype=dtype) for _ in range(3)]
        return qkv, -torch.rand(1, t, heads, dtype=torch.float32), torch.rand(1, t, heads, dtype=dtype)

    def prefill():
        (q, k, v), g, beta = inputs(prompt_tokens)
        chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, cu_seqlens=None)

    def decode():
        (q, k, v), g, beta = inputs(1)
        state = torch.randn(1, heads, dim, dim, dtype=torch.float32)
        fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=state, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True, cu_seqlens=None)

    version = importlib.metadata.version("fla-core")
    return [(f"fla {version} chunk_gated_delta_rule T={prompt_tokens}", prefill),
            (f"fla {version} fused_recurrent_gated_delta_rule T=1", decode)], version, None


def _kernel_module(tuner) -> str:
    """The module that defined an autotuner's kernel (through heuristics wrappers: each holds the next as `fn`)."""
    obj = tuner
    while obj is not None:
        obj = getattr(obj, "fn", None)
        module = getattr(obj, "__module__", None)
        if isinstance(module, str) and not module.startswith("triton."):
            return module
    return ""


@contextlib.contextmanager
def _on_target(capability: int, sms: int):
    """The package's Triton kernels compiled for a `capability` GPU with `sms` SMs, not run: launch_check's stand-in
    driver, the package's autotuners timing each config by a hash of its launch (every config compiled), the decode
    plans made for that SM count."""
    from . import launch_check, w4a8, w4a16

    saved_sms = w4a16.num_sms
    tuners = (w4a16._w4a16_decode_kernel, w4a16._w4a16_prefill_kernel, w4a8._w4a8_gemm_kernel)
    saved_bench = [getattr(t, "kernel", t).__dict__.get("do_bench") for t in tuners]
    with launch_check.stand_in_driver(capability):
        launch_check._scripted_timings(*tuners)
        w4a16.num_sms = lambda device: sms
        try:
            yield
        finally:
            w4a16.num_sms = saved_sms
            for t, d in zip(tuners, saved_bench):
                tuner = getattr(t, "kernel", t)
                if d is None:
                    tuner.__dict__.pop("do_bench", None)
                else:
                    tuner.do_bench = d


@contextlib.contextmanager
def _compiling_for(capability: int, sms: int):
    """The bench's launchers as on a `capability` GPU with `sms` SMs (_on_target), their kernels compiled and
    recorded, not run: the ops taking "triton" on CPU tensors, bench weights random, and the whole-weight path's
    matmul skipped."""
    from .. import ops
    from ..bench import backends as bench_backends

    saved = (ops.resolve_backend, bench_backends._int4, torch.nn.functional.linear)
    with _on_target(capability, sms):
        ops.resolve_backend = lambda backend, device, op, shape=None: backend
        bench_backends._int4 = _random_int4
        # (triton-dq's torch matmul of a dequantized weight nobody computed: its shape is all that matters)
        torch.nn.functional.linear = lambda x, w, b=None: x.new_empty(*x.shape[:-1], w.shape[0])
        try:
            yield
        finally:
            ops.resolve_backend, bench_backends._int4, torch.nn.functional.linear = saved


# the files whose code the compiled kernels come from (the tooling beside them in kernels/ changes no kernel)
KERNEL_SOURCES = ("__init__.py", "_common.py", "act_quant.py", "w4a16.py", "w4a8.py")


def _kernels_digest() -> str:
    """sha256 of the Triton kernels' source files: a warm cache built from other sources has other keys."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in KERNEL_SOURCES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def build(out_dir: str, models: Sequence[str] = SUITE_MODELS, ms: Sequence[int] = SUITE_MS,
          backends: Sequence[str] = SUITE_BACKENDS, max_n: int = SUITE_MAX_N, group_size: int = 128,
          capability: int = 90, sms: int = 132, dtype: torch.dtype = torch.float16, progress: bool = True,
          fla_tokens: Optional[int] = FLA_PROMPT_TOKENS, tests: Sequence[str] = (), test_jobs: Optional[int] = None,
          test_seconds: int = 30) -> Dict:
    """Compile the cases (_cases; and, where fla-core is installed and fla_tokens is not None, the profile's
    linear-attention kernels: _fla_cases; and, where `tests` names test files, the Triton launches of their
    gpu-marked tests: _test_pass) for the target into a fresh Triton cache and pack them into out_dir
    (manifest.json + kernels.tar.xz). Returns the manifest. Needs the kernels compiled, not interpreted."""
    import triton

    from . import INTERPRET, _launch

    if INTERPRET:
        raise RuntimeError("warm_cache.build compiles the kernels: run it without TRITON_INTERPRET=1")
    why = unsupported_triton()
    if why:
        raise RuntimeError(f"warm_cache.build: {why}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_manager

    keys: Dict[str, Dict] = {}
    failed: List[str] = []
    t0 = time.monotonic()
    saved_dir = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir  # only this build's kernels (Triton reads it at each compile)
        try:
            with _compiling_for(capability, sms), _recording_keys(keys):
                fla_cases, fla_version, fla_skipped = [], None, "not asked for"
                if fla_tokens is not None:
                    # (first: fla is imported here, under the stand-in, before transformers' models import it)
                    with _as_cuda_device(*FLA_DEVICE):
                        fla_cases, fla_version, fla_skipped = _fla_cases(fla_tokens, FLA_HEADS, FLA_HEAD_DIM, dtype)
                        _run_cases(fla_cases, failed, progress, "warm cache (fla)")
                cases = _cases(models, max_n, ms, backends, group_size, dtype)
                _run_cases(cases, failed, progress, "warm cache")
            tests_report = {"paths": list(tests), "count": 0, "skipped": "not asked for"}
            if tests:  # (in processes of their own: the tests run under python -O, their checks not enforced)
                tests_report = _test_pass(list(tests), capability, sms, test_jobs, test_seconds, cache_dir, keys,
                                          failed, progress)
            target = GPUTarget("cuda", capability, 32)
            binary_ext = make_backend(target).binary_ext
            entries = []
            os.makedirs(out_dir, exist_ok=True)
            tmp_archive = os.path.join(out_dir, ARCHIVE + ".tmp")
            with tarfile.open(tmp_archive, "w:xz") as tar:
                for h, parts in sorted(keys.items()):
                    meta_name = f"{parts['name']}.json"
                    group = get_cache_manager(h).get_group(meta_name) or {}
                    files = {f: p for f, p in group.items() if f == meta_name or f.endswith("." + binary_ext)}
                    if len(files) != 2:  # (a compile that failed left no group)
                        continue
                    for f, p in sorted(files.items()):
                        tar.add(p, arcname=f"{h}/{f}")
                    entries.append({"hash": h, "name": parts["name"], "src_hash": parts["src_hash"],
                                    "options_hash": parts["options_hash"], "files": sorted(files)})
            os.replace(tmp_archive, os.path.join(out_dir, ARCHIVE))
        finally:
            if saved_dir is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_dir
    backend_hashes = {p["backend_hash"] for p in keys.values()}
    envs = {json.dumps(p["env"]) for p in keys.values()}
    manifest = {
        "format": FORMAT, "triton": triton.__version__,
        "target": {"backend": "cuda", "arch": capability, "warp_size": 32},
        "sms": sms, "backend_hash": backend_hashes.pop() if len(backend_hashes) == 1 else None,
        "env": json.loads(envs.pop()) if len(envs) == 1 else None,
        "kernels_digest": _kernels_digest(), "commit": _commit(),
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_s": round(time.monotonic() - t0, 1),
        "cases": {"models": list(models), "ms": list(ms), "backends": list(backends), "max_n": max_n,
                  "group_size": group_size, "dtype": str(dtype).replace("torch.", ""), "count": len(cases)},
        "fla": {"version": fla_version, "prompt_tokens": fla_tokens, "heads": FLA_HEADS, "head_dim": FLA_HEAD_DIM,
                "device": FLA_DEVICE[0], "count": len(fla_cases), "skipped": fla_skipped},
        "tests": tests_report,
        "failed": failed, "fast_launch": _launch._SUPPORTED, "entries": entries}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _test_pass(tests: List[str], capability: int, sms: int, jobs: Optional[int], seconds: int, cache_dir: str,
               keys: Dict[str, Dict], failed: List[str], progress: bool) -> Dict:
    """The gpu-marked tests of `tests` (files, as the GPU suite's gpu-tests stage names them: relative to the
    working directory) run by _warm_tests in `jobs` processes at once (default: one a core, at most 4; each capped
    at its share of the free memory - a test's host work on the largest shapes holds 10 GB and more), each on a
    share of them, compiling into cache_dir; their
    compiles' key parts join `keys`, a process that fails joins `failed`. Returns what the manifest says of it: the
    files, the kernels compiled, the tests' outcomes (not results: their kernels never run here), those stopped past
    `seconds` and the failed ones with their errors (their later launches not compiled)."""
    import subprocess

    jobs = max(1, jobs or min(os.cpu_count() or 1, 4))
    # each process's data memory capped at its share of what the host has free: a test past it fails (its later
    # launches not built) where the kernel's out-of-memory killer would take the whole process
    share_gb = _available_memory_gb() * 0.85 / jobs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (the gpu-tests stage's setting: each autotuner times every config, so each is compiled)
    env.update(TRITON_CACHE_DIR=cache_dir, MINICPM_INT4_AUTOTUNE_CACHE="0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))  # (the host references' share)
    before = set(keys)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        procs = []
        for i in range(jobs):
            out, done = os.path.join(work, f"keys{i}.json"), os.path.join(work, f"progress{i}")
            cmd = [sys.executable, "-O", "-m", "minicpm_int4.kernels._warm_tests", "--keys", out, "--capability",
                   str(capability), "--sms", str(sms), "--test-seconds", str(seconds), "--shard", f"{i}/{jobs}",
                   "--progress", done, *(["--max-memory-gb", f"{share_gb:.1f}"] if share_gb > 0 else []),
                   "--", "-m", "gpu", *tests]
            log = open(os.path.join(work, f"log{i}"), "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out, done, log))
        bar, shown = _progress(None, progress, "warm cache (tests)"), 0
        while any(p.poll() is None for p, *_ in procs):
            time.sleep(1)
            totals = [d + ".total" for _, _, d, _ in procs]
            if getattr(bar, "total", 0) is None and all(os.path.exists(t) for t in totals):
                with contextlib.suppress(ValueError):  # (a total being written)
                    bar.total = sum(int(open(t).read()) for t in totals)
            ended = sum(os.path.getsize(d) for _, _, d, _ in procs if os.path.exists(d))
            bar.update(ended - shown)
            shown = ended
        bar.close()
        report = {"paths": tests, "jobs": jobs, "tests": {}, "stopped": [], "failed": [], "count": 0, "skipped": None}
        for i, (p, out, _, log) in enumerate(procs):
            log.close()
            if p.returncode != 0:  # (what it compiled until then, and what the others compiled, is still built)
                with open(log.name) as f:
                    tail = [ln for ln in f.read().splitlines() if ln.strip()][-12:]
                failed.append(f"the tests' pass {i}/{jobs} ({' '.join(tests)}) ended with exit code {p.returncode}: "
                              + " | ".join(tail)[-1500:])
            if not os.path.exists(out):
                continue
            with open(out) as f:
                result = json.load(f)
            keys.update(result["keys"])
            for outcome, n in result["tests"].items():
                report["tests"][outcome] = report["tests"].get(outcome, 0) + n
            report["stopped"] += result["stopped"]
            report["failed"] += result["failed"]
    report["count"] = len(set(keys) - before)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def _available_memory_gb() -> float:
    """The host's available memory (Linux: MemAvailable), 0 where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _run_cases(cases, failed: List[str], progress: bool, desc: str) -> None:
    bar = _progress(len(cases), progress, desc)
    for label, call in cases:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - one case's failure is reported, the rest still built
            failed.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
        bar.update(1)
    bar.close()


def _commit() -> Optional[str]:
    import subprocess

    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
        return (head + ("+uncommitted changes" if dirty else "")) or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _progress(total: Optional[int], enabled: bool, desc: str = "warm cache"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # (tqdm comes with transformers; a bare install goes without the bar)
        tqdm = None
    if enabled and tqdm is not None:
        return tqdm(total=total, desc=desc, unit="case" if total else "test")

    class _Silent:
        def update(self, n):
            pass

        def close(self):
            pass
    return _Silent()


def mismatch(manifest: Dict, target=None) -> List[str]:
    """Why this machine's Triton would not look the built kernels up under the keys install writes: [] where it
    would (the same Triton version, GPU target, backend hash - ptxas and arch - and cache-invalidating env vars)."""
    import triton
    from triton.compiler.compiler import make_backend
    from triton.runtime.driver import driver

    if manifest.get("format") != FORMAT:
        return [f"manifest format {manifest.get('format')!r}, this reader's is {FORMAT}"]
    why = []
    if manifest["triton"] != triton.__version__:
        why.append(f"built with triton {manifest['triton']}, this is {triton.__version__}")
    target = target or driver.active.get_current_target()
    built = manifest["target"]
    if (target.backend, target.arch, target.warp_size) != (built["backend"], built["arch"], built["warp_size"]):
        why.append(f"built for {built['backend']} {built['arch']}, this GPU is {target.backend} {target.arch}")
        return why
    backend_hash = make_backend(target).hash()
    if manifest["backend_hash"] != backend_hash:
        why.append("another backend (ptxas) than the build's: "
                   f"{_first_line(manifest['backend_hash'])!r} / {_first_line(backend_hash)!r}")
    env = sorted(_env_vars().items())
    if json.loads(json.dumps(env)) != manifest["env"]:
        why.append(f"cache-invalidating environment variables {env} here, {manifest['env']} at the build")
    return why


def _first_line(text) -> str:
    lines = [ln for ln in str(text).splitlines() if "release" in ln] or str(text).splitlines() or [""]
    return lines[0].strip()


def install(src_dir: str, target=None) -> Dict:
    """Write the built kernels into this machine's Triton cache under the keys its Triton computes (for `target`,
    default the GPU's). {"installed", "present", "entries", "skipped": [reasons] (nothing installed), "cache_dir",
    "stale": the kernel sources changed since the build (their launches miss and compile), "built"}."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_manager
    from triton.runtime.driver import driver

    with open(os.path.join(src_dir, MANIFEST)) as f:
        manifest = json.load(f)
    report = {"entries": len(manifest.get("entries", [])), "installed": 0, "present": 0, "skipped": [],
              "stale": manifest.get("kernels_digest") != _kernels_digest(), "cache_dir": None,
              "built": {k: manifest.get(k) for k in ("triton", "sms", "commit", "made")}}
    target = target or driver.active.get_current_target()
    why = mismatch(manifest, target)
    if why:
        report["skipped"] = why
        return report
    backend_hash, env = make_backend(target).hash(), _env_vars()
    with tarfile.open(os.path.join(src_dir, ARCHIVE), "r:xz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for e in manifest["entries"]:
            h = _cache_key_hash(e["src_hash"], backend_hash, e["options_hash"], env)
            manager = get_cache_manager(h)
            report["cache_dir"] = os.path.dirname(manager.cache_dir)
            meta_name = f"{e['name']}.json"
            if manager.get_group(meta_name) is not None:
                report["present"] += 1
                continue
            group = {}
            for f in e["files"]:
                data = tar.extractfile(members[f"{e['hash']}/{f}"]).read()
                if f == meta_name:  # the metadata names its kernel's hash: this machine's
                    meta = json.loads(data)
                    meta["hash"] = h
                    group[f] = manager.put(json.dumps(meta), f, binary=False)
                else:
                    group[f] = manager.put(data, f, binary=True)
            manager.put_group(meta_name, group)
            report["installed"] += 1
    return report


def cache_entries(cache_dir: Optional[str] = None) -> int:
    """Compiled kernels in a Triton cache (TRITON_CACHE_DIR, or Triton's default): directories holding a group."""
    if cache_dir is None:
        try:
            from triton import knobs

            cache_dir = knobs.cache.dir
        except ImportError:  # (triton < 3.4)
            cache_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    n = 0
    for d in os.listdir(cache_dir):
        path = os.path.join(cache_dir, d)
        if os.path.isdir(path) and any(f.startswith("__grp__") and not f.endswith(".autotune.json")
                                       for f in os.listdir(path)):
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the suite's Triton kernels here (no GPU) into --out")
    b.add_argument("--out", default=".tcache")
    b.add_argument("--models", default=",".join(SUITE_MODELS))
    b.add_argument("--ms", default=",".join(map(str, SUITE_MS)))
    b.add_argument("--backends", default=",".join(SUITE_BACKENDS))
    b.add_argument("--max-n", type=int, default=SUITE_MAX_N)
    b.add_argument("--capability", type=int, default=90)
    b.add_argument("--sms", type=int, default=132, help="the target's SM count (H100 SXM / H200: 132)")
    b.add_argument("--fla-tokens", type=int, default=FLA_PROMPT_TOKENS,
                   help="the profile's prompt length for fla-core's kernels (where installed); 0: leave them out")
    b.add_argument("--tests", default="", help="test files (e.g. tests/test_gpu.py) whose gpu-marked tests' Triton "
                   "launches are compiled too: the tests run here on CPU tensors, their checks not enforced (needs pytest)")
    b.add_argument("--test-jobs", type=int, default=None, help="the tests' processes at once (default: a core each, "
                   "at most 4)")
    b.add_argument("--test-seconds", type=int, default=30, help="each test's time limit here")
    i = sub.add_parser("install", help="on the GPU: the built kernels into this machine's Triton cache")
    i.add_argument("src", nargs="?", default=".tcache")
    args = p.parse_args(argv)
    if args.cmd == "build":
        m = build(args.out, [s for s in args.models.split(",") if s], [int(v) for v in args.ms.split(",")],
                  [s for s in args.backends.split(",") if s], args.max_n, capability=args.capability, sms=args.sms,
                  fla_tokens=args.fla_tokens or None, tests=[t for t in args.tests.split(",") if t],
                  test_jobs=args.test_jobs, test_seconds=args.test_seconds)
        print(f"[warm-cache] {len(m['entries'])} kernels for {m['target']['backend']} {m['target']['arch']} "
              f"({m['sms']} SMs), triton {m['triton']}, from {m['cases']['count']} launches in {m['build_s']} s -> "
              f"{args.out} ({os.path.getsize(os.path.join(args.out, ARCHIVE)) / 2**20:.1f} MiB)")
        fla = m["fla"]
        print(f"[warm-cache] fla-core {fla['version']}: {fla['count']} calls" if fla["version"]
              else f"[warm-cache] fla-core's kernels left out: {fla['skipped']}")
        t = m["tests"]
        if t["paths"]:
            outcomes = ", ".join(f"{n} {o}" for o, n in sorted(t["tests"].items()))
            print(f"[warm-cache] {','.join(t['paths'])}: {t['count']} more kernels from its gpu tests ({outcomes} here, "
                  f"where their kernels never run; {len(t['stopped'])} stopped past the time limit) in {t['seconds']} s")
            for f in t["failed"]:  # (each stopped there: what it would have launched next is not built)
                print(f"[warm-cache]   stopped: {f}")
        for f in m["failed"]:
            print(f"[warm-cache] failed: {f}")
        return 1 if m["failed"] else 0
    if args.cmd == "install":
        if not os.path.exists(os.path.join(args.src, MANIFEST)):
            print(f"[warm-cache] no {MANIFEST} in {args.src}: nothing to install "
                  "(python -m minicpm_int4.kernels.warm_cache build, where the GPU image's triton is installed)")
            return 0
        r = install(args.src)
        built = r["built"]
        if r["skipped"]:
            print(f"[warm-cache] nothing installed: {'; '.join(r['skipped'])}")
        else:
            print(f"[warm-cache] {r['installed']} kernels installed, {r['present']} already there, of {r['entries']} "
                  f"built for {built['sms']} SMs at {built['commit'] or '?'} ({built['made']}) -> {r['cache_dir']}")
            if r["stale"]:
                print("[warm-cache] the kernels' sources changed since the build: their launches compile anew "
                      "(build it again)")
            if torch.cuda.is_available():
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                if sms != built["sms"]:
                    print(f"[warm-cache] this GPU has {sms} SMs: launches whose plans depend on it compile anew")
    return 0


if __name__ == "__main__":
    sys.exit(main())
