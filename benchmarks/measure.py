"""Measurements shared by the benchmark scripts."""

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory(run: Callable[[], object], device: str) -> int:
    """Bytes: the high-water mark of the tensors allocated while `run()` runs, on top of what already existed.

    On CUDA from the allocator's statistics; on the CPU from the profiler's allocation events, replayed in order.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        running += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak
