"""K-dimensional fused linear cross-entropy: a linear_weight of shape (C, d1, ..., dK, H), as
torch.nn.functional.linear_cross_entropy (and nn.LinearCrossEntropyLoss's out_features) take it.

The logits z[n, c, d] = x_n . W[c, d] + b[c, d] are D = d1 * ... * dK independent linear
cross-entropies over the same (N, H) input, one per position d with its own (C, H) weight slice
W[:, d] and bias b[:, d]. Each runs through the fused 2-D path (nllfused/linear.py: never more
than a chunk of one position's logits in memory) with reduction 'none'; its per-row losses are
reduced here as torch reduces the K-dimensional loss: 'sum' over every (n, d), 'mean' divided by
the class weights of the counted (n, d) (their number without weights). A z-loss under 'mean' is
averaged over the counted rows whatever the weights (docs/maths.md): the weights passed to the
2-D path are then scaled by (counted rows) / (their weight sum), so that one division by the
counted rows gives both parts their denominator. 16-bit inputs run each position in float32
(the input's gradient is a sum over the positions: rounded once, as torch's). Probability
targets (N, C, d1, ..., dK) take the logits whole, as the 2-D path and torch do for them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import functional, stats
from .backends import torch_ref
from .errors import ArgumentError, ArgumentTypeError
from .linear_checks import autocast_args, check_arguments


def _shapes(input, linear_weight, target, linear_bias):
    """(N, C, out_features, H) of a K-dimensional call; raises as torch would, more plainly."""
    for name, t in (("input", input), ("target", target)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a Tensor; got {type(t).__name__}")
    C, out, H = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    if input.dim() != 2:
        raise ArgumentError(
            f"a K-dimensional loss (linear_weight of shape {tuple(linear_weight.shape)}, i.e. "
            f"(num_classes, *out_features, in_features)) needs a batched input of shape (N, "
            f"{H}); got {tuple(input.shape)}")
    if input.shape[1] != H:
        raise ArgumentError(
            f"input's last dimension ({input.shape[1]}) must equal linear_weight's in_features "
            f"({H}): input {tuple(input.shape)}, linear_weight {tuple(linear_weight.shape)}")
    if linear_bias is not None and (not isinstance(linear_bias, Tensor) or
                                    tuple(linear_bias.shape) != (C, *out)):
        raise ArgumentError(f"linear_bias must have shape {(C, *out)} (num_classes, "
                            f"*out_features); got {tuple(getattr(linear_bias, 'shape', ()))}")
    N = input.shape[0]
    expected = (N, C, *out) if target.is_floating_point() else (N, *out)
    if tuple(target.shape) != expected:
        kind = "probability" if target.is_floating_point() else "class-index"
        raise ArgumentError(f"{kind} targets of a K-dimensional loss must have shape {expected}; "
                            f"got {tuple(target.shape)}")
    return N, C, out, H


def linear_cross_entropy_kdim(fused, input, linear_weight, target, linear_bias, weight,
                              ignore_index: int, reduction: str, label_smoothing: float, *,
                              z_loss: float, logit_scale: float, softcap: Optional[float],
                              return_stats, return_z_loss: bool, return_lse: bool, **chunking):
    """nllfused.linear_cross_entropy for linear_weight.dim() > 2 (module docstring). `fused` is
    the 2-D function; `chunking` its options, chunk_size and backend, passed through."""
    N, C, out, H = _shapes(input, linear_weight, target, linear_bias)
    options = dict(logit_scale=logit_scale, softcap=softcap, backend=chunking["backend"])
    if target.is_floating_point():
        logits = torch.nn.functional.linear(input, linear_weight.reshape(-1, H),
                                            None if linear_bias is None else
                                            linear_bias.reshape(-1)).reshape(N, C, *out)
        return functional.cross_entropy(
            logits, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, return_stats=return_stats,
            return_z_loss=return_z_loss, return_lse=return_lse, **options)
    D = math.prod(out)
    weights = linear_weight.reshape(C, D, H).unbind(1)  # unbind: one stack in the backward
    biases = (None,) * D if linear_bias is None else linear_bias.reshape(C, D).unbind(1)
    targets = target.reshape(N, D).unbind(1)
    # The 2-D checks once, on position 0 (dtypes, devices, the class weight, the options).
    _, _, w, _ = check_arguments(input, weights[0], targets[0], biases[0], weight, ignore_index,
                                 label_smoothing, logit_scale, softcap)
    out_dtype = autocast_args(input, linear_weight, linear_bias)[3]
    # 16-bit inputs run each position in float32: the input's gradient is a sum over the D
    # positions, and the 2-D path returns each position's part (and its per-row losses) rounded
    # to 16 bits -- D roundings where torch's one product over every position rounds once. In
    # float32 the parts add up unrounded, and the loss and each gradient round once.
    low = input.dtype in (torch.float16, torch.bfloat16)
    if low:
        input = input.float()
    if reduction == "mean":
        counted = torch_ref.not_ignored(target.reshape(N, D), ignore_index)
        count = counted.sum()
        denom = count if w is None else torch.where(
            counted, w[target.reshape(N, D).long().clamp(0, C - 1)], 0).sum()
        if w is not None and z_loss:  # the class weights' part over their sum (docstring)
            # (every target ignored: 0 / 0 -- the loss is NaN anyway, but NaN weights would
            # reach the ignored rows' gradient, which is 0)
            weight = w * torch.where(count > 0, count / denom, 1.0)
            denom = count
    # the statistics returned (reduced), and those the positions give per row: lse too for
    # return_lse (per row whatever the reduction)
    asked = stats.requested(return_stats, False) | ({"z_loss"} if return_z_loss else set())
    names = asked | ({"lse"} if return_lse else set())
    losses, rows = [], {name: [] for name in names}
    for d in range(D):
        w_d, b_d = weights[d], biases[d]
        if low:  # (one position's (C, H) weight in float32 at a time)
            w_d, b_d = w_d.float(), None if b_d is None else b_d.float()
        r = fused(input, w_d, targets[d], b_d, weight, ignore_index, "none",
                  label_smoothing, z_loss=z_loss, return_stats=tuple(names) or False, **options,
                  **{k: v for k, v in chunking.items() if k != "backend"})
        loss_d, st = r if names else (r, None)
        losses.append(loss_d)
        for name in names:
            rows[name].append(getattr(st, name))
    loss = torch.stack(losses, 1)
    if reduction != "none":
        loss = loss.sum(dtype=torch_ref.acc_dtype(loss.dtype))
        if reduction == "mean":  # NaN where the counted targets weigh 0 in all, as torch (its
            # smoothing part, s / 0 = inf, joins the NLL part's 0 / 0); denom / denom: 1 or NaN
            loss = loss / denom * (denom / denom)
    loss = loss.reshape(N, *out) if reduction == "none" else loss
    loss = loss.to(out_dtype)
    if not names:
        return loss
    rows = {name: torch.stack(values, 1) for name, values in rows.items()}
    result = stats.reduce({n: rows[n] for n in asked}, target.reshape(N, D),
                          torch_ref.Options(ignore_index=ignore_index), reduction, (N, *out))
    if return_stats:
        return loss, result
    extra = [result.z_loss] if return_z_loss else []
    return (loss, *extra, *([rows["lse"].reshape(N, *out)] if return_lse else []))
