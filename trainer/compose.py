"""The one place configs are composed: the Hydra config a `ttt-train` command line describes, and its validated job.

`ttt-train` composes through `@hydra.main` (trainer/train.py, with CONF_DIR); the planners, the GPU check, the
benchmarks and the studies compose the same configs here, without starting a job.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from trainer.config import JobConfig, job_config

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `ttt-train` would run with these overrides."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def job_of(overrides: list[str]) -> JobConfig:
    """The validated job of these overrides (a bad value is a one-line `ConfigError`)."""
    return job_config(compose_config(overrides))


def one_process_job(model: str, ttt: str, seq_len: int, checkpointing: str = "auto") -> JobConfig:
    """The job `ttt-train` would run in one process with these settings, batch 1; train.compile at its default
    (auto: on, on CUDA): what the GPU check measures and the step-time model reads its profiles as."""
    overrides = [f"model={model}", f"ttt={ttt}", "parallel=single", f"data.seq_len={seq_len}", "data.batch_size=1"]
    return job_of([*overrides, f"train.activation_checkpointing={checkpointing}"])
