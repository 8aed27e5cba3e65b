"""The fused ops: nllfused::ce_fwd / ce_bwd (C++ and CUDA) and ce_fwd_triton / ce_bwd_triton.

The schemas and the C++/CUDA kernels come from the extension nllfused._C (csrc/ops.cpp holds the
contract). This module registers, once for every op pair, what the extension-cpp pattern keeps in
Python: the Triton kernels, the fake implementations that torch.compile traces with, and the
autograd formula; `for_backend` maps a backend name to its forward and backward callables.
"""
from __future__ import annotations

import torch

from . import _extension
from ._checks import Options
from .backends import torch_ref

_PAIRS = {"cpu": ("ce_fwd", "ce_bwd"), "cuda": ("ce_fwd", "ce_bwd"),
          "triton": ("ce_fwd_triton", "ce_bwd_triton")}


_STATS_PAIRS = {"cpu": ("ce_fwd_stats", "ce_bwd_stats"),
                "cuda": ("ce_fwd_stats", "ce_bwd_stats"),  # the same ops, their CUDA kernels
                "triton": ("ce_fwd_stats_triton", "ce_bwd_stats_triton")}


def triton_for_cuda(backend: str) -> str:
    """The backend whose kernels serve `backend` for what the CUDA C++ kernels lack -- a
    backward that writes over its input, and a statistics pass where the extension was built
    without one: its own, but Triton's (the same contract and results) for cuda where Triton
    loads, so that such a GPU call still reads its logits once and holds no second chunk-sized
    buffer."""
    if backend == "cuda" and _extension.triton_error() is None:
        return "triton"
    return backend


def stats_for_backend(backend: str):
    """The forward with statistics (ce_fwd_stats's outputs, csrc/ops.cpp) of a backend whose
    kernels compute them in their own pass (cuda without such kernels: Triton's, as
    triton_for_cuda says), else None (nllfused/stats.py then computes them)."""
    if backend == "torch":
        return torch_ref.forward_stats
    pair = _stats_pair(backend)
    return None if pair is None else getattr(torch.ops.nllfused, pair[0])


def stats_backward_for_backend(backend: str):
    """The backward with statistics' gradients (ce_bwd_stats, csrc/ops.cpp) of a backend whose
    kernels have one (as stats_for_backend), else None."""
    pair = _stats_pair(backend)
    return None if pair is None else getattr(torch.ops.nllfused, pair[1])


def _stats_pair(backend: str):
    """The (forward, backward) statistics op names serving `backend`: its own where its kernels
    have them, else Triton's for cuda (triton_for_cuda); None where no kernels do."""
    if backend not in _STATS_BACKENDS:
        backend = triton_for_cuda(backend)
    return _STATS_PAIRS.get(backend) if backend in _STATS_BACKENDS else None


def for_backend(backend: str):
    """(forward, backward) callables of a concrete backend, both taking csrc/ops.cpp's arguments;
    the torch backend has no backward callable (autograd differentiates its forward)."""
    if backend == "torch":
        return torch_ref.forward, None
    fwd, bwd = _PAIRS[backend]
    return getattr(torch.ops.nllfused, fwd), getattr(torch.ops.nllfused, bwd)


_INPLACE = {"cpu": "ce_bwd_inplace", "cuda": "ce_bwd_inplace", "triton": "ce_bwd_inplace_triton"}


def inplace_backward_for_backend(backend: str):
    """ce_bwd_inplace (csrc/ops.cpp) of a fused backend: ce_bwd's gradient written over the
    logits; None for the torch backend or an extension built without the op."""
    name = _INPLACE.get(backend)
    if name is None or not hasattr(torch.ops.nllfused, name):
        return None
    if backend == "triton" and _extension.triton_error() is not None:
        return None
    return getattr(torch.ops.nllfused, name)


def _one_device(first, *others):
    """As the kernels require (and torch's ops say): every tensor on the first one's device. A
    meta tensor among CPU ones sends a call here, whose outputs would be CPU garbage."""
    for t in others:
        if isinstance(t, torch.Tensor):
            torch._check(t.device == first.device, lambda: (
                f"Expected all tensors to be on the same device, but found at least two "
                f"devices, {first.device} and {t.device}!"))


