"""Builds minicpm_int4._C from csrc/ when torch has CUDA and nvcc exists; otherwise installs pure Python.

    MINICPM_INT4_BUILD_CUDA=1   force the build (fail loudly if it cannot happen, or if it fails)
    MINICPM_INT4_BUILD_CUDA=0   never build it
    (unset)                     build it where torch has CUDA and the CUDA toolkit is found; where it cannot be
                                built, or its compile fails, install pure Python (the Triton kernels) and say why
    TORCH_CUDA_ARCH_LIST        archs to build for (default: the GPU present - an H100 / H200 as sm_90a -,
                                else 8.0;8.6;8.9;9.0a)
    CUDA_HOME / CUDA_PATH       the CUDA toolkit (default: found from nvcc, as nvcc itself finds its headers)

Use `pip install --no-build-isolation .` so that the build sees the installed torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

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


def _nvcc_top(nvcc):
    """The toolkit folder nvcc itself works from (the TOP its --dryrun prints), or None: the nvcc on PATH may be a
    wrapper script or a link in another folder (/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc), where
    torch's guess, the folder above nvcc's, holds no CUDA headers."""
    try:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "probe.cu")
            open(src, "w").close()
            r = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(d, "probe.o")], capture_output=True,
                               text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+?)\s*$", r.stdout + r.stderr, re.M)
    return os.path.normpath(m.group(1)) if m else None


def _cuda_headers(home):
    """The folder of the CUDA runtime headers under a toolkit folder: include/, or targets/<platform>/include/ (the
    layout of conda's and pip's CUDA packages, where include/ may be missing), or None."""
    for d in [os.path.join(home, "include")] + sorted(glob.glob(os.path.join(home, "targets", "*", "include"))):
        if os.path.isfile(os.path.join(d, "cuda_runtime_api.h")):
            return d
    return None


def _cuda_toolkit():
    """(CUDA home, its runtime headers' folder, the folders looked in): CUDA_HOME / CUDA_PATH where set, else
    the folder above the nvcc on PATH (torch's own guess), above the file it links to, the folder nvcc itself
    works from, and /usr/local/cuda - the first that has bin/nvcc and the runtime headers (home None: none)."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")

    def candidates():  # (lazily: nvcc is run only where the folders around it do not hold the toolkit)
        if given:
            yield given
            return
        nvcc = shutil.which("nvcc")
        if nvcc:
            yield os.path.dirname(os.path.dirname(nvcc))
            yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            yield _nvcc_top(nvcc)
        yield "/usr/local/cuda"

    looked = []
    for home in candidates():
        if home is None:
            continue
        home = os.path.normpath(home)
        if home in looked:
            continue
        looked.append(home)
        headers = _cuda_headers(home)
        if headers and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home, headers, looked
    return None, None, looked


def _cuda_extension():
    want = os.environ.get("MINICPM_INT4_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no"):
        _log("MINICPM_INT4_BUILD_CUDA=0: installing pure Python (Triton kernels and torch reference)")
        return None, {}
    forced = want in ("1", "true", "yes")
    try:
        import torch
    except Exception as e:  # torch absent in an isolated build environment
        reason = f"torch is not importable in the build environment ({e}); use --no-build-isolation"
        if forced:
            raise RuntimeError(reason)
        _log(f"skipping the CUDA extension: {reason}")
        return None, {}
    home, headers, looked = (None, None, []) if torch.version.cuda is None else _cuda_toolkit()
    if torch.version.cuda is None or home is None:
        reason = (f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None else
                  "the CUDA toolkit (bin/nvcc and include/cuda_runtime_api.h) is not in " + ", ".join(looked) +
                  ("; set CUDA_HOME to the toolkit's folder" if not os.environ.get("CUDA_HOME") else ""))
        if forced:
            raise RuntimeError(f"MINICPM_INT4_BUILD_CUDA=1 but {reason}")
        _log(f"skipping the CUDA extension: {reason}; installing pure Python")
        return None, {}
    # torch's build reads CUDA_HOME when torch.utils.cpp_extension is imported (and from that module afterwards)
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        archs = _default_arch_list(torch)
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    _log(f"building minicpm_int4._C from {sources} for TORCH_CUDA_ARCH_LIST="
         f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(the GPU present)')} with the CUDA toolkit in {home}")
    ext = CUDAExtension(
        name="minicpm_int4._C",
        sources=sources,
        depends=sorted(glob.glob(os.path.join("csrc", "*.cuh")) + glob.glob(os.path.join("csrc", "*.h"))),  # a header change rebuilds
        # torch adds CUDA_HOME/include; a toolkit laid out as targets/<platform>/include needs its own
        include_dirs=[] if headers == os.path.join(home, "include") else [headers],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},  # no fast-math: kernels round like the reference
        optional=not forced,  # (setuptools then copies no missing library into an editable checkout)
    )
    return ext, {"build_ext": _optional_build(BuildExtension, forced)}


def _optional_build(build_extension, forced):
    """torch's BuildExtension, where a failed compile of the extension - unless the build was forced - installs
    the package without it (the Triton kernels and the reference still run; `minicpm-int4 env` says the
    extension is not built) instead of failing the whole install, and removes an older build's library from the
    checkout, which an editable install would otherwise go on loading."""

    class OptionalBuildExtension(build_extension):
        def build_extensions(self):  # (torch's checks - nvcc's CUDA against torch's, the compiler - then each build)
            try:
                super().build_extensions()
            except Exception as e:
                if forced:
                    raise
                for ext in self.extensions:
                    stale = os.path.join(HERE, *ext.name.split(".")[:-1],
                                         os.path.basename(self.get_ext_filename(self.get_ext_fullname(ext.name))))
                    if os.path.exists(stale):
                        os.remove(stale)
                bar, why = "=" * 100, str(e)
                if len(e.args) > 1 and isinstance(e.args[0], str):  # torch's CUDA-mismatch error: (format, values...)
                    try:
                        why = e.args[0] % e.args[1:]
                    except (TypeError, ValueError):
                        pass
                _log(f"\n{bar}\nthe CUDA extension minicpm_int4._C failed to build ({type(e).__name__}: {why});\n"
                     "installing without it: the Triton kernels and the torch reference run, backend='cuda' does not.\n"
                     "The compiler's messages are above; MINICPM_INT4_BUILD_CUDA=1 makes this failure fail the "
                     f"install.\n{bar}")

    return OptionalBuildExtension


ext, cmdclass = _cuda_extension()
# license here, `dynamic` in pyproject.toml: its table form warns under setuptools >= 77 ("deprecated,
# update by 2027-Feb-18") and its SPDX-string form is an error before 77 (a fresh Python 3.11 venv has 65)
setup(ext_modules=[ext] if ext is not None else [], cmdclass=cmdclass, license="Apache-2.0")
