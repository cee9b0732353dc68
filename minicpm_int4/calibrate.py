"""Calibration: per-input-channel activation statistics of every Linear, from a few batches.

`calibrate(model, batches)` runs the model on the batches with forward pre-hooks on every nn.Linear
and keeps, per Linear, only the sum of x_k^2 over tokens ([K]) and a small fixed-size sample of
input rows (for output-error sensitivity). In a padded text batch (a dict whose `attention_mask` has
zeros: `tokenizer(texts, padding=True)`) the padding positions are left out of the text layers'
statistics, as they are of GPTQ's Hessians and the output errors that rank layers. The hooks are
removed afterwards (also on error) and no activation is referenced once a batch is done, so memory
stays bounded by the sample size.

Uses:
  * activation-aware search: the search weights each input channel's squared error by E[x_k^2],
    i.e. minimises the expected output error E||(W - Wq) x||^2 under a diagonal approximation;
  * sensitivity: relative output error ||X (W - Wq)^T|| / ||X W^T|| on the sampled rows, which the
    mixed-precision policies rank layers by;
  * GPTQ (gptq.py): the batches are kept (`Calibration.inputs`, references to what was given) and run
    again to gather each layer's input Hessian.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .models import detect_layout, text_module, unwrap_compiled


@dataclass
class LinearStats:
    sum_sq: torch.Tensor            # [K] fp32, sum over tokens of x_k^2
    count: int = 0                  # tokens seen
    sample: Optional[torch.Tensor] = None   # [<= max_samples, K] fp32, rows of x

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sum_sq / max(1, self.count)


@dataclass
class Calibration:
    stats: Dict[str, LinearStats] = field(default_factory=dict)
    batches: int = 0
    max_samples: int = 128
    check_batch: object = None                   # the first batch, to verify exact rewrites (scale folds)
    check_output: Optional[torch.Tensor] = None  # a slice of the model's output on it (fp32)
    inputs: list = field(default_factory=list)   # the batches themselves (method="gptq" runs them again)

    def output_fingerprint(self, model) -> Optional[torch.Tensor]:
        if self.check_batch is None:
            return None
        with inference_forward(model):
            return _fingerprint(_run(model, self.check_batch))

    def channel_weight(self, name: str) -> Optional[torch.Tensor]:
        st = self.stats.get(name)
        if st is None or st.count == 0:
            return None
        return st.mean_sq

    def sensitivity(self, name: str, weight: torch.Tensor, dequantized: torch.Tensor) -> Optional[float]:
        """Relative output error of replacing `weight` by `dequantized` on this layer's sampled inputs."""
        st = self.stats.get(name)
        if st is None or st.sample is None or st.sample.shape[0] == 0:
            return None
        x = st.sample.to(weight.device)
        ref = x @ weight.float().t()
        err = x @ (dequantized.float() - weight.float()).t()
        return (err.norm() / ref.norm().clamp_min(1e-30)).item()


def output_tensor(out) -> Optional[torch.Tensor]:
    """The tensor a model's output is compared by: its logits, else its last hidden state, else its
    first tensor (a tuple's first element); None if there is none."""
    t = getattr(out, "logits", None)
    if t is None:
        t = getattr(out, "last_hidden_state", None)
    if t is None:
        t = out
        while isinstance(t, (tuple, list)) and t:
            t = t[0]
    return t if isinstance(t, torch.Tensor) else None


def _fingerprint(out, n: int = 1 << 16) -> torch.Tensor:
    t = output_tensor(out)
    if t is None:
        raise TypeError(f"the model's output ({type(out).__name__}) has no logits, last_hidden_state or tensor to "
                        "check rewrites against")
    return t.detach().reshape(-1)[:n].float().cpu()


TEXT_KEYS = {"input_ids", "attention_mask"}
# the model parts whose Linears see the text tokens, one row per position of input_ids ("other": a model of
# no MiniCPM-V layout, a plain LLM or encoder)
TEXT_PARTS = ("llm", "lm_head", "other")


