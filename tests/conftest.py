"""Test configuration: where the kernels run.

* With a CUDA GPU (or PM_TEST_DEVICE=cuda) the compiled kernels run on it.
* Otherwise TRITON_INTERPRET=1 is set *before* pm_kernels is imported (Triton decides at
  decoration time), so the very same kernels run on CPU tensors in Triton's interpreter.
"""

import os
import pathlib

import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("PM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / ".triton_cache"))

import pytest  # noqa: E402

import pm_kernels  # noqa: E402,F401  (decorate the kernels under the settings above)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
