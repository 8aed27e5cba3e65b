// CUDA backend of nllfused::ce_fwd / nllfused::ce_bwd (contract: csrc/ops.cpp, maths: GUIDE §1).
//
// Layout. logits are (N, C, D) with any strides; row r = n*D + d is the C values
// x[n, :, d] at x + n*sN + d*sD, step sC. Per-row outputs (loss, lse, aux) are contiguous
// (N, D), i.e. indexed by r. grad_logits is contiguous (N, C, D).
//
// Two mappings, picked by choose_launch():
//  * "rows" (forward: sC == 1; backward: sC == 1 and D == 1): a group of G threads per row,
//    G in {4, 8, 16, 32} (several rows per 256-thread block, warp-shuffle reduction) or
//    G == blockDim.x in {64 .. 512} (one row per block, shuffle + shared-memory reduction).
//    The row is read with 16-byte vector loads, kUnroll vectors in flight per thread; a
//    scalar head handles the elements before the first 16-byte boundary and a scalar tail
//    the remainder (rows need not be 16-byte aligned).
//  * "tile" (every other stride pattern): a (32, TY) block; lane x takes row
//    blockIdx.x*32 + x, thread-row y takes classes y, y+TY, ... with scalar strided loads.
//    Consecutive lanes are consecutive rows, so the (N, C, D)-contiguous case (sD == 1)
//    and the transposed (N, C) case (sN == 1) read and write coalesced.
//
// Forward: one pass over the row with an online softmax. Each thread keeps
//   m = running max of z, k + d = sum exp(z - m): k counts the classes at the max (terms of
//   exactly 1), d sums the others, so that a confident row's tiny terms are not rounded away
//   against the 1; its log(1 + d) then goes through log1p,
//   t = sum v_c (m - z_c), w = sum v_c          (only when label smoothing or prob targets)
// where v_c is the class weight w_c (index targets) or w_c q'_c (probability targets).
// t is kept relative to the running max (rescaled by w*(m_new - m_old) when the max grows),
// so every term is >= 0 and the smoothing / probability loss
//   sum_c v_c (lse - z_c) = t + w log d
// has no cancellation even for logits far from zero. Likewise lse - z_y = (m - z_y) + log d.
// Backward recomputes p = exp(z - lse) from the saved lse; no reductions; the true class
// uses expm1 so that (p_y - 1) keeps its precision, rounded once to the output dtype.
//
// Accumulation: float for half/bfloat16/float, double for double (at::acc_type).
// No host synchronisation anywhere; all offsets are int64.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace nllfused {
namespace cuda_impl {

#define NLLF_HD __host__ __device__ __forceinline__

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

// log sum_c exp(z_c - m) from the k + d of Stats, once per row, in double: accurate whatever
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
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p.tgt)[off]));
    case kProbBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p.tgt)[off]));
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
// Online softmax state.

template <typename acc_t>
struct Stats {
  acc_t m;  // running max of z (-inf: nothing finite seen yet)
  acc_t k;  // how many classes have z == m (finite m): their exp(z - m) are exactly 1
  acc_t d;  // sum exp(z - m) over the other classes
  acc_t t;  // sum v_c (m - z_c); a -inf z_c contributes v_c * inf
  acc_t w;  // sum v_c
};

