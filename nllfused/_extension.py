"""What this installation can run: the compiled extension nllfused._C and Triton.

Loading _C registers the op schemas (csrc/ops.cpp) and the C++/CUDA kernels; build_info() says
how it was built, fixed at import, so nothing later asks the dispatcher.

Triton is imported when first asked for -- triton_kernels, TRITON_ERROR, triton_interpreter(),
i.e. a triton backend call, a CUDA call that may take Triton's kernels, or a vocabulary-parallel
call on CUDA -- not by `import nllfused`: it costs ~75 MiB of memory and ~0.1 s, which a user
of the C++ kernels on the CPU never needs. Then, once, the attributes are set for good.
"""
from __future__ import annotations

import importlib.util

try:
    from . import _C
    C_ERROR = None
    # the CPU kernels' NLLFUSED_* settings, read here with the GIL held (csrc/cpu/settings.h;
    # an extension built before it reads them itself)
    getattr(_C, "reload_cpu_env", lambda: None)()
except ImportError as exc:  # a source tree that was never built
    _C = None
    C_ERROR = exc

# Whether a triton package is installed at all (nothing imported): ops.py registers its lazy
# launchers for the Triton ops where it is.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _import_triton() -> None:
    """Sets triton_kernels (kernels/cross_entropy.py) and TRITON_ERROR (None, or why triton
    did not import: backend="triton" reports it when asked for)."""
    try:
        from .kernels import cross_entropy
        kernels, error = cross_entropy, None
    except Exception as exc:  # triton missing or broken
        kernels, error = None, exc
    globals().update(triton_kernels=kernels, TRITON_ERROR=error)


def constant_under_compile(fn):
    """fn, marked as torch.compiler.assume_constant_result marks it (torch.compile calls it
    while tracing and takes its result as a constant), without importing torch._dynamo as that
    does: ~150 MiB and ~1 s that an eager user would pay at `import nllfused`
    (tests/test_import.py checks the two agree)."""
    fn._dynamo_marked_constant = True
    return fn


def _triton_attr(name: str):
    if name not in globals():
        _import_triton()
    return globals()[name]


@constant_under_compile
def triton_error():
    """None if triton imports, else why not (a str): what the backend checks ask, under
    torch.compile too."""
    error = _triton_attr("TRITON_ERROR")
    return None if error is None else str(error)


def __getattr__(name: str):
    # (PEP 562: called for an attribute not yet set, from outside this module)
    if name in ("triton_kernels", "TRITON_ERROR"):
        return _triton_attr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels were compiled, archs."""
    if _C is None:
        return {"built": False, "error": str(C_ERROR)}
    return {"built": True, **_C.build_info()}


@constant_under_compile
def triton_interpreter() -> bool:
    """Whether the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1 when they
    were imported)."""
    kernels = _triton_attr("triton_kernels")
    return kernels is not None and kernels.INTERPRETER
