"""Context-parallel attention, registered through transformers' AttentionInterface.

Each rank holds pieces of the sequence (`parallel.pieces`: contiguous, head and tail, or by work). Documents
(packed sequences) are found from the global `position_ids`, which restart at each document, and
attended through a mask-free segment plan (`parallel.segments`: varlen flash attention on CUDA, SDPA
per segment on CPU).
- `allgather`: all-gather K/V over the CP group (the gradients are reduce-scattered back), attend
  the local query pieces; exact, CPU and GPU.
- `ulysses`: DeepSpeed's all-to-all over heads (each rank attends the whole sequence for 1/P of
  the heads); needs the query and key/value head counts divisible by the CP degree.
Both honour `sliding_window` (key k is visible to query q when q - window < k <= q).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.distributed as dist
from transformers import AttentionInterface

from parallel.comm import LEDGER
from parallel.pieces import CPGroup, as_cp_group
from parallel.segments import piece_plan, segment_attention
from parallel.sharding import shard, unshard

KINDS = ("allgather", "ulysses")


def _global_positions(position_ids: torch.Tensor, batch: int, cp: CPGroup) -> torch.Tensor:
    """(B, S) position ids of the whole sequence, in sequence order."""
    local = position_ids.expand(batch, -1).contiguous()
    parts = [torch.empty_like(local) for _ in range(cp.size)]
    dist.all_gather(parts, local, group=cp.group)
    return unshard(parts, cp.layout)


def _buffer_pieces(cp: CPGroup) -> list[int]:
    """The pieces of an all-gathered buffer, rank-major."""
    return [piece for rank in range(cp.size) for piece in cp.pieces(rank)]


class _PlanCache:
    """The segment plans of the forward in progress. Every attention layer of a forward receives the same
    `position_ids` tensor, so the gather of the global positions and the plan's host sync happen once
    per forward (and per window, and query layout), not once per layer; an activation-checkpointing
    recompute reuses them too. A new tensor, an in-place change of it or a new layout starts afresh."""

    def __init__(self) -> None:
        self._tensor, self._key, self._plans = None, None, {}

    def plan(self, position_ids: torch.Tensor, batch: int, cp: CPGroup, query_pieces: list[int], window):
        key = (position_ids._version, batch, cp.layout)
        if self._tensor is None or self._tensor() is not position_ids or self._key != key:
            self._tensor, self._key = weakref.ref(position_ids), key
            self._plans = {"positions": _global_positions(position_ids, batch, cp)}
        wanted = (tuple(query_pieces), window)
        if wanted not in self._plans:
            self._plans[wanted] = piece_plan(self._plans["positions"], query_pieces, _buffer_pieces(cp), window)
        return self._plans[wanted]


_PLANS: weakref.WeakKeyDictionary[CPGroup, _PlanCache] = weakref.WeakKeyDictionary()


def _segment_plan(position_ids: torch.Tensor, batch: int, cp: CPGroup, query_pieces: list[int], window):
    return _PLANS.setdefault(cp, _PlanCache()).plan(position_ids, batch, cp, query_pieces, window)


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather (B, H, S_local, D) shards into a sequence-first (P S_local, B, H, D) buffer, rank-major;
    the gradient is reduce-scattered back."""
    return _GatherSequence.apply(x, group)


