"""Launching a Triton kernel again without Triton's per-call argument binding.

`kernel[grid](*args, **kwargs)` costs 7 us (the GEMV, ~30 arguments) to 22 us (the autotuned decode
kernel) of host time in Triton 3.6 / 3.9 before the launcher runs (this machine's CPU;
benchmarks/results/cpu/triton_launch_cost*.md), more in 3.4:
JITFunction.run binds and specialises every argument, turns the specialisation into a string key,
looks the compiled kernel up and checks the kernel's globals, and an autotuned kernel first builds
the autotuner's key. An eager decode step pays that per layer, on top of the kernel's few
microseconds. `fast_launch(kernel)` wraps a `@triton.jit` (or `triton.autotune`d) kernel with the same
call syntax: the first call of each specialisation goes through Triton as before (compiling and
autotuning as usual) and records what Triton launched; later calls with the same specialisation hand
the same arguments to the same compiled kernel's launcher directly.

The specialisation key is computed by a function generated from the first call's argument kinds,
at least as fine as Triton's own:
- a tensor: its dtype and whether its data pointer is 16-byte aligned (Triton's "D");
- an int: its class, whether it is 1 (a constexpr to Triton), divisible by 16 ("D"), inside int32,
  and past int64 (i32 / i64 / u64); the exact value for the autotuner's key arguments;
- a float, bool or None: its class (Triton does not specialise their values);
- any keyword argument (constexprs, num_warps, ...): its class and value;
- the current device.
A call whose argument kinds differ from the first call's (a None where a tensor was, another keyword)
cannot produce a recorded key - the generated function raises or yields another class - and goes
through Triton. tests/test_launch.py checks, with a stand-in driver that compiles for real and records
launches, that every launch site of the package hands its launcher the same kernel and arguments
both ways, over argument variations of every kind.

Off (every call through Triton) under the interpreter, where a launch hook is set (profilers), for a
kernel with pre-run hooks or an autotune config with a pre_hook, on Triton before 3.4 (3.3's launch
takes its hooks from CompiledKernel; checked on 3.4, 3.5, 3.6 and 3.9), and with
MINICPM_INT4_FAST_LAUNCH=0. Not checked per call, unlike Triton: that the globals a kernel reads kept
their values (this package's kernels read only constants).
"""
import functools
import os

import triton

from . import INTERPRET, _common

ENABLED = os.environ.get("MINICPM_INT4_FAST_LAUNCH", "1") != "0"


def _version_ok() -> bool:
    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 4)


_SUPPORTED = _version_ok()


def through_triton():
    """Every launch through Triton's own path inside the block (the benchmark's host time of Triton's
    launch, `host_us_triton_launch`; not thread-safe)."""
    return _common.module_setting(globals(), "ENABLED", False)


def fast_launch(kernel):
    """`kernel` wrapped so that kernel[grid](...) skips Triton's binding on repeated specialisations
    (the module docstring); the kernel itself under the interpreter."""
    if INTERPRET:
        return kernel
    return FastLaunch(kernel)


LAUNCHERS = []  # every FastLaunch made (the package's kernels once they are imported): launch counts, tests


class _Entry:
    __slots__ = ("run", "function", "packed", "kernel", "tail", "meta")

    def __init__(self, kernel, tail, meta):
        self.kernel = kernel
        self.run = kernel.run
        self.function = kernel.function
        self.packed = kernel.packed_metadata
        self.tail = tail          # the arguments after the positional ones, in the kernel's parameter order
        self.meta = meta          # {name: value} of those, for a callable grid


