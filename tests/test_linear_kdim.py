"""K-dimensional fused linear cross-entropy (nllfused/linear_kdim.py): a linear_weight of shape
(C, *out_features, H), as torch.nn.functional.linear_cross_entropy and nn.LinearCrossEntropyLoss
(out_features) take it, judged against float64 torch on the materialised (N, C, *out_features)
logits, with torch's own result in the same dtype as the yardstick for float32 / bfloat16."""
import pytest
import torch
import torch.nn.functional as F

import nllfused
import nllfused.linear as L
from helpers import backend_params, tensors_to, with_class_weight
from reference import assert_matches_oracle, reference

OUT = (3, 2)

# name -> (bias, ignore fraction, loss kwargs, dtypes)
CASES = {
    "plain": (False, 0.0, {}, (torch.float32, torch.float64, torch.bfloat16)),
    "bias_weight_smoothing": (True, 0.2, {"weight": "rand", "label_smoothing": 0.1},
                              (torch.float32, torch.bfloat16)),
    "ignore_valid_class": (False, 0.3, {"ignore_index": 1, "weight": "rand"}, (torch.float32,)),
    # z-loss under 'mean': over the counted (n, d), the cross-entropy part over their weights
    "z_loss_weight": (True, 0.2, {"z_loss": 1e-2, "weight": "rand"}, (torch.float32,)),
    "scale_softcap": (False, 0.2, {"logit_scale": 1.7, "softcap": 3.0}, (torch.float32,)),
    "all_ignored": (True, 1.0, {"weight": "rand"}, (torch.float32,)),
    # (no counted row: the weights' rescaling for z-loss is 0 / 0, which must not reach the
    # gradient, 0)
    "all_ignored_z_loss": (True, 1.0, {"weight": "rand", "z_loss": 1e-2}, (torch.float32,)),
}


def make(name, dtype, N=9, H=8, C=7, out=OUT):
    bias, frac, kw, _ = CASES[name]
    kw = with_class_weight(kw, C)
    x = torch.randn(N, H).to(dtype)
    W = (torch.randn(C, *out, H) / H ** 0.5 * 2).to(dtype)
    b = torch.randn(C, *out).to(dtype) if bias else None
    t = torch.randint(0, C, (N, *out))
    t[torch.rand(t.shape) < frac] = kw.get("ignore_index", -100)
    return x, W, b, t, kw


def torch_k_dim(x, W, b, t, dtype, grad, reduction, **kw):
    """(loss, grad_x, grad_W, grad_b) by torch in `dtype`: the (N, C, *OUT) logits, then the
    oracle procedure of tests/reference.py on them (float64: the oracle)."""
    xd, Wd = x.detach().to(dtype), W.detach().to(dtype)
    logits = torch.einsum("nh,c...h->nc...", xd, Wd)
    if b is not None:
        logits = logits + b.detach().to(dtype)
    loss, g = reference(logits, t, reduction=reduction, dtype=dtype, grad=grad, **kw)
    gx = torch.einsum("nc...,c...h->nh", g, Wd)
    gW = torch.einsum("nc...,nh->c...h", g, xd)
    return loss, gx, gW, None if b is None else g.sum(0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("name,dtype", [pytest.param(n, d, id=f"{n}-{str(d)[6:]}")
                                        for n, c in CASES.items() for d in c[-1]])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_float64_torch(device, backend, name, dtype, reduction):
    check(*make(name, dtype), device, backend, reduction)


@pytest.mark.parametrize("device,backend", backend_params(only=("cpu", "torch")))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gradients_round_once(device, backend, dtype):
    """Many positions (8 x 4): the input's gradient is a sum over all of them, which must round
    to 16 bits once, as torch's one product does -- not once per position (linear_kdim.py)."""
    check(*make("plain", dtype, N=16, H=32, out=(8, 4)), device, backend, "mean")


def check(x, W, b, t, kw, device, backend, reduction):
    dtype = x.dtype
    grad = torch.randn(t.shape if reduction == "none" else ()).to(dtype).double()
    oracle = torch_k_dim(x, W, b, t, torch.float64, grad, reduction, **kw)
    low = (None,) * 4 if dtype == torch.float64 else torch_k_dim(x, W, b, t, dtype, grad,
                                                                 reduction, **kw)
    params = [p.to(device).requires_grad_() for p in (x, W) + (() if b is None else (b,))]
    ours = nllfused.linear_cross_entropy(params[0], params[1], t.to(device),
                                         params[2] if b is not None else None,
                                         reduction=reduction, backend=backend,
                                         **tensors_to(kw, device))
    assert ours.dtype == dtype and ours.shape == oracle[0].shape
    assert_matches_oracle(ours, oracle[0], dtype, low[0], "loss")
    ours.backward(grad.to(device, dtype))
    for what, p, want, theirs in zip(("grad input", "grad weight", "grad bias"), params,
                                     oracle[1:], low[1:]):
        assert p.grad.dtype == p.dtype and p.grad.shape == p.shape, what
        assert_matches_oracle(p.grad, want, dtype, theirs, what)


def test_same_as_torchs_function_and_module():
    """torch's own F.linear_cross_entropy and nn.LinearCrossEntropyLoss with out_features: same
    values, gradients and state_dict (probability targets included)."""
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 5, out_features=OUT, bias=True,
                                             label_smoothing=0.1, dtype=torch.float64)
    ours = nllfused.LinearCrossEntropyLoss(8, 5, out_features=OUT, bias=True,
                                           label_smoothing=0.1, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert "out_features=(3, 2)" in repr(ours)
    x = torch.randn(6, 8, dtype=torch.float64)
    index = torch.randint(0, 5, (6, *OUT))
    index[0, 1, 1] = -100
    prob = torch.rand(6, 5, *OUT, dtype=torch.float64).softmax(1)
    for t in (index, prob):
        a, b = theirs(x, t), ours(x, t)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        ga = torch.autograd.grad(a, list(theirs.parameters()))
        gb = torch.autograd.grad(b, list(ours.parameters()))
        for u, v in zip(gb, ga):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_statistics_per_position(reduction):
    """return_stats of a K-dimensional call: each statistic over the (n, d) rows as
    nllfused.cross_entropy gives it from the materialised logits (itself checked against
    float64 torch in tests/test_stats.py); return_z_loss / return_lse as there."""
    x, W, b, t, kw = make("bias_weight_smoothing", torch.float64)
    kw["z_loss"] = 1e-2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, st = nllfused.linear_cross_entropy(xa, W, t, b, reduction=reduction, return_stats=True,
                                             **kw)
    logits = torch.einsum("nh,cdeh->ncde", xb, W) + b
    ref, ref_st = nllfused.cross_entropy(logits, t, reduction=reduction, return_stats=True,
                                         backend="torch", **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for name in ref_st._fields:
        torch.testing.assert_close(getattr(st, name), getattr(ref_st, name), rtol=1e-10,
                                   atol=1e-12, msg=name)
    (ga,) = torch.autograd.grad(loss.sum() + st.entropy.sum() - st.target_logprob.sum(), xa)
    (gb,) = torch.autograd.grad(ref.sum() + ref_st.entropy.sum() - ref_st.target_logprob.sum(),
                                xb)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    _, z, lse = nllfused.linear_cross_entropy(x, W, t, b, reduction=reduction,
                                              return_z_loss=True, return_lse=True, **kw)
    torch.testing.assert_close(z, ref_st.z_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), 1), rtol=1e-10, atol=1e-12)


