"""Launch-configuration sweep on a GPU: the evidence behind `pm_kernels.heuristics`' tile tables.

    python -m bench.tune [--shapes vit-b hires-8] [--kernels forward backward] [--budget 300]
                         [--json PATH]

For each shape and kernel, times the fused forward (`patch_merger_forward`) or backward
(`patch_merger_backward`) under every candidate `Config` (tile sizes, warps, pipeline stages,
and the split of the token axis over programs), with `triton.testing.do_bench` (median), and
prints them fastest first with GB/s of the ideal bytes and % of the copy bandwidth measured in
the same run. Each candidate's output is checked against the heuristic configuration's (a wrong
configuration is reported, not timed). A wall-clock budget bounds the run: candidates are tried
in the order listed and the sweep moves on when its share of the budget is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from bench.suite import copy_bandwidth_gbs
from pm_kernels import heuristics, roofline
from pm_kernels.backward import patch_merger_backward
from pm_kernels.forward import patch_merger_forward
from pm_kernels.heuristics import Config

SHAPES = {  # name: (B, N, D, M)
    "vit-b": (256, 196, 768, 8),
    "vit-l": (256, 196, 1024, 8),
    "vit-h": (256, 256, 1280, 8),
    "hires-8": (8, 4096, 1024, 8),
    "hires-1": (1, 4096, 1024, 8),
    "m64": (256, 196, 768, 64),
}
EPS = 1e-5

# (BLOCK_N, BLOCK_D, num_warps, num_stages[, maxnreg]) candidates, 16-bit inputs, M <= 16, in
# the order they are tried (the budget may stop the sweep). First the neighbours of the heuristic's
# 128 x 32 / 3 stages: 2 and 4 stages (more of x in flight per program; spill-free under the
# 128-register cap, audit of 2026-12-01), the 64 x 64 tile of the measured runs, and the
# 256-token tiles, which hold a whole ViT-B/L/H token axis in one block (no scratch round trip
# of the M x D accumulator; never timed; uncapped: 256 x 16 spilled 4-12 B on sm_80 and
# 256 x 32 took 178-191 registers, one program per SM). (128, 32, 8, 3) without the cap is the
# tile measured fastest on ViT-B in the H100 run of 2026-11-25.
FORWARD_TILES = [
    (128, 32, 8, 2, 128), (128, 32, 8, 4, 128), (64, 64, 8, 2), (256, 16, 8, 2), (256, 32, 8, 2),
    (64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3),
    (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 2), (32, 128, 8, 2), (32, 128, 8, 3),
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (16, 128, 4, 3), (16, 256, 4, 2),
    (32, 256, 8, 2),
]
# Backward: first the heuristic's 32 x 64 tile without its 168-register cap (two programs per
# SM instead of three), and 64 x 32, the table's tile until 2026-12-01, capped and not.
BACKWARD_TILES = [
    (32, 64, 4, 1), (64, 32, 4, 1, 168), (64, 32, 4, 1),
    (32, 32, 4, 1), (32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 1),
    (64, 64, 8, 2), (16, 64, 4, 2), (16, 128, 4, 2), (32, 128, 8, 2), (16, 64, 4, 3),
]


def make_inputs(shape: str, dev: torch.device, dtype: torch.dtype):
    """(x, queries, weight, bias, dy) of a named shape, seeded: the same tensors in every
    script that times the kernels (`bench.tune`, `bench.profile`)."""
    b, n, d, m = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, n, d, generator=g).to(dev, dtype)
    q = (torch.randn(m, d, generator=g) * d ** -0.5).to(dev, dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dev, dtype)
    bias = (0.1 * torch.randn(d, generator=g)).to(dev, dtype)
    dy = torch.randn(b, m, d, generator=g).to(dev, dtype)
    return x, q, w, bias, dy


def _splits(b, n, bn, sms):
    """split 1, one token block per program, and the heuristic's middle ground, each as the
    number of programs the launchers run for it (`heuristics.token_split`: two nominal splits
    that launch the same grid are timed once)."""
    blocks = -(-n // bn)
    out = [1, blocks, heuristics._split(b, n, bn, sms)]
    if blocks >= 4:
        out.append(blocks // 2)
    return sorted({heuristics.token_split(n, s, bn)[0] for s in out})


def candidates(kernel: str, default: Config, b: int, n: int, m: int, dtype: torch.dtype,
               sms: int) -> list[tuple[Config, bool]]:
    """(config, raw_pv) pairs to time, in order, the heuristic's first. The forward's heuristic
    tile is also timed with the shifted form of sweep 2 everywhere (raw_pv=False): the A/B of
    the raw form (forward.py; it only runs for bf16). Duplicates are dropped."""
    bm = heuristics.block_m(m)
    tiles = FORWARD_TILES if kernel == "forward" else BACKWARD_TILES
    cands = [(default, True)]
    if kernel == "forward" and dtype == torch.bfloat16:
        cands.append((default, False))
    cands += [(Config(bm, bn, bd, s, nw, st, *cap), True)
              for bn, bd, nw, st, *cap in tiles for s in _splits(b, n, bn, sms)]
    return list(dict.fromkeys(cands))


def main(argv=None) -> int:
    import triton.testing

    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["vit-b", "hires-8", "vit-h"],
                   choices=sorted(SHAPES))
    p.add_argument("--kernels", nargs="+", default=["forward", "backward"],
                   choices=["forward", "backward"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole sweep")
    p.add_argument("--json", help="write every measurement here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.tune times kernels: it needs a CUDA GPU")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    dev = torch.device("cuda")
    sms = heuristics.num_sms(dev)
    copy_gbs = copy_bandwidth_gbs("cuda")
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbs:.0f} GB/s, {sms} SMs")

    from .suite import environment, write_atomic
    header = dict(environment("cuda", copy_gbs), sms=sms, dtype=a.dtype)

    def save():                       # after every job: a run cut short keeps what it timed
        if a.json:
            write_atomic(a.json, json.dumps(dict(header, rows=results), indent=1))

    t_start = time.time()
    jobs = [(s, k) for s in a.shapes for k in a.kernels]
    results = []
    for i, (shape, kernel) in enumerate(jobs):
        b, n, d, m = SHAPES[shape]
        deadline = t_start + a.budget * (i + 1) / len(jobs)
        x, q, w, bias, dy = make_inputs(shape, dev, dtype)
        scale = d ** -0.5
        y, lse, stats, qsum, _ = patch_merger_forward(x, q, w, bias, EPS, scale, save_stats=True)
        # run: the launcher alone (timed); flat: all of its outputs as one fp32 vector (checked).
        if kernel == "forward":
            run = lambda cfg, raw=True: patch_merger_forward(  # noqa: E731
                x, q, w, bias, EPS, scale, config=cfg, raw_pv=raw)
            flat = lambda cfg, raw=True: run(cfg, raw).y.flatten().float()  # noqa: E731
            ideal = roofline.forward_bytes(b, n, d, m, dtype, sms=1).ideal_bytes
            default = heuristics.forward_config(b, n, d, m, dtype, dev)
        else:
            # Every gradient is checked: the split factor changes the partial rows behind
            # dqueries / dweight / dbias more than dx.
            run = lambda cfg, raw=True: patch_merger_backward(  # noqa: E731
                dy, x, q, w, bias, y, lse, stats, qsum, scale, config=cfg)
            flat = lambda cfg, raw=True: torch.cat(  # noqa: E731
                [g.flatten().float() for g in run(cfg, raw)])
            ideal = roofline.backward_bytes(b, n, d, m, dtype, sms=1).ideal_bytes
            default = heuristics.backward_config(b, n, d, m, dtype, dev)
        # As launched: a nominal split the token blocks cannot fill is launched smaller.
        default = dataclasses.replace(
            default, split=heuristics.token_split(n, default.split, default.block_n)[0])
        expected = flat(default)
        cands = candidates(kernel, default, b, n, m, dtype, sms)
        rows = []
        print(f"\n== {shape} {kernel} B={b} N={n} D={d} M={m} {a.dtype} "
              f"(heuristic: {default})", flush=True)
        for cfg, raw in cands:
            if time.time() > deadline:
                print(f"  budget spent; {len(cands) - len(rows)} candidates not tried")
                break
            label = str(cfg) + ("" if raw else " shifted-pv")
            row = dict(shape=shape, kernel=kernel, config=label,
                       heuristic=cfg == default and raw)
            try:
                # Relative to the largest value: the weight gradients sum over B x N tokens and
                # are rounded to bf16, so their absolute differences between split orders are
                # ulps of large numbers. A wrong configuration is off by O(1) of the values.
                err = float((flat(cfg, raw) - expected).abs().max() / expected.abs().max())
                row["max_rel_diff_vs_heuristic"] = err
                if not err < 1e-2:
                    raise RuntimeError(f"output differs from the heuristic's by {err:.2g} "
                                       "(relative to the largest value)")
                ms = triton.testing.do_bench(lambda: run(cfg, raw), warmup=10, rep=40,
                                             return_mode="median")
                row.update(ms=ms, gbps=ideal / ms / 1e6, pct_copy=100 * ideal / ms / 1e6 / copy_gbs)
                print(f"  {ms:8.4f} ms {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}%  {label}",
                      flush=True)
            except Exception as e:  # compile failure (resources), wrong output: report, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                print(f"  ERROR {row['error']}  {label}", flush=True)
            rows.append(row)
        timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        print(f"-- {shape} {kernel} fastest:")
        for r in timed[:5]:
            print(f"   {r['ms']:8.4f} ms {r['pct_copy']:5.1f}%  {r['config']}"
                  f"{'  (heuristic)' if r['heuristic'] else ''}")
        results += rows
        save()
        x = q = w = bias = dy = y = lse = expected = None   # free before the next shape
        torch.cuda.empty_cache()
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
