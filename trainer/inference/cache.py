"""`TTTCache`: transformers' KV cache plus the fast-weight state of every TTT layer, for incremental decoding.

Decoding reproduces the full forward (DESIGN.md) exactly: a token of chunk c reads W_0 + sum_{c' < c} dW_c',
and dW_c is committed once its value targets are final. The targets of chunk c read only rows of chunk c
(inplace: the conv is zero-padded at the chunk's edges; recon: the row itself), except ntp's last row,
which reads the source of the next chunk's first token. So a chunk is committed as soon as it is full
(inplace, recon) or when the next chunk's first token reaches the layer (ntp). Either way that is before
any token that reads it, and the full forward's zero target for a document's last token never matters:
it only enters the write of the last chunk, which no token reads.

Rows of a batch are documents that start together at position 0 (equal-length, unpadded prompts).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache

from trainer.ops.fastweight import accumulation_dtype, clip_delta, gated_mean
from trainer.ops.fastweight.layout import ChunkLayout, single_document_layout
from trainer.ttt.patch import decoder_of

# Rows after a chunk that its value targets read: ntp's last target is the next position's source.
_LOOKAHEAD = {"ntp": 1}

Targets = Callable[[torch.Tensor, ChunkLayout], torch.Tensor]


class FastWeightState:
    """One TTT layer's decoding state: the committed writes and the open chunk's rows.

    weight:   (B, d, h) sum of committed chunk deltas (the fast part of W_down), accumulated in at
              least fp32; None until the first commit.
    mass:     (B, 1, 1) the normalized write's committed gate mass (sum of g), which the read divides by.
    z, source, gates: (B, C, h) / (B, C, d) / (B, C, 1) buffers of the open chunk's keys, target sources
              and write gates; the first `filled` rows are valid. A full chunk waits here only for its
              lookahead row.
    """

    def __init__(self, method: str, chunk_size: int, lr: float):
        self.chunk_size, self.lr = chunk_size, lr
        self.lookahead = _LOOKAHEAD.get(method, 0)
        self.weight: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.gates: torch.Tensor | None = None
        self.filled = 0

    def extend(
        self, z: torch.Tensor, source: torch.Tensor, gates: torch.Tensor | None, targets: Targets, clip: float | None
    ) -> torch.Tensor:
        """Fast part of the MLP output for the next tokens, (B, L, d), given their keys z (B, L, h; the
        activations, normalized for the normalized write), target sources (B, L, d) and write gates (B, L, 1;
        None for the raw write); commits every chunk whose targets become final on the way.
        `targets(source, layout)` computes the value targets of rows that form one document."""
        if self.z is None:
            self.z = z.new_empty(z.shape[0], self.chunk_size, z.shape[-1])
            self.source = source.new_empty(source.shape[0], self.chunk_size, source.shape[-1])
            self.gates = None if gates is None else gates.new_empty(gates.shape[0], self.chunk_size, 1)
        pieces, start, length = [], 0, z.shape[1]
        while True:
            if self.filled == self.chunk_size and length - start >= self.lookahead:
                self._commit(source[:, start : start + self.lookahead], targets, clip)
            if start == length:
                break
            end = min(start + self.chunk_size - self.filled, length)
            pieces.append(self._read(z[:, start:end]))
            self.z[:, self.filled : self.filled + end - start] = z[:, start:end]
            self.source[:, self.filled : self.filled + end - start] = source[:, start:end]
            if gates is not None:
                self.gates[:, self.filled : self.filled + end - start] = gates[:, start:end]
            self.filled += end - start
            start = end
        return torch.cat(pieces, dim=1)

    def _read(self, z: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return z.new_zeros(*z.shape[:-1], self.source.shape[-1])
        fast = z.to(self.weight.dtype) @ self.weight.mT
        return (fast if self.mass is None else gated_mean(fast, self.mass)).to(z.dtype)

    def _commit(self, ahead: torch.Tensor, targets: Targets, clip: float | None) -> None:
        """Write the full open chunk: dW = lr * (g V)^T Z, with V computed as the full forward does."""
        rows = torch.cat([self.source, ahead], dim=1)
        layout = single_document_layout(rows.shape[0], rows.shape[1], self.chunk_size, rows.device)
        values = targets(rows, layout)[:, : self.chunk_size]
        acc = accumulation_dtype(self.z.dtype)
        if self.gates is not None:
            values = self.gates * values
            mass = self.gates.to(acc).sum(dim=1, keepdim=True)
            self.mass = mass if self.mass is None else self.mass + mass
        delta = self.lr * (values.to(acc).mT @ self.z.to(acc))
        if clip is not None:
            delta = clip_delta(delta, clip)
        self.weight = delta if self.weight is None else self.weight + delta
        self.filled = 0


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for `model(...)`: transformers 5.24 renamed the forward's `past_key_values` to `cache`."""
    return {_cache_parameter(type(model)): cache}


@functools.cache
def _cache_parameter(model_class) -> str:
    """Looked up once per model class: decoding calls the model once per token."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class TTTCache(DynamicCache):
    """Pass to a patched model as its KV cache (`cache_kwargs(model, cache)`): attention reads/writes the K/V
    cache as usual, and the fast-weight MLPs continue from `fast_weights[layer]` instead of restarting from W_0."""

    def __init__(self, model):
        super().__init__(config=model.config)
        ttt_layers = getattr(model, "ttt_layers", [])  # set by patch_model; none for a plain model
        cfg = getattr(model, "ttt_config", None)
        self.fast_weights = {i: FastWeightState(cfg.method, cfg.chunk_size, cfg.lr) for i in ttt_layers}
        layers = decoder_of(model).layers
        self._state_of = {id(layers[i].mlp): self.fast_weights[i] for i in ttt_layers}

    def fast_weight_state(self, mlp) -> FastWeightState:
        return self._state_of[id(mlp)]

    def crop(self, max_length: int):
        raise NotImplementedError("a TTTCache cannot be cropped: committed fast-weight writes are not undone")
