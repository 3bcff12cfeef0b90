"""The accuracy rule of the test suite (the flash-attention rule).

A result computed at dtype `dt` is compared with a float64 reference. It may be off by at most
FACTOR[dt] times what the same math in plain PyTorch at `dt` is off by, plus atol(dt): half an
ulp of `dt` at the reference's largest magnitude (floored at 1, the scale of the test data). The
half ulp is what storing the result in `dt` costs by itself; on tiny problems (a few dozen
outputs) the baseline can be luckier than that on every entry, so without it the rule would test
luck.

FACTOR is 2 for float16 and bfloat16, where errors are dominated by rounding to the dtype and
the fused kernel rounds no more often than PyTorch does. For float32 it is 4: there the error is
accumulation-order noise of a few ulps, and an equally valid plain-PyTorch float32 formulation of
the same math (xhat-based scores, g folded into the queries) measured 0.4x to 2.8x of the
reference's error over 15 seeded cases of this suite's shapes; the kernel's worst was 3.4x.
For float64 the baseline *is* the truth, so only a roundoff-level atol applies.

On a CUDA GPU, float32 gets 8: Triton lowers fp32 division and exp2 to the approximate PTX
instructions (div.full.f32, ex2.approx.f32: up to 2 ulp each) where PyTorch's kernels round
correctly, and the kernels divide and exponentiate per score and per token. Measured on an H100
(2026-11-25, fp32 dots in full fp32): the core grid stayed within 4x, but the mean-1e4 / std-0.01
case of test_extreme_inputs reached 6.9x the error of PyTorch on the *centred* data (dbias, 5.8e-6
and 7.0e-6 against 8.4e-7 and 1.3e-6).
"""

import torch
from conftest import DEVICE

FACTOR = {torch.float16: 2.0, torch.bfloat16: 2.0, torch.float32: 4.0, torch.float64: 0.0}
if DEVICE == "cuda":
    FACTOR[torch.float32] = 8.0


def atol(dt, scale):
    ulps = 64.0 if dt == torch.float64 else 0.5
    return ulps * torch.finfo(dt).eps * max(scale, 1.0)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(name, out, baseline, ref, extra=0.0, dt=None):
    """out: our result; baseline: plain PyTorch at the same dtypes; ref: float64 truth; extra: an
    additional, separately justified absolute allowance (see its caller); dt: the precision out
    was computed at when it is stored wider (default out's dtype). The gradient of an fp32
    parameter beside fp16/bf16 x is computed from x-precision operands, so the rule is x's:
    judged by float32's FACTOR of 4 it would be allowed twice the slack the rule means."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.double()).all() or not torch.isfinite(ref).all(), f"{name}: non-finite"
    dt = dt or out.dtype
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err, base = max_err(out, ref), max_err(baseline, ref)
    bound = FACTOR[dt] * base + atol(dt, scale) + extra
    assert err <= bound, (f"{name} ({dt}): max error {err:.3e} > {FACTOR[dt]} x PyTorch's {base:.3e} "
                          f"+ atol {atol(dt, scale):.3e}")
