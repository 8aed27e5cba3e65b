"""Triton kernels for fused cross-entropy, their launch configuration and their launchers
(installed as nllfused.kernels.cross_entropy).

The contract is csrc/ops.cpp's (nllfused::ce_fwd_triton / ce_bwd_triton), the maths docs/maths.md:
  ce_fwd_kernel        reads each row of logits once (online softmax) and writes per-row loss,
                       lse, aux; with SPLIT, several programs share a row and each writes its
                       partial state instead,
  ce_fwd_merge_kernel  merges those partial states into the same loss, lse, aux,
  ce_bwd_kernel        reads each row once more and writes its gradient, recomputing p from lse.
launch_config picks the tile shape, row_splits how many programs share a row; ce_fwd / ce_bwd at
the end allocate the outputs and launch. The elementwise helpers (exp, tanh, log1p, loads) are in
kernels/row_math.py, the statistics' (entropy, argmax, target log-prob) in kernels/row_stats.py.

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

# INTERPRETER: read here by nllfused._extension (whether these kernels are interpreted).
from .launch import (INTERPRETER, acc_dtype, fp_fusion, guard, hi_lo,  # noqa
                     target_strides, truncating_store)
from .row_math import (_LN2, _LOG2E, _class_terms, _columns, _exact_lse, _exp2, _load_classes,
                       _load_logits, _log1p, _lowest, _options, _sums_against_max, _tanh,
                       _tile_rows)
from .row_stats import _finish_stats, _first_nan, _lane_argmax, _lane_entropy


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
def _counted_lanes(m, s, ACC: tl.constexpr):
    """The forward loop's per-lane (m, s) as (m, k, s), and which lanes stayed at the lowest
    value: k = 1 for the max a lane holds. A lane still at the lowest value saw nothing above
    it: its ties there are real logits, k of them; none: no finite logit (m = -inf)."""
    low = m == _lowest(ACC)
    k = tl.where(low, s, 1.0)
    m = tl.where(low & (s == 0.0), float("-inf"), m)
    s = tl.where(low, 0.0, s)
    return m, k, s, low


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
def _finish(m, k, s, sum_wz, sum_wq, r, rows, row_ok, x_row, stride_xc, t_row, stride_tc, W,
            WSUM, LOSS, LSE, AUX, C, ignore_index, label_smoothing, logit_scale, softcap,
            BLOCK_R: tl.constexpr, SCAN_C: tl.constexpr,
            ACC: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
            HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Stores loss, aux and lse of rows from their merged state (m, k, s) and class sums
    sum_wz = sum w (z - r) (or of w q' (z - r)), sum_wq = sum w q'. SCAN_C: the block of the
    rare rows read once more (spanning the float range, or holding +inf)."""
    log_s = tl.where(k == 1.0, _log1p(s), tl.log(k + s))   # log sum_c exp(z_c - m)
    lse_r = (m - r) + log_s                      # lse - r, never through a rounded lse
    if PROB_TARGET or HAS_SMOOTHING:  # rows spanning more than the float range: against m
        sum_wz, lse_r = _sums_against_max(
            x_row, t_row, W, row_ok, m, s, log_s, lse_r, sum_wz, C, stride_xc, stride_tc,
            label_smoothing, logit_scale, softcap, BLOCK_R, SCAN_C, ACC, PROB_TARGET, HAS_WEIGHT,
            HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP)
    if PROB_TARGET:
        # A row with no target mass at all adds nothing, even when every z is -inf (lse_r NaN);
        # where it holds a NaN or +inf (s NaN, or m = +inf) its loss is NaN, as torch's 0 * NaN.
        void = (sum_wq == 0.0) & (s == s) & (m != float("inf"))
        loss = tl.where(void, 0.0, sum_wq * lse_r) - sum_wz
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
    # A +inf max left s NaN (_merge: so the loss is NaN), but its lse is +inf as torch.logsumexp's
    # -- NaN if the row also holds a NaN: such rows only are read once more (_first_nan).
    pinf = m == float("inf")
    nan_at = _first_nan(x_row, row_ok & pinf, 0, C, C, stride_xc, logit_scale, softcap, BLOCK_R,
                        SCAN_C, ACC, HAS_SCALE, HAS_SOFTCAP)
    log_s64 = tl.where(pinf & (nan_at == 2147483647), 0.0, log_s64)
    tl.store(LSE + rows, m.to(tl.float64) + log_s64, mask=row_ok)


