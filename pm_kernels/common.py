"""`@triton.jit` helpers shared by the forward and the backward kernels.

The one piece of math both directions need is the *score pass* over a block of tokens: the
scores s = scale * (W*g) @ xhat^T, from one sweep over D of dots with the shifted tokens
(`shifted_dots`) and a correction that removes the shift (`unshift`). The forward's
`token_block_scores` also sums each token's LayerNorm statistics in that sweep and saves them;
the backward reads them, so it forms the scores whose log-sum-exp the forward saved from the
same statistics and the same rounded dot operands, in the same accumulation order but for
fp32 at "high" precision (see `shifted_dots`): p = exp2(s2 - lse2) in the backward is the
forward's softmax.

Notation used in every kernel of the package (one batch element):
    x (N, D)   W (M, D)   g, b (D,)
    mu_n, r_n  mean and 1/sqrt(var + eps) of token n over D (fp32; fp64 for fp64 inputs)
    xhat = (x - mu) * r,  xn = xhat * g + b
    sn[m, n] = scale * sum_d W[m, d] g[d] xhat[n, d]     natural-unit scores
    s2 = sn * log2(e)                                     base-2 scores (exp2 is the fast one)
The bias term scale * W @ b is constant along the token axis and cancels in the softmax over N,
so it is never computed; the saved log-sum-exp is that of s2 as defined here.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(v) = exp2(v * LOG2E)
SHIFT_D = tl.constexpr(16)                # features averaged for the per-token shift k


@triton.jit
def round_to_bf16(v):
    """Round fp32 `v` to the nearest bf16 (ties to even), returned as fp32.

    Only used under TRITON_INTERPRET=1, whose fp32 -> bf16 cast truncates and whose bf16 dot
    multiplies raw bits; there the bf16 operands are rounded with this and kept in fp32, which
    reproduces the GPU's bf16 tensor-core numerics (exact products, fp32 accumulation)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def as_operand(v, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast an fp32 tile to the dtype fed to tl.dot (x's dtype: fp16/bf16 tensor cores, fp32 or
    fp64). With EMULATE_BF16 (interpreter + bf16) the value is rounded but stays fp32."""
    if EMULATE_BF16:
        return round_to_bf16(v.to(tl.float32))
    else:
        return v.to(DOT_DTYPE)


@triton.jit
def load_operand(ptrs, mask, EMULATE_BF16: tl.constexpr):
    """A tile stored in the dot's dtype (0 where masked), ready for `mma` as it is. The
    interpreter's bf16 dot is not the GPU's (`round_to_bf16`): there the tile is widened to
    fp32, which is exact."""
    v = tl.load(ptrs, mask=mask, other=0.0)
    if EMULATE_BF16:
        v = v.to(tl.float32)
    return v


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b, accumulated in ACC: tl.dot, except for fp64. Triton 3.6's fp64 MMA lowering
    aborts on some tiles (assertion "fp64 don't support largeK MMA", seen on an H100 for a
    masked fp64 forward), so fp64, the gradcheck dtype and never a speed path, multiplies and
    sums in registers instead (ordinary rounded fp64 products and sums)."""
    if ACC == tl.float64:
        return acc + tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)


