"""The "torch" backend: the same contract as the fused ops, in plain differentiable torch.

It is the test oracle's twin (run it in float64 and it *is* the oracle of GUIDE §1) and the
fallback where no kernel applies. It materialises the transformed logits, so it is neither fast
nor frugal; autograd differentiates it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import accumulation_dtype


def transform(x: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    """z = softcap(logit_scale * x); softcap 0 means none."""
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x


def forward(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
            ignore_index: int, label_smoothing: float, z_loss: float, logit_scale: float,
            softcap: float, prob_target: bool):
    """(loss, lse, aux) per row, as nllfused::ce_fwd defines them (csrc/ops.cpp)."""
    acc = accumulation_dtype(logits.dtype)
    C = logits.shape[1]
    e = label_smoothing
    # Classes last, (N, D, C): torch's last-dim softmax kernels are its most accurate ones.
    z = transform(logits.to(acc).movedim(1, -1), logit_scale, softcap)
    lse = torch.logsumexp(z, dim=-1)  # (N, D)
    # log_softmax, not z - lse: it subtracts the max first, so logits far from zero keep their
    # precision (and its backward is torch's own).
    neg_logp = -torch.log_softmax(z, dim=-1)  # (N, D, C), >= 0
    zero = torch.zeros((), dtype=acc, device=z.device)
    if prob_target:
        q = target.to(acc).movedim(1, -1)
        if e:
            q = (1 - e) * q + e / C
        wq = q if weight is None else q * weight.to(acc)
        # 0 * inf (a masked class with zero target mass) contributes 0, not NaN.
        loss = torch.where(wq != 0, wq * neg_logp, zero).sum(-1)
        aux = wq.sum(-1)
        if z_loss:
            loss = loss + z_loss * lse * lse
        return loss, lse.to(torch.float64), aux.detach()

    counted = target != ignore_index
    in_range = (target >= 0) & (target < C)
    safe = torch.where(counted & in_range, target, torch.zeros_like(target)).long()
    nll = neg_logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    w_y = torch.ones_like(lse) if weight is None else weight.to(acc)[safe]
    loss = w_y * nll
    if e:
        smooth = neg_logp.sum(-1) if weight is None else (weight.to(acc) * neg_logp).sum(-1)
        loss = (1 - e) * loss + (e / C) * smooth
    if z_loss:
        loss = loss + z_loss * lse * lse
    nan = torch.full((), float("nan"), dtype=acc, device=z.device)
    loss = torch.where(counted, torch.where(in_range, loss, nan), zero)
    aux = torch.where(counted, torch.where(in_range, w_y, nan), zero)
    return loss, lse.to(torch.float64), aux.detach()
