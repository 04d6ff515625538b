"""The fast-weight write/read of a TTT MLP: a memory-lean chunk scan and its prefix-sum reference.

With Z (S x h) the gated MLP activations and V (S x d) the value targets, chunk c of a document reads
the writes of strictly earlier chunks of the same document:

    dW_c = lr * V_c^T Z_c                       (d x h)
    O_c  = Z_c (sum_{c' < c} dW_c')^T           (the fast part; the caller adds Z_c W_0^T)

`chunk_scan` walks the layout's segments keeping O(1) d x h states per row (accumulated in fp32, or
fp64 for fp64 inputs); its backward recomputes the states with a second forward walk and runs the
reverse scan for the state gradients, so no per-chunk weight is ever stored. `naive_fastweight` is
the prefix-sum formulation that materializes every chunk's weight; it is the reference for tests
and the baseline of `tools/bench_fastweight.py`.

The state is a pair (committed, pending): `committed` holds the writes of finished chunks, `pending`
the partial write of a chunk that is still open at the end of the sequence. Under context
parallelism a chunk can straddle two ranks: the next rank reads `committed` for the rest of that
chunk and adds `pending` into the write when the chunk closes.

Two writes share the scan (`TTTConfig.write`):

    raw          the In-Place TTT release's formula above: keys K = Z. Its gain lr * sum_s (Z_t . Z_s) grows
                 with the activations' scale and with the number of tokens written.
    normalized   keys K_t = Z_t / ||Z_t|| (unit L2 norm per token), each token writes with a learned weight
                 g_s = sigmoid(x_s . w + b) in (0, 1), and chunk c reads the g-weighted mean of what the
                 positions of earlier chunks wrote:
                     O_t = lr * sum_{s in chunks < c} g_s (K_t . K_s) V_s / sum_{s in chunks < c} g_s
                 Every weight K_t . K_s lies in [-1, 1], so |O_t| <= lr * max_s |V_s| at any activation scale
                 and length. With w = b = 0 (the drop-in init) every g is 1/2 and this is the plain mean; the
                 gate lets a layer write only the tokens worth remembering, so a few associations are not
                 diluted by the thousands of tokens around them.

The normalized write is two scans of the same kind (the state stays a plain sum, so CP's state passing and
decoding are unchanged): the gated values g V with the unit keys, and the gate mass g with a key of 1;
`gated_mean` divides one by the other. `naive_normalized_fastweight` is its reference, written as the
token-pair sum.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch

from trainer.ttt.layout import ChunkLayout, RowGroup, Segment, document_spans

_KEY_EPS = 1e-6  # a zero activation row gets a zero key, not a division by zero
_MASS_EPS = 1e-30  # only guards the division where nothing was read (mass 0, fast 0)


def write_keys(z: torch.Tensor, write: str) -> torch.Tensor:
    """The keys the fast weight is written and read with: Z itself (raw) or Z / ||Z|| per token (normalized),
    in Z's dtype (autocast computes the norm in fp32; the scan's products take bf16 operands anyway)."""
    if write == "raw":
        return z
    return torch.nn.functional.normalize(z, dim=-1, eps=_KEY_EPS).to(z.dtype)


def gated_mean(fast: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The normalized read: the gated write sum `fast` (B, S, d) over the gate mass `mass` (B, S, 1) of the
    positions it read; 0 where a token reads nothing (a document's first chunk)."""
    return torch.where(mass > 0, fast / mass.clamp_min(_MASS_EPS), 0)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """States accumulate in at least fp32; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def clip_delta(delta: torch.Tensor, tau: float) -> torch.Tensor:
    """Scale each (d x h) delta whose Frobenius norm exceeds tau down to norm tau."""
    norm = torch.linalg.matrix_norm(delta, keepdim=True)
    return delta * torch.clamp(tau / norm.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)


def chunk_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    layout: ChunkLayout,
    lr: float,
    clip: float | None = None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Fast part of the TTT MLP output, (B, S, d) in z's dtype, and the final (committed, pending) state.

    `state` is the (committed, pending) pair the sequence starts from, each (B, d, h); zero if None.
    CUDA tensors in bf16, fp16 or fp32 run the Triton kernels of trainer/kernels/scan_triton.py (clip, an
    inference option whose norm spans the whole state, excepted); the rest the torch loop below.
    """
    if _runs_triton(z, v, clip):
        from trainer.kernels.scan_triton import triton_chunk_scan  # late: CPU runs never load triton

        out, committed, pending = triton_chunk_scan(z, v, layout, lr, state)
    else:
        out, committed, pending = _ChunkScan.apply(z, v, *(state or (None, None)), layout.groups, lr, clip)
    return out, (committed, pending)


