"""The GPU cases a first GPU run must cover (bench/gpu_check runs every `gpu` test): layouts the
vector paths treat specially, sizes past 2^31 elements, CUDA-graph capture, bad targets on the
device. Each runs every GPU backend against the float64 oracle; they skip without a GPU."""
import pytest
import torch

import nllfused
from helpers import backend_params, check_cross_entropy

pytestmark = pytest.mark.gpu
GPU = backend_params(devices=("cuda",), only=("cuda", "triton"))


def randint(high, shape):
    return torch.randint(0, high, shape, device="cuda")


def randn(*shape, dtype):
    # Made on the GPU: check_cross_entropy then uses the tensor itself, views and all.
    return torch.randn(*shape, dtype=dtype, device="cuda")


# Why each: a storage offset (labels[:, 1:], logits[:, :-1]) takes the misaligned-head path;
# C = 50257 is not a multiple of 8 (no 16-byte rows); (B, V, T) has the classes strided; one row
# is the few-rows case; bf16 and fp32 for each.
@pytest.mark.parametrize("device,backend", GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["offset", "c50257", "bvt", "one_row"])
def test_layouts(device, backend, dtype, layout):
    if layout == "offset":
        # Views one element in, as a shifted LM batch makes them: both have a storage offset.
        x = randn(3 * 65 + 1, 1003, dtype=dtype)[1:]
        t = randint(1003, (3 * 65 + 1,))[1:]
        assert x.storage_offset() and t.storage_offset()
    elif layout == "c50257":
        x, t = randn(64, 50257, dtype=dtype), randint(50257, (64,))
    elif layout == "bvt":
        x, t = randn(4, 5000, 33, dtype=dtype), randint(5000, (4, 33))
    else:
        x, t = randn(1, 128256, dtype=dtype), randint(128256, (1,))
    check_cross_entropy(x, t, device, backend, reduction="mean", ignore_index=-100)


@pytest.mark.parametrize("device,backend", GPU)
def test_more_than_2_31_elements(device, backend):
    """16384 x 131072 bf16: N*C > 2^31, offsets must be 64-bit. Checked against torch on the
    same GPU in float32 row by row for a sample of rows (the float64 oracle would not fit)."""
    N, C = 16384, 131072
    x = torch.randn(N, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, C, (N,), device=device)
    loss = nllfused.cross_entropy(x, t, reduction="none", backend=backend)
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=device)
    ref = torch.nn.functional.cross_entropy(x[rows].float(), t[rows], reduction="none")
    torch.testing.assert_close(loss[rows].float(), ref, rtol=2e-2, atol=2e-2)
    loss.sum().backward()
    p = torch.softmax(x[rows].float(), 1)
    p[torch.arange(len(rows)), t[rows]] -= 1
    torch.testing.assert_close(x.grad[rows].float(), p, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("device,backend", GPU)
def test_cuda_graph_capture_forward_and_backward(device, backend):
    x = torch.randn(256, 32000, device=device, requires_grad=True)
    t = torch.randint(0, 32000, (256,), device=device)
    step = lambda: nllfused.cross_entropy(x, t, backend=backend).backward()  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (allocations, autotuning, compiles)
            x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.data.copy_(torch.randn_like(x))
    graph.replay()
    expected = torch.func.grad(lambda x: torch.nn.functional.cross_entropy(x, t))(x.detach())
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device,backend", GPU)
def test_out_of_range_targets_on_the_device_give_nan(device, backend):
    x = torch.randn(4, 50, device=device)
    t = torch.tensor([0, 50, 3, -5], device=device)
    loss = nllfused.cross_entropy(x, t, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])
    assert torch.isfinite(loss[0]) and torch.isfinite(loss[2])
    assert torch.isfinite(nllfused.cross_entropy(x, t.clamp(0, 49), backend=backend))
