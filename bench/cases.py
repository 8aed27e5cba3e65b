"""Benchmark cases: the presets' shapes and dtypes, and the inputs each case is run on.

A case is one problem, the same for every provider:
  kind "ce"      logits of `shape` (class dim at 1) and class-index targets -> F.cross_entropy
                 (`soft`: class-probability targets of the logits' shape and dtype instead:
                 distillation, soft labels; `options`: nllfused's extras z_loss, logit_scale,
                 softcap, which the torch provider writes as torch ops)
                 (`layout`: the logits stored channels-last, or as the (B, V, T) view of
                 (B, T, V) logits that F.cross_entropy(logits.transpose(1, 2), y) passes)
  kind "linear"  hidden (N, H), classifier weight (C, H), targets -> F.cross_entropy(F.linear(...))
Targets are class indices with about 10% set to ignore_index, reduction 'mean' (the LLM case).
Inputs are generated from a per-case seed, so every provider, and the float64 reference, can get
exactly the same values again without keeping a second copy in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
MODES = ("fwd", "fwd_bwd")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# nllfused's loss options beyond torch's (docs/maths.md), as cases name them.
EXTRAS = {"z_loss": "z", "logit_scale": "scale", "softcap": "softcap"}
# Logits layouts other than contiguous (Case.layout), as case names mark them.
LAYOUTS = {"channels_last": "cl", "transposed": "T"}


@dataclass(frozen=True)
class Case:
    preset: str
    kind: str  # "ce" or "linear"
    shape: tuple  # ce: logits shape (N, C) or (N, C, d1, ...); linear: (N, H, C)
    dtype: torch.dtype
    modes: tuple = MODES
    soft: bool = False  # kind "ce": probability targets (softmax of random logits)
    # kind "ce": (name, value) pairs of the loss's extras (EXTRAS), passed to every provider
    options: tuple = ()
    # kind "ce": "" (contiguous) or a key of LAYOUTS: "channels_last" (4-D logits, classes
    # adjacent), "transposed" ((B, V, T) logits whose classes are adjacent: (B, T, V) storage)
    layout: str = ""

    @property
    def loss_options(self) -> dict:
        return dict(self.options)

    @property
    def num_classes(self) -> int:
        return self.shape[2] if self.kind == "linear" else self.shape[1]

    @property
    def logits_shape(self) -> tuple:
        if self.kind == "linear":
            return (self.shape[0], self.shape[2])
        return self.shape

    @property
    def logits_numel(self) -> int:
        n = 1
        for s in self.logits_shape:
            n *= s
        return n

    @property
    def logits_bytes(self) -> int:
        """P of docs/maths.md ("Bytes"): the bytes of one pass over the logits."""
        return self.logits_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def name(self) -> str:
        if self.kind == "linear":
            n, h, c = self.shape
            return f"N{n}·H{h}·C{c}"
        name = (f"N{self.shape[0]}·C{self.shape[1]}" if len(self.shape) == 2
                else "x".join(str(s) for s in self.shape))
        name += "".join(f"·{EXTRAS[k]}{v:g}" for k, v in self.options)
        name += f"·{LAYOUTS[self.layout]}" if self.layout else ""
        return name + "·soft" if self.soft else name

    @property
    def short_dtype(self) -> str:
        return SHORT_DTYPE.get(self.dtype, str(self.dtype).replace("torch.", ""))

    def floor_bytes(self, mode: str) -> Optional[int]:
        """The floor (docs/maths.md, "Bytes") for a fused kernel that saves lse and recomputes
        the gradient: fwd reads the logits once (P); fwd+bwd adds one read and one write (3P).
        Probability targets, as large as the logits, are read once more in each pass (2P, 5P).
        None for kind "linear", which is bound by its matmuls, not by bytes."""
        if self.kind != "ce":
            return None
        passes = 1 if mode == "fwd" else 3
        if self.soft:
            passes += 1 if mode == "fwd" else 2
        return self.logits_bytes * passes

    def flops(self, mode: str) -> Optional[int]:
        """Matmul flops of kind "linear": 2NHC forward, 4NHC more for the two backward GEMMs."""
        if self.kind != "linear":
            return None
        n, h, c = self.shape
        return 2 * n * h * c * (1 if mode == "fwd" else 3)

    def seed(self) -> int:
        # Stable across runs and processes (str hash is salted per process).
        key = f"{self.kind}:{self.shape}:{self.dtype}" + (":soft" if self.soft else "") + (
            f":{self.options}" if self.options else "") + (
            f":{self.layout}" if self.layout else "")
        return sum((i + 1) * ord(ch) for i, ch in enumerate(key)) % (2 ** 31)


@dataclass
class Inputs:
    """The tensors of one case. `grad_inputs` are those the loss is differentiated against."""

    target: torch.Tensor
    logits: Optional[torch.Tensor] = None  # kind "ce"
    hidden: Optional[torch.Tensor] = None  # kind "linear"
    weight: Optional[torch.Tensor] = None  # kind "linear": (C, H)
    grad_inputs: list = field(default_factory=list)

    def args(self) -> tuple:
        if self.logits is not None:
            return (self.logits, self.target)
        return (self.hidden, self.weight, self.target)


def make_inputs(case: Case, device: torch.device, requires_grad: bool = True) -> Inputs:
    """The case's inputs on `device`, the same values every call (seeded)."""
    gen = torch.Generator(device=device).manual_seed(case.seed())
    n = case.shape[0]
    target_shape = (n,) + tuple(case.logits_shape[2:])
    target = torch.randint(0, case.num_classes, target_shape, generator=gen, device=device)
    ignored = torch.rand(target_shape, generator=gen, device=device) < IGNORED_FRACTION
    target.masked_fill_(ignored, IGNORE_INDEX)
    if case.kind == "ce":
        # Logits with a spread like a trained model's (std 2), drawn directly in the dtype.
        stored = case.shape
        if case.layout == "transposed":  # (B, T, V) storage, seen as (B, V, T)
            stored = (case.shape[0],) + tuple(case.shape[2:]) + (case.shape[1],)
        logits = torch.randn(stored, generator=gen, device=device, dtype=case.dtype)
        logits.mul_(2.0)
        if case.layout == "transposed":
            logits = logits.movedim(-1, 1)
        elif case.layout == "channels_last":
            logits = logits.contiguous(memory_format=torch.channels_last)
        logits.requires_grad_(requires_grad)
        if case.soft:  # a teacher's distribution: softmax of other logits of that spread
            teacher = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32)
            target = torch.softmax(teacher.mul_(2.0), 1).to(case.dtype)
        return Inputs(target=target, logits=logits, grad_inputs=[logits])
    _, h, c = case.shape
    hidden = torch.randn((n, h), generator=gen, device=device, dtype=case.dtype)
    weight = torch.randn((c, h), generator=gen, device=device, dtype=case.dtype)
    weight.mul_(2.0 / h ** 0.5)  # logits of std 2, as for kind "ce"
    hidden.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    return Inputs(target=target, hidden=hidden, weight=weight, grad_inputs=[hidden, weight])


