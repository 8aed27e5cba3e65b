// The AVX2 copy of the CPU kernels (ce_cpu_kernels.h): ATen's Vectorized compiled for AVX2 + FMA
// + F16C by `#pragma GCC target`, in a namespace of our own (at::vec::nllfused_avx2) so that
// nothing here can be confused with libtorch's copies. The op layer (ce_cpu.cpp) picks it on a
// CPU with those features and no AVX-512.
#include "kernels.h"  // first: what must be compiled for the baseline ISA (see there)

#if NLLF_CPU_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define CPU_CAPABILITY nllfused_avx2
#define CPU_CAPABILITY_AVX2
#include "vec_region.h"

namespace nllfused_cpu::cpu_avx2 {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// bf16 round-to-nearest-even of values known not to be NaN, the bf16 in each lane's high half:
// ATen's conversion without its NaN fix-up (same bits otherwise).
inline __m256i bf16_rne_high(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
}

// The backward's store of finite gradients, in class order.
inline void store_bf16_finite(at::BFloat16* p, Vec<float> a, Vec<float> b) {
  const __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(bf16_rne_high(a), 16),
                                             _mm256_srli_epi32(bf16_rne_high(b), 16));
  // lanes: a0-3 b0-3 a4-7 b4-7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xd8));
}
#define NLLF_HAVE_STORE_BF16_FINITE 1

// bf16 in split order (ce_cpu_kernels.h, load2s): the 16 bf16 at p as two float vectors, the
// even classes 2j in a and the odd ones 2j + 1 in b -- a shift and a mask, where the ordered
// load widens each half first.
inline void load_bf16_split(const at::BFloat16* p, Vec<float>& a, Vec<float>& b) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
}
// Its inverse for values known not to be NaN, rounded by bf16_rne_high: a's into the low and
// b's into the high halves of the pairs (no pack, no lane permute).
inline void store_bf16_split_finite(at::BFloat16* p, Vec<float> a, Vec<float> b) {
  const __m256i lo = _mm256_srli_epi32(bf16_rne_high(a), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_blend_epi16(lo, bf16_rne_high(b), 0xAA));
}
#define NLLF_HAVE_BF16_SPLIT 1

// The first of the 16 bf16 at p with the bits `bits`, in class order, -1 if none (a compare, a
// movemask and a count of trailing zeros; the bf16 compare's mask has two bits a lane); which of
// the 16 floats at p equal m, bit q for p[q]: Ce::first_at's step.
inline int first_bits_equal(const at::BFloat16* p, uint16_t bits) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const uint32_t hit = uint32_t(
      _mm256_movemask_epi8(_mm256_cmpeq_epi16(v, _mm256_set1_epi16(int16_t(bits)))));
  return hit ? __builtin_ctz(hit) / 2 : -1;
}
inline uint32_t equal_mask(const float* p, Vec<float> m) {
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), m, _CMP_EQ_OQ))) |
         uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), m, _CMP_EQ_OQ))) << 8;
}
#define NLLF_HAVE_EQUAL_MASK 1

// The last step of Ce::vexp: p 2^n, 2^n from the low bits of tt, exactly 0 where x <= -87 and
// NaN where x is.
inline Vec<float> exp_finish(Vec<float> x, Vec<float> tt, Vec<float> p) {
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_NLE_UQ);  // > -87 or NaN
  return _mm256_and_ps(_mm256_mul_ps(p, two_n), keep);
}

inline constexpr float kExp2Coef[6] = {1.0f,  // degree 5: 2^f = sum kExp2Coef[i] f^i
                                       0.6931470036506653f,   0.24022242426872253f,
                                       0.05550733953714371f,  0.009671518579125404f,
                                       0.0013264723820611835f};
