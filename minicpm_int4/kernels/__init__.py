"""Triton kernels (installed as minicpm_int4.kernels; never a top-level `kernels` package, which is
the name of the Hugging Face kernels library). Reached only through minicpm_int4.ops.

TRITON_INTERPRET is read when @triton.jit decorates, i.e. when this package is first imported:
set it before importing minicpm_int4 to run the kernels on CPU tensors in the interpreter.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import functools  # noqa: E402
from typing import Optional  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .act_quant import quantize_per_token_int8_triton  # noqa: E402
from .w4a16 import w4a16_gemm_triton  # noqa: E402
from .w4a8 import w4a8_gemm_triton  # noqa: E402

__all__ = ["INTERPRET", "interpreter_problem", "w4a16_gemm_triton", "quantize_per_token_int8_triton",
           "w4a8_gemm_triton"]


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    acc = 0
    for _ in range(0, n, 1):  # a loop bound that is a kernel argument, as in every kernel here
        acc += 1
    tl.store(out_ptr, acc)


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> Optional[str]:
    """None if the Triton interpreter can run these kernels here, else why not. Known case: triton
    3.6's interpreter (not 3.9's) turns a loop bound into a Python int with int() of a 1-element
    numpy array, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"), so every kernel with a runtime-bounded loop fails inside the interpreter."""
    if not INTERPRET:
        return None
    import numpy
    import torch

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the cause
        cause = e.__cause__ or e
        return (f"the Triton interpreter of triton {triton.__version__} cannot run these kernels with numpy "
                f"{numpy.__version__} ({type(cause).__name__}: {cause}); use a triton whose interpreter handles "
                "it (3.9 does), or numpy < 2.4")
    if int(out[0]) != 3:
        return f"the Triton interpreter of triton {triton.__version__} ran a 3-trip loop {int(out[0])} times"
    return None
