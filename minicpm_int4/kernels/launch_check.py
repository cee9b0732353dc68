"""Checks and host costs of the fast launch path (kernels/_launch.py) without a GPU.

    python -m minicpm_int4.kernels.launch_check [--check] [--cost] [--calls N]

A stand-in Triton driver compiles every kernel for real (sm_90 by default; ptxas, as kernels/aot.py)
and replaces what needs a GPU: loading a binary names it by its hash, a launch is recorded instead
of run, the stream is 0. Autotuners time each config by a hash of its launch, so that
the winner changes from one tuned key to the next.
Then:
- --check: every launch site of the package (W4A16 GEMV with and without its split-K workspace and
  input scale / permutation, the split-K reduce, the decode and prefill kernels, the dequantization,
  W4A8, the quantizer) is called with the fast path off (Triton's own launch) and on; both must hand
  their launcher the same compiled kernel (by hash), grid, stream and arguments, and the fast path
  must have been taken. A probe kernel is then called over argument variations of every kind
  (ints 1 / 16 / 17 / past int32 / negative, unaligned and re-typed tensors, None, bools, floats,
  constexpr and option keywords, an autotuned variant keyed by an int) in an order that revisits
  them: each call must launch the kernel Triton picks for it.
- --cost: the host time of each site's call (checks, planning, allocation, Triton's launch up to the
  launcher; the launcher itself is the stand-in's and costs both paths the same), both ways.
Prints one JSON object. Needs the kernels compiled, not interpreted: run it without TRITON_INTERPRET=1.
"""
import argparse
import contextlib
import hashlib
import json
import sys
import time

import torch
import triton
import triton.language as tl

RECORDS = []


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        handle = int(hashlib.sha1(bytes(kernel)).hexdigest()[:12], 16)
        return handle, handle, 32, 0, 1024


class _Launcher:
    def __init__(self, src, metadata):
        self.name = getattr(getattr(src, "fn", None), "__name__", "?")

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        RECORDS.append((self.name, (gx, gy, gz), stream, function, args))


def _driver_class(capability):
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class StandInDriver(CudaDriver):
        def __init__(self):  # (not CudaDriver's: it asks torch for a GPU)
            self.utils = _Utils()
            self.launcher_cls = _Launcher
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: divmod(capability, 10)
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

    return StandInDriver


@contextlib.contextmanager
def stand_in_driver(capability: int = 90):
    """Triton's active driver replaced by the stand-in inside the block."""
    from triton.runtime.driver import driver

    from . import _common

    saved, saved_cap = dict(driver.__dict__), _common.target_capability  # (its attributes differ by version)
    driver.set_active(_driver_class(capability)())
    _common.target_capability = lambda device=None: capability  # (the launchers ask torch.cuda otherwise)
    try:
        yield
    finally:
        driver.__dict__.clear()
        driver.__dict__.update(saved)
        _common.target_capability = saved_cap


TIMED = []  # one entry per config an autotuner timed (--tune)


def _scripted_timings(*kernels):
    """Autotuners time a config by a hash of what it launched (compiled kernel and int arguments): which
    config wins changes from one tuned key to the next, deterministically, so a launch that reused
    another key's config would show."""
    for k in kernels:
        tuner = getattr(k, "kernel", k)

        def do_bench(fn, quantiles=None):
            TIMED.append(1)
            RECORDS.clear()
            fn()
            _, grid, _, function, args = RECORDS[-1]
            ints = tuple(a for a in args if isinstance(a, int) and not isinstance(a, bool))
            t = float(int(hashlib.sha1(repr((function, grid, ints)).encode()).hexdigest()[:8], 16) % 1000)
            return [t, t, t] if quantiles else t

        tuner.do_bench = do_bench


def _fused_prefill(*args):
    """The fused prefill kernel's launch whatever w4a16.PREFILL_DEQUANT says."""
    from . import w4a16

    with w4a16._setting("PREFILL_DEQUANT", False):
        return w4a16.w4a16_gemm_triton(*args)


