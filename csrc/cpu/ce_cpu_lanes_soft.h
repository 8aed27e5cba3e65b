// Rows of few classes with probability targets (struct Ce, ce_cpu_kernels.h, which includes this
// file): the lanes of ce_cpu_lanes.h, each lane's class c weighed by its own g_c = w_c q'_c,
// q' = (1 - e) q + e/C (soft_coef's, per lane). The rows path reads a row's targets one strided
// scalar at a time, and a K-dim input's rows tile by tile through scalar copies: at
// (8, 21, 128, 128) a tenth of torch's speed; here a dtile's class is one vector load of logits,
// one of targets.
//
// The maths is the rows path's for probability targets, formula for formula (finish_row,
// row_grad, grad_chunk with per-class g): forward B = sum_c g_c (z_c - m) (a class with g_c = 0
// adds nothing, even at z_c = -inf), G = sum_c g_c, loss = G log d - B (0 where G = 0), aux = G;
// backward (P p_c - Q g_c) dz_c with P = grad_loss G + grad_lse, Q = grad_loss, NaN on the rows
// whose lse is not finite. The loss alone: no statistics, no in-pass sums (lanes_ok).
// tests/test_cpu_small_classes.py checks it against float64 torch on every layout and copy.
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// g[c W2 + l] = w_c ((1 - e) q + e/C) for lane l's row and class c, as soft_coef_t; 0 past L.
template <typename scalar_t>
template <typename q_t>
void Ce<scalar_t>::lane_soft_t(const Args& A, const Lanes& T, const q_t* q, acc_t* g) {
  const int64_t C = A.C, qC = A.qC;
  const acc_t om = static_cast<acc_t>(1 - A.eps), ec = static_cast<acc_t>(A.eps / A.C);
  const acc_t* w = weights(A);
  lane_zero_dead(T, C, g);
  if (T.dtile && A.qD == 1) {  // a class of the tile: W2 consecutive targets
    const q_t* q0 = q + T.n0 * A.qN + T.d0;
    // A whole tile: two vector loads a class, and its line kLanePrefetch bytes ahead asked for
    // by hand -- the C classes' targets are C streams, as the logits' (lane_load_max), and
    // more than the hardware prefetcher follows; ahead whatever lanes_alias says (a class
    // c + kLaneAhead of the tile gained nothing here). The reads were scalar and stalled: a
    // quarter of the (8, 21, 128, 128) float32 forward+backward's samples, ~1 % after (perf);
    // 2 threads, Zen 3, against torch in one process: that case 0.76-1.07x -> 1.42-1.68x,
    // bf16 1.09x -> 1.39-1.46x, (2, 300, 64, 64) float32 1.28x -> 2.58-2.91x.
    for (int64_t c = 0; T.L == W2 && c < C; ++c) {
      const q_t* qc = q0 + c * qC;
      lane_prefetch(qc);
      if constexpr (W2 * sizeof(q_t) > 64) lane_prefetch(qc + 64 / sizeof(q_t));
      V a = V(om) * load1(qc) + V(ec), b = V(om) * load1(qc + W) + V(ec);
      if (w) {
        a = V(w[c]) * a;
        b = V(w[c]) * b;
      }
      a.store(g + c * W2);
      b.store(g + c * W2 + W);
    }
    for (int64_t c = 0; T.L < W2 && c < C; ++c) {  // a partial tile: the lanes before T.L
      const q_t* qc = q0 + c * qC;
      acc_t* gc = g + c * W2;
      if (w) {
        const acc_t wc = w[c];
        lane_loop(T.L, W2, [&](int64_t l) { gc[l] = wc * (om * static_cast<acc_t>(qc[l]) + ec); });
      } else {
        lane_loop(T.L, W2, [&](int64_t l) { gc[l] = om * static_cast<acc_t>(qc[l]) + ec; });
      }
    }
    return;
  }
  // Channels-last targets (classes adjacent, a tile's lanes kTile apart): kTile-lane blocks
  // moved as lane_gather moves the logits (transpose_block; run_to_rows below kTile classes),
  // then weighed a class at a time with the expression of the branch above, where each target
  // was a scalar read: (8, C, 128, 128) channels-last logits and targets, one thread, forward+
  // backward fp32 C = 4 1.75 -> 1.27 ms, bf16 C = 4 1.77 -> 1.13, C = 21 4.87 -> 4.02.
  // The same for a plain (N, C) input's consecutive rows, qN apart.
  int64_t blocked = 0;
  if constexpr (kLaneBlocks) {
    if ((T.dtile || A.D == 1) && A.qC == 1) blocked = T.L / kTile * kTile;
  }
  const int64_t qs = T.dtile ? A.qD : A.qN;  // between consecutive lanes
  for (int64_t l0 = 0; l0 < blocked; l0 += kTile) {
    const q_t* qb = q + T.n0 * A.qN + T.d0 * A.qD + l0 * qs;
    if (C < kTile) {
      if (qs == C && run_to_rows(qb, C, g + l0, W2)) continue;
      blocked = l0;  // (l0 = 0: the copy has no run_to_rows) the lanes' own reads
      break;
    }
    for (int64_t c = 0; c < C; c += kTile) {
      const int64_t cb = block_start(c, C);
      transpose_block(qb + cb, qs, g + cb * W2 + l0, W2);
    }
  }
  for (int64_t c = 0; blocked > 0 && c < C; ++c) {
    acc_t* gc = g + c * W2;
    if (w) {
      const acc_t wc = w[c];
      lane_loop(blocked, W2, [&](int64_t l) { gc[l] = wc * (om * gc[l] + ec); });
    } else {
      lane_loop(blocked, W2, [&](int64_t l) { gc[l] = om * gc[l] + ec; });
    }
  }
  // halves of W consecutive d of one n (Lanes::oh): a class of the half one vector
  bool half_run[2] = {false, false};
  for (int64_t h = 0; h < 2 && A.qD == 1; ++h) {
    if (T.oh[h] < 0) continue;
    half_run[h] = true;
    const q_t* q0 = q + T.n[h * W] * A.qN + T.d[h * W];
    for (int64_t c = 0; c < C; ++c) {
      V v = V(om) * load1(q0 + c * qC) + V(ec);
      if (w) v = V(w[c]) * v;
      v.store(g + c * W2 + h * W);
    }
  }
  for (int64_t l = blocked; l < T.L; ++l) {
    if (half_run[l / W]) continue;
    const int64_t n_ = T.dtile ? T.n0 : T.n[l], d_ = T.dtile ? T.d0 + l : T.d[l];
    const q_t* ql = q + n_ * A.qN + d_ * A.qD;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t qc = om * static_cast<acc_t>(ql[c * qC]) + ec;
      g[c * W2 + l] = w ? w[c] * qc : qc;
    }
  }
}

