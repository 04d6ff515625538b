"""A byte-level BPE tokenizer trained locally with the `tokenizers` library, saved as a Hugging Face folder.

Training is deterministic: the same documents in the same order give the same `tokenizer.json`, byte for byte,
whatever the number of threads (tests/test_tokenizer.py). A small vocabulary suits a small model: at 4,096
tokens the output head of a width-192 model is 0.8M parameters, at SmolLM2's 49,152 it would be most of them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = (
    "<|endoftext|>"  # the one special token: the EOS that `tools.commands.prepare_data` appends to each document
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenization: every byte has a token, so no text is unknown)."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer_folder(tokenizer: Tokenizer, folder: Path) -> Path:
    """Write `tokenizer` as a folder that `AutoTokenizer.from_pretrained(folder)` loads, whole or not at all: it
    is built beside `folder` and renamed into place (an existing `folder` is replaced)."""
    from transformers import PreTrainedTokenizerFast

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT).save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
