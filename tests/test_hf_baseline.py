"""The plain transformers baseline step on CPU, tiny model: it trains, times, and falls back to activation
checkpointing when the step without it runs out of memory."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tools.bench.hf_baseline as hf_baseline

CPU = torch.device("cpu")
SMALL = ["model.config.num_hidden_layers=2"]  # conf/model/tiny.yaml, halved: the test times real steps
VOCAB = 256  # conf/model/tiny.yaml


def test_the_plain_step_trains_and_is_timed():
    timing = hf_baseline.time_hf_step("tiny", 32, CPU, steps=2, warmup=1, overrides=SMALL)
    assert (timing.error, timing.checkpointing, timing.without_checkpointing) == (None, False, None)
    assert len(timing.step_s) == 2 and all(0 < s < math.inf for s in timing.step_s)
    assert timing.median_s == pytest.approx(sum(timing.step_s) / 2)
    assert timing.peak_bytes is None  # CUDA's counter only
    assert len(timing.losses) == 3 and all(math.isfinite(loss) for loss in timing.losses)
    # A random init predicts about uniformly: the model's own loss shifted the labels and averaged over tokens.
    assert timing.losses[0] == pytest.approx(math.log(VOCAB), abs=0.5)
    json.dumps(timing.summary())


def _out_of_memory_without_checkpointing(monkeypatch) -> list[bool]:
    """build_hf_step whose step runs out of memory without checkpointing; returns the settings it was built with."""
    built, build = [], hf_baseline.build_hf_step

    def build_or_fail(model_name, device, checkpointing, overrides=(), seed=0):
        built.append(checkpointing)
        step = build(model_name, device, checkpointing, overrides, seed)
        if checkpointing:
            return step

        def out_of_memory(seq_len):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.55 GiB\nmore details")

        return out_of_memory

    monkeypatch.setattr(hf_baseline, "build_hf_step", build_or_fail)
    return built


def test_out_of_memory_retries_with_activation_checkpointing(monkeypatch):
    built = _out_of_memory_without_checkpointing(monkeypatch)
    timing = hf_baseline.time_hf_step("tiny", 32, CPU, steps=1, warmup=1, overrides=SMALL)
    assert built == [False, True]
    assert timing.checkpointing and timing.error is None and len(timing.step_s) == 1
    failed = timing.without_checkpointing
    assert failed.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 18.55 GiB"
    assert (failed.checkpointing, failed.step_s, failed.median_s) == (False, [], None)
    summary = json.loads(json.dumps(timing.summary()))
    assert summary["without_checkpointing"]["error"] == failed.error and summary["median_step_s"] > 0
    table = hf_baseline.markdown_table(timing).splitlines()
    assert len(table) == 4 and "| off |" in table[2] and failed.error in table[2] and "| on |" in table[3]


def test_a_chosen_setting_is_not_retried(monkeypatch):
    built = _out_of_memory_without_checkpointing(monkeypatch)
    timing = hf_baseline.time_hf_step("tiny", 32, CPU, steps=1, warmup=0, checkpointing=False, overrides=SMALL)
    assert built == [False] and timing.error.startswith("OutOfMemoryError") and timing.without_checkpointing is None
