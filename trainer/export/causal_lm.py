"""`TTTCausalLM`: what an exported folder's modeling_ttt.py mixes into the base architecture's `*ForCausalLM`, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the fast-weight model and its
`generate()` decodes with the fast weights (trainer/export/remote_code.py writes the folder)."""

from __future__ import annotations

from trainer.export.fields import ttt_config_from_fields
from trainer.inference.cache import TTTCache, cache_kwargs
from trainer.ttt import patch_model


class TTTCausalLM:
    """Mixed in before a transformers `*ForCausalLM`: its MLPs are patched as the config's `ttt_*` fields say before
    the weights are loaded, and `generate()` gets a `TTTCache` unless handed a cache, so each decoded token reads
    the fast weights of the chunks before it (what `trainer.inference.generate` does)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        patch_model(self, ttt_config_from_fields(config))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if generation_config.num_beams > 1:  # beam search reorders the KV cache, not the fast weights
            raise ValueError("beam search is not supported with TTT fast weights: use num_beams=1")
        cache = cache_kwargs(self, TTTCache(self))  # {the forward's name for its cache: the TTTCache}
        if generation_config.use_cache is not False and all(model_kwargs.get(name) is None for name in cache):
            model_kwargs.update(cache)
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
