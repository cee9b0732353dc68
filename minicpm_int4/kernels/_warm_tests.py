"""The GPU tests' Triton kernels compiled without a GPU, for warm_cache's build (its `--tests`).

    python -O -m minicpm_int4.kernels._warm_tests --keys KEYS.json [--shard I/N] -- -m gpu tests/test_gpu.py

The GPU suite's gpu-tests stage compiles every Triton specialisation tests/test_gpu.py launches (odd shapes, three
dtypes, every group size and M regime, each kernel variant): hundreds of kernels on the GPU machine's CPU, inside the
stage's time limit. Their specialisations are the tests' own, so the tests themselves are run here, by pytest, to
launch them: on CPU tensors (a torch function mode hands "cuda" devices the CPU; torch.cuda's device queries answer as
an H100's, its streams, events and graphs issue the work in order), under launch_check's stand-in driver for the target (every kernel compiled for it, none run; autotuners
time each config by a hash of its launch, so every config is compiled), with the ops resolving backends as on that
GPU and the decode plans made for its SM count. What the kernels would have computed is never there, so the tests'
checks cannot hold: pytest's assertion rewriting of the test files and the modules beside them (helpers) is made to
evaluate each assert's expression - a launch inside it, `assert torch.equal(y, ops.w4a16_gemm(...))`, is compiled -
without checking it, so each test goes on to its next launch (torch.testing.assert_close is left out too; rewritten
code is neither read from nor written to pytest's pyc cache, and the run is under `python -O`, whose asserts elsewhere
are gone); a test that stops anyway (torch.compile, the CUDA extension, an error) has compiled what it launched
until then. tests/test_gpu.py: ~700 kernels
beyond the bench's, with triton 3.6 in 10 minutes on 2 cores. A per-test time limit keeps a host-side reference on the largest shapes from
holding up the rest. Outcomes are not results here: the record is the compiles, each with its key parts
(warm_cache._recording_keys), written to --keys; the kernels themselves land in TRITON_CACHE_DIR, which the build
set to its own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode


def _host(device):
    """A "cuda" device (a string, an index, a torch.device) as the CPU; anything else as it was."""
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):  # (torch.device(0) is the current CUDA device)
        return "cpu"
    return device


class CudaOnHost(TorchFunctionMode):
    """Tensors asked for on a CUDA device made on the CPU: factories' `device=`, `.to(...)`, `.cuda()`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_host(kwargs["device"]))
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _host(args[1]), *args[2:])
        return func(*args, **kwargs)


class _Properties:
    """torch.cuda.get_device_properties of the target (what the tests ask of it)."""

    def __init__(self, name: str, capability, sms: int):
        self.name, (self.major, self.minor), self.multi_processor_count = name, tuple(capability), sms
        self.total_memory, self.L2_cache_size = 80 * 2**30, 50 * 2**20


class _Stream:
    """torch.cuda's streams, events and graphs on a machine without them: the work is issued in order as it comes
    (a graph's capture runs its body once - the launches compiled -, its replay nothing)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record(self, stream=None):
        pass

    def wait_event(self, event):
        pass

    def query(self):
        return True

    def replay(self):
        pass

    def reset(self):
        pass

    def elapsed_time(self, end):
        return 1.0


def _host_cuda_runtime():
    """{name: stand-in} for torch.cuda's stream / event / graph API (_Stream), and assert_close left out as the
    tests' asserts are."""
    return {"Stream": _Stream, "Event": _Stream, "CUDAGraph": _Stream, "current_stream": lambda *a, **k: _Stream(),
            "stream": lambda *a, **k: contextlib.nullcontext(), "graph": lambda *a, **k: contextlib.nullcontext(),
            "synchronize": lambda *a, **k: None}


