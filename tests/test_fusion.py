"""fuse_projections (fusion.py): sibling int4 projections that read the same input as one GEMM at one-token
calls - the same outputs as layer by layer, fewer kernel calls, no byte added, and every case where it must
not apply (more rows, other inputs, tracing, weights replaced) computing layer by layer."""
import copy
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from helpers import assert_gemm_close
from minicpm_int4 import QuantConfig, QuantLinear, fuse_projections, ops, patch_model, unfuse_projections
from minicpm_int4.fusion import FusedProjections
from minicpm_int4.reference import w4a16_gemm_ref

K = 64


class Attention(nn.Module):
    """q / k / v of one input (or, cross=True, q of the first and k / v of the second), odd row counts,
    a bias on q and v only."""

    def __init__(self, k=K, rows=(40, 24, 56), dtype=torch.float16, config=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        config = config or QuantConfig(group_size=32, backend="torch")
        for name, n, bias in zip(("q_proj", "k_proj", "v_proj"), rows, (True, False, True)):
            lin = nn.Linear(k, n, bias=bias, dtype=torch.float32)
            if bias:
                nn.init.uniform_(lin.bias, -0.5, 0.5)
            setattr(self, name, QuantLinear.from_linear(lin.to(dtype), config, name=name))

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.q_proj(x), self.k_proj(kv), self.v_proj(kv)


def _layer_ref(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features)
    return w4a16_gemm_ref(x2, layer.qweight, layer.scales, layer.zeros, layer.bias, layer._kernel_group_size)


def _check_close(y, layer, x):
    ref = _layer_ref(layer, x).reshape(y.shape)
    w = layer.dequantized_weight()
    assert_gemm_close(y.reshape(-1, layer.out_features), ref.reshape(-1, layer.out_features),
                      x.reshape(-1, layer.in_features), w)


@pytest.fixture
def count_calls(monkeypatch):
    calls = []
    real = ops.quantized_linear

    def counted(x, qweight, *args, **kwargs):
        calls.append(qweight.shape[0])
        return real(x, qweight, *args, **kwargs)

    monkeypatch.setattr(ops, "quantized_linear", counted)
    return calls


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float16), ("torch", torch.bfloat16), ("torch", torch.float32),
                                           ("triton", torch.float16)])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("shape", [(1, 1, K), (K,), (1, K)])
def test_one_stacked_call_gives_each_layer_its_output(backend, dtype, group_size, shape, count_calls):
    m = Attention(dtype=dtype, config=QuantConfig(group_size=group_size, backend=backend))
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        alone = m(x)
        report = fuse_projections(m)
        count_calls.clear()
        fused = m(x)
    assert count_calls == [120]  # one GEMM of 40 + 24 + 56 rows for the three
    assert len(report.groups) == 1 and report.launches_saved == 2 and report.skipped == []
    for y, y0, layer in zip(fused, alone, (m.q_proj, m.k_proj, m.v_proj)):
        assert y.shape == y0.shape == (*shape[:-1], layer.out_features) and y.dtype == dtype and y.is_contiguous()
        _check_close(y, layer, x)     # the reference's, within the derived bound (the stacked GEMM's own order)
        if backend == "torch":
            _check_close(y0, layer, x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_w4a8_layers_make_one_stacked_call_too(backend, count_calls):
    """A W4A8 layer (act="int8") computes one row as W4A16 (ops.W4A8_MIN_M): its siblings' stacked call does
    the same, within the same bound; at 17 rows each layer quantizes its own activations as before."""
    m = Attention(config=QuantConfig(group_size=32, backend=backend, act="int8"))
    (group,) = fuse_projections(m).groups
    x = torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        outs = m(x)
    assert count_calls == [120] and group.calls == 1
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x)
    count_calls.clear()
    with torch.no_grad():
        m(torch.randn(17, K, dtype=torch.float16))
    assert count_calls == [40, 24, 56]


