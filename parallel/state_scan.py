"""Exclusive, document-aware prefix scan of fast-weight states over the pieces of a CP group.

The sequence is cut into pieces (`parallel.pieces`: one, two (head and tail) or eight per rank),
scanned in sequence order. Each piece is summarised as a *transfer*: the (committed, pending) state
it leaves behind when started from zero, and whether a document starts inside it (then the incoming
state is dropped). Applied to an incoming state (D, P), a piece leaves

    (D_loc, P_loc)                 if a document starts in it,
    (D + P + D_loc, P_loc)         otherwise (the incoming open chunk closes inside the shard),

which composes associatively, so the state entering every piece comes out of a Hillis-Steele scan
over the N pieces in ceil(log2 N) rounds (N = P, 2P or 8P), each round one message per peer carrying
the transfers of all this rank's pieces that go there. The backward is the adjoint: a reverse (suffix)
scan of the same shape over the output gradients. `state_scan_in_flight` runs the same scan on a side
thread while the caller computes (`parallel.overlap_state_scan`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from parallel.comm import LEDGER, route
from parallel.pieces import CPGroup, as_cp_group

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


def _exclusive_scan(elements: list[Element], combine: Callable, cp: CPGroup, reverse: bool) -> list[Element | None]:
    """Per local piece, combine the elements of all earlier pieces (all later ones if `reverse`); None
    for the end piece."""
    pieces = cp.pieces()
    inclusive, exclusive = list(elements), [None] * len(pieces)
    for step in range(scan_rounds(cp.count)):
        distance = -(2**step) if reverse else 2**step
        send, recv = {}, {}
        for i, piece in enumerate(pieces):
            flag, pair = inclusive[i]
            if 0 <= piece + distance < cp.count:
                send[piece, piece + distance] = torch.cat([flag.to(pair.dtype)[:, None], pair.flatten(1)], dim=1)
            if 0 <= piece - distance < cp.count:
                recv[piece - distance, piece] = _packed_like(pair)
        route(cp, send, recv, purpose="fastweight_scan")
        LEDGER.rounds["fastweight_scan"] += 1
        for i, piece in enumerate(pieces):
            if (piece - distance, piece) not in recv:
                continue
            got = _unpack(recv[piece - distance, piece], *inclusive[i])
            if reverse:
                inclusive[i] = combine(inclusive[i], got)
                exclusive[i] = got if exclusive[i] is None else combine(exclusive[i], got)
            else:
                inclusive[i] = combine(got, inclusive[i])
                exclusive[i] = got if exclusive[i] is None else combine(got, exclusive[i])
    return exclusive


def _packed_like(pair):
    return torch.empty(pair.shape[0], 1 + pair[0].numel(), dtype=pair.dtype, device=pair.device)


def _unpack(packed: torch.Tensor, flag: torch.Tensor, pair: torch.Tensor) -> Element:
    return packed[:, 0].to(flag.dtype), packed[:, 1:].reshape(pair.shape)


def _by_piece(tensor: torch.Tensor, cp: CPGroup) -> list[torch.Tensor]:
    """(B n, ...) piece rows -> one (B, ...) tensor per local piece."""
    folded = tensor.reshape(-1, cp.per_rank, *tensor.shape[1:])
    return [folded[:, i] for i in range(cp.per_rank)]


def _piece_rows(parts: list[Element | None], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (committed, pending) pairs of each local piece back in piece-row order; zero for None."""
    pairs = [torch.zeros_like(like) if part is None else part[1] for part in parts]
    stacked = torch.stack(pairs, dim=1).flatten(0, 1)  # (B n, 2, d, h)
    return stacked[:, 0].clone(), stacked[:, 1].clone()


def _forward_scan(committed, pending, resets, cp: CPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = _by_piece(torch.stack([committed, pending], dim=1), cp)
    incoming = _exclusive_scan(list(zip(_by_piece(resets, cp), pairs)), _after, cp, reverse=False)
    return _piece_rows(incoming, pairs[0])  # the first piece starts from zero


def _adjoint_scan(grad_committed, grad_pending, resets, cp: CPGroup) -> tuple[torch.Tensor, torch.Tensor]:
    keep = _by_piece((~resets).to(grad_committed.dtype), cp)
    grads = _by_piece(torch.stack([grad_committed, grad_pending], dim=1), cp)
    outgoing = _exclusive_scan(list(zip(keep, grads)), _adjoint_after, cp, reverse=True)
    return _piece_rows(outgoing, grads[0])  # the last piece's state feeds no one


class _StateScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, committed, pending, resets, cp):
        ctx.cp = cp
        ctx.save_for_backward(resets)
        return _forward_scan(committed, pending, resets, cp)

    @staticmethod
    def backward(ctx, grad_committed, grad_pending):
        (resets,) = ctx.saved_tensors
        return (*_adjoint_scan(grad_committed, grad_pending, resets, ctx.cp), None, None)


