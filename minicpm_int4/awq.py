"""AWQ-style per-channel scaling, folded into the previous op where the layout allows.

For a group of Linears that read the same activations x (models.SCALE_FOLDS), quantizing W * s and
computing with x / s is mathematically the same layer, but it moves quantization precision to the
input channels that carry large activations. s = rms(x)^alpha (normalised), with alpha searched on
the calibration samples to minimise the group's output error under int4 round-to-nearest; alpha = 0
(no scaling) is a candidate, so a fold never makes that error worse. 1/s is folded into the
previous op (a norm's gain or the rows of a Linear): zero runtime cost.

Every fold is checked on a probe input (the previous op's output must scale exactly by 1/s); a
norm whose gain is stored as (1 + weight), as Qwen3.5's, is recognised that way. A fold that fails
its check is undone and the group falls back to error weighting alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .calibrate import Calibration
from .models import scale_fold_groups
from .quantize import quantize_rtn

ALPHAS = tuple(i / 10 for i in range(11))  # 0.0 first: no scaling


@dataclass
class FoldResult:
    prev: str
    consumers: List[str]
    alpha: float
    form: str          # "gain", "one_plus_gain" or "linear_rows"
    note: str
    scale: torch.Tensor = None  # [C], the consumers' weights were multiplied by it


def _reached(stats) -> bool:
    """Whether calibration inputs reached a layer (its statistics hold a sample to search on)."""
    return stats is not None and stats.sample is not None and stats.count > 0


def _rtn_dequant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return quantize_rtn(w, group_size).dequantize()


def _search_alpha(consumers: List[nn.Linear], quantized: List[bool], x: torch.Tensor, rms: torch.Tensor,
                  group_size: int):
    """(alpha, s) minimising sum_i ||x W_i^T - (x / s) Q(W_i * s)^T||^2 over the quantized consumers."""
    refs = [x @ c.weight.float().t() for c, q in zip(consumers, quantized) if q]
    best = (float("inf"), 0.0, None)
    for alpha in ALPHAS:
        if alpha == 0:
            s = torch.ones_like(rms)
        else:
            s = rms.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = 0.0
        for c, ref in zip((c for c, q in zip(consumers, quantized) if q), refs):
            wq = _rtn_dequant((c.weight.float() * s).to(c.weight.dtype), group_size)
            loss += (xs @ wq.t() - ref).square().sum().item()
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[1], best[2]


def _probe(prev: nn.Module, width: int):
    p = prev.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, width, generator=g).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        return x, prev(x).float()


def _check(prev, x, y0, s) -> bool:
    with torch.no_grad():
        y1 = prev(x).float()
    eps = torch.finfo(prev.weight.dtype).eps
    return bool(((y1 * s - y0).abs() <= 16 * eps * y0.abs().max() + 1e-6).all())


def _fold_into_prev(prev: nn.Module, s: torch.Tensor) -> Optional[str]:
    """Divide prev's output by s; returns the form used, or None (prev left unchanged)."""
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
            return "linear_rows"
        x, y0 = _probe(prev, s.numel())
        w0 = prev.weight.detach().clone()
        b0 = prev.bias.detach().clone() if getattr(prev, "bias", None) is not None else None
        sd = s.to(prev.weight.device)
        for form in ("gain", "one_plus_gain"):
            if form == "gain":
                prev.weight.copy_((w0.float() / sd).to(w0.dtype))
            else:
                prev.weight.copy_(((1.0 + w0.float()) / sd - 1.0).to(w0.dtype))
            if b0 is not None:
                prev.bias.copy_((b0.float() / sd).to(b0.dtype))
            if _check(prev, x, y0, sd):
                return form
        prev.weight.copy_(w0)
        if b0 is not None:
            prev.bias.copy_(b0)
        return None


