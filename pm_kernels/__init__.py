"""pm_kernels: fused Triton kernels for the PatchMerger op (Renggli et al., 2022).

    y = softmax_N(scale * queries @ LN(x)^T) @ LN(x)

Modules, in the order data flows through them:
    reference     the math in plain PyTorch (ground truth, CPU fallback), C++ reference hooks
    common        @triton.jit helpers shared by forward and backward (LayerNorm + score sweep)
    forward       forward kernels + `patch_merger_forward` launcher
    backward      backward kernels + `patch_merger_backward` launcher
    heuristics    block sizes, warps, stages and split factors, in one place
    ops           validation, backend dispatch, autocast, torch.library custom ops + autograd
    module        `PatchMerger` nn.Module (vit-pytorch compatible state dict)
    integrations  swapping the merger into vit-pytorch and timm models
"""

from . import reference
from .module import PatchMerger
from .ops import get_backend, patch_merger, set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["patch_merger", "PatchMerger", "reference", "use_backend", "set_backend",
           "get_backend", "__version__"]