template <typename scalar_t>
void Ce<scalar_t>::lane_soft(const Args& A, const Lanes& T, acc_t* g) {
  switch (A.qtype) {
    case at::kHalf: return lane_soft_t(A, T, static_cast<const at::Half*>(A.q), g);
    case at::kBFloat16: return lane_soft_t(A, T, static_cast<const at::BFloat16*>(A.q), g);
    case at::kFloat: return lane_soft_t(A, T, static_cast<const float*>(A.q), g);
    default: return lane_soft_t(A, T, static_cast<const double*>(A.q), g);
  }
}

// Forward: sweep 1 (lane_load_max), then fold<3, true>'s sums per lane from zb, finish_row's
// probability-target loss.
template <typename scalar_t>
template <int K>
void Ce<scalar_t>::fwd_lanes_soft(const Args& A, int64_t tile0, int64_t tile1) {
  [[maybe_unused]] const TinyScope tiny{};
  alignas(64) acc_t zb[kLaneMaxC * W2], gb[kLaneMaxC * W2];
  alignas(64) acc_t ls[W2], lg[W2], lm[W2], ld[W2];
  const Tf t = make_tf(A);
  const int64_t C = A.C;
  const V zero(acc_t(0)), one(acc_t(1)), ninf(-kInf), pinf(kInf), nan(kNaN);
  const bool alias = lanes_alias(A, 1);
  Lanes T;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    lane_tile(A, tile, tile == tile0, T);
    lane_soft(A, T, gb);
    V m0, m1;
    lane_load_max<K>(A, T, t, alias, zb, m0, m1);
    // fold's sums against ref = m (0 where m = -inf, as there)
    const V r0 = V::blendv(m0, zero, m0 == ninf), r1 = V::blendv(m1, zero, m1 == ninf);
    V s0(zero), s1(zero), k0(zero), k1(zero), b0(zero), b1(zero), g0(zero), g1(zero);
    for (int64_t c = 0; c < C; ++c) {
      const V a = V::loadu(zb + c * W2) - r0, b = V::loadu(zb + c * W2 + W) - r1;
      const V ga = V::loadu(gb + c * W2), gbv = V::loadu(gb + c * W2 + W);
      // at the max (a == 0) counted into k, not added to s
      add_or_count(a, lane_exp<scalar_t>(a), s0, k0);
      add_or_count(b, lane_exp<scalar_t>(b), s1, k1);
      b0 = b0 + keep_nonzero(ga, ga * a);  // g_c = 0 adds nothing, even at z_c = -inf
      b1 = b1 + keep_nonzero(gbv, gbv * b);
      g0 = g0 + ga;
      g1 = g1 + gbv;
    }
    auto finish = [&](int64_t h, V m, V s, V k, V b, V G) {
      const V logd = vlog1p((k - one) + s);
      // G log d - B; 0 for G log d where G = 0 (an all -inf row's log d is -inf)
      V l = keep_nonzero(G, G * logd) - b;
      l = V::blendv(l, nan, m == pinf);  // NaN where lse is +inf or NaN
      l = V::blendv(l, nan, m != m);
      l = V::blendv(l, nan, logd != logd);
      l.store(ls + h);
      G.store(lg + h);
      m.store(lm + h);
      V::blendv(logd, zero, m == pinf).store(ld + h);  // lse = m + log d, +inf where m is
    };
    finish(0, m0, s0, k0, b0, g0);
    finish(W, m1, s1, k1, b1, g1);
    if (any_lane((m0 == pinf) | (m1 == pinf))) lanes_inf_lse(zb, C, lm, ld);
    double* lser = static_cast<double*>(A.lse) + T.r0;
    acc_t* lossr = static_cast<acc_t*>(A.loss) + T.r0;
    acc_t* auxr = static_cast<acc_t*>(A.aux) + T.r0;
    lane_loop(T.L, W2, [&](int64_t l) {
      lser[l] = static_cast<double>(lm[l]) + static_cast<double>(ld[l]);
      lossr[l] = ls[l];
      auxr[l] = lg[l];
    });
  }
}

