"""Training data: datasets addressed by sequence index, and the loader that batches them per rank."""

from __future__ import annotations

from trainer.data.loader import SequenceLoader
from trainer.data.synthetic import SyntheticRecall

__all__ = ["SequenceLoader", "build_dataset"]


def build_dataset(name: str, seq_len: int, vocab_size: int, seed: int, options: dict):
    if name != "synthetic_recall":
        raise ValueError(f"data.name must be synthetic_recall, got {name!r}")
    return SyntheticRecall(vocab_size, seq_len, seed, **options)
