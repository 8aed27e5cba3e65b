// The backward of the CPU kernels (struct Ce, ce_cpu_kernels.h, which includes this file): per
// row, p = exp(z - lse) from the saved lse, the gradient written once (RowGrad's comment there).
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

template <typename scalar_t>
auto Ce<scalar_t>::row_grad(const Args& A, int64_t n_, int64_t d_, const scalar_t* xr,
                            const Tf& t) -> RowGrad {
  RowGrad rg{};
  rg.y = -1;
  const acc_t gl = static_cast<const acc_t*>(A.gl)[n_ * A.gN + d_ * A.gD];
  const double lse_d = static_cast<const double*>(A.lse_in)[n_ * A.lN + d_ * A.lD];
  const acc_t gs = A.glse ? static_cast<acc_t>(A.glse[n_ * A.glN + d_ * A.glD]) : acc_t(0);
  const acc_t e = static_cast<acc_t>(A.eps);
  const int64_t y = A.prob ? -1 : class_of(A, n_, d_);
  const bool ignored = !A.prob && y < 0;
  // the statistics' gradients: the entropy's on every row (on counted rows only with
  // gent_counted), the target log-prob's (0 on ignored rows and for probability targets, a
  // constant there) on counted rows only
  const acc_t gH = A.gent && !(A.gent_counted && ignored)
                       ? static_cast<const acc_t*>(A.gent)[n_ * A.geN + d_ * A.geD]
                       : acc_t(0);
  const acc_t gT = A.gtlp && y >= 0 ? static_cast<const acc_t*>(A.gtlp)[n_ * A.gtN + d_ * A.gtD]
                                    : acc_t(0);
  if (ignored && gs == 0 && gH == 0) {
    rg.zero = true;
    return rg;
  }
  // lse = -inf (all classes -inf), +inf or NaN: every p_c is NaN, as in torch.
  rg.nan = !std::isfinite(lse_d);
  rg.hi = static_cast<acc_t>(lse_d);
  rg.lo = rg.nan ? acc_t(0) : static_cast<acc_t>(lse_d - static_cast<double>(rg.hi));
  if (!rg.nan && far_lse(rg.hi)) exact_lse(A, xr, t, rg.hi, rg.lo);
  if (ignored) {
    rg.P = gs;
    rg.gm = 0;
  } else if (A.prob) {
    const acc_t S = static_cast<const acc_t*>(A.aux_in)[n_ * A.aN + d_ * A.aD];
    rg.P = gl * S + gs;
    rg.Q = gl;
    rg.gm = 2;
  } else {
    const acc_t* w = weights(A);
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
  if (gH != 0 || gT != 0) {
    const acc_t H = static_cast<const acc_t*>(A.ent_in)[n_ * A.eN + d_ * A.eD];
    rg.E = -gH;
    rg.ent = gH != 0;
    rg.P += rg.E * H - gT;
    if (y >= 0 && !rg.nan) {
      acc_t dz;
      const acc_t zy = tf_scalar(static_cast<acc_t>(xr[y * A.xC]), t, dz);
      const acc_t logpy = (zy - rg.hi) - rg.lo, py = std::exp(logpy);
      rg.ya += dz * gT;
      if (rg.ent && py != 0) rg.yb += dz * rg.E * (py * logpy + py * H);
    }
  }
  return rg;
}

// Rows far from zero: the saved lse's own rounding, up to ulp(lse) / 2 (float64: 4e-9 at |lse|
// ~ 3e7), would enter every p = exp(z - lse) as a relative error of that size, where torch's
// log p = (z - m) - log s is exact in z - m. Rows with |lse| >= kExactLseFrom read their logits
// once more for m and log s: hi = m and lo = log s then give p as torch forms it. float32
// accumulators split the float64 lse into hi + lo, whose 53 bits hold p to float's precision up
// to |lse| ~ 2^26 (1e20 + log s is 1e20 in float64).
template <typename scalar_t>
void Ce<scalar_t>::exact_lse(const Args& A, const scalar_t* xr, const Tf& t, acc_t& hi,
                             acc_t& lo) {
  if (!far_lse(hi)) return;
  acc_t m = -kInf, dz;
  double s = 0;  // (a serial float sum of C terms drops the small ones: 2e-4 of p at C = 4000)
  int64_t c = 0;
  bool by_vectors = false;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // a plain row of the accumulator's type (its finite lse: no NaN in it)
    by_vectors = A.xC == 1 && t.kind == 0;
    if (by_vectors) {
      m = chunk_max<acc_t, 0, false>(xr, A.C, nullptr, t);
      const int64_t nv = A.C / W * W;
      while (c < nv) {  // lane sums of at most 64 terms each, gathered in double
        V vs(acc_t(0));
        for (const int64_t end = std::min(nv, c + 64 * W); c < end; c += W)
          vs = vs + vexp(V::loadu(xr + c) - V(m));
        s += hsum(vs);
      }
    }
  }
  if (!by_vectors) {
    for (int64_t i = 0; i < A.C; ++i)
      m = std::max(m, tf_scalar(static_cast<acc_t>(xr[i * A.xC]), t, dz));
  }
  for (; c < A.C; ++c) s += std::exp(tf_scalar(static_cast<acc_t>(xr[c * A.xC]), t, dz) - m);
  hi = m;
  lo = static_cast<acc_t>(std::log(s));
}

