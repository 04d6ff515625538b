"""Incremental decoding of TTT-patched models: a cache with the fast weights, prefill, decode, generate."""

from trainer.inference.cache import TTTCache, cache_kwargs
from trainer.inference.generate import decode_step, generate, next_token, prefill

__all__ = ["TTTCache", "cache_kwargs", "decode_step", "generate", "next_token", "prefill"]