def _fwd_fake(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
              prob_target):
    _one_device(logits, target, weight)
    torch._check(logits.dim() == 3, lambda: f"logits must be (N, C, D), got {logits.shape}")
    N, C, D = logits.shape
    if prob_target:
        torch._check(target.shape == logits.shape, lambda: "probability targets: (N, C, D)")
    else:
        torch._check(target.dim() == 2 and target.shape[0] == N and target.shape[1] == D,
                     lambda: f"index targets must be (N, D), got {target.shape}")
    if weight is not None:
        torch._check(weight.shape == (C,), lambda: f"weight must be (C,), got {weight.shape}")
    loss = logits.new_empty((N, D), dtype=torch_ref.acc_dtype(logits.dtype))
    return loss, logits.new_empty((N, D), dtype=torch.float64), torch.empty_like(loss)


def _fwd_stats_fake(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                    prob_target, with_entropy=True, with_predicted=True):
    loss, lse, aux = _fwd_fake(logits, target, weight, ignore_index, label_smoothing,
                               logit_scale, softcap, prob_target)
    return (loss, lse, aux, torch.empty_like(loss), torch.empty_like(loss),
            loss.new_empty(loss.shape, dtype=torch.int64))


def _bwd_stats_fake(grad_loss, grad_lse, grad_entropy, grad_target_logp, logits, *rest):
    _one_device(logits, grad_loss, grad_lse, grad_entropy, grad_target_logp, *rest)
    return logits.new_empty(logits.shape)


def _bwd_fake(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index,
              label_smoothing, logit_scale, softcap, prob_target):
    _one_device(logits, grad_loss, grad_lse, target, weight, lse, aux)
    torch._check(grad_loss.shape == lse.shape, lambda: "grad_loss must be (N, D)")
    return logits.new_empty(logits.shape)


def _bwd_inplace_fake(grad_loss, grad_lse, logits, *rest):
    _one_device(logits, grad_loss, grad_lse, *rest)
    return None


def _loss_fake(input, target, weight, reduction, ignore_index, label_smoothing, z_loss=0.0,
               logit_scale=1.0, softcap=0.0, dtype=None):
    """nllfused::cross_entropy_loss (csrc/loss.cpp): a scalar, or one loss per row under
    reduction 0 ('none'), in dtype, else the input's dtype (promoted with probability
    targets')."""
    _one_device(input, target, weight)
    torch._check(input.dim() >= 1, lambda: "input must have a class dimension")
    if target.is_floating_point():
        matches = target.shape == input.shape
    elif input.dim() == 1:
        matches = target.dim() <= 1 and target.numel() == 1
    else:
        matches = target.shape == input.shape[:1] + input.shape[2:]
    torch._check(matches, lambda: f"size mismatch (got input: {list(input.shape)}, target: "
                                  f"{list(target.shape)})")  # as csrc/loss.h, check_target_shape
    if not target.is_floating_point():
        return input.new_empty(target.shape if reduction == 0 else (), dtype=dtype or input.dtype)
    rows = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
    dtype = dtype or torch.promote_types(input.dtype, target.dtype)
    return input.new_empty(rows if reduction == 0 else (), dtype=dtype)


def _loss_stats_fake(input, target, weight, reduction, ignore_index, label_smoothing, want,
                     z_loss=0.0, logit_scale=1.0, softcap=0.0):
    """nllfused::cross_entropy_loss_stats (csrc/loss_stats.cpp): the loss as _loss_fake, then
    per statistic (stats.NAMES order) its reduced value, or an empty (0,) tensor where `want`
    lacks its bit; lse per row where `want` has bit 6 (stats.LSE_ROWS)."""
    loss = _loss_fake(input, target, weight, reduction, ignore_index, label_smoothing)
    acc = torch_ref.acc_dtype(input.dtype)
    rows, scalar = tuple(target.shape), reduction == 0
    lse_rows = want >> 6 & 1
    shapes = {"lse": (rows if scalar or lse_rows else (), acc),
              "predicted": (rows, torch.int64),
              "correct": (rows, torch.bool) if scalar else
                         ((), torch.float32 if reduction == 1 else torch.int64)}
    out = [loss]
    for i, name in enumerate(("lse", "z_loss", "predicted", "correct", "entropy",
                              "target_logprob")):
        shape, dtype = shapes.get(name, (rows if scalar else (), acc))
        present = want >> i & 1 or (i == 0 and lse_rows)
        out.append(input.new_empty(shape if present else (0,), dtype=dtype if present else acc))
    return tuple(out)


