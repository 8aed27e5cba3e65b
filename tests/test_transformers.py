"""nllfused.integrations.transformers: a patched Hugging Face model trains as the unpatched one.

Small, randomly initialised, config-built models only (nothing is downloaded). Skipped without
transformers (an optional dependency).
"""
import copy
import inspect
import pickle
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
loss_utils = pytest.importorskip("transformers.loss.loss_utils")

import nllfused  # noqa: E402
import nllfused.integrations.transformers as nft  # noqa: E402
from helpers import backends_here  # noqa: E402

VOCAB = 256


def tiny_llama(vocab=VOCAB, layers=2):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def batches(steps, batch=4, seq=16, vocab=VOCAB):
    """Token batches from a random Markov chain (each token has two successors), so the model
    learns; labels with ignored (-100) tokens and right padding; every third step carries
    num_items_in_batch (as the Trainer does under gradient accumulation: the count over two
    micro-batches, so that loss is about half the mean), as a tensor or an int."""
    successors = torch.randint(0, vocab, (vocab, 2))
    out = []
    for step in range(steps):
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,))
        for t in range(1, seq):
            ids[:, t] = successors[ids[:, t - 1], torch.randint(0, 2, (batch,))]
        labels = ids.clone()
        labels[torch.rand(batch, seq) < 0.2] = -100
        labels[0, seq - 3:] = -100  # padding
        kwargs = {}
        if step % 3 == 2:
            counted = int((labels[:, 1:] != -100).sum())
            kwargs["num_items_in_batch"] = (torch.tensor(2 * counted) if step % 2 else
                                            2 * counted)
        out.append((ids, labels, kwargs))
    return out


