"""Argument checks and canonicalisation for the cross-entropy entry points.

Everything a user can get wrong is caught here, before any kernel runs, with an exception that
names the problem. The result is the canonical form every backend takes (see csrc/ops.cpp):
logits (N, C, D), targets (N, D) or (N, C, D), weight (C,) in the accumulation dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

REDUCTIONS = ("none", "mean", "sum")


@dataclass
class Canonical:
    """A cross-entropy call in the canonical form the ops take."""

    logits: torch.Tensor  # (N, C, D)
    target: torch.Tensor  # (N, D) integer or (N, C, D) floating
    weight: Optional[torch.Tensor]  # (C,) accumulation dtype, contiguous
    prob_target: bool
    out_shape: tuple  # shape of the reduction='none' result
    out_dtype: torch.dtype
    num_classes: int


def resolve_reduction(size_average, reduce, reduction: str) -> str:
    """Map the deprecated size_average/reduce pair as torch does; validate the result."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}")
    return reduction


def check_options(label_smoothing, z_loss, logit_scale, softcap) -> None:
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a Python number; got {type(value).__name__}")
        if not -math.inf < value < math.inf:  # also false for NaN; traceable by dynamo
            raise ValueError(f"{name} must be finite; got {value}")

    number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0; got {z_loss}")
    number("logit_scale", logit_scale)
    if softcap is not None:
        number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be a positive number or None; got {softcap}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits_and_target(input, target) -> None:
    """Both are tensors, and the logits have a floating dtype a kernel takes."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor; got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a Tensor; got {type(target).__name__}")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(
            f"input (the logits) must be float16, bfloat16, float32 or float64; got {input.dtype}")


def canonicalize(input, target, weight, ignore_index) -> Canonical:
    check_logits_and_target(input, target)
    if input.dim() == 0:
        raise ValueError(
            "input is 0-dimensional: cross_entropy needs logits of shape (C,), (N, C) or "
            "(N, C, d1, ..., dk) with the classes in dimension 1 (dimension 0 for a 1-D input)")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")

    class_dim = 0 if input.dim() == 1 else 1
    C = input.shape[class_dim]
    if C == 0:
        raise ValueError(f"input has 0 classes (shape {tuple(input.shape)})")
    index_shape = input.shape[:class_dim] + input.shape[class_dim + 1:]

    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"target must hold class indices (an integer dtype) or class probabilities "
            f"(a floating dtype); got {target.dtype}")
    prob_target = target.is_floating_point()
    if prob_target:
        if target.shape != input.shape:
            if target.shape == index_shape:
                raise TypeError(
                    f"target has the shape of class indices {tuple(target.shape)} but a floating "
                    f"dtype ({target.dtype}): class indices must be an integer tensor (e.g. "
                    f"target.long()); probability targets must have the input's shape "
                    f"{tuple(input.shape)}")
            raise ValueError(
                f"probability targets must have the input's shape {tuple(input.shape)}; "
                f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError(
                "ignore_index is not supported with probability (floating point) targets")
        out_dtype = torch.promote_types(input.dtype, target.dtype)
    else:
        if target.shape != index_shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape "
                f"{tuple(input.shape)}: class-index targets must have shape "
                f"{tuple(index_shape)} (the input's shape without the class dimension)")
        out_dtype = input.dtype

    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a Tensor or None; got {type(weight).__name__}")
        if weight.dim() != 1 or weight.shape[0] != C:
            raise ValueError(
                f"weight must be a 1-D tensor with one entry per class ({C}); got shape "
                f"{tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point; got {weight.dtype}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
        # float32 for every backend (csrc/ops.cpp); weights beyond float32 precision are rare.
        weight = weight.detach().to(torch.float32).contiguous()

    # Canonical 3-D views; flatten(2) is a view for contiguous and channels-last inputs.
    if input.dim() == 1:
        logits = input.view(1, C, 1)
        target3 = target.reshape(1, C, 1) if prob_target else target.reshape(1, 1)
    else:
        logits = input.unsqueeze(-1) if input.dim() == 2 else input.flatten(2)
        if prob_target:
            target3 = target.unsqueeze(-1) if target.dim() == 2 else target.flatten(2)
        else:
            target3 = target.unsqueeze(-1) if target.dim() == 1 else target.flatten(1)
    return Canonical(logits, target3, weight, prob_target, tuple(index_shape), out_dtype, C)


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise IndexError for a class index outside [0, C) that is not ignore_index.

    This reads the targets on the host, so it runs for CPU tensors (where it is cheap) and for
    GPU tensors only when the user opts in (nllfused.set_target_check(True)).
    """
    if target.numel() == 0:
        return
    counted = target != ignore_index
    bad = counted & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise IndexError(
            f"Target {value} is out of bounds: class indices must be in [0, {num_classes}) "
            f"or equal ignore_index ({ignore_index})")
