"""Preemption signals: SIGTERM / SIGUSR1 (Slurm sends them before killing a job), and a submitit job's own
signal (trainer/cluster.py), ask the loop to save a checkpoint and exit cleanly after the current step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, extra_signals: tuple[signal.Signals, ...] = ()):
        self.received: int | None = None
        # The handlers the flag takes the signals from: a scheduler's gets its signal once the checkpoint is saved.
        self.displaced = {sig: signal.signal(sig, self._handle) for sig in (*self.SIGNALS, *extra_signals)}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (all ranks must stop at the same step)."""
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)
