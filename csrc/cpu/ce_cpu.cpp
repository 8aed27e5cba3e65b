// CPU backend of nllfused::ce_fwd / ce_bwd. The contract is in csrc/ops.cpp, the maths in GUIDE §1.
//
// How it works
// - One row r = (n, d) of the (N, C, D) logits at a time, rows split over threads with
//   at::parallel_for. The row is walked in chunks of classes small enough to stay in L1: a first
//   sweep over a chunk loads it (converting bf16/fp16, applying logit_scale/softcap into a small
//   buffer when needed) and takes its max; a second sweep, from L1, adds exp(z - m) into an online
//   softmax (running max m, sum d rescaled when m grows) together with the smoothing / soft-target
//   sums. So the forward reads the logits from memory once with one exp per element, and the
//   backward (p = exp(z - lse) with the saved float64 lse) reads them once and writes the
//   gradient once. Nothing the size of the logits is allocated but the gradient itself.
// - Rows whose classes are not unit-stride (D > 1 layouts, transposed inputs) go through the same
//   per-row code on tiles of kTile neighbouring rows gathered into a buffer, so that the loads of
//   one class for the tile's rows share cache lines; the backward scatters the tile back the same way.
// - Accumulation is in float32 (float64 for float64 logits). The smoothing / soft-target sum
//   sum_c g_c (lse - z_c) is kept as B = sum_c g_c (z_c - m) <= 0 (rescaled with m), never as
//   lse*sum(g) - sum(g z), which would cancel catastrophically for logits ~ 1e4.
// - Vectorisation uses ATen's at::vec::Vectorized. In an extension ATen's vec headers only give
//   the scalar DEFAULT version (CPU_CAPABILITY is set per file only inside libtorch), so on
//   x86-64/GCC the kernels are compiled twice from this one file: once for the baseline ISA (width 1,
//   ScalarVec below) and once, with Vectorized in a private CPU_CAPABILITY namespace, under
//   `#pragma GCC target("avx2,fma,f16c")`; the ops pick one at run time from the CPU's features.
//   The file includes itself ("Part 2" below) to get the two copies without duplicating the code.
//   Elsewhere (clang, aarch64) only the baseline copy is built.
#ifndef NLLF_KERNELS
// =================================== Part 1: ops, dispatch ===================================
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
// What ATen/cpu/vec/vec.h pulls in besides the vector classes, included first so that it is
// compiled for the baseline ISA and not inside the AVX2 region below.
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#ifdef __linux__
#include <sys/mman.h>
#endif

// VECTOR_WIDTH: vec_base.h was already included (by a future torch header), in the DEFAULT flavour.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(NLLFUSED_CPU_NO_AVX2) && !defined(VECTOR_WIDTH)
#define NLLF_HAVE_AVX2 1
// ATen's AVX2 Vectorized in our own namespace (at::vec::nllfused_avx2), so that nothing here can
// be confused with libtorch's copies; every function of these headers is compiled for AVX2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY nllfused_avx2
#define CPU_CAPABILITY_AVX2
// sleef.h declares its 256-bit functions (which Vectorized's exp/tanh/... call in libtorch) only
// under __AVX__, a macro the target pragma does not set.
#ifndef __AVX__
#define __AVX__ 1
#include <sleef.h>
#undef __AVX__
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#pragma GCC pop_options
#else
#define NLLF_HAVE_AVX2 0
#endif

namespace nllfused_cpu {

// The baseline "vector": one lane, the subset of at::vec::Vectorized the kernels use.
template <typename T>
struct ScalarVec {
  T v;
  ScalarVec() = default;
  ScalarVec(T x) : v(x) {}
  static constexpr int64_t size() { return 1; }
  static ScalarVec loadu(const void* p) { return ScalarVec(*static_cast<const T*>(p)); }
  void store(void* p) const { *static_cast<T*>(p) = v; }
  ScalarVec exp_u20() const { return ScalarVec(std::exp(v)); }
  ScalarVec tanh() const { return ScalarVec(std::tanh(v)); }
  ScalarVec eq(ScalarVec b) const { return ScalarVec(v == b.v ? T(1) : T(0)); }  // as Vectorized
  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return ScalarVec(a.v + b.v); }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return ScalarVec(a.v - b.v); }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return ScalarVec(a.v * b.v); }
};
template <typename T>
ScalarVec<T> fmadd(ScalarVec<T> a, ScalarVec<T> b, ScalarVec<T> c) { return ScalarVec<T>(a.v * b.v + c.v); }
template <typename T>
ScalarVec<T> maximum(ScalarVec<T> a, ScalarVec<T> b) {  // propagates NaN, like at::vec::maximum
  return (a.v != a.v || a.v > b.v) ? a : b;
}

// Everything a kernel needs, strides in elements. Pointers are typed by the kernel.
struct Args {
  int64_t N, C, D;
  const void* x; int64_t xN, xC, xD;             // logits (N, C, D)
  const void* t; int64_t tN, tD; int tkind;      // index targets (N, D): 0 int64, 1 int32, 2 uint8
  const void* q; int64_t qN, qC, qD;             // probability targets (N, C, D)
  at::ScalarType qtype;
  const void* w; double wsum;                    // weights (C,) in the accumulation dtype, or null
  int64_t ignore_index; double eps, a, s; bool prob;
  void *loss, *lse, *aux;                        // forward outputs, contiguous (N, D)
  const void* gl; int64_t gN, gD;                // backward inputs (N, D)
  const double* glse; int64_t glN, glD;          // grad_lse (N, D) float64, or null
  const void* lse_in; int64_t lN, lD;
  const void* aux_in; int64_t aN, aD;
  void* out;                                     // backward output, contiguous (N, C, D)
};

namespace generic { template <typename T> using Vec = ScalarVec<T>; }
}  // namespace nllfused_cpu

#define NLLF_KERNELS generic
#define NLLF_VEC_AVX2 0
#include "ce_cpu.cpp"
#undef NLLF_KERNELS
#undef NLLF_VEC_AVX2

#if NLLF_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace nllfused_cpu::avx2 { template <typename T> using Vec = at::vec::Vectorized<T>; }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
static_assert(std::is_convertible_v<at::vec::Vectorized<float>, __m256>,
              "ATen's vec headers were included before the AVX2 region: Vectorized is not AVX2");
