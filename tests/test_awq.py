"""AWQ-style scale folding: exact rewrites, checked per fold and on the whole model."""
import copy
import warnings

import pytest
import torch
from torch import nn

from minicpm_int4 import QuantConfig, calibrate, patch_model
from minicpm_int4 import models as layouts
from minicpm_int4.awq import _fold_into_prev, _rtn_dequant, _search_alpha, fold_scales
from minicpm_int4.tiny import build_native, build_remote_layout, prompt_with_image, remote_inputs


def _native_batches(model):
    ids, pv, ts = prompt_with_image(model, text_len=24)
    return [dict(input_ids=ids, pixel_values=pv, target_sizes=ts)]


@pytest.mark.parametrize("which", ["4_6", "llama"])
def test_folds_leave_the_model_function_unchanged(which):
    if which == "4_6":
        model = build_native("4_6")
        batches = _native_batches(model)
        run = lambda m: m(**batches[0]).logits  # noqa: E731
    else:
        model = build_remote_layout("llama")
        batches = [remote_inputs(model)]
        run = lambda m: m(*batches[0]).logits  # noqa: E731
    ref = copy.deepcopy(model)
    calib = calibrate(model, batches, progress=False)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    folds = fold_scales(model, calib, 32, names)
    assert folds
    forms = {f.form for f in folds.values()}
    if which == "4_6":  # Qwen3.5's (1 + w) RMSNorm, SigLIP's LayerNorm, up_proj rows
        assert {"one_plus_gain", "gain", "linear_rows"} <= forms
    with torch.no_grad():
        a, b = run(ref), run(model)
    assert ((a - b).norm() / a.norm()).item() < 1e-5  # fp32 rounding of the rewritten weights only


def test_alpha_search_never_worse_than_no_scaling_and_helps_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 96)
    x = torch.randn(256, 128, generator=g)
    x[:, [3, 70]] *= 40  # outlier input channels, as trained models have
    rms = x.square().mean(0).sqrt()
    alpha, s = _search_alpha([lin], [True], x, rms, 32)
    err = lambda w_q, xs: (xs @ w_q.t() - x @ lin.weight.t()).square().sum().item()  # noqa: E731
    base = err(_rtn_dequant(lin.weight.detach(), 32), x)
    scaled = err(_rtn_dequant((lin.weight.detach() * s), 32), x / s)
    assert alpha > 0 and scaled < base


def test_a_fold_that_does_not_scale_the_output_is_refused():
    class NotAGain(nn.Module):  # has a [C] weight that does not scale its output
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(16))

        def forward(self, x):
            return x + self.weight

    m = NotAGain()
    before = m.weight.detach().clone()
    assert _fold_into_prev(m, torch.rand(16) + 0.5) is None
    assert torch.equal(m.weight, before)


def test_whole_model_check_undoes_folds_that_change_the_function(monkeypatch):
    class PostNormBlock(nn.Module):  # the norm's output also feeds the residual: folding is wrong here
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.lin = nn.Linear(64, 64)

        def forward(self, x):
            h = self.norm(x)
            return self.lin(h) + h

    monkeypatch.setattr(layouts, "SCALE_FOLDS", (layouts.ScaleFold("norm", ("lin",), "invalid on purpose"),))
    torch.manual_seed(0)
    model = nn.Sequential(PostNormBlock(), nn.Linear(64, 64))
    x = torch.randn(32, 64)
    x[:, 5] *= 30
    ref = copy.deepcopy(model)
    calib = calibrate(model, [x], progress=False)
    report = patch_model(model, QuantConfig(group_size=32), progress=False, calibration=calib)
    assert any("undone" in n for n in report.notes)
    assert torch.allclose(model[0].norm.weight, ref[0].norm.weight, rtol=1e-6)
    assert not any("AWQ" in d.reason for d in report.decisions)


def test_fold_scales_can_be_switched_off():
    model = build_native("4_6")
    calib = calibrate(model, _native_batches(model), progress=False)
    report = patch_model(model, QuantConfig(group_size=32, fold_scales=False), progress=False, calibration=calib)
    assert not report.notes and not any("AWQ" in d.reason for d in report.decisions)


def test_no_fold_into_a_weight_that_is_computed():
    """A fold scales weights in place, which a weight computed from other parameters (weight norm,
    parametrized or hook-based) would silently undo: such a Linear takes part in no fold."""
    def block():
        b = nn.Module()
        b.post_attention_layernorm = nn.LayerNorm(64)
        b.mlp = nn.Module()
        b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)
        return b

    def folds(b):
        return [(prev, cons) for prev, cons, _ in layouts.scale_fold_groups(b)]

    assert folds(block()) == [("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                              ("mlp.up_proj", ["mlp.down_proj"])]
    b = block()
    nn.utils.parametrizations.weight_norm(b.mlp.gate_proj)
    assert folds(b) == [("mlp.up_proj", ["mlp.down_proj"])]
    b = block()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated by torch, still in remote code
        nn.utils.weight_norm(b.mlp.down_proj)
    assert folds(b) == [("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]
