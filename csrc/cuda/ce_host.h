// Host-side set-up of the CUDA kernels' parameters from tensors, shared by the entry points
// (ce_cuda.cu) and the host emulator (tests/cuda_emulation/emu.cu), so that both launch with the
// same CEParams. The arguments are checked before (csrc/checks.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "ce_kernels.cuh"

namespace nllfused {
namespace cuda_impl {

inline int prob_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kProbHalf;
    case at::kBFloat16: return kProbBFloat16;
    case at::kFloat: return kProbFloat;
    case at::kDouble: return kProbDouble;
    default: TORCH_CHECK(false, "nllfused ce (CUDA): unsupported probability target dtype ", t);
  }
  return -1;
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
    p.prob_dtype = prob_dtype_code(target.scalar_type());
  } else {
    p.tC = 0;
    p.tD = target.stride(1);
    p.prob_dtype = -1;
  }
  p.weight = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  p.weight_sum = nullptr;
  p.ignore_index = ignore_index;
  p.eps = static_cast<acc_t>(label_smoothing);
  p.eps_over_C = static_cast<acc_t>(label_smoothing / static_cast<double>(p.C));
  p.one_minus_eps = static_cast<acc_t>(1.0 - label_smoothing);
  p.scale = static_cast<acc_t>(logit_scale);
  p.has_cap = softcap != 0.0;
  p.cap = static_cast<acc_t>(softcap);
  p.scale_over_cap = p.has_cap ? static_cast<acc_t>(logit_scale / softcap) : acc_t(0);
  p.need_t = prob_target || label_smoothing != 0.0;
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

// Calls f(tgt_t{}) with the target type: int64_t / int32_t / uint8_t / ProbTarget.
template <typename F>
void dispatch_target(const at::Tensor& target, bool prob_target, F&& f) {
  if (prob_target) {
    f(ProbTarget{});
    return;
  }
  switch (target.scalar_type()) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kByte: f(uint8_t{}); break;
    default: TORCH_CHECK(false, "nllfused ce (CUDA): unsupported index target dtype ",
                         target.scalar_type());
  }
}

// Calls f(scalar_t{}, tgt_t{}, p) with the logits' dtype, the target type and the kernels'
// parameters for these arguments (make_params): every kernel instantiation comes from here.
template <typename F>
void with_params(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                 int64_t ignore_index, double label_smoothing, double logit_scale, double softcap,
                 bool prob_target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "nllfused_ce",
                                  [&] {
    using acc_t = acc_type_t<scalar_t>;
    CEParams<acc_t> p = make_params<acc_t>(logits, target, weight, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    dispatch_target(target, prob_target, [&](auto tag) { f(scalar_t{}, tag, p); });
  });
}

}  // namespace cuda_impl
}  // namespace nllfused
