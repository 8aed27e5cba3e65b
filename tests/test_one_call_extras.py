"""The one-call path (csrc/loss.cpp, csrc/one_call.cpp) with nllfused's extras -- z_loss,
logit_scale, softcap -- on CPU tensors: the loss alone goes to nllfused::cross_entropy_loss in
one C++ call, as a torch-compatible call does, and gives what float64 torch gives
(tests/reference.py) and what the general path gives from the same kernels."""
import math

import pytest
import torch

import nllfused
from helpers import check_cross_entropy, dtype_id
from test_one_call import index_case, one_call_and_general, soft_case, took_one_call

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")

EXTRAS = [{"z_loss": 1e-3}, {"logit_scale": 0.7}, {"softcap": 4.0},
          {"z_loss": 1e-2, "logit_scale": 1.5, "softcap": 6.0}]
EXTRAS_WITH_TORCH_OPTIONS = [{"z_loss": 1e-2, "logit_scale": 1.5, "softcap": 6.0,
                              "weight": "rand", "label_smoothing": 0.2, "ignore_index": 2}]


def with_weight(options, C, dtype):
    if options.get("weight") != "rand":
        return options
    return {**options, "weight": torch.rand(C, dtype=dtype if dtype == torch.float64
                                            else torch.float32) + 0.1}


