"""Compare a quantized model with its high-precision original.

    compare_models(ref, quant, batches)  -> next-token KL divergence, top-1 agreement, and a
                                            per-layer table of each quantized Linear's local
                                            relative output error (both layers fed the reference
                                            model's input to that layer), over the real tokens of
                                            padded batches (calibrate.padding_mask)
    perplexity(model, input_ids)         -> exp(mean next-token NLL)
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import _run, inference_forward, padding_mask, text_linear_names, token_rows
from .models import unwrap_compiled
from .qlinear import QuantLinear


def _logits(out):
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def compare_models(ref: nn.Module, quant: nn.Module, batches: Iterable, layer_errors: bool = True) -> Dict:
    ref, quant = unwrap_compiled(ref), unwrap_compiled(quant)  # layers matched by the models' own names
    qmods = {n: m for n, m in quant.named_modules() if isinstance(m, QuantLinear)}
    err_sq, ref_sq = defaultdict(float), defaultdict(float)
    handles = []
    batch_mask = [None]  # the padding mask of the batch running now: padding positions are not compared
    if layer_errors:
        text = text_linear_names(ref)
        for name, mod in ref.named_modules():
            if name in qmods and isinstance(mod, nn.Linear):
                def hook(m, args, out, name=name, masked=name in text):
                    q = qmods[name]  # the reference may run in another dtype (eval --dtype) than the int4 layer
                    y_q = q(args[0].to(device=q.qweight.device, dtype=q.dtype))
                    mask = batch_mask[0] if masked else None
                    y_q, y = token_rows(y_q.float(), mask), token_rows(out.float(), mask)
                    err_sq[name] += (y_q.to(y.device) - y).square().sum().item()
                    ref_sq[name] += y.square().sum().item()
                handles.append(mod.register_forward_hook(hook))
    kl_sum = tokens = agree = 0.0
    try:
        with inference_forward(ref), inference_forward(quant):  # as they run for inference: no dropout
            for batch in batches:
                batch_mask[0] = mask = padding_mask(batch)
                lr = _logits(_run(ref, batch)).float()
                lq = _logits(_run(quant, batch)).float()
                lr, lq = token_rows(lr, mask), token_rows(lq.to(lr.device), mask)
                logp_r, logp_q = F.log_softmax(lr, -1), F.log_softmax(lq, -1)
                kl_sum += (logp_r.exp() * (logp_r - logp_q)).sum().item()
                agree += (lr.argmax(-1) == lq.argmax(-1)).sum().item()
                tokens += lr.shape[0]
    finally:
        for h in handles:
            h.remove()
    if not tokens:
        raise ValueError("compare_models: no batches (or only empty ones) to compare on")
    layers: List[Dict] = [{"name": n, "rel_output_error": math.sqrt(err_sq[n] / ref_sq[n]) if ref_sq[n] > 0 else None}
                          for n in qmods if n in ref_sq]
    return {"tokens": int(tokens), "kl_divergence": kl_sum / max(1, tokens),
            "top1_agreement": agree / max(1, tokens), "layers": layers}


def perplexity(model: nn.Module, input_ids: torch.Tensor, window: int = 512) -> float:
    """exp of the mean next-token negative log-likelihood over non-overlapping windows of input_ids
    [B, T] (B rows of the same length T >= 2, no padding)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"perplexity: window must be a positive number of tokens, got {window!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"perplexity: input_ids must be [B, T] with T >= 2 tokens, got shape {tuple(input_ids.shape)}")
    nll, count = 0.0, 0
    with inference_forward(model):
        for s in range(0, input_ids.shape[1] - 1, window):
            ids = input_ids[:, s:s + window + 1]
            if ids.shape[1] < 2:
                break
            logits = _logits(_run(model, {"input_ids": ids[:, :-1]})).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()  # every row's predictions (B x window), not one row's
    return math.exp(nll / count)


def layer_table(result: Dict, top: int = 20) -> str:
    rows = sorted((r for r in result["layers"] if r["rel_output_error"] is not None), key=lambda r: -r["rel_output_error"])
    lines = ["| layer | relative output error |", "|---|---|"]
    lines += [f"| {r['name']} | {r['rel_output_error']:.4f} |" for r in rows[:top]]
    return "\n".join(lines)
