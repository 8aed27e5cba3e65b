// CUDA backend of nllfused::ce_fwd / ce_bwd and ce_fwd_stats / ce_bwd_stats (contract:
// csrc/ops.cpp, maths: docs/maths.md): the host entry points. They check the arguments
// (csrc/checks.h), allocate the outputs, set up the kernels' parameters (ce_host.h) and launch
// the kernels of ce_kernels.cuh: the mapping (fwd_rows_ok / bwd_rows_ok), then the kernel for
// the options' flags (with_kernel_flags), with the shape rows_launch / tile_launch choose (and,
// for few long rows, a workspace for the split forward's partial states).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "ce_host.h"
#include "ce_kernels.cuh"

namespace nllfused {
namespace cuda_impl {
namespace {

// Calls rows(f, L) for the rows mapping when `rows`, else tile(f, L), with f the
// integral_constant of the kernel variant with_kernel_flags picks for the options' flags and L
// the launch shape (rows_launch, which may split rows over this device's SMs, / tile_launch).
template <typename scalar_t, typename acc_t, typename RowsFn, typename TileFn>
void launch(bool rows, int flags, const CEParams<acc_t>& p, RowsFn&& rows_fn, TileFn&& tile_fn) {
  if (rows) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    with_kernel_flags<RowsFlagSets<scalar_t>>(flags, [&](auto f) {
      rows_fn(f, rows_launch<scalar_t, decltype(f)::value>(p, sms));
    });
  } else {
    with_kernel_flags<TileFlagSets<scalar_t>>(
        flags, [&](auto f) { tile_fn(f, tile_launch<scalar_t>(p)); });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned grid(const LaunchConfig& L) { return static_cast<unsigned>(L.blocks); }

using Rows6 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ce_fwd's (loss, lse, aux) and, with `stats` (the kernels' kStats variants), ce_fwd_stats's
// (entropy, target_logp, predicted); without, those three are undefined (nothing allocated).
Rows6 forward(const char* op, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& weight, int64_t ignore_index,
              double label_smoothing, double logit_scale, double softcap, bool prob_target,
              bool stats) {
  check_fwd(op, c10::DeviceType::CUDA, logits, target, weight, label_smoothing, prob_target);
  const at::Tensor w = kernel_weight(weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({N, D}, opts);
  at::Tensor lse = at::empty({N, D}, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::empty({N, D}, opts);
  at::Tensor entropy, target_logp, predicted;
  if (stats) {
    entropy = at::empty({N, D}, opts);
    target_logp = at::empty({N, D}, opts);
    predicted = at::empty({N, D}, logits.options().dtype(at::kLong));
  }
  if (N * D == 0) return {loss, lse, aux, entropy, target_logp, predicted};

  const auto stream = at::cuda::getCurrentCUDAStream();
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type_t<scalar_t>;
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    if (stats) set_stats_outputs(p, entropy, target_logp, predicted);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    launch<scalar_t>(
        fwd_rows_ok(p), stats ? flags | kStats : flags, p,
        [&](auto f, const LaunchConfig& L) {
          constexpr int F = decltype(f)::value;
          if (L.parts == 1) {
            ce_fwd_rows_kernel<scalar_t, F><<<grid(L), L.threads, 0, stream>>>(x, p, L.G, 1,
                                                                               nullptr);
            return;
          }
          // split rows: the pieces' states, then a kernel that merges and finishes each row
          static_assert(sizeof(Stats<acc_t>) % sizeof(acc_t) == 0, "Stats in whole words");
          constexpr int64_t words = sizeof(Stats<acc_t>) / sizeof(acc_t);
          const at::Tensor ws = at::empty({p.R * L.parts * words}, opts);
          auto* part = reinterpret_cast<Stats<acc_t>*>(ws.data_ptr<acc_t>());
          ce_fwd_rows_kernel<scalar_t, F><<<grid(L), L.threads, 0, stream>>>(x, p, L.G, L.parts,
                                                                             part);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          ce_fwd_merge_kernel<scalar_t, F>
              <<<static_cast<unsigned>(merge_blocks(p.R)), kLaunchThreads, 0, stream>>>(
                  x, p, L.parts, part);
        },
        [&](auto f, const LaunchConfig& L) {
          ce_fwd_tile_kernel<scalar_t, decltype(f)::value>
              <<<grid(L), dim3(32, L.tile_y), 0, stream>>>(x, p);
        });
  });
  return {loss, lse, aux, entropy, target_logp, predicted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double logit_scale, double softcap,
    bool prob_target) {
  auto o = forward("nllfused::ce_fwd (CUDA)", logits, target, weight, ignore_index,
                   label_smoothing, logit_scale, softcap, prob_target, false);
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o)};
}

Rows6 ce_fwd_stats_cuda(const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight, int64_t ignore_index,
                        double label_smoothing, double logit_scale, double softcap,
                        bool prob_target, bool with_entropy, bool with_predicted) {
  Rows6 o = forward("nllfused::ce_fwd_stats (CUDA)", logits, target, weight, ignore_index,
                    label_smoothing, logit_scale, softcap, prob_target, true);
  // The kStats kernels form the entropy and the argmax together (the per-thread state they
  // add is the same registers either way): what was not asked for is zeroed, as the contract
  // says (csrc/ops.cpp), by one small fill over the rows.
  if (!with_entropy) std::get<3>(o).zero_();
  if (!with_predicted) std::get<5>(o).zero_();
  return o;
}

// ce_bwd's gradient; with `entropy` given (ce_bwd_stats) plus the statistics' gradients
// (kStats kernels; when both of those are None, the plain kernels).
at::Tensor backward(const char* op, const at::Tensor& grad_loss,
                    const std::optional<at::Tensor>& grad_lse,
                    const std::optional<at::Tensor>& grad_entropy,
                    const std::optional<at::Tensor>& grad_target_logp, const at::Tensor& logits,
                    const at::Tensor& target, const std::optional<at::Tensor>& weight,
                    const at::Tensor& lse, const at::Tensor& aux, const at::Tensor* entropy,
                    int64_t ignore_index, double label_smoothing, double logit_scale,
                    double softcap, bool prob_target) {
  check_bwd(op, c10::DeviceType::CUDA, grad_loss, grad_lse, logits, target, weight, lse, aux,
            label_smoothing, prob_target);
  if (entropy != nullptr)
    check_bwd_stats(op, c10::DeviceType::CUDA, logits, grad_entropy, grad_target_logp, *entropy);
  const bool stats = entropy != nullptr && (present(grad_entropy) || present(grad_target_logp));
  const at::Tensor w = kernel_weight(weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  at::Tensor grad = at::empty({N, C, D}, logits.options());
  if (N * D == 0) return grad;

  const at::Tensor wsum = weight_sum(w, prob_target);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    set_bwd_inputs(p, grad_loss, present(grad_lse), lse, aux, wsum);
    if (stats)
      set_stats_bwd_inputs(p, present(grad_entropy), present(grad_target_logp), *entropy);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    launch<scalar_t>(
        bwd_rows_ok(p), stats ? flags | kStats : flags, p,
        [&](auto f, const LaunchConfig& L) {
          ce_bwd_rows_kernel<scalar_t, decltype(f)::value>
              <<<grid(L), L.threads, 0, stream>>>(x, out, p, L.G, L.parts);
        },
        [&](auto f, const LaunchConfig& L) {
          ce_bwd_tile_kernel<scalar_t, decltype(f)::value>
              <<<grid(L), dim3(32, L.tile_y), 0, stream>>>(x, out, p);
        });
  });
  return grad;
}

at::Tensor ce_bwd_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       const at::Tensor& aux, int64_t ignore_index, double label_smoothing,
                       double logit_scale, double softcap, bool prob_target) {
  return backward("nllfused::ce_bwd (CUDA)", grad_loss, grad_lse, std::nullopt, std::nullopt,
                  logits, target, weight, lse, aux, nullptr, ignore_index, label_smoothing,
                  logit_scale, softcap, prob_target);
}

