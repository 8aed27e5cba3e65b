"""Triton kernels for vocabulary-parallel cross-entropy (nllfused.kernels.vocab_parallel).

Each rank of a tensor-parallel group holds the logits of a slice [vocab_start, vocab_start + C)
of the vocabulary. nllfused/distributed.py combines per-row statistics of every slice into the
full-vocabulary loss (docs/maths.md); these two kernels are the only passes over the logits:

  vp_stats_kernel  reads each row of the slice once (online softmax) and writes, in float64,
                   row 0: lse_r = logsumexp of the slice,
                   row 1: z_y if the row's target falls in this slice, else 0,
                   row 2 (HAS_SMOOTHING): A_r = sum_{c in slice} w_c (lse_r - z_c) >= 0;
  vp_bwd_kernel    reads each row once more and writes the slice's gradient
                   g * (p_c coef - tcoef [c = y] - eps_c w_c) + g_lse p_c,  p_c = exp(z_c - lse),
                   from the global lse and per-row coefficients formed by the caller
                   (g_lse: the upstream gradient of the global lse, e.g. from z-loss).

Rows are those of a 2-D (R, C) view with any strides; offsets are int64. Optional features are
constexpr flags, as in kernels/cross_entropy.py, whose launch_config picks the tile shapes.
The launchers vp_stats / vp_bwd at the end allocate the outputs and launch.
"""
import torch
import triton
import triton.language as tl

from .cross_entropy import _fwd_step, _merge, _reference, launch_config
from .launch import acc_dtype, guard, truncating_store
from .row_math import _columns, _log1p, _lowest, _tile_rows

IGNORED_ROW = -2  # y_local marker of an ignored row in vp_bwd_kernel (-1: target elsewhere)


@triton.jit
def vp_stats_kernel(
    X, stride_xr, stride_xc,                     # this rank's logits (R, C)
    T, stride_t,                                 # global class ids (R,)
    W, WSUM,                                     # slice weights (C,), their sum (1,)
    OUT,                                         # (2 or 3, R) float64, contiguous
    R, C, vocab_start, ignore_index,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    rows, row_ok, n, _ = _tile_rows(R, 1, BLOCK_R)   # rows past the end read row R - 1
    x_rows = X + n * stride_xr
    # Reference r = z at the slice's first class: the smoothing sum accumulates w (z - r), so a
    # large common offset in the logits cancels exactly instead of swamping the float32 sum.
    r = _reference(x_rows, row_ok, 1.0, 1.0, ACC, False, False)

    # ce_fwd_kernel's per-lane online softmax (kernels/cross_entropy.py, _fwd_step): one exp
    # and no block-wide reduction per logit, the lanes merged once per row after the loop.
    m = tl.full([BLOCK_R, BLOCK_C], _lowest(ACC), ACC)
    s = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    acc_wz = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # HAS_SMOOTHING: sum of w (z - r)
    unused = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # _fwd_step's probability-target and
    arg = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)  # statistics state, off here
    lo, body, hi = _columns(C, BLOCK_C, False)
    for start in range(lo, body, BLOCK_C):
        m, s, acc_wz, unused, unused, arg = _fwd_step(
            x_rows, x_rows, W, start + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, unused, unused,
            arg, stride_xc, 0, 0.0, 1.0, 1.0, BLOCK_R, BLOCK_C, ACC, False, HAS_WEIGHT,
            HAS_SMOOTHING, False, False, False, False)
    if body < hi:
        m, s, acc_wz, unused, unused, arg = _fwd_step(
            x_rows, x_rows, W, body + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, unused, unused,
            arg, stride_xc, 0, 0.0, 1.0, 1.0, BLOCK_R, BLOCK_C, ACC, False, HAS_WEIGHT,
            HAS_SMOOTHING, False, False, False, True)
    # Lanes as (m, k, s), as ce_fwd_kernel takes them, then merged: k classes exactly at m.
    low = m == _lowest(ACC)
    k = tl.where(low, s, 1.0)
    m = tl.where(low & (s == 0.0), float("-inf"), m)
    s = tl.where(low, 0.0, s)
    m, k, s = _merge(m, k, s)

    # lse = double(m) + double(log(k + s)): float64 once per row, never in the loop.
    s64 = s.to(tl.float64)
    log_s64 = tl.where(k == 1.0, _log1p(s64), tl.log(k.to(tl.float64) + s64))
    tl.store(OUT + rows, m.to(tl.float64) + log_s64, mask=row_ok)

    y = tl.load(T + rows * stride_t, mask=row_ok, other=0).to(tl.int64)
    y_local = y - vocab_start
    owned = row_ok & (y != ignore_index) & (y_local >= 0) & (y_local < C)
    y_safe = tl.where(owned, y_local, 0)         # never read outside the row
    z_y = tl.load(x_rows + y_safe * stride_xc, mask=owned, other=0.0).to(ACC)
    tl.store(OUT + R + rows, tl.where(owned, z_y, 0.0).to(tl.float64), mask=row_ok)

    if HAS_SMOOTHING:
        log_s = log_s64.to(ACC)
        w_sum = tl.load(WSUM).to(ACC)
        smooth = w_sum * ((m - r) + log_s) - tl.sum(acc_wz, 1)   # sum_c w_c (lse_r - z_c)
        # A slice entirely at -inf: every lse_r - z_c is +inf (the formula above gives NaN).
        smooth = tl.where(m == float("-inf"), float("inf"), smooth)
        tl.store(OUT + 2 * R + rows, smooth.to(tl.float64), mask=row_ok)


