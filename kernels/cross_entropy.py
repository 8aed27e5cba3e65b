"""Triton kernels for fused cross-entropy (installed as nllfused.kernels.cross_entropy).

Two kernels, one per job, following the contract of csrc/ops.cpp and the maths of GUIDE §1:
  ce_fwd_kernel  reads each row of logits once (online softmax) and writes per-row loss, lse, aux;
  ce_bwd_kernel  reads each row once more and writes its gradient, recomputing p from the lse.

A program handles a tile of BLOCK_R rows x BLOCK_C classes and loops over the classes, so one
kernel serves the LM case (few long rows: BLOCK_R = 1) and the classification / segmentation case
(many short rows, rows adjacent in memory when D > 1: BLOCK_R > 1). Rows are r = n * D + d of the
(N, C, D) view; all offsets are int64. Optional features are constexpr flags, so a plain
cross-entropy compiles none of their code.
"""
import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # tanh from exp: runs on every target and in the interpreter; saturates cleanly to +-1.
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _log1p(x):
    # log(1 + x) keeping the digits of a tiny x that 1 + x rounds away (u - 1 is exact: the
    # quotient corrects log(u) for that rounding).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _load_logits(ptrs, mask, logit_scale, softcap, ACC: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * x) in the accumulation dtype; masked lanes are -inf."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(ACC)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))  # softcap maps -inf to -softcap
    return z


