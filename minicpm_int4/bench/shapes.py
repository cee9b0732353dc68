"""The Linear shapes (N x K) the benchmarks sweep, read off the real model classes by structure.

Models are instantiated on the meta device (no memory, no download); the shapes are the distinct
(out_features, in_features) of their Linears, each with the module names that have it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

M_SWEEP = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)


@dataclass
class LinearShape:
    model: str
    n: int
    k: int
    names: List[str] = field(default_factory=list)
    # only these M (None: the sweep's): a fused projection (fusion.py) runs stacked at one-token calls only
    ms: Optional[Tuple[int, ...]] = None

    @property
    def label(self) -> str:
        return f"{self.model}:{self.n}x{self.k}"


def _distinct_shapes(model_name: str, model: nn.Module, min_out_features: int = 64) -> List[LinearShape]:
    shapes: Dict[Tuple[int, int], LinearShape] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features >= min_out_features:
            s = shapes.setdefault((mod.out_features, mod.in_features), LinearShape(model_name, mod.out_features, mod.in_features))
            s.names.append(name)
    return list(shapes.values()) + _fused_shapes(model_name, model, shapes, min_out_features)


def _fused_shapes(model_name: str, model: nn.Module, plain: Dict[Tuple[int, int], LinearShape],
                  min_out_features: int) -> List[LinearShape]:
    """The stacked GEMMs fuse_projections makes of the model's sibling projections (fusion.SIBLING_SETS, the
    parts it fuses by default), at M = 1 only - the one-token calls it runs them at - and only where no plain
    layer has the shape already (whose rows cover it at every M): so that the dispatch table has an entry for
    each and the bench says what a fused decode step's kernels do."""
    from ..fusion import sibling_sets

    def linear(m):  # a layer patch_model makes int4 by default
        return m if isinstance(m, nn.Linear) and m.out_features >= min_out_features else None

    out: Dict[Tuple[int, int], LinearShape] = {}
    for parent_name, layers in sibling_sets(model, linear):
        if len({m.in_features for _, m in layers}) != 1:
            continue
        key = (sum(m.out_features for _, m in layers), layers[0][1].in_features)
        if key in plain:
            continue
        s = out.setdefault(key, LinearShape(model_name, key[0], key[1], ms=(1,)))
        s.names.append(f"{parent_name}.{'+'.join(n for n, _ in layers)}")
    return list(out.values())


def minicpmv46_shapes() -> List[LinearShape]:
    """The default MiniCPMV4_6Config(): Qwen3.5-style LLM (4096 hidden) + vision tower (768)."""
    from ..tiny import _transformers_class

    cfg = _transformers_class("MiniCPMV4_6Config")()
    cls = _transformers_class("MiniCPMV4_6ForConditionalGeneration")  # (outside the meta device: _causal_lm_shapes)
    with torch.device("meta"):
        model = cls(cfg)
    return _distinct_shapes("minicpmv4.6", model)


def _causal_lm_shapes(name: str, family: str, **dims) -> List[LinearShape]:
    """One decoder layer (all layers share its shapes) + lm_head of a transformers causal LM."""
    import transformers

    cfg = getattr(transformers, f"{family}Config")(num_hidden_layers=1, **dims)
    # resolved outside the meta device: transformers' lazy import of the class can be the process's first import of
    # torch._dynamo, which torch 2.8 cannot finish inside a device context (a circular import: 'partially
    # initialized module torch._dynamo has no attribute disable'; transformers 4.57)
    cls = getattr(transformers, f"{family}ForCausalLM")
    with torch.device("meta"):
        model = cls(cfg)
    return _distinct_shapes(name, model)


def llama3_v25_shapes() -> List[LinearShape]:
    """MiniCPM-Llama3-V 2.5's LLM: Llama-3-8B (hidden 4096, intermediate 14336, 8 KV heads, vocab 128256)."""
    return _causal_lm_shapes("llama3-v2.5", "Llama", hidden_size=4096, intermediate_size=14336,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def minicpmv26_shapes() -> List[LinearShape]:
    """MiniCPM-V 2.6's LLM: Qwen2-7B (hidden 3584, intermediate 18944, 4 KV heads, vocab 151666)."""
    return _causal_lm_shapes("minicpmv2.6", "Qwen2", hidden_size=3584, intermediate_size=18944,
                             num_attention_heads=28, num_key_value_heads=4, vocab_size=151666)


MODEL_SHAPES = {"minicpmv4.6": minicpmv46_shapes, "llama3-v2.5": llama3_v25_shapes, "minicpmv2.6": minicpmv26_shapes}


def all_shapes(models=tuple(MODEL_SHAPES)) -> List[LinearShape]:
    out = []
    for m in models:
        if m not in MODEL_SHAPES:
            raise ValueError(f"unknown model {m!r}; choose from {list(MODEL_SHAPES)}")
        out += MODEL_SHAPES[m]()
    return out
