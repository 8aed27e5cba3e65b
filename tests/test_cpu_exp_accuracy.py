"""The accuracy of the C++ CPU forward's exp on rows read in place (csrc/cpu/ce_cpu_forward.h,
fold): exp2_tiny's degree-5 polynomial (1.6e-7 relative) wherever a result is returned in float
-- ce_fwd's lse (float64), the statistics (float32), a float32 loss --, and a copy's lean exp2
(degree 4, 2.9e-6: NLLF_HAVE_EXP2_LEAN, the AVX2 copy) only where every result is rounded to 16
bits (the one-call op's bf16 / fp16 loss: Args::lean). Against float64 torch, on every copy of
the kernels this machine can run.

The rows make the polynomial's error visible: one class at the max (0, counted exactly) and
64 classes at bf16(-ln 2 / 2), u = -0.4987 in exp2's argument, near the end of the reduced range
where the degree-4 fit's error peaks (2.7e-6: lse 2.4e-6 off), the rest -inf (exact zeros). Few
terms a lane, so the float32 sums add ~1e-7, and a degree-5 exp leaves the lse ~2e-7 off."""
import math

import pytest
import torch

import nllfused
from test_cpu_small_classes import CAPABILITIES, capability, dtype_id  # noqa: F401

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")

C = 2048  # above every lane path's class limit: the rows path, in place
FLOAT_ERR = 1e-6  # the float32 sums, log1p and lse of these rows, degree-5 exp included
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def peaked_rows(dtype, n=4):
    x = torch.full((n, C), -math.inf, dtype=torch.float64)
    v = float(torch.tensor(-math.log(2) / 2).to(torch.bfloat16))
    for r in range(n):
        x[r, 0] = 0.0
        cols = torch.randperm(C - 1)[:64] + 1  # scattered over the row's chunks
        x[r, cols] = v
    return x.to(dtype)


def ce_fwd_lse(x):  # the op's logits are (N, C, D), its target (N, D)
    t = torch.zeros(x.shape[0], 1, dtype=torch.long)
    _, lse, _ = torch.ops.nllfused.ce_fwd(x.unsqueeze(-1), t, None, -100, 0.0, 1.0, 0.0, False)
    return lse.double().reshape(-1)


def oracle_lse(x):
    return torch.logsumexp(x.double(), 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ce_fwd_lse_takes_the_full_exp(capability, dtype):
    """ce_fwd returns its lse (float64): never the lean exp2, whatever the logits' dtype."""
    x = peaked_rows(dtype)
    err = (ce_fwd_lse(x) - oracle_lse(x)).abs().max().item()
    assert err <= FLOAT_ERR, f"ce_fwd lse off by {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("want", [True, "lse", "z_loss"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_statistics_take_the_full_exp(capability, dtype, want, reduction):
    """The statistics' lse and z-loss term, float32 for every dtype, whichever op gives them
    (the one-call statistics op, or ce_fwd's lse where only those two are asked for)."""
    x = peaked_rows(dtype)
    zc = 0.5 if want == "z_loss" else 0.0
    _, st = nllfused.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.long), z_loss=zc,
                                   reduction=reduction, backend="cpu", return_stats=want)
    lse = oracle_lse(x)
    if want == "z_loss":  # z_loss lse^2: off by ~2 z_loss lse d(lse)
        got, ref = st.z_loss.double(), zc * lse ** 2
        tol = 2 * zc * lse.abs().max().item() * FLOAT_ERR
    else:
        got, ref, tol = st.lse.double(), lse, FLOAT_ERR
    if reduction == "mean":
        ref = ref.mean()
    err = (got - ref).abs().max().item()
    assert err <= tol, f"statistics {want} off by {err:.3g}"


def test_float32_loss_from_16bit_logits_takes_the_full_exp(capability):
    """The one-call op with a float32 loss of bf16 logits (its `dtype`): no lean exp2 there."""
    x = peaked_rows(torch.bfloat16)
    t = torch.zeros(x.shape[0], dtype=torch.long)
    loss = torch.ops.nllfused.cross_entropy_loss(x, t, None, 2, -100, 0.0, dtype=torch.float32)
    assert loss.dtype == torch.float32
    err = abs(loss.item() - oracle_lse(x).sum().item())  # the target at the max: loss = lse
    assert err <= 4 * FLOAT_ERR, f"float32 loss off by {err:.3g}"


LEAN_ERR = 2.9e-6  # the lean exp2's relative error bound (csrc/cpu/kernels_avx2.cpp)
LEAN_COPIES = {"avx2"}  # the copies with NLLF_HAVE_EXP2_LEAN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("rows", ["peaked", "random"])
def test_lean_exp_within_its_bound(capability, monkeypatch, dtype, rows):
    """NLLFUSED_CPU_LEAN_EXP=1 lets every 16-bit forward take the lean exp2, ce_fwd included,
    whose float64 lse shows it (the one-call op's 16-bit loss takes it by itself and gives
    nothing in float): within 2.9e-6 (and the float sums' error) of float64 torch. The
    statistics keep degree 5 all the same (peaked rows). Random rows: LM-sized, N(0, 3^2),
    many terms a lane."""
    monkeypatch.setenv("NLLFUSED_CPU_LEAN_EXP", "1")
    x = peaked_rows(dtype) if rows == "peaked" else (
        torch.randn(3, 32000, dtype=torch.float64) * 3).to(dtype)
    err = (ce_fwd_lse(x) - oracle_lse(x)).abs().max().item()
    assert err <= LEAN_ERR + FLOAT_ERR, f"lean lse off by {err:.3g}"
    if rows == "peaked" and capability in LEAN_COPIES:  # it ran: degree 5 leaves ~2e-7
        assert err > FLOAT_ERR, f"lean lse off by only {err:.3g}: the lean exp2 did not run"
    if rows == "peaked":
        _, st = nllfused.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.long),
                                       reduction="none", backend="cpu", return_stats=True)
        err = (st.lse.double() - oracle_lse(x)).abs().max().item()
        assert err <= FLOAT_ERR, f"statistics lse off by {err:.3g} under NLLFUSED_CPU_LEAN_EXP"
