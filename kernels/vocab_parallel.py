"""Triton kernels for vocabulary-parallel cross-entropy (nllfused.kernels.vocab_parallel).

Each rank of a tensor-parallel group holds the logits of a slice [vocab_start, vocab_start + C)
of the vocabulary. nllfused/distributed.py combines per-row statistics of every slice into the
full-vocabulary loss (docs/maths.md); these two kernels are the only passes over the logits:

  vp_stats_kernel  reads each row of the slice once (online softmax) and writes, in float64,
                   rows 0, 1: m_r, log s_r, the slice's logsumexp lse_r = m_r + log s_r in two
                   parts (m_r the slice's max; a float64 lse_r would be off by its own rounding),
                   row 2: z_y if the row's target falls in this slice, else 0,
                   row 3 (HAS_SMOOTHING): A_r = sum_{c in slice} w_c (lse_r - z_c) >= 0;
  vp_bwd_kernel    reads each row once more and writes the slice's gradient
                   g * (p_c coef - tcoef [c = y] - eps_c w_c) + g_lse p_c,
                   p_c = exp((z_c - m) - log s), from the global lse = m + log s in the same two
                   parts and per-row coefficients formed by the caller
                   (g_lse: the upstream gradient of the global lse, e.g. from z-loss).

Rows are those of a 2-D (R, C) view with any strides; offsets are int64. Optional features are
constexpr flags, as in kernels/cross_entropy.py, whose launch_config picks the tile shapes.
The launchers vp_stats / vp_bwd at the end allocate the outputs and launch.
"""
import torch
import triton
import triton.language as tl

from .cross_entropy import _counted_lanes, _fwd_step, _merge, _reference, launch_config
from .row_stats import _first_nan
from .launch import acc_dtype, guard, truncating_store
from .row_math import (_LOG2E, _columns, _exp2, _load_classes, _log1p, _lowest,
                       _sums_against_max, _tile_rows)

IGNORED_ROW = -2  # y_local marker of an ignored row in vp_bwd_kernel (-1: target elsewhere)


@triton.jit
def vp_stats_kernel(
    X, stride_xr, stride_xc,                     # this rank's logits (R, C)
    T, stride_t,                                 # global class ids (R,)
    W, WSUM,                                     # slice weights (C,), their sum (1,)
    OUT,                                         # (3 or 4, R) float64, contiguous
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
            HAS_SMOOTHING, False, False, False, False, False)
    if body < hi:
        m, s, acc_wz, unused, unused, arg = _fwd_step(
            x_rows, x_rows, W, body + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, unused, unused,
            arg, stride_xc, 0, 0.0, 1.0, 1.0, BLOCK_R, BLOCK_C, ACC, False, HAS_WEIGHT,
            HAS_SMOOTHING, False, False, False, False, True)
    m, k, s, _ = _counted_lanes(m, s, ACC)
    m, k, s = _merge(m, k, s)

    # lse_r = double(m) + double(log(k + s)), its two parts: float64 once per row.
    s64 = s.to(tl.float64)
    log_s64 = tl.where(k == 1.0, _log1p(s64), tl.log(k.to(tl.float64) + s64))
    # A slice holding +inf (s NaN: _merge) as torch_ref.vocab_slice_stats gives it: m_r = 0,
    # log s_r = +inf (the caller's mark of a +inf logit), NaN if it also holds a NaN.
    pinf = m == float("inf")
    nan_at = _first_nan(x_rows, row_ok & pinf, 0, C, C, stride_xc, 1.0, 1.0, BLOCK_R, BLOCK_C,
                        ACC, False, False)
    log_s64 = tl.where(pinf, tl.where(nan_at < 2147483647, float("nan"), float("inf")), log_s64)
    tl.store(OUT + rows, tl.where(pinf, 0.0, m).to(tl.float64), mask=row_ok)
    tl.store(OUT + R + rows, log_s64, mask=row_ok)

    y = tl.load(T + rows * stride_t, mask=row_ok, other=0).to(tl.int64)
    y_local = y - vocab_start
    owned = row_ok & (y != ignore_index) & (y_local >= 0) & (y_local < C)
    y_safe = tl.where(owned, y_local, 0)         # never read outside the row
    z_y = tl.load(x_rows + y_safe * stride_xc, mask=owned, other=0.0).to(ACC)
    # (OUT + R + R, not OUT + 2 * R: an R below 2^31 arrives as an int32, whose double may not be)
    tl.store(OUT + R + R + rows, tl.where(owned, z_y, 0.0).to(tl.float64), mask=row_ok)

    if HAS_SMOOTHING:
        log_s = log_s64.to(ACC)
        w_sum = tl.load(WSUM).to(ACC)
        wz = tl.sum(acc_wz, 1)
        # (rows spanning more than the float range: against m, as ce_fwd_kernel's)
        wz, lse_r = _sums_against_max(x_rows, x_rows, W, row_ok, m, s, log_s, (m - r) + log_s,
                                      wz, C, stride_xc, 0, 0.0, 1.0, 1.0, BLOCK_R, BLOCK_C, ACC,
                                      False, HAS_WEIGHT, True, False, False)
        smooth = w_sum * lse_r - wz   # sum_c w_c (lse_r - z_c)
        # A slice entirely at -inf (r = 0): sum_c w_c * inf, -wz alone (the formula above gives
        # NaN; a weight of 0 makes it NaN too, as torch's 0 * inf).
        smooth = tl.where(m == float("-inf"), -wz, smooth)
        tl.store(OUT + R + R + R + rows, smooth.to(tl.float64), mask=row_ok)


