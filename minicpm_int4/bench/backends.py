"""What `minicpm-int4 bench` times: fp16 torch.matmul, our backends, and the peers that are installed.

A backend prepares its weight once from an fp weight [N, K] (quantizing it its own way), then maps
x [M, K] -> y [M, N]. `available()` returns None or the reason it is skipped; `supports(m)` says
which M it serves. Bytes are counted per operand (Marlin's habit), so a memory-bound kernel is
judged against the measured copy bandwidth.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..dispatch import CUDA_MAX_M
from ..packing import num_groups, pack_int4
from ..quantize import quantize_rtn


@dataclass
class Prepared:
    run: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int
    reference: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # what run() computes, exactly
    tolerance: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None  # (x, y_ref) -> bound


class Backend:
    name = "?"
    family = "?"        # "fp16", "ours", "peer"
    is_variant = False  # ours: a measurement variant (a kernel "auto" does not run, timed to decide whether it
                        # should - bench/targets.py VARIANTS), not one of the defaults

    def available(self, device: torch.device) -> Optional[str]:
        return None

    def supports(self, m: int) -> bool:
        return True

    def prepare(self, w: torch.Tensor, group_size: int) -> Prepared:
        raise NotImplementedError

    def activation_bytes(self, m: int, k: int, n: int, esize: int) -> int:
        return m * k * esize + m * n * esize


class Fp16Matmul(Backend):
    name, family = "fp16", "fp16"

    def prepare(self, w, group_size):
        return Prepared(run=lambda x: F.linear(x, w), weight_bytes=w.numel() * w.element_size())


def _int4(w, group_size):
    qw = quantize_rtn(w, group_size)
    return pack_int4(qw.q), qw.scales, qw.zeros


def _int4_bytes(n, k, group_size, esize):
    return n * k // 2 + 2 * n * num_groups(k, group_size) * esize


class _Ours(Backend):
    """One of our ops on one backend; available where ops.resolve_backend accepts it."""
    family = "ours"
    op = "?"

    def __init__(self, backend: str, max_m: Optional[int] = None):
        self.backend, self.max_m = backend, max_m
        self.name = f"{self.op}-{backend}"

    def available(self, device):
        try:
            ops.resolve_backend(self.backend, device, self.name)
        except RuntimeError as e:
            return str(e)
        return None


class OursW4A16(_Ours):
    op = "w4a16"

    def supports(self, m):
        return self.max_m is None or m <= self.max_m

    def prepare(self, w, group_size):
        qweight, scales, zeros = _int4(w, group_size)
        from ..reference import w4a16_gemm_ref

        gs = w.shape[1] if group_size == -1 else group_size
        return Prepared(
            run=self._runner(qweight, scales, zeros, group_size, gs),
            weight_bytes=_int4_bytes(*w.shape, group_size, w.element_size()),
            reference=lambda x: w4a16_gemm_ref(x, qweight, scales, zeros, None, gs),
            tolerance=self._tolerance(qweight, scales, zeros, gs))

    @staticmethod
    def _tolerance(qweight, scales, zeros, gs):
        """(x, y_ref) -> the derived bound the rows are checked against: fp32 sums in another order."""
        from ..reference import dequantize_ref, gemm_tolerance

        return lambda x, y_ref: gemm_tolerance(x, dequantize_ref(qweight, scales, zeros, gs, x.dtype), x.dtype, y_ref)

    def _runner(self, qweight, scales, zeros, group_size, gs):
        # exactly as QuantLinear calls it: its workspace (split-K decode in one launch) and its call
        # path (ops.quantized_linear: no per-call re-validation, no dispatcher in eager), so that at
        # small M the host's share of a call is the layer's, not a validating wrapper's
        workspace = ops.w4a16_workspace(qweight.shape[0], qweight.device)
        return lambda x: ops.quantized_linear(x, qweight, scales, zeros, None, gs, None, self.backend, workspace)


class _OursW4A16CudaVariant(OursW4A16):
    """One of the CUDA extension's kernels called by its launcher variant (bindings.cpp), bypassing the
    "auto" choice that "w4a16-cuda" makes."""
    is_variant = True
    variant = 0
    label = "?"

    def __init__(self, max_m: Optional[int]):
        super().__init__("cuda", max_m)
        self.name = self.label

    def _runner(self, qweight, scales, zeros, group_size, gs):
        ext, variant = torch.ops.minicpm_int4_C, self.variant
        return lambda x: ext.w4a16_gemm(x, qweight, scales, zeros, None, gs, variant)


class OursW4A16CudaCore(_OursW4A16CudaVariant):
    """The CUDA extension's CUDA-core GEMV (variant 1) where "w4a16-cuda" takes the tensor-core
    kernel: both hand-written decode kernels side by side."""
    variant, label = 1, "w4a16-cuda-gemv"

    def __init__(self, max_m: Optional[int] = 16):
        super().__init__(max_m)


class OursW4A16CudaAhead(_OursW4A16CudaVariant):
    """The CUDA extension's tensor-core kernel requesting W two chunks ahead instead of one (variant 3),
    beside "w4a16-cuda": these rows decide whether the deeper lookahead's loads in flight are worth its
    registers (csrc/w4a16_mma_core.cuh, kAheadDeep): M = 1 (#5's bandwidth target) and up to 16 (#3's 3x
    over fp16 at M = 16, where the tensor-core kernel streamed at 39% of copy bandwidth on the H200).
    Where the tensor-core kernel does not take the shape (K % 128 != 0), the variant refuses it and the
    bench records the error."""
    variant, label = 3, "w4a16-cuda-ahead2"

    def __init__(self, max_m: Optional[int] = 16):
        super().__init__(max_m)


class OursW4A16CudaRing(_OursW4A16CudaVariant):
    """The CUDA extension's tensor-core kernel with W copied four chunks ahead (cp.async) into a ring in
    shared memory (variant 4), beside "w4a16-cuda": three chunks of HBM reads in flight a warp while it
    multiplies one, whatever the registers, against one in the default - what Little's law says the H200
    run's 2.1 TB/s streaming rate lacked (csrc/w4a16_mma_core.cuh, warp_partials_ring). M = 1 (#5's
    bandwidth target) to 16 (#3's 3x over fp16). Shapes the tensor-core kernel does not take: an error row."""
    variant, label = 4, "w4a16-cuda-ring"

    def __init__(self, max_m: Optional[int] = 16):
        super().__init__(max_m)


class OursW4A16CudaWgmma(_OursW4A16CudaVariant):
    """The CUDA extension's warpgroup-MMA prefill GEMM (csrc/w4a16_wgmma.cu, variant 5: W dequantized in registers as
    the wgmma's A operand, the reference's weight, x read by the tensor cores from shared memory) past M = 16, beside
    the Triton prefill kernel and its variants (dq: the weight dequantized whole, then cuBLAS): these rows put it in
    the dispatch table ("cuda-wgmma") where it is the fastest. sm_90a builds only (elsewhere the op refuses
    variant 5)."""
    variant, label = 5, "w4a16-cuda-wgmma"

    def __init__(self):
        super().__init__(None)

    def supports(self, m):
        return m > CUDA_MAX_M

    def available(self, device):
        reason = super().available(device)
        if reason is None and not ops.cuda_wgmma_w4a16_runs(device.index or 0):
            reason = ("the warpgroup-MMA prefill GEMM does not run here: it needs an H100 / H200 and the extension's "
                      "sm_90a build, not turned off (_C.w4a16_prefill_kernel() says why)")
        return reason


class _OursW4A16TritonSwitched(OursW4A16):
    """Our Triton W4A16 at M = 1 as QuantLinear calls it (the layer's workspace), with one of kernels/w4a16.py's
    VARIANTS - the candidates of dispatch.py that backend="auto" takes where these rows measure them faster -
    switched on for the call (w4a16._variant_switch: the module setting the variant changes)."""
    is_variant = True
    variant = "?"

    def __init__(self):
        super().__init__("triton", max_m=1)
        self.name = f"w4a16-{self.variant}"

    def _runner(self, qweight, scales, zeros, group_size, gs):
        from ..kernels import w4a16

        variant = self.variant
        workspace = ops.w4a16_workspace(qweight.shape[0], qweight.device)

        def run(x):
            with w4a16._variant_switch(variant):
                return ops.quantized_linear(x, qweight, scales, zeros, None, gs, None, "triton", workspace)
        return run


class OursW4A16TritonTensorCore(_OursW4A16TritonSwitched):
    """The Triton tensor-core decode kernel at M = 1, where "w4a16-triton" takes the GEMV: ~3.2
    against ~4.2 SASS instructions per weight on sm_90a, both in one launch (split-K finished in the
    decode kernel with the layer's workspace)."""
    variant = "triton-tc"


class OursW4A16TritonUnsplit(_OursW4A16TritonSwitched):
    """The Triton M = 1 GEMV with K never split across programs (kernels/w4a16.py GEMV_SPLIT = 1), where
    "w4a16-triton" splits it for shapes whose rows alone give too few threads (N = 1024 - 4096 on
    an H100 / H200; elsewhere the two rows run the same kernel): these rows tell whether the split's
    parallelism is worth its partial sums (GEMV_THREADS_PER_SM)."""
    variant = "triton-unsplit"


class OursW4A16TritonPrefetch(_OursW4A16TritonSwitched):
    """The Triton M = 1 GEMV with its next step of W and x loaded before it computes the current one
    (kernels/w4a16.py GEMV_PREFETCH), beside `w4a16-triton`'s GEMV, which waits for each step's loads:
    these rows decide whether the double buffer's loads in flight are worth its registers."""
    variant = "triton-prefetch"


class OursW4A16TritonHalf2(_OursW4A16TritonSwitched):
    """The Triton M = 1 GEMV with each word's products and sums made two at a time in fp16 (kernels/w4a16.py
    GEMV_HALF2: ~3.0 SASS instructions per weight and 96 registers on sm_90a against the fp32 path's ~4.2 and
    128), beside `w4a16-triton`: these rows decide whether fewer instructions buy bandwidth. fp16 layers only
    (the bench's default dtype; for others the switch runs the fp32 GEMV). Checked against its own derived bound,
    reference.gemv_half2_tolerance (its fp16 roundings), not gemm_tolerance's fp32 sums."""
    variant = "triton-h2"

    @staticmethod
    def _tolerance(qweight, scales, zeros, gs):
        from ..reference import gemv_half2_tolerance

        fp32_sums = OursW4A16._tolerance(qweight, scales, zeros, gs)
        return lambda x, y_ref: (gemv_half2_tolerance(x, qweight, scales, zeros, gs, y_ref)
                                 if x.dtype == torch.float16 else fp32_sums(x, y_ref))


class OursW4A16TritonDirect(_OursW4A16TritonSwitched):
    """The Triton M = 1 GEMV with x, the scales and the zero points loaded by each thread for its own words of W
    (kernels/w4a16.py GEMV_DIRECT_LOADS: inline-PTX loads, under a 128-register ceiling), beside `w4a16-triton`'s,
    which loads them once a program and moves them to those threads through shared memory: compiled for sm_90a
    (G = 128), no barrier in the loop where there were 20, for +0.1 SASS instructions per weight. These rows tell
    whether the barriers cost bandwidth."""
    variant = "triton-direct"


class OursW4A16TritonTrip32(_OursW4A16TritonSwitched):
    """The Triton 2..16-row decode kernel with 32 packed words of K a loop trip (two dots of a group of 128;
    kernels/w4a16.py DECODE_TRIP_WORDS = 32) beside `w4a16-triton`'s 16: compiled for sm_90a at G = 128,
    2.89 - 2.95 SASS instructions per weight against 3.16 - 3.28 and twice the bytes a pipeline stage, for 12
    more registers and 8 - 24 KB more shared memory a program (kernels/aot.py)."""
    variant = "triton-trip32"

    def supports(self, m):
        return 2 <= m <= CUDA_MAX_M


class OursW4A16TritonStaged(_OursW4A16TritonSwitched):
    """The Triton 2..16-row decode kernel with its dequantized tile in the natural order, which Triton moves into the
    tensor cores' register layout through shared memory every dot step (kernels/w4a16.py DECODE_FRAGMENT = False),
    beside `w4a16-triton`'s fragment order, made in that layout in registers: compiled for sm_90a at G = 128
    (triton 3.9 / 3.6), 3.06 / 2.91 against 2.94 / 2.78 SASS instructions per weight, 8 STS.128, 8 LDSM.x4 and 16 KB
    of shared memory more a program; sm_80 (triton 3.9) 4.30 against 3.08. These rows tell whether the layout
    change cost time (G = 128 and per channel; G = 32 / 64 run the natural order either way)."""
    variant = "triton-staged"

    def supports(self, m):
        return 2 <= m <= CUDA_MAX_M


class _OursW4A16TritonPrefillSwitched(_OursW4A16TritonSwitched):
    """A switch that changes only the prefill path (M > 16): timed past the decode sizes."""

    def supports(self, m):
        return m > CUDA_MAX_M


class OursW4A16TritonDequant(_OursW4A16TritonPrefillSwitched):
    """M > 16 as the weight dequantized whole by a Triton kernel, then torch's matmul (kernels/w4a16.py
    PREFILL_DEQUANT; cuBLAS on a GPU), beside `w4a16-triton`'s fused prefill kernel."""
    variant = "triton-dq"


class OursW4A16TritonRhs(_OursW4A16TritonPrefillSwitched):
    """M > 16 on the fused prefill kernel with the weight's row tile as the dot's second operand, y = x @ W.T
    (kernels/w4a16.py PREFILL_W_LHS = False: each K step's wgmma waits for the last to finish), beside
    `w4a16-triton`'s transposed product, whose wgmma reads the weight from registers with one in flight:
    these rows tell whether that overlap is worth the layout's extra instructions per weight."""
    variant = "triton-rhs"


class OursW4A8(_Ours):
    """Activation quantization + int8 x int4 GEMM, timed together: the path a W4A8 layer runs from
    ops.W4A8_MIN_M rows on (below it the layer runs W4A16, the w4a16 rows). `w4a8-triton`: the Triton
    quantizer and GEMM; `w4a8-cuda`: the CUDA extension's (csrc/act_quant.cu, csrc/w4a8_gemm.cu)."""
    op = "w4a8"

    def supports(self, m):
        return m >= ops.W4A8_MIN_M and super().supports(m)

    def prepare(self, w, group_size):
        qweight, scales, zeros = _int4(w, group_size)
        gs = w.shape[1] if group_size == -1 else group_size

        def run(x):
            with self._switch():
                x_q, s = ops.quantize_per_token_int8(x, self.backend)
                return ops.w4a8_gemm(x_q, s, qweight, scales, zeros, None, group_size, x.dtype, self.backend)

        return Prepared(run=run, weight_bytes=_int4_bytes(*w.shape, group_size, w.element_size()),
                        reference=self._reference(qweight, scales, zeros, gs),
                        tolerance=self._tolerance(qweight, scales, zeros, gs))

    @staticmethod
    def _reference(qweight, scales, zeros, gs):
        from ..reference import quantize_per_token_int8_ref, w4a8_gemm_ref

        def ref(x):
            x_q, s = quantize_per_token_int8_ref(x)
            return w4a8_gemm_ref(x_q, s, qweight, scales, zeros, None, gs, x.dtype)
        return ref

    @staticmethod
    def _tolerance(qweight, scales, zeros, gs):
        from ..reference import quantize_per_token_int8_ref, w4a8_tolerance

        def tol(x, y_ref):
            x_q, s = quantize_per_token_int8_ref(x)
            return w4a8_tolerance(x_q, s, qweight, scales, zeros, gs, x.dtype, y_ref)
        return tol

    def activation_bytes(self, m, k, n, esize):
        # quantizer: read x, write x_q + scale; GEMM: read x_q + scale, write y
        return (m * k * esize + m * k + 4 * m) + (m * k + 4 * m) + m * n * esize

    def _switch(self):
        return contextlib.nullcontext()


class OursW4A8TritonFlat(OursW4A8):
    """The W4A8 GEMM with each group's K steps unrolled, so that Triton pipelines the loop over groups
    (kernels/w4a8.py W4A8_FLAT_GROUPS), beside `w4a8-triton`'s nested loop: these rows decide whether it
    becomes the default."""
    is_variant = True

    def __init__(self):
        super().__init__("triton")
        self.name = "w4a8-triton-flat"

    def _switch(self):
        from ..kernels import w4a8

        return w4a8.flat_groups()


class OursW4A8CudaRows64(OursW4A8):
    """The CUDA W4A8 GEMM with 64-row blocks of 4 warps forced (its launcher takes them only where 128-row blocks
    would be fewer than the SMs), beside `w4a8-cuda`: these rows decide whether the smaller blocks - two or three an
    SM - are also worth it on larger grids (e.g. N = 768 at M = 4096: 192 blocks of 128 rows over 132 SMs)."""
    is_variant = True

    def __init__(self):
        super().__init__("cuda")
        self.name = "w4a8-cuda-m64"
        self.block_rows, self.kernel = 64, 1

    def prepare(self, w, group_size):
        qweight, scales, zeros = _int4(w, group_size)
        gs = w.shape[1] if group_size == -1 else group_size
        ext = torch.ops.minicpm_int4_C

        def run(x):
            x_q, s = ops.quantize_per_token_int8(x, "cuda")
            return ext.w4a8_gemm(x_q, s, qweight, scales, zeros, None, gs, x.dtype, self.block_rows, self.kernel)

        return Prepared(run=run, weight_bytes=_int4_bytes(*w.shape, group_size, w.element_size()),
                        reference=self._reference(qweight, scales, zeros, gs),
                        tolerance=self._tolerance(qweight, scales, zeros, gs))


class OursW4A8CudaMma(OursW4A8CudaRows64):
    """The CUDA W4A8 GEMM's mma.sync kernel forced (csrc/w4a8_gemm.cu, the launcher's own block rows), beside
    `w4a8-cuda` - which on an H100 / H200 with the sm_90a build is the warpgroup-MMA kernel (csrc/w4a8_wgmma.cu)
    wherever it takes the shape: these rows decide from which M the launcher should take the wgmma kernel (it
    takes it at every M for now, without a measurement)."""

    def __init__(self):
        super().__init__()
        self.name = "w4a8-cuda-mma"
        self.block_rows, self.kernel = 0, 1


class OursW4A8CudaFma(OursW4A8CudaRows64):
    """The CUDA W4A8 GEMM's warpgroup-MMA kernel with its epilogue's multiply and add fused (kernel=3: a third fewer
    of the instructions that bound it; within reference.w4a8_tolerance, not the reference's bits), beside
    `w4a8-cuda` (the launcher's choice: the unfused wgmma kernel on an H100 / H200): these rows decide whether the
    fused epilogue becomes the launcher's. sm_90a builds only (elsewhere the op refuses kernel=3)."""

    def __init__(self):
        super().__init__()
        self.name = "w4a8-cuda-fma"
        self.block_rows, self.kernel = 0, 3

    def available(self, device):
        reason = super().available(device)
        if reason is None and (device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0)):
            reason = "the warpgroup-MMA kernel needs an H100 / H200 (sm_90a)"
        return reason


