"""What an input scale (QuantConfig.input_scales) costs at runtime: one int4 layer timed with and without
`input_scale`, eager and, on a GPU, replayed from a CUDA graph (where launch overhead is what is left of a
decode step's host cost). W4A16: multiplied into the Triton kernels' loads of x (forced, for prefill
too), and on a GPU also timed as a separate elementwise pass first (kernels.w4a16.FUSE_INPUT_SCALE =
False for decode, M <= 16, and FUSE_INPUT_SCALE_PREFILL = False for prefill: which is faster); W4A8 from ops.W4A8_MIN_M rows on: inside
the activation quantizer's pass; with the CUDA extension built, its W4A16 decode kernels too (fused in
their loads of x). Likewise an act-order layer's channel order (QuantLinear.input_perm, from GPTQ /
compressed-tensors checkpoints, foreign.py): read through by the Triton decode kernels and activation
quantizer and the CUDA extension's tensor-core kernel, and on a GPU also timed as a gather pass first
(kernels.w4a16.FUSE_INPUT_PERM = False; ops.CUDA_FUSE_INPUT_PERM = False); the other paths always gather
first. Prints a line per layer kind and M for each; the GPU suite runs it into
suite.log.

    python benchmarks/input_scale_cost.py [--n 4096] [--k 4096] [--ms 1,16,4096]
"""
import argparse
import contextlib
import statistics

import torch
from torch import nn

from minicpm_int4 import QuantConfig, QuantLinear


def _median_ms(fn, reps: int, device: torch.device, inner: int = 10) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls (so that a call of a few
    microseconds is not lost in the timer's own cost)."""
    for _ in range(3):
        fn()
    times = []
    if device.type != "cuda":
        import time

        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / inner)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _graphed(layer, x):
    """layer(x) captured in a CUDA graph (warmed up on a side stream first, as torch's docs do)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layer(x)
    return g.replay


# (module, switch): kernels.w4a16's for the Triton kernels, ops' for the CUDA extension
SCALE_FLAGS = (("w4a16", "FUSE_INPUT_SCALE"), ("w4a16", "FUSE_INPUT_SCALE_PREFILL"))
PERM_FLAGS = (("w4a16", "FUSE_INPUT_PERM"),)
CUDA_PERM_FLAGS = (("ops", "CUDA_FUSE_INPUT_PERM"),)


@contextlib.contextmanager
def _switched(flags, value):
    """The switches `flags` set to `value` inside the block (True: fused; False: a pass of its own first)."""
    if not flags:
        yield
        return
    from minicpm_int4 import ops
    from minicpm_int4.kernels import w4a16

    modules = {"w4a16": w4a16, "ops": ops}
    saved = {(mod, f): getattr(modules[mod], f) for mod, f in flags}
    try:
        for mod, f in flags:
            setattr(modules[mod], f, value)
        yield
    finally:
        for (mod, f), v in saved.items():
            setattr(modules[mod], f, v)


def _line(what, label, n, k, dtype, rows_m, row, name, kinds):
    return (f"{what} cost, {label} {n} x {k} G=128 {str(dtype).replace('torch.', '')} M={rows_m}: " + "; ".join(
        f"{kind} {row[f'plain_{kind}_ms'] * 1e3:.1f} us -> {row[f'{name}_{kind}_ms'] * 1e3:.1f} us "
        f"({row[f'{name}_{kind}_ms'] / row[f'plain_{kind}_ms']:.2f}x)"
        + (f", separate pass {row[f'{name}_separate_{kind}_ms'] * 1e3:.1f} us"
           if f"{name}_separate_{kind}_ms" in row else "") for kind in kinds))


def measure(device="cuda", n: int = 4096, k: int = 4096, ms=(1, 16, 4096), reps: int = 50, dtype=torch.float16,
            backend: str = "auto"):
    from minicpm_int4 import ops
    from minicpm_int4.ops import W4A8_MIN_M

    device = torch.device(device)
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False).to(device=device, dtype=dtype)
    m = torch.rand(k, device=device) + 0.5
    perm = torch.randperm(k, device=device).to(torch.int32)
    rows = []
    kinds = ("eager", "graph") if device.type == "cuda" else ("eager",)
    # (backend, act): the requested backend; on a GPU with the CUDA extension built, its W4A16 decode
    # kernels too (which multiply the scale into their loads of x as well; its W4A8 GEMM takes the scale
    # in its quantizer, as the Triton path does, so it is not timed apart here), before W4A8, whose first
    # call autotunes, should the suite's time limit cut the script short
    runs = [(backend, None)]
    if device.type == "cuda" and backend == "auto" and ops.cuda_extension_error() is None:
        runs.append(("cuda", None))
    runs.append((backend, "int8"))
    with torch.no_grad():
        for be, act in runs:
            config = QuantConfig(group_size=128, act=act, backend=be)
            plain = QuantLinear.from_linear(lin, config)
            scaled = QuantLinear.from_linear(lin, config, input_scale=m)
            permuted = QuantLinear(k, n, bias=False, group_size=128, dtype=dtype, device=device, act=act, backend=be,
                                   input_perm=True)
            permuted.load_state_dict({**plain.state_dict(), "input_perm": perm})
            for rows_m in ms:
                if act == "int8" and rows_m < W4A8_MIN_M:
                    continue  # the W4A16 path, timed above
                if be == "cuda" and rows_m > 16:
                    continue  # the extension's kernels are for decode
                x = torch.randn(rows_m, k, device=device, dtype=dtype)
                row = {"n": n, "k": k, "m": rows_m, "act": act or "fp", "backend": be}
                # (name, layer, switches, their value); the Triton W4A16 kernels both ways where they run, the
                # fused one forced (the prefill default on a GPU is the separate pass, which this measured faster)
                both = act is None and be != "cuda" and (device.type == "cuda" or be == "triton")
                variants = [("plain", plain, (), None), ("input_scale", scaled, SCALE_FLAGS if both else (), True),
                            ("input_perm", permuted, (), None)]
                if both:
                    variants.append(("input_scale_separate", scaled, SCALE_FLAGS, False))
                    if rows_m <= 16:  # prefill always gathers first
                        variants.append(("input_perm_separate", permuted, PERM_FLAGS, False))
                if be == "cuda":  # the tensor-core kernel reading x through the order, or torch's gather first
                    variants.append(("input_perm_separate", permuted, CUDA_PERM_FLAGS, False))
                for name, layer, flags, value in variants:
                    with _switched(flags, value):
                        row[f"{name}_eager_ms"] = _median_ms(lambda: layer(x), reps, device)
                        if device.type == "cuda":
                            row[f"{name}_graph_ms"] = _median_ms(_graphed(layer, x), reps, device)
                rows.append(row)
                label = ("W4A8" if act else "W4A16") + (" CUDA extension" if be == "cuda" else "")
                print(_line("input scale", label, n, k, dtype, rows_m, row, "input_scale", kinds), flush=True)
                print(_line("input perm", label, n, k, dtype, rows_m, row, "input_perm", kinds), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--ms", default="1,16,4096")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args(argv)
    measure(a.device, a.n, a.k, tuple(int(v) for v in a.ms.split(",")), a.reps)


if __name__ == "__main__":
    main()
