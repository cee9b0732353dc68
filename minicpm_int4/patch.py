"""patch_model: decide, for every nn.Linear, quantize or keep (and why); swap in place; report."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import gptq
from .awq import search_input_scale
from .calibrate import Calibration, output_tensor, padding_mask, token_rows
from .config import QuantConfig
from .models import detect_layout, effective_weight, output_embedding_name, protected_reason, unwrap_compiled
from .ops import W4A8_MIN_M
from .packing import packed_bytes
from .qlinear import QuantLinear
from .quantize import check_layer_dtype, check_quantizable, scale_dtype_for

IMAGE_PARTS = ("vision", "merger", "resampler")  # model parts only image tokens reach: text calibration never does


CONFIG_ATTR = "_minicpm_int4_config"


@dataclass
class LayerDecision:
    name: str
    part: str
    out_features: int
    in_features: int
    dtype: str
    action: str            # "quantized" | "kept" | "already quantized"
    reason: str
    path: str              # "w4a16", "w4a8", or "fp" for kept layers
    bytes_before: int
    bytes_after: int
    sensitivity: Optional[float] = None   # relative output error on the calibration inputs
    # QuantConfig(sensitivity="model") with mixed precision: the share of the int4 model's output error on
    # `sensitivity_batches` calibration batches that goes away with this layer alone back in high precision
    model_sensitivity: Optional[float] = None


@dataclass
class PatchReport:
    layout: str
    config: QuantConfig
    decisions: List[LayerDecision] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def quantized(self) -> List[LayerDecision]:
        return [d for d in self.decisions if d.action != "kept"]

    @property
    def kept(self) -> List[LayerDecision]:
        return [d for d in self.decisions if d.action == "kept"]

    @property
    def bytes_before(self) -> int:
        return sum(d.bytes_before for d in self.decisions)

    @property
    def bytes_after(self) -> int:
        return sum(d.bytes_after for d in self.decisions)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "config": self.config.to_dict(), "notes": list(self.notes),
                "decisions": [asdict(d) for d in self.decisions],
                "linear_weight_bytes_before": self.bytes_before, "linear_weight_bytes_after": self.bytes_after}

    def summary(self) -> str:
        if not self.decisions:
            return f"layout {self.layout}: no nn.Linear layers found; nothing was quantized"
        mib = 2**20
        ratio = self.bytes_before / max(1, self.bytes_after)
        return (f"layout {self.layout}: {len(self.quantized)} Linear layers int4, {len(self.kept)} kept; "
                f"Linear weights {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB ({ratio:.2f}x smaller)")

    def __str__(self) -> str:
        model_sens = any(d.model_sensitivity is not None for d in self.decisions)
        rows = [("module", "part", "N x K", "decision", "path", "bytes before -> after", "sensitivity")
                + (("model sensitivity",) if model_sens else ()) + ("reason",)]
        for d in self.decisions:
            rows.append((d.name, d.part, f"{d.out_features} x {d.in_features}", d.action, d.path,
                         f"{_fmt_bytes(d.bytes_before)} -> {_fmt_bytes(d.bytes_after)}",
                         "-" if d.sensitivity is None else f"{d.sensitivity:.2e}")
                        + (("-" if d.model_sensitivity is None else f"{d.model_sensitivity:.2e}",) if model_sens else ())
                        + (d.reason,))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        out = [line(rows[0]), "  ".join("-" * w for w in widths)]
        out += [line(r) for r in rows[1:]]
        out.append(self.summary())
        out += self.notes
        return "\n".join(out)

    __repr__ = summary


def _fmt_bytes(n: int) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


FOREIGN_ADVICE = {
    "bitsandbytes": "bitsandbytes' nf4 / int8 are not this package's integer grid (quantizing them again would round "
                    "twice): patch the fp16 model they were made from",
    "int4": "another package's int4 layers run on these kernels when their checkpoint folder is loaded with "
            "minicpm_int4.checkpoint.load_pretrained_quantized (AWQ GEMM, GPTQ and compressed-tensors int4 are read "
            "exactly) or converted with `minicpm-int4 convert`",
}


def foreign_quantization(module: nn.Module) -> Optional[Tuple[str, str]]:
    """(what, kind) where another package has already quantized `module` - kind "bitsandbytes" or "int4"
    (a key of FOREIGN_ADVICE) - else None. By structure, not by import: bitsandbytes' Linear4bit /
    Linear8bitLt (nn.Linear subclasses whose weight is a Params4bit / Int8Params), and modules holding
    packed int4 tensors (qweight with scales or qzeros: AutoAWQ, AutoGPTQ / GPTQModel, exllama, Marlin;
    weight_packed: compressed-tensors; <name>_qweight: AutoAWQ's fused MLP, which holds its gate and up
    projections' tensors itself and runs them with its own kernels), whether or not they subclass
    nn.Linear. This package's QuantLinear is not foreign."""
    if isinstance(module, QuantLinear):
        return None
    cls = type(module)
    what = f"{cls.__module__.split('.')[0]} {cls.__name__}"
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if cls.__module__.startswith("bitsandbytes") or type(weight).__name__ in ("Params4bit", "Int8Params"):
        return what, "bitsandbytes"
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    if "weight_packed" in own and cls.__module__.startswith("torch."):
        # transformers 5.x loads a compressed-tensors checkpoint into plain nn.Linears holding its tensors
        return "compressed-tensors", "int4"
    if ("qweight" in own and own & {"scales", "qzeros"}) or "weight_packed" in own:
        return what, "int4"
    if any(n.endswith("_qweight") for n in own):  # AutoAWQ's fused MLP: gate_proj_qweight, up_proj_qweight, ...
        return what, "int4"
    return None


AUTOGPTQ_KERNELS = ("cuda", "cuda-old", "triton")  # AutoGPTQ QuantLinear.QUANT_TYPEs that keep the checkpoint layout
CONVERTED_LABELS = {"awq": "AutoAWQ WQLinear_GEMM", "gptq": "AutoGPTQ QuantLinear",
                    "compressed-tensors": "compressed-tensors pack-quantized"}
# each kind's packed tensors (their bytes are the layer's before conversion) and the one holding its scales
CONVERTED_TENSORS = {"awq": (("qweight", "qzeros", "scales"), "scales"),
                     "gptq": (("qweight", "qzeros", "scales", "g_idx"), "scales"),
                     "compressed-tensors": (("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx",
                                             "weight_shape"), "weight_scale")}


def _has_tensors(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, t, None), torch.Tensor) for t in names)


