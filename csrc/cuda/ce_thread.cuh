// The CUDA backend's per-thread code (contract: csrc/ops.cpp, maths: docs/maths.md): everything
// a thread of the kernels in ce_kernels.cuh does to its classes, __host__ __device__ so that the
// host emulator (tests/cuda_emulation/emu.cu) runs the very same code on a CPU. No torch headers
// but c10's 16-bit float types (numeric primitives: ce_math.cuh). Included through ce_kernels.cuh.
//
// Layout. logits are (N, C, D) with any strides; row r = n*D + d is the C values
// x[n, :, d] at x + n*sN + d*sD, step sC. Per-row outputs (loss, lse, aux) are contiguous
// (N, D), i.e. indexed by r. grad_logits is contiguous (N, C, D).
//
// Features are template flags (CeFlag, the parameter F of every function below): a kernel
// carries the code of the options it was instantiated for and tests none of them per element
// (but the kRuntime catch-all, which reads them from the parameters). The target's dtype is
// read at run time: once per row for class indices.
//
// Forward: one pass over the row with an online softmax. Each thread keeps (Stats) m = running
// max of z, k + s = sum exp(z - m): k counts the classes at the max (terms of exactly 1), s sums
// the others, so that a confident row's tiny terms are not rounded away against the 1 (its
// log(1 + s) goes through log1p); with label smoothing or probability targets also
// t = sum v_c (m - z_c) and w = sum v_c, v_c the class weight w_c (index targets) or w_c q'_c.
// t is kept relative to the running max (rescaled by w*(m_new - m_old) when the max grows), so
// every term is >= 0 and sum_c v_c (lse - z_c) = t + w log(k + s) has no cancellation even for
// logits far from zero. Likewise lse - z_y = (m - z_y) + log(k + s). The state is folded a chunk
// of values at a time (kUnroll 16-byte vectors, or fewer): the chunk's max by a tree, then one
// exp per value; the threads' states are merged once, after the loop (ce_kernels.cuh).
// Backward (ce_backward.cuh) recomputes p = exp(z - lse) from the saved lse; no reductions.
// Every class gets the same formula in the loop; the true class, whose (p_y - 1) needs expm1
// to keep its precision, is rewritten afterwards by the thread that wrote it (no per-element
// test of c == y). A long row may be split in parts (row_part), each a group's.
//
// Accumulation: float for half/bfloat16/float, double for double (acc_type_t).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "ce_math.cuh"

