"""The torch maths of nllfused: the one Python home of its formulas (docs/maths.md).

- `forward`: the "torch" backend, the same contract as the fused ops (csrc/ops.cpp) in plain
  differentiable torch. Run in float64 it is the test oracle's twin; it is also what every call
  runs under forward-mode AD and torch.func transforms, and what the fused ops' autograd
  differentiates when a second derivative is asked for (`vjp`). It materialises the transformed
  logits, so it is neither fast nor frugal.
- `index_rule`, `acc_dtype`, `transform`, `log_softmax`, `soft_target_grad`: the pieces every
  other path (argument checks, fused linear CE, vocabulary-parallel) uses.
- `reduce`: the z-loss term and torch's reductions, shared by every entry point.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad


class Options(NamedTuple):
    """The options every op takes, in the schema's order (csrc/ops.cpp)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float = 0.0  # 0: no softcap
    prob_target: bool = False


def transform_active() -> bool:
    """Forward-mode AD or a torch.func transform is on: only the torch reference supports them."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def vmapped(t: torch.Tensor) -> bool:
    """t is batched by a vmap: is_grads_batched's (the legacy one) or torch.func's."""
    return torch._C._functorch.is_legacy_batchedtensor(t) or \
        torch._C._functorch.is_batchedtensor(t)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 for float64 logits, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def not_ignored(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """target != ignore_index, compared as integers: torch's comparison casts a Python int to
    the tensor's dtype, so uint8 targets would take -100 for 156 (and int32 ones 2^32 + k for
    k); an ignore_index that the dtype cannot hold ignores no target."""
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


def index_rule(target: torch.Tensor, num_classes: int, ignore_index: int):
    """(counted, in_range) per row of class-index targets: a row counts unless its target is
    ignore_index; a counted row whose target is outside [0, C) is an error (IndexError on the
    CPU, a NaN loss on the GPU). Compared as integers, whatever the targets' dtype
    (not_ignored)."""
    counted = not_ignored(target, ignore_index)
    in_range = target >= 0
    if not (isinstance(num_classes, int) and num_classes > torch.iinfo(target.dtype).max):
        in_range = in_range & (target < num_classes)  # (num_classes may be a tensor: distributed)
    return counted, in_range


def transform(x: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    """z = softcap(logit_scale * x), softcap(v) = s * tanh(v / s); softcap 0 means none."""
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x


class _RowFunction(torch.autograd.Function):
    """A function of each row of z over its last dimension (lse, entropy) whose backward gives a
    row whose upstream gradient is 0 no gradient at all: the op contract's rule for grad_lse
    and the statistics' gradients (csrc/ops.cpp), where torch's backward gives 0 times the
    row's derivative -- NaN on a row of NaN or +inf logits (an ignored row's under z-loss or a
    reduced statistic, which weigh only counted rows). Subclasses define forward(z) and
    backward through _row_grad with their derivative; the *Jvp ones add the forward-mode
    derivative, apart, as torch.compile does not trace a Function that defines jvp."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])