class OursW4A8CudaTokens(OursW4A8CudaFma):
    """The CUDA W4A8 GEMM's warpgroup-MMA kernel with its blocks' tokens forced - 64 (m64n64k32) or 128
    (m64n128k32) - beside `w4a8-cuda`, whose launcher picks one by a static model (w4a8_wgmma_core.cuh,
    block_tokens: waves of persistent CTAs x a tile's instructions): these rows check or replace that rule.
    sm_90a builds only."""

    def __init__(self, tokens):
        super().__init__()
        self.name = f"w4a8-cuda-t{tokens}"
        self.block_rows, self.kernel = tokens, 2


class TorchTinyGemm(Backend):
    """torch's built-in int4 tinygemm (aten._weight_int4pack_mm), the kernel behind torchao int4wo.
    Our (q, scale, zero) map to its format exactly: w = (q - 8) * s + (8 - z) * s."""
    name, family = "torch-tinygemm", "peer"

    def available(self, device):
        # on CPU the ops of their own that newer torch has (torch 2.4 has none)
        ops = ("_convert_weight_to_int4pack", "_weight_int4pack_mm") if device.type == "cuda" else \
            ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
        missing = [op for op in ops if not hasattr(torch.ops.aten, op)]
        return f"this torch ({torch.__version__}) has no aten.{missing[0]}" if missing else None

    def prepare(self, w, group_size):
        n, k = w.shape
        gs = k if group_size == -1 else group_size
        qw = quantize_rtn(w.to(torch.bfloat16), group_size)
        s, z = qw.scales.float(), qw.zeros.float()
        sz = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        q = qw.q
        if w.device.type == "cuda":
            # the weight as uint8 [N, K / 2], two nibbles a byte (torch >= 2.5); torch 2.4 takes int32 [N, K]
            # (the dtypes their meta registrations check; a wrong layout fails the check against the reference)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                q.to(torch.int32) if torch.__version__ < (2, 5) else (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
            mm = torch.ops.aten._weight_int4pack_mm
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu

        def run(x):  # tinygemm takes bf16 activations
            return mm(x.to(torch.bfloat16), packed, gs, sz).to(x.dtype)

        from ..reference import w4a16_gemm_ref

        ref_q = pack_int4(q)
        return Prepared(run=run, weight_bytes=_int4_bytes(n, k, group_size, 2),
                        reference=lambda x: w4a16_gemm_ref(x.to(torch.bfloat16), ref_q, qw.scales, qw.zeros, None, gs).to(x.dtype))


