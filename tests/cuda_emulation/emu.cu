// Host emulation of the CUDA backend (csrc/cuda), for machines without a GPU.
//
// csrc/cuda/ce_kernels.cuh is included as it is, and the kernels' per-thread __host__ __device__
// functions (ce_thread.cuh: fwd_row_partial, fwd_strided_partial, merge, fwd_finish,
// make_bwd_row, bwd_row_part, bwd_strided_part, ...) run on the CPU under a simulated launch:
// every block of the grid (grid-stride loops included), every thread of a G-thread row group or a
// (32, TY) tile, the butterfly shuffles of group_reduce (lane i merges with lane i ^ off) and the
// serial cross-warp merge of block_reduce, in the kernels' order. The parameters come from the
// real make_params() / set_bwd_inputs() (csrc/cuda/ce_host.h), the launch shape from the real
// fwd_launch() / bwd_launch(); tests may force one (every G, the tile mapping, any TY, a tiny
// grid). The arguments are checked by csrc/checks.h, as the real entry points do. Outputs start
// as sentinels, so an unwritten element fails.
//
// Not covered here: device-only code (shuffles, __syncthreads, shared memory), the device
// math (__expf etc.), and the host entry points ce_fwd_cuda / ce_bwd_cuda. Those are checked
// by compiling the real extension and by the GPU tests.
//
// Built by tests/test_cuda_emulation.py through torch.utils.cpp_extension.load (nvcc, so the
// CUDA syntax parses; the emulation itself is host code). The ops are registered as
// nllfused_emu::fwd / nllfused_emu::bwd.
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

// L: the real launch shape (fwd_launch / bwd_launch). force_tile: -1 that one, 0 rows mapping
// with G = force_G (when the input allows it), 1 tile mapping. force_ty > 0: the tile's TY.
// max_blocks > 0: cap the grid.
LaunchConfig pick(LaunchConfig L, int64_t R, int64_t C, int vec, int64_t force_tile,
                  int64_t force_G, int64_t force_ty, int64_t max_blocks) {
  const bool rows_ok = !L.tile;  // choose_launch takes the rows mapping wherever it may
  if (force_tile == 1) L = choose_launch(R, C, false, vec);
  if (force_tile == 0 && rows_ok && force_G > 0) {
    L.tile = false;
    L.G = static_cast<int>(force_G);
    L.threads = force_G <= 32 ? kWarpPathThreads : static_cast<int>(force_G);
    const int64_t rpb = L.threads / L.G;
    L.blocks = (R + rpb - 1) / rpb;
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

// group_reduce (G <= 32) or block_reduce (G == blockDim.x > 32) of one row group's G lanes.
template <typename acc_t>
Stats<acc_t> emu_reduce(std::vector<Stats<acc_t>> s, int G) {
  const int width = G < 32 ? G : 32;
  std::vector<Stats<acc_t>> ns(s.size());
  for (int off = width >> 1; off > 0; off >>= 1) {
    for (size_t i = 0; i < s.size(); ++i) ns[i] = merge(s[i], s[i ^ static_cast<size_t>(off)]);
    s.swap(ns);
  }
  if (G <= 32) return s[0];  // lane tid == 0 writes the row
  Stats<acc_t> r = s[0];     // thread 0 merges red[0 .. nwarps)
  for (int w = 1; w < G / 32; ++w) r = merge(r, s[static_cast<size_t>(w) * 32]);
  return r;
}

template <typename scalar_t, typename tgt_t>
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
            part[ty] = fwd_tile_thread<scalar_t, tgt_t>(p, x, r, ty, TY);
          if (r >= p.R) continue;
          Stats<acc_t> st = part[0];
          for (int k = 1; k < TY; ++k) st = merge(st, part[k]);
          fwd_finish<scalar_t, tgt_t>(p, x, r, st);
        }
  } else {  // ce_fwd_rows_kernel
    const int G = L.G, rpb = L.threads / G;
    std::vector<Stats<acc_t>> s(G);
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int64_t rbase = blk * rpb; rbase < p.R; rbase += L.blocks * rpb)
        for (int grp = 0; grp < rpb; ++grp) {
          const int64_t r = rbase + grp;
          for (int tid = 0; tid < G; ++tid)
            s[tid] = fwd_rows_thread<scalar_t, tgt_t>(p, x, r, tid, G);
          const Stats<acc_t> red = emu_reduce(s, G);
          if (r < p.R) fwd_finish<scalar_t, tgt_t>(p, x, r, red);
        }
  }
}