template <typename acc_t>
NLLF_HD Stats<acc_t> stats_init() {
  return Stats<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// Fold K values into m and d (and rescale t to the new max). Padding slots must be -inf.
template <int K, typename acc_t>
NLLF_HD void fold(Stats<acc_t>& s, const acc_t (&z)[K], bool need_t) {
  acc_t cm = s.m;
#pragma unroll
  for (int k = 0; k < K; ++k) cm = nan_max(cm, z[k]);
  if (cm == neg_inf<acc_t>()) return;  // all -inf so far: d stays 0, no exp(-inf - -inf)
  if (!(cm == s.m)) {  // the max grew (or is NaN): the old max's terms become ordinary ones
    s.d = (s.d + s.k) * acc_exp(s.m - cm);  // s.m == -inf gives exp(-inf) = 0, and d = k = 0
    s.k = acc_t(0);
  }
  // A +inf max is not counted: exp(inf - inf) must make the row NaN, as in torch.
  const bool count = cm != pos_inf<acc_t>();
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (count && z[k] == cm) s.k += acc_t(1);
    else sum += acc_exp(z[k] - cm);
  }
  s.d += sum;
  // With s.m == -inf every value seen was -inf and already counted as v * inf in t.
  if (need_t && s.m != neg_inf<acc_t>()) s.t += s.w * (cm - s.m);
  s.m = cm;
}

// Add one class to t and w; call after fold() has seen z (s.m >= z). A probability target class
// with v == 0 adds nothing, even at z = -inf (no 0 * inf); index targets keep torch's NaN there.
template <typename tgt_t, typename acc_t>
NLLF_HD void add_t(Stats<acc_t>& s, acc_t z, acc_t v) {
  if (is_prob_v<tgt_t> && v == acc_t(0)) return;
  const acc_t diff = (z == neg_inf<acc_t>()) ? pos_inf<acc_t>() : (s.m - z);
  s.t += v * diff;
  s.w += v;
}

// Add x's k + d into r (r.m >= x.m): at the common max x keeps its count, else its terms all
// become ordinary ones.
template <typename acc_t>
NLLF_HD void merge_sum(Stats<acc_t>& r, const Stats<acc_t>& x) {
  if (x.m == r.m) {
    r.k += x.k;
    r.d += x.d;
  } else {
    r.d += (x.d + x.k) * acc_exp(x.m - r.m);
  }
}

template <typename acc_t>
NLLF_HD Stats<acc_t> merge(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  Stats<acc_t> r;
  r.m = nan_max(a.m, b.m);
  r.k = acc_t(0);
  r.d = acc_t(0);
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
// Forward per-thread work. These functions are the whole per-element logic of the kernels.

template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void fold_one(Stats<acc_t>& s, const CEParams<acc_t>& p, scalar_t xv, int64_t c,
                      int64_t qoff) {
  const acc_t z[1] = {to_z(p, static_cast<acc_t>(xv))};
  fold<1>(s, z, p.need_t);
  if (p.need_t) add_t<tgt_t>(s, z[0], class_v<tgt_t>(p, qoff, c));
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

// Thread `tid` of a G-thread group, contiguous row xrow[0 .. C). C == 0: nothing.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_row_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                     int64_t C, int64_t qoff, int tid, int G) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  using vec_t = AlignedVec<scalar_t, VEC>;
  Stats<acc_t> s = stats_init<acc_t>();
  const int64_t head = vec_head<scalar_t>(xrow, C);
  for (int64_t c = tid; c < head; c += G) fold_one<scalar_t, tgt_t>(s, p, xrow[c], c, qoff);

  const int64_t nvec = (C - head) / VEC;
  const vec_t* vrow = reinterpret_cast<const vec_t*>(xrow + head);
  for (int64_t base = 0; base < nvec; base += static_cast<int64_t>(G) * kUnroll) {
    vec_t buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * G + tid;
      if (v < nvec) buf[u] = vrow[v];
    }
    acc_t z[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool ok = base + static_cast<int64_t>(u) * G + tid < nvec;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        z[u * VEC + j] = ok ? to_z(p, static_cast<acc_t>(buf[u].v[j])) : neg_inf<acc_t>();
    }
    fold<kUnroll * VEC>(s, z, p.need_t);
    if (p.need_t) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + static_cast<int64_t>(u) * G + tid;
        if (v < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            add_t<tgt_t>(s, z[u * VEC + j], class_v<tgt_t>(p, qoff, head + v * VEC + j));
        }
      }
    }
  }

  for (int64_t c = head + nvec * VEC + tid; c < C; c += G)
    fold_one<scalar_t, tgt_t>(s, p, xrow[c], c, qoff);
  return s;
}

