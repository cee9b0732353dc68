"""CPU-side costs that matter, tracked with pytest-benchmark (`pytest tests/test_cpu_costs.py
--benchmark-enable`; in the default run they execute once, as plain tests)."""
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, patch_model
from minicpm_int4.tiny import build_native


def test_quantlinear_dispatch_overhead(benchmark):
    ql = QuantLinear.from_linear(nn.Linear(64, 64), QuantConfig(group_size=32, backend="torch"))
    x = torch.randn(1, 64)
    y = benchmark(ql, x)
    assert y.shape == (1, 64)


def test_patch_model_time_tiny(benchmark):
    def run():
        model = build_native("4_6")
        return patch_model(model, QuantConfig(group_size=32), progress=False)

    report = benchmark(run)
    assert report.quantized


def test_quantlinear_host_path_of_a_triton_decode_call(benchmark, monkeypatch):
    """The host side of one decode-sized layer call on the Triton path (checks, dispatch, launch
    plan, allocations) with the kernel launches replaced by a counter: what an eager decode step
    pays per layer before Triton's own launcher. Also holds the call to one launch: split-K is
    finished inside the decode kernel (the layer's workspace), no reduce launch after it."""
    from minicpm_int4 import ops

    if not ops.triton_interpreter_active():
        import pytest

        pytest.skip("needs the Triton kernels importable on CPU (TRITON_INTERPRET=1)")
    from minicpm_int4.kernels import w4a16

    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    for name in ("_w4a16_decode_kernel", "_splitk_reduce_kernel", "_w4a16_gemv_kernel"):
        monkeypatch.setattr(w4a16, name, Recorder(name))
    ql = QuantLinear.from_linear(nn.Linear(1024, 16, dtype=torch.float16), QuantConfig(group_size=128, backend="triton"))
    x = torch.randn(1, 4, 1024, dtype=torch.float16)
    assert w4a16._decode_blocks(16, 1024, 128, x.device)[3] > 1  # K is split
    with torch.no_grad():
        y = benchmark(ql, x)
    assert y.shape == (1, 4, 16)
    assert set(launches) == {"_w4a16_decode_kernel"}