@triton.jit
def to_output(v, OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast an fp32 result for storing into an OUT_DTYPE tensor, rounding to nearest-even."""
    if EMULATE_BF16:
        return round_to_bf16(v.to(tl.float32)).to(OUT_DTYPE)
    else:
        return v.to(OUT_DTYPE)


@triton.jit
def precise_sqrt(v, ACC: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is the approximate one for fp32)."""
    if ACC == tl.float64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in, offs_d, D, EVEN_D: tl.constexpr,
                ACC: tl.constexpr):
    """x[offs_n, offs_d] of one batch element as an ACC tile (BLOCK_N, BLOCK_D); 0 outside.
    EVEN_D (D a multiple of BLOCK_D, every width the paper uses) drops the column mask."""
    ptrs = x_ptr + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
    if EVEN_D:
        mask = n_in[:, None]
    else:
        mask = n_in[:, None] & (offs_d < D)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def load_x_operand(x_ptr, stride_xn, stride_xd, offs_n, n_in, offs_d, D, EVEN_D: tl.constexpr,
                   EMULATE_BF16: tl.constexpr):
    """x[offs_n, offs_d] in x's own dtype, as a (BLOCK_N, BLOCK_D) dot operand, 0 for tokens
    not in n_in and columns beyond D. Loaded straight into the dot (no arithmetic on the way), so
    the compiler can stream it from memory to shared memory to the tensor cores."""
    ptrs = x_ptr + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd
    if EVEN_D:
        return load_operand(ptrs, n_in[:, None], EMULATE_BF16)
    else:
        return load_operand(ptrs, n_in[:, None] & (offs_d < D)[None, :], EMULATE_BF16)


@triton.jit
def scaled_operand(v, g, DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, ACC: tl.constexpr):
    """op(v * g): a (BLOCK_M, BLOCK_D) tile of W or dy scaled by the LayerNorm weight g
    (BLOCK_D,) and rounded to the dot's dtype, exactly as both the dots and the per-query sums
    that undo the shift (`query_operand`, `backward._score_operands`) see it."""
    return as_operand(v.to(ACC) * g[None, :], DOT_DTYPE, EMULATE_BF16)


