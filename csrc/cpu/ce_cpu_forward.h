// The forward of the CPU kernels (struct Ce, ce_cpu_kernels.h, which includes this file): per
// row, the max sweep and the online softmax over L1-sized chunks, then loss / lse / aux.
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// Sweep 1 over a chunk: max of z (see vmax for NaN); with Copy also writes z to zb (may alias x),
// with Split its whole 2W blocks in split order (load2s). With snaps, the max of the two running
// max vectors after every kSnapSteps steps (first_at's index: one store per 512 classes, where
// the two vectors' stores beside the copy's cost a transformed bf16 forward ~2 %). A NaN lane
// may hide the lane at the max beside it (vmax): only in a row with a NaN, whose argmax
// finish_stats takes from its first NaN.
template <typename scalar_t>
template <typename src_t, int K, bool Copy, bool Split>
auto Ce<scalar_t>::chunk_max(const src_t* x, int64_t n, acc_t* zb, const Tf& t, Snaps* snaps)
    -> acc_t {
  V m0(-kInf), m1(-kInf);
  const int64_t nv = n / W2 * W2;
  if (snaps) snaps->count = 0;
  for (int64_t blk = 0; blk < nv; blk += kSnapSteps * W2) {
    const int64_t end = std::min(nv, blk + kSnapSteps * W2);
    for (int64_t i = blk; i < end; i += W2) {
      V a, b;
      load2s<Split>(x + i, a, b);
      if constexpr (Copy) {
        a = tf<K>(a, t);
        b = tf<K>(b, t);
        a.store(zb + i);
        b.store(zb + i + W);
      }
      m0 = vmax(m0, a);
      m1 = vmax(m1, b);
    }
    if (snaps) vmax(m0, m1).store(snaps->v + W * snaps->count++);
  }
  const int64_t i = nv;
  acc_t m = nan_max(hmax(m0), hmax(m1));
  if (i < n) {  // tail: transform a padded copy, its pad lanes then -inf
    const V ninf(-kInf);
    V a, b, live_a, live_b;
    tail_lanes(n - i, live_a, live_b);
    load2_tail(x + i, n - i, acc_t(0), a, b);
    a = V::blendv(ninf, tf<K>(a, t), live_a);
    b = V::blendv(ninf, tf<K>(b, t), live_b);
    if constexpr (Copy) {  // whole vectors: zb holds a multiple of 2W past i (its callers)
      a.store(zb + i);
      b.store(zb + i + W);
    }
    m = nan_max(m, nan_max(hmax(a), hmax(b)));
  }
  return m;
}

// z of classes [0, n) of a row chunk starting at x (class stride xC) and its max: a pointer
// into the logits themselves when no conversion is needed, else zb, filled here -- in split
// order where split asks for it and the logits are bf16 (kSplit).
template <typename scalar_t>
auto Ce<scalar_t>::load_chunk(const scalar_t* x, int64_t xC, int64_t n, acc_t* zb, const Tf& t,
                              acc_t& cm, bool split, Snaps* snaps) -> const acc_t* {
  if (xC == 1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (t.kind == 0) {  // fp32/fp64 without transform: no copy at all
        cm = chunk_max<acc_t, 0, false>(x, n, nullptr, t, snaps);
        return x;
      }
    }
    if constexpr (kSplit) {
      if (split) {
        if (t.kind == 0) cm = chunk_max<scalar_t, 0, true, true>(x, n, zb, t, snaps);
        else if (t.kind == 1) cm = chunk_max<scalar_t, 1, true, true>(x, n, zb, t, snaps);
        else cm = chunk_max<scalar_t, 2, true, true>(x, n, zb, t, snaps);
        return zb;
      }
    }
    if (t.kind == 0) cm = chunk_max<scalar_t, 0, true>(x, n, zb, t, snaps);
    else if (t.kind == 1) cm = chunk_max<scalar_t, 1, true>(x, n, zb, t, snaps);
    else cm = chunk_max<scalar_t, 2, true>(x, n, zb, t, snaps);
    return zb;
  }
  for (int64_t c = 0; c < n; ++c) zb[c] = static_cast<acc_t>(x[c * xC]);
  if (t.kind == 0) cm = chunk_max<acc_t, 0, false>(zb, n, nullptr, t, snaps);
  else if (t.kind == 1) cm = chunk_max<acc_t, 1, true>(zb, n, zb, t, snaps);
  else cm = chunk_max<acc_t, 2, true>(zb, n, zb, t, snaps);
  return zb;
}