namespace nllfused {
namespace cuda_impl {

#define NLLF_HD __host__ __device__ __forceinline__

// Feature flags, the template parameter F: which code a kernel carries. The host sets them from
// the options (ce_flags in ce_host.h), so a flag that is off costs nothing. kRuntime is the
// catch-all variant for the option sets no kernel is instantiated for: it reads scale, softcap,
// smoothing and weights from the parameters at run time (has() below), at the price of a
// uniform test per element.
enum CeFlag : int {
  kProb = 1,      // probability targets (else class indices)
  kScale = 2,     // z = a x, logit_scale a != 1 (without softcap)
  kCap = 4,       // z = s tanh(a x / s), softcap s (any a)
  kSmooth = 8,    // index targets with label smoothing: t, w forward, the class term backward
  kWeight = 16,   // class weights read per class (with kProb or kSmooth; else once per row)
  kRuntime = 32,  // kScale, kCap, kSmooth, kWeight as the parameters say
  kProbLike = 64,  // (with kProb) targets in the logits' dtype: no per-element dtype switch
  kStats = 128,    // ce_fwd_stats / ce_bwd_stats: entropy, argmax, target log-prob (below)
};
template <int F>
constexpr bool kMayT = (F & (kProb | kSmooth | kRuntime)) != 0;  // code for t and w
template <int F>
constexpr bool kMayTransform = (F & (kScale | kCap | kRuntime)) != 0;
template <int F>
constexpr bool kHasStats = (F & kStats) != 0;

// Vectors (kVec values, ce_math.cuh) in flight per thread and step (rows mapping): 4 for the
// plain kernels (32 16-bit values, 16 floats: a step's fixed costs spread over many values), 2
// where the options' per-class work needs the registers (at most 64 a thread: ce_kernels.cuh),
// 1 with probability targets (a target load per value) and in the kRuntime catch-all.
template <int F>
constexpr int kUnroll = F == 0 ? 4 : (F & (kRuntime | kProb)) != 0 ? 1 : 2;
constexpr int kTileUnroll = 4;  // strided loads in flight per thread (tile mapping)

// The target's dtype, read at run time (once per row for index targets): 3-7x fewer kernels.
enum TargetDtype : int {
  kIndexInt64 = 0, kIndexInt32 = 1, kIndexUInt8 = 2,
  kProbHalf = 3, kProbBFloat16 = 4, kProbFloat = 5, kProbDouble = 6,
};

// ------------------------------------------------------------------------------------------
// Parameters shared by all kernels (passed by value).

template <typename acc_t>
struct CEParams {
  int64_t R;           // rows = N * D
  int64_t C, D;
  int64_t sN, sC, sD;  // logits strides, in elements
  // target: index (N, D) strides tN, tD; probability (N, C, D) strides tN, tC, tD
  const void* tgt;
  int64_t tN, tC, tD;
  int tgt_dtype;             // TargetDtype
  const acc_t* weight;       // (C,) contiguous or nullptr, in acc_t (csrc/ops.cpp)
  const double* weight_sum;  // device scalar sum(weight) in float64 (backward, index targets)
  int64_t ignore_index;
  acc_t eps, eps_over_C, one_minus_eps;  // label smoothing
  acc_t scale;       // logit_scale a
  acc_t cap;         // softcap s (kCap)
  acc_t scale_over_cap;
  // forward outputs, contiguous (N, D)
  acc_t* loss;
  double* lse;  // float64 whatever acc_t: see csrc/ops.cpp
  acc_t* aux;
  // backward inputs, (N, D) any strides
  const acc_t* grad;
  int64_t gN, gD;
  const double* grad_lse;  // or nullptr
  int64_t glN, glD;
  const double* lse_in;
  int64_t lN, lD;
  const acc_t* aux_in;
  int64_t aN, aD;
  // statistics (kStats): forward outputs, contiguous (N, D)
  acc_t* entropy;
  acc_t* target_logp;
  int64_t* predicted;
  // statistics' backward inputs, (N, D) any strides; a gradient may be nullptr (None)
  const acc_t* grad_entropy;
  int64_t geN, geD;
  const acc_t* grad_target_logp;
  int64_t gtN, gtD;
  const acc_t* entropy_in;
  int64_t eN, eD;
};

// Whether feature BIT's code runs: fixed by F, or read from the parameters (kRuntime).
template <int F, int BIT, typename acc_t>
NLLF_HD bool has(const CEParams<acc_t>& p) {
  if constexpr ((F & kRuntime) == 0 || BIT == kProb) return (F & BIT) != 0;
  else if constexpr (BIT == kScale) return p.scale != acc_t(1);
  else if constexpr (BIT == kCap) return p.cap != acc_t(0);
  else if constexpr (BIT == kSmooth) return (F & kProb) == 0 && p.eps != acc_t(0);
  else return p.weight != nullptr;  // kWeight
}
// The forward keeps t and w (probability targets, label smoothing).
template <int F, typename acc_t>
NLLF_HD bool need_t(const CEParams<acc_t>& p) {
  return (F & kProb) != 0 || has<F, kSmooth>(p);
}

// z = softcap(logit_scale x), rounded (mul_rounded): the same in every pass.
template <int F, typename acc_t>
NLLF_HD acc_t to_z(const CEParams<acc_t>& p, acc_t x) {
  if constexpr (kMayTransform<F>) {
    if (has<F, kCap>(p)) return mul_rounded(p.cap, acc_tanh(x * p.scale_over_cap));
    if (has<F, kScale>(p)) return mul_rounded(x, p.scale);
  }
  return x;
}

// z and dz/dx of one logit (chain: logit_scale without softcap, 1 with neither).
template <int F, typename acc_t>
NLLF_HD acc_t to_z_chain(const CEParams<acc_t>& p, acc_t x, acc_t& chain) {
  chain = p.scale;
  if constexpr (kMayTransform<F>) {
    if (has<F, kCap>(p)) {
      const acc_t th = acc_tanh(x * p.scale_over_cap);
      chain = p.scale * ((acc_t(1) - th) * (acc_t(1) + th));
      return mul_rounded(p.cap, th);
    }
    if (has<F, kScale>(p)) return mul_rounded(x, p.scale);
  }
  return x;
}

template <int F, typename scalar_t, typename acc_t>
NLLF_HD acc_t load_prob(const CEParams<acc_t>& p, int64_t off) {
  if constexpr ((F & kProbLike) != 0)
    return static_cast<acc_t>(static_cast<const scalar_t*>(p.tgt)[off]);
  switch (p.tgt_dtype) {
    case kProbHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p.tgt)[off]));
    case kProbBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p.tgt)[off]));
    case kProbFloat:
      return static_cast<acc_t>(static_cast<const float*>(p.tgt)[off]);
    default:  // float64 targets reach only float64 kernels (with_params, ce_host.h)
      if constexpr (std::is_same<acc_t, double>::value)
        return static_cast<const double*>(p.tgt)[off];
      else
        return quiet_nan<acc_t>();
  }
}