@contextlib.contextmanager
def _as_the_gpu(capability: int, sms: int):
    """The package's ops and torch.cuda as on the target GPU, its Triton kernels compiled (and recorded), not run."""
    from .. import ops
    from .warm_cache import FLA_DEVICE, _as_cuda_device, _on_target

    name = FLA_DEVICE[0]
    saved = (ops.resolve_backend, torch.cuda.get_device_properties, torch.testing.assert_close)
    runtime = _host_cuda_runtime()
    saved_runtime = {n: getattr(torch.cuda, n) for n in runtime}
    resolve = ops.resolve_backend
    cuda0 = torch.device("cuda", 0)
    with _on_target(capability, sms), _as_cuda_device(name, divmod(capability, 10)):
        # (a host tensor here stands for a CUDA one: the backend the GPU would resolve - "auto" by its dispatch
        # table, "triton" compiled, "cuda" refused where the extension is not built, as on a GPU without it)
        ops.resolve_backend = lambda backend, device, op, shape=None: resolve(
            backend, cuda0 if device.type == "cpu" else device, op, shape)
        torch.cuda.get_device_properties = lambda *a, **k: _Properties(name, divmod(capability, 10), sms)
        torch.testing.assert_close = lambda *a, **k: None
        for n, f in runtime.items():
            setattr(torch.cuda, n, f)
        try:
            yield
        finally:
            ops.resolve_backend, torch.cuda.get_device_properties, torch.testing.assert_close = saved
            for n, f in saved_runtime.items():
                setattr(torch.cuda, n, f)


@contextlib.contextmanager
def _asserts_evaluated_not_checked(dirs: List[str]):
    """pytest's assertion rewriting, for test files and the modules in `dirs`, turning `assert test, msg` into the
    statement `test`: evaluated, never raising. Its pyc cache is neither read (a normal run's rewrite would check)
    nor written (this one would stop checking in a normal run)."""
    import ast

    from _pytest.assertion import rewrite

    def visit_assert(self, assert_):
        return [ast.copy_location(ast.Expr(value=assert_.test), assert_)]

    def should_rewrite(self, name, fn, state):
        here = os.path.abspath(fn)
        return saved[2](self, name, fn, state) or any(here.startswith(d + os.sep) for d in dirs)

    saved = (rewrite.AssertionRewriter.visit_Assert, rewrite._read_pyc, rewrite.AssertionRewritingHook._should_rewrite,
             rewrite.AssertionRewritingHook._early_rewrite_bailout, sys.dont_write_bytecode)
    rewrite.AssertionRewriter.visit_Assert = visit_assert
    rewrite._read_pyc = lambda *a, **k: None
    rewrite.AssertionRewritingHook._should_rewrite = should_rewrite
    rewrite.AssertionRewritingHook._early_rewrite_bailout = lambda self, name, state: False  # (helpers by path)
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        (rewrite.AssertionRewriter.visit_Assert, rewrite._read_pyc, rewrite.AssertionRewritingHook._should_rewrite,
         rewrite.AssertionRewritingHook._early_rewrite_bailout, sys.dont_write_bytecode) = saved


