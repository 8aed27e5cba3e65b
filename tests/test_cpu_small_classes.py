"""The CPU kernels' lane path (csrc/cpu/ce_cpu_lanes.h): rows of few classes with index targets,
W2 rows at once, one row per vector lane. Run on every copy of the kernels this machine can run
(NLLFUSED_CPU_CAPABILITY), in every layout the path takes (K-dim with unit d stride: one vector
load per class; 2-D, channels-last, sliced and transposed inputs: tiles gathered into a buffer),
with class counts around the vector width and the path's limits, row counts that leave a partial
tile, every dtype and option, NaN and infinite rows; judged against float64 torch
(tests/reference.py) like every backend."""
import os
import platform

import pytest
import torch

import nllfused
from helpers import check_cross_entropy, dtype_id

pytestmark = pytest.mark.skipif(not nllfused.build_info()["built"],
                                reason="the C++ extension is not built")

CAPABILITIES = nllfused._C.build_info()["cpu_capabilities"] if nllfused.build_info()["built"] \
    else []
# kernels.h / ce_cpu_lanes.h: the most classes of a tile (kLaneMaxClasses), of a tile of a plain
# (N, C) input's rows (kLaneMaxClassesRows: layouts 2d, 2d_row_sliced), of a tile whose classes
# are one vector load each (kLaneMaxClassesVin: layouts kdim, kdim_sliced, 2d_transposed), and of
# a gathered (N, C) tile's backward (lane_limit: 64 classes with 16 lanes a tile -- avx2 float32,
# avx512 float64 --, 96 with 32, 32 in a copy without 16 x 16 blocks).
LANE_MAX_C = 256
LANE_MAX_ROWS = 384
LANE_MAX_VIN = 1024
GATHER_MAX_C = (32, 64, 96)
# Lanes per tile (W2) are 2 (default), 8 or 16 (avx2), 16 or 32 (avx512, avx512bf16): class
# counts and row counts on both sides of each.
CLASS_COUNTS = sorted({1, 2, 3, 7, 9, 10, 15, 17, 31, 33, *GATHER_MAX_C,
                       *(c + 1 for c in GATHER_MAX_C), LANE_MAX_C - 1, LANE_MAX_C,
                       LANE_MAX_C + 1, LANE_MAX_ROWS, LANE_MAX_ROWS + 1, LANE_MAX_VIN,
                       LANE_MAX_VIN + 1})
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(params=CAPABILITIES)
def capability(request, monkeypatch):
    monkeypatch.setenv("NLLFUSED_CPU_CAPABILITY", request.param)
    assert nllfused._C.build_info()["cpu_capability"] == request.param
    return request.param


def randn(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)


# layout -> builder(C, dtype) -> logits. Row counts N*D leave partial tiles for every lane count.
LAYOUTS = {
    # (N, C): gathered tiles of consecutive rows, the gradient scattered back.
    "2d": lambda C, d: randn((45, C), d),
    # (N, C) column-major: consecutive rows adjacent in memory, one vector load per class.
    "2d_transposed": lambda C, d: randn((C, 37), d).t(),
    # (N, C + 3)[:, :C]: unit class stride, rows C + 3 apart (blocks gathered; the gradient
    # written contiguous).
    "2d_row_sliced": lambda C, d: randn((45, C + 3), d)[:, :C],
    # (N, 2C)[:, ::2]: class stride 2.
    "2d_sliced": lambda C, d: randn((21, 2 * C), d)[:, ::2],
    # (N, C, d1, d2), D = 35: tiles of consecutive d of one n, one vector load per class.
    "kdim": lambda C, d: randn((3, C, 5, 7), d),
    # D = 16: with 16 lanes a vector (AVX-512), two n a tile, each half's class one vector load
    # and store; the tiles path (past the lanes' classes) transposes 16 x 16 blocks.
    "kdim_16": lambda C, d: randn((3, C, 16), d),
    # D = 24: halves of one n (vector loads) and halves across two n (scalar copies) mixed.
    "kdim_24": lambda C, d: randn((3, C, 4, 6), d),
    # D = 3, fewer than a tile: tiles of consecutive rows across n.
    "kdim_short": lambda C, d: randn((7, C, 3), d),
    # unit d stride but a row stride that is not C * D.
    "kdim_sliced": lambda C, d: randn((2, C, 41), d)[:, :, 1:],
    # channels-last: tiles of consecutive d, gathered (d stride C).
    "channels_last": lambda C, d: randn((2, C, 5, 7), d).contiguous(
        memory_format=torch.channels_last),
    # d stride 2
    "kdim_strided": lambda C, d: randn((2, C, 38), d)[:, :, ::2],
}


