"""Errors as torch raises them: for every bad call torch's own cross_entropy rejects, ours is
catchable by the same exception class (ours derive from both ValueError/TypeError and
RuntimeError) and carries torch's key phrase, so code and searches written for torch work."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import nllfused

X = lambda *s: torch.randn(*s)  # noqa: E731
T = lambda n, c=5: torch.randint(0, c, (n,))  # noqa: E731

# (id, kwargs builder, torch's key phrase that our message must contain)
CASES = [
    ("smoothing_high", lambda: dict(input=X(4, 5), target=T(4), label_smoothing=1.5),
     "label_smoothing must be between 0.0 and 1.0"),
    ("weight_size", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(3)),
     "weight tensor should be defined either for all 5 classes or no classes"),
    ("weight_2d", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(5, 1)),
     "weight tensor should be defined either for all 5 classes or no classes"),
    ("weight_int", lambda: dict(input=X(4, 5), target=T(4), weight=torch.ones(5).long()),
     "expected scalar type Float"),
    ("prob_target_ignore_index", lambda: dict(input=X(4, 5), target=torch.rand(4, 5),
                                              ignore_index=1),
     "ignore_index is not supported for floating point target"),
    ("batch_size", lambda: dict(input=X(4, 5), target=T(3)),
     "Expected input batch_size (4) to match target batch_size (3)"),
    ("kdim_target_size", lambda: dict(input=X(2, 5, 3), target=torch.zeros(2, 4).long()),
     "Expected target size [2, 3], got [2, 4]"),
    ("float_index_target", lambda: dict(input=X(4, 5), target=torch.rand(4)),
     "expected target dtype to be Long"),
    ("long_target_of_input_shape", lambda: dict(input=X(2, 3), target=torch.zeros(2, 3).long()),
     "Expected floating point type for target with class probabilities"),
    ("prob_target_shape", lambda: dict(input=X(4, 5), target=torch.rand(4, 6)),
     "multi-target not supported"),
    ("bool_target", lambda: dict(input=X(4, 5), target=torch.ones(4, dtype=torch.bool)),
     "expected target dtype to be Long"),
    ("int16_target", lambda: dict(input=X(4, 5), target=T(4).short()),
     "expected target dtype to be Long"),
    ("int8_target", lambda: dict(input=X(4, 5, 3), target=torch.zeros(4, 3, dtype=torch.int8)),
     "expected target dtype to be Long"),
    ("reduction", lambda: dict(input=X(4, 5), target=T(4), reduction="avg"),
     "is not a valid value for reduction"),
    ("integer_logits", lambda: dict(input=torch.ones(4, 5).long(), target=T(4)),
     "must be float16, bfloat16, float32 or float64"),
    ("complex_logits", lambda: dict(input=torch.randn(4, 5, dtype=torch.cfloat), target=T(4)),
     "must be float16, bfloat16, float32 or float64"),
    ("zero_dim_input", lambda: dict(input=torch.tensor(1.0), target=torch.tensor(0)), ""),
    ("zero_dim_input_float_target", lambda: dict(input=torch.tensor(1.0),
                                                 target=torch.tensor(1.0)), "0-dimensional"),
    ("zero_classes", lambda: dict(input=X(3, 0), target=T(3, 1)), "out of bounds"),
    ("target_out_of_bounds", lambda: dict(input=X(4, 5), target=torch.tensor([0, 1, 2, 7])),
     "Target 7 is out of bounds"),
    ("target_negative", lambda: dict(input=X(4, 5), target=torch.tensor([0, -3, 2, 1])),
     "Target -3 is out of bounds"),
    ("zero_dim_target", lambda: dict(input=X(4, 5), target=torch.tensor(1)),
     "Expected input batch_size (4) to match target batch_size (0)"),
    ("zero_rows_zero_dim_target", lambda: dict(input=X(0, 5), target=torch.tensor(1)), ""),
    ("unbatched_target_size", lambda: dict(input=X(5), target=torch.tensor([1, 2])),
     "For 1D input, 1D target must have size 1, but got target size: 2"),
    ("one_class_unbatched_long_target", lambda: dict(input=X(1), target=torch.tensor([0])),
     "Expected floating point type for target with class probabilities"),
    ("input_not_a_tensor", lambda: dict(input=[[1.0, 2.0]], target=T(1)), "must be a Tensor"),
    ("ignore_index_float", lambda: dict(input=X(4, 5), target=T(4), ignore_index=1.5),
     "ignore_index must be an int"),
    ("ignore_index_array", lambda: dict(input=X(4, 5), target=T(4),
                                        ignore_index=torch.tensor([1]).numpy()),
     "ignore_index must be an int"),
    ("weight_requires_grad", lambda: dict(input=X(4, 5).requires_grad_(), target=T(4),
                                          weight=torch.rand(5).requires_grad_()),
     "is not differentiable with respect to argument 'weight'"),
    ("smoothing_requires_grad", lambda: dict(
        input=X(4, 5), target=T(4), label_smoothing=torch.tensor(0.2, requires_grad=True)),
     "label_smoothing must be a real number"),
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case,phrase", [pytest.param(b, p, id=i) for i, b, p in CASES])
def test_raises_what_torch_raises(backend, case, phrase):
    kwargs = case()
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(**kwargs)
    with pytest.raises(Exception) as ours:
        nllfused.cross_entropy(**kwargs, backend=backend)
    assert isinstance(ours.value, type(theirs.value)), (
        f"torch raises {type(theirs.value).__name__}, we raise {type(ours.value).__name__}: "
        f"`except {type(theirs.value).__name__}` would miss ours")
    assert phrase in str(ours.value)


class IndexLike:
    """An object that is an int by __index__, as torch takes for an int argument."""

    def __init__(self, value):
        self.value = value

    def __index__(self):
        return self.value


# What torch takes besides the documented types, and what it makes of it.
ACCEPTED = [
    pytest.param(dict(reduction="elementwise_mean"), id="elementwise_mean"),
    pytest.param(dict(label_smoothing=-0.2), id="smoothing_negative"),  # none: torch checks <= 1
    pytest.param(dict(label_smoothing=float("nan")), id="smoothing_nan"),
    pytest.param(dict(label_smoothing=True), id="smoothing_bool"),
    pytest.param(dict(label_smoothing=torch.tensor(0.3)), id="smoothing_tensor"),
    pytest.param(dict(label_smoothing=torch.tensor(0.3).numpy()[()]), id="smoothing_numpy"),
    pytest.param(dict(label_smoothing=torch.tensor(True).numpy()[()]), id="smoothing_numpy_bool"),
    pytest.param(dict(ignore_index=IndexLike(2)), id="ignore_index_with___index__"),
    pytest.param(dict(ignore_index=torch.tensor(2)), id="ignore_index_tensor"),
    pytest.param(dict(ignore_index=torch.tensor(2).numpy()[()]), id="ignore_index_numpy"),
    pytest.param(dict(ignore_index=torch.tensor([2])), id="ignore_index_one_element"),
    pytest.param(dict(ignore_index=torch.tensor([[2]], dtype=torch.int32)),
                 id="ignore_index_one_element_2d"),
]


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("kw", ACCEPTED)
def test_takes_what_torch_takes(backend, kw):
    x, t = X(6, 5), torch.tensor([0, 1, 2, 3, 4, 2])
    with pytest.warns(UserWarning) if kw.get("reduction") else contextlib.nullcontext():
        theirs = F.cross_entropy(x.double(), t, **kw)
    with pytest.warns(UserWarning) if kw.get("reduction") else contextlib.nullcontext():
        ours = nllfused.cross_entropy(x, t, backend=backend, **kw)
    # float32 logits: a float32 loss, within float32's tolerance of float64 torch's
    torch.testing.assert_close(ours, theirs.float())
    if kw.get("reduction") or "ignore_index" in kw:
        return
    module = nllfused.CrossEntropyLoss(backend=backend, **kw)
    torch.testing.assert_close(module(x, t), theirs.float())


def test_module_errors_are_catchable_as_runtime_error():
    for bad in (dict(reduction="avg"), dict(label_smoothing=2.0), dict(backend="tpu")):
        with pytest.raises(RuntimeError):
            nllfused.CrossEntropyLoss(**bad)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kw", [dict(), dict(weight=True), dict(ignore_index=2)], ids=str)
def test_unbatched_input_takes_a_target_of_shape_1_as_torch(backend, reduction, kw):
    """What torch accepts, we accept: a 1-D input's class index as a (1,) tensor, the same as a
    0-dim one (torch: "For 1D input, 1D target must have size 1"); the loss 0-dim whatever the
    reduction, as torch's; and a gradient, which torch's backward refuses for that target
    ("size mismatch"): the 0-dim target's."""
    x = X(5).requires_grad_()
    kw = dict(kw, weight=torch.rand(5) + 0.1) if kw.get("weight") else kw
    for y in (2, 3):
        theirs = F.cross_entropy(x, torch.tensor([y]), reduction=reduction, **kw)
        ours = nllfused.cross_entropy(x, torch.tensor([y]), reduction=reduction, backend=backend,
                                      **kw)
        assert ours.shape == theirs.shape == ()
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        if torch.isfinite(theirs):
            scalar = F.cross_entropy(x, torch.tensor(y), reduction=reduction, **kw)
            torch.testing.assert_close(torch.autograd.grad(ours, x)[0],
                                       torch.autograd.grad(scalar, x)[0])


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_learned_class_weights(backend):
    """A class weight that requires grad is never left silently without its gradient: with
    probability targets it gets torch's (torch differentiates those losses in the weights), with
    the extras torch lacks it is refused (NotImplementedError), as it is for class-index targets
    everywhere (as torch refuses it: nll_loss), the fused linear and vocabulary-parallel losses
    included; under no_grad it is only a constant."""
    from nllfused.distributed import vocab_parallel_cross_entropy
    x = X(4, 5).requires_grad_()
    prob = torch.rand(4, 5).softmax(1)
    w = (torch.rand(5) + 0.1).requires_grad_()
    for kw in (dict(), dict(label_smoothing=0.2, reduction="sum")):
        ours = nllfused.cross_entropy(x, prob, weight=w, backend=backend, **kw)
        theirs = F.cross_entropy(x, prob, weight=w, **kw)
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(theirs, (x, w))):
            torch.testing.assert_close(a, b)
    with pytest.raises(NotImplementedError, match="weight requires grad"):
        nllfused.cross_entropy(x, prob, weight=w, backend=backend, z_loss=1e-3)
    with pytest.raises(RuntimeError, match="weight.detach"):
        nllfused.CrossEntropyLoss(weight=w, backend=backend)(x, T(4))
    with pytest.raises(RuntimeError, match="weight.detach"):
        nllfused.linear_cross_entropy(x, torch.randn(5, 5), T(4), weight=w, backend=backend)
    with pytest.raises(RuntimeError, match="weight.detach"):
        vocab_parallel_cross_entropy(x, T(4), weight=w)
    t = T(4)
    with torch.no_grad():
        torch.testing.assert_close(nllfused.cross_entropy(x, t, weight=w, backend=backend),
                                   F.cross_entropy(x, t, weight=w))


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shapes", [((4, 0), (4, 0)), ((2, 0, 3), (2, 0, 3)), ((0, 0), (0,)),
                                    ((2, 0, 0), (2, 0)), ((4, 0), (4,)), ((0,), ())], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("extras", [{}, {"logit_scale": 0.5, "softcap": 10.0}, {"z_loss": 0.1}],
                         ids=["plain", "scale_softcap", "z_loss"])
