"""The one-call path (csrc/loss.cpp): calls torch's own cross_entropy could make go to
nllfused::cross_entropy_loss, whose reduction and autograd are C++. It must give what the general
path gives (the same kernels), bit for bit, and what float64 torch gives; every other call must
keep taking the general path."""
import pytest
import torch
import torch.nn.functional as F

import nllfused
from helpers import DEVICES, check_cross_entropy, dtype_id

pytestmark = pytest.mark.skipif(not nllfused.build_info()["built"],
                                reason="the C++ extension is not built")

ONE_CALL_DEVICES = [d for d in DEVICES if nllfused.backends.resolve("auto", torch.device(d))
                    in ("cpu", "cuda")]


def took_one_call(loss) -> bool:
    """Whether `loss` came from nllfused::cross_entropy_loss: its autograd node is the C++
    node of csrc/loss.cpp (the general path's node is the Python one of nllfused/ops.py), or,
    where probability targets' class weights widen the loss's dtype, the cast of that node's
    loss (csrc/one_call.cpp)."""
    node = loss.grad_fn
    if node.name() == "ToCopyBackward0":
        node = node.next_functions[0][0]
    return node.name() == "nllfused::CrossEntropyLossBackward"


def one_call_and_general(x, t, monkeypatch, backend="auto", **kw):
    """The same call on the one-call path, then on the general path (the one-call entries
    patched out), each differentiated for one seeded random upstream gradient: [(loss, x's
    gradient)] for the two."""
    results = []
    for one_call in (True, False):
        if not one_call:
            monkeypatch.setattr(nllfused.functional, "_one_call_reduction", lambda *a: None)
            monkeypatch.setattr(nllfused.functional, "_one_call_cpu", lambda *a: None)
        xg = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xg, t, backend=backend, **kw)
        assert took_one_call(loss) == one_call
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1))
        loss.backward(g.to(loss.device))
        results.append((loss.detach(), xg.grad))
    return results


def index_case(shape, device, dtype, ignore_index=-100, ignore_frac=0.2, channels_last=False):
    x = torch.randn(shape, dtype=torch.float64).mul_(3).to(dtype)
    C = shape[1] if len(shape) > 1 else shape[0]
    t_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    t = torch.randint(0, C, t_shape)
    if t.dim():
        t[torch.rand(t_shape) < ignore_frac] = ignore_index
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, t


SHAPES = [(64, 10), (7, 1000), (13,), (4, 5, 3), (2, 7, 4, 5)]


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": "rand"}, {"label_smoothing": 0.1},
                                     {"weight": "rand", "label_smoothing": 0.3,
                                      "ignore_index": 2}], ids=str)
