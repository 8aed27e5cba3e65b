// What the one-call ops share (csrc/loss.cpp: nllfused::cross_entropy_loss, csrc/loss_stats.cpp:
// nllfused::cross_entropy_loss_stats): the canonical views, torch's reductions of the per-row
// losses and their gradients, and how a graph node is made.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nllfused_cpu {

// ce_fwd on the CPU with the one-call op's reduction in the kernel's pass where its path can
// (the lanes path: csrc/cpu/kernels.h, Args::sums): then `summed`, loss_sum / aux_sum the rows'
// sums in double, and no loss and aux rows (undefined tensors). Else the rows, as ce_fwd gives
// them. `lean`: the caller's loss is 16-bit, the lse kept for its backward alone (Args::lean).
// Defined in csrc/cpu/ce_cpu.cpp.
struct SummedForward {
  at::Tensor loss, lse, aux;
  double loss_sum, aux_sum;
  bool summed;
};
SummedForward ce_fwd_summed_cpu(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                double label_smoothing, double logit_scale, double softcap,
                                bool lean);

// ce_fwd_stats on the CPU likewise (nllfused::cross_entropy_loss_stats, csrc/loss_stats.cpp):
// where `summed`, the sums of csrc/cpu/kernels.h's Sum over the counted rows (lse, z-loss term,
// entropy, target log-prob, rows predicted right, counted rows) besides loss_sum / aux_sum, and
// of the rows only lse, entropy where entropy_rows asks (zeros unless want_ent) and predicted
// where predicted_rows does; the others undefined. Else every row, as ce_fwd_stats gives them.
struct SummedStatsForward {
  at::Tensor loss, lse, aux, entropy, target_logp, predicted;
  double loss_sum, aux_sum, lse_sum, z_loss_sum, entropy_sum, target_logp_sum, hits, counted;
  bool summed;
};
SummedStatsForward ce_fwd_stats_summed_cpu(const at::Tensor& logits, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           int64_t ignore_index, double label_smoothing,
                                           bool want_ent, bool want_pred, bool entropy_rows,
                                           bool predicted_rows);

// ce_bwd on the CPU, the gradient in the logits' own strides where their rows have unit
// stride but are not adjacent (csrc/cpu/ce_cpu.cpp, backward's like_logits), else as ce_bwd's.
// The one-call ops' backward (ce_bwd below), whose gradient autograd takes as the input's.
at::Tensor ce_bwd_like_logits_cpu(const at::Tensor& grad_loss,
                                  const std::optional<at::Tensor>& grad_lse,
                                  const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& aux, int64_t ignore_index,
                                  double label_smoothing, double logit_scale, double softcap,
                                  bool prob_target);

// ce_bwd_stats on the CPU, the gradient in the logits' strides as ce_bwd_like_logits_cpu's
// (csrc/loss_stats.cpp's ce_bwd_stats, for plain CPU tensors).
at::Tensor ce_bwd_stats_like_logits_cpu(const at::Tensor& grad_loss,
                                        const std::optional<at::Tensor>& grad_entropy,
                                        const std::optional<at::Tensor>& grad_target_logp,
                                        const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight,
                                        const at::Tensor& lse, const at::Tensor& aux,
                                        const at::Tensor& entropy, int64_t ignore_index,
                                        double label_smoothing);

// ce_bwd_stats on the CPU with grad_entropy applied to the counted rows only (target !=
// ignore_index; Args::gent_counted): the gradients of reduced statistics, one value each for
// every row (expanded, strides 0), need no per-row tensors then. The gradient in the logits'
// strides as ce_bwd_like_logits_cpu's.
at::Tensor ce_bwd_stats_counted_cpu(const at::Tensor& grad_loss,
                                    const std::optional<at::Tensor>& grad_entropy,
                                    const std::optional<at::Tensor>& grad_target_logp,
                                    const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                    const at::Tensor& aux, const at::Tensor& entropy,
                                    int64_t ignore_index, double label_smoothing);

}  // namespace nllfused_cpu