// Thread `ty` of TY threads sharing a row with class stride p.sC (tile mapping).
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD Stats<acc_t> fwd_strided_partial(const CEParams<acc_t>& p, const scalar_t* xrow,
                                         int64_t C, int64_t qoff, int ty, int TY) {
  Stats<acc_t> s = stats_init<acc_t>();
  const int64_t step = static_cast<int64_t>(TY);
  for (int64_t c0 = ty; c0 < C; c0 += step * kTileUnroll) {
    acc_t z[kTileUnroll];
#pragma unroll
    for (int u = 0; u < kTileUnroll; ++u) {
      const int64_t c = c0 + u * step;
      z[u] = c < C ? to_z(p, static_cast<acc_t>(xrow[c * p.sC])) : neg_inf<acc_t>();
    }
    fold<kTileUnroll>(s, z, p.need_t);
    if (p.need_t) {
#pragma unroll
      for (int u = 0; u < kTileUnroll; ++u) {
        const int64_t c = c0 + u * step;
        if (c < C) add_t<tgt_t>(s, z[u], class_v<tgt_t>(p, qoff, c));
      }
    }
  }
  return s;
}

// Row r = (n, d) with its reduced stats: write loss, lse, aux.
template <typename scalar_t, typename tgt_t, typename acc_t>
NLLF_HD void fwd_finish(const CEParams<acc_t>& p, const scalar_t* xrow, int64_t r, int64_t n,
                        int64_t d, const Stats<acc_t>& s) {
  const double logd64 = log_sum(static_cast<double>(s.k), static_cast<double>(s.d));
  const acc_t logd = static_cast<acc_t>(logd64);
  acc_t loss, aux;
  if constexpr (is_prob_v<tgt_t>) {
    // sum_c v_c (lse - z_c), v_c = w_c q'_c
    loss = s.t + s.w * logd;
    aux = s.w;
  } else {
    const int64_t y = load_index<tgt_t>(p, n, d);
    if (y == p.ignore_index) {
      loss = acc_t(0);
      aux = acc_t(0);
    } else if (y < 0 || y >= p.C) {
      loss = quiet_nan<acc_t>();
      aux = quiet_nan<acc_t>();
    } else {
      const acc_t wy = p.weight ? ldg(p.weight + y) : acc_t(1);
      const acc_t zy = to_z(p, static_cast<acc_t>(xrow[y * p.sC]));
      loss = p.one_minus_eps * wy * ((s.m - zy) + logd);
      if (p.eps != acc_t(0)) loss += p.eps_over_C * (s.t + s.w * logd);  // s.w = sum_c w_c
      aux = wy;
    }
  }
  p.loss[r] = loss;
  p.lse[r] = static_cast<double>(s.m) + logd64;
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
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * G + tid;
      if (v < nvec) buf[u] = vin[v];
    }
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
// Reductions (device only).

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_xor_stats(const Stats<acc_t>& s, int off,
                                                      bool need_t) {
  Stats<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
  o.k = __shfl_xor_sync(0xffffffffu, s.k, off);
  o.d = __shfl_xor_sync(0xffffffffu, s.d, off);
  if (need_t) {
    o.t = __shfl_xor_sync(0xffffffffu, s.t, off);
    o.w = __shfl_xor_sync(0xffffffffu, s.w, off);
  } else {
    o.t = acc_t(0);
    o.w = acc_t(0);
  }
  return o;
}

// Butterfly over aligned groups of `width` lanes (power of two <= 32). Every lane of the
// warp must call it. The result is complete in every lane of the group.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> group_reduce(Stats<acc_t> s, int width, bool need_t) {
  for (int off = width >> 1; off > 0; off >>= 1) s = merge(s, shfl_xor_stats(s, off, need_t));
  return s;
}

