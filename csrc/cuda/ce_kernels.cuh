// The CUDA kernels of nllfused::ce_fwd / ce_bwd and their launch shape: device-only reductions,
// the __global__ kernels, and choose_launch(), the one place that maps a problem to blocks. The
// per-thread work is in ce_thread.cuh. No torch headers (see there): the host emulator
// (tests/cuda_emulation/emu.cu) includes this file as it is, and ce_cuda.cu launches from it.
//
// Two mappings (fwd_rows_ok / bwd_rows_ok pick one, choose_launch gives its shape):
//  * "rows" (forward: sC == 1; backward: sC == 1 and D == 1): a group of G threads per row,
//    G in {4, 8, 16, 32} (several rows per 256-thread block, warp-shuffle reduction) or
//    G == blockDim.x in {64 .. 256} (one row per block, shuffle + shared-memory reduction).
//    The row is read with 16-byte vector loads (float64: 8-byte), several in flight per
//    thread; a scalar head handles the elements before the first vector boundary and a scalar
//    tail the remainder (rows need not be 16-byte aligned).
//  * "tile" (every other stride pattern): a (32, TY <= 8) block; lane x takes row
//    blockIdx.x*32 + x, thread-row y takes classes y, y+TY, ... with scalar strided loads.
//    Consecutive lanes are consecutive rows, so the (N, C, D)-contiguous case (sD == 1)
//    and the transposed (N, C) case (sN == 1) read and write coalesced.
// Every kernel is instantiated per logits dtype and feature flags F (ce_thread.cuh), for the
// flag sets of RowsFlagSets / TileFlagSets (ce_host.h). No host synchronisation anywhere; all
// offsets are int64.
//
//  * Few long rows (fewer than 2 blocks per SM, rows of several block steps): the rows
//    mapping with each row split into `parts` pieces (row_part, ce_thread.cuh), one 256-thread
//    block per piece. The backward writes its piece; the forward writes the piece's merged
//    state to a workspace and ce_fwd_merge_kernel merges each row's pieces in order
//    (merge_parts) and finishes the row: deterministic, no atomics.
//
// Registers: launch blocks have at most kLaunchThreads (256) threads, and the kernels are
// compiled to leave room for kBlocksPerSM (4) of them on an SM (65536 registers: at most 64 per
// thread; float64 ones, off the LM path, 96: their exp and tanh are software). The kernels
// themselves accept blocks of up to kMaxThreads (512) threads, which the host emulator's tests
// use to exercise the reductions with more warps.
#pragma once

#include "ce_backward.cuh"

namespace nllfused {
namespace cuda_impl {

constexpr int kLaunchThreads = 256;  // the largest block choose_launch picks
constexpr int kBlocksPerSM = 4;      // resident blocks of kLaunchThreads the registers allow
constexpr int kMaxThreads = 512;     // the largest block the kernels accept
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxTileY = kMaxThreads / 32;  // tile mapping: at most 32 x kMaxTileY threads
constexpr int kWarpPathThreads = 256;
// The register budget per thread (__maxnreg__): 64 leaves room for kBlocksPerSM blocks of
// kLaunchThreads; float64 kernels get 96.
template <typename scalar_t>
constexpr int kMaxRegs =
    std::is_same<scalar_t, double>::value ? 96 : 65536 / (kBlocksPerSM * kLaunchThreads);

// ------------------------------------------------------------------------------------------
// Reductions (device only).

template <int F, typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_xor_stats(const Stats<acc_t>& st, int off) {
  Stats<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
  o.k = __shfl_xor_sync(0xffffffffu, st.k, off);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
  if constexpr (kMayT<F>) {
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
  } else {
    o.t = acc_t(0);
    o.w = acc_t(0);
  }
  if constexpr (kHasStats<F>) {
    o.e = __shfl_xor_sync(0xffffffffu, st.e, off);
    o.arg = __shfl_xor_sync(0xffffffffu, st.arg, off);
  } else {
    o.e = acc_t(0);
    o.arg = kNoClass;
  }
  return o;
}

// Butterfly over aligned groups of `width` lanes (power of two <= 32). Every lane of the
// warp must call it. The result is complete in every lane of the group.
template <int F, typename acc_t>
__device__ __forceinline__ Stats<acc_t> group_reduce(Stats<acc_t> st, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) st = merge<F>(st, shfl_xor_stats<F>(st, off));
  return st;
}

// Whole block (blockDim.x a power of two, 64 .. kMaxThreads): a butterfly in each warp, then
// one over the warps' results in warp 0. Result valid in thread 0. Every thread of the block
// must call it.
template <int F, typename acc_t>
__device__ __forceinline__ Stats<acc_t> block_reduce(Stats<acc_t> st, Stats<acc_t>* red) {
  st = group_reduce<F>(st, 32);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    st = group_reduce<F>(lane < nwarps ? red[lane] : stats_init<acc_t>(), nwarps);
  }
  __syncthreads();  // red[] is reused by the next row
  return st;
}