def test_one_call_matches_float64_torch(device, dtype, shape, reduction, options):
    x, t = index_case(shape, device, dtype, options.get("ignore_index", -100))
    assert took_one_call(nllfused.cross_entropy(x.to(device).requires_grad_(), t.to(device))) \
        == (device == "cpu" or len(shape) > 1)
    C = shape[1] if len(shape) > 1 else shape[0]
    if options.get("weight") == "rand":
        options = {**options, "weight": torch.rand(C, dtype=dtype if dtype == torch.float64
                                                   else torch.float32) + 0.1}
    check_cross_entropy(x, t, device, "auto", reduction=reduction, **options)


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_call_is_the_general_path(device, reduction, channels_last,
                                                  monkeypatch):
    x, t = index_case((6, 9, 5, 3), device, torch.float32, channels_last=channels_last)
    w = torch.rand(9) + 0.1
    x, t, w = x.to(device), t.to(device), w.to(device)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, ignore_index=-100)
    (l1, g1), (l2, g2) = one_call_and_general(x, t, monkeypatch, backend=device, **kw)
    if reduction == "none" or device != "cpu":
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
        return
    # On the CPU the one-call path reduces the rows' float32 losses in double and rounds once
    # (csrc/loss.cpp); the general path reduces them with float32 tensor ops. Each is judged
    # against the double reduction of the same per-row values (reduction='none', bitwise the
    # same on both paths): the one-call result within 1 ulp, the general path within float32
    # summation's error bound over n rows, (n + 1) / 2 ulp. (Within 2 ulp of each other, as this
    # test once asked, held for most random inputs only.)
    rows = nllfused.cross_entropy(x, t, backend=device, **dict(kw, reduction="none")).double()
    counted = t != -100
    den = w.double()[t[counted]].sum() if reduction == "mean" else 1.0
    exact = (rows.sum() / den).to(torch.float64)
    n, ulp = rows.numel(), 2.0 ** -23
    torch.testing.assert_close(l1.double(), exact, rtol=ulp, atol=0)
    torch.testing.assert_close(l2.double(), exact, rtol=(n + 1) * ulp / 2, atol=0)
    if reduction == "sum":
        assert torch.equal(g1, g2)
    else:  # each row's share 1/sum(w): rounded once from double, or from a float32 sum of the
        # n weights; elements near 0 inherit the difference absolutely
        tol = (n + 2) * ulp / 2
        torch.testing.assert_close(g1, g2, rtol=tol, atol=tol * g2.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float64],
                         ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_call_takes_weights_of_any_floating_dtype(dtype, weight_dtype, reduction,
                                                      monkeypatch):
    """Class weights in the input's own 16-bit dtype (what torch asks for), or any other floating
    one, take the one-call path on the CPU, converted to the accumulation dtype as the general
    path converts them: the loss rows and gradient bit for bit the general path's, the loss and
    gradient within float64 torch's bounds."""
    x, t = index_case((9, 6, 5), "cpu", dtype)
    w = (torch.rand(6, dtype=torch.float64) + 0.1).to(weight_dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, ignore_index=-100)
    check_cross_entropy(x, t, "cpu", "auto", **kw)
    (l1, g1), (l2, g2) = one_call_and_general(x, t, monkeypatch, **kw)
    if reduction != "mean":  # 'mean': the general path's float32 sum of the weights (above)
        assert torch.equal(g1, g2)
    if reduction == "none":
        assert torch.equal(l1, l2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_call_reduces_many_rows_in_double(reduction):
    """More rows than one of csrc/loss.h's sum blocks (2^16), on one thread and on two: the
    reduced loss within 1 ulp of the double reduction of the per-row losses, the gradient as
    float64 torch's, and both bitwise the same on either thread count (fixed blocks)."""
    x, t = index_case((2, 3, 300, 300), "cpu", torch.float32)
    w = torch.rand(3) + 0.1
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    rows = nllfused.cross_entropy(x, t, **dict(kw, reduction="none")).double()
    den = w.double()[t[t != -100]].sum() if reduction == "mean" else 1.0
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xg = x.clone().requires_grad_()
            loss = nllfused.cross_entropy(xg, t, **kw)
            assert took_one_call(loss)
            loss.backward()
            results.append((loss.detach(), xg.grad))
    finally:
        torch.set_num_threads(threads)
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1.double(), rows.sum() / den, rtol=2.0 ** -23, atol=0)
    xr = x.double().requires_grad_()
    F.cross_entropy(xr, t, **dict(kw, weight=w.double())).backward()
    torch.testing.assert_close(g1.double(), xr.grad, rtol=1.3e-6,
                               atol=1e-5 * xr.grad.abs().max().item())
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
def test_only_torch_compatible_calls_take_the_one_call_path(device):
    x = torch.randn(8, 5, device=device, requires_grad=True)
    t = torch.randint(0, 5, (8,), device=device)
    assert took_one_call(nllfused.cross_entropy(x, t))
    assert took_one_call(nllfused.CrossEntropyLoss(label_smoothing=0.1)(x, t))
    # naming the backend this path runs anyway (the benchmark's providers do)
    assert took_one_call(nllfused.cross_entropy(x, t, backend=device))
    assert not took_one_call(nllfused.cross_entropy(x, t, backend="torch"))
    # weights in another floating dtype: converted first, in C++ on the CPU
    w64 = torch.rand(5, dtype=torch.float64, device=device)
    assert took_one_call(nllfused.cross_entropy(x, t, weight=w64)) == (device == "cpu")
    # nllfused's extras: one call on the CPU (tests/test_one_call_extras.py), not on CUDA
    for kw in [dict(z_loss=1e-4), dict(logit_scale=0.5), dict(softcap=3.0)]:
        assert took_one_call(nllfused.cross_entropy(x, t, **kw)) == (device == "cpu"), kw
    # torch's deprecated size_average / reduce: resolved into the reduction first
    with pytest.warns(UserWarning, match="size_average"):
        assert took_one_call(nllfused.cross_entropy(x, t, size_average=False))
    # int32 targets (torch refuses them): on the CPU as an int64 copy
    assert took_one_call(nllfused.cross_entropy(x, t.int())) == (device == "cpu")
    # uint8 targets (torch takes them): on the CPU the kernels read them as they are
    assert took_one_call(nllfused.cross_entropy(x, t.to(torch.uint8))) == (device == "cpu")
    q = torch.softmax(x.detach(), 1)
    # probability targets: on the CPU, the loss alone, for targets that need no gradient
    assert took_one_call(nllfused.cross_entropy(x, q)) == (device == "cpu")
    assert not took_one_call(nllfused.cross_entropy(x, q.clone().requires_grad_()))
    assert not took_one_call(nllfused.cross_entropy(x, q, return_stats=True)[0])
    # an unbatched (C,) input: on the CPU the loss alone (statistics: the general path)
    assert took_one_call(nllfused.cross_entropy(x[0], t[0])) == (device == "cpu")
    assert took_one_call(nllfused.cross_entropy(x[0], q[0])) == (device == "cpu")
    assert not took_one_call(nllfused.cross_entropy(x[0], t[0], return_stats=True)[0])
    with torch.autocast(device, dtype=torch.bfloat16):
        # float32 logits, which autocast leaves as they are, and 16-bit ones (the loss in
        # float32; statistics: the general path)
        assert took_one_call(nllfused.cross_entropy(x, t))
        assert took_one_call(nllfused.cross_entropy(x.bfloat16(), t))
        assert not took_one_call(nllfused.cross_entropy(x.bfloat16(), t, return_stats=True)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64], ids=dtype_id)
