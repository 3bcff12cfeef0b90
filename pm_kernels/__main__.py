"""`python -m pm_kernels`: self-check of the fused op on whatever device exists.

Runs the Triton kernels on a ViT-B/16-sized problem (N = 197 tokens, D = 768, M = 8) in
float32, float16 and bfloat16, forward and backward, and prints the error of each result against
a float64 reference next to the error of plain PyTorch at the same dtype. On a GPU it also times
the fused op against the eager reference. Without a GPU the kernels run in Triton's CPU
interpreter (this command re-executes itself with TRITON_INTERPRET=1), with a small batch.
Exits non-zero if any result breaks the accuracy rule of the test suite.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _ensure_backend() -> str:
    if torch.cuda.is_available():
        return "cuda"
    import triton
    if not triton.knobs.runtime.interpret:
        # Triton picks the interpreter when kernels are decorated (at import), so re-execute.
        print("No CUDA device: re-running under Triton's CPU interpreter (TRITON_INTERPRET=1).",
              flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, "-m", "pm_kernels", *sys.argv[1:]], env)
    return "cpu"


def _grads(fn, dy, x, q, g, b):
    leaves = [t.detach().clone().requires_grad_() for t in (x, q, g, b)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item()


def check(device: str, batch: int) -> bool:
    import pm_kernels
    from pm_kernels import reference

    n, d, m = 197, 768, 8
    # The test suite's rule (tests/tolerance.py): on a GPU fp32 gets 8, since Triton lowers fp32
    # division and exp2 to approximate instructions (2 ulp) where PyTorch rounds correctly.
    factor = {torch.float32: 8.0 if device == "cuda" else 4.0, torch.float16: 2.0,
              torch.bfloat16: 2.0}
    ok = True
    print(f"\nAccuracy: B={batch}, N={n}, D={d}, M={m} on {device} "
          f"(error vs float64; 'torch' = plain PyTorch at the same dtype)")
    print(f"{'dtype':>9} {'tensor':>9} {'pm_kernels':>11} {'torch':>11}  ok")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, n, d, generator=gen).to(device, dtype)
        q = torch.randn(m, d, generator=gen).to(device, dtype)
        g = (1 + 0.1 * torch.randn(d, generator=gen)).to(device, dtype)
        b = (0.1 * torch.randn(d, generator=gen)).to(device, dtype)
        dy = torch.randn(batch, m, d, generator=gen).to(device, dtype)
        with pm_kernels.use_backend("triton"):
            ours = _grads(pm_kernels.patch_merger, dy, x, q, g, b)
        base = _grads(reference.patch_merger, dy, x, q, g, b)
        truth = _grads(reference.patch_merger, dy.double(), x.double(), q.double(), g.double(),
                       b.double())
        for name, a, bb, t in zip(("y", "dx", "dqueries", "dweight", "dbias"), ours, base, truth):
            err, berr = _max_err(a, t), _max_err(bb, t)
            bound = factor[dtype] * berr + 0.5 * torch.finfo(dtype).eps * max(t.abs().max().item(), 1)
            good = err <= bound
            ok &= good
            print(f"{str(dtype)[6:]:>9} {name:>9} {err:11.3e} {berr:11.3e}  {'yes' if good else 'NO'}")
    return ok


def timings(batch: int) -> None:
    import triton.testing

    import pm_kernels
    from pm_kernels import reference

    n, d, m = 196, 768, 8
    print(f"\nTimings on {torch.cuda.get_device_name()}: B={batch}, N={n}, D={d}, M={m}, "
          "median of triton.testing.do_bench")
    print(f"{'dtype':>9} {'mode':>8} {'pm_kernels ms':>14} {'eager ms':>9} {'speed-up':>9} "
          f"{'GB/s (ideal bytes)':>19}")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(batch, n, d, device="cuda", dtype=dtype, requires_grad=True)
        q = torch.randn(m, d, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.ones(d, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.zeros(d, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn(batch, m, d, device="cuda", dtype=dtype)
        elem = x.element_size()
        for mode in ("forward", "fwd+bwd"):
            def run(fn):
                def forward():
                    with torch.no_grad():
                        fn(x, q, g, b)

                def forward_backward():
                    # autograd.grad, not .backward(): no extra pass accumulating into x.grad.
                    torch.autograd.grad(fn(x, q, g, b), (x, q, g, b), dy)
                return forward if mode == "forward" else forward_backward
            ms = triton.testing.do_bench(run(pm_kernels.patch_merger), return_mode="median")
            ms_ref = triton.testing.do_bench(run(reference.patch_merger), return_mode="median")
            ideal = batch * (n * d + m * d) * elem * (1 if mode == "forward" else 3)
            print(f"{str(dtype)[6:]:>9} {mode:>8} {ms:14.3f} {ms_ref:9.3f} {ms_ref / ms:8.2f}x "
                  f"{ideal / ms / 1e6:19.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pm_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 256 on a GPU, 2 in the CPU interpreter)")
    args = parser.parse_args(argv)
    device = _ensure_backend()
    import triton

    import pm_kernels
    print(f"pm_kernels {pm_kernels.__version__}, torch {torch.__version__}, triton "
          f"{triton.__version__}, device: "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (Triton interpreter)'}")
    batch = args.batch or (256 if device == "cuda" else 2)
    ok = check(device, batch)
    if device == "cuda":
        timings(batch)
    else:
        print("\nTimings need a CUDA GPU; none found, so none are reported.")
    print("\nself-check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
