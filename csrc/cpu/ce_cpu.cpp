// CPU backend of nllfused::ce_fwd / ce_bwd and ce_fwd_stats / ce_bwd_stats, the op layer:
// argument checks (csrc/checks.h, the contract in csrc/ops.cpp), outputs, and the choice of the
// kernels' copy for this CPU.
//
// The kernels (ce_cpu_kernels.h) are compiled once per instruction set (kernels.h): "default"
// (baseline x86-64 or whatever the compiler targets), "avx2" (AVX2 + FMA + F16C), "avx512"
// (AVX-512 F/BW/VL/DQ + FMA + F16C) and "avx512bf16" (that + AVX512_BF16), the SIMD ones on x86-64
// GCC builds only. Each call runs the best copy this CPU can run, or the one the environment
// variable NLLFUSED_CPU_CAPABILITY names (default | avx2 | avx512 | avx512bf16; read at load and
// by _C.reload_cpu_env(), csrc/cpu/settings.h, so tests can run each copy in turn). Which copies
// this machine can run and which one runs now: nllfused._C.build_info()["cpu_capabilities"] and
// ["cpu_capability"] (capabilities() and capability() below).
#include "kernels.h"
#include "output_cache.h"
#include "settings.h"

#include "../checks.h"
#include "../loss.h"

#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace nllfused_cpu {
namespace {

using at::Tensor;

struct Capability {
  const char* name;
  KernelFn forward, backward;
  bool supported;  // by this CPU (and its OS)
};

// Every copy this build has, baseline first, best last.
const std::vector<Capability>& all_capabilities() {
  static const std::vector<Capability> all = [] {
    std::vector<Capability> v{{"default", forward_default, backward_default, true}};
#if NLLF_CPU_X86_SIMD
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    v.push_back({"avx2", forward_avx2, backward_avx2, avx2});
    v.push_back({"avx512", forward_avx512, backward_avx512, avx512});
    v.push_back({"avx512bf16", forward_avx512bf16, backward_avx512bf16,
                 avx512 && __builtin_cpu_supports("avx512bf16")});
#endif
    return v;
  }();
  return all;
}

const Capability& active_capability() {
  const auto& all = all_capabilities();
  const std::string forced = setting(Setting::kCapability);
  if (forced.empty()) {
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->supported) return *it;
  }
  std::string names;
  for (const auto& c : all) {
    if (forced == c.name) {
      TORCH_CHECK(c.supported, "NLLFUSED_CPU_CAPABILITY=", forced,
                  ": this CPU cannot run that copy of the kernels; it can run ",
                  c10::Join(", ", capabilities()));
      return c;
    }
    names += names.empty() ? c.name : std::string(", ") + c.name;
  }
  TORCH_CHECK(false, "NLLFUSED_CPU_CAPABILITY=", forced, ": unknown, this build has ", names);
  return all.front();  // not reached
}

