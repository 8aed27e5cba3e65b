"""torch.compile(fullgraph=True) of a model + our loss: no graph breaks, results equal eager."""
import pytest
import torch

import nllfused
from helpers import backend_params


class TinyLM(torch.nn.Module):
    def __init__(self, hidden=16, vocab=37, **loss_options):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab)
        self.loss = nllfused.CrossEntropyLoss(**loss_options)

    def forward(self, h, target):
        return self.loss(self.proj(h), target)


def run_step(model, h, target):
    model.zero_grad()
    loss = model(h, target)
    loss.backward()
    return loss.detach(), model.proj.weight.grad.clone(), model.proj.bias.grad.clone()


@pytest.mark.parametrize("device,backend", backend_params())
# The plain call, then every option the compiled graph must carry: the ones that change the
# kernels' flags (smoothing, z-loss, ignore_index) and the extras with the 'sum' reduction.
@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=5),
    dict(reduction="sum", softcap=3.0, logit_scale=0.5),
], ids=["plain", "smoothing-zloss", "sum-softcap"])
def test_compiled_step_matches_eager(device, backend, options):
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter cannot run under torch.compile's tracing; "
                    "the compiled triton path is tested on the GPU")
    torch._dynamo.reset()
    model = TinyLM(backend=backend, **options).to(device)
    h = torch.randn(24, 16, device=device)
    target = torch.randint(0, 37, (24,), device=device)
    target[::5] = options.get("ignore_index", -100)
    eager = run_step(model, h, target)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        got = run_step(compiled, h, target)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Each backend, and "auto" (whose choice must be traceable too).
@pytest.mark.parametrize("device,backend",
                         backend_params() + [pytest.param("cpu", "auto", id="cpu-auto")])
def test_compiled_dynamic_shapes(device, backend):
    """A compiled loss sees several sequence lengths without recompiling per shape."""
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter cannot run under torch.compile's tracing")
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: nllfused.cross_entropy(x, t, backend=backend),
                       fullgraph=True, dynamic=True)
    for n in (8, 13, 21):
        x = torch.randn(n, 29, device=device)
        t = torch.randint(0, 29, (n,), device=device)
        expected = torch.nn.functional.cross_entropy(x.double(), t)
        torch.testing.assert_close(fn(x, t).double(), expected.double(), rtol=1e-5, atol=1e-6)
