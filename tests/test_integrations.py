"""`pm_kernels.integrations.replace_patch_mergers`: vit-pytorch models with the fused merger.

Two groups:
* Unmarked tests (main venv) run on `PatchMerger` below, the vit-pytorch PatchMerger written out (same attributes and formula):
  the swap's bookkeeping (containers, shared modules, parameter identity, optimizers, state
  dicts, modes, scale / eps / affine variants) and its numerics.
* `@pytest.mark.timm` tests run the real `vit_pytorch.vit_with_patch_merger.ViT`. vit-pytorch
  cannot be imported in the main venv: its `__init__` imports its DINO module, which imports
  torchvision, and PyPI's torchvision does not load beside the local torch 2.13 CPU build. They
  run in `.venv-timm` (scripts/setup_timm_env.sh), with `-m timm`.

Model-level numerics follow tests/tolerance.py: ours (the swapped model) at dtype, the eager
model at dtype as the baseline, the eager model in float64 as the truth.
"""

import copy

import pytest
import torch
from tolerance import assert_close_to_ref
from torch import nn

import pm_kernels
from pm_kernels.integrations import convert_patch_merger, replace_patch_mergers


class PatchMerger(nn.Module):
    """The PatchMerger of vit-pytorch (vit_pytorch/vit_with_patch_merger.py), written out: the
    attributes (`norm`, `queries`, `scale`) and the formula the swap must reproduce."""

    def __init__(self, dim, num_tokens_out):
        super().__init__()
        self.scale = dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(num_tokens_out, dim))

    def forward(self, x):
        x = self.norm(x)
        sim = torch.matmul(self.queries, x.transpose(-1, -2)) * self.scale
        attn = sim.softmax(dim=-1)
        return torch.matmul(attn, x)


class _NotAMerger(nn.Module):
    """Named like one (Swin, Qwen, ... have "PatchMerger"s), but no learned queries."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim)
        self.scale = 1.0


_NotAMerger.__name__ = _NotAMerger.__qualname__ = "PatchMerger"


class _TinyEncoder(nn.Module):
    """Linear -> merger -> MLP -> head, with mergers nested in several kinds of container."""

    def __init__(self, d=24, m=4, classes=5):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.stages = nn.ModuleList([nn.Sequential(nn.GELU(), PatchMerger(d, m))])
        self.extra = nn.ModuleDict({"merge2": PatchMerger(d, 2)})
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU())
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stages[0](self.embed(x))
        x = self.extra["merge2"](x + self.mlp(x))
        return self.head(x.mean(-2))


def _randomise(model):
    """Move LayerNorm affines away from (1, 0) so that the swap really carries them."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
                mod.weight.add_(0.2 * torch.randn_like(mod.weight))
                if mod.bias is not None:
                    mod.bias.add_(0.2 * torch.randn_like(mod.bias))
    return model


def _run(model, x, dy):
    """Forward + backward with a fixed output gradient; returns the output, dx and every
    parameter's gradient by name."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(dy.to(out.dtype))
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def check_model(ours, eager, x, dy):
    """ours vs eager at x's dtype, both against the eager model in float64 (the rule)."""
    truth = copy.deepcopy(eager).double()
    out, grads = _run(ours, x, dy)
    out_b, grads_b = _run(eager, x, dy)
    out_t, grads_t = _run(truth, x.double(), dy.double())
    assert_close_to_ref("output", out, out_b, out_t)
    assert grads.keys() == grads_b.keys() == grads_t.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close_to_ref(f"grad {name}", grads[name], grads_b[name], grads_t[name])
    return out


def _fused_modules(model):
    return [m for m in model.modules() if isinstance(m, pm_kernels.PatchMerger)]


# ----------------------------------------------------------------------------------------------
# Bookkeeping of the swap (the written-out vit-pytorch PatchMerger; main venv)
# ----------------------------------------------------------------------------------------------

