"""CPU timings of the C++ reference against the eager PyTorch reference (informative only).

Both are oracles, not products: the C++ code runs scalar double-precision loops, the eager
reference calls float32 BLAS, so the eager one is expected to be faster. The point of this table
is that the C++ reference stays cheap enough to check ViT-sized problems in the test suite.

    python bench/cpu_reference.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pm_kernels._cpp_reference import cpp_backward, cpp_forward  # noqa: E402
from pm_kernels.reference import patch_merger  # noqa: E402

# (B, N, D, M)
SIZES = [
    (2, 196, 768, 8),
    (1, 576, 1024, 16),
    (8, 196, 384, 8),
]


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):  # warm-up: thread pools, allocator, and on first use the C++ build
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _bench_size(b, n, d, m, reps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=g)
    queries = torch.randn(m, d, generator=g)
    weight = 1.0 + 0.1 * torch.randn(d, generator=g)
    bias = 0.1 * torch.randn(d, generator=g)
    dy = torch.randn(b, m, d, generator=g)

    def eager_fwd():
        with torch.no_grad():
            patch_merger(x, queries, weight, bias)

    leaves = [t.clone().requires_grad_() for t in (x, queries, weight, bias)]

    def eager_fwd_bwd():
        for t in leaves:
            t.grad = None
        patch_merger(*leaves).backward(dy)

    def cpp_fwd():
        cpp_forward(x, queries, weight, bias)

    def cpp_fwd_bwd():
        cpp_forward(x, queries, weight, bias)
        cpp_backward(dy, x, queries, weight, bias)

    row = dict(B=b, N=n, D=d, M=m, dtype="float32")
    row["eager_fwd_ms"] = _median_ms(eager_fwd, reps)
    row["cpp_fwd_ms"] = _median_ms(cpp_fwd, reps)
    row["eager_fwd_bwd_ms"] = _median_ms(eager_fwd_bwd, reps)
    row["cpp_fwd_bwd_ms"] = _median_ms(cpp_fwd_bwd, reps)
    return row


def run(quick: bool = False) -> list[dict]:
    """Time every size; `quick` keeps the first size and fewer repetitions. Prints and returns the
    rows (times in milliseconds, median of the repetitions)."""
    sizes = SIZES[:1] if quick else SIZES
    reps = 3 if quick else 7
    rows = [_bench_size(*size, reps) for size in sizes]
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    print(f"PatchMerger CPU references, float32, {torch.get_num_threads()} threads "
          "(median ms; C++ computes in double)")
    header = (f"{'B':>3} {'N':>5} {'D':>5} {'M':>3} | {'eager fwd':>10} {'C++ fwd':>10} | "
              f"{'eager f+b':>10} {'C++ f+b':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['B']:>3} {r['N']:>5} {r['D']:>5} {r['M']:>3} | "
              f"{r['eager_fwd_ms']:>10.2f} {r['cpp_fwd_ms']:>10.2f} | "
              f"{r['eager_fwd_bwd_ms']:>10.2f} {r['cpp_fwd_bwd_ms']:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, fewer repetitions")
    run(quick=parser.parse_args().quick)
