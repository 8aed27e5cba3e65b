"""Triton kernels for fused cross-entropy, their launch configuration and their launchers
(installed as nllfused.kernels.cross_entropy).

The contract is csrc/ops.cpp's (nllfused::ce_fwd_triton / ce_bwd_triton), the maths docs/maths.md:
  ce_fwd_kernel        reads each row of logits once (online softmax) and writes per-row loss,
                       lse, aux; with SPLIT, several programs share a row and each writes its
                       partial state instead,
  ce_fwd_merge_kernel  merges those partial states into the same loss, lse, aux,
  ce_bwd_kernel        reads each row once more and writes its gradient, recomputing p from lse.
launch_config picks the tile shape, row_splits how many programs share a row; ce_fwd / ce_bwd at
the end allocate the outputs and launch.

A program handles a tile of BLOCK_R rows x BLOCK_C classes and loops over the classes, so one
kernel serves the LM case (few long rows: BLOCK_R = 1) and the classification / segmentation case
(many short rows, rows adjacent in memory when D > 1: BLOCK_R > 1). Rows are r = n * D + d of the
(N, C, D) view; all offsets are int64. Optional features are constexpr flags, so a plain
cross-entropy compiles none of their code.

Online-softmax state, named as in the C++ and CUDA kernels: m the running max, k the number of
classes exactly at m (their exp terms are exactly 1), s the sum of exp(z - m) over the others;
lse = m + log(k + s), log1p(s) when k == 1. The forward keeps this state per lane (per element of
the tile) inside the class loop, so the loop has no block-wide reduction: one exp, a compare and
a few selects per logit. The lanes are merged exactly once per row, after the loop.
"""
import torch
import triton
import triton.language as tl

from .launch import INTERPRETER, acc_dtype, guard, hi_lo, truncating_store

_LOG2E = tl.constexpr(1.4426950408889634)
# Compiled, float32 exps of the class loops are one MUFU.EX2 that flushes results under 2^-126 to
# zero (tl.exp adds three instructions of denormal scaling per element; a term under 2^-126 of
# the max changes no float32 sum). The interpreter runs no inline PTX: it uses tl.exp2.
_FAST_EXP2 = tl.constexpr(not INTERPRETER)


@triton.jit
def _exp2(x, ACC: tl.constexpr):
    """2^x in the loops: see _FAST_EXP2."""
    if _FAST_EXP2 and ACC == tl.float32:
        y = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _lowest(ACC: tl.constexpr):
    # The most negative finite value: a lane's running max starts there (see ce_fwd_kernel).
    if ACC == tl.float64:
        v = -1.7976931348623157e308
    else:
        v = -3.4028234663852886e38
    return v


@triton.jit
def _tanh(v, ACC: tl.constexpr):
    """tanh(v) to a few ulps of ACC everywhere, including near 0 where 1 - 2/(1 + e^2v) would
    carry an absolute (so, relative to a tiny tanh, huge) rounding error."""
    a = tl.abs(v)
    if ACC == tl.float64:
        # tanh(a) = -e / (2 + e), e = expm1(-2a) by Kahan's exact-quotient trick (float64 exp and
        # log are correctly rounded enough for it on every target).
        u = tl.exp(-2.0 * a)
        plain = (u == 1.0) | (u == 0.0)          # expm1 is -2a, or -1: no quotient needed
        quotient = (u - 1.0) * (-2.0 * a) / tl.log(tl.where(plain, 0.5, u))
        e = tl.where(u == 1.0, -2.0 * a, tl.where(u == 0.0, -1.0, quotient))
        t = -e / (2.0 + e)
    else:
        # |v| < 0.5: the odd Taylor polynomial through v^17 (next term < 1e-9 relative);
        # beyond: (e - 1) / (e + 1) with e = exp(2a) >= 2.7, where nothing cancels.
        a2 = a * a
        poly = -929569.0 / 638512875.0 + a2 * (6404582.0 / 10854718875.0)
        poly = 21844.0 / 6081075.0 + a2 * poly
        poly = -1382.0 / 155925.0 + a2 * poly
        poly = 62.0 / 2835.0 + a2 * poly
        poly = -17.0 / 315.0 + a2 * poly
        poly = 2.0 / 15.0 + a2 * poly
        poly = -1.0 / 3.0 + a2 * poly
        small = a + a * a2 * poly
        e = tl.exp(2.0 * tl.minimum(a, 10.0))      # tanh(10) is 1 in float32
        t = tl.where(a < 0.5, small, (e - 1.0) / (e + 1.0))
    return tl.where(v < 0, -t, t)


