"""Key padding mask, strided inputs and the merge weights (return_weights) of the Triton path.

Every numerical comparison follows the suite's accuracy rule (tolerance.py): ours at dtype vs the
float64 reference, allowed FACTOR x the error of plain PyTorch at dtype plus half an ulp. The
helpers here (`check_op`, `assert_rule` and the two allowances) are shared with test_fuzz.py and
test_extreme_inputs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gen as make_gen
from tolerance import FACTOR, atol, max_err

import pm_kernels
import pm_kernels.ops as ops
from pm_kernels import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.usefixtures("default_device")


def triton_op(*args, **kwargs):
    with pm_kernels.use_backend("triton"):
        return pm_kernels.patch_merger(*args, **kwargs)


def make(lead, n, d, m, dtype, *, param_dtype=None, affine=True, gen=None, offset=0.3):
    """x, queries, weight, bias in the test suite's usual ranges (see test_patch_merger)."""
    pd = param_dtype or dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = (randn(*lead, n, d) * 1.5 + offset).to(dtype)
    q = (2.0 * randn(m, d)).to(pd)
    g = (1.0 + 0.2 * randn(d)).to(pd) if affine else None
    b = (0.2 * randn(d)).to(pd) if affine else None
    return x, q, g, b


def assert_rule(name, out, baseline, truth, *, dt=None, extra=0.0):
    """`tolerance.assert_close_to_ref`, with three extensions the fuzzer needs:

    * `baseline` may be a tuple of equally valid plain-PyTorch computations at dt; the rule
      takes the largest of their errors. On tiny problems (M = 1, a few dozen outputs) a single
      baseline's max error is a noisy, sometimes very lucky estimate of "what dt costs";
      tolerance.py calibrated FACTOR against such an alternative formulation for this reason.
    * `dt`: the precision a value was computed at, when it is stored wider. The gradient of an
      fp32 parameter beside fp16/bf16 x is computed from x-precision operands (and plain PyTorch
      computes it entirely in x's dtype), so FACTOR and the half-ulp atol are those of x's dtype.
    * A baseline that is not finite where the truth is finite bounds nothing (err <= NaN is
      false). That happens when plain PyTorch at dt overflows, e.g. fp16 LayerNorm with
      eps = 1e-12, which underflows to 0. Such a baseline is replaced by the truth rounded to
      dt: the best any dt result can do."""
    dt = dt or out.dtype
    baselines = baseline if isinstance(baseline, tuple) else (baseline,)
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(truth).all(), f"{name}: the truth is not finite (check it by meaning)"
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite"
    baselines = tuple(bl if torch.isfinite(bl).all() else truth.to(dt) for bl in baselines)
    scale = truth.abs().max().item() if truth.numel() else 0.0
    err = max_err(out, truth)
    base = max(max_err(bl, truth) for bl in baselines)
    bound = FACTOR[dt] * base + atol(dt, scale) + extra
    assert err <= bound, (f"{name} ({out.dtype}, rule of {dt}): max error {err:.3e} > {FACTOR[dt]} "
                          f"x PyTorch's {base:.3e} + atol {atol(dt, scale):.3e} "
                          f"+ extra {extra:.3e}")


def folded_patch_merger(x, queries, weight=None, bias=None, *, eps=1e-5, scale=None, mask=None,
                        return_weights=False):
    """The op in plain PyTorch, formulated as the kernels do it: scores from xhat with the
    LayerNorm gain folded into the queries (the bias term cancels in the softmax), and
    y = (p @ xhat) * g + rowsum(p) * b. Mathematically identical to `reference.patch_merger`; a
    second, equally valid plain-PyTorch baseline for `assert_rule`. The gain is folded into the
    queries in the parameters' own precision (fp32 master weights beside fp16/bf16 x), then cast
    to x's dtype, as one would fold them once for inference."""
    d = x.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    wg = (queries * weight if weight is not None else queries).to(x.dtype)
    g, b = (t.to(x.dtype) if t is not None else None for t in (weight, bias))
    xhat = torch.nn.functional.layer_norm(x, (d,), eps=eps)
    s = scale * torch.matmul(xhat, wg.transpose(-1, -2)).transpose(-1, -2)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(-2), float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True) if s.shape[-1] else None
    p = s if empty is None else torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty,
                                                                                          0.0)
    y = torch.matmul(p, xhat)
    if g is not None:
        y = y * g
    if b is not None:
        y = y + p.sum(-1, keepdim=True) * b
    return (y, p.detach()) if return_weights else y


