"""Property-based fuzzing of the Triton path against the reference, under the suite's accuracy
rule (tolerance.py), with hypothesis.

Drawn per example: leading dims (0 to 2 of them), N in 1..70, D in 1..130, M in 1..20; dtype
(fp32, fp16, bf16, fp64), fp32 parameters beside fp16/bf16 x; LayerNorm affine (both, weight
only, bias only, none); scale and eps; a key padding mask (none, random, broadcast over the
batch, or with fully masked batch elements); the memory layout of x (contiguous, transposed so
stride_d != 1, sliced, expanded with a stride-0 batch dim) and of dy (dense, y.sum()'s stride-0
gradient, expanded over the batch); and whether to check the backward and the merge weights.

Profiles (PM_FUZZ_PROFILE): "ci" (default): a fixed, derandomized set of examples that runs in
about a minute under the interpreter; "long": 500 fresh random examples per run, for soak tests
(`PM_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py`). A failure prints the drawn problem
and `@reproduce_failure` blob.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from conftest import DEVICE
from conftest import gen as make_gen
from test_mask_strides_weights import check_op

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("pm_fuzz_ci", max_examples=150, derandomize=True, **_COMMON)
settings.register_profile("pm_fuzz_long", max_examples=500, **_COMMON)
PROFILE = os.environ.get("PM_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"PM_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
FUZZ = settings.get_profile(f"pm_fuzz_{PROFILE}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    n = draw(st.integers(1, 70))
    d = draw(st.integers(1, 130))
    # Mostly the paper's range; one draw in four from the larger BLOCK_M tiers (64 to 256).
    m = draw(st.integers(1, 20) if draw(st.integers(0, 3)) else st.integers(21, 256))
    dtype = draw(st.sampled_from(DTYPES))
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        lead=lead, n=n, d=d, m=m, dtype=dtype,
        param_fp32=half and draw(st.booleans()),
        affine=draw(st.sampled_from(["both", "weight", "bias", "none"])),
        # None (D ** -0.5) or a multiple of it: scores of std ~0.4 to ~3.
        scale_mult=draw(st.one_of(st.none(), st.floats(0.2, 1.5))),
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1, 1e-12])),
        offset=draw(st.floats(-3.0, 3.0)),
        mask=draw(st.sampled_from([None, "random", "broadcast", "empty-rows"])),
        keep=draw(st.floats(0.05, 1.0)),
        layout=draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])),
        dy=draw(st.sampled_from(["dense", "sum", "expanded"])),
        backward=draw(st.sampled_from([True, False])),
        weights=draw(st.sampled_from([True, False])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def build(pr):
    """Tensors of a drawn problem: (leaf x, view, queries, weight, bias, mask, dy)."""
    gen = make_gen(pr["seed"])
    lead, n, d, m, dtype = pr["lead"], pr["n"], pr["d"], pr["m"], pr["dtype"]
    pdt = torch.float32 if pr["param_fp32"] else dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    layout = pr["layout"] if (pr["layout"] != "expanded" or lead) else "contiguous"
    if layout == "transposed":            # stored (..., D, N)
        leaf = (randn(*lead, d, n) * 1.5 + pr["offset"]).to(dtype)
        view = lambda t: t.transpose(-1, -2)                               # noqa: E731
    elif layout == "sliced":              # every other token, a window of the features
        leaf = (randn(*lead, 2 * n, d + 3) * 1.5 + pr["offset"]).to(dtype)
        view = lambda t: t[..., 1::2, 2:2 + d]                             # noqa: E731
    elif layout == "expanded":            # stride-0 first batch dim
        leaf = (randn(1, *lead[1:], n, d) * 1.5 + pr["offset"]).to(dtype)
        view = lambda t: t.expand(*lead, n, d)                             # noqa: E731
    else:
        leaf = (randn(*lead, n, d) * 1.5 + pr["offset"]).to(dtype)
        view = lambda t: t                                                 # noqa: E731

    q = (2.0 * randn(m, d)).to(pdt)
    g = (1.0 + 0.2 * randn(d)).to(pdt) if pr["affine"] in ("both", "weight") else None
    b = (0.2 * randn(d)).to(pdt) if pr["affine"] in ("both", "bias") else None

    mask = None
    if pr["mask"] == "broadcast":
        mask = torch.rand(n, generator=gen) < pr["keep"]
    elif pr["mask"] in ("random", "empty-rows"):
        mask = torch.rand(*lead, n, generator=gen) < pr["keep"]
        if pr["mask"] == "empty-rows" and lead:
            mask.view(-1, n)[0] = False

    dy = None
    # Keep the interpreter's work per example bounded: large problems run forward-only.
    batch = 1
    for s_ in lead:
        batch *= s_
    if pr["backward"] and batch * n * d <= 20000:
        if pr["dy"] == "sum":
            dy = "sum"
        elif pr["dy"] == "expanded" and lead:
            dy = randn(1, *lead[1:], m, d).to(dtype).expand(*lead, m, d)
        else:
            dy = randn(*lead, m, d).to(dtype)
    scale = None if pr["scale_mult"] is None else pr["scale_mult"] * d ** -0.5
    return leaf, view, q, g, b, mask, dy, scale


@FUZZ
@given(pr=problems())
def test_fuzz_against_reference(pr):
    note(repr(pr))
    with torch.device(DEVICE):        # not a fixture: hypothesis runs many examples per call
        _check(pr)


def _check(pr):
    x, view, q, g, b, mask, dy, scale = build(pr)
    # Coverage of the drawn space: `pytest --hypothesis-show-statistics tests/test_fuzz.py`.
    event(f"dtype {str(pr['dtype'])[6:]}")
    event(f"layout {pr['layout']}")
    event(f"mask {pr['mask']}")
    event("backward" if dy is not None else "forward only")
    check_op(x, q, g, b, dy=dy, mask=mask, scale=scale, eps=pr["eps"], view=view,
             return_weights=pr["weights"])
