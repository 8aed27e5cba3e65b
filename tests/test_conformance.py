"""Every backend against float64 torch (tests/reference.py), losses and gradients, over a
matrix of shapes, options, targets, layouts and numerically hard inputs (docs/maths.md)."""
import pytest
import torch

import nllfused
from helpers import backend_params, case_params, check_cross_entropy, with_class_weight
from reference import assert_matches_oracle

LOW = (torch.float16, torch.bfloat16)


def index_case(N=16, C=37, extra=(), ignore=-100, ignore_frac=0.2, dtype=torch.float32):
    x = torch.randn(N, C, *extra, dtype=dtype) * 3
    t = torch.randint(0, C, (N, *extra))
    t[torch.rand(t.shape) < ignore_frac] = ignore
    return x, t


def prob_case(N=16, C=37, extra=(), dtype=torch.float32):
    x = torch.randn(N, C, *extra, dtype=dtype) * 3
    q = torch.softmax(torch.randn(N, C, *extra) * 2, dim=1).to(dtype)
    return x, q


def confident_case(dtype):
    x, t = index_case(N=12, C=50, dtype=dtype, ignore_frac=0.0)
    x[torch.arange(12), t] += 30  # p_y -> 1: the true-class gradient p_y - 1 must survive
    return x, t


def masked_case(dtype):
    x, t = index_case(N=12, C=41, dtype=dtype, ignore_frac=0.1)
    mask = torch.rand(x.shape) < 0.3
    mask[torch.arange(12), t.clamp(min=0)] = False
    x[mask] = float("-inf")
    x[3, :20] = float("-inf")  # a row whose first block is entirely masked
    x[3, 25] = 1.0
    t[3] = 25
    return x, t


def extreme_case(dtype):
    x, t = index_case(N=8, C=300, dtype=dtype)
    x = x + 1e4  # a large common offset must cancel exactly
    x[0] *= 1e4 / 3  # and a row of huge spread
    return x, t


def far_case(dtype, C=37, extra=(), prob=False):
    """Logits on an offset of 3e7 with their usual spread, so that p is far from one-hot: in
    float64 the saved lse's own rounding there (ulp 7.5e-9) must not enter p, as none enters
    torch's log p = (z - m) - log s."""
    x, t = prob_case(C=C, extra=extra, dtype=dtype) if prob else \
        index_case(C=C, extra=extra, dtype=dtype)
    return x + 3e7, t


def noncontig_transposed(dtype):
    x, t = index_case(N=24, C=29, dtype=dtype)
    return x.t().contiguous().t(), t  # column-major (N, C)


def noncontig_sliced(dtype):
    x, t = index_case(N=24, C=80, dtype=dtype)
    return x[:, ::2], t.clamp(max=39)


def kdim_permuted(dtype):
    x, t = index_case(N=3, C=11, extra=(5, 4), dtype=dtype)
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), t  # channels-last


