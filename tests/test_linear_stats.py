"""Statistics of nllfused.linear_cross_entropy (return_stats, return_z_loss, return_lse) against
float64 torch computed from the materialised logits: F.linear in float64, then argmax, softmax
entropy -(p log p).sum, log_softmax at the target, logsumexp, the z-loss term; their reductions;
the gradients of entropy and target log-probability in input, linear_weight and linear_bias.

Judged as the rest of the suite judges (tests/reference.py): float64 within 1e-10 relative;
float32 / bfloat16 no worse than twice torch's own error in that dtype (the same statistics by
torch from its own logits in that dtype) plus the dtype's small tolerance. Chunks are forced small
(CHUNK_ROWS) so that every case crosses several chunk boundaries, the last chunk partial.
"""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import nllfused
import nllfused.linear as L
from helpers import backend_params, backends_here, tensors_to, with_class_weight
from nllfused import linear_stats, stats
from reference import assert_matches_oracle, reference
from test_linear import Allocations, make, path  # noqa: F401 (path: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTIONS = {
    "plain": {},
    "weight_ignore": {"weight": "rand", "ignore_index": 3},
    "smoothing_z": {"label_smoothing": 0.2, "z_loss": 1e-3},
    "scale_softcap": {"logit_scale": 0.7, "softcap": 5.0},
    "all": {"weight": "rand", "label_smoothing": 0.1, "z_loss": 1e-2, "logit_scale": 1.3,
            "softcap": 8.0},
}
FLOAT_STATS = ("lse", "z_loss", "entropy", "target_logprob")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ROWS", 8)


def case(options, dtype=torch.float32, lead=(37,), bias=True):
    """x, W, b, t (with ignored rows at the case's ignore_index) and the loss kwargs."""
    ignore = options.get("ignore_index", -100)
    x, W, b, t = make(lead=lead, bias=bias, dtype=dtype, ignore=ignore, spread=3.0)
    return x, W, b, t, with_class_weight(options, W.shape[0])


def transformed(x, W, b, dtype, math_dtype=None, logit_scale=1.0, softcap=None, **_):
    """z = softcap(logit_scale * F.linear(x, W, b)) by torch, the product in `dtype`, the rest in
    `math_dtype` (default: `dtype`); classes last, rows flattened."""
    H = x.shape[-1]
    logits = F.linear(x.reshape(-1, H).to(dtype), W.to(dtype), None if b is None else b.to(dtype))
    z = logits.to(math_dtype or dtype)
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def stat_rows(z, t, z_loss=0.0, ignore_index=-100, **_):
    """The statistics per row from materialised z (rows, C), as torch computes them."""
    t = t.reshape(-1)
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    counted = t != ignore_index
    lse = torch.logsumexp(z, 1)
    predicted = z.argmax(1)
    return {"lse": lse, "z_loss": z_loss * lse * lse, "predicted": predicted,
            "entropy": -torch.where(p == 0, 0.0, p * logp).sum(1),
            "target_logprob": logp.gather(1, torch.where(counted, t, 0).unsqueeze(1))[:, 0],
            "correct": counted & (predicted == t)}


def reduce_rows(rows, t, reduction, ignore_index=-100, **_):
    """As the loss reduces: per row ('none': z_loss and target_logprob 0 on ignored rows), or
    the sum / mean over the counted rows."""
    counted = t.reshape(-1) != ignore_index
    out = {}
    for name, v in rows.items():
        if name in ("predicted", "correct"):
            out[name] = v
            continue
        zeroed = torch.where(counted, v, torch.zeros((), dtype=v.dtype))
        if reduction == "none":
            out[name] = zeroed if name in ("z_loss", "target_logprob") else v
        elif reduction == "sum":
            out[name] = zeroed.sum()
        else:
            out[name] = zeroed.sum() / counted.sum()
    return out


def torch_stats(x, W, b, t, dtype, reduction, math_dtype=None, **kw):
    return reduce_rows(stat_rows(transformed(x, W, b, dtype, math_dtype, **kw), t, **kw), t,
                       reduction, **kw)


