"""The "triton" backend: launches kernels/cross_entropy.py for nllfused::ce_{fwd,bwd}_triton.

Registered as the CPU and CUDA kernels of those ops (the schema lives in csrc/ops.cpp); on CPU
tensors the kernels run under Triton's interpreter, which must be enabled with TRITON_INTERPRET=1
before triton is first imported.
"""
from __future__ import annotations

import os
import struct
import threading

import torch

_IMPORT_ERROR = None
try:
    import triton
    import triton.language as tl

    from ..kernels.cross_entropy import ce_bwd_kernel, ce_fwd_kernel, launch_config
except Exception as exc:  # triton missing or broken: the backend reports it when asked for
    _IMPORT_ERROR = exc


# Triton's interpreter patches module-level state while a kernel runs, so concurrent
# interpreted launches from several Python threads collide; GPU launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def _launch_guard(tensor):
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return _INTERPRETER_LOCK


# Triton reads TRITON_INTERPRET when a kernel is defined (at import), so read it then too;
# this also keeps the environment out of code that torch.compile traces.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    return INTERPRETER


def unavailable_reason(device: torch.device):
    """None if the triton backend can run on `device`, else a sentence saying why not."""
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported ({_IMPORT_ERROR})"
    if device.type == "cpu" and not interpreter_enabled():
        return ("the triton backend runs CPU tensors only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before importing triton/nllfused, "
                "or use backend='cpu' or 'torch'")
    if device.type not in ("cpu", "cuda"):
        return f"the triton backend does not support {device.type} tensors"
    return None


def _flags(logits, target, weight, label_smoothing, z_loss, logit_scale, softcap, prob_target):
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    R = logits.shape[0] * logits.shape[2]
    block_r, block_c, num_warps = launch_config(R, logits.shape[1], logits.element_size())
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, ACC=acc, PROB_TARGET=prob_target,
                HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
                HAS_Z_LOSS=z_loss > 0, HAS_SCALE=logit_scale != 1.0,
                HAS_SOFTCAP=softcap > 0, num_warps=num_warps)


def _target_strides(target, prob_target):
    if prob_target:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)


def _weight_args(logits, weight):
    """(W, WSUM): the weights and their sum, computed on the device (no host sync)."""
    if weight is None:
        wsum = torch.full((1,), float(logits.shape[1]), dtype=torch.float64,
                          device=logits.device)
        return wsum, wsum  # W is never read without HAS_WEIGHT
    return weight, weight.sum(dtype=torch.float64).reshape(1)


def _options(*values):
    """Each float option as a (hi, lo) pair of float32 values with hi + lo == value to ~48 bits:
    Triton passes Python floats as float32, which would round them for float64 logits."""
    pairs = []
    for v in values:
        hi = struct.unpack("f", struct.pack("f", v))[0]
        pairs += [hi, v - hi]
    return pairs


def ce_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, logit_scale,
           softcap, prob_target):
    N, C, D = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty((N, D), dtype=acc, device=logits.device)
    aux = torch.empty_like(loss)
    lse = torch.empty((N, D), dtype=torch.float64, device=logits.device)
    R = N * D
    if R == 0:
        return loss, lse, aux
    flags = _flags(logits, target, weight, label_smoothing, z_loss, logit_scale, softcap,
                   prob_target)
    W, WSUM = _weight_args(logits, weight)
    grid = (triton.cdiv(R, flags["BLOCK_R"]),)
    with _launch_guard(logits):
        ce_fwd_kernel[grid](
            logits, *logits.stride(), target, *_target_strides(target, prob_target),
            W, WSUM, loss, lse, aux,
            R, C, D, ignore_index, *_options(label_smoothing, z_loss, logit_scale, softcap),
            **flags)
    return loss, lse, aux


def ce_bwd(grad_loss, logits, target, weight, lse, aux, ignore_index, label_smoothing, z_loss,
           logit_scale, softcap, prob_target):
    N, C, D = logits.shape
    # The interpreter casts float32 to bfloat16 by truncation, where GPUs round to nearest even;
    # under it, write float32 and let torch round (tests then see the GPU's numbers).
    truncating = not logits.is_cuda and logits.dtype == torch.bfloat16
    grad = torch.empty((N, C, D), dtype=torch.float32 if truncating else logits.dtype,
                       device=logits.device)
    R = N * D
    if R == 0:
        return grad.to(logits.dtype)
    flags = _flags(logits, target, weight, label_smoothing, z_loss, logit_scale, softcap,
                   prob_target)
    W, WSUM = _weight_args(logits, weight)
    grid = (triton.cdiv(R, flags["BLOCK_R"]),)
    with _launch_guard(logits):
        ce_bwd_kernel[grid](
            grad_loss, *grad_loss.stride(), logits, *logits.stride(),
            target, *_target_strides(target, prob_target), W, WSUM, lse, aux, grad,
            R, C, D, ignore_index, *_options(label_smoothing, z_loss, logit_scale, softcap),
            **flags)
    return grad.to(logits.dtype)


