"""Vocabulary-parallel cross-entropy: the full-vocabulary loss from vocabulary-sharded logits.

When the output layer is split by vocabulary across the ranks of a tensor-parallel group (as in
Megatron-LM), each rank holds the logits of its slice of the classes only.
vocab_parallel_cross_entropy returns, on every rank, exactly the loss nllfused.cross_entropy
would give on the concatenated full-vocabulary logits, and each rank's backward gives the
gradient for its own slice, without ever gathering the logits.

How (docs/maths.md with C = the global vocabulary size):
  1. Each rank reduces its slice to per-row statistics in one pass over its logits (the fused
     Triton kernel in kernels/vocab_parallel.py, or torch): lse_r (logsumexp of the slice) as
     two numbers m_r + log s_r (m_r the slice's max: a float64 lse_r's own rounding would reach
     the loss and p for logits far from zero, docs/maths.md "Precision of lse"), the target
     logit z_y if the target falls in the slice (else 0), and with label smoothing
     A_r = sum_{c in slice} w_c (lse_r - z_c); plus three numbers for the rank itself
     (vocab_start, C_local, sum of the slice's weights).
  2. ONE collective per forward pass: an all-gather (a functional collective, so torch.compile
     can trace it) of that float64 buffer of 3N + 3 numbers (4N + 3 with smoothing). O(N), never
     O(N C).
  3. Every rank combines the same gathered numbers: lse = m + log s with m the largest m_r and
     log s = log sum_r exp((m_r - m) + log s_r), z_y = sum_r, the loss (m - z_y) + log s,
     sum_c w_c (lse - z_c) = sum_r [A_r + W_r (lse - lse_r)] (every term >= 0: no cancellation),
     C = sum_r C_r, sum_c w_c = sum_r W_r. Label smoothing is exact over the full vocabulary.
  4. The backward pass needs no communication: each rank forms p_c = exp((z_c - m) - log s)
     for its slice from the saved global m and log s and writes g (p_c coef - (1-e) w_y [c=y] -
     (e/C) w_c), plus g_lse p_c where the global lse has a gradient (z-loss).
  5. Statistics (return_stats): each rank adds to what it sends its slice's expectation of
     z - m_r under the slice's softmax, its largest z and that class's global id (3N numbers
     more, the same one collective); every rank combines E_p[z - m] = sum_r exp(lse_r - lse)
     (E_r + m_r - m), the entropy log s - E_p[z - m] and the argmax. Their gradients need no
     communication either.
The 'mean' denominator (the summed weights of the counted targets) comes from the target and
the full weight, identical on every rank: no extra collective. The z-loss term and the
reduction are nllfused.cross_entropy's (backends.torch_ref.reduce).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _extension, backends, stats
from .backends import torch_ref
from .errors import ArgumentError, ArgumentTypeError

try:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
except ImportError:  # a torch built without distributed support
    dist = funcol = None

__all__ = ["vocab_parallel_cross_entropy"]

_META = 3  # per-rank numbers ahead of the per-row statistics: vocab_start, C_local, sum of w


def _vp_kernels():
    """kernels/vocab_parallel.py, imported at the first Triton call (as nllfused/_extension.py
    imports Triton)."""
    from .kernels import vocab_parallel
    return vocab_parallel


# --------------------------------------------------------------------------------------------
# Local statistics and the slice gradient: torch implementation
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# The same two jobs as custom ops around the Triton kernels (torch.compile sees their fakes)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("nllfused::vp_stats_triton", mutates_args=())
def _vp_stats_triton(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     wsum: torch.Tensor, vocab_start: int, ignore_index: int,
                     smoothing: bool) -> torch.Tensor:
    return _vp_kernels().vp_stats(logits, target, weight, wsum, vocab_start, ignore_index,
                                  smoothing)


@_vp_stats_triton.register_fake
def _(logits, target, weight, wsum, vocab_start, ignore_index, smoothing):
    return logits.new_empty((4 if smoothing else 3, logits.shape[0]), dtype=torch.float64)


@torch.library.custom_op("nllfused::vp_bwd_triton", mutates_args=())
def _vp_bwd_triton(g: torch.Tensor, g_lse: Optional[torch.Tensor], logits: torch.Tensor,
                   lse_m: torch.Tensor, lse_s: torch.Tensor, coef: torch.Tensor,
                   tcoef: torch.Tensor, y_local: torch.Tensor, weight: Optional[torch.Tensor],
                   eps_c: torch.Tensor, smoothing: bool) -> torch.Tensor:
    return _vp_kernels().vp_bwd(g, g_lse, logits, lse_m, lse_s, coef, tcoef, y_local, weight,
                                eps_c, smoothing)


@_vp_bwd_triton.register_fake
def _(g, g_lse, logits, lse_m, lse_s, coef, tcoef, y_local, weight, eps_c, smoothing):
    return logits.new_empty(logits.shape)


# --------------------------------------------------------------------------------------------
# The collective, the combination, autograd
# --------------------------------------------------------------------------------------------

def _distributed_on() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def _all_gather(buf: torch.Tensor, group, world: int) -> torch.Tensor:
    """(world, len(buf)): every rank's buf, by one functional all-gather."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # torch < 2.12
    out = gather(buf, 0, group)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out.view(world, -1)