@pytest.mark.parametrize("classes", [7, 300], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("extras", [{}, {"z_loss": 1e-3, "softcap": 8.0}], ids=str)
def test_one_call_class_major_logits(dtype, classes, reduction, target_kind, extras):
    """(N, C) logits stored class-major (x.t() contiguous) are read as the (1, C, N) of a
    K-dimensional input (csrc/loss.h, class_major): loss and gradient as float64 torch's, the
    per-row results in the rows' order, and the gradient the op hands autograd in the input's
    own strides (no copy), for the loss alone (with z_loss and softcap too) and with
    statistics."""
    N = 37
    x = torch.randn(classes, N, dtype=torch.float64).mul_(3).to(dtype).t()
    assert x.stride() == (1, N)
    if target_kind == "index":
        t = torch.randint(0, classes, (N,))
        t[torch.rand(N) < 0.2] = -100
    else:
        t = torch.softmax(torch.randn(N, classes, dtype=torch.float64), 1).to(dtype)
    w = torch.rand(classes, dtype=torch.float64) + 0.1
    kw = dict(reduction=reduction, label_smoothing=0.1, weight=w.to(dtype), **extras)
    check_cross_entropy(x, t, "cpu", "auto", **kw)
    xg = x.clone(memory_format=torch.preserve_format).requires_grad_()
    assert xg.stride() == (1, N)
    loss = nllfused.cross_entropy(xg, t, **kw)
    assert took_one_call(loss)
    (g,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
    assert g.stride() == xg.stride()
    # the same call on a row-major copy: the same rows, in the same order (another kernel path,
    # whose sums round otherwise: a few ulp of the values' scale)
    eps = torch.finfo(dtype).eps

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=4 * eps, atol=16 * eps * b.abs().max().item())

    xc = x.contiguous().requires_grad_()
    loss_c = nllfused.cross_entropy(xc, t, **kw)
    (gc,) = torch.autograd.grad(loss_c, xc, torch.ones_like(loss_c))
    close(loss, loss_c)
    close(g, gc)
    if target_kind == "index" and not extras:  # with statistics: the rows in order, the
        # gradient's strides
        names = ("lse", "entropy", "predicted")
        loss_s, st = nllfused.cross_entropy(xg, t, return_stats=names, **kw)
        loss_sc, st_c = nllfused.cross_entropy(xc, t, return_stats=names, **kw)
        assert loss_s.grad_fn.name() == "nllfused::CrossEntropyLossStatsBackward"
        close(st.lse, st_c.lse)
        close(st.entropy, st_c.entropy)
        assert torch.equal(st.predicted, st_c.predicted)
        (g_s,) = torch.autograd.grad(loss_s.sum() + st.entropy.sum(), xg)
        assert g_s.stride() == xg.stride()
        (g_sc,) = torch.autograd.grad(loss_sc.sum() + st_c.entropy.sum(), xc)
        close(g_s, g_sc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "time_major", "channels_last"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_one_call_gradient_in_the_logits_strides(dtype, layout, reduction, target_kind):
    """Logits whose rows have unit class stride but are not adjacent -- (B, V, T) from
    logits.transpose(1, 2), channels-last -- with more classes than the lanes path takes: the
    one-call backward writes the gradient in the logits' own strides, row by row (csrc/cpu/
    ce_cpu.cpp, like_logits). The same rows as the flattened (rows, V) call, bit for bit, and
    float64 torch's loss and gradient (C above the lanes' limits of both: a (rows, V) input's
    tiles take 384 classes, kernels.h)."""
    C = 400
    if layout == "transposed":  # (B, T, V) logits as (B, V, T): rows in (b, t) order
        x = torch.randn(2, 9, C, dtype=torch.float64).mul_(3).to(dtype).transpose(1, 2)
    elif layout == "time_major":  # (T, B, V) logits as (B, V, T): rows in (t, b) order
        x = torch.randn(9, 2, C, dtype=torch.float64).mul_(3).to(dtype).permute(1, 2, 0)
    else:
        x = torch.randn(2, C, 3, 4, dtype=torch.float64).mul_(3).to(dtype).to(
            memory_format=torch.channels_last)
    assert x.stride(1) == 1
    flat = x.movedim(1, -1).reshape(-1, C)  # the same rows, in the same order
    if target_kind == "index":
        t = torch.randint(0, C, flat.shape[:1])
        t[torch.rand(t.shape) < 0.2] = -100
        t_x = t.view((x.shape[0],) + x.shape[2:])
    else:
        t = torch.softmax(torch.randn(flat.shape, dtype=torch.float64), 1).to(dtype)
        t_x = t.view((x.shape[0],) + x.shape[2:] + (C,)).movedim(-1, 1)
    kw = dict(reduction=reduction, label_smoothing=0.1,
              weight=(torch.rand(C, dtype=torch.float64) + 0.1).to(dtype))
    check_cross_entropy(x, t_x, "cpu", "auto", **kw)
    xg, fg = x.clone().requires_grad_(), flat.clone().requires_grad_()
    loss, loss_f = nllfused.cross_entropy(xg, t_x, **kw), nllfused.cross_entropy(fg, t, **kw)
    assert took_one_call(loss)
    (g,) = torch.autograd.grad(loss, xg, torch.ones_like(loss))
    (g_f,) = torch.autograd.grad(loss_f, fg, torch.ones_like(loss_f))
    assert g.stride() == xg.stride()
    assert torch.equal(loss.reshape(loss_f.shape), loss_f)
    assert torch.equal(g.movedim(1, -1).reshape(-1, C), g_f)
    if target_kind == "index":  # with statistics, the counted rows' backward
        loss_s, st = nllfused.cross_entropy(xg, t_x, return_stats=("entropy",), **kw)
        assert loss_s.grad_fn.name() == "nllfused::CrossEntropyLossStatsBackward"
        (g_s,) = torch.autograd.grad(loss_s.sum() + st.entropy.sum(), xg)
        loss_sf, st_f = nllfused.cross_entropy(fg, t, return_stats=("entropy",), **kw)
        (g_sf,) = torch.autograd.grad(loss_sf.sum() + st_f.entropy.sum(), fg)
        assert g_s.stride() == xg.stride()
        assert torch.equal(g_s.movedim(1, -1).reshape(-1, C), g_sf)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(40, 7), (3, 5, 6, 4)], ids=str)
