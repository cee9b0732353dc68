"""QuantLinear: a drop-in nn.Linear replacement holding int4 weights in the canonical layout."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from . import ops
from .config import ACTS, BACKENDS, GROUP_SIZES, QuantConfig
from .models import effective_weight
from .packing import num_groups, pack_int4, packed_bytes
from .quantize import LAYER_DTYPES, check_layer_dtype, check_quantizable, quantize_weight, scale_dtype_for

# the tensors fuse_projections turns into rows of stacked ones (fusion.py): replacing one takes the layer out of its group
_FUSED_TENSORS = frozenset(("qweight", "scales", "zeros", "bias"))
# the tensors the forward hands the kernels unchecked (row-major, unit stride: ops._check_contiguous): one set on the
# layer is checked for its shape and dtype (_check_tensor), and a view with other strides (load_state_dict(assign=True)
# of a transposed tensor) is copied into a contiguous one
_ROW_MAJOR_TENSORS = _FUSED_TENSORS | {"input_scale", "input_perm"}


def _check_layer_args(in_features, out_features, group_size, dtype, act, backend, input_scale, input_perm=False) -> None:
    """The constructor's arguments, checked (load_quantized builds layers from a checkpoint's JSON):
    a layer whose buffers could not hold a valid int4 weight never exists."""
    shape = f"QuantLinear(in_features={in_features}, out_features={out_features})"
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in (in_features, out_features)):
        raise ValueError(f"{shape}: in_features and out_features must be positive integers")
    if in_features % 8:
        raise ValueError(f"{shape}: in_features must be a multiple of 8 (8 int4 values per packed word)")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{shape}: group_size={group_size} must be one of {GROUP_SIZES} (-1 = per output channel)")
    if group_size != -1 and in_features % group_size:
        raise ValueError(f"{shape}: in_features is not divisible by group_size={group_size}")
    check_layer_dtype(dtype, shape)
    if act not in ACTS:
        raise ValueError(f"{shape}: act={act!r} must be None (W4A16) or 'int8' (W4A8)")
    if backend not in BACKENDS:
        raise ValueError(f"{shape}: backend={backend!r} must be one of {BACKENDS}")
    if backend == "cuda" and act == "int8" and in_features % 16:
        # fail at build, not at the first prefill (decode rows would run on the W4A16 kernel, M >= 17 would not)
        raise ValueError(f"{shape}: backend='cuda' with act='int8' needs in_features % 16 == 0 (the CUDA W4A8 "
                         "kernel's 16-byte rows of int8 activations); use backend='auto' or 'triton' for this layer")
    for flag, value in (("input_scale", input_scale), ("input_perm", input_perm)):
        if not isinstance(value, bool):
            raise TypeError(f"{shape}: {flag}={value!r} must be True or False (whether the layer holds one)")


_FINITE_TENSORS = ("scales", "zeros", "input_scale")


def _check_finite(t: Optional[torch.Tensor], what: str) -> None:
    """ValueError if t holds a NaN / inf. No save gives a layer one (patch_model refuses such weights, and a
    scale is at most a group's range / 15): it comes from a damaged file or a cast that overflowed, and would turn
    every output its group reaches into NaN without an error. A meta tensor is not checked."""
    if t is None or t.device.type == "meta" or not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    bad = (~torch.isfinite(t)).nonzero()
    first = tuple(int(i) for i in bad[0])
    raise ValueError(f"{what}: {bad.shape[0]} NaN / inf value(s), the first at {list(first)} ({t[first].item()}) - "
                     "a damaged checkpoint, or one cast to a dtype its values overflow")


def _is_permutation(p: torch.Tensor, k: int) -> bool:
    """Whether p holds 0..k-1 once each (a meta tensor, which holds nothing yet, passes)."""
    if p.device.type == "meta":
        return True
    return not p.is_floating_point() and torch.equal(torch.sort(p.to(torch.int64)).values, torch.arange(k, device=p.device))


def _check_input_scale(m: torch.Tensor, k: int, name: str) -> None:
    if not isinstance(m, torch.Tensor) or m.shape != (k,):
        got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name}: input_scale must be a tensor of shape ({k},) (one multiplier per input channel), "
                         f"got {got}")
    if not m.is_floating_point() or not bool(torch.isfinite(m).all() and (m > 0).all()):
        raise ValueError(f"{name}: input_scale must hold finite positive floating-point multipliers")


class QuantLinear(nn.Module):
    """y = x @ dequant(qweight, scales, zeros).T + bias, for inputs of any leading shape.

    Buffers (canonical layout, packing.py): ``qweight`` int32 [N, K/8], ``scales`` and ``zeros``
    [N, K/G] in the layer's dtype; ``bias`` [N] or None; ``input_scale`` [K] in the layer's dtype or
    None (QuantConfig.input_scales: the forward computes with x * input_scale, and the int4 weight
    holds W / input_scale); ``input_perm`` int32 [K] or None (an act-order checkpoint - GPTQ's
    desc_act=True, compressed-tensors' actorder - read by foreign.py: its groups are runs of K only in
    this order of the input channels, so the forward computes with x[..., input_perm], the scale, if
    any, applying to that); ``workspace``
    int32 [N/16] zeros, the decode kernel's split-K counters (not saved; None to share nothing between
    calls on several CUDA streams at once).

    Example:
        >>> ql = QuantLinear.from_linear(nn.Linear(4096, 4096, dtype=torch.float16), QuantConfig(group_size=128))
        >>> y = ql(torch.randn(2, 7, 4096, dtype=torch.float16))
    """

    # fusion.FusedProjections this layer's rows belong to (fuse_projections), and its place there
    _fusion = None
    _fusion_index = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 dtype: torch.dtype = torch.float16, device=None, act: Optional[str] = None,
                 backend: str = "auto", input_scale: bool = False, input_perm: bool = False):
        super().__init__()
        _check_layer_args(in_features, out_features, group_size, dtype, act, backend, input_scale, input_perm)
        in_features, out_features = int(in_features), int(out_features)  # numpy integers too
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self._kernel_group_size = in_features if group_size == -1 else group_size
        self.act = act
        self.backend = backend
        g = num_groups(in_features, group_size)
        sd = scale_dtype_for(dtype)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=sd, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, g, dtype=sd, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=sd, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=sd, device=device) if input_scale else None)
        self.register_buffer("input_perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if input_perm else None)
        # split-K counters of the decode kernels, the GEMV's too (ops.w4a16_workspace): allocated here, zeroed, never
        # during a CUDA-graph capture; every call leaves them at zero. Not part of the checkpoint. One set per layer:
        # calls of one layer on two CUDA streams at once would race on them; `layer.workspace = None` makes the
        # split-K reduce in a second launch instead (same bits, no shared state; README, Compatibility).
        self.register_buffer("workspace", ops.w4a16_workspace(out_features, device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Optional[QuantConfig] = None, act: Optional[str] = None,
                    name: str = "linear", channel_weight: Optional[torch.Tensor] = None,
                    hessian: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None) -> "QuantLinear":
        """Quantize an nn.Linear (fp16, bf16 or fp32). Raises ValueError naming the layer's shape and the
        reason when it cannot be quantized (K not divisible by the group size, empty, not floating point).

        `act` overrides config.act for this layer ("int8" = W4A8); `channel_weight` ([K]) weights the
        reconstruction error per input channel in the "search" method (activation-aware search);
        `hessian` ([K, K], the sum of x x^T over calibration inputs) is what the "gptq" method needs
        (patch_model gathers it from a calibration). `input_scale` ([K], positive; awq.search_input_scale
        finds one) makes the layer compute x * input_scale @ Q(W / input_scale)^T: the statistics above
        are of the layer's own input x, scaled here to match.
        """
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"{name}: config must be a QuantConfig, got {type(config).__name__}")
        config = config or QuantConfig()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: QuantLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = effective_weight(linear)
        check_quantizable(w, config.group_size, what=f"{name}.weight")
        check_layer_dtype(w.dtype, f"{name}.weight")
        if input_scale is not None:
            _check_input_scale(input_scale, linear.in_features, name)
            m = input_scale.to(device=w.device, dtype=scale_dtype_for(w.dtype))  # as stored: the weight matches it
            m32 = m.float()
            w = (w.float() / m32).to(w.dtype)
            if channel_weight is not None:
                channel_weight = channel_weight.to(m32.device) * m32.square()
            if hessian is not None:
                hessian = hessian * m32.to(hessian)[:, None] * m32.to(hessian)[None, :]
        qw = quantize_weight(w, config.group_size, config.method, channel_weight=channel_weight, hessian=hessian,
                             what=f"{name}.weight", damp=config.gptq_damp)
        act = config.act if act is None and not isinstance(config.act, dict) else act
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  group_size=config.group_size, dtype=w.dtype, device=w.device, act=act, backend=config.backend,
                  input_scale=input_scale is not None)
        mod.qweight.copy_(pack_int4(qw.q))
        mod.scales.copy_(qw.scales)
        mod.zeros.copy_(qw.zeros)
        if input_scale is not None:
            mod.input_scale.copy_(m)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().to(mod.bias.dtype))
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a module materialised with to_empty() holds garbage counters: loading weights zeroes them
        if self.workspace is not None:  # None: set by a user who runs the layer on several streams at once
            with torch.no_grad():
                self.workspace.zero_()
        for what in _FINITE_TENSORS:  # (as the loaders' check_loaded: a NaN scale would give NaN outputs, no error)
            value = state_dict.get(prefix + what)
            if isinstance(value, torch.Tensor):
                _check_finite(value, f"{prefix[:-1] or 'QuantLinear'}: {what}")
        perm = state_dict.get(prefix + "input_perm")
        if self.input_perm is not None and isinstance(perm, torch.Tensor) and perm.shape == self.input_perm.shape \
                and not _is_permutation(perm, self.in_features):  # the kernels read x at these indices
            raise ValueError(f"{prefix[:-1] or 'QuantLinear'}: input_perm is not a permutation of the "
                             f"{self.in_features} input channels")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # model.double() / .to(torch.float64) / .to(torch.complex64) would turn the scales, zeros and
        # bias into a dtype no int4 kernel computes in (the constructor refuses such layers): refused
        # here, before any buffer changes; .half() / .bfloat16() / .float() / device moves go through
        probe = fn(torch.empty(0, dtype=self.scales.dtype, device=self.scales.device))
        if isinstance(probe, torch.Tensor) and probe.dtype != self.scales.dtype and probe.dtype not in LAYER_DTYPES:
            raise TypeError(f"QuantLinear({self.in_features} -> {self.out_features}): converting it to {probe.dtype} "
                            "is not supported: int4 layers compute in fp16, bf16 or fp32 (convert the model to one "
                            "of those, or convert only the modules that are not QuantLinear)")
        out = super()._apply(fn, *args, **kwargs)
        if self._fusion is not None:  # a move gives the layer tensors of its own: no longer the stacked ones' rows
            self._fusion.check_intact()
        return out

    def __setattr__(self, name: str, value) -> None:
        if name in _ROW_MAJOR_TENSORS and isinstance(value, torch.Tensor) and "out_features" in self.__dict__:
            # the forward hands its tensors to the kernels unchecked: one set by hand (or by an assigning load) is
            # checked here - a wrong shape would be read out of bounds - and a view would be read as if it were not one
            self._check_tensor(name, value)
            if not value.is_contiguous():
                contiguous = value.contiguous()
                value = nn.Parameter(contiguous, value.requires_grad) if isinstance(value, nn.Parameter) else contiguous
        super().__setattr__(name, value)
        # a tensor replaced (set, or loaded with assign=True, which sets it): no longer the stacked ones' rows
        if name in _FUSED_TENSORS and self._fusion is not None:
            self._fusion.check_intact()

    def _check_tensor(self, name: str, value: torch.Tensor) -> None:
        """Shape and kind of dtype of a tensor set as one of the layer's (ValueError naming the layer and it)."""
        n, k = self.out_features, self.in_features
        g = num_groups(k, self.group_size)
        shape, integer = {"qweight": ((n, k // 8), True), "scales": ((n, g), False), "zeros": ((n, g), False),
                          "bias": ((n,), False), "input_scale": ((k,), False), "input_perm": ((k,), True)}[name]
        dtypes = (torch.int32,) if integer else LAYER_DTYPES
        if tuple(value.shape) != shape or value.dtype not in dtypes:
            raise ValueError(f"QuantLinear({k} -> {n}): {name} must be a {' / '.join(map(str, dtypes))} tensor of "
                             f"shape {shape}, got {value.dtype} {tuple(value.shape)}")
        if name == "input_perm" and not _is_permutation(value, k):  # the kernels read x at these indices
            raise ValueError(f"QuantLinear({k} -> {n}): input_perm is not a permutation of the {k} input channels")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # code written for nn.Linear that reads or replaces its fp weight (transformers' resize_token_embeddings,
        # an initialisation from the weight): say what the layer holds and what to do, not only "no attribute"
        # (still an AttributeError: hasattr(layer, "weight") stays False)
        raise AttributeError(f"QuantLinear ({self.in_features} -> {self.out_features}) has no `weight`: it holds it as "
                             "int4 (qweight, scales, zeros) and dequantized_weight() gives the [out, in] matrix it "
                             "computes with. Code that reads or replaces a Linear's fp weight (resize_token_embeddings, "
                             "weight tying, weight-based initialisations) runs on the fp model: before patch_model, or "
                             "after minicpm_int4.dequantize_model(model)")

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def weight_bytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.input_scale, self.input_perm) if t is not None)
        return packed_bytes(self.out_features, self.in_features, self.group_size, self.scales.dtype) + extra

    def dequantized_weight(self) -> torch.Tensor:
        """The [N, K] weight this module computes with, in the layer's dtype (x @ it.T is the forward's
        product, the input scale included)."""
        if self.input_scale is None:
            w = ops.dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.scales.dtype)
        else:
            w = ops.dequantize(self.qweight, self.scales, self.zeros, self.group_size, torch.float32)
            w = (w * self.input_scale.float()[None, :]).to(self.scales.dtype)
        if self.input_perm is not None:  # column j multiplies input channel input_perm[j]: back to channel order
            w = w.index_select(1, torch.argsort(self.input_perm))
        return w

    def check_input_perm(self, name: str = "QuantLinear") -> None:
        """Raise ValueError unless `input_perm` (if any) is a permutation of 0..K-1. The layer's loaders
        call it (load_state_dict, load_quantized, transformers' from_pretrained): the decode kernels read x
        at these indices, so a wrong one would read out of bounds. A meta tensor is not checked."""
        if self.input_perm is not None and not _is_permutation(self.input_perm, self.in_features):
            raise ValueError(f"{name}: input_perm is not a permutation of the {self.in_features} input channels")

    def check_loaded(self, name: str = "QuantLinear") -> None:
        """What the loaders check once a layer's tensors are in (load_quantized, transformers' from_pretrained):
        check_input_perm, and that the scales, zeros and input scale hold no NaN / inf (`_check_finite`)."""
        self.check_input_perm(name)
        for what in _FINITE_TENSORS:
            _check_finite(self._buffers.get(what), f"{name}: {what}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step calls this hundreds of times: each buffer is read once, from the module's own
        # dicts (nn.Module.__getattr__'s search costs about 1 us a tensor on a slow CPU, as much as a
        # small GEMM's launch), the checks are one branch, and the messages are built only on failure
        fusion = self._fusion
        if fusion is not None:  # one GEMM with its siblings (fusion.py), made now or by a sibling on this x
            y = fusion.output(self, x)
            if y is not None:
                return y
        buffers = self._buffers
        qweight, scales = buffers["qweight"], buffers["scales"]
        k = self.in_features
        if x.ndim == 0 or x.shape[-1] != k or x.dtype != scales.dtype or x.device != qweight.device:
            x = self._adapt_input(x)
        bias = self._parameters["bias"]
        if bias is not None and bias.dtype != scales.dtype:
            # recast from outside (peft.prepare_model_for_kbit_training sets every fp16 / bf16 parameter's .data
            # to fp32): the kernels add a bias of the layer's dtype, and the cast back is exact for such a bias
            bias = bias.to(scales.dtype)
        # buffers were validated when the layer was built (and load_state_dict keeps their shapes);
        # the input scale and an act-order layer's channel order (or None) are applied by quantized_linear,
        # fused where a kernel can take them (the decode kernels read x through input_perm)
        y = ops.quantized_linear(x.reshape(-1, k).contiguous(), qweight, scales, buffers["zeros"], bias,
                                 self._kernel_group_size, self.act, self.backend, buffers["workspace"],
                                 buffers["input_scale"], buffers["input_perm"])
        return y.reshape(*x.shape[:-1], self.out_features)

    def _adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """An input that does not match the layer: under torch.autocast a floating-point input is cast
        to the layer's dtype (nn.Linear casts to the autocast dtype; the int4 kernels compute in the
        layer's), anything else is a clear error."""
        name = f"QuantLinear({self.in_features} -> {self.out_features})"
        if x.ndim == 0:  # (as nn.Linear, which takes [..., K] with at least one dimension)
            raise ValueError(f"{name}: input is a 0-d tensor; it needs a last dimension of {self.in_features} features")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{name}: input has {x.shape[-1]} features in its last dimension")
        if x.device != self.qweight.device:
            raise ValueError(f"{name} lives on {self.qweight.device} but got input on {x.device}")
        if x.is_floating_point() and ops.autocast_enabled(x.device):
            return x.to(self.scales.dtype)
        raise TypeError(f"{name} holds a {self.scales.dtype} layer but got {x.dtype} input "
                        "(cast the input, or run under torch.autocast, which casts it to the layer's dtype)")

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={gs}, act={self.act or 'fp'}, backend={self.backend}, dtype={self.scales.dtype}"
                + (", input_scale=True" if self.input_scale is not None else "")
                + (", input_perm=True" if self.input_perm is not None else ""))