def check_second_order(f, x):
    """gradcheck and gradgradcheck of f at x, and the first order of the torch formula the second
    order differentiates (csrc/loss.h, torch_loss) against the kernels' (gradgradcheck alone
    compares that formula with itself)."""
    torch.autograd.gradcheck(f, (x,))
    torch.autograd.gradgradcheck(f, (x,))
    grad = torch.randn(f(x).shape, dtype=torch.float64)
    (kernels,) = torch.autograd.grad(f(x), x, grad)
    (formula,) = torch.autograd.grad(f(x), x, grad, create_graph=True)
    torch.testing.assert_close(formula, kernels, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("shape", [(64, 10), (7, 1000), (13,), (2, 7, 4, 5)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", EXTRAS + EXTRAS_WITH_TORCH_OPTIONS, ids=str)
def test_one_call_extras_match_float64_torch(dtype, shape, reduction, options):
    x, t = index_case(shape, "cpu", dtype, options.get("ignore_index", -100))
    options = with_weight(options, shape[1] if len(shape) > 1 else shape[0], dtype)
    assert took_one_call(nllfused.cross_entropy(x.clone().requires_grad_(), t,
                                                reduction=reduction, **options))
    check_cross_entropy(x, t, "cpu", "auto", reduction=reduction, **options)


@pytest.mark.parametrize("shape", [(64, 10), (3, 40, 33)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", EXTRAS, ids=str)
def test_one_call_extras_probability_targets(shape, reduction, options):
    """The z-loss term on every row, 'mean' over the rows."""
    x, q = soft_case(shape, torch.float32)
    assert took_one_call(nllfused.cross_entropy(x.clone().requires_grad_(), q,
                                                reduction=reduction, **options))
    check_cross_entropy(x, q, "cpu", "auto", reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("options", EXTRAS, ids=str)
def test_one_call_extras_are_the_general_path(reduction, prob, options, monkeypatch):
    """The same kernels either way: per-row losses and gradients bit for bit; a reduced loss
    within 1 ulp of the double reduction of the same rows (the one-call path) or within float32
    summation's error of it (the general path); the reduced loss's gradient within the
    difference of its row share (1 / the weights' sum, 1 / the counted rows) rounded once or
    by float32 ops."""
    shape = (6, 9, 5, 3)
    if prob:
        x, t = soft_case(shape, torch.float32)
        w = None
    else:
        x, t = index_case(shape, "cpu", torch.float32)
        w = torch.rand(9) + 0.1
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, **options)
    (l1, g1), (l2, g2) = one_call_and_general(x, t, monkeypatch, **kw)
    if reduction == "none":
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
        return
    rows = nllfused.cross_entropy(x, t, **dict(kw, reduction="none")).double()
    n, ulp = rows.numel(), 2.0 ** -23
    if reduction == "sum":
        exact = rows.sum()
    elif prob:
        exact = rows.sum() / n
    else:  # the loss over the target weights' sum, the z-loss term over the counted rows
        counted = t != -100
        ce_rows = nllfused.cross_entropy(x, t, **dict(kw, reduction="none", z_loss=0.0)).double()
        _, lse = nllfused.cross_entropy(x, t, return_lse=True, **dict(kw, reduction="none"))
        z_rows = (kw.get("z_loss", 0.0) * lse.double() ** 2 * counted).float().double()
        exact = ce_rows.sum() / w.double()[t[counted]].sum() + z_rows.sum() / counted.sum()
    # the one-call path: one rounding of sums in double (the index 'mean': of two quotients)
    torch.testing.assert_close(l1.double(), exact, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(l2.double(), exact, rtol=(n + 1) * ulp / 2, atol=0)
    tol = (n + 2) * ulp / 2
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol * g2.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_one_call_extras_double_backward(reduction, prob):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    if prob:
        t, w = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1), None
    else:
        t, w = torch.tensor([0, 3, -100, 1, 2]), torch.rand(4, dtype=torch.float64) + 0.1

    def f(x):
        return nllfused.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1,
                                      z_loss=0.05, logit_scale=1.3, softcap=2.0)

    assert took_one_call(f(x))
    check_second_order(f, x)


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("extras", [(1e-3, 1.0, 0.0), (0.0, 0.5, 3.0), (1e-2, 1.5, 6.0)],
                         ids=str)
def test_opcheck_cross_entropy_loss_extras(reduction, prob, extras):
    x = torch.randn(5, 6, 3, requires_grad=True)
    if prob:
        t = torch.softmax(torch.randn(5, 6, 3), 1)
    else:
        t = torch.randint(0, 6, (5, 3))
        t[0, 0] = -100
    torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss.default,
                          (x, t, torch.rand(6) + 0.1, reduction, -100, 0.1, *extras))


def test_extras_the_one_call_path_leaves_to_the_general_path():
    """Bad extras get the general path's errors (and the library keeps working); statistics with
    extras are the general path's; the op refuses bad extras itself."""
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    bad = [dict(z_loss=-1e-3), dict(z_loss=math.inf), dict(logit_scale=math.nan),
           dict(softcap=0.0), dict(softcap=-2.0), dict(softcap=math.inf), dict(z_loss=True)]
    for kw in bad:
        with pytest.raises((ValueError, TypeError)):
            nllfused.cross_entropy(x, t, **kw)
    assert not took_one_call(nllfused.cross_entropy(x, t, z_loss=1e-3, return_stats=True)[0])
    assert not took_one_call(nllfused.cross_entropy(x, t, softcap=3.0, return_lse=True)[0])
    op = torch.ops.nllfused.cross_entropy_loss.default
    for extras in [(-1.0, 1.0, 0.0), (0.0, math.inf, 0.0), (0.0, 1.0, -1.0)]:
        with pytest.raises(ValueError, match="z_loss"):
            op(x, t, None, 1, -100, 0.0, *extras)
    assert took_one_call(nllfused.cross_entropy(x, t, z_loss=1e-3, softcap=3.0))


STATS_NODE = "nllfused::CrossEntropyLossStatsBackward"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", EXTRAS, ids=str)
def test_return_z_loss_and_lse_with_extras(reduction, options, monkeypatch):
    """Liger-Kernel's and quack's names with the extras (lse_square_scale with return_z_loss)
    take the statistics' one-call op (csrc/loss_stats.cpp): the loss and its gradient the plain
    call's bits, the z-loss term and the lse rows the general path's, the term as float64
    torch's."""
    x, t = index_case((6, 9, 5), "cpu", torch.float32)
    w = torch.rand(9) + 0.1
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, **options)
    grad = torch.randn(() if reduction != "none" else t.shape,
                       generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, z, lse = nllfused.cross_entropy(xa, t, return_z_loss=True, return_lse=True, **kw)
    assert loss.grad_fn.name() == STATS_NODE
    plain = nllfused.cross_entropy(xb, t, **kw)
    assert took_one_call(plain)
    assert torch.equal(loss, plain)
    loss.backward(grad)
    plain.backward(grad)
    assert torch.equal(xa.grad, xb.grad)
    monkeypatch.setattr(nllfused.functional, "_one_call_cpu", lambda *a: None)
    _, z_general, lse_general = nllfused.cross_entropy(x, t, return_z_loss=True,
                                                       return_lse=True, **kw)
    assert torch.equal(lse, lse_general)
    torch.testing.assert_close(z, z_general, rtol=2 * 2.0 ** -23, atol=0)
    xs = x.double() * options.get("logit_scale", 1.0)
    if "softcap" in options:
        xs = options["softcap"] * torch.tanh(xs / options["softcap"])
    counted = t != -100
    term = torch.where(counted, options.get("z_loss", 0.0) * torch.logsumexp(xs, 1) ** 2, 0.0)
    expected = term if reduction == "none" else term.sum() if reduction == "sum" \
        else term.sum() / counted.sum()
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_z_loss_with_extras_double_backward(reduction):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2])

    def f(x):
        return nllfused.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                      logit_scale=1.3, softcap=2.0, return_z_loss=True)[0]

    assert f(x).grad_fn.name() == STATS_NODE
    check_second_order(f, x)


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("want", [2, 64, 2 | 64, 1 | 2])
def test_opcheck_cross_entropy_loss_stats_extras(reduction, want):
    x = torch.randn(5, 6, 3, requires_grad=True)
    t = torch.randint(0, 6, (5, 3))
    t[0, 0] = -100
    torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss_stats.default,
                          (x, t, torch.rand(6) + 0.1, reduction, -100, 0.1, want,
                           1e-2, 1.5, 6.0))


def test_stats_op_refuses_kernel_statistics_with_extras():
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    op = torch.ops.nllfused.cross_entropy_loss_stats.default
    with pytest.raises(NotImplementedError, match="general path"):
        op(x, t, None, 1, -100, 0.0, 16, 1e-3, 1.0, 0.0)  # entropy
    with pytest.raises(ValueError, match="z_loss"):
        op(x, t, None, 1, -100, 0.0, 2, -1.0, 1.0, 0.0)
    loss, st = nllfused.cross_entropy(x, t, return_stats=True, z_loss=1e-3)  # the general path
    assert loss.grad_fn.name() != STATS_NODE and st.entropy is not None