@triton.jit
def _fwd_step(x_row, t_row, W, cols, C, r, m, s, acc_wz, acc_wq, ent, arg, stride_xc,
              stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr, ACC: tl.constexpr, PROB_TARGET: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
              MASKED: tl.constexpr):
    """One block of classes of ce_fwd_kernel's loop: its per-lane state updated. MASKED for the
    block that runs past the row's end (masked lanes are -inf and weigh nothing). ENTROPY: also
    ent = sum of exp(z - m) (z - m) over the lane (its max adds 0); ARGMAX: arg, the column of
    the lane's first max (a NaN never moves it: rows with one are read again, _first_nan)
    (docs/maths.md, "Statistics")."""
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
    if ENTROPY:
        # Rescaled like s: the old terms and the old max's 1 move to the new max, each term's
        # z - m shifting by -dz. e == 0 (a -inf logit, or the start's phantom max) adds nothing.
        ent = tl.where(e == 0.0, tl.where(grew, 0.0, ent),
                       tl.where(grew, e * (ent - dz * (s + 1.0)), ent + e * dz))
    if ARGMAX:  # one select a logit
        arg = tl.where(grew, cols[None, :], arg)
    s = s * tl.where(grew, e, 1.0) + e
    m = tl.where(grew, z, m)
    if PROB_TARGET or HAS_SMOOTHING:
        wz, wq = _class_terms(z, r, W + cols, t_row[:, None] + cols[None, :].to(tl.int64) *
                              stride_tc, col_ok, mask, C, label_smoothing, ACC, PROB_TARGET,
                              HAS_WEIGHT, HAS_SMOOTHING, MASKED)
        acc_wz += wz
        if PROB_TARGET:
            acc_wq += wq
    return m, s, acc_wz, acc_wq, ent, arg


@triton.jit
def ce_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets (N, D) indices or (N, C, D) probabilities
    W, WSUM,                                     # class weights (C,), their sum (1,)
    LOSS, LSE, AUX,                              # per-row outputs, contiguous (N * D,)
    PART,                                        # SPLIT: splits, then states, as below
    ENT, PRED, TLP,                              # STATS: entropy, argmax, target log-prob (N * D,)
                                                 # (ENTROPY / ARGMAX: formed; else 0)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr,
    STATS: tl.constexpr, ENTROPY: tl.constexpr, ARGMAX: tl.constexpr,
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
    ent = tl.zeros([BLOCK_R, BLOCK_C], ACC)      # ENTROPY (_fwd_step); else unused
    arg = tl.full([BLOCK_R, BLOCK_C], 2147483647, tl.int32)   # ARGMAX; else unused
    for start in range(lo, body, BLOCK_C):
        m, s, acc_wz, acc_wq, ent, arg = _fwd_step(
            x_row, t_row, W, start + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, acc_wq, ent, arg,
            stride_xc, stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R,
            BLOCK_C, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, ENTROPY,
            ARGMAX, False)
    if body < hi:
        m, s, acc_wz, acc_wq, ent, arg = _fwd_step(
            x_row, t_row, W, body + tl.arange(0, BLOCK_C), C, r, m, s, acc_wz, acc_wq, ent, arg,
            stride_xc, stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R,
            BLOCK_C, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, ENTROPY,
            ARGMAX, True)

    pred = arg                                   # (no SPLIT with STATS: the launcher's choice)
    if ARGMAX:  # a NaN logit made its lane's s NaN (and only a NaN or two +inf do)
        nan_rows = tl.max((s != s).to(tl.int32), 1) > 0
        pred = _lane_argmax(m, arg, _first_nan(x_row, row_ok & nan_rows, lo, hi, C, stride_xc,
                                               logit_scale, softcap, BLOCK_R, BLOCK_C, ACC,
                                               HAS_SCALE, HAS_SOFTCAP))
    m, k, s, low = _counted_lanes(m, s, ACC)
    if ENTROPY:
        ent = _lane_entropy(m, k, s, tl.where(low, 0.0, ent))
    m, k, s = _merge(m, k, s)
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
        _finish(m, k, s, sum_wz, sum_wq, r, rows, row_ok, x_row, stride_xc, t_row, stride_tc, W,
                WSUM, LOSS, LSE, AUX, C, ignore_index, label_smoothing, logit_scale, softcap,
                BLOCK_R, BLOCK_C, ACC, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE,
                HAS_SOFTCAP)
        if STATS:
            _finish_stats(m, k, s, ent, pred, rows, row_ok, x_row, stride_xc, t_row, ENT, PRED,
                          TLP, C, ignore_index, logit_scale, softcap, ACC, PROB_TARGET,
                          HAS_SCALE, HAS_SOFTCAP, ENTROPY, ARGMAX)