# ---- presets ----------------------------------------------------------------------------------
# Each preset: (kind, shapes, default dtypes, default modes), possibly depending on the device.

LLM_TOKENS = (4096, 16384)
LLM_VOCABS = (32000, 50257, 128256, 151936, 256000)


def _preset_table(device_type: str) -> dict:
    gpu = device_type == "cuda"
    bf16_fp32 = (torch.bfloat16, torch.float32)
    return {
        # Tests and smoke runs: seconds anywhere.
        "smoke": [("ce", [(256, 1000), (2, 7, 16, 16)], (torch.float32,), MODES),
                  ("linear", [(64, 32, 1000)], (torch.float32,), MODES)],
        # Under a minute on a 2-core CPU with the default providers.
        "quick": [("ce", [(1024, 8192), (256, 50257)], (torch.float32,), MODES),
                  ("ce", [(1024, 8192)], (torch.bfloat16,), MODES)],
        "llm": [("ce", [(n, c) for n in LLM_TOKENS for c in LLM_VOCABS], bf16_fp32, MODES)],
        "vision": [("ce", [(16, 21, 512, 512), (8, 150, 512, 512), (65536, 1000)], bf16_fp32,
                    MODES)],
        # Issue 6: fused linear + CE. Bound by its GEMMs: time fwd+bwd and memory matter.
        "linear": ([("linear", [(8192, 4096, 128256), (8192, 2304, 256000)], (torch.bfloat16,),
                     ("fwd_bwd",))] if gpu else
                   [("linear", [(2048, 1024, 32000)], bf16_fp32, ("fwd_bwd",))]),
        # Issue 14's larger CPU shape (minutes: unfused torch's float32 call takes ~20 s here).
        "linear-large": ([("linear", [(8192, 4096, 128256)], (torch.bfloat16,), ("fwd_bwd",))]
                         if gpu else
                         [("linear", [(4096, 2048, 128256)], bf16_fp32, ("fwd_bwd",))]),
        # Small and mid-sized heads, where the fused linear + CE's per-call cost or its one
        # chunk decides: the logits made whole up to 8 MiB (nllfused/linear.py), chunked past.
        "linear-small": [("linear", [(64, 128, 10), (256, 1024, 1024), (512, 512, 2048),
                                     (1024, 256, 4096), (2048, 512, 8192)], bf16_fp32, MODES)],
        # The C++ backend issue's figures (run with 2 threads), and GPT-2's odd vocabulary,
        # whose rows start off the cache lines (csrc/cpu/kernels.h, head_to_line).
        "cpu": [("ce", [(4096, 32000), (2048, 50257), (1024, 128256)],
                 (torch.float32, torch.bfloat16), MODES)],
        # Tiny and classification shapes, where per-call overhead decides; (4, 100): a batch of
        # a few rows (online inference, a small RL batch).
        "small": [("ce", [(4, 100), (64, 10), (32, 100), (2, 7, 16, 16), (256, 1000),
                          (8, 4, 512, 512)], bf16_fp32, MODES)],
        # Rows of a few hundred classes, past the CPU lane path's 256 (kernels.h): flat, where
        # the rows path's per-row work decides, and K-dim.
        "mid": [("ce", [(512, 300), (4096, 300), (4096, 600), (2, 300, 64, 64),
                        (4, 1000, 32, 32)], bf16_fp32, MODES)],
        # Probability targets (distillation, soft labels) over the small, mid and vision shapes.
        "soft": [("ce-soft", [(64, 10), (4096, 1000), (8, 21, 128, 128), (2, 300, 64, 64),
                              (256, 32000)], bf16_fp32, MODES)],
        # nllfused's extras against torch's own composition of them (F.cross_entropy after x * a
        # or s * tanh(x / s), plus z_loss * logsumexp^2): Gemma 2's softcap 30, PaLM's z-loss
        # 1e-4, a temperature; a classifier, a mid head and an LM head.
        "extras": [("ce", ([(64, 10), (4096, 32000), (4096, 256000)] if gpu else
                           [(64, 10), (256, 1000), (1024, 32000)]), bf16_fp32, MODES, options)
                   for options in ((("softcap", 30.0),), (("z_loss", 1e-4),),
                                   (("logit_scale", 0.7),))],
        # The shapes the GPU kernels map specially: few long rows (decoding, RL scoring), very
        # many 10-class rows, a segmentation map.
        "edge": [("ce", [(64, 256000), (4194304, 10), (16, 21, 512, 512)], bf16_fp32, MODES)],
        # The layouts users pass besides contiguous: a segmentation net's channels-last output
        # (binary, few and mid class counts), and LM logits (B, T, V) passed as (B, V, T).
        "layouts": [("ce-channels_last", [(16, 2, 256, 256), (8, 21, 256, 256),
                                          (8, 150, 128, 128)], bf16_fp32, MODES),
                    ("ce-transposed", [(4, 32000, 256)], bf16_fp32, MODES)],
    }


