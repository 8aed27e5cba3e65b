"""The C++ CPU kernels' statistics (nllfused::ce_fwd_stats / ce_bwd_stats, csrc/cpu): entropy,
argmax, target log-probability and their gradients from the kernels' own pass, on every copy of
the kernels this machine can run (NLLFUSED_CPU_CAPABILITY) and every path they take (the lane
path of few classes, rows read in place, tiles of strided rows; ce_cpu_kernels.h), against
float64 torch on the materialised logits; and opcheck of the op pair."""
import pytest
import torch
import torch.nn.functional as F

import nllfused
from test_cpu_small_classes import capability, randn  # noqa: F401 (capability: a fixture)
from test_stats import assert_stat_close, check_flagged_stats, opcheck_stats_ops, oracle_rows

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")


# layout -> logits(C, dtype); with C <= 256 each takes the lane path, with C = 400 the rows
# path (unit class stride, read in place) or its tiles (strided classes).
LAYOUTS = {
    "2d": lambda C, d: randn((37, C), d),
    "2d_transposed": lambda C, d: randn((C, 37), d).t(),
    "kdim": lambda C, d: randn((3, C, 5, 7), d),           # D = 35 >= a tile of lanes
    "kdim_short": lambda C, d: randn((7, C, 3), d),        # D = 3
    "kdim_long": lambda C, d: randn((2, C, 600), d),      # the backward's tile groups
    "channels_last": lambda C, d: randn((2, C, 5, 7), d).contiguous(
        memory_format=torch.channels_last),
}
OPTIONS = {
    "plain": {},
    "all": {"weight": True, "label_smoothing": 0.1, "logit_scale": 1.3, "softcap": 8.0,
            "ignore_index": 1},
}


def make(layout, C, dtype, options):
    x = LAYOUTS[layout](C, dtype)
    kw = dict(OPTIONS[options])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, dtype=torch.float64 if dtype == torch.float64
                                  else torch.float32) + 0.1
    t = torch.randint(0, C, x.shape[:1] + x.shape[2:])
    t[torch.rand(t.shape) < 0.2] = kw.get("ignore_index", -100)
    return x, t, kw


def transformed(x, logit_scale=1.0, softcap=None, **_):
    z = x.double() * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("C", [3, 17, 40, 400])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_and_their_gradients(capability, layout, C, options, dtype):
    x, t, kw = make(layout, C, dtype, options)
    xo = x.clone().requires_grad_()
    loss, st = nllfused.cross_entropy(xo, t, reduction="none", backend="cpu", return_stats=True,
                                      **kw)
    expected = oracle_rows(x, t, **kw)
    for name in ("lse", "predicted", "entropy", "target_logprob", "correct"):
        value = getattr(st, name)
        if name == "target_logprob":  # 0 on ignored rows
            expected[name] = torch.where(t != kw.get("ignore_index", -100), expected[name], 0.0)
        assert_stat_close(name, value, expected[name], dtype)
    # the loss is the bits of the call without statistics
    plain = nllfused.cross_entropy(x, t, reduction="none", backend="cpu", **kw)
    assert torch.equal(loss, plain)
    if dtype == torch.bfloat16:
        return  # (a bf16 gradient is the float32 one rounded: the float32 case checks it)
    adv = torch.randn(t.shape, dtype=torch.float64)
    (loss.sum() - 0.05 * st.entropy.sum() - (adv.to(loss.dtype) * st.target_logprob).sum()
     ).backward()
    xr = x.detach().double().requires_grad_()
    rows = oracle_rows(xr, t, **kw)
    counted = t != kw.get("ignore_index", -100)
    w = kw.get("weight")
    ref_loss = F.cross_entropy(transformed(xr, **kw), t, weight=None if w is None else w.double(),
                               ignore_index=kw.get("ignore_index", -100),
                               label_smoothing=kw.get("label_smoothing", 0.0), reduction="none")
    (ref_loss.sum() - 0.05 * rows["entropy"].sum()
     - (adv * torch.where(counted, rows["target_logprob"], 0.0)).sum()).backward()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xo.grad.double(), xr.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("C", [17, 400, 9000])
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim_short"])
def test_statistics_not_asked_for(capability, layout, C, options, dtype):
    """with_entropy / with_predicted on every path of every copy (lanes, rows read in place --
    bf16 ones from their bits, several chunks at 9000 classes -- and tiles): the entropy's sum
    and the argmax's scan skipped, zeros in their place, the other outputs unchanged."""
    x, t, kw = make(layout, C, dtype, options)
    x[0, C // 2] = x.max() + 1  # an argmax past the first chunk
    if x.dim() == 2:
        x, t = x.unsqueeze(-1), t.unsqueeze(-1)
    w = kw.get("weight")
    args = (w, kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0),
            kw.get("logit_scale", 1.0), kw.get("softcap", 0.0), False)
    check_flagged_stats(torch.ops.nllfused.ce_fwd_stats, x, t, args)