class _VocabParallelCE(torch.autograd.Function):
    """(loss, lse, aux) per row, as nllfused::ce_fwd defines them (csrc/ops.cpp), over the full
    vocabulary. Saves the global lse; its backward reads only this rank's slice."""

    @staticmethod
    def forward(ctx, logits, target, weight, vocab_start, ignore_index, e, group, world,
                use_triton, stats=False):
        acc = torch_ref.acc_dtype(logits.dtype)
        R, C_local = logits.shape
        device = logits.device
        smoothing = e > 0
        w_slice = None
        if weight is not None:  # by narrow: torch.jit.trace fails on a slice inside apply
            start = min(vocab_start, weight.shape[0])
            w_slice = weight.narrow(0, start, min(C_local, weight.shape[0] - start))
        if w_slice is not None and w_slice.shape[0] < C_local:
            # a weight too short for this slice: NaN for the classes past it, so that this rank
            # joins the collective, after which every rank finds C != weight.shape[0]
            w_slice = torch.cat([w_slice, w_slice.new_full((C_local - w_slice.shape[0],),
                                                           float("nan"))])
        if w_slice is None:
            wsum = torch.full((1,), float(C_local), dtype=torch.float64, device=device)
        else:
            wsum = w_slice.sum(dtype=torch.float64).reshape(1)
        stats_fn = _vp_stats_triton if use_triton else torch_ref.vocab_slice_stats
        rows_local = stats_fn(logits, target, w_slice, wsum, vocab_start, ignore_index,
                              smoothing)
        if stats:  # + the slice's expectation of z and its argmax (_slice_stats)
            rows_local = torch.cat([rows_local, _slice_stats(logits, rows_local[0],
                                                             rows_local[1], vocab_start)])
        k = rows_local.shape[0]

        # The one collective: [vocab_start, C_local, W_r | stats rows] from every rank.
        start_size = [torch.full((1,), float(v), dtype=torch.float64, device=device)
                      for v in (vocab_start, C_local)]  # fills on the device: no host copy
        buf = torch.cat([*start_size, wsum, rows_local.reshape(-1)])
        gathered = _all_gather(buf, group, world) if group is not None else buf.unsqueeze(0)

        starts, sizes, wsums = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        rows = gathered[:, _META:].reshape(gathered.shape[0], k, R)  # (world, k, R)
        # The global lse = m + log s in two parts, as each rank's lse_r = m_r + log s_r (float64
        # lse's own rounding would enter the loss and p: docs/maths.md, "Precision of lse"): m
        # the largest m_r of the ranks with any mass (0 where none has, or it is not finite: log
        # s then carries the inf or NaN), log s = log sum_r exp((m_r - m) + log s_r).
        m_r, log_s_r = rows[:, 0], rows[:, 1]
        m = torch.where(log_s_r == float("-inf"), torch.full_like(m_r, float("-inf")),
                        m_r).amax(0)
        m = torch.where(m.isfinite(), m, torch.zeros_like(m))                   # (R,) float64
        log_s = torch.log(torch.exp((m_r - m) + log_s_r).sum(0))
        lse = m + log_s
        # A +inf logit (a slice's log s_r = +inf) makes lse +inf, as torch.logsumexp, but the
        # loss, log p and p NaN, as torch's log_softmax (inf - inf): log s NaN from here on.
        log_s = torch.where((log_s_r == float("inf")).any(0),
                            torch.full_like(log_s, float("nan")), log_s)
        z_y = rows[:, 2].sum(0)
        C = sizes.sum()
        w_total = wsums.sum()

        # The slices must tile [0, C) (and match the weight): a NaN loss (GPU) or an error (CPU).
        order = torch.argsort(starts)
        ends = (starts + sizes)[order]
        tiled = (starts[order][0] == 0) & (starts[order][1:] == ends[:-1]).all()
        if weight is not None:
            tiled = tiled & (C == weight.shape[0])
        host_checks = device.type == "cpu" and not torch.compiler.is_compiling()
        if host_checks and not bool(tiled):
            raise ArgumentError(
                "the vocabulary slices of the ranks do not tile [0, C)"
                + ("" if weight is None else f" with C = weight.shape[0] = {weight.shape[0]} "
                   f"(weight: the full-vocabulary class weights)")
                + ": (vocab_start, C_local) per rank = "
                + str([(int(a), int(b)) for a, b in zip(starts.tolist(), sizes.tolist())]))
        if host_checks:
            _checks.check_target_range(target, int(C.item()), ignore_index)

        y = target.long()
        counted, in_range = torch_ref.index_rule(y, C, ignore_index)
        valid = counted & in_range & tiled
        y_safe = torch.where(valid, y, 0)
        if weight is None:
            w_y = torch.ones_like(lse)
        else:
            w_y = weight.to(torch.float64)[y_safe.clamp(max=weight.shape[0] - 1)]
        loss = w_y * ((m - z_y) + log_s)
        eps_c = e / C
        if smoothing:
            lse_gap = (m.unsqueeze(0) - m_r) + (log_s.unsqueeze(0) - log_s_r)  # lse - lse_r
            smooth = (rows[:, 3] + wsums.unsqueeze(1) * lse_gap).sum(0)
            loss = (1 - e) * loss + eps_c * smooth
        nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss = torch.where(counted, torch.where(valid, loss, nan), zero)
        aux = torch.where(counted, torch.where(valid, w_y, nan), zero)

        # For the backward: per-row coefficients, the local target id (or a marker).
        coef = (1 - e) * w_y + eps_c * w_total
        y_local = y - vocab_start
        owned = (y_local >= 0) & (y_local < C_local)
        y_local = torch.where(counted, torch.where(owned, y_local, -1),
                              torch_ref.VOCAB_IGNORED_ROW)
        extra, expect = (), lse
        if stats:
            entropy, expect, predicted = _combine_slice_stats(rows[:, k - 3:], m_r, log_s_r, m,
                                                              log_s)
            tlp = torch.where(counted, torch.where(valid, -((m - z_y) + log_s), nan), zero)
            extra = (entropy.to(acc), tlp.to(acc), predicted)
            ctx.mark_non_differentiable(predicted)
        ctx.save_for_backward(logits, w_slice, m, log_s, coef.to(acc), ((1 - e) * w_y).to(acc),
                              y_local, eps_c.to(acc).reshape(1), valid, counted, expect)
        ctx.options = (smoothing, use_triton)
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)
        return (loss.to(acc), lse, aux.to(acc), *extra)

    @staticmethod
    def backward(ctx, *grads):
        with torch.no_grad():
            grad = _VocabParallelCE.slice_grad(ctx, *grads)
        if grad is not None and torch.is_grad_enabled():  # create_graph=True
            grad = _FirstOrderOnly.apply(grad, ctx.saved_tensors[0])
        return grad, *(None,) * 9

    @staticmethod
    def slice_grad(ctx, grad_loss, grad_lse, _grad_aux, grad_entropy=None, grad_tlp=None,
                   _grad_pred=None):
        """This rank's slice of the logits' gradient (None where none is asked for)."""
        (logits, w_slice, lse_m, lse_s, coef, tcoef, y_local, eps_c, valid, counted,
         expect) = ctx.saved_tensors
        smoothing, use_triton = ctx.options
        grad = None
        if ctx.needs_input_grad[0] and (grad_entropy is not None or grad_tlp is not None):
            grad = _slice_stats_grad(grad_entropy, grad_tlp, logits, lse_m, lse_s, expect,
                                     y_local, valid)
            if grad_loss is None and grad_lse is None:
                return grad.to(logits.dtype)
        if ctx.needs_input_grad[0] and (grad_loss is not None or grad_lse is not None):
            g = torch.zeros_like(coef) if grad_loss is None else grad_loss.to(coef.dtype)
            nan = torch.full((), float("nan"), dtype=g.dtype, device=g.device)
            g = torch.where(counted, torch.where(valid, g, nan), torch.zeros_like(g))
            grad_fn = _vp_bwd_triton if use_triton else torch_ref.vocab_slice_grad
            loss_grad = grad_fn(g, grad_lse, logits, lse_m, lse_s, coef, tcoef, y_local, w_slice,
                                eps_c, smoothing)
            grad = loss_grad if grad is None else (grad + loss_grad).to(logits.dtype)
        return grad