# name -> (builder(dtype) -> (x, target), kwargs, dtypes). Every case runs in float32; a case
# adds float64 (another accumulation type) or float16/bfloat16 (16-bit loads and stores, judged
# against torch's own error there) where those change what the kernels do.
CASES = {
    "basic": (lambda d: index_case(dtype=d), {}, (torch.float32, torch.float64) + LOW),
    # Class counts: degenerate (1-3), one past a 4096-wide tile, many tiles.
    "C1": (lambda d: index_case(C=1, dtype=d), {}, (torch.float32,)),
    "C2": (lambda d: index_case(C=2, dtype=d), {}, (torch.float32,)),
    "C3": (lambda d: index_case(C=3, dtype=d), {}, (torch.float32, torch.bfloat16)),
    "C4099": (lambda d: index_case(N=4, C=4099, dtype=d), {}, (torch.float32, torch.bfloat16)),
    "C70000": (lambda d: index_case(N=2, C=70000, ignore_frac=0, dtype=d),
               {"label_smoothing": 0.1}, (torch.float32,)),
    # Shapes: no batch dimension, and extra dimensions after the classes (K-dim).
    "1d": (lambda d: (torch.randn(13, dtype=d), torch.tensor(4)), {}, (torch.float32,)),
    "1d_prob": (lambda d: (torch.randn(13, dtype=d), torch.softmax(torch.randn(13), 0).to(d)),
                {}, (torch.float32,)),
    "kdim": (lambda d: index_case(N=3, C=7, extra=(5, 4), dtype=d), {}, (torch.float32,) + LOW),
    "kdim_channels_last": (kdim_permuted, {"label_smoothing": 0.1}, (torch.float32,)),
    # Options, alone and together: class weights, ignore_index (also a valid class),
    # label smoothing up to 1.
    "weight": (lambda d: index_case(dtype=d), {"weight": "rand"}, (torch.float32, torch.bfloat16)),
    "ignore_neg1": (lambda d: index_case(ignore=-1, dtype=d), {"ignore_index": -1},
                    (torch.float32,)),
    "ignore_valid_class": (lambda d: index_case(C=9, ignore=4, dtype=d),
                           {"ignore_index": 4, "weight": "rand"}, (torch.float32,)),
    "smoothing": (lambda d: index_case(dtype=d), {"label_smoothing": 0.15},
                  (torch.float32,) + LOW),
    "smoothing_weight": (lambda d: index_case(dtype=d),
                         {"label_smoothing": 0.3, "weight": "rand"}, (torch.float32,)),
    "smoothing_1": (lambda d: index_case(dtype=d), {"label_smoothing": 1.0}, (torch.float32,)),
    # Probability (soft) targets.
    "prob": (lambda d: prob_case(dtype=d), {}, (torch.float32, torch.bfloat16)),
    "prob_smoothing_weight": (lambda d: prob_case(dtype=d),
                              {"label_smoothing": 0.2, "weight": "rand"}, (torch.float32,)),
    "prob_kdim": (lambda d: prob_case(N=2, C=5, extra=(3, 4), dtype=d), {}, (torch.float32,)),
    # Hard numerics: p_y -> 1, -inf logits, a huge offset and spread.
    "confident": (confident_case, {}, (torch.float32,) + LOW),
    "masked": (masked_case, {}, (torch.float32, torch.bfloat16)),
    "masked_smoothing": (masked_case, {"label_smoothing": 0.1}, (torch.float32,)),
    "extreme": (extreme_case, {}, (torch.float32, torch.float64)),
    "far": (far_case, {}, (torch.float64,)),
    "far_prob": (lambda d: far_case(d, prob=True), {"label_smoothing": 0.1}, (torch.float64,)),
    "far_kdim": (lambda d: far_case(d, C=11, extra=(5,)), {"weight": "rand"}, (torch.float64,)),
    "far_kdim_c300": (lambda d: far_case(d, C=300, extra=(3,)), {"label_smoothing": 0.1},
                      (torch.float64,)),
    # Nothing to average: every target ignored (mean = nan), no rows at all.
    "all_ignored": (lambda d: index_case(ignore_frac=1.0, dtype=d), {}, (torch.float32,)),
    "empty": (lambda d: index_case(N=0, dtype=d), {}, (torch.float32,)),
    "empty_prob": (lambda d: prob_case(N=0, dtype=d), {}, (torch.float32,)),
    # Non-contiguous logits; integer target dtypes other than int64.
    "transposed": (noncontig_transposed, {}, (torch.float32, torch.bfloat16)),
    "sliced": (noncontig_sliced, {"weight": "rand"}, (torch.float32,)),
    "int32_target": (lambda d: (lambda x, t: (x, t.int()))(*index_case(dtype=d)), {},
                     (torch.float32,)),
    "uint8_target": (lambda d: (lambda x, t: (x, t.clamp(min=0).to(torch.uint8)))(
        *index_case(dtype=d)), {}, (torch.float32,)),
    # The extras beyond torch: z-loss, logit scale, softcap.
    "z_loss": (lambda d: index_case(dtype=d), {"z_loss": 1e-2, "weight": "rand"},
               (torch.float32, torch.bfloat16)),
    "z_loss_prob": (lambda d: prob_case(dtype=d), {"z_loss": 1e-2}, (torch.float32,)),
    "logit_scale": (lambda d: index_case(dtype=d), {"logit_scale": 0.37, "label_smoothing": 0.1},
                    (torch.float32,)),
    "softcap": (lambda d: index_case(dtype=d), {"softcap": 5.0, "logit_scale": 2.0},
                (torch.float32, torch.bfloat16)),
    # a scale <= 0 (any finite one is taken) with C not a whole number of blocks: padding lanes
    # must stay out of the softmax (-inf * -1 is +inf)
    "negative_scale": (lambda d: index_case(dtype=d), {"logit_scale": -0.6}, (torch.float32,)),
    "zero_scale_prob": (lambda d: prob_case(dtype=d), {"logit_scale": 0.0}, (torch.float32,)),
    "softcap_prob_masked": (lambda d: (lambda x, q: (x.masked_fill(q < 0.01, float("-inf")), q))(
        *prob_case(dtype=d)), {"softcap": 4.0}, (torch.float32,)),
}


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name,dtype", list(case_params(CASES)))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_float64_torch(device, backend, name, dtype, reduction):
    build, kwargs, _ = CASES[name]
    x, target = build(dtype)
    kwargs = with_class_weight(kwargs, x.shape[0 if x.dim() == 1 else 1])
    check_cross_entropy(x, target, device, backend, reduction=reduction, **kwargs)


