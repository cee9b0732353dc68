"""GPTQ: int4 weights chosen against the layer's inputs, column by column with error feedback.

Round to nearest (and the clipping search) quantize every weight on its own. GPTQ (Frantar et al.,
2022) quantizes the columns of W [N, K] in order and, after each column, moves the rounding error
onto the columns not yet quantized along the inverse Hessian of the layer's inputs, H = sum x x^T
over the calibration tokens: it minimises ||X (W - Wq)^T||^2, the layer's output error on those
inputs, instead of ||W - Wq||^2. Same int4 format (q, per-group scale and integer zero): a GPTQ
checkpoint loads and runs exactly like any other.

    gptq_quantize(weight, hessian, group_size)   one layer, given H ([K, K])
    patch_model(model, QuantConfig(method="gptq"), calibration=calibrate(model, batches))

patch_model gathers the Hessians in passes over the calibration batches, as many layers per pass as
fit in hessian_budget() (HESSIAN_BUDGET_BYTES of fp32 [K, K], less on a GPU short of free memory),
in module order; each pass runs through the layers quantized by the passes before it, so there a
layer's H sees its inputs as the int4 model produces them (within a pass, as the fp model does: on
MiniLM with K-order GPTQ, one pass per layer changed the embedding cosine by < 0.001 and cost 37
passes).

Columns go in act-order (decreasing diag(H): the channels with the most input energy first). The
groups stay contiguous in K, as the format has them (no group index), so their scales and zero
points are fitted up front on the original weights ("static groups"), by the clipping-range search
weighted by diag(H) (grid=(1.0,): min/max round to nearest). act_order=False keeps K order and fits
each group when the quantization reaches it, on the weights as the error feedback has left them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .calibrate import _run, inference_forward, padding_mask, text_linear_names, token_rows
from .packing import effective_group_size
from .quantize import QMAX, QuantizedWeight, check_quantizable, scale_dtype_for
from .search import DEFAULT_GRID, search_scale_zero

DAMP = 0.1                     # H + DAMP * mean(diag H) * I; the paper's 0.01 measured worse (QuantConfig.gptq_damp)
BLOCK_SIZE = 128               # columns per lazy batch update (a multiple of the group size)
HESSIAN_BUDGET_BYTES = 4 << 30  # fp32 Hessians held at once by patch_model (more layers: more passes)
FREE_MEMORY_SHARE = 0.25        # ... and at most this share of the GPU's free memory when it starts


def _inverse_cholesky(h: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """The upper Cholesky factor of (H + d * mean(diag H) * I)^-1 with d = damp, or 10x, 100x ... up to
    d = 1 where H is too close to singular for the factorisations in this precision."""
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = damp
    while True:
        l, info = torch.linalg.cholesky_ex(h + eye * (d * mean_diag))
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0:
                return u
        if d >= 1:
            raise ValueError(f"{what}: the input Hessian is not positive definite even with damping "
                             f"{d:g} x mean(diag H) (calibration inputs with huge values?)")
        d = min(1.0, d * 10)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, act_order: bool = True,
                  grid: tuple = DEFAULT_GRID, damp: float = DAMP, block_size: int = BLOCK_SIZE, what: str = "weight",
                  compute_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """GPTQ of a [N, K] weight against the input Hessian `hessian` ([K, K], sum of x x^T over
    calibration tokens; any positive multiple gives the same result). Scales and zeros are in the
    weight's dtype, as with the other methods.

    act_order=True (the default): columns in decreasing order of diag(H), the channels that carry the
    most input energy first, while the later ones can still absorb their error; the groups stay
    contiguous in K (the format's), so their ranges are searched up front on the original weights
    ("static groups"). act_order=False: columns in K order, each group's range searched when the
    quantization reaches it, on the weights as the error feedback has left them (the paper's order).
    `compute_dtype` (fp32; fp64 for exactness tests) is the precision of the error feedback."""
    check_quantizable(weight, group_size, what=what)
    n, k = weight.shape
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"{what} of shape [N={n}, K={k}]: the Hessian must be [K, K] = [{k}, {k}], got {got}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{what}: the input Hessian has NaN / inf entries (calibration activations overflowed?)")
    if not grid or grid[0] != 1.0:
        raise ValueError("the search grid must start with 1.0 (round to nearest)")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dev = weight.device
    dtype = scale_dtype_for(weight.dtype)
    gs = effective_group_size(k, group_size)
    g = k // gs
    w = weight.detach().to(compute_dtype).clone()
    h = hessian.detach().to(device=dev, dtype=compute_dtype).clone()
    dead = h.diagonal() == 0  # channels no calibration token used: H's row and column are zero
    if bool(dead.all()):
        raise ValueError(f"{what}: the input Hessian is zero (no calibration token reached this layer)")
    h[dead, dead] = 1.0       # nothing to trade against: rounded on their own, their error moves nowhere
    cw = h.diagonal().float().clone()  # the search's per-channel weight: E[x_k^2] up to a constant
    scales = torch.empty(n, g, dtype=dtype, device=dev)
    zeros = torch.empty(n, g, dtype=dtype, device=dev)
    static = act_order or group_size == -1  # every range fitted before any update (one group per row: the row's)
    if static:
        scales[:], zeros[:] = search_scale_zero(w.float().reshape(n, g, gs), dtype, grid, cw.reshape(1, g, gs))
    order = torch.argsort(cw, descending=True, stable=True) if act_order else None
    if order is not None:
        w = w[:, order]
        h = h[order][:, order]
    hinv = _inverse_cholesky(h, damp, what)
    del h
    cols = order.tolist() if order is not None else range(k)  # processing position -> column of W
    q = torch.empty(n, k, dtype=torch.uint8, device=dev)
    block = gs * max(1, block_size // gs) if not static else block_size  # dynamic groups: whole groups per block
    gi_now = -1
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            gi = col // gs
            if gi != gi_now:
                if not static:  # col is the group's first column, and the group lies inside this block
                    sc, z = search_scale_zero(w1[:, i:i + gs].float().reshape(n, 1, gs), dtype, grid,
                                              cw[col:col + gs].reshape(1, 1, gs))
                    scales[:, gi], zeros[:, gi] = sc[:, 0], z[:, 0]
                s32, z32 = scales[:, gi].to(compute_dtype), zeros[:, gi].to(compute_dtype)
                gi_now = gi
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc / s32) + z32, 0, QMAX)
            q[:, col] = qc.to(torch.uint8)
            e = (wc - (qc - z32) * s32) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(q=q, scales=scales, zeros=zeros, group_size=group_size)


class HessianCollector:
    """Forward pre-hooks that add x^T x of every input row to a [K, K] fp32 sum per Linear (a module
    at several places in the model adds all of its calls to one sum). Use as a context manager."""

    def __init__(self, modules: Dict[str, nn.Linear], masked: Sequence[str] = ()):
        self.sums: Dict[int, torch.Tensor] = {}
        self.tokens: Dict[int, int] = {}
        self.modules = modules
        self._handles = []
        self._masked = {id(modules[n]) for n in masked if n in modules}  # text layers: padding rows left out
        self.mask: Optional[torch.Tensor] = None  # the padding mask of the batch running now (calibrate.padding_mask)

    def __enter__(self):
        for mod in {id(m): m for m in self.modules.values()}.values():
            self._handles.append(mod.register_forward_pre_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, mod, args):
        x = token_rows(args[0].detach(), self.mask if id(mod) in self._masked else None).float()
        h = self.sums.get(id(mod))
        if h is None:
            h = self.sums[id(mod)] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
        h.addmm_(x.t(), x)
        self.tokens[id(mod)] = self.tokens.get(id(mod), 0) + x.shape[0]

    def pop(self, name: str) -> Tuple[Optional[torch.Tensor], int]:
        """(sum of x x^T, tokens) of the module named `name`, which is no longer held here (neither
        the sum nor the module); (None, 0) if no call reached it."""
        mod = self.modules.pop(name)
        return self.sums.pop(id(mod), None), self.tokens.pop(id(mod), 0)


def hessian_bytes(linear: nn.Linear) -> int:
    return linear.in_features * linear.in_features * 4


def hessian_budget(device) -> int:
    """Bytes of Hessians one pass may hold: HESSIAN_BUDGET_BYTES, and on a GPU at most
    FREE_MEMORY_SHARE of its free memory (the rest is for the calibration forward's activations and
    GPTQ's own [K, K] temporaries: a 24 GB GPU holding an 8B fp16 model has ~7 GB left)."""
    budget = HESSIAN_BUDGET_BYTES
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, int(free * FREE_MEMORY_SHARE))
    return budget


def plan_passes(layers: Sequence[Tuple[str, nn.Linear]], budget: int = None) -> List[List[Tuple[str, nn.Linear]]]:
    """Split `layers` (in model order) into consecutive runs whose Hessians fit in `budget` bytes
    together (a layer bigger than the budget gets a pass of its own); the default budget is
    hessian_budget of the first layer's device."""
    if budget is None:
        budget = hessian_budget(layers[0][1].weight.device) if layers else HESSIAN_BUDGET_BYTES
    passes, cur, used = [], [], 0
    for item in layers:
        b = hessian_bytes(item[1])
        if cur and used + b > budget:
            passes.append(cur)
            cur, used = [], 0
        cur.append(item)
        used += b
    if cur:
        passes.append(cur)
    return passes


def collect_hessians(model: nn.Module, inputs: Sequence, layers: Sequence[Tuple[str, nn.Linear]]) -> HessianCollector:
    """Run the calibration `inputs` through `model` once, summing x x^T for each of `layers` (in the text
    layers, over the real tokens of a padded batch)."""
    layers = dict(layers)
    text = text_linear_names(model)
    with HessianCollector(layers, [n for n in layers if n in text]) as col, inference_forward(model):
        for batch in inputs:
            col.mask = padding_mask(batch)
            _run(model, batch)
    return col
