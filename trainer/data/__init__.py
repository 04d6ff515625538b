"""Training data: datasets addressed by sequence index, and the loader that batches them per rank.

`data.name` picks the source: a generated task from `trainer.data.synthetic.GENERATORS`
(tokenizer-free, deterministic by seed) or `corpus`, token shards written by `tools.commands.prepare_data`.
"""

from __future__ import annotations

from trainer.data.corpus import CorpusDataset
from trainer.data.loader import SequenceLoader
from trainer.data.synthetic import GENERATORS

__all__ = ["SequenceLoader", "build_dataset", "sizes_only", "stream_identity"]


def build_dataset(name: str, seq_len: int, vocab_size: int, seed: int, options: dict):
    if name in GENERATORS:
        return GENERATORS[name](vocab_size=vocab_size, seq_len=seq_len, seed=seed, **options)
    if name == "corpus":
        return CorpusDataset(vocab_size=vocab_size, seq_len=seq_len, seed=seed, **options)
    choices = ", ".join(sorted([*GENERATORS, "corpus"]))
    raise ValueError(f"data.name must be one of {choices}, got {name!r}")


def sizes_only(name: str, options: dict) -> dict:
    """`options` with corpus shards checked by size alone: for a job whose start-up hashes them once,
    split across its ranks (`trainer.data.shards.verify_prepared`), instead of in every process."""
    return {**options, "verify_checksums": False} if name == "corpus" else options


# Options added after checkpoints were first written, at the value that reads the stream those checkpoints read:
# left out of the identity at that value, so the older checkpoints still resume.
_ADDED_LATER = {"shuffle": False}


def stream_identity(name: str, seq_len: int, seed: int, options: dict) -> dict:
    """What fixes the sequence stream (sequence i is a function of these and i): saved in checkpoints,
    so a resume that would read another stream is refused."""
    kept = {k: v for k, v in options.items() if not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    return {"seed": seed, "data.name": name, "data.seq_len": seq_len, **{f"data.{k}": v for k, v in kept.items()}}
