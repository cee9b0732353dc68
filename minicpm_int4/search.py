"""Calibration-free clipping-range search: better than round-to-nearest, never worse.

For each group the range [lo, hi] is shrunk by factors a in a grid (1.0 first, i.e. round to
nearest), the scale and zero point are re-fitted to [a*lo, a*hi], and the candidate with the
smallest squared reconstruction error (optionally weighted per input channel) is kept. The search
is vectorised over all groups of a layer: one pass over the weight per grid point, memory bounded
by a few copies of the weight.
"""
from __future__ import annotations

from typing import Optional

import torch

from .packing import effective_group_size
from .quantize import QuantizedWeight, check_quantizable, fit_scale_zero, quantize_groups, scale_dtype_for

DEFAULT_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5


def quantize_search(
    weight: torch.Tensor,
    group_size: int,
    grid: tuple = DEFAULT_GRID,
    channel_weight: Optional[torch.Tensor] = None,
) -> QuantizedWeight:
    """Search the clipping range per group. `channel_weight` ([K], >= 0) weights the squared error
    of each input channel (activation-aware search passes mean(x^2) per channel).

    The first grid point must be 1.0 (round to nearest); ties keep the earlier candidate, so the
    result is deterministic and never has a larger (weighted) error than rtn on any group.
    """
    check_quantizable(weight, group_size)
    if not grid or grid[0] != 1.0:
        raise ValueError("the search grid must start with 1.0 (round to nearest)")
    n, k = weight.shape
    gs = effective_group_size(k, group_size)
    g = k // gs
    dtype = scale_dtype_for(weight.dtype)
    wg = weight.detach().float().reshape(n, g, gs)
    cw = None
    if channel_weight is not None:
        if channel_weight.shape != (k,):
            raise ValueError(f"channel_weight must have shape [K={k}], got {tuple(channel_weight.shape)}")
        cw = channel_weight.detach().float().to(wg.device).reshape(1, g, gs)
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = best_s = best_z = None
    for a in grid:
        s, z = fit_scale_zero(lo * a, hi * a, dtype)
        q = quantize_groups(wg, s, z)
        d = (q - z.float().unsqueeze(-1)) * s.float().unsqueeze(-1) - wg
        d = d * d
        err = (d * cw).sum(-1) if cw is not None else d.sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    q = quantize_groups(wg, best_s, best_z).to(torch.uint8).reshape(n, k)
    return QuantizedWeight(q=q, scales=best_s, zeros=best_z, group_size=group_size)