def _row_grad(derivative, z, g):
    """g times derivative(z) (per class) on the rows where g != 0, exactly 0 on the others; they
    see logits 0, so that no NaN reaches this gradient's own gradient either."""
    live = (g != 0).unsqueeze(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(live, derivative(torch.where(live, z, zero)) * g.unsqueeze(-1), zero)


def _p_and_log_p(z):
    """(p, log p) over the last dimension, log p 0 where p == 0 (so that p log p and its
    gradient are 0 there, not 0 * -inf; a NaN row stays NaN: log_softmax gives NaN for it)."""
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return p, torch.where(p == 0, torch.zeros((), dtype=z.dtype, device=z.device), logp)


def _softmax(z):
    """d lse / dz_c = p_c."""
    return torch.softmax(z, dim=-1)


def _entropy_grad(z):
    """dH/dz_c = -p_c (log p_c + H)."""
    p, logp = _p_and_log_p(z)
    return -p * (logp + (-(p * logp).sum(-1, keepdim=True)))


class _LogSumExp(_RowFunction):
    @staticmethod
    def forward(z):
        return torch.logsumexp(z, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return _row_grad(_softmax, ctx.saved_tensors[0], g)


class _LogSumExpJvp(_LogSumExp):
    @staticmethod
    def jvp(ctx, z_dot):
        return (_softmax(ctx.saved_tensors[0]) * z_dot).sum(-1)


class _Entropy(_RowFunction):
    """-sum_c p_c log p_c (a class with p_c = 0 adds 0, as lim p log p)."""

    @staticmethod
    def forward(z):
        p, logp = _p_and_log_p(z)
        return -(p * logp).sum(-1)

    @staticmethod
    def backward(ctx, g):
        return _row_grad(_entropy_grad, ctx.saved_tensors[0], g)


class _EntropyJvp(_Entropy):
    @staticmethod
    def jvp(ctx, z_dot):
        return (_entropy_grad(ctx.saved_tensors[0]) * z_dot).sum(-1)


def logsumexp(z: torch.Tensor) -> torch.Tensor:
    """lse over the last dimension of z, differentiable as the op contract says (_RowFunction)."""
    return (_LogSumExp if torch.compiler.is_compiling() else _LogSumExpJvp).apply(z)


def row_entropy(z: torch.Tensor) -> torch.Tensor:
    """The entropy of softmax(z) over the last dimension, differentiable as logsumexp."""
    return (_Entropy if torch.compiler.is_compiling() else _EntropyJvp).apply(z)


def log_softmax(logits: torch.Tensor, lse: torch.Tensor, options) -> torch.Tensor:
    """log p = z - lse over the class dimension 1 of (N, C, D) logits, from a saved lse."""
    z = transform(logits.to(acc_dtype(logits.dtype)), options.logit_scale, options.softcap)
    # lse = hi + lo: z - hi is exact near the row's max, where z - acc(lse) would lose
    # ulp(lse) / 2 of every log p (1e-3 at |z| ~ 5e4 in float32, where torch's log_softmax,
    # (z - m) - log s, keeps 1e-7)
    hi = lse.to(z.dtype)
    lo = (lse - hi.to(lse.dtype)).to(z.dtype)
    return (z - hi.unsqueeze(1)) - lo.unsqueeze(1)


def smoothed_target(q: torch.Tensor, weight: Optional[torch.Tensor], label_smoothing: float,
                    num_classes: int, class_dim: int) -> torch.Tensor:
    """w_c q'_c, q' = (1 - e) q + e / C: what a soft-target row weighs each class by."""
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing / num_classes
    if weight is not None:
        shape = [1] * q.dim()
        shape[class_dim] = -1
        q = q * weight.to(q.dtype).view(shape)
    return q


def soft_target_grad(grad_loss, logits, lse, weight, options) -> torch.Tensor:
    """d loss / d q_c = -(1 - e) w_c log p_c, times each row's upstream gradient."""
    if not options.softcap:  # (0: none, in the ops' Options)
        logp = log_softmax(logits, lse, options)
    else:  # the kernels' tanh is not torch's (~1 ulp apart): z - lse would mix the two, and
        # log p of a row of one class would not be 0; from torch's z alone it is a log-softmax
        z = transform(logits.to(acc_dtype(logits.dtype)), options.logit_scale, options.softcap)
        logp = z.log_softmax(1)
    if weight is not None:
        logp = logp * weight.to(logp.dtype).view(1, -1, 1)
    return -(1 - options.label_smoothing) * logp * grad_loss.unsqueeze(1)


class _MassTimesNegLogp(torch.autograd.Function):
    """wq * (-log p), 0 at the void classes (zero mass where -log p is +inf or the row all
    -inf), with d / d wq = -log p everywhere: the target's gradient -w_c log p_c is torch's
    (+inf at a class masked at -inf) in the reference's reverse modes too (double backward,
    torch.func.grad), as in the kernels' backward; a where on the product would make it 0
    there. Its backward and jvp are torch ops, themselves differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(wq, neg_logp, void):
        return torch.where(void, 0.0, wq * neg_logp)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        wq, neg_logp, void = ctx.saved_tensors
        # (grad * wq, not a where on it: its own derivative in wq is the mixed second
        # derivative d/dq dL/dz, torch's w_c (p_c - [c = j]) at a void class too)
        return grad * neg_logp, grad * wq, None


class _MassTimesNegLogpJvp(_MassTimesNegLogp):
    """With its forward-mode derivative, outside torch.compile (as _LogSumExpJvp)."""

    @staticmethod
    def jvp(ctx, t_wq, t_neg_logp, _):
        wq, neg_logp, void = ctx.saved_tensors
        # a void class whose mass has no tangent (autograd's zeros) adds 0, not 0 * inf
        return torch.where(void & (t_wq == 0), 0.0, t_wq * neg_logp) + \
            torch.where(void, 0.0, wq * t_neg_logp)


def forward(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
            ignore_index: int, label_smoothing: float, logit_scale: float, softcap: float,
            prob_target: bool):
    """(loss, lse, aux) per row, as nllfused::ce_fwd defines them (csrc/ops.cpp)."""
    acc = acc_dtype(logits.dtype)
    C = logits.shape[1]
    e = label_smoothing
    # Classes last, (N, D, C): torch's last-dim softmax kernels are its most accurate ones.
    z = transform(logits.to(acc).movedim(1, -1), logit_scale, softcap)
    lse = logsumexp(z)  # (N, D)
    zero = torch.zeros((), dtype=acc, device=z.device)
    if not prob_target:
        counted, in_range = index_rule(target, C, ignore_index)
        # An ignored row's loss and gradient are 0 whatever its logits (the op contract,
        # csrc/ops.cpp; torch's backward gives NaN there, 0 times log_softmax's NaN): the
        # log-softmax the loss takes sees 0 for them.
        z = torch.where(counted.unsqueeze(-1), z, zero)
    # log_softmax, not z - lse: it subtracts the max first, so logits far from zero keep their
    # precision (and its backward is torch's own).
    neg_logp = -torch.log_softmax(z, dim=-1)  # (N, D, C), >= 0
    if prob_target:
        wq = smoothed_target(target.to(acc).movedim(1, -1), weight, e, C, -1)
        # A class with zero target mass contributes 0 where its -log p is +inf (z_c = -inf) or
        # NaN only because the whole row is -inf (docs/maths.md); a NaN or +inf logit still
        # makes the row NaN, as torch's 0 * NaN.
        void = (wq == 0) & (neg_logp.isposinf() | (lse == float("-inf")).unsqueeze(-1))
        # (the Function only where the targets may be differentiated: reverse mode, or forward
        # mode and torch.func outside torch.compile, which traces no Function with a jvp)
        if torch.compiler.is_compiling():
            mass_times = _MassTimesNegLogp if wq.requires_grad else None
        else:
            mass_times = _MassTimesNegLogpJvp if wq.requires_grad or transform_active() else None
        loss = (mass_times.apply(wq, neg_logp, void) if mass_times is not None
                else torch.where(void, zero, wq * neg_logp)).sum(-1)
        return loss, lse.to(torch.float64), wq.sum(-1).detach()

    safe = torch.where(counted & in_range, target, torch.zeros_like(target)).long()
    nll = neg_logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    w_y = torch.ones_like(lse) if weight is None else weight.to(acc)[safe]
    loss = w_y * nll
    if e:
        smooth = neg_logp.sum(-1) if weight is None else (weight.to(acc) * neg_logp).sum(-1)
        loss = (1 - e) * loss + (e / C) * smooth
    nan = torch.full((), float("nan"), dtype=acc, device=z.device)
    loss = torch.where(counted, torch.where(in_range, loss, nan), zero)
    aux = torch.where(counted, torch.where(in_range, w_y, nan), zero)
    return loss, lse.to(torch.float64), aux.detach()


def entropy_and_argmax(logits: torch.Tensor, options, want_entropy: bool = True):
    """(entropy or None, argmax) per row of (N, C, D) logits, of the distribution the loss sees
    (z after logit_scale and softcap): -sum_c p_c log p_c (a class with p_c = 0 adds 0, as
    lim p log p), differentiable; argmax as torch.argmax (the first of equal maxima), int64.
    Materialises z: the statistics of the kernel backends that do not compute these in their
    own pass (nllfused/stats.py)."""
    z = transform(logits.to(acc_dtype(logits.dtype)), options.logit_scale, options.softcap)
    predicted = z.detach().argmax(1)
    if not want_entropy:
        return None, predicted
    return row_entropy(z.movedim(1, -1)), predicted


def target_logprob(logits: torch.Tensor, target: torch.Tensor, lse, options) -> torch.Tensor:
    """log p_y per row of class-index targets (differentiable), in the accumulation dtype: 0 on
    ignored rows, NaN on out-of-range ones (as the loss). With a kernel's float64 lse (its
    gradient reaching the logits through the op's lse gradient): z_y - lse from the target
    logits alone, O(rows), but for float64 logits, whose lse's own rounding (up to ulp(lse) / 2,
    4e-9 at |lse| ~ 3e7) torch's log_softmax does not carry; the float64 lse of lower dtypes
    is 2^-29 finer than their accumulation below |lse| ~ 2^26. Without (lse None: this module's
    forward, whose lse is only as fine as the accumulation) and for float64: log_softmax's
    (z - m) - log s, exact in z - m as torch's. O(N C)."""
    acc = acc_dtype(logits.dtype)
    counted, in_range = index_rule(target, logits.shape[1], options.ignore_index)
    safe = torch.where(counted & in_range, target, torch.zeros_like(target)).long()
    if lse is None or acc == torch.float64:
        z = transform(logits.to(acc), options.logit_scale, options.softcap)
        z = torch.where(counted.unsqueeze(1), z, torch.zeros((), dtype=acc, device=z.device))
        logp = torch.log_softmax(z, 1).gather(1, safe.unsqueeze(1)).squeeze(1)
    else:
        x_y = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
        z_y = transform(x_y.to(acc), options.logit_scale, options.softcap)
        logp = (z_y.to(torch.float64) - lse).to(acc)
    nan = torch.full((), float("nan"), dtype=acc, device=logits.device)
    return torch.where(counted, torch.where(in_range, logp, nan),
                       torch.zeros((), dtype=acc, device=logits.device))


def forward_stats(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                  prob_target, with_entropy=True, with_predicted=True):
    """`forward`'s outputs and (entropy, target_logp, predicted) per row, as
    nllfused::ce_fwd_stats_triton defines them (csrc/ops.cpp), differentiable; entropy /
    predicted zeros (and not computed) unless with_entropy / with_predicted."""
    options = (ignore_index, label_smoothing, logit_scale, softcap, prob_target)
    loss, lse, aux = forward(logits, target, weight, *options)
    opts = Options(*options)
    if with_entropy or with_predicted:
        entropy, predicted = entropy_and_argmax(logits, opts, with_entropy)
    if not with_entropy:
        entropy = torch.zeros_like(loss)
    if not with_predicted:
        predicted = torch.zeros(loss.shape, dtype=torch.int64, device=loss.device)
    if prob_target:
        tlp = torch.zeros_like(loss)
    else:
        tlp = target_logprob(logits, target, None, opts)
    return loss, lse, aux, entropy, tlp, predicted


def vjp_stats(grads, logits, target, weight, options, wants_logits: bool, wants_target: bool):
    """(grad_logits, grad_target) of `forward_stats` for upstream gradients (loss, lse, entropy,
    target_logp; any may be None), differentiable themselves (as `vjp`)."""
    inputs = [t for t, wanted in ((logits, wants_logits), (target, wants_target)) if wanted]
    if not inputs:
        return None, None
    with torch.enable_grad():
        loss, lse, _, entropy, tlp, _ = forward_stats(logits, target, weight, *options)
        pairs = [(o, g) for o, g in zip((loss, lse, entropy, tlp), grads) if g is not None]
        result = list(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                          create_graph=True, allow_unused=True,
                                          materialize_grads=True))
    return (result.pop(0) if wants_logits else None), (result.pop(0) if wants_target else None)