def train(model, data, lr=3e-3):
    # eps 1e-4, not AdamW's 1e-8: Adam's step is lr m / (sqrt(v) + eps), so where a gradient
    # element sits near zero (an embedding row's sum over the few positions of its token) a
    # rounding-level difference between two correct losses' gradients (the C++ kernels' and
    # torch's, ~1e-9) became a difference of order lr in that weight: with 1e-8, 1 seed in 30
    # ended 4-7x outside the parameter tolerance below. With 1e-4 such a difference moves the
    # weight by at most lr * 1e-9 / 1e-4 a step; over 200 seeds the worst weight took 3 % of the
    # tolerance, and the model learns as fast (the loss drops 0.55-0.86 in 30 steps).
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-4)
    losses = []
    for ids, labels, kwargs in data:
        loss = model(input_ids=ids, labels=labels, **kwargs).loss
        assert loss.dtype == torch.float32 and loss.dim() == 0
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: two threads only add contention (tenfold on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of nllfused.cross_entropy (still running the real one)."""
    real = nllfused.cross_entropy
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(nllfused, "cross_entropy", counting)
    return calls


def test_training_curve_matches_unpatched(spy):
    """backend="auto": the C++ kernels where built, else plain torch (Triton: below)."""
    reference = tiny_llama()
    patched = nft.patch(copy.deepcopy(reference))
    data = batches(30)
    expected = train(reference, data)
    assert not spy, "the unpatched model must not call nllfused"
    got = train(patched, data)
    assert len(spy) == len(data), "the patched model's loss must run on nllfused"
    assert [c["reduction"] for c in spy] == ["sum" if kw else "mean" for _, _, kw in data]
    mean_steps = torch.tensor([not kw for _, _, kw in data])
    learned = expected[mean_steps]
    assert learned[-3:].mean() < learned[:3].mean() - 0.3, "the model should learn something"
    # Same maths in float32: the first steps agree to rounding, later ones drift only as far as
    # float32 training noise carries them (a backend that rounds differently, Triton's, stays
    # within 1e-6 relative and 1/4 of the parameter tolerance here, over a dozen seeds).
    torch.testing.assert_close(got[:5], expected[:5], rtol=1e-5, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_loss_and_gradient_match_one_step(spy):
    """One forward/backward: the loss, and the gradient of every parameter, to rounding."""
    reference = tiny_llama()
    patched = nft.patch(copy.deepcopy(reference))
    for ids, labels, kwargs in batches(3):  # the last carries num_items_in_batch
        a = reference(input_ids=ids, labels=labels, **kwargs).loss
        b = patched(input_ids=ids, labels=labels, **kwargs).loss
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
        a.backward()
        b.backward()
        for p, q in zip(reference.parameters(), patched.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)
    assert len(spy) == 3


@pytest.mark.skipif("triton" not in backends_here("cpu"),
                    reason="the Triton backend on the CPU needs TRITON_INTERPRET=1")
def test_triton_backend_short_run(spy):
    reference = tiny_llama(vocab=64, layers=1)
    patched = nft.patch(copy.deepcopy(reference), backend="triton")
    data = batches(3, batch=2, seq=8, vocab=64)
    expected = train(reference, data)
    got = train(patched, data)
    assert len(spy) == 3 and all(c["backend"] == "triton" for c in spy)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


# --- the loss functions themselves, against transformers' own ---------------------------------

def _hf_and_ours(name, *args, options=None, **kwargs):
    original = getattr(loss_utils, name, None)
    if original is None:
        pytest.skip(f"this transformers has no {name}")
    ours = nft.NllfusedLoss(nft.SUPPORTED_LOSSES[name], original, options or {})
    return original(*args, **kwargs), ours(*args, **kwargs)


# num_items_in_batch absent (a mean), an int and a tensor (a sum over it); the default and another
# ignore_index.
@pytest.mark.parametrize("num_items", [None, 37, "tensor"])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_causal_lm_loss_semantics(num_items, ignore_index):
    logits = torch.randn(3, 7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[torch.rand(3, 7) < 0.3] = ignore_index
    if num_items == "tensor":
        num_items = torch.tensor(41)
    kw = dict(vocab_size=50, num_items_in_batch=num_items, ignore_index=ignore_index,
              position_ids=None, output_attentions=False)  # unrelated kwargs are ignored
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, **kw)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-8)
    assert not gb[:, -1].any(), "the last position predicts nothing"


@pytest.mark.skipif("shift_labels" not in inspect.signature(loss_utils.ForCausalLMLoss).parameters,
                    reason="this transformers has no shift_labels (before 4.50)")
def test_causal_lm_shift_labels_given():
    logits = torch.randn(2, 6, 40)
    labels = torch.randint(0, 40, (2, 6))
    shift = torch.randint(0, 40, (2, 6))
    shift[:, -2:] = -100
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, vocab_size=40, shift_labels=shift)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_float32_loss(dtype):
    """transformers upcasts the logits; nllfused reads them as they are, accumulates in float32
    and the result is cast to float32: equal to one rounding of the loss in `dtype`."""
    logits = (3 * torch.randn(4, 9, 300)).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (4, 9))
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, vocab_size=300)
    assert b.dtype == torch.float32 == a.dtype
    torch.testing.assert_close(b, a, rtol=2 * 2.0 ** -8, atol=0)
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    assert gb.dtype == dtype
    torch.testing.assert_close(gb.float(), ga.float(), rtol=2 * 2.0 ** -8, atol=1e-6)


def test_float16_sum_over_num_items_does_not_overflow():
    """With num_items_in_batch the loss is a sum over the batch's tokens: past 65504 in float16
    (here ~16k tokens of ~4.5 each) it must still be transformers' float32 sum over the count."""
    logits = (3 * torch.randn(8, 2048, 32)).half().requires_grad_()
    labels = torch.randint(0, 32, (8, 2048))
    labels[:, :100] = -100
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, vocab_size=32,
                        num_items_in_batch=num_items)
    assert b.dtype == torch.float32 and torch.isfinite(b)
    torch.testing.assert_close(b, a, rtol=2 * 2.0 ** -11, atol=0)  # one float16 rounding
    (ga,) = torch.autograd.grad(a, logits)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(gb.float(), ga.float(), rtol=2 * 2.0 ** -11, atol=2.0 ** -24)
    # num_items_in_batch far below the tokens counted (80k tokens, a sequence count of 1): the
    # gradient, 1 / num_items a token, stays finite (a mean times the count had count /
    # num_items, past 65504, in float16)
    many = torch.randn(2, 40000, 8).half().requires_grad_()
    many_labels = torch.randint(0, 8, (2, 40000))
    a, b = _hf_and_ours("ForCausalLMLoss", many, many_labels, vocab_size=8, num_items_in_batch=1)
    (gb,) = torch.autograd.grad(b, many)
    assert torch.isfinite(b) and bool(torch.isfinite(gb).all())
    torch.testing.assert_close(b, a, rtol=2 * 2.0 ** -11, atol=0)
    labels[:] = -100  # nothing counted: transformers' sum is 0
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, vocab_size=32, num_items_in_batch=7)
    assert a.item() == 0.0 and b.item() == 0.0


@pytest.mark.parametrize("num_items", [None, 9])  # a mean, and a sum over num_items_in_batch
def test_masked_lm_loss(num_items):
    logits = torch.randn(3, 5, 30)
    labels = torch.randint(0, 30, (3, 5))
    labels[0, :2] = -100
    a, b = _hf_and_ours("ForMaskedLMLoss", logits, labels, vocab_size=30,
                        num_items_in_batch=num_items)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_token_classification_loss():
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    a, b = _hf_and_ours("ForTokenClassification", logits, labels,
                        types.SimpleNamespace(num_labels=7))
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_sequence_classification_loss():
    logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    config = types.SimpleNamespace(num_labels=4, problem_type=None)
    a, b = _hf_and_ours("ForSequenceClassificationLoss", labels=labels, pooled_logits=logits,
                        config=config)
    assert config.problem_type == "single_label_classification"
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    # Regression is not a cross-entropy: transformers' own MSE.
    config = types.SimpleNamespace(num_labels=1, problem_type=None)
    y = torch.randn(6)
    a, b = _hf_and_ours("ForSequenceClassificationLoss", labels=y, pooled_logits=logits[:, :1],
                        config=config)
    assert config.problem_type == "regression"
    torch.testing.assert_close(b, a)


