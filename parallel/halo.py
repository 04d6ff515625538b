"""Halo exchange along the sequence: rows a shard needs from its neighbours in the CP group.

`halo_rows(x, group, before, after)` returns the last `before` rows of the previous rank and the
first `after` rows of the next rank (dim 1), filled with `fill` where there is no such rank. It is
differentiable: the gradient of a received row goes back to the rank that owns the row.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import exchange


def halo_rows(x: torch.Tensor, group, before: int, after: int, fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return _Halo.apply(x, group, before, after, fill)


def _swap(group, to_next: torch.Tensor, to_prev: torch.Tensor, from_prev: torch.Tensor, from_next: torch.Tensor):
    """Send `to_next` to rank+1 and `to_prev` to rank-1; receive `from_prev` and `from_next` in place."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    send, recv = {}, {}
    if rank + 1 < size:
        if to_next.shape[1]:
            send[rank + 1] = to_next
        if from_next.shape[1]:
            recv[rank + 1] = from_next
    if rank > 0:
        if to_prev.shape[1]:
            send[rank - 1] = to_prev
        if from_prev.shape[1]:
            recv[rank - 1] = from_prev
    exchange(group, send, recv, purpose="halo")


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, before, after, fill):
        from_prev = x.new_full((x.shape[0], before, *x.shape[2:]), fill)
        from_next = x.new_full((x.shape[0], after, *x.shape[2:]), fill)
        _swap(group, x[:, x.shape[1] - before :], x[:, :after], from_prev, from_next)
        ctx.group, ctx.before, ctx.after, ctx.shape = group, before, after, x.shape
        return from_prev, from_next

    @staticmethod
    def backward(ctx, grad_prev, grad_next):
        # Reverse roles: the gradient of rows we got from rank-1 goes back to rank-1's last rows.
        grad_x = grad_prev.new_zeros(ctx.shape)
        back_from_next = grad_prev.new_zeros((ctx.shape[0], ctx.before, *ctx.shape[2:]))
        back_from_prev = grad_prev.new_zeros((ctx.shape[0], ctx.after, *ctx.shape[2:]))
        _swap(ctx.group, grad_next, grad_prev, back_from_prev, back_from_next)
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        if rank + 1 < size and ctx.before:
            grad_x[:, ctx.shape[1] - ctx.before :] += back_from_next
        if rank > 0 and ctx.after:
            grad_x[:, : ctx.after] += back_from_prev
        return grad_x, None, None, None, None
