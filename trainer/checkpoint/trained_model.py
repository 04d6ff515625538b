"""A training checkpoint loaded into the model of its run: what export, evaluation and the studies read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from trainer.checkpoint.dcp_reader import CheckpointReader
from trainer.config import ConfigError, job_config
from trainer.model import build_model


def load_trained_model(checkpoint: Path, config: Path):
    """The patched model of a run's config with the weights of one of its DCP checkpoints."""
    setup_globals()  # Hydra's resolvers (e.g. ${now:...}) for the saved config
    job = job_config(OmegaConf.load(config))
    model = build_model(job.model, job.ttt, torch.device("cpu"), job.seed)
    state = get_model_state_dict(model)
    dcp.load({"model": state}, storage_reader=CheckpointReader(checkpoint), no_dist=True)
    set_model_state_dict(model, state)
    return model.eval()


def load_checkpoint_model(checkpoint: Path, config: Path | None = None):
    """`load_trained_model` for user input: the run's config defaults to RUN/.hydra/config.yaml, and anything
    that is not a loadable DCP checkpoint of that config is a ValueError with a one-line message."""
    config = config or checkpoint.parent.parent / ".hydra" / "config.yaml"
    meta = checkpoint / "meta.json"
    if not meta.is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no meta.json)")
    fmt = json.loads(meta.read_text()).get("format", "dcp")
    if fmt != "dcp":
        raise ValueError(f"{checkpoint} is a {fmt} checkpoint; only DCP ones (parallel.engine fsdp2 or ddp) load")
    if not config.is_file():
        raise ValueError(f"no run config at {config} (pass --config)")
    try:
        return load_trained_model(checkpoint, config)
    except ConfigError as err:
        raise ValueError(f"{config}: {err}") from err
    except (CheckpointException, RuntimeError, ValueError) as err:  # e.g. the checkpoint of another model
        raise ValueError(f"cannot load {checkpoint} into the model of {config}: {str(err).splitlines()[0]}") from err
