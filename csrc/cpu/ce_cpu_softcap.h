// The logit transform of the CPU kernels (ce_cpu_kernels.h, Ce::Tf): z = a x (logit_scale) and
// z = s tanh(a x / s) (softcap), with dz/dx for the backward. Included by ce_cpu_kernels.h.
//
// The softcap's tanh is the kernels' own for float in the SIMD copies (vtanh): Sleef's tanhf
// (Vectorized::tanh, 1 ulp, double-float arithmetic) made the softcap forward 7-8x slower than
// the plain one (fp32 (1024, 32000), one thread: 56 against 6.9 ms).
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// tanh(v), and where sech2 is given 1 - tanh(v)^2 = sech(v)^2 (the softcap's derivative). For
// float in the SIMD copies, with t = |v| and the sign put back at the end (tanh is odd):
//   t < 1:  t + t^3 P(t^2), P of degree 6 fitted (reweighted least squares) for relative error
//           4.6e-9 of tanh on [0, 1]; sech^2 = 1 - tanh^2 (>= 0.42 here: no cancellation);
//   t >= 1: with e = exp(-2t) (vexp; -2t is exact) and w = 2e / (1 + e) = 1 - tanh(t):
//           tanh = 1 - w, sech^2 = (1 - tanh)(1 + tanh) = w (2 - w). vexp's relative error
//           (2.4e-7) enters tanh times 2e / (1 - e^2) <= 0.28, and sech^2 through w alone, so it
//           stays accurate where tanh rounds to 1 (1 - tanh^2 from tanh would be 0 or an ulp).
// Against long double on every third float in [2^-126, 30]: tanh within 1.34 ulp (mean 0.03),
// sech^2 within 5.2 ulp, both quotient forms (div_approx, the division). -2t <= -87 gives
// e = 0: tanh(+-inf) = +-1 with sech^2 = 0; NaN stays NaN; tanh(-0) = -0. 35 instructions a
// vector (AVX-512), z and dz together.
// The same lanes give the same bits in every pass, so the scalar form (tf_scalar: the target's
// z, rescans) runs the vector code on one broadcast value.
template <typename scalar_t>
inline auto Ce<scalar_t>::vtanh(V v, V* sech2) -> V {
#if NLLF_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    const V one(1.0f), t = v.abs(), s = t * t;
    V P = fmadd(V(-0.00035845814272761345f), s, V(0.002301384462043643f));
    P = fmadd(P, s, V(-0.007946131750941277f));
    P = fmadd(P, s, V(0.02148667350411415f));
    P = fmadd(P, s, V(-0.05387980863451958f));
    P = fmadd(P, s, V(0.13332344591617584f));
    P = fmadd(P, s, V(-0.33333295583724976f));
    const V small = fmadd(t * s, P, t);
    const V e = vexp(t * V(-2.0f));
    const V w = quotient(e + e, e + one);
    const V far = t >= one;  // false for NaN: small, which is NaN
    if (sech2) *sech2 = V::blendv(one - small * small, w * (V(2.0f) - w), far);
    return V::blendv(small, one - w, far) ^ (v & V(-0.0f));
  }
#endif
  const V th = v.tanh();  // float64: Sleef's tanh; baseline: std::tanh
  if (sech2) *sech2 = V(acc_t(1)) - th * th;
  return th;
}

template <typename scalar_t>
template <int K>
inline auto Ce<scalar_t>::tf(V x, const Tf& t) -> V {
  if constexpr (K == 0) return x;
  else if constexpr (K == 1) return x * V(t.a);
  else return vtanh(x * V(t.as), nullptr) * V(t.s);
}

// z and dz/dx: softcap'(x) = a sech^2(a x / s), times a for the scale.
template <typename scalar_t>
template <int K>
inline auto Ce<scalar_t>::tf_grad(V x, const Tf& t, V& dz) -> V {
  if constexpr (K == 0) {
    dz = V(acc_t(1));
    return x;
  } else if constexpr (K == 1) {
    dz = V(t.a);
    return x * V(t.a);
  } else {
    V sech2;
    const V th = vtanh(x * V(t.as), &sech2);
    dz = sech2 * V(t.a);
    return th * V(t.s);
  }
}

template <typename scalar_t>
inline auto Ce<scalar_t>::tf_scalar(acc_t x, const Tf& t, acc_t& dz) -> acc_t {
  if (t.kind == 0) {
    dz = 1;
    return x;
  }
  if (t.kind == 1) {
    dz = t.a;
    return x * t.a;
  }
  alignas(64) acc_t z[W], d[W];
  V vd;
  tf_grad<2>(V(x), t, vd).store(z);
  vd.store(d);
  dz = d[0];
  return z[0];
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