def test_swaps_nested_mergers_and_keeps_parameter_objects(device):
    model = _randomise(_TinyEncoder()).to(device)
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    old = model.stages[0][1]

    assert replace_patch_mergers(model) == 2
    assert isinstance(model.stages[0][1], pm_kernels.PatchMerger)
    assert isinstance(model.extra["merge2"], pm_kernels.PatchMerger)
    assert not any(type(m) is PatchMerger for m in model.modules())
    new = model.stages[0][1]
    assert new.queries is old.queries and new.norm is old.norm
    assert new.norm.weight is old.norm.weight and new.norm.bias is old.norm.bias
    # Same parameters, same order, same names, same values, same state-dict keys.
    params_after = dict(model.named_parameters())
    assert list(params_after) == list(params_before)
    assert all(params_after[k] is params_before[k] for k in params_before)
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    # Nothing left to swap: the function is idempotent.
    assert replace_patch_mergers(model) == 0


def test_carries_scale_eps_mode_and_affine_variants(device):
    old = PatchMerger(16, 3)
    old.scale = 0.37
    old.norm = nn.LayerNorm(16, eps=1e-3, bias=False)
    old.eval()
    new = convert_patch_merger(old.to(device))
    assert (new.scale, new.eps, new.training) == (0.37, 1e-3, False)
    assert new.norm.bias is None and new.queries.device.type == torch.device(device).type
    x = torch.randn(2, 9, 16, device=device)
    dy = torch.randn(2, 3, 16, device=device)
    check_model(new, old, x, dy)

    no_affine = PatchMerger(16, 3)
    no_affine.norm = nn.LayerNorm(16, elementwise_affine=False)
    new = convert_patch_merger(no_affine.to(device))
    assert new.norm.weight is None and new.norm.bias is None
    check_model(new, no_affine, x, dy)


def test_shared_module_is_swapped_once_everywhere():
    shared = PatchMerger(8, 2)
    model = nn.Sequential(shared, nn.Identity(), shared)
    assert replace_patch_mergers(model) == 1
    assert model[0] is model[2] and isinstance(model[0], pm_kernels.PatchMerger)


def test_leaves_other_modules_alone_and_rejects_a_bare_merger():
    model = nn.Sequential(_NotAMerger(8), pm_kernels.PatchMerger(8, 2))
    before = list(model)
    assert replace_patch_mergers(model) == 0
    assert list(model) == before
    with pytest.raises(ValueError, match="convert_patch_merger"):
        replace_patch_mergers(PatchMerger(8, 2))
    with pytest.raises(TypeError, match="not a vit-pytorch PatchMerger"):
        convert_patch_merger(_NotAMerger(8))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_swapped_model_matches_eager(train, device):
    eager = _randomise(_TinyEncoder()).to(device).train(train)
    ours = copy.deepcopy(eager)
    assert replace_patch_mergers(ours) == 2
    assert all(m.training == train for m in _fused_modules(ours))
    x = torch.randn(3, 19, 6, device=device)
    check_model(ours, eager, x, torch.randn(3, 5, device=device))


def test_optimizer_built_before_the_swap_trains_the_live_weights(device):
    eager = _randomise(_TinyEncoder()).to(device)
    ours = copy.deepcopy(eager)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)      # built *before* the swap
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.5)
    assert replace_patch_mergers(ours) == 2
    x, dy = torch.randn(3, 19, 6, device=device), torch.randn(3, 5, device=device)
    queries_before = ours.stages[0][1].queries.detach().clone()
    for model, opt in ((ours, opt_ours), (eager, opt_eager)):
        _run(model, x, dy)
        opt.step()
    assert not torch.equal(ours.stages[0][1].queries, queries_before)
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, msg=f"{name} after one step")


def test_state_dict_round_trips(device):
    eager = _randomise(_TinyEncoder()).to(device)
    ours = _TinyEncoder().to(device)
    replace_patch_mergers(ours)
    ours.load_state_dict(eager.state_dict())             # strict: same keys
    back = _TinyEncoder().to(device)
    back.load_state_dict(ours.state_dict())
    for k, v in eager.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(ours.state_dict()[k], v)
    x, dy = torch.randn(2, 11, 6, device=device), torch.randn(2, 5, device=device)
    check_model(ours, eager, x, dy)


# ----------------------------------------------------------------------------------------------
# The real vit-pytorch ViT (.venv-timm: vit-pytorch needs torchvision)
# ----------------------------------------------------------------------------------------------

