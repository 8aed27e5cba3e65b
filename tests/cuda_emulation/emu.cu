// Host emulation of the CUDA backend (csrc/cuda/ce_cuda.cu), for machines without a GPU.
//
// The real .cu file is #included, and the kernels' per-thread __host__ __device__ functions
// (fwd_row_partial, fwd_strided_partial, merge, fwd_finish, make_bwd_row, bwd_row_part,
// bwd_strided_part, ...) run on the CPU under a simulated launch: every block of the grid
// (grid-stride loops included), every thread of a G-thread row group or a (32, TY) tile, the
// butterfly shuffles of group_reduce (lane i merges with lane i ^ off) and the serial
// cross-warp merge of block_reduce, in the kernels' order. The launch configuration comes from
// the real choose_launch() and make_params(); tests may force one (every G, the tile
// mapping, any TY, a tiny grid). Outputs start as sentinels, so an unwritten element fails.
//
// Not covered here: device-only code (shuffles, __syncthreads, shared memory), the device
// math (__expf etc.), and the host entry points ce_fwd_cuda / ce_bwd_cuda. Those are checked
// by compiling the real extension and by the GPU tests.
//
// Built by tests/test_cuda_emulation.py through torch.utils.cpp_extension.load (nvcc, so the
// CUDA syntax parses; the emulation itself is host code). Two macros are neutralised while
// ce_cuda.cu is included, so that loading this library next to nllfused._C is harmless and
// the build is quick:
//  * TORCH_LIBRARY_IMPL: the real CUDA kernels of nllfused::ce_fwd / ce_bwd must not be
//    (re-)registered from here;
//  * AT_DISPATCH_FLOATING_TYPES_AND2: inside ce_fwd_cuda / ce_bwd_cuda it would instantiate
//    and device-compile all 64 kernels, which the emulation never launches.
// The ops are registered as nllfused_emu::fwd / nllfused_emu::bwd.
//
// Everything is host code, so nvcc's device pass (__CUDA_ARCH__ defined) sees an empty file:
// no kernel is instantiated, and parsing the ATen headers a second time would double the build.
#ifndef __CUDA_ARCH__
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#pragma push_macro("TORCH_LIBRARY_IMPL")
#pragma push_macro("AT_DISPATCH_FLOATING_TYPES_AND2")
#undef TORCH_LIBRARY_IMPL
#undef AT_DISPATCH_FLOATING_TYPES_AND2
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void nllfused_emu_unregistered_impl(torch::Library& m)
#define AT_DISPATCH_FLOATING_TYPES_AND2(...) ((void)0)
#include "../../csrc/cuda/ce_cuda.cu"
#pragma pop_macro("AT_DISPATCH_FLOATING_TYPES_AND2")
#pragma pop_macro("TORCH_LIBRARY_IMPL")

namespace {

using namespace nllfused::cuda_impl;

// force_tile: -1 choose_launch's pick, 0 rows mapping with G = force_G (when the input allows
// it), 1 tile mapping. force_ty > 0: the tile's TY. max_blocks > 0: cap the grid.
LaunchConfig pick(int64_t R, int64_t C, bool rows_ok, int vec, int64_t force_tile,
                  int64_t force_G, int64_t force_ty, int64_t max_blocks) {
  LaunchConfig L = choose_launch(R, C, rows_ok, vec);
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
void emu_fwd_impl(const scalar_t* x, const CEParams<at::acc_type<scalar_t, true>>& p,
                  const LaunchConfig& L) {
  using acc_t = at::acc_type<scalar_t, true>;
  if (L.tile) {  // ce_fwd_tile_kernel
    const int TY = L.tile_y;
    std::vector<Stats<acc_t>> part(TY);
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int64_t rbase = blk * 32; rbase < p.R; rbase += L.blocks * 32)
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t r = rbase + lane;
          const bool active = r < p.R;
          const int64_t rr = active ? r : 0, n = rr / p.D, d = rr % p.D;
          const scalar_t* xrow = x + n * p.sN + d * p.sD;
          const int64_t qoff = n * p.tN + d * p.tD;
          for (int ty = 0; ty < TY; ++ty)
            part[ty] = fwd_strided_partial<scalar_t, tgt_t>(p, xrow, active ? p.C : 0, qoff,
                                                            ty, TY);
          if (!active) continue;
          Stats<acc_t> s = part[0];
          for (int k = 1; k < TY; ++k) s = merge(s, part[k]);
          fwd_finish<scalar_t, tgt_t>(p, xrow, r, n, d, s);
        }
  } else {  // ce_fwd_rows_kernel
    const int G = L.G, rpb = L.threads / G;
    std::vector<Stats<acc_t>> s(G);
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int64_t rbase = blk * rpb; rbase < p.R; rbase += L.blocks * rpb)
        for (int grp = 0; grp < rpb; ++grp) {
          const int64_t r = rbase + grp;
          const bool active = r < p.R;
          const int64_t rr = active ? r : 0, n = rr / p.D, d = rr % p.D;
          const scalar_t* xrow = x + n * p.sN + d * p.sD;
          const int64_t qoff = n * p.tN + d * p.tD;
          for (int tid = 0; tid < G; ++tid)
            s[tid] = fwd_row_partial<scalar_t, tgt_t>(p, xrow, active ? p.C : 0, qoff, tid, G);
          const Stats<acc_t> red = emu_reduce(s, G);
          if (active) fwd_finish<scalar_t, tgt_t>(p, xrow, r, n, d, red);
        }
  }
}

