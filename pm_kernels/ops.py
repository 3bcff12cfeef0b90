"""The public functional op: validation, backend dispatch, autocast, and the `torch.library`
registration that makes the Triton kernels a first-class, differentiable, compilable op.

Dispatch rule (documented in the README):
  * CUDA tensors run the Triton kernels.
  * CPU tensors run the same Triton kernels when TRITON_INTERPRET=1 is set (Triton's CPU
    interpreter: slow, exact, used by the test suite), and the PyTorch reference otherwise.
  * `use_backend("triton" | "reference" | "auto")` (a context manager), `set_backend(...)`, or
    the environment variable PM_KERNELS_BACKEND force either path.
Empty problems (B = 0, M = 0 or N = 0) always take the reference path, which defines them:
empty outputs, and y = 0 with zero gradients when N = 0 (no token to merge). So do float64 CUDA
inputs with M > FP64_MAX_M (see heuristics).

Registration: `pm_kernels::fwd` and `pm_kernels::bwd` are `torch.library.custom_op`s with fake
(meta) implementations, and `register_autograd` ties them together, so `torch.compile` traces the
op as a single node with no graph break and `torch.library.opcheck` holds. (`triton_op` would
let inductor see inside, but it cannot run under the CPU interpreter that CI tests with.)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backward import patch_merger_backward
from .forward import patch_merger_forward
from .heuristics import FP64_MAX_M, MAX_M, interpreting

__all__ = ["patch_merger", "use_backend", "set_backend", "get_backend"]

_BACKENDS = ("auto", "triton", "reference")
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Unset or empty means "auto"; a typo would otherwise run "auto" without a word.
_backend = os.environ.get("PM_KERNELS_BACKEND", "").strip().lower() or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"the environment variable PM_KERNELS_BACKEND must be one of {_BACKENDS} "
                     f"(or empty), got {os.environ['PM_KERNELS_BACKEND']!r}")


def set_backend(name: str) -> None:
    """Select the implementation: "auto" (the dispatch rule), "triton" or "reference"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of `set_backend`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _fp64_beyond_kernels(dtype: torch.dtype, device_type: str, m: int) -> bool:
    """float64 on CUDA with M > FP64_MAX_M runs the reference (see heuristics.FP64_MAX_M)."""
    return dtype == torch.float64 and device_type == "cuda" and m > FP64_MAX_M


def _use_triton(device: torch.device) -> bool:
    if _backend == "reference":
        return False
    if device.type == "cuda":
        return True
    if _backend == "triton" and not interpreting():
        raise RuntimeError(
            f"the Triton backend was forced for {device.type} tensors, which needs a CUDA device "
            "or Triton's CPU interpreter (set TRITON_INTERPRET=1 before importing pm_kernels)")
    return device.type == "cpu" and interpreting()


# ----------------------------------------------------------------------------------------------
# Validation: every error a caller can cause is raised here, before anything is launched.
# ----------------------------------------------------------------------------------------------

def _check_tensor(name, t, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} has dtype {t.dtype}; supported are float16, bfloat16, float32 "
                        "and float64")


def validate(x, queries, weight, bias, mask, eps, scale):
    """Check shapes, dtypes, devices and scalars. Returns the effective scale."""
    _check_tensor("x", x)
    _check_tensor("queries", queries)
    _check_tensor("weight", weight, optional=True)
    _check_tensor("bias", bias, optional=True)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., N, D) with at least 2 dims, got {tuple(x.shape)}")
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"x has D = 0 features (shape {tuple(x.shape)}); LayerNorm needs D >= 1")
    if queries.dim() != 2:
        raise ValueError(f"queries must be 2-D (M, D), got shape {tuple(queries.shape)}")
    if queries.shape[1] != d:
        raise ValueError(f"queries has D = {queries.shape[1]} but x has D = {d} "
                         f"(x {tuple(x.shape)}, queries {tuple(queries.shape)})")
    if queries.shape[0] > MAX_M:
        raise ValueError(f"queries has M = {queries.shape[0]} rows; at most {MAX_M} are supported")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name} must have shape (D,) = ({d},), got {tuple(t.shape)}")
    tensors = [("x", x), ("queries", queries), ("weight", weight), ("bias", bias), ("mask", mask)]
    for name, t in tensors[1:]:
        if t is not None and isinstance(t, Tensor) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must "
                             "be on the same device")
    # dtype combinations: parameters in x's dtype, or fp32 "master" parameters for fp16/bf16 x.
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
    for name, t in tensors[1:4]:
        if t is not None and t.dtype not in allowed:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; parameters must "
                            f"be {' or '.join(sorted(str(a) for a in allowed))}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = keep), got {mask.dtype}")
        lead = x.shape[:-1]
        if mask.dim() < 1 or mask.shape[-1] != lead[-1] or not _broadcastable(mask.shape, lead):
            raise ValueError(f"mask must have shape (..., N) broadcastable to {tuple(lead)}, "
                             f"got {tuple(mask.shape)}")
    # Plain comparisons, not math.isfinite: torch.compile(dynamic=True) cannot trace the latter
    # (a graph break, an error under fullgraph=True). Both also reject NaN.
    eps = _real("eps", eps)
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    scale = d ** -0.5 if scale is None else _real("scale", scale, "or None")
    if not -math.inf < scale < math.inf:
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return scale


