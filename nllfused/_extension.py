"""What this installation can run: the compiled extension nllfused._C and Triton.

Loading _C registers the op schemas (csrc/ops.cpp) and the C++/CUDA kernels; build_info() says
how it was built. Both facts are fixed at import, so nothing later asks the dispatcher.
"""
from __future__ import annotations

try:
    from . import _C
    C_ERROR = None
    # the CPU kernels' NLLFUSED_* settings, read here with the GIL held (csrc/cpu/settings.h;
    # an extension built before it reads them itself)
    getattr(_C, "reload_cpu_env", lambda: None)()
except ImportError as exc:  # a source tree that was never built
    _C = None
    C_ERROR = exc

try:
    from .kernels import cross_entropy as triton_kernels
    TRITON_ERROR = None
except Exception as exc:  # triton missing or broken: backend="triton" reports it when asked for
    triton_kernels = None
    TRITON_ERROR = exc


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels were compiled, archs."""
    if _C is None:
        return {"built": False, "error": str(C_ERROR)}
    return {"built": True, **_C.build_info()}


def triton_interpreter() -> bool:
    """Whether the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return triton_kernels is not None and triton_kernels.INTERPRETER