namespace nllfused {
namespace one_call_ops {

using at::Tensor;
using torch::autograd::Node;

// at::Reduction's numbering, which torch.nn.functional passes to its own kernels.
constexpr int64_t kNone = 0, kMean = 1, kSum = 2;

// Whether a one-call op's target holds class probabilities: a floating target (the input's
// shape), as torch's own cross_entropy decides. Else class indices (int64, the input's shape less
// the class dimension).
inline bool prob_target(const Tensor& target) { return at::isFloatingType(target.scalar_type()); }

// ce_fwd / ce_bwd, by default of the plain options (logit_scale 1, no softcap, no grad_lse).
inline std::tuple<Tensor, Tensor, Tensor> ce_fwd(const Tensor& logits, const Tensor& target,
                                                 const std::optional<Tensor>& weight,
                                                 int64_t ignore_index, double label_smoothing,
                                                 bool prob = false, double logit_scale = 1.0,
                                                 double softcap = 0.0) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::ce_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t,
                           double, double, double, bool)>();
  // Straight to the kernel: ce_fwd's autograd (a Python function, nllfused/ops.py) is not
  // wanted here, where the one-call op's own autograd holds the graph; even with grad mode off,
  // passing through it would cost more than the whole call should.
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                 prob);
}

inline bool plain_cpu(const Tensor& t);
inline bool plain_cpu(const std::optional<Tensor>& t);

// The one-call ops' backward: plain CPU tensors straight to the kernels, their gradient in the
// logits' strides where that saves a scatter and autograd's copy (ce_bwd_like_logits_cpu);
// others (CUDA, a trace's fake tensors) through the op.
inline Tensor ce_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                     const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& aux,
                     int64_t ignore_index, double label_smoothing, bool prob = false,
                     const std::optional<Tensor>& grad_lse = std::nullopt,
                     double logit_scale = 1.0, double softcap = 0.0) {
  if (plain_cpu(logits) && plain_cpu(grad_loss) && plain_cpu(target) && plain_cpu(weight) &&
      plain_cpu(grad_lse))
    return nllfused_cpu::ce_bwd_like_logits_cpu(grad_loss, grad_lse, logits, target, weight, lse,
                                                aux, ignore_index, label_smoothing, logit_scale,
                                                softcap, prob);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nllfused::ce_bwd", "")
          .typed<Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                        const std::optional<Tensor>&, const Tensor&, const Tensor&, int64_t,
                        double, double, double, bool)>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(grad_loss, grad_lse, logits, target, weight, lse, aux, ignore_index,
                 label_smoothing, logit_scale, softcap, prob);
}

// A 2-D CPU input stored class-major -- (N, C) with strides (1, N), x.t() contiguous: logits
// computed as W h^T, then transposed -- is the (1, C, N) of a K-dimensional input whose rows lie
// side by side: the kernels then read and write it along its contiguous dimension, and the
// gradient comes back in the input's own strides, with nothing for autograd to copy. As
// (N, C, 1) each row was gathered class by class and the gradient came back row-major for
// AccumulateGrad to transpose: (256, 1000) float16 forward + backward 0.8x torch's time.
inline bool class_major(const Tensor& t) {
  return t.dim() == 2 && t.is_cpu() && t.size(0) > 1 && t.size(1) > 1 && t.stride(0) == 1 &&
         t.stride(1) == t.size(0);
}

// The saved input in the layout its forward canonicalised (major: class_major then): a
// saved-tensor hook may hand it back in other strides (save_on_cpu(pin_memory=True) packs it
// contiguous), where the rows saved beside it (lse, aux) are laid out for the forward's view.
inline Tensor as_forward_layout(const Tensor& input, bool major) {
  if (class_major(input) == major) return input;
  return major ? input.t().contiguous().t() : input.contiguous();
}

// A vmapped gradient (torch.autograd.grad(is_grads_batched=True), jacobian with
// vectorize=True: the legacy Batched key; torch.func.vmap: FuncTorchBatched): a wrapper
// without storage the kernels could read; the one-call nodes take it through torch's
// differentiable formula, as for create_graph=True.
inline bool batched(const Tensor& t) {
  return t.defined() && t.key_set().has_any(c10::DispatchKeySet(
                            {c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched}));
}

