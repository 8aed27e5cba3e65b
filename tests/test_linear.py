"""nllfused.linear_cross_entropy against float64 torch (F.linear + F.cross_entropy), all backends.

Losses and the gradients of input, linear_weight and linear_bias are judged as the conformance
tests judge cross_entropy (tests/reference.py): float64 oracle; float32 / bfloat16 no worse than
twice torch's own error in that dtype. Chunks are forced small (CHUNK_ROWS) so every case crosses
several chunk boundaries, the last chunk partial.
"""
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nllfused
import nllfused.linear as L
from helpers import backend_params, backends_here, case_params, tensors_to, with_class_weight
from reference import assert_matches_oracle, reference

linear_cross_entropy = L.linear_cross_entropy


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ROWS", 8)


def make(lead=(37,), H=16, C=29, bias=False, dtype=torch.float32, ignore=-100, ignore_frac=0.2,
         spread=2.0, offset=0.0, confident=False):
    """x (*lead, H), W (C, H), b (C,) or None, t (*lead); logits have std ~spread (+offset)."""
    x = torch.randn(*lead, H, dtype=dtype)
    W = (torch.randn(C, H) / H ** 0.5 * spread).to(dtype)
    b = (torch.randn(C) + offset).to(dtype) if bias else None
    t = torch.randint(0, C, lead)
    if confident:  # the target is the largest logit by far: p_y -> 1, loss -> 0
        t = F.linear(x.double(), W.double(), None if b is None else b.double()).argmax(-1)
    t[torch.rand(lead) < ignore_frac] = ignore
    return x, W, b, t


def torch_pipeline(x, W, b, t, dtype, grad, reduction, ce_dtype=None, z_loss=0.0, **kw):
    """F.linear + F.cross_entropy (+ the extras) by torch in `dtype` on the CPU: (loss, grad_x,
    grad_W, grad_b). In float64 this is the oracle. ce_dtype=float32 runs the loss in float32 on
    the `dtype` logits, as torch.autocast does. z-loss: z_term's."""
    xd, Wd = x.detach().to(dtype), W.detach().to(dtype)
    bd = None if b is None else b.detach().to(dtype)
    H = xd.shape[-1]
    logits = F.linear(xd.reshape(-1, H), Wd, bd)
    t2 = t.reshape(-1)
    g = grad.reshape(-1) if reduction == "none" else grad
    loss, g_logits = reference(logits, t2, reduction=reduction, dtype=ce_dtype or dtype, grad=g,
                               **kw)
    if z_loss:
        z_val, z_grad = z_term(logits, t2, reduction, ce_dtype or dtype, g, z_loss, **kw)
        loss, g_logits = loss + z_val, g_logits + z_grad
    g_logits = g_logits.to(dtype)
    if reduction == "none":
        loss = loss.reshape(t.shape)
    gx = (g_logits @ Wd).reshape(x.shape)
    gW = g_logits.t() @ xd.reshape(-1, H)
    gb = None if b is None else g_logits.sum(0)
    return loss, gx, gW, gb


