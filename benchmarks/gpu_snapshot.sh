#!/usr/bin/env bash
# Build gpu_snapshot/: what a lent GPU machine (no internet, torch and torchvision installed)
# needs to run benchmarks/gpu_check.sh -- the committed tree (git archive HEAD), the Matterport
# parity fixture, and pycocotools wheels for the usual CPython versions (the machine's pip
# picks the one that fits).  Run from the repository root on a machine that reaches PyPI:
#     bash benchmarks/gpu_snapshot.sh
# then carry it to the device and run there, e.g. (the device tool's command line):
#     cd gpu_snapshot && MASKRCNN_SHARED=$PWD/shared bash benchmarks/gpu_check.sh quick
set -euo pipefail
out=gpu_snapshot
shared=${MASKRCNN_SHARED:-../shared}
rm -rf "$out"
mkdir -p "$out/.whl" "$out/shared/fixtures"
git archive HEAD | tar -x -C "$out"
if [ -d "$shared/fixtures/matterport-parity" ]; then
  cp -r "$shared/fixtures/matterport-parity" "$out/shared/fixtures/"
else
  echo "no $shared/fixtures/matterport-parity: the Matterport parity tests will skip on the device" >&2
fi
py=$(command -v python3)
[ -x .venv/bin/python ] && py=.venv/bin/python
for v in 3.10 3.11 3.12 3.13; do
  "$py" -m pip download -q --only-binary :all: --no-deps --python-version "$v" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$out/.whl" pycocotools \
    || echo "no pycocotools wheel for Python $v" >&2
done
ls "$out/.whl"
du -sh "$out"
