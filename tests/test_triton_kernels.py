"""The Triton kernels' launch paths (kernels/cross_entropy.py) against the float64 oracle: the
split-row path (few long rows, each shared by several programs and merged by a second kernel),
the launch shapes of very short rows, and the exactness of the per-lane online softmax that is
merged once after the class loop (confident rows, -inf, large offsets, the lowest float).

On a machine without a GPU, Triton's interpreter runs them: the sizes here are the smallest
that force each path (row_splits takes 132 SMs there).
"""
import pytest
import torch

import nllfused
from helpers import backend_params, check_cross_entropy
from reference import assert_matches_oracle, reference

TRITON = backend_params(only=("triton",))
pytestmark = pytest.mark.skipif(not TRITON, reason="needs a GPU or Triton's interpreter")

if TRITON:
    from nllfused.kernels import cross_entropy
    from nllfused.kernels.cross_entropy import launch_config, row_splits

LOWEST = {dtype: torch.finfo(dtype).min for dtype in (torch.float32, torch.float64)}


def splits_for(x, device):
    """How many programs share each row of x (N, C) in the forward and backward launches."""
    R, C = x.shape
    block_r, block_c, _ = launch_config(R, C, x.element_size())
    return row_splits(R, C, block_r, block_c, torch.device(device))


def hard_long_rows(dtype, C):
    """Rows whose lanes and splits must merge exactly: a confident row (its loss ~ C e^-30 is
    kept by log1p), a 1e4 offset, a row whose first half is -inf (whole splits see nothing)."""
    x = torch.randn(4, C) * 3
    t = torch.randint(0, C // 2, (4,))
    x[0, t[0]] += 30
    x[1] += 1e4
    x[2, : C // 2] = float("-inf")
    t[2] = C - 1
    return x.to(dtype), t


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": "rand"},
                                     {"softcap": 20.0, "logit_scale": 0.5}],
                         ids=["plain", "smoothing_weight", "softcap_scale"])
def test_split_rows_match_the_oracle(device, backend, dtype, options):
    x, t = hard_long_rows(dtype, C=20000)
    assert splits_for(x, device) > 1   # the path under test
    if options.get("weight") == "rand":
        options = dict(options, weight=torch.rand(x.shape[1]) + 0.1)
    check_cross_entropy(x, t, device, backend, reduction="none", **options)


@pytest.mark.parametrize("device,backend", TRITON)
def test_split_rows_with_probability_targets(device, backend):
    x = torch.randn(3, 20000) * 3 + 1e4
    q = torch.softmax(torch.randn(3, 20000) * 4, dim=1)
    assert splits_for(x, device) > 1
    check_cross_entropy(x, q, device, backend, reduction="none", label_smoothing=0.05)


@pytest.mark.parametrize("device,backend", TRITON)
def test_split_rows_merged_over_several_steps(device, backend, monkeypatch):
    """More splits than the merge kernel takes per step (made so by merging 2 per step), and
    the z-loss's lse gradient through the split backward."""
    monkeypatch.setattr(cross_entropy, "MERGE_BLOCK", 2)
    x, t = hard_long_rows(torch.float32, C=33000)
    assert splits_for(x, device) > 2
    check_cross_entropy(x, t, device, backend, reduction="sum", z_loss=1e-3)


