"""Context-parallel attention, registered through transformers' AttentionInterface.

Each rank holds a contiguous shard of queries, keys and values. Documents (packed sequences) are
masked across shard boundaries from the global `position_ids`, which restart at each document.
- `allgather`: all-gather K/V over the CP group (autograd functional collectives:
  the gradients are reduce-scattered back), attend the local queries with causal offsets; exact, CPU and GPU.
- `ulysses`: DeepSpeed's all-to-all over heads (each rank attends the whole sequence for 1/P of
  the heads); needs the query and key/value head counts divisible by the CP degree.
Both honour `sliding_window` (key k is visible to query q when q - window < k <= q).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

from parallel.comm import LEDGER
from parallel.sharding import document_starts

KINDS = ("allgather", "ulysses")
QUERY_BLOCK = 2048  # queries attended per SDPA call: bounds the boolean mask to QUERY_BLOCK x keys


def global_document_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, S) ids that change at each document start."""
    return document_starts(positions).long().cumsum(dim=-1)


def _gather_positions(position_ids: torch.Tensor, batch: int, group) -> torch.Tensor:
    local = position_ids.expand(batch, -1).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=1)


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather (B, H, S_local, D) shards into (B, H, S, D); the gradient is reduce-scattered back."""
    return _GatherSequence.apply(x, group)


class _GatherSequence(torch.autograd.Function):
    """Synchronous collectives: the asynchronous functional ones let gloo write into buffers that the
    CPU backward had already freed (heap corruption under load)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        shards = x.movedim(2, 0).contiguous()  # the sequence dim first: collectives concatenate along dim 0
        gathered = shards.new_empty((shards.shape[0] * dist.get_world_size(group), *shards.shape[1:]))
        dist.all_gather_into_tensor(gathered, shards, group=group)
        return gathered.movedim(0, 2)

    @staticmethod
    def backward(ctx, grad):
        grads = grad.movedim(2, 0).contiguous()
        mine = grads.new_empty((grads.shape[0] // dist.get_world_size(ctx.group), *grads.shape[1:]))
        dist.reduce_scatter_tensor(mine, grads, group=ctx.group)
        return mine.movedim(0, 2), None


def document_attention(query, key, value, q_start, doc_ids, scaling, dropout, sliding_window):
    """Causal, per-document SDPA of queries at global indices q_start + i against keys 0..K-1.

    query (B, Hq, Lq, D); key/value (B, Hkv, K, D) with Hkv dividing Hq; doc_ids (B, >= K).
    Keys that no query here can see (earlier documents, outside the window) are skipped.
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


def allgather_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    group = kwargs.pop("cp_group")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    positions = _gather_positions(kwargs["position_ids"], query.shape[0], group)
    shard_bytes = key.numel() * key.element_size() + value.numel() * value.element_size()
    # Ring all-gather: every rank sends its shard to P-1 peers; the backward reduce-scatter mirrors it.
    LEDGER.bytes_sent["attention"] += (size - 1) * shard_bytes * (2 if key.requires_grad else 1)
    keys, values = _gather_sequence(key, group), _gather_sequence(value, group)
    out = document_attention(
        query,
        keys,
        values,
        rank * query.shape[2],
        global_document_ids(positions),
        scaling,
        dropout if module.training else 0.0,
        sliding_window,
    )
    return out.transpose(1, 2).contiguous(), None


def ulysses_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    from deepspeed.sequence.layer import DistributedAttention

    group = kwargs.pop("cp_group")
    size = dist.get_world_size(group)
    if query.shape[1] % size or key.shape[1] % size:
        raise ValueError(
            f"parallel.attention=ulysses needs attention heads ({query.shape[1]}) and key/value heads "
            f"({key.shape[1]}) divisible by parallel.cp={size}"
        )
    doc_ids = global_document_ids(_gather_positions(kwargs["position_ids"], query.shape[0], group))
    # All-to-all keeps 1/P of each tensor local: q, k, v go out and the output (q-sized) comes back;
    # the backward mirrors it.
    local_bytes = sum(t.numel() * t.element_size() for t in (query, key, value, query))
    LEDGER.bytes_sent["attention"] += local_bytes * (size - 1) // size * (2 if query.requires_grad else 1)

    def local_attention(q, k, v, *args, **kw):  # (B, S, H/P, D): the whole sequence, a slice of heads
        out = document_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            0,
            doc_ids,
            scaling,
            dropout if module.training else 0.0,
            sliding_window,
        )
        return out.transpose(1, 2)

    attention = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), batch_dim_idx=0)
    return out.contiguous(), None


_FUNCTIONS = {"allgather": allgather_attention, "ulysses": ulysses_attention}
_registered: dict[tuple[str, int], str] = {}


def register_cp_attention(kind: str, group) -> str:
    """Register the `kind` CP attention bound to `group`; returns its AttentionInterface name."""
    if kind not in KINDS:
        raise ValueError(f"parallel.attention must be one of {', '.join(KINDS)}, got {kind!r}")
    key = (kind, id(group))
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