def delta_noise_allowance(x, q, g, b, dy, *, eps, scale, mask, y):
    """Extra error per gradient from the fused backward's softmax-backward preprocess, any N;
    `y` is the fused forward's output (the backward reads it).

    ds = p * (dp - Delta) needs sum_n ds = 0 (sum_n p = 1); PyTorch gets it to the last bit by
    forming Delta = sum_n p dp from the very dp it subtracts it from. The fused backward takes
    Delta' = sum_d dy (y - b) from the stored y (flash-attention's preprocess) and recomputes dp'
    in the single-sweep score pass (common.shifted_dots), whose dot operands are op(dy g) and
    op(x - k) (k: the per-token shift, the mean of the first 16 features), rounded to x's dtype.
    Both are exact in exact arithmetic; the mismatch dDelta = Delta' - sum_n p dp' is
        dDelta_bm = sum_d dy (y - y_true)                 (computed exactly from the given y)
                  + sum_n p |ddp'_bmn|
        |ddp'_bmn| <= 2 ulp || (dy g)_bm * (x_bn - k_bn) r_bn ||_2               (fp16 / bf16)
                    + 2 ulp_acc r_bn (sum_d |(dy g)_bm (x_bn - k_bn)| + |mu_bn - k_bn| sum_d |(dy g)_bm|)
    The first term: two operand roundings of half an ulp of x's dtype each, independent over d,
    so they add like a random walk (hence the 2-norm), with a safety factor of 2. The second:
    the accumulator's (fp32; fp64 for fp64) roundings in the D-term dot and in the unshift
    r (acc - (mu - k) c_dp), at the magnitude of its terms, a safety factor of 2 (this is the
    whole of it for fp32 and fp64, whose operands are not rounded; with N = 1, where the exact
    ds is 0, it is all there is to see). The fused backward then uses
    ds' = ds - p dDelta, so, to first order and entry by entry (b: batch element, summed where
    a gradient sums):
        dqueries_md: scale |g_d| sum_b dDelta_bm |(p @ xhat)_bmd|   (dW = scale g ds @ xhat)
        dxn_bnd:     scale sum_m p_bmn dDelta_bm |W_md|              (dxn = p^T dy + scale ds^T W)
        dweight_d:   sum_bn dxn_bnd |xhat_bnd|
        dx_bnd:      r_bn (|g_d| dxn_bnd + mean_d |g| dxn_bn + |xhat_bnd| mean_d |g| dxn_bn |xhat_bn|)
                     + r_bn |xhat_bnd| sum_m p_bmn |ddp'_bmn| / D
                     (the last term: the row mean mean_d(g dxn xhat) is formed from sum_m p dp',
                     which carries ddp' while the dx sweep's dxn does not; summed over the dims
                     that x's view expands, which sum into one dx)
        dbias:       0: the fused backward takes db = sum_m dy (sum_n p = 1) from the delta
                     kernel and never sums dxn for it.
    That error is invisible next to PyTorch's own where the score-path gradients are large, and
    dominates where they are structurally ~0 (dy constant along D, e.g. y.sum().backward(), with
    g ~ 1; a (near) one-hot softmax; a single live token). Until 2026-12-01 each gradient took
    the product of the maxima of these factors, summed over the queries too, with dDelta
    estimated as 8 ulp max_n || dy g xhat_n ||_2: in bf16 that exceeded the gradients
    themselves (a zeroed dqueries passed)."""
    d, m = x.shape[-1], q.shape[0]
    scale = d ** -0.5 if scale is None else scale
    x64 = x.double()
    g64 = g.double() if g is not None else torch.ones(d, dtype=torch.float64, device=x.device)
    b64 = b.double() if b is not None else None
    xhat = torch.nn.functional.layer_norm(x64, (d,), eps=eps)                  # (..., N, D)
    rstd = (x64.var(-1, unbiased=False) + eps).rsqrt().unsqueeze(-1)           # (..., N, 1)
    k = x64[..., :16].mean(-1, keepdim=True)                                   # the kernels' shift
    dy64 = dy.double().expand(*x.shape[:-2], m, d)
    dyg = dy64 * g64                                                           # (..., M, D)
    acc_eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    ddp = 2 * acc_eps * rstd.squeeze(-1).unsqueeze(-2) * (
        torch.einsum("...md,...nd->...mn", dyg.abs(), (x64 - k).abs())
        + dyg.abs().sum(-1, keepdim=True) * (x64.mean(-1) - k.squeeze(-1)).abs().unsqueeze(-2))
    if x.dtype in (torch.float16, torch.bfloat16):
        ddp = ddp + 2 * torch.finfo(x.dtype).eps * torch.sqrt(
            torch.einsum("...md,...nd->...mn", dyg ** 2, ((x64 - k) * rstd) ** 2))  # (..., M, N)
    if mask is not None:
        ddp = ddp.masked_fill(~mask.unsqueeze(-2), 0.0)
    p = reference.patch_merger_weights(x64, q.double(), g64, b64, eps=eps, scale=scale,
                                       mask=mask)                               # (..., M, N)
    y_true = reference.patch_merger(x64, q.double(), g64, b64, eps=eps, scale=scale, mask=mask)
    ddelta = ((dy64 * (y.double() - y_true)).sum(-1).abs()
              + (p * ddp).sum(-1))                                             # (..., M)
    lead = tuple(range(x.dim() - 2))
    dq = scale * g64.abs() * ddelta.unsqueeze(-1) * (p @ xhat).abs()           # (..., M, D)
    dxn = scale * torch.einsum("...mn,md->...nd", p * ddelta.unsqueeze(-1),
                               q.double().abs())                               # (..., N, D)
    gdxn = g64.abs() * dxn
    dx = rstd * (gdxn + gdxn.mean(-1, keepdim=True)
                 + xhat.abs() * (gdxn * xhat.abs()).mean(-1, keepdim=True)
                 + xhat.abs() * (p * ddp).sum(-2).unsqueeze(-1) / d)           # (..., N, D)
    expanded = tuple(i for i in range(x.dim()) if x.stride(i) == 0 and x.shape[i] > 1)
    if expanded:
        dx = dx.sum(expanded)
    tokens = lead + (x.dim() - 2,)
    return {
        "dqueries": (dq.sum(lead) if lead else dq).max().item(),
        "dbias": 0.0,
        "dweight": (dxn * xhat.abs()).sum(tokens).max().item(),
        "dx": dx.max().item(),
    }