def test_uint8_targets_and_legacy_reductions_as_torch(reduction, shape):
    """uint8 targets (a segmentation mask, 255 its void label) and size_average / reduce: the
    one-call path gives torch's float64 loss and gradient (torch's on int64 targets: it takes
    uint8 ones in its plain 2-D loss only), its second order included, and the statistics of
    the same call with int64 targets."""
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, C, shape[:1] + shape[2:], dtype=torch.uint8)
    t[torch.rand(t.shape) < 0.2] = 255
    w = torch.rand(C, dtype=torch.float64) + 0.1
    kw = dict(weight=w, ignore_index=255, label_smoothing=0.1, reduction=reduction)
    ours = nllfused.cross_entropy(x, t, **kw)
    assert took_one_call(ours)
    want = F.cross_entropy(x, t.long(), **kw)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                               torch.autograd.grad(want, x, g)[0], rtol=1e-12, atol=1e-12)
    torch.autograd.gradgradcheck(lambda x: nllfused.cross_entropy(x, t, **kw), (x,))
    _, st = nllfused.cross_entropy(x, t, return_stats=True, **kw)
    _, st64 = nllfused.cross_entropy(x, t.long(), return_stats=True, **kw)
    for a, b in zip(st, st64):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    legacy = {"none": dict(reduce=False), "sum": dict(size_average=False),
              "mean": dict(size_average=True, reduce=True)}[reduction]
    with pytest.warns(UserWarning, match="size_average"):
        ours = nllfused.cross_entropy(x, t.long(), w, **legacy, ignore_index=255)
    assert took_one_call(ours)
    torch.testing.assert_close(ours, F.cross_entropy(x, t.long(), w, ignore_index=255,
                                                     reduction=reduction),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 3, 2 ** 40], ids=str)
