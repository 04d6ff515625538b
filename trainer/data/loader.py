"""Batches for training: which sequences each data-parallel rank reads, and the resumable position."""

from __future__ import annotations

import torch


class SequenceLoader:
    """Batches for one data-parallel rank; every rank of a CP group reads the same sequences."""

    def __init__(self, dataset, batch_size: int, dp_rank: int, dp_size: int):
        self.dataset, self.batch_size, self.dp_rank, self.dp_size = dataset, batch_size, dp_rank, dp_size
        self.consumed = 0  # sequences consumed by the whole job

    def next_batch(self) -> dict[str, torch.Tensor]:
        first = self.consumed + self.dp_rank * self.batch_size
        samples = [self.dataset[first + i] for i in range(self.batch_size)]
        self.consumed += self.batch_size * self.dp_size
        return {key: torch.cat([s[key] for s in samples]) for key in samples[0]}

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