_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _runs_triton(z: torch.Tensor, v: torch.Tensor, clip: float | None) -> bool:
    """CUDA tensors take the kernels; so do CPU tensors under the Triton interpreter (TRITON_INTERPRET=1),
    which is how the tests run them on a machine without a GPU."""
    device_ok = z.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return device_ok and clip is None and torch.promote_types(z.dtype, v.dtype) in _TRITON_DTYPES


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


def naive_fastweight(
    z: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, chunk_size: int, lr: float, clip: float | None = None
) -> torch.Tensor:
    """Reference: the prefix-sum formulation, one document at a time, materializing every chunk's weight.

    Documents start where `position_ids` break their +1 steps (and at each row's start); chunk c of
    a document covers its positions [cC, (c+1)C).
    """
    position_ids = position_ids.expand(z.shape[0], -1)
    out = torch.zeros(*z.shape[:-1], v.shape[-1], dtype=z.dtype, device=z.device)
    for b in range(z.shape[0]):
        pos = position_ids[b].tolist()
        for a, e in document_spans(pos):
            out[b, a:e] = _naive_document(z[b, a:e], v[b, a:e], pos[a], chunk_size, lr, clip)
    return out


def _naive_document(z, v, first_pos, chunk_size, lr, clip):
    # Pad the document so that its chunks are whole rows of a (n, C, .) view; zero rows write nothing.
    front = first_pos % chunk_size
    back = -(front + z.shape[0]) % chunk_size
    zp = torch.nn.functional.pad(z, (0, 0, front, back)).reshape(-1, chunk_size, z.shape[-1])
    vp = torch.nn.functional.pad(v, (0, 0, front, back)).reshape(-1, chunk_size, v.shape[-1])
    deltas = lr * torch.einsum("ncd,nch->ndh", vp, zp)
    if clip is not None:
        deltas = clip_delta(deltas, clip)
    before = torch.cat([torch.zeros_like(deltas[:1]), deltas.cumsum(dim=0)[:-1]])  # exclusive prefix sum
    out = torch.einsum("nch,ndh->ncd", zp, before).reshape(-1, v.shape[-1])
    return out[front : front + z.shape[0]]


def naive_normalized_fastweight(
    z: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    chunk_size: int,
    lr: float,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the normalized write as a token-pair sum, one document at a time:
    O_t = lr * sum_{s: c_s < c_t} g_s (K_t . K_s) V_s / sum_{s: c_s < c_t} g_s with K = Z / ||Z||, c = position // C
    and g = `gates` (B, S, 1), all equal if None."""
    position_ids = position_ids.expand(z.shape[0], -1)
    gates = torch.ones_like(z[..., :1]) if gates is None else gates
    keys = z / z.norm(dim=-1, keepdim=True).clamp_min(_KEY_EPS)
    out = torch.zeros(*z.shape[:-1], v.shape[-1], dtype=z.dtype, device=z.device)
    for b in range(z.shape[0]):
        pos = position_ids[b].tolist()
        for a, e in document_spans(pos):
            chunk = torch.tensor(pos[a:e], device=z.device) // chunk_size
            reads = (chunk[:, None] > chunk[None, :]) * gates[b, a:e, 0]  # token t reads token s of an earlier chunk
            weights = (keys[b, a:e] @ keys[b, a:e].T) * reads
            mass = reads.sum(dim=1, keepdim=True)
            out[b, a:e] = torch.where(mass > 0, lr * (weights @ v[b, a:e]) / mass.clamp_min(_MASS_EPS), 0)
    return out