def test_layers_view_one_stacked_tensor_each_and_keep_their_state_dict():
    m = Attention()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    (group,) = fuse_projections(m).groups
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(t.numel() * t.element_size() for t in after.values()) == nbytes
    for name in ("qweight", "scales", "zeros"):
        stacked = getattr(group, name)
        for i, layer in enumerate((m.q_proj, m.k_proj, m.v_proj)):
            t = getattr(layer, name)
            assert t.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
            assert t.data_ptr() == stacked[group.offsets[i]].data_ptr()
    # k_proj has no bias: zeros in the stacked bias, None on the layer
    assert m.k_proj.bias is None and torch.equal(group.bias[40:64], torch.zeros(24, dtype=group.bias.dtype))
    assert m.q_proj.bias.data_ptr() == group.bias.data_ptr() and not m.q_proj.bias.requires_grad
    # a load_state_dict writes through the views into the stacked tensors
    sd = {k: v.clone() for k, v in after.items()}
    sd["k_proj.scales"] *= 2
    m.load_state_dict(sd)
    assert torch.equal(group.scales[40:64], sd["k_proj.scales"]) and m.k_proj._fusion is group and group.intact()


@pytest.mark.parametrize("rows", [2, 3, 17])
def test_more_rows_compute_layer_by_layer_with_the_same_bits(rows, count_calls):
    m = Attention()
    x = torch.randn(rows, K, dtype=torch.float16)
    with torch.no_grad():
        alone = m(x)
        fuse_projections(m)
        count_calls.clear()
        fused = m(x)
    assert count_calls == [40, 24, 56]
    assert all(torch.equal(a, b) for a, b in zip(alone, fused))


def test_siblings_on_other_inputs_turn_the_group_off(count_calls):
    """A cross-attention's q reads another tensor than k / v: the first call that shows it turns the group off
    for good, and every output is still the layer's own."""
    m = Attention()
    (group,) = fuse_projections(m).groups
    x, kv = torch.randn(1, K, dtype=torch.float16), torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        q, k, v = m(x, kv)
    assert not group.active and "k_proj, v_proj did not take the input k_proj was called with" in group.reason
    for y, layer, inp in ((q, m.q_proj, x), (k, m.k_proj, kv), (v, m.v_proj, kv)):
        _check_close(y, layer, inp)
    count_calls.clear()
    with torch.no_grad():
        m(x)
    assert count_calls == [40, 24, 56]


def test_an_input_changed_in_place_is_computed_again():
    m = Attention()
    fuse_projections(m)
    x = torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        m.q_proj(x)
        x.mul_(2)  # the stacked call's slices are of the old values
        k = m.k_proj(x)
        v = m.v_proj(x)
    _check_close(k, m.k_proj, x)
    _check_close(v, m.v_proj, x)


