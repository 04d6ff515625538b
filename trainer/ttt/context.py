"""Per-model state that a patched model's fast-weight MLPs share during one forward pass.

The decoder layers of transformers call `mlp(hidden_states)` with nothing else, so the document
layout (from `position_ids` / `document_ids`) and the token embeddings reach the MLPs through this
object, filled by hooks that `patch_model` installs on the decoder and its embedding. Under context
parallelism it also holds the CP group and the layout of the targets' halo rows. During incremental
decoding (`trainer.inference`) it holds the cache whose fast-weight states the MLPs read and write.
"""

from __future__ import annotations

import contextlib

import torch

from parallel.halo import halo_rows
from parallel.pieces import as_cp_group, fold, piece_edges
from trainer.ops.fastweight.layout import ChunkLayout, build_layout, document_position_ids
from trainer.ttt.config import TTTConfig

_NO_NEIGHBOUR = -2  # a position that breaks the +1 steps next to any real position

# The decoder's KV-cache argument: `cache` from transformers 5.24 on, `past_key_values` before.
_CACHE_KWARGS = ("cache", "past_key_values")


def _cache_argument(kwargs: dict):
    return next((kwargs[name] for name in _CACHE_KWARGS if kwargs.get(name) is not None), None)


class TTTContext:
    def __init__(self, cfg: TTTConfig):
        self.cfg = cfg
        self.cp_group = None
        self.layout: ChunkLayout | None = None
        self.target_layout: ChunkLayout | None = None  # layout of [halo before, shard, halo after]
        self.embeddings: torch.Tensor | None = None
        self.decoding = None  # the fast-weight cache of an incremental-decoding forward (trainer.inference)

    @property
    def halo_widths(self) -> tuple[int, int]:
        """Rows of the neighbouring shards that this shard's value targets read (before, after)."""
        if self.cp_group is None or as_cp_group(self.cp_group).count == 1:
            return 0, 0
        radius = self.cfg.conv_kernel // 2
        return {"inplace": (radius, radius), "ntp": (0, 1)}.get(self.cfg.method, (0, 0))

    def begin(self, module, args, kwargs):
        """Forward pre-hook of the decoder: derive the chunk layout of this batch."""
        cache = _cache_argument(kwargs)
        if hasattr(cache, "fast_weight_state"):
            return self._begin_decoding(args, kwargs, cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "incremental decoding with TTT layers needs a trainer.inference.TTTCache as its KV cache"
            )
        tokens = kwargs.get("input_ids", args[0] if args else None)
        reference = tokens if tokens is not None else kwargs["inputs_embeds"]
        batch, seq = reference.shape[:2]
        position_ids = kwargs.get("position_ids")
        document_ids = kwargs.pop("document_ids", None)
        if document_ids is not None:
            if position_ids is not None:
                raise ValueError("pass document_ids or position_ids for packed documents, not both")
            position_ids = document_position_ids(document_ids)
            kwargs["position_ids"] = position_ids  # attention is masked per document from these
        if position_ids is None:
            position_ids = torch.arange(seq, device=reference.device)
        self._set_layouts(position_ids.expand(batch, -1))
        if self.cp_group is None and bool(self.layout.doc_start[:, 1:].any()):
            # transformers masks attention per document from restarting position_ids only when it
            # is given no 2D attention mask and no KV cache; a packed batch has no use for either.
            if kwargs.get("attention_mask") is not None:
                raise ValueError("packed documents are masked from position_ids/document_ids: drop attention_mask")
            kwargs["use_cache"] = False
            for name in _CACHE_KWARGS:
                kwargs.pop(name, None)
        self.embeddings = self._piece_rows(kwargs.get("inputs_embeds"))
        return args, kwargs

    def _piece_rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Under CP the MLPs see each piece of the shard as a row of its own (`parallel.pieces.fold`)."""
        return x if x is None or self.cp_group is None else fold(x, as_cp_group(self.cp_group))

    def _begin_decoding(self, args, kwargs, cache):
        """The new tokens continue one document per row; the MLPs run on the fast weights in `cache`."""
        if self.cp_group is not None:
            raise ValueError("incremental decoding does not run under context parallelism")
        if "document_ids" in kwargs:
            raise ValueError("incremental decoding reads one document per row: drop document_ids")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            # a padded row would write its pad tokens into the fast weights
            raise ValueError("incremental decoding with TTT layers needs unpadded rows of equal length")
        self.decoding = cache
        self.layout = self.target_layout = None
        self.embeddings = kwargs.get("inputs_embeds")
        return args, kwargs

    def _set_layouts(self, position_ids: torch.Tensor) -> None:
        chunk = self.cfg.chunk_size
        if self.cp_group is None:
            self.layout = self.target_layout = build_layout(position_ids, chunk)
            return
        cp = as_cp_group(self.cp_group)
        position_ids = fold(position_ids, cp)
        follows, precedes = piece_edges(cp, position_ids.shape[0] // cp.per_rank)
        self.layout = build_layout(position_ids, chunk, continues_before=follows, continues_after=precedes)
        before, after = self.halo_widths
        prev_pos, next_pos = halo_rows(position_ids, cp, before, after, fill=_NO_NEIGHBOUR)
        self.target_layout = build_layout(torch.cat([prev_pos, position_ids, next_pos], dim=1), chunk)

    def snapshot(self) -> tuple:
        return self.layout, self.target_layout, self.embeddings

    @contextlib.contextmanager
    def restored(self, snapshot: tuple):
        """Re-install a forward's layout, e.g. while activation checkpointing recomputes a layer."""
        saved = self.snapshot()
        self.layout, self.target_layout, self.embeddings = snapshot
        try:
            yield
        finally:
            self.layout, self.target_layout, self.embeddings = saved

    def record_embeddings(self, module, args, output):
        """Forward hook of the input embedding, for target_source=embed."""
        self.embeddings = self._piece_rows(output)

    def end(self, module, args, kwargs, output):
        """Forward hook of the decoder: a later stand-alone `mlp(x)` must not see this batch's layout."""
        self.layout = self.target_layout = None
        self.embeddings = None
        self.decoding = None