def z_term(logits, t, reduction, dtype, grad, z_loss, ignore_index=-100, logit_scale=1.0,
           softcap=None, **_):
    """(value, grad_logits) of the z-loss term by torch in `dtype`: z_loss * lse^2 on each counted
    row; under 'mean' divided by the number of counted rows whatever the class weights (the
    convention of Liger-Kernel and flash-attention)."""
    lg = logits.detach().to(dtype).requires_grad_()
    z = lg * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    counted = t != ignore_index
    rows = torch.where(counted, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    out = {"none": rows, "sum": rows.sum()}.get(reduction, rows.sum() / counted.sum())
    (g,) = torch.autograd.grad(out, lg, grad.to(dtype))
    return out.detach(), g


def torch_low_precision(x, W, b, t, grad, reduction, oracle, **kw):
    """torch's own results in x's dtype, to judge ours by: for float16/bfloat16 the less accurate
    of torch's two ways -- everything in that dtype, or autocast's (products in that dtype, the
    loss in float32). Both carry the rounding of the logits that every implementation makes;
    which one lands closer to the oracle on a given draw is luck, so either alone would make a
    flaky yardstick."""
    dtype = x.dtype
    if dtype == torch.float64:
        return (None,) * 4
    runs = [torch_pipeline(x, W, b, t, dtype, grad, reduction, **kw)]
    if dtype in (torch.float16, torch.bfloat16):
        runs.append(torch_pipeline(x, W, b, t, dtype, grad, reduction, torch.float32, **kw))

    def error(r, i):
        if r[i] is None or r[i].numel() == 0:
            return -1.0
        return (r[i].double() - oracle[i]).abs().nan_to_num().max().item()

    return tuple(max(runs, key=lambda r: error(r, i))[i] for i in range(4))


def check(x, W, b, t, reduction, device="cpu", backend="auto", **kw):
    """Run ours and judge loss and all gradients against the oracle."""
    dtype = x.dtype
    out_shape = t.shape if reduction == "none" else ()
    # Rounded to the loss's dtype: the gradient the loss receives (tests/helpers.py).
    grad = torch.randn(out_shape, dtype=torch.float64).to(dtype).double()
    oracle = torch_pipeline(x, W, b, t, torch.float64, grad, reduction, **kw)
    low = torch_low_precision(x, W, b, t, grad, reduction, oracle, **kw)

    params = [p.to(device).requires_grad_() for p in (x, W) + (() if b is None else (b,))]
    ours = linear_cross_entropy(params[0], params[1], t.to(device),
                                params[2] if b is not None else None, reduction=reduction,
                                backend=backend, **tensors_to(kw, device))
    assert ours.dtype == dtype and ours.shape == out_shape
    assert_matches_oracle(ours, oracle[0], dtype, low[0], "loss")
    ours.backward(grad.to(device, ours.dtype))
    for name, p, want, torch_low in zip(("grad input", "grad weight", "grad bias"), params,
                                        oracle[1:], low[1:]):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
        assert_matches_oracle(p.grad, want, dtype, torch_low, name)


LOW = (torch.bfloat16,)

# name -> (make kwargs, loss kwargs, dtypes). float32 always; bfloat16 where the products and the
# loss's options meet 16-bit rounding; float64 once (another accumulation type).
CASES = {
    # Shapes: with and without bias, 3-D and 1-D inputs, no rows, one class.
    "2d": ({}, {}, (torch.float32, torch.float64) + LOW),
    "bias": ({"bias": True}, {}, (torch.float32,) + LOW),
    "3d": ({"lead": (3, 7), "bias": True}, {}, (torch.float32,) + LOW),
    "1d": ({"lead": (), "ignore_frac": 0.0}, {}, (torch.float32,)),
    "empty": ({"lead": (0,)}, {}, (torch.float32,)),
    "C1": ({"C": 1, "bias": True}, {}, (torch.float32,)),
    # One class: p = 1, so the gradient is the z-loss term's alone, or exactly 0 (no
    # p_y (y_coef + rest) - y_coef leaving the rounding of y_coef).
    "C1_z_loss": ({"C": 1, "spread": 0.5}, {"z_loss": 1e-3}, (torch.float32,)),
    "C1_smoothing": ({"C": 1, "spread": 10.0}, {"label_smoothing": 0.1, "weight": "rand"},
                     (torch.float32,) + LOW),
    # The loss's options, as in the cross_entropy conformance table.
    "weight": ({"bias": True}, {"weight": "rand"}, (torch.float32,) + LOW),
    "ignore_neg1": ({"ignore": -1}, {"ignore_index": -1}, (torch.float32,)),
    "ignore_valid_class": ({"ignore": 4, "C": 9}, {"ignore_index": 4, "weight": "rand"},
                           (torch.float32,)),
    "all_ignored": ({"ignore_frac": 1.0, "bias": True}, {}, (torch.float32,)),
    "smoothing": ({"bias": True}, {"label_smoothing": 0.2, "weight": "rand"},
                  (torch.float32,) + LOW),
    "z_loss": ({}, {"z_loss": 1e-2, "weight": "rand"}, (torch.float32,) + LOW),
    "scale_softcap": ({"bias": True}, {"logit_scale": 1.7, "softcap": 3.0,
                                       "label_smoothing": 0.1}, (torch.float32,) + LOW),
    "logit_scale": ({}, {"logit_scale": 0.37, "z_loss": 1e-3}, (torch.float32,)),
    # Hard numerics: p_y -> 1, and a large common offset that must cancel.
    "confident": ({"spread": 40.0, "confident": True}, {}, (torch.float32,) + LOW),
    "offset_1e4": ({"bias": True, "offset": 1e4}, {"label_smoothing": 0.1}, (torch.float32,)),
}


@pytest.fixture(params=["chunks", "whole"])
def path(request, monkeypatch):
    """The way linear_cross_entropy is asked to take: the chunked op (the file's CHUNK_ROWS), or
    -- no chunking asked for, the logits under _SMALL_LOGITS_BYTES -- the logits made whole and
    given to cross_entropy (_whole_logits); the test fails if the other one is taken."""
    calls = []
    whole = L._whole_logits
    monkeypatch.setattr(L, "_whole_logits", lambda *a: calls.append(1) or whole(*a))
    if request.param == "whole":
        monkeypatch.setattr(L, "CHUNK_ROWS", None)
    yield request.param
    assert bool(calls) == (request.param == "whole"), (request.param, len(calls))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name,dtype", list(case_params(CASES)))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_float64_torch(device, backend, name, dtype, reduction, path):
    make_kw, kw, _ = CASES[name]
    x, W, b, t = make(dtype=dtype, **make_kw)
    check(x, W, b, t, reduction, device, backend, **with_class_weight(kw, W.shape[0]))


@pytest.mark.parametrize("chunk_rows", [None, 1, 36, 37, 1000])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_chunk_sizes(monkeypatch, chunk_rows, reduction):
    """Automatic chunks, one row per chunk, N - 1, exactly N and more than N rows."""
    monkeypatch.setattr(L, "CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(L, "_SMALL_LOGITS_BYTES", 0)  # automatic chunks, not whole logits
    x, W, b, t = make(bias=True)
    check(x, W, b, t, reduction, label_smoothing=0.1)


@pytest.mark.parametrize("bf16_products", [False, True])
def test_auto_chunk_rule(monkeypatch, bf16_products):
    """The rule of _chunk_rows: budget / row bytes, at least _MIN_ROWS, at most N, multiple of 8;
    with bfloat16 weight gradients summed in bfloat16, at most _BF16_WEIGHT_GRAD_ROUNDINGS
    chunks."""
    monkeypatch.setattr(L, "BF16_WEIGHT_GRAD", bf16_products)
    cpu = torch.device("cpu")
    for backend in ("torch", "cpu"):
        for dtype in (torch.float32, torch.bfloat16):
            rows = L._chunk_rows(2048, 32000, dtype, cpu, backend, 0)
            assert rows % 8 == 0 and L._MIN_ROWS <= rows < 2048
            if bf16_products and dtype == torch.bfloat16:
                assert -(-2048 // rows) <= L._BF16_WEIGHT_GRAD_ROUNDINGS
                assert rows == 1024  # the budget alone would give fewer rows here
                continue
            budget = L._CHUNK_BYTES_CAP["cpu"] // L._row_bytes(32000, dtype, backend)
            assert rows == max(L._MIN_ROWS, budget - budget % 8)
            assert rows * 32000 * 4 < 2048 * 32000 * 4 / 5
    assert L._chunk_rows(5, 32000, torch.float32, cpu, "torch", 0) == 5
    assert L._chunk_rows(10 ** 6, 10 ** 8, torch.float32, cpu, "cpu", 0) == L._MIN_ROWS
    assert L._chunk_rows(100, 10, torch.float32, cpu, "torch", 7) == 7


@pytest.mark.parametrize("bf16_products", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_weight_gradient_summed_in_bf16(monkeypatch, bf16_products, reduction):
    """bfloat16 on the CPU: the weight gradient summed by bfloat16 products into the returned
    bfloat16 gradient (no float32 accumulator: the op's g_weight is bfloat16) or by float32
    products into a float32 one; both judged against float64 as every case is, across chunks
    (two: at most _BF16_WEIGHT_GRAD_ROUNDINGS roundings of the sum in bfloat16). Chunks forced
    smaller than that allows take the float32 accumulator whatever the CPU."""
    monkeypatch.setattr(L, "BF16_WEIGHT_GRAD", bf16_products)
    monkeypatch.setattr(L, "CHUNK_ROWS", 25)
    x, W, b, t = make(lead=(50,), H=24, C=300, bias=True, dtype=torch.bfloat16)
    check(x, W, b, t, reduction, label_smoothing=0.1)
    for rows, bf16 in ((25, bf16_products), (16, False)):
        args = (x, W, b, t, None, -100, 0.1, 1.0, 0.0, False, 0.0, "mean", "cpu", rows, True,
                True, True, False)
        g_weight = torch.ops.nllfused.linear_ce_fwd(*args)[4]
        assert g_weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
        fake = torch._subclasses.FakeTensorMode()
        with fake:
            fake_args = [fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            assert torch.ops.nllfused.linear_ce_fwd(*fake_args)[4].dtype == g_weight.dtype


def test_bf16_weight_gradient_error_near_torchs(monkeypatch):
    """With the automatic chunks (here two: the budget is made small) the bfloat16-summed weight
    gradient's error against float64 (Frobenius) stays within 1.25x of unfused torch's own
    bfloat16 error: each chunk adds one bfloat16 rounding of the running sum, where torch
    rounds its product once (but its logits' gradient more coarsely). Measured: 0.97x at
    (2048, 1024, 32000); at (1024, 256, 4000), over 12 seeds, 0.50x to 1.08x."""
    monkeypatch.setattr(L, "BF16_WEIGHT_GRAD", True)
    monkeypatch.setattr(L, "CHUNK_ROWS", None)
    monkeypatch.setitem(L._CHUNK_BYTES_CAP, "cpu", 1 << 20)
    M, H, C = 1024, 256, 4000
    assert L._chunk_rows(M, C, torch.bfloat16, torch.device("cpu"), "cpu", 0) == M // 2
    x, W, _, t = make(lead=(M,), H=H, C=C, dtype=torch.bfloat16, ignore_frac=0.1)
    x64, W64 = x.double().requires_grad_(), W.double().requires_grad_()
    F.cross_entropy(F.linear(x64, W64), t).backward()
    errors = []
    for fn in (lambda a, w: F.cross_entropy(F.linear(a, w), t),
               lambda a, w: linear_cross_entropy(a, w, t, backend="cpu")):
        xb, Wb = x.clone().requires_grad_(), W.clone().requires_grad_()
        fn(xb, Wb).backward()
        assert Wb.grad.dtype == torch.bfloat16
        errors.append((Wb.grad.double() - W64.grad).norm() / W64.grad.norm())
    assert errors[1] <= 1.25 * errors[0], errors


@pytest.mark.parametrize("device,backend", backend_params())
def test_noncontiguous_and_int32_targets(device, backend):
    x, W, b, t = make(lead=(24,), bias=True)
    x = x.t().contiguous().t()  # column-major input
    W = W.t().contiguous().t()
    check(x, W, b, t.int(), "mean", device, backend)
    x3, W3, b3, t3 = make(lead=(4, 9), H=12)
    check(x3.transpose(0, 1), W3, b3, t3.t(), "none", device, backend)  # (9, 4, H) view


def test_retain_graph_and_partial_requires_grad():
    """A second backward recomputes (the first consumed the stored gradients); gradients flow
    only where asked for."""
    x, W, b, t = make(bias=True)
    xr, Wr, br = (p.clone().requires_grad_() for p in (x, W, b))
    loss = linear_cross_entropy(xr, Wr, t, br)
    first = torch.autograd.grad(loss, (xr, Wr, br), retain_graph=True)
    second = torch.autograd.grad(loss, (xr, Wr, br))
    for a, c in zip(first, second):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    Wr2 = W.clone().requires_grad_()
    linear_cross_entropy(x, Wr2, t, b).backward()
    assert Wr2.grad is not None
    with torch.no_grad():
        assert not linear_cross_entropy(xr, Wr, t, br).requires_grad


@pytest.mark.parametrize("reduction,passes", [("mean", 1), ("sum", 1), ("none", 2)])
def test_logits_products_per_chunk(monkeypatch, reduction, passes):
    """'mean'/'sum' form each chunk's logits once (the gradient is made in the forward pass);
    'none' forms them again in backward."""
    calls = []
    logits = L._Chunks.logits
    monkeypatch.setattr(L._Chunks, "logits", lambda self, r0, r1: calls.append(r0) or logits(
        self, r0, r1))
    x, W, b, t = make(bias=True)  # 37 rows: 5 chunks of 8
    loss = linear_cross_entropy(x.requires_grad_(), W.requires_grad_(), t,
                                b.requires_grad_(), reduction=reduction)
    loss.backward(torch.ones_like(loss))
    assert len(calls) == 5 * passes


# --- float64 class weights, z-loss, higher derivatives ------------------------------------------

REDUCTIONS = ["none", "mean", "sum"]


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("extra", [{}, {"label_smoothing": 0.1},
                                   {"z_loss": 1e-2, "softcap": 4.0, "logit_scale": 0.8}],
                         ids=["plain", "smoothing", "z_softcap"])
def test_float64_with_float64_class_weights(device, backend, reduction, extra):
    """float64 inputs with float64 class weights: no dtype clash in any path (the recomputing
    backward of 'none', a second backward with retain_graph, smoothing), ~1e-12 relative."""
    x, W, b, t = make(lead=(13,), H=5, C=4, bias=True, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64) + 0.1
    grad = torch.randn(t.shape if reduction == "none" else (), dtype=torch.float64)
    oracle = torch_pipeline(x, W, b, t, torch.float64, grad, reduction, weight=w, **extra)
    params = [p.to(device).requires_grad_() for p in (x, W, b)]
    loss = linear_cross_entropy(params[0], params[1], t.to(device), params[2],
                                weight=w.to(device), reduction=reduction, backend=backend,
                                **extra)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), oracle[0], rtol=1e-12, atol=1e-13)
    for retain in (True, False):  # the second backward recomputes
        grads = torch.autograd.grad(loss, params, grad.to(device), retain_graph=retain)
        for ours, want in zip(grads, oracle[1:]):
            torch.testing.assert_close(ours.cpu(), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_mean_counts_rows_not_class_weights(device, backend, reduction):
    """z-loss under 'mean' is divided by the number of counted rows, the cross-entropy part by
    the summed class weights of their targets; ignored rows add nothing; also through a second
    backward (the recomputing path of 'mean'/'sum')."""
    x, W, b, t = make(lead=(23,), H=8, C=11, bias=True, ignore_frac=0.3, spread=6.0)
    t[0] = -100
    w = torch.rand(11) * 3 + 0.1
    kw = dict(weight=w, z_loss=0.05)
    grad = torch.randn(t.shape if reduction == "none" else ())
    oracle = torch_pipeline(x, W, b, t, torch.float64, grad.double(), reduction, **kw)
    # The convention by hand, for 'mean': CE sum / sum of w[y], z sum / count.
    if reduction == "mean":
        logits = F.linear(x.double(), W.double(), b.double())
        counted = t != -100
        ce = F.cross_entropy(logits, t, weight=w.double(), reduction="sum") / w.double()[
            t[counted]].sum()
        z = 0.05 * (torch.logsumexp(logits, 1)[counted] ** 2).sum() / counted.sum()
        torch.testing.assert_close(oracle[0], ce + z)
    params = [p.to(device).requires_grad_() for p in (x, W, b)]
    loss = linear_cross_entropy(params[0], params[1], t.to(device), params[2], backend=backend,
                                reduction=reduction, **tensors_to(kw, device))
    low = torch_low_precision(x, W, b, t, grad.double(), reduction, oracle, **kw)
    assert_matches_oracle(loss, oracle[0], torch.float32, low[0], "loss")
    for _ in range(2):
        grads = torch.autograd.grad(loss, params, grad.to(device), retain_graph=True)
        for name, ours, want, torch_low in zip(("input", "weight", "bias"), grads, oracle[1:],
                                               low[1:]):
            assert_matches_oracle(ours, want, torch.float32, torch_low, "grad " + name)


# Small shapes (chunks of 2 rows), float64, every option that shapes the second derivative.
GRADGRAD_OPTIONS = {"weight_smoothing_z": dict(label_smoothing=0.1, z_loss=1e-2, weight="rand"),
                    "softcap_scale": dict(softcap=2.0, logit_scale=1.3, z_loss=1e-2)}


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(GRADGRAD_OPTIONS))
def test_gradcheck_and_gradgradcheck(monkeypatch, device, backend, reduction, name):
    """First derivatives (the fused backward) and second derivatives (create_graph=True runs
    the unfused torch reference) against finite differences; the create_graph gradient equals
    the fused one."""
    monkeypatch.setattr(L, "CHUNK_ROWS", 2)
    x, W, b, t = make(lead=(5,), H=3, C=4, bias=True, dtype=torch.float64, ignore_frac=0.3)
    t[0] = 1  # at least one counted row
    kw = with_class_weight(GRADGRAD_OPTIONS[name], 4)
    kw = tensors_to({k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                    device)
    params = tuple(p.to(device).requires_grad_() for p in (x, W, b))
    td = t.to(device)

    def fn(x, W, b):
        return linear_cross_entropy(x, W, td, b, reduction=reduction, backend=backend, **kw)

    # Triton's interpreter takes minutes for the slow modes: gradcheck's fast mode there, and
    # no gradgradcheck, whose second derivatives are the torch reference's whatever the backend
    # (and are checked with the other backends); the with-graph gradient is still compared.
    interpreted = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(fn, params, fast_mode=interpreted)
    if not interpreted:
        assert torch.autograd.gradgradcheck(fn, params)
    loss = fn(*params)
    grad = torch.randn_like(loss)
    with_graph = torch.autograd.grad(loss, params, grad, retain_graph=True, create_graph=True)
    fused = torch.autograd.grad(loss, params, grad)
    for a, c in zip(with_graph, fused):
        torch.testing.assert_close(a.detach(), c, rtol=1e-12, atol=1e-14)


def _unfused_float64(x, W, b, t, w, reduction="mean", z_loss=0.0, **kw):
    """The oracle as a differentiable function (for torch.func): unfused F.linear +
    F.cross_entropy in float64, plus the z-term (z_term's convention)."""
    logits = F.linear(x, W, b)
    rows = F.cross_entropy(logits, t, weight=w, reduction="none", **kw)
    counted = t != -100
    zr = torch.where(counted, z_loss * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows + zr
    if reduction == "sum":
        return (rows + zr).sum()
    return rows.sum() / torch.where(counted, w[t.clamp(min=0)], 0.0).sum() + zr.sum() / \
        counted.sum()


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_func_transforms(device, backend, reduction, path):
    """torch.func.grad, jvp, hessian and vmap, and forward-mode AD, run the plain-torch
    reference: the numbers of unfused float64 torch, whatever the backend asked for."""
    import torch.autograd.forward_ad as fwAD
    x, W, b, t = make(lead=(7,), H=4, C=5, bias=True, dtype=torch.float64, ignore_frac=0.3)
    t[0] = 2  # at least one counted row
    w = torch.rand(5, dtype=torch.float64) + 0.1
    x, W, b, t, w = (v.to(device) for v in (x, W, b, t, w))
    kw = dict(reduction=reduction, z_loss=1e-2, label_smoothing=0.1)

    def ours(x, W, b):
        out = linear_cross_entropy(x, W, t, b, weight=w, backend=backend, **kw)
        return out if reduction != "none" else (out * torch.arange(7, device=device)).sum()

    def oracle(x, W, b):
        out = _unfused_float64(x, W, b, t, w, **kw)
        return out if reduction != "none" else (out * torch.arange(7, device=device)).sum()

    tangents = tuple(torch.randn_like(p) for p in (x, W, b))
    runs = {
        "grad": lambda f: torch.func.grad(f, argnums=(0, 1, 2))(x, W, b),
        "jvp": lambda f: torch.func.jvp(f, (x, W, b), tangents),
        "hessian": lambda f: torch.func.hessian(f, argnums=(0, 1))(x, W, b),
        "vmap_grad": lambda f: torch.func.vmap(torch.func.grad(f), in_dims=(0, None, None))(
            torch.stack([x, 2 * x]), W, b),
    }
    for what, run in runs.items():
        torch.testing.assert_close(run(ours), run(oracle), rtol=1e-12, atol=1e-14, msg=what)
    want = torch.func.jvp(oracle, (x, W, b), tangents)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, tp) for p, tp in zip((x, W, b), tangents)]
        primal, tangent = fwAD.unpack_dual(ours(*duals))
    torch.testing.assert_close((primal, tangent), want, rtol=1e-12, atol=1e-14)


# Each reduction (mean/sum make the gradient in the forward op, none in the backward op), with and
# without the in-place hand-over, in float32 and a 16-bit dtype.
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("consume", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(reduction, consume, dtype):
    """torch.library.opcheck of both ops (schema, fake, autograd registration, AOT). The in-place
    hand-over (consume=True) is eager-only by design: it is never traced."""
    x, W, b, t = make(lead=(11,), H=6, C=7, bias=True, dtype=dtype)
    w = torch.rand(7)
    args = (x.requires_grad_(), W.requires_grad_(), b.requires_grad_(), t, w, -100, 0.1, 1.0,
            0.0, False, 1e-3, reduction, "torch", 4, True, True, True, consume)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if consume else ("test_aot_dispatch_dynamic",))
    torch.library.opcheck(torch.ops.nllfused.linear_ce_fwd.default, args, test_utils=tests)
    lse = torch.randn(11, dtype=torch.float64) + 3
    for grad_lse in (None, torch.randn(11, dtype=torch.float64)):
        bwd_args = (torch.randn(11), grad_lse, x.detach(), W.detach(), None, t, w, lse,
                    torch.ones(11), -100, 0.1, 1.0, 0.0, False, "torch", 4, True, True, False)
        torch.library.opcheck(torch.ops.nllfused.linear_ce_bwd.default, bwd_args)


# --- torch.compile and autocast ---------------------------------------------------------------

# Not triton: its interpreter cannot run under torch.compile's tracing.
@pytest.mark.parametrize("backend", backends_here("cpu", only=("cpu", "torch")))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    torch._dynamo.reset()
    x, W, b, t = make(lead=(5, 7), bias=True)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
              weight=torch.rand(W.shape[0]) + 0.1, backend=backend)

    def run(fn):
        params = [p.clone().requires_grad_() for p in (x, W, b)]
        loss = fn(params[0], params[1], t, params[2])
        grad = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0))
        loss.backward(grad)
        return [loss] + [p.grad for p in params]

    eager = run(lambda *a: linear_cross_entropy(*a, **kw))
    compiled = run(torch.compile(lambda *a: linear_cross_entropy(*a, **kw), fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


def test_torch_compile_dynamic_shapes():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, W, t: linear_cross_entropy(x, W, t, backend="torch"),
                       fullgraph=True, dynamic=True)
    for n in (9, 17, 30):
        x, W, b, t = make(lead=(n,))
        expected = F.cross_entropy(F.linear(x.double(), W.double()), t)
        torch.testing.assert_close(fn(x, W, t).double(), expected, rtol=1e-5, atol=1e-6)


def test_autocast_cpu_bfloat16(path):
    """Under autocast the products run in bfloat16 and the loss in float32, as torch's
    F.linear + F.cross_entropy do; judged against float64 like any bfloat16 result."""
    x, W, b, t = make(lead=(4, 9), bias=True)
    oracle = torch_pipeline(x, W, b, t, torch.float64, torch.tensor(1.0), "mean")
    params = [p.clone().requires_grad_() for p in (x, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = F.cross_entropy(F.linear(*params).flatten(0, 1), t.flatten())
    theirs.backward()
    torch_grads = [p.grad for p in params]

    params = [p.clone().requires_grad_() for p in (x, W, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(params[0], params[1], t, params[2])
    assert ours.dtype == theirs.dtype == torch.float32
    assert_matches_oracle(ours, oracle[0], torch.bfloat16, theirs, "loss")
    ours.backward()
    for p, want, torch_grad in zip(params, oracle[1:], torch_grads):
        assert p.grad.dtype == torch.float32
        assert_matches_oracle(p.grad, want, torch.bfloat16, torch_grad, "grad")


@pytest.mark.parametrize("chunk_size", [None, 4], ids=["whole", "chunked"])
def test_autocast_takes_mixed_dtypes_as_torch(chunk_size):
    """Under autocast a float32 input may meet a bfloat16 head (and float32 bias), as F.linear
    takes them: both cast to bfloat16, the loss float32 -- torch's, from the same bfloat16
    logits in float32 arithmetic."""
    g = torch.Generator().manual_seed(0)
    h, b = torch.randn(8, 6, generator=g), torch.randn(5, generator=g)
    W, t = torch.randn(5, 6, generator=g).bfloat16(), torch.randint(0, 5, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, W, t, b, chunk_size=chunk_size)
        theirs = F.cross_entropy(F.linear(h, W, b), t)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


# --- module and signature ---------------------------------------------------------------------

def _assert_accepts_every_argument(ours, theirs):
    """Every parameter of `theirs` exists in `ours` under its name, callable the same way (by
    position where torch allows it, at the same place; by keyword wherever torch allows it) and
    with the same default; our extra parameters all have defaults."""
    ours, theirs = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
    P = inspect.Parameter
    for name, p in theirs.items():
        assert name in ours, f"missing parameter {name!r}"
        q = ours[name]
        if p.kind == P.POSITIONAL_OR_KEYWORD:
            assert q.kind == P.POSITIONAL_OR_KEYWORD, name
            assert list(ours).index(name) == list(theirs).index(name), name
        if p.kind == P.KEYWORD_ONLY:
            assert q.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY), name
        assert (q.default is P.empty) == (p.default is P.empty), name
        if p.default is not P.empty:
            assert type(q.default) is type(p.default) and q.default == p.default, name
    for name in set(ours) - set(theirs):
        assert ours[name].default is not P.empty or ours[name].kind == P.VAR_KEYWORD, name


def test_signature_follows_torch():
    """torch.nn.functional.linear_cross_entropy's and torch.nn.LinearCrossEntropyLoss's
    parameters (constructor and forward) are all ours, with their defaults; our positional
    order (linear_bias ... label_smoothing may also be passed by position) is kept."""
    ours = inspect.signature(linear_cross_entropy).parameters
    assert list(ours)[:8] == ["input", "linear_weight", "target", "linear_bias", "weight",
                              "ignore_index", "reduction", "label_smoothing"]
    for extra in ("z_loss", "logit_scale", "softcap", "chunk_size", "backend"):
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this torch has no F.linear_cross_entropy")
    _assert_accepts_every_argument(linear_cross_entropy, F.linear_cross_entropy)
    _assert_accepts_every_argument(nllfused.LinearCrossEntropyLoss.__init__,
                                   torch.nn.LinearCrossEntropyLoss.__init__)
    _assert_accepts_every_argument(nllfused.LinearCrossEntropyLoss.forward,
                                   torch.nn.LinearCrossEntropyLoss.forward)


TorchOptions = getattr(torch.nn, "LinearCrossEntropyOptions", None)


@pytest.mark.skipif(TorchOptions is None, reason="this torch has no LinearCrossEntropyOptions")
@pytest.mark.parametrize("options,chunk_size,rows", [
    (dict(), None, 8),  # "auto": our rule (here the tests' CHUNK_ROWS = 8)
    (dict(batch_chunk_size=5), None, 5),
    (dict(batch_chunk_size=5, chunking_method=None), None, 5),
    (dict(chunking_method=None), None, 37),  # no heuristic, no size: one chunk
    # aspect_ratio: next_pow2(ceil(37 / ceil(29 / 16))) = 32, then / N
    (dict(chunking_method="aspect_ratio"), None, 32),
    (dict(chunking_method="aspect_ratio:4"), None, 8),
    (dict(batch_chunk_size=3), 6, 6),  # our chunk_size wins
    (None, 7, 7),
], ids=["auto", "size", "size_no_method", "one_chunk", "aspect", "aspect4", "ours_wins",
        "chunk_size"])
def test_torch_options_choose_the_chunks(monkeypatch, options, chunk_size, rows):
    seen = []
    chunk_rows = L._chunk_rows
    monkeypatch.setattr(L, "_chunk_rows", lambda *a: seen.append(chunk_rows(*a)) or seen[-1])
    x, W, b, t = make(bias=True)  # 37 rows, H = 16, C = 29
    if options is not None:
        options = TorchOptions(**options)
    loss = linear_cross_entropy(x, W, t, b, options=options, chunk_size=chunk_size,
                                reduction="none")
    assert seen == [rows]
    expected = F.cross_entropy(F.linear(x.double(), W.double(), b.double()), t, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    module = nllfused.LinearCrossEntropyLoss(16, 29, options=options, chunk_size=chunk_size)
    seen.clear()
    module(x, t)
    assert seen == [rows]


@pytest.mark.skipif(TorchOptions is None, reason="this torch has no LinearCrossEntropyOptions")
def test_bad_chunking_arguments():
    x, W, b, t = make()
    with pytest.raises(ValueError, match="different chunk sizes"):
        linear_cross_entropy(x, W, t, options=TorchOptions(batch_chunk_size=5,
                                                           chunking_method="aspect_ratio"))
    with pytest.raises(TypeError, match="LinearCrossEntropyOptions"):
        linear_cross_entropy(x, W, t, options={"batch_chunk_size": 5})
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            linear_cross_entropy(x, W, t, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        nllfused.LinearCrossEntropyLoss(4, 5, chunk_size=0)


def test_torch_style_call_and_ignore_index_none():
    x, W, b, t = make(bias=True)
    ours = linear_cross_entropy(x, W, t, linear_bias=b, weight=None, reduction="sum",
                                ignore_index=None, label_smoothing=0.0)
    expected = F.cross_entropy(F.linear(x.double(), W.double(), b.double()), t, reduction="sum")
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_module_matches_torch_module():
    H, C = 16, 29
    w = torch.rand(C) + 0.1
    ours = nllfused.LinearCrossEntropyLoss(H, C, bias=True, weight=w, ignore_index=3,
                                           label_smoothing=0.1)
    assert "backend" in repr(ours) and "num_classes=29" in repr(ours)
    x, _, _, t = make(H=H, C=C, ignore=3)
    xr = x.clone().requires_grad_()
    loss = ours(xr, t)
    logits = F.linear(x.double(), ours.linear.weight.double(), ours.linear.bias.double())
    expected = F.cross_entropy(logits, t, weight=w.double(), ignore_index=3, label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert ours.linear.weight.grad is not None and ours.linear.bias.grad is not None
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # same constructor, same state_dict keys
        theirs = torch.nn.LinearCrossEntropyLoss(H, C, bias=True, weight=w, ignore_index=3,
                                                 label_smoothing=0.1)
        assert set(theirs.state_dict()) == set(ours.state_dict())
        # torch's repr, then the extras (backend=...)
        assert ours.extra_repr().startswith(theirs.extra_repr() + ", "), repr(ours)
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(theirs(x, t), loss.detach(), rtol=1e-5, atol=1e-6)


# --- memory: no (N, C) tensor, ever -----------------------------------------------------------

class Allocations(TorchDispatchMode):
    """Records the size (in elements of its dtype) of the storage behind every tensor any op
    returns -- views count as their base, a zero-stride expand as the one element it holds --
    including the ops inside nllfused::linear_ce_fwd / _bwd (run with this mode re-entered)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.seen_inside = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                size = t.untyped_storage().nbytes() // t.element_size()
                self.largest = max(self.largest, size)
        return out


def _run_inside(impl):
    def rule(mode, func, types, args, kwargs):
        mode.seen_inside = True
        with mode:  # the mode is off while it handles an op: turn it back on for the op's body
            return impl(*args, **kwargs)
    return rule


L._linear_ce_fwd.register_torch_dispatch(Allocations, _run_inside(L._linear_ce_fwd_impl))
L._linear_ce_bwd.register_torch_dispatch(Allocations, _run_inside(L._linear_ce_bwd_impl))


# Slow on Triton's interpreter (7-20 s a case): the chunking it checks is the same Python for
# every backend, and the compiled backends run here quickly.
@pytest.mark.parametrize("device,backend", backend_params(slow=("cpu-triton",)))
# Both backward paths (mean: gradient made in forward; none: recomputed in backward), chunks of a
# forced size and of the automatic rule.
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_rows", [16, None])
def test_never_allocates_the_logits(monkeypatch, device, backend, reduction, chunk_rows):
    monkeypatch.setattr(L, "CHUNK_ROWS", chunk_rows)
    # auto: 64 rows of C = 512
    monkeypatch.setattr(L, "_MIN_ROWS", 32)
    monkeypatch.setitem(L._CHUNK_BYTES_CAP, "cpu", 64 * L._row_bytes(512, torch.float32, backend))
    N, H, C = 640, 32, 512
    x, W, b, t = make(lead=(N,), H=H, C=C, bias=True)
    params = [p.to(device).requires_grad_() for p in (x, W, b)]
    with Allocations() as mode:
        loss = linear_cross_entropy(params[0], params[1], t.to(device), params[2],
                                    reduction=reduction, label_smoothing=0.1, backend=backend)
        loss.backward(torch.ones_like(loss))
    assert mode.seen_inside
    rows = chunk_rows or 64
    # Parameter-sized tensors (C x H, N x H) are unavoidable; nothing may approach N x C.
    assert mode.largest <= max(rows * C, C * H, N * H), mode.largest
    assert mode.largest * 4 <= N * C
    # The same check catches the unfused computation.
    with Allocations() as mode:
        F.cross_entropy(F.linear(*params), t.to(device)).backward()
    assert mode.largest >= N * C


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_small_logits_are_made_whole_and_larger_ones_chunked(monkeypatch, reduction):
    """No chunking asked for: logits of at most _SMALL_LOGITS_BYTES are made whole (one F.linear,
    then cross_entropy: no linear_ce op), a byte more and they are chunked; chunk_size, or
    CHUNK_ROWS, chunks them whatever their size. The results agree."""
    monkeypatch.setattr(L, "CHUNK_ROWS", None)
    N, H, C = 64, 8, 48
    monkeypatch.setattr(L, "_SMALL_LOGITS_BYTES", N * C * 4)
    x, W, b, t = make(lead=(N,), H=H, C=C, bias=True)

    def run(**kw):
        params = [p.detach().requires_grad_() for p in (x, W, b)]
        with Allocations() as mode:
            loss = linear_cross_entropy(params[0], params[1], t, params[2], reduction=reduction,
                                        label_smoothing=0.1, z_loss=1e-3, **kw)
            loss.backward(torch.ones_like(loss))
        return mode, [loss] + [p.grad for p in params]

    whole, results = run()
    assert not whole.seen_inside and whole.largest >= N * C
    for kw in (dict(chunk_size=16), dict(chunk_size=N)):
        chunked, other = run(**kw)
        assert chunked.seen_inside
        for a, b_ in zip(results, other):
            torch.testing.assert_close(a, b_)
    monkeypatch.setattr(L, "_SMALL_LOGITS_BYTES", N * C * 4 - 1)
    chunked, other = run()  # (one chunk of all N rows: the automatic rule's _MIN_ROWS)
    assert chunked.seen_inside
    for a, b_ in zip(results, other):
        torch.testing.assert_close(a, b_)
    monkeypatch.setattr(L, "CHUNK_ROWS", 8)
    monkeypatch.setattr(L, "_SMALL_LOGITS_BYTES", 1 << 30)
    assert run()[0].seen_inside


# --- bad inputs -------------------------------------------------------------------------------

def _bad_cases():
    x, W, b, t = make(lead=(6,), H=4, C=5, bias=True)
    ok = dict(input=x, linear_weight=W, target=t, linear_bias=b)
    return [
        ("input_not_tensor", dict(ok, input=[1.0]), TypeError, "input must be a Tensor"),
        ("input_int", dict(ok, input=x.long()), TypeError, "input must be float"),
        ("input_0d", dict(ok, input=torch.tensor(1.0)), ValueError, "0-dimensional"),
        ("weight_1d", dict(ok, linear_weight=W[0]), ValueError, "linear_weight must have shape"),
        ("H_mismatch", dict(ok, linear_weight=W[:, :3]), ValueError, "in_features"),
        ("bias_shape", dict(ok, linear_bias=b[:4]), ValueError, "linear_bias must have shape"),
        ("dtype_mismatch", dict(ok, linear_weight=W.double()), TypeError, "must match"),
        ("bias_dtype", dict(ok, linear_bias=b.half()), TypeError, "must match"),
        ("target_shape", dict(ok, target=t[:5]), ValueError, "target shape"),
        ("float_index_target", dict(ok, target=t.float()), TypeError, "class indices"),
        ("bool_target", dict(ok, target=t > 0), TypeError, "target must hold"),
        ("class_weight_shape", dict(ok, weight=torch.ones(4)), ValueError, "one entry per class"),
        ("out_of_range", dict(ok, target=t.clamp(min=0) + 5), IndexError, "out of bounds"),
        ("reduction", dict(ok, reduction="avg"), ValueError, "not a valid value for reduction"),
        ("smoothing", dict(ok, label_smoothing=1.5), ValueError, "label_smoothing"),
        ("softcap", dict(ok, softcap=-1.0), ValueError, "softcap"),
        ("z_loss", dict(ok, z_loss=-1.0), ValueError, "z_loss"),
        ("ignore_index_type", dict(ok, ignore_index=1.5), TypeError, "ignore_index"),
        ("backend_name", dict(ok, backend="nope"), ValueError, "unknown backend"),
        ("backend_unavailable", dict(ok, backend="cuda"), RuntimeError, "not available"),
        ("meta_weight", dict(ok, linear_weight=W.to("meta")), ValueError, "is on meta"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("chunks", [True, False], ids=["chunks", "whole"])
def test_bad_inputs_raise_clear_errors(monkeypatch, case, chunks):
    """The same errors whether the call would have chunked its logits or made them whole."""
    if not chunks:
        monkeypatch.setattr(L, "CHUNK_ROWS", None)
    _, kwargs, exc, message = case
    with pytest.raises(exc, match=message):
        linear_cross_entropy(**kwargs)


def test_module_rejects_bad_options():
    for bad in ((0,), (2, -1), (2.0,)):
        with pytest.raises(ValueError, match="out_features"):
            nllfused.LinearCrossEntropyLoss(4, 5, out_features=bad)
    for smoothing in (2.0, -0.1, torch.tensor(-0.2)):  # torch's module: both bounds checked
        with pytest.raises(RuntimeError):
            torch.nn.LinearCrossEntropyLoss(4, 5, label_smoothing=smoothing)
        with pytest.raises(ValueError, match="label_smoothing"):
            nllfused.LinearCrossEntropyLoss(4, 5, label_smoothing=smoothing)
    with pytest.raises(ValueError, match="weight must have shape"):
        nllfused.LinearCrossEntropyLoss(4, 5, weight=torch.ones(3))
    # NumPy integers are ints to torch's module (and to its reshape of the weight)
    module = nllfused.LinearCrossEntropyLoss(4, 5, out_features=(np.int64(2),))
    assert module.out_features == (2,) and module.linear.out_features == 10


# --- the torch_ref pieces the fused linear CE is built from ----------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob_target", [False, True])
@pytest.mark.parametrize("z_loss", [0.0, 0.03])
def test_reduce_grads_is_the_vjp_of_reduce(reduction, prob_target, z_loss):
    from nllfused.backends import torch_ref
    M = 9
    loss = torch.rand(M, dtype=torch.float64, requires_grad=True)
    lse = (torch.randn(M, dtype=torch.float64) * 3).requires_grad_()
    counted = torch.rand(M) < 0.7
    aux = torch.where(counted, torch.rand(M, dtype=torch.float64) + 0.1, 0.0)
    c = None if prob_target else counted
    out = torch_ref.reduce(loss, lse, aux, reduction, prob_target, z_loss, c)
    grad = torch.randn(out.shape, dtype=torch.float64)
    want_loss, want_lse = torch.autograd.grad(out, (loss, lse), grad, allow_unused=True,
                                              materialize_grads=True)
    g_loss, g_z = torch_ref.reduce_grads(grad, aux, reduction, prob_target, z_loss, c)
    if not prob_target:  # the fused paths zero ignored rows (torch's losses give them nothing)
        want_loss = torch.where(counted, want_loss, 0.0)
    torch.testing.assert_close(g_loss, want_loss, rtol=1e-14, atol=0)
    assert (g_z is None) == (not z_loss)
    if z_loss:
        torch.testing.assert_close(torch_ref.z_loss_grad(lse.detach(), g_z, z_loss), want_lse,
                                   rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "softcap": 3.0,
                                           "logit_scale": 1.5}], ids=["plain", "all"])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunk_loss_and_grad_matches_forward(dtype, options, weighted):
    """torch_ref.chunk_loss_and_grad: torch_ref.forward's loss and lse, and its gradient (with a
    grad_lse part) as autograd gives it, with and without class weights."""
    from nllfused._checks import Options
    from nllfused.backends import torch_ref
    n, C = 11, 13
    logits = (torch.randn(n, C) * 4).to(dtype)
    target = torch.randint(0, C, (n,))
    target[:3] = -100
    acc = torch_ref.acc_dtype(dtype)
    weight = (torch.rand(C) + 0.1).to(acc) if weighted else None
    opts = Options(**options)
    grad_loss = torch.where(target != -100, torch.randn(n), 0.0).to(acc)
    grad_lse = torch.randn(n, dtype=torch.float64)
    x = logits.to(acc).unsqueeze(-1).requires_grad_()  # exact upcast: autograd's grad in acc
    loss, lse, _ = torch_ref.forward(x, target.unsqueeze(-1), weight, *opts)
    (want,) = torch.autograd.grad((loss, lse), x, (grad_loss.unsqueeze(-1),
                                                   grad_lse.unsqueeze(-1)))
    ours_loss, ours_lse, grad = torch_ref.chunk_loss_and_grad(logits.clone(), target, weight,
                                                              opts)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loss, loss[:, 0].detach(), **tol)
    torch.testing.assert_close(ours_lse, lse[:, 0].detach(), **tol)
    assert ours_loss.dtype == acc and ours_lse.dtype == torch.float64
    torch.testing.assert_close(grad(grad_loss, grad_lse), want[..., 0].to(acc), **tol)
    row_w = torch_ref.row_weights(target, weight, -100, C, acc)
    assert row_w.dtype == acc
    torch.testing.assert_close(row_w, torch_ref.forward(logits.unsqueeze(-1), target.unsqueeze(
        -1), weight, *opts)[2][:, 0])


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_as_torch_takes_them(device, backend, reduction):
    """torch's F.linear_cross_entropy takes (N, C) class probabilities (unchunked); so do we, and
    for (B, T, H) inputs too (targets (B, T, C))."""
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    ours = L.linear_cross_entropy(x, W, q, reduction=reduction, label_smoothing=0.1,
                                         backend=backend)
    ref = F.cross_entropy(F.linear(x, W), q, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, W), g),
                               torch.autograd.grad(ref, (x, W), g), rtol=1e-12, atol=1e-14)
    x3, q3 = x.detach().view(2, 3, 5), q.view(2, 3, 4)
    ours3 = L.linear_cross_entropy(x3, W, q3, reduction=reduction, backend=backend)
    ref3 = F.cross_entropy(F.linear(x3, W).movedim(-1, 1), q3.movedim(-1, 1), reduction=reduction)
    torch.testing.assert_close(ours3, ref3, rtol=1e-12, atol=1e-14)


def test_chunking_depends_on_shapes_only_and_results_are_bitwise_repeatable(monkeypatch):
    """The chunk size is a function of shapes, dtype and device (not of free memory), so two
    calls sum in the same order: bitwise identical loss and gradients."""
    rows = L._chunk_rows(4096, 32000, torch.float32, torch.device("cpu"), "cpu", 0)
    assert rows == L._chunk_rows(4096, 32000, torch.float32, torch.device("cpu"), "cpu", 0)
    assert 32 <= rows < 4096 and rows % 8 == 0
    x = torch.randn(700, 64, requires_grad=True)
    W = torch.randn(3000, 64, requires_grad=True)
    t = torch.randint(0, 3000, (700,))
    results = []
    for _ in range(2):
        loss = L.linear_cross_entropy(x, W, t, label_smoothing=0.1, z_loss=1e-3)
        results.append((loss, *torch.autograd.grad(loss, (x, W))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cuda_chunks_take_tritons_in_place_backward(monkeypatch):
    """The CUDA C++ kernels' ce_bwd_inplace is ce_bwd and a copy (a chunk-sized temporary): cuda
    chunks take Triton's in-place backward where Triton loads (no slice held), else ce_bwd on
    1/_OPS_SLICES of the chunk at a time, copied back."""
    from nllfused import _extension
    if _extension.TRITON_ERROR is not None:
        pytest.skip("triton is not importable here")
    C, bf16 = 32000, torch.bfloat16
    assert L._in_place_backward("cuda") == torch.ops.nllfused.ce_bwd_inplace_triton
    assert L._row_bytes(C, bf16, "cuda") == C * 2 + C * 4  # logits, float32 copy of g
    monkeypatch.setattr(_extension, "TRITON_ERROR", "no triton")
    assert L._in_place_backward("cuda") is None
    assert L._row_bytes(C, bf16, "cuda") == C * 2 + C * 2 // L._OPS_SLICES + C * 4
