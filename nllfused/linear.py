"""nllfused.linear_cross_entropy: F.cross_entropy(F.linear(input, W, b), target) without the logits.

For a language model the logits (tokens x vocabulary) are the largest tensor of the step, and
torch's loss adds three more of their size. Here they never exist: the rows (tokens) are taken in
chunks of n, each chunk's logits (n, C) come from one matrix product (cuBLAS / oneDNN through
torch), go through the backend's per-row op -- the same nllfused::ce_fwd / ce_bwd pair that
nllfused.cross_entropy uses (csrc/ops.cpp), so every option means exactly what it means there
(the "torch" backend: the same formulas in torch ops, torch_ref.chunk_loss_and_grad) -- and are
dropped. No tensor of N*C elements is allocated, in the forward or the backward pass -- but for
small problems (logits of at most _SMALL_LOGITS_BYTES, no chunking asked for), whose logits are
made whole and given to nllfused.cross_entropy (_whole_logits). z-loss and
the reduction are torch_ref.reduce's (docs/maths.md): under 'mean' the cross-entropy part is
divided by the summed target weights, the z-loss part by the number of counted rows.

Strategy (one fused op, nllfused::linear_ce_fwd, with its own autograd):
  * reduction 'mean'/'sum' -- the upstream gradient is a scalar, so while a chunk's logits are at
    hand the forward pass also forms their gradient (ce_bwd with each row's share of the reduced
    loss, torch_ref.reduce_grads) and folds it into grad_input (= g @ W), grad_weight
    (+= g.T @ x) and grad_bias (+= g.sum(0)). Three matrix products in all, like unfused torch.
    The backward pass only scales the stored gradients by the upstream scalar, in place: they
    are buffers no one else holds (torch's own chunked linear_cross_entropy does the same). This
    happens only when grad mode is on and something requires grad; a second backward
    (retain_graph=True) recomputes instead, so results stay right.
    Under torch.compile they are saved the ordinary way and scaled out of place (one extra
    gradient-sized buffer in the backward): the in-place hand-over is Python state that a
    compiled graph does not replay.
  * reduction 'none' -- the upstream gradient is a vector known only in backward: the backward
    op (nllfused::linear_ce_bwd) recomputes each chunk's logits (four matrix products in all).
  * create_graph=True (double backward, Hessian-vector products), forward-mode AD and torch.func
    transforms run the plain-torch reference instead (_unfused: F.linear, torch_ref.forward and
    reduce), which materialises the logits but which every autograd feature differentiates.
  * return_stats (entropy, argmax, target log-prob, ...): nllfused/linear_stats.py.
Chunk size: see _chunk_rows (shapes, dtype and device only); chunk_size=, torch's
LinearCrossEntropyOptions (_requested_rows) or CHUNK_ROWS (tests use it) override it.
Precision: logits, their gradient and grad_input are in the parameters' dtype (as torch computes
them); per-row losses, the reduction, grad_weight and grad_bias accumulate in float32 (float64
for float64), rounded once to the parameters' dtype at the end -- except a bfloat16 grad_weight
on a CPU with bfloat16 matrix hardware, summed in bfloat16 products with one rounding per chunk
(at most _BF16_WEIGHT_GRAD_ROUNDINGS; BF16_WEIGHT_GRAD).
Autocast: as torch does for F.linear + F.cross_entropy, the matrix products run in the autocast
dtype and the loss comes back in float32; gradients arrive in the parameters' own dtypes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, backends, functional, linear_stats, ops, stats
from .linear_checks import (autocast_args, canonical_arguments, check_chunking, check_tensors,
                            plain_small_head, small_logits)
from ._checks import Options
from .backends import torch_ref
from .errors import ArgumentError
from . import linear_kdim

# Rows per chunk: None picks them from the shapes, dtype and device (_chunk_rows); an int forces
# that many (tests set it small to cross many chunk boundaries).
CHUNK_ROWS: Optional[int] = None

# The (n, C) buffers a chunk holds at once (_row_bytes) are kept below a cap per device type.
# CPU: 44 MiB is 1/6 of the float32 logits at 2048 x 32000 (360 rows with the "torch" backend,
# 320 with the C++ one); thinner chunks lose GEMM speed on the CPU (measured on our 2-core
# machines: 128-row products ~1.5x slower than full-size ones, 256 rows ~1.15x, 320+ ~1.05x).
# CUDA: 1 GiB, e.g. ~650 rows of a 256K bfloat16 vocabulary, thick enough for cuBLAS.
_CHUNK_BYTES_CAP = {"cpu": 44 << 20, "cuda": 1 << 30}
# Logits of at most this many bytes are made whole (_whole_logits): a problem that small takes
# less time than the chunked op's per-call cost (a Python custom op with its own autograd
# formula and the chunk loop, ~0.2 ms forward and ~0.45 ms forward+backward on our CPUs), and
# its logits are fewer bytes than one chunk of a large one holds. On the Intel CPU (2 threads),
# forward+backward, chunked / whole: (64, 128, 10) fp32 0.49 / 0.01 ms (torch 0.06), (256, 1024,
# 1024) fp32 7.4 / 6.3 (torch 6.5), (512, 512, 2048) bf16 5.2 / 3.7 (torch 4.7), (1024, 256,
# 4096) bf16 (8 MiB) 8.0 / 5.9 (torch 10.2). chunk_size, options or CHUNK_ROWS keep the chunks.
_SMALL_LOGITS_BYTES = 8 << 20
# At least this many rows: the weight gradient's product contracts over the chunk's rows, and
# below ~200 of them it runs at half speed (measured on the Intel AMX machine, float32, H = 2048,
# C = 128256: 0.20 TFLOP/s at 88 rows, 0.37 at 256, 0.38 at 512). 256 float32 rows of a 128K
# vocabulary are 131 MB, 2.5 % of what unfused torch holds there.
_MIN_ROWS = 256
_OPS_SLICES = 8  # without an in-place backward, ce_bwd runs on 1/8 of a chunk at a time

# bfloat16 weights on a CPU with bfloat16 matrix hardware (AMX or AVX512-BF16): the weight's
# gradient is summed by bfloat16 products straight into the returned bfloat16 gradient (float32
# sums inside each product, one rounding per chunk) instead of float32 products into a C x H
# float32 accumulator -- 4x faster there and no accumulator at all (_bf16_weight_grad). Each
# chunk adds one rounding of the running sum, so the chunks are made large enough that there
# are at most _BF16_WEIGHT_GRAD_ROUNDINGS of them (_chunk_rows); where a forced chunk size makes
# more, the float32 accumulator is used instead. None: decided by the CPU; True/False force it
# (tests cover both).
BF16_WEIGHT_GRAD: Optional[bool] = None
_BF16_WEIGHT_GRAD_ROUNDINGS = 2


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------

def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         ignore_index: Optional[int] = None, reduction: str = "mean",
                         label_smoothing: float = 0.0, *, options=None, z_loss: float = 0.0,
                         logit_scale: float = 1.0, softcap: Optional[float] = None,
                         chunk_size: Optional[int] = None, backend: str = "auto",
                         return_stats=False, return_z_loss: bool = False,
                         return_lse: bool = False):
    """F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) without the logits.

    input (*, H) -- (H,), (N, H), (B, T, H), ... -- linear_weight (C, H), linear_bias (C,) or None,
    target (*) class indices (ignore_index allowed); weight, ignore_index, reduction and
    label_smoothing as in F.cross_entropy; ignore_index=None means -100. K-dimensional, as
    torch's: linear_weight (C, d1, ..., dK, H), linear_bias (C, d1, ..., dK), input (N, H),
    target (N, d1, ..., dK) (nllfused/linear_kdim.py).
    A drop-in for torch.nn.functional.linear_cross_entropy: every argument of it is accepted
    under its name. Its `options` (a torch.nn.LinearCrossEntropyOptions, or None) only chooses
    the chunking here: batch_chunk_size or chunking_method="aspect_ratio[:N]" set the rows per
    chunk as torch would, chunking_method=None alone means one chunk; with the default "auto"
    (or options=None) our own rule applies. Accumulation is float32 (float64 for float64) and
    a second backward works, whatever its acc_policy, acc_dtype and allow_retain_graph say.
    Keyword-only extras: z_loss, logit_scale, softcap and backend as in nllfused.cross_entropy;
    chunk_size, rows (tokens) per chunk (None: the automatic rule; it overrides `options`).
    Logits of at most 8 MiB (_SMALL_LOGITS_BYTES), unless chunking is asked for, are made whole:
    F.linear, then nllfused.cross_entropy (faster than the chunked op there).
    Returns the loss (shape input.shape[:-1] for reduction='none', else a scalar) in the input's
    dtype, float32 under autocast; differentiable in input, linear_weight and linear_bias, to
    any order (a second derivative, forward-mode AD and torch.func run the unfused reference).
    return_stats, return_z_loss, return_lse: as in nllfused.cross_entropy (nllfused/stats.py),
    each statistic computed from the chunks' logits (nllfused/linear_stats.py); entropy and
    target_logprob differentiable in input, linear_weight and linear_bias.
    """
    if CHUNK_ROWS is None and plain_small_head(input, linear_weight, target, linear_bias,
                                               options, chunk_size, _SMALL_LOGITS_BYTES,
                                               _CHUNK_BYTES_CAP):
        return _whole_logits(input, linear_weight, linear_bias, target, weight,
                             -100 if ignore_index is None else ignore_index, reduction,
                             label_smoothing, z_loss, logit_scale, softcap, backend,
                             return_stats, return_z_loss, return_lse)
    reduction = _checks.resolve_reduction(None, None, reduction)
    label_smoothing, z_loss, logit_scale, softcap = _checks.check_options(
        label_smoothing, z_loss, logit_scale, softcap)
    backend = backends.check_name(backend)
    stats.check_returns(return_stats, return_z_loss, return_lse)
    if ignore_index is not None and isinstance(target, Tensor) and target.is_floating_point():
        raise ArgumentError("ignore_index cannot be specified when target contains "
                            "probabilities (class-index targets only)")
    ignore_index = _checks.check_ignore_index(-100 if ignore_index is None else ignore_index)
    if isinstance(linear_weight, Tensor) and linear_weight.dim() > 2:  # (C, *out_features, H)
        return linear_kdim.linear_cross_entropy_kdim(
            linear_cross_entropy, input, linear_weight, target, linear_bias, weight, ignore_index,
            reduction, label_smoothing, z_loss=z_loss, logit_scale=logit_scale, softcap=softcap,
            return_stats=return_stats, return_z_loss=return_z_loss, return_lse=return_lse,
            options=options, chunk_size=chunk_size, backend=backend)
    no_classes = (isinstance(linear_weight, Tensor) and linear_weight.shape[:1] == (0,)
                  and isinstance(target, Tensor) and _checks.no_class_index(target, ignore_index))
    if isinstance(input, Tensor) and isinstance(target, Tensor) and (
            target.is_floating_point() or no_classes):
        # Probability targets (*, C): torch's function takes them unchunked, with the logits
        # made; so does this one, through nllfused.cross_entropy (classes in dimension 1). So
        # are 0 classes with every target ignored (no logit at all: torch's 0s, 0 or NaN).
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        if logits.dim() > 2:
            logits, target = logits.movedim(-1, 1), target.movedim(-1, 1)
        return functional.cross_entropy(
            logits, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale,
            softcap=softcap, backend=backend, return_stats=return_stats,
            return_z_loss=return_z_loss, return_lse=return_lse)
    input, linear_weight, linear_bias, out_dtype = autocast_args(input, linear_weight, linear_bias)
    M, C, H = dims = check_tensors(input, linear_weight, target, linear_bias)
    chunk_rows = _requested_rows(options, chunk_size, M, H, C)
    compiling = torch.compiler.is_compiling()
    if chunk_rows == 0 and not compiling and small_logits(M, C, input, _SMALL_LOGITS_BYTES,
                                                          _CHUNK_BYTES_CAP):
        return _whole_logits(input, linear_weight, linear_bias, target, weight, ignore_index,
                             reduction, label_smoothing, z_loss, logit_scale, softcap, backend,
                             return_stats, return_z_loss, return_lse)
    x, t, w, opts = canonical_arguments(input, target, dims, weight, ignore_index,
                                        label_smoothing, logit_scale, softcap)
    if functional.target_check_wanted(x.device):
        _checks.check_target_range(t, C, ignore_index)

    reference = backends.transform_active()
    if reference:
        backends.resolve(backend, x.device)  # still refuses a backend that cannot run here
    names = linear_stats.requested(return_stats, return_z_loss, return_lse)
    returns = (return_stats, return_z_loss, return_lse)
    if names is not None and (reference or linear_stats.needs_pass(names)):
        return linear_stats.with_stats(x, linear_weight, linear_bias, t, w, opts, z_loss,
                                       reduction, backend, chunk_rows, reference, names,
                                       input.shape[:-1], out_dtype, *returns)
    if reference:
        loss = _unfused(x, linear_weight, linear_bias, t, w, opts, z_loss, reduction)
    else:
        # which gradients the forward forms: an exported program is called with any of them
        need = lambda v: v is not None and torch.is_grad_enabled() and (  # noqa: E731
            torch.compiler.is_exporting() or v.requires_grad)
        argmax = names is not None and bool(names & linear_stats.ARGMAX_STATS)
        loss, lse, *_, predicted = torch.ops.nllfused.linear_ce_fwd(
            x, linear_weight, linear_bias, t, w, *opts, z_loss, reduction, backend, chunk_rows,
            need(x), need(linear_weight), need(linear_bias), not compiling, argmax)
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    if names is None:
        return loss.to(out_dtype)
    kernel = [None, None, predicted] if argmax else None  # (entropy, target_logprob, predicted)
    return linear_stats.result(loss.to(out_dtype), lse, kernel, names, x, linear_weight, t,
                               opts, z_loss, reduction, input.shape[:-1], *returns)


def _whole_logits(input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                  label_smoothing, z_loss, logit_scale, softcap, backend, return_stats,
                  return_z_loss, return_lse):
    """linear_cross_entropy of a small problem: F.linear, then nllfused.cross_entropy on the
    logits (classes in dimension 1), the same results by the same formulas."""
    logits = F.linear(input, linear_weight, linear_bias)
    logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
    return functional.cross_entropy(
        logits, target, weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, logit_scale=logit_scale, softcap=softcap,
        backend=backend, return_stats=return_stats, return_z_loss=return_z_loss,
        return_lse=return_lse)


def _requested_rows(options, chunk_size, M: int, H: int, C: int) -> int:
    """Rows per chunk asked for (0: the automatic rule, _chunk_rows): chunk_size, else what
    torch's LinearCrossEntropyOptions says about it (as torch's chunked path reads it), else
    CHUNK_ROWS."""
    check_chunking(options, chunk_size)
    if chunk_size is not None:
        return chunk_size
    if options is not None:
        method, size = options.chunking_method, options.batch_chunk_size
        if method is None:  # no heuristic: batch_chunk_size, or one chunk
            return size or max(M, 1)
        if method != "auto":  # "aspect_ratio[:N]": a chunk's logits about the input's size
            factor = int(method.partition(":")[2] or 1)
            rows = -(-M // -(-C // max(H, 1)))
            rows = max(1, min((1 << (rows - 1).bit_length()) // factor, M))
            if size is not None and size != rows:
                raise ArgumentError(
                    f"options: batch_chunk_size (={size}) and chunking_method ({method!r}) give "
                    f"different chunk sizes ({size} vs {rows}); pass only one")
            return rows
        if size is not None:
            return size
    return int(CHUNK_ROWS or 0)


# ---------------------------------------------------------------------------------------------
# The ops: nllfused::linear_ce_fwd (autograd below) and nllfused::linear_ce_bwd
# ---------------------------------------------------------------------------------------------
# Their arguments: the (M, H) input, linear weight and bias, the (M,) int64 targets, the class
# weight in the accumulation dtype (_checks.check_weight), then the fields of _checks.Options in
# its order (the ce ops' schema, csrc/ops.cpp; prob_target is always False here).

def _linear_ce_fwd_impl(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                        target: Tensor, weight: Optional[Tensor], ignore_index: int,
                        label_smoothing: float, logit_scale: float, softcap: float,
                        prob_target: bool, z_loss: float, reduction: str, backend: str,
                        chunk_rows: int, grad_input: bool, grad_weight: bool, grad_bias: bool,
                        consume: bool, want_argmax: bool = False
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, aux, g_input, g_weight, g_bias, predicted).

    loss: torch_ref.reduce of the per-row losses with the z-loss term -- (M,) for 'none', else
    a scalar -- in the accumulation dtype. lse (M,) float64 and aux (M,) as ce_fwd defines them
    (csrc/ops.cpp). For 'mean'/'sum' with a grad_* flag set, g_* hold d loss / d (input, weight,
    bias) for an upstream gradient of 1 (g_input in the input's dtype, g_bias in the accumulation
    dtype, g_weight in _weight_grad_dtype: the accumulation dtype, or bfloat16 where it is
    summed by bfloat16 products); otherwise they are empty. `consume` only tells the autograd
    formula how to hand them over: True (in place, eager only -- a traced graph cannot replay
    it) or False (saved, scaled out of place); linear_cross_entropy passes False while
    torch.compile traces. predicted: with want_argmax the (M,) argmax of each row's z (return_stats'
    predicted / correct, taken from the chunks' logits by the forward pass), else empty.
    """
    options = Options(ignore_index, label_smoothing, logit_scale, softcap, prob_target)
    with _no_autocast(input):
        return _forward(input, linear_weight, linear_bias, target, weight, options, z_loss,
                        reduction, backend, chunk_rows, grad_input, grad_weight, grad_bias,
                        want_argmax)


