"""Exact-match recall of the answers of a generated task, scored from one forward per sequence.

A prediction is correct when the greedy next token at every position of an answer span equals the
answer (RULER's exact match, teacher-forced). Works on the model as the training loop holds it:
sequences are split over the CP group like training batches and each data-parallel rank scores its
share, so every rank must call it.
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.distributed as dist

from parallel.sharding import unshard


@torch.no_grad()
def answer_accuracy(step_model, dataset, count: int, ranks, distance_edges: tuple[int, ...] = ()) -> dict:
    """Accuracy over the answers of sequences 0 .. count-1 of `dataset` (rounded up to a multiple of
    the data-parallel size), overall and per key -> answer distance bucket split at `distance_edges`."""
    buckets = len(distance_edges) + 1
    hits, totals = torch.zeros(buckets, dtype=torch.float64), torch.zeros(buckets, dtype=torch.float64)
    per_rank = math.ceil(count / ranks.dp_size)
    was_training = step_model.training
    step_model.eval()
    for index in range(ranks.dp_rank * per_rank, (ranks.dp_rank + 1) * per_rank):
        sample = dataset.sample(index)
        batch = {"input_ids": sample.input_ids, "position_ids": sample.position_ids}
        local = {k: v.to(ranks.device) for k, v in ranks.shard(batch).items()}
        predicted = _gather_sequence(step_model(local["input_ids"], local["position_ids"]), ranks).cpu()
        for answer in sample.answers:
            bucket = bisect.bisect_right(distance_edges, answer.distance)
            expected = sample.input_ids[0, answer.start : answer.end]
            hits[bucket] += float(torch.equal(predicted[0, answer.start - 1 : answer.end - 1], expected))
            totals[bucket] += 1
    step_model.train(was_training)
    if ranks.dp_size > 1:
        counts = torch.stack([hits, totals]).to(ranks.device)
        dist.all_reduce(counts, group=ranks.dp_group)
        hits, totals = counts.cpu()
    return {
        "accuracy": float(hits.sum() / totals.sum()),
        "answers": int(totals.sum()),
        "by_distance": distance_buckets(distance_edges, totals, accuracy=hits),
    }


def distance_buckets(edges, counts, **sums) -> list[dict]:
    """One dict per key -> answer distance bucket split at `edges`: its span ("min", "max": None for the last),
    its answer count and each of `sums` (per-bucket totals) as a mean over its answers (None where it has none)."""
    spans = zip((0, *edges), (*edges, None))
    return [
        {"min": lo, "max": hi, "answers": int(n), **{k: float(v[i] / n) if n else None for k, v in sums.items()}}
        for i, ((lo, hi), n) in enumerate(zip(spans, counts))
    ]


def distance_span(bucket: dict) -> str:
    """A bucket's distances as a table header writes them: "[lo, hi)", or ">= lo" for the last."""
    return f">= {bucket['min']}" if bucket["max"] is None else f"[{bucket['min']}, {bucket['max']})"


def _gather_sequence(local: torch.Tensor, ranks) -> torch.Tensor:
    """The (B, S) predictions of the whole sequence from each CP rank's shard."""
    if ranks.cp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ranks.cp_size)]
    dist.all_gather(parts, local, group=ranks.cp.group)
    return unshard(parts, ranks.cp.layout)
