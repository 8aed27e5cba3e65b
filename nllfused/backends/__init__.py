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

import functools
import warnings

import torch

from .. import _extension
from ..errors import ArgumentError
from .torch_ref import transform_active  # noqa: F401 (backends.transform_active)

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
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend == "triton":
        error = _extension.triton_error()
        if error is not None:
            return f"triton could not be imported ({error})"
        if device.type == "cpu" and not _extension.triton_interpreter():
            return ("the triton backend runs CPU tensors only under Triton's interpreter: set "
                    "TRITON_INTERPRET=1 in the environment before triton is imported (by "
                    "nllfused at its first triton call), or use backend='cpu' or 'torch'")
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend does not support {device.type} tensors"
        return None
    if device.type != backend:
        return f"backend={backend!r} runs {backend.upper()} tensors, but the input is on {device}"
    if backend == "cuda":
        if not _extension.build_info().get("cuda"):
            return "nllfused was built without CUDA kernels"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_code_reason(index)
    return None


@_extension.constant_under_compile
@functools.lru_cache(maxsize=None)
def _cuda_code_reason(index: int):
    """None if the build has code that GPU `index` runs, else why not (asked once per GPU)."""
    archs = _extension.build_info().get("cuda_archs", "")
    major, minor = torch.cuda.get_device_capability(index)
    if runs_on(archs, (major, minor)):
        return None
    return (f"nllfused's CUDA kernels were built for {archs or 'no architecture'}, which has no "
            f"code that runs on this GPU (sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST "
            f"including {major}.{minor}")


def runs_on(archs: str, capability) -> bool:
    """Whether a build for `archs` ("8.0;9.0;12.0+PTX", TORCH_CUDA_ARCH_LIST's syntax) has code a
    GPU of compute `capability` (major, minor) can run: a cubin for X.y runs on X.z with z >= y;
    PTX for X.y is compiled at load time for any later GPU."""
    for arch in filter(None, (a.strip() for a in archs.replace(" ", ";").split(";"))):
        ptx = arch.endswith("+PTX")
        major, minor = (int(v) for v in arch.removesuffix("+PTX").rstrip("af").split("."))
        if (ptx and tuple(capability) >= (major, minor)) or (
                capability[0] == major and capability[1] >= minor):
            return True
    return False


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for a call; raises if the named one cannot run here.

    auto: CPU tensors -> cpu (C++); CUDA tensors -> cuda where the build has code for the GPU,
    else triton; torch where nothing else is available (with a warning, once, if the extension
    did not load). Under forward-mode AD or torch.func transforms: torch (module docstring).
    """
    check_name(backend)
    if backend == "auto":
        if _extension.C_ERROR is not None:
            _warn_once_unbuilt()
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        backend = next((b for b in order if unavailable_reason(b, device) is None), "torch")
    else:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend != "torch" and transform_active():
        return "torch"
    return backend


@functools.lru_cache(maxsize=None)
def _warn_once_unbuilt() -> None:
    warnings.warn(f"nllfused: the compiled kernels could not be loaded ({_extension.C_ERROR}); "
                  f"backend='auto' falls back to the slow pure-torch reference. Reinstall "
                  f"nllfused against the installed torch {torch.__version__}.", RuntimeWarning,
                  stacklevel=3)


def available(device, reasons: bool = False):
    """The concrete backends that can run tensors on `device`; with reasons=True a dict of every
    concrete backend to None (available) or the sentence saying why not."""
    device = torch.device(device)
    why = {b: unavailable_reason(b, device) for b in BACKENDS[1:]}
    return why if reasons else [b for b, reason in why.items() if reason is None]
