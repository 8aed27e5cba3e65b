"""The one-call path with statistics (csrc/loss_stats.cpp): CPU calls the one-call path takes,
with return_stats, go to nllfused::cross_entropy_loss_stats, whose reductions and autograd are
C++. Its per-row statistics must be bit for bit the general path's (the same kernel); reduced
ones the exact sums of those rows rounded once, whether the kernel adds the rows up in its pass
(the lanes path, csrc/cpu/ce_cpu_lanes.h: up to 256 classes, 384 for (N, C) rows, 1024 for
some layouts) or writes them (the rows path) and the op adds them up after it. Its loss must
be the plain one-call path's, and its gradients the general path's; their agreement with
float64 torch is tests/test_stats.py's (whose CPU calls take this path)."""
import pytest
import torch

import nllfused
from nllfused import stats

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"]
    or not hasattr(torch.ops.nllfused, "cross_entropy_loss_stats"),
    reason="the C++ extension is not built")

NODE = "nllfused::CrossEntropyLossStatsBackward"
NAME_SETS = [True, ("entropy", "target_logprob"), ("predicted", "correct"), "lse",
             ("lse", "z_loss")]


def case(shape, dtype=torch.float32, channels_last=False, ignore_index=-100):
    """Logits and index targets; channels_last: that memory format, or for (N, C) column-major
    (rows adjacent in memory)."""
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    if channels_last and x.dim() == 2:
        x = x.t().contiguous().t()
    elif channels_last:
        x = x.to(memory_format=torch.channels_last)
    t_shape = shape[:1] + shape[2:]
    t = torch.randint(0, shape[1], t_shape)
    t[torch.rand(t_shape) < 0.25] = ignore_index
    return x, t


LANE_MAX_CLASSES = 256  # csrc/cpu/kernels.h, kLaneMaxClasses
LANE_MAX_ROWS = 384  # kLaneMaxClassesRows: an (N, C) input of unit class stride
LANE_MAX_VIN = 1024  # kLaneMaxClassesVin: (N, C, D) with D >= 32 or D == 16 and d stride 1,
# or a column-major (N, C)
LANE_FEW_ROWS = 8  # kLaneFewRows: up to this many rows of unit class stride, < 16 (N + 1) classes
CAPABILITIES = nllfused._C.build_info()["cpu_capabilities"] if nllfused.build_info()["built"] \
    else []
ROUNDED = ("lse", "entropy", "target_logprob")  # floating sums (z_loss: 0 or NaN; correct: a
#                                                 count or count / count, exact either way)


def lane_max_classes(x):
    """kernels.h's lane_max_classes for these logits: the most classes the lanes path (and its
    sums in the forward's pass) takes."""
    D = x[0, 0].numel() if x.dim() > 2 else 1
    if x.dim() == 2 and x.stride(1) == 1 and x.shape[0] <= LANE_FEW_ROWS:
        return 16 * (x.shape[0] + 1) - 1
    vin = (x.dim() > 2 and (D >= 32 or D == 16) and x.stride(-1) == 1) or (
        x.dim() == 2 and x.stride(0) == 1)
    if vin:
        return LANE_MAX_VIN
    return LANE_MAX_ROWS if x.dim() == 2 and x.stride(1) == 1 else LANE_MAX_CLASSES


def per_row_stats(x, t, names, kw):
    """The per-row statistics of the call (reduction 'none'), float64."""
    _, st = nllfused.cross_entropy(x, t, return_stats=names, **dict(kw, reduction="none"))
    return {n: getattr(st, n).detach().double() for n in stats.NAMES
            if getattr(st, n) is not None}


def assert_rounded_sum(a, rows, counted, reduction, name):
    """a is the sum ('sum') or mean ('mean') of rows over the counted rows, computed exactly and
    rounded once; lse is summed as the kernel's two float parts (m, log d), whose per-row
    rounding adds at most half an ulp of each row: within one ulp in all (rows of one sign).
    float64 rows are summed in float64 on both sides: each sum within n ulps of the exact one."""
    exact = rows[counted].sum()
    if reduction == "mean":
        exact = exact / counted.sum()
    ulp = torch.finfo(a.dtype).eps
    rtol = (ulp if name == "lse" else ulp / 2) if a.dtype != torch.float64 \
        else 2 * counted.sum().item() * ulp
    torch.testing.assert_close(a.double(), exact, rtol=rtol, atol=0, msg=name)