class _FirstOrderOnly(torch.autograd.Function):
    """The slice's gradient under create_graph=True, which must not be differentiated again:
    its own gradient would need the all-gathered lse's (a second collective), so it raises."""

    @staticmethod
    def forward(ctx, grad, logits):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _grad):
        raise RuntimeError(
            "vocab_parallel_cross_entropy is differentiable once: no double backward / "
            "Hessian-vector product through it (nllfused.cross_entropy of the gathered logits "
            "has one)")


def _slice_stats(logits, m_r, log_s_r, vocab_start: int) -> torch.Tensor:
    """(3, R) float64: the slice's expectation of z - m_r under its own softmax, sum_c p_c (z_c -
    m_r) with p_c = exp((z_c - m_r) - log s_r) (a class with p_c = 0 adds 0; centred on m_r, so
    that logits far from zero lose nothing), its largest z and that class's global id (the first
    maximum, or the first NaN, as torch.argmax). In torch: an extra pass over the slice
    (kernels/vocab_parallel.py does not compute them)."""
    z = logits.to(torch_ref.acc_dtype(logits.dtype))
    d = z - m_r.to(z.dtype).unsqueeze(1)  # m_r is a logit of the slice (or 0): exact in z's dtype
    p = torch.exp(d - log_s_r.to(z.dtype).unsqueeze(1))
    expect = torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device),
                         p * d).sum(1)
    arg = z.argmax(1)
    best = z.gather(1, arg.unsqueeze(1)).squeeze(1)
    return torch.stack([expect.double(), best.double(), (arg + vocab_start).double()])


