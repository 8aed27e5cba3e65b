// CUDA backend of nllfused::ce_fwd / nllfused::ce_bwd (contract: csrc/ops.cpp, maths:
// docs/maths.md): the host entry points. They check the arguments (csrc/checks.h), allocate the
// outputs, set up the kernels' parameters (ce_host.h) and launch the kernels of ce_kernels.cuh:
// the mapping (fwd_rows_ok / bwd_rows_ok), then the kernel for the options' flags
// (with_kernel_flags), with the shape rows_launch / tile_launch choose.
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

// Launches the rows kernel of flags F (taking L.G) when `rows`, else the tile kernel, for the
// options' flags (with_kernel_flags picks the kernel variant that serves them). RowsKernel /
// TileKernel: a generic lambda returning kernel<scalar_t, F> for an integral_constant F.
template <typename scalar_t, typename acc_t, typename RowsKernel, typename TileKernel,
          typename... Args>
void launch(bool rows, int flags, const CEParams<acc_t>& p, cudaStream_t stream,
            RowsKernel rows_kernel, TileKernel tile_kernel, const Args&... args) {
  if (rows) {
    with_kernel_flags<RowsFlagSets<scalar_t>>(flags, [&](auto f) {
      const LaunchConfig L = rows_launch<scalar_t, decltype(f)::value>(p);
      rows_kernel(f)<<<static_cast<unsigned>(L.blocks), L.threads, 0, stream>>>(args..., p, L.G);
    });
  } else {
    with_kernel_flags<TileFlagSets<scalar_t>>(flags, [&](auto f) {
      const LaunchConfig L = tile_launch<scalar_t>(p);
      tile_kernel(f)<<<static_cast<unsigned>(L.blocks), dim3(32, L.tile_y), 0, stream>>>(
          args..., p);
    });
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
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type_t<scalar_t>;
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    launch<scalar_t>(
        fwd_rows_ok(p), flags, p, stream,
        [](auto f) { return ce_fwd_rows_kernel<scalar_t, decltype(f)::value>; },
        [](auto f) { return ce_fwd_tile_kernel<scalar_t, decltype(f)::value>; },
        logits.data_ptr<scalar_t>());
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
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    set_bwd_inputs(p, grad_loss, present(grad_lse), lse, aux, wsum);
    launch<scalar_t>(
        bwd_rows_ok(p), flags, p, stream,
        [](auto f) { return ce_bwd_rows_kernel<scalar_t, decltype(f)::value>; },
        [](auto f) { return ce_bwd_tile_kernel<scalar_t, decltype(f)::value>; },
        logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>());
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
