"""Test configuration: where the kernels run.

* With a CUDA GPU (or PM_TEST_DEVICE=cuda) the compiled kernels run on it.
* Otherwise TRITON_INTERPRET=1 is set *before* pm_kernels is imported (Triton decides at
  decoration time), so the very same kernels run on CPU tensors in Triton's interpreter.
"""

import os
import pathlib
import tempfile

import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("PM_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / ".triton_cache"))
# The op's backend is "auto" (the Triton kernels on CUDA tensors and under the interpreter):
# an inherited PM_KERNELS_BACKEND=reference would turn every test that calls the public op
# without `use_backend("triton")` into the reference compared with itself.
os.environ.pop("PM_KERNELS_BACKEND", None)
# torch.compile's on-disk caches (shared by every checkout of a user, in /tmp) key a compiled
# graph by its code, not by the schemas of the custom ops it calls: after pm_kernels::bwd lost an
# argument, a cached backward graph still called it the old way. A fresh cache per test session.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pm_kernels_inductor_"))

import pytest  # noqa: E402

from pm_kernels import heuristics  # noqa: E402  (decorates the kernels under the settings above)

assert heuristics.interpreting() == (DEVICE == "cpu"), (
    f"tests on {DEVICE} need the kernels {'in' if DEVICE == 'cpu' else 'outside'} Triton's "
    "interpreter: TRITON_INTERPRET was set otherwise, or pm_kernels was imported before conftest")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def default_device():
    """Create tensors on the test device by default (`torch.device` as a context manager), for
    modules whose tests build their inputs with plain factory calls. Their generators must be
    made with `gen(seed)` (a CPU generator cannot drive a CUDA factory call)."""
    with torch.device(DEVICE):
        yield


def gen(seed: int) -> torch.Generator:
    """A seeded generator on the test device."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
