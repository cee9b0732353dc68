#!/usr/bin/env bash
# Everything the GPU suite's device call carries, made here in one go (none of it is committed, and a new session's
# checkout has none of it): the peers' wheels (fetch_peer_wheels.sh -> .whl/), the CUDA extension built against
# the GPU image's torch (prebuild_extension.sh -> .prebuilt/) and the Triton kernels compiled with its Triton
# (warm_triton_cache.sh -> .tcache/). About 20 minutes on 2 cores the first time (venvs, torch's CUDA wheels),
# 15 after; it needs pip's index. Then it checks that the three fit in the device tool's 64 MiB carry beside the
# checkout, and prints the call to make:
#
#   bash benchmarks/prepare_gpu_call.sh            # PREPARE_SKIP="tcache" (or whl, prebuilt) leaves one out
#
# The device call's command then runs benchmarks/run_gpu_suite.sh with carry [".whl", ".tcache", ".prebuilt"].
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP=",${PREPARE_SKIP:-},"
t0=$(date +%s)
step() {  # step NAME SCRIPT: run one preparation, timed, unless PREPARE_SKIP names it
  local name=$1; shift
  if [[ $SKIP == *",$name,"* ]]; then echo "== $name: skipped (PREPARE_SKIP)"; return; fi
  local t=$(date +%s)
  echo "== $name: $*"
  "$@"
  echo "== $name: done in $(( $(date +%s) - t )) s"
}
step whl bash benchmarks/fetch_peer_wheels.sh
step prebuilt bash benchmarks/prebuild_extension.sh
step tcache bash benchmarks/warm_triton_cache.sh
# the device tool carries the working tree (tracked and untracked files git does not ignore) and the carried paths,
# 64 MiB in all
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb -- 2>/dev/null | tail -n1 | cut -f1)
carried=0
for d in .whl .prebuilt .tcache; do
  [ -d "$d" ] && carried=$(( carried + $(du -sb "$d" | cut -f1) ))
done
total=$(( tree + carried ))
echo "== carry: working tree $(( tree >> 20 )) MiB + .whl/.prebuilt/.tcache $(( carried >> 20 )) MiB = $(( total >> 20 )) MiB of 64"
if (( total > 64 << 20 )); then
  echo "over the device tool's 64 MiB: leave something out (PREPARE_SKIP) or trim it" >&2
  exit 1
fi
echo "== ready in $(( $(date +%s) - t0 )) s. The device call:"
echo "   run(command='MINICPM_INT4_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu_suite.sh',"
echo "       carry=[\".whl\", \".tcache\", \".prebuilt\"])   (benchmarks/README.md: a GPU session, step by step)"
