// What the CPU op layer (ce_cpu.cpp) and the kernel translation units share: the kernels'
// arguments and their entry points, one pair per instruction set.
//
// The kernels are written once, in ce_cpu_kernels.h, and compiled once per instruction set by a
// small translation unit each: kernels_default.cpp (baseline ISA, one lane), kernels_avx2.cpp,
// kernels_avx512.cpp and kernels_avx512bf16.cpp (ATen's Vectorized, compiled under
// `#pragma GCC target`; the last two from kernels_avx512.h). ATen does
// the same inside libtorch (one kernel source, one object per CPU_CAPABILITY), but an
// extension only gets its DEFAULT flavour of at::vec, hence the per-file pragmas here.
//
// This header also includes, for the baseline ISA, everything ATen/cpu/vec/vec.h pulls in
// besides the vector classes: the SIMD translation units include it before their target region,
// so that none of it is compiled for AVX2 / AVX-512 (an inline function compiled there could be
// picked by the linker for every caller, and run on a CPU without those instructions).
#pragma once

#include <ATen/ATen.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

// The SIMD copies need GCC's target pragmas on x86-64; elsewhere (clang, aarch64) only the
// baseline copy is built. -DNLLFUSED_CPU_NO_SIMD builds the baseline copy alone anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(NLLFUSED_CPU_NO_SIMD)
#define NLLF_CPU_X86_SIMD 1
#else
#define NLLF_CPU_X86_SIMD 0
#endif

// A copy's namespace, nllfused_cpu::cpu_<isa>, from the NLLF_CPU_CAPABILITY its translation
// unit defines (ce_cpu_kernels.h, kernels_avx512.h).
#define NLLF_CAT_(a, b) a##b
#define NLLF_CAT(a, b) NLLF_CAT_(a, b)
#define NLLF_CPU_NS NLLF_CAT(cpu_, NLLF_CPU_CAPABILITY)

