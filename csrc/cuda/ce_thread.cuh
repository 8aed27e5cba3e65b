// The CUDA backend's per-thread code (contract: csrc/ops.cpp, maths: docs/maths.md): everything
// a thread of the kernels in ce_kernels.cuh does to its classes, __host__ __device__ so that the
// host emulator (tests/cuda_emulation/emu.cu) runs the very same code on a CPU. No torch headers
// but c10's 16-bit float types. Included through ce_kernels.cuh.
//
// Layout. logits are (N, C, D) with any strides; row r = n*D + d is the C values
// x[n, :, d] at x + n*sN + d*sD, step sC. Per-row outputs (loss, lse, aux) are contiguous
// (N, D), i.e. indexed by r. grad_logits is contiguous (N, C, D).
//
// Forward: one pass over the row with an online softmax. Each thread keeps (Stats)
//   m = running max of z, k + s = sum exp(z - m): k counts the classes at the max (terms of
//   exactly 1), s sums the others, so that a confident row's tiny terms are not rounded away
//   against the 1; its log(1 + s) then goes through log1p,
//   t = sum v_c (m - z_c), w = sum v_c          (only when label smoothing or prob targets)
// where v_c is the class weight w_c (index targets) or w_c q'_c (probability targets).
// t is kept relative to the running max (rescaled by w*(m_new - m_old) when the max grows),
// so every term is >= 0 and the smoothing / probability loss
//   sum_c v_c (lse - z_c) = t + w log(k + s)
// has no cancellation even for logits far from zero. Likewise lse - z_y = (m - z_y) + log(k + s).
// Backward recomputes p = exp(z - lse) from the saved lse; no reductions; the true class
// uses expm1 so that (p_y - 1) keeps its precision, rounded once to the output dtype.
//
// Accumulation: float for half/bfloat16/float, double for double (acc_type_t).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace nllfused {
namespace cuda_impl {

#define NLLF_HD __host__ __device__ __forceinline__

// The accumulation type (csrc/ops.cpp): double for double logits, float for the others.
template <typename scalar_t>
using acc_type_t =
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

constexpr int kUnroll = 4;        // 16-byte vectors in flight per thread (rows mapping)
constexpr int kTileUnroll = 4;    // strided loads in flight per thread (tile mapping)
constexpr int kMaxThreads = 512;  // largest block
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxTileY = 16;     // tile mapping: at most 16 x 32 threads
constexpr int kWarpPathThreads = 256;

// ------------------------------------------------------------------------------------------
// Scalar helpers (host versions exist only so the per-thread code can be exercised on a CPU).

template <typename T>
NLLF_HD T pos_inf() { return static_cast<T>(INFINITY); }
template <typename T>
NLLF_HD T neg_inf() { return -static_cast<T>(INFINITY); }
template <typename T>
NLLF_HD T quiet_nan() { return static_cast<T>(NAN); }

// max that propagates NaN (fmaxf would drop it, and the row must become NaN).
template <typename T>
NLLF_HD T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }

NLLF_HD float acc_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}
NLLF_HD double acc_exp(double x) { return ::exp(x); }

// expm1f is not replaced by --use_fast_math (checked in the PTX); keeps p_y - 1 precise.
NLLF_HD float acc_expm1(float x) { return ::expm1f(x); }
NLLF_HD double acc_expm1(double x) { return ::expm1(x); }

// log sum_c exp(z_c - m) from the k + s of Stats, once per row, in double: accurate whatever
// the fast-math flags (logf becomes lg2.approx), and log1p keeps a tiny d when k == 1.
NLLF_HD double log_sum(double k, double d) { return k == 1.0 ? ::log1p(d) : ::log(k + d); }

