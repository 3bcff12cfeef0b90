#!/usr/bin/env bash
# Create .venv with the pinned CPU toolchain this project is tested with, and install pm_kernels
# (editable) with its test extra. Idempotent: re-running only installs what is missing.
#   torch 2.13.0 CPU build (pinned here, not in pyproject: a bare `torch` would pull a CUDA build)
#   triton 3.6.0 (what the GPU image ships) and numpy<2.4 (triton 3.6's interpreter breaks on 2.4)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
python -m pip install -q -e ".[test]"
python - <<'PY'
import torch, triton, numpy
print(f"setup ok: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
PY