def fold_scales(model: nn.Module, calibration: Calibration, group_size: int,
                quantize_names: set, declined: Optional[set] = None) -> Dict[str, FoldResult]:
    """Search and fold per-channel scales for every matching group whose consumers all have
    calibration samples and at least one of which will be quantized. Updates the calibration
    statistics of the consumers to the scaled inputs. Returns {consumer name: FoldResult}; the
    consumers of groups where no scaling (alpha = 0) won are added to `declined` when given."""
    results: Dict[str, FoldResult] = {}
    for prev_name, cons_names, note in scale_fold_groups(model):
        if not any(n in quantize_names for n in cons_names):
            continue
        stats = [calibration.stats.get(n) for n in cons_names]
        if not all(map(_reached, stats)):
            continue  # not exercised by the calibration inputs: nothing to search or verify with
        consumers = [model.get_submodule(n) for n in cons_names]
        rms = stats[0].mean_sq.sqrt().clamp_min(1e-6).to(consumers[0].weight.device)
        x = stats[0].sample.to(consumers[0].weight.device)
        alpha, s = _search_alpha(consumers, [n in quantize_names for n in cons_names], x, rms, group_size)
        if alpha == 0:
            if declined is not None:
                declined.update(cons_names)
            continue
        form = _fold_into_prev(model.get_submodule(prev_name), s)
        if form is None:
            continue
        with torch.no_grad():
            for c in consumers:
                c.weight.copy_((c.weight.float() * s).to(c.weight.dtype))
        for st in stats:
            st.sum_sq = st.sum_sq / s.to(st.sum_sq.device).square()
            st.sample = st.sample / s.to(st.sample.device)
        fr = FoldResult(prev_name, cons_names, alpha, form, note, s)
        for n in cons_names:
            results[n] = fr
    return results


def unfold_scales(model: nn.Module, results: Dict[str, FoldResult]) -> None:
    """Undo fold_scales (up to rounding): consumers' weights / s, prev's output * s."""
    for fr in {id(f): f for f in results.values()}.values():
        s = fr.scale
        with torch.no_grad():
            for n in fr.consumers:
                c = model.get_submodule(n)
                c.weight.copy_((c.weight.float() / s).to(c.weight.dtype))
            prev = model.get_submodule(fr.prev)
            if fr.form == "linear_rows":
                prev.weight.mul_(s.to(prev.weight.dtype)[:, None])
                if prev.bias is not None:
                    prev.bias.mul_(s.to(prev.bias.dtype))
                continue
            sd = s.to(prev.weight.device)
            if fr.form == "gain":
                prev.weight.copy_((prev.weight.float() * sd).to(prev.weight.dtype))
            else:
                prev.weight.copy_(((1.0 + prev.weight.float()) * sd - 1.0).to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.copy_((prev.bias.float() * sd).to(prev.bias.dtype))


def search_input_scale(linear: nn.Linear, stats, group_size: int) -> Optional[Tuple[float, torch.Tensor]]:
    """For a layer no scale folds into (QuantConfig.input_scales): (alpha, m) with m = 1/s [K] (fp32;
    QuantLinear.from_linear stores it in the layer's dtype), the multiplier the layer applies to its
    input at runtime (its weight is quantized as W / m), searched on the layer's calibration sample
    as fold_scales searches a group's (round to nearest as the quantizer); None where alpha = 0 (no
    scaling) won, or the calibration never reached the layer."""
    if not _reached(stats):
        return None
    w = linear.weight
    rms = stats.mean_sq.sqrt().clamp_min(1e-6).to(w.device)
    alpha, s = _search_alpha([linear], [True], stats.sample.to(w.device), rms, group_size)
    if alpha == 0:
        return None
    # s is normalised so that max(s) * min(s) = 1; the clamp keeps m, and W / m, well inside fp16's range
    # even for channels the calibration never excited (QuantLinear quantizes with the m it stores)
    return alpha, (1.0 / s).clamp(1e-3, 1e3).float()