class FastLaunch:
    """A Triton kernel (JITFunction or Autotuner) with kernel[grid](...) as Triton's, repeated
    specialisations launched directly (the module docstring). `.kernel` is the wrapped object."""

    def __init__(self, kernel):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        self.kernel = kernel
        self.tuner = kernel if isinstance(kernel, Autotuner) else None
        self.jit = kernel.fn if self.tuner is not None else kernel
        self.usable = _SUPPORTED and isinstance(self.jit, JITFunction)
        self.params = [p.name for p in self.jit.params] if self.usable else []
        self.key_fn = None        # generated at the first call
        self.kinds = None         # the first call's argument kinds, which key_fn assumes
        self.entries = {}
        self.launches = 0         # calls launched directly (tests)
        LAUNCHERS.append(self)

    # the attributes aot.py and the tests read on the kernel (fn, configs, keys, ...)
    def __getattr__(self, name):
        if name == "kernel":  # (not set yet)
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return functools.partial(self._call, grid)

    def _call(self, grid, *args, **kwargs):
        if not (ENABLED and self.usable):
            return self.kernel[grid](*args, **kwargs)
        if self.key_fn is not None:
            rt = triton.knobs.runtime
            if not (_hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook) or self.jit.pre_run_hooks):
                drv = triton.runtime.driver.active
                device = drv.get_current_device()
                try:
                    entry = self.entries.get((device, self.key_fn(*args, **kwargs)))
                except Exception:  # noqa: BLE001 - another argument kind than the first call's: through Triton
                    entry = None
                if entry is not None:
                    if callable(grid):
                        grid = grid(entry.meta)
                    n = len(grid)
                    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, drv.get_current_stream(device),
                              entry.function, entry.packed, None, None, None, *args, *entry.tail)
                    self.launches += 1
                    return entry.kernel
        return self._through_triton(grid, args, kwargs)

    def _through_triton(self, grid, args, kwargs):
        """Triton's own launch; then, where this call's argument kinds are the recorded ones, its
        compiled kernel and trailing arguments are kept under the call's key."""
        kernel = self.kernel[grid](*args, **kwargs)
        if hasattr(kernel, "result"):  # an asynchronous compile's future
            kernel = kernel.result()
        if kernel is None or not all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
            return kernel  # (nothing launched: a warm-up, or kernels/aot.py's recorder)
        kinds = _kinds(args, kwargs)
        if self.key_fn is None:
            tuned = set(self.tuner.keys) if self.tuner is not None else set()
            self.key_fn = _make_key_fn(self.params, kinds, tuned)
            self.kinds = kinds
        if kinds != self.kinds:
            return kernel
        named = dict(kwargs)
        if self.tuner is not None:
            config = self.tuner.best_config
            if getattr(config, "pre_hook", None) is not None:  # runs before every launch: Triton's path keeps it
                return kernel
            named.update(config.kwargs)
        tail = []
        for p in self.jit.params[len(args):]:
            if p.name in named:
                tail.append(named[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:  # an argument this launch left to Triton; launch such calls through it
                return kernel
        try:
            key = (triton.runtime.driver.active.get_current_device(), self.key_fn(*args, **kwargs))
        except Exception:  # noqa: BLE001
            return kernel
        self.entries[key] = _Entry(kernel, tuple(tail), dict(zip(self.params[len(args):], tail)))
        return kernel


def _hooked(hook) -> bool:
    """A launch hook that would run: None where none is set (Triton 3.4 / 3.5), or an empty HookChain (>= 3.6)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def _kinds(args, kwargs):
    return (tuple("tensor" if hasattr(a, "data_ptr") and hasattr(a, "dtype") else type(a) for a in args),
            tuple(kwargs))


def _make_key_fn(params, kinds, tuned):
    """def key(a0, ..., *, NAME, ...): a tuple at least as fine as Triton's specialisation (and the
    autotuner's key) of calls with these argument kinds; raises for a tensor position given another
    kind, and yields another class for a scalar position given another kind."""
    arg_kinds, kw_names = kinds
    names = [f"a{i}" for i in range(len(arg_kinds))]
    parts = []
    for i, (name, kind) in enumerate(zip(names, arg_kinds)):
        if kind == "tensor":
            parts.append(f"{name}.dtype, {name}.data_ptr() & 15 == 0")
        elif kind is int:
            parts.append(f"{name}.__class__, {name} == 1, {name} & 15 == 0, -2147483648 <= {name} <= 2147483647, "
                         f"{name} > 9223372036854775807")
            if i < len(params) and params[i] in tuned:
                parts.append(name)
        else:  # float / bool / None / anything else: its class (and the value, where hashable and tuned)
            parts.append(f"{name}.__class__")
            if i < len(params) and params[i] in tuned:
                parts.append(name)
    for kw in kw_names:
        parts.append(f"{kw}.__class__, {kw}")
    sig = ", ".join(names + (["*"] + list(kw_names) if kw_names else []))
    src = f"def key({sig}):\n    return ({', '.join(parts)},)\n"
    scope = {}
    exec(compile(src, "<minicpm_int4 launch key>", "exec"), scope)  # noqa: S102 - generated from argument kinds
    return scope["key"]
