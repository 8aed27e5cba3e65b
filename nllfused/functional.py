"""nllfused.cross_entropy: torch.nn.functional.cross_entropy's signature and results, fused.

The data path: argument checks (_checks) -> backend choice (backends) -> per-row op
(ops: ce_fwd*, whose autograd runs ce_bwd*) -> the reduction, a few O(rows) torch ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends, ops
from .backends import torch_ref

_CHECK_TARGETS_ON_GPU = False


def set_target_check(enabled: bool) -> None:
    """Opt in (or out) of checking class indices of GPU tensors on the host before each call.

    Out-of-range targets always raise IndexError for CPU tensors. On the GPU the kernels never
    read out of bounds and turn the offending rows into NaN losses (so the loss is visibly
    non-finite); with this check on, an IndexError is raised instead, at the price of one host
    synchronisation per call.
    """
    global _CHECK_TARGETS_ON_GPU
    _CHECK_TARGETS_ON_GPU = bool(enabled)


def per_row_loss(canonical: _checks.Canonical, ignore_index: int, label_smoothing: float,
                 z_loss: float, logit_scale: float, softcap: Optional[float], backend: str):
    """(loss, lse, aux) per row of a canonical call, from the chosen backend (csrc/ops.cpp)."""
    c = canonical
    args = (c.logits, c.target, c.weight, ignore_index, float(label_smoothing), float(z_loss),
            float(logit_scale), float(softcap or 0.0), c.prob_target)
    if backend == "torch":
        return torch_ref.forward(*args)
    return ops.forward_op(backend)(*args)


def reduce_rows(canonical: _checks.Canonical, loss, aux, reduction: str) -> torch.Tensor:
    """Apply torch's reduction to per-row losses: 'mean' divides by the summed target weights
    of the counted rows (index targets) or by the number of rows (probability targets)."""
    if reduction == "none":
        out = loss.reshape(canonical.out_shape)
    elif reduction == "sum":
        out = loss.sum()
    elif canonical.prob_target:
        out = loss.sum() / loss.numel()
    else:
        out = loss.sum() / aux.sum()
    return out.to(canonical.out_dtype)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  logit_scale: float = 1.0, softcap: Optional[float] = None,
                  backend: str = "auto") -> torch.Tensor:
    """Cross-entropy between logits and class-index or class-probability targets.

    Same arguments, results, shapes and dtypes as torch.nn.functional.cross_entropy, plus:
      z_loss       adds z_loss * lse^2 to each counted row's loss (PaLM's auxiliary loss);
      logit_scale  multiplies the logits first;
      softcap      if given, s * tanh(x / s) is applied after logit_scale (Gemma 2);
      backend      "auto", "torch", "triton", "cpu" or "cuda" (see nllfused.backends).
    """
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    _checks.check_options(label_smoothing, z_loss, logit_scale, softcap)
    canonical = _checks.canonicalize(input, target, weight, ignore_index)
    backend = backends.resolve(backend, input.device)
    if not canonical.prob_target and not torch.compiler.is_compiling() and (
            input.device.type == "cpu" or _CHECK_TARGETS_ON_GPU):
        _checks.check_target_range(target, canonical.num_classes, ignore_index)
    if torch.is_autocast_enabled(input.device.type) and canonical.out_dtype in (
            torch.float16, torch.bfloat16):
        # Autocast runs torch's cross_entropy in float32 and returns float32. The kernels
        # already accumulate in float32 from the low-precision logits, so only the result's
        # dtype changes: no float32 copy of the logits is made.
        canonical.out_dtype = torch.float32
    loss, _lse, aux = per_row_loss(canonical, ignore_index, label_smoothing, z_loss, logit_scale,
                                   softcap, backend)
    return reduce_rows(canonical, loss, aux, reduction)
