"""torch.library registration, torch.compile and torch.autocast.

* `torch.library.opcheck` on `pm_kernels::fwd` (with and without LayerNorm weights, with a mask,
  return_weights True / False) and `pm_kernels::bwd`: schema, fake (meta) kernels, autograd
  registration, and AOT dispatch with dynamic shapes.
* `torch.compile(fullgraph=True)` of a model holding `pm_kernels.PatchMerger` on the eager,
  aot_eager and inductor backends: forward and backward trace with zero graph breaks, the custom
  ops appear as single nodes of the forward and backward graphs, and the compiled model computes
  what the eager one does.
* `torch.autocast` (bf16, fp16): the op runs in the autocast dtype and returns it, gradients flow
  back to fp32 parameters, and the result meets the tolerance rule (tests/tolerance.py) against
  the reference computed at the autocast dtype.

Shapes are tiny on purpose: the kernels run in Triton's interpreter on CPU, and inductor compiles
C++ for every graph.
"""

import pytest
import torch
import torch._dynamo
from tolerance import assert_close_to_ref
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

import pm_kernels
from pm_kernels import reference

FWD = torch.ops.pm_kernels.fwd.default
BWD = torch.ops.pm_kernels.bwd.default


def _tensors(device, b=2, n=7, d=16, m=3, dtype=torch.float32, param_dtype=None):
    param_dtype = param_dtype or dtype
    x = torch.randn(b, n, d, device=device).to(dtype)
    q = torch.randn(m, d, device=device).to(param_dtype)
    g = (1 + 0.2 * torch.randn(d, device=device)).to(param_dtype)
    bias = (0.2 * torch.randn(d, device=device)).to(param_dtype)
    mask = torch.rand(b, n, device=device) > 0.3
    mask[1] = False                      # one batch element with every token dropped
    return x, q, g, bias, mask


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("return_weights", [False, True], ids=["y", "y+p"])
def test_opcheck_fwd(affine, with_mask, return_weights, device):
    x, q, g, b, mask = _tensors(device)
    g = g if affine != "none" else None
    b = b if affine == "weight+bias" else None
    mask = mask if with_mask else None
    # Training: the statistics for the backward are saved (opcheck runs the backward too).
    args = (x.clone().requires_grad_(), q.clone().requires_grad_(),
            g.clone().requires_grad_() if g is not None else None,
            b.clone().requires_grad_() if b is not None else None,
            mask, 1e-5, 0.3, return_weights, True)
    torch.library.opcheck(FWD, args)          # raises on any failure
    # Inference: nothing saved (`ops._forward_op` asks for statistics exactly when autograd
    # will run a backward).
    torch.library.opcheck(FWD, (x, q, g, b, mask, 1e-5, 0.3, return_weights, False))


def test_backward_without_saved_statistics_is_a_clear_error(device):
    x, q, g, b, mask = _tensors(device)
    leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
    y = FWD(*leaves, mask, 1e-5, 0.3, False, False)[0]       # save_stats=False, yet a backward
    with pytest.raises(ValueError, match="save_stats=True"):
        y.backward(torch.randn_like(y))


def test_opcheck_fwd_mixed_precision(device):
    # bf16 tokens with fp32 "master" parameters: the autocast / mixed-precision combination.
    x, q, g, b, mask = _tensors(device, dtype=torch.bfloat16, param_dtype=torch.float32)
    torch.library.opcheck(FWD, (x.requires_grad_(), q.requires_grad_(), g.requires_grad_(),
                                b.requires_grad_(), mask, 1e-5, 0.25, True, True))


@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_opcheck_bwd(affine, with_mask, device):
    x, q, g, b, mask = _tensors(device)
    g, b = (g, b) if affine else (None, None)
    mask = mask if with_mask else None
    y, lse, stats, qsum, _ = FWD(x, q, g, b, mask, 1e-5, 0.3, False, True)
    dy = torch.randn_like(y)
    torch.library.opcheck(BWD, (dy, x, q, g, b, mask, y, lse, stats, qsum, 0.3))
    # Only some gradients asked for (a frozen x, frozen LayerNorm parameters).
    torch.library.opcheck(BWD, (dy, x, q, g, b, mask, y, lse, stats, qsum, 0.3, False, True,
                                False, True))


