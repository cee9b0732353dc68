"""setup.py's build decision on a machine without CUDA: pure Python by default, a clear error when
the CUDA build is forced, nothing attempted when it is switched off."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(env_value):
    env = dict(os.environ)
    env.pop("MINICPM_INT4_BUILD_CUDA", None)
    if env_value is not None:
        env["MINICPM_INT4_BUILD_CUDA"] = env_value
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_cpu_torch_installs_pure_python():
    r = _setup(None)
    assert r.returncode == 0, r.stderr
    assert "skipping the CUDA extension" in r.stderr and "has no CUDA" in r.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_forced_cuda_build_fails_loudly_without_cuda_torch():
    r = _setup("1")
    assert r.returncode != 0
    assert "MINICPM_INT4_BUILD_CUDA=1 but torch" in r.stderr


def test_build_switched_off():
    r = _setup("0")
    assert r.returncode == 0 and "MINICPM_INT4_BUILD_CUDA=0" in r.stderr


def test_every_kernel_source_is_built():
    # setup.py globs csrc/*.cu and csrc/*.cpp; every extern "C" launcher a .cu file defines is declared
    # once, in csrc/launchers.h, which that .cu file includes (so nvcc checks the definition against
    # the declaration: extern "C" symbols link whatever their parameters) and so does bindings.cpp
    import glob
    import re
    header = open(os.path.join(ROOT, "csrc", "launchers.h")).read()
    declared = set(re.findall(r"^(?:cudaError_t|int) (minicpm_int4_\w+)\(", header, re.M))
    defined = set()
    for cu in glob.glob(os.path.join(ROOT, "csrc", "*.cu")):
        src = open(cu).read()
        names = set(re.findall(r'extern "C" (?:cudaError_t|int) (\w+)\(', src))
        if names:
            assert '#include "launchers.h"' in src, f"{cu} defines launchers {names} but does not include launchers.h"
        defined |= names
    bindings = open(os.path.join(ROOT, "csrc", "bindings.cpp")).read()
    assert defined and defined == declared, (defined, declared)
    assert '#include "launchers.h"' in bindings and 'extern "C"' not in bindings
    assert all(name in bindings for name in declared)
