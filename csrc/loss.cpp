// nllfused::cross_entropy_loss: the one-call path for the calls torch's own cross_entropy can
// make (index or probability targets; weight, ignore_index, label smoothing, every reduction) and
// nllfused's z-loss, logit_scale and softcap. Everything a small call needs happens in C++: the
// canonical (N, C, D) views, the per-row op nllfused::ce_fwd (csrc/ops.cpp, on whichever device
// the tensors are), the reduction with torch's 'mean' denominator (the z-loss term's: the counted
// rows, docs/maths.md), and autograd, so that a 10-class batch costs about what torch's call
// costs instead of a dozen Python-level steps.
//
// nllfused/functional.py takes this path only after its own argument checks have nothing to say
// (exact torch.Tensor arguments, int64 targets of the right shape or probability targets of the
// input's shape that need no gradient, weight already (C,) in the accumulation dtype, no
// autocast, no torch.compile or torch.func transform, backend "auto" or the device's own,
// resolving to the C++ kernels); every other call takes the general path.
//
// Gradients: first order through nllfused::ce_bwd (the z-loss term's through its grad_lse). A
// second order (create_graph=True) is asked for rarely, so the backward then differentiates
// torch's own cross_entropy with the same arguments (and the extras written in torch ops), which
// is twice differentiable and defines what this op computes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include "checks.h"
#include "compiled_node.h"
#include "loss.h"

#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

namespace nllfused {
namespace {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using namespace one_call_ops;

// The graph node of one cross_entropy_loss call, written as torch's own generated nodes are
// (saved variables and options as members): torch::autograd::Function's generic node, with its
// context map, argument bookkeeping and output checks, cost more than the whole 10-class
// kernel in both directions.
struct CrossEntropyLossBackward final : Node {
  SavedVariable input_, target_, lse_, aux_, weight_;
  int64_t reduction = kMean, ignore_index = -100;
  double label_smoothing = 0;
  Extras extras;
  bool summed = false;  // aux_ is aux's sum (forward_parts)
  bool major = false;   // the input was class-major (canonical)
  std::mutex mutex;  // release_variables may run beside another thread's apply

  std::string name() const override { return "nllfused::CrossEntropyLossBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex);
    for (SavedVariable* v : {&input_, &target_, &lse_, &aux_, &weight_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);
    return backward(grads, task_should_compute_output(0));
  }

  // Every saved variable and option, in one order (csrc/compiled_node.h)
  static constexpr const char* kFunctionalName = "nllfused_CrossEntropyLossBackward";
  template <class Self, class F>
  static void each_saved(Self& n, F f) {  // Self: this node type, const or not
    for (auto* v : {&n.input_, &n.target_, &n.lse_, &n.aux_, &n.weight_}) f(*v);
  }
  template <class Self, class F>
  static void each_option(Self& n, F f) {
    f(n.reduction), f(n.ignore_index), f(n.label_smoothing), f(n.extras.z_loss);
    f(n.extras.logit_scale), f(n.extras.softcap), f(n.summed), f(n.major);
  }

  variable_list backward(const variable_list& grads, bool needed) {
    variable_list out(1);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !needed) return out;
    const Tensor saved = input_.unpack(), target = target_.unpack(), lse = lse_.unpack(),
                 aux = aux_.unpack(), w = weight_.unpack();
    const std::optional<Tensor> weight = w.defined() ? std::optional<Tensor>(w) : std::nullopt;
    const bool create_graph = at::GradMode::is_enabled();
    if (create_graph || batched(grad)) {
      // torch's own formula (csrc/loss.h), differentiable again, in the saved logits as they
      // are (any layout: a relaid copy made here, grad mode off, would be no graph's input)
      at::AutoGradMode grad_mode(true);
      out[0] = torch_loss_grad(saved, target, weight, reduction, ignore_index, label_smoothing,
                               extras, grad, create_graph);
      return out;
    }
    // Below ADInplaceOrView: the views made here (canonical, the gradient's) are plain ones for
    // the kernels; above it, the saved input's (it requires grad) and the gradient's each built
    // a differentiable view's metadata, ~0.1-0.2 us apiece on a 10-class batch. The backward
    // runs without grad mode here and writes into no tensor autograd knows of.
    at::AutoDispatchBelowADInplaceOrView below_views;
    const Tensor input = as_forward_layout(saved, major);
    auto [logits, target2] = canonical(input, target);
    const bool prob = prob_target(target);
    // Summed (index targets only): no aux rows exist; the kernels read aux for probability
    // targets only, so the row gradients (of aux's shape and dtype) stand in for them.
    RowScalar slot;  // (the rows' value on the CPU, read by ce_bwd below)
    const Tensor rows = summed ? summed_row_grads(grad, aux, reduction, lse.sizes(),
                                                  acc_dtype(input.scalar_type()), slot)
                               : row_grads(grad, aux, reduction, prob);
    std::optional<Tensor> grad_lse;
    if (extras.z_loss != 0)
      grad_lse = z_loss_lse_grad(grad, lse, target2, ignore_index, reduction, prob, extras.z_loss);
    Tensor g = ce_bwd(rows, logits, target2, weight, lse, summed ? rows : aux, ignore_index,
                      label_smoothing, prob, grad_lse, extras.logit_scale, extras.softcap);
    out[0] = grad_as_input(g, input);
    return out;
  }

  // Compiled autograd: a call of backward in the captured graph (csrc/compiled_node.h).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    compiled_node::collect(*this, args);
  }
  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return compiled_node::capture(*this, grads, saved);
  }
};

// The loss and what the backward needs: the per-row lse, and the per-row aux or, summed, its
// sum (0-dim float64; only for_backward: a call without a graph node has no use for it).
struct Parts {
  Tensor out, lse, aux;
  bool summed = false;
};

