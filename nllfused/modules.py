"""nn.Module wrappers: CrossEntropyLoss and LinearCrossEntropyLoss with the constructors of
torch.nn.CrossEntropyLoss and torch.nn.LinearCrossEntropyLoss."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import _checks, backends
from .errors import ArgumentError, ArgumentTypeError
from .functional import cross_entropy
from .linear import linear_cross_entropy
from .linear_checks import check_chunking


class LossOptions(torch.nn.Module):
    """What nllfused's loss modules share: their reduction and extra options, checked at
    construction (a user of torch's modules learns of a bad option early), shown by repr."""

    def _set_options(self, reduction: str, label_smoothing: float, z_loss: float,
                     logit_scale: float, softcap: Optional[float], backend: str) -> None:
        label_smoothing, z_loss, logit_scale, softcap = _checks.check_options(
            label_smoothing, z_loss, logit_scale, softcap)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.backend = backends.check_name(backend)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: say why it cannot, instead of TorchScript's
        # "keyword-arg expansion is not supported" deep in forward
        raise ArgumentTypeError(
            f"nllfused.{type(self).__name__} cannot be compiled by TorchScript "
            f"(torch.jit.script): its loss is a Python function over custom ops; use "
            f"torch.compile, torch.jit.trace or torch.export, which take it")

    def _options(self) -> dict:
        """The keyword arguments of the functional form that every loss module passes."""
        return dict(reduction=self.reduction, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss, logit_scale=self.logit_scale, softcap=self.softcap,
                    backend=self.backend)

    def _options_repr(self, shown: tuple = ()) -> list:
        """The options not at their defaults, but those in `shown` (already in the repr)."""
        extras = []
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("logit_scale", 1.0),
                              ("softcap", None)):
            if name not in shown and getattr(self, name) != default:
                extras.append(f"{name}={getattr(self, name)}")
        return extras + [f"backend={self.backend!r}"]


class CrossEntropyLoss(LossOptions):
    """Drop-in for torch.nn.CrossEntropyLoss, plus keyword-only z_loss, logit_scale, softcap,
    backend and return_stats (see nllfused.cross_entropy)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, size_average=None,
                 ignore_index: int = -100, reduce=None, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, z_loss: float = 0.0, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, backend: str = "auto",
                 return_stats=False) -> None:
        super().__init__()
        self._set_options(_checks.resolve_reduction(size_average, reduce, reduction),
                          label_smoothing, z_loss, logit_scale, softcap, backend)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.return_stats = return_stats  # (loss, nllfused.stats.CrossEntropyStats) if set

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        # (the arguments spelled out, not **self._options(): a 10-class batch's call is a few
        # microseconds, of which building that dict was a tenth)
        return cross_entropy(input, target, self.weight, None, self.ignore_index, None,
                             self.reduction, self.label_smoothing, z_loss=self.z_loss,
                             logit_scale=self.logit_scale, softcap=self.softcap,
                             backend=self.backend, return_stats=self.return_stats)

    def __prepare_scriptable__(self):
        # torch.jit.script (of this module or of a model holding it, a criterion kept beside the
        # network) takes torch's own module in its place where it is the same loss: torch's
        # options, this class itself (a subclass's forward is its own), no hooks (TorchScript
        # cannot call the kernels' Python wrapper)
        if (self.z_loss, self.logit_scale, self.softcap, self.return_stats) != (0, 1, None, False) \
                or type(self) is not CrossEntropyLoss or self._forward_hooks \
                or self._forward_pre_hooks:
            raise ArgumentTypeError(
                f"nllfused.{type(self).__name__} cannot be compiled by TorchScript "
                f"(torch.jit.script; torch's own module stands in for a CrossEntropyLoss without "
                f"z_loss, logit_scale, softcap, return_stats, subclass or hooks): use "
                f"torch.compile, torch.jit.trace or torch.export")
        stand_in = torch.nn.CrossEntropyLoss(
            self.weight, ignore_index=_checks.check_ignore_index(self.ignore_index),
            reduction=self.reduction, label_smoothing=self.label_smoothing)
        return stand_in.train(self.training)

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        return ", ".join(extras + self._options_repr())


class LinearCrossEntropyLoss(LossOptions):
    """torch.nn.LinearCrossEntropyLoss, fused: holds the linear layer (self.linear) and the loss
    options; forward(input, target) returns nllfused.linear_cross_entropy(input, W, target, b,
    ...), where W and b are self.linear's weight and bias viewed as (C, *out_features, H) and
    (C, *out_features), as torch's module does (a K-dimensional loss for out_features != ():
    nllfused/linear_kdim.py). Same parameters and state_dict keys as torch's module.

    The constructor is torch's (in_features, num_classes, *, out_features, bias, device, dtype,
    reduction, weight, ignore_index, label_smoothing, options) plus nllfused's keyword-only
    z_loss, logit_scale, softcap, chunk_size, backend and return_stats (forward then returns
    (loss, nllfused.stats.CrossEntropyStats)).
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                 logit_scale: float = 1.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, backend: str = "auto",
                 return_stats=False) -> None:
        super().__init__()
        self._set_options(_checks.resolve_reduction(None, None, reduction), label_smoothing,
                          z_loss, logit_scale, softcap, backend)
        if label_smoothing < 0:  # torch's module checks the lower bound too (its function not)
            raise ArgumentError(f"expected label_smoothing to be in range [0, 1], got "
                                f"{float(label_smoothing)}")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ArgumentError(
                f"weight must have shape ({num_classes},); got {tuple(weight.shape)}")
        out_features = tuple(out_features)
        if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1
               for d in out_features):
            raise ArgumentError(f"out_features must be a tuple of positive ints; got "
                                f"{out_features!r}")
        out_features = tuple(int(d) for d in out_features)  # NumPy integers too, as torch
        check_chunking(options, chunk_size)
        self.num_classes = num_classes
        self.out_features = out_features
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.options = options
        self.chunk_size = chunk_size
        self.return_stats = return_stats
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        shape = (self.num_classes, *self.out_features)
        linear_weight, linear_bias = self.linear.weight, self.linear.bias
        if self.out_features:  # views: torch's module stores them flat
            linear_weight = linear_weight.reshape(*shape, self.linear.in_features)
            linear_bias = None if linear_bias is None else linear_bias.reshape(shape)
        return linear_cross_entropy(
            input, linear_weight, target, linear_bias, weight=self.weight,
            ignore_index=self.ignore_index, options=self.options, chunk_size=self.chunk_size,
            return_stats=self.return_stats, **self._options())

    def extra_repr(self) -> str:
        # torch's module's fields, in its order and format, then the extras set here
        extras = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                  f"out_features={self.out_features}", f"bias={self.linear.bias is not None}",
                  f"reduction={self.reduction}", f"ignore_index={self.ignore_index}",
                  f"label_smoothing={self.label_smoothing}", f"options={self.options}"]
        if self.chunk_size is not None:
            extras.append(f"chunk_size={self.chunk_size}")
        return ", ".join(extras + self._options_repr(shown=("label_smoothing",)))
