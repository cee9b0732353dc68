"""CPU-side costs that matter, tracked with pytest-benchmark (`pytest tests/test_cpu_costs.py
--benchmark-enable`; in the default run they execute once, as plain tests)."""
import pytest
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
    launches = _record_triton_launches(monkeypatch)
    from minicpm_int4.kernels import w4a16

    ql = QuantLinear.from_linear(nn.Linear(1024, 16, dtype=torch.float16), QuantConfig(group_size=128, backend="triton"))
    x = torch.randn(1, 4, 1024, dtype=torch.float16)
    assert w4a16._decode_blocks(16, 1024, 128, x.device)[3] > 1  # K is split
    with torch.no_grad():
        y = benchmark(ql, x)
    assert y.shape == (1, 4, 16)
    assert set(launches) == {"_w4a16_decode_kernel"}


def _record_triton_launches(monkeypatch):
    """Replace the W4A16 Triton kernels by recorders of their launches (the host path runs as ever)."""
    from minicpm_int4 import ops

    if not ops.triton_interpreter_active():
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
    return launches


@pytest.mark.parametrize("fused", [False, True], ids=["layer_by_layer", "fuse_projections"])
def test_host_path_of_a_decode_tokens_q_k_v_calls(benchmark, monkeypatch, fused):
    """The host side of one decode token's q / k / v calls (rows in Llama-3-8B's 4 : 1 : 1, K = 1024) on the
    Triton M = 1 path with the launches replaced by a counter: three layer calls, or (fuse_projections) one
    stacked call by q and two slices taken by k and v - one launch instead of three."""
    from minicpm_int4 import fuse_projections

    launches = _record_triton_launches(monkeypatch)
    parent = nn.Module()
    for name, n in (("q_proj", 1024), ("k_proj", 256), ("v_proj", 256)):
        lin = nn.Linear(1024, n, bias=False, dtype=torch.float16)
        setattr(parent, name, QuantLinear.from_linear(lin, QuantConfig(group_size=128, backend="triton")))
    if fused:
        assert len(fuse_projections(parent).groups) == 1
    layers = (parent.q_proj, parent.k_proj, parent.v_proj)

    def token():
        x = torch.randn(1, 1, 1024, dtype=torch.float16)
        return [layer(x) for layer in layers]

    with torch.no_grad():
        launches.clear()
        outs = token()
        assert len(launches) == (1 if fused else 3) and [y.shape[-1] for y in outs] == [1024, 256, 256]
        benchmark(token)


@pytest.mark.parametrize("fused", [False, True], ids=["layer_by_layer", "fuse_projections"])
def test_dynamo_overhead_of_a_compiled_one_token_step(benchmark, fused):
    """What torch.compile's wrapper costs a decode step before its graph runs - the guards, the replayed state
    changes - with the graph replaced by a stub that returns the outputs of its first run: the tiny Llama3-V
    2.5-layout LLM (4 layers), layer by layer or fused (8 groups). The host time a CUDA-graph-tree decode step
    pays on top of its replay, where fusion must not add back what fewer launches save (fusion.py keeps the
    compiled path's checks to guards torch evaluates in C++)."""
    import torch._dynamo

    from minicpm_int4 import fuse_projections
    from minicpm_int4.tiny import build_remote_layout

    torch.manual_seed(0)
    model = build_remote_layout("llama").eval()
    patch_model(model, QuantConfig(group_size=32, backend="torch", min_out_features=16), progress=False)
    groups = len(fuse_projections(model).groups) if fused else 0
    gemms = []

    def stub(gm, example_inputs):
        gemms.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                         and getattr(n.target, "namespace", None) == "minicpm_int4"))
        outs = gm(*example_inputs)
        return lambda *args: outs

    torch._dynamo.reset()
    step = torch.compile(lambda ids: model.llm(input_ids=ids, use_cache=False).logits, fullgraph=True, backend=stub)
    ids = torch.tensor([[7]])
    with torch.no_grad():
        step(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            benchmark(step, ids)
    assert len(gemms) == 1 and (groups == 8) == fused
    assert gemms[0] == 4 * 7 - (4 * 3 if fused else 0)  # q k v o gate up down a layer (lm_head: fp16); fused 2 + 1 fewer