FULL = ("llm", "vision", "linear")
PRESETS = ("quick", "llm", "vision", "linear", "linear-large", "linear-small", "cpu", "small",
           "mid", "soft", "extras", "edge", "layouts", "full", "smoke")
PRESET_HELP = {
    "quick": "small shapes, under a minute on a 2-core CPU (default without a GPU)",
    "llm": "N in {4096,16384} x C in {32000,...,256000}, bf16 and fp32 (default on a GPU)",
    "vision": "segmentation (16,21,512,512), (8,150,512,512); classification (65536,1000)",
    "linear": "fused linear + CE: (N,H,C) = (8192,4096,128256), (8192,2304,256000) bf16 on a "
              "GPU; (2048,1024,32000) bf16 and fp32 on the CPU",
    "linear-large": "fused linear + CE, (4096,2048,128256) bf16 and fp32 on the CPU (minutes); "
                    "(8192,4096,128256) bf16 on a GPU",
    "linear-small": "fused linear + CE, small and mid heads (64,128,10) ... (2048,512,8192), "
                    "fwd and fwd+bwd: per-call cost, whole logits up to 8 MiB",
    "cpu": "(4096,32000), (2048,50257), (1024,128256) x fp32, bf16 with 2 threads: the C++ "
           "backend's figures",
    "small": "tiny and classification shapes (4,100) ... (8,4,512,512): per-call overhead",
    "mid": "rows of 300 to 1000 classes, flat and K-dim (2,300,64,64), (4,1000,32,32)",
    "soft": "probability targets: (64,10), (4096,1000), (8,21,128,128), (2,300,64,64), "
            "(256,32000)",
    "extras": "softcap 30, z_loss 1e-4, logit_scale 0.7 against torch's composition: (64,10), "
              "(256,1000), (1024,32000) on the CPU; (64,10), (4096,32000), (4096,256000) on a GPU",
    "edge": "few long rows (64,256000), 4M rows of 10 classes, segmentation (16,21,512,512)",
    "layouts": "channels-last segmentation (16,2,256,256), (8,21,256,256), (8,150,128,128); "
               "(B,T,V) LM logits passed as (B,V,T) = (4,32000,256)",
    "full": "llm + vision + linear (+ cpu on the CPU)",
    "smoke": "tiny shapes, seconds: for tests",
}


