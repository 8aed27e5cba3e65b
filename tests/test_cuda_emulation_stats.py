"""The CUDA backend's statistics (ce_fwd_stats / ce_bwd_stats: the kernels' kStats variants),
run on the CPU by the host emulation of tests/test_cuda_emulation.py (tests/cuda_emulation/emu.cu):
entropy, argmax and the target's log-probability from the forward's own pass, and their
gradients, through every mapping the kernels have (row groups of every G, rows split in pieces,
the tile mapping), against float64 torch on the materialised logits.

Skipped where the emulator cannot be built (no CUDA build of torch, no nvcc)."""
import pytest
import torch

from test_cuda_emulation import BF16, F16, F32, F64, Case, emu, make_logits, rows_of  # noqa: F401
from test_stats import oracle_rows

# (force_tile, force_G, force_ty, max_blocks, force_parts) as emu.cu takes them: the launch
# choose_launch picks, a small G, a block per row, rows split in pieces, the tile mapping.
FORCES = {"auto": (-1, 0, 0, 0, 0), "G4": (0, 4, 0, 1, 0), "G256": (0, 256, 0, 2, 0),
          "parts3": (0, 0, 0, 0, 3), "tile": (1, 0, 0, 0, 0), "tile4": (1, 0, 4, 1, 0)}
# Options: plain (the kStats kernel), everything (the kRuntime | kStats catch-all), probability
# targets (kRuntime | kProb | kStats).
OPTIONS = {"plain": {}, "all": dict(weight=True, label_smoothing=0.1, logit_scale=1.3,
                                    softcap=8.0, ignore_index=1),
           "prob": dict(prob=True, logit_scale=0.7)}
LAYOUTS = {"contig": 1, "offset": 1, "btv": 3, "cstride": 2}


