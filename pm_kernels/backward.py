"""Backward kernels of the fused PatchMerger and their launcher `patch_merger_backward`.

Per batch element, with dy (M, D) and the forward's lse2 (M,), the gradients are
    dp'[m,n] = sum_d dy[m,d] g[d] xhat[n,d]       (dp = dy @ xn^T minus the n-constant dy.b)
    Delta'   = sum_n p dp' = sum_d dy (y - b)      (`_delta_kernel`, the softmax-backward preprocess)
    ds       = p * (dp' - Delta')                  (the dy.b constant cancels between dp and Delta)
    dxn      = p^T dy + scale * ds^T W             (N, D)
    dW       = scale * g * (ds @ xhat)             (sum_n ds = 0 removes the bias term)
    dg       = sum_n dxn * xhat
    db       = sum_m dy over the rows m that saw a token   (`_delta_kernel`, which reads dy anyway)
    dx       = r * (g dxn - mean_d(g dxn) - xhat * mean_d(g dxn xhat))
db = sum_n dxn = sum_m (sum_n p) dy + scale * sum_m (sum_n ds) W with sum_n p = 1 (0 for a row
whose tokens are all masked) and sum_n ds = 0: the bias passes straight through the merge, as the
forward computes it (y = g * (p @ xhat) + b, b added once per row that saw a token). Summing dy is
the exact gradient; summing dxn over the tokens in the dx sweep met those identities only up to
rounding, and cost a cross-warp column reduction per D step.
The two row means of the LayerNorm backward come from per-(m, n) quantities of the score pass:
    sum_d g dxn      = sum_m p a[m] + scale * sum_m ds cw[m]    a = dy @ g, cw = W @ g
    sum_d g dxn xhat = sum_m p dp' + sum_m ds sn                 sn = the scores
so each token block needs two sweeps over D, as in the forward: the score sweep shared with the
forward (`common.shifted_dots`: the dots of W g and dy g with the shifted tokens, which with the
statistics the forward saved give the forward's scores exactly) and one sweep that forms dxn
tile by tile and writes dx at once. What the score sweep needs of W, g and dy (the rounded dot
operands op(W g), op(dy g) and the per-query sums over D) does not depend on the tokens: the
small `_delta_kernel` forms it once per batch element (`_score_operands`), not every token
block.

Weight gradients are reduced deterministically: each program accumulates its tokens into its own
fp32 partial row (dW: (P, M, D), dg: (P, D); db: (B, D), from `_delta_kernel`) and `torch.sum`
over the rows finishes the job. No atomics anywhere, so gradients are bitwise identical from run
to run. Gradients autograd does not ask for (`needs`, from ctx.needs_input_grad) are neither
computed nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import heuristics
from .common import (LOG2E, as_operand, hi_lo, load_vec, load_x_tile, mma, normalize_tile,
                     scaled_operand, shifted_dots, to_output, token_block, token_normalizers,
                     token_range, unshift)
from .forward import device_of, kernel_dtypes, split_hi_lo


@triton.jit
def _score_operands(
    w_ptr, stride_wm,                   # queries W (M, D), unit stride along D
    g_ptr,                              # LayerNorm weight (D,) (read when HAS_G)
    dy_ptr, stride_dym, stride_dyd,     # dy of this batch element (M, D)
    wg_ptr,                             # out (M, D) DOT_DTYPE: op(W g)  [write_wg]
    dyg_ptr,                            # out (M, D) DOT_DTYPE: op(dy g) of this batch element
    offs_m, m_in, D,
    write_wg,                           # this program writes op(W g) (one program does)
    BLOCK_D: tl.constexpr, HAS_G: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, ACC: tl.constexpr,
):
    """What the token kernel's score sweep needs of the queries and dy, once per batch element
    (they do not depend on the tokens):
        op(W g), op(dy g)                    the dot operands (`common.scaled_operand`: the
                                             very bits the forward's score sweep forms from W)
        c_dp[m] = sum_d op(dy[m,d] g[d])     undoes the per-token shift in dp (`common.unshift`;
                                             the forward's c_s is the same sum for W)
        a[m]    = sum_d dy[m,d] g[d]         the row-mean terms of the module docstring
        cw[m]   = sum_d W[m,d] g[d]
    Stored operands spare every token block's score sweep the loads of W, g and dy, their
    products and their rounding, and every program (one per 32-token block at the paper's
    shapes) the sums. Columns are summed tile-wise and reduced once, after the loop (see
    `common.query_operand`)."""
    offs_d = tl.arange(0, BLOCK_D)
    c_dp = tl.zeros((offs_m.shape[0], BLOCK_D), dtype=ACC)
    a = tl.zeros((offs_m.shape[0], BLOCK_D), dtype=ACC)
    cw = tl.zeros((offs_m.shape[0], BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        md_in = m_in[:, None] & (cols < D)[None, :]
        g = load_vec(g_ptr, cols, D, HAS_G, 1.0, ACC)
        w = tl.load(w_ptr + offs_m[:, None] * stride_wm + cols[None, :], mask=md_in, other=0.0)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols[None, :] * stride_dyd,
                     mask=md_in, other=0.0)
        dyg_op = scaled_operand(dy, g, DOT_DTYPE, EMULATE_BF16, ACC)
        out = offs_m[:, None] * D + cols[None, :]
        tl.store(dyg_ptr + out, dyg_op.to(dyg_ptr.dtype.element_ty), mask=md_in)
        if write_wg:
            wg_op = scaled_operand(w, g, DOT_DTYPE, EMULATE_BF16, ACC)
            tl.store(wg_ptr + out, wg_op.to(wg_ptr.dtype.element_ty), mask=md_in)
        c_dp += dyg_op.to(ACC)
        a += dy.to(ACC) * g[None, :]
        cw += w.to(ACC) * g[None, :]
    return tl.sum(c_dp, axis=1), tl.sum(a, axis=1), tl.sum(cw, axis=1)


@triton.jit
def _delta_kernel(
    dy_ptr, stride_dyb, stride_dym, stride_dyd,   # dy (B, M, D), any strides
    y_ptr,                                        # y (B, M, D), contiguous
    w_ptr, stride_wm,                             # queries W (M, D), unit stride along D
    g_ptr, b_ptr,                                 # LayerNorm weight / bias (D,)
    lse_ptr,                                      # (B, M) ACC: the forward's lse2   [NEED_DB]
    delta_ptr,                                    # (B, M) ACC out
    db_part_ptr,                                  # (B, D) ACC out                  [NEED_DB]
    # [NEED_OPERANDS] outputs, for the token kernel's score sweep:
    qs_ptr,                                       # (B, 3, M) ACC: (c_dp, a, cw)
    wg_ptr,                                       # (M, D) DOT_DTYPE: op(W g)
    dyg_ptr,                                      # (B, M, D) DOT_DTYPE: op(dy g)
    D, M,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_G: tl.constexpr, HAS_B: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_OPERANDS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, ACC: tl.constexpr,
):
    """Delta'[b, m] = sum_d dy[b,m,d] * (y[b,m,d] - bias[d]), and, while dy is at hand:
      * the bias gradient's partial row db_part[b, :] = sum_m live[b,m] dy[b,m,:] (module
        docstring), live = 1 for a row that saw a token (lse2 > -inf), 0 for one whose tokens
        were all masked, NaN where lse2 is NaN (a NaN token), so that db is NaN there as in the
        reference;
      * the score-sweep operands and per-query sums of the token kernel (`_score_operands`),
        once per batch element instead of once per token block; program 0 writes op(W g).
    Both sweeps are a memory round trip per step and little else, so they take wide steps
    (`heuristics.delta_config`): 3 per sweep at ViT-B/16 instead of 12."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    lse = tl.load(lse_ptr + pid_b * M + offs_m, mask=m_in & NEED_DB, other=float("-inf"))
    live = tl.where(lse == float("-inf"), 0.0, tl.where(lse == lse, 1.0, lse))
    delta = tl.zeros((BLOCK_M,), ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        md_in = m_in[:, None] & (cols < D)[None, :]
        dy = tl.load(dy_ptr + pid_b * stride_dyb + offs_m[:, None] * stride_dym
                     + cols[None, :] * stride_dyd, mask=md_in, other=0.0).to(ACC)
        y = tl.load(y_ptr + (pid_b * M + offs_m[:, None]) * D + cols[None, :], mask=md_in,
                    other=0.0).to(ACC)
        bias = load_vec(b_ptr, cols, D, HAS_B, 0.0, ACC)
        delta += tl.sum(dy * (y - bias[None, :]), axis=1)
        if NEED_DB:
            tl.store(db_part_ptr + pid_b * D + cols, tl.sum(dy * live[:, None], axis=0),
                     mask=cols < D)
    tl.store(delta_ptr + pid_b * M + offs_m, delta, mask=m_in)
    if NEED_OPERANDS:
        c_dp, a, cw = _score_operands(w_ptr, stride_wm, g_ptr, dy_ptr + pid_b * stride_dyb,
                                      stride_dym, stride_dyd, wg_ptr, dyg_ptr + pid_b * M * D,
                                      offs_m, m_in, D, pid_b == 0, BLOCK_D, HAS_G,
                                      DOT_DTYPE, EMULATE_BF16, ACC)
        qs_ptr += pid_b * 3 * M + offs_m
        tl.store(qs_ptr, c_dp, mask=m_in)
        tl.store(qs_ptr + M, a, mask=m_in)
        tl.store(qs_ptr + 2 * M, cw, mask=m_in)


@triton.jit
def _token_vector(ptrs, n_in, offs_d):
    """The per-token values at ptrs (BLOCK_N,) as a vector in the row layout of the
    (BLOCK_N, BLOCK_D) x tiles it is broadcast against; 0 for tokens not in n_in (past the
    program's range).

    Loaded as column 0 of such a tile and summed along the row, which is exact (one value plus
    zeros). A plain 1-D load leaves Triton free to pick the vector's layout: it picked the MMA
    layout of dxn and then normalised x in two layouts in every step of the dx sweep (13 % more
    instructions per step)."""
    tile = tl.load(ptrs[:, None] + 0 * offs_d[None, :], mask=n_in[:, None] & (offs_d == 0)[None, :],
                   other=0.0)
    return tl.sum(tile, axis=1)


@triton.jit
def _backward_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd,      # x (B, N, D), any strides
    mask_ptr, stride_mb, stride_mn,               # key padding mask (B, N) uint8, 1 = keep
    w_ptr, stride_wm,                             # queries W (M, D), unit stride along D
    g_ptr,                                        # LayerNorm weight (D,) [HAS_G]
    dy_ptr, stride_dyb, stride_dym, stride_dyd,   # dy (B, M, D), any strides
    lse_ptr, delta_ptr,                           # (B, M) ACC: forward's lse2, Delta'
    qs_ptr,                                       # (B, 3, M) ACC: (c_dp, a, cw)  `_score_operands`
    wg_ptr,                                       # (M, D) DOT_DTYPE: op(W g)     `_score_operands`
    dyg_ptr,                                      # (B, M, D) DOT_DTYPE: op(dy g) `_score_operands`
    stats_ptr,                                    # (B, 3, N) ACC: forward's (k, mu - k, rstd)
    qsum_ptr,                                     # (M,) ACC: forward's c_s = sum_d op(W g)
    dx_ptr,                                       # (B, N, D) out, x's dtype, contiguous
    dw_part_ptr,                                  # (P, M, D) ACC partial sum_n scale*ds*xhat
    dg_part_ptr,                                  # (P, D) ACC partial sum_n dxn*xhat
    N, D, M,
    tokens_per_split,                             # tokens per program, a multiple of BLOCK_N
    scale_hi, scale_lo,                           # scale as fp32 hi + lo (`split_hi_lo`)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,                         # D % BLOCK_D == 0: no column masks on x
    ONE_BLOCK: tl.constexpr,                      # tokens_per_split <= BLOCK_N (see below)
    PREFETCH: tl.constexpr,                       # score sweep a step ahead (`heuristics`)
    HAS_MASK: tl.constexpr, HAS_G: tl.constexpr,
    NEED_DX: tl.constexpr,                        # dx
    NEED_DW: tl.constexpr,                        # dqueries (dW: W is the queries)
    NEED_DG: tl.constexpr,                        # dweight (dg)
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    # NEED_*: which gradients autograd asked for (ctx.needs_input_grad); the others are neither
    # computed nor written (a frozen x saves the N x D dx write, half the backward's bytes).
    # db is not among them: `_delta_kernel` sums it from dy (module docstring).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    scale = hi_lo(scale_hi, scale_lo, ACC)

    x_ptr += pid_b * stride_xb
    dy_ptr += pid_b * stride_dyb
    dx_ptr += pid_b * N * D
    row = pid_b * tl.num_programs(1) + pid_s      # this program's partial-sum row
    dw_part_ptr += row * M * D
    dg_part_ptr += row * D

    offs_m = tl.arange(0, BLOCK_M)
    m_in = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + pid_b * M + offs_m, mask=m_in, other=float("-inf"))
    delta = tl.load(delta_ptr + pid_b * M + offs_m, mask=m_in, other=0.0)

    c_s = tl.load(qsum_ptr + offs_m, mask=m_in, other=0.0)
    qs_ptr += pid_b * 3 * M + offs_m
    c_dp = tl.load(qs_ptr, mask=m_in, other=0.0)
    a = tl.load(qs_ptr + M, mask=m_in, other=0.0)
    cw = tl.load(qs_ptr + 2 * M, mask=m_in, other=0.0)
    n_start, n_end = token_range(N, tokens_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n, n_in, valid = token_block(n0, n_end, mask_ptr, stride_mb, stride_mn, pid_b,
                                          BLOCK_N, HAS_MASK)
        # The forward's statistics, as it used them (see forward.py: why they are not
        # recomputed). Tokens beyond N read 0: their x - k is masked to 0 anyway.
        st_ptrs = stats_ptr + pid_b * 3 * N + offs_n
        shift = _token_vector(st_ptrs, n_in, offs_d)
        mean_rel = _token_vector(st_ptrs + N, n_in, offs_d)
        rstd = _token_vector(st_ptrs + 2 * N, n_in, offs_d)
        acc_s, acc_dp, _sum_xk, _sum_xk2 = shifted_dots(
            x_ptr, stride_xn, stride_xd, wg_ptr, dyg_ptr + pid_b * M * D, shift,
            offs_m, m_in, offs_n, n_in, D,
            BLOCK_D, EVEN_D, True, False, PREFETCH, DOT_DTYPE, EMULATE_BF16, INPUT_PRECISION,
            ACC)
        sn = unshift(acc_s, mean_rel, rstd, c_s, scale)
        dp = unshift(acc_dp, mean_rel, rstd, c_dp, 1.0)
        # p = 0 (not exp2(nan)) for masked tokens and padding rows m >= M. A row with lse = -inf
        # is one whose batch element has every token masked: `valid` is False all along it.
        live = m_in[:, None] & valid[None, :]
        p = tl.where(live, tl.exp2(sn * LOG2E - lse[:, None]), 0.0)
        ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
        # Row means of the LayerNorm backward (see the module docstring), for D columns at once.
        mean_gdxn = (tl.sum(p * a[:, None], axis=0) + scale * tl.sum(ds * cw[:, None], axis=0)) / D
        mean_gdxn_xhat = tl.sum(tl.where(live, p * dp + ds * sn, 0.0), axis=0) / D

        p_t = tl.trans(as_operand(p, DOT_DTYPE, EMULATE_BF16))              # (BLOCK_N, BLOCK_M)
        sds = as_operand(scale * ds, DOT_DTYPE, EMULATE_BF16)               # (BLOCK_M, BLOCK_N)
        sds_t = tl.trans(sds)
        # xhat of the dx sweep, 0 for masked tokens. x is loaded for every token in range,
        # masked or not (a select on the tile compiled shorter here than the forward's masked
        # load), so it is the select, not the zeroed normalizers, that keeps a NaN or inf in a
        # masked token out of xhat (NaN * 0 = NaN).
        k_v, r_v, c_v = token_normalizers(shift, mean_rel, rstd, valid)
        # A program's first token block starts its partial rows from zero; with one block per
        # program (ONE_BLOCK, the paper's shapes) they are written once and never read back.
        not_first = n0 > n_start
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            d_in = cols < D
            md_in = m_in[:, None] & d_in[None, :]
            x = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in, cols, D, EVEN_D, ACC)
            xhat = tl.where(valid[:, None], normalize_tile(x, k_v, r_v, c_v), 0.0)
            if NEED_DX or NEED_DG:
                dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + cols[None, :] * stride_dyd,
                             mask=md_in, other=0.0)
                w = tl.load(w_ptr + offs_m[:, None] * stride_wm + cols[None, :], mask=md_in,
                            other=0.0)
                dxn = mma(p_t, as_operand(dy.to(ACC), DOT_DTYPE, EMULATE_BF16),
                          tl.zeros((BLOCK_N, BLOCK_D), ACC), INPUT_PRECISION, ACC)
                dxn = mma(sds_t, as_operand(w.to(ACC), DOT_DTYPE, EMULATE_BF16), dxn,
                          INPUT_PRECISION, ACC)                             # (BLOCK_N, BLOCK_D)
                if NEED_DX:
                    g = load_vec(g_ptr, cols, D, HAS_G, 1.0, ACC)
                    dx = rstd[:, None] * (dxn * g[None, :] - mean_gdxn[:, None]
                                          - xhat * mean_gdxn_xhat[:, None])
                    dx = tl.where(valid[:, None], dx, 0.0)
                    tl.store(dx_ptr + offs_n[:, None] * D + cols[None, :],
                             to_output(dx, dx_ptr.dtype.element_ty, EMULATE_BF16),
                             mask=n_in[:, None] & d_in[None, :])
                if NEED_DG:
                    dg = tl.sum(dxn * xhat, axis=0)
                    if not ONE_BLOCK:
                        dg += tl.load(dg_part_ptr + cols, mask=d_in & not_first, other=0.0)
                    tl.store(dg_part_ptr + cols, dg, mask=d_in)
            if NEED_DW:
                dw_ptrs = dw_part_ptr + offs_m[:, None] * D + cols[None, :]
                if ONE_BLOCK:
                    dw = tl.zeros((BLOCK_M, BLOCK_D), ACC)
                else:
                    dw = tl.load(dw_ptrs, mask=md_in & not_first, other=0.0)
                dw = mma(sds, as_operand(xhat, DOT_DTYPE, EMULATE_BF16), dw, INPUT_PRECISION,
                         ACC)
                tl.store(dw_ptrs, dw, mask=md_in)


