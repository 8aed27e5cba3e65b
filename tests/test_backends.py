"""backend="auto": it picks what can run here, says why when something cannot, and never
falls back silently to the slow reference."""
import warnings

import pytest
import torch

import nllfused
from nllfused import _extension, backends


# A cubin runs on its own major at an equal or later minor; PTX on anything later; nothing runs
# on an older GPU.
@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0", (8, 0), True), ("8.0;9.0", (8, 6), True), ("8.0;9.0", (9, 0), True),
    ("8.0;9.0", (12, 0), False), ("8.0;9.0", (10, 0), False), ("8.0;9.0", (7, 5), False),
    ("8.0;9.0;10.0;12.0+PTX", (12, 1), True), ("8.0;9.0;10.0;12.0+PTX", (13, 0), True),
    ("8.0;9.0;10.0;12.0+PTX", (7, 5), False), ("9.0+PTX", (10, 0), True), ("9.0a", (9, 0), True),
])
def test_runs_on(archs, capability, runs):
    assert backends.runs_on(archs, capability) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build for sm_80/sm_90 and a GPU of the given capability (no GPU needed)."""
    def make(capability, archs="8.0;9.0"):
        info = {"built": True, "cuda": True, "cuda_archs": archs, "torch_version": "x"}
        monkeypatch.setattr(_extension, "build_info", lambda: info)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        backends._cuda_code_reason.cache_clear()
        return torch.device("cuda", 0)
    yield make
    backends._cuda_code_reason.cache_clear()


@pytest.mark.skipif(_extension.TRITON_ERROR is not None, reason="needs triton to import")
def test_auto_falls_back_to_triton_on_a_gpu_the_build_lacks(fake_gpu):
    device = fake_gpu((12, 0))
    assert backends.resolve("auto", device) == "triton"
    with pytest.raises(RuntimeError, match=r"sm_120.*TORCH_CUDA_ARCH_LIST"):
        backends.resolve("cuda", device)
    why = nllfused.available_backends(device, reasons=True)
    assert "sm_120" in why["cuda"] and why["triton"] is None


def test_auto_picks_cuda_where_the_build_runs(fake_gpu):
    assert backends.resolve("auto", fake_gpu((9, 0))) == "cuda"
    assert backends.resolve("auto", fake_gpu((12, 0), archs="8.0;9.0;10.0;12.0+PTX")) == "cuda"


def test_auto_warns_once_when_the_extension_did_not_load(monkeypatch):
    monkeypatch.setattr(_extension, "C_ERROR", ImportError("undefined symbol: _ZN3c10"))
    backends._warn_once_unbuilt.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", torch.device("cpu")) == "torch"
        assert backends.resolve("auto", torch.device("cpu")) == "torch"
    messages = [str(w.message) for w in caught if "could not be loaded" in str(w.message)]
    assert len(messages) == 1 and "undefined symbol" in messages[0]
    backends._warn_once_unbuilt.cache_clear()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_available_backends_on_a_cuda_device_without_a_gpu():
    """Asking about CUDA on a machine without one answers, it does not raise."""
    why = nllfused.available_backends("cuda", reasons=True)
    assert why["cuda"] and why["cpu"]
    assert nllfused.available_backends(torch.device("cuda")) == ["torch"]
