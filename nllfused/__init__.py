"""nllfused: fused log-softmax + NLL (cross-entropy) for PyTorch with torch's exact semantics.

    import nllfused
    loss = nllfused.cross_entropy(logits, target)          # like F.cross_entropy
    criterion = nllfused.CrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
"""
from . import distributed  # noqa: F401  (nllfused.distributed.vocab_parallel_cross_entropy)
from ._extension import build_info
from .backends import available as available_backends
from .errors import ArgumentError, ArgumentTypeError
from .functional import cross_entropy, set_target_check
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["cross_entropy", "CrossEntropyLoss", "linear_cross_entropy", "LinearCrossEntropyLoss",
           "set_target_check", "available_backends", "build_info", "ArgumentError",
           "ArgumentTypeError"]
