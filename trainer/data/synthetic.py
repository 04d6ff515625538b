"""Generated long-range recall corpora (no download), in their own small vocabulary.

A dataset makes sequence i from (seed, i) alone, so any process, at any world size, regenerates
exactly the same sequence; the loader's position is one integer (sequences consumed by the whole
job), saved in checkpoints so a resumed run continues on the exact next sequence.
"""

from __future__ import annotations

import torch

from parallel.sharding import next_token_labels

_BOS, _SPECIALS = 1, 4  # token ids below _SPECIALS are reserved


class SyntheticRecall:
    """Multi-query associative recall documents in their own small vocabulary.

    A document opens with `num_pairs` key-value pairs, continues with random filler and ends by
    repeating the keys (in another order) each followed by its value: predicting those values needs
    memory of the document's beginning. `docs_per_sequence` > 1 packs several documents, with
    position ids restarting at each.
    """

    def __init__(
        self, vocab_size: int, seq_len: int, seed: int, num_pairs: int = 8, docs_per_sequence: int = 1
    ) -> None:
        keys = (vocab_size - _SPECIALS) // 4
        if keys < num_pairs:
            raise ValueError(f"data: vocab_size={vocab_size} is too small for num_pairs={num_pairs}")
        if seq_len // docs_per_sequence < 4 * num_pairs + 2:
            raise ValueError(f"data: documents of {seq_len // docs_per_sequence} tokens cannot hold {num_pairs} pairs")
        self.seq_len, self.seed, self.num_pairs, self.docs = seq_len, seed, num_pairs, docs_per_sequence
        self.keys = torch.arange(_SPECIALS, _SPECIALS + keys)
        self.values = torch.arange(_SPECIALS + keys, _SPECIALS + 2 * keys)
        self.filler = torch.arange(_SPECIALS + 2 * keys, vocab_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        cuts = torch.linspace(0, self.seq_len, self.docs + 1).long().tolist()
        docs = [self._document(b - a, generator) for a, b in zip(cuts[:-1], cuts[1:])]
        input_ids = torch.cat(docs).unsqueeze(0)
        position_ids = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "labels": next_token_labels(input_ids, position_ids),
        }

    def _document(self, length: int, generator: torch.Generator) -> torch.Tensor:
        n = self.num_pairs
        keys = self.keys[torch.randperm(len(self.keys), generator=generator)[:n]]
        values = self.values[torch.randint(len(self.values), (n,), generator=generator)]
        order = torch.randperm(n, generator=generator)
        writes = torch.stack([keys, values], dim=1).flatten()
        reads = torch.stack([keys[order], values[order]], dim=1).flatten()
        filler = self.filler[torch.randint(len(self.filler), (length - 1 - 4 * n,), generator=generator)]
        return torch.cat([torch.tensor([_BOS]), writes, filler, reads])


GENERATORS = {"synthetic_recall": SyntheticRecall}
