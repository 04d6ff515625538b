"""The shipped `ttt` config group composes into valid TTTConfigs, with the model's TTT defaults."""

from __future__ import annotations

import pytest
from test_train import compose_job

METHODS = ["none", "inplace", "ntp", "recon"]
QWEN3_8B = ["model=qwen3-8b", "parallel=single", "data.seq_len=4096"]


@pytest.mark.parametrize("name", METHODS)
def test_ttt_group_builds_a_config(name):
    job = compose_job(f"ttt={name}")
    assert job.ttt.method == name
    assert (job.ttt.layers, job.ttt.chunk_size) == ("all", 64)  # tiny's ttt_defaults


@pytest.mark.parametrize("name", METHODS)
def test_ttt_layers_and_chunk_size_come_from_the_model(name):
    job = compose_job(*QWEN3_8B, f"ttt={name}")
    assert (job.ttt.layers, job.ttt.chunk_size) == ("every:4", 1024)


def test_command_line_overrides_the_model_defaults():
    job = compose_job(*QWEN3_8B, "ttt.layers=[1,5]", "ttt.chunk_size=256")
    assert (list(job.ttt.layers), job.ttt.chunk_size) == ([1, 5], 256)
