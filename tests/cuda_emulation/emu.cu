// Host emulation of the CUDA backend (csrc/cuda), for machines without a GPU.
//
// csrc/cuda/ce_kernels.cuh is included as it is, and the kernels' per-thread __host__ __device__
// functions (ce_thread.cuh: fwd_row_partial, fwd_strided_partial, merge, fwd_finish,
// make_bwd_row, bwd_row_part, bwd_strided_part, ...) run on the CPU under a simulated launch:
// every block of the grid (grid-stride loops included), every thread of a G-thread row group or a
// (32, TY) tile, the butterfly shuffles of group_reduce (lane i merges with lane i ^ off), the
// second butterfly of block_reduce over the warps' results and the tile kernel's tree over its
// thread-rows, in the kernels' order, with the kernels' feature flags (ce_flags). The
// parameters come from the real make_params() / set_bwd_inputs() (csrc/cuda/ce_host.h), the
// mapping, kernel variant and launch shape from the real fwd_rows_ok() / bwd_rows_ok(),
// with_kernel_flags() and rows_launch() / tile_launch(); tests may force them (every G, the
// tile mapping, any TY, a tiny grid, any number of pieces per split row; also blocks of 512
// threads, which the kernels accept but choose_launch no longer picks). Rows are split as on a
// kEmuSMs-SM device; a split forward's pieces are merged as ce_fwd_merge_kernel does. The
// arguments are checked by csrc/checks.h, as the real entry points do. Outputs start as
// sentinels, so an unwritten element fails.
//
// Not covered here: device-only code (shuffles, __syncthreads, shared memory), the device
// math (__expf etc.), and the host entry points ce_fwd_cuda / ce_bwd_cuda. Those are checked
// by compiling the real extension and by the GPU tests.
//
// Built by tests/test_cuda_emulation.py through torch.utils.cpp_extension.load (nvcc, so the
// CUDA syntax parses; the emulation itself is host code). The ops are registered as
// nllfused_emu::fwd / nllfused_emu::bwd, and with statistics nllfused_emu::fwd_stats /
// nllfused_emu::bwd_stats.
//
// Everything is host code, so nvcc's device pass (__CUDA_ARCH__ defined) sees an empty file:
// no kernel is instantiated, and parsing the ATen headers a second time would double the build.
#ifndef __CUDA_ARCH__
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../../csrc/checks.h"
#include "../../csrc/cuda/ce_host.h"
#include "../../csrc/cuda/ce_kernels.cuh"