def exclusive_state_scan(
    committed: torch.Tensor, pending: torch.Tensor, resets: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (committed, pending) state entering each of this rank's pieces, from every piece's transfer.

    committed, pending: (B n, d, h) each piece row's state started from zero (`parallel.pieces.fold`:
    n pieces per rank); resets: (B n,) bool, a document starts in the piece. `group`: a `CPGroup` or a
    process group (contiguous shards).
    """
    return _StateScan.apply(committed, pending, resets, as_cp_group(group))


# --- the same scan in flight: sent on a side thread while this one computes ----------------------------

_SIDE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-scan")  # one scan in flight at a time


class _Flight:
    """A scan running on the side thread (and, on CUDA, a side stream), started and collected by the two
    autograd nodes below; in the backward they swap roles and carry the adjoint scan."""

    def __init__(self, resets: torch.Tensor, cp: CPGroup) -> None:
        self.resets, self.cp, self._future = resets, cp, None

    def start(self, scan: Callable, first: torch.Tensor, second: torch.Tensor) -> None:
        stream, ready = None, None
        if first.is_cuda:  # the side stream must see the inputs finished, and keep them alive while it runs
            stream, ready = torch.cuda.Stream(first.device), torch.cuda.current_stream(first.device).record_event()
            for tensor in (first, second, self.resets):
                tensor.record_stream(stream)
        self._future = _SIDE.submit(self._run, scan, first, second, stream, ready)

    def _run(self, scan, first, second, stream, ready):
        with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                stream.wait_event(ready)
            result = scan(first, second, self.resets, self.cp)
            return result, None if stream is None else stream.record_event()

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        result, done = self._future.result()
        self._future = None
        if done is not None:  # this stream waits for the side stream's results, which it now owns
            stream = torch.cuda.current_stream(result[0].device)
            stream.wait_event(done)
            for tensor in result:
                tensor.record_stream(stream)
        return result


class _Launch(torch.autograd.Function):
    """Starts the forward scan; its backward collects the adjoint scan that `_Land`'s backward started."""

    @staticmethod
    def forward(ctx, committed, pending, flight: _Flight):
        flight.start(_forward_scan, committed, pending)
        ctx.flight = flight
        return committed.new_zeros(())  # orders `_Land` after this node, and back

    @staticmethod
    def backward(ctx, _):
        return (*ctx.flight.result(), None)


class _Land(torch.autograd.Function):
    """Collects the forward scan; its backward starts the adjoint scan."""

    @staticmethod
    def forward(ctx, token, flight: _Flight):
        ctx.flight = flight
        return flight.result()

    @staticmethod
    def backward(ctx, grad_committed, grad_pending):
        ctx.flight.start(_adjoint_scan, grad_committed.contiguous(), grad_pending.contiguous())
        return torch.zeros((), dtype=grad_committed.dtype, device=grad_committed.device), None


def state_scan_in_flight(
    committed: torch.Tensor, pending: torch.Tensor, resets: torch.Tensor, group, local: Callable[[], Any]
) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
    """`exclusive_state_scan`, with the messages in flight while `local()` runs (the local chunk scan):
    returns (the incoming states, what `local` returned). In the backward the adjoint scan flies while
    autograd runs the nodes `local` recorded: they come later in the graph than `_Launch`, so the engine
    (which runs the newest ready node first) reaches them before it must collect the adjoint."""
    flight = _Flight(resets, as_cp_group(group))
    token = _Launch.apply(committed, pending, flight)
    result = local()
    return _Land.apply(token, flight), result


def naive_state_scan(transfers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Reference: the incoming state of every shard, applying the transfers one after another."""
    committed, pending = torch.zeros_like(transfers[0][0]), torch.zeros_like(transfers[0][1])
    incoming = []
    for d_loc, p_loc, reset in transfers:
        incoming.append((committed, pending))
        carried = committed + pending + d_loc
        committed, pending = torch.where(reset[:, None, None], d_loc, carried), p_loc
    return incoming
