"""Shared timing for the benchmarks: median wall time after a warm-up, CUDA-synchronised, and the CUDA
allocator's peak above what was allocated before the timed runs; on the CPU, the peak of live tensors
during one call from PyTorch's memory profiler."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def measure(fn: Callable[[], object], device: str, repeat: int, absolute: bool = False,
            cpu_memory: bool = False) -> tuple[float, float]:
    """(median ms, peak extra MB) of ``fn()``: on CUDA the allocator's, on the CPU with ``cpu_memory`` the
    memory profiler's (one more, profiled call; else nan). ``absolute``: the peak of all allocated memory
    (for training steps, where what a method keeps between steps belongs to it)."""
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
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = cpu_tensor_peak_mb(fn, absolute) if cpu_memory else float("nan")
    return statistics.median(times), peak


def cpu_tensor_peak_mb(fn: Callable[[], object], absolute: bool = True) -> float:
    """Peak MB of live CPU tensor storage during one ``fn()``: the storages alive before the call (found
    through the garbage collector, each once: parameters, gradients, optimizer state, anything a method
    keeps between steps; left out unless ``absolute``) plus the memory profiler's peak of what the call
    allocates. nan where the
    profiler's memory timeline is not available or cannot follow the call (its data-flow analysis rejects
    some in-place hook patterns, e.g. Opacus's)."""
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
    except ImportError:
        return float("nan")
    gc.collect()
    before = {}
    for obj in gc.get_objects() if absolute else ():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_sparse:
            storage = obj.untyped_storage()
            before[storage.data_ptr()] = storage.nbytes()
    with torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    try:
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    except (AssertionError, RuntimeError, KeyError):
        return float("nan")
    totals = [sum(row) for row in sizes] or [0]
    return (sum(before.values()) + max(totals) - totals[0]) / 2**20


def profile_summary(fn: Callable[[], object], device: str, steps: int = 3, rows: int = 12) -> str:
    """Where ``fn``'s time goes, per call: host time in PyTorch ops, device time and kernel launches (CUDA),
    and the ``rows`` operators with the most self time on the device (CUDA) or host. Tells a launch-bound
    step (host time near or above device time) from a compute-bound one."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()  # the warm-up's kernels stay out of the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in averages) / steps / 1e3
    lines = [f"per call: host {host:.2f} ms in PyTorch ops"]
    key = "self_cpu_time_total"
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("Memcpy", "Memset"))]
        device_ms = sum(e.self_device_time_total for e in averages) / steps / 1e3
        lines[0] += f", device {device_ms:.2f} ms, {len(kernels) / steps:.0f} kernels"
        key = "self_device_time_total"
    lines.append(averages.table(sort_by=key, row_limit=rows, max_name_column_width=48))
    return "\n".join(lines)