@triton.jit
def _log1p(x):
    # log(1 + x) keeping the digits of a tiny x that 1 + x rounds away (u - 1 is exact: the
    # quotient corrects log(u) for that rounding).
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _load_classes(ptrs, mask, MASKED: tl.constexpr, ACC: tl.constexpr):
    """A block of per-class values (weights, soft targets) in ACC; masked lanes read 0. Whole
    blocks (MASKED false) load without a mask."""
    if MASKED:
        v = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    else:
        v = tl.load(ptrs).to(ACC)
    return v


@triton.jit
def _load_logits(ptrs, mask, logit_scale, softcap, ACC: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * x) in the accumulation dtype; masked lanes are -inf. Loads
    without a mask need no registers set to -inf first: whole blocks of the loops pass None."""
    if mask is None:
        z = tl.load(ptrs).to(ACC)
    else:
        z = tl.load(ptrs, mask=mask, other=float("-inf")).to(ACC)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap, ACC)
        if mask is not None:
            z = tl.where(mask, z, float("-inf"))  # softcap maps -inf to -softcap
    return z


@triton.jit
def _options(smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
             ACC: tl.constexpr):
    # Float arguments arrive as float32: each option comes as hi + lo so float64 keeps it whole.
    zero = tl.zeros([], ACC)
    return (zero + smoothing_hi) + smoothing_lo, (zero + scale_hi) + scale_lo, \
        (zero + softcap_hi) + softcap_lo


@triton.jit
def _tile_rows(R, D, BLOCK_R: tl.constexpr):
    """This program's rows r = n * D + d, whether each exists, and their (n, d). Rows past the
    end read row R - 1 (and store nothing), so that loads need no row mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    safe = tl.minimum(rows, R - 1)
    return rows, rows < R, safe // D, safe % D


@triton.jit
def _columns(C, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr):
    """This program's classes [lo, hi) and where its whole blocks end (the rest, if any, is one
    masked block): the whole row, or with SPLIT share program_id(1) of num_programs(1), whole
    blocks each so that loads stay as aligned as without."""
    if SPLIT:
        span = tl.cdiv(tl.cdiv(C, tl.num_programs(1)), BLOCK_C) * BLOCK_C
        lo = tl.multiple_of(tl.program_id(1) * span, BLOCK_C)
        hi = tl.maximum(tl.minimum(lo + span, C), lo)
    else:
        lo = 0
        hi = C
    return lo, lo + (hi - lo) // BLOCK_C * BLOCK_C, hi


