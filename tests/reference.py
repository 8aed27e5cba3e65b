"""The oracle (docs/maths.md): torch's own F.cross_entropy in float64 on the CPU, plus the extras.

`reference(..., dtype=torch.float64)` is the oracle; the same procedure run in a low-precision
dtype measures torch's own error there, against which low-precision results are judged.
"""
import torch
import torch.nn.functional as F


def reference(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              z_loss=0.0, logit_scale=1.0, softcap=None, dtype=torch.float64, grad=None):
    """(loss, grad_x) computed by torch in `dtype` on the CPU; grad_x is None if grad is None."""
    xr = x.detach().cpu().to(dtype).requires_grad_(grad is not None)
    prob = target.is_floating_point()
    t = target.detach().cpu()
    t = t.to(dtype) if prob else t.long()
    w = None if weight is None else weight.detach().cpu().to(dtype)
    z = xr * logit_scale if logit_scale != 1.0 else xr
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    kw = dict(weight=w, label_smoothing=label_smoothing)
    if not prob:
        kw["ignore_index"] = ignore_index
    if not z_loss:
        loss = F.cross_entropy(z, t, reduction=reduction, **kw)
    else:
        rows = F.cross_entropy(z, t, reduction="none", **kw)
        lse = torch.logsumexp(z, dim=0 if z.dim() == 1 else 1)
        counted = torch.ones_like(lse) if prob else (t != ignore_index).to(dtype)
        # where, not a product with `counted`: ignored rows get no gradient even when the
        # upstream one is infinite (an all-ignored 'mean'), as in torch's own losses.
        rows = rows + torch.where(counted.bool(), z_loss * lse * lse, 0.0)
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        elif prob:
            loss = rows.sum() / rows.numel()
        else:
            # The cross-entropy part over the summed target weights (torch's 'mean'), the
            # z-loss part over the number of counted rows, whatever the weights (docs/maths.md).
            ce = F.cross_entropy(z, t, reduction="mean", **kw)
            loss = ce + torch.where(counted.bool(), z_loss * lse * lse, 0.0).sum() / counted.sum()
    grad_x = None
    if grad is not None:
        (grad_x,) = torch.autograd.grad(loss, xr, grad.cpu().to(dtype))
    return loss.detach(), grad_x


# One rounding of the output: half an ulp relative, per dtype.
HALF_ULP = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}




def gradient_floor(target, reduction, grad, dtype, weight=None, ignore_index=-100):
    """The rounding floor of any logit-gradient entry: a few ulps, in the accumulation dtype
    (float32, float64 for float64), of the row's upstream gradient times the largest class
    weight. Entries like p_y - 1 on a confident row are formed from numbers of size 1, so
    their absolute error is eps * |g_row| however small the entry is. (Rounding to a 16-bit
    output is relative to the entry and is judged separately.)"""
    g = grad.detach().abs().max().item() if grad.numel() else 0.0
    if reduction == "mean":
        if target.is_floating_point():
            rows = target.numel() // target.shape[0 if target.dim() == 1 else 1]
        else:
            counted = target != ignore_index
            # (long: uint8 targets would index as a mask)
            w = weight[target.clamp(0, len(weight) - 1).long()].double() if weight is not None \
                else 1.0
            rows = (counted * w).sum().item()
        g = g / rows if rows else 0.0
    w_max = max(1.0, weight.abs().max().item()) if weight is not None else 1.0
    eps = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    return 4 * eps * g * w_max


def assert_matches_oracle(ours, oracle, dtype, torch_same_dtype=None, what="loss", floor=0.0):
    """Judge `ours` (computed from `dtype` inputs) against the float64 oracle.

    float64: within 1e-10 relative. Otherwise no worse than twice the error torch itself makes
    in `dtype` (torch_same_dtype: the same computation by torch in that dtype), plus 1e-5
    relative for float32 or one output rounding for float16/bfloat16. (A pure 1e-5 relative
    bound cannot hold for float32 losses of ~1e-8 on confident rows: there torch's own float32
    answer is 0, as the rounding of lse - x_y leaves nothing.)"""
    ours = ours.detach().cpu().double()
    oracle = oracle.detach().cpu().double()
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    nan_ours, nan_oracle = torch.isnan(ours), torch.isnan(oracle)
    assert torch.equal(nan_ours, nan_oracle), f"{what}: NaN pattern differs"
    inf_oracle = torch.isinf(oracle)
    assert torch.equal(torch.isinf(ours), inf_oracle) and torch.equal(
        ours[inf_oracle], oracle[inf_oracle]), f"{what}: infinities differ"
    finite = ~(nan_oracle | inf_oracle)
    a, b = ours[finite], oracle[finite]
    if a.numel() == 0:
        return
    scale = b.abs().max().item()
    if dtype == torch.float64:
        allowed = 1e-10 * b.abs() + 1e-12 * scale
    else:
        assert torch_same_dtype is not None, "need torch's own result in " + str(dtype)
        low = torch_same_dtype.detach().cpu().double()[finite]
        torch_err = (low - b).abs().max().item()
        rel = 1e-5 if dtype == torch.float32 else HALF_ULP[dtype]
        # Relative to each element, with a floor of rel/10 of the largest: an element near zero
        # (a gradient entry p_c ~ 1e-7, the p_y - 1 of a confident row) carries the absolute
        # rounding error of the whole row, eps * |g|, not a relative one.
        allowed = 2 * torch_err + rel * b.abs() + 0.1 * rel * scale
    allowed = allowed + floor
    err = (a - b).abs()
    worst = (err - allowed).argmax()
    assert bool((err <= allowed).all()), (
        f"{what}: error {err[worst].item():.3g} > allowed {allowed[worst].item():.3g} "
        f"(ours {a[worst].item():.8g}, oracle {b[worst].item():.8g})")
