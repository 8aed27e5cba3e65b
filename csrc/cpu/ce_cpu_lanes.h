// Rows of few classes (struct Ce, ce_cpu_kernels.h, which includes this file), index targets:
// W2 rows at once, one row per vector lane (two vectors a, b of W lanes), looping over the
// classes. The rows path (ce_cpu_forward.h / ce_cpu_backward.h) pays per row a horizontal max
// and sum, a vector tail, a compensated add over 2W lanes and a log; on a row of 10 classes that
// is most of the work, and the rows of a (N, C, D) input with D > 1 are gathered there. Here the
// per-row work is one lane of a vector operation. Probability targets: ce_cpu_lanes_soft.h.
//
// The tiles (which rows, how their logits load): ce_cpu_lane_tiles.h.
//
// The maths is the rows path's, formula for formula: per lane the State that fold<Gm, true>
// leaves (after the first sweep the max is final, so the classes at it are counted into k) and
// finish_row's loss / lse / aux; in the backward row_grad's P, Q, hi, lo and grad_chunk's sweep,
// with p_y, dz_y and sum_{c != y} p_c taken per lane where c == y. Where those branch per row
// (ignored rows, NaN, +inf and all -inf rows, the NaN / 0 fills of grad_any) the lanes blend, to
// the same values. The sums are plain vector sums, of a lane's classes, and the terms at the
// max are counted apart in k (the compensated add of the rows path is for 1 + tiny terms over
// long rows). tests/test_cpu_small_classes.py checks every layout, dtype and option against
// float64 torch on each copy the machine can run.
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// The lanes forward's exp(a), a = z - m <= 0 (fwd_lanes, fwd_lanes_soft): where the copy has
// NLLF_HAVE_LANE_EXP2, exp2_tiny(a log2 e) under the caller's TinyScope -- a = 0 gives exactly 1
// (the classes at the max, counted apart), -inf and every a below float's normal range 0, NaN
// stays NaN, as vexp. The rounding of a log2 e adds at most |a| 2^-24 to a term's relative
// error, as the rounding of a = z - m itself may: the lse's error grows by at most the mean of
// |a| over the row's softmax times 2^-24. Forward, one thread, Zen 4, against vexp: float32
// (4, 21, 512, 512) 1.10x, (8, 4, 512, 512) 1.12x, (2^20, 10) 1.07x faster; bf16 (4, 21, 512,
// 512) 1.05-1.10x.
// The backward keeps vexp: there each p = e^a is a gradient element of its own, and for bf16
// logits exp2_tiny was no faster (forward+backward (4, 21, 512, 512), (2, 40, 512, 512)).
template <typename scalar_t>
inline auto lane_exp(typename Ce<scalar_t>::V a) -> typename Ce<scalar_t>::V {
  using C = Ce<scalar_t>;
#ifdef NLLF_HAVE_LANE_EXP2
  if constexpr (C::kTinyExp) return exp2_tiny(a * typename C::V(C::kLog2e));
#endif
  return C::vexp(a);
}

