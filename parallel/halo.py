"""Halo exchange along the sequence: rows a piece needs from its neighbouring pieces.

`halo_rows(x, group, before, after)` takes a shard folded into piece rows (`parallel.pieces.fold`:
(B * pieces per rank, L, ...)) and returns, per piece row, the last `before` rows of the previous piece
of the sequence and the first `after` rows of the next one, filled with `fill` where there is no such
piece. It is differentiable: the gradient of a received row goes back to the piece that owns the row.
"""

from __future__ import annotations

import torch

from parallel.comm import route
from parallel.pieces import CPGroup, as_cp_group


@torch.compiler.disable  # point-to-point messages: eager under torch.compile
def halo_rows(x: torch.Tensor, group, before: int, after: int, fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return _Halo.apply(x, as_cp_group(group), before, after, fill)


def _swap(cp: CPGroup, to_next, to_prev, from_prev, from_next) -> None:
    """Per local piece slot i (piece v), tensors (B, slots, rows, ...): send `to_next[:, i]` to piece v+1
    and `to_prev[:, i]` to piece v-1; fill `from_prev[:, i]` from v-1 and `from_next[:, i]` from v+1."""
    send, recv = {}, {}
    for i, piece in enumerate(cp.pieces()):
        if piece + 1 < cp.count:
            if to_next.shape[2]:
                send[piece, piece + 1] = to_next[:, i]
            if from_next.shape[2]:
                recv[piece + 1, piece] = from_next[:, i]
        if piece > 0:
            if to_prev.shape[2]:
                send[piece, piece - 1] = to_prev[:, i]
            if from_prev.shape[2]:
                recv[piece - 1, piece] = from_prev[:, i]
    route(cp, send, recv, purpose="halo")


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp, before, after, fill):
        pieces = x.reshape(-1, cp.per_rank, *x.shape[1:])
        from_prev = x.new_full((*pieces.shape[:2], before, *x.shape[2:]), fill)
        from_next = x.new_full((*pieces.shape[:2], after, *x.shape[2:]), fill)
        _swap(cp, pieces[:, :, x.shape[1] - before :], pieces[:, :, :after], from_prev, from_next)
        ctx.cp, ctx.before, ctx.after, ctx.shape = cp, before, after, pieces.shape
        return from_prev.flatten(0, 1), from_next.flatten(0, 1)

    @staticmethod
    def backward(ctx, grad_prev, grad_next):
        # Reverse roles: the gradient of rows we got from piece v-1 goes back to v-1's last rows.
        shape, before, after = ctx.shape, ctx.before, ctx.after
        grad_prev = grad_prev.reshape(*shape[:2], before, *shape[3:])
        grad_next = grad_next.reshape(*shape[:2], after, *shape[3:])
        back_from_next = grad_prev.new_zeros((*shape[:2], before, *shape[3:]))
        back_from_prev = grad_prev.new_zeros((*shape[:2], after, *shape[3:]))
        _swap(ctx.cp, grad_next, grad_prev, back_from_prev, back_from_next)
        grad_x = grad_prev.new_zeros(shape)
        grad_x[:, :, shape[2] - before :] += back_from_next
        grad_x[:, :, :after] += back_from_prev
        return grad_x.flatten(0, 1), None, None, None, None