# ----------------------------------------------------------------------------------------------
# The eager path (`ops._EagerFn`, which skips the custom op's dispatch) and tracing
# ----------------------------------------------------------------------------------------------

def test_eager_path_matches_custom_op(device):
    """Eager calls run through `_EagerFn`, not the custom op: the same outputs and gradients,
    bit for bit (the same launchers with the same arguments)."""
    x, q, g, b, mask = _tensors(device)
    dy = torch.randn(x.shape[0], q.shape[0], x.shape[-1], device=device)
    results = []
    for via_op in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, q, g, b)]
        if via_op:
            y = FWD(*leaves, mask, 1e-5, 0.3, False, True)[0]
        else:
            y = pm_kernels.patch_merger(*leaves, mask=mask, scale=0.3)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


@pytest.mark.parametrize("via_op", [False, True], ids=["eager", "custom-op"])
@pytest.mark.parametrize("trainable", [("x",), ("queries",), ("weight", "bias"), ("x", "bias"),
                                       ("queries", "weight"), ("bias",)], ids="+".join)
def test_only_needed_gradients_are_computed(trainable, via_op, device):
    """Autograd's needs_input_grad reaches the kernel: a frozen x (features from a frozen
    backbone) skips the N x D dx write, frozen parameters skip their partial rows. What is
    computed is bitwise what a run with every gradient computes; frozen inputs get no .grad.
    A bias alone needs no token kernel at all (its gradient is summed from dy)."""
    from pm_kernels.backward import patch_merger_backward
    names = ("x", "queries", "weight", "bias")
    x, q, g, b, mask = _tensors(device)
    dy = torch.randn(x.shape[0], q.shape[0], x.shape[-1], device=device)

    def run(needed):
        leaves = [t.clone().requires_grad_(name in needed) for name, t in zip(names, (x, q, g, b))]
        y = (FWD(*leaves, mask, 1e-5, 0.3, False, True)[0] if via_op
             else pm_kernels.patch_merger(*leaves, mask=mask, scale=0.3))
        y.backward(dy)
        return [t.grad for t in leaves]

    full, part = run(names), run(trainable)
    for name, f, p in zip(names, full, part):
        if name in trainable:
            assert torch.equal(f, p), name
        else:
            assert p is None, name
    # The launcher itself returns None for what it was not asked for.
    y, lse, stats, qsum, _ = FWD(x, q, g, b, mask, 1e-5, 0.3, False, True)
    needs = tuple(name in trainable for name in names)
    grads = patch_merger_backward(dy, x, q, g, b, y, lse, stats, qsum, 0.3, mask, needs=needs)
    assert [t is not None for t in grads] == list(needs)