def test_compile_fullgraph_and_double_backward():
    x, W, b, t, kw = make("bias_weight_smoothing", torch.float64)

    def f(x, W, b):
        return nllfused.linear_cross_entropy(x, W, t, b, **kw)

    args = [v.clone().requires_grad_() for v in (x, W, b)]
    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(f, args)


def test_memory_one_position_at_a_time(monkeypatch):
    """The (N, C, *out_features) logits are never formed: the largest tensor made is one
    position's chunk, not N * C * D (tests/test_linear.py's Allocations)."""
    from test_linear import Allocations
    monkeypatch.setattr(L, "CHUNK_ROWS", 8)
    N, H, C = 64, 4, 50
    x = torch.randn(N, H, requires_grad=True)
    W = torch.randn(C, *OUT, H, requires_grad=True)
    t = torch.randint(0, C, (N, *OUT))
    with Allocations() as seen:
        nllfused.linear_cross_entropy(x, W, t, backend="torch").backward()
    assert seen.largest < N * C, seen.largest


def test_bad_shapes_raise_clear_errors():
    W = torch.randn(5, *OUT, 8)
    t = torch.randint(0, 5, (4, *OUT))
    cases = [
        ((torch.randn(8), W, t[0]), "batched input"),
        ((torch.randn(2, 4, 8), W, t), "batched input"),
        ((torch.randn(4, 7), W, t), "in_features"),
        ((torch.randn(4, 8), W, t[:, :, 0]), r"must have shape \(4, 3, 2\)"),
        ((torch.randn(4, 8), W, torch.rand(4, 5, 3)), r"must have shape \(4, 5, 3, 2\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            nllfused.linear_cross_entropy(*args)
    with pytest.raises(ValueError, match="linear_bias"):
        nllfused.linear_cross_entropy(torch.randn(4, 8), W, t, torch.randn(5))
    with pytest.raises(IndexError, match="out of bounds"):
        nllfused.linear_cross_entropy(torch.randn(4, 8), W, t + 5)


@pytest.mark.parametrize("device,backend", backend_params())
def test_counted_targets_weighing_nothing_with_smoothing(device, backend):
    """'mean' where every counted target's class weight is 0, with label smoothing: NaN, as
    torch (its NLL part 0 / 0 plus its smoothing part s / 0 = inf), not inf."""
    x, W, _, t, _ = make("plain", torch.float64)
    t = t.clamp(min=1)
    w = torch.zeros(W.shape[0], dtype=torch.float64)
    w[0] = 1.0  # no target is class 0
    kw = dict(weight=w, label_smoothing=0.2)
    assert F.linear_cross_entropy(x, W, t, **kw).isnan()
    ours = nllfused.linear_cross_entropy(x.to(device), W.to(device), t.to(device),
                                         backend=backend, **tensors_to(kw, device))
    assert ours.isnan()


def test_probability_targets_refuse_an_ignore_index_as_torch():
    x, W, _, _, _ = make("plain", torch.float64)
    q = torch.rand(x.shape[0], W.shape[0], *OUT, dtype=torch.float64).softmax(1)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
        F.linear_cross_entropy(x, W, q, ignore_index=-100)
    with pytest.raises(ValueError, match="ignore_index cannot be specified"):
        nllfused.linear_cross_entropy(x, W, q, ignore_index=-100)
