"""The implementations the benchmark compares ("providers"), and which of them can run here.

A provider gives, for each kind of case it handles, a loss function:
  kind "ce":      fn(logits, target) -> loss            (F.cross_entropy semantics; target
                                                        class indices or, `soft`, probabilities)
  kind "linear":  fn(hidden, weight, target) -> loss    (F.cross_entropy(F.linear(hidden, weight)))
always with ignore_index=IGNORE_INDEX and reduction 'mean', and with a case's extras as keyword
arguments (z_loss, logit_scale, softcap: Case.options). Functions are built once per run
(`Provider.function`), so a torch.compile'd one keeps its compiled graphs from case to case.

Other packages (Liger-Kernel, quack, Cut Cross-Entropy) are optional: a provider whose package is
not installed is skipped with a one-line note.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .cases import EXTRAS, IGNORE_INDEX, Case

Factory = Callable[[], Callable]


@dataclass
class Provider:
    name: str
    description: str
    ce: Optional[Factory] = None  # builds fn(logits, target) -> loss
    linear: Optional[Factory] = None  # builds fn(hidden, weight, target) -> loss
    # None if the provider can run on the device, else why not ("" = not worth a note, e.g.
    # a CUDA-only backend on a CPU run).
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    two_d_only: bool = False  # takes (N, C) logits only, not (N, C, d1, ...)
    soft_targets: bool = True  # takes probability targets (cases with `soft`)
    extras: frozenset = frozenset(EXTRAS)  # the loss options (Case.options) it takes
    mutates_inputs: bool = False  # writes into its inputs: gets its own (runner._inputs_for)
    _built: dict = field(default_factory=dict, repr=False)

    def unsupported(self, case: Case) -> Optional[str]:
        """None if this provider handles `case`, else why not."""
        factory = self.ce if case.kind == "ce" else self.linear
        if factory is None:
            return f"no {case.kind} implementation"
        if self.two_d_only and case.kind == "ce" and len(case.shape) != 2:
            return "takes (N, C) logits only"
        if case.soft and not self.soft_targets:
            return "takes class-index targets only"
        missing = [k for k, _ in case.options if k not in self.extras]
        if missing:
            return f"takes no {', '.join(missing)}"
        return None

    def function(self, kind: str) -> Callable:
        if kind not in self._built:
            self._built[kind] = (self.ce if kind == "ce" else self.linear)()
        return self._built[kind]


# ---- torch ------------------------------------------------------------------------------------

def _torch_ce():
    def torch_ce(logits, target, z_loss=0.0, logit_scale=1.0, softcap=None):
        # nllfused's extras as a torch user writes them (docs/maths.md): the transform, then
        # z_loss * lse^2 averaged over the counted rows
        z = logits * logit_scale if logit_scale != 1.0 else logits
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, target, ignore_index=IGNORE_INDEX)
        if z_loss:
            lse = torch.logsumexp(z.float(), 1)
            counted = target != IGNORE_INDEX
            loss = loss + z_loss * torch.where(counted, lse * lse, 0.0).sum() / counted.sum()
        return loss
    return torch_ce


def _torch_linear():
    def torch_linear_ce(hidden, weight, target):
        return F.cross_entropy(F.linear(hidden, weight), target, ignore_index=IGNORE_INDEX)
    return torch_linear_ce


def _torch_chunked_linear():
    """torch's own chunked path (torch >= 2.14): F.linear_cross_entropy with options."""
    options = torch.nn.LinearCrossEntropyOptions()

    def torch_chunked_linear_ce(hidden, weight, target):
        return F.linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE_INDEX,
                                      options=options)
    return torch_chunked_linear_ce


def _torch_chunked_unavailable(device: torch.device) -> Optional[str]:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no chunked F.linear_cross_entropy (torch >= 2.14)"
    return None


