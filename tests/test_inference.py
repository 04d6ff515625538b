"""Incremental decoding with a TTTCache reproduces the full forward exactly (fp64, tiny models), generation."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_BUILDERS, VOCAB, randomize_ttt_parameters
from transformers import DynamicCache

import trainer.inference.cache
from trainer.inference import TTTCache, cache_kwargs, decode_step, generate, prefill
from trainer.ttt import TTTConfig, patch_model

CHUNK = 4
VARIANTS = {
    "qwen3-inplace": ("qwen3", dict(method="inplace")),
    "qwen3-ntp": ("qwen3", dict(method="ntp")),
    "qwen3-recon": ("qwen3", dict(method="recon")),
    "mistral-nomem": ("mistral", dict(method="nomem")),  # the control without memory
    "qwen3-ntp-embed": ("qwen3", dict(method="ntp", target_source="embed")),
    "qwen3-inplace-clip": ("qwen3", dict(method="inplace", clip=0.05)),
    "llama-ntp-clip": ("llama", dict(method="ntp", clip=0.05)),
    "mistral-inplace": ("mistral", dict(method="inplace")),  # sliding window 6 < sequence length
    "qwen3-ntp-raw": ("qwen3", dict(method="ntp", write="raw")),  # the release's write
    "llama-inplace-raw-clip": ("llama", dict(method="inplace", write="raw", clip=0.05)),
}


def ttt_model(family: str, **ttt) -> torch.nn.Module:
    model = patch_model(MODEL_BUILDERS[family](), TTTConfig(chunk_size=CHUNK, lr=0.5, **ttt))
    randomize_ttt_parameters(model)
    return model.eval()  # the new MLPs too: the clip applies in eval mode only


def decode_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits at every position: prefill of the prompt (in pieces that straddle chunk edges), then one
    token at a time."""
    logits, cache = prefill(model, ids[:, :prompt_len], all_logits=True, piece_tokens=3)
    steps = [decode_step(model, ids[:, t], cache)[:, None] for t in range(prompt_len, ids.shape[1])]
    return torch.cat([logits, *steps], dim=1)


@pytest.mark.parametrize("prompt_len", [1, 6, 8])  # 8 is a chunk multiple
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_and_decode_equal_the_full_forward(variant, prompt_len):
    family, ttt = VARIANTS[variant]
    model = ttt_model(family, **ttt)
    ids = torch.randint(0, VOCAB, (2, 18))  # 4 full chunks and a partial one
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(decode_logits(model, ids, prompt_len), full, rtol=1e-10, atol=1e-10)


def test_clip_changes_the_logits():
    """The clip variants above are not vacuous: tau=0.05 binds."""
    clipped = ttt_model("qwen3", method="inplace", clip=0.05)
    unclipped = patch_model(MODEL_BUILDERS["qwen3"](), TTTConfig(method="inplace", chunk_size=CHUNK, lr=0.5))
    unclipped.load_state_dict(clipped.state_dict())
    unclipped.eval()
    ids = torch.randint(0, VOCAB, (2, 18))
    with torch.no_grad():
        assert not torch.allclose(clipped(ids).logits, unclipped(ids).logits, rtol=1e-6, atol=1e-6)


def test_ntp_commit_waits_for_the_next_chunk(monkeypatch):
    """Committing an ntp chunk as soon as it is full (its last target not yet known) breaks equality."""
    model = ttt_model("qwen3", method="ntp")
    ids = torch.randint(0, VOCAB, (2, 18))
    with torch.no_grad():
        full = model(ids).logits
    monkeypatch.setattr(trainer.inference.cache, "_LOOKAHEAD", {})
    assert not torch.allclose(decode_logits(model, ids, 1), full, rtol=1e-6, atol=1e-6)


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    model = ttt_model("qwen3", method="ntp", clip=0.05)
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        full = model(out).logits
    assert torch.equal(full[:, 4:-1].argmax(dim=-1), out[:, 5:])
    # transformers' generate runs the same decoding when handed a TTTCache
    cache = cache_kwargs(model, TTTCache(model))
    assert torch.equal(model.generate(prompt, **cache, max_new_tokens=12, do_sample=False), out)


def test_sampling_is_reproducible_given_a_seed():
    model = ttt_model("llama", method="inplace")
    prompt = torch.randint(0, VOCAB, (2, 6))

    def sample(seed: int, **kwargs) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kwargs)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert torch.equal(sample(1, top_p=1e-9), generate(model, prompt, 10))  # a nucleus of one token is greedy


def test_generation_stops_when_every_row_has_ended():
    model = ttt_model("qwen3", method="recon")
    prompt = torch.randint(0, VOCAB, (2, 5))
    first = generate(model, prompt, 1)[:, -1]
    out = generate(model, prompt, 8, eos_token_id=int(first[0]))
    assert out[0, 5:].eq(first[0]).all()  # the ended row is filled with eos
    if first[1] == first[0]:
        assert out.shape[1] == 6


def test_plain_cache_and_padded_rows_are_refused():
    model = ttt_model("qwen3", method="ntp")
    ids = torch.randint(0, VOCAB, (2, 6))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache), use_cache=True)
        with pytest.raises(NotImplementedError, match="needs a trainer.inference.TTTCache"):
            model(ids[:, :1], **cache_kwargs(model, cache), use_cache=True)
        mask = torch.ones_like(ids)
        mask[1, 0] = 0
        with pytest.raises(ValueError, match="unpadded rows of equal length"):
            model(ids, attention_mask=mask, **cache_kwargs(model, TTTCache(model)), use_cache=True)
