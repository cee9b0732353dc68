"""Compile the Triton kernels for a GPU that is not here, and read what the compiler made of them.

Triton compiles for any NVIDIA target without a GPU (its bundled ptxas makes the cubin), so the
properties that decide speed can be checked on a CPU machine, in CI, long before a GPU session:
registers and spills, shared memory against the architecture's limit, whether the packed weights
are read with 16-byte loads, whether a GEMM reaches the tensor cores (mma / wgmma, fp16 or int8),
and how many SASS instructions the kernel's main loop spends per int4 weight.

How: the real launchers (`w4a16_gemm_triton`, ...) run on CPU tensors with each kernel's launch
replaced by a recorder, so the block sizes, split-K and constexprs are exactly those a GPU run
picks (with the SM count of the target). Each recorded launch is compiled for every autotune
config with the specialisation Triton's JIT would make (16-byte aligned pointers, integers
divisible by 16, integers equal to 1 as constants).

Needs the kernels imported *without* TRITON_INTERPRET (the interpreter uses other configs):
`python -m minicpm_int4.kernels.aot` or `minicpm-int4 inspect-kernels`. A wide sweep that reports
only what is wrong (a compiler abort included):
    python -m minicpm_int4.kernels.aot --group-size=32,64,128,-1 --dtype fp16,bf16,fp32 \
        --m 1,5,4096 --shapes 4096x4096,1000x1032 --bias --isolate --no-sass --problems-only
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .sass import counts as _sass_counts, parse as _sass_parse


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    sms: int
    smem_limit: int      # bytes of shared memory one block may use (opt-in maximum)
    regs_limit: int = 255


ARCHS: Dict[str, Arch] = {
    "sm80": Arch("sm80", 80, 108, 163 * 1024),     # A100
    "sm90a": Arch("sm90a", 90, 132, 227 * 1024),   # H100 SXM (H200: the same SM)
}


@dataclass
class Launch:
    kernel: str
    constexprs: Dict[str, object]
    options: Dict[str, int]
    signature: Dict[str, str]
    attrs: Tuple[str, ...]           # names specialised as divisible by 16
    label: str = ""

    @property
    def key(self):
        return (self.kernel, tuple(sorted(self.constexprs.items(), key=lambda kv: kv[0])),
                tuple(sorted(self.options.items())), tuple(sorted(self.signature.items())), self.attrs)


@dataclass
class Compiled:
    kernel: str
    arch: str
    label: str
    constexprs: Dict[str, object]
    options: Dict[str, int]
    regs: int
    spill_bytes: int                 # local memory (stack) per thread: register spills
    smem: int
    smem_limit: int
    global_loads: Dict[str, int]     # PTX ld.global variants -> count
    tensor_core: Dict[str, int]      # PTX mma / wgmma variants -> count
    sass_counts: Dict[str, int] = field(default_factory=dict)   # SASS opcode -> static count
    loop_sass: Dict[str, int] = field(default_factory=dict)     # the same, innermost hot loop only
    error: Optional[str] = None
    # Hopper's wgmma: how many read their A operand from registers (the rest from shared memory), and the
    # most wgmma groups a wait lets stay in flight (wgmma.wait_group N; 0: each waits for the last to finish,
    # so nothing else overlaps the tensor cores). None without wgmma.
    wgmma_a_registers: Optional[int] = None
    wgmma_in_flight: Optional[int] = None
    # The global loads (PTX ld.global) the pipelined K loop issues before it waits for its stage of W
    # (cp.async.wait_group): loads whose latency passes during that wait and the trip's math, as a step
    # ahead's scales and zero points do in the decode kernel. None: no loop with such a wait.
    loop_loads_before_wait: Optional[int] = None
    # Where in the innermost loop its last 16-byte global load outside the read-only path (LDG.E.128, not .CONSTANT:
    # the streamed weight words of the GEMV) sits, as a fraction of the loop's instructions (0: the first). A load
    # issued late waits out the memory's latency mid-step. None: no such load in the loop.
    loop_last_stream_load_at: Optional[float] = None

    @property
    def vector_bytes(self) -> int:
        """Widest global load in bytes (4 = scalar 32-bit, 16 = 128-bit)."""
        best = 0
        for name in self.global_loads:
            width = re.search(r"\.(?:b|u|s|f)(\d+)$", name)
            vec = re.search(r"\.v(\d)\.", name)
            if width:
                best = max(best, int(width.group(1)) // 8 * (int(vec.group(1)) if vec else 1))
        return best


_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                    torch.int32: "i32", torch.int8: "i8", torch.int64: "i64", torch.uint8: "u8"}


def _specialise(value):
    """(type string, divisible-by-16) as Triton's JIT would specialise this argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if value is None:
        return "constexpr", False
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def _kernels():
    from . import INTERPRET, act_quant, w4a8, w4a16
    from ._launch import FastLaunch

    if INTERPRET:
        raise RuntimeError("minicpm_int4.kernels.aot compiles for a GPU target: import the kernels without "
                           "TRITON_INTERPRET=1 (run `python -m minicpm_int4.kernels.aot` in a fresh process)")
    kernels = {"w4a16_gemv": w4a16._w4a16_gemv_kernel, "w4a16_decode": w4a16._w4a16_decode_kernel,
               "w4a16_prefill": w4a16._w4a16_prefill_kernel, "w4a16_splitk_reduce": w4a16._splitk_reduce_kernel,
               "w4a16_dequant": w4a16._w4a16_dequant_kernel, "w4a8_gemm": w4a8._w4a8_gemm_kernel,
               "act_quant": act_quant._act_quant_kernel}
    # the Triton objects under the fast launchers (whose `run` the recorder replaces)
    return {name: k.kernel if isinstance(k, FastLaunch) else k for name, k in kernels.items()}


