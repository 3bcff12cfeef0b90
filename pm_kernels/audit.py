"""Compile audit: registers, spills and shared memory of every binary the launch heuristics pick.

    python -m pm_kernels.audit [--quick] [--arch 80 90] [--dtype fp16 bf16] [--json PATH]

No GPU is needed. Triton compiles to PTX and cubin for any NVIDIA target on a CPU-only machine;
ptxas reports the registers and spill bytes of each kernel, and the compiled metadata has its
shared memory. The audit answers, before anything runs on a device: does any configuration the
heuristics (GPU branch of `heuristics.py`) can choose spill registers to local memory, or ask for
more shared memory per block than the architecture has (a launch failure)?

How a binary is pinned down without a GPU
-----------------------------------------
A Triton binary is determined by the kernel, its constexpr arguments, the *specialisation* of its
runtime arguments (pointer dtypes; integers equal to 1 become constants; pointers and integers
divisible by 16 get an alignment hint) and the options (num_warps, num_stages, target). The audit
does not rebuild that by hand, which would drift from the code: it calls the real launchers
(`patch_merger_forward` / `patch_merger_backward`) on meta-device tensors, with each kernel's
`run` temporarily replaced by a recorder, so it sees exactly the arguments the launchers pass.
The recorded arguments then go through Triton's own binder for the target backend, the same code
`kernel[grid](...)` runs, which yields the signature, constexprs and alignment attributes of the
real launch. Shapes that give the same specialisation (most of them) share one binary, compiled
once per architecture.

Per-architecture numbers that the heuristics would read from the device (SM count, which sets
the split-N factor) come from the `ARCHS` table instead, i.e. the audit assumes the reference
part of each architecture (A100 for sm_80, H100 SXM for sm_90, ...).

Where the numbers come from
---------------------------
* registers / spill bytes: ptxas's `-v` report (`Used N registers`, `N bytes spill stores`),
  printed by Triton when TRITON_DUMP_PTXAS_LOG=1, captured at the file-descriptor level. A
  binary served from Triton's cache prints nothing, so the parsed report is kept next to the
  cache (`<cache>/ptxas-stats/<hash>.json`); if that is missing the binary is recompiled.
* shared memory: `compiled.metadata.shared` (dynamic shared memory per block, bytes).
* loop instructions: the SASS instruction count of each innermost loop (the D sweeps), from
  the cubin disassembled with the cuobjdump Triton bundles (`innermost_loops`). Not a timing,
  but the one measure of a kernel's per-step work this machine can take: a change that should
  make a sweep cheaper can be checked here before a GPU is at hand.

The compile cache is project-local (`<repo>/.triton_cache/audit`, git-ignored) unless
TRITON_CACHE_DIR is set, so re-runs (and the CI test) only compile what changed.

`TRITON_INTERPRET=1` replaces `@triton.jit` kernels by interpreter objects at import, which
cannot be compiled: under it the command line re-runs itself with the variable unset, and
`audit_subprocess()` (what the test suite uses) runs the audit in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".triton_cache" / "audit"


# ----------------------------------------------------------------------------------------------
# What is audited
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arch:
    """A compile target and the device facts the heuristics would otherwise query."""

    capability: int
    sms: int                 # SM count of the reference part (sets the split-N factor)
    smem_per_block: int      # max dynamic shared memory per block (opt-in), bytes
    part: str                # the reference part the SM count is taken from


# Shared memory per block: NVIDIA CUDA C Programming Guide, "Technical Specifications per
# Compute Capability" (maximum shared memory per thread block, opt-in).
ARCHS = {
    80: Arch(80, 108, 166912, "A100"),
    86: Arch(86, 84, 101376, "RTX 3090 / A40"),
    89: Arch(89, 128, 101376, "RTX 4090 / L40"),
    90: Arch(90, 132, 232448, "H100 SXM"),
    100: Arch(100, 148, 232448, "B200"),
    120: Arch(120, 170, 101376, "RTX 5090"),
}
DEFAULT_ARCHS = (80, 90, 100, 120)   # sm_100 / sm_120 only where the installed Triton targets them

DTYPES = ("fp16", "bf16", "fp32")
# Opt-in: "tf32" is fp32 under torch.set_float32_matmul_precision("medium") (tl.dot in one tf32
# MMA instead of fp32 FMA, a different binary), "tf32x3" fp32 under "high" (three tf32 MMAs on
# hi/lo operand splits, `heuristics.input_precision`); fp64 compiles to FMA code and is not a GPU
# target of this project, but must still compile.
EXTRA_DTYPES = ("tf32", "tf32x3", "fp64")
_FP32_PRECISION = {"tf32": "medium", "tf32x3": "high"}   # torch's setting for these names
# The model widths of the ViTs we care about (B/16, L/16, H/14, g/14, 1664 = ViT-G/14 and
# 4096 as a large-width stress case), token counts from 224 px (196, 256) to high resolution
# (4096), and the numbers of merged tokens used in practice (M = 8 / 16 in the paper), plus
# M = 32, 128 and 256 so that every BLOCK_M tier of the heuristics (16 ... 256) is compiled.
# D and N mostly do not change the binary (they are runtime arguments; only their divisibility
# by 16 is specialised), so the list is cheap: the audit compiles each distinct binary once.
D_VALUES = (768, 1024, 1280, 1408, 1664, 4096)
N_VALUES = (196, 256, 576, 1024, 4096)
M_VALUES = (1, 8, 16, 32, 64, 128, 256)
# The batch only changes the split factor, which changes the binary only through the forward's
# FINALIZE flag (tokens_per_split is always a multiple of BLOCK_N): B = 1 exercises the split
# path, B = 256 (more batch elements than any GPU has SMs) the one-program-per-element path.
B_VALUES = (1, 256)

# "Paper shapes": the PatchMerger settings of Renggli et al. (M = 8 and 16 output tokens) at the
# widths of the ViTs it was applied to. fp16/bf16 kernels must not spill there (`violations`).
PAPER_D = (768, 1024, 1280, 1408, 1664)
PAPER_M = (8, 16)

# Subset for --quick and the CI test: every kernel and both block_m tiers of the paper, at the
# two token counts whose specialisation differs (196 is not a multiple of 16, 1024 is).
QUICK = dict(d=(768, 1280), n=(196, 1024), m=(8, 16), b=(1, 256), dtypes=("fp16", "bf16"),
             archs=(80, 90))

# Argument variants that change the binary: a launch with an affine LayerNorm in x's dtype is the
# common case; "amp" is autocast training (fp16/bf16 x, fp32 parameters); "mask" a key-padding
# mask; "no-affine" LayerNorm without weight/bias; "frozen-x" a backward without dx (x needs no
# gradient: fewer live registers, 146-158 against 162-218 at the paper's shapes); "inference" the
# forward alone, without the statistics a training forward saves for the backward (its own
# binary: no SAVE_STATS stores).
VARIANTS = ("affine", "amp", "mask", "no-affine", "frozen-x", "inference")
DEFAULT_VARIANTS = ("affine", "amp", "inference")


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    n: int
    d: int
    m: int


def _torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            "tf32": torch.float32, "tf32x3": torch.float32, "fp64": torch.float64}[name]


@contextlib.contextmanager
def _matmul_precision(dtype: str):
    """fp32 launches pick tl.dot's input precision from torch's fp32 matmul precision."""
    import torch
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_FP32_PRECISION.get(dtype, "highest"))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# ----------------------------------------------------------------------------------------------
# Recording the launches the real launchers make
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: object           # the JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def _recording(kernels, sms: int):
    """Within the block, `kernel[grid](...)` records its arguments instead of launching, and the
    heuristics see `sms` streaming multiprocessors."""
    from . import heuristics

    launches: list[Launch] = []
    saved_num_sms = heuristics.num_sms

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(Launch(kernel, args, kwargs))
        return run

    for k in kernels:
        k.run = recorder(k)          # instance attribute shadows JITFunction.run
    heuristics.num_sms = lambda device: sms
    try:
        yield launches
    finally:
        heuristics.num_sms = saved_num_sms
        for k in kernels:
            del k.run


def _launchable_kernels():
    """Every `@triton.jit` function of the launcher modules. All of them are intercepted, so a
    kernel added to a launcher later is recorded too (never launched on meta tensors); the
    device helpers among them are simply never called from the host."""
    import triton

    from . import backward, forward

    found = {}
    for module in (forward, backward):
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                found[id(obj)] = obj
    return list(found.values())


def record_launches(shape: Shape, dtype: str, arch: Arch, variant: str = "affine",
                    forward_config=None, backward_config=None):
    """The kernel launches of one forward and one backward call, as the launchers make them.
    `forward_config` / `backward_config` override the heuristics (for tuning experiments).

    Tensors live on the meta device: shapes, strides and dtypes are real, memory is not."""
    import torch

    from .backward import patch_merger_backward
    from .forward import patch_merger_forward

    dt = _torch_dtype(dtype)
    pdt = torch.float32 if variant == "amp" else dt
    meta = dict(device="meta")
    b, n, d, m = shape.b, shape.n, shape.d, shape.m
    x = torch.empty((b, n, d), dtype=dt, **meta)
    queries = torch.empty((m, d), dtype=pdt, **meta)
    weight = bias = None
    if variant != "no-affine":
        weight = torch.empty((d,), dtype=pdt, **meta)
        bias = torch.empty((d,), dtype=pdt, **meta)
    mask = torch.empty((b, n), dtype=torch.bool, **meta) if variant == "mask" else None
    with _recording(_launchable_kernels(), arch.sms) as launches, _matmul_precision(dtype):
        training = variant != "inference"
        y, lse, stats, qsum, _ = patch_merger_forward(x, queries, weight, bias, 1e-5, d ** -0.5,
                                                      mask, config=forward_config,
                                                      save_stats=training)
        if not training:
            return launches
        dy = torch.empty_like(y)
        # "frozen-x": x needs no gradient (a frozen backbone), the backward without dx.
        patch_merger_backward(dy, x, queries, weight, bias, y, lse, stats, qsum, d ** -0.5, mask,
                              config=backward_config,
                              needs=(variant != "frozen-x", True, True, True))
    return launches


KERNEL_LABELS = {"_forward_kernel": "forward", "_combine_kernel": "combine",
                 "_delta_kernel": "delta", "_backward_kernel": "backward"}


# ----------------------------------------------------------------------------------------------
# From a recorded launch to a compile job (Triton's own binder)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    key: str
    kernel: object
    label: str
    arch: int
    dtype: str
    variant: str
    config: str              # human-readable BLOCK_* / warps / stages / flags
    spec: str                # integer specialisations that differ between shapes
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    shapes: list = dataclasses.field(default_factory=list)


def _target(capability: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", capability, 32)


_BINDERS: dict = {}


def _binder(kernel, capability: int):
    """Triton's argument binder for `kernel` on a given target (what `kernel[grid]` uses).

    `create_function_from_signature` and `_pack_args` are Triton internals (3.x); they are the
    only way to get the exact specialisation of a launch without a driver."""
    key = (id(kernel), capability)
    if key not in _BINDERS:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        backend = make_backend(_target(capability))
        _BINDERS[key] = (backend, create_function_from_signature(kernel.signature,
                                                                 kernel.params, backend))
    return _BINDERS[key]


def _describe(kernel, signature, constexprs, options):
    names = list(signature)
    cx = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
    parts = []
    if "BLOCK_M" in cx:
        parts.append(f"M{cx['BLOCK_M']}")
    if "BLOCK_N" in cx:
        parts.append(f"N{cx['BLOCK_N']}")
    if "BLOCK_D" in cx:
        parts.append(f"D{cx['BLOCK_D']}")
    parts.append(f"w{options['num_warps']}s{options['num_stages']}")
    if options.get("maxnreg"):
        parts.append(f"r{options['maxnreg']}")
    if cx.get("FINALIZE") is False:
        parts.append("split")
    if "INPUT_PRECISION" in cx and cx["INPUT_PRECISION"] != "ieee":
        parts.append(cx["INPUT_PRECISION"])
    return " ".join(parts)


def _spec(kernel, signature, constexprs, attrs):
    """Integer arguments whose specialisation is not the common one ('%16' = divisible by 16):
    listed as `M=1` (folded to a constant) or `N!16` (no divisibility hint)."""
    names = list(signature)
    declared = {p.name for p in kernel.params if p.is_constexpr}
    out = []
    for path, v in constexprs.items():
        name = names[path[0]]
        if name not in declared and not name.startswith("stride"):
            out.append(f"{name}={v}")
    for i, name in enumerate(names):
        if signature[name] in ("i32", "i64") and not name.startswith("stride"):
            hints = attrs.get((i,), [])          # e.g. [["tt.divisibility", 16]]
            if not any(h[0] == "tt.divisibility" for h in hints):
                out.append(f"{name}!16")
    return ",".join(out) or "-"


def make_job(launch: Launch, capability: int, dtype: str, variant: str) -> Job:
    backend, binder = _binder(launch.kernel, capability)
    bound, specialization, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound, specialization, opts)
    options = dict(options.__dict__)
    name = launch.kernel.__name__
    # The same identity Triton's launch cache uses: specialisation + options (+ the target).
    key = f"{name}|sm{capability}|{specialization!r}|{sorted(options.items())!r}"
    return Job(key=key, kernel=launch.kernel, label=KERNEL_LABELS.get(name, name),
               arch=capability, dtype=dtype, variant=variant,
               config=_describe(launch.kernel, signature, constexprs, options),
               spec=_spec(launch.kernel, signature, constexprs, attrs),
               signature=signature, constexprs=constexprs, attrs=attrs, options=options)


def plan(archs, dtypes, shapes, variants=DEFAULT_VARIANTS):
    """Distinct compile jobs for every (arch, dtype, variant, shape), each with the shapes it
    serves. fp32 has no "amp" variant (its parameters already are fp32)."""
    jobs: dict[str, Job] = {}
    for cap, dtype, variant, shape in itertools.product(archs, dtypes, variants, shapes):
        if variant == "amp" and dtype not in ("fp16", "bf16"):
            continue
        for launch in record_launches(shape, dtype, ARCHS[cap], variant):
            job = make_job(launch, cap, dtype, variant)
            job = jobs.setdefault(job.key, job)
            job.shapes.append(dataclasses.astuple(shape))
    return list(jobs.values())


# ----------------------------------------------------------------------------------------------
# Compiling and reading ptxas's report
# ----------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict | None:
    """Registers, stack frame and spill bytes from ptxas -v output (None if there is none)."""
    out = {}
    for k, rx in _PTXAS_RE.items():
        found = rx.findall(log)
        if not found:
            return None
        out[k] = int(found[-1])     # one entry function per module: the last report is it
    return out


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BACK_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")


def innermost_loops(sass: str) -> list[int]:
    """Instruction counts of the innermost loops of one kernel's SASS, in program order.

    A loop is the range from a backward branch's target to the branch; innermost means no other
    loop lies inside it; a branch to itself (the trap after EXIT) is not a loop. For these
    kernels the innermost loops are the D sweeps, so the counts are the instructions issued per
    D step and per warp: a static measure of work that needs no GPU (it says nothing about
    stalls, and a branch inside a loop body is counted as if both sides ran)."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass.splitlines())
              if m]
    loops = []
    for addr, text in instrs:
        b = _BACK_BRANCH.search(text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    inner = [(s, e) for s, e in loops
             if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    return [sum(1 for a, _ in instrs if s <= a <= e) for s, e in sorted(inner)]


def sass_loops(cubin: bytes) -> list[int] | None:
    """`innermost_loops` of a cubin, disassembled with the cuobjdump Triton bundles (None when
    it cannot be run)."""
    import triton
    try:
        tool = triton.knobs.nvidia.cuobjdump.path
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "kernel.cubin"
            path.write_bytes(cubin)
            sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                                  check=True, timeout=60).stdout
    except Exception:  # no cuobjdump, or it failed: the loop column stays empty
        return None
    return innermost_loops(sass)


@contextlib.contextmanager
def _capture_fds():
    """Capture everything written to fds 1 and 2 (Triton prints ptxas's log with print(); newer
    versions or native code may write to the fd directly)."""
    buf = {"text": ""}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            buf["text"] = tmp.read().decode(errors="replace")


@contextlib.contextmanager
def _env(**values):
    """Set environment variables (Triton reads its knobs from the environment) for a block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stats_dir() -> Path:
    return Path(os.environ["TRITON_CACHE_DIR"]) / "ptxas-stats"


def compile_job(job: Job) -> dict:
    """Compile one job; returns registers / spills / shared memory / compile seconds."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(job.kernel, job.signature, job.constexprs, job.attrs)
    result = dict(error=None, cached=False)
    t0 = time.perf_counter()
    try:
        with _env(TRITON_DUMP_PTXAS_LOG="1"), _capture_fds() as out:
            compiled = triton.compile(src, target=_target(job.arch), options=job.options)
        stats = parse_ptxas(out["text"])
        path = _stats_dir() / f"{compiled.hash}.json"
        if stats is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats))
        elif path.exists():
            stats = json.loads(path.read_text())
            result["cached"] = True
        else:
            # Served from a Triton cache filled without the ptxas log: compile once more.
            with _env(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1"), \
                    _capture_fds() as out:
                compiled = triton.compile(src, target=_target(job.arch), options=job.options)
            stats = parse_ptxas(out["text"])
            if stats is None:
                raise RuntimeError("no ptxas report in the compile output:\n" + out["text"][-2000:])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats))
        result.update(stats)
        result["loops"] = sass_loops(compiled.asm["cubin"])
        result["shared"] = int(compiled.metadata.shared)
        result["hash"] = compiled.hash          # the binary's key in Triton's cache
    except Exception as e:  # a failed compile is a finding, not a crash of the audit
        msg = str(e).strip().splitlines()
        result["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    result["seconds"] = time.perf_counter() - t0
    return result


# Jobs for worker processes: set before the pool forks, so workers receive only an index.
_JOBS: list[Job] = []


def _compile_index(i: int) -> dict:
    return compile_job(_JOBS[i])


def supported_archs(archs):
    """The subset of `archs` the installed Triton + ptxas can target (probed with a tiny kernel),
    and the reasons for the others."""
    import triton
    import triton.language as tl
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(p):
        tl.store(p, 1.0)

    ok, skipped = [], {}
    for cap in archs:
        try:
            with _capture_fds():
                triton.compile(ASTSource(_probe, {"p": "*fp32"}, {}), target=_target(cap),
                               options={"num_warps": 1})
            ok.append(cap)
        except Exception as e:
            skipped[cap] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    return ok, skipped


def run_jobs(jobs: list[Job], workers: int, progress=None) -> list[dict]:
    """Compile every job, in `workers` forked processes (compiles are CPU-bound and independent).
    Returns one result per job, in order."""
    global _JOBS
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for i, job in enumerate(jobs):
            results.append(compile_job(job))
            if progress:
                progress(i + 1, len(jobs), job, results[-1])
        return results
    import multiprocessing as mp
    _JOBS = jobs
    results: list = [None] * len(jobs)
    with mp.get_context("fork").Pool(workers) as pool:
        for done, (i, r) in enumerate(pool.imap_unordered(_indexed, range(len(jobs))), 1):
            results[i] = r
            if progress:
                progress(done, len(jobs), jobs[i], r)
    return results


def _indexed(i):
    return i, _compile_index(i)


# ----------------------------------------------------------------------------------------------
# The audit and its checks
# ----------------------------------------------------------------------------------------------

def shapes_for(d_values, n_values, m_values, b_values):
    return [Shape(b, n, d, m) for d, n, m, b in
            itertools.product(d_values, n_values, m_values, b_values)]


def is_paper_shape(shape) -> bool:
    b, n, d, m = shape
    return d in PAPER_D and m in PAPER_M


def violations(rows: list[dict]) -> list[str]:
    """What the CI test asserts, as messages (empty = all good):
      * every configuration compiled (no error);
      * shared memory within the per-block limit of its architecture, for every configuration;
      * zero spill stores on sm_80 and sm_90 for fp16/bf16 binaries serving a paper shape."""
    bad = []
    for r in rows:
        what = f"{r['kernel']} [{r['config']}] {r['dtype']}/{r['variant']} sm_{r['arch']}"
        if r["error"]:
            bad.append(f"{what}: compile error {r['error']}")
            continue
        if r["shared"] > r["smem_limit"]:
            bad.append(f"{what}: {r['shared']} B shared memory > {r['smem_limit']} B per block")
        if (r["arch"] in (80, 90) and r["dtype"] in ("fp16", "bf16") and r["spill_stores"] > 0
                and any(is_paper_shape(s) for s in r["shapes"])):
            bad.append(f"{what}: {r['spill_stores']} B spill stores at a paper shape")
    return bad


def audit(archs=DEFAULT_ARCHS, dtypes=DTYPES, d_values=D_VALUES, n_values=N_VALUES,
          m_values=M_VALUES, b_values=B_VALUES, variants=DEFAULT_VARIANTS,
          workers: int | None = None, progress=None) -> dict:
    """Plan, compile and report. Returns {"rows": [...], "skipped_archs": {...}, "meta": {...}}
    with one row per distinct binary."""
    from . import heuristics

    if heuristics.interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreter objects and "
                           "cannot be compiled; use audit_subprocess()")
    os.environ.setdefault("TRITON_CACHE_DIR", str(DEFAULT_CACHE))
    import torch
    import triton

    t0 = time.perf_counter()
    ok, skipped = supported_archs(archs)
    shapes = shapes_for(d_values, n_values, m_values, b_values)
    jobs = plan(ok, dtypes, shapes, variants)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    results = run_jobs(jobs, workers, progress)
    rows = []
    for job, res in zip(jobs, results):
        rows.append(dict(kernel=job.label, config=job.config, spec=job.spec, dtype=job.dtype,
                         variant=job.variant, arch=job.arch,
                         smem_limit=ARCHS[job.arch].smem_per_block, shapes=job.shapes,
                         num_warps=job.options["num_warps"], num_stages=job.options["num_stages"],
                         **res))
    kernel_order = {k: i for i, k in enumerate(KERNEL_LABELS.values())}
    dtype_order = list(DTYPES + EXTRA_DTYPES)
    rows.sort(key=lambda r: (r["arch"], kernel_order.get(r["kernel"], 9), r["kernel"],
                             dtype_order.index(r["dtype"]), VARIANTS.index(r["variant"]),
                             r["config"], r["spec"]))
    meta = dict(triton=triton.__version__, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - t0,
                archs={c: dataclasses.asdict(ARCHS[c]) for c in ok}, dtypes=list(dtypes),
                variants=list(variants), d=list(d_values), n=list(n_values), m=list(m_values),
                b=list(b_values), cache_dir=os.environ["TRITON_CACHE_DIR"])
    return dict(rows=rows, skipped_archs=skipped, meta=meta, violations=violations(rows))


