"""Input validation of the public op: every caller error is a ValueError / TypeError that names
the argument and what was seen (shapes, dtypes, devices, values), raised before any kernel runs.

The `no_compute` fixture replaces both launchers *and* the reference implementation with
functions that raise, so a test that reaches either fails loudly: validation must come first.
`test_no_compute_fixture_detects_a_launch` shows that the fixture does catch a launch.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import pm_kernels
import pm_kernels.ops as ops
from pm_kernels import reference

pytestmark = pytest.mark.usefixtures("default_device")


class Launched(AssertionError):
    """Raised by the stubs: something ran that validation should have stopped."""


@pytest.fixture
def no_compute(monkeypatch):
    def boom(*args, **kwargs):
        raise Launched("a kernel (or the reference) ran before validation rejected the inputs")

    monkeypatch.setattr(ops, "patch_merger_forward", boom)
    monkeypatch.setattr(ops, "patch_merger_backward", boom)
    monkeypatch.setattr(reference, "patch_merger", boom)
    with pm_kernels.use_backend("triton"):
        yield


B, N, D, M = 2, 5, 8, 3


def good(dtype=torch.float32, param_dtype=None):
    pd = param_dtype or dtype
    return dict(x=torch.randn(B, N, D, dtype=dtype), queries=torch.randn(M, D, dtype=pd),
                weight=torch.randn(D, dtype=pd), bias=torch.randn(D, dtype=pd))


def call(x, queries, weight=None, bias=None, **kw):
    return pm_kernels.patch_merger(x, queries, weight, bias, **kw)


def test_no_compute_fixture_detects_a_launch(no_compute):
    # Valid inputs get past validation and hit the stubbed launcher: the fixture works.
    with pytest.raises(Launched):
        call(**good())


def test_validate_returns_default_scale():
    a = good()
    assert ops.validate(a["x"], a["queries"], a["weight"], a["bias"], None, 1e-5, None) == D ** -0.5
    assert ops.validate(a["x"], a["queries"], None, None, None, 1e-5, 3) == 3.0


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(D,), ()], ids=["1d", "0d"])
def test_x_needs_two_dims(shape, no_compute):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., N, D\).*at least 2 dims, "
                                         r"got "
                       + re.escape(str(tuple(shape)))):
        call(x, torch.randn(M, D))


def test_x_with_zero_features(no_compute):
    with pytest.raises(ValueError, match=r"x has D = 0 features \(shape \(2, 5, 0\)\)"):
        call(torch.randn(B, N, 0), torch.randn(M, 0))


def test_queries_d_mismatch(no_compute):
    with pytest.raises(ValueError, match=r"queries has D = 7 but x has D = 8 "
                                         r"\(x \(2, 5, 8\), queries \(3, 7\)\)"):
        call(torch.randn(B, N, D), torch.randn(M, 7))


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(D - 1,), (D + 1,), (1, D)], ids=str)
def test_affine_d_mismatch(name, shape, no_compute):
    a = good()
    a[name] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(D,\) = \(8,\), got "
                       + re.escape(str(tuple(shape)))):
        call(**a)


@pytest.mark.parametrize("shape", [(D,), (1, M, D)], ids=["1d", "3d"])
def test_queries_must_be_2d(shape, no_compute):
    a = good()
    a["queries"] = torch.randn(shape)
    with pytest.raises(ValueError, match=r"queries must be 2-D \(M, D\), got shape "
                       + re.escape(str(tuple(shape)))):
        call(**a)


def test_too_many_queries(no_compute):
    with pytest.raises(ValueError, match=r"queries has M = 257 rows; at most 256"):
        call(torch.randn(B, N, D), torch.randn(257, D))


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x", "queries", "weight", "bias"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8,
                                   torch.complex64], ids=str)
def test_non_floating_dtypes(name, dtype, no_compute):
    a = good()
    a[name] = a[name].to(dtype)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor, got dtype "
                                        rf"{dtype}"):
        call(**a)


def test_unsupported_floating_dtype(no_compute):
    a = good()
    a["x"] = a["x"].to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"x has dtype torch.float8_e4m3fn; supported are float16, "
                                        r"bfloat16, float32 and float64"):
        call(**a)


@pytest.mark.parametrize("name", ["x", "queries"])
def test_non_tensor_inputs(name, no_compute):
    a = good()
    a[name] = a[name].cpu().numpy()
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor, got ndarray"):
        call(**a)


BAD_COMBOS = [
    # (x dtype, parameter dtype): parameters must be x's dtype, or fp32 beside fp16/bf16 x.
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float64),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.float64),
    (torch.float64, torch.float32),
]


@pytest.mark.parametrize("name", ["queries", "weight", "bias"])
@pytest.mark.parametrize("x_dtype,p_dtype", BAD_COMBOS, ids=str)
def test_unsupported_dtype_combinations(name, x_dtype, p_dtype, no_compute):
    a = good(x_dtype)
    a[name] = a[name].to(p_dtype)
    with pytest.raises(TypeError, match=rf"{name} has dtype {p_dtype} but x has dtype {x_dtype}; "
                                        r"parameters must be"):
        call(**a)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_parameters_beside_half_x_are_accepted(x_dtype, no_compute):
    # The supported mixed-precision combination passes validation (and reaches the launcher).
    with pytest.raises(Launched):
        call(**good(x_dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# devices ('meta' stands in for a second device; validation only looks at metadata)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["queries", "weight", "bias", "mask"])
def test_tensors_on_different_devices(name, no_compute):
    a = good()
    a["mask"] = torch.ones(B, N, dtype=torch.bool)
    a[name] = a[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on {a['x'].device}; all "
                                         r"tensors must be on the same device"):
        call(a["x"], a["queries"], a["weight"], a["bias"], mask=a["mask"])


def test_x_on_another_device_than_parameters(no_compute):
    a = good()
    a["x"] = a["x"].to("meta")
    with pytest.raises(ValueError, match=rf"queries is on {a['queries'].device} but x is on meta"):
        call(**a)


# ---------------------------------------------------------------------------------------------
# mask
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32], ids=str)
def test_mask_wrong_dtype(dtype, no_compute):
    mask = torch.ones(B, N, dtype=dtype)
    with pytest.raises(TypeError, match=rf"mask must have dtype torch.bool \(True = keep\), got "
                                        rf"{dtype}"):
        call(**good(), mask=mask)


def test_mask_not_a_tensor(no_compute):
    with pytest.raises(TypeError, match=r"mask must be a torch.Tensor of dtype torch.bool, "
                                        r"got list"):
        call(**good(), mask=[True] * N)


@pytest.mark.parametrize("shape", [(B, N + 1), (B, N - 1), (3, N), (B, 1, N), (), (N, 1)],
                         ids=str)
def test_mask_wrong_shape(shape, no_compute):
    mask = torch.ones(shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., N\) broadcastable to "
                                         r"\(2, 5\), got "
                       + re.escape(str(tuple(shape)))):
        call(**good(), mask=mask)


@pytest.mark.parametrize("shape", [(N,), (1, N), (B, N)], ids=str)
def test_broadcastable_masks_pass_validation(shape, no_compute):
    with pytest.raises(Launched):
        call(**good(), mask=torch.ones(shape, dtype=torch.bool))


def test_module_rejects_bad_mask(no_compute):
    mod = pm_kernels.PatchMerger(D, M)
    with pytest.raises(ValueError, match=r"mask must have shape .* got \(2, 4\)"):
        mod(torch.randn(B, N, D), mask=torch.ones(B, N - 1, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# scalars
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 10 ** 400],
                         ids=["inf", "-inf", "nan", "int-overflow"])
def test_scale_must_be_finite(scale, no_compute):
    with pytest.raises(ValueError, match=r"scale must be a finite number"):
        call(**good(), scale=scale)


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.inf, math.nan, 10 ** 400],
                         ids=["zero", "negative", "inf", "nan", "int-overflow"])
def test_eps_must_be_finite_positive(eps, no_compute):
    with pytest.raises(ValueError, match=r"eps must be a finite number"):
        call(**good(), eps=eps)


@pytest.mark.parametrize("name, value", [
    ("eps", None), ("eps", "1e-5"), ("eps", True), ("eps", torch.tensor(1e-5)),
    ("scale", "0.5"), ("scale", False), ("scale", torch.tensor(0.5))],
    ids=["eps-None", "eps-str", "eps-bool", "eps-tensor", "scale-str", "scale-bool",
         "scale-tensor"])
def test_scalars_must_be_real_numbers(name, value, no_compute):
    with pytest.raises(TypeError, match=rf"{name} must be a real number.* got "
                       + type(value).__name__):
        call(**good(), **{name: value})


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    a = good()
    args = (a["x"], a["queries"], a["weight"], a["bias"], None)
    assert ops.validate(*args, np.float32(1e-5), np.float32(0.5)) == 0.5
    assert ops.validate(*args, np.float64(1e-5), np.int64(2)) == 2.0


@pytest.mark.parametrize("dim, m", [(0, 3), (8.0, 3), (8, 257), (8, -1), (8, 2.0), (8, True)],
                         ids=["dim0", "dim-float", "m-too-many", "m-negative", "m-float", "m-bool"])
def test_module_constructor_checks_its_sizes(dim, m):
    with pytest.raises(ValueError, match="dim must be|num_tokens_out must be"):
        pm_kernels.PatchMerger(dim, m)


def test_module_rejects_bad_eps(no_compute):
    mod = pm_kernels.PatchMerger(D, M, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0.0"):
        mod(torch.randn(B, N, D))


def test_backend_name_is_validated():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        pm_kernels.set_backend("cuda")
    assert pm_kernels.get_backend() in ("auto", "triton", "reference")


@pytest.mark.parametrize("value, expected", [("", "auto"), (" Reference ", "reference"),
                                             ("trition", None)], ids=["empty", "case", "typo"])
def test_backend_environment_variable(value, expected):
    """PM_KERNELS_BACKEND is read at import: empty means auto (env files and CI templates set
    empty values), case and blanks do not matter, and a typo is an error naming the variable
    instead of a silent "auto"."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, PM_KERNELS_BACKEND=value)
    run = subprocess.run([sys.executable, "-c", "import pm_kernels; print(pm_kernels.get_backend())"],
                         env=env, capture_output=True, text=True)
    if expected is None:
        assert run.returncode != 0 and "PM_KERNELS_BACKEND must be one of" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == expected


def test_module_sizes_accept_numpy_integers():
    np = pytest.importorskip("numpy")
    mod = pm_kernels.PatchMerger(np.int64(8), np.int32(3))
    assert mod.queries.shape == (3, 8) and type(mod.dim) is int
