"""Value targets V of the fast-weight write, one function per method, with a loop-based reference.

T (B, S, d) is the target source, P the stored `ttt_proj.weight` used as `T @ P`:
- inplace: V = conv(T) @ P, a depthwise centered conv applied to each chunk separately (zero padding
  at chunk edges), so position t sees t+1, t+2 without crossing a chunk or document;
- ntp:     V_t = T_{t+1} @ P, zero for a document's last token;
- recon:   V_t = T_t @ P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.ops.fastweight.layout import ChunkLayout, document_spans


def value_targets(
    method: str, source: torch.Tensor, layout: ChunkLayout, conv_weight: torch.Tensor | None, proj: torch.Tensor | None
) -> torch.Tensor:
    if method == "inplace":
        source = segment_conv(source, conv_weight, layout.segment_ids)
    elif method == "ntp":
        source = _next_in_document(source, layout.next_in_doc)
    elif method != "recon":
        raise ValueError(f"no value target for ttt.method={method!r}")
    return source if proj is None else source @ proj


def _next_in_document(source: torch.Tensor, next_in_doc: torch.Tensor) -> torch.Tensor:
    shifted = torch.zeros_like(source)
    shifted[:, :-1] = source[:, 1:] * next_in_doc[:, :-1, None].to(source.dtype)
    return shifted


def _tap_slices(seq_len: int, offset: int) -> tuple[slice, slice]:
    """(dst, src) such that out[dst] reads x[src] = x[dst + offset]."""
    if offset >= 0:
        return slice(0, seq_len - offset), slice(offset, seq_len)
    return slice(-offset, seq_len), slice(0, seq_len + offset)


def segment_conv(x: torch.Tensor, weight: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Depthwise centered conv over the sequence dim that never reads across a segment boundary.

    x (B, S, d); weight (d, 1, k) as stored by `torch.nn.Conv1d(d, d, k, padding=k//2, groups=d)`.
    Saves only x for backward (the MLP keeps it alive anyway), so it adds no activation memory.
    """
    return _SegmentConv.apply(x, weight, segment_ids)


class _SegmentConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, segment_ids):
        radius = weight.shape[-1] // 2
        seq = x.shape[1]
        out = x * weight[:, 0, radius]
        for i in range(weight.shape[-1]):
            offset = i - radius
            if offset == 0 or abs(offset) >= seq:
                continue
            dst, src = _tap_slices(seq, offset)
            same = (segment_ids[:, dst] == segment_ids[:, src]).unsqueeze(-1).to(x.dtype)
            out[:, dst] += x[:, src] * same * weight[:, 0, i]
        ctx.save_for_backward(x, weight, segment_ids)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, segment_ids = ctx.saved_tensors
        radius = weight.shape[-1] // 2
        seq = x.shape[1]
        grad_x = grad_out * weight[:, 0, radius]
        grad_w = torch.zeros_like(weight)
        grad_w[:, 0, radius] = (grad_out * x).sum(dim=(0, 1))
        for i in range(weight.shape[-1]):
            offset = i - radius
            if offset == 0 or abs(offset) >= seq:
                continue
            dst, src = _tap_slices(seq, offset)
            masked = grad_out[:, dst] * (segment_ids[:, dst] == segment_ids[:, src]).unsqueeze(-1).to(x.dtype)
            grad_x[:, src] += masked * weight[:, 0, i]
            grad_w[:, 0, i] = (masked * x[:, src]).sum(dim=(0, 1))
        return grad_x, grad_w, None


def naive_value_targets(
    method: str,
    source: torch.Tensor,
    position_ids: torch.Tensor,
    chunk_size: int,
    conv_weight: torch.Tensor | None,
    proj: torch.Tensor | None,
) -> torch.Tensor:
    """Reference: DESIGN.md's definitions applied one document and one chunk at a time."""
    position_ids = position_ids.expand(source.shape[0], -1)
    out = torch.zeros_like(source)
    for b in range(source.shape[0]):
        pos = position_ids[b].tolist()
        for a, e in document_spans(pos):
            doc = source[b, a:e]
            if method == "recon":
                out[b, a:e] = doc
            elif method == "ntp":
                out[b, a : e - 1] = doc[1:]
            elif method == "inplace":
                chunk_of = [p // chunk_size for p in pos[a:e]]
                for c in sorted(set(chunk_of)):
                    lo = a + chunk_of.index(c)
                    hi = lo + chunk_of.count(c)
                    chunk = source[b, lo:hi].T.unsqueeze(0)  # (1, d, L)
                    conv = F.conv1d(chunk, conv_weight, padding=conv_weight.shape[-1] // 2, groups=chunk.shape[1])
                    out[b, lo:hi] = conv[0].T
            else:
                raise ValueError(f"no value target for ttt.method={method!r}")
    return out if proj is None else out @ proj
