"""The chunk scan's input check, shared by both paths: the Triton kernels index raw memory by these shapes, so a
state of the wrong batch, a transposed state, a short `v` or a layout of another length would read past a tensor
(garbage or a crash later) instead of failing."""

from __future__ import annotations

import torch

from trainer.ops.fastweight.layout import ChunkLayout


def check_scan_inputs(
    z: torch.Tensor, v: torch.Tensor, layout: ChunkLayout, state: tuple[torch.Tensor, torch.Tensor] | None
) -> None:
    """One ValueError naming what does not fit, before any kernel reads memory past a tensor: z (B, S, h),
    v (B, S, d), a layout of (B, S) positions, and a (committed, pending) state of (B, d, h) each."""
    if z.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"chunk_scan: z and v must be (B, S, h) and (B, S, d), got {tuple(z.shape)} and {tuple(v.shape)}"
        )
    batch, seq, h = z.shape
    d = v.shape[-1]
    if v.shape[:2] != (batch, seq):
        raise ValueError(f"chunk_scan: v {tuple(v.shape)} must have z's batch and length {(batch, seq)}")
    if tuple(layout.position_ids.shape) != (batch, seq):
        raise ValueError(
            f"chunk_scan: the layout describes {tuple(layout.position_ids.shape)} positions, z has {(batch, seq)}"
        )
    if z.device != v.device or layout.position_ids.device != z.device:
        raise ValueError(f"chunk_scan: z, v and the layout must be on one device, got {z.device}, {v.device}, "
                         f"{layout.position_ids.device}")  # fmt: skip
    for name, part in zip(("committed", "pending"), state or ()):
        if tuple(part.shape) != (batch, d, h):
            raise ValueError(f"chunk_scan: the incoming {name} state must be (B, d, h) = {(batch, d, h)}, "
                             f"got {tuple(part.shape)}")  # fmt: skip
        if part.device != z.device:
            raise ValueError(f"chunk_scan: the incoming {name} state is on {part.device}, z on {z.device}")
