"""Mask-free document attention: a segment plan and the two kernels that run it.

A rank's queries are pieces of the global sequence (`parallel.pieces`); documents are packed and
restart wherever position ids break their +1 steps. The *segment plan* cuts the local queries at every
piece edge and document start; each segment's queries attend the keys from their document's start
(or the sliding window's start) up to the segment's end, causal aligned bottom-right: query i of a
segment with Lq queries and Lk keys sees keys j <= i + Lk - Lq (and j > i + Lk - Lq - window).
The keys a plan reads are packed once, from the gathered K/V, into runs (segments of one piece read
adjacent key ranges, so the packed keys are a single view for contiguous shards).
- CUDA: one `torch.nn.attention.varlen.varlen_attn` call (flash-attention varlen: cu_seqlens of
  queries and keys, window_size, GQA); no tensor of queries x keys exists.
- CPU: the same plan through SDPA, one call per segment: square segments with is_causal; the others
  (a document or window begun before the segment) with a bottom-right band over at most QUERY_BLOCK
  queries at a time, the CPU kernel's only mask.
`naive_document_attention` is the dense-mask reference the tests compare the plan with.
"""

from __future__ import annotations

import bisect
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.sharding import document_starts

QUERY_BLOCK = 2048  # queries per masked SDPA call on CPU (and per reference block)


@dataclass(frozen=True)
class Segment:
    row: int
    q_lo: int  # local query indices within the row
    q_hi: int
    k_lo: int  # indices into the packed keys
    k_hi: int


@dataclass(frozen=True)
class SegmentPlan:
    segments: tuple[Segment, ...]  # in row-major local query order, covering every query once
    key_runs: tuple[tuple[int, int, int], ...]  # (row, start, end) of the gathered buffer; packed in order
    window: int | None

    @property
    def attended_pairs(self) -> int:
        """Query-key pairs the plan attends (the work of its kernels)."""
        return sum(_visible_pairs(s.q_hi - s.q_lo, s.k_hi - s.k_lo, self.window) for s in self.segments)


def _visible_pairs(lq: int, lk: int, window: int | None) -> int:
    """Pairs of a bottom-right causal segment: query i sees min(i + 1 + lk - lq, window) keys."""
    seen = range(lk - lq + 1, lk + 1)
    return sum(seen) if window is None else sum(min(n, window) for n in seen)


def build_segment_plan(
    doc_starts: list[list[int]],
    query_spans: list[tuple[int, int]],
    key_spans: list[tuple[int, int, int]],
    window: int | None = None,
) -> SegmentPlan:
    """Plan the attention of local queries against gathered keys.

    doc_starts: per row, the sorted global indices where documents start (0 included);
    query_spans: the global [start, end) of each local piece, in local order;
    key_spans: (global start, global end, buffer start) of each piece in the gathered key buffer.
    """
    segments, runs = [], []  # runs: [row, global start, global end, packed start]
    packed = 0
    for row, starts in enumerate(doc_starts):
        local = 0
        for g0, g1 in query_spans:
            first = bisect.bisect_right(starts, g0) - 1
            cuts = [g0, *starts[first + 1 : bisect.bisect_left(starts, g1)]]
            for i, (s, e) in enumerate(zip(cuts, [*cuts[1:], g1])):
                k_lo = starts[first] if i == 0 else s
                if window:
                    k_lo = max(k_lo, s - window + 1)
                if not runs or runs[-1][0] != row or runs[-1][2] != k_lo:
                    runs.append([row, k_lo, k_lo, packed])
                run = runs[-1]
                run[2] = e
                packed = run[3] + e - run[1]
                offset = run[3] + k_lo - run[1]
                segments.append(Segment(row, local + s - g0, local + e - g0, offset, packed))
            local += g1 - g0
    buffer_runs = []
    for row, lo, hi, _ in runs:
        for span_lo, span_hi, buf in sorted(key_spans):
            a, b = max(lo, span_lo), min(hi, span_hi)
            if a >= b:
                continue
            start = buf + a - span_lo
            if buffer_runs and buffer_runs[-1][0] == row and buffer_runs[-1][2] == start:
                buffer_runs[-1][2] = start + b - a
            else:
                buffer_runs.append([row, start, start + b - a])
    return SegmentPlan(tuple(segments), tuple(map(tuple, buffer_runs)), window)


def piece_plan(
    positions: torch.Tensor, query_pieces: list[int], buffer_pieces: list[int], window: int | None = None
) -> SegmentPlan:
    """The plan of local query pieces (local order) against a key buffer holding `buffer_pieces` (in that
    order); `positions` (B, S) are the global position ids in sequence order, cut into len(buffer_pieces)
    equal pieces."""
    size = positions.shape[1] // len(buffer_pieces)
    starts = [row.nonzero().flatten().tolist() for row in document_starts(positions).cpu()]  # one host sync
    key_spans = [(piece * size, (piece + 1) * size, slot * size) for slot, piece in enumerate(buffer_pieces)]
    spans = []
    for piece in query_pieces:  # adjacent pieces form one span: their documents need no cut
        if spans and spans[-1][1] == piece * size:
            spans[-1][1] += size
        else:
            spans.append([piece * size, (piece + 1) * size])
    return build_segment_plan(starts, [tuple(span) for span in spans], key_spans, window)


def layout_plans(positions: torch.Tensor, layout, window: int | None = None) -> tuple[SegmentPlan, ...]:
    """Every rank's plan under the all-gather attention, for a layout (per rank, the pieces it holds:
    `parallel.pieces`); the gather puts the ranks' shards one after another, so the key buffer holds the
    pieces in layout order."""
    buffer = [piece for pieces in layout for piece in pieces]
    return tuple(piece_plan(positions, list(pieces), buffer, window) for pieces in layout)