def convertible_foreign(module: nn.Module) -> Optional[str]:
    """The reader that converts another package's int4 layer exactly, by its in-memory layout: "awq" for
    AutoAWQ's 4-bit WQLinear_GEMM (what transformers 4.x builds from an AWQ checkpoint: buffers as the
    checkpoint holds them, qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N]); "gptq" for AutoGPTQ's
    4-bit QuantLinear of its cuda, cuda-old and triton kernels (what AutoGPTQ, and transformers 4.x through
    optimum, build with exllama disabled - as OpenBMB's instructions for MiniCPM-o 2.6 int4 do: the GPTQ v1
    checkpoint layout, qweight [K/8, N], qzeros [G, N/8] holding zero points minus 1, scales [G, N],
    g_idx [K]); else None. Not converted, listed and left: AutoAWQ's GEMV / exllama / Marlin layers and
    AutoGPTQ's exllama / exllamav2 / Marlin ones (their kernels reorder or repack the buffers once the
    model is on a GPU), GPTQModel's layers (how transformers 5.x loads AWQ and GPTQ checkpoints: often
    repacked, and its zero-point convention is its own), bitsandbytes' layers; "compressed-tensors" for a
    Linear that compressed-tensors holds compressed in memory in its int4 pack-quantized layout (what
    transformers 5.x builds from an llm-compressor checkpoint, and compressed-tensors' CompressedLinear:
    weight_packed [N, K/8], weight_scale [N, G], the asymmetric schemes' weight_zero_point [(N + 7) / 8, G]
    packed along N, act-order's weight_g_idx [K], its `quantization_scheme` saying int4 by group or
    channel, weights only); the checkpoint's other schemes stay."""
    cls = type(module)
    root = cls.__module__.split(".")[0]
    if _compressed_tensors_int4(module):
        return "compressed-tensors"
    if (root == "awq" and cls.__name__ == "WQLinear_GEMM" and getattr(module, "w_bit", 4) == 4
            and _has_tensors(module, ("qweight", "qzeros", "scales"))):
        return "awq"
    if (root == "auto_gptq" and getattr(cls, "QUANT_TYPE", None) in AUTOGPTQ_KERNELS and getattr(module, "bits", 4) == 4
            and _has_tensors(module, ("qweight", "qzeros", "scales", "g_idx"))):
        return "gptq"
    return None


def _enum_value(v) -> str:
    return str(getattr(v, "value", v))


def _compressed_tensors_scheme(module: nn.Module):
    """compressed-tensors' scheme of a Linear it quantized to int4 integers by group or channel, weights only
    (whether it holds the layer compressed or has decompressed it), else None."""
    scheme = getattr(module, "quantization_scheme", None)
    args = getattr(scheme, "weights", None)
    if (isinstance(module, nn.Linear) and args is not None and getattr(args, "num_bits", None) == 4
            and _enum_value(getattr(args, "type", "int")) == "int"
            and _enum_value(getattr(args, "strategy", None)) in ("group", "channel")
            and getattr(scheme, "input_activations", None) is None
            and getattr(scheme, "output_activations", None) is None):
        return scheme
    return None


def _compressed_tensors_int4(module: nn.Module) -> bool:
    """A Linear that compressed-tensors holds compressed, in its int4 pack-quantized layout, weights only."""
    packed = getattr(module, "weight_packed", None)
    return (_compressed_tensors_scheme(module) is not None and isinstance(packed, torch.Tensor)
            and packed.dtype == torch.int32 and _has_tensors(module, ("weight_scale",)))


def _features(module: nn.Module) -> Tuple[int, int]:
    """(in, out) features of a foreign layer (AutoGPTQ spells them infeatures / outfeatures)."""
    k = getattr(module, "in_features", getattr(module, "infeatures", 0)) or 0
    n = getattr(module, "out_features", getattr(module, "outfeatures", 0)) or 0
    return int(k), int(n)


