// The baseline copy of the CPU kernels (ce_cpu_kernels.h): plain C++ for the compiler's default
// target, one lane per "vector". Runs anywhere; the op layer (ce_cpu.cpp) picks it when the CPU
// has no SIMD copy, or when NLLFUSED_CPU_CAPABILITY=default asks for it.
#include "kernels.h"

namespace nllfused_cpu::cpu_default {

// One lane: the subset of at::vec::Vectorized the kernels use, with the same semantics.
template <typename T>
struct ScalarVec {
  T v;
  ScalarVec() = default;
  ScalarVec(T x) : v(x) {}
  static constexpr int64_t size() { return 1; }
  static ScalarVec loadu(const void* p) { return ScalarVec(*static_cast<const T*>(p)); }
  void store(void* p) const { *static_cast<T*>(p) = v; }
  ScalarVec exp_u20() const { return ScalarVec(std::exp(v)); }
  ScalarVec tanh() const { return ScalarVec(std::tanh(v)); }
  ScalarVec log1p() const { return ScalarVec(std::log1p(v)); }
  ScalarVec eq(ScalarVec b) const { return ScalarVec(v == b.v ? T(1) : T(0)); }  // 1 or 0
  // Vectorized's comparison operators give a lane mask and blendv picks b where it is set; here
  // the mask is 1 or 0.
  ScalarVec operator!=(ScalarVec b) const { return ScalarVec(v != b.v ? T(1) : T(0)); }
  ScalarVec operator==(ScalarVec b) const { return ScalarVec(v == b.v ? T(1) : T(0)); }
  ScalarVec operator|(ScalarVec b) const { return ScalarVec(v != 0 || b.v != 0 ? T(1) : T(0)); }
  int zero_mask() const { return v == 0 ? 1 : 0; }  // bit 0: the lane is 0
  static ScalarVec blendv(ScalarVec a, ScalarVec b, ScalarVec mask) { return mask.v != 0 ? b : a; }
  friend ScalarVec operator+(ScalarVec a, ScalarVec b) { return ScalarVec(a.v + b.v); }
  friend ScalarVec operator-(ScalarVec a, ScalarVec b) { return ScalarVec(a.v - b.v); }
  friend ScalarVec operator*(ScalarVec a, ScalarVec b) { return ScalarVec(a.v * b.v); }
  friend ScalarVec operator/(ScalarVec a, ScalarVec b) { return ScalarVec(a.v / b.v); }
};
template <typename T>
ScalarVec<T> fmadd(ScalarVec<T> a, ScalarVec<T> b, ScalarVec<T> c) {
  return ScalarVec<T>(a.v * b.v + c.v);
}
template <typename T>
ScalarVec<T> maximum(ScalarVec<T> a, ScalarVec<T> b) {  // propagates NaN, like at::vec::maximum
  return (a.v != a.v || a.v > b.v) ? a : b;
}

template <typename T>
using Vec = ScalarVec<T>;

}  // namespace nllfused_cpu::cpu_default

#define NLLF_CPU_CAPABILITY default
#include "ce_cpu_kernels.h"
