// nllfused::cross_entropy_loss_stats: nllfused::cross_entropy_loss (csrc/loss.cpp) with the
// statistics of nllfused/stats.py, for the CPU calls that path serves (csrc/one_call.cpp) when
// return_stats asks for statistics (or return_lse / return_z_loss, their per-row lse and z-loss
// term). One dispatcher call: the per-row op nllfused::ce_fwd_stats
// (the statistics from the forward's own pass), the reductions, and autograd in C++ -- the
// general path's Python (argument canonicalisation, the op's Python autograd wrapper, a dozen
// small torch ops for the reductions) cost ~5 % of a bf16 (4096, 32000) forward.
//
// Outputs, in nllfused.stats.NAMES order after the loss: (loss, lse, z_loss, predicted, correct,
// entropy, target_logprob), each reduced as stats.reduce does (the module docstring of
// nllfused/stats.py says how); a statistic whose bit is not in `want` is an empty (0,) tensor.
// 'sum' / 'mean' of plain CPU tensors: the sums in double, rounded once (assemble_summed), as the
// loss's -- the CPU kernel's own in its pass on its lanes path (up to lane_max_classes classes),
// add_up_rows's over the rows it wrote elsewhere; traced calls (fake or functional tensors):
// torch's sums in the statistic's dtype, as stats.reduce's (assemble).
// z_loss is the term z_loss * lse^2 (0 on counted rows whose lse is finite, NaN where it is not,
// for z_loss = 0), as the general path computes it. nllfused's extras (z_loss, logit_scale,
// softcap) are taken with lse and z_loss only (return_lse / return_z_loss: Liger-Kernel's
// lse_square_scale with return_z_loss): the plain ce_fwd and the loss as csrc/loss.cpp reduces
// it, so the loss is the plain call's bits; the statistics of the kernels' pass with extras take
// the general path.
//
// Gradients: the loss, entropy and target_logprob, through nllfused::ce_bwd_stats. A second order
// (create_graph=True) recomputes the per-row statistics through ce_fwd_stats's own autograd
// (nllfused/ops.py, whose backward under grad mode differentiates the torch formulas) and
// reduces them with differentiable torch ops.
#include <ATen/ATen.h>
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

#include <array>
#include <mutex>
#include <optional>
#include <tuple>

