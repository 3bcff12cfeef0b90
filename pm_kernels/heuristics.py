"""Launch heuristics: every block size, warp count, stage count and split factor comes from here.

Inputs are the problem (B, N, D, M, dtype) and the device (SM count, shared memory per block).
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
import os

import torch
import triton

MAX_M = 256


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


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`. On the CPU interpreter we pretend to have 4, so the
    split-N path is exercised by modest test shapes (and programs, which the interpreter runs one
    after another, stay few)."""
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def block_m(m: int) -> int:
    # tl.dot needs every dimension >= 16 on NVIDIA GPUs.
    return max(16, triton.next_power_of_2(m))


def _block_d(d: int, elem_bytes: int, cap: int) -> int:
    # 16-byte vector loads want >= 8 fp16 / 4 fp32 contiguous columns; 64 columns of fp16
    # (128 B, one cache line) per row keep every load coalesced without wasting much of a
    # masked last tile (D = 1000 uses 16 tiles of 64, 2.3 % padding).
    return max(16, min(cap, triton.next_power_of_2(d)))


def _split(b: int, n: int, block_n: int, sms: int, max_split: int | None = None) -> int:
    """How many programs share one batch element's tokens: enough programs to fill the device
    twice over, but at least two token blocks per program (fewer would make the split's
    partial state (M x D fp32) cost as much traffic as the tokens it saves)."""
    want = triton.cdiv(2 * sms, max(b, 1))
    most = max(1, triton.cdiv(n, 2 * block_n))
    s = max(1, min(want, most))
    if max_split is not None:
        s = min(s, max_split)
    return s


def forward_config(b: int, n: int, d: int, m: int, dtype: torch.dtype,
                   device: torch.device) -> Config:
    bm = block_m(m)
    elem = torch.empty((), dtype=dtype).element_size()
    if interpreting():
        # The interpreter's cost is per program and per tile operation, so bigger tiles are
        # simply faster; keep them moderate so tests still cross tile boundaries.
        bn = 32 if bm <= 64 else 16
        bd = _block_d(d, elem, 64)
        return Config(bm, bn, bd, _split(b, n, bn, num_sms(device)), 4, 1)
    # GPU: the scores tile (BLOCK_M x BLOCK_N fp32) and the x tile (BLOCK_N x BLOCK_D) live in
    # registers; keep each within ~32 fp32 registers per thread.
    bn = {16: 64, 32: 64, 64: 32, 128: 16, 256: 16}[bm]
    bd = _block_d(d, elem, 64 if elem <= 2 else 32)
    warps = 4 if bm <= 32 else 8
    return Config(bm, bn, bd, _split(b, n, bn, num_sms(device)), warps, 2)


def combine_config(d: int, m: int) -> Config:
    """The split-N merge kernel: one program per (batch, BLOCK_D columns)."""
    bm = block_m(m)
    bd = max(16, min(128 if bm <= 32 else 64, triton.next_power_of_2(d)))
    return Config(bm, 1, bd, 1, 4, 1)


def backward_config(b: int, n: int, d: int, m: int, dtype: torch.dtype,
                    device: torch.device) -> Config:
    bm = block_m(m)
    elem = torch.empty((), dtype=dtype).element_size()
    if interpreting():
        bn = 32 if bm <= 64 else 16
        bd = _block_d(d, elem, 64)
        return Config(bm, bn, bd, _split(b, n, bn, num_sms(device)), 4, 1)
    # The backward keeps four (BLOCK_M x BLOCK_N) fp32 tiles (s, p, dp, ds) alive across the D
    # sweep and a (BLOCK_N x BLOCK_D) dx tile, hence smaller token blocks than the forward.
    bn = {16: 32, 32: 32, 64: 16, 128: 16, 256: 16}[bm]
    bd = _block_d(d, elem, 64 if elem <= 2 else 32)
    warps = 4 if bm <= 32 else 8
    return Config(bm, bn, bd, _split(b, n, bn, num_sms(device)), warps, 2)


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision. fp32 inputs follow torch.get_float32_matmul_precision():
    "highest" keeps fp32 accuracy with tf32x3 (three tf32 MMAs; plain "ieee" compiles to FMA
    code that spills), "high"/"medium" allow tf32. fp16/bf16/fp64 ignore the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    if dtype == torch.float32:
        return "tf32x3"
    return "ieee"
