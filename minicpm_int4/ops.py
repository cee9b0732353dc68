"""The one door to the kernels.

Every op is a `torch.library` custom op in the `minicpm_int4` namespace, declared here in Python so
that it exists on a CPU-only install (where it computes with reference.py), with a fake (meta)
implementation so that `torch.compile(fullgraph=True)` traces through it and CUDA graphs capture
it. The implementation chooses the backend from the `backend` argument, the device and the problem
size; nothing else in the package imports the Triton kernels or the compiled extension.

Public functions (validate, then call the op):
    w4a16_gemm(x, qweight, scales, zeros, bias, group_size, backend, workspace, input_scale, input_perm)
                                                                            -> y [M, N]
    w4a16_workspace(N, device)                                              -> a layer's split-K counters
    quantize_per_token_int8(x, backend, input_scale, input_perm)           -> (x_q int8 [M, K], scale fp32 [M])
    w4a8_gemm(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, backend) -> y [M, N]
    w4a8_linear(x, ..., input_scale, input_perm)                            -> quantize + w4a8_gemm
    (op w4a8_linear: a W4A8 layer's forward, the choice between the two paths by M inside one op)
    quantized_linear(x, ..., act, backend, workspace, input_scale, input_perm)
                                             QuantLinear's forward: the same ops without
                                             re-checking weights that were validated when the layer
                                             was built; in eager inference it calls each op's
                                             implementation (`_*_impl`) directly, skipping the
                                             dispatcher's host cost (eager_fast_path), and goes
                                             through the ops whenever something needs them
                                             (torch.compile / export, fake tensors, autograd, profiler)
"""
# (no `from __future__ import annotations` here: torch < 2.5 builds a custom op's schema from its function's
# annotations as they are, and strings - 'Tensor', 'Optional[Tensor]' - made `import minicpm_int4` fail on torch 2.4)
import contextlib
import functools
import operator
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .config import BACKENDS
from .dispatch import CUDA_CANDIDATES, TRITON_CANDIDATES
from .quantize import LAYER_DTYPES

FLOAT_DTYPES = LAYER_DTYPES  # what the kernels take: the int4 layers' dtypes
# Decode rows (tokens) at or below which the W4A8 path uses the W4A16 decode kernel instead:
# a memory-bound GEMV gains nothing from int8 activations and pays for quantizing them.
W4A8_MIN_M = 17
# An act-order layer's channel order (input_perm) on the CUDA extension: its tensor-core kernel and
# activation quantizer read x through it (True), or x is gathered by torch first (False: a pass and a
# launch of their own; benchmarks/input_scale_cost.py times both, as w4a16.FUSE_INPUT_PERM for Triton).
CUDA_FUSE_INPUT_PERM = True


# ---------------------------------------------------------------------------------------------
# Backend availability
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """Import minicpm_int4.kernels (Triton) or return the reason it is unavailable."""
    try:
        from . import kernels
    except Exception as e:  # ImportError, or triton failing to initialise
        return None, f"Triton kernels unavailable: {type(e).__name__}: {e}"
    return kernels, None


