"""The C++ reference (csrc_reference/) against the PyTorch reference (pm_kernels/reference.py).

The two share no code: one is plain loops with double accumulation, the other PyTorch ops and
autograd. Agreement to ~1e-12 in float64, forward and all four gradients, over awkward shapes,
masks and dtypes, means both compute the op as specified. Nothing here touches Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pm_kernels import _cpp_reference
from pm_kernels._cpp_reference import cpp_backward, cpp_forward
from pm_kernels.reference import patch_merger

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    lead: tuple[int, ...]  # leading dims of x
    n: int
    d: int
    m: int
    weight: bool = True
    bias: bool = True
    mask: str | None = None  # None | "random" | "with_empty_row" | "broadcast"
    scale: float | None = None
    offset: float = 0.5  # mean of x: exercises the centring of the LayerNorm


CASES = {
    "single_token": Case((2,), n=1, d=48, m=3),
    "vit_tokens": Case((2,), n=197, d=48, m=5),
    "d100_m1": Case((3,), n=17, d=100, m=1),
    "more_queries_than_tokens": Case((2,), n=5, d=48, m=12),
    "x_4d": Case((2, 3), n=7, d=48, m=4),
    "no_leading_dims": Case((), n=9, d=100, m=3),
    "no_weight": Case((2,), n=11, d=48, m=4, weight=False),
    "no_bias": Case((2,), n=11, d=48, m=4, bias=False),
    "no_affine": Case((2,), n=11, d=100, m=4, weight=False, bias=False),
    "mask": Case((3,), n=13, d=48, m=4, mask="random"),
    "mask_with_empty_row": Case((2, 3), n=10, d=48, m=5, mask="with_empty_row"),
    "mask_broadcast": Case((2, 3), n=9, d=48, m=3, mask="broadcast"),
    "scale_small": Case((2,), n=15, d=48, m=4, scale=0.37),
    "scale_large_masked": Case((2,), n=15, d=100, m=6, scale=2.5, mask="random"),
    "no_tokens": Case((2,), n=0, d=48, m=3),
}


def make_inputs(case: Case, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    x = (case.offset + 2.0 * randn(*case.lead, case.n, case.d)).to(dtype)
    queries = randn(case.m, case.d)
    weight = (1.0 + 0.5 * randn(case.d)).to(dtype) if case.weight else None
    bias = (0.3 * randn(case.d)).to(dtype) if case.bias else None
    mask = None
    if case.mask is not None:
        mask = torch.rand(*case.lead, case.n, generator=g) < 0.7
        if case.mask == "with_empty_row":
            mask.view(-1, case.n)[1] = False  # one batch element with every token masked
        elif case.mask == "broadcast":
            mask = mask[:1]  # (1, 3, N): broadcast over the first leading dim
    dy = randn(*case.lead, case.m, case.d)
    return x, queries, weight, bias, mask, dy


def reference(x, queries, weight, bias, mask, dy, scale):
    """Forward and (dx, dqueries, dweight, dbias) of the PyTorch reference, in float64."""
    leaves = [t.detach().to(F64).requires_grad_() if t is not None else None
              for t in (x, queries, weight, bias)]
    y = patch_merger(*leaves, scale=scale, mask=mask)
    y.backward(dy.to(F64))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def assert_close(actual, expected, rtol, atol_factor, name):
    """rtol relative to each element, plus an absolute floor of atol_factor * max|expected|.

    The floor is needed because entries that are sums of cancelling terms (gradients especially)
    can be far smaller than the terms they were computed from; their rounding error scales with
    the size of those terms, roughly max|expected|, not with the entry itself."""
    assert actual is not None, f"{name} is None"
    expected = expected.to(actual.dtype)
    atol = atol_factor * max(1.0, expected.abs().max().item()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def check_against_reference(case, dtype, rtol, atol_factor):
    x, queries, weight, bias, mask, dy = make_inputs(case, dtype)
    y_ref, grads_ref = reference(x, queries, weight, bias, mask, dy, case.scale)

    y = cpp_forward(x, queries, weight, bias, scale=case.scale, mask=mask)
    assert y.dtype == dtype and y.shape == (*case.lead, case.m, case.d)
    assert_close(y, y_ref, rtol, atol_factor, "y")

    grads = cpp_backward(dy, x, queries, weight, bias, scale=case.scale, mask=mask)
    for name, got, want, inp in zip(("dx", "dqueries", "dweight", "dbias"), grads, grads_ref,
                                    (x, queries, weight, bias)):
        if inp is None:
            assert got is None, f"{name} must be None when its input is None"
            continue
        assert got.dtype == dtype and got.shape == inp.shape, name
        assert_close(got, want, rtol, atol_factor, name)


# float64 against float64: both sides round only at the 1e-16 level, and the long sums (over D in
# the LayerNorm and the scores, over N in the softmax and y, over batch and tokens in dweight /
# dbias) accumulate at most a few hundred such errors, so 1e-12 relative with an absolute floor of
# 1e-13 * max|expected| leaves margin while still catching any real formula error.
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float64_matches_reference(case):
    check_against_reference(case, F64, rtol=1e-12, atol_factor=1e-13)


# float32 inputs, C++ result in float32, against the float64 reference on the same (upcast) values.
# The C++ code accumulates in double, so its only float32 rounding is the final store (relative
# 6e-8); 1e-5 leaves room for the cancellation-prone gradient entries.
@pytest.mark.parametrize("name", ["vit_tokens", "mask_with_empty_row", "no_leading_dims"])
def test_float32_matches_float64_reference(name):
    check_against_reference(CASES[name], torch.float32, rtol=1e-5, atol_factor=1e-5)


def test_layer_norm_is_robust_to_a_large_mean():
    # |mean| / std = 1e4 in float32: a one-pass E[x^2] - E[x]^2, or float32 accumulation, loses
    # every digit of the variance here. The two-pass double statistics of the C++ code keep
    # float32 output accuracy (same tolerance reasoning as above).
    case = Case((2,), n=33, d=100, m=4, offset=2.0e4)
    check_against_reference(case, torch.float32, rtol=1e-5, atol_factor=1e-5)


def test_vit_b_size():
    # ViT-B scale: B=2, N=576, D=1024, M=16; must run in well under a second of C++ time.
    case = Case((2,), n=576, d=1024, m=16, mask="random")
    check_against_reference(case, F64, rtol=1e-12, atol_factor=1e-13)


def test_half_inputs_are_upcast_and_returned_in_their_dtype():
    case = CASES["mask"]
    for dtype in (torch.float16, torch.bfloat16):
        x, queries, weight, bias, mask, dy = make_inputs(case, dtype)
        y = cpp_forward(x, queries, weight, bias, mask=mask)
        grads = cpp_backward(dy, x, queries, weight, bias, mask=mask)
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
        # Computed from the same half values in float32 / double, then rounded once to half.
        y_ref, grads_ref = reference(x, queries, weight, bias, mask, dy, None)
        for got, want in zip((y, *grads), (y_ref, *grads_ref)):
            torch.testing.assert_close(got, want.to(dtype))


def test_mixed_dtypes_are_promoted():
    x, queries, weight, bias, mask, dy = make_inputs(CASES["mask"], torch.float32)
    y = cpp_forward(x, queries.double(), weight, bias, mask=mask)
    assert y.dtype == torch.float32
    _, dq, dw, db = cpp_backward(dy, x, queries.double(), weight, bias, mask=mask)
    assert dq.dtype == F64 and dw.dtype == torch.float32 and db.dtype == torch.float32


def test_backward_is_independent_of_the_thread_count():
    # The parameter gradients are reduced over the batch in fixed chunks, in a fixed order.
    x, queries, weight, bias, mask, dy = make_inputs(Case((70,), n=6, d=48, m=3, mask="random"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = cpp_backward(dy, x, queries, weight, bias, mask=mask)
        torch.set_num_threads(max(2, threads))
        parallel = cpp_backward(dy, x, queries, weight, bias, mask=mask)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)


def test_rejects_unsupported_dtypes():
    x, queries, *_ = make_inputs(CASES["single_token"])
    with pytest.raises(TypeError, match="dtype"):
        cpp_forward(x.to(torch.int32), queries.to(torch.int32))
    with pytest.raises(TypeError, match="mask must be a bool"):
        cpp_forward(x, queries, mask=torch.ones(x.shape[:-1], dtype=torch.int64))


def test_missing_compiler_error_says_how_to_install_one(monkeypatch):
    monkeypatch.setenv("CXX", "pm-kernels-no-such-compiler")
    with pytest.raises(RuntimeError, match=r"No C\+\+ compiler was found.*apt-get install g\+\+"):
        _cpp_reference._require_compiler()