// ------------------------------------------------------------------------------------------
// Kernels.

#define NLLF_KERNEL __global__ void __launch_bounds__(kMaxThreads) __maxnreg__(kMaxRegs<scalar_t>)

// Rows mapping, forward. G threads per row piece: G <= 32 (blockDim.x / G pieces per block,
// loop trip counts uniform per block so the shuffles see every lane) or G == blockDim.x. Piece
// i is part i % parts of row i / parts; with parts == 1 the thread group finishes the row, else
// it writes the piece's state to ws[i] for ce_fwd_merge_kernel.
template <typename scalar_t, int F>
NLLF_KERNEL ce_fwd_rows_kernel(const scalar_t* __restrict__ x,
                               const CEParams<acc_type_t<scalar_t>> p, const int G,
                               const int parts, Stats<acc_type_t<scalar_t>>* __restrict__ ws) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ Stats<acc_t> red[kMaxWarps];
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t items = p.R * parts;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t ibase = static_cast<int64_t>(blockIdx.x) * rows_per_block; ibase < items;
       ibase += step) {
    const int64_t i = ibase + grp;
    const int64_t r = parts == 1 ? i : i / parts;
    const int part = static_cast<int>(i - r * parts);
    Stats<acc_t> st = fwd_rows_thread<scalar_t, F>(p, x, r, tid, G, part, parts);
    if (G <= 32) {
      st = group_reduce<F>(st, G);
    } else {
      st = block_reduce<F>(st, red);
    }
    if (i < items && tid == 0) {
      if (parts == 1) fwd_finish<scalar_t, F>(p, x, r, st);
      else ws[i] = st;
    }
  }
}

// A split forward's second step: thread per row, its parts' states merged in order.
template <typename scalar_t, int F>
NLLF_KERNEL ce_fwd_merge_kernel(const scalar_t* __restrict__ x,
                                const CEParams<acc_type_t<scalar_t>> p, const int parts,
                                const Stats<acc_type_t<scalar_t>>* __restrict__ ws) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < p.R;
       r += step)
    fwd_finish<scalar_t, F>(p, x, r, merge_parts<F>(ws + r * parts, parts));
}

// Tile mapping, forward: block (32, TY); lane = row within the tile, threadIdx.y = class slice.
// The TY partial states of a row are merged by a tree in shared memory: in round h, thread-row
// ty (a multiple of 2h) takes in ty + h.
template <typename scalar_t, int F>
NLLF_KERNEL ce_fwd_tile_kernel(const scalar_t* __restrict__ x,
                               const CEParams<acc_type_t<scalar_t>> p) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ Stats<acc_t> part[kMaxTileY][32];
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t rbase = static_cast<int64_t>(blockIdx.x) * 32; rbase < p.R; rbase += step) {
    const int64_t r = rbase + lane;
    Stats<acc_t> st = fwd_tile_thread<scalar_t, F>(p, x, r, ty, TY);
    part[ty][lane] = st;
    __syncthreads();
    for (int h = 1; h < TY; h *= 2) {
      if (ty % (2 * h) == 0 && ty + h < TY) {
        st = merge<F>(st, part[ty + h][lane]);
        part[ty][lane] = st;
      }
      __syncthreads();  // also: part[][] is reused by the next tile
    }
    if (ty == 0 && r < p.R) fwd_finish<scalar_t, F>(p, x, r, st);
  }
}

// Rows mapping, backward (D == 1: output row r is out + r*C); pieces as the forward's. No
// reductions, so groups may leave the loop independently.
template <typename scalar_t, int F>
NLLF_KERNEL ce_bwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               const CEParams<acc_type_t<scalar_t>> p, const int G,
                               const int parts) {
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t items = p.R * parts;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * rows_per_block + grp; i < items;
       i += step) {
    const int64_t r = parts == 1 ? i : i / parts;
    bwd_rows_thread<scalar_t, F>(p, x, out, r, tid, G, static_cast<int>(i - r * parts), parts);
  }
}

// Tile mapping, backward: output element (n, c, d) at out + n*C*D + c*D + d.
template <typename scalar_t, int F>
NLLF_KERNEL ce_bwd_tile_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               const CEParams<acc_type_t<scalar_t>> p) {
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 32 + lane; r < p.R; r += step)
    bwd_tile_thread<scalar_t, F>(p, x, out, r, ty, TY);
}