// Whole block (blockDim.x a multiple of 32, <= kMaxThreads). Result valid in thread 0.
// Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> block_reduce(Stats<acc_t> s, Stats<acc_t>* red,
                                                    bool need_t) {
  s = group_reduce(s, 32, need_t);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    s = red[0];
    const int nwarps = blockDim.x >> 5;
    for (int i = 1; i < nwarps; ++i) s = merge(s, red[i]);
  }
  __syncthreads();  // red[] is reused by the next row
  return s;
}

// ------------------------------------------------------------------------------------------
// Kernels.

// Rows mapping, forward. G threads per row: G <= 32 (blockDim.x / G rows per block, loop
// trip counts uniform per block so the shuffles see every lane) or G == blockDim.x.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_fwd_rows_kernel(const scalar_t* __restrict__ x,
                       const CEParams<at::acc_type<scalar_t, true>> p, const int G) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ Stats<acc_t> red[kMaxWarps];
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t rbase = static_cast<int64_t>(blockIdx.x) * rows_per_block; rbase < p.R;
       rbase += step) {
    const int64_t r = rbase + grp;
    const bool active = r < p.R;
    const int64_t rr = active ? r : 0;
    const int64_t n = rr / p.D, d = rr % p.D;
    const scalar_t* xrow = x + n * p.sN + d * p.sD;
    const int64_t qoff = n * p.tN + d * p.tD;
    Stats<acc_t> s =
        fwd_row_partial<scalar_t, tgt_t>(p, xrow, active ? p.C : 0, qoff, tid, G);
    if (G <= 32) {
      s = group_reduce(s, G, p.need_t);
    } else {
      s = block_reduce(s, red, p.need_t);
    }
    if (active && tid == 0) fwd_finish<scalar_t, tgt_t>(p, xrow, r, n, d, s);
  }
}

// Tile mapping, forward: block (32, TY); lane = row within the tile, threadIdx.y = class slice.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_fwd_tile_kernel(const scalar_t* __restrict__ x,
                       const CEParams<at::acc_type<scalar_t, true>> p) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ Stats<acc_t> part[kMaxTileY][32];
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t rbase = static_cast<int64_t>(blockIdx.x) * 32; rbase < p.R; rbase += step) {
    const int64_t r = rbase + lane;
    const bool active = r < p.R;
    const int64_t rr = active ? r : 0;
    const int64_t n = rr / p.D, d = rr % p.D;
    const scalar_t* xrow = x + n * p.sN + d * p.sD;
    const int64_t qoff = n * p.tN + d * p.tD;
    Stats<acc_t> s =
        fwd_strided_partial<scalar_t, tgt_t>(p, xrow, active ? p.C : 0, qoff, ty, TY);
    part[ty][lane] = s;
    __syncthreads();
    if (ty == 0 && active) {
      for (int k = 1; k < TY; ++k) s = merge(s, part[k][lane]);
      fwd_finish<scalar_t, tgt_t>(p, xrow, r, n, d, s);
    }
    __syncthreads();  // part[][] is reused by the next tile
  }
}

// Rows mapping, backward (D == 1: output row r is out + r*C). No reductions, so groups
// may leave the loop independently.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_bwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       const CEParams<at::acc_type<scalar_t, true>> p, const int G) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + grp; r < p.R;
       r += step) {
    const int64_t n = r / p.D, d = r % p.D;
    const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, n, d);
    bwd_row_part<scalar_t, tgt_t>(p, b, x + n * p.sN + d * p.sD, out + r * p.C, tid, G);
  }
}

