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
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace nllfused {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
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
Tensor reduce_rows(const Tensor& loss, const Tensor& aux, int64_t reduction,
                   const Tensor& input, const Tensor& target) {
  if (reduction == kNone) return loss.view(target.sizes()).to(input.scalar_type());
  if (loop_reduce(loss)) {
    const double s = cpu_sum(loss), r = reduction == kSum ? s : s / cpu_sum(aux);
    return at::scalar_tensor(r, input.options().requires_grad(false));
  }
  Tensor out = reduction == kSum ? loss.sum() : loss.sum() / aux.sum();
  return out.to(input.scalar_type());
}

// d loss / d loss_row for each row (N, D), from the upstream gradient of the reduced loss. Ignored
// rows need no zero here: ce_bwd gives them no loss gradient whatever this says (csrc/ops.cpp).
Tensor row_grads(const Tensor& grad, const Tensor& aux, int64_t reduction) {
  const auto acc = aux.scalar_type();
  if (reduction == kNone) return grad.to(acc).view(aux.sizes());
  if (reduction == kSum) return grad.to(acc).expand(aux.sizes());
  if (loop_reduce(aux)) return (grad.to(acc) / cpu_sum(aux)).expand(aux.sizes());
  return (grad.to(acc) / aux.sum()).expand(aux.sizes());
}

class CrossEntropy : public torch::autograd::Function<CrossEntropy> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target,
                        const std::optional<Tensor>& weight, int64_t reduction,
                        int64_t ignore_index, double label_smoothing) {
    check_reduction(reduction);
    auto [logits, target2] = canonical(input, target);
    auto [loss, lse, aux] = ce_fwd(logits, target2, weight, ignore_index, label_smoothing);
    ctx->save_for_backward({input, target, lse, aux, weight.value_or(Tensor())});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return reduce_rows(loss, aux, reduction, input, target);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &target = saved[1], &lse = saved[2], &aux = saved[3];
    const std::optional<Tensor> weight =
        saved[4].defined() ? std::optional<Tensor>(saved[4]) : std::nullopt;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    variable_list out(6);
    const Tensor& grad = grads[0];
    if (!grad.defined() || !ctx->needs_input_grad(0)) return out;
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
};

Tensor cross_entropy_loss_forward(const Tensor& input, const Tensor& target,
                                  const std::optional<Tensor>& weight, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing);

Tensor cross_entropy_loss_autograd(const Tensor& input, const Tensor& target,
                                   const std::optional<Tensor>& weight, int64_t reduction,
                                   int64_t ignore_index, double label_smoothing) {
  // Nothing to differentiate (no_grad, evaluation): no graph node, saved tensors or context.
  if (!at::GradMode::is_enabled() || !input.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return cross_entropy_loss_forward(input, target, weight, reduction, ignore_index,
                                      label_smoothing);
  }
  return CrossEntropy::apply(input, target, weight, reduction, ignore_index, label_smoothing);
}

// Below autograd (no_grad inside compiled graphs, inference mode): the forward alone.
Tensor cross_entropy_loss_forward(const Tensor& input, const Tensor& target,
                                  const std::optional<Tensor>& weight, int64_t reduction,
                                  int64_t ignore_index, double label_smoothing) {
  check_reduction(reduction);
  auto [logits, target2] = canonical(input, target);
  auto [loss, lse, aux] = ce_fwd(logits, target2, weight, ignore_index, label_smoothing);
  return reduce_rows(loss, aux, reduction, input, target);
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