// 2^u for u <= ~1, the forward fold's exp (Ce::fold_steps: u = z log2 e - m log2 e by one fma; in
// this copy its last, partial step: the full steps and the bf16 backward take exp2_affine /
// exp2_scaled below), under FlushTiny: 11 instructions where
// z - m and Ce::vexp take 13. AVX2 has no reduce or scalef: n = round(u) by the 1.5 * 2^23 shifter,
// which leaves n + 127 in the low bits of tt (2^n after a shift), f = u - n in [-1/2, 1/2], 2^f by
// a polynomial. u is first raised to -127 (vmaxps returns its second operand, u, where that is NaN:
// NaN stays NaN), where n + 127 = 0 gives 2^n = +0: -inf and every u <= -127 give an exact 0. 2^f:
// degree 5, 1 + f q(f) so that 2^0 is exactly 1, fitted (reweighted least squares) for relative
// error 9.2e-8 on [-1/2, 1/2], 1.6e-7 evaluated in float.
// exp2_tiny_parts gives the two factors, 2^f and 2^n; exp2_tiny multiplies them.
// Lean: 2^f of degree 4, relative error 2.9e-6 evaluated in float, one fma fewer (the fold is
// bound by its instructions: its loop alone from L1 5-10 % faster for bf16, Zen 3); only where
// every result is rounded to 16 bits (Args::lean; ce_cpu_forward.h, kLeanExp).
template <bool Lean>
inline __m256 exp2_poly(__m256 f) {  // 2^f, f in [-1/2, 1/2]
  __m256 q;
  if constexpr (Lean) {
    q = _mm256_fmadd_ps(_mm256_set1_ps(0.009582853f), f, _mm256_set1_ps(0.05590643f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.24024099f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.6931242f));
  } else {
    q = _mm256_fmadd_ps(_mm256_set1_ps(kExp2Coef[5]), f, _mm256_set1_ps(kExp2Coef[4]));
    for (int i = 3; i >= 1; --i) q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(kExp2Coef[i]));
  }
  return _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0f));
}
template <bool Lean>
inline void exp2_tiny_parts(Vec<float> u, __m256& q, __m256& two_n) {
  const __m256 shifter = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 uc = _mm256_max_ps(_mm256_set1_ps(-127.0f), u);
  const __m256 tt = _mm256_add_ps(uc, shifter);
  const __m256 f = _mm256_sub_ps(uc, _mm256_sub_ps(tt, shifter));
  q = exp2_poly<Lean>(f);
  two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
}
template <bool Lean = false>
inline Vec<float> exp2_tiny(Vec<float> u) {
  __m256 q, two_n;
  exp2_tiny_parts<Lean>(u, q, two_n);
  return _mm256_mul_ps(q, two_n);
}
// s + exp2_tiny(u), the fold's common step until exp2_affine_plus below took its place in this
// copy (Ce::fold_steps still names it), its multiply and add in one fma:
// the same bits, as 2^f 2^n is exact wherever it is normal (a term below float's normal range,
// which exp2_tiny's multiply flushes to 0, is lost in s's rounding unless s is as tiny). One
// instruction fewer for the add pipes, which the fold keeps busy. Zen 4, this copy forced, one
// thread: the fold's loop alone from L1 1.11-1.13x faster; the float32 forward of (256, 32000)
// 1.12-1.18x (best of 8 alternating processes); the bf16 one within the VM's noise (its steps in
// a chunk holding the max keep s0 on the stack: 16 registers are too few there).
template <bool Lean = false>
inline Vec<float> exp2_tiny_plus(Vec<float> u, Vec<float> s) {
  __m256 q, two_n;
  exp2_tiny_parts<Lean>(u, q, two_n);
  return _mm256_fmadd_ps(q, two_n, s);
}
// s + 2^(z log2 e + c) for an integer c, |c| < 2^22 - 127 (Ce::fold_steps' common step, c =
// tiny_offset(ref); Ce::grad_chunk's p, without s): exp2_tiny_plus with u's fma folded into the
// range reduction. The fma z log2 e + K, K = 1.5 * 2^23 + 127 + c (an integer: the sum is
// rounded to one), gives n + c + 127 in its low bits, n = round(z log2 e), and f = z log2 e - n
// comes from a second fma, the product exact and one rounding, where exp2_tiny's u = z log2 e + c
// is rounded first (an error that grows with |u|: the term 2.8e-6 off at |u| ~ 100, 1.75e-7 here
// over [-120, 1]). One instruction fewer: the fold's loop alone from L1 1.03-1.16x faster (Zen 3,
// degree 5 and degree 4, float32 and bf16). z is first raised to zmin, the float whose
// n + c + 127 is 0: 2^n is +0 there and for every z below (-inf too), and NaN stays NaN (vmaxps
// returns its second operand, z, where that is NaN).
struct Exp2Affine {
  __m256 log2e, k, zmin;
};
inline Exp2Affine exp2_affine_args(float log2e, float c) {
  // zmin (n(zmin) + c + 127 = 0): its rounding moves zmin log2 e by at most 1/8 * log2 e < 1/2
  // for |zmin| < 2^22 (here |zmin| <= 2^21 + 89: |c| <= 2^21 log2 e + 1/2), so n(zmin) is that
  // integer, no tie.
  const float zmin = static_cast<float>((-127.0 - static_cast<double>(c)) / double(log2e));
  return {_mm256_set1_ps(log2e), _mm256_set1_ps(12582912.0f + 127.0f + c),
          _mm256_set1_ps(zmin)};
}
inline void exp2_affine_reduce(Vec<float> z, const Exp2Affine& e, __m256& f, __m256& two_n) {
  const __m256 zc = _mm256_max_ps(e.zmin, z);
  const __m256 tt = _mm256_fmadd_ps(zc, e.log2e, e.k);
  f = _mm256_fmsub_ps(zc, e.log2e, _mm256_sub_ps(tt, e.k));
  two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
}
template <bool Lean>
inline void exp2_affine_parts(Vec<float> z, const Exp2Affine& e, __m256& q, __m256& two_n) {
  __m256 f;
  exp2_affine_reduce(z, e, f, two_n);
  q = exp2_poly<Lean>(f);
}
template <bool Lean = false>
inline Vec<float> exp2_affine_plus(Vec<float> z, const Exp2Affine& e, Vec<float> s) {
  __m256 q, two_n;
  exp2_affine_parts<Lean>(z, e, q, two_n);
  return _mm256_fmadd_ps(q, two_n, s);
}
// 2^(z log2 e + c) alone: the bf16 backward's p (Ce::grad_chunk's Exp2), the fold's plain step
// with the entropy's sum (its terms the bits exp2_affine_plus adds: 2^f 2^n is exact).
template <bool Lean = false>
inline Vec<float> exp2_affine(Vec<float> z, const Exp2Affine& e) {
  __m256 q, two_n;
  exp2_affine_parts<Lean>(z, e, q, two_n);
  return _mm256_mul_ps(q, two_n);
}
#define NLLF_HAVE_EXP2_AFFINE 1
// P 2^(z log2 e + c), P in the polynomial's coefficients (degree 5): Ce::grad_chunk's P p, one
// multiply fewer a vector. For normal P (Ce::grad_run: 2^-99 <= |P| <= 2^99, so that no scaled
// coefficient is subnormal); each coefficient's product with P is rounded once (2^-24 of it),
// and p's error stays ~2e-7 of p, as exp2_affine's.
struct Exp2Scaled {
  Exp2Affine e;
  __m256 a[6];  // P kExp2Coef[i]
};
inline Exp2Scaled exp2_scaled_args(float log2e, float c, float P) {
  Exp2Scaled s{exp2_affine_args(log2e, c), {}};
  for (int i = 0; i < 6; ++i) s.a[i] = _mm256_set1_ps(P * kExp2Coef[i]);
  return s;
}
inline Vec<float> exp2_scaled(Vec<float> z, const Exp2Scaled& s) {
  __m256 f, two_n;
  exp2_affine_reduce(z, s.e, f, two_n);
  __m256 q = _mm256_fmadd_ps(s.a[5], f, s.a[4]);
  for (int i = 3; i >= 0; --i) q = _mm256_fmadd_ps(q, f, s.a[i]);
  return _mm256_mul_ps(q, two_n);
}
#define NLLF_HAVE_EXP2_SCALED 1
// Whether any of the 16 bf16 at p has the bits `bits`, or any lane of a or b equals m: a fold
// step's test for classes at the max (Ce::fold_steps).
inline bool any_bits_equal(const at::BFloat16* p, uint16_t bits) {
  return first_bits_equal(p, bits) >= 0;
}
inline bool any_equal(Vec<float> a, Vec<float> b, Vec<float> m) {
  return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a, m, _CMP_EQ_OQ),
                                         _mm256_cmp_ps(b, m, _CMP_EQ_OQ))) != 0;
}
#define NLLF_HAVE_EXP2_TINY 1
#define NLLF_HAVE_EXP2_LEAN 1