def _combine_slice_stats(rows, m_r, log_s_r, m, log_s):
    """(entropy, E_p[z - m], argmax) of the full rows from every rank's _slice_stats (world, 3,
    R), the ranks' lse_r = m_r + log s_r (world, R) and the global lse = m + log s, all centred
    on m: E_p[z - m] = sum_r exp(lse_r - lse) (E_r + m_r - m) (a rank whose slice has no mass
    adds 0), H = log s - E_p[z - m]; the argmax is the smallest global id among the ranks holding
    the largest z (the first NaN's, if any rank has one)."""
    expect_r, best, ids = rows[:, 0], rows[:, 1], rows[:, 2]
    gap = m_r - m.unsqueeze(0)
    share = torch.exp(gap + (log_s_r - log_s.unsqueeze(0)))
    zero = torch.zeros((), dtype=share.dtype, device=share.device)
    expect = torch.where(share == 0, zero, share * (expect_r + gap)).sum(0)
    inf = torch.full((), float("inf"), dtype=ids.dtype, device=ids.device)
    is_nan = best != best
    first_nan = torch.where(is_nan, ids, inf).amin(0)
    top = best.amax(0)  # NaN where a rank has one: first_nan decides those rows
    first_top = torch.where(best == top.unsqueeze(0), ids, inf).amin(0)
    predicted = torch.where(is_nan.any(0), first_nan, first_top)
    return log_s - expect, expect, predicted.long()