// Tile mapping, backward: output element (n, c, d) at out + n*C*D + c*D + d.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_bwd_tile_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       const CEParams<at::acc_type<scalar_t, true>> p) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 32 + lane; r < p.R; r += step) {
    const int64_t n = r / p.D, d = r % p.D;
    const BwdRow<acc_t> b = make_bwd_row<tgt_t>(p, n, d);
    bwd_strided_part<scalar_t, tgt_t>(p, b, x + n * p.sN + d * p.sD,
                                      out + n * p.C * p.D + d, p.D, ty, TY);
  }
}
// ------------------------------------------------------------------------------------------
// Launch configuration: the one place that maps a problem to blocks.

struct LaunchConfig {
  bool tile;        // tile mapping (strided) instead of rows mapping
  int G;            // rows mapping: threads per row
  int threads;      // rows mapping: blockDim.x
  int tile_y;       // tile mapping: blockDim.y (blockDim.x == 32)
  int64_t blocks;   // gridDim.x (kernels loop over the rows beyond it)
};

inline LaunchConfig choose_launch(int64_t R, int64_t C, bool rows_ok, int vec) {
  LaunchConfig L{};
  int64_t rows_per_block;
  if (rows_ok) {
    const int64_t nvec = (C + vec - 1) / vec;  // 16-byte vectors per row
    L.tile = false;
    if (nvec <= 32 * kUnroll) {
      // small rows: the fewest threads (>= 4, <= a warp) that take a row in one sweep
      L.G = 4;
      while (L.G < 32 && static_cast<int64_t>(L.G) * kUnroll < nvec) L.G *= 2;
      L.threads = kWarpPathThreads;
    } else {
      // a block per row: 64 .. kMaxThreads threads, one sweep when the row allows
      L.G = 64;
      while (L.G < kMaxThreads && static_cast<int64_t>(L.G) * kUnroll < nvec) L.G *= 2;
      L.threads = L.G;
    }
    rows_per_block = L.threads / L.G;
  } else {
    L.tile = true;
    L.tile_y = 1;
    while (L.tile_y < kMaxTileY && static_cast<int64_t>(L.tile_y) * 32 < C) L.tile_y *= 2;
    rows_per_block = 32;
  }
  const int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  L.blocks = blocks < std::numeric_limits<int32_t>::max() ? blocks
                                                           : std::numeric_limits<int32_t>::max();
  return L;
}

// ------------------------------------------------------------------------------------------
// Host side: argument checks and parameter set-up (shared by forward and backward).

inline at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline int prob_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return kProbHalf;
    case at::kBFloat16: return kProbBFloat16;
    case at::kFloat: return kProbFloat;
    case at::kDouble: return kProbDouble;
    default:
      TORCH_CHECK(false, "nllfused ce (CUDA): probability targets must be float16, bfloat16, "
                  "float32 or float64, got ", t);
  }
  return -1;
}

// Checks the inputs common to ce_fwd and ce_bwd; returns the weight as a contiguous tensor
// (undefined when absent).
inline at::Tensor check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double label_smoothing,
                               bool prob_target) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be (N, C, D), got ", logits.sizes());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              op, ": logits must be float16, bfloat16, float32 or float64, got ", st);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  TORCH_CHECK(C >= 1, op, ": need at least one class (C >= 1), got C = ", C);
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits are on ", logits.device());
  if (prob_target) {
    TORCH_CHECK(target.dim() == 3 && target.size(0) == N && target.size(1) == C &&
                    target.size(2) == D,
                op, ": probability targets must have the logits' shape ", logits.sizes(),
                ", got ", target.sizes());
    (void)prob_dtype_code(target.scalar_type());
  } else {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": index targets must be (N, D) = (", N, ", ", D, "), got ", target.sizes());
    const auto tt = target.scalar_type();
    TORCH_CHECK(tt == at::kLong || tt == at::kInt || tt == at::kByte, op,
                ": index targets must be int64, int32 or uint8, got ", tt);
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  at::Tensor w;
  if (weight.has_value() && weight->defined()) {
    w = *weight;
    TORCH_CHECK(w.device() == logits.device(), op, ": weight is on ", w.device(),
                " but logits are on ", logits.device());
    const auto acc = acc_dtype_of(logits.scalar_type());
    TORCH_CHECK(w.scalar_type() == acc, op, ": weight must be ", acc, " (the accumulation dtype of ",
                logits.scalar_type(), " logits), got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": weight must be (C,) = (", C,
                ",), got ", w.sizes());
    w = w.contiguous();
  }
  return w;
}