def default_preset(device: torch.device) -> str:
    return "llm" if device.type == "cuda" else "quick"


def expand_presets(names: list, device: torch.device) -> list:
    out = []
    for name in names:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        if name == "full":
            parts = list(FULL) + (["cpu"] if device.type == "cpu" else [])
        else:
            parts = [name]
        out += [p for p in parts if p not in out]
    return out


def build_cases(preset_names: list, device: torch.device, dtypes: Optional[list] = None,
                modes: Optional[list] = None) -> list:
    """The cases of the named presets, in order; `dtypes`/`modes` replace the presets' own."""
    table = _preset_table(device.type)
    cases = []
    for preset in expand_presets(preset_names, device):
        for kind, shapes, preset_dtypes, preset_modes, *options in table[preset]:
            # kind "ce" with probability targets ("ce-soft") or another layout ("ce-<layout>")
            soft = kind == "ce-soft"
            layout = kind[3:] if kind[3:] in LAYOUTS else ""
            for dtype in (dtypes or preset_dtypes):
                for shape in shapes:
                    case = Case(preset, "ce" if soft or layout else kind, tuple(shape), dtype,
                                tuple(modes) if modes else tuple(preset_modes), soft,
                                options[0] if options else (), layout)
                    if case not in cases:
                        cases.append(case)
    return cases


def split_list(text: Optional[str], option: str) -> Optional[list]:
    """A comma-separated option's names, stripped; None where the option was not given (the
    default). An empty name (`--mode ""`, `--mode fwd,`) is an error, not the default."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"{option} {text!r}: empty name in the comma-separated list")
    return list(dict.fromkeys(names))  # a name given twice counts once


def parse_dtypes(text: Optional[str]) -> Optional[list]:
    names = split_list(text, "--dtype")
    if names is None:
        return None
    out = []
    for name in names:
        name = name.lower()
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from float32, bfloat16, float16")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    return out


def parse_modes(text: Optional[str]) -> Optional[list]:
    out = split_list(text, "--mode")
    for m in out or ():
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    return out
