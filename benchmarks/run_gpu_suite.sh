#!/usr/bin/env bash
# The whole GPU suite in one call, on a bare GPU machine, inside 9 minutes:
#   1. install the package from this checkout, building the CUDA extension - or taking the one built before the
#      call (.prebuilt/, bash benchmarks/prebuild_extension.sh) where it still matches (the image's own torch,
#      triton and transformers are kept: --no-deps), and the peers' wheels if .whl/ was carried (fla-core, the
#      kernels of MiniCPM-V 4.6's linear attention, for the profile only); the Triton kernels compiled before the
#      call (.tcache/, bash benchmarks/warm_triton_cache.sh; carry [".whl", ".tcache", ".prebuilt"]) into Triton's cache;
#   2. the warpgroup-MMA W4A8 kernel's and W4A16 prefill GEMM's small tests alone (wgmma-smoke: should they fail,
#      the rest runs without them), the gpu-marked tests on the compiled kernels, and the CUDA-extension tests under compute-sanitizer;
#   3. the search timing, the input-scale cost, `minicpm-int4 bench` (kernel sweep), the dispatch table
#      it measured, and `minicpm-int4 profile` (end to end with backend="auto" on that table, given
#      whatever time the stages before it left);
#   4. `minicpm-int4 targets`: the issues' performance targets against those results, into suite.log.
# Everything lands directly in one folder (default $OUT, the device tool's return folder), 8 files
# at most so that all of them come back even if the call is cut short:
#   suite.log  bench.json bench.md speedup_vs_m.png bandwidth.png  profile.json profile.md e2e.png
# Commit them to benchmarks/results/<gpu>/ and run `python benchmarks/update_readme.py`.
# Each stage has its own time limit, and all of them share one deadline (SUITE_DEADLINE_S, 540 s),
# so a slow stage cannot eat the others' time.
#
#   bash benchmarks/run_gpu_suite.sh [OUT_DIR]
#   SUITE_QUICK=1 bash benchmarks/run_gpu_suite.sh   # smaller sweep (for iterating)
# A follow-up call that has less device time can narrow it:
#   SUITE_STAGES=env,install,gpu-tests,bench,targets   only these stages (default: all)
#   SUITE_TESTS_K="act_quant or w4a8"                  pytest -k for the gpu-tests stage
#   SUITE_TESTS_S=70                                   its time limit (default 150 s)
#   SUITE_BENCH_ARGS="--ms 1,16,4096 --models ..."     the bench's arguments (after --out), in place of the
#                                                      default's (below: 2 models, 4 M, the deciding backends)
#   SUITE_PROFILE_ARGS="--modes cudagraph ..."         the profile's arguments (besides --out, --time-budget-s)
#   SUITE_STAGES=...,counters  SUITE_COUNTERS_BUDGET_S=50  the opt-in `counters` stage (ncu's hardware counters of the
#                                                      decode / prefill kernels: counters.json, counters.md)
# The full suite leaves the profile little or nothing of its 540 s: with a 15-minute device budget, follow
# it with SUITE_STAGES=install,profile SUITE_DEADLINE_S=280 (the profile runs every model eager, then with
# the decode step captured by hand - seconds - then compiled by transformers - a minute or more each).
#   SUITE_EXTRA_CMD="bash .probe/run.sh"               a diagnostic command carried with the call, run
#                                                      (stage `extra`) once the package is installed
# e.g. the decode kernels' launch settings swept (benchmarks/decode_sweep.py: GEMV threads an SM and prefetch at
# M = 1, the tensor-core kernel's programs an SM and K a loop trip at 1 - 16; ~100 s, at the profile's expense):
#   SUITE_STAGES=install,extra,profile SUITE_EXTRA_S=130 \
#   SUITE_EXTRA_CMD='python3 benchmarks/decode_sweep.py --out "$OUT" --time-budget-s 100'
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-suite-out}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
# TRITON_INTERPRET=0: the compiled kernels, in the tests too (tests/conftest.py defaults to the
# interpreter only where torch sees no GPU; this makes the choice explicit)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TRITON_INTERPRET=0
PY=${PYTHON:-python3}
export MINICPM_INT4_COMMIT=${MINICPM_INT4_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
T0=$(date +%s)
DEADLINE=${SUITE_DEADLINE_S:-540}
SCRATCH=${SUITE_SCRATCH:-/tmp}  # the carried wheels' sites and the dispatch table, outside the checkout
OPT_IN_STAGES=counters

stage() {  # stage NAME LIMIT_S CMD...   (the limit is cut to what is left before the deadline)
  local name=$1 limit=$2; shift 2
  # a stage that stands in for another where it fails, or serves it, runs wherever that one is selected: a skipped
  # stage returns 0, so a wgmma-smoke that failed followed by a skipped wgmma-smoke-t128 would have kept the
  # 128-token blocks on untested
  local parent=$name
  case $name in
    install-without-cuda-extension|install-prebuilt) parent=install ;;
    wgmma-smoke-t128|wgmma16-smoke|wgmma16-split-smoke) parent=wgmma-smoke ;;
    model-kernels) parent=profile ;;
    warm-cache) parent=install ;;
  esac
  if [ -n "${SUITE_STAGES:-}" ] && [[ ",$SUITE_STAGES," != *",$parent,"* ]]; then
    echo "=== [$name] skipped: not in SUITE_STAGES" >> "$LOG"; return 0
  fi
  # opt-in stages run only where SUITE_STAGES names them: their files would take the full suite past the 8 that
  # come back from a device call
  if [ -z "${SUITE_STAGES:-}" ] && [[ ",$OPT_IN_STAGES," == *",$name,"* ]]; then
    echo "=== [$name] skipped: opt-in (name it in SUITE_STAGES)" >> "$LOG"; return 0
  fi
  local left=$(( DEADLINE - ($(date +%s) - T0) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < 10 )); then echo "=== [$name] skipped: deadline reached" >> "$LOG"; return 0; fi
  local t0 k0; t0=$(date +%s); k0=$(triton_kernels)
  echo "=== [$name] (limit ${limit}s): $*" >> "$LOG"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local k1; k1=$(triton_kernels)
  echo "=== [$name] rc=$rc in $(( $(date +%s) - t0 ))s$( (( k1 > k0 )) && echo ", $(( k1 - k0 )) Triton kernels compiled")" >> "$LOG"
  return $rc
}
# kernels in Triton's cache (a directory each, holding its group file; autotuning results have none): each stage's
# line says how many it compiled - what a warm cache (below) did not spare it
TRITON_CACHE_ROOT=${TRITON_CACHE_DIR:-${TRITON_HOME:-$HOME}/.triton/cache}
triton_kernels() { find "$TRITON_CACHE_ROOT" -mindepth 2 -maxdepth 2 -name '__grp__*.json' 2>/dev/null | wc -l; }

