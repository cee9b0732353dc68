#!/usr/bin/env bash
# The bench's peers that the GPU image lacks (bitsandbytes nf4, gemlite), and the kernels MiniCPM-V 4.6's
# linear-attention layers run on in transformers where installed (flash-linear-attention's fla-core and its
# einops: pure Python + Triton; without them transformers runs its reference PyTorch gated delta rule, "more than an
# order of magnitude" slower on an H100 by its own warning, which the end-to-end profile then pays in fp16 and int4
# alike - a deployment of that model installs them), as wheels for the device call to carry. Run it here (it needs
# pip's index), before the suite's device call:
#
#   bash benchmarks/fetch_peer_wheels.sh        # -> .whl/ (git-ignored, about 8.5 MB)
#
# then call the device tool with carry [".whl"]; run_gpu_suite.sh installs whatever .whl/ holds
# into a private folder on PYTHONPATH (--no-deps: torch, numpy, packaging and tqdm are in the image).
# Made for that image: Python 3.12, x86-64, torch built for CUDA 13. bitsandbytes' wheel is cut down
# to its CUDA 13 and CPU libraries (43 MB -> 7 MB; the carry limit is 64 MiB with the checkout);
# gemlite publishes only an sdist, built here into its pure-Python wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
BNB_VERSION=${BNB_VERSION:-0.50.2}
GEMLITE_VERSION=${GEMLITE_VERSION:-0.6.0.post2}
# (causal-conv1d, the layers' other package, is a CUDA extension published as an sdist: not carried - transformers'
# PyTorch short convolution stands in, the same in both runs; FLA_VERSION=none carries no fla-core)
FLA_VERSION=${FLA_VERSION:-0.6.0}
EINOPS_VERSION=${EINOPS_VERSION:-0.8.2}
PY_VERSION=${PEER_PY_VERSION:-3.12}
DIR=.whl
rm -rf "$DIR" && mkdir -p "$DIR"
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$TMP" "bitsandbytes==$BNB_VERSION"
python3 - "$TMP" "$DIR" <<'EOF'
import glob, os, re, sys, zipfile
# keep the CPU and CUDA 13.x libraries: bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so
drop = re.compile(r"libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)")
(src,) = glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl"))
dst = os.path.join(sys.argv[2], os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    kept = [i for i in zin.infolist() if not drop.search(i.filename)]
    assert any("cuda13" in i.filename for i in kept), "this bitsandbytes wheel has no CUDA 13 library"
    for info in kept:
        zout.writestr(info, zin.read(info.filename))
print(f"{os.path.basename(dst)}: {os.path.getsize(src) >> 20} MB -> {os.path.getsize(dst) >> 20} MB")
EOF

python3 -m pip download -q --no-deps --no-binary=:all: -d "$TMP" "gemlite==$GEMLITE_VERSION"
python3 -m pip wheel -q --no-deps -w "$DIR" "$TMP"/gemlite-*.tar.gz
if [ "$FLA_VERSION" != none ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" "fla-core==$FLA_VERSION" "einops==$EINOPS_VERSION"
fi
ls -l "$DIR"
