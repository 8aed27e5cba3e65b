"""Every mode of autograd torch's loss supports gives torch's numbers: double backward,
forward-mode AD, torch.func transforms; float64 class weights stay float64."""
import warnings
from functools import partial

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import nllfused
from helpers import backend_params
from reference import assert_matches_oracle, reference

F64 = torch.float64

# Index targets (with an ignored row) and probability targets; each with the options that change
# the formulas: class weights, smoothing, z-loss, logit scale and softcap.
OPTIONS = [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(weight="rand", label_smoothing=0.2), id="weight-smoothing"),
    pytest.param(dict(z_loss=0.05, logit_scale=0.7, softcap=3.0), id="zloss-scale-softcap"),
    pytest.param(dict(weight="rand", label_smoothing=0.1, z_loss=0.02),
                 id="weight-smoothing-zloss"),
]


def sample(prob, N=3, C=4, options=None, device="cpu"):
    x = torch.randn(N, C, dtype=F64, device=device, requires_grad=True)
    if prob:
        t = torch.softmax(torch.randn(N, C, dtype=F64, device=device), 1)
    else:
        t = torch.randint(0, C, (N,), device=device)
        t[0] = -100
    kw = dict(options or {})
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(C, dtype=F64, device=device) + 0.2
    return x, t, kw


def oracle_fn(t, reduction, **kw):
    """torch's own loss (float64) with nllfused's extras, as a differentiable function of x."""
    def f(x):
        z = x * kw.get("logit_scale", 1.0)
        if kw.get("softcap"):
            z = kw["softcap"] * torch.tanh(z / kw["softcap"])
        plain = dict(weight=kw.get("weight"), label_smoothing=kw.get("label_smoothing", 0.0))
        rows = F.cross_entropy(z, t, reduction="none", **plain)
        zl = kw.get("z_loss", 0.0)
        counted = torch.ones(len(t), dtype=torch.bool, device=t.device) \
            if t.is_floating_point() else t != -100
        zrows = torch.where(counted, zl * torch.logsumexp(z, 1) ** 2, 0.0)
        if reduction == "none":
            return rows + zrows
        if reduction == "sum":
            return (rows + zrows).sum()
        return F.cross_entropy(z, t, reduction="mean", **plain) + zrows.sum() / counted.sum()
    return f


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_gradgradcheck(device, backend, prob, reduction, options):
    x, t, kw = sample(prob, options=options, device=device)
    with warnings.catch_warnings():
        # No "an autograd kernel was not registered ... silently incorrect" warning either.
        warnings.filterwarnings("error", message=".*autograd kernel was not registered.*")
        assert torch.autograd.gradgradcheck(
            lambda x: nllfused.cross_entropy(x, t, reduction=reduction, backend=backend, **kw),
            (x,))


@pytest.mark.parametrize("device,backend", backend_params())
def test_double_backward_matches_torch(device, backend):
    """The issue's example: the derivative of a gradient penalty, against torch's."""
    x, t, _ = sample(False, N=4, C=5, device=device)
    g, = torch.autograd.grad(nllfused.cross_entropy(x, t, backend=backend), x, create_graph=True)
    ours, = torch.autograd.grad((g * g).sum(), x)
    g_ref, = torch.autograd.grad(F.cross_entropy(x, t), x, create_graph=True)
    ref, = torch.autograd.grad((g_ref * g_ref).sum(), x)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("options", OPTIONS)
