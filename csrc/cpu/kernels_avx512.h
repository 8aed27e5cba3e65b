// The AVX-512 copies of the CPU kernels (ce_cpu_kernels.h): ATen's Vectorized at 512 bits
// (CPU_CAPABILITY_AVX512, AVX-512 F/BW/VL/DQ + FMA + F16C, the set libtorch's own AVX512 kernels
// need), included by two translation units: kernels_avx512.cpp (namespace
// at::vec::nllfused_avx512) and kernels_avx512bf16.cpp, which defines NLLF_AVX512_BF16 first and
// adds AVX512_BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later): its bf16 stores are the
// hardware's rounding (vcvtne2ps2bf16), where the other copy rounds bit by bit. Compiled on every
// x86-64 GCC build; the op layer (ce_cpu.cpp) picks a copy only on a CPU that has its features.
#pragma once
#include "kernels.h"  // first: what must be compiled for the baseline ISA (see there)

#if NLLF_CPU_X86_SIMD
#pragma GCC push_options
#ifdef NLLF_AVX512_BF16
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")
#define CPU_CAPABILITY nllfused_avx512bf16
#define NLLF_CPU_CAPABILITY avx512bf16
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#define CPU_CAPABILITY nllfused_avx512
#define NLLF_CPU_CAPABILITY avx512
#endif
// GCC 12 takes the undefined first operand of its own masked AVX-512 intrinsics for an
// uninitialized variable (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define CPU_CAPABILITY_AVX512
#include "vec_region.h"

namespace nllfused_cpu::NLLF_CPU_NS {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// bf16 in split order (ce_cpu_kernels.h, load2s): the 32 bf16 at p as two float vectors, the
// even classes 2j in a and the odd ones 2j + 1 in b -- a shift and a mask, where the ordered
// load widens each half first (two instructions per vector).
inline void load_bf16_split(const at::BFloat16* p, Vec<float>& a, Vec<float>& b) {
  const __m512i v = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
}
#ifdef NLLF_AVX512_BF16
// The hardware's bf16 rounding (to nearest even; NaN stays NaN; float32 subnormals, which only
// gradients below 2^-126 are, become 0 of their sign as ATen's rounding keeps them): 32 values
// by one instruction, a's in the low and b's in the high half.
inline __m512i bf16_pair(Vec<float> a, Vec<float> b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}
// load_bf16_split's inverse: a's into the low and b's into the high halves of the pairs, the
// conversion and one permute of the 16-bit lanes, where the bit by bit rounding takes 10.
inline void store_bf16_split_finite(at::BFloat16* p, Vec<float> a, Vec<float> b) {
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  _mm512_storeu_si512(p, _mm512_permutexvar_epi16(pairs, bf16_pair(a, b)));
}
// The backward's store of finite gradients in class order (Ce::store2_finite): one conversion.
inline void store_bf16_finite(at::BFloat16* p, Vec<float> a, Vec<float> b) {
  _mm512_storeu_si512(p, bf16_pair(a, b));
}
#define NLLF_HAVE_STORE_BF16_FINITE 1
#else
// bf16 round-to-nearest-even of values known not to be NaN, the bf16 in each lane's high half:
// ATen's rounding without its NaN fix-up (same bits otherwise).
inline __m512i bf16_rne_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
}
// load_bf16_split's inverse for values known not to be NaN: a's into the low and b's into the
// high halves of the pairs, 10 instructions per 32 values where ATen's ordered store takes 16.
inline void store_bf16_split_finite(at::BFloat16* p, Vec<float> a, Vec<float> b) {
  const __m512i lo = _mm512_srli_epi32(bf16_rne_high(a), 16);
  _mm512_storeu_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, lo, bf16_rne_high(b)));
}
#endif
#define NLLF_HAVE_BF16_SPLIT 1

