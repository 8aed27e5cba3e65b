"""What one pass over the logits can give besides the loss (docs/maths.md, "Statistics").

`nllfused.cross_entropy(..., return_stats=...)` returns `(loss, CrossEntropyStats)`. Each field
is computed only when asked for, reduced as the loss is, and None otherwise:

  lse             logsumexp of the row's z (after logit_scale and softcap); not differentiable
  z_loss          the z-loss term as it enters the loss, z_loss * lse^2; not differentiable
  predicted       the argmax class of z (the first of equal maxima, as torch.argmax), int64,
                  always one per row whatever the reduction
  correct         predicted == target: bool per row ('none'; False on ignored rows), the
                  accuracy over the counted rows ('mean'), their count ('sum'); index targets
  entropy         -sum_c p_c log p_c of the distribution the loss sees; differentiable
  target_logprob  log p_y, the target's log-probability (index targets); differentiable,
                  e.g. a policy-gradient loss with logit_scale = 1/T for a temperature T

Reductions follow the loss's: 'none' one value per row (0 on ignored rows for z_loss and
target_logprob), 'mean' the mean over the counted rows (target != ignore_index; every row for
probability targets), 'sum' their sum. lse and target_logprob come from the fused op's lse and
the target logits (O(rows) work; float64: a log_softmax) unless the kernels give them;
predicted and entropy come from the kernels where they compute them in their pass (the Triton,
CUDA and C++ CPU kernels; the C++ CPU ones do only the work of those asked for, the statistics
op's with_entropy / with_predicted: `kernel_flags`), else from `torch_ref.entropy_and_argmax`
(an extra pass over the logits). CPU calls the one-call path takes (nllfused/functional.py)
get all of it, reductions and autograd included, from one C++ op (csrc/loss_stats.cpp); `mask`
and `from_one_call` translate to and from it. There, where the lanes path runs (up to 256
classes; 384 for (N, C) rows, for a batch of N <= 8 rows below 16 (N + 1); 1024 where a tile's
class is one vector load: csrc/cpu/kernels.h), the kernel adds the rows up in its own pass ('sum'
and 'mean': sums in float64, rounded once, as the loss's).

Names users of other packages know: return_z_loss=True (Liger-Kernel) and return_lse=True
(quack, flash-attention) append the reduced z-loss term and the per-row lse to the returned
tuple, in that order: (loss, [z_loss], [lse]). On the one-call path the lse rows are the op's
lse output under the LSE_ROWS bit of its mask.
"""
from __future__ import annotations

import collections.abc
from typing import NamedTuple, Optional

import torch

from . import ops
from .backends import torch_ref
from .errors import ArgumentError, ArgumentTypeError

NAMES = ("lse", "z_loss", "predicted", "correct", "entropy", "target_logprob")
INDEX_ONLY = ("correct", "target_logprob")  # meaningless for probability targets


class CrossEntropyStats(NamedTuple):
    """The statistics of a cross-entropy call (module docstring); None where not asked for."""

    lse: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    predicted: Optional[torch.Tensor] = None
    correct: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    target_logprob: Optional[torch.Tensor] = None


def check_returns(return_stats, return_z_loss, return_lse) -> None:
    """return_stats or return_z_loss / return_lse, not both: the first returns (loss, stats),
    the others (loss, [z_loss], [lse]); the statistics hold both (stats.z_loss, stats.lse)."""
    if (return_stats is not None and return_stats is not False and return_stats != ()
            and (return_z_loss or return_lse)):
        raise ArgumentError("return_stats returns (loss, stats), whose z_loss and lse fields "
                            "hold what return_z_loss / return_lse append: pass one or the "
                            "other (e.g. return_stats=('z_loss', 'lse'))")


def requested(return_stats, prob_target: bool) -> frozenset:
    """The statistics asked for: True for all of them (those of index targets only with index
    targets), False/None for none, or a name or a sequence of names."""
    if return_stats is None or return_stats is False:
        return frozenset()
    if return_stats is True:
        return frozenset(n for n in NAMES if not (prob_target and n in INDEX_ONLY))
    names = (return_stats,) if isinstance(return_stats, str) else return_stats
    try:
        if isinstance(names, collections.abc.Mapping):
            raise TypeError  # (a dict's keys would be taken silently)
        names = frozenset(names)
    except TypeError:
        raise ArgumentTypeError(f"return_stats must be a bool, a statistic's name or a sequence "
                                f"of names; got {type(return_stats).__name__}") from None
    unknown = sorted(str(n) for n in names if n not in NAMES)
    if unknown:
        raise ArgumentError(f"return_stats: unknown statistic(s) {', '.join(unknown)}; the names "
                            f"are {', '.join(NAMES)}")
    if prob_target and names & set(INDEX_ONLY):
        raise ArgumentError(f"return_stats: {', '.join(sorted(names & set(INDEX_ONLY)))} need "
                            f"class-index targets; these are probability targets")
    return names