def _slice_stats_grad(grad_entropy, grad_tlp, logits, lse_m, lse_s, expect, y_local, valid):
    """This slice's gradient of sum_r gH_r H_r + gT_r log p_{y_r}: -gH p_c (z_c - E_p[z]) +
    gT ([c = y] - p_c), p = exp((z - m) - log s) from the global lse = m + log s (no
    communication) and E_p[z - m] (expect), in the accumulation dtype."""
    z = logits.to(torch_ref.acc_dtype(logits.dtype))
    d = z.double() - lse_m.unsqueeze(1)
    p = torch.exp(d - lse_s.unsqueeze(1)).to(z.dtype)
    coef = torch.zeros_like(z[:, 0]) if grad_tlp is None else \
        torch.where(valid, grad_tlp.to(z.dtype), torch.zeros((), dtype=z.dtype,
                                                               device=z.device))
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # rows with no upstream gradient get no term (p may be NaN in them: an ignored row's)
    grad = torch.where(coef.unsqueeze(1) != 0, -p * coef.unsqueeze(1), zero)
    if grad_entropy is not None:
        g_h = grad_entropy.to(z.dtype).unsqueeze(1)
        centred = (d - expect.unsqueeze(1)).to(z.dtype)  # z - E_p[z]; a class at p = 0 adds 0
        # ... unless the row's entropy is NaN (a +inf logit: E_p[z] NaN): NaN over the row, as
        # torch's autograd of -(p log p).sum gives
        term = (p != 0) | (expect != expect).unsqueeze(1)
        grad = grad - torch.where((g_h != 0) & term, g_h * p * centred, zero)
    if grad_tlp is not None:
        owned = y_local >= 0
        grad = grad.scatter_add(1, torch.where(owned, y_local, 0).unsqueeze(1),
                                torch.where(owned, coef, torch.zeros_like(coef)).unsqueeze(1))
    return grad


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------

def _resolve_backend(backend: str, device: torch.device) -> bool:
    """True for the Triton kernels, False for the torch implementation; raises if unavailable.

    auto: CUDA tensors -> triton when it imports, else torch; CPU tensors -> torch.
    cpu / cuda: there are no C++/CUDA vocabulary-parallel kernels; these names run the torch
    implementation (so that code passing one backend name everywhere keeps working).
    """
    if backends.check_name(backend) == "auto":
        return device.type == "cuda" and _extension.triton_error() is None
    reason = backends.unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    return backend == "triton"