// K: the transform (Tf), Gm: the smoothing g-sums (0 none, 1 g = 1, 2 g = w), as in fold.
// Stats: also the statistics (finish_stats' formulas per lane: T, the first class at the max).
template <typename scalar_t>
template <int K, int Gm, bool Stats>
void Ce<scalar_t>::fwd_lanes(const Args& A, int64_t tile0, int64_t tile1) {
  [[maybe_unused]] const TinyScope tiny{};
  alignas(64) acc_t zb[kLaneMaxC * W2];
  alignas(64) acc_t zy[W2] = {}, wy[W2], lm[W2], ld[W2], ls[W2], le[W2], lt[W2], la[W2];
  const Tf t = make_tf(A);
  const int64_t C = A.C, per_block = sum_tiles(A);  // (tile_sums: the tiles of a block)
  const acc_t* w = weights(A);
  const acc_t e = static_cast<acc_t>(A.eps), eC = e / static_cast<acc_t>(C);
  acc_t G = 0;  // sum_c g_c: the same for every row
  if constexpr (Gm == 1) G = static_cast<acc_t>(C);
  if constexpr (Gm == 2)
    for (int64_t c = 0; c < C; ++c) G += w[c];
  acc_t* loss = static_cast<acc_t*>(A.loss);
  acc_t* aux = static_cast<acc_t*>(A.aux);
  double* lse = static_cast<double*>(A.lse);
  const V zero(acc_t(0)), one(acc_t(1)), none(acc_t(-1)), ninf(-kInf), pinf(kInf), nan(kNaN);
  const bool pick = C <= 16;  // z_y by a lane mask in the sweep (2 operations a class), or gathered
  const bool alias = lanes_alias(A, 1);
  // Args::tile_sums: S running sums a Sum, NS of them (the loss and aux; with Stats all)
  constexpr int64_t S = W2 < 8 ? W2 : 8;
  constexpr int NS = Stats ? kTileSums : kSumAux + 1;
  double sum[NS][S] = {};
  Lanes T;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    lane_tile(A, tile, tile == tile0, T);
    V m0, m1;
    lane_load_max<K>(A, T, t, alias, zb, m0, m1);
    // Sweep 2, from L1: fold's sums against ref = m (0 where m = -inf, as there).
    // With few classes z_y - ref is picked here per lane; else gathered from zb below.
    const V r0 = V::blendv(m0, zero, m0 == ninf), r1 = V::blendv(m1, zero, m1 == ninf);
    const V yv0 = V::loadu(T.yf), yv1 = V::loadu(T.yf + W);
    V s0(zero), s1(zero), k0(zero), k1(zero), b0(zero), b1(zero), a0(zero), a1(zero);
    V t0(zero), t1(zero), i0(none), i1(none);  // Stats: T, and the first class at the max
    for (int64_t c = 0; c < C; ++c) {
      const V a = V::loadu(zb + c * W2) - r0, b = V::loadu(zb + c * W2 + W) - r1;
      if (pick) {
        const V vc(static_cast<acc_t>(c));
        a0 = select_eq(a0, a, vc, yv0);
        a1 = select_eq(a1, b, vc, yv1);
      }
      const V xa = lane_exp<scalar_t>(a), xb = lane_exp<scalar_t>(b);
      add_or_count(a, xa, s0, k0);  // at the max (a == 0) counted into k, not added to s
      add_or_count(b, xb, s1, k1);
      if constexpr (Stats) {
        t0 = fmadd(xa, floor_finite(a), t0);  // the classes at the max add 0
        t1 = fmadd(xb, floor_finite(b), t1);
        const V vc(static_cast<acc_t>(c));
        i0 = first_eq(i0, vc, a, zero, none);  // at the max, and no class before it was
        i1 = first_eq(i1, vc, b, zero, none);
      }
      if constexpr (Gm == 1) {
        b0 = b0 + a;
        b1 = b1 + b;
      } else if constexpr (Gm == 2) {
        const V wc(w[c]);
        b0 = fmadd(wc, a, b0);
        b1 = fmadd(wc, b, b1);
      }
    }
    // finish_row (ce_cpu_forward.h) for a vector of rows, the same formulas in the same order.
    if (!pick)
      for (int64_t l = 0; l < W2; ++l) zy[l] = zb[std::max<int64_t>(T.y[l], 0) * W2 + l];
    if (w)
      for (int64_t l = 0; l < W2; ++l) wy[l] = w[std::max<int64_t>(T.y[l], 0)];
    auto finish = [&](int64_t h, V m, V s, V k, V b, V ay, V tv, V iv) {
      const V ign = V::loadu(T.yf + h) == none;
      const V wv = V::blendv(w ? V::loadu(wy + h) : one, zero, ign);
      const V logd = vlog1p((k - one) + s);
      // m - z_y: -(z_y - m) is the same number; where m = -inf both make the loss NaN
      const V mzy = pick ? none * ay : m - V::loadu(zy + h);
      V l = V(acc_t(1) - e) * wv * (mzy + logd);
      if (A.eps != 0) l = l + V(eC) * (V(G) * logd - b);
      // NaN where lse is +inf or NaN, 0 on ignored rows
      l = V::blendv(l, nan, m == pinf);
      l = V::blendv(l, nan, m != m);
      l = V::blendv(l, nan, logd != logd);
      l = V::blendv(l, zero, ign);
      l.store(ls + h);
      wv.store(wy + h);
      m.store(lm + h);
      V::blendv(logd, zero, m == pinf).store(ld + h);  // lse = m + log d, +inf where m is
      if constexpr (Stats) {  // finish_stats, per lane
        V ent = logd - tv / (k + s);
        ent = V::blendv(ent, nan, m == pinf);
        ent.store(le + h);
        // log p_y = (z_y - m) - log d; NaN as the loss (0 on ignored rows)
        V tl = (V(acc_t(0)) - mzy) - logd;
        tl = V::blendv(tl, nan, m == pinf);
        tl = V::blendv(tl, nan, logd != logd);
        V::blendv(tl, zero, ign).store(lt + h);
        iv.store(la + h);
      }
    };
    finish(0, m0, s0, k0, b0, a0, t0, i0);
    finish(W, m1, s1, k1, b1, a1, t1, i1);
    if (any_lane((m0 == pinf) | (m1 == pinf))) lanes_inf_lse(zb, C, lm, ld);
    double* lser = lse + T.r0;
    lane_loop(T.L, W2, [&](int64_t l) {
      lser[l] = static_cast<double>(lm[l]) + static_cast<double>(ld[l]);
    });
    if (!A.tile_sums) {
      acc_t* lossr = loss + T.r0;
      acc_t* auxr = aux + T.r0;
      lane_loop(T.L, W2, [&](int64_t l) {
        lossr[l] = ls[l];
        auxr[l] = wy[l];
      });
    }
    alignas(64) int64_t pl[W2];  // Stats: each lane's argmax
    if constexpr (Stats) {
      const bool want_ent = A.want_ent, want_pred = A.want_pred;
      // Branch-free, so that a full tile's copy is vector code (as one loop with the NaN test
      // and search below, scalar: a third of a 4-class forward with statistics).
      for (int64_t l = 0; l < W2; ++l)
        pl[l] = want_pred && la[l] >= 0 ? static_cast<int64_t>(la[l]) : 0;
      // A NaN softmax (z - m = 0 found nowhere or not alone): a NaN logit (the first, as
      // torch.argmax), else the first at the max (+inf, or -inf when every class is)
      auto nan_in = [](const acc_t* v) { return V::loadu(v) != V::loadu(v); };
      const V nan_lanes = nan_in(ls) | nan_in(ls + W) | nan_in(le) | nan_in(le + W);
      const bool any_nan = any_lane(nan_lanes);
      for (int64_t l = 0; any_nan && want_pred && l < T.L; ++l) {
        if (!std::isnan(ls[l]) && !std::isnan(le[l])) continue;
        int64_t first_nan = -1, first_max = -1;
        for (int64_t c = 0; c < C && first_nan < 0; ++c) {
          const acc_t z = zb[c * W2 + l];
          if (std::isnan(z)) first_nan = c;
          else if (first_max < 0 && z == lm[l]) first_max = c;
        }
        if (first_nan >= 0 || first_max >= 0) pl[l] = first_nan >= 0 ? first_nan : first_max;
      }
      // (the rows the caller asked for: all of them, except with sums)
      if (A.ent) {
        acc_t* entr = static_cast<acc_t*>(A.ent) + T.r0;
        lane_loop(T.L, W2, [&](int64_t l) { entr[l] = want_ent ? le[l] : acc_t(0); });
      }
      if (A.tlp) {
        acc_t* tlpr = static_cast<acc_t*>(A.tlp) + T.r0;
        lane_loop(T.L, W2, [&](int64_t l) { tlpr[l] = lt[l]; });
      }
      if (A.pred) {
        int64_t* predr = A.pred + T.r0;
        lane_loop(T.L, W2, [&](int64_t l) { predr[l] = pl[l]; });
      }
    }
    if (A.tile_sums) {  // the reduction in this pass: no loss / aux rows written and read back
      // Each sum's lanes into S running sums in double over the tiles of a block (forward_lanes),
      // then a tree: in vectors, and a fixed order (one running sum was a quarter of the
      // forward's time; lane values masked and picked in branches, scalar code, took longer
      // than the kernel; a tree every tile, 15 % of it). Lanes past L are ignored rows.
      auto add = [&](int k, const acc_t* v) {
        for (int64_t i = 0; i < W2; i += S)
          for (int64_t j = 0; j < S; ++j) sum[k][j] += static_cast<double>(v[i + j]);
      };
      add(kSumLoss, ls);
      add(kSumAux, wy);
      if constexpr (Stats) {  // over the counted rows: lse = m + log d summed as two parts
        alignas(64) acc_t pf[W2], v[6][W2];
        for (int64_t l = 0; l < W2; ++l) pf[l] = static_cast<acc_t>(pl[l]);
        for (int64_t h = 0; h < W2; h += W) {
          const V yv = V::loadu(T.yf + h), counted = yv != none, m = V::loadu(lm + h),
                  ld_h = V::loadu(ld + h), lse_f = m + ld_h;
          V::blendv(zero, m, counted).store(v[0] + h);
          V::blendv(zero, ld_h, counted).store(v[1] + h);
          V::blendv(zero, lse_f - lse_f, counted).store(v[2] + h);  // 0 (lse finite), NaN
          V::blendv(zero, V::loadu(le + h), counted).store(v[3] + h);
          V::blendv(zero, V::blendv(zero, one, V::loadu(pf + h) == yv), counted).store(v[4] + h);
          V::blendv(zero, one, counted).store(v[5] + h);
        }
        add(kSumLse, v[0]);
        add(kSumLse, v[1]);
        add(kSumZLoss, v[2]);
        add(kSumEntropy, v[3]);
        add(kSumTargetLogp, lt);  // 0 on ignored rows
        add(kSumHits, v[4]);
        add(kSumCounted, v[5]);
      }
      if ((tile + 1) % per_block == 0 || tile + 1 == tile1) {  // the block's last tile here
        double* block = A.tile_sums + kTileSums * (tile / per_block);
        for (int k = 0; k < NS; ++k) {
          for (int64_t h = S / 2; h >= 1; h /= 2)
            for (int64_t j = 0; j < h; ++j) sum[k][j] += sum[k][j + h];
          block[k] += sum[k][0];
          for (int64_t j = 0; j < S; ++j) sum[k][j] = 0;
        }
      }
    }
  }
}

