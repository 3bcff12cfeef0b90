"""The math of the PatchMerger, in plain differentiable PyTorch.

This module is the ground truth of the package: the CPU fallback when the Triton kernels cannot
run, and the float64 oracle of the tests. It is written for clarity, not speed; it materialises
LN(x) (..., N, D) and the merge weights (..., M, N), exactly what the fused kernels avoid.

    xn = LayerNorm(x) * weight + bias                  # over D, with eps
    s  = scale * queries @ xn^T                        # (..., M, N), scale = D ** -0.5 by default
    p  = softmax(s over the token axis N)              # masked tokens (mask False) get weight 0
    y  = p @ xn                                        # (..., M, D)

Conventions shared with the kernels:
* A row of p whose tokens are all masked (or N == 0) has p = 0, so y = 0 for that output token
  and no gradient flows through it: never NaN.
* `mask` is a bool tensor (..., N) broadcastable to x's leading dims; True keeps a token.

`cpp_patch_merger` / `cpp_patch_merger_backward` expose the independent C++ implementation
(csrc_reference/), built on first use.
"""

from __future__ import annotations

import torch

__all__ = [
    "patch_merger",
    "patch_merger_weights",
    "cpp_patch_merger",
    "cpp_patch_merger_backward",
]


def _scores(x, queries, weight, bias, eps, scale, mask):
    d = x.shape[-1]
    if scale is None:
        scale = d ** -0.5
    # Mixed precision (fp32 parameters, fp16/bf16 x): compute in x's dtype, as eager code does.
    queries, weight, bias = (t.to(x.dtype) if t is not None else None
                             for t in (queries, weight, bias))
    xn = torch.nn.functional.layer_norm(x, (d,), weight, bias, eps)
    s = scale * torch.matmul(xn, queries.transpose(-1, -2)).transpose(-1, -2)  # (..., M, N)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    return xn, s


def _softmax_zero_if_empty(s):
    """softmax over the last axis, with rows that are all -inf (all tokens masked) set to 0."""
    if s.shape[-1] == 0:
        return s
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1)
    return p.masked_fill(empty, 0.0)


def patch_merger(x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None,
                 return_weights=False):
    """Reference PatchMerger: same signature and conventions as `pm_kernels.patch_merger`."""
    xn, s = _scores(x, queries, weight, bias, eps, scale, mask)
    p = _softmax_zero_if_empty(s)
    y = torch.matmul(p, xn)
    if return_weights:
        return y, p.detach()
    return y


def patch_merger_weights(x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None):
    """The merge weights p (..., M, N) of the reference."""
    _, s = _scores(x, queries, weight, bias, eps, scale, mask)
    return _softmax_zero_if_empty(s)


def cpp_patch_merger(x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None):
    """Forward of the independent C++ reference (plain loops, double accumulation)."""
    from ._cpp_reference import cpp_forward

    return cpp_forward(x, queries, weight, bias, eps=eps, scale=scale, mask=mask)


def cpp_patch_merger_backward(dy, x, queries, weight=None, bias=None, *, eps=1e-5, scale=None,
                              mask=None):
    """Backward of the C++ reference: returns (dx, dqueries, dweight, dbias); None where the
    corresponding input is None."""
    from ._cpp_reference import cpp_backward

    return cpp_backward(dy, x, queries, weight, bias, eps=eps, scale=scale, mask=mask)
