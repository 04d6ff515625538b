"""Export a training checkpoint to a Hugging Face folder that `trainer.hf_format.load_ttt_model` loads back.

    python -m tools.export_hf RUN/checkpoints/step-N OUT [--config RUN/.hydra/config.yaml] [--max-shard-size 5GB]

The model is rebuilt from the run's Hydra config (the one `ttt-train` saved in the run directory), its
weights are read from the DCP checkpoint, and OUT gets config.json (with the TTT fields, see
trainer/hf_format.py) and safetensors shards. OUT is written under a temporary name and renamed when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from hydra.core.utils import setup_globals
from omegaconf import OmegaConf
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from tools.benchutil import OneLineErrorParser
from trainer.config import ConfigError, job_config
from trainer.dcp_reader import CheckpointReader
from trainer.hf_format import save_ttt_model
from trainer.model import DTYPES, build_model


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


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="export_hf", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory of a run")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to create (must not exist)")
    parser.add_argument("--config", type=Path, help="the run's Hydra config (default: RUN/.hydra/config.yaml)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: the run's model.dtype)")
    args = parser.parse_args(argv)

    if args.out.exists():
        parser.error(f"{args.out} already exists")
    try:
        model = load_checkpoint_model(args.checkpoint, args.config)
    except ValueError as err:
        parser.error(str(err))
    if args.dtype:
        model.to(DTYPES[args.dtype])

    partial = args.out.parent / f".{args.out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that crashed
    try:
        save_ttt_model(model, partial, args.max_shard_size)
        partial.rename(args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"exported {args.checkpoint} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
