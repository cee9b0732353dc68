"""Int4 checkpoints written by other packages, read into the canonical layout (packing.py).

AutoAWQ's GEMM layout, GPTQ's (AutoGPTQ, GPTQModel, optimum) and llm-compressor's (compressed-tensors,
pack-quantized) hold the same numbers as this package: per group of G consecutive input channels and
per output row, an integer zero point z and a scale s, with W = (q - z) * s. Only where the nibbles
sit differs, so reading them is exact: a MiniCPM-V checkpoint someone quantized with those tools runs
on this package's kernels computing what it computed there.

    AWQ   (quantization_config: quant_method "awq", version "gemm", zero_point true, bits 4)
        qweight int32 [K, N / 8]      nibble i of word [k, j] holds q[8 j + AWQ_ORDER[i], k]
        qzeros  int32 [K / G, N / 8]  the zero points, packed as qweight's rows
        scales        [K / G, N]
    GPTQ  (quant_method "gptq", checkpoint_format "gptq" (v1, the default) or "gptq_v2", bits 4)
        qweight int32 [K / 8, N]      nibble i of word [r, n] holds q[n, 8 r + i]
        qzeros  int32 [K / G, N / 8]  nibble i of word [g, j] holds z[8 j + i, g], minus 1 in v1
        scales        [K / G, N]
        g_idx   int32 [K]             the group of each input channel: k // G, or with desc_act=True
                                      (act-order) groups of G channels scattered over K; then the
                                      channels are reordered so that each group is a run of K, and
                                      the layer computes with x[..., input_perm] (QuantLinear)

    compressed-tensors  (llm-compressor: quant_method "compressed-tensors", format "pack-quantized",
                         weights int 4-bit, strategy "group" or "channel", no activation quantization)
        weight_packed     int32 [N, K / 8]   nibble i of word [n, j] holds q[n, 8 j + i] (stored as the
                                             signed value + 8: the canonical word as it is)
        weight_scale            [N, G]
        weight_zero_point int32 [N / 8, G]   asymmetric only: nibble i of word [r, g] holds z[8 r + i, g]
                                             (+ 8 as well); symmetric layers have z = 8
        weight_g_idx      int   [K]          act-order only, as GPTQ's g_idx

(q[n, k] and z[n, g] as in packing.py: n the output row, k the input channel.) A checkpoint is
recognised by the quantization_config of its config.json, or by the quantize_config.json AutoGPTQ
writes, or the quant_config.json of older AutoAWQ versions. `checkpoint.load_pretrained_quantized`
and `checkpoint.load_quantized` read these folders as they read their own.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from .packing import nibbles, pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
METHODS = ("awq", "gptq", "compressed-tensors")
CT_FORMAT = "pack-quantized"
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what to add to a stored zero point
SUPPORTED_GROUP_SIZES = (32, 64, 128)
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "bias")


class Canonical(NamedTuple):
    """One layer in the canonical layout: qweight int32 [N, K/8], scales and zeros [N, G] (zeros
    integers in scales' dtype), and input_perm (int32 [K]: column j of the weight multiplies input
    channel input_perm[j]) or None."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    input_perm: Optional[torch.Tensor] = None


class ForeignFormatError(ValueError):
    """A foreign int4 checkpoint this package cannot read exactly (the message names what and why)."""


@dataclass(frozen=True)
class ForeignFormat:
    """What a foreign checkpoint's quantization config says, checked."""
    method: str          # "awq" | "gptq" | "compressed-tensors"
    group_size: int      # as the checkpoint says: -1 (or K) means one group per output row
    zero_offset: int     # added to every stored zero point: 1 for GPTQ v1, else 0
    source: str          # the file the config came from
    symmetric: bool = False  # compressed-tensors: no zero points stored (z = 8)

    @property
    def name(self) -> str:
        if self.method == "compressed-tensors":
            return "compressed-tensors (pack-quantized)"
        return "AWQ (GEMM)" if self.method == "awq" else ("GPTQ" if self.zero_offset else "GPTQ (v2)")

    @property
    def weight_key(self) -> str:
        """The tensor whose presence marks an int4 layer."""
        return "weight_packed" if self.method == "compressed-tensors" else "qweight"


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    from .checkpoint import read_json  # (a file that is not JSON is named)

    data = read_json(path)
    return data if isinstance(data, dict) else None


