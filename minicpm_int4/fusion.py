"""One GEMM for the int4 projections that read the same input: q / k / v, gate / up, and Qwen3.5's
gated-delta-net input projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a).

At batch-1 decode every QuantLinear call is a kernel launch whose fixed cost (the launch, the ramp up
and the tail; ~2.7-3.8 us a call on an H200 in results/nvidia-h200/targets.md, plus the host's Python
in eager mode) is paid whatever the layer's size, and many of MiniCPM-V's projections are small (a
KV projection of 1024 rows streams in about a microsecond). Siblings that
multiply the same x are one GEMM over their rows stacked: MiniCPM-V 4.6's LLM (default config, int4 where
patch_model puts it) goes from 200 int4 launches a token to 128, Llama3-V 2.5's from 224 to 128.

    >>> minicpm_int4.patch_model(model)
    >>> print(minicpm_int4.fuse_projections(model))    # after moving the model to its device

How, without touching the model's code (which calls `self.q_proj(x)`, `self.k_proj(x)`, ... in
turn): the siblings' weights are moved into one buffer per tensor, each layer keeping a view of its
rows (no memory added; its state_dict, checkpoints and load_state_dict unchanged). A one-row call of
the first sibling (any of them) computes the stacked GEMM once and keeps the others' slices; each
sibling then called with that same tensor (the same object, not modified in place since) returns
its slice. Everything else computes layer by layer from the views, with the same kernels as before:
more than one row of x (prefill; slices of a wider output would not be contiguous), torch.export /
jit tracing or a dispatch mode (the group's tensors belong to no module such a graph could hold), a
sibling called with another input than the one its slices were made from (the group is then turned
off for good: its layers do not share their input, e.g. a cross-attention's q), or weights that were
replaced since (`model.to(...)` onto another device or dtype, `load_state_dict(assign=True)`, a buffer
set: QuantLinear tells its group as it happens, which turns off with a warning; call fuse_projections
again). A CUDA graph captured by hand replays
the stacked launches. Not for one model run from several threads at once (the slices not yet taken are
the group's state).

torch.compile follows the same protocol as it traces (dynamo compares traced tensors by identity and
replays the group's state changes), so a compiled one-token step - transformers' compiled decode, CUDA
graph trees - has one stacked GEMM a group and slices of it. One difference: dynamo gives no version
counter a trace can compare, so a compiled model whose code changed the projections' input in place
between two siblings' calls would get the slices of the input before the change (no MiniCPM-V layout
does; eager mode checks it).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import ops
from .models import SHARED_INPUT_SIBLINGS, unwrap_compiled
from .qlinear import QuantLinear

# Sibling names that take the same input (layout knowledge: models.py); anything else is left alone, and a set
# whose members turn out not to share their input turns itself off at the first call that shows it (above).
SIBLING_SETS = SHARED_INPUT_SIBLINGS

_TENSORS = ("qweight", "scales", "zeros")

# Model parts (models.py layouts) that only ever see many rows at once - encoders, whose inputs are whole images
# or clips: a group there would never make a stacked call. fuse_projections leaves them alone unless asked.
ENCODER_PARTS = ("vision", "merger", "resampler", "audio")


def _traced(x: torch.Tensor) -> bool:
    """Whether this eager-looking call is being traced or intercepted (export, jit, fake / functional
    tensors, a dispatch mode), where the group's bookkeeping must not run (torch.compile is
    FusedProjections._compiled_output's)."""
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or bool(ops._dispatch_modes()))


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel (called from turn_off) of the first frame outside this package and torch: the
    user's line that moved, loaded or called the model, however deep the module tree it went through."""
    import os
    import sys

    inside = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))
    frame, level = sys._getframe(2), 2  # (turn_off's caller: level 2 of warnings.warn called in turn_off)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _mark_static(*tensors: Optional[torch.Tensor]) -> None:
    """Tell torch.compile that these tensors keep their address from call to call, as a module's buffers do:
    a group's stacked tensors are attributes of no module, and CUDA graph trees (mode="reduce-overhead") would
    otherwise copy such an input into a buffer of their own before every replay - the whole stacked weight."""
    import torch._dynamo

    mark = getattr(torch._dynamo, "mark_static_address", None)
    for t in tensors:
        if t is not None and mark is not None:
            mark(t)


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)
# the module holding the flag torch.export sets while it traces, where torch has one (read at each call: it changes)
_EXPORT_FLAG_MODULE = torch.compiler if isinstance(getattr(torch.compiler, "_is_exporting_flag", None), bool) else None


