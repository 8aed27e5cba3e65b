// The AVX-512 F/BW/VL/DQ copy of the CPU kernels (kernels_avx512.h).
#include "kernels_avx512.h"