// Gradient of n classes into out (may alias x); returns sum p_c over them but `skip`. Split: the
// whole 2W blocks loaded and stored in split order (load2s), for bf16 rows whose every gradient
// is finite and that have no per-class g.
// Exp2 (grad_run: such bf16 rows without a transform or the entropy's term, where the unit has
// exp2_tiny; |lse| < kTinyRefMax): p = 2^u, u = z log2 e + c (the forward fold's exp, 8
// instructions where the step below takes 13; exp2_affine where the copy has it, which wants an
// integer c, else exp2_tiny of one fma), c = -lse log2 e rounded to an integer or to float. c's
// rounding, at most 1/2, is a factor common to the row's p, taken out of P and of the returned
// sum (f); what stays, u's own rounding (none with exp2_affine) and (z - lse) times log2 e's in
// float, is ~1e-6 of p, 4000 times below the bf16 gradient's rounding. Exp2 2: P f p by
// exp2_scaled (P f in its coefficients, one multiply fewer), whose sum over the block is divided
// by P at the end.
template <typename scalar_t>
template <typename src_t, typename dst_t, int K, int Gm, bool Ent, bool Split, int Exp2>
auto Ce<scalar_t>::grad_chunk(const src_t* x, dst_t* out, int64_t n, int64_t skip,
                              const RowGrad& rg, const acc_t* g, const Tf& t) -> acc_t {
  static_assert(!Exp2 || (kTinyExp && Split && K == 0 && !Ent && Gm < 2));
  const V vhi(rg.hi), vlo(rg.lo), vP(rg.P), vQ(rg.Q), vE(rg.E);
  acc_t f = 1;  // Exp2: 2^(ce - c), c = ce rounded
  V vPf(vP);
#ifdef NLLF_HAVE_EXP2_AFFINE
  [[maybe_unused]] Exp2Affine affine{};
#else
  [[maybe_unused]] V vc(acc_t(0));
#endif
#ifdef NLLF_HAVE_EXP2_SCALED
  [[maybe_unused]] Exp2Scaled scaled{};
#endif
  if constexpr (Exp2 != 0) {
    // by log2 e as the fma takes it (in float): then u's error near the max is c's rounding
    const double ce = -(static_cast<double>(rg.hi) + static_cast<double>(rg.lo)) *
                      static_cast<double>(kLog2e);
#ifdef NLLF_HAVE_EXP2_AFFINE
    const double c = std::nearbyint(ce);  // |c| <= 2^21 log2 e + 1, as exp2_affine needs
    affine = exp2_affine_args(kLog2e, static_cast<acc_t>(c));
#else
    const double c = static_cast<acc_t>(ce);
    vc = V(static_cast<acc_t>(c));
#endif
    f = static_cast<acc_t>(std::exp2(ce - c));
    vPf = V(rg.P * f);
#ifdef NLLF_HAVE_EXP2_SCALED
    if constexpr (Exp2 == 2) scaled = exp2_scaled_args(kLog2e, static_cast<acc_t>(c), rg.P * f);
#endif
  }
  auto body = [&](V xv, const acc_t* gp, V& p) {
#ifdef NLLF_HAVE_EXP2_TINY
    if constexpr (Exp2 != 0) {
#ifdef NLLF_HAVE_EXP2_SCALED
      if constexpr (Exp2 == 2) p = exp2_scaled(xv, scaled);  // P f p
      else
#endif
#ifdef NLLF_HAVE_EXP2_AFFINE
        p = exp2_affine(xv, affine);
#else
        p = exp2_tiny(fmadd(xv, V(kLog2e), vc));
#endif
      V r = Exp2 == 2 ? p : vPf * p;
      if constexpr (Gm == 1) r = r - vQ;
      return r;
    }
#endif
    V dz;
    const V logp = (tf_grad<K>(xv, t, dz) - vhi) - vlo;
    p = vexp(logp);
    V r = vP * p;
    if constexpr (Ent) r = fmadd(vE * p, floor_finite(logp), r);  // p log p: 0 where p = 0
    if constexpr (Gm == 1) r = r - vQ;
    if constexpr (Gm == 2) r = r - vQ * V::loadu(gp);
    if constexpr (K == 0) return r;
    else return r * dz;
  };
  // Without per-class g and with finite P, Q (E) every gradient is finite: no NaN handling needed.
  const bool finite = Gm != 2 && std::isfinite(rg.P) && std::isfinite(rg.Q) &&
                      std::isfinite(rg.E);
  // in place (ce_bwd_inplace): the one stream, prefetched once, for writing
  const bool in_place = static_cast<const void*>(x) == static_cast<const void*>(out);
  auto block = [&](int64_t i, V& pa, V& pb) {  // the 2W classes from i: gradients, p
    if (rg.stream) {  // every line this step reads and writes, kStreamAhead bytes ahead, into L2
      constexpr int64_t x_bytes = W2 * int64_t(sizeof(src_t));
      constexpr int64_t o_bytes = W2 * int64_t(sizeof(dst_t));
      const char* xp = reinterpret_cast<const char*>(x + i) + kStreamAhead;
      const char* op = reinterpret_cast<const char*>(out + i) + kStreamAhead;
      if (in_place) {
        for (int64_t l = 0; l < x_bytes; l += 64) __builtin_prefetch(xp + l, 1, 2);
      } else {
        for (int64_t l = 0; l < x_bytes; l += 64) __builtin_prefetch(xp + l, 0, 2);
        for (int64_t l = 0; l < o_bytes; l += 64) __builtin_prefetch(op + l, 1, 2);
      }
    }
    V a, b;
    load2s<Split>(x + i, a, b);
    a = body(a, g + i, pa);
    b = body(b, g + i + W, pb);
    if (Split || finite) store2s_finite<Split>(out + i, a, b);
    else store2(out + i, a, b);
  };
  V s0(acc_t(0)), s1(acc_t(0));
  auto blocks = [&](int64_t from, int64_t to) {  // the whole blocks in [from, to), summed
    for (int64_t i = from; i < to; i += W2) {
      V pa, pb;
      block(i, pa, pb);
      s0 = s0 + pa;
      s1 = s1 + pb;
    }
  };
  // The target's block, when whole, out of the loop (no test a step; the sums in the same order)
  const int64_t whole = n - n % W2;
  if (skip >= 0 && skip < whole) {
    const int64_t tb = skip - skip % W2;
    blocks(0, tb);
    alignas(64) acc_t pt[W2];
    V pa, pb;
    block(tb, pa, pb);
    pa.store(pt);
    pb.store(pt + W);
    pt[Split ? split_pos(skip - tb) : skip - tb] = 0;
    s0 = s0 + V::loadu(pt);
    s1 = s1 + V::loadu(pt + W);
    blocks(tb + W2, whole);
  } else {
    blocks(0, whole);
  }
  acc_t sum = hsum(s0 + s1);
  if (const int64_t i = whole; i < n) {
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
  return Exp2 == 2 ? sum / rg.P : sum * f;
}

// grad_chunk's instantiation for a row: transform kind, g-sums (never per-class g with Split:
// grad_any) and the entropy's term.
template <typename scalar_t>
template <bool Split, typename src_t, typename dst_t>
auto Ce<scalar_t>::grad_run(const src_t* x, dst_t* out, int64_t n, int64_t skip,
                            const RowGrad& rg, const acc_t* g, const Tf& t) -> acc_t {
#define NLLF_GRAD_K(K, E)                                                                    \
  if (rg.gm == 0) return grad_chunk<src_t, dst_t, K, 0, E, Split>(x, out, n, skip, rg, g, t); \
  if constexpr (!Split) {                                                                    \
    if (rg.gm == 2) return grad_chunk<src_t, dst_t, K, 2, E, false>(x, out, n, skip, rg, g, t); \
  }                                                                                          \
  return grad_chunk<src_t, dst_t, K, 1, E, Split>(x, out, n, skip, rg, g, t);
  if constexpr (Split && kTinyExp) {  // grad_chunk's Exp2, where c stays far from overflow
    if (t.kind == 0 && !rg.ent && std::abs(rg.hi) < kTinyRefMax) {
#ifdef NLLF_HAVE_EXP2_SCALED
      // P into exp2_scaled's coefficients where none of them is then subnormal (P f: f < 2^1/2)
      if (std::abs(rg.P) >= acc_t(0x1p-99) && std::abs(rg.P) <= acc_t(0x1p99)) {
        if (rg.gm == 0) return grad_chunk<src_t, dst_t, 0, 0, false, true, 2>(x, out, n, skip,
                                                                            rg, g, t);
        return grad_chunk<src_t, dst_t, 0, 1, false, true, 2>(x, out, n, skip, rg, g, t);
      }
#endif
      if (rg.gm == 0) return grad_chunk<src_t, dst_t, 0, 0, false, true, 1>(x, out, n, skip,
                                                                          rg, g, t);
      return grad_chunk<src_t, dst_t, 0, 1, false, true, 1>(x, out, n, skip, rg, g, t);
    }
  }
  if (rg.ent) {
    if (t.kind == 0) { NLLF_GRAD_K(0, true) }
    if (t.kind == 1) { NLLF_GRAD_K(1, true) }
    NLLF_GRAD_K(2, true)
  }
  if (t.kind == 0) { NLLF_GRAD_K(0, false) }
  if (t.kind == 1) { NLLF_GRAD_K(1, false) }
  NLLF_GRAD_K(2, false)
#undef NLLF_GRAD_K
}

// Classes [c0, c0 + n) of one row into out[0, n), with the instantiation for this row; returns
// the chunk's share of sum_{c != y} p_c. The target element is written later.
template <typename scalar_t>
template <typename src_t, typename dst_t>
auto Ce<scalar_t>::grad_any(const src_t* x, dst_t* out, int64_t c0, int64_t n, const RowGrad& rg,
                            const acc_t* g, const Tf& t) -> acc_t {
  if (rg.zero || rg.nan) {
    std::fill(out, out + n, static_cast<dst_t>(rg.zero ? acc_t(0) : kNaN));
    return 0;
  }
  const int64_t skip = rg.y - c0;
  if constexpr (kSplit && std::is_same_v<src_t, scalar_t> && std::is_same_v<dst_t, scalar_t>) {
    // bf16 in and out, no per-class g, every gradient finite (grad_chunk's own test), and the
    // chunk's logits and gradient 64-byte aligned: each split load and store is then one cache
    // line, where unaligned ones cross two (rows of 1000 classes: 1.2x slower than the ordered
    // loads and stores, whose 32-byte halves cross fewer; aligned ones gain 1.03-1.1x).
    const auto addr = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out);
    if (addr % 64 == 0 && rg.gm != 2 && std::isfinite(rg.P) && std::isfinite(rg.Q) &&
        std::isfinite(rg.E))
      return grad_run<true>(x, out, n, skip, rg, g, t);
  }
  return grad_run<false>(x, out, n, skip, rg, g, t);
}

