// Numeric primitives of the CUDA backend's per-thread code (ce_thread.cuh): exponentials, max,
// tanh; 16-byte vectors, how a row splits into them, their conversions. __host__ __device__ so
// that the host emulator (tests/cuda_emulation/emu.cu) runs the same code on a CPU (the host
// versions exist only for it). No torch headers but c10's 16-bit float types.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nllfused {
namespace cuda_impl {

#define NLLF_HD __host__ __device__ __forceinline__

// The accumulation type (csrc/ops.cpp): double for double logits, float for the others.
template <typename scalar_t>
using acc_type_t =
    typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

template <typename T>
NLLF_HD T pos_inf() { return static_cast<T>(INFINITY); }
template <typename T>
NLLF_HD T neg_inf() { return -static_cast<T>(INFINITY); }
template <typename T>
NLLF_HD T quiet_nan() { return static_cast<T>(NAN); }
// The lowest finite value.
template <typename T>
NLLF_HD T lowest() { return sizeof(T) == sizeof(double) ? static_cast<T>(-DBL_MAX) : -FLT_MAX; }

// max that propagates NaN (fmaxf would drop it, and the row must become NaN).
template <typename T>
NLLF_HD T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }
// The same in one instruction where the GPU has it (max.NaN, sm_80 and later).
NLLF_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return nan_max(a, b);
#endif
}
NLLF_HD double max_nan(double a, double b) { return nan_max(a, b); }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// Two 16-bit values at a time (max.NaN.bf16x2 / max.NaN.f16x2).
__device__ __forceinline__ __nv_bfloat162 max_nan(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __hmax2_nan(a, b);
}
__device__ __forceinline__ __half2 max_nan(__half2 a, __half2 b) { return __hmax2_nan(a, b); }
#endif

// The max of z[0 .. N), N a power of two, as a tree (depth log2 N), not a chain.
template <int N, typename T>
NLLF_HD T tree_max(const T* z) {
  if constexpr (N == 1) return z[0];
  else return max_nan(tree_max<N / 2>(z), tree_max<N / 2>(z + N / 2));
}

NLLF_HD float acc_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}
NLLF_HD double acc_exp(double x) { return ::exp(x); }