def _from_foreign(module: nn.Module, kind: str, name: str, act: Optional[str], backend: str) -> QuantLinear:
    """A QuantLinear holding exactly the int4 numbers of a layer convertible_foreign names (in its scales'
    dtype, which the package computes in), computing what the layer computes. Raises
    foreign.ForeignFormatError for one the kernels cannot take."""
    from .foreign import (ForeignFormatError, awq_to_canonical, compressed_tensors_to_canonical, gptq_to_canonical,
                          layer_group_size, quant_linear_from_canonical)

    k, n = _features(module)
    if any(t.is_meta for t in module.parameters(recurse=False)) or any(t.is_meta for t in module.buffers(recurse=False)):
        raise ForeignFormatError(f"{name}: its tensors are on the meta device (offloaded, or not loaded): patch the "
                                 "model with its weights in memory, or load the checkpoint folder with "
                                 "minicpm_int4.checkpoint.load_pretrained_quantized")
    args = module.quantization_scheme.weights if kind == "compressed-tensors" else None  # its scheme's int4 args
    group_size = (int(getattr(module, "group_size", k)) if args is None
                  else -1 if _enum_value(args.strategy) == "channel" else int(args.group_size))
    gs = layer_group_size(group_size, k, name)
    if args is not None:
        g_idx = getattr(module, "weight_g_idx", None)
        if g_idx is not None and g_idx.numel() and bool((g_idx < 0).all()):  # compressed-tensors' "not set"
            g_idx = None  # (partly -1 is no order at all: _group_order refuses it)
        if g_idx is None and _enum_value(getattr(args, "actorder", None)) in ("group", "dynamic"):
            raise ForeignFormatError(f"{name}: an act-order (actorder={_enum_value(args.actorder)!r}) compressed-tensors "
                                     "layer without its weight_g_idx: the order of its channels was not loaded")
        canon = compressed_tensors_to_canonical(module.weight_packed, module.weight_scale,
                                                getattr(module, "weight_zero_point", None), g_idx, k, n, gs, name,
                                                symmetric=bool(getattr(args, "symmetric", True)))
    elif kind == "awq":
        canon = awq_to_canonical(module.qweight, module.qzeros, module.scales, k, n, gs, name)
    else:
        g_idx = module.g_idx
        if type(module).QUANT_TYPE == "cuda-old":
            # its kernels group the channels in runs of G whatever g_idx says (AutoGPTQ picks it only
            # without act-order): a g_idx that says otherwise is not what the layer computes
            runs = torch.arange(k, device=g_idx.device) // (k if gs == -1 else gs)
            if not torch.equal(g_idx.to(torch.int64), runs):
                raise ForeignFormatError(f"{name}: an act-order g_idx in AutoGPTQ's cuda-old layer, whose kernels "
                                         "ignore it (the layer computes with runs of group_size channels)")
            g_idx = None
        canon = gptq_to_canonical(module.qweight, module.qzeros, module.scales, g_idx, k, n, gs, 1, name)
    return quant_linear_from_canonical(canon, k, n, gs, getattr(module, "bias", None), canon.scales.dtype, backend, act)


def _foreign_decision(name: str, module: nn.Module, part: str, what: str, kind: str, shared: str = "") -> LayerDecision:
    """A module another package quantized, in the report: kept as it is, with what to do instead."""
    tensors = [t for n, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
               if n != "bias"]
    size = sum(t.numel() * t.element_size() for t in tensors)  # the weight's bytes, as for a Linear
    in_f, out_f = _features(module)
    return LayerDecision(name, part, out_f, in_f, kind, "kept",
                         f"already quantized by another package ({what}): left as it is (see the notes){shared}",
                         "other", size, size)


def _decide(name: str, lin: nn.Linear, parent: nn.Module, attr: str, part: str, config: QuantConfig):
    """(quantize?, reason, act) for one Linear."""
    why = protected_reason(parent, attr)
    if why:
        return False, why, None
    pat = config.matches(name, config.exclude)
    if pat:
        return False, f"excluded by pattern {pat!r}", None
    forced = config.matches(name, config.include)
    try:
        w = effective_weight(lin)
        check_quantizable(w, config.group_size, what=name)
        check_layer_dtype(w.dtype, name)
    except (ValueError, TypeError) as e:
        return False, f"cannot quantize: {e}", None
    act = config.act_for(part)
    if forced:
        return True, f"included by pattern {forced!r}", act
    if not config.part_enabled(part):
        return False, f"part '{part}' kept in high precision (quantize_{part}=False)", None
    if lin.out_features < config.min_out_features:
        return False, f"too small to pay off: {lin.out_features} outputs < min_out_features={config.min_out_features}", None
    return True, f"part '{part}'", act