def _cuda_peer_missing(device, module: str) -> Optional[str]:
    """Why a CUDA-only peer library cannot run here, or None."""
    if device.type != "cuda":
        return f"{module} needs CUDA"
    try:
        __import__(module)
    except Exception as e:
        return f"{module} is not installed ({type(e).__name__})"
    return None


class BitsandbytesNF4(Backend):
    """bitsandbytes nf4, blocksize 64 with double quantization (the absmax of each block stored as
    8 bits, itself scaled per 256 blocks): the `BitsAndBytesConfig` of the official MiniCPM-V int4
    checkpoints (nf4, `bnb_4bit_use_double_quant=True`, fp16 compute)."""
    name, family = "bnb-nf4", "peer"

    def available(self, device):
        return _cuda_peer_missing(device, "bitsandbytes")

    def prepare(self, w, group_size):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        wq, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return Prepared(run=lambda x: bnb.matmul_4bit(x, wq.t(), quant_state=state),
                        weight_bytes=wq.numel() * wq.element_size() + _nbytes_of_quant_state(state),
                        reference=lambda x: F.linear(x, bf.dequantize_4bit(wq, state)))


def _nbytes_of_quant_state(state) -> int:
    """What a bitsandbytes 4-bit layer reads beside its packed weights: the block absmax, and with
    double quantization that absmax's own scales."""
    n = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):
        n += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return n