// Unit class stride: read each row in place, write each gradient row in place -- in the
// contiguous (N, C, 1) output, or at the row's own offsets where the output has the logits'
// strides (Args::out_like_x: rows of unit stride that are not adjacent, D > 1).
// (Non-temporal stores for the gradient were tried: no gain, as its pages come freshly zeroed
// by the kernel, i.e. in cache.) grad_chunk prefetches both streams into L2 (rg.stream), every
// line of a step kStreamAhead (4 KiB) ahead, the gradient's with write intent: against the
// hardware prefetcher alone, bf16 1.25-1.4x and fp32 1.05-1.15x faster at (65536, 1000) and
// (4096, 32000); 1 and 2 KiB ahead were about the same, 8 and 16 KiB slower, and leaving out
// the gradient's stream or a float row's second line gave back a third of the gain. Not for
// logits under kStreamMinBytes: (256, 1000) ran 5-10 % slower with it. In place
// (ce_bwd_inplace, the fused linear + cross-entropy's chunks) the one stream is prefetched once,
// for writing: (4096, 32000) 25 ms fp32 / 17.5 ms bf16, against 35 / 49 ms without prefetching
// and 27 / 18.5 ms prefetching it twice (as two streams).
template <typename scalar_t>
void Ce<scalar_t>::bwd_rows(const Args& A, int64_t r0, int64_t r1) {
  alignas(64) acc_t gb[kChunk];
  const Tf t = make_tf(A);
  // logits that fit in L2 are there or on their way already: the prefetches would only cost
  const bool stream = A.N * A.D * A.C * int64_t(sizeof(scalar_t)) > kStreamMinBytes;
  const scalar_t* x = static_cast<const scalar_t*>(A.x);
  scalar_t* out = static_cast<scalar_t*>(A.out);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n_ = r / A.D, d_ = r % A.D;
    const scalar_t* xr = row_ptr(A, n_, d_);
    scalar_t* outr = A.out_like_x ? out + (xr - x) : out + r * A.C;
    RowGrad rg = row_grad(A, n_, d_, xr, t);
    rg.stream = stream;
    acc_t so = 0;
    const int64_t head = head_to_line(xr, A.C, sizeof(scalar_t));  // a chunk of its own
    for (int64_t c0 = 0, n; c0 < A.C; c0 += n) {
      n = std::min(c0 == 0 && head != 0 ? head : kChunk, A.C - c0);
      const acc_t* g = weights(A, c0);
      if (A.prob && !rg.nan) {
        soft_coef(A, n_, d_, c0, n, gb);
        g = gb;
      }
      so += grad_any(xr + c0, outr + c0, c0, n, rg, g, t);
    }
    if (has_target(rg)) outr[rg.y] = static_cast<scalar_t>(rg.ya * so + rg.yb);
  }
}