namespace {

using namespace nllfused;
using namespace nllfused::cuda_impl;

// The SMs the emulated device has (an H100 / H200): rows_launch splits rows as it would there.
constexpr int kEmuSMs = 132;

// L: the real launch shape of the mapping taken (rows_launch / tile_launch). force_parts > 0
// (rows mapping): that many pieces per row (1: no split), in blocks of kLaunchThreads; force_G
// > 0 (rows mapping): G = force_G; force_ty > 0 (tile mapping): that TY; max_blocks > 0: cap the
// grid.
LaunchConfig force_shape(LaunchConfig L, int64_t R, int64_t force_G, int64_t force_ty,
                         int64_t max_blocks, int64_t force_parts) {
  if (!L.tile && force_parts > 0 && force_parts != L.parts) {
    L.parts = static_cast<int>(force_parts);
    L.G = L.threads = kLaunchThreads;
    L.blocks = R * L.parts;
  }
  if (!L.tile && force_G > 0) {
    L.G = static_cast<int>(force_G);
    L.threads = force_G <= 32 ? kWarpPathThreads : static_cast<int>(force_G);
    const int64_t rpb = L.threads / L.G;
    L.blocks = (R * L.parts + rpb - 1) / rpb;
  }
  if (L.tile && force_ty > 0) L.tile_y = static_cast<int>(force_ty);
  if (max_blocks > 0 && L.blocks > max_blocks) L.blocks = max_blocks;
  TORCH_CHECK(L.blocks >= 1, "emu: empty grid");
  if (L.tile) {
    TORCH_CHECK(L.tile_y >= 1 && L.tile_y <= kMaxTileY, "emu: bad TY ", L.tile_y);
  } else {
    TORCH_CHECK(L.G >= 4 && (L.G & (L.G - 1)) == 0 && L.G <= kMaxThreads, "emu: bad G ", L.G);
    TORCH_CHECK(L.threads % L.G == 0 && L.threads <= kMaxThreads, "emu: bad block ", L.threads);
  }
  return L;
}

// The launch ce_cuda.cu makes: the rows mapping where rows_ok (unless force_tile == 1: the
// tile mapping), the kernel variant with_kernel_flags picks for it, its launch shape on a
// kEmuSMs device (forced as force_shape says); then emu(integral_constant F, L). Returns L and
// sets *variant to F.
template <typename scalar_t, typename acc_t, typename Emu>
LaunchConfig emu_launch(bool rows_ok, int flags, const CEParams<acc_t>& p, int64_t force_tile,
                        int64_t force_G, int64_t force_ty, int64_t max_blocks,
                        int64_t force_parts, int* variant, Emu&& emu) {
  LaunchConfig L{};
  if (rows_ok && force_tile != 1) {
    with_kernel_flags<RowsFlagSets<scalar_t>>(flags, [&](auto f) {
      L = force_shape(rows_launch<scalar_t, decltype(f)::value>(p, kEmuSMs), p.R,
                      force_tile == 0 ? force_G : 0, 0, max_blocks, force_parts);
      *variant = decltype(f)::value;
      emu(f, L);
    });
  } else {
    with_kernel_flags<TileFlagSets<scalar_t>>(flags, [&](auto f) {
      L = force_shape(tile_launch<scalar_t>(p), p.R, 0, force_ty, max_blocks, 0);
      *variant = decltype(f)::value;
      emu(f, L);
    });
  }
  return L;
}

// group_reduce's butterfly over aligned groups of `width` lanes of s, in place.
template <int F, typename acc_t>
void emu_butterfly(std::vector<Stats<acc_t>>& s, int width) {
  std::vector<Stats<acc_t>> ns(s.size());
  for (int off = width >> 1; off > 0; off >>= 1) {
    for (size_t i = 0; i < s.size(); ++i)
      ns[i] = merge<F>(s[i], s[i ^ static_cast<size_t>(off)]);
    s.swap(ns);
  }
}

// group_reduce (G <= 32) or block_reduce (G == blockDim.x > 32) of one row group's G lanes.
template <int F, typename acc_t>
Stats<acc_t> emu_reduce(std::vector<Stats<acc_t>> s, int G) {
  emu_butterfly<F>(s, G < 32 ? G : 32);
  if (G <= 32) return s[0];  // lane tid == 0 writes the row
  // block_reduce: lane 0 of each warp into red[warp], then warp 0's butterfly over them
  std::vector<Stats<acc_t>> red(static_cast<size_t>(G / 32));
  for (size_t w = 0; w < red.size(); ++w) red[w] = s[w * 32];
  emu_butterfly<F>(red, G / 32);
  return red[0];
}

template <typename scalar_t, int F>
void emu_fwd_impl(const scalar_t* x, const CEParams<acc_type_t<scalar_t>>& p,
                  const LaunchConfig& L) {
  using acc_t = acc_type_t<scalar_t>;
  if (L.tile) {  // ce_fwd_tile_kernel
    const int TY = L.tile_y;
    std::vector<Stats<acc_t>> part(TY);
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int64_t rbase = blk * 32; rbase < p.R; rbase += L.blocks * 32)
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t r = rbase + lane;
          for (int ty = 0; ty < TY; ++ty)
            part[ty] = fwd_tile_thread<scalar_t, F>(p, x, r, ty, TY);
          if (r >= p.R) continue;
          for (int h = 1; h < TY; h *= 2)  // the kernel's tree: ty (a multiple of 2h) takes ty + h
            for (int ty = 0; ty + h < TY; ty += 2 * h) part[ty] = merge<F>(part[ty], part[ty + h]);
          fwd_finish<scalar_t, F>(p, x, r, part[0]);
        }
  } else {  // ce_fwd_rows_kernel, then ce_fwd_merge_kernel for split rows
    const int G = L.G, rpb = L.threads / G, parts = L.parts;
    const int64_t items = p.R * parts;
    std::vector<Stats<acc_t>> s(G), ws(static_cast<size_t>(parts > 1 ? items : 0));
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int64_t ibase = blk * rpb; ibase < items; ibase += L.blocks * rpb)
        for (int grp = 0; grp < rpb; ++grp) {
          const int64_t i = ibase + grp;
          const int64_t r = parts == 1 ? i : i / parts;
          const int part = static_cast<int>(i - r * parts);
          for (int tid = 0; tid < G; ++tid)
            s[tid] = fwd_rows_thread<scalar_t, F>(p, x, r, tid, G, part, parts);
          const Stats<acc_t> red = emu_reduce<F>(s, G);
          if (i >= items) continue;
          if (parts == 1) fwd_finish<scalar_t, F>(p, x, r, red);
          else ws[static_cast<size_t>(i)] = red;
        }
    if (parts > 1)
      for (int64_t r = 0; r < p.R; ++r)
        fwd_finish<scalar_t, F>(p, x, r, merge_parts<F>(ws.data() + r * parts, parts));
  }
}