def torch_low(x, W, b, t, reduction, oracle, **kw):
    """torch's own statistics in x's dtype, the less accurate of its ways (test_linear's
    torch_low_precision): all in that dtype, or (16-bit) the product in it and the rest in
    float32, as autocast does."""
    dtype = x.dtype
    if dtype == torch.float64:
        return {name: None for name in FLOAT_STATS}
    runs = [torch_stats(x, W, b, t, dtype, reduction, **kw)]
    if dtype == torch.bfloat16:
        runs.append(torch_stats(x, W, b, t, dtype, reduction, torch.float32, **kw))
    return {name: max(runs, key=lambda r: (r[name].double() - oracle[name]).abs().nan_to_num()
                      .max().item())[name] for name in FLOAT_STATS}


def assert_predicted_is_argmax(predicted, x, W, b, t, dtype, **kw):
    """float64: exactly the oracle's argmax. Otherwise a maximum of the float64 z up to twice
    the error torch's own logits make in that dtype (a near-tie may go either way)."""
    z64 = transformed(x, W, b, torch.float64, **kw)
    predicted = predicted.cpu().reshape(-1)
    assert predicted.dtype == torch.int64
    if dtype == torch.float64:
        assert torch.equal(predicted, z64.argmax(1))
        return
    err = (transformed(x, W, b, dtype, **kw).double() - z64).abs().max().item()
    at = z64.gather(1, predicted.unsqueeze(1))[:, 0]
    assert bool((at >= z64.max(1).values - 2 * err - 1e-12).all())