template <typename acc_t>
CEParams<acc_t> make_params(const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& weight, int64_t ignore_index,
                            double label_smoothing, double logit_scale,
                            double softcap, bool prob_target) {
  CEParams<acc_t> p{};
  p.C = logits.size(1);
  p.D = logits.size(2);
  p.R = logits.size(0) * p.D;
  p.sN = logits.stride(0);
  p.sC = logits.stride(1);
  p.sD = logits.stride(2);
  p.tgt = target.data_ptr();
  p.tN = target.stride(0);
  if (prob_target) {
    p.tC = target.stride(1);
    p.tD = target.stride(2);
    p.prob_dtype = prob_dtype_code(target.scalar_type());
  } else {
    p.tC = 0;
    p.tD = target.stride(1);
    p.prob_dtype = -1;
  }
  p.weight = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  p.weight_sum = nullptr;
  p.ignore_index = ignore_index;
  p.eps = static_cast<acc_t>(label_smoothing);
  p.eps_over_C = static_cast<acc_t>(label_smoothing / static_cast<double>(p.C));
  p.one_minus_eps = static_cast<acc_t>(1.0 - label_smoothing);
  p.scale = static_cast<acc_t>(logit_scale);
  p.has_cap = softcap != 0.0;
  p.cap = static_cast<acc_t>(softcap);
  p.scale_over_cap = p.has_cap ? static_cast<acc_t>(logit_scale / softcap) : acc_t(0);
  p.need_t = prob_target || label_smoothing != 0.0;
  return p;
}

