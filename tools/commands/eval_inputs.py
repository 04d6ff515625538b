"""What `ttt-eval` reads: the model (a Hugging Face folder or a training checkpoint), the tokenizer, and
the documents perplexity is measured on. Bad input is a ValueError with a one-line message."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint.trained_model import load_checkpoint_model
from trainer.data.documents import iter_documents, resolve_inputs
from trainer.data.synthetic import GENERATORS
from trainer.hf_format import load_ttt_model
from trainer.model import DTYPES


def load_model(path: Path, dtype: str | None = None, clip: float | None = None):
    """The patched model in eval mode: from a folder `tools.commands.export_hf` (or the In-Place TTT release) wrote,
    or from a run's `checkpoints/step-N` with the run's .hydra/config.yaml."""
    if (path / "config.json").is_file():
        return load_ttt_model(path, DTYPES[dtype] if dtype else "auto", clip)
    if not (path / "meta.json").is_file():
        raise ValueError(f"{path} is neither a Hugging Face folder (config.json) nor a checkpoint (meta.json)")
    if clip is not None:
        raise ValueError("--clip needs a Hugging Face folder (the checkpoint uses its run's ttt.clip)")
    model = load_checkpoint_model(path)
    return model.to(DTYPES[dtype]) if dtype else model


def load_tokenizer(folder: Path, vocab_size: int):
    from transformers import AutoTokenizer

    if not folder.is_dir():
        raise ValueError(f"--tokenizer must be a local tokenizer folder, got {str(folder)!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than the model's vocab_size={vocab_size}")
    return tokenizer


def perplexity_documents(source: str, length: int, count: int, vocab_size: int, tokenizer=None, tokenizer_dir=None):
    """Up to `count` documents of 2 .. `length` tokens, (1, S) each: sequences 0 .. count-1 of a generator
    (`source` a GENERATORS name; text ones use the tokenizer), or the documents of a file or folder as
    `tools.commands.prepare_data` reads them (.txt, .jsonl / .parquet with a "text" field, a datasets folder),
    tokenized and cut to `length`."""
    if source in GENERATORS:
        options = {"tokenizer": tokenizer_dir} if source.endswith("_text") else {}
        dataset = GENERATORS[source](vocab_size=vocab_size, seq_len=length, seed=0, **options)
        return [dataset.sample(i).input_ids for i in range(count)]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--ppl-data must be a file or one of {', '.join(sorted(GENERATORS))}, got {source!r}")
    if tokenizer is None:
        raise ValueError("--ppl-data FILE needs --tokenizer")
    documents = []
    for text in iter_documents(resolve_inputs([path])):  # read as tools.commands.prepare_data reads its inputs
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] >= 2:
            documents.append(ids)
        if len(documents) == count:
            break
    if not documents:
        raise ValueError(f"{path} has no document of 2 tokens or more")
    return documents