@pytest.mark.parametrize("loss", ["square", "linear"])
def test_double_backward_raises_instead_of_dropping_the_graph(loss, device):
    """The Triton backward is not differentiable. Asking for a gradient of a gradient must fail
    loudly: a gradient without a graph would silently drop e.g. a gradient penalty. Also when
    the loss is linear in y (dy then does not require grad: `once_differentiable`, used here
    before, let that case through with a graph-less gradient)."""
    x, q, g, b, _ = _tensors(device)
    x.requires_grad_()
    y = pm_kernels.patch_merger(x, q, g, b)
    out = y.square().sum() if loss == "square" else (y * torch.randn_like(y)).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_fake_tensor_mode_and_make_fx_reach_the_custom_op(device):
    """Tracing (FakeTensorMode, make_fx, export) must take the custom op, whose fake kernel
    gives the output shapes; the eager bypass would hand fake tensors to a kernel launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, q, g, b, mask = _tensors(device)
    with FakeTensorMode() as mode:
        fx, fq, fg, fb = (mode.from_tensor(t) for t in (x, q, g, b))
        y = pm_kernels.patch_merger(fx.requires_grad_(), fq, fg, fb)
        assert tuple(y.shape) == (x.shape[0], q.shape[0], x.shape[-1])

    def fn(x, q, g, b, mask):
        return pm_kernels.patch_merger(x, q, g, b, mask=mask)

    for tracing_mode in ("fake", "real"):
        gm = make_fx(fn, tracing_mode=tracing_mode)(x, q, g, b, mask)
        assert FWD in _targets([gm]), tracing_mode
    torch.testing.assert_close(gm(x, q, g, b, mask), fn(x, q, g, b, mask), rtol=0, atol=0)


def test_float64_routing_rule():
    """Which calls the fp64 rule sends to the reference: CUDA, float64, M > FP64_MAX_M only."""
    from pm_kernels.heuristics import FP64_MAX_M
    from pm_kernels.ops import _fp64_beyond_kernels
    assert _fp64_beyond_kernels(torch.float64, "cuda", FP64_MAX_M + 1)
    assert not _fp64_beyond_kernels(torch.float64, "cuda", FP64_MAX_M)
    assert not _fp64_beyond_kernels(torch.float64, "cpu", 256)       # the interpreter: no limit
    assert not _fp64_beyond_kernels(torch.float32, "cuda", 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the rule on a CUDA device")
def test_float64_large_m_runs_the_reference_on_cuda():
    """fp64 CUDA inputs with M > FP64_MAX_M take the reference (heuristics.FP64_MAX_M: the fp64
    register products would not fit shared memory on every GPU); the result is still right."""
    from pm_kernels.heuristics import FP64_MAX_M
    x, q, g, b, _ = _tensors("cuda", m=FP64_MAX_M + 1, dtype=torch.float64)
    with pm_kernels.use_backend("reference"):
        expected = pm_kernels.patch_merger(x, q, g, b)
    torch.testing.assert_close(pm_kernels.patch_merger(x, q, g, b), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

class _TinyModel(torch.nn.Module):
    """Linear -> fused PatchMerger -> Linear: the merger between ordinary ops, as in a ViT."""

    def __init__(self, d=16, m=3):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.merger = pm_kernels.PatchMerger(d, m)
        self.head = torch.nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.merger(self.proj(x)).mean(-2))


def _run(model, x):
    """Forward + backward; returns the output and every gradient (x's first)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()]


def _recording_backend(graphs):
    """An aot_autograd backend that keeps the forward and backward FX graphs it is given."""
    def fw(gm, _inputs):
        graphs["fw"].append(gm)
        return make_boxed_func(gm.forward)

    def bw(gm, _inputs):
        graphs["bw"].append(gm)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=fw, bw_compiler=bw)


