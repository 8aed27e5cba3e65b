"""nllfused's exception classes.

torch's losses raise RuntimeError for most bad arguments (and ValueError or TypeError for some);
nllfused raises these, which are both, so that code written against torch (`except
RuntimeError`) and code that expects the Python convention (`except ValueError`) both catch them.
Out-of-range class indices raise IndexError, as torch does (and RuntimeError, as torch under
torch.func.vmap); where torch raises a narrower class (NotImplementedError for integer logits,
IndexError for a 0-d input), the error is that too.
"""


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype."""


class UnsupportedDtypeError(ArgumentTypeError, NotImplementedError):
    """Logits of a dtype no kernel takes (torch: NotImplementedError, "not implemented for
    'Long'")."""


class UnsupportedLayoutError(ArgumentTypeError, NotImplementedError):
    """A sparse or other non-strided tensor (torch: NotImplementedError for sparse logits)."""


class DimensionError(ArgumentError, IndexError):
    """A tensor without the dimension the call needs (torch: IndexError, "Dimension out of
    range")."""


class TargetIndexError(IndexError, RuntimeError):
    """A class index outside [0, C) that is not ignore_index (torch: IndexError, "Target 5 is out
    of bounds"; RuntimeError under torch.func.vmap)."""
