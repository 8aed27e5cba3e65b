"""Argument checks of nllfused.linear_cross_entropy (nllfused/linear.py): its tensors and
options, autocast's casting as torch does it for F.linear, and the chunking arguments."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks
from .errors import ArgumentError, ArgumentTypeError, DimensionError, UnsupportedDtypeError

# torch.nn.LinearCrossEntropyOptions (torch >= 2.14): absent from older torch.
TORCH_OPTIONS = getattr(torch.nn, "LinearCrossEntropyOptions", None)


def device_type(t: Tensor) -> str:
    """t.device.type, without making a device object for CPU tensors (a small head's call)."""
    return "cpu" if t.is_cpu else t.device.type


def autocast_args(input, linear_weight, linear_bias):
    """Cast as torch's autocast would for F.linear; the loss then comes back in float32 (autocast
    runs cross_entropy in float32). float64 tensors are left alone, as autocast leaves them."""
    if not isinstance(input, Tensor) or not _checks.autocast_enabled(device_type(input)):
        return input, linear_weight, linear_bias, getattr(input, "dtype", None)
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    out_dtype = torch.float32 if input.is_floating_point() and input.dtype != torch.float64 \
        else input.dtype
    return cast(input), cast(linear_weight), cast(linear_bias), out_dtype


def check_arguments(input, linear_weight, target, linear_bias, weight, ignore_index,
                     label_smoothing, logit_scale, softcap):
    """Validate; return the (M, H) input, the (M,) int64 targets, the canonical class weight
    (accumulation dtype) and the op options (an Options record)."""
    dims = check_tensors(input, linear_weight, target, linear_bias)
    return canonical_arguments(input, target, dims, weight, ignore_index, label_smoothing,
                               logit_scale, softcap)


def canonical_arguments(input, target, dims, weight, ignore_index, label_smoothing, logit_scale,
                        softcap):
    """check_arguments after check_tensors (dims: what that returned)."""
    M, C, H = dims
    x = input.reshape(M, H)
    t = target.reshape(M)
    # The rest (target dtype and device, class weight shape/dtype/device, ignore_index, the
    # options) is cross_entropy's own check, run on a zero-stride stand-in for the (M, C) logits.
    stand_in = input.new_zeros(()).expand(M, C)
    call = _checks.canonicalize(stand_in, t, weight, ignore_index, label_smoothing, logit_scale,
                                softcap)
    return x, t.long(), call.weight, call.options


def check_tensors(input, linear_weight, target, linear_bias, match_dtypes: bool = True):
    """What F.linear and the targets' shape ask of the tensors (the rest is cross_entropy's, on
    the logits: check_arguments); return (M, C, H): rows, classes, in_features. Each test reads
    what it needs once: a small head's whole call is a few microseconds (linear.py)."""
    if not (isinstance(input, Tensor) and isinstance(linear_weight, Tensor)
            and isinstance(target, Tensor)):
        for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
            if not isinstance(t, Tensor):
                raise ArgumentTypeError(f"{name} must be a Tensor; got {type(t).__name__}")
    if linear_bias is not None and not isinstance(linear_bias, Tensor):
        raise ArgumentTypeError(
            f"linear_bias must be a Tensor or None; got {type(linear_bias).__name__}")
    dtype, shape, w_shape = input.dtype, input.shape, linear_weight.shape
    if dtype not in _checks.LOGIT_DTYPES:
        raise UnsupportedDtypeError(
            f"input must be float16, bfloat16, float32 or float64; got {dtype}")
    if not shape:
        raise ArgumentError("input is 0-dimensional: it must have shape (*, in_features), e.g. "
                            "(N, H) or (B, T, H)")
    if len(w_shape) != 2:
        raise ArgumentError(
            f"linear_weight must have shape (num_classes, in_features); got {tuple(w_shape)}")
    C, H = w_shape
    if shape[-1] != H:
        raise ArgumentError(
            f"input's last dimension ({shape[-1]}) must equal linear_weight's in_features "
            f"({H}): input {tuple(shape)}, linear_weight {tuple(w_shape)}")
    if C == 0:
        # torch: "Target 0 is out of bounds" (an IndexError)
        raise DimensionError("linear_weight has 0 rows: there must be at least one class")
    if linear_bias is not None and tuple(linear_bias.shape) != (C,):
        raise ArgumentError(
            f"linear_bias must have shape ({C},); got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if match_dtypes and t.dtype != dtype:
            raise ArgumentTypeError(
                f"{name} is {t.dtype} but input is {dtype}: they must match (or run "
                f"under torch.autocast), as in F.linear")
        if t.device != input.device:
            raise ArgumentError(f"{name} is on {t.device} but input is on {input.device}")
    lead = shape[:-1]
    # An unbatched (H,) input takes its class index as () or (1,), as torch's functions do --
    # but for one class, where (1,) is the logits' shape: probabilities to torch, which refuses
    # an integer dtype for them (nllfused.cross_entropy too, on the whole logits)
    if not lead and C == 1 and target.shape == (1,) and not target.is_floating_point():
        raise ArgumentTypeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{target.dtype}: one class, a target of the logits' shape (1,) holds probabilities; "
            f"a class index for an unbatched input has shape ()")
    if target.shape != lead and not (not lead and target.shape == (1,)):
        raise ArgumentError(
            f"target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(shape)}: class-index targets must have shape "
            f"{tuple(lead)} (the input's shape without in_features)")
    return math.prod(lead), C, H


def check_chunking(options, chunk_size) -> None:
    """options: torch's LinearCrossEntropyOptions or None; chunk_size: a positive int or None."""
    if options is not None and (TORCH_OPTIONS is None or not isinstance(options,
                                                                        TORCH_OPTIONS)):
        raise ArgumentTypeError(f"options must be a torch.nn.LinearCrossEntropyOptions or None; "
                                f"got {type(options).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size must be a positive int or None; got {chunk_size!r}")


def plain_small_head(input, linear_weight, target, linear_bias, options, chunk_size,
                     small_bytes: int, caps: dict) -> bool:
    """Whether a call can go straight to the whole logits (linear._whole_logits) before any
    option is checked -- nllfused.cross_entropy then checks them all, as the usual path would
    first (where a call has two faults the tensors' is named first): index targets of a 2-D
    head with classes, no chunking asked for, not compiling, the tensors fit for F.linear
    (check_tensors: its errors are the usual path's; under autocast their dtypes are
    F.linear's to cast, through autocast's cache of a leaf weight's cast), logits of at most
    small_bytes and the device type's cap in caps. Each test a few attribute reads: a small
    head's whole forward is ~20 microseconds."""
    if not (options is None and chunk_size is None and type(target) is Tensor
            and not target.is_floating_point() and type(linear_weight) is Tensor
            and linear_weight.dim() == 2 and linear_weight.shape[0] > 0
            and type(input) is Tensor and not torch.compiler.is_compiling()
            and small_logits(math.prod(input.shape[:-1]), linear_weight.shape[0], input,
                             small_bytes, caps)):
        return False
    check_tensors(input, linear_weight, target, linear_bias,
                  match_dtypes=not _checks.autocast_enabled(device_type(input)))
    return True


def small_logits(M: int, C: int, input: Tensor, small_bytes: int, caps: dict) -> bool:
    """Whether the (M, C) logits are small enough to be made whole (linear._whole_logits): at
    most small_bytes, and within one chunk's cap for the device type (caps)."""
    nbytes = M * C * input.element_size()
    return nbytes <= min(small_bytes, caps.get(device_type(input), nbytes))
