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