// The gradient of a tile: grad_chunk's sweep with row_grad's scalars per lane (ce_cpu_backward.h,
// the same formulas in the same order), the lanes of ignored rows (0) or non-finite lse (NaN)
// blended in as grad_any fills them; p_y, dz_y and sum_{c != y} p_c are taken per lane where
// c == y, and the target's element is written after the sweep.
// Stats: with the statistics' gradients (row_grad's E, H, gT per lane).
template <typename scalar_t>
template <int K, int Gm, bool Stats>
void Ce<scalar_t>::bwd_lanes(const Args& A, int64_t tile0, int64_t tile1) {
  if (bwd_lanes_grouped<K, Gm, Stats>(A, tile0, tile1)) return;  // ce_cpu_lanes_group.h
  const bool alias = lanes_alias(A, 2);
  alignas(64) acc_t zb[kLaneMaxC * W2];
  alignas(64) acc_t gl[W2], gs[W2], hi[W2], lo[W2], wy[W2], yv[W2], gy[W2];
  alignas(64) acc_t gH[W2], gT[W2], Hv[W2];
  const Tf t = make_tf(A);
  const int64_t C = A.C, D = A.D;
  const acc_t* w = weights(A);
  const acc_t e = static_cast<acc_t>(A.eps), om = 1 - e, eC = e / static_cast<acc_t>(C);
  const acc_t ws = static_cast<acc_t>(A.wsum);
  scalar_t* out = static_cast<scalar_t*>(A.out);
  const V zero(acc_t(0)), one(acc_t(1)), none(acc_t(-1)), nan(kNaN), dz1(K == 1 ? t.a : acc_t(1));
  Lanes T;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    lane_tile(A, tile, tile == tile0, T);
    lane_read(T, static_cast<const acc_t*>(A.gl), A.gN, A.gD, acc_t(0), gl);
    lane_lse(A, T, t, hi, lo);  // row_grad's hi, lo per lane
    if (A.glse) lane_read(T, A.glse, A.glN, A.glD, acc_t(0), gs);
    else std::fill(gs, gs + W2, acc_t(0));
    if constexpr (Stats) {
      const acc_t* ent = static_cast<const acc_t*>(A.ent_in);
      if (A.gent) lane_read(T, static_cast<const acc_t*>(A.gent), A.geN, A.geD, acc_t(0), gH);
      else std::fill(gH, gH + W2, acc_t(0));
      if (A.gtlp) lane_read(T, static_cast<const acc_t*>(A.gtlp), A.gtN, A.gtD, acc_t(0), gT);
      else std::fill(gT, gT + W2, acc_t(0));
      lane_read(T, ent, A.eN, A.eD, acc_t(0), Hv);
      for (int64_t l = 0; l < W2; ++l) gT[l] = T.y[l] < 0 ? acc_t(0) : gT[l];  // counted rows
      if (A.gent_counted)
        for (int64_t l = 0; l < W2; ++l) gH[l] = T.y[l] < 0 ? acc_t(0) : gH[l];
    }
    if (w)
      for (int64_t l = 0; l < W2; ++l) wy[l] = w[std::max<int64_t>(T.y[l], 0)];
    // row_grad per lane. Masks are combined by blendv: mand(a, b) = a and b, mor(a, b) = a or b.
    auto mand = [&](V a, V b) { return V::blendv(zero, b, a); };
    auto mor = [&](V a, V b) { return V::blendv(a, b, b); };
    V P[2], Q[2], Y[2], H[2], Lo[2], S[2], Sv[2], E[2];
    V any_special(zero), any_nonfinite(zero);
    for (int h = 0; h < 2; ++h) {
      const V y = V::loadu(T.yf + h * W), g = V::loadu(gl + h * W), s = V::loadu(gs + h * W);
      const V gh = Stats ? V::loadu(gH + h * W) : zero;
      const V ign = y == none, hv = V::loadu(hi + h * W);
      const V zero_row = mand(ign, mand(s == zero, gh == zero));
      const V wv = V::blendv(w ? V::loadu(wy + h * W) : one, zero, ign);
      wv.store(wy + h * W);
      // lse = -inf (all classes -inf), +inf or NaN: every p_c is NaN, as in torch
      const V nan_row = V::blendv((hv - hv) != zero, zero, zero_row);
      P[h] = V::blendv(g * (V(om) * wv + V(eC * ws)) + s, s, ign);
      E[h] = zero - gh;
      if constexpr (Stats) P[h] = P[h] + E[h] * V::loadu(Hv + h * W) - V::loadu(gT + h * W);
      Q[h] = V::blendv(g * V(eC), zero, ign);
      Y[h] = V::blendv(y, none, nan_row);  // lanes whose target's element is written
      H[h] = hv;
      Lo[h] = V::blendv(V::loadu(lo + h * W), zero, nan_row);
      S[h] = mor(zero_row, nan_row);
      Sv[h] = V::blendv(nan, zero, zero_row);
      any_special = mor(any_special, S[h]);
      const V bad = mor(mor(nan_row, (E[h] - E[h]) != zero),
                        mor((P[h] - P[h]) != zero, (Q[h] - Q[h]) != zero));
      any_nonfinite = mor(any_nonfinite, V::blendv(bad, zero, zero_row));
    }
    // Any lane set: a mask test (a horizontal sum's 16 dependent adds were 1/8 of the tile).
    const bool special = any_lane(any_special);
    const bool finite = Gm != 2 && !any_lane(any_nonfinite);
    Y[0].store(yv);
    Y[1].store(yv + W);
    const V hi0 = H[0], hi1 = H[1], lo0 = Lo[0], lo1 = Lo[1], P0 = P[0], P1 = P[1], Q0 = Q[0];
    const V Q1 = Q[1], y0 = Y[0], y1 = Y[1], sm0 = S[0], sm1 = S[1], sv0 = Sv[0], sv1 = Sv[1];
    const V E0 = E[0], E1 = E[1];
    V so0(zero), so1(zero), py0(zero), py1(zero), dy0(dz1), dy1(dz1), ly0(zero), ly1(zero);
    if (!T.vin) lane_gather(A, T, zb);
    // A dtile's gradient straight into the contiguous output, lane l's of class c at o[c D + l];
    // else (other tiles, or a gradient in the logits' strides, Args::out_like_x) through zb.
    const bool direct = T.dtile && !A.out_like_x;
    scalar_t* o = out + T.n0 * C * D + T.d0;
    // direct: a class's gradient for the tile's lanes, one vector store (a partial one past L)
    auto store = [&](scalar_t* p, V a, V b) {
      if (T.L < W2) store2_tail(p, T.L, a, b);
      else if (finite) store2_finite(p, a, b);
      else store2(p, a, b);
    };
    // With few classes the tile waits in zb for the targets' elements (a blend per class, no
    // scalar stores).
    const bool late = direct && C <= 16;
    for (int64_t c = 0; c < C; ++c) {
      V xa, xb;
      lane_load_bwd(A, T, c, alias, o, zb, xa, xb);
      V da, db;
      const V za = tf_grad<K>(xa, t, da), zb_ = tf_grad<K>(xb, t, db);
      const V la = (za - hi0) - lo0, lb = (zb_ - hi1) - lo1;  // log p
      const V pa = vexp(la), pb = vexp(lb);
      V ra = P0 * pa, rb = P1 * pb;
      if constexpr (Stats) {  // E p log p, 0 where p = 0 (row_grad)
        ra = fmadd(E0 * pa, floor_finite(la), ra);
        rb = fmadd(E1 * pb, floor_finite(lb), rb);
      }
      if constexpr (Gm == 1) {
        ra = ra - Q0;
        rb = rb - Q1;
      } else if constexpr (Gm == 2) {
        const V wc(w[c]);
        ra = ra - Q0 * wc;
        rb = rb - Q1 * wc;
      }
      if constexpr (K != 0) {
        ra = ra * da;
        rb = rb * db;
      }
      if (special) {
        ra = V::blendv(ra, sv0, sm0);
        rb = V::blendv(rb, sv1, sm1);
      }
      const V vc(static_cast<acc_t>(c));  // select_eq(a, b, vc, y): b in the lanes whose y is c
      so0 = so0 + select_eq(pa, zero, vc, y0);
      so1 = so1 + select_eq(pb, zero, vc, y1);
      py0 = select_eq(py0, pa, vc, y0);
      py1 = select_eq(py1, pb, vc, y1);
      if constexpr (Stats) {
        ly0 = select_eq(ly0, la, vc, y0);
        ly1 = select_eq(ly1, lb, vc, y1);
      }
      if constexpr (K == 2) {
        dy0 = select_eq(dy0, da, vc, y0);
        dy1 = select_eq(dy1, db, vc, y1);
      }
      if (!direct || late) {
        ra.store(zb + c * W2);
        rb.store(zb + c * W2 + W);
      } else {
        store(o + c * D, ra, rb);
      }
    }
    // The target's element, row_grad's ya * sum + yb
    auto target = [&](int64_t h, V so, V py, V dz, V ly, V Ev) {
      const V g = V::loadu(gl + h), wv = V::loadu(wy + h);
      V ya = V(acc_t(-1)) * g * dz * V(om) * wv;
      V yb = dz * (g * V(eC) * (V(ws) * py - wv) + V::loadu(gs + h) * py);
      if constexpr (Stats) {  // row_grad: ya += dz gT, yb += dz E (p_y log p_y + p_y H)
        ya = ya + dz * V::loadu(gT + h);
        yb = yb + dz * Ev * (py * floor_finite(ly) + py * V::loadu(Hv + h));
      }
      return ya * so + yb;
    };
    const V g0 = target(0, so0, py0, dy0, ly0, E0), g1 = target(W, so1, py1, dy1, ly1, E1);
    if (late) {  // the tile from zb, each target's element blended in
      for (int64_t c = 0; c < C; ++c) {
        const V vc(static_cast<acc_t>(c));
        store(o + c * D, select_eq(V::loadu(zb + c * W2), g0, vc, y0),
              select_eq(V::loadu(zb + c * W2 + W), g1, vc, y1));
      }
    } else {
      g0.store(gy);
      g1.store(gy + W);
      for (int64_t l = 0; l < T.L; ++l) {
        if (yv[l] < 0) continue;
        if (direct) o[T.y[l] * D + l] = static_cast<scalar_t>(gy[l]);
        else zb[T.y[l] * W2 + l] = gy[l];
      }
    }
    if (!direct) lane_scatter(A, T, zb, out);
  }
}

