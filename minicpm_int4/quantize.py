"""Weight -> (q, scales, zeros): asymmetric group-wise int4 quantization.

The format and rounding rule are defined in packing.py. For a group with range [lo, hi]
(extended to contain 0 so that zero is exactly representable):

    scale = (hi - lo) / 15     rounded *up* to the scale dtype, so that hi never clips
    zero  = round(-lo / scale) clamped to 0..15 (an integer)
    q     = clamp(round(w / scale) + zero, 0, 15)

Every weight then lies within half a quantization step of its dequantized value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .packing import effective_group_size

QMAX = 15


@dataclass
class QuantizedWeight:
    q: torch.Tensor       # uint8 [N, K]
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor   # [N, G], integer values in scales.dtype
    group_size: int       # as configured (-1 = per channel)

    def dequantize(self, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(q - zero) * scale per group in fp32 ([N, K]), rounded once to out_dtype if given."""
        gs = effective_group_size(self.q.shape[1], self.group_size)
        w = (self.q.float() - self.zeros.float().repeat_interleave(gs, 1)) * self.scales.float().repeat_interleave(gs, 1)
        return w if out_dtype is None else w.to(out_dtype)


def check_quantizable(weight: torch.Tensor, group_size: int, what: str = "weight") -> None:
    """Raise a ValueError/TypeError naming the shape and the reason when `weight` cannot be quantized."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{what} of shape {tuple(weight.shape)} has dtype {weight.dtype}; int4 quantization needs a floating-point weight")
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError(f"{what} of shape {tuple(weight.shape)} is empty")
    if weight.device.type == "meta":
        raise ValueError(f"{what} of shape {tuple(weight.shape)} is on the meta device; materialise the weights first")
    if group_size not in (32, 64, 128, -1):
        raise ValueError(f"group_size={group_size} is not supported (32, 64, 128 or -1)")
    if group_size != -1 and k % group_size:
        raise ValueError(f"{what} of shape [N={n}, K={k}]: in_features K={k} is not divisible by group_size={group_size}")
    if k % 8:
        raise ValueError(f"{what} of shape [N={n}, K={k}]: in_features K={k} is not a multiple of 8 (8 int4 values per packed word)")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        r, c = (int(v) for v in bad[0])
        raise ValueError(f"{what} of shape [N={n}, K={k}] has {bad.shape[0]} NaN/inf value(s), the first at "
                         f"[{r}, {c}] ({weight[r, c].item()}): no int4 scale can represent it")


LAYER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_layer_dtype(dtype: torch.dtype, what: str = "layer") -> None:
    """A QuantLinear computes in fp16, bf16 or fp32 (its scales, zeros, bias and activations)."""
    if dtype not in LAYER_DTYPES:
        raise TypeError(f"{what}: dtype {dtype} is not supported by the int4 layers (fp16, bf16 or fp32)")


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """Scales and zeros are stored in the layer's dtype (fp16, bf16, or fp32 for fp32 layers)."""
    return weight_dtype if weight_dtype in LAYER_DTYPES else torch.float32


def _round_up_to(x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast fp32 -> dtype, taking the next representable value up where the cast rounded down."""
    y = x32.to(dtype)
    low = y.float() < x32
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


def fit_scale_zero(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    """Scale and integer zero point (both in `dtype`) for ranges [lo, hi] (fp32, any shape)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale32 = (hi - lo) / QMAX
    # An all-zero group: any positive scale reproduces it exactly (q == zero).
    scale32 = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    scale = _round_up_to(scale32, dtype)
    zero = torch.round(-lo / scale.float()).clamp_(0, QMAX)
    return scale, zero.to(dtype)


def quantize_groups(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q for grouped weights wg [N, G, gs] (fp32) with scale/zero [N, G] (any float dtype)."""
    s = scale.float().unsqueeze(-1)
    z = zero.float().unsqueeze(-1)
    return torch.clamp(torch.round(wg / s) + z, 0, QMAX)


def quantize_rtn(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Round-to-nearest with each group's min/max range."""
    check_quantizable(weight, group_size)
    n, k = weight.shape
    gs = effective_group_size(k, group_size)
    wg = weight.detach().float().reshape(n, k // gs, gs)
    scale, zero = fit_scale_zero(wg.amin(-1), wg.amax(-1), scale_dtype_for(weight.dtype))
    q = quantize_groups(wg, scale, zero).to(torch.uint8).reshape(n, k)
    return QuantizedWeight(q=q, scales=scale, zeros=zero, group_size=group_size)


def quantize_weight(weight: torch.Tensor, group_size: int = 128, method: str = "rtn",
                    channel_weight: Optional[torch.Tensor] = None, hessian: Optional[torch.Tensor] = None,
                    what: str = "weight", damp: Optional[float] = None) -> QuantizedWeight:
    """Quantize a [N, K] weight with the chosen method ("rtn", "search" or "gptq"). `channel_weight`
    ([K]) makes the search activation-aware (each input channel's error weighted); rtn ignores it.
    "gptq" needs `hessian` ([K, K], the sum of x x^T over the layer's calibration inputs); `damp` is
    its dampening (None: gptq.DAMP)."""
    if method == "rtn":
        return quantize_rtn(weight, group_size)
    if method == "search":
        from .search import quantize_search

        return quantize_search(weight, group_size, channel_weight=channel_weight)
    if method == "gptq":
        if hessian is None:
            raise ValueError(f"{what}: method='gptq' needs the layer's input Hessian: quantize the model with "
                             "patch_model(model, config, calibration=minicpm_int4.calibrate(model, batches))")
        from .gptq import gptq_quantize

        return gptq_quantize(weight, hessian, group_size, what=what, **({} if damp is None else {"damp": damp}))
    raise ValueError(f"unknown quantization method {method!r} (expected 'rtn', 'search' or 'gptq')")