// General layout: tiles of kTile consecutive rows gathered into zb, the gradient computed in
// place in acc_t, then scattered to the contiguous (N, C, D) output.
template <typename scalar_t>
void Ce<scalar_t>::bwd_tiles(const Args& A, int64_t tile0, int64_t tile1) {
  alignas(64) acc_t zb[kTile][kTileChunk];
  alignas(64) acc_t gb[kTileChunk];
  alignas(64) acc_t gt[kTile][kTileChunk];  // soft_tile's
  const Tf t = make_tf(A);
  scalar_t* out = static_cast<scalar_t*>(A.out);
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t r0 = tile * kTile, L = std::min(kTile, A.N * A.D - r0);
    const scalar_t* xl[kTile];
    int64_t ob[kTile];
    RowGrad rgs[kTile];
    acc_t so[kTile] = {};
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n_ = (r0 + l) / A.D, d_ = (r0 + l) % A.D;
      xl[l] = row_ptr(A, n_, d_);
      ob[l] = n_ * A.C * A.D + d_;
      rgs[l] = row_grad(A, n_, d_, xl[l], t);
    }
    for (int64_t c0 = 0; c0 < A.C; c0 += kTileChunk) {
      const int64_t n = std::min(kTileChunk, A.C - c0);
      gather_tile(A, xl, L, c0, n, zb);
      const bool soft_run = A.prob && soft_tile(A, r0, L, c0, n, gt);
      for (int64_t l = 0; l < L; ++l) {
        const acc_t* g = weights(A, c0);
        if (A.prob && !rgs[l].nan) {
          if (!soft_run) soft_coef(A, (r0 + l) / A.D, (r0 + l) % A.D, c0, n, gb);
          g = soft_run ? gt[l] : gb;
        }
        so[l] += grad_any(zb[l], zb[l], c0, n, rgs[l], g, t);
      }
      scatter_tile(A, ob, L, c0, n, zb, out);
    }
    for (int64_t l = 0; l < L; ++l) {
      const RowGrad& rg = rgs[l];
      if (has_target(rg)) out[ob[l] + rg.y * A.D] = static_cast<scalar_t>(rg.ya * so[l] + rg.yb);
    }
  }
}

template <typename scalar_t>
void Ce<scalar_t>::backward(const Args& A) {
  const bool lanes = lanes_ok(A, true);
  TORCH_INTERNAL_ASSERT(!A.out_like_x || A.xC == 1,
                        "CPU backward: a gradient in the logits' strides needs unit class stride");
  if (lanes) return backward_lanes(A);
  parallel_rows(A, (A.xC == 1 || A.C == 1) && (A.D == 1 || A.out_like_x),
                [&](int64_t b, int64_t e) { bwd_rows(A, b, e); },
                [&](int64_t b, int64_t e) { bwd_tiles(A, b, e); });
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