def patch_model(model: nn.Module, config: Optional[QuantConfig] = None, progress: bool = True,
                calibration: Optional[Calibration] = None) -> PatchReport:
    """Replace, in place, every nn.Linear of `model` that should be int4 by a QuantLinear.

    Decisions follow the model's layout (models.py) and `config`: by default the LLM and the vision
    tower are quantized; lm_head, embeddings, the resampler/merger, Linears whose weight a parent reads
    directly (nn.MultiheadAttention.out_proj) and layers with fewer than `min_out_features` outputs stay.
    Calling it again is harmless (QuantLinear layers are reported as already quantized). AutoAWQ's
    WQLinear_GEMM layers, AutoGPTQ's cuda / cuda-old / triton QuantLinears and compressed-tensors' int4
    pack-quantized Linears (a model transformers 4.x or AutoGPTQ loaded from an AWQ / GPTQ checkpoint, or
    transformers 5.x from an llm-compressor one; convertible_foreign) become QuantLinears holding exactly
    their int4 numbers ("converted"); layers other packages quantized otherwise (GPTQModel, exllama and
    Marlin kernels, compressed-tensors' other schemes, bitsandbytes; foreign_quantization) are listed as
    kept and left as they are, with a note and a warning saying how to run them instead.

    `calibration` (from `minicpm_int4.calibrate(model, batches)`) makes method="search"
    activation-aware, adds each layer's sensitivity to the report, and enables the mixed-precision
    policies `keep_most_sensitive` / `weight_budget_bytes`.

    Returns a PatchReport; ``print(report)`` shows every Linear with its decision and weight bytes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_compiled(model)  # torch.compile(model): names without the wrapper's `_orig_mod.` prefix
    if type(model) is nn.Linear:
        raise TypeError("patch_model replaces the Linears inside a model, in place; a lone nn.Linear cannot "
                        "replace itself: use QuantLinear.from_linear(linear, config)")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"patch_model: config must be a QuantConfig, got {type(config).__name__}"
                        + (" (QuantConfig(**d) or QuantConfig.from_dict(d))" if isinstance(config, dict) else ""))
    config = config or getattr(model, CONFIG_ATTR, None) or QuantConfig()
    if config.mixed_precision and calibration is None:
        raise ValueError("QuantConfig.keep_most_sensitive / weight_budget_bytes rank layers by their output error "
                         "on calibration inputs: pass calibration=minicpm_int4.calibrate(model, batches)")
    if config.input_scales and calibration is None:
        raise ValueError("QuantConfig.input_scales searches each layer's scale on its calibration inputs: pass "
                         "calibration=minicpm_int4.calibrate(model, batches)")
    layout = detect_layout(model)
    head = output_embedding_name(model)
    report = PatchReport(layout=layout.name, config=config)
    if layout.root:
        report.notes.append(f"layout {layout.name} found at submodule {layout.root!r}; Linears outside it are part 'other'")
    owners = {}  # id(parameter) -> every name it has (a tied lm_head's weight is also the embeddings')
    for pname, prm in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(prm), []).append(pname)
    names = {}   # id(module) -> every name it has (one module at two places in the model)
    for mname, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(mname)
    todo, foreign_found, decompressed = [], [], []
    linears = linear_places(model)
    for places in linears.values():
        parent, attr, name = places[0]
        child = getattr(parent, attr)
        others = [n for n in names[id(child)] if n != name]
        shared = f"; one module, also at {', '.join(others)}" if others else ""
        part = "lm_head" if name == head else layout.part_of(name)
        if isinstance(child, QuantLinear):
            report.decisions.append(LayerDecision(
                name, part, child.out_features, child.in_features, str(child.dtype).replace("torch.", ""),
                "already quantized", "QuantLinear" + shared, "w4a8" if child.act == "int8" else "w4a16",
                child.weight_bytes, child.weight_bytes))
            continue
        if convertible_foreign(child):  # compressed-tensors' layers: converted with the others below
            continue
        foreign = foreign_quantization(child)
        if foreign is not None:  # an nn.Linear another package quantized (bitsandbytes, compressed-tensors)
            report.decisions.append(_foreign_decision(name, child, part, *foreign, shared))
            foreign_found.append(foreign)
            continue
        w = child.weight
        before = w.numel() * w.element_size()
        ok, reason, act = _decide(name, child, parent, attr, part, config)
        if ok:
            after = packed_bytes(child.out_features, child.in_features, config.group_size, scale_dtype_for(w.dtype))
            path = f"w4a8 (w4a16 if M<{W4A8_MIN_M})" if act == "int8" else "w4a16"
            own = {f"{n}.weight" for n in names[id(child)]}
            tied = [n for n in owners.get(id(w), []) if n not in own]
            if tied:  # the fp weight lives on in its other owner: int4 adds memory, it saves none
                after += before
                reason += (f"; weight tied to {tied[0]}, which keeps its {str(w.dtype).replace('torch.', '')} "
                           "copy: int4 adds memory here (a decode-speed choice)")
            todo.append((places, name, child, act, len(report.decisions)))
            if (_compressed_tensors_scheme(child) is not None
                    and _enum_value(getattr(child, "quantization_status", None)) == "decompressed"):
                decompressed.append(name)  # its int4 weight, decompressed in place by compressed-tensors
        else:
            after, path = before, "fp"
        report.decisions.append(LayerDecision(
            name, part, child.out_features, child.in_features, str(w.dtype).replace("torch.", ""),
            "quantized" if ok else "kept", reason + shared, path, before, after))

    # int4 modules of other packages that are no nn.Linear, and compressed-tensors' Linears: AutoAWQ's,
    # AutoGPTQ's and compressed-tensors' in their checkpoint layout converted exactly (below, after the
    # refusals), the others listed and left
    converts = []
    for mname, mod in model.named_modules():
        kind = convertible_foreign(mod)
        foreign = None if id(mod) in linears and not kind else foreign_quantization(mod)
        if foreign is None:
            continue
        part = "lm_head" if mname == head else layout.part_of(mname)
        pat = config.matches(mname, config.exclude)
        if kind and not pat:
            packed, scales = CONVERTED_TENSORS[kind]
            before = sum(t.numel() * t.element_size() for t in (getattr(mod, p, None) for p in packed)
                         if isinstance(t, torch.Tensor))
            act = config.act_for(part)
            converts.append((mname, mod, kind, act, len(report.decisions)))
            k, n = _features(mod)
            report.decisions.append(LayerDecision(
                mname, part, n, k, str(getattr(mod, scales).dtype).replace("torch.", ""),
                "converted", f"read exactly from {foreign[0]} (its int4 numbers, in this package's layout)",
                f"w4a8 (w4a16 if M<{W4A8_MIN_M})" if act == "int8" else "w4a16", before, before))
            continue
        report.decisions.append(_foreign_decision(mname, mod, part, *foreign))
        if pat:
            report.decisions[-1].reason += f"; excluded by pattern {pat!r}"
        foreign_found.append(foreign)
    if decompressed:
        msg = (f"{len(decompressed)} layer(s) compressed-tensors had quantized to int4 hold its decompressed weights "
               f"(a forward ran before patch_model: {decompressed[0]}, ...): they are quantized again from them, a "
               "second rounding; to keep the checkpoint's int4 numbers exactly, call patch_model before the model's "
               "first forward or load the checkpoint folder with minicpm_int4.checkpoint.load_pretrained_quantized")
        report.notes.append(msg)
        warnings.warn(f"patch_model: {msg}", stacklevel=2)
    if foreign_found:
        classes = ", ".join(sorted({what for what, _ in foreign_found}))
        msg = (f"{len(foreign_found)} layer(s) already quantized by another package ({classes}) are left as they "
               "are: " + "; ".join(FOREIGN_ADVICE[k] for k in sorted({kind for _, kind in foreign_found})))
        report.notes.append(msg)
        warnings.warn(f"patch_model: {msg}", stacklevel=2)
    if not report.decisions:
        warnings.warn(f"patch_model: {type(model).__name__} has no nn.Linear layers; nothing was quantized",
                      stacklevel=2)
    names = [d.name for d in report.decisions]
    for what, patterns in (("include", config.include), ("exclude", config.exclude)):
        for p in patterns:  # a typo would otherwise change nothing, silently
            if names and not any(config.matches(n, (p,)) for n in names):
                msg = (f"QuantConfig.{what} pattern {p!r} matches no Linear of this model (fnmatch over full "
                       f"names such as {max(names, key=len)!r})")
                report.notes.append(msg)
                warnings.warn(f"patch_model: {msg}", stacklevel=2)
    if config.weight_budget_bytes is not None and report.bytes_after > config.weight_budget_bytes:
        # (the int4 sizes are known from the shapes: refused before minutes of quantizing)
        raise ValueError(f"weight_budget_bytes={config.weight_budget_bytes} is below the {report.bytes_after} bytes "
                         "the Linear weights take with every eligible layer in int4")
    if todo and config.method == "gptq" and (calibration is None or not calibration.inputs):
        # (only with layers to quantize: patching a patched model again needs no calibration)
        raise ValueError("QuantConfig(method='gptq') fits each layer to its inputs: pass calibration="
                         "minicpm_int4.calibrate(model, batches)" + ("" if calibration is None else
                                                                     " (this calibration holds no batches)"))
    model_ref = None
    if todo and config.mixed_precision and config.sensitivity == "model":  # the fp model's outputs, before any change
        model_ref = _model_output_reference(model, calibration, config, report)
    folds, declined = {}, set()
    if calibration is not None and config.fold_scales and (config.method == "search" or config.input_scales):
        # (input_scales asks for a scale on every layer: folded where it can be, free at runtime; a layer
        # whose group's search chose no scale gets no runtime one either)
        folds, declined = _fold_scales_checked(model, calibration, config, {t[1] for t in todo}, report)
    convert_places = linear_places(model, convertible_foreign) if converts else {}
    for mname, mod, kind, act, idx in converts:  # exact: no calibration, no search
        d = report.decisions[idx]
        try:
            ql = _from_foreign(mod, kind, mname, act, config.backend)
        except ValueError as e:  # a group size or shape the kernels do not take: left, and said
            d.action, d.path, d.reason = "kept", "other", f"already quantized by another package, not converted: {e}"
            d.bytes_after = d.bytes_before
            report.notes.append(f"{mname}: {d.reason}")
            warnings.warn(f"patch_model: {mname}: {d.reason}", stacklevel=2)
            continue
        ql.train(mod.training)
        d.bytes_after = ql.weight_bytes
        for parent, attr, _ in convert_places.get(id(mod), ()):
            setattr(parent, attr, ql)
    done = [kind for *_, kind, _, idx in converts if report.decisions[idx].action == "converted"]
    if done:
        counts = " and ".join(f"{done.count(kind)} {label}" for kind, label in CONVERTED_LABELS.items() if kind in done)
        report.notes.append(f"{counts} layer(s) converted exactly to QuantLinears (the same int4 numbers, group size "
                            "and channel order, in their scales' dtype)")
    swapped = []
    gptq_passes = _plan_gptq(todo, report) if config.method == "gptq" and todo else {}
    n_passes, hessians, few, unreached, n_scaled = len(gptq_passes), None, [], [], 0
    with torch.no_grad():
        bar = _progress(todo, progress, desc="int4 gptq" if gptq_passes else "int4 quantize")
        for i, (places, name, lin, act, idx) in enumerate(bar):
            todo[i] = None  # once swapped, nothing but `swapped` (mixed precision only) holds the original
            d = report.decisions[idx]
            layer_config, hessian = config, None
            if config.method == "gptq":
                if i in gptq_passes:  # through the layers quantized so far: their int4 outputs are the inputs here
                    hessians = None
                    number, layers = gptq_passes.pop(i)  # (popped: no fp Linear outlives its swap)
                    if hasattr(bar, "set_postfix_str"):
                        bar.set_postfix_str(f"input Hessians, pass {number} of {n_passes}")
                    hessians = gptq.collect_hessians(model, calibration.inputs, layers)
                    del layers
                    if hasattr(bar, "set_postfix_str"):
                        bar.set_postfix_str("")
                hessian, tokens = hessians.pop(name)
                if hessian is None:
                    layer_config = dataclasses.replace(config, method="search")
                    d.reason += "; no calibration input reached it: clipping-range search instead of gptq"
                    unreached.append((name, d.part))
                else:
                    d.reason += f"; gptq on {tokens} calibration tokens"
                    if tokens < lin.in_features:
                        few.append((name, d.part))
            cw = (calibration.channel_weight(name) if calibration is not None and layer_config.method == "search"
                  else None)
            found = (search_input_scale(lin, calibration.stats.get(name), config.group_size)
                     if config.input_scales and name not in folds and name not in declined else None)
            ql = QuantLinear.from_linear(lin, layer_config, act=act, name=name, channel_weight=cw, hessian=hessian,
                                         input_scale=None if found is None else found[1])
            if found is not None:
                n_scaled += 1
                d.bytes_after = ql.weight_bytes  # the planned int4 bytes plus the scale's (the layer counts them)
                d.reason += f"; input scale (AWQ, alpha={found[0]:.1f}) applied at runtime"
            del hessian
            ql.train(lin.training)
            if calibration is not None:
                d.sensitivity = calibration.sensitivity(name, effective_weight(lin), ql.dequantized_weight())
                if cw is not None:
                    d.reason += "; activation-aware search"
                elif layer_config.method == "search" and config.method == "search":
                    d.reason += "; no calibration input reached it: clipping-range search without activation weights"
                    unreached.append((name, d.part))
                if name in folds:
                    d.reason += f"; AWQ scale (alpha={folds[name].alpha:.1f}) folded into {folds[name].prev}"
            for parent, attr, _ in places:
                setattr(parent, attr, ql)
            if config.mixed_precision:  # may put it back; otherwise its weight is freed now, not at the end
                swapped.append((places, lin, d))
    if config.input_scales:
        n_new = sum(1 for d in report.decisions if d.action == "quantized")
        report.notes.append(f"input scales: {n_scaled} of the {n_new} layers quantized now multiply their input by a "
                            "per-channel scale before the int4 GEMM (QuantConfig.input_scales; for the others a scale "
                            "was folded into the previous op, no scale won the search, or no calibration input "
                            "reached them)")
    if unreached:  # e.g. the vision tower under text-only calibration: not an error, but not what was asked
        images = any(part in IMAGE_PARTS for _, part in unreached)
        got = ("the clipping-range search without activation weights" if config.method == "search"
               else f"the clipping-range search instead of {config.method}")
        report.notes.append(f"{len(unreached)} layer(s) (e.g. {unreached[0][0]}) saw no calibration input and got {got}"
                            + ("; calibration prompts with images reach the vision tower (CLI: --calibration-images)"
                               if images else ""))
    if few:  # H = sum x x^T has rank <= tokens: the fit leans on the damping in the other directions
        images = any(part in IMAGE_PARTS for _, part in few)
        msg = (f"gptq: {len(few)} layer(s) (e.g. {few[0][0]}) saw fewer calibration tokens than they have input "
               "channels; more calibration " + ("text and images" if images else "text")
               + " (several times in_features tokens) fits them better")
        report.notes.append(msg)
        warnings.warn(f"patch_model: {msg}", stacklevel=2)
    if config.mixed_precision:
        if model_ref is not None:
            _model_sensitivity(model, swapped, model_ref, report, progress)
        _apply_mixed_precision(report, swapped, config)
    from .hf_integration import mark_quantized

    untied = mark_quantized(model, config)  # and config.quantization_config: save_pretrained / from_pretrained
    if untied:
        report.notes.append(f"{', '.join(untied)}: tied to the input embeddings in the fp model, int4 now (the embeddings "
                            "stay in high precision): untied, config.tie_word_embeddings = False, so that tie_weights() "
                            "and a saved config.json do not tie them again")
    return report


def frozen_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], training: bool = False) -> nn.Linear:
    """An nn.Linear holding `weight` [N, K] and `bias` (or none) as they are, frozen (requires_grad=False),
    in train mode or not: what an int4 layer becomes in high precision."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin.train(training)


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None, _forget: bool = True) -> int:
    """Undo patch_model: every QuantLinear becomes an nn.Linear holding the weight it computes with
    (dequantize(q, scales, zeros): the int4 model's function, now in high precision; in `dtype`,
    default the layer's), at every place of a shared module. Returns how many layers were replaced.
    For transformers models loaded with from_pretrained, `model.dequantize()` calls this."""
    model = unwrap_compiled(model)
    count = 0
    with torch.no_grad():
        for places in linear_places(model).values():
            parent, attr, _ = places[0]
            q = getattr(parent, attr)
            if not isinstance(q, QuantLinear):
                continue
            w = q.dequantized_weight()
            b = None if q.bias is None else q.bias.detach().to(dtype or q.bias.dtype).clone()
            lin = frozen_linear(w.to(dtype or w.dtype), b, q.training)
            for parent, attr, _ in places:
                setattr(parent, attr, lin)
            count += 1
    if getattr(model, CONFIG_ATTR, None) is not None:
        delattr(model, CONFIG_ATTR)
    if _forget:  # transformers' model.dequantize() removes config.quantization_config itself
        from .hf_integration import mark_quantized

        mark_quantized(model, None)  # no int4 layers left: the config's quantization_config goes
    return count


