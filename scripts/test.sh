#!/usr/bin/env bash
# Set up and run the test suite, in two stages. On a machine without a GPU the Triton kernels run
# on CPU tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
#   1. .venv       torch 2.13.0 + triton 3.6.0: every test except those marked `timm`.
#   2. .venv-timm  torch 2.14.1 + torchvision + timm + vit-pytorch + triton 3.8.0: the tests with
#                  the real timm / vit-pytorch models (-m timm), and the core kernel tests again,
#                  so both ends of the supported triton range run the kernels.
# Arguments are passed to stage 1's pytest; with arguments, stage 2 is not run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
if [ "$#" -eq 0 ]; then
  bash scripts/setup_timm_env.sh
  .venv-timm/bin/python -m pytest -m timm
  .venv-timm/bin/python -m pytest tests/test_patch_merger.py
fi
