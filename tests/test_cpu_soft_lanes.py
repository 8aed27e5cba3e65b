"""The CPU kernels' lane path for probability targets (csrc/cpu/ce_cpu_lanes_soft.h): each lane's
classes weighed by its own targets. On every copy of the kernels this machine can run, in every
layout of test_cpu_small_classes (one vector load per class, gathered tiles, partial tiles), with
class counts on both sides of the path's limits, targets of every float dtype, every option, and
NaN / infinite rows; judged against float64 torch (tests/reference.py). (That every copy gives the
same: test_cpu_small_classes.test_copies_agree.)"""
import pytest
import torch

import nllfused
from helpers import check_cross_entropy, dtype_id
from test_cpu_small_classes import CAPABILITIES, CLASS_COUNTS, LAYOUTS, rows_of

pytestmark = pytest.mark.skipif(not nllfused.build_info()["built"],
                                reason="the C++ extension is not built")


@pytest.fixture(params=CAPABILITIES)
def capability(request, monkeypatch):
    monkeypatch.setenv("NLLFUSED_CPU_CAPABILITY", request.param)
    assert nllfused._C.build_info()["cpu_capability"] == request.param
    return request.param


def soft_targets(x, dtype=None, zero_frac=0.3):
    """Class probabilities of x's shape (rows sum to 1 over dim 1), a fraction of them 0, in
    `dtype` (x's by default); the same layout as x, so that a K-dim tile's targets load as one
    vector per class where its logits do."""
    q = torch.rand(x.shape, dtype=torch.float64)
    q[torch.rand(x.shape) < zero_frac] = 0
    q = q + (q.sum(1, keepdim=True) == 0).double()  # no row without a class
    q = q / q.sum(1, keepdim=True)
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    out.copy_(q)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", CLASS_COUNTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_class_counts_and_layouts(capability, layout, C, dtype):
    x = LAYOUTS[layout](C, dtype)
    check_cross_entropy(x, soft_targets(x), "cpu", "cpu", reduction="none")


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float32,
                                          torch.float64], ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["2d", "kdim", "channels_last", "kdim_strided"])
def test_target_dtypes(capability, layout, dtype, target_dtype):
    """Targets in another dtype than the logits: read as they are (the loss's dtype promoted)."""
    x = LAYOUTS[layout](10, dtype)
    check_cross_entropy(x, soft_targets(x, target_dtype), "cpu", "cpu", reduction="none")


def contiguous_targets(x):
    """Targets of x's shape in the contiguous layout, whatever x's: a tile's targets then load
    otherwise than its logits."""
    return soft_targets(x).contiguous()


