"""`PatchMerger`, the nn.Module: a drop-in for vit-pytorch's PatchMerger.

Parameters are laid out as in vit-pytorch (`norm` is an nn.LayerNorm, `queries` an (M, D)
Parameter), so its state dicts load unchanged: keys `norm.weight`, `norm.bias`, `queries`.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from .heuristics import MAX_M
from .ops import patch_merger

__all__ = ["PatchMerger"]


def _size(name, v) -> int:
    """An integer size (ints and NumPy integers; not bools or floats)."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {v!r}") from None


class PatchMerger(nn.Module):
    """Merge N tokens into M learned-query tokens: softmax_N(scale * Q @ LN(x)^T) @ LN(x).

    Args:
        dim: model width D.
        num_tokens_out: M, the number of merged tokens (at most 256).
        eps: LayerNorm epsilon.
        scale: score scale; None means dim ** -0.5 (as in vit-pytorch).
        elementwise_affine: give the LayerNorm a weight (and a bias unless `bias=False`).
        bias: give the LayerNorm a bias.

    forward(x, mask=None, return_weights=False): x (..., N, D) -> (..., M, D); see
    `pm_kernels.patch_merger` for the mask and the merge weights.
    """

    def __init__(self, dim: int, num_tokens_out: int, *, eps: float = 1e-5, scale=None,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__()
        # Checked here, not at the first forward, where a (300, D) `queries` would fail far from
        # the cause. M = 0 is allowed: the op defines it (empty outputs, like torch's empty ops).
        dim, num_tokens_out = _size("dim", dim), _size("num_tokens_out", num_tokens_out)
        if dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not 0 <= num_tokens_out <= MAX_M:
            raise ValueError(f"num_tokens_out must be an int in [0, {MAX_M}], "
                             f"got {num_tokens_out!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.num_tokens_out = num_tokens_out
        self.scale = dim ** -0.5 if scale is None else float(scale)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine,
                                 bias=bias, **factory)
        self.queries = nn.Parameter(torch.empty(num_tokens_out, dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # vit-pytorch draws the queries from a standard normal; LayerNorm resets to (1, 0).
        nn.init.normal_(self.queries)
        self.norm.reset_parameters()

    @property
    def eps(self) -> float:
        return self.norm.eps

    def forward(self, x, mask=None, return_weights: bool = False):
        return patch_merger(x, self.queries, self.norm.weight, self.norm.bias, eps=self.norm.eps,
                            scale=self.scale, mask=mask, return_weights=return_weights)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_tokens_out={self.num_tokens_out}, eps={self.norm.eps}, "
                f"scale={self.scale:.6g}")
