"""Putting the fused merger into existing models: vit-pytorch and timm.

* `replace_patch_mergers(model)` swaps every vit-pytorch `PatchMerger` inside `model` for
  `pm_kernels.PatchMerger`, in place, keeping the very same Parameter objects.
* `insert_patch_merger(vit, after_block, num_tokens)` adds a merger to a timm
  `VisionTransformer` after one of its blocks, reversibly (it returns a handle with `.remove()`).

Neither vit-pytorch nor timm is imported here (nor needed): modules are recognised by their
structure, so both packages stay optional.

Both functions change the module tree: call them before `torch.compile`, `DistributedDataParallel`
or FSDP wrap the model (a compiled or wrapped model keeps running the graph it traced).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from .heuristics import MAX_M
from .module import PatchMerger

__all__ = ["replace_patch_mergers", "convert_patch_merger", "insert_patch_merger",
           "MergerHandle"]


# ----------------------------------------------------------------------------------------------
# vit-pytorch
# ----------------------------------------------------------------------------------------------

def _is_vit_pytorch_merger(module: nn.Module) -> bool:
    """vit-pytorch's PatchMerger (vit_pytorch/vit_with_patch_merger.py), by structure:

        class PatchMerger(nn.Module):
            def __init__(self, dim, num_tokens_out):
                self.scale = dim ** -0.5
                self.norm = nn.LayerNorm(dim)
                self.queries = nn.Parameter(torch.randn(num_tokens_out, dim))

    The class name *and* the three attributes must match, so unrelated modules that happen to be
    called PatchMerger (Swin's or Qwen's spatial mergers: no `queries`) are left alone."""
    if type(module).__name__ != "PatchMerger" or isinstance(module, PatchMerger):
        return False
    norm = getattr(module, "norm", None)
    queries = getattr(module, "queries", None)
    scale = getattr(module, "scale", None)
    return (isinstance(norm, nn.LayerNorm) and isinstance(queries, nn.Parameter)
            and queries.dim() == 2 and tuple(norm.normalized_shape) == (queries.shape[1],)
            and isinstance(scale, numbers.Real) and math.isfinite(scale))


def convert_patch_merger(module: nn.Module) -> PatchMerger:
    """A `pm_kernels.PatchMerger` computing what the vit-pytorch PatchMerger `module` computes.

    It holds the same `norm` (LayerNorm module, with its eps) and the same `queries` Parameter
    object, and copies `scale` and the train/eval flag: no tensor is copied or re-allocated, so
    device and dtype are the module's. Hooks registered on `module` are not carried over.
    """
    if not _is_vit_pytorch_merger(module):
        raise TypeError(f"{type(module).__qualname__} is not a vit-pytorch PatchMerger "
                        "(class PatchMerger with a LayerNorm `norm`, an (M, D) Parameter "
                        "`queries` and a float `scale`)")
    m, d = module.queries.shape
    norm = module.norm
    new = PatchMerger(d, m, eps=norm.eps, scale=float(module.scale),
                      elementwise_affine=norm.weight is not None, bias=norm.bias is not None,
                      device="meta")                    # placeholders only: replaced just below
    new.norm = norm
    new.queries = module.queries
    new.train(module.training)
    return new


def replace_patch_mergers(model: nn.Module) -> int:
    """Swap, in place, every vit-pytorch `PatchMerger` inside `model` for the fused
    `pm_kernels.PatchMerger`; returns how many modules were swapped.

    Example (vit-pytorch's ViT with a merger after block 6):

        from vit_pytorch.vit_with_patch_merger import ViT
        from pm_kernels.integrations import replace_patch_mergers

        model = ViT(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12,
                    heads=12, mlp_dim=3072, patch_merge_layer=6, patch_merge_num_tokens=8).cuda()
        opt = torch.optim.AdamW(model.parameters())     # may be built before or after the swap
        assert replace_patch_mergers(model) == 1
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images).float().logsumexp(-1).mean()   # the merger runs fused
        loss.backward(); opt.step()

    Weights: the new module holds the *same* Parameter objects as the old one (its LayerNorm
    module and its `queries`), not copies. So an optimizer built before the swap keeps updating
    the live weights, nothing is duplicated in memory, device and dtype are unchanged (CPU or
    CUDA, any dtype), and `state_dict()` keys, parameter order and values are unchanged: a
    vit-pytorch checkpoint loads into the swapped model and vice versa. `scale`, the LayerNorm
    eps and the train/eval mode are carried over.

    A module reachable under several names is swapped once and the one new module is put in
    every place (the count is of distinct modules). The model itself cannot be swapped in place:
    for a bare PatchMerger use `convert_patch_merger`. Hooks registered on the old modules are
    not carried over. Swap before `torch.compile` / DDP / FSDP wrap the model.
    """
    if _is_vit_pytorch_merger(model):
        raise ValueError("the model itself is a vit-pytorch PatchMerger and cannot be replaced "
                         "in place; use `convert_patch_merger(model)`")
    swapped: dict[int, PatchMerger] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None or not _is_vit_pytorch_merger(child):
                continue
            if id(child) not in swapped:
                swapped[id(child)] = convert_patch_merger(child)
            # Direct assignment works for every container (Sequential, ModuleList, ModuleDict).
            parent._modules[name] = swapped[id(child)]
    return len(swapped)


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------

class _MergeAfterBlock:
    """Forward hook: (B, P + N, D) block output -> (B, P + M, D), the P prefix tokens passed
    through and the N patch tokens merged into M. A callable object rather than a closure, so
    that `copy.deepcopy(vit)` gives the copy's hook the copy's merger (deepcopy memoises the
    merger, which the copy also holds as a submodule), and so that the model pickles."""

    def __init__(self, merger: nn.Module, num_prefix_tokens: int):
        self.merger = merger
        self.num_prefix_tokens = num_prefix_tokens

    def __call__(self, module, args, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 3:
            raise TypeError("insert_patch_merger: the block must return a (B, tokens, D) tensor, "
                            f"got {type(output).__name__}"
                            f"{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}")
        p = self.num_prefix_tokens
        if p == 0:
            return self.merger(output)
        return torch.cat([output[:, :p], self.merger(output[:, p:])], dim=1)


class MergerHandle:
    """What `insert_patch_merger` returns: `.merger` (the inserted module), `.block_index`,
    `.remove()` (undo the insertion; idempotent). Also a context manager that removes on exit."""

    def __init__(self, vit: nn.Module, key: str, hook_handle, merger: nn.Module):
        self._vit = vit
        self._key = key
        self._hook_handle = hook_handle
        self.merger = merger
        self.block_index = int(key)

    @property
    def removed(self) -> bool:
        return self._hook_handle is None

    def remove(self) -> None:
        if self._hook_handle is None:
            return
        self._hook_handle.remove()
        self._hook_handle = None
        mergers = getattr(self._vit, "patch_mergers", None)
        if isinstance(mergers, nn.ModuleDict) and mergers[self._key] is self.merger:
            del mergers[self._key]
            if len(mergers) == 0:
                delattr(self._vit, "patch_mergers")

    def __enter__(self) -> "MergerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"MergerHandle(after_block={self.block_index}, {state}, merger={self.merger!r})"


def insert_patch_merger(vit: nn.Module, after_block: int, num_tokens: int, *,
                        merger: Optional[nn.Module] = None, eps: Optional[float] = None,
                        scale: Optional[float] = None) -> MergerHandle:
    """Insert a PatchMerger into a timm `VisionTransformer`, in place and reversibly, after
    block `after_block` (0-based, negative counts from the end); returns a `MergerHandle` whose
    `.remove()` restores the original model exactly.

    Example (timm ViT-S/16 merging its 196 patch tokens to 8 after block 5):

        import timm
        from pm_kernels.integrations import insert_patch_merger

        vit = timm.create_model("vit_small_patch16_224", num_classes=100).cuda()
        handle = insert_patch_merger(vit, after_block=5, num_tokens=8)
        logits = vit(images)               # blocks 6.. and the head see 1 + 8 tokens, not 1 + 196
        opt = torch.optim.AdamW(vit.parameters())  # build it after inserting: new parameters
        ...
        handle.remove()                    # back to the original model (merger weights dropped)

    Prefix tokens: the first `vit.num_prefix_tokens` tokens (the class token, then the register
    tokens) pass through unmerged and stay in front; only the N patch tokens are merged into
    `num_tokens`. The head therefore works unchanged: 'token' pooling reads the class token,
    'avg' / 'max' / 'avgmax' pooling reduce over the tokens after the prefix (the merged tokens,
    or everything when `pool_include_prefix`), and 'map' attention pooling attends over them.
    With no prefix tokens, every token is merged.

    How: the merger is registered as `vit.patch_mergers[str(after_block)]` (an nn.ModuleDict), so
    it follows `vit.to(...)`, `.train()`/`.eval()` and appears in `parameters()` and in the
    state dict under `patch_mergers.<i>.norm.weight`, `.norm.bias`, `.queries`; every original
    key is unchanged, so timm checkpoints still load (`strict=False`, or load before inserting).
    A forward hook on `vit.blocks[after_block]` applies it; the blocks are not renumbered, so
    block indices (`forward_intermediates`, `feature_info`, layer decay) keep their meaning.
    Several mergers may be inserted after different blocks. `copy.deepcopy(vit)` copies the
    merger with the model (the handle still refers to the original).

    Args:
        vit: a timm VisionTransformer or anything with `blocks`, `num_prefix_tokens` and
            `embed_dim` (checked; timm is not imported).
        after_block: index into `vit.blocks`.
        num_tokens: M, the number of merged patch tokens (1 to 256); ignored with `merger`.
        merger: the module to insert instead of a new `pm_kernels.PatchMerger`, e.g. a trained
            one or a plain-PyTorch merger; it must map (B, N, D) to (B, M, D).
        eps: LayerNorm eps of a new merger; None takes the block's `norm1.eps` (1e-6 in timm's
            ViTs), else 1e-5.
        scale: score scale of a new merger; None is D ** -0.5.

    A new merger is created on the device and in the dtype of the block's parameters, in the
    model's train/eval mode. Not supported after the merge: `attn_mask` / `is_causal` passed to
    `forward_features` (the mask describes the unmerged tokens), and `forward_intermediates` with
    `reshape=True` for blocks after the merger (there is no patch grid any more).
    """
    for attr in ("blocks", "num_prefix_tokens", "embed_dim"):
        if not hasattr(vit, attr):
            raise TypeError(f"insert_patch_merger needs a timm VisionTransformer (an object with "
                            f"`blocks`, `num_prefix_tokens`, `embed_dim`); {type(vit).__name__} "
                            f"has no `{attr}`")
    blocks = vit.blocks
    depth = len(blocks)
    if not isinstance(after_block, int) or not -depth <= after_block < depth:
        raise IndexError(f"after_block must be an int in [{-depth}, {depth - 1}] for a model with "
                         f"{depth} blocks, got {after_block!r}")
    index = after_block % depth
    key = str(index)
    existing = getattr(vit, "patch_mergers", None)
    if existing is not None and not isinstance(existing, nn.ModuleDict):
        raise TypeError(f"vit.patch_mergers exists and is a {type(existing).__name__}, "
                        "not the ModuleDict insert_patch_merger keeps its mergers in")
    if existing is not None and key in existing:
        raise ValueError(f"a merger was already inserted after block {index}; remove it first")
    if merger is None:
        if not isinstance(num_tokens, int) or not 1 <= num_tokens <= MAX_M:
            raise ValueError(f"num_tokens must be an int in [1, {MAX_M}], got {num_tokens!r}")
        block = blocks[index]
        ref = next(block.parameters(), None)
        if eps is None:
            eps = getattr(getattr(block, "norm1", None), "eps", 1e-5)
        merger = PatchMerger(vit.embed_dim, num_tokens, eps=eps, scale=scale,
                             device=ref.device if ref is not None else None,
                             dtype=ref.dtype if ref is not None else None)
        merger.train(vit.training)
    elif not isinstance(merger, nn.Module):
        raise TypeError(f"merger must be an nn.Module, got {type(merger).__name__}")
    if existing is None:
        vit.patch_mergers = existing = nn.ModuleDict()
    existing[key] = merger
    hook = blocks[index].register_forward_hook(
        _MergeAfterBlock(merger, int(vit.num_prefix_tokens)))
    return MergerHandle(vit, key, hook, merger)
