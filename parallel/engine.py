"""How gradients (and, with FSDP2, parameters and optimizer states) are shared across ranks.

Every rank of the data-parallel x context-parallel world computes partial gradients of the same
parameters; each rank's loss is already divided by the job's global token count, so the gradients
must be *summed* over all ranks.
- `fsdp2` (default): torch's `fully_shard` per decoder layer (the classes transformers lists in
  `_no_split_modules`) and on the root, over all ranks; parameters, gradients and optimizer states
  are sharded, parameters are gathered per layer and resharded after the forward; gradients are
  reduce-scattered as means (gloo has no pre-scaled sum), so the loop scales each rank's loss by the
  world size. On CUDA parameters compute in bf16 with fp32 reduction.
- `deepspeed`: DeepSpeed ZeRO stage 2 (gradients and optimizer states sharded) or 3 (parameters too),
  optionally with the optimizer states offloaded to CPU; DeepSpeed averages gradients over ranks
  and divides the loss by the accumulation steps, so the loop scales each loss by both.
- `ddp`: every rank holds the whole model; one flat all-reduce of the gradients after the backward.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

ENGINES = ("fsdp2", "deepspeed", "ddp")


def apply_fsdp(model: torch.nn.Module, block_names, device: torch.device, materialize=None) -> torch.nn.Module:
    """Shard `model` over all ranks (a 1-D mesh: CP ranks hold the same parameters as DP ranks), one
    unit per module whose class is named in `block_names` (e.g. transformers' `_no_split_modules`).

    A model built on the meta device is given real storage unit by unit: `materialize(unit)` runs
    just before each unit is sharded, so a rank never holds the full model."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if device.type == "cuda" else None, reduce_dtype=torch.float32
    )
    blocks = [m for m in model.modules() if type(m).__name__ in set(block_names or ())]
    if not blocks:
        raise ValueError(f"parallel.engine=fsdp2: {type(model).__name__} names no decoder-layer class to shard")
    for block in blocks:
        if materialize is not None:
            materialize(block)
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    if materialize is not None:
        materialize(model)
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


def init_deepspeed(model, optimizer, micro_batch: int, grad_accum: int, grad_clip, zero_stage: int, offload: bool):
    """Wrap `model` and `optimizer` in a DeepSpeed engine; returns (engine, optimizer)."""
    import deepspeed

    from parallel.attention import init_deepspeed_comm

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it; torchrun sets it, a single process may not
    init_deepspeed_comm()
    zero = {"stage": zero_stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": torch.cuda.is_available()},
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed quiet
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer
