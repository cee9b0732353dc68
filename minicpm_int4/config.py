"""QuantConfig: what to quantize and how.

One frozen dataclass, serialisable to JSON (it is written beside every quantized checkpoint).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

GROUP_SIZES = (32, 64, 128, -1)
BACKENDS = ("auto", "triton", "cuda", "torch")
ACTS = (None, "int8")
METHODS = ("rtn", "search", "gptq")
SENSITIVITIES = ("model", "layer")
# Parts of a MiniCPM-V model (see models.py). "other" is any Linear outside the known parts.
PARTS = ("llm", "lm_head", "vision", "merger", "resampler", "audio", "tts", "other")

INT_FIELDS = ("bits", "group_size", "min_out_features", "keep_most_sensitive", "sensitivity_batches")

ActSpec = Union[None, str, Mapping[str, Optional[str]]]


@dataclass(frozen=True)
class QuantConfig:
    """How `patch_model` / `QuantLinear.from_linear` quantize a model.

    Args:
        bits: weight bits; only 4 is implemented.
        group_size: input channels (K) sharing one scale and zero point: 32, 64, 128, or -1 for one
            group per output channel (the whole K).
        act: None for W4A16 (fp16/bf16 activations), "int8" for W4A8 (dynamic per-token int8
            activations), or a dict from model part to either, e.g. ``{"vision": "int8"}`` (parts not
            named use W4A16).
        backend: "auto" (fastest available for the device and M), "triton", "cuda" (the compiled
            extension: its decode kernels up to 16 rows; past 16 its warpgroup-MMA prefill GEMM on an H100 / H200,
            elsewhere the decode kernel in slices of 16), or "torch" (the pure-PyTorch reference; what "auto" means
            on CPU).
        method: "search" (clipping-range search, the default: never worse than rtn on any group, and
            measured better on trained weights, see benchmarks/results/cpu/minilm_quality.md) or "rtn"
            (round to nearest with the min/max range) or "gptq" (error feedback along the inverse Hessian
            of each layer's calibration inputs, gptq.py: the lowest output error, needs calibration;
            layers no calibration input reaches get the search).
        quantize_llm / quantize_vision / quantize_merger / quantize_resampler / quantize_lm_head /
            quantize_audio / quantize_tts / quantize_other: which model parts are quantized.
        include / exclude: fnmatch patterns over qualified module names; include forces a Linear in
            (if it can be quantized at all), exclude forces it out. Exclude wins.
        min_out_features: Linears with fewer outputs stay in high precision (a few dozen outputs,
            e.g. Qwen3.5's ``in_proj_a``/``in_proj_b``, cost more in dequant overhead than they save).
        fold_scales: with calibration and method="search" (any method with input_scales),
            AWQ-style per-channel scales folded into the previous op where the layout allows
            (models.SCALE_FOLDS), checked to leave the model's output unchanged before quantizing.
        input_scales: AWQ-style per-channel scales for every quantized layer: folded where the layout
            allows (fold_scales, with any method), and for the layers where no scale folds
            into the previous op (a post-norm model's layers, whose norm also feeds the residual; an
            attention output projection; an MLP's second layer after a nonlinearity): the layer stores
            ``input_scale`` [K] and multiplies its input by it before the int4 GEMM (the decode kernels,
            Triton and CUDA, the activation quantizers and on sm_90 Triton's W4A16 prefill multiply it
            into their loads of x; elsewhere one elementwise pass before W4A16 prefill), its weight is
            quantized divided by it.
            Searched per layer as the folds are (alpha = 0, no scale, is a candidate; a layer of a fold
            group whose search chose no scale gets no runtime one either). Needs calibration; any
            method. Off by default for that runtime cost. On MiniLM's trained weights
            (post-norm: nothing folds) it cut the held-out embedding 1 - cos by 27-36% with the search
            (32-40% with W4A8 activations) and by 3-12% with gptq (16-24% with W4A8), at G = 128 / 32
            (benchmarks/results/cpu/minilm_quality.md).
        keep_most_sensitive: mixed precision: keep this many of the most sensitive layers (see
            `sensitivity`) in high precision. Needs calibration.
        weight_budget_bytes: mixed precision: keep the most sensitive layers in high precision as long
            as the Linear weights stay within this many bytes. Needs calibration.
        sensitivity: how mixed precision ranks the layers. "model" (the default): by how much of the
            int4 model's output error (logits, or the last hidden state) on `sensitivity_batches`
            calibration batches goes away when that layer alone is put back in
            high precision - one forward over those batches per quantized layer. "layer": by the
            layer's own relative output error ||X (W - Wq)^T|| / ||X W^T|| on its calibration inputs (no
            extra forward). On MiniLM's trained weights, keeping 8 of 37 layers by "model" left 20% (search)
            and 36% (gptq) less held-out embedding error (1 - cos) than by "layer", and 6-39% less within
            weight budgets; with one layer kept the two were within 1% (benchmarks/results/cpu/minilm_quality.md).
        sensitivity_batches: calibration batches that sensitivity="model" runs per layer, evenly spaced
            over the calibration (text prompts followed by image prompts give some of each).
        gptq_damp: method="gptq"'s dampening, H + gptq_damp * mean(diag H) * I, in (0, 1]. 0.1 (not the
            paper's 0.01): on MiniLM's trained weights, calibrated on 846 tokens, it gave the lowest held-out
            output error and the best embedding cosine of 0.01 / 0.03 / 0.1 / 0.3 / 1 at every group size
            (benchmarks/results/cpu/minilm_quality.md); on 12 and on 119 tokens, 1 lowered the output error
            a little more, but not the cosine.
    """

    bits: int = 4
    group_size: int = 128
    act: ActSpec = None
    backend: str = "auto"
    method: str = "search"
    quantize_llm: bool = True
    quantize_vision: bool = True
    quantize_merger: bool = False
    quantize_resampler: bool = False
    quantize_lm_head: bool = False
    quantize_audio: bool = False
    quantize_tts: bool = False
    quantize_other: bool = True
    include: tuple = ()
    exclude: tuple = ()
    min_out_features: int = 64
    fold_scales: bool = True
    input_scales: bool = False
    keep_most_sensitive: int = 0
    weight_budget_bytes: Optional[int] = None
    gptq_damp: float = 0.1
    sensitivity: str = "model"
    sensitivity_batches: int = 4

    def __post_init__(self):
        self._check_types()
        if self.bits != 4:
            raise ValueError(f"QuantConfig.bits={self.bits}: only 4-bit weights are implemented")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"QuantConfig.group_size={self.group_size}: must be one of {GROUP_SIZES} (-1 = per output channel)")
        if self.backend not in BACKENDS:
            raise ValueError(f"QuantConfig.backend={self.backend!r}: must be one of {BACKENDS}")
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r}: must be one of {METHODS}")
        if isinstance(self.act, Mapping):
            for part, a in self.act.items():
                if part not in PARTS:
                    raise ValueError(f"QuantConfig.act: unknown model part {part!r}; parts are {PARTS}")
                if a not in ACTS:
                    raise ValueError(f"QuantConfig.act[{part!r}]={a!r}: must be one of {ACTS}")
            object.__setattr__(self, "act", dict(self.act))
        elif self.act not in ACTS:
            raise ValueError(f"QuantConfig.act={self.act!r}: must be None, 'int8' or a dict part -> act")
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, name, tuple(v))
            bad = [p for p in v if not isinstance(p, str)]
            if bad:
                raise TypeError(f"QuantConfig.{name}: patterns must be strings (fnmatch over module names), got {bad[0]!r}")
        if self.min_out_features < 1:
            raise ValueError("QuantConfig.min_out_features must be >= 1")
        if self.keep_most_sensitive < 0:
            raise ValueError("QuantConfig.keep_most_sensitive must be >= 0")
        if self.weight_budget_bytes is not None and self.weight_budget_bytes <= 0:
            raise ValueError("QuantConfig.weight_budget_bytes must be positive")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(f"QuantConfig.sensitivity={self.sensitivity!r}: must be one of {SENSITIVITIES} (how "
                             "mixed precision ranks layers: by the model's output, or by each layer's own output)")
        if self.sensitivity_batches < 1:
            raise ValueError(f"QuantConfig.sensitivity_batches={self.sensitivity_batches}: must be >= 1")
        if not 0 < self.gptq_damp <= 1:  # NaN fails this too
            raise ValueError(f"QuantConfig.gptq_damp={self.gptq_damp!r}: must be in (0, 1] (a share of H's mean "
                             "diagonal added to it)")

    def _check_types(self) -> None:
        """Wrong types are errors here, not surprises later: a string "False" for a bool field is truthy
        (the part would be quantized), a float group size passes `in GROUP_SIZES` and then makes float
        buffer shapes, None for include / exclude is not a tuple of patterns."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(v, bool):
                raise TypeError(f"QuantConfig.{f.name}={v!r}: must be True or False")
            is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
            if f.name in INT_FIELDS and not is_int:
                raise TypeError(f"QuantConfig.{f.name}={v!r}: must be an integer")
            if f.name == "weight_budget_bytes" and v is not None and not is_int:
                raise TypeError(f"QuantConfig.weight_budget_bytes={v!r}: must be an integer number of bytes or None")
            if f.name == "gptq_damp" and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"QuantConfig.gptq_damp={v!r}: must be a number")
            if f.name in ("include", "exclude") and not isinstance(v, (str, tuple, list)):
                raise TypeError(f"QuantConfig.{f.name}={v!r}: must be a pattern or a list of patterns (default: none)")
        for name in INT_FIELDS + ("weight_budget_bytes",):
            v = getattr(self, name)
            if v is not None:  # numpy integers are fine; stored as int (JSON, shapes)
                object.__setattr__(self, name, int(v))
        object.__setattr__(self, "gptq_damp", float(self.gptq_damp))

    @property
    def mixed_precision(self) -> bool:
        return self.keep_most_sensitive > 0 or self.weight_budget_bytes is not None

    # -- helpers used by patch.py -------------------------------------------------------------
    @property
    def uses_int8_activations(self) -> bool:
        """Whether any model part runs W4A8."""
        return "int8" in (self.act.values() if isinstance(self.act, dict) else (self.act,))

    def act_for(self, part: str) -> Optional[str]:
        """The activation mode of a Linear in model part `part`."""
        if isinstance(self.act, dict):
            return self.act.get(part)
        return self.act

    def part_enabled(self, part: str) -> bool:
        return bool(getattr(self, f"quantize_{part}"))

    def matches(self, name: str, patterns: tuple) -> Optional[str]:
        for p in patterns:
            if fnmatch.fnmatchcase(name, p):
                return p
        return None

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"QuantConfig.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)
