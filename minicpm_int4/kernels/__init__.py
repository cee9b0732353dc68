"""Triton kernels (installed as minicpm_int4.kernels; never a top-level `kernels` package, which is
the name of the Hugging Face kernels library). Reached only through minicpm_int4.ops.

TRITON_INTERPRET is read when @triton.jit decorates, i.e. when this package is first imported:
set it before importing minicpm_int4 to run the kernels on CPU tensors in the interpreter.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

from .act_quant import quantize_per_token_int8_triton  # noqa: E402
from .w4a16 import w4a16_gemm_triton  # noqa: E402
from .w4a8 import w4a8_gemm_triton  # noqa: E402

__all__ = ["INTERPRET", "w4a16_gemm_triton", "quantize_per_token_int8_triton", "w4a8_gemm_triton"]