def audit_subprocess(args: list[str], timeout: float | None = None,
                     cache_dir: str | os.PathLike = DEFAULT_CACHE) -> dict:
    """Run `python -m pm_kernels.audit ARGS --json TMP` in a fresh interpreter with
    TRITON_INTERPRET unset (so the kernels are compilable JIT functions) and return its JSON.
    Compiles go to `cache_dir` (the project-local audit cache by default)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "audit.json"
        proc = subprocess.run([sys.executable, "-m", "pm_kernels.audit", *args, "--json",
                               str(out), "--no-table"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"audit failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def group_rows(rows: list[dict]) -> list[dict]:
    """One row per (kernel, config, dtype, variant, arch): the binaries that differ only in
    integer specialisation (N or M divisible by 16 or not, M = 1) merged, with the worst case of
    each number."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["arch"], r["kernel"], r["dtype"], r["variant"], r["config"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = dict(r, binaries=0, shapes=[], seconds=0.0, cached=True,
                                   errors=[], regs_min=None, loops=None)
            for k in ("registers", "spill_stores", "spill_loads", "stack", "shared"):
                g[k] = 0
        g["binaries"] += 1
        g["shapes"] = g["shapes"] + list(r["shapes"])
        g["seconds"] += r["seconds"]
        g["cached"] = g["cached"] and r["cached"]
        if r["error"]:
            g["errors"].append(r["error"])
            continue
        for k in ("registers", "spill_stores", "spill_loads", "stack", "shared"):
            g[k] = max(g[k], r[k])
        if sum(r.get("loops") or []) > sum(g.get("loops") or []):
            g["loops"] = r["loops"]
        g["regs_min"] = r["registers"] if g["regs_min"] is None else min(g["regs_min"],
                                                                          r["registers"])
    out = list(groups.values())
    for g in out:
        g["error"] = g["errors"][0] if g["errors"] else None
    return out