NLLF_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// --use_fast_math turns tanhf into tanh.approx.f32 (relative error ~2^-11), too coarse for
// float32 softcap. This is libdevice's tanhf algorithm, written out so the flag cannot
// replace it: 1 - 2/(exp(2|x|) + 1) for |x| >= 0.6, an odd polynomial below.
NLLF_HD float acc_tanh(float x) {
  const float ax = fabsf(x);
  const float e = acc_exp(2.0f * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = ax >= 9.0109f ? 1.0f : big;
  big = copysignf(big, x);
  const float x2 = x * x;
  float poly = fmaf(bits_to_float(0x3C80F082u), x2, bits_to_float(0xBD563CAEu));
  poly = fmaf(poly, x2, bits_to_float(0x3E085941u));
  poly = fmaf(poly, x2, bits_to_float(0xBEAAA9EDu));
  poly = poly * x2;
  const float small = fmaf(poly, x, x);
  return ax >= 0.6f ? big : small;
}
NLLF_HD double acc_tanh(double x) { return ::tanh(x); }

template <typename T>
NLLF_HD T ldg(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) AlignedVec {
  scalar_t v[N];
};

// ------------------------------------------------------------------------------------------
// Parameters shared by all kernels (passed by value).

// Probability targets are loaded through a runtime dtype switch (uniform per launch) rather
// than a template parameter: 4x fewer instantiations, the branch costs nothing measurable.
struct ProbTarget {};
enum ProbDtype : int { kProbHalf = 0, kProbBFloat16 = 1, kProbFloat = 2, kProbDouble = 3 };

template <typename tgt_t>
constexpr bool is_prob_v = std::is_same<tgt_t, ProbTarget>::value;

template <typename acc_t>
struct CEParams {
  int64_t R;           // rows = N * D
  int64_t C, D;
  int64_t sN, sC, sD;  // logits strides, in elements
  // target: index (N, D) strides tN, tD; probability (N, C, D) strides tN, tC, tD
  const void* tgt;
  int64_t tN, tC, tD;
  int prob_dtype;
  const acc_t* weight;       // (C,) contiguous or nullptr, in acc_t (csrc/ops.cpp)
  const double* weight_sum;  // device scalar sum(weight) in float64 (backward, index targets)
  int64_t ignore_index;
  acc_t eps, eps_over_C, one_minus_eps;  // label smoothing
  acc_t scale;       // logit_scale a
  acc_t cap;         // softcap s (used when has_cap)
  acc_t scale_over_cap;
  bool has_cap;
  bool need_t;  // probability targets, or label smoothing > 0
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
};

template <typename acc_t>
NLLF_HD acc_t to_z(const CEParams<acc_t>& p, acc_t x) {
  if (p.has_cap) return p.cap * acc_tanh(x * p.scale_over_cap);
  return x * p.scale;
}

template <typename acc_t>
NLLF_HD acc_t load_prob(const CEParams<acc_t>& p, int64_t off) {
  switch (p.prob_dtype) {
    case kProbHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p.tgt)[off]));
    case kProbBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p.tgt)[off]));
    case kProbFloat:
      return static_cast<acc_t>(static_cast<const float*>(p.tgt)[off]);
    default:
      return static_cast<acc_t>(static_cast<const double*>(p.tgt)[off]);
  }
}

template <typename tgt_t, typename acc_t>
NLLF_HD int64_t load_index(const CEParams<acc_t>& p, int64_t n, int64_t d) {
  return static_cast<int64_t>(static_cast<const tgt_t*>(p.tgt)[n * p.tN + d * p.tD]);
}

// v_c: the weight of class c in t / w (w_c, or w_c q'_c for probability targets).
// qoff = n*tN + d*tD (probability targets only).
template <typename tgt_t, typename acc_t>
NLLF_HD acc_t class_v(const CEParams<acc_t>& p, int64_t qoff, int64_t c) {
  const acc_t w = p.weight ? ldg(p.weight + c) : acc_t(1);
  if constexpr (is_prob_v<tgt_t>) {
    const acc_t q = load_prob(p, qoff + c * p.tC);
    return w * (p.one_minus_eps * q + p.eps_over_C);
  } else {
    return w;
  }
}

// ------------------------------------------------------------------------------------------
// Online softmax state: m, k, s as in every backend (the vocabulary is written out once, at
// State in csrc/cpu/ce_cpu_kernels.h).

template <typename acc_t>
struct Stats {
  acc_t m;  // running max of z (-inf: nothing finite seen yet)
  acc_t k;  // how many classes have z == m (finite m): their exp(z - m) are exactly 1
  acc_t s;  // sum exp(z - m) over the other classes
  acc_t t;  // sum v_c (m - z_c); a -inf z_c contributes v_c * inf
  acc_t w;  // sum v_c
};

