// The lanes path's tiles (struct Ce, ce_cpu_kernels.h, which includes this file; the kernels in
// ce_cpu_lanes.h and ce_cpu_lanes_soft.h): which rows a tile holds, its targets, and its logits'
// loads with their prefetches.
//
// A tile is L <= W2 rows r0 .. r0 + L - 1 (rows r = n D + d, numbered as loss / lse / aux are
// stored). With D >= W2 a tile is W2 consecutive d of one n ("dtile"): where the d stride is 1 (a
// contiguous (N, C, D) input, segmentation) each class of the tile is one contiguous vector load
// ("vin"), and the gradient, (N, C, D) contiguous, one contiguous vector store. Otherwise a tile
// is W2 consecutive rows, and its C x W2 logits are gathered into an L1 buffer zb (for a plain
// (N, C) input a transposition: scalar copies; for a half of W consecutive d of one n, as D == W
// gives, a vector a class), the gradient scattered back from there. The forward keeps the
// tile's z in zb for its second sweep: the logits are read once forward and once backward, with
// no copy of them.
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

template <typename scalar_t>
struct Ce<scalar_t>::Lanes {
  int64_t r0, L;           // rows r0 .. r0 + L - 1
  bool dtile;              // lanes (n0, d0 + l): W2 consecutive d of one n; else (n[l], d[l])
  bool vin;                // lane l's class c is x0[c xC + l]: one vector load per class
  int64_t n0, d0;          // lane 0's row
  int64_t next_n, next_d;  // dtile: the next tile's n0, d0 (no division per tile)
  const scalar_t* x0;      // lane 0's logits
  int64_t y[W2];           // class_of; -1 for ignored rows and lanes past L
  alignas(64) acc_t yf[W2];  // y as acc_t
  int64_t n[W2], d[W2];    // !dtile
  // !dtile: where half h's W lanes (h W .. h W + W - 1) are W consecutive d of one n, its
  // gradient's offset in the contiguous (N, C, D) output (class c at + c D), else -1; and its
  // logits (class c at + c xC) where their d stride is 1 too, else nullptr: a class of the
  // half one vector load and store (lane_gather, lane_scatter), as in a dtile.
  int64_t oh[2];
  const scalar_t* xh[2];
};

// f(l) for each lane l < L; a full tile's loop has a constant count, which the compiler
// vectorizes.
template <typename F>
inline void lane_loop(int64_t L, int64_t W2, const F& f) {
  if (L == W2) {
    for (int64_t l = 0; l < W2; ++l) f(l);
  } else {
    for (int64_t l = 0; l < L; ++l) f(l);
  }
}

// The most classes the lane path takes (lane_max_classes, kernels.h). A tile whose classes are
// one vector load each, or whose gradient is one vector store per class (D >= W2), beats the
// rows path up to 256 classes, and the tiles of ce_cpu_forward.h by far up to kLaneMaxClassesVin
// where its logits are one vector load per class (zb then spills from L1 to L2; forward, two
// threads: (2, 300, 64, 64) bf16 7x, (4, 1000, 32, 32) fp32 4.6x the tiles' speed). A tile of
// a plain (N, C) input is a transposition both ways, by blocks in registers (lane_block_lanes):
// the forward gains to 384 classes (the rows path pays a horizontal max, sum and log per row;
// a batch of a few rows less: kLaneFewRows),
// the backward, which the rows path runs in place, only to a few dozen (Zen 4, avx512 copy, one
// thread, 4096 rows, its time over the rows path's: float32 48 classes 0.70x, 64 0.90x, 128
// 1.18x; bfloat16 48 0.93x, 64 1.2x, 128 1.8x).
template <typename scalar_t>
int64_t Ce<scalar_t>::lane_limit(const Args& A, bool backward) {
  // The baseline copy, one lane a "vector", gains in the forward only (its backward: 1.2x the
  // tiles' time at (4, 21, 64, 64), 1.5x the rows' at (1024, 32)).
  if (W == 1) return backward ? 0 : lane_max_classes(A);
  const bool transposed = A.D == 1 && A.xN != 1 && (A.xC == 1 || A.C == 1);
  // (a copy without blocks, !kLaneBlocks: the scalar copies' 32)
  if (backward && transposed) return !kLaneBlocks ? 32 : W2 >= 32 ? 96 : 64;
  return lane_max_classes(A);
}

