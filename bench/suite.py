"""The PatchMerger benchmark: providers, cases, modes, timing, results and targets.

    python -m bench [--quick] [--modes forward backward] [--providers pm_kernels eager]
                    [--dtype bf16] [--cases NAME ...] [--groups GROUP ...]
                    [--save] [--out DIR] [--append]
    python -m bench --report bench/results/<gpu>-<date>.json [--groups paper]

Providers (one callable y = f(x, queries, weight, bias) each, except the C++ reference):
    pm_kernels  the fused Triton kernels (`pm_kernels.patch_merger`); CUDA only
    eager       the PyTorch reference (`pm_kernels.reference.patch_merger`)
    compile     torch.compile(reference, mode="max-autotune-no-cudagraphs"), static shapes,
                recompiled per case (two graphs each, autotuned: minutes per case the first
                time; narrow a run with --cases / --providers)
    sdpa        LayerNorm, then F.scaled_dot_product_attention with the queries expanded over the
                batch and K = V = LN(x) (what one would write with stock attention)
    cpp         the C++ reference (`pm_kernels.reference.cpp_patch_merger` and its backward), on
                CPU tensors; an oracle, timed for reference only
Modes:
    forward     forward with grad-requiring inputs (what a training step runs)
    backward    backward only (gradients of x, queries, weight, bias for a given dy)
    fwd+bwd     both, as one training step of the op
    inference   forward under torch.no_grad()

Timing: `triton.testing.do_bench` (which flushes L2 between runs), median and 20th / 80th
percentiles. Bandwidth: the *ideal* bytes of the mode (`pm_kernels.roofline`: read x once, write
y; backward: read x and dy, write dx; plus parameters) over the median time, and that as a
fraction of the copy bandwidth measured in the same run (a large `Tensor.copy_`). Peak memory
(CUDA): extra bytes allocated during one fwd+bwd call. Every provider runs under try/except: a
failure (OOM, unsupported head size, ...) is recorded in its row and the run goes on.

Without a GPU only the CPU providers run (eager, C++ reference; torch.compile when asked for), at
batch-scaled-down sizes, and results are written only with --save.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pm_kernels
from pm_kernels import reference, roofline

PROVIDERS = ("pm_kernels", "eager", "compile", "sdpa", "cpp")
MODES = ("forward", "backward", "fwd+bwd", "inference")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EPS = 1e-5

# Targets for the fused kernels (printed, never asserted: they are goals, measured per GPU).
TARGETS = {
    "forward": dict(bw=0.85, eager=3.0, compile=1.5, sdpa=1.0),
    "backward": dict(eager=3.0, compile=1.5, sdpa=1.0),
    "fwd+bwd": dict(sdpa=1.0, peak_below_eager=True),
    "inference": dict(sdpa=1.0),
}


class Unavailable(Exception):
    """A provider / mode combination that cannot run here (not a failure: the row says why)."""


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    group: str
    b: int
    n: int
    d: int
    m: int


def gpu_cases(quick: bool = False) -> list[Case]:
    """The paper's settings (Renggli et al.: PatchMerger with M = 8 at 224 px, batch 256),
    high-resolution token counts with small batches, and sweeps over N, D and M."""
    paper = [Case("ViT-B/16", "paper", 256, 196, 768, 8),
             Case("ViT-L/16", "paper", 256, 196, 1024, 8),
             Case("ViT-H/14", "paper", 256, 256, 1280, 8),
             Case("ViT-g/14", "paper", 256, 256, 1408, 8)]
    highres = [Case(f"hires-N{n}-B{b}", "highres", b, n, 1024, 8)
               for n in (1024, 4096) for b in (1, 8)]
    if quick:
        return [paper[0], highres[1]]
    sweep_n = [Case(f"sweep-N{n}", "sweep-N", 64, n, 768, 8) for n in (196, 576, 1024, 4096)]
    sweep_d = [Case(f"sweep-D{d}", "sweep-D", 256, 196, d, 8)
               for d in (384, 768, 1024, 1280, 1664, 4096)]
    sweep_m = [Case(f"sweep-M{m}", "sweep-M", 256, 196, 768, m) for m in (1, 8, 16, 64, 256)]
    return paper + highres + sweep_n + sweep_d + sweep_m


def cpu_cases(quick: bool = False) -> list[Case]:
    """CPU stand-ins: the same model widths at batch 2 (the C++ reference runs scalar double
    loops; full paper batches would take minutes per call)."""
    cases = [Case("ViT-B/16 (B=2)", "paper", 2, 196, 768, 8),
             Case("ViT-L/16 (B=2)", "paper", 2, 196, 1024, 8),
             Case("hires-N1024-B1", "highres", 1, 1024, 768, 8)]
    return cases[:1] if quick else cases


# ----------------------------------------------------------------------------------------------
# Providers and modes
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    x: torch.Tensor
    queries: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    dy: torch.Tensor

    @property
    def leaves(self):
        return (self.x, self.queries, self.weight, self.bias)


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    d = case.d
    return Inputs(x=rnd(case.b, case.n, d), queries=rnd(case.m, d, scale=d ** -0.5),
                  weight=rnd(d, scale=0.1, shift=1.0), bias=rnd(d, scale=0.1),
                  dy=torch.randn(case.b, case.m, d, generator=g).to(device=device, dtype=dtype))


def sdpa_patch_merger(x, queries, weight, bias, *, eps=EPS, scale=None):
    """The PatchMerger as stock attention: one head of width D, queries shared over the batch."""
    b, n, d = x.shape
    scale = d ** -0.5 if scale is None else scale
    xn = F.layer_norm(x, (d,), weight, bias, eps).unsqueeze(1)        # (B, 1, N, D)
    q = queries.expand(b, 1, *queries.shape)                           # (B, 1, M, D)
    return F.scaled_dot_product_attention(q, xn, xn, scale=scale).squeeze(1)


_compiled = {}


def _compiled_reference(device_type: str):
    # One compiled function per case (`run` resets dynamo between cases), static shapes. On CPU
    # mode "default": max-autotune would benchmark GEMM templates for minutes per graph there.
    if device_type not in _compiled:
        mode = "max-autotune-no-cudagraphs" if device_type == "cuda" else "default"
        _compiled[device_type] = torch.compile(reference.patch_merger, mode=mode, dynamic=False)
    return _compiled[device_type]


def forward_fn(provider: str, device_type: str):
    """y = f(x, queries, weight, bias) for an autograd provider."""
    if provider == "pm_kernels":
        if device_type != "cuda":
            raise Unavailable("Triton timings need a CUDA GPU; none found")
        return lambda x, q, w, b: pm_kernels.patch_merger(x, q, w, b, eps=EPS)
    if provider == "eager":
        return lambda x, q, w, b: reference.patch_merger(x, q, w, b, eps=EPS)
    if provider == "compile":
        fn = _compiled_reference(device_type)
        return lambda x, q, w, b: fn(x, q, w, b, eps=EPS)
    if provider == "sdpa":
        return lambda x, q, w, b: sdpa_patch_merger(x, q, w, b, eps=EPS)
    raise ValueError(provider)


def make_bench_fn(provider: str, mode: str, inp: Inputs):
    """A no-argument callable running one `mode` step of `provider` on `inp`."""
    dev = inp.x.device.type
    if provider == "cpp":
        if dev != "cpu":
            raise Unavailable("the C++ reference runs on CPU tensors only")
        x, q, w, b = (t.detach() for t in inp.leaves)
        fwd = lambda: reference.cpp_patch_merger(x, q, w, b, eps=EPS)  # noqa: E731
        bwd = lambda: reference.cpp_patch_merger_backward(inp.dy, x, q, w, b, eps=EPS)  # noqa
        if mode in ("forward", "inference"):
            return fwd
        if mode == "backward":
            return bwd
        return lambda: (fwd(), bwd())

    f = forward_fn(provider, dev)
    leaves = inp.leaves
    if mode == "forward":
        return lambda: f(*leaves)
    if mode == "inference":
        def run():
            with torch.no_grad():
                return f(*leaves)
        return run
    if mode == "backward":
        y = f(*leaves)

        def run():
            return torch.autograd.grad(y, leaves, inp.dy, retain_graph=True)
        return run
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(f(*leaves), leaves, inp.dy)
    raise ValueError(mode)


# ----------------------------------------------------------------------------------------------
# Timing and bandwidth
# ----------------------------------------------------------------------------------------------

QUANTILES = [0.5, 0.2, 0.8]


def time_ms(fn, device_type: str, quick: bool = False) -> list[float]:
    """[median, p20, p80] milliseconds."""
    if device_type == "cuda":
        import triton.testing
        return list(triton.testing.do_bench(fn, warmup=10 if quick else 25,
                                            rep=40 if quick else 100, quantiles=QUANTILES))
    fn()                                  # warm-up (thread pools, allocator, C++ build)
    times, t_end = [], time.perf_counter() + (0.3 if quick else 1.0)
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def host_ms(fn, calls: int = 20) -> float:
    """CPU milliseconds to issue one call (CUDA): the wall time of `calls` calls with no
    synchronisation in between. When this is close to the timed median, the row measured the
    host (Python, dispatch, launches), not the GPU."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e3 * elapsed / calls


