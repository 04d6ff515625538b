"""The device mesh: data-parallel x context-parallel, from the world size and `parallel.cp`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.pieces import pieces_per_rank


def check_cp(
    world_size: int,
    cp: int,
    seq_len: int | None = None,
    chunk_size: int | None = None,
    load_balance: str = "contiguous",
) -> None:
    """One-line ValueErrors for a CP degree that does not fit the job."""
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"parallel.cp must be a positive integer, got {cp!r}")
    if world_size % cp:
        raise ValueError(f"parallel.cp={cp} does not divide the world size {world_size}")
    if seq_len is None or chunk_size is None:
        return
    if seq_len % (cp * chunk_size):
        raise ValueError(
            f"data.seq_len={seq_len} must be a multiple of parallel.cp x ttt.chunk_size = {cp} x {chunk_size}"
        )
    per_rank = pieces_per_rank(load_balance)
    if cp > 1 and seq_len % (per_rank * cp * chunk_size):
        raise ValueError(
            f"parallel.load_balance={load_balance} needs data.seq_len={seq_len} to be a multiple of "
            f"{per_rank} x parallel.cp x ttt.chunk_size = {per_rank} x {cp} x {chunk_size}"
        )


def build_mesh(cp: int, device_type: str | None = None) -> DeviceMesh:
    """A 2-D mesh ("dp", "cp") over the initialised default process group; CP ranks are adjacent."""
    world_size = dist.get_world_size()
    check_cp(world_size, cp)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