template <typename scalar_t>
bool Ce<scalar_t>::lanes_ok(const Args& A, bool backward) {
  static_assert(kLaneMaxC >= kLaneMaxClassesVin && kLaneMaxC >= kLaneMaxClasses &&
                kLaneMaxC >= kLaneMaxClassesRows);
  // probability targets: the loss alone (their statistics take the rows path)
  const bool soft_ok = !(A.stats_fwd() || A.stats_bwd() || A.sums || A.tile_sums);
  return (!A.prob || soft_ok) && A.C <= lane_limit(A, backward);
}

template <typename scalar_t>
int64_t Ce<scalar_t>::lane_tiles(const Args& A) {
  if (A.D >= W2) return A.N * ((A.D + W2 - 1) / W2);
  return (A.N * A.D + W2 - 1) / W2;
}

// out[l] = p[n sN + d sD] for each lane's row (n, d), l < L; fill past L.
template <typename scalar_t>
template <typename src_t, typename dst_t>
void Ce<scalar_t>::lane_read(const Lanes& T, const src_t* p, int64_t sN, int64_t sD, dst_t fill,
                             dst_t* out) {
  if (T.dtile || (sN == 0 && sD == 0)) {
    const src_t* q = p + T.n0 * sN + T.d0 * sD;
    if (sD == 1) {
      lane_loop(T.L, W2, [&](int64_t l) { out[l] = static_cast<dst_t>(q[l]); });
    } else if (sD == 0) {  // one value for the tile (a reduced loss's row gradient)
      const dst_t v = static_cast<dst_t>(*q);
      lane_loop(T.L, W2, [&](int64_t l) { out[l] = v; });
    } else {
      lane_loop(T.L, W2, [&](int64_t l) { out[l] = static_cast<dst_t>(q[l * sD]); });
    }
  } else {
    for (int64_t l = 0; l < T.L; ++l) out[l] = static_cast<dst_t>(p[T.n[l] * sN + T.d[l] * sD]);
  }
  for (int64_t l = T.L; l < W2; ++l) out[l] = fill;
}

// A dtile's class c is one cache line (or half of one) in each of C streams, C x D elements
// apart: more streams than the hardware prefetcher follows (the loads stalled for almost half of
// the backward's time at (16, 21, 512, 512)). So each class's line kLanePrefetch bytes ahead is
// asked for by hand; the backward does the same for the gradient's line it will write.
// Unless the classes' lines alias in the L1 sets: a class stride that is a multiple of 4 KiB (a
// power-of-two D, (8, 150, 512, 512)) puts the C lines of a tile's classes into one set of the
// 64 (and of the L2 too), and lines asked for kLanePrefetch bytes ahead are evicted before their
// tile comes, fetched twice. Where a set would hold more than kLaneAliasLines of a tile's lines
// (the forward's: the logits; the backward's: logits and gradient) the forward asks for class
// c + kLaneAhead's line of the tile instead (measured on the Intel Xeon, bf16 forward:
// (8, 150, 512, 512) 1.37x, (4, 64, 512, 512) 1.39x; at (4, 32, 512, 512) and
// (16, 21, 512, 512) the lines ahead still won). The backward does both: the logits' lines
// kLanePrefetch ahead only towards the outer caches (prefetcht2: the L3 holds what the aliasing
// L1 and L2 sets cannot), and class c + kLaneAhead's lines of logits and gradient into L1
// (bwd_lanes; against the lines ahead alone, op calls at D = 512 x 512: bf16 1.4-1.6x, fp32
// 1.45-1.55x for C from 40 to 150, and C = 32 (bf16) / 24-32 (fp32), which took the other way
// before, 1.6x / 1.5-2x).
template <typename scalar_t>
bool Ce<scalar_t>::lanes_alias(const Args& A, int64_t streams) {
  const int64_t stride = A.xC * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t sets = 4096 / std::gcd<int64_t>(stride, 4096);  // sets one tile's lines take
  return A.C * streams > kLaneAliasLines * sets;
}

