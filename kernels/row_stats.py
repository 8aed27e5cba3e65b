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
def _lane_argmax(m, arg):
    """The row's argmax from per-lane (m, arg): the first column at the row's max, or the first
    NaN's column if any (arg = -1 - col marks a lane's NaN), as torch.argmax."""
    m_row = tl.max(m, 1)
    big = 2147483647
    first = tl.min(tl.where((m == m_row[:, None]) & (arg >= 0), arg, big), 1)
    first_nan = tl.min(tl.where(arg < 0, -1 - arg, big), 1)
    return tl.where(first_nan < big, first_nan, tl.where(first == big, 0, first))


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