@pytest.mark.parametrize("C", [40, 400])
def test_special_rows(capability, C):
    """Ties, NaN, +-inf on both paths: argmax as torch.argmax (the first maximum, the first
    NaN), entropy and target log-prob NaN where the softmax is, entropy 0 for one finite
    class; masked classes (-inf) add nothing and get a zero gradient."""
    x = torch.randn(8, C, dtype=torch.float64) * 2
    x[0, [3, 17]] = x[0].max() + 1
    x[1] = float("-inf")
    x[2, [9, 5]] = float("nan")
    x[3, [7, 30]] = float("inf")
    x[4] = float("-inf")
    x[4, 2] = 0.5
    x[5, [2, 7]] = float("-inf")
    x[6, 33] = float("nan")
    x[6, 20] = float("inf")
    x = x.float()
    t = torch.tensor([3, 0, 1, 7, 2, 11, 4, 5])
    _, st = nllfused.cross_entropy(x, t, reduction="none", backend="cpu", return_stats=True)
    expected = oracle_rows(x, t)
    assert torch.equal(st.predicted, expected["predicted"])
    for name in ("entropy", "target_logprob"):
        torch.testing.assert_close(getattr(st, name).double(), expected[name], rtol=2e-5,
                                   atol=2e-5, equal_nan=True, msg=lambda m: f"{name}: {m}")
    # lse as torch.logsumexp: +inf with a +inf logit (row 3), NaN with a NaN too (row 6)
    torch.testing.assert_close(st.lse.double(), torch.logsumexp(x.double(), 1), rtol=2e-5,
                               atol=2e-5, equal_nan=True)
    # row 5 alone, with a gradient: the masked classes get exactly 0
    xm = x[5:6].clone().requires_grad_()
    loss, st = nllfused.cross_entropy(xm, t[5:6], reduction="none", backend="cpu",
                                      return_stats=("entropy", "target_logprob"))
    (loss - 0.1 * st.entropy - 0.5 * st.target_logprob).sum().backward()
    assert torch.equal(xm.grad[0, [2, 7]], torch.zeros(2))
    assert bool(torch.isfinite(xm.grad).all())


@pytest.mark.parametrize("prob_target", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1e5, 3e6])
@pytest.mark.parametrize("C", [1, 40, 1000])
def test_entropy_of_peaked_rows(capability, C, offset, prob_target):
    """A row with one class 60 above the rest (a low temperature): its entropy, ~1e-22, to
    float32's relative accuracy -- never a residue of the exp of the class at the max (that
    made it -3e-13 at offset 0, +-1e-8 at 3e6), never below 0; 0 for one class.
    The truth is H = log1p(s) - T / (1 + s), s and T the sums of e^a and e^a a (a = z - max)
    over the other classes, in float64: float64's log_softmax itself rounds 1 + s to 1, and
    its -sum p log p loses log1p(s), 1/61 of H here (torch's float32 one too)."""
    x = torch.randn(64, C) + offset
    x[:, 0] += 60
    t = torch.rand(64, C).softmax(1) if prob_target else torch.zeros(64, dtype=torch.long)
    _, st = nllfused.cross_entropy(x, t, reduction="none", backend="cpu",
                                   return_stats=("entropy",))
    a = x.double() - x.double()[:, :1]
    e = torch.where(a < 0, a.exp(), 0.0)
    s, T = e.sum(1), (e * torch.where(a < 0, a, 0.0)).sum(1)
    expected = torch.log1p(s) - T / (1 + s)
    assert bool((st.entropy >= 0).all())
    # float32 sums of at most C / 32 terms a lane, each within a few ulps: 1e-5 of H
    torch.testing.assert_close(st.entropy.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("prob_target", [False, True])
@pytest.mark.parametrize("C", [11, 400])
def test_opcheck(prob_target, C):
    opcheck_stats_ops(torch.ops.nllfused.ce_fwd_stats, torch.ops.nllfused.ce_bwd_stats, "cpu",
                      prob_target, C)


def test_bad_statistics_gradients_are_refused():
    x = torch.randn(4, 7, 1)
    t = torch.randint(0, 7, (4, 1))
    loss, lse, aux, ent, tlp, pred = torch.ops.nllfused.ce_fwd_stats(
        x, t, None, -100, 0.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_entropy must be"):
        torch.ops.nllfused.ce_bwd_stats(torch.ones_like(loss), None, torch.ones(4, 2), None, x,
                                        t, None, lse, aux, ent, -100, 0.0, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_target_logp must be Float"):
        torch.ops.nllfused.ce_bwd_stats(torch.ones_like(loss), None, None,
                                        torch.ones(4, 1, dtype=torch.float64), x, t, None, lse,
                                        aux, ent, -100, 0.0, 1.0, 0.0, False)
    # and the op still works after the errors
    g = torch.ops.nllfused.ce_bwd_stats(torch.ones_like(loss), None, torch.ones_like(ent), None,
                                        x, t, None, lse, aux, ent, -100, 0.0, 1.0, 0.0, False)
    assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("prob_target", [False, True])
@pytest.mark.parametrize("layout", ["rows", "strided"])
@pytest.mark.parametrize("C", [5, 40, 400])
def test_lse_of_rows_with_inf_is_torchs_logsumexp(capability, prob_target, layout, C):
    """The ops' lse (csrc/ops.cpp) is torch.logsumexp of the row: +inf where a logit is +inf,
    NaN where the row also holds a NaN (the max sweep may keep the +inf and drop the NaN), on
    every CPU path (lanes and rows, unit and strided classes, index and probability targets);
    the loss of such rows NaN, as torch's log_softmax makes it."""
    x = torch.randn(6, C, 3, dtype=torch.float64)
    x[0, 1, 0] = float("inf")
    x[1, 2, 1] = float("inf")
    x[1, C - 1, 1] = float("nan")
    x[2, [0, C - 1], 2] = float("inf")
    x[3, 0, 0] = float("nan")
    x[3, C - 1, 0] = float("inf")
    x[4, :, 1] = float("-inf")
    x = x.float()
    if layout == "rows":
        x = x.permute(0, 2, 1).reshape(-1, C, 1).contiguous()
    t = (torch.rand(x.shape).softmax(1) if prob_target
         else torch.randint(0, C, (x.shape[0], x.shape[2])))
    loss, lse, _ = torch.ops.nllfused.ce_fwd(x, t, None, -100, 0.0, 1.0, 0.0, prob_target)
    expected = torch.logsumexp(x.double(), 1)
    torch.testing.assert_close(lse, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(loss.isnan(), ~expected.isfinite())