template <typename scalar_t>
template <typename T>
inline void Ce<scalar_t>::lane_prefetch(const T* p, bool write) {
  const char* q = reinterpret_cast<const char*>(p) + kLanePrefetch;
  if (write) __builtin_prefetch(q, 1);
  else __builtin_prefetch(q);
}

// Tile `tile`'s rows and targets (tiles in order; `first` for the first of a range). An
// out-of-range target raises class_of's IndexError.
template <typename scalar_t>
void Ce<scalar_t>::lane_tile(const Args& A, int64_t tile, bool first, Lanes& T) {
  T.dtile = A.D >= W2;
  if (T.dtile) {
    if (first) {
      const int64_t per = (A.D + W2 - 1) / W2;
      T.next_n = tile / per;
      T.next_d = (tile % per) * W2;
    }
    T.n0 = T.next_n;
    T.d0 = T.next_d;
    T.next_d += W2;
    if (T.next_d >= A.D) {
      T.next_d = 0;
      ++T.next_n;
    }
    T.r0 = T.n0 * A.D + T.d0;
    T.L = std::min(W2, A.D - T.d0);
    T.vin = A.xD == 1;
  } else {
    T.r0 = tile * W2;
    T.L = std::min(W2, A.N * A.D - T.r0);
    for (int64_t l = 0; l < T.L; ++l) {
      T.n[l] = A.D == 1 ? T.r0 + l : (T.r0 + l) / A.D;
      T.d[l] = A.D == 1 ? 0 : (T.r0 + l) % A.D;
    }
    T.n0 = T.n[0];
    T.d0 = T.d[0];
    T.vin = A.D == 1 && A.xN == 1;
  }
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t l0 = h * W, l1 = l0 + W - 1;
    const bool run = !T.dtile && A.D > 1 && l1 < T.L && T.n[l0] == T.n[l1];
    T.oh[h] = run ? T.n[l0] * A.C * A.D + T.d[l0] : -1;
    T.xh[h] = run && A.xD == 1 ? row_ptr(A, T.n[l0], T.d[l0]) : nullptr;
  }
  T.x0 = row_ptr(A, T.n0, T.d0);
  if (A.prob) {  // probability targets: no class index (lane_soft reads the targets)
    for (int64_t l = 0; l < W2; ++l) {
      T.y[l] = -1;
      T.yf[l] = -1;
    }
    return;
  }
  int64_t y[W2];
  const int64_t ign = A.ignore_index;
  if (A.tkind == 0) lane_read(T, static_cast<const int64_t*>(A.t), A.tN, A.tD, ign, y);
  else if (A.tkind == 1) lane_read(T, static_cast<const int32_t*>(A.t), A.tN, A.tD, ign, y);
  else lane_read(T, static_cast<const uint8_t*>(A.t), A.tN, A.tD, ign, y);
  int64_t bad = 0;  // no early exit, no bool: the compiler vectorizes the check
  for (int64_t l = 0; l < W2; ++l) {
    const int64_t ignored = y[l] == ign;
    bad |= (1 - ignored) & static_cast<int64_t>(static_cast<uint64_t>(y[l]) >=
                                                 static_cast<uint64_t>(A.C));
    T.y[l] = ignored ? int64_t(-1) : y[l];
  }
  if (bad) {
    for (int64_t l = 0; l < T.L; ++l)
      class_of(A, T.dtile ? T.n0 : T.n[l], T.dtile ? T.d0 + l : T.d[l]);
  }
  for (int64_t l = 0; l < W2; ++l) T.yf[l] = static_cast<acc_t>(static_cast<int32_t>(T.y[l]));
}

