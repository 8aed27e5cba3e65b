"""The fused ops: nllfused::ce_fwd / ce_bwd (C++ and CUDA) and ce_fwd_triton / ce_bwd_triton.

The schemas and the C++/CUDA kernels come from the extension nllfused._C (csrc/). This module
registers, once for every op pair, what the extension-cpp pattern keeps in Python: the Triton
kernels, the fake (meta) implementations that torch.compile traces with, and the autograd formula
(the backward op of the same backend).
"""
from __future__ import annotations

import torch

from . import backends
from .backends import triton_backend

try:
    from . import _C  # noqa: F401  (loading it registers the schemas and C++/CUDA kernels)

    EXTENSION_ERROR = None
except ImportError as exc:  # a source tree that was never built
    _C = None
    EXTENSION_ERROR = exc

FWD = {"cpu": "ce_fwd", "cuda": "ce_fwd", "triton": "ce_fwd_triton"}
BWD = {"cpu": "ce_bwd", "cuda": "ce_bwd", "triton": "ce_bwd_triton"}


def _acc_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, logit_scale,
              softcap, prob_target):
    N, _, D = logits.shape
    loss = logits.new_empty((N, D), dtype=_acc_dtype(logits))
    return loss, logits.new_empty((N, D), dtype=torch.float64), torch.empty_like(loss)


def _bwd_fake(grad_loss, logits, target, weight, lse, aux, ignore_index, label_smoothing, z_loss,
              logit_scale, softcap, prob_target):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    _, lse, aux = output
    ctx.save_for_backward(logits, target, weight, lse, aux)
    ctx.options = options


def _transformed_log_softmax(logits, lse, logit_scale, softcap):
    from .backends.torch_ref import transform
    z = transform(logits.to(_acc_dtype(logits)), logit_scale, softcap)
    return z - lse.to(z.dtype).unsqueeze(1)


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, grad_lse, grad_aux):
        logits, target, weight, lse, aux = ctx.saved_tensors
        ignore_index, e, z_loss, logit_scale, softcap, prob_target = ctx.options
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = bwd_op(grad_loss, logits, target, weight, lse, aux, *ctx.options)
        if prob_target and ctx.needs_input_grad[1]:
            # d loss / d q_c = -(1 - e) w_c log p_c: rare (soft targets that require grad),
            # so plain torch; it reads the logits once more.
            logp = _transformed_log_softmax(logits, lse, logit_scale, softcap)
            if weight is not None:
                logp = logp * weight.view(1, -1, 1)
            grad_target = (-(1 - e) * logp * grad_loss.unsqueeze(1)).to(target.dtype)
        return grad_logits, grad_target, None, None, None, None, None, None, None
    return backward


def _register():
    if _C is None:
        return
    ops = torch.ops.nllfused
    torch.library.register_kernel("nllfused::ce_fwd_triton", ("cpu", "cuda"),
                                  triton_backend.ce_fwd)
    torch.library.register_kernel("nllfused::ce_bwd_triton", ("cpu", "cuda"),
                                  triton_backend.ce_bwd)
    for fwd, bwd in (("ce_fwd", "ce_bwd"), ("ce_fwd_triton", "ce_bwd_triton")):
        torch.library.register_fake(f"nllfused::{fwd}")(_fwd_fake)
        torch.library.register_fake(f"nllfused::{bwd}")(_bwd_fake)
        torch.library.register_autograd(f"nllfused::{fwd}", _make_backward(getattr(ops, bwd)),
                                        setup_context=_setup_context)


_register()
backends._warm_up()  # answer the kernel-availability questions now, outside any compiled code


def forward_op(backend: str):
    return getattr(torch.ops.nllfused, FWD[backend])


def backward_op(backend: str):
    return getattr(torch.ops.nllfused, BWD[backend])