@triton.jit
def ce_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets (N, D) indices or (N, C, D) probabilities
    W, WSUM,                                     # class weights (C,), their sum (1,)
    LOSS, LSE, AUX,                              # per-row outputs, contiguous (N * D,)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    # Float arguments arrive as float32: each option comes as hi + lo so float64 keeps it whole.
    zero = tl.zeros([], ACC)
    label_smoothing = (zero + smoothing_hi) + smoothing_lo
    z_loss = (zero + z_loss_hi) + z_loss_lo
    logit_scale = (zero + scale_hi) + scale_lo
    softcap = (zero + softcap_hi) + softcap_lo
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    n = rows // D
    d = rows % D
    x_rows = X + (n * stride_xn + d * stride_xd)[:, None]
    t_rows = T + (n * stride_tn + d * stride_td)

    # Reference r = z at class 0: the class sums below accumulate z - r, so a large common offset
    # in the logits (1e4 + noise) cancels exactly instead of swamping the float32 sums.
    r = _load_logits(X + n * stride_xn + d * stride_xd, row_ok, logit_scale, softcap, ACC,
                     HAS_SCALE, HAS_SOFTCAP)
    r = tl.where(tl.abs(r) < float("inf"), r, 0.0)

    # sum_c exp(z_c - m) = k + s: k counts the classes at the running max m (their terms are
    # exactly 1), s sums the others. Kept apart, a confident row's tiny terms are not rounded
    # away against the 1 (its loss is log(1 + s), which _log1p keeps to float32 precision).
    m = tl.full([BLOCK_R], float("-inf"), ACC)   # running max
    k = tl.zeros([BLOCK_R], ACC)
    s = tl.zeros([BLOCK_R], ACC)
    acc_wz = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # sum of w (z - r), or of w q' (z - r)
    acc_wq = tl.zeros([BLOCK_R, BLOCK_C], ACC)   # sum of w q' (probability targets)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = _load_logits(x_rows + cols[None, :].to(tl.int64) * stride_xc, mask, logit_scale,
                         softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, 1))
        # While a row has seen only -inf, exp against 0 instead: exp(-inf - -inf) would be NaN.
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        grew = m_new > m                         # the old max's terms become ordinary ones
        s = tl.where(grew, (s + k) * tl.exp(m - ref), s)
        k = tl.where(grew, 0.0, k)
        # A +inf max is not counted: its exp(inf - inf) must make the row NaN, as in torch.
        at_max = (z == ref[:, None]) & (ref < float("inf"))[:, None]
        k += tl.sum(at_max.to(ACC), 1)
        s += tl.sum(tl.where(at_max, 0.0, tl.exp(z - ref[:, None])), 1)
        m = m_new
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if PROB_TARGET:
            q = tl.load(t_rows[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask,
                        other=0.0).to(ACC)
            if HAS_SMOOTHING:
                q = tl.where(mask, (1.0 - label_smoothing) * q + label_smoothing / C, 0.0)
            if HAS_WEIGHT:
                q = q * w
            acc_wq += q
            # A class with no target mass adds nothing, even when masked at -inf (no 0 * inf).
            acc_wz += tl.where(q != 0.0, q * (z - r[:, None]), 0.0)
        elif HAS_SMOOTHING:
            if HAS_WEIGHT:
                acc_wz += tl.where(mask, w * (z - r[:, None]), 0.0)
            else:
                acc_wz += tl.where(mask, z - r[:, None], 0.0)

    log_s = tl.where(k == 1.0, _log1p(s), tl.log(k + s))   # log sum_c exp(z_c - m)
    lse_r = (m - r) + log_s                      # lse - r, never through a rounded lse
    lse = lse_r + r
    if PROB_TARGET:
        sum_wq = tl.sum(acc_wq, 1)
        loss = sum_wq * lse_r - tl.sum(acc_wz, 1)
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        aux = sum_wq
    else:
        y = tl.load(t_rows, mask=row_ok, other=0).to(tl.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y_safe = tl.where(in_range, y, 0)        # never read outside the row
        z_y = _load_logits(X + n * stride_xn + d * stride_xd + y_safe * stride_xc, row_ok,
                           logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_y = tl.load(W + y_safe, mask=row_ok, other=0.0).to(ACC)
        else:
            w_y = tl.full([BLOCK_R], 1.0, ACC)
        loss = w_y * ((m - z_y) + log_s)
        if HAS_SMOOTHING:
            w_sum = tl.load(WSUM).to(ACC)
            smooth = w_sum * lse_r - tl.sum(acc_wz, 1)   # sum_c w_c (lse - z_c)
            loss = (1.0 - label_smoothing) * loss + (label_smoothing / C) * smooth
        if HAS_Z_LOSS:
            loss += z_loss * lse * lse
        # Out-of-range targets poison their row with NaN, the documented GPU behaviour.
        loss = tl.where(counted, tl.where(in_range, loss, float("nan")), 0.0)
        aux = tl.where(counted, tl.where(in_range, w_y, float("nan")), 0.0)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(AUX + rows, aux, mask=row_ok)
    s64 = s.to(tl.float64)
    log_s64 = tl.where(k == 1.0, _log1p(s64), tl.log(k.to(tl.float64) + s64))
    tl.store(LSE + rows, m.to(tl.float64) + log_s64, mask=row_ok)


@triton.jit
def ce_bwd_kernel(
    G, stride_gn, stride_gd,                     # upstream gradient per row (N, D)
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets
    W, WSUM, LSE, AUX,
    GX,                                          # gradient, contiguous (N, C, D)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    # Float arguments arrive as float32: each option comes as hi + lo so float64 keeps it whole.
    zero = tl.zeros([], ACC)
    label_smoothing = (zero + smoothing_hi) + smoothing_lo
    z_loss = (zero + z_loss_hi) + z_loss_lo
    logit_scale = (zero + scale_hi) + scale_lo
    softcap = (zero + softcap_hi) + softcap_lo
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < R
    n = rows // D
    d = rows % D
    x_rows = X + (n * stride_xn + d * stride_xd)[:, None]
    t_rows = T + (n * stride_tn + d * stride_td)
    gx_rows = GX + (n * C * D + d)[:, None]

    g = tl.load(G + n * stride_gn + d * stride_gd, mask=row_ok, other=0.0).to(ACC)
    # p = exp(z - lse) with lse split into hi + lo, so that float32 keeps torch's accuracy.
    lse64 = tl.load(LSE + rows, mask=row_ok, other=0.0)
    hi = lse64.to(ACC)
    lo = (lse64 - hi.to(tl.float64)).to(ACC)
    if PROB_TARGET:
        coef = tl.load(AUX + rows, mask=row_ok, other=0.0).to(ACC)   # sum_k w_k q'_k
    else:
        y = tl.load(t_rows, mask=row_ok, other=0).to(tl.int64)
        counted = y != ignore_index
        in_range = (y >= 0) & (y < C)
        y_safe = tl.where(in_range, y, 0)
        if HAS_WEIGHT:
            w_y = tl.load(W + y_safe, mask=row_ok, other=0.0).to(ACC)
        else:
            w_y = tl.full([BLOCK_R], 1.0, ACC)
        coef = (1.0 - label_smoothing) * w_y
        if HAS_SMOOTHING:
            coef += (label_smoothing / C) * tl.load(WSUM).to(ACC)
        g = tl.where(counted, tl.where(in_range, g, float("nan")), 0.0)
    if HAS_Z_LOSS:
        coef += 2.0 * z_loss * (hi + lo)

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xc, mask=mask,
                    other=0.0).to(ACC)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        p = tl.exp((z - hi[:, None]) - lo[:, None])
        grad = p * coef[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
        if PROB_TARGET:
            q = tl.load(t_rows[:, None] + cols[None, :].to(tl.int64) * stride_tc, mask=mask,
                        other=0.0).to(ACC)
            if HAS_SMOOTHING:
                q = (1.0 - label_smoothing) * q + label_smoothing / C
            if HAS_WEIGHT:
                q = q * w
            grad -= q
        else:
            # The true-class term p_y - 1 is formed here in ACC, then rounded once on store.
            grad -= tl.where(cols[None, :] == y[:, None], ((1.0 - label_smoothing) * w_y)[:, None],
                             0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    grad -= (label_smoothing / C) * w
                else:
                    grad -= label_smoothing / C
        grad = grad * g[:, None]
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        if HAS_SCALE:
            grad = grad * logit_scale
        if not PROB_TARGET:
            grad = tl.where(counted[:, None], grad, 0.0)   # ignored rows: exactly 0
        tl.store(gx_rows + cols[None, :].to(tl.int64) * D, grad.to(GX.dtype.element_ty),
                 mask=mask)


def launch_config(num_rows: int, num_classes: int, elem_size: int):
    """(BLOCK_R, BLOCK_C, num_warps) for a problem: the one place launch shapes are chosen.

    Long rows (LM vocabularies) loop over the classes in blocks of up to 16 KiB of logits with a
    program per row; short rows (classification, segmentation) pack several rows per program so
    each program still moves a few KiB per step.
    """
    max_block = 16384 // elem_size
    block_c = min(triton.next_power_of_2(num_classes), max_block)
    tile = 4096  # elements per loop step per program
    block_r = 1 if block_c >= tile else min(tile // block_c,
                                            triton.next_power_of_2(max(num_rows, 1)))
    num_warps = 4 if block_r * block_c <= 1024 else (8 if block_r * block_c <= 4096 else 16)
    return block_r, block_c, num_warps
