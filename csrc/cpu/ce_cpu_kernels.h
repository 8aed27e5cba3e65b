// The CPU kernels of nllfused::ce_fwd / ce_bwd (contract: csrc/ops.cpp, maths: docs/maths.md),
// written once and compiled once per instruction set (kernels.h says how). The including
// translation unit defines NLLF_CPU_CAPABILITY (default, avx2 or avx512) and, in namespace
// nllfused_cpu::cpu_<capability>, Vec<T>: ATen's at::vec::Vectorized<T> or, for the baseline
// copy, the one-lane ScalarVec. This file declares the kernels (struct Ce) and defines their
// shared pieces; the forward is in ce_cpu_forward.h (its argmax in ce_cpu_argmax.h), the
// backward in ce_cpu_backward.h, and the entry points forward_<capability> /
// backward_<capability> at the end of this file.
//
// How it works
// - One row r = (n, d) of the (N, C, D) logits at a time, rows split over threads with
//   at::parallel_for. The row is walked in chunks of classes small enough to stay in L1: a first
//   sweep over a chunk loads it (converting bf16/fp16, applying logit_scale/softcap into a small
//   buffer when needed) and takes its max; a second sweep, from L1, adds exp(z - m) into an online
//   softmax (State, below) together with the smoothing / soft-target sums (bf16 without a
//   transform: the max from the logits' bits, and the second sweep reads them, no buffer). So the
//   forward reads the logits from memory once with one exp per element, and the backward
//   (p = exp(z - lse) with the saved float64 lse) reads them once and writes the gradient once.
//   Nothing the size of the logits is allocated but the gradient itself.
// - Rows whose classes are not unit-stride (D > 1 layouts, transposed inputs) go through the same
//   per-row code on tiles of kTile neighbouring rows gathered into a buffer, so that the loads of
//   one class for the tile's rows share cache lines (rows consecutive in memory: 16 x 16 blocks
//   transposed in registers, ce_cpu_tile_io.h); the backward scatters the tile back alike.
// - Rows of few classes (lane_max_classes, kernels.h) take the lane path instead
//   (ce_cpu_lanes.h; ce_cpu_lanes_soft.h for probability targets): W2 rows at once, one row
//   per vector lane, the loop over the classes; for a contiguous (N, C, D) input each class of
//   W2 consecutive d is one vector load and store (backward tile groups: ce_cpu_lanes_group.h).
// - Accumulation is in float32 (float64 for float64 logits). The smoothing / soft-target sum
//   sum_c g_c (lse - z_c) is kept as B = sum_c g_c (z_c - m) <= 0 (rescaled with m), never as
//   lse*sum(g) - sum(g z), which would cancel catastrophically for logits ~ 1e4.
#pragma once

#ifndef NLLF_CPU_CAPABILITY
#error "define NLLF_CPU_CAPABILITY (default, avx2, avx512, avx512bf16) before including this"
#endif

#include "kernels.h"

#include <ATen/Dispatch.h>

// Vec is ATen's Vectorized in the SIMD copies, ScalarVec in the baseline one.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define NLLF_SIMD 1
#else
#define NLLF_SIMD 0
#endif

namespace nllfused_cpu::NLLF_CPU_NS {

template <typename scalar_t>
struct Ce {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<acc_t>;
  static constexpr int64_t W = V::size();    // lanes
  static constexpr int64_t W2 = 2 * W;       // elements per inner-loop step (two vectors: ILP)
  static constexpr int64_t kChunk = 2048;    // classes per chunk of the backward's rows
  static constexpr int64_t kRowChunkMax = kMaxRowChunk;  // the forward's (A.chunk) at most
  static constexpr int64_t kStreamAhead = 4096;  // bytes: the backward rows' prefetch (bwd_rows)
  static constexpr int64_t kStreamMinBytes = int64_t(2) << 20;  // ... for logits larger than this
  static constexpr int64_t kTile = 16;       // rows per tile (strided classes)
  // whether a lane tile (W2 lanes) is whole kTile-lane blocks, which transpose_block moves
  static constexpr bool kLaneBlocks = W2 >= kTile && W2 % kTile == 0;
  static constexpr int64_t kGatherAhead = 8;  // gather_tile's prefetch, classes ahead
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
#if NLLF_SIMD
      at::vec::load_to_float(p, a, b);  // 2W bf16/fp16 -> 2 x W float
#else
      acc_t t[W2];
      for (int64_t i = 0; i < W2; ++i) t[i] = static_cast<acc_t>(p[i]);
      a = V::loadu(t);
      b = V::loadu(t + W);
#endif
    }
  }
  // Split order: where the translation unit has it (NLLF_HAVE_BF16_SPLIT), a 2W block of bf16
  // loads as its even classes (vector a) and its odd ones (b), and stores back alike, at about
  // half the instructions of the ordered conversions. For loops to which the order of the
  // classes within a block does not matter: sums over the classes, elementwise gradients --
  // not per-class weights or soft targets, nor a position (argmax, the target), which map
  // through split_class / split_pos.