def check_stats(st, x, W, b, t, reduction, names=stats.NAMES, **kw):
    dtype = x.dtype
    oracle = torch_stats(x, W, b, t, torch.float64, reduction, **kw)
    low = torch_low(x, W, b, t, reduction, oracle, **kw)
    out_shape = t.shape if reduction == "none" else ()
    assert {n for n in stats.NAMES if getattr(st, n) is not None} == set(names)
    for name in FLOAT_STATS:
        if name in names:
            value = getattr(st, name)
            assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert value.shape == out_shape, name
            assert_matches_oracle(value.reshape(-1) if reduction == "none" else value,
                                  oracle[name], dtype, low[name], name)
    if "predicted" in names:
        assert st.predicted.shape == t.shape
        assert_predicted_is_argmax(st.predicted, x, W, b, t, dtype, **kw)
    if "correct" in names:  # consistent with the argmax found (a near-tie may differ)
        counted = t.reshape(-1) != kw.get("ignore_index", -100)
        predicted = st.predicted.cpu().reshape(-1) if st.predicted is not None else \
            transformed(x, W, b, torch.float64, **kw).argmax(1)
        hit = counted & (predicted == t.reshape(-1))
        expected = {"none": hit.reshape(t.shape), "sum": hit.sum(),
                    "mean": hit.sum(dtype=torch.float32) / counted.sum()}[reduction]
        assert st.correct.dtype == expected.dtype
        assert torch.equal(st.correct.cpu(), expected), (st.correct, expected)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_stats_match_float64_torch(device, backend, options, reduction, dtype, path):
    x, W, b, t, kw = case(OPTIONS[options], dtype, lead=(37,) if dtype != torch.float64
                          else (3, 7))
    args = (x.to(device), W.to(device), t.to(device), b.to(device))
    dkw = tensors_to(kw, device)
    loss, st = nllfused.linear_cross_entropy(*args, reduction=reduction, backend=backend,
                                             return_stats=True, **dkw)
    check_stats(st, x, W, b, t, reduction, **kw)
    # The loss is the loss, judged as test_linear judges it.
    oracle = reference(transformed(x, W, b, torch.float64), t.reshape(-1), reduction=reduction,
                       **kw)[0]
    low = None if dtype == torch.float64 else max(
        (reference(transformed(x, W, b, dtype), t.reshape(-1), reduction=reduction, dtype=d,
                   **kw)[0] for d in {dtype, torch.float32}),
        key=lambda v: (v.double() - oracle).abs().nan_to_num().max().item())
    assert loss.dtype == dtype
    assert_matches_oracle(loss.reshape(-1) if reduction == "none" else loss, oracle, dtype, low)
    if backend != "torch":  # (whose chunked loss, torch_ref.chunk_loss_and_grad, rounds apart)
        # The same kernels on the same chunks: the same loss as without statistics, bit for bit.
        plain = nllfused.linear_cross_entropy(*args, reduction=reduction, backend=backend, **dkw)
        extras = any(k in kw for k in ("z_loss", "logit_scale", "softcap"))
        if path == "whole" and backend == "cpu" and reduction != "none" and extras:
            # (the whole logits to cross_entropy: there the plain call takes the one-call op,
            # which sums the rows in double (csrc/loss.cpp), the call with statistics and
            # extras the general path: (n + 3) ulp of n rows apart, as in test_stats.py)
            rtol = (t.numel() + 3) * torch.finfo(dtype).eps
            torch.testing.assert_close(loss, plain, rtol=rtol, atol=0)
        else:
            assert torch.equal(loss, plain)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("names", [("entropy",), ("predicted",), ("correct",),
                                   ("target_logprob", "lse"), ("lse",), ("z_loss",)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_only_what_is_asked_for(device, backend, names, reduction, path):
    x, W, b, t, kw = case(OPTIONS["smoothing_z"])
    loss, st = nllfused.linear_cross_entropy(x.to(device), W.to(device), t.to(device),
                                             b.to(device), reduction=reduction, backend=backend,
                                             return_stats=names, **kw)
    check_stats(st, x, W, b, t, reduction, names=names, **kw)


def fresh_params(x, W, b):
    return [p.clone().requires_grad_() for p in (x, W, b)]


def plain_call(x, W, b, t, kw):
    """The call without statistics, backpropagated: (loss, its leaf parameters)."""
    params = fresh_params(x, W, b)
    loss = L.linear_cross_entropy(params[0], params[1], t, params[2], **kw)
    loss.backward()
    return loss, params


def assert_same_call(loss, params, plain, plain_params):
    """loss, and after its backward the gradients, bit for bit the plain call's."""
    assert torch.equal(loss, plain)
    loss.backward()
    for p, q in zip(params, plain_params):
        assert torch.equal(p.grad, q.grad)


def forbid(monkeypatch, name, what):
    def boom(*a, **k):
        raise AssertionError(f"{what} ran")

    monkeypatch.setattr(linear_stats, name, boom)


def test_lse_and_z_loss_keep_the_ordinary_op(monkeypatch):
    """lse and the z-loss term come from nllfused::linear_ce_fwd's own lse: no statistics op,
    the same loss and gradients (the stored-gradient path) bit for bit; no statistics asked for,
    no statistics code runs at all."""
    x, W, b, t, kw = case({"z_loss": 1e-2})
    plain, plain_params = plain_call(x, W, b, t, kw)
    forbid(monkeypatch, "with_stats", "the statistics path")
    params = fresh_params(x, W, b)
    loss, z, lse = L.linear_cross_entropy(params[0], params[1], t, params[2], return_z_loss=True,
                                          return_lse=True, **kw)
    assert_same_call(loss, params, plain, plain_params)
    rows = stat_rows(transformed(x, W, b, torch.float64), t, **kw)
    assert lse.shape == t.shape
    assert_matches_oracle(lse, rows["lse"], torch.float32,
                          stat_rows(transformed(x, W, b, torch.float32), t, **kw)["lse"], "lse")
    _, st = L.linear_cross_entropy(x, W, t, b, return_stats=("lse", "z_loss"), **kw)
    assert torch.equal(st.z_loss, z)
    check_stats(st, x, W, b, t, "mean", names=("lse", "z_loss"), **kw)

    forbid(monkeypatch, "result", "the statistics path")
    assert torch.equal(L.linear_cross_entropy(x, W, t, b, **kw), plain.detach())


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("argmax_by", ["kernel", "torch ops"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accuracy_keeps_the_ordinary_op(device, backend, argmax_by, reduction, monkeypatch):
    """predicted / correct alone (token accuracy) come from nllfused::linear_ce_fwd's own pass
    (want_argmax): no statistics op, so the loss and the stored gradients are the plain call's,
    bit for bit, and the argmax is float64 torch's. "torch ops": a backend without a statistics
    kernel (cuda without Triton), whose chunks' argmax comes from linear_stats.chunk_argmax."""
    x, W, b, t, kw = case(OPTIONS["smoothing_z"])
    x, W, b, t = x.to(device), W.to(device), b.to(device), t.to(device)
    kw = dict(kw, reduction=reduction, backend=backend, chunk_size=5)
    plain, plain_params = plain_call(x, W, b, t, kw)
    forbid(monkeypatch, "with_stats", "the statistics op")
    if argmax_by == "torch ops":
        monkeypatch.setattr(L.ops, "stats_for_backend", lambda backend: None)
    params = fresh_params(x, W, b)
    loss, st = L.linear_cross_entropy(params[0], params[1], t, params[2],
                                      return_stats=("predicted", "correct"), **kw)
    assert_same_call(loss, params, plain, plain_params)
    for name in ("backend", "chunk_size", "reduction"):
        kw.pop(name)
    check_stats(st, x.cpu(), W.cpu(), b.cpu(), t.cpu(), reduction, names=("predicted", "correct"),
                **kw)


def torch_objective(x, W, b, t, dtype, reduction, grad, adv, weight=None, ignore_index=-100,
                    label_smoothing=0.0, z_loss=0.0, **kw):
    """(value, grads in x, W, b, (loss, entropy, target_logprob)) of loss * grad - 0.01 *
    entropy - adv * target_logprob (the statistics reduced as the loss) by torch autograd
    through the materialised logits."""
    params = [p.detach().to(dtype).requires_grad_() for p in (x, W, b)]
    z = transformed(*params, dtype, **kw)
    t2 = t.reshape(-1)
    w = None if weight is None else weight.to(dtype)
    rows = F.cross_entropy(z, t2, weight=w, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    counted = t2 != ignore_index
    zrows = torch.where(counted, z_loss * torch.logsumexp(z, 1) ** 2, 0.0)
    if reduction == "none":
        loss = rows + zrows
    elif reduction == "sum":
        loss = (rows + zrows).sum()
    else:
        loss = F.cross_entropy(z, t2, weight=w, ignore_index=ignore_index,
                               label_smoothing=label_smoothing) + zrows.sum() / counted.sum()
    st = reduce_rows(stat_rows(z, t, ignore_index=ignore_index), t, reduction,
                     ignore_index=ignore_index)
    value = ((loss * grad.to(dtype).reshape(loss.shape)).sum() - 0.01 * st["entropy"].sum()
             - (adv.to(dtype).reshape(st["target_logprob"].shape) * st["target_logprob"]).sum())
    parts = tuple(v.detach() for v in (loss, st["entropy"], st["target_logprob"]))
    return value.detach(), torch.autograd.grad(value, params), parts


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("options", ["plain", "weight_ignore", "all"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_entropy_and_target_logprob_gradients(device, backend, options, reduction, dtype,
                                              path):
    """A policy-gradient loss with an entropy bonus built from the statistics backpropagates
    into input, linear_weight and linear_bias as float64 autograd through the materialised
    logits does (float32: within twice torch's own float32 error)."""
    x, W, b, t, kw = case(OPTIONS[options], dtype, lead=(3, 11))
    shape = t.shape if reduction == "none" else ()
    grad = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    adv = torch.randn(shape, dtype=torch.float64).to(dtype).double()
    params = [p.to(device).requires_grad_() for p in (x, W, b)]
    loss, st = nllfused.linear_cross_entropy(params[0], params[1], t.to(device), params[2],
                                             reduction=reduction, backend=backend,
                                             return_stats=("entropy", "target_logprob"),
                                             **tensors_to(kw, device))
    value = ((loss * grad.to(device, dtype)).sum() - 0.01 * st.entropy.sum()
             - (adv.to(device, st.target_logprob.dtype) * st.target_logprob).sum())
    value.backward()
    oracle = torch_objective(x, W, b, t, torch.float64, reduction, grad, adv, **kw)
    low = ((None,) * 3,) * 3 if dtype == torch.float64 else (
        torch_objective(x, W, b, t, dtype, reduction, grad, adv, **kw))
    # The objective's terms one by one: loss * grad and adv * target_logprob can nearly cancel,
    # and their sum's rounding is then relative to terms far larger than the value.
    for name, ours, want, torch_low in zip(("loss", "entropy", "target_logprob"),
                                           (loss, st.entropy, st.target_logprob), oracle[2],
                                           low[2]):
        assert_matches_oracle(ours.reshape(want.shape), want, dtype, torch_low, name)
    for name, p, want, torch_low in zip(("input", "weight", "bias"), params, oracle[1], low[1]):
        assert p.grad.dtype == dtype and p.grad.shape == p.shape
        assert_matches_oracle(p.grad, want, dtype, torch_low, "grad " + name)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck_and_gradgradcheck(monkeypatch, device, backend, reduction):
    """First derivatives of loss, entropy and target log-prob (the op's chunked backward) and
    second derivatives (create_graph=True: the unfused reference) against finite differences."""
    monkeypatch.setattr(L, "CHUNK_ROWS", 2)
    x, W, b, t = make(lead=(5,), H=3, C=4, bias=True, dtype=torch.float64, ignore_frac=0.3)
    t[0] = 1
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=2.0, logit_scale=1.3)
    params = tuple(p.to(device).requires_grad_() for p in (x, W, b))
    td = t.to(device)

    def fn(x, W, b):
        loss, st = nllfused.linear_cross_entropy(
            x, W, td, b, reduction=reduction, backend=backend,
            return_stats=("entropy", "target_logprob", "predicted"), **kw)
        return loss, st.entropy, st.target_logprob

    interpreted = backend == "triton" and device == "cpu"  # see test_linear's twin
    assert torch.autograd.gradcheck(fn, params, fast_mode=interpreted)
    if not interpreted:
        assert torch.autograd.gradgradcheck(fn, params)
    # gradgradcheck differentiates the create_graph gradient against itself: that gradient must
    # also equal the chunked one.
    outs = fn(*params)
    upstream = [torch.randn_like(o) for o in outs]
    with_graph = torch.autograd.grad(outs, params, upstream, retain_graph=True,
                                     create_graph=True)
    fused = torch.autograd.grad(outs, params, upstream)
    for a, c in zip(with_graph, fused):
        torch.testing.assert_close(a.detach(), c, rtol=1e-12, atol=1e-14)


def test_forward_ad_and_torch_func():
    """Forward-mode AD and torch.func transforms run the unfused reference, statistics too."""
    x, W, b, t = make(lead=(6,), H=4, C=5, bias=True, dtype=torch.float64)
    kw = dict(logit_scale=0.5, z_loss=1e-3)

    def ours(x, W, b):
        loss, st = nllfused.linear_cross_entropy(x, W, t, b, return_stats=True, **kw)
        return loss - 0.1 * st.entropy + st.target_logprob

    def oracle(x, W, b):
        z = transformed(x, W, b, torch.float64, **kw)
        st = reduce_rows(stat_rows(z, t, **kw), t, "mean")
        counted = t != -100
        loss = F.cross_entropy(z, t) + (1e-3 * torch.logsumexp(z, 1)[counted] ** 2).mean()
        return loss - 0.1 * st["entropy"] + st["target_logprob"]

    tangents = tuple(torch.randn_like(p) for p in (x, W, b))
    for a, c in zip(torch.func.jvp(ours, (x, W, b), tangents),
                    torch.func.jvp(oracle, (x, W, b), tangents)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    for a, c in zip(torch.func.grad(ours, argnums=(0, 1, 2))(x, W, b),
                    torch.func.grad(oracle, argnums=(0, 1, 2))(x, W, b)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params())
def test_ties_nan_and_masked_classes(device, backend):
    """Exact ties (zero weight rows, equal biases), NaN and -inf logits: predicted as
    torch.argmax (the first maximum, the first NaN), entropy as the materialised formula."""
    H, C = 4, 40
    x = torch.randn(6, H)
    W = torch.randn(C, H) * 0.1
    b = torch.randn(C)
    W[[3, 17, 21]] = 0.0
    b[[3, 17, 21]] = 50.0  # logits exactly 50 in classes 3, 17, 21 of every row
    t = torch.tensor([3, 17, 1, -100, 21, 0])
    _, st = nllfused.linear_cross_entropy(x.to(device), W.to(device), t.to(device), b.to(device),
                                          reduction="none", backend=backend,
                                          return_stats=("predicted", "entropy", "correct"))
    z = F.linear(x.double(), W.double(), b.double())
    assert torch.equal(st.predicted.cpu(), z.argmax(1)) and bool((st.predicted == 3).all())
    assert st.correct.cpu().tolist() == [True, False, False, False, False, False]
    b2 = b.clone()
    b2[[9, 5]] = float("nan")
    b2[[0, 1]] = float("-inf")
    _, st = nllfused.linear_cross_entropy(x.to(device), W.to(device), t.clamp(min=2).to(device),
                                          b2.to(device), reduction="none", backend=backend,
                                          return_stats=("predicted", "entropy"))
    z = F.linear(x.double(), W.double(), b2.double())
    assert torch.equal(st.predicted.cpu(), z.argmax(1)) and bool((st.predicted == 5).all())
    assert bool(st.entropy.isnan().all())


@pytest.mark.parametrize("device,backend", backend_params())
def test_predicted_of_logits_that_tie_after_exp(device, backend):
    """Logits ~1e-17 apart, distinct in float64, whose exp(z - m) are all 1: predicted is the
    argmax of the logits in every chunk, not of what the loss's pass leaves in the chunk's
    buffer (the torch backend overwrote it with exp(z - m), then took its argmax: class 0)."""
    x = torch.rand(40, 1, dtype=torch.float64) + 0.5
    W = torch.randn(100, 1, dtype=torch.float64) * 1e-17
    t = torch.randint(0, 100, (40,))
    _, st = nllfused.linear_cross_entropy(x.to(device), W.to(device), t.to(device),
                                          reduction="none", backend=backend,
                                          return_stats=("predicted", "correct"))
    expected = (x @ W.t()).argmax(1)
    assert torch.equal(st.predicted.cpu(), expected)
    assert torch.equal(st.correct.cpu(), expected == t)


@pytest.mark.parametrize("device,backend", backend_params())
def test_masked_classes(device, backend):
    """Classes masked at -inf (bias): finite statistics and gradients, equal to float64 torch on
    the model without those classes; the masked rows of the weight and bias get 0."""
    H, C, masked = 8, 20, [2, 7, 11]
    keep = [c for c in range(C) if c not in masked]
    x, W, b, _ = make(lead=(13,), H=H, C=C, bias=True)
    b[masked] = float("-inf")
    t = torch.tensor(keep)[torch.randint(0, len(keep), (13,))]
    t[4] = -100
    kw = dict(logit_scale=0.9, z_loss=1e-3)
    params = [p.to(device).requires_grad_() for p in (x, W, b)]
    loss, st = nllfused.linear_cross_entropy(params[0], params[1], t.to(device), params[2],
                                             backend=backend, reduction="none",
                                             return_stats=("entropy", "target_logprob"), **kw)
    (loss.sum() - 0.1 * st.entropy.sum() - st.target_logprob.sum()).backward()
    # The oracle: the same model without the masked classes (targets renumbered).
    renumber = torch.full((C,), -100)
    renumber[keep] = torch.arange(len(keep))
    tk = torch.where(t == -100, t, renumber[t.clamp(min=0)])
    xr, Wr, br = (p.detach().double().requires_grad_() for p in (x, W[keep], b[keep]))
    z = transformed(xr, Wr, br, torch.float64, **kw)
    rows = stat_rows(z, tk, **kw)
    counted = tk != -100
    ref_loss = F.cross_entropy(z, tk, reduction="none") + torch.where(counted, rows["z_loss"],
                                                                       0.0)
    ref_tlp = torch.where(counted, rows["target_logprob"], 0.0)
    (ref_loss.sum() - 0.1 * rows["entropy"].sum() - ref_tlp.sum()).backward()
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(st.entropy.double().cpu(), rows["entropy"].detach(), **tol)
    torch.testing.assert_close(st.target_logprob.double().cpu(), ref_tlp.detach(), **tol)
    torch.testing.assert_close(params[0].grad.double().cpu(), xr.grad, **tol)
    torch.testing.assert_close(params[1].grad.double().cpu()[keep], Wr.grad, **tol)
    torch.testing.assert_close(params[2].grad.double().cpu()[keep], br.grad, **tol)
    assert bool((params[1].grad[masked] == 0).all()) and bool((params[2].grad[masked] == 0).all())


@pytest.mark.parametrize("backend", backends_here("cpu", only=("cpu", "torch")))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    """Not triton: its interpreter cannot run under torch.compile's tracing."""
    torch._dynamo.reset()
    x, W, b, t, kw = case(OPTIONS["all"], lead=(5, 7))

    def fn(x, W, b):
        loss, st = L.linear_cross_entropy(x, W, t, b, reduction=reduction, backend=backend,
                                          return_stats=True, **kw)
        return loss, st.entropy, st.target_logprob, st.correct, st.predicted, st.lse

    def run(f):
        params = fresh_params(x, W, b)
        out = f(*params)
        (out[0].sum() - 0.01 * out[1].sum() - out[2].sum()).backward()
        return list(out) + [p.grad for p in params]

    eager = run(fn)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


def test_torch_compile_lse_and_z_loss():
    """return_z_loss / return_lse keep the ordinary op under torch.compile too."""
    torch._dynamo.reset()
    x, W, b, t, _ = case({})

    def fn(x, W, b):
        return L.linear_cross_entropy(x, W, t, b, z_loss=1e-3, return_z_loss=True,
                                      return_lse=True)

    def run(f):
        params = fresh_params(x, W, b)
        out = f(*params)
        out[0].backward()
        return list(out) + [p.grad for p in params]

    for e, c in zip(run(fn), run(torch.compile(fn, fullgraph=True, backend="aot_eager"))):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


def test_module_return_stats():
    H, C = 16, 29
    module = nllfused.LinearCrossEntropyLoss(H, C, bias=True, reduction="none",
                                             logit_scale=1 / 0.7,
                                             return_stats=("entropy", "target_logprob"))
    x, _, _, t = make(H=H, C=C)
    loss, st = module(x, t)
    kw = dict(logit_scale=1 / 0.7)
    W, b = module.linear.weight.detach(), module.linear.bias.detach()
    check_stats(st, x, W, b, t, "none", names=("entropy", "target_logprob"), **kw)
    (loss.sum() - st.entropy.sum()).backward()
    assert module.linear.weight.grad is not None and module.linear.bias.grad is not None


def test_names_are_checked_and_probability_targets_pass_through():
    x, W, b, t, _ = case({})
    with pytest.raises(ValueError, match="unknown statistic"):
        L.linear_cross_entropy(x, W, t, b, return_stats=("entropy", "perplexity"))
    with pytest.raises(TypeError, match="return_stats"):
        L.linear_cross_entropy(x, W, t, b, return_stats=3)
    # Probability targets take nllfused.cross_entropy's path, statistics included.
    q = torch.softmax(torch.randn(37, W.shape[0]), 1)
    _, st = L.linear_cross_entropy(x, W, q, b, reduction="none", return_stats=True)
    assert st.target_logprob is None and st.correct is None
    rows = stat_rows(transformed(x, W, b, torch.float64), t)
    assert_matches_oracle(st.entropy, rows["entropy"], torch.float32,
                          stat_rows(transformed(x, W, b, torch.float32), t)["entropy"], "entropy")


def test_autocast_bfloat16(path):
    x, W, b, t, kw = case({})
    params = fresh_params(x, W, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, st = L.linear_cross_entropy(params[0], params[1], t, params[2],
                                          return_stats=True)
    assert loss.dtype == torch.float32 and st.entropy.dtype == torch.float32
    (loss - 0.1 * st.entropy + st.target_logprob).backward()
    assert all(p.grad.dtype == torch.float32 for p in params)
    low = torch_stats(x, W, b, t, torch.bfloat16, "mean", torch.float32)
    oracle = torch_stats(x, W, b, t, torch.float64, "mean")
    for name in FLOAT_STATS:
        assert_matches_oracle(getattr(st, name), oracle[name], torch.bfloat16, low[name], name)


@pytest.mark.parametrize("backend", backends_here("cpu", only=("cpu", "torch")))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_opcheck(backend, dtype):
    """torch.library.opcheck of nllfused::linear_ce_stats and its backward op (schema, fake,
    autograd registration, AOT dispatch)."""
    x, W, b, t = make(lead=(11,), H=6, C=7, bias=True, dtype=dtype)
    t[2] = -100
    w = torch.rand(7)
    options = (-100, 0.1, 0.9, 3.0, False, backend, 4)
    args = (x.requires_grad_(), W.requires_grad_(), b.requires_grad_(), t, w, *options, True,
            True)
    torch.library.opcheck(torch.ops.nllfused.linear_ce_stats.default, args)
    _, lse, aux, entropy, _, _ = torch.ops.nllfused.linear_ce_stats(
        x.detach(), W.detach(), b.detach(), t, w, *options, True, False)
    for g_lse, g_ent, g_tlp in ((None, None, None), (torch.randn(11, dtype=torch.float64),
                                                     torch.randn(11), torch.randn(11))):
        torch.library.opcheck(torch.ops.nllfused.linear_ce_stats_bwd.default,
                              (torch.randn(11), g_lse, g_ent, g_tlp, x.detach(), W.detach(),
                               None, t, w, lse, aux, entropy, *options, True, True, False))


# --- memory: still no (N, C) tensor -------------------------------------------------------------

def _inside(op):
    def rule(mode, func, types, args, kwargs):
        mode.seen_inside = True
        with mode:
            return op._init_fn(*args, **kwargs)
    return rule


L._linear_ce_stats.register_torch_dispatch(Allocations, _inside(L._linear_ce_stats))
L._linear_ce_stats_bwd.register_torch_dispatch(Allocations, _inside(L._linear_ce_stats_bwd))


@pytest.mark.parametrize("backend", backends_here("cpu", only=("cpu", "torch")))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_the_logits(monkeypatch, backend, reduction):
    monkeypatch.setattr(L, "CHUNK_ROWS", 16)
    N, H, C = 640, 32, 512
    x, W, b, t = make(lead=(N,), H=H, C=C, bias=True)
    params = [p.requires_grad_() for p in (x, W, b)]
    with Allocations() as mode:
        loss, st = L.linear_cross_entropy(*params[:2], t, params[2], reduction=reduction,
                                          label_smoothing=0.1, backend=backend, softcap=20.0,
                                          return_stats=True)
        (loss.sum() - 0.1 * st.entropy.sum() + st.target_logprob.sum()).backward()
    assert mode.seen_inside
    assert mode.largest <= max(16 * C, C * H, N * H), mode.largest


# --- the example ----------------------------------------------------------------------------------

def test_grpo_example_runs():
    spec = importlib.util.spec_from_file_location(
        "grpo_loss", os.path.join(ROOT, "examples", "grpo_loss.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--groups", "2", "--group-size", "3", "--tokens", "9", "--hidden", "16",
                           "--vocab", "50", "--chunk", "8"])
    assert report["ok"], report
