"""nllfused::ce_bwd_inplace (csrc/ops.cpp): ce_bwd's gradient written over the logits.

The fused linear + cross-entropy (nllfused/linear.py) turns each chunk's logits into their
gradient with it, so the op must give bitwise what ce_bwd returns, in every layout the kernels
take (the CPU kernels store in place only where the logits are contiguous; a strided input goes
through a copy), and leave nothing else changed.
"""
import pytest
import torch

from helpers import KERNEL_BACKENDS, backend_params
from nllfused import ops
from test_ops import CONFIGS, sample_args


def _inplace(backend):
    op = ops.inplace_backward_for_backend(backend)
    assert op is not None, f"{backend}: no ce_bwd_inplace"
    return op


@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items() if v not in (False, 0.0, 1.0, 1)))
def test_opcheck_inplace(device, backend, config):
    fwd, _ = ops.for_backend(backend)
    x, t, w, *options = sample_args(device, **config)
    loss, lse, aux = fwd(x.detach(), t, w, *options)
    for grad_lse in (None, torch.randn_like(lse)):
        torch.library.opcheck(_inplace(backend), (torch.randn_like(loss), grad_lse,
                                                  x.detach().clone(), t, w, lse, aux, *options))


def _case(device, dtype, N, C, D, layout, prob_target, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    if layout == "strided":  # classes not unit-stride, rows not contiguous
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    if prob_target:
        t = torch.softmax(torch.randn(N, C, D, generator=g), 1)
    else:
        t = torch.randint(0, C, (N, D), generator=g)
        t[torch.rand(N, D, generator=g) < 0.2] = -100
    return x.to(device), t.to(device)


# (N, C, D): long rows over several of the CPU's 2048-class chunks, rows of a few classes (the
# CPU's lane path), K-dim layouts with few and many classes.
SHAPES = [(6, 5000, 1), (40, 4, 1), (3, 7, 50), (2, 300, 5), (17, 33, 1)]


@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "options", "prob"])
def test_inplace_equals_ce_bwd(device, backend, shape, layout, dtype, variant):
    fwd, bwd = ops.for_backend(backend)
    N, C, D = shape
    prob = variant == "prob"
    x, t = _case(device, dtype, N, C, D, layout, prob, seed=hash((shape, layout, variant)) % 997)
    w = torch.rand(C, device=device) + 0.5 if variant != "plain" else None
    options = (-100, 0.1 if variant != "plain" else 0.0, 0.8 if variant == "options" else 1.0,
               5.0 if variant == "options" else 0.0, prob)
    loss, lse, aux = fwd(x, t, w, *options)
    grad_loss = torch.rand_like(loss)
    grad_lse = torch.randn_like(lse) if variant == "options" else None
    expected = bwd(grad_loss, grad_lse, x, t, w, lse, aux, *options)
    y = x.clone()
    y_ptr, y_strides = y.data_ptr(), y.stride()
    before = (t.clone(), lse.clone(), aux.clone(), grad_loss.clone())
    _inplace(backend)(grad_loss, grad_lse, y, t, w, lse, aux, *options)
    assert y.data_ptr() == y_ptr and y.stride() == y_strides
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(before, (t, lse, aux, grad_loss)):
        assert torch.equal(a, b), "ce_bwd_inplace changed an input other than the logits"


@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
@pytest.mark.parametrize("shape", SHAPES + [(2, 20000, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,offset", [(torch.float64, 3e7), (torch.float32, 1e12)],
                         ids=["float64", "float32"])
def test_inplace_far_from_zero(device, backend, shape, dtype, offset):
    """Rows far from zero, which the backward reads whole once more (docs/maths.md, "Precision
    of lse"; float64 from |lse| 1024, float32 from 2^26): in place, still ce_bwd's gradient bit
    for bit -- rows that several programs share (Triton's split rows: (6, 5000, 1) in float64,
    (2, 20000, 1) in both) included."""
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("the Triton backward rereads float64 rows only (docs/maths.md)")
    fwd, bwd = ops.for_backend(backend)
    N, C, D = shape
    x, t = _case(device, dtype, N, C, D, "contiguous", False, seed=C)
    scale = 2.0**18 if dtype == torch.float32 else 1.0  # float32: a spread of a few ulps
    x = (x.double() * scale + offset).to(dtype)
    options = (-100, 0.0, 1.0, 0.0, False)
    loss, lse, aux = fwd(x, t, None, *options)
    grad_loss = torch.rand_like(loss)
    expected = bwd(grad_loss, None, x, t, None, lse, aux, *options)
    y = x.clone()
    _inplace(backend)(grad_loss, None, y, t, None, lse, aux, *options)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", backend_params(devices=("cpu",), only=("cpu",)))
def test_cpu_inplace_out_of_range_target_raises_and_recovers(device, backend):
    """The CPU kernels raise for a target outside [0, C) (ce_fwd's contract); the op then works
    again on good input."""
    fwd, bwd = ops.for_backend(backend)
    x, t = _case(device, torch.float32, 4, 9, 1, "contiguous", False, seed=3)
    options = (-100, 0.0, 1.0, 0.0, False)
    loss, lse, aux = fwd(x, t, None, *options)
    bad = t.clone()
    bad[1, 0] = 9
    with pytest.raises(IndexError):
        _inplace(backend)(torch.ones_like(loss), None, x.clone(), bad, None, lse, aux, *options)
    y = x.clone()
    _inplace(backend)(torch.ones_like(loss), None, y, t, None, lse, aux, *options)
    torch.testing.assert_close(y, bwd(torch.ones_like(loss), None, x, t, None, lse, aux,
                                      *options), rtol=0, atol=0)