namespace nllfused {
namespace {

using namespace one_call_ops;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr const char* kOp = "nllfused::cross_entropy_loss_stats";

// Bits of `want`, one per statistic in nllfused.stats.NAMES order, and kLseRows: the lse output
// per row (the targets' shape, the acc dtype) whatever the reduction, in place of kLse's reduced
// one -- return_lse's (quack's name; nllfused/stats.py, LSE_ROWS).
enum StatBit : int64_t {
  kLse = 1, kZLoss = 2, kPredicted = 4, kCorrect = 8, kEntropy = 16, kTargetLogp = 32,
  kLseRows = 64
};
// The statistics only the kernels' pass gives; lse and z_loss alone take the plain ce_fwd.
constexpr int64_t kKernelStats = kPredicted | kCorrect | kEntropy | kTargetLogp;

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ce_fwd_stats's outputs: loss, lse (float64), aux, entropy, target_logp, predicted; per row.
using Rows = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// ce_fwd_stats below autograd (this file's node holds the graph), or with ce_fwd_stats's own
// autograd where a second-order backward differentiates it.
// Only the work `want` needs: the entropy's sum, the argmax's scan (predicted, correct).
Rows ce_fwd_stats(const Tensor& logits, const Tensor& target,
                  const std::optional<Tensor>& weight, int64_t ignore_index,
                  double label_smoothing, int64_t want, bool with_autograd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::ce_fwd_stats", "")
                       .typed<Rows(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                   int64_t, double, double, double, bool, bool, bool)>();
  const bool ent = want & kEntropy, pred = want & (kPredicted | kCorrect);
  if (with_autograd)
    return op.call(logits, target, weight, ignore_index, label_smoothing, 1.0, 0.0, false, ent,
                   pred);
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(logits, target, weight, ignore_index, label_smoothing, 1.0, 0.0, false, ent,
                 pred);
}

Tensor ce_bwd_stats(const Tensor& grad_loss, const std::optional<Tensor>& grad_entropy,
                    const std::optional<Tensor>& grad_target_logp, const Tensor& logits,
                    const Tensor& target, const std::optional<Tensor>& weight, const Tensor& lse,
                    const Tensor& aux, const Tensor& entropy, int64_t ignore_index,
                    double label_smoothing) {
  if (plain_cpu(logits) && plain_cpu(grad_loss) && plain_cpu(target) && plain_cpu(weight) &&
      plain_cpu(grad_entropy) && plain_cpu(grad_target_logp))  // as ce_bwd (loss.h)
    return nllfused_cpu::ce_bwd_stats_like_logits_cpu(grad_loss, grad_entropy, grad_target_logp,
                                                      logits, target, weight, lse, aux, entropy,
                                                      ignore_index, label_smoothing);
  using Opt = const std::optional<Tensor>&;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nllfused::ce_bwd_stats", "")
                       .typed<Tensor(const Tensor&, Opt, Opt, Opt, const Tensor&, const Tensor&,
                                     Opt, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                     double, double, double, bool)>();
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(grad_loss, std::nullopt, grad_entropy, grad_target_logp, logits, target, weight,
                 lse, aux, entropy, ignore_index, label_smoothing, 1.0, 0.0, false);
}

// A per-row statistic (N, D) reduced as stats.reduce does: 'none' per row in the targets' shape
// (ignored rows 0 where `masked`), 'sum' / 'mean' over the counted rows (mean: / their count).
// Never v itself or a view of it: the backward saves the entropy and lse rows, and an output
// changed in place would change them unseen (made below ADInplaceOrView, a view would not share
// their version counter).
Tensor reduce_stat(const Tensor& v, const Tensor& counted, const Tensor& count,
                   int64_t reduction, bool masked, at::IntArrayRef shape) {
  const Tensor m = masked || reduction != kNone
                       ? at::where(counted, v, at::zeros({}, v.options()))
                       : v.clone();
  if (reduction == kNone) return m.reshape(shape);
  return reduction == kSum ? m.sum() : m.sum() / count;
}

// The op's outputs from ce_fwd_stats's per-row ones (the loss as csrc/loss.cpp reduces it).
Outputs assemble(const Rows& rows, const Tensor& input, const Tensor& target2,
                 const Tensor& target, int64_t reduction, int64_t ignore_index, int64_t want,
                 double z_loss) {
  const auto& [loss_rows, lse, aux, entropy, tlp, predicted] = rows;
  const auto acc = aux.scalar_type();
  const auto shape = target.sizes();
  const Tensor loss = reduce_with_z_loss(loss_rows, lse, aux, reduction, input, target, target2,
                                         ignore_index, z_loss);
  const Tensor counted = not_ignored(target2, ignore_index);
  const Tensor count = reduction == kMean ? counted.sum() : Tensor();
  std::array<Tensor, 6> s;
  if (want & (kLse | kZLoss | kLseRows)) {
    // (a copy for the lse rows, which are an output of their own: never lse itself)
    const Tensor lse_acc = lse.to(acc, false, /*copy=*/(want & kLseRows) != 0);
    if (want & kLse) s[0] = reduce_stat(lse_acc, counted, count, reduction, false, shape);
    if (want & kLseRows) s[0] = lse_acc.reshape(shape);
    if (want & kZLoss) s[1] = reduce_stat((z_loss * lse * lse).to(acc), counted, count,
                                          reduction, true, shape);
  }
  if (want & kPredicted) s[2] = predicted.reshape(shape);
  if (want & kCorrect) {
    const Tensor hit = counted & (predicted == target2);
    s[3] = reduction == kNone ? hit.reshape(shape)
           : reduction == kSum ? hit.sum()
                               : hit.sum(at::kFloat) / count;
  }
  if (want & kEntropy) s[4] = reduce_stat(entropy, counted, count, reduction, false, shape);
  if (want & kTargetLogp) s[5] = reduce_stat(tlp, counted, count, reduction, true, shape);
  for (Tensor& t : s)  // each its own empty tensor where not asked for: outputs never alias
    if (!t.defined()) t = at::empty({0}, aux.options());
  return {loss, s[0], s[1], s[2], s[3], s[4], s[5]};
}

// The op's outputs where the rows were added up on the CPU (ce_fwd_stats_summed_cpu in the
// kernel's pass, or add_up_rows; reduction 'sum' or 'mean'): each sum in double, divided by the
// counted rows for 'mean', rounded once -- as the loss (csrc/loss.cpp) -- where stats.reduce
// sums in the statistic's dtype. A segmentation map's millions of per-row statistics are then
// neither written nor read back by a dozen reductions, which cost 1.5x the kernel at
// (8, 4, 512, 512).
Outputs assemble_summed(const nllfused_cpu::SummedStatsForward& f, const Tensor& input,
                        const Tensor& target, int64_t reduction, int64_t want) {
  const auto acc = acc_dtype(input.scalar_type());
  const auto opt = input.options().requires_grad(false);
  auto reduced = [&](double sum) {
    return at::scalar_tensor(reduction == kSum ? sum : sum / f.counted, opt.dtype(acc));
  };
  std::array<Tensor, 6> s;
  if (want & kLse) s[0] = reduced(f.lse_sum);
  if (want & kLseRows) s[0] = f.lse.to(acc, false, /*copy=*/true).reshape(target.sizes());
  if (want & kZLoss) s[1] = reduced(f.z_loss_sum);
  if (want & kPredicted) s[2] = f.predicted.view(target.sizes());
  if (want & kCorrect) {
    s[3] = reduction == kSum
               ? at::scalar_tensor(static_cast<int64_t>(f.hits), opt.dtype(at::kLong))
               : at::scalar_tensor(f.hits / f.counted, opt.dtype(at::kFloat));
  }
  if (want & kEntropy) s[4] = reduced(f.entropy_sum);
  if (want & kTargetLogp) s[5] = reduced(f.target_logp_sum);
  for (Tensor& t : s)  // each its own empty tensor where not asked for: outputs never alias
    if (!t.defined()) t = at::empty({0}, opt.dtype(acc));
  const double loss = reduction == kSum ? f.loss_sum : weighted_mean(f.loss_sum, f.aux_sum);
  return {at::scalar_tensor(loss, opt), s[0], s[1], s[2], s[3], s[4], s[5]};
}

// The sums assemble_summed takes, from the rows where the kernel wrote them (more classes than
// its lanes path adds up in the pass): the loss and aux as reduce_rows sums them (csrc/loss.h,
// the plain one-call op's bits), the statistics over the counted rows in one loop in double, in
// row order (the same bits on any thread count), each row's value as the unreduced output has
// it (lse rounded to the acc dtype). Where assemble's dozen torch ops over the rows cost ~2 % of
// a bf16 (4096, 32000) forward and the backward's masks as much again.
void add_up_rows(nllfused_cpu::SummedStatsForward& f, const Tensor& target2,
                 int64_t ignore_index) {
  f.loss_sum = cpu_sum(f.loss);
  f.aux_sum = cpu_sum(f.aux);
  const int64_t N = target2.size(0), D = target2.size(1);
  const int64_t tN = target2.stride(0), tD = target2.stride(1);
  const double* lse = f.lse.const_data_ptr<double>();
  const int64_t* pred = f.predicted.const_data_ptr<int64_t>();
  double lse_sum = 0, z_sum = 0, ent_sum = 0, tlp_sum = 0, hits = 0, counted = 0;
  AT_DISPATCH_FLOATING_TYPES(f.entropy.scalar_type(), "nllfused_add_up_rows", [&] {
    const scalar_t* ent = f.entropy.const_data_ptr<scalar_t>();
    const scalar_t* tlp = f.target_logp.const_data_ptr<scalar_t>();
    auto add = [&](const auto* t) {  // the targets' dtype: int64, int32 or uint8 (checks.h)
      for (int64_t n = 0, r = 0; n < N; ++n) {
        for (int64_t d = 0; d < D; ++d, ++r) {
          const int64_t y = static_cast<int64_t>(t[n * tN + d * tD]);
          if (y == ignore_index) continue;
          const double l = static_cast<scalar_t>(lse[r]);
          lse_sum += l;
          z_sum += l - l;  // 0 where lse is finite, NaN where not: 0 * lse^2, as the rows'
          ent_sum += ent[r];
          tlp_sum += tlp[r];
          hits += pred[r] == y;
          counted += 1;
        }
      }
    };
    const auto tt = target2.scalar_type();
    if (tt == at::kLong) add(target2.const_data_ptr<int64_t>());
    else if (tt == at::kInt) add(target2.const_data_ptr<int32_t>());
    else add(target2.const_data_ptr<uint8_t>());
  });
  f.lse_sum = lse_sum; f.z_loss_sum = z_sum; f.entropy_sum = ent_sum;
  f.target_logp_sum = tlp_sum; f.hits = hits; f.counted = counted;
  f.summed = true;
}

// Gradients (targets' shape, or (N, D)) of a per-row statistic from the upstream gradient of its
// reduced value: reduce_stat's chain rule.
Tensor stat_row_grads(const Tensor& grad, const Tensor& counted, int64_t reduction, bool masked,
                      at::ScalarType acc) {
  Tensor g = grad.to(acc);
  if (reduction == kMean) g = g / counted.sum();
  if (reduction != kNone) g = g.expand(counted.sizes());
  else g = g.reshape(counted.sizes());
  return masked || reduction != kNone ? at::where(counted, g, at::zeros({}, g.options())) : g;
}

// The graph node of one call (as CrossEntropyLossBackward in csrc/loss.cpp): three
// differentiable outputs, the loss, entropy and target_logprob (empty when not asked for).
struct CrossEntropyLossStatsBackward final : Node {
  SavedVariable input_, target_, lse_, aux_, entropy_, weight_;
  int64_t reduction = kMean, ignore_index = -100, want = 0;
  double label_smoothing = 0;
  Extras extras;  // with lse / z_loss only (no kernel statistics, never summed)
  bool summed = false;  // aux_ is aux's sum, `counted` the counted rows (forward_parts)
  double counted = -1;  // (-1: not known -- compiled autograd's call passes no count)
  bool major = false;  // the input was class-major (canonical)
  std::mutex mutex;

