"""Tokenize local documents into token shards for `ttt-train data=corpus`.

    ttt-prepare-data corpus/*.jsonl books/ --tokenizer /local/hf/Qwen3-0.6B --output data/prepared \
        --workers 8

Inputs: `.txt` files (one document each), `.jsonl` (field --text-key), `.parquet` (column --text-key),
Hugging Face `datasets` folders (from `save_to_disk`), or folders holding such files. The output folder
gets uint32 token shards with document offsets and `manifest.json` (`trainer/data/shards.py`). The
result is the same for any --workers; re-running with the same arguments keeps finished shards. Bad
input ends the program with one line, `error: <file>: <why>`, and leaves no half-written shard.
"""

from __future__ import annotations

import argparse
import json
import sys

from tools.cli import OneLineErrorParser, positive_int
from trainer.data.errors import DataError
from trainer.data.prepare import prepare


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="ttt-prepare-data", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="files or folders to read, in this order")
    parser.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer folder")
    parser.add_argument("--output", required=True, help="folder for the shards and manifest.json")
    parser.add_argument("--shard-tokens", type=positive_int, default=1 << 28, help="tokens per shard (at least)")
    parser.add_argument("--workers", type=positive_int, default=1, help="tokenizer processes")
    parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="append EOS to documents")
    parser.add_argument("--text-key", default="text", help="JSONL field / Parquet or datasets column with the text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        result = prepare(
            args.inputs, args.tokenizer, args.output, shard_tokens=args.shard_tokens, workers=args.workers,
            append_eos=args.eos, text_key=args.text_key, progress=not args.quiet,
        )  # fmt: skip
    except (DataError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    rate = result.tokens_written / result.seconds if result.seconds else 0.0
    summary = {
        "output": str(result.output), "shards_written": result.shards_written, "shards_kept": result.shards_kept,
        "documents": result.documents, "tokens": result.tokens, "tokens_per_s": round(rate),
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
