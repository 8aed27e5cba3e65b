// CUDA backend of nllfused::ce_fwd / nllfused::ce_bwd (contract: csrc/ops.cpp, maths:
// docs/maths.md): the host entry points. They check the arguments (csrc/checks.h), allocate the
// outputs, set up the kernels' parameters (ce_host.h) and launch the kernels of ce_kernels.cuh
// with the shape fwd_launch / bwd_launch choose there.
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

// Launches the tile or the rows kernel of a pair as L says (the rows kernel also takes L.G).
template <typename TileKernel, typename RowsKernel, typename... Args>
void launch(const LaunchConfig& L, cudaStream_t stream, TileKernel tile, RowsKernel rows,
            const Args&... args) {
  if (L.tile) {
    tile<<<static_cast<unsigned>(L.blocks), dim3(32, L.tile_y), 0, stream>>>(args...);
  } else {
    rows<<<static_cast<unsigned>(L.blocks), L.threads, 0, stream>>>(args..., L.G);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double logit_scale, double softcap,
    bool prob_target) {
  check_fwd("nllfused::ce_fwd (CUDA)", c10::DeviceType::CUDA, logits, target, weight,
            label_smoothing, prob_target);
  const at::Tensor w = kernel_weight(weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::empty({N, D}, opts);
  at::Tensor lse = at::empty({N, D}, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::empty({N, D}, opts);
  if (N * D == 0) return {loss, lse, aux};

  const auto stream = at::cuda::getCurrentCUDAStream();
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto tgt_tag, auto p) {
    using scalar_t = decltype(x_tag);
    using tgt_t = decltype(tgt_tag);
    using acc_t = acc_type_t<scalar_t>;
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    launch(fwd_launch<scalar_t>(p), stream, ce_fwd_tile_kernel<scalar_t, tgt_t>,
           ce_fwd_rows_kernel<scalar_t, tgt_t>, logits.data_ptr<scalar_t>(), p);
  });
  return {loss, lse, aux};
}

at::Tensor ce_bwd_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       const at::Tensor& aux, int64_t ignore_index, double label_smoothing,
                       double logit_scale, double softcap, bool prob_target) {
  check_bwd("nllfused::ce_bwd (CUDA)", c10::DeviceType::CUDA, grad_loss, grad_lse, logits,
            target, weight, lse, aux, label_smoothing, prob_target);
  const at::Tensor w = kernel_weight(weight);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  at::Tensor grad = at::empty({N, C, D}, logits.options());
  if (N * D == 0) return grad;

  const at::Tensor wsum = weight_sum(w, prob_target);
  const auto stream = at::cuda::getCurrentCUDAStream();
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto tgt_tag, auto p) {
    using scalar_t = decltype(x_tag);
    using tgt_t = decltype(tgt_tag);
    set_bwd_inputs(p, grad_loss, present(grad_lse), lse, aux, wsum);
    launch(bwd_launch<scalar_t>(p), stream, ce_bwd_tile_kernel<scalar_t, tgt_t>,
           ce_bwd_rows_kernel<scalar_t, tgt_t>, logits.data_ptr<scalar_t>(),
           grad.data_ptr<scalar_t>(), p);
  });
  return grad;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace nllfused

TORCH_LIBRARY_IMPL(nllfused, CUDA, m) {
  m.impl("ce_fwd", &nllfused::cuda_impl::ce_fwd_cuda);
  m.impl("ce_bwd", &nllfused::cuda_impl::ce_bwd_cuda);
}
