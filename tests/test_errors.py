"""Bad input: a Python exception that names the problem, never a crash or a silent number;
and the library keeps working afterwards."""
import pytest
import torch

import nllfused
from helpers import backend_params, backends_here

X = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731
T = lambda n, c=5: torch.randint(0, c, (n,))  # noqa: E731

BAD = [
    # (id, call kwargs builder, exception type, message fragment)
    ("target_too_large", lambda: dict(input=X(4, 5), target=torch.tensor([0, 1, 2, 7])),
     IndexError, "Target 7 is out of bounds"),
    ("target_negative", lambda: dict(input=X(4, 5), target=torch.tensor([0, -3, 2, 1])),
     IndexError, "Target -3 is out of bounds"),
    ("target_shape", lambda: dict(input=X(4, 5), target=T(3)), ValueError,
     "Expected input batch_size (4) to match target batch_size (3)"),
    ("target_kdim_shape",
     lambda: dict(input=X(2, 5, 3), target=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "Expected target size [2, 3], got [2, 4]"),
    ("float_index_target", lambda: dict(input=X(4, 5), target=torch.rand(4)), TypeError,
     "class indices must be an integer tensor"),
    ("prob_target_shape", lambda: dict(input=X(4, 5), target=torch.rand(4, 6)), ValueError,
     "probability targets must have the input's shape"),
    ("prob_target_ignore_index", lambda: dict(input=X(4, 5), target=torch.rand(4, 5),
                                              ignore_index=1),
     ValueError, "ignore_index is not supported"),
    ("bool_target", lambda: dict(input=X(4, 5), target=torch.ones(4, dtype=torch.bool)),
     TypeError, "target must hold class indices"),
    ("weight_size", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(3)), ValueError,
     "one entry per class (5)"),
    ("weight_2d", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(5, 1)), ValueError,
     "weight must be a 1-D tensor"),
    ("weight_int", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(5, dtype=torch.long)),
     TypeError, "weight must be floating point"),
    ("smoothing_high", lambda: dict(input=X(4, 5), target=T(4), label_smoothing=1.5), ValueError,
     "label_smoothing must be between 0.0 and 1.0"),
    # (below 0 or NaN: no smoothing, as torch: test_torch_errors.py, test_takes_what_torch_takes)
    ("smoothing_inf", lambda: dict(input=X(4, 5), target=T(4), label_smoothing=float("inf")),
     ValueError, "label_smoothing must be between 0.0 and 1.0"),
    ("smoothing_str", lambda: dict(input=X(4, 5), target=T(4), label_smoothing="0.1"),
     TypeError, "label_smoothing must be a real number"),
    ("reduction", lambda: dict(input=X(4, 5), target=T(4), reduction="avg"), ValueError,
     "is not a valid value for reduction"),
    ("integer_logits", lambda: dict(input=torch.ones(4, 5, dtype=torch.long), target=T(4)),
     TypeError, "input (the logits) must be float16, bfloat16, float32 or float64"),
    ("zero_dim_input", lambda: dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError,
     "input is 0-dimensional"),
    ("zero_classes", lambda: dict(input=X(3, 0), target=T(3, 1)), IndexError, "0 classes"),
    ("negative_z_loss", lambda: dict(input=X(4, 5), target=T(4), z_loss=-1.0), ValueError,
     "z_loss must be >= 0"),
    ("softcap_zero", lambda: dict(input=X(4, 5), target=T(4), softcap=0.0), ValueError,
     "softcap must be a positive number"),
    ("unknown_backend", lambda: dict(input=X(4, 5), target=T(4), backend="tpu"), ValueError,
     "unknown backend 'tpu'"),
    ("cuda_backend_cpu_tensor", lambda: dict(input=X(4, 5), target=T(4), backend="cuda"),
     RuntimeError, "backend='cuda' is not available"),
    ("not_a_tensor", lambda: dict(input=[[1.0, 2.0]], target=T(1)), TypeError,
     "input must be a Tensor"),
    ("ignore_index_float", lambda: dict(input=X(4, 5), target=T(4), ignore_index=1.5), TypeError,
     "ignore_index must be an int"),
    ("sparse_input", lambda: dict(input=X(4, 5).to_sparse(), target=T(4)), NotImplementedError,
     "input has layout torch.sparse_coo"),
    ("sparse_csr_input", lambda: dict(input=X(4, 5).to_sparse_csr(), target=T(4)),
     NotImplementedError, "input has layout torch.sparse_csr"),
    ("sparse_target", lambda: dict(input=X(4, 5), target=torch.rand(4, 5).to_sparse()),
     NotImplementedError, "target has layout torch.sparse_coo"),
    ("sparse_weight", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(5).to_sparse()),
     NotImplementedError, "weight has layout torch.sparse_coo"),
    # an expanded view of 2^62 logits: torch fails at once (its output's storage); the kernels
    # would read them for ever
    ("storage_overflow", lambda: dict(input=torch.zeros(1, 1).expand(2 ** 31, 2 ** 31),
                                      target=torch.zeros(1, dtype=torch.long).expand(2 ** 31)),
     RuntimeError, "Storage size calculation overflowed"),
    ("scale_past_float", lambda: dict(input=X(4, 5), target=T(4), logit_scale=2 ** 1030),
     ValueError, "logit_scale must be finite"),
]