def pack_keys(buffer: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
    """(T_k, H, D) keys of the plan from a sequence-first (S, B, H, D) buffer; a view when one run."""
    parts = [buffer[start:end, row] for row, start, end in plan.key_runs]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def segment_attention(query, keys, values, plan: SegmentPlan, scale, dropout: float = 0.0) -> torch.Tensor:
    """query (B, Hq, Lq, D); keys/values sequence-first (S, B, Hkv, D) buffers -> (B, Lq, Hq, D)."""
    k, v = pack_keys(keys, plan), pack_keys(values, plan)
    if query.is_cuda:
        return _varlen(query, k, v, plan, scale, dropout)
    return _sdpa_segments(query, k, v, plan, scale, dropout)


@functools.cache
def _takes_enable_gqa(varlen_attn) -> bool:
    """Whether this torch's `varlen_attn` takes `enable_gqa` (torch >= 2.12 requires it for GQA, 2.11 lacks it)."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _varlen(query, k, v, plan: SegmentPlan, scale, dropout):
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ValueError("the varlen attention kernel has no dropout: set the model's attention dropout to 0")
    batch, heads, length, dim = query.shape
    segs = plan.segments
    cu_q = torch.tensor([s.row * length + s.q_lo for s in segs] + [batch * length], dtype=torch.int32)
    cu_k = torch.tensor([segs[0].k_lo] + [s.k_hi for s in segs], dtype=torch.int32)
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16  # flash's dtypes
    k, v = k.to(dtype), v.to(dtype)
    if _takes_enable_gqa(varlen_attn):
        gqa = {"enable_gqa": heads != k.shape[1]}
    else:  # torch 2.11: each key head repeated for its group of query heads, which is what GQA computes
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        gqa = {}
    out = varlen_attn(
        query.transpose(1, 2).reshape(batch * length, heads, dim).to(dtype),
        k,
        v,
        cu_q.to(query.device, non_blocking=True),
        cu_k.to(query.device, non_blocking=True),
        max(s.q_hi - s.q_lo for s in segs),
        max(s.k_hi - s.k_lo for s in segs),
        scale=scale,
        window_size=(plan.window - 1, 0) if plan.window else (-1, 0),
        **gqa,
    )
    return out.to(query.dtype).view(batch, length, heads, dim)


def _sdpa_segments(query, k, v, plan: SegmentPlan, scale, dropout):
    rows = [[] for _ in range(query.shape[0])]
    for s in plan.segments:
        rows[s.row].append(
            _bottom_right_sdpa(  # 4-D (1, H, L, D): SDPA's fused CPU kernel, not its math fallback
                query[s.row : s.row + 1, :, s.q_lo : s.q_hi],
                k[None, s.k_lo : s.k_hi].transpose(1, 2),
                v[None, s.k_lo : s.k_hi].transpose(1, 2),
                plan.window,
                scale,
                dropout,
            )
        )
    return torch.cat([torch.cat(parts, dim=2) for parts in rows]).transpose(1, 2)


def _bottom_right_sdpa(q, k, v, window, scale, dropout):
    """(1, H, Lq, D) queries against (1, Hkv, Lk, D) keys, causal aligned bottom-right."""
    lq, lk = q.shape[-2], k.shape[-2]
    sdpa = dict(dropout_p=dropout, scale=scale, enable_gqa=True)
    if lq == lk and (window is None or window >= lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
    shift = lk - lq  # query i sits at key index i + shift
    outputs = []
    for i0 in range(0, lq, QUERY_BLOCK):
        i1 = min(i0 + QUERY_BLOCK, lq)
        lo = max(0, i0 + shift - window + 1) if window else 0
        q_index = torch.arange(i0 + shift, i1 + shift, device=q.device)[:, None]
        k_index = torch.arange(lo, i1 + shift, device=q.device)[None, :]
        band = k_index <= q_index
        if window:
            band &= k_index > q_index - window
        outputs.append(
            F.scaled_dot_product_attention(q[..., i0:i1, :], k[..., lo : i1 + shift, :], v[..., lo : i1 + shift, :],
                                           attn_mask=band, **sdpa)
        )  # fmt: skip
    return torch.cat(outputs, dim=-2)


def naive_document_attention(query, key, value, q_start, doc_ids, scaling, dropout, sliding_window):
    """Reference: causal, per-document SDPA of queries at global indices q_start + i against keys
    0..K-1 with a dense boolean mask per block of QUERY_BLOCK queries.

    query (B, Hq, Lq, D); key/value (B, Hkv, K, D) with Hkv dividing Hq; doc_ids (B, >= K) -> (B, Hq, Lq, D).
    """
    length = query.shape[2]
    kv_index = torch.arange(key.shape[2], device=query.device)
    first_doc = doc_ids[:, q_start]
    lo = int((doc_ids[:, : key.shape[2]] < first_doc[:, None]).sum(dim=1).min())  # docs are contiguous
    if sliding_window:
        lo = max(lo, q_start - sliding_window + 1)
    outputs = []
    for block in range(0, length, QUERY_BLOCK):
        q_index = torch.arange(q_start + block, q_start + min(block + QUERY_BLOCK, length), device=query.device)
        hi = int(q_index[-1]) + 1
        keys = kv_index[lo:hi]
        mask = (keys[None, :] <= q_index[:, None]) & (doc_ids[:, q_index, None] == doc_ids[:, None, keys])
        if sliding_window:
            mask &= keys[None, :] > q_index[:, None] - sliding_window
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, block : block + QUERY_BLOCK],
                key[:, :, lo:hi],
                value[:, :, lo:hi],
                attn_mask=mask[:, None],
                dropout_p=dropout,
                scale=scaling,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2)
