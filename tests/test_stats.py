"""Statistics of a cross-entropy call (nllfused/stats.py) against float64 torch computed from the
materialised logits: argmax, softmax entropy, log_softmax at the target, logsumexp, the z-loss
term; their reductions; the gradients of entropy and target log-probability; the names of other
packages (return_z_loss, return_lse)."""
import pytest
import torch
import torch.nn.functional as F

import nllfused
from helpers import backend_params
from nllfused import stats
from reference import assert_matches_oracle

OPTIONS = [
    {},
    {"weight": "rand", "ignore_index": 1},
    {"label_smoothing": 0.2, "z_loss": 1e-3},
    {"logit_scale": 0.7, "softcap": 5.0},
    {"logit_scale": -0.7},  # (13 classes: the padding lanes of a block must stay -inf)
    {"weight": "rand", "label_smoothing": 0.1, "z_loss": 1e-2, "logit_scale": 1.3,
     "softcap": 8.0},
]


def oracle_rows(x, t, logit_scale=1.0, softcap=None, z_loss=0.0, ignore_index=-100, **_):
    """Per-row statistics in float64 from the materialised z, classes in dim 1."""
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    rows = {"lse": torch.logsumexp(z, 1), "predicted": z.argmax(1),
            "entropy": -torch.where(p == 0, 0.0, p * logp).sum(1)}
    rows["z_loss"] = z_loss * rows["lse"] ** 2
    if not t.is_floating_point():
        counted = t != ignore_index
        safe = torch.where(counted, t, 0)
        rows["target_logprob"] = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        rows["correct"] = counted & (rows["predicted"] == t)
    return rows


def oracle_reduce(rows, t, reduction, ignore_index=-100, **_):
    counted = torch.ones_like(rows["lse"], dtype=torch.bool) if t.is_floating_point() \
        else t != ignore_index
    out = {}
    for name, v in rows.items():
        if name == "predicted":
            out[name] = v
            continue
        if name in ("z_loss", "target_logprob"):
            v = torch.where(counted, v, 0.0)
        if reduction == "none":
            out[name] = v
        elif name == "correct":
            out[name] = v.sum() if reduction == "sum" else v.sum() / counted.sum()
        else:
            v = torch.where(counted, v, 0.0)
            out[name] = v.sum() if reduction == "sum" else v.sum() / counted.sum()
    return out


def case(shape, options, dtype, prob=False):
    C = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    kw = dict(options)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(C) + 0.1
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64), 1).to(dtype)
        kw.pop("ignore_index", None)
    else:
        t = torch.randint(0, C, shape[:1] + shape[2:])
        t[torch.rand(t.shape) < 0.25] = kw.get("ignore_index", -100)
    return x, t, kw