  std::string name() const override { return "nllfused::CrossEntropyLossStatsBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex);
    for (SavedVariable* v : {&input_, &target_, &lse_, &aux_, &entropy_, &weight_})
      v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex);
    return backward(grads, task_should_compute_output(0));
  }

  // Every saved variable and option, in one order (csrc/compiled_node.h). Not the count of
  // counted rows: data, not an option (a constant of the captured graph would be stale).
  static constexpr const char* kFunctionalName = "nllfused_CrossEntropyLossStatsBackward";
  template <class Self, class F>
  static void each_saved(Self& n, F f) {  // Self: this node type, const or not
    for (auto* v : {&n.input_, &n.target_, &n.lse_, &n.aux_, &n.entropy_, &n.weight_}) f(*v);
  }
  template <class Self, class F>
  static void each_option(Self& n, F f) {
    f(n.reduction), f(n.ignore_index), f(n.want), f(n.label_smoothing), f(n.extras.z_loss);
    f(n.extras.logit_scale), f(n.extras.softcap), f(n.summed), f(n.major);
  }

  variable_list backward(const variable_list& grads, bool needed) {
    variable_list out(1);
    const bool any = grads[0].defined() || (grads[1].defined() && (want & kEntropy)) ||
                     (grads[2].defined() && (want & kTargetLogp));
    if (!any || !needed) return out;
    const Tensor saved = input_.unpack(), target = target_.unpack(), w = weight_.unpack();
    // create_graph=True, or batched gradients (csrc/loss.h): torch's differentiable formulas
    const bool create_graph = at::GradMode::is_enabled();
    const bool graph = create_graph || batched(grads[0]) || batched(grads[1]) ||
                       batched(grads[2]);
    // Else below ADInplaceOrView, as in csrc/loss.cpp: plain views of the saved input for the
    // kernels, no differentiable view's metadata built for each.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_views;
    if (!graph) below_views.emplace();
    const Tensor input = as_forward_layout(saved, major);
    const std::optional<Tensor> weight = w.defined() ? std::optional<Tensor>(w) : std::nullopt;
    auto [logits, target2] = canonical(input, target);
    const Tensor aux = aux_.unpack(), lse = lse_.unpack();
    const auto acc = acc_dtype(input.scalar_type());
    const bool ent = grads[1].defined() && (want & kEntropy);
    const bool tlp = grads[2].defined() && (want & kTargetLogp);
    // Summed on the CPU (plain tensors): each reduced statistic's gradient one value for every
    // row (in double, rounded once; over a slot here, rows_of_value), which the kernel applies
    // to the counted rows only (ce_bwd_stats_counted_cpu; the target log-prob's it applies
    // there anyway): no per-row tensors, where stat_row_grads' masks and divisions were four
    // passes over the rows (a third of the backward at (8, 4, 512, 512)).
    auto plain = [](const Tensor& t) { return !t.defined() || plain_cpu(t); };
    const bool counted_only = summed && counted >= 0 && !graph && plain_cpu(logits) &&
                              plain(grads[0]) && plain(grads[1]) && plain(grads[2]);
    std::optional<Tensor> g_ent, g_tlp;
    RowScalar ent_slot, tlp_slot, loss_slot;  // (read by the kernel call below)
    if (counted_only) {
      auto row_grad = [&](const Tensor& g, RowScalar& slot) {
        const double v = cpu_value(g) / (reduction == kMean ? counted : 1.0);
        return rows_of_value(v, acc, lse.sizes(), slot);
      };
      if (ent) g_ent = row_grad(grads[1], ent_slot);
      if (tlp) g_tlp = row_grad(grads[2], tlp_slot);
    } else if (ent || tlp) {  // the rows that count: only the statistics' gradients need them
      const Tensor counted_rows = not_ignored(target2, ignore_index);
      if (ent) g_ent = stat_row_grads(grads[1], counted_rows, reduction, false, acc);
      if (tlp) g_tlp = stat_row_grads(grads[2], counted_rows, reduction, true, acc);
    }
    if (graph) {
      at::AutoGradMode grad_mode(true);
      // in the saved logits as they are (a relaid copy, or canonical views, made with grad
      // mode off -- vmapped gradients -- would be no graph's input)
      if (any_extras(extras)) {  // (the loss's gradient alone)
        out[0] = torch_loss_grad(saved, target, weight, reduction, ignore_index, label_smoothing,
                                 extras, grads[0], create_graph);
        return out;
      }
      auto [logits_g, target_g] = canonical(saved, target);
      out[0] = second_order(saved, target, logits_g, target_g, weight, grads[0], g_ent, g_tlp,
                            create_graph);
      return out;
    }
    // Summed: no aux rows exist; the kernels read aux for probability targets only, so the row
    // gradients (of aux's shape and dtype) stand in for them, as in csrc/loss.cpp.
    const Tensor g_loss =
        !grads[0].defined() ? at::zeros({}, lse.options().dtype(acc)).expand(lse.sizes())
        : summed ? summed_row_grads(grads[0], aux, reduction, lse.sizes(), acc, loss_slot)
                 : row_grads(grads[0], aux, reduction);
    const Tensor& aux_rows = summed ? g_loss : aux;
    if (!g_ent && !g_tlp) {  // the loss's gradient alone: the plain backward
      std::optional<Tensor> grad_lse;
      if (extras.z_loss != 0 && grads[0].defined())
        grad_lse = z_loss_lse_grad(grads[0], lse, target2, ignore_index, reduction, false,
                                   extras.z_loss);
      out[0] = grad_as_input(ce_bwd(g_loss, logits, target2, weight, lse, aux_rows,
                                    ignore_index, label_smoothing, false, grad_lse,
                                    extras.logit_scale, extras.softcap),
                             input);
      return out;
    }
    const Tensor entropy = entropy_.unpack();
    out[0] = grad_as_input(
        counted_only
            ? nllfused_cpu::ce_bwd_stats_counted_cpu(g_loss, g_ent, g_tlp, logits, target2,
                                                     weight, lse, aux_rows, entropy,
                                                     ignore_index, label_smoothing)
            : ce_bwd_stats(g_loss, g_ent, g_tlp, logits, target2, weight, lse, aux_rows,
                           entropy, ignore_index, label_smoothing),
        input);
    return out;
  }