template <typename acc_t>
NLLF_HD int64_t load_index(const CEParams<acc_t>& p, int64_t n, int64_t d) {
  const int64_t off = n * p.tN + d * p.tD;
  switch (p.tgt_dtype) {
    case kIndexInt32: return static_cast<const int32_t*>(p.tgt)[off];
    case kIndexUInt8: return static_cast<const uint8_t*>(p.tgt)[off];
    default: return static_cast<const int64_t*>(p.tgt)[off];
  }
}

template <int F, typename acc_t>
NLLF_HD acc_t class_w(const CEParams<acc_t>& p, int64_t c) {
  return has<F, kWeight>(p) ? ldg(p.weight + c) : acc_t(1);
}

// v_c: the weight of class c in t / w (w_c, or w_c q'_c for probability targets).
// qoff = n*tN + d*tD (probability targets only).
template <int F, typename scalar_t, typename acc_t>
NLLF_HD acc_t class_v(const CEParams<acc_t>& p, int64_t qoff, int64_t c) {
  const acc_t w = class_w<F>(p, c);
  if constexpr ((F & kProb) != 0) {
    const acc_t q = load_prob<F, scalar_t>(p, qoff + c * p.tC);
    return w * (p.one_minus_eps * q + p.eps_over_C);
  } else {
    return w;
  }
}

// ------------------------------------------------------------------------------------------
// Online softmax state: m, k, s as in every backend (the vocabulary is written out once, at
// State in csrc/cpu/ce_cpu_kernels.h).

// With kStats also (docs/maths.md, "Statistics") e = sum exp(z_c - m) (z_c - m) over the
// classes off the max (<= 0; the entropy is log d - e / d, d = k + s), rescaled as s is when
// the max grows, and arg, the first class at the max (the first NaN's once m is NaN): classes
// come to a thread in increasing order, and merges keep the smaller of two at the same max.
constexpr int64_t kNoClass = INT64_MAX;  // arg of a state that has seen no class

template <typename acc_t>
struct Stats {
  acc_t m;  // running max of z (-inf: nothing finite seen yet)
  acc_t k;  // how many classes have z == m (finite m): their exp(z - m) are exactly 1
  acc_t s;  // sum exp(z - m) over the other classes
  acc_t t;  // sum v_c (m - z_c); a -inf z_c contributes v_c * inf
  acc_t w;  // sum v_c
  acc_t e;  // kStats: sum exp(z_c - m) (z_c - m) over the classes off the max
  int64_t arg;  // kStats: the first class at the max
};

template <typename acc_t>
NLLF_HD Stats<acc_t> stats_init() { return {neg_inf<acc_t>(), 0, 0, 0, 0, 0, kNoClass}; }

// Whether z is at the max m in argmax's sense: equal, or both NaN (torch.argmax takes a NaN).
template <typename acc_t>
NLLF_HD bool at_max(acc_t z, acc_t m) { return z == m || (z != z && m != m); }

