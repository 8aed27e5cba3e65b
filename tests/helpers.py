"""What the test files share: the backends to test here, and small helpers.

Test files import from here (`from helpers import ...`; pytest puts tests/ on sys.path), never
from conftest.py, which holds only pytest's hooks and fixtures. conftest.py also sets
TRITON_INTERPRET before anything imports triton; it is always imported before this module.
"""
import pytest
import torch

import nllfused
from reference import assert_matches_oracle, gradient_floor, reference

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

# The compiled backends: all but "torch", the pure-torch reference.
KERNEL_BACKENDS = ("triton", "cpu", "cuda")


def backends_here(device, only=None):
    """The concrete backends that can run `device` tensors here (nllfused.available_backends),
    in nllfused's order; with `only`, those of its names that can, in its order."""
    names = nllfused.available_backends(torch.device(device))
    return names if only is None else [b for b in only if b in names]


def backend_params(devices=DEVICES, only=None, slow=()):
    """pytest params (device, backend), id "device-backend", for every backend that can run
    here on each of `devices` (restricted to `only`, see backends_here); the CUDA ones carry the
    `gpu` mark, those whose id is in `slow` the `slow` mark. The one enumeration of backends
    every test file uses."""
    params = []
    for device in devices:
        for backend in backends_here(device, only):
            name = f"{device}-{backend}"
            marks = ([pytest.mark.gpu] if device == "cuda" else []) + (
                [pytest.mark.slow] if name in slow else [])
            params.append(pytest.param(device, backend, id=name, marks=marks))
    return params


def dtype_id(dtype):
    """torch.float32 -> "float32", for test ids."""
    return str(dtype).removeprefix("torch.")


def case_params(cases):
    """(name, dtype) params for a table {name: (..., dtypes)}: each case in each of its dtypes."""
    for name, (*_, dtypes) in cases.items():
        for dtype in dtypes:
            yield pytest.param(name, dtype, id=f"{name}-{dtype_id(dtype)}")


def tensors_to(kwargs, device):
    """A copy of a call's kwargs with every tensor moved to `device`."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def with_class_weight(kwargs, num_classes):
    """A copy of a case's loss kwargs in which weight="rand" (a case table cannot hold a fresh
    random tensor) is replaced by random class weights, kept away from 0."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("weight"), str) and kwargs["weight"] == "rand":
        kwargs["weight"] = torch.rand(num_classes) + 0.1
    return kwargs


def check_cross_entropy(x, target, device, backend, **kwargs):
    """nllfused.cross_entropy of (x, target) on `device` with `backend`, and its gradient for a
    random upstream one, judged against the float64 oracle (tests/reference.py): for a
    low-precision x, no worse than twice torch's own error in x's dtype."""
    dtype = x.dtype
    out_shape = reference(x, target, **kwargs)[0].shape
    # The upstream gradient a loss of dtype D receives is a D tensor: the oracle gets that same
    # (rounded) gradient, so a 16-bit case's comparison is not at the mercy of its rounding.
    out_dtype = dtype
    if target.is_floating_point():  # the weights' dtype joins in, as torch's -(w q log p).sum()
        out_dtype = torch.promote_types(dtype, target.dtype)
        if isinstance(kwargs.get("weight"), torch.Tensor):
            out_dtype = torch.promote_types(out_dtype, kwargs["weight"].dtype)
    grad = torch.randn(out_shape, dtype=torch.float64).to(out_dtype).double()
    oracle, oracle_grad = reference(x, target, grad=grad, **kwargs)
    low = low_grad = None
    if dtype != torch.float64:
        low, low_grad = reference(x, target, grad=grad, dtype=dtype, **kwargs)

    # a leaf of its own (x.to(device) is x itself on x's device): calls on the same x never
    # add up gradients
    xd = x.detach().to(device).requires_grad_()
    ours = nllfused.cross_entropy(xd, target.to(device), backend=backend,
                                  **tensors_to(kwargs, device))
    # Soft targets take part in type promotion, as in torch; class indices do not.
    assert ours.dtype == out_dtype
    assert ours.shape == oracle.shape
    assert_matches_oracle(ours, oracle, dtype, low, "loss")
    ours.backward(grad.to(device, ours.dtype))
    assert xd.grad.dtype == dtype and xd.grad.shape == x.shape
    floor = gradient_floor(target, kwargs.get("reduction", "mean"), grad, dtype,
                           kwargs.get("weight"), kwargs.get("ignore_index", -100))
    assert_matches_oracle(xd.grad, oracle_grad, dtype, low_grad, "grad", floor)
