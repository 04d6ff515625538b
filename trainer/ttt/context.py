"""Per-model state that a patched model's fast-weight MLPs share during one forward pass.

The decoder layers of transformers call `mlp(hidden_states)` with nothing else, so the document
layout (from `position_ids` / `document_ids`) and the token embeddings reach the MLPs through this
object, filled by hooks that `patch_model` installs on the decoder and its embedding.
"""

from __future__ import annotations

import torch

from trainer.ttt.layout import ChunkLayout, build_layout, document_position_ids


class TTTContext:
    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.layout: ChunkLayout | None = None
        self.embeddings: torch.Tensor | None = None

    def begin(self, module, args, kwargs):
        """Forward pre-hook of the decoder: derive the chunk layout of this batch."""
        cache = kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("incremental decoding with TTT layers is not supported by a plain forward")
        tokens = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, seq = (tokens if tokens is not None else embeds).shape[:2]
        position_ids = kwargs.get("position_ids")
        document_ids = kwargs.pop("document_ids", None)
        if document_ids is not None:
            if position_ids is not None:
                raise ValueError("pass document_ids or position_ids for packed documents, not both")
            position_ids = document_position_ids(document_ids)
            kwargs["position_ids"] = position_ids  # transformers masks attention per document from these
        if position_ids is None:
            position_ids = torch.arange(seq, device=(tokens if tokens is not None else embeds).device)
        self.layout = build_layout(position_ids, self.chunk_size, batch_size=batch)
        if bool(self.layout.doc_start[:, 1:].any()):
            # transformers masks attention per document from restarting position_ids only when it
            # is given no 2D attention mask and no KV cache; a packed batch has no use for either.
            if kwargs.get("attention_mask") is not None:
                raise ValueError("packed documents are masked from position_ids/document_ids: drop attention_mask")
            kwargs["use_cache"] = False
            kwargs["past_key_values"] = None
        self.embeddings = embeds
        return args, kwargs

    def record_embeddings(self, module, args, output):
        """Forward hook of the input embedding, for target_source=embed."""
        self.embeddings = output

    def end(self, module, args, kwargs, output):
        """Forward hook of the decoder: a later stand-alone `mlp(x)` must not see this batch's layout."""
        self.layout = None
        self.embeddings = None