def vocab_parallel_cross_entropy(input: torch.Tensor, target: torch.Tensor, *, group=None,
                                 vocab_start: Optional[int] = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0,
                                 z_loss: float = 0.0, weight: Optional[torch.Tensor] = None,
                                 backend: str = "auto", return_stats=False):
    """Cross-entropy over a vocabulary split across the ranks of `group`.

    input         this rank's logits for its slice of the classes, shape (..., C_local): classes
                  in the LAST dimension, as in Megatron-LM ((N, C_local) or (B, T, C_local)).
    target        global class ids, shape input.shape[:-1], integer, identical on every rank.
    group         the tensor-parallel process group (None: the default group; if
                  torch.distributed is not initialized, a group of one: no communication).
    vocab_start   the first global class id of this rank's slice; default rank * C_local
                  (equal slices). Give it for uneven slices; the slices must tile [0, C).
    weight        the FULL-vocabulary class weights, shape (C,), the same on every rank
                  (each rank reads its slice and w[target]).
    ignore_index, reduction, label_smoothing, z_loss: as nllfused.cross_entropy, with label
                  smoothing exact over the full vocabulary (e / C with the global C).
    backend       "auto" (triton for CUDA tensors, else torch), "torch", "triton" (CUDA
                  tensors; CPU tensors under TRITON_INTERPRET=1); "cpu"/"cuda" run torch.
    return_stats  as nllfused.cross_entropy (nllfused/stats.py): (loss, stats) over the full
                  vocabulary, from the same one collective (each rank adds its slice's
                  expectation of z and argmax, computed in torch, to what it sends).

    Returns the same value on every rank: nllfused.cross_entropy of the concatenated logits
    (full.reshape(-1, C), target.reshape(-1)), with reduction='none' shaped like target. Every
    rank must call backward on that loss (as with any replicated loss); each then gets the
    gradient for its slice. One all-gather of O(rows) numbers per forward, none in backward.
    """
    reduction = _checks.resolve_reduction(None, None, reduction)
    label_smoothing, z_loss, _, _ = _checks.check_options(label_smoothing, z_loss, 1.0, None)
    _checks.check_logits_and_target(input, target)
    ignore_index = _checks.check_ignore_index(ignore_index)
    if input.dim() == 0 or input.shape[-1] == 0:
        raise ArgumentError(f"input must have shape (..., C_local) with C_local >= 1; got "
                            f"{tuple(input.shape)}")
    if target.is_floating_point():
        raise ArgumentTypeError(f"target must hold global class indices (an integer dtype); got "
                                f"{target.dtype} (probability targets are not supported here)")
    if target.shape != input.shape[:-1]:
        raise ArgumentError(f"target shape {tuple(target.shape)} does not match input shape "
                            f"{tuple(input.shape)}: it must be {tuple(input.shape[:-1])} (the "
                            f"input's shape without the last, class dimension)")

    if group is None and _distributed_on():
        group = dist.group.WORLD
    if group is not None:
        if not _distributed_on():
            raise RuntimeError("a group was given but torch.distributed is not initialized")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    else:
        rank, world = 0, 1

    C_local = input.shape[-1]
    if vocab_start is None:
        vocab_start = rank * C_local
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ArgumentError(f"vocab_start must be a non-negative int; got {vocab_start!r}")

    # (A weight too short for this rank's slice is found after the one collective, on every
    # rank -- an error here, on this rank alone, would leave the others waiting in it.)
    if isinstance(weight, torch.Tensor) and weight.dim() != 1:
        raise ArgumentError(
            f"weight must be the full-vocabulary class weights, a 1-D tensor of C entries; got "
            f"shape {tuple(weight.shape)}")
    _checks.check_weight_not_learned(weight, False)
    if weight is not None:  # every rank reads its slice and w[target]
        weight = _checks.check_weight(weight, len(weight) if isinstance(weight, torch.Tensor)
                                      else 0, input)

    names = stats.requested(return_stats, False)
    use_triton = _resolve_backend(backend, input.device)
    logits = input.reshape(-1, C_local)
    flat_target = target.reshape(-1)
    loss, lse, aux, *slice_stats = _VocabParallelCE.apply(
        logits, flat_target, weight, vocab_start, ignore_index, float(label_smoothing), group,
        world, use_triton, bool(names & stats.KERNEL_STATS))
    counted = torch_ref.not_ignored(flat_target, ignore_index) if z_loss else None
    out = torch_ref.reduce(loss, lse, aux, reduction, False, z_loss, counted)
    out = (out.reshape(target.shape) if reduction == "none" else out).to(
        _checks.autocast_dtype(input.dtype, input.device))
    if not names:
        return out
    options = torch_ref.Options(ignore_index=ignore_index)
    rows = stats.per_row(names, logits, flat_target, lse, options, z_loss, *slice_stats)
    return out, stats.reduce(rows, flat_target, options, reduction, target.shape)