def test_no_classes_and_no_index_to_check_as_torch(backend, reduction, shapes, ignore_index,
                                                   extras):
    """Logits of 0 classes with probability targets, with no class index, or with every class
    index ignore_index: torch's results (zeros, -0.0, empty, NaN) and gradient, not an error;
    with a class index, torch's IndexError (the CASES above: zero_classes, and below). The
    extras change nothing there: no logit to transform, no counted row for z-loss -- but rows
    of 0 classes with probability targets, which z-loss counts: their lse is -inf, an error."""
    x_shape, t_shape = shapes
    x = torch.randn(x_shape).requires_grad_()
    prob = len(t_shape) == len(x_shape)
    t = torch.zeros(t_shape) if prob else torch.full(t_shape, ignore_index)
    if prob and "z_loss" in extras and (len(x_shape) == 1
                                        or 0 not in (x_shape[0], *x_shape[2:])):
        with pytest.raises(ValueError, match="0 classes.*z-loss"):
            nllfused.cross_entropy(x, t, backend=backend, reduction=reduction, **extras)
        return
    kw = dict(reduction=reduction) if prob else dict(reduction=reduction, ignore_index=ignore_index)
    theirs = F.cross_entropy(x, t, **kw)
    kw.update(extras)
    ours = nllfused.cross_entropy(x, t, backend=backend, **kw)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    with pytest.raises(ValueError, match="0 classes.*statistics"):
        nllfused.cross_entropy(x, t, backend=backend, return_stats=True, **kw)
    if not prob and t.numel():
        with pytest.raises(IndexError):  # one class index that is not ignored: out of bounds
            nllfused.cross_entropy(x, t.flatten().index_fill(0, torch.tensor(0), 0).view(t_shape),
                                   backend=backend, **kw)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.14")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_index", [None, 3])