@pytest.mark.parametrize("device,backend", backend_params())
def test_prob_target_gradient(device, backend):
    """Soft targets that require grad get d loss / d q, as torch gives them."""
    x, q = prob_case(N=6, C=9)
    w = torch.rand(9) + 0.1
    q = q.requires_grad_()
    q64 = q.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(x.double(), q64, weight=w.double(),
                                      label_smoothing=0.1).backward()
    qd = q.detach().to(device).requires_grad_()
    nllfused.cross_entropy(x.to(device), qd, weight=w.to(device), label_smoothing=0.1,
                           backend=backend).backward()
    q32 = q.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(x, q32, weight=w, label_smoothing=0.1).backward()
    assert_matches_oracle(qd.grad, q64.grad, torch.float32, q32.grad, what="target grad")


@pytest.mark.parametrize("device,backend", backend_params())
def test_module_matches_functional(device, backend):
    x, t = index_case(N=10, C=12, ignore=3)
    w = torch.rand(12).to(device)
    module = nllfused.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1,
                                       backend=backend)
    ref = torch.nn.CrossEntropyLoss(weight=w.cpu().double(), ignore_index=3, label_smoothing=0.1)
    ref32 = torch.nn.CrossEntropyLoss(weight=w.cpu(), ignore_index=3, label_smoothing=0.1)
    assert_matches_oracle(module(x.to(device), t.to(device)), ref(x.double(), t),
                          torch.float32, ref32(x, t))
    assert "backend" in repr(module)
    state = module.state_dict()
    assert torch.equal(state["weight"], w)


# Legacy pairs as torch maps them: reduce=False -> "none" whatever size_average says,
# size_average=False -> "sum", both true -> "mean".
@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True),
                                                 (False, True), (True, False)])
def test_deprecated_reduction_arguments(size_average, reduce):
    x, t = index_case()
    with pytest.warns(UserWarning):
        expected = torch.nn.functional.cross_entropy(x.double(), t, size_average=size_average,
                                                     reduce=reduce)
        expected32 = torch.nn.functional.cross_entropy(x, t, size_average=size_average,
                                                       reduce=reduce)
    ours = nllfused.cross_entropy(x, t, size_average=size_average, reduce=reduce)
    assert_matches_oracle(ours, expected, torch.float32, expected32)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 3, 5)], ids=str)
