"""Python side of the independent C++ reference (csrc_reference/patch_merger_ref.cpp).

The C++ code computes the PatchMerger forward and backward with plain loops and double
accumulation, sharing no code with the PyTorch reference (pm_kernels/reference.py); the two are a
cross-check of each other and a float64-grade oracle for the kernels.

It is compiled on first use with `torch.utils.cpp_extension.load` into `<repo>/.build/cpp_reference-torch<version>`
(ninja reuses the objects across processes while the source is unchanged) and loaded once per
process. It needs the source checkout (csrc_reference/ is not part of an installed wheel), a C++
compiler and ninja. Set PM_KERNELS_VERBOSE_BUILD=1 to see the compiler output.

Dtypes: the C++ code takes float32 or float64. All floating inputs are promoted to a common dtype;
float16 / bfloat16 are upcast to float32 before the call (the loops accumulate in double anyway, so
nothing is lost), and every output is cast back to the dtype of the input it belongs to (y and dx to
x's dtype, dqueries to queries', ...). Any other dtype raises TypeError.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["cpp_forward", "cpp_backward"]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_SOURCE = _REPO_ROOT / "csrc_reference" / "patch_merger_ref.cpp"
# One build folder per torch version: the extension links against libtorch, and the test run
# uses two venvs (torch 2.13 and 2.14) that must not load each other's binary.
_BUILD_DIR = _REPO_ROOT / ".build" / f"cpp_reference-torch{torch.__version__.replace('+', '_')}"
_EXTENSION_NAME = "pm_kernels_cpp_reference"
_OPS_NAMESPACE = "pm_kernels_cpp_ref"  # the TORCH_LIBRARY namespace in the .cpp

# -fopenmp: at::parallel_for is a header template; it only runs in parallel when the translation
# unit is compiled with OpenMP, like libtorch itself (it then uses torch's own libgomp).
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_load_lock = threading.Lock()
_loaded = False


def _require_compiler() -> None:
    """Raise a RuntimeError that says how to get a compiler if torch would find none."""
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension invokes on Linux/macOS
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"No C++ compiler was found (looked for {compiler!r}, from $CXX or the default 'c++'), "
            "so the C++ reference of pm_kernels cannot be built. Install one, e.g. "
            "`apt-get install g++` on Debian/Ubuntu (or `conda install -c conda-forge "
            "cxx-compiler`), or point $CXX at an existing compiler."
        )


def _ops():
    """The compiled ops, building / loading the extension on the first call of the process."""
    global _loaded
    with _load_lock:
        if not _loaded:
            _require_compiler()
            if not _SOURCE.is_file():
                raise RuntimeError(
                    f"C++ reference source not found at {_SOURCE}: the C++ reference is only "
                    "available from a source checkout of pm_kernels."
                )
            from torch.utils import cpp_extension

            _BUILD_DIR.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name=_EXTENSION_NAME,
                sources=[str(_SOURCE)],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                build_directory=str(_BUILD_DIR),
                is_python_module=False,  # the ops register themselves with torch.ops
                verbose=os.environ.get("PM_KERNELS_VERBOSE_BUILD") == "1",
            )
            _loaded = True
    return getattr(torch.ops, _OPS_NAMESPACE)


def _compute_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    dtypes = []
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"the C++ reference supports float16, bfloat16, float32 and float64 inputs; "
                f"{name} has dtype {t.dtype}"
            )
        dtypes.append(t.dtype)
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _prepare(x, queries, weight, bias, mask, eps, scale, dy=None):
    """Flatten x's leading dims into one batch dim, promote, move to CPU and make contiguous."""
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., N, D), got {tuple(x.shape)}")
    *lead, n, d = x.shape
    if d == 0:
        raise ValueError("the feature dim D of x must be positive")
    if queries.dim() != 2 or queries.shape[1] != d:
        raise ValueError(f"queries must have shape (M, {d}), got {tuple(queries.shape)}")
    if dy is not None and dy.shape != (*lead, queries.shape[0], d):
        raise ValueError(
            f"dy must have shape {(*lead, queries.shape[0], d)} (..., M, D), got {tuple(dy.shape)}"
        )
    batch = math.prod(lead)
    dtype = _compute_dtype(x=x, queries=queries, weight=weight, bias=bias, dy=dy)

    def cpu(t):
        return None if t is None else t.detach().to(device="cpu", dtype=dtype).contiguous()

    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = keep), got dtype {mask.dtype}")
        mask = torch.broadcast_to(mask.detach().cpu(), (*lead, n)).reshape(batch, n).contiguous()
    args = dict(
        x=cpu(x).reshape(batch, n, d),
        queries=cpu(queries),
        weight=cpu(weight),
        bias=cpu(bias),
        mask=mask,
        eps=float(eps),
        scale=float(d**-0.5 if scale is None else scale),
    )
    if dy is not None:
        args["dy"] = cpu(dy).reshape(batch, queries.shape[0], d)
    return lead, args


def cpp_forward(x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None):
    """PatchMerger forward of the C++ reference: y (..., M, D), same conventions as
    `pm_kernels.reference.patch_merger`. Not differentiable (use `cpp_backward`)."""
    lead, a = _prepare(x, queries, weight, bias, mask, eps, scale)
    y = _ops().forward(
        a["x"], a["queries"], a["weight"], a["bias"], a["mask"], a["eps"], a["scale"]
    )
    return y.reshape(*lead, *y.shape[1:]).to(device=x.device, dtype=x.dtype)


def cpp_backward(dy, x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None):
    """Gradients of the C++ reference for the output gradient dy (..., M, D):
    (dx, dqueries, dweight, dbias), with dweight / dbias None when weight / bias is None."""
    lead, a = _prepare(x, queries, weight, bias, mask, eps, scale, dy=dy)
    dx, dqueries, dweight, dbias = _ops().backward(
        a["dy"], a["x"], a["queries"], a["weight"], a["bias"], a["mask"], a["eps"], a["scale"]
    )

    def back(t, like):
        return None if like is None else t.to(device=like.device, dtype=like.dtype)

    return (
        back(dx.reshape(x.shape), x),
        back(dqueries, queries),
        back(dweight, weight),
        back(dbias, bias),
    )