  // create_graph=True (or vmapped gradients): the forward once more through ce_fwd_stats's
  // autograd, differentiated.
  Tensor second_order(const Tensor& input, const Tensor& target, const Tensor& logits,
                      const Tensor& target2, const std::optional<Tensor>& weight,
                      const Tensor& g_loss, const std::optional<Tensor>& g_ent,
                      const std::optional<Tensor>& g_tlp, bool create_graph) {
    const Rows rows = ce_fwd_stats(logits, target2, weight, ignore_index, label_smoothing,
                                   g_ent ? kEntropy : 0, true);
    const Tensor& aux = std::get<2>(rows);
    variable_list outputs, grad_outputs;
    if (g_loss.defined()) {
      outputs.push_back(sum_rows(std::get<0>(rows), aux, reduction, target.sizes()));
      grad_outputs.push_back(g_loss.to(outputs.back().scalar_type()));
    }
    // (the statistics' row gradients in the forward's (N, D); a re-strided saved input's rows
    // are the same rows in another view: class-major (1, N) or (N, 1))
    if (g_ent) {
      outputs.push_back(std::get<3>(rows));
      grad_outputs.push_back(g_ent->reshape(outputs.back().sizes()));
    }
    if (g_tlp) {
      outputs.push_back(std::get<4>(rows));
      grad_outputs.push_back(g_tlp->reshape(outputs.back().sizes()));
    }
    return torch::autograd::grad(outputs, {input}, grad_outputs, /*retain_graph=*/true,
                                 create_graph)[0];
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

void check_args(int64_t reduction, int64_t want) {
  check_reduction(kOp, reduction);
  TORCH_CHECK_VALUE(want >= 0 && want < 128, kOp, ": want must be a mask of the statistics' "
                    "bits (0 to 127); got ", want);
}

// The outputs, and what the backward needs: the per-row lse, aux or, summed, its sum (0-dim
// float64), and the entropy rows where a statistic's gradient needs them (Rows' places).
struct Parts {
  Outputs out;
  Rows rows;
  bool summed = false;
  double counted = 0;  // summed: the counted rows
};

Parts forward_parts(const Tensor& input, const Tensor& target,
                    const std::optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                    double label_smoothing, int64_t want, const Extras& ex) {
  check_args(reduction, want);
  check_extras(kOp, ex);
  TORCH_CHECK(!prob_target(target), kOp, ": takes class-index targets only (probability "
              "targets' statistics take nllfused.cross_entropy's general path)");
  const bool extras = any_extras(ex);
  TORCH_CHECK_NOT_IMPLEMENTED(!extras || !(want & kKernelStats), kOp, ": z_loss, logit_scale "
                              "and softcap are taken with lse and z_loss only (the other "
                              "statistics with them take nllfused.cross_entropy's general path)");
  check_target_shape(kOp, input, target);
  auto [logits, target2] = canonical(input, target);
  if (reduction != kNone && !extras && plain_cpu(logits) && plain_cpu(target2) &&
      plain_cpu(weight)) {
    // The CPU kernel adds the rows and their statistics up in its own pass where it can (the
    // lanes path of few classes), add_up_rows where it wrote rows: assemble_summed.
    auto f = nllfused_cpu::ce_fwd_stats_summed_cpu(
        logits, target2, weight, ignore_index, label_smoothing, want & kEntropy,
        want & (kPredicted | kCorrect), want & (kEntropy | kTargetLogp), want & kPredicted);
    if (!f.summed) add_up_rows(f, target2, ignore_index);
    const Tensor aux_sum = at::scalar_tensor(f.aux_sum, input.options().dtype(at::kDouble));
    return {assemble_summed(f, input, target, reduction, want),
            {Tensor(), f.lse, aux_sum, f.entropy, Tensor(), f.predicted}, true, f.counted};
  }
  Rows rows;
  if (want & kKernelStats) {
    rows = ce_fwd_stats(logits, target2, weight, ignore_index, label_smoothing, want, false);
  } else {
    auto [loss, lse, aux] = ce_fwd(logits, target2, weight, ignore_index, label_smoothing, false,
                                   ex.logit_scale, ex.softcap);
    rows = {loss, lse, aux, Tensor(), Tensor(), Tensor()};
  }
  Outputs out =
      assemble(rows, input, target2, target, reduction, ignore_index, want, ex.z_loss);
  return {std::move(out), std::move(rows)};
}

Outputs cross_entropy_loss_stats_autograd(const Tensor& input, const Tensor& target,
                                          const std::optional<Tensor>& weight,
                                          int64_t reduction, int64_t ignore_index,
                                          double label_smoothing, int64_t want, double z_loss,
                                          double logit_scale, double softcap) {
  const Extras ex{z_loss, logit_scale, softcap};
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(input), kOp,
                              ": forward-mode AD is not supported (nllfused.cross_entropy "
                              "takes the general path under it)");
  TORCH_CHECK(!weight || !torch::autograd::compute_requires_grad(*weight), kOp,
              ": weight requires grad, but the op gives the class weights no gradient; pass "
              "weight.detach()");
  const bool differentiable = torch::autograd::compute_requires_grad(input);
  Parts p;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    p = forward_parts(input, target, weight, reduction, ignore_index, label_smoothing, want, ex);
  }
  Outputs& out = p.out;
  const Rows& rows = p.rows;
  if (!differentiable) return out;
  NodePtr node = new_node<CrossEntropyLossStatsBackward>();
  auto* n = static_cast<CrossEntropyLossStatsBackward*>(node.get());
  n->set_next_edges(torch::autograd::collect_next_edges(input));
  n->input_ = SavedVariable(input, false);
  n->target_ = SavedVariable(target, false);
  n->lse_ = SavedVariable(std::get<1>(rows), false);
  n->aux_ = SavedVariable(std::get<2>(rows), false);
  n->entropy_ = SavedVariable(std::get<3>(rows), false);
  n->weight_ = SavedVariable(weight.value_or(Tensor()), false);
  n->reduction = reduction;
  n->ignore_index = ignore_index;
  n->want = want;
  n->label_smoothing = label_smoothing;
  n->extras = ex;
  n->summed = p.summed;
  n->major = class_major(input);
  n->counted = p.counted;
  // the node's inputs 0, 1, 2: the loss, entropy, target_logprob (in that order)
  torch::autograd::set_history(std::get<0>(out), node);
  torch::autograd::set_history(std::get<5>(out), node);
  torch::autograd::set_history(std::get<6>(out), node);
  return out;
}

// Below autograd (no_grad inside compiled graphs, inference mode): the forward alone.
Outputs cross_entropy_loss_stats_forward(const Tensor& input, const Tensor& target,
                                         const std::optional<Tensor>& weight, int64_t reduction,
                                         int64_t ignore_index, double label_smoothing,
                                         int64_t want, double z_loss, double logit_scale,
                                         double softcap) {
  return forward_parts(input, target, weight, reduction, ignore_index, label_smoothing, want,
                       Extras{z_loss, logit_scale, softcap})
      .out;
}

}  // namespace
}  // namespace nllfused

TORCH_LIBRARY_IMPL(nllfused, Autograd, m) {
  m.impl("cross_entropy_loss_stats", &nllfused::cross_entropy_loss_stats_autograd);
}

TORCH_LIBRARY_IMPL(nllfused, CPU, m) {
  m.impl("cross_entropy_loss_stats", &nllfused::cross_entropy_loss_stats_forward);
}