#ifdef NLLF_HAVE_BF16_SPLIT
  static constexpr bool kSplit = std::is_same_v<scalar_t, at::BFloat16>;
#else
  static constexpr bool kSplit = false;
#endif
  static inline int64_t split_class(int64_t q) { return q < W ? 2 * q : 2 * (q - W) + 1; }
  static inline int64_t split_pos(int64_t c) { return c & 1 ? W + c / 2 : c / 2; }
  template <bool Split, typename src_t>
  static inline void load2s(const src_t* p, V& a, V& b) {
#ifdef NLLF_HAVE_BF16_SPLIT
    if constexpr (Split) return load_bf16_split(p, a, b);
#endif
    load2(p, a, b);
  }
  template <bool Split, typename dst_t>
  static inline void store2s_finite(dst_t* p, V a, V b) {
#ifdef NLLF_HAVE_BF16_SPLIT
    if constexpr (Split) return store_bf16_split_finite(p, a, b);
#endif
    store2_finite(p, a, b);
  }
  template <typename src_t>
  static inline void load2_tail(const src_t* p, int64_t n, acc_t fill, V& a, V& b) {
    acc_t t[W2];
    for (int64_t i = 0; i < W2; ++i) t[i] = i < n ? static_cast<acc_t>(p[i]) : fill;
    a = V::loadu(t);
    b = V::loadu(t + W);
  }
  // W values, one vector: load1 converts 16-bit ones, store1 rounds them once, as store2.
  template <typename src_t>
  static inline V load1(const src_t* p) {
    if constexpr (std::is_same_v<src_t, acc_t>) return V::loadu(p);
#if NLLF_SIMD
    if constexpr (std::is_same_v<acc_t, float> && sizeof(src_t) == 2) {
      V v;
      at::vec::load_to_float(p, v);
      return v;
    }
#endif
    alignas(64) acc_t b[W];
    for (int64_t j = 0; j < W; ++j) b[j] = static_cast<acc_t>(p[j]);
    return V::loadu(b);
  }
  template <typename dst_t>
  static inline void store1(dst_t* p, V a) {
    if constexpr (std::is_same_v<dst_t, acc_t>) {
      a.store(p);
    } else {
#if NLLF_SIMD
      at::vec::convert_from_float<dst_t>(a, a).store(p, W);
#else
      store2_tail(p, W, a, a);
#endif
    }
  }
  template <typename dst_t>
  static inline void store2(dst_t* p, V a, V b) {
    if constexpr (std::is_same_v<dst_t, acc_t>) {
      a.store(p);
      b.store(p + W);
    } else {
#if NLLF_SIMD
      at::vec::convert_from_float<dst_t>(a, b).store(p);  // one rounding, to nearest even
#else
      store2_tail(p, W2, a, b);
#endif
    }
  }
  // store2 for values known not to be NaN: where the translation unit has one (kernels_avx2.cpp),
  // a bf16 store without ATen's NaN fix-up, a third of the backward's bf16 conversion.
  template <typename dst_t>
  static inline void store2_finite(dst_t* p, V a, V b) {
#ifdef NLLF_HAVE_STORE_BF16_FINITE
    if constexpr (std::is_same_v<dst_t, at::BFloat16>) return store_bf16_finite(p, a, b);
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
  // fold's step in a chunk holding the max: e added to s where a != 0, the classes at the max
  // (a == 0, e = 1) counted into k instead. Where the translation unit has masked adds
  // (kernels_avx512.h), one compare and two masked adds; else 0/1 arithmetic.
  static inline void add_or_count(V a, V e, V& s, V& k) {
#ifdef NLLF_HAVE_ADD_OR_COUNT
    if constexpr (std::is_same_v<acc_t, float>) return add_or_count_f(a, e, s, k);
#endif
    const V hit = a.eq(V(acc_t(0)));  // 1 or 0
    s = s + e * (V(acc_t(1)) - hit);
    k = k + hit;
  }
  // exp for arguments <= ~0 (z - max, z - lse), the hot spot of both sweeps. For float in the
  // SIMD copies: exp(x) = 2^n exp(r), n = round(x log2 e) via the 1.5*2^23 shifter (which also
  // leaves n + 127 in the low mantissa bits of tt, i.e. 2^n after a shift), r = x - n ln2, exp(r)
  // by a degree-5 polynomial fitted for relative error (2.4e-7 on [-ln2/2, ln2/2]). 12
  // instructions where Vectorized::exp_u20 takes ~19. The last step, exp_finish(x, tt, p), is the
  // translation unit's own: p 2^n, exactly 0 where x <= -87 (incl. -inf, where n and 2^n are
  // garbage), NaN kept (the forward relies on that: its max sweep does not look for NaN).
  // (The forward's fold takes exp2_tiny instead where the unit has it, kTinyExp.)
  // Arguments must stay below 88 (2^n overflows the exponent): z <= max, and lse >= max.
  static inline V vexp(V x) {
#if NLLF_SIMD
    if constexpr (std::is_same_v<acc_t, float>) {
      const V shifter(12582912.0f + 127.0f);
      const V tt = fmadd(x, V(1.44269504088896341f), shifter);
      const V n = tt - shifter;
      const V r = fmadd(n, V(-0.693147180559945309f), x);
      V p = fmadd(V(0.00829826295375824f), r, V(0.0419168658554554f));
      p = fmadd(p, r, V(0.16667574644088745f));
      p = fmadd(p, r, V(0.4999887943267822f));
      p = fmadd(p, r, V(0.9999997019767761f));
      p = fmadd(p, r, V(1.0f));
      return exp_finish(x, tt, p);
    }
#endif
    return x.exp_u20();  // float64: Sleef's exp; baseline: std::exp
  }
  // The fold's exp for float32 and 16-bit logits where the unit has it (exp2_tiny, the SIMD
  // copies): AVX-512 9 instructions a vector (reduce and scalef) where vexp's fold step takes 12,
  // AVX2 12 where it takes 13. The 16-bit fold is bound by its instructions everywhere, float32's
  // on a core whose 512-bit units are half as wide (AMD Zen 4: +20 % from L2,
  // bench/results/cpu-zen4-*). It runs under TinyScope, set once per range of rows (fwd_rows,
  // fwd_tiles; per chunk, its two MXCSR writes cost 2-4 %): MXCSR's flush-to-zero (FlushTiny,
  // kernels.h), so that exp's results below 2^-126 become 0 without the microcode assist a
  // denormal or underflowing result otherwise takes. The rows' other results below 2^-126
  // (log d of a row whose other terms are all below it, ...) are flushed alike: differences
  // under 2^-126, where torch's own sums already round to 0.
  // The fold's argument for exp2_tiny is u(z) = z log2 e + tiny_offset(m) (fold_steps), the
  // offset -m log2 e rounded to an integer (as exp2_affine_plus needs). Its terms carry a factor
  // 2^u(m), |u(m)| <= 1/2 + |m| 2e-8, which fold takes out. Rows whose |max| >= kTinyRefMax fold
  // with vexp (z - m): there exp2_affine_plus's shifter would not hold n + c + 127 exactly.
  static constexpr double kLog2eD = 1.44269504088896341;
  static constexpr acc_t kLog2e = acc_t(kLog2eD);
  static constexpr acc_t kTinyRefMax = acc_t(0x1p21);
  static acc_t tiny_offset(acc_t m) {
    return static_cast<acc_t>(std::nearbyint(-static_cast<double>(m) * kLog2eD));
  }
#ifdef NLLF_HAVE_EXP2_TINY
  static constexpr bool kTinyExp = std::is_same_v<acc_t, float>;
  struct NoScope {};
  using TinyScope = std::conditional_t<kTinyExp, FlushTiny, NoScope>;
#else
  static constexpr bool kTinyExp = false;
  struct TinyScope {};
#endif
  // vlog1p's quotients: r / (r + 2), r in [sqrt(1/2) - 1, sqrt(2) - 1), whose error enters the
  // log times r^2 / 4, and c / w, the rounding of w over w >= 1. Where the unit has div_approx
  // (AVX-512) a reciprocal and a Newton step, 1-2 ulp; else the division.
  static inline V quotient(V a, V d) {
#ifdef NLLF_HAVE_DIV_APPROX
    if constexpr (std::is_same_v<acc_t, float>) return div_approx(a, d);
#endif
    return a / d;
  }
  // where(x == y, b, a): the lane path's picks of its target's values per lane (select_eq_f
  // where the unit has it).
  static inline V select_eq(V a, V b, V x, V y) {
#ifdef NLLF_HAVE_SELECT_EQ
    if constexpr (std::is_same_v<acc_t, float>) return select_eq_f(a, b, x, y);
#endif
    return V::blendv(a, b, x == y);
  }
  // Whether any lane of the vector compare m is set (all ones).
  static inline bool any_lane(V m) {
    constexpr int kNoLane = int((int64_t(1) << W) - 1);  // zero_mask of a vector without one
    return V::blendv(V(acc_t(0)), V(acc_t(1)), m).zero_mask() != kNoLane;
  }
  // where(x == y and i == unset, c, i): the lane path's first class at the max, per lane
  // (first_eq_f where the unit has it).
  static inline V first_eq(V i, V c, V x, V y, V unset) {
#ifdef NLLF_HAVE_FIRST_EQ
    if constexpr (std::is_same_v<acc_t, float>) return first_eq_f(i, c, x, y, unset);
#endif
    return V::blendv(i, c, V::blendv(V(acc_t(0)), x == y, i == unset));
  }
  // log1p for the lane path's log d = log1p((k - 1) + s) (ce_cpu_lanes.h), a vector of rows at
  // a time, where Sleef's log1pf took a seventh of a 4-class forward. For float in the SIMD
  // copies: w = 1 + u, log1p(u) = log(w) - ((w - 1) - u) / w (the rounding of w, to first
  // order); w = 2^e (1 + r), 1 + r in [sqrt(1/2), sqrt(2)) from the bits (log_split, the
  // translation unit's own), log(1 + r) = r - (r^2/2 - s (r^2/2 + R)), s = r / (2 + r), R(s^2)
  // the atanh series (musl's logf). Under 0.82 ulp against float64 on [0, 300] and on tiny u,
  // where Sleef_log1pf8_u10 promises 1 (measured with exact quotients; div_approx's 1-2 ulp
  // enter times r^2 / 4 <= 0.043 and as a part of (w - 1) - u's: hundredths of an ulp). u is
  // -1 (an all -inf row: -inf), NaN or >= 0.
  static inline V vlog1p(V u) {
#if NLLF_SIMD
    if constexpr (std::is_same_v<acc_t, float>) {
      const V one(1.0f), w = u + one, c = (w - one) - u;
      V f, e;
      log_split(w, f, e);
      const V r = f - one, s = quotient(r, r + V(2.0f)), z = s * s;
      V R = fmadd(z, V(2.0f / 9), V(2.0f / 7));
      R = fmadd(R, z, V(2.0f / 5));
      R = fmadd(R, z, V(2.0f / 3)) * z;
      const V hfsq = V(0.5f) * r * r;
      const V lo = fmadd(e, V(1.428606765330187e-06f), V(0.0f) - quotient(c, w));
      const V a = (fmadd(s, hfsq + R, lo) - hfsq) + r;
      const V l = fmadd(e, V(0.693145751953125f), a);  // ln 2 = 0.693145751953125 + 1.4286e-6
      return V::blendv(V::blendv(l, V(-kInf), w == V(0.0f)), w, (w != w) | (w == V(kInf)));
    }
#endif
    return u.log1p();  // float64: Sleef's log1p; baseline: std::log1p
  }
  // Max for the max sweep. In the SIMD copies the plain vmaxps (ATen's clamp_min), which may drop
  // NaN; NaN then reaches the exp sum (vexp keeps it) and the row's lse, and fold() checks the
  // all -inf case by hand.
  static inline V vmax(V a, V b) {
#if NLLF_SIMD
    return clamp_min(b, a);
#else
    return maximum(a, b);
#endif
  }
  // max(a, lowest): -inf becomes the most negative finite number, so that e * a with e = exp(a)
  // = 0 is 0, not 0 * -inf = NaN (the entropy's terms p log p); NaN stays NaN.
  static inline V floor_finite(V a) {
    const V low(std::numeric_limits<acc_t>::lowest());
#if NLLF_SIMD
    return clamp_min(a, low);
#else
    return maximum(a, low);
#endif
  }
  static inline acc_t nan_max(acc_t a, acc_t b) {
    if (std::isnan(a)) return a;
    if (std::isnan(b)) return b;
    return a < b ? b : a;
  }
  // Horizontal sum and max (NaN if any lane is) as trees, where one lane after the other made
  // chains of W dependent operations: with the max sweep's vector tail (chunk_max), a 300-class
  // row's forward 1.4x faster ((4096, 300) fp32, two threads: 462 -> 330 us).
  static inline acc_t hsum(V v) {
    alignas(64) acc_t t[W];
    v.store(t);
    for (int64_t h = W / 2; h >= 1; h /= 2)
      for (int64_t i = 0; i < h; ++i) t[i] += t[i + h];
    return t[0];
  }
  // s + x into the pair (s, c), the rounding error of each addition collected in c (Neumaier).
  // The sums of a confident row are 1 + tiny terms: plain adds of lanes, tail and chunks to that
  // 1 drop each tiny term whole, a biased error of several ulps in log d (torch's: under one).
  static inline void add_exact(acc_t& s, acc_t& c, acc_t x) {
    const acc_t t = s + x;
    c += std::abs(s) >= std::abs(x) ? (s - t) + x : (x - t) + s;
    s = t;
  }
  // The 2W lanes of a and b into the pair (s, c) by add_exact. For float, their sum in double
  // (its rounding, 2^-53 relative, below what the pair (s, c) holds) in four chains, as float
  // hi + lo, where 2W add_exacts each waited on the last ((4096, 300) fp32 forward, two
  // threads: 521 -> 462 us).
  static inline void add_lanes(acc_t& s, acc_t& c, V a, V b) {
    alignas(64) acc_t lanes[W2];
    a.store(lanes);
    b.store(lanes + W);
    if constexpr (std::is_same_v<acc_t, float> && W2 % 4 == 0) {
      double d[4] = {0, 0, 0, 0};
      for (int64_t l = 0; l < W2; l += 4)
        for (int j = 0; j < 4; ++j) d[j] += static_cast<double>(lanes[l + j]);
      const double sum = (d[0] + d[1]) + (d[2] + d[3]);
      const acc_t hi = static_cast<acc_t>(sum);
      add_exact(s, c, hi);
      c += static_cast<acc_t>(sum - static_cast<double>(hi));
    } else {
      for (int64_t l = 0; l < W2; ++l) add_exact(s, c, lanes[l]);
    }
  }
  // Which lanes of a padded tail (load2_tail) hold one of its n < 2W elements: masks for a's
  // and b's lanes, for V::blendv.
  static inline void tail_lanes(int64_t n, V& a, V& b) {
    alignas(64) acc_t live[W2];
    for (int64_t j = 0; j < W2; ++j) live[j] = j < n ? acc_t(1) : acc_t(0);
    a = V::loadu(live) != V(acc_t(0));
    b = V::loadu(live + W) != V(acc_t(0));
  }
  // v where g != 0, else 0 (also where v is NaN: 0 * inf).
  static inline V keep_nonzero(V g, V v) { return V::blendv(V(acc_t(0)), v, g != V(acc_t(0))); }
  static inline acc_t hmax(V v) {
    alignas(64) acc_t t[W];
    v.store(t);
    for (int64_t h = W / 2; h >= 1; h /= 2)
      for (int64_t i = 0; i < h; ++i) t[i] = nan_max(t[i], t[i + h]);
    return t[0];
  }

  // -------------- logit transform z = softcap(a x): 0 none, 1 a*x, 2 s*tanh(a*x/s) --------------
  // z is rounded the same way in every pass (forward, backward, rescans): the extension is built
  // with -ffp-contract=off (setup.py), so no compiler fuses its product into a later z - lse
  // (which gave p = 1 + half an ulp of z where the forward's lse is z); every multiply-add in
  // these kernels is an explicit fmadd / std::fma.
  struct Tf {
    int kind;
    acc_t a, s, as;
  };
  static Tf make_tf(const Args& A) {
    const acc_t a = static_cast<acc_t>(A.a), s = static_cast<acc_t>(A.s);
    if (A.s != 0) return {2, a, s, a / s};
    return {A.a == 1 ? 0 : 1, a, s, 0};
  }
  // z = tf<K>(x), with dz/dx (tf_grad), tanh with sech^2 = 1 - tanh^2 (vtanh): ce_cpu_softcap.h.
  template <int K>
  static V tf(V x, const Tf& t);
  template <int K>
  static V tf_grad(V x, const Tf& t, V& dz);
  static acc_t tf_scalar(acc_t x, const Tf& t, acc_t& dz);
  static V vtanh(V v, V* sech2);

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
  // g_c = w_c q'_c, q' = (1 - e) q + e/C, for classes [c0, c0 + n), whose targets are q[c qC],
  // c < n (g may be q itself: element by element, in place).
  template <typename q_t>
  static void soft_coef_t(const Args& A, const q_t* q, int64_t qC, int64_t c0, int64_t n,
                          acc_t* g) {
    const acc_t om = static_cast<acc_t>(1 - A.eps), ec = static_cast<acc_t>(A.eps / A.C);
    const acc_t* w = weights(A, c0);
    for (int64_t c = 0; c < n; ++c) {
      const acc_t qc = om * static_cast<acc_t>(q[c * qC]) + ec;
      g[c] = w ? w[c] * qc : qc;
    }
  }
  // ... of row (n, d)
  static void soft_coef(const Args& A, int64_t n_, int64_t d_, int64_t c0, int64_t n, acc_t* g) {
    const int64_t o = n_ * A.qN + d_ * A.qD + c0 * A.qC, qC = A.qC;
    switch (A.qtype) {
      case at::kHalf: return soft_coef_t(A, static_cast<const at::Half*>(A.q) + o, qC, c0, n, g);
      case at::kBFloat16:
        return soft_coef_t(A, static_cast<const at::BFloat16*>(A.q) + o, qC, c0, n, g);
      case at::kFloat: return soft_coef_t(A, static_cast<const float*>(A.q) + o, qC, c0, n, g);
      default: return soft_coef_t(A, static_cast<const double*>(A.q) + o, qC, c0, n, g);
    }
  }

  // ------------------------------------------- rows -------------------------------------------
  // The class weights from class c0 on, or nullptr without weights.
  static inline const acc_t* weights(const Args& A, int64_t c0 = 0) {
    return A.w ? static_cast<const acc_t*>(A.w) + c0 : nullptr;
  }
  static inline const scalar_t* row_ptr(const Args& A, int64_t n, int64_t d) {
    return static_cast<const scalar_t*>(A.x) + n * A.xN + d * A.xD;
  }
  // The tiles' copies between the logits and the tile buffer zb[lane][class] (ce_cpu_tile_io.h).
  template <typename T>
  static bool is_run(const T* v, int64_t L);
  template <typename src_t, typename dst_t>
  static void transpose_block(const src_t* src, int64_t ld_src, dst_t* dst, int64_t ld_dst);
  template <typename src_t>
  static bool run_to_rows(const src_t* x, int64_t C, acc_t* zb, int64_t ld);
  template <typename dst_t>
  static bool rows_to_run(const acc_t* zb, int64_t ld, int64_t C, dst_t* o);
  static void gather_tile(const Args& A, const scalar_t* const* xl, int64_t L, int64_t c0,
                          int64_t n, acc_t (*zb)[kTileChunk]);
  static void scatter_tile(const Args& A, const int64_t* ob, int64_t L, int64_t c0, int64_t n,
                           const acc_t (*zb)[kTileChunk], scalar_t* out);
  template <typename q_t>
  static bool soft_tile_t(const Args& A, const q_t* q, const int64_t* o, int64_t L, int64_t c0,
                          int64_t n, acc_t (*gb)[kTileChunk]);
  static bool soft_tile(const Args& A, int64_t r0, int64_t L, int64_t c0, int64_t n,
                        acc_t (*gb)[kTileChunk]);
  // All rows on at::parallel_for's threads: rows(b, e) over ranges of rows where each row is read
  // in place (rows_ok), else tiles(b, e) over ranges of kTile-row tiles.
  template <typename Rows, typename Tiles>
  static void parallel_rows(const Args& A, bool rows_ok, const Rows& rows, const Tiles& tiles) {
    const int64_t R = A.N * A.D;
    if (R == 0) return;
    if (rows_ok) {
      at::parallel_for(0, R, std::max<int64_t>(1, 32768 / A.C), rows);
    } else {
      at::parallel_for(0, (R + kTile - 1) / kTile, std::max<int64_t>(1, 32768 / (A.C * kTile)),
                       tiles);
    }
  }

  // ------------------------------- forward (ce_cpu_forward.h) -------------------------------
  // The max sweep's snapshots for the argmax (chunk_max / bits_max, first_at): one vector, the
  // running max, after every kSnapSteps steps, at most kRowChunkMax / kSnapSteps values a chunk.
  static constexpr int64_t kSnapSteps = 16;
  struct Snaps {
    alignas(64) acc_t v[kRowChunkMax / kSnapSteps];
    int64_t count = 0;
  };
  template <typename src_t, int K, bool Copy, bool Split = false>
  static acc_t chunk_max(const src_t* x, int64_t n, acc_t* zb, const Tf& t, Snaps* snaps = nullptr);
  static const acc_t* load_chunk(const scalar_t* x, int64_t xC, int64_t n, acc_t* zb, const Tf& t,
                                 acc_t& cm, bool split = false, Snaps* snaps = nullptr);
  // The online-softmax state of one row, in the one vocabulary of every backend (the Triton
  // kernel in kernels/cross_entropy.py, Stats in csrc/cuda/ce_kernels.cuh, State here):
  //   m  the running max of z,
  //   k  how many classes are exactly at m (their terms exp(z - m) = 1, counted apart so that
  //      a confident row's tiny terms are not rounded away against them),
  //   s  the sum of exp(z - m) over the other classes (here with sc, add_exact's compensation),
  // so that log sum_c exp(z_c - m) = log(k + s), log1p(s) when k == 1, and lse = m + that.
  // The smoothing / soft-target sums over g_c (w_c, or w_c q'_c): here B = sum g (z - m) <= 0
  // and G = sum g; CUDA keeps t = -B and w = G.
  // With statistics also T = sum exp(z - m) (z - m) over the classes in s (those at m add 0),
  // so that the entropy is log d - T / d, d = k + s; and the argmax `arg` of the classes so far
  // with its value `best` (the first of equal maxima).
  struct State {
    acc_t m = -kInf, k = 0, s = 0, sc = 0, B = 0, G = 0, T = 0, best = -kInf;
    int64_t arg = 0;
    bool lean = false;  // fold with the copy's lean exp2 (fold, ce_cpu_forward.h)
  };
  static acc_t bits_max(const scalar_t* x, int64_t n, Snaps* snaps = nullptr);
  // A chunk's sums, lane by lane (fold_steps): s, k, T (t), and the g-sums B (b), G (g).
  struct Sums {
    V s0, s1, k0, k1, b0, b1, g0, g1, t0, t1;
  };
  // Whether fold_steps can give the first class at the max (`first`): where its steps at the
  // max are found by a compare (exp2_tiny) and the copy has first_bits_equal / equal_mask.
#if defined(NLLF_HAVE_EXP2_TINY) && defined(NLLF_HAVE_EQUAL_MASK)
  static constexpr bool kFoldFinds = kTinyExp;
#else
  static constexpr bool kFoldFinds = false;
#endif
  template <int Gm, bool AtMax, bool Ent, int Tiny, typename src_t>  // Tiny 2: lean exp2
  static Sums fold_steps(const src_t* z, int64_t n, acc_t ref, const acc_t* g, const char* pf,
                         int64_t pf_len, int64_t* first);
  template <int Gm, bool AtMax, bool Ent, typename src_t>
  static void fold(State& st, const src_t* z, int64_t n, acc_t cm, const acc_t* g,
                   const char* pf = nullptr, int64_t pf_len = 0, int64_t* first = nullptr);
  template <typename src_t>
  static void fold_any(int gm, bool ent, State& st, const src_t* z, int64_t n, acc_t cm,
                       const acc_t* g, const char* pf = nullptr, int64_t pf_len = 0,
                       int64_t* first = nullptr);
  template <typename src_t>
  static void track_argmax(State& st, const src_t* z, int64_t c0, int64_t n, acc_t cm,
                           int64_t split_end = 0, const Snaps* snaps = nullptr);
  template <typename src_t>
  static int64_t first_at(const src_t* z, int64_t n, acc_t cm, int64_t split_end,
                          const Snaps* snaps);
  static bool beats(const State& st, acc_t cm);  // (ce_cpu_argmax.h)
  static int gmode(const Args& A, int64_t y);
  static bool row_has_nan(const Args& A, const scalar_t* x_row);
  static void finish_row(const Args& A, int64_t r, const State& st, const scalar_t* x_row,
                         int64_t y, const Tf& t);
  static void finish_stats(const Args& A, int64_t r, const State& st, const scalar_t* x_row,
                           int64_t y, acc_t logd, const Tf& t);
  static void fwd_rows(const Args& A, int64_t r0, int64_t r1);
  static void fwd_tiles(const Args& A, int64_t tile0, int64_t tile1);
  static void forward(const Args& A);

  // ------------------------------ backward (ce_cpu_backward.h) ------------------------------
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
  // With the statistics' gradients gH = grad_entropy[r], gT = grad_target_logp[r] (ce_bwd_stats),
  // d H / d z_c = -p_c (log p_c + H) and d log p_y / d z_c = [c == y] - p_c add
  //   p_c (E H - gT) + E p_c log p_c,  E = -gH,  log p_c = (z_c - hi) - lo,
  // to class c (so P gains E H - gT and, when ent, each class the E p log p term), and the target
  // dz_y (gT sum_{c != y} p_c + E p_y log p_y) (ya gains dz_y gT, yb the rest).
  struct RowGrad {
    acc_t hi, lo, P, Q, ya, yb, E;
    int64_t y;  // -1: none (soft targets, ignored rows)
    int gm;     // g: 0 none, 1 ones, 2 g[] (weights, or w q' for soft targets)
    bool zero, nan, ent;
    bool stream = false;  // x and out are rows in memory, not a buffer in L1: prefetch them
  };
  static RowGrad row_grad(const Args& A, int64_t n_, int64_t d_, const scalar_t* xr, const Tf& t);
  // exact_lse: |lse| from which a row is read once more for m and log s (far_lse: whether hi,
  // the lse's leading part, is there -- inline, as the lanes ask it for every row)
  static constexpr double kExactLseFrom = std::is_same_v<acc_t, double> ? 1024 : 0x1p26;
  static bool far_lse(acc_t hi) {
    const acc_t a = std::abs(hi);  // NaN fails both; no branch: the lanes' test vectorizes
    return (a >= static_cast<acc_t>(kExactLseFrom)) & (a < kInf);
  }
  static void exact_lse(const Args& A, const scalar_t* xr, const Tf& t, acc_t& hi, acc_t& lo);
  template <typename src_t, typename dst_t, int K, int Gm, bool Ent, bool Split = false,
            int Exp2 = 0>
  static acc_t grad_chunk(const src_t* x, dst_t* out, int64_t n, int64_t skip, const RowGrad& rg,
                          const acc_t* g, const Tf& t);
  template <bool Split, typename src_t, typename dst_t>
  static acc_t grad_run(const src_t* x, dst_t* out, int64_t n, int64_t skip, const RowGrad& rg,
                        const acc_t* g, const Tf& t);
  template <typename src_t, typename dst_t>
  static acc_t grad_any(const src_t* x, dst_t* out, int64_t c0, int64_t n, const RowGrad& rg,
                        const acc_t* g, const Tf& t);
  static bool has_target(const RowGrad& rg) { return rg.y >= 0 && !rg.zero && !rg.nan; }
  static void bwd_rows(const Args& A, int64_t r0, int64_t r1);
  static void bwd_tiles(const Args& A, int64_t tile0, int64_t tile1);
  static void backward(const Args& A);

  // ------------- rows of few classes, one row per vector lane (ce_cpu_lanes.h) -------------
  // The most classes a lane tile holds (kernels.h, lane_max_classes): its C x W2 buffers zb
  // (and, probability targets, gb) are up to 64 KiB in the AVX2 copy, 128 KiB in the AVX-512
  // ones, on the stack; within L1 to 256 classes on AVX2.
  static constexpr int64_t kLaneMaxC = kLaneMaxClassesVin;
  struct Lanes;
  static int64_t lane_limit(const Args& A, bool backward);
  static bool lanes_ok(const Args& A, bool backward);
  static int64_t lane_tiles(const Args& A);
  static constexpr int64_t kLanePrefetch = 512;
  // A tile's lines one L1 set may take (lanes_alias).
  static constexpr int64_t kLaneAliasLines = 32;
  static constexpr int64_t kLaneAhead = 4;        // classes ahead where they alias
  // Tiles whose sums (Args::tile_sums) one thread adds up in order: kTileSums doubles a block,
  // not a tile (a tile's for the 65536 tiles of (8, 4, 512, 512): 4 MiB of fresh pages a call).
  // Fewer where a tile is much work: a block is one thread's ((512, 300) float32, 16 tiles: one
  // block, one thread of two, 0.95x torch's forward).
  static constexpr int64_t kSumTiles = 16;
  static int64_t sum_tiles(const Args& A) {
    return std::clamp<int64_t>(16384 / std::max<int64_t>(1, A.C * W2), 1, kSumTiles);
  }
  static bool lanes_alias(const Args& A, int64_t streams);
  template <typename T>
  static inline void lane_prefetch(const T* p, bool write = false);
  static void lane_tile(const Args& A, int64_t tile, bool first, Lanes& T);
  static int64_t lane_block_lanes(const Args& A, const Lanes& T);
  static inline int64_t lane_stride(const Args& A, const Lanes& T);
  static inline int64_t block_start(int64_t c, int64_t C);
  static void lane_zero_dead(const Lanes& T, int64_t C, acc_t* zb);
  static void lane_gather(const Args& A, const Lanes& T, acc_t* zb);
  template <typename dst_t>
  static void lane_block_out(const acc_t* zb, int64_t l0, int64_t C, dst_t* o, int64_t ld);
  static void lane_scatter(const Args& A, const Lanes& T, const acc_t* zb, scalar_t* out);
  static void lane_scatter_run(const Args& A, const Lanes& T, const acc_t* zb, int64_t blocked,
                               scalar_t* o);
  static void lane_lse(const Args& A, const Lanes& T, const Tf& t, acc_t* hi, acc_t* lo);
  template <typename T, typename U>
  static void lane_read(const Lanes& L, const T* p, int64_t sN, int64_t sD, U fill, U* out);
  template <int K>
  static inline void lane_load_max(const Args& A, const Lanes& T, const Tf& t, bool alias,
                                   acc_t* zb, V& m0, V& m1);
  static inline void lane_load_bwd(const Args& A, const Lanes& T, int64_t c, bool alias,
                                   const scalar_t* o, const acc_t* zb, V& xa, V& xb);
  template <int K, int Gm, bool Stats = false>
  static void fwd_lanes(const Args& A, int64_t tile0, int64_t tile1);
  template <int K, int Gm>
  static void fwd_lanes_stats(const Args& A, int64_t tile0, int64_t tile1) {
    fwd_lanes<K, Gm, true>(A, tile0, tile1);
  }
  template <int K, int Gm, bool Stats = false>
  static void bwd_lanes(const Args& A, int64_t tile0, int64_t tile1);
  template <int K, int Gm>
  static void bwd_lanes_stats(const Args& A, int64_t tile0, int64_t tile1) {
    bwd_lanes<K, Gm, true>(A, tile0, tile1);
  }
  template <int K, int Gm, bool Stats>
  static bool bwd_lanes_grouped(const Args& A, int64_t tile0, int64_t tile1);
  static void forward_lanes(const Args& A);
  static void backward_lanes(const Args& A);
  // As row_has_nan for the lanes of a tile (z in zb, lane l at zb[c * W2 + l]): where m is +inf,
  // log d = 0 (lse +inf), or NaN where the lane's row holds a NaN.
  static void lanes_inf_lse(const acc_t* zb, int64_t C, const acc_t* lm, acc_t* ld) {
    for (int64_t l = 0; l < W2; ++l) {
      if (lm[l] != kInf) continue;
      ld[l] = 0;
      for (int64_t c = 0; c < C; ++c)
        if (std::isnan(zb[c * W2 + l])) ld[l] = kNaN;
    }
  }
  // probability targets (ce_cpu_lanes_soft.h)
  template <typename q_t>
  static void lane_soft_t(const Args& A, const Lanes& T, const q_t* q, acc_t* g);
  static void lane_soft(const Args& A, const Lanes& T, acc_t* g);
  template <int K>
  static void fwd_lanes_soft(const Args& A, int64_t tile0, int64_t tile1);
  template <int K>
  static void bwd_lanes_soft(const Args& A, int64_t tile0, int64_t tile1);
  static void soft_lanes(const Args& A, bool backward);
};

}  // namespace nllfused_cpu::NLLF_CPU_NS

#include "ce_cpu_softcap.h"
#include "ce_cpu_forward.h"
#include "ce_cpu_argmax.h"
#include "ce_cpu_backward.h"
#include "ce_cpu_tile_io.h"
#include "ce_cpu_lane_tiles.h"
#include "ce_cpu_lanes.h"
#include "ce_cpu_lanes_group.h"
#include "ce_cpu_lanes_soft.h"

namespace nllfused_cpu {

void NLLF_CAT(forward_, NLLF_CPU_CAPABILITY)(const Args& A, at::ScalarType logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits, "ce_fwd_cpu",
                                  [&] { NLLF_CPU_NS::Ce<scalar_t>::forward(A); });
}

void NLLF_CAT(backward_, NLLF_CPU_CAPABILITY)(const Args& A, at::ScalarType logits) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits, "ce_bwd_cpu",
                                  [&] { NLLF_CPU_NS::Ce<scalar_t>::backward(A); });
}

}  // namespace nllfused_cpu