@functools.lru_cache(maxsize=None)
def _cuda_ext():
    """Load the compiled extension minicpm_int4._C or return why it is not there (EXT_ERROR)."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.minicpm_int4_C.*)
    except Exception as e:
        return None, (f"the CUDA extension minicpm_int4._C is not built ({type(e).__name__}: {e}); "
                      "reinstall with a CUDA build of torch and the CUDA toolkit (nvcc) of its CUDA major version: "
                      "MINICPM_INT4_BUILD_CUDA=1 pip install --no-build-isolation -e . (an install without it "
                      "leaves the extension out where it cannot be built; forced, it fails naming why)")
    # an editable install keeps the _C it built until it is reinstalled: one built from an older
    # checkout would take these ops' arguments wrongly, so it is refused by name
    schema = str(torch.ops.minicpm_int4_C.w4a16_gemm.default._schema)
    if "input_perm" not in schema:
        return None, ("the CUDA extension minicpm_int4._C was built from an older checkout (its w4a16_gemm "
                      f"is {schema!r}, without input_perm); rebuild it: "
                      "MINICPM_INT4_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    return torch.ops.minicpm_int4_C, None


def cuda_mma_supported(k: int, group_size: int) -> bool:
    """Whether the CUDA extension's W4A16 tensor-core kernel takes a layer (csrc/w4a16_mma_core.cuh,
    mma_supported): K % 128 == 0 and a group size that is a power of two >= 32, or per channel (= K)."""
    return k % 128 == 0 and (group_size == k or (group_size >= 32 and group_size & (group_size - 1) == 0))


def cuda_wgmma_w4a16_supported(k: int, group_size: int) -> bool:
    """Whether the extension's warpgroup-MMA W4A16 prefill GEMM (csrc/w4a16_wgmma_core.cuh, supported) takes a layer:
    K % 64 == 0 and a group of 32, a power of two from 64 dividing K, or K (per channel)."""
    g = group_size
    return k > 0 and k % 64 == 0 and g > 0 and k % g == 0 and (g == 32 or g == k or (g >= 64 and g & (g - 1) == 0))


def cuda_w4a8_supported(k: int, group_size: int) -> bool:
    """Whether the CUDA W4A8 kernel takes a layer of K input features and this group size (K for per
    channel): K % 16 == 0 (its 16-byte rows of x_q) and a group size that is a multiple of 32 dividing K,
    or K itself (csrc/w4a8_gemm_core.cuh, supported)."""
    return k > 0 and k % 16 == 0 and group_size > 0 and k % group_size == 0 and (group_size % 32 == 0 or group_size == k)


def _cuda_w4a8(k: int, group_size: int):
    """The extension's ops for a W4A8 GEMM of (K, group_size), or a clear error."""
    ext = _cuda_ext()[0]
    if not hasattr(ext, "w4a8_gemm"):
        raise RuntimeError("w4a8_gemm: backend='cuda': the CUDA extension minicpm_int4._C was built from an older "
                           "checkout, without the W4A8 kernel; rebuild it: "
                           "MINICPM_INT4_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    if not cuda_w4a8_supported(k, group_size):
        raise ValueError(f"w4a8_gemm: backend='cuda' needs K % 16 == 0 and a group size that is a multiple of 32 "
                         f"dividing K, or K (per channel); got K={k}, group_size={group_size} (backend='triton' or "
                         "'auto' takes it)")
    return ext


# The W4A16 candidates of dispatch.py that run the extension (CUDA_CANDIDATES): its launcher variant for each
# (csrc/bindings.cpp: 0 = its own choice, 1 = the CUDA-core GEMV, 3 = the tensor-core kernel requesting W two
# chunks ahead, 4 = it with W through a ring in shared memory, 5 = the warpgroup-MMA prefill GEMM, 6 = it with a tile
# a CTA, its split-K off), and whether the variant takes only plain x (no
# input scale or channel order) on the tensor-core kernel's layouts (cuda_mma_supported) - elsewhere variant 0
W4A16_CUDA_VARIANTS = {"cuda": (0, False), "cuda-gemv": (1, False), "cuda-ahead2": (3, True), "cuda-ring": (4, True),
                       "cuda-wgmma": (5, False), "cuda-wgmma-nosplit": (6, False)}
# the W4A16 candidates that run the warpgroup-MMA prefill GEMM (sm_90a; the layers cuda_wgmma_w4a16_supported takes)
W4A16_WGMMA_CANDIDATES = ("cuda-wgmma", "cuda-wgmma-nosplit")
# The activation quantizer's Triton candidates of dispatch.py and the warps a row each runs with (None: the
# kernel's own choice, kernels/act_quant.py)
ACT_QUANT_TRITON_WARPS = {"triton": None, "triton-4w": 4, "triton-16w": 16}
# The W4A8 candidates of dispatch.py that run the extension's GEMM, and its (block_rows, kernel) arguments for each
# (csrc/bindings.cpp: 0 = the launcher's choice; kernel 1 = mma.sync, 2 = warpgroup MMA)
W4A8_CUDA_ARGS = {"cuda": (0, 0), "cuda-mma": (0, 1), "cuda-m64": (64, 1), "cuda-t64": (64, 2), "cuda-t128": (128, 2)}


@functools.lru_cache(maxsize=None)
def _w4a8_wgmma_tokens(device_index: int) -> frozenset:
    """The block tokens the extension's warpgroup-MMA W4A8 kernel may be forced to on this GPU: what its
    `_C.w4a8_kernel()` reports there (an sm_90a build on an H100 / H200, not turned off by
    MINICPM_INT4_W4A8_WGMMA), so that "auto" never forces it where the op would refuse."""
    try:
        from . import _C

        with torch.cuda.device(device_index):
            what = _C.w4a8_kernel()
    except (ImportError, AttributeError, RuntimeError):
        return frozenset()
    if what.startswith("wgmma (warpgroup MMA"):
        return frozenset((64, 128))
    if what.startswith("wgmma, 128-token blocks only"):
        return frozenset((128,))
    return frozenset()


@functools.lru_cache(maxsize=None)
def cuda_wgmma_w4a16_runs(device_index: int) -> bool:
    """Whether the extension's warpgroup-MMA W4A16 prefill GEMM runs on this GPU: what its
    `_C.w4a16_prefill_kernel()` reports there (an sm_90a build on an H100 / H200, not turned off by
    MINICPM_INT4_W4A16_WGMMA=0), so that "auto" never asks for it where the op would refuse."""
    try:
        from . import _C

        with torch.cuda.device(device_index):
            return _C.w4a16_prefill_kernel().startswith("wgmma")
    except (ImportError, AttributeError, RuntimeError):
        return False


def triton_interpreter_active() -> bool:
    kernels, _ = _triton_kernels()
    return kernels is not None and kernels.INTERPRET


def cuda_extension_error() -> Optional[str]:
    return _cuda_ext()[1]


def resolve_backend(backend: str, device: torch.device, op: str, shape=None) -> str:
    """Map a requested backend to the one that will run, or raise a clear error.

    Meta tensors always take "torch" (shapes only).
    "auto": CUDA tensors -> "triton", or what dispatch.py's measured table says is faster for this
    GPU and `shape` - W4A16's (M, N, K): "cuda" or one of its variants (the extension, when built:
    W4A16_CUDA_VARIANTS - its CUDA-core GEMV, its tensor-core kernel with W two chunks ahead or through a ring
    in shared memory), or a variant of the Triton kernels
    (dispatch.TRITON_CANDIDATES: at M = 1 "triton-tc", the tensor-core decode kernel instead of the GEMV, or
    the GEMV prefetching / unsplit; at 2..16 the decode kernel's long trip; at M > 16 "triton-dq", the weight
    dequantized by a Triton kernel then torch's matmul, or the prefill tile as x @ W.T), or at M > 16 "cuda-wgmma"
    (the extension's warpgroup-MMA prefill GEMM, where it takes the layer and runs on this GPU; split-K over
    clusters of CTAs where its tiles are too few for the SMs) or "cuda-wgmma-nosplit" (it with a tile a CTA); the
    activation quantizer's (M, K): "cuda" or the Triton kernel with 4 / 16 warps a row where measured faster;
    the W4A8 GEMM's (M, N, K, group size): the CUDA GEMM (its launcher's choice or a kernel / block size
    forced: W4A8_CUDA_ARGS) where it takes the layer, or the Triton one with each group's K steps unrolled
    ("triton-flat"), where measured faster; CPU tensors -> "torch".
    "triton" on CPU runs only under TRITON_INTERPRET=1; it never falls back silently to the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch" or device.type == "meta":
        # meta tensors carry shapes, no data (a model built under init_empty_weights / on "meta"):
        # the reference computes the output's shape whatever backend the layer asks for
        return "torch"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        triton_ok = _triton_kernels()[0] is not None
        if shape is not None:
            from .dispatch import act_quant_auto_backend, w4a16_auto_backend, w4a8_auto_backend

            ext = _cuda_ext()[0]
            ext_ok = ext is not None
            if op == "quantize_per_token_int8":  # shape (M, K)
                pick = act_quant_auto_backend(*shape, device.index or 0, ext_ok)
                if pick == "cuda" or (pick in ACT_QUANT_TRITON_WARPS and triton_ok):
                    return pick
            elif op == "w4a8_gemm":  # shape (M, N, K, group size): the CUDA kernels where they take the layer
                m, n, k, g = shape
                cuda_ok = ext_ok and hasattr(ext, "w4a8_gemm") and cuda_w4a8_supported(k, g)
                pick = w4a8_auto_backend(m, n, k, g, device.index or 0, cuda_ok,
                                         wgmma_tokens=_w4a8_wgmma_tokens(device.index or 0) if cuda_ok else ())
                if pick in W4A8_CUDA_ARGS or (pick == "triton-flat" and triton_ok):
                    return pick
            else:  # W4A16, shape (M, N, K)
                pick = w4a16_auto_backend(*shape, device.index or 0, ext_ok)
            if pick in CUDA_CANDIDATES or (pick in TRITON_CANDIDATES and triton_ok):
                return pick
        return "triton" if triton_ok else "torch"
    if backend == "triton":
        kernels, why = _triton_kernels()
        if kernels is None:
            raise RuntimeError(f"{op}: backend='triton' requested but {why}")
        if device.type != "cuda" and not kernels.INTERPRET:
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (got {device}); on CPU the Triton kernels run only "
                "in the interpreter: set TRITON_INTERPRET=1 before importing minicpm_int4")
        if kernels.INTERPRET and kernels.interpreter_problem():
            raise RuntimeError(f"{op}: backend='triton' in the interpreter: {kernels.interpreter_problem()}")
        return "triton"
    # backend == "cuda"
    if device.type != "cuda":
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    ext, why = _cuda_ext()
    if ext is None:
        raise RuntimeError(f"{op}: backend='cuda' requested but {why}")
    return "cuda"


_autocast_available = getattr(torch.amp, "is_autocast_available",
                              lambda device_type: device_type in ("cpu", "cuda", "xpu", "hpu", "mps"))


def autocast_enabled(device: torch.device) -> bool:
    """Whether torch.autocast is on for `device`; False for device types autocast does not know (meta,
    where torch.is_autocast_enabled raises)."""
    return _autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _reference(device: torch.device, fn, *args):
    """A reference.py function as the "torch" backend: with autocast off, which would otherwise run
    its fp32 matmuls in fp16 / bf16 (the kernels, being custom ops, are untouched by autocast)."""
    if autocast_enabled(device):
        with torch.autocast(device.type, enabled=False):
            return fn(*args)
    return fn(*args)


# ---------------------------------------------------------------------------------------------
# Input checks (clear errors instead of crashes inside kernels); shape-only, no host sync
# ---------------------------------------------------------------------------------------------
def _check_weight(op: str, k: int, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                  device: torch.device) -> int:
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    try:
        if isinstance(group_size, bool):
            raise TypeError
        group_size = operator.index(group_size)  # an int, or a numpy / torch integer scalar
    except TypeError:
        raise TypeError(f"{op}: group_size must be an int (32, 64, 128 or -1), got {type(group_size).__name__} "
                        f"{group_size!r}") from None
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"{op}: qweight must be int32 [N, K//8], got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[0]
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"{op}: x has K={k} input features but qweight {tuple(qweight.shape)} packs K={qweight.shape[1] * 8}")
    gs = k if group_size == -1 else group_size
    if gs not in (32, 64, 128) and gs != k:
        raise ValueError(f"{op}: group_size={group_size} is not supported (32, 64, 128, or -1 / K for per channel)")
    if k % gs:
        raise ValueError(f"{op}: K={k} is not divisible by group_size={group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (n, k // gs):
            raise ValueError(f"{op}: {name} must have shape [N={n}, K/group_size = {k}/{gs} = {k // gs}], "
                             f"got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be fp16/bf16/fp32, got {t.dtype}")
    if zeros.dtype != scales.dtype:
        raise TypeError(f"{op}: zeros dtype {zeros.dtype} differs from scales dtype {scales.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {device}")
        _check_contiguous(op, name, t)
    return gs


def _check_contiguous(op: str, name: str, t: Tensor) -> None:
    """The kernels read a weight's tensors (and the bias) row-major with unit stride: a view with other strides
    (a transpose, a column slice) would be read as if it were not one - a wrong result, not an error. Not copied
    here: a copy a call of the whole weight would cost more than the GEMM; QuantLinear keeps its own contiguous."""
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (row-major), got a view of shape {tuple(t.shape)} with "
                         f"strides {t.stride()}: make it contiguous once (.contiguous()), not in every call")


def _check_bias_type(op: str, bias) -> None:
    """Before the weight's checks: ops.w4a16_gemm(x, qweight, scales, zeros, 64), the group size given where
    the bias goes, would otherwise be reported as scales of the wrong shape for the default group size."""
    if bias is not None and not isinstance(bias, Tensor):
        positional_group_size = isinstance(bias, int) and not isinstance(bias, bool)
        hint = " (group_size comes after bias: pass it as group_size=...)" if positional_group_size else ""
        raise TypeError(f"{op}: bias must be a tensor [N] or None, got {type(bias).__name__} {bias!r}{hint}")


def _check_bias(op: str, bias: Optional[Tensor], n: int, dtype: torch.dtype, device: torch.device) -> None:
    """Shape, dtype and device; its type was checked first (_check_bias_type)."""
    if bias is None:
        return
    if bias.shape != (n,):
        raise ValueError(f"{op}: bias must have shape [N={n}], got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} differs from the output dtype {dtype}")
    if bias.device != device:
        raise ValueError(f"{op}: bias is on {bias.device} but the input is on {device}")
    _check_contiguous(op, "bias", bias)


def _check_x(op: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected 2-D activations [M, K], got shape {tuple(x.shape)}")


def _check_input_scale(op: str, input_scale: Optional[Tensor], x: Tensor) -> None:
    """Shape, dtype and device of a per-input-channel scale; its values (finite, positive) are the
    caller's to keep (QuantLinear checks them once, when the layer is made): no host sync here."""
    if input_scale is None:
        return
    k = x.shape[1]
    if not isinstance(input_scale, Tensor) or input_scale.shape != (k,):
        got = tuple(input_scale.shape) if isinstance(input_scale, Tensor) else type(input_scale).__name__
        raise ValueError(f"{op}: input_scale must have shape [K={k}] (one multiplier per input channel), got {got}")
    if input_scale.dtype != x.dtype:
        raise TypeError(f"{op}: input_scale is {input_scale.dtype} but the activations are {x.dtype} "
                        "(x * input_scale is computed in the activations' dtype)")
    if input_scale.device != x.device:
        raise ValueError(f"{op}: input_scale is on {input_scale.device} but the input is on {x.device}")


def _check_input_perm(op: str, input_perm: Optional[Tensor], x: Tensor) -> None:
    """Shape, dtype and device of an act-order layer's channel order (QuantLinear.input_perm); that it
    is a permutation of 0..K-1 is the caller's to keep, as the input scale's values are (QuantLinear
    checks it when it is loaded, check_input_perm): no host sync here."""
    if input_perm is None:
        return
    k = x.shape[1]
    if not isinstance(input_perm, Tensor) or input_perm.shape != (k,):
        got = tuple(input_perm.shape) if isinstance(input_perm, Tensor) else type(input_perm).__name__
        raise ValueError(f"{op}: input_perm must have shape [K={k}] (the input channel of each weight column), "
                         f"got {got}")
    if input_perm.dtype != torch.int32:
        raise TypeError(f"{op}: input_perm must be int32, got {input_perm.dtype}")
    if input_perm.device != x.device:
        raise ValueError(f"{op}: input_perm is on {input_perm.device} but the input is on {x.device}")


def _gathered(x: Tensor, input_perm: Optional[Tensor]) -> Tensor:
    """x[:, input_perm], in a pass of its own (for the kernels that do not read x through it)."""
    return x if input_perm is None else x.index_select(1, input_perm)


# ---------------------------------------------------------------------------------------------
# W4A16
# ---------------------------------------------------------------------------------------------
def _w4a16_gemm_impl(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                     group_size: int, backend: str, workspace: Optional[Tensor] = None,
                     input_scale: Optional[Tensor] = None, input_perm: Optional[Tensor] = None) -> Tensor:
    be = resolve_backend(backend, x.device, "w4a16_gemm", shape=(x.shape[0], qweight.shape[0], x.shape[1]))
    if be in W4A16_WGMMA_CANDIDATES and not (cuda_wgmma_w4a16_supported(x.shape[1], group_size)
                                   and cuda_wgmma_w4a16_runs(x.device.index or 0)):
        # the table's pick for this shape (measured at the bench's group size), for a layer the kernel does not take
        # or where it does not run (an extension built without sm_90a, or turned off): the Triton kernels
        be = "triton"
    if be == "triton" or be in TRITON_CANDIDATES:
        # the kernels multiply the input scale into x as they load it (prefill on sm_90; elsewhere first),
        # and the decode kernels read x through input_perm (prefill gathers first). A variant the table picked
        # (dispatch.py) changes one of the Triton module's settings for this call; not "triton-tc" without the
        # layer's workspace (it was measured in one launch with it: without one, the GEMV), nor "triton-dq" for an
        # fp32 layer (the table's rows are fp16's; an fp32 matmul would follow the user's TF32 setting, where the
        # fused kernel is exact fp32)
        variant = None if be == "triton" or (be == "triton-tc" and workspace is None) or (
            be == "triton-dq" and x.dtype == torch.float32) else be
        with _on_device(x.device):
            return _triton_kernels()[0].w4a16_gemm_triton(x, qweight, scales, zeros, bias, group_size, workspace,
                                                          input_scale=input_scale, input_perm=input_perm,
                                                          variant=variant)
    if be in CUDA_CANDIDATES:  # the CUDA kernels multiply the input scale into x as they load it, and the
        # tensor-core kernel reads x through input_perm (the bindings gather first where it does not)
        if not CUDA_FUSE_INPUT_PERM:
            x, input_perm = _gathered(x, input_perm), None
        # a variant the table picked for this shape (W4A16_CUDA_VARIANTS): its launcher variant where it takes the
        # layer - the lookahead ones plain x and the tensor-core kernel's layouts - else the extension's own choice
        variant, plain_tc_only = W4A16_CUDA_VARIANTS[be]
        if plain_tc_only and not (input_scale is None and input_perm is None
                                  and cuda_mma_supported(x.shape[1], group_size)):
            variant = 0
        return _cuda_ext()[0].w4a16_gemm(x, qweight, scales, zeros, bias, group_size, variant, input_scale,
                                         input_perm)
    x = _gathered(x, input_perm)  # the reference takes x gathered
    if input_scale is not None:  # the reference takes x * m (a pass of its own)
        x = x * input_scale
    return _reference(x.device, reference.w4a16_gemm_ref, x, qweight, scales, zeros, bias, group_size)


def _linear_fake(x, qweight, scales, zeros, bias, group_size, backend, workspace=None, input_scale=None,
                 input_perm=None):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _w4a16_setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, group_size, backend, workspace, input_scale, input_perm = inputs
    ctx.save_for_backward(qweight, scales, zeros, input_scale, input_perm)
    ctx.group_size, ctx.x_dtype, ctx.has_bias = group_size, x.dtype, bias is not None


def _w4a16_backward(ctx, grad):
    """The weights are frozen (int4); gradients flow to the input (and bias), so a patched model
    can still be fine-tuned through adapters or differentiated w.r.t. its inputs."""
    qweight, scales, zeros, input_scale, input_perm = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = reference.dequantize_ref(qweight, scales, zeros, ctx.group_size, out_dtype=ctx.x_dtype)
        grad_x = grad.float() @ w.float()
        if input_scale is not None:  # y = (x[:, perm] * m) @ W.T
            grad_x = grad_x * input_scale.float()
        if input_perm is not None:  # column j of the gathered x is channel perm[j] of x
            grad_x = torch.empty_like(grad_x).index_copy_(1, input_perm.long(), grad_x)
        grad_x = grad_x.to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.float().sum(0).to(grad.dtype)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None


def _linear_op(name: str, impl):
    """A custom op y[M, N] = f(x[M, K][:, input_perm] * input_scale, the layer's int4 weight, bias) with
    the signature of `impl`, the shapes-only fake and the W4A16 backward (the frozen int4 weight's x- and
    bias-gradients; input_scale and input_perm, buffers, get none).

    The workspace is not declared mutated: the kernel counts into it during the call and leaves every
    element at zero again, so no caller can observe a change (opcheck compares it before and after)."""
    def op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
           group_size: int, backend: str, workspace: Optional[Tensor] = None,
           input_scale: Optional[Tensor] = None, input_perm: Optional[Tensor] = None) -> Tensor:
        return impl(x, qweight, scales, zeros, bias, group_size, backend, workspace, input_scale, input_perm)

    op.__name__ = op.__qualname__ = name
    op = torch.library.custom_op(f"minicpm_int4::{name}", op, mutates_args=())
    op.register_fake(_linear_fake)
    op.register_autograd(_w4a16_backward, setup_context=_w4a16_setup_context)
    return op