class Gemlite(Backend):
    """gemlite's Triton A16W4 GEMM (asymmetric, grouped), when installed: it gets our own rtn
    q / scales / zeros, which follow HQQ's convention W = (q - z) * s that gemlite >= 0.5 loads
    through `helper.A16W4_HQQ_INT.from_weights`, so its output is checked against reference.py on
    the very same weights. (gemlite imports only where CUDA is present: it reads device 0 on import.)"""
    name, family = "gemlite", "peer"

    def available(self, device):
        why = _cuda_peer_missing(device, "gemlite")
        if why is None:
            try:
                helper = _import_helper()
            except Exception as e:
                return f"gemlite.helper does not import ({type(e).__name__}: {str(e)[:200]})"
            if not hasattr(helper, "A16W4_HQQ_INT"):
                import gemlite
                why = (f"gemlite {getattr(gemlite, '__version__', '?')} has no helper.A16W4_HQQ_INT "
                       "(gemlite >= 0.5 loads asymmetric int4 through it)")
        return why

    def prepare(self, w, group_size):
        from ..reference import w4a16_gemm_ref

        n, k = w.shape
        gs = k if group_size == -1 else group_size
        qw = quantize_rtn(w, group_size)
        scales, zeros = qw.scales.to(w.dtype), qw.zeros.to(w.dtype)
        layer = _import_helper().A16W4_HQQ_INT(device=str(w.device), dtype=w.dtype).from_weights(qw.q, scales, zeros)
        packed = pack_int4(qw.q)
        return Prepared(run=layer, weight_bytes=_int4_bytes(n, k, group_size, w.element_size()),
                        reference=lambda x: w4a16_gemm_ref(x, packed, scales, zeros, None, gs))