_linear_ce_fwd = torch.library.custom_op("nllfused::linear_ce_fwd",
                                         mutates_args=())(_linear_ce_fwd_impl)


@_linear_ce_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
      logit_scale, softcap, prob_target, z_loss, reduction, backend, chunk_rows, grad_input,
      grad_weight, grad_bias, consume, want_argmax=False):
    torch._check(not prob_target, lambda: "linear_ce_fwd takes class-index targets only")
    M, C, acc = input.shape[0], linear_weight.shape[0], torch_ref.acc_dtype(input.dtype)
    store = reduction != "none"
    return (input.new_empty((M,) if reduction == "none" else (), dtype=acc),
            input.new_empty((M,), dtype=torch.float64), input.new_empty((M,), dtype=acc),
            input.new_empty(input.shape if store and grad_input else (0,)),
            input.new_empty(linear_weight.shape if store and grad_weight else (0,),
                            dtype=_weight_grad_dtype(input.dtype, input.device, M,
                                                     chunk_rows)),
            input.new_empty((C,) if store and grad_bias else (0,), dtype=acc),
            input.new_empty((M,) if want_argmax else (0,), dtype=torch.int64))


def _linear_ce_bwd_impl(grad_loss: Tensor, grad_lse: Optional[Tensor], input: Tensor,
                        linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
                        weight: Optional[Tensor], lse: Tensor, aux: Tensor, ignore_index: int,
                        label_smoothing: float, logit_scale: float, softcap: float,
                        prob_target: bool, backend: str, chunk_rows: int, grad_input: bool,
                        grad_weight: bool, grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_loss[i] * loss_i + grad_lse[i] * lse_i (loss_i the per-row
    cross-entropy, as ce_bwd) in (input, weight, bias), in their dtypes, by recomputing each
    chunk's logits; empty where not asked for. grad_loss must be 0 on ignored rows. No autograd
    formula: linear_ce_fwd's backward never calls it when a graph of the gradient is wanted."""
    options = Options(ignore_index, label_smoothing, logit_scale, softcap, prob_target)
    with _no_autocast(input):
        gi, gw, gb = _backward(grad_loss, grad_lse, input, linear_weight, linear_bias, target,
                               weight, lse, aux, options, backend, chunk_rows, grad_input,
                               grad_weight, grad_bias)
        return gi, gw.to(linear_weight.dtype), gb.to(_bias_like(linear_bias, input).dtype)


_linear_ce_bwd = torch.library.custom_op("nllfused::linear_ce_bwd",
                                         mutates_args=())(_linear_ce_bwd_impl)


@_linear_ce_bwd.register_fake
def _(grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, lse, aux,
      ignore_index, label_smoothing, logit_scale, softcap, prob_target, backend, chunk_rows,
      grad_input, grad_weight, grad_bias):
    return (input.new_empty(input.shape if grad_input else (0,)),
            linear_weight.new_empty(linear_weight.shape if grad_weight else (0,)),
            _bias_like(linear_bias, input).new_empty(linear_bias.shape if grad_bias else (0,)))


def _bias_like(linear_bias, input):
    return input if linear_bias is None else linear_bias


_N_OPTIONS = len(Options._fields)
_FWD_INPUTS = 14 + _N_OPTIONS  # nllfused::linear_ce_fwd's arguments: one gradient slot each


def _setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *rest = inputs
    ctx.options = Options(*rest[:_N_OPTIONS])
    (ctx.z_loss, ctx.reduction, ctx.backend, ctx.chunk_rows, gi_flag, gw_flag, gb_flag,
     consume) = rest[_N_OPTIONS:_N_OPTIONS + 8]
    _, lse, aux, g_input, g_weight, g_bias, _ = output
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs nobody differentiates
    ctx.dtypes = (linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
    ctx.stored = ctx.reduction != "none" and (gi_flag or gw_flag or gb_flag)
    ctx.consume = ctx.stored and consume
    saved = [input, linear_weight, linear_bias, target, weight, lse, aux]
    ctx.stash = None
    if ctx.consume:
        # Detached: the outputs' grad_fn is this node, and ctx -> output -> node would be a
        # reference cycle that keeps the gradients alive until a garbage collection.
        ctx.stash = [g.detach() for g in (g_input, g_weight, g_bias)]
    elif ctx.stored:
        saved += [g_input, g_weight, g_bias]
    ctx.save_for_backward(*saved)


def _linear_ce_fwd_backward(ctx, grad_out, _lse, _aux, _gi, _gw, _gb, _predicted):
    none = [None] * _FWD_INPUTS
    if grad_out is None:
        return tuple(none)
    input, linear_weight, linear_bias, target, weight, lse, aux, *stored = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and linear_bias is not None
    if torch.is_grad_enabled():
        # create_graph=True: the gradient must be differentiable itself (double backward,
        # Hessian-vector products), so differentiate the unfused torch reference instead.
        wanted = [p for p, n in zip((input, linear_weight, linear_bias), need) if n]
        with torch.enable_grad(), _no_autocast(input):
            out = _unfused(input, linear_weight, linear_bias, target, weight, ctx.options,
                           ctx.z_loss, ctx.reduction)
            grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                             allow_unused=True, materialize_grads=True))
        none[:3] = [next(grads) if n else None for n in need]
        return tuple(none)
    grads = None
    if ctx.stash is not None:
        # First backward: scale in place (a vmapped grad_out, is_grads_batched: out of place)
        # and hand the buffers over; nobody else holds them.
        stash, ctx.stash, vmapped = ctx.stash, None, torch_ref.vmapped(grad_out)
        grads = [g * grad_out if vmapped else g.mul_(grad_out) for g in stash]
    elif ctx.stored and not ctx.consume:
        grads = [g * grad_out for g in stored]
    if grads is not None:
        gi, gw, gb = grads
        gw = gw.to(ctx.dtypes[0])
        gb = gb.to(ctx.dtypes[1]) if ctx.dtypes[1] is not None else gb
    else:  # reduction 'none', or a second backward after the stored gradients were handed over
        counted = target != ctx.options.ignore_index
        grad_loss, grad_z = torch_ref.reduce_grads(grad_out, aux, ctx.reduction, False,
                                                   ctx.z_loss, counted)
        grad_lse = None if grad_z is None else torch_ref.z_loss_grad(lse, grad_z, ctx.z_loss)
        gi, gw, gb = torch.ops.nllfused.linear_ce_bwd(
            grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, lse, aux,
            *ctx.options, ctx.backend, ctx.chunk_rows, *need)
    none[:3] = [g if n else None for g, n in zip((gi, gw, gb), need)]
    return tuple(none)