OPTIONS = {
    "smoothing": {"label_smoothing": 0.2},
    "weight": {"weight": "rand"},
    "smoothing_weight": {"label_smoothing": 0.1, "weight": "rand"},
    "smoothing_1": {"label_smoothing": 1.0},
    "logit_scale": {"logit_scale": 0.37},
    "softcap": {"softcap": 3.0, "logit_scale": 2.0},
    "z_loss": {"z_loss": 1e-2},
    "everything": {"softcap": 4.0, "label_smoothing": 0.1, "weight": "rand", "z_loss": 1e-3},
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim", "channels_last"])
def test_options(capability, layout, option, dtype, reduction):
    kwargs = dict(OPTIONS[option])
    C = 13
    x = LAYOUTS[layout](C, dtype)
    if kwargs.get("weight") == "rand":
        kwargs["weight"] = (torch.rand(C, dtype=torch.float64) + 0.1).to(
            torch.float64 if dtype == torch.float64 else torch.float32)
    check_cross_entropy(x, soft_targets(x), "cpu", "cpu", reduction=reduction, **kwargs)


@pytest.mark.parametrize("layout", ["kdim", "channels_last", "2d_transposed"])
def test_targets_laid_out_otherwise(capability, layout):
    x = LAYOUTS[layout](11, torch.float32)
    check_cross_entropy(x, contiguous_targets(x), "cpu", "cpu", reduction="none",
                        label_smoothing=0.1)


@pytest.mark.parametrize("C", [5, 17, 40, 300, 384])
@pytest.mark.parametrize("layout", ["2d", "2d_row_sliced"])
def test_targets_with_a_row_stride_of_their_own(capability, layout, C):
    """Targets whose rows are further apart than C (a slice of wider rows): the tiles' blocks of
    consecutive rows read them qN apart, not C."""
    x = LAYOUTS[layout](C, torch.float32)
    q = soft_targets(torch.empty(x.shape[0], C + 5))[:, :C]
    check_cross_entropy(x, q, "cpu", "cpu", reduction="none", label_smoothing=0.1)


def hard_rows(x):
    """Rows 0-4 made hard: a NaN logit, a +inf logit, all -inf, -inf classes that have target
    mass (loss +inf, gradient finite), a huge offset."""
    x = x.clone()
    x3, D = rows_of(x)

    def row(r):
        return x3[r // D, :, r % D]

    row(0)[-1] = float("nan")
    row(1)[0] = float("inf")
    row(2)[:] = float("-inf")
    row(3)[1:] = float("-inf")
    row(4)[:] += 1e4
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("C", [3, 17])
@pytest.mark.parametrize("layout", ["2d", "2d_transposed", "kdim", "kdim_short", "channels_last"])
def test_nan_and_infinite_rows(capability, layout, C, dtype):
    x = LAYOUTS[layout](C, dtype)
    q = soft_targets(x, zero_frac=0)  # every class has target mass
    check_cross_entropy(hard_rows(x), q, "cpu", "cpu", reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("layout", ["2d", "kdim", "channels_last"])
def test_classes_without_target_mass_at_minus_inf(capability, layout):
    """A class with q = 0 adds nothing, even where its logit is -inf (csrc/ops.cpp; torch's
    0 * -inf gives NaN there): the row's loss and gradient are those of the row without that
    class (float64 torch on the remaining classes)."""
    C = 9
    x = LAYOUTS[layout](C, torch.float32)
    q = soft_targets(x, zero_frac=0)
    x3, D = rows_of(x)
    q3 = q.unsqueeze(-1) if q.dim() == 2 else q.flatten(2)
    x3[0, 2, 0] = float("-inf")
    q3[0, :, 0] = q3[0, :, 0] / (1 - q3[0, 2, 0])
    q3[0, 2, 0] = 0
    xd = x.clone().requires_grad_()
    loss = nllfused.cross_entropy(xd, q, reduction="none", backend="cpu")
    loss.view(loss.shape[0], -1)[0, 0].backward()
    keep = [c for c in range(C) if c != 2]
    xr = x3[0, keep, 0].double().requires_grad_()
    ref = -(q3[0, keep, 0].double() * torch.log_softmax(xr, 0)).sum()
    ref.backward()
    torch.testing.assert_close(loss.view(loss.shape[0], -1)[0, 0].double(), ref.detach(),
                               rtol=1e-6, atol=1e-6)
    g3 = xd.grad.unsqueeze(-1) if x.dim() == 2 else xd.grad.flatten(2)
    torch.testing.assert_close(g3[0, keep, 0].double(), xr.grad, rtol=1e-5, atol=1e-6)
    assert g3[0, 2, 0] == 0
    assert torch.isfinite(loss).all() and torch.isfinite(xd.grad).all()


def test_targets_that_require_grad(capability):
    """Soft targets that require grad take the general path (the kernels' forward, torch's
    formula for the targets' gradient): both gradients as float64 torch's."""
    x = LAYOUTS["kdim"](7, torch.float32)
    q = soft_targets(x)
    xd, qd = x.clone().requires_grad_(), q.clone().requires_grad_()
    nllfused.cross_entropy(xd, qd, label_smoothing=0.1).backward()
    xr, qr = x.double().requires_grad_(), q.double().requires_grad_()
    torch.nn.functional.cross_entropy(xr, qr, label_smoothing=0.1).backward()
    torch.testing.assert_close(xd.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(qd.grad.double(), qr.grad, rtol=1e-5, atol=1e-7)
