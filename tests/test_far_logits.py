"""Logits far from zero: |z| from 4e6 to 1e20, where the logits' ulp is 1/2 or more. torch forms
log p = (z - m) - log s, exact in z - m, and gives finite losses and gradients there; a kernel
that forms exp(z - m) as 2^(z log2 e - m log2 e) (the CPU fold's exp2 step) or p from a saved
lse that has lost log s (1e20 + 8 is 1e20 even in float64) gives NaN or p = 1 instead
(docs/maths.md, "Precision of lse"). Every CPU copy (rows read in place, tiles of a K-dim input,
lanes of short rows) and every backend, float32 and bf16, against float64 torch. Then rows whose
logits span more than the float range, where the class sums against a reference inside the row
overflow (docs/maths.md, "Class sums")."""
import math

import pytest
import torch

import nllfused
from helpers import backend_params, check_cross_entropy, dtype_id
from test_cpu_small_classes import CAPABILITIES, capability  # noqa: F401
from test_cuda_emulation import emu  # noqa: F401
from test_stats import assert_stat_close, oracle_rows

# 4e6: just below 2^22, the largest |max| the CPU forward's exp2 step takes (its common factor
# then up to 2^0.33); from 3e7 on every backend's far-row paths
OFFSETS = [4e6, -4e6, 3e7, -3e7, 1e9, 1e12, 1e20, -1e20]
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7}
# layout -> shape, classes in dim 1: rows of many classes, a K-dim input (tiles), short rows
# (lanes)
LAYOUTS = {"rows": (6, 3000), "tiles": (2, 40, 37), "lanes": (37, 10)}


