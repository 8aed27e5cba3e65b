"""Hugging Face transformers: route a model's training loss through nllfused.

    import nllfused.integrations.transformers as nft
    model = nft.patch(AutoModelForCausalLM.from_config(config))      # or .from_pretrained(...)
    loss = model(input_ids, labels=labels).loss                      # now nllfused's kernels

transformers (>= 4.46) computes a model's loss with `model.loss_function`, one of the functions
of `transformers.loss.loss_utils` chosen by the model's loss type. `patch` replaces that
function, on this one model, with a twin that computes the same loss with
`nllfused.cross_entropy`:

  ForCausalLM (also ...ForConditionalGeneration, ...LMHeadModel: the label shift, padding the
      shifted labels with `ignore_index`, or the `shift_labels` given), ForMaskedLM,
      ForTokenClassification, ForSequenceClassification (the single-label case; regression and
      multi-label stay on transformers' own MSE / BCE).

Semantics are transformers' own: `ignore_index` (default -100) as passed, reduction 'mean' over
the counted tokens, or 'sum' divided by `num_items_in_batch` when that is given (the Trainer's
gradient-accumulation normalisation), other keyword arguments ignored, and for the LM and token
losses a float32 result. Where transformers upcasts the logits (`logits.float()`, a float32 copy
of the whole (tokens, vocab) matrix for bf16/fp16 models), nllfused reads them in their own dtype
and accumulates in float32; the loss is returned in the logits' dtype and then cast to float32
(so for bf16/fp16 logits the loss *value* carries one bf16/fp16 rounding; gradients are computed
in float32 inside the kernel and written in the logits' dtype, as autograd does through
transformers' `.float()`).

transformers is an optional dependency of nllfused: only this module imports it, and only when
`patch` is called.
"""
from __future__ import annotations

import copyreg
import inspect
from typing import Any, Callable, Optional

import torch

import nllfused
from nllfused import backends as _backends

__all__ = ["patch", "unpatch", "is_patched", "SUPPORTED_LOSSES", "OPTIONS"]

# nllfused options a patch may carry (see nllfused.cross_entropy); ignore_index and the
# reduction come from transformers' own call.
OPTIONS = ("backend", "z_loss", "label_smoothing", "logit_scale", "softcap")

# transformers' loss functions (names in transformers.loss.loss_utils) -> our kind.
SUPPORTED_LOSSES = {
    "ForCausalLMLoss": "causal_lm",
    "ForMaskedLMLoss": "masked_lm",
    "ForTokenClassification": "token_classification",
    "ForSequenceClassificationLoss": "sequence_classification",
}


# ---------------------------------------------------------------------------------------------
# The losses: transformers' functions of the same name, with nllfused.cross_entropy.
# ---------------------------------------------------------------------------------------------