def targets(x, ignore_index=-100, ignore_frac=0.2):
    C = x.shape[1]
    t = torch.randint(0, C, x.shape[:1] + x.shape[2:])
    t[torch.rand(t.shape) < ignore_frac] = ignore_index
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", CLASS_COUNTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_counts_and_layouts(capability, layout, C, dtype):
    x = LAYOUTS[layout](C, dtype)
    check_cross_entropy(x, targets(x), "cpu", "cpu", reduction="none")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("C", [3, 10, 33])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_16_bit_logits(capability, layout, C, dtype):
    x = LAYOUTS[layout](C, dtype)
    check_cross_entropy(x, targets(x), "cpu", "cpu", reduction="none")


OPTIONS = {
    "ignore_neg1": {"ignore_index": -1},
    "ignore_valid_class_weight": {"ignore_index": 2, "weight": "rand"},
    "smoothing": {"label_smoothing": 0.2},
    "smoothing_weight": {"label_smoothing": 0.1, "weight": "rand"},
    "smoothing_1": {"label_smoothing": 1.0},
    "logit_scale": {"logit_scale": 0.37},
    "softcap": {"softcap": 3.0, "logit_scale": 2.0},
    "z_loss": {"z_loss": 1e-2},
    "everything": {"softcap": 4.0, "label_smoothing": 0.1, "weight": "rand", "z_loss": 1e-3,
                   "ignore_index": 1},
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim", "channels_last"])
def test_options(capability, layout, option, dtype, reduction):
    check_option(LAYOUTS[layout](13, dtype), option, reduction)


def check_option(x, option, reduction):
    """x's loss and gradient under OPTIONS[option] (a random class weight for "rand") against
    float64 torch."""
    kwargs = dict(OPTIONS[option])
    t = targets(x, kwargs.get("ignore_index", -100))
    if kwargs.get("weight") == "rand":
        kwargs["weight"] = (torch.rand(x.shape[1], dtype=torch.float64) + 0.1).to(
            torch.float64 if x.dtype == torch.float64 else torch.float32)
    check_cross_entropy(x, t, "cpu", "cpu", reduction=reduction, **kwargs)


# kernels.h, kLaneFewRows: a plain (N, C) input of at most 8 rows takes the lanes path below
# 16 (N + 1) classes only (a tile of N live lanes), the rows path from there; the one-call
# reduced loss (reduction mean or sum, no statistics) below 8 (N + 1) classes only.
LANE_FEW_ROWS = 8


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", ["smoothing_weight", "everything", "probabilities"])
@pytest.mark.parametrize("N", [1, 2, LANE_FEW_ROWS, LANE_FEW_ROWS + 1])
def test_few_rows_on_both_sides_of_their_class_limit(capability, N, option, reduction):
    """A batch of a few rows, one class below and at 8 (N + 1) and 16 (N + 1): the lanes path
    (a tile of N live rows, its other lanes empty) and the rows path, and past kLaneFewRows
    rows the lanes alone; float32 and bf16, forward and backward against float64 torch."""
    for C in (8 * (N + 1) - 1, 8 * (N + 1), 16 * (N + 1) - 1, 16 * (N + 1)):
        for dtype in (torch.float32, torch.bfloat16):
            x = randn((N, C), dtype)
            if option != "probabilities":
                check_option(x, option, reduction)
                continue
            q = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).to(dtype)
            check_cross_entropy(x, q, "cpu", "cpu", reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8], ids=dtype_id)
@pytest.mark.parametrize("layout", ["2d", "kdim"])
def test_target_dtypes(capability, layout, target_dtype):
    x = LAYOUTS[layout](10, torch.float32)
    check_cross_entropy(x, targets(x, ignore_frac=0).to(target_dtype), "cpu", "cpu",
                        reduction="none")