def test_linear_no_classes_and_every_target_ignored_as_torch(reduction, ignore_index):
    """A linear_weight of 0 rows with every class index ignore_index: torch's 0s, 0 or NaN, and
    a zero gradient; with one that is not ignored, torch's IndexError."""
    x, w = X(4, 3).requires_grad_(), X(0, 3).requires_grad_()
    t = torch.full((4,), -100 if ignore_index is None else ignore_index)
    theirs = F.linear_cross_entropy(x, w, t, ignore_index=ignore_index, reduction=reduction)
    ours = nllfused.linear_cross_entropy(x, w, t, ignore_index=ignore_index, reduction=reduction)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    if reduction != "mean":
        for a, b in zip(torch.autograd.grad(ours.sum(), (x, w)),
                        torch.autograd.grad(theirs.sum(), (x, w))):
            torch.testing.assert_close(a, b)
    with pytest.raises(IndexError):
        nllfused.linear_cross_entropy(x, w, t.index_fill(0, torch.tensor(1), 0),
                                      ignore_index=ignore_index)


LINEAR_CASES = [
    ("int8_target", lambda: (X(6, 3), X(5, 3), torch.zeros(6, dtype=torch.int8)), {}),
    ("int16_target_chunked", lambda: (X(6, 3), X(5, 3), T(6).short()), dict(chunk_size=2)),
    ("prob_target_ignore_index", lambda: (X(6, 3), X(5, 3), torch.rand(6, 5).softmax(1)),
     dict(ignore_index=-100)),
    ("integer_input", lambda: (torch.ones(6, 3).long(), torch.ones(5, 3).long(), T(6)), {}),
    ("no_classes", lambda: (X(6, 3), X(0, 3), torch.zeros(6).long()), {}),
]


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.14")
@pytest.mark.parametrize("case,kw", [pytest.param(b, k, id=i) for i, b, k in LINEAR_CASES])
def test_linear_raises_what_torch_raises(case, kw):
    """nllfused.linear_cross_entropy refuses what torch's F.linear_cross_entropy refuses, with an
    instance of torch's exception class (chunked or not)."""
    x, w, t = case()
    torch_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(x, w, t, **torch_kw)
    with pytest.raises(Exception) as ours:
        nllfused.linear_cross_entropy(x, w, t, **kw)
    assert isinstance(ours.value, type(theirs.value)), (type(theirs.value), type(ours.value))


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.14")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kw", [dict(), dict(chunk_size=1), dict(return_stats=True)], ids=str)
def test_linear_unbatched_input_takes_a_target_of_shape_1_as_torch(reduction, kw):
    """An (H,) input's class index as a (1,) tensor, as torch's F.linear_cross_entropy takes it:
    its loss (0-dim), and the gradient of the 0-dim target's call (torch's backward refuses the
    (1,) one, as for cross_entropy)."""
    x, w = X(8).requires_grad_(), X(5, 8).requires_grad_()
    for y in (2, -100):
        theirs = F.linear_cross_entropy(x, w, torch.tensor([y]), reduction=reduction)
        ours = nllfused.linear_cross_entropy(x, w, torch.tensor([y]), reduction=reduction, **kw)
        ours = ours[0] if isinstance(ours, tuple) else ours
        assert ours.shape == theirs.shape == ()
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        if torch.isfinite(theirs):
            scalar = F.linear_cross_entropy(x, w, torch.tensor(y), reduction=reduction)
            for a, b in zip(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(scalar, (x, w))):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["whole", "chunked"])