template <typename scalar_t, typename tgt_t>
void emu_bwd_impl(const scalar_t* x, scalar_t* out,
                  const CEParams<at::acc_type<scalar_t, true>>& p, const LaunchConfig& L) {
  using acc_t = at::acc_type<scalar_t, true>;
  if (L.tile) {  // ce_bwd_tile_kernel
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int lane = 0; lane < 32; ++lane)
        for (int64_t r = blk * 32 + lane; r < p.R; r += L.blocks * 32) {
          const int64_t n = r / p.D, d = r % p.D;
          const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, n, d);
          for (int ty = 0; ty < L.tile_y; ++ty)
            bwd_strided_part<scalar_t, tgt_t>(p, b, x + n * p.sN + d * p.sD,
                                              out + n * p.C * p.D + d, p.D, ty, L.tile_y);
        }
  } else {  // ce_bwd_rows_kernel
    const int G = L.G, rpb = L.threads / G;
    for (int64_t blk = 0; blk < L.blocks; ++blk)
      for (int grp = 0; grp < rpb; ++grp)
        for (int64_t r = blk * rpb + grp; r < p.R; r += L.blocks * rpb) {
          const int64_t n = r / p.D, d = r % p.D;
          const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, n, d);
          for (int tid = 0; tid < G; ++tid)
            bwd_row_part<scalar_t, tgt_t>(p, b, x + n * p.sN + d * p.sD, out + r * p.C, tid, G);
        }
  }
}

template <typename F>
void emu_dispatch_target(const at::Tensor& target, bool prob, F&& f) {
  if (prob) {
    f(ProbTarget{});
    return;
  }
  switch (target.scalar_type()) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kByte: f(uint8_t{}); break;
    default: TORCH_CHECK(false, "emu: unsupported index target dtype ", target.scalar_type());
  }
}

void check_cpu(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), "emu: CPU tensors only");
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) >= 1, "emu: logits must be (N, C >= 1, D)");
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
  check_cpu(logits, target);
  at::Tensor w;
  if (weight.has_value() && weight->defined()) w = weight->contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  at::Tensor loss = at::full({N, D}, 12345.0, opts);
  at::Tensor lse = at::full({N, D}, 12345.0, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::full({N, D}, 12345.0, opts);
  LaunchConfig L{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "emu_fwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    CEParams<acc_t> p = make_params<acc_t>(logits, target, w, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    const bool rows_ok = p.sC == 1 || C == 1;  // as in ce_fwd_cuda
    L = pick(p.R, C, rows_ok, 16 / static_cast<int>(sizeof(scalar_t)), force_tile, force_G,
             force_ty, max_blocks);
    emu_dispatch_target(target, prob_target, [&](auto tag) {
      emu_fwd_impl<scalar_t, decltype(tag)>(logits.data_ptr<scalar_t>(), p, L);
    });
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
  check_cpu(logits, target);
  const auto acc = acc_dtype_of(logits.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kDouble, "emu: lse must be float64");
  TORCH_CHECK(grad_loss.scalar_type() == acc && aux.scalar_type() == acc,
              "emu: grad_loss and aux must be in the accumulation dtype");
  at::Tensor w, wsum;
  if (weight.has_value() && weight->defined()) {
    w = weight->contiguous();
    if (!prob_target) wsum = w.sum(at::kDouble);  // as in ce_bwd_cuda
  }
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  at::Tensor out = at::full({N, C, D}, 777.0, logits.options());
  LaunchConfig L{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "emu_bwd", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    CEParams<acc_t> p = make_params<acc_t>(logits, target, w, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    p.weight_sum = wsum.defined() ? wsum.data_ptr<double>() : nullptr;
    if (grad_lse.has_value() && grad_lse->defined()) {
      TORCH_CHECK(grad_lse->scalar_type() == at::kDouble, "emu: grad_lse must be float64");
      p.grad_lse = grad_lse->data_ptr<double>();
      p.glN = grad_lse->stride(0);
      p.glD = grad_lse->stride(1);
    }
    p.grad = grad_loss.data_ptr<acc_t>();
    p.gN = grad_loss.stride(0);
    p.gD = grad_loss.stride(1);
    p.lse_in = lse.data_ptr<double>();
    p.lN = lse.stride(0);
    p.lD = lse.stride(1);
    p.aux_in = aux.data_ptr<acc_t>();
    p.aN = aux.stride(0);
    p.aD = aux.stride(1);
    const bool rows_ok = (p.sC == 1 || C == 1) && D == 1;  // as in ce_bwd_cuda
    L = pick(p.R, C, rows_ok, 16 / static_cast<int>(sizeof(scalar_t)), force_tile, force_G,
             force_ty, max_blocks);
    emu_dispatch_target(target, prob_target, [&](auto tag) {
      emu_bwd_impl<scalar_t, decltype(tag)>(logits.data_ptr<scalar_t>(),
                                            out.data_ptr<scalar_t>(), p, L);
    });
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