def test_mean_over_targets_of_no_weight_is_nan(device, backend, smoothing, shape):
    """'mean' where every counted target's class weighs 0: torch's NaN (its NLL part is 0 / 0,
    the smoothing part s / 0 added to it), with or without smoothing, not s / 0 = inf."""
    x = torch.randn(shape, device=device)
    C = shape[0] if len(shape) == 1 else shape[1]
    t = torch.zeros(shape[:0] if len(shape) == 1 else (shape[0],) + shape[2:], dtype=torch.long,
                    device=device)
    w = torch.rand(C, device=device) + 0.5
    w[0] = 0.0
    theirs = torch.nn.functional.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu(),
                                               label_smoothing=smoothing)
    assert torch.isnan(theirs)
    for z_loss in (0.0, 0.1):
        ours = nllfused.cross_entropy(x, t, weight=w, label_smoothing=smoothing, z_loss=z_loss,
                                      backend=backend)
        assert torch.isnan(ours), (z_loss, ours)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float16)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_prob_target_loss_takes_the_weights_dtype(device, backend, dtypes, reduction):
    """Probability targets: torch's loss is -(w q log_softmax(x)).sum(), so its dtype promotes
    with the class weights' (float32 logits and targets, float64 weights: float64)."""
    dtype, w_dtype = dtypes
    x, q = prob_case(N=5, C=7)
    w = torch.rand(7, dtype=torch.float64) + 0.1
    theirs = torch.nn.functional.cross_entropy(x.to(dtype), q.to(dtype), weight=w.to(w_dtype),
                                               reduction=reduction)
    ours = nllfused.cross_entropy(x.to(dtype).to(device), q.to(dtype).to(device),
                                  weight=w.to(w_dtype).to(device), reduction=reduction,
                                  backend=backend)
    assert ours.dtype == theirs.dtype
    oracle = torch.nn.functional.cross_entropy(x.to(dtype).double(), q.to(dtype).double(),
                                               weight=w.to(w_dtype).double(), reduction=reduction)
    assert_matches_oracle(ours, oracle, dtype, theirs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prob_target_loss_in_the_weights_dtype_is_rounded_once(device, backend, dtype,
                                                                reduction):
    """16-bit logits and targets with float32 weights: a float32 loss, computed in float32 from
    the 16-bit values and rounded once to float32 -- not to the logits' dtype first."""
    x, q = prob_case(N=64, C=7)
    x, q = x.to(dtype), q.to(dtype)
    w = torch.rand(7) + 0.1
    ours = nllfused.cross_entropy(x.to(device), q.to(device), weight=w.to(device),
                                  reduction=reduction, backend=backend)
    oracle = torch.nn.functional.cross_entropy(x.double(), q.double(), weight=w.double(),
                                               reduction=reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double().cpu(), oracle, rtol=1e-5,
                               atol=1e-6 * oracle.abs().max().item())


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("C", [200, 300])
def test_uint8_class_indices_compare_as_integers(backend, C):
    """uint8 class indices against ignore_index and C as integers, on every path: the default
    ignore_index -100 ignores no uint8 target (torch compares a Python int in the tensor's
    dtype, where -100 is 156), and classes up to 255 are in range at C = 300 (300 is 44 there).
    Loss, gradient (also with create_graph=True and torch.func.grad), the statistics and z-loss
    against the int64 targets' (torch's own uint8 loss gives the same values)."""
    x = (torch.randn(4, C, dtype=torch.float64) * 2).requires_grad_()
    t8 = torch.tensor([1, 156, 255 if C > 255 else 199, 44], dtype=torch.uint8)
    t64 = t8.long()
    torch.testing.assert_close(nllfused.cross_entropy(x, t8, reduction="none", backend=backend),
                               torch.nn.functional.cross_entropy(x, t8, reduction="none"))
    for kw in (dict(), dict(z_loss=1e-2), dict(label_smoothing=0.1)):
        ref = nllfused.cross_entropy(x, t64, reduction="sum", backend=backend, **kw)
        ours = nllfused.cross_entropy(x, t8, reduction="sum", backend=backend, **kw)
        torch.testing.assert_close(ours, ref)
        for create_graph in (False, True):
            torch.testing.assert_close(
                torch.autograd.grad(ours, x, retain_graph=True, create_graph=create_graph)[0],
                torch.autograd.grad(ref, x, retain_graph=True)[0])
    torch.testing.assert_close(
        torch.func.grad(lambda a: nllfused.cross_entropy(a, t8, backend=backend))(x.detach()),
        torch.func.grad(lambda a: nllfused.cross_entropy(a, t64, backend=backend))(x.detach()))
    for reduction in ("none", "mean"):
        _, ours = nllfused.cross_entropy(x, t8, reduction=reduction, backend=backend,
                                         return_stats=True)
        _, ref = nllfused.cross_entropy(x, t64, reduction=reduction, backend=backend,
                                        return_stats=True)
        for name in ("target_logprob", "correct", "entropy", "lse"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name))


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("extra", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3},
                                   {"softcap": 3.0}, {"return_stats": True}, {"prob": True}],
                         ids=str)
def test_unreduced_loss_takes_an_upstream_gradient_of_any_strides(backend, extra):
    """reduction='none' over (N, C, d1, d2): the upstream gradient of a transposed view of the
    loss (non-contiguous, as `(loss.transpose(1, 2) * m).sum()` makes it) gives torch's
    gradient."""
    extra = dict(extra)
    x = (torch.randn(2, 5, 3, 4, dtype=torch.float64) * 2).requires_grad_()
    t = torch.softmax(torch.randn(2, 5, 3, 4, dtype=torch.float64), 1) if extra.pop("prob", 0) \
        else torch.randint(0, 5, (2, 3, 4))
    m = torch.randn(2, 4, 3, dtype=torch.float64)
    ours = nllfused.cross_entropy(x, t, reduction="none", backend=backend, **extra)
    ours = ours[0] if isinstance(ours, tuple) else ours
    plain = {k: v for k, v in extra.items() if k != "return_stats"}
    ref = nllfused.cross_entropy(x, t, reduction="none", backend="torch", **plain)
    torch.testing.assert_close(
        torch.autograd.grad((ours.transpose(1, 2) * m).sum(), x)[0],
        torch.autograd.grad((ref.transpose(1, 2).contiguous() * m).sum(), x)[0])
