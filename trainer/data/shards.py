"""Token shards on disk: the format `tools.commands.prepare_data` writes and the corpus dataset memory-maps.

A prepared folder holds, for each shard k,

    shard-0000k.tokens    every document's token ids back to back, little-endian uint32
    shard-0000k.offsets   where each document starts in .tokens, little-endian uint64, documents + 1 values

and `manifest.json`: the tokenizer, counts, a document-length histogram and each file's sha256. Every
file is written under a temporary name in the same folder, fsynced, then renamed; the manifest is
rewritten that way after each shard, so a crash leaves complete shards that it lists and nothing
half-written that it lists. Readers trust only files the manifest lists, after checking their size
(truncation) and, unless told not to, their sha256 (corruption).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from trainer.data.errors import DataError
from trainer.integrity import file_problem, fsync_folder, rank_slice, shared_verdict

FORMAT = "ttt-longctx-shards/1"
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.dtype("<u4")
OFFSET_DTYPE = np.dtype("<u8")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def remove_temporaries(folder: Path) -> None:
    """Drop what an interrupted writer left behind (never listed anywhere)."""
    for path in folder.glob(".*.tmp"):
        path.unlink(missing_ok=True)


def _commit(temporary: Path, final: Path) -> None:
    os.replace(temporary, final)
    fsync_folder(final.parent)


def length_histogram(lengths: np.ndarray) -> list[list[int]]:
    """[upper bound, documents] per power-of-two length bin, ascending: [4, n] counts lengths 3-4."""
    bounds = 2 ** np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    values, counts = np.unique(bounds, return_counts=True)
    return [[int(v), int(c)] for v, c in zip(values, counts)]


def merge_histograms(histograms: list[list[list[int]]]) -> list[list[int]]:
    total: dict[int, int] = {}
    for histogram in histograms:
        for bound, count in histogram:
            total[bound] = total.get(bound, 0) + count
    return [[bound, total[bound]] for bound in sorted(total)]


def write_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    with open(_temporary(path), "w") as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _commit(_temporary(path), path)


class ShardWriter:
    """Writes one shard under temporary names; `commit` makes it final and returns its manifest entry,
    `abort` removes whatever it wrote (a no-op after commit)."""

    def __init__(self, folder: Path, index: int) -> None:
        self.tokens_path = folder / f"shard-{index:05d}.tokens"
        self.offsets_path = folder / f"shard-{index:05d}.offsets"
        self._file = open(_temporary(self.tokens_path), "wb")
        self._digest = hashlib.sha256()
        self._offsets = [0]
        self.max_token_id = 0
        self.skipped_empty = 0  # empty input documents met while this shard was open (for resuming)

    @property
    def tokens(self) -> int:
        return self._offsets[-1]

    @property
    def documents(self) -> int:
        return len(self._offsets) - 1

    def add(self, document: np.ndarray) -> None:
        data = document.astype(TOKEN_DTYPE, copy=False).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self._offsets.append(self._offsets[-1] + len(document))
        self.max_token_id = max(self.max_token_id, int(document.max()))

    def commit(self) -> dict:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offsets = np.asarray(self._offsets, dtype=OFFSET_DTYPE)
        with open(_temporary(self.offsets_path), "wb") as handle:
            handle.write(offsets.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        _commit(_temporary(self.offsets_path), self.offsets_path)
        _commit(_temporary(self.tokens_path), self.tokens_path)
        return {
            "tokens_file": self.tokens_path.name,
            "offsets_file": self.offsets_path.name,
            "documents": self.documents,
            "tokens": self.tokens,
            "skipped_empty": self.skipped_empty,
            "max_token_id": self.max_token_id,
            "sha256_tokens": self._digest.hexdigest(),
            "sha256_offsets": hashlib.sha256(offsets.tobytes()).hexdigest(),
            "length_histogram": length_histogram(np.diff(offsets.astype(np.int64))),
        }

    def abort(self) -> None:
        self._file.close()
        _temporary(self.tokens_path).unlink(missing_ok=True)
        _temporary(self.offsets_path).unlink(missing_ok=True)


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: not a prepared corpus (no {MANIFEST}); make one with ttt-prepare-data")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    return manifest


def check_shard(folder: Path, entry: dict, checksums: bool) -> None:
    """Raise a DataError naming the file if a listed shard file is missing, truncated or (with
    `checksums`) corrupted."""
    files = (
        (entry["tokens_file"], entry["tokens"] * TOKEN_DTYPE.itemsize, entry["sha256_tokens"]),
        (entry["offsets_file"], (entry["documents"] + 1) * OFFSET_DTYPE.itemsize, entry["sha256_offsets"]),
    )
    for name, size, digest in files:
        problem = file_problem(folder / name, size, digest if checksums else None, "shard", "manifest")
        if problem is not None:
            raise DataError(problem)


def verify_prepared(folder: str | Path) -> None:
    """Hash every shard of a prepared folder once per job: each rank its slice of the shards, one
    verdict for all (a DataError on every rank if any shard is damaged)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        for entry in rank_slice(manifest.get("shards", [])):
            check_shard(folder, entry, checksums=True)
        problem = None
    except DataError as err:
        problem = str(err)
    except (KeyError, TypeError) as err:
        problem = f"{folder / MANIFEST}: malformed manifest ({err!r})"
    problem = shared_verdict(problem)
    if problem is not None:
        raise DataError(problem)


class Shard(NamedTuple):
    tokens: np.ndarray  # memory-mapped uint32
    offsets: np.ndarray  # int64, documents + 1


def open_prepared(folder: str | Path, checksums: bool = True) -> tuple[dict, list[Shard]]:
    """The manifest and memory-mapped shards of a finished preparation."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise DataError(f"{folder}: preparation did not finish; re-run ttt-prepare-data with its arguments")
    shards = []
    try:
        for entry in manifest["shards"]:
            check_shard(folder, entry, checksums)
            offsets = np.fromfile(folder / entry["offsets_file"], dtype=OFFSET_DTYPE).astype(np.int64)
            if offsets[0] != 0 or offsets[-1] != entry["tokens"] or np.any(np.diff(offsets) <= 0):
                raise DataError(f"{folder / entry['offsets_file']}: corrupted shard (offsets out of order)")
            shards.append(Shard(np.memmap(folder / entry["tokens_file"], dtype=TOKEN_DTYPE, mode="r"), offsets))
    except (KeyError, TypeError) as err:
        raise DataError(f"{folder / MANIFEST}: malformed manifest ({err!r})") from None
    return manifest, shards