Parts forward_parts(const Tensor& input, const Tensor& target,
                    const std::optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                    double label_smoothing, const Extras& ex,
                    std::optional<at::ScalarType> dtype, bool for_backward) {
  check_reduction("nllfused::cross_entropy_loss", reduction);
  check_extras("nllfused::cross_entropy_loss", ex);
  check_target_shape("nllfused::cross_entropy_loss", input, target);
  auto [logits, target2] = canonical(input, target);
  const bool prob = prob_target(target);
  const double a = ex.logit_scale, s = ex.softcap;
  if (prob) {
    TORCH_CHECK_VALUE(ignore_index < 0, "nllfused::cross_entropy_loss: ignore_index is not "
                      "supported for floating point target (probability targets)");
    auto [loss, lse, aux] =
        ce_fwd(logits, target2, weight, ignore_index, label_smoothing, true, a, s);
    return {reduce_with_z_loss(loss, lse, aux, reduction, input, target, target2, ignore_index,
                               ex.z_loss, dtype),
            lse, aux};
  }
  if (reduction != kNone && ex.z_loss == 0 && plain_cpu(logits) && plain_cpu(target2) &&
      plain_cpu(weight)) {
    // The CPU kernel adds the rows up in its own pass where it can: on a segmentation map of
    // few classes the loss and aux rows, written and read back twice, were a third of the
    // bytes of the forward and backward (csrc/cpu/kernels.h, Args::sums).
    // lean: a 16-bit loss, the lse kept for the backward alone (csrc/cpu/kernels.h, Args::lean)
    const bool lean = c10::elementSize(dtype.value_or(input.scalar_type())) == 2;
    auto f = nllfused_cpu::ce_fwd_summed_cpu(logits, target2, weight, ignore_index,
                                             label_smoothing, a, s, lean);
    if (f.summed) {
      const double r = reduction == kSum ? f.loss_sum : weighted_mean(f.loss_sum, f.aux_sum);
      const auto out = input.options().dtype(dtype.value_or(input.scalar_type()));
      return {at::scalar_tensor(r, out.requires_grad(false)), f.lse,
              for_backward ? at::scalar_tensor(f.aux_sum, input.options().dtype(at::kDouble))
                           : Tensor(),
              true};
    }
    return {reduce_rows(f.loss, f.aux, reduction, input, target, dtype), f.lse, f.aux};
  }
  auto [loss, lse, aux] = ce_fwd(logits, target2, weight, ignore_index, label_smoothing, false,
                                 a, s);
  return {reduce_with_z_loss(loss, lse, aux, reduction, input, target, target2, ignore_index,
                             ex.z_loss, dtype),
          lse, aux};
}

Tensor cross_entropy_loss_autograd(const Tensor& input, const Tensor& target,
                                   const std::optional<Tensor>& weight, int64_t reduction,
                                   int64_t ignore_index, double label_smoothing, double z_loss,
                                   double logit_scale, double softcap,
                                   std::optional<at::ScalarType> dtype) {
  const Extras ex{z_loss, logit_scale, softcap};
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(input),
                              "nllfused::cross_entropy_loss: forward-mode AD is not supported "
                              "(nllfused.cross_entropy takes the general path under it)");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !torch::autograd::compute_requires_grad(target) &&
          !torch::autograd::isFwGradDefined(target),
      "nllfused::cross_entropy_loss: probability targets that require grad are not supported "
      "(nllfused.cross_entropy takes the general path for them)");
  TORCH_CHECK(!weight || !torch::autograd::compute_requires_grad(*weight),
              "nllfused::cross_entropy_loss: weight requires grad, but the op gives the class "
              "weights no gradient; pass weight.detach()");
  // Nothing to differentiate (no_grad, evaluation): no graph node, nothing saved.
  const bool differentiable = torch::autograd::compute_requires_grad(input);
  Parts p;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    p = forward_parts(input, target, weight, reduction, ignore_index, label_smoothing, ex, dtype,
                      differentiable);
  }
  if (!differentiable) return p.out;
  Tensor& out = p.out;
  NodePtr node = new_node<CrossEntropyLossBackward>();
  auto* n = static_cast<CrossEntropyLossBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(input));
  n->input_ = SavedVariable(input, false);
  n->target_ = SavedVariable(target, false);
  n->lse_ = SavedVariable(p.lse, false);
  n->aux_ = SavedVariable(p.aux, false);
  n->summed = p.summed;
  n->major = class_major(input);
  n->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  n->reduction = reduction;
  n->ignore_index = ignore_index;
  n->label_smoothing = label_smoothing;
  n->extras = ex;
  torch::autograd::set_history(out, node);
  return out;
}

// Below autograd (no_grad inside compiled graphs, inference mode): the forward alone.
Tensor cross_entropy_loss_forward(const Tensor& input, const Tensor& target,
                                  const std::optional<Tensor>& weight, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing, double z_loss,
                                  double logit_scale, double softcap,
                                  std::optional<at::ScalarType> dtype) {
  return forward_parts(input, target, weight, reduction, ignore_index, label_smoothing,
                       Extras{z_loss, logit_scale, softcap}, dtype, false)
      .out;
}

}  // namespace
}  // namespace nllfused

TORCH_LIBRARY_IMPL(nllfused, Autograd, m) {
  m.impl("cross_entropy_loss", &nllfused::cross_entropy_loss_autograd);
}

TORCH_LIBRARY_IMPL(nllfused, CPU, m) {
  m.impl("cross_entropy_loss", &nllfused::cross_entropy_loss_forward);
}

TORCH_LIBRARY_IMPL(nllfused, CUDA, m) {
  m.impl("cross_entropy_loss", &nllfused::cross_entropy_loss_forward);
}