def test_a_layer_called_twice_then_its_siblings():
    m = Attention()
    (group,) = fuse_projections(m).groups
    x = torch.randn(1, 1, K, dtype=torch.float16)
    with torch.no_grad():
        outs = [m.q_proj(x), m.q_proj(x), m.k_proj(x), m.v_proj(x)]
    for y, layer in zip(outs, (m.q_proj, m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x)
    assert group.active and group.calls == 1


def test_inference_mode_and_gradients():
    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    x = torch.randn(1, K)
    with torch.inference_mode():  # (inference tensors keep no version counter)
        for y, layer in zip(m(x), (m.q_proj, m.k_proj, m.v_proj)):
            _check_close(y, layer, x)
    xg = x.clone().requires_grad_(True)
    q, k, v = m(xg)
    (q.sum() + 2 * k.sum() + 3 * v.sum()).backward()
    w = torch.cat([m.q_proj.dequantized_weight(), 2 * m.k_proj.dequantized_weight(), 3 * m.v_proj.dequantized_weight()])
    torch.testing.assert_close(xg.grad, w.sum(0, keepdim=True))
    assert group.calls == 2 and group.active


def test_a_dtype_move_turns_the_group_off_with_a_warning_and_fusing_again_restores_it(count_calls):
    m = Attention()
    (group,) = fuse_projections(m).groups
    # new scales / zeros / bias tensors in every layer: the stacked ones are not theirs now (said as it happens)
    with pytest.warns(UserWarning, match=r"q_proj \+ k_proj \+ v_proj of <model>.*call minicpm_int4"
                                         r"\.fuse_projections\(model\) again") as said:
        m.to(torch.bfloat16)
    assert len(said) == 1 and said[0].filename == __file__  # (once, pointing at the move)
    assert not group.active
    x = torch.randn(1, K, dtype=torch.bfloat16)
    with torch.no_grad():
        outs = m(x)
    assert count_calls == [40, 24, 56]
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        assert y.dtype == torch.bfloat16
        _check_close(y, layer, x)
    (again,) = fuse_projections(m).groups
    assert again is not group and again.active and m.q_proj._fusion is again
    count_calls.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        outs2 = m(x)
    assert count_calls == [120] and all(torch.equal(a, b) for a, b in zip(outs, outs2))


@pytest.mark.parametrize("how", ["load_state_dict(assign=True)", "buffer set"])
def test_replacing_a_layers_tensors_turns_the_group_off_as_it_happens(how, count_calls):
    """Tensors replaced after fusing - an assigning load, a buffer set - are said at once (QuantLinear tells its
    group: the compiled path does not test the layers' tensors at each step), and the layers compute on their own
    from then on, eager and compiled, with the new weights; a load that copies into the views keeps the group."""
    import torch._dynamo

    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})  # copied into the views: still fused
    assert group.active and group.intact()
    new = Attention(dtype=torch.float32, seed=5)
    with pytest.warns(UserWarning, match="fuse_projections") as said:
        if how == "buffer set":
            m.k_proj.scales = new.k_proj.scales.clone()
        else:
            m.load_state_dict(new.state_dict(), assign=True)
    assert len(said) == 1 and said[0].filename == __file__ and not group.active
    x = torch.randn(1, K)
    capture = Capture()
    torch._dynamo.reset()
    with torch.no_grad():
        count_calls.clear()
        eager = m(x)
        assert count_calls == [40, 24, 56]
        compiled = torch.compile(Normed(m), fullgraph=True, backend=capture)(x / 2)
    assert capture.gemm_rows() == [40, 24, 56]
    for y, z, layer in zip(eager, compiled, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x)
        _check_close(z, layer, x)


def test_torch_compile_a_sibling_set_otherwise_computes_on_its_own():
    """Compiled, the sibling that makes the stacked call does with its own settings (the trace reads no other
    layer's: guards), and a sibling set otherwise (here k's backend) computes on its own, as it is set."""
    import torch._dynamo

    m = Attention(dtype=torch.float16)
    (group,) = fuse_projections(m).groups
    m.k_proj.backend = "triton"
    capture = Capture()
    torch._dynamo.reset()
    x = torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        outs = torch.compile(Normed(m), fullgraph=True, backend=capture)(x)
    assert capture.gemm_rows() == [120, 24] and group.active and group._pending is None
    backends = [node.args[6] for node in capture.graphs[0].graph.nodes
                if node.op == "call_function" and getattr(node.target, "namespace", None) == "minicpm_int4"]
    assert backends == ["torch", "triton"]
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x * 2)


