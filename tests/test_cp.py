"""Context parallelism on CPU/gloo: CP=2 and CP=4 reproduce CP=1 losses and gradients exactly."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import MODEL_BUILDERS, VOCAB, randomize_ttt_parameters, tiny_qwen3
from multiproc import run_ranks

import parallel.attention as attention_module
import parallel.state_scan as state_scan
import trainer.ops.fastweight.chunk as torch_scan
import trainer.ttt.mlp
from parallel.comm import LEDGER
from parallel.context_parallel import apply_cp
from parallel.mesh import build_mesh, check_cp
from parallel.pieces import CPGroup, work_layout
from parallel.sharding import IGNORE_INDEX, next_token_labels, shard, shard_batch, unshard
from parallel.state_scan import exclusive_state_scan, naive_state_scan, scan_rounds
from trainer.ttt import TTTConfig, patch_model

CHUNK = 4
# Documents of a 32-token sequence: one starts exactly on the shard boundary at 16 and chunks of
# the others straddle shard boundaries (pending chunk writes, conv and NTP halos).
PACKINGS = ([5, 11, 9, 7], [3, 29])


def build(family: str, method: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = MODEL_BUILDERS[family](dtype=dtype)
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


def assert_cp_matches_reference(
    family, method, attention, lengths, group, load_balance="contiguous", fp64=False, overlap=False
):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    dtype, tolerance = (torch.float64, 1e-10) if fp64 else (torch.float32, 1e-5)
    batch = make_batch(lengths)
    total = int((batch["labels"] != IGNORE_INDEX).sum())
    reference = build(family, method, dtype=dtype)
    ref_loss = summed_loss(reference, batch, total)
    ref_loss.backward()
    cp = CPGroup(group, load_balance, overlap)
    model = apply_cp(build(family, method, dtype=dtype), cp, attention)
    loss = summed_loss(model, shard_batch(batch, rank, size, cp.arrange(batch["position_ids"])), total)
    loss.backward()
    dist.all_reduce(loss := loss.detach(), group=group)
    where = f"{family}/{method}/{attention}/{load_balance}/{lengths} cp={size}"
    assert relative_error(loss, ref_loss.detach()) < tolerance, where
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        assert relative_error(grad, ref_param.grad) < 10 * tolerance, f"{where}: {name}"


def _exactness(rank, world_size, cases, load_balance="contiguous", fp64=False, overlap=False):
    for family, method, attention, lengths in cases:
        lengths = lengths(world_size) if callable(lengths) else lengths
        assert_cp_matches_reference(family, method, attention, lengths, dist.group.WORLD, load_balance, fp64, overlap)


ALLGATHER_CASES = [
    (family, method, "allgather", lengths)
    for family in ("qwen3", "llama")
    for method in ("none", "inplace", "ntp")
    for lengths in PACKINGS
] + [("mistral", "ntp", "allgather", lengths) for lengths in PACKINGS]  # sliding-window attention


@pytest.mark.parametrize("world_size", [2, 4])
def test_cp_allgather_equals_single_process(tmp_path, world_size):
    # fp64: in fp32 the write gate's bias gradient, a sum of many cancelling terms, differs by summation order
    run_ranks(_exactness, world_size, tmp_path, ALLGATHER_CASES, "contiguous", True)


# 48 tokens: 2P pieces of 12, 8 and 6 at P = 2, 3, 4. Documents start on piece edges (12, 24) and
# inside pieces; chunks straddle piece edges, so pending writes and halos cross them.
HEADTAIL_PACKINGS = ([5, 11, 9, 7, 16], [3, 9, 12, 24])
HEADTAIL_CASES = [
    (family, method, "allgather", lengths)
    for family in ("qwen3",)
    for method in ("none", "inplace", "ntp")
    for lengths in HEADTAIL_PACKINGS
] + [("mistral", "inplace", "allgather", HEADTAIL_PACKINGS[0])]  # sliding-window attention


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_cp_headtail_equals_single_process_in_fp64(tmp_path, world_size):
    run_ranks(_exactness, world_size, tmp_path, HEADTAIL_CASES, "headtail", True, True)  # the overlapped scan


# load_balance=work at P ranks: 8P pieces of one chunk (4 tokens) each, so every chunk edge is a piece
# edge. Short documents, then a long one whose pieces carry most of the work and end up spread over
# the ranks out of sequence order; or two long documents.
def short_then_long(ranks: int) -> list[int]:
    return [5, 11, 9, 7, 32 * ranks - 32]


def two_long(ranks: int) -> list[int]:
    return [16 * ranks + 3, 16 * ranks - 3]


WORK_PACKINGS = (short_then_long, two_long)
WORK_CASES = [
    ("qwen3", method, "allgather", lengths) for method in ("none", "inplace", "ntp") for lengths in WORK_PACKINGS
] + [("mistral", "ntp", "allgather", WORK_PACKINGS[0])]  # sliding-window attention


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_cp_work_layout_equals_single_process_in_fp64(tmp_path, world_size):
    run_ranks(_exactness, world_size, tmp_path, WORK_CASES, "work", True)


def test_work_layout_spreads_a_long_document_and_keeps_piece_counts_equal():
    positions = torch.cat([torch.arange(n) for n in (5, 11, 9, 7, 96)]).unsqueeze(0)
    layout = work_layout(positions, 4, 8)
    assert sorted(p for pieces in layout for p in pieces) == list(range(32))
    assert all(len(pieces) == 8 and list(pieces) == sorted(pieces) for pieces in layout)
    work = (positions[0].double() + 1).reshape(32, 4).sum(1)
    loads = torch.stack([work[list(pieces)].sum() for pieces in layout])
    assert float(loads.max() / loads.mean()) < 1.05
    assert work_layout(positions, 4, 8) == layout  # the same on every rank
    contiguous = work.reshape(4, 8).sum(1)
    assert float(contiguous.max() / contiguous.mean()) > 2  # what the layout avoids


def _state_scan_overlaps_the_local_scan(rank, world_size):
    """The scan on the side thread waits until this thread has entered the local chunk scan (forward)
    and its backward (adjoint scan): without the overlap the waits would time out."""
    local_forward, local_backward = threading.Event(), threading.Event()
    overlapped = []
    chunk_scan, chunk_backward = trainer.ttt.mlp.chunk_scan, torch_scan._ChunkScan.backward
    forward_scan, adjoint_scan = state_scan._forward_scan, state_scan._adjoint_scan

    def entering(event, function):
        def run(*args):
            event.set()
            return function(*args)

        return run

    def waiting_for(event, function):
        def run(*args):
            if args[0].shape[-1] > 1:  # a value read's states (d x h); the gate mass's (d x 1) scan runs in line
                overlapped.append(event.wait(timeout=30))
            return function(*args)

        return run

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.ttt.mlp, "chunk_scan", entering(local_forward, chunk_scan))
        patch.setattr(torch_scan._ChunkScan, "backward", staticmethod(entering(local_backward, chunk_backward)))
        patch.setattr(state_scan, "_forward_scan", waiting_for(local_forward, forward_scan))
        patch.setattr(state_scan, "_adjoint_scan", waiting_for(local_backward, adjoint_scan))
        batch = make_batch([40, 24])
        model = apply_cp(build("qwen3", "ntp"), CPGroup(dist.group.WORLD, "headtail", overlap=True), "allgather")
        local = shard_batch(batch, rank, world_size, "headtail")
        summed_loss(model, local, 64).backward()
    ttt_layers = sum(isinstance(m, trainer.ttt.mlp.FastWeightMLP) for m in model.modules())
    # a forward and an adjoint scan per value read (the gate mass's prefix sum has nothing to overlap)
    assert overlapped == [True] * (2 * ttt_layers)


def _one_plan_per_forward(rank, world_size):
    gathered = []
    gather = attention_module._global_positions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention_module, "_global_positions", lambda *a: gathered.append(1) or gather(*a))
        model = apply_cp(build("qwen3", "ntp"), dist.group.WORLD)
        for lengths in ([40, 24], [64]):  # a new batch, a new plan
            summed_loss(model, shard_batch(make_batch(lengths), rank, world_size), 64).backward()
    assert model.config.num_hidden_layers > 1 and len(gathered) == 2


def test_attention_layers_of_a_forward_share_one_segment_plan(tmp_path):
    run_ranks(_one_plan_per_forward, 2, tmp_path)


def test_state_scan_messages_fly_while_the_local_scan_runs(tmp_path):
    run_ranks(_state_scan_overlaps_the_local_scan, 2, tmp_path)


def test_cp_ulysses_equals_single_process(tmp_path):
    cases = [("qwen3", method, "ulysses", PACKINGS[0]) for method in ("none", "ntp")]
    run_ranks(_exactness, 2, tmp_path, cases, "headtail")


def _ulysses_head_check(rank, world_size):
    model = apply_cp(tiny_qwen3(dtype=torch.float32), dist.group.WORLD, "ulysses")  # 2 key/value heads
    batch = shard_batch(make_batch([32]), rank, world_size)
    with pytest.raises(ValueError, match="divisible by parallel.cp=4"):
        model(batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def test_ulysses_needs_divisible_heads(tmp_path):
    run_ranks(_ulysses_head_check, 4, tmp_path)


def _state_scan(rank, world_size, load_balance):
    cp = CPGroup(dist.group.WORLD, load_balance)
    generator = torch.Generator().manual_seed(7)
    transfers = [
        (
            torch.randn(2, 3, 5, dtype=torch.float64, generator=generator),
            torch.randn(2, 3, 5, dtype=torch.float64, generator=generator),
            torch.rand(2, generator=generator) < 0.4,
        )
        for _ in range(cp.count)
    ]
    leaves = [(d.requires_grad_(), p.requires_grad_(), r) for d, p, r in transfers]
    expected = naive_state_scan(leaves)
    weights = [torch.randn(2, 2, 3, 5, dtype=torch.float64, generator=generator) for _ in range(cp.count)]
    ref_loss = sum((torch.stack(s, 1) * w).sum() for s, w in zip(expected, weights))
    mine = cp.pieces()
    ref_grads = torch.autograd.grad(ref_loss, [t for i in mine for t in leaves[i][:2]], allow_unused=True)
    ref_grads = [torch.zeros(2, 3, 5, dtype=torch.float64) if g is None else g for g in ref_grads]  # last piece

    def piece_rows(tensors):  # (B, ...) per local piece -> (B n, ...) piece rows
        return torch.stack(tensors, dim=1).flatten(0, 1)

    committed_in, pending_in = (piece_rows([transfers[i][k] for i in mine]).detach().requires_grad_() for k in (0, 1))
    LEDGER.reset()
    committed, pending = exclusive_state_scan(committed_in, pending_in, piece_rows([transfers[i][2] for i in mine]), cp)
    assert LEDGER.rounds["fastweight_scan"] == scan_rounds(cp.count) == math.ceil(math.log2(cp.count))
    torch.testing.assert_close(committed, piece_rows([expected[i][0].detach() for i in mine]))
    torch.testing.assert_close(pending, piece_rows([expected[i][1].detach() for i in mine]))
    local_loss = (torch.stack([committed, pending], 1) * piece_rows([weights[i] for i in mine])).sum()
    grads = torch.autograd.grad(local_loss, [committed_in, pending_in])
    assert LEDGER.rounds["fastweight_scan"] == 2 * scan_rounds(cp.count)  # the backward is a scan too
    torch.testing.assert_close(grads[0], piece_rows(ref_grads[0::2]))
    torch.testing.assert_close(grads[1], piece_rows(ref_grads[1::2]))


@pytest.mark.parametrize("load_balance", ["contiguous", "headtail"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_state_scan_equals_sequential_reference_in_log_rounds(tmp_path, world_size, load_balance):
    run_ranks(_state_scan, world_size, tmp_path, load_balance)


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


def test_headtail_shards_hold_pieces_r_and_2p_minus_1_minus_r():
    sequence = torch.arange(24).unsqueeze(0)
    shards = [shard(sequence, rank, 3, load_balance="headtail") for rank in range(3)]
    assert [s[0, ::4].tolist() for s in shards] == [[0, 20], [4, 16], [8, 12]]
    assert torch.equal(unshard(shards, "headtail"), sequence)


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
        (4, 2, 40, "parallel.load_balance=headtail needs data.seq_len=40 to be a multiple of 2 x"),
    ],
)
def test_bad_cp_degree(world_size, cp, seq_len, message):
    with pytest.raises(ValueError, match=message):
        check_cp(world_size, cp, seq_len, CHUNK if seq_len else None, "headtail")


def test_load_balance_config():
    from trainer.compose import compose_config
    from trainer.config import ConfigError, job_config

    def job(*overrides):
        return job_config(compose_config(["experiment=smoke", *overrides]))

    assert job().parallel.load_balance == "headtail"  # the default config runs CP=2
    assert job("parallel=single").parallel.load_balance == "contiguous"
    assert job("data.seq_len=192", "parallel.load_balance=contiguous").parallel.load_balance == "contiguous"
    with pytest.raises(
        ConfigError, match=r"^parallel.load_balance must be contiguous, or headtail with data.seq_len a"
    ):
        job("data.seq_len=192")
