"""Property-based: random shapes, dtypes, options and targets through every backend that can
run here, against float64 torch."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import backend_params, check_cross_entropy


@st.composite
def problems(draw):
    C = draw(st.integers(1, 300))
    lead = draw(st.sampled_from(["1d", "2d", "kdim"]))
    if lead == "1d":
        shape, index_shape = (C,), ()
    elif lead == "2d":
        n = draw(st.integers(0, 12))
        shape, index_shape = (n, C), (n,)
    else:
        n, d1, d2 = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
        shape, index_shape = (n, C, d1, d2), (n, d1, d2)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16,
                                  torch.float64]))
    prob = draw(st.booleans())
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    x = (torch.randn(shape) * scale).to(dtype)
    kwargs = dict(reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                  label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.05, 0.5])))
    if prob:
        target = torch.softmax(torch.randn(shape), dim=0 if lead == "1d" else 1).to(dtype)
    else:
        ignore = draw(st.sampled_from([-100, -1, 0, C - 1]))
        target = torch.randint(0, C, index_shape)
        if target.numel():
            target[torch.rand(index_shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore
        kwargs["ignore_index"] = ignore
    if draw(st.booleans()):
        kwargs["weight"] = torch.rand(C) + 0.05
    extra = draw(st.sampled_from(["none", "z_loss", "scale", "softcap"]))
    if extra == "z_loss":
        kwargs["z_loss"] = 1e-2
    elif extra == "scale":
        kwargs["logit_scale"] = 0.5
    elif extra == "softcap":
        kwargs["softcap"] = 2.0
    if draw(st.booleans()) and x.dim() >= 2 and x.shape[0] > 1:
        x = x.flip(0)  # non-contiguous (negative strides are not allowed; flip copies) ...
        x = x.transpose(0, -1).contiguous().transpose(0, -1)  # ... so: column-major layout
    return x, target, kwargs


@pytest.mark.parametrize("device,backend", backend_params())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_random_problems_match_float64_torch(device, backend, problem):
    x, target, kwargs = problem
    check_cross_entropy(x, target, device, backend, **kwargs)