# The merge kernel's rare rereads (_finish): blocks as wide as a forward program's, not its few
# splits.
_MERGE_SCAN_C = tl.constexpr(1024)


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
            T + n * stride_tn + d * stride_td, stride_tc, W, WSUM, LOSS, LSE, AUX, C, ignore_index,
            label_smoothing, logit_scale, softcap, BLOCK_R, _MERGE_SCAN_C, ACC, PROB_TARGET,
            HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _bwd_step(x_row, t_row, gx_row, W, cols, C, D, row_ok, keep, lse_hi, lse_lo, p_coef, eps_g,
              g, g_ent, stride_xc, stride_tc, label_smoothing, logit_scale, softcap,
              ACC: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
              HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              ENTROPY_GRAD: tl.constexpr, MASKED: tl.constexpr):
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
    log2_p = (z - lse_hi[:, None]) * _LOG2E - lse_lo[:, None]
    p = _exp2(log2_p, ACC)
    if ENTROPY_GRAD:     # the entropy's -g_H p log p (its -g_H p H part is in p_coef), log p
        # never through a rounded z - (lse - H); a class at -inf (p = 0) gets 0, not 0 * inf
        grad = p * (p_coef[:, None] - g_ent[:, None] * tl.where(p == 0.0, 0.0, log2_p * _LN2))
    else:
        grad = p * p_coef[:, None]
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
    GX,                                          # gradient (N, C, D) contiguous; X: IN_PLACE
    GE, GT, ENT,                                 # HAS_STATS_GRAD: upstream gradients of the
                                                 # entropy, target log-prob; entropy (N * D,) ACC
                                                 # (ENTROPY_GRAD: the entropy's is not all 0)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
    SPLIT: tl.constexpr, HAS_STATS_GRAD: tl.constexpr, IN_PLACE: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
):
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_row = X + n * stride_xn + d * stride_xd
    t_row = T + n * stride_tn + d * stride_td
    gx_row = GX + n * C * D + d
    lo, body, hi = _columns(C, BLOCK_C, SPLIT)

    # The gradient is  p * p_coef - eps_g * w_c - y_coef [c = y]  (probability targets: p * p_coef
    # - g q'_c w_c), every per-row factor (g, the lse gradient, logit_scale) folded in here, once.
    g = tl.load(G + n * stride_gn + d * stride_gd).to(ACC)
    if HAS_SCALE:
        g = g * logit_scale
    keep = row_ok                                # (index targets: ignored rows get exactly 0)
    eps_g = g
    rest = tl.zeros_like(g)                      # p_coef - y_coef, summed apart (the true class)
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
            rest = eps_g * (tl.load(WSUM).to(ACC) - w_y)
        keep = counted
    if HAS_GRAD_LSE:
        g_lse = tl.load(GL + n * stride_gln + d * stride_gld).to(ACC)
        if HAS_SCALE:
            g_lse *= logit_scale
        p_coef += g_lse
        rest += g_lse
        keep = keep | (g_lse != 0.0)             # an ignored row's lse gradient still counts
    lse64 = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g_ent = g
    if HAS_STATS_GRAD:
        # d H / dz_c = -p_c (log p_c + H), d log p_y / dz_c = [c = y] - p_c (docs/maths.md).
        g_ent = tl.load(GE + rows, mask=row_ok, other=0.0).to(ACC)
        g_tlp = tl.load(GT + rows, mask=row_ok, other=0.0).to(ACC)
        if HAS_SCALE:
            g_ent *= logit_scale
            g_tlp *= logit_scale
        ent_h = tl.load(ENT + rows, mask=row_ok, other=0.0).to(ACC)
        # no entropy gradient asked for, no term: not 0 times a NaN row's H (an ignored row's)
        ent_term = tl.where(g_ent != 0.0, g_ent * ent_h, 0.0)
        if PROB_TARGET:
            g_tlp = tl.zeros_like(g_tlp)         # no target log-prob: nothing to differentiate
        else:
            g_tlp = tl.where(counted & in_range, g_tlp, 0.0)
            y_coef -= g_tlp
            rest -= ent_term
        p_coef -= ent_term + g_tlp
        keep = keep | (g_ent != 0.0) | (g_tlp != 0.0)
    lse_hi = tl.where(keep, lse64.to(ACC), float("inf"))
    lse_lo = tl.where(keep, (lse64 - lse_hi.to(tl.float64)).to(ACC) * _LOG2E, 0.0)
    lse_hi, lse_lo = _exact_lse(x_row, keep, lse64, lse_hi, lse_lo, C, stride_xc, logit_scale,
                                softcap, BLOCK_R, BLOCK_C, ACC, HAS_SCALE, HAS_SOFTCAP)
    if IN_PLACE and not PROB_TARGET:
        # GX is X itself (ce_bwd_inplace_triton): the true class's logit is read before the loop
        # stores over it (only this program stores over x[y]: own, below). Otherwise it is read
        # after the loop, so that it holds no registers across it (BLOCK_R of them: a 32-row
        # tile of 16 classes took 106 registers instead of 96).
        z_y = tl.load(x_row + y_col * stride_xc).to(ACC)

    for start in range(lo, body, BLOCK_C):
        _bwd_step(x_row, t_row, gx_row, W, start + tl.arange(0, BLOCK_C), C, D, row_ok, keep,
                  lse_hi, lse_lo, p_coef, eps_g, g, g_ent, stride_xc, stride_tc,
                  label_smoothing, logit_scale, softcap, ACC, PROB_TARGET, HAS_WEIGHT,
                  HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, ENTROPY_GRAD, False)
    if body < hi:
        _bwd_step(x_row, t_row, gx_row, W, body + tl.arange(0, BLOCK_C), C, D, row_ok, keep,
                  lse_hi, lse_lo, p_coef, eps_g, g, g_ent, stride_xc, stride_tc,
                  label_smoothing, logit_scale, softcap, ACC, PROB_TARGET, HAS_WEIGHT,
                  HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP, ENTROPY_GRAD, True)

    if not PROB_TARGET:
        # The true class, stored again over the loop's value (the barrier orders the stores), as
        # (p_y - 1) y_coef + p_y rest in ACC: p_y p_coef - y_coef would keep the rounding of
        # p_coef = y_coef + rest where p_y -> 1 (one class: p_y = 1).
        tl.debug_barrier()
        if IN_PLACE:
            z = z_y
        else:
            z = tl.load(x_row + y_col * stride_xc).to(ACC)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            t = _tanh(z / softcap, ACC)
            z = softcap * t
        log2_p = (z - lse_hi) * _LOG2E - lse_lo
        p_y = _exp2(log2_p, ACC)
        if ENTROPY_GRAD:
            rest -= g_ent * tl.where(p_y == 0.0, 0.0, log2_p * _LN2)
        grad = tl.fma(p_y - 1.0, y_coef, p_y * rest)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        own = row_ok & counted & in_range & (y_col >= lo) & (y_col < hi)
        tl.store(gx_row + y_col * D, grad.to(GX.dtype.element_ty), mask=own)


