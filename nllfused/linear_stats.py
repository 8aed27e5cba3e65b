"""Statistics of nllfused.linear_cross_entropy (return_stats, return_z_loss, return_lse).

The same statistics, reductions and names as nllfused.cross_entropy's (nllfused/stats.py), taken
from each chunk's logits while the chunk is at hand: the (N, C) logits are never made.

  * lse and the z-loss term only (return_lse, return_z_loss, return_stats=("lse", "z_loss")):
    the ordinary op, nllfused::linear_ce_fwd, already returns the per-row lse; nothing else is
    computed and its stored-gradient strategy (nllfused/linear.py) is kept.
  * predicted and correct (token accuracy), with or without those: linear_ce_fwd with
    want_argmax takes each chunk's argmax in its forward pass (the statistics kernel where the
    backend has one) before the chunk's gradient overwrites the logits; the strategy is kept.
  * entropy or target_logprob (differentiable): the op nllfused::linear_ce_stats returns
    per-row (loss, lse, aux, entropy, target log-prob, argmax); the reduction (torch_ref.reduce)
    and the statistics' reductions (stats.reduce) are O(rows) torch ops after it, which autograd
    differentiates. Its backward, nllfused::linear_ce_stats_bwd, recomputes each chunk's logits
    (as reduction 'none' does): four matrix products in all instead of three.
    Why not the forward-stored gradient of 'mean'/'sum': it folds a gradient into the
    parameters' gradients for one upstream scalar known in advance (the loss's, times 1). The
    gradient of entropy and target_logprob comes with upstream values (per row, or other
    scalars) that exist only in the backward pass; storing one gradient per differentiable
    output would cost a weight-sized buffer and two products each, and the caller may use none
    of them. Recomputing is one product per chunk more, whatever is differentiated.

Per chunk and backend: triton and cpu compute entropy, argmax and the target log-prob in their
kernels' own pass (ops.stats_for_backend: ce_fwd_stats(_triton) / ce_bwd_stats(_triton)), and so
does cuda through Triton's ops where Triton loads; torch runs torch_ref.forward_stats and
chunk_loss_and_grad; cuda without Triton runs its ce_fwd / ce_bwd and composes the rest from
torch ops on the chunk's logits (torch_ref.target_logprob, and
`_entropy_and_argmax` / `_stats_grad` below, in place), 1/_SLICES of a chunk at a time: O(chunk)
extra memory, never O(N * C), but extra passes over the chunk in torch (on our 2-core CPU
machines entropy costs more than the chunk's matrix product). Entropy is computed only when asked
for, argmax only for predicted / correct; the target log-prob is O(rows) (float64: a log_softmax).

Double backward, forward-mode AD and torch.func transforms run `reference_rows` (F.linear and
torch_ref.forward_stats, materialising the logits), as linear.py's _unfused does for the loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, functional, ops, stats
from .backends import torch_ref

ARGMAX_STATS = frozenset({"predicted", "correct"})


def requested(return_stats, return_z_loss: bool, return_lse: bool):
    """The statistics asked for (stats.requested, plus z_loss for return_z_loss), or None when
    the call asks for none of return_stats, return_z_loss and return_lse."""
    if not (return_stats or return_z_loss or return_lse):
        return None
    names = stats.requested(return_stats, False)
    return names | {"z_loss"} if return_z_loss else names


# The differentiable statistics that come from the chunks' logits: asking for them takes the
# per-row op (module docstring). predicted / correct alone take linear_ce_fwd, which gives the
# argmax from its own pass over each chunk (want_argmax) and keeps the stored-gradient strategy.
_PASS_STATS = frozenset({"entropy", "target_logprob"})


def needs_pass(names) -> bool:
    """Whether the statistics need the per-row op, nllfused::linear_ce_stats (beyond what
    linear_ce_fwd returns: the lse and, with want_argmax, the argmax)."""
    return bool(names & _PASS_STATS)


def chunk_argmax(logits, options):
    """The argmax of z per row of an (n, C) chunk by torch ops (for the backends without a
    statistics kernel), 1/_SLICES of the chunk at a time."""
    return torch.cat([_entropy_and_argmax(logits[s], options, False, True)[1]
                      for s in _slices(logits.shape[0])])


def reference_rows(x, linear_weight, linear_bias, target, weight, options):
    """(loss, lse, aux, entropy, target_logprob, predicted) per row by plain torch on the
    materialised logits: what every autograd feature differentiates."""
    logits = F.linear(x, linear_weight, linear_bias).unsqueeze(-1)
    return [r[:, 0] for r in torch_ref.forward_stats(logits, target.unsqueeze(-1), weight,
                                                     *options)]


def with_stats(x, linear_weight, linear_bias, target, weight, options, z_loss, reduction,
               backend, chunk_rows, reference, names, out_shape, out_dtype, return_stats,
               return_z_loss, return_lse):
    """linear_cross_entropy's result when `needs_pass(names)` (or under a transform, reference)."""
    if reference:
        rows = reference_rows(x, linear_weight, linear_bias, target, weight, options)
    else:
        rows = torch.ops.nllfused.linear_ce_stats(
            x, linear_weight, linear_bias, target, weight, *options, backend, chunk_rows,
            "entropy" in names, bool(names & ARGMAX_STATS))
    loss, lse, aux, *kernel = rows
    counted = torch_ref.not_ignored(target, options.ignore_index)
    loss = torch_ref.reduce(loss, lse, aux, reduction, False, z_loss, counted)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return result(loss.to(out_dtype), lse, kernel, names, x, linear_weight, target, options,
                  z_loss, reduction, out_shape, return_stats, return_z_loss, return_lse)


