"""Context parallelism on CPU/gloo: CP=2 and CP=4 reproduce CP=1 losses and gradients exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import MODEL_BUILDERS, VOCAB, randomize_ttt_parameters, tiny_qwen3
from multiproc import run_ranks

from parallel.comm import LEDGER
from parallel.context_parallel import apply_cp
from parallel.mesh import build_mesh, check_cp
from parallel.sharding import IGNORE_INDEX, next_token_labels, shard, shard_batch
from parallel.state_scan import exclusive_state_scan, naive_state_scan, scan_rounds
from trainer.ttt import TTTConfig, patch_model

CHUNK = 4
# Documents of a 32-token sequence: one starts exactly on the shard boundary at 16 and chunks of
# the others straddle shard boundaries (pending chunk writes, conv and NTP halos).
PACKINGS = ([5, 11, 9, 7], [3, 29])


def build(family: str, method: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_BUILDERS[family](dtype=torch.float32)
    patch_model(model, TTTConfig(method=method, chunk_size=CHUNK, lr=0.5))
    randomize_ttt_parameters(model)
    return model.train()


def make_batch(lengths, batch=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).expand(batch, -1)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": next_token_labels(input_ids, position_ids)}


def summed_loss(model, batch, total_tokens):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / total_tokens


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def assert_cp_matches_reference(family, method, attention, lengths, group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    batch = make_batch(lengths)
    total = int((batch["labels"] != IGNORE_INDEX).sum())
    reference = build(family, method)
    ref_loss = summed_loss(reference, batch, total)
    ref_loss.backward()
    model = apply_cp(build(family, method), group, attention)
    loss = summed_loss(model, shard_batch(batch, rank, size), total)
    loss.backward()
    dist.all_reduce(loss := loss.detach(), group=group)
    where = f"{family}/{method}/{attention}/{lengths} cp={size}"
    assert relative_error(loss, ref_loss.detach()) < 1e-5, where
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        assert relative_error(grad, ref_param.grad) < 1e-4, f"{where}: {name}"


def _exactness(rank, world_size, cases):
    for family, method, attention, lengths in cases:
        assert_cp_matches_reference(family, method, attention, lengths, dist.group.WORLD)


ALLGATHER_CASES = [
    (family, method, "allgather", lengths)
    for family in ("qwen3", "llama")
    for method in ("none", "inplace", "ntp")
    for lengths in PACKINGS
] + [("mistral", "ntp", "allgather", lengths) for lengths in PACKINGS]  # sliding-window attention


@pytest.mark.parametrize("world_size", [2, 4])
def test_cp_allgather_equals_single_process(tmp_path, world_size):
    run_ranks(_exactness, world_size, tmp_path, ALLGATHER_CASES)


def test_cp_ulysses_equals_single_process(tmp_path):
    cases = [("qwen3", method, "ulysses", PACKINGS[0]) for method in ("none", "ntp")]
    run_ranks(_exactness, 2, tmp_path, cases)


def _ulysses_head_check(rank, world_size):
    model = apply_cp(tiny_qwen3(dtype=torch.float32), dist.group.WORLD, "ulysses")  # 2 key/value heads
    batch = shard_batch(make_batch([32]), rank, world_size)
    with pytest.raises(ValueError, match="divisible by parallel.cp=4"):
        model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def test_ulysses_needs_divisible_heads(tmp_path):
    run_ranks(_ulysses_head_check, 4, tmp_path)


def _state_scan(rank, world_size):
    generator = torch.Generator().manual_seed(7)
    transfers = [
        (
            torch.randn(2, 3, 5, dtype=torch.float64, generator=generator),
            torch.randn(2, 3, 5, dtype=torch.float64, generator=generator),
            torch.rand(2, generator=generator) < 0.4,
        )
        for _ in range(world_size)
    ]
    leaves = [(d.requires_grad_(), p.requires_grad_(), r) for d, p, r in transfers]
    expected = naive_state_scan(leaves)
    weights = [torch.randn(2, 2, 3, 5, dtype=torch.float64, generator=generator) for _ in range(world_size)]
    ref_loss = sum((torch.stack(s, 1) * w).sum() for s, w in zip(expected, weights))
    ref_grads = torch.autograd.grad(ref_loss, [leaves[rank][0], leaves[rank][1]], allow_unused=True)
    ref_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(ref_grads, leaves[rank][:2])]  # last rank

    mine = [t.detach().clone().requires_grad_() for t in transfers[rank][:2]]
    LEDGER.reset()
    committed, pending = exclusive_state_scan(*mine, transfers[rank][2], dist.group.WORLD)
    assert LEDGER.rounds["fastweight_scan"] == scan_rounds(world_size) == math.ceil(math.log2(world_size))
    torch.testing.assert_close(committed, expected[rank][0].detach())
    torch.testing.assert_close(pending, expected[rank][1].detach())
    local_loss = (torch.stack([committed, pending], 1) * weights[rank]).sum()
    grads = torch.autograd.grad(local_loss, mine)
    assert LEDGER.rounds["fastweight_scan"] == 2 * scan_rounds(world_size)  # the backward is a scan too
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_state_scan_equals_sequential_reference_in_log_rounds(tmp_path, world_size):
    run_ranks(_state_scan, world_size, tmp_path)


def _data_and_context_parallel(rank, world_size):
    """dp=2 x cp=2: the loss is the mean over every real token of the DP x CP group."""
    mesh = build_mesh(cp=2)
    dp_rank, cp_group = mesh["dp"].get_local_rank(), mesh["cp"].get_group()
    batches = [make_batch(PACKINGS[0], seed=1), make_batch(PACKINGS[1], seed=2)]
    total = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    reference = build("qwen3", "ntp")
    ref_loss = sum(summed_loss(reference, b, total) for b in batches)
    ref_loss.backward()
    model = apply_cp(build("qwen3", "ntp"), cp_group, "allgather")
    loss = summed_loss(model, shard_batch(batches[dp_rank], mesh["cp"].get_local_rank(), 2), total)
    loss.backward()
    dist.all_reduce(loss := loss.detach())
    assert relative_error(loss, ref_loss.detach()) < 1e-5
    for param, ref_param in zip(model.parameters(), reference.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad)
        assert relative_error(grad, ref_param.grad) < 1e-4


def test_data_parallel_times_context_parallel(tmp_path):
    run_ranks(_data_and_context_parallel, 4, tmp_path)


def test_labels_are_shifted_before_sharding():
    batch = make_batch([5, 11])
    labels = batch["labels"]
    assert labels[0, 4] == IGNORE_INDEX and labels[0, 15] == IGNORE_INDEX  # documents' last tokens
    assert labels[0, 7] == batch["input_ids"][0, 8]  # the last token of shard 0 predicts shard 1's first
    assert torch.equal(shard(labels, 0, 2)[0, -1], batch["input_ids"][0, 8])


@pytest.mark.parametrize(
    "world_size,cp,seq_len,message",
    [
        (4, 3, None, "does not divide the world size 4"),
        (4, 2, 36, "must be a multiple of parallel.cp x ttt.chunk_size"),
    ],
)
def test_bad_cp_degree(world_size, cp, seq_len, message):
    with pytest.raises(ValueError, match=message):
        check_cp(world_size, cp, seq_len, CHUNK if seq_len else None)
