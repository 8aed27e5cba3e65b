// Built with g++ -O2 -mavx2 -mfma; run alone. Results on this Zen 3: fold_step_variants.txt.
// Fold-step variants from L1: cycles (rdtsc) per vector of 8 classes.
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <x86intrin.h>
#include <cmath>
#include <cstdlib>
static inline __m256 poly(__m256 f) {  // lean degree 4
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(0.009582853f), f, _mm256_set1_ps(0.05590643f));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.24024099f));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.6931242f));
  return _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0f));
}
static inline __m256 poly5(__m256 f) {
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(0.0013264723820611835f), f, _mm256_set1_ps(0.009671518579125404f));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.05550733953714371f));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.24022242426872253f));
  q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(0.6931470036506653f));
  return _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0f));
}
template <int V, bool D5>
__attribute__((noipa)) float run(const uint16_t* x, int n, float c, int reps) {
  const __m256 log2e = _mm256_set1_ps(1.44269504f);
  const __m256 K = _mm256_set1_ps(12582912.0f + 127.0f + c);
  const __m256 Kn = _mm256_set1_ps(12582912.0f + c);  // no +127: int-add variants
  const __m256 zmin = _mm256_set1_ps((-127.0f - c) / 1.44269504f);
  const __m256 zmin2 = _mm256_set1_ps((-125.0f - c) / 1.44269504f);
  const __m256 vc = _mm256_set1_ps(c);
  const __m256 sh = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 shn = _mm256_set1_ps(12582912.0f);
  const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (int r = 0; r < reps; ++r) {
    for (int i = 0; i < n; i += 16) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(x + i));
      __m256 z[2] = {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_castsi256_ps(_mm256_and_si256(v, hi))};
      auto step = [&](__m256 zk, __m256 sk) -> __m256 {
        __m256 z[1] = {zk}; const int k = 0; __m256* s[1] = {&sk};
        if (V == 0) {  // affine plus (current)
          __m256 zc = _mm256_max_ps(zmin, z[k]);
          __m256 tt = _mm256_fmadd_ps(zc, log2e, K);
          __m256 f = _mm256_fmsub_ps(zc, log2e, _mm256_sub_ps(tt, K));
          __m256 two = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
          __m256 q = D5 ? poly5(f) : poly(f);
          *s[k] = _mm256_fmadd_ps(q, two, *s[k]);
        } else if (V == 1) {  // tiny plus
          __m256 u = _mm256_max_ps(_mm256_set1_ps(-127.f), _mm256_fmadd_ps(z[k], log2e, vc));
          __m256 tt = _mm256_add_ps(u, sh);
          __m256 f = _mm256_sub_ps(u, _mm256_sub_ps(tt, sh));
          __m256 two = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(tt), 23));
          __m256 q = D5 ? poly5(f) : poly(f);
          *s[k] = _mm256_fmadd_ps(q, two, *s[k]);
        } else if (V == 2) {  // affine, int add exponent, fadd
          __m256 zc = _mm256_max_ps(zmin2, z[k]);
          __m256 tt = _mm256_fmadd_ps(zc, log2e, Kn);
          __m256 f = _mm256_fmsub_ps(zc, log2e, _mm256_sub_ps(tt, Kn));
          __m256i nn = _mm256_slli_epi32(_mm256_castps_si256(tt), 23);
          __m256 q = D5 ? poly5(f) : poly(f);
          *s[k] = _mm256_add_ps(*s[k], _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), nn)));
        } else {  // tiny, int add, fadd
          __m256 u = _mm256_max_ps(_mm256_set1_ps(-125.f), _mm256_fmadd_ps(z[k], log2e, vc));
          __m256 tt = _mm256_add_ps(u, shn);
          __m256 f = _mm256_sub_ps(u, _mm256_sub_ps(tt, shn));
          __m256i nn = _mm256_slli_epi32(_mm256_castps_si256(tt), 23);
          __m256 q = D5 ? poly5(f) : poly(f);
          *s[k] = _mm256_add_ps(*s[k], _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), nn)));
        }
        return sk;
      };
      s0 = step(z[0], s0);
      s1 = step(z[1], s1);
    }
  }
  float o[8]; _mm256_storeu_ps(o, _mm256_add_ps(s0, s1));
  float t = 0; for (float a : o) t += a; return t;
}
template <int V, bool D5> double cyc(const uint16_t* x, int n, float c, float* out) {
  double best = 1e30;
  for (int k = 0; k < 7; ++k) {
    uint64_t t0 = __rdtsc(); *out = run<V, D5>(x, n, c, 2000); uint64_t t1 = __rdtsc();
    double cv = double(t1 - t0) / (2000.0 * n / 8); if (cv < best) best = cv;
  }
  return best;
}
int main() {
  const int n = 4096; static uint16_t x[n];
  srand(1); float m = -1e30f;
  for (int i = 0; i < n; ++i) { float g = 0; for (int j = 0; j < 12; ++j) g += rand() / (float)RAND_MAX; g -= 6;
    uint32_t b; memcpy(&b, &g, 4); x[i] = b >> 16; uint32_t bb = uint32_t(x[i]) << 16; float gv; memcpy(&gv, &bb, 4); if (gv > m) m = gv; }
  float c = std::nearbyint(-m * 1.44269504f), o[8];
  const char* names[4] = {"affine_plus", "tiny_plus", "affine_intadd", "tiny_intadd"};
  double best[8]; for (int v = 0; v < 8; ++v) best[v] = 1e9;
  for (int round = 0; round < 25; ++round) {
    double r[8];
    r[0] = cyc<0, false>(x, n, c, o + 0); r[1] = cyc<1, false>(x, n, c, o + 1);
    r[2] = cyc<2, false>(x, n, c, o + 2); r[3] = cyc<3, false>(x, n, c, o + 3);
    r[4] = cyc<0, true>(x, n, c, o + 4); r[5] = cyc<1, true>(x, n, c, o + 5);
    r[6] = cyc<2, true>(x, n, c, o + 6); r[7] = cyc<3, true>(x, n, c, o + 7);
    for (int v = 0; v < 8; ++v) if (r[v] < best[v]) best[v] = r[v];
  }
  for (int v = 0; v < 8; ++v) { printf("%-14s %s %.3f cyc/vec\n", names[v % 4], v < 4 ? "deg4" : "deg5", best[v]);
  }
}