def _compiled(factory: Factory) -> Factory:
    # torch.compile's defaults (dynamic=None: a second shape recompiles once with dynamic
    # shapes), as users get them. Compilation happens during the correctness check, untimed.
    def build():
        # A run goes through many shapes, dtypes and ranks; past dynamo's recompile limit (8)
        # the function would silently run eagerly and be timed as "torch-compile".
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
        return torch.compile(factory())
    return build


# ---- nllfused ---------------------------------------------------------------------------------

def _nllfused_ce(backend: str) -> Factory:
    def build():
        import nllfused

        def nllfused_ce(logits, target, **extras):
            return nllfused.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                          backend=backend, **extras)
        return nllfused_ce
    return build


def _nllfused_stats_ce():
    import nllfused

    def nllfused_stats_ce(logits, target, **extras):
        # What an RL trainer asks for: entropy (in the loss, so the backward carries its
        # gradient), the target's log-probability and the argmax. The entropy enters with
        # weight 0, so that the value is the cross-entropy the correctness check computes.
        loss, st = nllfused.cross_entropy(
            logits, target, ignore_index=IGNORE_INDEX,
            return_stats=("entropy", "target_logprob", "predicted"), **extras)
        return loss + 0.0 * st.entropy
    return nllfused_stats_ce


def _nllfused_stats_linear():
    import nllfused

    def nllfused_stats_linear(hidden, weight, target):
        # as _nllfused_stats_ce, through the fused linear + cross-entropy
        loss, st = nllfused.linear_cross_entropy(
            hidden, weight, target, ignore_index=IGNORE_INDEX,
            return_stats=("entropy", "target_logprob", "predicted"))
        return loss + 0.0 * st.entropy
    return nllfused_stats_linear


def _nllfused_linear(backend: str) -> Optional[Factory]:
    import nllfused
    if not hasattr(nllfused, "linear_cross_entropy"):  # issue 6, may not be merged yet
        return None

    def build():
        def nllfused_linear_ce(hidden, weight, target):
            return nllfused.linear_cross_entropy(hidden, weight, target,
                                                 ignore_index=IGNORE_INDEX, backend=backend)
        return nllfused_linear_ce
    return build


def _nllfused_unavailable(backend: str):
    def unavailable(device: torch.device) -> Optional[str]:
        from nllfused import backends
        if backend == "triton" and device.type == "cpu":
            return "runs CPU tensors only in Triton's interpreter: not benchmarked"
        if backend in ("cpu", "cuda") and device.type != backend:
            return ""
        return backends.unavailable_reason(backend, device)
    return unavailable


# ---- other packages ---------------------------------------------------------------------------

def _needs(package: str, pip_name: str, cuda_only: bool = True):
    def unavailable(device: torch.device) -> Optional[str]:
        if importlib.util.find_spec(package) is None:
            return f"not installed (pip install {pip_name})"
        if cuda_only and device.type != "cuda":
            return "needs a CUDA device"
        return None
    return unavailable


def _liger_ce():
    from liger_kernel.transformers.functional import liger_cross_entropy
    ce = _mean_ignoring(liger_cross_entropy)

    def liger_ce(logits, target, z_loss=0.0, softcap=None):
        # Liger-Kernel's names: lse_square_scale is the z-loss (over the counted rows too);
        # passed only when set, as versions before them take neither
        kw = dict(lse_square_scale=z_loss) if z_loss else {}
        if softcap is not None:
            kw["softcap"] = softcap
        return ce(logits, target, **kw)
    return liger_ce


def _mean_ignoring(fn):
    """fn(*inputs, target) with the benchmark's loss options: ignore_index, reduction 'mean'."""
    def loss(*args, **kwargs):
        return fn(*args, ignore_index=IGNORE_INDEX, reduction="mean", **kwargs)
    return loss


def _liger_linear():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return _mean_ignoring(liger_fused_linear_cross_entropy)