def test_torch_func_transforms_match_torch(device, backend, prob, options):
    x, t, kw = sample(prob, options=options, device=device)
    x = x.detach()
    ours = lambda x: nllfused.cross_entropy(x, t, backend=backend, **kw)  # noqa: E731
    ref = oracle_fn(t, "mean", **kw)
    tangent = torch.randn_like(x)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(ours)(x), torch.func.grad(ref)(x), **close)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (tangent,)),
                               torch.func.jvp(ref, (x,), (tangent,)), **close)
    torch.testing.assert_close(torch.func.hessian(ours)(x), torch.func.hessian(ref)(x), **close)
    torch.testing.assert_close(torch.func.jacfwd(ours)(x), torch.func.jacrev(ref)(x), **close)
    batch = torch.randn(3, *x.shape, dtype=F64, device=device)
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.func.vmap(ref)(batch), **close)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_ad_matches_torch(device, backend, prob, reduction):
    x, t, kw = sample(prob, options=dict(weight="rand", label_smoothing=0.1, z_loss=0.01),
                      device=device)
    x = x.detach()
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = nllfused.cross_entropy(fwAD.make_dual(x, tangent), t, reduction=reduction,
                                     backend=backend, **kw)
        ours = fwAD.unpack_dual(out)
        ref = fwAD.unpack_dual(oracle_fn(t, reduction, **kw)(fwAD.make_dual(x, tangent)))
    assert ours.tangent is not None
    torch.testing.assert_close(ours.primal, ref.primal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.tangent, ref.tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_float64_weights_are_not_rounded(device, backend, reduction, smoothing):
    """float64 logits with float64 weights: torch is exact to ~1e-15; so are we (float32 weights
    would be off by ~1e-7 relative)."""
    x, t, _ = sample(False, N=64, C=33, device=device)
    w = torch.rand(33, dtype=F64, device=device) + 1e-3
    ours = nllfused.cross_entropy(x, t, weight=w, reduction=reduction,
                                  label_smoothing=smoothing, backend=backend)
    ref = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device,backend", backend_params())
def test_zero_mass_class_at_minus_inf_is_finite_on_every_backend(device, backend):
    """One rule everywhere (docs/maths.md): a class with no target mass adds nothing to the loss,
    even at -inf, where torch's 0 * inf gives NaN."""
    x = torch.randn(4, 6, dtype=torch.float32, device=device)
    x[:, 2] = float("-inf")
    q = torch.softmax(torch.randn(4, 6, device=device), 1)
    q[:, 2] = 0
    q = q / q.sum(1, keepdim=True)
    ours = nllfused.cross_entropy(x.requires_grad_(), q, reduction="none", backend=backend)
    keep = [0, 1, 3, 4, 5]  # the same loss without the masked class
    expected, _ = reference(x.detach()[:, keep], q[:, keep], reduction="none")
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 2] == 0).all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_row_without_target_mass_adds_nothing_even_at_minus_inf(device, backend):
    """A row whose target has no mass at all has loss 0 on every backend, even when all of
    its logits are -inf (its lse is -inf, and 0 * -inf must not turn into NaN)."""
    x = torch.randn(3, 5, dtype=torch.float32, device=device)
    x[1] = float("-inf")
    q = torch.softmax(torch.randn(3, 5, device=device), 1)
    q[1] = 0
    ours = nllfused.cross_entropy(x, q, reduction="none", backend=backend)
    expected, _ = reference(x[[0, 2]], q[[0, 2]], reduction="none")
    assert ours[1].item() == 0
    torch.testing.assert_close(ours[[0, 2]].double().cpu(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("kdim", [False, True], ids=["rows", "kdim"])
def test_row_without_target_mass_holding_nan_or_inf_is_nan(device, backend, kdim):
    """The -inf rule exempts nothing else: a row without target mass that holds a NaN or +inf
    has a NaN loss and gradient, as torch's (0 * NaN); one of finite logits has loss and
    gradient 0."""
    x = torch.randn(3, 5)
    x[0, 1] = float("nan")
    x[1, 3] = float("inf")
    if kdim:
        x = torch.stack([x, x], 2)
    x = x.to(device).requires_grad_()
    q = torch.zeros_like(x)
    loss = nllfused.cross_entropy(x, q, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[:2].isnan().all() and bool((loss[2] == 0).all())
    assert x.grad[:2].isnan().all() and bool((x.grad[2] == 0).all())


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("options", [pytest.param(dict(), id="plain"),
                                     pytest.param(dict(z_loss=0.05), id="zloss"),
                                     pytest.param(dict(weight="rand", label_smoothing=0.2),
                                                  id="weight-smoothing")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["first", "second"])
def test_ignored_rows_get_no_gradient_in_every_mode(device, backend, options, reduction,
                                                    create_graph):
    """The contract (csrc/ops.cpp, docs/maths.md): an ignored row's loss and gradient are 0
    whatever its logits -- a row holding a NaN, one holding +inf, one of all -inf, where torch's
    backward gives NaN rows -- on every backend, with z-loss (whose lse gradient is 0 there) and
    under create_graph=True too (the torch formulas the second order differentiates), whose
    second derivative is 0 there as well; the counted rows as float64 torch computes them."""
    x = torch.randn(5, 6, dtype=F64, device=device)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    t = torch.tensor([-100, -100, -100, 1, 4], device=device)
    kw = dict(options, reduction=reduction)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(6, dtype=F64, device=device) + 0.1
    xd = x.clone().requires_grad_()
    loss = nllfused.cross_entropy(xd, t, backend=backend, **kw)
    g_out = torch.rand_like(loss)
    (g,) = torch.autograd.grad(loss, xd, g_out, create_graph=create_graph)
    assert torch.equal(g[:3].detach().cpu(), torch.zeros(3, 6, dtype=F64))
    if reduction == "none":
        expected, _ = reference(x[3:], t[3:], **kw)
        torch.testing.assert_close(loss[3:].detach().cpu(), expected, rtol=1e-10, atol=1e-12)
        assert (loss[:3] == 0).all()
    # the counted rows' gradient: torch's, from the counted rows alone (the ignored rows add
    # nothing to a 'mean' either: their weight is not in its denominator)
    xr = x[3:].clone().requires_grad_()
    z = kw.get("z_loss", 0.0)
    ref_kw = {k: v for k, v in kw.items() if k != "z_loss"}
    ref = F.cross_entropy(xr, t[3:], **ref_kw)
    lse = torch.logsumexp(xr, 1)
    ref = ref + z * (lse * lse if reduction == "none" else (lse * lse).mean())
    (gr,) = torch.autograd.grad(ref, xr, g_out[3:] if reduction == "none" else g_out)
    torch.testing.assert_close(g[3:].detach(), gr, rtol=1e-10, atol=1e-12)
    if create_graph:
        (gg,) = torch.autograd.grad((g * torch.rand_like(g)).sum(), xd)
        assert torch.equal(gg[:3].cpu(), torch.zeros(3, 6, dtype=F64))
        assert torch.isfinite(gg[3:]).all()


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["first", "second"])
def test_ignored_rows_get_no_gradient_from_reduced_statistics(device, backend, reduction,
                                                              create_graph):
    """The same rule for the differentiable statistics: a reduced entropy or target log-prob
    weighs only the counted rows, so an ignored row of NaN / +inf / all -inf logits gets gradient
    0 from them too (no 0 times its NaN entropy), first and second order, on every backend; the
    counted rows' gradient is float64 torch's."""
    x = torch.randn(5, 6, dtype=F64, device=device)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2] = float("-inf")
    t = torch.tensor([-100, -100, -100, 1, 4], device=device)
    xd = x.clone().requires_grad_()
    loss, st = nllfused.cross_entropy(xd, t, reduction=reduction, backend=backend,
                                      return_stats=("entropy", "target_logprob"))
    (g,) = torch.autograd.grad(loss + 0.3 * st.entropy - 0.7 * st.target_logprob, xd,
                               create_graph=create_graph)
    assert torch.equal(g[:3].detach().cpu(), torch.zeros(3, 6, dtype=F64))
    xr = x[3:].clone().requires_grad_()
    logp = torch.log_softmax(xr, 1)
    agg = torch.mean if reduction == "mean" else torch.sum
    ref = (F.cross_entropy(xr, t[3:], reduction=reduction)
           + 0.3 * agg(-(logp.exp() * logp).sum(1))
           - 0.7 * agg(logp.gather(1, t[3:, None]).squeeze(1)))
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(g[3:].detach(), gr, rtol=1e-10, atol=1e-12)
    if create_graph:
        (gg,) = torch.autograd.grad((g * torch.rand_like(g)).sum(), xd)
        assert torch.equal(gg[:3].cpu(), torch.zeros(3, 6, dtype=F64))
        assert torch.isfinite(gg[3:]).all()


def sparse_prob_target(N, C, device):
    """Probability targets where most classes have no mass: one-hot rows, one row split."""
    q = torch.zeros(N, C, dtype=F64, device=device)
    q[torch.arange(N), torch.randint(0, C, (N,))] = 1.0
    q[0] = 0.0
    q[0, :2] = torch.tensor([0.25, 0.75], dtype=F64)
    return q


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("options", OPTIONS)
def test_target_gradient_where_the_target_has_no_mass(device, backend, options):
    """d loss / d q_c is -w_c (1 - e) log p_c / N (mean) for every class, q_c = 0 included, in
    every mode: backward, torch.func.grad, jvp in q, and the mixed second derivative
    d/dq (dL/dx . v) of a double backward."""
    x, _, kw = sample(True, N=4, C=5, options=options, device=device)
    x = x.detach()
    q = sparse_prob_target(4, 5, device)
    ours = lambda x, q: nllfused.cross_entropy(x, q, backend=backend, **kw)  # noqa: E731
    ref = lambda x, q: oracle_fn(q, "mean", **kw)(x)  # noqa: E731
    close = dict(rtol=1e-10, atol=1e-12)
    g_ref = torch.func.grad(ref, argnums=1)(x, q)
    assert (g_ref[q == 0] != 0).all()  # what a where on q's value would cut
    qd = q.clone().requires_grad_()
    ours(x, qd).backward()
    torch.testing.assert_close(qd.grad, g_ref, **close)
    torch.testing.assert_close(torch.func.grad(ours, argnums=1)(x, q), g_ref, **close)
    tangent = torch.randn_like(q)
    torch.testing.assert_close(torch.func.jvp(lambda q: ours(x, q), (q,), (tangent,)),
                               torch.func.jvp(lambda q: ref(x, q), (q,), (tangent,)), **close)
    v = torch.randn_like(x)
    mixed = []
    for f in (ours, ref):
        xd, qd = x.clone().requires_grad_(), q.clone().requires_grad_()
        gx, = torch.autograd.grad(f(xd, qd), xd, create_graph=True)
        mixed.append(torch.autograd.grad((gx * v).sum(), qd)[0])
    torch.testing.assert_close(mixed[0], mixed[1], **close)


@pytest.mark.parametrize("device,backend", backend_params())
def test_target_gradient_at_a_class_masked_at_minus_inf(device, backend):
    """A class without mass masked at -inf adds 0 to the loss (docs/maths.md), but its target
    gradient is torch's -w_c log p_c = +inf, in backward and through torch.func.grad (the
    reference path) alike, the other classes' as torch's."""
    x = torch.randn(3, 6, dtype=F64, device=device)
    x[0, 1] = x[2, [0, 4]] = float("-inf")
    q = torch.softmax(torch.randn(3, 6, dtype=F64, device=device), 1)
    q[0, 1] = q[2, [0, 4]] = 0.0
    w = torch.rand(6, dtype=F64, device=device) + 0.5
    kw = dict(weight=w, label_smoothing=0.0)
    qt = q.clone().requires_grad_()
    F.cross_entropy(x, qt, **kw).backward()
    assert qt.grad[0, 1] == float("inf") and qt.grad[2, 0] == float("inf")
    ours = lambda q: nllfused.cross_entropy(x, q, backend=backend, **kw)  # noqa: E731
    qd = q.clone().requires_grad_()
    ours(qd).backward()
    torch.testing.assert_close(qd.grad, qt.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.func.grad(ours)(q), qt.grad, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad(ours), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q), qt.grad, rtol=1e-10, atol=1e-12)
    # forward mode as reverse; the mixed second derivative d/dq (dL/dx) as torch's; a tangent
    # in x alone while q requires grad no NaN (its zero tangent times +inf)
    torch.testing.assert_close(torch.func.jacfwd(ours)(q), qt.grad, rtol=1e-10, atol=1e-12)
    mixed = []
    for loss_fn in (partial(nllfused.cross_entropy, backend=backend), F.cross_entropy):
        xd, qd = x.clone().requires_grad_(), q.clone().requires_grad_()
        gx, = torch.autograd.grad(loss_fn(xd, qd, **kw), xd, create_graph=True)
        mixed.append(torch.autograd.grad(gx[0, 0], qd)[0])
    torch.testing.assert_close(mixed[0], mixed[1], rtol=1e-10, atol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        xt = torch.autograd.forward_ad.make_dual(x, torch.full_like(x, 0.1))
        out = nllfused.cross_entropy(xt, q.clone().requires_grad_(), backend=backend, **kw)
        assert torch.isfinite(torch.autograd.forward_ad.unpack_dual(out).tangent)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("offset", [0.0, 5e4, 1e6])
def test_target_gradient_keeps_its_precision_at_large_logits(device, backend, offset):
    """d loss / d q = -log p in float32 as close to float64 as torch's own float32 gradient,
    however far the logits are from 0 (log p from the saved lse must not round lse first: that
    lost ulp(lse) / 2, 3e-2 at 1e6)."""
    x = (torch.randn(4, 31, dtype=F64) + offset).float()
    q = torch.softmax(torch.randn(4, 31), 1)

    def target_grad(f, dtype, dev, **kw):
        t = q.to(dtype=dtype, device=dev, copy=True).requires_grad_()
        f(x.to(dtype).to(dev), t, reduction="sum", **kw).backward()
        return t.grad
    assert_matches_oracle(target_grad(nllfused.cross_entropy, torch.float32, device,
                                      backend=backend),
                          target_grad(F.cross_entropy, F64, "cpu"), torch.float32,
                          target_grad(F.cross_entropy, torch.float32, "cpu"), what="target grad")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("C", [1, 31])
def test_target_gradient_with_softcap_is_one_log_softmax(device, backend, C):
    """With softcap, d loss / d q = -log p from one z: the kernels' tanh is not torch's (~1 ulp
    apart), and log p from torch's z less the kernels' lse was not 0 for a class of its own
    (p = 1: the gradient exactly 0, as torch's)."""
    x = torch.linspace(-3, 3, 13 * C).reshape(13, C)
    q = torch.softmax(torch.randn(13, C), 1)

    def target_grad(f, dtype, dev, **kw):
        t = q.to(dtype=dtype, device=dev, copy=True).requires_grad_()
        f(x.to(dtype).to(dev), t, reduction="sum", **kw).backward()
        return t.grad.cpu()

    ours = target_grad(lambda v, t, **kw: nllfused.cross_entropy(v, t, softcap=30.0, **kw),
                       torch.float32, device, backend=backend)
    ref = (lambda v, t, **kw: F.cross_entropy(30.0 * torch.tanh(v / 30.0), t, **kw))  # torch
    if C == 1:
        assert torch.equal(ours, torch.zeros_like(ours))
    assert_matches_oracle(ours, target_grad(ref, F64, "cpu"), torch.float32,
                          target_grad(ref, torch.float32, "cpu"), what="target grad")


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
@pytest.mark.parametrize("mode", ["vmap", "grad", "jvp", "forward_ad", "vmap_of_grad"])
def test_out_of_range_class_index_raises_in_every_mode(backend, mode):
    """A class index outside [0, C) raises under torch.func transforms and forward-mode AD as in
    eager mode (an IndexError, which is also the RuntimeError torch raises under vmap), where
    these modes' reference path would give NaN; a valid call right after still works."""
    x = torch.randn(4, 5, dtype=torch.float64)
    bad = torch.tensor([0, 5, 1, 2])

    def call(t):
        loss = lambda a, y: nllfused.cross_entropy(a, y, backend=backend)  # noqa: E731
        if mode == "vmap":
            return torch.func.vmap(loss)(x[None], t[None])
        if mode == "grad":
            return torch.func.grad(loss)(x, t)
        if mode == "jvp":
            return torch.func.jvp(lambda a: loss(a, t), (x,), (torch.ones_like(x),))[1]
        if mode == "vmap_of_grad":
            return torch.func.vmap(torch.func.grad(loss))(x[None], t[None])
        with fwAD.dual_level():
            return fwAD.unpack_dual(loss(fwAD.make_dual(x, torch.ones_like(x)), t)).tangent

    with pytest.raises(IndexError, match="out of bounds") as err:
        call(bad)
    assert isinstance(err.value, RuntimeError)
    assert torch.isfinite(call(bad.clamp(max=4))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("w_dtype", ["same", "float32"])
def test_16_bit_logits_with_weights_in_every_mode(dtype, w_dtype):
    """16-bit logits with class weights (which the one-call ops take in float32): double
    backward and torch.func.grad run (they met float32 weights beside 16-bit logits in torch's
    loss, or a weight converted outside the transform), as the general path's reference does."""
    x = torch.randn(6, 7).to(dtype)
    t = torch.randint(0, 7, (6,))
    w = (torch.rand(7) + 0.5).to(dtype if w_dtype == "same" else torch.float32)
    results = []
    for backend in ("auto", "torch"):
        xd = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xd, t, w, label_smoothing=0.1, backend=backend)
        g, = torch.autograd.grad(loss, xd, create_graph=True)
        h, = torch.autograd.grad((g.float() ** 2).sum(), xd)
        f = torch.func.grad(lambda x: nllfused.cross_entropy(x, t, w, label_smoothing=0.1,
                                                             backend=backend).float())(x)
        results.append((g.detach().float(), h.float(), f.float()))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_forward_mode_transforms_of_an_empty_batch(prob):
    """jacfwd and hessian of the 'mean' loss of 0 rows: empty results of torch's shapes (the
    probability targets' mean raised IndexError under jacfwd); index targets raise as torch."""
    x = torch.randn(0, 3, dtype=F64)
    t = torch.randn(0, 3, dtype=F64).softmax(1) if prob else torch.zeros(0, dtype=torch.long)
    for transform in (torch.func.jacfwd, torch.func.hessian):
        try:
            theirs = transform(lambda x: F.cross_entropy(x, t))(x)
        except Exception as exc:
            with pytest.raises(type(exc)):
                transform(lambda x: nllfused.cross_entropy(x, t))(x)
            continue
        ours = transform(lambda x: nllfused.cross_entropy(x, t))(x)
        assert ours.shape == theirs.shape and ours.numel() == 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS)
def test_batched_gradients_match_torch(backend, prob, reduction, options):
    """torch.autograd.grad(is_grads_batched=True) (vmap over the backward, as jacobian's
    vectorize=True): torch's numbers; the one-call graph node met functorch wrappers without
    storage in its kernels."""
    x, t, kw = sample(prob, N=5, C=4, options=options)
    loss = nllfused.cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
    expected = oracle_fn(t, reduction, **kw)(x)
    grads = torch.randn(3, *loss.shape, dtype=F64)
    ours, = torch.autograd.grad(loss, x, grads, is_grads_batched=True)
    theirs, = torch.autograd.grad(expected, x, grads, is_grads_batched=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_gradients_of_statistics(reduction):
    """The same for the loss with its entropy and target log-probability (the statistics'
    graph node), against the torch reference's."""
    x, t, kw = sample(False, N=5, C=4, options=dict(weight="rand", label_smoothing=0.1))
    results = []
    for backend in ("auto", "torch"):
        loss, st = nllfused.cross_entropy(x, t, reduction=reduction, backend=backend,
                                          return_stats=("entropy", "target_logprob"), **kw)
        total = loss + 0.5 * st.entropy - st.target_logprob
        grads = torch.linspace(-1, 2, 3 * total.numel(), dtype=F64).reshape(3, *total.shape)
        results.append(torch.autograd.grad(total, x, grads, is_grads_batched=True)[0])
    torch.testing.assert_close(*results, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 2], ids=["whole", "chunked"])
def test_batched_gradients_of_the_linear_loss(reduction, chunk_size):
    g = torch.Generator().manual_seed(0)
    h, W = (torch.randn(*s, dtype=F64, generator=g, requires_grad=True) for s in ((6, 3), (5, 3)))
    t = torch.randint(0, 5, (6,), generator=g)
    loss = nllfused.linear_cross_entropy(h, W, t, reduction=reduction, chunk_size=chunk_size)
    expected = F.cross_entropy(F.linear(h, W), t, reduction=reduction)
    grads = torch.randn(3, *loss.shape, dtype=F64, generator=g)
    ours = torch.autograd.grad(loss, (h, W), grads, is_grads_batched=True)
    theirs = torch.autograd.grad(expected, (h, W), grads, is_grads_batched=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stats", [False, True], ids=["loss", "stats"])
@pytest.mark.parametrize("saved_major", [False, True], ids=["row-major", "class-major"])
@pytest.mark.parametrize("mode", ["plain", "batched", "create_graph"])
def test_saved_tensor_hooks_may_hand_back_other_strides(stats, saved_major, mode):
    """A saved-tensor hook that returns the logits in other strides (save_on_cpu's
    pin_memory=True packs them contiguous): the gradient as without it -- the backward took
    the unpacked logits' layout for the forward's, where its saved rows had the other -- also
    for vmapped gradients and create_graph (differentiated in the logits as handed back)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, dtype=F64, generator=g)  # (C, N): x.t() is class-major (N, C)
    t = torch.randint(0, 4, (6,), generator=g)
    other = (lambda z: z.contiguous()) if saved_major else (lambda z: z.t().contiguous().t())
    results = []
    for hooked in (False, True):
        p = base.clone().requires_grad_()
        x = p.t() if saved_major else p.t().contiguous()
        with torch.autograd.graph.saved_tensors_hooks(
                lambda z: z, other if hooked else (lambda z: z)):
            out = nllfused.cross_entropy(x, t, label_smoothing=0.1,
                                         return_stats=("entropy",) if stats else False)
            loss = out[0] + out[1].entropy if stats else out
        if mode == "batched":
            grads = torch.tensor([1.0, -2.0], dtype=F64)
            results.append(torch.autograd.grad(loss, p, grads, is_grads_batched=True)[0])
        else:
            results.append(torch.autograd.grad(loss, p, create_graph=mode == "create_graph")[0])
    rtol = 0 if mode == "plain" else 1e-12  # (torch's formula: the layouts' own roundings)
    torch.testing.assert_close(*results, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extras", [dict(softcap=1e5), dict(softcap=30.0, logit_scale=0.7),
                                    dict(z_loss=1e-2)], ids=str)
def test_second_order_of_16_bit_logits_applies_the_extras_in_float32(dtype, extras):
    """create_graph=True with 16-bit logits and nllfused's extras: the first-order gradient is
    the one without create_graph, both the float32 value rounded once (one ulp apart at most):
    the extras in float32, as the kernels apply them (a float16 softcap of 1e5 was inf)."""
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(8, 16, generator=g) * 5, torch.randint(0, 16, (8,), generator=g)
    grads = []
    for create_graph in (False, True):
        x = x0.to(dtype).requires_grad_()
        loss = nllfused.cross_entropy(x, t, reduction="sum", **extras)
        grads.append(torch.autograd.grad(loss, x, create_graph=create_graph)[0].detach())
    ulp = torch.finfo(dtype).eps
    assert grads[1].isfinite().all()
    torch.testing.assert_close(grads[1].float(), grads[0].float(), rtol=ulp,
                               atol=ulp * grads[0].abs().max().item())
