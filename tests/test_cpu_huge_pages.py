"""The CPU ops' huge-page hint for outputs of 32 MiB and more (csrc/cpu/ce_cpu.cpp,
prefer_huge_pages; docs/cpp.md): on or off (NLLFUSED_HUGE_PAGES=0), the same bits."""
import pytest
import torch

import nllfused

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")


def test_huge_page_hint_changes_no_bits(monkeypatch):
    x = torch.randn(2048, 4100)  # a 32.8 MiB gradient: above the hint's threshold
    t = torch.randint(0, 4100, (2048,))
    grads = []
    for setting in ("1", "0"):
        monkeypatch.setenv("NLLFUSED_HUGE_PAGES", setting)
        xr = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xr, t, backend="cpu", reduction="none")
        loss.backward(torch.ones_like(loss))
        grads.append((loss.detach(), xr.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    ref = torch.softmax(x.double(), 1)
    ref[torch.arange(2048), t] -= 1
    torch.testing.assert_close(grads[1][1].double(), ref, rtol=1e-5, atol=1e-7)
