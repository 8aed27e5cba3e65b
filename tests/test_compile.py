"""torch.compile(fullgraph=True) of a model + our loss: no graph breaks, results equal eager."""
import numpy as np
import pytest
import torch

import nllfused
from helpers import backend_params
from nllfused.distributed import vocab_parallel_cross_entropy


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


# Calls torch.jit.trace must record whole: the C++ one-call path (a bf16 weight converted to
# float32 there), the general path (int32 targets, a tensor label_smoothing, the torch backend,
# probability targets, statistics) and the fused linear loss in chunks.
TRACED = {
    "one-call": lambda x, t, q, w, h, W: nllfused.cross_entropy(x, t),
    "bf16-weight": lambda x, t, q, w, h, W: nllfused.cross_entropy(
        x.bfloat16(), t, w.bfloat16()).float(),
    "float64-weight": lambda x, t, q, w, h, W: nllfused.cross_entropy(x, t, w.double()),
    "prob-bf16-weight": lambda x, t, q, w, h, W: nllfused.cross_entropy(
        x.bfloat16(), q.bfloat16(), w.bfloat16()).float(),
    "int32": lambda x, t, q, w, h, W: nllfused.cross_entropy(x, t.int(), w),
    "smoothing-tensor": lambda x, t, q, w, h, W: nllfused.cross_entropy(
        x, t, label_smoothing=torch.tensor(0.2)),
    "torch-backend": lambda x, t, q, w, h, W: nllfused.cross_entropy(x, t, backend="torch"),
    "stats": lambda x, t, q, w, h, W: nllfused.cross_entropy(
        x, t, reduction="none", return_stats=True)[1].entropy,
    "linear-chunked": lambda x, t, q, w, h, W: nllfused.linear_cross_entropy(
        h, W, t, chunk_size=8),
    "vocab-parallel-weight": lambda x, t, q, w, h, W: vocab_parallel_cross_entropy(
        x, t, weight=w, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", list(TRACED))
def test_jit_trace_records_the_whole_call(name):
    """A traced call run on fresh inputs equals the eager call (never a value the trace did not
    record: a weight converted by a raw loop is an empty tensor to the tracer)."""
    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        x, h, W = (torch.randn(*s, generator=g) for s in ((16, 10), (16, 4), (10, 4)))
        q = torch.softmax(torch.randn(16, 10, generator=g), 1)
        return x, torch.randint(0, 10, (16,), generator=g), q, torch.rand(10, generator=g) + .5, \
            h, W
    fn = TRACED[name]
    traced = torch.jit.trace(fn, inputs(0), check_trace=False)
    for seed in (1, 2):
        torch.testing.assert_close(traced(*inputs(seed)), fn(*inputs(seed)), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 8], ids=["auto", "chunked"])
def test_exported_linear_loss_gives_every_gradient_asked_later(chunk_size):
    """torch.export records the fused linear loss without knowing which inputs will require
    grad when the program runs: its backward gives the input's gradient too (it was exported
    with an input that did not require grad)."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W = torch.nn.Parameter(torch.randn(7, 4))

        def forward(self, h, t):
            return nllfused.linear_cross_entropy(h, self.W, t, chunk_size=chunk_size)

    h, t, m = torch.randn(6, 4), torch.randint(0, 7, (6,)), Head()
    program = torch.export.export(m, (h, t)).module()
    ha = h.clone().requires_grad_()
    program(ha, t).backward()
    hb, Wb = h.clone().requires_grad_(), m.W.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(torch.nn.functional.linear(hb, Wb), t).backward()
    torch.testing.assert_close(ha.grad, hb.grad)


@pytest.mark.parametrize("kw", [dict(), dict(reduction="none"), dict(return_stats=True),
                                dict(return_lse=True), dict(weight=True)], ids=str)
def test_compiled_autograd_takes_the_loss(kw):
    """Compiled autograd (the backward traced by dynamo) around an eager forward: the gradient
    equals eager autograd's, the loss not being the root of backward()."""
    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    if kw.get("weight"):
        kw = dict(weight=torch.rand(5) + 0.5)

    def grad_of(compiled):
        xd = x.clone().requires_grad_()
        ctx = torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")) \
            if compiled else torch.enable_grad()
        with ctx:
            out = nllfused.cross_entropy(xd, t, **kw)
            ((out[0] if isinstance(out, tuple) else out) * 2).sum().backward()
        return xd.grad
    torch.testing.assert_close(grad_of(True), grad_of(False))


@pytest.mark.parametrize("transform", ["jvp", "grad", "jacrev"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_compiled_torch_func_transforms_match_eager(transform, prob):
    """torch.compile(fullgraph=True) of a torch.func transform of the loss: the transform runs on
    the torch reference as in eager mode (the fused ops have no tangent: a compiled jvp was 0)."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randn(4, 5, generator=g)
    t = torch.softmax(torch.randn(4, 5, generator=g), 1).double() if prob else \
        torch.randint(0, 5, (4,), generator=g)
    loss = lambda x: nllfused.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-2)  # noqa: E731
    fn = {"jvp": lambda x: torch.func.jvp(loss, (x,), (v.double(),))[1],
          "grad": torch.func.grad(loss), "jacrev": torch.func.jacrev(loss)}[transform]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, fn(x), rtol=1e-12, atol=1e-12)
    assert compiled.abs().max() > 0


@pytest.mark.parametrize("legacy", [dict(size_average=False), dict(reduce=False)], ids=str)
def test_compiled_call_takes_torchs_deprecated_reduction_arguments(legacy):
    """size_average / reduce under torch.compile(fullgraph=True), as torch's function takes them
    there (resolved in Python: torch's legacy_get_string and the warning are not traceable)."""
    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: nllfused.cross_entropy(x, t, **legacy), backend="eager",
                       fullgraph=True)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        expected = torch.nn.functional.cross_entropy(x.double(), t, **legacy)
    torch.testing.assert_close(fn(x, t), expected.float())


@pytest.mark.parametrize("module", [nllfused.CrossEntropyLoss(label_smoothing=0.1),
                                    nllfused.CrossEntropyLoss(reduction="none")], ids=str)
def test_exported_loss_with_a_dynamic_batch(module):
    """torch.export with the batch size dynamic: no bound on it from our checks (a storage-size
    test bounded N, a constraint export refuses); the program serves other batch sizes."""
    n = torch.export.Dim("n")
    x, t = torch.randn(5, 4), torch.randint(0, 4, (5,))
    program = torch.export.export(module, (x, t), dynamic_shapes=({0: n}, {0: n})).module()
    for rows in (3, 9):
        x, t = torch.randn(rows, 4), torch.randint(0, 4, (rows,))
        torch.testing.assert_close(program(x, t), module(x, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_meta_tensors_give_the_shape_of_the_loss(dtype):
    """Shape inference on the meta device, as torch's loss (asking autocast about 'meta'
    raised)."""
    x, t = torch.empty(5, 4, device="meta", dtype=dtype), torch.empty(5, device="meta").long()
    for reduction in ("mean", "none"):
        ours = nllfused.cross_entropy(x, t, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(x, t, reduction=reduction)
        assert (ours.device, ours.shape, ours.dtype) == (theirs.device, theirs.shape, theirs.dtype)
    W = torch.empty(3, 4, device="meta", dtype=dtype)
    ours = nllfused.linear_cross_entropy(x, W, t)
    theirs = torch.nn.functional.linear_cross_entropy(x, W, t)
    assert (ours.device, ours.shape, ours.dtype) == (theirs.device, theirs.shape, theirs.dtype)


@pytest.mark.parametrize("make_index", [torch.tensor, np.int64], ids=["tensor", "numpy"])
@pytest.mark.parametrize("options", [dict(), dict(reduction="none", label_smoothing=0.1)],
                         ids=["plain", "none-smoothing"])
def test_compiled_loss_takes_a_tensor_or_numpy_ignore_index(make_index, options):
    """An ignore_index given as a 0-d tensor or a NumPy integer, which torch.compile traces as
    data (an int of it is a SymInt known only at run time): the loss compiles with
    fullgraph=True, as torch's does, and equals the eager one, gradient included."""
    x = torch.randn(12, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (12,))
    t[::4] = 3
    index = make_index(3)
    weight = torch.rand(7, dtype=torch.float64) + 0.1

    def loss(x, t):
        return nllfused.cross_entropy(x, t, weight, ignore_index=index, **options).sum()

    torch._dynamo.reset()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(xc, t)
    expected = loss(xe, t)
    got.backward()
    expected.backward()
    theirs = torch.nn.functional.cross_entropy(x, t, weight, ignore_index=3, **options).sum()
    torch.testing.assert_close(got, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(expected, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", ["z_loss", "linear", "vocab_parallel"])
def test_compiled_extras_name_a_traced_ignore_index(call):
    """Where nothing of torch's takes a traced ignore_index (z_loss, the fused linear loss, the
    vocabulary-parallel loss), the compiled call raises ArgumentTypeError naming it."""
    x, t, w = torch.randn(6, 5), torch.randint(0, 5, (6,)), torch.randn(5, 5)
    index = torch.tensor(2)
    fn = {"z_loss": lambda: nllfused.cross_entropy(x, t, ignore_index=index, z_loss=1e-3),
          "linear": lambda: nllfused.linear_cross_entropy(x, w, t, ignore_index=index),
          "vocab_parallel": lambda: vocab_parallel_cross_entropy(x, t, ignore_index=index,
                                                                 vocab_start=0)}[call]
    assert torch.isfinite(fn())  # eager takes it
    torch._dynamo.reset()
    with pytest.raises(nllfused.ArgumentTypeError, match="ignore_index must be a Python int"):
        torch.compile(fn, backend="eager")()