#pragma GCC diagnostic pop
#define NLLF_KERNELS avx2
#define NLLF_VEC_AVX2 1
#include "ce_cpu.cpp"
#undef NLLF_KERNELS
#undef NLLF_VEC_AVX2
#pragma GCC pop_options
#endif

namespace nllfused_cpu {
namespace {

using at::Tensor;

bool use_avx2() {
#if NLLF_HAVE_AVX2 && !defined(NLLFUSED_CPU_FORCE_GENERIC)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// The gradient is as large as the logits and written once: with 4 KiB pages its first touch costs
// a page fault every 4 KiB, which on our machines takes longer than the kernel itself. Buffers of
// this size come straight from mmap (glibc serves >= 32 MiB that way), so asking for transparent
// huge pages affects nothing else; torch's THP_MEM_ALLOC_ENABLE does the same for all buffers.
void prefer_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = t.nbytes();
  if (nbytes < (size_t(64) << 20)) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), page = 4096;
  const uintptr_t b = (p + page - 1) & ~(page - 1), e = (p + nbytes) & ~(page - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)t;
#endif
}

at::ScalarType acc_type(const Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by both ops; fills the logits / target / weight / option fields of Args.
// `w_acc` keeps the weights converted to the accumulation dtype alive.
Args make_args(const char* op, const Tensor& logits, const Tensor& target,
               const std::optional<Tensor>& weight, Tensor& w_acc, int64_t ignore_index,
               double label_smoothing, double logit_scale, double softcap, bool prob_target) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (N, C, D), got ", logits.dim(),
              " dims with shape ", logits.sizes());
  const auto xt = logits.scalar_type();
  TORCH_CHECK(xt == at::kHalf || xt == at::kBFloat16 || xt == at::kFloat || xt == at::kDouble, op,
              ": logits must be float16, bfloat16, float32 or float64, got ", xt);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  TORCH_CHECK(C >= 1, op, ": logits need at least one class (C >= 1), got shape ", logits.sizes());
  TORCH_CHECK(target.device().is_cpu(), op, ": target must be a CPU tensor, got ", target.device());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  Args A{};
  A.N = N; A.C = C; A.D = D;
  A.x = logits.data_ptr();
  A.xN = logits.stride(0); A.xC = logits.stride(1); A.xD = logits.stride(2);
  A.prob = prob_target;
  if (prob_target) {
    const auto qt = target.scalar_type();
    TORCH_CHECK(target.dim() == 3 && target.sizes() == logits.sizes(), op,
                ": probability targets must have the logits' shape ", logits.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(qt == at::kHalf || qt == at::kBFloat16 || qt == at::kFloat || qt == at::kDouble,
                op, ": probability targets must be floating point, got ", qt);
    A.q = target.data_ptr(); A.qtype = qt;
    A.qN = target.stride(0); A.qC = target.stride(1); A.qD = target.stride(2);
  } else {
    const auto tt = target.scalar_type();
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": index targets must be (N, D) = (", N, ", ", D, "), got ", target.sizes());
    TORCH_CHECK(tt == at::kLong || tt == at::kInt || tt == at::kByte, op,
                ": index targets must be int64, int32 or uint8, got ", tt);
    A.t = target.data_ptr(); A.tN = target.stride(0); A.tD = target.stride(1);
    A.tkind = tt == at::kLong ? 0 : tt == at::kInt ? 1 : 2;
  }
  A.w = nullptr; A.wsum = static_cast<double>(C);
  if (weight.has_value() && weight->defined()) {
    const Tensor& w = *weight;
    TORCH_CHECK(w.device().is_cpu(), op, ": weight must be a CPU tensor, got ", w.device());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": weight must be (C,) = (", C, ",), got ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == acc_type(logits), op, ": weight must be ", acc_type(logits),
                " (the accumulation dtype of ", logits.scalar_type(), " logits), got ",
                w.scalar_type());
    w_acc = w.contiguous();
    A.w = w_acc.data_ptr();
    A.wsum = w.sum(at::kDouble).item<double>();  // the backward's smoothing coefficient
  }
  A.ignore_index = ignore_index; A.eps = label_smoothing;
  A.a = logit_scale; A.s = softcap;
  return A;
}

void check_rowwise(const char* op, const char* name, const Tensor& t, const Tensor& logits,
                   bool is_lse = false) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == logits.size(0) && t.size(1) == logits.size(2), op, ": ",
              name, " must be (N, D) = (", logits.size(0), ", ", logits.size(2), "), got ",
              t.sizes());
  const auto want = is_lse ? at::kDouble : acc_type(logits);  // lse is float64 (csrc/ops.cpp)
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, " (for ",
              logits.scalar_type(), " logits), got ", t.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> ce_fwd_cpu(const Tensor& logits, const Tensor& target,
                                              const std::optional<Tensor>& weight,
                                              int64_t ignore_index, double label_smoothing,
                                              double logit_scale, double softcap,
                                              bool prob_target) {
  Tensor w_acc;
  Args A = make_args("ce_fwd", logits, target, weight, w_acc, ignore_index, label_smoothing,
                     logit_scale, softcap, prob_target);
  const auto opts = logits.options().dtype(acc_type(logits));
  Tensor loss = at::empty({A.N, A.D}, opts),
         lse = at::empty({A.N, A.D}, logits.options().dtype(at::kDouble)),
         aux = at::empty({A.N, A.D}, opts);
  A.loss = loss.data_ptr(); A.lse = lse.data_ptr(); A.aux = aux.data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd_cpu", [&] {
#if NLLF_HAVE_AVX2
    if (use_avx2()) return avx2::Ce<scalar_t>::forward(A);
#endif
    generic::Ce<scalar_t>::forward(A);
  });
  return {loss, lse, aux};
}

Tensor ce_bwd_cpu(const Tensor& grad_loss, const std::optional<Tensor>& grad_lse,
                  const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                  const Tensor& lse, const Tensor& aux, int64_t ignore_index,
                  double label_smoothing, double logit_scale, double softcap, bool prob_target) {
  Tensor w_acc;
  Args A = make_args("ce_bwd", logits, target, weight, w_acc, ignore_index, label_smoothing,
                     logit_scale, softcap, prob_target);
  check_rowwise("ce_bwd", "grad_loss", grad_loss, logits);
  check_rowwise("ce_bwd", "lse", lse, logits, /*is_lse=*/true);
  check_rowwise("ce_bwd", "aux", aux, logits);
  A.gl = grad_loss.data_ptr(); A.gN = grad_loss.stride(0); A.gD = grad_loss.stride(1);
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_rowwise("ce_bwd", "grad_lse", *grad_lse, logits, /*is_lse=*/true);
    A.glse = grad_lse->data_ptr<double>(); A.glN = grad_lse->stride(0); A.glD = grad_lse->stride(1);
  }
  A.lse_in = lse.data_ptr(); A.lN = lse.stride(0); A.lD = lse.stride(1);
  A.aux_in = aux.data_ptr(); A.aN = aux.stride(0); A.aD = aux.stride(1);
  Tensor out = at::empty({A.N, A.C, A.D}, logits.options());  // contiguous, logits' dtype
  A.out = out.data_ptr();
  prefer_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_bwd_cpu", [&] {