// The canonical views of csrc/ops.cpp: logits (N, C, D), targets (N, D) or, probabilities,
// (N, C, D); views, never copies, for contiguous, channels-last and class-major inputs.
// major: class_major(the input), whose view probability targets share.
inline Tensor canonical_logits(const Tensor& t, bool major) {
  if (major) return t.t().unsqueeze(0);
  if (t.dim() == 1) return t.view({1, t.size(0), 1});
  if (t.dim() == 2) return t.unsqueeze(-1);
  return t.dim() == 3 ? t : t.flatten(2);  // flatten would hand back its input: no op
}

inline std::pair<Tensor, Tensor> canonical(const Tensor& input, const Tensor& target) {
  const bool major = class_major(input);
  const Tensor logits = canonical_logits(input, major);
  if (prob_target(target)) return {logits, canonical_logits(target, major)};
  if (major) return {logits, target.unsqueeze(0)};
  if (input.dim() == 1) return {logits, target.reshape({1, 1})};
  if (input.dim() == 2) return {logits, target.unsqueeze(-1)};
  return {logits, input.dim() == 3 ? target : target.flatten(1)};
}

// The gradient over canonical(input)'s logits -- contiguous, or in the logits' own strides
// (ce_bwd_like_logits_cpu) -- as the input's: a view either way (class-major: (1, C, N)
// contiguous, the input's own strides once transposed back).
inline Tensor grad_as_input(const Tensor& g, const Tensor& input) {
  return class_major(input) ? g.squeeze(0).t() : g.view(input.sizes());
}

// The loss's dtype: the input's, promoted with probability targets' (torch's cross_entropy).
inline at::ScalarType loss_dtype(const Tensor& input, const Tensor& target) {
  return prob_target(target) ? at::promote_types(input.scalar_type(), target.scalar_type())
                             : input.scalar_type();
}

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, op,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum); got ", reduction);
}

// The CPU reductions are loops here (sums in double, rounded once): on a 10-class batch the
// three tensor ops of loss.sum() / aux.sum() cost as much as the kernel; on a segmentation map's
// millions of rows cpu_sum runs on at::parallel_for's threads as fast as at::sum (both read the
// rows once; measured at (8, 4, 512, 512)) and keeps the reduced loss within 1 ulp of the exact
// sum, the same bits on any number of threads. Plain CPU tensors only: not the fake or
// functional ones of a trace (opcheck, torch.compile), whose data cannot be read.
// Nor a negative view (x.conj().imag, torch._neg_view: its memory holds -x) or a ZeroTensor (no
// memory at all): the dispatcher's fallbacks for those keys make them plain for the ops, which
// a kernel called straight would bypass (the loss of -x; a null pointer).
inline bool plain_cpu(const Tensor& t) {
  const auto keys = t.key_set();
  return t.is_cpu() && t.layout() == at::kStrided && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::Functionalize) && !t.is_neg() && !t._is_zerotensor();
}

inline bool plain_cpu(const std::optional<Tensor>& t) { return !t || plain_cpu(*t); }

// The target of an input (N, C, d1, ...): class indices (N, d1, ...) (a (C,) input: one
// index, 0-d or (1,)), or probabilities of the input's shape. The one-call ops check it, as
// torch's cross_entropy does ("size mismatch"), since canonical() would flatten a target of
// the right size but another shape into (N, D) without a word.
inline bool target_shape_matches(const Tensor& input, const Tensor& target) {
  const auto s = input.sizes(), t = target.sizes();
  if (prob_target(target)) return s == t;
  if (s.size() == 1) return t.size() <= 1 && target.numel() == 1;
  if (t.size() + 1 != s.size() || t[0] != s[0]) return false;
  for (size_t i = 1; i < t.size(); ++i)
    if (t[i] != s[i + 1]) return false;
  return true;
}

inline void check_target_shape(const char* op, const Tensor& input, const Tensor& target) {
  TORCH_CHECK(target_shape_matches(input, target), op, ": size mismatch (got input: ",
              input.sizes(), ", target: ", target.sizes(), ")");
}

inline bool loop_reduce(const Tensor& loss) { return plain_cpu(loss) && loss.is_contiguous(); }

