#!/usr/bin/env bash
# Compile every CUDA kernel with plain nvcc for sm_80 and sm_90a (no torch needed), and
# syntax-check the torch bindings against the installed torch's headers (the CPU wheel lacks one
# generated CUDA header, stubbed here). Run by .ci/run, so a broken kernel never lands.
set -euo pipefail
cd "$(dirname "$0")"
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then
  echo "check_compile: nvcc not found; cannot compile csrc/*.cu" >&2
  exit 1
fi
TORCH_NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for cu in *.cu; do
  for arch in 80 90a; do
    # with the flags torch's CUDAExtension adds (no implicit half/bf16 conversions or operators)
    "$NVCC" -std=c++17 -O3 -c "$cu" -o "$tmp/${cu%.cu}.sm_${arch}.o" \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xcompiler -Wall,-Werror "${TORCH_NVCC_FLAGS[@]}"
    echo "nvcc ok: $cu sm_${arch}"
  done
done
TORCH_DIR=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
PY_INC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=""
for d in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")"; do
  if [ -n "$d" ] && [ -f "$d/include/cuda_runtime_api.h" ]; then CUDA_INC="$d/include"; break; fi
done
[ -n "$CUDA_INC" ] || { echo "check_compile: CUDA headers not found (set CUDA_HOME)" >&2; exit 1; }
mkdir -p "$tmp/stub/c10/cuda/impl" && : > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
for cpp in *.cpp; do
  ${CXX:-g++} -fsyntax-only -std=c++20 -w -I"$tmp/stub" -I"$TORCH_DIR/include" \
    -I"$TORCH_DIR/include/torch/csrc/api/include" -I"$CUDA_INC" -I"$PY_INC" "$cpp"
  echo "g++ syntax ok: $cpp"
done