#if NLLF_HAVE_AVX2
    if (use_avx2()) return avx2::Ce<scalar_t>::backward(A);
#endif
    generic::Ce<scalar_t>::backward(A);
  });
  return out;
}

}  // namespace
}  // namespace nllfused_cpu

TORCH_LIBRARY_IMPL(nllfused, CPU, m) {
  m.impl("ce_fwd", &nllfused_cpu::ce_fwd_cpu);
  m.impl("ce_bwd", &nllfused_cpu::ce_bwd_cpu);
}

#else  // NLLF_KERNELS
// ============== Part 2: the kernels, compiled once per ISA (namespace NLLF_KERNELS) ==============
namespace nllfused_cpu::NLLF_KERNELS {

template <typename scalar_t>
struct Ce {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  static constexpr int64_t W = V::size();    // lanes
  static constexpr int64_t W2 = 2 * W;       // elements per inner-loop step (two vectors: ILP)
  static constexpr int64_t kChunk = 2048;    // classes per L1-resident chunk (unit class stride)
  static constexpr int64_t kTile = 16;       // rows per tile (strided classes)
  static constexpr int64_t kTileChunk = 256; // classes per tile chunk
  static constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  static constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

  // ---------------------------------- loads, stores, reductions ----------------------------------
  template <typename src_t>
  static inline void load2(const src_t* p, V& a, V& b) {
    if constexpr (std::is_same_v<src_t, acc_t>) {
      a = V::loadu(p);
      b = V::loadu(p + W);
    } else {
#if NLLF_VEC_AVX2
      at::vec::load_to_float(p, a, b);  // 16 bf16/fp16 -> 2 x 8 float
#else
      acc_t t[W2];
      for (int64_t i = 0; i < W2; ++i) t[i] = static_cast<acc_t>(p[i]);
      a = V::loadu(t);
      b = V::loadu(t + W);
#endif
    }
  }
  template <typename src_t>
  static inline void load2_tail(const src_t* p, int64_t n, acc_t fill, V& a, V& b) {
    acc_t t[W2];
    for (int64_t i = 0; i < W2; ++i) t[i] = i < n ? static_cast<acc_t>(p[i]) : fill;
    a = V::loadu(t);
    b = V::loadu(t + W);
  }
  template <typename dst_t>
  static inline void store2(dst_t* p, V a, V b) {
    if constexpr (std::is_same_v<dst_t, acc_t>) {
      a.store(p);
      b.store(p + W);
    } else {
#if NLLF_VEC_AVX2
      at::vec::convert_from_float<dst_t>(a, b).store(p);  // one rounding, to nearest even
#else
      store2_tail(p, W2, a, b);
#endif
    }
  }
  // store2 for values known not to be NaN: bf16 round-to-nearest-even without ATen's NaN fix-up
  // (same bits otherwise), a third of the backward's bf16 conversion.
  template <typename dst_t>
  static inline void store2_finite(dst_t* p, V a, V b) {
#if NLLF_VEC_AVX2
    if constexpr (std::is_same_v<dst_t, at::BFloat16>) {
      const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
      auto rne = [&](__m256 v) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
        return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
      };
      const __m256i packed = _mm256_packus_epi32(rne(a), rne(b));  // lanes: a0-3 b0-3 a4-7 b4-7
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
      return;
    }
#endif
    store2(p, a, b);
  }
  template <typename dst_t>
  static inline void store2_tail(dst_t* p, int64_t n, V a, V b) {
    acc_t t[W2];
    a.store(t);
    b.store(t + W);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<dst_t>(t[i]);
  }
  // exp for arguments <= ~0 (z - max, z - lse), the hot spot of both sweeps. For float on AVX2:
  // exp(x) = 2^n exp(r), n = round(x log2 e) via the 1.5*2^23 shifter (which also leaves n + 127
  // in the low mantissa bits, i.e. 2^n after a shift), r = x - n ln2, exp(r) by a degree-5
  // polynomial fitted for relative error (2.4e-7 on [-ln2/2, ln2/2]). 12 instructions where
  // Vectorized::exp_u20 takes ~19. x < -87 (incl. -inf, where n and 2^n are garbage) is masked
  // to exactly 0; NaN stays NaN (the forward relies on that: its max sweep does not look for NaN).
  // Arguments must stay below 88 (2^n overflows the exponent): z <= max, and lse >= max.
  static inline V vexp(V x) {
#if NLLF_VEC_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      const __m256 xv = x;
      const __m256 shifter = _mm256_set1_ps(12582912.0f + 127.0f);
      const __m256 tt = _mm256_fmadd_ps(xv, _mm256_set1_ps(1.44269504088896341f), shifter);
      const __m256 n = _mm256_sub_ps(tt, shifter);
      const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147180559945309f), xv);
      __m256 p = _mm256_set1_ps(0.00829826295375824f);
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.0419168658554554f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16667574644088745f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.4999887943267822f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.9999997019767761f));
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
      const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
      const __m256 keep = _mm256_cmp_ps(xv, _mm256_set1_ps(-87.0f), _CMP_NLE_UQ);  // > -87 or NaN
      return V(_mm256_and_ps(_mm256_mul_ps(p, two_n), keep));
    }
