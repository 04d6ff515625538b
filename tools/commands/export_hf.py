"""Export a training checkpoint to a self-contained Hugging Face folder: it loads with transformers alone.

    ttt-export RUN/checkpoints/step-N OUT [--config RUN/.hydra/config.yaml] [--tokenizer DIR] [--dtype bfloat16]
               [--max-shard-size 5GB]

The model is rebuilt from the run's Hydra config (the one `ttt-train` saved in the run directory), its
weights are read from the DCP checkpoint, and OUT gets config.json (with the TTT fields, see
trainer/export/fields.py), safetensors shards, the fast-weight modeling code (trainer/export/remote_code.py:
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it without this package, and
`trainer.hf_format.load_ttt_model` with it) and, with --tokenizer, the tokenizer that lm-eval and generation read.
OUT is written under a temporary name and renamed when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tools.cli import OneLineErrorParser
from tools.commands.eval_inputs import load_tokenizer
from trainer.checkpoint.trained_model import load_checkpoint_model
from trainer.hf_format import save_ttt_model
from trainer.model import DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="ttt-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N directory of a run")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to create (must not exist)")
    parser.add_argument("--config", type=Path, help="the run's Hydra config (default: RUN/.hydra/config.yaml)")
    parser.add_argument("--tokenizer", type=Path, help="a local tokenizer folder to copy into OUT (lm-eval needs one)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: the run's model.dtype)")
    args = parser.parse_args(argv)

    if args.out.exists():
        parser.error(f"{args.out} already exists")
    try:
        model = load_checkpoint_model(args.checkpoint, args.config)
        tokenizer = load_tokenizer(args.tokenizer, model.config.vocab_size) if args.tokenizer else None
    except ValueError as err:
        parser.error(str(err))
    if args.dtype:
        model.to(DTYPES[args.dtype])

    partial = args.out.parent / f".{args.out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that crashed
    try:
        save_ttt_model(model, partial, args.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        partial.rename(args.out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"exported {args.checkpoint} to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
