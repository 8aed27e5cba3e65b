// The CUDA backend's per-thread backward (contract: csrc/ops.cpp, maths: docs/maths.md): a
// row's coefficients from the saved lse, every class's gradient, and one thread's share of a row,
// __host__ __device__ as ce_thread.cuh (its flags, parameters and row split), so that the host
// emulator (tests/cuda_emulation/emu.cu) runs the very same code. Included through
// ce_kernels.cuh.
#pragma once

#include "ce_thread.cuh"

namespace nllfused {
namespace cuda_impl {

#define NLLF_HD __host__ __device__ __forceinline__

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
  acc_t lo_l2e;  // lse_lo log2(e): float p = 2^((z - hi) log2(e) - lo_l2e), exactly 1 at z == lse
  acc_t coef_p;  // gradient = chain (coef_p * p_c - class terms)
  acc_t cy;      // g (1 - eps) w_y
  acc_t cq;      // coef_p - cy
  acc_t E;       // kStats: -grad_entropy, the coefficient of p_c log p_c (0: no such term)
};

template <int F, typename acc_t>
NLLF_HD BwdRow<acc_t> make_bwd_row(const CEParams<acc_t>& p, int64_t n, int64_t d) {
  BwdRow<acc_t> b;
  b.mode = 0, b.y = -1, b.qoff = 0;
  b.coef_p = b.cy = b.cq = b.geC = b.E = acc_t(0);
  b.g = p.grad[n * p.gN + d * p.gD];
  const acc_t gs =
      p.grad_lse ? static_cast<acc_t>(p.grad_lse[n * p.glN + d * p.glD]) : acc_t(0);
  // the statistics' gradients: the entropy's on every row
  acc_t gH = 0;
  if constexpr (kHasStats<F>) {
    if (p.grad_entropy) gH = p.grad_entropy[n * p.geN + d * p.geD];
  }
  const double lse64 = p.lse_in[n * p.lN + d * p.lD];
  b.lse_hi = static_cast<acc_t>(lse64);
  b.lse_lo = static_cast<acc_t>(lse64 - static_cast<double>(b.lse_hi));
  b.lo_l2e = b.lse_lo * static_cast<acc_t>(kLog2e);
  if constexpr ((F & kProb) != 0) {
    b.qoff = n * p.tN + d * p.tD;
    b.cq = b.g * p.aux_in[n * p.aN + d * p.aD] + gs;  // g sum_k w_k q'_k + gs
    b.coef_p = b.cq;
  } else {
    const int64_t y = load_index(p, n, d);
    if (y == p.ignore_index) {
      b.g = acc_t(0);
      b.mode = gs == acc_t(0) && gH == acc_t(0) ? 1 : 0;
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
  if constexpr (kHasStats<F>) {
    // d H / dz_c = -p_c (log p_c + H): E p_c log p_c per class and E H into p's coefficient;
    // d log p_y / dz_c = [c == y] - p_c, on counted rows (log p_y is 0 elsewhere): -g_T into
    // cy, whose expm1 gives the true class g_T (1 - p_y)
    const acc_t gT = p.grad_target_logp && b.y >= 0
                         ? p.grad_target_logp[n * p.gtN + d * p.gtD] : acc_t(0);
    if (b.mode == 0 && (gH != acc_t(0) || gT != acc_t(0))) {
      b.E = -gH;
      b.cq += b.E * p.entropy_in[n * p.eN + d * p.eD];
      b.cy -= gT;
      b.coef_p = b.cy + b.cq;
    }
  }
  return b;
}

// Rows far from zero: the saved lse's own rounding, up to ulp(lse) / 2 (float64: 4e-9 at |lse|
// ~ 3e7), would enter every p = exp(z - lse), where torch's log p = (z - m) - log s is exact in
// z - m. Rows with |lse| >= kExactLseFrom read their logits once more for m and log s (each
// thread of the row's group the whole row: such rows are rare, and the row is then in cache),
// so that p = exp((z - m) - log s). float32 splits the float64 lse into hi + lo, whose 53 bits
// hold p to float's precision up to |lse| ~ 2^26 (1e20 + log s is 1e20 in float64).
template <typename acc_t>
constexpr double kExactLseFrom = std::is_same<acc_t, double>::value ? 1024 : 0x1p26;
template <int F, typename scalar_t, typename acc_t>
NLLF_HD void exact_lse(const CEParams<acc_t>& p, const scalar_t* xrow, BwdRow<acc_t>& b) {
  constexpr acc_t from = static_cast<acc_t>(kExactLseFrom<acc_t>);
  if (!(b.lse_hi >= from || b.lse_hi <= -from) || b.lse_hi - b.lse_hi != acc_t(0)) return;
  // one thread's serial sum of C terms, compensated: a plain float sum dropped the small ones
  // (p 2e-4 off at C = 4000 at 1e8); no float64 in the loop (slow on most GPUs)
  acc_t m = neg_inf<acc_t>(), s = 0, s_err = 0;
  for (int64_t c = 0; c < p.C; ++c)
    m = nan_max(m, to_z<F>(p, static_cast<acc_t>(xrow[c * p.sC])));
  for (int64_t c = 0; c < p.C; ++c)
    add_compensated(s, s_err, ::exp(to_z<F>(p, static_cast<acc_t>(xrow[c * p.sC])) - m));
  b.lse_hi = m;
  // log s as log1p(s - 1) (s >= 1, the max's own term; exact below 2): the float log is
  // __logf under --use_fast_math (~4e-7 off), log1p keeps float's precision
  b.lse_lo = ::log1p((s - acc_t(1)) + s_err);
  b.lo_l2e = b.lse_lo * static_cast<acc_t>(kLog2e);
}

// The row's coefficients, p's exact for float64 rows far from zero.
template <int F, typename scalar_t, typename acc_t>
NLLF_HD BwdRow<acc_t> bwd_row_of(const CEParams<acc_t>& p, const Row<scalar_t>& row) {
  BwdRow<acc_t> b = make_bwd_row<F>(p, row.n, row.d);
  if (b.mode == 0) exact_lse<F>(p, row.x, b);
  return b;
}

// E p log p (kStats), log p = (z - hi) - lo; nothing where p is 0 (no 0 * -inf).
template <typename acc_t>
NLLF_HD acc_t entropy_term(const BwdRow<acc_t>& b, acc_t z, acc_t pr) {
  return b.E != acc_t(0) && pr != acc_t(0) ? b.E * pr * ((z - b.lse_hi) - b.lse_lo) : acc_t(0);
}

// p = exp((z - hi) - lo); float: the shift by lo and the scale to base 2 in one FFMA.
NLLF_HD float prob_of(float z, const BwdRow<float>& b) {
  return acc_exp2(fmaf(z - b.lse_hi, kLog2e, -b.lo_l2e));
}
NLLF_HD double prob_of(double z, const BwdRow<double>& b) {
  return ::exp((z - b.lse_hi) - b.lse_lo);
}

// The gradient of class c, c != y (every class, for probability targets).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD acc_t grad_elem(const CEParams<acc_t>& p, const BwdRow<acc_t>& b, acc_t x, int64_t c) {
  acc_t chain;
  const acc_t z = to_z_chain<F>(p, x, chain);
  const acc_t pr = prob_of(z, b);
  acc_t gr = b.coef_p * pr;
  if constexpr (kHasStats<F>) gr += entropy_term(b, z, pr);
  if constexpr ((F & kProb) != 0) gr -= b.g * class_v<F, scalar_t>(p, b.qoff, c);
  else if (has<F, kSmooth>(p)) gr -= b.geC * class_w<F>(p, c);
  if constexpr (kMayTransform<F>) gr *= chain;
  return gr;
}

// The true class y's gradient: coef_p p_y - cy - sw with p_y - 1 from expm1, no cancellation
// when p_y -> 1.
template <int F, typename acc_t>
NLLF_HD acc_t grad_true(const CEParams<acc_t>& p, const BwdRow<acc_t>& b, acc_t x) {
  acc_t chain;
  const acc_t z = to_z_chain<F>(p, x, chain);
  const acc_t zs = (z - b.lse_hi) - b.lse_lo;
  const acc_t py = acc_exp(zs);
  acc_t gr = b.cy * acc_expm1(zs) + b.cq * py;
  if constexpr (kHasStats<F>) gr += entropy_term(b, z, py);
  if (has<F, kSmooth>(p)) gr -= b.geC * class_w<F>(p, b.y);
  if constexpr (kMayTransform<F>) gr *= chain;
  return gr;
}

template <typename scalar_t, int F, typename acc_t>
NLLF_HD scalar_t grad_out(const CEParams<acc_t>& p, const BwdRow<acc_t>& b, scalar_t x, int64_t c) {
  return static_cast<scalar_t>(grad_elem<scalar_t, F>(p, b, static_cast<acc_t>(x), c));
}

// The gradient of one 16-byte input vector, element j of class c0 + j.
template <typename scalar_t, int F, typename acc_t, typename vec_t>
NLLF_HD void grad_vector(const CEParams<acc_t>& p, const BwdRow<acc_t>& b, const vec_t& in,
                         int64_t c0, acc_t (&g)[kVec<scalar_t>]) {
  unpack(in, g);
#pragma unroll
  for (int j = 0; j < kVec<scalar_t>; ++j)
    g[j] = grad_elem<scalar_t, F>(p, b, g[j], c0 + j);
}

// Thread `tid` of a G-thread group: contiguous input row -> contiguous output row, part `part`
// of `parts` (row_part, the forward's split: ce_thread.cuh).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD void bwd_row_part(const CEParams<acc_t>& p, const BwdRow<acc_t>& b,
                          const scalar_t* xrow, scalar_t* orow, int tid, int G, int part = 0,
                          int parts = 1) {
  constexpr int VEC = kVec<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  constexpr int U = kUnroll<F>;
  const int64_t C = p.C;
  const int64_t span = static_cast<int64_t>(G) * U;
  const int64_t head = vec_head<scalar_t>(xrow, C);
  const int64_t nvec = (C - head) / VEC;
  const RowPart rp = row_part(nvec, span, part, parts);
  if (b.mode != 0) {
    const int64_t c0 = rp.head ? 0 : head + rp.v0 * VEC;
    const int64_t c1 = rp.tail ? C : head + rp.v1 * VEC;
    fill_row(orow + c0, c1 - c0,
             b.mode == 1 ? scalar_t(0) : static_cast<scalar_t>(quiet_nan<acc_t>()), tid, G);
    return;
  }
  if (rp.head)
    for (int64_t c = tid; c < head; c += G) orow[c] = grad_out<scalar_t, F>(p, b, xrow[c], c);

  const vec_t* vin = reinterpret_cast<const vec_t*>(xrow + head);
  acc_t g[VEC];
  if (vec_head<scalar_t>(orow, C) == head) {
    // Input and output rows at the same offset from a 16-byte boundary: vector stores too.
    vec_t* vout = reinterpret_cast<vec_t*>(orow + head);
    int64_t v = rp.v0 + tid;
    for (const int64_t full_end = rp.v0 + (rp.v1 - rp.v0) / span * span; v < full_end;
         v += span) {  // hot loop
      vec_t buf[U];
#pragma unroll
      for (int u = 0; u < U; ++u) buf[u] = vin[v + u * G];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        grad_vector<scalar_t, F>(p, b, buf[u], head + (v + u * G) * VEC, g);
        vout[v + u * G] = pack<scalar_t>(g);
      }
    }
    if (v < rp.v1) {  // the last, partial step (loads as in the forward's)
      vec_t buf[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        buf[u] = vin[v + (v + u * G < rp.v1 ? u * G : 0)];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v + u * G < rp.v1) {
          grad_vector<scalar_t, F>(p, b, buf[u], head + (v + u * G) * VEC, g);
          vout[v + u * G] = pack<scalar_t>(g);
        }
      }
    }
  } else {
    // Rows at different offsets from a 16-byte boundary (logits with a storage offset): the
    // input still in 16-byte vectors, the output element by element.
    for (int64_t v = rp.v0 + tid; v < rp.v1; v += G) {
      const vec_t in = vin[v];
      grad_vector<scalar_t, F>(p, b, in, head + v * VEC, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) orow[head + v * VEC + j] = static_cast<scalar_t>(g[j]);
    }
  }

  if (rp.tail)
    for (int64_t c = head + nvec * VEC + tid; c < C; c += G)
      orow[c] = grad_out<scalar_t, F>(p, b, xrow[c], c);
  if constexpr ((F & kProb) == 0) {
    // The true class: rewritten by the thread of the part that wrote it above (program order).
    if (b.y >= 0 && owns_class(b.y, head, nvec, VEC, rp, tid, G))
      orow[b.y] = static_cast<scalar_t>(grad_true<F>(p, b, static_cast<acc_t>(xrow[b.y])));
  }
}