def test_linear_one_class_unbatched_integer_target_of_shape_1_is_refused(chunk_size):
    """One class: a (1,) target is the logits' shape, probabilities to torch, which refuses an
    integer dtype for them -- whole logits or chunks alike (the chunks took it as an index)."""
    x, w, t = X(8), X(1, 8), torch.tensor([0])
    with pytest.raises(RuntimeError) as theirs:
        F.linear_cross_entropy(x, w, t)
    with pytest.raises(type(theirs.value), match="Expected floating point type for target"):
        nllfused.linear_cross_entropy(x, w, t, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_weights_as_torch_takes_them(backend, reduction):
    """Class weights torch takes beyond a floating (C,) tensor: with class indices and K-dim
    logits any shape of C elements (its N-d loss reads them flat; a 2-D input's must be (C,));
    with probability targets integer and bool dtypes (its w q log p promotes). Values, dtype and
    gradient as torch's; the 2-D and index-target cases still refused, as torch refuses them."""
    x = X(3, 4, 2, 2).double().requires_grad_()
    t = torch.randint(0, 4, (3, 2, 2))
    for shape in ((1, 4), (4, 1), (2, 2)):
        w = torch.rand(shape, dtype=torch.float64)
        theirs = F.cross_entropy(x, t, weight=w, reduction=reduction)
        ours = nllfused.cross_entropy(x, t, weight=w, reduction=reduction, backend=backend)
        torch.testing.assert_close(ours, theirs)
        with pytest.raises(RuntimeError, match="weight tensor should be defined"):
            nllfused.cross_entropy(x[:, :, 0, 0], t[:, 0, 0], weight=w, backend=backend)
    q = torch.softmax(torch.randn(3, 4, 2, 2, dtype=torch.float64), 1)
    for w in (torch.tensor([1, 2, 0, 1]), torch.tensor([True, False, True, True]),
              torch.tensor([3, 0, 1, 1], dtype=torch.uint8)):
        for smoothing in (0.0, 0.2):
            theirs = F.cross_entropy(x, q, weight=w, reduction=reduction,
                                     label_smoothing=smoothing)
            ours = nllfused.cross_entropy(x, q, weight=w, reduction=reduction,
                                          label_smoothing=smoothing, backend=backend)
            assert ours.dtype == theirs.dtype
            torch.testing.assert_close(ours, theirs)
            torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0],
                                       torch.autograd.grad(theirs.sum(), x)[0])
        with pytest.raises(RuntimeError, match="expected scalar type Float"):
            nllfused.cross_entropy(x, t, weight=w, backend=backend)
