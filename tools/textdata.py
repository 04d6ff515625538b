"""Generated English-like text and a byte-level BPE tokenizer trained on it locally, for tests and
benchmarks that need text without downloading any."""

from __future__ import annotations

import random
from pathlib import Path

from trainer.data.tokenizer import save_tokenizer_folder, train_bpe

_NOUNS = "river city model signal garden window teacher number planet story engine market letter valley".split()
_VERBS = "finds carries watches builds follows remembers answers moves opens writes measures keeps".split()
_ADJECTIVES = "quiet bright long early distant careful small heavy open simple strange warm".split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(["the", "a", "every"]), rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_VERBS)]
    words += [rng.choice(["the", "a"]), rng.choice(_NOUNS)]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def make_documents(count: int, seed: int, min_sentences: int = 1, max_sentences: int = 40) -> list[str]:
    """`count` documents of varied length, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(min_sentences, max_sentences))) for _ in range(count)]


def build_tokenizer(folder: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer trained on generated text, saved as a Hugging Face folder."""
    return save_tokenizer_folder(train_bpe(make_documents(200, seed=0), vocab_size), folder)