# The checks must come first on every path a CPU call can take: "auto" (the C++ kernels where
# built) and each other backend that can run CPU tensors here.
@pytest.mark.parametrize("backend", ["auto"] + backends_here("cpu", only=("torch", "triton")))
@pytest.mark.parametrize("case,exc,fragment", [pytest.param(b, e, f, id=i) for i, b, e, f in BAD])
def test_bad_input_raises_clear_error(backend, case, exc, fragment):
    kwargs = case()
    kwargs.setdefault("backend", backend)
    with pytest.raises(exc) as info:
        nllfused.cross_entropy(**kwargs)
    assert fragment in str(info.value)
    # ... and the library keeps working.
    x, t = X(3, 4), T(3, 4)
    expected = torch.nn.functional.cross_entropy(x.double(), t).float()
    torch.testing.assert_close(nllfused.cross_entropy(x, t), expected)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction"):
        nllfused.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        nllfused.CrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        nllfused.CrossEntropyLoss(backend="tpu")


class ScaledLoss(nllfused.CrossEntropyLoss):
    def forward(self, input, target):
        return 3.0 * super().forward(input, target)


def hooked_loss():
    loss = nllfused.CrossEntropyLoss()
    loss.register_forward_hook(lambda module, args, out: out * 10)
    return loss


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("module", [lambda: nllfused.CrossEntropyLoss(z_loss=1e-4),
                                    lambda: nllfused.CrossEntropyLoss(return_stats=True),
                                    ScaledLoss, hooked_loss,
                                    lambda: nllfused.LinearCrossEntropyLoss(4, 5)],
                         ids=["z_loss", "return_stats", "subclass", "hooked", "linear"])
def test_torchscript_says_what_to_use_instead(module):
    with pytest.raises(TypeError, match="TorchScript.*torch.compile, torch.jit.trace"):
        torch.jit.script(module())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("calls_loss", [False, True], ids=["holds", "calls"])