// a * b rounded, never fused with a later add into one multiply-add: the transformed logit z
// (to_z) is formed in the forward, the backward and the rescans alike, so p = exp(z - lse) is 1
// exactly where the forward's lse is z. (nvcc fuses a * b + c by default; a z - lse fused so in
// one pass and not in another is off by up to half an ulp of z.)
template <typename T>
NLLF_HD T mul_rounded(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (std::is_same_v<T, float>) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// 2^x, one MUFU.EX2 whatever the fast-math flags.
NLLF_HD float acc_exp2(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return std::exp2(x);
#endif
}
constexpr float kLog2e = 1.4426950408889634f;  // log2(e), rounded to float: all uses share it

// expm1f is not replaced by --use_fast_math (checked in the PTX); keeps p_y - 1 precise.
NLLF_HD float acc_expm1(float x) { return ::expm1f(x); }
NLLF_HD double acc_expm1(double x) { return ::expm1(x); }

// log sum_c exp(z_c - m) from the k + s of Stats, once per row, in double: accurate whatever
// the fast-math flags (logf becomes lg2.approx), and log1p keeps a tiny d when k == 1.
NLLF_HD double log_sum(double k, double d) { return k == 1.0 ? ::log1p(d) : ::log(k + d); }

NLLF_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// --use_fast_math turns tanhf into tanh.approx.f32 (relative error ~2^-11), too coarse for
// float32 softcap. This is libdevice's tanhf algorithm, written out so the flag cannot
// replace it: 1 - 2/(exp(2|x|) + 1) for |x| >= 0.6, an odd polynomial below.
NLLF_HD float acc_tanh(float x) {
  const float ax = fabsf(x);
  const float e = acc_exp(2.0f * ax);
  float big = 1.0f - 2.0f / (e + 1.0f);
  big = ax >= 9.0109f ? 1.0f : big;
  big = copysignf(big, x);
  const float x2 = x * x;
  float poly = fmaf(bits_to_float(0x3C80F082u), x2, bits_to_float(0xBD563CAEu));
  poly = fmaf(poly, x2, bits_to_float(0x3E085941u));
  poly = fmaf(poly, x2, bits_to_float(0xBEAAA9EDu));
  poly = poly * x2;
  const float small = fmaf(poly, x, x);
  return ax >= 0.6f ? big : small;
}
NLLF_HD double acc_tanh(double x) { return ::tanh(x); }

template <typename T>
NLLF_HD T ldg(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// exp(z - m) for many z and one m, with the subtraction folded into the exponent:
//   float: 2^(z L - hi) * 2^(-lo), L = kLog2e, hi + lo = m L exactly (lo is the rounding error
//   of the product, which an FMA gives exactly), so one FFMA and one MUFU.EX2 per value and
//   the factor 2^(-lo) once for a whole sum (scale()). z L - hi is formed before its one
//   rounding, so a large common m (logits at 1e4) costs no accuracy. lo is up to ulp(m L) / 2,
//   which 2^lo must survive: for |m| > 2^29 (lo at most 2^5 up to there, 2^43 at 1e20),
//   where every float below m is at least 64 below it and its term under 2^-64 beside the
//   max's 1, the exponent is z - m itself (hi = m, L = 1, lo = 0): 0 at m, 2^-64 or less
//   below. (At 2^29 itself the float below is 32 below: its term e^-32 is not under 2^-64.)
//   double: exp(z - m).
// (The forward's terms at m itself are counted apart, so 2^(lo) 2^(-lo) != 1 does not matter;
// the backward, whose p at z == lse must be exactly 1, subtracts first: prob_of in ce_thread.cuh.)
template <typename acc_t>
struct ExpFrom {
  acc_t m;
  NLLF_HD explicit ExpFrom(acc_t m_) : m(m_) {}
  NLLF_HD acc_t term(acc_t z) const { return acc_exp(z - m); }
  NLLF_HD acc_t scale(acc_t sum) const { return sum; }
};
template <>
struct ExpFrom<float> {
  float mul, hi, lo;
  NLLF_HD explicit ExpFrom(float m) {
    if (fabsf(m) <= 0x1p29f) {
      mul = kLog2e;
      hi = m * kLog2e;
      lo = fmaf(m, kLog2e, -hi);
    } else {  // also +-inf and NaN (the caller's NaN / +inf rules decide those rows)
      mul = 1.0f;
      hi = m;
      lo = 0.0f;
    }
  }
  NLLF_HD float term(float z) const { return acc_exp2(fmaf(z, mul, -hi)); }
  NLLF_HD float scale(float sum) const { return sum * acc_exp2(-lo); }
};

// ------------------------------------------------------------------------------------------
// Vectors: 16 bytes, but a single float64 (kVec): the float64 kernels' software exp and tanh
// need the registers two values at once would take (their budget: ce_kernels.cuh).

template <typename scalar_t>
constexpr int kVec =
    std::is_same<scalar_t, double>::value ? 1 : 16 / static_cast<int>(sizeof(scalar_t));

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) AlignedVec {
  scalar_t v[N];
};

// Element index -> number of leading elements before the first vector (kVec) boundary; all of
// them (C) when the pointer is not even element aligned, so nothing is vector loaded.
template <typename scalar_t>
NLLF_HD int64_t vec_head(const void* ptr, int64_t C) {
  constexpr int VEC = kVec<scalar_t>;
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  if (a % sizeof(scalar_t) != 0) return C;
  const int64_t mis = static_cast<int64_t>((a / sizeof(scalar_t)) % VEC);
  const int64_t head = (VEC - mis) % VEC;
  return head < C ? head : C;
}

// Fill a contiguous output row (ignored / out-of-range rows): vector stores when possible.
template <typename scalar_t>
NLLF_HD void fill_row(scalar_t* orow, int64_t C, scalar_t val, int tid, int G) {
  constexpr int VEC = kVec<scalar_t>;
  using vec_t = AlignedVec<scalar_t, VEC>;
  const int64_t head = vec_head<scalar_t>(orow, C);
  for (int64_t c = tid; c < head; c += G) orow[c] = val;
  const int64_t nvec = (C - head) / VEC;
  vec_t o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) o.v[j] = val;
  vec_t* vout = reinterpret_cast<vec_t*>(orow + head);
  for (int64_t v = tid; v < nvec; v += G) vout[v] = o;
  for (int64_t c = head + nvec * VEC + tid; c < C; c += G) orow[c] = val;
}

