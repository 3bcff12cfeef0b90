#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels a lent GPU machine lacks for this project's test
# suite: its image has torch, triton, timm, torchvision, einops, pytest-xdist and hypothesis, but
# not vit-pytorch (the tests marked `timm` import it). scripts/gpu_session.sh installs whatever
# .whl/ holds; name `.whl` in the device tool's `carry`. Python 3.12, x86-64, pure-Python wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only the wheels of this run: gpu_session.sh installs every .whl/*.whl, and two versions of one
# package there would fail the install.
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl "vit-pytorch==1.26.11"
ls -l .whl