def general_path(monkeypatch):
    """Make the next calls take the general path (Python reductions, ce_fwd_stats's Python
    autograd)."""
    monkeypatch.setattr(nllfused.functional, "_one_call_cpu", lambda *a: None)


def objective(loss, st):
    """A scalar using every differentiable output there is (loss, entropy, target_logprob)."""
    out = loss.sum()
    if st.entropy is not None:
        out = out + 0.3 * st.entropy.sum()
    if st.target_logprob is not None:
        out = out - 0.7 * st.target_logprob.sum()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((37, 11), False), ((6, 9, 5), False),
                                                 ((3, 7, 4, 5), True), ((9, 400), False),
                                                 ((2, 300, 40), False), ((40, 300), True),
                                                 ((3, 300, 16), False)],
                         ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("names", NAME_SETS, ids=str)
@pytest.mark.parametrize("options", [{}, {"weight": True, "label_smoothing": 0.2},
                                     {"ignore_index": 2}], ids=str)
def test_stats_of_one_call_are_the_general_paths(dtype, shape, channels_last, reduction, names,
                                                 options, monkeypatch):
    ignore_index = options.get("ignore_index", -100)
    x, t = case(shape, dtype, channels_last, ignore_index)
    kw = dict(reduction=reduction, ignore_index=ignore_index,
              label_smoothing=options.get("label_smoothing", 0.0),
              weight=torch.rand(shape[1]) + 0.1 if options.get("weight") else None)
    plain = nllfused.cross_entropy(x, t, **kw)  # the plain one-call path: the same reduction
    results = []
    for one_call in (True, False):
        if not one_call:
            general_path(monkeypatch)
        xg = x.clone().requires_grad_()
        loss, st = nllfused.cross_entropy(xg, t, return_stats=names, **kw)
        assert (loss.grad_fn.name() == NODE) == one_call
        objective(loss, st).backward()
        results.append((loss.detach(), st, xg.grad))
    (l1, s1, g1), (l2, s2, g2) = results
    assert torch.equal(l1, plain)
    if reduction == "none":
        assert torch.equal(l1, l2)
    # summed on the CPU (in the kernel's pass up to lane_max_classes(x) classes, from the rows
    # it wrote beyond): against the per-row values (bit for bit the general path's, by the
    # 'none' case) summed exactly
    summed = reduction != "none"
    rows = per_row_stats(x, t, names, kw) if summed else None
    for name in stats.NAMES:
        a, b = getattr(s1, name), getattr(s2, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert a.requires_grad == b.requires_grad, name
            if summed and name in ROUNDED:
                assert_rounded_sum(a, rows[name], t != ignore_index, reduction, name)
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    # the loss's row gradients: one rounding from double here, float32 ops on the general path
    n, ulp = t.numel(), 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
    tol = (n + 2) * ulp / 2
    torch.testing.assert_close(g1.double(), g2.double(), rtol=tol,
                               atol=tol * g2.double().abs().max().item())


def with_bad_rows(x, t):
    """x with a NaN row, a row partly -inf and a row with a +inf logit, each counted (the rows
    in (N, d1, ...) order, as the kernels number them)."""
    C = x.shape[1]
    rows = x.movedim(1, -1).contiguous()
    flat = rows.view(-1, C)
    flat[3] = float("nan")
    flat[5, :7] = float("-inf")
    flat[6, 1] = float("inf")
    t = t.clone()
    t.view(-1)[[3, 5, 6]] = 1
    return rows.movedim(-1, 1).contiguous(), t


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape,lanes", [((3, 5, 37, 41), True), ((150, 400), False),
                                         ((2, 1100, 5, 7), False), ((7, 127), True),
                                         ((7, 128), False)], ids=str)
