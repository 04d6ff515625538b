"""Mean next-token NLL by position bucket over long documents, read through the TTT cache one piece at a
time, so that only one piece's logits are ever held (decoding equals the full forward exactly, see
tests/test_inference.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from trainer.inference import prefill

SPACINGS = ("log", "linear")


def bucket_edges(length: int, count: int, spacing: str) -> list[int]:
    """Edges of `count` buckets over positions [0, length): equal widths ("linear"), or widths doubling up
    to the last bucket [length/2, length) ("log"). Buckets that would be empty at short lengths merge."""
    if spacing == "linear":
        edges = [round(i * length / count) for i in range(count + 1)]
    else:
        edges = [0] + [length >> (count - 1 - i) for i in range(count)]
    return sorted(set(edges))


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, piece_tokens: int) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t = 1 .. S-1 of one document (1, S), as fp32 (S - 1,)."""
    cache, parts = None, []
    for start in range(0, ids.shape[1] - 1, piece_tokens):
        logits, cache = prefill(model, ids[:, start : start + piece_tokens], cache, all_logits=True)
        targets = ids[0, start + 1 : start + piece_tokens + 1]
        log_probs = torch.log_softmax(logits[0, : len(targets)].float(), dim=-1)
        parts.append(-log_probs.gather(-1, targets[:, None])[:, 0].cpu())
    return torch.cat(parts)


def nll_by_position(model, documents: Iterable[torch.Tensor], edges: list[int], piece_tokens: int) -> dict:
    """Mean NLL and perplexity of the tokens at positions [start, end) of each bucket, over `documents`
    ((1, S) ids on the model's device, S <= edges[-1]); a document shorter than a bucket adds its share."""
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    count = 0
    for ids in documents:
        nll = token_nll(model, ids, piece_tokens).double()
        bucket = torch.bucketize(torch.arange(1, ids.shape[1]), torch.tensor(edges[1:-1]), right=True)
        sums.index_add_(0, bucket, nll)
        counts.index_add_(0, bucket, torch.ones_like(nll))
        count += 1
    buckets = [
        {"start": a, "end": b, "tokens": int(n), "nll": float(s / n) if n else None,
         "ppl": math.exp(s / n) if n else None}
        for a, b, s, n in zip(edges[:-1], edges[1:], sums.tolist(), counts.tolist())
    ]  # fmt: skip
    total = float(sums.sum() / counts.sum())
    return {"documents": count, "tokens": int(counts.sum()), "nll": total, "ppl": math.exp(total), "buckets": buckets}
