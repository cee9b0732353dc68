#!/usr/bin/env bash
# The whole GPU suite in one call, on a bare GPU machine, inside ~9 minutes:
#   1. install the package from this checkout, building the CUDA extension (the image's own torch,
#      triton and transformers are kept: --no-deps);
#   2. the gpu-marked tests;
#   3. `minicpm-int4 bench` (kernel sweep) and `minicpm-int4 profile` (end to end);
# and writes, under one folder (default $OUT, the device tool's return folder):
#   suite.log        everything printed, stage by stage, with each stage's exit code and seconds
#   summary.md       the bench and profile Markdown tables
#   results.tar.gz   every JSON / Markdown / PNG file: unpack into benchmarks/results/<gpu>/, then
#                    `python benchmarks/update_readme.py` regenerates the README's performance section
# Each stage has its own time limit so that a slow stage cannot eat the others' time.
#
#   bash benchmarks/run_gpu_suite.sh [OUT_DIR]
#   SUITE_QUICK=1 bash benchmarks/run_gpu_suite.sh   # smaller sweep (for iterating)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-suite-out}}
WORK="$OUT_DIR/work"
mkdir -p "$WORK"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
export MINICPM_INT4_COMMIT=${MINICPM_INT4_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== [$name] (limit ${limit}s): $*" >> "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 ))s" >> "$LOG"
  return $rc
}

if [ -n "${SUITE_QUICK:-}" ]; then
  BENCH_ARGS=(--ms 1,16,256,4096 --rep-ms 25 --max-n 20000 --time-budget-s 150)
  PROFILE_ARGS=(--models llama3-v2.5 --new-tokens 32 --modes eager --time-budget-s 120)
else
  BENCH_ARGS=(--rep-ms 40 --time-budget-s 230)
  PROFILE_ARGS=(--new-tokens 128 --modes eager,graphed --time-budget-s 170)
fi

stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
stage install 240 env MINICPM_INT4_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
stage ext 60 $PY -c "import minicpm_int4.ops as o; print('CUDA extension:', o.cuda_extension_error() or 'loaded')"
stage gpu-tests 200 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
stage sanitizer 90 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cuda_extension
stage bench 260 $PY -m minicpm_int4 bench --out "$WORK" "${BENCH_ARGS[@]}"
stage profile 200 $PY -m minicpm_int4 profile --out "$WORK" "${PROFILE_ARGS[@]}"

cat "$WORK"/bench.md "$WORK"/profile.md > "$OUT_DIR/summary.md" 2>/dev/null
tar -czf "$OUT_DIR/results.tar.gz" -C "$WORK" . >> "$LOG" 2>&1
rm -rf "$WORK"
grep -E "^=== \[.*rc=" "$LOG"