def test_int32_targets_are_the_int64_ones(reduction, ignore_index):
    """int32 class indices on the one-call path: the int64 targets' loss, gradient and
    statistics bit for bit (an ignore_index past int32 ignores no target), and their
    out-of-range error."""
    x = torch.randn(40, 7, requires_grad=True)
    t = torch.randint(0, 7, (40,))
    t[::5] = ignore_index if ignore_index < 2 ** 31 else 0
    kw = dict(weight=torch.rand(7) + 0.1, ignore_index=ignore_index, label_smoothing=0.1,
              reduction=reduction)
    ours, want = nllfused.cross_entropy(x, t.int(), **kw), nllfused.cross_entropy(x, t, **kw)
    assert took_one_call(ours) and took_one_call(want)
    assert torch.equal(ours, want)
    g = torch.randn_like(want)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(want, x, g)[0])
    for a, b in zip(nllfused.cross_entropy(x, t.int(), return_stats=True, **kw)[1],
                    nllfused.cross_entropy(x, t, return_stats=True, **kw)[1]):
        assert torch.equal(a, b)
    t[1] = 7
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        nllfused.cross_entropy(x, t.int(), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_one_call_under_autocast_with_float32_logits(dtype):
    """Autocast leaves float32 / float64 logits as they are (torch runs cross_entropy in
    float32): the one-call path serves them, its loss and gradient those without autocast,
    also with 16-bit class weights and probability targets (which autocast casts)."""
    x = torch.randn(24, 9, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 9, (24,))
    q = torch.softmax(torch.randn(24, 9), 1).bfloat16()
    w = (torch.rand(9) + 0.5).bfloat16()
    for target, weight in ((t, w), (q, None)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = nllfused.cross_entropy(x, target, weight, label_smoothing=0.1)
        assert took_one_call(ours)
        want = nllfused.cross_entropy(x, target.float() if target.is_floating_point() else
                                      target, None if weight is None else weight.float(),
                                      label_smoothing=0.1)
        assert ours.dtype == want.dtype == dtype
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0],
                                   torch.autograd.grad(want, x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_call_under_autocast_with_16_bit_logits(dtype, reduction, monkeypatch):
    """Autocast runs cross_entropy in float32: 16-bit logits' loss on the one-call path is
    float32, never rounded to their dtype -- per row the general path's float32 rows bit for
    bit, reduced within 1 ulp of their double reduction (as test_one_call_is_the_general_path
    judges it) -- and their gradient the general path's ('none', 'sum': bit for bit)."""
    x, t = index_case((40, 9), "cpu", dtype)
    kw = dict(weight=torch.rand(9) + 0.1, reduction=reduction, label_smoothing=0.2)
    with torch.autocast("cpu", dtype=dtype):
        (l1, g1), (l2, g2) = one_call_and_general(x, t, monkeypatch, **kw)
    assert l1.dtype == l2.dtype == torch.float32 and g1.dtype == dtype
    if reduction == "none":
        assert torch.equal(l1, l2)
    else:
        with torch.autocast("cpu", dtype=dtype):
            rows = nllfused.cross_entropy(x, t, **dict(kw, reduction="none")).double()
        den = kw["weight"].double()[t[t != -100]].sum() if reduction == "mean" else 1.0
        torch.testing.assert_close(l1.double(), rows.sum() / den, rtol=2.0 ** -23, atol=0)
    if reduction != "mean":
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float32, torch.float64],
                         ids=dtype_id)
