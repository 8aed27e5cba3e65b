// Argument checks of nllfused::ce_fwd / ce_bwd shared by the C++ backends (csrc/cpu, csrc/cuda)
// and the CUDA host emulator: shapes and dtypes as the contract in csrc/ops.cpp states them, and
// every tensor on the logits' device, whose type the caller gives (check_fwd, check_bwd).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace nllfused {

// The accumulation dtype: float64 for float64 logits, float32 for every other dtype.
inline at::ScalarType acc_dtype(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// The tensor of an optional argument, or nullptr when it is None.
inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

using Named = std::pair<const char*, const at::Tensor*>;  // (argument name, tensor or nullptr)

// logits on a device of type `type`, and every other tensor given (nullptr: None) on its device.
inline void check_devices(const char* op, c10::DeviceType type, const at::Tensor& logits,
                          std::initializer_list<Named> others) {
  TORCH_CHECK(logits.device().type() == type, op, ": logits must be a ", c10::DeviceTypeName(type),
              " tensor, got ", logits.device());
  for (const auto& [name, t] : others)
    TORCH_CHECK(t == nullptr || t->device() == logits.device(), op, ": ", name, " is on ",
                t->device(), " but logits are on ", logits.device());
}

// logits, target, weight and label_smoothing: the arguments both ops take.
inline void check_args(const char* op, const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, double label_smoothing,
                       bool prob_target) {
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (N, C, D), got ", logits.dim(),
              " dims with shape ", logits.sizes());
  const auto xt = logits.scalar_type();
  TORCH_CHECK(is_float_dtype(xt), op,
              ": logits must be float16, bfloat16, float32 or float64, got ", xt);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  TORCH_CHECK(C >= 1, op, ": logits need at least one class (C >= 1), got shape ", logits.sizes());
  if (prob_target) {
    TORCH_CHECK(target.dim() == 3 && target.sizes() == logits.sizes(), op,
                ": probability targets must have the logits' shape ", logits.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(is_float_dtype(target.scalar_type()), op,
                ": probability targets must be float16, bfloat16, float32 or float64, got ",
                target.scalar_type());
  } else {
    const auto tt = target.scalar_type();
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": index targets must be (N, D) = (", N, ", ", D, "), got ", target.sizes());
    TORCH_CHECK(tt == at::kLong || tt == at::kInt || tt == at::kByte, op,
                ": index targets must be int64, int32 or uint8, got ", tt);
  }
  if (const at::Tensor* w = present(weight)) {
    TORCH_CHECK(w->dim() == 1 && w->size(0) == C, op, ": weight must be (C,) = (", C, ",), got ",
                w->sizes());
    TORCH_CHECK(w->scalar_type() == acc_dtype(xt), op, ": weight must be ", acc_dtype(xt),
                " (the accumulation dtype of ", xt, " logits), got ", w->scalar_type());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

// A per-row tensor: (N, D) of dtype `want`, any strides.
inline void check_rowwise(const char* op, const char* name, const at::Tensor& t,
                          const at::Tensor& logits, at::ScalarType want) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(2), op,
              ": ", name, " must be (N, D) = (", logits.size(0), ", ", logits.size(2), "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, " (for ",
              logits.scalar_type(), " logits), got ", t.scalar_type());
}

// ce_bwd's per-row inputs: grad_loss and aux in the accumulation dtype, lse and grad_lse float64.
inline void check_bwd_rows(const char* op, const at::Tensor& grad_loss,
                           const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                           const at::Tensor& lse, const at::Tensor& aux) {
  const auto acc = acc_dtype(logits.scalar_type());
  check_rowwise(op, "grad_loss", grad_loss, logits, acc);
  if (const at::Tensor* gs = present(grad_lse))
    check_rowwise(op, "grad_lse", *gs, logits, at::kDouble);
  check_rowwise(op, "lse", lse, logits, at::kDouble);
  check_rowwise(op, "aux", aux, logits, acc);
}

// Everything ce_fwd / ce_bwd require of their arguments, for a backend on devices of type `type`.
inline void check_fwd(const char* op, c10::DeviceType type, const at::Tensor& logits,
                      const at::Tensor& target, const std::optional<at::Tensor>& weight,
                      double label_smoothing, bool prob_target) {
  check_devices(op, type, logits, {{"target", &target}, {"weight", present(weight)}});
  check_args(op, logits, target, weight, label_smoothing, prob_target);
}
inline void check_bwd(const char* op, c10::DeviceType type, const at::Tensor& grad_loss,
                      const std::optional<at::Tensor>& grad_lse, const at::Tensor& logits,
                      const at::Tensor& target, const std::optional<at::Tensor>& weight,
                      const at::Tensor& lse, const at::Tensor& aux, double label_smoothing,
                      bool prob_target) {
  check_devices(op, type, logits,
                {{"target", &target}, {"weight", present(weight)}, {"grad_loss", &grad_loss},
                 {"grad_lse", present(grad_lse)}, {"lse", &lse}, {"aux", &aux}});
  check_args(op, logits, target, weight, label_smoothing, prob_target);
  check_bwd_rows(op, grad_loss, grad_lse, logits, lse, aux);
}
// ce_bwd_stats's further inputs (after check_bwd): the statistics' gradients (either may be
// None) and the forward's entropy, (N, D) in the accumulation dtype on the logits' device.
inline void check_bwd_stats(const char* op, c10::DeviceType type, const at::Tensor& logits,
                            const std::optional<at::Tensor>& grad_entropy,
                            const std::optional<at::Tensor>& grad_target_logp,
                            const at::Tensor& entropy) {
  check_devices(op, type, logits,
                {{"grad_entropy", present(grad_entropy)},
                 {"grad_target_logp", present(grad_target_logp)}, {"entropy", &entropy}});
  const auto acc = acc_dtype(logits.scalar_type());
  if (const at::Tensor* ge = present(grad_entropy))
    check_rowwise(op, "grad_entropy", *ge, logits, acc);
  if (const at::Tensor* gt = present(grad_target_logp))
    check_rowwise(op, "grad_target_logp", *gt, logits, acc);
  check_rowwise(op, "entropy", entropy, logits, acc);
}

}  // namespace nllfused
