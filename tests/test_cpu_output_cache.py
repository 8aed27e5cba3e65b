"""The CPU ops' output cache (csrc/cpu/output_cache.h): a freed output of 1 MiB or more is reused
by the next output of its size, within NLLFUSED_CPU_CACHE_MB of idle bytes (0: off); reused
buffers give the same results as fresh ones; torch's memory profiler sees every handout."""
import pytest
import torch

import nllfused

pytestmark = pytest.mark.skipif(
    not nllfused.build_info()["built"] or "cpu" not in nllfused.available_backends("cpu"),
    reason="the C++ CPU backend is not built")

SHAPE = (4, 4, 256, 256)  # 262144 rows: per-row lse 2 MiB, loss and aux 1 MiB, gradient 4 MiB


def cache():
    return nllfused._extension._C


def fwd(x, t):
    return torch.ops.nllfused.ce_fwd.default(x.flatten(2), t.flatten(1), None, -100, 0.0, 1.0,
                                             0.0, False)


def reference(x, t):
    """float64 torch: per-row loss and lse."""
    logp = torch.log_softmax(x.double(), 1)
    loss = -logp.gather(1, t.unsqueeze(1)).squeeze(1)
    return loss.flatten(1), torch.logsumexp(x.double(), 1).flatten(1)


def case():
    x = torch.randn(SHAPE) * 3
    return x, torch.randint(0, SHAPE[1], (SHAPE[0],) + SHAPE[2:])


def check(out, x, t):
    loss, lse = reference(x, t)
    torch.testing.assert_close(out[0].double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], lse, rtol=1e-5, atol=1e-6)  # float32 accumulation
    assert torch.equal(out[2], torch.ones_like(out[2]))  # aux: each counted row's weight, 1


def test_freed_outputs_are_reused_and_overwritten(monkeypatch):
    monkeypatch.delenv("NLLFUSED_CPU_CACHE_MB", raising=False)
    x, t = case()
    out = fwd(x, t)
    check(out, x, t)
    first = {o.data_ptr() for o in out}
    del out
    assert cache().cpu_cache_info()["idle_bytes"] >= 4 << 20
    hits = cache().cpu_cache_info()["hits"]
    x, t = case()  # fresh values: nothing of the first call's may survive in the reused buffers
    out = fwd(x, t)
    assert {o.data_ptr() for o in out} == first
    assert cache().cpu_cache_info()["hits"] == hits + 3
    check(out, x, t)
    # the backward's gradient (4 MiB) comes from the cache too, and is right
    xr = x.clone().requires_grad_()
    loss = nllfused.cross_entropy(xr, t, backend="cpu", reduction="sum")
    loss.backward()
    ref = torch.softmax(x.double(), 1)
    ref.scatter_add_(1, t.unsqueeze(1), -torch.ones_like(ref[:, :1]))
    torch.testing.assert_close(xr.grad.double(), ref, rtol=1e-5, atol=1e-7)
    cache().cpu_cache_empty()
    assert cache().cpu_cache_info()["idle_bytes"] == 0


def test_cap_and_off(monkeypatch):
    cache().cpu_cache_empty()
    monkeypatch.setenv("NLLFUSED_CPU_CACHE_MB", "1")  # room for the 1 MiB blocks only
    out = fwd(*case())
    del out
    info = cache().cpu_cache_info()
    assert info["cap_bytes"] == 1 << 20 and 0 < info["idle_bytes"] <= 1 << 20
    cache().cpu_cache_empty()
    monkeypatch.setenv("NLLFUSED_CPU_CACHE_MB", "0")
    before = cache().cpu_cache_info()
    x, t = case()
    out = fwd(x, t)
    check(out, x, t)
    del out
    after = cache().cpu_cache_info()
    assert after["idle_bytes"] == 0 and after["misses"] == before["misses"]


def test_memory_profiler_sees_cached_outputs(monkeypatch):
    monkeypatch.delenv("NLLFUSED_CPU_CACHE_MB", raising=False)
    x, t = case()
    fwd(x, t)  # its outputs freed at once: the profiled call reuses their blocks
    with torch.autograd.profiler.profile(profile_memory=True) as prof:
        out = fwd(x, t)
    allocated = sum(e.cpu_memory_usage for e in prof.function_events if e.cpu_memory_usage > 0)
    assert allocated >= sum(o.nbytes for o in out)
