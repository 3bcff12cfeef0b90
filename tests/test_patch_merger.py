"""Forward and all four gradients of the fused kernels against a float64 reference.

Every case compares three computations on the same inputs: ours at dtype, the plain-PyTorch
reference at dtype (the baseline), and the reference in float64 (the truth); see tolerance.py.
"""

import pytest
import torch
from test_mask_strides_weights import delta_noise_allowance
from tolerance import assert_close_to_ref

import pm_kernels
from pm_kernels import heuristics, reference
from pm_kernels.backward import patch_merger_backward
from pm_kernels.forward import patch_merger_forward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (lead dims, N, D, M): odd sizes on purpose. D values are not powers of two and not multiples
# of the D tile; N = 1; M > N; M = 1; a 4-D x; no leading dims; every BLOCK_M tier.
SHAPES = [
    pytest.param((2,), 197, 100, 8, id="vit-like-N197-D100"),
    pytest.param((3,), 1, 48, 4, id="N1"),
    pytest.param((2,), 5, 48, 12, id="M>N"),
    pytest.param((1,), 33, 768, 1, id="M1-D768"),
    pytest.param((1,), 20, 1000, 8, id="D1000"),
    pytest.param((2, 3), 17, 40, 6, id="4d-x"),
    pytest.param((), 9, 24, 3, id="2d-x"),
    pytest.param((1,), 700, 64, 8, id="B1-largeN-split"),
    # The larger BLOCK_M tiers (64, 128, 256 = MAX_M), each over several token blocks: the forward
    # without the accumulator tile a step ahead (`heuristics.acc_ahead`), at 128 and 256 without
    # the score sweep's prefetch either, and the interpreter's 16-token tiles.
    pytest.param((2,), 45, 72, 40, id="M40"),
    pytest.param((1,), 37, 50, 100, id="M100"),
    pytest.param((1,), 20, 33, 256, id="M256"),
]


def make_inputs(lead, n, d, m, dtype, param_dtype=None, device="cpu", affine=True):
    param_dtype = param_dtype or dtype
    x = (torch.randn(*lead, n, d, device=device) * 1.5 + 0.3).to(dtype)
    q = (2.0 * torch.randn(m, d, device=device)).to(param_dtype)
    g = (1.0 + 0.2 * torch.randn(d, device=device)).to(param_dtype) if affine else None
    b = (0.2 * torch.randn(d, device=device)).to(param_dtype) if affine else None
    dy = torch.randn(*lead, m, d, device=device).to(dtype)
    return x, q, g, b, dy


def grads_of(fn, dy, *tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def assert_cpp_agrees_with_truth(x, q, g, b, dy, mask=None, scale=None, eps=1e-5):
    """Three-way validation: the float64 truth the kernels are judged against must itself agree
    with the independent C++ reference (plain loops, double accumulation, no shared code) to
    roundoff, so a bug common to the PyTorch reference and the kernels cannot hide."""
    args = [t.double() if t is not None else None for t in (x, q, g, b)]
    y_true, grads_true = grads_of(
        lambda *a: reference.patch_merger(*a, eps=eps, scale=scale, mask=mask), dy.double(), *args)
    y_cpp = reference.cpp_patch_merger(*args, eps=eps, scale=scale, mask=mask)
    grads_cpp = reference.cpp_patch_merger_backward(dy.double(), *args, eps=eps, scale=scale,
                                                    mask=mask)
    for a, t in zip([y_cpp, *grads_cpp], [y_true, *grads_true]):
        if t is None:
            continue
        # Both are float64 sums of the same terms in different orders: 1e-10 of the largest
        # magnitude leaves room for cancellation in gradient entries and nothing more.
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-10 * max(t.abs().max().item(), 1.0))


