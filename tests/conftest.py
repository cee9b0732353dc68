"""Test setup. TRITON_INTERPRET must be set before minicpm_int4 (and so triton.jit) is imported.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 by default). With one
they are compiled: the gpu-marked tests exist to test the kernels users run, and the interpreter
would also accept CUDA tensors (copying them to the host) and so silently test something else, at
a fraction of the speed. TRITON_INTERPRET=1 set by hand on a GPU machine runs the interpreter tests
instead, and the gpu tests then fail with that reason (tests/test_gpu.py)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionstart(session):
    """An interpreter that cannot run the kernels (triton 3.6 with numpy >= 2.4) would fail hundreds
    of tests with one cryptic TypeError each: stop with the reason instead."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from minicpm_int4.ops import _triton_kernels

        kernels, _ = _triton_kernels()
        why = kernels.interpreter_problem() if kernels is not None else None
        if why:
            pytest.exit(f"the interpreter tests cannot run here: {why}", returncode=4)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that needs a native MiniCPM-V class the installed transformers lacks (4.x, or an early
    5.x without 4.7 / OCR) is reported as skipped with that reason, not as a failure."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.when == "call":
        from minicpm_int4.tiny import NativeModelUnavailable

        if call.excinfo.errisinstance(NativeModelUnavailable):
            report.outcome = "skipped"
            report.longrepr = (str(item.fspath), item.location[1] or 0, f"Skipped: {call.excinfo.value}")


@pytest.fixture(autouse=True)
def set_seed():
    torch.manual_seed(1234)
    yield


_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    """torch.empty that fills floats with NaN and ints with a sentinel, so that an output element a
    kernel never writes is caught (flash-linear-attention's habit)."""
    t = _real_empty(*args, **kwargs)
    if t.device.type == "meta" or t.numel() == 0:
        return t
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Used by the kernel test modules (pytestmark = usefixtures("poison_empty"))."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    yield


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """tests/csrc/host_emu.cu built for the host (csrc_emu.py): the CUDA kernels' code on the CPU."""
    import csrc_emu

    return csrc_emu.build(tmp_path_factory.mktemp("csrc"))