// The max sweep of a bf16 chunk without a transform (kSplit: the SIMD copies), from the logits'
// bits: bf16 is sign and magnitude, so among the values whose sign bit is clear the largest as
// int16 is the largest as float (+inf, then NaN, above every finite value). One integer max per
// 2W logits and nothing written, where converting and comparing floats (chunk_max) takes four
// instructions and a copy; the fold then reads the logits themselves (fold with src_t bf16).
// A chunk without such a value (every logit negative, or -0) takes chunk_max -- the same max
// either way, NaN aside (see vmax). With snaps, the running max (as bf16 bits, 2W of them)
// after every kSnapSteps * W2 classes, as chunk_max's for track_argmax; none after chunk_max.
template <typename scalar_t>
auto Ce<scalar_t>::bits_max(const scalar_t* x, int64_t n, Snaps* snaps) -> acc_t {
  if constexpr (!kSplit) {
    return chunk_max<scalar_t, 0, false>(x, n, nullptr, Tf{});  // not called: no bf16 SIMD
  } else {
    using I = Vec<int16_t>;
    static_assert(I::size() == W2, "one int16 vector holds a step's 2W logits");
    static_assert(kSnapSteps * W2 % (2 * W2) == 0, "a snapshot block is whole double steps");
    const int16_t* p = reinterpret_cast<const int16_t*>(x);
    I m0(std::numeric_limits<int16_t>::min()), m1(m0);
    const int64_t nv = n / W2 * W2;
    if (snaps) snaps->count = 0;
    for (int64_t blk = 0; blk < nv; blk += kSnapSteps * W2) {
      const int64_t end = std::min(nv, blk + kSnapSteps * W2);
      int64_t i = blk;
      for (; i + 2 * W2 <= end; i += 2 * W2) {  // two accumulators: the max's latency
        m0 = maximum(m0, I::loadu(p + i));
        m1 = maximum(m1, I::loadu(p + i + W2));
      }
      if (i < end) m0 = maximum(m0, I::loadu(p + i));
      if (snaps) maximum(m0, m1).store(reinterpret_cast<int16_t*>(snaps->v) + W2 * snaps->count++);
    }
    alignas(64) int16_t lanes[W2];
    maximum(m0, m1).store(lanes);
    int16_t top = lanes[0];
    for (int64_t l = 1; l < W2; ++l) top = std::max(top, lanes[l]);
    if (top < 0) {
      if (snaps) snaps->count = 0;
      return chunk_max<scalar_t, 0, false, true>(x, n, nullptr, Tf{});
    }
    acc_t m = static_cast<acc_t>(scalar_t(static_cast<uint16_t>(top), scalar_t::from_bits()));
    for (int64_t i = nv; i < n; ++i) m = nan_max(m, static_cast<acc_t>(x[i]));
    return m;
  }
}