def test_fusing_twice_keeps_the_groups_and_unfuse_gives_back_own_tensors(count_calls):
    m = Attention()
    (group,) = fuse_projections(m).groups
    ptr = group.qweight.data_ptr()
    (same,) = fuse_projections(m).groups
    assert same is group and group.qweight.data_ptr() == ptr
    x = torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        fused = m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert unfuse_projections(m) == 1 and unfuse_projections(m) == 0
    for layer in (m.q_proj, m.k_proj, m.v_proj):
        assert layer._fusion is None
        for t in (layer.qweight, layer.scales, layer.zeros) + ((layer.bias,) if layer.bias is not None else ()):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own storage again
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    count_calls.clear()
    with torch.no_grad():
        alone = m(x)
    assert count_calls == [40, 24, 56]
    for a, b, layer in zip(fused, alone, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(a, layer, x)
        _check_close(b, layer, x)


def test_what_is_left_unfused_and_why():
    cfg = QuantConfig(group_size=32, backend="torch")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()
            self.attn.k_proj = QuantLinear.from_linear(nn.Linear(K, 24, dtype=torch.float16),
                                                       QuantConfig(group_size=64, backend="torch"))
            self.mlp = nn.Module()
            self.mlp.gate_proj = QuantLinear.from_linear(nn.Linear(K, 48, dtype=torch.float16), cfg)
            self.mlp.up_proj = QuantLinear.from_linear(nn.Linear(K, 48, dtype=torch.float16), cfg.replace(act="int8"))
            self.other = nn.Module()
            self.other.gate_proj = QuantLinear.from_linear(nn.Linear(K, 16, dtype=torch.float16), cfg)
            self.other.up_proj = nn.Linear(K, 16, dtype=torch.float16)  # kept in high precision: nothing to fuse
            self.shared = nn.Module()
            self.shared.gate_proj = QuantLinear.from_linear(nn.Linear(K, 16, dtype=torch.float16), cfg)
            self.shared.up_proj = QuantLinear.from_linear(nn.Linear(K, 16, dtype=torch.float16), cfg)
            self.elsewhere = self.shared.up_proj  # the same layer at a second place
            self.trained = nn.Module()
            self.trained.gate_proj = QuantLinear.from_linear(nn.Linear(K, 16, dtype=torch.float16), cfg)
            self.trained.up_proj = QuantLinear.from_linear(nn.Linear(K, 16, dtype=torch.float16), cfg)
            self.trained.up_proj.bias.requires_grad_(True)  # (peft's bias="all")

    report = fuse_projections(Block())
    assert report.groups == [] and report.launches_saved == 0
    assert dict(report.skipped) == {
        "attn.{q_proj, k_proj, v_proj}": "different group_size",
        "mlp.{gate_proj, up_proj}": "different act",
        "shared.{gate_proj, up_proj}": "a layer is used at more than one place",
        "trained.{gate_proj, up_proj}": "a trainable bias (its gradient would not reach it through the stacked call)"}
    assert "left: mlp.{gate_proj, up_proj}: different act" in str(report)


def _set_backend(a):
    a.k_proj.backend = "triton"


def _set_dtype(a):
    a.v_proj.to(torch.bfloat16)


def _set_input_scale(a, value=1.0):
    a.k_proj.input_scale = torch.full((K,), value, dtype=torch.float16)


def _set_both_input_scales(a):
    a.q_proj.input_scale = torch.full((K,), 2.0, dtype=torch.float16)
    _set_input_scale(a, 0.5)  # (another scale than q's)


@pytest.mark.parametrize("change, why", [
    (_set_backend, "different backend"),
    (_set_dtype, "different dtypes"),
    (_set_input_scale, "different input_scales"),  # one layer with a scale, the others without
    (_set_both_input_scales, "different input_scales"),
    (lambda a: a.k_proj.to("meta"), "on different devices"),
    (lambda a: a.to("meta"), "weights not loaded (meta)"),
])
def test_siblings_that_differ_otherwise_are_left_with_the_reason(change, why):
    """The other reasons _compatible gives: one stacked GEMM computes with one backend, dtype, device and input
    scale, so siblings that differ in any of them stay layer by layer, named - and they compute as before."""
    attn = Attention()
    change(attn)
    report = fuse_projections(attn)
    assert report.groups == [] and dict(report.skipped) == {"<model>.{q_proj, k_proj, v_proj}": why}
    assert all(getattr(layer, "_fusion", None) is None for layer in (attn.q_proj, attn.k_proj, attn.v_proj))


class Normed(nn.Module):
    """The projections' input made inside the step, as a model's norm makes it (x * 2, kv * 2)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, kv=None):
        return self.inner(x * 2, None if kv is None else kv * 2)


class Capture:
    """A torch.compile backend that keeps each dynamo graph and runs it eagerly, or through inductor."""

    def __init__(self, inductor=False):
        self.graphs, self.inductor = [], inductor

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    def gemm_rows(self, graph=-1):
        """The output rows of each int4 GEMM the graph calls (its qweight's rows), in order."""
        return [node.args[1].meta["example_value"].shape[0] for node in self.graphs[graph].graph.nodes
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                and node.target.namespace == "minicpm_int4"]


@pytest.mark.parametrize("inductor", [False, True], ids=["eager", "inductor"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_makes_one_stacked_call_a_group(backend, inductor):
    """A compiled one-row step (transformers' compiled decode, the profile's graphed mode) has one GEMM a group
    and slices of it: dynamo follows the group's protocol, and its state is back to none by the step's end.
    The stacked tensors are marked as static inputs (CUDA graph trees would copy any other input before each
    replay), and a second step reuses the graph."""
    import torch._dynamo

    m = Attention(dtype=torch.float32 if backend == "torch" else torch.float16,
                  config=QuantConfig(group_size=32, backend=backend))
    (group,) = fuse_projections(m).groups
    # marked when fused (torch >= 2.5's dynamo marks a module's tensor attributes itself; the group's are
    # reached through a plain object, so they are marked for every torch and every way of reaching them)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in (group.qweight, group.scales, group.zeros,
                                                                         group.bias))
    capture = Capture(inductor)
    torch._dynamo.reset()
    compiled = torch.compile(Normed(m), fullgraph=True, backend=capture)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for step in range(2):
            x = torch.randn(1, K, generator=gen).to(group.dtype)
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                outs = compiled(x)
            for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
                assert y.shape == (1, layer.out_features)
                _check_close(y, layer, x * 2)
            assert group._pending is None and group.active
    assert len(capture.graphs) == 1 and capture.gemm_rows() == [120]
    assert group.calls == 0 and group.in_graph  # (calls: eager only; a counter read in a trace is a guard)
    static = {node.meta["example_value"].shape: node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")
              for node in capture.graphs[0].graph.nodes if node.op == "placeholder"}
    constants = {node.target for node in capture.graphs[0].graph.nodes if node.op == "get_attr"}
    for t in (group.qweight, group.scales, group.zeros, group.bias):
        # an input marked static, or (torch 2.8's dynamo, for tensors reached through a plain object) a constant of
        # the graph: neither is copied before a CUDA graph tree's replay
        assert static.get(t.shape) is not None or (t.shape not in static and constants), (t.shape, constants)
    assert static[(1, K)] is None  # (x: a plain input)


def test_torch_compile_more_rows_and_cross_inputs_run_layer_by_layer():
    """Compiled, as in eager: more than one row computes layer by layer; a group whose siblings turn out to read
    different inputs turns off in the trace (q's slice of its stacked call is still right), and the changed
    `active` recompiles the step layer by layer."""
    import torch._dynamo

    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(Normed(m), fullgraph=True, backend=capture)
    with torch.no_grad():
        x = torch.randn(3, K)
        for y, layer in zip(compiled(x), (m.q_proj, m.k_proj, m.v_proj)):
            _check_close(y, layer, x * 2)
        assert capture.gemm_rows() == [40, 24, 56] and group.active and not group.in_graph
        x, kv = torch.randn(1, K), torch.randn(1, K)
        for _ in range(2):
            outs = compiled(x, kv)
            for y, layer, inp in zip(outs, (m.q_proj, m.k_proj, m.v_proj), (x, kv, kv)):
                _check_close(y, layer, inp * 2)
    assert not group.active and "k_proj, v_proj did not take" in group.reason and group._pending is None
    assert [capture.gemm_rows(i) for i in (1, 2)] == [[120, 24, 56], [40, 24, 56]]  # then recompiled without it
    assert len(capture.graphs) == 3


class Broken(nn.Module):
    """q, then a graph break, then k (traced again, in the graph after the break) and v (run eagerly: a function
    dynamo does not compile) of the same input, made inside the step."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        import torch._dynamo

        x = x * 2
        q = self.inner.q_proj(x)
        torch._dynamo.graph_break()
        return q, self.inner.k_proj(x), self._eager(x)

    @torch.compiler.disable
    def _eager(self, x):
        return self.inner.v_proj(x)


@pytest.mark.parametrize("v_act", [None, "int8"], ids=["same", "v_set_otherwise"])
def test_torch_compile_graph_break_between_siblings(v_act, count_calls):
    """A graph break after the stacked call: the siblings after it, traced or eager, take the slices the first
    graph left (they carry no version counter; matched by identity), the group stays on, nothing is left
    pending, and nothing recompiles; the eager v, set otherwise than q (act), computes on its own."""
    import torch._dynamo

    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    m.v_proj.act = v_act
    capture = Capture()
    torch._dynamo.reset()
    compiled = torch.compile(Broken(m), backend=capture)
    with torch.no_grad():
        for step in range(2):
            x = torch.randn(1, K)
            count_calls.clear()
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                outs = compiled(x)
            for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
                _check_close(y, layer, x * 2)
            assert group.active and group._pending is None and group.calls == 0
        # (the second step: the graph's call, as dynamo replays the counter's append, and v's own eager one)
        assert count_calls == [120] + ([] if v_act is None else [56])
    assert [capture.gemm_rows(i) for i in range(len(capture.graphs))] == [[120]]  # (k's graph: no op, none made)


def test_torch_compile_without_is_exporting_runs_layer_by_layer(monkeypatch):
    """A torch that cannot tell export from compile (no torch.compiler.is_exporting: 2.4) traces layer by layer."""
    import torch._dynamo

    from minicpm_int4 import fusion

    monkeypatch.setattr(fusion, "_IS_EXPORTING", None)
    monkeypatch.setattr(fusion, "_EXPORT_FLAG_MODULE", None)  # (nor torch.export's own flag)
    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    capture = Capture()
    torch._dynamo.reset()
    x = torch.randn(1, K)
    with torch.no_grad():
        outs = torch.compile(Normed(m), fullgraph=True, backend=capture)(x)
    assert capture.gemm_rows() == [40, 24, 56] and group.active and not group.in_graph
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x * 2)


def test_torch_compile_after_a_move_runs_layer_by_layer():
    """Weights replaced since fusing (here: the model moved to another dtype): the compiled step does not
    read the stale stacked tensors - it computes layer by layer from the layers' own."""
    import torch._dynamo

    m = Attention(dtype=torch.float16)
    (group,) = fuse_projections(m).groups
    with pytest.warns(UserWarning, match="fuse_projections"):
        m.to(torch.float32)
    capture = Capture()
    torch._dynamo.reset()
    x = torch.randn(1, K)
    with torch.no_grad():
        outs = torch.compile(Normed(m), fullgraph=True, backend=capture)(x)
    assert capture.gemm_rows() == [40, 24, 56] and not group.active and not group.in_graph
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x * 2)


@pytest.mark.parametrize("strict", [True, False])
def test_torch_export_traces_the_layers_one_by_one(strict):
    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    x = torch.randn(1, K)
    ep = torch.export.export(m, (x,), strict=strict)
    assert group.calls == 0 and group.active
    x2 = torch.randn(1, K)
    for y, layer in zip(ep.module()(x2), (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x2)


def test_deepcopy_keeps_a_working_group_of_its_own():
    m = Attention()
    (group,) = fuse_projections(m).groups
    c = copy.deepcopy(m)
    cg = c.q_proj._fusion
    assert isinstance(cg, FusedProjections) and cg is not group and cg.intact() and cg.layers[1] is c.k_proj
    assert c.k_proj.qweight.untyped_storage().data_ptr() == cg.qweight.untyped_storage().data_ptr() \
        != group.qweight.untyped_storage().data_ptr()
    x = torch.randn(1, K, dtype=torch.float16)
    with torch.no_grad():
        a, b = m(x), c(x)
    assert cg.calls == 1 and all(torch.equal(u, w) for u, w in zip(a, b))


def _patched_tiny(version: str) -> nn.Module:
    """A tiny random MiniCPM-V 4.6 or Llama3-V 2.5-layout model, patched with the reference backend (skipped where
    this transformers has no native 4.6 classes)."""
    from minicpm_int4.tiny import NativeModelUnavailable, build_native, build_remote_layout

    torch.manual_seed(0)
    try:
        model = (build_native("4_6") if version == "4_6" else build_remote_layout(version)).eval()
    except NativeModelUnavailable as e:  # transformers 4.x
        pytest.skip(str(e))
    # (min_out_features=16: the tiny models' 32-row k / v projections are int4 too, as full-size ones are)
    patch_model(model, QuantConfig(group_size=32, backend="torch", min_out_features=16), progress=False)
    return model


@pytest.mark.parametrize("version", ["4_6", "llama"])
def test_tiny_model_decodes_the_same_tokens_with_fewer_calls(version, tmp_path, count_calls):
    """A patched tiny MiniCPM-V 4.6 (Qwen3.5: gate / up, the linear attention's in_proj_qkv / in_proj_z) and the
    Llama3-V 2.5 layout's LLM (q / k / v, gate / up): greedy decoding gives the same tokens fused, a one-token
    forward makes one call a group fewer, and save_quantized writes the layers' own tensors."""
    from minicpm_int4 import save_quantized
    from minicpm_int4.checkpoint import load_quantized
    from minicpm_int4.tiny import build_native, build_remote_layout

    model = _patched_tiny(version)
    llm = model if version == "4_6" else model.llm
    ids = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        ref = llm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        count_calls.clear()
        llm(input_ids=ids[:, :1])
        unfused = len(count_calls)
        report = fuse_projections(model)
        count_calls.clear()
        llm(input_ids=ids[:, :1])
        ran = [g for g in report.groups if g.calls]
        assert ran and len(count_calls) == unfused - sum(len(g.layers) - 1 for g in ran)
        names = {tuple(g.names) for g in ran}
        want = {("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")} | (
            {("in_proj_qkv", "in_proj_z")} if version == "4_6" else set())
        assert want <= names, names
        got = llm.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ref, got)
    assert all(g.active for g in report.groups) and len(ran) == len(report.groups)  # the LLM's only, by default
    vision = "model.vision_tower" if version == "4_6" else "vpm"
    assert not any(g.parent_name.startswith(vision) for g in report.groups)
    encoder = fuse_projections(model, parts=["vision"])  # asked for: the vision tower's q / k / v too
    assert encoder.groups and all(g.parent_name.startswith(vision) and g.names == ["q_proj", "k_proj", "v_proj"]
                                  for g in encoder.groups)
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['vpm'\]"):
        fuse_projections(model, parts=["vpm"])
    save_quantized(model, str(tmp_path / "q"))
    fresh = (build_native("4_6") if version == "4_6" else build_remote_layout(version)).eval()
    load_quantized(fresh, str(tmp_path / "q"), progress=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("version", ["4_6", "llama"])
def test_tiny_llm_compiled_one_token_step_has_one_gemm_a_group(version):
    """The tiny models' LLMs compiled fullgraph (a decode step of one token): fused, the graph has one int4 GEMM
    a group fewer per sibling, and the logits are the eager fused model's."""
    import torch._dynamo

    model = _patched_tiny(version)
    if version == "4_6":
        fn = lambda ids: model.model.language_model(input_ids=ids, use_cache=False).last_hidden_state  # noqa: E731
    else:
        fn = lambda ids: model.llm(input_ids=ids, use_cache=False).logits  # noqa: E731
    ids = torch.tensor([[7]])
    plain = Capture()
    torch._dynamo.reset()
    with torch.no_grad():
        try:
            torch.compile(fn, fullgraph=True, backend=plain)(ids)
        except torch._dynamo.exc.Unsupported as e:  # (test_patch.py: whether this torch traces the model at all)
            pytest.skip(f"this torch cannot compile the patched {version} LLM fullgraph: {str(e).splitlines()[0][:200]}")
        report = fuse_projections(model)
        eager = fn(ids)
        fused = Capture()
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend=fused)(ids)
    assert len(fused.graphs) == 1 and report.launches_saved > 0
    assert len(fused.gemm_rows()) == len(plain.gemm_rows()) - report.launches_saved
    want = Counter(plain.gemm_rows())  # each group's layers' GEMMs become one of their stacked rows
    for g in report.groups:
        want.subtract(g.rows)
        want[g.out_features] += 1
    assert min(want.values()) >= 0 and Counter(fused.gemm_rows()) == +want
    assert all(g.active and g._pending is None and g.in_graph and g.calls == 1 for g in report.groups)
    torch.testing.assert_close(out, eager)  # (fp32: dynamo may take an equivalent path; test_patch.py says why)


def test_strided_input_and_settings_changed_after_fusing(count_calls):
    m = Attention(dtype=torch.float32)
    (group,) = fuse_projections(m).groups
    wide = torch.randn(1, 2 * K)
    x = wide[:, ::2]  # one row, not contiguous
    with torch.no_grad():
        outs = m(x)
    assert count_calls == [120]
    for y, layer in zip(outs, (m.q_proj, m.k_proj, m.v_proj)):
        _check_close(y, layer, x.contiguous())
    m.k_proj.act = "int8"  # settings are read at each call: the siblings disagree now, each computes as set
    count_calls.clear()
    with torch.no_grad():
        m(x)
    assert count_calls == [40, 24, 56] and group.active
    m.k_proj.act = None
    count_calls.clear()
    with torch.no_grad():
        m(x)
    assert count_calls == [120]
