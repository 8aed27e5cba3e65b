// The tiles path's copies (struct Ce, ce_cpu_kernels.h, which includes this file; fwd_tiles in
// ce_cpu_forward.h, bwd_tiles in ce_cpu_backward.h): a tile's kTile rows between the logits,
// whose classes are strided, and the buffer zb[lane][class] that the per-row code reads in
// class order; the gradient back; and the probability targets, laid out as the logits are.
//
// Where the tile's rows are a run -- row l's element of a class is row 0's plus l, as for kTile
// consecutive d of one n with unit d stride (an (N, C, D) input, D >= kTile) or consecutive rows
// of a column-major (N, C) input -- each class of the tile is kTile contiguous values, and the
// copy is a transposition of kTile x kTile blocks in registers (transpose16_f where the copy has
// it, else ATen's transpose_mxn): a vector load and store per class and lane group, where the
// general copy is one scalar load and store per logit (measured on the Intel Xeon, AVX-512,
// (256, 300, 16) float32: the forward's gather was most of its time, 0.86-0.94x torch's).
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// f(std::integral_constant<int, C>) for 0 < C < 16 (run_to_rows, rows_to_run: kTile = 16);
// false for other C.
template <typename F, int N = 1>
inline bool with_small_c(int64_t C, F&& f) {
  if constexpr (N < 16) {
    if (C == N) return f(std::integral_constant<int, N>{}), true;
    return with_small_c<F, N + 1>(C, std::forward<F>(f));
  }
  return false;
}

// Whether v[l] == v[0] + l for every l < L, and L == kTile: pointers, or offsets.
template <typename scalar_t>
template <typename T>
bool Ce<scalar_t>::is_run(const T* v, int64_t L) {
  if (L != kTile) return false;
  for (int64_t l = 1; l < kTile; ++l) {
    if (v[l] != v[0] + l) return false;
  }
  return true;
}

// dst[j ld_dst + i] = dst_t(src[i ld_src + j]) for i, j < kTile: one rounding, as static_cast.
// float <-> float by ATen's transposition in registers; 16-bit values through a float block.
template <typename scalar_t>
template <typename src_t, typename dst_t>
void Ce<scalar_t>::transpose_block(const src_t* src, int64_t ld_src, dst_t* dst,
                                   int64_t ld_dst) {
  static_assert(kTile == 16, "ATen's transpose_mxn<float, 16, 16>");
#if NLLF_SIMD
  constexpr bool f_src = std::is_same_v<src_t, float>, f_dst = std::is_same_v<dst_t, float>;
  // floats: in registers where the copy has it (kernels_avx512.h), else by ATen's
  auto floats = [](const float* s, int64_t ls, float* d, int64_t ld) {
#ifdef NLLF_HAVE_TRANSPOSE16
    transpose16_f(s, ls, d, ld);
#else
    at::vec::transpose_mxn<float, kTile, kTile>(s, ls, d, ld);
#endif
  };
  if constexpr (f_src && f_dst) {
    return floats(src, ld_src, dst, ld_dst);
  } else if constexpr (f_dst && sizeof(src_t) == 2 && kTile % W == 0) {
    // bf16 / fp16 logits or targets, widened a vector at a time
    alignas(64) float b[kTile][kTile];
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t j = 0; j < kTile; j += W) load1(src + i * ld_src + j).store(&b[i][j]);
    }
    return floats(&b[0][0], kTile, dst, ld_dst);
  } else if constexpr (f_src && sizeof(dst_t) == 2 && kTile % W == 0) {  // a 16-bit gradient
    alignas(64) float b[kTile][kTile];
    floats(src, ld_src, &b[0][0], kTile);
    for (int64_t i = 0; i < kTile; ++i) {
      for (int64_t j = 0; j < kTile; j += W) store1(dst + i * ld_dst + j, V::loadu(&b[i][j]));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < kTile; ++i) {
    for (int64_t j = 0; j < kTile; ++j) {
      dst[j * ld_dst + i] = static_cast<dst_t>(src[i * ld_src + j]);
    }
  }
}

// kTile lanes of C < kTile classes from one run, x[l C + c] (channels-last logits or
// probability targets), into the rows zb[c ld + l], in acc_t; false where the copy cannot
// (then the caller copies a value at a time). Not inlined (C10_NOINLINE), nor rows_to_run:
// their 15 unrolled copies inside lane_gather and lane_scatter_run made those 3 % slower at
// C >= 16, which never takes them.
// The kTile lanes are kTile / W parts of W lanes, each part's run kC whole vectors.
template <typename scalar_t>
template <typename src_t>
C10_NOINLINE
bool Ce<scalar_t>::run_to_rows(const src_t* x, int64_t C, acc_t* zb, int64_t ld) {
#ifdef NLLF_HAVE_PERMUTE_RUNS
  if constexpr (std::is_same_v<acc_t, float> && kTile % W == 0) {
    if (C > kPermuteRunsMaxC<src_t, true>) return false;
    return with_small_c(C, [&](auto n) {
      constexpr int kC = decltype(n)::value;
      for (int h = 0; h < kTile / W; ++h) {
        V v[kC + 1], r[kC];
        for (int j = 0; j < kC; ++j) v[j] = load1(x + (h * kC + j) * W);
        v[kC] = V(acc_t(0));
        permute_runs<kC, true>(v, r);
        for (int c = 0; c < kC; ++c) r[c].store(zb + c * ld + h * W);
      }
    });
  }
#endif
  return false;
}