def launch_config(num_rows: int, num_classes: int, elem_size: int, stats: bool = False):
    """(BLOCK_R, BLOCK_C, num_warps) for a problem: the one place launch shapes are chosen.

    Always 4 warps, with few logits per thread: the forward keeps state per logit, so a thread
    holding 16 logits needs ~64 registers, and 4 or more programs reside on an SM to hide the
    memory latency (float64: 4 logits, its state twice as wide). Long rows (LM vocabularies)
    loop over the classes with a program per row (or per share of a row: row_splits). Short
    rows pack several rows into a tile of 512 logits, 4 per thread: their loads are often
    unaligned (a row of 10 classes: no vector loads, a 64-bit address per logit) and each row
    adds registers of its own (offsets, target); 256 logits for float64 (twice the state) and
    for rows of 8 classes or fewer (64 rows' own registers would dominate). With stats (the
    forward's STATS, the backward's HAS_STATS_GRAD) a logit's state is up to two values more
    (ENTROPY's sum, ARGMAX's column): tiles of short rows and blocks of long rows are halved, as
    registers would otherwise run out (the static check, nllfused.bench.gpu_static, compiles
    both).
    """
    block_c = min(triton.next_power_of_2(num_classes), 512 if elem_size == 8 else 2048)
    tile = 256 if elem_size == 8 or num_classes <= 8 else 512
    if stats:
        tile //= 2
    block_r = max(1, min(tile // block_c, triton.next_power_of_2(max(num_rows, 1))))
    if stats and block_r == 1:
        block_c = max(1, block_c // 2)
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

def _launch(logits, weight, label_smoothing, logit_scale, softcap, prob_target, stats=False):
    """(grid, per-call kernel arguments, constexpr flags) shared by both kernels. With stats,
    rows are not split (the merge kernel carries no statistics), and the tile is the same
    whichever statistics are asked for: their loss is then the same bits."""
    N, C, D = logits.shape
    R = N * D
    block_r, block_c, num_warps = launch_config(R, C, logits.element_size(), stats)
    splits = 1 if stats else row_splits(R, C, block_r, block_c, logits.device)
    if weight is None:
        # W is never read without HAS_WEIGHT; WSUM = C.
        W = WSUM = torch.full((1,), float(C), dtype=torch.float64, device=logits.device)
    else:
        W, WSUM = weight, weight.sum(dtype=torch.float64).reshape(1)  # on the device: no sync
    flags = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(logits.dtype),
                 PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
                 HAS_SMOOTHING=label_smoothing > 0, HAS_SCALE=logit_scale != 1.0,
                 HAS_SOFTCAP=softcap > 0, SPLIT=splits > 1, num_warps=num_warps)
    flags["enable_fp_fusion"] = fp_fusion(flags)  # (a compile option, not a constexpr)
    options = hi_lo(label_smoothing, logit_scale, softcap)
    return (triton.cdiv(R, block_r), splits), (W, WSUM), (R, C, D), options, flags


def ce_fwd(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
           prob_target):
    return _forward(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                    prob_target, False)


def ce_fwd_stats(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                 prob_target, with_entropy=True, with_predicted=True):
    """ce_fwd's outputs and the rows' entropy, target log-probability and argmax, from the same
    pass (nllfused::ce_fwd_stats_triton, csrc/ops.cpp). The kernel forms only those asked for
    (its ENTROPY and ARGMAX flags) and stores 0 for the others."""
    return _forward(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                    prob_target, True, with_entropy, with_predicted)


def _forward(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
             prob_target, stats, entropy=False, argmax=False):
    N, _, D = logits.shape
    loss = torch.empty((N, D), dtype=torch.float64 if logits.dtype == torch.float64
                       else torch.float32, device=logits.device)
    aux = torch.empty_like(loss)
    lse = torch.empty((N, D), dtype=torch.float64, device=logits.device)
    extra = ()
    if stats:  # entropy, target log-prob (0 for probability targets), argmax
        extra = (torch.empty_like(loss), torch.zeros_like(loss),
                 torch.empty((N, D), dtype=torch.int64, device=logits.device))
    if N * D == 0:
        return (loss, lse, aux, *extra)
    grid, weights, sizes, options, flags = _launch(logits, weight, label_smoothing, logit_scale,
                                                    softcap, prob_target, stats)
    splits = grid[1]
    part = torch.empty(1 + 5 * N * D * splits if splits > 1 else 1, dtype=loss.dtype,
                       device=logits.device)
    args = (logits, *logits.stride(), target, *target_strides(target, prob_target), *weights)
    outs = (extra[0], extra[2], extra[1]) if stats else (loss,) * 3   # ENT, PRED, TLP
    with guard(logits):
        ce_fwd_kernel[grid](*args, loss, lse, aux, part, *outs, *sizes, ignore_index, *options,
                            STATS=stats, ENTROPY=entropy, ARGMAX=argmax, **flags)
        if splits > 1:
            flags.update(BLOCK_R=1, BLOCK_C=min(splits, MERGE_BLOCK), num_warps=1)
            del flags["SPLIT"]
            ce_fwd_merge_kernel[(N * D,)](*args, loss, lse, aux, part, *sizes, ignore_index,
                                          *options, **flags)
    return (loss, lse, aux, *extra)


def ce_bwd(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index, label_smoothing,
           logit_scale, softcap, prob_target):
    return ce_bwd_stats(grad_loss, grad_lse, None, None, logits, target, weight, lse, aux, None,
                        ignore_index, label_smoothing, logit_scale, softcap, prob_target)


def ce_bwd_inplace(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index,
                   label_smoothing, logit_scale, softcap, prob_target):
    """ce_bwd's gradient written over the logits (nllfused::ce_bwd_inplace_triton, csrc/ops.cpp):
    the kernel stores into the logits themselves where they are contiguous (it reads every logit,
    the true class's first, before storing over it), else ce_bwd's result is copied over them:
    so float64, whose far rows are reread whole (_exact_lse) as a split row's programs store."""
    options = (ignore_index, label_smoothing, logit_scale, softcap, prob_target)
    if logits.is_contiguous() and not truncating_store(logits) and logits.dtype != torch.float64:
        ce_bwd_stats(grad_loss, grad_lse, None, None, logits, target, weight, lse, aux, None,
                     *options, out=logits)
    else:
        logits.copy_(ce_bwd(grad_loss, grad_lse, logits, target, weight, lse, aux, *options))


def ce_bwd_stats(grad_loss, grad_lse, grad_entropy, grad_target_logp, logits, target, weight,
                 lse, aux, entropy, ignore_index, label_smoothing, logit_scale, softcap,
                 prob_target, out=None):
    """ce_bwd plus the gradients of the entropy and target log-probability that ce_fwd_stats
    returned (either may be None) (nllfused::ce_bwd_stats_triton, csrc/ops.cpp). `out`: the
    contiguous buffer to store the gradient in, the logits themselves included."""
    N, C, D = logits.shape
    grad = out if out is not None else torch.empty(
        (N, C, D), dtype=torch.float32 if truncating_store(logits) else logits.dtype,
        device=logits.device)
    if N * D == 0:
        return grad.to(logits.dtype)
    stats = grad_entropy is not None or grad_target_logp is not None
    # with statistics' gradients the forward's tile (registers: launch_config)
    grid, weights, sizes, options, flags = _launch(logits, weight, label_smoothing, logit_scale,
                                                    softcap, prob_target, stats)
    gl = grad_loss if grad_lse is None else grad_lse   # never read without HAS_GRAD_LSE
    stat_args = (aux,) * 3                             # never read without HAS_STATS_GRAD
    if stats:
        zero = torch.zeros((N * D,), dtype=aux.dtype, device=aux.device)
        stat_args = tuple(zero if t is None else t.to(aux.dtype).contiguous().view(-1)
                          for t in (grad_entropy, grad_target_logp, entropy))
    with guard(logits):
        ce_bwd_kernel[grid](grad_loss, *grad_loss.stride(), gl, *gl.stride(),
                            logits, *logits.stride(), target, *target_strides(target, prob_target),
                            *weights, lse, aux, grad, *stat_args, *sizes, ignore_index, *options,
                            HAS_GRAD_LSE=grad_lse is not None, HAS_STATS_GRAD=stats,
                            ENTROPY_GRAD=grad_entropy is not None,
                            IN_PLACE=out is not None and out.data_ptr() == logits.data_ptr(),
                            **flags)
    return grad.to(logits.dtype)