// The class of fold_from's value i; NoClass where the kernel has no statistics.
struct NoClass {
  NLLF_HD int64_t operator()(int) const { return kNoClass; }
};
struct OneClass {  // fold_one's
  int64_t c;
  NLLF_HD int64_t operator()(int) const { return c; }
};
struct StridedClasses {  // value i is class c0 + i * step
  int64_t c0, step;
  NLLF_HD int64_t operator()(int i) const { return c0 + i * step; }
};
template <int VEC>
struct VectorClasses {  // value i is element i % VEC of vector v + (i / VEC) G of the row's
  int64_t head, v, G;
  NLLF_HD int64_t operator()(int i) const { return head + (v + (i / VEC) * G) * VEC + i % VEC; }
};

// Fold K values whose max is zmax into m, k and s (and rescale t to the new max). Padding
// slots must be -inf.
// With kStats, cls(i) is value i's class (padding slots never reach the max: they are -inf
// while the max is above, and the first slot is always a class).
template <int F, int K, typename acc_t, typename ClassOf = NoClass>
NLLF_HD void fold_from(Stats<acc_t>& st, const acc_t (&z)[K], acc_t zmax,
                       ClassOf cls = ClassOf{}) {
  const acc_t cm = max_nan(st.m, zmax);
  // The argmax: a new max starts over, then the first at it. Values all below the running max
  // (zmax < m: nearly every fold of a long row once its max is found) cannot move it, and are
  // not scanned: a compare a fold instead of one a value.
  if constexpr (kHasStats<F>) {
    if (!(zmax < st.m)) {
      if (cm > st.m || (cm != cm && st.m == st.m)) st.arg = kNoClass;
      if (cm == neg_inf<acc_t>()) {  // all -inf so far: every class is at the max
        st.arg = st.arg < cls(0) ? st.arg : cls(0);
      } else {
#pragma unroll
        for (int i = K - 1; i >= 0; --i)
          if (at_max(z[i], cm) && cls(i) < st.arg) st.arg = cls(i);
      }
    }
  }
  if (cm == neg_inf<acc_t>()) return;  // all -inf so far: s stays 0, no exp(-inf - -inf)
  if (!(cm == st.m)) {  // the max grew (or is NaN): the old max's terms become ordinary ones
    if constexpr (kHasStats<F>) {  // each e (z - m_old) becomes f e (z - m_old + m_old - cm)
      st.e = st.m == neg_inf<acc_t>()
                 ? acc_t(0)
                 : (st.e + (st.m - cm) * (st.s + st.k)) * acc_exp(st.m - cm);
    }
    st.s = (st.s + st.k) * acc_exp(st.m - cm);  // st.m == -inf: exp(-inf) = 0, s = k = 0
    st.k = acc_t(0);
    // With st.m == -inf every value seen was -inf and already counted as v * inf in t.
    if constexpr (kMayT<F>) {
      if (st.m != neg_inf<acc_t>()) st.t += st.w * (cm - st.m);
    }
    st.m = cm;
  }
  // A +inf max: exp(inf - inf) makes the row NaN, as in torch.
  if (cm == pos_inf<acc_t>()) st.s = quiet_nan<acc_t>();
  const ExpFrom<acc_t> ex(cm);
  acc_t count = 0, sum = 0, ent = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (z[i] == cm) {
      count += acc_t(1);
    } else {
      const acc_t e = ex.term(z[i]);
      sum += e;
      // a class at -inf adds e (z - m) = 0 (not 0 * -inf): z - m floored at the lowest finite
      // value, one max and a multiply-add where a test and a select took two more
      if constexpr (kHasStats<F>) ent += e * max_nan(z[i] - cm, lowest<acc_t>());
    }
  }
  st.k += count;
  st.s += ex.scale(sum);
  if constexpr (kHasStats<F>) st.e += ex.scale(ent);
}
template <int F, int K, typename acc_t, typename ClassOf = NoClass>
NLLF_HD void fold(Stats<acc_t>& st, const acc_t (&z)[K], ClassOf cls = ClassOf{}) {
  static_assert((K & (K - 1)) == 0, "fold: K must be a power of two");
  fold_from<F>(st, z, tree_max<K>(z), cls);
}