_w4a16_gemm_op = _linear_op("w4a16_gemm", _w4a16_gemm_impl)

# Rows of W per split-K counter: the row tile of the Triton GEMV when it splits K (the decode kernel's is 64).
WORKSPACE_ROWS_PER_COUNTER = 16


def w4a16_workspace_numel(out_features: int) -> int:
    """int32 elements of the workspace w4a16_gemm takes for a layer with `out_features` rows."""
    return -(-out_features // WORKSPACE_ROWS_PER_COUNTER)


def w4a16_workspace(out_features: int, device=None) -> Tensor:
    """Zeroed split-K counters for one layer (QuantLinear keeps one as a buffer). With it, the Triton
    decode kernels (the M = 1 GEMV where it splits K, and 2 <= M <= 16) finish a K split in one launch:
    the last program of each row tile
    to arrive reduces the partial sums (in a fixed order: the result is the same bits as without it)
    and sets its counter back to zero. Allocate it outside CUDA-graph capture; do not share one
    between calls that can run at the same time (two streams)."""
    return torch.zeros(w4a16_workspace_numel(out_features), dtype=torch.int32, device=device)


def _check_workspace(op: str, workspace: Optional[Tensor], n: int, device: torch.device) -> None:
    if workspace is None:
        return
    if not isinstance(workspace, Tensor) or workspace.dtype != torch.int32 or not workspace.is_contiguous():
        raise TypeError(f"{op}: workspace must be a contiguous int32 tensor (ops.w4a16_workspace), "
                        f"got {getattr(workspace, 'dtype', type(workspace).__name__)}")
    if workspace.numel() < w4a16_workspace_numel(n):
        raise ValueError(f"{op}: workspace has {workspace.numel()} elements; a layer with N={n} outputs needs "
                         f"{w4a16_workspace_numel(n)} (ops.w4a16_workspace(N))")
    if workspace.device != device:
        raise ValueError(f"{op}: workspace is on {workspace.device} but the input is on {device}")


def w4a16_gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor] = None,
               group_size: int = 128, backend: str = "auto", workspace: Optional[Tensor] = None,
               input_scale: Optional[Tensor] = None, input_perm: Optional[Tensor] = None) -> Tensor:
    """y = x @ dequant(qweight, scales, zeros).T + bias, or (x[:, input_perm] * input_scale) @ ... with an
    input scale and / or a channel order.

    Args:
        x: [M, K] fp16/bf16/fp32 activations (any strides). qweight: int32 [N, K // 8] (packing.py).
        scales, zeros: [N, K // group_size] in x's dtype. bias: [N] in x's dtype or None. The weight's
        tensors and the bias contiguous (a view with other strides is refused, not copied every call).
        group_size: 32/64/128, or -1 for per output channel.
        workspace: optional `w4a16_workspace(N, device)`: split-K decode in one launch instead of two
            (same result). It must hold zeros, and the call leaves it so.
        input_scale: optional [K] in x's dtype, a multiplier per input channel (QuantLinear.input_scale):
            y = (x * input_scale) @ ..., the product rounded to x's dtype; the Triton decode kernels
            (M <= 16), Triton prefill on sm_90 and the CUDA kernels multiply it into x as they load it;
            Triton prefill elsewhere and the reference get x * input_scale.
        input_perm: optional int32 [K], a permutation of 0..K-1 (QuantLinear.input_perm, an act-order
            checkpoint's channel order): weight column j multiplies x[:, input_perm[j]] (the input scale
            is in column order). The Triton decode kernels (M <= 16) and the CUDA tensor-core kernel (a
            layer without an input scale) read x through it; the other paths gather first. Not checked to
            be a permutation here (no host sync): QuantLinear checks its own.
    Returns:
        y: [M, N] in x's dtype.
    Example:
        >>> y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, layer.bias, 128)
    """
    _check_x("w4a16_gemm", x)
    _check_bias_type("w4a16_gemm", bias)
    gs = _check_weight("w4a16_gemm", x.shape[1], qweight, scales, zeros, group_size, x.device)
    if scales.dtype != x.dtype:
        raise TypeError(f"w4a16_gemm: activations are {x.dtype} but the weight scales are {scales.dtype}; "
                        "cast the input or quantize the layer in the input's dtype")
    _check_bias("w4a16_gemm", bias, qweight.shape[0], x.dtype, x.device)
    _check_workspace("w4a16_gemm", workspace, qweight.shape[0], x.device)
    _check_input_scale("w4a16_gemm", input_scale, x)
    _check_input_perm("w4a16_gemm", input_perm, x)
    return _w4a16_gemm_op(x.contiguous(), qweight, scales, zeros, bias, gs, backend, workspace,
                          None if input_scale is None else input_scale.contiguous(),
                          None if input_perm is None else input_perm.contiguous())


