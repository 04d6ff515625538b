"""Exclusive, document-aware prefix scan of fast-weight states across the ranks of a CP group.

Each rank summarises its shard as a *transfer*: the (committed, pending) state its shard leaves
behind when started from zero, and whether a document starts inside the shard (then the incoming
state is dropped). Applied to an incoming state (D, P), a shard leaves

    (D_loc, P_loc)                 if a document starts in it,
    (D + P + D_loc, P_loc)         otherwise (the incoming open chunk closes inside the shard),

which composes associatively, so the state entering every rank comes out of a Hillis-Steele scan in
ceil(log2 P) rounds of point-to-point messages. The backward is the adjoint: a reverse (suffix) scan
of the same shape over the output gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from parallel.comm import LEDGER, exchange

# An element is (flag (B,), pair (B, 2, d, h)); `combine(lower_ranks, higher_ranks)` is associative.
Element = tuple[torch.Tensor, torch.Tensor]


def scan_rounds(world_size: int) -> int:
    return math.ceil(math.log2(world_size)) if world_size > 1 else 0


def _after(earlier: Element, later: Element) -> Element:
    """Forward transfer of two consecutive shards: `earlier` then `later`."""
    (r_a, x_a), (r_b, x_b) = earlier, later
    carried = x_a[:, 0] + x_a[:, 1] + x_b[:, 0]
    committed = torch.where(r_b[:, None, None], x_b[:, 0], carried)
    return r_a | r_b, torch.stack([committed, x_b[:, 1]], dim=1)


def _adjoint_after(near: Element, far: Element) -> Element:
    """Adjoint maps H -> (a_D + c h_D, a_P + c h_D), composed as `near` applied after `far`."""
    (c_n, a_n), (c_f, a_f) = near, far
    scaled = c_n[:, None, None, None] * a_f[:, :1]
    return c_n * c_f, a_n + scaled


def _exclusive_scan(element: Element, combine: Callable, group, reverse: bool) -> Element | None:
    """Combine the elements of all lower ranks (or all higher ranks if `reverse`); None on the end rank."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    inclusive, exclusive = element, None
    for step in range(scan_rounds(size)):
        distance = 2**step
        dst, src = (rank - distance, rank + distance) if reverse else (rank + distance, rank - distance)
        flag, pair = inclusive
        send = {dst: torch.cat([flag.to(pair.dtype)[:, None], pair.flatten(1)], dim=1)} if 0 <= dst < size else {}
        recv = {src: torch.empty_like(send.get(dst, _packed_like(flag, pair)))} if 0 <= src < size else {}
        exchange(group, send, recv, purpose="fastweight_scan")
        LEDGER.rounds["fastweight_scan"] += 1
        if recv:
            got = _unpack(recv[src], flag, pair)
            if reverse:
                inclusive = combine(inclusive, got)
                exclusive = got if exclusive is None else combine(exclusive, got)
            else:
                inclusive = combine(got, inclusive)
                exclusive = got if exclusive is None else combine(got, exclusive)
    return exclusive


def _packed_like(flag, pair):
    return torch.empty(pair.shape[0], 1 + pair[0].numel(), dtype=pair.dtype, device=pair.device)


def _unpack(packed: torch.Tensor, flag: torch.Tensor, pair: torch.Tensor) -> Element:
    return packed[:, 0].to(flag.dtype), packed[:, 1:].reshape(pair.shape)


class _StateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, committed, pending, resets, group):
        pair = torch.stack([committed, pending], dim=1)
        incoming = _exclusive_scan((resets, pair), _after, group, reverse=False)
        ctx.group = group
        ctx.save_for_backward(resets)
        if incoming is None:  # rank 0 starts from zero
            return torch.zeros_like(committed), torch.zeros_like(pending)
        return incoming[1][:, 0].clone(), incoming[1][:, 1].clone()

    @staticmethod
    def backward(ctx, grad_committed, grad_pending):
        (resets,) = ctx.saved_tensors
        keep = (~resets).to(grad_committed.dtype)
        adjoint = (keep, torch.stack([grad_committed, grad_pending], dim=1))
        outgoing = _exclusive_scan(adjoint, _adjoint_after, ctx.group, reverse=True)
        if outgoing is None:  # the last rank's state feeds no one
            return torch.zeros_like(grad_committed), torch.zeros_like(grad_pending), None, None
        return outgoing[1][:, 0].clone(), outgoing[1][:, 1].clone(), None, None


def exclusive_state_scan(
    committed: torch.Tensor, pending: torch.Tensor, resets: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (committed, pending) state entering this rank's shard, from every rank's transfer.

    committed, pending: (B, d, h) this shard's state started from zero; resets: (B,) bool, a document
    starts in this shard.
    """
    return _StateScan.apply(committed, pending, resets, group)


def naive_state_scan(transfers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Reference: the incoming state of every shard, applying the transfers one after another."""
    committed, pending = torch.zeros_like(transfers[0][0]), torch.zeros_like(transfers[0][1])
    incoming = []
    for d_loc, p_loc, reset in transfers:
        incoming.append((committed, pending))
        carried = committed + pending + d_loc
        committed, pending = torch.where(reset[:, None, None], d_loc, carried), p_loc
    return incoming