// The gradient is as large as the logits and written once: with 4 KiB pages its first touch costs
// a page fault every 4 KiB, which on our machines takes longer than the kernel itself. Buffers of
// this size come straight from mmap (glibc serves >= 32 MiB that way, its largest threshold), so
// asking for transparent huge pages affects nothing else; torch's THP_MEM_ALLOC_ENABLE does the
// same for all buffers. (A fresh 32 MiB gradient: 21 ms of page faults on one core, 4.6 ms with
// huge pages, on the 2-core AMD EPYC machine of the CPU benchmark.) On that machine, a VM, a
// fresh huge page is now and then far slower to fault in than a recycled 4 KiB one: right after
// torch's own cross_entropy freed its buffers, one bf16 (4096, 32000) backward in five took
// 400-700 ms instead of 60-90 (always 115-180 ms without huge pages). NLLFUSED_HUGE_PAGES=0 turns
// the hint off where such spikes cost more than the faults saved.
void prefer_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (nbytes < (size_t(32) << 20)) return;
  if (setting(Setting::kHugePages).rfind('0', 0) == 0) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), page = 4096;
  const uintptr_t b = (p + page - 1) & ~(page - 1), e = (p + nbytes) & ~(page - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

// The L1 data cache in bytes (32 KiB where the system does not say).
int64_t l1d_bytes() {
#if (defined(__unix__) || defined(__APPLE__)) && defined(_SC_LEVEL1_DCACHE_SIZE)
  const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  if (l1 > 0) return l1;
#endif
  return 32768;
}

// The logits / target / weight / option fields of Args, from checked arguments. `w` keeps the
// contiguous weights alive.
Args make_args(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
               Tensor& w, int64_t ignore_index, double label_smoothing, double logit_scale,
               double softcap, bool prob_target) {
  Args A{};
  A.N = logits.size(0); A.C = logits.size(1); A.D = logits.size(2);
  A.x = logits.data_ptr();
  A.xN = logits.stride(0); A.xC = logits.stride(1); A.xD = logits.stride(2);
  A.prob = prob_target;
  if (prob_target) {
    A.q = target.data_ptr(); A.qtype = target.scalar_type();
    A.qN = target.stride(0); A.qC = target.stride(1); A.qD = target.stride(2);
  } else {
    const auto tt = target.scalar_type();
    A.t = target.data_ptr(); A.tN = target.stride(0); A.tD = target.stride(1);
    A.tkind = tt == at::kLong ? 0 : tt == at::kInt ? 1 : 2;
  }
  A.w = nullptr; A.wsum = static_cast<double>(A.C);
  if (const Tensor* given = nllfused::present(weight)) {
    w = given->contiguous();  // already in the accumulation dtype (checked): used as it is
    A.w = w.data_ptr();
    // the backward's smoothing coefficient, in double: a loop (loss.h), where
    // w.sum(kDouble).item() -- two dispatcher calls and a tensor -- was a third of a 10-class
    // batch's whole call
    A.wsum = nllfused::one_call_ops::cpu_sum(w);
  }
  A.ignore_index = ignore_index; A.eps = label_smoothing;
  A.a = logit_scale; A.s = softcap;
  A.chunk = row_chunk(logits.scalar_type() == at::kDouble ? 8 : 4);
  return A;
}

// The most rows (N D) whose loss and aux forward() keeps in a buffer of its own (few, below).
constexpr int64_t kFewRows = 64;

// ce_fwd's outputs (loss, lse, aux), then with `stats` ce_fwd_stats's (entropy, target_logp,
// predicted), all from the kernels' one pass; entropy / predicted zeros unless want_ent /
// want_pred. With `sums` (Args::sums, kSums of them) and at most lane_max_classes(A) classes the
// lanes path adds the rows up itself: loss, aux and target_logp are then left undefined, not
// allocated, and entropy / predicted unless entropy_rows / predicted_rows. So does this
// function for at most kFewRows rows on the rows path without `stats` (`few`, below).
std::vector<Tensor> forward(const char* op, const Tensor& logits, const Tensor& target,
                            const std::optional<Tensor>& weight, int64_t ignore_index,
                            double label_smoothing, double logit_scale, double softcap,
                            bool prob_target, bool stats, bool want_ent = true,
                            bool want_pred = true, double* sums = nullptr,
                            bool entropy_rows = true, bool predicted_rows = true,
                            bool lean = false) {
  nllfused::check_devices(op, c10::DeviceType::CPU, logits,
                          {{"target", &target}, {"weight", nllfused::present(weight)}});
  nllfused::check_args(op, logits, target, weight, label_smoothing, prob_target);
  const Capability& cap = active_capability();
  Tensor w;
  Args A = make_args(logits, target, weight, w, ignore_index, label_smoothing, logit_scale,
                     softcap, prob_target);
  const auto acc = nllfused::acc_dtype(logits.scalar_type());
  A.sums = sums;
  A.stats = stats;  // (both before lane_max_classes, which weighs them)
  // NLLFUSED_CPU_LEAN_EXP=1: every forward may (tests/test_cpu_exp_accuracy.py measures the
  // lean exp2 on ce_fwd's lse, which it returns in float64)
  A.lean = lean || setting(Setting::kLeanExp) == "1";
  const bool rows = sums == nullptr || A.C > lane_max_classes(A);
  // A few rows on the rows path, summed (the one-call op's loss alone): their loss and aux in
  // `few` here, added up as the caller's cpu_sum would (block_sum: one block, the same bits),
  // not in two tensors the caller reduces -- ~0.5 us of a (4, 100) batch's forward of 3.8.
  alignas(64) double few[2][kFewRows];
  const bool in_few = rows && sums != nullptr && !stats && A.N * A.D <= kFewRows;
  auto rows_of = [&](bool keep, at::ScalarType dtype) {
    return (rows && !in_few) || keep ? cached_empty({A.N, A.D}, dtype) : Tensor();
  };
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  std::vector<Tensor> out{rows_of(false, acc), cached_empty({A.N, A.D}, at::kDouble),
                          rows_of(false, acc)};
  if (stats) {
    out.push_back(rows_of(entropy_rows, acc));
    out.push_back(rows_of(false, acc));
    out.push_back(rows_of(predicted_rows, at::kLong));
    A.ent = ptr(out[3]); A.tlp = ptr(out[4]);
    A.pred = static_cast<int64_t*>(ptr(out[5]));
    A.want_ent = want_ent; A.want_pred = want_pred;
  }
  A.loss = in_few ? few[0] : ptr(out[0]);
  A.aux = in_few ? few[1] : ptr(out[2]);
  A.lse = out[1].data_ptr();
  for (const Tensor& o : out)
    if (o.defined()) prefer_huge_pages(o);
  cap.forward(A, logits.scalar_type());  // (its rows path refuses rows left unallocated)
  if (in_few && sums[kSummed] == 0) {  // (kSummed 0: the rows were written, not added up)
    AT_DISPATCH_FLOATING_TYPES(acc, "nllfused_few_rows_sum", [&] {
      using nllfused::one_call_ops::block_sum;
      sums[kSumLoss] = block_sum(static_cast<const scalar_t*>(A.loss), A.N * A.D);
      sums[kSumAux] = block_sum(static_cast<const scalar_t*>(A.aux), A.N * A.D);
    });
    sums[kSummed] = 1;
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> ce_fwd_cpu(const Tensor& logits, const Tensor& target,
                                              const std::optional<Tensor>& weight,
                                              int64_t ignore_index, double label_smoothing,
                                              double logit_scale, double softcap,
                                              bool prob_target) {
  auto o = forward("nllfused::ce_fwd (CPU)", logits, target, weight, ignore_index,
                   label_smoothing, logit_scale, softcap, prob_target, false);
  return {o[0], o[1], o[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ce_fwd_stats_cpu(
    const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double logit_scale, double softcap,
    bool prob_target, bool with_entropy, bool with_predicted) {
  auto o = forward("nllfused::ce_fwd_stats (CPU)", logits, target, weight, ignore_index,
                   label_smoothing, logit_scale, softcap, prob_target, true, with_entropy,
                   with_predicted);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

// ce_bwd, and with `entropy` given ce_bwd_stats (grad_entropy / grad_target_logp may be None).
// in_place: the gradient over the logits (ce_bwd_inplace), when they are contiguous: every
// kernel path reads a logit before it stores that logit's gradient, and reads the true class's
// logit (row_grad) before the row's first store, so x and out may be one buffer when their
// layouts agree. Other layouts go through a new buffer and a copy.
// like_logits (ce_bwd_like_logits_cpu): logits whose rows have unit stride but are not adjacent
// -- (B, V, T) from logits.transpose(1, 2), channels-last with many classes -- get a gradient
// in their own strides, each row written where it was read (the rows path). The contiguous
// (N, C, D) gradient took the tiles path's scatter, then autograd's copy into the input's
// strides: (4, 32000, 512) bf16 forward+backward 340 ms, against 12 ms flattened.
Tensor backward(const char* op, const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                const std::optional<Tensor>& grad_entropy,
                const std::optional<Tensor>& grad_target_logp, const Tensor& logits,
                const Tensor& target, const std::optional<Tensor>& weight, const Tensor& lse,
                const Tensor& aux, const Tensor* entropy, int64_t ignore_index,
                double label_smoothing, double logit_scale, double softcap, bool prob_target,
                bool in_place = false, bool gent_counted = false, bool like_logits = false) {
  const Tensor* gs = nllfused::present(grad_lse);
  const Tensor* ge = nllfused::present(grad_entropy);
  const Tensor* gt = nllfused::present(grad_target_logp);
  nllfused::check_bwd(op, c10::DeviceType::CPU, grad_loss, grad_lse, logits, target, weight, lse,
                      aux, label_smoothing, prob_target);
  if (entropy != nullptr)
    nllfused::check_bwd_stats(op, c10::DeviceType::CPU, logits, grad_entropy, grad_target_logp,
                              *entropy);
  const Capability& cap = active_capability();
  Tensor w;
  Args A = make_args(logits, target, weight, w, ignore_index, label_smoothing, logit_scale,
                     softcap, prob_target);
  A.gl = grad_loss.data_ptr(); A.gN = grad_loss.stride(0); A.gD = grad_loss.stride(1);
  if (gs != nullptr) {
    A.glse = gs->data_ptr<double>(); A.glN = gs->stride(0); A.glD = gs->stride(1);
  }
  A.lse_in = lse.data_ptr(); A.lN = lse.stride(0); A.lD = lse.stride(1);
  A.aux_in = aux.data_ptr(); A.aN = aux.stride(0); A.aD = aux.stride(1);
  if (ge != nullptr || gt != nullptr) {  // the kernels read H whenever either is given
    A.ent_in = entropy->data_ptr(); A.eN = entropy->stride(0); A.eD = entropy->stride(1);
  }
  if (ge != nullptr) { A.gent = ge->data_ptr(); A.geN = ge->stride(0); A.geD = ge->stride(1); }
  A.gent_counted = gent_counted && !prob_target;
  if (gt != nullptr) { A.gtlp = gt->data_ptr(); A.gtN = gt->stride(0); A.gtD = gt->stride(1); }
  const bool over = in_place && logits.is_contiguous();
  // (the rows path, or with few classes the lanes path's scatter, writes it)
  A.out_like_x = like_logits && !over && A.xC == 1 && A.D > 1 &&
                 logits.is_non_overlapping_and_dense();
  // (dense: a buffer of numel elements holds them, as the cache's contiguous ones)
  Tensor out = over ? logits
               : A.out_like_x
                   ? cached_empty({logits.numel()}, logits.scalar_type())
                         .as_strided(logits.sizes(), logits.strides())
                   : cached_empty({A.N, A.C, A.D}, logits.scalar_type());  // contiguous
  A.out = out.data_ptr();
  if (!over) prefer_huge_pages(out);
  cap.backward(A, logits.scalar_type());
  if (in_place && !over) logits.copy_(out);
  return out;
}

Tensor ce_bwd_cpu(const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                  const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                  const Tensor& lse, const Tensor& aux, int64_t ignore_index,
                  double label_smoothing, double logit_scale, double softcap, bool prob_target) {
  return backward("nllfused::ce_bwd (CPU)", grad_loss, grad_lse, std::nullopt, std::nullopt,
                  logits, target, weight, lse, aux, nullptr, ignore_index, label_smoothing,
                  logit_scale, softcap, prob_target);
}

void ce_bwd_inplace_cpu(const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                        const Tensor& logits, const Tensor& target,
                        const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& aux,
                        int64_t ignore_index, double label_smoothing, double logit_scale,
                        double softcap, bool prob_target) {
  backward("nllfused::ce_bwd_inplace (CPU)", grad_loss, grad_lse, std::nullopt, std::nullopt,
           logits, target, weight, lse, aux, nullptr, ignore_index, label_smoothing, logit_scale,
           softcap, prob_target, true);
}

Tensor ce_bwd_stats_cpu(const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                        const std::optional<Tensor>& grad_entropy,
                        const std::optional<Tensor>& grad_target_logp, const Tensor& logits,
                        const Tensor& target, const std::optional<Tensor>& weight,
                        const Tensor& lse, const Tensor& aux, const Tensor& entropy,
                        int64_t ignore_index, double label_smoothing, double logit_scale,
                        double softcap, bool prob_target) {
  return backward("nllfused::ce_bwd_stats (CPU)", grad_loss, grad_lse, grad_entropy,
                  grad_target_logp, logits, target, weight, lse, aux, &entropy, ignore_index,
                  label_smoothing, logit_scale, softcap, prob_target);
}

}  // namespace

SummedForward ce_fwd_summed_cpu(const Tensor& logits, const Tensor& target,
                                const std::optional<Tensor>& weight, int64_t ignore_index,
                                double label_smoothing, double logit_scale, double softcap,
                                bool lean) {
  double sums[kSums] = {};
  auto o = forward("nllfused::cross_entropy_loss (CPU)", logits, target, weight, ignore_index,
                   label_smoothing, logit_scale, softcap, false, false, true, true, sums, true,
                   true, lean);
  return {o[0], o[1], o[2], sums[kSumLoss], sums[kSumAux],
          sums[kSummed] != 0};  // summed: what the kernels did
}

Tensor ce_bwd_like_logits_cpu(const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                              const Tensor& logits, const Tensor& target,
                              const std::optional<Tensor>& weight, const Tensor& lse,
                              const Tensor& aux, int64_t ignore_index, double label_smoothing,
                              double logit_scale, double softcap, bool prob_target) {
  return backward("nllfused::ce_bwd (CPU)", grad_loss, grad_lse, std::nullopt, std::nullopt,
                  logits, target, weight, lse, aux, nullptr, ignore_index, label_smoothing,
                  logit_scale, softcap, prob_target, false, false, true);
}

Tensor ce_bwd_stats_like_logits_cpu(const Tensor& grad_loss,
                                    const std::optional<Tensor>& grad_entropy,
                                    const std::optional<Tensor>& grad_target_logp,
                                    const Tensor& logits, const Tensor& target,
                                    const std::optional<Tensor>& weight, const Tensor& lse,
                                    const Tensor& aux, const Tensor& entropy,
                                    int64_t ignore_index, double label_smoothing) {
  return backward("nllfused::ce_bwd_stats (CPU)", grad_loss, std::nullopt, grad_entropy,
                  grad_target_logp, logits, target, weight, lse, aux, &entropy, ignore_index,
                  label_smoothing, 1.0, 0.0, false, false, false, true);
}

SummedStatsForward ce_fwd_stats_summed_cpu(const Tensor& logits, const Tensor& target,
                                           const std::optional<Tensor>& weight,
                                           int64_t ignore_index, double label_smoothing,
                                           bool want_ent, bool want_pred, bool entropy_rows,
                                           bool predicted_rows) {
  double s[kSums] = {};
  auto o = forward("nllfused::cross_entropy_loss_stats (CPU)", logits, target, weight,
                   ignore_index, label_smoothing, 1.0, 0.0, false, true, want_ent, want_pred, s,
                   entropy_rows, predicted_rows);
  return {o[0], o[1], o[2], o[3], o[4], o[5],
          s[kSumLoss], s[kSumAux], s[kSumLse], s[kSumZLoss], s[kSumEntropy], s[kSumTargetLogp],
          s[kSumHits], s[kSumCounted], s[kSummed] != 0};
}

Tensor ce_bwd_stats_counted_cpu(const Tensor& grad_loss,
                                const std::optional<Tensor>& grad_entropy,
                                const std::optional<Tensor>& grad_target_logp,
                                const Tensor& logits, const Tensor& target,
                                const std::optional<Tensor>& weight, const Tensor& lse,
                                const Tensor& aux, const Tensor& entropy, int64_t ignore_index,
                                double label_smoothing) {
  return backward("nllfused::cross_entropy_loss_stats (CPU backward)", grad_loss, std::nullopt,
                  grad_entropy, grad_target_logp, logits, target, weight, lse, aux, &entropy,
                  ignore_index, label_smoothing, 1.0, 0.0, false, false, true, true);
}

std::vector<std::string> capabilities() {
  std::vector<std::string> names;
  for (const auto& c : all_capabilities())
    if (c.supported) names.emplace_back(c.name);
  return names;
}

std::string capability() { return active_capability().name; }

int64_t row_chunk(int64_t acc_size) {
  const std::string env = setting(Setting::kChunk);
  if (!env.empty()) {
    char* end = nullptr;
    const long long v = std::strtoll(env.c_str(), &end, 10);
    TORCH_CHECK(*end == '\0' && v >= 64 && v <= kMaxRowChunk && v % 64 == 0,
                "NLLFUSED_CPU_CHUNK must be a multiple of 64 from 64 to ", kMaxRowChunk,
                " (classes per chunk of the CPU forward's rows), got '", env, "'");
    return v;
  }
  static const int64_t bytes = [] {
    int64_t b = 8192;
    while (2 * b <= l1d_bytes() * 2 / 3 && 2 * b <= 32768) b *= 2;
    return b;
  }();
  return bytes / acc_size;
}

}  // namespace nllfused_cpu

TORCH_LIBRARY_IMPL(nllfused, CPU, m) {
  m.impl("ce_fwd", &nllfused_cpu::ce_fwd_cpu);
  m.impl("ce_bwd", &nllfused_cpu::ce_bwd_cpu);
  m.impl("ce_bwd_inplace", &nllfused_cpu::ce_bwd_inplace_cpu);
  m.impl("ce_fwd_stats", &nllfused_cpu::ce_fwd_stats_cpu);
  m.impl("ce_bwd_stats", &nllfused_cpu::ce_bwd_stats_cpu);
}