// Each (transform, g-sums) pair its own instantiation, tiles on at::parallel_for's threads.
#define NLLF_LANES_RUN(FN)                                                                    \
  const int64_t tiles = lane_tiles(A);                                                        \
  if (tiles == 0) return;                                                                     \
  const int gm = A.eps == 0 ? 0 : A.w ? 2 : 1, kind = make_tf(A).kind;                        \
  const int64_t grain = std::max<int64_t>(1, 32768 / (A.C * W2));                             \
  auto run = [&](auto fn) { /* with tile_sums, whole blocks of tiles to a thread */          \
    if (!A.tile_sums) return at::parallel_for(0, tiles, grain, fn);                           \
    const int64_t per = sum_tiles(A);                                                         \
    at::parallel_for(0, (tiles + per - 1) / per, std::max<int64_t>(1, grain / per),           \
                     [&](int64_t b, int64_t e) { fn(b * per, std::min(tiles, e * per)); });   \
  };                                                                                          \
  if (kind == 0 && gm == 0) return run([&](int64_t b, int64_t e) { FN<0, 0>(A, b, e); });     \
  if (kind == 0 && gm == 1) return run([&](int64_t b, int64_t e) { FN<0, 1>(A, b, e); });     \
  if (kind == 0) return run([&](int64_t b, int64_t e) { FN<0, 2>(A, b, e); });                \
  if (kind == 1 && gm == 0) return run([&](int64_t b, int64_t e) { FN<1, 0>(A, b, e); });     \
  if (kind == 1 && gm == 1) return run([&](int64_t b, int64_t e) { FN<1, 1>(A, b, e); });     \
  if (kind == 1) return run([&](int64_t b, int64_t e) { FN<1, 2>(A, b, e); });                \
  if (gm == 0) return run([&](int64_t b, int64_t e) { FN<2, 0>(A, b, e); });                  \
  if (gm == 1) return run([&](int64_t b, int64_t e) { FN<2, 1>(A, b, e); });                  \
  run([&](int64_t b, int64_t e) { FN<2, 2>(A, b, e); });

