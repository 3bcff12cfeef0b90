"""Forward kernels of the fused PatchMerger and their launcher `patch_merger_forward`.

One program owns a range of tokens of one batch element (the whole axis unless the batch is too
small to fill the GPU, see `heuristics._split`). For each block of BLOCK_N tokens it
  1. sweeps D once (`common.token_block_scores`): LayerNorm statistics and base-2 scores s2;
  2. folds the block into an online softmax over the token axis (running max m and sum l, fp32);
  3. sweeps D again: acc[m, :] = acc[m, :] * exp2(m_old - m_new) + p @ xhat. For bf16 x
     without a key padding mask and M <= 32, in a block whose tokens' offsets are moderate
     (|k| r <= RAW_KR_LIMIT, the usual case), in the raw form
     p @ xhat = q @ x + sum_n (p c - q k) with q = op(p r): x goes from memory to the tensor
     cores untouched, and the per-token normalisation is folded into the M x BLOCK_N weights
     once per block (about two thirds of the shifted form's instructions per D step).
Before the token loop it forms the score sweep's query operand op(W g) into a per-program
scratch row (M x D in x's dtype, L2-resident) and reduces c_s = sum_d op(W g), which the scores
need (`common.query_operand`, in steps wider than the token loops': `QUERY_BLOCK_D`, see
`heuristics.prologue_block_d`); neither depends on the tokens. Sweep 2 re-reads the BLOCK_N x D
slab that sweep 1 just read (192 KB at 128 tokens of ViT-B/16 in bf16: from L2, not from
registers or shared memory), so x comes from DRAM once. The accumulator acc (M x D
fp32) is too big for registers at ViT widths, so between token blocks it lives in a
per-program fp32 scratch row (L2-resident); when a program sees a single token block
(N <= BLOCK_N) no scratch is touched at all, and the last block writes y directly.
y = g * acc / l + b, because sum_n p = 1.

With split > 1, programs write their unnormalised (acc, m, l) partials and `_combine_kernel`
merges them, rescaling each by exp2(m_s - max_s m_s).

For the backward, in the accumulator dtype (fp32; fp64 for fp64 inputs):
  * always: lse2 = m + log2(l) per (batch, query), (B, M), the softmax normaliser;
  * only when autograd will need them (SAVE_STATS): the token statistics (k, mu - k, rstd),
    (B, 3, N), 12 bytes per token, under 1 % of the bytes of x at ViT widths (2 * D bytes per
    token in fp16); and c_s = sum_d op(W g), (M,), the per-query sum that undoes the shift in
    the scores.
The backward recomputes the scores from x (it sweeps x anyway to form dp) but takes these as
they are, whatever its own tiles: statistics summed again over differently shaped tiles could
differ in the last bits (a reduction's order follows its layout), and then p = exp2(s2 - lse2)
would not be exactly the forward's softmax (`common.shifted_dots` on the dots themselves).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import heuristics
from .common import (LOG2E, as_operand, hi_lo, load_vec, load_x_operand, load_x_tile,
                     merged_rows, mma, normalize_tile, query_operand, softmax_base,
                     softmax_normalizers, to_output, token_block, token_block_scores,
                     token_normalizers, token_range)

# Sweep 2's raw form (bf16 x; `_forward_kernel`): sum_n p xhat = q @ x + sum_n (p c - q k) with
# q = op(p r). RAW_KR_LIMIT is the largest |k| r -- the per-token shift in units of the token's
# standard deviation -- for which a token block takes it. The raw dot's fp32 terms are
# q x = p r (x - k) + p r k, at most about (1 + RAW_KR_LIMIT / |xhat|) times those of the shifted
# form, so its accumulation error grows by that factor: from ~2^-23 to at most ~2^-19 of the
# result, far below the 2^-9 rounding of the bf16 operands that both forms pay. Ordinary
# activations have |mu| r of order 1 (k lies within sqrt(D / 16) standard deviations of mu);
# blocks with a token whose offset dwarfs its spread (mean 1e3, std 5) take the shifted form.
# Not fp16: q = p r must fit the operand format, and r ranges over 1e-3 (massive activations)
# to 1e6 (a constant token at eps = 1e-12), outside fp16's normal range of 6e-5 to 6.5e4 at
# either end; xhat, the shifted form's operand, stays within +-sqrt(D). Not with a key padding
# mask or for M > 32 either, where Triton 3.6 compiles it worse: with a mask it kept q in a
# shared-memory layout that ldmatrix cannot read and ptxas spilled on sm_90; at BLOCK_M = 64 its
# software pipeliner fails on sm_90 ("PassManager::run failed" in TritonGPUPipeline, raw dot on
# warpgroup MMA); the 16-token tiles of BLOCK_M = 128 / 256 gain nothing from it.
RAW_KR_LIMIT = tl.constexpr(16.0)


@triton.jit
def _raw_form_fits(k, r):
    """Whether every token of the block has |k r| <= RAW_KR_LIMIT (a NaN or inf token, whose
    k r is NaN or inf, takes the shifted sweep, which propagates it as the reference does)."""
    return tl.sum(tl.where(tl.abs(k * r) <= RAW_KR_LIMIT, 0, 1)) == 0


@triton.jit
def _acc_tile(acc_ptr, offs_m, m_in, cols, D, not_first):
    """The accumulator columns `cols` of this program's scratch row (M x D, row stride D), as the
    previous token block left them; 0, with nothing read, for the first block and past D.

    Sweep 2 loads each tile one step before it needs it (ACC_AHEAD, `heuristics.acc_ahead`):
    the scratch lives in L2, and a load issued at the top of its own step stalled every step
    of every token block after a program's first (24 per block at D = 768 with 32 columns)
    for a full L2 round trip, which the x tiles, software-pipelined by Triton, do not. The tile
    is read by the threads that wrote it (same pointer layout as the store in `_put_acc`)."""
    return tl.load(acc_ptr + offs_m[:, None] * D + cols[None, :],
                   mask=m_in[:, None] & (cols < D)[None, :] & not_first, other=0.0)


@triton.jit
def _put_acc(acc, acc_ptrs, md_in, cols, last, inv_l, has_tokens, y_ptr, g_ptr, b_ptr, pid_b,
             M, D, FINALIZE: tl.constexpr, HAS_G: tl.constexpr, HAS_B: tl.constexpr,
             EMULATE_BF16: tl.constexpr, ACC: tl.constexpr):
    """After a block's update of the acc columns `cols`: y = g * acc / l + b for the program's
    last block when it owns the whole token axis (FINALIZE), else acc back to its scratch row."""
    if FINALIZE:
        if last:
            g = load_vec(g_ptr, cols, D, HAS_G, 1.0, ACC)
            bias = load_vec(b_ptr, cols, D, HAS_B, 0.0, ACC)
            y = merged_rows(acc, inv_l, has_tokens, g, bias)
            offs_m = tl.arange(0, acc.shape[0])
            y_ptrs = y_ptr + (pid_b * M + offs_m[:, None]) * D + cols[None, :]
            tl.store(y_ptrs, to_output(y, y_ptr.dtype.element_ty, EMULATE_BF16), mask=md_in)
        else:
            tl.store(acc_ptrs, acc, mask=md_in)
    else:
        tl.store(acc_ptrs, acc, mask=md_in)


@triton.jit
def _forward_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd,     # x (B, N, D), any strides
    mask_ptr, stride_mb, stride_mn,              # key padding mask (B, N) uint8, 1 = keep
    w_ptr, stride_wm,                            # queries (M, D), unit stride along D
    g_ptr, b_ptr,                                # LayerNorm weight / bias (D,)
    y_ptr,                                       # (B, M, D) output, x's dtype   [FINALIZE]
    lse_ptr,                                     # (B, M) ACC log2-sum-exp2      [FINALIZE]
    acc_ptr,                                     # (B, split, M, D) ACC scratch / partials
    wg_ptr,                                      # (B, split, M, D) DOT_DTYPE scratch: op(W g),
                                                 # a copy per program (none waits for another)
    ml_ptr,                                      # (B, split, 2, M) ACC partial (max, sum) [not FINALIZE]
    s_ptr,                                       # (B, M, N) ACC base-2 scores [RETURN_SCORES]
    stats_ptr,                                   # (B, 3, N) ACC (k, mu - k, rstd)  [SAVE_STATS]
    qsum_ptr,                                    # (M,) ACC c_s = sum_d op(W g)      [SAVE_STATS]
    N, D, M,
    tokens_per_split,                            # tokens per program, a multiple of BLOCK_N
    scale_hi, scale_lo, eps_hi, eps_lo,          # scale, eps as fp32 hi + lo (`split_hi_lo`)
    FINALIZE: tl.constexpr,                      # split == 1: write y and lse directly
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,                        # D % BLOCK_D == 0: no column masks on x
    QUERY_BLOCK_D: tl.constexpr,                 # columns per step of `query_operand`
    PREFETCH: tl.constexpr,                      # score sweep a step ahead (`heuristics`; on a
                                                 # GPU fp32 / fp64 only: 16-bit tiles pipeline)
    ACC_AHEAD: tl.constexpr,                     # sweep 2's acc tile a step ahead (`_acc_tile`)
    HAS_MASK: tl.constexpr, HAS_G: tl.constexpr, HAS_B: tl.constexpr,
    RETURN_SCORES: tl.constexpr, SAVE_STATS: tl.constexpr,
    RAW_PV: tl.constexpr,                        # bf16, no mask, M <= 32: sweep 2 may take x raw
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    scale = hi_lo(scale_hi, scale_lo, ACC)
    eps = hi_lo(eps_hi, eps_lo, ACC)

    x_ptr += pid_b * stride_xb
    offs_m = tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    row = pid_b * tl.num_programs(1) + pid_s         # this program's scratch row
    acc_ptr += row * M * D

    # The score sweep's query operand op(W g), formed once into this program's scratch row, and
    # c_s = sum_d op(W g), which undoes the token shift in the scores; the backward reads c_s
    # (every program computes the same bits; the first one saves them). In wide steps: the loop
    # is latency, not bytes (`heuristics.prologue_block_d`).
    wg_ptr += row * M * D
    c_s = query_operand(w_ptr, stride_wm, g_ptr, wg_ptr, offs_m, m_in, D, QUERY_BLOCK_D, HAS_G,
                        DOT_DTYPE, EMULATE_BF16, ACC)
    tl.debug_barrier()                               # op(W g) is read by other threads
    if SAVE_STATS:
        tl.store(qsum_ptr + offs_m, c_s, mask=m_in & (row == 0))

    n_start, n_end = token_range(N, tokens_per_split)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n, n_in, valid = token_block(n0, n_end, mask_ptr, stride_mb, stride_mn, pid_b,
                                          BLOCK_N, HAS_MASK)
        shift, mean_rel, rstd, sn = token_block_scores(
            x_ptr, stride_xn, stride_xd, wg_ptr, c_s,
            offs_m, m_in, offs_n, n_in, D, scale, eps,
            BLOCK_D, EVEN_D, PREFETCH, DOT_DTYPE, EMULATE_BF16, INPUT_PRECISION, ACC)
        if SAVE_STATS:
            st_ptrs = stats_ptr + pid_b * 3 * N + offs_n
            tl.store(st_ptrs, shift, mask=n_in)
            tl.store(st_ptrs + N, mean_rel, mask=n_in)
            tl.store(st_ptrs + 2 * N, rstd, mask=n_in)
        s2 = tl.where(valid[None, :], sn * LOG2E, float("-inf"))
        if RETURN_SCORES:
            tl.store(s_ptr + (pid_b * M + offs_m[:, None]) * N + offs_n[None, :], s2,
                     mask=m_in[:, None] & n_in[None, :])

        # Online softmax over tokens.
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        m_base = softmax_base(m_new)
        alpha = tl.exp2(m_i - m_base)
        p = tl.exp2(s2 - m_base[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        k_v, r_v, c_v = token_normalizers(shift, mean_rel, rstd, valid)
        not_first = n0 > n_start
        last = n0 + BLOCK_N >= n_end
        inv_l, has_tokens, _ = softmax_normalizers(m_i, l_i)
        # Sweep 2 in the raw form when the block allows it (bf16 x, RAW_KR_LIMIT):
        #   sum_n p xhat = sum_n q (x - k) + sum_n p c = q @ x + sum_n (p c - q k),
        # q = op(p r) (BLOCK_M, BLOCK_N), computed once per block. x then goes from memory to
        # the tensor cores as it is (exact in its own dtype), with no per-element work. Tokens
        # past the end have r = c = k = 0 and load as 0 (RAW_PV excludes key padding masks).
        if RAW_PV and _raw_form_fits(k_v, r_v):
            q = as_operand(p * r_v[None, :], DOT_DTYPE, EMULATE_BF16)
            row_const = tl.sum(p * c_v[None, :] - q.to(ACC) * k_v[None, :], axis=1)
            if ACC_AHEAD:
                acc_next = _acc_tile(acc_ptr, offs_m, m_in, offs_d, D, not_first)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                md_in = m_in[:, None] & (cols < D)[None, :]
                x = load_x_operand(x_ptr, stride_xn, stride_xd, offs_n, n_in, cols, D, EVEN_D,
                                   EMULATE_BF16)
                if ACC_AHEAD:
                    acc = acc_next
                    acc_next = _acc_tile(acc_ptr, offs_m, m_in, cols + BLOCK_D, D, not_first)
                else:
                    acc = _acc_tile(acc_ptr, offs_m, m_in, cols, D, not_first)
                acc_ptrs = acc_ptr + offs_m[:, None] * D + cols[None, :]
                acc = mma(q, x, acc * alpha[:, None] + row_const[:, None], INPUT_PRECISION, ACC)
                _put_acc(acc, acc_ptrs, md_in, cols, last, inv_l, has_tokens, y_ptr, g_ptr, b_ptr,
                         pid_b, M, D, FINALIZE, HAS_G, HAS_B, EMULATE_BF16, ACC)
        else:
            p_op = as_operand(p, DOT_DTYPE, EMULATE_BF16)
            if ACC_AHEAD:
                acc_next = _acc_tile(acc_ptr, offs_m, m_in, offs_d, D, not_first)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                md_in = m_in[:, None] & (cols < D)[None, :]
                # Masked tokens are not read: their operand is 0 whatever their data.
                x = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, valid, cols, D, EVEN_D, ACC)
                xhat = as_operand(normalize_tile(x, k_v, r_v, c_v), DOT_DTYPE, EMULATE_BF16)
                if ACC_AHEAD:
                    acc = acc_next
                    acc_next = _acc_tile(acc_ptr, offs_m, m_in, cols + BLOCK_D, D, not_first)
                else:
                    acc = _acc_tile(acc_ptr, offs_m, m_in, cols, D, not_first)
                acc_ptrs = acc_ptr + offs_m[:, None] * D + cols[None, :]
                acc = mma(p_op, xhat, acc * alpha[:, None], INPUT_PRECISION, ACC)
                _put_acc(acc, acc_ptrs, md_in, cols, last, inv_l, has_tokens, y_ptr, g_ptr, b_ptr,
                         pid_b, M, D, FINALIZE, HAS_G, HAS_B, EMULATE_BF16, ACC)

    if FINALIZE:
        _inv_l, _has, lse = softmax_normalizers(m_i, l_i)
        tl.store(lse_ptr + pid_b * M + offs_m, lse, mask=m_in)
    else:
        # Every program owns tokens (`heuristics.token_split`) and has written its acc; one whose
        # tokens are all masked out stores (m, l) = (-inf, 0), which the combine kernel skips.
        tl.store(ml_ptr + row * 2 * M + offs_m, m_i, mask=m_in)
        tl.store(ml_ptr + row * 2 * M + M + offs_m, l_i, mask=m_in)


@triton.jit
def _combine_kernel(
    acc_ptr,          # (B, num_splits, M, D) ACC partial accumulators
    ml_ptr,           # (B, num_splits, 2, M) ACC partial (max, sum)
    g_ptr, b_ptr,     # (D,) LayerNorm weight / bias [HAS_G / HAS_B]
    y_ptr,            # (B, M, D) output, x's dtype
    lse_ptr,          # (B, M) ACC
    D, M, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr, HAS_B: tl.constexpr, EMULATE_BF16: tl.constexpr, ACC: tl.constexpr,
):
    """y = g * sum_s exp2(m_s - m) acc_s / L + b,  L = sum_s exp2(m_s - m) l_s,  m = max_s m_s."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md_in = m_in[:, None] & (cols < D)[None, :]
    ml_ptr += pid_b * num_splits * 2 * M
    acc_ptr += pid_b * num_splits * M * D

    m_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(ml_ptr + s * 2 * M + offs_m, mask=m_in,
                                          other=float("-inf")))
    m_base = softmax_base(m_max)
    big_l = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for s in range(num_splits):
        m_s = tl.load(ml_ptr + s * 2 * M + offs_m, mask=m_in, other=float("-inf"))
        l_s = tl.load(ml_ptr + s * 2 * M + M + offs_m, mask=m_in, other=0.0)
        w_s = tl.exp2(m_s - m_base)
        big_l += w_s * l_s
        # Skip only partials that saw no unmasked token (l = 0, weight 0). A NaN l_s (a NaN
        # token in this split) must be read: with `l_s > 0` its NaN acc was dropped and y came
        # out 0 instead of NaN.
        part = tl.load(acc_ptr + (s * M + offs_m[:, None]) * D + cols[None, :],
                       mask=md_in & (l_s != 0)[:, None], other=0.0)
        acc += w_s[:, None] * part

    g = load_vec(g_ptr, cols, D, HAS_G, 1.0, ACC)
    bias = load_vec(b_ptr, cols, D, HAS_B, 0.0, ACC)
    inv_l, has_tokens, lse = softmax_normalizers(m_max, big_l)
    y = merged_rows(acc, inv_l, has_tokens, g, bias)
    tl.store(y_ptr + (pid_b * M + offs_m[:, None]) * D + cols[None, :],
             to_output(y, y_ptr.dtype.element_ty, EMULATE_BF16), mask=md_in)
    if pid_d == 0:
        tl.store(lse_ptr + pid_b * M + offs_m, lse, mask=m_in)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float32: tl.float32, torch.float64: tl.float64}


