"""pytest-benchmark entries for the same cases, modes and providers as `python -m bench`.

    pytest bench/test_bench.py                        # everything that can run here
    pytest bench/test_bench.py -k "ViT-B and fwd"     # a subset
    PM_BENCH_QUICK=1 pytest bench/test_bench.py       # the --quick cases

Not collected by the main test run (pyproject's testpaths = tests). With a GPU the cases are the
GPU cases; without one the CPU stand-ins, and providers that need CUDA are skipped. CUDA work is
synchronised inside the timed function, so pytest-benchmark's wall clock measures the kernels.
"""

import os

import pytest
import torch

from bench import suite

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = suite.DTYPES[os.environ.get("PM_BENCH_DTYPE", "bf16" if CUDA else "fp32")]
QUICK = os.environ.get("PM_BENCH_QUICK", "0") not in ("", "0")
CASES = suite.gpu_cases(QUICK) if CUDA else suite.cpu_cases(QUICK)

_inputs = {}


def _get_inputs(case):
    # One set of inputs per case, reused by every provider and mode (allocation is not timed).
    if case not in _inputs:
        _inputs.clear()
        if CUDA:
            torch.cuda.empty_cache()
        _inputs[case] = suite.make_inputs(case, DTYPE, DEVICE)
    return _inputs[case]


@pytest.mark.parametrize("provider", suite.PROVIDERS)
@pytest.mark.parametrize("mode", suite.MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace("/", "-").replace(" ", ""))
def test_patch_merger(benchmark, case, mode, provider):
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile is benchmarked on CUDA only here (CPU: python -m bench "
                    "--providers compile)")
    try:
        fn = suite.make_bench_fn(provider, mode, _get_inputs(case))
    except suite.Unavailable as e:
        pytest.skip(str(e))

    def step():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(B=case.b, N=case.n, D=case.d, M=case.m, dtype=str(DTYPE),
                                ideal_bytes=suite.ideal_bytes(case, mode, DTYPE))
    benchmark(step)
