"""Where the device time goes: the GPU time of each kernel of the fused op, and the idle gaps.

    python -m bench.profile [--shapes vit-b vit-h hires-8] [--iters 20] [--json PATH]

For each shape (`bench.tune`'s, bf16) and each of
    forward    `patch_merger_forward` with saved statistics (what a training forward launches)
    backward   `patch_merger_backward`: delta kernel, token kernel, the final partial-row sums
    fwd+bwd    the public op through autograd, as a training step runs it
it prints the wall time per call (CUDA events around `iters` back-to-back calls, no profiler
attached), and, from `torch.profiler` over the same loop, each GPU kernel's launches and device
time per call. `idle` is the wall time no kernel accounts for: the GPU waiting on the host
(Python, the custom op's dispatch, Triton's launcher) or on launch latency. `bench` and
`bench.tune` time the sum of both; the H100 run of 2026-11-25 measured the kernels 3-7x off
what their bytes and instruction counts predict, and this splits that time between the
kernels, the torch reductions that finish the backward, and the host.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from bench.tune import EPS, SHAPES, make_inputs

MODES = ("forward", "backward", "fwd+bwd")


def kernel_times(events, iters: int) -> list[dict]:
    """Per GPU kernel (`torch.profiler` events whose device type is CUDA: kernels, memsets,
    copies), its launches and device microseconds per call of the profiled function, longest
    first. `events` is `prof.events()`: anything with `name`, `device_type` and
    `time_range.elapsed_us()`."""
    calls, us = defaultdict(int), defaultdict(float)
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        calls[e.name] += 1
        us[e.name] += e.time_range.elapsed_us()
    rows = [dict(kernel=k, launches=calls[k] / iters, us=us[k] / iters) for k in us]
    return sorted(rows, key=lambda r: -r["us"])


def _wall_us(fn, iters: int) -> float:
    """Microseconds per call of `iters` back-to-back calls (after a warm-up), CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _profile(fn, iters: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return kernel_times(prof.events(), iters)


def _calls(shape: str, dev: torch.device, dtype: torch.dtype) -> dict:
    """The three profiled functions of one shape, on inputs made once."""
    import pm_kernels
    from pm_kernels.backward import patch_merger_backward
    from pm_kernels.forward import patch_merger_forward

    x, q, w, bias, dy = make_inputs(shape, dev, dtype)
    scale = x.shape[-1] ** -0.5
    y, lse, stats, qsum, _ = patch_merger_forward(x, q, w, bias, EPS, scale, save_stats=True)
    params = [t.detach().requires_grad_() for t in (x, q, w, bias)]

    def train_step():
        for t in params:            # no gradient accumulation kernels in the profile
            t.grad = None
        out = pm_kernels.patch_merger(*params, eps=EPS, scale=scale)
        out.backward(dy)

    return {
        "forward": lambda: patch_merger_forward(x, q, w, bias, EPS, scale, save_stats=True),
        "backward": lambda: patch_merger_backward(dy, x, q, w, bias, y, lse, stats, qsum, scale),
        "fwd+bwd": train_step,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["vit-b", "vit-h", "hires-8"],
                   choices=sorted(SHAPES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", help="write every measurement here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.profile measures GPU kernel times: it needs a CUDA GPU")

    from .suite import environment, write_atomic
    dev, dtype = torch.device("cuda"), torch.bfloat16
    header = dict(environment("cuda", None), dtype="bf16", iters=a.iters)
    print(f"{header['device']}, torch {header['torch']}, triton {header['triton']}, bf16, "
          f"{a.iters} calls per measurement")
    results = []

    def save():                       # after every shape: a run cut short keeps what it has
        if a.json:
            write_atomic(a.json, json.dumps(dict(header, rows=results), indent=1))
    for shape in a.shapes:
        fns = _calls(shape, dev, dtype)
        for mode in a.modes:
            wall = _wall_us(fns[mode], a.iters)
            kernels = _profile(fns[mode], a.iters)
            busy = sum(k["us"] for k in kernels)
            results.append(dict(shape=shape, mode=mode, wall_us=wall, kernel_us=busy,
                                kernels=kernels))
            print(f"\n== {shape} {mode}: {wall:8.1f} us per call, kernels {busy:8.1f} us, "
                  f"idle {max(wall - busy, 0.0):8.1f} us")
            for k in kernels:
                print(f"   {k['us']:8.1f} us  x{k['launches']:g}  {k['kernel'][:100]}")
        fns = None
        torch.cuda.empty_cache()
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