def far_logits(shape, offset, dtype, seed):
    """Logits offset + k ulp (the dtype's ulp at offset, k from -6 to 0: a distribution over a
    few values where the ulp is small, one-hot or tied where it is large), with the max tied in
    two classes of every row; and index targets."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(offset, dtype=torch.float64).to(dtype).item()
    ulp = 2.0 ** (math.floor(math.log2(abs(base))) - MANTISSA_BITS[dtype])
    k = torch.randint(-6, 1, shape, generator=g, dtype=torch.int64).double()
    k.select(1, 0).fill_(0)
    k.select(1, 3).fill_(0)
    x = (base + k * ulp).to(dtype)
    assert torch.equal(x.double(), base + k * ulp)  # every value exact in dtype
    t_shape = shape[:1] + shape[2:]
    return x, torch.randint(0, shape[1], t_shape, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"{o:g}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=["plain", "smoothing"])
def test_cpu_copies(capability, layout, offset, dtype, smoothing):
    """Loss and gradient of every CPU copy against float64 torch."""
    shape = LAYOUTS[layout]
    x, t = far_logits(shape, offset, dtype, seed=len(layout))
    check_cross_entropy(x, t, "cpu", "cpu", reduction="none", label_smoothing=smoothing)


# layout -> (shape, classes in dim 1; whether the classes are strided)
CROWD_LAYOUTS = {"rows": ((3, 4000), False), "strided": ((3, 4000), True),
                 "tiles": ((2, 4000, 3), False)}


@pytest.mark.parametrize("layout", list(CROWD_LAYOUTS))
def test_cpu_copies_crowded_rows(capability, layout):
    """float32 rows at 1e8 (|lse| >= 2^26: the backward reads each row again for m and log s)
    whose terms are mostly tiny beside the max's -- two classes at the max, a tenth of them e^-8
    below, the rest e^-16 --, which a serial float sum of them would drop (p 2e-4 off)."""
    shape, strided = CROWD_LAYOUTS[layout]
    x = torch.full(shape, 1e8)
    x[:, :2] += 16
    x[:, 2:shape[1] // 10] += 8
    if strided:
        x = x.t().contiguous().t()
    t = torch.randint(0, shape[1], shape[:1] + shape[2:])
    check_cross_entropy(x, t, "cpu", "cpu", reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("offset", OFFSETS, ids=lambda o: f"{o:g}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu_statistics(capability, layout, offset, dtype):
    """The statistics (lse, entropy, target log-prob) and the gradient they and the loss give,
    against float64 torch, on every CPU copy."""
    _check_statistics("cpu", "cpu", layout, offset, dtype)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("offset", [3e7, 1e12, -1e20], ids=lambda o: f"{o:g}")
@pytest.mark.parametrize("layout", ["rows", "tiles"])
def test_every_backend(device, backend, layout, offset, request):
    """Loss, statistics and gradients of every backend, float32. The Triton backward does not
    reread float32 rows with |lse| >= 2^26 (docs/maths.md, "Precision of lse"): a known limit,
    held here as an expected failure."""
    if backend == "triton" and abs(offset) >= 1e20:  # 1e20 + log s is 1e20: p = 1
        request.applymarker(pytest.mark.xfail(strict=True, reason="Triton float32 rows with "
                                              "|lse| >= 2^26: p from the float64 lse"))
    elif backend == "triton" and abs(offset) >= 2**26:  # p off by up to ~1e-4 at 1e12
        pytest.skip("Triton float32 rows with |lse| >= 2^26: p as fine as the float64 lse")
    shape = LAYOUTS[layout]
    x, t = far_logits(shape, offset, torch.float32, seed=7)
    check_cross_entropy(x, t, device, backend, reduction="mean")
    _check_statistics(device, backend, layout, offset, torch.float32)


def _check_statistics(device, backend, layout, offset, dtype):
    shape = LAYOUTS[layout]
    x, t = far_logits(shape, offset, dtype, seed=11)
    xo = x.clone().to(device).requires_grad_()
    loss, st = nllfused.cross_entropy(xo, t.to(device), reduction="none", backend=backend,
                                      return_stats=("lse", "entropy", "target_logprob"))
    (loss.sum() + 0.3 * st.entropy.sum() - 0.7 * st.target_logprob.sum()).backward()
    xr = x.double().requires_grad_()
    # the oracle's rows: classes last, one row per (n, d)
    rows = oracle_rows(xr.movedim(1, -1).reshape(-1, shape[1]), t.reshape(-1))
    for name in ("lse", "entropy", "target_logprob"):
        assert_stat_close(name, getattr(st, name).reshape(-1), rows[name].detach(), dtype)
    (torch.nn.functional.cross_entropy(xr, t, reduction="sum") + 0.3 * rows["entropy"].sum()
     - 0.7 * rows["target_logprob"].sum()).backward()
    # float32: as test_stats; bf16: one rounding of the gradient
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(xo.grad.double().cpu(), xr.grad, **tol)


F32_MAX = torch.finfo(torch.float32).max


def spanning_rows(shape, seed):
    """float32 logits (classes in dim 1) whose rows span more than the float range: per row two
    classes at -3e38 and +3e38 (one of them often class 0, Triton's reference), or a span just
    inside it (-2e38, 1e38), the rest N(0, 1); and probability targets without mass at the
    lowest class in some rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    rows = x.movedim(1, -1).reshape(-1, shape[1])       # a copy: written back below
    q = torch.rand(rows.shape, generator=g)
    for i in range(rows.shape[0]):
        lo, hi = torch.randperm(shape[1], generator=g)[:2].tolist()
        if i % 3 == 0:
            lo = 0
        span = (-2e38, 1e38) if i % 4 == 3 else (-3e38, 3e38)
        rows[i, lo], rows[i, hi] = span
        if i % 2 == 1:
            q[i, lo] = 0.0
    q = q / q.sum(1, keepdim=True)
    back = lambda v: v.reshape(shape[:1] + shape[2:] + shape[1:2]).movedim(-1, 1).contiguous()
    return back(rows), back(q)


def exact_rows(x, coef, smooth_w=None):
    """Per row (classes last): the exact sum_c coef_c (lse - z_c) over the classes with
    coef_c != 0 in float64 (no term rounds past float64's range); whether a float32 sum may
    overflow on the way -- a term lse - z_c past float32's range (torch's log_softmax), or with
    class indices the smoothing sum sum_c w_c (lse - z_c) before its e / C (smooth_w: w); and
    the row's scale sum |coef_c| (max z - min z) for the float32 sums' rounding."""
    x = x.double()
    terms = torch.logsumexp(x, 1, keepdim=True) - x
    on = coef != 0
    exact = torch.where(on, coef * terms, 0.0).sum(1)
    overflow = (on & (terms > F32_MAX)).any(1)
    if smooth_w is not None:
        overflow |= (smooth_w * terms).sum(1) > F32_MAX
    scale = coef.abs().sum(1) * (x.amax(1) - x.amin(1))
    return exact, overflow, scale


def assert_spanning_loss(ours, exact, overflow, scale):
    """Never NaN; the exact sum's float32 value (inf past the range) where no sum overflows on
    the way; +inf or that value where one may (torch: +inf; a sum against a reference inside
    the row may stay in range)."""
    ours = ours.double().cpu()
    assert not ours.isnan().any(), ours
    want = exact.float().double()
    close = (ours == want) | ((ours - exact).abs() <= 1e-5 * exact.abs() + 2**-20 * scale)
    ok = torch.where(overflow, close | (ours == float("inf")), close)
    assert ok.all(), (ours[~ok], exact[~ok], overflow[~ok])


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", [(12, 37), (4, 20000), (2, 37, 6)],
                         ids=["short", "long", "kdim"])
