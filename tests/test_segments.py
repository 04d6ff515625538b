"""The mask-free segment plan against the dense-mask reference, in fp64, one process playing every rank."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.varlen as varlen

from parallel.pieces import fixed_layout
from parallel.segments import (
    _varlen,
    layout_plans,
    naive_document_attention,
    pack_keys,
    piece_plan,
    segment_attention,
)
from parallel.sharding import document_starts, shard

HEADS, KV_HEADS, DIM = 4, 2, 8  # GQA
# Per row of a 48-token batch: documents straddling piece edges; one starting exactly on the edge
# at 24 (contiguous P=2) and at 12 and 36 (head-tail P=2, pieces of 12); a single document.
PACKINGS = ([[5, 11, 9, 23], [10, 14, 24]], [[12, 30, 6], [48]])


def _positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])


def _rank_outputs(q, k, v, positions, size, load_balance, window, attend=segment_attention):
    """Every rank's attention output (B, Lq, H, D) and its plan, from the global q, k, v."""
    keys = torch.cat([shard(k, r, size, 2, load_balance) for r in range(size)], dim=2).movedim(2, 0)
    values = torch.cat([shard(v, r, size, 2, load_balance) for r in range(size)], dim=2).movedim(2, 0)
    plans = layout_plans(positions, fixed_layout(size, load_balance), window)
    return [
        (attend(shard(q, rank, size, 2, load_balance), keys, values, plan, DIM**-0.5), plan)
        for rank, plan in enumerate(plans)
    ]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("load_balance", ["contiguous", "headtail"])
@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("packing", PACKINGS)
def test_segment_plan_equals_dense_mask_reference(packing, size, load_balance, window):
    generator = torch.Generator().manual_seed(0)
    positions = _positions(packing)
    batch, seq = positions.shape

    def leaf(heads):
        return torch.randn(batch, heads, seq, DIM, dtype=torch.float64, generator=generator).requires_grad_()

    q, k, v = leaf(HEADS), leaf(KV_HEADS), leaf(KV_HEADS)
    weight = torch.randn(batch, HEADS, seq, DIM, dtype=torch.float64, generator=generator)
    doc_ids = document_starts(positions).long().cumsum(dim=-1)
    reference = naive_document_attention(q, k, v, 0, doc_ids, DIM**-0.5, 0.0, window)
    want = torch.autograd.grad((reference * weight).sum(), (q, k, v))

    results = _rank_outputs(q, k, v, positions, size, load_balance, window)
    loss = 0
    for rank, (out, _) in enumerate(results):
        expected = shard(reference, rank, size, 2, load_balance).transpose(1, 2)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        loss = loss + (out * shard(weight, rank, size, 2, load_balance).transpose(1, 2)).sum()
    for got, ref in zip(torch.autograd.grad(loss, (q, k, v)), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)

    # The plan's work is the reference mask's visible pairs, and no key is packed twice within a piece.
    index = torch.arange(seq)
    visible = (index[None, :] <= index[:, None]) & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if window:
        visible &= index[None, :] > index[:, None] - window
    assert sum(plan.attended_pairs for _, plan in results) == int(visible.sum())


def test_contiguous_plan_reads_one_view_of_the_keys():
    positions = _positions(PACKINGS[0])
    plan = piece_plan(positions[:1], [1], [0, 1])
    assert plan.key_runs == ((0, 16, 48),)  # row 0 from the start of the document straddling 24
    assert [(s.q_lo, s.q_hi, s.k_lo, s.k_hi) for s in plan.segments] == [(0, 1, 0, 9), (1, 24, 9, 32)]


def flash_varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """flash-attention's varlen semantics in fp64 on CPU: segment n's queries cu_seq_q[n]:cu_seq_q[n+1] against
    its keys cu_seq_k[n]:cu_seq_k[n+1], causal aligned bottom-right, `window_size` (left, 0) keys back."""
    left, right = window_size
    assert right == 0 and enable_gqa == (query.shape[1] != key.shape[1])
    outputs = []
    for n in range(len(cu_seq_q) - 1):
        q = query[cu_seq_q[n] : cu_seq_q[n + 1]].double().transpose(0, 1)
        k = key[cu_seq_k[n] : cu_seq_k[n + 1]].double().transpose(0, 1)
        v = value[cu_seq_k[n] : cu_seq_k[n + 1]].double().transpose(0, 1)
        lq, lk = q.shape[1], k.shape[1]
        assert lq <= max_q and lk <= max_k
        i, j = torch.arange(lq)[:, None] + lk - lq, torch.arange(lk)[None, :]
        visible = (j <= i) & ((j >= i - left) if left >= 0 else True)
        k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
        scores = (q @ k.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        outputs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outputs)


def flash_varlen_reference_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size):
    """torch 2.11's varlen_attn, which has no `enable_gqa`: keys and values must come with the queries' heads."""
    assert key.shape[1] == value.shape[1] == query.shape[1]
    return flash_varlen_reference(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=False
    )


@pytest.mark.parametrize(
    "kernel", [flash_varlen_reference, flash_varlen_reference_without_gqa], ids=["enable_gqa", "torch-2.11"]
)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("load_balance", ["contiguous", "headtail"])
@pytest.mark.parametrize("packing", PACKINGS)
def test_the_cuda_kernels_arguments_reproduce_the_reference(packing, load_balance, window, kernel, monkeypatch):
    """The CUDA path (`_varlen`: cu_seqlens, maxima, window, GQA of one varlen_attn call) with the kernel
    replaced by its semantics in fp64: equal to the dense-mask reference on inputs that bf16 holds exactly
    (the path hands the kernel bf16). A kernel without `enable_gqa` (torch 2.11) gets the key heads repeated."""
    monkeypatch.setattr(varlen, "varlen_attn", kernel)
    generator = torch.Generator().manual_seed(1)
    positions = _positions(packing)
    batch, seq = positions.shape
    q, k, v = (
        torch.randn(batch, h, seq, DIM, generator=generator).bfloat16().double() for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    doc_ids = document_starts(positions).long().cumsum(dim=-1)
    reference = naive_document_attention(q, k, v, 0, doc_ids, DIM**-0.5, 0.0, window)

    def cuda_path(local_q, keys, values, plan, scale):
        return _varlen(local_q, pack_keys(keys, plan), pack_keys(values, plan), plan, scale, 0.0)

    for rank, (got, _) in enumerate(_rank_outputs(q, k, v, positions, 2, load_balance, window, cuda_path)):
        expected = shard(reference, rank, 2, 2, load_balance).transpose(1, 2)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
