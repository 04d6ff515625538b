"""Where documents and fast-weight chunks start inside a (possibly packed) batch of sequences.

Documents are signalled the way transformers does for padding-free packing: `position_ids` count
positions inside each document and restart at each document start (any break in `+1` steps starts a
document). Chunk c of a document covers its positions [cC, (c+1)C), so a chunk starts wherever
`position % C == 0` or a document starts. A *segment* is the part of one (document, chunk) pair that
lies in this sequence; the chunk scan walks segments in order.

Under context parallelism a sequence is one shard of a longer one: its first token may continue a
document (and a chunk) begun on the previous rank, and its last chunk may continue on the next rank.
`continues_before` / `continues_after` say so; the shard's positions stay global within each document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from parallel.sharding import document_starts


class Segment(NamedTuple):
    start: int  # first position of the segment in the sequence
    end: int  # one past its last position
    resets: bool  # begins a new document: the fast-weight state before it is dropped
    closes: bool  # its chunk ends inside this sequence, so its write is committed at its end


@dataclass(frozen=True)
class RowGroup:
    """Batch rows that share one segment structure, scanned together."""

    rows: slice
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class ChunkLayout:
    position_ids: torch.Tensor  # (B, S) position of each token inside its document
    doc_start: torch.Tensor  # (B, S) bool: a document starts here
    segment_ids: torch.Tensor  # (B, S) long: tokens of one segment share an id, increasing along S
    groups: tuple[RowGroup, ...]  # host-side segment plans for the scan

    @property
    def next_in_doc(self) -> torch.Tensor:
        """(B, S) bool: the next token exists in this sequence and belongs to the same document."""
        nxt = torch.zeros_like(self.doc_start)
        nxt[:, :-1] = ~self.doc_start[:, 1:]
        return nxt

    @functools.cached_property
    def segment_table(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The segment plans as kernels read them, on the layout's device, built once per layout (every layer
        of a forward shares it): an int32 (groups, n, 3) table of (start, end, flags: 1 resets | 2 closes), the
        number of segments of each group, and the row stride into them (0: all rows share one plan, 1: a plan
        per row)."""
        width = max(len(group.segments) for group in self.groups)
        table = torch.zeros(len(self.groups), width, 3, dtype=torch.int32)
        for row, group in enumerate(self.groups):
            table[row, : len(group.segments)] = torch.tensor(
                [(s.start, s.end, s.resets + 2 * s.closes) for s in group.segments], dtype=torch.int32
            )
        counts = torch.tensor([len(group.segments) for group in self.groups], dtype=torch.int32)
        device = self.position_ids.device
        return table.to(device), counts.to(device), int(len(self.groups) > 1)


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at each change of document id along the last dimension."""
    ids = document_ids.reshape(-1, document_ids.shape[-1])
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    index = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    last_start = torch.where(start, index, torch.zeros_like(index)).cummax(dim=-1).values
    return (index - last_start).reshape(document_ids.shape)


def build_layout(
    position_ids: torch.Tensor,
    chunk_size: int,
    batch_size: int | None = None,
    continues_before: bool | torch.Tensor = False,
    continues_after: bool | torch.Tensor = False,
) -> ChunkLayout:
    """Layout of documents and chunk segments for `position_ids` of shape (B, S) or (1, S).

    `continues_before` / `continues_after`: for all rows, or per row as a (B,) bool tensor (the pieces
    of a head-tail shard continue on different sides)."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if batch_size is not None and position_ids.shape[0] != batch_size:
        position_ids = position_ids.expand(batch_size, -1)
    pos = position_ids
    doc_start = document_starts(pos)
    before = torch.as_tensor(continues_before, device=pos.device).expand(pos.shape[0])
    after = torch.as_tensor(continues_after).expand(pos.shape[0]).tolist()
    doc_start[:, 0] &= ~before | (pos[:, 0] == 0)  # a continued first token starts a document only at position 0
    seg_start = doc_start | (pos % chunk_size == 0)
    seg_start[:, 0] = True
    segment_ids = seg_start.long().cumsum(dim=-1) - 1

    # One host sync per forward: the scan needs segment bounds as Python ints.
    seg_cpu, doc_cpu, last_pos = seg_start.cpu(), doc_start.cpu(), pos[:, -1].cpu()
    uniform = bool(
        (seg_cpu == seg_cpu[0]).all()
        and (doc_cpu == doc_cpu[0]).all()
        and (last_pos == last_pos[0]).all()
        and len(set(after)) == 1
    )
    rows = [slice(None)] if uniform else [slice(b, b + 1) for b in range(pos.shape[0])]
    groups = []
    for row in rows:
        b = 0 if row.start is None else row.start
        starts = seg_cpu[b].nonzero().flatten().tolist()
        ends = starts[1:] + [pos.shape[1]]
        last_closes = not after[b] or int(last_pos[b] + 1) % chunk_size == 0
        segments = tuple(
            Segment(s, e, bool(doc_cpu[b, s]), last_closes if i == len(starts) - 1 else True)
            for i, (s, e) in enumerate(zip(starts, ends))
        )
        groups.append(RowGroup(row, segments))
    return ChunkLayout(pos, doc_start, segment_ids, tuple(groups))


def document_spans(positions: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each document in one row of position ids (plain loop, for references)."""
    starts = [0] + [t for t in range(1, len(positions)) if positions[t] != positions[t - 1] + 1]
    return list(zip(starts, starts[1:] + [len(positions)]))


def single_document_layout(batch_size: int, seq_len: int, chunk_size: int, device=None) -> ChunkLayout:
    """Each row is one document starting at position 0."""
    pos = torch.arange(seq_len, device=device).unsqueeze(0)
    return build_layout(pos, chunk_size, batch_size=batch_size)
