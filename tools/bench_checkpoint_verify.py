"""What verifying a checkpoint costs at start-up, and how it splits across ranks.

Builds checkpoint folders of the given sizes (random bytes in --files files, with the meta.json
`save_checkpoint` writes: every file's size and sha256), then times `trainer.checkpoint.checkpoint_problem`
on P local processes joined in a gloo group: each rank hashes its slice of the files and the verdict is
shared. Seconds are the slowest rank's, from a barrier to the shared verdict, files in the page cache
(the hashing cost; a cold read adds the disk's time).

    python -m tools.bench_checkpoint_verify                       # 64, 256, 1024 MiB; 1 and 2 ranks
    python -m tools.bench_checkpoint_verify --sizes-mib 64 --ranks 1
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tools.benchutil import MIB, OneLineErrorParser, positive_int
from trainer.checkpoint import checkpoint_problem
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


def _rank(rank: int, world: int, init: str, folder: str, seconds) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        dist.barrier()
        began = time.perf_counter()
        problem = checkpoint_problem(Path(folder))
        seconds[rank] = time.perf_counter() - began
        assert problem is None, problem
        dist.barrier()
    finally:
        dist.destroy_process_group()


def time_verify(folder: Path, ranks: int, scratch: Path) -> float:
    seconds = mp.get_context("spawn").Manager().dict()
    init = f"file://{scratch}/pg-{folder.name}-{ranks}"
    mp.spawn(_rank, args=(ranks, init, str(folder), seconds), nprocs=ranks, join=True)
    return max(seconds.values())


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="bench_checkpoint_verify", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="64,256,1024", help="checkpoint sizes in MiB, comma-separated")
    parser.add_argument("--files", type=positive_int, default=8, help="files per checkpoint (DCP: one per rank)")
    parser.add_argument("--ranks", default="1,2", help="process counts, comma-separated")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    rank_counts = [int(r) for r in args.ranks.split(",")]

    print("| checkpoint MiB | files | ranks | seconds | GiB/s |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as scratch:
        for size in sizes:
            folder = Path(scratch) / f"step-{size}"
            _make_checkpoint(folder, size, args.files)
            for ranks in rank_counts:
                seconds = time_verify(folder, ranks, Path(scratch))
                print(f"| {size} | {args.files} | {ranks} | {seconds:.3f} | {size / 1024 / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