@triton.jit
def _reference(x_row, row_ok, logit_scale, softcap, ACC: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr):
    # Reference r = z at class 0 (0 if infinite): the class sums accumulate z - r, so a large
    # common offset in the logits (1e4 + noise) cancels exactly instead of swamping float32 sums.
    r = _load_logits(x_row, row_ok, logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
    return tl.where(tl.abs(r) < float("inf"), r, 0.0)


@triton.jit
def _rescaled(m, k, s, m_new, ref):
    """An online-softmax state against a max m_new >= m (ref: m_new, or 0 if -inf): k and s
    stay apart where m is m_new; elsewhere both become one sum, rescaled by exp(m - m_new)."""
    at = m == m_new
    return tl.where(at, k, 0.0), tl.where(at, s, (k + s) * tl.exp(m - ref))


@triton.jit
def _merge(m, k, s):
    """Merge online-softmax states along axis 1 exactly: m = max m_i, k counts the k_i of the
    lanes at m, every other lane's k_i + s_i is rescaled by exp(m_i - m) into s."""
    m_row = tl.max(m, 1)
    ref = tl.where(m_row == float("-inf"), 0.0, m_row)   # all -inf: nothing to rescale
    k, s = _rescaled(m, k, s, m_row[:, None], ref[:, None])
    # A +inf max is not counted: exp(inf - inf) makes the row NaN, as in torch.
    return m_row, tl.sum(k, 1), tl.where(m_row == float("inf"), float("nan"), tl.sum(s, 1))


@triton.jit
def _merge_pair(m1, k1, s1, m2, k2, s2):
    """Two online-softmax states merged elementwise, as _merge merges lanes."""
    m = tl.maximum(m1, m2)
    ref = tl.where(m == float("-inf"), 0.0, m)
    k1, s1 = _rescaled(m1, k1, s1, m, ref)
    k2, s2 = _rescaled(m2, k2, s2, m, ref)
    return m, k1 + k2, s1 + s2


@triton.jit
def _finish(m, k, s, sum_wz, sum_wq, r, rows, row_ok, x_row, stride_xc, t_row, W, WSUM,
            LOSS, LSE, AUX, C, ignore_index, label_smoothing, logit_scale, softcap,
            ACC: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
            HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Stores loss, aux and lse of rows from their merged state (m, k, s) and class sums
    sum_wz = sum w (z - r) (or of w q' (z - r)), sum_wq = sum w q'."""
    log_s = tl.where(k == 1.0, _log1p(s), tl.log(k + s))   # log sum_c exp(z_c - m)
    lse_r = (m - r) + log_s                      # lse - r, never through a rounded lse
    if PROB_TARGET:
        # A row with no target mass at all adds nothing, even when every z is -inf (lse_r NaN).
        loss = tl.where(sum_wq == 0.0, 0.0, sum_wq * lse_r) - sum_wz
        aux = sum_wq
    else:
        y = tl.load(t_row, mask=row_ok, other=0).to(tl.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y_safe = tl.where(in_range, y, 0)        # never read outside the row
        z_y = _load_logits(x_row + y_safe * stride_xc, row_ok, logit_scale, softcap, ACC,
                           HAS_SCALE, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_y = tl.load(W + y_safe, mask=row_ok, other=0.0).to(ACC)
        else:
            w_y = tl.zeros_like(m) + 1.0
        loss = w_y * ((m - z_y) + log_s)
        if HAS_SMOOTHING:
            smooth = tl.load(WSUM).to(ACC) * lse_r - sum_wz      # sum_c w_c (lse - z_c)
            loss = (1.0 - label_smoothing) * loss + (label_smoothing / C) * smooth
        # Out-of-range targets poison their row with NaN, the documented GPU behaviour.
        loss = tl.where(counted, tl.where(in_range, loss, float("nan")), 0.0)
        aux = tl.where(counted, tl.where(in_range, w_y, float("nan")), 0.0)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(AUX + rows, aux, mask=row_ok)
    # lse = double(m) + double(log(k + s)): float64 once per row, never in the loop.
    s64 = s.to(tl.float64)
    log_s64 = tl.where(k == 1.0, _log1p(s64), tl.log(k.to(tl.float64) + s64))
    tl.store(LSE + rows, m.to(tl.float64) + log_s64, mask=row_ok)


@triton.jit
def _fwd_step(x_row, t_row, W, cols, C, r, m, s, acc_wz, acc_wq, stride_xc, stride_tc,
              label_smoothing, logit_scale, softcap, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr, ACC: tl.constexpr, PROB_TARGET: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """One block of classes of ce_fwd_kernel's loop: its per-lane state updated. MASKED for the
    block that runs past the row's end (masked lanes are -inf and weigh nothing)."""
    if MASKED:
        col_ok = cols < C
        mask = tl.broadcast_to(col_ok[None, :], [BLOCK_R, BLOCK_C])
    else:
        col_ok = None   # whole blocks: no mask
        mask = None
    z = _load_logits(x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask, logit_scale,
                     softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
    # One exp per logit: e = exp(-|z - m|) is z's term if z <= m (a tie adds 1), else the factor
    # that rescales the lane's old terms and its old max's 1 to the new max z: s' = s * e + e.
    # A NaN z makes s NaN; -inf adds 0; a second +inf makes s NaN.
    dz = z - m
    e = _exp2(-tl.abs(dz) * _LOG2E, ACC)
    grew = dz > 0.0
    s = s * tl.where(grew, e, 1.0) + e
    m = tl.where(grew, z, m)
    if HAS_WEIGHT:
        w = _load_classes(W + cols, col_ok, MASKED, ACC)[None, :]
    if PROB_TARGET:
        q = _load_classes(t_row[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask, MASKED,
                          ACC)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / C
            if MASKED:
                q = tl.where(mask, q, 0.0)
        if HAS_WEIGHT:
            q = q * w
        acc_wq += q
        # A class with no target mass adds nothing, even when masked at -inf (no 0 * inf).
        acc_wz += tl.where(q != 0.0, q * (z - r[:, None]), 0.0)
    elif HAS_SMOOTHING:
        wz = z - r[:, None]
        if HAS_WEIGHT:
            wz = w * wz
        if MASKED:
            wz = tl.where(mask, wz, 0.0)
        acc_wz += wz
    return m, s, acc_wz, acc_wq


@triton.jit
def ce_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets (N, D) indices or (N, C, D) probabilities
    W, WSUM,                                     # class weights (C,), their sum (1,)
    LOSS, LSE, AUX,                              # per-row outputs, contiguous (N * D,)
    PART,                                        # SPLIT: splits, then states, as below
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
):
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_row = X + n * stride_xn + d * stride_xd
    t_row = T + n * stride_tn + d * stride_td
    r = _reference(x_row, row_ok, logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
    lo, body, hi = _columns(C, BLOCK_C, SPLIT)

    # Per-lane state: m the lane's max, s the sum of exp(z - m) over its logits but one at m, so
    # a confident row's tiny terms are never added to the 1 of its max (ties at m count in s).
    # m starts at the lowest finite value, not -inf: z - m is then never -inf - -inf, and the
    # first logit above it scales the start's phantom 1 by exp(-huge) = 0.
    m = tl.full([BLOCK_R, BLOCK_C], _lowest(ACC), ACC)
    s = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    acc_wz = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # sum of w (z - r), or of w q' (z - r)
    acc_wq = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # sum of w q' (probability targets)
    for start in range(lo, body, BLOCK_C):
        m, s, acc_wz, acc_wq = _fwd_step(
            x_row, t_row, W, start + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, acc_wq,
            stride_xc, stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R, BLOCK_C, ACC,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, False)
    if body < hi:
        m, s, acc_wz, acc_wq = _fwd_step(
            x_row, t_row, W, body + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, acc_wq,
            stride_xc, stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R, BLOCK_C, ACC,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, True)

    # Lanes as (m, k, s): k = 1 for the max a lane holds. A lane still at the lowest value saw
    # nothing above it: its ties there are real logits, k of them; none: no finite logit.
    low = m == _lowest(ACC)
    k = tl.where(low, s, 1.0)
    m, k, s = _merge(tl.where(low & (s == 0.0), float("-inf"), m), k, tl.where(low, 0.0, s))
    sum_wz = tl.sum(acc_wz, 1)
    sum_wq = tl.sum(acc_wq, 1)
    if SPLIT:
        # This (row, split)'s state for ce_fwd_merge_kernel, which finishes the row. PART[0]
        # holds the number of splits, the merge's loop bound (every program writes the same).
        splits = tl.num_programs(1)
        tl.store(PART, splits.to(ACC))
        part = PART + 1 + rows * splits + tl.program_id(1)
        plane = R * splits
        tl.store(part, m, mask=row_ok)
        tl.store(part + plane, k, mask=row_ok)
        tl.store(part + 2 * plane, s, mask=row_ok)
        if PROB_TARGET or HAS_SMOOTHING:
            tl.store(part + 3 * plane, sum_wz, mask=row_ok)
        if PROB_TARGET:
            tl.store(part + 4 * plane, sum_wq, mask=row_ok)
    else:
        _finish(m, k, s, sum_wz, sum_wq, r, rows, row_ok, x_row, stride_xc, t_row, W, WSUM,
                LOSS, LSE, AUX, C, ignore_index, label_smoothing, logit_scale, softcap, ACC,
                PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def ce_fwd_merge_kernel(
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets, as in ce_fwd_kernel
    W, WSUM, LOSS, LSE, AUX,
    PART,                                        # splits, then states (5, N * D, splits), ACC
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """The split forward's second step: the partial states of each row, BLOCK_C splits per
    step, merged exactly as the lanes of one program are, then finished by the same code."""
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_row = X + n * stride_xn + d * stride_xd
    splits = tl.load(PART).to(tl.int32)
    plane = R * splits
    m = tl.full([BLOCK_R, BLOCK_C], float("-inf"), ACC)
    k = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    s = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    sum_wz = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    sum_wq = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_C):
        lanes = start + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (lanes < splits)[None, :]
        part = PART + 1 + rows[:, None] * splits + lanes[None, :]
        m, k, s = _merge_pair(m, k, s, tl.load(part, mask=ok, other=float("-inf")),
                              tl.load(part + plane, mask=ok, other=0.0),
                              tl.load(part + 2 * plane, mask=ok, other=0.0))
        if PROB_TARGET or HAS_SMOOTHING:
            sum_wz += tl.load(part + 3 * plane, mask=ok, other=0.0)
        if PROB_TARGET:
            sum_wq += tl.load(part + 4 * plane, mask=ok, other=0.0)
    m, k, s = _merge(m, k, s)
    r = _reference(x_row, row_ok, logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
    _finish(m, k, s, tl.sum(sum_wz, 1), tl.sum(sum_wq, 1), r, rows, row_ok, x_row, stride_xc,
            T + n * stride_tn + d * stride_td, W, WSUM, LOSS, LSE, AUX, C, ignore_index,
            label_smoothing, logit_scale, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING,
            HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _bwd_step(x_row, t_row, gx_row, W, cols, C, D, row_ok, keep, lse_hi, lse_lo, p_coef, eps_g,
              g, stride_xc, stride_tc, label_smoothing, logit_scale, softcap, ACC: tl.constexpr,
              PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
              HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """One block of classes of ce_bwd_kernel's loop, every term but the true class's. MASKED for
    the block that runs past the row's end."""
    x_ptrs = x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc
    if MASKED:
        col_ok = cols < C
        q_mask = col_ok[None, :]
    else:
        col_ok = None   # whole blocks: no mask
        q_mask = None
    if PROB_TARGET:
        if MASKED:
            z = tl.load(x_ptrs, mask=col_ok[None, :]).to(ACC)
        else:
            z = tl.load(x_ptrs).to(ACC)
    else:
        # Ignored rows read nothing: z = 0 against lse = +inf makes p = 0 and their gradient
        # exactly 0, whatever their logits (NaN included), at no cost per element.
        if MASKED:
            z = tl.load(x_ptrs, mask=keep[:, None] & col_ok[None, :], other=0.0).to(ACC)
        else:
            z = tl.load(x_ptrs, mask=keep[:, None], other=0.0).to(ACC)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        t = _tanh(z / softcap, ACC)
        z = softcap * t
    # p = exp(z - lse) = 2^((z - hi) log2e - lo log2e): lse split into hi + lo keeps torch's
    # accuracy in float32; one FADD, one FFMA, one MUFU.
    grad = _exp2((z - lse_hi[:, None]) * _LOG2E - lse_lo[:, None], ACC) * p_coef[:, None]
    if HAS_WEIGHT:
        w = _load_classes(W + cols, col_ok, MASKED, ACC)[None, :]
    if PROB_TARGET:
        q = _load_classes(t_row[:, None] + cols[None, :].to(tl.int64) * stride_tc, q_mask,
                          MASKED, ACC)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / C
        if HAS_WEIGHT:
            q = q * w
        grad -= q * g[:, None]
    else:
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                grad -= eps_g[:, None] * w
            else:
                grad -= eps_g[:, None]
    if HAS_SOFTCAP:
        grad = grad * (1.0 - t * t)
    out_ptrs = gx_row[:, None] + cols[None, :].to(tl.int64) * D
    if MASKED:
        tl.store(out_ptrs, grad.to(gx_row.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.store(out_ptrs, grad.to(gx_row.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def ce_bwd_kernel(
    G, stride_gn, stride_gd,                     # upstream gradient of the loss (N, D)
    GL, stride_gln, stride_gld,                  # upstream gradient of the lse (N, D), float64
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets
    W, WSUM, LSE, AUX,
    GX,                                          # gradient, contiguous (N, C, D)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    SPLIT: tl.constexpr,
):
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_row = X + n * stride_xn + d * stride_xd
    t_row = T + n * stride_tn + d * stride_td
    gx_row = GX + n * C * D + d
    lo, body, hi = _columns(C, BLOCK_C, SPLIT)

    # The gradient is  p * p_coef - eps_g * w_c - y_coef [c = y]  (probability targets:
    # p * p_coef - g q'_c w_c), with every per-row factor (the upstream g, the lse gradient,
    # d lse / dz = p, and logit_scale) folded into the coefficients here, once.
    g = tl.load(G + n * stride_gn + d * stride_gd).to(ACC)
    if HAS_SCALE:
        g = g * logit_scale
    keep = row_ok                                # (index targets: ignored rows get exactly 0)
    eps_g = g
    if PROB_TARGET:
        p_coef = g * tl.load(AUX + rows, mask=row_ok, other=0.0).to(ACC)   # g sum_k w_k q'_k
    else:
        y = tl.load(t_row).to(tl.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y_col = tl.where(in_range, y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(W + y_col).to(ACC)
        else:
            w_y = tl.zeros_like(g) + 1.0
        g = tl.where(counted, tl.where(in_range, g, float("nan")), 0.0)
        y_coef = (1.0 - label_smoothing) * w_y * g
        p_coef = y_coef
        if HAS_SMOOTHING:
            eps_g = (label_smoothing / C) * g
            p_coef += eps_g * tl.load(WSUM).to(ACC)
            y_coef += eps_g * w_y
        keep = counted
    if HAS_GRAD_LSE:
        g_lse = tl.load(GL + n * stride_gln + d * stride_gld).to(ACC)
        if HAS_SCALE:
            g_lse *= logit_scale
        p_coef += g_lse
        keep = keep | (g_lse != 0.0)             # an ignored row's lse gradient still counts
    lse64 = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse_hi = tl.where(keep, lse64.to(ACC), float("inf"))
    lse_lo = tl.where(keep, (lse64 - lse_hi.to(tl.float64)).to(ACC) * _LOG2E, 0.0)

    for start in range(lo, body, BLOCK_C):
        _bwd_step(x_row, t_row, gx_row, W, start + tl.arange(0, BLOCK_C), C, D, row_ok, keep,
                  lse_hi, lse_lo, p_coef, eps_g, g, stride_xc, stride_tc, label_smoothing,
                  logit_scale, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE,
                  HAS_SOFTCAP, False)
    if body < hi:
        _bwd_step(x_row, t_row, gx_row, W, body + tl.arange(0, BLOCK_C), C, D, row_ok, keep,
                  lse_hi, lse_lo, p_coef, eps_g, g, stride_xc, stride_tc, label_smoothing,
                  logit_scale, softcap, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE,
                  HAS_SOFTCAP, True)

    if not PROB_TARGET:
        # The true class, stored again over the loop's value rather than compared with every
        # column in the loop; the barrier orders the two stores. Its p_y - 1 (times the row's
        # coefficient) is formed in ACC and rounded once on store: without smoothing
        # y_coef == p_coef, and p_y * p_coef - y_coef is (p_y - 1) * p_coef in one FMA.
        tl.debug_barrier()
        z = tl.load(x_row + y_col * stride_xc).to(ACC)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            t = _tanh(z / softcap, ACC)
            z = softcap * t
        grad = _exp2((z - lse_hi) * _LOG2E - lse_lo, ACC) * p_coef - y_coef
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        own = row_ok & counted & in_range & (y_col >= lo) & (y_col < hi)
        tl.store(gx_row + y_col * D, grad.to(GX.dtype.element_ty), mask=own)


def launch_config(num_rows: int, num_classes: int, elem_size: int):
    """(BLOCK_R, BLOCK_C, num_warps) for a problem: the one place launch shapes are chosen.

    Always 4 warps, with few logits per thread: the forward keeps state per logit, so a thread
    holding 16 logits needs ~64 registers, and 4 or more programs reside on an SM to hide the
    memory latency (float64: 4 logits, its state twice as wide). Long rows (LM vocabularies)
    loop over the classes with a program per row (or per share of a row: row_splits). Short
    rows pack several rows into a tile of 512 logits, 4 per thread: their loads are often
    unaligned (a row of 10 classes: no vector loads, a 64-bit address per logit) and each row
    adds registers of its own (offsets, target).
    """
    block_c = min(triton.next_power_of_2(num_classes), 512 if elem_size == 8 else 2048)
    block_r = max(1, min(512 // block_c, triton.next_power_of_2(max(num_rows, 1))))
    return block_r, block_c, 4


def row_splits(num_rows: int, num_classes: int, block_r: int, block_c: int, device) -> int:
    """How many programs share each row: a power of two. Few long rows (fewer than about two
    per SM) would leave SMs idle with one program each: they are split so that the grid has
    about 4 programs per SM, each still looping over 4 blocks or more."""
    if block_r != 1:
        return 1
    # Under the interpreter, an H100's count, so that the split path is exercised on the CPU.
    sms = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
           else 132)
    if num_rows >= 2 * sms:
        return 1
    steps, splits = triton.cdiv(num_classes, block_c), 1
    while num_rows * splits * 2 <= 4 * sms and steps >= 4 * splits * 2:
        splits *= 2
    return splits


MERGE_BLOCK = 64   # splits ce_fwd_merge_kernel merges per step (one step, nearly always)


# ------------------------------------------------------------------------------------------------
# Launchers: the CPU and CUDA kernels of nllfused::ce_fwd_triton / ce_bwd_triton (nllfused/ops.py
# registers them). Arguments as in csrc/ops.cpp.
# ------------------------------------------------------------------------------------------------

def _launch(logits, weight, label_smoothing, logit_scale, softcap, prob_target):
    """(grid, per-call kernel arguments, constexpr flags) shared by both kernels."""
    N, C, D = logits.shape
    R = N * D
    block_r, block_c, num_warps = launch_config(R, C, logits.element_size())
    splits = row_splits(R, C, block_r, block_c, logits.device)
    if weight is None:
        # W is never read without HAS_WEIGHT; WSUM = C.
        W = WSUM = torch.full((1,), float(C), dtype=torch.float64, device=logits.device)
    else:
        W, WSUM = weight, weight.sum(dtype=torch.float64).reshape(1)  # on the device: no sync
    flags = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(logits.dtype),
                 PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
                 HAS_SMOOTHING=label_smoothing > 0, HAS_SCALE=logit_scale != 1.0,
                 HAS_SOFTCAP=softcap > 0, SPLIT=splits > 1, num_warps=num_warps)
    options = hi_lo(label_smoothing, logit_scale, softcap)
    return (triton.cdiv(R, block_r), splits), (W, WSUM), (R, C, D), options, flags


def _target_strides(target, prob_target):
    if prob_target:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def ce_fwd(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
           prob_target):
    N, _, D = logits.shape
    loss = torch.empty((N, D), dtype=torch.float64 if logits.dtype == torch.float64
                       else torch.float32, device=logits.device)
    aux = torch.empty_like(loss)
    lse = torch.empty((N, D), dtype=torch.float64, device=logits.device)
    if N * D == 0:
        return loss, lse, aux
    grid, weights, sizes, options, flags = _launch(logits, weight, label_smoothing, logit_scale,
                                                    softcap, prob_target)
    splits = grid[1]
    part = torch.empty(1 + 5 * N * D * splits if splits > 1 else 1, dtype=loss.dtype,
                       device=logits.device)
    args = (logits, *logits.stride(), target, *_target_strides(target, prob_target), *weights)
    with guard(logits):
        ce_fwd_kernel[grid](*args, loss, lse, aux, part, *sizes, ignore_index, *options, **flags)
        if splits > 1:
            flags.update(BLOCK_R=1, BLOCK_C=min(splits, MERGE_BLOCK), num_warps=1)
            del flags["SPLIT"]
            ce_fwd_merge_kernel[(N * D,)](*args, loss, lse, aux, part, *sizes, ignore_index,
                                          *options, **flags)
    return loss, lse, aux


def ce_bwd(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index, label_smoothing,
           logit_scale, softcap, prob_target):
    N, C, D = logits.shape
    grad = torch.empty((N, C, D), dtype=torch.float32 if truncating_store(logits)
                       else logits.dtype, device=logits.device)
    if N * D == 0:
        return grad.to(logits.dtype)
    grid, weights, sizes, options, flags = _launch(logits, weight, label_smoothing, logit_scale,
                                                    softcap, prob_target)
    gl = grad_loss if grad_lse is None else grad_lse   # never read without HAS_GRAD_LSE
    with guard(logits):
        ce_bwd_kernel[grid](grad_loss, *grad_loss.stride(), gl, *gl.stride(),
                            logits, *logits.stride(), target, *_target_strides(target, prob_target),
                            *weights, lse, aux, grad, *sizes, ignore_index, *options,
                            HAS_GRAD_LSE=grad_lse is not None, **flags)
    return grad.to(logits.dtype)