# cross_entropy_loss_stats's mask bit for its lse output per row whatever the reduction
# (return_lse's), in place of the reduced one (csrc/loss_stats.cpp, kLseRows).
LSE_ROWS = 1 << len(NAMES)


def mask(names) -> int:
    """The statistics `names` as nllfused::cross_entropy_loss_stats's `want`: bit i for
    NAMES[i] (csrc/loss_stats.cpp)."""
    return sum(1 << i for i, name in enumerate(NAMES) if name in names)


def from_one_call(names, values) -> CrossEntropyStats:
    """CrossEntropyStats from nllfused::cross_entropy_loss_stats's statistics (in NAMES
    order, reduced already): those in `names`, None for the others."""
    return CrossEntropyStats(*(v if n in names else None for n, v in zip(NAMES, values)))


KERNEL_STATS = frozenset({"predicted", "correct", "entropy", "target_logprob"})


def from_kernel(names, backend: str):
    """The forward with statistics (ops.stats_for_backend) if `names` needs what only a pass
    over the logits gives and the backend's kernels compute it in theirs; else None."""
    return ops.stats_for_backend(backend) if names & KERNEL_STATS else None


def kernel_flags(names) -> dict:
    """The statistics op's with_entropy / with_predicted for `names`: the kernels skip the
    entropy's sum and the argmax's scan where nothing asked for them (csrc/ops.cpp)."""
    return {"with_entropy": "entropy" in names,
            "with_predicted": bool({"predicted", "correct"} & names)}


def per_row(names, logits, target, lse, options, z_loss: float, entropy=None,
            target_logp=None, predicted=None):
    """The requested statistics per row (N, D), before reduction. logits (N, C, D) and target as
    the ops take them; lse (N, D) float64 from the op; entropy, target_logp and predicted where
    the kernel's pass gave them (ops.stats_for_backend), else computed here: target_logprob from
    lse and the target logits (O(rows); its gradient reaches the logits through the op's lse
    gradient; float64: torch_ref.target_logprob's log_softmax), entropy and predicted from the
    materialised logits (torch_ref)."""
    acc = torch_ref.acc_dtype(logits.dtype)
    rows = {}
    if "lse" in names:
        rows["lse"] = lse.detach().to(acc)
    if "z_loss" in names:
        rows["z_loss"] = (z_loss * lse.detach() * lse.detach()).to(acc)
    need_entropy = "entropy" in names and entropy is None
    if need_entropy or ({"predicted", "correct"} & names and predicted is None):
        e, p = torch_ref.entropy_and_argmax(logits, options, need_entropy)
        entropy, predicted = (e if need_entropy else entropy), (p if predicted is None
                                                                 else predicted)
    if "entropy" in names:
        rows["entropy"] = entropy
    if "predicted" in names:
        rows["predicted"] = predicted
    if options.prob_target:
        return rows
    if "correct" in names:
        counted = torch_ref.not_ignored(target, options.ignore_index)
        rows["correct"] = counted & (predicted == target)
    if "target_logprob" in names:
        rows["target_logprob"] = target_logp if target_logp is not None else \
            torch_ref.target_logprob(logits, target, lse, options)
    return rows


def reduce(rows: dict, target, options, reduction: str, out_shape) -> CrossEntropyStats:
    """Per-row statistics reduced as the loss is (module docstring); per-row ones in out_shape.
    A handful of small ops after the kernel: the rows that count and their number are formed
    once, and each value a reduction sums is masked by one `where` against a scalar 0."""
    counted = None if options.prob_target else \
        torch_ref.not_ignored(target, options.ignore_index)
    out, count = {}, None
    for name, value in rows.items():
        if name == "predicted" or (reduction == "none" and name in ("lse", "entropy")):
            out[name] = value.reshape(out_shape)  # a property of the logits: every row its own
            continue
        if counted is not None and name != "correct":
            value = torch.where(counted, value, 0)
        if reduction == "none":
            out[name] = value.reshape(out_shape)
        elif reduction == "sum":
            out[name] = value.sum()
        else:
            if count is None:
                count = value.numel() if counted is None else counted.sum()
            out[name] = (value.sum(dtype=torch.float32 if name == "correct" else None) / count)
    return CrossEntropyStats(**out)
