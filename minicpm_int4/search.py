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
from .quantize import QMAX, QuantizedWeight, check_quantizable, fit_scale_zero, quantize_groups, scale_dtype_for

DEFAULT_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0, 0.975, ..., 0.5
CHUNK_ELEMENTS = 1 << 18  # weight elements per row chunk on CPU (1 MiB of fp32)


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
    cw = None
    if channel_weight is not None:
        if channel_weight.shape != (k,):
            raise ValueError(f"channel_weight must have shape [K={k}], got {tuple(channel_weight.shape)}")
        cw = channel_weight.detach().float().to(weight.device).reshape(1, g, gs)
    scales = torch.empty(n, g, dtype=dtype, device=weight.device)
    zeros = torch.empty(n, g, dtype=dtype, device=weight.device)
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    # rows in chunks that stay cache-resident on CPU (and bound the temporaries on GPU)
    rows = max(1, (CHUNK_ELEMENTS if weight.device.type == "cpu" else 64 * CHUNK_ELEMENTS) // k)
    for r0 in range(0, n, rows):
        wg = weight[r0:r0 + rows].detach().float().reshape(-1, g, gs)
        best_s, best_z = search_scale_zero(wg, dtype, grid, cw)
        scales[r0:r0 + rows], zeros[r0:r0 + rows] = best_s, best_z
        q[r0:r0 + rows] = quantize_groups(wg, best_s, best_z).to(torch.uint8).reshape(-1, k)
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, group_size=group_size)


def search_scale_zero(wg: torch.Tensor, dtype: torch.dtype, grid: tuple = DEFAULT_GRID,
                      cw: Optional[torch.Tensor] = None):
    """The searched scale and zero point ([R, G], in `dtype`) of grouped fp32 weights wg [R, G, gs]:
    per group, the grid point with the smallest (cw-weighted, cw broadcasting to [1, G, gs]) squared
    reconstruction error; ties keep the earlier one (grid[0] = 1.0: round to nearest)."""
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = best_s = best_z = None
    for a in grid:
        sc, z = fit_scale_zero(lo * a, hi * a, dtype)
        s32, z32 = sc.float().unsqueeze(-1), z.float().unsqueeze(-1)
        d = torch.div(wg, s32).round_().add_(z32).clamp_(0, QMAX).sub_(z32).mul_(s32).sub_(wg).square_()
        err = (d.mul_(cw) if cw is not None else d).sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, sc, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, sc, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z
