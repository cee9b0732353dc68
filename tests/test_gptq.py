"""GPTQ (gptq.py): the blocked, Cholesky form against the textbook column-by-column form, its
limits (identity Hessian = the search / rtn), the output error it is for, and patch_model's passes."""
import copy

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear, calibrate, patch_model
from minicpm_int4 import gptq
from minicpm_int4.gptq import gptq_quantize
from minicpm_int4.quantize import QMAX, quantize_rtn, quantize_weight
from minicpm_int4.search import DEFAULT_GRID, quantize_search, search_scale_zero


def textbook_gptq(w, h, group_size, grid=DEFAULT_GRID, damp=gptq.DAMP, act_order=True):
    """GPTQ as first written: after each column, its rounding error divided by [H^-1]_ii is spread
    over the columns not yet quantized along row i of H^-1, and column i is then eliminated from
    H^-1 (a rank-one downdate). No blocks, no Cholesky; fp64. Columns in decreasing diag(H) with
    every group's range fitted first (act_order), or in K order with each group fitted on reaching it."""
    n, k = w.shape
    w = w.double().clone()
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    cw = h.diagonal().float().clone()
    gs = k if group_size == -1 else group_size
    dtype = torch.float32
    scales, zeros = torch.empty(n, k // gs), torch.empty(n, k // gs)
    static = act_order or group_size == -1
    if static:
        scales[:], zeros[:] = search_scale_zero(w.float().reshape(n, k // gs, gs), dtype, grid, cw.reshape(1, k // gs, gs))
    order = torch.argsort(cw, descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    hinv = torch.linalg.inv(h + torch.eye(k, dtype=torch.float64) * damp * h.diagonal().mean())
    q = torch.empty(n, k, dtype=torch.uint8)
    for p in range(k):
        col = int(order[p])
        if not static and col % gs == 0:  # K order: p == col
            s, z = search_scale_zero(w[:, p:p + gs].float().reshape(n, 1, gs), dtype, grid,
                                     cw[col:col + gs].reshape(1, 1, gs))
            scales[:, col // gs], zeros[:, col // gs] = s[:, 0], z[:, 0]
        s, z = scales[:, col // gs].double(), zeros[:, col // gs].double()
        qc = torch.clamp(torch.round(w[:, p] / s) + z, 0, QMAX)
        q[:, col] = qc.to(torch.uint8)
        e = (w[:, p] - (qc - z) * s) / hinv[p, p]
        w[:, p:] -= e[:, None] * hinv[p, p:][None, :]
        hinv = hinv - hinv[:, p:p + 1] @ hinv[p:p + 1, :] / hinv[p, p]
    return q, scales, zeros


def _inputs(t, k, seed, token_seed=None):
    """Correlated activations with a few outlier channels, like a transformer's: the mixing and the
    outlier channels are fixed by `seed`, the tokens by `token_seed` (default: `seed`)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    outliers = torch.randperm(k, generator=g)[:3]
    tokens = torch.Generator().manual_seed(seed if token_seed is None else token_seed)
    x = torch.randn(t, k, generator=tokens) @ a
    x[:, outliers] *= 15
    return x


def _out_err(x, w, qw):
    return ((x @ (qw.dequantize() - w.float()).t()).norm() / (x @ w.float().t()).norm()).item()


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("group_size,grid", [(32, DEFAULT_GRID), (64, (1.0,)), (-1, DEFAULT_GRID), (128, (1.0,))])
def test_blocked_cholesky_form_equals_the_textbook_form(group_size, grid, act_order):
    # K = 256 spans blocks of 64 (block_size=64 below): the lazy updates between blocks are exercised
    n, k = 24, 256
    g = torch.Generator().manual_seed(group_size + len(grid))
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    x = _inputs(300, k, seed=group_size)
    x[:, 5] = 0  # a channel no token uses: H's row and column are zero
    h = (x.t() @ x).double()
    got = gptq_quantize(w, h, group_size, grid=grid, block_size=64, compute_dtype=torch.float64, act_order=act_order)
    q, scales, zeros = textbook_gptq(w, h, group_size, grid, act_order=act_order)
    assert torch.equal(got.q, q)
    assert torch.equal(got.scales, scales) and torch.equal(got.zeros, zeros)


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_is_the_search_and_rtn(group_size, dtype, act_order):
    # uncorrelated unit inputs: no error has anywhere to go, every weight is rounded on its own
    w = (torch.randn(40, 256) * 0.03).to(dtype)
    h = torch.eye(256)
    for grid, expect in ((DEFAULT_GRID, quantize_search(w, group_size, channel_weight=torch.ones(256))),
                         ((1.0,), quantize_rtn(w, group_size))):
        got = gptq_quantize(w, h, group_size, grid=grid, act_order=act_order)
        assert got.scales.dtype == expect.scales.dtype == dtype
        assert torch.equal(got.q, expect.q) and torch.equal(got.scales, expect.scales)
        assert torch.equal(got.zeros, expect.zeros)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_gptq_has_the_lowest_output_error_on_its_inputs(group_size, seed):
    # what GPTQ minimises: ||X (W - Wq)^T|| on the calibration activations X, which the rounding
    # methods only approximate (rtn ignores X, the activation-aware search uses only diag(X^T X))
    n, k = 96, 256
    w = torch.randn(n, k) * 0.02
    x = _inputs(2048, k, seed)
    errs = {"rtn": _out_err(x, w, quantize_rtn(w, group_size)),
            "act-search": _out_err(x, w, quantize_search(w, group_size, channel_weight=x.square().mean(0))),
            "gptq": _out_err(x, w, gptq_quantize(w, x.t() @ x, group_size)),
            "gptq-k-order": _out_err(x, w, gptq_quantize(w, x.t() @ x, group_size, act_order=False))}
    assert max(errs["gptq"], errs["gptq-k-order"]) < errs["act-search"] < errs["rtn"], errs
    # and it generalises: on fresh tokens from the same distribution gptq still beats the search
    x2 = _inputs(2048, k, seed, token_seed=seed + 100)
    held_out = {"act-search": _out_err(x2, w, quantize_search(w, group_size, channel_weight=x.square().mean(0))),
                "gptq": _out_err(x2, w, gptq_quantize(w, x.t() @ x, group_size))}
    assert held_out["gptq"] < held_out["act-search"], held_out


def test_gptq_input_errors_are_named():
    w = torch.randn(64, 128)
    with pytest.raises(ValueError, match=r"Hessian must be \[K, K\] = \[128, 128\], got \(64, 64\)"):
        gptq_quantize(w, torch.eye(64), 32)
    h = torch.eye(128)
    h[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN / inf"):
        gptq_quantize(w, h, 32)
    with pytest.raises(ValueError, match="Hessian is zero"):
        gptq_quantize(w, torch.zeros(128, 128), 32)
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        gptq_quantize(torch.randn(8, 96), torch.eye(96), 64)
    with pytest.raises(ValueError, match="grid must start with 1.0"):
        gptq_quantize(w, torch.eye(128), 32, grid=(0.9, 1.0))
    with pytest.raises(ValueError, match="method='gptq' needs the layer's input Hessian"):
        quantize_weight(w, 32, "gptq")
    lin = nn.Linear(128, 64)
    with pytest.raises(ValueError, match=r"proj\.weight: method='gptq' needs .*calibrate\(model, batches\)"):
        QuantLinear.from_linear(lin, QuantConfig(method="gptq"), name="proj")
    ql = QuantLinear.from_linear(lin, QuantConfig(method="gptq", group_size=32), hessian=torch.eye(128))
    assert ql.out_features == 64


def test_a_singular_hessian_gets_more_damping():
    # a rank-one H (one calibration token) with almost no damping: the damping grows until the
    # factorisations succeed in fp32; the weights stay finite and the token's own output error is
    # no larger than rtn's
    x = torch.randn(1, 128)
    w = torch.randn(32, 128)
    qw = gptq_quantize(w, x.t() @ x, 32, damp=1e-9)
    assert torch.isfinite(qw.dequantize()).all()
    assert _out_err(x, w, qw) <= _out_err(x, w, quantize_rtn(w, 32))


def test_the_configs_damping_reaches_the_fit():
    """QuantConfig.gptq_damp is the d of H + d * mean(diag H) * I that from_linear and patch_model use:
    the same bits as gptq_quantize(damp=d), different ones for another d (on a rank-deficient H, where
    the damping matters)."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(128, 64)
    x = torch.randn(40, 128, generator=g)  # 40 tokens < 128 channels
    h = x.t() @ x
    for damp in (0.01, gptq.DAMP, 0.5):
        ql = QuantLinear.from_linear(lin, QuantConfig(method="gptq", group_size=32, gptq_damp=damp), hessian=h)
        ref = gptq_quantize(lin.weight.detach(), h, 32, damp=damp)
        assert torch.equal(ql.dequantized_weight(), ref.dequantize(torch.float32))
    assert QuantConfig().gptq_damp == gptq.DAMP
    a, b = (QuantLinear.from_linear(lin, QuantConfig(method="gptq", group_size=32, gptq_damp=d), hessian=h)
            for d in (0.01, 0.5))
    assert not torch.equal(a.qweight, b.qweight)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _hessian(inputs):
    """sum of x x^T over the batches, added batch by batch as the collector adds them"""
    h = torch.zeros(inputs[0].shape[-1], inputs[0].shape[-1])
    for xb in inputs:
        xb = xb.reshape(-1, xb.shape[-1])
        h.addmm_(xb.t(), xb)
    return h


@pytest.mark.parametrize("budget", [None, 1])
def test_patch_model_gathers_hessians_in_passes(budget, monkeypatch):
    # budget=1: one layer per pass, so `down` is fitted to the int4 `up`'s outputs; by default both
    # Hessians come from one pass through the fp model. Both are checked against from_linear.
    if budget is not None:
        monkeypatch.setattr(gptq, "HESSIAN_BUDGET_BYTES", budget)
    torch.manual_seed(0)
    model = TwoLayers()
    batches = [(torch.randn(5, 40, 64),) for _ in range(3)]
    ref = copy.deepcopy(model)
    calib = calibrate(model, batches, progress=False)
    cfg = QuantConfig(method="gptq", group_size=32, min_out_features=1)
    report = patch_model(model, cfg, calibration=calib, progress=False)
    assert [d.action for d in report.decisions] == ["quantized", "quantized"]
    assert all("gptq on 600 calibration tokens" in d.reason for d in report.decisions)
    assert any("in 2 passes" in n for n in report.notes) == (budget == 1)
    xs = [b[0] for b in batches]
    assert torch.equal(model.up.qweight, QuantLinear.from_linear(ref.up, cfg, hessian=_hessian(xs)).qweight)
    with torch.no_grad():
        h_fp = _hessian([torch.relu(ref.up(xb)) for xb in xs])
        h_int4 = _hessian([torch.relu(model.up(xb)) for xb in xs])
    from_fp = QuantLinear.from_linear(ref.down, cfg, hessian=h_fp)
    from_int4 = QuantLinear.from_linear(ref.down, cfg, hessian=h_int4)
    assert not torch.equal(from_fp.qweight, from_int4.qweight)  # the two orders are told apart
    expect = from_int4 if budget == 1 else from_fp
    assert torch.equal(model.down.qweight, expect.qweight)
    assert torch.equal(model.down.scales, expect.scales) and torch.equal(model.down.zeros, expect.zeros)
    # each fp Linear is freed once swapped, while the others are quantized (an 8B model's fp16 weights
    # beside its int4 ones would double the peak memory)
    import gc
    import weakref

    fresh = TwoLayers()
    up = weakref.ref(fresh.up)
    seen = []
    from_linear = QuantLinear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        if kwargs.get("name") == "down":
            gc.collect()
            seen.append(up())
        return from_linear(cls, linear, *args, **kwargs)

    monkeypatch.setattr(QuantLinear, "from_linear", classmethod(spy))
    patch_model(fresh, cfg, calibration=calibrate(fresh, batches, progress=False), progress=False)
    assert seen == [None]
    again = patch_model(model, progress=False)  # the model's own config (gptq), nothing left to quantize
    assert [d.action for d in again.decisions] == ["already quantized"] * 2


def test_hessian_budget_and_passes(monkeypatch):
    assert gptq.hessian_budget("cpu") == gptq.HESSIAN_BUDGET_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 20, 80 << 30))
    assert gptq.hessian_budget("cuda") == 2 << 20  # a quarter of the 8 MiB free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
    assert gptq.hessian_budget("cuda:0") == gptq.HESSIAN_BUDGET_BYTES
    # Hessians of 256 KiB, 256 KiB, 1 MiB, 64 KiB, 4 MiB; in order, as many as 1 MiB holds (4 MiB alone)
    layers = [(f"l{i}", nn.Linear(k, 8)) for i, k in enumerate([256, 256, 512, 128, 1024])]
    runs = gptq.plan_passes(layers, budget=1 << 20)
    assert [[name for name, _ in run] for run in runs] == [["l0", "l1"], ["l2"], ["l3"], ["l4"]]
    assert [[n for n, _ in run] for run in gptq.plan_passes(layers)] == [["l0", "l1", "l2", "l3", "l4"]]


def test_patch_model_gptq_needs_batches_and_falls_back_where_none_reach():
    model = TwoLayers()
    with pytest.raises(ValueError, match=r"method='gptq'.*calibration=minicpm_int4\.calibrate"):
        patch_model(model, QuantConfig(method="gptq"), progress=False)
    calib = calibrate(model, [(torch.randn(2, 64),)], progress=False)
    calib.inputs = []
    with pytest.raises(ValueError, match="holds no batches"):
        patch_model(model, QuantConfig(method="gptq"), calibration=calib, progress=False)

    class Branches(nn.Module):  # `b` is never called on the calibration inputs
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = Branches()
    b0 = copy.deepcopy(model.b)
    calib = calibrate(model, [(torch.randn(30, 64),)], progress=False)
    with pytest.warns(UserWarning, match="fewer calibration tokens than they have input channels; more calibration "
                                         "text [(]several"):  # no vision layer among them: text only
        report = patch_model(model, QuantConfig(method="gptq", group_size=32), calibration=calib, progress=False)
    by = {d.name: d for d in report.decisions}
    assert "gptq on 30 calibration tokens" in by["a"].reason
    assert "no calibration input reached it: clipping-range search" in by["b"].reason
    assert torch.equal(model.b.qweight, QuantLinear.from_linear(b0, QuantConfig(group_size=32)).qweight)


def test_gptq_on_a_tiny_minicpmv_lowers_the_logits_error():
    from minicpm_int4.calibrate import _run
    from minicpm_int4.tiny import build_native

    model = build_native("4_6").eval()  # transformers 4.x: skipped (conftest), no native 4.6 class
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, 128), generator=g) for _ in range(16)]  # 2048 tokens > every K
    with torch.no_grad():
        ref = _run(model, batches[0]).logits.float()
    errs = {}
    for method in ("rtn", "gptq"):
        q = copy.deepcopy(model)
        report = patch_model(q, QuantConfig(method=method, group_size=32), calibration=calibrate(q, batches, progress=False),
                             progress=False)
        with torch.no_grad():
            errs[method] = ((_run(q, batches[0]).logits.float() - ref).norm() / ref.norm()).item()
    assert len(report.quantized) > 20
    assert errs["gptq"] < errs["rtn"], errs


def test_from_pretrained_cannot_gptq_while_loading():
    pytest.importorskip("transformers")
    from minicpm_int4.hf_integration import quantization_config

    with pytest.raises(ValueError, match=r"method='gptq'\) needs calibration inputs.*minicpm-int4 quantize MODEL OUT --method gptq"):
        quantization_config(QuantConfig(method="gptq"))


def test_gptq_with_mixed_precision_and_int8_activations():
    # the sensitivity ranking runs on the gptq weights; W4A8 layers take gptq weights like any other
    torch.manual_seed(0)
    model = TwoLayers()
    batches = [(torch.randn(4, 50, 64),) for _ in range(2)]
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    calib = calibrate(model, batches, progress=False)
    cfg = QuantConfig(method="gptq", group_size=32, min_out_features=1, keep_most_sensitive=1, act="int8")
    report = patch_model(model, cfg, calibration=calib, progress=False)
    kept = [d for d in report.decisions if d.action == "kept"]
    assert len(kept) == 1 and "sensitivity rank 1 of 2" in kept[0].reason
    quantized = [d for d in report.decisions if d.action == "quantized"]
    assert len(quantized) == 1 and quantized[0].path.startswith("w4a8") and "gptq on 400" in quantized[0].reason
    assert quantized[0].sensitivity < kept[0].sensitivity
    with torch.no_grad():
        y = model(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 0.2, rel  # one int4 layer (~5-10% of its output) + int8 activations: a few % off, not garbage


def test_gptq_with_image_prompts_fits_the_vision_tower_too():
    from minicpm_int4.tiny import build_native, prompt_with_image

    model = build_native("4_6")
    ids, pv, ts = prompt_with_image(model)
    calib = calibrate(model, [{"input_ids": ids, "pixel_values": pv, "target_sizes": ts}], progress=False)
    # one short prompt: a few dozen tokens; the vision tower's layers among them ask for images too
    with pytest.warns(UserWarning, match="fewer calibration tokens .* more calibration text and images"):
        report = patch_model(model, QuantConfig(method="gptq", group_size=32), calibration=calib, progress=False)
    by = {d.name: d for d in report.decisions}
    for name in ("model.vision_tower.encoder.layers.0.mlp.fc1", "model.language_model.layers.0.mlp.up_proj"):
        assert by[name].action == "quantized" and "gptq on" in by[name].reason, by[name]