def test_torchscript_of_a_model_with_the_loss_takes_torchs_module(calls_loss):
    """A model that holds the loss (a criterion kept beside the network) or calls it scripts,
    with torch's module in its place: the same loss, with the module's weight and options."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 5)
            self.criterion = nllfused.CrossEntropyLoss(
                torch.rand(5) + 0.5, ignore_index=torch.tensor(2), label_smoothing=0.1)
            self.calls_loss = calls_loss

        def forward(self, x, t):
            return self.criterion(self.lin(x), t) if self.calls_loss else self.lin(x)

    model = Model().eval()
    scripted = torch.jit.script(model)
    x, t = X(6, 4), torch.tensor([0, 1, 2, 3, 4, 2])
    torch.testing.assert_close(scripted(x, t), model(x, t))
    assert not scripted.criterion.training


def test_triton_on_cpu_without_interpreter_says_how_to_enable(monkeypatch):
    from nllfused.kernels import cross_entropy as triton_kernels
    monkeypatch.setattr(triton_kernels, "INTERPRETER", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nllfused.cross_entropy(X(3, 4), T(3, 4), backend="triton")


@pytest.mark.parametrize("device,backend", backend_params())
def test_out_of_range_target_without_host_check_gives_nan_not_a_number(device, backend):
    """What a GPU call does with a bad target (no host check): the offending rows' losses are
    NaN and so is the mean; no out-of-bounds read. Exercised here through the per-row op."""
    from nllfused import _checks, ops
    x = X(4, 5).to(device)
    t = torch.tensor([0, 9, 2, -7]).to(device)
    call = _checks.canonicalize(x, t, None, -100)
    forward, _ = ops.for_backend(backend)
    if backend == "cpu":  # the C++ CPU kernel checks every target itself
        with pytest.raises(IndexError, match="out of bounds"):
            forward(call.logits, call.target, call.weight, *call.options)
        return
    loss, _, aux = forward(call.logits, call.target, call.weight, *call.options)
    assert torch.isnan(loss[1]).all() and torch.isnan(loss[3]).all()
    assert torch.isfinite(loss[0]).all() and torch.isfinite(loss[2]).all()
    assert torch.isnan(aux.sum())


@pytest.mark.gpu
def test_opt_in_target_check_raises_on_gpu():
    x = torch.randn(4, 5, device="cuda")
    t = torch.tensor([0, 9, 2, 1], device="cuda")
    assert torch.isnan(nllfused.cross_entropy(x, t))
    nllfused.set_target_check(True)
    try:
        with pytest.raises(IndexError, match="Target 9"):
            nllfused.cross_entropy(x, t)
    finally:
        nllfused.set_target_check(False)


def negative_view(x):
    """x's values in memory holding -x (x.conj().imag of a complex tensor does the same)."""
    return torch._neg_view(-x)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(6, 5), (6, 300), (2, 5, 3)])