// Lanes [0, return) of a tile whose classes are adjacent (unit class stride) and whose lanes are
// evenly spaced, lane_stride apart -- a dtile (channels-last, (B, T, V) seen as (B, V, T)), or
// consecutive rows of an (N, C) input: whole kTile-lane blocks, which lane_gather and
// lane_scatter move by transpose_block -- a vector load and store per class and block where the
// lane's own copy is a scalar one per logit (the forward of (8, 21, 128, 128) fp32 channels-last
// took 1.7x the contiguous input's time; the backward's gradient, written contiguous, then cost
// an autograd copy as long as the kernel; a plain (4096, 256) input's forward 1.9x the time of
// the same memory seen as channels-last, Zen 4, one thread).
template <typename scalar_t>
int64_t Ce<scalar_t>::lane_block_lanes(const Args& A, const Lanes& T) {
  if constexpr (!kLaneBlocks) return 0;
  return (T.dtile || A.D == 1) && A.xC == 1 ? T.L / kTile * kTile : 0;
}

// The logits' distance between a blocked tile's consecutive lanes (lane_block_lanes).
template <typename scalar_t>
inline int64_t Ce<scalar_t>::lane_stride(const Args& A, const Lanes& T) {
  return T.dtile ? A.xD : A.xN;
}

// The first of the kTile classes a block from class c moves: c, or C - kTile for the last,
// partial block of C >= kTile classes (it moves some classes twice, the same values); -1 where
// there are fewer than kTile classes (a block would reach past the tile's last logit: there the
// blocks' C kTile values are one run, which run_to_rows / rows_to_run permute where the copy
// can, else the lanes' own copies).
template <typename scalar_t>
inline int64_t Ce<scalar_t>::block_start(int64_t c, int64_t C) {
  if (c + kTile <= C) return c;
  return C >= kTile ? C - kTile : -1;
}

// A partial tile's lanes past T.L (no row: zeros, which the lanes' sums skip) in zb[c W2 + l],
// as whole vectors -- the halves that hold such lanes, before the live lanes are written over
// them: a value at a time, the dead lanes of a batch of one row of 100 classes were most of
// its forward (1 -> 31 lanes x 100 classes, 1.7 us of 5, Zen 4).
template <typename scalar_t>
void Ce<scalar_t>::lane_zero_dead(const Lanes& T, int64_t C, acc_t* zb) {
  if (T.L == W2) return;
  const V zero(acc_t(0));
  const int64_t h0 = T.L / W;  // the first half with a dead lane
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t h = h0; h < 2; ++h) zero.store(zb + c * W2 + h * W);
  }
}

