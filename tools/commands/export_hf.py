"""Export a training checkpoint to a Hugging Face folder that `trainer.hf_format.load_ttt_model` loads back.

    ttt-export RUN/checkpoints/step-N OUT [--config RUN/.hydra/config.yaml] [--max-shard-size 5GB]

The model is rebuilt from the run's Hydra config (the one `ttt-train` saved in the run directory), its
weights are read from the DCP checkpoint, and OUT gets config.json (with the TTT fields, see
trainer/hf_format.py) and safetensors shards. OUT is written under a temporary name and renamed when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tools.cli import OneLineErrorParser
from trainer.checkpoint.trained_model import load_checkpoint_model
from trainer.hf_format import save_ttt_model
from trainer.model import DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="ttt-export", description=__doc__.splitlines()[0])
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