def graph_ms(fn) -> float | None:
    """GPU milliseconds of one call with the host taken out: `fn` captured in a CUDA graph and
    the replay timed (None if the call cannot be captured)."""
    import triton.testing
    try:
        fn()                                          # compile / allocate outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")
    except Exception as e:            # not capturable: say so, time the rest as usual
        print(f"  (no CUDA-graph time: {_error_text(e)})")
        torch.cuda.synchronize()
        return None


def copy_bandwidth_gbs(device_type: str) -> float:
    """Device copy bandwidth (read + write bytes / time) of a large `copy_`, the practical
    ceiling of a memory-bound kernel on this device."""
    n = (1 << 30) if device_type == "cuda" else (1 << 26)      # bytes per buffer
    src = torch.empty(n, dtype=torch.uint8, device=device_type)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device_type)[0]
    src = dst = None
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3) / 1e9


def ideal_bytes(case: Case, mode: str, dtype: torch.dtype) -> int:
    fwd = roofline.forward_bytes(case.b, case.n, case.d, case.m, dtype, sms=1).ideal_bytes
    bwd = roofline.backward_bytes(case.b, case.n, case.d, case.m, dtype, sms=1).ideal_bytes
    return {"forward": fwd, "inference": fwd, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def designed_bytes(case: Case, mode: str, dtype: torch.dtype, device) -> int | None:
    """DRAM bytes our kernels are designed to move for this launch (heuristics of `device`)."""
    if torch.device(device).type != "cuda":
        return None
    fwd = roofline.forward_bytes(case.b, case.n, case.d, case.m, dtype, device=device).dram_bytes
    inf = roofline.forward_bytes(case.b, case.n, case.d, case.m, dtype, device=device,
                                 save_stats=False).dram_bytes
    bwd = roofline.backward_bytes(case.b, case.n, case.d, case.m, dtype,
                                  device=device).dram_bytes
    return {"forward": fwd, "inference": inf, "backward": bwd, "fwd+bwd": fwd + bwd}[mode]


def peak_memory_mb(fn, device_type: str) -> float | None:
    """Extra memory allocated at the peak of one call (CUDA caching allocator statistics)."""
    if device_type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def max_error(provider: str, inp: Inputs, expected: torch.Tensor | None) -> float | None:
    """Max |y - y_eager| of the forward output (a sanity check that we time a correct op)."""
    if expected is None:
        return None
    with torch.no_grad():
        if provider == "cpp":
            y = reference.cpp_patch_merger(*(t.detach() for t in inp.leaves), eps=EPS)
        else:
            y = forward_fn(provider, inp.x.device.type)(*inp.leaves)
    return float((y.float() - expected.float()).abs().max())


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"[:200]


def _release(device_type: str):
    if device_type == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:        # a sticky CUDA error: the next rows will say so too
            print(f"  (synchronize failed: {_error_text(e)})")


def run(cases, modes, providers, dtype: torch.dtype, device: str, quick: bool = False,
        log=print, on_case=None) -> list[dict]:
    """Benchmark every (case, provider, mode); returns one row per combination. `on_case(rows)`
    is called with the rows so far after each case (the command line writes the results
    files then, so a run cut short by a time limit keeps every finished case)."""
    dev = torch.device(device).type
    rows = []
    for case in cases:
        log(f"\n== {case.name}: B={case.b} N={case.n} D={case.d} M={case.m} "
            f"{str(dtype).replace('torch.', '')}")
        try:
            inp = make_inputs(case, dtype, device)
        except Exception as e:        # e.g. out of memory for the inputs themselves
            for mode in modes:
                for prov in providers:
                    rows.append(_row(case, mode, prov, dtype, error=_error_text(e)))
            _release(dev)
            continue
        try:
            with torch.no_grad():
                expected = reference.patch_merger(*inp.leaves, eps=EPS)
        except Exception:             # eager itself out of memory: time the others anyway
            expected = None
        # Fresh torch.compile state per case: dynamo would otherwise turn on dynamic shapes at
        # the second shape, and silently fall back to eager past its recompile limit.
        torch._dynamo.reset()
        _compiled.clear()
        for prov in providers:
            err = None
            try:
                err = max_error(prov, inp, expected)
            except Unavailable:
                pass
            except Exception as e:
                err = _error_text(e)
            for mode in modes:
                row = _row(case, mode, prov, dtype, check=err)
                try:
                    fn = make_bench_fn(prov, mode, inp)
                    med, p20, p80 = time_ms(fn, dev, quick)
                    row.update(ms=med, ms_p20=p20, ms_p80=p80)
                    if dev == "cuda":
                        row["host_ms"] = host_ms(fn)
                        if prov == "pm_kernels" and mode == "inference":
                            row["graph_ms"] = graph_ms(fn)
                    if mode == "fwd+bwd":
                        row["peak_mb"] = peak_memory_mb(fn, dev)
                    if prov == "pm_kernels":
                        row["designed_bytes"] = designed_bytes(case, mode, dtype, device)
                    del fn
                except Unavailable as e:
                    row["skipped"] = str(e)
                except Exception as e:   # OOM, unsupported shape, compile failure: keep going
                    row["error"] = _error_text(e)
                _release(dev)
                rows.append(row)
                log("  " + _row_text(row))
        del inp, expected
        _release(dev)
        if on_case is not None:
            on_case(rows)
    return rows


def _row(case, mode, provider, dtype, **extra):
    r = dict(case=case.name, group=case.group, B=case.b, N=case.n, D=case.d, M=case.m,
             dtype=str(dtype).replace("torch.", ""), mode=mode, provider=provider, ms=None,
             ms_p20=None, ms_p80=None, ideal_bytes=ideal_bytes(case, mode, dtype),
             designed_bytes=None, gbps=None, pct_copy_bw=None, speedup_vs_eager=None,
             speedup_vs_compile=None, speedup_vs_sdpa=None, peak_mb=None, host_ms=None,
             graph_ms=None, check=None, skipped=None, error=None)
    r.update(extra)
    return r


def _row_text(r) -> str:
    head = f"{r['mode']:<9} {r['provider']:<10}"
    if r["skipped"]:
        return f"{head} skipped: {r['skipped']}"
    if r["error"]:
        return f"{head} ERROR {r['error']}"
    peak = f"  peak {r['peak_mb']:.0f} MiB" if r["peak_mb"] is not None else ""
    host = f"  host {r['host_ms']:.3f} ms/call" if r.get("host_ms") is not None else ""
    graph = f"  graph {r['graph_ms']:.3f} ms" if r.get("graph_ms") is not None else ""
    return (f"{head} {r['ms']:9.3f} ms  [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}]"
            f"  {r['ideal_bytes'] / (r['ms'] * 1e-3) / 1e9:8.3g} GB/s{peak}{host}{graph}")


def finish(rows: list[dict], copy_gbs: float) -> None:
    """Fill in bandwidth and speed-ups (relative to the other providers of the same case/mode).
    Rows that already carry a bandwidth figure (merged from an earlier run by --append) keep it:
    each row's % of copy bandwidth is relative to the copy measured in its own run."""
    by_key = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        if r["ms"] is None:
            continue
        r["gbps"] = r["ideal_bytes"] / (r["ms"] * 1e-3) / 1e9
        if r["pct_copy_bw"] is None:
            r["pct_copy_bw"] = 100 * r["gbps"] / copy_gbs if copy_gbs else None
        for other in ("eager", "compile", "sdpa"):
            o = by_key.get((r["case"], r["mode"], other))
            if o and o["ms"]:
                r[f"speedup_vs_{other}"] = o["ms"] / r["ms"]


def targets_table(rows: list[dict]) -> str:
    """pm_kernels against the project targets, per case and mode (printed, not asserted)."""
    by_key = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    lines = []
    for r in rows:
        if r["provider"] != "pm_kernels" or r["mode"] not in TARGETS:
            continue
        t = TARGETS[r["mode"]]
        if r["ms"] is None:
            lines.append(f"{r['case']:<22} {r['mode']:<9} not measured "
                         f"({r['skipped'] or r['error']})")
            continue
        checks = []
        if "bw" in t and r["pct_copy_bw"] is not None:
            checks.append(_check(f"{r['pct_copy_bw']:.0f}% of copy BW", r["pct_copy_bw"] / 100,
                                 t["bw"], f">= {100 * t['bw']:.0f}%"))
        for other in ("eager", "compile", "sdpa"):
            if other in t:
                s = r[f"speedup_vs_{other}"]
                goal = "faster" if t[other] == 1.0 else f">= {t[other]:g}x"
                checks.append(_check(f"{s:.2f}x {other}" if s else f"- {other}", s, t[other],
                                     goal, strict=t[other] == 1.0))
        if t.get("peak_below_eager"):
            e = by_key.get((r["case"], r["mode"], "eager"))
            ok = (r["peak_mb"] is not None and e is not None and e["peak_mb"] is not None)
            checks.append(f"peak {r['peak_mb']:.0f} vs eager {e['peak_mb']:.0f} MiB "
                          f"[{'ok' if r['peak_mb'] < e['peak_mb'] else 'MISS'}]"
                          if ok else "peak memory - [n/a]")
        lines.append(f"{r['case']:<22} {r['mode']:<9} " + "; ".join(checks))
    if not lines:
        return "targets: no pm_kernels measurements (Triton timings need a CUDA GPU)"
    return "targets (forward >= 85% copy BW, >= 3x eager, >= 1.5x torch.compile; backward >= 3x " \
           "eager, >= 1.5x torch.compile; fwd+bwd peak memory below eager; faster than SDPA " \
           "in every mode):\n" + "\n".join("  " + x for x in lines)


def _check(text, value, goal, goal_text, strict=False):
    if value is None:
        return f"{text} [n/a]"
    ok = value > goal if strict else value >= goal
    return f"{text} [{'ok' if ok else 'MISS'} {goal_text}]"


# ----------------------------------------------------------------------------------------------
# Results: CSV, JSON, plot
# ----------------------------------------------------------------------------------------------

def environment(device_type: str, copy_gbs: float) -> dict:
    import triton
    name = torch.cuda.get_device_name() if device_type == "cuda" else (
        platform.processor() or platform.machine() or "cpu")
    return dict(device=name, device_type=device_type, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(),
                date=datetime.date.today().isoformat(),
                copy_bandwidth_gbs=copy_gbs, cpu_threads=torch.get_num_threads())


def results_stem(env: dict) -> str:
    return ("cpu" if env["device_type"] != "cuda" else slug(env["device"])) + "-" + env["date"]


def check_appendable(env: dict, dtype: torch.dtype, out_dir: Path) -> None:
    """--append merges only runs of the same device, versions and input dtype (rows are keyed
    by case, mode and provider). Checked before the benchmark runs, not after."""
    path = out_dir / f"{results_stem(env)}.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    old_env = old["environment"]
    if (old_env["torch"], old_env["triton"], old_env["device"]) != (
            env["torch"], env["triton"], env["device"]):
        raise SystemExit(f"--append: {path} was measured with another device or versions")
    name = str(dtype).replace("torch.", "")
    if any(r["dtype"] != name for r in old["rows"]):
        raise SystemExit(f"--append: {path} holds rows of another dtype than {name}")


def load_results(env: dict, out_dir: Path) -> dict | None:
    """The results file of this device and day in `out_dir`, or None."""
    path = out_dir / f"{results_stem(env)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def merge_results(rows: list[dict], env: dict, out_dir: Path,
                  previous: dict | None = None) -> tuple[list[dict], dict]:
    """Rows of an earlier run of the same device and day (if any) with `rows` merged in.
    `previous`: that run's file as read before this run wrote anything (the command line
    writes after every case; {} for none), else it is read from `out_dir` now."""
    path = out_dir / f"{results_stem(env)}.json"
    old = load_results(env, out_dir) if previous is None else previous
    if not old:
        return rows, env
    if rows:
        check_appendable(env, getattr(torch, rows[0]["dtype"]), out_dir)
    old_env = old["environment"]
    new_keys = {(r["case"], r["mode"], r["provider"]) for r in rows}
    merged = [r for r in old["rows"] if (r["case"], r["mode"], r["provider"]) not in new_keys]
    merged += rows
    case_order = {c: i for i, c in enumerate(dict.fromkeys(
        [c.name for c in gpu_cases()] + [r["case"] for r in merged]))}
    merged.sort(key=lambda r: (case_order[r["case"]], MODES.index(r["mode"]),
                               PROVIDERS.index(r["provider"])))
    runs = old_env.get("copy_bandwidth_runs_gbs", [old_env["copy_bandwidth_gbs"]])
    env = dict(env, copy_bandwidth_runs_gbs=runs + [env["copy_bandwidth_gbs"]])
    print(f"--append: merged {len(rows)} new rows into {len(merged) - len(rows)} from {path}")
    return merged, env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_atomic(path, text: str) -> None:
    """Replace `path` with `text` all at once: a time limit that strikes mid-write (the results
    are rewritten after every case) must not leave a truncated file, which --append would then
    fail to read, losing the earlier runs' rows."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_results(rows, env, out_dir: Path, with_plot: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(env)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv"]
    write_atomic(paths[0], json.dumps(dict(environment=env, rows=rows), indent=1))
    buf = io.StringIO(newline="")
    # header record first (commented), then one row per (case, mode, provider)
    buf.write("# " + json.dumps(env) + "\n")
    # The union of the rows' keys: rows merged from an older file may lack newer columns.
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_atomic(paths[1], buf.getvalue())
    png = plot(rows, env, out_dir / f"{stem}.png") if with_plot else None
    if png:
        paths.append(png)
    return paths


def plot(rows, env, path: Path) -> Path | None:
    """Speed-up over eager per mode and % of copy bandwidth (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib); CSV/JSON written")
        return None
    modes = [m for m in MODES if any(r["mode"] == m and r["ms"] for r in rows)]
    if not modes:
        print("no timed row: no plot")
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = [p for p in PROVIDERS if p != "eager" and any(r["provider"] == p and r["ms"]
                                                            for r in rows)]
    fig, axes = plt.subplots(len(modes) + 1, 1, figsize=(max(8, 0.7 * len(cases)),
                                                         3.2 * (len(modes) + 1)), squeeze=False)
    by_key = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    width = 0.8 / max(1, len(provs))
    for ax, mode in zip(axes[:, 0], modes):
        for i, p in enumerate(provs):
            ys = [(by_key.get((c, mode, p)) or {}).get("speedup_vs_eager") or 0 for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(f"{mode}\nspeed-up vs eager")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    # Bandwidth: ideal bytes / time as % of the measured copy bandwidth, every provider, in the
    # forward mode (the 85 % target line is the forward target of the fused kernels).
    ax = axes[-1, 0]
    bw_mode = "forward" if "forward" in modes else modes[0]
    bw_provs = [p for p in PROVIDERS if any(r["provider"] == p and r["ms"] for r in rows)]
    width_bw = 0.8 / max(1, len(bw_provs))
    for i, p in enumerate(bw_provs):
        ys = [(by_key.get((c, bw_mode, p)) or {}).get("pct_copy_bw") or 0 for c in cases]
        ax.bar([j + i * width_bw for j in range(len(cases))], ys, width_bw, label=p)
    ax.axhline(85, color="r", lw=0.8, ls="--")
    ax.set_ylabel(f"{bw_mode}\n% of copy bandwidth")
    ax.set_xticks([j + 0.4 - width_bw / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
    ax.legend(fontsize=7)
    fig.suptitle(f"PatchMerger, {env['device']}, {rows[0]['dtype']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two cases, shorter timing")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS,
                   help="default: all on CUDA; eager and cpp on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="input dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cases", nargs="+", metavar="NAME",
                   help="only these cases (names as printed, e.g. ViT-B/16 sweep-M64)")
    p.add_argument("--groups", nargs="+", metavar="GROUP",
                   help="only the cases of these groups (paper, highres, sweep-N, sweep-D, "
                        "sweep-M)")
    p.add_argument("--save", action="store_true",
                   help="write results on a CPU-only machine too (always written with a GPU)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--append", action="store_true",
                   help="merge into this GPU's and day's results file in --out: rows of the same "
                        "(case, mode, provider) are replaced, the others kept (lets a long run, "
                        "e.g. the torch.compile provider, be split over several invocations)")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="print the markdown table of a results file (the README's) and exit; "
                        "--groups picks the cases (default: paper)")
    p.add_argument("--plot", type=Path, metavar="JSON",
                   help="draw the PNG of a results file beside it and exit (a run cut short by "
                        "a time limit writes JSON and CSV after every case, the plot at the end)")
    a = p.parse_args(argv)
    if a.report:
        print(markdown_report(a.report, tuple(a.groups or ("paper",))))
        return 0
    if a.plot:
        data = json.loads(a.plot.read_text())
        path = plot(data["rows"], data["environment"], a.plot.with_suffix(".png"))
        return 0 if path else 1

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        print("Triton timings need a CUDA GPU; none found. Running the CPU providers only, at "
              "small sizes (batch 2).")
    providers = a.providers or (list(PROVIDERS) if cuda else ["eager", "cpp"])
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    cases = gpu_cases(a.quick) if cuda else cpu_cases(a.quick)
    if a.cases or a.groups:           # both filters apply when both are given
        all_cases = gpu_cases() if cuda else cpu_cases()
        cases = [c for c in all_cases if (not a.cases or c.name in a.cases)
                 and (not a.groups or c.group in a.groups)]
        if not cases:
            p.error(f"no case matches --cases {a.cases} --groups {a.groups}; known: "
                    f"{[(c.name, c.group) for c in all_cases]}")

    copy_gbs = copy_bandwidth_gbs(dev)
    env = environment(dev, copy_gbs)
    previous = {}
    if a.append:
        check_appendable(env, dtype, a.out)
        previous = load_results(env, a.out) or {}
    print(f"{env['device']}: copy bandwidth {copy_gbs:.0f} GB/s; torch {env['torch']}, triton "
          f"{env['triton']}, CUDA {env['cuda']}")
    write = cuda or a.save

    def merged(rows_now):
        out = merge_results(rows_now, env, a.out, previous) if a.append else (rows_now, env)
        finish(out[0], copy_gbs)
        return out

    def save_partial(rows_now):        # after every case: a time limit loses only the last one
        if write and rows_now:
            write_results(*merged(rows_now), a.out, with_plot=False)

    rows, env_out = merged(run(cases, a.modes, providers, dtype, dev, quick=a.quick,
                               on_case=save_partial))
    print()
    print(summary_table(rows))
    print()
    print(targets_table(rows))
    if write:
        for path in write_results(rows, env_out, a.out):
            print(f"wrote {path}")
    else:
        print("\n(results not written: CPU-only run; pass --save to keep them)")
    return 0


def summary_table(rows) -> str:
    head = (f"{'case':<22} {'mode':<9} {'provider':<10} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
            f"{'x eager':>8} {'x compile':>9} {'x sdpa':>7} {'peak MiB':>9} {'max|y-eager|':>12}")
    out = [head, "-" * len(head)]
    fmt = lambda v, f: (format(v, f) if isinstance(v, (int, float)) and not (  # noqa: E731
        isinstance(v, float) and math.isnan(v)) else "-")
    for r in rows:
        if r["ms"] is None:
            why = r["skipped"] or r["error"]
            out.append(f"{r['case']:<22} {r['mode']:<9} {r['provider']:<10} {why}")
            continue
        check = r["check"] if isinstance(r["check"], str) else fmt(r["check"], "12.2e")
        out.append(f"{r['case']:<22} {r['mode']:<9} {r['provider']:<10} {r['ms']:>9.3f} "
                   f"{fmt(r['gbps'], '8.3g'):>8} {fmt(r['pct_copy_bw'], '5.1f'):>6} "
                   f"{fmt(r['speedup_vs_eager'], '7.2f'):>8} "
                   f"{fmt(r['speedup_vs_compile'], '8.2f'):>9} "
                   f"{fmt(r['speedup_vs_sdpa'], '6.2f'):>7} {fmt(r['peak_mb'], '9.0f'):>9} "
                   f"{check:>12}")
    return "\n".join(out)


def markdown_report(path: Path, groups=("paper",)) -> str:
    """The README's GPU table, generated from a results JSON (figures are never typed in by
    hand): per case and mode, the time of every provider, pm_kernels' % of copy bandwidth and
    its speed-ups, and the forward+backward peak memory."""
    data = json.loads(Path(path).read_text())
    env, rows = data["environment"], data["rows"]
    by_key = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    cases = list(dict.fromkeys(r["case"] for r in rows if r["group"] in groups))
    ms = lambda r: f"{r['ms']:.3f}" if r and r["ms"] else "-"          # noqa: E731
    x = lambda v: f"{v:.2f}x" if v else "-"                              # noqa: E731
    out = [f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
           f"{rows[0]['dtype'] if rows else ''}, {env['date']} (`{Path(path).name}`); "
           "times in ms (median), '-' = not measured.", "",
           "| case | mode | pm_kernels | eager | compile | sdpa | % copy BW | vs eager "
           "| vs compile | vs sdpa | peak MiB (ours / eager) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        for mode in MODES:
            r = by_key.get((case, mode, "pm_kernels"))
            if r is None:
                continue
            e = by_key.get((case, mode, "eager"))
            peak = (f"{r['peak_mb']:.0f} / {e['peak_mb']:.0f}"
                    if r.get("peak_mb") and e and e.get("peak_mb") else "")
            pct = f"{r['pct_copy_bw']:.1f}" if r.get("pct_copy_bw") else "-"
            out.append(f"| {case} | {mode} | {ms(r)} | {ms(e)} "
                       f"| {ms(by_key.get((case, mode, 'compile')))} "
                       f"| {ms(by_key.get((case, mode, 'sdpa')))} | {pct} "
                       f"| {x(r['speedup_vs_eager'])} | {x(r['speedup_vs_compile'])} "
                       f"| {x(r['speedup_vs_sdpa'])} | {peak} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