def _real(name, v, alternative=""):
    """v as a Python float: ints, floats and NumPy scalars are fine; bools, tensors and the
    like are not (a 0-d tensor would need a device sync to read)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number{' ' + alternative if alternative else ''},"
                        f" got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {v!r}") from None


def _broadcastable(shape, target):
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target)))


# ----------------------------------------------------------------------------------------------
# torch.library registration. The ops see x flattened to (B, N, D) and mask to (B, N).
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_impl(x, queries, weight, bias, mask, eps, scale, return_weights, save_stats):
    """The forward launch behind both entry points (`_fwd`, `_EagerFn`). Returns y (B, M, D),
    lse2 (B, M), the token statistics (B, 3, N) and c_s (M,) that the backward reads (empty
    unless save_stats), and the merge weights (B, M, N) (empty unless asked)."""
    out = patch_merger_forward(x, queries, weight, bias, eps, scale, mask,
                               return_scores=return_weights, save_stats=save_stats)
    if return_weights:
        # p = exp2(s2 - lse2); rows with no unmasked token (lse2 = -inf) are defined as 0.
        empty = torch.isneginf(out.lse).unsqueeze(-1)
        p = torch.where(empty, 0.0, torch.exp2(out.scores - out.lse.unsqueeze(-1))).to(x.dtype)
    else:
        p = x.new_empty((0,))
    stats = out.stats if save_stats else out.lse.new_empty((0,))
    qsum = out.qsum if save_stats else out.lse.new_empty((0,))
    return out.y, out.lse, stats, qsum, p


@torch.library.custom_op("pm_kernels::fwd", mutates_args=())
def _fwd(x: Tensor, queries: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
         mask: Optional[Tensor], eps: float, scale: float, return_weights: bool,
         save_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y (B, M, D), lse2 (B, M), the token statistics (B, 3, N) and c_s (M,) (empty
    unless save_stats), and the merge weights (B, M, N) (empty unless asked)."""
    return _fwd_impl(x, queries, weight, bias, mask, eps, scale, return_weights, save_stats)


@_fwd.register_fake
def _fwd_fake(x, queries, weight, bias, mask, eps, scale, return_weights, save_stats):
    b, n, d = x.shape
    m = queries.shape[0]
    acc = _acc_dtype(x.dtype)
    p = x.new_empty((b, m, n)) if return_weights else x.new_empty((0,))
    stats = x.new_empty((b, 3, n), dtype=acc) if save_stats else x.new_empty((0,), dtype=acc)
    qsum = x.new_empty((m,), dtype=acc) if save_stats else x.new_empty((0,), dtype=acc)
    return x.new_empty((b, m, d)), x.new_empty((b, m), dtype=acc), stats, qsum, p


