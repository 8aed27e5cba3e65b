"""Backend names and the choice behind backend="auto".

  torch   pure-torch reference (nllfused/backends/torch_ref.py), any device and dtype
  triton  Triton kernels (kernels/), CUDA tensors; CPU tensors under TRITON_INTERPRET=1
  cpu     C++ kernels (csrc/cpu), CPU tensors
  cuda    CUDA kernels (csrc/cuda), CUDA tensors
"""
from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")


_KERNELS = {}


def _has_kernel(op: str, key: str) -> bool:
    # Asked once per (op, key) and remembered: the answer is fixed once the extension is
    # loaded, and torch.compile cannot trace the dispatcher query itself.
    if (op, key) not in _KERNELS:
        try:
            _KERNELS[op, key] = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        except RuntimeError:  # op not registered: the extension is not built
            _KERNELS[op, key] = False
    return _KERNELS[op, key]


def _warm_up():
    for key in ("CPU", "CUDA"):
        _has_kernel("nllfused::ce_fwd", key)


def unavailable_reason(backend: str, device: torch.device):
    """None if `backend` can run tensors on `device`, else a sentence saying why not."""
    from . import triton_backend
    from .. import ops

    if backend == "torch":
        return None
    if backend == "triton":
        if ops.EXTENSION_ERROR is not None:
            return f"the extension nllfused._C is not built ({ops.EXTENSION_ERROR})"
        return triton_backend.unavailable_reason(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return (f"backend={backend!r} runs {backend.upper()} tensors, but the input is on "
                    f"{device}")
        if ops.EXTENSION_ERROR is not None:
            return f"the extension nllfused._C is not built ({ops.EXTENSION_ERROR})"
        if not _has_kernel("nllfused::ce_fwd", backend.upper()):
            return f"nllfused was built without {backend.upper()} kernels"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; raises if the named one cannot run here.

    auto: CPU tensors -> cpu (C++); CUDA tensors -> cuda, else triton; torch where nothing else
    is available. The CUDA choice follows the benchmark (bench/results/): see README.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        for candidate in order:
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return backend


def available(device: torch.device) -> list:
    """The concrete backends that can run tensors on `device`."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