@pytest.mark.parametrize("target", ["index", "index-weight", "prob", "prob-smoothing"])
def test_rows_spanning_the_float_range(device, backend, shape, target):
    """Rows whose finite logits span more than float32's range (z_c - z_0 overflows): the
    smoothing and probability-target sums are no NaN (inf - inf), on every backend and path
    (docs/maths.md, "Class sums")."""
    x, q = spanning_rows(shape, seed=len(shape) + shape[1])
    C = shape[1]
    w = torch.linspace(0.5, 2.0, C) if target == "index-weight" else None
    e = 0.0 if target == "prob" else 0.1
    rows = x.movedim(1, -1).reshape(-1, C)
    if target.startswith("index"):
        t = torch.randint(0, C, shape[:1] + shape[2:], generator=torch.Generator().manual_seed(3))
        wc = torch.ones(C, dtype=torch.float64) if w is None else w.double()
        coef = e / C * wc.expand(rows.shape).clone()
        ty = t.reshape(-1)
        coef[torch.arange(len(ty)), ty] += (1 - e) * wc[ty]
    else:
        t = q
        coef = (1 - e) * q.movedim(1, -1).reshape(-1, C).double() + e / C
    exact, overflow, scale = exact_rows(rows, coef, wc if target.startswith("index") else None)
    dev = lambda v: None if v is None else v.to(device)
    loss = nllfused.cross_entropy(dev(x), dev(t), dev(w), reduction="none", label_smoothing=e,
                                  backend=backend)
    assert_spanning_loss(loss.reshape(-1), exact, overflow, scale)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
def test_vocab_slice_spanning_the_float_range(device, backend, weighted):
    """The vocabulary-parallel loss (one rank) with label smoothing over such rows."""
    from nllfused.distributed import vocab_parallel_cross_entropy

    x, _ = spanning_rows((12, 37), seed=5)
    w = torch.linspace(0.5, 2.0, 37) if weighted else None
    t = torch.randint(0, 37, (12,), generator=torch.Generator().manual_seed(4))
    wc = torch.ones(37, dtype=torch.float64) if w is None else w.double()
    coef = 0.1 / 37 * wc.expand(12, 37).clone()
    coef[torch.arange(12), t] += 0.9 * wc[t]
    exact, overflow, scale = exact_rows(x, coef, wc)
    dev = lambda v: None if v is None else v.to(device)
    loss = vocab_parallel_cross_entropy(dev(x), dev(t), weight=dev(w), reduction="none",
                                        label_smoothing=0.1, backend=backend)
    assert_spanning_loss(loss, exact, overflow, scale)


@pytest.mark.parametrize("C", [40, 3000])
@pytest.mark.parametrize("force", [(-1, 0, 0, 0, 0), (1, 0, 0, 0, 0), (0, 32, 0, 0, 0)],
                         ids=["default", "tile", "rows_G32"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_cuda_rows_spanning_the_float_range(emu, C, force, prob):
    """The CUDA backend's kernels (their host emulation, tests/test_cuda_emulation.py) over
    such rows, on its mappings."""
    x, q = spanning_rows((12, C), seed=C)
    t = torch.randint(0, C, (12,), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(C, dtype=torch.float64)
    if prob:
        coef = 0.9 * q.double() + 0.1 / C
    else:
        coef = 0.1 / C * ones.expand(12, C).clone()
        coef[torch.arange(12), t] += 0.9
    exact, overflow, scale = exact_rows(x, coef, None if prob else ones)
    tgt = q[..., None] if prob else t[:, None]
    loss, _, _, _ = emu.fwd(x[..., None], tgt, None, -100, 0.1, 1.0, 0.0, prob, *force)
    assert_spanning_loss(loss[:, 0], exact, overflow, scale)
