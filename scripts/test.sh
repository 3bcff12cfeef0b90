#!/usr/bin/env bash
# Set up and run the test suite. On a machine without a GPU the Triton kernels run on CPU
# tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