def tiny_d_allowance(x, q, g, b, dy, *, eps, scale, mask):
    """Extra error for D <= 2, where LayerNorm is degenerate: xhat = 0 for D = 1 and +-1 (up to
    eps) for D = 2, so several gradients are structurally ~0 and only rounding noise, amplified
    by r = 1/sqrt(var + eps) (1/sqrt(eps) when the two features are equal), remains.

    * dx = r * (g dxn - mean_d(g dxn) - xhat * mean_d(g dxn xhat)) has a bracket of exactly 0
      (D = 1) or nearly (D = 2). PyTorch takes both means from the very dxn it subtracts them
      from; the fused backward forms them from per-(m, n) sums of the score pass (backward.py),
      which differ by the roundings of those sums: ulps of x's dtype (the dot operands' dtype)
      of sum_m p_mn |dy_m g| + scale sum_m |ds_mn| |W_m g|, times r.
    * xhat itself is computed as (x - mean) * r: a rounding of |x| times r, in ours and in the
      float64 truth alike; it enters dweight (sum_n dxn xhat), dqueries (scale g ds @ xhat) and
      dx through its two xhat terms: r dxhat (|mean_d g dxn xhat| + |xhat| mean_d |g dxn|),
      at most 2 r dxhat max|g dxn| max|xhat|. (That term was missing until 2026-12-01, covered
      by a far looser delta_noise_allowance: fuzz case D = 2, float64, a token with r = 46.)
      It also reaches y and p: y = sum_n p xn moves by g * dxhat and through the scores
      s = scale (W g) . xhat, p by p * 2 max|ds|.
    * dweight / dbias have one or two entries, where the rule's half-ulp atol (rounding luck
      averaged over many entries) is a coin flip: 2 more ulps of their magnitude.
    Per token, summed over the batch (an expanded batch sums into one dx)."""
    d, n = x.shape[-1], x.shape[-2]
    if d > 2:
        return {}
    scale = d ** -0.5 if scale is None else scale
    ulp = torch.finfo(x.dtype).eps
    x64 = x.double()
    g64 = g.double() if g is not None else torch.ones(d, dtype=torch.float64, device=x.device)
    b64 = b.double() if b is not None else None
    q64 = q.double()
    xn = torch.nn.functional.layer_norm(x64, (d,), g64, b64, eps).detach().requires_grad_()
    s = (scale * (xn @ q64.transpose(-1, -2)).transpose(-1, -2)).detach().requires_grad_()
    sm = s.masked_fill(~mask.unsqueeze(-2), float("-inf")) if mask is not None else s
    empty = torch.isneginf(sm).all(-1, keepdim=True)
    p = torch.softmax(sm.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    y = p @ xn
    dy64 = dy.double().expand(y.shape)
    ds, dxn_y = torch.autograd.grad(y, (s, xn), dy64)                       # through p; direct
    dxn = dxn_y + scale * (ds.transpose(-1, -2) @ q64)                        # (..., N, D)
    rstd = (x64.var(-1, unbiased=False) + eps).rsqrt()                        # (..., N)
    dyg = (dy64 * g64).abs().amax(-1)                                         # (..., M)
    wg = (q64 * g64).abs().amax(-1)                                           # (M,)
    terms = (p * dyg.unsqueeze(-1)).sum(-2) + (ds.abs() * wg.unsqueeze(-1)).sum(-2)
    xhat_err = rstd * x64.abs().amax(-1) * 4 * ulp                           # (..., N)
    gmax = g64.abs().max().item()
    db = dxn.reshape(-1, d).sum(0).abs().max().item()
    xhat = torch.nn.functional.layer_norm(x64, (d,), eps=eps)
    dg = (dxn * xhat).reshape(-1, d).sum(0).abs().max().item()
    ds_err = scale * (q64 * g64).abs().sum(-1).max().item() * xhat_err.max().item()
    return {
        "y": xhat_err.max().item() * gmax + 2 * ds_err * xn.abs().max().item(),
        "p": 2 * ds_err * p.max().item(),
        "dx": (8 * ulp * rstd * gmax * terms
               + 2 * rstd * xhat_err * (g64 * dxn).abs().amax(-1) * xhat.abs().amax(-1))
        .reshape(-1, n).sum(0).max().item(),
        "dweight": 2 * ulp * dg + (dxn.abs().amax(-1) * xhat_err).sum().item(),
        "dbias": 2 * ulp * db,
        "dqueries": scale * gmax * (ds.abs() * xhat_err.unsqueeze(-2)).sum().item(),
    }


def weights_allowance(x, q, g, *, eps, scale, mask):
    """Extra error of the merge weights p in float32 / float64 (fp16 / bf16 p are rounded to
    their dtype, far coarser). The kernel returns p = exp2(s2 - lse2) from base-2 scores
    s2 = scale * log2(e) * (W g) . xhat (the bias term cancels and is never formed) and the
    log-sum-exp lse2 of the forward: the argument carries roundings at the magnitude of |s2|
    and |lse2| (a few ulps of the accumulator), so p is off by p * ln 2 * that. softmax
    rounds at the magnitude of s - max(s) instead, which on rows of a few tokens can be much
    luckier than the rule's half-ulp atol."""
    if x.dtype not in (torch.float32, torch.float64):
        return 0.0
    d = x.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    g64 = g.double() if g is not None else torch.ones(d, dtype=torch.float64, device=x.device)
    xhat = torch.nn.functional.layer_norm(x.double(), (d,), eps=eps)
    s2 = scale * (xhat @ (q.double() * g64).transpose(-1, -2)).transpose(-1, -2) / math.log(2)
    live = s2.masked_fill(~mask.unsqueeze(-2), float("-inf")) if mask is not None else s2
    lse2 = torch.logsumexp(live * math.log(2), -1, keepdim=True) / math.log(2)
    p = torch.exp2(live - lse2).nan_to_num(0.0)
    arg = s2.abs() + lse2.nan_to_num(0.0, posinf=0.0, neginf=0.0).abs()
    return (2 * torch.finfo(x.dtype).eps * math.log(2) * p * arg).max().item()


def _run(fn, leaves, view, dy, kwargs):
    """y = fn(view(x), q, g, b, **kwargs); backward with dy ("sum" for y.sum()) when given."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in leaves]
    x, q, g, b = leaves
    out = fn(view(x), q, g, b, **kwargs)
    y = out[0] if isinstance(out, tuple) else out
    if dy is None:
        return out, None
    if isinstance(dy, str):
        y.sum().backward()
    else:
        y.backward(dy)
    return out, [t.grad if t is not None else None for t in leaves]


def check_op(x, q, g, b, *, dy=None, mask=None, scale=None, eps=1e-5, view=None, fn=triton_op,
             return_weights=False):
    """Compare `fn` (default: the public op on the Triton backend) with the reference.

    x is the leaf; `view(x)` (e.g. a transpose, slice or expand of it) is what the op sees, so
    gradients w.r.t. x also test that the strided path scatters them back correctly. dy: None
    (forward only), a tensor of y's shape (may be strided), or "sum" (a stride-0 gradient)."""
    view = view or (lambda t: t)
    kw = dict(mask=mask, scale=scale, eps=eps)
    out, grads = _run(fn, (x, q, g, b), view, dy, dict(kw, return_weights=return_weights))

    def ref(cast):
        def f(x_, q_, g_, b_, **k):
            return reference.patch_merger(x_, q_, g_, b_, **k)
        args = [t.to(cast) if t is not None and cast is not None else t for t in (x, q, g, b)]
        d = dy.to(cast) if isinstance(dy, torch.Tensor) and cast is not None else dy
        return _run(f, args, view, d, dict(kw, return_weights=return_weights))

    (out_b, grads_b), (out_t, grads_t) = ref(None), ref(torch.float64)
    out_f, grads_f = _run(folded_patch_merger, (x, q, g, b), view, dy,
                          dict(kw, return_weights=return_weights))
    y, y_b, y_f, y_t = (o[0] if return_weights else o for o in (out, out_b, out_f, out_t))
    dy_t = (torch.ones_like(y_t) if dy is None or isinstance(dy, str) else dy).double()
    kw_a = dict(eps=eps, scale=scale, mask=mask)
    allowance = tiny_d_allowance(view(x), q, g, b, dy_t, **kw_a)
    assert y.dtype == x.dtype
    assert_rule("y", y.detach(), (y_b.detach(), y_f.detach()), y_t.detach(),
                extra=allowance.get("y", 0.0))
    if return_weights:
        assert out[1].dtype == x.dtype
        assert_rule("p", out[1], (out_b[1], out_f[1]), out_t[1], extra=allowance.get("p", 0.0)
                    + weights_allowance(view(x), q, g, eps=eps, scale=scale, mask=mask))
    if grads is None:
        return out
    for k_, v_ in delta_noise_allowance(view(x), q, g, b, dy_t, y=y.detach(), **kw_a).items():
        allowance[k_] = allowance.get(k_, 0.0) + v_
    for name, gr, gb, gf, gt, t in zip(("dx", "dqueries", "dweight", "dbias"), grads, grads_b,
                                       grads_f, grads_t, (x, q, g, b)):
        if t is None:
            continue
        assert gr.dtype == t.dtype, f"{name}: dtype {gr.dtype} != {t.dtype}"
        assert_rule(name, gr, (gb, gf), gt, dt=x.dtype, extra=allowance.get(name, 0.0))
    return out, grads


@pytest.fixture
def seen(monkeypatch):
    """Record the x / dy tensors the launchers receive (to prove no copy was made)."""
    record = {}
    fwd, bwd = ops.patch_merger_forward, ops.patch_merger_backward

    def spy_fwd(x, *a, **k):
        record["fwd_x"] = (x.data_ptr(), x.stride())
        return fwd(x, *a, **k)

    def spy_bwd(dy, x, *a, **k):
        record["bwd_dy"] = (dy.data_ptr(), dy.stride())
        record["bwd_x"] = (x.data_ptr(), x.stride())
        return bwd(dy, x, *a, **k)

    monkeypatch.setattr(ops, "patch_merger_forward", spy_fwd)
    monkeypatch.setattr(ops, "patch_merger_backward", spy_bwd)
    return record


# =============================================================================================
# Strided inputs
# =============================================================================================

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_x_no_copy(dtype, seen):
    # x stored as (B, D, N) and viewed as (B, N, D): stride_d = N != 1.
    xt, q, g, b = make((2,), 40, 37, 5, dtype)
    xt = xt.transpose(-1, -2).contiguous()                       # the (B, D, N) storage
    view = lambda t: t.transpose(-1, -2)                         # noqa: E731
    dy = torch.randn(2, 5, 37).to(dtype)
    check_op(xt, q, g, b, dy=dy, view=view)
    assert seen["fwd_x"][1] == (37 * 40, 1, 40)                  # strides reached the kernel
    assert seen["bwd_x"][1] == (37 * 40, 1, 40)


def test_transposed_x_is_not_copied(seen):
    x = torch.randn(2, 24, 9).transpose(1, 2)
    triton_op(x, torch.randn(3, 24))
    assert seen["fwd_x"] == (x.data_ptr(), x.stride())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sliced_x(dtype, seen):
    # Every other token of a wider, offset buffer: non-unit token stride, non-zero offset.
    big, q, g, b = make((3,), 2 * 23 + 1, 50, 4, dtype)
    view = lambda t: t[:, 1::2, 5:45]                            # noqa: E731
    dy = torch.randn(3, 4, 40).to(dtype)
    check_op(big, q[:, :40], g[:40], b[:40], dy=dy, view=view)
    v = view(big)
    assert seen["fwd_x"][1] == v.stride() and not v.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_expanded_batch_and_stride0_dy(dtype, seen):
    # x.expand(...) has a stride-0 batch dim; y.sum()'s gradient has every stride 0.
    x1, q, g, b = make((1,), 30, 24, 6, dtype)
    view = lambda t: t.expand(4, 30, 24)                         # noqa: E731
    check_op(x1, q, g, b, dy="sum", view=view)
    assert seen["fwd_x"][1][0] == 0 and seen["bwd_x"][1][0] == 0
    assert seen["bwd_dy"][1] == (0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_dy(dtype, seen):
    x, q, g, b = make((2,), 21, 33, 7, dtype)
    big = torch.randn(2, 33, 2 * 7).to(dtype)
    dy = big.transpose(1, 2)[:, ::2]                             # (2, 7, 33), stride_d = 14
    check_op(x, q, g, b, dy=dy)
    assert seen["bwd_dy"][1] == dy.stride()


def test_expanded_dy_over_batch(seen):
    x, q, g, b = make((3,), 19, 40, 4, torch.float32)
    dy = torch.randn(1, 4, 40).expand(3, 4, 40)
    check_op(x, q, g, b, dy=dy)
    assert seen["bwd_dy"][1] == (0, 40, 1)


def test_4d_x_permuted_lead_dims():
    # Leading dims that cannot be merged into one batch stride: ops reshapes (copies) them.
    x, q, g, b = make((3, 2), 13, 20, 3, torch.float32)
    view = lambda t: t.transpose(0, 1)                           # noqa: E731
    check_op(x, q, g, b, dy=torch.randn(2, 3, 3, 20), view=view)


def _through_parameter_view(which, leaf, view, x, q, g, b, dy, per_entry):
    """y and the gradient of `leaf` when the op sees `view(leaf)` as its `which` argument:
    ours, plain PyTorch at float32 and the float64 truth, judged by the rule. `per_entry`:
    how many gradient entries of the op's own argument sum into one of the leaf's (the
    delta-noise allowance is per entry)."""
    args = {"queries": q, "weight": g, "bias": b}

    def run(op, cast):
        lf = leaf.detach().to(cast).requires_grad_()
        a = {k: v.to(cast) for k, v in args.items()}
        a[which] = view(lf)
        assert not a[which].is_contiguous()
        y = op(x.to(cast), a["queries"], a["weight"], a["bias"])
        y.backward(dy.to(cast))
        return y.detach(), lf.grad

    (y, grad), (y_b, grad_b), (y_t, grad_t) = (run(triton_op, torch.float32),
                                               run(reference.patch_merger, torch.float32),
                                               run(reference.patch_merger, torch.float64))
    extra = delta_noise_allowance(x, q, g, b, dy, eps=1e-5, scale=None, mask=None, y=y)
    name = "dqueries" if which == "queries" else "d" + which
    assert_rule("y", y, y_b, y_t)
    assert_rule(name, grad, grad_b, grad_t, extra=per_entry * extra[name])


@pytest.mark.parametrize("which", ["weight", "bias", "queries"])
def test_strided_parameters(which):
    # Regression: weight / bias views with a non-unit stride (or stride 0) were read as if
    # contiguous by the kernels (wrong y and gradients); the launchers now make them contiguous.
    x, q, g, b = make((2,), 17, 24, 4, torch.float32)
    bigs = {"weight": g.repeat_interleave(2), "bias": b.repeat_interleave(2),
            "queries": q.t().contiguous()}
    views = {"weight": lambda t: t[::2], "bias": lambda t: t[::2], "queries": lambda t: t.t()}
    dy = torch.randn(2, 4, 24, generator=make_gen(3))
    _through_parameter_view(which, bigs[which], views[which], x, q, g, b, dy, 1)


def test_stride0_weight():
    # A broadcast LayerNorm gain, e.g. torch.tensor(1.3).expand(D): its gradient is the sum of
    # the D entries of dweight.
    x, q, _, b = make((2,), 9, 16, 3, torch.float32)
    g = torch.tensor(1.3).expand(16)
    dy = torch.randn(2, 3, 16, generator=make_gen(4))
    _through_parameter_view("weight", torch.tensor(1.3), lambda t: t.expand(16), x, q, g, b, dy,
                            16)


@pytest.mark.parametrize("kind", ["sliced", "broadcast-N", "broadcast-4d"])
def test_strided_and_broadcast_masks(kind):
    x, q, g, b = make((2, 3) if kind == "broadcast-4d" else (3,), 26, 20, 4, torch.float32)
    gen = make_gen(1)
    if kind == "sliced":
        mask = (torch.rand(3, 52, generator=gen) > 0.4)[:, ::2]   # stride_n = 2
        mask[1, :] = False
    elif kind == "broadcast-N":
        mask = torch.rand(26, generator=gen) > 0.4                 # (N,): stride-0 batch
    else:
        mask = torch.rand(3, 26, generator=gen) > 0.4              # (3, N) over x (2, 3, N, D)
    dy = torch.randn(*x.shape[:-2], 4, 20)
    check_op(x, q, g, b, dy=dy, mask=mask)


# =============================================================================================
# Key padding mask
# =============================================================================================

def _mask(shape, keep=0.6, seed=0):
    gen = make_gen(seed)
    mask = torch.rand(shape, generator=gen) < keep
    mask[..., 0] = True            # at least one live token per row unless a test says otherwise
    return mask


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("lead,n,d,m", [((2,), 45, 70, 6), ((2, 2), 9, 24, 3), ((1,), 100, 32, 5)],
                         ids=["3d", "4d", "split"])
def test_masked_matches_reference(lead, n, d, m, dtype):
    x, q, g, b = make(lead, n, d, m, dtype)
    mask = _mask((*lead, n), seed=n)
    check_op(x, q, g, b, dy=torch.randn(*lead, m, d).to(dtype), mask=mask, return_weights=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_tokens_have_zero_weight_and_zero_dx(dtype):
    x, q, g, b = make((2,), 37, 40, 5, dtype)
    mask = _mask((2, 37), keep=0.5)
    xl = x.clone().requires_grad_()
    y, p = triton_op(xl, q, g, b, mask=mask, return_weights=True)
    y.backward(torch.randn_like(y))
    assert (p.transpose(-1, -2)[~mask] == 0).all()              # exactly zero weight
    assert (p.transpose(-1, -2)[mask] > 0).any()
    torch.testing.assert_close(p.float().sum(-1), torch.ones(2, 5), rtol=0, atol=1e-2)
    assert (xl.grad[~mask] == 0).all()                          # exactly zero gradient
    assert (xl.grad[mask] != 0).any()


@pytest.mark.parametrize("junk", ["random", "inf", "nan", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_masked_token_values_do_not_matter(junk, dtype):
    """Overwriting masked tokens (even with inf / NaN) changes neither y nor any gradient of the
    unmasked part: bitwise, since a masked token is excluded before it meets anything else."""
    x, q, g, b = make((2,), 40, 36, 4, dtype)
    mask = _mask((2, 40), keep=0.6, seed=3)
    x2 = x.clone()
    fill = {"random": torch.randn(x.shape).to(dtype) * 1e3, "inf": torch.full_like(x, float("inf")),
            "nan": torch.full_like(x, float("nan"))}
    fill["mixed"] = torch.where(torch.rand(x.shape) < 0.5, fill["inf"], -fill["inf"])
    fill["mixed"][..., ::3] = float("nan")
    x2[~mask] = fill[junk][~mask]
    dy = torch.randn(2, 4, 36).to(dtype)

    def run(x_):
        leaves = [t.clone().requires_grad_() for t in (x_, q, g, b)]
        y, p = triton_op(*leaves, mask=mask, return_weights=True)
        y.backward(dy)
        return [y.detach(), p] + [t.grad for t in leaves]

    clean, dirty = run(x), run(x2)
    for name, a, c in zip(("y", "p", "dx", "dq", "dg", "db"), clean, dirty):
        assert torch.equal(a, c), name
    assert (dirty[2][~mask] == 0).all() and torch.isfinite(dirty[2]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_masked_rows_are_zero_with_zero_grads(dtype):
    x, q, g, b = make((3,), 20, 24, 4, dtype)
    mask = _mask((3, 20), seed=5)
    mask[1] = False                                             # batch element 1: nothing kept
    x[1] = float("nan")                                         # ... and nothing readable
    leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
    y, p = triton_op(*leaves, mask=mask, return_weights=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert (y[1] == 0).all() and (p[1] == 0).all()
    assert (leaves[0].grad[1] == 0).all()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # The other batch elements are unaffected: same result as without element 1, and the
    # empty rows add nothing to the parameter gradients (db is a sum of dy over live rows).
    keep = [0, 2]
    kept = [t.clone().requires_grad_() for t in (x[keep], q, g, b)]
    y2 = triton_op(*kept, mask=mask[keep])
    y2.backward(dy[keep])
    tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(y[keep].detach(), y2.detach(), **tol)
    for name, full, part in zip(("dq", "dg", "db"), leaves[1:], kept[1:]):
        torch.testing.assert_close(full.grad, part.grad, msg=name, **tol)


def test_all_masked_everything_gives_zero_grads():
    x, q, g, b = make((2,), 8, 16, 3, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
    y = triton_op(*leaves, mask=torch.zeros(2, 8, dtype=torch.bool))
    y.backward(torch.randn_like(y))
    assert (y == 0).all()
    for t in leaves:
        assert (t.grad == 0).all()


def test_module_forward_accepts_mask():
    mod = pm_kernels.PatchMerger(24, 4)
    with torch.no_grad():
        mod.norm.weight.normal_(1.0, 0.2)
        mod.norm.bias.normal_(0.0, 0.2)
    x = torch.randn(2, 15, 24)
    mask = _mask((2, 15), seed=7)
    with pm_kernels.use_backend("triton"):
        y, p = mod(x, mask=mask, return_weights=True)
        y_fn = pm_kernels.patch_merger(x, mod.queries, mod.norm.weight, mod.norm.bias,
                                       mask=mask, scale=mod.scale)
    assert torch.equal(y, y_fn)
    assert (p.transpose(-1, -2)[~mask] == 0).all()
    params = (mod.queries, mod.norm.weight, mod.norm.bias)
    truth = reference.patch_merger(x.double(), *(t.double() for t in params), mask=mask)
    assert_rule("y", y.detach(), reference.patch_merger(x, *params, mask=mask).detach(), truth)


def test_cpp_reference_agrees_on_masked_case():
    x, q, g, b = make((2,), 23, 40, 5, torch.float64)
    mask = _mask((2, 23), seed=11)
    mask[1, 3:] = False
    dy = torch.randn(2, 5, 40, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
    y = triton_op(*leaves, mask=mask)
    y.backward(dy)
    cpu = [t.cpu() for t in (dy, x, q, g, b, mask)]                # the C++ reference: CPU only
    y_cpp = reference.cpp_patch_merger(*cpu[1:5], mask=cpu[5])
    grads_cpp = reference.cpp_patch_merger_backward(*cpu[:5], mask=cpu[5])
    torch.testing.assert_close(y.detach().cpu(), y_cpp, rtol=1e-11, atol=1e-11)
    for t, gc in zip(leaves, grads_cpp):
        torch.testing.assert_close(t.grad.cpu(), gc, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_variable_resolution_packing(dtype):
    """Two images with different token counts (e.g. 4x3 and 5x4 patch grids) in one padded
    batch give the same outputs and gradients as running each image on its own."""
    d, m = 48, 4
    gen = make_gen(2)
    a, q, g, b = make((1,), 12, d, m, dtype, gen=gen)
    c, _, _, _ = make((1,), 20, d, m, dtype, gen=gen)
    packed = torch.full((2, 20, d), float("nan"), dtype=dtype)  # padding is garbage on purpose
    packed[0, :12], packed[1] = a[0], c[0]
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, :12], mask[1] = True, True
    dy = torch.randn(2, m, d).to(dtype)

    def run(x_, mask_, dy_):
        leaves = [t.clone().requires_grad_() for t in (x_, q, g, b)]
        y = triton_op(*leaves, mask=mask_)
        y.backward(dy_)
        return y.detach(), [t.grad for t in leaves]

    y_p, gr_p = run(packed, mask, dy)
    y_a, gr_a = run(a, None, dy[:1])
    y_c, gr_c = run(c, None, dy[1:])
    tol = dict(rtol=0, atol=4 * torch.finfo(dtype).eps * 8)    # a few ulps at |y|, |grad| ~ 8
    torch.testing.assert_close(y_p, torch.cat([y_a, y_c]), **tol)
    torch.testing.assert_close(gr_p[0][0, :12], gr_a[0][0], **tol)
    assert (gr_p[0][0, 12:] == 0).all()
    torch.testing.assert_close(gr_p[0][1], gr_c[0][0], **tol)
    for i in (1, 2, 3):                                         # parameter grads add up
        torch.testing.assert_close(gr_p[i].double(), gr_a[i].double() + gr_c[i].double(),
                                   rtol=0, atol=8 * torch.finfo(dtype).eps * 8)


# =============================================================================================
# return_weights
# =============================================================================================

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_weights_match_reference(dtype):
    x, q, g, b = make((2,), 50, 40, 7, dtype)
    mask = _mask((2, 50), seed=4)
    mask[1, :] = False
    mask[1, 10:13] = True
    y, p = triton_op(x, q, g, b, mask=mask, return_weights=True)
    assert p.shape == (2, 7, 50) and p.dtype == dtype
    p_base = reference.patch_merger_weights(x, q, g, b, mask=mask)
    p_true = reference.patch_merger_weights(*(t.double() for t in (x, q, g, b)), mask=mask)
    assert_rule("p", p, p_base, p_true)
    sums = p.double().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0,
                               atol=50 * torch.finfo(dtype).eps)


def test_weights_rows_of_all_masked_tokens_sum_to_zero():
    x, q, g, b = make((2, 2), 10, 16, 3, torch.float32)
    mask = _mask((2, 2, 10), seed=9)
    mask[0, 1] = False
    _, p = triton_op(x, q, g, b, mask=mask, return_weights=True)
    assert p.shape == (2, 2, 3, 10)
    sums = p.sum(-1)
    assert (sums[0, 1] == 0).all()
    torch.testing.assert_close(sums[mask.any(-1)], torch.ones(3, 3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_weights_are_detached_and_y_is_bitwise_identical(dtype):
    x, q, g, b = make((2,), 33, 24, 5, dtype)
    mask = _mask((2, 33), seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
    y1, p = triton_op(*leaves, mask=mask, return_weights=True)
    y2 = triton_op(*leaves, mask=mask)
    assert not p.requires_grad and p.grad_fn is None
    assert y1.requires_grad
    assert torch.equal(y1, y2)
    dy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, leaves, dy)
    g2 = torch.autograd.grad(y2, leaves, dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    # Documented as non-differentiable.
    assert "detached" in pm_kernels.patch_merger.__doc__


def test_module_return_weights():
    mod = pm_kernels.PatchMerger(20, 3)
    x = torch.randn(2, 11, 20, requires_grad=True)
    with pm_kernels.use_backend("triton"):
        y, p = mod(x, return_weights=True)
    assert y.shape == (2, 3, 20) and p.shape == (2, 3, 11) and not p.requires_grad
    p_ref = reference.patch_merger_weights(x.detach().double(), mod.queries.detach().double(),
                                           mod.norm.weight.detach().double(),
                                           mod.norm.bias.detach().double())
    torch.testing.assert_close(p.double(), p_ref, rtol=1e-5, atol=1e-6)


# =============================================================================================
# The picture: pm_kernels.viz (matplotlib is the optional extra `viz`)
# =============================================================================================

def test_merge_assignment():
    from pm_kernels.viz import merge_assignment

    p = torch.tensor([[0.7, 0.1, 0.0, 0.2, 0.0, 0.0],
                      [0.2, 0.5, 0.0, 0.3, 0.0, 0.0],
                      [0.1, 0.4, 0.0, 0.5, 0.0, 0.0]])              # columns 2, 4, 5: masked
    owner = merge_assignment(p, (2, 3))
    assert owner.tolist() == [[0, 1, -1], [2, -1, -1]]
    with pytest.raises(ValueError, match=r"weights have 6 columns but grid 2x2 has 4 patches"):
        merge_assignment(p, (2, 2))
    with pytest.raises(ValueError, match=r"weights must have shape \(M, h \* w\)"):
        merge_assignment(p[None], (2, 3))
    with pytest.raises(ValueError, match=r"grid must be a pair"):
        merge_assignment(p, 6)


def _merge_weights_of_an_image():
    x, q, g, b = make((1,), 12, 16, 3, torch.bfloat16)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, 5] = False
    _, p = triton_op(x, q, g, b, mask=mask, return_weights=True)
    return p[0]                                                     # (3, 12), bf16


def test_render_merge_map(tmp_path):
    from pm_kernels import viz

    p = _merge_weights_of_an_image()
    image = (torch.rand(3, 24, 32) * 255).to(torch.uint8)          # CHW uint8
    # matplotlib is in the test extra, so this always draws (the no-matplotlib path is tested
    # below, by hiding the module).
    out = tmp_path / "map.png"
    fig = viz.render_merge_map(image, p, (3, 4), path=str(out), token_labels=["a", "b", "c"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert len(fig.axes) == 2 + 3                 # input, argmax overlay, one heat map each
    owner = torch.from_numpy(viz.merge_assignment(p, (3, 4))).flatten()
    assert (owner == -1).sum() == 1                                 # the masked token
    counts = torch.bincount(owner[owner >= 0], minlength=3).tolist()
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == [f"{k} ({c})" for k, c in zip("abc", counts)]
    # A float HWC image outside [0, 1] (a normalised tensor) and float64 numpy weights work too.
    fig2 = viz.render_merge_map(torch.randn(24, 32, 3), p.double().cpu().numpy(), (3, 4))
    assert len(fig2.axes) == 5
    with pytest.raises(ValueError, match=r"token_labels has 2 entries for M = 3"):
        viz.render_merge_map(image, p, (3, 4), token_labels=["a", "b"])
    with pytest.raises(ValueError, match=r"image must have shape \(H, W, 3\)"):
        viz.render_merge_map(torch.rand(5, 24, 32), p, (3, 4))


def test_viz_without_matplotlib(monkeypatch):
    import sys

    from pm_kernels import viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    with pytest.raises(ImportError, match=r"pip install pm-kernels\[viz\]"):
        viz.render_merge_map(torch.rand(8, 8, 3), torch.full((2, 4), 0.25), (2, 2))
    # The numpy-only helper keeps working.
    assert viz.merge_assignment(torch.eye(2, 4), (2, 2)).tolist() == [[0, 1], [-1, -1]]