if [ -n "${SUITE_QUICK:-}" ]; then
  BENCH_ARGS=(--ms 1,16,256,4096 --rep-ms 10 --max-n 20000 --time-budget-s 90)
  PROFILE_ARGS=(--models llama3-v2.5 --new-tokens 32 --modes eager,cudagraph)
else
  # each case replays its CUDA graph of calls for 10 x rep-ms; on the H200 (run 2) our 240 cases took 68 s (~0.28 s
  # a case), the peers' first ones ~10 s each. Four M here (decode, the dispatch table's prefill entries at 256
  # and 4096) and the backends whose rows decide something: fp16 and the defaults (14 cases a shape: ~65 s over
  # the 16 shapes), the measurement variants (26 a shape: prefetch, trip32, staged, ahead2, ring, dq, rhs, the CUDA W4A16 wgmma GEMM, w4a8 flat, the CUDA
  # W4A8 GEMM's mma.sync, fused epilogue and the wgmma kernel's 64- and 128-token blocks forced; and the unsplit and
  # CUDA-core GEMVs, which run 2 measured faster on some shapes at M = 1 - the committed dispatch table takes them
  # there, so each new table must time them again; not mma.sync's 64-row blocks, which an H100 / H200 runs only with
  # the wgmma kernel turned off, nor the tensor-core kernel at M = 1, slower on every shape in run 2), then the peers
  # (12 a shape) - in that order (bench/micro.py):
  # the 150 s budget cuts the peers first, then the variants' last shapes. The stage's limit leaves the time the
  # plots take (matplotlib's first import builds its font cache on a fresh machine: warmed in the background
  # below); the profile, after it, gets what is left of the 540 s (little: a second call runs it)
  # (--max-n 30000: every LLM layer and fuse_projections' stacked gate / up - 24576 and 28672 rows, at M = 1 only -
  # but not the 128k-152k-row vocabulary projections)
  BENCH_ARGS=(--models minicpmv4.6,llama3-v2.5 --max-n 30000 --ms 1,16,256,4096 --rep-ms 10 --time-budget-s 150
              --backends w4a16-triton,w4a16-triton-prefetch,w4a16-triton-unsplit,w4a16-triton-h2,w4a16-triton-direct,w4a16-triton-trip32,w4a16-triton-staged,w4a16-triton-dq,w4a16-triton-rhs,w4a16-cuda,w4a16-cuda-gemv,w4a16-cuda-ahead2,w4a16-cuda-ring,w4a16-cuda-wgmma,w4a16-cuda-wgmma-nosplit,w4a8-triton,w4a8-triton-flat,w4a8-cuda,w4a8-cuda-mma,w4a8-cuda-fma,w4a8-cuda-t64,w4a8-cuda-t128,torch-tinygemm,bnb-nf4,gemlite)
  PROFILE_ARGS=(--new-tokens 128 --modes eager,cudagraph,graphed)
