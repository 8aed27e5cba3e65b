"""The Triton kernels' scalar helpers, judged in ulps against float64 torch."""
import pytest
import torch

from helpers import backends_here

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or "triton" in backends_here("cpu")),
    reason="needs a GPU or Triton's interpreter")


if torch.cuda.is_available() or "triton" in backends_here("cpu"):
    import triton
    import triton.language as tl

    from nllfused.kernels.cross_entropy import _tanh

    @triton.jit
    def tanh_kernel(V, OUT, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(V + i, mask=i < n, other=0.0).to(ACC)
        tl.store(OUT + i, _tanh(x, ACC), mask=i < n)


def run_tanh(v):
    out = torch.empty_like(v)
    acc = tl.float64 if v.dtype == torch.float64 else tl.float32
    tanh_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), ACC=acc, BLOCK=1024)
    return out


@pytest.mark.parametrize("dtype,ulps", [(torch.float32, 3), (torch.float64, 8)])
def test_softcap_tanh_within_a_few_ulps(dtype, ulps):
    """Near 0, 1 - 2/(1 + e^2v) has relative error eps/|v|; softcap 30 sees such inputs for
    every logit of size ~1. Every magnitude from 1e-8 to 1000, both signs, is judged relative to
    the float64 truth (past 354 exp(-2v) is a float64 subnormal: its few bits once reached
    tanh, 7e-4 off at 372)."""
    mag = torch.logspace(-8, 3, 8000, dtype=torch.float64)
    v = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)]).to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = run_tanh(v.to(device)).cpu().double()
    truth = torch.tanh(v.double())
    eps = torch.finfo(dtype).eps
    err_ulps = (ours - truth).abs() / (truth.abs().clamp_min(torch.finfo(dtype).tiny) * eps)
    assert err_ulps.max() <= ulps, f"worst {err_ulps.max():.2f} ulps at v={v[err_ulps.argmax()]}"