def padding_mask(batch) -> Optional[torch.Tensor]:
    """Which tokens of a padded text batch are real: its `attention_mask` as a bool [B, T] where it masks
    some position out (a tokenizer's padding=True); None where no position is padding. Padding tokens'
    activations are not the model's inputs: the statistics, Hessians and output errors leave them out."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or bool(m.all()):
        return None
    return m.bool()


def token_rows(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """t [..., C] as rows [n, C]; with a padding mask [B, T] and t [B, T, C], the real tokens' rows only."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1])


def text_linear_names(model: nn.Module) -> set:
    """The nn.Linear names of `model` in a text part (TEXT_PARTS): where a padding mask applies. The vision
    tower, merger, resampler and audio layers see rows of another kind, never masked."""
    layout = detect_layout(model)
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and layout.part_of(n) in TEXT_PARTS}


@contextlib.contextmanager
def inference_forward(model: nn.Module):
    """No autograd, and every module in eval mode (each one's own mode restored afterwards): the
    calibration forwards measure the model as it will run, without dropout's noise - a model built from
    a config, or left in train mode, would otherwise give different statistics, Hessians and
    sensitivities on every run."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _run(model, batch):
    """Run one batch: a dict of model kwargs, a tuple of positional args, or an input_ids tensor. Text
    alone goes to models.text_module (a remote-code MiniCPM-V 2.x takes it through its `llm`)."""
    if isinstance(batch, Mapping):  # a dict, or what tokenizers and processors return (BatchEncoding / BatchFeature)
        return (text_module(model) if set(batch) <= TEXT_KEYS else model)(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return text_module(model)(batch)


def calibrate(model: nn.Module, batches: Iterable, max_samples: int = 128, progress: bool = True,
              seed: int = 0) -> Calibration:
    """Collect activation statistics of every nn.Linear of `model` over `batches` (each a dict of
    model kwargs, a tuple of positional args, or a tensor such as input_ids)."""
    model = unwrap_compiled(model)  # the hooks' names are the model's own, as patch_model looks them up
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        # 0 would keep no input rows: no layer would get a sensitivity, and mixed precision would keep nothing
        raise ValueError(f"calibrate: max_samples must be a positive number of rows per layer, got {max_samples!r}")
    items = list(batches)
    if not items:
        raise ValueError("calibrate: no batches (give one or more, e.g. tokenized prompts)")
    bad = next((b for b in items if not isinstance(b, (Mapping, tuple, list, torch.Tensor))), None)
    if bad is not None:
        raise TypeError(f"calibrate: a batch must be a dict of model kwargs, a tuple of positional args or a "
                        f"tensor such as input_ids; got {type(bad).__name__}"
                        + (" (tokenize the text first)" if isinstance(bad, str) else ""))
    calib = Calibration(max_samples=max_samples, inputs=items)
    gen = torch.Generator().manual_seed(seed)
    handles = []
    text = text_linear_names(model)
    batch_mask = [None]  # the padding mask of the batch running now

    def make_hook(name):
        masked = name in text

        def hook(mod, args):
            x = args[0].detach()
            x = token_rows(x, batch_mask[0] if masked else None).float()
            st = calib.stats.get(name)
            if st is None:
                st = calib.stats[name] = LinearStats(sum_sq=torch.zeros(x.shape[-1], device=x.device))
            st.sum_sq += x.square().sum(0)
            st.count += x.shape[0]
            have = 0 if st.sample is None else st.sample.shape[0]
            room = max_samples - have
            if room > 0 and x.shape[0] > 0:
                idx = torch.randperm(x.shape[0], generator=gen)[:room].to(x.device)
                rows = x.index_select(0, idx).clone()
                st.sample = rows if st.sample is None else torch.cat([st.sample, rows])
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
    it = items
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(items, desc="calibrate", unit="batch", disable=None)
        except ImportError:
            pass
    try:
        with inference_forward(model):
            for batch in it:
                batch_mask[0] = padding_mask(batch)
                out = _run(model, batch)
                if calib.check_batch is None:
                    calib.check_batch, calib.check_output = batch, _fingerprint(out)
                del out
                calib.batches += 1
    finally:
        for h in handles:
            h.remove()
    return calib
