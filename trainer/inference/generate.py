"""Prefill, token-by-token decoding and generation (greedy or temperature / top-p sampling) with a `TTTCache`.

Rows are equal-length, unpadded prompts that start at position 0; ragged (left-padded) batches are not
supported, since pad tokens would be written into the fast weights. Call `model.eval()` first: the
inference-only clip (`ttt.clip`) applies in eval mode, exactly as in the full forward.
"""

from __future__ import annotations

import torch

from trainer.inference.cache import TTTCache, cache_kwargs


@torch.no_grad()
def prefill(
    model, input_ids: torch.Tensor, cache: TTTCache | None = None, piece_tokens: int | None = None, all_logits=False
) -> tuple[torch.Tensor, TTTCache]:
    """Run the prompt (B, S) into `cache` (a new one if None), `piece_tokens` positions per forward (default:
    the TTT chunk size, which bounds activation memory for long prompts). Returns the logits of the last
    position (B, V), or of every position (B, S, V) with `all_logits`, and the cache."""
    cache = TTTCache(model) if cache is None else cache
    ttt_config = getattr(model, "ttt_config", None)
    piece = piece_tokens or (ttt_config.chunk_size if ttt_config is not None else input_ids.shape[1])
    kept = []
    for start in range(0, input_ids.shape[1], piece):
        ids = input_ids[:, start : start + piece]
        keep = 0 if all_logits else 1
        kept.append(model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=keep).logits)
    logits = torch.cat(kept, dim=1)
    return (logits if all_logits else logits[:, -1]), cache


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, cache: TTTCache) -> torch.Tensor:
    """Feed one token per row, (B,), after the cached positions; returns the next-token logits (B, V)."""
    return model(tokens[:, None], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]


def next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens: argmax at temperature 0, else a sample from the top-p nucleus of
    softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the first token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    piece_tokens: int | None = None,
) -> torch.Tensor:
    """Prompt (B, S) -> (B, S + N) tokens, N <= max_new_tokens (fewer when every row has ended with
    `eos_token_id`; a row that ended is filled with it). Sampling is reproducible given `generator`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits, cache = prefill(model, input_ids, piece_tokens=piece_tokens)
    tokens = [input_ids]
    ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(ended, eos_token_id)
            ended |= token == eos_token_id
        tokens.append(token[:, None])
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        logits = decode_step(model, token, cache)
    return torch.cat(tokens, dim=1)
