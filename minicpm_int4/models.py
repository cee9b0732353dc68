"""What each MiniCPM-V generation looks like, as data.

A layout is matched by structure (which submodules exist), never by transformers version or class
name, so the same code serves transformers 4.40+ remote-code models and the native 5.x classes.
`parts` maps module-name prefixes to model parts (config.PARTS); the longest matching prefix wins.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm


@dataclass(frozen=True)
class ModelLayout:
    name: str
    description: str
    required: Tuple[str, ...]           # submodule paths that must all exist
    parts: Tuple[Tuple[str, str], ...]  # (module-name prefix, part)
    root: str = ""                      # where in the model it was found ("" = the model itself)

    def matches(self, model: nn.Module) -> bool:
        return all(_has_submodule(model, p) for p in self.required)

    def path(self, name: str) -> str:
        """A path of the layout as a name in the model it was found in."""
        return f"{self.root}.{name}" if self.root else name

    def part_of(self, name: str) -> str:
        if self.root:  # a module outside the MiniCPM-V model found inside the user's wrapper: 'other'
            if not name.startswith(self.root + "."):
                return "other"
            name = name[len(self.root) + 1:]
        best, best_len = "other", -1
        for prefix, part in self.parts:
            if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
        return best


LAYOUTS: Tuple[ModelLayout, ...] = (
    ModelLayout(
        name="minicpmv-native",
        description="transformers-native MiniCPMV4_6 / MiniCPMV4_7 / minicpm_ocr: Qwen3.5 text model "
                    "(full and linear-attention layers), SigLIP-style vision tower with a window-attention "
                    "vit_merger, MLP merger",
        required=("model.language_model", "model.vision_tower", "model.merger"),
        parts=(
            ("model.language_model", "llm"),
            ("model.vision_tower", "vision"),
            ("model.vision_tower.vit_merger", "merger"),
            ("model.merger", "merger"),
            ("lm_head", "lm_head"),
        ),
    ),
    ModelLayout(
        name="minicpmv-remote",
        description="remote-code MiniCPM-V 2.0 / Llama3-V 2.5 / 2.6 / o-2.6: model.llm (MiniCPM, Llama, "
                    "Qwen2), model.vpm (SigLIP / Idefics2 vision transformer), model.resampler "
                    "(nn.MultiheadAttention), o-2.6 adds apm / audio_projection_layer / tts",
        required=("llm", "vpm", "resampler"),
        parts=(
            ("llm", "llm"),
            ("llm.lm_head", "lm_head"),
            ("vpm", "vision"),
            ("resampler", "resampler"),
            ("apm", "audio"),
            ("audio_projection_layer", "audio"),
            ("tts", "tts"),
        ),
    ),
)

GENERIC = ModelLayout(
    name="generic",
    description="no known MiniCPM-V layout matched: every Linear is part 'other', the output embedding 'lm_head'",
    required=(),
    parts=(("", "other"),),
)

# Sibling Linears (attributes of one parent module) that the layouts' forwards call on the same input, in
# turn: fusion.fuse_projections stacks such int4 siblings into one GEMM at one-token calls. Self-attention's
# q / k / v (every LLM here, SigLIP, Whisper), the gated MLP's gate / up (Llama, Qwen2, Qwen3.5, MiniCPM), and
# the linear-attention input projections of Qwen3.5's gated delta net (MiniCPM-V 4.6 / 4.7 / OCR) and of
# Qwen3-Next's. A set whose layers turn out not to share their input (a cross-attention's q) is found out at
# its first call (fusion.py).
SHARED_INPUT_SIBLINGS: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
    ("in_proj_qkvz", "in_proj_ba"),
)

# Parents whose forward reads a child Linear's `.weight` directly (F.multi_head_attention_forward
# takes out_proj.weight): replacing that child would change what the parent computes.
DIRECT_WEIGHT_READERS: Tuple[type, ...] = (nn.MultiheadAttention,)


def transformers_major() -> int:
    """transformers' major version (4 or 5: the two differ in keywords, config attributes, loaders)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def hf_dtype_kwargs(dtype) -> dict:
    """The keyword transformers takes for a model's dtype: `dtype` in 5.x, `torch_dtype` in 4.x."""
    return {"dtype": dtype} if transformers_major() >= 5 else {"torch_dtype": dtype}