def format_table(rows: list[dict], detail: bool = False) -> str:
    """The audit table: one line per binary (`detail`) or per configuration (default)."""
    spec_col = "spec" if detail else "binaries"
    head = (f"{'kernel':<9} {'config':<24} {'dtype':<5} {'variant':<9} {'arch':<6} "
            f"{spec_col:<14} {'regs':>7} {'spill B':>7} {'smem B':>7} {'limit':>7} "
            f"{'shapes':>6} {'compile':>8}  loop instrs")
    lines = [head, "-" * len(head)]
    for r in (rows if detail else group_rows(rows)):
        spec = r["spec"] if detail else str(r["binaries"])
        lead = (f"{r['kernel']:<9} {r['config']:<24} {r['dtype']:<5} {r['variant']:<9} "
                f"sm_{r['arch']:<3} {spec:<14}")
        if r["error"]:
            lines.append(f"{lead} ERROR {r['error']}")
            continue
        regs = (f"{r['registers']}" if detail or r["regs_min"] == r["registers"]
                else f"{r['regs_min']}-{r['registers']}")
        secs = "cached" if r["cached"] else f"{r['seconds']:.1f}s"
        flag = "!" if r["spill_stores"] or r["shared"] > r["smem_limit"] else " "
        loops = "+".join(map(str, r.get("loops") or [])) or "-"
        lines.append(f"{lead} {regs:>7} {r['spill_stores']:>7} {r['shared']:>7} "
                     f"{r['smem_limit']:>7} {len(r['shapes']):>6} {secs:>8}{flag} {loops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pm_kernels.audit",
        description="Compile every kernel configuration the launch heuristics can choose and "
                    "report registers, spills and shared memory (no GPU needed).")
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS),
                   help=f"compute capabilities (default {' '.join(map(str, DEFAULT_ARCHS))}; "
                        "those the installed Triton cannot target are skipped)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES + EXTRA_DTYPES,
                   help=f"input dtypes (default {' '.join(DTYPES)}; tf32 / tf32x3 = fp32 under "
                        "torch.set_float32_matmul_precision('medium' / 'high'))")
    p.add_argument("--variant", nargs="+", choices=VARIANTS,
                   help=f"argument variants (default {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--d", type=int, nargs="+", help="feature widths D")
    p.add_argument("--n", type=int, nargs="+", help="token counts N")
    p.add_argument("--m", type=int, nargs="+", help="merged-token counts M (<= 256)")
    p.add_argument("--b", type=int, nargs="+", help="batch sizes B")
    p.add_argument("--quick", action="store_true",
                   help="a representative subset: sm_80/sm_90, fp16/bf16, D 768/1280, "
                        "N 196/1024, M 8/16")
    p.add_argument("--workers", type=int, help="parallel compile processes (default: CPUs)")
    p.add_argument("--json", metavar="PATH", help="also write the full results as JSON")
    p.add_argument("--no-table", action="store_true", help="do not print the table")
    p.add_argument("--detail", action="store_true",
                   help="one table line per binary (default: per configuration, worst case)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on a violation (spill at a paper shape, shared memory over "
                        "the limit, compile error)")
    a = p.parse_args(argv)

    from . import heuristics
    if heuristics.interpreting():
        # The kernels would be decorated as interpreter objects: start over without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "pm_kernels.audit", *(argv or sys.argv[1:])],
                               env=env)

    base = QUICK if a.quick else dict(d=D_VALUES, n=N_VALUES, m=M_VALUES, b=B_VALUES,
                                      dtypes=DTYPES, archs=DEFAULT_ARCHS)
    kw = dict(archs=tuple(a.arch or base["archs"]), dtypes=tuple(a.dtype or base["dtypes"]),
              d_values=tuple(a.d or base["d"]), n_values=tuple(a.n or base["n"]),
              m_values=tuple(a.m or base["m"]), b_values=tuple(a.b or base["b"]),
              variants=tuple(a.variant or DEFAULT_VARIANTS), workers=a.workers)
    if any(m > 256 or m < 1 for m in kw["m_values"]):
        p.error("M must be in 1..256")

    def progress(done, total, job, res):
        if sys.stderr.isatty():
            print(f"\r  compiled {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    report = audit(progress=progress, **kw)
    rows = report["rows"]
    if not a.no_table:
        print(format_table(rows, detail=a.detail))
    for cap, why in report["skipped_archs"].items():
        print(f"sm_{cap}: skipped, the installed Triton cannot target it ({why})")
    compiled = sum(not r["cached"] and not r["error"] for r in rows)
    print(f"{len(rows)} distinct binaries ({compiled} compiled, the rest from the cache) in "
          f"{report['meta']['seconds']:.1f} s; triton {report['meta']['triton']}")
    spilling = [r for r in rows if not r["error"] and r["spill_stores"]]
    print(f"binaries with spill stores: {len(spilling)}")
    if report["violations"]:
        print("VIOLATIONS:")
        for v in report["violations"]:
            print("  " + v)
    else:
        print("no violations (paper shapes spill-free on sm_80/sm_90 for fp16/bf16; shared "
              "memory within limits; everything compiled)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if (a.strict and report["violations"]) else 0


if __name__ == "__main__":
    sys.exit(main())