// The values of a vector in acc_t. bfloat16 -> float is exact: the high 16 bits of the float,
// one shift or one mask per value (c10's conversion extracts and then shifts each).
template <typename scalar_t, int N, typename acc_t>
NLLF_HD void unpack(const AlignedVec<scalar_t, N>& in, acc_t (&out)[N]) {
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value &&
                std::is_same<acc_t, float>::value && N % 2 == 0) {
    uint32_t w[N / 2];
    memcpy(w, &in, sizeof w);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      out[2 * i] = bits_to_float(w[i] << 16);
      out[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<acc_t>(in.v[j]);
  }
}

// The max of the values of U vectors (U N a power of two), in acc_t. On the GPU 16-bit values
// are compared two at a time before any conversion: half the instructions.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kPairOps = true;  // max.NaN and the rounding of two 16-bit values at once
#else
constexpr bool kPairOps = false;
#endif
template <typename scalar_t, typename acc_t, int N>
constexpr bool kPaired = kPairOps && N % 2 == 0 && std::is_same<acc_t, float>::value &&
                         (std::is_same<scalar_t, c10::BFloat16>::value ||
                          std::is_same<scalar_t, c10::Half>::value);

template <typename acc_t, typename scalar_t, int N, int U>
NLLF_HD acc_t vectors_max(const AlignedVec<scalar_t, N> (&buf)[U]) {
  if constexpr (kPaired<scalar_t, acc_t, N>) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using pair_t = typename std::conditional<std::is_same<scalar_t, c10::Half>::value, __half2,
                                             __nv_bfloat162>::type;
    pair_t h[U * N / 2];
    memcpy(h, buf, sizeof h);
    const pair_t r = tree_max<U * N / 2>(h);
    return max_nan(static_cast<float>(__low2float(r)), static_cast<float>(__high2float(r)));
#endif
  } else {
    acc_t x[U * N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < N; ++j) x[u * N + j] = static_cast<acc_t>(buf[u].v[j]);
    }
    return tree_max<U * N>(x);
  }
}

// A vector of N values rounded to scalar_t. On the GPU two 16-bit values are rounded by one
// instruction (round to nearest even, as c10's conversions); elsewhere one by one.
template <typename scalar_t, int N, typename acc_t>
NLLF_HD AlignedVec<scalar_t, N> pack(const acc_t (&g)[N]) {
  AlignedVec<scalar_t, N> o;
  if constexpr (kPaired<scalar_t, acc_t, N>) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#pragma unroll
    for (int j = 0; j < N; j += 2) {
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(g[j], g[j + 1]);
        memcpy(&o.v[j], &h, sizeof h);
      } else {
        const __half2 h = __floats2half2_rn(g[j], g[j + 1]);
        memcpy(&o.v[j], &h, sizeof h);
      }
    }
#endif
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = static_cast<scalar_t>(g[j]);
  }
  return o;
}

#undef NLLF_HD

}  // namespace cuda_impl
}  // namespace nllfused