// fold's vector steps over z[0, n) against ref (the max, or 0), the last one padded: the chunk's
// sums, lane by lane. Tiny (float accumulators where the unit has it, kTinyExp, under the caller's
// TinyScope; fold asks for it where |ref| < kTinyRefMax): each term is 2^u(z),
// u(z) = z log2 e + tiny_offset(ref) -- exp2_tiny of that fma, or in a full step the copy's
// exp2_affine(_plus) where it has one -- and z - ref only where a sum needs it.
// u(ref) is not exactly 0 (tiny_offset is -ref log2 e rounded to an integer): every term carries
// the same factor 2^u(ref), |u(ref)| < 0.55 below kTinyRefMax, which fold takes out of the sums.
// The entropy's T = sum e a is summed as sum e u over the classes in s (one fma, no z - ref):
// fold makes it sum e (u - u(ref)) / log2 e. Not the classes at the max: their e u(ref) would
// leave T ~1e-7 |u(ref)| off (a peaked row's T is ~1e-25: a negative entropy).
// In a chunk holding the max (AtMax) a step then first looks for classes at the max -- one
// compare of the bf16 bits, or two of the floats -- and only a step that has one counts them
// apart (add_or_count). That test is z == m, which is z - m == 0 wherever m is normal and not
// below 2^-100 in magnitude (two such distinct numbers differ by more than 2^-126, which
// flush-to-zero would make 0); for other m every step counts.
// With `first` (kFoldFinds; z in class order in memory: bf16 in place, or float32), the first
// step that holds a class at the max also gives *first, its first such class, where *first is
// still -1: the argmax of a chunk that holds a new max, from the compare the fold makes anyway.
// Steps that are not tested (every step counts, and the last, partial one) leave it -1.
template <typename scalar_t>
template <int Gm, bool AtMax, bool Ent, int Tiny, typename src_t>
auto Ce<scalar_t>::fold_steps(const src_t* z, int64_t n, acc_t ref, const acc_t* g,
                              const char* pf, int64_t pf_len, int64_t* first) -> Sums {
  static_assert(!Tiny || kTinyExp);
  constexpr bool Raw = !std::is_same_v<src_t, acc_t>;
  const V vm(ref);
  [[maybe_unused]] const V log2e(kLog2e), vc(tiny_offset(ref));
#ifdef NLLF_HAVE_EXP2_AFFINE
  // The full steps' exp (exp2_affine(_plus)), the steps that count too. float32 logits against
  // exp2_tiny (paired, Zen 3): (4096, 32000) forward on one thread 1.09x in mean medians, 1.14x
  // in minima; (256, 32000) on 2 threads 1.07x / 1.28x; (4096, 32000) on 2 threads, at the copy
  // bandwidth, 1.03x in medians.
  [[maybe_unused]] constexpr bool kAffine = Tiny != 0;
  [[maybe_unused]] Exp2Affine affine{};
  if constexpr (kAffine) affine = exp2_affine_args(kLog2e, tiny_offset(ref));
#else
  [[maybe_unused]] constexpr bool kAffine = false;
#endif
  [[maybe_unused]] bool test_steps = Tiny && AtMax && std::isfinite(ref) &&
                                     std::fabs(ref) >= acc_t(0x1p-100);
  [[maybe_unused]] uint16_t ref_bits = 0;
  if constexpr (Tiny && Raw) {  // ref is a bf16 value here (the max of the chunks' logits)
    uint32_t w;
    std::memcpy(&w, &ref, sizeof w);
    ref_bits = static_cast<uint16_t>(w >> 16);
    test_steps = test_steps && (w & 0xffffu) == 0;
  }
  // In a chunk at the max, the classes at the max are counted into k (k0, k1), not added to s.
  const V zero(acc_t(0));
  V s0(zero), s1(zero), k0(zero), k1(zero), b0(zero), b1(zero), g0(zero), g1(zero);
  V t0(zero), t1(zero);
  constexpr bool NeedA = !Tiny || Gm != 0;
  // One step: the classes in za, zb (their g at gp), counted apart where `counted` (a
  // std::bool_constant; below). Tail: the last, partial step, padded with ref (a = 0,
  // u = u(ref): finite), whose pad lanes (live_a, live_b clear) add e = 0 and are never counted;
  // their g is 0. A full step that counts nothing and sums no entropy adds its terms to s by
  // exp2_tiny_plus / exp2_affine_plus (`plus`): in one fma with the exp's last multiply (AVX2).
  auto step = [&](auto tail, auto counted, V za, V zb, const acc_t* gp, V live_a, V live_b) {
    constexpr bool count = decltype(counted)::value;
    V a, b, ea, eb, ua, ub;
    [[maybe_unused]] constexpr bool plus = Tiny && !Ent && !decltype(tail)::value && !count;
    if constexpr (NeedA) {
      a = za - vm;
      b = zb - vm;
    }
#ifdef NLLF_HAVE_EXP2_TINY
    if constexpr (Tiny) {
      ua = fmadd(za, log2e, vc);
      ub = fmadd(zb, log2e, vc);
      // The chunk's full steps take exp2_affine where it does (kAffine), with or without the
      // entropy: the same terms, so that asking for the entropy leaves every other output's
      // bits as they are (ce_fwd_stats' with_entropy, tests).
      constexpr bool affine_step = kAffine && !decltype(tail)::value;
      if (plus && affine_step) {
#ifdef NLLF_HAVE_EXP2_AFFINE
        s0 = exp2_affine_plus<Tiny == 2>(za, affine, s0);
        s1 = exp2_affine_plus<Tiny == 2>(zb, affine, s1);
#endif
      } else if (plus) {
        s0 = exp2_tiny_plus<Tiny == 2>(ua, s0);
        s1 = exp2_tiny_plus<Tiny == 2>(ub, s1);
      } else if (affine_step) {
#ifdef NLLF_HAVE_EXP2_AFFINE
        ea = exp2_affine<Tiny == 2>(za, affine);
        eb = exp2_affine<Tiny == 2>(zb, affine);
#endif
      } else {
        ea = exp2_tiny<Tiny == 2>(ua);
        eb = exp2_tiny<Tiny == 2>(ub);
      }
    }
#endif
    if constexpr (!Tiny) {
      ea = vexp(a);
      eb = vexp(b);
    }
    if (!NeedA && count) {
      a = za - vm;
      b = zb - vm;
    }
    if constexpr (decltype(tail)::value) {
      ea = V::blendv(zero, ea, live_a);
      eb = V::blendv(zero, eb, live_b);
    }
    if (count) {  // (a pad lane's a = 0 is no class at the max)
      const V off(acc_t(-1));
      add_or_count(decltype(tail)::value ? V::blendv(off, a, live_a) : a, ea, s0, k0);
      add_or_count(decltype(tail)::value ? V::blendv(off, b, live_b) : b, eb, s1, k1);
    } else if (!plus) {
      s0 = s0 + ea;
      s1 = s1 + eb;
    }
    if constexpr (Ent && Tiny) {  // e u, over the classes in s (fold makes it e a)
      t0 = fmadd(count ? select_eq(ea, zero, a, zero) : ea, ua, t0);
      t1 = fmadd(count ? select_eq(eb, zero, b, zero) : eb, ub, t1);
    } else if constexpr (Ent) {  // the classes at the max add e a = 0
      t0 = fmadd(ea, a, t0);
      t1 = fmadd(eb, b, t1);
    }
    if constexpr (Gm == 1) {
      b0 = b0 + a;
      b1 = b1 + b;
    } else if constexpr (Gm >= 2) {
      const V ga = V::loadu(gp), gb = V::loadu(gp + W);
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
  };
  int64_t i = 0, pf_off = 0;
  const int64_t l2_off = n / W2 * 64;  // the bytes the L1 prefetch covers: one line a step
  // The steps of a chunk at the max that hold a class at it count, the others are plain steps in
  // a loop of their own (with a branch on `count` in one step: 1.29x the other chunks' step time,
  // as steps of their own 1.05x; perf, AVX2, bf16, Zen 4): with both in one loop GCC kept the
  // sums on the stack (objdump, AVX2, 16-bit logits), here in registers.
  while (i + W2 <= n) {
    for (; i + W2 <= n; i += W2, pf_off += 64) {
      if (pf) {
        if (pf_off < pf_len) __builtin_prefetch(pf + pf_off);
        __builtin_prefetch(pf + pf_off + l2_off, 0, 2);  // prefetcht1: into L2
      }
      V za, zb;
      load2s<Raw>(z + i, za, zb);
      bool count = AtMax;
#ifdef NLLF_HAVE_EXP2_TINY
      if constexpr (Tiny && AtMax) {
        if (test_steps) {
          if constexpr (Raw) count = any_bits_equal(z + i, ref_bits);
          else count = any_equal(za, zb, vm);
          if constexpr (kFoldFinds) {  // rare: a step that holds the max
            if (count && first && *first < 0) {
              if constexpr (Raw) *first = i + first_bits_equal(z + i, ref_bits);
              else *first = i + __builtin_ctz(equal_mask(z + i, vm));
            }
          }
        }
      }
#endif
      if (count) break;
      step(std::false_type{}, std::false_type{}, za, zb, Gm >= 2 ? g + i : nullptr, zero, zero);
    }
    if constexpr (AtMax) {
      if (i + W2 <= n) {  // the step at i counts (its prefetch issued above)
        V za, zb;
        load2s<Raw>(z + i, za, zb);
        step(std::false_type{}, std::true_type{}, za, zb, Gm >= 2 ? g + i : nullptr, zero, zero);
        i += W2, pf_off += 64;
      }
    }
  }
  if (i < n) {  // the last n - i < 2W classes, in class order (Raw too: the sums are lane sums)
    alignas(64) acc_t gt[W2];
    for (int64_t j = 0; j < W2; ++j) gt[j] = Gm >= 2 && i + j < n ? g[i + j] : acc_t(0);
    V za, zb, live_a, live_b;
    tail_lanes(n - i, live_a, live_b);
    load2_tail(z + i, n - i, ref, za, zb);
    step(std::true_type{}, std::bool_constant<AtMax>{}, za, zb, gt, live_a, live_b);
  }
  return Sums{s0, s1, k0, k1, b0, b1, g0, g1, t0, t1};
}

// A 16-bit forward whose results are all rounded to 16 bits (Args::lean: the one-call op's
// loss; fwd_rows: State::lean) folds with the copy's lean exp2 where it has one
// (NLLF_HAVE_EXP2_LEAN, AVX2): its terms 2.9e-6 off at most, so are d and the lse, under the
// loss's rounding (2^-9), and the gradient's from the lse it saves. Not ce_fwd, whose lse is
// returned (float64; but under NLLFUSED_CPU_LEAN_EXP=1, for tests), nor the statistics.
#ifdef NLLF_HAVE_EXP2_LEAN
template <typename scalar_t>
inline constexpr bool kLeanExp = Ce<scalar_t>::kTinyExp && sizeof(scalar_t) == 2;
#else
template <typename scalar_t>
inline constexpr bool kLeanExp = false;
#endif

// Sweep 2: fold a chunk z[0, n) with max cm into the state. Gm: 0 no g-sums, 1 g = 1, 2 g[],
// 3 g[] of probability targets, where a class with g_c == 0 adds nothing to B even at z = -inf.
// It runs from L1 and leaves the memory idle, so it prefetches what comes next, two lines a
// step: the next chunk [pf, pf + pf_len) into L1 for the max sweep, and as many bytes beyond
// those into L2 (prefetcht1). A miss to memory holds one of the core's few L1 fill buffers for
// the whole memory latency, a hit in L2 a fraction of it; and the two cover the stream without
// gaps whatever the row length (float32 rows of 1000 classes: the L1 prefetch takes the first
// half of the next row, the L2 one the second half). Against the L1 prefetch alone, fp32 / bf16
// forward 10 % / 4 % faster at (4096, 32000), 7 % / 18 % at (65536, 1000); what else was tried:
// docs/cpp.md, "Prefetching the stream".
// AtMax: the chunk holds the row's running max (cm is it); only then can a term be exp(0).
// src_t: z in class order (acc_t), or the chunk's bf16 logits themselves, read in split order
// (bits_max; only without per-class g, Gm < 2).
// first: where the fold can (fold_steps), the chunk's first class at cm if cm is the row's max
// so far, else left as it is (-1 from the caller).
template <typename scalar_t>
template <int Gm, bool AtMax, bool Ent, typename src_t>
void Ce<scalar_t>::fold(State& st, const src_t* z, int64_t n, acc_t cm, const acc_t* g,
                        const char* pf, int64_t pf_len, int64_t* first) {
  constexpr bool Raw = !std::is_same_v<src_t, acc_t>;
  static_assert(!Raw || Gm < 2, "per-class g needs the classes in order");
  const acc_t mn = nan_max(st.m, cm);
  if (mn != -kInf && !(mn == st.m)) {  // the max grew (or became NaN): rescale the sums so far
    if (st.m > -kInf) {  // the old max's k terms become ordinary ones
      const acc_t f = std::exp(st.m - mn);
      add_exact(st.s, st.sc, st.k);
      st.k = 0;
      // each term e (z - m_old) becomes f e (z - m_old + m_old - mn)
      if constexpr (Ent) st.T = f * (st.T + (st.m - mn) * (st.s + st.sc));
      st.s *= f;
      st.sc *= f;
      if constexpr (Gm != 0) st.B += (st.m - mn) * st.G;  // <= 0: B only ever gains terms <= 0
    }
    st.m = mn;
  }
  // While every class so far is -inf, sum against 0 instead of m (exp(-inf - -inf) would be
  // NaN): the exp terms are 0, the g-sums take g*(-inf), i.e. -inf, or NaN for g = 0, as
  // torch's smoothing term does, and a NaN the max sweep dropped (see vmax) reaches s.
  const acc_t ref = st.m == -kInf ? acc_t(0) : st.m;
  const V vm(ref), zero(acc_t(0));
  // exp2_tiny where ref is near enough to zero (kTinyRefMax; not NaN or inf either), the lean
  // one (Tiny 2) where the state asks for it (kLeanExp)
  const bool tiny = kTinyExp && std::fabs(ref) < kTinyRefMax;
  int64_t* find = AtMax && cm == ref ? first : nullptr;
  constexpr int kLean = kLeanExp<scalar_t> && !Ent ? 2 : int(kTinyExp);
  Sums u;
  if (!tiny) u = fold_steps<Gm, AtMax, Ent, 0>(z, n, ref, g, pf, pf_len, nullptr);
  else if (kLean == 2 && st.lean)
    u = fold_steps<Gm, AtMax, Ent, kLean>(z, n, ref, g, pf, pf_len, find);
  else u = fold_steps<Gm, AtMax, Ent, kTinyExp>(z, n, ref, g, pf, pf_len, find);
  if constexpr (kTinyExp) {  // the terms' common factor 2^u(ref) (fold_steps), taken out
    if (tiny) {
      const acc_t d = std::fma(ref, kLog2e, tiny_offset(ref));
      const V f(std::exp2(-d));
      if constexpr (Ent) {  // sum e u over the classes in s into sum e a
        const V vd(d), to_a(acc_t(1) / kLog2e);
        u.t0 = (u.t0 - vd * u.s0) * to_a;
        u.t1 = (u.t1 - vd * u.s1) * to_a;
      }
      u.s0 = u.s0 * f;
      u.s1 = u.s1 * f;
      if constexpr (Ent) {
        u.t0 = u.t0 * f;
        u.t1 = u.t1 * f;
      }
    }
  }
  // Only the sums this fold has (fold_steps is out of line: the compiler does not see that the
  // others are 0): each hsum is a chain of scalar adds, and a chunk took four (bf16
  // (4096, 32000) at 2048-class chunks: fwd_rows 22.6 -> 20.9 % of the forward's time, perf).
  acc_t B = 0, G = 0, k = 0, T = 0;
  if constexpr (Gm != 0) B = hsum(u.b0 + u.b1);
  if constexpr (Gm >= 2) G = hsum(u.g0 + u.g1);
  add_lanes(st.s, st.sc, u.s0, u.s1);
  if constexpr (AtMax) k = hsum(u.k0 + u.k1);  // a count: exact
  if constexpr (Ent) T = hsum(u.t0 + u.t1);
  if (Ent && std::isnan(T)) {
    // A class at -inf made 0 * -inf (or a NaN logit is here): T once more over this chunk, with
    // a floored at the lowest finite number (then e a = 0 for it). Only such chunks pay this
    // (a vocabulary padded with -inf: its last chunk), the others no floor per element.
    V f0(zero), f1(zero);
    for (int64_t j = 0; j < n; j += W2) {
      V za, zb;
      if (j + W2 <= n) load2s<Raw>(z + j, za, zb);
      else load2_tail(z + j, n - j, ref, za, zb);  // padded with ref: pad lanes add 1 * 0
      const V a = za - vm, b = zb - vm;
      f0 = fmadd(vexp(a), floor_finite(a), f0);
      f1 = fmadd(vexp(b), floor_finite(b), f1);
    }
    T = hsum(f0 + f1);
  }
  st.k += k;
  if constexpr (Ent) st.T += T;
  if constexpr (Gm == 1) G = static_cast<acc_t>(n);
  st.B += B;
  st.G += G;
}

template <typename scalar_t>
template <typename src_t>
void Ce<scalar_t>::fold_any(int gm, bool ent, State& st, const src_t* z, int64_t n, acc_t cm,
                            const acc_t* g, const char* pf, int64_t pf_len, int64_t* first) {
  constexpr bool Raw = !std::is_same_v<src_t, acc_t>;  // then gm < 2
#define NLLF_FOLD(AT, E)                                                         \
  if (gm == 0) return fold<0, AT, E>(st, z, n, cm, g, pf, pf_len, first);        \
  if (Raw || gm == 1) return fold<1, AT, E>(st, z, n, cm, g, pf, pf_len, first); \
  if constexpr (!Raw) {                                                          \
    if (gm == 2) return fold<2, AT, E>(st, z, n, cm, g, pf, pf_len, first);      \
    return fold<3, AT, E>(st, z, n, cm, g, pf, pf_len, first);                   \
  }
  const bool at_max = cm == nan_max(st.m, cm);
  if (ent) {
    if (at_max) { NLLF_FOLD(true, true) }
    NLLF_FOLD(false, true)
  }
  if (at_max) { NLLF_FOLD(true, false) }
  NLLF_FOLD(false, false)
#undef NLLF_FOLD
}

// torch.logsumexp of a row holding +inf is +inf, or NaN where the row also holds a NaN (which the
// max sweep may have dropped beside the +inf: vmax); a scan, for such rows only.
template <typename scalar_t>
bool Ce<scalar_t>::row_has_nan(const Args& A, const scalar_t* x_row) {
  for (int64_t c = 0; c < A.C; ++c)
    if (std::isnan(static_cast<acc_t>(x_row[c * A.xC]))) return true;
  return false;
}

// Which g-sums row needs: soft targets always; index targets only with smoothing (not ignored).
template <typename scalar_t>
int Ce<scalar_t>::gmode(const Args& A, int64_t y) {
  if (A.prob) return 3;
  if (A.eps == 0 || y < 0) return 0;
  return A.w ? 2 : 1;
}

// loss / lse / aux of row r from its folded state (docs/maths.md, "Per-row loss"). x_row: the
// row, for z_y.
template <typename scalar_t>
void Ce<scalar_t>::finish_row(const Args& A, int64_t r, const State& st, const scalar_t* x_row,
                              int64_t y, const Tf& t) {
  // log d, d = k + s: k >= 1 (the max's own class) and k - 1 is exact, so log1p keeps the tiny
  // terms of a confident row that log(k + s) would round away.
  const acc_t logd = std::log1p((st.k - 1) + (st.s + st.sc));
  // A +inf logit: logsumexp is +inf (row_has_nan), but torch's log_softmax (the loss) is NaN.
  const bool pinf = st.m == kInf;
  // lse in float64 (contract): m + log d keeps every digit of log d even where |m| is large,
  // which is what lets the backward form z - lse without losing p (see row_grad).
  const double lse = !pinf ? static_cast<double>(st.m) + static_cast<double>(logd)
                     : row_has_nan(A, x_row) ? kNaN : std::numeric_limits<double>::infinity();
  const acc_t e = static_cast<acc_t>(A.eps);
  acc_t loss, aux;
  if (A.prob) {
    // sum_c g_c (lse - z_c); classes with g_c == 0 add nothing, so neither does log d of a row
    // that has no such class (an all -inf row's log d is -inf)
    loss = (st.G != 0 ? st.G * logd : acc_t(0)) - st.B;
    aux = st.G;
  } else if (y < 0) {
    loss = 0;
    aux = 0;
  } else {
    acc_t dz;
    const acc_t zy = tf_scalar(static_cast<acc_t>(x_row[y * A.xC]), t, dz);
    const acc_t wy = A.w ? weights(A)[y] : acc_t(1);
    // (m - z_y) + log d rather than lse - z_y in acc_t: m - z_y is exact for close values.
    loss = (1 - e) * wy * ((st.m - zy) + logd);
    if (A.eps != 0) loss += e / static_cast<acc_t>(A.C) * (st.G * logd - st.B);
    aux = wy;
  }
  if ((pinf || std::isnan(lse)) && !(y < 0 && !A.prob)) loss = kNaN;
  static_cast<acc_t*>(A.loss)[r] = loss;
  static_cast<double*>(A.lse)[r] = lse;
  static_cast<acc_t*>(A.aux)[r] = aux;
  if (A.stats_fwd()) finish_stats(A, r, st, x_row, y, logd, t);
}

// The statistics of row r (csrc/ops.cpp, ce_fwd_stats) from its folded state.
template <typename scalar_t>
void Ce<scalar_t>::finish_stats(const Args& A, int64_t r, const State& st, const scalar_t* x_row,
                                int64_t y, acc_t logd, const Tf& t) {
  // -sum_c p_c log p_c with p_c = e_c / d, log p_c = a_c - log d (a = z - m, e = exp(a)):
  // log d - T / d, a sum of two terms >= 0 (no cancellation). NaN where the softmax is: a +inf
  // logit, a NaN, every class -inf (0 / 0).
  const acc_t d = st.k + (st.s + st.sc);
  static_cast<acc_t*>(A.ent)[r] = !A.want_ent ? acc_t(0) : st.m == kInf ? kNaN : logd - st.T / d;
  int64_t arg = A.want_pred ? st.arg : 0;
  // maybe a NaN the max sweep dropped: torch.argmax gives the first NaN
  if (A.want_pred && (std::isnan(st.m) || std::isnan(st.s + st.sc))) {
    acc_t dz;
    for (int64_t c = 0; c < A.C; ++c) {
      if (std::isnan(tf_scalar(static_cast<acc_t>(x_row[c * A.xC]), t, dz))) {
        arg = c;
        break;
      }
    }
  }
  A.pred[r] = arg;
  acc_t tlp = 0;  // ignored rows and probability targets
  if (!A.prob && y >= 0) {
    acc_t dz;
    const acc_t zy = tf_scalar(static_cast<acc_t>(x_row[y * A.xC]), t, dz);
    // (z_y - m) - log d, as the loss's (m - z_y) + log d
    tlp = st.m == kInf || std::isnan(logd) ? kNaN : (zy - st.m) - logd;
  }
  static_cast<acc_t*>(A.tlp)[r] = tlp;
}

// Unit class stride: each row read in place, chunk by chunk (A.chunk classes: kernels.h).
template <typename scalar_t>
void Ce<scalar_t>::fwd_rows(const Args& A, int64_t r0, int64_t r1) {
  [[maybe_unused]] const TinyScope tiny{};
  alignas(64) acc_t zb[kRowChunkMax];
  alignas(64) acc_t gb[kRowChunkMax];
  const int64_t chunk = std::min<int64_t>(A.chunk, kRowChunkMax);
  const Tf t = make_tf(A);
  // the entropy's sum in the fold, the argmax's snapshots and scans: only where asked for
  const bool ent = A.stats_fwd() && A.want_ent, arg = A.stats_fwd() && A.want_pred;
  // The argmax of a row read in place (bf16 from its bits, float32 without a transform): where
  // the fold tests its steps for the max (kFoldFinds), the fold of a chunk whose max beats the
  // best so far gives the chunk's first class at it (fold_steps' `first`), and nothing more is
  // done -- snapshots and a scan at the row's end cost float32 (4096, 32000) 7 % of its forward
  // (Zen 4, 1 thread), the statistics' largest part there. Else, and where the fold did not test
  // (a max in a chunk's last partial step; a NaN, zero, or |max| >= kTinyRefMax), the chunk is
  // scanned once, at the row's end (still in L2 there) -- from the snapshots its max sweep took
  // where the fold cannot find it at all: the chunk that beats the best so far keeps its
  // snapshots (snaps[cur] then goes to the other buffer). Scanning every chunk that beat the
  // best (two at 32K classes, three at 128K) took 2-3 % of the bf16 forward.
  Snaps snaps[2];
  int cur = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n_ = r / A.D, d_ = r % A.D;
    const scalar_t* xr = row_ptr(A, n_, d_);
    const int64_t y = A.prob ? -1 : class_of(A, n_, d_);
    const int gm = gmode(A, y);
    // Split order where the fold sums in any order (no per-class g) and the chunk's logits are
    // 64-byte aligned (as in grad_any: unaligned, each 64-byte split load crosses two lines).
    const bool split_row = kSplit && gm < 2;
    State st;
    st.lean = kLeanExp<scalar_t> && A.lean && !A.stats_fwd();
    int64_t arg_c0 = -1, arg_n = 0;  // the chunk in place whose max is st.best, to scan
    const Snaps* arg_snaps = nullptr;
    const int64_t head = head_to_line(xr, A.C, sizeof(scalar_t));  // a chunk of its own
    for (int64_t c0 = 0, n; c0 < A.C; c0 += n) {
      n = std::min(c0 == 0 && head != 0 ? head : chunk, A.C - c0);
      const bool split = split_row && reinterpret_cast<uintptr_t>(xr + c0) % 64 == 0;
      // bf16 without a transform: max from the bits, the fold from the logits (bits_max)
      const bool raw = kSplit && split && t.kind == 0;
      // in place: the chunk's logits in class order are what the max sweep sees
      const bool in_place = raw || (std::is_same_v<scalar_t, acc_t> && t.kind == 0);
      acc_t cm;
      const acc_t* z = nullptr;
      Snaps* sn = arg && !(kFoldFinds && in_place) ? &snaps[cur] : nullptr;
      if (raw) cm = bits_max(xr + c0, n, sn);
      else z = load_chunk(xr + c0, 1, n, zb, t, cm, split, sn);
      int64_t hit = -1;  // the fold's first class at cm (find)
      bool find = false;
      if (arg && beats(st, cm)) {
        TORCH_INTERNAL_ASSERT_DEBUG_ONLY(
            raw || !in_place || static_cast<const void*>(z) == static_cast<const void*>(xr + c0));
        if (in_place) {
          st.best = cm;
          find = kFoldFinds;
          arg_c0 = c0;  // a scan at the row's end, unless the fold finds it (hit, below)
          arg_n = n;
          arg_snaps = sn;
          if (!find) cur ^= 1;
        } else {
          track_argmax(st, z, c0, n, cm, split ? n / W2 * W2 : 0, sn);
          arg_c0 = -1;
        }
      }
      const acc_t* g = nullptr;
      if (A.prob) {
        soft_coef(A, n_, d_, c0, n, gb);
        g = gb;
      } else if (gm == 2) {
        g = weights(A, c0);
      }
      // next: the rest of this row, else the start of the next one
      const scalar_t* pf = c0 + n < A.C ? xr + c0 + n
                           : r + 1 < r1 ? row_ptr(A, (r + 1) / A.D, (r + 1) % A.D)
                                        : nullptr;
      const int64_t pf_n = c0 + n < A.C ? std::min(chunk, A.C - c0 - n) : std::min(chunk, A.C);
      const char* pfc = reinterpret_cast<const char*>(pf);
      const int64_t pf_bytes = pf ? pf_n * int64_t(sizeof(scalar_t)) : 0;
      int64_t* first = find ? &hit : nullptr;
      bool folded = false;
      if constexpr (kSplit) {
        if (raw) {
          fold_any(gm, ent, st, xr + c0, n, cm, g, pfc, pf_bytes, first);
          folded = true;
        }
      }
      if (!folded) fold_any(gm, ent, st, z, n, cm, g, pfc, pf_bytes, first);
      if (hit >= 0) {
        st.arg = c0 + hit;
        arg_c0 = -1;
      }
    }
    if constexpr (kSplit || std::is_same_v<scalar_t, acc_t>) {  // the types read in place
      if (arg_c0 >= 0) {  // (f is never -1: st.best is a value of that chunk, or a NaN in it)
        const int64_t f = first_at(xr + arg_c0, arg_n, st.best, 0, arg_snaps);
        st.arg = arg_c0 + std::max<int64_t>(f, 0);
      }
    }
    finish_row(A, r, st, xr, y, t);
  }
}