class _GatherSequence(torch.autograd.Function):
    """Synchronous collectives: the asynchronous functional ones let gloo write into buffers that the
    CPU backward had already freed (heap corruption under load)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        shards = x.movedim(2, 0).contiguous()  # the sequence dim first: collectives concatenate along dim 0
        gathered = shards.new_empty((shards.shape[0] * dist.get_world_size(group), *shards.shape[1:]))
        dist.all_gather_single(gathered, shards, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad):
        grads = grad.contiguous()
        mine = grads.new_empty((grads.shape[0] // dist.get_world_size(ctx.group), *grads.shape[1:]))
        dist.reduce_scatter_single(mine, grads, group=ctx.group)
        return mine.movedim(0, 2), None


@torch.compiler.disable  # collectives and a host-side plan cache: a graph break, never traced or guarded per batch
def allgather_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    cp = kwargs.pop("cp_group")
    plan = _segment_plan(kwargs["position_ids"], query.shape[0], cp, list(cp.pieces()), sliding_window)
    shard_bytes = key.numel() * key.element_size() + value.numel() * value.element_size()
    # Ring all-gather: every rank sends its shard to P-1 peers; the backward reduce-scatter mirrors it.
    LEDGER.bytes_sent["attention"] += (cp.size - 1) * shard_bytes * (2 if key.requires_grad else 1)
    keys, values = _gather_sequence(key, cp.group), _gather_sequence(value, cp.group)
    out = segment_attention(query, keys, values, plan, scaling, dropout if module.training else 0.0)
    return out, None


@torch.compiler.disable  # DeepSpeed's all-to-all and the plan cache stay eager under torch.compile
def ulysses_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    from deepspeed.sequence.layer import DistributedAttention

    cp = kwargs.pop("cp_group")
    if query.shape[1] % cp.size or key.shape[1] % cp.size:
        raise ValueError(
            f"parallel.attention=ulysses needs attention heads ({query.shape[1]}) and key/value heads "
            f"({key.shape[1]}) divisible by parallel.cp={cp.size}"
        )
    # The all-to-all hands each rank every rank's pieces, rank-major; the queries are put in sequence
    # order, so each document's queries are one segment and the keys one view.
    plan = _segment_plan(kwargs["position_ids"], query.shape[0], cp, list(range(cp.count)), sliding_window)
    # All-to-all keeps 1/P of each tensor local: q, k, v go out and the output (q-sized) comes back;
    # the backward mirrors it.
    local_bytes = sum(t.numel() * t.element_size() for t in (query, key, value, query))
    LEDGER.bytes_sent["attention"] += local_bytes * (cp.size - 1) // cp.size * (2 if query.requires_grad else 1)

    def local_attention(q, k, v, *args, **kw):  # (B, S, H/P, D): the whole sequence, a slice of heads
        drop = dropout if module.training else 0.0
        q = unshard(list(q.chunk(cp.size, dim=1)), cp.layout)
        out = segment_attention(q.transpose(1, 2), k.movedim(1, 0), v.movedim(1, 0), plan, scaling, drop)
        return torch.cat([shard(out, rank, cp.size, 1, cp.layout) for rank in range(cp.size)], dim=1)

    attention = DistributedAttention(local_attention, cp.group, scatter_idx=2, gather_idx=1)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), batch_dim_idx=0)
    return out.contiguous(), None


_FUNCTIONS = {"allgather": allgather_attention, "ulysses": ulysses_attention}
_registered: dict[tuple[str, int], str] = {}


def register_cp_attention(kind: str, group) -> str:
    """Register the `kind` CP attention bound to `group` (a process group or a `CPGroup`); returns its
    AttentionInterface name."""
    if kind not in KINDS:
        raise ValueError(f"parallel.attention must be one of {', '.join(KINDS)}, got {kind!r}")
    group = as_cp_group(group)
    key = (kind, id(group))  # bound to this CPGroup: its layout changes with every batch under `work`
    if key not in _registered:
        if kind == "ulysses":
            init_deepspeed_comm()
        name = f"cp_{kind}_{len(_registered)}"
        AttentionInterface.register(name, functools.partial(_FUNCTIONS[kind], cp_group=group))
        _registered[key] = name
    return _registered[key]


def init_deepspeed_comm() -> None:
    """DeepSpeed's collectives run over the already initialised torch.distributed group."""
    import deepspeed.comm
    import deepspeed.ops

    if not torch.cuda.is_available():
        # On CPU DeepSpeed JIT-builds a shared-memory all-reduce kernel (an inference speed-up we never
        # call) whose threads abort the process at exit; marking it unavailable keeps every DeepSpeed
        # code path that would build it on plain gloo, which is all Ulysses and the engine need.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
