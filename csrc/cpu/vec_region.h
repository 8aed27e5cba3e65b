// ATen's vector classes for one SIMD translation unit (kernels_avx2.cpp, kernels_avx512.h),
// included inside its `#pragma GCC target` region after it has defined CPU_CAPABILITY (the
// namespace at::vec::CPU_CAPABILITY of this copy) and CPU_CAPABILITY_AVX2 or _AVX512, as
// libtorch's build does per kernel file. kernels.h must come first, outside the region.
#pragma once

#if defined(VECTOR_WIDTH)
#error "ATen's vec headers were included before the SIMD region: include kernels.h first"
#endif

// sleef.h declares the functions Vectorized's exp/tanh/... call in libtorch only under the
// compiler's own ISA macros (__AVX__ for the 256-bit ones, __AVX512F__ for the 512-bit ones),
// which the target pragma does not set.
#ifndef __AVX__
#define __AVX__ 1
#define NLLF_UNDEF_AVX
#endif
#if defined(CPU_CAPABILITY_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define NLLF_UNDEF_AVX512F
#endif
#include <sleef.h>
#ifdef NLLF_UNDEF_AVX
#undef __AVX__
#undef NLLF_UNDEF_AVX
#endif
#ifdef NLLF_UNDEF_AVX512F
#undef __AVX512F__
#undef NLLF_UNDEF_AVX512F
#endif

// Vector arguments of functions compiled here get a different ABI than without the target
// pragma; GCC notes it for every one (-Wpsabi). They are only ever called from this region.
// ATen's vec headers carry `#pragma unroll` and clang pragmas GCC does not know.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <immintrin.h>
#include <type_traits>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#if defined(CPU_CAPABILITY_AVX512)
static_assert(std::is_convertible_v<at::vec::Vectorized<float>, __m512>,
              "ATen's vec headers were included before the AVX-512 region: Vectorized is not "
              "512-bit");
#else
static_assert(std::is_convertible_v<at::vec::Vectorized<float>, __m256>,
              "ATen's vec headers were included before the AVX2 region: Vectorized is not AVX2");
#endif
#pragma GCC diagnostic pop
