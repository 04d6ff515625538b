"""The torch chunk scan (the CPU path and the reference of the Triton kernels' plan): O(1) d x h states per row,
accumulated in fp32 (fp64 for fp64 inputs); its backward recomputes the states with a second forward walk and runs
the reverse scan for the state gradients, so no per-chunk weight is ever stored. Beside it, the layout-driven
pieces of the normalized write and of context parallelism: the gate mass's prefix sums (`chunk_sum`), the state a
sequence leaves (`state_transfer`) and what an incoming state adds (`read_incoming_state`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from trainer.ops.fastweight.inputs import check_scan_inputs
from trainer.ops.fastweight.layout import ChunkLayout, RowGroup, Segment
from trainer.ops.fastweight.write import accumulation_dtype, clip_delta


def torch_chunk_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout,
    lr: float,
    clip: float | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunk_scan` on the torch loop: the fast output (B, S, d) in z's dtype and the final (committed, pending)."""
    check_scan_inputs(z, v, layout, state)
    return _ChunkScan.apply(z, v, *(state or (None, None)), layout.groups, lr, clip)


def chunk_sum(v: torch.Tensor, layout: ChunkLayout) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`chunk_scan` with a key of 1 (z all ones, h = 1) and lr 1, as the normalized write's gate mass runs it:
    each token reads the sum of the values of the earlier chunks of its document in this sequence. That is a
    difference of two prefix sums (at its segment's start and at its document's start), so a few vectorized
    ops replace the walk whatever the number of chunks; the sums run in fp64, so that the difference of two
    long sums keeps the precision of a short one. Returns the read (B, S, d) in v's dtype and the final
    (committed, pending) state, (B, d, 1) each in the accumulation dtype."""
    batch, seq, d = v.shape
    index = torch.arange(seq, device=v.device).expand(batch, seq)
    segment_start = torch.ones_like(layout.doc_start)
    segment_start[:, 1:] = layout.segment_ids[:, 1:] != layout.segment_ids[:, :-1]
    segment_first = torch.where(segment_start, index, 0).cummax(dim=1).values
    document_first = torch.where(layout.doc_start, index, 0).cummax(dim=1).values  # 0: begun before the row
    sums = torch.nn.functional.pad(v.to(torch.float64).cumsum(dim=1), (0, 0, 1, 0))  # sums[t]: tokens before t

    def sums_before(first: torch.Tensor) -> torch.Tensor:
        return sums.gather(1, first.unsqueeze(-1).expand(-1, -1, d))

    out = (sums_before(segment_first) - sums_before(document_first)).to(v.dtype)
    committed, pending = state_transfer(torch.ones_like(v[..., :1]), v, layout, 1.0)
    return out, (committed, pending)


def _initial_state(tensor, rows, batch, d, h, like, dtype):
    if tensor is None:
        return like.new_zeros(batch, d, h, dtype=dtype)
    return tensor[rows].to(dtype).clone()


def _walk(
    z, v, committed, pending, segments: Sequence[Segment], lr, clip
) -> Iterator[tuple[Segment, torch.Tensor | None]]:
    """Run the state recurrence in place, yielding each segment with the committed state it reads
    (None when that state is known to be zero). `committed`/`pending` hold the final state after."""
    acc = committed.dtype
    reads_zero, pending_zero = False, False
    for seg in segments:
        if seg.resets:
            committed.zero_()
            pending.zero_()
            reads_zero, pending_zero = True, True
        yield seg, None if reads_zero else committed
        zc, vc = z[:, seg.start : seg.end].to(acc), v[:, seg.start : seg.end].to(acc)
        if seg.closes and clip is None and pending_zero:
            committed.baddbmm_(vc.mT, zc, alpha=lr)  # the common case, without temporaries
        elif seg.closes:
            write = torch.baddbmm(pending, vc.mT, zc, alpha=lr)  # the chunk's earlier part + this segment
            committed.add_(write if clip is None else clip_delta(write, clip))
            pending.zero_()
        else:
            pending.baddbmm_(vc.mT, zc, alpha=lr)
        reads_zero = reads_zero and not seg.closes
        pending_zero = seg.closes


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, v, committed_in, pending_in, groups: tuple[RowGroup, ...], lr, clip):
        batch, seq, h = z.shape
        d = v.shape[-1]
        acc = accumulation_dtype(z.dtype)
        out = z.new_zeros(batch, seq, d, dtype=acc)
        committed_out = z.new_empty(batch, d, h, dtype=acc)
        pending_out = z.new_empty(batch, d, h, dtype=acc)
        for group in groups:
            zg, vg, og = z[group.rows], v[group.rows], out[group.rows]
            committed = _initial_state(committed_in, group.rows, zg.shape[0], d, h, z, acc)
            pending = _initial_state(pending_in, group.rows, zg.shape[0], d, h, z, acc)
            for seg, state in _walk(zg, vg, committed, pending, group.segments, lr, clip):
                if state is not None:
                    torch.bmm(zg[:, seg.start : seg.end].to(acc), state.mT, out=og[:, seg.start : seg.end])
            committed_out[group.rows] = committed
            pending_out[group.rows] = pending
        ctx.save_for_backward(z, v, committed_in, pending_in)
        ctx.groups, ctx.lr, ctx.clip = groups, lr, clip
        return out.to(z.dtype), committed_out, pending_out

    @staticmethod
    def backward(ctx, g_out, g_committed, g_pending):
        if ctx.clip is not None:
            raise RuntimeError("ttt.clip is an inference-time option; the chunk scan has no backward with clip")
        z, v, committed_in, pending_in = ctx.saved_tensors
        groups, lr = ctx.groups, ctx.lr
        batch, seq, h = z.shape
        d = v.shape[-1]
        acc = accumulation_dtype(z.dtype)
        gz = torch.zeros(batch, seq, h, dtype=acc, device=z.device)
        gv = torch.zeros(batch, seq, d, dtype=acc, device=z.device)
        g_committed_in = z.new_zeros(batch, d, h, dtype=acc)
        g_pending_in = z.new_zeros(batch, d, h, dtype=acc)
        for group in groups:
            zg, vg, gog = z[group.rows], v[group.rows], g_out[group.rows]
            gzg, gvg = gz[group.rows], gv[group.rows]
            # Pass 1, forward: the read O = Z D^T sends gO D to Z; recompute D on the way.
            committed = _initial_state(committed_in, group.rows, zg.shape[0], d, h, z, acc)
            pending = _initial_state(pending_in, group.rows, zg.shape[0], d, h, z, acc)
            for seg, state in _walk(zg, vg, committed, pending, group.segments, lr, None):
                if state is not None:
                    gzg[:, seg.start : seg.end].baddbmm_(gog[:, seg.start : seg.end].to(acc), state)
            # Pass 2, reverse: state gradients flow from later segments to earlier ones.
            g_c = g_committed[group.rows].to(acc).clone()
            g_p = g_pending[group.rows].to(acc).clone()
            for seg in reversed(group.segments):
                sl = slice(seg.start, seg.end)
                zc, vc, goc = zg[:, sl].to(acc), vg[:, sl].to(acc), gog[:, sl].to(acc)
                g_write = g_c if seg.closes else g_p
                torch.bmm(zc, g_write.mT, out=gvg[:, sl])
                gvg[:, sl].mul_(lr)
                gzg[:, sl].baddbmm_(vc, g_write, alpha=lr)
                if seg.closes:
                    g_p.copy_(g_c)  # the pending part entering a closing chunk lands in committed
                g_c.baddbmm_(goc.mT, zc)
                if seg.resets:
                    g_c.zero_()
                    g_p.zero_()
            g_committed_in[group.rows] = g_c
            g_pending_in[group.rows] = g_p
        return (
            gz.to(z.dtype),
            gv.to(v.dtype),
            None if committed_in is None else g_committed_in.to(committed_in.dtype),
            None if pending_in is None else g_pending_in.to(pending_in.dtype),
            None,
            None,
            None,
        )


def state_transfer(
    z: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (committed, pending) state a sequence scanned from zero leaves, `chunk_scan`'s final state,
    without its reads: under CP it is what the next pieces need, so it is computed first and sent while
    the local scan runs. Only the last document writes into it: its closed chunks (committed) and the
    chunk still open at the end (pending), one product each."""
    acc = accumulation_dtype(z.dtype)
    shape = (z.shape[0], v.shape[-1], z.shape[-1])
    committed, pending = z.new_zeros(shape, dtype=acc), z.new_zeros(shape, dtype=acc)
    for group in layout.groups:
        segments = group.segments
        first = max((i for i, seg in enumerate(segments) if seg.resets), default=0)
        closing = [seg.end for seg in segments[first:] if seg.closes]
        start, split = segments[first].start, closing[-1] if closing else segments[first].start
        zg, vg = z[group.rows].to(acc), v[group.rows].to(acc)
        committed[group.rows] = lr * (vg[:, start:split].mT @ zg[:, start:split])
        pending[group.rows] = lr * (vg[:, split:].mT @ zg[:, split:])
    return committed, pending


def read_incoming_state(
    z: torch.Tensor, layout: ChunkLayout, committed: torch.Tensor, pending: torch.Tensor
) -> torch.Tensor:
    """What a (committed, pending) state entering the sequence adds to the fast output, (B, S, d).

    `chunk_scan` is linear in its starting state, so a shard scanned from zero plus this read equals
    the shard scanned from the state: the tokens of the document that continues into the shard read
    `committed`, and those after its first segment's chunk closes read `pending` too.
    """
    acc = committed.dtype
    out = torch.zeros(*z.shape[:-1], committed.shape[1], dtype=acc, device=z.device)
    for group in layout.groups:
        first = group.segments[0]
        doc_end = 0 if first.resets else next((seg.start for seg in group.segments if seg.resets), z.shape[1])
        pending_from = min(first.end, doc_end) if first.closes else doc_end
        # Empty slices still join the graph: every rank of a CP group must run the same backward
        # collectives in the same order, whatever its documents look like.
        zg = z[group.rows, :doc_end].to(acc)
        out[group.rows, :doc_end] = zg @ committed[group.rows].mT
        out[group.rows, pending_from:doc_end] += zg[:, pending_from:] @ pending[group.rows].mT
    return out.to(z.dtype)
