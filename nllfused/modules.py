"""nn.Module wrappers: CrossEntropyLoss with torch.nn.CrossEntropyLoss's constructor."""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends
from .functional import cross_entropy


class LossOptions(torch.nn.Module):
    """What nllfused's loss modules share: their reduction and extra options, checked at
    construction (a user of torch's modules learns of a bad option early), shown by repr."""

    def _set_options(self, reduction: str, label_smoothing: float, z_loss: float,
                     logit_scale: float, softcap: Optional[float], backend: str) -> None:
        _checks.check_options(label_smoothing, z_loss, logit_scale, softcap)
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.backend = backends.check_name(backend)

    def _options(self) -> dict:
        """The keyword arguments of the functional form that every loss module passes."""
        return dict(reduction=self.reduction, label_smoothing=self.label_smoothing,
                    z_loss=self.z_loss, logit_scale=self.logit_scale, softcap=self.softcap,
                    backend=self.backend)

    def _options_repr(self) -> list:
        extras = []
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("logit_scale", 1.0),
                              ("softcap", None)):
            if getattr(self, name) != default:
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
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             return_stats=self.return_stats, **self._options())

    def extra_repr(self) -> str:
        extras = [f"reduction={self.reduction!r}", f"ignore_index={self.ignore_index}"]
        return ", ".join(extras + self._options_repr())
