"""Compiled autograd (torch._dynamo.compiled_autograd) of a backward whose forward ran eagerly,
as trainers that enable it around backward() only do: the one-call graph nodes
(csrc/loss.cpp, csrc/loss_stats.cpp) put a call of their backward into the captured graph
(csrc/compiled_node.h), whose gradients equal eager autograd's, to the second order too; and
a forward that runs with compiled autograd on (the general path)."""
import contextlib

import pytest
import torch
from torch._dynamo import compiled_autograd

import nllfused

NODES = ("nllfused::CrossEntropyLossBackward", "nllfused::CrossEntropyLossStatsBackward")

CASES = {
    "mean": dict(),
    "none": dict(reduction="none"),
    "sum-options": dict(reduction="sum", label_smoothing=0.1, ignore_index=1, weight=True),
    "extras": dict(z_loss=1e-2, logit_scale=0.7, softcap=5.0),
    "stats": dict(return_stats=True, ignore_index=1),
    "stats-none": dict(reduction="none", return_stats=True),
}


def inputs(shape, dtype, seed, kw):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    t = torch.randint(0, C, (shape[0],) + shape[2:], generator=g)
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = torch.rand(C, generator=g) + 0.5
    return x, t, kw


def backward_of(x, t, kw, seed):
    """x's gradient of a scalar built from the loss (and the statistics), not the loss itself:
    the loss's node gets its gradient from other nodes of the graph."""
    g = torch.Generator().manual_seed(seed + 1)
    xd = x.clone().requires_grad_()
    out = nllfused.cross_entropy(xd, t, **kw)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    node = loss.grad_fn
    total = (loss * torch.rand(loss.shape, generator=g)).sum()
    if stats is not None:
        total = total + (stats.entropy * 0.3).sum() - (stats.target_logprob * 0.2).sum()
    return xd, node, total


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)], ids=["rows", "kdim"])
@pytest.mark.parametrize("case", CASES)
def test_compiled_autograd_of_an_eager_forward(case, shape, dtype, backend):
    """The forward eager (the one-call node), the backward under compiled autograd: x's
    gradient equals eager autograd's -- bit for bit with the eager backend (the same code
    runs); aot_eager traces the small tensor ops around the kernels, which may then round
    differently in the last bit."""
    x, t, kw = inputs(shape, dtype, 0, CASES[case])
    xe, node, total = backward_of(x, t, kw, 0)
    assert node.name() in NODES  # the one-call path's node, not the general path's
    total.backward()
    xc, node, total = backward_of(x, t, kw, 0)
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend=backend)):
        total.backward()
    assert xe.grad.abs().max() > 0
    exact = dict(rtol=0, atol=0) if backend == "eager" else {}
    torch.testing.assert_close(xc.grad, xe.grad, **exact)


@pytest.mark.parametrize("kw", [dict(return_stats=True), dict(reduction="sum")], ids=str)
def test_compiled_autograd_graph_is_not_reused_with_stale_options(kw):
    """Backward graphs of the same shapes under one compiler: the options are constants of the
    captured graph (another option captures anew), the rows that count are data (another
    ignore_index pattern, or another count of counted rows, reuses the graph, correctly)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    compiler = torch.compile(backend="eager")
    captures = []
    for seed, opts in enumerate([dict(label_smoothing=0.1), dict(label_smoothing=0.3),
                                 dict(ignore_index=2), dict(ignore_index=2)]):
        x, t, kw2 = inputs((8, 5), torch.float32, seed, dict(kw, **opts))
        if seed == 3:
            t[:5] = 2  # five ignored rows where seed 2's targets had fewer
        xe, _, total = backward_of(x, t, kw2, seed)
        total.backward()
        xc, node, total = backward_of(x, t, kw2, seed)
        assert node.name() in NODES
        with compiled_autograd._enable(compiler):
            total.backward()
        captures.append(counters["compiled_autograd"]["captures"])
        torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    assert captures[1] > captures[0] and captures[3] == captures[2]


@pytest.mark.parametrize("case", CASES)
def test_forward_under_compiled_autograd_takes_create_graph(case):
    """A forward that runs with compiled autograd on takes the general path (its backward is
    Python, which compiled autograd traces to any order): a gradient made with create_graph=True
    and its own backward equal eager autograd's. (The ops' aux output takes no gradient: the
    double backward of a 'mean' reached the forward node through aux.sum() alone, and compiled
    autograd added the None it returned.)"""
    x, t, kw = inputs((6, 5), torch.float64, 3, CASES[case])
    g = torch.Generator().manual_seed(4)
    v = torch.randn(x.shape, generator=g, dtype=x.dtype)

    def second_order():
        xd, node, total = backward_of(x, t, kw, 3)
        assert (node.name() in NODES) == (not compiled_autograd.compiled_autograd_enabled)
        (gx,) = torch.autograd.grad(total, xd, create_graph=True)
        (gx * v).sum().backward()
        return gx.detach(), xd.grad

    want = second_order()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        got = second_order()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)], ids=["rows", "kdim"])
@pytest.mark.parametrize("case", CASES)
def test_compiled_autograd_of_an_eager_forward_with_create_graph(case, shape):
    """The forward eager (the one-call node), a gradient made with create_graph=True under
    compiled autograd, then its own backward: both equal eager autograd's. The node's
    create_graph backward differentiates torch's formula by a nested autograd call, which
    dynamo cannot trace: that call runs eagerly as the graph runs (csrc/compiled_node.h)."""
    x, t, kw = inputs(shape, torch.float64, 5, CASES[case])
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)

    def second_order(compiled):
        xd, node, total = backward_of(x, t, kw, 5)
        assert node.name() in NODES
        with compiled_autograd._enable(torch.compile(backend="eager")) if compiled else \
                contextlib.nullcontext():
            (gx,) = torch.autograd.grad(total, xd, create_graph=True)
            (gx * v).sum().backward()
        return gx.detach(), xd.grad

    torch.testing.assert_close(second_order(True), second_order(False), rtol=1e-12, atol=1e-14)


def test_compiled_autograd_graphs_of_one_node_with_and_without_create_graph():
    """One loss's backward() under compiled autograd, then backward(create_graph=True) of the
    same graph and the gradient's own backward, then backward() again: each as eager autograd
    gives it, whichever graph compiled autograd captured first."""
    x, t, kw = inputs((6, 5), torch.float64, 7, {})
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)

    def run(compiled, create_graph):
        xd = x.clone().requires_grad_()
        loss = nllfused.cross_entropy(xd, t, **kw)
        ctx = (lambda: compiled_autograd._enable(torch.compile(backend="eager"))) if compiled \
            else contextlib.nullcontext
        with ctx():
            loss.backward(create_graph=create_graph)
        gx, xd.grad = xd.grad, None
        if create_graph:
            with ctx():
                (gx * v).sum().backward()
        return gx.detach(), xd.grad

    torch._dynamo.reset()
    for create_graph in (False, True, False):
        torch.testing.assert_close(run(True, create_graph), run(False, create_graph),
                                   rtol=1e-12, atol=1e-14)