@torch.library.custom_op("pm_kernels::bwd", mutates_args=())
def _bwd(dy: Tensor, x: Tensor, queries: Tensor, weight: Optional[Tensor],
         bias: Optional[Tensor], mask: Optional[Tensor], y: Tensor, lse: Tensor, stats: Tensor,
         qsum: Tensor, scale: float, need_dx: bool = True,
         need_dqueries: bool = True, need_dweight: bool = True, need_dbias: bool = True
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns dx, dqueries, dweight, dbias; a gradient not needed (need_* False, or weight /
    bias None) is an empty tensor and is not computed."""
    grads = patch_merger_backward(dy, x, queries, weight, bias, y, lse, stats, qsum, scale, mask,
                                  needs=(need_dx, need_dqueries, need_dweight, need_dbias))
    # Missing gradients are returned as distinct empty tensors (outputs may not alias).
    return tuple(t if t is not None else x.new_empty((0,)) for t in grads)


@_bwd.register_fake
def _bwd_fake(dy, x, queries, weight, bias, mask, y, lse, stats, qsum, scale, need_dx=True,
              need_dqueries=True, need_dweight=True, need_dbias=True):
    def like(t, need):
        return torch.empty_like(t) if t is not None and need else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx
            else x.new_empty((0,)),
            like(queries, need_dqueries), like(weight, need_dweight), like(bias, need_dbias))


def _setup_context(ctx, inputs, output):
    x, queries, weight, bias, mask, eps, scale, _, _ = inputs
    y, lse, stats, qsum, p = output
    # Saved: x (the caller keeps it alive anyway), the parameters, y (M x D, for Delta), the
    # log-sum-exp (M values per batch element), the token statistics (3 values per token, under
    # 1 % of x's bytes) and c_s (M values). Nothing of size N x D or M x N.
    ctx.save_for_backward(x, queries, weight, bias, mask, y, lse, stats, qsum)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, stats, qsum, p)


def _backward(ctx, dy, _dlse, _dstats, _dqsum, _dp):
    x, queries, weight, bias, mask, y, lse, stats, qsum = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    dx, dq, dg, db = _bwd(dy, x, queries, weight, bias, mask, y, lse, stats, qsum, ctx.scale,
                          *need)
    grads = (dx, dq, dg if weight is not None else None, db if bias is not None else None)
    return (*(t if n else None for t, n in zip(grads, need)), None, None, None, None, None)


torch.library.register_autograd("pm_kernels::fwd", _backward, setup_context=_setup_context)


class _EagerFn(torch.autograd.Function):
    """The same forward, saved tensors and backward as the custom op, for eager mode.

    The custom op is what torch.compile and tracing need (a graph node with a fake
    implementation), but its eager dispatch (argument normalisation, redispatch, the
    dynamo-disable wrapper) costs tens to hundreds of microseconds of Python per call, as much
    as the kernels themselves at ViT-B sizes on an H100 (bench/results/README.md). Outside
    tracing `patch_merger` takes this direct path instead."""

    @staticmethod
    def forward(ctx, x, queries, weight, bias, mask, eps, scale, return_weights):
        out = _fwd_impl(x, queries, weight, bias, mask, eps, scale, return_weights, True)
        _setup_context(ctx, (x, queries, weight, bias, mask, eps, scale, return_weights, True),
                       out)
        return out

    @staticmethod
    def backward(ctx, dy, _dlse, _dstats, _dqsum, _dp):
        # The Triton backward is not itself differentiable. Autograd runs a backward with grad
        # mode on exactly when create_graph=True: refuse there, whether or not dy requires grad
        # (`once_differentiable` raised only when it did, and otherwise returned gradients
        # without a graph: a gradient penalty through this op was silently dropped).
        if torch.is_grad_enabled():
            raise RuntimeError("pm_kernels.patch_merger does not support double backward "
                               "(backward with create_graph=True)")
        x, queries, weight, bias, mask, y, lse, stats, qsum = ctx.saved_tensors
        dx, dq, dg, db = patch_merger_backward(dy, x, queries, weight, bias, y, lse, stats, qsum,
                                               ctx.scale, mask, needs=ctx.needs_input_grad[:4])
        return dx, dq, dg, db, None, None, None, None


def _tracing(x: Tensor) -> bool:
    """Whether the call is being traced rather than run: under torch.compile, or under a
    dispatch mode or with tensor subclasses (FakeTensorMode, make_fx, export), which need the
    custom op's fake implementation and must never reach a kernel launch."""
    return (torch.compiler.is_compiling() or type(x) is not Tensor
            or torch._C._len_torch_dispatch_stack() > 0)


def _forward_op(x, queries, weight, bias, mask, eps, scale, return_weights):
    """(y, lse, stats, qsum, p) through the path that fits the call. The statistics for the
    backward are written only when autograd will run one (the condition autograd itself uses)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (x, queries, weight, bias))
    if _tracing(x):
        return _fwd(x, queries, weight, bias, mask, eps, scale, return_weights, needs_grad)
    if needs_grad:
        return _EagerFn.apply(x, queries, weight, bias, mask, eps, scale, return_weights)
    return _fwd_impl(x, queries, weight, bias, mask, eps, scale, return_weights, False)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _autocast_cast(dev_type, x, queries, weight, bias):
    """Inputs as the op sees them under torch.autocast: like attention ops, it runs in the
    autocast dtype (lower_precision_fp policy). Autocast's eligibility rule applies: only
    floating-point tensors other than float64 are cast, so a float64 x keeps running in float64.
    float32 parameters stay float32 (the kernels take fp32 "master" parameters beside fp16/bf16 x
    and keep LayerNorm statistics in fp32, which saves a cast and is more accurate); parameters
    in the *other* half type (fp16 under a bf16 autocast, or vice versa) are cast to the autocast
    dtype, since the kernels accept only x's dtype or fp32. Non-tensors pass through untouched
    for `validate` to reject."""
    def eligible(t):
        return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
    if not eligible(x):
        return x, queries, weight, bias
    dt = torch.get_autocast_dtype(dev_type)
    x = x.to(dt)
    queries, weight, bias = (t.to(dt) if eligible(t) and t.dtype not in (torch.float32, dt) else t
                             for t in (queries, weight, bias))
    return x, queries, weight, bias


def patch_merger(x: Tensor, queries: Tensor, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None, *, eps: float = 1e-5,
                 scale: Optional[float] = None, mask: Optional[Tensor] = None,
                 return_weights: bool = False):
    """Fused PatchMerger: y = softmax_N(scale * queries @ LN(x)^T) @ LN(x).

    Args:
        x: tokens (..., N, D), float16 / bfloat16 / float32 / float64, any strides.
        queries: (M, D) learned queries, M <= 256.
        weight, bias: LayerNorm affine (D,), or None. Parameters may be float32 while x is
            float16 / bfloat16; everything accumulates in float32 either way.
        eps: LayerNorm epsilon (> 0).
        scale: score scale, None for D ** -0.5.
        mask: optional bool (..., N) broadcastable to x's leading dims; False drops a token
            (zero merge weight, zero gradient). An output token whose tokens are all dropped is
            0, with zero gradients.
        return_weights: also return the merge weights p (..., M, N), computed by the kernel only
            when asked. They are detached: no gradient flows through them.

    Returns:
        y (..., M, D) in x's dtype (the autocast dtype under torch.autocast), or (y, p).
    """
    dev_type = x.device.type if isinstance(x, Tensor) else None
    autocasting = dev_type in ("cuda", "cpu") and torch.is_autocast_enabled(dev_type)
    if autocasting:
        # Cast *before* validating, so that the dtypes the kernels see are the validated ones.
        x, queries, weight, bias = _autocast_cast(dev_type, x, queries, weight, bias)
    scale = validate(x, queries, weight, bias, mask, eps, scale)
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    m = queries.shape[0]
    # Inside, autocast is off: the inputs are already in the dtypes the op runs in.
    no_autocast = (torch.autocast(dev_type, enabled=False) if autocasting
                   else contextlib.nullcontext())
    if (not _use_triton(x.device) or x.numel() == 0 or m == 0
            or _fp64_beyond_kernels(x.dtype, x.device.type, m)):
        with no_autocast:
            return reference.patch_merger(x, queries, weight, bias, eps=eps, scale=scale,
                                          mask=mask, return_weights=return_weights)
    x3 = x.reshape(-1, n, d)
    mask2 = mask.expand(*lead, n).reshape(-1, n) if mask is not None else None
    with no_autocast:
        y, _lse, _stats, _qsum, p = _forward_op(x3, queries, weight, bias, mask2, float(eps),
                                                scale, return_weights)
    y = y.reshape(*lead, m, d)
    if return_weights:
        return y, p.reshape(*lead, m, n)
    return y