// Sum of a contiguous float / double CPU tensor, in double. Fixed blocks of kSumBlock elements,
// each summed into kSumLanes running sums (element i into sum i mod kSumLanes: independent adds
// the compiler can put in vectors) added up in order, and the blocks' sums added in order: the
// same bits whatever the thread count.
constexpr int64_t kSumBlock = 1 << 16, kSumLanes = 8;
template <typename T>
inline double block_sum(const T* p, int64_t n) {
  double lane[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int64_t j = 0; j < kSumLanes; ++j) lane[j] += static_cast<double>(p[i + j]);
  for (int64_t j = 0; i < n; ++i, ++j) lane[j] += static_cast<double>(p[i]);
  double s = 0;
  for (double v : lane) s += v;
  return s;
}

inline double cpu_sum(const Tensor& t) {
  const int64_t n = t.numel(), blocks = (n + kSumBlock - 1) / kSumBlock;
  double s = 0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "nllfused_cpu_sum", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    if (blocks <= 1) {
      s = block_sum(p, n);
      return;
    }
    std::vector<double> part(blocks);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        part[b] = block_sum(p + b * kSumBlock, std::min(kSumBlock, n - b * kSumBlock));
    });
    for (double v : part) s += v;
  });
  return s;
}

// A small plain CPU tensor in another dtype by a loop: Tensor::to (its dispatch, a
// TensorIterator) took 0.9 us of an unbatched 10-class bf16 call's 4.7 (its 'none' loss, its
// bf16 class weights), a fifth of torch's whole call. The same rounding as ATen's copy
// (c10's round-to-nearest-even conversions). Plain tensors only (plain_cpu first: a trace's
// symbolic sizes have no numel) and nothing to differentiate.
constexpr int64_t kSmallCast = 4096;
inline bool small_cast_fits(const Tensor& t) {
  return plain_cpu(t) && t.numel() <= kSmallCast && t.is_contiguous() && !t.requires_grad() &&
         !torch::autograd::isFwGradDefined(t);
}
inline Tensor small_cast(const Tensor& t, at::ScalarType dtype) {
  Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  const int64_t n = t.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "small_cast", [&] {
    using src_t = scalar_t;
    const src_t* p = t.const_data_ptr<src_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "small_cast", [&] {
      scalar_t* q = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<scalar_t>(p[i]);
    });
  });
  return out;
}

// t in dtype, t itself where it has that dtype: below autograd, where this file's kernels run, an
// op must not return its own input, which Tensor::to() would (torch.library.opcheck checks it).
inline Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return small_cast_fits(t) ? small_cast(t, dtype) : t.to(dtype);
}

// 'mean' over index targets: the rows' loss sum s over their summed target weights w; NaN where
// w is 0 (every row ignored, or every counted target's weight 0), as torch's, whose smoothing
// part (s / 0 = inf where s > 0) is added to the NLL part's 0 / 0. The tensor form multiplies by
// w / w (exactly 1, or NaN), one op where a where() takes three.
inline double weighted_mean(double s, double w) {
  return w == 0 ? std::numeric_limits<double>::quiet_NaN() : s / w;
}
inline Tensor weighted_mean(const Tensor& s, const Tensor& w) { return s / w * (w / w); }

// torch's reductions of the per-row losses (docs/maths.md, "Reductions"): 'mean' divides by the
// summed target weights of the counted rows (aux), so NaN when every row is ignored, as torch;
// with probability targets (prob) by the number of rows, whatever the weights. Here by tensor
// ops, in the rows' dtype: differentiable (a second-order backward runs it); reduce_rows below
// takes the loop of cpu_sum where it can.
inline Tensor sum_rows(const Tensor& loss, const Tensor& aux, int64_t reduction,
                       at::IntArrayRef shape, bool prob = false) {
  if (reduction == kNone) return loss.view(shape);
  if (reduction == kSum) return loss.sum();
  return prob ? loss.mean() : weighted_mean(loss.sum(), aux.sum());
}

// The shape of the unreduced loss: the index targets', or the input's less the class dimension.
inline std::vector<int64_t> loss_shape(const Tensor& input, const Tensor& target) {
  if (!prob_target(target)) return target.sizes().vec();
  std::vector<int64_t> shape = input.sizes().vec();
  if (shape.size() >= 2) shape.erase(shape.begin() + 1);
  else shape.clear();
  return shape;
}

