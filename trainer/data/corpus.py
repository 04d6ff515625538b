"""Training sequences from prepared token shards (`tools.commands.prepare_data`), addressed by index.

The plan is fixed at construction and depends on the seed alone, so sequence i is the same in every
process, at any world size, after any restart (the loader's position is all a checkpoint needs):

- Documents: every document of every source with at least `min_doc_len` tokens.
- Mixture: source s gets the share w_s / sum(w) of each epoch's tokens. Inside a source, documents at
  least `long_doc_len` tokens long are drawn `long_doc_upsample` times as often as shorter ones (the
  usual recipe for long-context continual training: more long documents, same domain mix). Document d
  of length L_d and factor u_d appears r_d = u_d * w_s T / sum_{e in s} u_e L_e times per epoch, with
  T = sum over all documents of u_d L_d (weights proportional to the sources' sizes and no upsampling
  give every document once), r_d rounded up or down at random once (by seed), so its expectation is
  exact and every epoch holds the same documents.
- Epoch e lays those document instances back to back in an order shuffled by (seed, e). With `packing`
  the stream is cut into seq_len sequences (a tail shorter than one sequence is dropped); without, each
  instance starts a new sequence and its last one is padded (padding is its own document, no labels).
- With `shuffle`, the epoch's sequences are read in an order shuffled by (seed, epoch): without it, a batch of
  consecutive sequences is often one long document's consecutive pieces (a file of 100k tokens fills 200
  sequences of 512 in a row), so steps see few documents and their gradients are strongly correlated.
- A document cut by a sequence end continues in the next sequence as a new document: position ids
  restart at 0 at every document start and only there (`parallel.sharding.document_starts`), so
  attention and fast weights start fresh on each piece, and labels never cross a document.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from parallel.sharding import IGNORE_INDEX, next_token_labels
from trainer.data.errors import DataError
from trainer.data.shards import open_prepared

_PAD_ID = 0  # any id works: padding is a document of its own and carries no labels


def _sources(sources) -> list[tuple[Path, float]]:
    """[(folder, weight)] from a list of folders or {path, weight} mappings (weight 1 when left out)."""
    example = "e.g. data.sources=[{path:/data/prepared,weight:1.0}]"
    if not isinstance(sources, (list, tuple)) or not sources:
        raise DataError(f"data.sources must list prepared folders, {example}; got {sources!r}")
    parsed = []
    for index, source in enumerate(sources):
        source = {"path": source} if isinstance(source, str) else source
        weight = source.get("weight", 1.0) if isinstance(source, dict) else None
        valid = isinstance(source, dict) and set(source) <= {"path", "weight"} and isinstance(source.get("path"), str)
        if not valid or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"data.sources[{index}] must be a folder or {{path, weight > 0}}, got {source!r}")
        parsed.append((Path(source["path"]), float(weight)))
    return parsed


def _non_negative_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"data.{key} must be an integer >= 0, got {value!r}")
    return value


class CorpusDataset:
    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        seed: int,
        sources=(),
        packing: bool = True,
        min_doc_len: int = 0,
        long_doc_len: int | None = None,
        long_doc_upsample: float = 1.0,
        verify_checksums: bool = True,
        shuffle: bool = False,
    ) -> None:
        weighted = _sources(sources)
        min_doc_len = _non_negative_int(min_doc_len, "min_doc_len")
        long_doc_len = seq_len if long_doc_len is None else _non_negative_int(long_doc_len, "long_doc_len")
        if isinstance(long_doc_upsample, bool) or not isinstance(long_doc_upsample, (int, float)):
            raise DataError(f"data.long_doc_upsample must be a number > 0, got {long_doc_upsample!r}")
        if not long_doc_upsample > 0:
            raise DataError(f"data.long_doc_upsample must be a number > 0, got {long_doc_upsample!r}")
        if not isinstance(shuffle, bool):
            raise DataError(f"data.shuffle must be true or false, got {shuffle!r}")
        self.seq_len, self.packing, self.shuffle = seq_len, bool(packing), shuffle
        self.folders = [folder for folder, _ in weighted]
        self._seed = seed % (1 << 64)

        self._tokens: list[np.ndarray] = []  # memory-mapped shards of all sources
        shard, start, length, source = [], [], [], []
        for index, (folder, _) in enumerate(weighted):
            manifest, shards = open_prepared(folder, checksums=bool(verify_checksums))
            if manifest["max_token_id"] >= vocab_size:
                raise DataError(
                    f"data.sources[{index}]: {folder} holds token ids up to {manifest['max_token_id']}, "
                    f"beyond the model's vocab_size={vocab_size} (tokenizer: {manifest['tokenizer']['vocab_size']})"
                )
            for piece in shards:
                count = len(piece.offsets) - 1
                shard.append(np.full(count, len(self._tokens)))
                start.append(piece.offsets[:-1])
                length.append(np.diff(piece.offsets))
                source.append(np.full(count, index))
                self._tokens.append(piece.tokens)
        self._doc_shard, self._doc_start = np.concatenate(shard), np.concatenate(start)
        self._doc_len, self._doc_source = np.concatenate(length), np.concatenate(source)

        eligible = self._doc_len >= min_doc_len
        for index, (folder, _) in enumerate(weighted):
            if not eligible[self._doc_source == index].any():
                raise DataError(f"data.sources[{index}]: no document of {folder} has data.min_doc_len={min_doc_len}")
        upsample = np.where(self._doc_len >= long_doc_len, float(long_doc_upsample), 1.0) * eligible
        weights = np.array([w for _, w in weighted])
        self._instances = self._instances_per_epoch(upsample, weights / weights.sum())
        self._span = self._doc_len if self.packing else -(-self._doc_len // seq_len) * seq_len
        self.sequences_per_epoch = int(self._span[self._instances].sum()) // seq_len
        if self.sequences_per_epoch == 0:
            raise DataError(f"data: the sources hold fewer than data.seq_len={seq_len} tokens")
        self._epoch_plan: tuple[int, np.ndarray, np.ndarray] | None = None
        self._sequence_order: tuple[int, np.ndarray] | None = None

    def _instances_per_epoch(self, upsample: np.ndarray, share: np.ndarray) -> np.ndarray:
        """Document ids, each repeated as often as it appears in one epoch (see the module docstring)."""
        mass = upsample * self._doc_len
        source_mass = np.bincount(self._doc_source, weights=mass, minlength=len(share))
        repeats = upsample * (share * mass.sum() / source_mass)[self._doc_source]
        whole = np.floor(repeats)
        extra = np.random.default_rng([self._seed, 0]).random(len(repeats)) < repeats - whole
        return np.repeat(np.arange(len(repeats)), (whole + extra).astype(np.int64))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch `epoch`'s document order and where each instance ends in its token stream."""
        if self._epoch_plan is None or self._epoch_plan[0] != epoch:
            order = np.random.default_rng([self._seed, 1, epoch]).permutation(self._instances)
            self._epoch_plan = (epoch, order, np.cumsum(self._span[order]))
        return self._epoch_plan[1], self._epoch_plan[2]

    def _shuffled(self, epoch: int, local: int) -> int:
        """Which of epoch `epoch`'s sequences (in stream order) is read at `local` (`shuffle`)."""
        if self._sequence_order is None or self._sequence_order[0] != epoch:
            order = np.random.default_rng([self._seed, 2, epoch]).permutation(self.sequences_per_epoch)
            self._sequence_order = (epoch, order)
        return int(self._sequence_order[1][local])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, local = divmod(index, self.sequences_per_epoch)
        if self.shuffle:
            local = self._shuffled(epoch, local)
        order, ends = self._epoch(epoch)
        begin, stop = local * self.seq_len, (local + 1) * self.seq_len
        pieces = []  # (token ids, is padding), one per document piece in [begin, stop)
        instance, at = int(np.searchsorted(ends, begin, side="right")), begin
        while at < stop:
            doc = order[instance]
            first = ends[instance] - self._span[doc]  # where this instance starts in the stream
            a, b, length = at - first, min(ends[instance], stop) - first, self._doc_len[doc]
            if a < length:
                offset = self._doc_start[doc]
                pieces.append((self._tokens[self._doc_shard[doc]][offset + a : offset + min(b, length)], False))
            if b > length:
                pieces.append((np.full(b - max(a, length), _PAD_ID), True))
            at, instance = first + b, instance + 1
        input_ids = torch.from_numpy(np.concatenate([p for p, _ in pieces]).astype(np.int64)).unsqueeze(0)
        position_ids = torch.from_numpy(np.concatenate([np.arange(len(p)) for p, _ in pieces])).unsqueeze(0)
        labels = next_token_labels(input_ids, position_ids)
        labels[:, torch.from_numpy(np.concatenate([np.full(len(p), pad) for p, pad in pieces]))] = IGNORE_INDEX
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