// Strided classes: tiles of kTile consecutive rows, each chunk gathered into zb[lane][·].
template <typename scalar_t>
void Ce<scalar_t>::fwd_tiles(const Args& A, int64_t tile0, int64_t tile1) {
  [[maybe_unused]] const TinyScope tiny{};
  alignas(64) acc_t zb[kTile][kTileChunk];
  alignas(64) acc_t gb[kTileChunk];
  alignas(64) acc_t gt[kTile][kTileChunk];  // soft_tile's
  const Tf t = make_tf(A);
  const bool ent = A.stats_fwd() && A.want_ent, arg = A.stats_fwd() && A.want_pred;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t r0 = tile * kTile, L = std::min(kTile, A.N * A.D - r0);
    const scalar_t* xl[kTile];
    int64_t ys[kTile];
    State st[kTile];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n_ = (r0 + l) / A.D, d_ = (r0 + l) % A.D;
      xl[l] = row_ptr(A, n_, d_);
      ys[l] = A.prob ? -1 : class_of(A, n_, d_);
    }
    for (int64_t c0 = 0; c0 < A.C; c0 += kTileChunk) {
      const int64_t n = std::min(kTileChunk, A.C - c0);
      gather_tile(A, xl, L, c0, n, zb);
      const bool soft_run = A.prob && soft_tile(A, r0, L, c0, n, gt);
      for (int64_t l = 0; l < L; ++l) {
        acc_t cm;
        if (t.kind == 0) cm = chunk_max<acc_t, 0, false>(zb[l], n, nullptr, t);
        else if (t.kind == 1) cm = chunk_max<acc_t, 1, true>(zb[l], n, zb[l], t);
        else cm = chunk_max<acc_t, 2, true>(zb[l], n, zb[l], t);
        if (arg) track_argmax(st[l], zb[l], c0, n, cm);
        const int gm = gmode(A, ys[l]);
        const acc_t* g = nullptr;
        if (soft_run) {
          g = gt[l];
        } else if (A.prob) {
          soft_coef(A, (r0 + l) / A.D, (r0 + l) % A.D, c0, n, gb);
          g = gb;
        } else if (gm == 2) {
          g = weights(A, c0);
        }
        fold_any(gm, ent, st[l], zb[l], n, cm, g);
      }
    }
    for (int64_t l = 0; l < L; ++l) finish_row(A, r0 + l, st[l], xl[l], ys[l], t);
  }
}

template <typename scalar_t>
void Ce<scalar_t>::forward(const Args& A) {
  if (lanes_ok(A, false)) return forward_lanes(A);
  if (A.sums) A.sums[kSummed] = 0;  // the rows are written: the caller adds them up
  // (the caller allocates the rows unless it expects the lanes path: an error, not a write
  // through null, were the two decisions ever to differ; no rows: empty tensors, null data)
  TORCH_INTERNAL_ASSERT(A.N * A.D == 0 || (A.loss != nullptr && A.aux != nullptr &&
                                           (!A.stats || (A.ent && A.tlp && A.pred))),
                        "CPU forward: the rows path has no loss / aux / statistics rows to write");
  parallel_rows(A, A.xC == 1 || A.C == 1, [&](int64_t b, int64_t e) { fwd_rows(A, b, e); },
                [&](int64_t b, int64_t e) { fwd_tiles(A, b, e); });
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