def test_one_call_under_autocast_with_probability_targets(target_dtype, monkeypatch):
    """16-bit logits' probability targets under autocast: the loss in float32 promoted with the
    targets' dtype as autocast casts them (16-bit ones to float32, float64 ones kept), the
    general path's dtype and value."""
    x = torch.randn(12, 7).bfloat16()
    q = torch.softmax(torch.randn(12, 7), 1).to(target_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (l1, g1), (l2, g2) = one_call_and_general(x, q, monkeypatch, reduction="sum")
    assert l1.dtype == l2.dtype == torch.promote_types(torch.float32, target_dtype)
    # both from float32 log-softmaxes (of autocast's float32 logits), a few float32 roundings
    # apart whatever the targets' dtype (float64 targets: float64's default rtol was flaky)
    torch.testing.assert_close(l1, l2, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert torch.equal(g1, g2)


def test_opcheck_cross_entropy_loss_in_float32_of_16_bit_logits():
    x = torch.randn(5, 6, 3).bfloat16().requires_grad_()
    t = torch.randint(0, 6, (5, 3))
    for reduction in (0, 1):
        torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss.default,
                              (x, t, None, reduction, -100, 0.1), dict(dtype=torch.float32))


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
def test_one_call_rejects_what_torch_rejects(device):
    x = torch.randn(4, 5, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="reduction"):
        nllfused.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=device),
                               reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        nllfused.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=device),
                               label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="size"):
        nllfused.cross_entropy(x, torch.zeros(3, dtype=torch.long, device=device))
    if device == "cpu":
        with pytest.raises(IndexError):
            nllfused.cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    # and keeps working afterwards
    t = torch.tensor([0, 1, 4, 2], device=device)
    torch.testing.assert_close(nllfused.cross_entropy(x, t), F.cross_entropy(x, t))


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_call_double_backward(device, reduction):
    x = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([0, 3, -100, 1, 2], device=device)
    w = torch.rand(4, dtype=torch.float64, device=device) + 0.1

    def f(x):
        return nllfused.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1)

    assert took_one_call(f(x))
    torch.autograd.gradcheck(f, (x,))
    torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