template <typename scalar_t, typename tgt_t>
void emu_bwd_impl(const scalar_t* x, scalar_t* out,
                  const CEParams<acc_type_t<scalar_t>>& p, const LaunchConfig& L) {
  if (L.tile) {  // ce_bwd_tile_kernel
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int lane = 0; lane < 32; ++lane)
        for (int64_t r = blk * 32 + lane; r < p.R; r += L.blocks * 32)
          for (int ty = 0; ty < L.tile_y; ++ty)
            bwd_tile_thread<scalar_t, tgt_t>(p, x, out, r, ty, L.tile_y);
  } else {  // ce_bwd_rows_kernel
    const int G = L.G, rpb = L.threads / G;
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int grp = 0; grp < rpb; ++grp)
        for (int64_t r = blk * rpb + grp; r < p.R; r += L.blocks * rpb)
          for (int tid = 0; tid < G; ++tid)
            bwd_rows_thread<scalar_t, tgt_t>(p, x, out, r, tid, G);
  }
}

at::Tensor config_tensor(const LaunchConfig& L) {
  // (tile, G, threads or TY, blocks)
  return at::tensor(std::vector<int64_t>{L.tile ? 1 : 0, L.tile ? 0 : L.G,
                                         L.tile ? L.tile_y : L.threads, L.blocks});
}

// -> (loss, lse, aux, launch config)
std::vector<at::Tensor> emu_fwd(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                double label_smoothing, double logit_scale,
                                double softcap, bool prob_target, int64_t force_tile,
                                int64_t force_G, int64_t force_ty, int64_t max_blocks) {
  check_fwd("nllfused_emu::fwd", c10::DeviceType::CPU, logits, target, weight, label_smoothing,
            prob_target);
  const at::Tensor w = kernel_weight(weight);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor loss = at::full({N, D}, 12345.0, opts);
  at::Tensor lse = at::full({N, D}, 12345.0, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::full({N, D}, 12345.0, opts);
  LaunchConfig L{};
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto tgt_tag, auto p) {
    using scalar_t = decltype(x_tag);
    using acc_t = acc_type_t<scalar_t>;
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    L = pick(fwd_launch<scalar_t>(p), p.R, C, 16 / static_cast<int>(sizeof(scalar_t)),
             force_tile, force_G, force_ty, max_blocks);
    emu_fwd_impl<scalar_t, decltype(tgt_tag)>(logits.data_ptr<scalar_t>(), p, L);
  });
  return {loss, lse, aux, config_tensor(L)};
}

// -> (grad_logits, launch config)
std::vector<at::Tensor> emu_bwd(const at::Tensor& grad_loss,
                                const std::optional<at::Tensor>& grad_lse,
                                const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                const at::Tensor& aux, int64_t ignore_index,
                                double label_smoothing, double logit_scale, double softcap,
                                bool prob_target,
                                int64_t force_tile, int64_t force_G, int64_t force_ty,
                                int64_t max_blocks) {
  check_bwd("nllfused_emu::bwd", c10::DeviceType::CPU, grad_loss, grad_lse, logits, target,
            weight, lse, aux, label_smoothing, prob_target);
  const at::Tensor w = kernel_weight(weight);
  const at::Tensor wsum = weight_sum(w, prob_target);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  at::Tensor out = at::full({N, C, D}, 777.0, logits.options());
  LaunchConfig L{};
  with_params(logits, target, w, ignore_index, label_smoothing, logit_scale, softcap, prob_target,
              [&](auto x_tag, auto tgt_tag, auto p) {
    using scalar_t = decltype(x_tag);
    set_bwd_inputs(p, grad_loss, present(grad_lse), lse, aux, wsum);
    L = pick(bwd_launch<scalar_t>(p), p.R, C, 16 / static_cast<int>(sizeof(scalar_t)),
             force_tile, force_G, force_ty, max_blocks);
    emu_bwd_impl<scalar_t, decltype(tgt_tag)>(logits.data_ptr<scalar_t>(),
                                              out.data_ptr<scalar_t>(), p, L);
  });
  return {out, config_tensor(L)};
}

}  // namespace

TORCH_LIBRARY(nllfused_emu, m) {
  m.def(
      "fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float logit_scale, float softcap, bool prob_target, "
      "int force_tile, int force_G, int force_ty, int max_blocks) -> Tensor[]");
  m.def(
      "bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor aux, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, bool prob_target, int force_tile, int force_G, int force_ty, "
      "int max_blocks) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(nllfused_emu, CPU, m) {
  m.impl("fwd", &emu_fwd);
  m.impl("bwd", &emu_bwd);
}

#endif  // __CUDA_ARCH__
