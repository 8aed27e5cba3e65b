"""torch.library.opcheck on every op of every backend that can run here."""
import pytest
import torch

from nllfused import backends, ops

CPU = torch.device("cpu")


def op_pairs():
    pairs = []
    for backend in ("cpu", "triton", "cuda"):
        device = "cuda" if backend == "cuda" else "cpu"
        if backend == "cuda" and not torch.cuda.is_available():
            continue
        if backends.unavailable_reason(backend, torch.device(device)) is None:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            pairs.append(pytest.param(backend, device, id=backend, marks=marks))
    return pairs


def sample_args(device, prob_target, weighted, smoothing, z_loss, scale, softcap, D=1,
                dtype=torch.float32):
    N, C = 5, 11
    x = torch.randn(N, C, D, dtype=dtype, device=device, requires_grad=True)
    if prob_target:
        t = torch.softmax(torch.randn(N, C, D, device=device), 1)
    else:
        t = torch.randint(0, C, (N, D), device=device)
        t[0, 0] = -100
    w = torch.rand(C, device=device) + 0.1 if weighted else None
    return (x, t, w, -100, smoothing, z_loss, scale, softcap, prob_target)


CONFIGS = [
    dict(prob_target=False, weighted=False, smoothing=0.0, z_loss=0.0, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=True, smoothing=0.1, z_loss=1e-3, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=False, smoothing=0.0, z_loss=0.0, scale=0.5, softcap=3.0,
         D=3),
    dict(prob_target=True, weighted=True, smoothing=0.2, z_loss=0.0, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=False, smoothing=0.0, z_loss=0.0, scale=1.0, softcap=0.0,
         dtype=torch.bfloat16),
]


@pytest.mark.parametrize("backend,device", op_pairs())
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items() if v not in (False, 0.0, 1.0, 1)))
def test_opcheck_forward_and_backward(backend, device, config):
    args = sample_args(device, **config)
    torch.library.opcheck(ops.forward_op(backend), args)
    x, t, w, *options = args
    loss, lse, aux = ops.forward_op(backend)(x.detach(), t, w, *options)
    grad = torch.randn_like(loss)
    bwd_args = (grad, x.detach(), t, w, lse, aux, *options)
    torch.library.opcheck(ops.backward_op(backend), bwd_args)


@pytest.mark.parametrize("backend,device", op_pairs())
def test_backward_op_matches_torch_autograd(backend, device):
    """The registered autograd formula (the backward op) equals autograd through the torch
    backend, for a random per-row upstream gradient."""
    from nllfused.backends import torch_ref
    args = sample_args(device, prob_target=False, weighted=True, smoothing=0.1, z_loss=1e-2,
                       scale=0.7, softcap=4.0, D=2, dtype=torch.float64)
    x, t, w, *options = args
    loss, _, _ = ops.forward_op(backend)(x, t, w, *options)
    ref_x = x.detach().clone().requires_grad_()
    ref_loss, _, _ = torch_ref.forward(ref_x, t, w, *options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(loss)
    (ours,) = torch.autograd.grad(loss, x, g)
    (ref,) = torch.autograd.grad(ref_loss, ref_x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
