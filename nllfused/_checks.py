"""Argument checks and canonicalisation for the cross-entropy entry points.

Everything a user can get wrong is caught here, before any kernel runs, with an exception that
names the problem (nllfused/errors.py: catchable as torch's RuntimeError and as ValueError or
TypeError). The result is a `Call`: the canonical form every backend takes (csrc/ops.cpp), logits
(N, C, D), targets (N, D) or (N, C, D), weight (C,) in the accumulation dtype, and the op options
as one named record, `Options`, unpacked only where an op is called.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

import torch

from .backends import torch_ref
from .errors import (ArgumentError, ArgumentTypeError, DimensionError, TargetIndexError,
                     UnsupportedDtypeError, UnsupportedLayoutError)

REDUCTIONS = ("none", "mean", "sum")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Class-index dtypes the kernels read: torch's Long and Byte, and int32 (read as it is).
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


Options = torch_ref.Options  # the options every op takes, in the schema's order


@dataclass
class Call:
    """A cross-entropy call in the canonical form the ops take."""

    logits: torch.Tensor  # (N, C, D)
    target: torch.Tensor  # (N, D) integer or (N, C, D) floating
    weight: Optional[torch.Tensor]  # (C,) accumulation dtype, contiguous
    options: Options
    out_shape: tuple  # shape of the reduction='none' result
    out_dtype: torch.dtype

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]


def autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False on a device autocast does not know (meta,
    where asking raises)."""
    return ((device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type))


def autocast_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """A loss of dtype as autocast makes it: float32 for 16-bit logits, as torch's autocast runs
    cross_entropy in float32. The kernels accumulate in float32 from the 16-bit logits anyway:
    no float32 copy of the logits is made."""
    if dtype in (torch.float16, torch.bfloat16) and autocast_enabled(device.type):
        return torch.float32
    return dtype


def resolve_reduction(size_average, reduce, reduction: str) -> str:
    """Map the deprecated size_average/reduce pair as torch does; validate the result."""
    # (torch's legacy_get_string, written out: torch.compile(fullgraph=True) traces neither it
    # -- a torch.* function returning a str -- nor warnings.warn, which it skips)
    if size_average is not None or reduce is not None:
        reduction = ("none" if reduce is not None and not reduce else
                     "sum" if size_average is not None and not size_average else "mean")
        if not torch.compiler.is_compiling():
            warnings.warn(f"size_average and reduce args will be deprecated, please use "
                          f"reduction='{reduction}' instead.", stacklevel=3)
    if reduction == "elementwise_mean":  # torch's old name, still taken with a warning
        if not torch.compiler.is_compiling():
            warnings.warn("reduction='elementwise_mean' is deprecated, please use "
                          "reduction='mean' instead.")
        reduction = "mean"
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ArgumentError(f"{reduction!r} is not a valid value for reduction: it must be one "
                            f"of {', '.join(map(repr, REDUCTIONS))}")
    return reduction


def _number(name, value) -> float:
    """A real number option (a Python or NumPy number, not a bool) as a finite float."""
    # (a float or an int first: isinstance against the numbers ABCs costs a microsecond)
    if type(value) is not float and type(value) is not int and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ArgumentTypeError(f"{name} must be a Python or NumPy number; got "
                                f"{type(value).__name__}")
    if not isinstance(value, int):
        value = float(value)  # a NumPy number compared as the float it becomes
    # also false for NaN; traceable by dynamo; a Python int past float's range (10**400) too,
    # which the ops' float arguments could not take
    if not -sys.float_info.max <= value <= sys.float_info.max:
        raise ArgumentError(f"{name} must be finite; got {value}")
    return float(value)


def torch_smoothing(label_smoothing) -> float:
    """label_smoothing as torch takes it: any real number (a bool, a NumPy scalar, a 0-d
    tensor); at most 1, and no smoothing where it is not above 0 (torch checks only the upper
    bound: -0.5 or NaN mean none)."""
    value = label_smoothing
    if type(value) is not float:  # (a float, the common case, needs none of these tests)
        if isinstance(value, torch.Tensor) and value.requires_grad:  # torch refuses it too
            raise ArgumentTypeError("label_smoothing must be a real number; got a Tensor that "
                                    "requires grad (no gradient reaches label_smoothing)")
        if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
            value = value.item()
        if isinstance(value, np.bool_):  # torch takes it as it takes True
            value = bool(value)
        if not isinstance(value, numbers.Real):
            raise ArgumentTypeError(f"label_smoothing must be a real number; got "
                                    f"{type(label_smoothing).__name__}")
        value = float(value)
    if value > 1.0:
        raise ArgumentError(f"label_smoothing must be between 0.0 and 1.0 (in [0, 1]); got "
                            f"{value}")
    return value if value > 0.0 else 0.0


