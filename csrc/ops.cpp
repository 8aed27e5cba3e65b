// The op schema of nllfused, shared by every backend (pytorch/extension-cpp style).
//
// Two op pairs with one signature:
//   nllfused::ce_fwd / ce_bwd                 C++ kernels: CPU (csrc/cpu), CUDA (csrc/cuda)
//   nllfused::ce_fwd_triton / ce_bwd_triton   Triton kernels (kernels/), registered from Python
// Fake (meta) implementations and autograd are registered once for all of them in
// nllfused/ops.py, so the same contract holds whichever backend runs.
//
// Contract (the Python wrapper nllfused/functional.py canonicalises the arguments):
//   logits  (N, C, D) float16/bfloat16/float32/float64, any strides, C >= 1. Row r = (n, d).
//           A plain (N, C) input arrives as (N, C, 1); (N, C, d1..dk) with d flattened.
//   target  index targets: (N, D) int64/int32/uint8, any strides;
//           probability targets (prob_target=true): (N, C, D) floating, any strides.
//   weight  None or (C,) float32 contiguous class weights.
//   softcap 0 means "no softcap"; logit_scale 1 means "no scaling".
//   The logits the softmax sees are  z = softcap(logit_scale * x),  softcap(v) = s*tanh(v/s).
//
// ce_fwd -> (loss, lse, aux), each (N, D); loss and aux in the accumulation dtype
//   (float64 for float64 logits, float32 otherwise), lse in float64:
//   loss  per-row loss, GUIDE §1, z_loss*lse^2 included; 0 for ignored rows;
//         NaN for an index target outside [0, C) that is not ignore_index (never read out of bounds);
//         the CPU kernel raises IndexError instead (torch's behaviour for CPU tensors).
//   lse   logsumexp of the row's z, ALWAYS float64 (whatever the logits dtype): computed as
//         double(m) + double(log(s)) from the running max m and rescaled sum s, so the backward can
//         split it into hi = float(lse), lo = float(lse - hi) and form p = exp((z - hi) - lo) in
//         float32 with torch's accuracy even for logits far from zero (e.g. 1e4 + noise). Likewise
//         the forward computes lse - z_y as (m - z_y) + log(s), never by subtracting a rounded lse.
//   aux   index targets: w[y] (1 without weight) for counted rows, 0 for ignored rows,
//         NaN for out-of-range rows -- the row's share of the 'mean' denominator.
//         probability targets: sum_k w_k q'_k, q' = (1-e) q + e/C -- the backward's p-coefficient.
// ce_bwd(grad_loss (N, D) accumulation dtype, any strides) -> grad_logits (N, C, D),
//   logits' dtype, contiguous, = grad_loss[r] * d loss[r] / d x[r, :], 0 on ignored rows.
#include <torch/library.h>

TORCH_LIBRARY(nllfused, m) {
  m.def(
      "ce_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float logit_scale, float softcap, "
      "bool prob_target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor aux, int ignore_index, float label_smoothing, float z_loss, "
      "float logit_scale, float softcap, bool prob_target) -> Tensor");
  m.def(
      "ce_fwd_triton(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float logit_scale, float softcap, "
      "bool prob_target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_bwd_triton(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor aux, int ignore_index, float label_smoothing, float z_loss, "
      "float logit_scale, float softcap, bool prob_target) -> Tensor");
}