def _exporting() -> bool:
    """Whether torch.export is tracing: the flag torch.export sets (torch.compiler._is_exporting_flag), read
    itself where torch has it - torch 2.8's dynamo answers is_exporting() True in every trace (it folds the
    call to a constant; later torch reads the flag), so a compiled step ran the layers one by one there.
    Where torch cannot say (no torch.compiler.is_exporting: torch 2.4), any trace is taken for an export."""
    if _EXPORT_FLAG_MODULE is not None:
        return bool(_EXPORT_FLAG_MODULE._is_exporting_flag)
    return _IS_EXPORTING is None or bool(_IS_EXPORTING())


def _version(x: torch.Tensor) -> Optional[int]:
    return None if x.is_inference() else x._version  # (inference tensors keep no version counter)


class FusedProjections:
    """The runtime state of one group of sibling QuantLinears (fuse_projections builds them): the
    stacked tensors whose rows the layers view, the offsets of each layer's rows, and the slices of
    the last stacked call that have not been taken yet."""

    def __init__(self, parent_name: str, names: List[str], layers: List[QuantLinear]):
        first = layers[0]
        self.parent_name = parent_name
        self.names = list(names)
        self.layers = list(layers)
        self.in_features = first.in_features
        self.rows = [layer.out_features for layer in layers]
        self.offsets = [0]
        for n in self.rows:
            self.offsets.append(self.offsets[-1] + n)
        self.out_features = self.offsets[-1]
        self.group_size = first._kernel_group_size
        self.dtype, self.device = first.scales.dtype, first.qweight.device
        with torch.no_grad():
            stacked = {t: torch.cat([layer._buffers[t] for layer in layers]) for t in _TENSORS}
            has_bias = [layer.bias is not None for layer in layers]
            bias = None
            if any(has_bias):
                bias = torch.cat([layer.bias.detach().to(self.dtype) if layer.bias is not None
                                  else torch.zeros(layer.out_features, dtype=self.dtype, device=self.device)
                                  for layer in layers])
        self.qweight, self.scales, self.zeros, self.bias = stacked["qweight"], stacked["scales"], stacked["zeros"], bias
        self.input_scale = first.input_scale
        self.input_perm = first.input_perm
        self.workspace = ops.w4a16_workspace(self.out_features, self.device)
        _mark_static(self.qweight, self.scales, self.zeros, self.bias, self.workspace)
        self._expect = []  # the tensors each layer must still hold for the stacked call to be its own
        for i, layer in enumerate(layers):  # each layer's tensors become views of its rows
            a, b = self.offsets[i], self.offsets[i + 1]
            for t in _TENSORS:
                layer._buffers[t] = stacked[t][a:b]
            if has_bias[i]:
                layer._parameters["bias"] = nn.Parameter(bias[a:b], requires_grad=False)
            layer._fusion = self
            layer._fusion_index = i
            self._expect.append(tuple(layer._buffers[t] for t in _TENSORS) + (layer._parameters["bias"],))
        self.active = True
        self.reason = ""            # why the group turned off, once it has
        self.calls = 0              # stacked GEMMs run in eager mode (each serving every sibling)
        self.in_graph = False       # whether a torch.compile graph that makes the stacked call has run
        # the last stacked call's input, its version (None: made in a compiled graph), the slices not yet taken,
        # and the act / backend it ran with
        self._pending: Optional[Tuple[torch.Tensor, Optional[int], Dict[int, torch.Tensor], Optional[str], str]] = None

    def __repr__(self) -> str:
        state = "active" if self.active else f"off ({self.reason})"
        return (f"FusedProjections({self.parent_name or '<model>'}: {' + '.join(self.names)} = "
                f"{self.out_features} x {self.in_features}, {state})")

    def intact(self) -> bool:
        """Whether every layer still computes with its view of the stacked tensors (a move to another
        device or dtype, or an assigning load, gives a layer tensors of its own)."""
        # (identity: a move or an assigning load puts new tensors into the layers' dicts; a move
        # keeps a Parameter's object but changes the buffers too, which settles it)
        for layer, exp in zip(self.layers, self._expect):
            buffers = layer._buffers
            if (buffers["qweight"] is not exp[0] or buffers["scales"] is not exp[1] or buffers["zeros"] is not exp[2]
                    or layer._parameters["bias"] is not exp[3]):
                return False
        return True

    def turn_off(self, reason: str, warn: bool = False) -> None:
        self.active, self.reason, self._pending = False, reason, None
        if warn:
            warnings.warn(f"minicpm_int4.fuse_projections: {' + '.join(self.names)} of "
                          f"{self.parent_name or '<model>'} now compute one by one: {reason}",
                          stacklevel=_caller_stacklevel())

    def _moved(self) -> None:
        self.turn_off("a layer's weights were replaced since fusing (moved to another device or dtype, or loaded with "
                      "assign=True); call minicpm_int4.fuse_projections(model) again", warn=True)

    def check_intact(self) -> None:
        """Turn the group off, with the warning, if a layer's tensors were replaced. QuantLinear calls it as they
        are (a move, an assigning load, a buffer set): a compiled step does not check intact() at each call,
        whose identity tests would be guards evaluated in Python at every step."""
        if self.active and not self.intact():
            self._moved()

    def output(self, layer: QuantLinear, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Layer `layer`'s output for x from a stacked call (made now, or by a sibling's call on this
        same x), or None where the layer computes on its own (module docstring)."""
        if torch.compiler.is_compiling():
            return self._compiled_output(layer, x)
        i = layer._fusion_index
        pending = self._pending
        # first, the common case: a sibling's stacked call on this very tensor, unchanged since (it passed the
        # checks below then; slices a compiled graph left at a graph break have no version)
        if pending is not None and pending[0] is x and (pending[1] is None or pending[1] == _version(x)):
            y = pending[2].pop(i, None)
            if y is not None:
                if not pending[2]:
                    self._pending = None
                if layer.act != pending[3] or layer.backend != pending[4]:
                    return None  # (a compiled graph's call, which asked only its own layer: this one is set otherwise)
                return y
            return None  # this layer again on the same x before its siblings: its own call
        if not self.active or x.numel() != self.in_features or x.shape[-1] != self.in_features or _traced(x):
            return None
        if x.dtype != self.dtype or x.device != self.device:
            if not self.intact():  # the model was moved to x's device / dtype since fusing
                self._moved()
            return None  # (else a wrong input, which gets the layer's own error)
        if pending is not None:
            # the last stacked call's slices were not all taken before another input came
            self.turn_off(f"{', '.join(self.names[j] for j in sorted(pending[2]))} did not take the input "
                          f"{self.names[i]} was called with")
            return None
        if not self.intact():
            self._moved()
            return None
        act, backend, own_workspace = layer.act, layer.backend, True
        for other in self.layers:  # settings are read live (a layer's act / backend can be changed at any time)
            if other.act != act or other.backend != backend:
                return None  # the siblings disagree now: each computes as it is set
            own_workspace = own_workspace and other._buffers["workspace"] is not None
        # (a layer whose workspace was set to None, to run on several streams at once, shares none here either)
        self.calls += 1
        return self._stacked(layer, x, _version(x), act, backend, own_workspace)

    def _stacked(self, layer: QuantLinear, x: torch.Tensor, version: Optional[int], act: Optional[str], backend: str,
                 own_workspace: bool) -> torch.Tensor:
        """The stacked GEMM for a checked one-row x with these settings: layer's slice now, its siblings' kept
        for x at `version`."""
        i = layer._fusion_index
        y = ops.quantized_linear(x.reshape(1, self.in_features).contiguous(), self.qweight, self.scales, self.zeros, self.bias,
                                 self.group_size, act, backend, self.workspace if own_workspace else None,
                                 self.input_scale, self.input_perm)
        lead = x.shape[:-1]
        outs = {j: y[:, self.offsets[j]:self.offsets[j + 1]].reshape(*lead, self.rows[j])
                for j in range(len(self.rows))}
        mine = outs.pop(i)
        self._pending = (x, version, outs, act, backend)
        return mine

    def _compiled_output(self, layer: QuantLinear, x: torch.Tensor) -> Optional[torch.Tensor]:
        """output() as torch.compile traces it: the same protocol, which dynamo follows as it is (it compares
        traced tensors by identity and replays the group's state changes as side effects), so that a compiled
        one-token step has one stacked GEMM a group and slices of it, and the group's state is back to none
        by the step's end once every sibling took its slice. After a graph break between siblings, the eager
        code or the next graph takes the slices left (kept with no version, matched by identity). Not under
        export (whose graph could not hold the group's tensors, attributes of no module) nor another tracer.
        Every check here becomes a guard that runs before each compiled step, so the trace reads only what the
        calling layer and the group hold: the layer that makes the stacked call does with its own settings, and a
        sibling set otherwise computes on its own (eager mode asks every sibling first); the group is not checked
        for replaced tensors (intact(): identity tests between objects, guards evaluated in Python) - QuantLinear
        turns it off as they are replaced (check_intact), and the guard on `active` recompiles the step layer
        by layer. `calls` is not counted here (a counter read in the trace would be a guard: a recompile a step);
        `in_graph` says that such a graph ran."""
        if _exporting() or type(x) is not torch.Tensor:
            return None
        i = layer._fusion_index
        pending = self._pending
        if pending is not None and pending[0] is x:
            y = pending[2].pop(i, None)
            if y is not None:
                if not pending[2]:
                    self._pending = None
                if layer.act != pending[3] or layer.backend != pending[4]:
                    return None  # set otherwise than the sibling that made the stacked call: computes as set
                return y
            return None
        if not self.active or x.numel() != self.in_features or x.shape[-1] != self.in_features:
            return None
        if x.dtype != self.dtype or x.device != self.device:
            return None
        if pending is not None:
            self.turn_off(f"{', '.join(self.names[j] for j in sorted(pending[2]))} did not take the input "
                          f"{self.names[i]} was called with")
            return None
        self.in_graph = True  # (a write of a constant: no guard; replayed each time the graph runs)
        return self._stacked(layer, x, None, layer.act, layer.backend, layer._buffers["workspace"] is not None)

    def unfuse(self) -> None:
        """Give every layer tensors of its own again (copies of its rows) and detach the group."""
        shared = {t.untyped_storage().data_ptr() for t in (self.qweight, self.scales, self.zeros, self.bias)
                  if t is not None}
        own = lambda t: t if t.untyped_storage().data_ptr() not in shared else t.detach().clone()  # noqa: E731
        with torch.no_grad():
            for layer in self.layers:
                if layer._fusion is not self:
                    continue
                for t in _TENSORS:  # (a layer a move gave tensors of its own keeps them)
                    layer._buffers[t] = own(layer._buffers[t])
                bias = layer._parameters["bias"]
                mine = None if bias is None else own(bias)
                if mine is not bias:
                    layer._parameters["bias"] = nn.Parameter(mine, requires_grad=False)
                layer._fusion = None
                layer._fusion_index = None
        self.turn_off("unfused")


@dataclass
class FusionReport:
    """What fuse_projections did: the groups it made, and the sibling sets it left with the reason."""
    groups: List[FusedProjections] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (parent.{names}, why)

    @property
    def launches_saved(self) -> int:
        """Kernel launches a one-token forward saves (each group: one launch instead of one a layer)."""
        return sum(len(g.layers) - 1 for g in self.groups)

    def __str__(self) -> str:
        lines = [f"fuse_projections: {len(self.groups)} group(s), {self.launches_saved} launch(es) fewer a token"]
        lines += [f"  {g.parent_name}: {' + '.join(g.names)} -> {g.out_features} x {g.in_features}" for g in self.groups]
        lines += [f"  left: {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)

    __repr__ = __str__


def _compatible(layers: List[QuantLinear]) -> Optional[str]:
    """Why these layers cannot be one GEMM, or None."""
    first = layers[0]
    for layer in layers[1:]:
        for what in ("in_features", "group_size", "act", "backend"):
            if getattr(layer, what) != getattr(first, what):
                return f"different {what}"
        if layer.scales.dtype != first.scales.dtype:
            return "different dtypes"
        if layer.qweight.device != first.qweight.device:
            return "on different devices"
        for what in ("input_scale", "input_perm"):
            a, b = getattr(first, what), getattr(layer, what)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return f"different {what}s"
    if any(t.device.type == "meta" for layer in layers for t in (layer.qweight, layer.scales)):
        return "weights not loaded (meta)"
    if any(layer.bias is not None and layer.bias.requires_grad for layer in layers):
        return "a trainable bias (its gradient would not reach it through the stacked call)"
    return None


def _quant_layer(child: Optional[nn.Module]) -> Optional[QuantLinear]:
    """The QuantLinear at a sibling's place: the module itself, or the base layer of a peft LoRA layer (which
    calls it with its own input, so that the stacked call serves the adapted siblings too)."""
    if isinstance(child, QuantLinear):
        return child
    base = child._modules.get("base_layer") if isinstance(child, nn.Module) else None
    return base if isinstance(base, QuantLinear) else None


def sibling_sets(model: nn.Module, layer_of: Callable[[Optional[nn.Module]], Optional[nn.Module]],
                 parts: Optional[Sequence[str]] = None, who: str = "sibling_sets") -> List[Tuple[str, List[Tuple[str, nn.Module]]]]:
    """Every set of SIBLING_SETS with two or more layers that `layer_of(child)` accepts (it returns the layer to
    use, or None), as (parent name, [(attribute, layer), ...]) in model order, within the model parts `parts`
    (config.PARTS, by the model's layout; default: all but ENCODER_PARTS). fuse_projections fuses these; the
    bench times their stacked shapes (bench/shapes.py)."""
    from .config import PARTS
    from .models import detect_layout

    if parts is not None:
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ValueError(f"{who}: unknown part(s) {unknown}; the parts are {list(PARTS)}")
    wanted = set(parts) if parts is not None else set(PARTS) - set(ENCODER_PARTS)
    layout = detect_layout(model)
    out = []
    for parent_name, parent in model.named_modules():
        if layout.part_of(f"{parent_name}.x" if parent_name else "x") not in wanted:
            continue
        for names in SIBLING_SETS:
            found = [(n, layer_of(parent._modules.get(n))) for n in names]
            found = [(n, layer) for n, layer in found if layer is not None]
            if len(found) >= 2:
                out.append((parent_name, found))
    return out


def fuse_projections(model: nn.Module, parts: Optional[Sequence[str]] = None) -> FusionReport:
    """Make one GEMM of each set of sibling int4 projections that read the same input (SIBLING_SETS:
    q / k / v, gate / up, Qwen3.5's linear-attention input projections), in place, for one-token
    calls (batch-1 decode); see the module docstring for how and when it applies. Call it after
    patch_model / loading, once the model is on its device; again after moving it (groups that a move
    broke are rebuilt). A peft LoRA layer's base QuantLinear takes part (the adapter is added to its slice).
    Layers shared with another place or of different settings are left as they are and listed in the report;
    layers kept in high precision are not int4 layers to fuse. `parts`: the
    model parts (config.PARTS, by the model's layout) to look in; by default all but ENCODER_PARTS (the vision
    tower, the audio encoder, the resampler / merger), which never run a one-token call.
    `unfuse_projections(model)` undoes it."""
    from .patch import linear_places

    model = unwrap_compiled(model)
    places = linear_places(model)
    report = FusionReport()
    for parent_name, found in sibling_sets(model, _quant_layer, parts, "fuse_projections"):
        present = [n for n, _ in found]
        layers = [layer for _, layer in found]
        where = f"{parent_name or '<model>'}.{{{', '.join(present)}}}"
        groups = {id(layer._fusion): layer._fusion for layer in layers if layer._fusion is not None}
        if len(groups) == 1:
            (group,) = groups.values()
            if group.active and group.intact() and group.layers == layers:  # already one, still whole
                report.groups.append(group)
                continue
        for group in groups.values():  # broken by a move, or of another set of layers: rebuilt
            group.unfuse()
        if any(len(places.get(id(layer), ())) > 1 for layer in layers):
            report.skipped.append((where, "a layer is used at more than one place"))
            continue
        why = _compatible(layers)
        if why is not None:
            report.skipped.append((where, why))
            continue
        report.groups.append(FusedProjections(parent_name, present, layers))
    return report


def unfuse_projections(model: nn.Module) -> int:
    """Undo fuse_projections: every fused layer gets tensors of its own again. Returns the number of
    groups undone."""
    groups = {}
    for module in unwrap_compiled(model).modules():
        if isinstance(module, QuantLinear) and module._fusion is not None:
            groups[id(module._fusion)] = module._fusion
    for group in groups.values():
        group.unfuse()
    return len(groups)