def test_sums_over_many_rows(capability, dtype, reduction, shape, lanes, monkeypatch):
    """Many rows, a few NaN and -inf rows among them, on each copy of the kernels this CPU runs:
    a segmentation map of many tiles of rows, in several blocks of tiles and a partial last one
    (csrc/cpu/ce_cpu_lanes.h, kSumTiles), which the lanes path adds up in its pass; and rows of
    more classes than it takes (unit and strided class stride; a batch of 7 rows from 128
    classes), which the op adds up from the rows the kernel wrote (csrc/loss_stats.cpp,
    add_up_rows). The reduced statistics are the
    exact sums of the per-row ones rounded once, the same bits on one thread as on two (the
    lanes' blocks added up in a fixed order)."""
    monkeypatch.setenv("NLLFUSED_CPU_CAPABILITY", capability)
    x, t = case(shape, dtype)
    assert (shape[1] <= lane_max_classes(x)) == lanes
    x, t = with_bad_rows(x, t)
    names = True
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(nllfused.cross_entropy(x, t, reduction=reduction,
                                                  return_stats=names))
    finally:
        torch.set_num_threads(threads)
    (l1, s1), (l2, s2) = results
    assert l1.isnan() and l2.isnan()  # NaN rows count
    assert s1.z_loss.isnan()  # 0 * lse^2 of the row whose lse is inf
    rows = per_row_stats(x, t, names, {})
    counted = t != -100
    for name in stats.NAMES:
        a, b = getattr(s1, name), getattr(s2, name)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
        if name in ROUNDED:
            exact = rows[name][counted].sum()
            assert torch.isnan(a) == torch.isnan(exact), name
    # the finite case: every statistic against the exact sum, and correct / z_loss exactly
    x[~torch.isfinite(x)] = 0.5
    _, st = nllfused.cross_entropy(x, t, reduction=reduction, return_stats=names)
    rows = per_row_stats(x, t, names, {})
    for name in ROUNDED:
        assert_rounded_sum(getattr(st, name), rows[name], counted, reduction, name)
    hits = (rows["correct"][counted]).sum()
    assert st.correct.item() == (hits.item() if reduction == "sum"
                                 else (hits / counted.sum()).float().item())
    assert st.z_loss.item() == 0 and not st.z_loss.signbit()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_order_gradients(reduction):
    """create_graph=True: the node differentiates the forward again (gradgradcheck, float64)."""
    x, t = case((5, 6, 3), torch.float64)
    x.requires_grad_()
    w = torch.rand(6, dtype=torch.float64) + 0.1

    def f(x):
        loss, st = nllfused.cross_entropy(x, t, weight=w, reduction=reduction,
                                          label_smoothing=0.1,
                                          return_stats=("entropy", "target_logprob"))
        assert loss.grad_fn.name() == NODE
        return objective(loss, st)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("want", [stats.mask(stats.NAMES), stats.mask({"entropy"}),
                                  stats.mask({"lse", "correct"}), stats.LSE_ROWS,
                                  stats.LSE_ROWS | stats.mask({"z_loss", "entropy"})])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_cross_entropy_loss_stats(reduction, want, weighted):
    x = torch.randn(5, 6, 3, requires_grad=True)
    t = torch.randint(0, 6, (5, 3))
    t[0, 0] = -100
    w = torch.rand(6) + 0.1 if weighted else None
    torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss_stats.default,
                          (x, t, w, reduction, -100, 0.1, want))


def test_statistics_not_asked_for_are_none_and_not_differentiable():
    x, t = case((8, 5))
    x.requires_grad_()
    loss, st = nllfused.cross_entropy(x, t, return_stats=("lse", "correct", "entropy"))
    assert loss.grad_fn.name() == NODE
    assert st.predicted is None and st.z_loss is None and st.target_logprob is None
    assert st.entropy.requires_grad and not st.lse.requires_grad
    assert not st.correct.requires_grad and st.correct.dtype == torch.float32
    # the entropy alone backpropagates
    (g,) = torch.autograd.grad(st.entropy, x)
    (ref,) = torch.autograd.grad(
        nllfused.cross_entropy(x, t, return_stats="entropy", backend="torch")[1].entropy, x)
    torch.testing.assert_close(g, ref)