def rows_of(x):
    """The (N, C, D) view of x that the kernels see (csrc/ops.cpp) and its D: row r = (n, d) is
    view[r // D, :, r % D]."""
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x.flatten(2)
    assert x3.data_ptr() == x.data_ptr()
    return x3, x3.shape[2]


def hard_rows(x, t):
    """Rows 0-5 made hard: a NaN logit, a +inf logit, all -inf, masked classes, a confident row
    (p_y -> 1), a huge offset. Their targets are counted."""
    x = x.clone()
    x3, D = rows_of(x)
    t2 = t.view(t.shape[0], -1)

    def row(r):
        return x3[r // D, :, r % D]

    for r in range(6):
        t2[r // D, r % D] = r % x.shape[1]
    row(0)[-1] = float("nan")
    row(1)[0] = float("inf")
    row(2)[:] = float("-inf")
    row(3)[1:] = float("-inf")
    t2[3 // D, 3 % D] = 0
    row(4)[t2[4 // D, 4 % D]] += 40
    row(5)[:] += 1e4
    return x, t


# (N, C, D) with D = 600: 18 full tiles of 32 lanes (37 of 16) and a partial one per n, so
# that the backward's tile groups (ce_cpu_lanes_group.h, from 27 classes: up to 16 full tiles
# of one n, swept 4 classes at a time) come whole, cut short by the n's end, and as single tiles.
def long_kdim(C, dtype):
    return randn((2, C, 600), dtype)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("C", [27, 40])
def test_grouped_backward_tiles(capability, C, option, dtype, reduction):
    check_option(long_kdim(C, dtype), option, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_grouped_backward_tiles_with_hard_rows(capability, dtype):
    """NaN, +inf, all -inf and masked rows in the first group's first tile: its NaN and zero
    fills, the other tiles of the group untouched by them."""
    x = long_kdim(40, dtype)
    x, t = hard_rows(x, targets(x))
    check_cross_entropy(x, t, "cpu", "cpu", reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("option", [{}, {"label_smoothing": 0.1, "weight": True},
                                    {"logit_scale": 0.5, "softcap": 3.0}], ids=str)
def test_tile_groups_are_the_lone_tiles_bits(capability, dtype, option):
    """The backward's tile groups (unit d stride, ce_cpu_lanes_group.h) and its lone tiles (d
    stride 2: gathered) sweep each lane with the same formulas in the same order: from the same
    saved lse the same gradient, bit for bit; the forward's tiles (a vector load a class, or
    gathered) the same loss, lse and statistics."""
    C = 40
    x = long_kdim(C, dtype)
    x_strided = torch.empty((2, C, 1200), dtype=dtype)[:, :, ::2]
    x_strided.copy_(x)
    t = targets(x)
    w = torch.rand(C) + 0.1 if option.get("weight") else None
    args = (t, w, -100, option.get("label_smoothing", 0.0), option.get("logit_scale", 1.0),
            option.get("softcap", 0.0), False)
    grouped = torch.ops.nllfused.ce_fwd_stats(x, *args)
    lone = torch.ops.nllfused.ce_fwd_stats(x_strided, *args)
    for a, b in zip(grouped, lone):
        assert torch.equal(a, b)
    loss, lse, aux = torch.ops.nllfused.ce_fwd(x, *args)
    assert torch.equal(loss, grouped[0]) and torch.equal(lse, grouped[1])
    g = torch.rand_like(loss)
    grouped = torch.ops.nllfused.ce_bwd(g, None, x, *args[:2], lse, aux, *args[2:])
    lone = torch.ops.nllfused.ce_bwd(g, None, x_strided, *args[:2], lse, aux, *args[2:])
    assert torch.equal(grouped, lone)
    assert bool(torch.isfinite(grouped).all())


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [3, 17])
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim", "kdim_short", "channels_last"])
def test_nan_and_infinite_rows(capability, layout, C, dtype, reduction):
    x = LAYOUTS[layout](C, dtype)
    x, t = hard_rows(x, targets(x))
    check_cross_entropy(x, t, "cpu", "cpu", reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("C", [3, 17])
def test_16_bit_rows_far_from_zero(capability, C, dtype, smoothing):
    """Whole tiles of 16-bit rows far from 0, where lse's float rounding (an ulp of 1/32 near
    3e5, 1/4 near 2e6) is no longer small against z - lse, so that p must come from the lse the
    forward saved in float64: offsets up to 6e4 in float16, on both sides of 2^22 in bfloat16
    (kTinyRefMax, from where the rows path's exp2 shortcut must not run; the lane path has none,
    so these rows check that its exp(z - lse) keeps them exact)."""
    offsets = [0.0, 3e2, 1e4, 3e5, 2e6, 5e6] if dtype == torch.bfloat16 else [0.0, 3e2, 6e4]
    x = randn((len(offsets), C, 64), torch.float32)
    for n, offset in enumerate(offsets):
        x[n] += offset
    x = x.to(dtype)
    check_cross_entropy(x, targets(x), "cpu", "cpu", reduction="none",
                        label_smoothing=smoothing)


@pytest.mark.parametrize("layout", ["2d", "kdim", "channels_last"])
def test_ignored_rows_with_nan_get_no_loss_and_no_gradient(capability, layout):
    """The contract (csrc/ops.cpp): an ignored row's loss and gradient are 0 whatever its logits
    (torch's own backward gives NaN there: 0 times the NaN of log_softmax)."""
    x = LAYOUTS[layout](5, torch.float32)
    t = targets(x, ignore_frac=0)
    x3, D = rows_of(x)
    t2 = t.view(t.shape[0], -1)
    ignored = [(0, 0), (0, 1)] if D > 1 else [(0, 0), (1, 0)]  # (n, d) of rows 0 and 1
    x3[ignored[0][0], 2, ignored[0][1]] = float("nan")
    x3[ignored[1][0], 0, ignored[1][1]] = float("inf")
    for n, d in ignored:
        t2[n, d] = -100
    xd = x.clone().requires_grad_()
    loss = nllfused.cross_entropy(xd, t, reduction="none", backend="cpu")
    loss.sum().backward()
    g3 = xd.grad.unsqueeze(-1) if x.dim() == 2 else xd.grad.flatten(2)
    for n, d in ignored:
        assert loss.view(loss.shape[0], -1)[n, d] == 0
        assert torch.equal(g3[n, :, d], torch.zeros(5))
    assert torch.isfinite(loss).all() and torch.isfinite(xd.grad).all()


@pytest.mark.parametrize("bad", [-5, 10])
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim", "channels_last"])
def test_out_of_range_target_raises(capability, layout, bad):
    x = LAYOUTS[layout](10, torch.float32)
    t = targets(x, ignore_frac=0)
    t.view(-1)[-1] = bad  # in the last, partial tile
    with pytest.raises(IndexError, match="out of bounds"):
        nllfused.cross_entropy(x, t, backend="cpu")
    # and in the backward op (csrc/ops.cpp) alone, given a valid forward's lse and aux
    x3, _ = rows_of(x)
    ok = targets(x, ignore_frac=0)
    t2 = ok.view(ok.shape[0], -1)
    loss, lse, aux = torch.ops.nllfused.ce_fwd(x3, t2, None, -100, 0.0, 1.0, 0.0, False)
    t2.view(-1)[-1] = bad
    with pytest.raises(IndexError, match="out of bounds"):
        torch.ops.nllfused.ce_bwd(torch.ones_like(loss), None, x3, t2, None, lse, aux, -100, 0.0,
                                  1.0, 0.0, False)


@pytest.mark.parametrize("layout", ["2d", "kdim"])
def test_no_rows(capability, layout):
    x = LAYOUTS[layout](6, torch.float32)[:0]
    check_cross_entropy(x, targets(x), "cpu", "cpu", reduction="sum")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reduction_in_the_kernels_pass(capability, layout, dtype, reduction):
    """The one-call op's mean and sum (csrc/loss.cpp) are added up in the lane path's own pass
    (no loss rows: csrc/cpu/kernels.h, Args::sums), per tile, then the tiles in a fixed order: the
    reduced loss within 1 ulp of the double reduction of the per-row losses, on every copy
    (tiles of 2 to 32 lanes) and layout (partial tiles, gathered tiles); the same bits on one
    thread and on two; the gradient the rows' gradient scaled by the reduction's share, and
    every row ignored gives torch's NaN mean (0 sum) with a zero gradient. (Values against
    float64 torch: test_options.)"""
    C = 7
    x = LAYOUTS[layout](C, dtype)
    t = targets(x, ignore_index=3)
    w = torch.rand(C) + 0.1
    kw = dict(weight=w, ignore_index=3, label_smoothing=0.1)
    xr = x.clone().requires_grad_()
    rows = nllfused.cross_entropy(xr, t, reduction="none", **kw)
    assert rows.grad_fn.name() == "nllfused::CrossEntropyLossBackward"  # the one-call op
    den = w.double()[t[t != 3]].sum() if reduction == "mean" else torch.tensor(1.0)
    rows.backward(torch.full_like(rows, (1 / den).item()))
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xd = x.clone().requires_grad_()
            loss = nllfused.cross_entropy(xd, t, reduction=reduction, **kw)
            loss.backward()
            results.append((loss.detach(), xd.grad))
    finally:
        torch.set_num_threads(threads)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    exact = rows.detach().double().sum() / den
    torch.testing.assert_close(l1.double(), exact.to(l1.dtype).double(), rtol=2.0 ** -7
                               if dtype == torch.bfloat16 else 2.0 ** -23, atol=0)
    if dtype == torch.float32 or reduction == "sum":  # the same row gradient on both sides
        assert torch.equal(g1, xr.grad)
    else:
        # The rows' upstream gradient is bf16, 1 / den rounded to 8 significant bits (at most
        # 2^-8 relative), the reduced loss's row gradient 1 / den in float32: an element differs
        # by that 2^-8 and the two roundings of the gradients to bf16 (2^-8 relative each), so
        # by less than 3 * 2^-8 (+ O(2^-16)) of its value, and of the rounded one.
        diff = (g1.double() - xr.grad.double()).abs()
        assert (diff <= 3.05 * 2.0 ** -8 * xr.grad.double().abs()).all(), diff.max()

    t_none = torch.full_like(t, 3)
    xd = x.clone().requires_grad_()
    loss = nllfused.cross_entropy(xd, t_none, reduction=reduction, **kw)
    loss.backward()
    assert loss.isnan().item() if reduction == "mean" else loss.item() == 0
    assert torch.equal(xd.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [2, 3, 15, 16, 21, 40])
@pytest.mark.parametrize("spatial", [(5, 7), (3, 3)], ids=str)
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_channels_last_gradient_in_the_logits_strides(capability, target_kind, spatial, C,
                                                        dtype):
    """Channels-last logits with few classes: the lanes path moves a tile's logits (lanes
    adjacent, classes adjacent) by 16 x 16 transpositions where it has 16 lanes and 16 classes,
    the last block overlapping the one before (C 21, 40), by permutations of 16 lanes' run of
    C < 16 classes (C 2, 3, 15; AVX-512), the lane's own copies elsewhere (a partial tile,
    tiles across n where D < the lanes), and writes the one-call backward's
    gradient in the logits' own strides (no autograd copy). The loss and gradient bit for bit
    the contiguous input's (the same tiles, formulas and sums), which test_options judges
    against float64 torch; with statistics, their gradient too."""
    x = randn((2, C) + spatial, dtype).contiguous(memory_format=torch.channels_last)
    if target_kind == "index":
        t = targets(x)
        kw = dict(weight=(torch.rand(C, dtype=torch.float64) + 0.1).to(dtype),
                  label_smoothing=0.1)
    else:
        t = torch.softmax(torch.randn(x.shape, dtype=torch.float64), 1).to(dtype)
        kw = {}
    check_cross_entropy(x, t, "cpu", "cpu", reduction="sum", **kw)
    for reduction in ("none", "mean"):
        results = []
        for xi in (x, x.contiguous()):
            xg = xi.clone(memory_format=torch.preserve_format).requires_grad_()
            loss = nllfused.cross_entropy(xg, t, reduction=reduction, **kw)
            assert loss.grad_fn.name() == "nllfused::CrossEntropyLossBackward"  # one call
            g_up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3))
            (g,) = torch.autograd.grad(loss, xg, g_up.to(loss.dtype))
            assert g.stride() == xg.stride()
            results.append((loss, g))
        (loss, g), (loss_c, g_c) = results
        assert torch.equal(loss, loss_c) and torch.equal(g, g_c)
    if target_kind == "index":
        grads = []
        for xi in (x, x.contiguous()):
            xg = xi.clone(memory_format=torch.preserve_format).requires_grad_()
            loss, st = nllfused.cross_entropy(xg, t, return_stats=("entropy",), **kw)
            assert loss.grad_fn.name() == "nllfused::CrossEntropyLossStatsBackward"
            (g,) = torch.autograd.grad(loss + st.entropy.sum(), xg)
            assert g.stride() == xg.stride()
            grads.append(g)
        assert torch.equal(*grads)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "probabilities"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_copies_agree(dtype, soft, monkeypatch):
    """Every copy of the kernels gives the same losses and gradients up to rounding (so a copy
    that silently fell back to another path, or skipped rows, shows here too), for class-index
    and probability targets (ce_cpu_lanes_soft.h)."""
    x = LAYOUTS["kdim"](21, dtype)
    t = torch.softmax(randn(x.shape, torch.float32), 1).to(dtype) if soft else targets(x)
    results = []
    for cap in CAPABILITIES:
        monkeypatch.setenv("NLLFUSED_CPU_CAPABILITY", cap)
        xd = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xd, t, reduction="none", label_smoothing=0.1,
                                      backend="cpu")
        loss.sum().backward()
        results.append((loss.detach().float(), xd.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=tol, atol=tol)
        torch.testing.assert_close(grad, results[0][1], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [33, 150])
def test_classes_a_multiple_of_4_kib_apart(capability, C, dtype):
    """A class stride of 4 KiB (D = 4096 bytes / element size): every class's line of a lane tile
    maps to one L1 set, and more than 32 classes make the forward prefetch by class instead
    (ce_cpu_lanes.h, lanes_alias)."""
    x = randn((2, C, 4096 // dtype.itemsize), dtype)
    check_cross_entropy(x, targets(x), "cpu", "cpu", reduction="none", label_smoothing=0.1)


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo")
                    or "avx2" not in CAPABILITIES,
                    reason="an x86-64 Linux build with the SIMD copies")
def test_copies_follow_the_cpu_flags(monkeypatch):
    """The copies offered are exactly those the CPU's flags (Linux /proc/cpuinfo) allow:
    avx2 needs AVX2 + FMA + F16C, avx512 AVX-512 F/BW/VL/DQ on top, avx512bf16 AVX512_BF16 on
    top of that; the best one runs by default."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    has = set(flags).issuperset
    expected = ["default"]
    if has({"avx2", "fma", "f16c"}):
        expected.append("avx2")
        if has({"avx512f", "avx512bw", "avx512vl", "avx512dq"}):
            expected.append("avx512")
            if has({"avx512_bf16"}):
                expected.append("avx512bf16")
    assert CAPABILITIES == expected
    monkeypatch.delenv("NLLFUSED_CPU_CAPABILITY", raising=False)
    assert nllfused._C.build_info()["cpu_capability"] == expected[-1]


@pytest.mark.skipif(not nllfused.build_info()["built"], reason="the C++ extension")
def test_kernels_read_the_environment_only_at_a_reload():
    """The kernels never call getenv (they run without the GIL, and getenv beside a write to
    os.environ in another thread can crash): a variable set after import takes effect at
    nllfused._C.reload_cpu_env() -- here an unknown capability, an error only from then on."""
    x, t = randn((4, 10), torch.float32), torch.tensor([1, 2, 3, 4])
    saved = os.environ.get("NLLFUSED_CPU_CAPABILITY")
    os.environ["NLLFUSED_CPU_CAPABILITY"] = "no-such-copy"
    try:
        expected = torch.nn.functional.cross_entropy(x, t)
        torch.testing.assert_close(nllfused.cross_entropy(x, t, backend="cpu"), expected)
        nllfused._C.reload_cpu_env()
        with pytest.raises(RuntimeError, match="no-such-copy: unknown"):
            nllfused.cross_entropy(x, t, backend="cpu")
    finally:
        if saved is None:
            del os.environ["NLLFUSED_CPU_CAPABILITY"]
        else:
            os.environ["NLLFUSED_CPU_CAPABILITY"] = saved
        nllfused._C.reload_cpu_env()
    torch.testing.assert_close(nllfused.cross_entropy(x, t, backend="cpu"), expected)
