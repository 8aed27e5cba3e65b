// A small cache of the CPU ops' large output buffers (the per-row outputs and the gradient).
//
// glibc serves buffers of more than its mmap threshold (128 KiB at first, at most 32 MiB) with a
// fresh mmap and unmaps them on free, and trims the top of its heap when much of it is free. So a
// large output is, call after call, fresh memory whose every 4 KiB page faults on first touch: on
// the 2-core AMD EPYC machine of the CPU benchmark, the forward at (8, 4, 512, 512) fp32 took
// 7 ms with its 32 MiB of per-row outputs already mapped and 28 ms right after torch's own call
// had freed its buffers. Huge pages would cut the faults, but on that machine (a VM) a fresh huge
// page now and then takes 5-10x longer still (see prefer_huge_pages in ce_cpu.cpp).
//
// Here a freed output of at least kMinBytes goes back into this cache, up to a cap on the idle
// bytes it holds (NLLFUSED_CPU_CACHE_MB, default 1024; 0 turns the cache off), and the next
// output of exactly that size reuses it, its pages mapped already. Handing out and taking back
// are reported to torch's memory profiler as allocations and frees, so profiles (and the
// benchmark's memory column) see the tensors' lifetimes, as with torch's own allocator.
// nllfused._C.cpu_cache_info() / cpu_cache_empty() show and release what the cache holds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>

namespace nllfused_cpu {

// An uninitialised contiguous CPU tensor, from the cache where its bytes are kMinBytes or more.
at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// {"idle_bytes", "idle_blocks", "cap_bytes", "hits", "misses"}
std::map<std::string, int64_t> cache_info();

// Frees every idle block.
void cache_empty();

}  // namespace nllfused_cpu