def result(loss, lse, kernel, names, x, linear_weight, target, options, z_loss, reduction,
           out_shape, return_stats, return_z_loss, return_lse):
    """(loss, CrossEntropyStats) or (loss, [z_loss], [lse]), as nllfused.cross_entropy returns
    them (functional._with_stats), from the per-row lse and, where computed, the per-row
    (entropy, target_logprob, predicted). The logits stand-in is a zero-stride (M, C, 1) view:
    the statistics code reads only its shape and dtype."""
    M, C = x.shape[0], linear_weight.shape[0]
    call = _checks.Call(x.new_zeros(()).expand(M, C, 1), target.unsqueeze(-1), None, options,
                        tuple(out_shape), loss.dtype)
    kernel = None if not kernel else [None if k is None else k.unsqueeze(-1) for k in kernel]
    return functional._with_stats(loss, call, lse.unsqueeze(-1), reduction, z_loss, names,
                                  kernel, return_stats, return_z_loss, return_lse)


# ---------------------------------------------------------------------------------------------
# One chunk
# ---------------------------------------------------------------------------------------------

# The torch parts work on 1/_SLICES of a chunk at a time: their (n, C) temporaries (transformed
# logits, log-probabilities, ...) then add a fraction of a chunk to what the chunk holds (as
# linear.py's _ops_grad does for ce_bwd).
_SLICES = 8


