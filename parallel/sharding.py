"""Split one batch of long sequences into contiguous per-rank shards of a CP group.

Labels are shifted *before* sharding, so the last token of a shard still predicts the first token of
the next one; position ids stay global (positions inside each document), so document starts and
chunk boundaries are found the same way on every rank.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: a document starts at index 0 and wherever positions break their +1 steps (the
    padding-free packing rule of transformers)."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start


def next_token_labels(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """labels[t] = input_ids[t+1] within a document; IGNORE_INDEX at each document's last token."""
    position_ids = position_ids.expand_as(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(document_starts(position_ids)[:, 1:], IGNORE_INDEX, input_ids[:, 1:])
    return labels


def shard(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The contiguous `cp_rank`-th of `cp_size` equal slices along `dim`."""
    length = tensor.shape[dim]
    if length % cp_size:
        raise ValueError(f"sequence length {length} is not divisible by parallel.cp={cp_size}")
    size = length // cp_size
    return tensor.narrow(dim, cp_rank * size, size)


def shard_batch(batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int) -> dict[str, torch.Tensor]:
    """Shard every (B, S, ...) tensor of a batch that already holds `labels` and `position_ids`."""
    return {
        key: shard(value.expand(batch["input_ids"].shape[0], -1) if key == "position_ids" else value, cp_rank, cp_size)
        for key, value in batch.items()
    }
