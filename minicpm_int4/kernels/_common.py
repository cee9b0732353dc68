"""Helpers shared by the Triton kernels: int4 unpacking and launch-time device facts."""
import contextlib
import functools
import inspect
import os

import torch
import triton
import triton.language as tl


# Autotuning results kept on disk (Triton's cache, ~/.triton/cache or TRITON_CACHE_DIR) where this Triton can:
# a new process that launches a kernel on a shape tuned before takes the stored winner instead of timing
# every config again - an eager model's first forward times the decode and prefill configs of each of its
# layer shapes. The entry is keyed by Triton's version, the GPU target (sm_90: an H100 and an H200 share
# it), the kernel's source, the tuning key (shapes, dtypes) and the configs. MINICPM_INT4_AUTOTUNE_CACHE=0
# times every config again in each process (what a benchmark of the tuning itself wants).
AUTOTUNE_CACHE = os.environ.get("MINICPM_INT4_AUTOTUNE_CACHE", "1") != "0"


def triton_at_least(major: int, minor: int) -> bool:
    """This Triton is major.minor or newer (a choice the compiled code was measured to favour only from there)."""
    try:
        got = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return got >= (major, minor)


def autotune_cache_supported() -> bool:
    """Whether this Triton's autotune can keep its results on disk (cache_results: triton >= 3.4)."""
    return "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs, key, prune=None):
    """triton.autotune with a short benchmark per config (5 ms warm-up, 25 ms timing) where this
    Triton lets us choose, so that first calls on many shapes (the benchmark sweep) stay quick, and
    its results cached on disk (AUTOTUNE_CACHE) where it can. prune(configs, kwargs) -> the configs
    worth timing for this launch on this GPU (kwargs: the launch's keyword arguments, the constexprs
    among them; see min_capability)."""
    kw = {}
    if prune is not None:
        kw["prune_configs_by"] = {"early_config_prune": lambda configs, named_args, **kwargs: prune(configs, kwargs)}
    params = inspect.signature(triton.autotune).parameters
    if "do_bench" in params:
        from triton.testing import do_bench

        kw["do_bench"] = lambda fn, quantiles: do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
    if "cache_results" in params and AUTOTUNE_CACHE and os.environ.get("TRITON_INTERPRET", "0") != "1":
        kw["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kw)


@triton.jit
def _unpack_int4_tile(words, BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_KW, BLOCK_N] (packing.py: nibble i of word j = element 8*j + i along K)
    -> int32 values 0..15 [BLOCK_KW * 8, BLOCK_N], row index k = 8*j + i."""
    shifts = tl.arange(0, 8) * 4
    q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
    return tl.reshape(q, (BLOCK_KW * 8, BLOCK_N))


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row tiles walk each column of
    weight tiles together, so a weight tile is reused from L2 instead of re-read from memory."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows
    return pid_m, pid_n


def target_capability(device=None) -> int:
    """Compute capability of `device` (default: the current GPU) as 80, 90, ... (kernels/aot.py sets
    its target's). Cached: launchers ask on every call."""
    if device is None or device.index is None:
        return _capability(torch.cuda.current_device())
    return _capability(device.index)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


# Facts about an autotune config the kernel files' prune functions read (min_capability, dot_fp32), kept
# beside the config rather than on it: Triton's on-disk autotuning cache (AUTOTUNE_CACHE) stores a config
# as its attributes and rebuilds it with Config(**attributes), which refuses any of ours.
_CONFIG_TAGS = {}


def tag_config(config, **tags):
    """`config` with `tags` recorded for config_tag (the config object itself is left as Triton made it)."""
    _CONFIG_TAGS[id(config)] = (config, tags)  # (the config held: its id stays its own)
    return config


def config_tag(config, name: str, default=None):
    entry = _CONFIG_TAGS.get(id(config))
    return entry[1].get(name, default) if entry is not None and entry[0] is config else default


def min_capability(configs):
    """Drop configs this GPU cannot run well: below their `min_capability`, or - for a config tagged
    `datacenter_mma` (tag_config, by the kernel file) - on a GPU without the data-centre parts' large
    accumulators (wgmma on sm_90, tcgen05 on sm_100 / 103): consumer Blackwell (sm_120 / 121) has
    Ampere's mma.sync, where such a tile spills as on sm_80."""
    if len(configs) <= 1:  # the interpreter's single config; nothing to choose
        return configs
    cap = target_capability()
    datacenter = 90 <= cap < 110
    return [c for c in configs if config_tag(c, "min_capability", 0) <= cap
            and (datacenter or not config_tag(c, "datacenter_mma", False))] or configs


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr functions since
# triton 3.6: called from Python they unwrap every argument, ~10x a plain function, and a decode
# launch computes several of them per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


# The GEMM kernels compute element offsets in 32 bits (row * row stride + column; the pointers are
# 64-bit): an operand spanning 2**31 elements or more (M x N >= 2**31: a 151k-vocabulary lm_head over
# 14k tokens) would wrap around and read or write out of bounds. Such calls run in row slices that fit.
MAX_OFFSET = 2**31 - 1


def row_slices(m: int, *row_strides: int):
    """[(m0, m1), ...] covering rows 0..m in slices whose last element of every operand (row stride
    `row_strides`) lies below MAX_OFFSET; one slice for every realistic call. Slices hold whole
    256-row tiles where they can."""
    span = max(1, *row_strides)
    rows = MAX_OFFSET // span
    if m <= rows:
        return [(0, m)]
    if rows >= 256:
        rows -= rows % 256
    if rows < 1:
        raise ValueError(f"a row of {span} elements exceeds the kernels' 32-bit offsets")
    return [(m0, min(m, m0 + rows)) for m0 in range(0, m, rows)]


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are enough to exercise split-K
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


# The interpreter casts fp32 -> bf16 by truncation; GPUs round to nearest even. Kernels round bf16
# by hand under the interpreter so that both follow the package's rounding rule.
_INTERPRET_BF16_FIX = tl.constexpr(__import__("os").environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x -> DTYPE, round to nearest even (finite values)."""
    if _INTERPRET_BF16_FIX:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _times_input_scale(x, m):
    """x * m in x's dtype, rounded as torch's `x * m` rounds it (QuantLinear.input_scale, fused into
    a kernel's loads without changing a bit): an fp16 or bf16 product is exact in fp32, so one
    rounding of it is the correctly rounded product. fp16 and fp32 multiply natively (mul.rn.f16 /
    f16x2 on the GPU, numpy's in the interpreter); bf16 goes through fp32 and _round_to, which also
    rounds correctly in the interpreter and on GPUs without a bf16 multiply (sm_80)."""
    if x.dtype == tl.bfloat16:
        return _round_to(x.to(tl.float32) * m.to(tl.float32), tl.bfloat16)
    return x * m


@contextlib.contextmanager
def module_setting(module_globals: dict, name: str, value):
    """A kernel module's setting `name` (one of `module_globals`, its globals()) at `value` inside the
    block: the measurement switches the benchmark's variant rows run under (not thread-safe)."""
    saved = module_globals[name]
    module_globals[name] = value
    try:
        yield
    finally:
        module_globals[name] = saved