// The last step of Ce::vexp: p 2^n, 2^n from the low bits of tt, exactly 0 where x <= -87 and
// NaN where x is.
inline Vec<float> exp_finish(Vec<float> x, Vec<float> tt, Vec<float> p) {
  const __m512 two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(tt), 23));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLE_UQ);
  return _mm512_maskz_mul_ps(keep, p, two_n);
}
// 2^u for u <= ~0, the forward fold's exp (Ce::fold_steps: u = z log2 e - m log2 e
// by one fma), under FlushTiny: 7 instructions where Ce::vexp takes 9-10 from z - m. reduce
// (AVX-512 DQ) gives f = u - floor(u) in [0, 1) in one instruction, a polynomial 2^f, and scalef
// multiplies by 2^floor(u) -- the same floor as reduce's, so the two halves always agree. No mask
// is needed: -inf and every u below -150 give f in [0, 1) and an exact 0 (as do -1e20, float's
// lowest, ...), NaN stays NaN. 2^f: degree 5, 1 + f q(f) so that 2^0 is exactly 1, fitted
// (Lawson's reweighted least squares) for relative error 8.2e-8 on [0, 1], 1.5e-7 evaluated in
// float. (Lean, the AVX2 copy's lower degree: not here, NLLF_HAVE_EXP2_LEAN unset.)
template <bool Lean = false>
inline Vec<float> exp2_tiny(Vec<float> u) {
  static_assert(!Lean, "no lean exp2 in this copy");
  const __m512 f = _mm512_reduce_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.0018671316793188453f), f,
                             _mm512_set1_ps(0.009017026983201504f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.05579991638660431f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.24016444385051727f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(0.6931512951850891f));
  q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(q, u);
}
// s + exp2_tiny(u) (Ce::fold_steps' common step; the AVX2 copy fuses the two, scalef cannot).
template <bool Lean = false>
inline Vec<float> exp2_tiny_plus(Vec<float> u, Vec<float> s) {
  return _mm512_add_ps(s, exp2_tiny<Lean>(u));
}
// The lanes forward's exp (lane_exp, ce_cpu_lanes.h) takes exp2_tiny here: a multiply and
// exp2_tiny's 7 instructions, where vexp takes 12. (The AVX2 copy's exp2_tiny is 11
// instructions without reduce and scalef: there the lanes forward was no faster, up to 4 %
// slower.)
#define NLLF_HAVE_LANE_EXP2 1
// dst[j ld_dst + i] = src[i ld_src + j] for i, j < 16 (Ce::transpose_block): the block in 16
// registers, 64 shuffles -- pairs of rows interleaved, then pairs of pairs, then 128-bit lanes
// twice, which leaves output row j in register j. ATen's transpose_mxn<float, 16, 16> is an
// out-of-line call for any M x N that keeps its block in memory: 40 % of a channels-last tile's
// backward (perf, (8, 21, 256, 256) float32), which moves two blocks a tile each way.
inline void transpose16_f(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * ld_dst, r[j]);
}
#define NLLF_HAVE_TRANSPOSE16 1

// kTile = 16 lanes of C < 16 classes between one run, lane l's class c at l C + c (channels-
// last: C vectors), and C class vectors, lane l of class c in lane l (Ce::run_to_rows,
// rows_to_run). Each output vector takes its lanes from the pairs of input vectors (2k, 2k + 1)
// that hold them, one vpermt2ps a pair and a masked move: with C a constant, ~C / 2 instructions
// a vector from constant indices and masks, where the scalar copy took a load and a store a
// value (channels-last (16, 4, 128, 128) bf16: the forward 1.6x the contiguous input's time).
// idx: each lane's place in its pair; pair[j][k]: the lanes of output j that pair k holds.
struct RunPerm {
  int32_t idx[16][16];
  uint16_t pair[16][8];
};
// to_rows: class j's lane l is value s = l C + j of the run, pair s / 32, place s % 32. Else
// output vector j's lane l is value u = 16 j + l, lane u / C's class c = u % C, in the pair of
// class vectors c / 2, place u / C + 16 (c % 2).
template <int C, bool to_rows>
constexpr RunPerm make_run_perm() {
  RunPerm t{};
  for (int j = 0; j < C; ++j) {
    for (int l = 0; l < 16; ++l) {
      const int s = to_rows ? l * C + j : 16 * j + l, c = s % C;
      t.idx[j][l] = to_rows ? s % 32 : s / C + 16 * (c % 2);
      t.pair[j][to_rows ? s / 32 : c / 2] |= uint16_t(1u << l);
    }
  }
  return t;
}
template <int C, bool to_rows>
inline constexpr RunPerm kRunPerm = make_run_perm<C, to_rows>();
// out[j] for j < C from v[0, C] (v[C] is read where C is odd, never used).
template <int C, bool to_rows>
inline void permute_runs(const Vec<float>* v, Vec<float>* out) {
  constexpr const RunPerm& P = kRunPerm<C, to_rows>;
#pragma GCC unroll 16
  for (int j = 0; j < C; ++j) {
    const __m512i idx = _mm512_loadu_si512(P.idx[j]);
    __m512 r = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int k = 0; 2 * k < C; ++k) {
      const __mmask16 m = P.pair[j][k];
      if (m) r = _mm512_mask_mov_ps(r, m, _mm512_permutex2var_ps(v[2 * k], idx, v[2 * k + 1]));
    }
    out[j] = r;
  }
}
template <typename T, bool to_rows>
inline constexpr int kPermuteRunsMaxC = 15;  // every C < kTile
#define NLLF_HAVE_PERMUTE_RUNS 1

