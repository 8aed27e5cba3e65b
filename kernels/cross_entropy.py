"""Triton kernels for fused cross-entropy, their launch configuration and their launchers
(installed as nllfused.kernels.cross_entropy).

The contract is csrc/ops.cpp's (nllfused::ce_fwd_triton / ce_bwd_triton), the maths docs/maths.md:
  ce_fwd_kernel  reads each row of logits once (online softmax) and writes per-row loss, lse, aux;
  ce_bwd_kernel  reads each row once more and writes its gradient, recomputing p from the lse.
launch_config picks the tile shape; ce_fwd / ce_bwd at the end allocate the outputs and launch.

A program handles a tile of BLOCK_R rows x BLOCK_C classes and loops over the classes, so one
kernel serves the LM case (few long rows: BLOCK_R = 1) and the classification / segmentation case
(many short rows, rows adjacent in memory when D > 1: BLOCK_R > 1). Rows are r = n * D + d of the
(N, C, D) view; all offsets are int64. Optional features are constexpr flags, so a plain
cross-entropy compiles none of their code.

Online-softmax state, named as in the C++ and CUDA kernels: m the running max, k the number of
classes exactly at m (their exp terms are exactly 1), s the sum of exp(z - m) over the others;
lse = m + log(k + s), log1p(s) when k == 1.
"""
import torch
import triton
import triton.language as tl

from .launch import INTERPRETER, acc_dtype, guard, hi_lo, truncating_store  # noqa: F401


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
def _load_logits(ptrs, mask, logit_scale, softcap, ACC: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * x) in the accumulation dtype; masked lanes are -inf."""
    z = tl.load(ptrs, mask=mask, other=float("-inf")).to(ACC)
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap, ACC)
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
    """This program's rows r = n * D + d, whether each exists, and their (n, d)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    return rows, rows < R, rows // D, rows % D


@triton.jit
def ce_fwd_kernel(
    X, stride_xn, stride_xc, stride_xd,          # logits (N, C, D)
    T, stride_tn, stride_tc, stride_td,          # targets (N, D) indices or (N, C, D) probabilities
    W, WSUM,                                     # class weights (C,), their sum (1,)
    LOSS, LSE, AUX,                              # per-row outputs, contiguous (N * D,)
    R, C, D, ignore_index,
    smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_rows = X + (n * stride_xn + d * stride_xd)[:, None]
    t_rows = T + (n * stride_tn + d * stride_td)

    # Reference r = z at class 0: the class sums below accumulate z - r, so a large common offset
    # in the logits (1e4 + noise) cancels exactly instead of swamping the float32 sums.
    r = _load_logits(X + n * stride_xn + d * stride_xd, row_ok, logit_scale, softcap, ACC,
                     HAS_SCALE, HAS_SOFTCAP)
    r = tl.where(tl.abs(r) < float("inf"), r, 0.0)

    # sum_c exp(z_c - m) = k + s, kept apart so that a confident row's tiny terms are not rounded
    # away against the 1 (its loss is log(1 + s), which _log1p keeps to float32 precision).
    m = tl.full([BLOCK_R], float("-inf"), ACC)
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
    if PROB_TARGET:
        sum_wq = tl.sum(acc_wq, 1)
        loss = sum_wq * lse_r - tl.sum(acc_wz, 1)
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
):
    label_smoothing, logit_scale, softcap = _options(
        smoothing_hi, smoothing_lo, scale_hi, scale_lo, softcap_hi, softcap_lo, ACC)
    rows, row_ok, n, d = _tile_rows(R, D, BLOCK_R)
    x_rows = X + (n * stride_xn + d * stride_xd)[:, None]
    t_rows = T + (n * stride_tn + d * stride_td)
    gx_rows = GX + (n * C * D + d)[:, None]

    g = tl.load(G + n * stride_gn + d * stride_gd, mask=row_ok, other=0.0).to(ACC)
    if HAS_GRAD_LSE:
        g_lse = tl.load(GL + n * stride_gln + d * stride_gld, mask=row_ok, other=0.0).to(ACC)
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

    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(x_rows + cols[None, :].to(tl.int64) * stride_xc, mask=mask,
                    other=0.0).to(ACC)
        if HAS_SCALE:
            z = z * logit_scale
        if HAS_SOFTCAP:
            t = _tanh(z / softcap, ACC)
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
        if not PROB_TARGET:
            grad = tl.where(counted[:, None], grad, 0.0)   # ignored rows: exactly 0
        if HAS_GRAD_LSE:
            # d lse / d z_c = p_c; rows without an lse gradient get none (no 0 * NaN).
            grad = tl.where((g_lse != 0.0)[:, None], grad + g_lse[:, None] * p, grad)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        if HAS_SCALE:
            grad = grad * logit_scale
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


# ------------------------------------------------------------------------------------------------
# Launchers: the CPU and CUDA kernels of nllfused::ce_fwd_triton / ce_bwd_triton (nllfused/ops.py
# registers them). Arguments as in csrc/ops.cpp.
# ------------------------------------------------------------------------------------------------

def _launch(logits, weight, label_smoothing, logit_scale, softcap, prob_target):
    """(grid, per-call kernel arguments, constexpr flags) shared by both kernels."""
    N, C, D = logits.shape
    R = N * D
    block_r, block_c, num_warps = launch_config(R, C, logits.element_size())
    if weight is None:
        # W is never read without HAS_WEIGHT; WSUM = C.
        W = WSUM = torch.full((1,), float(C), dtype=torch.float64, device=logits.device)
    else:
        W, WSUM = weight, weight.sum(dtype=torch.float64).reshape(1)  # on the device: no sync
    flags = dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc_dtype(logits.dtype),
                 PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
                 HAS_SMOOTHING=label_smoothing > 0, HAS_SCALE=logit_scale != 1.0,
                 HAS_SOFTCAP=softcap > 0, num_warps=num_warps)
    options = hi_lo(label_smoothing, logit_scale, softcap)
    return (triton.cdiv(R, block_r),), (W, WSUM), (R, C, D), options, flags


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
    with guard(logits):
        ce_fwd_kernel[grid](logits, *logits.stride(), target, *_target_strides(target, prob_target),
                            *weights, loss, lse, aux, *sizes, ignore_index, *options, **flags)
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