def check_options(label_smoothing, z_loss, logit_scale, softcap) -> tuple:
    """Raises for a bad option; returns the four as floats (label_smoothing as torch_smoothing;
    softcap None or a float): an int 10**30 or a NumPy float32 would meet the torch ops
    downstream as itself."""
    label_smoothing = torch_smoothing(label_smoothing)
    z_loss = _number("z_loss", z_loss)
    if z_loss < 0:
        raise ArgumentError(f"z_loss must be >= 0; got {z_loss}")
    logit_scale = _number("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _number("softcap", softcap)
        if softcap <= 0:
            raise ArgumentError(f"softcap must be a positive number or None; got {softcap}")
    return label_smoothing, z_loss, logit_scale, softcap


def traced_ignore_index(ignore_index) -> bool:
    """Whether torch.compile is tracing an ignore_index given as a tensor or a NumPy integer:
    it traces those as data (int() of one is a SymInt known only at run time), which the
    nllfused ops' int argument cannot take -- torch's own op (a SymInt argument) can."""
    # (a NumPy integer by its type's module: torch.compile's isinstance and issubclass do not
    # take it for a numbers.Integral or an np.integer)
    return (type(ignore_index) is not int and torch.compiler.is_compiling()
            and (isinstance(ignore_index, torch.Tensor)
                 or "numpy" in type(ignore_index).__module__))


def check_ignore_index(ignore_index) -> int:
    """ignore_index as an int: an int, or what torch also takes for one (a NumPy integer, an
    integer tensor of one element, any object with __index__); not a bool or a float."""
    if type(ignore_index) is int and -2 ** 63 <= ignore_index < 2 ** 63:  # (the common case)
        return ignore_index
    if traced_ignore_index(ignore_index):
        raise ArgumentTypeError(
            f"ignore_index must be a Python int under torch.compile for this call; got "
            f"{type(ignore_index).__name__}, which torch.compile traces as data (a value known "
            f"only at run time) where the nllfused ops need it while tracing: pass "
            f"int(ignore_index)")
    if isinstance(ignore_index, torch.Tensor):
        if ignore_index.numel() == 1 and not ignore_index.is_floating_point() \
                and ignore_index.dtype != torch.bool and not ignore_index.is_complex():
            ignore_index = int(ignore_index.item())
    elif isinstance(ignore_index, numbers.Integral) and not isinstance(ignore_index, bool):
        ignore_index = int(ignore_index)
    elif not isinstance(ignore_index, (bool, np.bool_)) and hasattr(ignore_index, "__index__"):
        try:
            ignore_index = operator.index(ignore_index)
        except TypeError as error:  # (a NumPy array of one element, a bad __index__)
            raise ArgumentTypeError(f"ignore_index must be an int; got "
                                    f"{type(ignore_index).__name__} ({error})") from None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    if not -2 ** 63 <= ignore_index < 2 ** 63:  # torch: ValueError "Overflow when unpacking long"
        raise ArgumentError(f"ignore_index must fit in int64 (class indices are int64); got "
                            f"{ignore_index}")
    return ignore_index


def check_logits_and_target(input, target) -> None:
    """Both are tensors on one device, and the logits have a floating dtype a kernel takes."""
    if not isinstance(input, torch.Tensor):
        raise ArgumentTypeError(f"input must be a Tensor; got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise ArgumentTypeError(f"target must be a Tensor; got {type(target).__name__}")
    if input.dtype not in LOGIT_DTYPES:
        raise UnsupportedDtypeError(
            f"input (the logits) must be float16, bfloat16, float32 or float64; got {input.dtype}")
    for name, t in (("input", input), ("target", target)):
        check_strided(name, t)
    if storage_overflows(input):  # torch's words
        raise ArgumentError(f"input of shape {tuple(input.shape)}: Storage size calculation "
                            f"overflowed (its bytes exceed int64)")
    if target.device != input.device:
        raise ArgumentError(f"Expected all tensors to be on the same device: target is on "
                            f"{target.device} but input is on {input.device}")
    if not target.is_floating_point() and target.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(
            f"target must hold class indices (an integer dtype) or class probabilities "
            f"(a floating dtype): expected target dtype to be Long, Int or Byte for class "
            f"indices, but got {target.dtype}")


def storage_overflows(t: torch.Tensor) -> bool:
    """numel x element size past int64, which only an expanded view can have: the kernels
    would read its 2^62 elements for ever, where torch fails allocating its output. (Not under
    torch.jit.trace, whose sizes are traced tensors: 2^63 is no int64 constant to compare; nor
    under torch.compile / export, where the test would bound a dynamic size: a constraint
    torch.export refuses.)"""
    return (not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and t.numel() * t.element_size() >= 2 ** 63)


def check_strided(name: str, t: torch.Tensor) -> None:
    """The kernels read strided tensors; a sparse (or other) one is refused by name."""
    if t.layout != torch.strided:
        raise UnsupportedLayoutError(f"{name} has layout {t.layout}: nllfused takes strided "
                                     f"(dense) tensors; pass {name}.to_dense()")


def check_weight(weight, num_classes: int, input: torch.Tensor,
                 prob_target: bool = False) -> Optional[torch.Tensor]:
    """The class weights as the ops take them: (C,) contiguous, accumulation dtype, detached.
    As torch takes them: with class indices and K-dim logits, any shape of C elements (its N-d
    loss reads them flat); with probability targets, an integer or bool dtype too (its product
    w q log p promotes)."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise ArgumentTypeError(f"weight must be a Tensor or None; got {type(weight).__name__}")
    check_strided("weight", weight)
    if (weight.dim() != 1 and input.dim() >= 3 and not prob_target
            and weight.numel() == num_classes):
        weight = weight.reshape(num_classes)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ArgumentError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes: "
            f"weight must be a 1-D tensor with one entry per class ({num_classes}); got shape "
            f"{tuple(weight.shape)}")
    if weight.is_complex() or not (weight.is_floating_point() or prob_target):
        raise ArgumentTypeError(f"weight must be floating point (expected scalar type Float or "
                                f"Double); got {weight.dtype}")
    if weight.device != input.device:
        raise ArgumentError(f"Expected all tensors to be on the same device: weight is on "
                            f"{weight.device} but input is on {input.device}")
    return weight.detach().to(torch_ref.acc_dtype(input.dtype)).contiguous()


def check_weight_not_learned(weight, prob_target: bool) -> None:
    """The kernels take the class weights as constants (check_weight detaches them): a weight
    that requires grad, under grad mode, is refused rather than left without its gradient. torch
    refuses it too for class-index targets (nll_loss is not differentiable in the weights); for
    probability targets it differentiates, and so does nllfused.cross_entropy where torch's own
    call can serve (no z_loss, logit_scale, softcap or statistics: functional.py)."""
    if not (isinstance(weight, torch.Tensor) and weight.requires_grad
            and torch.is_grad_enabled()):
        return
    if not prob_target:
        raise ArgumentError(
            "weight requires grad, but the loss of class-index targets is not differentiable in "
            "the class weights (torch: 'nll_loss_forward' is not differentiable with respect to "
            "argument 'weight'); pass weight.detach()")
    raise NotImplementedError(
        "weight requires grad: the gradient in the class weights of probability targets is "
        "given only without z_loss, logit_scale, softcap and statistics (as torch's own "
        "cross_entropy computes it); pass weight.detach() for these")


def _check_target_shape(input, target, class_dim: int, index_shape) -> bool:
    """Whether the target holds probabilities; raises if its shape fits neither kind."""
    prob_target = target.is_floating_point()
    if prob_target and target.shape == input.shape:
        return True
    if not prob_target and target.shape == index_shape:
        return False
    if not prob_target and input.dim() == 1 and target.shape == (1,) != input.shape:
        # torch takes a 1-D input's target as one index of shape (1,) too, but for C = 1,
        # where it is of the input's shape: probabilities (an integer one raises below)
        return False
    if prob_target and target.shape == index_shape:
        raise ArgumentTypeError(
            f"expected target dtype to be Long or Byte, but got {target.dtype}: target has the "
            f"shape of class indices {tuple(target.shape)} but a floating dtype; class indices "
            f"must be an integer tensor (e.g. target.long()); probability targets must have the "
            f"input's shape {tuple(input.shape)}")
    if prob_target:
        raise ArgumentError(
            f"probability targets must have the input's shape {tuple(input.shape)}; got "
            f"{tuple(target.shape)} (multi-target not supported)")
    if target.shape == input.shape:
        raise ArgumentTypeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{target.dtype}: a target of the input's shape {tuple(target.shape)} holds class "
            f"probabilities; class-index targets must have shape {tuple(index_shape)} (the "
            f"input's shape without the class dimension)")
    if input.dim() >= 2 and target.dim() == 0:  # torch: ValueError, or IndexError for N = 0
        raise DimensionError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size (0): a 0-d "
            f"target; class-index targets must have shape {tuple(index_shape)}")
    if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ArgumentError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0]}): class-index targets must have shape {tuple(index_shape)}")
    if input.dim() == 1 and target.dim() == 1:
        raise ArgumentError(
            f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]} "
            f"(class-index targets for input of shape {tuple(input.shape)}: shape () or (1,))")
    raise ArgumentError(
        f"Expected target size {list(index_shape)}, got {list(target.shape)}: class-index "
        f"targets for input of shape {tuple(input.shape)} must have shape {tuple(index_shape)} "
        f"(the input's shape without the class dimension {class_dim})")


def canonicalize(input, target, weight, ignore_index, label_smoothing=0.0, logit_scale=1.0,
                 softcap=None) -> Call:
    """The call in canonical form; label_smoothing and the extras as check_options checked
    (and returned) them."""
    check_logits_and_target(input, target)
    ignore_index = check_ignore_index(ignore_index)
    if input.dim() == 0:
        raise DimensionError(
            "input is 0-dimensional: cross_entropy needs logits of shape (C,), (N, C) or "
            "(N, C, d1, ..., dk) with the classes in dimension 1 (dimension 0 for a 1-D input)")
    class_dim = 0 if input.dim() == 1 else 1
    C = input.shape[class_dim]
    if C == 0:
        if no_class_index(target, ignore_index):  # (nothing_to_compute let the loss through)
            raise ArgumentError(
                f"input has 0 classes (shape {tuple(input.shape)}): only the plain loss is "
                f"defined there (z-loss and the statistics take each row's logsumexp, -inf)")
        # torch: "Target 0 is out of bounds" (an IndexError) -- every class index is.
        raise IndexError(f"input has 0 classes (shape {tuple(input.shape)}): every target is "
                         f"out of bounds")
    index_shape = input.shape[:class_dim] + input.shape[class_dim + 1:]
    prob_target = _check_target_shape(input, target, class_dim, index_shape)
    if prob_target and ignore_index >= 0:
        raise ArgumentError(
            "ignore_index is not supported for floating point target (probability targets)")
    check_weight_not_learned(weight, prob_target)
    weight_dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    weight = check_weight(weight, C, input, prob_target)

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
    options = Options(ignore_index, float(label_smoothing), float(logit_scale),
                      float(softcap or 0.0), prob_target)
    out_dtype = input.dtype
    if prob_target:  # torch's -(w q log_softmax(x)).sum(): the weights' dtype joins in too
        out_dtype = torch.promote_types(out_dtype, target.dtype)
        if weight_dtype is not None:
            out_dtype = torch.promote_types(out_dtype, weight_dtype)
    return Call(logits, target3, weight, options, tuple(index_shape), out_dtype)


def no_class_index(target: torch.Tensor, ignore_index) -> bool:
    """Whether target names no class: probability targets, no targets, or class indices that
    are all ignore_index. For logits of 0 classes only (torch then gives 0s, 0 or NaN, where a
    class index is out of bounds): the test reads the targets, a host sync on a GPU."""
    if target.is_floating_point() or target.numel() == 0:
        return True
    if target.dtype not in INDEX_DTYPES:
        return False
    return not bool(torch_ref.not_ignored(target, check_ignore_index(ignore_index)).any())


def nothing_to_compute(input, target, ignore_index, z_loss: float) -> bool:
    """Whether the call's logits have 0 classes and it has nothing to check or add: no class
    index (no_class_index; one would be out of bounds, canonicalize's error) and, with z-loss,
    no row that z-loss counts (index targets: all ignored; probability targets: no rows).
    logit_scale and softcap then transform no logit."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
            and input.dim() >= 1 and input.shape[0 if input.dim() == 1 else 1] == 0
            and no_class_index(target, ignore_index)):
        return False
    no_rows = input.dim() > 1 and 0 in (input.shape[0], *input.shape[2:])
    return z_loss == 0 or not target.is_floating_point() or no_rows


def check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise IndexError for a class index outside [0, C) that is not ignore_index.

    This reads the targets on the host, so it runs for CPU tensors (where it is cheap) and for
    GPU tensors only when the user opts in (nllfused.set_target_check(True)).
    """
    if target.numel() == 0:
        return
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(target):  # torch.func: every level's values
        target = functorch.get_unwrapped(target)
    counted, in_range = torch_ref.index_rule(target, num_classes, ignore_index)
    bad = counted & ~in_range
    if bool(bad.any()):
        value = int(target[bad].flatten()[0])
        raise TargetIndexError(
            f"Target {value} is out of bounds: class indices must be in [0, {num_classes}) "
            f"or equal ignore_index ({ignore_index})")