def assert_stat_close(name, ours, expected, dtype):
    if name in ("predicted", "correct") and ours.dtype in (torch.int64, torch.bool):
        assert ours.dtype == expected.dtype and torch.equal(ours.cpu(), expected), name
        return
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours.detach().double().cpu(), expected.double(), **tol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
def test_stats_match_float64_torch(device, backend, options, reduction, dtype):
    x, t, kw = case((9, 13, 2), options, dtype)
    loss, st = nllfused.cross_entropy(x.to(device), t.to(device), reduction=reduction,
                                      backend=backend, return_stats=True,
                                      **{k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in kw.items()})
    expected = oracle_reduce(oracle_rows(x, t, **kw), t, reduction, **kw)
    assert set(expected) == {n for n in stats.NAMES if getattr(st, n) is not None}
    for name, value in expected.items():
        assert_stat_close(name, getattr(st, name), value, dtype)
    # The loss is what it is without statistics.
    plain = nllfused.cross_entropy(x.to(device), t.to(device), reduction=reduction,
                                   backend=backend, **{k: v.to(device) if torch.is_tensor(v)
                                                       else v for k, v in kw.items()})
    if backend == "cpu" and reduction != "none":
        # The plain call takes the one-call op, which sums the rows in double and rounds once
        # (csrc/loss.cpp): within 1 ulp of the exact reduction. With statistics the call takes
        # the same op (2 ulp apart at most), but with z_loss / logit_scale / softcap the general
        # path, whose sums of the n rows in the loss's dtype are within (n + 1) / 2 ulp of the
        # exact ones -- two such sums with z_loss, and their sum rounded: (n + 3) ulp in all.
        eps = torch.finfo(dtype).eps
        extras = any(k in kw for k in ("z_loss", "logit_scale", "softcap"))
        rtol = (t.numel() + 3) * eps if extras else 2 * eps
        torch.testing.assert_close(loss, plain, rtol=rtol, atol=0)
    else:
        assert torch.equal(loss, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cpu_stats_keep_the_loss(dtype):
    """Rows of more classes than the lane path takes (C > 256): with and without statistics the
    per-row loss and the gradient are the same bits (test_stats_match_float64_torch checks the
    loss of lane-path rows)."""
    if "cpu" not in nllfused.available_backends("cpu"):
        pytest.skip("no C++ CPU backend")
    x, t, kw = case((33, 300, 3), {"label_smoothing": 0.1}, dtype)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    plain = nllfused.cross_entropy(xa, t, reduction="none", backend="cpu", **kw)
    loss, st = nllfused.cross_entropy(xb, t, reduction="none", backend="cpu", return_stats=True,
                                      **kw)
    assert torch.equal(loss, plain)
    g = torch.randn_like(plain)
    plain.backward(g)
    loss.backward(g)
    assert torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("device,backend", backend_params())
def test_stats_of_probability_targets(device, backend):
    x, q, kw = case((7, 6), {"label_smoothing": 0.1, "z_loss": 1e-3}, torch.float32, prob=True)
    _, st = nllfused.cross_entropy(x.to(device), q.to(device), backend=backend,
                                   reduction="none", return_stats=True, **kw)
    assert st.correct is None and st.target_logprob is None
    expected = oracle_reduce(oracle_rows(x, q, **kw), q, "none")
    for name in ("lse", "z_loss", "predicted", "entropy"):
        assert_stat_close(name, getattr(st, name), expected[name], torch.float32)
    with pytest.raises(ValueError, match="class-index targets"):
        nllfused.cross_entropy(x.to(device), q.to(device), backend=backend,
                               return_stats=("correct",))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_entropy_and_target_logprob_gradients(device, backend, reduction):
    """A policy-gradient loss with an entropy bonus, built from the statistics, backpropagates
    as float64 autograd through the materialised log_softmax does."""
    kw = dict(logit_scale=1 / 0.7, softcap=6.0, ignore_index=-100)
    x, t, _ = case((8, 11), {}, torch.float32)
    adv = torch.randn(8 if reduction == "none" else ())
    xo = x.to(device).requires_grad_()
    loss, st = nllfused.cross_entropy(xo, t.to(device), reduction=reduction, backend=backend,
                                      return_stats=("entropy", "target_logprob"), **kw)
    objective = -(adv.to(device) * st.target_logprob).sum() - 0.01 * st.entropy.sum() + loss.sum()
    objective.backward()

    xr = x.detach().double().requires_grad_()
    rows = oracle_rows(xr, t, **kw)
    ref = oracle_reduce(rows, t, reduction)
    ref_loss = F.cross_entropy(6.0 * torch.tanh(xr * kw["logit_scale"] / 6.0), t,
                               reduction=reduction)
    (-(adv.double() * ref["target_logprob"]).sum() - 0.01 * ref["entropy"].sum()
     + ref_loss.sum()).backward()
    torch.testing.assert_close(xo.grad.double().cpu(), xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("shape", [(8, 13), (3, 11, 5), (2, 300, 3)], ids=str)
def test_far_from_zero_float64(device, backend, shape):
    """float64 logits on an offset of 3e7 (p far from one-hot): the statistics and the gradients
    they and the loss give are float64 torch's to 1e-10, the saved lse's own rounding there
    (ulp 7.5e-9) entering none of them."""
    x, t, _ = case(shape, {}, torch.float64)
    x = x + 3e7
    xo = x.to(device).requires_grad_()
    loss, st = nllfused.cross_entropy(xo, t.to(device), reduction="sum", backend=backend,
                                      return_stats=("entropy", "target_logprob"))
    (loss + 0.3 * st.entropy - 0.7 * st.target_logprob).backward()
    xr = x.detach().clone().requires_grad_()
    ref = oracle_reduce(oracle_rows(xr, t), t, "sum")
    (F.cross_entropy(xr, t, reduction="sum") + 0.3 * ref["entropy"]
     - 0.7 * ref["target_logprob"]).backward()
    for name in ("entropy", "target_logprob"):
        assert_matches_oracle(getattr(st, name), ref[name], torch.float64, what=name)
    assert_matches_oracle(xo.grad, xr.grad, torch.float64, what="grad")


@pytest.mark.parametrize("device,backend", backend_params())
def test_names_of_other_packages(device, backend):
    x, t, _ = case((10, 7), {}, torch.float32)
    x, t = x.to(device), t.to(device)
    loss, z, lse = nllfused.cross_entropy(x, t, z_loss=1e-2, backend=backend,
                                          return_z_loss=True, return_lse=True)
    _, st = nllfused.cross_entropy(x, t, z_loss=1e-2, backend=backend, return_stats=True)
    assert torch.equal(z, st.z_loss)
    rows = oracle_rows(x.cpu(), t.cpu(), z_loss=1e-2)
    assert lse.shape == (10,)  # per row, whatever the reduction
    torch.testing.assert_close(lse.double().cpu(), rows["lse"], rtol=2e-6, atol=2e-6)
    assert torch.equal(loss, nllfused.cross_entropy(x, t, z_loss=1e-2, backend=backend))


def test_stat_names_are_checked():
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="unknown statistic"):
        nllfused.cross_entropy(x, t, return_stats=("entropy", "perplexity"))
    for bad in (3, {"lse": 1}):  # (a dict's keys are not taken for names)
        with pytest.raises(TypeError, match="return_stats"):
            nllfused.cross_entropy(x, t, return_stats=bad)
    _, st = nllfused.cross_entropy(x, t, return_stats="entropy")
    assert st.entropy is not None and st.lse is None and st.predicted is None


def test_stats_compile_fullgraph():
    x, t, _ = case((6, 9), {}, torch.float32)

    def f(x, t):
        loss, st = nllfused.cross_entropy(x, t, return_stats=True, z_loss=1e-3)
        return loss, st.entropy, st.target_logprob, st.correct

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, t), f(x, t)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend", backend_params())
def test_stats_of_special_rows(device, backend):
    """Ties, NaN, +-inf: argmax as torch.argmax (the first maximum, the first NaN), entropy as
    the materialised formula (NaN where the softmax is NaN, 0 for a single finite class)."""
    x = torch.randn(6, 40, dtype=torch.float64) * 2
    x[0, [3, 17]] = x[0].max() + 1
    x[1] = float("-inf")
    x[2, [9, 5]] = float("nan")
    x[3, 7] = float("inf")
    x[4] = float("-inf")
    x[4, 2] = 0.5
    x = x.float()
    t = torch.tensor([3, 0, 1, 7, 2, 11])
    _, st = nllfused.cross_entropy(x.to(device), t.to(device), reduction="none", backend=backend,
                                   return_stats=("predicted", "entropy"))
    expected = oracle_rows(x, t)
    assert torch.equal(st.predicted.cpu(), expected["predicted"])
    torch.testing.assert_close(st.entropy.double().cpu(), expected["entropy"], rtol=2e-5,
                               atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("C", [13, 3000])
def test_argmax_of_rows_with_nan_and_infinities(device, backend, C):
    """The argmax alone (no entropy) where NaN and +inf sit in later class blocks and other lanes
    than the max: the first NaN wins wherever it is, two +inf give the first (their softmax is
    NaN, yet no NaN logit), rows beside such rows keep their own argmax (torch.argmax)."""
    x = torch.randn(8, C)
    x[0, [C - 1, C // 2 + 1]] = float("nan")               # NaNs past the first block
    x[1, [C - 2, 1]] = float("inf")                        # two +inf
    x[2, C // 3] = 50.0
    x[2, C - 1] = float("nan")                             # a NaN after the max
    x[4, [2, C - 1]] = float("inf")
    x[4, C // 2] = float("nan")                            # +inf, then a NaN
    x[6] = float("-inf")
    x[6, C - 1] = float("nan")
    t = torch.zeros(8, dtype=torch.int64)
    _, st = nllfused.cross_entropy(x.to(device), t.to(device), reduction="none", backend=backend,
                                   return_stats="predicted")
    assert torch.equal(st.predicted.cpu(), torch.argmax(x, 1))


def opcheck_stats_ops(fwd, bwd, device, prob_target, C=11):
    """torch.library.opcheck of a statistics op pair (csrc/ops.cpp: ce_fwd_stats's contract):
    the forward, then the backward with each statistic's gradient alone and both."""
    x = torch.randn(5, C, 2, device=device, requires_grad=True)
    if prob_target:
        t = torch.softmax(torch.randn(5, C, 2, device=device), 1)
    else:
        t = torch.randint(0, C, (5, 2), device=device)
        t[0, 1] = -100
    w = torch.rand(C, device=device) + 0.1
    args = (x, t, w, -100 if not prob_target else -1, 0.1, 0.8, 4.0, prob_target)
    torch.library.opcheck(fwd, args)
    for flags in ((False, True), (True, False), (False, False)):  # with_entropy, with_predicted
        torch.library.opcheck(fwd, args + flags)
    loss, lse, aux, ent, tlp, pred = fwd(x.detach(), *args[1:])
    for ge, gt in ((torch.randn_like(ent), None), (None, torch.randn_like(tlp)),
                   (torch.randn_like(ent), torch.randn_like(tlp))):
        torch.library.opcheck(bwd, (torch.randn_like(loss), None, ge, gt, x.detach(), t, w, lse,
                                    aux, ent, *args[3:]))


@pytest.mark.parametrize("device,backend", backend_params(only=("triton", "cuda")))
@pytest.mark.parametrize("prob_target", [False, True])
def test_opcheck_stats_ops(device, backend, prob_target):
    """The Triton statistics ops, and on a GPU ce_fwd_stats / ce_bwd_stats' CUDA kernels (the
    CPU ones: tests/test_cpu_stats.py)."""
    from nllfused import ops
    fwd, bwd = ops.stats_for_backend(backend), ops.stats_backward_for_backend(backend)
    if fwd is None:
        pytest.skip("the extension was built without this backend's statistics ops")
    opcheck_stats_ops(fwd, bwd, device, prob_target)


def check_flagged_stats(fwd, x, t, args):
    """ce_fwd_stats's with_entropy / with_predicted (csrc/ops.cpp) on the call fwd(x, t, *args):
    each combination gives the full call's outputs bit for bit, but zeros for the entropy and
    argmax not asked for; and a zero entropy carries no gradient."""
    full = fwd(x, t, *args)
    for with_entropy in (False, True):
        for with_predicted in (False, True):
            out = fwd(x, t, *args, with_entropy=with_entropy, with_predicted=with_predicted)
            for i, name in enumerate(("loss", "lse", "aux", "entropy", "target_logp",
                                      "predicted")):
                asked = {"entropy": with_entropy, "predicted": with_predicted}.get(name, True)
                expected = full[i] if asked else torch.zeros_like(full[i])
                assert torch.equal(out[i], expected), (name, with_entropy, with_predicted)
    xg = x.detach().clone().requires_grad_()
    loss, _, _, entropy, tlp, _ = fwd(xg, t, *args, with_entropy=False)
    (loss.sum() + 3 * entropy.sum() + 0.5 * tlp.sum()).backward()
    xr = x.detach().clone().requires_grad_()
    loss, _, _, _, tlp, _ = fwd(xr, t, *args)
    (loss.sum() + 0.5 * tlp.sum()).backward()
    assert torch.equal(xg.grad, xr.grad)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("C", [11, 300])
def test_statistics_not_asked_for(device, backend, C):
    """The statistics op of every backend computes the entropy and the argmax only where asked
    (the kernels skip their work), zeros else, every other output unchanged."""
    from nllfused import ops
    fwd = ops.stats_for_backend(backend)
    if fwd is None:
        pytest.skip("this backend's kernels give no statistics")
    x = torch.randn(6, C, 3, device=device) * 3
    t = torch.randint(0, C, (6, 3), device=device)
    t[1, 2] = -100
    w = torch.rand(C, device=device) + 0.1
    check_flagged_stats(fwd, x, t, (w, -100, 0.1, 1.3, 6.0, False))


@pytest.mark.parametrize("device,backend", backend_params())
def test_masked_classes_get_zero_gradient(device, backend):
    """Classes masked at -inf (p = 0): finite entropy and target log-prob, and the gradient of a
    loss built from them equals float64 torch's on the logits without those classes, 0 on the
    masked ones (not 0 * inf = NaN)."""
    C, masked = 11, [2, 7]
    keep = [c for c in range(C) if c not in masked]
    x = torch.randn(9, C) * 2
    x[:, masked] = float("-inf")
    t = torch.tensor(keep)[torch.randint(0, len(keep), (9,))]
    t[3] = -100
    xd = x.clone().to(device).requires_grad_()
    loss, st = nllfused.cross_entropy(xd, t.to(device), reduction="none", backend=backend,
                                      return_stats=("entropy", "target_logprob"))
    (loss.sum() - 0.1 * st.entropy.sum() - 0.5 * st.target_logprob.sum()).backward()
    renumber = torch.full((C,), -100)
    renumber[keep] = torch.arange(len(keep))
    tk = torch.where(t == -100, t, renumber[t.clamp(min=0)])
    xr = x[:, keep].double().requires_grad_()
    rows = oracle_rows(xr, tk)
    counted = tk != -100
    ref_loss = F.cross_entropy(xr, tk, reduction="none")
    (ref_loss.sum() - 0.1 * rows["entropy"].sum()
     - 0.5 * torch.where(counted, rows["target_logprob"], 0.0).sum()).backward()
    assert_stat_close("entropy", st.entropy.cpu(), rows["entropy"], torch.float32)
    grad = xd.grad.cpu()
    assert torch.equal(grad[:, masked], torch.zeros(9, len(masked)))
    torch.testing.assert_close(grad[:, keep].double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not nllfused.build_info()["built"], reason="the C++ extension is not built")
def test_where_cuda_statistics_come_from(monkeypatch):
    """The cuda backend's statistics: the CUDA C++ kernels' own pass (ce_fwd_stats' CUDA kernels,
    tests/test_cuda_emulation_stats.py) where the extension was built with them; else Triton's
    statistics ops (one pass over the logits as well) where Triton loads; else the composed
    torch path (None)."""
    from nllfused import _extension, ops
    cuda_built = bool(nllfused.build_info().get("cuda"))
    assert ops._HAS_CUDA_STATS_OPS == cuda_built
    if cuda_built:
        assert ops.stats_for_backend("cuda") == torch.ops.nllfused.ce_fwd_stats
        assert ops.stats_backward_for_backend("cuda") == torch.ops.nllfused.ce_bwd_stats
        monkeypatch.setattr(ops, "_STATS_BACKENDS", ops._STATS_BACKENDS - {"cuda"})
    if _extension.TRITON_ERROR is None:
        assert ops.stats_for_backend("cuda") == torch.ops.nllfused.ce_fwd_stats_triton
        assert ops.stats_backward_for_backend("cuda") == torch.ops.nllfused.ce_bwd_stats_triton
    monkeypatch.setattr(_extension, "TRITON_ERROR", "no triton")
    assert ops.stats_for_backend("cuda") is None
    assert ops.stats_backward_for_backend("cuda") is None
    assert ops.triton_for_cuda("cuda") == "cuda" and ops.triton_for_cuda("cpu") == "cpu"


@pytest.mark.parametrize("extra", [dict(return_z_loss=True), dict(return_lse=True)], ids=str)
@pytest.mark.parametrize("return_stats", [True, ("entropy",)], ids=str)
def test_stats_and_appended_outputs_are_not_combined(extra, return_stats):
    """return_stats gives (loss, stats); return_z_loss / return_lse append to the loss: asked
    together, a clear error rather than one of them silently dropped."""
    x, t = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="pass one or the other"):
        nllfused.cross_entropy(x, t, z_loss=0.1, return_stats=return_stats, **extra)
    with pytest.raises(ValueError, match="pass one or the other"):
        nllfused.linear_cross_entropy(torch.randn(4, 3), torch.randn(7, 3), t,
                                      return_stats=return_stats, **extra)
    loss, st = nllfused.cross_entropy(x, t, z_loss=0.1, return_stats=return_stats)
    assert isinstance(st, nllfused.stats.CrossEntropyStats)
