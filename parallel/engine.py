"""How gradients (and, with FSDP2, parameters and optimizer states) are shared across ranks.

Every rank of the data-parallel x context-parallel world computes partial gradients of the same
parameters; each rank's loss is already divided by the job's global token count, so the gradients
must be *summed* over all ranks.
- `fsdp2` (default): torch's `fully_shard` per decoder layer (the classes transformers lists in
  `_no_split_modules`) and on the root, over all ranks; parameters, gradients and optimizer states
  are sharded, parameters are gathered per layer and resharded after the forward; gradients are
  reduce-scattered as means (gloo has no pre-scaled sum), so the loop scales each rank's loss by the
  world size. On CUDA parameters compute in bf16 with fp32 reduction.
- `ddp`: every rank holds the whole model; one flat all-reduce of the gradients after the backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

ENGINES = ("fsdp2", "ddp")


def apply_fsdp(model: torch.nn.Module, block_names, device: torch.device) -> torch.nn.Module:
    """Shard `model` over all ranks (a 1-D mesh: CP ranks hold the same parameters as DP ranks), one
    unit per module whose class is named in `block_names` (e.g. transformers' `_no_split_modules`)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if device.type == "cuda" else None, reduce_dtype=torch.float32
    )
    blocks = [m for m in model.modules() if type(m).__name__ in set(block_names or ())]
    if not blocks:
        raise ValueError(f"parallel.engine=fsdp2: {type(model).__name__} names no decoder-layer class to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def sync_gradients(model: torch.nn.Module) -> None:
    """`ddp`: sum the gradients of every rank in one flat all-reduce."""
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
