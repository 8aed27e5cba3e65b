"""Backend names and the choice behind backend="auto".

  torch   pure-torch reference (nllfused/backends/torch_ref.py), any device and dtype
  triton  Triton kernels (kernels/), CUDA tensors; CPU tensors under TRITON_INTERPRET=1
  cpu     C++ kernels (csrc/cpu), CPU tensors
  cuda    CUDA kernels (csrc/cuda), CUDA tensors

Under forward-mode AD and torch.func transforms (grad, jvp, vmap, hessian, ...) every call runs
the torch reference, whose plain torch ops every transform supports: the fused ops have a
backward formula only (see nllfused/ops.py).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import _extension
from ..errors import ArgumentError

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")


def check_name(backend) -> str:
    """The one check of a backend name (functions and modules alike)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def unavailable_reason(backend: str, device: torch.device):
    """None if `backend` can run tensors on `device`, else a sentence saying why not."""
    check_name(backend)
    if backend in ("torch", "auto"):
        return None
    if _extension.C_ERROR is not None:
        return f"the extension nllfused._C is not built ({_extension.C_ERROR})"
    if backend == "triton":
        if _extension.TRITON_ERROR is not None:
            return f"triton could not be imported ({_extension.TRITON_ERROR})"
        if device.type == "cpu" and not _extension.triton_interpreter():
            return ("the triton backend runs CPU tensors only under Triton's interpreter: set "
                    "TRITON_INTERPRET=1 in the environment before importing triton/nllfused, "
                    "or use backend='cpu' or 'torch'")
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend does not support {device.type} tensors"
        return None
    if device.type != backend:
        return f"backend={backend!r} runs {backend.upper()} tensors, but the input is on {device}"
    if backend == "cuda" and not _extension.build_info().get("cuda"):
        return "nllfused was built without CUDA kernels"
    return None


def transform_active() -> bool:
    """Forward-mode AD or a torch.func transform is on: only the torch reference supports them."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; raises if the named one cannot run here.

    auto: CPU tensors -> cpu (C++); CUDA tensors -> cuda, else triton; torch where nothing else
    is available. Under forward-mode AD or torch.func transforms: torch (module docstring).
    """
    check_name(backend)
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        backend = next((b for b in order if unavailable_reason(b, device) is None), "torch")
    else:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend != "torch" and not torch.compiler.is_compiling() and transform_active():
        return "torch"
    return backend


def available(device: torch.device) -> list:
    """The concrete backends that can run tensors on `device`."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