// kTile = 16 lanes of C < 16 classes between one run, lane l's class c at l C + c (channels-
// last), and C class vectors, lane l of class c in lane l (Ce::run_to_rows, rows_to_run), W = 8
// lanes at a time: a part's 8 C values are C vectors. AVX2 has no two-source permute: each
// output vector takes its lanes from every input vector that holds some, by a vpermps and a
// blend of constant indices and mask (~C of each a vector, fewer than the scalar copy's load
// and store a value up to C ~ 8).
// idx[j]: each lane's place in its input vector; mask[j][k]: the lanes of output j input k holds.
struct RunPerm {
  alignas(32) int32_t idx[16][8];
  uint8_t mask[16][16];
};
// to_rows: class j's lane l is value s = l C + j of the part's run, in vector s / 8 at s % 8.
// Else output vector j's lane l is value u = 8 j + l, lane u / C's class u % C: class vector
// u % C, lane u / C.
template <int C, bool to_rows>
constexpr RunPerm make_run_perm() {
  RunPerm t{};
  for (int j = 0; j < C; ++j) {
    for (int l = 0; l < 8; ++l) {
      const int s = to_rows ? l * C + j : 8 * j + l;
      t.idx[j][l] = to_rows ? s % 8 : s / C;
      t.mask[j][to_rows ? s / 8 : s % C] |= uint8_t(1u << l);
    }
  }
  return t;
}
template <int C, bool to_rows>
inline constexpr RunPerm kRunPerm = make_run_perm<C, to_rows>();
template <int M>
inline __m256 blend_lanes(__m256 r, __m256 p) {  // p's lanes M into r
  if constexpr (M == 0) return r;
  else if constexpr (M == 0xff) return p;
  else return _mm256_blend_ps(r, p, M);
}
template <int C, bool to_rows, int j, int... k>
inline Vec<float> permute_run(const Vec<float>* v, std::integer_sequence<int, k...>) {
  constexpr const RunPerm& P = kRunPerm<C, to_rows>;
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(P.idx[j]));
  __m256 r = _mm256_setzero_ps();
  ((r = blend_lanes<P.mask[j][k]>(r, _mm256_permutevar8x32_ps(v[k], idx))), ...);
  return r;
}
template <int C, bool to_rows, int... j>
inline void permute_runs_each(const Vec<float>* v, Vec<float>* out,
                              std::integer_sequence<int, j...>) {
  ((out[j] = permute_run<C, to_rows, j>(v, std::make_integer_sequence<int, C>{})), ...);
}
// out[j] for j < C from v[0, C).
template <int C, bool to_rows>
inline void permute_runs(const Vec<float>* v, Vec<float>* out) {
  permute_runs_each<C, to_rows>(v, out, std::make_integer_sequence<int, C>{});
}
// Up to which C that beats the scalar copy of T, into rows (the logits, forward) and back to
// runs (the gradient): one thread, (16, C, 128, 128) channels-last, AVX2 forced on the Intel
// Xeon, forward / forward+backward in ms, means of 3 alternating processes, scalar copy ->
// permutation. float32: C = 2 1.52 / 3.86 -> 1.19 / 3.16, C = 6 2.15 / 5.59 -> 2.00 / 5.54,
// C = 8 2.39 / 5.90 -> 2.36 / 6.23, C = 15 3.54 / 9.91 -> 4.23 / 12.5. bfloat16 (whose scalar
// copy converts each value): C = 2 1.29 / 3.65 -> 1.22 / 3.27, C = 8 2.75 / 8.59 -> 2.61 / 7.19,
// C = 12 3.30 / 11.4 -> 3.75 / 10.9 (the forward slower from C = 10), C = 15 3.62 / 11.9 ->
// 3.96 / 11.4.
template <typename T, bool to_rows>
inline constexpr int kPermuteRunsMaxC = sizeof(T) != 2 ? 6 : to_rows ? 8 : 12;
#define NLLF_HAVE_PERMUTE_RUNS 1

// Ce::vlog1p's split of w > 0 (normal) into 2^e f, f in [sqrt(1/2), sqrt(2)): the exponent of
// w / sqrt(1/2), from the bits. Other w (0, inf, NaN) give garbage that vlog1p replaces.
inline void log_split(Vec<float> w, Vec<float>& f, Vec<float>& e) {
  const __m256i k = _mm256_sub_epi32(_mm256_castps_si256(w), _mm256_set1_epi32(0x3f3504f3));
  e = _mm256_cvtepi32_ps(_mm256_srai_epi32(k, 23));
  f = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(k, _mm256_set1_epi32(0x007fffff)),
                                           _mm256_set1_epi32(0x3f3504f3)));
}

}  // namespace nllfused_cpu::cpu_avx2

#define NLLF_CPU_CAPABILITY avx2
#include "ce_cpu_kernels.h"
#pragma GCC pop_options
#endif  // NLLF_CPU_X86_SIMD
