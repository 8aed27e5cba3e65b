"""The check every provider passes before it is timed: loss and gradients against float64 torch
on the same inputs (the oracle of docs/maths.md).

The reference is computed in slices of the leading dimension, so a 16384 x 256000 case needs no
float64 copy of its logits: per slice, float64 F.cross_entropy (reduction 'sum') and its
gradient, divided by the number of counted targets, which is exactly the 'mean' of the whole.

Errors, relative to the reference:
  loss_err = |loss - ref| / |ref|
  grad_err = max |g - g_ref| / max |g_ref|   (each gradient; the worst is reported)
A provider passes when both are within the dtype's tolerance, or within twice what eager torch
itself shows on the same case (its low-precision rounding), whichever is larger.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX, Case, make_inputs

DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
SLICE_BYTES = 256 << 20  # float64 bytes of logits per reference slice


def tolerance(dtype: torch.dtype, torch_error: Optional[float]) -> float:
    tol = DTYPE_TOLERANCE.get(dtype, 1e-4)
    if torch_error is not None and torch_error == torch_error:  # not NaN
        tol = max(tol, 2.0 * torch_error)
    return tol


def _slices(total: int, per_item_bytes: int):
    step = max(1, SLICE_BYTES // max(1, per_item_bytes))
    return [slice(i, min(total, i + step)) for i in range(0, total, step)]


class _MaxError:
    """Running max |got - want| and max |want| over slices, on the device (no host syncs)."""

    def __init__(self, device):
        self.diff = torch.zeros((), dtype=torch.float64, device=device)
        self.ref = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, got: torch.Tensor, want: torch.Tensor):
        # torch.maximum propagates NaN, so a NaN anywhere makes the error NaN (a failure).
        self.diff = torch.maximum(self.diff, (got.double() - want).abs().max())
        self.ref = torch.maximum(self.ref, want.abs().max())

    def value(self) -> float:
        ref = self.ref.item()
        return self.diff.item() / ref if ref > 0 else self.diff.item()


def errors(case: Case, device: torch.device, loss: torch.Tensor, grads: list) -> tuple:
    """(loss_err, grad_err) of a provider's loss and gradients for `case` (NaN if non-finite)."""
    pristine = make_inputs(case, device, requires_grad=False)  # providers may overwrite theirs
    target = pristine.target
    if case.soft:  # 'mean' over the rows
        counted = torch.tensor(float(target.numel() // target.shape[1]), dtype=torch.float64,
                               device=device)
    else:
        counted = (target != IGNORE_INDEX).sum().double()
    if case.kind == "ce":
        ref_loss, grad_err = _ce_reference(pristine.logits, target, counted, grads[0],
                                           **case.loss_options)
    else:
        ref_loss, grad_err = _linear_reference(pristine, counted, grads)
    loss_err = ((loss.double() - ref_loss).abs() / ref_loss.abs()).item()
    return loss_err, grad_err


def _ce_reference(logits, target, counted, grad, z_loss=0.0, logit_scale=1.0, softcap=None):
    """With the extras (docs/maths.md): z = softcap(logit_scale x), and z_loss lse^2 on each
    counted row, over the same count (no class weights here)."""
    per_item = logits[0].numel() * 8
    loss_sum = torch.zeros((), dtype=torch.float64, device=logits.device)
    err = _MaxError(logits.device)
    for s in _slices(logits.shape[0], per_item):
        x = logits[s].double().requires_grad_()
        z = x * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        t = target[s].double() if target.is_floating_point() else target[s]
        part = F.cross_entropy(z, t, ignore_index=IGNORE_INDEX, reduction="sum")
        if z_loss:
            lse = torch.logsumexp(z, 1)
            rows = torch.ones_like(lse, dtype=torch.bool) if t.is_floating_point() \
                else t != IGNORE_INDEX
            part = part + z_loss * torch.where(rows, lse * lse, 0.0).sum()
        (g,) = torch.autograd.grad(part, x)
        err.add(grad[s], g / counted)
        loss_sum += part.detach()
        del x, z, g, part
    return loss_sum / counted, err.value()


def _linear_reference(pristine, counted, grads):
    hidden, weight, target = pristine.hidden, pristine.weight, pristine.target
    grad_hidden, grad_weight = grads
    weight64 = weight.double()
    grad_weight_ref = torch.zeros_like(weight64)
    loss_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    err_hidden = _MaxError(hidden.device)
    for s in _slices(hidden.shape[0], weight.shape[0] * 8):
        h = hidden[s].double()
        z = (h @ weight64.T).requires_grad_()
        part = F.cross_entropy(z, target[s], ignore_index=IGNORE_INDEX, reduction="sum")
        (dz,) = torch.autograd.grad(part, z)
        dz /= counted
        err_hidden.add(grad_hidden[s], dz @ weight64)
        grad_weight_ref.addmm_(dz.T, h)
        loss_sum += part.detach()
        del h, z, dz, part
    err_weight = _MaxError(hidden.device)
    err_weight.add(grad_weight, grad_weight_ref)
    worst = max(err_hidden.value(), err_weight.value(), key=lambda e: (e != e, e))
    return loss_sum / counted, worst
