"""The statistics of ce_fwd_kernel's STATS launches (installed as nllfused.kernels.row_stats):
per-lane state folded into each row's entropy sum and argmax, and the per-row outputs of
nllfused::ce_fwd_stats_triton (csrc/ops.cpp; the maths: docs/maths.md, "Statistics").

Each statistic is its own constexpr flag of the kernel, ENTROPY and ARGMAX, so that a launch
carries only the state and the work of the ones asked for (with_entropy / with_predicted); the
target's log-probability, O(1) a row, comes with every STATS launch.
"""
import triton
import triton.language as tl

from .row_math import _load_logits, _log1p


@triton.jit
def _lane_entropy(m, k, s, ent):
    """The row's entropy sum from per-lane (m, k, s, ent), m -inf for lanes without a finite
    logit (as _merge takes them): each lane's ent moved to the row's max as _fwd_step moves it."""
    m_row = tl.max(m, 1)
    ref = tl.where(m_row == float("-inf"), 0.0, m_row)[:, None]
    f = tl.exp(m - ref)
    return tl.sum(tl.where(f == 0.0, 0.0, f * (ent + (m - ref) * (k + s))), 1)


@triton.jit
def _lane_argmax(m, arg, first_nan):
    """The row's argmax from per-lane (m, arg): the first column at the row's max, or the first
    NaN's column (_first_nan) if it has one, as torch.argmax."""
    m_row = tl.max(m, 1)
    big = 2147483647
    first = tl.min(tl.where(m == m_row[:, None], arg, big), 1)
    return tl.where(first_nan < big, first_nan, tl.where(first == big, 0, first))


@triton.jit
def _first_nan(x_row, nan_rows, lo, hi, C, stride_xc, logit_scale, softcap,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
               HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """The first column of columns [lo, hi) whose z is NaN, in the rows of nan_rows (2^31 - 1
    elsewhere, and where there is none): those rows read once more, so that the class loop's
    argmax costs one select a logit instead of a NaN test too. A tile without such rows (nearly
    every one) reads nothing."""
    big = 2147483647
    first = tl.full([BLOCK_R], big, tl.int32)
    stop = tl.where(tl.max(nan_rows.to(tl.int32), 0) > 0, hi, lo)
    for start in range(lo, stop, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = nan_rows[:, None] & (cols < C)[None, :]
        z = _load_logits(x_row[:, None] + cols[None, :].to(tl.int64) * stride_xc, mask,
                         logit_scale, softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
        first = tl.minimum(first, tl.min(tl.where(z != z, cols[None, :], big), 1))
    return first


@triton.jit
def _finish_stats(m, k, s, ent, pred, rows, row_ok, x_row, stride_xc, t_row, ENT, PRED, TLP, C,
                  ignore_index, logit_scale, softcap, ACC: tl.constexpr,
                  PROB_TARGET: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  ENTROPY: tl.constexpr, ARGMAX: tl.constexpr):
    """Stores entropy = log d - ent / d (d = k + s), the argmax (each 0 where its flag is off)
    and, for index targets, the target's log-probability z_y - lse = -((m - z_y) + log d)
    (0 ignored, NaN out of range)."""
    log_d = tl.where(k == 1.0, _log1p(s), tl.log(k + s))
    if ENTROPY:
        tl.store(ENT + rows, log_d - ent / (k + s), mask=row_ok)
    else:
        tl.store(ENT + rows, tl.zeros_like(m), mask=row_ok)
    if ARGMAX:
        tl.store(PRED + rows, pred.to(tl.int64), mask=row_ok)
    else:
        tl.store(PRED + rows, tl.zeros_like(m).to(tl.int64), mask=row_ok)
    if not PROB_TARGET:
        y = tl.load(t_row, mask=row_ok, other=0).to(tl.int64)
        in_range = (y >= 0) & (y < C)
        z_y = _load_logits(x_row + tl.where(in_range, y, 0) * stride_xc, row_ok, logit_scale,
                           softcap, ACC, HAS_SCALE, HAS_SOFTCAP)
        tlp = tl.where(in_range, -((m - z_y) + log_d), float("nan"))
        tl.store(TLP + rows, tl.where(y != ignore_index, tlp, 0.0), mask=row_ok)