class OursW4A16CudaWgmmaNosplit(OursW4A16CudaWgmma):
    """The warpgroup-MMA prefill GEMM with a tile a CTA always (variant 6), beside "w4a16-cuda-wgmma", which splits K
    over a cluster of 2 - 8 CTAs a tile where its tiles are too few to fill the SMs (csrc/w4a16_wgmma_core.cuh,
    split_k): these rows say whether the split's partial sums through distributed shared memory pay, and put the
    unsplit kernel in the dispatch table ("cuda-wgmma-nosplit") where it is faster. Up to M = 1024 only: past it
    every shape of the three models has a wave of tiles or more (the two kernels are the same)."""
    variant, label = 6, "w4a16-cuda-wgmma-nosplit"

    def supports(self, m):
        return CUDA_MAX_M < m <= 1024


def _import_helper():
    import gemlite.helper

    return gemlite.helper


def default_backends():
    return [Fp16Matmul(), OursW4A16("triton"), OursW4A16TritonTensorCore(), OursW4A16TritonUnsplit(),
            OursW4A16TritonPrefetch(), OursW4A16TritonHalf2(), OursW4A16TritonDirect(), OursW4A16TritonTrip32(),
            OursW4A16TritonStaged(),
            OursW4A16TritonDequant(), OursW4A16TritonRhs(), OursW4A16("cuda", max_m=16),
            OursW4A16CudaCore(max_m=16), OursW4A16CudaAhead(), OursW4A16CudaRing(), OursW4A16CudaWgmma(), OursW4A16CudaWgmmaNosplit(), OursW4A8("triton"), OursW4A8TritonFlat(),
            OursW4A8("cuda"), OursW4A8CudaRows64(), OursW4A8CudaMma(), OursW4A8CudaFma(),
            OursW4A8CudaTokens(64), OursW4A8CudaTokens(128),
            TorchTinyGemm(), BitsandbytesNF4(), Gemlite()]


def select_backends(names) -> list:
    """default_backends() narrowed to `names` (bench --backends), in their usual order; fp16 always, as
    every speedup is against it. An unknown name is a ValueError that lists the known ones."""
    every = default_backends()
    known = [b.name for b in every]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}: choose from {','.join(known)}")
    return [b for b in every if b.name == "fp16" or b.name in names]
