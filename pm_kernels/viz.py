"""Merge maps: a picture of where each merged token takes its weight from.

    y, p = pm_kernels.patch_merger(x, queries, ..., return_weights=True)    # p (B, M, N)
    fig = render_merge_map(image, p[0], grid=(h, w), path="merge_map.png")

The figure has (a) the image with every patch tinted by the output token that takes most of
its weight (argmax over M, one colour per token from a qualitative colormap, with a legend), and
(b) one heat map per output token of its weights over the patch grid.

`weights` must have exactly h * w columns, in row-major patch order (the order of a ViT's patch
embedding flattened with `.flatten(2)`). Tokens that are not patches (a class token, registers)
must be dropped by the caller, e.g. `p[0, :, 1:]`.

matplotlib is imported only when a figure is drawn (`pip install pm-kernels[viz]`);
`merge_assignment` needs numpy only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["render_merge_map", "merge_assignment", "token_colors"]

_INSTALL_HINT = ("pm_kernels.viz needs matplotlib to draw merge maps; install it with "
                 "`pip install pm-kernels[viz]` (or `pip install matplotlib`)")


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - exercised with matplotlib hidden in the tests
        raise ImportError(_INSTALL_HINT) from e
    return matplotlib, Figure, Patch


def _to_numpy(a, name):
    if hasattr(a, "detach"):                                   # a torch.Tensor
        a = a.detach().cpu()
        if a.is_floating_point():
            a = a.float()                                      # bf16 / fp16 -> numpy-friendly
        a = a.numpy()
    try:
        return np.asarray(a)
    except Exception as e:
        raise TypeError(f"{name} must be an array or tensor, got {type(a).__name__}") from e


def _check_grid(grid):
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w) of patch counts, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid must be a pair (h, w) of positive patch counts, got {grid!r}")
    return h, w


def _check_weights(weights, grid):
    p = _to_numpy(weights, "weights").astype(np.float64, copy=False)
    h, w = _check_grid(grid)
    if p.ndim != 2:
        raise ValueError(f"weights must have shape (M, h * w) for one image, got {p.shape}; "
                         "index the batch (p[i]) first")
    if p.shape[1] != h * w:
        raise ValueError(f"weights have {p.shape[1]} columns but grid {h}x{w} has {h * w} "
                         "patches; drop non-patch tokens (e.g. a class token: p[:, 1:]) first")
    if p.shape[0] < 1:
        raise ValueError("weights have no rows (M = 0): nothing to draw")
    return p, h, w


def merge_assignment(weights, grid) -> np.ndarray:
    """(h, w) int array: for every patch, the output token taking most of its weight
    (argmax over M of weights[:, patch]); -1 where a patch has no weight at all (masked)."""
    p, h, w = _check_weights(weights, grid)
    owner = p.argmax(axis=0)
    owner[~(p > 0).any(axis=0)] = -1
    return owner.reshape(h, w)


def token_colors(m: int) -> np.ndarray:
    """(m, 4) RGBA colours, distinct for each output token (tab10, tab20, then an even hue
    sweep). Needs matplotlib."""
    matplotlib, _, _ = _import_matplotlib()
    if m <= 10:
        return matplotlib.colormaps["tab10"](np.arange(m))
    if m <= 20:
        return matplotlib.colormaps["tab20"](np.arange(m))
    return matplotlib.colormaps["hsv"](np.arange(m) / m)


def _image_array(image):
    img = _to_numpy(image, "image")
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.moveaxis(img, 0, -1)                          # CHW tensor -> HWC
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"image must have shape (H, W, 3) (or (3, H, W), or (H, W)), "
                         f"got {img.shape}")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    img = img.astype(np.float64)
    lo, hi = np.nanmin(img), np.nanmax(img)
    if lo < 0.0 or hi > 1.0:                                   # e.g. a normalised tensor
        img = (img - lo) / (hi - lo if hi > lo else 1.0)
    return img


def render_merge_map(image, weights, grid: Sequence[int], path: Optional[str] = None, *,
                     token_labels: Optional[Sequence[str]] = None, alpha: float = 0.5,
                     title: Optional[str] = None, dpi: int = 100):
    """Draw the merge map of one image; returns the matplotlib Figure (saved when `path`).

    Args:
        image: (H, W, 3) uint8 or float array / tensor ((3, H, W) tensors are accepted too).
            Floats outside [0, 1] (a normalised tensor) are rescaled for display.
        weights: merge weights of this image, (M, h * w): `p[i]` from
            `patch_merger(..., return_weights=True)`, non-patch tokens removed by the caller.
        grid: (h, w), the patch grid; patch (r, c) is column r * w + c of `weights`.
        path: where to save the figure (PNG by extension), or None.
        token_labels: M legend / panel labels (default "token 0", "token 1", ...).
        alpha: opacity of the argmax tint over the image.
        title: optional figure title.
        dpi: resolution of the saved file.
    """
    p, h, w = _check_weights(weights, grid)
    img = _image_array(image)
    m = p.shape[0]
    labels = list(token_labels) if token_labels is not None else [f"token {i}" for i in range(m)]
    if len(labels) != m:
        raise ValueError(f"token_labels has {len(labels)} entries for M = {m} output tokens")
    _, Figure, Patch = _import_matplotlib()

    colors = token_colors(m)
    owner = merge_assignment(p, (h, w))
    tint = np.zeros((h, w, 4))
    tint[owner >= 0] = colors[owner[owner >= 0]]
    tint[..., 3] = np.where(owner >= 0, alpha, 0.0)
    height, width = img.shape[:2]
    extent = (0, width, height, 0)
    grey = np.repeat(img.mean(axis=-1, keepdims=True), 3, axis=-1)

    cols = min(m, 4)
    rows = -(-m // cols)
    panel = 2.6
    fig = Figure(figsize=(2 * panel + 0.4 + 1.7 * cols, max(panel + 1.3, 1.75 * rows + 0.5)),
                 dpi=dpi, layout="constrained")
    outer = fig.add_gridspec(1, 3, width_ratios=[panel, panel, 1.7 * cols])
    ax_in = fig.add_subplot(outer[0])
    ax_in.imshow(img, extent=extent, interpolation="nearest")
    ax_in.set_title("input", fontsize=9)
    ax = fig.add_subplot(outer[1])
    # The tint goes over a grey copy of the image, so token colours never mix with the image's.
    ax.imshow(grey, extent=extent, interpolation="nearest")
    ax.imshow(tint, extent=extent, interpolation="nearest")
    for r in range(1, h):                                      # patch grid
        ax.axhline(r * height / h, color="white", lw=0.4, alpha=0.7)
    for c in range(1, w):
        ax.axvline(c * width / w, color="white", lw=0.4, alpha=0.7)
    for a in (ax_in, ax):
        a.set_xticks([])
        a.set_yticks([])
    ax.set_title("(a) each patch: the token\ntaking most of its weight", fontsize=9)
    shares = np.bincount(owner[owner >= 0].ravel(), minlength=m)
    ax.legend(handles=[Patch(facecolor=colors[i], edgecolor="black", lw=0.5,
                             label=f"{labels[i]} ({shares[i]})") for i in range(m)],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=min(m, 2), fontsize=8,
              frameon=False, handlelength=1.2, columnspacing=1.0)

    inner = outer[2].subgridspec(rows, cols)
    for i in range(m):
        hax = fig.add_subplot(inner[i // cols, i % cols])
        hm = p[i].reshape(h, w)
        hax.imshow(hm, cmap="magma", extent=extent, interpolation="nearest", vmin=0.0,
                   vmax=max(hm.max(), 1e-12))
        hax.set_xticks([])
        hax.set_yticks([])
        for side in hax.spines.values():                       # frame in the token's colour
            side.set_edgecolor(colors[i])
            side.set_linewidth(3)
        hax.set_title(f"{labels[i]} (max {hm.max():.2f})", fontsize=8)
    fig.text(0.995, 0.005, "(b) merge weights of each output token over the patches "
             "(brighter = more; sums to 1)", ha="right", va="bottom", fontsize=7.5)
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