_linear_ce_fwd.register_autograd(_linear_ce_fwd_backward, setup_context=_setup_context)


def _unfused(input, linear_weight, linear_bias, target, weight, options, z_loss, reduction):
    """The plain-torch reference of linear_ce_fwd's loss: F.linear, then torch_ref.forward and
    reduce. It materialises the (M, C) logits, but autograd (to any order), forward-mode AD and
    every torch.func transform differentiate it."""
    logits = F.linear(input, linear_weight, linear_bias).unsqueeze(-1)
    loss, lse, aux = torch_ref.forward(logits, target.unsqueeze(-1), weight, *options)
    counted = torch_ref.not_ignored(target, options.ignore_index)
    return torch_ref.reduce(loss[:, 0], lse[:, 0], aux[:, 0], reduction, False, z_loss, counted)


def _no_autocast(t: Tensor):
    """The op's products must run in the dtype they are given (linear_cross_entropy already did
    autocast's casting) and its float32 accumulators must stay float32."""
    return torch.autocast(t.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------

def _chunk_rows(M: int, C: int, dtype: torch.dtype, device: torch.device, backend: str,
                requested: int) -> int:
    """Rows per chunk: a function of the shapes, dtype, device type (and CPU) and backend only,
    so that every call sums in the same order (bitwise identical results) and no call asks the
    allocator anything (legal during CUDA-graph capture).

    A chunk of n rows holds n * row_bytes bytes of (n, C) buffers at once (_row_bytes). The
    chunk is the most rows that fit _CHUNK_BYTES_CAP[device type], but at least _MIN_ROWS (thin
    products run far below the GEMM's speed) and at most M; a multiple of 8.
    With bfloat16 weight gradients summed in bfloat16 (_bf16_weight_grad), at least
    M / _BF16_WEIGHT_GRAD_ROUNDINGS rows (rounded up to a multiple of 8), past the cap if need be.
    """
    if requested > 0:
        return max(1, min(requested, M))
    bf16_products = _bf16_weight_grad(dtype, device)
    row_bytes = _row_bytes(C, dtype, backend, bf16_products)
    rows = max(_MIN_ROWS, _CHUNK_BYTES_CAP.get(device.type, 1 << 30) // row_bytes)
    if rows > 8:
        rows -= rows % 8
    if bf16_products:
        fewest = -(-M // _BF16_WEIGHT_GRAD_ROUNDINGS)
        rows = max(rows, fewest + (-fewest) % 8)
    return max(1, min(rows, M))


def _bf16_weight_grad(dtype: torch.dtype, device: torch.device, M: int = 0,
                      requested: int = 0) -> bool:
    """Whether the weight gradient of `dtype` parameters on `device` is summed by bfloat16
    products into the returned bfloat16 gradient (BF16_WEIGHT_GRAD): not where `requested`
    rows per chunk (0: the automatic rule, which keeps the bound) would split M rows into more
    than _BF16_WEIGHT_GRAD_ROUNDINGS chunks, each a rounding of the sum in bfloat16."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    if requested > 0 and -(-M // max(1, min(requested, M))) > _BF16_WEIGHT_GRAD_ROUNDINGS:
        return False
    if BF16_WEIGHT_GRAD is not None:
        return BF16_WEIGHT_GRAD
    return _cpu_has_bf16_products()


def _cpu_has_bf16_products() -> bool:
    """AMX or AVX512-BF16, as torch.cpu reports them (older torch: no such query, False)."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def _row_bytes(C: int, dtype: torch.dtype, backend: str, bf16_products: bool = False) -> int:
    """Bytes of (n, C) buffers alive at once, per chunk row.

    The logits buffer, which becomes the chunk's gradient in place: with the "torch" backend
    directly; with the fused ops through ce_bwd_inplace where the backend's kernel writes over
    its input (cpu, triton: _in_place_backward), else ce_bwd on one 1/_OPS_SLICES slice of the
    chunk at a time, copied back. Low precision adds float32 rows: the upcast the "torch"
    backend works in, and the float32 copy of the gradient that the CPU's weight-gradient
    product accumulates from (counted on CUDA too, where that product is a bounded block) unless
    that product runs in bfloat16 (bf16_products, _bf16_weight_grad)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    low = dtype in (torch.float16, torch.bfloat16)
    if backend == "torch":
        return C * (itemsize + (8 if low else 0))
    in_place = _in_place_backward(backend) is not None
    slice_bytes = 0 if in_place else C * itemsize // _OPS_SLICES  # the slice ce_bwd returns
    return C * itemsize + slice_bytes + C * (4 if low and not bf16_products else 0)


def _in_place_backward(backend: str):
    """ce_bwd_inplace of a backend whose kernel stores the gradient over the logits it reads
    (csrc/ops.cpp): cpu, triton, and for cuda Triton's where Triton loads (ops.triton_for_cuda);
    None where it would be ce_bwd and a copy (cuda without Triton) or there is none (torch)."""
    backend = ops.triton_for_cuda(backend)
    return ops.inplace_backward_for_backend(backend) if backend in ("cpu", "triton") else None


class _Chunks:
    """The per-chunk work shared by forward and backward: logits, the backend's ops, and the
    accumulation of the three gradients."""

    def __init__(self, input, linear_weight, linear_bias, target, weight, options, backend,
                 chunk_rows, grad_input, grad_weight, grad_bias):
        self.x, self.W, self.b, self.t, self.w = input, linear_weight, linear_bias, target, weight
        self.options = options
        # Resolved here, at run time, rather than in linear_cross_entropy: the free-memory probe
        # of _chunk_rows is not traceable, and the op body is opaque to torch.compile.
        self.backend = backends.resolve(backend, input.device)
        self.fwd, self.bwd = ops.for_backend(self.backend)
        self.stats_fwd = None if self.backend == "torch" else ops.stats_for_backend(self.backend)
        self.bwd_inplace = _in_place_backward(self.backend)
        M, C = input.shape[0], linear_weight.shape[0]
        self.acc = torch_ref.acc_dtype(input.dtype)
        self.rows = _chunk_rows(M, C, input.dtype, input.device, self.backend, chunk_rows)
        self._logits = input.new_empty((min(self.rows, M), C))  # reused by every chunk
        self.gi = input.new_empty(input.shape if grad_input else (0,))
        # Accumulators: float32 (float64 for float64) whatever the parameters' dtype, but for
        # a bfloat16 weight on a CPU with bfloat16 products, whose gradient sums in the returned
        # bfloat16 tensor itself (_bf16_weight_grad). The first chunk writes them (no zero-fill
        # pass over a weight-sized buffer); see finish().
        self.bf16_products = _bf16_weight_grad(input.dtype, input.device, M, chunk_rows)
        self.gw = input.new_empty(linear_weight.shape if grad_weight else (0,),
                                  dtype=_weight_grad_dtype(input.dtype, input.device, M,
                                                           chunk_rows))
        self.gb = input.new_empty((C,) if grad_bias else (0,), dtype=self.acc)
        self.want = (grad_input, grad_weight, grad_bias)
        self.first = True

    def ranges(self):
        M = self.x.shape[0]
        return ((r, min(r + self.rows, M)) for r in range(0, M, self.rows))

    def logits(self, r0, r1):
        out = self._logits[: r1 - r0]
        if self.b is None:
            return torch.mm(self.x[r0:r1], self.W.t(), out=out)
        return torch.addmm(self.b, self.x[r0:r1], self.W.t(), out=out)

    def forward(self, logits, r0, r1, grad_loss=None, grad_z=None, z_loss=0.0, argmax=None):
        """(loss (n,), lse (n,) float64, g) for a chunk. With grad_loss (the rows' shares of the
        reduced loss, torch_ref.reduce_grads, as grad_z), g is the gradient of the reduced loss
        in the chunk's logits, written over them (g is `logits`). argmax: None, or an (M,)
        tensor that receives the chunk's rows' argmax of z -- from the statistics kernel's pass
        where the backend has one, else by torch ops on the logits before g overwrites them."""
        t = self.t[r0:r1]
        kernel = self.stats_fwd if argmax is not None else None
        if argmax is not None and kernel is None:  # first: the torch backend's pass writes exp
            argmax[r0:r1] = linear_stats.chunk_argmax(logits, self.options)  # (z - m) over z
        if self.backend == "torch":
            loss, lse, grad = torch_ref.chunk_loss_and_grad(logits, t, self.w, self.options)
        else:
            extra = {} if kernel is None else {"with_entropy": False}  # the argmax alone
            out = (kernel or self.fwd)(logits.unsqueeze(-1), t.unsqueeze(-1), self.w,
                                       *self.options, **extra)
            loss, lse, aux = out[0][:, 0], out[1][:, 0], out[2][:, 0]
        if kernel is not None:
            argmax[r0:r1] = out[5][:, 0]
        if grad_loss is None:
            return loss, lse, None
        grad_lse = None if grad_z is None else torch_ref.z_loss_grad(lse, grad_z, z_loss)
        if self.backend == "torch":
            return loss, lse, _over(logits, grad(grad_loss, grad_lse))
        return loss, lse, self._ops_grad(logits, t, grad_loss, grad_lse, lse, aux)

    def backward(self, logits, r0, r1, grad_loss, grad_lse, lse, aux):
        """The chunk's gradient from the lse and aux saved by the forward pass, written over
        the logits."""
        t = self.t[r0:r1]
        if self.backend == "torch":
            grad = torch_ref.chunk_loss_and_grad(logits, t, self.w, self.options)[2]
            return _over(logits, grad(grad_loss, grad_lse))
        return self._ops_grad(logits, t, grad_loss, grad_lse, lse, aux)

    def _ops_grad(self, logits, t, grad_loss, grad_lse, lse, aux):
        if self.bwd_inplace is not None:  # the kernel stores the gradient over the logits
            self.bwd_inplace(grad_loss.unsqueeze(-1),
                             None if grad_lse is None else grad_lse.unsqueeze(-1),
                             logits.unsqueeze(-1), t.unsqueeze(-1), self.w, lse.unsqueeze(-1),
                             aux.unsqueeze(-1), *self.options)
            return logits
        # ce_bwd returns a new tensor; run it on 1/_OPS_SLICES of the chunk at a time and copy
        # each result over the logits it came from (no longer needed), so the chunk holds its
        # logits plus a slice, not twice its logits.
        step = -(-logits.shape[0] // _OPS_SLICES)
        for s0 in range(0, logits.shape[0], step):
            s = slice(s0, min(s0 + step, logits.shape[0]))
            g = self.bwd(grad_loss[s].unsqueeze(-1),
                         None if grad_lse is None else grad_lse[s].unsqueeze(-1),
                         logits[s].unsqueeze(-1), t[s].unsqueeze(-1), self.w,
                         lse[s].unsqueeze(-1), aux[s].unsqueeze(-1), *self.options)
            logits[s].copy_(g.squeeze(-1))
        return logits

    def accumulate(self, g, r0, r1):
        """Fold a chunk's logits gradient g (n, C) into the three gradients."""
        if self.want[0]:
            torch.mm(g, self.W, out=self.gi[r0:r1])
        if self.want[1]:
            gt, x = g.t(), self.x[r0:r1]
            if self.bf16_products:
                # bfloat16 products, float32 sums inside each, added into the bfloat16 gradient
                # (one rounding per chunk; _chunk_rows bounds the chunks).
                if self.first:
                    torch.mm(gt, x, out=self.gw)
                else:
                    self.gw.addmm_(gt, x)
            elif g.dtype != self.acc and g.is_cuda:
                # Low precision on CUDA: tensor-core products with a float32 result (cuBLAS
                # accumulates in float32), added to the float32 accumulator one block of
                # classes at a time, so the float32 product is a bounded temporary.
                block = max(1, (256 << 20) // (4 * max(1, x.shape[1])))
                for c0 in range(0, gt.shape[0], block):
                    part = torch.mm(gt[c0:c0 + block], x, out_dtype=self.acc)
                    dst = self.gw[c0:c0 + block]
                    dst.copy_(part) if self.first else dst.add_(part)
            else:
                if g.dtype != self.acc:
                    # Low precision on the CPU: it has no mixed-dtype GEMM, and its float32
                    # GEMM is faster than its emulated bfloat16 one.
                    gt, x = gt.to(self.acc), x.to(self.acc)
                if self.first:
                    torch.mm(gt, x, out=self.gw)
                else:
                    self.gw.addmm_(gt, x)
        if self.want[2]:
            if self.first:
                torch.sum(g, 0, dtype=self.acc, out=self.gb)
            else:
                self.gb.add_(g.sum(0, dtype=self.acc))
        self.first = False

    def finish(self):
        """(g_input, g_weight, g_bias); zeros where no chunk ran (no rows)."""
        if self.first:
            self.gw.zero_()
            self.gb.zero_()
        return self.gi, self.gw, self.gb


def _weight_grad_dtype(dtype: torch.dtype, device: torch.device, M: int,
                       requested: int) -> torch.dtype:
    """dtype of linear_ce_fwd's g_weight (and of _Chunks' weight-gradient sum): the accumulation
    dtype, or bfloat16 where the sum runs in bfloat16 products (_bf16_weight_grad)."""
    bf16 = _bf16_weight_grad(dtype, device, M, requested)
    return dtype if bf16 else torch_ref.acc_dtype(dtype)


def _over(logits, g):
    """g, in the chunk's logits buffer (it is that buffer already unless dtypes differ)."""
    return g if g.data_ptr() == logits.data_ptr() else logits.copy_(g)


def _forward(input, linear_weight, linear_bias, target, weight, options, z_loss, reduction,
             backend, chunk_rows, grad_input, grad_weight, grad_bias, want_argmax):
    M = input.shape[0]
    store = reduction != "none" and (grad_input or grad_weight or grad_bias)
    ch = _Chunks(input, linear_weight, linear_bias, target, weight, options, backend, chunk_rows,
                 grad_input and store, grad_weight and store, grad_bias and store)
    aux = torch_ref.row_weights(target, weight, options.ignore_index, linear_weight.shape[0],
                                ch.acc)
    counted = torch_ref.not_ignored(target, options.ignore_index)
    loss = input.new_empty((M,), dtype=ch.acc)
    lse = input.new_empty((M,), dtype=torch.float64)
    predicted = input.new_empty((M,) if want_argmax else (0,), dtype=torch.int64)
    grad_loss = grad_z = None
    if store:  # each row's share of the reduced loss (torch_ref.reduce_grads), on the device
        one = torch.ones((), dtype=ch.acc, device=input.device)
        grad_loss, grad_z = torch_ref.reduce_grads(one, aux, reduction, False, z_loss, counted)
    for r0, r1 in ch.ranges():
        logits = ch.logits(r0, r1)
        loss[r0:r1], lse[r0:r1], g = ch.forward(
            logits, r0, r1, None if grad_loss is None else grad_loss[r0:r1],
            None if grad_z is None else grad_z[r0:r1], z_loss, predicted if want_argmax else None)
        if g is not None:
            ch.accumulate(g, r0, r1)
    out = torch_ref.reduce(loss, lse, aux, reduction, False, z_loss, counted)
    return (out, lse, aux, *ch.finish(), predicted)


def _backward(grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, lse, aux,
              options, backend, chunk_rows, grad_input, grad_weight, grad_bias):
    ch = _Chunks(input, linear_weight, linear_bias, target, weight, options, backend, chunk_rows,
                 grad_input, grad_weight, grad_bias)
    if grad_input or grad_weight or grad_bias:
        for r0, r1 in ch.ranges():
            logits = ch.logits(r0, r1)
            g = ch.backward(logits, r0, r1, grad_loss[r0:r1],
                            None if grad_lse is None else grad_lse[r0:r1], lse[r0:r1],
                            aux[r0:r1])
            ch.accumulate(g, r0, r1)
    return ch.finish()


# return_stats's ops (nllfused/linear_stats.py), which run these chunks.
_linear_ce_stats, _linear_ce_stats_bwd = linear_stats.define_ops(_Chunks)
