"""nllfused: fused log-softmax + NLL (cross-entropy) for PyTorch with torch's exact semantics.

    import nllfused
    loss = nllfused.cross_entropy(logits, target)          # like F.cross_entropy
    criterion = nllfused.CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
"""
from . import ops  # noqa: F401  (registers the ops, their fake kernels and autograd)
from . import distributed  # noqa: F401  (nllfused.distributed.vocab_parallel_cross_entropy)
from .backends import available as available_backends
from .functional import cross_entropy, set_target_check
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels were compiled, archs."""
    if ops._C is None:
        return {"built": False, "error": str(ops.EXTENSION_ERROR)}
    return {"built": True, **ops._C.build_info()}


__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "set_target_check", "available_backends", "build_info"]