// sum += v, its rounding error added to err (Neumaier's compensated sum; the caller adds err
// to sum at the end): for one thread's long serial sums, whose float rounding grows with their
// length where near-equal terms round the same way.
template <typename acc_t>
NLLF_HD void add_compensated(acc_t& sum, acc_t& err, acc_t v) {
  const acc_t r = sum + v;
  const bool sum_larger = (sum < acc_t(0) ? -sum : sum) >= (v < acc_t(0) ? -v : v);
  err += sum_larger ? (sum - r) + v : (v - r) + sum;
  sum = r;
}

// Add one class to t and w; call after fold() has seen z (st.m >= z). A probability target class
// with v == 0 adds nothing, even at z = -inf (no 0 * inf); index targets keep torch's NaN there.
// With t_err and w_err, compensated (the tile mapping: a thread adds C / TY terms one after
// the other; aux was 6e-5 off at C = 50257, where torch's is exact).
template <int F, typename acc_t>
NLLF_HD void add_t(Stats<acc_t>& st, acc_t z, acc_t v, acc_t* t_err = nullptr,
                   acc_t* w_err = nullptr) {
  if constexpr ((F & kProb) != 0) {
    if (v == acc_t(0)) return;
  }
  const acc_t diff = (z == neg_inf<acc_t>()) ? pos_inf<acc_t>() : (st.m - z);
  if (t_err) {
    add_compensated(st.t, *t_err, v * diff);
    add_compensated(st.w, *w_err, v);
    return;
  }
  st.t += v * diff;
  st.w += v;
}

// Add x's k + s into r (r.m >= x.m): at the common max x keeps its count, else its terms all
// become ordinary ones.
template <int F, typename acc_t>
NLLF_HD void merge_sum(Stats<acc_t>& r, const Stats<acc_t>& x) {
  if (x.m == r.m) {
    r.k += x.k;
    r.s += x.s;
    if constexpr (kHasStats<F>) r.e += x.e;
  } else {
    const acc_t f = acc_exp(x.m - r.m);
    r.s += (x.s + x.k) * f;
    if constexpr (kHasStats<F>) {
      if (x.m != neg_inf<acc_t>()) r.e += (x.e + (x.m - r.m) * (x.s + x.k)) * f;
    }
  }
}

