"""torch.library.opcheck on every op of every backend that can run here."""
import pytest
import torch

from helpers import KERNEL_BACKENDS, backend_params
from nllfused import ops


def sample_args(device, prob_target, weighted, smoothing, scale, softcap, D=1,
                dtype=torch.float32):
    N, C = 5, 11
    x = torch.randn(N, C, D, dtype=dtype, device=device, requires_grad=True)
    if prob_target:
        t = torch.softmax(torch.randn(N, C, D, device=device), 1)
    else:
        t = torch.randint(0, C, (N, D), device=device)
        t[0, 0] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(C, device=device, dtype=acc) + 0.1 if weighted else None
    return (x, t, w, -100, smoothing, scale, softcap, prob_target)


# The plain op; the options that add inputs or flags (weight, smoothing); scale and softcap
# with a K-dim layout; soft targets; a 16-bit dtype; float64 (float64 weights).
CONFIGS = [
    dict(prob_target=False, weighted=False, smoothing=0.0, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=True, smoothing=0.1, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=False, smoothing=0.0, scale=0.5, softcap=3.0, D=3),
    dict(prob_target=True, weighted=True, smoothing=0.2, scale=1.0, softcap=0.0),
    dict(prob_target=False, weighted=False, smoothing=0.0, scale=1.0, softcap=0.0,
         dtype=torch.bfloat16),
    dict(prob_target=False, weighted=True, smoothing=0.1, scale=1.0, softcap=0.0,
         dtype=torch.float64),
]


@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items() if v not in (False, 0.0, 1.0, 1)))
def test_opcheck_forward_and_backward(device, backend, config):
    fwd, bwd = ops.for_backend(backend)
    args = sample_args(device, **config)
    torch.library.opcheck(fwd, args)
    x, t, w, *options = args
    loss, lse, aux = fwd(x.detach(), t, w, *options)
    grad = torch.randn_like(loss)
    for grad_lse in (None, torch.randn_like(lse)):  # the lse's own gradient, e.g. from z-loss
        torch.library.opcheck(bwd, (grad, grad_lse, x.detach(), t, w, lse, aux, *options))


@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
def test_backward_op_matches_torch_autograd(device, backend):
    """The registered autograd formula (the backward op) equals autograd through the torch
    backend, for random per-row upstream gradients of the loss and of the lse."""
    from nllfused.backends import torch_ref
    args = sample_args(device, prob_target=False, weighted=True, smoothing=0.1,
                       scale=0.7, softcap=4.0, D=2, dtype=torch.float64)
    x, t, w, *options = args
    loss, lse, _ = ops.for_backend(backend)[0](x, t, w, *options)
    ref_x = x.detach().clone().requires_grad_()
    ref_loss, ref_lse, _ = torch_ref.forward(ref_x, t, w, *options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    g, g_lse = torch.randn_like(loss), torch.randn_like(lse)
    g_lse[0] = 0  # a row without an lse gradient
    (ours,) = torch.autograd.grad((loss, lse), x, (g, g_lse))
    (ref,) = torch.autograd.grad((ref_loss, ref_lse), ref_x, (g, g_lse))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
