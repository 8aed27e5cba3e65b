"""The accuracy of the C++ CPU forward's exp on rows read in place (csrc/cpu/ce_cpu_forward.h,
fold): exp2_tiny's degree-5 polynomial (1.6e-7 relative) wherever a result is returned in float
-- ce_fwd's lse (float64), the statistics (float32), a float32 loss --, and a copy's lean exp2
(degree 4, 2.9e-6: NLLF_HAVE_EXP2_LEAN, the AVX2 copy) only where every result is rounded to 16
bits (the one-call op's bf16 / fp16 loss: Args::lean); and the plain step's exp2_affine (the
AVX2 copy) on rows far from 0 and around its clamp. Against float64 torch, on every copy of the
kernels this machine can run.

The rows make the polynomial's error visible: one class at the max (0, counted exactly) and
64 classes at bf16(-ln 2 / 2), u = -0.4987 in exp2's argument, near the end of the reduced range
where the degree-4 fit's error peaks (2.7e-6: lse 2.4e-6 off), the rest -inf (exact zeros). Few
terms a lane, so the float32 sums add ~1e-7, and a degree-5 exp leaves the lse ~2e-7 off."""
import math

import pytest
import torch

import nllfused
from helpers import check_cross_entropy
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


# The plain fold step's exp of 16-bit logits in a copy with exp2_affine (NLLF_HAVE_EXP2_AFFINE,
# the AVX2 copy; csrc/cpu/kernels_avx2.cpp) and the bf16 backward's p: n from the fma z log2 e + K, K holding
# the row's integer offset c = round(-ref log2 e), and a clamp at zmin, below which every term is
# exactly 0. Rows on both sides of kTinyRefMax (2^21, where the fold turns to vexp), and the
# hard rows: the clamp must turn -inf into 0, keep NaN, leave no garbage. The plain step runs in
# the chunks that do not hold the row's max so far: 256-class chunks (NLLFUSED_CPU_CHUNK) give
# the rows of 2048 classes seven or more of them.
FAR_OFFSETS = [0.0, 37.3, -1e3, 3e5, -3e5, 2.0e6, -2.0e6, 2.2e6, -2.2e6]
# Rows of many terms a lane: a float32 sum's rounding is bounded by C / 8 additions one after
# another (8 lanes, the fewest a copy has), 2^-24 each, relative to the sum, so absolute in its
# log (a wrong offset or shifter is off by ln 2 or more).
SUM_ERR = C // 8 * 2.0 ** -24 + FLOAT_ERR


@pytest.fixture(params=[None, "256"], ids=["chunk_auto", "chunk_256"])
def chunk(request, monkeypatch):
    if request.param:
        monkeypatch.setenv("NLLFUSED_CPU_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_ce_fwd_lse_of_rows_far_from_zero(capability, chunk, dtype):
    """ce_fwd's float64 lse of LM-like rows N(offset, 3^2) within the float sums' error, at
    offsets up to either side of 2^21 (bf16: the rows at its spacing there, 16384)."""
    x = torch.randn(len(FAR_OFFSETS), C, dtype=torch.float64) * 3
    x += torch.tensor(FAR_OFFSETS, dtype=torch.float64)[:, None]
    x = x.to(dtype)
    err = (ce_fwd_lse(x) - oracle_lse(x)).abs()
    assert err.max().item() <= SUM_ERR, f"lse off by {err.tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_ce_fwd_lse_of_clamped_classes(capability, chunk, dtype):
    """Classes just above and below the clamp (z - max ~ -88, where u = z log2 e + c reaches
    -127) and at -inf add nothing measurable, all -inf gives -inf, NaN gives NaN, one finite
    class gives itself; the max first, in a later chunk, and in the last."""
    x = torch.full((8, C), -math.inf, dtype=torch.float64)
    x[0, 0] = 1.5
    x[0, 1:1500] = 1.5 - 88.0 + torch.linspace(-2, 2, 1499, dtype=torch.float64)
    x[1, :1000] = torch.randn(1000, dtype=torch.float64)  # the rest -inf
    x[3, :] = torch.randn(C, dtype=torch.float64) - 1e3
    x[3, 1900] = math.nan
    x[4, 5] = -3.25  # one finite class: lse is that class
    x[5, ::3] = torch.randn(len(range(0, C, 3)), dtype=torch.float64)  # -inf between
    x[6, 700] = 4.0
    x[6, 800:] = 4.0 - 87.0 - torch.rand(C - 800, dtype=torch.float64) * 3
    x[7, :-1] = torch.randn(C - 1, dtype=torch.float64) - 90.0
    x[7, -1] = 0.0
    x = x.to(dtype)
    got, want = ce_fwd_lse(x), oracle_lse(x)
    assert math.isinf(got[2].item()) and got[2].item() < 0, "an all -inf row's lse is -inf"
    assert math.isnan(got[3].item()), "a NaN logit gives a NaN lse"
    assert got[4].item() == -3.25
    rows = [0, 1, 5, 6, 7]
    err = (got[rows] - want[rows]).abs().max().item()
    assert err <= SUM_ERR, f"lse off by {err:.3g}"


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [0.0, -1e3, 2.0e6])
def test_hard_rows_through_the_fold(capability, chunk, dtype, offset, reduction):
    """Loss and gradient against float64 torch for rows of C = 2048 classes (the rows path and
    its fold; mean: the one-call op, the lean exp2 for 16-bit logits) with the hard rows of
    test_cpu_small_classes (NaN, +inf, all -inf, masked classes, a confident row, an offset)."""
    from test_cpu_small_classes import hard_rows, targets
    if dtype == torch.float16 and abs(offset) > 6e4:
        pytest.skip("beyond float16's range")
    x = (torch.randn(9, C, dtype=torch.float64) * 3 + offset).to(dtype)
    x, t = hard_rows(x, targets(x))
    check_cross_entropy(x, t, "cpu", "cpu", reduction=reduction)