// The tile's logits into zb[c W2 + l] in acc_t; lanes past L get 0.
template <typename scalar_t>
void Ce<scalar_t>::lane_gather(const Args& A, const Lanes& T, acc_t* zb) {
  const int64_t C = A.C, xC = A.xC;
  lane_zero_dead(T, C, zb);
  for (int64_t h = 0; h < 2; ++h) {  // halves of W consecutive d: a vector a class
    if (!T.xh[h]) continue;
    for (int64_t c = 0; c < C; ++c) load1(T.xh[h] + c * xC).store(zb + c * W2 + h * W);
  }
  const int64_t blocked = lane_block_lanes(A, T);  // lane l's class c at x0[l ls + c]
  const int64_t ls = lane_stride(A, T);
  for (int64_t l0 = 0; l0 < blocked; l0 += kTile) {
    const scalar_t* x = T.x0 + l0 * ls;
    if (C < kTile && ls == C && run_to_rows(x, C, zb + l0, W2)) continue;
    for (int64_t c = 0; c < C; c += kTile) {
      const int64_t cb = block_start(c, C);
      if (cb >= 0) {
        transpose_block(x + cb, ls, zb + cb * W2 + l0, W2);
        continue;
      }
      for (; c < C; ++c) {
        for (int64_t l = 0; l < kTile; ++l) zb[c * W2 + l0 + l] = static_cast<acc_t>(x[l * ls + c]);
      }
    }
  }
  for (int64_t l = blocked; l < T.L; ++l) {
    if (T.xh[l / W]) continue;
    const scalar_t* x = T.dtile ? T.x0 + l * A.xD : row_ptr(A, T.n[l], T.d[l]);
    if (xC == 1) {
      for (int64_t c = 0; c < C; ++c) zb[c * W2 + l] = static_cast<acc_t>(x[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) zb[c * W2 + l] = static_cast<acc_t>(x[c * xC]);
    }
  }
}

// Lanes [l0, l0 + kTile) of a tile's gradient zb[c W2 + l] into o[(l - l0) ld + c]: by
// transpose_block's blocks (lane_gather's, the other way), or one value at a time where there
// are fewer than kTile classes.
template <typename scalar_t>
template <typename dst_t>
void Ce<scalar_t>::lane_block_out(const acc_t* zb, int64_t l0, int64_t C, dst_t* o,
                                  int64_t ld) {
  for (int64_t c = 0; c < C; c += kTile) {
    const int64_t cb = block_start(c, C);
    if (cb >= 0) {
      transpose_block(zb + cb * W2 + l0, W2, o + cb, ld);
      continue;
    }
    for (; c < C; ++c) {
      for (int64_t l = 0; l < kTile; ++l) o[l * ld + c] = static_cast<dst_t>(zb[c * W2 + l0 + l]);
    }
  }
}

// A channels-last dtile's gradient, lane l's class c at o[l C + c]: transposed into a stage in
// L1 (the blocks of lane_gather's, the other lanes one value at a time), then written out by
// whole vectors in order, where the blocks' rows straight into the output were each a store
// across two lines (rows C values apart).
template <typename scalar_t>
void Ce<scalar_t>::lane_scatter_run(const Args& A, const Lanes& T, const acc_t* zb,
                                    int64_t blocked, scalar_t* o) {
  const int64_t C = A.C, n = T.L * C;
  if (C < kTile) {  // rows_to_run's blocks are whole vectors in order already
    int64_t l0 = 0;
    while (l0 < blocked && rows_to_run(zb + l0, W2, C, o + l0 * C)) l0 += kTile;
    for (int64_t l = l0; l < T.L; ++l) {
      for (int64_t c = 0; c < C; ++c) o[l * C + c] = static_cast<scalar_t>(zb[c * W2 + l]);
    }
    return;
  }
  alignas(64) acc_t stage[kLaneMaxClasses * W2];
  for (int64_t l0 = 0; l0 < blocked; l0 += kTile) lane_block_out(zb, l0, C, stage + l0 * C, C);
  for (int64_t l = blocked; l < T.L; ++l) {
    for (int64_t c = 0; c < C; ++c) stage[l * C + c] = zb[c * W2 + l];
  }
  int64_t i = 0;
  for (; i + W <= n; i += W) store1(o + i, V::loadu(stage + i));
  for (; i < n; ++i) o[i] = static_cast<scalar_t>(stage[i]);
}

// A gathered tile's gradient zb[c W2 + l] into the contiguous (N, C, D) output, or, with
// Args::out_like_x, into one of the logits' strides (each element where its logit is).
template <typename scalar_t>
void Ce<scalar_t>::lane_scatter(const Args& A, const Lanes& T, const acc_t* zb, scalar_t* out) {
  const int64_t C = A.C, D = A.D;
  if (A.out_like_x) {
    const scalar_t* x = static_cast<const scalar_t*>(A.x);
    const int64_t blocked = lane_block_lanes(A, T), xC = A.xC;  // (out_like_x: D > 1)
    // channels-last (classes of a gathered tile: at most kLaneMaxClasses): the tile's L C
    // values are one run
    if (T.dtile && xC == 1 && A.xD == C && C <= kLaneMaxClasses) {
      lane_scatter_run(A, T, zb, blocked, out + (T.x0 - x));
      return;
    }
    for (int64_t l0 = 0; l0 < blocked; l0 += kTile)
      lane_block_out(zb, l0, C, out + (T.x0 - x) + l0 * A.xD, A.xD);
    for (int64_t l = blocked; l < T.L; ++l) {
      const scalar_t* xl = T.dtile ? T.x0 + l * A.xD : row_ptr(A, T.n[l], T.d[l]);
      scalar_t* ol = out + (xl - x);
      for (int64_t c = 0; c < C; ++c) ol[c * xC] = static_cast<scalar_t>(zb[c * W2 + l]);
    }
    return;
  }
  if (D == 1 && C <= kLaneMaxClasses) {  // contiguous (N, C) rows: the L C values one run
    int64_t blocked = 0;
    if constexpr (kLaneBlocks) blocked = T.L / kTile * kTile;
    lane_scatter_run(A, T, zb, blocked, out + T.r0 * C);
    return;
  }
  for (int64_t h = 0; h < 2; ++h) {  // halves of W consecutive d: a vector a class
    if (T.oh[h] < 0) continue;
    scalar_t* o = out + T.oh[h];
    for (int64_t c = 0; c < C; ++c) store1(o + c * D, V::loadu(zb + c * W2 + h * W));
  }
  for (int64_t l = 0; l < T.L; ++l) {
    if (T.oh[l / W] >= 0) continue;
    scalar_t* ol = out + T.n[l] * C * D + T.d[l];
    for (int64_t c = 0; c < C; ++c) ol[c * D] = static_cast<scalar_t>(zb[c * W2 + l]);
  }
}

// Each lane's saved lse as row_grad splits it: hi = acc_t(lse), lo = acc_t(lse - hi), and
// exact_lse's hi, lo for the rows far from zero (far_lse). hi passes through memory the compiler
// cannot see into: GCC 12 vectorized the default copy's loop into lse - lse (lo = 0), as if
// double(float(x)) were x.
template <typename scalar_t>
void Ce<scalar_t>::lane_lse(const Args& A, const Lanes& T, const Tf& t, acc_t* hi, acc_t* lo) {
  alignas(64) double ld[W2];
  lane_read(T, static_cast<const double*>(A.lse_in), A.lN, A.lD, 0.0, ld);
  for (int64_t l = 0; l < W2; ++l) hi[l] = static_cast<acc_t>(ld[l]);
#if defined(__GNUC__)
  asm volatile("" : : "r"(hi) : "memory");
#endif
  for (int64_t l = 0; l < W2; ++l) lo[l] = static_cast<acc_t>(ld[l] - static_cast<double>(hi[l]));
  int64_t far = 0;  // the test for all lanes at once
  for (int64_t l = 0; l < W2; ++l) far |= static_cast<int64_t>(far_lse(hi[l]));
  for (int64_t l = 0; far && l < T.L; ++l) {
    if (!far_lse(hi[l])) continue;
    const int64_t n_ = T.dtile ? T.n0 : T.n[l], d_ = T.dtile ? T.d0 + l : T.d[l];
    exact_lse(A, row_ptr(A, n_, d_), t, hi[l], lo[l]);
  }
}

// Sweep 1 of a forward tile: z of every class into zb, and each lane's max into m0, m1 (vmax
// may drop NaN: see there). alias: lanes_alias(A, 1).
template <typename scalar_t>
template <int K>
inline void Ce<scalar_t>::lane_load_max(const Args& A, const Lanes& T, const Tf& t, bool alias,
                                        acc_t* zb, V& m0, V& m1) {
  const int64_t C = A.C, xC = A.xC;
  m0 = V(-kInf);
  m1 = V(-kInf);
  auto put = [&](int64_t c, V a, V b) {
    a = tf<K>(a, t);
    b = tf<K>(b, t);
    a.store(zb + c * W2);
    b.store(zb + c * W2 + W);
    m0 = vmax(m0, a);
    m1 = vmax(m1, b);
  };
  if (T.vin && T.L == W2) {
    // each line of a class's tile ahead: one (bf16), or two (float32 in the AVX-512 copies, whose
    // second line the hardware prefetcher was left to fetch: the float32 forward of (4, 21, 512,
    // 512) and (8, 4, 512, 512) 1.10-1.15x faster with it, one thread, Zen 4)
    constexpr int64_t kLineValues = 64 / static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t c = 0; c < C; ++c) {
      V a, b;
      if (!alias) {
        lane_prefetch(T.x0 + c * xC);
        if constexpr (W2 > kLineValues) lane_prefetch(T.x0 + c * xC + kLineValues);
      } else if (c + kLaneAhead < C) __builtin_prefetch(T.x0 + (c + kLaneAhead) * xC);
      load2(T.x0 + c * xC, a, b);
      put(c, a, b);
    }
  } else if (T.vin) {
    for (int64_t c = 0; c < C; ++c) {
      V a, b;
      load2_tail(T.x0 + c * xC, T.L, acc_t(0), a, b);
      put(c, a, b);
    }
  } else {
    lane_gather(A, T, zb);
    for (int64_t c = 0; c < C; ++c) put(c, V::loadu(zb + c * W2), V::loadu(zb + c * W2 + W));
  }
}