@triton.jit
def query_operand(w_ptr, stride_wm, g_ptr, out_ptr, offs_m, m_in, D,
                  BLOCK_D: tl.constexpr, HAS_G: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, ACC: tl.constexpr):
    """The forward score sweep's query operand, once per program, before its token loop:
    writes op(W g) (M, D) to out_ptr (contiguous, DOT_DTYPE) and returns
    c_s[m] = sum_d op(W[m,d] g[d]), the sum of that very operand, which `unshift` needs. Neither
    depends on the tokens, so neither is formed in the score sweep's steps (a W tile, a g tile,
    their product and its rounding per step). The backward's `_score_operands` forms the same
    operand with the same `scaled_operand`, so the two dots see the same bits.

    The columns are summed tile-wise and reduced across the tile once, after the loop.
    (Triton 3.6 workaround: a `tl.sum` per step whose input is a bare load, as for fp32 without
    affine weights, makes its TritonGPUOptimizeThreadLocality pass rewrite the loop, which
    aborts on assertion `loopResult.hasOneUse()` when the sum is used twice, as the forward
    uses c_s.) The caller must put a barrier between this and the first read of out_ptr:
    other threads read it."""
    offs_d = tl.arange(0, BLOCK_D)
    c = tl.zeros((offs_m.shape[0], BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        md_in = m_in[:, None] & (cols < D)[None, :]
        w = tl.load(w_ptr + offs_m[:, None] * stride_wm + cols[None, :], mask=md_in, other=0.0)
        g = load_vec(g_ptr, cols, D, HAS_G, 1.0, ACC)
        op = scaled_operand(w, g, DOT_DTYPE, EMULATE_BF16, ACC)
        tl.store(out_ptr + offs_m[:, None] * D + cols[None, :], op.to(out_ptr.dtype.element_ty),
                 mask=md_in)
        c += op.to(ACC)
    return tl.sum(c, axis=1)


@triton.jit
def hi_lo(hi, lo, ACC: tl.constexpr):
    """A scalar that arrived as an fp32 (hi, lo) pair (Triton passes Python floats as fp32), in
    ACC precision: fp64 runs keep scale and eps to ~48 bits, fp32 runs get hi."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def token_range(N, tokens_per_split):
    """[start, end) of the tokens this program owns: slice program_id(1) of its batch element,
    never empty (the launchers' grids come from `heuristics.token_split`)."""
    n_start = tl.program_id(1) * tokens_per_split
    return n_start, tl.minimum(N, n_start + tokens_per_split)


@triton.jit
def token_block(n0, n_end, mask_ptr, stride_mb, stride_mn, pid_b, BLOCK_N: tl.constexpr,
                HAS_MASK: tl.constexpr):
    """Offsets of the token block starting at n0, which of them exist (n_in: loads) and which of
    them take part in the softmax (valid: n_in and not masked out by the key padding mask)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_in = offs_n < n_end
    valid = n_in
    if HAS_MASK:
        keep = tl.load(mask_ptr + pid_b * stride_mb + offs_n * stride_mn, mask=n_in, other=0)
        valid = valid & (keep != 0)
    return offs_n, n_in, valid


@triton.jit
def load_vec(ptr, offs, n, HAS: tl.constexpr, DEFAULT: tl.constexpr, ACC: tl.constexpr):
    """A (D,) parameter slice (LayerNorm weight or bias) as ACC, or DEFAULT when it is None."""
    if HAS:
        return tl.load(ptr + offs, mask=offs < n, other=0.0).to(ACC)
    else:
        return tl.full(offs.shape, DEFAULT, ACC)


@triton.jit
def token_normalizers(shift, mean_rel, rstd, valid):
    """Per-token (k, r, c) for `normalize_tile`, from the shift k, mean_rel = mu - k and rstd
    r of `token_block_scores`: c = -(mu - k) r. All three are 0 for tokens that are masked or out
    of range. The forward loads x with the mask `valid`, so their x is 0, their xhat exactly 0,
    and garbage (even inf/NaN) in a padded token never reaches p * xhat, without a select per
    element. (The backward reads them and selects: that compiled shorter there.)"""
    return (tl.where(valid, shift, 0.0), tl.where(valid, rstd, 0.0),
            tl.where(valid, -mean_rel * rstd, 0.0))


@triton.jit
def normalize_tile(x, k, r, c):
    """xhat = (x - k) r + c = (x - mu) r for a (BLOCK_N, BLOCK_D) tile, with the per-token
    (k, r, c) of `token_normalizers`: one subtraction and one fused multiply-add per element.

    x - k comes first and is exact (Sterbenz) when x sits near k; the rest, -(mu - k) r, is of
    the size of xhat (k lies within a few standard deviations of mu), and the FMA rounds the
    sum once. Subtracting an fp32 mu = k + (mu - k) instead would carry mu's rounding, half an
    ulp of |mu|, into every xhat, times r (mean 1e4, std 1e-2 in fp32: 5e-4 * 100 = 0.05 in
    xhat; this made y and the gradients disagree with the scores, e.g. dbias off by 0.2 where
    PyTorch is off by 2e-6). Rounding (x - k) r to the dot dtype and removing -(mu - k) r
    after the dot costs as many instructions but rounds the operand at the scale of |x - k| r,
    up to sqrt(D / 16) times |xhat| when a token's spread sits in its first features (massive
    activations in a few channels). In the tests that case's y error stayed below y's own
    rounding (tests/test_extreme_inputs.py::test_spread_in_the_first_features), but the
    operand here is the more accurate one at no extra cost."""
    return (x - k[:, None]) * r[:, None] + c[:, None]


@triton.jit
def softmax_base(m):
    """The base the softmax exponentiates against: the running max m, or 0 for a row that has
    seen no unmasked token (m = -inf), so that exp2(v - base) stays exp2(-inf) = 0 there
    instead of exp2(nan)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def softmax_normalizers(m, l):
    """From a softmax state (running max m, sum l; base 2) return (1/l, [l != 0], lse2).
    A row that saw no unmasked token (l = 0) gets 1/l := 0 and lse2 := -inf, so its output is
    exactly 0 and its backward weights exp2(s2 - lse2) are masked to 0, never NaN.
    `l != 0`, not `l > 0`: a NaN l (a NaN / inf token among the unmasked ones) must stay NaN
    (1/l, lse2 = NaN) and poison the row as in the reference, not pass for an empty row (0)."""
    nonempty = l != 0
    safe_l = tl.where(nonempty, l, 1.0)
    inv_l = tl.where(nonempty, 1.0 / safe_l, 0.0)
    lse = tl.where(nonempty, m + tl.log2(safe_l), float("-inf"))
    return inv_l, tl.where(nonempty, 1.0, 0.0), lse


@triton.jit
def merged_rows(acc, inv_l, has_tokens, g, bias):
    """y = g * acc / l + b per output row, with (1/l, has_tokens) from `softmax_normalizers`:
    sum_n p = 1, so the LayerNorm bias passes through the merge once per row that saw a token,
    and a row that saw none is exactly 0. acc (BLOCK_M, BLOCK_D), g and bias (BLOCK_D,)."""
    return acc * (inv_l[:, None] * g[None, :]) + has_tokens[:, None] * bias[None, :]


@triton.jit
def _column(x0, offs_d, j):
    """Column j of the tile x0, as a (BLOCK_N,) vector in the tile's row layout. Exact: the sum
    over a row adds one value to zeros, in whatever order the layout reduces."""
    return tl.sum(tl.where(offs_d[None, :] == j, x0, 0.0), axis=1)


@triton.jit
def _four_columns(x0, offs_d, j):
    return ((_column(x0, offs_d, j) + _column(x0, offs_d, j + 1))
            + (_column(x0, offs_d, j + 2) + _column(x0, offs_d, j + 3)))


@triton.jit
def shift_of_tokens(x0, offs_d, D, BLOCK_D: tl.constexpr):
    """The per-token shift k of `token_block_scores`: the mean of the token's first SHIFT_D = 16
    features, summed as a fixed pairwise tree of columns of x0, the token block's first D tile
    (zero beyond D).

    The 16-bit dot operands are x - k rounded to x's dtype, so the backward must use the very k
    of the forward: it reads it from the saved statistics. k must not depend on the tile either
    (a `tl.sum` over the tile reduces in an order that follows its layout; at |s| ~ 1e5 a last-bit
    difference in k moved s2 by hundreds): the tree of exact column extractions makes k a
    function of the token alone. For D >= 16 (or D a power of two) it is also exact for a
    constant token (sums of 2^j equal values, then / 2^j), which keeps var = 0 exactly. The
    columns come out of the tile already in its row layout (separate (BLOCK_N,) loads needed a
    layout conversion, and registers the forward does not have to spare)."""
    tl.static_assert(BLOCK_D >= SHIFT_D)
    total = ((_four_columns(x0, offs_d, 0) + _four_columns(x0, offs_d, 4))
             + (_four_columns(x0, offs_d, 8) + _four_columns(x0, offs_d, 12)))
    return total / tl.minimum(D, SHIFT_D)


@triton.jit
def shifted_dots(
    x_ptr, stride_xn, stride_xd,       # x of one batch element, (N, D), any strides
    wg_ptr,                             # op(W g) (M, D), contiguous, DOT_DTYPE
    dyg_ptr,                            # op(dy g) of this batch element (M, D), contiguous,
                                        # DOT_DTYPE (read when WITH_DY)
    k,                                  # (BLOCK_N,) per-token shift, 0 for tokens not in n_in
    offs_m, m_in, offs_n, n_in, D,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WITH_DY: tl.constexpr,
    WITH_STATS: tl.constexpr, PREFETCH: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """The sweep over D shared by the forward and the backward score passes: the dots of the
    queries (and of dy) with the shifted tokens x - k, in the operands' rounded form.
    PREFETCH (for launches that Triton does not software-pipeline, num_stages = 1) loads each
    step's tiles during the step before, in registers: without it every step waits out a DRAM
    round trip for its x tile (the sweep is the first touch of x) before any of its work.

    Returns (acc_s, acc_dp, sum_xk, sum_xk2):
        acc_s[m, n] = sum_d op(W[m,d] g[d]) op(x[n,d] - k_n)    op = rounded to DOT_DTYPE
        acc_dp[m, n] = sum_d op(dy[m,d] g[d]) op(x[n,d] - k_n)  (WITH_DY, else 0)
        sum_xk[n], sum_xk2[n] = sum_d (x - k), sum_d (x - k)^2  (WITH_STATS, else 0)
    The query-side operands come ready-made (`query_operand`, `backward._score_operands`):
    they do not depend on the tokens, so the sweep only loads them.
    Tokens beyond the block's end load as 0 and have k = 0 (the caller's guarantee: the shift
    of an all-zero row is 0, and the backward loads its saved shifts as 0 there), so x - k is
    exactly 0 for them without a select in every step; only columns beyond D need one, and
    only when D is not a multiple of BLOCK_D (not EVEN_D).
    The operands are the same rounded numbers in both kernels, and for 16-bit inputs and fp32
    at torch's default "highest" precision the accumulation order does not depend on BLOCK_D:
    tensor-core dots add their MMA k-steps into one accumulator in increasing d, FMA dots one
    column at a time, so the forward's 32-column and the backward's 64-column tiles give the
    same acc_s. Two exceptions: the fp64 register products (`mma`) reduce each tile with
    tl.sum, whose order follows the tile (both kernels take the same BLOCK_D for fp64,
    `heuristics._token_config`); and fp32 at "high" (tf32x3) sums each tile's three partial
    dots before adding them to the accumulator, so there the forward's and the backward's
    scores (32- and 16-column fp32 tiles on a GPU) can differ in the last bits."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None] * D
    sum_xk = tl.zeros_like(k)
    sum_xk2 = tl.zeros_like(k)
    acc_s = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=ACC)
    acc_dp = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=ACC)
    if PREFETCH:
        x_dtype = x_ptr.dtype.element_ty
        x_next = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in, offs_d, D, EVEN_D,
                             x_dtype)
        md_next = m_in[:, None] & (offs_d < D)[None, :]
        wg_next = load_operand(wg_ptr + rows + offs_d[None, :], md_next, EMULATE_BF16)
        if WITH_DY:
            dyg_next = load_operand(dyg_ptr + rows + offs_d[None, :], md_next, EMULATE_BF16)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        d_in = cols < D
        if PREFETCH:
            # This step's tiles arrived during the last one; ask for the next step's now (all
            # masked off past D: nothing is read).
            x = x_next.to(ACC)
            wg = wg_next
            more = d0 + BLOCK_D < D
            x_next = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in & more,
                                 cols + BLOCK_D, D, EVEN_D, x_dtype)
            md_next = m_in[:, None] & (cols + BLOCK_D < D)[None, :]
            wg_next = load_operand(wg_ptr + rows + (cols + BLOCK_D)[None, :], md_next,
                                   EMULATE_BF16)
            if WITH_DY:
                dyg = dyg_next
                dyg_next = load_operand(dyg_ptr + rows + (cols + BLOCK_D)[None, :], md_next,
                                        EMULATE_BF16)
        else:
            x = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in, cols, D, EVEN_D, ACC)
            md_in = m_in[:, None] & d_in[None, :]
            wg = load_operand(wg_ptr + rows + cols[None, :], md_in, EMULATE_BF16)
            if WITH_DY:
                dyg = load_operand(dyg_ptr + rows + cols[None, :], md_in, EMULATE_BF16)
        xk = x - k[:, None]
        if not EVEN_D:
            xk = tl.where(d_in[None, :], xk, 0.0)
        if WITH_STATS:
            sum_xk += tl.sum(xk, axis=1)
            sum_xk2 += tl.sum(xk * xk, axis=1)
        xk_t = tl.trans(as_operand(xk, DOT_DTYPE, EMULATE_BF16))
        acc_s = mma(wg, xk_t, acc_s, INPUT_PRECISION, ACC)
        if WITH_DY:
            acc_dp = mma(dyg, xk_t, acc_dp, INPUT_PRECISION, ACC)
    return acc_s, acc_dp, sum_xk, sum_xk2


@triton.jit
def unshift(acc, mean_rel, rstd, col_sum, scale):
    """scale * sum_d A[m,d] xhat[n,d] from the shifted dot acc = sum_d A[m,d] (x[n,d] - k_n)
    and col_sum[m] = sum_d A[m,d]:  scale * r_n * (acc - (mu_n - k_n) * col_sum[m]).
    One helper for both kernels, so the forward's and the backward's scores are the same
    floating-point expression of the same numbers."""
    return (scale * rstd[None, :]) * (acc - mean_rel[None, :] * col_sum[:, None])


@triton.jit
def token_block_scores(
    x_ptr, stride_xn, stride_xd,       # x of one batch element, (N, D), any strides
    wg_ptr,                             # op(W g) (M, D), contiguous, DOT_DTYPE (`query_operand`)
    c_s,                                # (BLOCK_M,) sum_d op(W g), `query_operand`
    offs_m, m_in, offs_n, n_in, D,
    scale, eps,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREFETCH: tl.constexpr,
    DOT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """The forward's score pass over a block of tokens: one sweep over D that yields the
    LayerNorm statistics and the scores.

    Returns (k, mean_rel, rstd, sn), shapes (BLOCK_N,) x 3 and (BLOCK_M, BLOCK_N); the token
    mean is mu = k + mean_rel, kept as the two terms for `normalize_tile` (see there), and
        sn[m, n] = scale * sum_d W[m,d] g[d] xhat[n,d].
    The backward does not recompute the statistics: it reads (k, mean_rel, rstd) and c_s as the
    forward saved them and redoes only the dots (`shifted_dots`, `unshift`).

    Why a single sweep is exact enough: xhat is not known until the sweep ends, so the dots use
    x shifted by k_n, the mean of the token's first SHIFT_D features, and the shift is undone
    at the end (`unshift`):
        sum_d A[m,d] xhat[n,d] = r_n * (sum_d A[m,d] (x[n,d] - k_n) - (mu_n - k_n) * sum_d A[m,d]).
    The same shift gives the variance as E[(x-k)^2] - E[x-k]^2. Because k_n is the mean of
    SHIFT_D of the token's own values, |k_n - mu_n| is of the order of the token's standard
    deviation sigma (at most sqrt(D / 16 - 1) sigma, when all of the token's spread sits in
    those 16 features), so neither form suffers the E[x^2] - E[x]^2 cancellation, even for
    mean 1e4 and std 1e-2: the values that reach the dot are of the size of the spread, not of
    the offset. A[m,d] enters both terms exactly as it enters the dot (rounded to DOT_DTYPE),
    so the correction is consistent.
    """
    offs_d = tl.arange(0, BLOCK_D)
    x0 = load_x_tile(x_ptr, stride_xn, stride_xd, offs_n, n_in, offs_d, D, EVEN_D, ACC)
    k = shift_of_tokens(x0, offs_d, D, BLOCK_D)     # 0 for tokens not in n_in (zero rows)
    acc_s, _acc_dp, sum_xk, sum_xk2 = shifted_dots(
        x_ptr, stride_xn, stride_xd, wg_ptr, wg_ptr, k, offs_m, m_in, offs_n, n_in, D,
        BLOCK_D, EVEN_D, False, True, PREFETCH, DOT_DTYPE, EMULATE_BF16, INPUT_PRECISION, ACC)
    mean_rel = sum_xk / D                    # E[x - k] = mu - k
    var = tl.maximum(sum_xk2 / D - mean_rel * mean_rel, 0.0)
    rstd = 1.0 / precise_sqrt(var + eps, ACC)
    return k, mean_rel, rstd, unshift(acc_s, mean_rel, rstd, c_s, scale)