at::Tensor ce_bwd_stats_cuda(const at::Tensor& grad_loss,
                             const std::optional<at::Tensor>& grad_lse,
                             const std::optional<at::Tensor>& grad_entropy,
                             const std::optional<at::Tensor>& grad_target_logp,
                             const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                             const at::Tensor& aux, const at::Tensor& entropy,
                             int64_t ignore_index, double label_smoothing, double logit_scale,
                             double softcap, bool prob_target) {
  return backward("nllfused::ce_bwd_stats (CUDA)", grad_loss, grad_lse, grad_entropy,
                  grad_target_logp, logits, target, weight, lse, aux, &entropy, ignore_index,
                  label_smoothing, logit_scale, softcap, prob_target);
}

}  // namespace
}  // namespace cuda_impl
}  // namespace nllfused

TORCH_LIBRARY_IMPL(nllfused, CUDA, m) {
  m.impl("ce_fwd", &nllfused::cuda_impl::ce_fwd_cuda);
  m.impl("ce_bwd", &nllfused::cuda_impl::ce_bwd_cuda);
  m.impl("ce_fwd_stats", &nllfused::cuda_impl::ce_fwd_stats_cuda);
  m.impl("ce_bwd_stats", &nllfused::cuda_impl::ce_bwd_stats_cuda);
}
