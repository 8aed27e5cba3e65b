"""What every Triton launcher of nllfused shares (installed as nllfused.kernels.launch).

- `INTERPRETER`: whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1, read when
  triton is first imported, so read once here too; this also keeps the environment out of code
  that torch.compile traces).
- `guard(tensor)`: the context a launch runs in: the tensor's CUDA device, or, under the
  interpreter, a lock (the interpreter patches module-level state while a kernel runs, so
  concurrent interpreted launches from several Python threads would collide).
- `hi_lo(*values)`: float options as (hi, lo) float32 pairs (Triton passes Python floats as
  float32, which would round them for float64 logits; the kernels add hi + lo in their dtype).
- `acc_dtype(dtype)`: the kernels' accumulation dtype, float64 for float64 logits, else float32.
- `fp_fusion(flags)`: Triton's enable_fp_fusion for a launch with these constexpr flags.
- `target_strides(target, prob_target)`: the targets' (n, class, d) strides as the kernels take
  them, class 0 for class indices.
"""
import os
import struct
import threading

import torch
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETER_LOCK = threading.Lock()


def guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else _INTERPRETER_LOCK


def hi_lo(*values: float) -> list:
    pairs = []
    for v in values:
        hi = struct.unpack("f", struct.pack("f", v))[0]
        pairs += [hi, v - hi]
    return pairs


def acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def fp_fusion(flags: dict) -> bool:
    """Whether the compiler may fuse a product into a later sum: not where the logits are
    transformed (HAS_SCALE, HAS_SOFTCAP). There ce_bwd_kernel's z = x * logit_scale was fused
    into z - lse, unrounded (its sm_90 PTX: fma.rn.f32 of the scale, x and -lse), where the
    forward's max and its test for classes at the max use z rounded (mul.f32, which ptxas may
    still fuse into a later add): the backward's p of a class at the max (exactly 1 to the
    forward) came out 1 + up to half an ulp of z. Without fusion every product is rounded as
    written (mul.rn); explicit tl.fma stay fused."""
    return not (flags.get("HAS_SCALE") or flags.get("HAS_SOFTCAP"))


def truncating_store(logits: torch.Tensor) -> bool:
    """The interpreter casts float32 to bfloat16 by truncation, where GPUs round to nearest even:
    under it, kernels write float32 and torch rounds, so tests see the GPU's numbers."""
    return not logits.is_cuda and logits.dtype == torch.bfloat16


def target_strides(target: torch.Tensor, prob_target: bool) -> tuple:
    if prob_target:
        return target.stride(0), target.stride(1), target.stride(2)
    return target.stride(0), 0, target.stride(1)