template <typename scalar_t>
void Ce<scalar_t>::forward_lanes(const Args& A) {
  if (A.prob) return soft_lanes(A, false);  // ce_cpu_lanes_soft.h
  if (A.sums) {  // per-block sums, then over the blocks in a fixed order (any thread count)
    const int64_t per = sum_tiles(A), blocks = (lane_tiles(A) + per - 1) / per;
    std::vector<double> part(kTileSums * blocks, 0.0);
    Args B = A;
    B.sums = nullptr;
    B.tile_sums = part.data();
    forward_lanes(B);
    // Four running sums (block i into i % 4), then a fixed tree: a fixed order, and not one
    // chain of dependent adds over every block.
    for (int k = 0; k < kTileSums; ++k) {
      double s[4] = {0, 0, 0, 0};
      for (int64_t i = 0; i < blocks; ++i) s[i % 4] += part[kTileSums * i + k];
      A.sums[k] = (s[0] + s[1]) + (s[2] + s[3]);
    }
    A.sums[kSummed] = 1;
    return;
  }
  if (A.stats_fwd()) {
    NLLF_LANES_RUN(fwd_lanes_stats)
  } else {
    NLLF_LANES_RUN(fwd_lanes)
  }
}

template <typename scalar_t>
void Ce<scalar_t>::backward_lanes(const Args& A) {
  if (A.prob) return soft_lanes(A, true);
  if (A.stats_bwd()) {
    NLLF_LANES_RUN(bwd_lanes_stats)
  } else {
    NLLF_LANES_RUN(bwd_lanes)
  }
}
#undef NLLF_LANES_RUN
}  // namespace nllfused_cpu::NLLF_CPU_NS
