"""The shipped model configs build the published architectures: parameter counts on the meta device.

Counts come from `trainer.planning.memory` (the planner's `base_params`), so the acceptance check "the
planner's base_params matches the published count within 0.5%" is this test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.compose import CONF_DIR, compose_config
from trainer.config import job_config
from trainer.planning.memory import meta_model, model_facts

TOLERANCE = 0.005
LONG_CONTEXT = 262144  # every released model is configured for 256k positions
# Base parameters (a tied embedding counted once) and where the number comes from. A model card's
# rounded figure is used where it pins the count within 0.5%; otherwise the exact count of the
# released checkpoint (its unique tensors), which the card's figures round.
PUBLISHED = {
    "qwen2.5-0.5b": (494_032_768, "Qwen/Qwen2.5-0.5B checkpoint; card: 0.49B, 0.36B non-embedding"),
    "qwen3-0.6b": (596_049_920, "Qwen/Qwen3-0.6B checkpoint; card: 0.6B, 0.44B non-embedding"),
    "qwen3-1.7b": (1_720_574_976, "Qwen/Qwen3-1.7B checkpoint; card: 1.7B, 1.4B non-embedding"),
    "qwen3-4b": (4_022_468_096, "Qwen/Qwen3-4B checkpoint; card: 4.0B, 3.6B non-embedding"),
    "qwen3-8b": (8_200_000_000, "Qwen/Qwen3-8B card: 8.2B"),
    "qwen3-14b": (14_800_000_000, "Qwen/Qwen3-14B card: 14.8B"),
    "llama3.2-1b": (1_230_000_000, "meta-llama/Llama-3.2-1B card: 1.23B"),
    "llama3.2-3b": (3_210_000_000, "meta-llama/Llama-3.2-3B card: 3.21B"),
    "llama3.1-8b": (8_030_261_248, "meta-llama/Llama-3.1-8B checkpoint; card: 8B"),
    "mistral-7b": (7_248_023_552, "mistralai/Mistral-7B-v0.3 checkpoint; Mistral's announcement: 7.3B"),
}
SHIPPED = sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml") if p.stem != "hf")  # hf: any folder


def _build(name: str, *overrides: str):
    """The job's config tree and the patched model on the meta device."""
    cfg = compose_config([f"model={name}", "parallel=single", "data.seq_len=4096", *overrides])
    return cfg, meta_model(job_config(cfg))


def test_every_shipped_model_has_a_published_count():
    assert set(SHIPPED) == set(PUBLISHED) | {"tiny"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_base_parameters_match_the_published_count(name):
    _, model = _build(name, "ttt=none")
    published, source = PUBLISHED[name]
    counted = model_facts(model).base_params
    assert abs(counted - published) <= TOLERANCE * published, f"{name}: {counted:,} vs {published:,} ({source})"
    assert model.config.max_position_embeddings >= LONG_CONTEXT
    assert model.config.rope_parameters["rope_type"] in ("yarn", "llama3")


def _ttt_layer_count(rule: str, layers: int) -> int:
    """Layers that the model's `ttt_defaults.layers` selects: "all", or "every:K" (offset K-1)."""
    if rule == "all":
        return layers
    every = int(rule.removeprefix("every:"))
    return layers // every


@pytest.mark.parametrize("method", ["inplace", "ntp"])
@pytest.mark.parametrize("name", SHIPPED)
def test_ttt_defaults_add_the_expected_parameters(name, method):
    cfg, model = _build(name, f"ttt={method}")
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    per_layer = d * d + d + 1 + (d * cfg.ttt.conv_kernel if method == "inplace" else 0)  # proj, gate (+ conv)
    expected = _ttt_layer_count(cfg.model.ttt_defaults.layers, layers) * per_layer
    assert model_facts(model).ttt_params == expected
    assert cfg.ttt.chunk_size == cfg.model.ttt_defaults.chunk_size
