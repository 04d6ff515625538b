"""Which pieces of the global sequence each rank of a CP group holds (`parallel.load_balance`).

The sequence is cut into P x n equal pieces (n per rank, multiples of the chunk size); a *layout* lists,
per rank, the pieces it holds, and a rank's shard is its pieces concatenated in that order.
- `contiguous` (n = 1): rank r holds piece r.
- `headtail` (n = 2): rank r holds pieces r and 2P-1-r, so every rank gets one early and one late
  piece: causal attention work is even across ranks for one long document.
- `work` (n = 8): per batch, the pieces go to the ranks by their attention work (longest-processing-time
  first, n pieces each), from the documents' positions. In a packed batch most attention work sits in
  its few long documents, which no fixed layout spreads evenly.

Code that spans ranks (attention, halos, the fast-weight state scan) works on pieces in sequence order;
`CPGroup` is the handle it gets: the process group, its load balance and the current layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LOAD_BALANCES = ("headtail", "contiguous", "work")
Layout = tuple[tuple[int, ...], ...]  # per rank, the pieces it holds in shard order
_PIECES_PER_RANK = {"contiguous": 1, "headtail": 2, "work": 8}  # work: 8 pieces bring max/mean under 1.05


def pieces_per_rank(load_balance: str) -> int:
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"parallel.load_balance must be one of {', '.join(LOAD_BALANCES)}, got {load_balance!r}")
    return _PIECES_PER_RANK[load_balance]


def fixed_layout(size: int, load_balance: str) -> Layout:
    """The layout that does not depend on the batch (`work` before its first batch: contiguous runs)."""
    n = pieces_per_rank(load_balance)
    if load_balance == "headtail":
        return tuple((rank, 2 * size - 1 - rank) for rank in range(size))
    return tuple(tuple(range(rank * n, (rank + 1) * n)) for rank in range(size))


def work_layout(position_ids: torch.Tensor, size: int, per_rank: int) -> Layout:
    """Pieces to ranks by causal attention work: a token at position p of its document attends p + 1
    keys. Longest-processing-time first under a count limit (every rank gets `per_rank` pieces); ties go
    to the lower rank, so every rank computes the same layout from the same positions."""
    count = size * per_rank
    work = (position_ids.reshape(-1, position_ids.shape[-1]).double() + 1).sum(0)
    piece_work = work.reshape(count, -1).sum(1).tolist()
    loads, held = [0.0] * size, [[] for _ in range(size)]
    for piece in sorted(range(count), key=lambda p: (-piece_work[p], p)):
        rank = min((r for r in range(size) if len(held[r]) < per_rank), key=lambda r: (loads[r], r))
        loads[rank] += piece_work[piece]
        held[rank].append(piece)
    return tuple(tuple(sorted(pieces)) for pieces in held)


def batch_layout(load_balance: str, size: int, position_ids: torch.Tensor) -> Layout:
    """The layout of a batch with these global (B, S) positions over `size` ranks."""
    if load_balance == "work":
        return work_layout(position_ids, size, pieces_per_rank(load_balance))
    return fixed_layout(size, load_balance)


class CPGroup:
    """A CP process group and how the sequence is laid out over it (`arrange` sets the layout of a batch).
    `overlap`: the fast-weight state scan's messages fly while the local chunk scan runs (`parallel.state_scan`)."""

    def __init__(self, group, load_balance: str = "contiguous", overlap: bool = False) -> None:
        self.group = group
        self.load_balance = load_balance
        self.overlap = overlap
        self.per_rank = pieces_per_rank(load_balance)
        self._layout: Layout | None = None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def count(self) -> int:
        """Pieces of the whole sequence."""
        return self.size * self.per_rank

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = fixed_layout(self.size, self.load_balance)
        return self._layout

    def arrange(self, position_ids: torch.Tensor) -> Layout:
        """The layout of the batch with these global (B, S) positions, kept for its forward and backward."""
        if self.load_balance == "work":
            self._layout = work_layout(position_ids, self.size, self.per_rank)
        return self.layout

    def pieces(self, rank: int | None = None) -> tuple[int, ...]:
        return self.layout[self.rank if rank is None else rank]

    def owner(self, piece: int) -> tuple[int, int]:
        """(rank, slot in that rank's shard) of a piece."""
        rank = next(r for r, pieces in enumerate(self.layout) if piece in pieces)
        return rank, self.layout[rank].index(piece)


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