def transformed(x, logit_scale=1.0, softcap=None, **_):
    """z of (rows, C) logits in float64."""
    z = x.double() * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def make_case(layout, C, dtype, options, extreme=""):
    kw = dict(OPTIONS[options])
    prob = kw.pop("prob", False)
    c = Case(N=6, C=C, D=LAYOUTS[layout], dtype=dtype, layout=layout)
    x = make_logits(c)
    acc = F64 if dtype == F64 else F32
    if extreme == "ties":  # integer logits: several classes at each row's max
        x.copy_(torch.randint(-3, 3, x.shape).to(dtype))
    elif extreme == "special":  # a NaN row (argmax: its first NaN), an all -inf row, masks
        x[0, C // 3] = float("nan")
        x[0, C // 2] = float("nan")
        x[1] = float("-inf")
        x[2:].masked_fill_(torch.rand(x[2:].shape) < 0.3, float("-inf"))
    if prob:
        t = torch.softmax(torch.randn(c.N, C, c.D, dtype=F64) * 2, 1).to(F32)
    else:
        t = torch.randint(0, C, (c.N, c.D))
        t[torch.rand(t.shape) < 0.25] = kw.get("ignore_index", -100)
        if extreme == "special":  # finite targets on the masked rows
            for n in range(2, c.N):
                for d in range(c.D):
                    if t[n, d] >= 0 and x[n, t[n, d], d] == float("-inf"):
                        x[n, t[n, d], d] = 0.5
    w = (torch.rand(C) + 0.5).to(acc) if kw.pop("weight", False) else None
    return c, x, t, w, kw, prob


def emu_args(kw, prob, force):
    return (kw.get("ignore_index", -100), kw.get("label_smoothing", 0.0),
            kw.get("logit_scale", 1.0), kw.get("softcap") or 0.0, prob, *FORCES[force])


def expected_rows(c, x, t, kw, prob):
    """The float64 statistics per row (N*D,): entropy, target log-prob (0 on ignored rows and
    for probability targets), argmax."""
    xr = rows_of(x)
    tr = None if prob else t.reshape(-1)
    rows = oracle_rows(xr, rows_of(t) if prob else tr, **kw)
    if prob:
        tlp = torch.zeros(xr.shape[0], dtype=F64)
    else:
        tlp = torch.where(tr != kw.get("ignore_index", -100), rows["target_logprob"], 0.0)
    return rows["entropy"], tlp, rows["predicted"]


def check_close(name, ours, expected, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(ours.double(), expected.double(), **tol, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("force", FORCES)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout,C", [("contig", 5), ("offset", 700), ("btv", 77),
                                      ("cstride", 300), ("contig", 4099)])
def test_forward_statistics(emu, layout, C, dtype, options, force):
    c, x, t, w, kw, prob = make_case(layout, C, dtype, options)
    args = emu_args(kw, prob, force)
    out = emu.fwd_stats(x, t, w, *args)
    loss, lse, aux, entropy, tlp, pred, cfg = out
    plain = emu.fwd(x, t, w, *args)
    where = f"launch (tile, G, threads|TY, blocks, pieces, F) = {cfg.tolist()}"
    assert cfg[5] & 128, f"not a kStats kernel: {where}"
    # the loss, lse and aux as the kernels without statistics give them
    for name, ours, theirs in (("loss", loss, plain[0]), ("lse", lse, plain[1]),
                               ("aux", aux, plain[2])):
        torch.testing.assert_close(ours, theirs, rtol=1e-6 if dtype != F64 else 1e-12, atol=0,
                                   msg=lambda m: f"{name} ({where}): {m}")
    e_ent, e_tlp, e_pred = expected_rows(c, x, t, kw, prob)
    check_close(f"entropy ({where})", entropy.reshape(-1), e_ent, dtype)
    check_close(f"target_logp ({where})", tlp.reshape(-1), e_tlp, dtype)
    assert pred.dtype == torch.int64 and torch.equal(pred.reshape(-1), e_pred), where


@pytest.mark.parametrize("force", ["auto", "G4", "parts3", "tile4"])
@pytest.mark.parametrize("extreme", ["ties", "special"])
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=lambda d: str(d)[6:])
def test_forward_statistics_of_special_rows(emu, dtype, extreme, force):
    """Ties for the max (argmax: the first), NaN (argmax: the first NaN; entropy NaN), an all
    -inf row (entropy NaN, argmax 0) and -inf classes (p = 0: no 0 * -inf in the entropy)."""
    c, x, t, w, kw, prob = make_case("contig", 1500, dtype, "plain", extreme)
    loss, lse, aux, entropy, tlp, pred, cfg = emu.fwd_stats(x, t, w, *emu_args(kw, prob, force))
    e_ent, e_tlp, e_pred = expected_rows(c, x, t, kw, prob)
    where = f"launch {cfg.tolist()}"
    check_close(f"entropy ({where})", entropy.reshape(-1), e_ent, dtype)
    check_close(f"target_logp ({where})", tlp.reshape(-1), e_tlp, dtype)
    assert torch.equal(pred.reshape(-1), e_pred), where


def test_target_log_prob_of_a_target_out_of_range_is_nan(emu):
    c, x, t, w, kw, prob = make_case("contig", 50, F32, "plain")
    t[0, 0] = 50
    t[1, 0] = -3
    *_, tlp, pred, cfg = emu.fwd_stats(x, t, w, *emu_args(kw, prob, "auto"))
    assert tlp[0, 0].isnan() and tlp[1, 0].isnan()
    assert not tlp[2:].isnan().any()


def expected_grad(c, x, t, w, kw, prob, g_ent, g_tlp):
    """d/dx of sum_r (g_ent[r] H_r + g_tlp[r] log p_y(r)) in float64, (N, C, D)."""
    xr = rows_of(x).double().requires_grad_(True)
    z = transformed(xr, **kw)
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    ent = -torch.where(p == 0, 0.0, p * logp).sum(1)
    total = (ent * g_ent.reshape(-1).double()).sum() if g_ent is not None else (0 * z).sum()
    if g_tlp is not None and not prob:
        tr = t.reshape(-1)
        counted = tr != kw.get("ignore_index", -100)
        tlp = logp.gather(1, torch.where(counted, tr, 0)[:, None]).squeeze(1)
        total = total + torch.where(counted, tlp * g_tlp.reshape(-1).double(), 0.0).sum()
    (gx,) = torch.autograd.grad(total, xr)
    return gx.view(c.N, c.D, c.C).permute(0, 2, 1)


@pytest.mark.parametrize("which", ["both", "entropy", "target"])
@pytest.mark.parametrize("force", ["auto", "G4", "parts3", "tile"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout,C", [("contig", 5), ("offset", 700), ("btv", 77),
                                      ("contig", 4099)])
def test_backward_statistics(emu, layout, C, dtype, options, force, which):
    """ce_bwd_stats = ce_bwd's gradient + the statistics' (float64 autograd), every row: the
    entropy's on ignored rows too, the target log-prob's on counted rows only."""
    c, x, t, w, kw, prob = make_case(layout, C, dtype, options)
    args = emu_args(kw, prob, force)
    acc = F64 if dtype == F64 else F32
    loss, lse, aux, entropy, *_ = emu.fwd_stats(x, t, w, *args)
    g = torch.randn(c.N, c.D, dtype=acc)
    g_ent = torch.randn(c.N, 2 * c.D, dtype=acc)[:, ::2] if which != "target" else None
    g_tlp = torch.randn(c.N, c.D, dtype=acc) if which != "entropy" else None
    grad, cfg = emu.bwd_stats(g, None, g_ent, g_tlp, x, t, w, lse, aux, entropy, *args)
    plain, _ = emu.bwd(g, None, x, t, w, lse, aux, *args)
    assert cfg[5] & 128, f"not a kStats kernel: launch {cfg.tolist()}"
    expected = plain.double() + expected_grad(c, x, t, w, kw, prob, g_ent, g_tlp)
    # the gradient's scale per row: what multiplies p (the loss's, the entropy's |log p| ~ log C)
    scale = (g.abs() + (g_ent.abs() if g_ent is not None else 0) * 2 * torch.log(
        torch.tensor(float(C))) + (g_tlp.abs() if g_tlp is not None else 0)).double()
    scale = scale * max(1.0, kw.get("logit_scale", 1.0))
    tol = 1e-10 if dtype == F64 else 2e-6
    err = (grad.double() - expected).abs() / scale[:, None, :]
    assert err.max() <= tol, f"launch {cfg.tolist()}: max error {err.max():.3g} of the row scale"


def test_backward_without_statistics_gradients_is_the_plain_one(emu):
    c, x, t, w, kw, prob = make_case("offset", 700, F32, "all")
    args = emu_args(kw, prob, "auto")
    loss, lse, aux, entropy, *_ = emu.fwd_stats(x, t, w, *args)
    g = torch.randn(c.N, c.D)
    grad, cfg = emu.bwd_stats(g, None, None, None, x, t, w, lse, aux, entropy, *args)
    plain, pcfg = emu.bwd(g, None, x, t, w, lse, aux, *args)
    assert torch.equal(grad, plain) and not cfg[5] & 128
