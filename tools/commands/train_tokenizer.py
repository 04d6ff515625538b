"""Train a small byte-level BPE tokenizer on local documents, deterministically, for a model trained from scratch.

    ttt-train-tokenizer runs/stdlib/train.jsonl --vocab-size 4096 --out runs/stdlib/bpe4096

Inputs are read as `ttt-prepare-data` reads them (`.txt`, `.jsonl` field --text-key, `.parquet`, datasets
folders). OUT becomes a Hugging Face tokenizer folder (`AutoTokenizer.from_pretrained(OUT)`, `--tokenizer OUT`
for `ttt-prepare-data` and `ttt-eval`) with `<|endoftext|>` as its EOS, and `training.json`: the inputs'
sizes and SHA-256, the vocabulary size and the SHA-256 of the `tokenizer.json` made. The same inputs give the
same tokenizer, byte for byte; a rerun whose inputs and size match `training.json` keeps the folder. The folder
is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

from tools.cli import OneLineErrorParser, positive_int
from trainer.data.documents import iter_documents, resolve_inputs
from trainer.data.errors import DataError
from trainer.data.tokenizer import save_tokenizer_folder, train_bpe
from trainer.tracking import write_json_atomically

RECORD = "training.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_tokenizer(inputs: list[str], vocab_size: int, out: Path, text_key: str = "text") -> dict:
    """Train (or keep, when OUT already holds this training) and return OUT's `training.json` record."""
    resolved = resolve_inputs(inputs)
    files = [{"path": str(i.path), "bytes": i.size, "sha256": _sha256(i.path)} for i in resolved if i.path.is_file()]
    record = {
        "inputs": files,
        "text_key": text_key,
        "vocab_size": vocab_size,
        "tokenizers": metadata.version("tokenizers"),
    }
    if out.exists():
        kept = out / RECORD
        if not kept.is_file():
            raise DataError(f"{out}: exists and is not a tokenizer folder this command wrote; choose another --out")
        previous = json.loads(kept.read_text())
        if {k: v for k, v in previous.items() if k != "tokenizer_json_sha256"} == record:
            return {**previous, "kept": True}
    documents = (text for text in iter_documents(resolved, text_key) if text)
    save_tokenizer_folder(train_bpe(documents, vocab_size), out)
    record["tokenizer_json_sha256"] = _sha256(out / "tokenizer.json")
    write_json_atomically(out / RECORD, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="ttt-train-tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="files or folders of documents, in this order")
    parser.add_argument("--vocab-size", type=positive_int, default=4096, help="tokens, the 256 bytes and EOS included")
    parser.add_argument("--out", type=Path, required=True, help="the tokenizer folder to write")
    parser.add_argument("--text-key", default="text", help="JSONL field / Parquet or datasets column with the text")
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        parser.error(f"--vocab-size must be at least 257 (the 256 bytes and EOS), got {args.vocab_size}")
    try:
        record = train_tokenizer(args.inputs, args.vocab_size, args.out, args.text_key)
    except (DataError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"out": str(args.out), **record}))


if __name__ == "__main__":
    main()