def unwrap_compiled(model):
    """The module inside a torch.compile wrapper (OptimizedModule, whose parameter names all carry an
    `_orig_mod.` prefix). patch_model, calibrate, compare_models and the checkpoints work on it, so a
    compiled model gets the layout, the decisions and the checkpoint names of the model itself (the
    wrapper retraces on its next call after patching)."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def hf_config_dtype(cfg, default=torch.float16) -> torch.dtype:
    """A transformers config's dtype, read from the attribute this version writes (`dtype` in 5.x,
    where reading `torch_dtype` warns that it is deprecated; `torch_dtype` in 4.x), as a torch.dtype."""
    names = ("dtype", "torch_dtype") if transformers_major() >= 5 else ("torch_dtype", "dtype")
    dtype = next((v for v in (getattr(cfg, n, None) for n in names) if v is not None), None) or default
    return getattr(torch, dtype.replace("torch.", "")) if isinstance(dtype, str) else dtype


def text_module(model: nn.Module) -> nn.Module:
    """What runs a batch of text alone (input_ids): the remote-code 2.x layout's `llm` - the top-level
    forward of MiniCPM-V 2.x / o-2.6 takes a `data` dict of images and text - else the model itself."""
    layout = detect_layout(model)
    return model.get_submodule(layout.path("llm")) if layout.name == "minicpmv-remote" else model


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def detect_layout(model: nn.Module) -> ModelLayout:
    """The layout of `model`, or of the first submodule that has one (a MiniCPM-V model inside a
    user's wrapper module: `root` says where), else GENERIC."""
    for name, mod in model.named_modules():
        for layout in LAYOUTS:
            if layout.matches(mod):
                return dataclasses.replace(layout, root=name) if name else layout
    return GENERIC


def output_embedding_name(model: nn.Module) -> Optional[str]:
    """Qualified name of the model's output projection (lm_head), if it has one."""
    get = getattr(model, "get_output_embeddings", None)
    if get is None:
        return None
    try:
        head = get()
    except Exception:
        return None
    if head is None:
        return None
    for name, mod in model.named_modules():
        if mod is head:
            return name
    return None


def protected_reason(parent: nn.Module, child_name: str) -> Optional[str]:
    """Why the child Linear `child_name` of `parent` must never be replaced, or None."""
    if isinstance(parent, DIRECT_WEIGHT_READERS):
        return f"{type(parent).__name__} reads .{child_name}.weight directly"
    child = getattr(parent, child_name)
    if type(child).forward is not nn.Linear.forward:  # parametrize's subclasses keep Linear's forward
        return (f"{type(child).__name__} subclasses nn.Linear with a forward of its own, which a QuantLinear "
                "would not run")
    return hook_reason(child)


def _is_weight_norm_hook(hook) -> bool:
    return isinstance(hook, WeightNorm) and hook.name == "weight"


def _weight_norm_hook(module: nn.Module) -> Optional[WeightNorm]:
    """The hook-based weight norm (`torch.nn.utils.weight_norm`) of `module.weight`, or None."""
    return next((h for h in module._forward_pre_hooks.values() if _is_weight_norm_hook(h)), None)


def hook_reason(linear: nn.Module) -> Optional[str]:
    """Why a Linear's own hooks forbid replacing it, or None. A QuantLinear runs none of the hooks of
    the module it replaces, so a forward hook or pre-hook (a user's, spectral norm, an accelerate
    dispatch / offload hook) would silently stop running. Hook-based weight norm is the exception: its
    pre-hook only recomputes `.weight`, which `effective_weight` does once before quantizing."""
    if getattr(linear, "_hf_hook", None) is not None:
        return (f"has an accelerate hook ({type(linear._hf_hook).__name__}: device_map dispatch / offload) that a "
                "QuantLinear would not run; patch the model before dispatching it")
    hooks = [h for h in linear._forward_pre_hooks.values() if not _is_weight_norm_hook(h)]
    hooks += list(linear._forward_hooks.values())
    if hooks:
        names = sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks})
        return f"has forward hooks ({', '.join(names)}) that a QuantLinear would not run"
    return None


def _plain_weight(module: nn.Module) -> bool:
    """Whether writing `module.weight` in place changes what it computes (not a weight computed by a
    parametrization or a weight-norm hook, which a scale fold's in-place update would miss)."""
    return not parametrize.is_parametrized(module, "weight") and _weight_norm_hook(module) is None


def effective_weight(linear: nn.Linear):
    """The weight `linear`'s next forward computes with. Hook-based weight norm
    (`torch.nn.utils.weight_norm`, in ChatTTS-style heads) sets `.weight` from weight_g / weight_v in a
    forward pre-hook, so the attribute is stale once those change (after `load_state_dict`, say);
    parametrized weights (`torch.nn.utils.parametrizations.weight_norm`) are computed on access."""
    hook = _weight_norm_hook(linear)
    return linear.weight if hook is None else hook.compute_weight(linear)


@dataclass(frozen=True)
class ScaleFold:
    """Within one block, `prev` produces the only input of the Linears `consumers`, so a per-channel
    scale s can move exactly from the consumers' weights (W * s) into `prev`'s output (/ s):
    AWQ-style scaling without any runtime cost. Valid only where `prev`'s output feeds nothing else
    (pre-norm blocks: the residual is taken before the norm)."""
    prev: str
    consumers: Tuple[str, ...]
    note: str


SCALE_FOLDS: Tuple[ScaleFold, ...] = (
    ScaleFold("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "pre-norm attention (Llama, Qwen2, Qwen3.5 full attention, MiniCPM)"),
    ScaleFold("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                                  "linear_attn.in_proj_a"), "Qwen3.5 linear attention"),
    ScaleFold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "pre-norm gated MLP"),
    ScaleFold("mlp.up_proj", ("mlp.down_proj",), "gated MLP: down_proj reads act(gate) * up"),
    ScaleFold("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "SigLIP pre-norm attention"),
    ScaleFold("layer_norm2", ("mlp.fc1",), "SigLIP pre-norm MLP"),
)


def scale_fold_groups(model: nn.Module):
    """(prev name, [consumer names], note) for every place in `model` where a ScaleFold matches."""
    groups = []
    for block_name, block in model.named_modules():
        for fold in SCALE_FOLDS:
            try:
                prev = block.get_submodule(fold.prev)
                cons = [block.get_submodule(c) for c in fold.consumers]
            except AttributeError:
                continue
            if not all(isinstance(c, nn.Linear) for c in cons) or not all(map(_plain_weight, [prev, *cons])):
                continue
            width = cons[0].in_features
            if any(c.in_features != width for c in cons):
                continue
            if isinstance(prev, nn.Linear):
                if prev.out_features != width:
                    continue
            elif getattr(prev, "weight", None) is None or tuple(prev.weight.shape) != (width,):
                continue
            pre = f"{block_name}." if block_name else ""
            groups.append((pre + fold.prev, [pre + c for c in fold.consumers], fold.note))
    return groups