template <typename acc_t>
NLLF_HD Stats<acc_t> stats_init() {
  return Stats<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Fold K values into m, k and s (and rescale t to the new max). Padding slots must be -inf.
template <int K, typename acc_t>
NLLF_HD void fold(Stats<acc_t>& st, const acc_t (&z)[K], bool need_t) {
  acc_t cm = st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) cm = nan_max(cm, z[k]);
  if (cm == neg_inf<acc_t>()) return;  // all -inf so far: s stays 0, no exp(-inf - -inf)
  if (!(cm == st.m)) {  // the max grew (or is NaN): the old max's terms become ordinary ones
    st.s = (st.s + st.k) * acc_exp(st.m - cm);  // st.m == -inf: exp(-inf) = 0, s = k = 0
    st.k = acc_t(0);
  }
  // A +inf max is not counted: exp(inf - inf) must make the row NaN, as in torch.
  const bool count = cm != pos_inf<acc_t>();
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (count && z[k] == cm) st.k += acc_t(1);
    else sum += acc_exp(z[k] - cm);
  }
  st.s += sum;
  // With st.m == -inf every value seen was -inf and already counted as v * inf in t.
  if (need_t && st.m != neg_inf<acc_t>()) st.t += st.w * (cm - st.m);
  st.m = cm;
}

// Add one class to t and w; call after fold() has seen z (st.m >= z). A probability target class
// with v == 0 adds nothing, even at z = -inf (no 0 * inf); index targets keep torch's NaN there.
template <typename tgt_t, typename acc_t>
NLLF_HD void add_t(Stats<acc_t>& st, acc_t z, acc_t v) {
  if (is_prob_v<tgt_t> && v == acc_t(0)) return;
  const acc_t diff = (z == neg_inf<acc_t>()) ? pos_inf<acc_t>() : (st.m - z);
  st.t += v * diff;
  st.w += v;
}

// Add x's k + s into r (r.m >= x.m): at the common max x keeps its count, else its terms all
// become ordinary ones.
template <typename acc_t>
NLLF_HD void merge_sum(Stats<acc_t>& r, const Stats<acc_t>& x) {
  if (x.m == r.m) {
    r.k += x.k;
    r.s += x.s;
  } else {
    r.s += (x.s + x.k) * acc_exp(x.m - r.m);
  }
}

template <typename acc_t>
NLLF_HD Stats<acc_t> merge(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  Stats<acc_t> r;
  r.m = nan_max(a.m, b.m);
  r.k = acc_t(0);
  r.s = acc_t(0);
  if (r.m != neg_inf<acc_t>()) {
    merge_sum(r, a);
    merge_sum(r, b);
  }
  r.t = a.t + b.t;
  if (a.m != neg_inf<acc_t>()) r.t += a.w * (r.m - a.m);
  if (b.m != neg_inf<acc_t>()) r.t += b.w * (r.m - b.m);
  r.w = a.w + b.w;
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

template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void fold_one(Stats<acc_t>& st, const CEParams<acc_t>& p, scalar_t xv, int64_t c,
                      int64_t qoff) {
  const acc_t z[1] = {to_z(p, static_cast<acc_t>(xv))};
  fold<1>(st, z, p.need_t);
  if (p.need_t) add_t<tgt_t>(st, z[0], class_v<tgt_t>(p, qoff, c));
}

// Element index -> number of leading elements before the first 16-byte boundary; all of
// them (C) when the pointer is not even element aligned, so nothing is vector loaded.
template <typename scalar_t>
NLLF_HD int64_t vec_head(const void* ptr, int64_t C) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (a % sizeof(scalar_t) != 0) return C;
  const int64_t mis = static_cast<int64_t>((a / sizeof(scalar_t)) % VEC);
  const int64_t head = (VEC - mis) % VEC;
  return head < C ? head : C;
}

// One step of a G-thread group's sweep over a row's nvec 16-byte vectors: thread tid's kUnroll
// vectors base + u*G + tid, those that exist, all loads in flight before any is used.
template <typename vec_t>
NLLF_HD void load_step(vec_t (&buf)[kUnroll], const vec_t* vrow, int64_t base, int64_t nvec,
                       int tid, int G) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t v = base + static_cast<int64_t>(u) * G + tid;
    if (v < nvec) buf[u] = vrow[v];
  }
}