// Backward: row_grad's P, Q, hi, lo per lane (lane_lse), then grad_chunk's sweep with per-class
// g.
template <typename scalar_t>
template <int K>
void Ce<scalar_t>::bwd_lanes_soft(const Args& A, int64_t tile0, int64_t tile1) {
  const bool alias = lanes_alias(A, 2);
  alignas(64) acc_t zb[kLaneMaxC * W2], gb[kLaneMaxC * W2];
  alignas(64) acc_t gl[W2], gs[W2], hi[W2], lo[W2], S[W2];
  const Tf t = make_tf(A);
  const int64_t C = A.C, D = A.D;
  scalar_t* out = static_cast<scalar_t*>(A.out);
  const V zero(acc_t(0)), nan(kNaN);
  Lanes T;
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    lane_tile(A, tile, tile == tile0, T);
    lane_read(T, static_cast<const acc_t*>(A.gl), A.gN, A.gD, acc_t(0), gl);
    lane_lse(A, T, t, hi, lo);
    lane_read(T, static_cast<const acc_t*>(A.aux_in), A.aN, A.aD, acc_t(0), S);
    if (A.glse) lane_read(T, A.glse, A.glN, A.glD, acc_t(0), gs);
    else std::fill(gs, gs + W2, acc_t(0));
    lane_soft(A, T, gb);
    V P[2], Q[2], Hi[2], Lo[2], bad[2];
    for (int h = 0; h < 2; ++h) {
      const V g = V::loadu(gl + h * W), hv = V::loadu(hi + h * W);
      bad[h] = (hv - hv) != zero;  // lse -inf, +inf or NaN: every p_c is NaN, as in torch
      P[h] = g * V::loadu(S + h * W) + V::loadu(gs + h * W);
      Q[h] = g;
      Hi[h] = hv;
      Lo[h] = V::blendv(V::loadu(lo + h * W), zero, bad[h]);
    }
    const bool special = any_lane(V::blendv(bad[0], bad[1], bad[1]));
    if (!T.vin) lane_gather(A, T, zb);
    // direct as bwd_lanes's: a dtile's gradient straight into the contiguous output, lane l's of
    // class c at o[c D + l]; else through zb
    const bool direct = T.dtile && !A.out_like_x;
    scalar_t* o = out + T.n0 * C * D + T.d0;
    for (int64_t c = 0; c < C; ++c) {
      V xa, xb, da, db;
      lane_load_bwd(A, T, c, alias, o, zb, xa, xb);
      const V za = tf_grad<K>(xa, t, da), zb_ = tf_grad<K>(xb, t, db);
      const V pa = vexp((za - Hi[0]) - Lo[0]), pb = vexp((zb_ - Hi[1]) - Lo[1]);
      V ra = P[0] * pa - Q[0] * V::loadu(gb + c * W2);
      V rb = P[1] * pb - Q[1] * V::loadu(gb + c * W2 + W);
      if constexpr (K != 0) {
        ra = ra * da;
        rb = rb * db;
      }
      if (special) {
        ra = V::blendv(ra, nan, bad[0]);
        rb = V::blendv(rb, nan, bad[1]);
      }
      if (!direct) {
        ra.store(zb + c * W2);
        rb.store(zb + c * W2 + W);
      } else if (T.L < W2) {
        store2_tail(o + c * D, T.L, ra, rb);
      } else {
        store2(o + c * D, ra, rb);
      }
    }
    if (!direct) lane_scatter(A, T, zb, out);
  }
}

// The tiles on at::parallel_for's threads, one instantiation per transform.
template <typename scalar_t>
void Ce<scalar_t>::soft_lanes(const Args& A, bool backward) {
  const int64_t tiles = lane_tiles(A);
  if (tiles == 0) return;
  const int kind = make_tf(A).kind;
  const int64_t grain = std::max<int64_t>(1, 16384 / (A.C * W2));
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    if (kind == 0) return backward ? bwd_lanes_soft<0>(A, b, e) : fwd_lanes_soft<0>(A, b, e);
    if (kind == 1) return backward ? bwd_lanes_soft<1>(A, b, e) : fwd_lanes_soft<1>(A, b, e);
    backward ? bwd_lanes_soft<2>(A, b, e) : fwd_lanes_soft<2>(A, b, e);
  });
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