template <typename scalar_t, int F>
void emu_bwd_impl(const scalar_t* x, scalar_t* out,
                  const CEParams<acc_type_t<scalar_t>>& p, const LaunchConfig& L) {
  if (L.tile) {  // ce_bwd_tile_kernel
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int lane = 0; lane < 32; ++lane)
        for (int64_t r = blk * 32 + lane; r < p.R; r += L.blocks * 32)
          for (int ty = 0; ty < L.tile_y; ++ty)
            bwd_tile_thread<scalar_t, F>(p, x, out, r, ty, L.tile_y);
  } else {  // ce_bwd_rows_kernel
    const int G = L.G, rpb = L.threads / G, parts = L.parts;
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int grp = 0; grp < rpb; ++grp)
        for (int64_t i = blk * rpb + grp; i < p.R * parts; i += L.blocks * rpb) {
          const int64_t r = parts == 1 ? i : i / parts;
          for (int tid = 0; tid < G; ++tid)
            bwd_rows_thread<scalar_t, F>(p, x, out, r, tid, G, static_cast<int>(i - r * parts),
                                         parts);
        }
  }
}

at::Tensor config_tensor(const LaunchConfig& L, int variant) {
  // (tile, G, threads or TY, blocks, pieces per row, the kernel's feature flags F)
  return at::tensor(std::vector<int64_t>{L.tile ? 1 : 0, L.tile ? 0 : L.G,
                                         L.tile ? L.tile_y : L.threads, L.blocks,
                                         L.tile ? 1 : L.parts, variant});
}

// -> (loss, lse, aux, launch config), with `stats` (ce_fwd_stats: the kStats kernels)
// (loss, lse, aux, entropy, target_logp, predicted, launch config)
std::vector<at::Tensor> emu_forward(const at::Tensor& logits, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight,
                                    int64_t ignore_index, double label_smoothing,
                                    double logit_scale, double softcap, bool prob_target,
                                    int64_t force_tile, int64_t force_G, int64_t force_ty,
                                    int64_t max_blocks, int64_t force_parts, bool stats) {
  check_fwd("nllfused_emu::fwd", c10::DeviceType::CPU, logits, target, weight, label_smoothing,
            prob_target);
  const at::Tensor w = kernel_weight(weight);
  const int64_t N = logits.size(0), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::full({N, D}, 12345.0, opts);
  at::Tensor lse = at::full({N, D}, 12345.0, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::full({N, D}, 12345.0, opts);
  at::Tensor entropy = at::full({N, D}, 12345.0, opts);
  at::Tensor target_logp = at::full({N, D}, 12345.0, opts);
  at::Tensor predicted = at::full({N, D}, 12345, logits.options().dtype(at::kLong));
  LaunchConfig L{};
  int variant = -1;
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type_t<scalar_t>;
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    if (stats) set_stats_outputs(p, entropy, target_logp, predicted);
    L = emu_launch<scalar_t>(fwd_rows_ok(p), stats ? flags | kStats : flags, p, force_tile,
                             force_G, force_ty, max_blocks, force_parts, &variant,
                             [&](auto f, const LaunchConfig& shape) {
      emu_fwd_impl<scalar_t, decltype(f)::value>(logits.data_ptr<scalar_t>(), p, shape);
    });
  });
  if (stats) return {loss, lse, aux, entropy, target_logp, predicted, config_tensor(L, variant)};
  return {loss, lse, aux, config_tensor(L, variant)};
}

std::vector<at::Tensor> emu_fwd(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                double label_smoothing, double logit_scale,
                                double softcap, bool prob_target, int64_t force_tile,
                                int64_t force_G, int64_t force_ty, int64_t max_blocks,
                                int64_t force_parts) {
  return emu_forward(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                     prob_target, force_tile, force_G, force_ty, max_blocks, force_parts, false);
}

std::vector<at::Tensor> emu_fwd_stats(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight,
                                      int64_t ignore_index, double label_smoothing,
                                      double logit_scale, double softcap, bool prob_target,
                                      int64_t force_tile, int64_t force_G, int64_t force_ty,
                                      int64_t max_blocks, int64_t force_parts) {
  return emu_forward(logits, target, weight, ignore_index, label_smoothing, logit_scale, softcap,
                     prob_target, force_tile, force_G, force_ty, max_blocks, force_parts, true);
}

