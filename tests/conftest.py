"""Test setup. TRITON_INTERPRET must be set before minicpm_int4 (and so triton.jit) is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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
