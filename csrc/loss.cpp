// nllfused::cross_entropy_loss: the one-call path for the calls torch's own cross_entropy can
// make (index targets; weight, ignore_index, label smoothing, every reduction; no z-loss,
// logit_scale or softcap). Everything a small call needs happens in C++: the canonical
// (N, C, D) views, the per-row op nllfused::ce_fwd (csrc/ops.cpp, on whichever device the
// tensors are), the reduction with torch's 'mean' denominator, and autograd, so that a 10-class
// batch costs about what torch's call costs instead of a dozen Python-level steps.
//
// nllfused/functional.py takes this path only after its own argument checks have nothing to say
// (exact torch.Tensor arguments, int64 targets of the right shape, weight already (C,) in the
// accumulation dtype, no autocast, no torch.compile or torch.func transform, backend "auto" or
// the device's own, resolving to the C++ kernels); every other call takes the general path.
//
// Gradients: first order through nllfused::ce_bwd. A second order (create_graph=True) is asked
// for rarely, so the backward then differentiates torch's own cross_entropy with the same
// arguments, which is twice differentiable and defines what this op computes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

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

// at::Reduction's numbering, which torch.nn.functional passes to its own kernels.
constexpr int64_t kNone = 0, kMean = 1, kSum = 2;

std::tuple<Tensor, Tensor, Tensor> ce_fwd(const Tensor& logits, const Tensor& target,
                                          const std::optional<Tensor>& weight,
                                          int64_t ignore_index, double label_smoothing) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::ce_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t,
                           double, double, double, bool)>();
  // Straight to the kernel: ce_fwd's autograd (a Python function, nllfused/ops.py) is not
  // wanted here, where this file's own autograd holds the graph; even with grad mode off,
  // passing through it would cost more than the whole call should.
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(logits, target, weight, ignore_index, label_smoothing, 1.0, 0.0, false);
}

Tensor ce_bwd(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
              const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& aux,
              int64_t ignore_index, double label_smoothing) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nllfused::ce_bwd", "")
          .typed<Tensor(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                        const std::optional<Tensor>&, const Tensor&, const Tensor&, int64_t,
                        double, double, double, bool)>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(grad_loss, std::nullopt, logits, target, weight, lse, aux, ignore_index,
                 label_smoothing, 1.0, 0.0, false);
}

// The canonical views of csrc/ops.cpp: logits (N, C, D), targets (N, D); views, never copies,
// for contiguous and channels-last inputs.
std::pair<Tensor, Tensor> canonical(const Tensor& input, const Tensor& target) {
  if (input.dim() == 1) return {input.view({1, input.size(0), 1}), target.reshape({1, 1})};
  if (input.dim() == 2) return {input.unsqueeze(-1), target.unsqueeze(-1)};
  if (input.dim() == 3) return {input, target};  // flatten would hand back its input: no op
  return {input.flatten(2), target.flatten(1)};
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "nllfused::cross_entropy_loss: reduction must be 0 (none), 1 (mean) or 2 "
                    "(sum); got ", reduction);
}

// Below this many rows the CPU reductions are plain loops here (sums in double, rounded once):
// on a 10-class batch the three tensor ops of loss.sum() / aux.sum() cost as much as the kernel.
// Above it at::sum's threads pay.
constexpr int64_t kLoopRows = 1 << 16;

// Plain CPU tensors only: not the fake or functional ones of a trace (opcheck, torch.compile),
// whose data cannot be read.
bool loop_reduce(const Tensor& loss) {
  const auto keys = loss.key_set();
  return loss.is_cpu() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::Functionalize) && loss.numel() <= kLoopRows &&
         loss.is_contiguous();
}

// sum of a contiguous float / double CPU tensor, in double
double cpu_sum(const Tensor& t) {
  double s = 0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "nllfused_cpu_sum", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = t.numel(); i < n; ++i) s += static_cast<double>(p[i]);
  });
  return s;
}

// torch's reductions of the per-row losses (docs/maths.md, "Reductions"): 'mean' divides by the
// summed target weights of the counted rows (aux), so NaN when every row is ignored, as torch.
// t in dtype, t itself where it has that dtype: below autograd, where this file's kernels run, an
// op must not return its own input, which Tensor::to() would (torch.library.opcheck checks it).
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

Tensor reduce_rows(const Tensor& loss, const Tensor& aux, int64_t reduction,
                   const Tensor& input, const Tensor& target) {
  if (reduction == kNone) return as_dtype(loss.view(target.sizes()), input.scalar_type());
  if (loop_reduce(loss)) {
    const double s = cpu_sum(loss), r = reduction == kSum ? s : s / cpu_sum(aux);
    return at::scalar_tensor(r, input.options().requires_grad(false));
  }
  Tensor out = reduction == kSum ? loss.sum() : loss.sum() / aux.sum();
  return as_dtype(out, input.scalar_type());
}