def _setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    _, lse, aux = output
    ctx.save_for_backward(logits, target, weight, lse, aux)
    # aux (the target's weight) does not depend on the logits: no gradient flows through it, as
    # in the torch reference (aux.detach()). Differentiable, it would take a double backward of
    # the 'mean' (divided by aux.sum()) into this node with only aux's gradient, for which it
    # returns None -- and compiled autograd then adds None to the logits' other gradient.
    ctx.mark_non_differentiable(aux)
    ctx.options = Options(*options)
    ctx.set_materialize_grads(False)  # an unused loss or lse gets None, not a zero tensor


def _eager(vjp):
    """vjp, run eagerly where dynamo traces this backward (compiled autograd): there the torch
    reference's autograd.Functions (lse, entropy) inside the nested torch.autograd.grad lose
    their own gradient, and a double backward through the lse / entropy terms silently gave
    wrong numbers. (A graph break, for create_graph=True only; torch.compiler.disable imports
    torch._dynamo, which is loaded already whenever this runs under it.)"""
    return torch.compiler.disable(vjp) if torch.compiler.is_compiling() else vjp


def _make_backward(bwd_op):
    def backward(ctx, grad_loss, grad_lse, _grad_aux):
        logits, target, weight, lse, aux = ctx.saved_tensors
        wants_logits, wants_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wants_target = wants_target and ctx.options.prob_target
        if grad_loss is None and grad_lse is None:
            return (None,) * 8
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must be differentiable itself (double backward,
            # Hessian-vector products), so differentiate the torch formulas instead.
            grad_logits, grad_target = _eager(torch_ref.vjp)(
                grad_loss, grad_lse, logits, target, weight, ctx.options, wants_logits,
                wants_target)
            return grad_logits, grad_target, *(None,) * 6
        if grad_loss is None:
            grad_loss = torch.zeros_like(aux)
        grad_logits = grad_target = None
        if wants_logits:
            grad_logits = bwd_op(grad_loss, grad_lse, logits, target, weight, lse, aux,
                                 *ctx.options)
        if wants_target:
            # Rare (soft targets that require grad), so plain torch; it reads the logits again.
            grad_target = torch_ref.soft_target_grad(grad_loss, logits, lse, weight,
                                                     ctx.options).to(target.dtype)
        return grad_logits, grad_target, *(None,) * 6
    return backward


def _setup_stats_context(ctx, inputs, output):
    logits, target, weight, *options, with_entropy, _ = inputs
    _, lse, aux, entropy, _, _ = output
    ctx.save_for_backward(logits, target, weight, lse, aux, entropy)
    ctx.mark_non_differentiable(aux)  # (as in _setup_context)
    ctx.options = Options(*options)
    ctx.with_entropy = with_entropy  # else the entropy output is a constant 0
    ctx.set_materialize_grads(False)


def _make_stats_backward(bwd_op):
    def backward(ctx, grad_loss, grad_lse, _grad_aux, grad_entropy, grad_tlp, _grad_pred):
        return _stats_backward(bwd_op, ctx, grad_loss, grad_lse, grad_entropy, grad_tlp)
    return backward


def _stats_backward(bwd_op, ctx, grad_loss, grad_lse, grad_entropy, grad_tlp):
    """The autograd formula of ce_fwd_stats(_triton): ce_bwd_stats(_triton), and the soft
    targets' gradient as for ce_fwd (entropy and target log-prob do not depend on the targets'
    values)."""
    logits, target, weight, lse, aux, entropy = ctx.saved_tensors
    wants_logits = ctx.needs_input_grad[0]
    wants_target = ctx.needs_input_grad[1] and ctx.options.prob_target
    if not ctx.with_entropy:
        grad_entropy = None
    grads = (grad_loss, grad_lse, grad_entropy, grad_tlp)
    none = (None,) * 8  # weight, the options, with_entropy, with_predicted
    if all(g is None for g in grads):
        return None, None, *none
    if torch.is_grad_enabled():  # create_graph=True: see _make_backward
        grad_logits, grad_target = _eager(torch_ref.vjp_stats)(
            grads, logits, target, weight, ctx.options, wants_logits, wants_target)
        return grad_logits, grad_target, *none
    if grad_loss is None:
        grad_loss = torch.zeros_like(aux)
    grad_logits = grad_target = None
    if wants_logits:
        grad_logits = bwd_op(grad_loss, grad_lse, grad_entropy, grad_tlp, logits, target, weight,
                             lse, aux, entropy, *ctx.options)
    if wants_target:
        grad_target = torch_ref.soft_target_grad(grad_loss, logits, lse, weight,
                                                 ctx.options).to(target.dtype)
    return grad_logits, grad_target, *none


# An extension built before the statistics ops existed (an in-place build not yet redone) still
# loads; statistics then come from nllfused/stats.py's torch path.
_HAS_STATS_OPS = _extension.C_ERROR is None and hasattr(torch.ops.nllfused, "ce_fwd_stats_triton")
_HAS_CPU_STATS_OPS = _extension.C_ERROR is None and hasattr(torch.ops.nllfused, "ce_fwd_stats")
_HAS_CUDA_STATS_OPS = _HAS_CPU_STATS_OPS and bool(_extension.build_info().get("cuda_stats"))
# The backends whose kernels give the statistics (stats_for_backend).
_STATS_BACKENDS = (({"triton"} if _HAS_STATS_OPS else set())
                   | ({"cpu"} if _HAS_CPU_STATS_OPS else set())
                   | ({"cuda"} if _HAS_CUDA_STATS_OPS else set()))


def _triton_launcher(name: str):
    """The Triton op's kernel: kernels/cross_entropy.py's launcher `name`, that module imported
    at the first call (nllfused/_extension.py)."""
    def launch(*args, **kwargs):
        kernels = _extension.triton_kernels
        if kernels is None:
            raise RuntimeError(f"triton could not be imported ({_extension.triton_error()})")
        return getattr(kernels, name)(*args, **kwargs)
    launch.__name__ = name
    return launch


def _register():
    if _extension.C_ERROR is not None:
        return
    if _extension.TRITON_INSTALLED:
        triton_ops = {"ce_fwd_triton": "ce_fwd", "ce_bwd_triton": "ce_bwd",
                      "ce_bwd_inplace_triton": "ce_bwd_inplace",
                      "ce_fwd_stats_triton": "ce_fwd_stats", "ce_bwd_stats_triton": "ce_bwd_stats"}
        for op, launcher in triton_ops.items():
            if hasattr(torch.ops.nllfused, op):
                torch.library.register_kernel(f"nllfused::{op}", ("cpu", "cuda"),
                                              _triton_launcher(launcher))
    for fwd, bwd in dict.fromkeys(_STATS_PAIRS[b] for b in sorted(_STATS_BACKENDS)):
        torch.library.register_fake(f"nllfused::{fwd}", _fwd_stats_fake)
        torch.library.register_fake(f"nllfused::{bwd}", _bwd_stats_fake)
        torch.library.register_autograd(f"nllfused::{fwd}",
                                        _make_stats_backward(getattr(torch.ops.nllfused, bwd)),
                                        setup_context=_setup_stats_context)
    for name in dict.fromkeys(_INPLACE.values()):
        if hasattr(torch.ops.nllfused, name):
            torch.library.register_fake(f"nllfused::{name}", _bwd_inplace_fake)
    # Its autograd is C++ (csrc/loss.cpp); only the fake is Python, as for every op here.
    torch.library.register_fake("nllfused::cross_entropy_loss", _loss_fake)
    if hasattr(torch.ops.nllfused, "cross_entropy_loss_stats"):
        torch.library.register_fake("nllfused::cross_entropy_loss_stats", _loss_stats_fake)
    for fwd, bwd in dict.fromkeys(_PAIRS.values()):  # cpu and cuda share one op pair
        torch.library.register_fake(f"nllfused::{fwd}", _fwd_fake)
        torch.library.register_fake(f"nllfused::{bwd}", _bwd_fake)
        torch.library.register_autograd(f"nllfused::{fwd}",
                                        _make_backward(getattr(torch.ops.nllfused, bwd)),
                                        setup_context=_setup_context)


_register()