def patch_merger_backward(dy, x, queries, weight, bias, y, lse, stats, qsum, scale, mask=None,
                          config=None, needs=(True, True, True, True)):
    """Gradients of the fused op. dy (B, M, D) and x (B, N, D) may have any strides; y, lse,
    stats and qsum are the forward's (`patch_merger_forward(..., save_stats=True)`). `needs`
    says which of (dx, dqueries, dweight, dbias) to compute (autograd's needs_input_grad).
    Returns them in the dtypes of x, queries, weight and bias; None for each one not needed (and
    for dweight / dbias when weight / bias is None). There is no eps: the LayerNorm statistics
    are the forward's."""
    bsz, n, d = x.shape
    m = queries.shape[0]
    if (stats is None or qsum is None or tuple(stats.shape) != (bsz, 3, n)
            or tuple(qsum.shape) != (m,)):
        raise ValueError("patch_merger_backward needs the forward's token statistics (B, 3, N) "
                         "and c_s (M,): run patch_merger_forward with save_stats=True")
    need_dx, need_dq = needs[0], needs[1]
    need_dg, need_db = needs[2] and weight is not None, needs[3] and bias is not None
    if not (need_dx or need_dq or need_dg or need_db):
        return None, None, None, None
    cfg = config or heuristics.backward_config(bsz, n, d, m, x.dtype, x.device)
    dot_dtype, emulate, acc_tl, acc_torch = kernel_dtypes(x.dtype)
    dev = x.device
    queries = queries.contiguous()
    # Unit-stride weight / bias, as in `patch_merger_forward` (the kernels take no stride for them).
    g_arg = weight.contiguous() if weight is not None else queries
    b_arg = bias.contiguous() if bias is not None else queries
    y = y.contiguous()

    need_tokens = need_dx or need_dq or need_dg      # the token kernel runs
    delta = torch.empty((bsz, m), dtype=acc_torch, device=dev)
    db_part = torch.empty((bsz, d), dtype=acc_torch, device=dev) if need_db else delta
    qsums = torch.empty((bsz, 3, m), dtype=acc_torch, device=dev) if need_tokens else delta
    # The score sweep's operands op(W g) and op(dy g), in the dtype the dots take (x's).
    wg_op = torch.empty((m, d), dtype=x.dtype, device=dev) if need_tokens else delta
    dyg_op = torch.empty((bsz, m, d), dtype=x.dtype, device=dev) if need_tokens else delta
    dcfg = heuristics.delta_config(d, m, cfg)
    on_device = device_of(x)
    with on_device:
        _delta_kernel[(bsz,)](
            dy, *dy.stride(), y, queries, queries.stride(0), g_arg, b_arg, lse, delta,
            db_part, qsums, wg_op, dyg_op, d, m,
            BLOCK_M=dcfg.block_m, BLOCK_D=dcfg.block_d, HAS_G=weight is not None,
            HAS_B=bias is not None, NEED_DB=need_db, NEED_OPERANDS=need_tokens,
            DOT_DTYPE=dot_dtype, EMULATE_BF16=emulate, ACC=acc_tl,
            num_warps=dcfg.num_warps, num_stages=1,
        )
    db = db_part.sum(0).to(bias.dtype) if need_db else None
    if not need_tokens:
        return None, None, None, db

    split, tokens_per_split = heuristics.token_split(n, cfg.split, cfg.block_n)
    parts = bsz * split
    # Outputs not needed are not allocated: the kernel gets `delta` as a placeholder pointer
    # and never touches it (NEED_* = False).
    dx = torch.empty((bsz, n, d), dtype=x.dtype, device=dev) if need_dx else delta
    dw_part = torch.empty((parts, m, d), dtype=acc_torch, device=dev) if need_dq else delta
    dg_part = torch.empty((parts, d), dtype=acc_torch, device=dev) if need_dg else delta
    mk = mask.view(torch.uint8) if mask is not None else x
    mk_strides = mask.stride() if mask is not None else (0, 0)
    scale_hi, scale_lo = split_hi_lo(scale)

    with on_device:
        _backward_kernel[(bsz, split)](
            x, *x.stride(), mk, *mk_strides, queries, queries.stride(0), g_arg,
            dy, *dy.stride(), lse, delta, qsums, wg_op, dyg_op, stats, qsum, dx, dw_part, dg_part,
            n, d, m, tokens_per_split, scale_hi, scale_lo,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            EVEN_D=d % cfg.block_d == 0, ONE_BLOCK=tokens_per_split <= cfg.block_n,
            PREFETCH=heuristics.prefetch(cfg),
            HAS_MASK=mask is not None, HAS_G=weight is not None,
            NEED_DX=need_dx, NEED_DW=need_dq, NEED_DG=need_dg,
            DOT_DTYPE=dot_dtype, EMULATE_BF16=emulate,
            INPUT_PRECISION=heuristics.input_precision(x.dtype), ACC=acc_tl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
        )
    # Deterministic final reductions over the P partial rows (fixed order, no atomics).
    dq = None
    if need_dq:
        dw = dw_part.sum(0)
        if weight is not None:
            dw = dw * weight.to(acc_torch)
        dq = dw.to(queries.dtype)
    dg = dg_part.sum(0).to(weight.dtype) if need_dg else None
    return (dx if need_dx else None), dq, dg, db