def check_against_reference(x, q, g, b, dy, ours, mask=None, scale=None, eps=1e-5,
                            cpp_check=False):
    """`ours(x, q, g, b)` -> y; compares y and every gradient with baseline and truth."""
    def ref(dtype_cast):
        def fn(x_, q_, g_, b_):
            return reference.patch_merger(x_, q_, g_, b_, eps=eps, scale=scale, mask=mask)
        args = [t.to(dtype_cast) if (t is not None and dtype_cast is not None) else t
                for t in (x, q, g, b)]
        return grads_of(fn, dy.to(dtype_cast) if dtype_cast else dy, *args)

    y, grads = grads_of(ours, dy, x, q, g, b)
    if cpp_check:
        assert_cpp_agrees_with_truth(x, q, g, b, dy, mask=mask, scale=scale, eps=eps)
    # The fused backward's Delta comes from the stored y (flash-attention's preprocess): the
    # derived allowance for the rounding noise that costs (see test_mask_strides_weights).
    allowance = delta_noise_allowance(x, q, g, b, dy, eps=eps, scale=scale, mask=mask,
                                      y=y.detach())
    y_base, grads_base = ref(None)
    y_true, grads_true = ref(torch.float64)
    assert y.dtype == x.dtype
    assert_close_to_ref("y", y, y_base, y_true)
    for name, gr, gb, gt, t in zip(("dx", "dqueries", "dweight", "dbias"), grads, grads_base,
                                   grads_true, (x, q, g, b)):
        if t is None:
            continue
        assert gr.dtype == t.dtype, f"{name} dtype {gr.dtype} != {t.dtype}"
        assert_close_to_ref(name, gr, gb, gt, extra=allowance.get(name, 0.0), dt=x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,n,d,m", SHAPES)
def test_forward_backward_matches_reference(lead, n, d, m, dtype, device):
    x, q, g, b, dy = make_inputs(lead, n, d, m, dtype, device=device)

    def ours(x_, q_, g_, b_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_, g_, b_)
    check_against_reference(x, q, g, b, dy, ours, cpp_check=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_large_case_three_way(dtype, device):
    # The large case (B=2, N=576, D=1024, M=16) through kernels, PyTorch and C++.
    x, q, g, b, dy = make_inputs((2,), 576, 1024, 16, dtype, device=device)

    def ours(x_, q_, g_, b_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_, g_, b_)
    check_against_reference(x, q, g, b, dy, ours, cpp_check=True)


def test_large_n_uses_split_path(device):
    # The B=1, N=700 case above must really exercise the flash-decoding split.
    cfg = heuristics.forward_config(1, 700, 64, 8, torch.float32, torch.device(device))
    assert cfg.split > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_parameters_with_low_precision_x(dtype, device):
    x, q, g, b, dy = make_inputs((2,), 45, 72, 5, dtype, param_dtype=torch.float32, device=device)

    def ours(x_, q_, g_, b_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_, g_, b_)
    check_against_reference(x, q, g, b, dy, ours)


@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
def test_affine_variants_split_and_custom_scale_eps(affine, device):
    """Every LayerNorm affine variant (HAS_G / HAS_B and the backward's NEED_DG / NEED_DB), with
    the token axis split over programs in both directions (the combine kernel; partial rows)."""
    n = 150
    x, q, g, b, dy = make_inputs((2,), n, 56, 7, torch.float32, device=device)
    g = g if affine in ("weight", "both") else None
    b = b if affine in ("bias", "both") else None
    dev = torch.device(device)
    for pick in (heuristics.forward_config, heuristics.backward_config):
        cfg = pick(2, n, 56, 7, torch.float32, dev)
        assert heuristics.token_split(n, cfg.split, cfg.block_n)[0] > 1, pick

    def ours(x_, q_, g_, b_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_, g_, b_, eps=1e-3, scale=0.37)
    check_against_reference(x, q, g, b, dy, ours, scale=0.37, eps=1e-3)


# Explicit launch configurations that the heuristics would not pick for these small shapes:
# many D tiles with a ragged last one, many token blocks per program, a split that does not
# divide the token blocks (12 asked: 7 programs of two blocks, the last one ragged), and one
# token block per program (the GPU backward's layout at the paper's shapes, where the backward
# kernel writes its partial rows without reading them: `ONE_BLOCK`). With the 200 tokens of
# `test_forced_configs`, (programs, tokens per program) as `heuristics.token_split` gives them:
FORCED = [
    pytest.param(heuristics.Config(16, 16, 16, split=1), (1, 208), id="many-tiles"),
    pytest.param(heuristics.Config(16, 16, 32, split=3), (3, 80), id="split3"),
    pytest.param(heuristics.Config(16, 16, 32, split=12), (7, 32), id="split12-as-7"),
    pytest.param(heuristics.Config(16, 16, 32, split=16), (13, 16), id="split16-one-block-each"),
]


@pytest.mark.parametrize("cfg, grid", FORCED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_forced_configs(cfg, grid, dtype, device):
    n, d, m = 200, 70, 5
    x, q, g, b, dy = make_inputs((2,), n, d, m, dtype, device=device)
    assert heuristics.token_split(n, cfg.split, cfg.block_n) == grid

    def ours(x_, q_, g_, b_):
        return _ForcedConfigFn.apply(x_, q_, g_, b_, cfg)
    check_against_reference(x, q, g, b, dy, ours)


class _ForcedConfigFn(torch.autograd.Function):
    """The launchers with an explicit Config (the public op always asks the heuristics), or
    with a (forward, backward) pair of them."""

    @staticmethod
    def forward(ctx, x, q, g, b, cfg):
        fwd_cfg, ctx.bwd_cfg = cfg if isinstance(cfg, tuple) else (cfg, cfg)
        y, lse, stats, qsum, _ = patch_merger_forward(x, q, g, b, 1e-5, x.shape[-1] ** -0.5,
                                                      config=fwd_cfg, save_stats=True)
        ctx.save_for_backward(x, q, g, b, y, lse, stats, qsum)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, q, g, b, y, lse, stats, qsum = ctx.saved_tensors
        dx, dq, dg, db = patch_merger_backward(dy, x, q, g, b, y, lse, stats, qsum,
                                               x.shape[-1] ** -0.5, config=ctx.bwd_cfg)
        return dx, dq, dg, db, None


def test_backward_with_tiles_other_than_the_forwards(device):
    """On a GPU the forward and the backward use different tiles (64 and 32 D columns at the
    paper's M); the other tests run both with one config. Here they differ in BLOCK_N, BLOCK_D
    and split, so the backward must take everything about the tokens from what the forward
    saved (token statistics, c_s, lse) and nothing from its own tiling."""
    x, q, g, b, dy = make_inputs((2,), 37, 80, 5, torch.float32, device=device)
    x = x + 3.0                                      # a mean away from 0: k and mu matter
    cfgs = (heuristics.Config(16, 32, 64, split=1), heuristics.Config(16, 16, 16, split=2))

    def ours(x_, q_, g_, b_):
        return _ForcedConfigFn.apply(x_, q_, g_, b_, cfgs)
    check_against_reference(x, q, g, b, dy, ours)


@pytest.mark.parametrize("width", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_free_loops_in_their_own_tile_width(width, dtype, device, monkeypatch):
    """On a GPU the loops over D that touch no token (the forward's query operand, the
    backward's delta kernel) take wider steps than the token loops
    (`heuristics.prologue_block_d`); the interpreter keeps them equal. Here they differ both
    ways: narrower, and wider than D (one masked step). The forward's c_s is summed in those
    steps and the backward reads it, so the two must agree with each other too."""
    monkeypatch.setattr(heuristics, "prologue_block_d", lambda d, m, warps, token_bd: width)
    x, q, g, b, dy = make_inputs((2,), 40, 72, 5, dtype, device=device)
    cfg = heuristics.Config(16, 16, 32, split=2)
    out = patch_merger_forward(x, q, g, b, 1e-5, 0.3, config=cfg, save_stats=True)
    qsum = (q.float() * g.float()).to(x.dtype).double().sum(-1)
    torch.testing.assert_close(out.qsum.double(), qsum, rtol=1e-6, atol=1e-6)

    def ours(x_, q_, g_, b_):
        return _ForcedConfigFn.apply(x_, q_, g_, b_, cfg)
    check_against_reference(x, q, g, b, dy, ours)


@pytest.mark.parametrize("cfg", [None, heuristics.Config(16, 16, 32, split=3)],
                         ids=["heuristics", "split3"])
def test_saved_statistics_are_the_layernorm_statistics(cfg, device):
    """What a training forward saves for the backward: per token (k, mu - k, rstd) with k the
    shift (the mean of the first 16 features), and c_s = sum_d op(W g) per query (op: rounded to
    x's dtype, as the dot sees it). Masked tokens are saved too (the backward masks them).
    An inference forward writes neither."""
    x, q, g, b, _ = make_inputs((3,), 45, 72, 5, torch.float16, param_dtype=torch.float32,
                                device=device)
    mask = torch.rand(3, 45, device=device) > 0.3
    out = patch_merger_forward(x, q, g, b, 1e-5, 0.3, mask, config=cfg, save_stats=True)
    k, mean_rel, rstd = out.stats.double().unbind(1)
    xd = x.double()
    assert out.stats.shape == (3, 3, 45) and out.stats.dtype == torch.float32
    torch.testing.assert_close(k, xd[..., :16].mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(k + mean_rel, xd.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(rstd, (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5,
                               atol=0)
    qsum = (q.float() * g.float()).to(x.dtype).double().sum(-1)
    torch.testing.assert_close(out.qsum.double(), qsum, rtol=1e-6, atol=1e-6)
    inference = patch_merger_forward(x, q, g, b, 1e-5, 0.3, mask, config=cfg)
    assert inference.stats is None and inference.qsum is None
    assert torch.equal(inference.y, out.y) and torch.equal(inference.lse, out.lse)


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_float64(with_mask, device):
    x, q, g, b, _ = make_inputs((2,), 11, 19, 5, torch.float64, device=device)
    mask = (torch.rand(2, 11, device=device) > 0.3) if with_mask else None
    if with_mask:
        mask[1, :] = False          # one batch element with every token masked

    def fn(x_, q_, g_, b_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_, g_, b_, mask=mask, scale=0.7)
    args = [t.clone().requires_grad_() for t in (x, q, g, b)]
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_gradcheck_float64_no_affine_4d(device):
    x = torch.randn(2, 2, 7, 13, dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(9, 13, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x_, q_):
        with pm_kernels.use_backend("triton"):
            return pm_kernels.patch_merger(x_, q_)
    assert torch.autograd.gradcheck(fn, (x, q), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(dtype, device):
    """Bitwise-equal gradients from two runs. The interpreter runs programs one after another,
    so on CPU only the source check can fail: the kernels reduce through partial buffers and
    fixed-order sums, never atomics (whose order a GPU schedules differently on every run)."""
    import inspect

    from pm_kernels import backward, common, forward
    for mod in (forward, backward, common):
        assert "atomic_" not in inspect.getsource(mod), mod.__name__
    x, q, g, b, dy = make_inputs((1,), 300, 96, 8, dtype, device=device)

    def run():
        with pm_kernels.use_backend("triton"):
            _, grads = grads_of(lambda *a: pm_kernels.patch_merger(*a), dy, x, q, g, b)
        return grads
    first, second = run(), run()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_float64_agrees_with_reference_to_roundoff(device):
    # A sharp, exact check of the math itself (no low-precision noise to hide behind).
    x, q, g, b, dy = make_inputs((2,), 50, 36, 6, torch.float64, device=device)
    with pm_kernels.use_backend("triton"):
        y, grads = grads_of(lambda *a: pm_kernels.patch_merger(*a), dy, x, q, g, b)
    y_ref, grads_ref = grads_of(lambda *a: reference.patch_merger(*a), dy, x, q, g, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)
