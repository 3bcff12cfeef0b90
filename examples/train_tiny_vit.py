"""Train a tiny ViT with a PatchMerger on a synthetic task, with the merger swapped for the
fused pm_kernels one by `replace_patch_mergers`.

    python examples/train_tiny_vit.py                      # CPU: ~300 steps in well under a minute
    python examples/train_tiny_vit.py --device cuda --amp  # GPU, bf16 autocast, fused kernels
    python examples/train_tiny_vit.py --backend triton --device cpu --steps 20   # the real
                                          # kernels in Triton's CPU interpreter (slow, exact)

The model is vit-pytorch's `vit_with_patch_merger.ViT` when vit-pytorch imports (it needs
torchvision; `--model vit-pytorch` insists), else a self-contained ViT of the same layout
(`--model builtin`), whose merger is a verbatim copy of vit-pytorch's PatchMerger; either way
`replace_patch_mergers` swaps in `pm_kernels.PatchMerger`, keeping the weights.

Where the merger runs (pm_kernels' dispatch rule): CUDA tensors run the Triton kernels; CPU
tensors run them in Triton's interpreter when TRITON_INTERPRET=1, and the PyTorch reference
otherwise. `--backend triton|reference` forces one (triton on CPU sets TRITON_INTERPRET=1).

The task: 16x16 RGB noise images with one brighter 4x4 square; the class (0-7) is the square's
quadrant (4) times its colour (red-ish or blue-ish, 2). Chance level is ln 8 = 2.08 nats; the
loss visibly drops within a hundred steps.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="pm_kernels backend (default auto: the dispatch rule)")
    p.add_argument("--model", default="auto", choices=["auto", "vit-pytorch", "builtin"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--merge-tokens", type=int, default=4, help="tokens after the merger")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no bar")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.backend == "triton" and not ARGS.device.startswith("cuda"):
    import torch as _torch  # noqa: E402  (only to ask whether "auto" means a GPU)

    if ARGS.device == "cpu" or not _torch.cuda.is_available():
        # Must be set before pm_kernels (and its @triton.jit kernels) is imported.
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pm_kernels  # noqa: E402
from pm_kernels.integrations import replace_patch_mergers  # noqa: E402

IMG, PATCH, CHANNELS, CLASSES = 16, 4, 3, 8


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def synthetic_batch(batch, device, generator):
    """Images (B, 3, 16, 16) and labels: class = quadrant of a bright square * 2 + colour."""
    y = torch.randint(0, CLASSES, (batch,), device=device, generator=generator)
    quadrant, colour = y // 2, y % 2
    img = 0.5 * torch.randn(batch, CHANNELS, IMG, IMG, device=device, generator=generator)
    half = IMG // 2
    # A 4x4 square at a random position inside its quadrant.
    oy = torch.randint(0, half - 4 + 1, (batch,), device=device, generator=generator)
    ox = torch.randint(0, half - 4 + 1, (batch,), device=device, generator=generator)
    top = (quadrant // 2) * half + oy
    left = (quadrant % 2) * half + ox
    rows = torch.arange(IMG, device=device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < top[:, None] + 4)
    in_cols = (rows[None, :] >= left[:, None]) & (rows[None, :] < left[:, None] + 4)
    square = (in_rows[:, :, None] & in_cols[:, None, :]).float()            # (B, H, W)
    tint = torch.stack([1.5 - colour, 0.5 * torch.ones_like(colour, dtype=torch.float),
                        0.5 + colour], dim=1).float()                       # (B, 3)
    img = img + 1.5 * square[:, None] * tint[:, :, None, None]
    return img, y


# ----------------------------------------------------------------------------------------------
# Model: vit-pytorch's, or a self-contained one of the same layout
# ----------------------------------------------------------------------------------------------

class PatchMerger(nn.Module):
    """vit-pytorch's PatchMerger, verbatim (what `replace_patch_mergers` looks for)."""

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


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, `depth` pre-norm blocks with a PatchMerger after block
    `patch_merge_layer` (1-based, as in vit-pytorch), final norm, mean pool, linear head."""

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                 patch_merge_layer, patch_merge_num_tokens, channels=3):
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Sequential(
            nn.LayerNorm(channels * patch_size ** 2), nn.Linear(channels * patch_size ** 2, dim),
            nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(0.02 * torch.randn(1, num_patches, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.merge_after = patch_merge_layer - 1
        self.patch_merger = PatchMerger(dim, patch_merge_num_tokens)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, img):
        b, c, h, w = img.shape
        p = self.patch_size
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        x = self.to_patch_embedding(x.reshape(b, (h // p) * (w // p), p * p * c))
        x = x + self.pos_embedding
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.merge_after:
                x = self.patch_merger(x)
        return self.head(self.norm(x).mean(dim=1))


def build_model(kind, merge_tokens):
    cfg = dict(image_size=IMG, patch_size=PATCH, num_classes=CLASSES, dim=64, depth=2, heads=4,
               mlp_dim=128, patch_merge_layer=1, patch_merge_num_tokens=merge_tokens)
    if kind in ("auto", "vit-pytorch"):
        try:
            from vit_pytorch.vit_with_patch_merger import ViT
        except ImportError as exc:          # vit-pytorch needs einops and torchvision
            if kind == "vit-pytorch":
                raise SystemExit(f"--model vit-pytorch: cannot import vit-pytorch ({exc})")
        else:
            return ViT(**cfg, dim_head=16), "vit-pytorch ViT"
    return TinyViT(**cfg), "built-in TinyViT"


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------

class _SimpleBar:
    """A minimal stand-in for tqdm: one self-rewriting line."""

    def __init__(self, total, disable=False):
        self.total, self.n, self.postfix, self.t0 = total, 0, "", time.perf_counter()
        self.disable = disable or not sys.stdout.isatty()

    def update(self, n=1):
        self.n += n
        if not self.disable:
            frac = self.n / self.total
            bar = "#" * int(30 * frac)
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r[{bar:<30}] {self.n}/{self.total} {rate:5.1f} it/s {self.postfix}",
                  end="", flush=True)

    def set_postfix_str(self, s):
        self.postfix = s

    def write(self, s):
        print(("\n" if not self.disable and self.n else "") + s, flush=True)

    def close(self):
        if not self.disable:
            print(flush=True)


def progress(total, disable):
    if not disable:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, dynamic_ncols=True, disable=not sys.stdout.isatty())
        except ImportError:
            pass
    return _SimpleBar(total, disable)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def merger_path(device):
    """Which implementation the merger dispatches to (pm_kernels' documented rule)."""
    backend = pm_kernels.get_backend()
    if backend != "auto":
        return backend
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


@torch.no_grad()
def evaluate(model, device, generator, amp, images=2048):
    model.eval()
    correct = total = 0
    for _ in range(max(images // 256, 1)):
        img, y = synthetic_batch(min(images, 256), device, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(img).argmax(-1) == y).sum().item()
        total += y.numel()
    model.train()
    return correct / total


def main(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    pm_kernels.set_backend(args.backend)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    eval_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    model, kind = build_model(args.model, args.merge_tokens)
    model = model.to(device)
    swapped = replace_patch_mergers(model)          # <- the one-line swap
    assert swapped == 1, swapped
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=0.1)
    step_fn = torch.compile(model) if args.compile else model
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{kind}: {n_params / 1e3:.1f}k parameters, {swapped} PatchMerger swapped for "
          f"pm_kernels.PatchMerger; device {device}, merger path: {merger_path(device)}"
          f"{', bf16 autocast' if args.amp else ''}{', compiled' if args.compile else ''}")
    print(f"task: {CLASSES} classes (chance loss ln {CLASSES} = {math.log(CLASSES):.2f}), "
          f"batch {args.batch_size}, {args.steps} steps")

    bar = progress(args.steps, args.no_progress)
    log_every = max(args.steps // 10, 1)
    first_loss, ema, seen, t0 = None, None, 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        img, y = synthetic_batch(args.batch_size, device, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(step_fn(img).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        seen += img.shape[0]
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"loss {ema:.3f}, {seen / elapsed:,.0f} img/s")
        bar.update(1)
        if step % log_every == 0 or step == args.steps:
            bar.write(f"step {step:5d}  loss {ema:.4f}  {seen / elapsed:8,.0f} img/s")
    bar.close()
    elapsed = time.perf_counter() - t0
    # The interpreter runs ~100x slower than the reference on CPU: evaluate on fewer images.
    interpreted = device.type == "cpu" and merger_path(device) == "triton"
    acc = evaluate(model, device, eval_gen, args.amp, images=256 if interpreted else 2048)
    print(f"done: {args.steps} steps in {elapsed:.1f} s ({seen / elapsed:,.0f} img/s); loss "
          f"{first_loss:.3f} -> {ema:.3f} (smoothed); held-out accuracy {acc:.1%} "
          f"(chance {1 / CLASSES:.1%})")
    return ema, acc


if __name__ == "__main__":
    main(ARGS)
