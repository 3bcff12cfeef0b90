"""Train a tiny PatchMerger classifier on synthetic shapes and draw its merge map.

    python examples/merge_map.py                       # 150 steps, ~10 s on CPU
    python examples/merge_map.py --out docs/merge_map.png --steps 300 --seed 1

The model: a 4x4-patch conv embedding (32x32 images -> an 8x8 grid of 64 tokens), a learned
position embedding, one residual token-wise MLP, a `pm_kernels.PatchMerger` down to 4 tokens and
a linear head; no attention, so the merger is the only place where tokens meet. The task: two
shapes of two different colours (of red, green, blue) on a textured background, one in each half;
the class is which two colours and which one is on the left (6 classes, chance = ln 6 = 1.79
nats). No downloads: the images are drawn on the fly.

After training, the merge weights of a held-out image (`return_weights=True`) are rendered with
`pm_kernels.viz.render_merge_map`: which output token takes each patch, and each token's weights.

Where the merger runs is pm_kernels' dispatch rule: CUDA tensors run the Triton kernels; on CPU
the PyTorch reference runs unless TRITON_INTERPRET=1 (Triton's interpreter: exact but slow);
`--backend` forces one.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--merge-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--out", default=str(ROOT / "docs" / "merge_map.png"))
    p.add_argument("--dpi", type=int, default=100)
    return p.parse_args(argv)


def _cuda():
    import torch
    return torch.cuda.is_available()


SHAPES = ("square", "disk", "triangle")           # drawn at random; not part of the label
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95)}
PAIRS = [(0, 1), (0, 2), (1, 2)]                  # the two colours present in an image
SIZE, PATCH = 32, 4
NUM_CLASSES = 2 * len(PAIRS)


def class_name(label: int) -> str:
    a, b = PAIRS[label // 2]
    left, right = (a, b) if label % 2 == 0 else (b, a)
    names = list(COLOURS)
    return f"{names[left]} left of {names[right]}"


def make_batch(n, gen, device="cpu"):
    """n images (n, 3, 32, 32) in [0, 1] with two shapes of two different colours, one in each
    half; label = colour pair * 2 + (which colour is on the left)."""
    import torch

    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32),
                            torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    # Background: a soft random gradient plus a little texture.
    base = torch.rand(n, 3, 1, 1, generator=gen) * 0.25 + 0.4
    gx = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    gy = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
    img = base + gx * (xx / SIZE - 0.5) + gy * (yy / SIZE - 0.5)
    img = img + 0.04 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    pair = torch.randint(0, len(PAIRS), (n,), generator=gen)
    swap = torch.randint(0, 2, (n,), generator=gen)
    palette = torch.tensor(list(COLOURS.values()))
    pairs = torch.tensor(PAIRS)[pair]                                        # (n, 2)
    left_right = torch.where(swap[:, None] == 1, pairs.flip(-1), pairs)
    for side in (0, 1):
        r = torch.randint(3, 6, (n, 1, 1), generator=gen).float()           # half size
        lo = 1 + r + side * SIZE / 2
        cx = lo + torch.rand(n, 1, 1, generator=gen) * (SIZE / 2 - 2 * r - 2)
        cy = r + 1 + torch.rand(n, 1, 1, generator=gen) * (SIZE - 2 * r - 2)
        shape = torch.randint(0, 3, (n, 1, 1), generator=gen)
        dx, dy = xx - cx, yy - cy
        square = (dx.abs() <= r) & (dy.abs() <= r)
        disk = dx ** 2 + dy ** 2 <= r ** 2
        tri = (dy <= r) & (dy >= -r) & (dx.abs() <= (dy + r) / 2)
        inside = torch.where(shape == 0, square, torch.where(shape == 1, disk, tri))
        rgb = palette[left_right[:, side]].view(n, 3, 1, 1)
        img = torch.where(inside.unsqueeze(1), rgb + 0.03 * torch.randn(img.shape, generator=gen),
                          img)
    return img.clamp(0, 1).to(device), (pair * 2 + swap).to(device)


def build_model(dim, merge_tokens, device):
    import torch
    from torch import nn

    import pm_kernels

    class TinyMergerNet(nn.Module):
        def __init__(self):
            super().__init__()
            grid = SIZE // PATCH
            self.embed = nn.Conv2d(3, dim, PATCH, stride=PATCH)
            self.pos = nn.Parameter(0.02 * torch.randn(1, grid * grid, dim))
            self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                     nn.Linear(2 * dim, dim))
            self.merger = pm_kernels.PatchMerger(dim, merge_tokens)
            self.head = nn.Sequential(nn.LayerNorm(merge_tokens * dim),
                                      nn.Linear(merge_tokens * dim, NUM_CLASSES))

        def forward(self, img, return_weights=False):
            t = self.embed(img).flatten(2).transpose(1, 2) + self.pos      # (B, 64, dim)
            t = t + self.mlp(t)
            merged, p = self.merger(t, return_weights=True)                # (B, M, dim)
            logits = self.head(merged.flatten(1))
            return (logits, p) if return_weights else logits

    return TinyMergerNet().to(device)


def main(argv=None):
    args = parse_args(argv)
    if args.backend == "triton" and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before pm_kernels is imported
    sys.path.insert(0, str(ROOT))
    import torch

    import pm_kernels
    from pm_kernels.viz import render_merge_map

    torch.manual_seed(args.seed)
    pm_kernels.set_backend(args.backend)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_model(args.dim, args.merge_tokens, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                pct_start=0.15)
    t0 = time.time()
    print(f"training on {args.device}, pm_kernels backend {pm_kernels.get_backend()!r}; "
          f"chance = {math.log(NUM_CLASSES):.2f} nats")
    for step in range(1, args.steps + 1):
        img, label = make_batch(args.batch_size, gen, args.device)
        loss = torch.nn.functional.cross_entropy(model(img), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.time() - t0:.1f} s)")

    model.eval()
    with torch.no_grad():
        img, label = make_batch(256, torch.Generator().manual_seed(10_000 + args.seed),
                                args.device)
        logits, p = model(img, return_weights=True)
        acc = (logits.argmax(-1) == label).float().mean().item()
    print(f"held-out accuracy {acc:.1%} (chance {1 / NUM_CLASSES:.1%})")

    # A sample image whose class the model gets right; its merge weights p[i] are (M, 64).
    i = int((logits.argmax(-1) == label).nonzero()[0]) if acc > 0 else 0
    name = class_name(int(label[i]))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_merge_map(img[i].permute(1, 2, 0), p[i], grid=(SIZE // PATCH, SIZE // PATCH),
                     path=str(out), dpi=args.dpi,
                     title=f"PatchMerger: 64 patches -> {args.merge_tokens} tokens; class "
                           f"'{name}', held-out accuracy {acc:.0%}")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return acc


if __name__ == "__main__":
    main()