@triton.jit
def vp_bwd_kernel(
    G,                                           # upstream gradient per row (R,), ACC
    GL,                                          # upstream gradient of the lse (R,), float64
    X, stride_xr, stride_xc,                     # this rank's logits (R, C)
    LSE, COEF, TCOEF, YL,                        # per row: global lse (f64), p-coefficient,
                                                 # true-class coefficient, local target id
    W, EPSC,                                     # slice weights (C,); e / C_global (1,)
    GX,                                          # gradient, contiguous (R, C)
    R, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    x_rows = X + rows * stride_xr
    gx_rows = GX + rows * C
    if HAS_GRAD_LSE:
        g_lse = tl.load(GL + rows, mask=row_ok, other=0.0).to(ACC)

    g = tl.load(G + rows, mask=row_ok, other=0.0).to(ACC)
    # p = exp(z - lse) with lse split into hi + lo, so that float32 keeps torch's accuracy.
    lse64 = tl.load(LSE + rows, mask=row_ok, other=0.0)
    hi = lse64.to(ACC)
    lo = (lse64 - hi.to(tl.float64)).to(ACC)
    coef = tl.load(COEF + rows, mask=row_ok, other=0.0).to(ACC)
    tcoef = tl.load(TCOEF + rows, mask=row_ok, other=0.0).to(ACC)
    y_local = tl.load(YL + rows, mask=row_ok, other=-2).to(tl.int64)
    kept = y_local != -2                         # IGNORED_ROW
    if HAS_SMOOTHING:
        eps_c = tl.load(EPSC).to(ACC)

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(x_rows[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask=mask,
                    other=0.0).to(ACC)
        p = tl.exp((z - hi[:, None]) - lo[:, None])
        # The true-class term p_y - coefficient is formed here in ACC, rounded once on store.
        grad = p * coef[:, None] - tl.where(cols[None, :] == y_local[:, None], tcoef[:, None],
                                            0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
                grad -= eps_c * w
            else:
                grad -= eps_c
        grad = tl.where(kept[:, None], grad * g[:, None], 0.0)   # ignored rows: exactly 0
        if HAS_GRAD_LSE:
            # d lse / d z_c = p_c; rows without an lse gradient get none (no 0 * NaN).
            grad = tl.where((g_lse != 0.0)[:, None], grad + g_lse[:, None] * p, grad)
        tl.store(gx_rows[:, None] + cols[None, :].to(tl.int64), grad.to(GX.dtype.element_ty),
                 mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers (nllfused/distributed.py binds them as custom ops). Per-row tensors contiguous (R,).
# ------------------------------------------------------------------------------------------------

def _launch(logits, wide_state=False):
    """Grid and constexprs. wide_state: vp_stats_kernel with class weights and smoothing keeps
    two values more per logit (the weight, the sum of w (z - r)) beside its online-softmax
    state: the smaller tiles launch_config picks for statistics (at 2048 classes a block,
    ptxas spilled on sm_80)."""
    R, C = logits.shape
    block_r, block_c, num_warps = launch_config(R, C, logits.element_size(), stats=wide_state)
    return (triton.cdiv(R, block_r),), dict(BLOCK_R=block_r, BLOCK_C=block_c,
                                            ACC=acc_dtype(logits.dtype), num_warps=num_warps)


def vp_stats(logits, target, weight, wsum, vocab_start, ignore_index, smoothing):
    R, C = logits.shape
    out = torch.empty((3 if smoothing else 2, R), dtype=torch.float64, device=logits.device)
    if R == 0:
        return out
    grid, flags = _launch(logits, wide_state=weight is not None and smoothing)
    with guard(logits):
        vp_stats_kernel[grid](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0),
            wsum if weight is None else weight, wsum, out, R, C, vocab_start, ignore_index,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing, **flags)
    return out


def vp_bwd(g, g_lse, logits, lse, coef, tcoef, y_local, weight, eps_c, smoothing):
    R, C = logits.shape
    grad = torch.empty((R, C), dtype=torch.float32 if truncating_store(logits) else logits.dtype,
                       device=logits.device)
    if R == 0:
        return grad.to(logits.dtype)
    grid, flags = _launch(logits)
    g = g.contiguous()
    with guard(logits):
        vp_bwd_kernel[grid](
            g, g if g_lse is None else g_lse.contiguous(), logits, logits.stride(0),
            logits.stride(1), lse.contiguous(), coef.contiguous(), tcoef.contiguous(),
            y_local.contiguous(), eps_c if weight is None else weight, eps_c, grad, R, C,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing,
            HAS_GRAD_LSE=g_lse is not None, **flags)
    return grad.to(logits.dtype)