template <int F, typename acc_t>
NLLF_HD Stats<acc_t> merge(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  Stats<acc_t> r;
  r.m = max_nan(a.m, b.m);
  r.k = acc_t(0);
  r.s = acc_t(0);
  r.e = acc_t(0);
  r.arg = kNoClass;
  if (r.m != neg_inf<acc_t>()) {
    merge_sum<F>(r, a);
    merge_sum<F>(r, b);
  }
  if constexpr (kHasStats<F>) {  // the first class at the common max (ties: the smaller)
    if (at_max(a.m, r.m)) r.arg = a.arg;
    if (at_max(b.m, r.m) && b.arg < r.arg) r.arg = b.arg;
  }
  r.t = acc_t(0);
  r.w = acc_t(0);
  if constexpr (kMayT<F>) {
    r.t = a.t + b.t;
    if (a.m != neg_inf<acc_t>()) r.t += a.w * (r.m - a.m);
    if (b.m != neg_inf<acc_t>()) r.t += b.w * (r.m - b.m);
    r.w = a.w + b.w;
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// Rows.

// Row r = (n, d) of the logits: its first class and its probability targets' offset.
template <typename scalar_t>
struct Row {
  int64_t n, d;
  const scalar_t* x;
  int64_t qoff;  // n*tN + d*tD
};

template <typename scalar_t, typename acc_t>
NLLF_HD Row<scalar_t> row_at(const CEParams<acc_t>& p, const scalar_t* x, int64_t r) {
  const int64_t n = r / p.D, d = r % p.D;
  return Row<scalar_t>{n, d, x + n * p.sN + d * p.sD, n * p.tN + d * p.tD};
}

// ------------------------------------------------------------------------------------------
// Forward per-thread work. These functions are the whole per-element logic of the kernels.

template <typename scalar_t, int F, typename acc_t>
NLLF_HD void fold_one(Stats<acc_t>& st, const CEParams<acc_t>& p, scalar_t xv, int64_t c,
                      int64_t qoff) {
  const acc_t z[1] = {to_z<F>(p, static_cast<acc_t>(xv))};
  fold<F>(st, z, OneClass{c});
  if constexpr (kMayT<F>) {
    if (need_t<F>(p)) add_t<F>(st, z[0], class_v<F, scalar_t>(p, qoff, c));
  }
}

// Fold U 16-byte vectors, the first `valid` of them real (the others -inf; FULL: all U);
// vector u is the row's vector v + u*G, its element j the class head + (v + u*G)*VEC + j.
template <typename scalar_t, int F, bool FULL, int U, typename acc_t, typename vec_t>
NLLF_HD void fold_vectors(Stats<acc_t>& st, const CEParams<acc_t>& p, const vec_t (&buf)[U],
                          int valid, int64_t v, int G, int64_t head, int64_t qoff) {
  constexpr int VEC = kVec<scalar_t>;
  acc_t z[U * VEC];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    acc_t x[VEC];
    unpack(buf[u], x);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      z[u * VEC + j] = FULL || u < valid ? to_z<F>(p, x[j]) : neg_inf<acc_t>();
  }
  const VectorClasses<VEC> cls{head, v, G};
  if constexpr (FULL && !kMayTransform<F>) {
    fold_from<F>(st, z, vectors_max<acc_t>(buf), cls);  // z = x: the max of the stored values
  } else {
    fold<F>(st, z, cls);
  }
  if constexpr ((F & (kProb | kWeight | kRuntime)) == 0 && kMayT<F>) {
    // Unweighted smoothing, v_c = 1: w counts the classes, t sums m - z_c (each >= 0; a -inf
    // z_c adds +inf, and so does every value when st.m is still -inf: all were -inf).
    acc_t sum = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (FULL || u < valid) sum += st.m - z[u * VEC + j];
    }
    st.t += st.m == neg_inf<acc_t>() ? pos_inf<acc_t>() : sum;
    st.w += static_cast<acc_t>((FULL ? U : valid) * VEC);
  } else if constexpr (kMayT<F>) {
    if (!need_t<F>(p)) return;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (FULL || u < valid) {
        const int64_t c0 = head + (v + static_cast<int64_t>(u) * G) * VEC;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          add_t<F>(st, z[u * VEC + j], class_v<F, scalar_t>(p, qoff, c0 + j));
      }
    }
  }
}

// A row split over `parts` groups (few long rows: choose_launch): part `part` takes the row's
// 16-byte vectors [v0, v1), whole steps of `span` vectors but the last part's rest, the
// first part also the scalar head and the last the scalar tail. Unsplit: one part, everything.
struct RowPart {
  int64_t v0, v1;
  bool head, tail;
};
NLLF_HD RowPart row_part(int64_t nvec, int64_t span, int part, int parts) {
  if (parts <= 1) return RowPart{0, nvec, true, true};
  const int64_t per = ((nvec + parts - 1) / parts + span - 1) / span * span;
  const int64_t v0 = per * part < nvec ? per * part : nvec;
  const int64_t v1 = part == parts - 1 ? nvec : (v0 + per < nvec ? v0 + per : nvec);
  return RowPart{v0, v1, part == 0, part == parts - 1};
}

// Whether thread `tid` of a G-thread group working on part rp of a row (head scalar classes,
// nvec vectors of VEC, a scalar tail) handles class c: in each piece the i-th element (the i-th
// vector of the part) goes to thread i % G.
NLLF_HD bool owns_class(int64_t c, int64_t head, int64_t nvec, int VEC, const RowPart& rp,
                        int tid, int G) {
  if (c < head) return rp.head && c % G == tid;
  if (c < head + nvec * VEC) {
    const int64_t v = (c - head) / VEC;
    return v >= rp.v0 && v < rp.v1 && (v - rp.v0) % G == tid;
  }
  return rp.tail && (c - head - nvec * VEC) % G == tid;
}

