"""Launch heuristics: every block size, warp count, stage count and split factor comes from here.

Inputs are the problem (B, N, D, M, dtype) and the device's SM count.
There is no runtime autotuning: the op is memory-bound and the space that matters is small, so a
closed-form choice, checked by `python -m pm_kernels.audit` for register spills and shared memory
on every architecture we target, is both faster to launch and reproducible.

Tiling, for every kernel: a program owns BLOCK_N tokens at a time of one batch element and
sweeps D in BLOCK_D columns; all M queries live in one BLOCK_M tile (M <= 256). D is never
rounded up to a power of two as a whole: only BLOCK_D is, and the last tile is masked.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

MAX_M = 256
# float64 multiplies in registers (`common.mma`: Triton's fp64 MMA path aborted on an H100), with
# a BLOCK_M x 16 x 16 product per program, and its shared memory grows with BLOCK_M: the
# compiled fp64 kernels take 64 KB at BLOCK_M = 128 and 128 KB at 256 (audit, sm_120), over the
# 99 KB of sm_86/89/120 parts. fp64 is the gradcheck dtype, not a speed path, so on CUDA larger M
# runs the PyTorch reference (ops.patch_merger); the interpreter has no such limit.
FP64_MAX_M = 128


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration. `split` is the number of programs sharing one batch element's
    token axis (flash-decoding style); 1 means each program owns a whole batch element."""

    block_m: int
    block_n: int
    block_d: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None    # ptxas register cap per thread (None: ptxas chooses)