def _sites():
    """[(name, call)]: every launch site of the package, on small shapes that cross its branches."""
    from .. import ops
    from . import act_quant, w4a8, w4a16

    g = 128
    n, k = 256, 1024
    qw = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32)
    s = torch.rand(n, k // g, dtype=torch.float16) + 0.5
    z = torch.randint(0, 16, (n, k // g)).to(torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    ws = ops.w4a16_workspace(n)
    x1, x4, x64 = (torch.randn(m, k, dtype=torch.float16) for m in (1, 4, 64))
    m_scale = torch.rand(k, dtype=torch.float16) + 0.5
    perm = torch.randperm(k).to(torch.int32)
    xq = torch.randint(-127, 128, (64, k), dtype=torch.int8)
    xs = torch.rand(64, dtype=torch.float32)
    qw_pc = torch.randint(-2**31, 2**31 - 1, (n, 4304 // 8), dtype=torch.int32)
    s_pc, z_pc = torch.rand(n, 1, dtype=torch.float16), torch.randint(0, 16, (n, 1)).to(torch.float16)
    x_pc = torch.randn(1, 4304, dtype=torch.bfloat16)
    return [
        ("gemv, split K, reduce launch", lambda: w4a16.w4a16_gemm_triton(x1, qw, s, z, None, g)),
        ("gemv, split K, workspace", lambda: w4a16.w4a16_gemm_triton(x1, qw, s, z, bias, g, workspace=ws)),
        ("gemv, input scale + perm", lambda: w4a16.w4a16_gemm_triton(x1, qw, s, z, None, g, workspace=ws,
                                                                     input_scale=m_scale, input_perm=perm)),
        ("gemv, per channel, bf16", lambda: w4a16.w4a16_gemm_triton(x_pc, qw_pc, s_pc.bfloat16(), z_pc.bfloat16(),
                                                                    None, 4304)),
        ("decode M=4", lambda: w4a16.w4a16_gemm_triton(x4, qw, s, z, bias, g, workspace=ws)),
        ("decode M=4, no workspace", lambda: w4a16.w4a16_gemm_triton(x4, qw, s, z, None, g)),
        ("prefill M=64, fused", lambda: _fused_prefill(x64, qw, s, z, bias, g)),
        ("dequantize", lambda: w4a16.dequantize_triton(qw, s, z, g)),
        ("w4a8 M=64", lambda: w4a8.w4a8_gemm_triton(xq, xs, qw, s, z, bias, g, torch.float16)),
        ("act quant M=64", lambda: act_quant.quantize_per_token_int8_triton(x64)),
        ("act quant M=1, scale + perm", lambda: act_quant.quantize_per_token_int8_triton(x1, m_scale, perm)),
    ]


def _normal(record, inputs):
    """A launch record with tensors as (dtype, shape, strides, offset, input-or-new): the calls allocate
    their outputs afresh."""
    name, grid, stream, function, args = record
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, tuple(a.shape), a.stride(), a.storage_offset(),
                        "input" if a.untyped_storage().data_ptr() in inputs else "new"))
        else:
            out.append(a)
    return name, grid, stream, function, tuple(out)


def _run(call):
    RECORDS.clear()
    call()
    return list(RECORDS)


def check_sites():
    from . import _launch

    results = []
    for name, call in _sites():
        inputs = {t.untyped_storage().data_ptr() for t in _closure_tensors(call)}
        _launch.ENABLED = False
        _run(call)  # compiles (and tunes)
        slow = [_normal(r, inputs) for r in _run(call)]
        _launch.ENABLED = True
        before = _fast_launches()
        _run(call)  # records the entries
        fast = [_normal(r, inputs) for r in _run(call)]
        taken = _fast_launches() - before
        problem = None
        if not slow:
            problem = "no launch recorded"
        elif fast != slow:
            problem = f"launches differ: triton {slow} / fast {fast}"
        elif taken < len(fast):
            problem = f"{len(fast)} launch(es), {taken} through the fast path"
        results.append({"site": name, "launches": len(slow), "kernels": [r[0] for r in slow], "problem": problem})
    return results


def _closure_tensors(fn):
    cells = [c.cell_contents for c in (fn.__closure__ or ())]
    return [c for c in cells if isinstance(c, torch.Tensor)]


def _fast_launches() -> int:
    from . import _launch

    return sum(k.launches for k in _launch.LAUNCHERS)


@triton.jit
def _probe_body(p_ptr, q_ptr, n, m, f, b, N: tl.constexpr, FLAG: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(p_ptr + offs, mask=offs < n, other=0).to(tl.float32)
    if FLAG:
        v = v * f
    if b:
        v = v + 1
    tl.store(q_ptr + offs * m, v.to(q_ptr.dtype.element_ty), mask=offs < n)


def _probe_kernels():
    """(plain, autotuned, autotuned with a config pre_hook, the hook's calls): the probe as three kernels."""
    from ._launch import fast_launch

    @triton.jit
    def probe(p_ptr, q_ptr, n, m, f, b, N: tl.constexpr, FLAG: tl.constexpr):
        _probe_body(p_ptr, q_ptr, n, m, f, b, N, FLAG)

    # the config by n, so that two n that Triton specialises alike (16, 32) take different ones (a named function, not a
    # lambda in the decorator: Python 3.9's inspect.getsource then cut the kernel's source short, and triton.jit
    # found no def in it)
    def by_n(configs, named_args, **kw):
        return [configs[abs(named_args["n"]) // 16 % 2]]

    @triton.autotune(configs=[triton.Config({"N": 16}, num_warps=1), triton.Config({"N": 32}, num_warps=2)], key=["n"],
                     prune_configs_by={"early_config_prune": by_n})
    @triton.jit
    def probe_tuned(p_ptr, q_ptr, n, m, f, b, N: tl.constexpr, FLAG: tl.constexpr):
        _probe_body(p_ptr, q_ptr, n, m, f, b, N, FLAG)

    hook_calls = []

    def hook(nargs):
        hook_calls.append(1)

    @triton.autotune(configs=[triton.Config({"N": 16}, num_warps=1, pre_hook=hook)], key=["n"])
    @triton.jit
    def probe_hooked(p_ptr, q_ptr, n, m, f, b, N: tl.constexpr, FLAG: tl.constexpr):
        _probe_body(p_ptr, q_ptr, n, m, f, b, N, FLAG)

    plain, tuned, hooked = fast_launch(probe), fast_launch(probe_tuned), fast_launch(probe_hooked)
    _scripted_timings(tuned, hooked)  # (a Triton that times a single config)
    return plain, tuned, hooked, hook_calls


def _variants():
    """(args, kwargs) of the probe: every kind of argument change the key must notice, and repeats."""
    p16, q16 = torch.randn(64, dtype=torch.float16), torch.empty(64, dtype=torch.float16)
    p32, q32 = torch.randn(64), torch.empty(64)
    base = (p16, q16, 16, 16, 2.0, False)
    out = []
    for n in (16, 1, 17, 32, 2**31, -16, 48, 2**31 - 1):
        out.append(((p16, q16, n, 16, 2.0, False), {}))
    out += [
        ((p16[1:], q16, 16, 16, 2.0, False), {}),        # an unaligned pointer
        ((p16, q16[8:], 16, 16, 2.0, False), {}),        # aligned (16 bytes in)
        ((p32, q32, 16, 16, 2.0, False), {}),            # other dtypes
        ((p32, q16, 16, 16, 2.0, False), {}),
        ((p16, q16, 16, 1, 2.0, False), {}),             # m == 1: a constexpr to Triton
        ((p16, q16, 16, 16, 1, False), {}),              # int 1 where a float was: a constexpr
        ((p16, q16, 16, 16, 3, False), {}),              # an int where a float was
        ((p16, q16, 16, 16, 2.0, True), {}),             # a bool's value
        ((p16, q16, 16, 16, 2.0, None), {}),             # None
        ((p16, q16, 16, 16, 2.0, 1), {}),                # an int where a bool was
        ((p16, None, 16, 16, 2.0, False), {}),           # None where a tensor was (fails in Triton too)
    ]
    out = [(a, {"N": 32, "FLAG": True}) for a, _ in out]
    out += [(base, {"N": 32, "FLAG": False}), (base, {"N": 32, "FLAG": 1}), (base, {"N": 64, "FLAG": True}),
            (base, {"N": 32, "FLAG": True, "num_warps": 2}), (base, {"FLAG": True, "N": 32})]
    return out


def check_probe():
    """Each variant, in a revisiting order, through the fast path: the kernel launched (hash) and its
    arguments must be Triton's own choice for the call."""
    from . import _launch

    plain, tuned, hooked, hook_calls = _probe_kernels()
    problems = []
    calls = 0
    variants = _variants()
    order = list(range(len(variants))) * 2 + list(reversed(range(len(variants))))
    for which, kernel in (("plain", plain), ("autotuned", tuned)):
        for i in order:
            args, kwargs = variants[i]
            if which == "autotuned":
                kwargs = {k: v for k, v in kwargs.items() if k not in ("N", "num_warps")}
            outcome = {}
            for enabled in (False, True):
                _launch.ENABLED = enabled
                RECORDS.clear()
                try:
                    compiled = kernel[(1,)](*args, **kwargs)
                    # the call's own launch: the last one (an autotuner's first call times its configs first)
                    outcome[enabled] = (getattr(compiled, "hash", None), [(r[3], r[4]) for r in RECORDS[-1:]])
                except Exception as e:  # noqa: BLE001 - both paths must fail alike
                    outcome[enabled] = ("error", type(e).__name__)
                calls += 1
            if outcome[False] != outcome[True]:
                problems.append(f"{which} variant {i}: triton {outcome[False]} / fast {outcome[True]}")
    # a config's pre_hook runs before every launch, as Triton runs it
    _launch.ENABLED = True
    args, _ = variants[0]
    for i in range(3):
        hook_calls.clear()
        hooked[(1,)](*args, FLAG=True)
        if len(hook_calls) != 1:
            problems.append(f"a config's pre_hook ran {len(hook_calls)} time(s) at call {i}")
    taken = plain.launches + tuned.launches
    return {"calls": calls, "fast_launches": taken, "variants": len(variants), "problems": problems}


def tune_once():
    """The package's autotuned launch sites called once each: how many configs were timed, and the
    winners. Twice in a row with one TRITON_CACHE_DIR, the second process should time none
    (_common.AUTOTUNE_CACHE: Triton's on-disk autotuning cache) and pick the same configs."""
    from . import _common, w4a8, w4a16

    sites = dict(_sites())
    TIMED.clear()
    for name in ("decode M=4", "prefill M=64, fused", "w4a8 M=64"):
        sites[name]()
    tuners = {"decode": w4a16._w4a16_decode_kernel, "prefill": w4a16._w4a16_prefill_kernel, "w4a8": w4a8._w4a8_gemm_kernel}
    return {"timed": len(TIMED), "cache": _common.AUTOTUNE_CACHE,
            "configs": {name: str(getattr(k, "kernel", k).best_config) for name, k in tuners.items()}}


def host_costs(calls: int = 2000, blocks: int = 7):
    """{site: {"triton_us": ..., "fast_us": ...}}: host time of each site's call both ways, the median
    over `blocks` interleaved blocks of `calls` calls (a 2-core machine's noise lands in a few)."""
    import statistics

    from . import _launch

    out = {}
    for name, call in _sites():
        times = {False: [], True: []}
        for enabled in (False, True):  # warm both (compile, tune, record)
            _launch.ENABLED = enabled
            for _ in range(20):
                call()
        for _ in range(blocks):
            for enabled in (False, True):
                _launch.ENABLED = enabled
                RECORDS.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                    del RECORDS[:]
                times[enabled].append((time.perf_counter() - t0) / calls * 1e6)
        out[name] = {"triton_us": statistics.median(times[False]), "fast_us": statistics.median(times[True])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--tune", action="store_true", help="the autotuned sites once: configs timed and picked")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--capability", type=int, default=90)
    args = p.parse_args(argv)
    import triton

    from . import INTERPRET, _launch

    if INTERPRET:
        print("launch_check compiles the kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    report = {"triton": triton.__version__, "supported": _launch._SUPPORTED, "capability": args.capability}
    if not _launch._SUPPORTED:
        print(json.dumps(report))
        return 0
    from . import w4a8, w4a16

    with stand_in_driver(args.capability):
        _scripted_timings(w4a16._w4a16_decode_kernel, w4a16._w4a16_prefill_kernel, w4a8._w4a8_gemm_kernel)
        if args.tune:  # (first: the other modes tune too)
            report["tune"] = tune_once()
        if args.check:
            report["sites"] = check_sites()
            report["probe"] = check_probe()
        if args.cost:
            report["host_us"] = host_costs(args.calls)
    _launch.ENABLED = True
    print(json.dumps(report))
    bad = [s for s in report.get("sites", []) if s["problem"]] or report.get("probe", {}).get("problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
