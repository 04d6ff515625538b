"""What a training step reports beyond its loss, for a user watching a long run: where its time went, its
throughput and MFU, the CUDA allocator's view of memory; the torch profiler over chosen steps; and an out-of-memory
step explained in one line.

The model FLOPs are the step-time model's count (`trainer.planning.step_time.model_flops`: 6 N S + 6 L H hd S^2
per sequence, no recomputation), the peak the one GPU table's (`trainer.planning.hardware`); a CPU, or a GPU the
table lacks, has no MFU.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from trainer.config import JobConfig
from trainer.planning.hardware import GPUS, gpu_of_device
from trainer.planning.memory import GIB, ModelFacts, plan, setup_of
from trainer.planning.step_time import model_flops_per_gpu

PHASES = ("data", "forward_backward", "optimizer", "checkpoint", "eval")  # metrics.jsonl: time/<phase>_s


class StepClock:
    """Wall seconds per phase of one optimizer step. On CUDA each phase ends with a synchronize, so that a phase is
    charged the GPU work it launched (a handful of syncs per step: the loss's all-reduce syncs anyway)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - began

    def record(self) -> dict[str, float]:
        return {f"time/{name}_s": seconds for name, seconds in self.seconds.items()}


class Throughput:
    """Tokens/s and TFLOP/s per GPU, and MFU where the GPU's peak is known, of one optimizer step."""

    def __init__(self, job: JobConfig, facts: ModelFacts, world: int, device: torch.device):
        self.world = world
        self.flops = model_flops_per_gpu(facts, setup_of(job, world, device.type))  # per GPU and optimizer step
        kind = gpu_of_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.peak = GPUS[kind].peak_flops if kind else None

    def record(self, tokens_per_step: int, train_s: float) -> dict[str, float]:
        """From the step's training time (data, forward + backward, optimizer; not its evaluation or checkpoint)."""
        achieved = self.flops / train_s
        figures = {"tokens_per_s_per_gpu": tokens_per_step / self.world / train_s, "tflops_per_gpu": achieved / 1e12}
        if self.peak is not None:
            figures["mfu"] = achieved / self.peak
        return figures


def memory_record(device: torch.device) -> dict[str, int]:
    """The CUDA allocator's peaks since the run started and how often it had to free its cache and retry."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"cuda/max_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
            "cuda/max_reserved_bytes": stats.get("reserved_bytes.all.peak", 0),
            "cuda/alloc_retries": stats.get("num_alloc_retries", 0)}  # fmt: skip


class StepProfiler:
    """`train.profile.steps=[a, b]`: the torch profiler over optimizer steps a..b (a Chrome/Perfetto trace per rank in
    RUN/profile/) and, on CUDA, the allocator's memory history over the same steps (a snapshot for
    https://pytorch.org/memory_viz). Inert when no steps are asked for."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank, self.device = steps, rank, device
        self.folder = run_dir / "profile"
        self.profiler = None

    def before(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs."""
        if self.steps is None or step != self.steps[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def after(self, step: int) -> dict[str, str]:
        """Called after optimizer step `step`; at the last profiled step, writes the files and returns their paths."""
        if self.profiler is None or step != self.steps[1]:
            return {}
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        span = f"steps{self.steps[0]}-{self.steps[1]}-rank{self.rank}"
        written = {"profile/trace": str(self.folder / f"trace-{span}.json")}
        profiler.export_chrome_trace(written["profile/trace"])
        if self.device.type == "cuda":
            written["profile/memory"] = str(self.folder / f"memory-{span}.pickle")
            torch.cuda.memory._dump_snapshot(written["profile/memory"])
            torch.cuda.memory._record_memory_history(enabled=None)
        for path in written.values():
            print(f"profile: {path}", file=sys.stderr)
        return written


class StepOutOfMemory(RuntimeError):
    """A step ran out of GPU memory; the message is one line saying where and what to change."""


def out_of_memory_line(job: JobConfig, facts: ModelFacts, world: int, step: int, checkpoint_every: int | None) -> str:
    """The step, the sequence length, what the memory planner expected of this job on this GPU, and what to change."""
    setup = replace(setup_of(job, world, "cuda"), checkpointing=checkpoint_every is not None,
                    checkpoint_every=checkpoint_every or 1)  # fmt: skip
    planned = plan(facts, setup).total / GIB
    if torch.cuda.is_available():
        capacity = f" of {torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB:.1f} GiB"
    else:  # a simulated OOM (tests)
        capacity = ""
    changes = []
    if checkpoint_every is None:
        changes.append("train.activation_checkpointing=true")
    elif checkpoint_every > 1:
        changes.append("train.checkpoint_every_n_layers=1")
    changes.append(f"parallel.cp={2 * job.parallel.cp} (with 2x the GPUs)")
    if job.data.batch_size > 1:
        changes.append(f"data.batch_size={job.data.batch_size // 2}")
    return (
        f"CUDA out of memory in optimizer step {step} (data.seq_len={job.data.seq_len}, parallel.cp={job.parallel.cp}, "
        f"{world} GPU(s)); the memory planner expected {planned:.1f} GiB per GPU{capacity}; "
        f"try {' or '.join(changes)} (ttt-plan memory shows what each needs)"
    )
