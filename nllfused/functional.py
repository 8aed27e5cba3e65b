"""nllfused.cross_entropy: torch.nn.functional.cross_entropy's signature and results, fused.

The data path: argument checks (_checks) -> backend choice (backends) -> per-row op (ops: ce_fwd*,
whose autograd runs ce_bwd*) -> the z-loss term and the reduction (backends.torch_ref.reduce, a
few O(rows) torch ops). Calls torch's own cross_entropy could make, with nothing to check or
convert, skip all of that: one dispatcher call to nllfused::cross_entropy_loss (csrc/loss.cpp),
which runs the same per-row op and reduction, and its autograd, in C++. For CPU tensors even the
decision is C++ (csrc/one_call.cpp), so that a 10-class batch costs what torch's call costs.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _checks, _extension, backends, ops, stats
from .backends import torch_ref

_CHECK_TARGETS_ON_GPU = False


# Compiled autograd's module, looked up in sys.modules where the call checks whether it is on:
# it cannot be before the module is imported, and importing it (torch._dynamo) here would cost
# every eager user ~150 MiB and ~1 s.
_COMPILED_AUTOGRAD = "torch._dynamo.compiled_autograd"
_MODULES = sys.modules


def set_target_check(enabled: bool) -> None:
    """Opt in (or out) of checking class indices of GPU tensors on the host before each call.

    Out-of-range targets always raise IndexError for CPU tensors. On the GPU the kernels never
    read out of bounds and turn the offending rows into NaN losses (so the loss is visibly
    non-finite); with this check on, an IndexError is raised instead, at the price of one host
    synchronisation per call.
    """
    global _CHECK_TARGETS_ON_GPU
    _CHECK_TARGETS_ON_GPU = bool(enabled)


def target_check_wanted(device: torch.device) -> bool:
    """Whether class indices on `device` are checked on the host (always on the CPU). Not under
    torch.compile, whose graphs cannot branch on tensor values; under torch.func transforms the
    check reads the values beneath their wrappers (_checks.check_target_range)."""
    return (device.type == "cpu" or _CHECK_TARGETS_ON_GPU) and not torch.compiler.is_compiling()


def output_dtype(call: _checks.Call, device: torch.device) -> torch.dtype:
    """The result's dtype: the input's (or promoted with soft targets), as torch; float32 under
    autocast for 16-bit logits (_checks.autocast_dtype)."""
    return _checks.autocast_dtype(call.out_dtype, device)


_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction's numbering
_NUMBERS = (int, float)
_LOGIT_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                 torch.float32: torch.float32, torch.float64: torch.float64}  # -> accumulation


def _one_call_op():
    """nllfused::cross_entropy_loss's C++ callable: the OpOverload's own _op, which its __call__
    wraps in one more Python frame (a tenth of a small call); the overload itself where a torch
    lacks that attribute."""
    global _ONE_CALL_OP
    if _ONE_CALL_OP is None:
        overload = torch.ops.nllfused.cross_entropy_loss.default
        _ONE_CALL_OP = getattr(overload, "_op", overload)
    return _ONE_CALL_OP


_ONE_CALL_OP = None


def _no_one_call(*args):
    return None


# The C++ entry of the one-call path for CPU tensors (csrc/one_call.cpp): the loss, or None where
# the general path must run. The rules of _one_call_reduction, which serves CUDA tensors, and
# more: probability targets and unbatched (C,) inputs (the loss alone).
_one_call_cpu = (_no_one_call if _extension._C is None
                 else _extension._C.cross_entropy_one_call)


def _one_call_reduction(input, target, weight, size_average, reduce, reduction, ignore_index,
                        label_smoothing, z_loss, logit_scale, softcap, backend):
    """For CUDA tensors: at::Reduction's number if this call can go to
    nllfused::cross_entropy_loss in one dispatcher call (csrc/loss.cpp: the C++ kernels, reduction
    and autograd in C++), else None. (CPU tensors: _one_call_cpu, the same rules in C++.)

    Only calls that torch's own cross_entropy could make and that need nothing from the checks
    and conversions of the general path: every test is an attribute read. Anything else -- a bad
    argument included, and every call while set_target_check(True) asks for the host check --
    takes the general path, which names the problem."""
    if (type(input) is not torch.Tensor or type(target) is not torch.Tensor
            or input.device.type != "cuda"
            or target.dtype is not torch.int64 or size_average is not None or reduce is not None
            or softcap is not None or type(reduction) is not str or type(ignore_index) is not int
            or not -2 ** 63 <= ignore_index < 2 ** 63 or _CHECK_TARGETS_ON_GPU
            or type(label_smoothing) not in _NUMBERS or not 0 <= label_smoothing <= 1
            or type(z_loss) not in _NUMBERS or z_loss != 0
            or type(logit_scale) not in _NUMBERS or logit_scale != 1):
        return None
    code = _REDUCTION_CODES.get(reduction)
    acc = _LOGIT_DTYPES.get(input.dtype)
    shape, t_shape = input.shape, target.shape
    if code is None or acc is None or len(shape) < 2 or shape[1] == 0:
        return None
    # (sparse tensors, an expanded view past int64 bytes: the general path names the problem)
    if (input.layout is not torch.strided or target.layout is not torch.strided
            or _checks.storage_overflows(input)):
        return None
    if len(shape) == 2:
        if len(t_shape) != 1 or t_shape[0] != shape[0]:
            return None
    elif t_shape != shape[:1] + shape[2:]:
        return None
    device = input.device
    # "auto", or the backend this path runs anyway: "cuda" where auto picks it
    if (backend != "auto" and backend != device.type) or target.device != device:
        return None
    if weight is not None and not (
            type(weight) is torch.Tensor and weight.dtype is acc and weight.dim() == 1
            and weight.shape[0] == shape[1] and weight.device == device
            and not weight.requires_grad and weight.is_contiguous()):
        return None
    if backends.resolve("auto", device) != "cuda":
        return None
    if torch.compiler.is_compiling() or backends.transform_active():
        return None
    return code


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average=None, ignore_index: int = -100, reduce=None,
                  reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  logit_scale: float = 1.0, softcap: Optional[float] = None,
                  backend: str = "auto", return_stats=False, return_z_loss: bool = False,
                  return_lse: bool = False):
    """Cross-entropy between logits and class-index or class-probability targets.

    Same arguments, results, shapes and dtypes as torch.nn.functional.cross_entropy, plus:
      z_loss       adds z_loss * lse^2 to each counted row's loss (PaLM's auxiliary loss);
                   under 'mean' averaged over the counted rows, whatever the class weights;
      logit_scale  multiplies the logits first (1/T for a temperature T);
      softcap      if given, s * tanh(x / s) is applied after logit_scale (Gemma 2);
      backend      "auto", "torch", "triton", "cpu" or "cuda" (see nllfused.backends);
      return_stats True, a name or names of nllfused.stats.NAMES: returns (loss, stats), stats
                   a nllfused.stats.CrossEntropyStats (lse, z_loss, predicted, correct,
                   entropy, target_logprob; entropy and target_logprob differentiable);
      return_z_loss, return_lse  (Liger-Kernel's and quack's names) append the reduced z-loss
                   term and the per-row lse to the result: (loss, [z_loss], [lse]).
    """
    if size_average is not None or reduce is not None:
        # torch's deprecated pair, resolved (and warned about) once, here: the one-call path
        # then takes the call as it takes the reduction it stands for
        reduction = _checks.resolve_reduction(size_average, reduce, reduction)
        size_average = reduce = None
    want_stats = return_stats or return_z_loss or return_lse
    # (Under compiled autograd the general path: its backward is registered in Python, which
    # compiled autograd traces (ops._eager: a create_graph backward runs eagerly); the one-call
    # nodes' functional form (csrc/compiled_node.h) serves forwards that ran before it was
    # enabled.)
    ca = _MODULES.get(_COMPILED_AUTOGRAD)  # compiled autograd's module, if imported
    if not torch.compiler.is_compiling() and _forward_ad._current_level < 0 and \
            (ca is None or not ca.compiled_autograd_enabled):
        if not want_stats:
            # CPU tensors: the checks and the call in C++ (csrc/one_call.cpp); None: not one-call
            loss = _one_call_cpu(input, target, weight, size_average, ignore_index, reduce,
                                 reduction, label_smoothing, z_loss, logit_scale, softcap,
                                 backend, 0)
            if loss is not None:
                return loss
            code = _one_call_reduction(input, target, weight, size_average, reduce, reduction,
                                       ignore_index, label_smoothing, z_loss, logit_scale,
                                       softcap, backend)
            if code is not None:  # (under autocast: 16-bit logits' loss in float32)
                return _one_call_op()(input, target, weight, code, ignore_index,
                                      label_smoothing, 0.0, 1.0, 0.0,
                                      _checks.autocast_dtype(input.dtype, input.device))
        elif not (return_z_loss or return_lse):
            # CPU tensors with return_stats: loss and statistics from one C++ call
            # (csrc/loss_stats.cpp), where the call is one the one-call path takes.
            names = stats.requested(return_stats, False)
            out = _one_call_cpu(input, target, weight, size_average, ignore_index, reduce,
                                reduction, label_smoothing, z_loss, logit_scale, softcap,
                                backend, stats.mask(names))
            if out is not None:
                return out[0], stats.from_one_call(names, out[1:])
        elif not return_stats:
            # return_z_loss / return_lse alone: the same call, its z-loss term and its lse
            # rows (stats.LSE_ROWS); with z_loss, logit_scale, softcap too
            want = (stats.mask({"z_loss"}) if return_z_loss else 0) | (
                stats.LSE_ROWS if return_lse else 0)
            out = _one_call_cpu(input, target, weight, size_average, ignore_index, reduce,
                                reduction, label_smoothing, z_loss, logit_scale, softcap,
                                backend, want)
            if out is not None:
                return (out[0], *([out[2]] if return_z_loss else []),
                        *([out[1]] if return_lse else []))
    if (isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled()
            and isinstance(target, torch.Tensor) and target.is_floating_point() and not want_stats
            and z_loss == 0 and logit_scale == 1 and softcap is None):
        # learned class weights with probability targets: torch differentiates them, the kernels
        # take them as constants (_checks.check_weight_not_learned), so torch's own call serves
        backends.check_name(backend)
        return torch.nn.functional.cross_entropy(input, target, weight, size_average,
                                                 ignore_index, reduce, reduction, label_smoothing)
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    label_smoothing, z_loss, logit_scale, softcap = _checks.check_options(
        label_smoothing, z_loss, logit_scale, softcap)
    if (_checks.traced_ignore_index(ignore_index) and not want_stats and z_loss == 0
            and logit_scale == 1 and softcap is None):
        # a tensor or NumPy ignore_index under torch.compile (_checks.traced_ignore_index):
        # torch's own op takes it, with the results nllfused gives in eager mode
        backends.check_name(backend)
        return torch.nn.functional.cross_entropy(input, target, weight, None, ignore_index, None,
                                                 reduction, label_smoothing)
    ignore_index = _checks.check_ignore_index(ignore_index)
    if not want_stats and _checks.nothing_to_compute(input, target, ignore_index, z_loss):
        # torch's own call gives the results (empty, 0 or NaN)
        backends.check_name(backend)
        return torch.nn.functional.cross_entropy(input, target, weight, None, ignore_index, None,
                                                 reduction, label_smoothing)
    call = _checks.canonicalize(input, target, weight, ignore_index, label_smoothing,
                                logit_scale, softcap)
    backend = backends.resolve(backend, input.device)
    prob_target = call.options.prob_target
    # The C++ CPU kernel checks every class index in its own pass (IndexError): no extra pass.
    if not prob_target and backend != "cpu" and target_check_wanted(input.device):
        _checks.check_target_range(target, call.num_classes, ignore_index)
    names, kernel_stats = frozenset(), None
    if want_stats:
        stats.check_returns(return_stats, return_z_loss, return_lse)
        names = stats.requested(return_stats, prob_target)
        if return_z_loss:
            names = names | {"z_loss"}
        kernel_stats = stats.from_kernel(names, backend)
    if kernel_stats is not None:   # the statistics from the forward's own pass
        loss, lse, aux, *kernel_stats = kernel_stats(call.logits, call.target, call.weight,
                                                     *call.options, **stats.kernel_flags(names))
    else:
        forward, _ = ops.for_backend(backend)
        loss, lse, aux = forward(call.logits, call.target, call.weight, *call.options)
    counted = None if prob_target or not z_loss else \
        torch_ref.not_ignored(call.target, ignore_index)
    out = torch_ref.reduce(loss, lse, aux, reduction, prob_target, z_loss, counted)
    if reduction == "none":
        out = out.reshape(call.out_shape)
    out = out.to(output_dtype(call, input.device))
    if not want_stats:
        return out
    return _with_stats(out, call, lse, reduction, z_loss, names, kernel_stats, return_stats,
                       return_z_loss, return_lse)


def _with_stats(loss, call: _checks.Call, lse, reduction, z_loss, names, kernel_stats,
                return_stats, return_z_loss, return_lse):
    """(loss, CrossEntropyStats) for return_stats, else the loss followed by the reduced z-loss
    term and the per-row lse, as return_z_loss / return_lse ask (nllfused/stats.py)."""
    rows = stats.per_row(names, call.logits, call.target, lse, call.options, z_loss,
                         *(kernel_stats or ()))
    result = stats.reduce(rows, call.target, call.options, reduction, call.out_shape)
    if return_stats:
        return loss, result
    out = [loss]
    if return_z_loss:
        out.append(result.z_loss)
    if return_lse:  # per row, whatever the reduction (quack, flash-attention)
        out.append(lse.detach().to(torch_ref.acc_dtype(call.logits.dtype)).reshape(
            call.out_shape))
    return tuple(out)