#endif
    return x.exp_u20();  // float64: Sleef's exp; baseline: std::exp
  }
  // Max for the max sweep. On AVX2 the plain vmaxps, which may drop NaN; NaN then reaches the
  // exp sum (vexp keeps it) and the row's lse, and fold() checks the all -inf case by hand.
  static inline V vmax(V a, V b) {
#if NLLF_VEC_AVX2
    if constexpr (std::is_same_v<acc_t, float>) return V(_mm256_max_ps(a, b));
    else return V(_mm256_max_pd(a, b));
#else
    return maximum(a, b);
#endif
  }
  static inline acc_t nan_max(acc_t a, acc_t b) {
    if (std::isnan(a)) return a;
    if (std::isnan(b)) return b;
    return a < b ? b : a;
  }
  static inline acc_t hsum(V v) {
    acc_t t[W];
    v.store(t);
    acc_t s = 0;
    for (int64_t i = 0; i < W; ++i) s += t[i];
    return s;
  }
  // s + x into the pair (s, c), the rounding error of each addition collected in c (Neumaier).
  // d of a confident row is 1 + tiny terms: plain adds of lanes, tail and chunks to that 1 drop
  // each tiny term whole, a biased error of several ulps in log d where torch makes under one.
  static inline void add_exact(acc_t& s, acc_t& c, acc_t x) {
    const acc_t t = s + x;
    c += std::abs(s) >= std::abs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  // v where g != 0, else 0 (also where v is NaN: 0 * inf).
  static inline V keep_nonzero(V g, V v) {
    if constexpr (std::is_same_v<V, ScalarVec<acc_t>>) return g.v != 0 ? v : V(acc_t(0));
    else return V::blendv(V(acc_t(0)), v, g != V(acc_t(0)));
  }
  static inline acc_t hmax(V v) {
    acc_t t[W];
    v.store(t);
    acc_t m = -kInf;
    for (int64_t i = 0; i < W; ++i) m = nan_max(m, t[i]);
    return m;
  }

  // ------------------- logit transform z = softcap(a x): 0 none, 1 a*x, 2 s*tanh(a*x/s) -------------------
  struct Tf {
    int kind;
    acc_t a, s, as;
  };
  static Tf make_tf(const Args& A) {
    const acc_t a = static_cast<acc_t>(A.a), s = static_cast<acc_t>(A.s);
    if (A.s != 0) return {2, a, s, a / s};
    return {A.a == 1 ? 0 : 1, a, s, 0};
  }
  template <int K>
  static inline V tf(V x, const Tf& t) {
    if constexpr (K == 0) return x;
    else if constexpr (K == 1) return x * V(t.a);
    else return (x * V(t.as)).tanh() * V(t.s);
  }
  // z and dz/dx: softcap'(v) = 1 - tanh(v/s)^2, times a for the scale.
  template <int K>
  static inline V tf_grad(V x, const Tf& t, V& dz) {
    if constexpr (K == 0) {
      dz = V(acc_t(1));
      return x;
    } else if constexpr (K == 1) {
      dz = V(t.a);
      return x * V(t.a);
    } else {
      const V th = (x * V(t.as)).tanh();
      dz = (V(acc_t(1)) - th * th) * V(t.a);
      return th * V(t.s);
    }
  }
  static inline acc_t tf_scalar(acc_t x, const Tf& t, acc_t& dz) {
    if (t.kind == 0) { dz = 1; return x; }
    if (t.kind == 1) { dz = t.a; return x * t.a; }
    const acc_t th = std::tanh(x * t.as);
    dz = (1 - th * th) * t.a;
    return th * t.s;
  }

  // ------------------------------------------ row data ------------------------------------------
  static inline int64_t target_at(const Args& A, int64_t n, int64_t d) {
    const int64_t o = n * A.tN + d * A.tD;
    switch (A.tkind) {
      case 0: return static_cast<const int64_t*>(A.t)[o];
      case 1: return static_cast<const int32_t*>(A.t)[o];
      default: return static_cast<const uint8_t*>(A.t)[o];
    }
  }
  // Index target of row (n, d); ignored rows give -1. Never lets an out-of-range class through.
  static inline int64_t class_of(const Args& A, int64_t n, int64_t d) {
    const int64_t y = target_at(A, n, d);
    if (y == A.ignore_index) return -1;
    TORCH_CHECK_INDEX(y >= 0 && y < A.C, "Target ", y, " is out of bounds for ", A.C, " classes");
    return y;
  }
  // g_c = w_c q'_c, q' = (1 - e) q + e/C, for classes [c0, c0 + n) of row (n, d).
  template <typename q_t>
  static void soft_coef_t(const Args& A, const q_t* q, int64_t c0, int64_t n, acc_t* g) {
    const acc_t om = static_cast<acc_t>(1 - A.eps), ec = static_cast<acc_t>(A.eps / A.C);
    const acc_t* w = static_cast<const acc_t*>(A.w);
    for (int64_t c = 0; c < n; ++c) {
      const acc_t qc = om * static_cast<acc_t>(q[(c0 + c) * A.qC]) + ec;
      g[c] = w ? w[c0 + c] * qc : qc;
    }
  }
  static void soft_coef(const Args& A, int64_t n_, int64_t d_, int64_t c0, int64_t n, acc_t* g) {
    const int64_t o = n_ * A.qN + d_ * A.qD;
    switch (A.qtype) {
      case at::kHalf: return soft_coef_t(A, static_cast<const at::Half*>(A.q) + o, c0, n, g);
      case at::kBFloat16: return soft_coef_t(A, static_cast<const at::BFloat16*>(A.q) + o, c0, n, g);
      case at::kFloat: return soft_coef_t(A, static_cast<const float*>(A.q) + o, c0, n, g);
      default: return soft_coef_t(A, static_cast<const double*>(A.q) + o, c0, n, g);
    }
  }

  // ------------------------------------------- forward -------------------------------------------
  // Sweep 1 over a chunk: max of z (see vmax for NaN); with Copy also writes z to zb (may alias x).
  template <typename src_t, int K, bool Copy>
  static acc_t chunk_max(const src_t* x, int64_t n, acc_t* zb, const Tf& t) {
    V m0(-kInf), m1(-kInf);
    int64_t i = 0;
    for (; i + W2 <= n; i += W2) {
      V a, b;
      load2(x + i, a, b);
      if constexpr (Copy) {
        a = tf<K>(a, t);
        b = tf<K>(b, t);
        a.store(zb + i);
        b.store(zb + i + W);
      }
      m0 = vmax(m0, a);
      m1 = vmax(m1, b);
    }
    acc_t m = nan_max(hmax(m0), hmax(m1));
    if (i < n) {  // tail: transform a padded copy, then only look at the real elements
      acc_t z[W2];
      V a, b;
      load2_tail(x + i, n - i, acc_t(0), a, b);
      tf<K>(a, t).store(z);
      tf<K>(b, t).store(z + W);
      for (int64_t j = 0; j < n - i; ++j) {
        if constexpr (Copy) zb[i + j] = z[j];
        m = nan_max(m, z[j]);
      }
    }
    return m;
  }

  // z of classes [0, n) of a row chunk starting at x (class stride xC) and its max: a pointer
  // into the logits themselves when no conversion is needed, else zb, filled here.
  static const acc_t* load_chunk(const scalar_t* x, int64_t xC, int64_t n, acc_t* zb, const Tf& t,
                                 acc_t& cm) {
    if (xC == 1) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (t.kind == 0) {  // fp32/fp64 without transform: no copy at all
          cm = chunk_max<acc_t, 0, false>(x, n, nullptr, t);
          return x;
        }
      }
      if (t.kind == 0) cm = chunk_max<scalar_t, 0, true>(x, n, zb, t);
      else if (t.kind == 1) cm = chunk_max<scalar_t, 1, true>(x, n, zb, t);
      else cm = chunk_max<scalar_t, 2, true>(x, n, zb, t);
      return zb;
    }
    for (int64_t c = 0; c < n; ++c) zb[c] = static_cast<acc_t>(x[c * xC]);
    if (t.kind == 0) cm = chunk_max<acc_t, 0, false>(zb, n, nullptr, t);
    else if (t.kind == 1) cm = chunk_max<acc_t, 1, true>(zb, n, zb, t);
    else cm = chunk_max<acc_t, 2, true>(zb, n, zb, t);
    return zb;
  }

  // Online-softmax state of one row: max m, d + dc = sum exp(z - m) (dc: add_exact's
  // compensation), and for the smoothing / soft target sums B = sum g (z - m) and G = sum g.
  struct State {
    acc_t m = -kInf, d = 0, dc = 0, B = 0, G = 0;
  };
  // Sweep 2: fold a chunk z[0, n) with max cm into the state. Gm: 0 no g-sums, 1 g = 1, 2 g[],
  // 3 g[] of probability targets, where a class with g_c == 0 adds nothing to B even at z = -inf.
  // It runs from L1 and leaves the memory idle, so it prefetches the next chunk [pf, pf + pf_len)
  // for the max sweep, one line per step.
  // AtMax: the chunk holds the row's running max (cm is it); only then can a term be exp(0).
  template <int Gm, bool AtMax>
  static void fold(State& s, const acc_t* z, int64_t n, acc_t cm, const acc_t* g,
                   const char* pf = nullptr, int64_t pf_len = 0) {
    const acc_t mn = nan_max(s.m, cm);
    if (mn != -kInf && !(mn == s.m)) {  // the max grew (or became NaN): rescale the sums so far
      if (s.m > -kInf) {
        const acc_t f = std::exp(s.m - mn);
        s.d *= f;
        s.dc *= f;
        if constexpr (Gm != 0) s.B += (s.m - mn) * s.G;  // <= 0: B only ever gains terms <= 0
      }
      s.m = mn;
    }
    // While every class so far is -inf, sum against 0 instead of m (exp(-inf - -inf) would be
    // NaN): the exp terms are 0, the g-sums take g*(-inf), i.e. -inf, or NaN for g = 0, as
    // torch's smoothing term does, and a NaN the max sweep dropped (see vmax) reaches d.
    const acc_t ref = s.m == -kInf ? acc_t(0) : s.m;
    // In a chunk holding the max, the terms exp(0) = 1 of classes at the max are counted apart
    // (k0, k1), not added to the lanes: in a lane holding a 1, the tiny terms of a confident row
    // would round away.
    const V vm(ref), zero(acc_t(0)), one(acc_t(1));
    V d0(zero), d1(zero), k0(zero), k1(zero), b0(zero), b1(zero), g0(zero), g1(zero);
    int64_t i = 0;
    for (int64_t pf_off = 0; i + W2 <= n; i += W2, pf_off += 64) {
      if (pf_off < pf_len) __builtin_prefetch(pf + pf_off);
      const V a = V::loadu(z + i) - vm, b = V::loadu(z + i + W) - vm;
      if constexpr (AtMax) {
        const V at_max_a = a.eq(zero), at_max_b = b.eq(zero);  // 1 or 0
        d0 = d0 + vexp(a) * (one - at_max_a);
        d1 = d1 + vexp(b) * (one - at_max_b);
        k0 = k0 + at_max_a;
        k1 = k1 + at_max_b;
      } else {
        d0 = d0 + vexp(a);
        d1 = d1 + vexp(b);
      }
      if constexpr (Gm == 1) {
        b0 = b0 + a;
        b1 = b1 + b;
      } else if constexpr (Gm >= 2) {
        const V ga = V::loadu(g + i), gb = V::loadu(g + i + W);
        if constexpr (Gm == 3) {
          b0 = b0 + keep_nonzero(ga, ga * a);
          b1 = b1 + keep_nonzero(gb, gb * b);
        } else {
          b0 = fmadd(ga, a, b0);
          b1 = fmadd(gb, b, b1);
        }
        g0 = g0 + ga;
        g1 = g1 + gb;
      }
    }
    acc_t B = hsum(b0 + b1), G = hsum(g0 + g1);
    alignas(64) acc_t lanes[2 * W];
    d0.store(lanes);
    d1.store(lanes + W);
    for (int64_t l = 0; l < 2 * W; ++l) add_exact(s.d, s.dc, lanes[l]);
    acc_t k = hsum(k0 + k1);  // a count: exact
    for (; i < n; ++i) {
      const acc_t a = z[i] - ref;
      if (AtMax && a == 0) k += 1;
      else add_exact(s.d, s.dc, std::exp(a));
      if constexpr (Gm == 1) B += a;
      if constexpr (Gm >= 2) {
        if (Gm == 2 || g[i] != 0) B += g[i] * a;
        G += g[i];
      }
    }
    add_exact(s.d, s.dc, k);
    if constexpr (Gm == 1) G = static_cast<acc_t>(n);
    s.B += B;
    s.G += G;
  }
  static void fold_any(int gm, State& s, const acc_t* z, int64_t n, acc_t cm, const acc_t* g,
                       const char* pf = nullptr, int64_t pf_len = 0) {
    if (cm == nan_max(s.m, cm)) {
      if (gm == 0) fold<0, true>(s, z, n, cm, g, pf, pf_len);
      else if (gm == 1) fold<1, true>(s, z, n, cm, g, pf, pf_len);
      else if (gm == 2) fold<2, true>(s, z, n, cm, g, pf, pf_len);
      else fold<3, true>(s, z, n, cm, g, pf, pf_len);
    } else {
      if (gm == 0) fold<0, false>(s, z, n, cm, g, pf, pf_len);
      else if (gm == 1) fold<1, false>(s, z, n, cm, g, pf, pf_len);
      else if (gm == 2) fold<2, false>(s, z, n, cm, g, pf, pf_len);
      else fold<3, false>(s, z, n, cm, g, pf, pf_len);
    }
  }
  // Which g-sums row needs: soft targets always; index targets only with smoothing (not ignored).
  static int gmode(const Args& A, int64_t y) {
    if (A.prob) return 3;
    if (A.eps == 0 || y < 0) return 0;
    return A.w ? 2 : 1;
  }

  // loss / lse / aux of row r from its folded state (GUIDE §1). x_row, xC: the row, for z_y.
  static void finish_row(const Args& A, int64_t r, const State& s, const scalar_t* x_row,
                         int64_t y, const Tf& t) {
    // d >= 1 (the max's own term) and d - 1 is exact near 1, so log1p keeps the tiny terms of a
    // confident row that log(d) would round away.
    const acc_t logd = std::log1p((s.d - 1) + s.dc);
    // A +inf logit: logsumexp is +inf, but torch's log_softmax (so the loss) is NaN.
    const bool pinf = s.m == kInf;
    // lse in float64 (contract): m + log d keeps every digit of log d even where |m| is large,
    // which is what lets the backward form z - lse without losing p (see row_grad).
    const double lse = pinf ? std::numeric_limits<double>::infinity()
                            : static_cast<double>(s.m) + static_cast<double>(logd);
    const acc_t e = static_cast<acc_t>(A.eps);
    acc_t loss, aux;
    if (A.prob) {
      loss = s.G * logd - s.B;  // sum_c g_c (lse - z_c)
      aux = s.G;
    } else if (y < 0) {
      loss = 0;
      aux = 0;
    } else {
      acc_t dz;
      const acc_t zy = tf_scalar(static_cast<acc_t>(x_row[y * A.xC]), t, dz);
      const acc_t wy = A.w ? static_cast<const acc_t*>(A.w)[y] : acc_t(1);
      // (m - z_y) + log d rather than lse - z_y in acc_t: m - z_y is exact for close values.
      loss = (1 - e) * wy * ((s.m - zy) + logd);
      if (A.eps != 0) loss += e / static_cast<acc_t>(A.C) * (s.G * logd - s.B);
      aux = wy;
    }
    if ((pinf || std::isnan(lse)) && !(y < 0 && !A.prob)) loss = kNaN;
    static_cast<acc_t*>(A.loss)[r] = loss;
    static_cast<double*>(A.lse)[r] = lse;
    static_cast<acc_t*>(A.aux)[r] = aux;
  }

  // Unit class stride: each row read in place, chunk by chunk.
  static void fwd_rows(const Args& A, int64_t r0, int64_t r1) {
    alignas(64) acc_t zb[kChunk];
    alignas(64) acc_t gb[kChunk];
    const Tf t = make_tf(A);
    const acc_t* w = static_cast<const acc_t*>(A.w);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n_ = r / A.D, d_ = r % A.D;
      const scalar_t* xr = static_cast<const scalar_t*>(A.x) + n_ * A.xN + d_ * A.xD;
      const int64_t y = A.prob ? -1 : class_of(A, n_, d_);
      const int gm = gmode(A, y);
      State s;
      for (int64_t c0 = 0; c0 < A.C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, A.C - c0);
        acc_t cm;
        const acc_t* z = load_chunk(xr + c0, 1, n, zb, t, cm);
        const acc_t* g = nullptr;
        if (A.prob) {
          soft_coef(A, n_, d_, c0, n, gb);
          g = gb;
        } else if (gm == 2) {
          g = w + c0;
        }
        // next: the rest of this row, else the start of the next one
        const scalar_t* pf = c0 + n < A.C ? xr + c0 + n
                             : r + 1 < r1 ? static_cast<const scalar_t*>(A.x) +
                                                (r + 1) / A.D * A.xN + (r + 1) % A.D * A.xD
                                          : nullptr;
        const int64_t pf_n = c0 + n < A.C ? std::min(kChunk, A.C - c0 - n) : std::min(kChunk, A.C);
        fold_any(gm, s, z, n, cm, g, reinterpret_cast<const char*>(pf),
                 pf ? pf_n * int64_t(sizeof(scalar_t)) : 0);
      }
      finish_row(A, r, s, xr, y, t);
    }
  }

  // Strided classes: tiles of kTile consecutive rows, each chunk gathered into zb[lane][·].
  static void fwd_tiles(const Args& A, int64_t tile0, int64_t tile1) {
    alignas(64) acc_t zb[kTile][kTileChunk];
    alignas(64) acc_t gb[kTileChunk];
    const Tf t = make_tf(A);
    const acc_t* w = static_cast<const acc_t*>(A.w);
    const int64_t R = A.N * A.D;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTile, L = std::min(kTile, R - r0);
      const scalar_t* xl[kTile];
      int64_t ys[kTile];
      State st[kTile];
      for (int64_t l = 0; l < L; ++l) {
        const int64_t n_ = (r0 + l) / A.D, d_ = (r0 + l) % A.D;
        xl[l] = static_cast<const scalar_t*>(A.x) + n_ * A.xN + d_ * A.xD;
        ys[l] = A.prob ? -1 : class_of(A, n_, d_);
      }
      for (int64_t c0 = 0; c0 < A.C; c0 += kTileChunk) {
        const int64_t n = std::min(kTileChunk, A.C - c0);
        for (int64_t c = 0; c < n; ++c) {
          const int64_t o = (c0 + c) * A.xC;
          for (int64_t l = 0; l < L; ++l) zb[l][c] = static_cast<acc_t>(xl[l][o]);
        }
        for (int64_t l = 0; l < L; ++l) {
          acc_t cm;
          if (t.kind == 0) cm = chunk_max<acc_t, 0, false>(zb[l], n, nullptr, t);
          else if (t.kind == 1) cm = chunk_max<acc_t, 1, true>(zb[l], n, zb[l], t);
          else cm = chunk_max<acc_t, 2, true>(zb[l], n, zb[l], t);
          const int gm = gmode(A, ys[l]);
          const acc_t* g = nullptr;
          if (A.prob) {
            soft_coef(A, (r0 + l) / A.D, (r0 + l) % A.D, c0, n, gb);
            g = gb;
          } else if (gm == 2) {
            g = w + c0;
          }
          fold_any(gm, st[l], zb[l], n, cm, g);
        }
      }
      for (int64_t l = 0; l < L; ++l) finish_row(A, r0 + l, st[l], xl[l], ys[l], t);
    }
  }

  static void forward(const Args& A) {
    const int64_t R = A.N * A.D;
    if (R == 0) return;
    if (A.xC == 1 || A.C == 1) {
      at::parallel_for(0, R, std::max<int64_t>(1, 32768 / A.C),
                       [&](int64_t b, int64_t e) { fwd_rows(A, b, e); });
    } else {
      at::parallel_for(0, (R + kTile - 1) / kTile, std::max<int64_t>(1, 32768 / (A.C * kTile)),
                       [&](int64_t b, int64_t e) { fwd_tiles(A, b, e); });
    }
  }

  // ------------------------------------------- backward -------------------------------------------
  // Row r's gradient is grad_c = dz_c (P p_c - Q g_c), p_c = exp((z_c - hi) - lo) with the float64
  // lse split as hi = acc_t(lse), lo = acc_t(lse - hi): z_c - hi is exact for the classes that
  // matter, so p_c keeps acc_t accuracy even for |lse| ~ 1e4, where a float32 lse alone would be
  // off by 5e-4. With gl = grad_loss[r] and gs = grad_lse[r] (d lse / d z_c = p_c), the index
  // target y gets
  //   dz_y (gl ((1-e) w_y (p_y - 1) + e/C (sum(w) p_y - w_y)) + gs p_y).
  // There p_y - 1 is taken as -sum_{c != y} p_c, summed during the sweep: when p_y -> 1, p_y
  // rounded to acc_t leaves p_y - 1 only its last bits (or nothing), the sum keeps every digit.
  // That element is computed in acc_t and rounded once, after the sweep: gy = ya * sum + yb.
  // An ignored row has no loss part: 0, or gs p_c dz_c when gs != 0.
  struct RowGrad {
    acc_t hi, lo, P, Q, ya, yb;
    int64_t y;  // -1: none (soft targets, ignored rows)
    int gm;     // g: 0 none, 1 ones, 2 g[] (weights, or w q' for soft targets)
    bool zero, nan;
  };
  static RowGrad row_grad(const Args& A, int64_t n_, int64_t d_, const scalar_t* xr, const Tf& t) {
    RowGrad rg{};
    rg.y = -1;
    const acc_t gl = static_cast<const acc_t*>(A.gl)[n_ * A.gN + d_ * A.gD];
    const double lse_d = static_cast<const double*>(A.lse_in)[n_ * A.lN + d_ * A.lD];
    const acc_t gs = A.glse ? static_cast<acc_t>(A.glse[n_ * A.glN + d_ * A.glD]) : acc_t(0);
    const acc_t e = static_cast<acc_t>(A.eps);
    const int64_t y = A.prob ? -1 : class_of(A, n_, d_);
    const bool ignored = !A.prob && y < 0;
    if (ignored && gs == 0) {
      rg.zero = true;
      return rg;
    }
    // lse = -inf (all classes -inf), +inf or NaN: every p_c is NaN, as in torch.
    rg.nan = !std::isfinite(lse_d);
    rg.hi = static_cast<acc_t>(lse_d);
    rg.lo = rg.nan ? acc_t(0) : static_cast<acc_t>(lse_d - static_cast<double>(rg.hi));
    if (ignored) {
      rg.P = gs;
      rg.gm = 0;
    } else if (A.prob) {
      const acc_t S = static_cast<const acc_t*>(A.aux_in)[n_ * A.aN + d_ * A.aD];
      rg.P = gl * S + gs;
      rg.Q = gl;
      rg.gm = 2;
    } else {
      const acc_t* w = static_cast<const acc_t*>(A.w);
      const acc_t wy = w ? w[y] : acc_t(1), eC = e / static_cast<acc_t>(A.C);
      const acc_t ws = static_cast<acc_t>(A.wsum);
      rg.P = gl * ((1 - e) * wy + eC * ws) + gs;
      rg.Q = gl * eC;
      rg.gm = gmode(A, y);
      acc_t dz;
      const acc_t zy = tf_scalar(static_cast<acc_t>(xr[y * A.xC]), t, dz);
      const acc_t py = std::exp((zy - rg.hi) - rg.lo);
      rg.ya = -gl * dz * (1 - e) * wy;
      rg.yb = dz * (gl * eC * (ws * py - wy) + gs * py);
      rg.y = y;
    }
    return rg;
  }

  // Gradient of n classes into out (may alias x); returns sum p_c over them but `skip`.
  template <typename src_t, typename dst_t, int K, int Gm>
  static acc_t grad_chunk(const src_t* x, dst_t* out, int64_t n, int64_t skip, const RowGrad& rg,
                          const acc_t* g, const Tf& t) {
    const V vhi(rg.hi), vlo(rg.lo), vP(rg.P), vQ(rg.Q);
    auto body = [&](V xv, const acc_t* gp, V& p) {
      V dz;
      p = vexp((tf_grad<K>(xv, t, dz) - vhi) - vlo);
      V r = vP * p;
      if constexpr (Gm == 1) r = r - vQ;
      if constexpr (Gm == 2) r = r - vQ * V::loadu(gp);
      if constexpr (K == 0) return r;
      else return r * dz;
    };
    // Without per-class g and with finite P, Q every gradient is finite: no NaN handling needed.
    const bool finite = Gm != 2 && std::isfinite(rg.P) && std::isfinite(rg.Q);
    V s0(acc_t(0)), s1(acc_t(0));
    int64_t i = 0;
    for (; i + W2 <= n; i += W2) {
      V a, b, pa, pb;
      load2(x + i, a, b);
      a = body(a, g + i, pa);
      b = body(b, g + i + W, pb);
      if (finite) store2_finite(out + i, a, b);
      else store2(out + i, a, b);
      if (static_cast<uint64_t>(skip - i) < static_cast<uint64_t>(W2)) {  // the target's block
        acc_t pt[W2];
        pa.store(pt);
        pb.store(pt + W);
        pt[skip - i] = 0;
        pa = V::loadu(pt);
        pb = V::loadu(pt + W);
      }
      s0 = s0 + pa;
      s1 = s1 + pb;
    }
    acc_t sum = hsum(s0 + s1);
    if (i < n) {
      acc_t gt[W2] = {}, pt[W2];
      for (int64_t j = 0; Gm == 2 && j < n - i; ++j) gt[j] = g[i + j];
      V a, b, pa, pb;
      load2_tail(x + i, n - i, acc_t(0), a, b);
      a = body(a, gt, pa);
      b = body(b, gt + W, pb);
      store2_tail(out + i, n - i, a, b);
      pa.store(pt);
      pb.store(pt + W);
      for (int64_t j = 0; j < n - i; ++j) sum += j + i == skip ? acc_t(0) : pt[j];
    }
    return sum;
  }
  // Classes [c0, c0 + n) of one row into out[0, n), with the instantiation for this row; returns
  // the chunk's share of sum_{c != y} p_c. The target element is written later.
  template <typename src_t, typename dst_t>
  static acc_t grad_any(const src_t* x, dst_t* out, int64_t c0, int64_t n, const RowGrad& rg,
                        const acc_t* g, const Tf& t) {
    if (rg.zero || rg.nan) {
      std::fill(out, out + n, static_cast<dst_t>(rg.zero ? acc_t(0) : kNaN));
      return 0;
    }
    const int64_t skip = rg.y - c0;
#define NLLF_GRAD_K(K)                                                              \
  if (rg.gm == 0) return grad_chunk<src_t, dst_t, K, 0>(x, out, n, skip, rg, g, t); \
  if (rg.gm == 1) return grad_chunk<src_t, dst_t, K, 1>(x, out, n, skip, rg, g, t); \
  return grad_chunk<src_t, dst_t, K, 2>(x, out, n, skip, rg, g, t);
    if (t.kind == 0) { NLLF_GRAD_K(0) }
    if (t.kind == 1) { NLLF_GRAD_K(1) }
    NLLF_GRAD_K(2)
#undef NLLF_GRAD_K
  }
  static inline bool has_target(const RowGrad& rg) { return rg.y >= 0 && !rg.zero && !rg.nan; }

  // D == 1 and unit class stride: read each row in place, write each gradient row in place.
  // (Non-temporal stores for the gradient were tried: no gain, as its pages come freshly zeroed
  // by the kernel, i.e. in cache.)
  static void bwd_rows(const Args& A, int64_t r0, int64_t r1) {
    alignas(64) acc_t gb[kChunk];
    const Tf t = make_tf(A);
    const acc_t* w = static_cast<const acc_t*>(A.w);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = static_cast<const scalar_t*>(A.x) + r * A.xN;
      scalar_t* outr = static_cast<scalar_t*>(A.out) + r * A.C;
      const RowGrad rg = row_grad(A, r, 0, xr, t);
      acc_t so = 0;
      for (int64_t c0 = 0; c0 < A.C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, A.C - c0);
        const acc_t* g = w ? w + c0 : nullptr;
        if (A.prob && !rg.nan) {
          soft_coef(A, r, 0, c0, n, gb);
          g = gb;
        }
        so += grad_any(xr + c0, outr + c0, c0, n, rg, g, t);
      }
      if (has_target(rg)) outr[rg.y] = static_cast<scalar_t>(rg.ya * so + rg.yb);
    }
  }

  // General layout: tiles of kTile consecutive rows gathered into zb, the gradient computed in
  // place in acc_t, then scattered to the contiguous (N, C, D) output.
  static void bwd_tiles(const Args& A, int64_t tile0, int64_t tile1) {
    alignas(64) acc_t zb[kTile][kTileChunk];
    alignas(64) acc_t gb[kTileChunk];
    const Tf t = make_tf(A);
    const acc_t* w = static_cast<const acc_t*>(A.w);
    const int64_t R = A.N * A.D;
    scalar_t* out = static_cast<scalar_t*>(A.out);
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t r0 = tile * kTile, L = std::min(kTile, R - r0);
      const scalar_t* xl[kTile];
      int64_t ob[kTile];
      RowGrad rgs[kTile];
      acc_t so[kTile] = {};
      for (int64_t l = 0; l < L; ++l) {
        const int64_t n_ = (r0 + l) / A.D, d_ = (r0 + l) % A.D;
        xl[l] = static_cast<const scalar_t*>(A.x) + n_ * A.xN + d_ * A.xD;
        ob[l] = n_ * A.C * A.D + d_;
        rgs[l] = row_grad(A, n_, d_, xl[l], t);
      }
      for (int64_t c0 = 0; c0 < A.C; c0 += kTileChunk) {
        const int64_t n = std::min(kTileChunk, A.C - c0);
        for (int64_t c = 0; c < n; ++c) {
          const int64_t o = (c0 + c) * A.xC;
          for (int64_t l = 0; l < L; ++l) zb[l][c] = static_cast<acc_t>(xl[l][o]);
        }
        for (int64_t l = 0; l < L; ++l) {
          const acc_t* g = w ? w + c0 : nullptr;
          if (A.prob && !rgs[l].nan) {
            soft_coef(A, (r0 + l) / A.D, (r0 + l) % A.D, c0, n, gb);
            g = gb;
          }
          so[l] += grad_any(zb[l], zb[l], c0, n, rgs[l], g, t);
        }
        for (int64_t c = 0; c < n; ++c) {
          const int64_t o = (c0 + c) * A.D;
          for (int64_t l = 0; l < L; ++l) out[ob[l] + o] = static_cast<scalar_t>(zb[l][c]);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        const RowGrad& rg = rgs[l];
        if (has_target(rg)) out[ob[l] + rg.y * A.D] = static_cast<scalar_t>(rg.ya * so[l] + rg.yb);
      }
    }
  }

  static void backward(const Args& A) {
    const int64_t R = A.N * A.D;
    if (R == 0) return;
    if ((A.xC == 1 || A.C == 1) && A.D == 1) {
      at::parallel_for(0, R, std::max<int64_t>(1, 32768 / A.C),
                       [&](int64_t b, int64_t e) { bwd_rows(A, b, e); });
    } else {
      at::parallel_for(0, (R + kTile - 1) / kTile, std::max<int64_t>(1, 32768 / (A.C * kTile)),
                       [&](int64_t b, int64_t e) { bwd_tiles(A, b, e); });
    }
  }
};

}  // namespace nllfused_cpu::NLLF_KERNELS
#endif  // NLLF_KERNELS