// d loss / d loss_row for each row (N, D), from the upstream gradient of the reduced loss. Ignored
// rows need no zero here: ce_bwd gives them no loss gradient whatever this says (csrc/ops.cpp).
// A reduced loss's upstream gradient (one value) on the CPU is read here and the row gradient
// formed in double, rounded once: no tensor op for a 10-class batch's backward.
Tensor row_grads(const Tensor& grad, const Tensor& aux, int64_t reduction) {
  const auto acc = aux.scalar_type();
  if (reduction == kNone) return as_dtype(grad, acc).view(aux.sizes());
  if (loop_reduce(grad) && loop_reduce(aux)) {
    double g = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(),
                                    "nllfused_row_grads", [&] {
                                      g = static_cast<double>(*grad.const_data_ptr<scalar_t>());
                                    });
    if (reduction == kMean) g /= cpu_sum(aux);
    return at::scalar_tensor(g, aux.options()).expand(aux.sizes());
  }
  if (reduction == kSum) return as_dtype(grad, acc).expand(aux.sizes());
  return (as_dtype(grad, acc) / aux.sum()).expand(aux.sizes());
}

// Node ownership is an intrusive_ptr from torch 2.14 on, a shared_ptr before.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
NodePtr new_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>)
    return std::make_shared<T>();
  else
    return c10::make_intrusive<T>();
}

// The graph node of one cross_entropy_loss call, written as torch's own generated nodes are
// (saved variables and options as members): torch::autograd::Function's generic node, with its
// context map, argument bookkeeping and output checks, cost more than the whole 10-class
// kernel in both directions.
struct CrossEntropyLossBackward final : Node {
  SavedVariable input_, target_, lse_, aux_, weight_;
  int64_t reduction = kMean, ignore_index = -100;
  double label_smoothing = 0;
  std::mutex mutex;  // release_variables may run beside another thread's apply

  std::string name() const override { return "nllfused::CrossEntropyLossBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex);
    for (SavedVariable* v : {&input_, &target_, &lse_, &aux_, &weight_}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);
    variable_list out(1);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !task_should_compute_output(0)) return out;
    const Tensor input = input_.unpack(), target = target_.unpack(), lse = lse_.unpack(),
                 aux = aux_.unpack(), w = weight_.unpack();
    const std::optional<Tensor> weight = w.defined() ? std::optional<Tensor>(w) : std::nullopt;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: torch's own formula, differentiable again.
      Tensor ref = at::cross_entropy_loss(input, target, weight, reduction, ignore_index,
                                          label_smoothing);
      out[0] = torch::autograd::grad({ref}, {input}, {grad}, /*retain_graph=*/true,
                                     /*create_graph=*/true)[0];
      return out;
    }
    auto [logits, target2] = canonical(input, target);
    Tensor g = ce_bwd(row_grads(grad, aux, reduction), logits, target2, weight, lse, aux,
                      ignore_index, label_smoothing);
    out[0] = g.view(input.sizes());
    return out;
  }

  // Compiled autograd: the options specialise the graph, the saved tensors are its inputs.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input_, &target_, &lse_, &aux_, &weight_})
      args.collect(*v, false);
    args.collect(reduction);
    args.collect(ignore_index);
    args.collect(label_smoothing);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    for (SavedVariable* v : {&input_, &target_, &lse_, &aux_, &weight_}) saved.before(*v);
    variable_list out = apply(variable_list(grads));
    for (SavedVariable* v : {&input_, &target_, &lse_, &aux_, &weight_}) saved.after(*v);
    return out;
  }
};

// The loss and the per-row lse and aux the backward needs.
std::tuple<Tensor, Tensor, Tensor> forward_parts(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight,
                                                 int64_t reduction, int64_t ignore_index,
                                                 double label_smoothing) {
  check_reduction(reduction);
  auto [logits, target2] = canonical(input, target);
  auto [loss, lse, aux] = ce_fwd(logits, target2, weight, ignore_index, label_smoothing);
  return {reduce_rows(loss, aux, reduction, input, target), lse, aux};
}

Tensor cross_entropy_loss_autograd(const Tensor& input, const Tensor& target,
                                   const std::optional<Tensor>& weight, int64_t reduction,
                                   int64_t ignore_index, double label_smoothing) {
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(input),
                              "nllfused::cross_entropy_loss: forward-mode AD is not supported "
                              "(nllfused.cross_entropy takes the general path under it)");
  // Nothing to differentiate (no_grad, evaluation): no graph node, nothing saved.
  const bool differentiable = torch::autograd::compute_requires_grad(input);
  Tensor out, lse, aux;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, lse, aux) =
        forward_parts(input, target, weight, reduction, ignore_index, label_smoothing);
  }
  if (!differentiable) return out;
  NodePtr node = new_node<CrossEntropyLossBackward>();
  auto* n = static_cast<CrossEntropyLossBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(input));
  n->input_ = SavedVariable(input, false);
  n->target_ = SavedVariable(target, false);
  n->lse_ = SavedVariable(lse, false);
  n->aux_ = SavedVariable(aux, false);
  n->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  n->reduction = reduction;
  n->ignore_index = ignore_index;
  n->label_smoothing = label_smoothing;
  torch::autograd::set_history(out, node);
  return out;
}

// Below autograd (no_grad inside compiled graphs, inference mode): the forward alone.
Tensor cross_entropy_loss_forward(const Tensor& input, const Tensor& target,
                                  const std::optional<Tensor>& weight, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing) {
  return std::get<0>(
      forward_parts(input, target, weight, reduction, ignore_index, label_smoothing));
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