@triton.jit
def vp_bwd_kernel(
    G,                                           # upstream gradient per row (R,), ACC
    GL,                                          # upstream gradient of the lse (R,), float64
    X, stride_xr, stride_xc,                     # this rank's logits (R, C)
    LSE_M, LSE_S, COEF, TCOEF, YL,               # per row: global lse = m + log s (f64),
                                                 # p-coefficient, true-class coefficient,
                                                 # local target id
    W, EPSC,                                     # slice weights (C,); e / C_global (1,)
    GX,                                          # gradient, contiguous (R, C)
    R, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
):
    rows, row_ok, n, _ = _tile_rows(R, 1, BLOCK_R)   # rows past the end read row R - 1
    x_rows = X + n * stride_xr
    gx_rows = GX + n * C
    g = tl.load(G + n).to(ACC)
    coef = tl.load(COEF + n).to(ACC)
    tcoef = tl.load(TCOEF + n).to(ACC)
    y_local = tl.load(YL + n)
    kept = y_local != -2                         # IGNORED_ROW
    # Per row, so that a logit costs one FADD, one FFMA, one MUFU and one FMUL (ce_bwd_kernel's
    # scheme): grad_c = p_c pc - eps_g w_c with pc = g coef (+ g_lse), and the true class fixed
    # after the loop. Rows with nothing to receive read no logit: z = 0 against lse = +inf makes
    # p = 0 and their gradient exactly 0, whatever their logits.
    pc = tl.where(kept, g * coef, 0.0)
    keep = kept
    if HAS_GRAD_LSE:
        g_lse = tl.load(GL + n).to(ACC)          # d lse / d z_c = p_c, ignored rows too
        pc += g_lse
        keep = keep | (g_lse != 0.0)
    if HAS_SMOOTHING:
        eps_g = tl.where(kept, tl.load(EPSC).to(ACC) * g, 0.0)
    else:
        eps_g = tl.zeros_like(g)
    # p = exp((z - m) - log s) = 2^((z - hi) log2e - lo log2e): hi = m (a logit, in ACC
    # exactly), lo = log s, as torch forms log p.
    m64 = tl.load(LSE_M + n)
    hi = tl.where(keep, m64.to(ACC), float("inf"))
    lo = tl.where(keep, ((m64 - hi.to(tl.float64)) + tl.load(LSE_S + n)).to(ACC) * _LOG2E, 0.0)

    lo_c, body, hi_c = _columns(C, BLOCK_C, False)
    for start in range(lo_c, body, BLOCK_C):
        _vp_bwd_step(x_rows, gx_rows, W, start + tl.arange(0, BLOCK_C), C, row_ok, keep,
                     stride_xc, hi, lo, pc, eps_g, ACC, HAS_WEIGHT, HAS_SMOOTHING, False)
    if body < hi_c:
        _vp_bwd_step(x_rows, gx_rows, W, body + tl.arange(0, BLOCK_C), C, row_ok, keep,
                     stride_xc, hi, lo, pc, eps_g, ACC, HAS_WEIGHT, HAS_SMOOTHING, True)

    # The true class (if in this slice), stored again over the loop's value; the barrier orders
    # the two stores. Formed in ACC as (p_y - 1) y_coef + p_y (pc - y_coef), y_coef = g tcoef:
    # p_y - 1 is exact, where p_y pc - y_coef would keep the rounding of p_y pc as p_y -> 1
    # (a confident row: 2^-24 pc, four times the error of softmax - one_hot in float32).
    tl.debug_barrier()
    own = row_ok & (y_local >= 0) & (y_local < C)
    y_safe = tl.where(own, y_local, 0)           # never read outside the row
    z_y = tl.load(x_rows + y_safe * stride_xc).to(ACC)
    p_y = _exp2((z_y - hi) * _LOG2E - lo, ACC)
    y_coef = g * tcoef
    grad_y = tl.fma(p_y - 1.0, y_coef, p_y * (pc - y_coef))
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            grad_y -= eps_g * tl.load(W + y_safe).to(ACC)
        else:
            grad_y -= eps_g
    tl.store(gx_rows + y_safe, grad_y.to(GX.dtype.element_ty), mask=own)