def _jit_fn(kernel):
    return kernel.fn if hasattr(kernel, "configs") else kernel  # Autotuner -> its JITFunction


def _configs(kernel, kwargs) -> List[Tuple[Dict[str, object], Dict[str, int]]]:
    """(meta-parameters, options) per autotune config the launch's keyword arguments leave (as the
    autotuner's early_config_prune sees them); one entry for a plain @triton.jit kernel."""
    cfgs = getattr(kernel, "configs", None)
    if not cfgs:
        return [({}, {})]
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        cfgs = prune(cfgs, {}, **kwargs)
    return [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in cfgs]


@contextlib.contextmanager
def _recording(arch: Arch, sink: List[Launch], label: str):
    """Replace every kernel's launch by a recorder, and the SM count by the target's."""
    from . import _common, w4a16

    kernels = _kernels()
    saved = {name: k.__dict__.get("run") for name, k in kernels.items()}
    saved_sms = w4a16.num_sms
    saved_cap = _common.target_capability

    def recorder(name, kernel):
        fn = _jit_fn(kernel)

        def run(*args, grid, warmup, **kwargs):
            for meta, opts in _configs(kernel, kwargs):
                bound = dict(zip(fn.arg_names, args))
                bound.update(kwargs)
                bound.update(meta)
                options = {"num_warps": 4, "num_stages": 3}
                options.update({k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound})
                maxnreg = bound.pop("maxnreg", None)  # (a register ceiling: the GEMV's GEMV_DIRECT_LOADS)
                if maxnreg is not None:
                    options["maxnreg"] = maxnreg
                options.update(opts)
                signature, constexprs, attrs = {}, {}, []
                for p in fn.params:
                    value = bound[p.name]
                    if p.is_constexpr:
                        signature[p.name] = "constexpr"
                        constexprs[p.name] = value
                        continue
                    ty, div16 = _specialise(value)
                    signature[p.name] = ty
                    if ty == "constexpr":
                        constexprs[p.name] = value
                    elif div16:
                        attrs.append(p.name)
                sink.append(Launch(name, constexprs, options, signature, tuple(attrs), label))
            return None

        return run

    try:
        for name, k in kernels.items():
            k.run = recorder(name, k)
        w4a16.num_sms = lambda device: arch.sms
        _common.target_capability = lambda device=None: arch.capability
        yield
    finally:
        for name, k in kernels.items():
            if saved[name] is None:
                k.__dict__.pop("run", None)
            else:
                k.run = saved[name]
        w4a16.num_sms = saved_sms
        _common.target_capability = saved_cap


