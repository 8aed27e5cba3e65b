// The AVX-512 copy of the CPU kernels with AVX512_BF16's conversions (kernels_avx512.h).
#define NLLF_AVX512_BF16 1
#include "kernels_avx512.h"