@triton.jit
def _vp_bwd_step(x_rows, gx_rows, W, cols, C, row_ok, keep, stride_xc, hi, lo, pc, eps_g,
                 ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                 MASKED: tl.constexpr):
    """One block of classes of vp_bwd_kernel's loop, its gradient stored. MASKED for the block
    that runs past the row's end; rows past R (read as row R - 1) store nothing."""
    ptrs = x_rows[:, None] + cols[None, :].to(tl.int64) * stride_xc
    if MASKED:
        col_ok = cols < C
        z = tl.load(ptrs, mask=keep[:, None] & col_ok[None, :], other=0.0).to(ACC)
    else:
        col_ok = None
        z = tl.load(ptrs, mask=keep[:, None], other=0.0).to(ACC)
    grad = _exp2((z - hi[:, None]) * _LOG2E - lo[:, None], ACC) * pc[:, None]
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            grad -= eps_g[:, None] * _load_classes(W + cols, col_ok, MASKED, ACC)[None, :]
        else:
            grad -= eps_g[:, None]
    out = gx_rows[:, None] + cols[None, :].to(tl.int64)
    if MASKED:
        tl.store(out, grad.to(gx_rows.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out, grad.to(gx_rows.dtype.element_ty), mask=row_ok[:, None])


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
    out = torch.empty((4 if smoothing else 3, R), dtype=torch.float64, device=logits.device)
    if R == 0:
        return out
    grid, flags = _launch(logits, wide_state=weight is not None and smoothing)
    with guard(logits):
        vp_stats_kernel[grid](
            logits, logits.stride(0), logits.stride(1), target, target.stride(0),
            wsum if weight is None else weight, wsum, out, R, C, vocab_start, ignore_index,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing, **flags)
    return out


def vp_bwd(g, g_lse, logits, lse_m, lse_s, coef, tcoef, y_local, weight, eps_c, smoothing):
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
            logits.stride(1), lse_m.contiguous(), lse_s.contiguous(), coef.contiguous(),
            tcoef.contiguous(), y_local.contiguous(), eps_c if weight is None else weight, eps_c,
            grad, R, C,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=smoothing,
            HAS_GRAD_LSE=g_lse is not None, **flags)
    return grad.to(logits.dtype)
