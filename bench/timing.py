"""Median wall time of a call, and the copy bandwidth the GB/s figures are compared with.

GPU: triton.testing.do_bench (warm-up, then repeats for ~100 ms, L2 flushed between repeats,
CUDA events, median), or a CUDA-event loop where triton is missing.
CPU: time.perf_counter around each call, after warm-up calls; repeats until both a minimum
count and a minimum total time are reached; median.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class CpuPolicy:
    warmup: int = 1
    min_repeats: int = 3
    min_seconds: float = 1.0
    max_repeats: int = 100


QUICK_CPU_POLICY = CpuPolicy(warmup=1, min_repeats=3, min_seconds=0.2, max_repeats=50)
SMOKE_CPU_POLICY = CpuPolicy(warmup=1, min_repeats=2, min_seconds=0.0, max_repeats=2)


def method(device: torch.device, policy: CpuPolicy) -> str:
    if device.type == "cuda":
        if _do_bench() is not None:
            return ("triton.testing.do_bench: warm-up 25 ms, repeats for 100 ms with the L2 "
                    "cache flushed between them, median of CUDA-event times")
        return "CUDA events: 10 warm-up calls, then 50 timed, median"
    return (f"time.perf_counter: {policy.warmup} warm-up call(s), then at least "
            f"{policy.min_repeats} calls and {policy.min_seconds:g} s, median; vs torch: each "
            f"provider timed in alternating blocks with torch (a warm-up and 2 timed calls "
            f"each; paired medians), so the machine's drift cancels in the ratio")


def _do_bench():
    try:
        from triton.testing import do_bench
    except Exception:
        return None
    return do_bench


def median_ms(fn: Callable, device: torch.device, policy: CpuPolicy = CpuPolicy()) -> float:
    """Median time of fn() in milliseconds (fn's result is discarded each time)."""
    if device.type == "cuda":
        return _cuda_median_ms(fn)
    for _ in range(policy.warmup):
        fn()
    times = []
    start = time.perf_counter()
    while (len(times) < policy.min_repeats
           or time.perf_counter() - start < policy.min_seconds) and len(times) < policy.max_repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_median_ms(fn: Callable, ref: Callable, policy: CpuPolicy = CpuPolicy(),
                     block: int = 2) -> tuple:
    """CPU: (median ms of fn, median ms of ref), timed in alternating blocks.

    A shared machine's speed drifts by tens of percent over a minute; timing a provider and
    torch in turn, rather than one after the other, puts the same drift in both medians, so
    their ratio holds. Each block starts with an untimed call: right after the other function
    has freed its memory, the first call pays page faults that steady use does not."""
    times, ref_times = [], []
    start = time.perf_counter()
    while len(times) < policy.max_repeats and (
            len(times) < policy.min_repeats
            or time.perf_counter() - start < 2 * policy.min_seconds):
        for f, out in ((fn, times), (ref, ref_times)):
            for _ in range(max(1, policy.warmup)):
                f()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                out.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, statistics.median(ref_times) * 1e3


def _cuda_median_ms(fn: Callable) -> float:
    do_bench = _do_bench()
    if do_bench is not None:
        try:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # older triton: no return_mode
            return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])
    for _ in range(10):
        fn()
    times = []
    for _ in range(50):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, policy: CpuPolicy = CpuPolicy()) -> float:
    """GB/s of a large same-device tensor copy, counting the read and the write (the copy
    bandwidth of docs/maths.md, "Bytes")."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, policy)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9
