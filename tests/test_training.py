"""What a training loop relies on: autocast, scaled losses, determinism, threads, CUDA graphs,
and N*C beyond 2^31 elements."""
import importlib.util
import os
import threading

import pytest
import torch
import torch.nn.functional as F

import nllfused
from helpers import KERNEL_BACKENDS, backend_params
from reference import assert_matches_oracle, reference


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # autocast's 16-bit dtypes
def test_autocast_matches_torch_autocast_without_float32_copy(device, backend, dtype):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bfloat16")
    proj = torch.nn.Linear(16, 45).to(device)
    h = torch.randn(20, 16, device=device)
    t = torch.randint(0, 45, (20,), device=device)
    t[::4] = -100
    with torch.autocast(device, dtype=dtype):
        logits = proj(h)
        expected = F.cross_entropy(logits, t)
        ours = nllfused.cross_entropy(logits, t, backend=backend)
    assert logits.dtype == dtype
    assert ours.dtype == expected.dtype == torch.float32
    oracle, _ = reference(logits.detach(), t)
    assert_matches_oracle(ours, oracle, dtype, expected)
    (g_ours,) = torch.autograd.grad(ours, logits)
    assert g_ours.dtype == dtype


class LogitsSizedFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every float32 tensor of at least `numel` elements an op produces while active."""

    def __init__(self, numel):
        super().__init__()
        self.numel = numel
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and \
                    o.numel() >= self.numel:
                self.seen.append((str(func), tuple(o.shape)))
        return out


# Not "torch": the pure-torch reference makes the float32 logits by design (torch_ref.py).
@pytest.mark.parametrize("device,backend", backend_params(only=KERNEL_BACKENDS))
def test_autocast_makes_no_float32_copy_of_the_logits(device, backend):
    logits = torch.randn(32, 101, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 101, (32,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16), LogitsSizedFloat32(logits.numel()) as m:
        loss = nllfused.cross_entropy(logits, t, backend=backend)
        loss.backward()
    assert loss.dtype == torch.float32
    assert m.seen == [], f"float32 tensors of the logits' size were made: {m.seen}"
    # The detector itself works: torch's own autocast path does make such a copy.
    with torch.autocast(device, dtype=torch.bfloat16), LogitsSizedFloat32(logits.numel()) as m:
        F.cross_entropy(logits, t)
    assert m.seen


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_scaled_loss_gradients(device, backend, reduction):
    """Gradient accumulation / loss scaling: grad of (loss * s) / k is s/k times the grad."""
    x = torch.randn(12, 33, device=device)
    t = torch.randint(0, 33, (12,), device=device)
    grads = []
    for scale in (1.0, 1024.0 / 3):
        xr = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xr, t, reduction=reduction, label_smoothing=0.1,
                                      backend=backend)
        (loss.sum() * scale).backward()
        grads.append(xr.grad / scale)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_params())
def test_deterministic_bitwise(device, backend):
    x = torch.randn(64, 300, device=device, dtype=torch.bfloat16)
    t = torch.randint(0, 300, (64,), device=device)
    results = []
    for _ in range(3):
        xr = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xr, t, label_smoothing=0.05, z_loss=1e-3, backend=backend)
        loss.backward()
        results.append((loss.detach(), xr.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("device,backend", backend_params())
def test_thread_safe(device, backend):
    cases = [(torch.randn(16, 50 + i, device=device), torch.randint(0, 50, (16,), device=device))
             for i in range(8)]

    def run(x, t):
        xr = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xr, t, backend=backend)
        loss.backward()
        return loss.detach(), xr.grad

    sequential = [run(*c) for c in cases]
    threaded = [None] * len(cases)
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                threaded[i] = run(*cases[i])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (l1, g1), (l2, g2) in zip(sequential, threaded):
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_of_a_training_step(backend):
    if backend not in nllfused.available_backends(torch.device("cuda")):
        pytest.skip(f"{backend} not built")
    model = torch.nn.Linear(32, 1000).cuda()
    h = torch.randn(64, 32, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = nllfused.cross_entropy(model(h), t, backend=backend)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    expected = F.cross_entropy(model(h), t)
    torch.testing.assert_close(static_loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_more_than_2_31_elements_cpu():
    """N*C > 2^31 (int64 offsets): bfloat16 keeps it under 5 GB; rows far apart are checked
    against float64 torch row by row."""
    backend = "cpu" if "cpu" in nllfused.available_backends(torch.device("cpu")) else None
    if backend is None:
        pytest.skip("the C++ cpu backend is not built")
    N, C = 16400, 131072  # 2.15e9 elements
    x = torch.empty(N, C, dtype=torch.bfloat16)
    x.normal_()
    t = torch.randint(0, C, (N,))
    loss = nllfused.cross_entropy(x, t, reduction="none", backend=backend)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1])
    expected = F.cross_entropy(x[rows].double(), t[rows], reduction="none")
    assert_matches_oracle(loss[rows], expected, torch.bfloat16,
                          F.cross_entropy(x[rows], t[rows], reduction="none"))


# The example training loop (examples/train_lm.py) at a small size: the same run on our loss and
# on the reference one gives the same losses step by step -- the two differ only by the loss's and
# its gradient's float32 rounding (a few ulps of ~4, as the kernels' tests check), which six AdamW
# steps at these learning rates carry into the loss far below 20 ulps -- and the loss falls.
@pytest.mark.parametrize("ours,reference_run", [
    (["--model", "llama"], ["--model", "llama", "--no-patch"]),
    (["--model", "torch"], ["--model", "torch", "--backend", "torch"]),
    (["--model", "torch", "--dtype", "bfloat16"],
     ["--model", "torch", "--dtype", "bfloat16", "--backend", "torch"]),
], ids=["llama-patched", "torch-model", "torch-model-bf16-autocast"])
def test_train_lm_example_matches_the_reference_loss(ours, reference_run):
    if "llama" in ours:
        pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("train_lm", os.path.join(
        os.path.dirname(__file__), os.pardir, "examples", "train_lm.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = ["--steps", "6", "--vocab", "64", "--seq", "16", "--batch", "4", "--hidden", "16",
             "--layers", "1", "--log-every", "100", "--threads", "0"]
    got, expected = example.main(small + ours), example.main(small + reference_run)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert sum(got[-2:]) < sum(got[:2]), got