// Thread `tid` of a G-thread group, contiguous row xrow[0 .. C), part `part` of `parts`
// (row_part). C == 0: nothing.
template <typename scalar_t, int F, typename acc_t>
NLLF_HD Stats<acc_t> fwd_row_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                     int64_t C, int64_t qoff, int tid, int G, int part = 0,
                                     int parts = 1) {
  constexpr int VEC = kVec<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  Stats<acc_t> st = stats_init<acc_t>();
  const int64_t head = vec_head<scalar_t>(xrow, C);
  const int64_t nvec = (C - head) / VEC;
  constexpr int U = kUnroll<F>;
  const int64_t span = static_cast<int64_t>(G) * U;
  const RowPart rp = row_part(nvec, span, part, parts);
  if (rp.head)
    for (int64_t c = tid; c < head; c += G) fold_one<scalar_t, F>(st, p, xrow[c], c, qoff);

  const vec_t* vrow = reinterpret_cast<const vec_t*>(xrow + head);
  // The hot loop: steps in which each thread of the group has all its U vectors (every load
  // in flight before any is used), no bounds test inside.
  const vec_t* ptr = vrow + rp.v0 + tid;
  const vec_t* const full_end = vrow + rp.v0 + (rp.v1 - rp.v0) / span * span;
  for (; ptr < full_end; ptr += span) {
    vec_t buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) buf[u] = ptr[u * G];
    fold_vectors<scalar_t, F, true>(st, p, buf, U, ptr - vrow, G, head, qoff);
  }
  // The last, partial step: the vectors that exist (a missing one loads the thread's first
  // again, unconditional loads keep the buffer in registers, and is folded as -inf).
  const int64_t v = ptr - vrow;
  if (v < rp.v1) {
    vec_t buf[U];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = v + static_cast<int64_t>(u) * G < rp.v1;
      valid += ok;
      buf[u] = ptr[ok ? u * G : 0];
    }
    fold_vectors<scalar_t, F, false>(st, p, buf, valid, v, G, head, qoff);
  }

  if (rp.tail)
    for (int64_t c = head + nvec * VEC + tid; c < C; c += G)
      fold_one<scalar_t, F>(st, p, xrow[c], c, qoff);
  return st;
}

// Thread `ty` of TY threads sharing a row with class stride p.sC (tile mapping).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD Stats<acc_t> fwd_strided_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                         int64_t C, int64_t qoff, int ty, int TY) {
  Stats<acc_t> st = stats_init<acc_t>();
  acc_t t_err = 0, w_err = 0;  // (add_t's compensation)
  const int64_t step = static_cast<int64_t>(TY);
  for (int64_t c0 = ty; c0 < C; c0 += step * kTileUnroll) {
    acc_t z[kTileUnroll];
#pragma unroll
    for (int u = 0; u < kTileUnroll; ++u) {
      const int64_t c = c0 + u * step;
      z[u] = c < C ? to_z<F>(p, static_cast<acc_t>(xrow[c * p.sC])) : neg_inf<acc_t>();
    }
    fold<F>(st, z, StridedClasses{c0, step});
    if constexpr (kMayT<F>) {
      if (!need_t<F>(p)) continue;
#pragma unroll
      for (int u = 0; u < kTileUnroll; ++u) {
        const int64_t c = c0 + u * step;
        if (c < C) add_t<F>(st, z[u], class_v<F, scalar_t>(p, qoff, c), &t_err, &w_err);
      }
    }
  }
  if (t_err - t_err == acc_t(0)) st.t += t_err;  // (not where an infinite term made it NaN)
  if (w_err - w_err == acc_t(0)) st.w += w_err;
  return st;
}

// Row r's statistics (kStats; csrc/ops.cpp, ce_fwd_stats) from its reduced state, logd =
// log(k + s). The entropy -sum p_c log p_c = log d - e / d (two terms >= 0): NaN where the
// softmax is (a +inf logit, a NaN, every class -inf: 0 / 0). The target's log-probability
// (z_y - m) - log d, as the loss's (m - z_y) + log d; 0 on ignored rows and for probability
// targets, NaN for a target out of range.
template <typename scalar_t, int F, typename acc_t>
NLLF_HD void fwd_finish_stats(const CEParams<acc_t>& p, const Row<scalar_t>& row, int64_t r,
                              const Stats<acc_t>& st, acc_t logd) {
  const bool pinf = st.m == pos_inf<acc_t>();
  p.entropy[r] = pinf ? quiet_nan<acc_t>() : logd - st.e / (st.k + st.s);
  p.predicted[r] = st.arg == kNoClass ? 0 : st.arg;
  acc_t tlp = 0;
  if constexpr ((F & kProb) == 0) {
    const int64_t y = load_index(p, row.n, row.d);
    if (y != p.ignore_index) {
      if (y < 0 || y >= p.C || pinf || logd != logd) {
        tlp = quiet_nan<acc_t>();
      } else {
        const acc_t zy = to_z<F>(p, static_cast<acc_t>(row.x[y * p.sC]));
        tlp = (zy - st.m) - logd;
      }
    }
  }
  p.target_logp[r] = tlp;
}