fi
# shellcheck disable=SC2206  # (word-split on purpose: a list of arguments)
[ -n "${SUITE_BENCH_ARGS:-}" ] && BENCH_ARGS=($SUITE_BENCH_ARGS)
# shellcheck disable=SC2206
[ -n "${SUITE_PROFILE_ARGS:-}" ] && PROFILE_ARGS=($SUITE_PROFILE_ARGS)
# matplotlib's font cache, built once per machine (tens of seconds), while the stages before the bench run
( $PY -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot" > /dev/null 2>&1 & )
TESTS_K=(); [ -n "${SUITE_TESTS_K:-}" ] && TESTS_K=(-k "$SUITE_TESTS_K")

stage env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, torch.cuda.get_device_name())'"
# should the CUDA extension fail to build, the package goes in without it, so that the Triton kernels'
# tests, bench and profile still run in this call (the log keeps the build's error; the extension's
# tests then fail naming it)
# A CUDA extension built before the call against this image's torch (bash benchmarks/prebuild_extension.sh ->
# .prebuilt/, carried) is installed instead of building one here, where it matches this checkout's csrc/ and
# setup.py, this torch build, this Python and this GPU, and loads (benchmarks/prebuilt_extension.py); else the
# stage says why and the extension is built as before
if [ -f .prebuilt/manifest.json ] && stage install-prebuilt 45 $PY benchmarks/prebuilt_extension.py install .prebuilt; then
  stage install 60 env MINICPM_INT4_BUILD_CUDA=0 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
else
  [ -f .prebuilt/manifest.json ] || echo "=== [install-prebuilt] none carried: the extension is built here (bash benchmarks/prebuild_extension.sh)" >> "$LOG"
  stage install 150 env MINICPM_INT4_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
    || stage install-without-cuda-extension 60 env MINICPM_INT4_BUILD_CUDA=0 $PY -m pip install --no-build-isolation \
         --no-deps --no-index -e .
