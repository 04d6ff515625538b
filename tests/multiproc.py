"""Run a function on N local processes joined in a gloo process group (CPU)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size: int, tmp_path, *args) -> None:
    """Call fn(rank, world_size, *args) on `world_size` processes; a failure on any rank fails the caller."""
    init_method = f"file://{tmp_path}/process_group"
    mp.spawn(_entry, args=(fn, world_size, init_method, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, init_method, args):
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (aborts at exit otherwise)
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's shutdown: on a loaded machine torch's C++ teardown at exit sometimes aborts
    # ("terminate called without an active exception", no Python frame left) after all the work has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