def _fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index: int = -100, *,
                         options: dict, float_result: bool) -> torch.Tensor:
    """transformers' fixed_cross_entropy: 'mean', or 'sum' / num_items_in_batch when given."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # A float16 sum overflows past 65504 (a few thousand tokens' losses) where transformers'
    # float32 one does not: the rows' losses (one rounding each), summed in float32. (Not the
    # mean times the count: the mean's gradient, count / num_items, overflows float16 in turn.)
    rows_summed = reduction == "sum" and float_result and source.dtype == torch.float16
    # Looked up on the package at call time (not bound at import), so wrappers of
    # nllfused.cross_entropy (a profiler, a test's spy) see every call.
    loss = nllfused.cross_entropy(source, target, ignore_index=ignore_index,
                                  reduction="none" if rows_summed else reduction, **options)
    if float_result:
        # transformers computes on logits.float(); we read the logits as they are and make the
        # scalar float32 instead of a float32 copy of the logits.
        loss = loss.float()
    if rows_summed:
        loss = loss.sum()
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _causal_lm(options, logits, labels, vocab_size: int, num_items_in_batch=None,
               ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None, **kwargs):
    if shift_labels is None:
        # Tokens < n predict n: labels shifted left, the last position padded with ignore_index
        # (transformers >= 4.50; older versions slice the logits instead: the same loss).
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return _fixed_cross_entropy(logits, shift_labels, num_items_in_batch, ignore_index,
                                options=options, float_result=True)


def _masked_lm(options, logits, labels, vocab_size: int, num_items_in_batch=None,
               ignore_index: int = -100, **kwargs):
    logits = logits.reshape(-1, vocab_size)
    labels = labels.reshape(-1).to(logits.device)
    return _fixed_cross_entropy(logits, labels, num_items_in_batch, ignore_index,
                                options=options, float_result=True)


def _token_classification(options, logits, labels, config, num_items_in_batch=None,
                          ignore_index: int = -100, **kwargs):
    logits = logits.reshape(-1, config.num_labels)
    labels = labels.reshape(-1).to(logits.device)
    return _fixed_cross_entropy(logits, labels, num_items_in_batch, ignore_index,
                                options=options, float_result=True)


def _sequence_classification(options, labels, pooled_logits, config, num_items_in_batch=None,
                             ignore_index: int = -100, *, original: Callable, **kwargs):
    num_labels = config.num_labels
    if config.problem_type is None:  # as transformers infers it (and records it on the config)
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type != "single_label_classification":
        # MSE / BCE-with-logits: not a softmax cross-entropy; transformers' own code.
        return original(labels=labels, pooled_logits=pooled_logits, config=config,
                        num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                        **kwargs)
    labels = labels.to(pooled_logits.device)
    # No upcast here: transformers returns this loss in the logits' dtype too.
    return _fixed_cross_entropy(pooled_logits.reshape(-1, num_labels), labels.reshape(-1),
                                num_items_in_batch, ignore_index, options=options,
                                float_result=False)


_IMPLEMENTATIONS = {
    "causal_lm": _causal_lm,
    "masked_lm": _masked_lm,
    "token_classification": _token_classification,
    "sequence_classification": _sequence_classification,
}


class NllfusedLoss:
    """What a patched model's `loss_function` is: transformers' loss of `kind`, on nllfused.

    `original` is the function it replaced (`explicit`: it had been set on the model, rather
    than chosen by loss_type; both restored by `unpatch`); `options` go to every
    nllfused.cross_entropy call. A plain module-level class, so a patched model pickles and
    deep-copies.
    """

    def __init__(self, kind: str, original: Callable, options: dict, explicit: bool = False):
        self.kind = kind
        self.original = original
        self.options = dict(options)
        self.explicit = explicit

    def __call__(self, *args, **kwargs):
        if self.kind == "sequence_classification":
            kwargs["original"] = self.original
        return _IMPLEMENTATIONS[self.kind](self.options, *args, **kwargs)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"NllfusedLoss({self.kind!r}{opts})"


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------

def _loss_utils():
    try:
        from transformers.loss import loss_utils
    except ImportError as exc:
        try:
            import transformers
        except ImportError:
            raise ImportError("nllfused.integrations.transformers needs Hugging Face "
                              "transformers: pip install transformers") from exc
        raise ImportError(
            f"nllfused.integrations.transformers needs transformers >= 4.46 (models with a "
            f"`loss_function`); this is transformers {transformers.__version__}") from exc
    return loss_utils


def _target(model):
    """The PreTrainedModel inside its wrappers: torch.compile's, PEFT's, and those that hold the
    model as `.module` (DDP, DataParallel, FSDP, DeepSpeed's engine). A wrapper that passes
    attribute reads through (FSDP) must not be taken for the model: unpatch would miss it."""
    for _ in range(8):
        if inspect.getattr_static(type(model), "loss_function", None) is not None:
            break  # a transformers model (the attribute is its class's)
        if type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile(model)
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):  # e.g. peft.PeftModel
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def _current_loss_function(model):
    """model.loss_function, as transformers' forward will read it."""
    try:
        return model.loss_function
    except AttributeError as exc:
        raise TypeError(
            f"{type(model).__name__} has no `loss_function` (transformers >= 4.46 models do): "
            f"nllfused.integrations.transformers.patch cannot route its loss; compute it from "
            f"the logits with nllfused.cross_entropy instead") from exc


def _forward_uses_loss_function(model) -> bool:
    """Whether the model's forward reads `loss_function` (many older architectures still build
    torch.nn.CrossEntropyLoss inline, which no patch of loss_function reaches). True when the
    source cannot be read."""
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError):
        return True
    return "loss_function" in source


def _kind_of(fn, loss_utils) -> Optional[str]:
    for name, kind in SUPPORTED_LOSSES.items():
        if fn is getattr(loss_utils, name, object()):
            return kind
    return None


# transformers before the `loss_function` setter: a read-only property on the class. A patched
# model then gets a subclass (cached per class) whose property reads `_loss_function` first, as
# the setter-era property does.
_SUBCLASSES: dict = {}


