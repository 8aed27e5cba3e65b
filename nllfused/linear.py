"""nllfused.linear_cross_entropy: F.cross_entropy(F.linear(input, W, b), target) without the logits.

For a language model the logits (tokens x vocabulary) are the largest tensor of the step, and
torch's loss adds three more of their size. Here they never exist: the rows (tokens) are taken in
chunks of n, each chunk's logits (n, C) come from one matrix product (cuBLAS / oneDNN through
torch), go through the backend's per-row op -- the same nllfused::ce_fwd / ce_bwd pair that
nllfused.cross_entropy uses, so every option means exactly what it means there (the "torch"
backend: the same formulas in torch ops, _torch_chunk) -- and are dropped. No tensor of N*C
elements is allocated, in the forward or the backward pass.

Strategy (one fused op, nllfused::linear_ce_fwd, with its own autograd):
  * reduction 'mean'/'sum' -- the upstream gradient is a scalar, so while a chunk's logits are at
    hand the forward pass also forms their gradient (ce_bwd with the per-row weight 1/denominator
    or 1) and folds it into grad_input (= g @ W), grad_weight (+= g.T @ x) and grad_bias
    (+= g.sum(0)). Three matrix products in all, like unfused torch. The backward pass only scales
    the stored gradients by the upstream scalar, in place: they are buffers no one else holds
    (torch's own chunked linear_cross_entropy does the same). This happens only when grad mode
    is on and something requires grad; a second backward (retain_graph=True) or a double
    backward (create_graph=True) recomputes instead, so results stay right.
    The stored gradients are the gradients themselves, held from the forward to the backward
    pass. Under torch.compile they are saved the ordinary way and scaled out of place (one extra
    gradient-sized buffer in the backward): the in-place hand-over is Python state that a
    compiled graph does not replay.
  * reduction 'none' -- the upstream gradient is a vector known only in backward: the backward
    op (nllfused::linear_ce_bwd) recomputes each chunk's logits (four matrix products in all).
Chunk size: see _chunk_rows (shapes and free memory); CHUNK_ROWS overrides it (tests use it).
Precision: logits, their gradient and grad_input are in the parameters' dtype (as torch computes
them); per-row losses, the reduction, grad_weight and grad_bias accumulate in float32 (float64
for float64), rounded once to the parameters' dtype at the end.
Autocast: as torch does for F.linear + F.cross_entropy, the matrix products run in the autocast
dtype and the loss comes back in float32; gradients arrive in the parameters' own dtypes.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks, backends, functional, ops
from .modules import LossOptions

# Rows per chunk: None picks them from the shapes and free memory (_chunk_rows); an int forces
# that many (tests set it small to cross many chunk boundaries).
CHUNK_ROWS: Optional[int] = None

# The (n, C) buffers a chunk holds at once (_row_bytes) are kept below min(cap, free memory / 8).
# CPU: 44 MiB is 1/6 of the float32 logits at 2048 x 32000 (360 rows with the "torch" backend,
# 320 with the C++ one); thinner chunks lose GEMM speed on the CPU (measured on our 2-core
# machines: 128-row products ~1.5x slower than full-size ones, 256 rows ~1.15x, 320+ ~1.05x).
# CUDA: 1 GiB, e.g. ~650 rows of a 256K bfloat16 vocabulary, thick enough for cuBLAS.
_CHUNK_BYTES_CAP = {"cpu": 44 << 20, "cuda": 1 << 30}
_MIN_ROWS = 32
_OPS_SLICES = 8  # the fused ops' ce_bwd runs on 1/8 of a chunk at a time (_Chunks._ops_grad)


# ---------------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------------

def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor,
                         linear_bias: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                         ignore_index: Optional[int] = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                         logit_scale: float = 1.0, softcap: Optional[float] = None,
                         backend: str = "auto") -> Tensor:
    """F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) without the logits.

    input (*, H) -- (H,), (N, H), (B, T, H), ... -- linear_weight (C, H), linear_bias (C,) or None,
    target (*) class indices (ignore_index allowed); weight, ignore_index, reduction and
    label_smoothing as in F.cross_entropy; z_loss, logit_scale, softcap and backend as in
    nllfused.cross_entropy. ignore_index=None means -100, as in torch.nn.functional's
    linear_cross_entropy, whose keyword arguments this accepts unchanged (its `options`, a
    chunking hint for its own implementation, has no counterpart here).
    Returns the loss (shape input.shape[:-1] for reduction='none', else a scalar) in the input's
    dtype, float32 under autocast; differentiable in input, linear_weight and linear_bias.
    """
    reduction = _checks.resolve_reduction(None, None, reduction)
    _checks.check_options(label_smoothing, z_loss, logit_scale, softcap)
    if ignore_index is None:
        ignore_index = -100
    input, linear_weight, linear_bias, out_dtype = _autocast(input, linear_weight, linear_bias)
    x, t, w = _check_arguments(input, linear_weight, target, linear_bias, weight, ignore_index)
    if not isinstance(backend, str) or backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of "
                         f"{', '.join(backends.BACKENDS)}")
    if not torch.compiler.is_compiling() and (
            x.device.type == "cpu" or functional._CHECK_TARGETS_ON_GPU):
        _checks.check_target_range(t, linear_weight.shape[0], ignore_index)

    grad = torch.is_grad_enabled()
    loss = torch.ops.nllfused.linear_ce_fwd(
        x, linear_weight, linear_bias, t, w, ignore_index, float(label_smoothing),
        float(z_loss), float(logit_scale), float(softcap or 0.0), reduction, backend,
        int(CHUNK_ROWS or 0),
        grad and x.requires_grad, grad and linear_weight.requires_grad,
        grad and linear_bias is not None and linear_bias.requires_grad,
        not torch.compiler.is_compiling())[0]
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    return loss.to(out_dtype)


class LinearCrossEntropyLoss(LossOptions):
    """torch.nn.LinearCrossEntropyLoss, fused: holds the linear layer (self.linear, (C, H) weight,
    optional bias) and the loss options; forward(input, target) returns
    nllfused.linear_cross_entropy(input, self.linear.weight, target, self.linear.bias, ...).

    The constructor is torch's (in_features, num_classes, *, bias, device, dtype, reduction,
    weight, ignore_index, label_smoothing) plus nllfused's keyword-only z_loss, logit_scale,
    softcap and backend. K-dimensional losses (out_features != ()) are not supported.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Optional[Tensor] = None, ignore_index: Optional[int] = None,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, logit_scale: float = 1.0,
                 softcap: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise NotImplementedError(
                "nllfused.LinearCrossEntropyLoss supports out_features=() only (one class "
                "dimension); K-dimensional losses are not implemented")
        self._set_options(_checks.resolve_reduction(None, None, reduction), label_smoothing,
                          z_loss, logit_scale, softcap, backend)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},); got {tuple(weight.shape)}")
        self.num_classes = num_classes
        self.out_features = ()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, self.linear.bias, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            logit_scale=self.logit_scale, softcap=self.softcap, backend=self.backend)

    def extra_repr(self) -> str:
        extras = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                  f"bias={self.linear.bias is not None}", f"reduction={self.reduction!r}",
                  f"ignore_index={self.ignore_index}"]
        return ", ".join(extras + self._options_repr())


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _autocast(input, linear_weight, linear_bias):
    """Cast as torch's autocast would for F.linear; the loss then comes back in float32 (autocast
    runs cross_entropy in float32). float64 tensors are left alone, as autocast leaves them."""
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias, getattr(input, "dtype", None)
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    out_dtype = torch.float32 if input.is_floating_point() and input.dtype != torch.float64 \
        else input.dtype
    return cast(input), cast(linear_weight), cast(linear_bias), out_dtype