_NO_CONTEXT = contextlib.nullcontext()


def _on_device(device: torch.device):
    """A Triton kernel launches on the current CUDA device, on its current stream: for tensors on another GPU (a model
    on cuda:1, or split over GPUs by a device_map) that device is made the current one for the call, as torch's own
    ops and the CUDA extension's bindings (a device guard) do - else Triton refused their pointers ("cannot be
    accessed from Triton") or, between GPUs with peer access, read them across the link. One device query where the
    tensors are on the current device (the common case)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _NO_CONTEXT


def _dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, gs: int, out_dtype: Optional[torch.dtype]) -> Tensor:
    """reference.dequantize_ref's bits: on CUDA by the Triton kernel (one pass, where the reference makes
    several of N x K temporaries), elsewhere (or without Triton) by the reference."""
    if qweight.is_cuda and not triton_interpreter_active():
        kernels = _triton_kernels()[0]
        if kernels is not None:
            from .kernels.w4a16 import dequantize_triton

            with _on_device(qweight.device):
                return dequantize_triton(qweight, scales, zeros, gs, out_dtype)
    return reference.dequantize_ref(qweight, scales, zeros, gs, out_dtype)


def dequantize(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The [N, K] weight the kernels compute with, (q - z) * s rounded once to out_dtype (default the
    scales' dtype): reference.dequantize_ref's bits, computed by a Triton kernel on CUDA. The weight's tensors
    are checked as w4a16_gemm checks them (the device: qweight's)."""
    is_2d = isinstance(qweight, Tensor) and qweight.dim() == 2  # (else _check_weight names what qweight is)
    gs = _check_weight("dequantize", qweight.shape[1] * 8 if is_2d else 0, qweight, scales, zeros, group_size,
                       qweight.device if is_2d else None)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize: out_dtype must be fp16/bf16/fp32 or None (the scales' dtype), got {out_dtype}")
    return _dequantize(qweight, scales, zeros, gs, out_dtype)


# ---------------------------------------------------------------------------------------------
# Dynamic per-token int8 activation quantization
# ---------------------------------------------------------------------------------------------
def _quantize_per_token_int8_impl(x: Tensor, backend: str, input_scale: Optional[Tensor] = None,
                                  input_perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    be = resolve_backend(backend, x.device, "quantize_per_token_int8", shape=tuple(x.shape))
    if be in ACT_QUANT_TRITON_WARPS:  # the input scale multiplied, and x gathered, inside the one pass over x
        with _on_device(x.device):
            return _triton_kernels()[0].quantize_per_token_int8_triton(x, input_scale, input_perm,
                                                                       warps=ACT_QUANT_TRITON_WARPS[be])
    if be == "cuda":  # the input scale multiplied, or x read through input_perm, in the CUDA quantizer's pass
        if not CUDA_FUSE_INPUT_PERM:
            x, input_perm = _gathered(x, input_perm), None
        return _cuda_ext()[0].quantize_per_token_int8(x, input_scale, input_perm)
    x = _gathered(x, input_perm)
    return _reference(x.device, reference.quantize_per_token_int8_ref, x, input_scale)


@torch.library.custom_op("minicpm_int4::quantize_per_token_int8", mutates_args=())
def _quantize_per_token_int8_op(x: Tensor, backend: str, input_scale: Optional[Tensor] = None,
                                input_perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _quantize_per_token_int8_impl(x, backend, input_scale, input_perm)


@_quantize_per_token_int8_op.register_fake
def _(x, backend, input_scale=None, input_perm=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def quantize_per_token_int8(x: Tensor, backend: str = "auto", input_scale: Optional[Tensor] = None,
                            input_perm: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-row symmetric int8: returns (x_q int8 [M, K], scale fp32 [M]) with x ~= x_q * scale[:, None].

    scale = max|x_row| / 127; x_q = round(x / scale) clamped to [-127, 127]; a zero row gives
    scale 0 and x_q 0. `input_scale` ([K], x's dtype): quantize x * input_scale instead (computed in
    x's dtype), in the same pass over x on the Triton and CUDA backends (the bits of quantizing
    `x * input_scale`). `input_perm` (int32 [K], a permutation; w4a16_gemm's): quantize x[:, input_perm]
    (times the scale), gathered inside the Triton and CUDA quantizers' pass (CUDA: unless the layer also has an
    input scale), before the reference's.
    """
    _check_x("quantize_per_token_int8", x)
    _check_input_scale("quantize_per_token_int8", input_scale, x)
    _check_input_perm("quantize_per_token_int8", input_perm, x)
    return _quantize_per_token_int8_op(x.contiguous(), backend,
                                       None if input_scale is None else input_scale.contiguous(),
                                       None if input_perm is None else input_perm.contiguous())


# ---------------------------------------------------------------------------------------------
# W4A8
# ---------------------------------------------------------------------------------------------
def _w4a8_gemm_impl(x_q: Tensor, x_scale: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                    bias: Optional[Tensor], group_size: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    be = resolve_backend(backend, x_q.device, "w4a8_gemm", shape=(x_q.shape[0], qweight.shape[0], x_q.shape[1], group_size))
    if be in ("triton", "triton-flat"):  # ("triton-flat": each group's K steps unrolled, the same bits)
        with _on_device(x_q.device):
            return _triton_kernels()[0].w4a8_gemm_triton(x_q, x_scale, qweight, scales, zeros, bias, group_size,
                                                         out_dtype, flat=True if be == "triton-flat" else None)
    if be in W4A8_CUDA_ARGS:  # the int8 mma.sync / wgmma kernels (csrc/w4a8_gemm.cu, w4a8_wgmma.cu): the reference's bits
        return _cuda_w4a8(x_q.shape[1], group_size).w4a8_gemm(x_q, x_scale, qweight, scales, zeros, bias, group_size,
                                                              out_dtype, *W4A8_CUDA_ARGS[be])
    return _reference(x_q.device, reference.w4a8_gemm_ref, x_q, x_scale, qweight, scales, zeros, bias, group_size,
                      out_dtype)


@torch.library.custom_op("minicpm_int4::w4a8_gemm", mutates_args=())
def _w4a8_gemm_op(x_q: Tensor, x_scale: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
                  bias: Optional[Tensor], group_size: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    return _w4a8_gemm_impl(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, backend)


@_w4a8_gemm_op.register_fake
def _(x_q, x_scale, qweight, scales, zeros, bias, group_size, out_dtype, backend):
    return x_q.new_empty((x_q.shape[0], qweight.shape[0]), dtype=out_dtype)


def w4a8_gemm(x_q: Tensor, x_scale: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor,
              bias: Optional[Tensor] = None, group_size: int = 128, out_dtype: torch.dtype = torch.float16,
              backend: str = "auto") -> Tensor:
    """y = x_scale[:, None] * (x_q @ (q - z).T per group, times scales) + bias, int32 accumulation.

    Args: x_q int8 [M, K]; x_scale fp32 [M]; weight as for w4a16_gemm; out_dtype fp16/bf16/fp32.
    """
    op = "w4a8_gemm"
    for name, t in (("x_q", x_q), ("x_scale", x_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if x_q.dtype != torch.int8 or x_q.dim() != 2:
        raise TypeError(f"{op}: x_q must be int8 [M, K], got {x_q.dtype} {tuple(x_q.shape)}")
    if x_scale.dtype != torch.float32 or x_scale.shape != (x_q.shape[0],):
        raise TypeError(f"{op}: x_scale must be fp32 [M={x_q.shape[0]}], got {x_scale.dtype} {tuple(x_scale.shape)}")
    if x_scale.device != x_q.device:
        raise ValueError(f"{op}: x_scale is on {x_scale.device} but x_q is on {x_q.device}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be fp16/bf16/fp32, got {out_dtype}")
    _check_bias_type(op, bias)
    gs = _check_weight(op, x_q.shape[1], qweight, scales, zeros, group_size, x_q.device)
    _check_bias(op, bias, qweight.shape[0], out_dtype, x_q.device)
    return _w4a8_gemm_op(x_q.contiguous(), x_scale.contiguous(), qweight, scales, zeros, bias, gs, out_dtype, backend)


def _w4a8_linear_impl(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                      group_size: int, backend: str, workspace: Optional[Tensor] = None,
                      input_scale: Optional[Tensor] = None, input_perm: Optional[Tensor] = None) -> Tensor:
    """A W4A8 layer's forward: decode rows (M < W4A8_MIN_M) on the W4A16 kernel, else per-token int8
    activations and the int8 GEMM. The choice by M is made here, inside one op, so that a traced graph
    (torch.compile with a dynamic batch, torch.export) holds no guard on M: one graph serves decode
    and prefill. An input scale is multiplied into x inside the activation quantizer's one pass over
    x, so a W4A8 layer's input scale costs no pass of its own there (nor its input_perm)."""
    if x.shape[0] < W4A8_MIN_M:
        return _w4a16_gemm_impl(x, qweight, scales, zeros, bias, group_size, backend, workspace, input_scale,
                                input_perm)
    x_q, x_scale = _quantize_per_token_int8_impl(x, backend, input_scale, input_perm)
    return _w4a8_gemm_impl(x_q, x_scale, qweight, scales, zeros, bias, group_size, x.dtype, backend)


# Gradients as for W4A16 (y = x @ dequant(W).T + b): the int8 rounding of the activations passes the
# gradient straight through, as quantization-aware training does.
_w4a8_linear_op = _linear_op("w4a8_linear", _w4a8_linear_impl)


def w4a8_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor] = None,
                group_size: int = 128, backend: str = "auto", input_scale: Optional[Tensor] = None,
                input_perm: Optional[Tensor] = None) -> Tensor:
    """W4A8 for fp activations: quantize x (or x[:, input_perm] * input_scale, as in w4a16_gemm) per
    token, then the int8 x int4 GEMM.

    For M < W4A8_MIN_M (decode) it uses the W4A16 kernel: the GEMV is memory-bound, and int8
    activations would only add the quantization pass and its rounding error.
    """
    op = "w4a8_linear"
    _check_x(op, x)
    _check_bias_type(op, bias)
    gs = _check_weight(op, x.shape[1], qweight, scales, zeros, group_size, x.device)
    if scales.dtype != x.dtype:
        raise TypeError(f"{op}: activations are {x.dtype} but the weight scales are {scales.dtype}")
    _check_bias(op, bias, qweight.shape[0], x.dtype, x.device)
    _check_input_scale(op, input_scale, x)
    _check_input_perm(op, input_perm, x)
    return quantized_linear(x.contiguous(), qweight, scales, zeros, bias, gs, "int8", backend,
                            input_scale=None if input_scale is None else input_scale.contiguous(),
                            input_perm=None if input_perm is None else input_perm.contiguous())


# How many torch dispatch modes (fake tensors, functionalization, proxy tracing, a flop counter) are active: the
# C++ mode stack itself, not torch.utils._python_dispatch's Python flag, which torch 2.4 leaves set after a
# FakeTensorMode exits (every later eager call then took the dispatcher). Bound once: eager_fast_path runs per forward.
_dispatch_modes = torch._C._len_torch_dispatch_stack


def eager_fast_path(x: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether a layer's call may skip the torch.library dispatcher and call the implementation
    directly. The custom op costs more host time than the kernel launch it wraps (Python-side
    autograd and dispatch: ~30 us per call on a slow CPU, for a decode GEMM of a few us on the
    GPU), and an eager decode step makes hundreds of such calls. It is skipped only when nothing
    needs it: a plain tensor (no FakeTensor / FunctionalTensor / other subclass), no torch.compile
    or export tracing (nor torch.jit.trace), no dispatch mode (fake, functionalization, flop
    counters), no autograd graph to record (no grad mode, or nothing requiring grad), and no
    profiler (whose traces name the op). Everything else - compile, export, opcheck, gradients -
    goes through the op."""
    return (type(x) is Tensor and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and not _dispatch_modes() and not torch.autograd._profiler_enabled() and not torch.jit.is_tracing())


def quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bias: Optional[Tensor],
                     group_size: int, act: Optional[str], backend: str,
                     workspace: Optional[Tensor] = None, input_scale: Optional[Tensor] = None,
                     input_perm: Optional[Tensor] = None) -> Tensor:
    """The forward of an already validated layer (QuantLinear checks its buffers once, at build):
    straight to the ops, no per-call re-validation of the weights. x: contiguous [M, K] in the
    layer's dtype on its device; group_size: positive (K for per-channel); workspace: the layer's
    w4a16_workspace or None; input_scale: the layer's [K] multiplier or None; input_perm: its int32 [K]
    channel order (act-order) or None. Eager inference calls
    the implementations directly (eager_fast_path); the results are the op's, bit for bit.

    The input scale goes into the op: the decode kernels (Triton and CUDA), the activation quantizers
    and on sm_90 Triton's prefill multiply it into x as they load it (no pass of its own); before
    Triton prefill elsewhere and the reference the op multiplies first. Likewise the Triton decode
    kernels and activation quantizer, and the CUDA tensor-core kernel and quantizer (for a layer
    without an input scale), read x through input_perm; the other paths gather x first."""
    direct = eager_fast_path(x, bias)
    if act == "int8":
        return (_w4a8_linear_impl if direct else _w4a8_linear_op)(x, qweight, scales, zeros, bias, group_size,
                                                                   backend, workspace, input_scale, input_perm)
    w4a16 = _w4a16_gemm_impl if direct else _w4a16_gemm_op
    return w4a16(x, qweight, scales, zeros, bias, group_size, backend, workspace, input_scale, input_perm)
