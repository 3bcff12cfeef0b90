"""Byte accounting: what an ideal PatchMerger must move, next to what our kernels move.

The op is memory-bound (per token it does ~4 * M * D flops on 2 * D bytes of fp16), so its speed
of light is bytes / bandwidth. This module counts, for one forward or one backward call:

* ideal: the compulsory traffic of any implementation. Forward: read x once, write y, read the
  parameters. Backward: read x and dy, write dx, read the parameters and write their gradients.
* designed: what our launches are built to move, launch by launch, split into
    - DRAM bytes: each tensor a kernel reads or writes, counted once per kernel (first touch);
      split-N partials and backward partial buffers are written by one kernel and read by the
      next, so they count on both sides;
    - L2 bytes ("scratch (L2)" and re-reads): traffic that the design expects to hit in L2, i.e.
      the per-program accumulator scratch of multi-block programs (a program re-reads its own
      M x D fp32 row for every token block), the second sweep over a token block's x slab, and
      the parameters / dy re-read for every token block. It costs L2 bandwidth, not DRAM.

Counts follow the launchers exactly (same split factor, same per-program token ranges, same
masking: a masked-out load moves no bytes) and use the launch heuristics unless a config is
given. They are a design statement, not a measurement: caches can turn "DRAM" re-reads between
kernels (y for Delta, dy in the backward) into L2 hits, and DRAM moves whole 32-byte sectors.

    from pm_kernels.roofline import forward_bytes
    r = forward_bytes(256, 196, 768, 8, torch.float16, sms=132)
    r.ideal_bytes, r.dram_bytes, r.l2_bytes, print(r.table())

    python -m pm_kernels.roofline --b 256 --n 196 --d 768 --m 8 --dtype fp16 --sms 132
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from . import heuristics
from .heuristics import Config

__all__ = ["LaunchBytes", "ByteReport", "forward_bytes", "backward_bytes", "token_ranges"]


@dataclasses.dataclass(frozen=True)
class LaunchBytes:
    """The traffic of one launch (a Triton kernel or a torch op), by category, in bytes."""

    name: str
    dram: dict[str, int]
    l2: dict[str, int]

    @property
    def dram_bytes(self) -> int:
        return sum(self.dram.values())

    @property
    def l2_bytes(self) -> int:
        return sum(self.l2.values())


@dataclasses.dataclass(frozen=True)
class ByteReport:
    """Ideal vs designed traffic of one forward or backward call."""

    direction: str                     # "forward" or "backward"
    shape: tuple[int, int, int, int]   # (B, N, D, M)
    dtype: str
    config: Config
    split: int                         # the split factor the launcher actually uses
    ideal: dict[str, int]
    launches: tuple[LaunchBytes, ...]

    @property
    def ideal_bytes(self) -> int:
        return sum(self.ideal.values())

    @property
    def dram_bytes(self) -> int:
        return sum(x.dram_bytes for x in self.launches)

    @property
    def l2_bytes(self) -> int:
        return sum(x.l2_bytes for x in self.launches)

    @property
    def overhead(self) -> float:
        """Designed DRAM bytes over ideal bytes (1.0 = at the compulsory minimum)."""
        return self.dram_bytes / self.ideal_bytes if self.ideal_bytes else float("nan")

    def table(self) -> str:
        b, n, d, m = self.shape
        c = self.config
        lines = [f"{self.direction}: B={b} N={n} D={d} M={m} {self.dtype}, BLOCK "
                 f"{c.block_m}x{c.block_n}x{c.block_d}, split {self.split}",
                 f"  {'ideal':<34} {_mb(self.ideal_bytes):>10}   "
                 + ", ".join(f"{k} {_mb(v)}" for k, v in self.ideal.items())]
        for lb in self.launches:
            lines.append(f"  {lb.name:<34} {_mb(lb.dram_bytes):>10} DRAM  "
                         + ", ".join(f"{k} {_mb(v)}" for k, v in lb.dram.items() if v))
            if lb.l2_bytes:
                lines.append(f"  {'':<34} {_mb(lb.l2_bytes):>10} L2    "
                             + ", ".join(f"{k} {_mb(v)}" for k, v in lb.l2.items() if v))
        lines.append(f"  {'designed total':<34} {_mb(self.dram_bytes):>10} DRAM "
                     f"({self.overhead:.3f}x ideal), {_mb(self.l2_bytes)} L2")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dict(direction=self.direction, shape=self.shape, dtype=self.dtype,
                    config=dataclasses.asdict(self.config), split=self.split, ideal=self.ideal,
                    ideal_bytes=self.ideal_bytes, dram_bytes=self.dram_bytes,
                    l2_bytes=self.l2_bytes, overhead=self.overhead,
                    launches=[dataclasses.asdict(x) for x in self.launches])


def _mb(v: int) -> str:
    return f"{v / 1e6:.3f} MB"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def token_ranges(n: int, split: int, block_n: int) -> list[tuple[int, int]]:
    """(tokens, token blocks) of each program of one batch element for a config of `split`
    programs, exactly as the launchers partition the token axis (`heuristics.token_split`:
    whole token blocks, and only programs that own tokens)."""
    programs, per = heuristics.token_split(n, split, block_n)
    out = []
    for s in range(programs):
        tokens = max(0, min(n, (s + 1) * per) - s * per)
        out.append((tokens, heuristics.cdiv(tokens, block_n)))
    return out


def _resolve(kind: str, b, n, d, m, dtype, config, device, sms) -> tuple[Config, int]:
    """The config (heuristics unless given) and the split factor the launcher will use."""
    if config is None:
        if sms is not None:
            device = torch.device("cpu")    # the SM count is given: query no device
        elif device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(device)
        pick = heuristics.forward_config if kind == "forward" else heuristics.backward_config
        config = pick(b, n, d, m, dtype, device)
        if sms is not None:   # what the heuristics would pick on a device with `sms` SMs
            split = heuristics.split_rule(kind == "backward", b, n, m, config.block_m,
                                          config.block_n, dtype.itemsize, sms)
            config = dataclasses.replace(config, split=split)
    return config, heuristics.token_split(n, config.split, config.block_n)[0]


def forward_bytes(b: int, n: int, d: int, m: int, dtype: torch.dtype = torch.float16, *,
                  param_dtype: torch.dtype | None = None, affine: bool = True,
                  mask: bool = False, config: Config | None = None, device=None,
                  sms: int | None = None, save_stats: bool = True) -> ByteReport:
    """Bytes of one forward call (`_forward_kernel`, plus `_combine_kernel` when split > 1).

    `param_dtype` is the dtype of queries/weight/bias (x's dtype by default; fp32 under
    autocast). The config comes from the heuristics for `device` (or a device with `sms` SMs)
    unless given. `save_stats`: a training forward, which also writes the token statistics and
    c_s for the backward (False: inference)."""
    cfg, split = _resolve("forward", b, n, d, m, dtype, config, device, sms)
    e, pe = _size(dtype), _size(param_dtype or dtype)
    acc = 8 if dtype == torch.float64 else 4
    n_affine = 2 if affine else 0
    params = m * d * pe + n_affine * d * pe

    ideal = {"x": b * n * d * e, "y": b * m * d * e, "params": params}
    if mask:
        ideal["mask"] = b * n

    ranges = token_ranges(n, split, cfg.block_n)
    blocks = sum(nb for _, nb in ranges)            # token blocks per batch element
    finalize = split == 1
    row = m * d * acc                               # one program's accumulator (M x D)
    scratch_rd = sum(max(nb - 1, 0) for _, nb in ranges) * row
    # Every block but the first reads the row; every block writes it, except that with
    # FINALIZE the last block writes y instead. With split > 1 the last write is the partial.
    scratch_wr = sum(max(nb - 1, 0) for _, nb in ranges) * row
    partial_wr = sum(1 for _, nb in ranges if nb > 0) * row if not finalize else 0

    dram = {"x": b * n * d * e, "params": params,
            "y": b * m * d * e if finalize else 0,
            "lse": b * m * acc if finalize else 0,
            "split partials (acc)": b * partial_wr,
            "split partials (m, l)": b * split * 2 * m * acc if not finalize else 0,
            "mask": b * n if mask else 0,
            "saved statistics": (b * 3 * n + m) * acc if save_stats else 0}
    first_tile = min(d, cfg.block_d)
    l2 = {"scratch (L2)": b * (scratch_rd + scratch_wr),
          # sweep 2 re-reads the block's x slab; sweep 1 reads its first D tile twice
          "x re-read": b * n * d * e + b * n * first_tile * e,
          # W and g once per program (`query_operand`), g and b once more at the end
          "params re-read": b * split * (m * d + (d if affine else 0)) * pe
                            + (b * n_affine * d * pe if finalize else 0) - params,
          # op(W g): written once per program, read by the score sweep of every token block
          "query operand": b * split * m * d * e + b * blocks * m * d * e}
    launches = [LaunchBytes("_forward_kernel", dram, l2)]
    if not finalize:
        dram_c = {"split partials (acc)": b * partial_wr,
                  "split partials (m, l)": b * split * 2 * m * acc,
                  "y": b * m * d * e, "lse": b * m * acc, "params (g, b)": n_affine * d * pe}
        d_blocks = heuristics.cdiv(d, heuristics.combine_config(d, m).block_d)
        # every (batch, D block) program reads all (m, l) pairs twice (max pass, sum pass)
        l2_c = {"(m, l) re-read": b * (2 * d_blocks - 1) * split * 2 * m * acc}
        launches.append(LaunchBytes("_combine_kernel", dram_c, l2_c))
    return ByteReport("forward", (b, n, d, m), _dtype_name(dtype), cfg, split, ideal,
                      tuple(launches))


def backward_bytes(b: int, n: int, d: int, m: int, dtype: torch.dtype = torch.float16, *,
                   param_dtype: torch.dtype | None = None, affine: bool = True,
                   mask: bool = False, config: Config | None = None, device=None,
                   sms: int | None = None) -> ByteReport:
    """Bytes of one backward call: `_delta_kernel`, `_backward_kernel` and the torch reductions
    of the partial buffers (dW, dg, db) that finish the weight gradients."""
    cfg, split = _resolve("backward", b, n, d, m, dtype, config, device, sms)
    e, pe = _size(dtype), _size(param_dtype or dtype)
    acc = 8 if dtype == torch.float64 else 4
    n_affine = 2 if affine else 0
    params = m * d * pe + n_affine * d * pe
    grads = params                                   # dqueries, dweight, dbias

    ideal = {"x": b * n * d * e, "dy": b * m * d * e, "dx": b * n * d * e,
             "params": params, "param grads": grads}
    if mask:
        ideal["mask"] = b * n

    launches = []
    # Delta' = sum_d dy * (y - bias): reads dy and the forward's y; with a bias it also reads
    # lse and writes the db partial rows (sum_m dy per batch element, (B, D)). Then, per batch
    # element, the token kernel's score operands op(dy g) (B, M, D) and op(W g) (M, D, once) in
    # x's dtype, and the per-query sums (B, 3, M): a second pass over dy, W and g, from L2.
    g_bytes = d * pe if affine else 0
    launches.append(LaunchBytes(
        "_delta_kernel",
        {"dy": b * m * d * e, "y": b * m * d * e, "bias": g_bytes,
         "delta": b * m * acc, "lse": b * m * acc if affine else 0,
         "db partials": b * d * acc if affine else 0,
         "queries, weight": m * d * pe + g_bytes,
         "score operands": b * m * d * e + m * d * e, "query sums": b * 3 * m * acc},
        {"bias re-read": (b - 1) * g_bytes, "dy re-read": b * m * d * e,
         "queries, weight re-read": (b - 1) * (m * d * pe + g_bytes)}))

    ranges = token_ranges(n, split, cfg.block_n)
    blocks = sum(nb for _, nb in ranges)
    parts = b * split
    row = m * d * acc
    vec_rows = 1 if affine else 0                    # dg partial rows (D each)
    # Partial rows: read-modify-write for every token block after the first (L2), the last
    # write of each row is the partial that torch.sum reads (DRAM).
    rmw = sum(max(nb - 1, 0) for _, nb in ranges)
    scratch = b * rmw * 2 * (row + vec_rows * d * acc)
    partial = parts * (row + vec_rows * d * acc)
    dram = {"x": b * n * d * e, "dy": b * m * d * e, "params": params,
            "score operands": b * m * d * e + m * d * e,
            "lse + delta, query sums": parts * 5 * m * acc, "dx": b * n * d * e,
            "partials (dW, dg)": partial, "mask": b * n if mask else 0,
            "saved statistics": (b * 3 * n + m) * acc}
    l2 = {"scratch (L2)": scratch,
          # the second sweep re-reads the block's x slab (no shift tile: k is saved)
          "x re-read": b * n * d * e,
          # every token block: op(dy g) and op(W g) in the score sweep, dy, W and g in the dx
          # sweep
          "dy re-read": 2 * b * blocks * m * d * e - 2 * b * m * d * e,
          "params re-read": (b * blocks * (m * d * e + m * d * pe + g_bytes)
                             - params - m * d * e)}
    launches.append(LaunchBytes("_backward_kernel", dram, l2))

    # torch: dw_part.sum(0); dw * weight; .to(queries.dtype); dg/db sums and casts.
    red = {"dW partials": parts * row, "dW": m * d * acc}
    if affine:
        red.update({"dg partials": parts * d * acc, "db partials": b * d * acc,
                    "dg, db": 2 * d * acc,
                    "dW * weight": 2 * m * d * acc + d * pe})
    red["casts"] = (m * d * acc + m * d * pe) + (2 * (d * acc + d * pe) if affine else 0)
    launches.append(LaunchBytes("torch reductions", red, {}))
    return ByteReport("backward", (b, n, d, m), _dtype_name(dtype), cfg, split, ideal,
                      tuple(launches))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pm_kernels.roofline",
                                description="Ideal vs designed bytes of one PatchMerger call.")
    p.add_argument("--b", type=int, default=256)
    p.add_argument("--n", type=int, default=196)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--sms", type=int, default=132, help="SM count (sets the split; H100: 132)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="GB/s: also print the time the designed DRAM bytes take")
    a = p.parse_args(argv)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    for fn in (forward_bytes, backward_bytes):
        r = fn(a.b, a.n, a.d, a.m, dt, sms=a.sms)
        print(r.table())
        if a.bandwidth:
            print(f"  at {a.bandwidth:.0f} GB/s: ideal {r.ideal_bytes / a.bandwidth / 1e3:.1f} us,"
                  f" designed {r.dram_bytes / a.bandwidth / 1e3:.1f} us")


if __name__ == "__main__":
    main()