def _check_arguments(input, linear_weight, target, linear_bias, weight, ignore_index):
    """Validate; return the (M, H) input, the (M,) int64 targets and the canonical class weight."""
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor; got {type(t).__name__}")
    if linear_bias is not None and not isinstance(linear_bias, Tensor):
        raise TypeError(f"linear_bias must be a Tensor or None; got {type(linear_bias).__name__}")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"input must be float16, bfloat16, float32 or float64; got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input is 0-dimensional: it must have shape (*, in_features), e.g. "
                         "(N, H) or (B, T, H)")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must have shape (num_classes, in_features); got "
            f"{tuple(linear_weight.shape)}")
    C, H = linear_weight.shape
    if input.shape[-1] != H:
        raise ValueError(
            f"input's last dimension ({input.shape[-1]}) must equal linear_weight's in_features "
            f"({H}): input {tuple(input.shape)}, linear_weight {tuple(linear_weight.shape)}")
    if C == 0:
        raise ValueError("linear_weight has 0 rows: there must be at least one class")
    if linear_bias is not None and tuple(linear_bias.shape) != (C,):
        raise ValueError(f"linear_bias must have shape ({C},); got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            raise TypeError(
                f"{name} is {t.dtype} but input is {input.dtype}: they must match (or run "
                f"under torch.autocast), as in F.linear")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if target.is_floating_point():
        raise TypeError(
            f"target must hold class indices (an integer tensor); got {target.dtype}. "
            f"Probability targets are not supported by linear_cross_entropy: use "
            f"nllfused.cross_entropy(F.linear(input, linear_weight, linear_bias), target)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(input.shape)}: class-index targets must have shape "
            f"{tuple(input.shape[:-1])} (the input's shape without in_features)")
    M = math.prod(input.shape[:-1])
    x = input.reshape(M, H)
    t = target.reshape(M)
    # The rest (target dtype and device, class weight shape/dtype/device, ignore_index) is
    # cross_entropy's own check, run on a zero-stride stand-in for the (M, C) logits.
    stand_in = input.new_zeros(()).expand(M, C)
    canonical = _checks.canonicalize(stand_in, t, weight, ignore_index)
    return x, t.long(), canonical.weight