// (out: the loss's dtype where not loss_dtype's, cross_entropy_loss's dtype argument)
inline Tensor reduce_rows(const Tensor& loss, const Tensor& aux, int64_t reduction,
                          const Tensor& input, const Tensor& target,
                          std::optional<at::ScalarType> out = std::nullopt) {
  const bool prob = prob_target(target);
  const auto dtype = out.value_or(loss_dtype(input, target));
  if (reduction != kNone && loop_reduce(loss)) {
    const double s = cpu_sum(loss);
    const double r = reduction == kSum ? s
                     : prob            ? s / static_cast<double>(loss.numel())
                                       : weighted_mean(s, cpu_sum(aux));
    return at::scalar_tensor(r, input.options().dtype(dtype).requires_grad(false));
  }
  // float32 rows of a float64 loss (float64 probability targets) summed in float64, as the loop
  const Tensor rows = dtype == at::kDouble ? as_dtype(loss, dtype) : loss;
  return as_dtype(sum_rows(rows, aux, reduction, loss_shape(input, target), prob), dtype);
}

// The value of a one-element plain CPU tensor (a reduced output's upstream gradient) in double.
inline double cpu_value(const Tensor& t) {
  double v = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "nllfused_cpu_value",
                                  [&] { v = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

// d loss / d loss_row for each row (N, D), from the upstream gradient of the reduced loss. Ignored
// rows need no zero here: ce_bwd gives them no loss gradient whatever this says (csrc/ops.cpp).
// A reduced loss's upstream gradient (one value) on the CPU is read here and the row gradient
// formed in double, rounded once: no tensor op for a 10-class batch's backward.
// prob: probability targets, whose 'mean' divides by the number of rows.
inline Tensor row_grads(const Tensor& grad, const Tensor& aux, int64_t reduction,
                        bool prob = false) {
  const auto acc = aux.scalar_type();
  if (reduction == kNone) return as_dtype(grad, acc).reshape(aux.sizes());  // (any strides)
  if (loop_reduce(grad) && loop_reduce(aux)) {
    double g = cpu_value(grad);
    if (reduction == kMean) g /= prob ? static_cast<double>(aux.numel()) : cpu_sum(aux);
    return at::scalar_tensor(g, aux.options()).expand(aux.sizes());
  }
  if (reduction == kSum) return as_dtype(grad, acc).expand(aux.sizes());
  if (prob)  // (sym_numel: a traced graph's rows may be symbolic)
    return as_dtype(grad.to(at::kDouble) / c10::Scalar(aux.sym_numel()), acc).expand(aux.sizes());
  return (as_dtype(grad, acc) / aux.sum()).expand(aux.sizes());
}

// One value in every row (N, D), strides 0, held by the caller's RowScalar, which must outlive
// the kernel call that reads it: at::from_blob dispatches and allocates nothing, where
// at::scalar_tensor(...).expand(...) took ~0.5-0.8 us, a sixth of a 10-class batch's backward
// node. acc: float or double (an accumulation dtype).
struct RowScalar {
  double d = 0;
  float f = 0;
};
inline Tensor rows_of_value(double value, at::ScalarType acc, at::IntArrayRef rows,
                            RowScalar& slot) {
  static constexpr int64_t kZeroStrides[8] = {};
  TORCH_INTERNAL_ASSERT((acc == at::kFloat || acc == at::kDouble) && rows.size() <= 8);
  void* p = &slot.d;
  if (acc == at::kDouble) {
    slot.d = value;
  } else {
    slot.f = static_cast<float>(value);
    p = &slot.f;
  }
  return at::from_blob(p, rows, at::IntArrayRef(kZeroStrides, rows.size()),
                       at::TensorOptions().dtype(acc));
}

// row_grads where the forward reduced the rows in its pass (ce_fwd_summed_cpu): aux_sum is
// aux's sum, 0-dim float64; rows the (N, D) of the rows, acc their dtype. On the CPU the rows
// are the slot's value (rows_of_value): the caller keeps the slot alive.
inline Tensor summed_row_grads(const Tensor& grad, const Tensor& aux_sum, int64_t reduction,
                               at::IntArrayRef rows, at::ScalarType acc, RowScalar& slot) {
  if (loop_reduce(grad) && loop_reduce(aux_sum)) {
    double g = cpu_value(grad);
    if (reduction == kMean) g /= *aux_sum.const_data_ptr<double>();
    return rows_of_value(g, acc, rows, slot);
  }
  const Tensor g = reduction == kSum ? grad : grad.to(at::kDouble) / aux_sum;
  return as_dtype(g, acc).expand(rows);
}

// The options beyond torch's cross_entropy (docs/maths.md): the z-loss coefficient, logit_scale
// and softcap (0: none).
struct Extras {
  double z_loss = 0, logit_scale = 1, softcap = 0;
};

inline bool any_extras(const Extras& ex) {
  return ex.z_loss != 0 || ex.logit_scale != 1 || ex.softcap != 0;
}

inline void check_extras(const char* op, const Extras& ex) {
  TORCH_CHECK_VALUE(ex.z_loss >= 0 && std::isfinite(ex.z_loss) && std::isfinite(ex.logit_scale) &&
                        ex.softcap >= 0 && std::isfinite(ex.softcap),
                    op, ": z_loss must be finite and >= 0, logit_scale finite, softcap finite "
                    "and > 0 (0: none); got ", ex.z_loss, ", ", ex.logit_scale, ", ", ex.softcap);
}

// target != ignore_index, compared as integers: at::ne casts the Scalar to the tensor's dtype,
// so uint8 targets would take -100 for 156; an ignore_index that the targets' dtype cannot hold
// ignores no target (nllfused/backends/torch_ref.py, not_ignored).
inline Tensor not_ignored(const Tensor& target, int64_t ignore_index) {
  const auto t = target.scalar_type();
  const bool holds = t == at::kByte ? ignore_index >= 0 && ignore_index <= 255
                     : t == at::kInt ? ignore_index >= INT32_MIN && ignore_index <= INT32_MAX
                                     : true;
  return holds ? target.ne(ignore_index)
               : at::ones_like(target, target.options().dtype(at::kBool));
}

// What the one-call ops compute, in torch ops (their second-order backward differentiates it):
// torch's cross_entropy of z = softcap(logit_scale x), plus z_loss lse^2 on each counted row
// (every row for probability targets), added to the rows and, under 'mean' with index targets,
// averaged over the number of counted rows whatever the class weights.
inline Tensor torch_loss(const Tensor& x, const Tensor& target,
                         const std::optional<Tensor>& weight, int64_t reduction,
                         int64_t ignore_index, double label_smoothing, const Extras& ex) {
  // nllfused's extras in float32 for 16-bit logits, as the kernels apply them (in float16 a
  // softcap past 65504 is inf: an inf gradient; in bfloat16 each step rounds to 8 bits)
  const bool widen = any_extras(ex) && (x.scalar_type() == at::kHalf ||
                                        x.scalar_type() == at::kBFloat16);
  if (widen)
    return torch_loss(x.to(at::kFloat), prob_target(target) ? target.to(at::kFloat) : target,
                      weight, reduction, ignore_index, label_smoothing, ex);
  Tensor z = ex.logit_scale == 1 ? x : x * ex.logit_scale;
  if (ex.softcap != 0) z = at::tanh(z / ex.softcap) * ex.softcap;
  if (ex.z_loss == 0)
    return at::cross_entropy_loss(z, target, weight, reduction, ignore_index, label_smoothing);
  const bool prob = prob_target(target);
  const Tensor lse = at::logsumexp(z, {x.dim() == 1 ? 0 : 1});
  Tensor z_rows = lse * ex.z_loss * lse;
  if (!prob)
    z_rows = at::where(not_ignored(target, ignore_index), z_rows, at::zeros({}, z_rows.options()));
  if (reduction == kMean && !prob)
    return at::cross_entropy_loss(z, target, weight, kMean, ignore_index, label_smoothing) +
           z_rows.sum() / not_ignored(target, ignore_index).sum();
  const Tensor rows =
      at::cross_entropy_loss(z, target, weight, kNone, ignore_index, label_smoothing) + z_rows;
  return reduction == kNone ? rows : reduction == kSum ? rows.sum() : rows.mean();
}

// A one-call op's gradient with create_graph=True (or of vmapped gradients, batched(), where
// create_graph may be false): torch_loss differentiated, differentiable again, over logits
// whose ignored rows are 0: an ignored row's gradient is 0 whatever its logits (csrc/ops.cpp),
// where torch's backward gives NaN for a row of NaN or +inf logits. Index targets as int64:
// torch takes uint8 ones in its plain 2-D loss only (not with smoothing, nor K-dim).
inline Tensor torch_loss_grad(const Tensor& input, const Tensor& target,
                              const std::optional<Tensor>& weight, int64_t reduction,
                              int64_t ignore_index, double label_smoothing, const Extras& ex,
                              const Tensor& grad, bool create_graph = true) {
  const bool prob = prob_target(target);
  const int64_t class_dim = input.dim() > 1 ? 1 : 0;
  Tensor x = prob ? input
                  : at::where(not_ignored(target, ignore_index).unsqueeze(class_dim), input,
                              at::zeros({}, input.options()));
  // 16-bit logits with their weights in the accumulation dtype (as the one-call ops take them):
  // torch's loss in that dtype, as the kernels compute it (torch refuses mixed dtypes)
  if (weight && weight->scalar_type() != x.scalar_type()) x = x.to(weight->scalar_type());
  const Tensor ref = torch_loss(x, prob ? target : target.to(at::kLong), weight, reduction,
                                ignore_index, label_smoothing, ex);
  return torch::autograd::grad({ref}, {input}, {grad.to(ref.scalar_type())},
                               /*retain_graph=*/true, create_graph)[0];
}

// reduce_rows (above) with the z-loss term z_loss lse^2 of each counted row: added to the
// rows for 'none', 'sum' and probability targets' 'mean'; for index targets' 'mean' its sum over
// the number of counted rows beside the loss's over the summed weights (on the CPU both sums in
// double, rounded once). The term's rows are rounded to the loss rows' dtype first, as the
// general path's (nllfused/backends/torch_ref.py, reduce).
inline Tensor reduce_with_z_loss(const Tensor& loss, const Tensor& lse, const Tensor& aux,
                                 int64_t reduction, const Tensor& input, const Tensor& target,
                                 const Tensor& target2, int64_t ignore_index, double z_loss,
                                 std::optional<at::ScalarType> out = std::nullopt) {
  if (z_loss == 0) return reduce_rows(loss, aux, reduction, input, target, out);
  const bool prob = prob_target(target);
  const Tensor counted = prob ? Tensor() : not_ignored(target2, ignore_index);
  const Tensor l = prob ? lse : at::where(counted, lse, at::zeros({}, lse.options()));
  const Tensor z_rows = (l * z_loss * l).to(loss.scalar_type());
  if (reduction != kMean || prob)
    return reduce_rows(loss + z_rows, aux, reduction, input, target, out);
  const auto dtype = out.value_or(loss_dtype(input, target));
  if (loop_reduce(loss) && loop_reduce(aux) && loop_reduce(z_rows)) {
    const double count = static_cast<double>(counted.sum().item<int64_t>());  // (CPU: no sync)
    const double r = weighted_mean(cpu_sum(loss), cpu_sum(aux)) + cpu_sum(z_rows) / count;
    return at::scalar_tensor(r, input.options().dtype(dtype).requires_grad(false));
  }
  return as_dtype(weighted_mean(loss.sum(), aux.sum()) + z_rows.sum() / counted.sum(), dtype);
}

// The z-loss term's gradient in lse, ce_bwd's grad_lse ((N, D) float64): 2 z_loss lse times the
// term's upstream gradient -- per row ('none'), the value ('sum'), the value over the counted
// rows ('mean'; over the rows for probability targets) -- and 0 on the rows that do not count,
// whatever their lse.
inline Tensor z_loss_lse_grad(const Tensor& grad, const Tensor& lse, const Tensor& target2,
                              int64_t ignore_index, int64_t reduction, bool prob,
                              double z_loss) {
  Tensor g = grad.to(at::kDouble);
  if (reduction == kNone) g = g.reshape(lse.sizes());
  const Tensor counted = prob ? Tensor() : not_ignored(target2, ignore_index);
  if (reduction == kMean) g = prob ? g / c10::Scalar(lse.sym_numel()) : g / counted.sum();
  const Tensor d = lse * (2 * z_loss) * g;
  return prob ? d : at::where(counted, d, at::zeros({}, d.options()));
}

// Node ownership is an intrusive_ptr from torch 2.14 on, a shared_ptr before.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
inline NodePtr new_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>)
    return std::make_shared<T>();
  else
    return c10::make_intrusive<T>();
}

}  // namespace one_call_ops
}  // namespace nllfused
