#!/usr/bin/env bash
# Create .venv-timm: the environment of the "timm" test stage (tests marked @pytest.mark.timm:
# tests/test_timm.py and tests/test_integrations.py). Idempotent: a re-run with everything in
# place only checks versions (a few seconds).
#
# Why a second venv: timm and vit-pytorch both import torchvision (vit_pytorch/__init__.py
# imports its DINO module, which imports torchvision.transforms), and PyPI's torchvision does not
# import beside the local torch 2.13.0 CPU build of .venv. torch 2.14.1 + torchvision 0.29.1 come
# from local disk (a ~5.5 GB CUDA build that runs fine on CPU) and pull triton 3.8.0 through
# torch's own pin; triton 3.8's interpreter works with numpy >= 2.4, so numpy is not pinned here.
#
# Usage:
#   bash scripts/setup_timm_env.sh
#   .venv-timm/bin/python -m pytest -m timm               # the timm stage
#   .venv-timm/bin/python -m pytest -q tests/test_patch_merger.py   # core tests on triton 3.8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-timm
TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

have_all() {
  python - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.14.1", "torchvision": "0.29.1"}
for name, version in want.items():
    if md.version(name).split("+")[0] != version:
        sys.exit(1)
for name in ("timm", "vit-pytorch", "einops", "tqdm", "pytest", "hypothesis", "pm-kernels"):
    md.version(name)
import torch, torchvision, timm, vit_pytorch, triton, pm_kernels  # noqa: F401  (imports work)
PY
}

# pip warns once per package about this machine's local index folders it cannot use; hide that.
pip_install() {
  python -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
}

if have_all; then
  echo "$VENV already set up"
else
  pip_install --upgrade pip
  pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
  pip_install "$TORCH_PIN" "$TORCHVISION_PIN" timm einops vit-pytorch tqdm
  pip_install "$TORCH_PIN" -e ".[test]"
fi
python - <<'PY'
import numpy, timm, torch, torchvision, triton, vit_pytorch  # noqa: F401
print(f"{__import__('os').environ['VIRTUAL_ENV']} ok: torch {torch.__version__}, torchvision "
      f"{torchvision.__version__}, triton {triton.__version__}, timm {timm.__version__}, "
      f"numpy {numpy.__version__}")
PY