# ---------------------------------------------------------------------------------------------
# The ops: nllfused::linear_ce_fwd (autograd below) and nllfused::linear_ce_bwd
# ---------------------------------------------------------------------------------------------

def _linear_ce_fwd_impl(input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor],
                        target: Tensor, weight: Optional[Tensor], ignore_index: int,
                        label_smoothing: float, z_loss: float, logit_scale: float,
                        softcap: float, reduction: str, backend: str, chunk_rows: int,
                        grad_input: bool, grad_weight: bool, grad_bias: bool, consume: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, lse, aux, g_input, g_weight, g_bias).

    loss: (M,) per-row losses for reduction 'none', else the reduced scalar, in the accumulation
    dtype. lse (M,) float64 and aux (M,) as ce_fwd defines them (csrc/ops.cpp). For 'mean'/'sum'
    with a grad_* flag set, g_* hold d loss / d (input, weight, bias) for an upstream gradient of
    1 (g_input in the input's dtype, g_weight and g_bias in the accumulation dtype); otherwise
    they are empty. `consume` only tells the autograd formula how to hand them over: True (in
    place, eager only -- a traced graph cannot replay it) or False (saved, scaled out of place);
    linear_cross_entropy passes False while torch.compile traces it.
    """
    with _no_autocast(input):
        return _forward(input, linear_weight, linear_bias, target, weight,
                        (ignore_index, label_smoothing, z_loss, logit_scale, softcap),
                        reduction, backend, chunk_rows, grad_input, grad_weight, grad_bias)


_linear_ce_fwd = torch.library.custom_op("nllfused::linear_ce_fwd",
                                         mutates_args=())(_linear_ce_fwd_impl)


@_linear_ce_fwd.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss,
      logit_scale, softcap, reduction, backend, chunk_rows, grad_input, grad_weight, grad_bias,
      consume):
    M, C, acc = input.shape[0], linear_weight.shape[0], _checks.accumulation_dtype(input.dtype)
    store = reduction != "none"
    return (input.new_empty((M,) if reduction == "none" else (), dtype=acc),
            input.new_empty((M,), dtype=torch.float64), input.new_empty((M,), dtype=acc),
            input.new_empty(input.shape if store and grad_input else (0,)),
            input.new_empty(linear_weight.shape if store and grad_weight else (0,), dtype=acc),
            input.new_empty((C,) if store and grad_bias else (0,), dtype=acc))


def _linear_ce_bwd_impl(grad_rows: Tensor, input: Tensor, linear_weight: Tensor,
                        linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
                        lse: Tensor, aux: Tensor, ignore_index: int, label_smoothing: float,
                        z_loss: float, logit_scale: float, softcap: float, backend: str,
                        chunk_rows: int, grad_input: bool, grad_weight: bool, grad_bias: bool
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i in (input, weight, bias), in their dtypes, by
    recomputing each chunk's logits; empty where not asked for. No autograd formula: a double
    backward through it raises torch's 'no autograd formula' error instead of a wrong answer."""
    with _no_autocast(input):
        gi, gw, gb = _backward(grad_rows, input, linear_weight, linear_bias, target, weight, lse,
                               aux, (ignore_index, label_smoothing, z_loss, logit_scale, softcap),
                               backend, chunk_rows, grad_input, grad_weight, grad_bias)
        return gi, gw.to(linear_weight.dtype), gb.to(_bias_like(linear_bias, input).dtype)


_linear_ce_bwd = torch.library.custom_op("nllfused::linear_ce_bwd",
                                         mutates_args=())(_linear_ce_bwd_impl)


@_linear_ce_bwd.register_fake
def _(grad_rows, input, linear_weight, linear_bias, target, weight, lse, aux, ignore_index,
      label_smoothing, z_loss, logit_scale, softcap, backend, chunk_rows, grad_input,
      grad_weight, grad_bias):
    return (input.new_empty(input.shape if grad_input else (0,)),
            linear_weight.new_empty(linear_weight.shape if grad_weight else (0,)),
            _bias_like(linear_bias, input).new_empty(linear_bias.shape if grad_bias else (0,)))


def _bias_like(linear_bias, input):
    return input if linear_bias is None else linear_bias


_FWD_INPUTS = 17  # number of nllfused::linear_ce_fwd arguments: backward returns one per input


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, *options, reduction, backend, chunk_rows,
     gi_flag, gw_flag, gb_flag, consume) = inputs
    _, lse, aux, g_input, g_weight, g_bias = output
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs nobody differentiates
    ctx.options, ctx.reduction, ctx.backend, ctx.chunk_rows = options, reduction, backend, \
        chunk_rows
    ctx.dtypes = (linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
    ctx.stored = reduction != "none" and (gi_flag or gw_flag or gb_flag)
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


def _linear_ce_fwd_backward(ctx, grad_loss, _lse, _aux, _gi, _gw, _gb):
    none = [None] * _FWD_INPUTS
    if grad_loss is None:
        return tuple(none)
    need = ctx.needs_input_grad[:3]
    input, linear_weight, linear_bias, target, weight, lse, aux, *stored = ctx.saved_tensors
    grads = None
    if ctx.stored and not torch.is_grad_enabled():  # create_graph=True: recompute below
        if ctx.stash is not None:
            # First backward: scale in place and hand the buffers over; nobody else holds them.
            stash, ctx.stash = ctx.stash, None
            grads = [g.mul_(grad_loss) for g in stash]
        elif not ctx.consume:
            grads = [g * grad_loss for g in stored]
    if grads is not None:
        gi, gw, gb = grads
        gw = gw.to(ctx.dtypes[0])
        gb = gb.to(ctx.dtypes[1]) if ctx.dtypes[1] is not None else gb
    else:
        if ctx.reduction == "none":
            rows = grad_loss
        else:  # each row's share of a scalar loss: grad / denominator ('mean') or grad ('sum')
            scale = grad_loss / aux.sum() if ctx.reduction == "mean" else grad_loss
            rows = scale.expand(input.shape[0])
        gi, gw, gb = torch.ops.nllfused.linear_ce_bwd(
            rows, input, linear_weight, linear_bias, target, weight, lse, aux, *ctx.options,
            ctx.backend, ctx.chunk_rows, need[0], need[1], need[2] and linear_bias is not None)
    none[:3] = [gi if need[0] else None, gw if need[1] else None,
                gb if need[2] and linear_bias is not None else None]
    return tuple(none)


_linear_ce_fwd.register_autograd(_linear_ce_fwd_backward, setup_context=_setup_context)


def _no_autocast(t: Tensor):
    """The op's products must run in the dtype they are given (linear_cross_entropy already did
    autocast's casting) and its float32 accumulators must stay float32."""
    return torch.autocast(t.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------

def _chunk_rows(M: int, C: int, dtype: torch.dtype, device: torch.device, backend: str,
                requested: int) -> int:
    """Rows per chunk.

    A chunk of n rows holds n * row_bytes bytes of (n, C) buffers at once (_row_bytes). The
    chunk is the most rows that fit min(_CHUNK_BYTES_CAP[device], free memory / 8), but at least
    _MIN_ROWS (thin products run far below the GEMM's speed) and at most M; a multiple of 8.
    """
    if requested > 0:
        return max(1, min(requested, M))
    row_bytes = _row_bytes(C, dtype, backend)
    budget = min(_CHUNK_BYTES_CAP.get(device.type, 1 << 30), _free_memory(device) // 8)
    rows = max(_MIN_ROWS, budget // row_bytes)
    if rows > 8:
        rows -= rows % 8
    return max(1, min(rows, M))


def _row_bytes(C: int, dtype: torch.dtype, backend: str) -> int:
    """Bytes of (n, C) buffers alive at once, per chunk row.

    The logits buffer, which becomes the chunk's gradient in place: with the "torch" backend
    directly; with the fused ops, whose ce_bwd returns a new tensor, one 1/_OPS_SLICES slice of
    the chunk at a time, copied back. Low precision adds float32 rows: the upcast the "torch"
    backend works in, and the float32 copy of the gradient that the CPU's weight-gradient
    product accumulates from (counted on CUDA too, where that product is a bounded block)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    low = dtype in (torch.float16, torch.bfloat16)
    if backend == "torch":
        return C * (itemsize + (8 if low else 0))
    return C * itemsize * (_OPS_SLICES + 1) // _OPS_SLICES + C * (4 if low else 0)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # a driver query, not a stream sync
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _row_weights(target: Tensor, weight: Optional[Tensor], ignore_index: int, C: int,
                 acc: torch.dtype) -> Tensor:
    """aux of ce_fwd for every row, from the targets alone (the 'mean' denominator is its sum,
    needed before the first chunk): w[y] counted, 0 ignored, NaN out of range."""
    counted = target != ignore_index
    in_range = (target >= 0) & (target < C)
    if weight is None:
        w = torch.ones(target.shape, dtype=acc, device=target.device)
    else:
        w = weight[torch.where(counted & in_range, target, 0)]
    nan = torch.full((), float("nan"), dtype=acc, device=target.device)
    return torch.where(counted, torch.where(in_range, w, nan), torch.zeros((), dtype=acc,
                                                                             device=target.device))


class _Chunks:
    """The per-chunk work shared by forward and backward: logits, the backend's ops, and the
    accumulation of the three gradients."""

    def __init__(self, input, linear_weight, linear_bias, target, weight, options, backend,
                 chunk_rows, grad_input, grad_weight, grad_bias):
        self.x, self.W, self.b, self.t, self.w = input, linear_weight, linear_bias, target, weight
        self.options = options
        # Resolved here, at run time, rather than in linear_cross_entropy: the availability
        # probes are not traceable, and the op body is opaque to torch.compile.
        self.backend = backends.resolve(backend, input.device)
        M, C = input.shape[0], linear_weight.shape[0]
        self.acc = _checks.accumulation_dtype(input.dtype)
        self.rows = _chunk_rows(M, C, input.dtype, input.device, self.backend, chunk_rows)
        self._logits = input.new_empty((min(self.rows, M), C))  # reused by every chunk
        self.gi = input.new_empty(input.shape if grad_input else (0,))
        # Accumulators: float32 (float64 for float64) whatever the parameters' dtype. The first
        # chunk writes them (no zero-fill pass over a weight-sized buffer); see finish().
        self.gw = input.new_empty(linear_weight.shape if grad_weight else (0,), dtype=self.acc)
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

    def forward(self, logits, r0, r1, grad_rows=None):
        """(loss (n,), lse (n,) float64, g) for a chunk. With grad_rows, g is the gradient of
        sum_i grad_rows[i] * loss_i in the logits, written over them (g is `logits`)."""
        t = self.t[r0:r1]
        if self.backend == "torch":
            loss, lse, g = _torch_chunk(logits, t, self.w, self.options,
                                        None if grad_rows is None else self._mask(grad_rows, t))
            return loss, lse, None if g is None else _over(logits, g)
        loss, lse, aux = ops.forward_op(self.backend)(
            logits.unsqueeze(-1), t.unsqueeze(-1), self.w, *self.options, False)
        g = None
        if grad_rows is not None:
            g = self._ops_grad(logits, t, grad_rows, lse[:, 0], aux[:, 0])
        return loss[:, 0], lse[:, 0], g

    def backward(self, logits, r0, r1, grad_rows, lse, aux):
        """The chunk's gradient from the lse and aux saved by the forward pass, written over
        the logits."""
        t = self.t[r0:r1]
        if self.backend == "torch":
            return _over(logits, _torch_chunk(logits, t, self.w, self.options,
                                              self._mask(grad_rows, t))[2])
        return self._ops_grad(logits, t, grad_rows, lse, aux)

    def _ops_grad(self, logits, t, grad_rows, lse, aux):
        # ce_bwd returns a new tensor; run it on 1/_OPS_SLICES of the chunk at a time and copy
        # each result over the logits it came from (no longer needed), so the chunk holds its
        # logits plus a slice, not twice its logits.
        grad_rows = self._mask(grad_rows, t)
        step = -(-logits.shape[0] // _OPS_SLICES)
        for s0 in range(0, logits.shape[0], step):
            s1 = min(s0 + step, logits.shape[0])
            g = ops.backward_op(self.backend)(
                grad_rows[s0:s1].unsqueeze(-1), logits[s0:s1].unsqueeze(-1),
                t[s0:s1].unsqueeze(-1), self.w, lse[s0:s1].unsqueeze(-1),
                aux[s0:s1].unsqueeze(-1), *self.options, False)
            logits[s0:s1].copy_(g.squeeze(-1))
        return logits

    def _mask(self, grad_rows, t):
        # Ignored rows get zero gradient whatever the upstream value (an all-ignored 'mean' has
        # 1/0 there), as torch gives them.
        return torch.where(t != self.options[0], grad_rows.to(self.acc), 0)

    def accumulate(self, g, r0, r1):
        """Fold a chunk's logits gradient g (n, C) into the three gradients."""
        if self.want[0]:
            torch.mm(g, self.W, out=self.gi[r0:r1])
        if self.want[1]:
            gt, x = g.t(), self.x[r0:r1]
            if g.dtype != self.acc and g.is_cuda:
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


def _over(logits, g):
    """g, in the chunk's logits buffer (it is that buffer already unless dtypes differ)."""
    return g if g.data_ptr() == logits.data_ptr() else logits.copy_(g)


def _forward(input, linear_weight, linear_bias, target, weight, options, reduction, backend,
             chunk_rows, grad_input, grad_weight, grad_bias):
    M = input.shape[0]
    store = reduction != "none" and (grad_input or grad_weight or grad_bias)
    ch = _Chunks(input, linear_weight, linear_bias, target, weight, options, backend, chunk_rows,
                 grad_input and store, grad_weight and store, grad_bias and store)
    aux = _row_weights(target, weight, options[0], linear_weight.shape[0], ch.acc)
    denominator = aux.sum()
    loss = input.new_empty((M,), dtype=ch.acc)
    lse = input.new_empty((M,), dtype=torch.float64)
    share = None
    if store:  # each row's share of the reduced loss, on the device (no host sync)
        share = 1 / denominator if reduction == "mean" else torch.ones(
            (), dtype=ch.acc, device=input.device)
    for r0, r1 in ch.ranges():
        logits = ch.logits(r0, r1)
        loss[r0:r1], lse[r0:r1], g = ch.forward(
            logits, r0, r1, None if share is None else share.expand(r1 - r0))
        if g is not None:
            ch.accumulate(g, r0, r1)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / denominator
    return (loss, lse, aux, *ch.finish())


def _backward(grad_rows, input, linear_weight, linear_bias, target, weight, lse, aux, options,
              backend, chunk_rows, grad_input, grad_weight, grad_bias):
    ch = _Chunks(input, linear_weight, linear_bias, target, weight, options, backend, chunk_rows,
                 grad_input, grad_weight, grad_bias)
    if grad_input or grad_weight or grad_bias:
        for r0, r1 in ch.ranges():
            logits = ch.logits(r0, r1)
            g = ch.backward(logits, r0, r1, grad_rows[r0:r1], lse[r0:r1], aux[r0:r1])
            ch.accumulate(g, r0, r1)
    return ch.finish()


def _torch_chunk(logits, target, weight, options, grad_rows=None):
    """The "torch" backend for one chunk: loss, lse and (if grad_rows) grad_logits at once.

    The per-row formulas of torch_ref.forward (GUIDE section 1) from one shared pass structure:
    d = z - max, exp(d), its sum; loss and gradient both read them, so a chunk costs a handful of
    passes and one (n, C) buffer (two with softcap) rather than the reference's dozen passes and
    four buffers (and autograd, which differentiates the reference, is off inside a custom op).
    It overwrites `logits`; the gradient comes back in the accumulation dtype.
    As the ops' contract asks, lse - z_y is formed as (max - z_y) + log(sum), never by
    subtracting a rounded lse, and the gradient is formed in float32 before its one rounding.
    grad_rows must already be zero on ignored rows. Out-of-range targets give NaN losses (the
    CPU path rejects them before).
    """
    ignore_index, e, z_loss, logit_scale, softcap = options
    C = logits.shape[1]
    acc = _checks.accumulation_dtype(logits.dtype)
    # z = softcap(logit_scale * x) (torch_ref.transform's steps), then d = z - m <= 0, then
    # exp(d), then the gradient, all in one buffer -- the chunk's own logits, or their float32
    # copy -- except with softcap, whose gradient needs z.
    z = logits if logits.dtype == acc else logits.to(acc)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap:
        z.div_(softcap).tanh_().mul_(softcap)
    m = z.amax(1, keepdim=True)
    d = torch.sub(z, m) if softcap else z.sub_(m)
    counted = target != ignore_index
    in_range = (target >= 0) & (target < C)
    safe = torch.where(in_range, target, 0).unsqueeze(1)
    w_y = torch.ones_like(m[:, 0]) if weight is None else weight[safe[:, 0]]
    w_sum = C if weight is None else weight.sum()
    nll = -d.gather(1, safe)[:, 0]  # m - z_y
    smooth = None
    if e:  # sum_c w_c (lse - z_c) = sum_c w_c (m - z_c) + sum(w) log(s)
        smooth = -(d.sum(1) if weight is None else d @ weight)
    s = d.exp_().sum(1)
    log_s = s.log()
    loss = w_y * (nll + log_s)
    if e:
        loss = (1 - e) * loss + (e / C) * (smooth + w_sum * log_s)
    lse = m[:, 0] + log_s
    if z_loss:
        loss = loss + z_loss * lse * lse
    nan = torch.full((), float("nan"), dtype=acc, device=logits.device)
    loss = torch.where(counted, torch.where(in_range, loss, nan), 0)
    lse64 = m[:, 0].double() + log_s.double()
    if grad_rows is None:
        return loss, lse64, None

    coef = (1 - e) * w_y + (e / C) * w_sum
    if z_loss:
        coef = coef + 2 * z_loss * lse
    g = d.mul_((grad_rows * coef / s).unsqueeze(1))  # p * grad * coef
    if e:
        smooth_grad = (grad_rows * (e / C)).unsqueeze(1)
        g.sub_(smooth_grad if weight is None else smooth_grad * weight)
    g.scatter_add_(1, safe, -(grad_rows * (1 - e) * w_y).unsqueeze(1))
    if softcap:  # d softcap(v) / dv = 1 - tanh^2 = 1 - (z / s)^2; z is a fresh buffer here
        g.mul_(z.div_(softcap).square_().neg_().add_(1))
    if logit_scale != 1.0:
        g.mul_(logit_scale)
    return loss, lse64, g