def _vit_pytorch(device, merge_layer=1, **kw):
    try:
        from vit_pytorch.vit_with_patch_merger import ViT
    except ImportError as exc:      # a failure, not a skip: the timm stage must not pass empty
        pytest.fail(f"vit-pytorch is not importable ({exc}): these tests run in .venv-timm: "
                    "bash scripts/setup_timm_env.sh && .venv-timm/bin/python -m pytest -m timm")

    cfg = dict(image_size=32, patch_size=8, num_classes=10, dim=48, depth=2, heads=2,
               mlp_dim=96, dim_head=24, patch_merge_layer=merge_layer, patch_merge_num_tokens=4)
    cfg.update(kw)
    return _randomise(ViT(**cfg)).to(device)


@pytest.mark.timm
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_vit_pytorch_swapped_matches_eager(train, device):
    eager = _vit_pytorch(device).train(train)
    ours = copy.deepcopy(eager)
    assert replace_patch_mergers(ours) == 1
    assert isinstance(ours.transformer.patch_merger, pm_kernels.PatchMerger)
    assert ours.transformer.patch_merger.training == train
    x = torch.randn(3, 3, 32, 32, device=device)
    check_model(ours, eager, x, torch.randn(3, 10, device=device))
    if not train:
        with torch.no_grad():
            y_ours, y_eager = ours(x), eager(x)
        torch.testing.assert_close(y_ours, y_eager)


@pytest.mark.timm
def test_vit_pytorch_optimizer_step_and_state_dict(device):
    eager = _vit_pytorch(device)
    ours = copy.deepcopy(eager)
    # SGD for the comparison: Adam's first step is lr * sign(grad), which would turn rounding
    # noise in gradients that are ~0 into full-size differences.
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)   # built before the swap
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    assert replace_patch_mergers(ours) == 1
    x, dy = torch.randn(2, 3, 32, 32, device=device), torch.randn(2, 10, device=device)
    before = ours.transformer.patch_merger.queries.detach().clone()
    for model, opt in ((ours, opt_ours), (eager, opt_eager)):
        _run(model, x, dy)
        opt.step()
    assert not torch.equal(ours.transformer.patch_merger.queries, before)
    for (name, p), q in zip(ours.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, msg=f"{name} after one SGD step")

    # vit-pytorch state dict -> swapped model -> vit-pytorch model, strict both ways.
    fresh = _vit_pytorch(device)
    assert replace_patch_mergers(fresh) == 1
    fresh.load_state_dict(eager.state_dict())
    back = _vit_pytorch(device)
    back.load_state_dict(fresh.state_dict())
    assert fresh.state_dict().keys() == eager.state_dict().keys() == back.state_dict().keys()
    for k, v in eager.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    check_model(fresh, back, x, dy)


class _Autocast(nn.Module):
    def __init__(self, model, enabled=True):
        super().__init__()
        self.model, self.enabled = model, enabled

    def forward(self, img):
        with torch.autocast(img.device.type, dtype=torch.bfloat16, enabled=self.enabled):
            return self.model(img)


@pytest.mark.timm
def test_vit_pytorch_autocast_bf16(device):
    """Whole model under a bf16 autocast: the merger returns bf16, fp32 parameters get fp32
    gradients, and output and gradients meet the rule at bf16 against the eager model under the
    same autocast (baseline) and the eager model in float64 (truth)."""
    eager = _vit_pytorch(device)
    ours = copy.deepcopy(eager)
    replace_patch_mergers(ours)
    x, dy = torch.randn(3, 3, 32, 32, device=device), torch.randn(3, 10, device=device)
    seen = []
    hook = ours.transformer.patch_merger.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype))

    out, grads = _run(_Autocast(ours), x, dy)
    hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    out_b, grads_b = _run(_Autocast(eager), x, dy)
    out_t, grads_t = _run(_Autocast(copy.deepcopy(eager).double(), enabled=False), x.double(),
                          dy.double())
    assert_close_to_ref("output", out, out_b, out_t)
    for name, g in grads.items():
        assert g is not None and g.dtype == torch.float32, name
        assert_close_to_ref(f"grad {name}", g.to(torch.bfloat16), grads_b[name].to(torch.bfloat16),
                            grads_t[name])
