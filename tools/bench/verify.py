"""What verifying a checkpoint and a prepared corpus costs at start-up, and how it splits across ranks.

Checkpoints: folders of the given sizes (random bytes in --files files, with the meta.json
`save_checkpoint` writes: every file's size and sha256), timed through `trainer.checkpoint.checkpoint_problem`.
Corpora: prepared folders of --shard-mib MiB shards (documents of random lengths), as many shards as
--shards lists, timed through `trainer.data.shards.verify_prepared` (the start-up hash) and
`open_prepared(checksums=False)` (what every rank then does to build its dataset: sizes, offsets, memory maps).

Both verifications run on P local processes joined in a gloo group: each rank hashes its slice of the
files and the verdict is shared. Seconds are the slowest rank's, from a barrier to the shared verdict,
files in the page cache (the hashing cost; a cold read adds the disk's time).

    python -m tools.bench.verify                                  # both tables at their default sizes
    python -m tools.bench.verify --what corpus --shards 16,256 --ranks 1
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tools.cli import OneLineErrorParser, positive_int
from tools.measure import MIB
from trainer.checkpoint import checkpoint_problem
from trainer.data.shards import FORMAT, ShardWriter, open_prepared, verify_prepared, write_manifest
from trainer.integrity import file_sha256


def _make_checkpoint(folder: Path, total_mib: int, files: int) -> None:
    folder.mkdir(parents=True)
    rng, records = np.random.default_rng(0), {}
    for index in range(files):
        path = folder / f"__{index}_0.distcp"
        path.write_bytes(rng.bytes(total_mib * MIB // files))
        records[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    meta = {"step": 1, "world_size": files, "data": {}, "format": "dcp", "files": records}
    (folder / "meta.json").write_text(json.dumps(meta))


def _make_corpus(folder: Path, shards: int, shard_mib: int) -> None:
    folder.mkdir(parents=True)
    rng, entries = np.random.default_rng(0), []
    tokens_per_shard = shard_mib * MIB // 4
    for index in range(shards):
        writer = ShardWriter(folder, index)
        lengths = rng.integers(256, 16384, size=2 * tokens_per_shard // 8320)
        lengths[-1] += tokens_per_shard - lengths.sum()  # the last document takes the rest (or is cut short)
        for document in np.split(rng.integers(1, 32000, size=tokens_per_shard, dtype=np.uint32), np.cumsum(lengths)):
            if len(document):
                writer.add(document)
        entries.append(writer.commit())
    write_manifest(folder, {"format": FORMAT, "complete": True, "shards": entries, "max_token_id": 32000})


def _verify(what: str, folder: Path) -> None:
    if what == "checkpoint":
        problem = checkpoint_problem(folder)
        assert problem is None, problem
    else:
        verify_prepared(folder)


def _rank(rank: int, world: int, init: str, what: str, folder: str, seconds) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dist.barrier()
        began = time.perf_counter()
        _verify(what, Path(folder))
        seconds[rank] = time.perf_counter() - began
        dist.barrier()
    finally:
        dist.destroy_process_group()


def time_verify(what: str, folder: Path, ranks: int, scratch: Path) -> float:
    seconds = mp.get_context("spawn").Manager().dict()
    init = f"file://{scratch}/pg-{folder.name}-{ranks}"
    mp.spawn(_rank, args=(ranks, init, what, str(folder), seconds), nprocs=ranks, join=True)
    return max(seconds.values())


def checkpoint_table(sizes: list[int], files: int, rank_counts: list[int], scratch: Path) -> None:
    print("| checkpoint MiB | files | ranks | seconds | GiB/s |")
    print("|---:|---:|---:|---:|---:|")
    for size in sizes:
        folder = scratch / f"step-{size}"
        _make_checkpoint(folder, size, files)
        for ranks in rank_counts:
            seconds = time_verify("checkpoint", folder, ranks, scratch)
            print(f"| {size} | {files} | {ranks} | {seconds:.3f} | {size / 1024 / seconds:.2f} |", flush=True)


def corpus_table(shard_counts: list[int], shard_mib: int, rank_counts: list[int], scratch: Path) -> None:
    print("| shards | corpus MiB | ranks | verify s | open s (every rank) | start-up s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for shards in shard_counts:
        folder = scratch / f"corpus-{shards}"
        _make_corpus(folder, shards, shard_mib)
        began = time.perf_counter()
        open_prepared(folder, checksums=False)
        opened = time.perf_counter() - began
        for ranks in rank_counts:
            verified = time_verify("corpus", folder, ranks, scratch)
            row = [shards, shards * shard_mib, ranks, f"{verified:.3f}", f"{opened:.3f}", f"{verified + opened:.3f}"]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
        shutil.rmtree(folder)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="64,256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--files", type=positive_int, default=8, help="files per checkpoint (DCP: one per rank)")
    parser.add_argument("--shards", default="16,128,1024", help="corpus shard counts, comma-separated")
    parser.add_argument("--shard-mib", type=positive_int, default=1, help="MiB of tokens per corpus shard")
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--what", choices=("checkpoint", "corpus", "both"), default="both")
    args = parser.parse_args(argv)
    rank_counts = _counts(parser, "--ranks", args.ranks)
    with tempfile.TemporaryDirectory() as scratch:
        if args.what in ("checkpoint", "both"):
            checkpoint_table(_counts(parser, "--sizes-mib", args.sizes_mib), args.files, rank_counts, Path(scratch))
        if args.what in ("corpus", "both"):
            corpus_table(_counts(parser, "--shards", args.shards), args.shard_mib, rank_counts, Path(scratch))


def _counts(parser: OneLineErrorParser, flag: str, text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"{flag} must be positive integers separated by commas, not {text!r}")
    return counts


if __name__ == "__main__":
    main()