// Row r with its reduced stats: write loss, lse, aux (and with kStats the statistics).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD void fwd_finish(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                        const Stats<acc_t>& st) {
  const Row<scalar_t> row = row_at(p, x, r);
  const double logd64 = log_sum(static_cast<double>(st.k), static_cast<double>(st.s));
  const acc_t logd = static_cast<acc_t>(logd64);
  acc_t loss, aux;
  if constexpr ((F & kProb) != 0) {
    // sum_c v_c (lse - z_c), v_c = w_c q'_c
    // (a row with no mass anywhere: 0, even all -inf, where log(k + s) = -inf; NaN where it
    // holds a NaN or +inf, as torch's 0 * NaN)
    loss = st.t + (st.w != acc_t(0) || logd != logd ? st.w * logd : acc_t(0));
    aux = st.w;
  } else {
    const int64_t y = load_index(p, row.n, row.d);
    if (y == p.ignore_index) {
      loss = aux = acc_t(0);
    } else if (y < 0 || y >= p.C) {
      loss = aux = quiet_nan<acc_t>();
    } else {
      const acc_t wy = p.weight ? ldg(p.weight + y) : acc_t(1);
      const acc_t zy = to_z<F>(p, static_cast<acc_t>(row.x[y * p.sC]));
      loss = p.one_minus_eps * wy * ((st.m - zy) + logd);
      if (has<F, kSmooth>(p)) loss += p.eps_over_C * (st.t + st.w * logd);
      aux = wy;
    }
  }
  p.loss[r] = loss;
  // A +inf max (the row holds no NaN: max_nan would have kept it) made log d NaN (fold_from),
  // and so the loss: its lse is +inf, as torch.logsumexp's (csrc/ops.cpp).
  p.lse[r] = static_cast<double>(st.m) + (st.m == pos_inf<acc_t>() ? 0.0 : logd64);
  p.aux[r] = aux;
  if constexpr (kHasStats<F>) fwd_finish_stats<scalar_t, F>(p, row, r, st, logd);
}

// ------------------------------------------------------------------------------------------
// One thread's share of one row, as the kernels (ce_kernels.cuh) and the emulator run it.

// Forward partial state of thread tid of row r's G-thread group (rows mapping) or of thread-row
// ty of TY (tile mapping). r >= R: a thread that only joins the reductions, with an empty state.
// Rows mapping with parts > 1: part `part` of the row (row_part).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD Stats<acc_t> fwd_rows_thread(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                                     int tid, int G, int part = 0, int parts = 1) {
  const Row<scalar_t> row = row_at(p, x, r < p.R ? r : 0);
  return fwd_row_partial<scalar_t, F>(p, row.x, r < p.R ? p.C : 0, row.qoff, tid, G, part,
                                      parts);
}
template <typename scalar_t, int F, typename acc_t>
NLLF_HD Stats<acc_t> fwd_tile_thread(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                                     int ty, int TY) {
  const Row<scalar_t> row = row_at(p, x, r < p.R ? r : 0);
  return fwd_strided_partial<scalar_t, F>(p, row.x, r < p.R ? p.C : 0, row.qoff, ty, TY);
}

// A split row's state from its parts' states, merged in order (part 0 first, one at a time):
// the same result whichever blocks finished first.
template <int F, typename acc_t>
NLLF_HD Stats<acc_t> merge_parts(const Stats<acc_t>* part, int parts) {
  Stats<acc_t> st = part[0];
  for (int j = 1; j < parts; ++j) st = merge<F>(st, part[j]);
  return st;
}

#undef NLLF_HD

}  // namespace cuda_impl
}  // namespace nllfused

