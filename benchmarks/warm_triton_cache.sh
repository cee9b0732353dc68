#!/usr/bin/env bash
# The GPU suite's Triton kernels compiled here, without a GPU, for the device call to carry (kernels/warm_cache.py):
# the GPU machine's first launch of each then finds it in Triton's cache instead of compiling it inside the bench's
# and the profile's time budgets. Run it here (it needs pip's index), before the suite's device call, after the
# last change to the kernels:
#
#   bash benchmarks/warm_triton_cache.sh        # -> .tcache/ (git-ignored, a few MB)
#
# then call the device tool with carry [".whl", ".tcache"]; run_gpu_suite.sh's warm-cache stage installs it (under
# the keys that machine's Triton computes) where it was built by the same Triton version for the same target and
# ptxas, and says so - else it installs nothing and says why, and the kernels compile there as before.
# The build needs the GPU image's Triton (3.6.0 with torch 2.11 there; TRITON_VERSION to change it) in a venv of its
# own beside a CPU torch: the kernels are compiled by that Triton, through its JIT, under a stand-in driver.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
TORCH_VERSION=${WARM_TORCH_VERSION:-2.13.0}   # any CPU torch the package supports: it only holds the tensors
# fla-core: the kernels of MiniCPM-V 4.6's linear attention, which the profile runs where the call carries them
# (fetch_peer_wheels.sh's FLA_VERSION, the same release: its kernels' sources are in their keys); none: left out
FLA_VERSION=${FLA_VERSION:-0.6.0}
EINOPS_VERSION=${EINOPS_VERSION:-0.8.2}
VENV=${WARM_VENV:-/tmp/minicpm-int4-warm-venv}
if ! "$VENV/bin/python" -c "import triton, pytest, sys; sys.exit(triton.__version__ != '$TRITON_VERSION')" 2>/dev/null \
    || { [ "$FLA_VERSION" != none ] && ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('fla-core') != '$FLA_VERSION')" 2>/dev/null; }; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel
  # (the CPU wheel: an unpinned or CUDA torch would pull gigabytes of CUDA libraries; where PyTorch's index cannot
  # be reached, pip's own, whose torch is the CPU wheel on the machines this project is built on)
  "$VENV/bin/python" -m pip install -q --retries 0 --timeout 15 "torch==$TORCH_VERSION" \
      --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  # (CI's pins for the rest - transformers 5.x, whose model classes give the shapes -, not its triton / torch / numpy)
  CONSTRAINTS=()
  if [ -f .ci/constraints.txt ]; then
    grep -v -E "^(triton|torch|numpy)==" .ci/constraints.txt > "$VENV/constraints.txt"
    CONSTRAINTS=(-c "$VENV/constraints.txt")
  fi
  # (pytest: the gpu tests are run here, their kernels compiled - below)
  "$VENV/bin/python" -m pip install -q "${CONSTRAINTS[@]}" "triton==$TRITON_VERSION" transformers safetensors tqdm numpy \
      pytest
  "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  if [ "$FLA_VERSION" != none ]; then
    "$VENV/bin/python" -m pip install -q --no-deps "fla-core==$FLA_VERSION" "einops==$EINOPS_VERSION"
  fi
fi
# TRITON_INTERPRET off (the kernels compiled); no Triton environment variable that changes its cache keys
FLA_ARGS=(); [ "$FLA_VERSION" = none ] && FLA_ARGS=(--fla-tokens 0)
# the suite's gpu-tests stage's kernels too: tests/test_gpu.py run here on CPU tensors, their launches compiled
# (~700 kernels; 6 min on 2 cores, a process a core); WARM_TESTS=0 leaves them out (2 min in all)
TEST_ARGS=(--tests tests/test_gpu.py); [ "${WARM_TESTS:-1}" = 0 ] && TEST_ARGS=()
env -u TRITON_INTERPRET MINICPM_INT4_BUILD_CUDA=0 "$VENV/bin/python" -m minicpm_int4.kernels.warm_cache build --out .tcache \
  "${FLA_ARGS[@]}" "${TEST_ARGS[@]}" "$@"
