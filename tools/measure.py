"""What the benchmarks and GPU checks measure with: the peak tensor memory of one step, and a device sync."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_cpu_tensor_bytes(step: Callable[[], None]) -> int:
    """The most bytes CPU tensors held above the start while the step ran, from the profiler's record of every
    allocation and free (the allocator's view, as CUDA's peak counter: no code pages, no glibc caching)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        if event.device_type() == DeviceType.CPU:
            live += event.nbytes()  # negative for a free
            peak = max(peak, live)
    return peak


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Tensor bytes the step needs above what is held before it."""
    if device.type != "cuda":
        return _peak_cpu_tensor_bytes(step)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