// Calls f(tgt_t{}) with the target type: int64_t / int32_t / uint8_t / ProbTarget.
template <typename F>
void dispatch_target(const at::Tensor& target, bool prob_target, F&& f) {
  if (prob_target) {
    f(ProbTarget{});
    return;
  }
  switch (target.scalar_type()) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kByte: f(uint8_t{}); break;
    default: TORCH_CHECK(false, "nllfused ce (CUDA): unsupported index target dtype ",
                         target.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, bool prob_target) {
  const char* op = "nllfused::ce_fwd (CUDA)";
  const at::Tensor w =
      check_inputs(op, logits, target, weight, label_smoothing, prob_target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const auto opts = logits.options().dtype(acc_dtype_of(logits.scalar_type()));
  at::Tensor loss = at::empty({N, D}, opts);
  at::Tensor lse = at::empty({N, D}, logits.options().dtype(at::kDouble));
  at::Tensor aux = at::empty({N, D}, opts);
  if (N * D == 0) return {loss, lse, aux};

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    CEParams<acc_t> p = make_params<acc_t>(logits, target, w, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<double>();
    p.aux = aux.data_ptr<acc_t>();
    const bool rows_ok = p.sC == 1 || C == 1;
    const LaunchConfig L = choose_launch(p.R, C, rows_ok, 16 / static_cast<int>(sizeof(scalar_t)));
    const scalar_t* x = logits.data_ptr<scalar_t>();
    dispatch_target(target, prob_target, [&](auto tag) {
      using tgt_t = decltype(tag);
      if (L.tile) {
        ce_fwd_tile_kernel<scalar_t, tgt_t>
            <<<static_cast<unsigned>(L.blocks), dim3(32, L.tile_y), 0, stream>>>(x, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        ce_fwd_rows_kernel<scalar_t, tgt_t>
            <<<static_cast<unsigned>(L.blocks), L.threads, 0, stream>>>(x, p, L.G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {loss, lse, aux};
}

at::Tensor ce_bwd_cuda(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                       const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       const at::Tensor& aux, int64_t ignore_index, double label_smoothing,
                       double logit_scale, double softcap, bool prob_target) {
  const char* op = "nllfused::ce_bwd (CUDA)";
  const at::Tensor w =
      check_inputs(op, logits, target, weight, label_smoothing, prob_target);
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  const auto acc = acc_dtype_of(logits.scalar_type());
  const bool has_glse = grad_lse.has_value() && grad_lse->defined();
  const std::pair<const at::Tensor*, const char*> rowwise[] = {
      {&grad_loss, "grad_loss"}, {&lse, "lse"}, {&aux, "aux"},
      {has_glse ? &*grad_lse : nullptr, "grad_lse"}};
  for (const auto& t : rowwise) {
    if (t.first == nullptr) continue;
    TORCH_CHECK(t.first->device() == logits.device(), op, ": ", t.second, " is on ",
                t.first->device(), " but logits are on ", logits.device());
    TORCH_CHECK(t.first->dim() == 2 && t.first->size(0) == N && t.first->size(1) == D, op,
                ": ", t.second, " must be (N, D) = (", N, ", ", D, "), got ",
                t.first->sizes());
    const bool f64 = t.first == &lse || t.second[5] == 'l';  // lse and grad_lse: float64
    const auto want = f64 ? at::kDouble : acc;
    TORCH_CHECK(t.first->scalar_type() == want, op, ": ", t.second, " must be ", want,
                " (for ", logits.scalar_type(), " logits), got ", t.first->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({N, C, D}, logits.options());
  if (N * D == 0) return grad;

  // sum(weight) for the smoothing term, in float64, on the device (no host sync).
  at::Tensor wsum;
  if (w.defined() && !prob_target) wsum = w.sum(at::kDouble);

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_bwd_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    CEParams<acc_t> p = make_params<acc_t>(logits, target, w, ignore_index, label_smoothing,
                                           logit_scale, softcap, prob_target);
    p.weight_sum = wsum.defined() ? wsum.data_ptr<double>() : nullptr;
    p.grad_lse = has_glse ? grad_lse->data_ptr<double>() : nullptr;
    p.glN = has_glse ? grad_lse->stride(0) : 0;
    p.glD = has_glse ? grad_lse->stride(1) : 0;
    p.grad = grad_loss.data_ptr<acc_t>();
    p.gN = grad_loss.stride(0);
    p.gD = grad_loss.stride(1);
    p.lse_in = lse.data_ptr<double>();
    p.lN = lse.stride(0);
    p.lD = lse.stride(1);
    p.aux_in = aux.data_ptr<acc_t>();
    p.aN = aux.stride(0);
    p.aD = aux.stride(1);
    const bool rows_ok = (p.sC == 1 || C == 1) && D == 1;
    const LaunchConfig L = choose_launch(p.R, C, rows_ok, 16 / static_cast<int>(sizeof(scalar_t)));
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    dispatch_target(target, prob_target, [&](auto tag) {
      using tgt_t = decltype(tag);
      if (L.tile) {
        ce_bwd_tile_kernel<scalar_t, tgt_t>
            <<<static_cast<unsigned>(L.blocks), dim3(32, L.tile_y), 0, stream>>>(x, out, p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        ce_bwd_rows_kernel<scalar_t, tgt_t>
            <<<static_cast<unsigned>(L.blocks), L.threads, 0, stream>>>(x, out, p, L.G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return grad;
}

#undef NLLF_HD

}  // namespace cuda_impl
}  // namespace nllfused

TORCH_LIBRARY_IMPL(nllfused, CUDA, m) {
  m.impl("ce_fwd", &nllfused::cuda_impl::ce_fwd_cuda);
  m.impl("ce_bwd", &nllfused::cuda_impl::ce_bwd_cuda);
}