#undef NLLF_KERNEL

// ------------------------------------------------------------------------------------------
// Launch configuration: the one place that maps a problem to blocks.

struct LaunchConfig {
  bool tile;        // tile mapping (strided) instead of rows mapping
  int G;            // rows mapping: threads per row
  int threads;      // rows mapping: blockDim.x
  int tile_y;       // tile mapping: blockDim.y (blockDim.x == 32)
  int64_t blocks;   // gridDim.x (kernels loop over the rows beyond it)
  int parts;        // rows mapping: pieces per row (1: unsplit)
};

// Pieces per row for R rows of nvec 16-byte vectors on `sms` SMs: enough for kBlocksPerSM
// blocks per SM when the rows alone give fewer than 2 per SM, each piece at least two steps of
// a kLaunchThreads block (unroll vectors per thread); 1: no split.
inline int split_parts(int64_t R, int64_t nvec, int unroll, int sms) {
  if (sms <= 0 || R >= 2 * static_cast<int64_t>(sms)) return 1;
  const int64_t most = nvec / (2 * static_cast<int64_t>(kLaunchThreads) * unroll);
  const int64_t want = (static_cast<int64_t>(kBlocksPerSM) * sms + R - 1) / R;
  const int64_t parts = want < most ? want : most;
  return parts >= 2 ? static_cast<int>(parts) : 1;
}

// vec: values per vector (kVec); unroll: vectors per thread and step (rows mapping); sms: the
// device's SMs (0: never split a row).
inline LaunchConfig choose_launch(int64_t R, int64_t C, bool rows_ok, int vec, int unroll,
                                  int sms) {
  LaunchConfig L{};
  L.parts = 1;
  int64_t rows_per_block;
  if (rows_ok) {
    const int64_t nvec = (C + vec - 1) / vec;  // 16-byte vectors per row
    L.tile = false;
    if (nvec <= 32 * unroll) {
      // small rows: the fewest threads (>= 4, <= a warp) that take a row in one sweep
      L.G = 4;
      while (L.G < 32 && static_cast<int64_t>(L.G) * unroll < nvec) L.G *= 2;
      L.threads = kWarpPathThreads;
    } else {
      // a block per row: 64 .. kLaunchThreads threads, one sweep when the row allows
      L.G = 64;
      while (L.G < kLaunchThreads && static_cast<int64_t>(L.G) * unroll < nvec) L.G *= 2;
      L.threads = L.G;
    }
    L.parts = split_parts(R, C / vec, unroll, sms);
    if (L.parts > 1) L.G = L.threads = kLaunchThreads;
    rows_per_block = L.threads / L.G;
  } else {
    L.tile = true;
    L.tile_y = 1;
    while (L.tile_y < kLaunchThreads / 32 && static_cast<int64_t>(L.tile_y) * 32 < C)
      L.tile_y *= 2;
    rows_per_block = 32;
  }
  const int64_t blocks = (R * L.parts + rows_per_block - 1) / rows_per_block;
  L.blocks = blocks < std::numeric_limits<int32_t>::max() ? blocks
                                                           : std::numeric_limits<int32_t>::max();
  return L;
}

// The mappings ce_cuda.cu uses: rows where the classes are unit-stride (the backward's also
// needs D == 1: its output rows are then contiguous too), else tile; and their launch shapes
// (the rows mapping's depends on the kernel's flags: its unroll).
template <typename acc_t>
inline bool fwd_rows_ok(const CEParams<acc_t>& p) {
  return p.sC == 1 || p.C == 1;
}
template <typename acc_t>
inline bool bwd_rows_ok(const CEParams<acc_t>& p) {
  return (p.sC == 1 || p.C == 1) && p.D == 1;
}
template <typename scalar_t, int F, typename acc_t>
inline LaunchConfig rows_launch(const CEParams<acc_t>& p, int sms) {
  return choose_launch(p.R, p.C, true, kVec<scalar_t>, kUnroll<F>,
                       sms);
}
template <typename scalar_t, typename acc_t>
inline LaunchConfig tile_launch(const CEParams<acc_t>& p) {
  return choose_launch(p.R, p.C, false, kVec<scalar_t>, 1, 0);
}
// ce_fwd_merge_kernel's grid for R rows (a thread per row).
inline int64_t merge_blocks(int64_t R) {
  return (R + kLaunchThreads - 1) / kLaunchThreads;
}

}  // namespace cuda_impl
}  // namespace nllfused