namespace nllfused_cpu {

// Everything a kernel needs, strides in elements. Pointers are typed by the kernel.
struct Args {
  int64_t N, C, D;
  const void* x; int64_t xN, xC, xD;             // logits (N, C, D)
  const void* t; int64_t tN, tD; int tkind;      // index targets (N, D): 0 int64, 1 int32, 2 uint8
  const void* q; int64_t qN, qC, qD;             // probability targets (N, C, D)
  at::ScalarType qtype;
  const void* w; double wsum;                    // weights (C,) in the accumulation dtype, or null
  int64_t ignore_index; double eps, a, s; bool prob;
  void *loss, *lse, *aux;                        // forward outputs, contiguous (N, D)
  // The one-call ops' reductions (csrc/loss.cpp, csrc/loss_stats.cpp), or null: where the
  // lanes path runs (ce_cpu_lanes.h) the forward adds the rows up in double into sums[Sum]
  // (with stats, every Sum; else the loss and aux) instead of writing the loss and aux rows,
  // and sets sums[kSummed] = 1; elsewhere it writes the rows and sets sums[kSummed] = 0.
  // tile_sums: the lanes' per-block sums (kTileSums each) it adds up.
  double* sums; double* tile_sums;
  const void* gl; int64_t gN, gD;                // backward inputs (N, D)
  const double* glse; int64_t glN, glD;          // grad_lse (N, D) float64, or null
  const void* lse_in; int64_t lN, lD;
  const void* aux_in; int64_t aN, aD;
  void* out;                                     // backward output, contiguous (N, C, D), or
  bool out_like_x;                               // with the logits' strides (rows, lanes paths)
  // Statistics (ce_fwd_stats / ce_bwd_stats); all null for ce_fwd / ce_bwd.
  void *ent, *tlp; int64_t* pred;                // forward outputs, contiguous (N, D)
  const void* gent; int64_t geN, geD;            // grad_entropy (N, D) acc dtype, or null
  const void* gtlp; int64_t gtN, gtD;            // grad_target_logp (N, D) acc dtype, or null
  const void* ent_in; int64_t eN, eD;            // the forward's entropy (N, D), with gent
  // gent for the counted rows only (index targets, y >= 0), 0 on ignored rows: the gradient of a
  // reduced entropy (the one-call op, csrc/loss_stats.cpp), one value for every row (strides 0)
  bool gent_counted;
  // Which of the forward's statistics were asked for (ce_fwd_stats' with_entropy /
  // with_predicted): the others are written as zeros and their work (the entropy's sum, the
  // argmax's snapshots and scans) skipped; target_logp needs nothing beyond the loss's pass.
  bool want_ent, want_pred;
  // ce_fwd_stats's pass. Its rows ent / tlp / pred are all written on the rows path; with sums,
  // where the lanes path adds the statistics up, only those whose pointer is not null.
  bool stats;
  // Every result of this forward is rounded to 16 bits or kept for the backward, none returned
  // in float (the one-call op's 16-bit loss: csrc/loss.cpp): its fold may take the copy's lean
  // exp2 (ce_cpu_forward.h, kLeanExp).
  bool lean;
  // Classes per chunk of the forward's rows read in place (ce_cpu_forward.h, fwd_rows): what
  // row_chunk() gives for the accumulation dtype.
  int64_t chunk;
  bool stats_fwd() const { return stats; }
  bool stats_bwd() const { return gent != nullptr || gtlp != nullptr; }
};

// The forward sweeps each row in chunks of classes whose float32 (float64) copy and logits stay
// in the L1 data cache between its two sweeps over them: a chunk's copy takes 2/3 of the L1d
// (sysconf), a power of two from 8 to 32 KiB -- 32 KiB (8192 float32 classes) on a 48 KiB L1d,
// where it ran the bf16 forward 1.26x and the float32 one 1.12x faster than 8 KiB chunks: the
// per-chunk reductions, scalar, weigh on a small chunk. NLLFUSED_CPU_CHUNK=<classes> (a multiple
// of 64 up to kMaxRowChunk) sets it instead (csrc/cpu/settings.h: tests, tuning). Defined in
// ce_cpu.cpp; acc_size: sizeof the accumulation dtype.
constexpr int64_t kMaxRowChunk = 8192;
int64_t row_chunk(int64_t acc_size);

// The classes before the first cache line boundary of a row of C classes at p, `size`-byte
// elements (0 if p is on one, or p is not a multiple of size, or the row is short). The rows
// paths take them as a chunk of their own (fwd_rows, bwd_rows), so that each later chunk starts
// on a line and each of its 64-byte vector loads and stores touches one line, not two: rows of
// an odd length -- vocabularies of 50257 or 100277 classes -- are otherwise off their lines but
// for one in 32 (bf16) or 16 (float32). bf16 rows of 8001, 30522, 50257, 100277 classes (Intel,
// 2 threads, old and new build in alternating processes): forward 1.14-1.19x faster,
// forward+backward 1.08-1.18x; float32 and float16 as fast as before. Only rows of kHeadMinBytes
// or more: in short rows the head chunk's own sums cost more than the lines gain (bf16 forward
// of 1001 classes 1.45x slower with a head, 2001 classes 1.15x).
constexpr int64_t kHeadMinBytes = 8192;
inline int64_t head_to_line(const void* p, int64_t C, int64_t size) {
  const auto a = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 64);
  return C * size < kHeadMinBytes || a == 0 || a % size != 0 ? 0 : (64 - a) / size;
}

// The most classes of the lanes path (ce_cpu_lanes.h): the forward takes it for every row of
// up to this many classes; where its tiles load each class as one vector -- a K-dim input's d
// stride 1 with at least 32 consecutive d, or exactly 16 (a half tile of 16 lanes each n,
// Lanes::xh), or a column-major (N, C) input's row stride 1 -- up to kLaneMaxClassesVin, where
// the rows' alternative, the tiles path, pays a horizontal max, sum and log per row (and at
// (64, 300, 16) float32 ran at 0.4x the lanes' speed, 0.9x torch's).
// A plain (N, C) input's tiles, gathered by blocks (Ce::lane_block_lanes), to
// kLaneMaxClassesRows: forward time over the rows path's (Zen 4, avx512 copy, (4096, C), one
// thread) C = 257 0.52x, 300 0.62x, 384 0.66x, 512 0.95x (probability targets 1.14x), 768
// 1.28x, 1000 1.21x (the baseline copy, which has no blocks, 1.2x from 300 classes: it is 5x
// slower than torch either way).
constexpr int64_t kLaneMaxClasses = 256;
constexpr int64_t kLaneMaxClassesRows = 384;
constexpr int64_t kLaneMaxClassesVin = 1024;

