"""The references every fast path is tested against: the prefix-sum formulation of the raw write, which
materializes every chunk's weight, and the normalized write as a token-pair sum, one document at a time."""

from __future__ import annotations

import torch

from trainer.ops.fastweight.layout import document_spans
from trainer.ops.fastweight.write import KEY_EPS, MASS_EPS, clip_delta


def naive_fastweight(
    z: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor, chunk_size: int, lr: float, clip: float | None = None
) -> torch.Tensor:
    """Reference: the prefix-sum formulation, one document at a time, materializing every chunk's weight.

    Documents start where `position_ids` break their +1 steps (and at each row's start); chunk c of
    a document covers its positions [cC, (c+1)C).
    """
    position_ids = position_ids.expand(z.shape[0], -1)
    out = torch.zeros(*z.shape[:-1], v.shape[-1], dtype=z.dtype, device=z.device)
    for b in range(z.shape[0]):
        pos = position_ids[b].tolist()
        for a, e in document_spans(pos):
            out[b, a:e] = _naive_document(z[b, a:e], v[b, a:e], pos[a], chunk_size, lr, clip)
    return out


def _naive_document(z, v, first_pos, chunk_size, lr, clip):
    # Pad the document so that its chunks are whole rows of a (n, C, .) view; zero rows write nothing.
    front = first_pos % chunk_size
    back = -(front + z.shape[0]) % chunk_size
    zp = torch.nn.functional.pad(z, (0, 0, front, back)).reshape(-1, chunk_size, z.shape[-1])
    vp = torch.nn.functional.pad(v, (0, 0, front, back)).reshape(-1, chunk_size, v.shape[-1])
    deltas = lr * torch.einsum("ncd,nch->ndh", vp, zp)
    if clip is not None:
        deltas = clip_delta(deltas, clip)
    before = torch.cat([torch.zeros_like(deltas[:1]), deltas.cumsum(dim=0)[:-1]])  # exclusive prefix sum
    out = torch.einsum("nch,ndh->ncd", zp, before).reshape(-1, v.shape[-1])
    return out[front : front + z.shape[0]]


def naive_normalized_fastweight(
    z: torch.Tensor,
    v: torch.Tensor,
    position_ids: torch.Tensor,
    chunk_size: int,
    lr: float,
    gates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of the normalized write as a token-pair sum, one document at a time:
    O_t = lr * sum_{s: c_s < c_t} g_s (K_t . K_s) V_s / sum_{s: c_s < c_t} g_s with K = Z / ||Z||, c = position // C
    and g = `gates` (B, S, 1), all equal if None."""
    position_ids = position_ids.expand(z.shape[0], -1)
    gates = torch.ones_like(z[..., :1]) if gates is None else gates
    keys = z / z.norm(dim=-1, keepdim=True).clamp_min(KEY_EPS)
    out = torch.zeros(*z.shape[:-1], v.shape[-1], dtype=z.dtype, device=z.device)
    for b in range(z.shape[0]):
        pos = position_ids[b].tolist()
        for a, e in document_spans(pos):
            chunk = torch.tensor(pos[a:e], device=z.device) // chunk_size
            reads = (chunk[:, None] > chunk[None, :]) * gates[b, a:e, 0]  # token t reads token s of an earlier chunk
            weights = (keys[b, a:e] @ keys[b, a:e].T) * reads
            mass = reads.sum(dim=1, keepdim=True)
            out[b, a:e] = torch.where(mass > 0, lr * (weights @ v[b, a:e]) / mass.clamp_min(MASS_EPS), 0)
    return out
