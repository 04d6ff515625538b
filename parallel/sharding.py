"""Split one batch of long sequences into per-rank shards of a CP group (`parallel.pieces` says which
pieces of the sequence each rank holds: a load balance's fixed layout, or a batch's `work` layout).

Labels are shifted *before* sharding, so the last token of a shard still predicts the first token of
the next one; position ids stay global (positions inside each document), so document starts and
chunk boundaries are found the same way on every rank.
"""

from __future__ import annotations

import torch

from parallel.pieces import Layout, fixed_layout

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


def _layout(cp_size: int, load_balance: str | Layout) -> Layout:
    return fixed_layout(cp_size, load_balance) if isinstance(load_balance, str) else load_balance


def shard(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1, load_balance: str | Layout = "contiguous"):
    """This rank's pieces of `tensor` along `dim`, concatenated in shard order. `load_balance`: a name
    (its fixed layout) or a layout (`CPGroup.layout`)."""
    layout = _layout(cp_size, load_balance)
    length, count = tensor.shape[dim], sum(len(pieces) for pieces in layout)
    if length % count:
        raise ValueError(f"sequence length {length} is not divisible into {count} pieces (parallel.cp={cp_size})")
    size = length // count
    parts = [tensor.narrow(dim, piece * size, size) for piece in layout[cp_rank]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(shards: list[torch.Tensor], load_balance: str | Layout = "contiguous", dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (rank order): the inverse of `shard`."""
    layout = _layout(len(shards), load_balance)
    pieces = {}
    for held, part in zip(layout, shards, strict=True):
        pieces.update(zip(held, part.chunk(len(held), dim=dim)))
    return torch.cat([pieces[i] for i in range(len(pieces))], dim=dim)


def shard_batch(
    batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int, load_balance: str | Layout = "contiguous"
) -> dict[str, torch.Tensor]:
    """Shard every (B, S, ...) tensor of a batch that already holds `labels` and `position_ids`."""
    rows = batch["input_ids"].shape[0]
    return {
        key: shard(value.expand(rows, -1) if key == "position_ids" else value, cp_rank, cp_size, 1, load_balance)
        for key, value in batch.items()
    }
