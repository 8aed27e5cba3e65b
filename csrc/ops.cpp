// The op schema of nllfused, shared by every backend (pytorch/extension-cpp style). The maths the
// ops implement (per-row loss, smoothing, soft targets, softcap, lse precision) is written out in
// docs/maths.md; this is the contract between the Python layer and the kernels.
//
// Two op pairs with one signature:
//   nllfused::ce_fwd / ce_bwd                 C++ kernels: CPU (csrc/cpu), CUDA (csrc/cuda)
//   nllfused::ce_fwd_triton / ce_bwd_triton   Triton kernels (kernels/), registered from Python
// Fake (meta) implementations and autograd are registered once for all of them in
// nllfused/ops.py, so the same contract holds whichever backend runs. One more op,
// nllfused::cross_entropy_loss, wraps ce_fwd / ce_bwd with the reduction and autograd in C++
// (csrc/loss.cpp) for the calls torch's own cross_entropy can make: a small call's overhead.
//
// Arguments (nllfused/_checks.py canonicalises what the user passed):
//   logits  (N, C, D) float16/bfloat16/float32/float64, any strides, C >= 1. Row r = (n, d).
//           A plain (N, C) input arrives as (N, C, 1); (N, C, d1..dk) with d flattened.
//   target  index targets: (N, D) int64/int32/uint8, any strides;
//           probability targets (prob_target=true): (N, C, D) floating, any strides.
//   weight  None or (C,) contiguous class weights in the accumulation dtype (below).
//   softcap 0 means "no softcap"; logit_scale 1 means "no scaling".
//   The logits the softmax sees are  z = softcap(logit_scale * x),  softcap(v) = s*tanh(v/s).
//   The accumulation dtype is float64 for float64 logits and float32 for every other dtype.
//
// ce_fwd -> (loss, lse, aux), each (N, D) contiguous; loss and aux in the accumulation dtype,
//   lse in float64:
//   loss  per-row cross-entropy (docs/maths.md, "Per-row loss"); 0 for ignored rows. An index
//         target outside [0, C) that is not ignore_index makes its row NaN on the GPU (never read
//         out of bounds); the CPU kernel raises IndexError (torch's behaviour for CPU tensors).
//         Probability targets: a class with w_c q'_c == 0 adds nothing, even when z_c = -inf.
//   lse   logsumexp of the row's z, ALWAYS float64, computed as double(m) + double(log(s)) from
//         the running max m and rescaled sum s ("lse precision" in docs/maths.md); as
//         torch.logsumexp +inf for a row holding +inf (NaN if it also holds a NaN), whose loss
//         is NaN.
//   aux   index targets: w[y] (1 without weight) for counted rows, 0 for ignored rows, NaN for
//         out-of-range rows -- the row's share of the 'mean' denominator.
//         probability targets: sum_k w_k q'_k, q' = (1-e) q + e/C -- the backward's p-coefficient.
// ce_bwd(grad_loss, grad_lse, ...) -> grad_logits (N, C, D), logits' dtype, contiguous:
//   grad_logits[r, :] = grad_loss[r] * d loss[r] / d x[r, :] + grad_lse[r] * d lse[r] / d x[r, :]
//   grad_loss (N, D) in the accumulation dtype, any strides; the loss part is 0 on ignored rows.
//   grad_lse  None, or (N, D) float64, any strides; d lse / d z_c = p_c. Rows where it is 0 get
//             no lse part at all (no 0 * NaN). This is how z-loss and every other function of
//             lse reach the logits: the Python layer adds them as differentiable O(N·D) terms.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(nllfused, m) {
  m.def(
      "ce_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor aux, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, bool prob_target) -> Tensor");
  // ce_bwd_inplace: ce_bwd's gradient written over the logits (bitwise what ce_bwd returns),
  // for callers that no longer need them -- the fused linear + cross-entropy's chunks
  // (nllfused/linear.py) -- so a chunk holds its logits and nothing more. Every C++ backend has
  // it: the CPU kernels write in place (each logit is read before its gradient is stored over
  // it, the true class's logit before the row's first store); elsewhere a composite computes
  // ce_bwd and copies it over. ce_bwd_inplace_triton is the Triton kernels' own.
  m.def(
      "ce_bwd_inplace(Tensor grad_loss, Tensor? grad_lse, Tensor(a!) logits, Tensor target, "
      "Tensor? weight, Tensor lse, Tensor aux, int ignore_index, float label_smoothing, "
      "float logit_scale, float softcap, bool prob_target) -> ()");
  m.def(
      "ce_bwd_inplace_triton(Tensor grad_loss, Tensor? grad_lse, Tensor(a!) logits, "
      "Tensor target, Tensor? weight, Tensor lse, Tensor aux, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target) -> ()");
  // The one-call path for torch-compatible calls (csrc/loss.cpp): input and target as
  // torch.nn.functional.cross_entropy takes them (index targets int64, or floating probability
  // targets of the input's shape), weight None or (C,) in the accumulation dtype, reduction as
  // at::Reduction numbers it (0 none, 1 mean, 2 sum); z_loss >= 0 (docs/maths.md: z_loss lse^2
  // per counted row, 'mean' over the counted rows), logit_scale, softcap (0: none) as ce_fwd's.
  // Returns the reduced loss in the input's dtype (promoted with probability targets'), as
  // torch's cross_entropy does, or in dtype where given (autocast's float32 for 16-bit logits:
  // the float32 value, never rounded to the logits' dtype).
  m.def(
      "cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss=0., float logit_scale=1., "
      "float softcap=0., ScalarType? dtype=None) -> Tensor");
  // The same with the statistics of nllfused/stats.py (csrc/loss_stats.cpp): (loss, lse,
  // z_loss, predicted, correct, entropy, target_logprob), each reduced as the loss; `want` a mask
  // of the statistics computed (bit i: stats.NAMES[i]; bit 6: lse per row whatever the
  // reduction, return_lse's); the others are empty (0,) tensors. z_loss, logit_scale, softcap as
  // cross_entropy_loss's, with the lse and z_loss bits only (NotImplementedError otherwise).
  m.def(
      "cross_entropy_loss_stats(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, int want, float z_loss=0., "
      "float logit_scale=1., float softcap=0.) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ce_fwd_triton(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target) "
      "-> (Tensor, Tensor, Tensor)");
  // Statistics (docs/maths.md, "Statistics"), from the forward's own pass: ce_fwd's outputs and
  // entropy (N, D) acc dtype (-sum p log p of z), target_logp (N, D) acc dtype (log p_y; 0 on
  // ignored rows, NaN out of range; 0 for probability targets), predicted (N, D) int64 (argmax
  // of z, the first of equal maxima, a NaN's if any). The backward adds grad_entropy[r] *
  // dH/dz + grad_target_logp[r] * d log p_y / dz (either may be None; both in the acc dtype) to
  // ce_bwd's gradient; entropy is the forward's. with_entropy / with_predicted False: that output
  // is zeros and the kernels may skip its work (the entropy's sum over the classes, the argmax's
  // scan), and the autograd formula takes no gradient through a zero entropy; target_logp needs
  // nothing beyond the loss's pass. Two op pairs with this one signature:
  // ce_fwd_stats / ce_bwd_stats (C++ kernels: CPU and CUDA) and ce_fwd_stats_triton /
  // ce_bwd_stats_triton (Triton).
  m.def(
      "ce_fwd_stats(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target, "
      "bool with_entropy=True, bool with_predicted=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ce_bwd_stats(Tensor grad_loss, Tensor? grad_lse, Tensor? grad_entropy, "
      "Tensor? grad_target_logp, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor aux, Tensor entropy, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, bool prob_target) -> Tensor");
  m.def(
      "ce_fwd_stats_triton(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target, "
      "bool with_entropy=True, bool with_predicted=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ce_bwd_stats_triton(Tensor grad_loss, Tensor? grad_lse, Tensor? grad_entropy, "
      "Tensor? grad_target_logp, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor aux, Tensor entropy, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, bool prob_target) -> Tensor");
  m.def(
      "ce_bwd_triton(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, "
      "Tensor? weight, Tensor lse, Tensor aux, int ignore_index, float label_smoothing, "
      "float logit_scale, float softcap, bool prob_target) -> Tensor");
}

// ce_bwd_inplace where a backend has no kernel of its own for it (CUDA): ce_bwd, copied over.
namespace {

void ce_bwd_inplace_composite(const at::Tensor& grad_loss,
                              const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const at::Tensor& lse, const at::Tensor& aux, int64_t ignore_index,
                              double label_smoothing, double logit_scale, double softcap,
                              bool prob_target) {
  static const auto ce_bwd =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nllfused::ce_bwd", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const at::Tensor&, int64_t, double, double, double, bool)>();
  logits.copy_(ce_bwd.call(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index,
                           label_smoothing, logit_scale, softcap, prob_target));
}

}  // namespace

TORCH_LIBRARY_IMPL(nllfused, CompositeExplicitAutograd, m) {
  m.impl("ce_bwd_inplace", &ce_bwd_inplace_composite);
}