def detect(path: str) -> Optional[ForeignFormat]:
    """The foreign format of checkpoint folder `path`, or None where it is not one (this package's own
    checkpoints, a plain fp16 model). Raises ForeignFormatError for an AWQ / GPTQ checkpoint that
    cannot be read exactly (other bits, AWQ's GEMV / Marlin layouts, a group size the kernels lack)."""
    path = os.fspath(path)
    own = _read_json(os.path.join(path, "quant_config.json"))
    if own is not None and "format_version" in own:
        # this package's checkpoint, whatever config.json says (a model converted from AWQ / GPTQ layers
        # where transformers had recorded their quantization_config)
        return None
    qc, source = None, None
    hf = _read_json(os.path.join(path, "config.json")) or {}
    if isinstance(hf.get("quantization_config"), dict):
        qc, source = hf["quantization_config"], "config.json"
    else:
        gptq = _read_json(os.path.join(path, "quantize_config.json"))  # AutoGPTQ's own file
        awq = own                                                      # AutoAWQ before 0.1.7 (this package's
        if gptq is not None:                                           # own file of that name has format_version)
            qc, source = {"quant_method": "gptq", **gptq}, "quantize_config.json"
        elif awq is not None and ("w_bit" in awq or "q_group_size" in awq):
            qc = {"quant_method": "awq", "bits": awq.get("w_bit"), "group_size": awq.get("q_group_size"),
                  "zero_point": awq.get("zero_point", True), "version": awq.get("version", "gemm")}
            source = "quant_config.json"
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        return None
    where = f"{os.path.join(path, source)}: quantization method {method!r}"
    if method == "compressed-tensors":
        return _detect_compressed_tensors(qc, where, source)
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise ForeignFormatError(f"{where} with bits={bits}: only 4-bit checkpoints can be read")
    group_size = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size > 0 or group_size == -1):
        raise ForeignFormatError(f"{where} with group_size={group_size!r}: expected a positive size or -1")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ForeignFormatError(f"{where} in the {version!r} layout: only AWQ's GEMM layout is read (convert it "
                                     "with AutoAWQ, or quantize the fp16 model with `minicpm-int4 quantize`)")
        if not qc.get("zero_point", True):
            raise ForeignFormatError(f"{where} without zero points (zero_point=false): the int4 layers here are "
                                     "asymmetric; only AWQ's zero-point checkpoints are read")
        offset = 0
    else:
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()  # GPTQModel writes either
        if fmt not in GPTQ_FORMATS:
            raise ForeignFormatError(f"{where} with checkpoint_format={fmt!r}: only {sorted(GPTQ_FORMATS)} are read "
                                     "(a Marlin / BitBLAS repack is not the GPTQ layout)")
        offset = GPTQ_FORMATS[fmt]
    return ForeignFormat(method=method, group_size=group_size, zero_offset=offset, source=source)


