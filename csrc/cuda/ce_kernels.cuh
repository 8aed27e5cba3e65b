// The CUDA kernels of nllfused::ce_fwd / ce_bwd and their launch shape: device-only reductions,
// the __global__ kernels, and choose_launch(), the one place that maps a problem to blocks. The
// per-thread work is in ce_thread.cuh. No torch headers (see there): the host emulator
// (tests/cuda_emulation/emu.cu) includes this file as it is, and ce_cuda.cu launches from it.
//
// Two mappings, picked by choose_launch():
//  * "rows" (forward: sC == 1; backward: sC == 1 and D == 1): a group of G threads per row,
//    G in {4, 8, 16, 32} (several rows per 256-thread block, warp-shuffle reduction) or
//    G == blockDim.x in {64 .. 512} (one row per block, shuffle + shared-memory reduction).
//    The row is read with 16-byte vector loads, kUnroll vectors in flight per thread; a
//    scalar head handles the elements before the first 16-byte boundary and a scalar tail
//    the remainder (rows need not be 16-byte aligned).
//  * "tile" (every other stride pattern): a (32, TY) block; lane x takes row
//    blockIdx.x*32 + x, thread-row y takes classes y, y+TY, ... with scalar strided loads.
//    Consecutive lanes are consecutive rows, so the (N, C, D)-contiguous case (sD == 1)
//    and the transposed (N, C) case (sN == 1) read and write coalesced.
// No host synchronisation anywhere; all offsets are int64.
#pragma once

#include "ce_thread.cuh"

namespace nllfused {
namespace cuda_impl {

// ------------------------------------------------------------------------------------------
// Reductions (device only).

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_xor_stats(const Stats<acc_t>& st, int off,
                                                      bool need_t) {
  Stats<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
  o.k = __shfl_xor_sync(0xffffffffu, st.k, off);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
  if (need_t) {
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
  } else {
    o.t = acc_t(0);
    o.w = acc_t(0);
  }
  return o;
}

// Butterfly over aligned groups of `width` lanes (power of two <= 32). Every lane of the
// warp must call it. The result is complete in every lane of the group.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> group_reduce(Stats<acc_t> st, int width, bool need_t) {
  for (int off = width >> 1; off > 0; off >>= 1) st = merge(st, shfl_xor_stats(st, off, need_t));
  return st;
}

// Whole block (blockDim.x a multiple of 32, <= kMaxThreads). Result valid in thread 0.
// Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> block_reduce(Stats<acc_t> st, Stats<acc_t>* red,
                                                    bool need_t) {
  st = group_reduce(st, 32, need_t);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    st = red[0];
    const int nwarps = blockDim.x >> 5;
    for (int i = 1; i < nwarps; ++i) st = merge(st, red[i]);
  }
  __syncthreads();  // red[] is reused by the next row
  return st;
}

// ------------------------------------------------------------------------------------------
// Kernels.

// Rows mapping, forward. G threads per row: G <= 32 (blockDim.x / G rows per block, loop
// trip counts uniform per block so the shuffles see every lane) or G == blockDim.x.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_fwd_rows_kernel(const scalar_t* __restrict__ x,
                       const CEParams<acc_type_t<scalar_t>> p, const int G) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ Stats<acc_t> red[kMaxWarps];
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t rbase = static_cast<int64_t>(blockIdx.x) * rows_per_block; rbase < p.R;
       rbase += step) {
    const int64_t r = rbase + grp;
    Stats<acc_t> st = fwd_rows_thread<scalar_t, tgt_t>(p, x, r, tid, G);
    if (G <= 32) {
      st = group_reduce(st, G, p.need_t);
    } else {
      st = block_reduce(st, red, p.need_t);
    }
    if (r < p.R && tid == 0) fwd_finish<scalar_t, tgt_t>(p, x, r, st);
  }
}