@pytest.mark.parametrize("device,backend", TRITON)
def test_split_rows_are_deterministic(device, backend):
    x, t = hard_long_rows(torch.float32, C=20000)
    assert splits_for(x, device) > 1
    x, t = x.to(device).requires_grad_(), t.to(device)
    runs = []
    for _ in range(2):
        loss = nllfused.cross_entropy(x, t, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        runs.append((loss, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [10, 3, 32])
def test_small_class_counts(device, backend, dtype, C):
    x = (torch.randn(300, C) * 3).to(dtype)
    t = torch.randint(0, C, (300,))
    t[::7] = -100
    block_r, block_c, warps = launch_config(300, C, x.element_size())
    assert block_r > 1 and block_r * block_c <= 512 and warps == 4   # 4 logits per thread
    check_cross_entropy(x, t, device, backend, reduction="mean", label_smoothing=0.1,
                        weight=torch.rand(C) + 0.1)


@pytest.mark.parametrize("device,backend", TRITON)
def test_small_class_counts_spatial(device, backend):
    x = torch.randn(4, 10, 300) * 3          # segmentation: classes strided, rows adjacent
    t = torch.randint(0, 10, (4, 300))
    x[0, :, :5] += 1e4
    check_cross_entropy(x, t, device, backend, reduction="none")


def lane_edge_rows(dtype, C):
    """Rows at the edges of the per-lane state: a confident row, a 1e4 offset, -inf logits, a
    row entirely -inf (NaN, as torch), one +inf logit (NaN), a logit at the lowest finite
    float (the lanes' starting max) that is not the max, ties at the max (all logits equal; a
    confident row's max twice)."""
    x = torch.randn(9, C, dtype=torch.float64) * 3
    t = torch.randint(0, C, (9,))
    x[0, t[0]] += 30
    x[1] += 1e4
    x[2, ::3] = float("-inf")
    t[2] = 1
    x[3] = float("-inf")
    x[4, 5] = float("inf")
    x[5, C - 1] = LOWEST[dtype]
    x[6, 1:] = float("-inf")
    t[6] = 0
    x[7] = 2.5
    x[8, [2, C - 2]] = 40.0
    t[8] = 2
    return x.to(dtype), t


def lowest_rows(dtype, C):
    """Rows whose max is the lowest finite float: a lane that never rose above its start still
    counts its logits there, tied or not."""
    x = torch.full((3, C), LOWEST[dtype], dtype=dtype)
    x[1, 1::2] = float("-inf")
    x[2, 1:] = float("-inf")
    return x, torch.tensor([C - 1, 0, 0])


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [37, 3000], ids=["short", "long"])
def test_lane_merge_edge_rows(device, backend, dtype, C):
    x, t = lane_edge_rows(dtype, C)
    check_cross_entropy(x, t, device, backend, reduction="none")
    # The loss only: at a max of -3e38 the float64 lse keeps none of log(k + s), so the
    # gradient, recomputed from the lse, cannot be judged there (as before the lanes).
    x, t = lowest_rows(dtype, C)
    ours = nllfused.cross_entropy(x.to(device), t.to(device), reduction="none", backend=backend)
    low = reference(x, t, reduction="none", dtype=dtype)[0] if dtype != torch.float64 else None
    assert_matches_oracle(ours, reference(x, t, reduction="none")[0], dtype, low)


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("C", [37, 20000], ids=["short", "split"])
def test_ignored_rows_are_exactly_zero(device, backend, C):
    """Ignored rows: loss and gradient exactly 0, whatever their logits (NaN, +inf)."""
    x = torch.randn(4, C)
    assert (splits_for(x, device) > 1) == (C > 37)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    t = torch.tensor([0, -100, -100, 2])
    xd = x.to(device).requires_grad_()
    loss = nllfused.cross_entropy(xd, t.to(device), reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.equal(loss[1:3].cpu(), torch.zeros(2))
    assert torch.equal(xd.grad[1:3].cpu(), torch.zeros(2, C))
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(xd.grad[[0, 3]]).all()


@pytest.mark.parametrize("device,backend", TRITON)
@pytest.mark.parametrize("C", [37, 20000], ids=["short", "split"])
def test_rows_with_inf(device, backend, C):
    """Rows holding +inf: lse +inf as torch.logsumexp (NaN where the row also holds a NaN, the
    rows read once more), the loss and the gradient NaN as torch's log_softmax makes them; on
    the lanes-merged and the split path."""
    x = torch.randn(5, C)
    assert (splits_for(x, device) > 1) == (C > 37)
    x[0, 1] = float("inf")
    x[1, [2, C - 1]] = float("inf")
    x[2, 3] = float("inf")
    x[2, C - 2] = float("nan")
    x[3, 0] = float("nan")
    t = torch.tensor([0, 2, 1, 1, 4])
    xd = x.to(device).requires_grad_()
    loss, lse = nllfused.cross_entropy(xd, t.to(device), reduction="none", backend=backend,
                                       return_lse=True)
    torch.testing.assert_close(lse.cpu().double(), torch.logsumexp(x.double(), 1),
                               equal_nan=True)
    loss.sum().backward()
    assert loss[:4].isnan().all() and torch.isfinite(loss[4])
    assert xd.grad[:4].isnan().all() and torch.isfinite(xd.grad[4]).all()


def test_launch_shapes():
    # Long rows: a program per row, 4 warps, 16 logits per thread per step (float64: 4).
    assert launch_config(8192, 128256, 2) == (1, 2048, 4)
    assert launch_config(8192, 128256, 4) == (1, 2048, 4)
    assert launch_config(8192, 128256, 8) == (1, 512, 4)
    # Short rows: a 512-logit tile, never more rows than there are.
    assert launch_config(1 << 20, 10, 4) == (32, 16, 4)
    assert launch_config(3, 10, 2) == (4, 16, 4)
    # Few long rows are split, in powers of two, each share still a few blocks long; many rows
    # or short rows are not.
    cpu = torch.device("cpu")
    assert row_splits(64, 256000, 1, 2048, cpu) == 8
    assert row_splits(1000, 256000, 1, 2048, cpu) == 1
    assert row_splits(64, 4000, 1, 2048, cpu) == 1
    assert row_splits(64, 10, 32, 16, cpu) == 1
