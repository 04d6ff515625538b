"""Which pieces of the global sequence each rank of a CP group holds (`parallel.load_balance`).

- `contiguous`: the sequence is cut into P pieces; rank r holds piece r.
- `headtail`: the sequence is cut into 2P pieces; rank r holds pieces r and 2P-1-r, so every rank
  gets one early and one late piece and causal attention work is even across ranks.

A rank's shard is its pieces concatenated in this order. Code that spans ranks (attention, halos,
the fast-weight state scan) works on pieces in sequence order; `CPGroup` is the handle it gets: the
process group and its load balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

LOAD_BALANCES = ("headtail", "contiguous")


def pieces_per_rank(load_balance: str) -> int:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"parallel.load_balance must be one of {', '.join(LOAD_BALANCES)}, got {load_balance!r}")
    return 2 if load_balance == "headtail" else 1


def pieces_of(rank: int, size: int, load_balance: str) -> tuple[int, ...]:
    """Indices (in sequence order) of the pieces rank `rank` of `size` holds, in shard order."""
    return (rank, 2 * size - 1 - rank) if pieces_per_rank(load_balance) == 2 else (rank,)


@dataclass(frozen=True)
class CPGroup:
    """A CP process group and how the sequence is laid out over it."""

    group: object
    load_balance: str = "contiguous"

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def per_rank(self) -> int:
        return pieces_per_rank(self.load_balance)

    @property
    def count(self) -> int:
        """Pieces of the whole sequence."""
        return self.size * self.per_rank

    def pieces(self, rank: int | None = None) -> tuple[int, ...]:
        return pieces_of(self.rank if rank is None else rank, self.size, self.load_balance)

    def owner(self, piece: int) -> tuple[int, int]:
        """(rank, slot in that rank's shard) of a piece."""
        rank = piece if piece < self.size else self.count - 1 - piece
        return rank, self.pieces(rank).index(piece)


def as_cp_group(group) -> CPGroup:
    """A raw process group means contiguous shards."""
    return group if isinstance(group, CPGroup) else CPGroup(group)


def fold(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """(B, n L, ...) shard -> (B n, L, ...) piece rows: a piece never continues into the next slot."""
    return x.reshape(x.shape[0] * cp.per_rank, x.shape[1] // cp.per_rank, *x.shape[2:])


def unfold(x: torch.Tensor, cp: CPGroup) -> torch.Tensor:
    """The inverse of `fold`."""
    return x.reshape(x.shape[0] // cp.per_rank, x.shape[1] * cp.per_rank, *x.shape[2:])


def piece_edges(cp: CPGroup, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B n,) bools per piece row: a piece precedes it in the sequence; one follows it."""
    pieces = torch.tensor(cp.pieces()).repeat(batch)
    return pieces > 0, pieces < cp.count - 1