def run(pytest_args: List[str], capability: int = 90, sms: int = 132, test_seconds: int = 30, shard=(0, 1),
        progress: Optional[str] = None, keys_path: Optional[str] = None) -> Dict:
    """Run the tests (pytest_args: files and options) as on the target: shard (i, n) runs the i-th of n shares of
    the collected tests, test functions dealt round them (the build runs the n in parallel; a function's
    parametrisations stay together: the largest host references are one function's); `progress` (a file) gets a character as each test ends, and `progress`.total the slice's size. {"keys": {cache hash: key parts},
    "tests": outcomes counted, "stopped": tests past test_seconds, "failed": each failed test with its error's first
    line, "seconds", "complete": whether pytest ended}, also written to keys_path after each test (a process killed
    half-way - the host out of memory - leaves what it compiled until then)."""
    if sys.flags.optimize < 1:
        raise RuntimeError("asserts the rewriting does not reach (outside the tests' folders) must not stop the tests "
                           "either - their kernels never run here: run under python -O")
    from . import INTERPRET

    if INTERPRET:
        raise RuntimeError("the tests' kernels are compiled here, not interpreted: run without TRITON_INTERPRET=1")
    import pytest

    from .warm_cache import _recording_keys

    index, count = shard

    class Plugin:
        """The shard's slice of the tests; each test's outcome counted, and each stopped (SIGALRM) past
        test_seconds: a host-side reference on the largest shapes too slow to wait for."""

        def __init__(self):
            self.counts: Dict[str, int] = {}
            self.stopped: List[str] = []
            self.failed: List[str] = []

        @pytest.hookimpl(trylast=True)  # (after -m / -k deselected theirs)
        def pytest_collection_modifyitems(self, config, items):
            groups: Dict[tuple, list] = {}  # each test function's parametrisations together, the functions dealt
            for item in items:              # round the shards (the slow ones are neighbours in a file)
                groups.setdefault((item.path, getattr(item, "originalname", item.name)), []).append(item)
            items[:] = [item for j, group in enumerate(groups.values()) if j % count == index for item in group]
            if progress:  # (the bar's total: the shards' slices summed)
                with open(progress + ".total", "w") as f:
                    f.write(str(len(items)))

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
            if report.failed:  # (what stopped it: a launch after that point was not compiled here)
                crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
                self.failed.append(f"{report.nodeid}: {getattr(crash, 'message', '?').splitlines()[0][:200]}")

        def pytest_runtest_logfinish(self, nodeid, location):
            if keys_path:
                result(complete=False)
            if progress:
                with open(progress, "a") as f:
                    f.write(".")

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_call(self, item):
            def stop(signum, frame):
                self.stopped.append(item.nodeid)
                raise TimeoutError(f"{item.nodeid}: past {test_seconds} s on the host")

            previous = signal.signal(signal.SIGALRM, stop)
            signal.alarm(test_seconds)
            try:
                yield
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)

    keys: Dict[str, Dict] = {}
    plugin = Plugin()
    t0 = time.monotonic()

    def result(complete: bool) -> Dict:
        r = {"keys": keys, "tests": plugin.counts, "stopped": plugin.stopped, "failed": plugin.failed,
             "seconds": round(time.monotonic() - t0, 1), "complete": complete}
        if keys_path:
            with open(keys_path + ".tmp", "w") as f:
                json.dump(r, f)
            os.replace(keys_path + ".tmp", keys_path)
        return r

    # (the directories of the test files named: their helper modules' asserts are evaluated too)
    dirs = sorted({os.path.dirname(os.path.abspath(a.split("::")[0])) for a in pytest_args
                   if a.split("::")[0].endswith(".py")})
    with _as_the_gpu(capability, sms), _recording_keys(keys), _asserts_evaluated_not_checked(dirs), CudaOnHost():
        # (-o addopts=: the project's own options - --benchmark-disable and such - may need plugins not installed)
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--assert=rewrite", "-W", "ignore",
                            *pytest_args], plugins=[plugin])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise RuntimeError(f"pytest {' '.join(pytest_args)} ended with {code!r} (its output above says why)")
    return result(complete=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", required=True, help="where to write the compiles' key parts and the tests' outcomes")
    p.add_argument("--capability", type=int, default=90)
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--test-seconds", type=int, default=30, help="each test's time limit on the host")
    p.add_argument("--shard", default="0/1", help="I/N: the I-th of N shares of the tests")
    p.add_argument("--progress", default=None, help="a file that gets a character as each test ends")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="this process's data memory capped (RLIMIT_DATA): a test past it fails, the rest go on, where "
                        "the host would otherwise kill the process")
    p.add_argument("pytest_args", nargs="+", help="after --: the test files and pytest's options")
    args = p.parse_args(argv)
    index, count = (int(v) for v in args.shard.split("/"))
    if not 0 <= index < count:
        p.error(f"--shard {args.shard}: I must be in 0..N-1")
    if args.max_memory_gb:
        import resource

        cap, hard = int(args.max_memory_gb * 2**30), resource.getrlimit(resource.RLIMIT_DATA)[1]
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    run(args.pytest_args, args.capability, args.sms, args.test_seconds, (index, count), args.progress, args.keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
