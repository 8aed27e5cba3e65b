// The lanes backward's tile groups (struct Ce, ce_cpu_kernels.h, which includes this file): the
// gradient of K-dimensional inputs with many classes, several tiles swept together.
//
// A dtile's class is one line (bf16) or two (fp32) in each of C streams, a class stride apart,
// so a tile alone (bwd_lanes) keeps 2 C streams of logits and gradient in flight -- more than
// the hardware prefetchers follow -- and where the stride is a multiple of 4 KiB, C x 2 lines in
// one set of L1 and of L2. Up to kBwdGroup consecutive full dtiles of one n are therefore swept
// together, kBwdClassBlock classes at a time, tile after tile: each class's lines are then read
// one after the other, and only that block's lines share a set. A tile's sums over the classes
// wait in its GroupTile between blocks. The per-element formulas and their order per lane are
// bwd_lanes' (ce_cpu_lanes.h), so the gradient is the same bits either way (a test holds them
// to it). They are written out twice on purpose: one always-inline function for a class's step,
// its row vectors and sums in two structs, made both paths 2-5 % slower (forward+backward at
// (16, 21, 512, 512) bf16 40-41 -> 41-46 ms, (8, 150, 512, 512) bf16 145-151 -> 150-159).
//
// Only from kBwdGroupMinC classes: below, a group's setup and its state's loads and stores between
// class blocks cost more than the streams do (forward+backward, Intel, 2 threads: 5-10 % slower
// grouped at (64, 25, 64, 64) and (16, 26, 512, 512); from 27 classes as fast or faster,
// (16, 27, 512, 512) fp32 93-107 -> 87-88 ms, (16, 28, 512, 512) bf16 82-87 -> 56-61). Blocks of
// 8 classes, or the lines kLanePrefetch ahead in place of the aliasing classes' (lane_load_bwd),
// were no faster. bwd_lanes' own loop stays as it is for the inputs it keeps: sweeping a lone
// tile through this code (its state in memory between phases) made those 20-25 % slower at
// (8, 4, 512, 512) and 4-10 % at (16, 21, 512, 512).
//
// The forward keeps its lone tiles: it reads C streams, not 2 C, and folds each tile from L1. Its
// groups tried the same way (a group's z loaded class block by class block into a buffer of
// 512 KiB, each tile folded from there, from L2), forward alone: (8, 150, 512, 512) 4-10 %
// faster; 5-20 % slower at (8, 64, 512, 512) bf16, (16, 28, 512, 512) fp32, (64, 32, 64, 64) fp32,
// 30 % at (4, 40, 300, 300) bf16, 1.3-1.8x the time at (16, 32, 512, 512) bf16.
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// Whether the tiles [tile0, tile1) are this path's (dtiles whose logits are one vector load a
// class, from kBwdGroupMinC classes); if so, their gradient. Tiles that cannot group (an n's
// last, partial tile; the range's ends) are swept as groups of one.
template <typename scalar_t>
template <int K, int Gm, bool Stats>
bool Ce<scalar_t>::bwd_lanes_grouped(const Args& A, int64_t tile0, int64_t tile1) {
  constexpr int64_t kBwdGroup = 16, kBwdClassBlock = 4, kBwdGroupMinC = 27;
  if (!(A.D >= W2 && A.xD == 1 && A.C >= kBwdGroupMinC)) return false;
  // One tile's row_grad scalars per lane, and its sums over the classes swept so far.
  struct GroupTile {
    Lanes T;
    alignas(64) acc_t gl[W2], gs[W2], wy[W2], yv[W2], gH[W2], gT[W2], Hv[W2];
    V hi[2], lo[2], P[2], Q[2], Y[2], S[2], Sv[2], E[2], so[2], py[2], dy[2], ly[2];
    bool special, finite;
  };
  GroupTile group[kBwdGroup];
  const bool alias = lanes_alias(A, 2);
  alignas(64) acc_t hi[W2], lo[W2], gy[W2];
  const Tf t = make_tf(A);
  const int64_t C = A.C, D = A.D;
  const acc_t* w = weights(A);
  const acc_t e = static_cast<acc_t>(A.eps), om = 1 - e, eC = e / static_cast<acc_t>(C);
  const acc_t ws = static_cast<acc_t>(A.wsum);
  scalar_t* out = static_cast<scalar_t*>(A.out);
  const V zero(acc_t(0)), one(acc_t(1)), none(acc_t(-1)), nan(kNaN), dz1(K == 1 ? t.a : acc_t(1));
  // row_grad's scalars per lane (lane_tile has read the tile's rows and targets)
  auto setup = [&](GroupTile& B) {
    const Lanes& T = B.T;
    lane_read(T, static_cast<const acc_t*>(A.gl), A.gN, A.gD, acc_t(0), B.gl);
    lane_lse(A, T, t, hi, lo);
    if (A.glse) lane_read(T, A.glse, A.glN, A.glD, acc_t(0), B.gs);
    else std::fill(B.gs, B.gs + W2, acc_t(0));
    if constexpr (Stats) {
      const acc_t* ent = static_cast<const acc_t*>(A.ent_in);
      if (A.gent) lane_read(T, static_cast<const acc_t*>(A.gent), A.geN, A.geD, acc_t(0), B.gH);
      else std::fill(B.gH, B.gH + W2, acc_t(0));
      if (A.gtlp) lane_read(T, static_cast<const acc_t*>(A.gtlp), A.gtN, A.gtD, acc_t(0), B.gT);
      else std::fill(B.gT, B.gT + W2, acc_t(0));
      lane_read(T, ent, A.eN, A.eD, acc_t(0), B.Hv);
      for (int64_t l = 0; l < W2; ++l) B.gT[l] = T.y[l] < 0 ? acc_t(0) : B.gT[l];  // counted
      if (A.gent_counted)
        for (int64_t l = 0; l < W2; ++l) B.gH[l] = T.y[l] < 0 ? acc_t(0) : B.gH[l];
    }
    if (w)
      for (int64_t l = 0; l < W2; ++l) B.wy[l] = w[std::max<int64_t>(T.y[l], 0)];
    // Masks are combined by blendv: mand(a, b) = a and b, mor(a, b) = a or b.
    auto mand = [&](V a, V b) { return V::blendv(zero, b, a); };
    auto mor = [&](V a, V b) { return V::blendv(a, b, b); };
    V any_special(zero), any_nonfinite(zero);
    for (int h = 0; h < 2; ++h) {
      const V y = V::loadu(T.yf + h * W), g = V::loadu(B.gl + h * W), s = V::loadu(B.gs + h * W);
      const V gh = Stats ? V::loadu(B.gH + h * W) : zero;
      const V ign = y == none, hv = V::loadu(hi + h * W);
      const V zero_row = mand(ign, mand(s == zero, gh == zero));
      const V wv = V::blendv(w ? V::loadu(B.wy + h * W) : one, zero, ign);
      wv.store(B.wy + h * W);
      // lse = -inf (all classes -inf), +inf or NaN: every p_c is NaN, as in torch
      const V nan_row = V::blendv((hv - hv) != zero, zero, zero_row);
      B.P[h] = V::blendv(g * (V(om) * wv + V(eC * ws)) + s, s, ign);
      B.E[h] = zero - gh;
      if constexpr (Stats)
        B.P[h] = B.P[h] + B.E[h] * V::loadu(B.Hv + h * W) - V::loadu(B.gT + h * W);
      B.Q[h] = V::blendv(g * V(eC), zero, ign);
      B.Y[h] = V::blendv(y, none, nan_row);  // lanes whose target's element is written
      B.hi[h] = hv;
      B.lo[h] = V::blendv(V::loadu(lo + h * W), zero, nan_row);
      B.S[h] = mor(zero_row, nan_row);
      B.Sv[h] = V::blendv(nan, zero, zero_row);
      any_special = mor(any_special, B.S[h]);
      const V bad = mor(mor(nan_row, (B.E[h] - B.E[h]) != zero),
                        mor((B.P[h] - B.P[h]) != zero, (B.Q[h] - B.Q[h]) != zero));
      any_nonfinite = mor(any_nonfinite, V::blendv(bad, zero, zero_row));
      B.so[h] = B.py[h] = B.ly[h] = zero;
      B.dy[h] = dz1;
    }
    B.special = any_lane(any_special);
    B.finite = Gm != 2 && !any_lane(any_nonfinite);
    B.Y[0].store(B.yv);
    B.Y[1].store(B.yv + W);
  };
  // The tile's classes [c0, c1): their gradients, and the tile's sums over them.
  auto sweep = [&](GroupTile& B, int64_t c0, int64_t c1) {
    const Lanes& T = B.T;
    const V hi0 = B.hi[0], hi1 = B.hi[1], lo0 = B.lo[0], lo1 = B.lo[1], P0 = B.P[0];
    const V P1 = B.P[1], Q0 = B.Q[0], Q1 = B.Q[1], y0 = B.Y[0], y1 = B.Y[1], sm0 = B.S[0];
    const V sm1 = B.S[1], sv0 = B.Sv[0], sv1 = B.Sv[1], E0 = B.E[0], E1 = B.E[1];
    V so0 = B.so[0], so1 = B.so[1], py0 = B.py[0], py1 = B.py[1], dy0 = B.dy[0], dy1 = B.dy[1];
    V ly0 = B.ly[0], ly1 = B.ly[1];
    const bool special = B.special, finite = B.finite;
    scalar_t* o = out + T.n0 * C * D + T.d0;  // lane l's gradient of class c at o[c D + l]
    for (int64_t c = c0; c < c1; ++c) {
      V xa, xb;
      lane_load_bwd(A, T, c, alias, o, nullptr, xa, xb);
      V da, db;
      const V za = tf_grad<K>(xa, t, da), zb = tf_grad<K>(xb, t, db);
      const V la = (za - hi0) - lo0, lb = (zb - hi1) - lo1;  // log p
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
      if (T.L < W2) store2_tail(o + c * D, T.L, ra, rb);
      else if (finite) store2_finite(o + c * D, ra, rb);
      else store2(o + c * D, ra, rb);
    }
    B.so[0] = so0, B.so[1] = so1, B.py[0] = py0, B.py[1] = py1;
    B.dy[0] = dy0, B.dy[1] = dy1, B.ly[0] = ly0, B.ly[1] = ly1;
  };
  // After the last class: the targets' elements, row_grad's ya * sum + yb.
  auto finish = [&](GroupTile& B) {
    const Lanes& T = B.T;
    scalar_t* o = out + T.n0 * C * D + T.d0;
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t i = h * W;
      const V g = V::loadu(B.gl + i), wv = V::loadu(B.wy + i), dz = B.dy[h], py = B.py[h];
      V ya = V(acc_t(-1)) * g * dz * V(om) * wv;
      V yb = dz * (g * V(eC) * (V(ws) * py - wv) + V::loadu(B.gs + i) * py);
      if constexpr (Stats) {  // row_grad: ya += dz gT, yb += dz E (p_y log p_y + p_y H)
        ya = ya + dz * V::loadu(B.gT + i);
        yb = yb + dz * B.E[h] * (py * floor_finite(B.ly[h]) + py * V::loadu(B.Hv + i));
      }
      (ya * B.so[h] + yb).store(gy + i);
    }
    for (int64_t l = 0; l < T.L; ++l)
      if (B.yv[l] >= 0) o[T.y[l] * D + l] = static_cast<scalar_t>(gy[l]);
  };
  const int64_t per = (D + W2 - 1) / W2, full = D / W2;  // tiles of an n, and its full ones
  int64_t next_n = 0, next_d = 0;
  for (int64_t tile = tile0; tile < tile1;) {
    const int64_t G = tile % per < full ? std::min({kBwdGroup, tile1 - tile, full - tile % per})
                                        : 1;
    for (int64_t g = 0; g < G; ++g) {
      Lanes& T = group[g].T;
      T.next_n = next_n;  // the row after the last tile's (lane_tile)
      T.next_d = next_d;
      lane_tile(A, tile + g, tile + g == tile0, T);
      next_n = T.next_n;
      next_d = T.next_d;
      setup(group[g]);
    }
    for (int64_t c0 = 0; c0 < C; c0 += kBwdClassBlock)
      for (int64_t g = 0; g < G; ++g) sweep(group[g], c0, std::min(C, c0 + kBwdClassBlock));
    for (int64_t g = 0; g < G; ++g) finish(group[g]);
    tile += G;
  }
  return true;
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