// Class c of a backward tile: from zb where the tile was gathered (!vin), else one vector load of
// its logits, with the prefetches lanes_alias's comment describes (alias: lanes_alias(A, 2);
// o: the tile's gradient, where a dtile's is stored in place).
template <typename scalar_t>
inline void Ce<scalar_t>::lane_load_bwd(const Args& A, const Lanes& T, int64_t c, bool alias,
                                        const scalar_t* o, const acc_t* zb, V& xa, V& xb) {
  // A full tile's bytes of one class: one line (bf16) or two (fp32) of logits and of gradient.
  constexpr int64_t kTileBytes = static_cast<int64_t>(sizeof(scalar_t)) * W2;
  const int64_t xC = A.xC, D = A.D;
  if (!T.vin) {
    xa = V::loadu(zb + c * W2);
    xb = V::loadu(zb + c * W2 + W);
  } else if (T.L == W2) {
    const char* xc = reinterpret_cast<const char*>(T.x0 + c * xC);
    if (!alias) {  // every line of the class's tile kLanePrefetch bytes ahead (lanes_alias)
      for (int64_t b = 0; b < kTileBytes; b += 64) {
        lane_prefetch(xc + b);
        if (T.dtile) lane_prefetch(reinterpret_cast<const char*>(o + c * D) + b, true);
      }
    } else {  // towards L3 far ahead, into L1 a few classes ahead (lanes_alias)
      __builtin_prefetch(xc + kLanePrefetch, 0, 1);
      __builtin_prefetch(xc + kLanePrefetch + 64, 0, 1);
      if (c + kLaneAhead < A.C) {
        const char* x_ahead = reinterpret_cast<const char*>(T.x0 + (c + kLaneAhead) * xC);
        const char* o_ahead = reinterpret_cast<const char*>(o + (c + kLaneAhead) * D);
        for (int64_t b = 0; b < kTileBytes; b += 64) {
          __builtin_prefetch(x_ahead + b);
          if (T.dtile) __builtin_prefetch(o_ahead + b, 1);
        }
      }
    }
    load2(T.x0 + c * xC, xa, xb);
  } else {
    load2_tail(T.x0 + c * xC, T.L, acc_t(0), xa, xb);
  }
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