def _detect_compressed_tensors(qc: dict, where: str, source: str) -> ForeignFormat:
    """llm-compressor's config: every config group's weights must be the same 4-bit integer scheme,
    by group or channel, packed ("pack-quantized"), with no activation quantization."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") for g in groups if g.get("weights")]
    if not weights:
        raise ForeignFormatError(f"{where}: no config group quantizes weights")
    if any(w != weights[0] for w in weights):
        raise ForeignFormatError(f"{where}: config groups with different weight schemes; only one scheme for "
                                 "every int4 layer is read")
    w = weights[0]
    formats = {str(g.get("format") or qc.get("format") or "") for g in groups}
    if formats != {CT_FORMAT}:
        raise ForeignFormatError(f"{where} in format {sorted(formats)}: only {CT_FORMAT!r} (int4 packed 8 per int32) "
                                 "is read")
    if w.get("num_bits") != 4 or w.get("type", "int") != "int":
        raise ForeignFormatError(f"{where} with {w.get('type', 'int')} weights of {w.get('num_bits')} bits: only 4-bit "
                                 "integer weights can be read")
    if any(g.get("input_activations") or g.get("output_activations") for g in groups):
        raise ForeignFormatError(f"{where} quantizes activations as well: only weight-only (W4A16) checkpoints are "
                                 "read (QuantConfig(act='int8') is this package's own W4A8)")
    strategy = w.get("strategy")
    if strategy == "group":
        group_size = w.get("group_size")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ForeignFormatError(f"{where} with group_size={group_size!r}: expected a positive size")
    elif strategy == "channel":
        group_size = -1
    else:
        raise ForeignFormatError(f"{where} with strategy {strategy!r}: only 'group' and 'channel' are read")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ForeignFormatError(f"{where} with quantization_status {status!r}: the weights are not stored packed")
    return ForeignFormat(method="compressed-tensors", group_size=group_size, zero_offset=0, source=source,
                         symmetric=bool(w.get("symmetric", True)))


def _check_shape(name: str, what: str, t: torch.Tensor, shape: Tuple[int, ...], dtype=None) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ForeignFormatError(f"{name}.{what}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ForeignFormatError(f"{name}.{what}: dtype {t.dtype}, expected {dtype}")
    if dtype is None and not t.is_floating_point():
        raise ForeignFormatError(f"{name}.{what}: dtype {t.dtype}, expected a floating-point tensor")


def layer_group_size(fmt_group_size: int, in_features: int, name: str) -> int:
    """The QuantLinear group size for a layer of `in_features` inputs: -1 for one group over K."""
    if fmt_group_size in (-1, in_features):
        return -1
    if fmt_group_size not in SUPPORTED_GROUP_SIZES:
        raise ForeignFormatError(f"{name}: group_size={fmt_group_size} of a {in_features}-input layer: the int4 "
                                 f"kernels take groups of {SUPPORTED_GROUP_SIZES} input channels or one per output row")
    if in_features % fmt_group_size:
        raise ForeignFormatError(f"{name}: in_features={in_features} is not divisible by group_size={fmt_group_size}")
    return fmt_group_size


def awq_to_canonical(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, in_features: int,
                     out_features: int, group_size: int, name: str = "layer"):
    """AutoAWQ GEMM tensors of one layer -> canonical (qweight int32 [N, K/8], scales [N, G], zeros
    [N, G] in scales' dtype), exactly. `group_size` as QuantLinear takes it (-1: one group)."""
    k, n = in_features, out_features
    g = 1 if group_size == -1 else k // group_size
    if n % 8:
        raise ForeignFormatError(f"{name}: out_features={n} is not a multiple of 8, which AWQ's layout packs")
    _check_shape(name, "qweight", qweight, (k, n // 8), torch.int32)
    _check_shape(name, "qzeros", qzeros, (g, n // 8), torch.int32)
    _check_shape(name, "scales", scales, (g, n))
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)], device=qweight.device)
    z = nibbles(qzeros)[..., inverse].reshape(g, n)
    _check_scales(scales, name)
    # AWQ packs along N, the canonical layout along K: unpacked and packed again, ROWS_PER_CHUNK output
    # rows (qweight's words n0 / 8 .. n1 / 8, column order restored) at a time
    chunks = []
    for n0 in range(0, n, ROWS_PER_CHUNK):
        n1 = min(n, n0 + ROWS_PER_CHUNK)
        chunks.append(pack_int4(nibbles(qweight[:, n0 // 8:n1 // 8])[..., inverse].reshape(k, n1 - n0).t()))
    return Canonical(torch.cat(chunks), scales.t().contiguous(), z.t().contiguous().to(scales.dtype))


def gptq_to_canonical(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                      in_features: int, out_features: int, group_size: int, zero_offset: int = 1, name: str = "layer"):
    """GPTQ tensors of one layer -> Canonical, exactly. `zero_offset` 1 for the v1 format (zero points
    stored minus 1), 0 for v2; `g_idx` (or None: k // G) the group of each input channel: groups of G
    channels anywhere in K (desc_act=True) come back as runs of K in the order Canonical.input_perm."""
    k, n = in_features, out_features
    g = 1 if group_size == -1 else k // group_size
    if k % 8 or n % 8:
        raise ForeignFormatError(f"{name}: {n} x {k}: GPTQ's layout packs 8 input channels and 8 zero points per word")
    _check_shape(name, "qweight", qweight, (k // 8, n), torch.int32)
    _check_shape(name, "qzeros", qzeros, (g, n // 8), torch.int32)
    _check_shape(name, "scales", scales, (g, n))
    perm = _group_order(g_idx, k, group_size, f"{name}.g_idx")
    z = nibbles(qzeros).reshape(g, n).to(torch.int16) + zero_offset
    if int(z.max()) > 15:
        raise ForeignFormatError(
            f"{name}.qzeros: a zero point reads {int(z.max())} after the v1 format's +1: the checkpoint stored a zero "
            "point of 0 as -1, which AutoGPTQ's packing also ORs into the zero points beside it, so they cannot be "
            "read back; re-export it in the gptq_v2 format, or quantize the fp16 model with `minicpm-int4 quantize`")
    _check_scales(scales, name)
    # word [r, n] holds input channels 8 r .. 8 r + 7 of row n in nibbles 0..7: the canonical word
    # [n, r] already, so the layout is a transpose (and with act-order, the columns reordered)
    qweight, perm = _reorder_columns(qweight.t().contiguous(), perm)
    return Canonical(qweight, scales.t().contiguous(), z.t().contiguous().to(scales.dtype), perm)


def compressed_tensors_to_canonical(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                                    weight_zero_point: Optional[torch.Tensor], g_idx: Optional[torch.Tensor],
                                    in_features: int, out_features: int, group_size: int, name: str = "layer",
                                    symmetric: Optional[bool] = None):
    """compressed-tensors pack-quantized tensors of one layer -> Canonical, exactly. `weight_zero_point`
    None: a symmetric layer (z = 8, the offset every stored value carries). `symmetric` (the scheme's
    flag; None: as weight_zero_point says): a symmetric scheme's zero points, if held, must be all 0 and
    are then ignored; an asymmetric one needs them."""
    k, n = in_features, out_features
    if symmetric and weight_zero_point is not None:
        if bool((weight_zero_point != 0).any()):
            raise ForeignFormatError(f"{name}.weight_zero_point: nonzero zero points in a symmetric scheme")
        weight_zero_point = None
    if symmetric is False and weight_zero_point is None:
        raise ForeignFormatError(f"{name}: an asymmetric compressed-tensors layer without its weight_zero_point")
    g = 1 if group_size == -1 else k // group_size
    if k % 8:
        raise ForeignFormatError(f"{name}: in_features={k} is not a multiple of 8 (its last word would be padding)")
    _check_shape(name, "weight_packed", weight_packed, (n, k // 8), torch.int32)
    _check_shape(name, "weight_scale", weight_scale, (n, g))
    if weight_zero_point is None:
        z = torch.full((n, g), 8, dtype=torch.int16, device=weight_scale.device)
    else:
        _check_shape(name, "weight_zero_point", weight_zero_point, ((n + 7) // 8, g), torch.int32)
        # packed along N: nibble i of word [r, g] is row 8 r + i (the last word padded past N)
        z = nibbles(weight_zero_point.t().contiguous()).reshape(g, -1)[:, :n].t()
    _check_scales(weight_scale, name, "weight_scale")
    perm = _group_order(g_idx, k, group_size, f"{name}.weight_g_idx")
    qweight, perm = _reorder_columns(weight_packed.contiguous(), perm)
    return Canonical(qweight, weight_scale.contiguous(), z.contiguous().to(weight_scale.dtype), perm)


def _group_order(g_idx: Optional[torch.Tensor], k: int, group_size: int, what: str) -> Optional[torch.Tensor]:
    """None where `g_idx` (each input channel's group; None = k // G) makes the groups runs of K; else
    the channel order that does (act-order: GPTQ's desc_act=True and compressed-tensors' actorder
    quantize the channels in order of decreasing activation, G at a time, so each group holds G
    channels scattered over K; sorted by group they are runs of K again)."""
    if g_idx is None:
        return None
    if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise ForeignFormatError(f"{what}: shape {tuple(g_idx.shape)} {g_idx.dtype}, expected integers ({k},)")
    gs = k if group_size == -1 else group_size
    g = k // gs
    gi = g_idx.to(torch.int64)
    if torch.equal(gi, torch.arange(k, device=gi.device) // gs):
        return None
    lo, hi = int(gi.min()), int(gi.max())
    if lo < 0 or hi >= g:
        raise ForeignFormatError(f"{what}: group numbers {lo}..{hi}, expected {g} groups of {gs} numbered 0..{g - 1}"
                                 + (f" ({int((gi < 0).sum())} of the {k} channels negative: not set)" if lo < 0 else ""))
    sizes = torch.bincount(gi, minlength=g)
    if not bool((sizes == gs).all()):
        raise ForeignFormatError(f"{what}: groups of {int(sizes.min())} to {int(sizes.max())} input channels, "
                                 f"expected {g} groups of {gs}")
    return torch.argsort(gi, stable=True)


def _reorder_columns(qweight: torch.Tensor, perm: Optional[torch.Tensor]):
    """Canonical qweight [N, K/8] with its input channels in the order `perm` (or as it is), and perm
    as the layer's int32 input_perm."""
    if perm is None:
        return qweight, None
    n = qweight.shape[0]
    qweight = torch.cat([pack_int4(unpack_int4(qweight[n0:n0 + ROWS_PER_CHUNK])[:, perm])
                         for n0 in range(0, n, ROWS_PER_CHUNK)])
    return qweight, perm.to(torch.int32)


ROWS_PER_CHUNK = 2048  # rows repacked at a time (AWQ; act-order GPTQ): a 151k-row lm_head needs no GBs of temporaries


def _check_scales(scales: torch.Tensor, name: str, what: str = "scales") -> None:
    if not bool(torch.isfinite(scales).all()):
        raise ForeignFormatError(f"{name}.{what} holds NaN or inf")


def quantized_prefixes(keys, weight_key: str = "qweight") -> list:
    """Module names with a `weight_key` tensor (qweight; compressed-tensors' weight_packed) among
    checkpoint keys, in key order."""
    return [k[: -len(weight_key) - 1] for k in keys if k.endswith("." + weight_key)]


def quant_linear_from_canonical(canon: Canonical, in_features: int, out_features: int, group_size: int,
                                bias: Optional[torch.Tensor], dtype: torch.dtype, backend: str = "auto",
                                act: Optional[str] = None):
    """A QuantLinear holding `canon` (and `bias`), on canon's device, its scales and zeros in `dtype`."""
    from .qlinear import QuantLinear

    ql = QuantLinear(in_features, out_features, bias=bias is not None, group_size=group_size, dtype=dtype,
                     device=canon.qweight.device, act=act, backend=backend, input_perm=canon.input_perm is not None)
    with torch.no_grad():
        ql.qweight.copy_(canon.qweight)
        ql.scales.copy_(canon.scales.to(dtype))
        ql.zeros.copy_(canon.zeros.to(dtype))
        if canon.input_perm is not None:
            ql.input_perm.copy_(canon.input_perm)
        if bias is not None:
            ql.bias.copy_(bias.to(dtype))
    return ql


def load_layers(model: nn.Module, files: Dict, fmt: ForeignFormat, load_device, backend: str = "auto",
                progress: bool = True) -> Tuple[set, int]:
    """Replace each Linear of `model` that the checkpoint (`files`: tensor name -> open file) holds in
    int4 by a QuantLinear holding the same numbers in the canonical layout, on the Linear's device (or
    `load_device` for a meta Linear). Returns (the tensor names consumed, the layers' group size)."""
    from .checkpoint import CheckpointMismatchError
    from .patch import _progress, linear_places
    from .qlinear import QuantLinear
    from .quantize import LAYER_DTYPES

    prefixes = quantized_prefixes(files, fmt.weight_key)
    if not prefixes:
        raise CheckpointMismatchError(f"the {fmt.name} checkpoint ({fmt.source}) has no int4 layer (no "
                                      f"'*.{fmt.weight_key}' tensor)")
    tensors = CT_TENSORS if fmt.method == "compressed-tensors" else LAYER_TENSORS
    places = linear_places(model)
    consumed, group_sizes, lossy, made = set(), set(), [], set()
    for name in _progress(prefixes, progress, f"read {fmt.name} layers", "layer"):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointMismatchError(f"checkpoint module {name!r} does not exist in the model") from None
        if id(mod) in made:  # a second name of a shared Linear, replaced at all its places already
            consumed.update(f"{name}.{what}" for what in tensors if f"{name}.{what}" in files)
            continue
        if isinstance(mod, QuantLinear) or not isinstance(mod, nn.Linear):
            raise CheckpointMismatchError(f"checkpoint module {name!r} is a {type(mod).__name__} in the model, not an "
                                          "nn.Linear (load a foreign checkpoint into a model that is not patched)")
        device = mod.weight.device if mod.weight.device.type != "meta" else torch.device(load_device)
        # converted where the layer will live (on a GPU in milliseconds)
        t = {what: files[f"{name}.{what}"].get_tensor(f"{name}.{what}").to(device)
             for what in tensors if f"{name}.{what}" in files}
        needed = (("weight_scale",) + (() if fmt.symmetric else ("weight_zero_point",))
                  if fmt.method == "compressed-tensors" else ("qzeros", "scales"))
        missing = [what for what in needed if what not in t]
        if missing:
            raise CheckpointMismatchError(f"checkpoint module {name!r} has a {fmt.weight_key} but no {missing[0]}")
        gs = layer_group_size(fmt.group_size, mod.in_features, name)
        if fmt.method == "compressed-tensors":
            if "weight_shape" in t and [int(v) for v in t["weight_shape"]] != [mod.out_features, mod.in_features]:
                shape = [int(v) for v in t["weight_shape"]]
                raise CheckpointMismatchError(f"checkpoint module {name!r} is {shape} (weight_shape) but the model's "
                                              f"is {[mod.out_features, mod.in_features]}")
            qweight, scales, zeros, perm = compressed_tensors_to_canonical(
                t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), t.get("weight_g_idx"),
                mod.in_features, mod.out_features, gs, name, symmetric=fmt.symmetric)
        elif fmt.method == "awq":
            qweight, scales, zeros, perm = awq_to_canonical(t["qweight"], t["qzeros"], t["scales"], mod.in_features,
                                                            mod.out_features, gs, name)
        else:
            qweight, scales, zeros, perm = gptq_to_canonical(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                                             mod.in_features, mod.out_features, gs, fmt.zero_offset,
                                                             name)
        dtype = mod.weight.dtype if mod.weight.dtype in LAYER_DTYPES else scales.dtype
        if scales.dtype != dtype and not torch.equal(scales.to(dtype).to(scales.dtype), scales):
            lossy.append(name)
        if "bias" in t:
            _check_shape(name, "bias", t["bias"], (mod.out_features,))
        ql = quant_linear_from_canonical(Canonical(qweight, scales, zeros, perm), mod.in_features, mod.out_features,
                                         gs, t.get("bias"), dtype, backend)
        for parent, attr, _ in places.get(id(mod), ()):
            setattr(parent, attr, ql)
        made.add(id(ql))
        consumed.update(f"{name}.{what}" for what in t)
        group_sizes.add(gs)
    if lossy:
        warnings.warn(f"{len(lossy)} {fmt.name} layer(s) (the first {lossy[0]!r}) hold scales that the model's dtype "
                      "rounds: they were converted to it (load_pretrained_quantized(..., dtype=<the scales' dtype>) "
                      "keeps them exact)", stacklevel=3)
    return consumed, (group_sizes.pop() if len(group_sizes) == 1 else fmt.group_size)