// -> (grad_logits, launch config); with `entropy` (ce_bwd_stats) the statistics' gradients too
// (the kStats kernels where either is given).
std::vector<at::Tensor> emu_backward(const at::Tensor& grad_loss,
                                     const std::optional<at::Tensor>& grad_lse,
                                     const std::optional<at::Tensor>& grad_entropy,
                                     const std::optional<at::Tensor>& grad_target_logp,
                                     const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight,
                                     const at::Tensor& lse, const at::Tensor& aux,
                                     const at::Tensor* entropy, int64_t ignore_index,
                                     double label_smoothing, double logit_scale, double softcap,
                                     bool prob_target, int64_t force_tile, int64_t force_G,
                                     int64_t force_ty, int64_t max_blocks, int64_t force_parts) {
  check_bwd("nllfused_emu::bwd", c10::DeviceType::CPU, grad_loss, grad_lse, logits, target,
            weight, lse, aux, label_smoothing, prob_target);
  if (entropy != nullptr)
    check_bwd_stats("nllfused_emu::bwd_stats", c10::DeviceType::CPU, logits, grad_entropy,
                    grad_target_logp, *entropy);
  const bool stats = entropy != nullptr && (present(grad_entropy) || present(grad_target_logp));
  const at::Tensor w = kernel_weight(weight);
  const at::Tensor wsum = weight_sum(w, prob_target);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  at::Tensor out = at::full({N, C, D}, 777.0, logits.options());
  LaunchConfig L{};
  int variant = -1;
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto p, int flags) {
    using scalar_t = decltype(x_tag);
    set_bwd_inputs(p, grad_loss, present(grad_lse), lse, aux, wsum);
    if (stats)
      set_stats_bwd_inputs(p, present(grad_entropy), present(grad_target_logp), *entropy);
    L = emu_launch<scalar_t>(bwd_rows_ok(p), stats ? flags | kStats : flags, p, force_tile,
                             force_G, force_ty, max_blocks, force_parts, &variant,
                             [&](auto f, const LaunchConfig& shape) {
      emu_bwd_impl<scalar_t, decltype(f)::value>(logits.data_ptr<scalar_t>(),
                                                 out.data_ptr<scalar_t>(), p, shape);
    });
  });
  return {out, config_tensor(L, variant)};
}

std::vector<at::Tensor> emu_bwd(const at::Tensor& grad_loss,
                                const std::optional<at::Tensor>& grad_lse,
                                const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                const at::Tensor& aux, int64_t ignore_index,
                                double label_smoothing, double logit_scale, double softcap,
                                bool prob_target,
                                int64_t force_tile, int64_t force_G, int64_t force_ty,
                                int64_t max_blocks, int64_t force_parts) {
  return emu_backward(grad_loss, grad_lse, std::nullopt, std::nullopt, logits, target, weight,
                      lse, aux, nullptr, ignore_index, label_smoothing, logit_scale, softcap,
                      prob_target, force_tile, force_G, force_ty, max_blocks, force_parts);
}

std::vector<at::Tensor> emu_bwd_stats(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
    const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& grad_target_logp, const at::Tensor& logits,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& aux, const at::Tensor& entropy, int64_t ignore_index,
    double label_smoothing, double logit_scale, double softcap, bool prob_target,
    int64_t force_tile, int64_t force_G, int64_t force_ty, int64_t max_blocks,
    int64_t force_parts) {
  return emu_backward(grad_loss, grad_lse, grad_entropy, grad_target_logp, logits, target, weight,
                      lse, aux, &entropy, ignore_index, label_smoothing, logit_scale, softcap,
                      prob_target, force_tile, force_G, force_ty, max_blocks, force_parts);
}

}  // namespace

TORCH_LIBRARY(nllfused_emu, m) {
  m.def(
      "fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target, "
      "int force_tile, int force_G, int force_ty, int max_blocks, int force_parts) -> Tensor[]");
  m.def(
      "bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor aux, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, bool prob_target, int force_tile, int force_G, int force_ty, "
      "int max_blocks, int force_parts) -> Tensor[]");
  // ce_fwd_stats / ce_bwd_stats (csrc/ops.cpp) under the same emulated launches
  m.def(
      "fwd_stats(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target, "
      "int force_tile, int force_G, int force_ty, int max_blocks, int force_parts) -> Tensor[]");
  m.def(
      "bwd_stats(Tensor grad_loss, Tensor? grad_lse, Tensor? grad_entropy, "
      "Tensor? grad_target_logp, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor aux, Tensor entropy, int ignore_index, float label_smoothing, "
      "float logit_scale, float softcap, bool prob_target, int force_tile, int force_G, "
      "int force_ty, int max_blocks, int force_parts) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(nllfused_emu, CPU, m) {
  m.impl("fwd", &emu_fwd);
  m.impl("bwd", &emu_bwd);
  m.impl("fwd_stats", &emu_fwd_stats);
  m.impl("bwd_stats", &emu_bwd_stats);
}

#endif  // __CUDA_ARCH__
