"""Gradient synchronisation across data- and context-parallel ranks.

`ddp`: every rank holds the whole model; after the backward, gradients are summed over all ranks
in one flat all-reduce. The loss of each rank is already divided by the job's global token count,
so the sum is the gradient of the global mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def sync_gradients(model: torch.nn.Module) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # every rank must contribute the same buffer layout, even for an unused parameter
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