def test_negative_views_and_zero_tensors_are_their_values(device, backend, reduction, shape):
    """Logits that are a negative view (memory -x, values x) or a ZeroTensor (no memory): the
    loss and gradient of their values, as torch's (the C++ kernels called straight read the
    memory: the loss of -x; a null pointer, a crash)."""
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:])
    zeros = torch._efficientzerotensor(shape, dtype=torch.float64)
    for logits, values in ((negative_view(x), x), (zeros, None)):
        values = torch.zeros(shape, dtype=torch.float64) if values is None else values
        leaf = logits.detach().to(device).requires_grad_()  # (keeps the view's bits)
        assert leaf.is_neg() == logits.is_neg()
        ours = nllfused.cross_entropy(leaf, t.to(device), reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(ours.sum(), leaf)
        ref_leaf = values.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(ref_leaf, t, reduction=reduction)
        (g_ref,) = torch.autograd.grad(ref.sum(), ref_leaf)
        torch.testing.assert_close(ours.cpu(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", backend_params())
def test_negative_view_gradients_of_the_statistics(device, backend):
    """The upstream gradients of entropy and target log-prob as negative views beside a
    plain one of the loss (per row, 'none': handed to the backward as they are): their
    values, as plain tensors give."""
    x = torch.randn(4, 5, 3, device=device)
    t = torch.randint(0, 5, (4, 3), device=device)
    for names in (("entropy",), ("target_logprob",), ("entropy", "target_logprob")):
        ups = [torch.randn(4, 3, device=device) for _ in range(len(names) + 1)]
        grads = []
        for given in (ups, ups[:1] + [negative_view(u) for u in ups[1:]]):
            leaf = x.clone().requires_grad_()
            loss, st = nllfused.cross_entropy(leaf, t, reduction="none", backend=backend,
                                              return_stats=names)
            outs = [loss] + [getattr(st, n) for n in names]
            grads.append(torch.autograd.grad(outs, leaf, given)[0])
        assert torch.equal(grads[1], grads[0]), names  # the same values: the same bits


def test_a_zero_tensor_upstream_gradient():
    """autograd may hand the backward a ZeroTensor gradient (no memory): a zero gradient."""
    class ZeroGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            return torch._efficientzerotensor(g.shape, dtype=g.dtype)

    for reduction in ("none", "mean"):
        x = torch.randn(6, 5, requires_grad=True)
        loss = nllfused.cross_entropy(x, T(6), reduction=reduction)
        (g,) = torch.autograd.grad(ZeroGrad.apply(loss).sum(), x)
        assert torch.equal(g, torch.zeros_like(x))


def test_the_ops_called_directly_check_what_the_function_checks():
    """The one-call op as torch.ops.nllfused.cross_entropy_loss: a target of another shape
    (same size) is torch's "size mismatch", not a loss of other rows; class weights that
    require grad are refused, not left without a gradient; a meta tensor among CPU ones is
    torch's device error, not CPU garbage."""
    op = torch.ops.nllfused.cross_entropy_loss
    x = torch.randn(2, 5, 3, 2)
    for bad in (torch.zeros(2, 2, 3, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long)):
        with pytest.raises(RuntimeError, match="size mismatch"):
            op(x, bad, None, 1, -100, 0.0)
    w = torch.ones(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="weight requires grad"):
        op(torch.randn(4, 5), T(4), w, 1, -100, 0.0)
    meta = torch.ones(5, device="meta")
    with pytest.raises(RuntimeError, match="same device"):
        op(torch.randn(4, 5), T(4).to("meta"), None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.nllfused.ce_fwd(torch.randn(4, 5, 1), T(4).view(4, 1), meta, -100, 0.0, 1.0,
                                  0.0, False)
    x, t = X(3, 4), T(3, 4)
    torch.testing.assert_close(op(x, t, None, 1, -100, 0.0),
                               torch.nn.functional.cross_entropy(x, t))


def test_an_integer_z_loss_past_int64_is_a_number():
    x, t = X(4, 5, dtype=torch.float64), T(4)
    for backend in ["auto"] + backends_here("cpu", only=("torch",)):
        a = nllfused.cross_entropy(x, t, z_loss=10 ** 30, backend=backend)
        b = nllfused.cross_entropy(x, t, z_loss=1e30, backend=backend)
        assert torch.equal(a, b), backend


def test_numpy_numbers_and_huge_ints_are_the_extras_as_floats():
    """z_loss, logit_scale and softcap taken as NumPy numbers (as label_smoothing is) and as
    ints past int64, by every entry point: the same results as the Python floats, never a NumPy
    or int64 value meeting the torch ops downstream."""
    import numpy as np
    from nllfused.distributed import vocab_parallel_cross_entropy

    x, t = X(4, 5, dtype=torch.float64), T(4)
    h, W = X(4, 3, dtype=torch.float64), X(5, 3, dtype=torch.float64)
    as_numpy = dict(z_loss=np.float32(0.25), logit_scale=np.float16(0.5), softcap=np.int64(3))
    as_float = {k: float(v) for k, v in as_numpy.items()}
    huge, huge_f = dict(z_loss=10 ** 30), dict(z_loss=1e30)
    for kw, ref in ((as_numpy, as_float), (huge, huge_f)):
        for backend in ["auto"] + backends_here("cpu", only=("torch",)):
            calls = [lambda o: nllfused.cross_entropy(x, t, backend=backend, **o),
                     lambda o: nllfused.CrossEntropyLoss(backend=backend, **o)(x, t),
                     lambda o: nllfused.linear_cross_entropy(h, W, t, backend=backend, **o),
                     lambda o: nllfused.linear_cross_entropy(h, W, t, backend=backend,
                                                             chunk_size=8, **o),
                     lambda o: nllfused.linear_cross_entropy(h, W, t, backend=backend,
                                                             return_stats=True, **o)[0]]
            if "logit_scale" not in kw:
                calls.append(lambda o: vocab_parallel_cross_entropy(x, t, backend=backend, **o))
            for i, call in enumerate(calls):
                assert torch.equal(call(kw), call(ref)), (backend, i, kw)