def test_options_reach_nllfused(spy):
    logits = torch.randn(2, 5, 20)
    labels = torch.randint(0, 20, (2, 5))
    a, b = _hf_and_ours("ForCausalLMLoss", logits, labels, vocab_size=20,
                        options={"z_loss": 1e-2})
    flat = logits[:, :-1].reshape(-1, 20)
    z = 1e-2 * torch.logsumexp(flat, dim=1).pow(2).mean()
    torch.testing.assert_close(b, a + z, rtol=1e-5, atol=0)
    assert spy[-1]["z_loss"] == 1e-2


# --- patch's contract ---------------------------------------------------------------------------

def test_patch_is_idempotent_and_unpatch_restores(spy):
    model = tiny_llama(layers=1)
    original = model.loss_function
    assert nft.patch(model) is model and nft.is_patched(model)
    first = model.loss_function
    nft.patch(model, z_loss=1e-4)  # again: same original, new options
    assert model.loss_function.original is original is first.original
    assert model.loss_function.options == {"z_loss": 1e-4}
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids)
    assert len(spy) == 1
    nft.unpatch(model)
    assert not nft.is_patched(model) and model.loss_function is original
    model(input_ids=ids, labels=ids)
    assert len(spy) == 1


def test_patched_model_deepcopies_and_pickles():
    model = nft.patch(tiny_llama(layers=1), backend="torch")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert nft.is_patched(clone) and clone.loss_function.options == {"backend": "torch"}


def test_patch_sees_through_wrappers():
    model = tiny_llama(layers=1)
    wrapped = torch.nn.DataParallel(model)
    assert nft.patch(wrapped) is wrapped and nft.is_patched(model)
    model = tiny_llama(layers=1)
    compiled = torch.compile(model)  # not run: only the wrapper matters here
    assert nft.patch(compiled) is compiled and nft.is_patched(model)
    # A wrapper that holds the model as .module and passes attribute reads through to it
    # (as FSDP and DeepSpeed's engine do): patch and unpatch reach the model, not the wrapper.
    model = tiny_llama(layers=1)
    wrapped = PassThrough(model)
    assert nft.patch(wrapped) is wrapped and nft.is_patched(model)
    assert "_loss_function" not in wrapped.__dict__
    assert not nft.is_patched(nft.unpatch(wrapped)) and not nft.is_patched(model)


class PassThrough(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.wrapped = model

    @property
    def module(self):
        return self.wrapped

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped, name)


class OldStyle(transformers.LlamaForCausalLM):
    """loss_function as transformers 4.46-4.49 have it: a property without a setter."""

    @property
    def loss_function(self):
        return loss_utils.ForCausalLMLoss


def test_read_only_loss_function_property(spy):
    """transformers before the loss_function setter (4.46-era): a read-only property. patch
    gives that one model a subclass with a settable one; unpatch restores its class."""
    model = OldStyle(tiny_llama(layers=1).config)
    with pytest.raises(AttributeError):
        model.loss_function = None
    nft.patch(model)
    assert type(model) is not OldStyle and isinstance(model, OldStyle)
    assert type(model).__name__ == "OldStyle"
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids)
    assert len(spy) == 1
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert nft.is_patched(clone) and isinstance(clone, OldStyle) and clone is not model
    nft.unpatch(model)
    assert type(model) is OldStyle and model.loss_function is loss_utils.ForCausalLMLoss
    untouched = OldStyle(model.config)
    assert type(untouched) is OldStyle


def test_unsupported_models_raise():
    class CustomLoss(transformers.LlamaForCausalLM):
        @property
        def loss_function(self):
            return lambda *args, **kwargs: torch.zeros(())

    model = tiny_llama(layers=1)
    with pytest.raises(TypeError, match="no nllfused version"):
        nft.patch(CustomLoss(model.config))
    qa = transformers.LlamaForQuestionAnswering(model.config)
    with pytest.raises(TypeError, match="ForQuestionAnsweringLoss"):
        nft.patch(qa)
    # An architecture whose forward builds its CrossEntropyLoss inline: patching would be a
    # silent no-op, so it is refused.
    bert_config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32)
    bert = transformers.BertForMaskedLM(bert_config)
    if "loss_function" not in inspect.getsource(inspect.unwrap(type(bert).forward)):
        with pytest.raises(TypeError, match="without `self.loss_function`"):
            nft.patch(bert)
    with pytest.raises(TypeError, match="unknown option"):
        nft.patch(model, reduction="sum")
    with pytest.raises(ValueError, match="backend"):
        nft.patch(tiny_llama(layers=1), backend="tpu")
    with pytest.raises(ValueError, match="z_loss"):
        nft.patch(tiny_llama(layers=1), z_loss=-1.0)


@pytest.mark.slow  # a fresh interpreter importing torch: ~7 s
def test_importing_nllfused_does_not_import_transformers():
    code = "import sys, nllfused; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