def _quack_ce():
    from quack.cross_entropy import cross_entropy as quack_cross_entropy

    params = inspect.signature(quack_cross_entropy).parameters
    if "ignore_index" not in params:
        raise RuntimeError("this quack version's cross_entropy has no ignore_index")
    if "reduction" in params:
        def quack_ce(logits, target):
            return quack_cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                       reduction="mean")
    else:  # older versions return per-row losses
        def quack_ce(logits, target):
            loss = quack_cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            return loss.sum() / (target != IGNORE_INDEX).sum()
    return quack_ce


def _cce_linear():
    from cut_cross_entropy import linear_cross_entropy
    return _mean_ignoring(linear_cross_entropy)


# ---- the registry -----------------------------------------------------------------------------

def _registry() -> dict:
    providers = [
        Provider("torch", "eager F.cross_entropy (the reference)", _torch_ce, _torch_linear),
        Provider("torch-compile", "torch.compile of the torch provider",
                 _compiled(_torch_ce), _compiled(_torch_linear)),
        Provider("torch-chunked", "torch's chunked F.linear_cross_entropy(options=...)", None,
                 _torch_chunked_linear, _torch_chunked_unavailable),
    ]
    for backend in ("cuda", "triton", "cpu", "torch"):
        providers.append(Provider(
            f"nllfused-{backend}", f"nllfused.cross_entropy(backend={backend!r})",
            _nllfused_ce(backend), _nllfused_linear(backend), _nllfused_unavailable(backend)))
    providers.append(Provider(
        "nllfused-stats", "nllfused.(linear_)cross_entropy(return_stats=...): entropy bonus, "
        "target log-prob and argmax beside the loss (backend auto)", _nllfused_stats_ce,
        _nllfused_stats_linear, soft_targets=False))
    providers += [
        Provider("liger", "Liger-Kernel cross entropy / fused linear cross entropy",
                 _liger_ce, _liger_linear, _needs("liger_kernel", "liger-kernel"),
                 two_d_only=True, mutates_inputs=True, soft_targets=False,
                 extras=frozenset({"z_loss", "softcap"})),
        Provider("quack", "quack (CuTe DSL) cross_entropy", _quack_ce, None,
                 _needs("quack", "quack-kernels"), two_d_only=True, soft_targets=False,
                 extras=frozenset()),
        Provider("cce", "Cut Cross-Entropy linear_cross_entropy", None, _cce_linear,
                 _needs("cut_cross_entropy", "cut-cross-entropy"), extras=frozenset()),
    ]
    return {p.name: p for p in providers}


REGISTRY = _registry()

# Left out of some presets' defaults on the CPU (named in --providers, they run anyway).
CPU_DEFAULT_EXCLUDED = {
    ("quick", "torch-compile"): "compiling takes about a minute on 2 cores, more than the "
                                "preset's whole budget",
    ("smoke", "torch-compile"): "compiling takes about a minute on 2 cores",
}


def select(device: torch.device, requested: Optional[list], kinds: set, presets: list):
    """(providers to run, notes). `requested`: names from --providers, or None for every
    provider available on `device` that handles one of `kinds`."""
    notes = []
    if requested is not None:
        unknown = [n for n in requested if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(REGISTRY)}")
        names = list(dict.fromkeys(requested))
    else:
        names = list(REGISTRY)
    chosen = []
    for name in names:
        provider = REGISTRY[name]
        if not any((provider.ce if k == "ce" else provider.linear) is not None for k in kinds):
            if requested is not None:
                notes.append(f"{name}: skipped, no implementation for these cases "
                             f"({', '.join(sorted(kinds))})")
            continue
        reason = provider.unavailable(device)
        if reason is not None:
            if reason or requested is not None:
                notes.append(f"{name}: skipped, {reason or f'not available on {device.type}'}")
            continue
        excluded = [CPU_DEFAULT_EXCLUDED.get((p, name)) for p in presets]
        if (requested is None and device.type == "cpu" and excluded
                and all(excluded)):
            notes.append(f"{name}: left out by default on the CPU ({excluded[0]}); "
                         f"name it in --providers to include it")
            continue
        chosen.append(provider)
    return chosen, notes
