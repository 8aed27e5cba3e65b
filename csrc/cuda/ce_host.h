// Host-side set-up of the CUDA kernels' parameters from tensors, shared by the entry points
// (ce_cuda.cu) and the host emulator (tests/cuda_emulation/emu.cu), so that both launch with the
// same CEParams. The arguments are checked before (csrc/checks.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <type_traits>
#include <utility>

#include "ce_kernels.cuh"

namespace nllfused {
namespace cuda_impl {

// The target's dtype as the kernels read it (TargetDtype).
inline int target_dtype_code(at::ScalarType t, bool prob_target) {
  if (prob_target) {
    switch (t) {
      case at::kHalf: return kProbHalf;
      case at::kBFloat16: return kProbBFloat16;
      case at::kFloat: return kProbFloat;
      case at::kDouble: return kProbDouble;
      default: break;
    }
    TORCH_CHECK(false, "nllfused ce (CUDA): unsupported probability target dtype ", t);
  }
  switch (t) {
    case at::kLong: return kIndexInt64;
    case at::kInt: return kIndexInt32;
    case at::kByte: return kIndexUInt8;
    default: break;
  }
  TORCH_CHECK(false, "nllfused ce (CUDA): unsupported index target dtype ", t);
  return -1;
}

// The kernels' feature flags (CeFlag, ce_thread.cuh) for these options. Weights are a per-class
// feature only where they are read per class (smoothing, probability targets); with plain index
// targets the one w_y of a row is read whether or not kWeight is set. prob_like_logits:
// probability targets in the logits' dtype.
inline int ce_flags(bool prob_target, bool prob_like_logits, bool has_weight,
                    double label_smoothing, double logit_scale, double softcap) {
  int f = prob_target ? (prob_like_logits ? kProb | kProbLike : kProb) : 0;
  if (softcap != 0.0) f |= kCap;
  else if (logit_scale != 1.0) f |= kScale;
  if (!prob_target && label_smoothing != 0.0) f |= kSmooth;
  if (has_weight && (f & (kProb | kSmooth)) != 0) f |= kWeight;
  return f;
}

// The flag sets each kernel family is instantiated for: exact ones for the rows mapping of
// 16- and 32-bit logits (the language-model path: plain, label smoothing, softcap, both,
// probability targets in the logits' dtype; with statistics, plain), the plain tile kernels,
// and everywhere the kRuntime catch-all, per target kind, with and without statistics. 10 rows
// + 5 tile kernels per op and dtype (4 + 4 for float64), and a split forward's merge kernel per
// rows variant: 140 kernels per architecture (the exact sets of every option everywhere would
// be about three times the compile time).
template <typename scalar_t>
using RowsFlagSets = typename std::conditional<
    std::is_same<scalar_t, double>::value,
    std::integer_sequence<int, kRuntime, kRuntime | kProb, kRuntime | kStats,
                          kRuntime | kProb | kStats>,
    std::integer_sequence<int, 0, kSmooth, kCap, kSmooth | kCap, kProb | kProbLike, kRuntime,
                          kRuntime | kProb, kStats, kRuntime | kStats,
                          kRuntime | kProb | kStats>>::type;
template <typename scalar_t>
using TileFlagSets = typename std::conditional<
    std::is_same<scalar_t, double>::value,
    std::integer_sequence<int, kRuntime, kRuntime | kProb, kRuntime | kStats,
                          kRuntime | kProb | kStats>,
    std::integer_sequence<int, 0, kRuntime, kRuntime | kProb, kRuntime | kStats,
                          kRuntime | kProb | kStats>>::type;

// Calls f(std::integral_constant<int, F>{}) with the F of Sets that serves the options' flags
// (ce_flags, with kStats for the statistics' ops): themselves where instantiated, else the
// kRuntime variant of their target kind and statistics.
template <typename Fn, int... Fs>
void with_kernel_flags_in(int flags, std::integer_sequence<int, Fs...>, Fn&& f) {
  const bool exact = ((flags == Fs) || ...);
  const int want = exact ? flags : kRuntime | (flags & (kProb | kStats));
  const bool found =
      ((want == Fs ? (f(std::integral_constant<int, Fs>{}), true) : false) || ...);
  TORCH_CHECK(found, "nllfused ce (CUDA): no kernel for feature flags ", flags);
}
template <typename Sets, typename Fn>
void with_kernel_flags(int flags, Fn&& f) {
  with_kernel_flags_in(flags, Sets{}, std::forward<Fn>(f));
}

// The weights as the kernels read them: contiguous (C,) in acc_t (checked), or undefined.
inline at::Tensor kernel_weight(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
}

// sum(weight) in float64, on the weights' device (no host sync): the backward's smoothing
// coefficient for index targets; undefined otherwise.
inline at::Tensor weight_sum(const at::Tensor& w, bool prob_target) {
  return w.defined() && !prob_target ? w.sum(at::kDouble) : at::Tensor();
}

// The forward's parameters (the outputs are set by the caller). `weight`: the contiguous (C,)
// weights in acc_t, or an undefined tensor.
template <typename acc_t>
CEParams<acc_t> make_params(const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& weight, int64_t ignore_index,
                            double label_smoothing, double logit_scale, double softcap,
                            bool prob_target) {
  CEParams<acc_t> p{};
  p.C = logits.size(1);
  p.D = logits.size(2);
  p.R = logits.size(0) * p.D;
  p.sN = logits.stride(0);
  p.sC = logits.stride(1);
  p.sD = logits.stride(2);
  p.tgt = target.data_ptr();
  p.tN = target.stride(0);
  if (prob_target) {
    p.tC = target.stride(1);
    p.tD = target.stride(2);
  } else {
    p.tC = 0;
    p.tD = target.stride(1);
  }
  p.tgt_dtype = target_dtype_code(target.scalar_type(), prob_target);
  p.weight = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  p.weight_sum = nullptr;
  p.ignore_index = ignore_index;
  p.eps = static_cast<acc_t>(label_smoothing);
  p.eps_over_C = static_cast<acc_t>(label_smoothing / static_cast<double>(p.C));
  p.one_minus_eps = static_cast<acc_t>(1.0 - label_smoothing);
  p.scale = static_cast<acc_t>(logit_scale);
  p.cap = static_cast<acc_t>(softcap);
  p.scale_over_cap = softcap != 0.0 ? static_cast<acc_t>(logit_scale / softcap) : acc_t(0);
  return p;
}

// The backward's inputs. grad_lse: nullptr for None. wsum: sum(weight) in float64, one element
// on the logits' device (undefined without weights or for probability targets).
template <typename acc_t>
void set_bwd_inputs(CEParams<acc_t>& p, const at::Tensor& grad_loss, const at::Tensor* grad_lse,
                    const at::Tensor& lse, const at::Tensor& aux, const at::Tensor& wsum) {
  p.weight_sum = wsum.defined() ? wsum.data_ptr<double>() : nullptr;
  p.grad = grad_loss.data_ptr<acc_t>();
  p.gN = grad_loss.stride(0);
  p.gD = grad_loss.stride(1);
  p.grad_lse = grad_lse != nullptr ? grad_lse->data_ptr<double>() : nullptr;
  p.glN = grad_lse != nullptr ? grad_lse->stride(0) : 0;
  p.glD = grad_lse != nullptr ? grad_lse->stride(1) : 0;
  p.lse_in = lse.data_ptr<double>();
  p.lN = lse.stride(0);
  p.lD = lse.stride(1);
  p.aux_in = aux.data_ptr<acc_t>();
  p.aN = aux.stride(0);
  p.aD = aux.stride(1);
}

// The statistics' forward outputs (kStats): contiguous (N, D), entropy and target_logp in acc_t.
template <typename acc_t>
void set_stats_outputs(CEParams<acc_t>& p, const at::Tensor& entropy,
                       const at::Tensor& target_logp, const at::Tensor& predicted) {
  p.entropy = entropy.data_ptr<acc_t>();
  p.target_logp = target_logp.data_ptr<acc_t>();
  p.predicted = predicted.data_ptr<int64_t>();
}

// The statistics' backward inputs (kStats): their gradients (nullptr for None) and the
// forward's entropy, (N, D) in acc_t, any strides.
template <typename acc_t>
void set_stats_bwd_inputs(CEParams<acc_t>& p, const at::Tensor* grad_entropy,
                          const at::Tensor* grad_target_logp, const at::Tensor& entropy) {
  p.grad_entropy = grad_entropy != nullptr ? grad_entropy->data_ptr<acc_t>() : nullptr;
  p.geN = grad_entropy != nullptr ? grad_entropy->stride(0) : 0;
  p.geD = grad_entropy != nullptr ? grad_entropy->stride(1) : 0;
  p.grad_target_logp =
      grad_target_logp != nullptr ? grad_target_logp->data_ptr<acc_t>() : nullptr;
  p.gtN = grad_target_logp != nullptr ? grad_target_logp->stride(0) : 0;
  p.gtD = grad_target_logp != nullptr ? grad_target_logp->stride(1) : 0;
  p.entropy_in = entropy.data_ptr<acc_t>();
  p.eN = entropy.stride(0);
  p.eD = entropy.stride(1);
}

// Calls f(scalar_t{}, p, flags) with the logits' dtype, the kernels' parameters for these
// arguments (make_params) and the options' feature flags (ce_flags); the caller picks the
// mapping and then the kernel with with_kernel_flags. p points into the target tensor (or its
// float copy, below), alive for f's launches: the caching allocator orders a later reuse of
// that memory after them on the stream.
template <typename Fn>
void with_params(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                 int64_t ignore_index, double label_smoothing, double logit_scale, double softcap,
                 bool prob_target, Fn&& f) {
  // float64 probabilities with float accumulation: rounded to float here, once, as the
  // kernels would round each (the same values), so that no kernel but the float64 ones
  // converts from float64 per element.
  const bool narrow = prob_target && target.scalar_type() == at::kDouble &&
                      logits.scalar_type() != at::kDouble;
  const at::Tensor tgt = narrow ? target.to(at::kFloat) : target;
  const int flags = ce_flags(prob_target, tgt.scalar_type() == logits.scalar_type(),
                             weight.defined(), label_smoothing, logit_scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "nllfused_ce",
                                  [&] {
    using acc_t = acc_type_t<scalar_t>;
    CEParams<acc_t> p = make_params<acc_t>(logits, tgt, weight, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    f(scalar_t{}, p, flags);
  });
}

}  // namespace cuda_impl
}  // namespace nllfused
