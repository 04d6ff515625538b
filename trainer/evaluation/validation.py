"""The validation loss: the mean next-token loss of a fixed set of held-out sequences, overall and by position.

The sequences are the first `eval.samples` of the held-out corpus `eval.data` (prepared as the training corpus is,
read at `eval.seed`): the same ones at every evaluation and in every run. A token's bucket is its position in its
document, in buckets whose widths double up to the sequence length, so that the long-context part shows apart
from the start of the documents. It works on the model as the training loop holds it: sequences are split over the
CP group as training batches are and each data-parallel rank scores its share; the sums are all-reduced, so every
rank gets the numbers one process would (tests/test_validation.py). Every rank must call it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from parallel.sharding import IGNORE_INDEX
from trainer.data.corpus import CorpusDataset
from trainer.evaluation.perplexity import bucket_edges

MAX_BUCKETS = 6


def validation_set(sources, seq_len: int, vocab_size: int, seed: int) -> CorpusDataset:
    """The held-out sequences of `eval.data`, as the training corpus reads its sources (packed)."""
    return CorpusDataset(vocab_size=vocab_size, seq_len=seq_len, seed=seed, sources=list(sources))


def position_edges(seq_len: int) -> list[int]:
    return bucket_edges(seq_len, min(MAX_BUCKETS, max(1, int(math.log2(seq_len)))), "log")


@torch.no_grad()
def validation_loss(step_model, dataset, count: int, ranks) -> dict:
    """Mean loss over the labelled tokens of sequences 0 .. count-1 of `dataset` (rounded up to a multiple of the
    data-parallel size), and per position bucket: {"loss", "tokens", "by_position": [{start, end, tokens, loss}]}."""
    edges = position_edges(dataset.seq_len)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    tokens = torch.zeros(len(edges) - 1, dtype=torch.float64)
    per_rank = math.ceil(count / ranks.dp_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ranks.device.type == "cuda")
    was_training = step_model.training
    step_model.eval()
    for index in range(ranks.dp_rank * per_rank, (ranks.dp_rank + 1) * per_rank):
        local = {k: v.to(ranks.device) for k, v in ranks.shard(dataset[index]).items()}
        with autocast:
            losses = step_model(local["input_ids"], local["position_ids"], local["labels"], per_token=True)
        labelled = (local["labels"] != IGNORE_INDEX).flatten().cpu()
        bucket = torch.bucketize(local["position_ids"].expand_as(local["labels"]).flatten().cpu(),
                                 torch.tensor(edges[1:-1]), right=True)[labelled]  # fmt: skip
        sums.index_add_(0, bucket, losses.flatten().cpu()[labelled].double())
        tokens.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    step_model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank's tokens: its CP shard of its DP share
        totals = torch.stack([sums, tokens]).to(ranks.device)
        dist.all_reduce(totals)
        sums, tokens = totals.cpu()
    by_position = [
        {"start": a, "end": b, "tokens": int(n), "loss": float(s / n) if n else None}
        for a, b, s, n in zip(edges[:-1], edges[1:], sums.tolist(), tokens.tolist())
    ]
    return {"loss": float(sums.sum() / tokens.sum()), "tokens": int(tokens.sum()), "by_position": by_position}


def validation_record(scores: dict) -> dict[str, float]:
    """The metrics.jsonl / W&B keys of a validation: val/loss and val/loss/<start>-<end> per position bucket."""
    record = {"val/loss": scores["loss"]}
    record.update({f"val/loss/{b['start']}-{b['end']}": b["loss"] for b in scores["by_position"] if b["tokens"]})
    return record