def _targets(gms):
    return {node.target for gm in gms for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_no_graph_break(backend, device):
    model = _TinyModel().to(device)
    x = torch.randn(2, 9, 16, device=device)
    out_ref, grads_ref = _run(model, x)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, grads = _run(compiled, x)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    # The compiled model computes what the eager one does (the fused op is the same kernel; only
    # the surrounding Linear layers may be reassociated by inductor).
    torch.testing.assert_close(out, out_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic-dynamic"])
def test_compile_dynamic_shapes_fullgraph(dynamic, device):
    """Symbolic shapes through validation and the op (math.isfinite on eps broke the graph
    under dynamic=True, an error with fullgraph=True), for several token counts."""
    model = _TinyModel().to(device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for n in (9, 13, 4):
        x = torch.randn(2, n, 16, device=device)
        out_ref, grads_ref = _run(model, x)
        out, grads = _run(compiled, x)
        torch.testing.assert_close(out, out_ref)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])


def test_explain_reports_no_graph_break(device):
    torch._dynamo.reset()
    model = _TinyModel().to(device)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 9, 16, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_custom_ops_are_single_nodes_forward_and_backward(device):
    graphs = {"fw": [], "bw": []}
    torch._dynamo.reset()
    compiled = torch.compile(_TinyModel().to(device), backend=_recording_backend(graphs),
                             fullgraph=True)
    _run(compiled, torch.randn(2, 9, 16, device=device))
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    fw_targets, bw_targets = _targets(graphs["fw"]), _targets(graphs["bw"])
    assert FWD in fw_targets and BWD not in fw_targets
    assert BWD in bw_targets and FWD not in bw_targets   # the backward does not re-run forward


def test_compile_functional_with_mask_and_weights(device):
    x, q, g, b, mask = _tensors(device)

    def fn(x_, q_, g_, b_):
        y, p = pm_kernels.patch_merger(x_, q_, g_, b_, mask=mask, scale=0.3, return_weights=True)
        return y, p

    torch._dynamo.reset()
    counters.clear()
    y, p = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, q, g, b)
    assert dict(counters["graph_break"]) == {}
    y_ref, p_ref = reference.patch_merger(x, q, g, b, mask=mask, scale=0.3, return_weights=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(p, p_ref)
    assert (p[~mask.unsqueeze(1).expand_as(p)] == 0).all()


def test_compile_under_autocast(device):
    model = _TinyModel().to(device)
    x = torch.randn(2, 9, 16, device=device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        merged = compiled.merger(compiled.proj(x))
        out = compiled(x)
    assert merged.dtype == torch.bfloat16
    out.float().sum().backward()
    assert dict(counters["graph_break"]) == {}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# torch.autocast
# ----------------------------------------------------------------------------------------------

def _grads(fn, dy, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_module(dtype, backend, device):
    """Under autocast the op computes in the autocast dtype and returns it; fp32 parameters
    and fp32 x receive fp32 gradients that meet the rule against the reference at that dtype."""
    d, m = 40, 5
    merger = pm_kernels.PatchMerger(d, m).to(device)
    with torch.no_grad():
        merger.norm.weight.add_(0.2 * torch.randn(d, device=device))
        merger.norm.bias.add_(0.2 * torch.randn(d, device=device))
    x = torch.randn(2, 23, d, device=device) * 1.5 + 0.3
    dy = torch.randn(2, m, d, device=device).to(dtype)
    params = [merger.queries, merger.norm.weight, merger.norm.bias]

    x_leaf = x.clone().requires_grad_()
    with pm_kernels.use_backend(backend), torch.autocast(device, dtype=dtype):
        y = merger(x_leaf)
    assert y.dtype == dtype
    y.backward(dy)
    assert x_leaf.grad.dtype == torch.float32
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    ours = [x_leaf.grad] + [p.grad for p in params]

    # Baseline: the plain-PyTorch math at the autocast dtype (the reference casts the parameters
    # to x's dtype); truth: the same in float64, on the x the op actually saw (rounded to dtype).
    def ref(x_, q_, g_, b_):
        return reference.patch_merger(x_, q_, g_, b_, eps=merger.eps, scale=merger.scale)
    leaves = [x.to(dtype)] + [p.detach() for p in params]
    y_base, grads_base = _grads(ref, dy, *leaves)
    y_true, grads_true = _grads(ref, dy.double(), *[t.double() for t in leaves])
    assert_close_to_ref("y", y, y_base, y_true)
    # Gradients are compared at the autocast dtype: that is the precision they were computed at
    # (the fp32 copies add no information), and the rule's half-ulp allowance is that dtype's.
    for name, g, gb, gt in zip(("dx", "dqueries", "dweight", "dbias"), ours, grads_base,
                               grads_true):
        assert_close_to_ref(name, g.to(dtype), gb.to(dtype), gt)


def test_autocast_keeps_float64_and_casts_other_half_type(device):
    x, q, g, b, _ = _tensors(device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        y64 = pm_kernels.patch_merger(x, q, g, b)
    # float64 is not autocast-eligible: it runs, exactly, in float64.
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, reference.patch_merger(x, q, g, b), rtol=1e-12, atol=1e-12)

    # fp16 parameters under a bf16 autocast are cast to bf16 (the kernels take x's dtype or fp32).
    x, q, g, b, _ = _tensors(device, dtype=torch.float32, param_dtype=torch.float16)
    q.requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = pm_kernels.patch_merger(x, q, g, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert q.grad.dtype == torch.float16


def test_autocast_disabled_region_keeps_input_dtype(device):
    merger = pm_kernels.PatchMerger(16, 3).to(device)
    x = torch.randn(2, 7, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        with torch.autocast(device, enabled=False):
            assert merger(x).dtype == torch.float32
        assert merger(x).dtype == torch.bfloat16
