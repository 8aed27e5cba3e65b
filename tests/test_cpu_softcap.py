"""The C++ CPU kernels' softcap z = s tanh(a x / s) (csrc/cpu/ce_cpu_softcap.h: the kernels' own
tanh, a polynomial below |a x / s| = 1 and exp(-2|a x / s|) above), on every copy of the kernels
this machine can run: logits across the tanh's whole range -- both branches, their boundary,
saturation, infinities -- in the lane path (rows of few classes) and the rows path, against
float64 torch (tests/reference.py). The gradient judges every class's z on its own: p_c =
exp(z_c - lse) carries z_c's error as a relative one."""
import math

import pytest
import torch

import nllfused
from helpers import check_cross_entropy, dtype_id
from test_cpu_small_classes import CAPABILITIES, capability  # noqa: F401

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or not CAPABILITIES, reason="the C++ CPU backend is not built")

SOFTCAP, SCALE = 30.0, 1.5


def tanh_arguments():
    """Values of a x / s: 0, log-spaced magnitudes from 1e-6 to 60 (tanh rounds to 1 from ~9),
    the branch boundary 1 and the floats beside it, infinity; both signs."""
    one = torch.tensor(1.0, dtype=torch.float32)
    beside = [torch.nextafter(one, torch.tensor(0.0)).item(),
              torch.nextafter(one, torch.tensor(2.0)).item()]
    mags = torch.cat([torch.logspace(-6, math.log10(60.0), 301, dtype=torch.float64),
                      torch.tensor([0.0, 1.0, *beside, 0.75, 1.25, 44.0, 50.0, math.inf],
                                   dtype=torch.float64)])
    return torch.cat([mags, -mags])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_softcap_lanes_over_the_tanh_range(capability, dtype):
    """Rows (x, 0) of two classes, one row per tanh argument, the target either class."""
    x0 = tanh_arguments() * (SOFTCAP / SCALE)
    x = torch.stack([x0, torch.zeros_like(x0)], 1).to(dtype)
    t = torch.randint(0, 2, (x.shape[0],))
    check_cross_entropy(x, t, "cpu", "cpu", reduction="none", softcap=SOFTCAP,
                        logit_scale=SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_softcap_rows_over_the_tanh_range(capability, dtype):
    """Rows of every tanh argument in a random order (~620 classes: the rows path)."""
    u = tanh_arguments()
    u = u[u.isfinite()]  # (an infinite logit in every row: lse from it alone)
    x = torch.stack([u[torch.randperm(len(u))] for _ in range(6)]) * (SOFTCAP / SCALE)
    t = torch.randint(0, x.shape[1], (x.shape[0],))
    check_cross_entropy(x.to(dtype), t, "cpu", "cpu", reduction="none", softcap=SOFTCAP,
                        logit_scale=SCALE)