// Tile mapping, forward: block (32, TY); lane = row within the tile, threadIdx.y = class slice.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_fwd_tile_kernel(const scalar_t* __restrict__ x,
                       const CEParams<acc_type_t<scalar_t>> p) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ Stats<acc_t> part[kMaxTileY][32];
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t rbase = static_cast<int64_t>(blockIdx.x) * 32; rbase < p.R; rbase += step) {
    const int64_t r = rbase + lane;
    Stats<acc_t> st = fwd_tile_thread<scalar_t, tgt_t>(p, x, r, ty, TY);
    part[ty][lane] = st;
    __syncthreads();
    if (ty == 0 && r < p.R) {
      for (int k = 1; k < TY; ++k) st = merge(st, part[k][lane]);
      fwd_finish<scalar_t, tgt_t>(p, x, r, st);
    }
    __syncthreads();  // part[][] is reused by the next tile
  }
}

// Rows mapping, backward (D == 1: output row r is out + r*C). No reductions, so groups
// may leave the loop independently.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_bwd_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       const CEParams<acc_type_t<scalar_t>> p, const int G) {
  const int rows_per_block = blockDim.x / G;
  const int grp = threadIdx.x / G;
  const int tid = threadIdx.x % G;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * rows_per_block + grp; r < p.R;
       r += step)
    bwd_rows_thread<scalar_t, tgt_t>(p, x, out, r, tid, G);
}

// Tile mapping, backward: output element (n, c, d) at out + n*C*D + c*D + d.
template <typename scalar_t, typename tgt_t>
__global__ void __launch_bounds__(kMaxThreads)
    ce_bwd_tile_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                       const CEParams<acc_type_t<scalar_t>> p) {
  const int lane = threadIdx.x;
  const int ty = threadIdx.y;
  const int TY = blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * 32;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 32 + lane; r < p.R; r += step)
    bwd_tile_thread<scalar_t, tgt_t>(p, x, out, r, ty, TY);
}

// ------------------------------------------------------------------------------------------
// Launch configuration: the one place that maps a problem to blocks.

struct LaunchConfig {
  bool tile;        // tile mapping (strided) instead of rows mapping
  int G;            // rows mapping: threads per row
  int threads;      // rows mapping: blockDim.x
  int tile_y;       // tile mapping: blockDim.y (blockDim.x == 32)
  int64_t blocks;   // gridDim.x (kernels loop over the rows beyond it)
};

inline LaunchConfig choose_launch(int64_t R, int64_t C, bool rows_ok, int vec) {
  LaunchConfig L{};
  int64_t rows_per_block;
  if (rows_ok) {
    const int64_t nvec = (C + vec - 1) / vec;  // 16-byte vectors per row
    L.tile = false;
    if (nvec <= 32 * kUnroll) {
      // small rows: the fewest threads (>= 4, <= a warp) that take a row in one sweep
      L.G = 4;
      while (L.G < 32 && static_cast<int64_t>(L.G) * kUnroll < nvec) L.G *= 2;
      L.threads = kWarpPathThreads;
    } else {
      // a block per row: 64 .. kMaxThreads threads, one sweep when the row allows
      L.G = 64;
      while (L.G < kMaxThreads && static_cast<int64_t>(L.G) * kUnroll < nvec) L.G *= 2;
      L.threads = L.G;
    }
    rows_per_block = L.threads / L.G;
  } else {
    L.tile = true;
    L.tile_y = 1;
    while (L.tile_y < kMaxTileY && static_cast<int64_t>(L.tile_y) * 32 < C) L.tile_y *= 2;
    rows_per_block = 32;
  }
  const int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  L.blocks = blocks < std::numeric_limits<int32_t>::max() ? blocks
                                                           : std::numeric_limits<int32_t>::max();
  return L;
}

// The launch shapes ce_cuda.cu uses: the rows mapping where the classes are unit-stride (the
// backward's also needs D == 1: its output rows are then contiguous too).
template <typename scalar_t, typename acc_t>
inline LaunchConfig fwd_launch(const CEParams<acc_t>& p) {
  return choose_launch(p.R, p.C, p.sC == 1 || p.C == 1, 16 / static_cast<int>(sizeof(scalar_t)));
}
template <typename scalar_t, typename acc_t>
inline LaunchConfig bwd_launch(const CEParams<acc_t>& p) {
  return choose_launch(p.R, p.C, (p.sC == 1 || p.C == 1) && p.D == 1,
                       16 / static_cast<int>(sizeof(scalar_t)));
}

}  // namespace cuda_impl
}  // namespace nllfused