def _subclass_with_settable_loss(cls):
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        parent = inspect.getattr_static(cls, "loss_function")

        def fget(self):
            fn = self.__dict__.get("_loss_function")
            return fn if fn is not None else parent.fget(self)

        def fset(self, value):
            self.__dict__["_loss_function"] = value

        def __reduce_ex__(self, protocol):
            # Pickle by the original class (this one cannot be found by its name), rebuilt
            # through _new_patched; deepcopy goes the same way.
            reduced = super(sub, self).__reduce_ex__(protocol)
            if (isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__
                    and reduced[1][0] is sub):
                return (_new_patched, (cls, *reduced[1][1:]), *reduced[2:])
            return reduced

        sub = type(cls.__name__, (cls,), {"loss_function": property(fget, fset),
                                          "__reduce_ex__": __reduce_ex__,
                                          "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__,
                                          "_nllfused_patched_from": cls})
        _SUBCLASSES[cls] = sub
    return sub


def _new_patched(cls, *args):
    """Unpickling a model patched in the read-only-property era: its patched subclass again."""
    return _subclass_with_settable_loss(cls).__new__(_subclass_with_settable_loss(cls), *args)


def _set_loss_function(model, fn) -> None:
    prop = inspect.getattr_static(type(model), "loss_function", None)
    if isinstance(prop, property) and prop.fset is None:
        model.__class__ = _subclass_with_settable_loss(type(model))
    model.loss_function = fn


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"patch() got unknown option(s) {', '.join(unknown)}; "
                        f"nllfused options are {', '.join(OPTIONS)}")
    _backends.check_name(options.get("backend", "auto"))
    # The module validates label_smoothing, z_loss, logit_scale and softcap as a call would.
    nllfused.CrossEntropyLoss(**{k: v for k, v in options.items() if k != "backend"})
    return options


def patch(model, **options: Any):
    """Make `model`'s training loss run on nllfused.cross_entropy; returns `model`.

    `options` are nllfused's: backend ("auto"), z_loss, label_smoothing, logit_scale, softcap.
    Idempotent: patching a patched model keeps its original loss and takes the new options.
    Raises TypeError for a model whose loss is not one of SUPPORTED_LOSSES (or that computes
    its loss without `loss_function`), ImportError without transformers >= 4.46.
    """
    options = _check_options(options)
    loss_utils = _loss_utils()
    target = _target(model)
    current = _current_loss_function(target)
    if isinstance(current, NllfusedLoss):
        _set_loss_function(target, NllfusedLoss(current.kind, current.original, options,
                                                current.explicit))
        return model
    kind = _kind_of(current, loss_utils)
    if kind is None:
        name = getattr(current, "__qualname__", None) or repr(current)
        raise TypeError(
            f"nllfused.integrations.transformers.patch: {type(target).__name__} uses the loss "
            f"{name} (loss_type={getattr(target, 'loss_type', None)!r}), which has no nllfused "
            f"version; supported: {', '.join(SUPPORTED_LOSSES)}")
    if not _forward_uses_loss_function(target):
        raise TypeError(
            f"nllfused.integrations.transformers.patch: {type(target).__name__}.forward computes "
            f"its loss without `self.loss_function` (an architecture transformers has not "
            f"ported yet), so patching would change nothing; compute the loss from the logits "
            f"with nllfused.cross_entropy instead")
    explicit = target.__dict__.get("_loss_function") is not None
    _set_loss_function(target, NllfusedLoss(kind, current, options, explicit))
    return model


def is_patched(model) -> bool:
    """Whether `model`'s loss currently runs on nllfused."""
    try:
        return isinstance(_target(model).loss_function, NllfusedLoss)
    except AttributeError:
        return False


def unpatch(model):
    """Undo `patch`: the model's loss is transformers' own again; returns `model`."""
    target = _target(model)
    current = getattr(target, "loss_function", None)
    if not isinstance(current, NllfusedLoss):
        return model
    if current.explicit:  # it had been set on the model: set it back
        target.loss_function = current.original
        return model
    # Chosen by loss_type: drop ours and the property chooses again.
    target.__dict__.pop("_loss_function", None)
    original_cls = type(target).__dict__.get("_nllfused_patched_from")
    if original_cls is not None:  # the read-only-property era: back to the class it had
        target.__class__ = original_cls
    return model