// Thread `tid` of a G-thread group, contiguous row xrow[0 .. C). C == 0: nothing.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_row_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                     int64_t C, int64_t qoff, int tid, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using vec_t = AlignedVec<scalar_t, VEC>;
  Stats<acc_t> st = stats_init<acc_t>();
  const int64_t head = vec_head<scalar_t>(xrow, C);
  for (int64_t c = tid; c < head; c += G) fold_one<scalar_t, tgt_t>(st, p, xrow[c], c, qoff);

  const int64_t nvec = (C - head) / VEC;
  const vec_t* vrow = reinterpret_cast<const vec_t*>(xrow + head);
  for (int64_t base = 0; base < nvec; base += static_cast<int64_t>(G) * kUnroll) {
    vec_t buf[kUnroll];
    load_step(buf, vrow, base, nvec, tid, G);
    acc_t z[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool ok = base + static_cast<int64_t>(u) * G + tid < nvec;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        z[u * VEC + j] = ok ? to_z(p, static_cast<acc_t>(buf[u].v[j])) : neg_inf<acc_t>();
    }
    fold<kUnroll * VEC>(st, z, p.need_t);
    if (p.need_t) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * G + tid;
        if (v < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            add_t<tgt_t>(st, z[u * VEC + j], class_v<tgt_t>(p, qoff, head + v * VEC + j));
        }
      }
    }
  }

  for (int64_t c = head + nvec * VEC + tid; c < C; c += G)
    fold_one<scalar_t, tgt_t>(st, p, xrow[c], c, qoff);
  return st;
}

// Thread `ty` of TY threads sharing a row with class stride p.sC (tile mapping).
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_strided_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                         int64_t C, int64_t qoff, int ty, int TY) {
  Stats<acc_t> st = stats_init<acc_t>();
  const int64_t step = static_cast<int64_t>(TY);
  for (int64_t c0 = ty; c0 < C; c0 += step * kTileUnroll) {
    acc_t z[kTileUnroll];
#pragma unroll
    for (int u = 0; u < kTileUnroll; ++u) {
      const int64_t c = c0 + u * step;
      z[u] = c < C ? to_z(p, static_cast<acc_t>(xrow[c * p.sC])) : neg_inf<acc_t>();
    }
    fold<kTileUnroll>(st, z, p.need_t);
    if (p.need_t) {
#pragma unroll
      for (int u = 0; u < kTileUnroll; ++u) {
        const int64_t c = c0 + u * step;
        if (c < C) add_t<tgt_t>(st, z[u], class_v<tgt_t>(p, qoff, c));
      }
    }
  }
  return st;
}

// Row r with its reduced stats: write loss, lse, aux.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void fwd_finish(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                        const Stats<acc_t>& st) {
  const Row<scalar_t> row = row_at(p, x, r);
  const double logd64 = log_sum(static_cast<double>(st.k), static_cast<double>(st.s));
  const acc_t logd = static_cast<acc_t>(logd64);
  acc_t loss, aux;
  if constexpr (is_prob_v<tgt_t>) {
    // sum_c v_c (lse - z_c), v_c = w_c q'_c
    // (a row with no mass anywhere: 0, even all -inf, where log(k + s) = -inf)
    loss = st.t + (st.w != acc_t(0) ? st.w * logd : acc_t(0));
    aux = st.w;
  } else {
    const int64_t y = load_index<tgt_t>(p, row.n, row.d);
    if (y == p.ignore_index) {
      loss = acc_t(0);
      aux = acc_t(0);
    } else if (y < 0 || y >= p.C) {
      loss = quiet_nan<acc_t>();
      aux = quiet_nan<acc_t>();
    } else {
      const acc_t wy = p.weight ? ldg(p.weight + y) : acc_t(1);
      const acc_t zy = to_z(p, static_cast<acc_t>(row.x[y * p.sC]));
      loss = p.one_minus_eps * wy * ((st.m - zy) + logd);
      if (p.eps != acc_t(0)) loss += p.eps_over_C * (st.t + st.w * logd);  // st.w = sum_c w_c
      aux = wy;
    }
  }
  p.loss[r] = loss;
  p.lse[r] = static_cast<double>(st.m) + logd64;
  p.aux[r] = aux;
}

// ------------------------------------------------------------------------------------------
// Backward per-row coefficients and per-element gradient.

// Row r's gradient: chain_c (coef_p p_c - class terms), with grad_loss g and grad_lse gs folded
// into the coefficients: coef_p = g (loss's p-coefficient) + gs, class terms g (...). An ignored
// row has no loss part: zeros when gs == 0, else gs p_c chain_c.
template <typename acc_t>
struct BwdRow {
  int mode;      // 0: compute; 1: zeros (ignored row, gs == 0); 2: out-of-range target (NaN)
  int64_t y;     // index target; -1 on an ignored row
  int64_t qoff;  // probability targets: n*tN + d*tD
  acc_t g;       // grad_loss[r] (0 on an ignored row)
  acc_t geC;     // g eps / C: times w_c, the smoothing class term (index targets)
  acc_t lse_hi;  // float64 lse split in two: p = exp((z - hi) - lo) keeps torch's accuracy
  acc_t lse_lo;  // for logits far from zero, where a single rounded lse would not
  acc_t coef_p;  // gradient = chain (coef_p * p_c - class terms)
  acc_t cy;      // g (1 - eps) w_y
  acc_t cq;      // coef_p - cy
};

