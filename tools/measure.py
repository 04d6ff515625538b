"""What the benchmarks, GPU checks and studies measure with: the peak tensor memory of one step, a device sync, and the
seconds of training steps of a job built in this process."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from trainer.config import JobConfig
from trainer.data import SequenceLoader, build_dataset
from trainer.loop import Training, build_training, setup_ranks, train_step

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


def train_step_seconds(job: JobConfig, steps: int, warmup: int) -> tuple[Training, list[float]]:
    """Build the job's training as the trainer does, in this process (one rank), and time `trainer.loop.train_step`
    on the job's own data: the seconds of `steps` steps after `warmup` untimed ones, and the training it built."""
    ranks = setup_ranks(1)
    training = build_training(job, ranks)
    vocab_size = training.model.config.vocab_size
    dataset = build_dataset(job.data.name, job.data.seq_len, vocab_size, job.seed, job.data.options)
    loader = SequenceLoader(dataset, job.data.batch_size, 0, 1)
    seconds = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        train_step(training.step_model, training.optimizer, loader, job, ranks)
        seconds.append(time.perf_counter() - began)
    return training, seconds[warmup:]