def _weights(n: int, k: int, group_size: int, dtype: torch.dtype):
    g = k if group_size == -1 else group_size
    qweight = torch.empty((n, k // 8), dtype=torch.int32)
    scales = torch.empty((n, k // g), dtype=dtype)
    return qweight, scales, torch.empty_like(scales), g


def record_launches(arch: Arch, shapes: Sequence[Tuple[int, int]], ms: Sequence[int],
                    dtypes: Sequence[torch.dtype] = (torch.float16,), group_sizes: Sequence[int] = (128,),
                    bias: Sequence[bool] = (False,), w4a8: bool = True, act_quant: bool = True,
                    input_scale: bool = True, input_perm: bool = True) -> List[Launch]:
    """Every distinct (kernel, constexprs, options, specialisation) the launchers pick for these
    problems on `arch`: W4A16 for each M, W4A8, the activation quantizer and the weight's dequantization
    (the prefill as dequantization + matmul) for M > 16; with
    `input_scale` also the W4A16 kernels (the decode ones everywhere; prefill in a pass of its own, and
    on sm_90 its opt-in fused tiles too, w4a16.FUSE_INPUT_SCALE_PREFILL = True) and the quantizer as a layer
    with an input scale runs them; with `input_perm` the decode
    kernels and the quantizer as an act-order layer (foreign.py) runs them, reading x through its
    channel order (prefill gathers first: its kernel is the plain one)."""
    from ..ops import w4a16_workspace
    from . import quantize_per_token_int8_triton, w4a8_gemm_triton, w4a16_gemm_triton
    from . import w4a16 as _w4a16

    sink: List[Launch] = []
    with _recording(arch, sink, ""):
        for n, k in shapes:
            for dtype in dtypes:
                for gs in group_sizes:
                    gs = gs if gs == -1 or k % gs == 0 else -1  # a K no group size divides: per channel
                    qweight, scales, zeros, g = _weights(n, k, gs, dtype)
                    workspace = w4a16_workspace(n)
                    for has_bias in bias:
                        b = torch.empty((n,), dtype=dtype) if has_bias else None
                        for m in ms:
                            start = len(sink)
                            x = torch.empty((m, k), dtype=dtype)
                            # as QuantLinear calls it (split-K decode in one launch), and as a bare
                            # ops.w4a16_gemm call without a workspace does (a reduce launch after it)
                            w4a16_gemm_triton(x, qweight, scales, zeros, b, g, workspace)
                            w4a16_gemm_triton(x, qweight, scales, zeros, b, g)
                            scale = torch.empty((k,), dtype=dtype)
                            if input_scale:  # multiplied into x's loads
                                w4a16_gemm_triton(x, qweight, scales, zeros, b, g, workspace, input_scale=scale)
                                if m > 16 and arch.capability >= 90:  # the prefill tiles' opt-in multiply
                                    saved, _w4a16.FUSE_INPUT_SCALE_PREFILL = _w4a16.FUSE_INPUT_SCALE_PREFILL, True
                                    try:
                                        w4a16_gemm_triton(x, qweight, scales, zeros, b, g, workspace, input_scale=scale)
                                    finally:
                                        _w4a16.FUSE_INPUT_SCALE_PREFILL = saved
                            perm = torch.empty((k,), dtype=torch.int32)
                            if input_perm and m <= 16:  # x read through the channel order
                                w4a16_gemm_triton(x, qweight, scales, zeros, b, g, workspace, input_perm=perm)
                            if m > 16:  # the prefill as dequantization + matmul (dispatch "triton-dq")
                                _w4a16.dequantize_triton(qweight, scales, zeros, g)
                            if m > 16 and w4a8 and dtype != torch.float32:
                                xq = torch.empty((m, k), dtype=torch.int8)
                                xs = torch.empty((m,), dtype=torch.float32)
                                w4a8_gemm_triton(xq, xs, qweight, scales, zeros, b, g, dtype)
                            if m > 16 and act_quant:
                                quantize_per_token_int8_triton(x)
                                if input_scale:  # a W4A8 layer with an input scale
                                    quantize_per_token_int8_triton(x, scale)
                                if input_perm:  # an act-order W4A8 layer
                                    quantize_per_token_int8_triton(x, None, perm)
                            for launch in sink[start:]:
                                launch.label = f"M={m} N={n} K={k} G={gs} {str(dtype)[6:]}{' bias' if has_bias else ''}"
    distinct: Dict[object, Launch] = {}
    for launch in sink:
        distinct.setdefault(launch.key, launch)
    return list(distinct.values())


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _sass_summary(sass_text: str) -> Tuple[Dict[str, int], Dict[str, int], Optional[float]]:
    """(opcode counts of the whole kernel, opcode counts of its innermost loop: the shortest span
    closed by a backward branch, where in that loop its last streamed 16-byte load sits: Compiled's
    loop_last_stream_load_at)."""
    instrs, spans = _sass_parse(sass_text)
    loop: Counter = Counter()
    last_at = None
    if spans:
        lo, hi = min(spans, key=lambda span: span[1] - span[0])
        loop = _sass_counts(instrs, lo, hi)
        body = [op for a, op in instrs if lo <= a <= hi and op != "NOP"]
        streamed = [i for i, op in enumerate(body)
                    if op.startswith("LDG") and ".128" in op and ".CONSTANT" not in op]
        if streamed:
            last_at = streamed[-1] / len(body)
    return dict(_sass_counts(instrs)), dict(loop), last_at


def _legacy_compiler_api() -> Optional[bool]:
    """How this triton takes the compiler's source object (ASTSource): False for triton >= 3.3 (constexprs and
    attributes by parameter index), True for 3.0 / 3.1 (the signature of the runtime parameters, constants by name,
    an AttrsDescriptor dataclass), None for neither (3.2's attributes descriptor is of another kind)."""
    import inspect as _inspect

    from triton.compiler import ASTSource

    if "constexprs" in _inspect.signature(ASTSource.__init__).parameters:
        return False
    try:
        from triton.compiler.compiler import AttrsDescriptor
    except ImportError:
        return None
    return True if hasattr(AttrsDescriptor, "__dataclass_fields__") else None


def compiler_api_problem() -> Optional[str]:
    """Why this triton's compiler cannot be driven from here (_legacy_compiler_api), or None."""
    import triton

    if _legacy_compiler_api() is None:
        return (f"triton {triton.__version__}: inspect-kernels drives the compilers of triton 3.0, 3.1 and >= 3.3, "
                "not this one's")
    return None


def _ast_source(fn, launch: Launch):
    """The compiler's source object for one recorded launch, as this triton takes it (_legacy_compiler_api)."""
    from triton.compiler import ASTSource

    names = [p.name for p in fn.params]
    if not _legacy_compiler_api():  # triton >= 3.3
        constexprs = {(names.index(k),): v for k, v in launch.constexprs.items()}
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in launch.attrs}
        return ASTSource(fn, launch.signature, constexprs=constexprs, attrs=attrs)
    from triton.compiler.compiler import AttrsDescriptor  # triton 3.0 / 3.1, as their JIT calls it

    signature = {k: v for k, v in launch.signature.items() if v != "constexpr"}
    return ASTSource(fn, signature, dict(launch.constexprs),
                     AttrsDescriptor(divisible_by_16={names.index(k) for k in launch.attrs}, equal_to_1=set()))


def compile_launch(launch: Launch, arch: Arch, sass: bool = True) -> Compiled:
    """Compile one recorded launch for `arch` and read registers, spills, smem, loads, mma, SASS."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_fn(_kernels()[launch.kernel])
    try:
        src = _ast_source(fn, launch)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch.capability, 32), options=dict(launch.options))
    except Exception as e:  # a config this architecture cannot take: reported, not raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _failed(launch, arch, f"{type(e).__name__}: {first[:300]}")
    ptx = compiled.asm["ptx"]
    loads = Counter(re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx))
    # pipelined loads go global -> shared with cp.async; name them by their byte count
    loads.update(f"cp.async.b{8 * int(b, 0)}" for b in
                 re.findall(r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx))
    mma = Counter(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)(?:\.[a-z0-9]+)*", ptx))
    wgmma = re.findall(r"\bwgmma\.mma_async[^;]*;", ptx)
    # `{d...}, {a0, a1, a2, a3}, b_desc`: A from registers; `{d...}, a_desc, b_desc`: from shared memory
    a_registers = sum(1 for w in wgmma if re.search(r"\}\s*,\s*\{", w)) if wgmma else None
    in_flight = _wgmma_in_flight(ptx) if wgmma else None
    regs, stack = 0, 0
    total, loop, last_at = {}, {}, None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
        if m:
            regs, stack = int(m.group(1)), int(m.group(2))
        if sass:
            out = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
            total, loop, last_at = _sass_summary(out)
    return Compiled(kernel=launch.kernel, arch=arch.name, label=launch.label, constexprs=launch.constexprs,
                    options=launch.options, smem_limit=arch.smem_limit, regs=regs, spill_bytes=stack,
                    smem=compiled.metadata.shared, global_loads=dict(loads), tensor_core=dict(mma),
                    sass_counts=total, loop_sass=loop, wgmma_a_registers=a_registers, wgmma_in_flight=in_flight,
                    loop_loads_before_wait=_loop_loads_before_wait(ptx), loop_last_stream_load_at=last_at)


def _loop_loads_before_wait(ptx: str) -> Optional[int]:
    """ld.global instructions in the first PTX loop that waits for cp.async copies, before that wait (see
    Compiled.loop_loads_before_wait); None where no loop waits for any."""
    for header in re.finditer(r"^(\$L__BB\d+_\d+):[^\n]*Inner Loop Header", ptx, re.M):
        body = ptx[header.end():]
        back = re.search(r"\bbra(?:\.uni)?\s+" + re.escape(header.group(1)) + r"\s*;", body)
        body = body[:back.start()] if back else body
        wait = body.find("cp.async.wait_group")
        if wait >= 0:
            return len(re.findall(r"\bld\.global\b", body[:wait]))
    return None


def _wgmma_in_flight(ptx: str) -> int:
    """The most wgmma groups a `wgmma.wait_group N` of this PTX leaves in flight (0: none, or no wait)."""
    pending = [int(p) for p in re.findall(r"\bwgmma\.wait_group(?:\.sync)?(?:\.aligned)?\s+(\d+)", ptx)]
    return max(pending) if pending else 0


def wgmma_in_flight_by_accumulator(arch: Arch = ARCHS["sm90a"]) -> Dict[str, int]:
    """{"fp32": n, "int32": n}: the wgmma groups this Triton keeps in flight in a plain tiled GEMM's K loop
    (kernels/_wgmma_probe.py, 128 x 128 x 64 tiles, 8 warps, 3 stages) with fp16 inputs and an fp32
    accumulator, and with int8 inputs and an int32 one. The second is W4A8's case: 0 means every int8 dot
    waits for the one before it, whatever the kernel around it does."""
    import triton
    from triton.backends.compiler import GPUTarget

    from ._wgmma_probe import _probe_gemm

    out = {}
    for acc, ty in (("fp32", "*fp16"), ("int32", "*i8")):
        launch = Launch("wgmma_probe", {"ACC_INT": acc == "int32", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64},
                        {"num_warps": 8, "num_stages": 3},
                        {"a_ptr": ty, "b_ptr": ty, "c_ptr": "*fp32", "K": "i32", "ACC_INT": "constexpr",
                         "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
                        ("a_ptr", "b_ptr", "c_ptr", "K"))
        compiled = triton.compile(_ast_source(_probe_gemm, launch), target=GPUTarget("cuda", arch.capability, 32),
                                  options=dict(launch.options))
        ptx = compiled.asm["ptx"]
        if not re.search(r"\bwgmma\.mma_async", ptx):
            raise RuntimeError(f"the {acc} probe GEMM compiled without wgmma for {arch.name}")
        out[acc] = _wgmma_in_flight(ptx)
    return out


def _failed(launch: Launch, arch: Arch, error: str) -> Compiled:
    return Compiled(kernel=launch.kernel, arch=arch.name, label=launch.label, constexprs=launch.constexprs,
                    options=launch.options, regs=0, spill_bytes=0, smem=0, smem_limit=arch.smem_limit,
                    global_loads={}, tensor_core={}, error=error)


def loop_instructions_per_weight(c: Compiled) -> Optional[float]:
    """SASS instructions a thread issues per int4 weight in the hot loop of a GEMM kernel (for
    prefill and W4A8, per weight of the tile it unpacks each K step; None for other kernels or when
    no loop was found). One trip of the loop covers BLOCK_N rows x
    BLOCK_KW packed words (times STEPS dot steps in the decode kernel) over num_warps * 32 threads."""
    if not c.loop_sass or c.kernel not in ("w4a16_gemv", "w4a16_decode", "w4a16_prefill", "w4a8_gemm"):
        return None
    if c.kernel in ("w4a16_prefill", "w4a8_gemm"):  # a BLOCK_N x BLOCK_K weight tile per step, shared by BLOCK_M rows
        block_k = c.constexprs["BLOCK_K"]
        if c.constexprs.get("FLAT_GROUPS") and not c.constexprs.get("PER_CHANNEL"):  # a group's steps a trip,
            block_k = max(block_k, c.constexprs["G"])  # and its epilogue (int32 -> fp32, scale) with them
    else:
        block_k = c.constexprs["BLOCK_KW"] * 8 * c.constexprs.get("STEPS", 1)
    weights = c.constexprs["BLOCK_N"] * block_k / (32 * c.options["num_warps"])
    return sum(c.loop_sass.values()) / weights


# The shapes a default run inspects: the decode/prefill-relevant Linear shapes of MiniCPM-V 4.6's
# LLM (Qwen3.5-style, hidden 4096) and vision tower (768), plus an odd-K case.
DEFAULT_SHAPES = ((4096, 4096), (12288, 4096), (4096, 12288), (3072, 768), (768, 3072), (1024, 4304))
DEFAULT_MS = (1, 4, 16, 4096)


def inspect(archs: Sequence[str] = ("sm80", "sm90a"), shapes=DEFAULT_SHAPES, ms=DEFAULT_MS,
            dtypes=(torch.float16, torch.bfloat16), group_sizes=(128,), sass: bool = True,
            progress: Optional[Callable[[str], None]] = None, bias=(False,), isolate: bool = False) -> List[Compiled]:
    """Record and compile every launch. isolate: compile each in a forked child, so that a compiler
    that aborts the process (LLVM fatal errors do) is reported as that variant's error."""
    results: List[Compiled] = []
    compile_fn = _compile_isolated if isolate else compile_launch
    for name in archs:
        arch = ARCHS[name]
        launches = record_launches(arch, shapes, ms, dtypes, group_sizes, bias)
        for i, launch in enumerate(launches):
            if progress:
                progress(f"[{name} {i + 1}/{len(launches)}] {launch.kernel} {launch.label}")
            results.append(compile_fn(launch, arch, sass=sass))
    return results


def _compile_isolated(launch: Launch, arch: Arch, sass: bool = True) -> Compiled:
    import pickle

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, send the result, exit without running any cleanup of the parent's
        os.close(read_fd)
        try:
            payload = pickle.dumps(compile_launch(launch, arch, sass=sass))
        except BaseException as e:  # noqa: BLE001 - anything the compiler raises is the result
            payload = pickle.dumps(f"{type(e).__name__}: {e}"[:300])
        with os.fdopen(write_fd, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    result = pickle.loads(payload) if payload else None
    if isinstance(result, Compiled):
        return result
    return _failed(launch, arch, result or f"the compiler killed the process (wait status {status})")


def problems(c: Compiled) -> List[str]:
    """What is wrong with a compiled variant, by the package's rules (empty when nothing)."""
    out = []
    if c.error:
        return [c.error]
    if c.spill_bytes:
        out.append(f"{c.spill_bytes} bytes of register spills per thread")
    if c.smem > c.smem_limit:
        out.append(f"shared memory {c.smem} B > {c.smem_limit} B")
    # fp32 layers (DOT_FP32) multiply in exact fp32 on purpose: FMA, no tensor cores
    dot_kernel = not c.constexprs.get("DOT_FP32", False) and (c.kernel in ("w4a16_prefill", "w4a8_gemm") or (
        c.kernel == "w4a16_decode" and c.constexprs.get("BLOCK_M", 1) > 1))
    if dot_kernel and not c.tensor_core:
        out.append("no tensor-core instruction (mma / wgmma) in the PTX")
    if c.kernel == "w4a8_gemm" and c.tensor_core and not any(".s8" in k for k in c.tensor_core):
        out.append("the W4A8 GEMM does not use int8 tensor cores")
    # the M = 1 GEMV streams W with plain loads that its own step consumes (the prefetch's are the next step's): one
    # issued past half of the loop waits out the memory's latency mid-step (w4a16.GEMV_DIRECT_MAXNREG's reason).
    # 16-byte-aligned steps only: sm_80's ragged per-channel GEMV (1 warp, masked) has its last at 56 - 57%
    # (kernel_inspection.md)
    late = c.loop_last_stream_load_at
    if c.kernel == "w4a16_gemv" and c.constexprs.get("EVEN") and not c.constexprs.get("PREFETCH") \
            and late is not None and late > 0.5:
        out.append(f"a 16-byte load of W issued {late:.0%} of the way through the loop")
    return out


def format_table(results: Sequence[Compiled]) -> str:
    head = "| arch | kernel | problem | config | regs | spills B | smem KiB | widest load B | tensor cores | loop instr/weight | problems |"
    lines = [head, "|" + "---|" * 11]
    for c in results:
        cfg = " ".join(f"{k}={v}" for k, v in c.constexprs.items() if k.startswith(("BLOCK", "SPLIT", "GROUP", "EVEN", "FIXUP")))
        cfg += f" w{c.options.get('num_warps')} s{c.options.get('num_stages')}"
        tc = ", ".join(sorted(c.tensor_core)) or "-"
        if c.wgmma_a_registers is not None:
            tc += f" (A from {'registers' if c.wgmma_a_registers else 'shared memory'}, {c.wgmma_in_flight} in flight)"
        ipw = loop_instructions_per_weight(c)
        lines.append(f"| {c.arch} | {c.kernel} | {c.label} | {cfg} | {c.regs} | {c.spill_bytes} | "
                     f"{c.smem / 1024:.1f} | {c.vector_bytes} | {tc} | {'-' if ipw is None else f'{ipw:.2f}'} | "
                     f"{'; '.join(problems(c)) or 'ok'} |")
    return "\n".join(lines)


_DTYPE_NAMES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp32": torch.float32, "float32": torch.float32}


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="minicpm-int4 inspect-kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm80,sm90a", help=f"comma-separated, from {sorted(ARCHS)}")
    p.add_argument("--m", default=",".join(map(str, DEFAULT_MS)), help="token counts (rows of x)")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in DEFAULT_SHAPES), help="NxK,...")
    p.add_argument("--dtype", default="fp16,bf16", help="comma-separated: fp16 (float16), bf16 (bfloat16), fp32 (float32)")
    p.add_argument("--group-size", default="128")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--no-sass", action="store_true", help="skip disassembly (faster)")
    p.add_argument("--bias", action="store_true", help="also every launch with a bias")
    p.add_argument("--isolate", action="store_true",
                   help="compile each variant in a child process (a compiler abort becomes that variant's error)")
    p.add_argument("--problems-only", action="store_true", help="print only the variants with a problem")
    args = p.parse_args(argv)
    # the values, checked before anything compiles: a bad one is argparse's one-line error
    archs = [a for a in args.arch.split(",") if a]
    if not archs or any(a not in ARCHS for a in archs):
        p.error(f"--arch {args.arch!r}: choose from {sorted(ARCHS)}")
    if any(d not in _DTYPE_NAMES for d in args.dtype.split(",")):  # "" too
        p.error(f"--dtype {args.dtype!r}: comma-separated, from fp16 / float16, bf16 / bfloat16, fp32 / float32")
    dtypes = list(dict.fromkeys(_DTYPE_NAMES[d] for d in args.dtype.split(",")))
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
        ms = [int(v) for v in args.m.split(",")]
        group_sizes = [int(v) for v in args.group_size.split(",")]
    except ValueError as e:
        p.error(f"--shapes / --m / --group-size: comma-separated integers (shapes as NxK): {e}")
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or not shapes:
        p.error(f"--shapes {args.shapes!r}: comma-separated NxK with positive N and K, e.g. 4096x4096,1024x4304")
    if any(m < 1 for m in ms):
        p.error(f"--m {args.m!r}: token counts must be positive")
    if any(g != -1 and g not in (32, 64, 128) for g in group_sizes):
        p.error(f"--group-size {args.group_size!r}: 32, 64, 128 or -1 (per channel)")
    try:
        _kernels()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    api = compiler_api_problem()
    if api:
        print(f"error: {api}", file=sys.stderr)
        return 2
    results = inspect(archs=archs, shapes=shapes, ms=ms, dtypes=dtypes, group_sizes=group_sizes, sass=not args.no_sass,
                      progress=(lambda s: print(s, file=sys.stderr, flush=True)),
                      bias=(False, True) if args.bias else (False,), isolate=args.isolate)
    print(format_table([c for c in results if problems(c)] if args.problems_only else results))
    if results and any(ARCHS[a].capability >= 90 for a in archs):
        try:
            import triton

            probe = wgmma_in_flight_by_accumulator()
            print(f"\nsm90a, triton {triton.__version__}: a plain GEMM keeps {probe['fp32']} wgmma group(s) in flight "
                  f"with an fp32 accumulator, {probe['int32']} with an int32 one (int8 dots: W4A8)")
        except Exception as e:  # a fact beside the table, not one of its variants
            print(f"\n(the wgmma probe GEMM did not compile: {type(e).__name__}: {e})", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(c) | {"problems": problems(c)} for c in results], f, indent=1, default=str)
    bad = [c for c in results if problems(c)]
    print(f"\n{len(results)} compiled variants, {len(bad)} with problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