def _slices(n: int):
    step = max(1, -(-n // _SLICES))
    return [slice(s0, min(s0 + step, n)) for s0 in range(0, n, step)]


def chunk_forward(backend, fwd, logits, target, weight, options, want_entropy, want_argmax):
    """(loss, lse, aux, entropy, target_logprob, predicted), (n,) each, of an (n, C) chunk.
    entropy and predicted are zeros where not wanted (and the kernel does not give them)."""
    kernel = ops.stats_for_backend(backend)
    if backend != "torch" and kernel is not None:  # the kernels' own pass, no temporaries
        return [r[:, 0] for r in kernel(logits.unsqueeze(-1), target.unsqueeze(-1), weight,
                                        *options, with_entropy=want_entropy,
                                        with_predicted=want_argmax)]
    parts = [_slice_forward(kernel, fwd, logits[s], target[s], weight, options, want_entropy,
                            want_argmax) for s in _slices(logits.shape[0])]
    return [torch.cat(rows) for rows in zip(*parts)]


def _slice_forward(kernel, fwd, logits, target, weight, options, want_entropy, want_argmax):
    logits3, target2 = logits.unsqueeze(-1), target.unsqueeze(-1)
    if kernel is not None:  # torch_ref.forward_stats
        return [r[:, 0] for r in kernel(logits3, target2, weight, *options,
                                        with_entropy=want_entropy, with_predicted=want_argmax)]
    loss, lse, aux = fwd(logits3, target2, weight, *options)
    tlp = torch_ref.target_logprob(logits3, target2, lse, options)
    loss, lse, aux, tlp = loss[:, 0], lse[:, 0], aux[:, 0], tlp[:, 0]
    entropy, predicted = _entropy_and_argmax(logits, options, want_entropy, want_argmax)
    if entropy is None:
        entropy = torch.zeros_like(loss)
    if predicted is None:
        predicted = torch.zeros(loss.shape, dtype=torch.int64, device=loss.device)
    return [loss, lse, aux, entropy, tlp, predicted]


def chunk_grad(backend, bwd, logits, target, weight, options, lse, aux, entropy, g_loss, g_lse,
               g_entropy, g_tlp):
    """The gradient in an (n, C) chunk's logits of sum_i g_loss_i loss_i + g_lse_i lse_i +
    g_entropy_i entropy_i + g_tlp_i log p_{y_i} (the last three may be None), in the logits'
    dtype; it may be written over `logits`. g_loss must be 0 on ignored rows."""
    col = (lambda t: None if t is None else t.unsqueeze(-1))
    kernel = ops.stats_backward_for_backend(backend)
    if kernel is not None:
        return kernel(
            col(g_loss), col(g_lse), col(g_entropy), col(g_tlp), logits.unsqueeze(-1),
            col(target), weight, col(lse), col(aux), col(entropy), *options)[..., 0]
    cut = (lambda t, s: None if t is None else t[s])
    for s in _slices(logits.shape[0]):
        part, t = logits[s], target[s]
        extra = None
        if g_entropy is not None or g_tlp is not None:  # before the logits are overwritten
            extra = _stats_grad(part, t, options, cut(g_entropy, s), cut(g_tlp, s))
        if backend == "torch":
            g = torch_ref.chunk_loss_and_grad(part, t, weight, options)[2](g_loss[s],
                                                                           cut(g_lse, s))
        else:
            g = bwd(col(g_loss[s]), col(cut(g_lse, s)), part.unsqueeze(-1), col(t), weight,
                    col(lse[s]), col(aux[s]), *options)[..., 0]
        if extra is not None:
            g = extra.add_(g)
        if g.data_ptr() != part.data_ptr():
            part.copy_(g)
    return logits


# z - max below this contributes exp(z - max) = 0 in float32 and float64 alike; clamping there
# keeps masked classes (-inf) finite, so that their 0 * (z - max) terms are 0, not NaN.
_FLOOR = -1e4


def _transform_(z, options):
    """torch_ref.transform in place (the same operations in the same order, so the same bits);
    with softcap also returns 1 - tanh^2, its derivative."""
    if options.logit_scale != 1.0:
        z.mul_(options.logit_scale)
    slope = None
    if options.softcap:
        z.div_(options.softcap).tanh_()
        slope = 1 - z.square()
        z.mul_(options.softcap)
    return slope


def _entropy_and_argmax(logits, options, want_entropy, want_argmax):
    """(entropy or None, argmax or None) per row of an (n, C) slice whose logits are no longer
    needed (overwritten when they are in the accumulation dtype): what torch_ref.entropy_and_argmax
    gives, in place and with one temporary: H = log s - sum_c e_c d_c / s, d = z - max, e = exp(d),
    s = sum e (two non-negative terms: no cancellation)."""
    if not (want_entropy or want_argmax):
        return None, None
    acc = torch_ref.acc_dtype(logits.dtype)
    z = logits if logits.dtype == acc else logits.to(acc)
    _transform_(z, options)
    predicted = z.argmax(1) if want_argmax else None
    if not want_entropy:
        return None, predicted
    d = z.sub_(z.amax(1, keepdim=True)).clamp_(min=_FLOOR)  # NaN rows stay NaN
    e = torch.exp(d)
    s = e.sum(1)
    return s.log() - torch.linalg.vecdot(e, d) / s, predicted


def _stats_grad(logits, target, options, g_entropy, g_tlp):
    """d (sum_i g_entropy_i H_i + g_tlp_i log p_{y_i}) / d logits of an (n, C) slice, in the
    accumulation dtype (docs/maths.md, Statistics): dH/dz_c = -p_c (log p_c + H) (0 where
    p_c = 0), d log p_y / dz_c = [c = y] - p_c (0 on ignored rows), then the chain rule of softcap
    and logit_scale. Two (n, C) temporaries (three with softcap), worked on in place."""
    acc = torch_ref.acc_dtype(logits.dtype)
    z = logits.to(acc, copy=True)  # the loss's gradient still reads the logits
    slope = _transform_(z, options)
    logp = z.sub_(z.amax(1, keepdim=True)).clamp_(min=_FLOOR)
    p = torch.exp(logp)
    s = p.sum(1, keepdim=True)
    p.div_(s)
    logp.sub_(s.log())
    g = logp  # d (p_c (-(log p_c + H) g_entropy - g_tlp)) + g_tlp [c = y], formed in place
    if g_entropy is not None:
        entropy = -torch.linalg.vecdot(p, logp).unsqueeze(1)
        g.add_(entropy).mul_(-g_entropy.to(acc).unsqueeze(1))
    else:
        g.zero_()
    if g_tlp is not None:
        counted, in_range = torch_ref.index_rule(target, g.shape[1], options.ignore_index)
        zero = torch.zeros((), dtype=acc, device=g.device)
        g_y = torch.where(counted & in_range, g_tlp.to(acc), zero).unsqueeze(1)
        g.sub_(g_y)
    g.mul_(p)
    if g_tlp is not None:
        g.scatter_add_(1, torch.where(in_range, target, 0).unsqueeze(1), g_y)
    if slope is not None:
        g.mul_(slope)
    if options.logit_scale != 1.0:
        g.mul_(options.logit_scale)
    return g


# ---------------------------------------------------------------------------------------------
# The ops: nllfused::linear_ce_stats (autograd below) and nllfused::linear_ce_stats_bwd
# ---------------------------------------------------------------------------------------------

def define_ops(chunks):
    """Register the two ops, their fakes and autograd; `chunks` is linear.py's _Chunks (passed
    in, so that this module does not import linear.py, which imports it). Returns the ops."""

    def fwd_impl(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                 target: Tensor, weight: Optional[Tensor], ignore_index: int,
                 label_smoothing: float, logit_scale: float, softcap: float, prob_target: bool,
                 backend: str, chunk_rows: int, want_entropy: bool, want_argmax: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per row (M,): loss (accumulation dtype), lse (float64), aux, entropy, target
        log-prob (accumulation dtype), predicted (int64), chunk by chunk."""
        options = torch_ref.Options(ignore_index, label_smoothing, logit_scale, softcap,
                                    prob_target)
        with torch.autocast(input.device.type, enabled=False):
            ch = chunks(input, linear_weight, linear_bias, target, weight, options, backend,
                        chunk_rows, False, False, False)
            outs = _fwd_outputs(input, ch.acc)
            for r0, r1 in ch.ranges():
                rows = chunk_forward(ch.backend, ch.fwd, ch.logits(r0, r1), target[r0:r1],
                                     weight, options, want_entropy, want_argmax)
                for out, row in zip(outs, rows):
                    out[r0:r1] = row
            return tuple(outs)

    def bwd_impl(grad_loss: Tensor, grad_lse: Optional[Tensor], grad_entropy: Optional[Tensor],
                 grad_tlp: Optional[Tensor], input: Tensor, linear_weight: Tensor,
                 linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                 lse: Tensor, aux: Tensor, entropy: Tensor, ignore_index: int,
                 label_smoothing: float, logit_scale: float, softcap: float, prob_target: bool,
                 backend: str, chunk_rows: int, grad_input: bool, grad_weight: bool,
                 grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients in (input, weight, bias) by recomputing each chunk's logits (chunk_grad);
        empty where not asked for. grad_loss must be 0 on ignored rows."""
        options = torch_ref.Options(ignore_index, label_smoothing, logit_scale, softcap,
                                    prob_target)
        cut = (lambda t, r0, r1: None if t is None else t[r0:r1])
        with torch.autocast(input.device.type, enabled=False):
            ch = chunks(input, linear_weight, linear_bias, target, weight, options, backend,
                        chunk_rows, grad_input, grad_weight, grad_bias)
            if grad_input or grad_weight or grad_bias:
                for r0, r1 in ch.ranges():
                    g = chunk_grad(ch.backend, ch.bwd, ch.logits(r0, r1), target[r0:r1],
                                   weight, options, lse[r0:r1], aux[r0:r1], entropy[r0:r1],
                                   grad_loss[r0:r1], cut(grad_lse, r0, r1),
                                   cut(grad_entropy, r0, r1), cut(grad_tlp, r0, r1))
                    ch.accumulate(g, r0, r1)
            gi, gw, gb = ch.finish()
            bias_dtype = (input if linear_bias is None else linear_bias).dtype
            return gi, gw.to(linear_weight.dtype), gb.to(bias_dtype)

    fwd_op = torch.library.custom_op("nllfused::linear_ce_stats", mutates_args=())(fwd_impl)
    bwd_op = torch.library.custom_op("nllfused::linear_ce_stats_bwd", mutates_args=())(bwd_impl)

    @fwd_op.register_fake
    def _(input, linear_weight, *rest):
        return tuple(_fwd_outputs(input, torch_ref.acc_dtype(input.dtype)))

    @bwd_op.register_fake
    def _(grad_loss, grad_lse, grad_entropy, grad_tlp, input, linear_weight, linear_bias, *rest):
        grad_input, grad_weight, grad_bias = rest[-3:]
        bias = input if linear_bias is None else linear_bias
        return (input.new_empty(input.shape if grad_input else (0,)),
                linear_weight.new_empty(linear_weight.shape if grad_weight else (0,)),
                bias.new_empty(linear_bias.shape if grad_bias else (0,)))

    fwd_op.register_autograd(_backward, setup_context=_setup_context)
    return fwd_op, bwd_op


def _fwd_outputs(input, acc):
    M = input.shape[0]
    return [input.new_empty((M,), dtype=acc), input.new_empty((M,), dtype=torch.float64),
            input.new_empty((M,), dtype=acc), input.new_empty((M,), dtype=acc),
            input.new_empty((M,), dtype=acc), input.new_empty((M,), dtype=torch.int64)]


_N_INPUTS = 14  # nllfused::linear_ce_stats's arguments


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *rest = inputs
    ctx.options = torch_ref.Options(*rest[:5])
    ctx.backend, ctx.chunk_rows = rest[5], rest[6]
    _, lse, aux, entropy, _, _ = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, aux, entropy)
    ctx.set_materialize_grads(False)  # outputs nobody differentiates get None


def _backward(ctx, g_loss, g_lse, _g_aux, g_entropy, g_tlp, _g_predicted):
    none = [None] * _N_INPUTS
    if g_loss is None and g_lse is None and g_entropy is None and g_tlp is None:
        return tuple(none)
    input, linear_weight, linear_bias, target, weight, lse, aux, entropy = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and linear_bias is not None
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the plain-torch reference (a graph of the gradient).
        wanted = [p for p, n in zip((input, linear_weight, linear_bias), need) if n]
        with torch.enable_grad(), torch.autocast(input.device.type, enabled=False):
            rows = reference_rows(input, linear_weight, linear_bias, target, weight, ctx.options)
            pairs = [(r, g) for r, g in zip([rows[i] for i in (0, 1, 3, 4)],
                                            (g_loss, g_lse, g_entropy, g_tlp)) if g is not None]
            grads = iter(torch.autograd.grad([r for r, _ in pairs], wanted,
                                             [g for _, g in pairs], create_graph=True,
                                             allow_unused=True, materialize_grads=True))
        none[:3] = [next(grads) if n else None for n in need]
        return tuple(none)
    counted = target != ctx.options.ignore_index
    g_loss = torch.zeros_like(aux) if g_loss is None else torch.where(
        counted, g_loss.to(aux.dtype), torch.zeros((), dtype=aux.dtype, device=aux.device))
    gi, gw, gb = torch.ops.nllfused.linear_ce_stats_bwd(
        g_loss, g_lse, g_entropy, g_tlp, input, linear_weight, linear_bias, target, weight, lse,
        aux, entropy, *ctx.options, ctx.backend, ctx.chunk_rows, *need)
    none[:3] = [g if n else None for g, n in zip((gi, gw, gb), need)]
    return tuple(none)