// Whether any of the 32 bf16 at p has the bits `bits` (one compare), or any lane of a or b
// equals m (two): a fold step's test for classes at the max (Ce::fold_steps).
inline bool any_bits_equal(const at::BFloat16* p, uint16_t bits) {
  return _mm512_cmpeq_epi16_mask(_mm512_loadu_si512(p), _mm512_set1_epi16(int16_t(bits))) != 0;
}
inline bool any_equal(Vec<float> a, Vec<float> b, Vec<float> m) {
  return _kortestz_mask16_u8(_mm512_cmp_ps_mask(a, m, _CMP_EQ_OQ),
                             _mm512_cmp_ps_mask(b, m, _CMP_EQ_OQ)) == 0;
}
// The first of the 32 bf16 at p with the bits `bits`, in class order, -1 if none; which of the
// 32 floats at p equal m, bit q for p[q]: Ce::first_at's step, one compare (two) where the
// vector compare took six and the lane was then searched one class at a time.
inline int first_bits_equal(const at::BFloat16* p, uint16_t bits) {
  const uint32_t hit =
      _mm512_cmpeq_epi16_mask(_mm512_loadu_si512(p), _mm512_set1_epi16(int16_t(bits)));
  return hit ? __builtin_ctz(hit) : -1;
}
inline uint32_t equal_mask(const float* p, Vec<float> m) {
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), m, _CMP_EQ_OQ) |
         uint32_t(_mm512_cmp_ps_mask(_mm512_loadu_ps(p + 16), m, _CMP_EQ_OQ)) << 16;
}
#define NLLF_HAVE_EQUAL_MASK 1
#define NLLF_HAVE_EXP2_TINY 1

// Ce::add_or_count for float: e into s off the max (a != 0; NaN included), a == 0 counted in k.
inline void add_or_count_f(Vec<float> a, Vec<float> e, Vec<float>& s, Vec<float>& k) {
  const __mmask16 hit = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ);
  s = _mm512_mask_add_ps(s, _knot_mask16(hit), s, e);
  k = _mm512_mask_add_ps(k, hit, k, _mm512_set1_ps(1.0f));
}
#define NLLF_HAVE_ADD_OR_COUNT 1

// Ce::select_eq, where(x == y, b, a): a compare into a mask and a masked move, where V::blendv
// on the vector compare's 0 / all-ones lanes takes four instructions (the lane path's picks).
inline Vec<float> select_eq_f(Vec<float> a, Vec<float> b, Vec<float> x, Vec<float> y) {
  return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(x, y, _CMP_EQ_OQ), b);
}
#define NLLF_HAVE_SELECT_EQ 1

// Ce::first_eq: where(x == y and i == unset, c, i), two compares (the second under the first's
// mask) and a masked move, where two V::blendv on the vector compares' 0 / all-ones lanes took
// twice as many (the lane forward with statistics: bf16 (16, 21, 512, 512) 4-12 % faster,
// (8, 4, 512, 512) 1-3 %).
inline Vec<float> first_eq_f(Vec<float> i, Vec<float> c, Vec<float> x, Vec<float> y,
                             Vec<float> unset) {
  const __mmask16 hit = _mm512_cmp_ps_mask(x, y, _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(i, _mm512_mask_cmp_ps_mask(hit, i, unset, _CMP_EQ_OQ), c);
}
#define NLLF_HAVE_FIRST_EQ 1

// a / d for d >= 1 (or 0, inf, NaN, whose results vlog1p replaces) to within ~2 ulp: rcp14 and
// one Newton step (rel. error ~2^-28 before rounding) where vdivps, issued once a vector to
// each of vlog1p's two quotients, took a fifth of a 4-class lane forward (Intel, AVX-512).
inline Vec<float> div_approx(Vec<float> a, Vec<float> d) {
  const __m512 y = _mm512_rcp14_ps(d);
  const __m512 e = _mm512_fnmadd_ps(d, y, _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(a, _mm512_fmadd_ps(y, e, y));
}
#define NLLF_HAVE_DIV_APPROX 1

// Ce::vlog1p's split of w > 0 (normal) into 2^e f, f in [sqrt(1/2), sqrt(2)): the exponent of
// w / sqrt(1/2), from the bits. Other w (0, inf, NaN) give garbage that vlog1p replaces.
inline void log_split(Vec<float> w, Vec<float>& f, Vec<float>& e) {
  const __m512i k = _mm512_sub_epi32(_mm512_castps_si512(w), _mm512_set1_epi32(0x3f3504f3));
  e = _mm512_cvtepi32_ps(_mm512_srai_epi32(k, 23));
  f = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_and_si512(k, _mm512_set1_epi32(0x007fffff)),
                                           _mm512_set1_epi32(0x3f3504f3)));
}

}  // namespace nllfused_cpu::NLLF_CPU_NS

#include "ce_cpu_kernels.h"
#pragma GCC pop_options
#endif  // NLLF_CPU_X86_SIMD