def kernel_dtypes(dtype: torch.dtype):
    """(DOT_DTYPE, EMULATE_BF16, ACC, torch accumulator dtype) for inputs of `dtype`."""
    emulate = dtype == torch.bfloat16 and heuristics.interpreting()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return _TL_DTYPE[dtype], emulate, _TL_DTYPE[acc], acc


def device_of(t: torch.Tensor):
    """A context in which kernels launch on t's GPU. Triton launches on the *current* CUDA
    device and its current stream, while torch allocates on the tensor's device: with a model
    spread over GPUs without `torch.cuda.set_device` (pipeline or manual model parallelism), a
    launch for tensors on cuda:1 would run on cuda:0. Entered only when the devices differ (a
    device switch is not free)."""
    if t.device.type == "cuda" and t.device.index is not None \
            and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=256)
def split_hi_lo(v: float):
    """v as two fp32 numbers whose fp64 sum is v to ~48 bits (Triton passes floats as fp32).
    Cached: eps and scale are the same on every call, and two tensor round trips are not free."""
    hi = float(torch.tensor(v, dtype=torch.float32))
    return hi, float(torch.tensor(v - hi, dtype=torch.float32))


class ForwardResult(NamedTuple):
    """What `patch_merger_forward` returns. Everything but y is in the accumulator dtype (fp32;
    fp64 for fp64 inputs)."""

    y: torch.Tensor                   # (B, M, D), x's dtype
    lse: torch.Tensor                 # (B, M) base-2 log-sum-exp of the scores
    stats: Optional[torch.Tensor]     # (B, 3, N) per-token (k, mu - k, rstd), if save_stats
    qsum: Optional[torch.Tensor]      # (M,) c_s = sum_d op(W g), if save_stats
    scores: Optional[torch.Tensor]    # (B, M, N) base-2 masked scores, if return_scores