// Thread `ty` of TY threads sharing a row: strided input (p.sC), output step ostep.
template <typename scalar_t, int F, typename acc_t>
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
    orow[c * ostep] = grad_out<scalar_t, F>(p, b, xrow[c * p.sC], c);
  if constexpr ((F & kProb) == 0) {
    if (b.y >= 0 && b.y % TY == ty)
      orow[b.y * ostep] =
          static_cast<scalar_t>(grad_true<F>(p, b, static_cast<acc_t>(xrow[b.y * p.sC])));
  }
}

// Backward of row r (< R) by thread tid of its G-thread group (rows mapping, D == 1: output row
// r is out + r*C) or by thread-row ty of TY (tile mapping: element (n, c, d) at
// out + n*C*D + c*D + d).
template <typename scalar_t, int F, typename acc_t>
NLLF_HD void bwd_rows_thread(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* out,
                             int64_t r, int tid, int G, int part = 0, int parts = 1) {
  const Row<scalar_t> row = row_at(p, x, r);
  const BwdRow<acc_t> b = bwd_row_of<F>(p, row);
  bwd_row_part<scalar_t, F>(p, b, row.x, out + r * p.C, tid, G, part, parts);
}
template <typename scalar_t, int F, typename acc_t>
NLLF_HD void bwd_tile_thread(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* out,
                             int64_t r, int ty, int TY) {
  const Row<scalar_t> row = row_at(p, x, r);
  const BwdRow<acc_t> b = bwd_row_of<F>(p, row);
  bwd_strided_part<scalar_t, F>(p, b, row.x, out + row.n * p.C * p.D + row.d, p.D, ty, TY);
}
#undef NLLF_HD

}  // namespace cuda_impl
}  // namespace nllfused