def linear_places(model: nn.Module, match=None) -> Dict[int, List[Tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, attribute, name) where an nn.Linear / QuantLinear (or a module
    `match(module)` accepts) sits, first name first, in model order: a module shared by two parents (or
    twice in one) is replaced at all its places by one QuantLinear (named_children lists it once per
    parent, and only the first time)."""
    match = match or (lambda m: isinstance(m, (nn.Linear, QuantLinear)))
    places: Dict[int, List[Tuple[nn.Module, str, str]]] = {}
    for parent_name, parent in model.named_modules():
        for attr, child in parent._modules.items():
            if match(child):
                name = f"{parent_name}.{attr}" if parent_name else attr
                places.setdefault(id(child), []).append((parent, attr, name))
    return places


def _plan_gptq(todo, report) -> dict:
    """(todo not empty) {index into todo: (pass number, the layers whose Hessians that calibration pass gathers)}, in
    todo's (module) order, as many per pass as gptq.hessian_budget allows."""
    layers = [(t[1], t[2]) for t in todo]
    budget = gptq.hessian_budget(layers[0][1].weight.device)
    passes = gptq.plan_passes(layers, budget)
    starts, i = {}, 0
    for number, p in enumerate(passes, start=1):
        starts[i] = (number, p)
        i += len(p)
    if len(passes) > 1:
        report.notes.append(f"gptq: the input Hessians of {len(todo)} layers gathered in {len(passes)} passes over the "
                            f"calibration batches ({_fmt_bytes(budget)} of fp32 [K, K] per pass: "
                            f"gptq.HESSIAN_BUDGET_BYTES, or {gptq.FREE_MEMORY_SHARE:g} of the GPU's free memory if "
                            "less); each pass runs through the layers already in int4")
    return starts


def _fold_scales_checked(model, calibration, config, quantize_names, report):
    """fold_scales, then verify on the first calibration batch that the model computes the same
    function (the folds are exact rewrites up to rounding); undo them all if it does not. Returns
    the folds and the layers whose group's search chose no scale (none, once the folds are undone)."""
    from .awq import fold_scales, unfold_scales

    declined = set()
    folds = fold_scales(model, calibration, config.group_size, quantize_names, declined)
    if not folds or calibration.check_output is None:
        return folds, declined
    after = calibration.output_fingerprint(model)
    ref = calibration.check_output
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 50 * torch.finfo(dtype).eps
    rel = ((after - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not rel <= tol:
        unfold_scales(model, folds)
        report.notes.append(f"AWQ scale folds undone: the model's output moved by {rel:.2e} (> {tol:.0e})")
        return {}, set()
    report.notes.append(f"AWQ scales folded for {len(folds)} Linear layers; output check on the first "
                        f"calibration batch: relative change {rel:.2e}")
    return folds, declined


MODEL_OUTPUT_ROWS = 128  # rows of each batch's output (evenly spaced tokens) that sensitivity="model" compares


def _output_rows(out, mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Up to MODEL_OUTPUT_ROWS evenly spaced rows ([rows, last dim], fp32) of a model output's logits (or
    last hidden state, or first tensor), of the real tokens only where `mask` (the batch's padding mask)
    applies; None if it has no tensor."""
    t = output_tensor(out)
    if t is None or t.dim() == 0 or t.numel() == 0:
        return None
    rows = token_rows(t.detach(), mask) if t.dim() > 1 else t.detach().reshape(1, -1)
    if rows.shape[0] > MODEL_OUTPUT_ROWS:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, MODEL_OUTPUT_ROWS, device=rows.device).round().long()]
    return rows.float()


def _spread(items, k: int) -> list:
    """k of `items`, evenly spaced from the first to the last (all of them if there are no more than k):
    text prompts followed by image prompts give batches of both kinds."""
    items = list(items)
    if len(items) <= k:
        return items
    if k == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _model_output_reference(model, calibration, config, report):
    """(batches, the high-precision model's output rows on each) for sensitivity="model", or None (with a
    note: the layer sensitivity ranks instead) where the calibration holds no batches or the model's
    output has no tensor."""
    from .calibrate import _run, inference_forward

    batches = _spread(calibration.inputs, config.sensitivity_batches)
    why = None
    if not batches:
        why = "the calibration holds no batches"
    else:
        with inference_forward(model):
            ref = [_output_rows(_run(model, b), padding_mask(b)) for b in batches]
        if any(r is None for r in ref):
            why = "the model's output on a calibration batch has no tensor to compare"
    if why:
        report.notes.append(f"mixed precision: sensitivity='model' needs the model's output on calibration batches, "
                            f"but {why}; layers ranked by their own output error (sensitivity='layer') instead")
        return None
    return batches, ref


def _model_sensitivity(model, swapped, model_ref, report, progress: bool) -> None:
    """For each quantized layer, the share of the int4 model's output error (squared, relative to the
    high-precision model's output, on the reference batches) that goes away when that layer alone is put
    back in high precision: d.model_sensitivity, which _apply_mixed_precision ranks by."""
    from .calibrate import _run, inference_forward

    batches, ref = model_ref
    ref_energy = sum(r.square().sum().item() for r in ref)
    masks = [padding_mask(b) for b in batches]

    def error() -> float:
        num = 0.0
        with inference_forward(model):
            for b, mask, r in zip(batches, masks, ref):
                num += (_output_rows(_run(model, b), mask) - r).square().sum().item()
        return num / max(ref_energy, 1e-30)

    base, unreached = error(), []
    for places, lin, d in _progress(swapped, progress, desc="sensitivity", unit="layer"):
        ql = getattr(places[0][0], places[0][1])
        for parent, attr, _ in places:
            setattr(parent, attr, lin)
        err = error()
        for parent, attr, _ in places:
            setattr(parent, attr, ql)
        d.model_sensitivity = (base - err) / base if base > 0 else 0.0
        if err == base:
            unreached.append((d.name, d.part))
    report.notes.append(f"mixed precision: {len(swapped)} layers ranked by the model's output error on "
                        f"{len(batches)} calibration batch(es) with each alone back in high precision "
                        f"({len(swapped) + 1} forward passes; relative squared output error {base:.3e} with every "
                        "layer int4)")
    if unreached:
        images = any(part in IMAGE_PARTS for _, part in unreached)
        report.notes.append(f"mixed precision: {len(unreached)} layer(s) (e.g. {unreached[0][0]}) did not change the "
                            "model's output on those batches (none reaches them) and rank last"
                            + ("; calibration prompts with images reach the vision tower" if images else ""))


def _per_byte(d: LayerDecision) -> float:
    """Model-output sensitivity per byte that keeping the layer in high precision adds (a layer whose int4
    form adds bytes - a tied lm_head - is free to keep)."""
    cost = d.bytes_before - d.bytes_after
    return d.model_sensitivity / cost if cost > 0 else float("inf")


def _apply_mixed_precision(report: PatchReport, swapped, config: QuantConfig) -> None:
    """Put the most sensitive quantized layers back in high precision, per the config's policy:
    keep_most_sensitive takes the top of the ranking; weight_budget_bytes then fills the budget in the
    ranking's order - with model sensitivities, in the order of output error removed per byte kept (a
    knapsack's greedy order: on MiniLM it kept the budget's error lower than the plain ranking did)."""
    by_model = any(s[2].model_sensitivity is not None for s in swapped)
    if by_model:  # ties (a layer with no effect on the output) broken by the layer's own output error
        ranked = sorted(swapped, key=lambda s: (-s[2].model_sensitivity, -(s[2].sensitivity or 0.0)))
    else:
        ranked = sorted((s for s in swapped if s[2].sensitivity is not None), key=lambda s: -s[2].sensitivity)
    what = "model-output sensitivity" if by_model else "sensitivity"
    total = report.bytes_after  # within the budget: patch_model checked it before quantizing
    n = len(ranked)

    def keep(places, lin, d, why):
        nonlocal total
        for parent, attr, _ in places:
            setattr(parent, attr, lin)
        total += d.bytes_before - d.bytes_after
        d.action, d.path, d.bytes_after, d.reason = "kept", "fp", d.bytes_before, why

    k = config.keep_most_sensitive
    for rank, (places, lin, d) in enumerate(ranked[:k], start=1):
        keep(places, lin, d, f"kept in high precision: {what} rank {rank} of {n} (keep_most_sensitive={k})")
    if config.weight_budget_bytes is None:
        return
    if total > config.weight_budget_bytes:  # checked before quantizing, less the input scales found since
        report.notes.append(f"weight_budget_bytes={config.weight_budget_bytes}: the input scales' bytes put the all-int4 "
                            f"Linears {total - config.weight_budget_bytes} bytes over it; no layer kept for the budget")
    fill, how = ranked, what
    if by_model:
        fill, how = sorted(ranked, key=lambda s: -_per_byte(s[2])), "model-output sensitivity per byte"
    done = {id(s[2]) for s in ranked[:k]}
    for rank, (places, lin, d) in enumerate(fill, start=1):
        if id(d) not in done and total + d.bytes_before - d.bytes_after <= config.weight_budget_bytes:
            keep(places, lin, d, f"kept in high precision: {how} rank {rank} of {n}, fits "
                                 f"weight_budget_bytes={config.weight_budget_bytes}")


def _progress(items, enabled: bool, desc: str = "int4 quantize", unit: str = "layer"):
    """A tqdm bar over `items` (off where stderr is not a terminal: disable=None), or the items."""
    if not enabled or not items:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, disable=None)
