"""Data pipeline throughput: preparing token shards and loading training sequences, against the rate at
which the tiny model trains on CPU (the loader must never be the bottleneck: at least 10x).

The corpus is generated English-like text (`tools/textdata.py`: documents of 20-200 sentences, about
400-4,000 tokens) and the tokenizer a byte-level BPE trained on it locally, unless --tokenizer names a
local Hugging Face folder. Rows:
- prepare: `trainer.data.prepare.prepare` end to end (reading JSONL, tokenizing, writing and hashing
  shards; worker start-up included), with 1 and --workers processes; tokens written per second.
- loader: `SequenceLoader.next_batch()` over the prepared corpus (batch 1, one data-parallel rank),
  packed and unpacked, after the dataset is built (its sha256 check of every shard is start-up, not
  throughput); sequences and tokens per second.
- train: the tiny model (`conf/model/tiny.yaml`, TTT-NTP on all layers, fp32), `ttt-train data=corpus
  parallel=single` for --steps steps in this process; the fastest step's `tokens_per_s` after the
  first (the conservative choice for the loader's ratio on a shared machine).
The ratio column is each row's tokens/s over the training rate.

    python -m tools.bench.data                   # 6.7M tokens, seq_len 2048, 2 workers
    python -m tools.bench.data --quick           # 1.3M tokens, for a check
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tools.cli import OneLineErrorParser, positive_int
from tools.textdata import build_tokenizer, make_documents
from trainer.compose import job_of
from trainer.data import SequenceLoader
from trainer.data.corpus import CorpusDataset
from trainer.data.prepare import prepare
from trainer.loop import run

LOADER_RATIO_FLOOR = 10.0


def _corpus(folder: Path, documents: int) -> tuple[Path, Path]:
    """Generated documents as JSONL and a tokenizer trained on such text (the test suite's too)."""
    path = folder / "corpus.jsonl"
    with open(path, "w") as handle:
        for text in make_documents(documents, seed=0, min_sentences=20, max_sentences=200):
            handle.write(json.dumps({"text": text}) + "\n")
    return path, build_tokenizer(folder / "tokenizer")


def _loader_rate(prepared: Path, vocab_size: int, seq_len: int, packing: bool, batches: int) -> float:
    dataset = CorpusDataset(vocab_size, seq_len, seed=0, sources=[str(prepared)], packing=packing)
    loader = SequenceLoader(dataset, batch_size=1, dp_rank=0, dp_size=1)
    loader.next_batch()
    began = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches / (time.perf_counter() - began)


def _training_rate(prepared: Path, vocab_size: int, seq_len: int, steps: int, run_dir: Path) -> float:
    overrides = [
        "parallel=single", "data=corpus", f"data.sources=[{{path:{prepared}}}]", f"data.seq_len={seq_len}",
        f"model.config.vocab_size={vocab_size}", f"train.steps={steps}", f"checkpoint.every={steps}",
        "train.progress=false", "logging.wandb.mode=disabled",
    ]  # fmt: skip
    run(job_of(overrides), run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(row["tokens_per_s"] for row in rows[1:])


def main(argv: list[str] | None = None) -> None:
    parser = OneLineErrorParser(prog="python -m tools.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=positive_int, default=3000, help="generated documents")
    parser.add_argument("--tokenizer", help="a local Hugging Face tokenizer folder (default: one trained here)")
    parser.add_argument("--workers", type=positive_int, default=2, help="tokenizer processes of the parallel row")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="training sequence length")
    parser.add_argument("--batches", type=positive_int, default=500, help="loader batches timed")
    parser.add_argument("--steps", type=positive_int, default=5, help="training steps timed")
    parser.add_argument("--quick", action="store_true", help="a fifth of the documents, 3 training steps")
    args = parser.parse_args(argv)
    documents, steps = (max(args.documents // 5, 1), 3) if args.quick else (args.documents, args.steps)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus, tokenizer = _corpus(scratch, documents)
        tokenizer = Path(args.tokenizer) if args.tokenizer else tokenizer
        rows = []  # (stage, setting, tokens/s)
        for workers in sorted({1, args.workers}):
            result = prepare([corpus], tokenizer, scratch / f"prepared-{workers}", workers=workers, progress=False)
            setting = f"{workers} worker{'s' if workers > 1 else ''}, {result.tokens:,} tokens"
            rows.append(("prepare", setting, result.tokens / result.seconds))
        prepared = scratch / "prepared-1"
        vocab_size = json.loads((prepared / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        for packing in (True, False):
            rate = _loader_rate(prepared, vocab_size, args.seq_len, packing, args.batches)
            setting = f"{'packed' if packing else 'unpacked'}, {rate:,.0f} sequences/s"
            rows.append(("loader", setting, rate * args.seq_len))
        train = _training_rate(prepared, vocab_size, args.seq_len, steps, scratch / "run")
        rows.append(("train", f"tiny model, CPU, fastest of {steps} steps", train))

    print(f"S={args.seq_len}, batch 1, vocab {vocab_size}\n")
    print("| stage | setting | tokens/s | ratio vs training |")
    print("|---|---|---:|---:|")
    for stage, setting, rate in rows:
        print(f"| {stage} | {setting} | {rate:,.0f} | {rate / train:,.1f} |")
    slowest = min(rate for stage, _, rate in rows if stage == "loader") / train
    verdict = "ok" if slowest >= LOADER_RATIO_FLOOR else "TOO SLOW"
    print(f"\nloader / training = {slowest:.1f} (floor {LOADER_RATIO_FLOOR:.0f}): {verdict}")


if __name__ == "__main__":
    main()
