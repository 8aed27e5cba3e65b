// The AVX2 fold's loop alone (ce_cpu_forward.h, fold_steps: s += 2^u, u = z log2 e + c), from L1:
// 4096 bf16 or 2048 float32 logits summed 20000 times per variant, best of 3 rounds, one thread.
// g++ -O2 -mavx2 -mfma fold_variants.cpp -o fold_variants && taskset -c 0 ./fold_variants
//   deg5     exp2_tiny_plus as at 467b178: clamp, shifter, degree-5 2^f, fma into s
//   deg4     the lean exp2 (Lean): the same, degree 4
//   noclamp  deg5 without the clamp at -127 (not safe for -inf: the bound of that idea)
//   iadd     deg5 with 2^n added to q's exponent bits (vpaddd) and s += q by vaddps: one fma
//            fewer, as many instructions
//   tab8     2^(j/8) from an 8-entry table (vpermps), degree 3, the exponent's bits
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

static inline __m256 k(float x) { return _mm256_set1_ps(x); }

template <int V>
static inline __m256 step(__m256 u, __m256 s, __m256 T) {
  if (V == 4) {                               // tab8
    const __m256 S = k(1572864.0f + 126.0f);  // ulp 1/8: low bits round(8u) + 1008
    const __m256 uc = _mm256_max_ps(k(-126.0f), u);
    const __m256 tt = _mm256_add_ps(uc, S);
    const __m256 f = _mm256_sub_ps(uc, _mm256_sub_ps(tt, S));
    const __m256i ti = _mm256_castps_si256(tt);
    const __m256 t = _mm256_permutevar8x32_ps(T, ti);  // T[j] = 2 * 2^(j/8) / (1 + j/8)
    const __m256 two = _mm256_castsi256_ps(_mm256_slli_epi32(ti, 20));  // 2^(n-1) (1 + j/8)
    __m256 q = _mm256_fmadd_ps(k(0.0555041f), f, k(0.2402265f));
    q = _mm256_fmadd_ps(q, f, k(0.6931472f));
    q = _mm256_fmadd_ps(q, f, k(1.0f));
    return _mm256_fmadd_ps(q, _mm256_mul_ps(t, two), s);
  }
  const __m256 shifter = k(V == 3 ? 12582912.0f : 12582912.0f + 127.0f);
  const __m256 uc = V == 2 ? u : _mm256_max_ps(k(-127.0f), u);
  const __m256 tt = _mm256_add_ps(uc, shifter);
  const __m256 f = _mm256_sub_ps(uc, _mm256_sub_ps(tt, shifter));
  __m256 q;
  if (V == 1) {
    q = _mm256_fmadd_ps(k(0.009582853f), f, k(0.05590643f));
    q = _mm256_fmadd_ps(q, f, k(0.24024099f));
    q = _mm256_fmadd_ps(q, f, k(0.6931242f));
  } else {
    q = _mm256_fmadd_ps(k(0.0013264723820611835f), f, k(0.009671518579125404f));
    q = _mm256_fmadd_ps(q, f, k(0.05550733953714371f));
    q = _mm256_fmadd_ps(q, f, k(0.24022242426872253f));
    q = _mm256_fmadd_ps(q, f, k(0.6931470036506653f));
  }
  q = _mm256_fmadd_ps(q, f, k(1.0f));
  const __m256i n23 = _mm256_slli_epi32(_mm256_castps_si256(tt), 23);
  if (V == 3)
    return _mm256_add_ps(s, _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(q), n23)));
  return _mm256_fmadd_ps(q, _mm256_castsi256_ps(n23), s);
}

template <int V, bool BF>
__attribute__((noinline)) float fold(const void* z, int n, float c, __m256 T) {
  const __m256 l2e = k(1.4426950408889634f), vc = k(c);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (int j = 0; j < n; j += 16) {
    __m256 a, b;
    if (BF) {  // split order: a shift and a mask
      const __m256i x = _mm256_loadu_si256((const __m256i*)((const uint16_t*)z + j));
      a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xffff0000u))));
    } else {
      a = _mm256_loadu_ps((const float*)z + j);
      b = _mm256_loadu_ps((const float*)z + j + 8);
    }
    s0 = step<V>(_mm256_fmadd_ps(a, l2e, vc), s0, T);
    s1 = step<V>(_mm256_fmadd_ps(b, l2e, vc), s1, T);
  }
  float o[8];
  _mm256_storeu_ps(o, _mm256_add_ps(s0, s1));
  return o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
}

template <int V, bool BF>
double rate(const void* z, int n, __m256 T, float& sum) {
  const int R = 20000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < R; ++r) sum += fold<V, BF>(z, n, -7.2f, T);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(n) * R / s / 1e9;
}

template <bool BF>
void rates(const void* z, int n, __m256 T, double* r, float* sums) {
  r[0] = rate<0, BF>(z, n, T, sums[0]);
  r[1] = rate<1, BF>(z, n, T, sums[1]);
  r[2] = rate<2, BF>(z, n, T, sums[2]);
  r[3] = rate<3, BF>(z, n, T, sums[3]);
  r[4] = rate<4, BF>(z, n, T, sums[4]);
}

int main() {
  alignas(32) float Tt[8];
  for (int j = 0; j < 8; ++j) Tt[j] = float(2.0 * std::exp2(j / 8.0) / (1.0 + j / 8.0));
  const __m256 T = _mm256_load_ps(Tt);
  std::vector<uint16_t> zb(4096);
  std::vector<float> zf(2048);
  for (int i = 0; i < 4096; ++i) {
    const float x = float((i * 7919) % 1000) / 100.0f - 5.0f;
    uint32_t w;
    std::memcpy(&w, &x, 4);
    zb[i] = uint16_t(w >> 16);
    if (i < 2048) zf[i] = x;
  }
  const char* names[] = {"deg5", "deg4", "noclamp", "iadd", "tab8"};
  double best[2][5] = {};
  float sums[2][5] = {};
  for (int round = 0; round < 3; ++round) {
    double r[2][5];
    rates<true>(zb.data(), 4096, T, r[0], sums[0]);
    rates<false>(zf.data(), 2048, T, r[1], sums[1]);
    for (int d = 0; d < 2; ++d)
      for (int v = 0; v < 5; ++v) best[d][v] = r[d][v] > best[d][v] ? r[d][v] : best[d][v];
  }
  for (int d = 0; d < 2; ++d)
    for (int v = 0; v < 5; ++v)
      std::printf("%s %-8s %.2f Gelem/s  %.3fx deg5  (sum %.7g)\n", d ? "fp32" : "bf16",
                  names[v], best[d][v], best[d][v] / best[d][0], sums[d][v] / 60000);
}