// The lanes path's class limit for these Args (kLaneMaxClasses, kLaneMaxClassesRows,
// kLaneMaxClassesVin, kLaneFewRows): one function, so that the forward's callers (ce_cpu.cpp)
// and the kernels decide alike.
// A plain (N, C) input of a few rows takes the rows path from 16 (N + 1) classes: a tile costs
// what its W2 lanes cost, however few of them hold a row, where the rows path reads each row in
// place (forward time, lanes over rows, one thread, Zen 4, avx512 copy float32 / bf16: N = 1
// C = 32 1.04 / 1.10, C = 300 1.84 / 1.85; N = 4 C = 100 1.08 / 1.13; N = 8 C = 100 0.99 / 0.95,
// C = 200 1.21 / 1.20; N = 16 C = 200 1.01 / 0.87; the avx2 copy's tiles, of half the lanes,
// alike to N = 8 and 0.8x at N = 16 C = 300, hence no rule past kLaneFewRows).
// From 8 (N + 1) classes for the one-call loss (sums, no statistics), whose rows path keeps the
// rows in a buffer of its own (ce_cpu.cpp, forward's `few`) and allocates two tensors fewer
// (its forward under no_grad, lanes over rows, float32 / bf16: N = 1 C = 16 1.06 / 1.03;
// N = 2 C = 24 1.09 / 1.01; N = 4 C = 32 1.06 / 1.00, C = 48 1.08 / 1.06; N = 6 C = 48
// 1.01 / 0.95, C = 64 1.12 / 1.05; N = 8 C = 64 1.09 / 1.02, C = 100 1.09 / 1.02).
constexpr int64_t kLaneFewRows = 8;
inline int64_t lane_max_classes(const Args& A) {
  if (A.D == 1 && A.xC == 1 && A.N <= kLaneFewRows)
    return (A.sums != nullptr && !A.stats ? 8 : 16) * (A.N + 1) - 1;
  const bool vin = ((A.D >= 32 || A.D == 16) && A.xD == 1) || (A.D == 1 && A.xN == 1);
  if (vin) return kLaneMaxClassesVin;
  return A.D == 1 && A.xC == 1 ? kLaneMaxClassesRows : kLaneMaxClasses;
}

// What the lanes path adds up with Args::sums (ce_cpu_lanes.h), each in double: the rows' loss
// and aux (the one-call loss's 'sum' and 'mean' denominator), and with statistics, over the
// counted rows (target != ignore_index): lse (as its two parts, the max and log d), the z-loss
// term 0 * lse^2 of the one-call op (0, NaN where lse is not finite), entropy, target log-prob,
// the rows whose argmax is the target, and the counted rows themselves.
enum Sum : int {
  kSumLoss, kSumAux, kSumLse, kSumZLoss, kSumEntropy, kSumTargetLogp, kSumHits, kSumCounted,
  kTileSums,            // the sums of a block of tiles (Args::tile_sums)
  kSummed = kTileSums,  // sums[kSummed]: 1 where the kernel added the rows up, else 0
  kSums                 // the length of Args::sums
};

// Entry points of one instruction set's copy; `logits` is the logits' dtype.
using KernelFn = void (*)(const Args&, at::ScalarType logits);
void forward_default(const Args& A, at::ScalarType logits);
void backward_default(const Args& A, at::ScalarType logits);
#if NLLF_CPU_X86_SIMD
void forward_avx2(const Args& A, at::ScalarType logits);
void backward_avx2(const Args& A, at::ScalarType logits);
void forward_avx512(const Args& A, at::ScalarType logits);
void backward_avx512(const Args& A, at::ScalarType logits);
void forward_avx512bf16(const Args& A, at::ScalarType logits);
void backward_avx512bf16(const Args& A, at::ScalarType logits);
#endif

#if NLLF_CPU_X86_SIMD
// MXCSR's flush-to-zero for this thread while in scope (the SIMD copies' Ce::TinyScope): a
// result below 2^-126 becomes 0 at no cost, where it otherwise takes a microcode assist of
// ~100 cycles. SSE, so in the baseline instruction set.
struct FlushTiny {
  const unsigned csr = _mm_getcsr();
  FlushTiny() { _mm_setcsr(csr | _MM_FLUSH_ZERO_ON); }
  ~FlushTiny() { _mm_setcsr(csr); }
  FlushTiny(const FlushTiny&) = delete;
  FlushTiny& operator=(const FlushTiny&) = delete;
};
#endif

// The copies this CPU can run, baseline first ("default", "avx2", "avx512", "avx512bf16"), and
// the one the ops run now (the best, or NLLFUSED_CPU_CAPABILITY's). Defined in ce_cpu.cpp.
std::vector<std::string> capabilities();
std::string capability();

}  // namespace nllfused_cpu
