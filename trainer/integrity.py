"""Files a job can trust: size and sha256 records, durable writes, and verification split across ranks.

A writer fsyncs each file and then the folder that names it, so after a power loss a renamed file
holds its bytes. A reader checks every recorded file's size (cheap: truncation, a missing file) and
sha256 (corruption). Hashing is the costly part, so each rank of a job hashes its own slice of the
files and the ranks share one verdict: the whole job then starts, or stops with the same one line.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch.distributed as dist


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def file_problem(path: Path, size: int, sha256: str | None, what: str, source: str) -> str | None:
    """Why `path` is not the file `source` (the record) describes, or None; `sha256=None` checks the size only."""
    if not path.is_file():
        return f"{path}: {what} file missing"
    actual = path.stat().st_size
    if actual != size:
        return f"{path}: truncated or overwritten {what} ({actual} bytes, {source}: {size})"
    if sha256 is not None and file_sha256(path) != sha256:
        return f"{path}: corrupted {what} (sha256 differs from the {source})"
    return None


def rank_slice(items: list) -> list:
    """This rank's share of `items` (all of them outside a process group)."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def shared_verdict(problem: str | None) -> str | None:
    """The first problem any rank found (in rank order), the same on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p is not None), None)