def vjp(grad_loss, grad_lse, logits, target, weight, options, wants_logits: bool,
        wants_target: bool):
    """(grad_logits, grad_target) of `forward` (None where not wanted), differentiable
    themselves: the fused ops' backward under create_graph=True (double backward, Hessians)."""
    inputs = [t for t, wanted in ((logits, wants_logits), (target, wants_target)) if wanted]
    if not inputs:
        return None, None
    with torch.enable_grad():
        loss, lse, _ = forward(logits, target, weight, *options)
        outputs, grads = [loss], [grad_loss if grad_loss is not None else torch.zeros_like(loss)]
        if grad_lse is not None:
            outputs.append(lse)
            grads.append(grad_lse)
        result = list(torch.autograd.grad(outputs, inputs, grads, create_graph=True,
                                          allow_unused=True, materialize_grads=True))
    return (result.pop(0) if wants_logits else None), (result.pop(0) if wants_target else None)


def reduce(loss: torch.Tensor, lse: torch.Tensor, aux: torch.Tensor, reduction: str,
           prob_target: bool, z_loss: float = 0.0, counted=None) -> torch.Tensor:
    """Per-row losses, with the z-loss term, reduced as torch reduces cross-entropy.

    loss, lse, aux: the ops' outputs (any matching shapes); counted: with z_loss and index
    targets, the rows that count (target != ignore_index). z-loss adds z * lse^2 to each counted
    row (every row for probability targets). Under 'mean' the cross-entropy part is divided by
    the summed target weights of the counted rows (index targets: aux.sum()) or by the number of
    rows (probability targets), the z-loss part by the number of counted rows, whatever the
    class weights (the convention of Liger-Kernel and flash-attention).
    """
    z_rows = None
    if z_loss:
        if not prob_target:  # an ignored row's lse reaches neither the term nor its gradient
            lse = torch.where(counted, lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
        z_rows = (z_loss * lse * lse).to(loss.dtype)
    if reduction == "none":
        return loss if z_rows is None else loss + z_rows
    if reduction == "sum":
        return loss.sum() if z_rows is None else (loss + z_rows).sum()
    if prob_target:  # (mean(), not sum() / numel: torch.func's jacfwd of 0 rows takes it)
        return loss.mean() if z_rows is None else (loss + z_rows).mean()
    total = aux.sum()
    # NaN where the counted targets weigh 0 in all, as torch: its smoothing part (s / 0 = inf
    # where s > 0) is added to the NLL part's 0 / 0. total / total: exactly 1, or NaN.
    out = loss.sum() / total * (total / total)
    if z_rows is not None:
        out = out + z_rows.sum() / counted.sum()
    return out


def reduce_grads(grad: torch.Tensor, aux: torch.Tensor, reduction: str, prob_target: bool,
                 z_loss: float = 0.0, counted=None):
    """The vjp of `reduce` for an upstream gradient `grad` of its result (a scalar under
    'mean'/'sum', one per row under 'none'): (grad_loss, grad_z) per row, grad_loss = d/d loss_i
    in aux's dtype, grad_z = d/d (z_loss * lse_i^2) in float64 (None without z-loss). Both are 0
    on rows that do not count, even for an infinite `grad` (an all-ignored 'mean'). The lse's
    gradient is then `z_loss_grad(lse, grad_z, z_loss)`. counted: as for `reduce`, but needed for
    index targets with or without z-loss."""
    rows = aux.shape
    if reduction == "none":
        g_loss = g_z = grad
    elif reduction == "sum":
        g_loss = g_z = grad.expand(rows)
    elif prob_target:
        g_loss = g_z = (grad / aux.numel()).expand(rows)
    else:
        g_loss = (grad / aux.sum()).expand(rows)
        g_z = (grad.to(torch.float64) / counted.sum()).expand(rows) if z_loss else None
    g_loss = g_loss.to(aux.dtype)
    if not prob_target:
        g_loss = torch.where(counted, g_loss, torch.zeros((), dtype=aux.dtype, device=aux.device))
    if not z_loss:
        return g_loss, None
    g_z = g_z.to(torch.float64)
    if not prob_target:
        g_z = torch.where(counted, g_z, torch.zeros((), dtype=g_z.dtype, device=g_z.device))
    return g_loss, g_z


def z_loss_grad(lse: torch.Tensor, grad_z: torch.Tensor, z_loss: float) -> torch.Tensor:
    """d (z_loss * lse^2) / d lse times grad_z (see `reduce_grads`): the ops' grad_lse, float64."""
    return (2 * z_loss) * lse.to(torch.float64) * grad_z


def row_weights(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """aux of class-index rows (csrc/ops.cpp) from the targets alone, in `dtype`: w[y] (1 without
    weights) on counted rows, 0 on ignored rows, NaN on out-of-range ones. Its sum is the 'mean'
    denominator, known before any logit is formed (nllfused/linear.py needs it up front)."""
    counted, in_range = index_rule(target, num_classes, ignore_index)
    device = target.device
    if weight is None:
        w = torch.ones(target.shape, dtype=dtype, device=device)
    else:
        w = weight.to(dtype)[torch.where(counted & in_range, target, 0).long()]
    nan = torch.full((), float("nan"), dtype=dtype, device=device)
    return torch.where(counted, torch.where(in_range, w, nan),
                       torch.zeros((), dtype=dtype, device=device))


def chunk_loss_and_grad(logits: torch.Tensor, target: torch.Tensor,
                        weight: Optional[torch.Tensor], options):
    """(loss, lse, grad) of an (n, C) chunk of class-index rows, the "torch" backend of the fused
    linear cross-entropy (nllfused/linear.py), which reuses one logits buffer for every chunk.

    loss (n,) in the accumulation dtype and lse (n,) float64 as `forward` defines them
    (docs/maths.md; out-of-range targets give NaN losses); grad(grad_loss, grad_lse=None) is the
    gradient of sum_i grad_loss_i * loss_i + grad_lse_i * lse_i in the logits (as ce_bwd's in
    csrc/ops.cpp), in the accumulation dtype; grad_loss must be 0 on ignored rows; call it once,
    or not at all. Loss and gradient share one pass structure -- d = z - max, exp(d), its sum s --
    so a chunk costs a handful of passes and one (n, C) buffer (the chunk's own logits, or their
    float32 copy; more with logit_scale/softcap, whose `transform` is out of place and whose
    gradient needs z), where `forward` and autograd take a dozen passes and four buffers. lse -
    z_y is formed as (max - z_y) + log(s), never by subtracting a rounded lse.
    Overwrites `logits` (with the gradient, where the dtypes agree).
    """
    C = logits.shape[1]
    acc = acc_dtype(logits.dtype)
    e, softcap = options.label_smoothing, options.softcap
    counted, in_range = index_rule(target, C, options.ignore_index)
    z = transform(logits if logits.dtype == acc else logits.to(acc), options.logit_scale, softcap)
    m = z.amax(1, keepdim=True)
    d = torch.sub(z, m) if softcap else z.sub_(m)  # softcap's gradient needs z itself
    safe = torch.where(in_range, target, 0).long().unsqueeze(1)
    w = None if weight is None else weight.to(acc)
    w_y = torch.ones_like(m[:, 0]) if w is None else w[safe[:, 0]]
    w_sum = C if w is None else w.sum()
    nll = -d.gather(1, safe)[:, 0]  # m - z_y
    smooth = None
    if e:  # sum_c w_c (lse - z_c) = sum_c w_c (m - z_c) + sum(w) log(s)
        smooth = -(d.sum(1) if w is None else d @ w)
    s = d.exp_().sum(1)
    log_s = s.log()
    loss = w_y * (nll + log_s)
    if e:
        loss = (1 - e) * loss + (e / C) * (smooth + w_sum * log_s)
    nan = torch.full((), float("nan"), dtype=acc, device=logits.device)
    loss = torch.where(counted, torch.where(in_range, loss, nan), 0)
    lse = m[:, 0].double() + log_s.double()

    def grad(grad_loss: torch.Tensor, grad_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
        # p_c * (grad_loss * ((1 - e) w_y + e/C sum(w)) + grad_lse) - grad_loss e/C w_c
        # - grad_loss (1 - e) w_y [c = y]; then the chain rule of softcap and logit_scale.
        grad_loss = grad_loss.to(acc)
        coef = grad_loss * ((1 - e) * w_y + (e / C) * w_sum)
        if grad_lse is not None:
            coef = coef + grad_lse.to(acc)
        g = d.mul_((coef / s).unsqueeze(1))
        # The true class: y_coef (p_y - 1) + rest p_y with y_coef = grad_loss ((1 - e) w_y +
        # e/C w_y), rest = grad_loss e/C (sum(w) - w_y) + grad_lse and p_y - 1 by expm1 of log p_y
        # = -(m - z_y) - log s; not p_y coef - y_coef, which keeps the rounding of a number of
        # size y_coef where p_y -> 1 (one class: p_y = 1, rest the lse gradient alone).
        y_coef = grad_loss * ((1 - e) * w_y + (e / C) * w_y)
        rest = grad_loss * ((e / C) * (w_sum - w_y))
        if grad_lse is not None:
            rest = rest + grad_lse.to(acc)
        if e:
            smooth_grad = (grad_loss * (e / C)).unsqueeze(1)
            g.sub_(smooth_grad if w is None else smooth_grad * w)
        log_py = -nll - log_s
        g.scatter_(1, safe, torch.addcmul(rest * log_py.exp(), y_coef, torch.expm1(log_py))
                   .unsqueeze(1))
        if softcap:  # d softcap(v) / dv = 1 - tanh^2 = 1 - (z / s)^2; z is a fresh buffer here
            g.mul_(z.div_(softcap).square_().neg_().add_(1))
        if options.logit_scale != 1.0:
            g.mul_(options.logit_scale)
        return g

    return loss, lse, grad


# Vocabulary-parallel cross-entropy (nllfused/distributed.py): one rank's slice of the classes.
# y_local marks an ignored row with -2 (and a target in another slice with -1); the Triton kernel
# (kernels/vocab_parallel.py) uses the same marker.
VOCAB_IGNORED_ROW = -2


def vocab_slice_stats(logits, target, weight, wsum, vocab_start: int, ignore_index: int,
                      smoothing: bool):
    """(3 or 4, R) float64: m_r, log s_r (lse_r = m_r + log s_r), z_y if owned else 0, [A_r];
    the contract of vp_stats_kernel."""
    acc = acc_dtype(logits.dtype)
    C = logits.shape[1]
    z = logits.to(acc)
    m = z.amax(1) if C else z.new_full((z.shape[0],), float("-inf"))
    m_safe = torch.where(m.abs() < float("inf"), m, torch.zeros_like(m))
    diff = m_safe.unsqueeze(1) - z                           # >= 0 (exact for close values)
    log_s = torch.log(torch.exp(-diff).sum(1))
    y_local = target.long() - vocab_start
    owned = not_ignored(target, ignore_index) & (y_local >= 0) & (y_local < C)
    z_y = z.gather(1, torch.where(owned, y_local, 0).unsqueeze(1)).squeeze(1)
    rows = [m_safe.double(), log_s.double(),
            torch.where(owned, z_y, torch.zeros_like(z_y)).double()]
    if smoothing:
        wd = diff if weight is None else weight * diff
        # sum_c w_c (lse_r - z_c) = W_r log s + sum_c w_c (m - z_c), every term >= 0. A slice
        # entirely at -inf: sum_c w_c * inf alone (NaN where a weight is 0, as torch's 0 * inf).
        wd = wd.sum(1)
        smooth = torch.where(m == float("-inf"), wd, wsum.to(acc) * log_s + wd)
        rows.append(smooth.double())
    return torch.stack(rows)


def vocab_slice_grad(g, g_lse, logits, lse_m, lse_s, coef, tcoef, y_local, weight, eps_c,
                     smoothing: bool):
    """(R, C) gradient in the logits' dtype; the contract of vp_bwd_kernel (p from the global
    lse = lse_m + lse_s in its two parts)."""
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc)
    hi = lse_m.to(acc)
    lo = ((lse_m - hi.double()) + lse_s).to(acc)
    p = torch.exp((z - hi.unsqueeze(1)) - lo.unsqueeze(1))
    coef, tcoef = coef.unsqueeze(1), tcoef.unsqueeze(1)
    cols = torch.arange(logits.shape[1], device=logits.device)
    # The true class as (p - 1) tcoef + p (coef - tcoef): p - 1 is exact, where p coef - tcoef
    # would keep the rounding of p coef as p -> 1 (a confident row).
    grad = torch.where(cols == y_local.unsqueeze(1), (p - 1) * tcoef + p * (coef - tcoef),
                       p * coef)
    if smoothing:
        grad = grad - eps_c * (1.0 if weight is None else weight)
    grad = torch.where((y_local != VOCAB_IGNORED_ROW).unsqueeze(1), grad * g.unsqueeze(1),
                       torch.zeros((), dtype=acc, device=logits.device))
    if g_lse is not None:
        g_lse = g_lse.to(acc).unsqueeze(1)
        grad = torch.where(g_lse != 0, grad + g_lse * p, grad)
    return grad.to(logits.dtype)