template <typename tgt_t, typename acc_t>
NLLF_HD BwdRow<acc_t> make_bwd_row(const CEParams<acc_t>& p, int64_t n, int64_t d) {
  BwdRow<acc_t> b;
  b.mode = 0;
  b.y = -1;
  b.qoff = 0;
  b.coef_p = b.cy = b.cq = b.geC = acc_t(0);
  b.g = p.grad[n * p.gN + d * p.gD];
  const acc_t gs =
      p.grad_lse ? static_cast<acc_t>(p.grad_lse[n * p.glN + d * p.glD]) : acc_t(0);
  const double lse64 = p.lse_in[n * p.lN + d * p.lD];
  b.lse_hi = static_cast<acc_t>(lse64);
  b.lse_lo = static_cast<acc_t>(lse64 - static_cast<double>(b.lse_hi));
  if constexpr (is_prob_v<tgt_t>) {
    b.qoff = n * p.tN + d * p.tD;
    b.cq = b.g * p.aux_in[n * p.aN + d * p.aD] + gs;  // g sum_k w_k q'_k + gs
    b.coef_p = b.cq;
  } else {
    const int64_t y = load_index<tgt_t>(p, n, d);
    if (y == p.ignore_index) {
      b.g = acc_t(0);
      b.mode = gs == acc_t(0) ? 1 : 0;
      b.cq = b.coef_p = gs;
    } else if (y < 0 || y >= p.C) {
      b.mode = 2;
    } else {
      b.y = y;
      const acc_t wy = p.weight ? ldg(p.weight + y) : acc_t(1);
      const acc_t wsum = p.weight ? static_cast<acc_t>(*p.weight_sum) : static_cast<acc_t>(p.C);
      b.geC = b.g * p.eps_over_C;
      b.cy = b.g * (p.one_minus_eps * wy);
      b.cq = b.geC * wsum + gs;
      b.coef_p = b.cy + b.cq;
    }
  }
  return b;
}

template <typename tgt_t, typename acc_t>
NLLF_HD acc_t grad_elem(const CEParams<acc_t>& p, const BwdRow<acc_t>& b, acc_t x, int64_t c) {
  acc_t z, chain;
  if (p.has_cap) {
    const acc_t th = acc_tanh(x * p.scale_over_cap);
    z = p.cap * th;
    chain = p.scale * ((acc_t(1) - th) * (acc_t(1) + th));
  } else {
    z = x * p.scale;
    chain = p.scale;
  }
  const acc_t zs = (z - b.lse_hi) - b.lse_lo;
  const acc_t prob = acc_exp(zs);
  acc_t gr;
  if constexpr (is_prob_v<tgt_t>) {
    gr = b.coef_p * prob - b.g * class_v<tgt_t>(p, b.qoff, c);
  } else {
    const acc_t sw =
        p.eps != acc_t(0) ? b.geC * (p.weight ? ldg(p.weight + c) : acc_t(1)) : acc_t(0);
    if (c == b.y) {
      // coef_p p_y - cy - sw with p_y - 1 from expm1: no cancellation when p_y -> 1
      gr = b.cy * acc_expm1(zs) + b.cq * prob - sw;
    } else {
      gr = b.coef_p * prob - sw;
    }
  }
  return gr * chain;
}

// Fill a contiguous output row (ignored / out-of-range rows): vector stores when possible.
template <typename scalar_t>
NLLF_HD void fill_row(scalar_t* orow, int64_t C, scalar_t val, int tid, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t head = vec_head<scalar_t>(orow, C);
  for (int64_t c = tid; c < head; c += G) orow[c] = val;
  const int64_t nvec = (C - head) / VEC;
  vec_t o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = val;
  vec_t* vout = reinterpret_cast<vec_t*>(orow + head);
  for (int64_t v = tid; v < nvec; v += G) vout[v] = o;
  for (int64_t c = head + nvec * VEC + tid; c < C; c += G) orow[c] = val;
}