def test_one_call_without_grad_and_in_inference_mode(device):
    x = torch.randn(6, 7, device=device)
    t = torch.randint(0, 7, (6,), device=device)
    expected = F.cross_entropy(x, t)
    with torch.no_grad():
        torch.testing.assert_close(nllfused.cross_entropy(x.requires_grad_(), t), expected)
    with torch.inference_mode():
        torch.testing.assert_close(nllfused.cross_entropy(x.detach(), t), expected)


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_cross_entropy_loss(device, reduction, weighted):
    x = torch.randn(5, 6, 3, device=device, requires_grad=True)
    t = torch.randint(0, 6, (5, 3), device=device)
    t[0, 0] = -100
    w = torch.rand(6, device=device) + 0.1 if weighted else None
    torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss.default,
                          (x, t, w, reduction, -100, 0.1))


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
def test_one_call_graph_node(device):
    """The C++ node (csrc/loss.cpp) behaves as torch's own: saved-tensor hooks see what it saves,
    a second backward without retain_graph is refused, retain_graph allows it, and compiled
    autograd (a compiled backward of an eager forward) gives the eager gradient."""
    x = torch.randn(6, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 4, -100, 1, 2, 3], device=device)
    expected = torch.autograd.grad(F.cross_entropy(x, t), x)[0]

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: packed.append(v) or v, lambda v: v):
        loss = nllfused.cross_entropy(x, t)
    assert took_one_call(loss)
    assert any(p is x for p in packed)
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(g, expected)
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, expected)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, x)

    from torch._dynamo import compiled_autograd
    torch._dynamo.reset()
    loss = nllfused.cross_entropy(x, t, reduction="sum", label_smoothing=0.1)
    assert took_one_call(loss)
    ref = torch.autograd.grad(F.cross_entropy(x, t, reduction="sum", label_smoothing=0.1), x)[0]
    x.grad = None
    with compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        loss.backward()
    torch.testing.assert_close(x.grad, ref)


@pytest.mark.parametrize("device", ONE_CALL_DEVICES)
def test_one_call_leaves_other_calls_alone(device):
    """Calls the C++ decision must hand to the general path: a tensor subclass (Parameter), a
    torch-function mode, a torch.func transform, forward-mode AD, an ignore_index too large for
    int64. Each still gives torch's result (or torch's error)."""
    x = torch.randn(4, 3, device=device)
    t = torch.tensor([0, 2, 1, 2], device=device)
    expected = F.cross_entropy(x, t)

    class Sub(torch.Tensor):
        pass

    loss = nllfused.cross_entropy(x.clone().as_subclass(Sub).requires_grad_(), t)
    assert not took_one_call(loss)
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), expected)
    # a Parameter is a plain tensor to torch's own bindings too (no __torch_function__)
    assert took_one_call(nllfused.cross_entropy(torch.nn.Parameter(x.clone()), t))

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    xg = x.clone().requires_grad_()
    with Mode():
        loss = nllfused.cross_entropy(xg, t)
    assert not took_one_call(loss)
    torch.testing.assert_close(loss, expected)

    g = torch.func.grad(lambda v: nllfused.cross_entropy(v, t))(x)
    torch.testing.assert_close(g, torch.func.grad(lambda v: F.cross_entropy(v, t))(x))

    import torch.autograd.forward_ad as fwAD
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        out = nllfused.cross_entropy(fwAD.make_dual(x, tangent), t)
        ref = F.cross_entropy(fwAD.make_dual(x, tangent), t)
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(ref).tangent)

    with pytest.raises(Exception) as torch_error:
        F.cross_entropy(x, t, ignore_index=2 ** 70)
    with pytest.raises(type(torch_error.value)):
        nllfused.cross_entropy(x, t, ignore_index=2 ** 70)
    torch.testing.assert_close(nllfused.cross_entropy(x.requires_grad_(), t), expected)


def soft_case(shape, dtype, target_dtype=None, channels_last=False):
    x = torch.randn(shape, dtype=torch.float64).mul_(3).to(dtype)
    q = torch.softmax(torch.randn(shape, dtype=torch.float64), 1 if len(shape) > 1 else 0)
    q[torch.rand(shape) < 0.2] = 0  # classes without target mass
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        q = q.to(memory_format=torch.channels_last)
    return x, q.to(target_dtype or dtype)


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.float64, None),
                                                (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float64)], ids=str)
@pytest.mark.parametrize("shape", [(64, 10), (7, 1000), (13,), (4, 5, 3), (2, 7, 4, 5),
                                   (3, 40, 33)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weight": "rand"}, {"label_smoothing": 0.1},
                                     {"weight": "rand", "label_smoothing": 0.3}], ids=str)
