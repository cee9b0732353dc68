#!/usr/bin/env bash
# The CUDA extension minicpm_int4._C built here, without a GPU, against the GPU image's own torch, for the suite's
# device call to carry (benchmarks/prebuilt_extension.py): run_gpu_suite.sh then installs it instead of compiling
# csrc/ on each fresh GPU machine (its install stage: most of a minute of device time a call). Run it here (it
# needs pip's index and this machine's nvcc), after the last change to csrc/ or setup.py:
#
#   bash benchmarks/prebuild_extension.sh        # -> .prebuilt/ (git-ignored: the library and its manifest)
#
# then call the device tool with carry [".whl", ".tcache", ".prebuilt"]. The suite's install-prebuilt stage takes
# the library only where it matches - the checkout's csrc/ and setup.py, the image's torch build, its Python, the
# GPU's architecture - and loads; else it says why and the install stage builds the extension as before.
# Made for that image: Python 3.12, torch 2.11.0 (its CUDA 13.0 build, PyPI's), an H100 / H200 (sm_90a);
# PREBUILD_PY_VERSION (and PREBUILD_PYTHON, an interpreter of it), PREBUILD_TORCH_VERSION and PREBUILD_ARCHS change
# them; PREBUILD_VENV is the venv (made again where its Python or torch differs).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${PREBUILD_TORCH_VERSION:-2.11.0}
ARCHS=${PREBUILD_ARCHS:-9.0a}
PY_VERSION=${PREBUILD_PY_VERSION:-3.12}
VENV=${PREBUILD_VENV:-/tmp/minicpm-int4-prebuild-venv}
if [ -z "${PREBUILD_PYTHON:-}" ]; then
  # (each one run, not only looked up: pyenv's shim python3.12 is on PATH for every installed version but runs only
  # where that version is selected - "pyenv: python3.12: command not found" on a machine whose global is 3.11)
  for p in "python$PY_VERSION" "$HOME"/.pyenv/versions/"$PY_VERSION".*/bin/python; do
    if "$p" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$PY_VERSION')" > /dev/null 2>&1; then
      PREBUILD_PYTHON=$p; break
    fi
  done
fi
if [ -z "${PREBUILD_PYTHON:-}" ]; then
  echo "no Python $PY_VERSION found (python$PY_VERSION, pyenv): set PREBUILD_PYTHON to one" >&2; exit 1
fi
# (a venv of another Python would build a library the image's Python cannot import: made again)
if ! "$VENV/bin/python" -c "import torch, ninja, sys; sys.exit('%d.%d' % sys.version_info[:2] != '$PY_VERSION' or torch.__version__.split('+')[0] != '$TORCH_VERSION' or torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$VENV"
  "$PREBUILD_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
  # PyPI's torch: its CUDA build (the image's is PyPI's 2.11.0+cu130), with its CUDA libraries - several GB
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" ninja numpy
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT
# forced (a failed build fails here, naming why); the toolkit as setup.py finds it (CUDA_HOME, else around nvcc)
env TORCH_CUDA_ARCH_LIST="$ARCHS" MINICPM_INT4_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$VENV/bin/python" setup.py -q build_ext --build-lib "$TMP/lib" --build-temp "$TMP/tmp"
# (debug sections dropped where binutils' strip is here: a smaller carry - the library's code is untouched)
if command -v strip > /dev/null; then strip --strip-debug "$TMP"/lib/minicpm_int4/_C.*.so; fi
"$VENV/bin/python" benchmarks/prebuilt_extension.py pack "$TMP"/lib/minicpm_int4/_C.*.so --archs "$ARCHS" --out .prebuilt