# Read once, from Triton's own setting (TRITON_INTERPRET, parsed as Triton parses it, or
# triton.knobs.runtime.interpret set in code before the import): `@triton.jit` decides at
# decoration, i.e. when pm_kernels is imported, whether the kernels are interpreter objects,
# and nothing set later changes that.
_INTERPRETING = bool(triton.knobs.runtime.interpret)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`. On the CPU interpreter we pretend to have 4, so the
    split-N path is exercised by modest test shapes (and programs, which the interpreter runs one
    after another, stay few)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host integers. (`triton.cdiv` is a constexpr function since Triton
    3.5: a few microseconds per host call, and the launchers call it on every launch.)"""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1), for host integers."""
    return 1 << max(0, v - 1).bit_length()


def block_m(m: int) -> int:
    # tl.dot needs every dimension >= 16 on NVIDIA GPUs.
    return max(16, next_pow2(m))


def _block_d(d: int, cap: int) -> int:
    """BLOCK_D: the tile table's cap (chosen per dtype there: 16-byte vector loads want >= 8
    fp16 / 4 fp32 contiguous columns, and a 128-byte row is one cache line), smaller for small
    D, at least 16 (tl.dot's minimum)."""
    return max(16, min(cap, next_pow2(d)))


def token_split(n: int, split: int, block_n: int) -> tuple[int, int]:
    """(programs, tokens per program) with which a launcher partitions one batch element's N
    tokens for a config of `split` programs: tokens per program a whole number of BLOCK_N blocks
    (a token block never straddles two programs), and no program without tokens. Rounding up to
    whole blocks can leave the last of the `split` programs nothing to do -- 196 tokens in
    32-token blocks over 6 programs is 64 tokens each, and the last two would own none --
    and such a program still costs a launch slot and a zero partial row (M x D fp32 in the
    backward) that the final sums read back; those programs are not launched."""
    if n < 1:      # no token: the op never launches then (ops.patch_merger), nor may anyone
        raise ValueError(f"token_split needs N >= 1 tokens, got {n}")
    s = max(1, min(split, cdiv(n, block_n)))
    per = cdiv(cdiv(n, s), block_n) * block_n
    return cdiv(n, per), per


def _split(b: int, n: int, block_n: int, sms: int, max_split: int | None = None) -> int:
    """How many programs share one batch element's tokens: enough programs to fill the device
    twice over, but at least two token blocks per program (fewer would make the split's
    partial state (M x D fp32) cost as much traffic as the tokens it saves)."""
    want = cdiv(2 * sms, max(b, 1))
    most = max(1, cdiv(n, 2 * block_n))
    s = max(1, min(want, most))
    if max_split is not None:
        s = min(s, max_split)
    return s


# ----------------------------------------------------------------------------------------------
# GPU launch tiles (the interpreter branches below choose their own, for test speed)
# ----------------------------------------------------------------------------------------------
# (BLOCK_N, BLOCK_D cap, num_warps, num_stages) per BLOCK_M tier, for 16-bit inputs (fp16, bf16)
# and for fp32 (whose dots run as fp32 FMA code at torch's default "highest" precision, see
# `input_precision`: no tensor cores and more registers than a 16-bit tile). fp64 takes fixed
# small tiles (`_token_config`).
#
# Chosen with `python -m pm_kernels.audit`, which compiles every configuration for sm_80 and
# sm_90 and reads ptxas's register and spill counts. The numbers in the tables are registers per
# thread, worst case over the audit's specialisations (N, M divisible by 16 or not, M = 1, split
# or not) and argument variants (affine / fp32 parameters / mask / no affine), "sm_80 / sm_90",
# Triton 3.6 + ptxas 12.8 (audit of 2026-12-01, night). The kernels are memory-bound; the rules, in
# order of priority:
#   1. No register spills. Spill traffic goes to local memory on top of the DRAM stream the
#      kernel is bound by. ptxas picks its own register budget (unless the tile sets maxnreg,
#      the fifth entry of a table row) and aims at an occupancy step -- 168 or 128 registers
#      for 4 warps (3 or 4 blocks per SM), 128 or 80 for 8 warps -- spilling a few bytes to get
#      there if it must. That is why neighbouring configurations flip between 0 and 4-32
#      spilled bytes, and why the CI test (tests/test_audit.py) re-checks these tables with
#      whatever Triton is installed. It may also settle above a step: the 16-bit forward with
#      the raw form of sweep 2 (forward.py) compiled to 171-181 registers for 8 warps, one
#      program per SM, where a cap of 128 costs no spill and 2-4 instructions per D step.
#   2. Every program of the paper's grid resident at once. With B = 256 and split 1 there are
#      256 programs: 1.94 per SM on an H100 (132 SMs), 2.37 on an A100 (108). That needs 2
#      resident programs per SM on H100 and 3 on A100: <= 128 registers with 8 warps (2 per SM),
#      <= 168 with 4 warps (3 per SM), <= 255 with 4 warps (2 per SM).
#   3. Bytes in flight per program. Latency hiding comes from each program's own loads:
#      BLOCK_N x BLOCK_D elements per D step, times num_stages when the D sweep is
#      software-pipelined, or two steps' worth where a one-stage score sweep loads a step
#      ahead (`prefetch`). BLOCK_D = 64 of a 16-bit dtype (32 of fp32) is a 128-byte row, one
#      cache line, read with 16-byte vector loads.
#   4. BLOCK_N as large as 1-3 allow: every token block re-reads and re-writes the program's
#      M x D fp32 accumulator (forward) or dW partial row (backward) in L2, so L2 traffic per
#      token scales like M / BLOCK_N (`pm_kernels.roofline` counts it as "scratch (L2)").
# Forward, M <= 16: 128 x 32 on 8 warps, 3 stages, registers capped at 128: spill-free, 2
# programs per SM, 8 KB of x per step with two steps in flight, and ViT-B/16's 196 tokens in two
# blocks (one round trip of the accumulator scratch). The fastest tile measured on ViT-B/16.
# Backward, M <= 16: 32 x 64 on 4 warps, one stage (its score sweep loads a step ahead,
# `prefetch`), one program per token block (`_backward_split`), registers capped at 168. The
# backward holds many more live tiles than the forward (backward.py): uncapped, ptxas gave it
# 209-238 registers, 2 programs per SM; at 168 three fit, 12 warps instead of 8 to hide the
# latency the tuning runs found binding, spill-free in every audited variant (128 would spill
# 40-72 B). The fastest tile and split measured on ViT-B/16 and ViT-H/14.
# Larger M: smaller BLOCK_N / BLOCK_D as the M x BLOCK_N score tiles and M x BLOCK_D accumulator
# tiles grow; every 16-bit tier is spill-free on sm_90, and on sm_80 but for the BLOCK_M = 128
# backward (4 B, at 252-255 registers; not a paper M). The BLOCK_M = 32 / 128 forward and the
# BLOCK_M = 256 backward tiles were re-chosen for that when the forward began to save
# statistics. fp32 (FMA dots) needs smaller tiles; the backward spills at BLOCK_M = 256
# (388-392 B) and 4-8 B in some BLOCK_M = 32 variants on sm_80/100/120 -- large M is better
# run in bf16.
# Shared memory stays far below every per-block limit (<= 66 KB, fp32 at BLOCK_M = 256; the
# audit checks sm_80's 163 KB, sm_86/89/120's 99 KB and sm_90/100's 227 KB).
#
# Measured (H100 SXM, bf16, M = 8, `python -m bench.tune` on ViT-B/16, ViT-H/14 and B=8 N=4096
# D=1024; timings and runs in bench/results/README.md): at these sizes the kernels are bound by
# latency, not bytes. Backward: a program per token block beat a program per batch element by
# 1.4-1.9x, the extra programs buying more loads in flight than their extra partial rows cost.
# Forward: 128-token tiles beat 64-token ones; 128 x 64 on 8 warps was the fastest on ViT-H/14
# and N = 4096 but takes one program per SM (two waves at B = 256 on an H100). The register
# caps and every tier but M <= 16 are not timed.
_FORWARD_TILES = {
    #       16-bit inputs      fp32 inputs          registers: 16-bit | fp32
    # BLOCK_M = 16 serves the paper's M = 8 and 16 (and M = 1).
    16: ((128, 32, 8, 3, 128), (32, 32, 4, 1)),   # 128 / 124-128 | 153-168 / 154-166
    32: ((64, 32, 8, 2), (32, 16, 4, 1)),     # 113-128 / 120-128 | 158-168 / 158-167
    64: ((32, 32, 8, 2), (32, 16, 4, 1)),     # 104-128 / 104-125 | 218-234 / 210-223
    128: ((16, 16, 4, 1), (16, 16, 8, 1)),    # 120-152 / 106-128 | 110-128 / 103-128
    256: ((16, 32, 16, 1), (16, 32, 8, 1)),   # 106-128 / 98-116 | 186-214 / 173-193
}
_BACKWARD_TILES = {
    16: ((32, 64, 4, 1, 168), (16, 16, 8, 1)),  # 144-168 / 144-168 | 74-128 / 80-128
    32: ((64, 32, 4, 1), (32, 16, 4, 1)),     # 210-243 / 210-238 | 168-212, 4 B / 154-168
    64: ((32, 32, 4, 1), (16, 16, 4, 1)),     # 217-248 / 197-250 | 237-255 / 213-244
    128: ((16, 32, 4, 1), (16, 16, 8, 1)),    # 252-255, 4 B / 213-239 | 222-245 / 211-230
    256: ((16, 16, 8, 1), (16, 16, 8, 1)),    # 204-252 / 174-220 | 255, spills 388 / 392 B
}


def _gpu_tiles(table, bm: int, elem_bytes: int):
    return table[bm][0 if elem_bytes <= 2 else 1]


def _gpu_split(b: int, n: int, block_n: int, sms: int) -> int:
    """Split factor on a GPU. Splitting a batch element's tokens over programs costs traffic:
    each extra program writes an M x D fp32 partial that the combine (forward) or the final sum
    (backward) reads back, 2 * split * M * D * 4 bytes per element, 33 % on top of x for ViT-B
    at M = 8 and split = 2. That buys occupancy only while the batch alone leaves SMs without a
    program, so split only when B < #SMs, then as `_split` does (fill the device twice over,
    at least two token blocks per program)."""
    if b >= sms:
        return 1
    return _split(b, n, block_n, sms)


def _backward_split(b: int, n: int, m: int, block_n: int, elem_bytes: int, sms: int) -> int:
    """Split factor of the 16-bit backward on a GPU at BLOCK_M <= 32 (measured at M = 8 only):
    one token block per program (see "Measured" above), within two caps on the fp32 partial
    rows that the final sums read back (dW: M x D and dg: D per program): at most 16 programs
    per SM in all, and partial bytes at most the bytes of x (split * M * 4 <= N * elem_bytes)."""
    blocks = cdiv(n, block_n)
    by_programs = max(1, 16 * sms // max(b, 1))
    by_bytes = max(1, n * elem_bytes // (4 * max(m, 1)))
    return max(1, min(blocks, by_programs, by_bytes))


def _token_config(table, b: int, n: int, d: int, m: int, dtype: torch.dtype,
                  device: torch.device, backward: bool = False) -> Config:
    """Config of a kernel that walks tokens in BLOCK_N blocks and D in BLOCK_D tiles (the forward
    and the backward), from its GPU tile table."""
    bm = block_m(m)
    elem = dtype.itemsize
    if interpreting():
        # The interpreter's cost is per program and per tile operation, so bigger tiles are
        # simply faster; keep them moderate so tests still cross tile boundaries.
        bn = 32 if bm <= 64 else 16
        bd = _block_d(d, 64)
        return Config(bm, bn, bd, split_rule(backward, b, n, m, bm, bn, elem, num_sms(device)),
                      4, 1)
    bn, bd_cap, warps, stages, *cap = _gpu_tiles(table, bm, elem)
    if elem == 8:
        # fp64 (gradcheck, references) multiplies in registers (`common.mma`), whose
        # BLOCK_M x BLOCK_N x BLOCK_D product tile must stay small.
        bn, bd_cap, warps, stages, cap = 16, 16, 4, 1, ()
    split = split_rule(backward, b, n, m, bm, bn, elem, num_sms(device))
    return Config(bm, bn, _block_d(d, bd_cap), split, warps, stages,
                  cap[0] if cap else None)


def split_rule(backward: bool, b: int, n: int, m: int, bm: int, bn: int, elem_bytes: int,
               sms: int) -> int:
    """The split factor the GPU heuristics give a token kernel on a device with `sms` SMs
    (also what `roofline` uses to count the bytes of a hypothetical device)."""
    if interpreting():
        return _split(b, n, bn, sms)
    if backward and bm <= 32 and elem_bytes <= 2:
        return _backward_split(b, n, m, bn, elem_bytes, sms)
    return _gpu_split(b, n, bn, sms)


def forward_config(b: int, n: int, d: int, m: int, dtype: torch.dtype,
                   device: torch.device) -> Config:
    return _token_config(_FORWARD_TILES, b, n, d, m, dtype, device)


def combine_config(d: int, m: int) -> Config:
    """The split-N merge kernel: one program per (batch, BLOCK_D columns)."""
    bm = block_m(m)
    if interpreting():
        bd = max(16, min(128 if bm <= 32 else 64, next_pow2(d)))
        return Config(bm, 1, bd, 1, 4, 1)
    # GPU: the kernel holds two BLOCK_M x BLOCK_D fp32 tiles (the running sum and the partial
    # being added); 32 elements of each per thread keep it far from spilling (a 256 x 64 tile
    # on 4 warps, 128 fp32 per thread each, spilled 324-548 B on every architecture). 128
    # columns (512 B of fp32 per row) where BLOCK_M is small, 8 warps for BLOCK_M >= 128.
    warps = 4 if bm <= 64 else 8
    bd = max(16, min(128, 32 * 32 * warps // bm, next_pow2(d)))
    return Config(bm, 1, bd, 1, warps, 1)


def backward_config(b: int, n: int, d: int, m: int, dtype: torch.dtype,
                    device: torch.device) -> Config:
    return _token_config(_BACKWARD_TILES, b, n, d, m, dtype, device, backward=True)


def prefetch(cfg: Config) -> bool:
    """Whether a token kernel's score sweep loads each step's tiles one step ahead, in
    registers (`common.shifted_dots`): where Triton does not software-pipeline it (one stage)
    and the query-side tiles are small. The sweep is the first touch of x, a DRAM round trip
    per step otherwise (12 per backward program at ViT-B/16). At BLOCK_M >= 128 the extra
    BLOCK_M x BLOCK_D operand tiles spilled (32-450 B on sm_80, audit of 2026-12-01)."""
    return cfg.num_stages == 1 and cfg.block_m <= 64


def acc_ahead(cfg: Config) -> bool:
    """Whether the forward's second sweep loads its accumulator scratch tile a step ahead
    (`forward._acc_tile`): an extra BLOCK_M x BLOCK_D fp32 tile in registers, 2 per thread at
    the paper's M. At BLOCK_M = 64 it took the 8-warp kernel to 130 registers (one program per
    SM instead of two), at BLOCK_M >= 128 ptxas held the kernels at 128 and spilled 8-20 B on
    sm_80/100/120 (audit of 2026-12-01)."""
    return cfg.block_m <= 32


# Loops over D that touch no token: the forward's query operand op(W g) (`common.query_operand`,
# once per program before its token loop) and the backward's `_delta_kernel` (once per batch
# element). Each step is a load, some arithmetic and a store, and nothing else in the program
# can run meanwhile: the loop costs a memory round trip per step, not bandwidth (W, g and dy
# sit in L2; 12 KB of W at ViT-B/16). At the token kernels' 32- or 64-column tiles that was
# 24 / 12 serial round trips per program at D = 768, about 10 us on an H100 at ~0.4 us per L2
# trip, as long as a third of the forward's token loop. Wider tiles cut the trips: up to 16
# elements per thread of a BLOCK_M x BLOCK_D tile (3 steps at D = 768 for M <= 16).
PROLOGUE_ELEMS_PER_THREAD = 16


def prologue_block_d(d: int, m: int, num_warps: int, token_block_d: int) -> int:
    """BLOCK_D of a token-free loop over D (see above) in a kernel of `num_warps` warps whose
    token loops use `token_block_d` columns. The interpreter keeps `token_block_d`, so the
    tests' small D still cross tile boundaries in these loops."""
    if interpreting():
        return token_block_d
    most = PROLOGUE_ELEMS_PER_THREAD * 32 * num_warps // block_m(m)
    return max(token_block_d, min(next_pow2(d), most))


def delta_config(d: int, m: int, bwd: Config) -> Config:
    """`_delta_kernel` (one program per batch element, two token-free sweeps over D): 8 warps
    and `prologue_block_d` columns (256 for M <= 16), 3 steps per sweep at D = 768. (With the
    backward's 4 warps and 64 columns it took 12, at 161 + 121 SASS instructions per warp and
    step on sm_90; 230 + 231 for 128 columns.)"""
    warps = 4 if interpreting() else 8
    return Config(bwd.block_m, 1, prologue_block_d(d, m, warps, bwd.block_d), 1, warps, 1)


def _fp32_matmul_precision() -> str:
    """torch's fp32 matmul precision as "highest" / "high" / "medium". Set through the newer
    per-backend API alone (`torch.backends.cuda.matmul.fp32_precision = "tf32"`, torch >= 2.9),
    the legacy getter raises; that API's "tf32" is then read as "medium", anything else as
    "highest"."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        new = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
        return "medium" if new == "tf32" else "highest"


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision, following torch's fp32 matmul precision: "highest" (the
    default) is full fp32 ("ieee": FMA code, no tensor cores); "medium" is one tf32 MMA;
    "high", where torch allows TF32 or bf16x3 (cuBLAS takes one TF32 pass), is tf32x3 here:
    three tf32 MMAs on hi/lo operand splits, ~2^-21 relative error per product, closer to fp32
    than torch's own "high". fp16/bf16/fp64 ignore the setting. Measured on an H100: tf32x3
    under "highest" made fp32 dx and dbias 4-6.5x less accurate than torch's fp32
    (tests/test_patch_merger.py), so "highest" must not use it."""
    if dtype != torch.float32:
        return "ieee"
    return {"highest": "ieee", "high": "tf32x3"}.get(_fp32_matmul_precision(), "tf32")
