"""Builds minicpm_int4._C from csrc/ when torch has CUDA and nvcc exists; otherwise installs pure Python.

    MINICPM_INT4_BUILD_CUDA=1   force the build (fail loudly if it cannot happen)
    MINICPM_INT4_BUILD_CUDA=0   never build it
    TORCH_CUDA_ARCH_LIST        archs to build for (default: the GPU present - an H100 / H200 as sm_90a -,
                                else 8.0;8.6;8.9;9.0a)

Use `pip install --no-build-isolation .` so that the build sees the installed torch.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[minicpm_int4 setup] {msg}", file=sys.stderr)


def _default_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST where none is set: without a visible GPU, every arch the package supports; on
    Hopper GPUs (capability 9.0 only), sm_90a - the target CI compiles (csrc/check_compile.sh) and
    `minicpm-int4 inspect-cuda` reads, where torch's own choice would be sm_90 + PTX; on other GPUs None:
    torch's choice, each visible GPU's arch."""
    if not torch.cuda.is_available():
        return "8.0;8.6;8.9;9.0a"
    caps = {tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
    return "9.0a" if caps == {(9, 0)} else None


def _cuda_extension():
    want = os.environ.get("MINICPM_INT4_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no"):
        _log("MINICPM_INT4_BUILD_CUDA=0: installing pure Python (Triton kernels and torch reference)")
        return None, {}
    forced = want in ("1", "true", "yes")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch absent in an isolated build environment
        reason = f"torch is not importable in the build environment ({e}); use --no-build-isolation"
        if forced:
            raise RuntimeError(reason)
        _log(f"skipping the CUDA extension: {reason}")
        return None, {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if torch.version.cuda is None or not CUDA_HOME or not nvcc:
        reason = (f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None
                  else "nvcc / CUDA_HOME not found")
        if forced:
            raise RuntimeError(f"MINICPM_INT4_BUILD_CUDA=1 but {reason}")
        _log(f"skipping the CUDA extension: {reason}; installing pure Python")
        return None, {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        archs = _default_arch_list(torch)
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    _log(f"building minicpm_int4._C from {sources} for TORCH_CUDA_ARCH_LIST="
         f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(the GPU present)')}")
    ext = CUDAExtension(
        name="minicpm_int4._C",
        sources=sources,
        depends=sorted(glob.glob(os.path.join("csrc", "*.cuh")) + glob.glob(os.path.join("csrc", "*.h"))),  # a header change rebuilds
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # no fast-math: kernels round like the reference
    )
    return ext, {"build_ext": BuildExtension}


ext, cmdclass = _cuda_extension()
# license here, `dynamic` in pyproject.toml: its table form warns under setuptools >= 77 ("deprecated,
# update by 2027-Feb-18") and its SPDX-string form is an error before 77 (a fresh Python 3.11 venv has 65)
setup(ext_modules=[ext] if ext is not None else [], cmdclass=cmdclass, license="Apache-2.0")