// run_to_rows the other way: rows zb[c ld + l] into o[l C + c], rounded once to dst_t.
template <typename scalar_t>
template <typename dst_t>
C10_NOINLINE
bool Ce<scalar_t>::rows_to_run(const acc_t* zb, int64_t ld, int64_t C, dst_t* o) {
#ifdef NLLF_HAVE_PERMUTE_RUNS
  if constexpr (std::is_same_v<acc_t, float> && kTile % W == 0) {
    if (C > kPermuteRunsMaxC<dst_t, false>) return false;
    return with_small_c(C, [&](auto n) {
      constexpr int kC = decltype(n)::value;
      for (int h = 0; h < kTile / W; ++h) {
        V v[kC + 1], r[kC];
        for (int c = 0; c < kC; ++c) v[c] = V::loadu(zb + c * ld + h * W);
        v[kC] = V(acc_t(0));
        permute_runs<kC, false>(v, r);
        for (int j = 0; j < kC; ++j) store1(o + (h * kC + j) * W, r[j]);
      }
    });
  }
#endif
  return false;
}

// Classes [c0, c0 + n) of a tile's L rows xl[] into zb[l][0, n). Elsewhere than a run, the loads
// of one class for the tile's neighbouring rows still share cache lines.
template <typename scalar_t>
void Ce<scalar_t>::gather_tile(const Args& A, const scalar_t* const* xl, int64_t L, int64_t c0,
                               int64_t n, acc_t (*zb)[kTileChunk]) {
  const int64_t xC = A.xC;
  int64_t c = 0;
  if (is_run(xl, L)) {
    for (; c + kTile <= n; c += kTile) {
      const scalar_t* s = xl[0] + (c0 + c) * xC;
      if (c + 2 * kTile <= n) {  // each class another stream: the next block's lines
        for (int64_t i = kTile; i < 2 * kTile; ++i) __builtin_prefetch(s + i * xC);
      }
      transpose_block(s, xC, &zb[0][c], kTileChunk);
    }
  }
  for (; c < n; ++c) {
    const int64_t o = (c0 + c) * xC;
    if (c + kGatherAhead < n) {  // each class another stream: the lanes of a class ahead
      __builtin_prefetch(xl[0] + o + kGatherAhead * xC);
      __builtin_prefetch(xl[L - 1] + o + kGatherAhead * xC);
    }
    for (int64_t l = 0; l < L; ++l) zb[l][c] = static_cast<acc_t>(xl[l][o]);
  }
}

// The tile's gradient zb[l][0, n) into classes [c0, c0 + n) of the contiguous (N, C, D) output,
// row l's at out + ob[l] (class stride D).
template <typename scalar_t>
void Ce<scalar_t>::scatter_tile(const Args& A, const int64_t* ob, int64_t L, int64_t c0,
                                int64_t n, const acc_t (*zb)[kTileChunk], scalar_t* out) {
  const int64_t D = A.D;
  int64_t c = 0;
  if (is_run(ob, L)) {
    for (; c + kTile <= n; c += kTile) {
      transpose_block(&zb[0][c], kTileChunk, out + ob[0] + (c0 + c) * D, D);
    }
  }
  for (; c < n; ++c) {
    const int64_t o = (c0 + c) * D;
    for (int64_t l = 0; l < L; ++l) out[ob[l] + o] = static_cast<scalar_t>(zb[l][c]);
  }
}

// Probability targets of the tile's rows r0 .. r0 + L - 1 where they are a run: each lane's
// g_c = w_c q'_c (soft_coef_t's) for classes [c0, c0 + n) into gb[l][0, n), the targets moved
// in kTile x kTile blocks as gather_tile moves the logits. False, with nothing written, where
// they are not a run (the caller takes soft_coef, row by row).
template <typename scalar_t>
template <typename q_t>
bool Ce<scalar_t>::soft_tile_t(const Args& A, const q_t* q, const int64_t* o, int64_t L,
                               int64_t c0, int64_t n, acc_t (*gb)[kTileChunk]) {
  if (!is_run(o, L)) return false;
  const int64_t qC = A.qC;
  int64_t c = 0;
  for (; c + kTile <= n; c += kTile) {
    transpose_block(q + o[0] + (c0 + c) * qC, qC, &gb[0][c], kTileChunk);
  }
  for (; c < n; ++c) {
    for (int64_t l = 0; l < L; ++l) gb[l][c] = static_cast<acc_t>(q[o[l] + (c0 + c) * qC]);
  }
  for (int64_t l = 0; l < L; ++l) soft_coef_t(A, gb[l], 1, c0, n, gb[l]);  // in place
  return true;
}

template <typename scalar_t>
bool Ce<scalar_t>::soft_tile(const Args& A, int64_t r0, int64_t L, int64_t c0, int64_t n,
                             acc_t (*gb)[kTileChunk]) {
  int64_t o[kTile];
  for (int64_t l = 0; l < L; ++l) o[l] = (r0 + l) / A.D * A.qN + (r0 + l) % A.D * A.qD;
  switch (A.qtype) {
    case at::kHalf: return soft_tile_t(A, static_cast<const at::Half*>(A.q), o, L, c0, n, gb);
    case at::kBFloat16:
      return soft_tile_t(A, static_cast<const at::BFloat16*>(A.q), o, L, c0, n, gb);
    case at::kFloat: return soft_tile_t(A, static_cast<const float*>(A.q), o, L, c0, n, gb);
    default: return soft_tile_t(A, static_cast<const double*>(A.q), o, L, c0, n, gb);
  }
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
