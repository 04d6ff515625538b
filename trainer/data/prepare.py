"""Tokenize local documents into token shards (`trainer.data.shards`), in parallel and resumably.

The main process reads documents in input order and hands batches of them to worker processes; their
token ids come back in submission order and are cut into shards of at least `shard_tokens` tokens at
document boundaries, so the output is byte-identical for any number of workers. Shards and the
manifest are committed one shard at a time; a re-run with the same inputs and settings keeps the
shards that verify against the manifest (sha256) and goes on after them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from trainer.data.documents import iter_documents, resolve_inputs
from trainer.data.errors import DataError
from trainer.data.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    check_shard,
    merge_histograms,
    read_manifest,
    remove_temporaries,
    write_manifest,
)

_BATCH_CHARS = 1 << 20  # text per task: large enough to amortise inter-process transfer


@dataclass(frozen=True)
class PrepareResult:
    output: Path
    shards_written: int
    shards_kept: int  # finished by an earlier run, verified and skipped
    documents: int
    tokens: int
    tokens_written: int  # tokenized by this run
    seconds: float


def load_tokenizer(path: Path):
    if not path.is_dir():
        raise DataError(f"{path}: the tokenizer must be a local Hugging Face tokenizer folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.resolve()), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None


class _Encoder:
    """Text -> uint32 token ids (plus EOS); one per worker process."""

    def __init__(self, tokenizer_path: str, eos_id: int | None) -> None:
        self.tokenizer = load_tokenizer(Path(tokenizer_path))
        self.eos = [] if eos_id is None else [eos_id]

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        return [np.asarray(one + self.eos if text else [], dtype=np.uint32) for text, one in zip(texts, ids)]


_worker_encoder: _Encoder | None = None


def _init_worker(tokenizer_path: str, eos_id: int | None) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(tokenizer_path, eos_id)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _worker_encoder(texts)


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(texts: Iterator[str], tokenizer_path: Path, eos_id: int | None, workers: int) -> Iterator[np.ndarray]:
    """Token ids of each text, in order; at most 2 x workers batches in flight (bounded memory)."""
    if workers == 1:
        encode = _Encoder(str(tokenizer_path), eos_id)
        for batch in _batches(texts):
            yield from encode(batch)
        return
    # fork: a spawned worker would import torch and transformers again (seconds each). Forking is safe
    # here: all workers start before the pool's manager thread, and the parent never used the
    # tokenizer's thread pool (TOKENIZERS_PARALLELISM=false).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(str(tokenizer_path), eos_id))
    try:
        pending = deque()
        for batch in _batches(texts):
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except BrokenProcessPool:
        raise DataError("a tokenizer worker process died (out of memory or killed)") from None
    finally:
        pool.shutdown(cancel_futures=True)


def _tokenizer_sha256(tokenizer) -> str:
    """What the tokenizer does, not its folder's bytes (which may hold a model's weights)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{text}".encode()).hexdigest()


def _kept_shards(output: Path, settings: dict) -> tuple[list[dict], bool]:
    """Shards an earlier run with the same settings finished and that still verify, in order, and
    whether that run completed with all of them intact."""
    if not (output / MANIFEST).exists():
        return [], False
    manifest = read_manifest(output)
    if manifest.get("settings") != settings:
        raise DataError(f"{output}: holds shards prepared from other inputs or settings; choose another output")
    listed = manifest.get("shards", [])
    kept = []
    for entry in listed:
        try:
            check_shard(output, entry, checksums=True)
        except (DataError, KeyError, TypeError) as err:
            print(f"warning: {output}: rewriting from shard {len(kept)} ({err})", flush=True)
            break
        kept.append(entry)
    return kept, bool(manifest.get("complete")) and len(kept) == len(listed)


def _manifest(settings: dict, tokenizer, shards: list[dict], complete: bool) -> dict:
    about = {"path": tokenizer.name_or_path, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
    return {
        "format": FORMAT,
        "complete": complete,
        "settings": settings,
        "tokenizer": {**about, "eos_id": tokenizer.eos_token_id},
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "skipped_empty": sum(s["skipped_empty"] for s in shards),
        "max_token_id": max((s["max_token_id"] for s in shards), default=0),
        "length_histogram": merge_histograms([s["length_histogram"] for s in shards]),
        "shards": shards,
    }


def prepare(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    output: str | Path,
    shard_tokens: int = 1 << 28,
    workers: int = 1,
    append_eos: bool = True,
    text_key: str = "text",
    progress: bool = True,
) -> PrepareResult:
    began = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism, one thread each
    sources = resolve_inputs(inputs)
    tokenizer_path, output = Path(tokenizer_path), Path(output)
    tokenizer = load_tokenizer(tokenizer_path)
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer_path}: the tokenizer has no EOS token; prepare with --no-eos")
    eos_id = tokenizer.eos_token_id if append_eos else None
    settings = {  # what decides the shards' bytes: a re-run may keep shards only if all of it matches
        "inputs": [{"path": str(s.path.resolve()), "bytes": s.size} for s in sources],
        "tokenizer_sha256": _tokenizer_sha256(tokenizer),
        "append_eos": append_eos,
        "text_key": text_key,
        "shard_tokens": shard_tokens,
    }
    output.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output)
    shards, complete = _kept_shards(output, settings)
    kept = len(shards)
    if complete:
        totals = _manifest(settings, tokenizer, shards, complete=True)
        return PrepareResult(output, 0, kept, totals["documents"], totals["tokens"], 0, time.perf_counter() - began)

    texts = iter_documents(sources, text_key)
    for _ in range(sum(s["documents"] + s["skipped_empty"] for s in shards)):  # finished by an earlier run
        next(texts)
    writer = ShardWriter(output, len(shards))
    tokens_written = 0
    bar = tqdm(unit="doc", disable=None if progress else True, desc="tokenizing", mininterval=1)
    documents = _encoded(texts, tokenizer_path, eos_id, workers)
    try:
        for document in documents:
            if not len(document):  # counted, so that a re-run skips exactly the documents it read
                writer.skipped_empty += 1
                continue
            writer.add(document)
            tokens_written += len(document)
            bar.update(1)
            if writer.tokens >= shard_tokens:
                shards.append(writer.commit())
                write_manifest(output, _manifest(settings, tokenizer, shards, complete=False))
                writer = ShardWriter(output, len(shards))
        if writer.documents:
            shards.append(writer.commit())
    finally:
        documents.close()  # stops the workers now, also when a shard write failed
        writer.abort()
        bar.close()
    if not shards:
        raise DataError("the inputs hold only empty documents")
    manifest = _manifest(settings, tokenizer, shards, complete=True)
    write_manifest(output, manifest)
    seconds = time.perf_counter() - began
    written = len(shards) - kept
    return PrepareResult(output, written, kept, manifest["documents"], manifest["tokens"], tokens_written, seconds)