fi
# the peers the image lacks, carried as wheels (bash benchmarks/fetch_peer_wheels.sh here, then the
# device call with carry [".whl"]): bitsandbytes nf4 and gemlite rows in the bench. The same folder carries the
# kernels MiniCPM-V 4.6's linear-attention layers run on in transformers (fla-core and einops): those go into a
# site of their own that only the profile sees (stage model-kernels, below) - the gpu tests compile a patched tiny
# 4.6 with fullgraph=True, a test of our layers and not of fla's traceability, and the bench never runs a model
PEER_SITE=$SCRATCH/minicpm-int4-peers
MODEL_SITE=$SCRATCH/minicpm-int4-model-kernels
PEER_WHEELS=(); MODEL_WHEELS=()
for w in .whl/*.whl; do
  [ -e "$w" ] || continue
  case $(basename "$w") in fla_core-*|einops-*) MODEL_WHEELS+=("$w") ;; *) PEER_WHEELS+=("$w") ;; esac
done
if (( ${#PEER_WHEELS[@]} )); then
  stage peers 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$PEER_SITE" "${PEER_WHEELS[@]}" && [ -d "$PEER_SITE" ] \
    && export PYTHONPATH="$PEER_SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "=== [peers] no wheels carried: bnb-nf4 and gemlite will be skipped (benchmarks/fetch_peer_wheels.sh)" >> "$LOG"
fi
# Triton's cache warmed with the kernels the bench and profile launch, compiled without a GPU before the call
# (bash benchmarks/warm_triton_cache.sh -> .tcache/, carried): their first launches here then find them instead of
# compiling on this machine's CPU inside the stages' budgets (~0.5 s a kernel, ~150 of them). Installed under the
# keys this machine's Triton computes, only where it was built by the same Triton version for this target, ptxas and
# environment; else nothing is installed and the log says why (kernels/warm_cache.py)
if [ -f .tcache/manifest.json ]; then
  stage warm-cache 30 $PY -m minicpm_int4.kernels.warm_cache install .tcache
else
  echo "=== [warm-cache] none carried: every Triton kernel compiles here (bash benchmarks/warm_triton_cache.sh)" >> "$LOG"
fi
# versions, the device, whether _C loaded (and why not), what backend="auto" picks: into suite.log
stage env-report 30 $PY -m minicpm_int4 env
[ -n "${SUITE_EXTRA_CMD:-}" ] && stage extra "${SUITE_EXTRA_S:-60}" bash -c "$SUITE_EXTRA_CMD"
# pytest-xdist where installed (the GPU image has it): the tests' time is mostly Triton compiling
# kernels on the CPU, which 12 workers (of the 16 cores) share out, and a worker that breaks its
# GPU context takes only its own tests down; the compiled kernels stay in Triton's cache for bench
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 12)
# (the tests tune the autotuned kernels with 12 workers sharing the GPU: their timings must not go into Triton's
# on-disk autotuning cache, where the bench and profile would take them - MINICPM_INT4_AUTOTUNE_CACHE=0; the
# compiled kernels they leave in Triton's cache are the bench's all the same)
# The warpgroup-MMA W4A8 kernel (csrc/w4a8_wgmma.cu) had never run on a GPU when this was written (its code and
# layouts checked on the CPU only): its small tests first, on their own; should they fail or hang, the launcher's
# choice of it is turned off for the rest of the suite, so that the tests, bench and profile still measure the
# rest (its forced rows then fail at once, naming the switch) - or, where its 128-token blocks pass alone (with the
# 64-token ones off: MINICPM_INT4_W4A8_WGMMA=128), only its 64-token blocks are
if ! stage wgmma-smoke 60 $PY -m pytest -q -p no:cacheprovider -x tests/test_gpu.py -k "w4a8_wgmma_small"; then
  if stage wgmma-smoke-t128 45 env MINICPM_INT4_W4A8_WGMMA=128 $PY -m pytest -q -p no:cacheprovider -x \
      tests/test_gpu.py -k "w4a8_wgmma_small and t128"; then
    export MINICPM_INT4_W4A8_WGMMA=128
  else
    export MINICPM_INT4_W4A8_WGMMA=0
  fi
  echo "=== [wgmma-smoke] failed: MINICPM_INT4_W4A8_WGMMA=$MINICPM_INT4_W4A8_WGMMA for the rest of the suite" >> "$LOG"
fi
# Likewise the warpgroup-MMA W4A16 prefill GEMM (csrc/w4a16_wgmma.cu; checked on the CPU only when written), which
# the extension's launcher takes past 16 rows on an H100 / H200 (backend="cuda", the bench's w4a16-cuda-wgmma rows,
# "auto" where a table picked it): its small tests alone first; should they fail or hang, it is turned off for the
# rest of the suite (MINICPM_INT4_W4A16_WGMMA=0: past 16 rows the decode kernel in slices, its forced rows an error) -
# they run with its split-K off; where they pass, its split-K's (thread block clusters, distributed shared memory)
# on their own: should those fail, the kernel keeps a tile a CTA for the rest (MINICPM_INT4_W4A16_WGMMA_SPLIT=0)
if ! stage wgmma16-smoke 60 env MINICPM_INT4_W4A16_WGMMA_SPLIT=0 $PY -m pytest -q -p no:cacheprovider -x tests/test_gpu.py -k "w4a16_wgmma_small"; then
  export MINICPM_INT4_W4A16_WGMMA=0
  echo "=== [wgmma16-smoke] failed: MINICPM_INT4_W4A16_WGMMA=0 for the rest of the suite" >> "$LOG"
elif ! stage wgmma16-split-smoke 45 $PY -m pytest -q -p no:cacheprovider -x tests/test_gpu.py -k "w4a16_wgmma_split_small"; then
  export MINICPM_INT4_W4A16_WGMMA_SPLIT=0
  echo "=== [wgmma16-split-smoke] failed: MINICPM_INT4_W4A16_WGMMA_SPLIT=0 for the rest of the suite" >> "$LOG"
fi
stage gpu-tests "${SUITE_TESTS_S:-150}" env MINICPM_INT4_AUTOTUNE_CACHE=0 $PY -m pytest -m gpu -q -p no:cacheprovider "${XDIST[@]}" "${TESTS_K[@]}" tests/test_gpu.py
stage sanitizer 60 env MINICPM_INT4_AUTOTUNE_CACHE=0 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cuda_extension and not real_shapes"
stage search-timing 45 $PY -c "
import time, torch
from minicpm_int4.search import quantize_search
from minicpm_int4.gptq import gptq_quantize
w = (torch.randn(4096, 12288, device='cuda') * 0.02).half()
quantize_search(w, 128); torch.cuda.synchronize()
t = time.perf_counter(); quantize_search(w, 128); torch.cuda.synchronize()
print(f'quantize_search 4096x12288 g128 on GPU: {(time.perf_counter() - t) * 1e3:.1f} ms')
x = torch.randn(16384, 12288, device='cuda')  # more tokens than K: a full-rank H
h = x.t() @ x
t = time.perf_counter(); gptq_quantize(w, h, 128); torch.cuda.synchronize()
print(f'gptq_quantize 4096x12288 g128 on GPU (act-order, first call): {(time.perf_counter() - t) * 1e3:.1f} ms')"
# QuantConfig.input_scales' multiply per layer: a 4096 x 4096 layer with and without it, eager and
# CUDA-graphed, W4A16 at M = 1 / 16 / 4096 (in the Triton kernels' loads and as
# a separate pass: which is faster), the CUDA extension's decode kernels at M = 1 / 16 (in their
# loads), W4A8 at 4096 (in the activation quantizer); and the same for an act-order layer's channel
# order (input_perm: read through by the Triton decode kernels and quantizer and the CUDA tensor-core kernel, or gathered first);
# W4A16's lines come first, should the limit cut W4A8's autotuning short
stage input-scale-cost 50 $PY benchmarks/input_scale_cost.py
stage bench 190 $PY -m minicpm_int4 bench --out "$OUT_DIR" "${BENCH_ARGS[@]}"
# the dispatch table this bench measured (where the CUDA kernel, or at M = 1 the Triton tensor-core
# kernel, beat the default), outside the checkout: the profile's backend="auto" runs on it, as it will
# once ingest_gpu_results.py commits the same table (profile.json's env records which table it used)
SUITE_TABLE=$SCRATCH/minicpm-int4-dispatch-table.json
rm -f "$SUITE_TABLE"
# (only where it was written: a call without the bench - SUITE_STAGES=install,profile after a first call - skips the
# stage, and pointing "auto" at a missing table would leave it the Triton kernels everywhere, not the package's table)
stage dispatch-table 20 $PY benchmarks/make_dispatch_table.py "$OUT_DIR/bench.json" --out "$SUITE_TABLE" \
  && [ -s "$SUITE_TABLE" ] && export MINICPM_INT4_DISPATCH_TABLE="$SUITE_TABLE"
# the hardware counters (Nsight Compute) of the decode kernels at M = 1 / 16 and the prefill ones at 4096 on Llama3-V
# 2.5's MLP shapes, fp16's beside them: DRAM / L2 / SM throughput, occupancy and its limit, issue-slot use, the
# largest warp stalls - why each kernel runs at the bench's speed (counters.json, counters.md: 2 more files, so
# opt-in - the bench call of a two-call session has room: SUITE_STAGES=...,bench,dispatch-table,counters,targets)
# (its cases stop at the budget, cut to what the deadline leaves the stage less 45 s for the last case and ncu's
# report: ncu prints its results only when the profiled process ends, so a stage killed at its limit has none)
COUNTERS_BUDGET=${SUITE_COUNTERS_BUDGET_S:-50}
COUNTERS_LEFT=$(( DEADLINE - ($(date +%s) - T0) - 5 - 45 ))
(( COUNTERS_LEFT < COUNTERS_BUDGET )) && COUNTERS_BUDGET=$(( COUNTERS_LEFT > 1 ? COUNTERS_LEFT : 1 ))
stage counters 100 $PY benchmarks/ncu_counters.py --out "$OUT_DIR" --time-budget-s "$COUNTERS_BUDGET"
# profile takes what the stages before it left, less 25 s for targets; it starts no new run past
# its own budget (a graphed run compiles for a minute or more), and an interrupted profile still
# writes what it measured
PROFILE_PYTHONPATH=${PYTHONPATH:-}
if (( ${#MODEL_WHEELS[@]} )); then
  stage model-kernels 30 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$MODEL_SITE" "${MODEL_WHEELS[@]}" && [ -d "$MODEL_SITE" ] \
    && PROFILE_PYTHONPATH="$MODEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "=== [model-kernels] none carried: MiniCPM-V 4.6's linear attention runs on transformers' PyTorch path" >> "$LOG"
fi
PROFILE_S=$(( DEADLINE - ($(date +%s) - T0) - 30 ))
stage profile "$PROFILE_S" env PYTHONPATH="$PROFILE_PYTHONPATH" $PY -m minicpm_int4 profile --out "$OUT_DIR" \
  "${PROFILE_ARGS[@]}" --time-budget-s $(( PROFILE_S > 120 ? PROFILE_S - 60 : PROFILE_S / 2 ))
# the issues' targets against what was just measured, into suite.log (targets.md is written later,
# beside the committed results: at most 8 files come back)
stage targets 15 $PY -m minicpm_int4 targets "$OUT_DIR" --no-write
rm -f "$OUT_DIR"/*.tmp  # a checkpoint cut short mid-write (bench / profile write theirs as they go)
echo "=== total $(( $(date +%s) - T0 ))s" >> "$LOG"
grep -E "^=== " "$LOG"