def patch_merger_forward(x, queries, weight, bias, eps, scale, mask=None,
                         return_scores=False, config=None, save_stats=False,
                         raw_pv=True) -> ForwardResult:
    """Launch the fused forward on x (B, N, D) (any strides), queries (M, D), weight/bias (D,)
    or None, mask (B, N) bool or None. Inputs are assumed validated (see `ops`).

    `save_stats` also writes what `patch_merger_backward` needs besides y and lse (the token
    statistics and c_s); `return_scores` the base-2 scores s2. `raw_pv=False` keeps sweep 2 in
    the shifted form for every token block (it only matters for bf16 x without a mask at
    M <= 32; see RAW_KR_LIMIT), for A/B timing and tests.
    """
    bsz, n, d = x.shape
    m = queries.shape[0]
    cfg = config or heuristics.forward_config(bsz, n, d, m, x.dtype, x.device)
    dot_dtype, emulate, acc_tl, acc_torch = kernel_dtypes(x.dtype)

    y = torch.empty((bsz, m, d), dtype=x.dtype, device=x.device)
    lse = torch.empty((bsz, m), dtype=acc_torch, device=x.device)
    scores = (torch.empty((bsz, m, n), dtype=acc_torch, device=x.device)
              if return_scores else None)
    stats = torch.empty((bsz, 3, n), dtype=acc_torch, device=x.device) if save_stats else None
    qsum = torch.empty((m,), dtype=acc_torch, device=x.device) if save_stats else None
    split, tokens_per_split = heuristics.token_split(n, cfg.split, cfg.block_n)
    needs_scratch = split > 1 or n > cfg.block_n
    acc = (torch.empty((bsz, split, m, d), dtype=acc_torch, device=x.device)
           if needs_scratch else lse)
    wg = torch.empty((bsz, split, m, d), dtype=x.dtype, device=x.device)
    ml = (torch.empty((bsz, split, 2, m), dtype=acc_torch, device=x.device)
          if split > 1 else lse)
    queries = queries.contiguous()
    # The kernels read weight / bias as g_ptr + d (unit stride, `common.load_vec`): a strided
    # (D,) view such as `big[::2]` or an expanded `t.expand(D)` was read as if contiguous
    # (wrong y). `.contiguous()` is a no-op for ordinary parameters.
    # (The kernels' w_ptr is the queries W; these are the LayerNorm's g and b, or a placeholder.)
    g_arg = weight.contiguous() if weight is not None else queries
    b_arg = bias.contiguous() if bias is not None else queries
    mk = mask.view(torch.uint8) if mask is not None else x
    mk_strides = mask.stride() if mask is not None else (0, 0)
    scale_hi, scale_lo = split_hi_lo(scale)
    eps_hi, eps_lo = split_hi_lo(eps)

    with device_of(x):
        _forward_kernel[(bsz, split)](
            x, *x.stride(), mk, *mk_strides, queries, queries.stride(0), g_arg, b_arg,
            y, lse, acc, wg, ml, scores if scores is not None else lse,
            stats if save_stats else lse, qsum if save_stats else lse,
            n, d, m, tokens_per_split, scale_hi, scale_lo, eps_hi, eps_lo,
            FINALIZE=split == 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            EVEN_D=d % cfg.block_d == 0,
            QUERY_BLOCK_D=heuristics.prologue_block_d(d, m, cfg.num_warps, cfg.block_d),
            PREFETCH=heuristics.prefetch(cfg), ACC_AHEAD=heuristics.acc_ahead(cfg),
            HAS_MASK=mask is not None, HAS_G=weight is not None, HAS_B=bias is not None,
            RETURN_SCORES=return_scores, SAVE_STATS=save_stats,
            RAW_PV=raw_pv and x.dtype == torch.bfloat16 and mask is None and cfg.block_m <= 32,
            DOT_DTYPE=dot_dtype, EMULATE_BF16=emulate,
            INPUT_PRECISION=heuristics.input_precision(x.dtype), ACC=acc_tl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
        )
        if split > 1:
            ccfg = heuristics.combine_config(d, m)
            _combine_kernel[(bsz, heuristics.cdiv(d, ccfg.block_d))](
                acc, ml, g_arg, b_arg, y, lse, d, m, split,
                BLOCK_M=ccfg.block_m, BLOCK_D=ccfg.block_d,
                HAS_G=weight is not None, HAS_B=bias is not None, EMULATE_BF16=emulate, ACC=acc_tl,
                num_warps=ccfg.num_warps, num_stages=1,
            )
    return ForwardResult(y, lse, stats, qsum, scores)