def test_only_one_call_calls_take_it():
    x, t = case((8, 5))
    x.requires_grad_()
    assert nllfused.cross_entropy(x, t, return_stats=True)[0].grad_fn.name() == NODE
    for kw in (dict(z_loss=1e-4), dict(logit_scale=0.5), dict(backend="torch")):
        out = nllfused.cross_entropy(x, t, return_stats=True, **kw)
        assert out[0].grad_fn.name() != NODE, kw
    # return_lse / return_z_loss alone take it, with nllfused's extras too (Liger-Kernel's
    # lse_square_scale with return_z_loss); the other statistics with extras do not
    for kw in (dict(return_lse=True), dict(return_z_loss=True),
               dict(return_lse=True, return_z_loss=True)):
        assert nllfused.cross_entropy(x, t, **kw)[0].grad_fn.name() == NODE, kw
        for extra in (dict(z_loss=1e-4), dict(logit_scale=0.5), dict(softcap=3.0)):
            assert nllfused.cross_entropy(x, t, **kw, **extra)[0].grad_fn.name() == NODE, kw
    assert nllfused.cross_entropy(x, t, return_stats=("lse", "z_loss"),
                                  z_loss=1e-4)[0].grad_fn.name() == NODE
    assert nllfused.cross_entropy(x, t, return_stats="entropy",
                                  z_loss=1e-4)[0].grad_fn.name() != NODE
    soft = torch.softmax(torch.randn(8, 5), 1)
    assert nllfused.cross_entropy(x, soft, return_stats=True)[0].grad_fn.name() != NODE
    with pytest.raises(ValueError, match="unknown statistic"):
        nllfused.cross_entropy(x, t, return_stats="accuracy")


def test_bad_mask_is_refused():
    x, t = case((4, 3))
    with pytest.raises(ValueError, match="want"):
        torch.ops.nllfused.cross_entropy_loss_stats(x, t, None, 1, -100, 0.0, 128)
    assert torch.ops.nllfused.cross_entropy_loss_stats(x, t, None, 1, -100, 0.0, 1)[1].dim() == 0
    lse_rows = torch.ops.nllfused.cross_entropy_loss_stats(x, t, None, 1, -100, 0.0,
                                                           stats.LSE_ROWS)[1]
    assert lse_rows.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,channels_last", [((37, 11), False), ((3, 7, 4, 5), True),
                                                 ((9, 400), False), ((2, 300, 40), False)],
                         ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("returns", [dict(return_lse=True), dict(return_z_loss=True),
                                     dict(return_z_loss=True, return_lse=True)], ids=str)
def test_other_packages_names_on_one_call(dtype, shape, channels_last, reduction, returns,
                                          monkeypatch):
    """return_lse / return_z_loss without return_stats (quack's and Liger-Kernel's names) take
    the one call (stats.LSE_ROWS: the lse output per row whatever the reduction): the loss the
    plain call's, the lse rows and the z-loss term the general path's, bit for bit, and the same
    gradient; rows with an infinite logit (lse inf, z-loss term NaN) and ignored ones among
    them; the lanes path (adding up in its pass) and the rows path."""
    x, t = case(shape, dtype, channels_last)
    x[(1, 2) + (0,) * (x.dim() - 2)] = float("inf")
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(
        shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.1)
    xo = x.clone().requires_grad_()
    ours = nllfused.cross_entropy(xo, t, **kw, **returns)
    assert ours[0].grad_fn.name() == NODE
    def same(a, b):  # the same values, NaN where NaN
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

    assert same(ours[0].detach(), nllfused.cross_entropy(x, t, **kw))
    general_path(monkeypatch)
    xg = x.clone().requires_grad_()
    theirs = nllfused.cross_entropy(xg, t, **kw, **returns)
    assert len(ours) == len(theirs) == 1 + len(returns)
    for a, b in zip(ours[1:], theirs[1:]):
        assert a.dtype == b.dtype and a.shape == b.shape and not a.requires_grad
        assert same(a, b)
    g = torch.randn(ours[0].shape, dtype=torch.float64).to(ours[0].dtype)
    (ga,) = torch.autograd.grad(ours[0], xo, g)
    (gb,) = torch.autograd.grad(theirs[0], xg, g)
    torch.testing.assert_close(ga, gb, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["entropy", "lse", "target_logprob"])
@pytest.mark.parametrize("shape", [(8, 5), (2, 5, 3)], ids=["2d", "kdim"])
def test_statistics_changed_in_place_leave_the_gradient(dtype, name, shape):
    """A returned per-row statistic ('none') is the caller's tensor: changing it in place leaves
    the gradient as it was (it is no view of what the backward saved), as with torch's."""
    x0 = torch.randn(shape).to(dtype)
    t = torch.randint(0, 5, shape[:1] + shape[2:])

    def grad(tamper):
        x = x0.clone().requires_grad_()
        loss, st = nllfused.cross_entropy(x, t, reduction="none", return_stats=True)
        if tamper:
            with torch.no_grad():
                getattr(st, name).mul_(3.0).add_(1.0)
        (loss.sum() + st.entropy.sum()).backward()
        return x.grad
    assert torch.equal(grad(True), grad(False))
