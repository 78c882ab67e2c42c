"""Shared timing for the benchmarks: median wall time after a warm-up, CUDA-synchronised, and the CUDA
allocator's peak above what was allocated before the timed runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def measure(fn: Callable[[], object], device: str, repeat: int, absolute: bool = False) -> tuple[float, float]:
    """(median ms, peak extra MB on CUDA or nan) of ``fn()``; ``absolute``: the peak of all allocated
    memory (for training steps, where what a method keeps between steps belongs to it)."""
    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = 0 if absolute else torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return statistics.median(times), peak
