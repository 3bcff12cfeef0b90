"""`pm_kernels.integrations.insert_patch_merger` on real (tiny, randomly initialised) timm
VisionTransformers. Needs timm, hence torchvision: every test is marked `timm` and runs in
`.venv-timm` (scripts/setup_timm_env.sh) with `-m timm`; the main run deselects them.

The fused model (pm_kernels.PatchMerger inserted) is compared with the same model carrying a
plain-PyTorch merger (vit-pytorch's formula, written out below) inserted the same way, under the
rule of tests/tolerance.py: the plain model at float32 is the baseline, in float64 the truth.
"""

import copy

import pytest
import torch
import torch._dynamo
from tolerance import assert_close_to_ref
from torch import nn
from torch._dynamo.utils import counters

import pm_kernels
from pm_kernels.integrations import MergerHandle, insert_patch_merger

pytestmark = pytest.mark.timm

IMG, PATCH, DIM, CLASSES, M = 32, 8, 48, 10, 4          # 16 patch tokens -> 4


class EagerMerger(nn.Module):
    """vit-pytorch's PatchMerger formula in plain PyTorch, with a configurable eps; the same
    parameter names as pm_kernels.PatchMerger (queries, norm.weight, norm.bias)."""

    def __init__(self, dim, num_tokens_out, eps):
        super().__init__()
        self.scale = dim ** -0.5
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.queries = nn.Parameter(torch.randn(num_tokens_out, dim))

    def forward(self, x):
        x = self.norm(x)
        attn = (torch.matmul(self.queries, x.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        return torch.matmul(attn, x)


@pytest.fixture(scope="module")
def timm_vit():
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:      # a failure, not a skip: the timm stage must not pass empty
        pytest.fail(f"timm is not importable ({exc}): these tests run in .venv-timm: "
                    "bash scripts/setup_timm_env.sh && .venv-timm/bin/python -m pytest -m timm")

    def make(device, **kw):
        cfg = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2,
                   num_classes=CLASSES, class_token=True, reg_tokens=1)
        cfg.update(kw)
        vit = VisionTransformer(**cfg).to(device)
        with torch.no_grad():           # non-trivial LayerNorm affines and head
            for mod in vit.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.weight.add_(0.2 * torch.randn_like(mod.weight))
                    mod.bias.add_(0.2 * torch.randn_like(mod.bias))
            nn.init.normal_(vit.head.weight, std=0.2)
        return vit
    return make


def fused_and_eager(make, device, after_block=0, **kw):
    """(fused model, its handle, eager model): the same ViT, the same merger weights."""
    base = make(device, **kw)
    eager = copy.deepcopy(base)
    eps = base.blocks[after_block].norm1.eps
    plain = EagerMerger(DIM, M, eps).to(device)
    with torch.no_grad():
        plain.norm.weight.add_(0.2 * torch.randn_like(plain.norm.weight))
        plain.norm.bias.add_(0.2 * torch.randn_like(plain.norm.bias))
    insert_patch_merger(eager, after_block, M, merger=plain)
    handle = insert_patch_merger(base, after_block, M)
    assert isinstance(handle.merger, pm_kernels.PatchMerger) and handle.merger.eps == eps
    handle.merger.load_state_dict(plain.state_dict())
    return base, handle, eager


def _run(model, x, dy):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(dy)
    grads = {"x": x.grad}
    # (a compiled model names its parameters "_orig_mod.<name>")
    grads.update({n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def check_model(ours, eager, x, dy):
    truth = copy.deepcopy(eager).double()
    out, grads = _run(ours, x, dy)
    out_b, grads_b = _run(eager, x, dy)
    out_t, grads_t = _run(truth, x.double(), dy.double())
    assert_close_to_ref("logits", out, out_b, out_t)
    assert grads.keys() == grads_b.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_close_to_ref(f"grad {name}", grads[name], grads_b[name], grads_t[name])


def _inputs(device, b=3):
    return torch.randn(b, 3, IMG, IMG, device=device), torch.randn(b, CLASSES, device=device)


# (kwargs, prefix tokens): class + register tokens with 'token' pooling; class token with 'avg'
# pooling (fc_norm after the pool); no prefix token at all; 'map' attention pooling.
CONFIGS = [
    pytest.param(dict(), 2, id="cls+reg-token-pool"),
    pytest.param(dict(global_pool="avg", reg_tokens=0), 1, id="cls-avg-pool"),
    pytest.param(dict(global_pool="avg", class_token=False, reg_tokens=0), 0, id="no-prefix-avg"),
    pytest.param(dict(global_pool="map", class_token=False, reg_tokens=2), 2, id="reg-map-pool"),
]


@pytest.mark.parametrize("kw,prefix", CONFIGS)
def test_prefix_tokens_pass_through_and_head_pools_merged_tokens(kw, prefix, timm_vit, device):
    vit = timm_vit(device, **kw).eval()
    assert vit.num_prefix_tokens == prefix
    handle = insert_patch_merger(vit, 0, M)
    x, _ = _inputs(device)
    with torch.no_grad():
        feats = vit.forward_features(x)
        # The same computation written out: block 0, prefix kept, patches merged, block 1.
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        t = vit.blocks[0].forward(t)                    # .forward: no hook
        t = torch.cat([t[:, :prefix], handle.merger(t[:, prefix:])], dim=1)
        expected = vit.norm(vit.blocks[1].forward(t))
        logits = vit(x)
    assert feats.shape == (3, prefix + M, DIM)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    # The head pools as timm defines it, over the new token count.
    pool = vit.global_pool
    if pool == "token":
        pooled = feats[:, 0]
    elif pool == "avg":
        pooled = feats[:, prefix:].mean(1)
    else:
        pooled = vit.attn_pool(feats[:, prefix:])
    with torch.no_grad():
        torch.testing.assert_close(logits, vit.head(vit.fc_norm(pooled)), rtol=0, atol=0)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fused_matches_eager_merger(train, timm_vit, device):
    ours, handle, eager = fused_and_eager(timm_vit, device)
    ours.train(train)
    eager.train(train)
    assert handle.merger.training == train
    x, dy = _inputs(device)
    check_model(ours, eager, x, dy)
    if not train:
        with torch.no_grad():
            torch.testing.assert_close(ours(x), eager(x))


def test_merger_after_last_block_with_avg_pool(timm_vit, device):
    ours, _, eager = fused_and_eager(timm_vit, device, after_block=-1, global_pool="avg")
    assert "1" in ours.patch_mergers
    check_model(ours, eager, *_inputs(device))


def test_one_optimizer_step(timm_vit, device):
    ours, handle, eager = fused_and_eager(timm_vit, device)
    # SGD, not Adam, for the comparison: Adam's first step is lr * sign(grad), which turns the
    # rounding noise of gradients that are 0 in exact math (the key bias: softmax is invariant
    # to it) into full-size differences.
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)   # built after inserting
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    assert any(p is handle.merger.queries for g in opt_ours.param_groups for p in g["params"])
    x, dy = _inputs(device)
    before = handle.merger.queries.detach().clone()
    for model, opt in ((ours, opt_ours), (eager, opt_eager)):
        _run(model, x, dy)
        opt.step()
    assert not torch.equal(handle.merger.queries, before)
    for (name, p), (name_e, q) in zip(ours.named_parameters(), eager.named_parameters()):
        assert name == name_e
        torch.testing.assert_close(p, q, msg=f"{name} after one SGD step")


def test_state_dict_round_trip(timm_vit, device):
    ours, handle, eager = fused_and_eager(timm_vit, device)
    plain_keys = set(timm_vit(device).state_dict())
    merger_keys = {"patch_mergers.0.queries", "patch_mergers.0.norm.weight",
                   "patch_mergers.0.norm.bias"}
    assert set(ours.state_dict()) == plain_keys | merger_keys
    assert ours.state_dict().keys() == eager.state_dict().keys()

    # A timm checkpoint (no merger) loads into the merged model; only the merger keys are new.
    plain = timm_vit(device)
    result = ours.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == merger_keys and not result.unexpected_keys
    assert torch.equal(ours.cls_token, plain.cls_token)

    # Merged model -> fresh merged model (strict) -> identical outputs.
    ours.load_state_dict(eager.state_dict())
    fresh = timm_vit(device)
    insert_patch_merger(fresh, 0, M)
    fresh.load_state_dict(ours.state_dict())
    x, dy = _inputs(device)
    with torch.no_grad():
        assert torch.equal(fresh(x), ours(x))
    check_model(fresh, eager, x, dy)


def test_remove_restores_the_original_model(timm_vit, device):
    vit = timm_vit(device)
    keys = list(vit.state_dict())
    x, _ = _inputs(device)
    with torch.no_grad():
        y0 = vit(x)
    handle = insert_patch_merger(vit, 1, M)
    with torch.no_grad():
        assert vit.forward_features(x).shape == (3, vit.num_prefix_tokens + M, DIM)
    handle.remove()
    handle.remove()                                   # idempotent
    assert handle.removed and not hasattr(vit, "patch_mergers")
    assert all(len(b._forward_hooks) == 0 for b in vit.blocks)
    assert list(vit.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(vit(x), y0)

    # Two mergers after different blocks, removed in insertion order; and the context manager.
    with insert_patch_merger(vit, 0, 8) as first:
        assert isinstance(first, MergerHandle)
        second = insert_patch_merger(vit, 1, 3)
        with torch.no_grad():
            assert vit.forward_features(x).shape == (3, vit.num_prefix_tokens + 3, DIM)
        first.remove()
        assert list(vit.patch_mergers) == ["1"]
        with torch.no_grad():
            assert vit.forward_features(x).shape == (3, vit.num_prefix_tokens + 3, DIM)
    second.remove()
    with torch.no_grad():
        assert torch.equal(vit(x), y0)


def test_deepcopy_carries_its_own_merger(timm_vit, device):
    vit = timm_vit(device).eval()
    handle = insert_patch_merger(vit, 0, M)
    twin = copy.deepcopy(vit)
    x, _ = _inputs(device)
    with torch.no_grad():
        y = vit(x)
        assert torch.equal(twin(x), y)
        twin.patch_mergers["0"].queries.mul_(-3.0)      # the copy's hook uses the copy's merger
        assert not torch.allclose(twin(x), y)
        assert torch.equal(vit(x), y)
    handle.remove()                                      # the handle acts on the original only
    assert hasattr(twin, "patch_mergers") and len(twin.blocks[0]._forward_hooks) == 1


def test_grad_checkpointing(timm_vit, device):
    ours, _, _ = fused_and_eager(timm_vit, device)
    x, dy = _inputs(device)
    out, grads = _run(ours, x, dy)
    ours.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _run(ours, x, dy)
    torch.testing.assert_close(out_ckpt, out)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_compile_fullgraph(timm_vit, device):
    ours, _, _ = fused_and_eager(timm_vit, device)
    x, dy = _inputs(device, b=2)
    out, grads = _run(ours, x, dy)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    out_c, grads_c = _run(compiled, x, dy)
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(out_c, out)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], msg=name)


def test_argument_errors(timm_vit, device):
    vit = timm_vit(device)
    with pytest.raises(IndexError):
        insert_patch_merger(vit, 2, M)
    with pytest.raises(ValueError, match="num_tokens"):
        insert_patch_merger(vit, 0, 0)
    handle = insert_patch_merger(vit, -2, M)
    assert handle.block_index == 0
    with pytest.raises(ValueError, match="already"):
        insert_patch_merger(vit, 0, M)
    with pytest.raises(TypeError, match="VisionTransformer"):
        insert_patch_merger(nn.Linear(3, 3), 0, M)