def test_one_call_probability_targets(dtype, target_dtype, shape, reduction, options):
    """CPU probability targets take the one-call op: float64 torch's loss (in the promoted dtype)
    and gradient, 'mean' over the rows whatever the weights."""
    x, q = soft_case(shape, dtype, target_dtype)
    if options.get("weight") == "rand":
        C = shape[1] if len(shape) > 1 else shape[0]
        options = {**options, "weight": torch.rand(C, dtype=dtype if dtype == torch.float64
                                                   else torch.float32) + 0.1}
    # (a weight wider than the loss's dtype makes it the weight's: the general path, which
    # rounds once to it)
    widened = "weight" in options and torch.promote_types(x.dtype, q.dtype) in (
        torch.bfloat16, torch.float16)
    assert took_one_call(nllfused.cross_entropy(x.clone().requires_grad_(), q,
                                                reduction=reduction, **options)) != widened
    check_cross_entropy(x, q, "cpu", "auto", reduction=reduction, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_call_probability_targets_are_the_general_path(reduction, channels_last,
                                                           monkeypatch):
    """The same kernels either way: the per-row losses and the gradient bit for bit; the
    reduced loss within the general path's float32 summation error of the one-call path's
    (a double sum rounded once)."""
    x, q = soft_case((6, 9, 5, 3), torch.float32, channels_last=channels_last)
    w = torch.rand(9) + 0.1
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2)
    (l1, g1), (l2, g2) = one_call_and_general(x, q, monkeypatch, **kw)
    if reduction == "none":
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
        return
    rows = nllfused.cross_entropy(x, q, **dict(kw, reduction="none")).double()
    exact = rows.sum() / (rows.numel() if reduction == "mean" else 1)
    n, ulp = rows.numel(), 2.0 ** -23
    torch.testing.assert_close(l1.double(), exact, rtol=ulp, atol=0)
    torch.testing.assert_close(l2.double(), exact, rtol=(n + 1) * ulp / 2, atol=0)
    if reduction == "sum":
        assert torch.equal(g1, g2)
    else:  # 1 / rows in double rounded once, or the general path's float32 division
        torch.testing.assert_close(g1, g2, rtol=2 * ulp, atol=2 * ulp * g2.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_call_probability_targets_double_backward(reduction):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    w = torch.rand(4, dtype=torch.float64) + 0.1

    def f(x):
        return nllfused.cross_entropy(x, q, weight=w, reduction=reduction, label_smoothing=0.1)

    assert took_one_call(f(x))
    torch.autograd.gradcheck(f, (x,))
    torch.autograd.gradgradcheck(f, (x,))


def test_one_call_probability_targets_errors():
    """What torch refuses with probability targets, refused alike (the general path's
    messages), and the library keeps working."""
    x = torch.randn(4, 5, requires_grad=True)
    q = torch.softmax(torch.randn(4, 5), 1)
    for call in (lambda f: f(x, q, ignore_index=1), lambda f: f(x, q[:, :4])):
        with pytest.raises(Exception) as torch_error:
            call(F.cross_entropy)
        with pytest.raises(type(torch_error.value)):
            call(nllfused.cross_entropy)
    op = torch.ops.nllfused.cross_entropy_loss.default
    with pytest.raises(ValueError, match="ignore_index"):
        op(x, q, None, 1, 1, 0.0)
    with pytest.raises(NotImplementedError, match="require grad"):
        op(x, q.clone().requires_grad_(), None, 1, -100, 0.0)
    torch.testing.assert_close(nllfused.cross_entropy(x, q), F.cross_entropy(x, q))


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_opcheck_cross_entropy_loss_probability_targets(reduction, weighted, target_dtype):
    x = torch.randn(5, 6, 3, requires_grad=True)
    q = torch.softmax(torch.randn(5, 6, 3), 1).to(target_dtype)
    w = torch.rand(6) + 0.1 if weighted else None
    torch.library.opcheck(torch.ops.nllfused.cross_entropy_loss.default,
                          (x, q, w, reduction, -100, 0.1))