// Thread `tid` of a G-thread group: contiguous input row -> contiguous output row.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void bwd_row_part(const CEParams<acc_t>& p, const BwdRow<acc_t>& b,
                          const scalar_t* xrow, scalar_t* orow, int tid, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t C = p.C;
  if (b.mode != 0) {
    fill_row(orow, C, b.mode == 1 ? scalar_t(0) : static_cast<scalar_t>(quiet_nan<acc_t>()),
             tid, G);
    return;
  }
  const int64_t head = vec_head<scalar_t>(xrow, C);
  if (head != vec_head<scalar_t>(orow, C)) {
    // input and output rows sit at different offsets from a 16-byte boundary: scalar path
    for (int64_t c = tid; c < C; c += G)
      orow[c] = static_cast<scalar_t>(grad_elem<tgt_t>(p, b, static_cast<acc_t>(xrow[c]), c));
    return;
  }
  for (int64_t c = tid; c < head; c += G)
    orow[c] = static_cast<scalar_t>(grad_elem<tgt_t>(p, b, static_cast<acc_t>(xrow[c]), c));

  const int64_t nvec = (C - head) / VEC;
  const vec_t* vin = reinterpret_cast<const vec_t*>(xrow + head);
  vec_t* vout = reinterpret_cast<vec_t*>(orow + head);
  for (int64_t base = 0; base < nvec; base += static_cast<int64_t>(G) * kUnroll) {
    vec_t buf[kUnroll];
    load_step(buf, vin, base, nvec, tid, G);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * G + tid;
      if (v < nvec) {
        vec_t o;
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          o.v[j] = static_cast<scalar_t>(
              grad_elem<tgt_t>(p, b, static_cast<acc_t>(buf[u].v[j]), head + v * VEC + j));
        vout[v] = o;
      }
    }
  }

  for (int64_t c = head + nvec * VEC + tid; c < C; c += G)
    orow[c] = static_cast<scalar_t>(grad_elem<tgt_t>(p, b, static_cast<acc_t>(xrow[c]), c));
}

// Thread `ty` of TY threads sharing a row: strided input (p.sC), output step ostep.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void bwd_strided_part(const CEParams<acc_t>& p, const BwdRow<acc_t>& b,
                              const scalar_t* xrow, scalar_t* orow, int64_t ostep, int ty,
                              int TY) {
  const int64_t C = p.C;
  if (b.mode != 0) {
    const scalar_t val =
        b.mode == 1 ? scalar_t(0) : static_cast<scalar_t>(quiet_nan<acc_t>());
    for (int64_t c = ty; c < C; c += TY) orow[c * ostep] = val;
    return;
  }
#pragma unroll 4
  for (int64_t c = ty; c < C; c += TY)
    orow[c * ostep] =
        static_cast<scalar_t>(grad_elem<tgt_t>(p, b, static_cast<acc_t>(xrow[c * p.sC]), c));
}

// ------------------------------------------------------------------------------------------
// One thread's share of one row, as the kernels (ce_kernels.cuh) and the emulator run it.

// Forward partial state of thread tid of row r's G-thread group (rows mapping) or of thread-row
// ty of TY (tile mapping). r >= R: a thread that only joins the reductions, with an empty state.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_rows_thread(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                                     int tid, int G) {
  const Row<scalar_t> row = row_at(p, x, r < p.R ? r : 0);
  return fwd_row_partial<scalar_t, tgt_t>(p, row.x, r < p.R ? p.C : 0, row.qoff, tid, G);
}
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_tile_thread(const CEParams<acc_t>& p, const scalar_t* x, int64_t r,
                                     int ty, int TY) {
  const Row<scalar_t> row = row_at(p, x, r < p.R ? r : 0);
  return fwd_strided_partial<scalar_t, tgt_t>(p, row.x, r < p.R ? p.C : 0, row.qoff, ty, TY);
}

// Backward of row r (< R) by thread tid of its G-thread group (rows mapping, D == 1: output row
// r is out + r*C) or by thread-row ty of TY (tile mapping: element (n, c, d) at
// out + n*C*D + c*D + d).
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void bwd_rows_thread(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* out,
                             int64_t r, int tid, int G) {
  const Row<scalar_t> row = row_at(p, x, r);
  const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, row.n, row.d);
  bwd_row_part<scalar_t, tgt_t>(p, b, row.x, out + r * p.C, tid, G);
}
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void bwd_tile_thread(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* out,
                             int64_t r, int ty, int TY) {
  const Row<scalar_t> row = row_at(p, x, r);
  const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, row.n, row.d);
  bwd_strided_part<scalar_t, tgt_t>(p, b, row.x, out + row.n * p.C * p.D + row.d, p.D, ty, TY);
}

#undef NLLF_HD

}  // namespace cuda_impl
}  // namespace nllfused
