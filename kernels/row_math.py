"""Elementwise and per-row helpers of the cross-entropy Triton kernels (installed as
nllfused.kernels.row_math): the loops' exp, an accurate tanh and log1p for softcap and lse, loads
of logits (with logit_scale and softcap applied) and of per-class values, the option arguments,
and which rows and classes a program owns. kernels/cross_entropy.py holds the kernels.
"""
import triton
import triton.language as tl

from .launch import INTERPRETER

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
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
        # expm1 is -2a (u == 1), or -1 to the last bit (u below the normal range, a > 354: tanh
        # is 1 from a = 19.1; a subnormal u's few bits would carry into the quotient, 7e-4 off
        # at a = 372): no quotient needed
        u = tl.exp(-2.0 * a)
        tiny = u < 2.2250738585072014e-308
        plain = (u == 1.0) | tiny
        quotient = (u - 1.0) * (-2.0 * a) / tl.log(tl.where(plain, 0.5, u))
        e = tl.where(u == 1.0, -2.0 * a, tl.where(tiny, -1.0, quotient))
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
    # A NaN stays NaN (tl.minimum above would turn it into tanh(10)), as torch's tanh.
    return tl.where(v < 0, -t, tl.where(v == v, t, v))


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
    if HAS_SCALE or HAS_SOFTCAP:
        if mask is not None:
            # the masked lanes -inf again: softcap maps -inf to -softcap, a scale <= 0 to
            # +inf or NaN
            z = tl.where(mask, z, float("-inf"))
    return z


@triton.jit
def _class_terms(z, ref, w_ptrs, q_ptrs, col_ok, mask, C, label_smoothing, ACC: tl.constexpr,
                 PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_SMOOTHING: tl.constexpr, MASKED: tl.constexpr):
    """A block's terms of the forward's class sums against a row reference ref ([BLOCK_R]):
    probability targets w q' (z - ref) and w q' (q' smoothed); index targets with smoothing
    w (z - ref) (the second term unused). Masked lanes add 0; so does a class without target
    mass, even masked at -inf (no 0 * inf)."""
    if HAS_WEIGHT:
        w = _load_classes(w_ptrs, col_ok, MASKED, ACC)[None, :]
    if PROB_TARGET:
        q = _load_classes(q_ptrs, mask, MASKED, ACC)
        if HAS_SMOOTHING:
            q = (1.0 - label_smoothing) * q + label_smoothing / C
            if MASKED:
                q = tl.where(mask, q, 0.0)
        if HAS_WEIGHT:
            q = q * w
        return tl.where(q != 0.0, q * (z - ref[:, None]), 0.0), q
    else:
        wz = z - ref[:, None]
        if HAS_WEIGHT:
            wz = w * wz
        if MASKED:
            wz = tl.where(mask, wz, 0.0)
        return wz, wz


@triton.jit
def _sums_against_max(x_row, t_row, W, row_ok, m, s, log_s, lse_r, sum_wz, C, stride_xc,
                      stride_tc, label_smoothing, logit_scale, softcap, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr, ACC: tl.constexpr, PROB_TARGET: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(sum_wz, lse - r) of rows finished against the reference r (the first logit), but for
    the rows whose logits span more than the float range -- z - r overflowed, a sum or lse - r
    is not finite, and the row holds no NaN or +inf (m finite, s no NaN) -- whose class sum of
    _class_terms is read once more against the row's max m (with lse - m = log s): there every
    z - m is <= 0 and finite but for -inf logits (docs/maths.md, "Class sums"). A tile without
    such rows (nearly every one) reads nothing."""
    sums_ok = (tl.abs(sum_wz) < float("inf")) & (tl.abs(lse_r) < float("inf"))
    far = row_ok & (tl.abs(m) < float("inf")) & (s == s) & ~sums_ok
    acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    ref = tl.where(far, m, 0.0)
    stop = tl.where(tl.max(far.to(tl.int32), 0) > 0, C, 0)
    for start in range(0, stop, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        mask = far[:, None] & col_ok[None, :]
        z = _load_logits(x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask,
                         logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
        wz, wq = _class_terms(z, ref, W + cols, t_row[:, None] + cols[None, :].to(tl.int64) *
                              stride_tc, col_ok, mask, C, label_smoothing, ACC, PROB_TARGET,
                              HAS_WEIGHT, HAS_SMOOTHING, True)
        acc += wz
    return tl.where(far, tl.sum(acc, 1), sum_wz), tl.where(far, log_s, lse_r)


@triton.jit
def _exact_lse(x_row, keep, lse64, hi, lo, C, stride_xc, logit_scale, softcap,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The backward's p = 2^((z - hi) log2e - lo) exact for float64 rows far from zero: there
    the saved lse's own rounding, up to ulp(lse) / 2 (4e-9 at |lse| ~ 3e7), would enter every p,
    where torch's log p = (z - m) - log s is exact in z - m. Rows with |lse| >= 1024 read their
    logits once more for m and s: hi = m, lo = log(s) log2e. Other rows, and float32, keep the
    split of the saved float64 lse: float32's p is as fine as that lse, to float's precision up to
    |lse| ~ 2^26 (beyond, a known limit: docs/maths.md, "Precision of lse")."""
    if ACC == tl.float64:
        need = keep & (tl.abs(lse64) >= 1024.0) & (lse64 - lse64 == 0.0)
        if tl.max(need.to(tl.int32), 0) != 0:   # a rare row: most tiles skip both passes
            # per-lane max and sum, reduced after each loop
            m_lane = tl.full([BLOCK_R, BLOCK_C], float("-inf"), ACC)
            for start in range(0, C, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                z = _load_logits(x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc,
                                 need[:, None] & (cols < C)[None, :], logit_scale, softcap, ACC,
                                 HAS_SCALE, HAS_SOFTCAP)
                m_lane = tl.maximum(m_lane, z)
            m = tl.where(need, tl.max(m_lane, 1), 0.0)
            s_lane = tl.zeros([BLOCK_R, BLOCK_C], ACC)
            for start in range(0, C, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                z = _load_logits(x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc,
                                 need[:, None] & (cols < C)[None, :], logit_scale, softcap, ACC,
                                 HAS_SCALE, HAS_SOFTCAP)
                s_lane += tl.exp(z - m[:, None])
            s = tl.sum(s_lane, 1)
            hi = tl.where(need, m, hi)
            lo = tl.where(need, tl.log(s) * _LOG2E, lo)
    return hi, lo


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
