"""Property-based: random shapes, dtypes, options and targets through every backend that can
run here, against float64 torch."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nllfused
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


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["rows", "kdim", "kdim_strided"])
@pytest.mark.parametrize("transform", [dict(logit_scale=0.7), dict(logit_scale=1.3, softcap=20.0)],
                         ids=["scale", "softcap"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_one_class_transformed_has_zero_loss_and_gradient(device, backend, dtype, layout,
                                                          transform, prob):
    """With one class p = 1 exactly, so the loss and its gradient are exactly 0 -- provided the
    backward forms the transformed logit z = softcap(logit_scale x) rounded as the forward did.
    (A backward whose z - lse the compiler fused into one multiply-add, unrounded, got p = 1 +
    up to half an ulp of z: gradients of ~1e-6 here, and errors of that size wherever p S - t
    cancels.) Logits around -50 make that half ulp large."""
    N, D = 37, 5
    shape = {"rows": (N, 1), "kdim": (N, 1, D), "kdim_strided": (N, 1, D)}[layout]
    x = (torch.randn(shape, dtype=torch.float64) * 8 - 50).to(dtype)
    if layout == "kdim_strided":
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    index_shape = shape[:1] + shape[2:]
    if prob:
        target = torch.rand(shape, dtype=torch.float64).to(dtype)  # any mass: p S - t = 0
    else:
        target = torch.zeros(index_shape, dtype=torch.long)
    xd = x.to(device).requires_grad_()
    loss = nllfused.cross_entropy(xd, target.to(device), reduction="none", backend=backend,
                                  **transform)
    loss.backward(torch.randn(index_shape, dtype=torch.float64).to(device, loss.dtype))
    assert torch.equal(loss.detach().cpu(), torch.zeros(index_shape, dtype=loss.dtype))
    assert torch.equal(xd.grad.cpu(), torch.zeros(shape, dtype=dtype))
